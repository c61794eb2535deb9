//! Client-facing listeners: accept, run the TLS handshake when `[server.tls]` is set (ALPN picks
//! h2 or HTTP/1.1), else tell HTTP/1.1 from h2c (prior knowledge) by the first bytes read.
//! HTTP/1.x goes to the own codec (`http1::server`); h2 connections are wrapped in [`ClientIo`] and
//! served by hyper. On shutdown both kinds drain: idle connections close, busy ones finish their
//! request.

use crate::config::ServerConfig;
use crate::downstream::h2_io::{ClientIo, ClientStream};
use crate::downstream::ConnShared;
use crate::gateway::Gateway;
use crate::http1::server as own_h1;
use crate::proxy::headers::Client;
use crate::proxy::ProxyService;
use crate::tls::server::Handshake;
use bytes::{Bytes, BytesMut};
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// hyper's h2 connection settings, derived from `[server]`.
fn h2_builder(cfg: &ServerConfig) -> http2::Builder<TokioExecutor> {
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes.min(u32::MAX as usize) as u32)
        // One client connection holds at most this many backend slots at once.
        .max_concurrent_streams(cfg.max_inflight_per_connection)
        // Rapid-reset defences: bound streams reset by the client before we accepted them, and
        // streams we had to reset because of client errors.
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    h2
}

/// How a plain-TCP client opens: h2 by prior knowledge (`PRI `), else HTTP/1.x.
#[derive(Debug, PartialEq, Eq)]
enum Opening {
    H2(bytes::Bytes),
    H1(bytes::BytesMut),
}

/// Reads the first bytes of a plain-TCP connection until they tell h2 prior knowledge from
/// HTTP/1.x, and returns them for the codec that matches. Event-driven: it waits for the socket
/// to be readable and reads, so a client that sends one byte and stops costs nothing until it
/// sends more (or the caller's header timeout closes it). `None`: the client closed first.
async fn read_opening(stream: &TcpStream) -> std::io::Result<Option<Opening>> {
    const PREFACE: &[u8; 4] = b"PRI ";
    let mut seen = bytes::BytesMut::new();
    loop {
        stream.readable().await?;
        let mut chunk = [0u8; 4096];
        match stream.try_read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => seen.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        let n = seen.len().min(PREFACE.len());
        if seen[..n] != PREFACE[..n] {
            return Ok(Some(Opening::H1(seen)));
        }
        if n == PREFACE.len() {
            return Ok(Some(Opening::H2(seen.freeze())));
        }
    }
}

/// Accepts the next connection. Errors (out of file descriptors and the like) back off from
/// 10 ms to 100 ms instead of spinning, and are logged at most once a second, with how many
/// there were.
pub(crate) async fn accept(listener: &TcpListener) -> (TcpStream, std::net::SocketAddr) {
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok(a) => return a,
            Err(e) => {
                accept_failed(&e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
        }
    }
}

/// Counts an accept error; logs one line a second at most, for every listener together.
fn accept_failed(e: &std::io::Error) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_LOG_MS: AtomicU64 = AtomicU64::new(0);
    static UNLOGGED: AtomicU64 = AtomicU64::new(0);
    crate::telemetry::accept_error();
    UNLOGGED.fetch_add(1, Ordering::Relaxed);
    let now = crate::clock::now_ms().max(1);
    let last = LAST_LOG_MS.load(Ordering::Relaxed);
    let due = last == 0 || now.saturating_sub(last) >= 1000;
    if due && LAST_LOG_MS.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        let count = UNLOGGED.swap(0, Ordering::Relaxed).max(1);
        tracing::warn!(error = %e, count, "accept failed (count: errors since the last such line)");
    }
}

/// One accepted client connection and what serving it needs.
struct Conn {
    gateway: Arc<Gateway>,
    h2: Arc<http2::Builder<TokioExecutor>>,
    peer: std::net::SocketAddr,
    limits: own_h1::Limits,
}

