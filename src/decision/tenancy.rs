//! The tenancy stage (docs/tenancy.md), after RBAC: a call, a stream or a destroy names a
//! session the caller's tenant created, by the same principal unless a role grants
//! `grid.session.any`; a session the sidecar never saw created is refused too.
//! `TENANT_ISOLATION_VIOLATION` (`PERMISSION_DENIED`), before anything reaches the host.

use crate::authz::Resolved;
use crate::grpc::{Denial, ErrorCode};
use crate::ids::{PrincipalId, TenantId};
use crate::tenancy::{Refusal, Sessions};

/// The permission to use the sessions of other principals of one's tenant.
pub(crate) const ANY_PRINCIPAL: &str = "grid.session.any";

pub(crate) fn session_owned(
    sessions: &Sessions,
    session_id: &str,
    tenant: &TenantId,
    principal: &PrincipalId,
    grants: &Resolved,
) -> Result<(), Denial> {
    let any = || grants.grants.allows(ANY_PRINCIPAL, tenant, tenant);
    let why = match sessions.check(session_id, tenant, principal, false) {
        Ok(_) => return Ok(()),
        Err(Refusal::OtherPrincipal(_)) if any() => return Ok(()),
        Err(r) => r,
    };
    let (message, reason) = match &why {
        Refusal::Unknown => (
            format!(
                "session {session_id:?} was not created through this sidecar (or was destroyed)"
            ),
            "unknown session",
        ),
        Refusal::Expired(at) => (
            format!("session {session_id:?} expired at {at} (unix seconds)"),
            "expired session",
        ),
        Refusal::OtherTenant => (
            format!("session {session_id:?} belongs to another tenant"),
            "another tenant's session",
        ),
        Refusal::OtherPrincipal(_) => (
            format!(
                "session {session_id:?} belongs to another principal of tenant {tenant}; using it needs {ANY_PRINCIPAL}"
            ),
            "another principal's session",
        ),
    };
    let mut d = Denial::new(ErrorCode::TenantIsolationViolation, message)
        .detail("session_id", session_id)
        .detail("tenant", tenant.as_str())
        .detail("reason", reason);
    if matches!(why, Refusal::OtherPrincipal(_)) {
        d = d.detail("permission", ANY_PRINCIPAL);
    }
    d.remediation_steps = match why {
        Refusal::Unknown | Refusal::Expired(_) => {
            "Create a session (CreateSession through the sidecar) and use its id.".into()
        }
        _ => "Use a session your principal created in your tenant.".into(),
    };
    Err(d)
}
