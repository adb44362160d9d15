//! The audit log: `audit.redb` in `state_dir`, append-only, written by one writer (the
//! audit writer task) and readable at the same time by other processes (`aesp audit verify
//! --db`, `aesp audit export`) and by the management API.
//!
//! Layout (schema version 1):
//! - `events`: sequence (u64) → the record, a protobuf `altar.aesp.v1.AuditEvent` with its
//!   `prev_hash`, `hash`, `signature` and `key_id`;
//! - `checkpoints`: sequence (u64) → a protobuf `altar.aesp.v1.AuditCheckpoint`;
//! - `meta`: `schema_version`.
//!
//! Invariants: a batch of records (and its checkpoint, if any) is one transaction committed
//! with `Immediate` durability, so a batch is durable whole or not at all; nothing is ever
//! deleted or rewritten; the file is opened in redb's single-writer mode so readers in other
//! processes follow the writer's commits. The chain itself (sequences, hashes, signatures)
//! is the writer's business ([`crate::audit`]); this store keeps bytes.

use super::{OPENING, StoreError, redb_error};
use crate::proto::aesp::{AuditCheckpoint, AuditEvent};
use prost::Message;
use redb::{
    Builder, ConcurrencyMode, Database, Durability, ReadOnlyDatabase, ReadableDatabase,
    ReadableTable, ReadableTableMetadata, StorageBackend, TableDefinition,
};
use std::fs::OpenOptions;
use std::ops::{Bound, ControlFlow};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The file in `state_dir`.
pub const FILE_NAME: &str = "audit.redb";
const SCHEMA_VERSION: u64 = 1;
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const CHECKPOINTS: TableDefinition<u64, &[u8]> = TableDefinition::new("checkpoints");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const CACHE_BYTES: usize = 64 << 20;
const REMEDY: &str = "the file was left as it is: keep it for the investigation (`aesp audit verify --db` on a copy says what is wrong), move it aside and restart to begin a new chain";

/// Makes every write to the audit file fail while on: a disk-failure drill, so the
/// fail-closed path can be exercised on a real file.
#[derive(Clone, Debug, Default)]
pub struct FaultSwitch(Arc<AtomicBool>);

impl FaultSwitch {
    pub fn set(&self, failing: bool) {
        self.0.store(failing, Ordering::SeqCst);
    }

    pub(crate) fn check(&self) -> std::io::Result<()> {
        if self.0.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("write refused (fault drill)"));
        }
        Ok(())
    }
}

/// redb's file backend, with [`FaultSwitch`] in front of its writes.
#[derive(Debug)]
struct Backend {
    file: redb::backends::FileBackend,
    faults: FaultSwitch,
}

type R<T> = Result<T, std::io::Error>;
type L<T> = Result<T, redb::BackendError>;

impl StorageBackend for Backend {
    fn len(&self) -> R<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> R<()> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> R<()> {
        self.faults.check()?;
        self.file.set_len(len)
    }
    fn sync_data(&self) -> R<()> {
        self.faults.check()?;
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> R<()> {
        self.faults.check()?;
        self.file.write(offset, data)
    }
    fn close(&self) -> R<()> {
        self.file.close()
    }
    fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> L<bool> {
        self.file.try_lock_range(s, e)
    }
    fn try_lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> L<bool> {
        self.file.try_lock_shared_range(s, e)
    }
    fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> L<()> {
        self.file.lock_range(s, e)
    }
    fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> L<()> {
        self.file.lock_shared_range(s, e)
    }
    fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> L<()> {
        self.file.unlock_range(s, e)
    }
    fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> L<bool> {
        self.file.query_lock_range(s, e)
    }
}

fn builder() -> Builder {
    let mut b = Builder::new();
    b.set_cache_size(CACHE_BYTES)
        .set_concurrency_mode(ConcurrencyMode::SingleWriter);
    b
}

/// The writer's handle on `audit.redb`.
pub struct AuditStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for AuditStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditStore")
            .field("path", &self.path)
            .finish()
    }
}

/// A record as stored: its key, and the record if it decodes.
pub struct Stored {
    pub key: u64,
    pub event: Result<AuditEvent, String>,
}

