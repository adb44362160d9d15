//! The data plane: one HTTP/2 request in, routed by gRPC method, intercepted, decided,
//! forwarded to the host, and its response intercepted on the way back.
//!
//! One file per kind of call:
//! - [`unary`]: the unary GRID methods (`CreateSession`, `DestroySession`, `ExecuteTool`,
//!   `ExecuteToolStream`): the one request message is read (up to the size limit), decoded,
//!   decided and upgraded before anything reaches the host; the response is intercepted
//!   message by message (`ExecuteToolStream` streams);
//! - [`connect`]: `GridRuntime/Connect`: both directions are intercepted message by
//!   message, never buffered; the runtime's announcement is upgraded and decided as it passes;
//! - [`passthrough`]: methods listed for pass-through, forwarded as they are with identity
//!   metadata; and everything else, refused with `METHOD_NOT_ALLOWED`;
//! - [`hooks`]: what is done to each message of a stream, in each direction;
//! - [`body`]: the frame interceptor the hooks plug into; [`headers`]: metadata.
//!
//! Invariants (each kept by one place, named here):
//! 1. Nothing of a call reaches the host before the pipeline allowed it and the allow was
//!    recorded ([`Proxy::forward`] is the only way to the host and takes an `Allowed`).
//! 2. Every refusal is recorded, wherever it is made ([`Proxy::refuse`] for answers made
//!    before the host was involved; [`body::MessageHook::refused`] for refusals mid-stream).
//! 3. Reserved headers (`x-aesp-*`, `aesp-*`) are never forwarded in either direction
//!    ([`headers`]); the sidecar sets its own.
//! 4. On `Connect`, `announce` comes first and only once ([`hooks::RuntimeHook`]).
//! 5. A peer without a usable identity gets nothing but the refusal: its request body is
//!    never read.

pub mod body;
pub(crate) mod budget;
mod connect;
pub(crate) mod headers;
mod hooks;
mod management;
mod passthrough;
pub(crate) mod rate;
mod unary;

use crate::config::Config;
use crate::decision::{Allowed, Decision, Denied, Pipeline, Recorder, Stage};
use crate::grid::upgrade;
use crate::grid::{GridMethod, Route};
use crate::grpc::frame::Encoding;
use crate::grpc::{Denial, ErrorCode};
use crate::listener::PeerIdentity;
use crate::listener::identity::IdentityError;
use crate::metrics::Metrics;
use crate::upstream::{Class, Upstream, UpstreamError};
use base64::Engine;
use body::{InterceptBody, MessageHook, ProxyBody, Side};
use bytes::Bytes;
use headers::IdentityHeaders;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::Arc;

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// GRID traffic to the host.
    DataPlane,
    /// The Enterprise*Service management APIs.
    Management,
}

/// One accepted connection: its verified identity and security context, computed once.
#[derive(Debug)]
pub(crate) struct ConnInfo {
    pub identity: Result<PeerIdentity, IdentityError>,
    /// `Some` exactly when `identity` is `Ok`.
    pub context: Option<upgrade::ContextTemplate>,
    /// What the connection's calls may hold while assembling messages.
    pub budget: budget::Budget,
    /// The certificate identity's RBAC grants (calls with a token use their caller's).
    pub grants: crate::authz::GrantsCache,
    /// This connection's own upstream connection, for its calls.
    pub upstream: crate::upstream::Affinity,
    /// The peer's address, `ip:port`.
    pub source: String,
    /// The connection's request rate (`limits.max_requests_per_second_per_connection`).
    pub rate: rate::Bucket,
    /// Cancelled when the connection must be closed for calling too fast (GOAWAY).
    pub calm: tokio_util::sync::CancellationToken,
}

