//! The one decision point. Every check runs here, in order, and a call is either
//! [`Allowed`] (carrying the verified identity, and later the roles, the contract and the
//! budget reservation) or [`Denied`] (carrying the refusal). Both carry the [`Facts`] the
//! pipeline saw. Whatever is recorded about a call (logs, metrics, and the audit trail of a
//! later release) is made from a [`Decision`] by the one [`Recorder`], so nothing is decided
//! that is not recorded.
//!
//! The pipeline only decides; the proxy records, at the moment it acts on the outcome: an
//! allow is recorded just before the call is forwarded, a refusal just before it is
//! answered. A refusal made after the pipeline (an upgrade that fails, a Connect message out
//! of order, a frame that does not decode, a host that fails) goes through the same
//! [`Recorder`] as a [`Denied`].
//!
//! Order of the checks: authentication (certificate) → caller (bearer token) → method known
//! → identity consistency → RBAC → tenancy (the session's owner, docs/tenancy.md) →
//! governance (contract, roles, arguments) → CEL policies → budget (the call's cost reserved,
//! docs/cost.md). Each is a file of its own beside this.

mod authn;
#[doc(hidden)]
pub mod bench;
mod budget;
mod claims;
mod governance;
mod method;
mod policy;
mod rbac;
mod record;
mod tenancy;
mod token;

pub(crate) use authn::unauthenticated;
pub(crate) use record::Recorder;
pub(crate) use token::TokenRules;

use crate::authz::{Authz, GrantsCache, Resolved};
use crate::grid::upgrade::Claims;
use crate::grid::{GridMethod, Route};
use crate::grpc::{Denial, ErrorCode};
use crate::identity::Caller;
use crate::ids::{PeerKind, PrincipalId, TenantId};
use crate::listener::PeerIdentity;
use crate::listener::identity::IdentityError;
use std::sync::Arc;

/// Everything the pipeline looks at for one call (or one message of a stream).
#[derive(Debug)]
pub(crate) struct DecisionInput<'a> {
    pub method: &'a str,
    pub route: Route,
    pub identity: Result<&'a PeerIdentity, &'a IdentityError>,
    /// The `authorization` header's value, if any.
    pub authorization: Option<&'a [u8]>,
    /// The connection's RBAC grants cache (used when the call carries no token).
    pub grants: &'a GrantsCache,
    pub claims: Claims,
    pub tool_name: Option<&'a str>,
    /// The tool call's arguments (for the CEL policies).
    pub args: Option<&'a prost_types::Struct>,
    pub session_id: Option<&'a str>,
    pub correlation_id: &'a str,
    /// The peer's address (`ip:port`).
    pub source: &'a str,
}

impl<'a> DecisionInput<'a> {
    /// A call decided on its headers alone, before any message is read.
    pub fn headers(
        method: &'a str,
        route: Route,
        identity: Result<&'a PeerIdentity, &'a IdentityError>,
        authorization: Option<&'a [u8]>,
        grants: &'a GrantsCache,
        correlation_id: &'a str,
    ) -> Self {
        DecisionInput {
            method,
            route,
            identity,
            authorization,
            grants,
            claims: Claims::default(),
            tool_name: None,
            args: None,
            session_id: None,
            correlation_id,
            source: "",
        }
    }
}

/// What a decision is about, for the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// A call, decided before anything of it reached the host.
    Call,
    /// The message that decides an allowed `Connect`: its `announce` (or what came in its
    /// place). `aesp_calls_total` counts a `Connect` here, once, not at its headers.
    Announce,
    /// One message of an allowed stream (a runtime's `Connect`), decided as it passes.
    Message,
    /// A call already allowed, refused on its way back (the host failed, or sent what does
    /// not decode). Counted as a refusal, not as a second decision about the call.
    Response,
}

