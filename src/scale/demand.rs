//! A pool's demand as the autoscaler reads it (`autoscale.signal`): the queue and the requests in
//! flight, from headroom's own admission queue and counts (`gateway_queue`), from the engines'
//! own schedulers as `[pools.X.engine]` last read them (`engine_queue`), or both. With the
//! engines' figures, scaling follows load that never queues in headroom: other clients of the
//! same engines, or a `max_inflight_per_backend` set so high that every request is admitted at
//! once and waits inside the engine instead.

use crate::config::DemandSignal;
use crate::pool::{BackendState, Pool};

/// Requests waiting and requests being served, as the policy's `Observation` counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    pub queue: u32,
    pub inflight: u32,
}

/// The pool's demand at `now_ms` by `signal`. A backend without a fresh engine reading counts
/// headroom's own requests to it as running; draining backends are leaving and count for nothing.
/// With `engine_queue`, headroom's own queue still counts while no backend takes traffic, so a
/// pool can scale from zero.
pub fn read(pool: &Pool, signal: DemandSignal, now_ms: u64) -> Demand {
    let own_queue = pool.queue.depth() as u64;
    let stale_after = match (&pool.config.engine, signal) {
        (Some(e), DemandSignal::EngineQueue | DemandSignal::Both) => e.stale_after_ms(),
        _ => return Demand { queue: clamp(own_queue), inflight: clamp(pool.in_flight()) },
    };
    let (mut running, mut waiting, mut serving) = (0u64, 0u64, false);
    for b in pool.backends.iter().filter(|b| b.state() != BackendState::Draining) {
        serving |= b.is_serving();
        match b.engine.get(now_ms, stale_after) {
            Some(r) => {
                running += r.running.map_or(b.in_flight() as u64, u64::from);
                waiting += r.waiting.map_or(0, u64::from);
            }
            None => running += b.in_flight() as u64,
        }
    }
    let queue = match signal {
        DemandSignal::EngineQueue if serving => waiting,
        _ => waiting + own_queue,
    };
    Demand { queue: clamp(queue), inflight: clamp(running) }
}

fn clamp(n: u64) -> u32 {
    n.min(u32::MAX as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::engine::EngineLoad;
    use std::path::Path;

    fn pool() -> Pool {
        let text = "[pools.p]\n[pools.p.engine]\ninterval = \"1s\"\n\
                    [[pools.p.backends]]\naddr = \"127.0.0.1:9001\"\n[[pools.p.backends]]\naddr = \"127.0.0.1:9002\"\n\
                    [[pools.p.backends]]\naddr = \"127.0.0.1:9003\"\n";
        let config = Config::parse(text, Path::new(".")).unwrap();
        Pool::build(config.pools[0].clone(), &[], None)
    }

    fn load(running: f64, waiting: f64) -> EngineLoad {
        EngineLoad { running: Some(running), waiting: Some(waiting), ..EngineLoad::default() }
    }

    #[test]
    fn the_engine_signal_sums_the_engines_queues_and_falls_back_to_own_counts() {
        let p = pool();
        p.backends[0].engine.set(&load(2.0, 5.0), 1_000);
        p.backends[1].engine.set(&load(1.0, 3.0), 1_000);
        let _held = p.backends[2].try_acquire().unwrap(); // no reading: headroom's own request
        let engine = read(&p, DemandSignal::EngineQueue, 1_500);
        assert_eq!(engine, Demand { queue: 8, inflight: 4 });
        assert_eq!(read(&p, DemandSignal::GatewayQueue, 1_500), Demand { queue: 0, inflight: 1 });
        assert_eq!(read(&p, DemandSignal::Both, 1_500), Demand { queue: 8, inflight: 4 });
        // Three intervals later the readings are stale: headroom's own counts only.
        assert_eq!(read(&p, DemandSignal::EngineQueue, 4_001), Demand { queue: 0, inflight: 1 });
        p.backends[0].set_state(BackendState::Draining);
        assert_eq!(read(&p, DemandSignal::EngineQueue, 1_500), Demand { queue: 3, inflight: 2 }, "draining: leaving");
    }
}
