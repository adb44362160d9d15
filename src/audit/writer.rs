//! The writer: one thread owns the chain. It takes records from its inbox ([`super::queue`]),
//! gives each its sequence, hash and signature, and writes them in groups to the store's
//! journal (everything queued, up to `batch_max_records`; a group of records nobody waits
//! for is held up to `background_delay` to ride with the next), adding a signed checkpoint
//! every `checkpoint_every_records` records or `checkpoint_every` of time. A group is
//! durable once a sync of the journal that began after it was written has succeeded, and
//! only then are its waiters answered ([`Syncs`]): when nothing else is queued the writer
//! syncs at once itself; otherwise a syncer thread syncs while the writer seals and writes
//! the next group (one sync then makes every group written before it durable). Journaled
//! records are handed to the store's mover `apply_delay` later, or at once when a reader
//! asks (`Msg::Flush`).
//!
//! When a commit fails, the writer fails closed: every waiting call is told (the proxy
//! refuses it with `AUDIT_UNAVAILABLE`), readiness goes off, and the records are kept in
//! memory (up to `MAX_RETAINED`) while it reopens the file every second. When the disk is
//! back it writes them, then an `AUDIT_RECOVERED` record saying how long the outage lasted
//! and how many records, if any, could not be kept.

use super::key::AuditKey;
use super::queue::{Inbox, Msg};
use super::record;
use super::{AuditConfig, AuditError, now_nanos};
use crate::proto::aesp::{AuditCheckpoint, AuditEvent};
use crate::store::audit::{AuditStore, FaultSwitch};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Records kept in memory while the file cannot be written.
const MAX_RETAINED: usize = 100_000;
const RETRY: Duration = Duration::from_secs(1);
/// How soon to try again to hand records to a busy mover.
const RETRY_MOVE: Duration = Duration::from_millis(2);

/// A record the file cannot take now: its waiter is told (the call is refused, and its
/// record says so) and the record is kept for when the file is writable again, up to
/// [`MAX_RETAINED`] (beyond, it is counted as lost).
fn refuse_and_keep(p: Pending, retained: &mut Vec<AuditEvent>, lost: &mut u64) {
    let mut e = p.event;
    if let Some(tx) = p.done {
        mark_refused(&mut e);
        let _ = tx.send(Err(AuditError::Unavailable));
    }
    if retained.len() < MAX_RETAINED {
        retained.push(e);
    } else {
        *lost += 1;
    }
}

