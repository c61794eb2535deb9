//! The autoscaler of one pool: a task that looks at the pool a few times a second, lets
//! [`Policy`] decide, and carries decisions out through the pool's provider and the
//! registration path the admin API uses (`Control::change_backend`).
//!
//! It also watches the backends it is responsible for (every backend not written in the config
//! file): one not healthy within `provision_timeout` is given up, one unhealthy for
//! `replace_unhealthy_after` is replaced. Releasing always drains first: the provider hears
//! `scale_down` only once the backend's last request has finished.
//!
//! Runs off the data path: it reads atomics and snapshots, never holds anything a request waits
//! for. Provider calls run in their own tasks, so a slow provider never stalls the watching.

use super::events::ScaleEvent;
use super::policy::{Decision, Observation, Policy};
use super::provider::{self, Action, Current, HookRequest};
use crate::config::ProviderKind;
use crate::control::status::{BackendChange, ChangeError};
use crate::control::Control;
use crate::pool::{BackendState, Pool};
use crate::telemetry;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// How often the pool is looked at: a tenth of the shortest window, within these bounds.
const MIN_TICK: Duration = Duration::from_millis(20);
const MAX_TICK: Duration = Duration::from_millis(250);

/// How often a removed backend is checked for its last request before `scale_down` is called.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Tries of a `scale_down` call before it is given up (the backend has left the pool already).
const RELEASE_TRIES: u32 = 5;

/// A dynamic backend the autoscaler watches.
struct Tracked {
    /// When it was asked for (or first seen, for one registered by someone else).
    since: Instant,
    /// Asked for by this autoscaler: its time to healthy is a provision time.
    asked: bool,
    healthy_seen: bool,
    bad_since: Option<Instant>,
}

/// A provider call that finished.
struct Done {
    action: Action,
    /// Backends the call was for (scale_up: how many were asked).
    count: u32,
    reason: String,
    started: Instant,
    /// Backends registered (scale_up, replace) or released (scale_down, replace).
    added: Vec<SocketAddr>,
    released: Vec<SocketAddr>,
    result: Result<(), String>,
}

/// Runs the autoscaler of pool `name` until `shutdown` resolves, or the pool or its
/// `[autoscale]` section is gone.
pub async fn run_pool(control: Arc<Control>, name: String, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    telemetry::init_scale_counters(&name);
    let mut scaler = Scaler::new(control, name);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    loop {
        let tick = {
            let snap = scaler.control.snapshot();
            let Some(cfg) = snap.pool(&scaler.name).and_then(|p| p.config.autoscale.clone()) else { break };
            (cfg.scale_up_window.min(cfg.replace_unhealthy_after) / 10).clamp(MIN_TICK, MAX_TICK)
        };
        tokio::select! {
            _ = &mut shutdown => break,
            Some(done) = done_rx.recv() => scaler.finished(done),
            _ = tokio::time::sleep(tick) => {
                if !scaler.step(&done_tx) {
                    break;
                }
            }
        }
    }
    tracing::debug!(pool = %scaler.name, "autoscaler stopped");
}

struct Scaler {
    control: Arc<Control>,
    name: String,
    policy: Policy,
    tracked: HashMap<SocketAddr, Tracked>,
    /// Backends being drained for release, or replaced.
    releasing: HashSet<SocketAddr>,
    /// Backends asked for by calls still running (scale_up and replace).
    asking: u32,
    /// Backends a provider said would register themselves: (asked at, how many).
    awaiting: Vec<(Instant, u32)>,
    /// Provider calls (and drains before them) running; aborted when the autoscaler stops.
    calls: tokio::task::JoinSet<()>,
}

impl Scaler {
    fn new(control: Arc<Control>, name: String) -> Self {
        Scaler {
            control,
            name,
            policy: Policy::default(),
            tracked: HashMap::new(),
            releasing: HashSet::new(),
            asking: 0,
            awaiting: Vec::new(),
            calls: tokio::task::JoinSet::new(),
        }
    }

