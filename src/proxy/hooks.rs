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
}

impl MessageHook for ErrorHook {
    fn on_message(&mut self, payload: &Bytes) -> Result<Verdict, Denial> {
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
}

impl RuntimeHook {
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
            session_id: None,
            correlation_id: &self.correlation_id,
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
