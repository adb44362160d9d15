//! Methods listed under `passthrough`: authenticated and decided on their headers, then
//! forwarded as they are (body, encoding and trailers untouched) with the sidecar's
//! identity metadata. Unknown methods, and the management port's, are refused here by the
//! same decision.

use super::{ConnInfo, Proxy, correlation_header, headers};
use crate::decision::DecisionInput;
use crate::grid::Route;
use crate::upstream::Class;
use body::{FilterTrailers, ProxyBody};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::Arc;

use super::body;

impl Proxy {
    pub(super) async fn passthrough(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
        route: Route,
        path: String,
        cid: String,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let input = DecisionInput::headers(
            &path,
            route,
            conn.identity(),
            super::authorization(&parts.headers),
            &conn.grants,
            &cid,
        );
        let allowed = match self.pipeline.decide(&input) {
            Ok(a) => a,
            Err(denied) => return self.refuse(denied).await,
        };
        let esc = conn.security_context(&path, &allowed);
        let up = self.upstream_request(
            &parts,
            &allowed,
            &esc,
            &cid,
            FilterTrailers::new(body, headers::filter_request_trailers).boxed_unsync(),
            false,
        );
        match self
            .forward(&allowed, up, Class::Call(&conn.upstream))
            .await
        {
            Ok(resp) => passthrough_response(resp, &cid),
            Err(e) => self.failed(allowed, e).await,
        }
    }
}

/// The host's response as it is, minus what the sidecar owns, plus the correlation id.
fn passthrough_response(resp: Response<Incoming>, cid: &str) -> Response<ProxyBody> {
    let (parts, body) = resp.into_parts();
    let mut out =
        Response::new(FilterTrailers::new(body, headers::filter_response_trailers).boxed_unsync());
    *out.status_mut() = parts.status;
    *out.headers_mut() =
        headers::downstream_response_headers(&parts.headers, &correlation_header(cid));
    out
}
