//! The bytes that are hashed and signed, exactly as `docs/audit-format.md` writes them down.
//! Change nothing here without changing the document (and its version tag): third parties
//! verify exports from the document alone.

use crate::proto::aesp::{AuditCheckpoint, AuditEvent};
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

/// Domain tag of a record's canonical bytes.
pub const RECORD_TAG: &[u8] = b"AESP-AUDIT-RECORD-1\0";
/// Domain tag of a checkpoint's signed bytes.
pub const CHECKPOINT_TAG: &[u8] = b"AESP-AUDIT-CHECKPOINT-1\0";
/// Domain tag of a compliance report's signed bytes.
pub const REPORT_TAG: &[u8] = b"AESP-AUDIT-REPORT-1\0";
/// `prev_hash` of the first record.
pub const GENESIS: [u8; 32] = [0; 32];

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_map<'a>(out: &mut Vec<u8>, map: impl Iterator<Item = (&'a String, &'a String)>) {
    let mut pairs: Vec<_> = map.collect();
    pairs.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out.extend_from_slice(&(pairs.len() as u32).to_be_bytes());
    for (k, v) in pairs {
        put_str(out, k);
        put_str(out, v);
    }
}

/// The canonical bytes of a record: every field but `prev_hash`, `hash` and `signature`, in
/// a fixed order, strings length-prefixed, attributes sorted by key.
pub fn canonical(e: &AuditEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(RECORD_TAG);
    out.extend_from_slice(&e.sequence.to_be_bytes());
    out.extend_from_slice(&e.timestamp_unix_nanos.to_be_bytes());
    for s in [
        &e.event_type,
        &e.decision,
        &e.principal_id,
        &e.tenant_id,
        &e.method,
        &e.tool_name,
        &e.session_id,
        &e.correlation_id,
        &e.invocation_id,
        &e.reason_code,
    ] {
        put_str(&mut out, s);
    }
    out.extend_from_slice(&(e.matched_policies.len() as u32).to_be_bytes());
    for p in &e.matched_policies {
        put_str(&mut out, p);
    }
    put_map(&mut out, e.attributes.iter());
    put_str(&mut out, &e.key_id);
    out
}

/// `SHA-256(prev_hash || canonical)`.
pub fn chain_hash(prev: &[u8], canonical: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical);
    h.finalize().into()
}

/// What signs: the writer's key (aws-lc's Ed25519, about twice as fast as ed25519-dalek
/// on this machine) or any ed25519-dalek key (tests, tamper drills). Ed25519 signatures are
/// deterministic: both give the same bytes for the same key and message.
pub trait Sign {
    fn sign64(&self, msg: &[u8]) -> Vec<u8>;
}

impl Sign for SigningKey {
    fn sign64(&self, msg: &[u8]) -> Vec<u8> {
        self.sign(msg).to_bytes().to_vec()
    }
}

impl Sign for aws_lc_rs::signature::Ed25519KeyPair {
    fn sign64(&self, msg: &[u8]) -> Vec<u8> {
        self.sign(msg).as_ref().to_vec()
    }
}

/// Fills `prev_hash`, `hash` and `signature` of `e` (whose `key_id` is already `key`'s).
pub fn seal(e: &mut AuditEvent, prev: [u8; 32], key: &impl Sign) {
    link(e, prev);
    sign(e, key);
}

/// Fills `prev_hash` and `hash` of `e`; returns the hash (the next record's `prev_hash`).
pub fn link(e: &mut AuditEvent, prev: [u8; 32]) -> [u8; 32] {
    let hash = chain_hash(&prev, &canonical(e));
    e.prev_hash = prev.to_vec();
    e.hash = hash.to_vec();
    hash
}

/// Fills `signature` of a linked `e`.
pub fn sign(e: &mut AuditEvent, key: &impl Sign) {
    e.signature = key.sign64(&e.hash);
}

/// The signed bytes of a checkpoint.
pub fn checkpoint_bytes(c: &AuditCheckpoint) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.extend_from_slice(CHECKPOINT_TAG);
    out.extend_from_slice(&c.sequence.to_be_bytes());
    put_bytes(&mut out, &c.head_hash);
    out.extend_from_slice(&c.timestamp_unix_nanos.to_be_bytes());
    put_str(&mut out, &c.key_id);
    out
}

