//! Peer identity from the client certificate, computed once per connection.
//!
//! Scheme: a SPIFFE ID in a URI SAN, `spiffe://<trust-domain>/tenant/<tenant>/<kind>/<name>`,
//! gives `tenant_id = <tenant>`, `principal_id = <name>` and the peer kind (`client`,
//! `runtime`, `admin`, ...). The trust domain must be the configured one. A certificate with
//! no SPIFFE ID may be mapped by its subject CN or a DNS SAN in `identity.subjects`.
//! Anything else has no usable identity: its calls are refused with `AUTHENTICATION_REQUIRED`.

use crate::config::IdentityConfig;
use http::HeaderValue;
use x509_parser::prelude::*;

/// Who is on the other end of a connection, as verified by mTLS.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub principal_id: String,
    pub tenant_id: String,
    /// `client`, `runtime`, `admin`, or another kind named by the SPIFFE path.
    pub kind: String,
    /// The SPIFFE ID, when the identity came from one.
    pub spiffe_id: Option<String>,
    /// The certificate's subject, for logs.
    pub subject: String,
    /// Header values for the upstream request, built once per connection.
    pub principal_header: HeaderValue,
    pub tenant_header: HeaderValue,
}

/// Letters, digits, `.`, `-`, `_`; 1 to 128 characters.
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl PeerIdentity {
    pub fn new(
        principal_id: &str,
        tenant_id: &str,
        kind: &str,
        spiffe_id: Option<String>,
        subject: String,
    ) -> Option<Self> {
        Some(PeerIdentity {
            principal_header: HeaderValue::from_str(principal_id).ok()?,
            tenant_header: HeaderValue::from_str(tenant_id).ok()?,
            principal_id: principal_id.to_string(),
            tenant_id: tenant_id.to_string(),
            kind: kind.to_string(),
            spiffe_id,
            subject,
        })
    }
}

/// Parses `spiffe://<td>/tenant/<tenant>/<kind>/<name>` for trust domain `td`.
pub fn parse_spiffe(uri: &str, trust_domain: &str) -> Result<(String, String, String), String> {
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("{uri} is not a SPIFFE ID"))?;
    let (td, path) = rest
        .split_once('/')
        .ok_or_else(|| format!("SPIFFE ID {uri} has no path"))?;
    if td != trust_domain {
        return Err(format!(
            "SPIFFE ID {uri} is of trust domain {td:?}, expected {trust_domain:?}"
        ));
    }
    let segs: Vec<&str> = path.split('/').collect();
    match segs.as_slice() {
        ["tenant", tenant, kind, name] if [tenant, kind, name].iter().all(|s| valid_segment(s)) => {
            Ok((tenant.to_string(), kind.to_string(), name.to_string()))
        }
        _ => Err(format!(
            "SPIFFE ID {uri} does not follow spiffe://{trust_domain}/tenant/<tenant>/<kind>/<name>"
        )),
    }
}

/// Computes the identity of the leaf certificate `der`.
pub fn identify(der: &[u8], cfg: &IdentityConfig) -> Result<PeerIdentity, String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("unparsable client certificate: {e}"))?;
    let subject = cert.subject().to_string();
    let mut spiffe = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) if u.starts_with("spiffe://") => spiffe.push(u.to_string()),
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                _ => {}
            }
        }
    }
    if spiffe.len() > 1 {
        return Err(format!(
            "certificate {subject} carries {} SPIFFE IDs; exactly one is allowed",
            spiffe.len()
        ));
    }
    if let Some(id) = spiffe.pop() {
        let (tenant, kind, name) = parse_spiffe(&id, &cfg.trust_domain)?;
        return PeerIdentity::new(&name, &tenant, &kind, Some(id), subject)
            .ok_or_else(|| "identity is not a valid header value".to_string());
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .map(str::to_string);
    for m in &cfg.subjects {
        let hit = match (&m.subject_cn, &m.dns_san) {
            (Some(want), _) => cn.as_deref() == Some(want.as_str()),
            (_, Some(want)) => dns.iter().any(|d| d == want),
            _ => false,
        };
        if hit {
            return PeerIdentity::new(&m.principal, &m.tenant, &m.kind, None, subject)
                .ok_or_else(|| "identity is not a valid header value".to_string());
        }
    }
    Err(format!(
        "certificate {subject} has no SPIFFE ID and matches no identity.subjects mapping"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids() {
        assert_eq!(
            parse_spiffe("spiffe://aesp.local/tenant/acme/client/alice", "aesp.local").unwrap(),
            ("acme".into(), "client".into(), "alice".into())
        );
        assert!(parse_spiffe("spiffe://other/tenant/acme/client/alice", "aesp.local").is_err());
        assert!(parse_spiffe("spiffe://aesp.local/tenant/acme/client", "aesp.local").is_err());
        assert!(parse_spiffe("spiffe://aesp.local/tenant/acme/client/a/b", "aesp.local").is_err());
        assert!(parse_spiffe("spiffe://aesp.local/tenant//client/a", "aesp.local").is_err());
        assert!(parse_spiffe("spiffe://aesp.local/org/acme/client/alice", "aesp.local").is_err());
    }
}