impl AuditStore {
    /// Opens `dir/audit.redb`, or creates it (and `dir`, 0700; the file 0600).
    pub fn open(dir: &Path, faults: FaultSwitch) -> Result<AuditStore, StoreError> {
        super::control::ensure_dir(dir)?;
        let path = dir.join(FILE_NAME);
        let mut o = OpenOptions::new();
        o.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let file = o
            .open(&path)
            .map_err(|e| redb_error(&path, OPENING, REMEDY, e))?;
        let err = |e: redb::Error| redb_error(&path, OPENING, REMEDY, e);
        let file = redb::backends::FileBackend::new(file).map_err(|e| err(e.into()))?;
        let db = builder()
            .create_with_backend(Backend { file, faults })
            .map_err(|e| err(e.into()))?;
        let store = AuditStore { db, path };
        store.init()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn init(&self) -> Result<(), StoreError> {
        let err = |e: redb::Error| redb_error(&self.path, OPENING, REMEDY, e);
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| err(e.into()))?;
            let found = meta
                .get("schema_version")
                .map_err(|e| err(e.into()))?
                .map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|e| err(e.into()))?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(v) => {
                    return Err(StoreError::Schema {
                        path: self.path.clone(),
                        found: v,
                        reads: SCHEMA_VERSION,
                    });
                }
            }
            txn.open_table(EVENTS).map_err(|e| err(e.into()))?;
            txn.open_table(CHECKPOINTS).map_err(|e| err(e.into()))?;
        }
        txn.commit().map_err(|e| err(e.into()))
    }

    /// Appends `events` (and `checkpoint`) in one durable transaction.
    pub fn append(
        &self,
        events: &[AuditEvent],
        checkpoint: Option<&AuditCheckpoint>,
    ) -> Result<(), StoreError> {
        const WRITING: &str = "appending audit records";
        let err = |e: redb::Error| redb_error(&self.path, WRITING, REMEDY, e);
        let mut txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| err(e.into()))?;
        {
            let mut t = txn.open_table(EVENTS).map_err(|e| err(e.into()))?;
            let mut buf = Vec::with_capacity(512);
            for e in events {
                buf.clear();
                e.encode(&mut buf).map_err(|x| StoreError::Io {
                    path: self.path.clone(),
                    during: WRITING,
                    why: x.to_string(),
                })?;
                t.insert(e.sequence, buf.as_slice())
                    .map_err(|e| err(e.into()))?;
            }
            if let Some(c) = checkpoint {
                let mut t = txn.open_table(CHECKPOINTS).map_err(|e| err(e.into()))?;
                t.insert(c.sequence, c.encode_to_vec().as_slice())
                    .map_err(|e| err(e.into()))?;
            }
        }
        txn.commit().map_err(|e| err(e.into()))
    }

    /// The last record, if any.
    pub fn head(&self) -> Result<Option<AuditEvent>, StoreError> {
        head(&self.db, &self.path)
    }

    /// Records from `from` on (in key order), at most `limit`.
    pub fn read(&self, from: u64, limit: usize) -> Result<Vec<Stored>, StoreError> {
        let mut out = Vec::new();
        scan(&self.db, &self.path, from, |s| {
            out.push(s);
            if out.len() >= limit {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        Ok(out)
    }

    /// Every checkpoint, in order.
    pub fn checkpoints(&self) -> Result<Vec<AuditCheckpoint>, StoreError> {
        checkpoints(&self.db, &self.path)
    }
}

/// A read-only handle on an `audit.redb` (the live file of a running sidecar, or a copy).
pub struct AuditReader {
    db: ReadOnlyDatabase,
    path: PathBuf,
}

impl AuditReader {
    pub fn open(path: &Path) -> Result<AuditReader, StoreError> {
        let db = builder()
            .open_read_only(path)
            .map_err(|e| redb_error(path, OPENING, REMEDY, e))?;
        Ok(AuditReader {
            db,
            path: path.to_path_buf(),
        })
    }

    /// Calls `f` with each record from `from` on, in key order, until it breaks.
    pub fn scan(
        &self,
        from: u64,
        f: impl FnMut(Stored) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        scan(&self.db, &self.path, from, f)
    }

    pub fn checkpoints(&self) -> Result<Vec<AuditCheckpoint>, StoreError> {
        checkpoints(&self.db, &self.path)
    }

    pub fn count(&self) -> Result<u64, StoreError> {
        let err = |e: redb::Error| redb_error(&self.path, "reading", REMEDY, e);
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = txn.open_table(EVENTS).map_err(|e| err(e.into()))?;
        t.len().map_err(|e| err(e.into()))
    }
}

fn scan(
    db: &impl ReadableDatabase,
    path: &Path,
    from: u64,
    mut f: impl FnMut(Stored) -> ControlFlow<()>,
) -> Result<(), StoreError> {
    let err = |e: redb::Error| redb_error(path, "reading", REMEDY, e);
    let txn = db.begin_read().map_err(|e| err(e.into()))?;
    let t = txn.open_table(EVENTS).map_err(|e| err(e.into()))?;
    for row in t.range(from..).map_err(|e| err(e.into()))? {
        let (k, v) = row.map_err(|e| err(e.into()))?;
        let event = AuditEvent::decode(v.value()).map_err(|e| e.to_string());
        if f(Stored {
            key: k.value(),
            event,
        })
        .is_break()
        {
            break;
        }
    }
    Ok(())
}

fn head(db: &impl ReadableDatabase, path: &Path) -> Result<Option<AuditEvent>, StoreError> {
    let err = |e: redb::Error| redb_error(path, "reading", REMEDY, e);
    let txn = db.begin_read().map_err(|e| err(e.into()))?;
    let t = txn.open_table(EVENTS).map_err(|e| err(e.into()))?;
    let Some((k, v)) = t.last().map_err(|e| err(e.into()))? else {
        return Ok(None);
    };
    AuditEvent::decode(v.value())
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            why: format!("the last record (key {}) does not decode: {e}", k.value()),
            remedy: REMEDY,
        })
}

fn checkpoints(
    db: &impl ReadableDatabase,
    path: &Path,
) -> Result<Vec<AuditCheckpoint>, StoreError> {
    let err = |e: redb::Error| redb_error(path, "reading", REMEDY, e);
    let txn = db.begin_read().map_err(|e| err(e.into()))?;
    let t = txn.open_table(CHECKPOINTS).map_err(|e| err(e.into()))?;
    let mut out = Vec::new();
    for row in t.iter().map_err(|e| err(e.into()))? {
        let (k, v) = row.map_err(|e| err(e.into()))?;
        let c = AuditCheckpoint::decode(v.value()).map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            why: format!("checkpoint {} does not decode: {e}", k.value()),
            remedy: REMEDY,
        })?;
        out.push(c);
    }
    Ok(out)
}
