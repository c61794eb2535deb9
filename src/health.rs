//! Active health checks: one task per pool probes every backend's `health.path` once per
//! `interval` (±10% jitter), or once per `fast_interval` while the backend is changing state,
//! on a connection kept from one check to the next while the backend keeps it open
//! (`reuse_connection`, default true).
//! First probes are spread evenly over the interval and later ones keep their jittered offsets,
//! so a large pool never wakes all at once. Each probe is bounded by `health.timeout`.
//!
//! Results move a backend between states with rise/fall thresholds: `starting` becomes `healthy`
//! on its first pass, `unhealthy` becomes `healthy` after `healthy_threshold` passes in a row, and
//! `healthy` becomes `unhealthy` after `unhealthy_threshold` failures in a row. `draining` is
//! never changed here. Off the request path: the data path only reads the state atomic.
//!
//! Passive ejection happens on the data path (`Backend::count_response`); this module owns the
//! clock that returns ejected backends to service when their time is up.

use crate::config::{HealthConfig, PoolConfig};
use crate::gateway::Gateway;
use crate::pool::{Backend, BackendState};

/// A backend connection kept from one check to the next.
type Kept = crate::http1::client::Conn;

/// A backend of the schedule, its next check (`None` while one runs) and its kept connection.
type Entry = (Arc<Backend>, Option<Instant>, Option<Kept>);
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Checks pool `name` until `shutdown` resolves. Each backend has its own next-check time: a
/// check is scheduled when the previous one finished, `interval` (jittered) later, or
/// `fast_interval` later while the backend is changing state. A backend is never checked twice at
/// once. Follows the pool's backends and settings as reloads change them. A wake-up costs
/// O(log n) per backend checked ([`Schedule`]); the whole pool is walked only when it changed.
pub async fn run_pool(gateway: Arc<Gateway>, name: String, shutdown: impl Future<Output = ()>) {
    use futures_util::{FutureExt, StreamExt};
    tokio::pin!(shutdown);
    let mut schedule = Schedule::default();
    let mut seen: Option<Arc<crate::pool::Pool>> = None;
    // Polled by this task: a check costs no task of its own.
    let mut probes = futures_util::stream::FuturesUnordered::new();
    let wake = tokio::time::sleep_until(Instant::now());
    tokio::pin!(wake);
    loop {
        let Some(pool) = current_pool(&gateway, &name) else { return };
        let Some(cfg) = pool.config.health.as_ref() else { return };
        let now = Instant::now();
        if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &pool)) {
            schedule.follow(&pool.backends, cfg, now);
            seen = Some(pool.clone());
        }
        while let Some((backend, kept)) = schedule.pop_due(now) {
            probes.push(check(backend, pool.clone(), kept).boxed());
        }
        let next_due = schedule.next().unwrap_or_else(|| now.checked_add(cfg.interval).unwrap_or(now));
        if wake.deadline() != next_due {
            wake.as_mut().reset(next_due);
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = &mut wake => {}
            Some((addr, at, kept)) = probes.next(), if !probes.is_empty() => {
                schedule.set(addr, at, kept);
                // Every other check done by now, in the same wake-up.
                while let Some(Some((addr, at, kept))) = probes.next().now_or_never() {
                    schedule.set(addr, at, kept);
                }
            }
        }
    }
}

/// One check of `backend` and its outcome applied: the backend, when its next check is due, and
/// the connection to keep for it.
async fn check(
    backend: Arc<Backend>,
    pool: Arc<crate::pool::Pool>,
    mut kept: Option<Kept>,
) -> (SocketAddr, Instant, Option<Kept>) {
    let Some(cfg) = pool.config.health.as_ref() else { return (backend.addr, Instant::now(), None) };
    let pass = probe(&backend, &pool.config, cfg, &mut kept).await;
    backend.metrics.health_check(pass);
    apply(&backend, cfg, pass);
    let next = if changing(&backend) { cfg.fast_interval } else { jittered(cfg.interval) };
    let kept = kept.filter(|_| cfg.reuse_connection);
    (backend.addr, Instant::now().checked_add(next).unwrap_or_else(Instant::now), kept)
}

/// When each backend of a pool is checked next: a min-heap of (time, address) with lazy
/// deletion, and the backends by address. Entries of removed backends, or older than the
/// backend's current time, are skipped when they reach the top.
#[derive(Default)]
struct Schedule {
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, SocketAddr)>>,
    /// Each backend and its next check; `None` while a check runs.
    backends: HashMap<SocketAddr, Entry>,
}

