//! One autoscaler for the group: the replicas elect a leader with etcd's election API (a
//! campaign on this replica's lease, so leadership ends with the lease), every replica publishes
//! its per-pool demand under its lease (`demand/<pool>/<name>`), and only the leader runs the
//! autoscalers, on the sum. The leader records each pool's cooldowns and pending asks
//! (`autoscale/<pool>`), which the next leader reads when it takes over.

use super::{Cluster, RETRY};
use crate::control::ScaleMemory;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A pool's demand: requests queued, requests in flight.
type Demand = (u32, u32);

/// What the election and the demand exchange share with the autoscalers.
#[derive(Default)]
pub(super) struct Lead {
    /// This replica won the election and still holds the lease it won with.
    pub leads: AtomicBool,
    /// The leader's name, as last read.
    pub leader: ArcSwap<Option<String>>,
    /// This replica's demand per pool, as its autoscalers last gave it.
    own: ArcSwap<HashMap<String, Demand>>,
    /// The other live replicas' summed demand per pool, as last read.
    others: ArcSwap<HashMap<String, Demand>>,
    /// Each pool's autoscaler memory: read when this replica took over, then its own.
    memory: ArcSwap<HashMap<String, ScaleMemory>>,
    /// Memory changed since it was last written.
    dirty: AtomicBool,
}

impl Lead {
    pub fn demand(&self, pool: &str, mine: Demand) -> Demand {
        if self.own.load().get(pool) != Some(&mine) {
            self.own.rcu(|m| {
                let mut m = HashMap::clone(m);
                m.insert(pool.to_string(), mine);
                m
            });
        }
        self.others.load().get(pool).copied().unwrap_or((0, 0))
    }

    pub fn memory(&self, pool: &str) -> Option<ScaleMemory> {
        self.memory.load().get(pool).cloned()
    }

    pub fn record(&self, pool: &str, memory: ScaleMemory) {
        self.memory.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(pool.to_string(), memory.clone());
            m
        });
        self.dirty.store(true, Ordering::Relaxed);
    }
}

/// How often demand is published and read: a quarter of the shortest `scale_up_window` of the
/// autoscaled pools (1 s without any), within 50 ms..=5 s.
fn every(c: &Cluster) -> Duration {
    let snap = c.control.snapshot();
    let shortest = snap.pools.iter().filter_map(|p| p.config.autoscale.as_ref()).map(|a| a.scale_up_window / 4).min();
    shortest.unwrap_or(Duration::from_secs(1)).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

/// Publishes this replica's demand and reads the others', every [`every`]; the leader also
/// writes its autoscalers' memory when it changed.
pub(super) async fn exchange(c: &Cluster) {
    loop {
        tokio::time::sleep(every(c)).await;
        let lease = c.lease.load(Ordering::Relaxed);
        if lease == 0 {
            continue;
        }
        if let Err(e) = exchange_once(c, lease).await {
            tracing::debug!(error = %e, "demand exchange failed");
        }
    }
}

async fn exchange_once(c: &Cluster, lease: i64) -> Result<(), crate::etcd::EtcdError> {
    for (pool, (queue, inflight)) in c.lead.own.load().iter() {
        let value = serde_json::json!({ "queue": queue, "inflight": inflight }).to_string();
        c.etcd.put(&c.key(&format!("demand/{pool}/{}", c.cfg.name)), value.as_bytes(), lease).await?;
    }
    let prefix = c.key("demand/");
    let (kvs, _) = c.etcd.get_prefix(&prefix).await?;
    let mut others: HashMap<String, Demand> = HashMap::new();
    for kv in kvs {
        let Some((pool, name)) = kv.key.strip_prefix(&prefix).and_then(|r| r.rsplit_once('/')) else { continue };
        if name == c.cfg.name {
            continue;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&kv.value) else { continue };
        let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0).min(u32::MAX as u64) as u32;
        let sum = others.entry(pool.to_string()).or_default();
        *sum = (sum.0.saturating_add(n("queue")), sum.1.saturating_add(n("inflight")));
    }
    c.lead.others.store(Arc::new(others));
    if c.lead.leads.load(Ordering::Relaxed) && c.lead.dirty.swap(false, Ordering::Relaxed) {
        for (pool, m) in c.lead.memory.load().iter() {
            let value = serde_json::to_vec(m).unwrap_or_default();
            c.etcd.put(&c.key(&format!("autoscale/{pool}")), &value, 0).await?;
        }
    }
    Ok(())
}

/// Campaigns for leadership on this replica's lease, leads while the lease lasts and the
/// election still names it, then campaigns again.
pub(super) async fn elect(c: &Cluster) {
    let name = c.key("leader");
    loop {
        let lease = c.lease.load(Ordering::Relaxed);
        if lease == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if let Err(e) = c.etcd.campaign(&name, lease, c.cfg.name.as_bytes()).await {
            tracing::debug!(error = %e, "campaign failed");
            tokio::time::sleep(RETRY).await;
            continue;
        }
        if let Err(e) = take_over(c).await {
            tracing::warn!(error = %e, "elected, but cannot read the autoscalers' state; campaigning again");
            tokio::time::sleep(RETRY).await;
            continue;
        }
        c.lead.leads.store(true, Ordering::Relaxed);
        c.lead.leader.store(Arc::new(Some(c.cfg.name.clone())));
        tracing::info!(name = %c.cfg.name, "elected leader: this replica runs the group's autoscalers");
        hold(c, &name, lease).await;
        c.lead.leads.store(false, Ordering::Relaxed);
        tracing::warn!(name = %c.cfg.name, "no longer the leader");
    }
}

/// Reads what the previous leader recorded of each pool's autoscaler.
async fn take_over(c: &Cluster) -> Result<(), crate::etcd::EtcdError> {
    let prefix = c.key("autoscale/");
    let (kvs, _) = c.etcd.get_prefix(&prefix).await?;
    let memory: HashMap<String, ScaleMemory> = kvs
        .iter()
        .filter_map(|kv| Some((kv.key.strip_prefix(&prefix)?.to_string(), serde_json::from_slice(&kv.value).ok()?)))
        .collect();
    c.lead.memory.store(Arc::new(memory));
    c.lead.dirty.store(false, Ordering::Relaxed);
    Ok(())
}

/// Returns when this replica no longer leads: its lease changed, or the election names another.
async fn hold(c: &Cluster, name: &str, lease: i64) {
    loop {
        tokio::time::sleep(c.cfg.lease_ttl / 3).await;
        if c.lease.load(Ordering::Relaxed) != lease {
            return;
        }
        match c.etcd.leader(name).await {
            Ok(Some(kv)) if kv.lease == lease => {}
            Ok(_) => return,
            // Unreachable: `leads()` is false meanwhile (not connected); the lease decides.
            Err(_) => {}
        }
    }
}

/// Reads the current leader's name (for `/api/cluster`).
pub(super) async fn read_leader(c: &Cluster) {
    if let Ok(kv) = c.etcd.leader(&c.key("leader")).await {
        let name = kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
        c.lead.leader.store(Arc::new(name));
    }
}
