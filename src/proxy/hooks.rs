//! What is done to each message of a stream, per direction. Each hook records the refusals
//! of its direction through the one [`Recorder`]:
//! - [`ErrorHook`], host → client: `Error` becomes `EnterpriseError` in the response's
//!   error field;
//! - [`HostHook`], host → runtime on `Connect`: errors in `announce_ack` and `fulfill_ack`
//!   are upgraded;
//! - [`RuntimeHook`], runtime → host on `Connect`: every message must decode; `announce`
//!   comes first and only once, is decided and upgraded.

use super::body::{MessageHook, Verdict};
use super::{ConnInfo, Proxy};
use crate::decision::{DecisionInput, Denied, Facts, Recorder, Stage};
use crate::grid::upgrade::{Claims, ErrorPatch, RuntimeFacts};
use crate::grid::{GridMethod, Route, upgrade, wire};
use crate::grpc::{Denial, ErrorCode};
use crate::proto::aesp;
use bytes::Bytes;
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;

/// Host → client: `Error` → `EnterpriseError` in the response message's error field.
pub(super) struct ErrorHook {
    pub recorder: Recorder,
    /// The allowed call's facts, at [`Stage::Response`].
    pub facts: Facts,
    pub patch: ErrorPatch,
    pub field: u32,
    /// What the response said, recorded when it ends.
    pub outcome: Outcome,
}

/// What the host answered to an allowed call, recorded once, when the response ends (or
/// is abandoned): `SESSION_CREATED`, `SESSION_DESTROYED` or `TOOL_RESULT` (status, error
/// code, duration, bytes each way), linked to the decision by its correlation id.
pub(super) struct Outcome {
    pub recorder: Recorder,
    pub method: GridMethod,
    pub facts: Facts,
    pub started: std::time::Instant,
    pub request_bytes: usize,
    pub response_bytes: usize,
    pub messages: u64,
    pub error_code: Option<String>,
    pub invocation_id: String,
    pub session_id: Option<String>,
    /// The sidecar refused the response (the code).
    pub refused: Option<&'static str>,
    /// The session table, for `CreateSession` and `DestroySession`: the sessions the host
    /// created and destroyed, as their acks pass.
    pub sessions: Option<Arc<crate::tenancy::Sessions>>,
}

impl Outcome {
    pub fn new(
        recorder: Recorder,
        method: GridMethod,
        facts: &Facts,
        request_bytes: usize,
    ) -> Outcome {
        Outcome {
            recorder,
            method,
            facts: facts.clone(),
            started: std::time::Instant::now(),
            request_bytes,
            response_bytes: 0,
            messages: 0,
            error_code: None,
            invocation_id: String::new(),
            session_id: None,
            refused: None,
            sessions: None,
        }
    }

    /// A session created or destroyed by the host, as its ack passes (before the client
    /// sees it, so its next call finds the session known).
    fn track_session(&self, payload: &[u8]) {
        let (Some(sessions), Some(tenant), Some(principal)) = (
            &self.sessions,
            &self.facts.tenant_id,
            &self.facts.principal_id,
        ) else {
            return;
        };
        match self.method {
            GridMethod::CreateSession => {
                if let Ok(ack) = crate::proto::grid::CreateSessionAck::decode(payload)
                    && ack.error.is_none()
                    && !ack.session_id.is_empty()
                {
                    sessions.created(
                        &ack.session_id,
                        tenant.clone(),
                        principal.clone(),
                        ack.expires_at_unix_seconds,
                    );
                }
            }
            GridMethod::DestroySession => {
                if let Ok(ack) = crate::proto::grid::DestroySessionAck::decode(payload)
                    && ack.destroyed
                    && let Some(id) = &self.facts.session_id
                {
                    sessions.destroyed(id);
                }
            }
            _ => {}
        }
    }