impl Schedule {
    /// Follows a new backend list: drops the removed, and spreads the first checks of new ones
    /// over the interval (the fast interval for those waiting for a first pass), so a big pool
    /// never wakes at once. O(n), on a pool change only.
    fn follow(&mut self, backends: &[Arc<Backend>], cfg: &HealthConfig, now: Instant) {
        let current: std::collections::HashSet<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        self.backends.retain(|addr, _| current.contains(addr));
        let n = backends.len().max(1) as u32;
        for (i, b) in backends.iter().enumerate() {
            match self.backends.get_mut(&b.addr) {
                // The same address may be a new `Backend` after a reload: check the new one.
                Some(entry) => entry.0 = b.clone(),
                None => {
                    let spread = if changing(b) { cfg.fast_interval } else { cfg.interval };
                    let at = now.checked_add(spread * i as u32 / n).unwrap_or(now);
                    self.backends.insert(b.addr, (b.clone(), Some(at), None));
                    self.heap.push(std::cmp::Reverse((at, b.addr)));
                }
            }
        }
        // Rebuild when stale entries pile up (many backends removed).
        if self.heap.len() > 2 * self.backends.len() + 64 {
            self.heap =
                self.backends.iter().filter_map(|(a, (_, at, _))| Some(std::cmp::Reverse(((*at)?, *a)))).collect();
        }
    }

    /// The next backend whose check is due by `now`, marked as running.
    fn pop_due(&mut self, now: Instant) -> Option<(Arc<Backend>, Option<Kept>)> {
        while let Some(std::cmp::Reverse((at, addr))) = self.heap.peek().copied() {
            if at > now {
                return None;
            }
            self.heap.pop();
            if let Some((backend, due, kept)) = self.backends.get_mut(&addr) {
                if *due == Some(at) {
                    *due = None;
                    return Some((backend.clone(), kept.take()));
                }
            }
        }
        None
    }

    /// Schedules `addr`'s next check (a check finished), keeping its connection for it.
    fn set(&mut self, addr: SocketAddr, at: Instant, conn: Option<Kept>) {
        if let Some((_, due, kept)) = self.backends.get_mut(&addr) {
            *due = Some(at);
            *kept = conn;
            self.heap.push(std::cmp::Reverse((at, addr)));
        }
    }

    /// When the earliest check is due (a stale entry may make this early: a harmless wake-up).
    fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|std::cmp::Reverse((at, _))| *at)
    }
}

/// Whether a backend is between states: new, or in a streak that may soon move it.
fn changing(b: &Backend) -> bool {
    match b.state() {
        BackendState::Starting => true,
        BackendState::Healthy => b.health_failures.load(Ordering::Relaxed) > 0,
        BackendState::Unhealthy => b.health_passes.load(Ordering::Relaxed) > 0,
        BackendState::Ejected | BackendState::Draining => false,
    }
}

