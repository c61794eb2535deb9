//! The proxy listeners a reload may add or drop: new addresses are bound before anything
//! changes (so a failed bind rejects the reload whole), then served; dropped ones stop
//! accepting and their connections finish as on shutdown.

use super::signals::until_either;
use crate::gateway::Gateway;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

/// Serves one proxy listener until the future given resolves: the server's accept loop, handed
/// in by whoever builds the reloader (the control layer does not reach up into the server).
pub type Serve = fn(
    tokio::net::TcpListener,
    Arc<Gateway>,
    std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The proxy listeners by configured address, each with the switch that closes it everywhere.
pub struct ProxyListeners {
    open: Vec<(SocketAddr, watch::Sender<bool>)>,
    serve: Serve,
}

impl ProxyListeners {
    /// The listeners being served, by configured address with their close switches, and how to
    /// serve one a reload adds.
    pub fn new(open: Vec<(SocketAddr, watch::Sender<bool>)>, serve: Serve) -> Self {
        ProxyListeners { open, serve }
    }

    /// Binds the addresses `wanted` adds; nothing is started or closed yet.
    pub(super) fn bind_new(&self, wanted: &[SocketAddr]) -> Result<Vec<(SocketAddr, std::net::TcpListener)>, String> {
        let mut bound = Vec::new();
        for addr in wanted {
            if self.open.iter().any(|(a, _)| a == addr) {
                continue;
            }
            let l = std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            l.set_nonblocking(true).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            bound.push((*addr, l));
        }
        Ok(bound)
    }

    /// Starts serving the new listeners (on this runtime) and closes those `wanted` drops: they
    /// stop accepting, and their connections finish as on shutdown.
    pub(super) fn apply(
        &mut self,
        wanted: &[SocketAddr],
        bound: Vec<(SocketAddr, std::net::TcpListener)>,
        gateway: &Arc<Gateway>,
        stop: &watch::Receiver<bool>,
    ) {
        self.open.retain(|(addr, close)| {
            let keep = wanted.contains(addr);
            if !keep {
                tracing::info!(%addr, "listener removed; no new connections, open ones finish");
                let _ = close.send(true);
            }
            keep
        });
        for (addr, l) in bound {
            let l = match tokio::net::TcpListener::from_std(l) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(%addr, error = %e, "cannot use a new listener");
                    continue;
                }
            };
            let (close, closed) = watch::channel(false);
            let until = until_either(stop.clone(), closed);
            tracing::info!(%addr, "proxy listening (added by reload)");
            tokio::spawn((self.serve)(l, gateway.clone(), Box::pin(until)));
            self.open.push((addr, close));
        }
    }
}
