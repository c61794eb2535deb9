//! headroom: an elastic L7 gateway for AI model-serving backends.
//!
//! The crate by concern, module by module:

#![warn(clippy::too_many_lines)]

pub mod admin; //      metrics, JSON API (off the data path)
pub mod clock; //      deadlines that saturate instead of overflowing
pub mod cluster; //    several replicas as one gateway, through etcd: membership, shared registry
pub mod config; //     TOML → validated runtime config
pub mod control; //    the control plane's handle: reloads, runtime backends, launched processes, history
pub mod downstream; // a client connection's shared state; the h2 socket's timeouts
pub mod engine; //     inference engines' own load, read from their /metrics
pub mod error; //      the one error → status mapping
pub mod etcd; //       a client of etcd's v3 API (through its JSON gateway)
pub mod gateway; //    the shared snapshot
pub mod health; //     active health checks (off the data path)
pub mod http1; //      the HTTP/1.1 codec: framing, client half, server half
pub mod load; //       `headroom load`: an open-loop, SSE-aware load generator
pub mod mock; //       the mock inference server
pub mod openai; //     the OpenAI API's shapes: a body's model, the model list, the not-found error
pub mod pool; //       backends, pools, pickers, the admission queue, traffic counters
pub mod prompt; //     a prompt's chained block hashes: the key of prefix-cache-aware routing
pub mod proxy; //      the data path
pub mod reload; //     hot reload: file watch, SIGHUP, validated swap
pub mod scale; //      autoscaler, providers, local launcher
pub mod scrape; //     reading the engines' metrics into the backends' gauges
pub mod server; //     client listeners, graceful drain
pub mod telemetry; //  metric names and recording (the Prometheus recorder); rendered by admin
pub mod tls; //        rustls: listener certificates by SNI, upstream TLS, dev certificates
pub mod upstream; //   connections to backends: pools of idle HTTP/1.1 connections, h2, connect

use config::Config;
use gateway::{Gateway, Snapshot};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Already-bound listeners (tests bind `127.0.0.1:0` and pass them in).
pub struct Listeners {
    pub proxy: Vec<TcpListener>,
    pub admin: TcpListener,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Launch(#[from] scale::launch::LaunchError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cluster: {0}")]
    Cluster(#[from] etcd::EtcdError),
    /// Requests were still running at `shutdown_timeout` and were cut off.
    #[error("requests were still running at the end of shutdown_timeout ({0:?}) and were cut off")]
    DrainCut(std::time::Duration),
}

/// Binds every address in the config.
pub async fn bind(config: &Config) -> Result<Listeners, RunError> {
    let mut proxy = Vec::new();
    for &addr in &config.server.listen {
        proxy.push(TcpListener::bind(addr).await.map_err(|source| RunError::Bind { addr, source })?);
    }
    let addr = config.admin.listen;
    let admin = TcpListener::bind(addr).await.map_err(|source| RunError::Bind { addr, source })?;
    Ok(Listeners { proxy, admin })
}

/// Runs the gateway on `listeners` until `shutdown` resolves, then drains and returns. Everything
/// runs on the calling runtime.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    run_with_workers(config, listeners, shutdown, 1).await
}

/// Like [`run`], with `workers - 1` more threads (see [`run_with`]).
pub async fn run_with_workers(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    workers: usize,
) -> Result<(), RunError> {
    run_with(config, listeners, shutdown, RunOptions { workers, config_path: None }).await
}

/// How to run beyond the config itself.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Accepting threads, each with its own single-threaded runtime (at least 1).
    pub workers: usize,
    /// The file the config came from: watched, and read again on SIGHUP or `POST /api/reload`.
    pub config_path: Option<std::path::PathBuf>,
}

