//! Prometheus metrics: the recorder, the metric names (a contract with dashboards), and the
//! per-backend and per-pool handles the data path records into.
//!
//! Handles are resolved once per backend (and lazily per status code), so recording a request is
//! an atomic add, never a label lookup. `headroom_requests_total` is counted in atomics of the
//! backend and the pool ([`CodeCounts`]) and written at scrape time (`admin::metrics`), so the
//! series of a removed backend leave with it. Gauges that mirror atomics the data path already keeps
//! (in-flight, queue depth) are sampled at scrape time instead of being updated per request.

use metrics::Histogram;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

pub const REQUESTS_TOTAL: &str = "headroom_requests_total";
pub const REQUEST_DURATION: &str = "headroom_request_duration_seconds";
pub const BACKEND_INFLIGHT: &str = "headroom_backend_inflight";
/// What each backend's engine reports (`[pools.X.engine]`), while the reading is fresh.
pub const ENGINE_RUNNING: &str = "headroom_engine_requests_running";
pub const ENGINE_WAITING: &str = "headroom_engine_requests_waiting";
pub const ENGINE_KV_USAGE: &str = "headroom_engine_kv_cache_usage";
pub const ENGINE_HIT_RATE: &str = "headroom_engine_prefix_cache_hit_rate";
pub const QUEUE_DEPTH: &str = "headroom_queue_depth";
pub const QUEUE_WAIT: &str = "headroom_queue_wait_seconds";
pub const UPSTREAM_CONNECTS: &str = "headroom_upstream_connects_total";
pub const BACKEND_HEALTHY: &str = "headroom_backend_healthy";
pub const BACKEND_STATE: &str = "headroom_backend_state";
pub const HEALTH_CHECKS: &str = "headroom_health_checks_total";
pub const EJECTIONS: &str = "headroom_ejections_total";
pub const RETRIES: &str = "headroom_retries_total";
pub const PANIC_MODE: &str = "headroom_panic_mode";
pub const CONFIG_RELOADS: &str = "headroom_config_reloads_total";
pub const CONFIG_LAST_RELOAD: &str = "headroom_config_last_reload_timestamp_seconds";
pub const BACKENDS: &str = "headroom_backends";
pub const SCALE_EVENTS: &str = "headroom_scale_events_total";
pub const DESIRED_BACKENDS: &str = "headroom_desired_backends";
pub const PROVISION_SECONDS: &str = "headroom_provision_seconds";
pub const TLS_HANDSHAKES: &str = "headroom_tls_handshakes_total";
pub const TLS_CERT_EXPIRY: &str = "headroom_tls_cert_expiry_timestamp_seconds";
pub const TLS_CERT_RELOADS: &str = "headroom_tls_cert_reloads_total";
pub const BACKEND_ADDRS_REFUSED: &str = "headroom_backend_addresses_refused_total";
pub const LOOPS_DETECTED: &str = "headroom_loops_detected_total";
pub const ADMIN_REFUSED: &str = "headroom_admin_requests_refused_total";
pub const CLIENT_STALLED: &str = "headroom_client_stalled_total";
pub const ACCEPT_ERRORS: &str = "headroom_accept_errors_total";
pub const CLUSTER_CONNECTED: &str = "headroom_cluster_connected";
pub const CLUSTER_MEMBERS: &str = "headroom_cluster_members";
pub const CLUSTER_REGISTRY_CHANGES: &str = "headroom_cluster_registry_changes_total";

/// Whether this replica reaches etcd (1) or serves on what it last had (0).
pub fn cluster_connected(up: bool) {
    metrics::gauge!(CLUSTER_CONNECTED).set(if up { 1.0 } else { 0.0 });
}

/// How many live replicas this one sees in its group.
pub fn cluster_members(n: usize) {
    metrics::gauge!(CLUSTER_MEMBERS).set(n as f64);
}

