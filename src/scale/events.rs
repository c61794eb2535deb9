//! The last scale events of each pool (`GET /api/pools/{pool}/events`): a fixed-size ring per
//! pool, so memory stays bounded however long headroom runs.
//!
//! Written by the autoscaler and read by the admin API, both off the data path; the lock here is
//! never taken by a request.

// Off the data path (see above).
#![allow(clippy::disallowed_types)]

use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Events kept per pool.
pub const KEPT: usize = 100;

/// One provider call (or a decision that needed none) and how it ended.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleEvent {
    /// Unix seconds.
    pub time: f64,
    /// `scale_up`, `scale_down` or `replace`.
    pub action: &'static str,
    pub count: u32,
    /// Backends added (scale_up, replace) or released (scale_down, and the one replaced).
    pub backends: Vec<String>,
    pub reason: String,
    /// `ok` or `error`.
    pub outcome: &'static str,
    pub error: Option<String>,
    /// How long the provider call took.
    pub duration_ms: u64,
}

#[derive(Default)]
pub struct EventLog {
    pools: Mutex<HashMap<String, VecDeque<ScaleEvent>>>,
}

impl EventLog {
    pub fn record(&self, pool: &str, event: ScaleEvent) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let ring = pools.entry(pool.to_string()).or_default();
        if ring.len() == KEPT {
            ring.pop_front();
        }
        ring.push_back(event);
    }

    /// Oldest first.
    pub fn of(&self, pool: &str) -> Vec<ScaleEvent> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.get(pool).map(|r| r.iter().cloned().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_hundred() {
        let log = EventLog::default();
        for i in 0..250 {
            log.record(
                "p",
                ScaleEvent {
                    time: i as f64,
                    action: "scale_up",
                    count: 1,
                    backends: vec![],
                    reason: String::new(),
                    outcome: "ok",
                    error: None,
                    duration_ms: 0,
                },
            );
        }
        let kept = log.of("p");
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0].time, 150.0);
        assert_eq!(kept[KEPT - 1].time, 249.0);
        assert!(log.of("other").is_empty());
    }
}
