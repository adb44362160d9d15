//! What `aesp audit verify | export | pubkey` do, offline, on a file: the live `audit.redb`
//! of a running sidecar (opened read-only beside its writer), a copy of it, or an export.

use super::export::{self, Line};
use super::verify::{ChainVerifier, Fault, Summary};
use crate::store::audit::AuditReader;
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

/// Verifies `audit.redb` at `db`.
pub fn verify_db(db: &Path, pubkeys: Option<&Path>) -> anyhow::Result<Outcome> {
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
    Ok(match fault {
        Some(f) => Err(f),
        None => v.finish(),
    })
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

/// Writes every record of `db`, each checkpoint after the record it signs, as JSON lines.
pub fn export(db: &Path, out: &mut impl Write) -> anyhow::Result<u64> {
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
    Ok(n)
}

/// The public key of the audit key at `key_file` (PEM, then its key id).
pub fn pubkey(key_file: &Path) -> anyhow::Result<(String, String)> {
    let k = super::key::AuditKey::load(key_file)?;
    Ok((super::key::public_pem(&k.public())?, k.id))
}
