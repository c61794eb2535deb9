//! Client-facing listeners: accept, wrap the socket in [`ClientIo`], serve HTTP/1.1 and h2c
//! (prior knowledge) on it with hyper-util's `auto` builder, and drain on shutdown.

use crate::config::ServerConfig;
use crate::gateway::Gateway;
use crate::proxy::conn::{ClientIo, ConnShared};
use crate::proxy::headers::Client;
use crate::proxy::ProxyService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// hyper's connection settings, derived from `[server]`.
fn builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // Our ClientIo enforces the header and idle timeouts (and answers 408); hyper's own
        // header timer would close silently and also fire on idle keep-alive connections.
        .header_read_timeout(None)
        .keep_alive(true)
        // One flattened write per response instead of writev of head and body: measurably
        // cheaper for the small responses that dominate request rates.
        .writev(false)
        .max_headers(256)
        // A head that does not fit the read buffer gets 431 from hyper; heads that fit but
        // exceed max_header_bytes get 431 from the proxy.
        .max_buf_size((cfg.max_header_bytes + 8 * 1024).max(16 * 1024));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes.min(u32::MAX as usize) as u32)
        .max_concurrent_streams(256)
        // Rapid-reset defences: bound streams reset by the client before we accepted them, and
        // streams we had to reset because of client errors.
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Serves one listener until `shutdown` resolves, then lets open connections finish for up to
/// `server.shutdown_timeout`.
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>, shutdown: impl Future<Output = ()>) {
    let cfg = gateway.snapshot().config.server.clone();
    let builder = builder(&cfg);
    let graceful = GracefulShutdown::new();
    let local = listener.local_addr().ok();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // Timeouts come from the current snapshot, so a reload applies to new connections.
        let server = &gateway.snapshot().config.server;
        let shared = ConnShared::new();
        let io = ClientIo::new(stream, shared.clone(), server.request_header_timeout, server.idle_timeout);
        let service = ProxyService::new(gateway.clone(), Client::new(peer.ip(), "http"), shared);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(listen = ?local, "stopped accepting; draining connections");
    if tokio::time::timeout(cfg.shutdown_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!(listen = ?local, timeout = ?cfg.shutdown_timeout, "connections still open at the end of the drain period");
    }
}