/// What the pipeline saw: who, which call, what matched. Every record is made of it.
#[derive(Debug, Clone)]
pub(crate) struct Facts {
    pub stage: Stage,
    pub method: String,
    pub route: Route,
    /// The effective principal and tenant: the token's caller where there is one, else the
    /// certificate's.
    pub principal_id: Option<PrincipalId>,
    pub tenant_id: Option<TenantId>,
    pub peer_kind: Option<PeerKind>,
    /// The certificate's principal, when a token's caller acts through it.
    pub workload: Option<PrincipalId>,
    pub correlation_id: String,
    pub tool_name: Option<String>,
    pub session_id: Option<String>,
    /// The approved tool contract the call runs against (revision, risk, compliance tags
    /// for the record).
    pub contract: Option<Arc<crate::proto::aesp::EnterpriseToolContract>>,
    /// The call's reserved cost (docs/cost.md), settled when the call ends; released when
    /// the last copy of the facts is dropped unsettled.
    pub reservation: Option<Arc<crate::cost::Reservation>>,
    /// Policies that matched (CEL policy ids).
    pub matched_policies: Vec<String>,
    /// Policies in `dry_run` mode that would have denied (recorded, not enforced).
    pub dry_run_denied: Vec<String>,
    /// A claimed identity field disagreed and was overwritten (config allows it).
    pub overwrote_identity: bool,
}

/// The effective principal and tenant of a call: the token's caller where there is one (its
/// tenant where its issuer maps one), else the certificate's.
pub(crate) fn effective<'a>(
    id: &'a PeerIdentity,
    caller: Option<&'a Caller>,
) -> (&'a PrincipalId, &'a TenantId) {
    match caller {
        Some(c) => (&c.principal, c.tenant.as_ref().unwrap_or(&id.tenant_id)),
        None => (&id.principal_id, &id.tenant_id),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Facts {
    /// The effective identity is the token's caller, acting through the certificate.
    fn caller(&mut self, id: &PeerIdentity, caller: Option<&Caller>) {
        if caller.is_none() {
            return;
        }
        let (principal, tenant) = effective(id, caller);
        self.workload = Some(id.principal_id.clone());
        self.principal_id = Some(principal.clone());
        self.tenant_id = Some(tenant.clone());
    }

    /// The facts of a call about to be decided, or refused before the pipeline could run.
    pub fn new(
        stage: Stage,
        method: &str,
        route: Route,
        identity: Option<&PeerIdentity>,
        correlation_id: &str,
    ) -> Facts {
        Facts {
            stage,
            method: method.to_string(),
            route,
            principal_id: identity.map(|i| i.principal_id.clone()),
            tenant_id: identity.map(|i| i.tenant_id.clone()),
            peer_kind: identity.map(|i| i.kind.clone()),
            workload: None,
            correlation_id: correlation_id.to_string(),
            tool_name: None,
            session_id: None,
            contract: None,
            reservation: None,
            matched_policies: Vec::new(),
            dry_run_denied: Vec::new(),
            overwrote_identity: false,
        }
    }
}

/// The pipeline let the call through; `identity` is the verified certificate it was decided
/// for, `caller` the verified token's caller where the call carried one.
#[derive(Debug)]
pub(crate) struct Allowed<'a> {
    pub identity: &'a PeerIdentity,
    pub caller: Option<Arc<Caller>>,
    /// The effective caller's RBAC grants (and roles, encoded for the security context).
    pub grants: Arc<Resolved>,
    pub facts: Facts,
}

impl Allowed<'_> {
    /// The effective principal and tenant of the allowed call.
    pub fn effective(&self) -> (&PrincipalId, &TenantId) {
        effective(self.identity, self.caller.as_deref())
    }

    /// A refusal after the pipeline allowed (an upgrade that cannot be written, say): the
    /// same facts, now denied.
    pub fn deny(self, denial: Denial) -> Denied {
        Denied {
            denial,
            facts: self.facts,
        }
    }
}

/// The call, or the message, is refused with `denial`.
#[derive(Debug)]
pub(crate) struct Denied {
    pub denial: Denial,
    pub facts: Facts,
}

impl Denied {
    /// A refusal decided outside the pipeline (a frame that does not decode, a message out
    /// of order, a failed host).
    pub fn early(
        stage: Stage,
        method: &str,
        route: Route,
        identity: Option<&PeerIdentity>,
        correlation_id: &str,
        denial: Denial,
    ) -> Denied {
        Denied {
            denial,
            facts: Facts::new(stage, method, route, identity, correlation_id),
        }
    }
}

