//! One backend as the hot path sees it: plain atomics behind an `Arc` (in-flight count, state,
//! weight, slow-start ramp, saturation pause, counters, passive ejection), and the
//! [`InflightGuard`] that holds one unit of its capacity and gives it back (waking the pool's
//! queue) when dropped. What another layer keeps per backend (the upstream connections) sits in
//! an [`Attached`] slot this module never looks into.
//!
//! Never locks and never awaits: every method here is a handful of atomic operations.

use super::queue::AdmissionQueue;
use super::state::PoolState;
use super::traffic::Outcome;
use crate::config::{BackendConfig, OutlierConfig};
use crate::telemetry::BackendMetrics;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;

pub use super::lifecycle::BackendState;

/// The longest pause a backend's `Retry-After` can ask for.
pub const MAX_SATURATION: std::time::Duration = std::time::Duration::from_secs(300);

const FULL_RAMP: u32 = 1000;
const FIRST_RAMP: u32 = 100;

/// `value` scaled by a ramp in permille, at least 1.
#[inline]
fn ramped(value: u32, ramp: u32) -> u32 {
    if ramp >= FULL_RAMP {
        value
    } else {
        ((value as u64 * ramp as u64 / FULL_RAMP as u64) as u32).max(1)
    }
}

/// What every pick reads, together on one cache line of its own (a scan touches one line per
/// backend, and counters written per response don't share it).
#[repr(C, align(64))]
struct Hot {
    in_flight: AtomicU32,
    max_inflight: AtomicU32,
    weight: AtomicU32,
    /// Slow-start ramp in permille of weight and capacity (1000 = full).
    ramp: AtomicU32,
    state: AtomicU8,
    /// Until when (`now_ms`) the backend asked, by `Retry-After`, not to be sent more; 0: never.
    saturated_until_ms: AtomicU64,
    /// This replica's share of `max_inflight` in a group of replicas (`u32::MAX`: all of it).
    share: AtomicU32,
}

/// One upstream server.
pub struct Backend {
    hot: Hot,
    pub addr: SocketAddr,
    /// `addr` as text, for labels and JSON.
    pub label: Arc<str>,
    requests: AtomicU64,
    errors: AtomicU64,
    /// Responses the client went away from (or was cut off from) before their end: not the
    /// backend's failure, so not among `errors` nor seen by passive ejection.
    aborted: AtomicU64,
    /// A backup backend: used only when no primary of its pool is up.
    backup: AtomicBool,
    /// Consecutive passing / failing active health checks.
    pub(crate) health_passes: AtomicU32,
    pub(crate) health_failures: AtomicU32,
    /// Consecutive failed responses (passive ejection), times ejected, and until when (`now_ms`).
    outlier_failures: AtomicU32,
    /// When the current streak of failed responses began (`now_ms`; 0: not failing). Kept
    /// across an ejection, cleared by the next good response.
    failing_since_ms: AtomicU64,
    /// When the current slow-start ramp began (`now_ms`).
    ramp_since_ms: AtomicU64,
    ejections: AtomicU32,
    /// Multiplies `base_ejection`: ejections since the backend last stayed in service for
    /// `max_ejection`.
    ejection_streak: AtomicU32,
    pub(crate) ejected_until_ms: AtomicU64,
    last_ejection_ms: AtomicU64,
    /// State shared by the backends of one pool (passive ejection settings and count).
    pool_state: Arc<PoolState>,
    /// The admission queue of the pool this backend belongs to, woken when a slot frees.
    queue: Arc<AdmissionQueue>,
    /// What the upstream layer keeps for this backend (its connections), made on first use.
    pub attached: OnceLock<Box<dyn Attached>>,
    pub(crate) metrics: BackendMetrics,
    /// The engine's own load, as last read from its metrics (`[pools.X.engine]`).
    pub engine: super::engine::EngineGauges,
}

/// Per-backend state kept by a layer above this one (the upstream connections), stored in the
/// backend so that finding it costs no lookup; this layer only reads its size for the API.
pub trait Attached: std::any::Any + Send + Sync {
    /// Idle connections kept for the backend.
    fn idle(&self) -> usize;
}

