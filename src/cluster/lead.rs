//! One autoscaler for the group: the replicas elect a leader with etcd's election API (a
//! campaign on this replica's lease, so leadership ends with the lease), every replica publishes
//! its demand per pool under its lease (`demand/<name>`), and only the leader runs the
//! autoscalers, on the sum. The leader records each pool's cooldowns and pending asks
//! (`autoscale/<pool>`), which the next leader reads when it takes over, and weighs the replicas
//! for the capacity they share (`shares/<pool>`, see `shares`).

use super::{shares, Cluster, RETRY};
use crate::control::ScaleMemory;
use arc_swap::ArcSwap;
use std::collections::{BTreeMap, HashMap};
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
    /// The capacity weights this replica published as leader, per pool.
    weights: ArcSwap<HashMap<String, shares::Weights>>,
    /// Wakes the exchange at once when the memory changed (a scale-up asked for is written
    /// before the provider is likely to answer, so a failover right after it knows).
    changed: tokio::sync::Notify,
}

impl Lead {
    pub fn demand(&self, pool: &str, mine: Demand) -> Demand {
        if self.own.load().get(pool) != Some(&mine) {
            insert(&self.own, pool, mine);
        }
        self.others.load().get(pool).copied().unwrap_or((0, 0))
    }

    pub fn memory(&self, pool: &str) -> Option<ScaleMemory> {
        self.memory.load().get(pool).cloned()
    }

    pub fn record(&self, pool: &str, memory: ScaleMemory) {
        insert(&self.memory, pool, memory);
        self.dirty.store(true, Ordering::Relaxed);
        self.changed.notify_one();
    }
}

/// Sets `pool`'s entry of a shared map (a copy with it, swapped in).
fn insert<V: Clone>(map: &ArcSwap<HashMap<String, V>>, pool: &str, value: V) {
    map.rcu(|m| {
        let mut m = HashMap::clone(m);
        m.insert(pool.to_string(), value.clone());
        m
    });
}

/// How often demand is published and read: every 200 ms, or a quarter of the shortest
/// `scale_up_window` of the autoscaled pools when that is sooner (at most every 50 ms). The
/// capacity shares follow the demand at this pace.
fn every(c: &Cluster) -> Duration {
    let snap = c.control.snapshot();
    let shortest = snap.pools.iter().filter_map(|p| p.config.autoscale.as_ref()).map(|a| a.scale_up_window / 4).min();
    shortest.unwrap_or(PERIOD).clamp(Duration::from_millis(50), PERIOD)
}

/// The longest time between two demand exchanges.
const PERIOD: Duration = Duration::from_millis(200);

/// Publishes this replica's demand and reads the others', every [`every`]; the leader also
/// writes its autoscalers' memory when it changed, and the capacity weights when they moved.
pub(super) async fn exchange(c: &Cluster) {
    let mut applied = shares::Applied::default();
    // What was last written, under which lease: an unchanged demand is not written again (each
    // write is a revision etcd keeps until it compacts).
    let mut last: Option<(i64, Vec<u8>)> = None;
    loop {
        let period = every(c);
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = c.lead.changed.notified() => {}
        }
        let lease = c.lease.load(Ordering::Relaxed);
        if lease == 0 {
            continue;
        }
        if let Err(e) = exchange_once(c, lease, &mut last, &mut applied, period).await {
            tracing::debug!(error = %e, "demand exchange failed");
        }
    }
}

/// This replica's demand per pool: what its autoscalers gave, else the pool's own queue and
/// in-flight count.
fn own_demand(c: &Cluster) -> BTreeMap<String, Demand> {
    let given = c.lead.own.load();
    let snap = c.control.snapshot();
    snap.pools
        .iter()
        .map(|p| {
            let d = given.get(&p.config.name).copied();
            let queue = u32::try_from(p.queue.depth()).unwrap_or(u32::MAX);
            (p.config.name.clone(), d.unwrap_or((queue, u32::try_from(p.in_flight()).unwrap_or(u32::MAX))))
        })
        .collect()
}

