//! `GET /api/pools`: every pool as it is now (its queue, traffic, autoscaling and engine
//! settings) and each of its backends (state, capacity, counters, the engine's last reading).

use crate::control::Control;
use serde_json::json;

/// A backend's engine reading for `/api/pools`: null without `[pools.X.engine]`, or when no
/// reading is younger than three intervals.
fn engine_json(b: &crate::pool::Backend, cfg: Option<&crate::config::EngineConfig>) -> serde_json::Value {
    let stale_after = cfg.map(crate::config::EngineConfig::stale_after_ms);
    match stale_after.and_then(|s| b.engine.get(crate::clock::now_ms(), s)) {
        None => serde_json::Value::Null,
        Some(r) => json!({
            "requests_running": r.running,
            "requests_waiting": r.waiting,
            "kv_cache_usage": r.kv_usage,
            "prefix_cache_hit_rate": r.hit_rate,
            "age_ms": r.age_ms,
        }),
    }
}

/// The JSON document of `GET /api/pools`.
pub fn pools_json(control: &Control) -> serde_json::Value {
    let snap = control.snapshot();
    let pools: Vec<_> = snap
        .pools
        .iter()
        .map(|p| {
            let in_file: std::collections::HashSet<std::net::SocketAddr> =
                p.config.backends.iter().map(|c| c.addr).collect();
            let traffic = p.state.traffic.totals();
            let backends: Vec<_> = p
                .backends
                .iter()
                .map(|b| {
                    json!({
                        "addr": b.label.as_ref(),
                        "weight": b.weight(),
                        "in_flight": b.in_flight(),
                        "max_inflight": b.max_inflight(),
                        "effective_max_inflight": b.effective_max_inflight(),
                        "share": b.share(),
                        "slow_start_percent": b.ramp() / 10,
                        "state": b.state().as_str(),
                        "requests": b.requests(),
                        "errors": b.errors(),
                        "aborted": b.aborted(),
                        "idle_connections": b.attached.get().map_or(0, |a| a.idle()),
                        "backup": b.is_backup(),
                        "ejections": b.ejections(),
                        "last_ejection_ms": b.last_ejection_ms(),
                        "ejected_for_ms": b.ejected_for_ms(),
                        "saturated_for_ms": b.saturated_for_ms(),
                        "dynamic": !in_file.contains(&b.addr),
                        "engine": engine_json(b, p.config.engine.as_ref()),
                        "prefix_blocks": p.prefix.as_ref().map(|r| r.index.footprint(b)),
                    })
                })
                .collect();
            json!({
                "name": p.config.name,
                "balance": p.config.balance.as_str(),
                "queue_depth": p.queue.depth(),
                "queue_max_depth": p.queue.max_depth(),
                "in_flight": p.in_flight(),
                "requests": traffic.requests,
                "errors": traffic.errors,
                "aborted": traffic.aborted,
                "engine": p.config.engine.as_ref().map(|e| json!({
                    "kind": e.kind.as_str(),
                    "metrics_path": e.metrics_path,
                    "interval_ms": u64::try_from(e.interval.as_millis()).unwrap_or(u64::MAX),
                })),
                "autoscale": p.config.autoscale.as_ref().map(|a| json!({
                    "min_backends": a.min_backends,
                    "max_backends": a.max_backends,
                    "target_inflight_per_backend": a.target_inflight_per_backend,
                    "provider": a.provider.kind.as_str(),
                    "signal": a.signal.as_str(),
                })),
                "backends": backends,
            })
        })
        .collect();
    let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    json!({ "time": time, "pools": pools })
}
