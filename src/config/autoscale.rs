//! `[pools.X.autoscale]` and its `[provider]`: the runtime types and their validation.

use super::file::{FileAutoscale, FileProvider};
use super::ConfigError;
use std::time::Duration;
use toml::Spanned;

/// `[pools.X.autoscale]`: when to ask for backends, and when to give them back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoscaleConfig {
    /// Never fewer backends (ready + starting). Default 1; 0 allows scale from zero.
    pub min_backends: u32,
    /// Never more. Default 8.
    pub max_backends: u32,
    /// In-flight plus queued requests per ready backend the pool aims for. Default: the pool's
    /// `max_inflight_per_backend`.
    pub target_inflight_per_backend: u32,
    /// Scale up when the queue stays at or above this depth for `scale_up_window`; at twice
    /// this depth, at once. Default 4.
    pub scale_up_queue_depth: u32,
    /// Default 5s.
    pub scale_up_window: Duration,
    /// Scale in only after utilisation stayed below target this long. Default 120s.
    pub scale_down_window: Duration,
    /// Between two actions in the same direction. Default 30s.
    pub cooldown: Duration,
    /// A backend asked for that isn't healthy by then is given up and released. Default 600s.
    pub provision_timeout: Duration,
    /// A backend unhealthy (or ejected) this long is replaced. Default 60s.
    pub replace_unhealthy_after: Duration,
    /// Where demand is read. Default `gateway_queue`.
    pub signal: DemandSignal,
    pub provider: ProviderConfig,
}

/// `autoscale.signal`: what counts as the pool's queue and its requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemandSignal {
    /// headroom's own admission queue and in-flight requests.
    GatewayQueue,
    /// The engines' own schedulers (`[pools.X.engine]`): requests waiting and running, summed
    /// over the pool's backends; headroom's own queue only while no backend takes traffic.
    EngineQueue,
    /// The engines' waiting requests plus headroom's own queue; the engines' running requests.
    Both,
}

impl DemandSignal {
    pub const ALLOWED: &'static str = "gateway_queue, engine_queue, both";

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "gateway_queue" => Self::GatewayQueue,
            "engine_queue" => Self::EngineQueue,
            "both" => Self::Both,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::GatewayQueue => "gateway_queue",
            Self::EngineQueue => "engine_queue",
            Self::Both => "both",
        }
    }
}

/// `[pools.X.autoscale.provider]`: who adds and releases backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// One call's limit. Default 30s.
    pub timeout: Duration,
    /// First wait after a failed call; doubles per failure up to 60s (or this, if longer).
    /// Default 1s.
    pub retry_backoff: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderKind {
    /// A program: the JSON request on its stdin, the JSON reply on its stdout.
    Command { command: Vec<String> },
    /// An HTTP(S) endpoint the JSON request is POSTed to; optional bearer token from an
    /// environment variable (read at each call).
    Webhook { url: http::Uri, token_env: Option<String> },
    /// Local processes from the pool's `[launch]` command on free loopback ports.
    Local,
}

impl ProviderKind {
    pub const ALLOWED: &'static str = "command, webhook, local";

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Command { .. } => "command",
            Self::Webhook { .. } => "webhook",
            Self::Local => "local",
        }
    }
}

type DurationRule<'a> = &'a dyn Fn(&Option<Spanned<String>>, &str, Duration) -> Result<Duration, ConfigError>;

