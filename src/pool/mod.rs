//! The pool model the hot path reads: [`Backend`]s (plain atomics behind an `Arc`: in-flight
//! count, state, weight, counters), [`Pool`]s (an immutable list of backends with the picker
//! and the admission queue, one per config snapshot), the pickers ([`balance`]), the admission
//! queue ([`queue`]) and a pool's request counters ([`traffic`]).
//!
//! A new config builds new `Pool`s that reuse the `Arc<Backend>`s of unchanged addresses, so
//! counters and in-flight counts survive. An [`InflightGuard`] holds one unit of a backend's
//! capacity and gives it back (waking the queue) when dropped.
//!
//! Depends on the clock, config, error and telemetry only: it knows nothing of HTTP, of upstream
//! connections (kept beside a backend through [`backend::Attached`]) or of the proxy. Never
//! locks and never awaits on the fast path: every method there is a handful of atomic
//! operations; only a saturated pool's queue takes a lock.

pub mod backend;
pub mod balance;
pub mod engine;
mod lifecycle;
pub mod prefix;
pub mod queue;
mod state;
pub mod traffic;

pub use backend::{Attached, Backend, BackendState, InflightGuard, MAX_SATURATION};
pub use state::PoolState;

use crate::config::{BackendConfig, PoolConfig};
use crate::error::Rejection;
use balance::Balancer;
use queue::AdmissionQueue;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A pool of interchangeable backends, immutable once built (one per config snapshot).
pub struct Pool {
    pub config: PoolConfig,
    pub backends: Vec<Arc<Backend>>,
    pub balancer: Balancer,
    pub queue: Arc<AdmissionQueue>,
    pub state: Arc<PoolState>,
    /// Whether any backend is a backup (the pickers only look at tiers when so).
    has_backups: bool,
    /// `balance = "prefix"`: where prompts went.
    pub prefix: Option<prefix::Routing>,
    pub metrics: crate::telemetry::PoolMetrics,
}

impl Pool {
    /// Builds a pool from config, reusing `existing` backends (matched by address) and queue.
    pub fn build(config: PoolConfig, extra: &[BackendConfig], existing: Option<&Pool>) -> Pool {
        let queue = match existing {
            Some(old) => {
                old.queue.set_max_depth(config.queue.max_depth);
                old.queue.clone()
            }
            None => Arc::new(AdmissionQueue::new(config.queue.max_depth)),
        };
        let state = existing.map(|old| old.state.clone()).unwrap_or_default();
        state.outlier.store(config.outlier.clone().map(Arc::new));
        state.slow_start_ms.store(config.slow_start.map_or(0, |d| d.as_millis() as u64), Ordering::Relaxed);
        // A map, not a scan per backend: rebuilding a big pool (each registration does) stays O(n).
        let olds: std::collections::HashMap<std::net::SocketAddr, &Arc<Backend>> =
            existing.map(|old| old.backends.iter().map(|o| (o.addr, o)).collect()).unwrap_or_default();
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .chain(extra.iter())
            .map(|b| {
                let reused = olds.get(&b.addr);
                match reused {
                    Some(old) => {
                        old.update(b);
                        Arc::clone(old)
                    }
                    None => {
                        let fresh = Arc::new(Backend::new(&config.name, b, queue.clone(), state.clone()));
                        if config.health.as_ref().is_some_and(|h| h.gate_new_backends) {
                            fresh.set_state(BackendState::Starting);
                        }
                        fresh
                    }
                }
            })
            .collect();
        state.size.store(backends.len() as u32, Ordering::Relaxed);
        let weights: Vec<u32> = backends.iter().map(|b| b.weight()).collect();
        let prefix = config
            .prefix
            .as_ref()
            .map(|c| prefix::Routing::new(c, &backends, existing.and_then(|o| o.prefix.as_ref())));
        Pool {
            prefix,
            balancer: Balancer::new(config.balance, &weights)
                .with_stale_after(config.engine.as_ref().map_or(3_000, crate::config::EngineConfig::stale_after_ms)),
            metrics: existing.map_or_else(|| crate::telemetry::PoolMetrics::new(&config.name), |o| o.metrics.renewed()),
            has_backups: backends.iter().any(|b| b.is_backup()),
            config,
            backends,
            queue,
            state,
        }
    }