    /// Notes one response message (fields read at the wire level, nothing decoded whole).
    fn observe(&mut self, payload: &[u8]) {
        if self.sessions.is_some() {
            self.track_session(payload);
        }
        self.messages += 1;
        self.response_bytes += payload.len();
        let error_field = self.method.response_error_field();
        for f in wire::fields(payload).flatten() {
            match (self.method, f.number, f.wire_type) {
                (_, n, 2) if n == error_field => {
                    let code = wire::fields(f.value)
                        .flatten()
                        .find(|g| g.number == 1 && g.wire_type == 2)
                        .map(|g| String::from_utf8_lossy(g.value).into_owned())
                        .unwrap_or_default();
                    self.error_code = Some(if code.is_empty() {
                        "UNKNOWN".into()
                    } else {
                        code
                    });
                }
                (GridMethod::CreateSession, 1, 2) => {
                    self.session_id = Some(String::from_utf8_lossy(f.value).into_owned());
                }
                (GridMethod::ExecuteTool | GridMethod::ExecuteToolStream, 1, 2)
                    if self.invocation_id.is_empty() =>
                {
                    self.invocation_id = String::from_utf8_lossy(f.value).into_owned();
                }
                _ => {}
            }
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        // The call's reserved cost (docs/cost.md): charged when the host answered with a
        // result (an in-band tool error included) that the sidecar did not refuse; released
        // when no response message came (the host failed or reset the stream, the client
        // went away first) or the response was refused.
        if let Some(r) = self.facts.reservation.take() {
            r.settle(crate::cost::Settlement {
                charged: self.messages > 0 && self.refused.is_none(),
                request_bytes: self.request_bytes as u64,
                response_bytes: self.response_bytes as u64,
                duration: self.started.elapsed(),
            });
        }
        if self.recorder.audit().is_none() {
            return;
        }
        let (kind, ok_decision) = match self.method {
            GridMethod::CreateSession => ("SESSION_CREATED", "INFO"),
            GridMethod::DestroySession => ("SESSION_DESTROYED", "INFO"),
            GridMethod::ExecuteTool | GridMethod::ExecuteToolStream => ("TOOL_RESULT", "INFO"),
            GridMethod::Connect => return,
        };
        let failed = self.error_code.is_some() || self.refused.is_some() || self.messages == 0;
        let mut e = crate::audit::event(kind, if failed { "ERROR" } else { ok_decision });
        let f = &self.facts;
        e.principal_id = f
            .principal_id
            .as_ref()
            .map_or_else(String::new, |p| p.to_string());
        e.tenant_id = f
            .tenant_id
            .as_ref()
            .map_or_else(String::new, |t| t.to_string());
        e.method.clone_from(&f.method);
        e.tool_name = f.tool_name.clone().unwrap_or_default();
        e.session_id = self
            .session_id
            .clone()
            .or_else(|| f.session_id.clone())
            .unwrap_or_default();
        e.correlation_id.clone_from(&f.correlation_id);
        e.invocation_id = std::mem::take(&mut self.invocation_id);
        if let Some(code) = self.refused {
            e.reason_code = code.to_string();
        } else if let Some(code) = &self.error_code {
            e.reason_code.clone_from(code);
        } else if self.messages == 0 {
            e.reason_code = "NO_RESPONSE".into();
        }
        let a = &mut e.attributes;
        a.insert(
            "status".into(),
            if failed { "ERROR" } else { "SUCCESS" }.into(),
        );
        a.insert(
            "duration_us".into(),
            self.started.elapsed().as_micros().to_string(),
        );
        a.insert("request_bytes".into(), self.request_bytes.to_string());
        a.insert("response_bytes".into(), self.response_bytes.to_string());
        a.insert("messages".into(), self.messages.to_string());
        if let Some(c) = &self.facts.contract {
            a.insert("tool_revision".into(), c.revision.to_string());
            if !c.compliance_tags.is_empty() {
                a.insert("compliance_tags".into(), c.compliance_tags.join(","));
            }
        }
        self.recorder.event(e);
    }
}

impl MessageHook for ErrorHook {
    fn on_message(&mut self, payload: &Bytes) -> Result<Verdict, Denial> {
        self.outcome.observe(payload);
        match self.patch.apply(payload, self.field) {
            Ok(Some(up)) => Ok(Verdict::Replace(up)),
            Ok(None) => Ok(Verdict::Forward),
            Err(e) => Err(Denial::new(
                ErrorCode::MalformedMessage,
                format!("the GRID host sent a malformed message: {e}"),
            )),
        }
    }

