//! The listener side: a certificate resolver that picks by SNI from a set swapped atomically
//! (certificate reloads reach new connections while open ones keep theirs), the acceptor with
//! ALPN `h2`/`http/1.1` and TLS 1.2/1.3 only, and the bounded handshake.

use super::{provider, TlsError};
use crate::config::TlsConfig;
use crate::telemetry;
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The certificates in use: exact names, `*.suffix` wildcards, and the default.
#[derive(Debug)]
struct CertSet {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl CertSet {
    fn new(cfg: &TlsConfig) -> Self {
        let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
        for entry in &cfg.sni {
            for name in &entry.server_names {
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_string()),
                    None => exact.entry(name.clone()),
                }
                .or_insert_with(|| entry.pair.loaded.clone());
            }
        }
        CertSet { exact, wildcard, default: cfg.default.loaded.clone() }
    }

    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni.map(str::to_ascii_lowercase) else { return self.default.clone() };
        if let Some(c) = self.exact.get(&name) {
            return c.clone();
        }
        name.split_once('.').and_then(|(_, suffix)| self.wildcard.get(suffix)).unwrap_or(&self.default).clone()
    }
}

#[derive(Debug)]
struct SniResolver {
    set: ArcSwap<CertSet>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.set.load().pick(hello.server_name()))
    }
}

/// TLS for the proxy listeners.
pub struct ServerTls {
    resolver: Arc<SniResolver>,
    acceptor: TlsAcceptor,
    handshake_timeout_ms: AtomicU64,
}

/// How a handshake ended.
pub enum Handshake {
    Done(Box<TlsStream<TcpStream>>),
    Failed(std::io::Error),
    TimedOut,
}

impl ServerTls {
    pub fn new(cfg: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let resolver = Arc::new(SniResolver { set: ArcSwap::from_pointee(CertSet::new(cfg)) });
        let mut sc = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        sc.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::Config(e.to_string()))?;
        let tls = Arc::new(ServerTls {
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(sc)),
            handshake_timeout_ms: AtomicU64::new(cfg.handshake_timeout.as_millis() as u64),
        });
        record_expiry(cfg);
        telemetry::init_tls_counters();
        Ok(tls)
    }

    /// Serves these certificates to new connections from now on.
    pub fn update(&self, cfg: &TlsConfig) {
        self.resolver.set.store(Arc::new(CertSet::new(cfg)));
        self.handshake_timeout_ms.store(cfg.handshake_timeout.as_millis() as u64, Ordering::Relaxed);
        record_expiry(cfg);
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms.load(Ordering::Relaxed))
    }

    /// Runs the server handshake within the handshake timeout; counts the outcome.
    pub async fn accept(&self, stream: TcpStream) -> Handshake {
        let outcome = match tokio::time::timeout(self.handshake_timeout(), self.acceptor.accept(stream)).await {
            Ok(Ok(s)) => Handshake::Done(Box::new(s)),
            Ok(Err(e)) => Handshake::Failed(e),
            Err(_) => Handshake::TimedOut,
        };
        telemetry::tls_handshake(match &outcome {
            Handshake::Done(_) => "ok",
            Handshake::Failed(_) => "error",
            Handshake::TimedOut => "timeout",
        });
        outcome
    }
}

fn record_expiry(cfg: &TlsConfig) {
    let named = std::iter::once(("default".to_string(), &cfg.default))
        .chain(cfg.sni.iter().map(|s| (s.server_names[0].clone(), &s.pair)));
    for (name, pair) in named {
        if let Some(t) = super::expiry(&pair.loaded) {
            telemetry::tls_cert_expiry(&name, t);
        }
    }
}
