//! The shared runtime state: one [`Snapshot`] of config, routes and pools behind an `ArcSwap`.
//!
//! Everything that must change together (routes, pool settings, backend lists) is published in a
//! single snapshot, so a request sees one consistent view. Per-backend state lives in `Arc`s that
//! a new snapshot reuses by (pool, address), so counters, in-flight counts and queues carry over.

use crate::config::{BackendConfig, Config};
use crate::pool::Pool;
use crate::reload::{BackendChange, ChangeError, ConfigStatus, ReloadRequest, ReloadResult, Trigger};
use crate::scale::events::EventLog;
use crate::scale::launch::Launched;
use crate::telemetry::PoolMetrics;
use crate::tls::server::ServerTls;
use arc_swap::ArcSwap;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::mpsc;

#[derive(Clone)]
pub struct Snapshot {
    pub config: Arc<Config>,
    /// Same order as `config.pools`.
    pub pools: Vec<Arc<Pool>>,
}

impl Snapshot {
    /// Builds a snapshot; `extra[i]` are backends added to pool `i` outside the file (launched
    /// processes). Backends and queues of `previous` are reused where the address matches.
    pub fn build(config: Config, extra: &[Vec<BackendConfig>], previous: Option<&Snapshot>) -> Snapshot {
        let pools = config
            .pools
            .iter()
            .enumerate()
            .map(|(i, pc)| {
                let old = previous.and_then(|p| p.pool(&pc.name));
                let add = extra.get(i).map(Vec::as_slice).unwrap_or(&[]);
                Arc::new(Pool::build(pc.clone(), add, old.map(|p| &**p)))
            })
            .collect();
        Snapshot { config: Arc::new(config), pools }
    }

    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| p.config.name == name)
    }

    /// The pool for a request: first route whose host (if any) and path prefix match.
    #[inline]
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<Pool>> {
        self.config
            .routes
            .iter()
            .find(|r| r.host.as_deref().is_none_or(|h| host == Some(h)) && path.starts_with(r.path_prefix.as_str()))
            .and_then(|r| self.pools.get(r.pool))
    }
}

static GATEWAY_IDS: AtomicU64 = AtomicU64::new(1);

/// Gateways a thread keeps copies for (one in a running headroom; tests start several).
const LOCAL_COPIES: usize = 8;

/// A thread's copy of a gateway's snapshot, current as of `generation`. An idle thread keeps its
/// copy (and the pools in it) until it next asks.
struct LocalCopy {
    gateway: u64,
    generation: u64,
    snapshot: Arc<Snapshot>,
}

thread_local! {
    static LOCAL: RefCell<Vec<LocalCopy>> = const { RefCell::new(Vec::new()) };
}

pub struct Gateway {
    current: ArcSwap<Snapshot>,
    /// Bumped after every publish, so each thread knows when its copy is out of date.
    generation: AtomicU64,
    /// Tells gateways apart in the per-thread copies (tests run several in one process).
    id: u64,
    /// Requests answered before any pool was chosen (bad requests, no route).
    pub unrouted: PoolMetrics,
    /// The running config's origin and the last reload error (`GET /api/config`).
    config_status: ArcSwap<ConfigStatus>,
    /// Where reload requests go (`POST /api/reload`); set once the reloader runs.
    reload: OnceLock<mpsc::Sender<ReloadRequest>>,
    /// Backend processes headroom started (launch sections, the local provider).
    pub launched: Arc<Launched>,
    /// The last scale events per pool.
    pub scale_events: EventLog,
    /// The last 15 minutes of each pool (the status page's charts).
    pub history: crate::admin::history::History,
    /// TLS for the proxy listeners, when `[server.tls]` was set at start.
    tls: OnceLock<Arc<ServerTls>>,
    /// The addresses the listeners were really bound to (tests bind port 0); no backend may
    /// point at them.
    bound: OnceLock<Vec<std::net::SocketAddr>>,
    /// This gateway's `Via` token: a request that carries it has looped back.
    pub via: crate::proxy::headers::Via,
    /// A listener's drain ended at `shutdown_timeout` with connections still open (cut).
    pub drain_cut: std::sync::atomic::AtomicBool,
}

impl Gateway {
    pub fn new(snapshot: Snapshot) -> Arc<Self> {
        Self::with_launched(snapshot, Arc::default())
    }

    /// A gateway that owns the processes in `launched`.
    pub fn with_launched(snapshot: Snapshot, launched: Arc<Launched>) -> Arc<Self> {
        let history = crate::admin::history::History::new(snapshot.config.admin.history_interval);
        Arc::new(Gateway {
            history,
            launched,
            scale_events: EventLog::default(),
            tls: OnceLock::new(),
            bound: OnceLock::new(),
            via: crate::proxy::headers::Via::new(),
            drain_cut: std::sync::atomic::AtomicBool::new(false),
            current: ArcSwap::from_pointee(snapshot),
            generation: AtomicU64::new(0),
            id: GATEWAY_IDS.fetch_add(1, Ordering::Relaxed),
            unrouted: PoolMetrics::new("none"),
            config_status: ArcSwap::from_pointee(ConfigStatus::default()),
            reload: OnceLock::new(),
        })
    }

