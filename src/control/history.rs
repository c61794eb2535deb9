//! The last 15 minutes of each pool, for the status page's charts: a sampler task turns the
//! pools' traffic counters into one sample per `admin.history_interval` (req/s, error rate, p99
//! latency, queue depth, backends by state) kept in a fixed-size ring per pool.
//!
//! [`Traffic`] is what the data path records into: two counter adds and one histogram-bucket add,
//! all relaxed atomics, per finished request. Everything else here runs off the data path; the
//! ring's lock is taken only by the sampler and the admin API.

// The ring's lock is off the data path (see above).
#![allow(clippy::disallowed_types)]

use super::Control;
use crate::pool::traffic::{p99, Totals, BUCKETS};
use crate::pool::BackendState;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How much history is kept.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);

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
pub async fn run(control: Arc<Control>, interval: Duration, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut last: HashMap<String, (Totals, std::time::Instant)> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        let snap = control.snapshot();
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
            let latency: [u64; BUCKETS] = std::array::from_fn(|i| totals.latency[i].saturating_sub(before.latency[i]));
            control.history.push(
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
        control.history.retain(|name| snap.pool(name).is_some());
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
}
