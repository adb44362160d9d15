//! Certificate identity: `listener::identity::identify` (the peer identity of a connection,
//! from its leaf certificate) and `parse_spiffe` (one SPIFFE ID of the scheme).
//!
//! The first byte picks the mode:
//! - 0: the rest is DER, arbitrary bytes;
//! - 1: `[td][0xff][uri]`: an arbitrary URI through `parse_spiffe(uri, td)`, compared with a
//!   model of the shape `spiffe://<td>/tenant/<tenant>/<kind>/<name>`;
//! - 2: `[td][0xff][tenant][0xff][kind][0xff][name]`: the URI built from those segments must
//!   parse exactly when every segment is valid (and `td` has no `/`), into those segments;
//! - 3: `[cert][cut][(offset hi, offset lo, xor)…]`: a real certificate of the dev CA
//!   (`demo::certs::Ca`), bytes flipped and optionally cut short;
//! - 4: `[cn?][fields separated by 0xff, each led by a type byte]`: a certificate made with
//!   rcgen carrying those URI and DNS SANs and that CN, whose identity must be what the rules
//!   say (X.509-SVID: a URI SAN of scheme `spiffe` in any case requires exactly one URI SAN,
//!   which must parse; otherwise the first subject mapping that matches; otherwise unmapped;
//!   and the kind must be one of the configured peer kinds).
//!
//! In every mode: no panic; an identity that comes out has a tenant, principal and kind that
//! are valid segments (`ids::valid_segment`), header values equal to them, and a SPIFFE ID
//! (when it came from one) that parses back to the same three.
#![no_main]

use aesp_sidecar::ids::{PeerKind, PrincipalId, TenantId, valid_segment};
use aesp_sidecar::listener::identity::{
    IdentityError, IdentityRules, PeerIdentity, SpiffeError, SubjectMapping, SubjectMatch,
    identify as identify_at, parse_spiffe,
};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const TD: &str = "aesp.local";
/// The peer kinds accepted (the default of `identity.peer_kinds`).
const KINDS: [PeerKind; 3] = [PeerKind::Client, PeerKind::Runtime, PeerKind::Admin];

/// `identify` with the fuzz rules, at a time inside every certificate's validity.
fn identify(
    der: &[u8],
    td: &str,
    subjects: &[SubjectMapping],
) -> Result<PeerIdentity, IdentityError> {
    let rules = IdentityRules {
        trust_domain: td,
        subjects,
        peer_kinds: &KINDS,
    };
    identify_at(der, rules, 1_800_000_000)
}

fn subjects() -> &'static [SubjectMapping] {
    static S: OnceLock<Vec<SubjectMapping>> = OnceLock::new();
    S.get_or_init(|| {
        vec![
            SubjectMapping {
                by: SubjectMatch::CommonName("alice-cn".into()),
                principal: PrincipalId::new("alice").unwrap(),
                tenant: TenantId::new("acme").unwrap(),
                kind: PeerKind::Client,
            },
            SubjectMapping {
                by: SubjectMatch::DnsSan("rt.local".into()),
                principal: PrincipalId::new("rt1").unwrap(),
                tenant: TenantId::new("acme").unwrap(),
                kind: PeerKind::Runtime,
            },
        ]
    })
}

