//! The CEL policy stage: every tool invocation is evaluated against the policies in force
//! (docs/policies.md). Combining: any matching enforced DENY denies; where ALLOW policies
//! target the tool, one must match; otherwise RBAC alone decided. A policy in `dry_run`
//! mode is evaluated and its would-be denial is recorded (audit attribute
//! `dry_run_would_deny`, metric `aesp_policy_dry_run_denials_total`), never enforced.

use super::Facts;
use crate::authz::Resolved;
use crate::grpc::Denial;
use crate::identity::Caller;
use crate::ids::{PrincipalId, TenantId};
use crate::listener::PeerIdentity;
use crate::policy::{Input, PolicySet, RequestInfo, Verdict};
use crate::proto::aesp::EnterpriseSecurityContext;

/// What a tool invocation shows the policies.
pub(crate) struct Call<'a> {
    pub id: &'a PeerIdentity,
    pub caller: Option<&'a Caller>,
    pub principal: &'a PrincipalId,
    pub tenant: &'a TenantId,
    pub grants: &'a Resolved,
    pub organization_id: &'a str,
    pub tool: &'a str,
    /// The approved contract the call runs against (the `tool` variable).
    pub contract: Option<&'a crate::proto::aesp::EnterpriseToolContract>,
    pub args: Option<&'a prost_types::Struct>,
    pub session_id: &'a str,
    pub method: &'a str,
    pub source: &'a str,
    pub correlation_id: &'a str,
    /// The meter whose figures are the `usage` variable (docs/cost.md); `None`: empty.
    pub cost: Option<&'a crate::cost::Meter>,
}

/// The caller as the `principal` variable: the effective principal and tenant, its roles
/// (RBAC's resolution, inherited ones included), its token's claims and clearance.
fn principal(c: &Call<'_>) -> EnterpriseSecurityContext {
    let mut esc = EnterpriseSecurityContext {
        principal_id: c.principal.to_string(),
        tenant_id: c.tenant.to_string(),
        organization_id: c
            .caller
            .and_then(|k| k.organization.clone())
            .unwrap_or_else(|| c.organization_id.to_string()),
        roles: c.grants.grants.roles().to_vec(),
        security_clearance: c
            .caller
            .and_then(|k| k.clearance.clone())
            .unwrap_or_default(),
        ..Default::default()
    };
    if let Some(k) = c.caller {
        esc.claims = k
            .claims
            .iter()
            .map(|(a, b)| (a.clone(), b.clone()))
            .collect();
    }
    esc.policy_context
        .insert("peer_kind".into(), c.id.kind.to_string());
    esc
}

/// Evaluates `set` for the call; `Err` is the enforced denial (`POLICY_DENIED`). Matched
/// and would-deny policies are noted in `facts`.
pub(crate) fn evaluate(set: &PolicySet, c: &Call<'_>, facts: &mut Facts) -> Result<(), Denial> {
    if set.is_empty() {
        return Ok(());
    }
    let esc = principal(c);
    let usage = c.cost.map(|m| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        m.policy_usage(c.tenant, c.principal, c.tool, now)
    });
    let out = set.evaluate(&Input {
        principal: &esc,
        tool_name: c.tool,
        tool: c.contract,
        args: c.args,
        runtime: None,
        session_id: c.session_id,
        request: RequestInfo {
            method: c.method,
            time: std::time::SystemTime::now(),
            source_address: c.source,
            correlation_id: c.correlation_id,
        },
        usage: usage.as_ref(),
    });
    facts.matched_policies.extend(out.matched_ids());
    if out.dry_run_would_deny() {
        facts.dry_run_denied = out
            .dry_run_deniers()
            .iter()
            .map(|p| p.id().to_string())
            .collect();
    }
    match out.verdict {
        Verdict::Deny => Err(out.denial().unwrap_or_else(|| {
            Denial::new(crate::grpc::ErrorCode::PolicyDenied, out.explanation())
        })),
        Verdict::Allow | Verdict::NoOpinion => Ok(()),
    }
}
