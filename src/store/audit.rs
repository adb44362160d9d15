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
//! Invariants: a group of records (and its checkpoint, if any) is durable once it is in the
//! journal (`audit.wal`, [`super::audit_wal`]), whole or not at all; the store's mover thread
//! moves journaled records into `audit.redb` in transactions committed with `Immediate`
//! durability, and opening the store moves what the journal has and the file lacks; nothing
//! is ever deleted or rewritten; the file is opened in redb's single-writer mode so readers
//! in other processes follow the moves. The chain itself (sequences, hashes, signatures)
//! is the writer's business ([`crate::audit`]); this store keeps bytes.

use super::{OPENING, StoreError, redb_error};
use crate::proto::aesp::{AuditCheckpoint, AuditEvent};
use prost::Message;
use redb::{
    Builder, ConcurrencyMode, Database, Durability, ReadOnlyDatabase, ReadTransaction,
    ReadableDatabase, ReadableTable, ReadableTableMetadata, StorageBackend, TableDefinition,
};
use std::fs::OpenOptions;
use std::ops::{Bound, ControlFlow};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::audit_wal::{self, Wal, WalSync};
use crate::audit::record;

/// The file in `state_dir`.
pub const FILE_NAME: &str = "audit.redb";
const SCHEMA_VERSION: u64 = 1;
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const CHECKPOINTS: TableDefinition<u64, &[u8]> = TableDefinition::new("checkpoints");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// redb's page cache for this file. The trail is appended and seldom read (queries,
/// reports): 64 MiB cost the mover fresh pages to fault in for as long as the cache was
/// filling (and 64 MiB of RSS); with 16 MiB it is reused sooner.
const CACHE_BYTES: usize = 16 << 20;
const REMEDY: &str = "the file was left as it is: keep it for the investigation (`aesp audit verify --db` on a copy says what is wrong), move it aside and restart to begin a new chain";

/// A file redb panicked reading.
fn damaged(path: &Path) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        why: "its pages are damaged (redb failed reading them)".into(),
        remedy: REMEDY,
    }
}

/// What to do about a file that was not closed cleanly and that redb cannot repair.
const TORN_REMEDY: &str = "a copy taken (cp) while the sidecar was moving records into the file can be torn, its pages copied at different moments: take it again, or read the live file itself or an export of it (`aesp audit export --db` reads one consistent snapshot); a file left by a crash of the sidecar is repaired by its next start";

/// Makes every write to the audit file fail while on: a disk-failure drill, so the
/// fail-closed path can be exercised on a real file.
#[derive(Clone, Debug, Default)]
pub struct FaultSwitch(Arc<(AtomicBool, AtomicBool)>);

impl FaultSwitch {
    /// Every write and every sync fails.
    pub fn set(&self, failing: bool) {
        self.0.0.store(failing, Ordering::SeqCst);
    }

    /// Only syncs fail: groups are written (into the page cache) but never made durable.
    pub fn set_syncs(&self, failing: bool) {
        self.0.1.store(failing, Ordering::SeqCst);
    }

    pub(crate) fn check(&self) -> std::io::Result<()> {
        if self.0.0.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("write refused (fault drill)"));
        }
        Ok(())
    }

    pub(crate) fn check_sync(&self) -> std::io::Result<()> {
        self.check()?;
        if self.0.1.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("sync refused (fault drill)"));
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
        self.faults.check_sync()?;
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

/// The writer's handle on `audit.redb` and its journal (`audit.wal`, see
/// [`super::audit_wal`]). Groups are journaled by the writer; a thread of the store's own
/// moves them into `audit.redb` half a journal at a time.
pub struct AuditStore {
    db: Arc<Database>,
    path: PathBuf,
    journal: std::sync::Mutex<Journal>,
    /// Syncs the journal without holding it (groups go on being written meanwhile).
    syncer: WalSync,
    mover: Mover,
}

struct Journal {
    wal: Wal,
    /// The entries journaled into the current half (its bytes), the key of each, and the
    /// sequence of the last record among them.
    entries: Vec<u8>,
    keys: Vec<u64>,
    last: u64,
    /// When the oldest of them was journaled.
    since: Option<Instant>,
    /// Groups written to the journal, and of them the ones known durable (a count each),
    /// and the sequence of the last record of those.
    written: u64,
    synced: u64,
    synced_last: u64,
    /// A sync failed: nothing written since can be known durable (the kernel reports a
    /// write-back error once), so nothing more is written or synced through this handle.
    broken: Option<String>,
}

impl Journal {
    /// Takes in the outcome of a sync that began when `target` groups were written (the
    /// last record `last`): a failure is remembered for good.
    fn synced_after(
        &mut self,
        done: Result<(), StoreError>,
        target: u64,
        last: u64,
    ) -> Result<(), StoreError> {
        if let Err(e) = done {
            self.broken = Some(e.to_string());
            return Err(e);
        }
        if target > self.synced {
            self.synced = target;
            self.synced_last = last;
        }
        Ok(())
    }
}

/// Half a journal's records, to move into `audit.redb`.
struct Job {
    entries: Vec<u8>,
    keys: Vec<u64>,
    last: u64,
}

#[derive(Default)]
struct Moving {
    /// A half is being moved (the writer may not switch to it).
    busy: bool,
    /// Why a move failed (the store must be reopened, which moves it again).
    failed: Option<String>,
    /// The buffers of the last job moved, emptied, for the next half: a half's entries
    /// are megabytes, and growing a new buffer for each half cost the writer fresh pages
    /// (zeroed by the kernel) and copies on every move.
    spare: Option<(Vec<u8>, Vec<u64>)>,
}

/// Told the last sequence readable from `audit.redb` after each move.
type OnMoved = Box<dyn Fn(u64) + Send>;

