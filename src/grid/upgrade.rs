//! Base GRID messages become their AESP enterprise variants, in place.
//!
//! Each function here reads what it needs from the received bytes and writes the upgrade
//! with [`super::wire`], so fields the sidecar does not know travel on byte for byte:
//! - `CreateSession.security_context` is replaced by an `EnterpriseSecurityContext` built
//!   from the verified identity (never from the message);
//! - `RuntimeMessage.announce` gains `tenant_id`, `security_zone` and
//!   `deployment_environment` (an `EnterpriseRuntimeAnnouncement`);
//! - every `Error` travelling back to a client or runtime gains its `correlation_id` and
//!   details (an `EnterpriseError`), by appending a merge patch.

use super::wire::{self, WireError};
use crate::listener::PeerIdentity;
use crate::proto::{aesp, grid};
use bytes::{Bytes, BytesMut};
use prost::Message;
use std::collections::HashMap;

/// What the request messages claim, for the decision pipeline.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    pub principal_id: Option<String>,
    pub tenant_id: Option<String>,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// A decoded request message of one of the unary GRID methods.
#[derive(Debug, Clone)]
pub enum Request {
    CreateSession(aesp::EnterpriseCreateSession),
    DestroySession(grid::DestroySession),
    ToolCall(grid::ToolCall),
}

impl Request {
    pub fn claims(&self) -> Claims {
        match self {
            Request::CreateSession(cs) => cs
                .security_context
                .as_ref()
                .map(|sc| Claims {
                    principal_id: non_empty(&sc.principal_id),
                    tenant_id: non_empty(&sc.tenant_id),
                })
                .unwrap_or_default(),
            _ => Claims::default(),
        }
    }

    pub fn tool_name(&self) -> Option<&str> {
        match self {
            Request::ToolCall(tc) => tc.function_call.as_ref().map(|f| f.name.as_str()),
            _ => None,
        }
    }

    /// The tool call's arguments, if any.
    pub fn args(&self) -> Option<&prost_types::Struct> {
        match self {
            Request::ToolCall(tc) => tc.function_call.as_ref().and_then(|f| f.args.as_ref()),
            _ => None,
        }
    }

    pub fn session_id(&self) -> Option<&str> {
        match self {
            Request::CreateSession(_) => None,
            Request::DestroySession(d) => Some(&d.session_id),
            Request::ToolCall(tc) => Some(&tc.session_id),
        }
    }

    /// The correlation id the message itself carries, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        match self {
            Request::ToolCall(tc) if !tc.correlation_id.is_empty() => Some(&tc.correlation_id),
            _ => None,
        }
    }
}

/// Why a unary request is not a valid message of its method.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{type_name} message: {source}")]
    Protobuf {
        type_name: &'static str,
        source: prost::DecodeError,
    },
    /// `Connect` is a stream: its messages go through the Connect hooks, one by one.
    #[error("GridRuntime/Connect is a stream, not a unary request")]
    Stream,
}

/// Decodes a unary request; `Err` means it is not a valid message of its type.
pub fn decode_request(method: super::GridMethod, payload: &Bytes) -> Result<Request, DecodeError> {
    use super::GridMethod as M;
    fn e(type_name: &'static str) -> impl FnOnce(prost::DecodeError) -> DecodeError {
        move |source| DecodeError::Protobuf { type_name, source }
    }
    Ok(match method {
        M::CreateSession => Request::CreateSession(
            aesp::EnterpriseCreateSession::decode(payload.clone())
                .map_err(e("altar.grid.v1.CreateSession"))?,
        ),
        M::DestroySession => Request::DestroySession(
            grid::DestroySession::decode(payload.clone())
                .map_err(e("altar.grid.v1.DestroySession"))?,
        ),
        M::ExecuteTool | M::ExecuteToolStream => Request::ToolCall(
            grid::ToolCall::decode(payload.clone()).map_err(e("altar.grid.v1.ToolCall"))?,
        ),
        M::Connect => return Err(DecodeError::Stream),
    })
}

/// The `EnterpriseSecurityContext` of a connection, encoded once when the connection is
/// accepted: the organization and the connection's policy context (source address, peer
/// kind, SPIFFE ID, workload principal, security zone), then the identity verified from the
/// certificate. A call with a bearer token appends its caller's part (principal, tenant,
/// claims, roles, clearance, organization: encoded once per token, see
/// [`caller_context`]), which overrides the certificate's identity field by field (protobuf
/// merge: a later scalar wins, map entries and repeated fields add up). Each call then
/// appends its own `policy_context` entries (`method`, `request_time_unix`).
#[derive(Debug, Clone)]
pub struct ContextTemplate {
    base: Vec<u8>,
}

