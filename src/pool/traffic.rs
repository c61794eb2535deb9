//! A pool's request counters as the data path records them: requests, errors, aborted, and a
//! latency histogram with the longest request of the period — relaxed atomics only, a few adds
//! per finished request. The status page's history (`admin::history`) samples them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the latency buckets, in milliseconds (the last one catches everything). Fine
/// above 10 s too: inference requests of a minute or more are ordinary.
const BUCKETS_MS: [u64; 29] = [
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    300,
    500,
    750,
    1_000,
    1_500,
    2_000,
    3_000,
    5_000,
    7_500,
    10_000,
    15_000,
    20_000,
    30_000,
    45_000,
    60_000,
    90_000,
    120_000,
    180_000,
    300_000,
    600_000,
    u64::MAX,
];

/// How many latency buckets there are.
pub const BUCKETS: usize = BUCKETS_MS.len();

/// How a finished request ended, for the pool's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// A 5xx answer, or a stream the backend broke.
    Failed,
    /// The client went away (or was cut off) before the end: not an error of the pool's.
    Aborted,
}

impl Outcome {
    pub fn of(failed: bool) -> Self {
        if failed {
            Outcome::Failed
        } else {
            Outcome::Ok
        }
    }
}

/// A pool's request counters, carried across snapshots with the pool's state.
#[derive(Debug, Default)]
pub struct Traffic {
    requests: AtomicU64,
    errors: AtomicU64,
    aborted: AtomicU64,
    latency: [AtomicU64; BUCKETS_MS.len()],
    /// The longest request since the sampler last took it, ms.
    max_ms: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub aborted: u64,
    pub latency: [u64; BUCKETS_MS.len()],
}

impl Traffic {
    /// One finished request (its answer sent, failed, or left by its client).
    #[inline]
    pub fn record(&self, outcome: Outcome, seconds: f64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Ok => {}
            Outcome::Failed => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Aborted => {
                self.aborted.fetch_add(1, Ordering::Relaxed);
            }
        }
        let ms = (seconds * 1000.0) as u64;
        let i = BUCKETS_MS.iter().position(|&b| ms <= b).unwrap_or(BUCKETS_MS.len() - 1);
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        // Written only by a new maximum: the common request only reads the line.
        if ms > self.max_ms.load(Ordering::Relaxed) {
            self.max_ms.fetch_max(ms, Ordering::Relaxed);
        }
    }

    pub fn totals(&self) -> Totals {
        Totals {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            aborted: self.aborted.load(Ordering::Relaxed),
            latency: std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed)),
        }
    }

    /// The longest request since the last call, and starts the next period.
    pub fn take_max_ms(&self) -> u64 {
        self.max_ms.swap(0, Ordering::Relaxed)
    }
}

/// The p99 bucket bound of these bucket counts, at most `max_ms` (a bucket's bound may lie far
/// above anything seen).
pub fn p99(counts: &[u64; BUCKETS_MS.len()], max_ms: u64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = total - total / 100; // the count at or below the 99th percentile
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(BUCKETS_MS[i].min(max_ms));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_is_the_bucket_holding_the_99th_percentile() {
        let t = Traffic::default();
        for _ in 0..990 {
            t.record(Outcome::Ok, 0.004);
        }
        for _ in 0..10 {
            t.record(Outcome::Failed, 2.5);
        }
        let totals = t.totals();
        assert_eq!((totals.requests, totals.errors), (1000, 10));
        assert_eq!(p99(&totals.latency, u64::MAX), Some(5));
        t.record(Outcome::Failed, 2.5);
        assert_eq!(p99(&t.totals().latency, u64::MAX), Some(3_000));
        assert_eq!(p99(&[0; BUCKETS_MS.len()], 0), None);
    }

    #[test]
    fn a_minute_long_request_shows_as_a_minute_not_as_the_next_bucket_bound() {
        let t = Traffic::default();
        t.record(Outcome::Ok, 61.0);
        let max = t.take_max_ms();
        assert_eq!(max, 61_000);
        assert_eq!(p99(&t.totals().latency, max), Some(61_000), "not 90,000 or 300,000");
        assert_eq!(t.take_max_ms(), 0, "each period starts again");
        let fresh = Traffic::default();
        fresh.record(Outcome::Ok, 12.0);
        assert_eq!(p99(&fresh.totals().latency, fresh.take_max_ms()), Some(12_000));
    }

    #[test]
    fn aborted_requests_are_counted_apart_from_errors() {
        let t = Traffic::default();
        t.record(Outcome::Aborted, 0.5);
        t.record(Outcome::Failed, 0.5);
        t.record(Outcome::Ok, 0.5);
        let totals = t.totals();
        assert_eq!((totals.requests, totals.errors, totals.aborted), (3, 1, 1));
    }
}