/// The thread that moves journaled records into `audit.redb`.
struct Mover {
    tx: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    state: Arc<(std::sync::Mutex<Moving>, std::sync::Condvar)>,
    /// Told the last sequence readable from `audit.redb` after each move.
    moved: Arc<std::sync::Mutex<Option<OnMoved>>>,
}

impl Drop for AuditStore {
    /// Ends the mover after the move in hand: once dropped, the file is closed.
    fn drop(&mut self) {
        self.mover.tx = None;
        if let Some(t) = self.mover.thread.take() {
            let _ = t.join();
        }
    }
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
    /// Opens `dir/audit.redb`, or creates it (and `dir`, 0700; the file 0600), and moves
    /// into it what the journal holds beyond it.
    pub fn open(dir: &Path, faults: FaultSwitch) -> Result<AuditStore, StoreError> {
        Self::open_with(dir, faults, None)
    }

    /// Opens the store again after a failed write: of the journal, only records up to
    /// `durable` (the last this process knows durable) are moved; the rest were written
    /// but never made durable, their callers refused (the writer keeps those records and
    /// writes them anew). The journal is then forgotten, so they are never read back.
    /// Refused, with the journal left as it is, if the chain cannot resume from the file's
    /// last record; else returned with where the chain resumes ([`AuditStore::resume_at`]).
    pub fn reopen(
        dir: &Path,
        faults: FaultSwitch,
        durable: u64,
    ) -> Result<(AuditStore, (u64, [u8; 32])), StoreError> {
        let s = Self::open_with(dir, faults, Some(durable))?;
        let at = s.resume_at(s.head()?.as_ref())?;
        s.journal()?.wal.forget()?;
        Ok((s, at))
    }

    /// Where the chain resumes after `head` (the file's last record): its sequence and hash
    /// (0 and the genesis hash if there is none). `Corrupt` if that hash is not 32 bytes:
    /// nothing can link to it.
    pub fn resume_at(&self, head: Option<&AuditEvent>) -> Result<(u64, [u8; 32]), StoreError> {
        let Some(h) = head else {
            return Ok((0, record::GENESIS));
        };
        let hash = <[u8; 32]>::try_from(h.hash.as_slice()).map_err(|_| StoreError::Corrupt {
            path: self.path.clone(),
            why: format!(
                "the last record (sequence {}) has a hash of {} bytes, not 32",
                h.sequence,
                h.hash.len()
            ),
            remedy: "run `aesp audit verify --db` on it",
        })?;
        Ok((h.sequence, hash))
    }

    /// redb can panic on a file whose pages are damaged (not what its header says): that
    /// is a damaged file, said as such, never a crash of the sidecar.
    fn open_with(
        dir: &Path,
        faults: FaultSwitch,
        limit: Option<u64>,
    ) -> Result<AuditStore, StoreError> {
        let path = dir.join(FILE_NAME);
        unpanicked(
            || Self::open_unguarded(dir, faults, limit),
            || damaged(&path),
        )
    }

    fn open_unguarded(
        dir: &Path,
        faults: FaultSwitch,
        limit: Option<u64>,
    ) -> Result<AuditStore, StoreError> {
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
            .create_with_backend(Backend {
                file,
                faults: faults.clone(),
            })
            .map_err(|e| err(e.into()))?;
        let wal = Wal::open(dir, faults)?;
        let syncer = wal.syncer()?;
        let db = Arc::new(db);
        let state = Arc::new((
            std::sync::Mutex::new(Moving::default()),
            std::sync::Condvar::new(),
        ));
        let moved: Arc<std::sync::Mutex<Option<OnMoved>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let thread = {
            let (db, file, state, moved) = (db.clone(), path.clone(), state.clone(), moved.clone());
            std::thread::Builder::new()
                .name("aesp-audit-mover".into())
                .spawn(move || {
                    for mut job in rx {
                        let rows = audit_wal::entries(&job.entries)
                            .zip(&job.keys)
                            .map(|((kind, payload), key)| (kind, *key, payload));
                        let done = unpanicked(
                            || move_into(&db, &file, rows),
                            || StoreError::Io {
                                path: file.clone(),
                                during: "moving journaled audit records into the store",
                                why: "the move panicked".into(),
                            },
                        );
                        job.entries.clear();
                        job.keys.clear();
                        let (m, cv) = &*state;
                        if let Ok(mut g) = m.lock() {
                            g.busy = false;
                            if let Err(e) = &done {
                                g.failed = Some(e.to_string());
                            }
                            g.spare = Some((job.entries, job.keys));
                        }
                        cv.notify_all();
                        if done.is_ok()
                            && let Ok(f) = moved.lock()
                            && let Some(f) = &*f
                        {
                            f(job.last);
                        }
                    }
                })
                .map_err(|e| StoreError::Io {
                    path: path.clone(),
                    during: OPENING,
                    why: format!("cannot start the audit store's mover: {e}"),
                })?
        };
        let store = AuditStore {
            db,
            path,
            journal: std::sync::Mutex::new(Journal {
                wal,
                // At the size a half can reach: never grown (copied) while records wait.
                entries: Vec::with_capacity(audit_wal::HALF as usize),
                keys: Vec::with_capacity(4096),
                last: 0,
                since: None,
                written: 0,
                synced: 0,
                synced_last: 0,
                broken: None,
            }),
            syncer,
            mover: Mover {
                tx: Some(tx),
                thread: Some(thread),
                state,
                moved,
            },
        };
        store.init()?;
        store.replay(limit)?;
        Ok(store)
    }

    /// `f` is told the last sequence readable from `audit.redb` after each move.
    pub fn on_moved(&self, f: impl Fn(u64) + Send + 'static) {
        if let Ok(mut g) = self.mover.moved.lock() {
            *g = Some(Box::new(f));
        }
    }

