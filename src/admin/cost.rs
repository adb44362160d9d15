//! `EnterpriseCostService`: budgets and usage (docs/cost.md).
//!
//! | RPC | permission | on |
//! |---|---|---|
//! | `SetBudget` | `aesp.cost.admin` | the budget's tenant (empty: the caller's) |
//! | `GetUsage` | `aesp.cost.read` or `aesp.cost.admin` | the tenant read (empty: the caller's); a caller reads its own principal's usage without either |
//!
//! Another tenant needs the permission with platform scope. A budget is written to the
//! control store before it takes effect and audited as a `MANAGEMENT_CHANGE`
//! (`change = budget.set`, the budget before and after); a store that cannot write fails
//! the call with `UNAVAILABLE` and changes nothing.

use super::{ManagementCaller, Shared, caller, id_field};
use crate::cost::{Limits, Meter, config::check_limits};
use crate::grpc::{Denial, ErrorCode};
use crate::ids::{PrincipalId, TenantId};
use crate::proto::aesp;
use crate::proto::aesp::enterprise_cost_service_server::EnterpriseCostService;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub const ADMIN: &str = "aesp.cost.admin";
pub const READ: &str = "aesp.cost.read";

pub struct CostService {
    pub shared: Shared,
    pub meter: Arc<Meter>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn budget_json(l: Option<Limits>) -> serde_json::Value {
    match l {
        None => serde_json::Value::Null,
        Some(l) => serde_json::json!({
            "max_invocations": l.max_invocations,
            "max_cost_units": l.max_cost_units,
            "window_seconds": l.window_seconds,
        }),
    }
}

impl CostService {
    /// The account a request names: its tenant (empty: the caller's) and principal (empty:
    /// the tenant's own account).
    fn account(
        &self,
        c: &ManagementCaller,
        tenant: &str,
        principal: &str,
        prefix: &str,
    ) -> Result<(TenantId, Option<PrincipalId>), Status> {
        let t = if tenant.is_empty() {
            c.tenant.clone()
        } else {
            id_field(
                c,
                &self.shared,
                &format!("{prefix}tenant_id"),
                tenant,
                TenantId::new,
            )?
        };
        let p = if principal.is_empty() {
            None
        } else {
            Some(id_field(
                c,
                &self.shared,
                &format!("{prefix}principal_id"),
                principal,
                PrincipalId::new,
            )?)
        };
        Ok((t, p))
    }
}

#[tonic::async_trait]
impl EnterpriseCostService for CostService {
    async fn set_budget(
        &self,
        req: Request<aesp::SetBudgetRequest>,
    ) -> Result<Response<aesp::Budget>, Status> {
        let c = caller(&req)?;
        let Some(b) = req.into_inner().budget else {
            return Err(self.shared.refuse(
                &c,
                Denial::new(
                    ErrorCode::MalformedMessage,
                    "budget: required: the request carries no budget",
                )
                .detail("field", "budget"),
            ));
        };
        let (tenant, principal) = self.account(&c, &b.tenant_id, &b.principal_id, "budget.")?;
        self.shared.require(&c, ADMIN, &tenant)?;
        let limits = Limits::from_budget(&b);
        if let Err(problem) = check_limits(&limits) {
            return Err(self.shared.refuse(
                &c,
                Denial::new(
                    ErrorCode::MalformedMessage,
                    format!("budget.window_seconds: {problem}"),
                )
                .detail("field", "budget.window_seconds"),
            ));
        }
        let meter = self.meter.clone();
        let (t, p) = (tenant.clone(), principal.clone());
        let done = tokio::task::spawn_blocking(move || {
            meter.set_budget(&t, p.as_ref(), limits, unix_now())
        })
        .await
        .map_err(|e| Status::internal(format!("SetBudget: the store task failed: {e}")))?;
        let before = done.map_err(|e| {
            tracing::error!(error = %e, correlation_id = %c.correlation_id, "the control store failed; the budget was not changed");
            Status::unavailable(
                "the control store cannot record the budget; nothing was changed (see the sidecar's log)",
            )
        })?;
        let p = principal.as_ref().map_or("", |p| p.as_str());
        let mut after = budget_json((!limits.is_unlimited()).then_some(limits));
        if let serde_json::Value::Object(m) = &mut after {
            m.insert("principal_id".into(), p.into());
        }
        self.shared
            .changed(&c, "budget.set", &tenant, budget_json(before), after);
        Ok(Response::new(limits.to_budget(tenant.as_str(), p)))
    }

    async fn get_usage(
        &self,
        req: Request<aesp::GetUsageRequest>,
    ) -> Result<Response<aesp::Usage>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let (tenant, principal) = self.account(&c, &r.tenant_id, &r.principal_id, "")?;
        let own = tenant == c.tenant && principal.as_ref() == Some(&c.principal);
        if !own && !self.shared.may(&c, ADMIN, Some(&tenant)) {
            self.shared.require(&c, READ, &tenant)?;
        }
        Ok(Response::new(self.meter.usage(
            &tenant,
            principal.as_ref(),
            unix_now(),
        )))
    }
}
