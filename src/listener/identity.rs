//! Peer identity from the client certificate, computed once per connection.
//!
//! Scheme: a SPIFFE ID in a URI SAN, `spiffe://<trust-domain>/tenant/<tenant>/<kind>/<name>`,
//! gives `tenant_id = <tenant>`, `principal_id = <name>` and the peer kind (`client`,
//! `runtime`, `admin`, ...). The trust domain must be the configured one. A certificate with
//! no SPIFFE ID may be mapped by its subject CN or a DNS SAN ([`SubjectMapping`]).
//! Anything else has no usable identity: its calls are refused with `AUTHENTICATION_REQUIRED`
//! and the [`IdentityError`] says why.
//!
//! This module takes plain values (the trust domain, the mappings), never the config: the
//! config validates its section into these types and hands them over.

use crate::ids::{PeerKind, PrincipalId, TenantId};
use http::HeaderValue;
use x509_parser::prelude::*;

/// Who is on the other end of a connection, as verified by mTLS.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub principal_id: PrincipalId,
    pub tenant_id: TenantId,
    pub kind: PeerKind,
    /// The SPIFFE ID, when the identity came from one.
    pub spiffe_id: Option<String>,
    /// The certificate's subject, for logs.
    pub subject: String,
    /// The end of the certificate's validity (Unix seconds), when known: a connection (or a
    /// resumed TLS session) is not served under this identity after it.
    pub not_after: Option<i64>,
    /// Header values for the upstream request, built once per connection.
    pub principal_header: HeaderValue,
    pub tenant_header: HeaderValue,
    pub kind_header: HeaderValue,
}

impl PeerIdentity {
    pub fn new(
        principal_id: PrincipalId,
        tenant_id: TenantId,
        kind: PeerKind,
        spiffe_id: Option<String>,
        subject: String,
    ) -> PeerIdentity {
        // Valid ids are visible ASCII, so they are always valid header values.
        let header = |s: &str| {
            HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
        };
        PeerIdentity {
            principal_header: header(principal_id.as_str()),
            tenant_header: header(tenant_id.as_str()),
            kind_header: header(kind.as_str()),
            principal_id,
            tenant_id,
            kind,
            spiffe_id,
            subject,
            not_after: None,
        }
    }
}

/// Maps a certificate without a SPIFFE ID to an identity.
#[derive(Debug, Clone)]
pub struct SubjectMapping {
    pub by: SubjectMatch,
    pub principal: PrincipalId,
    pub tenant: TenantId,
    pub kind: PeerKind,
}

/// What a [`SubjectMapping`] matches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectMatch {
    /// The subject's common name, exactly.
    CommonName(String),
    /// One of the DNS SANs, exactly.
    DnsSan(String),
}

/// The three segments of a SPIFFE ID of this scheme, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffePath {
    pub tenant: TenantId,
    pub kind: PeerKind,
    pub name: PrincipalId,
}

/// Why a SPIFFE ID was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("{uri} is not a SPIFFE ID (the scheme must be spiffe://, in lowercase)")]
    NotSpiffe { uri: String },
    #[error("SPIFFE ID {uri} has no path")]
    NoPath { uri: String },
    #[error("SPIFFE ID {uri} is of trust domain {found:?}, expected {expected:?}")]
    TrustDomain {
        uri: String,
        found: String,
        expected: String,
    },
    #[error(
        "SPIFFE ID {uri} does not follow spiffe://{trust_domain}/tenant/<tenant>/<kind>/<name>"
    )]
    Shape { uri: String, trust_domain: String },
}

/// Why a connection has no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no client certificate")]
    NoCertificate,
    #[error("unparsable client certificate: {0}")]
    Unparsable(String),
    #[error(
        "certificate {subject} carries a SPIFFE ID among {count} URI SANs; an X.509-SVID has exactly one URI SAN"
    )]
    SeveralUris { subject: String, count: usize },
    #[error("certificate {subject} expired at {not_after} (Unix time)")]
    Expired { subject: String, not_after: i64 },
    #[error("peer kind {kind:?} is not one of identity.peer_kinds")]
    KindNotAllowed { kind: String },
    #[error(transparent)]
    Spiffe(#[from] SpiffeError),
    #[error("certificate {subject} has no SPIFFE ID and matches no identity.subjects mapping")]
    Unmapped { subject: String },
}

