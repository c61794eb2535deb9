//! Reads what the backends' engines say about themselves, off the data path, one task per pool
//! and kind of read, all of a pool's backends at once, each read bounded in time and to 1 MiB:
//! - their metrics (`[pools.X.engine]`), once per `interval` (each within it, at most 2 s), into
//!   the backend's gauges (what `engine::read` finds). A read that fails leaves the last reading
//!   to go stale; it never changes a backend's state.
//! - their own `GET /v1/models` (`discover_models`), at the health checks' interval (10 s
//!   without them), for headroom's model list. A backend that does not answer lists none.

use crate::config::{EngineConfig, PoolConfig};
use crate::gateway::Gateway;
use crate::pool::{Backend, Pool};
use http_body_util::{BodyExt, Limited};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The most of a metrics page read.
const MAX_PAGE: usize = 1 << 20;

/// Reads pool `name`'s engines until `shutdown` resolves, or the pool or its section is gone.
pub async fn run_pool(gateway: Arc<Gateway>, name: String, shutdown: impl Future<Output = ()>) {
    let every = |p: &PoolConfig| p.engine.as_ref().map(|e| e.interval);
    rounds(gateway, name, shutdown, every, |b, pool, _| async move {
        if let Some(cfg) = &pool.config.engine {
            read_one(&b, &pool.config, cfg).await;
        }
    })
    .await;
}

/// The longest a backend's model list is waited for, and the most models kept from it.
const MODELS_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_MODELS: usize = 1024;

/// Asks pool `name`'s backends for their models until `shutdown` resolves, or the pool stops
/// discovering them.
pub async fn discover_pool(gateway: Arc<Gateway>, name: String, shutdown: impl Future<Output = ()>) {
    let every =
        |p: &PoolConfig| p.discover_models.then(|| p.health.as_ref().map_or(Duration::from_secs(10), |h| h.interval));
    rounds(gateway, name, shutdown, every, |b, pool, every| async move {
        let page = tokio::time::timeout(MODELS_TIMEOUT.min(every), fetch(&b, &pool.config, "/v1/models")).await;
        b.engine.set_models(page.ok().flatten().and_then(|p| crate::openai::model_ids(p.as_bytes(), MAX_MODELS)));
    })
    .await;
}

/// Every `every` of pool `name`'s current version (`None`: the pool no longer wants these reads),
/// `read` of each of its backends at once; until `shutdown` resolves or the pool is gone.
async fn rounds<F, R>(
    gateway: Arc<Gateway>,
    name: String,
    shutdown: impl Future<Output = ()>,
    every: impl Fn(&PoolConfig) -> Option<Duration>,
    read: F,
) where
    F: Fn(Arc<Backend>, Arc<Pool>, Duration) -> R,
    R: Future<Output = ()>,
{
    tokio::pin!(shutdown);
    loop {
        let Some(pool) = gateway.snapshot().pool(&name).cloned() else { return };
        let Some(interval) = every(&pool.config) else { return };
        let all = futures_util::future::join_all(pool.backends.iter().map(|b| read(b.clone(), pool.clone(), interval)));
        tokio::select! {
            _ = &mut shutdown => return,
            _ = all => {}
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One backend's page, read into its gauges when it reports the engine's queue.
async fn read_one(backend: &Backend, pool: &PoolConfig, cfg: &EngineConfig) {
    let limit = cfg.interval.min(Duration::from_secs(2));
    let Ok(Some(text)) = tokio::time::timeout(limit, fetch(backend, pool, &cfg.metrics_path)).await else {
        tracing::debug!(backend = %backend.addr, "engine metrics not read");
        return;
    };
    let load = crate::engine::read(&text, cfg.kind);
    if !load.is_empty() {
        backend.engine.set(&load, crate::clock::now_ms());
    }
}

/// `GET path` (see `upstream::get`); the page when the answer is 200.
async fn fetch(backend: &Backend, pool: &PoolConfig, path: &str) -> Option<String> {
    let resp = crate::upstream::get(backend, pool, path, "headroom-engine-metrics").await?;
    if resp.status() != http::StatusCode::OK {
        return None;
    }
    let body = Limited::new(resp.into_body(), MAX_PAGE).collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&body).into_owned())
}
