//! The unary GRID methods (`CreateSession`, `DestroySession`, `ExecuteTool`,
//! `ExecuteToolStream`): the one request message is read whole (bounded by size and time),
//! decoded, decided and upgraded before anything reaches the host; the response is
//! intercepted message by message on its way back.

use super::budget::Reservation;
use super::hooks::{ErrorHook, Outcome};
use super::{ConnInfo, Proxy, body, headers};
use crate::decision::{DecisionInput, Denied, Facts, Stage};
use crate::grid::upgrade::{self, ErrorPatch};
use crate::grid::{GridMethod, Route};
use crate::grpc::Denial;
use crate::grpc::frame::{Encoding, FrameDecoder, GrpcMessage, encode_frame, message_payload};
use crate::upstream::Class;
use body::ProxyBody;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::Arc;

impl Proxy {
    /// Reads the one message of a unary request, bounded by size and time, and by the
    /// connection's buffer budget (see [`super::budget`]).
    async fn read_unary(
        &self,
        conn: &ConnInfo,
        mut body: Incoming,
        encoding: Encoding,
    ) -> Result<(GrpcMessage, Bytes), Denial> {
        let max = self.cfg.limits.max_message_bytes;
        let read = async {
            let mut decoder = FrameDecoder::new(max);
            let mut msgs = Vec::with_capacity(1);
            let mut held = None;
            loop {
                // A message spanning frames: its bytes are reserved before they are read.
                let need = decoder.pending_len();
                if held.as_ref().map_or(0, |r: &Reservation| r.bytes) != need {
                    drop(held.take());
                    if need > 0 {
                        held = Some(conn.budget.reserve(need).await);
                    }
                }
                let Some(frame) = body.frame().await else {
                    break;
                };
                let frame =
                    frame.map_err(|e| Denial::malformed(format!("request stream failed: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    decoder.push(data, &mut msgs).map_err(Denial::malformed)?;
                    if msgs.len() > 1 {
                        return Err(Denial::malformed(
                            "more than one message in a unary request",
                        ));
                    }
                }
            }
            decoder.finish().map_err(Denial::malformed)?;
            msgs.pop()
                .ok_or_else(|| Denial::malformed("the request carries no message"))
        };
        let msg = tokio::time::timeout(self.cfg.limits.request_read_timeout, read)
            .await
            .map_err(|_| Denial::malformed("the request message did not arrive in time"))??;
        let payload = message_payload(&msg, encoding, max).map_err(Denial::malformed)?;
        Ok((msg, payload))
    }

    pub(super) async fn unary(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        method: GridMethod,
        req: Request<Incoming>,
        header_cid: String,
        encoding: Encoding,
    ) -> Response<ProxyBody> {
        let path = method.path();
        let route = Route::Grid(method);
        let (parts, body) = req.into_parts();

        let decoded = match self.read_unary(&conn, body, encoding).await {
            Ok((msg, payload)) => upgrade::decode_request(method, &payload)
                .map(|r| (msg, payload, r))
                .map_err(|e| Denial::malformed(format!("not a valid {e}"))),
            Err(d) => Err(d),
        };
        let (msg, payload, request) = match decoded {
            Ok(x) => x,
            Err(denial) => {
                let id = conn.identity().ok();
                return self
                    .refuse(Denied::early(
                        Stage::Call,
                        path,
                        route,
                        id,
                        &header_cid,
                        denial,
                    ))
                    .await;
            }
        };

        // A correlation id in the message wins over the header; otherwise the message gets
        // the header's (or a new) one.
        let cid = request
            .correlation_id()
            .filter(|c| headers::valid_correlation_id(c))
            .map(str::to_string)
            .unwrap_or(header_cid);

        let allowed = match self.pipeline.decide(&DecisionInput {
            method: path,
            route,
            identity: conn.identity(),
            authorization: super::authorization(&parts.headers),
            grants: &conn.grants,
            claims: request.claims(),
            tool_name: request.tool_name(),
            args: request.args(),
            session_id: request.session_id(),
            correlation_id: &cid,
            source: &conn.source,
        }) {
            Ok(a) => a,
            Err(denied) => return self.refuse(denied).await,
        };

        let esc = conn.security_context(path, &allowed);
        let upgraded = match &request {
            upgrade::Request::CreateSession(_) => {
                Some(upgrade::upgrade_create_session(&payload, &esc).map_err(Denial::malformed))
            }
            upgrade::Request::ToolCall(tc) if tc.correlation_id != cid => {
                Some(Ok(upgrade::set_tool_call_correlation(&payload, &cid)))
            }
            _ => None,
        };
        let frame = match upgraded {
            // Compressed requests are forwarded uncompressed (see `upstream_request_headers`).
            None if msg.compressed => encode_frame(&payload),
            None => msg.frame,
            Some(Ok(p)) => encode_frame(&p),
            Some(Err(denial)) => return self.refuse(allowed.deny(denial)).await,
        };

        let up = self.upstream_request(&parts, &allowed, &esc, &cid, body::full(frame), true);
        match self
            .forward(&allowed, up, Class::Call(&conn.upstream))
            .await
        {
            Ok(resp) => {
                let mut outcome =
                    Outcome::new(self.recorder.clone(), method, &allowed.facts, payload.len());
                if matches!(
                    method,
                    GridMethod::CreateSession | GridMethod::DestroySession
                ) {
                    outcome.sessions = Some(self.pipeline.sessions.clone());
                }
                let patch = ErrorPatch::new(&cid).with_contract(allowed.facts.contract.as_deref());
                let hook = ErrorHook {
                    recorder: self.recorder.clone(),
                    facts: Facts {
                        stage: Stage::Response,
                        ..allowed.facts
                    },
                    patch,
                    field: method.response_error_field(),
                    outcome,
                };
                self.intercepted_response(&conn, resp, &cid, hook, None, None)
            }
            Err(e) => self.failed(allowed, e).await,
        }
    }
}
