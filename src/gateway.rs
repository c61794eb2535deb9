//! What the hot path reads: one [`Snapshot`] of config, routes and pools behind an `ArcSwap`
//! (with a per-thread copy), the listeners' TLS, the counters of requests that reached no pool,
//! and the loop-detection token. What changes the snapshot, and its handles, is
//! `control::Control`, a separate value the data path never sees.
//!
//! Everything that must change together (routes, pool settings, backend lists) is published in a
//! single snapshot, so a request sees one consistent view. Per-backend state lives in `Arc`s that
//! a new snapshot reuses by (pool, address), so counters, in-flight counts and queues carry over.

use crate::config::{BackendConfig, Config};
use crate::pool::Pool;
use crate::telemetry::PoolMetrics;
use crate::tls::server::ServerTls;
use arc_swap::ArcSwap;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

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

    /// Where a request goes, as far as its host and path tell: the first route whose host (if
    /// any) and path prefix match, unless that route names a model, which only the body tells.
    #[inline]
    pub fn route(&self, host: Option<&str>, path: &str) -> Routed<'_> {
        match self.config.routes.iter().find(|r| r.matches_target(host, path)) {
            None => Routed::Nowhere,
            Some(r) if r.model.is_some() => Routed::ByModel,
            Some(r) => self.pools.get(r.pool).map_or(Routed::Nowhere, Routed::Pool),
        }
    }

    /// The pool for a request whose body names `model` (`None`: it names none, or it could not
    /// be read): the first route whose host, path prefix and model (if any) match.
    pub fn route_model(&self, host: Option<&str>, path: &str, model: Option<&str>) -> Option<&Arc<Pool>> {
        self.config
            .routes
            .iter()
            .find(|r| {
                r.matches_target(host, path)
                    && match (&r.model, model) {
                        (None, _) => true,
                        (Some(want), Some(m)) => want.matches(m),
                        (Some(_), None) => false,
                    }
            })
            .and_then(|r| self.pools.get(r.pool))
    }
}

/// Where the routes send a request, before its body is read.
pub enum Routed<'a> {
    Pool(&'a Arc<Pool>),
    /// The first matching route names a model: read the body to know.
    ByModel,
    Nowhere,
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
    /// TLS for the proxy listeners, when `[server.tls]` was set at start.
    tls: OnceLock<Arc<ServerTls>>,
    /// This gateway's `Via` token: a request that carries it has looped back.
    pub via: crate::proxy::headers::Via,
    /// A listener's drain ended at `shutdown_timeout` with connections still open (cut).
    pub drain_cut: std::sync::atomic::AtomicBool,
}

impl Gateway {
    pub fn new(snapshot: Snapshot) -> Arc<Self> {
        Arc::new(Gateway {
            tls: OnceLock::new(),
            via: crate::proxy::headers::Via::new(),
            drain_cut: std::sync::atomic::AtomicBool::new(false),
            current: ArcSwap::from_pointee(snapshot),
            generation: AtomicU64::new(0),
            id: GATEWAY_IDS.fetch_add(1, Ordering::Relaxed),
            unrouted: PoolMetrics::new("none"),
        })
    }

    /// Turns TLS on for the proxy listeners (once, at start).
    pub fn set_tls(&self, tls: Arc<ServerTls>) {
        let _ = self.tls.set(tls);
    }

    pub fn tls(&self) -> Option<Arc<ServerTls>> {
        self.tls.get().cloned()
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
