//! Active health checks: one task per pool probes every backend's `health.path` once per
//! `interval` (±10% jitter), or once per `fast_interval` while the backend is changing state.
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

use crate::backend::{Backend, BackendState};
use crate::config::{HealthConfig, PoolConfig};
use crate::gateway::Gateway;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
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
/// once. Reads the current snapshot on every wake-up, so it follows the pool's backends and
/// settings as they change.
pub async fn run_pool(gateway: Arc<Gateway>, name: String, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    // Next check per backend; `None` while its check is running.
    let mut due: HashMap<SocketAddr, Option<Instant>> = HashMap::new();
    let mut probes = tokio::task::JoinSet::new();
    loop {
        let Some(pool) = current_pool(&gateway, &name) else { return };
        let Some(cfg) = pool.config.health.clone() else { return };
        let now = Instant::now();
        due.retain(|addr, _| pool.backends.iter().any(|b| b.addr == *addr));
        // Backends seen for the first time: first checks spread over the interval (over the fast
        // interval for backends waiting for their first pass), so a big pool never wakes at once.
        let n = pool.backends.len().max(1) as u32;
        for (i, b) in pool.backends.iter().enumerate() {
            due.entry(b.addr).or_insert_with(|| {
                let spread = if changing(b) { cfg.fast_interval } else { cfg.interval };
                Some(now + spread * i as u32 / n)
            });
        }
        for b in &pool.backends {
            if due.get(&b.addr).is_some_and(|d| d.is_some_and(|at| at <= now)) {
                due.insert(b.addr, None);
                let (backend, cfg, pool) = (b.clone(), cfg.clone(), pool.clone());
                probes.spawn(async move {
                    let pass = probe(&backend, &pool.config, &cfg).await;
                    backend.metrics.health_check(pass);
                    apply(&backend, &cfg, pass);
                    let next = if changing(&backend) { cfg.fast_interval } else { jittered(cfg.interval) };
                    (backend.addr, Instant::now().checked_add(next).unwrap_or_else(Instant::now))
                });
            }
        }
        let next_due = due.values().flatten().min().copied().unwrap_or(now + cfg.interval);
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep_until(next_due) => {}
            Some(Ok((addr, at))) = probes.join_next(), if !probes.is_empty() => {
                if let Some(d) = due.get_mut(&addr) {
                    *d = Some(at);
                }
            }
        }
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
        let now = crate::proxy::conn::now_ms();
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
        let now = crate::proxy::conn::now_ms();
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
fn current_pool(gateway: &Gateway, name: &str) -> Option<Arc<crate::backend::Pool>> {
    gateway.snapshot().pool(name).cloned()
}

/// `interval` ± 10%.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + 0.2 * fastrand::f64())
}

/// One check: `GET path` on a fresh connection; passes on an expected status within the timeout.
async fn probe(backend: &Backend, pool: &PoolConfig, cfg: &HealthConfig) -> bool {
    let check = async {
        // Over TLS too when the pool's backends speak it (HTTP/1.1 offered by ALPN).
        let (stream, _) = crate::proxy::upstream::connect_io(backend, pool, true).await.ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(conn);
        let req = http::Request::get(cfg.path.as_str())
            .header(http::header::HOST, backend.label.as_ref())
            .header(http::header::USER_AGENT, "headroom-health-check")
            .body(Empty::new())
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        Some(resp.status().as_u16())
    };
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
        apply(&b, &c, false);
        assert_eq!(b.state(), BackendState::Unhealthy);
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
}
