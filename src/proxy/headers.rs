//! Request and response metadata: what is stripped, what is set, the correlation id.

use crate::grpc::frame::Encoding;
use http::{HeaderMap, HeaderName, HeaderValue};

pub const X_AESP_PRINCIPAL: HeaderName = HeaderName::from_static("x-aesp-principal");
pub const X_AESP_TENANT: HeaderName = HeaderName::from_static("x-aesp-tenant");
pub const AESP_SECURITY_CONTEXT_BIN: HeaderName =
    HeaderName::from_static("aesp-security-context-bin");
pub const X_AESP_CORRELATION_ID: HeaderName = HeaderName::from_static("x-aesp-correlation-id");
const GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");
const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");

pub const X_AESP_PEER_KIND: HeaderName = HeaderName::from_static("x-aesp-peer-kind");

/// Identity metadata the sidecar owns: every copy a peer sends is dropped, in headers and in
/// trailers, in either direction, `-bin` or not. The whole `x-aesp-` and `aesp-` namespaces
/// are reserved, not just the names the sidecar sets, and so are their spellings with
/// underscores (`x_aesp_`), which some proxies and frameworks treat as the same name.
pub fn is_reserved(name: &HeaderName) -> bool {
    // HTTP/2 header names are lowercase.
    let n = name.as_str().as_bytes();
    let starts = |prefix: &[u8]| {
        n.len() >= prefix.len()
            && n.iter()
                .zip(prefix)
                .all(|(a, b)| a == b || (*a == b'_' && *b == b'-'))
    };
    starts(b"x-aesp-") || starts(b"aesp-")
}

/// Credentials the sidecar consumes and never forwards to the host: the caller's token, and
/// a client-certificate header that only a trusted front proxy may set.
fn is_credential(name: &HeaderName) -> bool {
    *name == http::header::AUTHORIZATION || name.as_str() == "x-forwarded-client-cert"
}

/// Request trailers on their way to the host: without what the sidecar owns or consumes.
pub fn filter_request_trailers(t: &mut HeaderMap) {
    retain(t, |n| {
        !is_reserved(n) && !is_credential(n) && !is_hop_by_hop(n)
    });
}

/// Response trailers on their way to the peer: without what the sidecar owns.
pub fn filter_response_trailers(t: &mut HeaderMap) {
    retain(t, |n| !is_reserved(n) && !is_hop_by_hop(n));
}

fn retain(t: &mut HeaderMap, keep: impl Fn(&HeaderName) -> bool) {
    if t.keys().all(&keep) {
        return;
    }
    let old = std::mem::take(t);
    let mut name = None;
    for (n, v) in old {
        if let Some(n) = n {
            name = Some(n);
        }
        if let Some(n) = &name
            && keep(n)
        {
            t.append(n.clone(), v);
        }
    }
}

/// Connection-specific headers that never cross a proxy (RFC 9113 §8.2.2), plus those the
/// sidecar sets itself.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "host"
            | "content-length"
    )
}

/// A client correlation id is used only if it is 1–128 visible ASCII characters.
pub fn valid_correlation_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

pub fn new_correlation_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The client's correlation id from the request headers, if usable.
pub fn inbound_correlation_id(h: &HeaderMap) -> Option<String> {
    h.get(&X_AESP_CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| valid_correlation_id(s))
        .map(str::to_string)
}

/// The encodings of `grpc-accept-encoding` the sidecar can also read, so the host never
/// answers in a form the sidecar could not inspect.
fn filtered_accept_encoding(h: &HeaderMap) -> Option<HeaderValue> {
    let v = h.get(&GRPC_ACCEPT_ENCODING)?.to_str().ok()?;
    let kept: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|e| Encoding::parse(e).is_some() && !e.is_empty())
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(",")).ok()
}

/// The identity metadata set on every upstream request.
pub struct IdentityHeaders {
    pub principal: HeaderValue,
    pub tenant: HeaderValue,
    pub peer_kind: HeaderValue,
    pub security_context_bin: HeaderValue,
    pub correlation_id: HeaderValue,
}

/// Headers for the upstream request: the client's own metadata, minus hop-by-hop, reserved
/// and credential ones, plus `te: trailers` and the sidecar's identity metadata.
///
/// For an `inspected` call, `grpc-encoding` is dropped (the sidecar forwards inspected
/// request messages uncompressed) and `grpc-accept-encoding` is narrowed to what the sidecar
/// can read; a pass-through call keeps both as they are.
pub fn upstream_request_headers(
    inbound: &HeaderMap,
    id: IdentityHeaders,
    inspected: bool,
) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(inbound.len() + 5);
    for (name, value) in inbound {
        if is_hop_by_hop(name)
            || is_reserved(name)
            || is_credential(name)
            || (inspected && (*name == GRPC_ACCEPT_ENCODING || *name == GRPC_ENCODING))
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out.insert(http::header::TE, HeaderValue::from_static("trailers"));
    if inspected && let Some(v) = filtered_accept_encoding(inbound) {
        out.insert(GRPC_ACCEPT_ENCODING, v);
    }
    out.insert(X_AESP_PRINCIPAL, id.principal);
    out.insert(X_AESP_TENANT, id.tenant);
    out.insert(X_AESP_PEER_KIND, id.peer_kind);
    // Values that change with every call are sent as never-indexed literals: indexing them
    // would only churn both HPACK tables.
    let mut esc = id.security_context_bin;
    esc.set_sensitive(true);
    out.insert(AESP_SECURITY_CONTEXT_BIN, esc);
    let mut cid = id.correlation_id;
    cid.set_sensitive(true);
    out.insert(X_AESP_CORRELATION_ID, cid);
    out
}

