//! The data plane: one HTTP/2 request in, routed by gRPC method, intercepted, decided,
//! forwarded to the host, and its response intercepted on the way back.
//!
//! - unary GRID methods (`CreateSession`, `DestroySession`, `ExecuteTool`,
//!   `ExecuteToolStream`): the one request message is read (up to the size limit), decoded,
//!   decided and upgraded before anything reaches the host; the response is intercepted
//!   message by message (`ExecuteToolStream` streams);
//! - `GridRuntime/Connect`: both directions are intercepted message by message, never
//!   buffered; the runtime's announcement is upgraded and decided as it passes;
//! - pass-through methods: forwarded as they are, identity metadata set;
//! - anything else: `METHOD_NOT_ALLOWED`.

pub mod body;
pub mod headers;
pub mod server;

use crate::config::Config;
use crate::decision::{Decision, DecisionInput, Pipeline};
use crate::grid::upgrade::{self, Claims, ErrorPatch, RuntimeFacts};
use crate::grid::{GridMethod, Route, wire};
use crate::grpc::frame::{Encoding, FrameDecoder, encode_frame, message_payload};
use crate::grpc::{Denial, ErrorCode};
use crate::listener::PeerIdentity;
use crate::metrics::{self, Metrics};
use crate::proto::aesp;
use crate::upstream::{Class, Upstream};
use base64::Engine;
use body::{InterceptBody, MessageHook, ProxyBody, Side, Verdict};
use bytes::Bytes;
use headers::IdentityHeaders;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prost::Message;
use std::net::SocketAddr;
use std::sync::Arc;

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// GRID traffic to the host.
    DataPlane,
    /// The Enterprise*Service management APIs.
    Management,
}

/// One accepted connection: its verified identity and security context, computed once.
#[derive(Debug)]
pub struct ConnInfo {
    pub identity: Result<PeerIdentity, String>,
    pub remote: SocketAddr,
    /// `Some` exactly when `identity` is `Ok`.
    pub context: Option<upgrade::ContextTemplate>,
}

impl ConnInfo {
    pub fn new(
        identity: Result<PeerIdentity, String>,
        remote: SocketAddr,
        cfg: &Config,
    ) -> ConnInfo {
        let context = identity.as_ref().ok().map(|id| {
            upgrade::ContextTemplate::new(
                id,
                &cfg.identity.organization_id,
                &remote.to_string(),
                &cfg.runtime.security_zone,
            )
        });
        ConnInfo {
            identity,
            remote,
            context,
        }
    }

    /// The encoded `EnterpriseSecurityContext` of one call.
    fn security_context(&self, method: &str) -> Bytes {
        self.context
            .as_ref()
            .map(|c| c.for_call(method))
            .unwrap_or_default()
    }
}

/// Shared, immutable state of the data plane.
pub struct Proxy {
    pub role: Role,
    pub cfg: Arc<Config>,
    pub pipeline: Pipeline,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
}

/// A trailers-only gRPC response carrying `denial`.
pub fn denial_response(denial: &Denial, correlation_id: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(body::empty());
    let h = resp.headers_mut();
    *h = denial.status_headers(correlation_id);
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    if let Ok(v) = HeaderValue::from_str(correlation_id) {
        h.insert(headers::X_AESP_CORRELATION_ID, v);
    }
    resp
}

fn is_grpc(req: &Request<Incoming>) -> bool {
    req.method() == http::Method::POST
        && req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct == "application/grpc"
                    || ct.starts_with("application/grpc+")
                    || ct.starts_with("application/grpc;")
            })
}

fn malformed(e: impl std::fmt::Display) -> Denial {
    Denial::new(
        ErrorCode::MalformedMessage,
        format!("malformed gRPC request: {e}"),
    )
}