/// The record of a call refused because the trail could not record it: an allow becomes a
/// refusal with `AUDIT_UNAVAILABLE` (and says what it would have been).
pub(super) fn mark_refused(e: &mut AuditEvent) {
    if e.decision == "ALLOW" {
        e.attributes
            .insert("original_decision".into(), "ALLOW".into());
        e.decision = "DENY".into();
        e.reason_code = "AUDIT_UNAVAILABLE".into();
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
    pub head: Arc<tokio::sync::watch::Sender<u64>>,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    pub syncs: Arc<Syncs>,
    /// Chain state: the last record written (durable, or waiting for a sync).
    pub seq: u64,
    pub prev: [u8; 32],
    /// The last sequence known durable (where the chain resumes after a failed sync).
    pub durable: u64,
    pub since_checkpoint: u64,
    pub last_checkpoint: Instant,
    /// When the last group was committed.
    pub last_commit: Instant,
    /// Why the last attempt to reopen the store failed (said once, not every retry).
    pub reopen_error: Option<String>,
}

/// A group written to the journal, waiting for a sync to be durable.
struct Flight {
    store: Arc<AuditStore>,
    /// The store's number of the group.
    group: u64,
    pending: Vec<Pending>,
}

#[derive(Default)]
struct SyncState {
    /// In the order written.
    flights: VecDeque<Flight>,
    /// A sync is in progress (the syncer's or the writer's: never both).
    syncing: bool,
    /// A sync failed: the writer settles the flights and reopens the store.
    failed: Option<crate::store::StoreError>,
    closed: bool,
    /// Emptied groups, for the writer's next: a group's vector grown anew each time (and
    /// freed by another thread) cost the writer fresh pages, zeroed by the kernel.
    spare: Vec<Vec<Pending>>,
}

/// Emptied groups kept for reuse, at most.
const SPARE_GROUPS: usize = 8;

impl SyncState {
    fn keep(&mut self, emptied: impl IntoIterator<Item = Vec<Pending>>) {
        for v in emptied {
            if self.spare.len() < SPARE_GROUPS {
                self.spare.push(v);
            }
        }
    }
}

/// The groups waiting for a sync, shared by the writer and the syncer thread.
pub(super) struct Syncs {
    state: Mutex<SyncState>,
    cv: Condvar,
    inbox: Arc<Inbox>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Syncs {
    pub fn new(inbox: Arc<Inbox>, metrics: Option<Arc<crate::metrics::Metrics>>) -> Syncs {
        Syncs {
            state: Mutex::default(),
            cv: Condvar::new(),
            inbox,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, SyncState> {
        // A panic while holding it cannot leave the state half-changed in a way that
        // matters more than going on (flights are answered or dropped, never both).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One sync of everything written, if none is in progress and none has failed (`g`
    /// then has flights): answers the flights it made durable. On failure the writer is
    /// woken to settle them.
    fn step(&self, mut g: MutexGuard<'_, SyncState>) {
        let Some(store) = g.flights.back().map(|f| f.store.clone()) else {
            return;
        };
        g.syncing = true;
        drop(g);
        let done = store.sync();
        let mut g = self.lock();
        let mut answered = Vec::new();
        match done {
            Ok(synced) => {
                while g
                    .flights
                    .front()
                    .is_some_and(|f| Arc::ptr_eq(&f.store, &store) && f.group <= synced)
                {
                    answered.extend(g.flights.pop_front());
                }
            }
            Err(e) => {
                g.failed = Some(e);
                self.inbox.wake();
            }
        }
        drop(g);
        let emptied: Vec<_> = answered.into_iter().map(|f| self.answer(f)).collect();
        // Not idle before every handle on the store taken here is gone (once the writer
        // sees it idle, it may close the store and say it is closed).
        drop(store);
        let mut g = self.lock();
        g.syncing = false;
        g.keep(emptied);
        drop(g);
        self.cv.notify_all();
    }

    /// Syncs what is written and answers it, unless a sync is in progress (which will).
    fn settle(&self) {
        let g = self.idle();
        if g.failed.is_none() && !g.flights.is_empty() {
            self.step(g);
        }
    }

    /// Empties the queue once no sync is in progress (and clears a failure): the flights a
    /// sync made durable are answered; the records of the others are returned, in order.
    fn take_unsynced(&self) -> Vec<Pending> {
        let flights = {
            let mut g = self.idle();
            g.failed = None;
            std::mem::take(&mut g.flights)
        };
        let mut left = Vec::new();
        for f in flights {
            if f.group <= f.store.durable().0 {
                let _ = self.answer(f);
            } else {
                left.extend(f.pending);
            }
        }
        left
    }

    /// A durable group: its waiters go on. Returns the group's emptied vector.
    fn answer(&self, mut f: Flight) -> Vec<Pending> {
        if let Some(m) = &self.metrics {
            m.audit_records.inc_by(f.pending.len() as u64);
        }
        for p in f.pending.drain(..) {
            if let Some(tx) = p.done {
                let _ = tx.send(Ok(p.event.sequence));
            }
            drop(p.permit);
        }
        f.pending
    }

    /// The syncer thread: syncs whenever groups wait and no sync is in progress.
    fn run(&self) {
        let mut g = self.lock();
        loop {
            if g.closed && g.flights.is_empty() {
                return;
            }
            if !g.syncing && g.failed.is_none() && !g.flights.is_empty() {
                self.step(g);
                g = self.lock();
                continue;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits for a sync in progress to end.
    fn idle(&self) -> MutexGuard<'_, SyncState> {
        let mut g = self.lock();
        while g.syncing {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g
    }
}

/// Ends the syncer when the writer's loop ends, however it ends.
struct Closing(Arc<Syncs>);

impl Drop for Closing {
    fn drop(&mut self) {
        let left = {
            let mut g = self.0.lock();
            g.closed = true;
            std::mem::take(&mut g.flights)
        };
        self.0.cv.notify_all();
        drop(left);
    }
}

/// One record waiting to be written, and who waits for it.
pub(super) struct Pending {
    pub event: AuditEvent,
    pub done: Option<tokio::sync::oneshot::Sender<Result<u64, AuditError>>>,
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Writer {
    pub fn run(mut self, inbox: Arc<Inbox>) {
        inbox.set_writer(std::thread::current());
        let syncer = {
            let s = self.syncs.clone();
            std::thread::Builder::new()
                .name("aesp-audit-sync".into())
                .spawn(move || s.run())
        };
        let syncer = match syncer {
            Ok(t) => Some(t),
            Err(e) => {
                // The writer then syncs every group itself (correct, only slower).
                tracing::warn!(error = %e, "audit: cannot start the syncer thread; the writer syncs");
                None
            }
        };
        {
            // Even if the loop panics: the syncer ends, and waiters still queued are told
            // (their answer dropped: refused, fail closed) rather than left waiting.
            let _closing = Closing(self.syncs.clone());
            self.run_loop(&inbox, syncer.is_some());
        }
        if let Some(t) = syncer {
            let _ = t.join();
        }
    }

    fn run_loop(&mut self, inbox: &Inbox, syncer: bool) {
        let mut retained: Vec<AuditEvent> = Vec::new();
        let mut lost = 0u64;
        let mut outage: Option<(Instant, u64)> = None;
        let mut batch: Vec<Pending> = Vec::with_capacity(self.cfg.batch_max_records);
        let mut mail: Vec<Msg> = Vec::with_capacity(self.cfg.batch_max_records);
        let mut stop: Option<tokio::sync::oneshot::Sender<()>> = None;
        let mut flushes: Vec<tokio::sync::oneshot::Sender<bool>> = Vec::new();
        // Since when the group has held records nobody waits for (see `background_delay`).
        let mut held_since: Option<Instant> = None;
        loop {
            // Closed is read before the queue: everything sent before the last handle went
            // is in what is drained after.
            let closed = inbox.closed();
            inbox.drain(&mut mail);
            for m in mail.drain(..) {
                match m {
                    Msg::Record(p) => batch.push(p),
                    Msg::Stop(tx) => stop = Some(tx),
                    Msg::Flush(tx) => flushes.push(tx),
                }
            }
            if closed && stop.is_none() {
                if outage.is_none() && (self.since_checkpoint > 0 || !batch.is_empty()) {
                    let _ = self.commit_all(&mut batch, true, inbox, syncer);
                }
                let _ = self.apply(true);
                self.finish();
                return;
            }
            if outage.is_none() {
                let failed = self.syncs.lock().failed.take();
                if let Some(e) = failed {
                    self.fail(&e, &mut outage, &mut retained, &mut lost);
                }
            }

            if let Some((since, _)) = outage {
                held_since = None;
                // Nothing is readable that is not in audit.redb, and it cannot be written.
                for f in flushes.drain(..) {
                    let _ = f.send(false);
                }
                // Failing: tell the waiters now, keep their records for later.
                for p in batch.drain(..) {
                    refuse_and_keep(p, &mut retained, &mut lost);
                }
                if !self.recover() {
                    if let Some(s) = stop.take() {
                        self.close(s);
                        return;
                    }
                    inbox.park(RETRY, false);
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
                // Recovered once the records are durable, not just written.
                let done = self.commit_all(&mut r, true, inbox, syncer).and_then(|()| {
                    self.syncs.settle();
                    match self.syncs.lock().failed.take() {
                        Some(e) => Err(e),
                        None => Ok(()),
                    }
                });
                match done {
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
                        // The groups written before the failure first (their order kept),
                        // then those never written; the note is made anew next time.
                        self.settle_failed(&mut retained, &mut lost);
                        retained.extend(r.into_iter().map(|p| p.event));
                        retained.retain(|e| e.event_type != "AUDIT_RECOVERED");
                        self.store = None;
                        self.shared.store(None);
                    }
                }
            } else {
                let now = Instant::now();
                let pending = self.since_checkpoint + batch.len() as u64;
                let checkpoint = pending >= self.cfg.checkpoint_every_records
                    || (pending > 0 && now >= self.last_checkpoint + self.cfg.checkpoint_every)
                    || stop.is_some();
                let asked = stop.is_some() || !flushes.is_empty();
                if batch.is_empty() && !checkpoint && !asked {
                    held_since = None;
                    // Idle: move what the journal holds into audit.redb when it is due.
                    let mut wait = if self.since_checkpoint > 0 {
                        (self.last_checkpoint + self.cfg.checkpoint_every)
                            .saturating_duration_since(now)
                    } else {
                        self.cfg.checkpoint_every
                    };
                    match self.apply(false) {
                        Ok(Some(next)) => wait = wait.min(next.saturating_duration_since(now)),
                        Ok(None) => {}
                        Err(e) => {
                            self.fail(&e, &mut outage, &mut retained, &mut lost);
                            continue;
                        }
                    }
                    inbox.park(wait, false);
                    continue;
                }
                // With `batch_max_delay`, groups are at least that far apart (fewer, larger
                // commits). Default 0: measured on this machine, waiting cost mode sync more
                // latency than it saved CPU.
                let spaced = self.last_commit + self.cfg.batch_max_delay;
                // A group of records nobody waits for is held a little, so it rides with
                // the next decision's commit instead of costing a sync of its own.
                let held = *held_since.get_or_insert(now);
                let waited = batch.iter().any(|p| p.done.is_some());
                let until = if waited {
                    spaced
                } else {
                    spaced.max(held + self.cfg.background_delay)
                };
                if !checkpoint && !asked && batch.len() < self.cfg.batch_max_records && now < until
                {
                    inbox.park(until - now, !waited);
                    continue;
                }
                held_since = None;
                let mut done = Ok(());
                if !batch.is_empty() || checkpoint {
                    done = self.commit_all(&mut batch, checkpoint, inbox, syncer);
                }
                if done.is_ok() {
                    done = self.apply(asked).map(|_| ());
                }
                for f in flushes.drain(..) {
                    let _ = f.send(done.is_ok());
                }
                if let Err(e) = done {
                    self.fail(&e, &mut outage, &mut retained, &mut lost);
                    for p in batch.drain(..) {
                        refuse_and_keep(p, &mut retained, &mut lost);
                    }
                }
            }
            if let Some(s) = stop.take() {
                self.close(s);
                return;
            }
        }
    }

    /// The trail cannot be written: traffic is refused (fail closed) until the file is
    /// reopened.
    /// The groups written but not known durable are refused (their records kept, written
    /// anew once the store is back); those a sync did make durable are answered.
    fn fail(
        &mut self,
        e: &crate::store::StoreError,
        outage: &mut Option<(Instant, u64)>,
        retained: &mut Vec<AuditEvent>,
        lost: &mut u64,
    ) {
        tracing::error!(error = %e, "audit trail cannot be written: refusing traffic (fail closed)");
        if let Some(m) = &self.metrics {
            m.audit_write_failures.inc();
        }
        self.healthy.store(false, Ordering::SeqCst);
        *outage = Some((Instant::now(), 0));
        self.settle_failed(retained, lost);
        // redb refuses every operation after a failed write: reopen later.
        self.store = None;
        self.shared.store(None);
    }

    /// After a failure: the groups a sync made durable are answered, the others refused
    /// (their records kept, in order, to be written anew); the chain will resume after the
    /// last durable record.
    fn settle_failed(&mut self, retained: &mut Vec<AuditEvent>, lost: &mut u64) {
        for p in self.syncs.take_unsynced() {
            refuse_and_keep(p, retained, lost);
        }
        if let Some(s) = &self.store {
            self.durable = self.durable.max(s.durable().1);
        }
    }

    /// Moves the journaled records into audit.redb (where readers see them) if `now`
    /// (waiting until they are readable), or hands them to the store's mover if it is due
    /// (`apply_delay` after the oldest was journaled, or the journal's half filling up).
    /// `Ok(Some(t))`: records still wait, until `t`.
    fn apply(&mut self, now: bool) -> Result<Option<Instant>, crate::store::StoreError> {
        let Some(store) = self.store.clone() else {
            return Ok(None);
        };
        if now {
            store.flush()?;
            // Everything written is durable now: its waiters go on.
            self.syncs.settle();
            return Ok(None);
        }
        let (since, filling) = store.waiting();
        let Some(since) = since else {
            return Ok(None);
        };
        let at = since + self.cfg.apply_delay;
        if !filling && Instant::now() < at {
            return Ok(Some(at));
        }
        if store.move_due()? {
            Ok(None)
        } else {
            // The mover is still at the other half.
            Ok(Some(Instant::now() + RETRY_MOVE))
        }
    }

    /// Closes the file, then says so: once `stop` returns, another writer may open it.
    fn close(&mut self, done: tokio::sync::oneshot::Sender<()>) {
        let _ = self.apply(true);
        self.finish();
        self.store = None;
        self.shared.store(None);
        let _ = done.send(());
    }

    /// The end: every group written is answered, durable or refused (nothing more will
    /// be written).
    fn finish(&mut self) {
        self.syncs.settle();
        let left = self.syncs.take_unsynced();
        let n = left.len();
        for p in left {
            if let Some(tx) = p.done {
                let _ = tx.send(Err(AuditError::Unavailable));
            }
        }
        if n > 0 {
            tracing::error!(
                records = n,
                "audit trail: records written but not made durable before the stop are lost"
            );
        }
    }

    /// Reopens the file and resumes the chain from its last record.
    fn recover(&mut self) -> bool {
        if self.store.is_some() {
            return true;
        }
        // As at the start: a chain is never resumed from a head it cannot link to.
        match AuditStore::reopen(&self.dir, self.faults.clone(), self.durable) {
            Ok((s, (seq, prev))) => {
                self.reopen_error = None;
                self.seq = seq;
                self.prev = prev;
                self.durable = seq;
                let head = self.head.clone();
                s.on_moved(move |seq| {
                    head.send_replace(seq);
                });
                let s = Arc::new(s);
                self.store = Some(s.clone());
                self.shared.store(Some(s));
                true
            }
            Err(e) => {
                // Tried every second while failing: said once per distinct reason. A file the
                // chain cannot resume from is not a disk that may come back: someone has to
                // look at it.
                let why = e.to_string();
                if self.reopen_error.as_deref() != Some(why.as_str()) {
                    if matches!(e, crate::store::StoreError::Corrupt { .. }) {
                        tracing::error!(error = %why, "audit trail cannot resume: traffic stays refused");
                    } else {
                        tracing::debug!(error = %why, "audit trail: reopening failed");
                    }
                    self.reopen_error = Some(why);
                }
                false
            }
        }
    }

    /// Commits `batch` in groups of at most `batch_max_records`, the checkpoint (if any)
    /// with the last. On error the rest stays in `batch`.
    fn commit_all(
        &mut self,
        batch: &mut Vec<Pending>,
        checkpoint: bool,
        inbox: &Inbox,
        syncer: bool,
    ) -> Result<(), crate::store::StoreError> {
        let max = self.cfg.batch_max_records.max(1);
        if batch.len() <= max {
            return self.commit(batch, checkpoint, inbox, syncer);
        }
        let mut rest = batch.split_off(max);
        loop {
            let last = rest.is_empty();
            if let Err(e) = self.commit(batch, checkpoint && last, inbox, syncer) {
                batch.append(&mut rest);
                return Err(e);
            }
            if last {
                return Ok(());
            }
            let tail = rest.split_off(rest.len().min(max));
            *batch = std::mem::replace(&mut rest, tail);
        }
    }

    /// Seals `batch` onto the chain and writes it to the journal (with a checkpoint if
    /// `checkpoint`); its waiters are answered once a sync has made it durable: at once by
    /// this thread if nothing else waits to be written (or there is no syncer thread),
    /// else by the syncer while this thread goes on with the next group. On error nothing
    /// of the chain state moved (the records keep the sequence and hashes given here; the
    /// next attempt gives them anew) and the records stay in `batch`.
    fn commit(
        &mut self,
        batch: &mut Vec<Pending>,
        checkpoint: bool,
        inbox: &Inbox,
        syncer: bool,
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
        let key = &self.key.fast;
        for p in batch.iter_mut() {
            let e = &mut p.event;
            seq += 1;
            e.sequence = seq;
            e.key_id.clone_from(&self.key.id);
            prev = record::link(e, prev);
            record::sign(e, key);
        }
        let cp: Option<AuditCheckpoint> = (checkpoint && seq > 0)
            .then(|| record::checkpoint(seq, &prev, now_nanos(), &self.key.id, &self.key.fast));
        let group = store.write(batch.iter().map(|p| &p.event), cp.as_ref())?;
        self.last_commit = Instant::now();
        self.seq = seq;
        self.prev = prev;
        if cp.is_some() {
            self.since_checkpoint = 0;
            self.last_checkpoint = Instant::now();
        } else {
            self.since_checkpoint += batch.len() as u64;
        }
        let mut g = self.syncs.lock();
        let spare = g.spare.pop().unwrap_or_default();
        g.flights.push_back(Flight {
            store,
            group,
            pending: std::mem::replace(batch, spare),
        });
        if !g.syncing && g.failed.is_none() && (!syncer || !inbox.urgent()) {
            self.syncs.step(g);
        } else {
            drop(g);
            self.syncs.cv.notify_all();
        }
        Ok(())
    }
}
