//! The scaling decision for one pool, as a pure function of what the pool looks like and when:
//! no I/O, no clock of its own, so every rule is unit-tested with made-up times.
//!
//! - Demand is in-flight plus queued requests; `desired = ceil(demand / target)` within
//!   `min_backends..=max_backends` (Knative's KPA, Ray Serve's target ongoing requests).
//! - Scale up when the queue stayed at or above `scale_up_queue_depth` for `scale_up_window`, at
//!   once when it reaches twice that (panic), or when requests wait and no backend exists (scale
//!   from zero). Backends still starting count as capacity, so a burst that is already being
//!   answered doesn't ask again.
//! - Scale down when the demand stayed below the ready capacity with an empty queue for
//!   `scale_down_window`; at most half the backends per step (or the last one, to reach zero).
//! - Above `max_backends` (a reload lowered it), the surplus goes at once.
//! - At most one action per direction per `cooldown`; a failed call waits an exponential
//!   backoff before the next try, and doesn't start the cooldown.

use crate::config::AutoscaleConfig;
use std::time::{Duration, Instant};

/// The longest wait between two failed calls (unless `retry_backoff` itself is longer).
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What the pool looks like now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observation {
    /// Backends taking requests.
    pub ready: u32,
    /// Asked for or registered, not yet healthy.
    pub starting: u32,
    /// Present but out of service (unhealthy, ejected): they count toward `max_backends`.
    pub unhealthy: u32,
    pub queue_depth: u32,
    pub inflight: u32,
}

impl Observation {
    /// `ceil(demand / target)`.
    pub fn by_utilisation(&self, target: u32) -> u32 {
        let demand = self.inflight as u64 + self.queue_depth as u64;
        demand.div_ceil(target.max(1) as u64).min(u32::MAX as u64) as u32
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Hold,
    Up { count: u32, reason: String },
    Down { count: u32, reason: String },
}

/// The memory the rules need between two observations.
#[derive(Debug, Default, Clone)]
pub struct Policy {
    queue_high_since: Option<Instant>,
    low_since: Option<Instant>,
    last_up: Option<Instant>,
    last_down: Option<Instant>,
    failures: u32,
    retry_at: Option<Instant>,
}

impl Policy {
    /// The backend count the pool aims for now (the `headroom_desired_backends` gauge).
    pub fn desired(cfg: &AutoscaleConfig, obs: &Observation) -> u32 {
        obs.by_utilisation(cfg.target_inflight_per_backend).clamp(cfg.min_backends, cfg.max_backends)
    }

