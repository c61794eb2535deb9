//! One pool's config validated: its choices (balance, protocol), capacity and queue, its
//! backends (addresses checked against the address rules, each once in the whole file), and its
//! sections (through `sections`, `autoscale` and `tls`). Same rules and messages as the rest of
//! `validate`.

use super::addr::parse_addr;
use super::file::{FileBackend, FilePool};
use super::forms::{check_capacity, check_weight};
use super::*;
use std::collections::HashSet;
use toml::Spanned;

pub(super) fn validate_pool(
    name: &str,
    pool: &Spanned<FilePool>,
    text: &str,
    seen_addrs: &mut HashSet<SocketAddr>,
    policy: &super::addr::AddrPolicy,
    base_dir: &Path,
    duration: impl Fn(&Option<Spanned<String>>, &str, Duration) -> Result<Duration, ConfigError>,
) -> Result<PoolConfig, ConfigError> {
    let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(text, span, msg);
    let p = pool.get_ref();
    let field = |f: &str| format!("pools.{name}.{f}");
    let ctx = sections::Ctx { text, name, duration: &duration };

    let (balance, protocol) = (balance(&ctx, p)?, protocol(&ctx, p)?);
    let max_inflight_per_backend = match &p.max_inflight_per_backend {
        None => 64,
        Some(v) => check_capacity(v, &field("max_inflight_per_backend"), text)?,
    };
    let queue = queue(&ctx, p)?;

    let mut backends = Vec::new();
    for b in &p.backends {
        backends.push(validate_backend(name, b, max_inflight_per_backend, text, seen_addrs, policy)?);
    }

    let launch = p.launch.as_ref().map(|l| sections::launch(&ctx, l, p.autoscale.is_some(), max_inflight_per_backend));
    let launch = launch.transpose()?;
    if backends.is_empty() && launch.is_none() && p.autoscale.is_none() {
        return Err(err(
            pool.span(),
            format!("pools.{name}: no backends; add [[pools.{name}.backends]] with an addr, a [pools.{name}.launch] section, or [pools.{name}.autoscale]"),
        ));
    }

    let health = p.health.as_ref().map(|h| sections::health(&ctx, h)).transpose()?;
    let outlier = match &p.outlier {
        None => None,
        Some(o) => Some(sections::outlier(&ctx, o)?),
    };
    // An autoscaled pool must notice a dead backend even without [health]: passive signals then.
    let outlier = outlier.or_else(|| (p.autoscale.is_some() && health.is_none()).then(passive_default));

    let panic_threshold = match &p.panic_threshold {
        None => 0.0,
        Some(v) if (0.0..=1.0).contains(v.get_ref()) => *v.get_ref(),
        Some(v) => return Err(err(v.span(), format!("{}: allowed range is 0.0..=1.0", field("panic_threshold")))),
    };

    let slow_start = match &p.slow_start {
        None => None,
        Some(_) => Some(duration(&p.slow_start, &field("slow_start"), Duration::from_secs(30))?),
    };
    let retry = p.retry.as_ref().map(|r| sections::retry(&ctx, r)).transpose()?;
    let engine = p.engine.as_ref().map(|e| sections::engine(&ctx, e)).transpose()?;
    let autoscale = match &p.autoscale {
        None => None,
        Some(a) => {
            Some(super::autoscale::validate(name, a, launch.is_some(), max_inflight_per_backend, text, &duration)?)
        }
    };
    needs_engine(name, p, balance, autoscale.as_ref(), engine.is_some(), text)?;
    let prefix = super::prefix::prefix(&ctx, balance, p.prefix.as_ref())?;

    let tls = super::tls::validate_upstream(name, p, protocol, text, base_dir)?;
    let models = models(name, p, text)?;

    Ok(PoolConfig {
        prefix,
        models,
        discover_models: p.discover_models.unwrap_or(false),
        tls,
        autoscale,
        retry,
        engine,
        slow_start,
        honor_retry_after: p.honor_retry_after.unwrap_or(true),
        panic_threshold,
        health,
        outlier,
        name: name.to_string(),
        balance,
        protocol,
        max_inflight_per_backend,
        connect_timeout: duration(&p.connect_timeout, &field("connect_timeout"), Duration::from_secs(2))?,
        response_header_timeout: duration(
            &p.response_header_timeout,
            &field("response_header_timeout"),
            Duration::from_secs(600),
        )?,
        stream_idle_timeout: duration(&p.stream_idle_timeout, &field("stream_idle_timeout"), Duration::from_secs(300))?,
        queue,
        backends,
        launch,
    })
}

