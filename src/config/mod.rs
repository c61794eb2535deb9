//! Configuration: TOML text → [`file`] structs (serde, `deny_unknown_fields`, spans kept) →
//! [`validate`] → the runtime [`Config`] the rest of headroom reads.
//!
//! Owns the config contract (key names, defaults, allowed values) and the one error type that
//! names the file, line, column and field. Never touches the network or the running state: building
//! a `Config` is pure, so `headroom check` and a reload use exactly the same path.

pub mod addr;
mod autoscale;
mod choices;
pub mod cluster;
mod engine;
mod file;
mod forms;
#[cfg(test)]
mod fuzz;
mod pool;
mod prefix;
mod routes;
mod sections;
mod source;
mod tls;
pub mod units;

pub use engine::{EngineConfig, EngineKind};
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use autoscale::{AutoscaleConfig, DemandSignal, ProviderConfig, ProviderKind};
pub use choices::{BalanceKind, Protocol};
pub use cluster::{ClusterConfig, EtcdEndpoint};
pub use forms::MAX_WEIGHT;
pub use prefix::PrefixConfig;
pub use routes::{ModelMatch, Route};
pub use source::{Source, DEFAULT_PATH, EMBEDDED_DEFAULT};
pub use tls::{CertPair, SniCert, TlsConfig, UpstreamTls};
pub use validate::validate;

/// The validated, runtime form of the config file.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    /// First match wins.
    pub routes: Vec<Route>,
    pub pools: Vec<PoolConfig>,
    /// `[cluster]`: the replicas this one acts with, through etcd; `None`: alone.
    pub cluster: Option<ClusterConfig>,
    /// Directory relative paths in the file are resolved against (the file's directory).
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Default `["127.0.0.1:8080"]`.
    pub listen: Vec<SocketAddr>,
    /// Default 10s; a request head not complete by then gets 408.
    pub request_header_timeout: Duration,
    /// Default 60s; an idle keep-alive client connection is closed after it.
    pub idle_timeout: Duration,
    /// Default 30s; a client that takes no response bytes for this long (HTTP/1.1: the socket
    /// accepts nothing; h2: no stream waiting for flow-control window makes progress) is cut off,
    /// and the backend requests it held are cancelled.
    pub send_timeout: Duration,
    /// Default 64; the most requests one h2 client connection may have in flight (its
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`). HTTP/1.1 connections carry one at a time.
    pub max_inflight_per_connection: u32,
    /// Default 64KiB; a larger request head gets 431.
    pub max_header_bytes: usize,
    /// Default 32MiB; a larger request body gets 413.
    pub max_request_body: u64,
    /// Default 1MiB; how much of a request body is read before routing, when a route names a
    /// `model` (a longer body is routed by the other conditions).
    pub route_body_limit: usize,
    /// Default 30s; how long in-flight requests may run on after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// Worker threads; default: `TOKIO_WORKER_THREADS`, else one per core.
    pub workers: Option<usize>,
    /// Where runtime state (backends added by the autoscaler or the API) is kept across restarts.
    /// Default: none (not kept).
    pub state_dir: Option<PathBuf>,
    /// `[server.tls]`: TLS on every listen address; `None`: plaintext.
    pub tls: Option<TlsConfig>,
    /// One log line per request (target `access`). Default true.
    pub access_log: bool,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Default `127.0.0.1:9901`.
    pub listen: SocketAddr,
    /// How often the status page's history is sampled (15 minutes are kept). Default 5s.
    pub history_interval: Duration,
    /// The bearer token mutating admin requests must carry (`token_env` or `token_file`).
    /// Default: none, which is allowed only on a loopback listener.
    pub token: Option<AdminToken>,
    /// Backends may have link-local addresses (169.254/16, fe80::/10). Default false.
    pub allow_link_local_backends: bool,
}

/// The admin API's bearer token. Never printed: `Debug` shows only that it is set.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(std::sync::Arc<str>);

impl AdminToken {
    pub fn new(token: &str) -> Self {
        AdminToken(token.into())
    }

    /// Whether `given` is the token, in time that depends on the lengths only.
    pub fn matches(&self, given: &[u8]) -> bool {
        let want = self.0.as_bytes();
        if want.len() != given.len() {
            return false;
        }
        want.iter().zip(given).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<set>)")
    }
}

impl Config {
    /// Whether headroom answers `GET /v1/models` itself: some pool lists or discovers its models.
    pub fn lists_models(&self) -> bool {
        self.pools.iter().any(|p| !p.models.is_empty() || p.discover_models)
    }

    /// Whether some route names a model, so request bodies may be read before routing.
    pub fn routes_by_model(&self) -> bool {
        self.routes.iter().any(|r| r.model.is_some())
    }

    /// The rules backend addresses are held to, for the addresses this config listens on.
    pub fn addr_policy(&self) -> addr::AddrPolicy {
        let mut own = self.server.listen.clone();
        own.push(self.admin.listen);
        addr::AddrPolicy { own, allow_link_local: self.admin.allow_link_local_backends }
    }
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub balance: BalanceKind,
    pub protocol: Protocol,
    /// Default 64: capacity of each backend unless it sets `max_inflight`.
    pub max_inflight_per_backend: u32,
    /// Default 2s.
    pub connect_timeout: Duration,
    /// Default 600s: inference can be slow to its first byte.
    pub response_header_timeout: Duration,
    /// Default 300s: the longest silence allowed inside a response body once it has started.
    pub stream_idle_timeout: Duration,
    /// Below this share of healthy backends, route to every non-draining backend (fail open).
    /// Default 0: off.
    pub panic_threshold: f64,
    /// A backend that becomes healthy (again) ramps its weight and capacity from 10% to 100%
    /// over this time. Default: off.
    pub slow_start: Option<Duration>,
    /// A 429 or 503 with `Retry-After` pauses new requests to that backend for that long
    /// (at most 300s). Default true.
    pub honor_retry_after: bool,
    /// The models the pool serves, listed by headroom's `GET /v1/models`. Default none.
    pub models: Vec<String>,
    /// List the models the backends' own `GET /v1/models` report, read with the health checks
    /// (every 10s without `[pools.X.health]`). Default false.
    pub discover_models: bool,
    pub queue: QueueConfig,
    pub backends: Vec<BackendConfig>,
    pub launch: Option<LaunchConfig>,
    /// Active health checks; `None` (no `[pools.X.health]`) means none.
    pub health: Option<HealthConfig>,
    /// Passive ejection; `None` (no `[pools.X.outlier]`) means none.
    pub outlier: Option<OutlierConfig>,
    /// Retries of requests that reached a backend; `None` (no `[pools.X.retry]`) means none.
    /// (Requests that never reached their backend always fail over.)
    pub retry: Option<RetryConfig>,
    /// Reading the engines' own load; `None` without `[pools.X.engine]`.
    pub engine: Option<EngineConfig>,
    /// Prefix-cache-aware routing; `Some` exactly when `balance = "prefix"`.
    pub prefix: Option<PrefixConfig>,
    /// Elastic scaling; `None` (no `[pools.X.autoscale]`) means the pool keeps the backends it has.
    pub autoscale: Option<AutoscaleConfig>,
    /// TLS toward the backends (`tls = true`); `None`: plaintext.
    pub tls: Option<UpstreamTls>,
}

/// `[pools.X.retry]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    /// Extra tries on other backends. Default 2.
    pub attempts: u32,
    /// Retry on a connection reset before the response head.
    pub on_reset: bool,
    /// Retry when an h2 backend refuses the stream (any method: it was not processed).
    pub on_refused_stream: bool,
    /// Retry when the backend answers 503.
    pub on_503: bool,
    /// Retry when the backend answers 429.
    pub on_429: bool,
    /// Retries stay below this share of the pool's requests. Default 20.
    pub budget_percent: u32,
    /// Only idempotent methods are retried. Default true.
    pub idempotent_only: bool,
}