    pub fn decide(&mut self, cfg: &AutoscaleConfig, obs: &Observation, now: Instant) -> Decision {
        let by_util = obs.by_utilisation(cfg.target_inflight_per_backend);
        let current = obs.ready + obs.starting;
        let present = current + obs.unhealthy;
        if obs.queue_depth >= cfg.scale_up_queue_depth {
            self.queue_high_since.get_or_insert(now);
        } else {
            self.queue_high_since = None;
        }
        if obs.queue_depth == 0 && by_util < obs.ready && obs.ready > cfg.min_backends {
            self.low_since.get_or_insert(now);
        } else {
            self.low_since = None;
        }
        if self.retry_at.is_some_and(|at| now < at) {
            return Decision::Hold;
        }
        let cooled = |last: Option<Instant>| last.is_none_or(|t| now.duration_since(t) >= cfg.cooldown);

        if present < cfg.min_backends {
            return Decision::Up { count: cfg.min_backends - present, reason: "below min_backends".into() };
        }

        let room = cfg.max_backends.saturating_sub(present);
        if room > 0 && cooled(self.last_up) {
            let why = if current == 0 && obs.queue_depth > 0 {
                Some(format!("{} requests wait and no backend is up (scale from zero)", obs.queue_depth))
            } else if obs.queue_depth >= cfg.scale_up_queue_depth.saturating_mul(2) {
                Some(format!("queue depth {} is at least twice the threshold", obs.queue_depth))
            } else if self.queue_high_since.is_some_and(|t| now.duration_since(t) >= cfg.scale_up_window) {
                Some(format!(
                    "queue depth {} stayed at or above {} for {:?}",
                    obs.queue_depth, cfg.scale_up_queue_depth, cfg.scale_up_window
                ))
            } else {
                None
            };
            if let Some(reason) = why {
                // With capacity on its way, ask only for what the demand needs beyond it.
                let floor = if obs.starting > 0 { current } else { current + 1 };
                let count = by_util.max(floor).saturating_sub(current).min(room);
                if count > 0 {
                    return Decision::Up { count, reason };
                }
            }
        }

        // Above the maximum (lowered by a reload): shed the surplus without waiting for a window.
        if obs.ready > cfg.max_backends && obs.starting == 0 && cooled(self.last_down) {
            let count = obs.ready - cfg.max_backends;
            return Decision::Down { count, reason: format!("{} ready backends, above max_backends", obs.ready) };
        }

        let calm = self.low_since.is_some_and(|t| now.duration_since(t) >= cfg.scale_down_window);
        if calm && obs.starting == 0 && cooled(self.last_down) && cooled(self.last_up) {
            // At most half per step, but always at least one (so one backend can go to zero).
            let keep = by_util.max(cfg.min_backends).max(obs.ready - (obs.ready / 2).max(1));
            let count = obs.ready.saturating_sub(keep);
            if count > 0 {
                let reason = format!(
                    "{} in flight needs {} of {} ready backends for {:?}",
                    obs.inflight, by_util, obs.ready, cfg.scale_down_window
                );
                return Decision::Down { count, reason };
            }
        }
        Decision::Hold
    }

    /// The decision was carried out (the call succeeded, or, for scale down, began).
    pub fn acted(&mut self, up: bool, now: Instant) {
        if up {
            self.last_up = Some(now);
        } else {
            self.last_down = Some(now);
        }
        self.failures = 0;
        self.retry_at = None;
    }

    /// How long ago the last scale up and scale down were carried out (what a next leader of a
    /// group carries over).
    pub fn since_last(&self, now: Instant) -> (Option<Duration>, Option<Duration>) {
        (
            self.last_up.map(|t| now.saturating_duration_since(t)),
            self.last_down.map(|t| now.saturating_duration_since(t)),
        )
    }

    /// Takes over the cooldowns of a previous leader: its last actions were `up_ago` and
    /// `down_ago` before `now`.
    pub fn carry_over(&mut self, up_ago: Option<Duration>, down_ago: Option<Duration>, now: Instant) {
        self.last_up = up_ago.and_then(|d| now.checked_sub(d)).or(self.last_up);
        self.last_down = down_ago.and_then(|d| now.checked_sub(d)).or(self.last_down);
    }

    /// A provider call failed: wait `backoff × 2^(failures - 1)` before the next one.
    pub fn failed(&mut self, backoff: Duration, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let wait = backoff.saturating_mul(1 << (self.failures - 1).min(16)).min(MAX_BACKOFF.max(backoff));
        self.retry_at = Some(now + wait);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ProviderConfig, ProviderKind};
    use proptest::prelude::*;

    fn cfg() -> AutoscaleConfig {
        AutoscaleConfig {
            min_backends: 1,
            max_backends: 4,
            target_inflight_per_backend: 2,
            scale_up_queue_depth: 4,
            scale_up_window: Duration::from_secs(5),
            scale_down_window: Duration::from_secs(60),
            cooldown: Duration::from_secs(30),
            provision_timeout: Duration::from_secs(600),
            replace_unhealthy_after: Duration::from_secs(60),
            signal: crate::config::DemandSignal::GatewayQueue,
            provider: ProviderConfig {
                kind: ProviderKind::Local,
                timeout: Duration::from_secs(30),
                retry_backoff: Duration::from_secs(1),
            },
        }
    }