/// Parses `spiffe://<td>/tenant/<tenant>/<kind>/<name>` for trust domain `trust_domain`.
pub fn parse_spiffe(uri: &str, trust_domain: &str) -> Result<SpiffePath, SpiffeError> {
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| SpiffeError::NotSpiffe { uri: uri.into() })?;
    let (td, path) = rest
        .split_once('/')
        .ok_or_else(|| SpiffeError::NoPath { uri: uri.into() })?;
    if td != trust_domain {
        return Err(SpiffeError::TrustDomain {
            uri: uri.into(),
            found: td.into(),
            expected: trust_domain.into(),
        });
    }
    let shape = || SpiffeError::Shape {
        uri: uri.into(),
        trust_domain: trust_domain.into(),
    };
    let segs: Vec<&str> = path.split('/').collect();
    match segs.as_slice() {
        ["tenant", tenant, kind, name] => Ok(SpiffePath {
            tenant: TenantId::new(tenant).ok_or_else(shape)?,
            kind: PeerKind::new(kind).ok_or_else(shape)?,
            name: PrincipalId::new(name).ok_or_else(shape)?,
        }),
        _ => Err(shape()),
    }
}

/// What makes a certificate an identity: the trust domain of SPIFFE IDs, the mappings of
/// certificates without one, and the peer kinds accepted.
#[derive(Debug, Clone, Copy)]
pub struct IdentityRules<'a> {
    pub trust_domain: &'a str,
    pub subjects: &'a [SubjectMapping],
    pub peer_kinds: &'a [PeerKind],
}

/// Computes the identity of the leaf certificate `der` at time `now` (Unix seconds).
///
/// X.509-SVID rules: a certificate with a URI SAN whose scheme is `spiffe` (in any case)
/// must have exactly one URI SAN, and it must parse as a SPIFFE ID of this scheme; nothing
/// else about it is looked at (no fallback to the subject mappings).
pub fn identify(
    der: &[u8],
    rules: IdentityRules<'_>,
    now: i64,
) -> Result<PeerIdentity, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let subject = cert.subject().to_string();
    let not_after = cert.validity().not_after.timestamp();
    if now > not_after {
        // A full handshake refuses an expired certificate; a resumed session does not.
        return Err(IdentityError::Expired { subject, not_after });
    }
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push(u.to_string()),
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                _ => {}
            }
        }
    }
    let is_spiffe = |u: &String| {
        u.split_once(':')
            .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("spiffe"))
    };
    let mut id = if uris.iter().any(is_spiffe) {
        if uris.len() != 1 {
            return Err(IdentityError::SeveralUris {
                subject,
                count: uris.len(),
            });
        }
        let uri = uris.swap_remove(0);
        let p = parse_spiffe(&uri, rules.trust_domain)?;
        PeerIdentity::new(p.name, p.tenant, p.kind, Some(uri), subject)
    } else {
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok());
        let m = rules
            .subjects
            .iter()
            .find(|m| match &m.by {
                SubjectMatch::CommonName(want) => cn == Some(want.as_str()),
                SubjectMatch::DnsSan(want) => dns.iter().any(|d| d == want),
            })
            .ok_or_else(|| IdentityError::Unmapped {
                subject: subject.clone(),
            })?;
        PeerIdentity::new(
            m.principal.clone(),
            m.tenant.clone(),
            m.kind.clone(),
            None,
            subject,
        )
    };
    if !rules.peer_kinds.contains(&id.kind) {
        return Err(IdentityError::KindNotAllowed {
            kind: id.kind.to_string(),
        });
    }
    id.not_after = Some(not_after);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_of_the_scheme_parse_into_named_segments_and_others_say_why_not() {
        let p = parse_spiffe("spiffe://aesp.local/tenant/acme/client/alice", "aesp.local").unwrap();
        assert_eq!(p.tenant.as_str(), "acme");
        assert_eq!(p.kind, PeerKind::Client);
        assert_eq!(p.name.as_str(), "alice");
        for (uri, want) in [
            (
                "http://aesp.local/tenant/acme/client/alice",
                "not a SPIFFE ID",
            ),
            ("spiffe://aesp.local", "has no path"),
            ("spiffe://other/tenant/acme/client/alice", "trust domain"),
            ("spiffe://aesp.local/tenant/acme/client", "does not follow"),
            (
                "spiffe://aesp.local/tenant/acme/client/a/b",
                "does not follow",
            ),
            ("spiffe://aesp.local/tenant//client/a", "does not follow"),
            (
                "spiffe://aesp.local/org/acme/client/alice",
                "does not follow",
            ),
            (
                "spiffe://aesp.local/tenant/ac me/client/alice",
                "does not follow",
            ),
        ] {
            let e = parse_spiffe(uri, "aesp.local").unwrap_err();
            assert!(e.to_string().contains(want), "{uri}: {e}");
        }
    }
}