/// A change of the shared backend registry applied here (`change`: add, remove).
pub fn cluster_registry_change(change: &'static str) {
    metrics::counter!(CLUSTER_REGISTRY_CHANGES, "change" => change).increment(1);
}

/// A failed accept on a listener (out of file descriptors and the like).
pub fn accept_error() {
    metrics::counter!(ACCEPT_ERRORS).increment(1);
}

/// A client connection cut off for taking no response bytes for `send_timeout`.
pub fn client_stalled() {
    metrics::counter!(CLIENT_STALLED).increment(1);
}

/// A backend address refused by the address rules (`source`: api, provider; `rule`: see
/// `config::addr::AddrRule::as_str`).
pub fn backend_addr_refused(pool: &str, source: &'static str, rule: &'static str) {
    metrics::counter!(BACKEND_ADDRS_REFUSED, "pool" => pool.to_string(), "source" => source, "rule" => rule)
        .increment(1);
}

/// A request that already carried this headroom's own `Via` token (answered 508).
pub fn loop_detected() {
    metrics::counter!(LOOPS_DETECTED).increment(1);
}

/// An admin request refused before it was served (`reason`: token, origin, content_type, host).
pub fn admin_refused(reason: &'static str) {
    metrics::counter!(ADMIN_REFUSED, "reason" => reason).increment(1);
}

/// One client TLS handshake (`result`: ok, error, timeout).
pub fn tls_handshake(result: &'static str) {
    metrics::counter!(TLS_HANDSHAKES, "result" => result).increment(1);
}

/// When a served certificate expires (`name`: `default`, or the first SNI name of its entry).
pub fn tls_cert_expiry(name: &str, unix_seconds: f64) {
    metrics::gauge!(TLS_CERT_EXPIRY, "name" => name.to_string()).set(unix_seconds);
}

/// A reload of the certificate files (`outcome`: ok, error).
pub fn tls_cert_reloaded(ok: bool) {
    metrics::counter!(TLS_CERT_RELOADS, "outcome" => if ok { "ok" } else { "error" }).increment(1);
}

/// Counters start at zero with their known labels, so `rate()` and dashboards see them before
/// the first event (Prometheus practice).
pub fn init_counters() {
    metrics::counter!(LOOPS_DETECTED).increment(0);
    metrics::counter!(CLIENT_STALLED).increment(0);
    metrics::counter!(ACCEPT_ERRORS).increment(0);
    for outcome in ["ok", "error"] {
        metrics::counter!(CONFIG_RELOADS, "outcome" => outcome).increment(0);
    }
}

/// Zero counters of an autoscaled pool.
pub fn init_scale_counters(pool: &str) {
    for action in ["scale_up", "scale_down", "replace"] {
        for outcome in ["ok", "error"] {
            scale_event_n(pool, action, outcome, 0);
        }
    }
}

/// Zero counters of the TLS listener.
pub fn init_tls_counters() {
    for result in ["ok", "error", "timeout"] {
        metrics::counter!(TLS_HANDSHAKES, "result" => result).increment(0);
    }
    for outcome in ["ok", "error"] {
        metrics::counter!(TLS_CERT_RELOADS, "outcome" => outcome).increment(0);
    }
}

fn scale_event_n(pool: &str, action: &'static str, outcome: &'static str, n: u64) {
    metrics::counter!(SCALE_EVENTS, "pool" => pool.to_string(), "action" => action, "outcome" => outcome).increment(n);
}

/// One finished provider call (`action`: scale_up, scale_down, replace; `outcome`: ok, error).
pub fn scale_event(pool: &str, action: &'static str, outcome: &'static str) {
    scale_event_n(pool, action, outcome, 1);
}

/// The backend count the autoscaler aims for.
pub fn desired_backends(pool: &str, n: u32) {
    metrics::gauge!(DESIRED_BACKENDS, "pool" => pool.to_string()).set(n as f64);
}

/// Time from asking a provider for a backend to its first healthy moment.
pub fn provisioned(pool: &str, seconds: f64) {
    metrics::histogram!(PROVISION_SECONDS, "pool" => pool.to_string()).record(seconds);
}

