//! `EnterprisePolicyService`: the CEL policies managed through the API, persisted in the
//! control store beside the files of `policies.path` (docs/policies.md).
//!
//! | RPC | permission | on tenant |
//! |---|---|---|
//! | `CreatePolicy`, `UpdatePolicy`, `DeletePolicy`, `EnablePolicy`, `DisablePolicy` | `aesp.policy.write` | the policy's (both, when an update moves it) |
//! | `GetPolicy`, `ListPolicies`, `ListPendingPolicyChanges` | `aesp.policy.read` | the policy's (a listing shows what the caller may read) |
//! | `TestPolicy` | `aesp.policy.read` | the tested call's tenant (and the tested policy's) |
//! | `ApprovePolicyChange`, `RejectPolicyChange` | `aesp.policy.approve` (its author may withdraw it with `aesp.policy.write`) | the policy's |
//!
//! A policy without a tenant applies to every tenant: acting on it needs the permission
//! with platform scope.
//!
//! - One validation: a proto `Policy` becomes a [`PolicySpec`] and goes through
//!   [`Policy::compile`], as a file's entry does. An invalid condition is
//!   `INVALID_ARGUMENT` with its line, column and reason in `details`.
//! - Versions: `CreatePolicy` makes version 1; every change makes the next. `UpdatePolicy`
//!   names the version it was made against (`expected_version`, else `policy.version`): a
//!   stale one is `FAILED_PRECONDITION` naming both.
//! - The set in force is the files' policies plus these ([`Installed`]); an id in both is
//!   refused (`ALREADY_EXISTS` here, a failed reload for the files).
//! - Durable first, then in force: a change the store could not keep is not applied.
//! - With `policies.require_approval`, a change is stored as a pending [`PolicyChangeRecord`]
//!   and answered with status `PENDING_APPROVAL`; a second principal holding
//!   `aesp.policy.approve` (never its author) applies it, checked again against the policy
//!   as it is then.
//! - Every change, proposal, approval and rejection is audited (`MANAGEMENT_CHANGE`).
//! - `TestPolicy` runs the described call through the data plane's [`Pipeline::decide`],
//!   the policies under test substituted, so its answer is the live answer.

use super::{ManagementCaller, Shared, caller};
use crate::decision::{DecisionInput, Pipeline, TokenRules};
use crate::grid::{GridMethod, Route};
use crate::grpc::{Denial, ErrorCode};
use crate::identity::token::{ClaimMapping, Issuer, Verifier, VerifyKey};
use crate::ids::{PeerKind, PrincipalId, TenantId};
use crate::listener::PeerIdentity;
use crate::policy::{Installed, Policy, PolicyError, PolicyErrors, PolicySet, PolicySpec};
use crate::proto::aesp;
use crate::proto::aesp::enterprise_policy_service_server::EnterprisePolicyService;
use crate::store::control::{PolicyAction, PolicyBatch, PolicyChangeRecord, PolicyRecord};
use std::collections::BTreeMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Reading policies, their pending changes, and testing calls against them.
pub const READ: &str = "aesp.policy.read";
/// Creating, updating, deleting, enabling and disabling policies.
pub const WRITE: &str = "aesp.policy.write";
/// Approving or rejecting another principal's pending change.
pub const APPROVE: &str = "aesp.policy.approve";

/// `Policy.status` of a policy in force.
pub const ACTIVE: &str = "ACTIVE";
/// `Policy.status` of a proposed revision waiting for approval.
pub const PENDING: &str = "PENDING_APPROVAL";
/// `Policy.status` of a policy just deleted.
pub const DELETED: &str = "DELETED";

/// The `iss` (and audience) of the tokens `TestPolicy` mints for the described caller.
const TEST_ISSUER: &str = "aesp-sidecar:test-policy";

/// The API's policies as stored, and the pending changes; the service's one writer lock.
#[derive(Default)]
struct Api {
    records: BTreeMap<String, PolicyRecord>,
    changes: BTreeMap<String, PolicyChangeRecord>,
}

pub struct PolicyService {
    shared: Shared,
    installed: Arc<Installed>,
    pipeline: Pipeline,
    require_approval: bool,
    api: tokio::sync::Mutex<Api>,
    tester: Tester,
}

