//! What the backends of one pool share, carried across snapshots: passive ejection settings and
//! count, the slow-start length, the retry budget and the traffic counters.

use super::traffic::Traffic;
use crate::config::OutlierConfig;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// State shared by the backends of one pool and carried across snapshots.
#[derive(Default)]
pub struct PoolState {
    /// Passive ejection settings; `None` when the pool has none.
    pub outlier: arc_swap::ArcSwapOption<OutlierConfig>,
    /// Backends in the pool (for the ejection cap).
    pub size: AtomicU32,
    /// Backends ejected right now.
    pub ejected: AtomicU32,
    /// `slow_start` in milliseconds; 0 when off.
    pub slow_start_ms: AtomicU64,
    /// Requests and retries seen by a pool with `[retry]`, for the retry budget.
    pub retry_requests: AtomicU64,
    pub retries: AtomicU64,
    /// Finished requests, errors and latencies, for the status page's history.
    pub traffic: Traffic,
}

impl PoolState {
    /// Takes one retry from the budget: retries stay under `percent`% of requests (plus a
    /// small allowance, so a quiet pool can still retry).
    pub fn take_retry(&self, percent: u32) -> bool {
        let requests = self.retry_requests.load(Ordering::Relaxed);
        let allowed = requests * percent as u64 / 100 + 3;
        self.retries.fetch_add(1, Ordering::Relaxed) < allowed || {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            false
        }
    }
}
