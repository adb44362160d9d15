//! Calls on the management listener: authenticated and decided by the one pipeline (the
//! certificate, the token, a served method), then handed to the in-process
//! `Enterprise*Service` servers ([`crate::admin`]) with the verified caller in the request's
//! extensions. Nothing of them reaches the GRID host.

use super::{ConnInfo, Proxy, body::ProxyBody};
use crate::admin::ManagementCaller;
use crate::decision::DecisionInput;
use crate::grid::Route;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::Arc;
use tower::ServiceExt;

impl Proxy {
    pub(super) async fn management(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
        path: String,
        cid: String,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let allowed = match self.pipeline.decide(&DecisionInput::headers(
            &path,
            Route::Management,
            conn.identity(),
            super::authorization(&parts.headers),
            &conn.grants,
            &cid,
        )) {
            Ok(a) => a,
            Err(denied) => return self.refuse(denied).await,
        };
        let Some(routes) = self.management.clone() else {
            return self
                .refuse(allowed.deny(crate::grpc::Denial::new(
                    crate::grpc::ErrorCode::MethodNotAllowed,
                    "this listener serves no management API",
                )))
                .await;
        };
        if self
            .recorder
            .durable(crate::decision::Decision::from(&allowed))
            .await
            .is_err()
        {
            return self.failed(allowed, super::Failed::Audit).await;
        }
        let (principal, tenant) = allowed.effective();
        let caller = ManagementCaller {
            principal: principal.clone(),
            tenant: tenant.clone(),
            grants: allowed.grants.clone(),
            correlation_id: cid.clone(),
            method: path,
        };
        parts.extensions.insert(caller);
        parts.headers.remove(http::header::AUTHORIZATION);
        let req = Request::from_parts(parts, body);
        let resp = match routes.oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let (mut parts, body) = resp.into_parts();
        if let Ok(v) = http::HeaderValue::from_str(&cid) {
            parts
                .headers
                .insert(super::headers::X_AESP_CORRELATION_ID, v);
        }
        Response::from_parts(parts, body.map_err(Into::into).boxed_unsync())
    }
}