impl ContextTemplate {
    pub fn new(
        id: &PeerIdentity,
        organization_id: &str,
        source: &str,
        security_zone: &str,
    ) -> ContextTemplate {
        let mut policy_context = HashMap::with_capacity(5);
        policy_context.insert("source".to_string(), source.to_string());
        policy_context.insert("peer_kind".to_string(), id.kind.to_string());
        policy_context.insert("security_zone".to_string(), security_zone.to_string());
        policy_context.insert(
            "workload_principal".to_string(),
            id.principal_id.to_string(),
        );
        if let Some(s) = &id.spiffe_id {
            policy_context.insert("spiffe_id".to_string(), s.clone());
        }
        let base = aesp::EnterpriseSecurityContext {
            principal_id: id.principal_id.to_string(),
            tenant_id: id.tenant_id.to_string(),
            claims: HashMap::new(),
            organization_id: organization_id.to_string(),
            roles: Vec::new(),
            security_clearance: String::new(),
            policy_context,
        }
        .encode_to_vec();
        ContextTemplate { base }
    }

    /// The encoded `EnterpriseSecurityContext` of one call of `method`, with the caller's
    /// part (from [`caller_context`]) when the call carries a token.
    /// `roles` are the effective roles as encoded `roles` records.
    pub fn for_call(&self, method: &str, caller: Option<&[u8]>, roles: &[u8]) -> Bytes {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let extra = caller.map_or(0, <[u8]>::len);
        let mut out =
            BytesMut::with_capacity(self.base.len() + extra + roles.len() + method.len() + 48);
        out.extend_from_slice(&self.base);
        if let Some(c) = caller {
            out.extend_from_slice(c);
        }
        out.extend_from_slice(roles);
        for (k, v) in [("method", method), ("request_time_unix", &now.to_string())] {
            let mut entry = BytesMut::with_capacity(k.len() + v.len() + 4);
            wire::put_len_field(&mut entry, 1, k.as_bytes());
            wire::put_len_field(&mut entry, 2, v.as_bytes());
            wire::put_len_field(&mut out, 7, &entry);
        }
        out.freeze()
    }
}

/// The caller's part of an `EnterpriseSecurityContext`, encoded once per verified token.
pub fn caller_context(c: &crate::identity::Caller) -> Vec<u8> {
    aesp::EnterpriseSecurityContext {
        principal_id: c.principal.to_string(),
        tenant_id: c.tenant.as_ref().map(|t| t.to_string()).unwrap_or_default(),
        claims: c
            .claims
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        organization_id: c.organization.clone().unwrap_or_default(),
        // The effective roles (RBAC, the token's included) are appended per call.
        roles: Vec::new(),
        security_clearance: c.clearance.clone().unwrap_or_default(),
        policy_context: HashMap::from([("token_issuer".to_string(), c.issuer.clone())]),
    }
    .encode_to_vec()
}

/// `CreateSession` with its `security_context` (field 3) replaced by `esc` (encoded).
pub fn upgrade_create_session(payload: &[u8], esc: &[u8]) -> Result<Bytes, WireError> {
    let mut app = BytesMut::with_capacity(esc.len() + 4);
    wire::put_len_field(&mut app, 3, esc);
    wire::rewrite(payload, &[3], &app)
}

/// `ToolCall` with `correlation_id` (field 4) set, if the message did not carry it.
pub fn set_tool_call_correlation(payload: &[u8], correlation_id: &str) -> Bytes {
    let mut app = BytesMut::new();
    wire::put_len_field(&mut app, 4, correlation_id.as_bytes());
    wire::merge(payload, &app)
}

/// The enterprise fields the sidecar fills into a runtime's announcement.
#[derive(Debug, Clone)]
pub struct RuntimeFacts {
    pub runtime_id_fallback: String,
    pub tenant_id: String,
    pub security_zone: String,
    pub deployment_environment: String,
}

