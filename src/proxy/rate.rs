//! The request rate of one connection (`limits.max_requests_per_second_per_connection`,
//! `limits.request_burst_per_connection`): a token bucket kept as GCRA, one atomic
//! "theoretical arrival time" per connection. A check is a clock read and a compare-and-swap:
//! no lock shared with other connections, no allocation.
//!
//! Calls over the limit are refused (`BUDGET_EXCEEDED`, `RESOURCE_EXHAUSTED`) without
//! reaching the host. Refusals draw on a second bucket of the same rate and burst: a peer
//! that keeps calling at over twice the limit exhausts it too, and its connection is then
//! closed (GOAWAY, cut off shortly after), so a hammering peer cannot make the sidecar
//! answer, log and audit refusals at any rate it likes.

use crate::config::RequestRate;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// The limit, in the units the check uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rate {
    /// Nanoseconds between two calls at the sustained rate.
    interval_ns: u64,
    /// How far ahead of the sustained rate a connection may be (the burst).
    tolerance_ns: u64,
}

impl Rate {
    pub fn new(r: RequestRate) -> Rate {
        let interval_ns = 1_000_000_000 / u64::from(r.per_second.max(1));
        Rate {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(r.burst.max(1) - 1)),
        }
    }
}

/// What the bucket says about one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allowed,
    /// Over the limit: refuse the call.
    Refused,
    /// Over the limit, and the refusals too: refuse the call and close the connection.
    Calm,
}

/// The buckets of one connection.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: Option<Rate>,
    start: Instant,
    calls: AtomicU64,
    refusals: AtomicU64,
    /// Set by the first `Calm`: the connection is being closed.
    closing: AtomicBool,
}

/// One GCRA step: whether a call at `now` fits, taking its slot if so.
fn take(tat: &AtomicU64, now: u64, rate: Rate) -> bool {
    let mut seen = tat.load(Ordering::Relaxed);
    loop {
        let base = seen.max(now);
        if base - now > rate.tolerance_ns {
            return false;
        }
        match tat.compare_exchange_weak(
            seen,
            base + rate.interval_ns,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => return true,
            Err(actual) => seen = actual,
        }
    }
}

impl Bucket {
    pub fn new(rate: Option<RequestRate>) -> Bucket {
        Bucket {
            rate: rate.map(Rate::new),
            start: Instant::now(),
            calls: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            closing: AtomicBool::new(false),
        }
    }

    /// Takes one call from the bucket.
    pub fn check(&self) -> Verdict {
        let Some(rate) = self.rate else {
            return Verdict::Allowed;
        };
        self.check_at(
            u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX),
            rate,
        )
    }

    /// True for exactly one caller: the one that closes the connection.
    pub fn close_once(&self) -> bool {
        !self.closing.swap(true, Ordering::Relaxed)
    }

    fn check_at(&self, now: u64, rate: Rate) -> Verdict {
        if take(&self.calls, now, rate) {
            Verdict::Allowed
        } else if take(&self.refusals, now, rate) {
            Verdict::Refused
        } else {
            Verdict::Calm
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn bucket(per_second: u32, burst: u32) -> (Bucket, Rate) {
        let r = RequestRate { per_second, burst };
        (Bucket::new(Some(r)), Rate::new(r))
    }

    #[test]
    fn a_burst_passes_then_the_sustained_rate() {
        let (b, r) = bucket(10, 5);
        let now = 5 * SECOND;
        for i in 0..5 {
            assert_eq!(
                b.check_at(now, r),
                Verdict::Allowed,
                "call {i} of the burst"
            );
        }
        assert_eq!(b.check_at(now, r), Verdict::Refused);
        // One interval later, one more call fits.
        assert_eq!(b.check_at(now + SECOND / 10, r), Verdict::Allowed);
        assert_eq!(b.check_at(now + SECOND / 10, r), Verdict::Refused);
        // After a quiet second the whole burst is back, and no more.
        let later = now + 2 * SECOND;
        let allowed = (0..20)
            .filter(|_| b.check_at(later, r) == Verdict::Allowed)
            .count();
        assert_eq!(allowed, 5);
    }

    #[test]
    fn refusals_have_a_bucket_of_their_own_and_exhausting_it_asks_for_calm() {
        let (b, r) = bucket(10, 3);
        let now = SECOND;
        let verdicts: Vec<Verdict> = (0..7).map(|_| b.check_at(now, r)).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Allowed,
                Verdict::Allowed,
                Verdict::Allowed,
                Verdict::Refused,
                Verdict::Refused,
                Verdict::Refused,
                Verdict::Calm,
            ]
        );
    }

    #[test]
    fn a_peer_at_the_rate_is_never_refused() {
        let (b, r) = bucket(100, 1);
        for i in 0..1000u64 {
            assert_eq!(
                b.check_at(i * SECOND / 100, r),
                Verdict::Allowed,
                "call {i}"
            );
        }
    }

    #[test]
    fn no_limit_allows_everything() {
        let b = Bucket::new(None);
        assert!((0..10_000).all(|_| b.check() == Verdict::Allowed));
    }
}
