//! The control plane's handle: what changes the snapshot and what the admin API asks of it,
//! kept apart from the hot path's [`Gateway`]. It holds the gateway, the reloader's mailbox
//! (reloads and runtime backend changes go through the one task that owns the file, so they
//! never race), the running config's status, the processes headroom launched, the scale events,
//! the status page's history, and the addresses the listeners are bound to.

pub mod history;
pub mod status;

use crate::gateway::{Gateway, Snapshot};
use crate::scale::events::EventLog;
use crate::scale::launch::Launched;
use arc_swap::ArcSwap;
use history::History;
use status::{BackendChange, ChangeError, ConfigStatus, ReloadRequest, ReloadResult, Trigger};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use tokio::sync::mpsc;

pub struct Control {
    pub gateway: Arc<Gateway>,
    /// The running config's origin and the last reload error (`GET /api/config`).
    config_status: ArcSwap<ConfigStatus>,
    /// Where reload requests go (`POST /api/reload`); set once the reloader runs.
    reload: OnceLock<mpsc::Sender<ReloadRequest>>,
    /// Backend processes headroom started (launch sections, the local provider).
    pub launched: Arc<Launched>,
    /// The last scale events per pool.
    pub scale_events: EventLog,
    /// The last 15 minutes of each pool (the status page's charts).
    pub history: History,
    /// The addresses the listeners were really bound to (tests bind port 0); no backend may
    /// point at them.
    bound: OnceLock<Vec<SocketAddr>>,
    /// The group this replica acts with (`[cluster]`), once it runs.
    group: OnceLock<Arc<dyn Group>>,
}

/// What a group of replicas offers the admin API: changes to the shared backend registry (made
/// in the shared store, then applied here and by every other replica), and its state.
pub trait Group: Send + Sync {
    /// Makes `change` for the whole group.
    fn change<'a>(
        &'a self,
        pool: &'a str,
        change: BackendChange,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ChangeError>> + Send + 'a>>;
    /// Drains `addr` of `pool` on every replica (`drained`), or puts it back in service.
    fn set_drained<'a>(
        &'a self,
        pool: &'a str,
        addr: SocketAddr,
        drained: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ChangeError>> + Send + 'a>>;
    /// `GET /api/cluster`.
    fn document(&self) -> serde_json::Value;
    /// Whether the shared store is reachable (else this replica serves on what it last had).
    fn connected(&self) -> bool;
    /// Whether this replica runs the group's autoscalers: it was elected, and still reaches the
    /// store (no provider call without the lease).
    fn leads(&self) -> bool;
    /// Takes this replica's demand for `pool` (requests queued, in flight) to publish; answers
    /// the other live replicas' summed demand for it, as last read.
    fn demand(&self, pool: &str, queue: u32, inflight: u32) -> (u32, u32);
    /// What the leader before this one recorded of `pool`'s autoscaler.
    fn scale_memory(&self, pool: &str) -> Option<ScaleMemory>;
    /// Records `pool`'s autoscaler state for a leader after this one.
    fn record_scale(&self, pool: &str, memory: ScaleMemory);
}

/// What a group's autoscaler hands over to the next leader: its cooldowns and the backends it
/// has asked for that have not arrived (so a failover neither scales twice nor forgets).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScaleMemory {
    /// Unix seconds of the last scale up and scale down carried out.
    pub last_up: Option<f64>,
    pub last_down: Option<f64>,
    /// Backends asked for by calls that have not finished, and since when (Unix seconds).
    pub asking: u32,
    pub asking_since: Option<f64>,
}

impl Control {
    /// The control handle of `gateway`, owning the processes in `launched`.
    pub fn new(gateway: Arc<Gateway>, launched: Arc<Launched>) -> Arc<Self> {
        let history = History::new(gateway.snapshot().config.admin.history_interval);
        Arc::new(Control {
            gateway,
            config_status: ArcSwap::from_pointee(ConfigStatus::default()),
            reload: OnceLock::new(),
            launched,
            scale_events: EventLog::default(),
            history,
            bound: OnceLock::new(),
            group: OnceLock::new(),
        })
    }

    /// The gateway's current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.gateway.snapshot()
    }

    /// Records the addresses the listeners are bound to (once, at start).
    pub fn set_bound(&self, addrs: Vec<SocketAddr>) {
        let _ = self.bound.set(addrs);
    }

    /// The rules a backend address is held to now: the running config's, and no address a
    /// listener of this gateway is bound to.
    pub fn addr_policy(&self) -> crate::config::addr::AddrPolicy {
        let mut policy = self.snapshot().config.addr_policy();
        policy.own.extend(self.bound.get().into_iter().flatten().copied());
        policy
    }

    pub fn config_status(&self) -> ConfigStatus {
        (**self.config_status.load()).clone()
    }

    pub fn set_config_status(&self, status: ConfigStatus) {
        self.config_status.store(Arc::new(status));
    }

    /// Joins this replica's group (once).
    pub fn set_group(&self, group: Arc<dyn Group>) {
        let _ = self.group.set(group);
    }

    /// The group this replica acts with, if it has one.
    pub fn group(&self) -> Option<&Arc<dyn Group>> {
        self.group.get()
    }

    /// A change asked for through the admin API or by a provider: made for the whole group when
    /// there is one (the registry then lives in the shared store instead of the state file), else
    /// here.
    pub async fn change_backend_shared(&self, pool: &str, change: BackendChange) -> Result<(), ChangeError> {
        match self.group.get() {
            Some(g) => g.change(pool, change).await,
            None => self.change_backend(pool, change).await,
        }
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
}