/// Headers for the downstream response: the host's, minus hop-by-hop ones, plus the
/// correlation id.
pub fn downstream_response_headers(
    upstream: &HeaderMap,
    correlation_id: &HeaderValue,
) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(upstream.len() + 1);
    for (name, value) in upstream {
        if is_hop_by_hop(name) || is_reserved(name) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    let mut cid = correlation_id.clone();
    cid.set_sensitive(true);
    out.insert(X_AESP_CORRELATION_ID, cid);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_headers_are_stripped_and_identity_set() {
        let mut h = HeaderMap::new();
        h.insert("x-aesp-principal", HeaderValue::from_static("mallory"));
        h.insert(
            "aesp-security-context-bin",
            HeaderValue::from_static("AAAA"),
        );
        h.insert("x-aesp-principal-bin", HeaderValue::from_static("AAAA"));
        h.insert("x-custom", HeaderValue::from_static("keep"));
        h.insert("x_aesp_tenant", HeaderValue::from_static("globex"));
        h.insert(
            "aesp_security_context-bin",
            HeaderValue::from_static("AAAA"),
        );
        h.insert("authorization", HeaderValue::from_static("Bearer secret"));
        h.insert(
            "x-forwarded-client-cert",
            HeaderValue::from_static("Hash=1"),
        );
        h.insert("connection", HeaderValue::from_static("close"));
        h.insert(
            "grpc-accept-encoding",
            HeaderValue::from_static("snappy, gzip,identity"),
        );
        let out = upstream_request_headers(
            &h,
            IdentityHeaders {
                principal: HeaderValue::from_static("alice"),
                tenant: HeaderValue::from_static("acme"),
                peer_kind: HeaderValue::from_static("client"),
                security_context_bin: HeaderValue::from_static("CgVhbGljZQ"),
                correlation_id: HeaderValue::from_static("c1"),
            },
            true,
        );
        assert_eq!(
            out.get_all("x-aesp-principal").iter().collect::<Vec<_>>(),
            vec!["alice"]
        );
        assert!(out.get("x-aesp-principal-bin").is_none());
        for gone in [
            "x_aesp_tenant",
            "aesp_security_context-bin",
            "authorization",
            "x-forwarded-client-cert",
        ] {
            assert!(out.get(gone).is_none(), "{gone}");
        }
        assert_eq!(out["x-aesp-peer-kind"], "client");
        assert_eq!(out["aesp-security-context-bin"], "CgVhbGljZQ");
        assert_eq!(out["x-custom"], "keep");
        assert!(out.get("connection").is_none());
        assert_eq!(out["te"], "trailers");
        assert_eq!(out["grpc-accept-encoding"], "gzip,identity");
        assert!(out.get("grpc-encoding").is_none());
    }

    #[test]
    fn trailers_lose_what_the_sidecar_owns_in_both_directions() {
        let mut t = HeaderMap::new();
        for (n, v) in [
            ("grpc-status", "0"),
            ("x-aesp-tenant", "globex"),
            ("x_aesp_principal", "mallory"),
            ("aesp-security-context-bin", "AAAA"),
            ("authorization", "Bearer t"),
            ("x-forwarded-client-cert", "By=x"),
            ("x-app", "1"),
        ] {
            t.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        t.append("x-app", HeaderValue::from_static("2"));
        let mut req = t.clone();
        filter_request_trailers(&mut req);
        let names: Vec<_> = req.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["grpc-status", "x-app"]);
        assert_eq!(req.get_all("x-app").iter().count(), 2);
        let mut resp = t;
        filter_response_trailers(&mut resp);
        let mut names: Vec<_> = resp.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "authorization",
                "grpc-status",
                "x-app",
                "x-forwarded-client-cert"
            ]
        );
    }

    #[test]
    fn the_reserved_namespace_covers_dashes_and_underscores_only_as_a_prefix() {
        for (n, reserved) in [
            ("x-aesp-anything", true),
            ("x_aesp_anything", true),
            ("x-aesp_mixed", true),
            ("aesp-x", true),
            ("aesp_x", true),
            ("x-aespx", false),
            ("my-x-aesp-thing", false),
            ("aesp", false),
        ] {
            assert_eq!(is_reserved(&HeaderName::from_static(n)), reserved, "{n}");
        }
    }

    #[test]
    fn correlation_ids_are_validated() {
        assert!(valid_correlation_id("abc-123"));
        assert!(!valid_correlation_id(""));
        assert!(!valid_correlation_id("has space"));
        assert!(!valid_correlation_id(&"x".repeat(129)));
    }
}