    fn refused(&mut self, denial: &Denial) {
        self.outcome.refused = Some(denial.code.as_str());
        self.recorder
            .record(crate::decision::Decision::Deny(&self.facts, denial));
    }
}

/// The oneof members of both Connect envelopes (`RuntimeMessage.kind`, `HostMessage.kind`).
const ENVELOPE_KINDS: [u32; 4] = [1, 2, 3, 4];

/// What both directions of one runtime's `Connect` share: the fulfilments the sidecar
/// narrowed (session id → the contracts it refused), answered in the host's `FulfillAck`.
#[derive(Default)]
pub(super) struct Conversation {
    refused_fulfil: std::sync::Mutex<HashMap<String, Denial>>,
    /// The host's `announce_ack` has gone to the runtime: the sidecar's own answers to the
    /// runtime may follow it (never precede it).
    announce_acked: std::sync::atomic::AtomicBool,
}

/// At most this many refused fulfilments wait for their `FulfillAck` (a host that never
/// acknowledges cannot grow the map).
const MAX_WAITING_ACKS: usize = 1024;

impl Conversation {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Denial>> {
        self.refused_fulfil
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// Host → runtime on `Connect`: errors in `announce_ack` and `fulfill_ack` are upgraded; the
/// `announce_ack` lists only the contracts approved for the runtime's tenant; a
/// `fulfill_ack` for a fulfilment the sidecar narrowed says which contracts were refused.
pub(super) struct HostHook {
    pub recorder: Recorder,
    /// The allowed `Connect`'s facts, at [`Stage::Response`].
    pub facts: Facts,
    pub patch: ErrorPatch,
    pub governance: Arc<crate::governance::Registry>,
    /// The runtime's tenant.
    pub tenant: crate::ids::TenantId,
    pub conversation: Arc<Conversation>,
    pub sessions: Arc<crate::tenancy::Sessions>,
    /// Answers to the host, sent on the runtime → host body.
    pub to_host: super::body::Injector,
}

impl HostHook {
    /// The `announce_ack` with `available_contracts` narrowed to the approved ones, or
    /// `None` when nothing had to go.
    fn narrowed_announce_ack(&self, payload: &[u8]) -> Result<Option<Bytes>, String> {
        use crate::proto::grid::host_message::Kind;
        let mut m = crate::proto::grid::HostMessage::decode(payload).map_err(|e| e.to_string())?;
        let Some(Kind::AnnounceAck(ack)) = &mut m.kind else {
            return Ok(None);
        };
        let snapshot = self.governance.snapshot();
        let approved = snapshot.approved_names(self.tenant.as_str());
        let before = ack.available_contracts.len();
        ack.available_contracts
            .retain(|n| approved.binary_search(&n.as_str()).is_ok());
        if ack.available_contracts.len() == before {
            return Ok(None);
        }
        Ok(Some(Bytes::from(m.encode_to_vec())))
    }

    /// A refusal added to the `fulfill_ack` of a fulfilment the sidecar narrowed (when the
    /// host's ack carries no error of its own).
    fn refused_fulfil_ack(&self, payload: &[u8]) -> Result<Option<Bytes>, String> {
        use crate::proto::grid::host_message::Kind;
        let m = crate::proto::grid::HostMessage::decode(payload).map_err(|e| e.to_string())?;
        let Some(Kind::FulfillAck(ack)) = &m.kind else {
            return Ok(None);
        };
        let Some(refusal) = self.conversation.lock().remove(&ack.session_id) else {
            return Ok(None);
        };
        if ack.error.is_some() {
            return Ok(None);
        }
        let ee = refusal.to_enterprise_error(&self.patch_cid());
        let mut inner = bytes::BytesMut::new();
        wire::put_len_field(&mut inner, 3, &ee.encode_to_vec());
        let mut outer = bytes::BytesMut::new();
        wire::put_len_field(&mut outer, 3, &inner);
        Ok(Some(wire::merge(payload, &outer)))
    }

    fn patch_cid(&self) -> String {
        self.facts.correlation_id.clone()
    }