impl Proxy {
    fn identity<'a>(&self, conn: &'a ConnInfo) -> Result<&'a PeerIdentity, &'a str> {
        conn.identity.as_ref().map_err(String::as_str)
    }

    fn metric_slot(route: Route) -> usize {
        match route {
            Route::Grid(m) => m.index(),
            Route::Passthrough => metrics::PASSTHROUGH,
            Route::Unknown | Route::Management => metrics::OTHER,
        }
    }

    /// Runs the decision pipeline and records its outcome.
    fn decide(&self, input: &DecisionInput<'_>) -> Decision {
        let d = self.pipeline.decide(input);
        self.record(input.route, &d);
        d
    }

    fn record(&self, route: Route, d: &Decision) {
        self.metrics
            .record(Self::metric_slot(route), d.denial.as_ref().map(|x| x.code));
    }

    /// Serves one request. Never fails: every problem is a gRPC status to the peer.
    pub async fn handle(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        if !is_grpc(&req) {
            let mut r = Response::new(body::full(Bytes::from_static(
                b"aesp-sidecar serves gRPC only\n",
            )));
            *r.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
            return r;
        }
        let cid = headers::inbound_correlation_id(req.headers())
            .unwrap_or_else(headers::new_correlation_id);
        let path = req.uri().path().to_string();
        let route = match self.role {
            Role::DataPlane => crate::grid::route(&path, &self.cfg.passthrough),
            Role::Management => Route::Management,
        };
        let identity = self.identity(&conn);

        // A connection without a usable identity gets nothing but the refusal, whatever it
        // calls; its request body is never read.
        if identity.is_err() {
            let d = self.decide(&DecisionInput::headers(&path, route, identity, &cid));
            return self.deny(&d);
        }

        // The message encoding of an inspected call must be one the sidecar can read.
        let encoding = match req
            .headers()
            .get("grpc-encoding")
            .map(|v| v.to_str().ok().and_then(Encoding::parse))
        {
            None => Encoding::Identity,
            Some(Some(e)) => e,
            Some(None) if matches!(route, Route::Grid(_)) => {
                let d = Decision::early_denial(
                    &path,
                    identity.ok(),
                    &cid,
                    malformed("unsupported grpc-encoding")
                        .detail("supported", crate::grpc::frame::ACCEPT_ENCODING),
                );
                self.record(route, &d);
                return self.deny(&d);
            }
            // Pass-through and refused calls are not inspected.
            Some(None) => Encoding::Identity,
        };

        match route {
            Route::Grid(GridMethod::Connect) => self.connect(conn, req, cid, encoding).await,
            Route::Grid(m) => self.unary(conn, m, req, cid, encoding).await,
            Route::Passthrough | Route::Unknown | Route::Management => {
                let d = self.decide(&DecisionInput::headers(&path, route, identity, &cid));
                match (&d.denial, identity) {
                    (None, Ok(id)) => {
                        let esc = conn.security_context(&path);
                        let (parts, body) = req.into_parts();
                        let up = self.upstream_request(
                            &parts,
                            id,
                            &esc,
                            &cid,
                            body.map_err(Into::into).boxed_unsync(),
                            false,
                        );
                        match self.upstream.send(up, Class::Call).await {
                            Ok(resp) => self.passthrough_response(resp, &cid),
                            Err(e) => self.upstream_down(&path, id, &cid, e),
                        }
                    }
                    _ => self.deny(&d),
                }
            }
        }
    }

    fn deny(&self, d: &Decision) -> Response<ProxyBody> {
        match &d.denial {
            Some(den) => denial_response(den, &d.correlation_id),
            None => denial_response(
                &Denial::new(ErrorCode::AuthenticationRequired, "no identity"),
                &d.correlation_id,
            ),
        }
    }

    fn upstream_request(
        &self,
        parts: &http::request::Parts,
        id: &PeerIdentity,
        esc: &[u8],
        cid: &str,
        body: ProxyBody,
        inspected: bool,
    ) -> Request<ProxyBody> {
        let esc_b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(esc);
        let h = headers::upstream_request_headers(
            &parts.headers,
            IdentityHeaders {
                principal: id.principal_header.clone(),
                tenant: id.tenant_header.clone(),
                security_context_bin: HeaderValue::from_str(&esc_b64)
                    .unwrap_or_else(|_| HeaderValue::from_static("")),
                correlation_id: HeaderValue::from_str(cid)
                    .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
            },
            inspected,
        );
        let mut req = Request::new(body);
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = self.upstream.uri_for(parts.uri.path_and_query());
        *req.headers_mut() = h;
        req
    }

    fn upstream_down(
        &self,
        path: &str,
        id: &PeerIdentity,
        cid: &str,
        e: crate::upstream::UpstreamError,
    ) -> Response<ProxyBody> {
        self.metrics.upstream_errors.inc();
        tracing::warn!(method = path, correlation_id = cid, error = %e, "GRID host unavailable");
        let d = Decision::early_denial(
            path,
            Some(id),
            cid,
            Denial::new(
                ErrorCode::UpstreamUnavailable,
                "the GRID host cannot be reached",
            )
            .detail("reason", e.to_string()),
        );
        self.deny(&d)
    }

    fn passthrough_response(&self, resp: Response<Incoming>, cid: &str) -> Response<ProxyBody> {
        let (parts, body) = resp.into_parts();
        let cid_h =
            HeaderValue::from_str(cid).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        let mut out = Response::new(body.map_err(Into::into).boxed_unsync());
        *out.status_mut() = parts.status;
        *out.headers_mut() = headers::downstream_response_headers(&parts.headers, &cid_h);
        out
    }

    fn intercepted_response<H: MessageHook>(
        &self,
        resp: Response<Incoming>,
        cid: &str,
        hook: H,
        abort: Option<tokio::sync::oneshot::Receiver<Denial>>,
    ) -> Response<ProxyBody> {
        let (parts, body) = resp.into_parts();
        let encoding = parts
            .headers
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok())
            .and_then(Encoding::parse)
            .unwrap_or(Encoding::Identity);
        let cid_h =
            HeaderValue::from_str(cid).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        let side = Side::Response {
            abort,
            correlation_id: Arc::from(cid),
        };
        let b = InterceptBody::new(
            body,
            hook,
            side,
            encoding,
            self.cfg.limits.max_message_bytes,
        );
        let mut out = Response::new(b.boxed_unsync());
        *out.status_mut() = parts.status;
        *out.headers_mut() = headers::downstream_response_headers(&parts.headers, &cid_h);
        out
    }

    /// Reads the one message of a unary request, bounded by size and time.
    async fn read_unary(
        &self,
        mut body: Incoming,
        encoding: Encoding,
    ) -> Result<(crate::grpc::GrpcMessage, Bytes), Denial> {
        let max = self.cfg.limits.max_message_bytes;
        let read = async {
            let mut decoder = FrameDecoder::new(max);
            let mut msgs = Vec::with_capacity(1);
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| malformed(format!("request stream failed: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    decoder.push(data, &mut msgs).map_err(malformed)?;
                    if msgs.len() > 1 {
                        return Err(malformed("more than one message in a unary request"));
                    }
                }
            }
            decoder.finish().map_err(malformed)?;
            msgs.pop()
                .ok_or_else(|| malformed("the request carries no message"))
        };
        let msg = tokio::time::timeout(self.cfg.limits.request_read_timeout, read)
            .await
            .map_err(|_| malformed("the request message did not arrive in time"))??;
        let payload = message_payload(&msg, encoding, max).map_err(malformed)?;
        Ok((msg, payload))
    }

    async fn unary(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        method: GridMethod,
        req: Request<Incoming>,
        header_cid: String,
        encoding: Encoding,
    ) -> Response<ProxyBody> {
        let path = method.path();
        let route = Route::Grid(method);
        let identity = self.identity(&conn);
        let (parts, body) = req.into_parts();

        let decoded = match self.read_unary(body, encoding).await {
            Ok((msg, payload)) => upgrade::decode_request(method, &payload)
                .map(|r| (msg, payload, r))
                .map_err(|e| {
                    malformed(format!("not a valid {} message: {e}", request_type(method)))
                }),
            Err(d) => Err(d),
        };
        let (msg, payload, request) = match decoded {
            Ok(x) => x,
            Err(denial) => {
                let d = Decision::early_denial(path, identity.ok(), &header_cid, denial);
                self.record(route, &d);
                return self.deny(&d);
            }
        };

        // A correlation id in the message wins over the header; otherwise the message gets
        // the header's (or a new) one.
        let msg_cid = request
            .correlation_id()
            .filter(|c| headers::valid_correlation_id(c))
            .map(str::to_string);
        let cid = msg_cid.clone().unwrap_or(header_cid);

        let d = self.decide(&DecisionInput {
            method: path,
            route,
            identity,
            claims: request.claims(),
            tool_name: request.tool_name(),
            session_id: request.session_id(),
            correlation_id: &cid,
        });
        let id = match (&d.denial, identity) {
            (None, Ok(id)) => id,
            _ => return self.deny(&d),
        };

        let esc = conn.security_context(path);
        let upgraded = match &request {
            upgrade::Request::CreateSession(_) => {
                Some(upgrade::upgrade_create_session(&payload, &esc).map_err(malformed))
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
            Some(Err(denial)) => {
                let d = Decision::early_denial(path, Some(id), &cid, denial);
                return self.deny(&d);
            }
        };

        let up = self.upstream_request(&parts, id, &esc, &cid, body::full(frame), true);
        match self.upstream.send(up, Class::Call).await {
            Ok(resp) => {
                let hook = ErrorHook {
                    patch: ErrorPatch::new(&cid),
                    field: method.response_error_field(),
                };
                self.intercepted_response(resp, &cid, hook, None)
            }
            Err(e) => self.upstream_down(path, id, &cid, e),
        }
    }

    async fn connect(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
        cid: String,
        encoding: Encoding,
    ) -> Response<ProxyBody> {
        let method = GridMethod::Connect;
        let route = Route::Grid(method);
        let identity = self.identity(&conn);
        let d = self.decide(&DecisionInput::headers(
            method.path(),
            route,
            identity,
            &cid,
        ));
        let id = match (&d.denial, identity) {
            (None, Ok(id)) => id,
            _ => return self.deny(&d),
        };
        let esc = conn.security_context(method.path());
        let (parts, body) = req.into_parts();
        let (abort_tx, abort_rx) = tokio::sync::oneshot::channel();
        let hook = RuntimeHook {
            proxy: self.clone(),
            conn: conn.clone(),
            correlation_id: cid.clone(),
            announced: false,
        };
        let req_body = InterceptBody::new(
            body,
            hook,
            Side::Request {
                abort: Some(abort_tx),
            },
            encoding,
            self.cfg.limits.max_message_bytes,
        );
        let up = self.upstream_request(&parts, id, &esc, &cid, req_body.boxed_unsync(), true);
        match self.upstream.send(up, Class::RuntimeStream).await {
            Ok(resp) => {
                let hook = HostHook {
                    patch: ErrorPatch::new(&cid),
                };
                self.intercepted_response(resp, &cid, hook, Some(abort_rx))
            }
            Err(e) => {
                let mut abort_rx = abort_rx;
                match abort_rx.try_recv() {
                    Ok(denial) => denial_response(&denial, &cid),
                    Err(_) => self.upstream_down(method.path(), id, &cid, e),
                }
            }
        }
    }
}

