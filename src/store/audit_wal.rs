//! The audit journal: `audit.wal` beside `audit.redb`, where a group of records becomes
//! durable. Groups are written to it one behind the other ([`Wal::put`]) and made durable by
//! a sync (one `fdatasync` of blocks the file already has), which may run on another thread
//! ([`WalSync`]) while the next groups are written. The file has two halves: records are
//! journaled into one while those of the other are moved into `audit.redb` (one durable
//! transaction, on a thread of its own); then the halves swap. After a crash, opening the store moves the records the journal has and
//! `audit.redb` lacks into `audit.redb` before anything else is written.
//!
//! Why: measured on this machine, a durable redb commit (file growth, pages, header) took
//! 330-440 µs, where writing and syncing blocks a file already holds took ~100 µs; in audit
//! mode `sync` every call waits for one.
//!
//! The file is created at its full size ([`CAPACITY`], zeros written, so no sync ever has to
//! record new blocks) with permissions 0600. Each entry:
//!
//! ```text
//! magic "AWL1" | kind u8 (1 record, 2 checkpoint) | 3 zero bytes | length u32 BE | CRC-32 u32 BE | payload
//! ```
//!
//! The CRC covers kind, length and payload; the payload is the protobuf `AuditEvent` or
//! `AuditCheckpoint` exactly as `audit.redb` stores it. Each half is read from its beginning
//! to its first torn entry; entries of earlier rounds may follow the current one, and the
//! reader tells them apart by sequence (they are in `audit.redb` already).

use super::StoreError;
use crate::store::audit::FaultSwitch;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "audit.wal";
/// The journal's size: two halves of ~10,000 records of ~800 bytes.
pub const CAPACITY: u64 = 16 << 20;
pub const HALF: u64 = CAPACITY / 2;
const MAGIC: &[u8; 4] = b"AWL1";
const HEADER: usize = 16;
pub const KIND_RECORD: u8 = 1;
pub const KIND_CHECKPOINT: u8 = 2;

pub struct Wal {
    file: File,
    path: PathBuf,
    /// The half being written, and where in it the next group goes.
    half: u64,
    at: u64,
    buf: Vec<u8>,
    faults: FaultSwitch,
}

/// One entry read back.
pub struct Entry {
    pub kind: u8,
    pub payload: Vec<u8>,
}

fn io(path: &Path, during: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        during,
        why: e.to_string(),
    }
}

