//! Several replicas acting as one gateway, through etcd (`[cluster]`). This module owns this
//! replica's membership (a key under its lease, renewed every third of the TTL), the shared
//! registry of runtime backends (`registry`: written to etcd by whichever replica's API or
//! provider is asked, applied by every replica from a watch), the election of the one replica
//! that runs the group's autoscalers on the summed demand (`lead`), and what `GET /api/cluster`,
//! `/healthz` and `headroom_cluster_connected` say about the group.
//!
//! It never decides anything by itself that needs agreement: etcd does (leases, revisions).
//! When etcd cannot be reached, every replica keeps serving with the backends it last had
//! ("fail static") and comes back by itself when etcd does. Health checks and ejection stay per
//! replica.
//!
//! Keys, under `prefix`: `members/<name>` (this replica, under its lease),
//! `backends/<pool>/<addr>` (one runtime backend each), `leader` (the election),
//! `drained/<pool>/<addr>` (drained on every replica), `demand/<name>` (under the lease),
//! `autoscale/<pool>` (the leader's memory) and `shares/<pool>` (the capacity weights).

mod lead;
mod registry;
mod shares;

use crate::config::ClusterConfig;
use crate::control::status::{BackendChange, ChangeError};
use crate::control::{Control, Group, ScaleMemory};
use crate::etcd::{Etcd, EtcdError};
use crate::telemetry;
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long to wait before trying etcd again after a failed call.
const RETRY: Duration = Duration::from_secs(1);

/// This replica's membership record (`members/<name>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Member {
    pub name: String,
    /// The admin listener and the proxy listeners, as bound.
    pub admin: String,
    pub listen: Vec<String>,
    pub version: String,
    /// Unix seconds.
    pub started_at: f64,
}

/// What this replica last saw of the group.
#[derive(Debug, Clone, Default, Serialize)]
struct View {
    members: Vec<Member>,
    last_error: Option<String>,
    last_error_at: Option<f64>,
}

/// A replica's place in its group.
pub struct Cluster {
    cfg: ClusterConfig,
    etcd: Arc<Etcd>,
    control: Arc<Control>,
    me: Member,
    /// This replica's lease (0 while it has none).
    lease: AtomicI64,
    /// Whether the membership renewal and the registry's watch last reached etcd.
    members_ok: AtomicBool,
    registry_ok: AtomicBool,
    /// The registry as last applied: its revision and size.
    registry_revision: AtomicI64,
    registry_size: AtomicI64,
    view: ArcSwap<View>,
    lead: lead::Lead,
}

impl Cluster {
    /// This replica's group handle; `admin` and `listen` are the bound addresses.
    pub fn new(
        cfg: ClusterConfig,
        control: Arc<Control>,
        admin: std::net::SocketAddr,
        listen: &[std::net::SocketAddr],
    ) -> Result<Arc<Cluster>, EtcdError> {
        let etcd = Etcd::new(&cfg)?;
        let me = Member {
            name: cfg.name.clone(),
            admin: admin.to_string(),
            listen: listen.iter().map(ToString::to_string).collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: crate::clock::unix_now(),
        };
        telemetry::cluster_connected(false);
        Ok(Arc::new(Cluster {
            cfg,
            etcd,
            control,
            me,
            lease: AtomicI64::new(0),
            members_ok: AtomicBool::new(false),
            registry_ok: AtomicBool::new(false),
            registry_revision: AtomicI64::new(0),
            registry_size: AtomicI64::new(0),
            view: ArcSwap::from_pointee(View::default()),
            lead: lead::Lead::default(),
        }))
    }

