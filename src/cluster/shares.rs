//! Capacity shared, not multiplied: in a group, a backend's `max_inflight` is a budget for all the
//! replicas together. The leader weighs the live replicas by the demand they publish and writes
//! the weights of each autoscaled or not pool (`shares/<pool>`) when they change enough to
//! matter; every replica splits each backend's capacity by those weights the same way ([`split`]:
//! the shares sum to the capacity) and keeps its own part. A replica lowers its shares at once and
//! raises them only two exchange periods after it saw the new weights, by which time the others
//! have lowered theirs.

use super::Cluster;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The leader's weights for one pool: replica name → weight (its demand, at least 1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Weights {
    pub weights: BTreeMap<String, u64>,
}

/// Splits `capacity` over `weights` (in name order): each replica gets 1 first while capacity
/// lasts, starting from the one at `first` (so backends of small capacity, each split from
/// another `first`, spread over the replicas); the rest goes by weight (largest remainder, ties
/// in the same order). The parts sum to `capacity` exactly.
pub fn split(capacity: u32, weights: &[u64], first: usize) -> Vec<u32> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let mut parts = vec![0u32; n];
    let floor = (capacity as usize).min(n);
    for k in 0..floor {
        parts[(first + k) % n] = 1;
    }
    let rest = (capacity as u64).saturating_sub(floor as u64);
    let total: u128 = weights.iter().map(|&w| w.max(1) as u128).sum();
    let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(n);
    let mut given = 0u64;
    for (i, &w) in weights.iter().enumerate() {
        let exact = rest as u128 * w.max(1) as u128;
        let whole = (exact / total) as u64;
        parts[i] = parts[i].saturating_add(whole as u32);
        given += whole;
        remainders.push((exact % total, i));
    }
    // Largest remainders first; among equal ones, in order from `first`.
    let order = |i: usize| (i + n - first % n) % n;
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(order(a.1).cmp(&order(b.1))));
    for &(_, i) in remainders.iter().take(rest.saturating_sub(given) as usize) {
        parts[i] = parts[i].saturating_add(1);
    }
    parts
}

/// Where a backend's split starts: from its address, so every replica, whatever order it holds
/// its backends in, splits it the same way (FNV-1a).
fn start(addr: &str) -> usize {
    addr.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)) as usize
}

/// Whether `new` differs from `old` enough to publish: another set of replicas, or a replica
/// whose fraction moved by more than a tenth.
pub(super) fn worth_publishing(old: &Weights, new: &Weights) -> bool {
    if old.weights.keys().ne(new.weights.keys()) {
        return true;
    }
    let sum = |w: &Weights| w.weights.values().map(|&v| v.max(1) as f64).sum::<f64>();
    let (so, sn) = (sum(old), sum(new));
    old.weights
        .iter()
        .zip(new.weights.values())
        .any(|((_, &o), &n)| ((o.max(1) as f64 / so) - (n.max(1) as f64 / sn)).abs() > 0.1)
}

/// What a replica has applied of the leader's weights, per pool.
#[derive(Default)]
pub(super) struct Applied {
    /// The weights seen last, and when they were first seen.
    seen: BTreeMap<String, (Weights, Instant)>,
}

impl Applied {
    /// Applies `weights` of each pool to this replica's backends: lower shares now, higher ones
    /// once the weights are `settle` old.
    pub(super) fn apply(&mut self, c: &Cluster, published: BTreeMap<String, Weights>, settle: Duration, now: Instant) {
        let snap = c.control.snapshot();
        for pool in &snap.pools {
            let name = &pool.config.name;
            let Some(w) = published.get(name) else {
                continue;
            };
            let seen = self.seen.entry(name.clone()).or_insert_with(|| (w.clone(), now));
            if seen.0 != *w {
                *seen = (w.clone(), now);
            }
            let settled = now.duration_since(seen.1) >= settle;
            let names: Vec<&String> = w.weights.keys().collect();
            let Some(me) = names.iter().position(|n| **n == c.cfg.name) else {
                // Not among the weights yet (just joined): the leader adds it at its next look.
                continue;
            };
            let values: Vec<u64> = w.weights.values().copied().collect();
            let mut raised = false;
            for b in pool.backends.iter() {
                let mine = split(b.max_inflight(), &values, start(&b.label))[me];
                let now_share = b.share().unwrap_or(u32::MAX);
                if mine <= now_share || settled {
                    raised |= mine > now_share;
                    b.set_share(Some(mine));
                }
            }
            // Capacity that appears without a request ending wakes nobody by itself.
            if raised {
                for _ in 0..pool.free_slots().min(pool.queue.depth()) {
                    pool.queue.wake_one();
                }
            }
        }
    }
}

/// The weights the leader publishes for `pool`: every live member, weighed by its demand
/// (queued + in flight, at least 1).
pub(super) fn weigh(members: &[String], demand: &BTreeMap<String, (u32, u32)>) -> Weights {
    let weights = members
        .iter()
        .map(|m| {
            let (q, i) = demand.get(m).copied().unwrap_or((0, 0));
            (m.clone(), (q as u64 + i as u64).max(1))
        })
        .collect();
    Weights { weights }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn capacity_goes_by_demand_after_one_each() {
        assert_eq!(split(10, &[80, 15, 5], 0), vec![7, 2, 1]);
        assert_eq!(split(10, &[1, 1, 1], 0), vec![4, 3, 3]);
        assert_eq!(split(2, &[5, 5, 5], 0), vec![1, 1, 0]);
        assert_eq!(split(0, &[5], 0), vec![0]);
        assert!(split(7, &[], 3).is_empty());
        // Backends of capacity 1, split from successive starts, go to each replica in turn.
        assert_eq!((0..3).map(|i| split(1, &[4, 4, 4], i)).collect::<Vec<_>>(), [[1, 0, 0], [0, 1, 0], [0, 0, 1]]);
        assert_eq!(split(10, &[1, 1, 1], 1), vec![3, 4, 3]);
    }

    #[test]
    fn small_moves_are_not_published_but_a_new_member_is() {
        let w = |v: &[(&str, u64)]| Weights { weights: v.iter().map(|(n, x)| (n.to_string(), *x)).collect() };
        assert!(!worth_publishing(&w(&[("a", 10), ("b", 10)]), &w(&[("a", 11), ("b", 10)])));
        assert!(worth_publishing(&w(&[("a", 10), ("b", 10)]), &w(&[("a", 30), ("b", 10)])));
        assert!(worth_publishing(&w(&[("a", 10)]), &w(&[("a", 10), ("b", 1)])));
    }

    proptest! {
        #[test]
        fn the_parts_always_sum_to_the_capacity(
            capacity in 0u32..100_000,
            weights in proptest::collection::vec(0u64..u64::MAX, 0..12),
            first in 0usize..100,
        ) {
            let parts = split(capacity, &weights, first);
            prop_assert_eq!(parts.len(), weights.len());
            if !weights.is_empty() {
                prop_assert_eq!(parts.iter().map(|&p| p as u64).sum::<u64>(), capacity as u64);
                if capacity as usize >= weights.len() {
                    prop_assert!(parts.iter().all(|&p| p >= 1));
                }
            }
        }
    }
}