/// Runs the gateway with `workers - 1` more threads accepting on the same listeners, each with
/// its own single-threaded runtime: a connection and its upstream work stay on one thread, with
/// no work-stealing scheduler between them. Shared state stays lock-free (atomics, `ArcSwap`).
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    options: RunOptions,
) -> Result<(), RunError> {
    let RunOptions { workers, config_path } = options;
    let workers = workers.max(1);
    let prom = telemetry::install();
    telemetry::init_counters();
    upstream::set_worker_count(workers);
    let (mut extra, launched) = scale::launch::launch_all(&config).await?;
    let launched = std::sync::Arc::new(launched);
    // A group keeps its runtime backends in etcd, not in each replica's state file.
    let (persisted, state_error) = match config.cluster {
        None => restore_state(&config, &mut extra),
        Some(_) => (std::collections::HashSet::new(), None),
    };
    let cluster_config = config.cluster.clone();
    let extra_by_pool: std::collections::HashMap<String, Vec<config::BackendConfig>> =
        config.pools.iter().map(|p| p.name.clone()).zip(extra.iter().cloned()).collect();
    // Each proxy listener, by the address the config names it with, can be closed on its own
    // (a reload that drops it) in every worker.
    let configured: Vec<std::net::SocketAddr> = listeners
        .proxy
        .iter()
        .enumerate()
        .filter_map(|(i, l)| config.server.listen.get(i).copied().or_else(|| l.local_addr().ok()))
        .collect();
    let closers: Vec<(std::net::SocketAddr, watch::Sender<bool>)> =
        configured.iter().map(|a| (*a, watch::channel(false).0)).collect();
    let server_tls = config.server.tls.as_ref().map(tls::server::ServerTls::new).transpose()?;
    let gateway = Gateway::new(Snapshot::build(config, &extra, None));
    let control = control::Control::new(gateway.clone(), launched.clone());
    if let Some(t) = server_tls {
        gateway.set_tls(t);
    }
    let bound = listeners.proxy.iter().chain([&listeners.admin]).filter_map(|l| l.local_addr().ok()).collect();
    control.set_bound(bound);

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for l in &listeners.proxy {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, workers, "proxy listening");
        }
    }
    let mut threads = spawn_workers(workers, &listeners.proxy, &gateway, &stop_rx, &closers);
    for (l, (_, close)) in listeners.proxy.into_iter().zip(&closers) {
        tasks.spawn(server::serve(l, gateway.clone(), reload::until_either(stop_rx.clone(), close.subscribe())));
    }
    // The reloader owns the pools' background tasks (health checks, ejection clock, ramps).
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(8);
    control.set_reloader(reload_tx);
    let text = config_path.as_deref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
    let proxy_listeners = reload::ProxyListeners::new(closers, |l, g, until| Box::pin(server::serve(l, g, until)));
    let reloader =
        reload::Reloader::new(control.clone(), config_path, &text, extra_by_pool, persisted, proxy_listeners);
    if state_error.is_some() {
        control.set_config_status(control::status::ConfigStatus { state_error, ..control.config_status() });
    }
    tasks.spawn(reloader.run(reload_rx, stop_rx.clone()));
    if let Some(cfg) = cluster_config {
        let admin = listeners.admin.local_addr().unwrap_or(control.snapshot().config.admin.listen);
        let group = cluster::Cluster::new(cfg, control.clone(), admin, &configured)?;
        control.set_group(group.clone());
        tasks.spawn(group.run(reload::until_set(stop_rx.clone())));
    }
    if let Ok(addr) = listeners.admin.local_addr() {
        tracing::info!(%addr, "admin listening");
    }
    // The admin API and the history sampler run on a thread of their own: rendering a large
    // pool's /metrics or /api/pools never delays requests on the data-path workers.
    match spawn_admin(listeners.admin, control.clone(), prom, stop_rx.clone()) {
        Ok(done) => threads.push(done),
        Err(e) => tracing::error!(error = %e, "cannot start the admin thread; the admin API is off"),
    }

    shutdown.await;
    tracing::info!(timeout = ?gateway.snapshot().config.server.shutdown_timeout, "shutting down: stopped accepting, draining connections");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    for done in threads {
        let _ = done.await;
    }
    launched.shutdown().await;
    if gateway.drain_cut.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!("connections were still open at the end of the drain period and were cut off");
        return Err(RunError::DrainCut(gateway.snapshot().config.server.shutdown_timeout));
    }
    Ok(())
}

