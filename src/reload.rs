//! Hot reload: the config file is watched (and SIGHUP and `POST /api/reload` ask too); a new
//! file is parsed and validated, a new snapshot is built reusing every kept backend's `Arc`
//! (in-flight counts, health, ejection and slow-start clocks), and published in one swap.
//!
//! A file that fails to parse or validate changes nothing: the running config stays, and the
//! error is logged, counted and shown by `GET /api/config`. Writes are debounced, so an editor's
//! truncate-then-write or write-then-rename is applied once, when it has settled. Backends
//! removed from the file stop taking requests at once; they stay listed as `draining` until
//! their in-flight requests finish, then leave.
//!
//! Runs as one task off the data path; it owns the per-pool background tasks (health checks,
//! ejection clock, slow-start ramp) and starts or stops them as pools and sections come and go.

use crate::config::{BackendConfig, Config};
use crate::gateway::{Gateway, Snapshot};
use crate::health;
use crate::pool::BackendState;
use crate::telemetry;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// How long the file must stay quiet after a change before it is read.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// How often removed backends are checked for their last request.
const SWEEP: Duration = Duration::from_millis(100);

/// What `GET /api/config` shows.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConfigStatus {
    /// The config file, when there is one.
    pub path: Option<PathBuf>,
    /// Hash of the running config's text (16 hex digits).
    pub hash: String,
    /// When the running config was loaded, Unix seconds.
    pub loaded_at: f64,
    /// Reloads applied since start.
    pub reloads: u64,
    /// The last failed reload, if any since the last good one.
    pub last_error: Option<String>,
    /// When it failed, Unix seconds.
    pub last_error_at: Option<f64>,
    /// Why the state file was ignored at start-up, if it was.
    pub state_error: Option<String>,
    /// The last failed reload of the TLS certificate files, if any since the last good one
    /// (the certificates in use stay).
    pub tls_error: Option<String>,
    /// When the certificates were last loaded, Unix seconds.
    pub tls_loaded_at: Option<f64>,
    /// The last [`CONFIG_EVENTS_KEPT`] loads of the file, oldest first
    /// (`GET /api/config/events`).
    #[serde(skip)]
    pub events: std::collections::VecDeque<ConfigEvent>,
}

/// Config loads kept for `GET /api/config/events`.
pub const CONFIG_EVENTS_KEPT: usize = 50;

/// One load of the config file and how it ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConfigEvent {
    /// Unix seconds.
    pub time: f64,
    /// `file`, `signal` or `api`.
    pub trigger: &'static str,
    /// `applied`; `rejected` (the running config stays); `restored` (the file is back to the
    /// running text, which clears `last_error`).
    pub outcome: &'static str,
    /// Hash of the file's text (none when it could not be read).
    pub hash: Option<String>,
    pub error: Option<String>,
}

impl ConfigStatus {
    fn record(&mut self, event: ConfigEvent) {
        if self.events.len() == CONFIG_EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }
}

/// The outcome of one reload request.
pub type ReloadResult = Result<ConfigStatus, String>;

/// Why a reload was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    File,
    Signal,
    Api,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::File => "file",
            Trigger::Signal => "signal",
            Trigger::Api => "api",
        }
    }
}

/// A request to the reloader, answered when done.
pub enum ReloadRequest {
    /// Read the config file again and apply it.
    Reload { trigger: Trigger, reply: Option<oneshot::Sender<ReloadResult>> },
    /// Add or remove a backend at runtime (the registration API); kept across reloads.
    Backend { pool: String, change: BackendChange, reply: oneshot::Sender<Result<(), ChangeError>> },
}

/// A runtime change to a pool's backends.
#[derive(Debug, Clone)]
pub enum BackendChange {
    /// `persist`: kept in the state file (when `server.state_dir` is set) across restarts.
    Add { backend: BackendConfig, persist: bool },
    /// Several at once, published together (a provider's reply); those that cannot be added
    /// (address rules, already present) are logged and skipped.
    AddMany { backends: Vec<BackendConfig>, persist: bool },
    /// Drains, then removes once idle.
    Remove(SocketAddr),
    /// Puts a drained backend back in service (not one that is being removed).
    Undrain(SocketAddr),
}

/// Why a backend change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The change itself is not acceptable (an address no backend may have).
    #[error("{0}")]
    Invalid(String),
    /// The change could not be made for a reason of headroom's own (the state file).
    #[error("{0}")]
    Internal(String),
}