impl Backend {
    pub fn new(pool: &str, cfg: &BackendConfig, queue: Arc<AdmissionQueue>, pool_state: Arc<PoolState>) -> Self {
        let label: Arc<str> = Arc::from(cfg.addr.to_string());
        Backend {
            addr: cfg.addr,
            metrics: BackendMetrics::new(pool, &label),
            label,
            hot: Hot {
                in_flight: AtomicU32::new(0),
                max_inflight: AtomicU32::new(cfg.max_inflight.max(1)),
                share: AtomicU32::new(u32::MAX),
                weight: AtomicU32::new(cfg.weight.max(1)),
                ramp: AtomicU32::new(FULL_RAMP),
                state: AtomicU8::new(BackendState::Healthy as u8),
                saturated_until_ms: AtomicU64::new(0),
            },
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
            backup: AtomicBool::new(cfg.backup),
            health_passes: AtomicU32::new(0),
            health_failures: AtomicU32::new(0),
            outlier_failures: AtomicU32::new(0),
            failing_since_ms: AtomicU64::new(0),
            ramp_since_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            ejection_streak: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            last_ejection_ms: AtomicU64::new(0),
            pool_state,
            queue,
            attached: OnceLock::new(),
            engine: Default::default(),
        }
    }

    /// A backend outside any pool, for benches and tests of the pickers.
    pub fn standalone(addr: SocketAddr, weight: u32, max_inflight: u32) -> Self {
        let cfg = BackendConfig { addr, weight, max_inflight, backup: false };
        Self::new("standalone", &cfg, Arc::new(AdmissionQueue::new(0)), Arc::new(PoolState::default()))
    }

    #[inline]
    pub fn weight(&self) -> u32 {
        self.hot.weight.load(Ordering::Relaxed)
    }

    #[inline]
    pub fn max_inflight(&self) -> u32 {
        self.hot.max_inflight.load(Ordering::Relaxed)
    }

    #[inline]
    pub fn in_flight(&self) -> u32 {
        self.hot.in_flight.load(Ordering::Relaxed)
    }

    #[inline]
    pub fn state(&self) -> BackendState {
        BackendState::from_u8(self.hot.state.load(Ordering::Relaxed))
    }

    /// Puts a drained backend back in service: `Starting` (its next passing check makes it
    /// healthy) when the pool runs health checks, else `Healthy`. False if it was not draining.
    pub fn undrain(&self, checked: bool) -> bool {
        if self.state() != BackendState::Draining {
            return false;
        }
        self.set_state(if checked { BackendState::Starting } else { BackendState::Healthy });
        true
    }

    pub fn set_state(&self, state: BackendState) {
        let before = self.hot.state.swap(state as u8, Ordering::Relaxed);
        if state == BackendState::Healthy && before != BackendState::Healthy as u8 {
            self.start_ramp();
        }
        if state == BackendState::Healthy {
            // Requests may be queued for exactly this capacity.
            for _ in 0..self.max_inflight().min(self.queue.depth() as u32) {
                self.queue.wake_one();
            }
        }
    }

    /// Applies new settings from config (the backend keeps its counters and connections).
    pub fn is_backup(&self) -> bool {
        self.backup.load(Ordering::Relaxed)
    }

    pub fn update(&self, cfg: &BackendConfig) {
        self.backup.store(cfg.backup, Ordering::Relaxed);
        self.hot.weight.store(cfg.weight.max(1), Ordering::Relaxed);
        self.hot.max_inflight.store(cfg.max_inflight.max(1), Ordering::Relaxed);
    }

    /// Takes new requests at all (ignoring capacity): healthy and not saturated.
    #[inline]
    pub fn is_serving(&self) -> bool {
        self.state() == BackendState::Healthy && !self.is_saturated()
    }

    /// Whether the backend's last 429/503 asked, with `Retry-After`, for a pause that still lasts.
    /// One atomic load unless a pause was ever asked for.
    #[inline]
    pub fn is_saturated(&self) -> bool {
        let until = self.hot.saturated_until_ms.load(Ordering::Relaxed);
        until != 0 && crate::clock::now_ms() < until
    }

    /// Milliseconds left of a `Retry-After` pause (0 when none).
    pub fn saturated_for_ms(&self) -> u64 {
        let until = self.hot.saturated_until_ms.load(Ordering::Relaxed);
        until.saturating_sub(crate::clock::now_ms())
    }

    /// Takes no new requests for `pause` (a 429/503 with `Retry-After`), capped at
    /// [`MAX_SATURATION`].
    pub fn saturate(&self, pause: std::time::Duration) {
        let ms = pause.min(MAX_SATURATION).as_millis() as u64;
        if ms == 0 {
            return;
        }
        self.hot.saturated_until_ms.fetch_max(crate::clock::now_ms() + ms, Ordering::Relaxed);
        tracing::info!(backend = %self.addr, pause_ms = ms, "backend asked for a pause (Retry-After)");
    }

    /// Takes new requests now: serving and below capacity.
    #[inline]
    pub fn is_eligible(&self) -> bool {
        self.load_score().is_some()
    }