/// Starts workers `1..workers`, each a thread with its own single-threaded runtime accepting on
/// clones of the proxy listeners until `stop` (or a listener's own close switch); returns a
/// receiver per thread that resolves when it has finished.
fn spawn_workers(
    workers: usize,
    proxy: &[TcpListener],
    gateway: &Arc<Gateway>,
    stop_rx: &watch::Receiver<bool>,
    closers: &[(std::net::SocketAddr, watch::Sender<bool>)],
) -> Vec<tokio::sync::oneshot::Receiver<()>> {
    let mut threads = Vec::new();
    for worker in 1..workers.max(1) {
        let shared: std::io::Result<Vec<_>> = proxy.iter().map(clone_listener).collect();
        let shared = match shared {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot share the listeners with a worker");
                break;
            }
        };
        let (gateway, stop_rx) = (gateway.clone(), stop_rx.clone());
        let close_rxs: Vec<watch::Receiver<bool>> = closers.iter().map(|(_, c)| c.subscribe()).collect();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new().name(format!("headroom-worker-{worker}")).spawn(move || {
            upstream::set_current_worker(worker);
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(async move {
                    let mut serving = tokio::task::JoinSet::new();
                    for (std_listener, close) in shared.into_iter().zip(close_rxs) {
                        match TcpListener::from_std(std_listener) {
                            Ok(l) => {
                                let until = reload::until_either(stop_rx.clone(), close);
                                serving.spawn(server::serve(l, gateway.clone(), until));
                            }
                            Err(e) => tracing::error!(error = %e, "worker cannot use a listener"),
                        }
                    }
                    while serving.join_next().await.is_some() {}
                }),
                Err(e) => tracing::error!(error = %e, "cannot start a worker runtime"),
            }
            let _ = done_tx.send(());
        });
        match spawned {
            Ok(_) => threads.push(done_rx),
            Err(e) => tracing::error!(error = %e, "cannot start a worker thread"),
        }
    }
    threads
}

/// Adds the backends saved in the state file (if `server.state_dir` is set) to `extra`, by pool
/// index. Returns which were restored, and why the file was ignored if it was.
fn restore_state(
    config: &Config,
    extra: &mut [Vec<config::BackendConfig>],
) -> (std::collections::HashSet<(String, std::net::SocketAddr)>, Option<String>) {
    let mut restored = std::collections::HashSet::new();
    let Some(dir) = &config.server.state_dir else { return (restored, None) };
    let saved = match scale::state::load(dir) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "state file ignored");
            return (restored, Some(e.to_string()));
        }
    };
    for (pool, backends) in saved {
        let Some(i) = config.pools.iter().position(|p| p.name == pool) else {
            tracing::warn!(%pool, "state file names a pool the config no longer has; its backends are dropped");
            continue;
        };
        for b in backends {
            let taken = config.pools[i].backends.iter().chain(extra[i].iter()).any(|x| x.addr == b.addr);
            if !taken {
                tracing::info!(%pool, backend = %b.addr, "backend restored from the state file");
                restored.insert((pool.clone(), b.addr));
                extra[i].push(b);
            }
        }
    }
    (restored, None)
}

/// Runs the admin listener and the history sampler on their own thread and runtime, until
/// `stop` is set; the receiver resolves when the thread has finished.
fn spawn_admin(
    listener: TcpListener,
    control: std::sync::Arc<control::Control>,
    prom: Option<metrics_exporter_prometheus::PrometheusHandle>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let listener = listener.into_std()?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new().name("headroom-admin".into()).spawn(move || {
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "the admin thread cannot use its listener"),
                };
                let interval = control.snapshot().config.admin.history_interval;
                let history = control::history::run(control.clone(), interval, reload::until_set(stop.clone()));
                let serve = admin::serve(listener, control, prom, reload::until_set(stop));
                futures_util::future::join(serve, history).await;
            }),
            Err(e) => tracing::error!(error = %e, "cannot start the admin runtime"),
        }
        let _ = done_tx.send(());
    })?;
    Ok(done_rx)
}

/// A second handle on the same listening socket, for another worker's runtime.
fn clone_listener(l: &TcpListener) -> std::io::Result<std::net::TcpListener> {
    let fd = socket2::SockRef::from(l).try_clone()?;
    let std_listener: std::net::TcpListener = fd.into();
    std_listener.set_nonblocking(true)?;
    Ok(std_listener)
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled: worker threads may serve (and a supervisor may signal) before the main
/// task gets to await it, and a signal arriving before its handler would kill the process without
/// a drain. Call it inside the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = int.recv() => {},
                    }
                }
                (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                    one.recv().await;
                }
                (Err(e), Err(_)) => {
                    tracing::warn!(error = %e, "cannot install signal handlers: SIGTERM and SIGINT will stop the process without a drain");
                    std::future::pending::<()>().await
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
