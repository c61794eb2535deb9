//! The group's shared registry of runtime backends: one etcd key per backend
//! (`backends/<pool>/<addr>`, a JSON record of pool, addr, weight, capacity, who added it and
//! when). Every replica reads the whole set, applies the difference with what it applied before,
//! then follows a watch from the revision it read; a replica that starts late, or comes back
//! after etcd was away, gets the full set the same way. What it applies goes through the
//! reloader like any runtime change (not saved to the state file: etcd holds it).

use super::{Cluster, RETRY};
use crate::config::BackendConfig;
use crate::control::status::{BackendChange, ChangeError};
use crate::etcd::{EtcdError, Event, Kv, WatchMessage};
use crate::telemetry;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

/// One runtime backend of the group, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Record {
    pool: String,
    addr: SocketAddr,
    weight: u32,
    max_inflight: u32,
    #[serde(default)]
    backup: bool,
    added_by: String,
    added_at: f64,
}

type Applied = HashMap<(String, SocketAddr), BackendConfig>;

/// What follows the keys under one prefix of the group: the whole set as read, then each change.
trait Follower {
    /// Every key under the prefix, as read.
    async fn sync(&mut self, c: &Cluster, kvs: Vec<Kv>);
    /// One change the watch saw.
    async fn changed(&mut self, c: &Cluster, event: Event);
    /// Everything up to `revision` is applied.
    fn settled(&mut self, _c: &Cluster, _revision: i64) {}
}

/// Follows the keys under `rest` (of the group's prefix) for as long as this replica runs: the
/// whole set, then a watch from the revision it was read at; everything again after etcd
/// compacted past the watch, or (after a pause) after an error.
async fn follow_keys(c: &Cluster, rest: &str, f: &mut impl Follower) {
    let prefix = c.key(rest);
    loop {
        if let Err(e) = read_then_watch(c, &prefix, f).await {
            c.failed(&c.registry_ok, rest.trim_end_matches('/'), &e);
            tokio::time::sleep(RETRY).await;
        }
    }
}

async fn read_then_watch(c: &Cluster, prefix: &str, f: &mut impl Follower) -> Result<(), EtcdError> {
    let (kvs, revision) = c.etcd.get_prefix(prefix).await?;
    f.sync(c, kvs).await;
    f.settled(c, revision);
    c.succeeded(&c.registry_ok);
    let mut watch = c.etcd.watch(prefix, revision + 1).await?;
    loop {
        match watch.next().await? {
            None => return Err(EtcdError::Unreachable(format!("the watch of {prefix} ended"))),
            Some(WatchMessage::Compacted(_)) => return Ok(()),
            Some(WatchMessage::Quiet) => {}
            Some(WatchMessage::Events(events, revision)) => {
                for e in events {
                    f.changed(c, e).await;
                }
                f.settled(c, revision);
                c.succeeded(&c.registry_ok);
            }
        }
    }
}

/// Follows the registry for as long as this replica runs.
pub(super) async fn follow(c: &Cluster) {
    follow_keys(c, "backends/", &mut Backends::default()).await;
}

fn key(c: &Cluster, pool: &str, addr: SocketAddr) -> String {
    c.key(&format!("backends/{pool}/{addr}"))
}

/// The registry's backends this replica applied.
#[derive(Default)]
struct Backends {
    applied: Applied,
}

impl Follower for Backends {
    /// Applies the difference between what was applied and what the registry holds.
    async fn sync(&mut self, c: &Cluster, kvs: Vec<Kv>) {
        let wanted: Applied = kvs.iter().filter_map(|kv| decode(c, kv)).collect();
        let gone: Vec<(String, SocketAddr)> =
            self.applied.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        for (pool, addr) in gone {
            remove_here(c, &pool, addr).await;
        }
        let mut new: HashMap<String, Vec<BackendConfig>> = HashMap::new();
        for ((pool, _), b) in wanted.iter().filter(|(k, _)| !self.applied.contains_key(*k)) {
            new.entry(pool.clone()).or_default().push(b.clone());
        }
        for (pool, list) in new {
            add_here(c, &pool, list).await;
        }
        self.applied = wanted;
    }

    async fn changed(&mut self, c: &Cluster, event: Event) {
        match event {
            Event::Put(kv) => {
                let Some((k, b)) = decode(c, &kv) else { return };
                if self.applied.insert(k.clone(), b.clone()).is_none() {
                    add_here(c, &k.0, vec![b]).await;
                }
            }
            Event::Delete { key, .. } => {
                let Some(k) = parse_key(&c.key("backends/"), &key) else { return };
                if self.applied.remove(&k).is_some() {
                    remove_here(c, &k.0, k.1).await;
                }
            }
        }
    }