/// Counts a reload by outcome (`ok` or `error`); a good one also sets the last-reload time.
pub fn config_reloaded(ok: bool, at_unix: f64) {
    metrics::counter!(CONFIG_RELOADS, "outcome" => if ok { "ok" } else { "error" }).increment(1);
    if ok {
        metrics::gauge!(CONFIG_LAST_RELOAD).set(at_unix);
    }
}

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global Prometheus recorder once per process; later calls return the same handle.
/// `None` if another recorder was installed first (metrics then go there).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?;
            match builder.install_recorder() {
                Ok(h) => {
                    spawn_upkeep(h.clone());
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot install the Prometheus recorder");
                    None
                }
            }
        })
        .clone()
}

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The exporter keeps every histogram sample until it is folded into buckets, which otherwise
/// happens only when `/metrics` is rendered: without a scraper, memory would grow with every
/// request. A small thread folds them on a fixed interval instead.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
        std::thread::sleep(UPKEEP_INTERVAL);
        handle.run_upkeep();
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms are folded only when scraped");
    }
}

/// Status codes whose counters are cached per backend; others are looked up on use.
const CACHED_CODES: [u16; 14] = [200, 201, 204, 400, 401, 403, 404, 408, 413, 429, 500, 502, 503, 504];

/// Requests counted by status code: the common codes in a fixed slot each, up to 16 others in
/// slots claimed as they come, and any further ones together as `other`. About 0.4 KiB.
#[derive(Default)]
pub struct CodeCounts {
    common: [AtomicU64; CACHED_CODES.len()],
    /// (code, count); code 0 is a free slot.
    rare: [(AtomicU32, AtomicU64); 16],
    other: AtomicU64,
}

impl CodeCounts {
    #[inline]
    pub fn record(&self, status: u16) {
        if let Some(i) = CACHED_CODES.iter().position(|&c| c == status) {
            self.common[i].fetch_add(1, Ordering::Relaxed);
            return;
        }
        let code = u32::from(status);
        for (c, n) in &self.rare {
            let seen = c.load(Ordering::Relaxed);
            let mine = seen == code
                || (seen == 0
                    && match c.compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed) {
                        Ok(_) => true,
                        Err(now) => now == code,
                    });
            if mine {
                n.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        self.other.fetch_add(1, Ordering::Relaxed);
    }

    /// Every code counted so far (`"other"` for the codes past the slots), with its count.
    pub fn each(&self, mut f: impl FnMut(&dyn std::fmt::Display, u64)) {
        for (code, n) in CACHED_CODES.iter().zip(&self.common) {
            match n.load(Ordering::Relaxed) {
                0 => {}
                n => f(code, n),
            }
        }
        for (c, n) in &self.rare {
            match (c.load(Ordering::Relaxed), n.load(Ordering::Relaxed)) {
                (0, _) | (_, 0) => {}
                (code, n) => f(&code, n),
            }
        }
        match self.other.load(Ordering::Relaxed) {
            0 => {}
            n => f(&"other", n),
        }
    }
}

/// The handles one backend records into.
pub struct BackendMetrics {
    pool: Arc<str>,
    backend: Arc<str>,
    /// `headroom_requests_total` of this backend.
    pub codes: CodeCounts,
    durations: [OnceLock<Histogram>; 5],
    /// Counters written at scrape time from these (see `admin::backend_series`), not kept in
    /// the registry: they leave with the backend.
    connects: AtomicU64,
    ejections: AtomicU64,
    checks_passed: AtomicU64,
    checks_failed: AtomicU64,
}

impl BackendMetrics {
    pub fn new(pool: &str, backend: &str) -> Self {
        BackendMetrics {
            pool: Arc::from(pool),
            backend: Arc::from(backend),
            codes: CodeCounts::default(),
            durations: Default::default(),
            connects: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            checks_passed: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
        }
    }

