//! The audit trail: every decision and every significant event as one signed, hash-chained
//! record in `state_dir/audit.redb`. The format (the exact bytes hashed and signed) is
//! `docs/audit-format.md`.
//!
//! - [`record`]: canonical bytes, chain hash, signatures, checkpoints;
//! - [`key`]: the Ed25519 signing key (a PKCS#8 PEM file, or `state_dir/audit.key`);
//! - [`writer`]: the one thread that owns the chain (group commit, checkpoints, fail closed);
//! - [`verify`]: the verifier, naming the first fault by sequence and kind;
//! - [`export`]: JSON lines, each record verifiable on its own.
//!
//! [`Audit`] is the handle the rest of the sidecar holds: [`Audit::commit`] for a decision
//! that must be durable before the call goes on (mode `sync`), [`Audit::log`] for everything
//! recorded without holding anything up.

pub mod export;
pub mod key;
pub mod offline;
mod queue;
pub mod record;
pub mod verify;
mod writer;

use queue::Msg;

use crate::proto::aesp::AuditEvent;
use crate::store::audit::{AuditStore, FaultSwitch};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// When a call may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A call is forwarded (or answered) only once its decision record is durable.
    Sync,
    /// Records are queued and written in the background: a crash loses those not yet
    /// committed (at most one group, and what was queued behind it).
    Async,
}

/// The `audit` section of the configuration.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub enabled: bool,
    pub mode: Mode,
    /// A PKCS#8 PEM Ed25519 private key; `None`: `state_dir/audit.key`, created if missing.
    pub key_file: Option<PathBuf>,
    pub batch_max_records: usize,
    pub batch_max_delay: Duration,
    /// How long a record nobody waits for (a tool's result, a session event, every record
    /// in mode `async`) may wait to ride with the next group: such records are committed
    /// with the next decision someone waits on, or after this long at the latest.
    pub background_delay: Duration,
    /// How long records durable in the journal (`audit.wal`) may wait before they are moved
    /// into `audit.redb`, where readers in other processes see them (the management API
    /// asks for them first, so it always sees every durable record).
    pub apply_delay: Duration,
    pub checkpoint_every_records: u64,
    pub checkpoint_every: Duration,
    /// Records queued before callers wait (back-pressure).
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            mode: Mode::Sync,
            key_file: None,
            batch_max_records: 256,
            batch_max_delay: Duration::ZERO,
            background_delay: Duration::from_millis(5),
            apply_delay: Duration::from_millis(50),
            checkpoint_every_records: 1000,
            checkpoint_every: Duration::from_secs(10),
            queue: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("the audit trail cannot record the decision")]
    Unavailable,
}

/// Nanoseconds since the Unix epoch.
pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A new record of `event_type` with `decision`, stamped now.
pub fn event(event_type: &str, decision: &str) -> AuditEvent {
    AuditEvent {
        timestamp_unix_nanos: now_nanos(),
        event_type: event_type.to_string(),
        decision: decision.to_string(),
        ..Default::default()
    }
}

