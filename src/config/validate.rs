//! Turns the file-shaped structs into the runtime [`Config`], applying defaults and rejecting
//! anything that would misbehave at run time. Each error names the field, the allowed values, and
//! the line:column of the offending value.

use super::addr::parse_addr;
use super::file::FileConfig;
use super::forms::{Listen, SizeText};
use super::units::{parse_duration, parse_size};
use super::*;
use std::collections::HashSet;
use toml::Spanned;

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

/// Validates a parsed file; `text` is the source (for line:column), `base_dir` resolves paths.
pub fn validate(raw: FileConfig, text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
    let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(text, span, msg);
    let duration = |v: &Option<Spanned<String>>, field: &str, default: Duration| match v {
        None => Ok(default),
        Some(s) => match parse_duration(s.get_ref()) {
            Ok(d) if d.is_zero() => Err(err(s.span(), format!("{field}: must be greater than zero"))),
            Ok(d) => Ok(d),
            Err(e) => Err(err(s.span(), format!("{field}: {e}"))),
        },
    };
    let size = |v: &Option<Spanned<SizeText>>, field: &str, default: u64| match v {
        None => Ok(default),
        Some(s) => match match s.get_ref() {
            SizeText::Text(t) => parse_size(t),
            SizeText::Bytes(n) => Ok(*n),
        } {
            Ok(0) => Err(err(s.span(), format!("{field}: must be greater than zero"))),
            Ok(n) => Ok(n),
            Err(e) => Err(err(s.span(), format!("{field}: {e}"))),
        },
    };

    // [server]
    let s = &raw.server;
    let listen = server_listen(s, text)?;
    let max_header_bytes = size(&s.max_header_bytes, "server.max_header_bytes", 64 << 10)?;
    if let Some(v) = &s.max_header_bytes {
        if !(1024..=(16 << 20)).contains(&max_header_bytes) {
            return Err(err(v.span(), "server.max_header_bytes: allowed range is 1KiB..=16MiB".into()));
        }
    }
    let workers = match &s.workers {
        Some(w) if !(1..=1024).contains(w.get_ref()) => {
            return Err(err(w.span(), "server.workers: allowed range is 1..=1024".into()))
        }
        w => w.as_ref().map(|w| *w.get_ref()),
    };
    let server = ServerConfig {
        listen,
        request_header_timeout: duration(
            &s.request_header_timeout,
            "server.request_header_timeout",
            Duration::from_secs(10),
        )?,
        idle_timeout: duration(&s.idle_timeout, "server.idle_timeout", Duration::from_secs(60))?,
        send_timeout: duration(&s.send_timeout, "server.send_timeout", Duration::from_secs(30))?,
        max_inflight_per_connection: match &s.max_inflight_per_connection {
            None => 64,
            Some(v) if (1..=1000).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                return Err(err(v.span(), "server.max_inflight_per_connection: allowed range is 1..=1000".into()))
            }
        },
        max_header_bytes: max_header_bytes as usize,
        max_request_body: size(&s.max_request_body, "server.max_request_body", 32 << 20)?,
        route_body_limit: match (size(&s.route_body_limit, "server.route_body_limit", 1 << 20)?, &s.route_body_limit) {
            (n, Some(v)) if n > 64 << 20 => {
                return Err(err(v.span(), "server.route_body_limit: allowed range is 1..=64MiB".into()))
            }
            (n, _) => n as usize,
        },
        shutdown_timeout: duration(&s.shutdown_timeout, "server.shutdown_timeout", Duration::from_secs(30))?,
        workers,
        state_dir: state_dir(s, text, base_dir)?,
        access_log: s.access_log.unwrap_or(true),
        tls: match &s.tls {
            None => None,
            Some(t) => Some(super::tls::validate_server(t, text, base_dir, &duration)?),
        },
    };

    let admin = admin(&raw, &server, text, base_dir, duration)?;
    let mut own = server.listen.clone();
    own.push(admin.listen);
    let policy = super::addr::AddrPolicy { own, allow_link_local: admin.allow_link_local_backends };

    let pools = pools(&raw, text, &policy, base_dir, duration)?;
    let routes = super::routes::routes(&raw, &pools, text)?;

    let cluster = raw
        .cluster
        .as_ref()
        .map(|c| super::cluster::cluster(c, text, base_dir, &server.listen, &duration))
        .transpose()?;

    Ok(Config { server, admin, routes, pools, cluster, base_dir: base_dir.to_path_buf() })
}

