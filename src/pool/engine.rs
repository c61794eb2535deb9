//! A backend's engine as last read: its load from its metrics (`[pools.X.engine]`), plain
//! atomics written by the scraper off the data path and read by the picker and the API (a
//! reading older than three intervals counts as none, so a backend whose metrics stop answering
//! falls back to headroom's own counts and is never ejected for it); and the models its own
//! `GET /v1/models` lists (`discover_models`), for headroom's model list.

use crate::engine::EngineLoad;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Stands for "not reported" in a gauge.
const UNKNOWN: u32 = u32::MAX;

#[derive(Debug)]
pub struct EngineGauges {
    running: AtomicU32,
    waiting: AtomicU32,
    /// KV-cache usage and prefix-cache hit rate, in thousandths.
    kv_permille: AtomicU32,
    hit_permille: AtomicU32,
    /// When the last reading arrived (`now_ms`); 0: never.
    read_at_ms: AtomicU64,
    /// The models the backend listed when last asked (`discover_models`).
    models: arc_swap::ArcSwapOption<Vec<String>>,
    /// This backend's name in the prefix index (never reused while the process runs, up to 2^24).
    cache_id: u32,
    /// Bumped when the engine forgets its cache (a restart, a failed health check): index
    /// entries of an older epoch stop counting.
    cache_epoch: AtomicU32,
    /// The engine's prefix-cache query counter when last read: it only drops when the engine
    /// restarted.
    cache_queries: AtomicU64,
}

static CACHE_IDS: AtomicU32 = AtomicU32::new(1);

impl Default for EngineGauges {
    fn default() -> Self {
        EngineGauges {
            running: AtomicU32::new(UNKNOWN),
            waiting: AtomicU32::new(UNKNOWN),
            kv_permille: AtomicU32::new(UNKNOWN),
            hit_permille: AtomicU32::new(UNKNOWN),
            read_at_ms: AtomicU64::new(0),
            models: arc_swap::ArcSwapOption::empty(),
            // Never 0: an empty index slot is all zeros.
            cache_id: (CACHE_IDS.fetch_add(1, Ordering::Relaxed) % ((1 << 24) - 1)) + 1,
            cache_epoch: AtomicU32::new(0),
            cache_queries: AtomicU64::new(0),
        }
    }
}

/// A reading, as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineReading {
    pub running: Option<u32>,
    pub waiting: Option<u32>,
    pub kv_usage: Option<f64>,
    pub hit_rate: Option<f64>,
    /// How old it is.
    pub age_ms: u64,
}

impl EngineGauges {
    /// How old the last reading is, unless there is none or it is older than `stale_after_ms`.
    #[inline]
    fn age(&self, now_ms: u64, stale_after_ms: u64) -> Option<u64> {
        let at = self.read_at_ms.load(Ordering::Relaxed);
        let age_ms = now_ms.saturating_sub(at);
        (at != 0 && age_ms <= stale_after_ms).then_some(age_ms)
    }

    /// The backend's name in the prefix index and its cache's epoch.
    #[inline]
    pub fn cache_identity(&self) -> (u32, u32) {
        (self.cache_id, self.cache_epoch.load(Ordering::Relaxed))
    }