/// `RuntimeMessage{announce}` (raw envelope) with the announcement upgraded to an
/// `EnterpriseRuntimeAnnouncement`. `announce_raw` is the content of envelope field 1.
pub fn upgrade_announce(
    envelope: &[u8],
    announce_raw: &[u8],
    announced_runtime_id: &str,
    f: &RuntimeFacts,
) -> Result<Bytes, WireError> {
    let add = aesp::EnterpriseRuntimeAnnouncement {
        runtime_id: if announced_runtime_id.is_empty() {
            f.runtime_id_fallback.clone()
        } else {
            String::new()
        },
        tenant_id: f.tenant_id.clone(),
        security_zone: f.security_zone.clone(),
        deployment_environment: f.deployment_environment.clone(),
        ..Default::default()
    }
    .encode_to_vec();
    let announce = wire::rewrite(announce_raw, &[5, 6, 7], &add)?;
    let mut app = BytesMut::new();
    wire::put_len_field(&mut app, 1, &announce);
    wire::rewrite(envelope, &[1], &app)
}

/// The merge patch that turns an `Error` into an `EnterpriseError` for one call. Built only
/// when a message actually carries an error.
#[derive(Debug, Clone)]
pub struct ErrorPatch {
    correlation_id: String,
    /// Details added besides `origin` (the tool's contract: compliance tags, revision).
    extra: Vec<(String, String)>,
    origin: &'static str,
}

impl ErrorPatch {
    pub fn new(correlation_id: &str) -> ErrorPatch {
        ErrorPatch {
            correlation_id: correlation_id.to_string(),
            extra: Vec::new(),
            origin: "grid-host",
        }
    }

    /// The same for an error a runtime sends toward the host (`details.origin = runtime`).
    pub fn from_runtime(correlation_id: &str) -> ErrorPatch {
        ErrorPatch {
            origin: "runtime",
            ..ErrorPatch::new(correlation_id)
        }
    }

    /// The tool's approved contract, named in the details of the errors of its calls
    /// (`compliance_tags`, `tool_revision`, `risk_assessment`).
    pub fn with_contract(mut self, c: Option<&aesp::EnterpriseToolContract>) -> ErrorPatch {
        if let Some(c) = c {
            if !c.compliance_tags.is_empty() {
                self.extra
                    .push(("compliance_tags".into(), c.compliance_tags.join(",")));
            }
            self.extra
                .push(("tool_revision".into(), c.revision.to_string()));
            self.extra
                .push(("risk_assessment".into(), c.risk_assessment.clone()));
        }
        self
    }