impl Wal {
    /// Opens `dir/audit.wal`, creating it at its full size if it is missing or short.
    pub fn open(dir: &Path, faults: FaultSwitch) -> Result<Wal, StoreError> {
        let path = dir.join(FILE_NAME);
        let mut o = OpenOptions::new();
        o.read(true).write(true).create(true).truncate(false);
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let mut file = o
            .open(&path)
            .map_err(|e| io(&path, "opening the audit journal", e))?;
        let len = file
            .metadata()
            .map_err(|e| io(&path, "opening the audit journal", e))?
            .len();
        if len < CAPACITY {
            // Zeros written, not a hole: a sync of an overwrite then records no new blocks.
            faults
                .check()
                .and_then(|()| zero_fill(&file, len))
                .map_err(|e| io(&path, "creating the audit journal", e))?;
            file.flush()
                .and_then(|()| file.sync_all())
                .map_err(|e| io(&path, "creating the audit journal", e))?;
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(Wal {
            file,
            path,
            half: 0,
            at: 0,
            buf: Vec::with_capacity(256 << 10),
            faults,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entries of each half, from its beginning up to the first that is torn (bad
    /// magic, length or CRC). Which of them still matter is the caller's business (by
    /// sequence).
    pub fn read_all(&self) -> Result<Vec<Entry>, StoreError> {
        read_entries(&self.file, &self.path)
    }

    /// Starts a group.
    pub fn begin(&mut self) {
        self.buf.clear();
    }

    /// Adds an entry to the group: `encode` writes the payload.
    pub fn add(&mut self, kind: u8, encode: impl FnOnce(&mut Vec<u8>)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(MAGIC);
        self.buf.extend_from_slice(&[kind, 0, 0, 0]);
        self.buf.extend_from_slice(&[0; 8]);
        encode(&mut self.buf);
        let len = (self.buf.len() - start - HEADER) as u32;
        let crc = checksum(kind, len, &self.buf[start + HEADER..]);
        self.buf[start + 8..start + 12].copy_from_slice(&len.to_be_bytes());
        self.buf[start + 12..start + 16].copy_from_slice(&crc.to_be_bytes());
    }

    /// The group being built, as bytes.
    pub fn group(&self) -> &[u8] {
        &self.buf
    }

    /// Whether the group fits behind what is in the current half.
    pub fn fits(&self) -> bool {
        self.at + self.buf.len() as u64 <= HALF
    }

    /// The current half is more than half full: time to move it into the store.
    pub fn filling(&self) -> bool {
        self.at > HALF / 2
    }

    /// A group larger than a half (cannot happen with the configured limits: 10,000 records
    /// of the message size limit would).
    pub fn too_large(&self) -> bool {
        self.buf.len() as u64 > HALF
    }

    /// Writes the group and syncs it: once this returns `Ok`, the group is durable.
    pub fn write(&mut self) -> Result<(), StoreError> {
        self.put()?;
        self.sync()
    }

    /// Writes the group behind what the current half holds, without syncing it: durable
    /// once a sync that begins after this returns has succeeded.
    pub fn put(&mut self) -> Result<(), StoreError> {
        const W: &str = "writing the audit journal";
        self.faults.check().map_err(|e| io(&self.path, W, e))?;
        self.file
            .write_all_at(&self.buf, self.half * HALF + self.at)
            .map_err(|e| io(&self.path, W, e))?;
        self.at += self.buf.len() as u64;
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        sync(&self.file, &self.path, &self.faults)
    }

    /// A handle that syncs the journal from another thread, while groups are written.
    pub fn syncer(&self) -> Result<WalSync, StoreError> {
        Ok(WalSync {
            file: self
                .file
                .try_clone()
                .map_err(|e| io(&self.path, "opening the audit journal", e))?,
            path: self.path.clone(),
            faults: self.faults.clone(),
        })
    }

    /// Forgets every entry the file holds (they are all in `audit.redb`): the whole file
    /// is written with zeros and synced, and writing starts again at the first half. Done
    /// when the store is reopened after a failed write, so that records written but never
    /// made durable (their callers were refused; the writer seals them anew, with the same
    /// sequences) can never be read back beside their new versions.
    pub fn forget(&mut self) -> Result<(), StoreError> {
        const W: &str = "resetting the audit journal";
        self.faults
            .check()
            .and_then(|()| zero_fill(&self.file, 0))
            .map_err(|e| io(&self.path, W, e))?;
        self.sync()?;
        self.half = 0;
        self.at = 0;
        Ok(())
    }

    /// The other half is free (everything in it is durable in `audit.redb`): go on there.
    pub fn switch(&mut self) {
        self.half ^= 1;
        self.at = 0;
    }
}

/// Syncs the journal from a thread other than the one writing it.
pub struct WalSync {
    file: File,
    path: PathBuf,
    faults: FaultSwitch,
}

impl WalSync {
    /// Makes everything written to the journal so far durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        sync(&self.file, &self.path, &self.faults)
    }
}

fn sync(file: &File, path: &Path, faults: &FaultSwitch) -> Result<(), StoreError> {
    const W: &str = "syncing the audit journal";
    faults.check_sync().map_err(|e| io(path, W, e))?;
    file.sync_data().map_err(|e| io(path, W, e))
}

/// Writes zeros over the file from `from` to [`CAPACITY`] (blocks the file then holds, so a
/// later sync of an overwrite records no new ones).
fn zero_fill(file: &File, from: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut at = from;
    while at < CAPACITY {
        let n = zeros.len().min((CAPACITY - at) as usize);
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// The CRC-32 of an entry: kind, length, payload.
fn checksum(kind: u8, len: u32, payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    crc.update(&len.to_be_bytes());
    crc.update(payload);
    crc.finalize()
}

/// The entries (kind, payload) of bytes built by [`Wal::add`], in order.
pub fn entries(bytes: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let h = bytes.get(at..at + HEADER)?;
        let kind = h[4];
        let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
        let p = bytes.get(at + HEADER..at + HEADER + len)?;
        at += HEADER + len;
        Some((kind, p))
    })
}

/// Reads the entries of a journal file (the live one, or one beside a copy of the store):
/// each half from its beginning to its first torn entry.
pub fn read_entries(file: &File, path: &Path) -> Result<Vec<Entry>, StoreError> {
    const R: &str = "reading the audit journal";
    let len = file.metadata().map_err(|e| io(path, R, e))?.len();
    let mut out = Vec::new();
    for half in 0..2 {
        let end = ((half + 1) * HALF).min(len);
        let mut at = half * HALF;
        let mut h = [0u8; HEADER];
        while at + HEADER as u64 <= end {
            file.read_exact_at(&mut h, at).map_err(|e| io(path, R, e))?;
            if &h[..4] != MAGIC || h[5..8] != [0, 0, 0] {
                break;
            }
            let kind = h[4];
            let n = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            let want = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            if at + HEADER as u64 + u64::from(n) > end {
                break;
            }
            let mut payload = vec![0u8; n as usize];
            file.read_exact_at(&mut payload, at + HEADER as u64)
                .map_err(|e| io(path, R, e))?;
            if checksum(kind, n, &payload) != want {
                break;
            }
            out.push(Entry { kind, payload });
            at += HEADER as u64 + u64::from(n);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_until_the_first_torn_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open(dir.path(), FaultSwitch::default()).unwrap();
        assert_eq!(std::fs::metadata(w.path()).unwrap().len(), CAPACITY);
        w.begin();
        w.add(KIND_RECORD, |b| b.extend_from_slice(b"one"));
        w.add(KIND_CHECKPOINT, |b| b.extend_from_slice(b"two"));
        let p: Vec<(u8, Vec<u8>)> = entries(w.group()).map(|(k, p)| (k, p.to_vec())).collect();
        assert_eq!(p, vec![(1, b"one".to_vec()), (2, b"two".to_vec())]);
        w.write().unwrap();
        w.begin();
        w.add(KIND_RECORD, |b| b.extend_from_slice(b"three"));
        w.write().unwrap();
        let got = w.read_all().unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].payload, b"three");
        // A torn third entry: the first two are what is there.
        let f = OpenOptions::new().write(true).open(w.path()).unwrap();
        let third = (2 * HEADER + 6) as u64;
        f.write_all_at(b"X", third + HEADER as u64 + 1).unwrap();
        assert_eq!(w.read_all().unwrap().len(), 2);
        // The other half: its entries come after the first half's; a new round in the first
        // half leaves the old entries behind it readable (the caller tells them apart by
        // sequence).
        w.switch();
        w.begin();
        w.add(KIND_RECORD, |b| b.extend_from_slice(b"four"));
        w.write().unwrap();
        w.switch();
        w.begin();
        w.add(KIND_RECORD, |b| b.extend_from_slice(b"ONE"));
        w.write().unwrap();
        let got: Vec<Vec<u8>> = w
            .read_all()
            .unwrap()
            .into_iter()
            .map(|e| e.payload)
            .collect();
        assert_eq!(
            got,
            vec![b"ONE".to_vec(), b"two".to_vec(), b"four".to_vec()]
        );
        // Reopening keeps the file (no new zeros over what is there).
        drop(w);
        let w = Wal::open(dir.path(), FaultSwitch::default()).unwrap();
        assert_eq!(w.read_all().unwrap()[0].payload, b"ONE");
        assert_eq!(w.read_all().unwrap().len(), 3);
    }

    #[test]
    fn a_refused_write_leaves_the_position_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let faults = FaultSwitch::default();
        let mut w = Wal::open(dir.path(), faults.clone()).unwrap();
        w.begin();
        w.add(KIND_RECORD, |b| b.extend_from_slice(b"a"));
        faults.set(true);
        assert!(w.write().is_err());
        faults.set(false);
        w.write().unwrap();
        assert_eq!(w.read_all().unwrap().len(), 1);
    }
}
