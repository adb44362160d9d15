//! What `aesp audit verify | export | pubkey` do, offline, on a file: the live `audit.redb`
//! of a running sidecar (opened read-only beside its writer), a copy of it, or an export.

use super::export::{self, Line};
use super::verify::{ChainVerifier, Fault, Summary};
use crate::store::audit::{AuditReader, ReadNotes};
use anyhow::Context;
use ed25519_dalek::VerifyingKey;
use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::Path;

/// The outcome of a verification: the chain verified, or its first fault.
pub type Outcome = Result<Summary, Fault>;

fn pinned(pubkeys: Option<&Path>) -> anyhow::Result<Vec<VerifyingKey>> {
    match pubkeys {
        None => Ok(Vec::new()),
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("--pubkey {}", p.display()))?;
            super::key::parse_public_pems(&text)
                .with_context(|| format!("--pubkey {}", p.display()))
        }
    }
}

/// Verifies `audit.redb` at `db` (and the records of the journal beside it not yet in it).
pub fn verify_db(db: &Path, pubkeys: Option<&Path>) -> anyhow::Result<Outcome> {
    verify_db_noted(db, pubkeys).map(|(o, _)| o)
}

/// `f`'s result, or an error if redb panicked in it: it can, on a file whose pages are
/// damaged (not changed through redb), and a verifier must say so rather than crash.
fn contained<T>(db: &Path, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(anyhow::anyhow!(
            "--db {}: the file is damaged below the records (redb failed reading its pages: \
             {why}); keep it for the investigation",
            db.display()
        ))
    })
}

/// [`verify_db`], and how the file was read.
pub fn verify_db_noted(db: &Path, pubkeys: Option<&Path>) -> anyhow::Result<(Outcome, ReadNotes)> {
    contained(db, || verify_db_inner(db, pubkeys))
}

fn verify_db_inner(db: &Path, pubkeys: Option<&Path>) -> anyhow::Result<(Outcome, ReadNotes)> {
    let keys = pinned(pubkeys)?;
    let r = AuditReader::open(db).with_context(|| format!("--db {}", db.display()))?;
    let mut v = ChainVerifier::new(&keys, r.checkpoints()?);
    let mut fault = None;
    r.scan(0, |s| {
        match v.push(Some(s.key), s.event.as_ref().map_err(String::as_str)) {
            Ok(()) => ControlFlow::Continue(()),
            Err(f) => {
                fault = Some(f);
                ControlFlow::Break(())
            }
        }
    })?;
    let outcome = match fault {
        Some(f) => Err(f),
        None => v.finish(),
    };
    Ok((outcome, r.notes()))
}

/// What to tell a person about how `db` was read (one line each).
pub fn describe(db: &Path, n: &ReadNotes) -> Vec<String> {
    let mut out = Vec::new();
    if n.repaired_copy {
        out.push(format!(
            "note: {} was not closed cleanly (a sidecar has it open, or was stopped without \
             closing it): it was read from a repaired private copy; the file itself was not \
             touched",
            db.display()
        ));
    }
    if n.journaled > 0 {
        out.push(format!(
            "note: {} records (from sequence {}) were read from the journal {} beside it, \
             not yet moved into the file (a running sidecar moves them within seconds; after \
             a crash, its next start does; on a running sidecar the newest may still be \
             waiting for their sync)",
            n.journaled,
            n.journaled_from,
            crate::store::audit_wal::FILE_NAME
        ));
    }
    out
}

/// Verifies an export (JSON lines) at `file`.
pub fn verify_export(file: &Path, pubkeys: Option<&Path>) -> anyhow::Result<Outcome> {
    let keys = pinned(pubkeys)?;
    let f = std::fs::File::open(file).with_context(|| format!("--export {}", file.display()))?;
    let mut records = Vec::new();
    let mut checkpoints = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", file.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        match export::parse_line(&line) {
            Ok(Line::Record(e)) => records.push(Ok(*e)),
            Ok(Line::Checkpoint(c)) => checkpoints.push(c),
            Err(why) => records.push(Err(format!("line {}: {why}", i + 1))),
        }
    }
    let mut v = ChainVerifier::new(&keys, checkpoints);
    for r in &records {
        if let Err(f) = v.push(None, r.as_ref().map_err(String::as_str)) {
            return Ok(Err(f));
        }
    }
    Ok(v.finish())
}

/// Writes every record of `db` (and of the journal beside it, not yet in it), each
/// checkpoint after the record it signs, as JSON lines. Returns how many, and how the file
/// was read.
pub fn export(db: &Path, out: &mut impl Write) -> anyhow::Result<(u64, ReadNotes)> {
    contained(db, || export_inner(db, out))
}