    /// One look at the pool; false when the pool no longer autoscales.
    #[allow(clippy::too_many_lines)] // longer than 80 lines: to be split
    fn step(&mut self, done: &mpsc::UnboundedSender<Done>) -> bool {
        while self.calls.try_join_next().is_some() {}
        let snap = self.control.snapshot();
        let Some(pool) = snap.pool(&self.name).cloned() else { return false };
        let Some(cfg) = pool.config.autoscale.clone() else { return false };
        let now = Instant::now();
        let file: HashSet<SocketAddr> = pool.config.backends.iter().map(|b| b.addr).collect();

        self.awaiting.retain(|(at, n)| {
            let keep = now.duration_since(*at) < cfg.provision_timeout;
            if !keep {
                tracing::warn!(pool = %pool.config.name, missing = n, "backends a provider announced never registered");
            }
            keep
        });
        self.tracked.retain(|addr, _| pool.backends.iter().any(|b| b.addr == *addr));

        let mut obs = Observation {
            queue_depth: pool.queue.depth() as u32,
            inflight: pool.in_flight() as u32,
            ..Default::default()
        };
        let mut give_up = Vec::new();
        let mut replace = Vec::new();
        for b in &pool.backends {
            let state = b.state();
            if state == BackendState::Draining || self.releasing.contains(&b.addr) {
                continue;
            }
            match state {
                BackendState::Healthy => obs.ready += 1,
                BackendState::Starting => obs.starting += 1,
                _ => obs.unhealthy += 1,
            }
            if file.contains(&b.addr) {
                continue;
            }
            let awaiting = &mut self.awaiting;
            let t = self.tracked.entry(b.addr).or_insert_with(|| {
                // Registered by someone else: perhaps one a provider announced.
                let announced = awaiting.first_mut().map(|(at, n)| {
                    *n -= 1;
                    *at
                });
                awaiting.retain(|(_, n)| *n > 0);
                Tracked {
                    since: announced.unwrap_or(now),
                    asked: announced.is_some(),
                    healthy_seen: false,
                    bad_since: None,
                }
            });
            if !t.healthy_seen {
                if state == BackendState::Healthy {
                    t.healthy_seen = true;
                    if t.asked {
                        telemetry::provisioned(&pool.config.name, now.duration_since(t.since).as_secs_f64());
                    }
                } else if now.duration_since(t.since) >= cfg.provision_timeout {
                    give_up.push(b.addr);
                }
                continue;
            }
            // Bad by the health checks or ejection, or by every response failing (passive
            // signals alone, for pools without [health]).
            let failing = b.failing_for_ms().map_or(Duration::ZERO, Duration::from_millis);
            let bad_for = if matches!(state, BackendState::Unhealthy | BackendState::Ejected) {
                now.duration_since(*t.bad_since.get_or_insert(now))
            } else {
                t.bad_since = None;
                Duration::ZERO
            };
            if bad_for.max(failing) >= cfg.replace_unhealthy_after {
                replace.push(b.addr);
            }
        }
        obs.starting += self.asking + self.awaiting.iter().map(|(_, n)| n).sum::<u32>();
        telemetry::desired_backends(&pool.config.name, Policy::desired(&cfg, &obs));

        for addr in give_up {
            let reason = format!("not healthy within provision_timeout ({:?})", cfg.provision_timeout);
            self.release(&pool, Action::ScaleDown, addr, reason, obs, done);
        }
        for addr in replace {
            let reason = format!("unhealthy for {:?} (replace_unhealthy_after)", cfg.replace_unhealthy_after);
            self.asking += 1;
            self.release(&pool, Action::Replace, addr, reason, obs, done);
        }

        match self.policy.decide(&cfg, &obs, now) {
            Decision::Hold => {}
            Decision::Up { count, reason } => {
                tracing::info!(pool = %pool.config.name, count, %reason, "scaling up");
                self.asking += count;
                let req = self.request(Action::ScaleUp, count, vec![], obs, reason);
                self.calls.spawn(scale_up(self.control.clone(), req, done.clone()));
            }
            Decision::Down { count, reason } => {
                let victims = self.victims(&pool, &file, count);
                if !victims.is_empty() {
                    tracing::info!(pool = %pool.config.name, count = victims.len(), %reason, "scaling down");
                    self.policy.acted(false, now);
                }
                for addr in victims {
                    self.release(&pool, Action::ScaleDown, addr, reason.clone(), obs, done);
                }
            }
        }
        true
    }

    /// The least useful backends to release: only dynamic ones; not yet healthy first, then the
    /// least busy, then the newest.
    fn victims(&self, pool: &Pool, file: &HashSet<SocketAddr>, count: u32) -> Vec<SocketAddr> {
        let mut candidates: Vec<_> = pool
            .backends
            .iter()
            .filter(|b| !file.contains(&b.addr) && !self.releasing.contains(&b.addr))
            .filter(|b| b.state() != BackendState::Draining)
            .map(|b| {
                let since = self.tracked.get(&b.addr).map(|t| t.since);
                (b.state() == BackendState::Healthy, b.in_flight(), std::cmp::Reverse(since), b.addr)
            })
            .collect();
        candidates.sort();
        candidates.into_iter().take(count as usize).map(|c| c.3).collect()
    }

    fn request(
        &self,
        action: Action,
        count: u32,
        backends: Vec<String>,
        obs: Observation,
        reason: String,
    ) -> HookRequest {
        HookRequest {
            action,
            pool: self.name.clone(),
            count,
            backends,
            current: Current {
                ready: obs.ready,
                starting: obs.starting,
                queue_depth: obs.queue_depth,
                inflight: obs.inflight,
            },
            reason,
        }
    }