    /// `Some((in_flight + 1, effective weight))` when eligible, reading each atomic once; pickers
    /// compare these as fractions. The effective weight is in thousandths (weight × ramp).
    #[inline]
    pub fn load_score(&self) -> Option<(u64, u64)> {
        let in_flight = self.hot.in_flight.load(Ordering::Relaxed);
        let ramp = self.hot.ramp.load(Ordering::Relaxed);
        if self.hot.state.load(Ordering::Relaxed) != BackendState::Healthy as u8
            || in_flight >= self.cap_at(ramp)
            || self.is_saturated()
        {
            return None;
        }
        Some((in_flight as u64 + 1, self.hot.weight.load(Ordering::Relaxed).max(1) as u64 * ramp.max(1) as u64))
    }

    /// Slow-start ramp in permille (1000 when not ramping).
    pub fn ramp(&self) -> u32 {
        self.hot.ramp.load(Ordering::Relaxed)
    }

    /// Capacity right now, after slow start.
    pub fn effective_max_inflight(&self) -> u32 {
        self.cap_at(self.ramp())
    }

    /// Capacity at slow-start `ramp`, within this replica's share in a group (a share may be 0:
    /// this replica sends nothing until it is given some).
    #[inline]
    fn cap_at(&self, ramp: u32) -> u32 {
        ramped(self.hot.max_inflight.load(Ordering::Relaxed), ramp).min(self.hot.share.load(Ordering::Relaxed))
    }

    /// `max_inflight`, or this replica's share of it in a group when that is less.
    #[inline]
    pub fn capacity(&self) -> u32 {
        self.hot.max_inflight.load(Ordering::Relaxed).min(self.hot.share.load(Ordering::Relaxed))
    }

    /// This replica's share of the capacity in a group (`None`: all of it).
    pub fn share(&self) -> Option<u32> {
        Some(self.hot.share.load(Ordering::Relaxed)).filter(|&s| s != u32::MAX)
    }

    /// Limits this replica to `share` requests in flight at once (`None`: the whole capacity).
    pub fn set_share(&self, share: Option<u32>) {
        self.hot.share.store(share.map_or(u32::MAX, |s| s.min(u32::MAX - 1)), Ordering::Relaxed);
    }

    /// Begins a slow-start ramp at 10% if the pool has one.
    fn start_ramp(&self) {
        if self.pool_state.slow_start_ms.load(Ordering::Relaxed) > 0 {
            self.ramp_since_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
            self.hot.ramp.store(FIRST_RAMP, Ordering::Relaxed);
        }
    }

    /// Advances the slow-start ramp (called by the pool's ticker, off the data path).
    pub(crate) fn advance_ramp(&self, now_ms: u64) {
        let ramp = self.ramp();
        if ramp >= FULL_RAMP {
            return;
        }
        let total = self.pool_state.slow_start_ms.load(Ordering::Relaxed);
        let elapsed = now_ms.saturating_sub(self.ramp_since_ms.load(Ordering::Relaxed));
        let next = ((FULL_RAMP - FIRST_RAMP) as u64 * elapsed)
            .checked_div(total)
            .map_or(FULL_RAMP, |step| (FIRST_RAMP as u64 + step).min(FULL_RAMP as u64) as u32);
        self.hot.ramp.store(next, Ordering::Relaxed);
    }

    /// Times passively ejected so far.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Forgets past ejections once the backend has stayed in service for `calm_ms` since the
    /// last one ended, so the next ejection is short again (called off the data path).
    pub(crate) fn forgive_ejections(&self, now_ms: u64, calm_ms: u64) {
        if self.ejection_streak.load(Ordering::Relaxed) > 0
            && self.state() != BackendState::Ejected
            && now_ms >= self.ejected_until_ms.load(Ordering::Relaxed) + calm_ms
        {
            self.ejection_streak.store(0, Ordering::Relaxed);
        }
    }

    /// How long every response of this backend has failed (passive signals: connect errors, 5xx,
    /// timeouts), when it has and the pool watches for outliers; `None` while it answers well.
    pub fn failing_for_ms(&self) -> Option<u64> {
        let since = self.failing_since_ms.load(Ordering::Relaxed);
        (since != 0).then(|| crate::clock::now_ms().saturating_sub(since))
    }

    /// Length of the latest ejection in milliseconds (0 if never ejected).
    pub fn last_ejection_ms(&self) -> u64 {
        self.last_ejection_ms.load(Ordering::Relaxed)
    }

