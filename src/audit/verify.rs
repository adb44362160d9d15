//! The verifier: walks a chain of records (from `audit.redb` or an export) and its
//! checkpoints and names the first fault, with its sequence and its kind. Written from
//! `docs/audit-format.md`; `tests/interop/verify_audit.py` is a second, independent one.

use super::record::{self, GENESIS, canonical, chain_hash, signature_ok};
use crate::proto::aesp::{AuditCheckpoint, AuditEvent};
use ed25519_dalek::VerifyingKey;
use std::collections::{BTreeMap, HashMap};

/// Event types that bring a new signing key into the chain (attribute `public_key`: the raw
/// 32-byte key in hex; the record is signed by that key).
pub const KEY_EVENTS: [&str; 2] = ["AUDIT_KEY_ADDED", "AUDIT_KEY_ROTATED"];

/// What is wrong with a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// A record's fields do not hash to its `hash` (or it does not decode).
    Modified,
    /// The signature is not the named key's signature of the record's hash.
    BadSignature,
    /// The record names a key the chain never introduced (or one not pinned).
    UnknownKey,
    /// Sequences are missing: a record was deleted.
    Gap,
    /// A record is out of place: swapped, moved or duplicated.
    Reordered,
    /// `prev_hash` is not the hash of the record before.
    BrokenLink,
    /// The log ends below a signed checkpoint: its tail was cut.
    TailTruncated,
    /// A checkpoint's signature or head hash does not match the chain.
    BadCheckpoint,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Modified => "modified record",
            FaultKind::BadSignature => "bad signature",
            FaultKind::UnknownKey => "unknown key",
            FaultKind::Gap => "gap (deleted record)",
            FaultKind::Reordered => "reordered record",
            FaultKind::BrokenLink => "broken link",
            FaultKind::TailTruncated => "tail truncated",
            FaultKind::BadCheckpoint => "bad checkpoint",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Fault {
    pub sequence: u64,
    pub kind: FaultKind,
    pub detail: String,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sequence {}: {}: {}",
            self.sequence,
            self.kind.as_str(),
            self.detail
        )
    }
}

/// A chain that verified.
#[derive(Debug, Clone)]
pub struct Summary {
    pub count: u64,
    pub head_sequence: u64,
    pub head_hash: Vec<u8>,
    /// (key id, sequence of the record that introduced it; 0 = pinned).
    pub keys: Vec<(String, u64)>,
    pub checkpoints: usize,
    pub last_checkpoint: Option<u64>,
    /// Whether the keys were given (`--pubkey`) rather than trusted from the chain.
    pub pinned: bool,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OK: {} records (sequence 1..{}), head hash {}",
            self.count,
            self.head_sequence,
            record::hex(&self.head_hash)
        )?;
        write!(f, "\n  keys:")?;
        for (id, at) in &self.keys {
            if *at == 0 {
                write!(f, " {id} (pinned)")?;
            } else {
                write!(f, " {id} (from sequence {at})")?;
            }
        }
        write!(
            f,
            "\n  checkpoints: {}{}",
            self.checkpoints,
            self.last_checkpoint
                .map(|s| format!(", last at sequence {s}"))
                .unwrap_or_default()
        )?;
        if !self.pinned {
            write!(
                f,
                "\n  keys were trusted as the chain introduced them: pin them with --pubkey (the output of `aesp audit pubkey`)"
            )?;
        }
        Ok(())
    }
}

/// Walks a chain record by record.
pub struct ChainVerifier {
    keys: HashMap<String, VerifyingKey>,
    introduced: Vec<(String, u64)>,
    pinned: bool,
    checkpoints: BTreeMap<u64, AuditCheckpoint>,
    expected: u64,
    prev: Vec<u8>,
}

impl ChainVerifier {
    /// `pinned`: the only keys to accept (empty: trust keys as the chain introduces them).
    pub fn new(pinned: &[VerifyingKey], checkpoints: Vec<AuditCheckpoint>) -> ChainVerifier {
        let keys: HashMap<_, _> = pinned.iter().map(|k| (super::key::key_id(k), *k)).collect();
        ChainVerifier {
            introduced: keys.keys().map(|k| (k.clone(), 0)).collect(),
            pinned: !keys.is_empty(),
            keys,
            checkpoints: checkpoints.into_iter().map(|c| (c.sequence, c)).collect(),
            expected: 1,
            prev: GENESIS.to_vec(),
        }
    }

    fn fault(sequence: u64, kind: FaultKind, detail: impl Into<String>) -> Fault {
        Fault {
            sequence,
            kind,
            detail: detail.into(),
        }
    }