    fn settled(&mut self, c: &Cluster, revision: i64) {
        c.registry_revision.store(revision, Ordering::Relaxed);
        c.registry_size.store(self.applied.len() as i64, Ordering::Relaxed);
    }
}

/// The backend a registry key and value describe; `None` (logged) for one this replica cannot
/// take: a pool it does not have, or an address its rules refuse.
fn decode(c: &Cluster, kv: &Kv) -> Option<((String, SocketAddr), BackendConfig)> {
    let r: Record = match serde_json::from_slice(&kv.value) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(key = %kv.key.escape_debug(), error = %e, "registry entry not understood; skipped");
            return None;
        }
    };
    if let Err(rule) = c.control.addr_policy().check(r.addr) {
        telemetry::backend_addr_refused(&r.pool, "cluster", rule.as_str());
        tracing::warn!(pool = %r.pool.escape_debug(), backend = %r.addr, %rule, "registry entry refused here");
        return None;
    }
    let b =
        BackendConfig { addr: r.addr, weight: r.weight.max(1), max_inflight: r.max_inflight.max(1), backup: r.backup };
    Some(((r.pool, r.addr), b))
}

/// The pool and address a key `<prefix><pool>/<addr>` names.
fn parse_key(prefix: &str, key: &str) -> Option<(String, SocketAddr)> {
    let (pool, addr) = key.strip_prefix(prefix)?.rsplit_once('/')?;
    Some((pool.to_string(), addr.parse().ok()?))
}

/// Adds backends from the registry here (those this replica already has are left as they are:
/// the one whose API took the registration applied it at once).
async fn add_here(c: &Cluster, pool: &str, list: Vec<BackendConfig>) {
    let snapshot = c.control.snapshot();
    let Some(p) = snapshot.pool(pool) else {
        tracing::warn!(pool = %pool.escape_debug(), "registry entries for a pool this replica does not have; skipped");
        return;
    };
    let have: HashSet<SocketAddr> = p.backends.iter().map(|b| b.addr).collect();
    let list: Vec<BackendConfig> = list.into_iter().filter(|b| !have.contains(&b.addr)).collect();
    if list.is_empty() {
        return;
    }
    let n = list.len();
    match c.control.change_backend(pool, BackendChange::AddMany { backends: list, persist: false }).await {
        Ok(()) => (0..n).for_each(|_| telemetry::cluster_registry_change("add")),
        Err(e) => tracing::warn!(pool, error = %e, "registry entries not applied"),
    }
}

async fn remove_here(c: &Cluster, pool: &str, addr: SocketAddr) {
    match c.control.change_backend(pool, BackendChange::Remove(addr)).await {
        Ok(()) => telemetry::cluster_registry_change("remove"),
        // Already gone here (this replica's API removed it).
        Err(ChangeError::NotFound(_)) => {}
        Err(e) => tracing::warn!(pool, backend = %addr, error = %e, "registry removal not applied"),
    }
}