impl RetryConfig {
    /// The failure kinds `retry.on` accepts (all of them by default).
    pub const KINDS: [&'static str; 5] = ["connect-failure", "refused-stream", "reset", "503", "429"];
}

/// `[pools.X.outlier]`: ejection on failures seen in real traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Failures in a row (connect errors, 5xx, timeouts) that eject a backend. Default 5.
    pub consecutive_failures: u32,
    /// Ejection time, multiplied by the number of times ejected. Default 30s.
    pub base_ejection: Duration,
    /// Cap on the ejection time. Default 300s.
    pub max_ejection: Duration,
    /// At most this share of the pool is ejected at once. Default 50.
    pub max_ejected_percent: u32,
}

/// `[pools.X.health]`: active HTTP health checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Default `/health`.
    pub path: String,
    /// Default 2s, with ±10% jitter.
    pub interval: Duration,
    /// Used instead of `interval` while a backend is changing state (a streak toward rise or
    /// fall has begun, or it is new). Default `interval / 4`.
    pub fast_interval: Duration,
    /// Default 1s.
    pub timeout: Duration,
    /// Consecutive passes to become healthy (rise). Default 2.
    pub healthy_threshold: u32,
    /// Consecutive failures to become unhealthy (fall). Default 3.
    pub unhealthy_threshold: u32,
    /// Passing statuses, inclusive. Default 200-299.
    pub expect_status: (u16, u16),
    /// A new backend takes traffic only after its first passing check. Default true.
    pub gate_new_backends: bool,
    /// Checks reuse the backend's connection while it keeps it open (Envoy's
    /// `reuse_connection`); false: a fresh connection per check, so a backend that stops
    /// accepting fails even while it serves its open connections. Default true.
    pub reuse_connection: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// Default 1024; a request arriving at a full queue gets 503 at once.
    pub max_depth: usize,
    /// Default 30s; a request that waited this long gets 503.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub addr: SocketAddr,
    /// 1..=1000, default 1.
    pub weight: u32,
    /// The backend's capacity (in-flight requests).
    pub max_inflight: u32,
    /// Used only when no primary (non-backup) backend of the pool is up. Default false.
    pub backup: bool,
}

