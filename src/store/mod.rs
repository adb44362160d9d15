//! Stores: what the sidecar keeps across restarts, each behind a small interface of its own.
//!
//! **The rule: nothing outside `store/` names redb.** Callers see plain records, plain
//! errors ([`StoreError`]) and a synchronous API (wrap calls in `spawn_blocking` on the async
//! side); which embedded database holds the bytes, and how, is this module's business alone,
//! so a replicated backend can take its place later without touching a caller.
//!
//! - [`control`]: roles, bindings and service accounts (`control.redb` in the configured
//!   `state_dir`): small, changed rarely, read whole into an immutable snapshot.
//! - The audit log (append-only, hot) will be its own file beside it, so neither store waits
//!   on the other's write lock.
//!
//! Invariants every store keeps:
//!
//! - Every write is durable when it returns `Ok`: it survives a crash or a power cut (one
//!   transaction committed with `Immediate` durability; for the audit trail, one group
//!   synced in its journal, see [`audit_wal`]).
//! - A file that cannot be read (corrupted, truncated, from a newer format) is an error that
//!   names the file, says what is wrong and how to recover. A store never recreates, repairs
//!   away or overwrites a file it cannot read.
//! - A store never holds a credential: only metadata about it.

pub mod audit;
pub mod audit_wal;
pub mod control;

pub use control::{BindingRecord, ControlState, ControlStore, ServiceAccountRecord};

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// Why a store operation failed. Every variant about a file names it; `Display` reads
/// `FILE: PROBLEM; WHAT TO DO` where there is something to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file (or its directory) could not be opened: in use by another process,
    /// permissions, a file format this build does not read.
    #[error("{}: cannot open: {why}; {remedy}", path.display())]
    Open {
        path: PathBuf,
        why: String,
        remedy: &'static str,
    },
    /// The file is there but damaged: garbage, truncated, not a store this sidecar wrote, or a
    /// record that does not decode. The file is left exactly as it was found.
    #[error("{}: damaged: {why}; {remedy}", path.display())]
    Corrupt {
        path: PathBuf,
        why: String,
        remedy: &'static str,
    },
    /// The file was written in another format version (by a newer or older sidecar).
    #[error(
        "{}: unknown schema version {found}: this sidecar reads version {reads}; run the sidecar version that wrote the file, or restore a backup written by this one",
        path.display()
    )]
    Schema {
        path: PathBuf,
        found: u64,
        reads: u64,
    },
    /// What is being added is already there (a binding, a service account's principal id).
    #[error("{0}")]
    Exists(String),
    /// What is being changed is not there.
    #[error("{0}")]
    NotFound(String),
    /// A read or a write failed for another reason (disk full, I/O error). Nothing was
    /// changed by the failed operation.
    #[error("{}: {during}: {why}", path.display())]
    Io {
        path: PathBuf,
        during: &'static str,
        why: String,
    },
}

/// Remedy of [`StoreError::Open`] when another process holds the file.
const REMEDY_IN_USE: &str = "another sidecar (or another store in this process) has it open: two sidecars cannot share one state_dir";
/// Remedy of [`StoreError::Open`] when the file or directory is not accessible.
const REMEDY_PERMISSION: &str =
    "check that the sidecar's user owns the state_dir and the file (mode 0700 and 0600)";
/// Remedy of [`StoreError::Open`] for other failures.
const REMEDY_OPEN: &str = "check the disk and the state_dir setting";

/// Classifies a redb error met while opening, reading or writing the file at `path`:
/// corruption is [`StoreError::Corrupt`] (with `corrupt_remedy`), a lock or permission
/// problem is [`StoreError::Open`], anything else [`StoreError::Io`].
fn redb_error(
    path: &Path,
    during: &'static str,
    corrupt_remedy: &'static str,
    e: impl Into<redb::Error>,
) -> StoreError {
    let path = path.to_path_buf();
    let corrupt = |path, why: String| StoreError::Corrupt {
        path,
        why,
        remedy: corrupt_remedy,
    };
    let open = |path, why: String, remedy| StoreError::Open { path, why, remedy };
    match e.into() {
        redb::Error::Corrupted(why) => corrupt(path, why),
        redb::Error::RepairAborted => corrupt(path, "the file needs a repair".into()),
        redb::Error::Io(io) if matches!(io.kind(), ErrorKind::InvalidData) => {
            corrupt(path, format!("not a database file ({io})"))
        }
        redb::Error::Io(io) if matches!(io.kind(), ErrorKind::UnexpectedEof) => corrupt(
            path,
            format!("the file is shorter than it should be ({io})"),
        ),
        e @ (redb::Error::TableDoesNotExist(_)
        | redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TypeDefinitionChanged { .. }) => corrupt(
            path,
            format!("not the layout this sidecar writes ({e}): is it another program's file?"),
        ),
        e @ (redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch) => {
            open(path, e.to_string(), REMEDY_IN_USE)
        }
        redb::Error::UpgradeRequired(v) => open(
            path,
            format!("written in redb file format {v}, which this sidecar's redb does not read"),
            "restore a backup written by this sidecar version, or run the version that wrote it",
        ),
        redb::Error::Io(io) if io.kind() == ErrorKind::PermissionDenied => {
            open(path, io.to_string(), REMEDY_PERMISSION)
        }
        e if during == OPENING => open(path, e.to_string(), REMEDY_OPEN),
        e => StoreError::Io {
            path,
            during,
            why: e.to_string(),
        },
    }
}

/// The `during` of errors met while opening a file.
const OPENING: &str = "opening";