    /// Keeps this replica's membership and follows the registry until `stop`; then revokes the
    /// lease, so the others see this replica leave at once.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::select! {
            _ = stop => {}
            _ = self.membership() => {}
            _ = registry::follow(&self) => {}
            _ = registry::follow_drains(&self) => {}
            _ = lead::elect(&self) => {}
            _ = lead::exchange(&self) => {}
        }
        self.lead.leads.store(false, Ordering::Relaxed);
        let lease = self.lease.swap(0, Ordering::Relaxed);
        if lease != 0 {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.etcd.revoke(lease)).await;
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.cfg.prefix)
    }

    /// Holds `members/<name>` under a lease of `lease_ttl`, renewed every third of it, and reads
    /// the members list each time. A lease that ended (etcd lost it, or this replica could not
    /// renew it in time) is replaced.
    async fn membership(&self) {
        let every = self.cfg.lease_ttl / 3;
        loop {
            let lease = match self.join().await {
                Ok(l) => l,
                Err(e) => {
                    self.failed(&self.members_ok, "membership", &e);
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            loop {
                match self.etcd.keep_alive(lease).await {
                    Ok(ttl) if ttl > 0 => match self.read_members().await {
                        Ok(()) => {
                            self.succeeded(&self.members_ok);
                            lead::read_leader(self).await;
                        }
                        Err(e) => self.failed(&self.members_ok, "membership", &e),
                    },
                    Ok(_) => break,
                    Err(e) if e.lease_gone() => break,
                    Err(e) => self.failed(&self.members_ok, "membership", &e),
                }
                tokio::time::sleep(every).await;
            }
            tracing::warn!(lease, "the cluster lease ended; joining again");
            self.lease.store(0, Ordering::Relaxed);
        }
    }

    /// A new lease and this replica's member key under it.
    async fn join(&self) -> Result<i64, EtcdError> {
        let lease = self.etcd.grant(self.cfg.lease_ttl).await?;
        let record = serde_json::to_vec(&self.me).unwrap_or_default();
        self.etcd.put(&self.key(&format!("members/{}", self.cfg.name)), &record, lease).await?;
        self.lease.store(lease, Ordering::Relaxed);
        tracing::info!(name = %self.cfg.name, prefix = %self.cfg.prefix, lease, "joined the cluster");
        self.read_members().await?;
        self.succeeded(&self.members_ok);
        Ok(lease)
    }

    async fn read_members(&self) -> Result<(), EtcdError> {
        let (kvs, _) = self.etcd.get_prefix(&self.key("members/")).await?;
        let members: Vec<Member> = kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect();
        telemetry::cluster_members(members.len());
        let mut view = (**self.view.load()).clone();
        view.members = members;
        self.view.store(Arc::new(view));
        Ok(())
    }

    fn succeeded(&self, flag: &AtomicBool) {
        let was = self.connected();
        flag.store(true, Ordering::Relaxed);
        if self.connected() {
            if !was {
                tracing::info!("etcd reachable again");
            }
            telemetry::cluster_connected(true);
        }
    }

    fn failed(&self, flag: &AtomicBool, what: &str, e: &EtcdError) {
        if self.connected() {
            tracing::warn!(error = %e, "{what}: etcd unreachable; serving with the last known backends, not scaling");
        }
        flag.store(false, Ordering::Relaxed);
        telemetry::cluster_connected(false);
        let mut view = (**self.view.load()).clone();
        view.last_error = Some(format!("{what}: {e}"));
        view.last_error_at = Some(crate::clock::unix_now());
        self.view.store(Arc::new(view));
    }

    /// A registration or removal through this replica's API: written to etcd first (so every
    /// replica applies it from its watch), then applied here without waiting for the watch.
    async fn change_shared(&self, pool: &str, change: BackendChange) -> Result<(), ChangeError> {
        match change {
            BackendChange::Add { backend, .. } => registry::add(self, pool, backend).await,
            BackendChange::AddMany { backends, .. } => registry::add_many(self, pool, backends).await,
            BackendChange::Remove(addr) => registry::remove(self, pool, addr).await,
            // Drain state stays per replica.
            other @ BackendChange::Undrain(_) => self.control.change_backend(pool, other).await,
        }
    }
}

impl Group for Cluster {
    fn change<'a>(
        &'a self,
        pool: &'a str,
        change: BackendChange,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ChangeError>> + Send + 'a>> {
        Box::pin(self.change_shared(pool, change))
    }

    fn set_drained<'a>(
        &'a self,
        pool: &'a str,
        addr: std::net::SocketAddr,
        drained: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ChangeError>> + Send + 'a>> {
        Box::pin(registry::set_drained(self, pool, addr, drained))
    }

    fn document(&self) -> serde_json::Value {
        let view = self.view.load();
        json!({
            "enabled": true,
            "name": self.cfg.name,
            "prefix": self.cfg.prefix,
            "etcd": self.cfg.etcd.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "lease_ttl_s": self.cfg.lease_ttl.as_secs(),
            "connected": self.connected(),
            "lease": self.lease.load(Ordering::Relaxed).to_string(),
            "members": view.members,
            "leader": **self.lead.leader.load(),
            "leads": self.leads(),
            "registry": {
                "revision": self.registry_revision.load(Ordering::Relaxed),
                "backends": self.registry_size.load(Ordering::Relaxed),
            },
            "last_error": view.last_error,
            "last_error_at": view.last_error_at,
        })
    }

    fn connected(&self) -> bool {
        self.members_ok.load(Ordering::Relaxed) && self.registry_ok.load(Ordering::Relaxed)
    }

    fn leads(&self) -> bool {
        self.lead.leads.load(Ordering::Relaxed) && self.connected()
    }

    fn demand(&self, pool: &str, queue: u32, inflight: u32) -> (u32, u32) {
        self.lead.demand(pool, (queue, inflight))
    }

    fn scale_memory(&self, pool: &str) -> Option<ScaleMemory> {
        self.lead.memory(pool)
    }

    fn record_scale(&self, pool: &str, memory: ScaleMemory) {
        self.lead.record(pool, memory);
    }
}