/// Backends headroom starts itself as local processes.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// Argument vector; `{addr}` is replaced by the chosen loopback address, and a first element
    /// `headroom` means the running binary itself.
    pub command: Vec<String>,
    /// Default 1 (0 allowed in a pool with `[autoscale]`).
    pub count: u32,
    /// Default 1.
    pub weight: u32,
    pub max_inflight: u32,
    /// Default 10s: how long to wait for a launched backend to accept connections.
    pub ready_timeout: Duration,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            line: None,
            column: None,
            message: format!("cannot read config file: {e}"),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&text, &base).map_err(|e| e.in_file(path))
    }

    /// Parses and validates config text; `base_dir` is where relative paths point.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let located = |e: &toml::de::Error, message: String| {
            let (line, column) =
                e.span().map(|s| line_col(text, s.start)).map_or((None, None), |(l, c)| (Some(l), Some(c)));
            ConfigError { file: None, line, column, message }
        };
        let de = toml::de::Deserializer::parse(text).map_err(|e| located(&e, e.message().trim().to_string()))?;
        let raw: file::FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = dotted_path(e.path());
            let message = forms::type_error(&path, e.inner().message().trim());
            located(e.inner(), message)
        })?;
        validate(raw, text, base_dir)
    }

    /// One line describing the config, as `headroom check` prints it.
    pub fn summary(&self) -> String {
        let backends: usize = self.pools.iter().map(|p| p.backends.len()).sum();
        let launched: u32 = self.pools.iter().filter_map(|p| p.launch.as_ref()).map(|l| l.count).sum();
        let listen: Vec<String> = self.server.listen.iter().map(|a| a.to_string()).collect();
        let scaled: Vec<String> = self
            .pools
            .iter()
            .filter_map(|p| {
                let a = p.autoscale.as_ref()?;
                Some(format!("{} {}..={} ({})", p.name, a.min_backends, a.max_backends, a.provider.kind.as_str()))
            })
            .collect();
        let mut line = format!(
            "listen {}, admin {}, {} route(s), {} pool(s), {} backend(s) + {} launched",
            listen.join(" "),
            self.admin.listen,
            self.routes.len(),
            self.pools.len(),
            backends,
            launched
        );
        if !scaled.is_empty() {
            line.push_str(&format!(", autoscaling {}", scaled.join(", ")));
        }
        if let Some(t) = &self.server.tls {
            line.push_str(&format!(", TLS with {} certificate(s)", 1 + t.sni.len()));
        }
        line
    }
}

/// A config error, located where possible: `file:line:column: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn at(text: &str, span: std::ops::Range<usize>, message: impl Into<String>) -> Self {
        let (line, column) = line_col(text, span.start);
        ConfigError { file: None, line: Some(line), column: Some(column), message: message.into() }
    }

    pub(crate) fn nowhere(message: impl Into<String>) -> Self {
        ConfigError { file: None, line: None, column: None, message: message.into() }
    }

    pub fn in_file(mut self, path: &Path) -> Self {
        self.file = Some(path.to_path_buf());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}:", file.display())?;
        }
        if let Some(line) = self.line {
            write!(f, "{line}:")?;
            if let Some(col) = self.column {
                write!(f, "{col}:")?;
            }
        }
        if self.file.is_some() || self.line.is_some() {
            f.write_str(" ")?;
        }
        // TOML's messages may span lines; the contract is one line.
        let mut first = true;
        for part in self.message.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if !first {
                f.write_str("; ")?;
            }
            f.write_str(part)?;
            first = false;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// `pools.chat.backends[0].weight`: the path serde walked, without the span wrappers' own keys.
fn dotted_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if key.starts_with("$__") {
                    continue;
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let text = "a = 1\nbb = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 9), (2, 4));
    }

    #[test]
    fn display_is_one_line() {
        let e =
            ConfigError { file: Some("x.toml".into()), line: Some(3), column: Some(7), message: "bad\nthing\n".into() };
        assert_eq!(e.to_string(), "x.toml:3:7: bad; thing");
    }
}
