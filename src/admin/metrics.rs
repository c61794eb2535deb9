//! The parts of `GET /metrics` written from the current snapshot at each scrape: the per-pool
//! gauges mirrored into the registry, and the per-backend series (so a removed backend's series
//! are gone at the next scrape).

use crate::control::Control;
use crate::telemetry;

/// Sets the per-pool gauges that mirror live atomics, just before a scrape.
pub(super) fn sample_gauges(control: &Control) {
    let snap = control.snapshot();
    for p in &snap.pools {
        ::metrics::gauge!(telemetry::QUEUE_DEPTH, "pool" => p.config.name.clone()).set(p.queue.depth() as f64);
        let panic = p.config.panic_threshold > 0.0 && p.in_panic();
        ::metrics::gauge!(telemetry::PANIC_MODE, "pool" => p.config.name.clone()).set(if panic { 1.0 } else { 0.0 });
        for s in crate::pool::BackendState::ALL {
            let n = p.backends.iter().filter(|b| b.state() == s).count();
            ::metrics::gauge!(telemetry::BACKENDS, "pool" => p.config.name.clone(), "state" => s.as_str())
                .set(n as f64);
        }
    }
}

/// The engines' readings (`[pools.X.engine]`), a series per backend with a fresh reading and a
/// value its engine reports.
fn engine_gauges(snap: &crate::gateway::Snapshot, out: &mut String) {
    use std::fmt::Write as _;
    let now = crate::clock::now_ms();
    let readings: Vec<_> = snap
        .pools
        .iter()
        .filter_map(|p| p.config.engine.as_ref().map(|e| (p, e.stale_after_ms())))
        .flat_map(|(p, stale)| p.backends.iter().filter_map(move |b| Some((p, b, b.engine.get(now, stale)?))))
        .collect();
    type Value = fn(&crate::pool::engine::EngineReading) -> Option<f64>;
    let series: [(&str, Value); 4] = [
        (telemetry::ENGINE_RUNNING, |r| r.running.map(f64::from)),
        (telemetry::ENGINE_WAITING, |r| r.waiting.map(f64::from)),
        (telemetry::ENGINE_KV_USAGE, |r| r.kv_usage),
        (telemetry::ENGINE_HIT_RATE, |r| r.hit_rate),
    ];
    for (name, value) in series {
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (p, b, r) in &readings {
            if let Some(v) = value(r) {
                let _ = writeln!(out, "{name}{{pool=\"{}\",backend=\"{}\"}} {v}", p.config.name, b.label);
            }
        }
        out.push('\n');
    }
}

/// The per-backend gauges and counters (all but the per-status request counts), written straight
/// from the current snapshot at each scrape rather than kept in the registry: a removed backend's
/// series are gone at the next scrape, and a large pool costs no registry entries for them.
pub(super) fn backend_gauges(control: &Control, out: &mut String) {
    use std::fmt::Write as _;
    let snap = control.snapshot();
    let each = |out: &mut String, name: &str, line: &dyn Fn(&mut String, &str, &crate::pool::Backend)| {
        let _ = writeln!(out, "# TYPE {name} gauge");
        for p in &snap.pools {
            for b in &p.backends {
                line(out, &p.config.name, b);
            }
        }
        out.push('\n');
    };
    each(out, telemetry::BACKEND_INFLIGHT, &|out, pool, b| {
        let _ = writeln!(
            out,
            "{}{{pool=\"{pool}\",backend=\"{}\"}} {}",
            telemetry::BACKEND_INFLIGHT,
            b.label,
            b.in_flight()
        );
    });
    each(out, telemetry::BACKEND_HEALTHY, &|out, pool, b| {
        let up = u8::from(b.state() == crate::pool::BackendState::Healthy);
        let _ = writeln!(out, "{}{{pool=\"{pool}\",backend=\"{}\"}} {up}", telemetry::BACKEND_HEALTHY, b.label);
    });
    each(out, telemetry::BACKEND_STATE, &|out, pool, b| {
        let state = b.state();
        for s in crate::pool::BackendState::ALL {
            let (name, label, v) = (telemetry::BACKEND_STATE, &b.label, u8::from(s == state));
            let _ = writeln!(out, "{name}{{pool=\"{pool}\",backend=\"{label}\",state=\"{}\"}} {v}", s.as_str());
        }
    });
    engine_gauges(&snap, out);
    requests_total(control, &snap, out);
    // Per-backend counters, from the backend's own atomics (they survive reloads with it).
    let counter = |out: &mut String, name: &str, value: &dyn Fn(&crate::pool::Backend) -> u64| {
        let _ = writeln!(out, "# TYPE {name} counter");
        for p in &snap.pools {
            for b in &p.backends {
                let _ = writeln!(out, "{name}{{pool=\"{}\",backend=\"{}\"}} {}", p.config.name, b.label, value(b));
            }
        }
        out.push('\n');
    };
    counter(out, telemetry::UPSTREAM_CONNECTS, &|b| b.metrics.counts().0);
    counter(out, telemetry::EJECTIONS, &|b| b.metrics.counts().1);
    let _ = writeln!(out, "# TYPE {} counter", telemetry::HEALTH_CHECKS);
    for p in snap.pools.iter().filter(|p| p.config.health.is_some()) {
        for b in &p.backends {
            let (_, _, passed, failed) = b.metrics.counts();
            for (result, n) in [("pass", passed), ("fail", failed)] {
                let (name, pool, label) = (telemetry::HEALTH_CHECKS, &p.config.name, &b.label);
                let _ = writeln!(out, "{name}{{pool=\"{pool}\",backend=\"{label}\",result=\"{result}\"}} {n}");
            }
        }
    }
}

/// `headroom_requests_total{pool,backend,code}` from the counts the pools and backends keep
/// (`backend="none"`: answered by the pool itself; `pool="none"`: before any pool was chosen).
fn requests_total(control: &Control, snap: &crate::gateway::Snapshot, out: &mut String) {
    use std::fmt::Write as _;
    let name = telemetry::REQUESTS_TOTAL;
    let _ = writeln!(out, "# TYPE {name} counter");
    let mut series = |pool: &str, backend: &str, codes: &telemetry::CodeCounts| {
        codes.each(|code, n| {
            let _ = writeln!(out, "{name}{{pool=\"{pool}\",backend=\"{backend}\",code=\"{code}\"}} {n}");
        });
    };
    for p in &snap.pools {
        series(&p.config.name, "none", &p.metrics.codes);
        for b in &p.backends {
            series(&p.config.name, b.metrics.backend(), &b.metrics.codes);
        }
    }
    series("none", "none", &control.gateway.unrouted.codes);
    out.push('\n');
}