impl ConnInfo {
    pub fn new(
        identity: Result<PeerIdentity, IdentityError>,
        remote: SocketAddr,
        cfg: &Config,
        buffered_total: &budget::Total,
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
            context,
            budget: budget::Budget::for_connection(
                cfg.limits.max_buffered_bytes_per_connection,
                buffered_total,
            ),
            grants: crate::authz::GrantsCache::default(),
            upstream: crate::upstream::Affinity::default(),
            source: remote.to_string(),
            rate: rate::Bucket::new(cfg.limits.request_rate),
            calm: tokio_util::sync::CancellationToken::new(),
        }
    }

    fn identity(&self) -> Result<&PeerIdentity, &IdentityError> {
        self.identity.as_ref()
    }

    /// The encoded `EnterpriseSecurityContext` of one allowed call.
    fn security_context(&self, method: &str, allowed: &Allowed<'_>) -> Bytes {
        let caller = allowed.caller.as_ref().map(|c| {
            c.context
                .get_or_init(|| upgrade::caller_context(c))
                .as_slice()
        });
        self.context
            .as_ref()
            .map(|c| c.for_call(method, caller, &allowed.grants.roles_context))
            .unwrap_or_default()
    }
}

/// Shared, immutable state of the data plane.
pub(crate) struct Proxy {
    pub role: Role,
    pub cfg: Arc<Config>,
    pub pipeline: Pipeline,
    pub recorder: Recorder,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    /// `limits.max_buffered_bytes`, shared by every connection of every listener.
    pub buffered_total: budget::Total,
    /// The management services (on the management listener only).
    pub management: Option<tonic::service::Routes>,
}

/// The `authorization` header of a request, for the token check.
fn authorization(h: &http::HeaderMap) -> Option<&[u8]> {
    h.get(http::header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
}

/// Why an allowed call did not reach the host.
pub(crate) enum Failed {
    /// The audit trail could not record the allow (fail closed).
    Audit,
    Upstream(UpstreamError),
}

/// The refusal of a call whose decision cannot be recorded.
pub(crate) fn audit_unavailable() -> Denial {
    Denial::new(
        ErrorCode::AuditUnavailable,
        "the audit trail cannot record this call, so it is refused (fail closed)",
    )
    .detail(
        "retry",
        "the sidecar accepts calls again as soon as its audit store is writable",
    )
}

/// A trailers-only gRPC response carrying `denial`.
fn denial_response(denial: &Denial, correlation_id: &str) -> Response<ProxyBody> {
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

/// Whether the gRPC codec of `content-type` is protobuf (`application/grpc`,
/// `application/grpc+proto`, with or without parameters). Only such calls are inspected.
fn is_protobuf_codec(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| ct.split(';').next().unwrap_or("").trim())
        .is_some_and(|ct| ct == "application/grpc" || ct == "application/grpc+proto")
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

fn header_text(h: &http::HeaderMap, name: http::header::HeaderName) -> String {
    h.get(name)
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .chars()
                .take(128)
                .collect()
        })
        .unwrap_or_default()
}