    /// Picks a backend and claims a slot on it; `None` when nothing eligible is left.
    #[inline]
    pub fn try_acquire(&self) -> Option<InflightGuard> {
        self.try_acquire_except(|_| false)
    }

    /// Like [`Pool::try_acquire`], never choosing a backend whose index `exclude` names
    /// (failover: "not that one again").
    #[inline]
    pub fn try_acquire_except(&self, exclude: impl Fn(usize) -> bool) -> Option<InflightGuard> {
        self.acquire(&prefix::Hint::default(), exclude)
    }

    /// Like [`Pool::try_acquire`], for a request that brings a prompt key or a session (a
    /// prefix pool looks for the backend that holds its cache first).
    #[inline]
    pub fn try_acquire_with(&self, hint: &prefix::Hint) -> Option<InflightGuard> {
        self.acquire(hint, |_| false)
    }

    #[inline]
    fn acquire(&self, hint: &prefix::Hint, exclude: impl Fn(usize) -> bool) -> Option<InflightGuard> {
        if self.config.panic_threshold > 0.0 && self.in_panic() {
            return self.acquire_in_panic(&exclude);
        }
        // Only the tier in use is eligible: primaries while any is up, else the backups.
        let backups = self.has_backups && self.using_backups();
        let exclude = |i: usize| exclude(i) || (self.has_backups && self.backends[i].is_backup() != backups);
        // A pick can lose a race for the last slot of a backend; try a few times, then give up
        // (the caller queues, and is woken when a slot frees).
        if let Some(routing) = &self.prefix {
            return self.acquire_prefix(routing, hint, exclude);
        }
        for _ in 0..4 {
            let i = self.balancer.pick(&self.backends, exclude)?;
            if let Some(g) = self.backends[i].try_acquire() {
                return Some(g);
            }
        }
        None
    }

    /// A prefix pool's pick: the backend that holds the prompt's cache, else the least loaded;
    /// the prompt is recorded where it goes.
    fn acquire_prefix(
        &self,
        routing: &prefix::Routing,
        hint: &prefix::Hint,
        exclude: impl Fn(usize) -> bool,
    ) -> Option<InflightGuard> {
        let preferred = prefix::pick(self, routing, hint, &exclude).and_then(|i| self.backends[i].try_acquire());
        let guard = preferred.or_else(|| {
            (0..4)
                .find_map(|_| self.balancer.pick(&self.backends, &exclude).and_then(|i| self.backends[i].try_acquire()))
        })?;
        if let Some(key) = hint.prompt {
            routing.index.record(key, guard.backend());
        }
        Some(guard)
    }

    /// Whether any backend takes traffic, or is about to (`starting`): worth queueing for.
    pub fn any_serving(&self) -> bool {
        if self.config.panic_threshold > 0.0 && self.in_panic() {
            return self.backends.iter().any(|b| b.state() != BackendState::Draining);
        }
        self.backends.iter().any(|b| match b.state() {
            BackendState::Healthy => !b.is_saturated(),
            BackendState::Starting => true,
            _ => false,
        })
    }

    /// Whether some backend of the tier in use has a free slot right now.
    pub fn has_capacity(&self) -> bool {
        if self.config.panic_threshold > 0.0 && self.in_panic() {
            return self.backends.iter().any(|b| b.state() != BackendState::Draining && b.in_flight() < b.capacity());
        }
        let backups = self.has_backups && self.using_backups();
        self.backends.iter().any(|b| b.is_eligible() && (!self.has_backups || b.is_backup() == backups))
    }

    /// Free slots on the backends that take requests now.
    pub fn free_slots(&self) -> usize {
        self.backends
            .iter()
            .filter(|b| b.is_serving())
            .map(|b| b.effective_max_inflight().saturating_sub(b.in_flight()) as usize)
            .sum()
    }

    /// Whether the healthy share of the pool is below `panic_threshold`.
    pub fn in_panic(&self) -> bool {
        let healthy = self.backends.iter().filter(|b| b.state() == BackendState::Healthy).count();
        (healthy as f64) < self.config.panic_threshold * self.backends.len() as f64
    }

