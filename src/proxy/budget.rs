//! Bytes held for inspection, bounded per connection and in total.
//!
//! A gRPC message that spans several DATA frames is assembled before it is inspected. Before
//! the bytes of such a message are read, its declared size is reserved from the
//! connection's budget (`limits.max_buffered_bytes_per_connection`) and then from the
//! sidecar's (`limits.max_buffered_bytes`). Until the reservation is granted the body is not
//! read, so HTTP/2 flow control holds the peer back: what a peer has not been allowed to send
//! cannot be buffered. A message that fits in the frame it arrived in needs no reservation
//! (its bytes are already there, bounded by the HTTP/2 frame size), and a reservation is
//! released as soon as the message is complete.
//!
//! Reservations are taken connection first, then total; nothing waits for the connection's
//! budget while holding the total's, so waiting cannot go round in a circle. A message that
//! waits longer than `limits.message_timeout_ms` (for its bytes or for its reservation)
//! ends its call.

use prometheus::IntGauge;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;

/// The sidecar-wide budget and the gauge that shows what is held of it.
#[derive(Clone, Debug)]
pub(crate) struct Total {
    pub semaphore: Arc<Semaphore>,
    /// `aesp_buffered_bytes`.
    pub gauge: IntGauge,
}

/// The budgets a call's messages draw from: its connection's and the sidecar's.
#[derive(Clone, Debug)]
pub(crate) struct Budget {
    conn: Arc<Semaphore>,
    total: Arc<Semaphore>,
    gauge: IntGauge,
}

impl Budget {
    /// A new connection's budget of `per_connection` bytes, drawing on `total`.
    pub fn for_connection(per_connection: usize, total: &Total) -> Budget {
        Budget {
            conn: Arc::new(Semaphore::new(per_connection)),
            total: total.semaphore.clone(),
            gauge: total.gauge.clone(),
        }
    }

    /// Reserves `bytes` (waits, without reading, until they are free).
    pub async fn reserve(&self, bytes: usize) -> Reservation {
        let n = permits(bytes);
        let conn = self.conn.clone().acquire_many_owned(n).await.ok();
        let total = self.total.clone().acquire_many_owned(n).await.ok();
        Reservation {
            bytes,
            _conn: conn,
            _total: total,
            gauge: Held::new(&self.gauge, bytes),
        }
    }
}

/// Counts bytes in the gauge while alive.
#[derive(Debug)]
struct Held {
    gauge: IntGauge,
    bytes: i64,
}

impl Held {
    fn new(gauge: &IntGauge, bytes: usize) -> Held {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        gauge.add(bytes);
        Held {
            gauge: gauge.clone(),
            bytes,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.sub(self.bytes);
    }
}

fn permits(bytes: usize) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Bytes reserved for one message; released on drop.
#[derive(Debug)]
pub(crate) struct Reservation {
    pub bytes: usize,
    _conn: Option<OwnedSemaphorePermit>,
    _total: Option<OwnedSemaphorePermit>,
    #[allow(dead_code)] // held for its Drop
    gauge: Held,
}

/// The poll-based side of a [`Budget`], for a body that reserves as it is polled.
pub(crate) struct Reserver {
    conn: PollSemaphore,
    total: PollSemaphore,
    /// The bytes wanted now, and the permits that hold them once granted.
    target: usize,
    conn_permit: Option<OwnedSemaphorePermit>,
    total_permit: Option<OwnedSemaphorePermit>,
    gauge: IntGauge,
    counted: Option<Held>,
}

impl Reserver {
    pub fn new(b: &Budget) -> Reserver {
        Reserver {
            conn: PollSemaphore::new(b.conn.clone()),
            total: PollSemaphore::new(b.total.clone()),
            target: 0,
            conn_permit: None,
            total_permit: None,
            gauge: b.gauge.clone(),
            counted: None,
        }
    }

    /// Ready once exactly `need` bytes are held (0 releases everything).
    pub fn poll_hold(&mut self, cx: &mut Context<'_>, need: usize) -> Poll<()> {
        if need != self.target {
            self.counted = None;
            self.conn_permit = None;
            self.total_permit = None;
            // A pending acquisition may already hold part of its permits: start afresh.
            self.conn = PollSemaphore::new(self.conn.clone_inner());
            self.total = PollSemaphore::new(self.total.clone_inner());
            self.target = need;
        }
        if need == 0 {
            return Poll::Ready(());
        }
        let n = permits(need);
        if self.conn_permit.is_none() {
            match self.conn.poll_acquire_many(cx, n) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(p) => self.conn_permit = p,
            }
        }
        if self.total_permit.is_none() {
            match self.total.poll_acquire_many(cx, n) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(p) => {
                    self.total_permit = p;
                    self.counted = Some(Held::new(&self.gauge, need));
                }
            }
        }
        Poll::Ready(())
    }

    /// Bytes held now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        if self.conn_permit.is_some() && self.total_permit.is_some() {
            self.target
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test]
    async fn reservations_wait_for_both_budgets_and_release_on_drop() {
        let total = Arc::new(Semaphore::new(100));
        let t = Total {
            semaphore: total.clone(),
            gauge: IntGauge::new("g", "g").unwrap(),
        };
        let a = Budget::for_connection(60, &t);
        let b = Budget::for_connection(60, &t);
        let r1 = a.reserve(50).await;
        assert_eq!(r1.bytes, 50);
        assert_eq!(t.gauge.get(), 50);
        // a's connection budget has 10 left: a second 20-byte message waits.
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), a.reserve(20));
        assert!(waiting.await.is_err());
        // b draws on the total: 50 left.
        let r2 = b.reserve(50).await;
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), b.reserve(5));
        assert!(waiting.await.is_err(), "the total is spent");
        drop(r1);
        let r3 = tokio::time::timeout(std::time::Duration::from_secs(1), b.reserve(5))
            .await
            .unwrap();
        drop((r2, r3));
        assert_eq!(total.available_permits(), 100);
        assert_eq!(t.gauge.get(), 0);
    }

    #[tokio::test]
    async fn a_reserver_holds_exactly_what_the_message_needs() {
        let total = Arc::new(Semaphore::new(100));
        let t = Total {
            semaphore: total.clone(),
            gauge: IntGauge::new("g", "g").unwrap(),
        };
        let budget = Budget::for_connection(80, &t);
        let mut r = Reserver::new(&budget);
        poll_fn(|cx| r.poll_hold(cx, 70)).await;
        assert_eq!(r.held(), 70);
        assert_eq!(total.available_permits(), 30);
        assert_eq!(t.gauge.get(), 70);
        // Another message of the same connection cannot get more than the 10 left.
        let mut other = Reserver::new(&budget);
        let pending = poll_fn(|cx| Poll::Ready(other.poll_hold(cx, 20))).await;
        assert!(pending.is_pending());
        poll_fn(|cx| r.poll_hold(cx, 0)).await;
        assert_eq!(r.held(), 0);
        assert_eq!(total.available_permits(), 100);
        assert_eq!(t.gauge.get(), 0);
        poll_fn(|cx| other.poll_hold(cx, 20)).await;
        assert_eq!(other.held(), 20);
    }
}