/// One decision, as the [`Recorder`] sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Decision<'d> {
    Allow(&'d Facts),
    Deny(&'d Facts, &'d Denial),
}

impl<'a> From<&'a Allowed<'_>> for Decision<'a> {
    fn from(a: &'a Allowed<'_>) -> Self {
        Decision::Allow(&a.facts)
    }
}

impl<'a> From<&'a Denied> for Decision<'a> {
    fn from(d: &'a Denied) -> Self {
        Decision::Deny(&d.facts, &d.denial)
    }
}

/// Who passed the checks.
struct Verified<'a> {
    identity: &'a PeerIdentity,
    caller: Option<Arc<Caller>>,
    grants: Arc<Resolved>,
}

/// The ordered checks, built once from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Pipeline {
    pub overwrite_identity_fields: bool,
    pub tokens: TokenRules,
    pub authz: Arc<Authz>,
    /// The CEL policies in force (swapped whole on reload).
    pub policies: Arc<arc_swap::ArcSwap<crate::policy::PolicySet>>,
    /// `identity.organization_id`, for the `principal` of the policies.
    pub organization_id: Arc<str>,
    /// The governed tool contracts (only an approved one runs).
    pub governance: Arc<crate::governance::Registry>,
    /// The sessions created through the sidecar, and whose they are.
    pub sessions: Arc<crate::tenancy::Sessions>,
    /// Metering and budgets (docs/cost.md); `None`: tool calls are neither metered nor
    /// limited.
    pub cost: Option<Arc<crate::cost::Meter>>,
}