fn export_inner(db: &Path, out: &mut impl Write) -> anyhow::Result<(u64, ReadNotes)> {
    let r = AuditReader::open(db).with_context(|| format!("--db {}", db.display()))?;
    let cps: std::collections::BTreeMap<u64, _> = r
        .checkpoints()?
        .into_iter()
        .map(|c| (c.sequence, c))
        .collect();
    let mut n = 0u64;
    let mut err = None;
    r.scan(0, |s| {
        let res = match &s.event {
            Ok(e) => writeln!(out, "{}", export::record_line(e)).and_then(|_| {
                match cps.get(&e.sequence) {
                    Some(c) => writeln!(out, "{}", export::checkpoint_line(c)),
                    None => Ok(()),
                }
            }),
            Err(why) => {
                err = Some(anyhow::anyhow!(
                    "record at position {} does not decode ({why}): run `aesp audit verify --db`",
                    s.key
                ));
                return ControlFlow::Break(());
            }
        };
        match res {
            Ok(()) => {
                n += 1;
                ControlFlow::Continue(())
            }
            Err(e) => {
                err = Some(e.into());
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    Ok((n, r.notes()))
}

/// The public key of the audit key at `key_file` (PEM, then its key id).
pub fn pubkey(key_file: &Path) -> anyhow::Result<(String, String)> {
    let k = super::key::AuditKey::load(key_file)?;
    Ok((super::key::public_pem(&k.public())?, k.id))
}

/// Whether the report's signature verifies with a key of the PEM file `pubkey` (the one its
/// `key_id` names).
pub fn check_report(
    r: &crate::proto::aesp::ComplianceReport,
    pubkey: &Path,
) -> anyhow::Result<bool> {
    let keys = pinned(Some(pubkey))?;
    Ok(keys.iter().any(|k| {
        super::key::key_id(k) == r.key_id
            && super::record::signature_ok(k, &super::record::report_bytes(r), &r.report_signature)
    }))
}

/// A compliance report for people (`text`) or as JSON (`json`); `signature`: whether it was
/// checked and verified.
pub fn render_report(
    r: &crate::proto::aesp::ComplianceReport,
    signature: Option<bool>,
    format: &str,
) -> String {
    use super::record::hex;
    let sig = match signature {
        None => "not checked (give --pubkey, the output of `aesp audit pubkey`)",
        Some(true) => "valid",
        Some(false) => "INVALID",
    };
    let sorted = |m: &std::collections::HashMap<String, u64>| {
        let mut v: Vec<_> = m.iter().map(|(k, n)| (k.clone(), *n)).collect();
        v.sort();
        v
    };
    if format == "json" {
        return format!(
            "{}\n",
            serde_json::json!({
                "tenant_id": r.tenant_id,
                "since_unix_nanos": r.since_unix_nanos,
                "until_unix_nanos": r.until_unix_nanos,
                "total_events": r.total_events,
                "events_by_type": r.events_by_type,
                "events_by_decision": r.events_by_decision,
                "denials_by_reason": r.denials_by_reason,
                "chain_verified": r.chain_verified,
                "first_sequence": r.first_sequence,
                "last_sequence": r.last_sequence,
                "head_hash": hex(&r.head_hash),
                "findings": r.findings,
                "key_id": r.key_id,
                "report_signature": hex(&r.report_signature),
                "generated_at_unix_nanos": r.generated_at_unix_nanos,
                "signature_check": sig,
            })
        );
    }
    let mut out = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(out, "Compliance report for tenant {}", r.tenant_id);
    let _ = writeln!(
        out,
        "  period: {} .. {} (Unix ns; 0 = open)",
        r.since_unix_nanos, r.until_unix_nanos
    );
    let _ = writeln!(
        out,
        "  events: {} (sequence {}..{})",
        r.total_events, r.first_sequence, r.last_sequence
    );
    for (title, m) in [
        ("by type", &r.events_by_type),
        ("by decision", &r.events_by_decision),
        ("denials by reason", &r.denials_by_reason),
    ] {
        let _ = writeln!(out, "  {title}:");
        for (k, n) in sorted(m) {
            let _ = writeln!(out, "    {k:<28} {n}");
        }
    }
    let _ = writeln!(
        out,
        "  chain verified: {}  head hash: {}",
        if r.chain_verified { "yes" } else { "NO" },
        hex(&r.head_hash)
    );
    let _ = writeln!(out, "  findings:");
    for f in &r.findings {
        let _ = writeln!(out, "    - {f}");
    }
    let _ = writeln!(out, "  signed by {} : signature {sig}", r.key_id);
    out
}