    /// Panic mode: the least loaded backend that is not draining, whatever its health.
    fn acquire_in_panic(&self, exclude: &impl Fn(usize) -> bool) -> Option<InflightGuard> {
        for _ in 0..4 {
            // From a random start, so ties (an idle pool) spread over the backends.
            let n = self.backends.len();
            let start = if n > 1 { fastrand::usize(..n) } else { 0 };
            let best = (0..n)
                .map(|k| ((start + k) % n, &self.backends[(start + k) % n]))
                .filter(|(i, b)| {
                    !exclude(*i) && b.state() != BackendState::Draining && b.in_flight() < b.max_inflight()
                })
                .min_by(|(_, a), (_, b)| {
                    let (la, wa) = (a.in_flight() as u64 + 1, a.weight().max(1) as u64);
                    let (lb, wb) = (b.in_flight() as u64 + 1, b.weight().max(1) as u64);
                    (la * wb).cmp(&(lb * wa))
                })
                .map(|(i, _)| i)?;
            if let Some(g) = self.backends[best].try_acquire_in_panic() {
                return Some(g);
            }
        }
        None
    }

    /// True when no primary backend is healthy, so the backups serve.
    pub fn using_backups(&self) -> bool {
        !self.backends.iter().any(|b| !b.is_backup() && b.is_serving())
    }

    /// The index of `backend` in this pool.
    pub fn index_of(&self, backend: &Arc<Backend>) -> Option<usize> {
        self.backends.iter().position(|b| Arc::ptr_eq(b, backend))
    }

    pub fn in_flight(&self) -> u64 {
        self.backends.iter().map(|b| b.in_flight() as u64).sum()
    }
}

/// The fast path of [`admit`]: a slot right now, when nobody is queued ahead.
#[inline]
pub fn admit_now(pool: &Pool) -> Option<InflightGuard> {
    admit_now_with(pool, &prefix::Hint::default())
}

/// [`admit_now`] for a request with a prompt key or a session.
#[inline]
pub fn admit_now_with(pool: &Pool, hint: &prefix::Hint) -> Option<InflightGuard> {
    if pool.queue.depth() == 0 {
        pool.try_acquire_with(hint)
    } else {
        None
    }
}

/// Claims a slot on the pool: at once if one is free and nobody is waiting, else by waiting in
/// the queue. Returns the slot, how long the request queued (`None` if it did not), and the
/// newer version of the pool the slot is in when it is not `pool` (so the fast path costs no
/// reference count).
///
/// A waiting request looks at the newest version of its pool (`latest`) each time it is woken,
/// so backends added while it waits (a reload, the autoscaler) serve it. A pool that autoscales
/// queues requests even with no backend at all: the autoscaler is bringing one (scale from zero).
pub async fn admit(
    pool: &Arc<Pool>,
    latest: impl Fn() -> Option<Arc<Pool>>,
    hint: &prefix::Hint<'_>,
) -> Result<(InflightGuard, Option<Duration>, Option<Arc<Pool>>), Rejection> {
    let queue = &pool.queue;
    if let Some(g) = admit_now_with(pool, hint) {
        return Ok((g, None, None));
    }
    if !worth_waiting(pool) {
        return Err(Rejection::NoBackend);
    }
    let start = Instant::now();
    let deadline = start + pool.config.queue.timeout;
    let mut ticket = queue.join()?;
    // A slot may have freed between our failed pick and joining: make sure someone takes it.
    if pool.has_capacity() {
        queue.wake_one();
    }
    loop {
        match tokio::time::timeout_at(deadline, &mut ticket.rx).await {
            Err(_) => return Err(Rejection::QueueTimeout),
            Ok(_) => {
                let newer = latest().filter(|p| !Arc::ptr_eq(p, pool) && Arc::ptr_eq(&p.queue, queue));
                let current = newer.as_ref().unwrap_or(pool);
                if let Some(g) = current.try_acquire_with(hint) {
                    ticket.used = true;
                    return Ok((g, Some(start.elapsed()), newer));
                }
                if !worth_waiting(current) {
                    ticket.used = true;
                    return Err(Rejection::NoBackend);
                }
                // A wake-up that always comes at once would never let the timeout fire.
                if Instant::now() >= deadline {
                    ticket.used = true;
                    return Err(Rejection::QueueTimeout);
                }
                ticket.requeue_front();
                // The slot that woke us went to someone else; if another is free, go again.
                if current.has_capacity() {
                    queue.wake_one();
                }
            }
        }
    }
}

/// Whether a backend takes traffic or is on its way: one is starting, or the autoscaler may add
/// one.
fn worth_waiting(pool: &Pool) -> bool {
    pool.config.autoscale.is_some() || pool.any_serving()
}

#[cfg(test)]
mod tests;