    fn journal(&self) -> Result<std::sync::MutexGuard<'_, Journal>, StoreError> {
        self.journal.lock().map_err(|_| StoreError::Io {
            path: self.path.clone(),
            during: "appending audit records",
            why: "an earlier write panicked".into(),
        })
    }

    /// Moves into `audit.redb` the records the journal has and the file lacks (the groups
    /// made durable since its last sync, before a crash), up to sequence `limit` if given,
    /// then syncs it.
    fn replay(&self, limit: Option<u64>) -> Result<(), StoreError> {
        let j = self.journal()?;
        let head = self.head()?;
        let base = head.as_ref().map_or(0, |h| h.sequence);
        let prev = head.map_or_else(|| record::GENESIS.to_vec(), |h| h.hash);
        let tail = journal_tail(j.wal.read_all()?, base, prev, limit.unwrap_or(u64::MAX));
        let events = tail.records;
        // A checkpoint journaled on its own for the file's last record is moved unless the
        // file has it already.
        let had = base > 0 && self.has_checkpoint(base)?;
        let checkpoints: Vec<(u64, Vec<u8>)> = tail
            .checkpoints
            .into_iter()
            .filter(|(k, _)| *k > base || !had)
            .collect();
        if !events.is_empty() || !checkpoints.is_empty() {
            let rows = events
                .iter()
                .map(|(k, v)| (audit_wal::KIND_RECORD, *k, v.as_slice()))
                .chain(
                    checkpoints
                        .iter()
                        .map(|(k, v)| (audit_wal::KIND_CHECKPOINT, *k, v.as_slice())),
                );
            move_into(&self.db, &self.path, rows)?;
            tracing::warn!(
                records = events.len(),
                from = base + 1,
                "audit trail: records journaled before an unclean stop moved into audit.redb"
            );
        }
        Ok(())
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

    /// Appends `events` (and `checkpoint`) as one group, durable in the journal once this
    /// returns `Ok` ([`AuditStore::write`], then [`AuditStore::sync`]).
    pub fn append<'e>(
        &self,
        events: impl Iterator<Item = &'e AuditEvent> + Clone,
        checkpoint: Option<&AuditCheckpoint>,
    ) -> Result<(), StoreError> {
        self.write(events, checkpoint)?;
        self.sync().map(|_| ())
    }

    /// Writes `events` (and `checkpoint`) to the journal as one group, not yet synced;
    /// returns the group's number (groups are numbered from 1 in the order written). It is
    /// durable once [`AuditStore::sync`] has returned a number at least as high. They are
    /// readable from `audit.redb` once they have been moved there ([`AuditStore::move_due`],
    /// [`AuditStore::flush`]).
    pub fn write<'e>(
        &self,
        events: impl Iterator<Item = &'e AuditEvent> + Clone,
        checkpoint: Option<&AuditCheckpoint>,
    ) -> Result<u64, StoreError> {
        let mut j = self.journal()?;
        self.check_moved()?;
        self.check_broken(&j)?;
        j.wal.begin();
        for e in events.clone() {
            j.wal.add(audit_wal::KIND_RECORD, |b| e.encode_raw(b));
        }
        if let Some(c) = checkpoint {
            j.wal.add(audit_wal::KIND_CHECKPOINT, |b| c.encode_raw(b));
        }
        if j.wal.too_large() {
            return Err(StoreError::Io {
                path: self.path.clone(),
                during: "appending audit records",
                why: "a group larger than half the journal".into(),
            });
        }
        if !j.wal.fits() {
            // The current half is full: wait for the other to be free (back-pressure).
            self.hand_over(&mut j, true)?;
        }
        j.wal.put()?;
        let j = &mut *j;
        j.entries.extend_from_slice(j.wal.group());
        for e in events {
            j.keys.push(e.sequence);
            j.last = e.sequence;
        }
        if let Some(c) = checkpoint {
            j.keys.push(c.sequence);
        }
        j.since.get_or_insert_with(Instant::now);
        j.written += 1;
        Ok(j.written)
    }

    /// Makes every group written so far durable; returns the number of the last. The
    /// journal is not held meanwhile: groups written during the sync wait for the next.
    pub fn sync(&self) -> Result<u64, StoreError> {
        let (target, last) = {
            let j = self.journal()?;
            self.check_broken(&j)?;
            if j.synced == j.written {
                return Ok(j.synced);
            }
            (j.written, j.last)
        };
        let done = self.syncer.sync();
        let mut j = self.journal()?;
        // Another sync may have failed meanwhile.
        self.check_broken(&j)?;
        j.synced_after(done, target, last)?;
        Ok(target)
    }

    /// The groups known durable (a count), and the sequence of the last record among them
    /// (0 if none was written through this handle).
    pub fn durable(&self) -> (u64, u64) {
        self.journal().map_or((0, 0), |j| (j.synced, j.synced_last))
    }

    /// A failed sync: the store must be reopened.
    fn check_broken(&self, j: &Journal) -> Result<(), StoreError> {
        match &j.broken {
            None => Ok(()),
            Some(why) => Err(StoreError::Io {
                path: self.path.clone(),
                during: "syncing the audit journal",
                why: format!("an earlier sync failed ({why}): the store must be reopened"),
            }),
        }
    }

    /// A failed move: the store must be reopened (which moves the journal again).
    fn check_moved(&self) -> Result<(), StoreError> {
        let (m, _) = &*self.mover.state;
        match m.lock() {
            Ok(g) => match &g.failed {
                None => Ok(()),
                Some(why) => Err(StoreError::Io {
                    path: self.path.clone(),
                    during: "moving journaled audit records into the store",
                    why: why.clone(),
                }),
            },
            Err(_) => Err(StoreError::Io {
                path: self.path.clone(),
                during: "moving journaled audit records into the store",
                why: "the mover panicked".into(),
            }),
        }
    }

    /// Hands the current half to the mover and goes on in the other, once that one is free
    /// (`wait`: waits for it; otherwise `Ok(false)` if it is not free yet).
    fn hand_over(&self, j: &mut Journal, wait: bool) -> Result<bool, StoreError> {
        if j.keys.is_empty() {
            return Ok(true);
        }
        // What is moved must be durable in the journal first (the half it is in will be
        // written over once the move is done).
        self.check_broken(j)?;
        if j.synced < j.written {
            let done = j.wal.sync();
            let (target, last) = (j.written, j.last);
            j.synced_after(done, target, last)?;
        }
        let (entries, keys) = match self.mover_free(wait)? {
            Some(mut g) => {
                g.busy = true;
                g.spare.take().unwrap_or_else(|| {
                    (
                        Vec::with_capacity(audit_wal::HALF as usize),
                        Vec::with_capacity(4096),
                    )
                })
            }
            None => return Ok(false),
        };
        let job = Job {
            entries: std::mem::replace(&mut j.entries, entries),
            keys: std::mem::replace(&mut j.keys, keys),
            last: j.last,
        };
        let sent = self
            .mover
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(job).is_ok());
        if !sent {
            return Err(self.mover_gone());
        }
        j.wal.switch();
        j.since = None;
        self.check_moved()?;
        Ok(true)
    }

    fn mover_gone(&self) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            during: "moving journaled audit records into the store",
            why: "the mover is gone".into(),
        }
    }

    /// Since when journaled records wait to be moved into `audit.redb` (`None`: nothing
    /// waits), and whether the current half is filling up.
    pub fn waiting(&self) -> (Option<Instant>, bool) {
        self.journal()
            .map_or((None, false), |j| (j.since, j.wal.filling()))
    }

    /// Hands the journaled records to the mover if it is free (they become readable when it
    /// is done). `Ok(false)`: it is busy; try again later.
    pub fn move_due(&self) -> Result<bool, StoreError> {
        let mut j = self.journal()?;
        self.hand_over(&mut j, false)
    }

    /// Moves every journaled record into `audit.redb` and waits until they are readable.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut j = self.journal()?;
        self.hand_over(&mut j, true)?;
        drop(self.mover_free(true)?);
        self.check_moved()
    }

    /// The mover's state once it is not moving (`wait`: waits for that; otherwise `None`
    /// if it is busy).
    fn mover_free(
        &self,
        wait: bool,
    ) -> Result<Option<std::sync::MutexGuard<'_, Moving>>, StoreError> {
        let (m, cv) = &*self.mover.state;
        let mut g = m.lock().map_err(|_| self.mover_gone())?;
        while g.busy {
            if !wait {
                return Ok(None);
            }
            g = cv.wait(g).map_err(|_| self.mover_gone())?;
        }
        Ok(Some(g))
    }

    /// Whether the file holds a checkpoint at `sequence`.
    fn has_checkpoint(&self, sequence: u64) -> Result<bool, StoreError> {
        let err = |e: redb::Error| redb_error(&self.path, "reading", REMEDY, e);
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = txn.open_table(CHECKPOINTS).map_err(|e| err(e.into()))?;
        Ok(t.get(sequence).map_err(|e| err(e.into()))?.is_some())
    }

    /// The last record, if any.
    pub fn head(&self) -> Result<Option<AuditEvent>, StoreError> {
        unpanicked(
            || head(&reading(&*self.db, &self.path)?, &self.path),
            || damaged(&self.path),
        )
    }

    /// Records from `from` on (in key order), at most `limit`.
    pub fn read(&self, from: u64, limit: usize) -> Result<Vec<Stored>, StoreError> {
        let mut out = Vec::new();
        scan(&reading(&*self.db, &self.path)?, &self.path, from, |s| {
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
        checkpoints(&reading(&*self.db, &self.path)?, &self.path)
    }
}

/// A read-only handle on an `audit.redb` (the live file of a running sidecar, one left by a
/// crash, or a copy of either), with what the journal beside it (`audit.wal`, if there is
/// one) holds beyond it: the records a running sidecar has not moved yet, or those made
/// durable before a crash (a restart moves them). The files themselves are never written.
pub struct AuditReader {
    /// One snapshot for every read (declared first: ended before the database closes).
    txn: ReadTransaction,
    _db: ReaderDb,
    path: PathBuf,
    /// The journal's records that continue the file's chain, then its checkpoints.
    tail: Vec<(u64, Vec<u8>)>,
    tail_checkpoints: Vec<AuditCheckpoint>,
    /// Declared after `_db`: the copy is deleted once the database on it is closed.
    _copy: Option<tempfile::TempPath>,
}

enum ReaderDb {
    ReadOnly(ReadOnlyDatabase),
    /// A repaired private copy (the file was not closed cleanly).
    Copy(Box<Database>),
}

/// What the caller should know about how an `audit.redb` was read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReadNotes {
    /// The file was not closed cleanly (a sidecar has it open, or was killed): redb's
    /// repair ran on a private copy, the file itself untouched.
    pub repaired_copy: bool,
    /// Records read from the journal beside the file (not yet moved into it), and the
    /// first of their sequences.
    pub journaled: u64,
    pub journaled_from: u64,
}

