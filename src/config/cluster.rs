//! `[cluster]`: the etcd endpoints a group of replicas shares, this replica's name in the group,
//! the key prefix, the lease TTL, and how to reach etcd (TLS roots, user and password). Validated
//! like every other section: each error names its key at the value's line and column. Without the
//! section headroom runs alone, exactly as before.

use super::file::FileCluster;
use super::sections::DurationOf;
use super::ConfigError;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A validated `[cluster]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// etcd client endpoints, in the order they are tried.
    pub etcd: Vec<EtcdEndpoint>,
    /// This replica's name in the group (its membership key).
    pub name: String,
    /// The key prefix every key of this group lives under (no trailing `/`).
    pub prefix: String,
    /// The TTL of this replica's lease: membership, its demand and its leadership end this long
    /// after it stops renewing.
    pub lease_ttl: Duration,
    /// etcd user and password (the password read from `password_env`).
    pub auth: Option<(String, String)>,
    /// CA certificates for `https://` endpoints (default: the system's web roots).
    pub ca_file: Option<PathBuf>,
}

/// One etcd endpoint: `http://host:port` or `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdEndpoint {
    pub tls: bool,
    /// `host:port` as written (a name or an address).
    pub authority: String,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for EtcdEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", if self.tls { "https" } else { "http" }, self.authority)
    }
}

/// Parses `http://host:port` or `https://host:port` (no path, no user info).
pub fn parse_endpoint(s: &str) -> Result<EtcdEndpoint, String> {
    let (tls, rest) = match s.split_once("://") {
        Some(("http", r)) => (false, r),
        Some(("https", r)) => (true, r),
        _ => return Err(format!("{s:?}: expected http://host:port or https://host:port")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '@', '?', '#', ' ']) {
        return Err(format!("{s:?}: expected http://host:port or https://host:port (no path or user)"));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, p),
        _ => return Err(format!("{s:?}: the port is missing (etcd's client port is usually 2379)")),
    };
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 => p,
        _ => return Err(format!("{s:?}: the port must be 1..=65535")),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    Ok(EtcdEndpoint { tls, authority: rest.to_string(), host, port })
}

/// The default replica name: the host's name and the first proxy port.
pub fn default_name(listen: &[SocketAddr]) -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer passed.
    let got = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let host = match got {
        0 if end > 0 => String::from_utf8_lossy(&buf[..end]).into_owned(),
        _ => "headroom".to_string(),
    };
    let port = listen.first().map_or(0, SocketAddr::port);
    sanitize(&format!("{host}-{port}"))
}

/// A name keeps letters, digits, `.`, `_` and `-` (it is part of an etcd key and of a URL).
fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' }).collect()
}

fn name_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Validates `[cluster]`; `listen` gives the default name.
pub(super) fn cluster(
    c: &FileCluster,
    text: &str,
    base_dir: &Path,
    listen: &[SocketAddr],
    duration: DurationOf,
) -> Result<ClusterConfig, ConfigError> {
    let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(text, span, msg);
    if c.etcd.get_ref().is_empty() {
        return Err(err(c.etcd.span(), "cluster.etcd: needs at least one endpoint".into()));
    }
    let mut etcd = Vec::new();
    for e in c.etcd.get_ref() {
        let ep = parse_endpoint(e.get_ref()).map_err(|m| err(e.span(), format!("cluster.etcd: {m}")))?;
        if etcd.contains(&ep) {
            return Err(err(e.span(), format!("cluster.etcd: {ep} is listed twice")));
        }
        etcd.push(ep);
    }
    let name = match &c.name {
        None => default_name(listen),
        Some(n) if name_ok(n.get_ref()) => n.get_ref().clone(),
        Some(n) => {
            return Err(err(n.span(), "cluster.name: 1 to 128 letters, digits, '.', '_' or '-'".into()));
        }
    };
    let prefix = match &c.prefix {
        None => "/headroom/default".to_string(),
        Some(p) => {
            let v = p.get_ref().trim_end_matches('/');
            if !v.starts_with('/')
                || v.len() < 2
                || v.len() > 256
                || v.contains("//")
                || v.chars().any(char::is_control)
            {
                return Err(err(
                    p.span(),
                    "cluster.prefix: a key path such as \"/headroom/prod\" (starts with '/', at most 256 bytes)".into(),
                ));
            }
            v.to_string()
        }
    };
    let lease_ttl = duration(&c.lease_ttl, "cluster.lease_ttl", Duration::from_secs(5))?;
    if let Some(v) = &c.lease_ttl {
        if !(Duration::from_secs(2)..=Duration::from_secs(300)).contains(&lease_ttl) || lease_ttl.subsec_nanos() != 0 {
            return Err(err(v.span(), "cluster.lease_ttl: whole seconds, allowed range is 2s..=300s".into()));
        }
    }
    let auth = match (&c.username, &c.password_env) {
        (None, None) => None,
        (Some(u), None) => return Err(err(u.span(), "cluster.username: set password_env too".into())),
        (None, Some(p)) => return Err(err(p.span(), "cluster.password_env: set username too".into())),
        (Some(u), Some(p)) => match std::env::var(p.get_ref()) {
            Ok(pw) if !u.get_ref().is_empty() => Some((u.get_ref().clone(), pw)),
            Ok(_) => return Err(err(u.span(), "cluster.username: must not be empty".into())),
            Err(_) => {
                return Err(err(
                    p.span(),
                    format!("cluster.password_env: the environment variable {:?} is not set", p.get_ref()),
                ))
            }
        },
    };
    let ca_file = match &c.ca_file {
        None => None,
        Some(f) => {
            let path = base_dir.join(f.get_ref());
            crate::tls::load_roots(&path).map_err(|e| err(f.span(), format!("cluster.ca_file: {e}")))?;
            Some(path)
        }
    };
    Ok(ClusterConfig { etcd, name, prefix, lease_ttl, auth, ca_file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_a_scheme_a_host_and_a_port() {
        let e = parse_endpoint("http://127.0.0.1:2379").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port), (false, "127.0.0.1", 2379));
        let e = parse_endpoint("https://etcd-0.etcd:2379/").unwrap();
        assert_eq!((e.tls, e.authority.as_str()), (true, "etcd-0.etcd:2379"));
        let e = parse_endpoint("http://[::1]:2379").unwrap();
        assert_eq!(e.host, "::1");
        for bad in [
            "127.0.0.1:2379",
            "http://127.0.0.1",
            "http://h:0",
            "http://h:99999",
            "http://u@h:1",
            "http://h:1/v3",
            "ftp://h:1",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_default_name_is_the_host_and_the_port() {
        let n = default_name(&["127.0.0.1:8080".parse().unwrap()]);
        assert!(n.ends_with("-8080") && name_ok(&n), "{n}");
    }
}