    /// Drains `addr` out of the pool, then tells the provider (`scale_down`, or `replace` which
    /// also asks for a new one).
    fn release(
        &mut self,
        pool: &Pool,
        action: Action,
        addr: SocketAddr,
        reason: String,
        obs: Observation,
        done: &mpsc::UnboundedSender<Done>,
    ) {
        if !self.releasing.insert(addr) {
            return;
        }
        tracing::info!(pool = %pool.config.name, backend = %addr, action = action.as_str(), %reason, "releasing backend");
        let req = self.request(action, 1, vec![addr.to_string()], obs, reason);
        self.calls.spawn(release(self.control.clone(), addr, req, done.clone()));
    }

    /// Books a finished call: policy, counters, metrics and the event log.
    fn finished(&mut self, done: Done) {
        let now = Instant::now();
        let snap = self.control.snapshot();
        let backoff = snap
            .pool(&self.name)
            .and_then(|p| p.config.autoscale.as_ref())
            .map_or(Duration::from_secs(1), |a| a.provider.retry_backoff);
        if matches!(done.action, Action::ScaleUp | Action::Replace) {
            self.asking = self.asking.saturating_sub(done.count);
        }
        for addr in &done.released {
            self.releasing.remove(addr);
            self.tracked.remove(addr);
        }
        for addr in &done.added {
            // A look at the pool may have come between registration and this message.
            let t = self.tracked.entry(*addr).or_insert(Tracked {
                since: done.started,
                asked: true,
                healthy_seen: false,
                bad_since: None,
            });
            if !t.asked {
                (t.asked, t.since) = (true, done.started);
                if t.healthy_seen {
                    telemetry::provisioned(&self.name, now.duration_since(done.started).as_secs_f64());
                }
            }
        }
        match &done.result {
            Ok(()) => {
                if done.action == Action::ScaleUp {
                    self.policy.acted(true, done.started);
                    let missing = done.count.saturating_sub(done.added.len() as u32);
                    if done.added.is_empty() && missing > 0 {
                        self.awaiting.push((done.started, missing));
                    }
                }
                tracing::info!(pool = %self.name, action = done.action.as_str(), added = ?done.added, released = ?done.released, "provider call done");
            }
            Err(e) => {
                if done.action == Action::ScaleUp {
                    let wait = self.policy.failed(backoff, now);
                    tracing::warn!(pool = %self.name, error = %e, retry_in = ?wait, "scale up failed");
                } else {
                    tracing::warn!(pool = %self.name, action = done.action.as_str(), error = %e, "provider call failed");
                }
            }
        }
        let outcome = if done.result.is_ok() { "ok" } else { "error" };
        telemetry::scale_event(&self.name, done.action.as_str(), outcome);
        let backends = done.added.iter().chain(&done.released).map(ToString::to_string).collect();
        self.control.scale_events.record(
            &self.name,
            ScaleEvent {
                time: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
                action: done.action.as_str(),
                count: done.count,
                backends,
                reason: done.reason,
                outcome,
                error: done.result.err(),
                duration_ms: now.duration_since(done.started).as_millis() as u64,
            },
        );
    }
}

/// Calls the provider for `req` with the pool's config as it is now.
async fn call(control: &Control, req: &HookRequest) -> Result<Vec<crate::config::BackendConfig>, String> {
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
async fn register(
    control: &Arc<Control>,
    req: &HookRequest,
    backends: Vec<crate::config::BackendConfig>,
) -> Vec<SocketAddr> {
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
        } else if before.contains(&b.addr) || wanted.iter().any(|w: &crate::config::BackendConfig| w.addr == b.addr) {
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
    if let Err(e) = control.change_backend(pool, BackendChange::AddMany { backends: wanted, persist }).await {
        tracing::warn!(pool, error = %e, "cannot register the new backends");
        return Vec::new();
    }
    let snap = control.snapshot();
    let now: HashSet<SocketAddr> =
        snap.pool(pool).map(|p| p.backends.iter().map(|b| b.addr).collect()).unwrap_or_default();
    addrs.into_iter().filter(|a| now.contains(a)).collect()
}

async fn scale_up(control: Arc<Control>, req: HookRequest, done: mpsc::UnboundedSender<Done>) {
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
async fn release(control: Arc<Control>, addr: SocketAddr, req: HookRequest, done: mpsc::UnboundedSender<Done>) {
    let started = Instant::now();
    match control.change_backend(&req.pool, BackendChange::Remove(addr)).await {
        Ok(()) | Err(ChangeError::NotFound(_) | ChangeError::Invalid(_)) => {}
        Err(ChangeError::Conflict(e) | ChangeError::Internal(e)) => {
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