impl AuditReader {
    pub fn open(path: &Path) -> Result<AuditReader, StoreError> {
        let (db, copy) = match builder().open_read_only(path) {
            Ok(db) => (ReaderDb::ReadOnly(db), None),
            Err(redb::DatabaseError::RepairAborted) => {
                let (db, copy) = repaired_copy(path)?;
                (ReaderDb::Copy(Box::new(db)), Some(copy))
            }
            Err(e) => return Err(redb_error(path, OPENING, REMEDY, e)),
        };
        let txn = match &db {
            ReaderDb::ReadOnly(d) => reading(d, path)?,
            ReaderDb::Copy(d) => reading(&**d, path)?,
        };
        let mut r = AuditReader {
            txn,
            _db: db,
            path: path.to_path_buf(),
            tail: Vec::new(),
            tail_checkpoints: Vec::new(),
            _copy: copy,
        };
        r.read_journal()?;
        Ok(r)
    }

    /// How the file was read.
    pub fn notes(&self) -> ReadNotes {
        ReadNotes {
            repaired_copy: self._copy.is_some(),
            journaled: self.tail.len() as u64,
            journaled_from: self.tail.first().map_or(0, |(k, _)| *k),
        }
    }

    fn read_journal(&mut self) -> Result<(), StoreError> {
        let Some(dir) = self.path.parent() else {
            return Ok(());
        };
        let wal = dir.join(audit_wal::FILE_NAME);
        let file = match std::fs::File::open(&wal) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(StoreError::Io {
                    path: wal,
                    during: "reading the audit journal",
                    why: e.to_string(),
                });
            }
        };
        let entries = audit_wal::read_entries(&file, &wal)?;
        let head = match head(&self.txn, &self.path) {
            Ok(h) => h,
            // The verifier reports the record that does not decode: nothing links to it.
            Err(StoreError::Corrupt { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let base = head.as_ref().map_or(0, |h| h.sequence);
        let prev = head.map_or_else(|| record::GENESIS.to_vec(), |h| h.hash);
        let tail = journal_tail(entries, base, prev, u64::MAX);
        let mut cps = Vec::new();
        for (k, payload) in &tail.checkpoints {
            let c =
                AuditCheckpoint::decode(payload.as_slice()).map_err(|e| StoreError::Corrupt {
                    path: wal.clone(),
                    why: format!("checkpoint {k} does not decode: {e}"),
                    remedy: REMEDY,
                })?;
            cps.push(c);
        }
        self.tail = tail.records;
        self.tail_checkpoints = cps;
        Ok(())
    }

    /// Calls `f` with each record from `from` on, in key order, until it breaks: those of
    /// the file, then those of the journal beyond it.
    pub fn scan(
        &self,
        from: u64,
        mut f: impl FnMut(Stored) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let mut broke = false;
        let mut g = |s| {
            let r = f(s);
            broke = r.is_break();
            r
        };
        scan(&self.txn, &self.path, from, &mut g)?;
        let mut tail = self.tail.iter().filter(|(k, _)| *k >= from);
        let mut go = !broke;
        while go && let Some((key, payload)) = tail.next() {
            let event = AuditEvent::decode(payload.as_slice()).map_err(|e| e.to_string());
            go = f(Stored { key: *key, event }).is_continue();
        }
        Ok(())
    }

    /// Every checkpoint, in order of sequence: the file's, then the journal's.
    pub fn checkpoints(&self) -> Result<Vec<AuditCheckpoint>, StoreError> {
        let mut out = checkpoints(&self.txn, &self.path)?;
        let last = out.last().map(|c| c.sequence);
        out.extend(
            self.tail_checkpoints
                .iter()
                .filter(|c| last.is_none_or(|l| c.sequence > l))
                .cloned(),
        );
        Ok(out)
    }

    /// The records, the file's and the journal's.
    pub fn count(&self) -> Result<u64, StoreError> {
        let n = count(&self.txn, &self.path)?;
        Ok(n + self.tail.len() as u64)
    }
}

/// A private copy of `path`, opened for writing so that redb repairs it (the file itself
/// is never opened for writing: a running sidecar may have it, or it is evidence).
fn repaired_copy(path: &Path) -> Result<(Database, tempfile::TempPath), StoreError> {
    const COPYING: &str = "copying the audit store to repair the copy";
    let io = |e: std::io::Error| StoreError::Io {
        path: path.to_path_buf(),
        during: COPYING,
        why: e.to_string(),
    };
    let copy = tempfile::Builder::new()
        .prefix("aesp-audit-copy-")
        .suffix(".redb")
        .tempfile()
        .map_err(io)?
        .into_temp_path();
    std::fs::copy(path, &copy).map_err(io)?;
    // redb's repair can panic on pages that are not what the header says (a torn copy).
    let db = unpanicked(
        || {
            builder()
                .open(&copy)
                .map_err(|e| redb_error(path, COPYING, TORN_REMEDY, e))
        },
        || StoreError::Corrupt {
            path: path.to_path_buf(),
            why: "redb could not repair a copy of it (it failed reading its pages)".into(),
            remedy: TORN_REMEDY,
        },
    )?;
    Ok((db, copy))
}

fn count(txn: &ReadTransaction, path: &Path) -> Result<u64, StoreError> {
    let err = |e: redb::Error| redb_error(path, "reading", REMEDY, e);
    let t = txn.open_table(EVENTS).map_err(|e| err(e.into()))?;
    t.len().map_err(|e| err(e.into()))
}

/// `f`'s result, or `panicked()` if it panicked. redb can panic on a file whose pages are
/// not what its header says; a move that panics must end in a failure the writer acts on
/// (fail closed, reopen), not leave the mover marked busy and every call waiting for ever.
fn unpanicked<T>(
    f: impl FnOnce() -> Result<T, StoreError>,
    panicked: impl FnOnce() -> StoreError,
) -> Result<T, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| Err(panicked()))
}