    /// Turns TLS on for the proxy listeners (once, at start).
    pub fn set_tls(&self, tls: Arc<ServerTls>) {
        let _ = self.tls.set(tls);
    }

    /// Records the addresses the listeners are bound to (once, at start).
    pub fn set_bound(&self, addrs: Vec<std::net::SocketAddr>) {
        let _ = self.bound.set(addrs);
    }

    /// The rules a backend address is held to now: the running config's, and no address a
    /// listener of this gateway is bound to.
    pub fn addr_policy(&self) -> crate::config::addr::AddrPolicy {
        let mut policy = self.snapshot().config.addr_policy();
        policy.own.extend(self.bound.get().into_iter().flatten().copied());
        policy
    }

    pub fn tls(&self) -> Option<Arc<ServerTls>> {
        self.tls.get().cloned()
    }

    pub fn config_status(&self) -> ConfigStatus {
        (**self.config_status.load()).clone()
    }

    pub fn set_config_status(&self, status: ConfigStatus) {
        self.config_status.store(Arc::new(status));
    }

    /// Connects the reloader (once).
    pub fn set_reloader(&self, tx: mpsc::Sender<ReloadRequest>) {
        let _ = self.reload.set(tx);
    }

    /// Asks for a reload and waits for its outcome.
    pub async fn reload(&self, trigger: Trigger) -> ReloadResult {
        let tx = self.reload.get().ok_or("reloading is not running")?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(ReloadRequest::Reload { trigger, reply: Some(reply) }).await.map_err(|_| "reloading has stopped")?;
        answer.await.map_err(|_| "reloading has stopped".to_string())?
    }

    /// Adds or removes a runtime backend (kept across reloads) and waits for the outcome.
    pub async fn change_backend(&self, pool: &str, change: BackendChange) -> Result<(), ChangeError> {
        let stopped = || ChangeError::Conflict("reloading has stopped".into());
        let tx = self.reload.get().ok_or_else(stopped)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(ReloadRequest::Backend { pool: pool.to_string(), change, reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// The current snapshot. Every request takes one, on every worker: cloning one shared `Arc`
    /// would make all workers write its reference count, a cache line bouncing between cores on
    /// every request. So each thread keeps its own copy (its own `Arc` of the same pools) and
    /// refreshes it when the generation moves; the shared state it reads per call (the
    /// generation) is only written by a reload.
    #[inline]
    pub fn snapshot(&self) -> Arc<Snapshot> {
        let generation = self.generation.load(Ordering::Acquire);
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            if let Some(copy) = local.iter_mut().find(|c| c.gateway == self.id) {
                if copy.generation != generation {
                    copy.generation = generation;
                    copy.snapshot = Arc::new(Snapshot::clone(&self.current.load()));
                }
                return copy.snapshot.clone();
            }
            let snapshot = Arc::new(Snapshot::clone(&self.current.load()));
            if local.len() >= LOCAL_COPIES {
                local.remove(0);
            }
            local.push(LocalCopy { gateway: self.id, generation, snapshot: snapshot.clone() });
            snapshot
        })
    }

    /// Publishes a new snapshot atomically.
    pub fn publish(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
        // After the store: a thread that sees the new generation is sure to load the new snapshot.
        self.generation.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn snapshot(pool: &str) -> Snapshot {
        let text = format!("[pools.{pool}]\n[[pools.{pool}.backends]]\naddr = \"127.0.0.1:9\"\n");
        Snapshot::build(Config::parse(&text, Path::new(".")).unwrap(), &[], None)
    }

    #[test]
    fn each_thread_keeps_its_own_copy_and_sees_every_publish() {
        let gateway = Gateway::new(snapshot("a"));
        let first = gateway.snapshot();
        let again = gateway.snapshot();
        assert!(Arc::ptr_eq(&first, &again), "one copy per thread, cloned per call");
        let elsewhere = std::thread::scope(|s| s.spawn(|| gateway.snapshot()).join().unwrap());
        assert!(!Arc::ptr_eq(&first, &elsewhere), "another thread has its own copy");
        assert!(Arc::ptr_eq(&first.pools[0], &elsewhere.pools[0]), "of the same pools");

        gateway.publish(snapshot("b"));
        assert!(gateway.snapshot().pool("b").is_some(), "this thread sees the publish");
        let other = std::thread::scope(|s| s.spawn(|| gateway.snapshot()).join().unwrap());
        assert!(other.pool("b").is_some(), "and so does another");
        // A second gateway on the same thread is not confused with the first.
        let second = Gateway::new(snapshot("c"));
        assert!(second.snapshot().pool("c").is_some());
        assert!(gateway.snapshot().pool("b").is_some());
    }
}