/// Compiles the policies the control store holds (at start): every error, each naming its
/// policy.
pub fn compile_stored(records: &[PolicyRecord]) -> Result<PolicySet, PolicyErrors> {
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for r in records {
        match Policy::compile(r.spec.clone(), "control store") {
            Ok(p) => policies.push(p),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        PolicySet::new(policies)
    } else {
        Err(PolicyErrors(errors))
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The tenant a spec belongs to; `None` for every tenant (platform scope). The spec was
/// compiled, so a non-empty tenant is a valid id.
fn scope(spec: &PolicySpec) -> Option<TenantId> {
    if spec.tenant.is_empty() {
        None
    } else {
        TenantId::new(&spec.tenant)
    }
}

fn scope_text(spec: &PolicySpec) -> &str {
    if spec.tenant.is_empty() {
        "*"
    } else {
        &spec.tenant
    }
}

fn json(spec: &PolicySpec) -> serde_json::Value {
    serde_json::to_value(spec).unwrap_or(serde_json::Value::Null)
}

fn record_proto(r: &PolicyRecord) -> aesp::Policy {
    aesp::Policy {
        updated_by: r.updated_by.clone(),
        updated_at: r.updated_at,
        source: "api".into(),
        status: ACTIVE.into(),
        ..r.spec.to_proto()
    }
}

fn change_proto(c: &PolicyChangeRecord, status: &str) -> aesp::PolicyChange {
    aesp::PolicyChange {
        change_id: c.change_id.clone(),
        action: c.action.as_str().into(),
        policy_id: c.policy_id.clone(),
        tenant_id: c.proposed.tenant.clone(),
        proposed: Some(aesp::Policy {
            status: PENDING.into(),
            change_id: c.change_id.clone(),
            source: "api".into(),
            updated_by: c.requested_by.clone(),
            updated_at: c.requested_at,
            ..c.proposed.to_proto()
        }),
        base_version: c.base_version,
        requested_by: c.requested_by.clone(),
        requested_at: c.requested_at,
        status: status.into(),
        ..Default::default()
    }
}

/// One change to make: what it does, the policy before, the spec after (for a deletion, the
/// spec deleted), and the version it applies to (0 for a creation).
struct Planned {
    action: PolicyAction,
    before: Option<PolicyRecord>,
    after: PolicySpec,
    base_version: u64,
}

impl Planned {
    fn change_name(&self) -> &'static str {
        match self.action {
            PolicyAction::Create => "policy_created",
            PolicyAction::Update => "policy_updated",
            PolicyAction::Delete => "policy_deleted",
            PolicyAction::Enable => "policy_enabled",
            PolicyAction::Disable => "policy_disabled",
        }
    }
}

impl PolicyService {
    pub(crate) fn new(
        shared: Shared,
        installed: Arc<Installed>,
        pipeline: Pipeline,
        require_approval: bool,
        state: &crate::store::ControlState,
    ) -> anyhow::Result<PolicyService> {
        let api = Api {
            records: state
                .policies
                .iter()
                .map(|r| (r.spec.id.clone(), r.clone()))
                .collect(),
            changes: state
                .policy_changes
                .iter()
                .map(|c| (c.change_id.clone(), c.clone()))
                .collect(),
        };
        Ok(PolicyService {
            shared,
            installed,
            pipeline,
            require_approval,
            api: tokio::sync::Mutex::new(api),
            tester: Tester::new()?,
        })
    }

    /// A policy refused by the one validation: `INVALID_ARGUMENT` (recorded), the field, and
    /// for a condition its line, column and reason.
    fn invalid(&self, c: &ManagementCaller, e: &PolicyError) -> Status {
        let mut d = Denial::new(ErrorCode::MalformedMessage, e.to_string());
        match e {
            PolicyError::Condition { id, error, .. } => {
                d = d
                    .detail("policy_id", id.as_str())
                    .detail("field", "condition")
                    .detail("line", error.line.to_string())
                    .detail("column", error.column.to_string())
                    .detail("reason", error.reason.as_str());
            }
            PolicyError::Invalid {
                id, field, problem, ..
            } => {
                d = d
                    .detail("policy_id", id.as_str())
                    .detail("field", field.as_str())
                    .detail("reason", problem.as_str());
            }
            _ => {}
        }
        self.shared.refuse(c, d)
    }

    fn malformed(&self, c: &ManagementCaller, field: &str, message: String) -> Status {
        self.shared.refuse(
            c,
            Denial::new(ErrorCode::MalformedMessage, message).detail("field", field),
        )
    }

    /// A listing's `tenant_id` filter: `None` for every tenant the caller may read, else the
    /// tenant (refused when it is not a tenant id, or the caller may not read it).
    fn tenant_filter(
        &self,
        c: &ManagementCaller,
        tenant_id: &str,
    ) -> Result<Option<TenantId>, Status> {
        if tenant_id.is_empty() {
            return Ok(None);
        }
        let t = TenantId::new(tenant_id).ok_or_else(|| {
            self.malformed(
                c,
                "tenant_id",
                format!("tenant_id: not a tenant id: {tenant_id:?}"),
            )
        })?;
        self.shared.require(c, READ, &t)?;
        Ok(Some(t))
    }

    /// The proto policy as a validated spec and its compiled policy.
    fn validate(
        &self,
        c: &ManagementCaller,
        p: Option<&aesp::Policy>,
    ) -> Result<(PolicySpec, Policy), Status> {
        let p = p.ok_or_else(|| self.malformed(c, "policy", "policy: required".into()))?;
        let spec = PolicySpec::from_proto(p).map_err(|e| {
            let field = e.split(':').next().unwrap_or("policy").to_string();
            self.malformed(c, &field, e)
        })?;
        let policy = Policy::compile(spec.clone(), "api").map_err(|e| self.invalid(c, &e))?;
        Ok((spec, policy))
    }

    /// The API's policy `id` as stored, or why there is none: a file's (`FAILED_PRECONDITION`:
    /// change the file) or no such policy (`NOT_FOUND`).
    fn stored(&self, api: &Api, id: &str) -> Result<PolicyRecord, Status> {
        if let Some(r) = api.records.get(id) {
            return Ok(r.clone());
        }
        match self.installed.files().get(id) {
            Some(p) => Err(Status::failed_precondition(format!(
                "policy {id:?} comes from a file ({}); change it in its file, the sidecar reloads it",
                p.origin()
            ))),
            None => Err(Status::not_found(format!("no policy {id:?}"))),
        }
    }

    /// A creation must name an id that is nowhere yet.
    fn absent(&self, api: &Api, id: &str) -> Result<(), Status> {
        if api.records.contains_key(id) {
            return Err(Status::already_exists(format!(
                "policy {id:?} exists; change it with UpdatePolicy"
            )));
        }
        if let Some(p) = self.installed.files().get(id) {
            return Err(Status::already_exists(format!(
                "policy {id:?} is defined in a file ({}); an API policy cannot take a file policy's id",
                p.origin()
            )));
        }
        Ok(())
    }

    fn stale(id: &str, current: u64, given: u64) -> Status {
        Status::failed_precondition(format!(
            "policy {id:?} is at version {current}, the change was made against version {given}: read it again (GetPolicy) and retry"
        ))
    }

    /// Applies `planned` now, or (with `policies.require_approval`) stores it as a pending
    /// change.
    async fn commit_or_propose(
        &self,
        c: &ManagementCaller,
        api: &mut Api,
        planned: Planned,
    ) -> Result<aesp::Policy, Status> {
        if !self.require_approval {
            return self.apply(c, api, planned, None).await;
        }
        let change = PolicyChangeRecord {
            change_id: format!("chg-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]),
            action: planned.action,
            policy_id: planned.after.id.clone(),
            proposed: planned.after.clone(),
            base_version: planned.base_version,
            requested_by: c.principal.to_string(),
            requested_at: now(),
        };
        self.write(
            c,
            PolicyBatch {
                put_changes: vec![change.clone()],
                ..Default::default()
            },
        )
        .await?;
        api.changes.insert(change.change_id.clone(), change.clone());
        self.shared.changed_on(
            c,
            "policy_change_proposed",
            scope_text(&change.proposed),
            planned
                .before
                .as_ref()
                .map_or(serde_json::Value::Null, |b| json(&b.spec)),
            serde_json::json!({
                "change_id": change.change_id, "action": change.action.as_str(),
                "base_version": change.base_version, "proposed": json(&change.proposed),
            }),
        );
        tracing::info!(
            change_id = %change.change_id, policy = %change.policy_id, action = change.action.as_str(),
            requested_by = %c.principal, correlation_id = %c.correlation_id,
            "policy change proposed; waiting for approval"
        );
        let proposed = change_proto(&change, "PENDING");
        Ok(proposed.proposed.unwrap_or_default())
    }

    /// Makes `planned` durable, then puts it in force; audited. `approval` names the pending
    /// change it comes from and its author.
    async fn apply(
        &self,
        c: &ManagementCaller,
        api: &mut Api,
        planned: Planned,
        approval: Option<&PolicyChangeRecord>,
    ) -> Result<aesp::Policy, Status> {
        let at = now();
        let author = approval.map_or_else(|| c.principal.to_string(), |a| a.requested_by.clone());
        let id = planned.after.id.clone();
        let mut batch = PolicyBatch::default();
        if let Some(a) = approval {
            batch.delete_changes.push(a.change_id.clone());
        }
        let (record, compiled) = if planned.action == PolicyAction::Delete {
            batch.delete_policies.push(id.clone());
            (None, None)
        } else {
            let mut spec = planned.after.clone();
            spec.version = planned.base_version + 1;
            let compiled = Policy::compile(spec.clone(), "api").map_err(|e| self.invalid(c, &e))?;
            let record = PolicyRecord {
                created_by: planned
                    .before
                    .as_ref()
                    .map_or_else(|| author.clone(), |b| b.created_by.clone()),
                created_at: planned.before.as_ref().map_or(at, |b| b.created_at),
                updated_by: author.clone(),
                updated_at: at,
                spec,
            };
            batch.put_policies.push(record.clone());
            (Some(record), Some(compiled))
        };
        self.write(c, batch).await?;
        let put = self
            .installed
            .update_api(|set| -> Result<PolicySet, PolicyErrors> {
                Ok(match compiled {
                    Some(p) => set.with(p),
                    None => set.without(&id),
                })
            });
        if let Err(e) = put {
            // A file reload took the id meanwhile: undo the store's write.
            let mut undo = PolicyBatch::default();
            match &planned.before {
                Some(b) => undo.put_policies.push(b.clone()),
                None => undo.delete_policies.push(id.clone()),
            }
            if let Some(a) = approval {
                undo.put_changes.push(a.clone());
            }
            self.write(c, undo).await?;
            return Err(Status::already_exists(format!(
                "policy {id:?} clashes with the policy files: {e}"
            )));
        }
        if let Some(a) = approval {
            api.changes.remove(&a.change_id);
        }
        match &record {
            Some(r) => {
                api.records.insert(id.clone(), r.clone());
            }
            None => {
                api.records.remove(&id);
            }
        }
        let mut after = match &record {
            Some(r) => json(&r.spec),
            None => serde_json::Value::Null,
        };
        if let (Some(a), Some(o)) = (approval, after.as_object_mut()) {
            o.insert("change_id".into(), a.change_id.clone().into());
            o.insert("requested_by".into(), a.requested_by.clone().into());
            o.insert("approved_by".into(), c.principal.to_string().into());
        }
        self.shared.changed_on(
            c,
            planned.change_name(),
            scope_text(&planned.after),
            planned
                .before
                .as_ref()
                .map_or(serde_json::Value::Null, |b| json(&b.spec)),
            after,
        );
        tracing::info!(
            policy = %id, change = planned.change_name(), by = %c.principal,
            correlation_id = %c.correlation_id, "policy change in force"
        );
        Ok(match record {
            Some(r) => record_proto(&r),
            None => aesp::Policy {
                status: DELETED.into(),
                source: "api".into(),
                ..planned.after.to_proto()
            },
        })
    }

    /// One store write, or `UNAVAILABLE` (logged) when the store failed.
    async fn write(&self, c: &ManagementCaller, batch: PolicyBatch) -> Result<(), Status> {
        let control = self.shared.control.clone();
        match tokio::task::spawn_blocking(move || control.write_policies(&batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, correlation_id = %c.correlation_id, "the control store failed; the policy change was not made");
                Err(Status::unavailable(
                    "the control store cannot record the change; nothing was changed (see the sidecar's log)",
                ))
            }
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    /// The proto of an installed policy (API or file).
    fn installed_proto(&self, api: &Api, p: &Policy) -> aesp::Policy {
        match api.records.get(p.id()) {
            Some(r) => record_proto(r),
            None => aesp::Policy {
                source: p.origin().to_string(),
                status: ACTIVE.into(),
                ..p.spec().to_proto()
            },
        }
    }

    /// Delete, Enable, Disable.
    async fn change(
        &self,
        req: Request<aesp::PolicyChangeRequest>,
        action: PolicyAction,
    ) -> Result<Response<aesp::Policy>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let mut api = self.api.lock().await;
        let before = self.stored(&api, &r.policy_id)?;
        self.shared
            .require_scope(&c, WRITE, scope(&before.spec).as_ref())?;
        if r.expected_version != 0 && r.expected_version != before.spec.version {
            return Err(Self::stale(
                &r.policy_id,
                before.spec.version,
                r.expected_version,
            ));
        }
        let mut after = before.spec.clone();
        match action {
            PolicyAction::Enable | PolicyAction::Disable => {
                let enabled = action == PolicyAction::Enable;
                if before.spec.enabled == enabled {
                    // Already so: nothing to change, nothing to approve.
                    return Ok(Response::new(record_proto(&before)));
                }
                after.enabled = enabled;
            }
            _ => {}
        }
        let planned = Planned {
            action,
            base_version: before.spec.version,
            before: Some(before),
            after,
        };
        self.commit_or_propose(&c, &mut api, planned)
            .await
            .map(Response::new)
    }

    /// A pending change and the tenants approving or rejecting it needs the permission on.
    fn pending(&self, api: &Api, change_id: &str) -> Result<PolicyChangeRecord, Status> {
        api.changes
            .get(change_id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no pending policy change {change_id:?}")))
    }

    /// The permission `permission` on the change's policy, before and after.
    fn require_on_change(
        &self,
        c: &ManagementCaller,
        api: &Api,
        change: &PolicyChangeRecord,
        permission: &str,
    ) -> Result<(), Status> {
        self.shared
            .require_scope(c, permission, scope(&change.proposed).as_ref())?;
        if let Some(b) = api.records.get(&change.policy_id)
            && b.spec.tenant != change.proposed.tenant
        {
            self.shared
                .require_scope(c, permission, scope(&b.spec).as_ref())?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl EnterprisePolicyService for PolicyService {
    async fn create_policy(
        &self,
        req: Request<aesp::CreatePolicyRequest>,
    ) -> Result<Response<aesp::Policy>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let (mut spec, _) = self.validate(&c, r.policy.as_ref())?;
        self.shared
            .require_scope(&c, WRITE, scope(&spec).as_ref())?;
        spec.version = 1;
        let mut api = self.api.lock().await;
        self.absent(&api, &spec.id)?;
        let planned = Planned {
            action: PolicyAction::Create,
            before: None,
            after: spec,
            base_version: 0,
        };
        self.commit_or_propose(&c, &mut api, planned)
            .await
            .map(Response::new)
    }

    async fn update_policy(
        &self,
        req: Request<aesp::UpdatePolicyRequest>,
    ) -> Result<Response<aesp::Policy>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let (spec, _) = self.validate(&c, r.policy.as_ref())?;
        let expected = match (r.expected_version, spec.version) {
            (0, v) => v,
            (v, _) => v,
        };
        let mut api = self.api.lock().await;
        let before = self.stored(&api, &spec.id)?;
        self.shared
            .require_scope(&c, WRITE, scope(&before.spec).as_ref())?;
        if before.spec.tenant != spec.tenant {
            self.shared
                .require_scope(&c, WRITE, scope(&spec).as_ref())?;
        }
        if expected != before.spec.version {
            return Err(Self::stale(&spec.id, before.spec.version, expected));
        }
        let planned = Planned {
            action: PolicyAction::Update,
            base_version: before.spec.version,
            before: Some(before),
            after: spec,
        };
        self.commit_or_propose(&c, &mut api, planned)
            .await
            .map(Response::new)
    }

    async fn test_policy(
        &self,
        req: Request<aesp::TestPolicyRequest>,
    ) -> Result<Response<aesp::TestPolicyResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let ctx = r.context.clone().unwrap_or_default();
        let tenant = TenantId::new(&ctx.tenant_id).ok_or_else(|| {
            self.malformed(
                &c,
                "context.tenant_id",
                format!(
                    "context.tenant_id: expected the tenant of the tested call, got {:?}",
                    ctx.tenant_id
                ),
            )
        })?;
        let principal = PrincipalId::new(&ctx.principal_id).ok_or_else(|| {
            self.malformed(
                &c,
                "context.principal_id",
                format!(
                    "context.principal_id: expected the principal of the tested call, got {:?}",
                    ctx.principal_id
                ),
            )
        })?;
        self.shared.require(&c, READ, &tenant)?;
        let in_force = self.installed.in_force();
        let set = if r.policy.is_some() {
            let (spec, draft) = self.validate(&c, r.policy.as_ref())?;
            self.shared.require_scope(&c, READ, scope(&spec).as_ref())?;
            Arc::new(if r.with_installed {
                in_force.with(draft)
            } else {
                PolicySet::single(draft)
            })
        } else if !r.policy_id.is_empty() {
            let p = in_force
                .get(&r.policy_id)
                .ok_or_else(|| Status::not_found(format!("no policy {:?}", r.policy_id)))?;
            self.shared
                .require_scope(&c, READ, scope(p.spec()).as_ref())?;
            Arc::new(
                in_force
                    .only(&r.policy_id)
                    .ok_or_else(|| Status::not_found(format!("no policy {:?}", r.policy_id)))?,
            )
        } else {
            in_force.clone()
        };
        let call = r.call.unwrap_or_default();
        if call.name.is_empty() {
            return Err(self.malformed(&c, "call.name", "call.name: the tool to test".into()));
        }
        let method = r
            .request
            .get("method")
            .map_or(GridMethod::ExecuteTool.path(), String::as_str);
        let grid = GridMethod::from_path(method)
            .filter(|m| matches!(m, GridMethod::ExecuteTool | GridMethod::ExecuteToolStream))
            .ok_or_else(|| {
                self.malformed(
                    &c,
                    "request.method",
                    format!(
                        "request.method: a tool-invoking method ({} or {}), got {method:?}",
                        GridMethod::ExecuteTool.path(),
                        GridMethod::ExecuteToolStream.path()
                    ),
                )
            })?;
        let token = self.tester.token(&ctx).map_err(|e| {
            Status::internal(format!("cannot describe the caller as a token: {e:#}"))
        })?;
        let authorization = format!("Bearer {token}");
        let identity = PeerIdentity::new(
            principal.clone(),
            tenant.clone(),
            PeerKind::Client,
            None,
            format!("TestPolicy {principal}"),
        );
        let cache = crate::authz::GrantsCache::default();
        // With `request.session_id`, the call is checked against the live session table
        // (as a live call is); without, it runs in a session of the described caller.
        let (session_id, sessions) = match r.request.get("session_id") {
            Some(id) => (id.as_str(), self.pipeline.sessions.clone()),
            None => {
                let s = crate::tenancy::Sessions::new();
                s.created(
                    "testpolicy-session",
                    tenant.clone(),
                    principal.clone(),
                    u64::MAX,
                );
                ("testpolicy-session", Arc::new(s))
            }
        };
        let input = DecisionInput {
            method,
            route: Route::Grid(grid),
            identity: Ok(&identity),
            authorization: Some(authorization.as_bytes()),
            grants: &cache,
            claims: Default::default(),
            tool_name: Some(&call.name),
            args: call.args.as_ref(),
            session_id: Some(session_id),
            correlation_id: &c.correlation_id,
            source: r.request.get("source_address").map_or("", String::as_str),
        };
        let mut pipeline = self.pipeline.clone();
        pipeline.policies = Arc::new(arc_swap::ArcSwap::new(set));
        pipeline.sessions = sessions;
        pipeline.tokens = TokenRules {
            verifier: Some(self.tester.verifier.clone()),
            ..Default::default()
        };
        let out = match pipeline.decide(&input) {
            Ok(a) => {
                let matched = a.facts.matched_policies.clone();
                let (decision, explanation) = if matched.is_empty() {
                    (
                        "NOT_APPLICABLE",
                        "allowed: no policy decides this call (RBAC and the other checks allow it)"
                            .to_string(),
                    )
                } else {
                    (
                        "ALLOW",
                        format!("allowed: ALLOW policies hold: {}", matched.join(", ")),
                    )
                };
                aesp::TestPolicyResponse {
                    decision: decision.into(),
                    matched_policies: matched,
                    explanation,
                    error: None,
                    dry_run_would_deny: a.facts.dry_run_denied,
                }
            }
            Err(d) => aesp::TestPolicyResponse {
                decision: "DENY".into(),
                matched_policies: d.facts.matched_policies.clone(),
                explanation: d.denial.message.clone(),
                error: Some(d.denial.to_enterprise_error(&c.correlation_id)),
                dry_run_would_deny: d.facts.dry_run_denied.clone(),
            },
        };
        Ok(Response::new(out))
    }

    async fn list_policies(
        &self,
        req: Request<aesp::ListPoliciesRequest>,
    ) -> Result<Response<aesp::ListPoliciesResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let only = self.tenant_filter(&c, &r.tenant_id)?;
        let api = self.api.lock().await;
        let policies = self
            .installed
            .in_force()
            .policies()
            .iter()
            .filter(|p| {
                let s = scope(p.spec());
                match &only {
                    Some(t) => s.as_ref() == Some(t),
                    None => self.shared.may(&c, READ, s.as_ref()),
                }
            })
            .map(|p| self.installed_proto(&api, p))
            .collect();
        Ok(Response::new(aesp::ListPoliciesResponse { policies }))
    }

    async fn get_policy(
        &self,
        req: Request<aesp::GetPolicyRequest>,
    ) -> Result<Response<aesp::Policy>, Status> {
        let c = caller(&req)?;
        let id = req.into_inner().policy_id;
        let api = self.api.lock().await;
        let set = self.installed.in_force();
        let p = set
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("no policy {id:?}")))?;
        self.shared
            .require_scope(&c, READ, scope(p.spec()).as_ref())?;
        Ok(Response::new(self.installed_proto(&api, p)))
    }

    async fn delete_policy(
        &self,
        req: Request<aesp::PolicyChangeRequest>,
    ) -> Result<Response<aesp::Policy>, Status> {
        self.change(req, PolicyAction::Delete).await
    }

    async fn enable_policy(
        &self,
        req: Request<aesp::PolicyChangeRequest>,
    ) -> Result<Response<aesp::Policy>, Status> {
        self.change(req, PolicyAction::Enable).await
    }

    async fn disable_policy(
        &self,
        req: Request<aesp::PolicyChangeRequest>,
    ) -> Result<Response<aesp::Policy>, Status> {
        self.change(req, PolicyAction::Disable).await
    }

    async fn list_pending_policy_changes(
        &self,
        req: Request<aesp::ListPendingPolicyChangesRequest>,
    ) -> Result<Response<aesp::ListPendingPolicyChangesResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let only = self.tenant_filter(&c, &r.tenant_id)?;
        let api = self.api.lock().await;
        let changes = api
            .changes
            .values()
            .filter(|ch| {
                let s = scope(&ch.proposed);
                match &only {
                    Some(t) => s.as_ref() == Some(t),
                    None => self.shared.may(&c, READ, s.as_ref()),
                }
            })
            .map(|ch| change_proto(ch, "PENDING"))
            .collect();
        Ok(Response::new(aesp::ListPendingPolicyChangesResponse {
            changes,
        }))
    }

    async fn approve_policy_change(
        &self,
        req: Request<aesp::ReviewPolicyChangeRequest>,
    ) -> Result<Response<aesp::PolicyChange>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let mut api = self.api.lock().await;
        let change = self.pending(&api, &r.change_id)?;
        self.require_on_change(&c, &api, &change, APPROVE)?;
        if change.requested_by == c.principal.as_str() {
            return Err(self.shared.refuse(
                &c,
                Denial::new(
                    ErrorCode::AuthorizationDenied,
                    format!(
                        "{} proposed policy change {} and cannot approve it: a second principal holding {APPROVE} must (separation of duties)",
                        c.principal, change.change_id
                    ),
                )
                .detail("reason", "self-approval")
                .detail("change_id", change.change_id.as_str())
                .detail("requested_by", change.requested_by.as_str())
                .detail("permission", APPROVE),
            ));
        }
        // Checked again against the policy as it is now.
        let before = if change.action == PolicyAction::Create {
            self.absent(&api, &change.policy_id).map_err(|s| {
                Status::failed_precondition(format!(
                    "change {} can no longer apply: {}; reject it",
                    change.change_id,
                    s.message()
                ))
            })?;
            None
        } else {
            let b = self.stored(&api, &change.policy_id)?;
            if b.spec.version != change.base_version {
                return Err(Status::failed_precondition(format!(
                    "change {} was proposed against version {} of policy {:?}, which is now at version {}: reject it and propose it again",
                    change.change_id, change.base_version, change.policy_id, b.spec.version
                )));
            }
            Some(b)
        };
        let planned = Planned {
            action: change.action,
            before,
            after: change.proposed.clone(),
            base_version: change.base_version,
        };
        let result = self.apply(&c, &mut api, planned, Some(&change)).await?;
        let mut out = change_proto(&change, "APPROVED");
        out.proposed = Some(result);
        out.reviewed_by = c.principal.to_string();
        out.review_comment = r.comment;
        Ok(Response::new(out))
    }

    async fn reject_policy_change(
        &self,
        req: Request<aesp::ReviewPolicyChangeRequest>,
    ) -> Result<Response<aesp::PolicyChange>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let mut api = self.api.lock().await;
        let change = self.pending(&api, &r.change_id)?;
        // Its author may withdraw it; anyone else reviews it.
        let permission = if change.requested_by == c.principal.as_str() {
            WRITE
        } else {
            APPROVE
        };
        self.require_on_change(&c, &api, &change, permission)?;
        self.write(
            &c,
            PolicyBatch {
                delete_changes: vec![change.change_id.clone()],
                ..Default::default()
            },
        )
        .await?;
        api.changes.remove(&change.change_id);
        self.shared.changed_on(
            &c,
            "policy_change_rejected",
            scope_text(&change.proposed),
            serde_json::json!({
                "change_id": change.change_id, "action": change.action.as_str(),
                "requested_by": change.requested_by, "proposed": json(&change.proposed),
            }),
            serde_json::json!({"change_id": change.change_id, "rejected_by": c.principal.as_str(), "comment": r.comment}),
        );
        let mut out = change_proto(&change, "REJECTED");
        out.reviewed_by = c.principal.to_string();
        out.review_comment = r.comment;
        Ok(Response::new(out))
    }
}