impl Pipeline {
    /// Runs every check in order; the first refusal ends it.
    pub fn decide<'a>(&self, input: &DecisionInput<'a>) -> Result<Allowed<'a>, Denied> {
        let mut facts = Facts::new(
            Stage::Call,
            input.method,
            input.route,
            input.identity.ok(),
            input.correlation_id,
        );
        facts.tool_name = input.tool_name.map(str::to_string);
        facts.session_id = input
            .session_id
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        match self.check(input, &mut facts) {
            Ok(v) => Ok(Allowed {
                identity: v.identity,
                caller: v.caller,
                grants: v.grants,
                facts,
            }),
            Err(denial) => Err(Denied { denial, facts }),
        }
    }

    /// The checks, in order; the first refusal ends the call.
    fn check<'a>(
        &self,
        input: &DecisionInput<'a>,
        facts: &mut Facts,
    ) -> Result<Verified<'a>, Denial> {
        let id = authn::verified_identity(input.identity)?;
        let caller = token::caller(&self.tokens, input.authorization, id, unix_now())?;
        facts.caller(id, caller.as_deref());
        method::served(input.method, input.route)?;
        claims::consistent(&input.claims, facts, self.overwrite_identity_fields)?;
        let (principal, tenant) = effective(id, caller.as_deref());
        let who = rbac::Who {
            id,
            caller: caller.as_deref(),
            principal,
            tenant,
            conn_cache: input.grants,
        };
        let grants = rbac::authorized(
            &self.authz,
            &who,
            input.route,
            input.method,
            input.tool_name,
        )?;
        if let Route::Grid(
            GridMethod::ExecuteTool | GridMethod::ExecuteToolStream | GridMethod::DestroySession,
        ) = input.route
        {
            tenancy::session_owned(
                &self.sessions,
                input.session_id.unwrap_or(""),
                tenant,
                principal,
                &grants,
            )?;
        }
        if input.tool_name.is_none()
            && matches!(
                input.route,
                Route::Grid(GridMethod::ExecuteTool | GridMethod::ExecuteToolStream)
            )
        {
            return Err(Denial::new(
                ErrorCode::InvalidArguments,
                "the ToolCall names no function (function_call.name is empty)",
            )
            .detail("path", "function_call.name"));
        }
        if let Some(tool) = input.tool_name {
            let c = governance::checked(
                &self.governance.snapshot(),
                tenant,
                tool,
                &grants,
                input.args,
            )?;
            policy::evaluate(
                &self.policies.load(),
                &policy::Call {
                    id,
                    caller: caller.as_deref(),
                    principal,
                    tenant,
                    grants: &grants,
                    organization_id: &self.organization_id,
                    tool,
                    contract: Some(&c),
                    args: input.args,
                    session_id: input.session_id.unwrap_or(""),
                    method: input.method,
                    source: input.source,
                    correlation_id: input.correlation_id,
                    cost: self.cost.as_deref(),
                },
                facts,
            )?;
            facts.reservation = budget::reserve(
                self.cost.as_deref(),
                tenant,
                principal,
                tool,
                Some(&c),
                unix_now(),
            )?;
            facts.contract = Some(c);
        }
        Ok(Verified {
            identity: id,
            caller,
            grants,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::GridMethod;
    use crate::grpc::ErrorCode;

    fn alice() -> PeerIdentity {
        PeerIdentity::new(
            PrincipalId::new("alice").unwrap(),
            TenantId::new("acme").unwrap(),
            PeerKind::Client,
            None,
            "CN=a".into(),
        )
    }

    #[test]
    fn the_first_failing_check_decides_and_an_allow_carries_the_identity() {
        let alice = alice();
        let none = IdentityError::NoCertificate;
        let grid = Route::Grid(GridMethod::CreateSession);
        let other = Claims {
            principal_id: None,
            tenant_id: Some("globex".into()),
        };
        let rbac = crate::authz::rbac::Rbac::parse(
            "roles:\n  - {name: user, permissions: [grid.session.create]}\nbindings:\n  - {principal: alice, tenant: acme, roles: [user]}\n",
            std::path::Path::new("rbac.yaml"),
        )
        .unwrap();
        let strict = Pipeline {
            overwrite_identity_fields: false,
            tokens: TokenRules::default(),
            authz: Arc::new(Authz::new(rbac)),
            policies: Default::default(),
            organization_id: Arc::from(""),
            governance: Arc::new(crate::governance::Registry::empty()),
            sessions: Default::default(),
            cost: None,
        };
        let cache = GrantsCache::default();
        // (identity, route, claims) -> expected code; `None` = allowed.
        type Case<'a> = (
            Result<&'a PeerIdentity, &'a IdentityError>,
            Route,
            Claims,
            Option<ErrorCode>,
        );
        let cases: [Case; 6] = [
            (
                Err(&none),
                Route::Unknown,
                other.clone(),
                Some(ErrorCode::AuthenticationRequired),
            ),
            (
                Ok(&alice),
                Route::Unknown,
                other.clone(),
                Some(ErrorCode::MethodNotAllowed),
            ),
            (
                Ok(&alice),
                Route::Management,
                other.clone(),
                Some(ErrorCode::MethodNotAllowed),
            ),
            (
                Ok(&alice),
                grid,
                other.clone(),
                Some(ErrorCode::IdentityMismatch),
            ),
            (
                Ok(&alice),
                Route::Grid(GridMethod::DestroySession),
                Claims::default(),
                Some(ErrorCode::AuthorizationDenied),
            ),
            (Ok(&alice), grid, Claims::default(), None),
        ];
        for (identity, route, claims, want) in cases {
            let input = DecisionInput {
                method: GridMethod::CreateSession.path(),
                route,
                identity,
                authorization: None,
                grants: &cache,
                claims,
                tool_name: None,
                args: None,
                session_id: Some("s1"),
                correlation_id: "c",
                source: "",
            };
            match (strict.decide(&input), want) {
                (Ok(a), None) => {
                    assert_eq!(a.identity.principal_id.as_str(), "alice");
                    assert_eq!(a.facts.session_id.as_deref(), Some("s1"));
                    assert_eq!(a.facts.tenant_id.as_ref().map(|t| t.as_str()), Some("acme"));
                }
                (Err(d), Some(code)) => {
                    assert_eq!(d.denial.code, code);
                    assert_eq!(d.facts.correlation_id, "c");
                }
                (got, want) => panic!("{route:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