    /// Counts one response with this status.
    #[inline]
    pub fn record(&self, status: u16) {
        self.codes.record(status);
    }

    /// The backend's label.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Records the duration of a request answered with this status.
    #[inline]
    pub fn observe(&self, status: u16, seconds: f64) {
        duration_histogram(&self.pool, status, &self.durations).record(seconds);
    }

    pub fn connected(&self) {
        self.connects.fetch_add(1, Ordering::Relaxed);
    }

    /// One active health check (off the data path).
    pub fn health_check(&self, pass: bool) {
        let c = if pass { &self.checks_passed } else { &self.checks_failed };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// One passive ejection.
    pub fn ejected(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    /// (`headroom_upstream_connects_total`, `headroom_ejections_total`, health checks passed,
    /// failed) so far.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (get(&self.connects), get(&self.ejections), get(&self.checks_passed), get(&self.checks_failed))
    }
}

/// The handles for requests a pool answered itself (no backend chosen: 503 and the like).
pub struct PoolMetrics {
    pool: Arc<str>,
    /// `headroom_requests_total{backend="none"}` of this pool, shared by every version of it.
    pub codes: Arc<CodeCounts>,
    durations: [OnceLock<Histogram>; 5],
    queue_wait: Histogram,
}

impl PoolMetrics {
    pub fn new(pool: &str) -> Self {
        // Requests answered before routing (`pool="none"`) are never retried.
        if pool != "none" {
            for reason in crate::config::RetryConfig::KINDS {
                metrics::counter!(RETRIES, "pool" => pool.to_string(), "reason" => reason).increment(0);
            }
        }
        PoolMetrics {
            pool: Arc::from(pool),
            codes: Arc::default(),
            durations: Default::default(),
            queue_wait: metrics::histogram!(QUEUE_WAIT, "pool" => pool.to_string()),
        }
    }

    /// The pool's name (shared, for log lines).
    pub fn name(&self) -> &Arc<str> {
        &self.pool
    }

    /// The same pool's handles for its next version (a reload): its counts carry over.
    pub fn renewed(&self) -> PoolMetrics {
        PoolMetrics {
            pool: self.pool.clone(),
            codes: self.codes.clone(),
            durations: self.durations.clone(),
            queue_wait: self.queue_wait.clone(),
        }
    }

    pub fn record_local(&self, status: u16, seconds: f64) {
        self.codes.record(status);
        duration_histogram(&self.pool, status, &self.durations).record(seconds);
    }

    pub fn queued(&self, seconds: f64) {
        self.queue_wait.record(seconds);
    }

    /// One request sent to another backend; `reason` says why (e.g. `connect-failure`).
    pub fn retried(&self, reason: &'static str) {
        metrics::counter!(RETRIES, "pool" => self.pool.to_string(), "reason" => reason).increment(1);
    }
}

#[inline]
fn duration_histogram<'a>(pool: &str, status: u16, cache: &'a [OnceLock<Histogram>; 5]) -> &'a Histogram {
    let class = (status / 100).clamp(1, 5) as usize;
    cache[class - 1].get_or_init(|| {
        let label = ["1xx", "2xx", "3xx", "4xx", "5xx"][class - 1];
        metrics::histogram!(REQUEST_DURATION, "pool" => pool.to_string(), "class" => label)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_counted_each_in_its_slot_and_the_rest_as_other() {
        let c = CodeCounts::default();
        for code in [200, 200, 503, 299, 299] {
            c.record(code);
        }
        for code in 600..630 {
            c.record(code);
        }
        let mut seen = Vec::new();
        c.each(|code, n| seen.push((code.to_string(), n)));
        assert_eq!(seen[..3], [("200".into(), 2), ("503".into(), 1), ("299".into(), 2)]);
        assert_eq!(seen.len(), 3 + 15 + 1, "sixteen rare codes, then the rest together");
        assert_eq!(seen.last().unwrap(), &("other".to_string(), 15));
    }
}