impl Conn {
    /// Serves h2 (prior knowledge, or chosen by ALPN) with hyper until the client or the drain
    /// closes it. Callers box it, so that every connection's task is only as large as the common
    /// case, HTTP/1.1, needs (the task lives as long as the connection).
    async fn serve_h2<S: ClientStream>(self, stream: S, prefix: Bytes, scheme: &'static str, watcher: Watcher) {
        let peer = self.peer;
        let shared = ConnShared::new_h2();
        let (header_timeout, idle_timeout) = (self.limits.header_timeout, self.limits.idle_timeout);
        let io = ClientIo::new(stream, shared.clone(), header_timeout, idle_timeout)
            .with_send_timeout(self.limits.send_timeout)
            .with_prefix(prefix);
        let io = TokioIo::new(io);
        let service = ProxyService::new(self.gateway, Client::new(self.peer.ip(), scheme), shared);
        let result = watcher.watch(self.h2.serve_connection(io, service)).await;
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
    }

    /// Serves HTTP/1.x with the own codec.
    async fn serve_h1(
        self,
        io: (own_h1::ReadIo, own_h1::WriteIo),
        initial: BytesMut,
        scheme: &'static str,
        drain: own_h1::Drain,
    ) {
        let shared = ConnShared::new();
        let service = ProxyService::new(self.gateway, Client::new(self.peer.ip(), scheme), shared.clone());
        own_h1::serve(io, initial, service, shared, self.limits, drain).await;
    }
}

/// Serves one listener until `shutdown` resolves, then lets open connections finish for up to
/// `server.shutdown_timeout`.
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>, shutdown: impl Future<Output = ()>) {
    let cfg = gateway.snapshot().config.server.clone();
    let h2 = Arc::new(h2_builder(&cfg));
    let graceful = GracefulShutdown::new();
    let (drain_trigger, drain) = own_h1::drain();
    let local = listener.local_addr().ok();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = accept(&listener) => accepted,
        };
        let _ = stream.set_nodelay(true);
        // Timeouts come from the current snapshot, so a reload applies to new connections.
        let server = &gateway.snapshot().config.server;
        let limits = own_h1::Limits {
            header_timeout: server.request_header_timeout,
            idle_timeout: server.idle_timeout,
            send_timeout: server.send_timeout,
            max_head: (server.max_header_bytes + 8 * 1024).max(16 * 1024),
        };
        let header_timeout = limits.header_timeout;
        let gateway = gateway.clone();
        let h2 = h2.clone();
        let watcher = graceful.watcher();
        let drain = drain.clone();
        let tls = gateway.tls();
        tokio::spawn(async move {
            let conn = Conn { gateway, h2, peer, limits };
            let Some(tls) = tls else {
                // A client that sends nothing (or only part of the preface) in time is closed quietly.
                match tokio::time::timeout(header_timeout, read_opening(&stream)).await {
                    Ok(Ok(Some(Opening::H2(prefix)))) => {
                        return Box::pin(conn.serve_h2(stream, prefix, "http", watcher)).await
                    }
                    Ok(Ok(Some(Opening::H1(initial)))) => {
                        drop(watcher);
                        return conn.serve_h1(own_h1::split_tcp(stream), initial, "http", drain).await;
                    }
                    _ => return,
                }
            };
            match Box::pin(tls.accept(stream)).await {
                Handshake::Done(stream) => {
                    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                        Box::pin(conn.serve_h2(*stream, Bytes::new(), "https", watcher)).await
                    } else {
                        drop(watcher);
                        Box::pin(conn.serve_h1(own_h1::split_tls(*stream), BytesMut::new(), "https", drain)).await
                    }
                }
                Handshake::Failed(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Handshake::TimedOut => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
    drop(listener);
    drop(drain);
    tracing::debug!(listen = %DisplayAddr(local), "stopped accepting; draining connections");
    let both = futures_util::future::join(graceful.shutdown(), drain_trigger.drain());
    if tokio::time::timeout(cfg.shutdown_timeout, both).await.is_err() {
        gateway.drain_cut.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(listen = %DisplayAddr(local), timeout = ?cfg.shutdown_timeout, "connections still open at the end of the drain period");
    }
}

/// An optional address as a log field: the address, or `-`.
struct DisplayAddr(Option<std::net::SocketAddr>);

impl std::fmt::Display for DisplayAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("-"),
        }
    }
}