/// Validates `[pools.{name}.autoscale]`. `has_launch` says whether the pool has a `[launch]`
/// section (the local provider needs one); `default_target` is the pool's per-backend capacity.
pub(super) fn validate(
    name: &str,
    raw: &Spanned<FileAutoscale>,
    has_launch: bool,
    default_target: u32,
    text: &str,
    duration: DurationRule<'_>,
) -> Result<AutoscaleConfig, ConfigError> {
    let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(text, span, msg);
    let field = |f: &str| format!("pools.{name}.autoscale.{f}");
    let a = raw.get_ref();
    let count = |v: &Option<Spanned<u32>>, f: &str, default: u32, range: std::ops::RangeInclusive<u32>| match v {
        None => Ok(default),
        Some(n) if range.contains(n.get_ref()) => Ok(*n.get_ref()),
        Some(n) => Err(err(
            n.span(),
            format!("{}: {} is out of range; allowed {}..={}", field(f), n.get_ref(), range.start(), range.end()),
        )),
    };
    let min_backends = count(&a.min_backends, "min_backends", 1, 0..=1024)?;
    let max_backends = count(&a.max_backends, "max_backends", 8.max(min_backends), 1..=1024)?;
    if min_backends > max_backends {
        let span = a.min_backends.as_ref().map_or(raw.span(), |v| v.span());
        return Err(err(
            span,
            format!("{}: {min_backends} is above max_backends ({max_backends})", field("min_backends")),
        ));
    }
    let provider = match &a.provider {
        None if has_launch => ProviderConfig {
            kind: ProviderKind::Local,
            timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_secs(1),
        },
        None => {
            return Err(err(
                raw.span(),
                format!(
                    "pools.{name}.autoscale: needs a [pools.{name}.autoscale.provider] (kind = {}), \
                     or a [pools.{name}.launch] section for the local provider",
                    ProviderKind::ALLOWED
                ),
            ))
        }
        Some(p) => provider(name, p, has_launch, text, duration)?,
    };
    Ok(AutoscaleConfig {
        min_backends,
        max_backends,
        target_inflight_per_backend: count(
            &a.target_inflight_per_backend,
            "target_inflight_per_backend",
            default_target,
            1..=1_000_000,
        )?,
        scale_up_queue_depth: count(&a.scale_up_queue_depth, "scale_up_queue_depth", 4, 1..=1_000_000)?,
        scale_up_window: duration(&a.scale_up_window, &field("scale_up_window"), Duration::from_secs(5))?,
        scale_down_window: duration(&a.scale_down_window, &field("scale_down_window"), Duration::from_secs(120))?,
        cooldown: duration(&a.cooldown, &field("cooldown"), Duration::from_secs(30))?,
        provision_timeout: duration(&a.provision_timeout, &field("provision_timeout"), Duration::from_secs(600))?,
        replace_unhealthy_after: duration(
            &a.replace_unhealthy_after,
            &field("replace_unhealthy_after"),
            Duration::from_secs(60),
        )?,
        signal: match &a.signal {
            None => DemandSignal::GatewayQueue,
            Some(s) => DemandSignal::parse(s.get_ref()).ok_or_else(|| {
                let message = format!(
                    "{}: unknown signal {:?}; allowed: {}",
                    field("signal"),
                    s.get_ref(),
                    DemandSignal::ALLOWED
                );
                err(s.span(), message)
            })?,
        },
        provider,
    })
}

