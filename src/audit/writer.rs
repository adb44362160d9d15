//! The writer: one thread owns the chain. It receives records over a channel, gives each its
//! sequence, hash and signature, and commits them in groups (everything queued, up to
//! `batch_max_records`, in one durable transaction), adding a signed checkpoint every
//! `checkpoint_every_records` records or `checkpoint_every` of time.
//!
//! When a commit fails, the writer fails closed: every waiting call is told (the proxy
//! refuses it with `AUDIT_UNAVAILABLE`), readiness goes off, and the records are kept in
//! memory (up to `MAX_RETAINED`) while it reopens the file every second. When the disk is
//! back it writes them, then an `AUDIT_RECOVERED` record saying how long the outage lasted
//! and how many records, if any, could not be kept.

use super::key::AuditKey;
use super::record::{self, GENESIS};
use super::{AuditConfig, AuditError, Msg, now_nanos};
use crate::proto::aesp::{AuditCheckpoint, AuditEvent};
use crate::store::audit::{AuditStore, FaultSwitch};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Records kept in memory while the file cannot be written.
const MAX_RETAINED: usize = 100_000;
const RETRY: Duration = Duration::from_secs(1);
/// Groups at least this large are signed on two threads.
const PARALLEL_SIGNING: usize = 32;

/// A record the file cannot take now: its waiter is told (the call is refused, and its
/// record says so) and the record is kept for when the file is writable again, up to
/// [`MAX_RETAINED`] (beyond, it is counted as lost).
fn refuse_and_keep(p: Pending, retained: &mut Vec<AuditEvent>, lost: &mut u64) {
    let mut e = p.event;
    if let Some(tx) = p.done {
        if e.decision == "ALLOW" {
            e.attributes
                .insert("original_decision".into(), "ALLOW".into());
            e.decision = "DENY".into();
            e.reason_code = "AUDIT_UNAVAILABLE".into();
        }
        let _ = tx.send(Err(AuditError::Unavailable));
    }
    if retained.len() < MAX_RETAINED {
        retained.push(e);
    } else {
        *lost += 1;
    }
}

pub(super) struct Writer {
    pub cfg: AuditConfig,
    pub dir: PathBuf,
    pub faults: FaultSwitch,
    pub key: Arc<AuditKey>,
    pub store: Option<Arc<AuditStore>>,
    pub shared: Arc<arc_swap::ArcSwapOption<AuditStore>>,
    pub healthy: Arc<AtomicBool>,
    pub head: tokio::sync::watch::Sender<u64>,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Chain state: the last durable record.
    pub seq: u64,
    pub prev: [u8; 32],
    pub since_checkpoint: u64,
    pub last_checkpoint: Instant,
    /// When the last group was committed.
    pub last_commit: Instant,
}

