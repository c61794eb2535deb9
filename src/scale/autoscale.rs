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

use super::calls::{self, Done};
use super::events::ScaleEvent;
use super::policy::{Decision, Observation, Policy};
use super::provider::{Action, Current, HookRequest};
use crate::config::AutoscaleConfig;
use crate::control::{Control, Group, ScaleMemory};
use crate::pool::{Backend, BackendState, Pool};
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

/// What watching a dynamic backend found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Not healthy within `provision_timeout`: released.
    GiveUp,
    /// Bad for `replace_unhealthy_after`: released and replaced.
    Replace,
}

/// A dynamic backend the autoscaler watches.
struct Tracked {
    /// When it was asked for (or first seen, for one registered by someone else).
    since: Instant,
    /// Asked for by this autoscaler: its time to healthy is a provision time.
    asked: bool,
    healthy_seen: bool,
    bad_since: Option<Instant>,
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
    /// Backends asked for by calls still running (scale_up and replace), and since when.
    asking: u32,
    asking_since: Option<Instant>,
    /// In a group of replicas: whether this replica ran the pool's autoscaler at the last look
    /// (only the group's leader does; the others publish their demand).
    leading: bool,
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
            asking_since: None,
            leading: false,
            awaiting: Vec::new(),
            calls: tokio::task::JoinSet::new(),
        }
    }

    /// One look at the pool; false when the pool no longer autoscales.
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
        let group = self.control.group().cloned();
        if let Some(g) = &group {
            if g.leads() && !self.leading {
                self.take_over(&**g, &cfg, now);
            }
            self.leading = g.leads();
        }
        let (mut obs, verdicts) = self.observe(&pool, &cfg, &file, now);
        if let Some(g) = &group {
            // The group scales on the sum of every replica's demand, by its leader alone.
            let (queue, inflight) = g.demand(&self.name, obs.queue_depth, obs.inflight);
            if !self.leading {
                return true;
            }
            obs.queue_depth = obs.queue_depth.saturating_add(queue);
            obs.inflight = obs.inflight.saturating_add(inflight);
        }
        telemetry::desired_backends(&pool.config.name, Policy::desired(&cfg, &obs));
        for (addr, verdict) in verdicts {
            let (action, reason) = match verdict {
                Verdict::GiveUp => {
                    (Action::ScaleDown, format!("not healthy within provision_timeout ({:?})", cfg.provision_timeout))
                }
                Verdict::Replace => {
                    self.ask(1, now);
                    let after = cfg.replace_unhealthy_after;
                    (Action::Replace, format!("unhealthy for {after:?} (replace_unhealthy_after)"))
                }
            };
            self.release(&pool, action, addr, reason, obs, done);
        }
        self.act(&pool, &cfg, &file, obs, now, done);
        true
    }

    fn ask(&mut self, n: u32, now: Instant) {
        if self.asking == 0 {
            self.asking_since = Some(now);
        }
        self.asking = self.asking.saturating_add(n);
        self.remember(now);
    }

    /// This replica was elected to lead its group: takes over the previous leader's cooldowns,
    /// and counts the backends it had asked for as on their way (until `provision_timeout`).
    fn take_over(&mut self, group: &dyn Group, cfg: &AutoscaleConfig, now: Instant) {
        let Some(m) = group.scale_memory(&self.name) else { return };
        let unix = crate::clock::unix_now();
        let ago = |t: Option<f64>| t.and_then(|t| Duration::try_from_secs_f64((unix - t).max(0.0)).ok());
        self.policy.carry_over(ago(m.last_up), ago(m.last_down), now);
        let since = ago(m.asking_since).and_then(|d| now.checked_sub(d));
        if let Some(since) = since.filter(|s| m.asking > 0 && now.duration_since(*s) < cfg.provision_timeout) {
            self.awaiting.push((since, m.asking));
        }
        tracing::info!(pool = %self.name, carried = ?m, "leading the group's autoscaler for this pool");
    }

    /// Records, for a leader after this one, what it must carry over.
    fn remember(&self, now: Instant) {
        let Some(g) = self.control.group().filter(|_| self.leading) else { return };
        let unix = crate::clock::unix_now();
        let at = |ago: Option<Duration>| ago.map(|d| unix - d.as_secs_f64());
        let (up, down) = self.policy.since_last(now);
        g.record_scale(
            &self.name,
            ScaleMemory {
                last_up: at(up),
                last_down: at(down),
                asking: self.asking,
                asking_since: at(self.asking_since.map(|s| now.saturating_duration_since(s))),
            },
        );
    }

    /// Counts the pool's backends by state (what the policy sees) and judges each dynamic one.
    fn observe(
        &mut self,
        pool: &Pool,
        cfg: &AutoscaleConfig,
        file: &HashSet<SocketAddr>,
        now: Instant,
    ) -> (Observation, Vec<(SocketAddr, Verdict)>) {
        let demand = super::demand::read(pool, cfg.signal, crate::clock::now_ms());
        let mut obs = Observation { queue_depth: demand.queue, inflight: demand.inflight, ..Default::default() };
        let mut verdicts = Vec::new();
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
            if !file.contains(&b.addr) {
                if let Some(v) = self.judge(pool, b, state, cfg, now) {
                    verdicts.push((b.addr, v));
                }
            }
        }
        obs.starting += self.asking + self.awaiting.iter().map(|(_, n)| n).sum::<u32>();
        (obs, verdicts)
    }

    /// Watches one dynamic backend: given up when not healthy within `provision_timeout`,
    /// replaced when bad (by health checks or ejection, or by every response failing) for
    /// `replace_unhealthy_after`.
    fn judge(
        &mut self,
        pool: &Pool,
        b: &Backend,
        state: BackendState,
        cfg: &AutoscaleConfig,
        now: Instant,
    ) -> Option<Verdict> {
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
                return Some(Verdict::GiveUp);
            }
            return None;
        }
        let failing = b.failing_for_ms().map_or(Duration::ZERO, Duration::from_millis);
        let bad_for = if matches!(state, BackendState::Unhealthy | BackendState::Ejected) {
            now.duration_since(*t.bad_since.get_or_insert(now))
        } else {
            t.bad_since = None;
            Duration::ZERO
        };
        (bad_for.max(failing) >= cfg.replace_unhealthy_after).then_some(Verdict::Replace)
    }

    /// Carries out what the policy decides for this look.
    fn act(
        &mut self,
        pool: &Pool,
        cfg: &AutoscaleConfig,
        file: &HashSet<SocketAddr>,
        obs: Observation,
        now: Instant,
        done: &mpsc::UnboundedSender<Done>,
    ) {
        match self.policy.decide(cfg, &obs, now) {
            Decision::Hold => {}
            Decision::Up { count, reason } => {
                tracing::info!(pool = %pool.config.name, count, %reason, "scaling up");
                self.ask(count, now);
                let req = self.request(Action::ScaleUp, count, vec![], obs, reason);
                self.calls.spawn(calls::scale_up(self.control.clone(), req, done.clone()));
            }
            Decision::Down { count, reason } => {
                let victims = self.victims(pool, file, count);
                if !victims.is_empty() {
                    tracing::info!(pool = %pool.config.name, count = victims.len(), %reason, "scaling down");
                    self.policy.acted(false, now);
                    self.remember(now);
                }
                for addr in victims {
                    self.release(pool, Action::ScaleDown, addr, reason.clone(), obs, done);
                }
            }
        }
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
        self.calls.spawn(calls::release(self.control.clone(), addr, req, done.clone()));
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
            if self.asking == 0 {
                self.asking_since = None;
            }
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
        self.remember(now);
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
