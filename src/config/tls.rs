//! `[server.tls]` (listener certificates) and the pools' upstream TLS keys: the runtime types and
//! their validation. Certificates and keys are read and checked here (chain parses, key parses,
//! key matches the certificate), so `headroom check` and a reload refuse a bad pair exactly as
//! start-up does.

use super::file::{FilePool, FileTls};
use super::{ConfigError, Protocol};
use crate::tls;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// `[server.tls]`: TLS on every `listen` address.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Served when the client sends no SNI name, or one no entry of `sni` lists.
    pub default: CertPair,
    /// Certificates chosen by SNI name.
    pub sni: Vec<SniCert>,
    /// A client that hasn't finished its handshake by then is closed. Default 10s.
    pub handshake_timeout: Duration,
}

/// A certificate chain and its key, as files and as loaded.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub loaded: Arc<rustls::sign::CertifiedKey>,
}

#[derive(Debug, Clone)]
pub struct SniCert {
    /// Lower-case DNS names (`*.example.com` matches one label).
    pub server_names: Vec<String>,
    pub pair: CertPair,
}

impl TlsConfig {
    /// Every certificate/key file, for the watcher.
    pub fn files(&self) -> Vec<PathBuf> {
        std::iter::once(&self.default)
            .chain(self.sni.iter().map(|s| &s.pair))
            .flat_map(|p| [p.cert.clone(), p.key.clone()])
            .collect()
    }

    /// Reads every pair again from its files (a certificate renewal).
    pub fn reload_files(&self) -> Result<TlsConfig, String> {
        let load = |p: &CertPair| {
            tls::load_pair(&p.cert, &p.key).map(|loaded| CertPair { loaded, ..p.clone() }).map_err(|e| e.to_string())
        };
        Ok(TlsConfig {
            default: load(&self.default)?,
            sni: self
                .sni
                .iter()
                .map(|s| Ok(SniCert { server_names: s.server_names.clone(), pair: load(&s.pair)? }))
                .collect::<Result<_, String>>()?,
            handshake_timeout: self.handshake_timeout,
        })
    }
}

/// A pool's TLS toward its backends (`tls = true`).
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// Roots from `tls_ca` (else the Mozilla roots), ALPN by the pool's protocol.
    pub client: Arc<rustls::ClientConfig>,
    /// The same, offering only `http/1.1` (health checks speak HTTP/1.1).
    pub client_h1: Arc<rustls::ClientConfig>,
    /// `tls_server_name`: the name checked in the backend's certificate (and sent as SNI);
    /// default: the backend's IP address.
    pub server_name: Option<rustls::pki_types::ServerName<'static>>,
}

type DurationRule<'a> = &'a dyn Fn(&Option<Spanned<String>>, &str, Duration) -> Result<Duration, ConfigError>;

pub(super) fn validate_server(
    raw: &Spanned<FileTls>,
    text: &str,
    base_dir: &Path,
    duration: DurationRule<'_>,
) -> Result<TlsConfig, ConfigError> {
    let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(text, span, msg);
    let t = raw.get_ref();
    let pair = |cert: &Spanned<String>, key: &Spanned<String>, field: &str| {
        let (c, k) = (base_dir.join(cert.get_ref()), base_dir.join(key.get_ref()));
        tls::load_pair(&c, &k)
            .map(|loaded| CertPair { cert: c, key: k, loaded })
            .map_err(|e| err(cert.span(), format!("{field}: {e}")))
    };
    let mut sni = Vec::new();
    for entry in &t.certs {
        let names: Vec<String> = entry.server_names.get_ref().iter().map(|n| n.trim().to_ascii_lowercase()).collect();
        if names.is_empty() || names.iter().any(|n| n.is_empty()) {
            return Err(err(
                entry.server_names.span(),
                "server.tls.certs.server_names: needs at least one name, none empty".into(),
            ));
        }
        sni.push(SniCert { server_names: names, pair: pair(&entry.cert, &entry.key, "server.tls.certs")? });
    }
    let default = match (&t.cert, &t.key) {
        (Some(c), Some(k)) => pair(c, k, "server.tls")?,
        (Some(c), None) => return Err(err(c.span(), "server.tls: cert needs a key".into())),
        (None, Some(k)) => return Err(err(k.span(), "server.tls: key needs a cert".into())),
        (None, None) => match sni.first() {
            Some(first) => first.pair.clone(),
            None => {
                return Err(err(
                    raw.span(),
                    "server.tls: needs cert and key, or at least one [[server.tls.certs]]".into(),
                ))
            }
        },
    };
    Ok(TlsConfig {
        default,
        sni,
        handshake_timeout: duration(&t.handshake_timeout, "server.tls.handshake_timeout", Duration::from_secs(10))?,
    })
}

pub(super) fn validate_upstream(
    name: &str,
    p: &FilePool,
    protocol: Protocol,
    text: &str,
    base_dir: &Path,
) -> Result<Option<UpstreamTls>, ConfigError> {
    let err = |span: std::ops::Range<usize>, msg: String| ConfigError::at(text, span, msg);
    if !p.tls.unwrap_or(false) {
        if let Some(ca) = &p.tls_ca {
            return Err(err(ca.span(), format!("pools.{name}.tls_ca: set tls = true to use it")));
        }
        if let Some(sn) = &p.tls_server_name {
            return Err(err(sn.span(), format!("pools.{name}.tls_server_name: set tls = true to use it")));
        }
        return Ok(None);
    }
    let roots = match &p.tls_ca {
        Some(ca) => tls::load_roots(&base_dir.join(ca.get_ref()))
            .map_err(|e| err(ca.span(), format!("pools.{name}.tls_ca: {e}")))?,
        None => tls::default_roots(),
    };
    let server_name = match &p.tls_server_name {
        None => None,
        Some(sn) => Some(
            rustls::pki_types::ServerName::try_from(sn.get_ref().clone())
                .map_err(|e| err(sn.span(), format!("pools.{name}.tls_server_name: {e}")))?,
        ),
    };
    let alpn: &[&[u8]] = match protocol {
        Protocol::Http1 => &[b"http/1.1"],
        Protocol::H2c => &[b"h2"],
        Protocol::Auto => &[b"h2", b"http/1.1"],
    };
    let make = |alpn: &[&[u8]]| {
        tls::client_config(roots.clone(), alpn)
            .map_err(|e| err(p.tls_ca.as_ref().map(|c| c.span()).unwrap_or_default(), format!("pools.{name}: {e}")))
    };
    Ok(Some(UpstreamTls { client: make(alpn)?, client_h1: make(&[b"http/1.1"])?, server_name }))
}
