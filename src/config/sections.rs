//! The sections of a pool's config, validated one function each: `launch`, `health`, `outlier`,
//! `retry`, `engine`. Same rules and messages as the rest of `validate`; each error names its field as
//! `pools.<name>.<section>.<key>` at the value's line and column.

use super::file::{FileEngine, FileHealth, FileLaunch, FileOutlier, FileRetry};
use super::{ConfigError, EngineConfig, EngineKind, HealthConfig, LaunchConfig, OutlierConfig, RetryConfig};
use std::time::Duration;
use toml::Spanned;

/// A duration key: its value, the field name for errors, and the default.
pub(super) type DurationOf<'a> = &'a dyn Fn(&Option<Spanned<String>>, &str, Duration) -> Result<Duration, ConfigError>;

/// What every section needs: the source text (for positions), the pool's name, durations.
pub(super) struct Ctx<'a> {
    pub text: &'a str,
    pub name: &'a str,
    pub duration: DurationOf<'a>,
}

impl Ctx<'_> {
    pub(super) fn err(&self, span: std::ops::Range<usize>, message: String) -> ConfigError {
        ConfigError::at(self.text, span, message)
    }

    pub(super) fn field(&self, key: &str) -> String {
        format!("pools.{}.{key}", self.name)
    }

    fn duration(&self, v: &Option<Spanned<String>>, field: &str, default: Duration) -> Result<Duration, ConfigError> {
        (self.duration)(v, field, default)
    }
}

/// `[pools.X.launch]`; `autoscaled` allows `count = 0`.
pub(super) fn launch(
    ctx: &Ctx,
    l: &Spanned<FileLaunch>,
    autoscaled: bool,
    default_capacity: u32,
) -> Result<LaunchConfig, ConfigError> {
    let lr = l.get_ref();
    if lr.command.get_ref().is_empty() {
        return Err(ctx.err(lr.command.span(), format!("{}: needs at least the program", ctx.field("launch.command"))));
    }
    if !lr.command.get_ref().iter().any(|a| a.contains("{addr}")) {
        return Err(ctx.err(
            lr.command.span(),
            format!(
                "{}: must pass \"{{addr}}\" somewhere so the backend knows where to listen",
                ctx.field("launch.command")
            ),
        ));
    }
    // An autoscaled pool may launch none at first: the autoscaler starts what it needs.
    let lowest = if autoscaled { 0 } else { 1 };
    let count = match &lr.count {
        None => 1,
        Some(c) if *c.get_ref() < lowest || *c.get_ref() > 256 => {
            return Err(ctx.err(c.span(), format!("{}: allowed range is {lowest}..=256", ctx.field("launch.count"))))
        }
        Some(c) => *c.get_ref(),
    };
    Ok(LaunchConfig {
        command: lr.command.get_ref().clone(),
        count,
        weight: match &lr.weight {
            None => 1,
            Some(w) => super::forms::check_weight(w, &ctx.field("launch.weight"), ctx.text)?,
        },
        max_inflight: match &lr.max_inflight {
            None => default_capacity,
            Some(v) => super::forms::check_capacity(v, &ctx.field("launch.max_inflight"), ctx.text)?,
        },
        ready_timeout: ctx.duration(&lr.ready_timeout, &ctx.field("launch.ready_timeout"), Duration::from_secs(10))?,
    })
}

/// `[pools.X.health]`.
pub(super) fn health(ctx: &Ctx, h: &FileHealth) -> Result<HealthConfig, ConfigError> {
    let path = match &h.path {
        None => "/health".to_string(),
        Some(v) if !v.get_ref().starts_with('/') => {
            return Err(ctx.err(v.span(), format!("{}: must start with '/'", ctx.field("health.path"))))
        }
        Some(v) => v.get_ref().clone(),
    };
    let threshold = |v: &Option<Spanned<u32>>, f: &str, default: u32| match v {
        None => Ok(default),
        Some(t) if (1..=100).contains(t.get_ref()) => Ok(*t.get_ref()),
        Some(t) => Err(ctx.err(t.span(), format!("{}: allowed range is 1..=100", ctx.field(f)))),
    };
    let expect_status = match &h.expect_status {
        None => (200, 299),
        Some(v) => super::forms::parse_status_range(v.get_ref()).ok_or_else(|| {
            ctx.err(
                v.span(),
                format!("{}: expected a status or a range such as \"200-299\"", ctx.field("health.expect_status")),
            )
        })?,
    };
    let interval = ctx.duration(&h.interval, &ctx.field("health.interval"), Duration::from_secs(2))?;
    let fast_interval = ctx.duration(&h.fast_interval, &ctx.field("health.fast_interval"), interval / 4)?;
    if fast_interval > interval {
        let span = h.fast_interval.as_ref().map(|v| v.span()).unwrap_or_default();
        return Err(
            ctx.err(span, format!("{}: must not be longer than health.interval", ctx.field("health.fast_interval")))
        );
    }
    Ok(HealthConfig {
        path,
        interval,
        fast_interval,
        timeout: ctx.duration(&h.timeout, &ctx.field("health.timeout"), Duration::from_secs(1))?,
        healthy_threshold: threshold(&h.healthy_threshold, "health.healthy_threshold", 2)?,
        unhealthy_threshold: threshold(&h.unhealthy_threshold, "health.unhealthy_threshold", 3)?,
        expect_status,
        gate_new_backends: h.gate_new_backends.unwrap_or(true),
        reuse_connection: h.reuse_connection.unwrap_or(true),
    })
}

