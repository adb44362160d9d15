//! The management plane: the `Enterprise*Service` gRPC APIs the sidecar serves itself on the
//! management listener (mTLS, same identity and token rules as the data plane). The proxy
//! authenticates each call with the one pipeline, then hands it to these services with the
//! verified caller in the request's extensions; each RPC authorizes itself (RBAC, with the
//! tenant it acts on) and records its refusals through the same recorder.
//!
//! Served today: `EnterpriseIdentityService` ([`identity`]), `EnterprisePolicyService`
//! ([`policy`]), `EnterpriseGovernanceService` ([`governance`]), `EnterpriseCostService`
//! ([`cost`]) and `EnterpriseAuditService` ([`audit`], when the audit trail is on). The other services answer `METHOD_NOT_ALLOWED`
//! until they land.

pub mod audit;
pub mod cost;
pub mod governance;
pub mod identity;
pub mod policy;

use crate::authz::{Authz, Resolved};
use crate::decision::{Facts, Recorder, Stage};
use crate::grid::Route;
use crate::grpc::{Denial, ErrorCode};
use crate::ids::{PrincipalId, TenantId};
use bytes::Bytes;
use prost::Message;
use std::sync::Arc;

/// The RPCs served here; any other path is `METHOD_NOT_ALLOWED`.
pub const SERVED: [&str; 23] = [
    "/altar.aesp.v1.EnterpriseAuditService/QueryEvents",
    "/altar.aesp.v1.EnterpriseAuditService/GetComplianceReport",
    "/altar.aesp.v1.EnterpriseCostService/SetBudget",
    "/altar.aesp.v1.EnterpriseCostService/GetUsage",
    "/altar.aesp.v1.EnterpriseGovernanceService/SubmitToolContract",
    "/altar.aesp.v1.EnterpriseGovernanceService/ApproveToolContract",
    "/altar.aesp.v1.EnterpriseGovernanceService/RejectToolContract",
    "/altar.aesp.v1.EnterpriseGovernanceService/ListToolContracts",
    "/altar.aesp.v1.EnterpriseIdentityService/CreateServiceAccount",
    "/altar.aesp.v1.EnterpriseIdentityService/RevokeServiceAccount",
    "/altar.aesp.v1.EnterpriseIdentityService/AssignRole",
    "/altar.aesp.v1.EnterpriseIdentityService/GetPrincipalPermissions",
    "/altar.aesp.v1.EnterprisePolicyService/CreatePolicy",
    "/altar.aesp.v1.EnterprisePolicyService/UpdatePolicy",
    "/altar.aesp.v1.EnterprisePolicyService/TestPolicy",
    "/altar.aesp.v1.EnterprisePolicyService/ListPolicies",
    "/altar.aesp.v1.EnterprisePolicyService/GetPolicy",
    "/altar.aesp.v1.EnterprisePolicyService/DeletePolicy",
    "/altar.aesp.v1.EnterprisePolicyService/EnablePolicy",
    "/altar.aesp.v1.EnterprisePolicyService/DisablePolicy",
    "/altar.aesp.v1.EnterprisePolicyService/ListPendingPolicyChanges",
    "/altar.aesp.v1.EnterprisePolicyService/ApprovePolicyChange",
    "/altar.aesp.v1.EnterprisePolicyService/RejectPolicyChange",
];

/// Whether the management listener serves `path`.
pub fn serves(path: &str) -> bool {
    SERVED.contains(&path)
}

/// The verified caller of a management RPC, put in the request's extensions by the proxy.
#[derive(Clone, Debug)]
pub struct ManagementCaller {
    pub principal: PrincipalId,
    pub tenant: TenantId,
    pub grants: Arc<Resolved>,
    pub correlation_id: String,
    pub method: String,
}

/// What the management services share with the data plane.
#[derive(Clone)]
pub struct Shared {
    pub authz: Arc<Authz>,
    pub recorder: Recorder,
    pub control: Arc<crate::store::ControlStore>,
    /// The sidecar's own issuer (service accounts' credentials).
    pub own: Arc<crate::identity::own::OwnIssuer>,
    pub verifier: Arc<crate::identity::token::Verifier>,
}

impl Shared {
    /// `caller` may use `permission` on `tenant`, else a recorded `AUTHORIZATION_DENIED`.
    pub fn require(
        &self,
        caller: &ManagementCaller,
        permission: &str,
        tenant: &TenantId,
    ) -> Result<(), tonic::Status> {
        if caller
            .grants
            .grants
            .allows(permission, tenant, &caller.tenant)
        {
            return Ok(());
        }
        let mut d = Denial::new(
            ErrorCode::AuthorizationDenied,
            format!(
                "{} of tenant {} lacks the permission {permission} on tenant {tenant}",
                caller.principal, caller.tenant
            ),
        )
        .detail("permission", permission)
        .detail("target_tenant", tenant.as_str())
        .detail("roles", caller.grants.grants.roles().join(","));
        if *tenant != caller.tenant {
            d = d.detail(
                "reason",
                "acting on another tenant needs a binding with scope platform",
            );
        }
        Err(self.refuse(caller, d))
    }