/// `server.state_dir`, from the config file's directory.
fn state_dir(s: &super::file::FileServer, text: &str, base_dir: &Path) -> Result<Option<PathBuf>, ConfigError> {
    match &s.state_dir {
        None => Ok(None),
        Some(d) if d.get_ref().trim().is_empty() => {
            Err(ConfigError::at(text, d.span(), "server.state_dir: must not be empty (omit it to keep no state)"))
        }
        Some(d) => Ok(Some(base_dir.join(d.get_ref()))),
    }
}

/// `server.listen`: one address or a list, none twice.
fn server_listen(s: &super::file::FileServer, text: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(text, span, msg);
    Ok(match s.listen.as_ref().map(|l| (l.span(), l.get_ref())) {
        None => vec![parse_addr(DEFAULT_LISTEN).map_err(ConfigError::nowhere)?],
        Some((span, Listen::One(a))) => vec![parse_addr(a).map_err(|e| err(span, format!("server.listen: {e}")))?],
        Some((span, Listen::Many(items))) if items.is_empty() => {
            return Err(err(span, "server.listen: needs at least one address".into()))
        }
        Some((_, Listen::Many(items))) => {
            let mut out = Vec::new();
            for a in items {
                let addr = parse_addr(a.get_ref()).map_err(|e| err(a.span(), format!("server.listen: {e}")))?;
                if out.contains(&addr) {
                    return Err(err(a.span(), format!("server.listen: {addr} is listed twice")));
                }
                out.push(addr);
            }
            out
        }
    })
}

/// `[admin]`, checked against the proxy listeners.
fn admin(
    raw: &FileConfig,
    server: &ServerConfig,
    text: &str,
    base_dir: &Path,
    duration: impl Fn(&Option<Spanned<String>>, &str, Duration) -> Result<Duration, ConfigError>,
) -> Result<AdminConfig, ConfigError> {
    let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(text, span, msg);
    let admin = AdminConfig {
        listen: match &raw.admin.listen {
            None => parse_addr(DEFAULT_ADMIN).map_err(ConfigError::nowhere)?,
            Some(a) => parse_addr(a.get_ref()).map_err(|e| err(a.span(), format!("admin.listen: {e}")))?,
        },
        history_interval: duration(&raw.admin.history_interval, "admin.history_interval", Duration::from_secs(5))?,
        token: admin_token(&raw.admin, text, base_dir)?,
        allow_link_local_backends: raw.admin.allow_link_local_backends.unwrap_or(false),
    };
    check_admin_listen(raw, server, &admin, text)?;
    Ok(admin)
}

/// The admin listener is not a proxy listener, and is loopback unless a token guards it.
fn check_admin_listen(
    raw: &FileConfig,
    server: &ServerConfig,
    admin: &AdminConfig,
    text: &str,
) -> Result<(), ConfigError> {
    let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(text, span, msg);
    let s = &raw.server;
    if server.listen.contains(&admin.listen) {
        // Point at the admin address when it is written, else at the listen entry it equals.
        let span = raw.admin.listen.as_ref().map(|a| a.span()).or_else(|| {
            let listen = s.listen.as_ref()?;
            let Listen::Many(list) = listen.get_ref() else { return Some(listen.span()) };
            list.iter().find(|a| parse_addr(a.get_ref()).ok() == Some(admin.listen)).map(|a| a.span())
        });
        return Err(err(
            span.unwrap_or_default(),
            format!("admin.listen: {} is also a server.listen address", admin.listen),
        ));
    }
    if admin.token.is_none() && !admin.listen.ip().is_loopback() {
        let span = raw.admin.listen.as_ref().map(|a| a.span()).unwrap_or_default();
        return Err(err(
            span,
            format!(
                "admin.listen: {} is not a loopback address, so the admin API needs a token: set [admin] token_env or token_file",
                admin.listen
            ),
        ));
    }
    Ok(())
}