    fn body(&self) -> Vec<u8> {
        let mut details = HashMap::with_capacity(1 + self.extra.len());
        details.insert("origin".to_string(), self.origin.to_string());
        for (k, v) in &self.extra {
            details.insert(k.clone(), v.clone());
        }
        aesp::EnterpriseError {
            correlation_id: self.correlation_id.clone(),
            details,
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// If `msg` carries an error in top-level field `error_field`, the upgraded message.
    pub fn apply(&self, msg: &[u8], error_field: u32) -> Result<Option<Bytes>, WireError> {
        if !wire::has_len_field(msg, error_field)? {
            return Ok(None);
        }
        let body = self.body();
        let mut patch = BytesMut::with_capacity(body.len() + 4);
        wire::put_len_field(&mut patch, error_field, &body);
        Ok(Some(wire::merge(msg, &patch)))
    }

    /// Same, for the error at field `inner` of the oneof member `outer` of a Connect
    /// envelope (`members` are the oneof's field numbers): patched only when `outer` is the
    /// member a decoder would see and that member carries an error.
    pub fn apply_nested(
        &self,
        envelope: &[u8],
        members: &[u32],
        outer: u32,
        inner: u32,
    ) -> Result<Option<Bytes>, WireError> {
        match wire::oneof_member(envelope, members)? {
            Some(m) if m.number == outer && m.has_len_field(inner)? => {}
            _ => return Ok(None),
        }
        let body = self.body();
        let mut inner_patch = BytesMut::with_capacity(body.len() + 4);
        wire::put_len_field(&mut inner_patch, inner, &body);
        let mut patch = BytesMut::with_capacity(inner_patch.len() + 4);
        wire::put_len_field(&mut patch, outer, &inner_patch);
        Ok(Some(wire::merge(envelope, &patch)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> PeerIdentity {
        use crate::ids::{PeerKind, PrincipalId, TenantId};
        PeerIdentity::new(
            PrincipalId::new("alice").unwrap(),
            TenantId::new("acme").unwrap(),
            PeerKind::Client,
            Some("spiffe://aesp.local/tenant/acme/client/alice".into()),
            "CN=alice".into(),
        )
    }

    #[test]
    fn create_session_gets_the_verified_context() {
        let raw = grid::CreateSession {
            suggested_session_id: "s".into(),
            ttl_seconds: 5,
            security_context: None,
        }
        .encode_to_vec();
        let esc = ContextTemplate::new(&alice(), "org-1", "127.0.0.1:1", "zone-a").for_call(
            "/m",
            None,
            &[],
        );
        let out = upgrade_create_session(&raw, &esc).unwrap();
        let cs = aesp::EnterpriseCreateSession::decode(out.clone()).unwrap();
        let sc = cs.security_context.unwrap();
        assert_eq!(
            (
                sc.principal_id.as_str(),
                sc.tenant_id.as_str(),
                sc.organization_id.as_str()
            ),
            ("alice", "acme", "org-1")
        );
        assert_eq!(sc.policy_context["security_zone"], "zone-a");
        assert_eq!(sc.policy_context["method"], "/m");
        assert_eq!(
            sc.policy_context["spiffe_id"],
            "spiffe://aesp.local/tenant/acme/client/alice"
        );
        assert!(
            sc.policy_context["request_time_unix"]
                .parse::<u64>()
                .unwrap()
                > 1_700_000_000
        );
        assert_eq!(cs.suggested_session_id, "s");
        // Still a valid base CreateSession.
        let base = grid::CreateSession::decode(out).unwrap();
        assert_eq!(base.security_context.unwrap().tenant_id, "acme");
    }

    #[test]
    fn announce_is_upgraded_and_claims_are_replaced() {
        let ann = aesp::EnterpriseRuntimeAnnouncement {
            runtime_id: "".into(),
            language: "python".into(),
            security_zone: "claimed".into(),
            ..Default::default()
        };
        let env = aesp::EnterpriseRuntimeMessage {
            kind: Some(aesp::enterprise_runtime_message::Kind::Announce(
                ann.clone(),
            )),
        }
        .encode_to_vec();
        let facts = RuntimeFacts {
            runtime_id_fallback: "rt-1".into(),
            tenant_id: "acme".into(),
            security_zone: "pci".into(),
            deployment_environment: "PROD".into(),
        };
        let first = wire::first_field(&env).unwrap().unwrap();
        let out = upgrade_announce(&env, first.value, &ann.runtime_id, &facts).unwrap();
        let m = aesp::EnterpriseRuntimeMessage::decode(out).unwrap();
        let Some(aesp::enterprise_runtime_message::Kind::Announce(a)) = m.kind else {
            panic!("not an announce")
        };
        assert_eq!(a.runtime_id, "rt-1");
        assert_eq!(a.language, "python");
        assert_eq!(
            (
                a.tenant_id.as_str(),
                a.security_zone.as_str(),
                a.deployment_environment.as_str()
            ),
            ("acme", "pci", "PROD")
        );
    }

    #[test]
    fn error_patch_only_touches_messages_with_an_error() {
        let p = ErrorPatch::new("cid-9");
        let ok = grid::CreateSessionAck {
            session_id: "s".into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(p.apply(&ok, 3).unwrap().is_none());
        let bad = grid::CreateSessionAck {
            error: Some(grid::Error {
                code: "X".into(),
                message: "m".into(),
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let up =
            aesp::EnterpriseCreateSessionAck::decode(p.apply(&bad, 3).unwrap().unwrap()).unwrap();
        let e = up.error.unwrap();
        assert_eq!((e.code.as_str(), e.correlation_id.as_str()), ("X", "cid-9"));
        assert_eq!(e.details["origin"], "grid-host");

        let hm = grid::HostMessage {
            kind: Some(grid::host_message::Kind::FulfillAck(grid::FulfillAck {
                session_id: "s".into(),
                accepted: vec![],
                error: Some(grid::Error {
                    code: "UNKNOWN_TOOL".into(),
                    message: "m".into(),
                }),
            })),
        }
        .encode_to_vec();
        assert!(p.apply_nested(&hm, &[1, 2, 3, 4], 1, 3).unwrap().is_none());
        let up = aesp::EnterpriseHostMessage::decode(
            p.apply_nested(&hm, &[1, 2, 3, 4], 3, 3).unwrap().unwrap(),
        )
        .unwrap();
        let Some(aesp::enterprise_host_message::Kind::FulfillAck(a)) = up.kind else {
            panic!("kind")
        };
        assert_eq!(a.error.unwrap().correlation_id, "cid-9");
        assert_eq!(a.session_id, "s");
    }
}