/// `POST /api/pools/{pool}/backends` on a replica of a group: refused at once if this replica
/// already has it, else written to etcd, then applied here.
pub(super) async fn add(c: &Cluster, pool: &str, b: BackendConfig) -> Result<(), ChangeError> {
    let snapshot = c.control.snapshot();
    let Some(p) = snapshot.pool(pool) else { return Err(ChangeError::NotFound(format!("no pool {pool:?}"))) };
    if p.backends.iter().any(|x| x.addr == b.addr) {
        return Err(ChangeError::Conflict(format!("pool {pool:?} already has backend {}", b.addr)));
    }
    let value = record(c, pool, &b)?;
    c.etcd.put(&key(c, pool, b.addr), &value, 0).await.map_err(unavailable)?;
    match c.control.change_backend(pool, BackendChange::Add { backend: b, persist: false }).await {
        // The watch may have applied it first.
        Ok(()) | Err(ChangeError::Conflict(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Backends a provider returned to the leader's autoscaler: written to etcd, then applied here
/// in one publish. Those this replica already has are left out.
pub(super) async fn add_many(c: &Cluster, pool: &str, list: Vec<BackendConfig>) -> Result<(), ChangeError> {
    let snapshot = c.control.snapshot();
    let Some(p) = snapshot.pool(pool) else { return Err(ChangeError::NotFound(format!("no pool {pool:?}"))) };
    let have: HashSet<SocketAddr> = p.backends.iter().map(|b| b.addr).collect();
    let list: Vec<BackendConfig> = list.into_iter().filter(|b| !have.contains(&b.addr)).collect();
    for b in &list {
        let value = record(c, pool, b)?;
        c.etcd.put(&key(c, pool, b.addr), &value, 0).await.map_err(unavailable)?;
    }
    add_here(c, pool, list).await;
    Ok(())
}

/// `DELETE /api/pools/{pool}/backends/{addr}` on a replica of a group: deleted from etcd (every
/// replica drains it from its watch), and drained here at once. A backend the registry does not
/// hold is this replica's own (launched, or from its file): the usual rules answer.
pub(super) async fn remove(c: &Cluster, pool: &str, addr: SocketAddr) -> Result<(), ChangeError> {
    let k = key(c, pool, addr);
    if c.etcd.get(&k).await.map_err(unavailable)?.is_none() {
        return c.control.change_backend(pool, BackendChange::Remove(addr)).await;
    }
    c.etcd.delete(&k).await.map_err(unavailable)?;
    match c.control.change_backend(pool, BackendChange::Remove(addr)).await {
        Ok(()) | Err(ChangeError::NotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The stored record of backend `b` of `pool`, added by this replica now.
fn record(c: &Cluster, pool: &str, b: &BackendConfig) -> Result<Vec<u8>, ChangeError> {
    let record = Record {
        pool: pool.to_string(),
        addr: b.addr,
        weight: b.weight,
        max_inflight: b.max_inflight,
        backup: b.backup,
        added_by: c.cfg.name.clone(),
        added_at: crate::clock::unix_now(),
    };
    serde_json::to_vec(&record).map_err(|e| ChangeError::Internal(e.to_string()))
}

fn unavailable(e: EtcdError) -> ChangeError {
    ChangeError::Unavailable(format!("the cluster's store (etcd) cannot be reached, so nothing was changed: {e}"))
}

/// `POST .../drain` or `.../undrain` on a replica of a group: the mark is written to (or removed
/// from) etcd, and every replica applies it from [`follow_drains`].
pub(super) async fn set_drained(c: &Cluster, pool: &str, addr: SocketAddr, drained: bool) -> Result<(), ChangeError> {
    let k = c.key(&format!("drained/{pool}/{addr}"));
    match drained {
        true => c.etcd.put(&k, c.cfg.name.as_bytes(), 0).await.map(drop).map_err(unavailable),
        false => c.etcd.delete(&k).await.map(drop).map_err(unavailable),
    }
}

/// Follows the group's drain marks: a marked backend this replica has is drained; one whose mark
/// goes is put back in service.
pub(super) async fn follow_drains(c: &Cluster) {
    follow_keys(c, "drained/", &mut Drains::default()).await;
}

/// The drain marks this replica applied.
#[derive(Default)]
struct Drains {
    marked: HashSet<(String, SocketAddr)>,
}

impl Follower for Drains {
    async fn sync(&mut self, c: &Cluster, kvs: Vec<Kv>) {
        let prefix = c.key("drained/");
        let now: HashSet<(String, SocketAddr)> = kvs.iter().filter_map(|kv| parse_key(&prefix, &kv.key)).collect();
        for (pool, addr) in self.marked.difference(&now) {
            undrain_here(c, pool, *addr).await;
        }
        for (pool, addr) in &now {
            drain_here(c, pool, *addr);
        }
        self.marked = now;
    }

    async fn changed(&mut self, c: &Cluster, event: Event) {
        let prefix = c.key("drained/");
        match event {
            Event::Put(kv) => {
                if let Some((pool, addr)) = parse_key(&prefix, &kv.key) {
                    drain_here(c, &pool, addr);
                    self.marked.insert((pool, addr));
                }
            }
            Event::Delete { key, .. } => {
                if let Some((pool, addr)) = parse_key(&prefix, &key) {
                    if self.marked.remove(&(pool.clone(), addr)) {
                        undrain_here(c, &pool, addr).await;
                    }
                }
            }
        }
    }
}

fn drain_here(c: &Cluster, pool: &str, addr: SocketAddr) {
    let snapshot = c.control.snapshot();
    let Some(b) = snapshot.pool(pool).and_then(|p| p.backends.iter().find(|b| b.addr == addr)) else { return };
    if b.state() != crate::pool::BackendState::Draining {
        b.set_state(crate::pool::BackendState::Draining);
        tracing::info!(pool, backend = %addr, in_flight = b.in_flight(), "draining backend (for the cluster)");
    }
}

async fn undrain_here(c: &Cluster, pool: &str, addr: SocketAddr) {
    if let Err(e) = c.control.change_backend(pool, BackendChange::Undrain(addr)).await {
        tracing::debug!(pool, backend = %addr, error = %e, "undrain for the cluster not applied");
    }
}