fn request_type(m: GridMethod) -> &'static str {
    match m {
        GridMethod::CreateSession => "altar.grid.v1.CreateSession",
        GridMethod::DestroySession => "altar.grid.v1.DestroySession",
        GridMethod::ExecuteTool | GridMethod::ExecuteToolStream => "altar.grid.v1.ToolCall",
        GridMethod::Connect => "altar.grid.v1.RuntimeMessage",
    }
}

/// Host → client: `Error` → `EnterpriseError` in the response message's error field.
struct ErrorHook {
    patch: ErrorPatch,
    field: u32,
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
}

/// The oneof members of both Connect envelopes (`RuntimeMessage.kind`, `HostMessage.kind`).
const ENVELOPE_KINDS: [u32; 4] = [1, 2, 3, 4];

/// Host → runtime on `Connect`: errors in `announce_ack` and `fulfill_ack` are upgraded.
struct HostHook {
    patch: ErrorPatch,
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
}

/// Runtime → host on `Connect`: `announce` first and once, upgraded and decided; every
/// message must decode.
struct RuntimeHook {
    proxy: Arc<Proxy>,
    conn: Arc<ConnInfo>,
    correlation_id: String,
    announced: bool,
}

impl MessageHook for RuntimeHook {
    fn on_message(&mut self, payload: &Bytes) -> Result<Verdict, Denial> {
        let bad = |what: String| {
            Denial::new(
                ErrorCode::MalformedMessage,
                format!("not a valid altar.grid.v1.RuntimeMessage: {what}"),
            )
        };
        // Only the oneof's fields are allowed in the envelope, and the whole message must
        // decode: the host never receives what it could not parse.
        for f in wire::fields(payload) {
            let f = f.map_err(|e| bad(e.to_string()))?;
            if f.wire_type != 2 || !ENVELOPE_KINDS.contains(&f.number) {
                return Err(bad(format!(
                    "unexpected field {} (wire type {})",
                    f.number, f.wire_type
                )));
            }
        }
        aesp::EnterpriseRuntimeMessage::decode(payload.clone()).map_err(|e| bad(e.to_string()))?;
        // The kind is the oneof member a decoder sees: the last one, its consecutive records merged.
        let kind = wire::oneof_member(payload, &ENVELOPE_KINDS)
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad("no kind set".into()))?;
        if kind.number != 1 {
            if !self.announced {
                return Err(Denial::new(
                    ErrorCode::MalformedMessage,
                    "the first message on GridRuntime/Connect must be announce",
                ));
            }
            return Ok(Verdict::Forward);
        }
        let raw = kind.merged();
        let a = aesp::EnterpriseRuntimeAnnouncement::decode(&raw[..])
            .map_err(|e| bad(e.to_string()))?;
        let path = GridMethod::Connect.path();
        if self.announced {
            return Err(Denial::new(
                ErrorCode::MalformedMessage,
                "a runtime announces once per Connect stream",
            ));
        }
        let p = &self.proxy;
        let identity = self.conn.identity.as_ref().map_err(String::as_str);
        let d = p.decide(&DecisionInput {
            method: path,
            route: Route::Grid(GridMethod::Connect),
            identity,
            claims: Claims {
                principal_id: None,
                tenant_id: (!a.tenant_id.is_empty()).then(|| a.tenant_id.clone()),
            },
            tool_name: None,
            session_id: None,
            correlation_id: &self.correlation_id,
        });
        if let Some(den) = d.denial {
            return Err(den);
        }
        let Ok(id) = identity else {
            return Err(Denial::new(
                ErrorCode::AuthenticationRequired,
                "no identity",
            ));
        };
        let facts = RuntimeFacts {
            runtime_id_fallback: id.principal_id.clone(),
            tenant_id: id.tenant_id.clone(),
            security_zone: p.cfg.runtime.security_zone.clone(),
            deployment_environment: p.cfg.runtime.deployment_environment.clone(),
        };
        let up = upgrade::upgrade_announce(payload, &raw, &a.runtime_id, &facts)
            .map_err(|e| Denial::new(ErrorCode::MalformedMessage, e.to_string()))?;
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