    /// `caller` may use `permission` on `tenant`, or, for `None` (what belongs to no tenant,
    /// such as a policy that applies to every tenant), on every tenant: a binding with scope
    /// `platform` must grant it. Else a recorded `AUTHORIZATION_DENIED`.
    pub fn require_scope(
        &self,
        caller: &ManagementCaller,
        permission: &str,
        tenant: Option<&TenantId>,
    ) -> Result<(), tonic::Status> {
        match tenant {
            Some(t) => self.require(caller, permission, t),
            None if caller.grants.grants.platform_allows(permission) => Ok(()),
            None => Err(self.refuse(
                caller,
                Denial::new(
                    ErrorCode::AuthorizationDenied,
                    format!(
                        "{} of tenant {} lacks the permission {permission} on every tenant (platform scope)",
                        caller.principal, caller.tenant
                    ),
                )
                .detail("permission", permission)
                .detail("target_tenant", "*")
                .detail("roles", caller.grants.grants.roles().join(","))
                .detail(
                    "reason",
                    "what applies to every tenant needs a binding with scope platform",
                ),
            )),
        }
    }

    /// Whether `caller` may use `permission` on `tenant` (`None`: platform scope), without
    /// recording anything: for filtering what a listing shows.
    pub fn may(
        &self,
        caller: &ManagementCaller,
        permission: &str,
        tenant: Option<&TenantId>,
    ) -> bool {
        match tenant {
            Some(t) => caller.grants.grants.allows(permission, t, &caller.tenant),
            None => caller.grants.grants.platform_allows(permission),
        }
    }

    /// Records a change made through the management API: `MANAGEMENT_CHANGE`, what changed
    /// (`change`), on which tenant, and the state before and after (JSON).
    pub fn changed(
        &self,
        caller: &ManagementCaller,
        change: &str,
        tenant: &TenantId,
        before: serde_json::Value,
        after: serde_json::Value,
    ) {
        self.changed_on(caller, change, tenant.as_str(), before, after);
    }

    /// [`Shared::changed`] on `target`: a tenant id, or `""` for what every tenant shares.
    pub fn changed_on(
        &self,
        caller: &ManagementCaller,
        change: &str,
        target: &str,
        before: serde_json::Value,
        after: serde_json::Value,
    ) {
        let mut e = crate::audit::event("MANAGEMENT_CHANGE", "INFO");
        e.principal_id = caller.principal.to_string();
        e.tenant_id = caller.tenant.to_string();
        e.method.clone_from(&caller.method);
        e.correlation_id.clone_from(&caller.correlation_id);
        let a = &mut e.attributes;
        a.insert("change".into(), change.into());
        a.insert("target_tenant".into(), target.to_string());
        a.insert("before".into(), before.to_string());
        a.insert("after".into(), after.to_string());
        self.recorder.event(e);
    }

    /// Records `denial` as a refusal of `caller`'s call and turns it into a status.
    pub fn refuse(&self, caller: &ManagementCaller, denial: Denial) -> tonic::Status {
        let mut facts = Facts::new(
            Stage::Call,
            &caller.method,
            Route::Management,
            None,
            &caller.correlation_id,
        );
        facts.principal_id = Some(caller.principal.clone());
        facts.tenant_id = Some(caller.tenant.clone());
        self.recorder
            .record(crate::decision::Decision::Deny(&facts, &denial));
        status(&denial, &caller.correlation_id)
    }
}

/// A `tonic::Status` carrying `denial` as the rich error model (an `EnterpriseError` in a
/// `google.rpc.Status`), as the data plane's denials do.
pub fn status(denial: &Denial, correlation_id: &str) -> tonic::Status {
    let ee = denial.to_enterprise_error(correlation_id);
    let details = crate::proto::rpc::Status {
        code: denial.code.grpc() as i32,
        message: denial.message.clone(),
        details: vec![prost_types::Any {
            type_url: crate::grpc::status::ENTERPRISE_ERROR_TYPE_URL.to_string(),
            value: ee.encode_to_vec(),
        }],
    }
    .encode_to_vec();
    tonic::Status::with_details(
        tonic::Code::from_i32(denial.code.grpc() as i32),
        denial.message.clone(),
        Bytes::from(details),
    )
}

/// The caller of a request, or `UNAUTHENTICATED` (never happens behind the proxy).
pub fn caller<T>(req: &tonic::Request<T>) -> Result<ManagementCaller, tonic::Status> {
    req.extensions()
        .get::<ManagementCaller>()
        .cloned()
        .ok_or_else(|| tonic::Status::unauthenticated("no verified caller"))
}

/// A management request's field that must be a valid id, or `INVALID_ARGUMENT` naming it.
pub fn id_field<T>(
    caller: &ManagementCaller,
    shared: &Shared,
    field: &str,
    value: &str,
    parse: fn(&str) -> Option<T>,
) -> Result<T, tonic::Status> {
    parse(value).ok_or_else(|| {
        shared.refuse(
            caller,
            Denial::new(
                ErrorCode::MalformedMessage,
                format!("{field}: expected an id of letters, digits, '.', '-', '_', got {value:?}"),
            )
            .detail("field", field),
        )
    })
}
