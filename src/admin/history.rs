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

/// Upper bounds of the latency buckets, in milliseconds (the last one catches everything).
const BUCKETS_MS: [u64; 20] = [
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
    2_000,
    3_000,
    5_000,
    10_000,
    30_000,
    60_000,
    300_000,
    u64::MAX,
];

/// How much history is kept.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);

/// A pool's request counters, carried across snapshots with the pool's state.
#[derive(Debug, Default)]
pub struct Traffic {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; BUCKETS_MS.len()],
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    requests: u64,
    errors: u64,
    latency: [u64; BUCKETS_MS.len()],
}

impl Traffic {
    /// One finished request (its answer sent, or failed), `failed` for 5xx and broken streams.
    #[inline]
    pub fn record(&self, failed: bool, seconds: f64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let ms = (seconds * 1000.0) as u64;
        let i = BUCKETS_MS.iter().position(|&b| ms <= b).unwrap_or(BUCKETS_MS.len() - 1);
        self.latency[i].fetch_add(1, Ordering::Relaxed);
    }

    fn totals(&self) -> Totals {
        Totals {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency: std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed)),
        }
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
    /// The upper bound of the bucket holding the 99th percentile, ms (`null` without traffic).
    pub p99_ms: Option<u64>,
    pub queue_depth: usize,
    pub in_flight: u64,
    pub backends: usize,
    pub healthy: usize,
}

/// The p99 bucket bound of these bucket counts.
fn p99(counts: &[u64; BUCKETS_MS.len()]) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = total - total / 100; // the count at or below the 99th percentile
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(BUCKETS_MS[i].min(300_000 * 10));
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
            let requests = totals.requests.saturating_sub(before.requests);
            let errors = totals.errors.saturating_sub(before.errors);
            let latency: [u64; BUCKETS_MS.len()] =
                std::array::from_fn(|i| totals.latency[i].saturating_sub(before.latency[i]));
            gateway.history.push(
                &pool.config.name,
                Sample {
                    time,
                    rps: requests as f64 / secs,
                    error_rate: if requests == 0 { 0.0 } else { errors as f64 / requests as f64 },
                    p99_ms: p99(&latency),
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
            p99_ms: None,
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
            t.record(false, 0.004);
        }
        for _ in 0..10 {
            t.record(true, 2.5);
        }
        let totals = t.totals();
        assert_eq!((totals.requests, totals.errors), (1000, 10));
        assert_eq!(p99(&totals.latency), Some(5));
        t.record(true, 2.5);
        assert_eq!(p99(&t.totals().latency), Some(3_000));
        assert_eq!(p99(&[0; BUCKETS_MS.len()]), None);
    }
}