/// `[pools.*]`: at least one, each validated, no backend address in two of them.
fn pools(
    raw: &FileConfig,
    text: &str,
    policy: &super::addr::AddrPolicy,
    base_dir: &Path,
    duration: impl Fn(&Option<Spanned<String>>, &str, Duration) -> Result<Duration, ConfigError> + Copy,
) -> Result<Vec<PoolConfig>, ConfigError> {
    let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(text, span, msg);
    let mut pools = Vec::new();
    let mut seen_addrs: HashSet<SocketAddr> = HashSet::new();
    for (name, pool) in &raw.pools {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(err(pool.span(), format!("pools.{name:?}: pool names use letters, digits, '-' and '_'")));
        }
        pools.push(super::pool::validate_pool(name, pool, text, &mut seen_addrs, policy, base_dir, duration)?);
    }
    if pools.is_empty() {
        // Nothing to point at but the start of the file.
        return Err(err(0..0, "pools: at least one pool is needed, e.g. [pools.default]".into()));
    }

    Ok(pools)
}

/// `[admin] token_env` or `token_file`: the token, read now (so `check` sees what start-up sees).
fn admin_token(a: &super::file::FileAdmin, text: &str, base_dir: &Path) -> Result<Option<AdminToken>, ConfigError> {
    let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(text, span, msg);
    let (raw, span, field) = match (&a.token_env, &a.token_file) {
        (None, None) => return Ok(None),
        (Some(_), Some(f)) => {
            return Err(err(f.span(), "admin.token_file: set token_env or token_file, not both".into()));
        }
        (Some(var), None) => match std::env::var(var.get_ref()) {
            Ok(v) => (v, var.span(), "admin.token_env"),
            Err(_) => {
                return Err(err(
                    var.span(),
                    format!("admin.token_env: the environment variable {:?} is not set", var.get_ref()),
                ))
            }
        },
        (None, Some(file)) => match std::fs::read_to_string(base_dir.join(file.get_ref())) {
            Ok(v) => (v, file.span(), "admin.token_file"),
            Err(e) => return Err(err(file.span(), format!("admin.token_file: cannot read {:?}: {e}", file.get_ref()))),
        },
    };
    let token = raw.trim();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err(span, format!("{field}: the token must be at least 16 printable characters, without spaces")));
    }
    Ok(Some(AdminToken::new(token)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("."))
    }

    const MINIMAL: &str = "[pools.default]\n[[pools.default.backends]]\naddr = \"127.0.0.1:9001\"\n";

    #[test]
    fn defaults_apply() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.server.max_header_bytes, 64 << 10);
        assert_eq!(c.server.max_request_body, 32 << 20);
        let p = &c.pools[0];
        assert_eq!(p.balance, BalanceKind::LeastConn);
        assert_eq!(p.max_inflight_per_backend, 64);
        assert_eq!(p.backends[0].weight, 1);
        assert_eq!(p.backends[0].max_inflight, 64);
        assert_eq!(p.queue.max_depth, 1024);
        assert_eq!(c.routes.len(), 1);
    }

    #[test]
    fn errors_point_at_the_value() {
        let text = "[pools.default]\nbalance = \"fastest\"\n[[pools.default.backends]]\naddr = \"127.0.0.1:9001\"\n";
        let e = parse(text).unwrap_err();
        assert_eq!((e.line, e.column), (Some(2), Some(11)));
        assert!(e.message.contains("least_conn, round_robin"), "{e}");
    }

    #[test]
    fn weight_zero_and_duplicates_are_refused() {
        let w0 = "[pools.a]\n[[pools.a.backends]]\naddr = \"127.0.0.1:1\"\nweight = 0\n";
        assert!(parse(w0).unwrap_err().message.contains("allowed 1..=1000"));
        let dup =
            "[pools.a]\n[[pools.a.backends]]\naddr = \"127.0.0.1:1\"\n[[pools.a.backends]]\naddr = \"127.0.0.1:1\"\n";
        let e = parse(dup).unwrap_err();
        assert!(e.message.contains("duplicate backend"), "{e}");
        assert_eq!(e.line, Some(5));
    }

    #[test]
    fn health_section() {
        let t = format!("{MINIMAL}[pools.default.health]\ninterval = \"50ms\"\nexpect_status = \"200-204\"\n");
        let h = parse(&t).unwrap().pools[0].health.clone().unwrap();
        assert_eq!(h.path, "/health");
        assert_eq!(h.interval, Duration::from_millis(50));
        assert_eq!(h.expect_status, (200, 204));
        assert_eq!((h.healthy_threshold, h.unhealthy_threshold, h.gate_new_backends), (2, 3, true));
        assert!(parse(MINIMAL).unwrap().pools[0].health.is_none());
        let bad = format!("{MINIMAL}[pools.default.health]\nexpect_status = \"299-200\"\n");
        assert!(parse(&bad).unwrap_err().message.contains("expect_status"));
        let bad = format!("{MINIMAL}[pools.default.health]\nunhealthy_threshold = 0\n");
        assert!(parse(&bad).unwrap_err().message.contains("1..=100"));
        assert_eq!(h.fast_interval, Duration::from_nanos(12_500_000), "a quarter of the interval by default");
        let bad = format!("{MINIMAL}[pools.default.health]\ninterval = \"1s\"\nfast_interval = \"2s\"\n");
        let e = parse(&bad).unwrap_err();
        assert!(e.message.contains("fast_interval") && e.line.is_some(), "{e:?}");
        assert!(parse(MINIMAL).unwrap().pools[0].honor_retry_after);
        let off = MINIMAL.replace("[pools.default]\n", "[pools.default]\nhonor_retry_after = false\n");
        assert!(!parse(&off).unwrap().pools[0].honor_retry_after);
    }

    #[test]
    fn unknown_pool_and_empty_pool() {
        let t = format!("{MINIMAL}[[routes]]\npool = \"nope\"\n");
        assert!(parse(&t).unwrap_err().message.contains("unknown pool \"nope\""));
        let e = parse("[pools.empty]\n").unwrap_err();
        assert!(e.message.contains("no backends"), "{e}");
    }

    #[test]
    fn the_engine_section_has_defaults_and_names_a_bad_kind_or_interval_where_it_is() {
        let c = parse(&format!("{MINIMAL}[pools.default.engine]\n")).unwrap();
        let e = c.pools[0].engine.as_ref().expect("an engine section");
        assert_eq!(
            (e.metrics_path.as_str(), e.interval, e.kind),
            ("/metrics", Duration::from_secs(1), EngineKind::Auto)
        );
        let c = parse(&format!("{MINIMAL}[pools.default.engine]\nkind = \"sglang\"\nmetrics_path = \"/m\"\n")).unwrap();
        let e = c.pools[0].engine.as_ref().unwrap();
        assert_eq!((e.metrics_path.as_str(), e.kind), ("/m", EngineKind::Sglang));
        assert!(parse(MINIMAL).unwrap().pools[0].engine.is_none());
        let bad = parse(&format!("{MINIMAL}[pools.default.engine]\nkind = \"triton\"\n")).unwrap_err();
        assert!(bad.message.contains("pools.default.engine.kind") && bad.message.contains("vllm, sglang"), "{bad}");
        assert_eq!(bad.line, Some(5), "with its line: {bad}");
        let fast = parse(&format!("{MINIMAL}[pools.default.engine]\ninterval = \"10ms\"\n")).unwrap_err();
        assert!(fast.message.contains("at least 100ms"), "{fast}");
        let path = parse(&format!("{MINIMAL}[pools.default.engine]\nmetrics_path = \"metrics\"\n")).unwrap_err();
        assert!(path.message.contains("starting with '/'"), "{path}");
        let alone =
            "[pools.default]\nbalance = \"least_load\"\n[[pools.default.backends]]\naddr = \"127.0.0.1:9001\"\n";
        let e = parse(alone).unwrap_err();
        assert!(e.message.contains("add [pools.default.engine]") && e.line == Some(2), "{e}");
        assert!(parse(&format!("{alone}[pools.default.engine]\n")).is_ok());
    }
}