/// Moves journaled entries (kind, key, payload) into `audit.redb`, in one durable
/// transaction: half a journal from the mover, or what a restart finds in the journal.
fn move_into<'a>(
    db: &Database,
    path: &Path,
    rows: impl Iterator<Item = (u8, u64, &'a [u8])>,
) -> Result<(), StoreError> {
    const WRITING: &str = "moving journaled audit records into the store";
    let err = |e: redb::Error| redb_error(path, WRITING, REMEDY, e);
    let mut txn = db.begin_write().map_err(|e| err(e.into()))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| err(e.into()))?;
    {
        let mut events = txn.open_table(EVENTS).map_err(|e| err(e.into()))?;
        let mut cps = txn.open_table(CHECKPOINTS).map_err(|e| err(e.into()))?;
        for (kind, key, payload) in rows {
            if kind == audit_wal::KIND_CHECKPOINT {
                cps.insert(key, payload).map_err(|e| err(e.into()))?;
            } else {
                events.insert(key, payload).map_err(|e| err(e.into()))?;
            }
        }
    }
    txn.commit().map_err(|e| err(e.into()))
}

/// What a journal holds beyond a chain whose last record is `base` (hash `prev`), up to
/// sequence `limit`.
struct JournalTail {
    /// The records that continue the chain without a gap, in order: (sequence, payload).
    records: Vec<(u64, Vec<u8>)>,
    /// The checkpoints of those records, or of `base` itself: (sequence, payload).
    checkpoints: Vec<(u64, Vec<u8>)>,
}