// ------------------------------------------------------------------------------ TestPolicy

/// The described caller of `TestPolicy` as a token of an issuer only this service trusts, so
/// that the call runs through the data plane's token check and RBAC resolution like a live
/// one: the token's `roles` are asserted roles, its `security_clearance` and
/// `organization_id` the caller's, `claims` its other claims.
struct Tester {
    key: jsonwebtoken::EncodingKey,
    kid: String,
    verifier: Arc<Verifier>,
}

impl Tester {
    fn new() -> anyhow::Result<Tester> {
        use anyhow::Context;
        use base64::Engine;
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .context("cannot generate TestPolicy's signing key")?;
        let kid = "test-policy".to_string();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kp.public_key_raw());
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig",
        }))
        .context("TestPolicy's public key as a JWK")?;
        let vk = VerifyKey::from_jwk(&jwk).map_err(|e| anyhow::anyhow!("TestPolicy's key: {e}"))?;
        let key = jsonwebtoken::EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes())
            .context("TestPolicy's signing key")?;
        let mapping = ClaimMapping {
            organization: Some("organization_id".into()),
            clearance: Some("security_clearance".into()),
            ..ClaimMapping::default()
        };
        let issuer = Issuer::new(
            TEST_ISSUER.into(),
            vec![TEST_ISSUER.into()],
            mapping,
            vec![vk],
        );
        Ok(Tester {
            key,
            kid,
            verifier: Arc::new(Verifier::new(vec![issuer], 0)),
        })
    }

    fn token(&self, ctx: &aesp::EnterpriseSecurityContext) -> anyhow::Result<String> {
        let iat = now();
        let mut claims = serde_json::Map::new();
        for (k, v) in &ctx.claims {
            claims.insert(k.clone(), v.clone().into());
        }
        let fixed = serde_json::json!({
            "iss": TEST_ISSUER, "aud": TEST_ISSUER, "sub": ctx.principal_id,
            "tenant": ctx.tenant_id, "roles": ctx.roles, "iat": iat, "exp": iat + 60,
        });
        if let Some(o) = fixed.as_object() {
            claims.extend(o.clone());
        }
        if !ctx.security_clearance.is_empty() {
            claims.insert(
                "security_clearance".into(),
                ctx.security_clearance.clone().into(),
            );
        }
        if !ctx.organization_id.is_empty() {
            claims.insert("organization_id".into(), ctx.organization_id.clone().into());
        }
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        h.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(
            &h,
            &serde_json::Value::Object(claims),
            &self.key,
        )?)
    }
}
