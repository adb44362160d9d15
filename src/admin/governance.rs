//! `EnterpriseGovernanceService`: the approval workflow of tool contracts
//! (docs/governance.md).
//!
//! | RPC | permission | on |
//! |---|---|---|
//! | `SubmitToolContract` | `aesp.governance.submit` | the contract's tenant (platform scope for a shared one) |
//! | `ApproveToolContract`, `RejectToolContract` | `aesp.governance.approve` | idem; never the revision's submitter |
//! | `ListToolContracts` | `aesp.governance.read` | the tenant listed (empty: the caller's) |
//!
//! Every transition is recorded (`MANAGEMENT_CHANGE` with the entry before and after) and
//! persisted in the control store before it takes effect; a store that cannot write fails
//! the call and changes nothing.

use super::{ManagementCaller, Shared, caller};
use crate::governance::{Entry, GovernanceError, Registry};
use crate::grpc::{Denial, ErrorCode};
use crate::ids::TenantId;
use crate::proto::aesp;
use crate::proto::aesp::enterprise_governance_service_server::EnterpriseGovernanceService;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct GovernanceService {
    pub shared: Shared,
    pub registry: Arc<Registry>,
}

/// A contract as recorded in a `MANAGEMENT_CHANGE`: everything but the declaration's body
/// (its digest stands for it).
pub fn summary(c: &aesp::EnterpriseToolContract) -> serde_json::Value {
    serde_json::json!({
        "tool": c.declaration.as_ref().map(|d| d.name.as_str()).unwrap_or(""),
        "tenant_id": c.tenant_id,
        "revision": c.revision,
        "approval_status": c.approval_status,
        "declaration_sha256": crate::governance::hex(&c.declaration_sha256),
        "risk_assessment": c.risk_assessment,
        "compliance_tags": c.compliance_tags,
        "required_roles": c.required_roles,
        "submitted_by": c.submitted_by,
        "approved_by": c.approved_by,
        "review_comment": c.review_comment,
    })
}

fn entry_summary(e: Option<&Entry>) -> serde_json::Value {
    match e {
        None => serde_json::Value::Null,
        Some(e) => serde_json::json!({
            "latest": summary(&e.latest),
            "approved_revision": e.approved.as_ref().map(|a| a.revision),
        }),
    }
}

impl GovernanceService {
    /// `caller` may use `permission` on `tenant` (`""`: a shared contract, platform scope).
    fn require(&self, c: &ManagementCaller, permission: &str, tenant: &str) -> Result<(), Status> {
        if tenant.is_empty() {
            if c.grants.grants.platform_allows(permission) {
                return Ok(());
            }
            return Err(self.shared.refuse(
                c,
                Denial::new(
                    ErrorCode::AuthorizationDenied,
                    format!(
                        "{} of tenant {} lacks the permission {permission} with platform scope, which a contract shared by every tenant needs",
                        c.principal, c.tenant
                    ),
                )
                .detail("permission", permission)
                .detail("target_tenant", "")
                .detail("roles", c.grants.grants.roles().join(",")),
            ));
        }
        let t = super::id_field(c, &self.shared, "tenant_id", tenant, TenantId::new)?;
        self.shared.require(c, permission, &t)
    }

    fn failed(&self, c: &ManagementCaller, e: GovernanceError) -> Status {
        match e {
            GovernanceError::Invalid { field, why } => self.shared.refuse(
                c,
                Denial::new(
                    ErrorCode::MalformedMessage,
                    format!("contract.{field}: {why}"),
                )
                .detail("field", format!("contract.{field}")),
            ),
            GovernanceError::OwnSubmission { .. } => self.shared.refuse(
                c,
                Denial::new(ErrorCode::AuthorizationDenied, e.to_string())
                    .detail("reason", "separation of duties"),
            ),
            GovernanceError::NotFound { .. } => Status::not_found(e.to_string()),
            GovernanceError::NotPending { .. } => Status::failed_precondition(e.to_string()),
            GovernanceError::Store(e) => {
                tracing::error!(error = %e, correlation_id = %c.correlation_id, "the control store failed; nothing was changed");
                Status::unavailable(
                    "the control store cannot record the change; nothing was changed (see the sidecar's log)",
                )
            }
        }
    }