/// `[pools.{name}.autoscale.provider]`.
fn provider(
    name: &str,
    p: &Spanned<FileProvider>,
    has_launch: bool,
    text: &str,
    duration: DurationRule<'_>,
) -> Result<ProviderConfig, ConfigError> {
    let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(text, span, msg);
    let field = |f: &str| format!("pools.{name}.autoscale.{f}");
    let pr = p.get_ref();
    let kind = match pr.kind.get_ref().as_str() {
        "local" if !has_launch => {
            return Err(err(
                pr.kind.span(),
                format!(
                    "{}: \"local\" starts the [pools.{name}.launch] command, and this pool has none",
                    field("provider.kind")
                ),
            ))
        }
        "local" => ProviderKind::Local,
        "command" => match &pr.command {
            Some(c) if !c.get_ref().is_empty() && !c.get_ref()[0].is_empty() => {
                ProviderKind::Command { command: c.get_ref().clone() }
            }
            Some(c) => return Err(err(c.span(), format!("{}: needs at least the program", field("provider.command")))),
            None => {
                return Err(err(
                    p.span(),
                    format!("{}: kind = \"command\" needs command = [\"program\", ...]", field("provider")),
                ))
            }
        },
        "webhook" => {
            let Some(u) = &pr.url else {
                return Err(err(
                    p.span(),
                    format!("{}: kind = \"webhook\" needs url = \"http://...\"", field("provider")),
                ));
            };
            let url: http::Uri = u
                .get_ref()
                .parse()
                .map_err(|e| err(u.span(), format!("{}: invalid URL: {e}", field("provider.url"))))?;
            if !matches!(url.scheme_str(), Some("http" | "https")) || url.authority().is_none() {
                return Err(err(
                    u.span(),
                    format!("{}: must be an http:// or https:// URL with a host", field("provider.url")),
                ));
            }
            ProviderKind::Webhook { url, token_env: pr.token_env.as_ref().map(|t| t.get_ref().clone()) }
        }
        other => {
            return Err(err(
                pr.kind.span(),
                format!("{}: unknown value {other:?}; allowed: {}", field("provider.kind"), ProviderKind::ALLOWED),
            ))
        }
    };
    Ok(ProviderConfig {
        kind,
        timeout: duration(&pr.timeout, &field("provider.timeout"), Duration::from_secs(30))?,
        retry_backoff: duration(&pr.retry_backoff, &field("provider.retry_backoff"), Duration::from_secs(1))?,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ProviderKind};
    use std::path::Path;
    use std::time::Duration;

    const LAUNCH: &str = "[pools.p]\n[pools.p.launch]\ncommand = [\"srv\", \"{addr}\"]\n";

    fn parse(text: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(text, Path::new("."))
    }

    #[test]
    fn defaults_and_local_provider() {
        let c = parse(&format!("{LAUNCH}[pools.p.autoscale]\n")).unwrap();
        let a = c.pools[0].autoscale.clone().unwrap();
        assert_eq!((a.min_backends, a.max_backends, a.scale_up_queue_depth), (1, 8, 4));
        assert_eq!(a.target_inflight_per_backend, 64, "the pool's capacity per backend");
        assert_eq!(a.scale_up_window, Duration::from_secs(5));
        assert_eq!(a.scale_down_window, Duration::from_secs(120));
        assert_eq!(a.provider.kind, ProviderKind::Local);
        assert_eq!(a.provider.timeout, Duration::from_secs(30));
    }

    #[test]
    fn providers_are_checked() {
        let cmd = "[pools.p]\n[pools.p.autoscale]\nmin_backends = 0\n[pools.p.autoscale.provider]\nkind = \"command\"\ncommand = [\"./scale.sh\"]\n";
        let c = parse(cmd).unwrap();
        assert!(c.pools[0].backends.is_empty(), "a pool may start empty when it autoscales");
        assert!(
            matches!(&c.pools[0].autoscale.as_ref().unwrap().provider.kind, ProviderKind::Command { command } if command == &["./scale.sh"])
        );
        let e = parse("[pools.p]\n[pools.p.autoscale]\n").unwrap_err();
        assert!(e.message.contains("needs a [pools.p.autoscale.provider]"), "{e}");
        let e = parse("[pools.p]\n[pools.p.autoscale]\n[pools.p.autoscale.provider]\nkind = \"local\"\n").unwrap_err();
        assert!(e.message.contains("has none"), "{e}");
        let e = parse("[pools.p]\n[pools.p.autoscale]\n[pools.p.autoscale.provider]\nkind = \"k8s\"\n").unwrap_err();
        assert!(e.message.contains("command, webhook, local") && e.line == Some(4), "{e:?}");
        let hook =
            "[pools.p]\n[pools.p.autoscale]\n[pools.p.autoscale.provider]\nkind = \"webhook\"\nurl = \"ftp://x\"\n";
        assert!(parse(hook).unwrap_err().message.contains("http:// or https:// URL"));
        let hook = hook.replace("ftp://x", "http://127.0.0.1:9/scale");
        assert!(parse(&hook).is_ok());
    }

    #[test]
    fn bounds_are_checked() {
        let e = parse(&format!("{LAUNCH}[pools.p.autoscale]\nmin_backends = 5\nmax_backends = 2\n")).unwrap_err();
        assert!(e.message.contains("above max_backends") && e.line == Some(5), "{e:?}");
        let e = parse(&format!("{LAUNCH}[pools.p.autoscale]\nmax_backends = 0\n")).unwrap_err();
        assert!(e.message.contains("allowed 1..=1024"), "{e}");
        let e = parse(&format!("{LAUNCH}[pools.p.autoscale]\ncooldown = \"0s\"\n")).unwrap_err();
        assert!(e.message.contains("greater than zero"), "{e}");
        let e = parse(&format!("{LAUNCH}[pools.p.autoscale]\nscale_up_window = \"soon\"\n")).unwrap_err();
        assert!(e.message.contains("scale_up_window"), "{e}");
    }

    #[test]
    fn the_engine_signals_need_the_engines_to_be_read() {
        let c = parse(&format!("{LAUNCH}[pools.p.autoscale]\n")).unwrap();
        assert_eq!(c.pools[0].autoscale.as_ref().unwrap().signal, crate::config::DemandSignal::GatewayQueue);
        let engine = "[pools.p.engine]\ninterval = \"1s\"\n";
        let c = parse(&format!("{LAUNCH}{engine}[pools.p.autoscale]\nsignal = \"engine_queue\"\n")).unwrap();
        assert_eq!(c.pools[0].autoscale.as_ref().unwrap().signal, crate::config::DemandSignal::EngineQueue);
        let e = parse(&format!("{LAUNCH}[pools.p.autoscale]\nsignal = \"both\"\n")).unwrap_err();
        assert!(
            e.message.starts_with("pools.p.autoscale.signal: both reads the engines' queues; add [pools.p.engine]"),
            "{e}"
        );
        assert!(e.line.is_some(), "{e}");
        let e = parse(&format!("{LAUNCH}{engine}[pools.p.autoscale]\nsignal = \"gpu\"\n")).unwrap_err();
        assert!(e.message.contains("unknown signal \"gpu\"; allowed: gateway_queue, engine_queue, both"), "{e}");
    }
}
