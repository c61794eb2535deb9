//! Reads what the backends' engines say about themselves, off the data path, one task per pool
//! and kind of read, all of a pool's backends at once, each read bounded in time and to 1 MiB:
//! - their metrics (`[pools.X.engine]`), once per `interval` (each within it, at most 2 s), into
//!   the backend's gauges (what `engine::read` finds). A read that fails leaves the last reading
//!   to go stale; it never changes a backend's state.
//! - their own `GET /v1/models` (`discover_models`), at the health checks' interval (10 s
//!   without them), for headroom's model list. A backend that does not answer lists none.

use crate::config::{EngineConfig, PoolConfig};
use crate::gateway::Gateway;
use crate::pool::Backend;
use http_body_util::{BodyExt, Limited};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The most of a metrics page read.
const MAX_PAGE: usize = 1 << 20;

/// Reads pool `name`'s engines until `shutdown` resolves, or the pool or its section is gone.
pub async fn run_pool(gateway: Arc<Gateway>, name: String, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let Some(pool) = gateway.snapshot().pool(&name).cloned() else { return };
        let Some(cfg) = pool.config.engine.clone() else { return };
        let reads = pool.backends.iter().map(|b| read_one(b, &pool.config, &cfg));
        let all = futures_util::future::join_all(reads);
        tokio::select! {
            _ = &mut shutdown => return,
            _ = all => {}
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
    }
}

/// The longest a backend's model list is waited for, and the most models kept from it.
const MODELS_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_MODELS: usize = 1024;

/// Asks pool `name`'s backends for their models until `shutdown` resolves, or the pool stops
/// discovering them.
pub async fn discover_pool(gateway: Arc<Gateway>, name: String, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let Some(pool) = gateway.snapshot().pool(&name).cloned() else { return };
        if !pool.config.discover_models {
            return;
        }
        let every = pool.config.health.as_ref().map_or(Duration::from_secs(10), |h| h.interval);
        let reads = pool.backends.iter().map(|b| async {
            let limit = MODELS_TIMEOUT.min(every);
            let page = tokio::time::timeout(limit, fetch(b, &pool.config, "/v1/models")).await.ok().flatten();
            b.engine.set_models(page.and_then(|p| crate::openai::model_ids(p.as_bytes(), MAX_MODELS)));
        });
        let all = futures_util::future::join_all(reads);
        tokio::select! {
            _ = &mut shutdown => return,
            _ = all => {}
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(every) => {}
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