/// Returns pool `name`'s ejected backends to service when their ejection ends (straight to
/// `healthy` without active checks, else to `unhealthy`, from which `healthy_threshold` passing
/// checks bring it back), and keeps the
/// pool's ejected count exact (a drain of an ejected backend, say, is accounted for here). The
/// count can briefly lag by one between ticks, so a racing ejection may exceed the cap by one.
pub async fn readmit_pool(gateway: Arc<Gateway>, name: String, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let Some(pool) = current_pool(&gateway, &name) else { return };
        let Some(cfg) = pool.config.outlier.clone() else { return };
        let now = crate::clock::now_ms();
        let mut still_ejected = 0;
        for b in &pool.backends {
            if b.state() != BackendState::Ejected {
                b.forgive_ejections(now, cfg.max_ejection.as_millis() as u64);
                continue;
            }
            if now >= b.ejected_until_ms.load(Ordering::Relaxed) {
                if pool.config.health.is_some() {
                    // With active checks it must earn its way back: healthy_threshold passes.
                    tracing::info!(backend = %b.addr, "ejection over; back after passing health checks");
                    b.health_passes.store(0, Ordering::Relaxed);
                    b.set_state(BackendState::Unhealthy);
                } else {
                    tracing::info!(backend = %b.addr, "ejection over; backend back in service");
                    b.set_state(BackendState::Healthy);
                }
            } else {
                still_ejected += 1;
            }
        }
        pool.state.ejected.store(still_ejected, Ordering::Relaxed);
        let tick = (cfg.base_ejection / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// Advances the slow-start ramps of pool `name`'s backends, about twenty steps per `slow_start`.
pub async fn ramp_pool(gateway: Arc<Gateway>, name: String, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let Some(pool) = current_pool(&gateway, &name) else { return };
        let Some(slow_start) = pool.config.slow_start else { return };
        let now = crate::clock::now_ms();
        for b in &pool.backends {
            b.advance_ramp(now);
        }
        let tick = (slow_start / 20).clamp(Duration::from_millis(20), Duration::from_secs(1));
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// Pool `name` in the current snapshot (each round follows reloads); `None` once it is gone.
fn current_pool(gateway: &Gateway, name: &str) -> Option<Arc<crate::pool::Pool>> {
    gateway.snapshot().pool(name).cloned()
}

/// `interval` ± 10%.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + 0.2 * fastrand::f64())
}

/// One check: `GET path` on the backend's kept connection (or a fresh one, kept for the next
/// check when the backend allows); passes on an expected status within the timeout. A check that
/// times out drops its connection.
async fn probe(backend: &Backend, pool: &PoolConfig, cfg: &HealthConfig, kept: &mut Option<Kept>) -> bool {
    let check = crate::upstream::get_status(kept, backend, pool, &cfg.path, "headroom-health-check");
    match tokio::time::timeout(cfg.timeout, check).await {
        Ok(Some(status)) => (cfg.expect_status.0..=cfg.expect_status.1).contains(&status),
        _ => false,
    }
}

/// Applies one result to the backend's streaks and state.
pub(crate) fn apply(backend: &Backend, cfg: &HealthConfig, pass: bool) {
    let state = backend.state();
    if state == BackendState::Draining {
        return;
    }
    if pass {
        backend.health_failures.store(0, Ordering::Relaxed);
        let passes = backend.health_passes.fetch_add(1, Ordering::Relaxed) + 1;
        let rises = match state {
            BackendState::Starting => true,
            BackendState::Unhealthy => passes >= cfg.healthy_threshold,
            _ => false,
        };
        if rises {
            tracing::info!(backend = %backend.addr, from = state.as_str(), "backend is healthy");
            backend.set_state(BackendState::Healthy);
        }
    } else {
        backend.health_passes.store(0, Ordering::Relaxed);
        let failures = backend.health_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if state == BackendState::Healthy && failures >= cfg.unhealthy_threshold {
            tracing::warn!(backend = %backend.addr, failures, "backend is unhealthy");
            backend.set_state(BackendState::Unhealthy);
            // Whatever comes back may be a restarted engine: where prompts went no longer counts.
            backend.engine.forget_cache();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            fast_interval: Duration::from_millis(250),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            expect_status: (200, 299),
            gate_new_backends: true,
            reuse_connection: true,
        }
    }

    #[test]
    fn rise_and_fall_thresholds() {
        let b = Backend::standalone("127.0.0.1:1".parse().unwrap(), 1, 1);
        let c = cfg();
        b.set_state(BackendState::Starting);
        apply(&b, &c, true);
        assert_eq!(b.state(), BackendState::Healthy, "a starting backend rises on its first pass");
        apply(&b, &c, false);
        apply(&b, &c, false);
        assert_eq!(b.state(), BackendState::Healthy);
        apply(&b, &c, true); // a pass resets the failure streak
        for _ in 0..2 {
            apply(&b, &c, false);
        }
        assert_eq!(b.state(), BackendState::Healthy);
        let epoch = b.engine.cache_identity().1;
        apply(&b, &c, false);
        assert_eq!(b.state(), BackendState::Unhealthy);
        assert_eq!(b.engine.cache_identity().1, epoch + 1, "its cache is forgotten: it may come back restarted");
        apply(&b, &c, true);
        assert_eq!(b.state(), BackendState::Unhealthy);
        apply(&b, &c, true);
        assert_eq!(b.state(), BackendState::Healthy);
        b.set_state(BackendState::Draining);
        for _ in 0..5 {
            apply(&b, &c, true);
        }
        assert_eq!(b.state(), BackendState::Draining, "health checks never undo a drain");
    }

    #[test]
    fn the_schedule_hands_out_due_backends_once_and_forgets_removed_ones() {
        let backends: Vec<Arc<Backend>> =
            (1..=1000u16).map(|p| Arc::new(Backend::standalone(SocketAddr::from(([127, 0, 0, 1], p)), 1, 1))).collect();
        let c = cfg();
        let t0 = Instant::now();
        let mut s = Schedule::default();
        s.follow(&backends, &c, t0);
        // First checks are spread over the interval: a tenth of it has a tenth of the pool due.
        let mut due = Vec::new();
        while let Some((b, _)) = s.pop_due(t0 + c.interval / 10) {
            due.push(b.addr);
        }
        assert!((95..=105).contains(&due.len()), "{}", due.len());
        assert!(s.pop_due(t0 + c.interval / 10).is_none(), "a running check is not handed out again");
        // Finished checks come back later; removed backends never come back.
        for a in &due {
            s.set(*a, t0 + c.interval * 2, None);
        }
        s.follow(&backends[500..], &c, t0);
        let mut later = std::collections::HashSet::new();
        while let Some((b, _)) = s.pop_due(t0 + c.interval * 3) {
            assert!(later.insert(b.addr), "{} handed out twice", b.addr);
        }
        assert_eq!(later.len(), 500, "every remaining backend, once");
        assert!(later.iter().all(|a| a.port() > 500));
        assert!(s.next().is_none() || s.heap.len() <= 2 * s.backends.len() + 64);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..1000 {
            let j = jittered(Duration::from_millis(1000));
            assert!(j >= Duration::from_millis(900) && j <= Duration::from_millis(1100), "{j:?}");
        }
    }

    #[test]
    fn backends_between_states_are_checked_at_the_fast_interval() {
        let b = Backend::standalone("127.0.0.1:1".parse().unwrap(), 1, 1);
        let c = cfg();
        b.set_state(BackendState::Starting);
        assert!(changing(&b), "a new backend waits for its first check");
        apply(&b, &c, true);
        assert!(!changing(&b), "healthy and passing");
        apply(&b, &c, false);
        assert!(changing(&b), "a failure streak has begun");
        apply(&b, &c, false);
        apply(&b, &c, false);
        assert_eq!(b.state(), BackendState::Unhealthy);
        assert!(!changing(&b), "down and failing: the normal interval");
        apply(&b, &c, true);
        assert!(changing(&b), "a passing streak has begun");
    }

    /// A gateway with one pool of two backends (nothing listens: no test here connects).
    fn gateway(pool: &str) -> Arc<Gateway> {
        let text = format!(
            "[pools.p]\n{pool}\n[[pools.p.backends]]\naddr = \"127.0.0.1:9001\"\n[[pools.p.backends]]\naddr = \"127.0.0.1:9002\"\n"
        );
        let config = crate::config::Config::parse(&text, std::path::Path::new(".")).expect("valid config");
        Gateway::new(crate::gateway::Snapshot::build(config, &[], None))
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_backend_is_back_when_its_ejection_ends_then_ramps_up_over_slow_start() {
        let outlier = "slow_start = \"10s\"\n[pools.p.outlier]\nconsecutive_failures = 2\nbase_ejection = \"30s\"";
        let gateway = gateway(outlier);
        let pool = gateway.snapshot().pool("p").cloned().unwrap();
        let b = pool.backends[0].clone();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until = |rx: tokio::sync::watch::Receiver<bool>| async move {
            let mut rx = rx;
            let _ = rx.wait_for(|s| *s).await;
        };
        let readmit = tokio::spawn(readmit_pool(gateway.clone(), "p".into(), until(stopped.clone())));
        let ramp = tokio::spawn(ramp_pool(gateway.clone(), "p".into(), until(stopped)));

        b.count_response(502, true);
        b.count_response(502, true);
        assert_eq!(b.state(), BackendState::Ejected, "two failures in a row eject it");
        assert_eq!(b.ejected_for_ms(), 30_000);
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(b.state(), BackendState::Ejected, "still out before base_ejection");
        // (The readmission runs once a second: one more tick.)
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(b.state(), BackendState::Healthy, "back without [health] once the ejection ended");

        // Slow start: a tenth of its capacity at first, all of it after `slow_start`.
        let first = b.ramp();
        assert!(first < 300, "ramp right after readmission: {first}");
        tokio::time::sleep(Duration::from_secs(5)).await;
        let half = b.ramp();
        assert!((450..=650).contains(&half), "ramp halfway through slow_start: {half}");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(b.ramp(), 1000, "full capacity after slow_start");
        let _ = stop.send(true);
        readmit.await.unwrap();
        ramp.await.unwrap();
    }
}