async fn exchange_once(
    c: &Cluster,
    lease: i64,
    last: &mut Option<(i64, Vec<u8>)>,
    applied: &mut shares::Applied,
    period: Duration,
) -> Result<(), crate::etcd::EtcdError> {
    let mine = own_demand(c);
    let value = serde_json::to_vec(&mine).unwrap_or_default();
    if last.as_ref().is_none_or(|(l, v)| *l != lease || *v != value) {
        c.etcd.put(&c.key(&format!("demand/{}", c.cfg.name)), &value, lease).await?;
        *last = Some((lease, value));
    }
    // Replica → pool → demand, turned into pool → replica → demand (this replica's included).
    let by_replica: Vec<(String, BTreeMap<String, Demand>)> = read_each(c, "demand/").await?;
    let mut by_pool: BTreeMap<String, BTreeMap<String, Demand>> = BTreeMap::new();
    for (name, pools) in by_replica {
        for (pool, d) in pools {
            by_pool.entry(pool).or_default().insert(name.clone(), d);
        }
    }
    let others: HashMap<String, Demand> = by_pool
        .iter()
        .map(|(pool, m)| {
            let sum = m
                .iter()
                .filter(|(n, _)| **n != c.cfg.name)
                .fold((0u32, 0u32), |a, (_, d)| (a.0.saturating_add(d.0), a.1.saturating_add(d.1)));
            (pool.clone(), sum)
        })
        .collect();
    c.lead.others.store(Arc::new(others));
    if c.lead.leads.load(Ordering::Relaxed) {
        lead_once(c, &by_pool).await?;
    }
    let published: BTreeMap<String, shares::Weights> = read_each(c, "shares/").await?;
    applied.apply(c, published, period * 2, std::time::Instant::now());
    Ok(())
}

/// The leader's part of an exchange: the autoscalers' memory, and each pool's capacity weights
/// when they moved enough to matter.
async fn lead_once(
    c: &Cluster,
    by_pool: &BTreeMap<String, BTreeMap<String, Demand>>,
) -> Result<(), crate::etcd::EtcdError> {
    if c.lead.dirty.swap(false, Ordering::Relaxed) {
        for (pool, m) in c.lead.memory.load().iter() {
            let value = serde_json::to_vec(m).unwrap_or_default();
            c.etcd.put(&c.key(&format!("autoscale/{pool}")), &value, 0).await?;
        }
    }
    let members: Vec<String> = c.view.load().members.iter().map(|m| m.name.clone()).collect();
    if members.is_empty() {
        return Ok(());
    }
    let empty = BTreeMap::new();
    for pool in c.control.snapshot().pools.iter().map(|p| &p.config.name) {
        let w = shares::weigh(&members, by_pool.get(pool).unwrap_or(&empty));
        let last = c.lead.weights.load().get(pool).cloned();
        if last.as_ref().is_none_or(|l| shares::worth_publishing(l, &w)) {
            tracing::debug!(pool, weights = ?w.weights, "capacity weights published");
            let value = serde_json::to_vec(&w).unwrap_or_default();
            c.etcd.put(&c.key(&format!("shares/{pool}")), &value, 0).await?;
            insert(&c.lead.weights, pool, w);
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
    let memory: HashMap<String, ScaleMemory> = read_each(c, "autoscale/").await?;
    c.lead.memory.store(Arc::new(memory));
    c.lead.dirty.store(false, Ordering::Relaxed);
    Ok(())
}

/// The JSON values under `rest` (of the group's prefix), by the rest of their keys; values that do
/// not read as `V` are left out.
async fn read_each<V: serde::de::DeserializeOwned, M: FromIterator<(String, V)>>(
    c: &Cluster,
    rest: &str,
) -> Result<M, crate::etcd::EtcdError> {
    let prefix = c.key(rest);
    let (kvs, _) = c.etcd.get_prefix(&prefix).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| Some((kv.key.strip_prefix(&prefix)?.to_string(), serde_json::from_slice(&kv.value).ok()?)))
        .collect())
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