/// One record waiting to be written, and who waits for it.
pub(super) struct Pending {
    pub event: AuditEvent,
    pub done: Option<tokio::sync::oneshot::Sender<Result<u64, AuditError>>>,
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Writer {
    pub fn run(mut self, rx: Receiver<Msg>) {
        let mut retained: Vec<AuditEvent> = Vec::new();
        let mut lost = 0u64;
        let mut outage: Option<(Instant, u64)> = None;
        let mut batch: Vec<Pending> = Vec::with_capacity(self.cfg.batch_max_records);
        let mut stop: Option<tokio::sync::oneshot::Sender<()>> = None;
        loop {
            let wait = if outage.is_some() {
                RETRY
            } else {
                self.cfg.checkpoint_every
            };
            match rx.recv_timeout(wait) {
                Ok(m) => self.take(m, &mut batch, &mut stop),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    if outage.is_none() && self.since_checkpoint > 0 {
                        let _ = self.commit(&mut Vec::new(), true);
                    }
                    return;
                }
            }
            // Everything queued joins this group, up to the batch size. With
            // `batch_max_delay`, groups are at least that far apart (fewer, larger commits);
            // a record arriving after a quiet spell is committed at once. Default 0: measured
            // on this machine, waiting cost mode sync more latency than it saved CPU.
            let deadline = self.last_commit + self.cfg.batch_max_delay;
            while batch.len() < self.cfg.batch_max_records && stop.is_none() {
                match rx.try_recv() {
                    Ok(m) => self.take(m, &mut batch, &mut stop),
                    Err(_) => {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        match rx.recv_timeout(deadline - now) {
                            Ok(m) => self.take(m, &mut batch, &mut stop),
                            Err(_) => break,
                        }
                    }
                }
            }

            if let Some((since, _)) = outage {
                // Failing: tell the waiters now, keep their records for later.
                for p in batch.drain(..) {
                    refuse_and_keep(p, &mut retained, &mut lost);
                }
                if !self.recover() {
                    if let Some(s) = stop.take() {
                        self.close(s);
                        return;
                    }
                    continue;
                }
                let mut r: Vec<Pending> = retained
                    .drain(..)
                    .map(|event| Pending {
                        event,
                        done: None,
                        permit: None,
                    })
                    .collect();
                let mut note = super::event("AUDIT_RECOVERED", "INFO");
                note.attributes
                    .insert("outage_ms".into(), since.elapsed().as_millis().to_string());
                note.attributes
                    .insert("records_kept".into(), r.len().to_string());
                note.attributes
                    .insert("records_lost".into(), lost.to_string());
                r.push(Pending {
                    event: note,
                    done: None,
                    permit: None,
                });
                match self.commit(&mut r, true) {
                    Ok(()) => {
                        tracing::warn!(
                            outage_ms = since.elapsed().as_millis() as u64,
                            lost,
                            "audit trail writable again: traffic resumes"
                        );
                        outage = None;
                        lost = 0;
                        self.healthy.store(true, Ordering::SeqCst);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "audit trail still not writable");
                        retained.extend(
                            r.into_iter()
                                .filter(|p| p.event.event_type != "AUDIT_RECOVERED")
                                .map(|p| p.event),
                        );
                        self.store = None;
                        self.shared.store(None);
                    }
                }
            } else {
                let due = self.since_checkpoint + batch.len() as u64
                    >= self.cfg.checkpoint_every_records
                    || (self.since_checkpoint + batch.len() as u64 > 0
                        && self.last_checkpoint.elapsed() >= self.cfg.checkpoint_every)
                    || stop.is_some();
                if batch.is_empty() && !due {
                    continue;
                }
                if let Err(e) = self.commit(&mut batch, due) {
                    tracing::error!(error = %e, "audit trail cannot be written: refusing traffic (fail closed)");
                    if let Some(m) = &self.metrics {
                        m.audit_write_failures.inc();
                    }
                    self.healthy.store(false, Ordering::SeqCst);
                    outage = Some((Instant::now(), 0));
                    for p in batch.drain(..) {
                        refuse_and_keep(p, &mut retained, &mut lost);
                    }
                    // redb refuses every operation after a failed write: reopen later.
                    self.store = None;
                    self.shared.store(None);
                }
            }
            if let Some(s) = stop.take() {
                self.close(s);
                return;
            }
        }
    }

    /// Closes the file, then says so: once `stop` returns, another writer may open it.
    fn close(&mut self, done: tokio::sync::oneshot::Sender<()>) {
        self.store = None;
        self.shared.store(None);
        let _ = done.send(());
    }

    fn take(
        &mut self,
        m: Msg,
        batch: &mut Vec<Pending>,
        stop: &mut Option<tokio::sync::oneshot::Sender<()>>,
    ) {
        match m {
            Msg::Record(p) => batch.push(*p),
            Msg::Stop(tx) => *stop = Some(tx),
        }
    }

    /// Reopens the file and resumes the chain from its last record.
    fn recover(&mut self) -> bool {
        if self.store.is_some() {
            return true;
        }
        match AuditStore::open(&self.dir, self.faults.clone()).and_then(|s| {
            let head = s.head()?;
            Ok((s, head))
        }) {
            Ok((s, head)) => {
                let (seq, prev) = head.map_or((0, GENESIS), |h| {
                    (h.sequence, h.hash.try_into().unwrap_or(GENESIS))
                });
                self.seq = seq;
                self.prev = prev;
                let s = Arc::new(s);
                self.store = Some(s.clone());
                self.shared.store(Some(s));
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "audit trail: reopening failed");
                false
            }
        }
    }

    /// Seals `batch` onto the chain and commits it (with a checkpoint if `checkpoint`);
    /// answers the waiters. On error nothing of the chain state moved.
    fn commit(
        &mut self,
        batch: &mut Vec<Pending>,
        checkpoint: bool,
    ) -> Result<(), crate::store::StoreError> {
        let Some(store) = self.store.clone() else {
            return Err(crate::store::StoreError::Io {
                path: self.dir.join(crate::store::audit::FILE_NAME),
                during: "appending audit records",
                why: "the file is not open".into(),
            });
        };
        let mut seq = self.seq;
        let mut prev = self.prev;
        let mut events = Vec::with_capacity(batch.len());
        for p in batch.iter() {
            let mut e = p.event.clone();
            seq += 1;
            e.sequence = seq;
            e.key_id.clone_from(&self.key.id);
            prev = record::link(&mut e, prev);
            events.push(e);
        }
        // The chain is sequential (and cheap); the signatures are not: a large group is
        // signed on two threads.
        let key = &self.key.fast;
        if events.len() >= PARALLEL_SIGNING {
            let half = events.len() / 2;
            let (a, b) = events.split_at_mut(half);
            std::thread::scope(|s| {
                s.spawn(|| a.iter_mut().for_each(|e| record::sign(e, key)));
                b.iter_mut().for_each(|e| record::sign(e, key));
            });
        } else {
            events.iter_mut().for_each(|e| record::sign(e, key));
        }
        let cp: Option<AuditCheckpoint> = (checkpoint && seq > 0)
            .then(|| record::checkpoint(seq, &prev, now_nanos(), &self.key.id, &self.key.fast));
        store.append(&events, cp.as_ref())?;
        self.last_commit = Instant::now();
        self.seq = seq;
        self.prev = prev;
        if cp.is_some() {
            self.since_checkpoint = 0;
            self.last_checkpoint = Instant::now();
        } else {
            self.since_checkpoint += events.len() as u64;
        }
        if let Some(m) = &self.metrics {
            m.audit_records.inc_by(events.len() as u64);
        }
        for (p, e) in batch.drain(..).zip(&events) {
            if let Some(tx) = p.done {
                let _ = tx.send(Ok(e.sequence));
            }
            drop(p.permit);
        }
        self.head.send_replace(seq);
        Ok(())
    }
}