    /// A `call` (4) or `request_fulfillment` (2) for a session that is not the runtime's
    /// tenant's: not forwarded; the sidecar answers the host itself (a `ToolResult` carrying
    /// the error, or a `FulfillTools` fulfilling nothing) and records the refusal. `None`:
    /// forward it.
    fn foreign_session(
        &mut self,
        member: &wire::OneofMember<'_>,
    ) -> Result<Option<Verdict>, Denial> {
        // Read in place (no copy on the common path: a call of the runtime's own tenant).
        let (mut session, mut invocation, mut correlation): (&[u8], &[u8], &[u8]) = (b"", b"", b"");
        for r in &member.records {
            for f in wire::fields(r).flatten() {
                match (member.number, f.number, f.wire_type) {
                    (2, 1, 2) | (4, 2, 2) => session = f.value,
                    (4, 1, 2) => invocation = f.value,
                    (4, 4, 2) => correlation = f.value,
                    _ => {}
                }
            }
        }
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let owner = std::str::from_utf8(session)
            .ok()
            .and_then(|id| self.sessions.tenant_is(id, &self.tenant));
        let (session, invocation, correlation) = match owner {
            Some(true) => return Ok(None),
            _ => (text(session), text(invocation), text(correlation)),
        };
        let reason = match owner {
            Some(true) => return Ok(None),
            Some(false) => "another tenant's session",
            // A fulfilment asked while the session is being created (its ack has not
            // passed yet) goes on; a call needs a session the sidecar knows.
            None if member.number == 2 => return Ok(None),
            None => "unknown session",
        };
        let mut denial = Denial::new(
            ErrorCode::TenantIsolationViolation,
            format!(
                "the GRID host sent tenant {}'s runtime a {} for session {session:?} ({reason}): not delivered",
                self.tenant,
                if member.number == 4 { "call" } else { "fulfilment request" }
            ),
        )
        .detail("session_id", session.clone())
        .detail("runtime_tenant", self.tenant.as_str())
        .detail("reason", reason);
        denial.remediation_steps =
            "The host must route a session's calls to runtimes of the session's tenant.".into();
        let answer = if member.number == 4 {
            let cid = if correlation.is_empty() {
                self.patch_cid()
            } else {
                correlation.clone()
            };
            aesp::EnterpriseRuntimeMessage {
                kind: Some(aesp::enterprise_runtime_message::Kind::Result(
                    aesp::EnterpriseToolResult {
                        invocation_id: invocation,
                        status: crate::proto::grid::ResultStatus::Error as i32,
                        error_details: Some(denial.to_enterprise_error(&cid)),
                        correlation_id: correlation,
                        ..Default::default()
                    },
                )),
            }
            .encode_to_vec()
        } else {
            crate::proto::grid::RuntimeMessage {
                kind: Some(crate::proto::grid::runtime_message::Kind::Fulfill(
                    crate::proto::grid::FulfillTools {
                        session_id: session.clone(),
                        tool_contract_names: Vec::new(),
                    },
                )),
            }
            .encode_to_vec()
        };
        let mut facts = self.facts.clone();
        facts.stage = Stage::Message;
        facts.session_id = Some(session);
        self.recorder
            .record(crate::decision::Decision::Deny(&facts, &denial));
        match self.to_host.try_send(Bytes::from(answer)) {
            Ok(()) => Ok(Some(Verdict::Drop)),
            Err(_) => Err(Denial::new(
                ErrorCode::TenantIsolationViolation,
                "the GRID host keeps sending this runtime other tenants' work faster than it can be answered",
            )),
        }
    }
}

/// `TOOL_NOT_APPROVED` for contracts a runtime of `tenant` offered without approval.
fn refused_contracts(tenant: &crate::ids::TenantId, names: &[String]) -> Denial {
    let mut d = Denial::new(
        ErrorCode::ToolNotApproved,
        format!(
            "no approved contract for tenant {tenant}: {} (not fulfilled; the other contracts were)",
            names.join(", ")
        ),
    )
    .detail("refused_contracts", names.join(","))
    .detail("tenant", tenant.as_str());
    d.remediation_steps = "Fulfil only contracts approved for the runtime's tenant (the AnnounceAck lists them), or have the missing contracts submitted and approved (docs/governance.md).".into();
    d
}

impl MessageHook for HostHook {
    fn on_message(&mut self, payload: &Bytes) -> Result<Verdict, Denial> {
        let bad = |e: &dyn std::fmt::Display| {
            Denial::new(
                ErrorCode::MalformedMessage,
                format!("the GRID host sent a malformed HostMessage: {e}"),
            )
        };
        let kind = wire::oneof_member(payload, &ENVELOPE_KINDS).map_err(|e| bad(&e))?;
        if let Some(m) = &kind
            && (m.number == 2 || m.number == 4)
            && let Some(v) = self.foreign_session(m)?
        {
            return Ok(v);
        }
        let member = kind.map(|m| m.number);
        // The governance rewrite first (rare: once per runtime, once per narrowed
        // fulfilment), then the error upgrade on what will be sent.
        if member == Some(1) {
            self.conversation
                .announce_acked
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let rewritten = match member {
            Some(1) => self.narrowed_announce_ack(payload).map_err(|e| bad(&e))?,
            Some(3) => self.refused_fulfil_ack(payload).map_err(|e| bad(&e))?,
            _ => None,
        };
        if let (Some(3), Some(b)) = (member, &rewritten) {
            // The error in it is the sidecar's, not the host's: no `origin = grid-host`.
            return Ok(Verdict::Replace(b.clone()));
        }
        let current = rewritten.as_ref().unwrap_or(payload);
        let up = match member {
            // announce_ack (1) and fulfill_ack (3) carry `error` as their field 3.
            Some(outer @ (1 | 3)) => self
                .patch
                .apply_nested(current, &ENVELOPE_KINDS, outer, 3)
                .map_err(|e| bad(&e))?,
            _ => None,
        };
        Ok(match (up, rewritten) {
            (Some(b), _) | (None, Some(b)) => Verdict::Replace(b),
            (None, None) => Verdict::Forward,
        })
    }

    fn refused(&mut self, denial: &Denial) {
        self.recorder
            .record(crate::decision::Decision::Deny(&self.facts, denial));
    }
}

/// Runtime → host on `Connect`: `announce` first and once, upgraded and decided; every
/// message must decode.
pub(super) struct RuntimeHook {
    pub proxy: Arc<Proxy>,
    pub conn: Arc<ConnInfo>,
    pub correlation_id: String,
    /// The `authorization` header of the `Connect` request, if any.
    pub authorization: Option<http::HeaderValue>,
    pub announced: bool,
    /// The pipeline's facts of a refused announcement, for the record.
    pub refused_announce: Option<Facts>,
    /// The announced runtime id.
    pub runtime_id: String,
    pub conversation: Arc<Conversation>,
    /// Answers to the runtime, sent on the host → runtime body.
    pub to_runtime: super::body::Injector,
}

impl Drop for RuntimeHook {
    /// The runtime's `Connect` ended (closed, refused or cut): `RUNTIME_DISCONNECTED`.
    fn drop(&mut self) {
        if self.announced {
            let e = self.runtime_event("RUNTIME_DISCONNECTED");
            self.proxy.recorder.event(e);
        }
    }
}

impl RuntimeHook {
    /// A record about this runtime's stream (not a decision).
    fn runtime_event(&self, kind: &str) -> crate::proto::aesp::AuditEvent {
        let mut e = crate::audit::event(kind, "INFO");
        if let Ok(id) = self.conn.identity() {
            e.principal_id = id.principal_id.to_string();
            e.tenant_id = id.tenant_id.to_string();
        }
        e.method = GridMethod::Connect.path().to_string();
        e.correlation_id.clone_from(&self.correlation_id);
        e.attributes
            .insert("runtime_id".into(), self.runtime_id.clone());
        e
    }