    /// The engine lost its cache (it restarted, or failed a health check): what the prefix index
    /// says it holds stops counting.
    pub fn forget_cache(&self) {
        self.cache_epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// Records what a scrape read at `now_ms`; a prefix-cache query counter lower than the last
    /// one means the engine restarted, and its cache is forgotten.
    pub fn set(&self, load: &EngineLoad, now_ms: u64) {
        if let Some(q) = load.prefix_queries.filter(|q| q.is_finite() && *q >= 0.0) {
            let q = q.min(u64::MAX as f64) as u64;
            if q < self.cache_queries.swap(q, Ordering::Relaxed) {
                self.forget_cache();
            }
        }
        let count = |v: Option<f64>| v.map_or(UNKNOWN, |v| v.min(f64::from(UNKNOWN - 1)) as u32);
        let ratio = |v: Option<f64>| v.map_or(UNKNOWN, |v| (v.clamp(0.0, 1.0) * 1000.0).round() as u32);
        self.running.store(count(load.running), Ordering::Relaxed);
        self.waiting.store(count(load.waiting), Ordering::Relaxed);
        self.kv_permille.store(ratio(load.kv_usage), Ordering::Relaxed);
        self.hit_permille.store(ratio(load.hit_rate), Ordering::Relaxed);
        self.read_at_ms.store(now_ms.max(1), Ordering::Relaxed);
    }

    /// What the engine's reading adds to a backend's load for `balance = "least_load"`: its
    /// waiting requests, plus up to 10 more as its KV cache fills past 90% (one per point);
    /// nothing without a fresh reading. A handful of relaxed loads.
    #[inline]
    pub fn extra_load(&self, now_ms: u64, stale_after_ms: u64) -> u64 {
        if self.age(now_ms, stale_after_ms).is_none() {
            return 0;
        }
        let waiting = match self.waiting.load(Ordering::Relaxed) {
            UNKNOWN => 0,
            w => u64::from(w),
        };
        waiting + self.kv_pressure()
    }

    /// One request's worth of load per point of KV-cache usage past 90% (up to 10).
    #[inline]
    fn kv_pressure(&self) -> u64 {
        match self.kv_permille.load(Ordering::Relaxed) {
            kv if kv != UNKNOWN && kv > 900 => u64::from((kv - 900) / 10),
            _ => 0,
        }
    }

    /// A backend's whole load as a prefix pool weighs it: the engine's own count of requests
    /// (running and waiting: headroom's and every other client's) when fresh, but never less
    /// than `in_flight`, headroom's own count right now (the reading may be a moment old); plus
    /// the KV pressure past 90%, as in [`EngineGauges::extra_load`].
    #[inline]
    pub fn whole_load(&self, in_flight: u64, now_ms: u64, stale_after_ms: u64) -> u64 {
        if self.age(now_ms, stale_after_ms).is_none() {
            return in_flight;
        }
        let count = |v: u32| if v == UNKNOWN { 0 } else { u64::from(v) };
        let engine = count(self.running.load(Ordering::Relaxed)) + count(self.waiting.load(Ordering::Relaxed));
        in_flight.max(engine) + self.kv_pressure()
    }

    /// Records the models the backend lists (`None`: it could not be asked).
    pub fn set_models(&self, models: Option<Vec<String>>) {
        self.models.store(models.map(std::sync::Arc::new));
    }

    /// The models the backend listed when last asked.
    pub fn models(&self) -> Option<std::sync::Arc<Vec<String>>> {
        self.models.load_full()
    }

    /// The last reading, unless there is none or it is older than `stale_after_ms`.
    pub fn get(&self, now_ms: u64, stale_after_ms: u64) -> Option<EngineReading> {
        let age_ms = self.age(now_ms, stale_after_ms)?;
        let known = |v: u32| (v != UNKNOWN).then_some(v);
        let ratio = |v: u32| known(v).map(|p| f64::from(p) / 1000.0);
        Some(EngineReading {
            running: known(self.running.load(Ordering::Relaxed)),
            waiting: known(self.waiting.load(Ordering::Relaxed)),
            kv_usage: ratio(self.kv_permille.load(Ordering::Relaxed)),
            hit_rate: ratio(self.hit_permille.load(Ordering::Relaxed)),
            age_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_is_kept_until_it_is_stale_and_unreported_values_stay_unknown() {
        let g = EngineGauges::default();
        assert_eq!(g.get(1_000, 3_000), None, "never read");
        let load =
            EngineLoad { running: Some(3.0), waiting: Some(7.0), kv_usage: Some(0.4567), ..EngineLoad::default() };
        g.set(&load, 1_000);
        let r = g.get(2_000, 3_000).expect("fresh");
        assert_eq!((r.running, r.waiting, r.hit_rate, r.age_ms), (Some(3), Some(7), None, 1_000));
        assert_eq!(r.kv_usage, Some(0.457));
        assert_eq!(g.get(4_001, 3_000), None, "stale after three intervals");
        g.set(&EngineLoad { waiting: Some(1e30), ..EngineLoad::default() }, 5_000);
        assert_eq!(g.get(5_000, 3_000).unwrap().waiting, Some(UNKNOWN - 1), "huge values saturate");
    }

    #[test]
    fn the_extra_load_is_the_engines_queue_and_kv_pressure_while_fresh() {
        let g = EngineGauges::default();
        assert_eq!(g.extra_load(1_000, 3_000), 0, "no reading: nothing added");
        g.set(&EngineLoad { waiting: Some(5.0), kv_usage: Some(0.95), ..EngineLoad::default() }, 1_000);
        assert_eq!(g.extra_load(2_000, 3_000), 5 + 5);
        assert_eq!(g.extra_load(4_001, 3_000), 0, "stale: headroom's own count only");
        g.set(&EngineLoad { running: Some(1.0), ..EngineLoad::default() }, 5_000);
        assert_eq!(g.extra_load(5_000, 3_000), 0, "no queue reported");
    }
}