/// `[pools.X.outlier]`.
pub(super) fn outlier(ctx: &Ctx, o: &FileOutlier) -> Result<OutlierConfig, ConfigError> {
    Ok(OutlierConfig {
        consecutive_failures: match &o.consecutive_failures {
            None => 5,
            Some(v) if (1..=1000).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                return Err(ctx.err(
                    v.span(),
                    format!("{}: allowed range is 1..=1000", ctx.field("outlier.consecutive_failures")),
                ))
            }
        },
        base_ejection: ctx.duration(&o.base_ejection, &ctx.field("outlier.base_ejection"), Duration::from_secs(30))?,
        max_ejection: ctx.duration(&o.max_ejection, &ctx.field("outlier.max_ejection"), Duration::from_secs(300))?,
        max_ejected_percent: match &o.max_ejected_percent {
            None => 50,
            Some(v) if *v.get_ref() <= 100 => *v.get_ref(),
            Some(v) => {
                return Err(ctx
                    .err(v.span(), format!("{}: allowed range is 0..=100", ctx.field("outlier.max_ejected_percent"))))
            }
        },
    })
}

/// `[pools.X.retry]`.
pub(super) fn retry(ctx: &Ctx, r: &FileRetry) -> Result<RetryConfig, ConfigError> {
    let kinds: Vec<String> = match &r.on {
        None => RetryConfig::KINDS.map(String::from).to_vec(),
        Some(list) => {
            for k in list.get_ref() {
                if !RetryConfig::KINDS.contains(&k.as_str()) {
                    return Err(ctx.err(
                        list.span(),
                        format!(
                            "{}: unknown kind {k:?}; allowed: {}",
                            ctx.field("retry.on"),
                            RetryConfig::KINDS.join(", ")
                        ),
                    ));
                }
            }
            list.get_ref().clone()
        }
    };
    Ok(RetryConfig {
        attempts: match &r.attempts {
            None => 2,
            Some(v) if *v.get_ref() <= 10 => *v.get_ref(),
            Some(v) => {
                return Err(ctx.err(v.span(), format!("{}: allowed range is 0..=10", ctx.field("retry.attempts"))))
            }
        },
        on_reset: kinds.iter().any(|k| k == "reset"),
        on_refused_stream: kinds.iter().any(|k| k == "refused-stream"),
        on_503: kinds.iter().any(|k| k == "503"),
        on_429: kinds.iter().any(|k| k == "429"),
        budget_percent: match &r.budget_percent {
            None => 20,
            Some(v) if *v.get_ref() <= 100 => *v.get_ref(),
            Some(v) => {
                return Err(
                    ctx.err(v.span(), format!("{}: allowed range is 0..=100", ctx.field("retry.budget_percent")))
                )
            }
        },
        idempotent_only: r.idempotent_only.unwrap_or(true),
    })
}

/// `[pools.X.engine]`: a path (default `/metrics`), an interval (default 1s, at least 100ms) and
/// the engine's kind (default auto).
pub(super) fn engine(ctx: &Ctx, e: &Spanned<FileEngine>) -> Result<EngineConfig, ConfigError> {
    let e = e.get_ref();
    let metrics_path = match &e.metrics_path {
        None => "/metrics".to_string(),
        Some(p) if p.get_ref().starts_with('/') && p.get_ref().parse::<http::Uri>().is_ok() => p.get_ref().clone(),
        Some(p) => {
            return Err(
                ctx.err(p.span(), format!("{}: must be a path starting with '/'", ctx.field("engine.metrics_path")))
            )
        }
    };
    let interval = ctx.duration(&e.interval, &ctx.field("engine.interval"), Duration::from_secs(1))?;
    if interval < Duration::from_millis(100) {
        let span = e.interval.as_ref().map_or(0..0, |i| i.span());
        return Err(ctx.err(span, format!("{}: at least 100ms", ctx.field("engine.interval"))));
    }
    let kind = match &e.kind {
        None => EngineKind::Auto,
        Some(k) => EngineKind::parse(k.get_ref()).ok_or_else(|| {
            ctx.err(
                k.span(),
                format!(
                    "{}: unknown value {:?}; allowed: {}",
                    ctx.field("engine.kind"),
                    k.get_ref(),
                    EngineKind::ALLOWED
                ),
            )
        })?,
    };
    Ok(EngineConfig { metrics_path, interval, kind })
}
