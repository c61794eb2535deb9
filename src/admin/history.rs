//! The last 15 minutes of each pool, for the status page's charts: a sampler task turns the
//! pools' traffic counters into one sample per `admin.history_interval` (req/s, error rate, p99
//! latency, queue depth, backends by state) kept in a fixed-size ring per pool.
//!
//! [`Traffic`] is what the data path records into: two counter adds and one histogram-bucket add,
//! all relaxed atomics, per finished request. Everything else here runs off the data path; the
//! ring's lock is taken only by the sampler and the admin API.

// The ring's lock is off the data path (see above).
#![allow(clippy::disallowed_types)]

use crate::backend::BackendState;
use crate::gateway::Gateway;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

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

/// How much history is kept.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);

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
    latency: [u64; BUCKETS_MS.len()],
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
    fn take_max_ms(&self) -> u64 {
        self.max_ms.swap(0, Ordering::Relaxed)
    }
}

/// One point of a pool's charts.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    /// Unix seconds.
    pub time: f64,
    pub rps: f64,
    /// Share of requests answered 5xx or broken, 0..=1.
    pub error_rate: f64,
    /// Share of requests their clients left before the end, 0..=1.
    pub aborted_rate: f64,
    /// The upper bound of the bucket holding the 99th percentile, never above the longest
    /// request of the interval, ms (`null` without traffic).
    pub p99_ms: Option<u64>,
    /// The longest request that ended in the interval, ms (`null` without traffic).
    pub max_ms: Option<u64>,
    pub queue_depth: usize,
    pub in_flight: u64,
    pub backends: usize,
    pub healthy: usize,
}

/// The p99 bucket bound of these bucket counts, at most `max_ms` (a bucket's bound may lie far
/// above anything seen).
fn p99(counts: &[u64; BUCKETS_MS.len()], max_ms: u64) -> Option<u64> {
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

/// Fixed-size rings of samples by pool.
pub struct History {
    capacity: usize,
    pools: Mutex<HashMap<String, VecDeque<Sample>>>,
}

impl History {
    /// Keeps `WINDOW / interval` samples per pool (10..=3600).
    pub fn new(interval: Duration) -> Self {
        let capacity = (WINDOW.as_millis() / interval.as_millis().max(1)).clamp(10, 3600) as usize;
        History { capacity, pools: Mutex::new(HashMap::new()) }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn push(&self, pool: &str, sample: Sample) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let ring = pools.entry(pool.to_string()).or_insert_with(|| VecDeque::with_capacity(self.capacity));
        while ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(sample);
    }

    /// Oldest first.
    pub fn of(&self, pool: &str) -> Vec<Sample> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.get(pool).map(|r| r.iter().cloned().collect()).unwrap_or_default()
    }

    /// Forgets pools that are gone.
    fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| keep(k));
    }
}

/// Samples every pool each `interval` until `shutdown`.
pub async fn run(gateway: Arc<Gateway>, interval: Duration, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut last: HashMap<String, (Totals, std::time::Instant)> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        let snap = gateway.snapshot();
        let now = std::time::Instant::now();
        let time = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        for pool in &snap.pools {
            let totals = pool.state.traffic.totals();
            let Some((before, at)) = last.insert(pool.config.name.clone(), (totals, now)) else { continue };
            let secs = now.duration_since(at).as_secs_f64().max(1e-3);
            let max_ms = pool.state.traffic.take_max_ms();
            let requests = totals.requests.saturating_sub(before.requests);
            let share =
                |n: u64, of: u64| if requests == 0 { 0.0 } else { n.saturating_sub(of) as f64 / requests as f64 };
            let latency: [u64; BUCKETS_MS.len()] =
                std::array::from_fn(|i| totals.latency[i].saturating_sub(before.latency[i]));
            gateway.history.push(
                &pool.config.name,
                Sample {
                    time,
                    rps: requests as f64 / secs,
                    error_rate: share(totals.errors, before.errors),
                    aborted_rate: share(totals.aborted, before.aborted),
                    p99_ms: p99(&latency, max_ms),
                    max_ms: (requests > 0).then_some(max_ms),
                    queue_depth: pool.queue.depth(),
                    in_flight: pool.in_flight(),
                    backends: pool.backends.len(),
                    healthy: pool.backends.iter().filter(|b| b.state() == BackendState::Healthy).count(),
                },
            );
        }
        last.retain(|name, _| snap.pool(name).is_some());
        gateway.history.retain(|name| snap.pool(name).is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64) -> Sample {
        Sample {
            time: t,
            rps: 1.0,
            error_rate: 0.0,
            aborted_rate: 0.0,
            p99_ms: None,
            max_ms: None,
            queue_depth: 0,
            in_flight: 0,
            backends: 1,
            healthy: 1,
        }
    }

    #[test]
    fn the_ring_stays_at_its_capacity_however_many_samples_come() {
        let h = History::new(Duration::from_secs(5));
        assert_eq!(h.capacity(), 180, "15 minutes of 5 s samples");
        for i in 0..100_000 {
            h.push("p", sample(i as f64));
        }
        let kept = h.of("p");
        assert_eq!(kept.len(), 180);
        assert_eq!((kept[0].time, kept[179].time), (99_820.0, 99_999.0));
        assert_eq!(History::new(Duration::from_millis(1)).capacity(), 3600, "bounded for tiny intervals");
    }

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