/// `least_load` and the engine signals of the autoscaler read the engines: without
/// `[pools.X.engine]`, the key that asks for them is refused where it is written.
fn needs_engine(
    name: &str,
    p: &FilePool,
    balance: BalanceKind,
    autoscale: Option<&AutoscaleConfig>,
    has_engine: bool,
    text: &str,
) -> Result<(), ConfigError> {
    let refuse = |span, key: &str, what: &str| {
        let message = format!("pools.{name}.{key}: {what} reads the engines' queues; add [pools.{name}.engine]");
        Err(ConfigError::at(text, span, message))
    };
    if has_engine {
        return Ok(());
    }
    if let (BalanceKind::LeastLoad, Some(b)) = (balance, &p.balance) {
        return refuse(b.span(), "balance", "least_load");
    }
    let signal = p.autoscale.as_ref().and_then(|a| a.get_ref().signal.as_ref());
    match (autoscale.map(|a| a.signal), signal) {
        (Some(DemandSignal::EngineQueue | DemandSignal::Both), Some(s)) => {
            refuse(s.span(), "autoscale.signal", s.get_ref())
        }
        _ => Ok(()),
    }
}

/// `models`: names for `GET /v1/models`, none empty, none twice.
fn models(name: &str, p: &FilePool, text: &str) -> Result<Vec<String>, ConfigError> {
    let Some(list) = &p.models else { return Ok(Vec::new()) };
    let mut seen = HashSet::new();
    for m in list.get_ref() {
        if m.trim().is_empty() || !seen.insert(m.as_str()) {
            let what = if m.trim().is_empty() { "an empty name".to_string() } else { format!("{m:?} twice") };
            return Err(ConfigError::at(text, list.span(), format!("pools.{name}.models: lists {what}")));
        }
    }
    Ok(list.get_ref().clone())
}

fn validate_backend(
    pool: &str,
    b: &FileBackend,
    default_capacity: u32,
    text: &str,
    seen_addrs: &mut HashSet<SocketAddr>,
    policy: &super::addr::AddrPolicy,
) -> Result<BackendConfig, ConfigError> {
    let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(text, span, msg);
    let addr =
        parse_addr(b.addr.get_ref()).map_err(|e| err(b.addr.span(), format!("pools.{pool}.backends.addr: {e}")))?;
    policy.check(addr).map_err(|rule| err(b.addr.span(), format!("pools.{pool}.backends.addr: {addr}: {rule}")))?;
    if !seen_addrs.insert(addr) {
        return Err(err(
            b.addr.span(),
            format!("pools.{pool}.backends.addr: duplicate backend address {addr}; each backend may appear once"),
        ));
    }
    let weight = match &b.weight {
        None => 1,
        Some(w) => check_weight(w, &format!("pools.{pool}.backends.weight"), text)?,
    };
    let max_inflight = match &b.max_inflight {
        None => default_capacity,
        Some(v) => check_capacity(v, &format!("pools.{pool}.backends.max_inflight"), text)?,
    };
    Ok(BackendConfig { addr, weight, max_inflight, backup: b.backup.unwrap_or(false) })
}

/// `balance`: one of the pickers (default least_conn).
fn balance(ctx: &sections::Ctx, p: &FilePool) -> Result<BalanceKind, ConfigError> {
    match &p.balance {
        None => Ok(BalanceKind::LeastConn),
        Some(b) => BalanceKind::parse(b.get_ref()).ok_or_else(|| {
            let field = format!("pools.{}.balance", ctx.name);
            ConfigError::at(
                ctx.text,
                b.span(),
                format!("{field}: unknown value {:?}; allowed: {}", b.get_ref(), BalanceKind::ALLOWED),
            )
        }),
    }
}

/// `protocol`: http1 (default), h2c or auto.
fn protocol(ctx: &sections::Ctx, p: &FilePool) -> Result<Protocol, ConfigError> {
    match p.protocol.as_ref().map(|v| (v.get_ref().as_str(), v.span())) {
        None | Some(("http1", _)) => Ok(Protocol::Http1),
        Some(("h2c", _)) => Ok(Protocol::H2c),
        Some(("auto", _)) => Ok(Protocol::Auto),
        Some((other, span)) => {
            let field = format!("pools.{}.protocol", ctx.name);
            Err(ConfigError::at(
                ctx.text,
                span,
                format!("{field}: unknown value {other:?}; allowed: {}", Protocol::ALLOWED),
            ))
        }
    }
}

/// `[pools.X.queue]`: depth up to a million (default 1024), timeout (default 30s).
fn queue(ctx: &sections::Ctx, p: &FilePool) -> Result<QueueConfig, ConfigError> {
    let Some(q) = &p.queue else { return Ok(QueueConfig { max_depth: 1024, timeout: Duration::from_secs(30) }) };
    let max_depth = match &q.max_depth {
        None => 1024,
        Some(d) if *d.get_ref() > 1_000_000 => {
            let field = format!("pools.{}.queue.max_depth", ctx.name);
            return Err(ConfigError::at(ctx.text, d.span(), format!("{field}: allowed range is 0..=1000000")));
        }
        Some(d) => *d.get_ref(),
    };
    let timeout = (ctx.duration)(&q.timeout, &format!("pools.{}.queue.timeout", ctx.name), Duration::from_secs(30))?;
    Ok(QueueConfig { max_depth, timeout })
}

/// Passive ejection for an autoscaled pool without `[health]`, so a dead backend is noticed.
fn passive_default() -> OutlierConfig {
    OutlierConfig {
        consecutive_failures: 5,
        base_ejection: Duration::from_secs(30),
        max_ejection: Duration::from_secs(300),
        max_ejected_percent: 50,
    }
}