/// Real certificates of the dev CA, as DER: (der, the identity they must give).
fn real_certs() -> &'static [(Vec<u8>, (&'static str, &'static str, &'static str))] {
    static C: OnceLock<Vec<(Vec<u8>, (&'static str, &'static str, &'static str))>> =
        OnceLock::new();
    C.get_or_init(|| {
        let ca = aesp_sidecar::demo::certs::Ca::new("fuzz CA").unwrap();
        let der = |pem: String| {
            let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
            p.contents
        };
        let alice = ca.workload("acme", "client", "alice").unwrap();
        let rt = ca.workload("acme", "runtime", "acme-runtime-1").unwrap();
        let cn = ca.issue("alice-cn", None, &[], &[]).unwrap();
        let dns = ca
            .issue("nobody", None, &["x.local", "rt.local"], &[])
            .unwrap();
        vec![
            (der(alice.cert_pem), ("acme", "alice", "client")),
            (der(rt.cert_pem), ("acme", "acme-runtime-1", "runtime")),
            (der(cn.cert_pem), ("acme", "alice", "client")),
            (der(dns.cert_pem), ("acme", "rt1", "runtime")),
        ]
    })
}

fn key() -> &'static rcgen::KeyPair {
    static K: OnceLock<rcgen::KeyPair> = OnceLock::new();
    K.get_or_init(|| rcgen::KeyPair::generate().unwrap())
}

/// What holds of any identity that comes out.
fn check_identity(id: &PeerIdentity) {
    let (t, p, k) = (
        id.tenant_id.as_str(),
        id.principal_id.as_str(),
        id.kind.as_str(),
    );
    assert!(valid_segment(t), "tenant {t:?}");
    assert!(valid_segment(p), "principal {p:?}");
    assert!(valid_segment(k), "kind {k:?}");
    assert_eq!(id.tenant_header.to_str().ok(), Some(t));
    assert_eq!(id.principal_header.to_str().ok(), Some(p));
    if let Some(s) = &id.spiffe_id {
        let back = parse_spiffe(s, TD).expect("the SPIFFE ID of an identity parses");
        assert_eq!(
            (back.tenant.as_str(), back.name.as_str(), back.kind.as_str()),
            (t, p, k)
        );
    }
}

fn check_result(r: &Result<PeerIdentity, IdentityError>) {
    match r {
        Ok(id) => check_identity(id),
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// The model of the scheme: `Some((tenant, kind, name))` exactly for
/// `spiffe://<td>/tenant/<tenant>/<kind>/<name>` with valid segments.
fn model(uri: &str, td: &str) -> Option<(String, String, String)> {
    if td.contains('/') {
        return None;
    }
    let rest = uri
        .strip_prefix("spiffe://")?
        .strip_prefix(td)?
        .strip_prefix("/tenant/")?;
    let segs: Vec<&str> = rest.split('/').collect();
    match segs[..] {
        [t, k, n] if valid_segment(t) && valid_segment(k) && valid_segment(n) => {
            Some((t.into(), k.into(), n.into()))
        }
        _ => None,
    }
}

fn check_spiffe(uri: &str, td: &str) {
    let got = parse_spiffe(uri, td);
    let want = model(uri, td);
    match (&got, &want) {
        (Ok(p), Some((t, k, n))) => {
            assert_eq!(
                (p.tenant.as_str(), p.kind.as_str(), p.name.as_str()),
                (t.as_str(), k.as_str(), n.as_str())
            );
            assert_eq!(format!("spiffe://{td}/tenant/{t}/{k}/{n}"), uri);
        }
        (Err(e), None) => {
            // The error says the right thing.
            match e {
                SpiffeError::NotSpiffe { .. } => assert!(!uri.starts_with("spiffe://")),
                SpiffeError::NoPath { .. } => assert!(!uri["spiffe://".len()..].contains('/')),
                SpiffeError::TrustDomain {
                    found, expected, ..
                } => {
                    assert_ne!(found, expected);
                    assert_eq!(expected, td);
                }
                SpiffeError::Shape { .. } => {}
            }
            let _ = e.to_string();
        }
        _ => panic!("parse_spiffe({uri:?}, {td:?}) = {got:?}, the model says {want:?}"),
    }
}

fn fields(data: &[u8]) -> Vec<String> {
    data.split(|b| *b == 0xff)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect()
}

/// Mode 4: builds the certificate, runs `identify`, and compares with the rules.
fn made_certificate(data: &[u8]) {
    let mut parts = data.split(|b| *b == 0xff);
    let cn = parts
        .next()
        .map(|c| String::from_utf8_lossy(c).into_owned());
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    for f in parts.take(8) {
        let Some((&kind, rest)) = f.split_first() else {
            continue;
        };
        let s = String::from_utf8_lossy(rest).into_owned();
        match kind % 4 {
            0 => uris.push(s),
            1 => uris.push(format!("spiffe://{s}")),
            2 => uris.push(format!("spiffe://{TD}/tenant/{s}")),
            _ => dns.push(s),
        }
    }
    let Ok(mut params) = rcgen::CertificateParams::new(Vec::<String>::new()) else {
        return;
    };
    if let Some(cn) = cn.as_deref().filter(|c| !c.is_empty()) {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
    }
    for u in &uris {
        let Ok(v) = rcgen::string::Ia5String::try_from(u.clone()) else {
            return;
        };
        params.subject_alt_names.push(rcgen::SanType::URI(v));
    }
    for d in &dns {
        let Ok(v) = rcgen::string::Ia5String::try_from(d.clone()) else {
            return;
        };
        params.subject_alt_names.push(rcgen::SanType::DnsName(v));
    }
    let Ok(cert) = params.self_signed(key()) else {
        return;
    };
    let got = identify(cert.der(), TD, subjects());
    check_result(&got);

    // The rules, independently.
    let is_spiffe = |u: &String| {
        u.split_once(':')
            .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("spiffe"))
    };
    let cn = cn.filter(|c| !c.is_empty());
    let kind_ok = |k: &PeerKind| KINDS.contains(k);
    if uris.iter().any(is_spiffe) {
        if uris.len() != 1 {
            match &got {
                Err(IdentityError::SeveralUris { count, .. }) => assert_eq!(*count, uris.len()),
                _ => panic!(
                    "uris {uris:?}: a SPIFFE ID among {} URI SANs, got {got:?}",
                    uris.len()
                ),
            }
            return;
        }
        match (parse_spiffe(&uris[0], TD), &got) {
            (Ok(p), Ok(id)) => {
                assert!(kind_ok(&p.kind));
                assert_eq!(id.principal_id, p.name);
                assert_eq!(id.tenant_id, p.tenant);
                assert_eq!(id.kind, p.kind);
                assert_eq!(id.spiffe_id.as_deref(), Some(uris[0].as_str()));
            }
            (Ok(p), Err(IdentityError::KindNotAllowed { kind })) => {
                assert!(!kind_ok(&p.kind));
                assert_eq!(kind, p.kind.as_str());
            }
            (Err(e), Err(IdentityError::Spiffe(g))) => assert_eq!(&e, g),
            (want, _) => panic!("uris {uris:?}: got {got:?}, parse_spiffe says {want:?}"),
        }
        return;
    }
    let hit = subjects().iter().find(|m| match &m.by {
        SubjectMatch::CommonName(w) => cn.as_deref() == Some(w.as_str()),
        SubjectMatch::DnsSan(w) => dns.iter().any(|d| d == w),
    });
    match (hit, &got) {
        (Some(m), Ok(id)) => {
            assert_eq!(id.principal_id, m.principal);
            assert_eq!(id.tenant_id, m.tenant);
            assert_eq!(id.kind, m.kind);
            assert!(id.spiffe_id.is_none());
        }
        (None, Err(IdentityError::Unmapped { .. })) => {}
        _ => panic!("cn {cn:?} dns {dns:?} uris {uris:?}: got {got:?}, mapping {hit:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 5 {
        0 => check_result(&identify(rest, TD, subjects())),
        1 => {
            let (td, uri) = match rest.iter().position(|b| *b == 0xff) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (TD.as_bytes(), rest),
            };
            check_spiffe(&String::from_utf8_lossy(uri), &String::from_utf8_lossy(td));
        }
        2 => {
            let f = fields(rest);
            let [td, t, k, n] = &f[..] else {
                return;
            };
            let uri = format!("spiffe://{td}/tenant/{t}/{k}/{n}");
            let ok = !td.contains('/') && valid_segment(t) && valid_segment(k) && valid_segment(n);
            match parse_spiffe(&uri, td) {
                Ok(p) => {
                    assert!(ok, "{uri:?} parsed as {p:?}");
                    assert_eq!(
                        (p.tenant.as_str(), p.kind.as_str(), p.name.as_str()),
                        (t.as_str(), k.as_str(), n.as_str())
                    );
                }
                Err(e) => assert!(!ok, "{uri:?} refused: {e}"),
            }
            check_spiffe(&uri, td);
        }
        3 => {
            let certs = real_certs();
            let Some((&which, rest)) = rest.split_first() else {
                return;
            };
            let (der, want) = &certs[which as usize % certs.len()];
            let mut der = der.clone();
            let (cut, flips) = rest.split_first().map_or((0, &[][..]), |(c, f)| (*c, f));
            for f in flips.chunks_exact(3) {
                let at = u16::from_be_bytes([f[0], f[1]]) as usize % der.len();
                der[at] ^= f[2];
            }
            if cut > 0 {
                der.truncate(der.len() * cut as usize / 256);
            }
            let got = identify(&der, TD, subjects());
            check_result(&got);
            if cut == 0 && flips.chunks_exact(3).all(|f| f[2] == 0) {
                let id = got.expect("an untouched dev certificate has an identity");
                assert_eq!(
                    (
                        id.tenant_id.as_str(),
                        id.principal_id.as_str(),
                        id.kind.as_str()
                    ),
                    *want
                );
            }
        }
        _ => made_certificate(rest),
    }
});
