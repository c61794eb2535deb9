//! The autoscaler's provider calls, each in a task of its own: scaling up (call, then register
//! what came back), and releasing (deregister so the backend drains, wait for its last request,
//! then call the provider, retried with backoff). Each ends by sending a [`Done`] back to the
//! autoscaler, which books it.

use super::provider::{self, Action, HookRequest};
use crate::config::{BackendConfig, ProviderKind};
use crate::control::status::{BackendChange, ChangeError};
use crate::control::Control;
use crate::pool::BackendState;
use crate::telemetry;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often a removed backend is checked for its last request before `scale_down` is called.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Tries of a `scale_down` call before it is given up (the backend has left the pool already).
const RELEASE_TRIES: u32 = 5;

/// A provider call that finished.
pub(super) struct Done {
    pub action: Action,
    /// Backends the call was for (scale_up: how many were asked).
    pub count: u32,
    pub reason: String,
    pub started: Instant,
    /// Backends registered (scale_up, replace) or released (scale_down, replace).
    pub added: Vec<SocketAddr>,
    pub released: Vec<SocketAddr>,
    pub result: Result<(), String>,
}

/// Calls the provider for `req` with the pool's config as it is now.
async fn call(control: &Control, req: &HookRequest) -> Result<Vec<BackendConfig>, String> {
    let snap = control.snapshot();
    let pool = snap.pool(&req.pool).ok_or_else(|| format!("pool {:?} is gone", req.pool))?;
    let reply =
        provider::call(&pool.config, &snap.config.base_dir, &control.launched, req).await.map_err(|e| e.to_string())?;
    provider::reply_backends(&pool.config, &reply).map_err(|e| e.to_string())
}

/// Registers what a provider returned for `req`, in one publish: never more than the call asked
/// for, nor more than `max_backends` allows; the surplus is handed back with `scale_down`.
/// Backends the local provider started are not kept in the state file (they end with this
/// process).
async fn register(control: &Arc<Control>, req: &HookRequest, backends: Vec<BackendConfig>) -> Vec<SocketAddr> {
    let pool = req.pool.as_str();
    let (persist, room, before) = {
        let snap = control.snapshot();
        let p = snap.pool(pool);
        let auto = p.and_then(|p| p.config.autoscale.as_ref());
        let persist = !matches!(auto.map(|a| &a.provider.kind), Some(ProviderKind::Local));
        let present: HashSet<SocketAddr> = p.map(|p| p.backends.iter().map(|b| b.addr).collect()).unwrap_or_default();
        let serving = p.map_or(0, |p| p.backends.iter().filter(|b| b.state() != BackendState::Draining).count());
        let max = auto.map_or(0, |a| a.max_backends as usize);
        (persist, max.saturating_sub(serving), present)
    };
    let policy = control.addr_policy();
    let mut wanted = Vec::new();
    let mut surplus = Vec::new();
    for b in backends {
        if let Err(rule) = policy.check(b.addr) {
            telemetry::backend_addr_refused(pool, "provider", rule.as_str());
            let addr = b.addr;
            tracing::warn!(pool, backend = %addr, %rule, "a provider returned an address no backend may have; skipped");
        } else if before.contains(&b.addr) || wanted.iter().any(|w: &BackendConfig| w.addr == b.addr) {
            tracing::info!(pool, backend = %b.addr, "a provider returned a backend the pool already has");
        } else if wanted.len() < (req.count as usize).min(room) {
            wanted.push(b);
        } else {
            surplus.push(b.addr);
        }
    }
    if !surplus.is_empty() {
        tracing::warn!(
            pool,
            asked = req.count,
            room,
            surplus = surplus.len(),
            "a provider returned more backends than asked for or allowed; handing the surplus back"
        );
        let back = HookRequest {
            action: Action::ScaleDown,
            count: surplus.len() as u32,
            backends: surplus.iter().map(ToString::to_string).collect(),
            reason: "surplus: the provider returned more backends than asked for".into(),
            ..req.clone()
        };
        let control = control.clone();
        tokio::spawn(async move {
            if let Err(e) = call(&control, &back).await {
                tracing::warn!(pool = %back.pool, error = %e, "handing back surplus backends failed");
            }
        });
    }
    if wanted.is_empty() {
        return Vec::new();
    }
    let addrs: Vec<SocketAddr> = wanted.iter().map(|b| b.addr).collect();
    if let Err(e) = control.change_backend_shared(pool, BackendChange::AddMany { backends: wanted, persist }).await {
        tracing::warn!(pool, error = %e, "cannot register the new backends");
        return Vec::new();
    }
    let snap = control.snapshot();
    let now: HashSet<SocketAddr> =
        snap.pool(pool).map(|p| p.backends.iter().map(|b| b.addr).collect()).unwrap_or_default();
    addrs.into_iter().filter(|a| now.contains(a)).collect()
}

pub(super) async fn scale_up(control: Arc<Control>, req: HookRequest, done: mpsc::UnboundedSender<Done>) {
    let started = Instant::now();
    let (added, result) = match call(&control, &req).await {
        Ok(backends) => (register(&control, &req, backends).await, Ok(())),
        Err(e) => (Vec::new(), Err(e)),
    };
    let _ = done.send(Done {
        action: Action::ScaleUp,
        count: req.count,
        reason: req.reason,
        started,
        added,
        released: Vec::new(),
        result,
    });
}

/// Deregisters the backend (it drains), waits for its last request, then calls the provider.
pub(super) async fn release(
    control: Arc<Control>,
    addr: SocketAddr,
    req: HookRequest,
    done: mpsc::UnboundedSender<Done>,
) {
    let started = Instant::now();
    match control.change_backend_shared(&req.pool, BackendChange::Remove(addr)).await {
        Ok(()) | Err(ChangeError::NotFound(_) | ChangeError::Invalid(_)) => {}
        Err(ChangeError::Conflict(e) | ChangeError::Internal(e) | ChangeError::Unavailable(e)) => {
            let _ = done.send(Done {
                action: req.action,
                count: req.count,
                reason: req.reason,
                started,
                added: Vec::new(),
                released: vec![addr],
                result: Err(e),
            });
            return;
        }
    }
    while control.snapshot().pool(&req.pool).is_some_and(|p| p.backends.iter().any(|b| b.addr == addr)) {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let backoff = control
        .snapshot()
        .pool(&req.pool)
        .and_then(|p| p.config.autoscale.as_ref())
        .map_or(Duration::from_secs(1), |a| a.provider.retry_backoff);
    let mut result = Err(String::new());
    let mut added = Vec::new();
    for attempt in 0..RELEASE_TRIES {
        if attempt > 0 {
            tokio::time::sleep(backoff.saturating_mul(1 << (attempt - 1))).await;
        }
        match call(&control, &req).await {
            Ok(backends) => {
                added = register(&control, &req, backends).await;
                result = Ok(());
                break;
            }
            Err(e) => {
                tracing::warn!(pool = %req.pool, backend = %addr, attempt, error = %e, "provider call failed");
                result = Err(e);
            }
        }
    }
    let _ = done.send(Done {
        action: req.action,
        count: req.count,
        reason: req.reason,
        started,
        added,
        released: vec![addr],
        result,
    });
}
