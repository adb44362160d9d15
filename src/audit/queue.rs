//! The writer's inbox: a queue under a mutex, and a rule for when a sender wakes the
//! writer. A record someone waits for (a decision in mode `sync`) always wakes it; a record
//! nobody waits for (a tool's result, a session event, every record in mode `async`) wakes
//! it only when it is idle, so a burst of such records costs the writer one wake-up rather
//! than one each (measured: the wake-ups of a channel per record were most of the writer's
//! time that was neither signing nor writing).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;

/// The writer's state, as senders see it.
const BUSY: u8 = 0;
/// Parked with nothing held: any record wakes it.
const IDLE: u8 = 1;
/// Parked holding records nobody waits for: only a waited record, a stop or a full group
/// wakes it before its deadline.
const HOLDING: u8 = 2;

// Nearly every message is a record: boxing it would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub(super) enum Msg {
    Record(super::writer::Pending),
    Stop(tokio::sync::oneshot::Sender<()>),
    /// Move what is journaled into audit.redb now (a reader wants to see it).
    Flush(tokio::sync::oneshot::Sender<bool>),
}

pub(super) struct Inbox {
    items: Mutex<Vec<Msg>>,
    state: AtomicU8,
    closed: AtomicBool,
    /// A message that must be acted on at once is queued (cleared when drained).
    urgent: AtomicBool,
    writer: OnceLock<Thread>,
    /// A group this large is committed without waiting for its deadline.
    full: usize,
}

impl Inbox {
    pub fn new(full: usize) -> Inbox {
        Inbox {
            items: Mutex::new(Vec::with_capacity(full)),
            state: AtomicU8::new(BUSY),
            closed: AtomicBool::new(false),
            urgent: AtomicBool::new(false),
            writer: OnceLock::new(),
            full: full.max(1),
        }
    }

    /// Called by the writer thread once, before it first parks.
    pub fn set_writer(&self, t: Thread) {
        let _ = self.writer.set(t);
    }

    /// Wakes the writer (also for something other than a message: a failed sync).
    pub fn wake(&self) {
        if let Some(t) = self.writer.get() {
            t.unpark();
        }
    }

    /// Whether a message the writer must act on at once is queued.
    pub fn urgent(&self) -> bool {
        self.urgent.load(Ordering::SeqCst)
    }

    /// Queues `m`; wakes the writer if it must act on it now.
    pub fn push(&self, m: Msg) {
        let urgent = match &m {
            Msg::Record(p) => p.done.is_some(),
            Msg::Stop(_) | Msg::Flush(_) => true,
        };
        let len = match self.items.lock() {
            Ok(mut q) => {
                q.push(m);
                if urgent {
                    self.urgent.store(true, Ordering::SeqCst);
                }
                q.len()
            }
            // A writer that panicked holding the lock: nothing will read the queue again
            // (waiters see their answer dropped: refused, fail closed).
            Err(_) => return,
        };
        let state = self.state.load(Ordering::SeqCst);
        if urgent || state == IDLE || len >= self.full {
            self.wake();
        }
    }

    /// Takes everything queued into `into` (which the writer keeps empty between calls).
    pub fn drain(&self, into: &mut Vec<Msg>) {
        if let Ok(mut q) = self.items.lock() {
            std::mem::swap(&mut *q, into);
            self.urgent.store(false, Ordering::SeqCst);
        }
    }

    /// The writer parks until woken or `timeout`. `holding`: it holds records nobody waits
    /// for (only urgent records wake it). Returns at once if something came in meanwhile
    /// that would have woken it.
    pub fn park(&self, timeout: std::time::Duration, holding: bool) {
        self.state
            .store(if holding { HOLDING } else { IDLE }, Ordering::SeqCst);
        let pending = self.items.lock().map_or(0, |q| q.len());
        if (pending == 0 || holding) && !self.closed.load(Ordering::SeqCst) {
            std::thread::park_timeout(timeout);
        }
        self.state.store(BUSY, Ordering::SeqCst);
    }

    /// Every handle on the trail is gone: the writer finishes what is queued and ends.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake();
    }

    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// The senders' side: when the last handle on the trail goes, the writer is told.
pub(super) struct Sender(pub std::sync::Arc<Inbox>);

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.close();
    }
}