/// The journal's halves hold groups in the order written, the older half possibly already
/// moved; stale entries are told apart by sequence, torn ones were dropped on reading.
fn journal_tail(
    entries: Vec<audit_wal::Entry>,
    base: u64,
    mut prev: Vec<u8>,
    limit: u64,
) -> JournalTail {
    let mut records: Vec<(AuditEvent, Vec<u8>)> = Vec::new();
    let mut cps: Vec<(u64, Vec<u8>, Vec<u8>)> = Vec::new();
    for entry in entries {
        match entry.kind {
            audit_wal::KIND_RECORD => {
                if let Ok(e) = AuditEvent::decode(entry.payload.as_slice())
                    && e.sequence > base
                    && e.sequence <= limit
                {
                    records.push((e, entry.payload));
                }
            }
            audit_wal::KIND_CHECKPOINT => {
                if let Ok(c) = AuditCheckpoint::decode(entry.payload.as_slice())
                    && c.sequence >= base
                    && c.sequence > 0
                    && c.sequence <= limit
                {
                    cps.push((c.sequence, c.head_hash, entry.payload));
                }
            }
            _ => {}
        }
    }
    records.sort_by_key(|(e, _)| e.sequence);
    let mut next = base.saturating_add(1);
    let mut out = Vec::new();
    let mut hashes = std::collections::HashMap::new();
    hashes.insert(base, prev.clone());
    for (e, payload) in records {
        if e.sequence < next {
            continue;
        }
        if e.sequence > next || e.prev_hash != prev {
            break;
        }
        next += 1;
        prev.clone_from(&e.hash);
        hashes.insert(e.sequence, e.hash);
        out.push((e.sequence, payload));
    }
    let mut checkpoints: Vec<(u64, Vec<u8>)> = cps
        .into_iter()
        .filter(|(k, head, _)| hashes.get(k) == Some(head))
        .map(|(k, _, payload)| (k, payload))
        .collect();
    // One per sequence, the last journaled (as moving them all would leave it).
    checkpoints.sort_by_key(|(k, _)| *k);
    checkpoints.reverse();
    checkpoints.dedup_by_key(|(k, _)| *k);
    checkpoints.reverse();
    JournalTail {
        records: out,
        checkpoints,
    }
}

/// A read transaction on `db`: one snapshot of the file (a reader that makes several reads
/// in one transaction sees no move the live writer commits meanwhile).
fn reading(db: &impl ReadableDatabase, path: &Path) -> Result<ReadTransaction, StoreError> {
    db.begin_read()
        .map_err(|e| redb_error(path, "reading", REMEDY, redb::Error::from(e)))
}