    async fn review(
        &self,
        req: Request<aesp::ReviewToolContractRequest>,
        approve: bool,
    ) -> Result<Response<aesp::EnterpriseToolContract>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        self.require(&c, "aesp.governance.approve", &r.tenant_id)?;
        if r.comment.trim().is_empty() {
            return Err(self.shared.refuse(
                &c,
                Denial::new(
                    ErrorCode::MalformedMessage,
                    "comment: a review says why (required)",
                )
                .detail("field", "comment"),
            ));
        }
        let registry = self.registry.clone();
        let by = c.principal.to_string();
        let (tenant, tool) = (r.tenant_id.clone(), r.tool_name.clone());
        let done = tokio::task::spawn_blocking(move || {
            registry.review(&tenant, &tool, r.revision, approve, &by, &r.comment)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let (reviewed, before) = done.map_err(|e| self.failed(&c, e))?;
        self.changed(
            &c,
            if approve {
                "tool_contract.approve"
            } else {
                "tool_contract.reject"
            },
            &r.tenant_id,
            entry_summary(Some(&before)),
            summary(&reviewed),
        );
        Ok(Response::new(reviewed))
    }

    fn changed(
        &self,
        c: &ManagementCaller,
        change: &str,
        tenant: &str,
        before: serde_json::Value,
        after: serde_json::Value,
    ) {
        self.shared.changed_on(c, change, tenant, before, after);
    }
}

#[tonic::async_trait]
impl EnterpriseGovernanceService for GovernanceService {
    async fn submit_tool_contract(
        &self,
        req: Request<aesp::SubmitToolContractRequest>,
    ) -> Result<Response<aesp::EnterpriseToolContract>, Status> {
        let c = caller(&req)?;
        let Some(contract) = req.into_inner().contract else {
            return Err(self.failed(
                &c,
                GovernanceError::Invalid {
                    field: "declaration",
                    why: "required: the request carries no contract".into(),
                },
            ));
        };
        let tenant = contract.tenant_id.clone();
        self.require(&c, "aesp.governance.submit", &tenant)?;
        let registry = self.registry.clone();
        let by = c.principal.to_string();
        let done = tokio::task::spawn_blocking(move || registry.submit(contract, &by))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let (submitted, before) = done.map_err(|e| self.failed(&c, e))?;
        self.changed(
            &c,
            "tool_contract.submit",
            &tenant,
            entry_summary(before.as_ref()),
            summary(&submitted),
        );
        Ok(Response::new(submitted))
    }

    async fn approve_tool_contract(
        &self,
        req: Request<aesp::ReviewToolContractRequest>,
    ) -> Result<Response<aesp::EnterpriseToolContract>, Status> {
        self.review(req, true).await
    }

    async fn reject_tool_contract(
        &self,
        req: Request<aesp::ReviewToolContractRequest>,
    ) -> Result<Response<aesp::EnterpriseToolContract>, Status> {
        self.review(req, false).await
    }

    /// The contracts of a tenant (its own and the shared ones; `tenant_id` empty: the
    /// caller's tenant; `*`: every tenant, platform scope): for each (tenant, tool) the newest
    /// revision, and the approved one in force before it when they differ. Optionally only
    /// those with `approval_status`.
    async fn list_tool_contracts(
        &self,
        req: Request<aesp::ListToolContractsRequest>,
    ) -> Result<Response<aesp::ListToolContractsResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let all = r.tenant_id == "*";
        let tenant = if r.tenant_id.is_empty() {
            c.tenant.to_string()
        } else {
            r.tenant_id.clone()
        };
        self.require(
            &c,
            "aesp.governance.read",
            if all { "" } else { tenant.as_str() },
        )?;
        let status = r.approval_status.to_ascii_uppercase();
        if !status.is_empty() && !["PENDING", "APPROVED", "REJECTED"].contains(&status.as_str()) {
            return Err(self.shared.refuse(
                &c,
                Denial::new(
                    ErrorCode::MalformedMessage,
                    format!(
                        "approval_status: expected PENDING, APPROVED, REJECTED or empty, got {:?}",
                        r.approval_status
                    ),
                )
                .detail("field", "approval_status"),
            ));
        }
        let snapshot = self.registry.snapshot();
        let mut contracts = Vec::new();
        for (t, _, e) in snapshot.entries() {
            if !(all || t.is_empty() || t == tenant) {
                continue;
            }
            let mut revisions = vec![&e.latest];
            if let Some(a) = &e.approved
                && a.revision != e.latest.revision
            {
                revisions.push(a);
            }
            for rev in revisions {
                if status.is_empty() || rev.approval_status == status {
                    contracts.push((**rev).clone());
                }
            }
        }
        Ok(Response::new(aesp::ListToolContractsResponse { contracts }))
    }
}