    /// Milliseconds left of the current ejection (0 when not ejected).
    pub fn ejected_for_ms(&self) -> u64 {
        if self.state() != BackendState::Ejected {
            return 0;
        }
        self.ejected_until_ms.load(Ordering::Relaxed).saturating_sub(crate::clock::now_ms())
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn aborted(&self) -> u64 {
        self.aborted.load(Ordering::Relaxed)
    }

    /// Records a finished request's duration (metrics and the pool's history).
    pub(crate) fn observe(&self, status: u16, outcome: Outcome, seconds: f64) {
        self.metrics.observe(status, seconds);
        self.pool_state.traffic.record(outcome, seconds);
    }

    /// A response the client left before its end: counted, but not as the backend's failure.
    pub(crate) fn count_aborted(&self, status: u16) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.aborted.fetch_add(1, Ordering::Relaxed);
        self.metrics.record(status);
    }

    pub(crate) fn count_response(&self, status: u16, failed: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics.record(status);
        self.observe_outcome(failed || status >= 500);
    }

    /// Passive ejection: enough failures in a row take the backend out for a while.
    #[inline]
    fn observe_outcome(&self, failed: bool) {
        if !failed {
            if self.outlier_failures.load(Ordering::Relaxed) != 0 {
                self.outlier_failures.store(0, Ordering::Relaxed);
            }
            if self.failing_since_ms.load(Ordering::Relaxed) != 0 {
                self.failing_since_ms.store(0, Ordering::Relaxed);
            }
            return;
        }
        let guard = self.pool_state.outlier.load();
        let Some(cfg) = guard.as_ref() else { return };
        let failures = self.outlier_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if self.failing_since_ms.load(Ordering::Relaxed) == 0 {
            let now = crate::clock::now_ms().max(1);
            let _ = self.failing_since_ms.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
        if failures >= cfg.consecutive_failures && self.state() == BackendState::Healthy {
            self.eject(cfg);
        }
    }

    fn eject(&self, cfg: &OutlierConfig) {
        let size = self.pool_state.size.load(Ordering::Relaxed);
        let allowed = size * cfg.max_ejected_percent / 100;
        let ejected = &self.pool_state.ejected;
        let mut cur = ejected.load(Ordering::Relaxed);
        loop {
            if cur >= allowed {
                return;
            }
            match ejected.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        let taken = self.hot.state.compare_exchange(
            BackendState::Healthy as u8,
            BackendState::Ejected as u8,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        if taken.is_err() {
            ejected.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        self.ejections.fetch_add(1, Ordering::Relaxed);
        let times = self.ejection_streak.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = cfg.base_ejection.saturating_mul(times).min(cfg.max_ejection);
        self.last_ejection_ms.store(duration.as_millis() as u64, Ordering::Relaxed);
        self.ejected_until_ms.store(crate::clock::now_ms() + duration.as_millis() as u64, Ordering::Relaxed);
        self.outlier_failures.store(0, Ordering::Relaxed);
        self.metrics.ejected();
        tracing::warn!(backend = %self.addr, times, ?duration, "backend ejected after consecutive failures");
    }

    /// Claims one unit of capacity on any backend that is not draining (panic mode).
    pub(super) fn try_acquire_in_panic(self: &Arc<Self>) -> Option<InflightGuard> {
        if self.state() == BackendState::Draining {
            return None;
        }
        self.claim()
    }

    /// Claims one unit of capacity, unless the backend is full or not serving.
    /// A compare-and-swap loop, so two racing picks can never push it past `max_inflight`.
    #[inline]
    pub fn try_acquire(self: &Arc<Self>) -> Option<InflightGuard> {
        if !self.is_serving() {
            return None;
        }
        self.claim()
    }

    #[inline]
    fn claim(self: &Arc<Self>) -> Option<InflightGuard> {
        let max = self.effective_max_inflight();
        let mut current = self.hot.in_flight.load(Ordering::Relaxed);
        loop {
            if current >= max {
                return None;
            }
            match self.hot.in_flight.compare_exchange_weak(current, current + 1, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => return Some(InflightGuard { backend: self.clone() }),
                Err(now) => current = now,
            }
        }
    }
}

/// One unit of a backend's capacity; released on drop. It travels with the response body, so it
/// lasts until the last byte has been sent (or the client went away), not until headers arrive.
pub struct InflightGuard {
    backend: Arc<Backend>,
}

impl InflightGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        // SeqCst pairs with the queue: a waiter increments the depth and then re-checks capacity,
        // we decrement in-flight and then check the depth, so one of us always sees the other.
        self.backend.hot.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.backend.queue.depth() > 0 {
            self.backend.queue.wake_one();
        }
    }
}

#[cfg(test)]
mod tests;