    fn obs(ready: u32, starting: u32, queue_depth: u32, inflight: u32) -> Observation {
        Observation { ready, starting, unhealthy: 0, queue_depth, inflight }
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn a_cooldown_carried_over_to_a_new_leader_holds_it_back() {
        let (c, t0) = (cfg(), Instant::now() + Duration::from_secs(100));
        let mut old = Policy::default();
        old.acted(true, t0);
        let (up, down) = old.since_last(secs(t0, 10));
        assert_eq!((up, down), (Some(Duration::from_secs(10)), None));
        let mut new = Policy::default();
        new.carry_over(up, down, secs(t0, 10));
        // Twice the threshold would scale at once, but the previous leader scaled 10 s ago.
        assert_eq!(new.decide(&c, &obs(1, 0, 8, 2), secs(t0, 10)), Decision::Hold);
        assert!(matches!(new.decide(&c, &obs(1, 0, 8, 2), secs(t0, 30)), Decision::Up { .. }));
    }

    #[test]
    fn a_queue_that_stays_high_for_the_window_scales_up_to_the_demand() {
        let (c, t0, mut p) = (cfg(), Instant::now(), Policy::default());
        let o = obs(1, 0, 4, 2);
        assert_eq!(p.decide(&c, &o, t0), Decision::Hold);
        assert_eq!(p.decide(&c, &o, secs(t0, 4)), Decision::Hold);
        match p.decide(&c, &o, secs(t0, 5)) {
            Decision::Up { count, .. } => assert_eq!(count, 2, "6 requests / 2 per backend = 3 backends"),
            d => panic!("{d:?}"),
        }
        // A dip below the threshold restarts the window.
        let mut p = Policy::default();
        p.decide(&c, &o, t0);
        p.decide(&c, &obs(1, 0, 3, 2), secs(t0, 3));
        assert_eq!(p.decide(&c, &o, secs(t0, 6)), Decision::Hold);
    }

    #[test]
    fn twice_the_threshold_acts_at_once_and_starting_backends_count() {
        let (c, t0, mut p) = (cfg(), Instant::now(), Policy::default());
        assert!(matches!(p.decide(&c, &obs(1, 0, 8, 2), t0), Decision::Up { count: 3, .. }));
        // Capacity for the demand is on its way: nothing more to ask, even after the cooldown.
        p.acted(true, t0);
        assert_eq!(p.decide(&c, &obs(1, 3, 8, 2), secs(t0, 40)), Decision::Hold);
    }

    #[test]
    fn never_above_max_and_one_action_per_cooldown() {
        let (c, t0, mut p) = (cfg(), Instant::now(), Policy::default());
        assert!(matches!(p.decide(&c, &obs(3, 0, 40, 6), t0), Decision::Up { count: 1, .. }));
        p.acted(true, t0);
        assert_eq!(p.decide(&c, &obs(4, 0, 40, 8), secs(t0, 100)), Decision::Hold, "at max");
        let mut p = Policy::default();
        p.acted(true, t0);
        assert_eq!(p.decide(&c, &obs(2, 0, 40, 4), secs(t0, 29)), Decision::Hold, "cooling down");
        assert!(matches!(p.decide(&c, &obs(2, 0, 40, 4), secs(t0, 30)), Decision::Up { .. }));
    }

    #[test]
    fn scale_from_zero_and_up_to_min() {
        let mut c = cfg();
        c.min_backends = 0;
        let (t0, mut p) = (Instant::now(), Policy::default());
        assert_eq!(p.decide(&c, &obs(0, 0, 0, 0), t0), Decision::Hold, "nothing waits: stay at zero");
        assert!(matches!(p.decide(&c, &obs(0, 0, 1, 0), t0), Decision::Up { count: 1, .. }));
        c.min_backends = 2;
        assert!(matches!(Policy::default().decide(&c, &obs(0, 0, 0, 0), t0), Decision::Up { count: 2, .. }));
    }

    #[test]
    fn scale_down_after_the_window_at_most_halving() {
        let (c, t0, mut p) = (cfg(), Instant::now(), Policy::default());
        let idle = obs(4, 0, 0, 0);
        assert_eq!(p.decide(&c, &idle, t0), Decision::Hold);
        assert_eq!(p.decide(&c, &idle, secs(t0, 59)), Decision::Hold);
        assert!(matches!(p.decide(&c, &idle, secs(t0, 60)), Decision::Down { count: 2, .. }));
        p.acted(false, secs(t0, 60));
        assert_eq!(p.decide(&c, &obs(2, 0, 0, 0), secs(t0, 70)), Decision::Hold, "cooling down");
        assert!(matches!(p.decide(&c, &obs(2, 0, 0, 0), secs(t0, 90)), Decision::Down { count: 1, .. }));
        // Busy enough backends are kept.
        let mut p = Policy::default();
        p.decide(&c, &obs(4, 0, 0, 5), t0);
        assert!(matches!(p.decide(&c, &obs(4, 0, 0, 5), secs(t0, 60)), Decision::Down { count: 1, .. }));
    }

    #[test]
    fn a_lowered_maximum_sheds_the_surplus_at_once() {
        let (c, t0, mut p) = (cfg(), Instant::now(), Policy::default());
        assert!(matches!(p.decide(&c, &obs(6, 0, 0, 12), t0), Decision::Down { count: 2, .. }));
    }

    #[test]
    fn failures_back_off_exponentially() {
        let (c, t0, mut p) = (cfg(), Instant::now(), Policy::default());
        let o = obs(1, 0, 9, 2);
        assert!(matches!(p.decide(&c, &o, t0), Decision::Up { .. }));
        assert_eq!(p.failed(Duration::from_secs(1), t0), Duration::from_secs(1));
        assert_eq!(p.decide(&c, &o, t0 + Duration::from_millis(999)), Decision::Hold);
        assert!(matches!(p.decide(&c, &o, secs(t0, 1)), Decision::Up { .. }), "no cooldown after a failure");
        assert_eq!(p.failed(Duration::from_secs(1), secs(t0, 1)), Duration::from_secs(2));
        assert_eq!(p.failed(Duration::from_secs(1), secs(t0, 3)), Duration::from_secs(4));
        for _ in 0..20 {
            p.failed(Duration::from_secs(1), t0);
        }
        assert_eq!(p.failed(Duration::from_secs(1), t0), MAX_BACKOFF);
    }

    proptest! {
        /// Whatever the pool looks like, a decision never leaves min..=max and never removes
        /// more than half.
        #[test]
        fn decisions_stay_within_bounds(
            min in 0u32..4, extra in 0u32..6, ready in 0u32..12, starting in 0u32..4, unhealthy in 0u32..3,
            queue in 0u32..50, inflight in 0u32..50, target in 1u32..8, steps in proptest::collection::vec(0u64..200, 1..8),
        ) {
            let mut c = cfg();
            c.min_backends = min;
            c.max_backends = (min + extra).max(1);
            c.target_inflight_per_backend = target;
            let o = Observation { ready, starting, unhealthy, queue_depth: queue, inflight };
            let (t0, mut p) = (Instant::now(), Policy::default());
            let mut t = t0;
            for s in steps {
                t += Duration::from_secs(s);
                match p.decide(&c, &o, t) {
                    Decision::Up { count, .. } => {
                        prop_assert!(count > 0);
                        let present = ready + starting + unhealthy;
                        prop_assert!(present + count <= c.max_backends.max(c.min_backends));
                    }
                    Decision::Down { count, .. } => {
                        prop_assert!(count > 0 && starting == 0);
                        prop_assert!(ready - count >= c.min_backends);
                        if ready > c.max_backends {
                            prop_assert_eq!(ready - count, c.max_backends, "sheds exactly the surplus");
                        } else {
                            prop_assert!(queue == 0);
                            prop_assert!(count <= (ready / 2).max(1));
                        }
                    }
                    Decision::Hold => {}
                }
            }
        }
    }
}
