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
use crate::control::status::{ConfigEvent, ConfigStatus, ReloadRequest, ReloadResult, Trigger};
use crate::control::Control;
use crate::gateway::Snapshot;
use crate::pool::BackendState;
use crate::telemetry;
use signals::{recv_signal, sighup, unix_now, watch_files};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use supervisor::PoolTasks;
use tokio::sync::{mpsc, watch};

/// How long the file must stay quiet after a change before it is read.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// How often removed backends are checked for their last request.
const SWEEP: Duration = Duration::from_millis(100);

/// How long after a publish freed memory is handed back (changes in between share one release).
const RELEASE_AFTER: Duration = Duration::from_millis(500);

mod backends;
mod certs;
mod listeners;
mod signals;
mod supervisor;

pub use listeners::{ProxyListeners, Serve};
pub use signals::{text_hash, until_either, until_set};

/// Called on the reloader's thread after each publish, to hand back to the system the memory a
/// change no longer needs (the parsed file, the previous snapshot). The binary sets it to its
/// allocator's collect; without it, an allocator may keep that memory resident.
static RELEASE_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets the function [`RELEASE_MEMORY`] calls (once per process).
pub fn set_memory_release(release: fn()) {
    let _ = RELEASE_MEMORY.set(release);
}

/// Owns reloading for one gateway.
pub struct Reloader {
    control: Arc<Control>,
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
    /// When to hand freed memory back to the system (set by a publish).
    release_at: Option<tokio::time::Instant>,
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
        control: Arc<Control>,
        path: Option<PathBuf>,
        text: &str,
        extra: HashMap<String, Vec<BackendConfig>>,
        persisted: std::collections::HashSet<(String, SocketAddr)>,
        listeners: ProxyListeners,
    ) -> Self {
        let running_hash = text_hash(text);
        control.set_config_status(ConfigStatus {
            path: path.clone(),
            hash: running_hash.clone(),
            loaded_at: unix_now(),
            tls_loaded_at: control.gateway.tls().map(|_| unix_now()),
            ..Default::default()
        });
        let (file_tx, file_events) = mpsc::unbounded_channel::<()>();
        let watcher = path.as_deref().and_then(|p| watch_files(&[p.to_path_buf()], file_tx));
        let (cert_events_tx, cert_events) = mpsc::unbounded_channel::<()>();
        let cert_watcher =
            control.snapshot().config.server.tls.as_ref().and_then(|t| watch_files(&t.files(), cert_events_tx.clone()));
        Reloader {
            control,
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
            release_at: None,
        }
    }

    /// Runs until `stop` turns true: starts the pool tasks, then serves reload requests from
    /// `requests`, SIGHUP and the file watcher.
    pub async fn run(mut self, mut requests: mpsc::Receiver<ReloadRequest>, stop: watch::Receiver<bool>) {
        self.tasks.ensure(&self.control, &stop);
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
            let release_at = self.release_at;
            let release = async move {
                match release_at {
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
                _ = release => {
                    self.release_at = None;
                    if let Some(release) = RELEASE_MEMORY.get() {
                        release();
                    }
                }
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
            let mut status = self.control.config_status();
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
                self.control.set_config_status(status.clone());
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
        let running = self.control.snapshot();
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
        self.listeners.apply(&wanted, bound, &self.control.gateway, stop);
        self.tasks.ensure(&self.control, stop);
        self.running_hash = hash.clone();
        let mut status = self.control.config_status();
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
        self.control.set_config_status(status.clone());
        telemetry::config_reloaded(true, status.loaded_at);
        tracing::info!(?trigger, hash = %status.hash, took = ?started.elapsed(), "config reloaded");
        Ok(status)
    }

    /// Builds and publishes the snapshot of `config`. Backends gone from it stop taking requests;
    /// those with requests in flight stay listed as `draining` until idle (see `sweep`), and one
    /// added back meanwhile serves again. On a reload of the file (`from_file`), a drained
    /// backend the file still lists is put back in service.
    fn publish(&mut self, config: Config, from_file: bool) {
        let running = self.control.snapshot();
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
        self.control.gateway.publish(next);
        for (queue, free) in wake {
            for _ in 0..free.min(queue.depth()) {
                queue.wake_one();
            }
        }
        // Handed back once the changes settle, not after each: a burst of registrations would
        // otherwise return and fault in the same pages once per change.
        self.release_at.get_or_insert_with(|| tokio::time::Instant::now() + RELEASE_AFTER);
    }

    /// Drops removed backends that have finished their last request.
    fn sweep(&mut self) {
        let running = self.control.snapshot();
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

    /// Records a failed reload; the running config stays.
    fn failed(&self, trigger: Trigger, hash: Option<String>, message: String) -> String {
        tracing::error!(error = %message, "config reload rejected; the running config stays");
        let mut status = self.control.config_status();
        status.last_error = Some(message.clone());
        status.last_error_at = Some(unix_now());
        status.record(ConfigEvent {
            time: unix_now(),
            trigger: trigger.as_str(),
            outcome: "rejected",
            hash,
            error: Some(message.clone()),
        });
        self.control.set_config_status(status);
        telemetry::config_reloaded(false, 0.0);
        message
    }
}
