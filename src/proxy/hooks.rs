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
        }
    }

    /// Notes one response message (fields read at the wire level, nothing decoded whole).
    fn observe(&mut self, payload: &[u8]) {
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

/// Host → runtime on `Connect`: errors in `announce_ack` and `fulfill_ack` are upgraded.
pub(super) struct HostHook {
    pub recorder: Recorder,
    /// The allowed `Connect`'s facts, at [`Stage::Response`].
    pub facts: Facts,
    pub patch: ErrorPatch,
}

impl MessageHook for HostHook {
    fn on_message(&mut self, payload: &Bytes) -> Result<Verdict, Denial> {
        let bad = |e: wire::WireError| {
            Denial::new(
                ErrorCode::MalformedMessage,
                format!("the GRID host sent a malformed HostMessage: {e}"),
            )
        };
        let member = wire::oneof_member(payload, &ENVELOPE_KINDS)
            .map_err(bad)?
            .map(|m| m.number);
        let up = match member {
            // announce_ack (1) and fulfill_ack (3) carry `error` as their field 3.
            Some(outer @ (1 | 3)) => self
                .patch
                .apply_nested(payload, &ENVELOPE_KINDS, outer, 3)
                .map_err(bad)?,
            _ => None,
        };
        Ok(up.map_or(Verdict::Forward, Verdict::Replace))
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
                facts.stage = Stage::Message;
                self.refused_announce = Some(facts);
                return Err(denial);
            }
        };
        allowed.facts.stage = Stage::Message;
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
        if kind.number == 2 && self.proxy.recorder.audit().is_some() {
            // Already checked to decode above.
            let f = crate::proto::grid::FulfillTools::decode(kind.merged().as_slice())
                .unwrap_or_default();
            let mut e = self.runtime_event("FULFILLMENT");
            e.session_id = f.session_id;
            e.attributes
                .insert("tools".into(), f.tool_contract_names.join(","));
            self.proxy.recorder.event(e);
        }
        Ok(Verdict::Forward)
    }

    fn refused(&mut self, denial: &Denial) {
        let facts = self.refused_announce.take().unwrap_or_else(|| {
            Facts::new(
                Stage::Message,
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