    fn bad(what: impl std::fmt::Display) -> Denial {
        Denial::malformed(format!("not a valid altar.grid.v1.RuntimeMessage: {what}"))
    }

    /// Decides and upgrades the announcement `raw` (envelope field 1) of `payload`.
    fn announce(&mut self, payload: &Bytes, raw: &[u8]) -> Result<Verdict, Denial> {
        let a = aesp::EnterpriseRuntimeAnnouncement::decode(raw).map_err(Self::bad)?;
        if self.announced {
            return Err(Denial::malformed(
                "a runtime announces once per Connect stream",
            ));
        }
        let p = &self.proxy;
        let decided = p.pipeline.decide(&DecisionInput {
            method: GridMethod::Connect.path(),
            route: Route::Grid(GridMethod::Connect),
            identity: self.conn.identity(),
            authorization: self.authorization.as_ref().map(|v| v.as_bytes()),
            grants: &self.conn.grants,
            claims: Claims {
                principal_id: None,
                tenant_id: (!a.tenant_id.is_empty()).then(|| a.tenant_id.clone()),
            },
            tool_name: None,
            args: None,
            session_id: None,
            correlation_id: &self.correlation_id,
            source: &self.conn.source,
        });
        let mut allowed = match decided {
            Ok(a) => a,
            Err(Denied { denial, mut facts }) => {
                facts.stage = Stage::Announce;
                self.refused_announce = Some(facts);
                return Err(denial);
            }
        };
        allowed.facts.stage = Stage::Announce;
        let id = allowed.identity;
        let facts = RuntimeFacts {
            runtime_id_fallback: id.principal_id.to_string(),
            tenant_id: id.tenant_id.to_string(),
            security_zone: p.cfg.runtime.security_zone.clone(),
            deployment_environment: p.cfg.runtime.deployment_environment.clone(),
        };
        let up = upgrade::upgrade_announce(payload, raw, &a.runtime_id, &facts)
            .map_err(Denial::malformed)?;
        p.recorder.record(&allowed);
        self.announced = true;
        self.runtime_id = if a.runtime_id.is_empty() {
            id.principal_id.to_string()
        } else {
            a.runtime_id.clone()
        };
        tracing::info!(
            runtime_id = if a.runtime_id.is_empty() { id.principal_id.as_str() } else { a.runtime_id.as_str() },
            tenant = %id.tenant_id,
            zone = %p.cfg.runtime.security_zone,
            environment = %p.cfg.runtime.deployment_environment,
            correlation_id = %self.correlation_id,
            "runtime announced"
        );
        Ok(Verdict::Replace(up))
    }
}

impl RuntimeHook {
    /// A `fulfill` (`raw`, already checked to decode): the contracts not approved for the
    /// runtime's tenant are taken out before the host sees it (recorded as a refusal) and
    /// answered in the host's `FulfillAck`; the rest goes on.
    fn fulfil(&mut self, raw: &[u8]) -> Result<Verdict, Denial> {
        let mut f = crate::proto::grid::FulfillTools::decode(raw).map_err(Self::bad)?;
        let p = &self.proxy;
        let tenant = self
            .conn
            .identity()
            .map(|id| id.tenant_id.clone())
            .map_err(|_| Denial::malformed("no identity"))?;
        // A session of another tenant is not this runtime's to serve: nothing of it is
        // fulfilled.
        // (A session not known yet may be one being created: its ack has not passed. Its
        // calls are checked on their way to the runtime.)
        let foreign = match p.pipeline.sessions.owner(&f.session_id) {
            Some(o) if o.tenant != tenant => Some("another tenant's session"),
            _ => None,
        };
        let snapshot = p.pipeline.governance.snapshot();
        let (ok, refused): (Vec<String>, Vec<String>) = std::mem::take(&mut f.tool_contract_names)
            .into_iter()
            .partition(|n| foreign.is_none() && snapshot.in_force(tenant.as_str(), n).is_ok());
        f.tool_contract_names = ok;
        if p.recorder.audit().is_some() {
            let mut e = self.runtime_event("FULFILLMENT");
            e.session_id.clone_from(&f.session_id);
            e.attributes
                .insert("tools".into(), f.tool_contract_names.join(","));
            if !refused.is_empty() {
                e.attributes.insert("refused".into(), refused.join(","));
            }
            p.recorder.event(e);
        }
        if refused.is_empty() {
            return Ok(Verdict::Forward);
        }
        let denial = match foreign {
            None => refused_contracts(&tenant, &refused),
            Some(reason) => {
                let mut d = Denial::new(
                    ErrorCode::TenantIsolationViolation,
                    format!(
                        "session {:?} is not a session of tenant {tenant}: a runtime serves its own tenant only",
                        f.session_id
                    ),
                )
                .detail("session_id", f.session_id.clone())
                .detail("tenant", tenant.as_str())
                .detail("reason", reason)
                .detail("refused_contracts", refused.join(","));
                d.remediation_steps =
                    "Fulfil only the sessions of the runtime's own tenant.".into();
                d
            }
        };
        let mut facts = Facts::new(
            Stage::Message,
            GridMethod::Connect.path(),
            Route::Grid(GridMethod::Connect),
            self.conn.identity().ok(),
            &self.correlation_id,
        );
        facts.session_id = Some(f.session_id.clone());
        facts.tool_name = Some(refused.join(","));
        p.recorder
            .record(crate::decision::Decision::Deny(&facts, &denial));
        if f.tool_contract_names.is_empty()
            && self
                .conversation
                .announce_acked
                .load(std::sync::atomic::Ordering::Acquire)
        {
            // Nothing of it may go on: not forwarded; the sidecar answers the runtime with a
            // FulfillAck carrying the refusal.
            let ack = aesp::EnterpriseHostMessage {
                kind: Some(aesp::enterprise_host_message::Kind::FulfillAck(
                    aesp::EnterpriseFulfillAck {
                        session_id: f.session_id.clone(),
                        accepted: Vec::new(),
                        error: Some(denial.to_enterprise_error(&self.correlation_id)),
                    },
                )),
            };
            return match self.to_runtime.try_send(Bytes::from(ack.encode_to_vec())) {
                Ok(()) => Ok(Verdict::Drop),
                Err(_) => Err(denial),
            };
        }
        {
            let mut waiting = self.conversation.lock();
            if waiting.len() >= MAX_WAITING_ACKS {
                waiting.clear();
            }
            waiting.insert(f.session_id.clone(), denial.clone());
        }
        let env = crate::proto::grid::RuntimeMessage {
            kind: Some(crate::proto::grid::runtime_message::Kind::Fulfill(f)),
        };
        Ok(Verdict::Replace(Bytes::from(env.encode_to_vec())))
    }
}

impl MessageHook for RuntimeHook {
    fn on_message(&mut self, payload: &Bytes) -> Result<Verdict, Denial> {
        // Only the oneof's fields are allowed in the envelope, and the whole message must
        // decode: the host never receives what it could not parse.
        for f in wire::fields(payload) {
            let f = f.map_err(Self::bad)?;
            if f.wire_type != 2 || !ENVELOPE_KINDS.contains(&f.number) {
                return Err(Self::bad(format!(
                    "unexpected field {} (wire type {})",
                    f.number, f.wire_type
                )));
            }
        }
        aesp::EnterpriseRuntimeMessage::decode(payload.clone()).map_err(Self::bad)?;
        // The kind is the oneof member a decoder sees: the last one, its consecutive records merged.
        let kind = wire::oneof_member(payload, &ENVELOPE_KINDS)
            .map_err(Self::bad)?
            .ok_or_else(|| Self::bad("no kind set"))?;
        if kind.number == 1 {
            return self.announce(payload, &kind.merged());
        }
        if !self.announced {
            return Err(Denial::malformed(
                "the first message on GridRuntime/Connect must be announce",
            ));
        }
        if kind.number == 2 {
            return self.fulfil(&kind.merged());
        }
        // A result (3) or chunk (4) carrying an error: upgraded toward the host too, with
        // the call's correlation id (a result's own, else the stream's).
        let error_field = if kind.number == 3 { 4 } else { 5 };
        if kind.has_len_field(error_field).map_err(Self::bad)? {
            let body = kind.merged();
            let cid = wire::fields(&body)
                .flatten()
                .find(|f| kind.number == 3 && f.number == 5 && f.wire_type == 2)
                .map(|f| String::from_utf8_lossy(f.value).into_owned())
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| self.correlation_id.clone());
            if let Some(up) = ErrorPatch::from_runtime(&cid)
                .apply_nested(payload, &ENVELOPE_KINDS, kind.number, error_field)
                .map_err(Self::bad)?
            {
                return Ok(Verdict::Replace(up));
            }
        }
        Ok(Verdict::Forward)
    }

    fn refused(&mut self, denial: &Denial) {
        // Before the announcement, the refusal decides the Connect call; after it, it is
        // one message of an allowed stream.
        let stage = if self.announced {
            Stage::Message
        } else {
            Stage::Announce
        };
        let facts = self.refused_announce.take().unwrap_or_else(|| {
            Facts::new(
                stage,
                GridMethod::Connect.path(),
                Route::Grid(GridMethod::Connect),
                self.conn.identity().ok(),
                &self.correlation_id,
            )
        });
        self.proxy
            .recorder
            .record(crate::decision::Decision::Deny(&facts, denial));
    }
}
