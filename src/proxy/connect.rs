//! `GridRuntime/Connect`: the runtime's bidirectional stream. Decided on its headers, then
//! both directions are intercepted message by message, never buffered ([`super::hooks`]).
//! A refused runtime message ends the stream with the error to the runtime and resets the
//! host's side.

use super::hooks::{Conversation, HostHook, RuntimeHook};
use super::{ConnInfo, Proxy, body, denial_response};
use crate::decision::{DecisionInput, Facts, Stage};
use crate::grid::upgrade::ErrorPatch;
use crate::grid::{GridMethod, Route};
use crate::grpc::frame::Encoding;
use crate::upstream::Class;
use body::{InterceptBody, ProxyBody, Side};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::Arc;

impl Proxy {
    pub(super) async fn connect(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
        cid: String,
        encoding: Encoding,
    ) -> Response<ProxyBody> {
        let method = GridMethod::Connect;
        let (parts, body) = req.into_parts();
        let allowed = match self.pipeline.decide(&DecisionInput::headers(
            method.path(),
            Route::Grid(method),
            conn.identity(),
            super::authorization(&parts.headers),
            &conn.grants,
            &cid,
        )) {
            Ok(a) => a,
            Err(denied) => return self.refuse(denied).await,
        };
        let esc = conn.security_context(method.path(), &allowed);
        let (abort_tx, mut abort_rx) = tokio::sync::oneshot::channel();
        let conversation = Arc::new(Conversation::default());
        let (to_host, inject_rx) = tokio::sync::mpsc::channel(body::INJECT_QUEUE);
        let (to_runtime, to_runtime_rx) = tokio::sync::mpsc::channel(body::INJECT_QUEUE);
        let hook = RuntimeHook {
            proxy: self.clone(),
            conn: conn.clone(),
            correlation_id: cid.clone(),
            authorization: parts.headers.get(http::header::AUTHORIZATION).cloned(),
            announced: false,
            refused_announce: None,
            runtime_id: String::new(),
            conversation: conversation.clone(),
            to_runtime,
        };
        let req_body = InterceptBody::new(
            body,
            hook,
            Side::Request {
                abort: Some(abort_tx),
            },
            encoding,
            self.cfg.limits.max_message_bytes,
        )
        .with_limits(&conn.budget, self.cfg.limits.message_timeout)
        .with_injected(inject_rx);
        let up = self.upstream_request(&parts, &allowed, &esc, &cid, req_body.boxed_unsync(), true);
        match self.forward(&allowed, up, Class::RuntimeStream).await {
            Ok(resp) => {
                let hook = HostHook {
                    recorder: self.recorder.clone(),
                    facts: Facts {
                        stage: Stage::Response,
                        ..allowed.facts
                    },
                    patch: ErrorPatch::new(&cid),
                    governance: self.pipeline.governance.clone(),
                    tenant: allowed.identity.tenant_id.clone(),
                    conversation,
                    sessions: self.pipeline.sessions.clone(),
                    to_host,
                };
                self.intercepted_response(
                    &conn,
                    resp,
                    &cid,
                    hook,
                    Some(abort_rx),
                    Some(to_runtime_rx),
                )
            }
            Err(e) => match abort_rx.try_recv() {
                // The runtime's side refused (and its hook recorded) before the host answered.
                Ok(denial) => denial_response(&denial, &cid),
                Err(_) => self.failed(allowed, e).await,
            },
        }
    }
}
