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