    /// The next record; `key` is where the store kept it (`None` for an export line).
    pub fn push(
        &mut self,
        key: Option<u64>,
        event: Result<&AuditEvent, &str>,
    ) -> Result<(), Fault> {
        let at = key.unwrap_or(self.expected);
        let e = event.map_err(|why| {
            Self::fault(
                at,
                FaultKind::Modified,
                format!("the record does not decode: {why}"),
            )
        })?;
        let seq = e.sequence;
        if let Some(k) = key
            && k != seq
        {
            return Err(Self::fault(
                k,
                FaultKind::Reordered,
                format!("the record stored at position {k} carries sequence {seq}"),
            ));
        }
        if seq > self.expected {
            return Err(Self::fault(
                self.expected,
                FaultKind::Gap,
                format!(
                    "sequence {} to {} missing (the next record is {seq})",
                    self.expected,
                    seq - 1
                ),
            ));
        }
        if seq < self.expected {
            return Err(Self::fault(
                seq,
                FaultKind::Reordered,
                format!(
                    "sequence {seq} appears after sequence {}",
                    self.expected - 1
                ),
            ));
        }
        let hash = chain_hash(&e.prev_hash, &canonical(e));
        if hash.as_slice() != e.hash.as_slice() {
            return Err(Self::fault(
                seq,
                FaultKind::Modified,
                "its fields do not hash to its recorded hash",
            ));
        }
        if e.prev_hash != self.prev {
            return Err(Self::fault(
                seq,
                FaultKind::BrokenLink,
                "prev_hash is not the hash of the record before it",
            ));
        }
        if KEY_EVENTS.contains(&e.event_type.as_str()) {
            self.introduce(e)?;
        }
        let Some(k) = self.keys.get(&e.key_id) else {
            return Err(Self::fault(
                seq,
                FaultKind::UnknownKey,
                format!(
                    "signed with key {:?}, which the chain never introduced{}",
                    e.key_id,
                    if self.pinned {
                        " and which is not pinned"
                    } else {
                        ""
                    }
                ),
            ));
        };
        if !signature_ok(k, &e.hash, &e.signature) {
            return Err(Self::fault(
                seq,
                FaultKind::BadSignature,
                format!("the signature is not {}'s", e.key_id),
            ));
        }
        if let Some(c) = self.checkpoints.get(&seq)
            && c.head_hash != e.hash
        {
            return Err(Self::fault(
                seq,
                FaultKind::BadCheckpoint,
                "the checkpoint signed at this sequence names another hash: the chain was rewritten from here",
            ));
        }
        self.prev = e.hash.clone();
        self.expected += 1;
        Ok(())
    }

    fn introduce(&mut self, e: &AuditEvent) -> Result<(), Fault> {
        let seq = e.sequence;
        let raw = e
            .attributes
            .get("public_key")
            .and_then(|h| record::unhex(h))
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .and_then(|b| VerifyingKey::from_bytes(&b).ok())
            .ok_or_else(|| {
                Self::fault(
                    seq,
                    FaultKind::Modified,
                    "a key record without a valid public_key",
                )
            })?;
        let id = super::key::key_id(&raw);
        if id != e.key_id {
            return Err(Self::fault(
                seq,
                FaultKind::Modified,
                "a key record must be signed by the key it introduces",
            ));
        }
        if self.pinned && !self.keys.contains_key(&id) {
            return Err(Self::fault(
                seq,
                FaultKind::UnknownKey,
                format!("the chain introduces key {id}, which is not pinned"),
            ));
        }
        if !self.keys.contains_key(&id) {
            self.introduced.push((id.clone(), seq));
            self.keys.insert(id, raw);
        }
        Ok(())
    }

    /// After the last record: every checkpoint must be signed by a known key and lie within
    /// the chain.
    pub fn finish(self) -> Result<Summary, Fault> {
        let head = self.expected - 1;
        for c in self.checkpoints.values() {
            let Some(k) = self.keys.get(&c.key_id) else {
                return Err(Self::fault(
                    c.sequence,
                    FaultKind::UnknownKey,
                    format!("checkpoint signed with unknown key {:?}", c.key_id),
                ));
            };
            if !signature_ok(k, &record::checkpoint_bytes(c), &c.signature) {
                return Err(Self::fault(
                    c.sequence,
                    FaultKind::BadCheckpoint,
                    "the checkpoint's signature does not verify",
                ));
            }
            if c.sequence > head {
                return Err(Self::fault(
                    head + 1,
                    FaultKind::TailTruncated,
                    format!(
                        "a checkpoint was signed at sequence {} but the log ends at {head}",
                        c.sequence
                    ),
                ));
            }
        }
        Ok(Summary {
            count: head,
            head_sequence: head,
            head_hash: if head == 0 { Vec::new() } else { self.prev },
            keys: self.introduced,
            checkpoints: self.checkpoints.len(),
            last_checkpoint: self.checkpoints.keys().next_back().copied(),
            pinned: self.pinned,
        })
    }
}