/// A signed checkpoint of the chain at `sequence` whose record hash is `head`.
pub fn checkpoint(
    sequence: u64,
    head: &[u8],
    now: u64,
    key_id: &str,
    key: &impl Sign,
) -> AuditCheckpoint {
    let mut c = AuditCheckpoint {
        sequence,
        head_hash: head.to_vec(),
        timestamp_unix_nanos: now,
        key_id: key_id.to_string(),
        signature: Vec::new(),
    };
    c.signature = key.sign64(&checkpoint_bytes(&c));
    c
}

fn put_counts(out: &mut Vec<u8>, m: &std::collections::HashMap<String, u64>) {
    let mut pairs: Vec<_> = m.iter().collect();
    pairs.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out.extend_from_slice(&(pairs.len() as u32).to_be_bytes());
    for (k, v) in pairs {
        put_str(out, k);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// The signed bytes of a compliance report: every field but `report_signature`.
pub fn report_bytes(r: &crate::proto::aesp::ComplianceReport) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(REPORT_TAG);
    put_str(&mut out, &r.tenant_id);
    out.extend_from_slice(&r.since_unix_nanos.to_be_bytes());
    out.extend_from_slice(&r.until_unix_nanos.to_be_bytes());
    out.extend_from_slice(&r.total_events.to_be_bytes());
    put_counts(&mut out, &r.events_by_type);
    put_counts(&mut out, &r.events_by_decision);
    put_counts(&mut out, &r.denials_by_reason);
    out.push(u8::from(r.chain_verified));
    out.extend_from_slice(&r.first_sequence.to_be_bytes());
    out.extend_from_slice(&r.last_sequence.to_be_bytes());
    put_bytes(&mut out, &r.head_hash);
    out.extend_from_slice(&(r.findings.len() as u32).to_be_bytes());
    for f in &r.findings {
        put_str(&mut out, f);
    }
    put_str(&mut out, &r.key_id);
    out.extend_from_slice(&r.generated_at_unix_nanos.to_be_bytes());
    out
}

/// Whether `sig` is `key`'s Ed25519 signature of `msg`.
pub fn signature_ok(key: &VerifyingKey, msg: &[u8], sig: &[u8]) -> bool {
    let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else {
        return false;
    };
    key.verify(msg, &sig).is_ok()
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

/// Parses lower- or upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of docs/audit-format.md: same key, same record, same bytes.
    pub(crate) fn example() -> (SigningKey, AuditEvent) {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let mut e = AuditEvent {
            sequence: 1,
            timestamp_unix_nanos: 1_764_700_000_000_000_000,
            event_type: "TOOL_INVOCATION".into(),
            decision: "DENY".into(),
            principal_id: "alice".into(),
            tenant_id: "acme".into(),
            method: "/altar.grid.v1.GridHost/ExecuteTool".into(),
            tool_name: "billing_refund".into(),
            session_id: "s-1".into(),
            correlation_id: "c-1".into(),
            reason_code: "AUTHORIZATION_DENIED".into(),
            key_id: super::super::key::key_id(&key.verifying_key()),
            ..Default::default()
        };
        e.attributes.insert("stage".into(), "call".into());
        e.attributes.insert("peer_kind".into(), "client".into());
        (key, e)
    }

    #[test]
    fn the_documented_example_hashes_and_signs_as_written() {
        let (key, mut e) = example();
        let c = canonical(&e);
        assert!(c.starts_with(RECORD_TAG));
        // Attributes sorted by key: peer_kind before stage.
        let text = String::from_utf8_lossy(&c);
        assert!(text.find("peer_kind").unwrap() < text.find("stage").unwrap());
        seal(&mut e, GENESIS, &key);
        assert_eq!(e.hash, chain_hash(&GENESIS, &c).to_vec());
        assert!(signature_ok(&key.verifying_key(), &e.hash, &e.signature));
        // Any change of a field changes the hash.
        let mut f = e.clone();
        f.principal_id = "mallory".into();
        assert_ne!(chain_hash(&GENESIS, &canonical(&f)).to_vec(), e.hash);
        // The values printed in docs/audit-format.md.
        println!(
            "key_id {}\npublic {}\ncanonical {}\nhash {}\nsignature {}",
            e.key_id,
            hex(key.verifying_key().as_bytes()),
            hex(&c),
            hex(&e.hash),
            hex(&e.signature)
        );
        assert_eq!(
            hex(&e.hash),
            "a89a4478306f2afda520916ec4947502832684d02a4418e3ec0bd2df31262c00"
        );
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])),
            Some(vec![0, 1, 0xab, 0xff])
        );
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }
}