fn scan(
    txn: &ReadTransaction,
    path: &Path,
    from: u64,
    mut f: impl FnMut(Stored) -> ControlFlow<()>,
) -> Result<(), StoreError> {
    let err = |e: redb::Error| redb_error(path, "reading", REMEDY, e);
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

fn head(txn: &ReadTransaction, path: &Path) -> Result<Option<AuditEvent>, StoreError> {
    let err = |e: redb::Error| redb_error(path, "reading", REMEDY, e);
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

fn checkpoints(txn: &ReadTransaction, path: &Path) -> Result<Vec<AuditCheckpoint>, StoreError> {
    let err = |e: redb::Error| redb_error(path, "reading", REMEDY, e);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record;

    /// `n` records chained after `prev` from sequence `from`, signed with a test key.
    fn chain(from: u64, n: u64, mut prev: [u8; 32]) -> (Vec<AuditEvent>, [u8; 32]) {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let mut out = Vec::new();
        for s in from..from + n {
            let mut e = crate::audit::event("TOOL_INVOCATION", "ALLOW");
            e.sequence = s;
            e.key_id = "k".into();
            prev = record::link(&mut e, prev);
            record::sign(&mut e, &key);
            out.push(e);
        }
        (out, prev)
    }

    #[test]
    fn a_group_is_durable_in_the_journal_and_moved_into_the_file_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let after = tempfile::tempdir().unwrap();
        let (a, prev) = chain(1, 3, record::GENESIS);
        let (b, _) = chain(4, 2, prev);
        {
            let s = AuditStore::open(dir.path(), FaultSwitch::default()).unwrap();
            s.append(a.iter(), None).unwrap();
            assert!(s.head().unwrap().is_none(), "journaled, not yet applied");
            assert!(s.waiting().0.is_some());
            s.flush().unwrap();
            assert_eq!(s.head().unwrap().unwrap().sequence, 3);
            assert!(s.waiting().0.is_none());
            s.append(b.iter(), None).unwrap();
            assert_eq!(s.head().unwrap().unwrap().sequence, 3);
            // A crash: the files as the process leaves them, 4 and 5 in the journal only.
            for f in [FILE_NAME, audit_wal::FILE_NAME] {
                std::fs::copy(dir.path().join(f), after.path().join(f)).unwrap();
            }
        }
        // Opening them moves 4 and 5 into the file.
        let s = AuditStore::open(after.path(), FaultSwitch::default()).unwrap();
        let got: Vec<u64> = s.read(1, 100).unwrap().iter().map(|r| r.key).collect();
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
        let head = s.head().unwrap().unwrap();
        assert_eq!(head.hash, b[1].hash);
    }

    #[test]
    fn a_reader_sees_the_live_file_a_copy_of_it_and_the_journal_beyond_it_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        let alone = tempfile::tempdir().unwrap();
        let (a, prev) = chain(1, 3, record::GENESIS);
        let (b, _) = chain(4, 2, prev);
        let s = AuditStore::open(dir.path(), FaultSwitch::default()).unwrap();
        s.append(a.iter(), None).unwrap();
        s.flush().unwrap();
        let cp = record::checkpoint(
            5,
            &b[1].hash,
            1,
            "k",
            &ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
        );
        s.append(b.iter(), Some(&cp)).unwrap();
        // The store is open (as in a running sidecar): 1-3 in the file, 4-5 and the
        // checkpoint of 5 in the journal only.
        for f in [FILE_NAME, audit_wal::FILE_NAME] {
            std::fs::copy(dir.path().join(f), copy.path().join(f)).unwrap();
        }
        std::fs::copy(dir.path().join(FILE_NAME), alone.path().join(FILE_NAME)).unwrap();
        let keys = |r: &AuditReader| {
            let mut out = Vec::new();
            r.scan(0, |s| {
                out.push((s.key, s.event.unwrap().hash));
                ControlFlow::Continue(())
            })
            .unwrap();
            out
        };
        let want: Vec<(u64, Vec<u8>)> = a
            .iter()
            .chain(&b)
            .map(|e| (e.sequence, e.hash.clone()))
            .collect();

        // The live file, beside its writer.
        let live = AuditReader::open(&dir.path().join(FILE_NAME)).unwrap();
        // The writer moves 4-5 into the file meanwhile: the reader reads one snapshot,
        // nothing twice.
        s.flush().unwrap();
        assert_eq!(keys(&live), want);
        assert_eq!(live.count().unwrap(), 5);
        assert_eq!(
            live.notes(),
            ReadNotes {
                repaired_copy: false,
                journaled: 2,
                journaled_from: 4
            }
        );
        assert_eq!(
            live.checkpoints()
                .unwrap()
                .iter()
                .map(|c| c.sequence)
                .collect::<Vec<_>>(),
            vec![5]
        );
        // Scanning stops where the caller stops, in the journal too.
        let mut seen = Vec::new();
        live.scan(2, |s| {
            seen.push(s.key);
            if s.key == 4 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!(seen, vec![2, 3, 4]);

        // A copy of a file that was not closed: read from a repaired private copy, the copy
        // given left as it was.
        let path = copy.path().join(FILE_NAME);
        let before = std::fs::read(&path).unwrap();
        let r = AuditReader::open(&path).unwrap();
        assert!(r.notes().repaired_copy);
        assert_eq!(keys(&r), want);
        assert_eq!(r.checkpoints().unwrap().len(), 1);
        drop(r);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "the file was not written"
        );
        assert_eq!(
            std::fs::read_dir(copy.path()).unwrap().count(),
            2,
            "nothing created beside it"
        );

        // The file without its journal: what it holds.
        let r = AuditReader::open(&alone.path().join(FILE_NAME)).unwrap();
        assert_eq!(keys(&r), want[..3].to_vec());
        assert_eq!(r.notes().journaled, 0);
        drop(s);
    }

    #[test]
    fn a_last_record_that_does_not_decode_is_reported_by_the_reader_not_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = chain(1, 3, record::GENESIS);
        {
            let s = AuditStore::open(dir.path(), FaultSwitch::default()).unwrap();
            s.append(a.iter(), None).unwrap();
            s.flush().unwrap();
        }
        {
            let db = builder().create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(EVENTS)
                .unwrap()
                .insert(3, [0xff_u8; 7].as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        // The journal beside it still holds 1-3: no tail, and the scan reaches the bad one.
        let r = AuditReader::open(&dir.path().join(FILE_NAME)).unwrap();
        let mut got = Vec::new();
        r.scan(0, |s| {
            got.push((s.key, s.event.is_ok()));
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(got, vec![(1, true), (2, true), (3, false)]);
        assert_eq!(r.notes().journaled, 0);
    }

    #[test]
    fn a_move_that_panics_is_a_failure_not_a_mover_busy_for_ever() {
        let path = Path::new("audit.redb");
        let e = unpanicked(
            || -> Result<(), _> { panic!("inside redb") },
            || damaged(path),
        )
        .unwrap_err();
        assert!(e.to_string().contains("redb failed reading"), "{e}");
        assert_eq!(unpanicked(|| Ok(7), || damaged(path)).unwrap(), 7);
    }

    #[test]
    fn a_torn_copy_of_a_live_file_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        let (a, _) = chain(1, 3, record::GENESIS);
        let s = AuditStore::open(dir.path(), FaultSwitch::default()).unwrap();
        s.append(a.iter(), None).unwrap();
        s.flush().unwrap();
        // Not closed (as in a running sidecar), and the pages after the header copied "at
        // another moment": here, not at all.
        let path = copy.path().join(FILE_NAME);
        let mut bytes = std::fs::read(dir.path().join(FILE_NAME)).unwrap();
        for b in bytes.iter_mut().skip(4096) {
            *b = 0;
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = AuditReader::open(&path)
            .err()
            .expect("a torn copy is refused");
        assert!(e.to_string().contains("can be torn"), "{e}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "the copy was not written"
        );
        drop(s);
    }

    #[test]
    fn a_journal_write_that_fails_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let faults = FaultSwitch::default();
        let (a, _) = chain(1, 2, record::GENESIS);
        let s = AuditStore::open(dir.path(), faults.clone()).unwrap();
        faults.set(true);
        s.append(a.iter(), None).unwrap_err();
        faults.set(false);
        assert!(s.head().unwrap().is_none());
        drop(s);
        let s = AuditStore::open(dir.path(), faults).unwrap();
        assert!(s.head().unwrap().is_none());
    }

    /// `n` records chained after `prev` from `from`, each with `what` in an attribute.
    fn chain_of(from: u64, n: u64, prev: [u8; 32], what: &str) -> (Vec<AuditEvent>, [u8; 32]) {
        let (mut out, _) = chain(from, n, prev);
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let mut prev = prev;
        for e in &mut out {
            e.attributes.insert("what".into(), what.into());
            prev = record::link(e, prev);
            record::sign(e, &key);
        }
        (out, prev)
    }

    #[test]
    fn groups_written_but_never_synced_are_not_read_back_after_the_store_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let after = tempfile::tempdir().unwrap();
        let faults = FaultSwitch::default();
        let (a, prev) = chain(1, 2, record::GENESIS);
        // What the writer sealed before the sync failed, and what it writes anew after.
        let (stale, _) = chain_of(3, 3, prev, "refused");
        let (real, _) = chain_of(3, 2, prev, "kept");
        {
            let s = AuditStore::open(dir.path(), faults.clone()).unwrap();
            s.append(a.iter(), None).unwrap();
            assert_eq!(s.durable(), (1, 2));
            let group = s.write(stale.iter(), None).unwrap();
            assert_eq!(group, 2);
            faults.set(true);
            s.sync().unwrap_err();
            assert_eq!(
                s.durable(),
                (1, 2),
                "the failed sync made nothing more durable"
            );
        }
        faults.set(false);
        {
            // Reopened knowing 2 is the last durable record: 3-5 are not moved.
            let (s, at) = AuditStore::reopen(dir.path(), faults.clone(), 2).unwrap();
            assert_eq!(at, (2, prev));
            assert_eq!(s.head().unwrap().unwrap().sequence, 2);
            assert!(
                s.journal().unwrap().wal.read_all().unwrap().is_empty(),
                "forgotten"
            );
            s.append(real.iter(), None).unwrap();
            // A crash now: the journal holds the new 3-4, and the old 3-5 were forgotten.
            for f in [FILE_NAME, audit_wal::FILE_NAME] {
                std::fs::copy(dir.path().join(f), after.path().join(f)).unwrap();
            }
        }
        let s = AuditStore::open(after.path(), FaultSwitch::default()).unwrap();
        let got: Vec<AuditEvent> = s
            .read(1, 100)
            .unwrap()
            .into_iter()
            .map(|r| r.event.unwrap())
            .collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[2].hash, real[0].hash);
        assert_eq!(got[3].hash, real[1].hash);
        assert!(
            got.iter()
                .all(|e| e.attributes.get("what").map(String::as_str) != Some("refused"))
        );
    }

    #[test]
    fn after_a_failed_sync_nothing_more_is_written_or_known_durable_through_the_handle() {
        let dir = tempfile::tempdir().unwrap();
        let faults = FaultSwitch::default();
        let (a, prev) = chain(1, 1, record::GENESIS);
        let (b, _) = chain(2, 1, prev);
        let s = AuditStore::open(dir.path(), faults.clone()).unwrap();
        s.write(a.iter(), None).unwrap();
        faults.set_syncs(true);
        s.sync().unwrap_err();
        faults.set_syncs(false);
        // The kernel reports a write-back error once: a second sync would succeed without
        // the first group's pages on disk. The handle stays failed until reopened.
        s.sync().unwrap_err();
        s.write(b.iter(), None).unwrap_err();
        s.flush().unwrap_err();
        assert_eq!(s.durable(), (0, 0));
    }

    #[test]
    fn a_checkpoint_journaled_on_its_own_is_moved_after_a_crash_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let after = tempfile::tempdir().unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let (a, head) = chain(1, 3, record::GENESIS);
        {
            let s = AuditStore::open(dir.path(), FaultSwitch::default()).unwrap();
            s.append(a.iter(), None).unwrap();
            s.flush().unwrap();
            // A checkpoint made by time, with no record of its own: 3 is in the file.
            let cp = record::checkpoint(3, &head, 42, "k", &key);
            s.append(std::iter::empty(), Some(&cp)).unwrap();
            for f in [FILE_NAME, audit_wal::FILE_NAME] {
                std::fs::copy(dir.path().join(f), after.path().join(f)).unwrap();
            }
        }
        for _ in 0..2 {
            let s = AuditStore::open(after.path(), FaultSwitch::default()).unwrap();
            let cps = s.checkpoints().unwrap();
            assert_eq!(cps.len(), 1);
            assert_eq!(
                (cps[0].sequence, cps[0].head_hash.as_slice()),
                (3, &head[..])
            );
        }
    }

    #[test]
    fn journal_entries_that_do_not_continue_the_chain_are_not_moved() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = chain(1, 2, record::GENESIS);
        // Records 1 and 2 in the journal, written as if by another chain: a different
        // prev_hash for the first.
        {
            let mut w = Wal::open(dir.path(), FaultSwitch::default()).unwrap();
            w.begin();
            for e in &a {
                let mut e = e.clone();
                e.prev_hash = vec![9; 32];
                w.add(audit_wal::KIND_RECORD, |b| e.encode_raw(b));
            }
            w.write().unwrap();
        }
        let s = AuditStore::open(dir.path(), FaultSwitch::default()).unwrap();
        assert!(s.head().unwrap().is_none());
    }
}