/// The running audit trail.
#[derive(Clone)]
pub struct Audit {
    tx: Arc<queue::Sender>,
    permits: Arc<tokio::sync::Semaphore>,
    mode: Mode,
    healthy: Arc<AtomicBool>,
    head: tokio::sync::watch::Receiver<u64>,
    store: Arc<arc_swap::ArcSwapOption<AuditStore>>,
    pub key_id: Arc<str>,
    pub public_key: ed25519_dalek::VerifyingKey,
    signer: Arc<key::AuditKey>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("mode", &self.mode)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// Opens `state_dir/audit.redb`, loads (or creates) the key, resumes the chain and starts
    /// the writer. A new key (first start, or a key file that changed) is recorded first.
    pub fn start(
        cfg: &AuditConfig,
        state_dir: &Path,
        faults: FaultSwitch,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> anyhow::Result<Audit> {
        let key = Arc::new(key::AuditKey::load_or_create(
            cfg.key_file.as_deref(),
            state_dir,
        )?);
        let store = AuditStore::open(state_dir, faults.clone())?;
        let head = store.head()?;
        let (seq, prev) = store.resume_at(head.as_ref())?;
        let last_key = head.map(|h| h.key_id);
        let public_key = key.public();
        let signer = key.clone();
        let key_id: Arc<str> = Arc::from(key.id.as_str());
        let store = Arc::new(store);
        let shared = Arc::new(arc_swap::ArcSwapOption::from(Some(store.clone())));
        let healthy = Arc::new(AtomicBool::new(true));
        let (head_tx, head_rx) = tokio::sync::watch::channel(seq);
        let head_tx = Arc::new(head_tx);
        {
            let head = head_tx.clone();
            store.on_moved(move |seq| {
                head.send_replace(seq);
            });
        }
        let inbox = Arc::new(queue::Inbox::new(cfg.batch_max_records));
        let tx = Arc::new(queue::Sender(inbox.clone()));
        let w = writer::Writer {
            cfg: cfg.clone(),
            dir: state_dir.to_path_buf(),
            faults,
            key,
            store: Some(store),
            shared: shared.clone(),
            healthy: healthy.clone(),
            head: head_tx,
            syncs: Arc::new(writer::Syncs::new(inbox.clone(), metrics.clone())),
            metrics,
            seq,
            prev,
            durable: seq,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            last_commit: Instant::now(),
            reopen_error: None,
        };
        std::thread::Builder::new()
            .name("aesp-audit-writer".into())
            .spawn(move || w.run(inbox))
            .context("cannot start the audit writer")?;
        let audit = Audit {
            tx,
            permits: Arc::new(tokio::sync::Semaphore::new(cfg.queue.max(1))),
            mode: cfg.mode,
            healthy,
            head: head_rx,
            store: shared,
            key_id,
            public_key,
            signer,
        };
        if last_key.as_deref() != Some(&*audit.key_id) {
            let kind = if last_key.is_some() {
                "AUDIT_KEY_ROTATED"
            } else {
                "AUDIT_KEY_ADDED"
            };
            let mut e = event(kind, "INFO");
            e.attributes.insert(
                "public_key".into(),
                record::hex(audit.public_key.as_bytes()),
            );
            if let Some(prev) = last_key {
                e.attributes.insert("previous_key_id".into(), prev);
            }
            audit.log(e);
        }
        Ok(audit)
    }

    /// Signs a compliance report with the audit key (fills `key_id` and the signature).
    pub fn sign_report(&self, r: &mut crate::proto::aesp::ComplianceReport) {
        use record::Sign;
        r.key_id = self.key_id.to_string();
        r.report_signature = self.signer.fast.sign64(&record::report_bytes(r));
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether the last write succeeded (readiness).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The sequence of the last durable record, changing as records are committed.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.head.clone()
    }

    /// Moves every durable record into `audit.redb`, where readers see it; `false` if the
    /// trail cannot be written now. Readers of this process call it before they read.
    pub async fn flush(&self) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.0.push(Msg::Flush(tx));
        matches!(
            tokio::time::timeout(Duration::from_secs(10), rx).await,
            Ok(Ok(true))
        )
    }

    /// The store, for reads (`None` while the file is being reopened after a failure).
    pub fn store(&self) -> Option<Arc<AuditStore>> {
        self.store.load_full()
    }

    /// Queues `e` without waiting (never lost: beyond the queue size it is queued anyway).
    pub fn log(&self, e: AuditEvent) {
        let permit = self.permits.clone().try_acquire_owned().ok();
        self.send(e, None, permit);
    }

    fn send(
        &self,
        event: AuditEvent,
        done: Option<tokio::sync::oneshot::Sender<Result<u64, AuditError>>>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        self.tx.0.push(Msg::Record(writer::Pending {
            event,
            done,
            permit,
        }));
    }

    /// Queues `e`, waiting for room (back-pressure); in mode `sync` also waits until it is
    /// durable. `Err`: the trail cannot record it, and the call must be refused.
    pub async fn commit(&self, e: AuditEvent) -> Result<(), AuditError> {
        if !self.healthy() && self.mode == Mode::Sync {
            // Failing closed: the writer still keeps the record for when the disk is back,
            // as refused (it may be back by the time the writer takes it: the record must
            // say what the caller was told).
            let mut e = e;
            writer::mark_refused(&mut e);
            self.send(e, None, None);
            return Err(AuditError::Unavailable);
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AuditError::Unavailable)?;
        match self.mode {
            Mode::Async => {
                self.send(e, None, Some(permit));
                Ok(())
            }
            Mode::Sync => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.send(e, Some(tx), Some(permit));
                match rx.await {
                    Ok(Ok(_)) => Ok(()),
                    _ => Err(AuditError::Unavailable),
                }
            }
        }
    }

    /// Records the stop, writes a last checkpoint and waits for the writer to finish.
    pub async fn stop(&self, e: AuditEvent) {
        self.log(e);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.0.push(Msg::Stop(tx));
        let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
    }
}