/// Resolves once `rx` reads true (or its sender is gone).
pub async fn until_set(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Resolves once either switch is set: a listener stops on shutdown or when a reload drops it.
pub async fn until_either(a: watch::Receiver<bool>, b: watch::Receiver<bool>) {
    tokio::select! {
        _ = until_set(a) => {}
        _ = until_set(b) => {}
    }
}

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
    fn bind_new(&self, wanted: &[SocketAddr]) -> Result<Vec<(SocketAddr, std::net::TcpListener)>, String> {
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
    fn apply(
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

/// Called on the reloader's thread after each publish, to hand back to the system the memory a
/// change no longer needs (the parsed file, the previous snapshot). The binary sets it to its
/// allocator's collect; without it, an allocator may keep that memory resident.
static RELEASE_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets the function [`RELEASE_MEMORY`] calls (once per process).
pub fn set_memory_release(release: fn()) {
    let _ = RELEASE_MEMORY.set(release);
}

/// A short stable hash of config text.
pub fn text_hash(text: &str) -> String {
    let mut h = std::hash::DefaultHasher::new();
    text.hash(&mut h);
    format!("{:016x}", h.finish())
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The background tasks of each pool, started when a pool has the section that needs them.
#[derive(Default)]
struct PoolTasks {
    running: HashMap<(String, &'static str), JoinHandle<()>>,
}

impl PoolTasks {
    /// Starts the tasks the current snapshot needs and that are not running. A task ends by
    /// itself when its pool or section is gone.
    fn ensure(&mut self, gateway: &Arc<Gateway>, stop: &watch::Receiver<bool>) {
        self.running.retain(|_, t| !t.is_finished());
        for pool in gateway.snapshot().pools.iter() {
            let name = pool.config.name.clone();
            let wanted = [
                ("health", pool.config.health.is_some()),
                ("readmit", pool.config.outlier.is_some()),
                ("ramp", pool.config.slow_start.is_some()),
                ("autoscale", pool.config.autoscale.is_some()),
            ];
            for (kind, on) in wanted {
                if !on || self.running.contains_key(&(name.clone(), kind)) {
                    continue;
                }
                let (g, n, s) = (gateway.clone(), name.clone(), until_set(stop.clone()));
                let task = match kind {
                    "health" => tokio::spawn(health::run_pool(g, n, s)),
                    "readmit" => tokio::spawn(health::readmit_pool(g, n, s)),
                    "autoscale" => tokio::spawn(crate::scale::autoscale::run_pool(g, n, s)),
                    _ => tokio::spawn(health::ramp_pool(g, n, s)),
                };
                self.running.insert((name.clone(), kind), task);
            }
        }
    }

    async fn join(self) {
        for (_, t) in self.running {
            let _ = t.await;
        }
    }
}

/// Owns reloading for one gateway.
pub struct Reloader {
    gateway: Arc<Gateway>,
    path: Option<PathBuf>,
    /// Backends added outside the file (launched, by a provider, through the API), per pool:
    /// kept across reloads.
    extra: HashMap<String, Vec<BackendConfig>>,
    /// Those of `extra` kept in the state file: (pool, addr).
    persisted: std::collections::HashSet<(String, SocketAddr)>,
    running_hash: String,
    tasks: PoolTasks,
    /// Set up at construction, so no write after `new` returns is missed.
    watcher: Option<notify::RecommendedWatcher>,
    listeners: ProxyListeners,
    /// Backends removed from the config but still finishing requests: (pool, addr).
    removed: Vec<(String, std::net::SocketAddr)>,
    file_events: mpsc::UnboundedReceiver<()>,
    /// Watches the TLS certificate and key files.
    cert_watcher: Option<notify::RecommendedWatcher>,
    cert_events_tx: mpsc::UnboundedSender<()>,
    cert_events: mpsc::UnboundedReceiver<()>,
}

impl Reloader {
    /// `text` is the running config's source (for its hash), `extra` the backends added outside
    /// the file (launched, or restored from the state file: those `persisted` names).
    pub fn new(
        gateway: Arc<Gateway>,
        path: Option<PathBuf>,
        text: &str,
        extra: HashMap<String, Vec<BackendConfig>>,
        persisted: std::collections::HashSet<(String, SocketAddr)>,
        listeners: ProxyListeners,
    ) -> Self {
        let running_hash = text_hash(text);
        gateway.set_config_status(ConfigStatus {
            path: path.clone(),
            hash: running_hash.clone(),
            loaded_at: unix_now(),
            tls_loaded_at: gateway.tls().map(|_| unix_now()),
            ..Default::default()
        });
        let (file_tx, file_events) = mpsc::unbounded_channel::<()>();
        let watcher = path.as_deref().and_then(|p| watch_files(&[p.to_path_buf()], file_tx));
        let (cert_events_tx, cert_events) = mpsc::unbounded_channel::<()>();
        let cert_watcher =
            gateway.snapshot().config.server.tls.as_ref().and_then(|t| watch_files(&t.files(), cert_events_tx.clone()));
        Reloader {
            gateway,
            path,
            extra,
            persisted,
            running_hash,
            tasks: PoolTasks::default(),
            watcher,
            file_events,
            cert_watcher,
            cert_events_tx,
            cert_events,
            listeners,
            removed: Vec::new(),
        }
    }

    /// Runs until `stop` turns true: starts the pool tasks, then serves reload requests from
    /// `requests`, SIGHUP and the file watcher.
    pub async fn run(mut self, mut requests: mpsc::Receiver<ReloadRequest>, stop: watch::Receiver<bool>) {
        self.tasks.ensure(&self.gateway, &stop);
        let mut hup = sighup();
        let mut stop_rx = stop.clone();
        let mut settle_at: Option<tokio::time::Instant> = None;
        let mut certs_settle_at: Option<tokio::time::Instant> = None;
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let settle = async {
                match settle_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let certs_settle = async {
                match certs_settle_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop_rx.wait_for(|s| *s) => break,
                Some(()) = self.cert_events.recv() => certs_settle_at = Some(tokio::time::Instant::now() + DEBOUNCE),
                _ = certs_settle => {
                    certs_settle_at = None;
                    self.reload_certs();
                }
                _ = sweep.tick(), if !self.removed.is_empty() => self.sweep(),
                Some(()) = self.file_events.recv() => settle_at = Some(tokio::time::Instant::now() + DEBOUNCE),
                _ = settle => {
                    settle_at = None;
                    let _ = self.reload(Trigger::File, &stop);
                }
                Some(()) = recv_signal(&mut hup) => {
                    let _ = self.reload(Trigger::Signal, &stop);
                }
                Some(req) = requests.recv() => match req {
                    ReloadRequest::Reload { trigger, reply } => {
                        let out = self.reload(trigger, &stop);
                        if let Some(reply) = reply {
                            let _ = reply.send(out);
                        }
                    }
                    ReloadRequest::Backend { pool, change, reply } => {
                        let _ = reply.send(self.change_backend(&pool, change, &stop));
                    }
                },
            }
        }
        drop(self.watcher.take());
        drop(self.cert_watcher.take());
        self.tasks.join().await;
    }

    /// Reads the file and applies it. A file change that leaves the text as it runs is ignored.
    fn reload(&mut self, trigger: Trigger, stop: &watch::Receiver<bool>) -> ReloadResult {
        let Some(path) = self.path.clone() else {
            return Err("headroom was started without a config file; nothing to reload".into());
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                return Err(self.failed(trigger, None, format!("{}: cannot read config file: {e}", path.display())))
            }
        };
        let hash = text_hash(&text);
        if trigger == Trigger::File && hash == self.running_hash {
            // Back to the text that runs: an earlier failure no longer describes the file.
            let mut status = self.gateway.config_status();
            if status.last_error.is_some() {
                status.last_error = None;
                status.last_error_at = None;
                status.record(ConfigEvent {
                    time: unix_now(),
                    trigger: trigger.as_str(),
                    outcome: "restored",
                    hash: Some(hash),
                    error: None,
                });
                self.gateway.set_config_status(status.clone());
                tracing::info!("config file is back to the running text; last error cleared");
            }
            return Ok(status);
        }
        let base = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let config = match Config::parse(&text, &base) {
            Ok(c) => c,
            Err(e) => return Err(self.failed(trigger, Some(hash), e.in_file(&path).to_string())),
        };
        let started = std::time::Instant::now();
        let running = self.gateway.snapshot();
        if config.admin.listen != running.config.admin.listen {
            tracing::warn!("the admin listen address changed in the config file; it takes effect on restart");
        }
        let wanted = config.server.listen.clone();
        let bound = match self.listeners.bind_new(&wanted) {
            Ok(b) => b,
            Err(e) => return Err(self.failed(trigger, Some(hash), format!("{}: {e}", path.display()))),
        };
        let tls = config.server.tls.clone();
        self.publish(config, true);
        self.apply_tls(tls.as_ref(), None);
        self.listeners.apply(&wanted, bound, &self.gateway, stop);
        self.tasks.ensure(&self.gateway, stop);
        self.running_hash = hash.clone();
        let mut status = self.gateway.config_status();
        status.path = Some(path);
        status.hash = hash;
        status.loaded_at = unix_now();
        status.reloads += 1;
        status.last_error = None;
        status.last_error_at = None;
        status.record(ConfigEvent {
            time: status.loaded_at,
            trigger: trigger.as_str(),
            outcome: "applied",
            hash: Some(status.hash.clone()),
            error: None,
        });
        self.gateway.set_config_status(status.clone());
        telemetry::config_reloaded(true, status.loaded_at);
        tracing::info!(?trigger, hash = %status.hash, took = ?started.elapsed(), "config reloaded");
        Ok(status)
    }

    /// Builds and publishes the snapshot of `config`. Backends gone from it stop taking requests;
    /// those with requests in flight stay listed as `draining` until idle (see `sweep`), and one
    /// added back meanwhile serves again. On a reload of the file (`from_file`), a drained
    /// backend the file still lists is put back in service.
    fn publish(&mut self, config: Config, from_file: bool) {
        let running = self.gateway.snapshot();
        let in_file: HashMap<String, HashSet<SocketAddr>> = match from_file {
            true => {
                config.pools.iter().map(|p| (p.name.clone(), p.backends.iter().map(|b| b.addr).collect())).collect()
            }
            false => HashMap::new(),
        };
        let mut carried = Vec::new();
        let extra: Vec<Vec<BackendConfig>> = config
            .pools
            .iter()
            .map(|p| {
                let mut add = self.extra.get(&p.name).cloned().unwrap_or_default();
                // Sets, not scans: a change to a big pool stays O(n).
                let listed: HashSet<SocketAddr> = p.backends.iter().chain(add.iter()).map(|b| b.addr).collect();
                let gone: Vec<BackendConfig> = running
                    .pool(&p.name)
                    .map(|old| old.backends.iter().filter(|b| !listed.contains(&b.addr) && b.in_flight() > 0))
                    .into_iter()
                    .flatten()
                    .map(|b| {
                        carried.push((p.name.clone(), b.addr));
                        BackendConfig {
                            addr: b.addr,
                            weight: b.weight(),
                            max_inflight: b.max_inflight(),
                            backup: b.is_backup(),
                        }
                    })
                    .collect();
                add.extend(gone);
                add
            })
            .collect();
        let next = Snapshot::build(config, &extra, Some(&running));
        let carried_set: HashSet<(&str, SocketAddr)> = carried.iter().map(|(p, a)| (p.as_str(), *a)).collect();
        for old in &running.pools {
            let kept: HashSet<*const crate::pool::Backend> =
                next.pool(&old.config.name).map(|p| p.backends.iter().map(Arc::as_ptr).collect()).unwrap_or_default();
            for b in &old.backends {
                let carry = carried_set.contains(&(old.config.name.as_str(), b.addr));
                let listed = kept.contains(&Arc::as_ptr(b));
                if !listed || carry {
                    if b.state() != BackendState::Draining {
                        tracing::info!(pool = %old.config.name, backend = %b.addr, in_flight = b.in_flight(), "backend removed; draining");
                    }
                    b.set_state(BackendState::Draining);
                } else if self.removed.iter().any(|(p, a)| *p == old.config.name && *a == b.addr) {
                    tracing::info!(pool = %old.config.name, backend = %b.addr, "removed backend added back");
                    b.set_state(BackendState::Healthy);
                } else if in_file.get(&old.config.name).is_some_and(|f| f.contains(&b.addr))
                    && b.undrain(old.config.health.is_some())
                {
                    tracing::info!(pool = %old.config.name, backend = %b.addr, "drained backend listed by the reloaded file; back in service");
                }
            }
        }
        drop(carried_set);
        self.removed = carried;
        // Requests queued for capacity that this snapshot adds are woken to take it.
        let wake: Vec<_> = next.pools.iter().map(|p| (p.queue.clone(), p.free_slots())).collect();
        self.gateway.publish(next);
        for (queue, free) in wake {
            for _ in 0..free.min(queue.depth()) {
                queue.wake_one();
            }
        }
        if let Some(release) = RELEASE_MEMORY.get() {
            release();
        }
    }

    /// Adds runtime backends to `pool`, or drains and removes one. The change is saved to the
    /// state file (when there is one) before it is published: a change that cannot be saved is
    /// not made.
    fn change_backend(
        &mut self,
        pool: &str,
        change: BackendChange,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), ChangeError> {
        let running = self.gateway.snapshot();
        let Some(pc) = running.config.pools.iter().find(|p| p.name == pool) else {
            return Err(ChangeError::NotFound(format!("no pool {pool:?}")));
        };
        if let BackendChange::Undrain(addr) = change {
            return self.undrain(pool, addr);
        }
        let before = (self.extra.get(pool).cloned().unwrap_or_default(), self.persisted.clone());
        match change {
            BackendChange::Undrain(_) => {}
            BackendChange::Add { backend, persist } => self.add_backend(pc, backend, persist)?,
            BackendChange::AddMany { backends, persist } => {
                for b in backends {
                    let addr = b.addr;
                    if let Err(e) = self.add_backend(pc, b, persist) {
                        tracing::warn!(pool, backend = %addr, error = %e, "backend not added");
                    }
                }
            }
            BackendChange::Remove(addr) => {
                if pc.backends.iter().any(|x| x.addr == addr) {
                    return Err(ChangeError::Conflict(format!(
                        "backend {addr} is defined in the config file; remove it there, or drain it"
                    )));
                }
                let dynamic = self.extra.entry(pool.to_string()).or_default();
                let count = dynamic.len();
                dynamic.retain(|x| x.addr != addr);
                if dynamic.len() == count {
                    return Err(ChangeError::NotFound(format!("pool {pool:?} has no backend {addr}")));
                }
                tracing::info!(pool, backend = %addr, "backend deregistered; draining");
                self.persisted.remove(&(pool.to_string(), addr));
            }
        }
        if let Err(e) = self.save_state(&running.config) {
            (*self.extra.entry(pool.to_string()).or_default(), self.persisted) = before;
            return Err(ChangeError::Internal(format!("cannot write the state file, so nothing was changed: {e}")));
        }
        self.publish((*running.config).clone(), false);
        self.tasks.ensure(&self.gateway, stop);
        Ok(())
    }

    /// `POST .../undrain`: a drained backend takes requests again. One being removed (from the
    /// file, by the API or by the autoscaler) is refused: register it again instead.
    fn undrain(&mut self, pool: &str, addr: SocketAddr) -> Result<(), ChangeError> {
        let running = self.gateway.snapshot();
        let Some(p) = running.pool(pool) else {
            return Err(ChangeError::NotFound(format!("no pool {pool:?}")));
        };
        let Some(b) = p.backends.iter().find(|b| b.addr == addr) else {
            return Err(ChangeError::NotFound(format!("pool {pool:?} has no backend {addr}")));
        };
        if self.removed.iter().any(|(rp, ra)| rp == pool && *ra == addr) {
            return Err(ChangeError::Conflict(format!(
                "backend {addr} is being removed; register it again to keep it"
            )));
        }
        if b.undrain(p.config.health.is_some()) {
            tracing::info!(pool, backend = %addr, state = b.state().as_str(), "backend undrained");
        }
        Ok(())
    }

    /// Adds one runtime backend to the pool's list (not published yet).
    fn add_backend(
        &mut self,
        pc: &crate::config::PoolConfig,
        b: BackendConfig,
        persist: bool,
    ) -> Result<(), ChangeError> {
        let pool = pc.name.as_str();
        if let Err(rule) = self.gateway.addr_policy().check(b.addr) {
            return Err(ChangeError::Invalid(format!("addr {}: {rule}", b.addr)));
        }
        let dynamic = self.extra.entry(pool.to_string()).or_default();
        if pc.backends.iter().chain(dynamic.iter()).any(|x| x.addr == b.addr) {
            let drained = self
                .gateway
                .snapshot()
                .pool(pool)
                .and_then(|p| p.backends.iter().find(|x| x.addr == b.addr).map(|x| x.state()))
                == Some(BackendState::Draining);
            let hint = if drained { " (draining: POST .../undrain puts it back)" } else { "" };
            return Err(ChangeError::Conflict(format!("pool {pool:?} already has backend {}{hint}", b.addr)));
        }
        tracing::info!(pool, backend = %b.addr, weight = b.weight, "backend registered");
        if persist {
            self.persisted.insert((pool.to_string(), b.addr));
        }
        dynamic.push(b);
        Ok(())
    }

    /// Writes the persisted backends to the state file, if the config names a state directory.
    fn save_state(&self, config: &Config) -> Result<(), String> {
        let Some(dir) = &config.server.state_dir else { return Ok(()) };
        let kept: HashMap<String, Vec<BackendConfig>> = self
            .extra
            .iter()
            .map(|(pool, list)| {
                let list = list.iter().filter(|b| self.persisted.contains(&(pool.clone(), b.addr))).cloned().collect();
                (pool.clone(), list)
            })
            .collect();
        crate::scale::state::save(dir, &kept).map_err(|e| {
            tracing::error!(error = %e, "cannot write the state file; dynamic backends won't survive a restart");
            e.to_string()
        })
    }

    /// Drops removed backends that have finished their last request.
    fn sweep(&mut self) {
        let running = self.gateway.snapshot();
        let idle = self.removed.iter().any(|(pool, addr)| {
            running
                .pool(pool)
                .and_then(|p| p.backends.iter().find(|b| b.addr == *addr))
                .is_none_or(|b| b.in_flight() == 0)
        });
        if idle {
            self.publish((*running.config).clone(), false);
        }
    }

    /// Serves `tls`'s certificates to new connections (or records why not: `error`), and watches
    /// its files.
    fn apply_tls(&mut self, tls: Option<&crate::config::TlsConfig>, error: Option<String>) {
        let Some(server) = self.gateway.tls() else {
            if tls.is_some() {
                tracing::warn!("[server.tls] was added to the config; TLS is turned on at start only");
            }
            return;
        };
        let Some(tls) = tls else {
            tracing::warn!("[server.tls] was removed from the config; TLS stays on until restart");
            return;
        };
        let mut status = self.gateway.config_status();
        match error {
            None => {
                server.update(tls);
                status.tls_error = None;
                status.tls_loaded_at = Some(unix_now());
                self.cert_watcher = watch_files(&tls.files(), self.cert_events_tx.clone());
            }
            Some(e) => {
                tracing::error!(error = %e, "TLS certificate reload rejected; the certificates in use stay");
                status.tls_error = Some(e);
            }
        }
        self.gateway.set_config_status(status);
    }

    /// Reads the certificate and key files again after they changed on disk.
    fn reload_certs(&mut self) {
        let running = self.gateway.snapshot();
        let Some(current) = running.config.server.tls.as_ref() else { return };
        match current.reload_files() {
            Ok(fresh) => {
                tracing::info!("TLS certificates reloaded");
                telemetry::tls_cert_reloaded(true);
                self.apply_tls(Some(&fresh), None);
            }
            Err(e) => {
                telemetry::tls_cert_reloaded(false);
                self.apply_tls(Some(current), Some(e));
            }
        }
    }

    /// Records a failed reload; the running config stays.
    fn failed(&self, trigger: Trigger, hash: Option<String>, message: String) -> String {
        tracing::error!(error = %message, "config reload rejected; the running config stays");
        let mut status = self.gateway.config_status();
        status.last_error = Some(message.clone());
        status.last_error_at = Some(unix_now());
        status.record(ConfigEvent {
            time: unix_now(),
            trigger: trigger.as_str(),
            outcome: "rejected",
            hash,
            error: Some(message.clone()),
        });
        self.gateway.set_config_status(status);
        telemetry::config_reloaded(false, 0.0);
        message
    }
}

/// Watches the directories of `paths` (so a file renamed over one is seen) and signals `tx` on
/// any event that names one of the files.
fn watch_files(paths: &[PathBuf], tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let names: Vec<std::ffi::OsString> = paths.iter().filter_map(|p| p.file_name().map(|f| f.to_os_string())).collect();
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .map(|p| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    let handler = move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if ev.kind.is_access() {
                return;
            }
            if ev.paths.iter().any(|p| p.file_name().is_some_and(|f| names.iter().any(|n| n == f))) {
                let _ = tx.send(());
            }
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch files for changes; reload with SIGHUP or POST /api/reload");
            return None;
        }
    };
    for dir in &dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot watch a directory for changes");
            return None;
        }
    }
    Some(watcher)
}

#[cfg(unix)]
type Hup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hup = Option<()>;

fn sighup() -> Hup {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

async fn recv_signal(hup: &mut Hup) -> Option<()> {
    match hup {
        #[cfg(unix)]
        Some(s) => s.recv().await,
        _ => std::future::pending().await,
    }
}