fn correlation_header(cid: &str) -> HeaderValue {
    HeaderValue::from_str(cid).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

impl Proxy {
    /// Serves one request. Never fails: every problem is a gRPC status to the peer.
    pub async fn handle(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        // Every request counts against its connection's rate, gRPC or not.
        let verdict = conn.rate.check();
        if !is_grpc(&req) {
            let (text, status): (&'static [u8], _) = if verdict == rate::Verdict::Allowed {
                (
                    b"aesp-sidecar serves gRPC only\n",
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                )
            } else {
                self.calm_down(&conn, verdict);
                (
                    b"too many requests on this connection\n",
                    StatusCode::TOO_MANY_REQUESTS,
                )
            };
            let mut r = Response::new(body::full(Bytes::from_static(text)));
            *r.status_mut() = status;
            return r;
        }
        let cid = headers::inbound_correlation_id(req.headers())
            .unwrap_or_else(headers::new_correlation_id);
        let path = req.uri().path().to_string();
        let route = match self.role {
            Role::DataPlane => crate::grid::route(&path, &self.cfg.passthrough),
            Role::Management => Route::Management,
        };

        // Over the connection's request rate: refused before anything else is looked at.
        if verdict != rate::Verdict::Allowed {
            return self.rate_limited(&conn, verdict, &path, route, &cid).await;
        }

        // A connection without a usable identity gets nothing but the refusal, whatever it
        // calls; its request body is never read.
        if let Err(why) = conn.identity() {
            return self
                .refuse(Denied::early(
                    Stage::Call,
                    &path,
                    route,
                    None,
                    &cid,
                    crate::decision::unauthenticated(why),
                ))
                .await;
        }

        // A GRID call must be protobuf, on the bare method path.
        if let Route::Grid(_) = route {
            let refusal = if !is_protobuf_codec(&req) {
                Some(
                    Denial::malformed("GRID methods are served with the protobuf codec only")
                        .detail(
                            "content_type",
                            header_text(req.headers(), http::header::CONTENT_TYPE),
                        )
                        .detail("expected", "application/grpc or application/grpc+proto"),
                )
            } else if req.uri().query().is_some() {
                Some(Denial::malformed(
                    "a query string is not allowed on a GRID method",
                ))
            } else {
                None
            };
            if let Some(denial) = refusal {
                return self
                    .refuse(Denied::early(
                        Stage::Call,
                        &path,
                        route,
                        conn.identity().ok(),
                        &cid,
                        denial,
                    ))
                    .await;
            }
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
                return self
                    .refuse(Denied::early(
                        Stage::Call,
                        &path,
                        route,
                        conn.identity().ok(),
                        &cid,
                        Denial::malformed("unsupported grpc-encoding")
                            .detail("supported", crate::grpc::frame::ACCEPT_ENCODING),
                    ))
                    .await;
            }
            // Pass-through and refused calls are not inspected.
            Some(None) => Encoding::Identity,
        };

        match route {
            Route::Grid(GridMethod::Connect) => self.connect(conn, req, cid, encoding).await,
            Route::Grid(m) => self.unary(conn, m, req, cid, encoding).await,
            Route::Management => self.management(conn, req, path, cid).await,
            Route::Passthrough | Route::Unknown => {
                self.passthrough(conn, req, route, path, cid).await
            }
        }
    }

    /// A call over its connection's request rate: `BUDGET_EXCEEDED` (`RESOURCE_EXHAUSTED`,
    /// the contract's only code of that status: the connection's request budget is spent),
    /// recorded like every refusal, never forwarded. With `Calm` the connection is closed
    /// too (GOAWAY): its refusals came faster than the limit allows calls.
    #[cold]
    async fn rate_limited(
        &self,
        conn: &ConnInfo,
        verdict: rate::Verdict,
        path: &str,
        route: Route,
        cid: &str,
    ) -> Response<ProxyBody> {
        let limit = self
            .cfg
            .limits
            .request_rate
            .unwrap_or(crate::config::RequestRate {
                per_second: 0,
                burst: 0,
            });
        let mut denial = Denial::new(
            ErrorCode::BudgetExceeded,
            "too many calls on this connection: its request rate limit is reached",
        )
        .detail("budget", "requests per connection")
        .detail("limit", "limits.max_requests_per_second_per_connection")
        .detail("per_second", limit.per_second.to_string())
        .detail("burst", limit.burst.to_string());
        denial.remediation_steps =
            "Slow down: retry with backoff, or spread calls over more connections.".into();
        if self.calm_down(conn, verdict) {
            denial = denial.detail("connection", "closed: calls kept coming over the limit");
        }
        self.refuse(Denied::early(
            Stage::Call,
            path,
            route,
            conn.identity().ok(),
            cid,
            denial,
        ))
        .await
    }

    /// With `Calm`, closes the connection (GOAWAY), once. Whether it was closed.
    fn calm_down(&self, conn: &ConnInfo, verdict: rate::Verdict) -> bool {
        if verdict != rate::Verdict::Calm {
            return false;
        }
        if conn.rate.close_once() {
            self.metrics.rate_limit_closes.inc();
            tracing::warn!(
                source = %conn.source,
                "calls keep coming at over twice the request rate limit; closing the connection (GOAWAY)"
            );
            conn.calm.cancel();
        }
        true
    }

    /// Records a refusal and answers it (trailers-only). The only way a refusal made before
    /// the host was involved reaches the peer. In audit mode `sync` the answer waits until
    /// the refusal's record is durable; a refusal stays a refusal if it cannot be written.
    async fn refuse(&self, denied: Denied) -> Response<ProxyBody> {
        let _ = self.recorder.durable(&denied).await;
        denial_response(&denied.denial, &denied.facts.correlation_id)
    }

    /// Records the allow and sends the call to the host. The only way to the host: in audit
    /// mode `sync`, only once the allow's record is durable.
    async fn forward(
        &self,
        allowed: &Allowed<'_>,
        req: Request<ProxyBody>,
        class: Class<'_>,
    ) -> Result<Response<Incoming>, Failed> {
        self.recorder
            .durable(Decision::from(allowed))
            .await
            .map_err(|_| Failed::Audit)?;
        self.upstream
            .send_within(req, class, self.cfg.limits.upstream_response_timeout)
            .await
            .map_err(Failed::Upstream)
    }

    /// An allowed call that could not be forwarded: refused, recorded.
    async fn failed(&self, allowed: Allowed<'_>, f: Failed) -> Response<ProxyBody> {
        match f {
            Failed::Upstream(e) => self.upstream_down(allowed, e).await,
            Failed::Audit => {
                let denied = allowed.deny(audit_unavailable());
                // The writer keeps this call's record, marked refused: count and log only.
                self.recorder.local(Decision::from(&denied));
                denial_response(&denied.denial, &denied.facts.correlation_id)
            }
        }
    }

    /// The upstream request of an allowed call: the client's metadata minus what the
    /// sidecar owns, plus the verified identity.
    fn upstream_request(
        &self,
        parts: &http::request::Parts,
        allowed: &Allowed<'_>,
        esc: &[u8],
        cid: &str,
        body: ProxyBody,
        inspected: bool,
    ) -> Request<ProxyBody> {
        let esc_b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(esc);
        let h = headers::upstream_request_headers(
            &parts.headers,
            IdentityHeaders {
                principal: allowed.caller.as_ref().map_or_else(
                    || allowed.identity.principal_header.clone(),
                    |c| c.principal_header.clone(),
                ),
                tenant: allowed
                    .caller
                    .as_ref()
                    .and_then(|c| c.tenant_header.clone())
                    .unwrap_or_else(|| allowed.identity.tenant_header.clone()),
                peer_kind: allowed.identity.kind_header.clone(),
                security_context_bin: HeaderValue::from_str(&esc_b64)
                    .unwrap_or_else(|_| HeaderValue::from_static("")),
                correlation_id: correlation_header(cid),
            },
            inspected,
        );
        let mut req = Request::new(body);
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = self.upstream.uri_for(parts.uri.path_and_query());
        *req.headers_mut() = h;
        req
    }

    /// The host could not take an allowed call: `UPSTREAM_UNAVAILABLE`, recorded.
    async fn upstream_down(&self, allowed: Allowed<'_>, e: UpstreamError) -> Response<ProxyBody> {
        self.metrics.upstream_errors.inc();
        tracing::warn!(
            method = %allowed.facts.method,
            correlation_id = %allowed.facts.correlation_id,
            error = %e,
            "GRID host unavailable"
        );
        let mut denied = allowed.deny(
            Denial::new(
                ErrorCode::UpstreamUnavailable,
                "the GRID host cannot be reached",
            )
            // The full error (with the host's address) goes to the log, not to the client.
            .detail("reason", e.public_reason()),
        );
        denied.facts.stage = Stage::Response;
        self.refuse(denied).await
    }

    /// The host's response, its messages handed to `hook` on the way back.
    fn intercepted_response<H: MessageHook>(
        &self,
        conn: &ConnInfo,
        resp: Response<Incoming>,
        cid: &str,
        hook: H,
        abort: Option<tokio::sync::oneshot::Receiver<Denial>>,
        injected: Option<tokio::sync::mpsc::Receiver<bytes::Bytes>>,
    ) -> Response<ProxyBody> {
        let (parts, body) = resp.into_parts();
        let encoding = parts
            .headers
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok())
            .and_then(Encoding::parse)
            .unwrap_or(Encoding::Identity);
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
        )
        .with_limits(&conn.budget, self.cfg.limits.message_timeout);
        let b = match injected {
            Some(rx) => b.with_injected(rx),
            None => b,
        };
        let mut out = Response::new(http_body_util::BodyExt::boxed_unsync(b));
        *out.status_mut() = parts.status;
        *out.headers_mut() =
            headers::downstream_response_headers(&parts.headers, &correlation_header(cid));
        // A trailers-only answer of the host (its status in the headers).
        crate::grpc::status::add_host_status_details(out.headers_mut(), cid);
        out
    }
}
