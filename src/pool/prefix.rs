//! Prefix-cache-aware picking (`balance = "prefix"`): where each prompt's blocks were sent, and
//! which backend a new prompt should go to.
//!
//! [`PrefixIndex`] is an approximate, bounded, lock-free map from block hashes to the backends
//! that were sent them: a 4-way set-associative table of `index_blocks` 8-byte slots (tag,
//! backend, the backend's cache epoch, age), replacing the oldest slot of a set. Races between
//! writers lose an entry now and then, never corrupt one: each slot is one atomic word. An entry
//! stops counting when its backend leaves the pool, stops taking traffic, or forgets its cache
//! (a restart or a failed health check bumps the epoch: no sweep needed).
//!
//! [`pick`]: the backend holding the longest prefix of the prompt, among those whose load is
//! within `balance_threshold` of the least loaded and that hold at least `min_match` of it. A
//! prompt no such backend holds goes to the one with the fewest blocks in the index among those
//! balanced ones (SGLang's "smallest tree": new prompts fill the emptiest cache, so prompts end up
//! partitioned evenly); when every backend is too loaded for that, to the least loaded. A session key (`affinity_header`) goes first to its
//! rendezvous-hash backend while that one's load stays within `hash_balance_factor` of the average
//! (consistent hashing with bounded loads).

use super::{Backend, Pool};
use crate::config::PrefixConfig;
use crate::prompt::PromptKey;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

const WAYS: usize = 4;
const TAG_BITS: u32 = 24;
const ID_BITS: u32 = 24;
const ID_MASK: u32 = (1 << ID_BITS) - 1;
/// Footprint counters per index (backend ids share one past this many: the rule only loses some
/// precision).
const FOOTPRINTS: usize = 4096;

/// What a request brings for the picker to keep it near its cache.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hint<'a> {
    pub prompt: Option<&'a PromptKey>,
    /// The hash of the session header's value.
    pub session: Option<u64>,
}

/// Where prompts' blocks were sent (see the module docs).
pub struct PrefixIndex {
    sets: Box<[[AtomicU64; WAYS]]>,
    /// Slots held per backend cache id (modulo [`FOOTPRINTS`]): how much the index believes each
    /// backend's cache holds.
    footprints: Box<[AtomicU32]>,
    /// A coarse clock for the age of slots: one tick per recorded prompt.
    tick: AtomicU32,
}

/// One slot: tag (24 bits) | backend cache id (24) | epoch (8) | age (8); 0 is empty.
fn slot(tag: u32, id: u32, epoch: u32, age: u32) -> u64 {
    (u64::from(tag) << 40) | (u64::from(id & ID_MASK) << 16) | (u64::from(epoch & 0xff) << 8) | u64::from(age & 0xff)
}

impl PrefixIndex {
    /// A table of about `blocks` slots (a power of two number of sets).
    pub fn new(blocks: usize) -> Self {
        let sets = (blocks / WAYS).max(1).next_power_of_two();
        PrefixIndex {
            sets: (0..sets).map(|_| Default::default()).collect(),
            footprints: (0..FOOTPRINTS).map(|_| AtomicU32::new(0)).collect(),
            tick: AtomicU32::new(0),
        }
    }

    /// The slots it has room for.
    pub fn capacity(&self) -> usize {
        self.sets.len() * WAYS
    }

    fn place(&self, hash: u64) -> (&[AtomicU64; WAYS], u32) {
        let set = &self.sets[(hash as usize) & (self.sets.len() - 1)];
        (set, (hash >> (64 - TAG_BITS)) as u32)
    }

    /// Records that the blocks of `key` were sent to `backend`.
    pub fn record(&self, key: &PromptKey, backend: &Backend) {
        let (id, epoch) = backend.engine.cache_identity();
        let age = self.tick.fetch_add(1, Ordering::Relaxed) & 0xff;
        for &h in &key.blocks {
            let (set, tag) = self.place(h);
            let mine = slot(tag, id, epoch, age);
            let mut victim = 0;
            let mut oldest = 0;
            for (w, s) in set.iter().enumerate() {
                let v = s.load(Ordering::Relaxed);
                if v == 0 || (v >> 40) as u32 == tag && ((v >> 16) as u32 & ID_MASK) == id {
                    victim = w;
                    break;
                }
                let since = age.wrapping_sub(v as u32 & 0xff) & 0xff;
                if since >= oldest {
                    (victim, oldest) = (w, since);
                }
            }
            let old = set[victim].swap(mine, Ordering::Relaxed);
            let old_id = (old >> 16) as u32 & ID_MASK;
            if old == 0 || (old >> 40) as u32 != tag || old_id != id {
                self.footprint_of(id).fetch_add(1, Ordering::Relaxed);
                if old != 0 {
                    let less = |n: u32| n.checked_sub(1);
                    let _ = self.footprint_of(old_id).fetch_update(Ordering::Relaxed, Ordering::Relaxed, less);
                }
            }
        }
    }

    fn footprint_of(&self, id: u32) -> &AtomicU32 {
        &self.footprints[id as usize % FOOTPRINTS]
    }

    /// The slots the index holds for `backend` (its cache's size, as far as the index knows).
    pub fn footprint(&self, backend: &Backend) -> u32 {
        self.footprint_of(backend.engine.cache_identity().0).load(Ordering::Relaxed)
    }

    /// Calls `found(id, epoch)` for every backend recorded with block `hash`.
    fn holders(&self, hash: u64, mut found: impl FnMut(u32, u32)) {
        let (set, tag) = self.place(hash);
        for s in set {
            let v = s.load(Ordering::Relaxed);
            if v != 0 && (v >> 40) as u32 == tag {
                found((v >> 16) as u32 & ID_MASK, (v >> 8) as u32 & 0xff);
            }
        }
    }
}

/// A prefix pool's routing state: the index (shared by every version of the pool, so it survives
/// reloads and backend changes) and the backends' positions by cache id.
pub struct Routing {
    pub index: Arc<PrefixIndex>,
    positions: HashMap<u32, usize>,
    pub config: PrefixConfig,
}

impl Routing {
    /// For `backends`, keeping `previous`'s index when it has the same size.
    pub fn new(config: &PrefixConfig, backends: &[Arc<Backend>], previous: Option<&Routing>) -> Self {
        let index = match previous {
            Some(p) if p.config.index_blocks == config.index_blocks => p.index.clone(),
            _ => Arc::new(PrefixIndex::new(config.index_blocks)),
        };
        let positions = backends.iter().enumerate().map(|(i, b)| (b.engine.cache_identity().0, i)).collect();
        Routing { index, positions, config: config.clone() }
    }
}

/// The backends holding the longest prefixes of `key`: (position, blocks held), at most 8, the
/// longest first found. Entries of another epoch, or of a backend not in the pool, do not count.
fn matches(pool: &Pool, routing: &Routing, key: &PromptKey) -> ([(usize, usize); 8], usize) {
    let mut found = [(0usize, 0usize); 8];
    let mut n = 0;
    // From the last block back: the first time a backend shows up is its longest prefix.
    for (i, &h) in key.blocks.iter().enumerate().rev() {
        routing.index.holders(h, |id, epoch| {
            let Some(&pos) = routing.positions.get(&id) else { return };
            if pool.backends[pos].engine.cache_identity().1 & 0xff != epoch || found[..n].iter().any(|f| f.0 == pos) {
                return;
            }
            if n < found.len() {
                found[n] = (pos, i + 1);
                n += 1;
            }
        });
        if n == found.len() {
            break;
        }
    }
    (found, n)
}

/// The load the balance rule compares, for an eligible backend: its engine's requests (running
/// and waiting, every client's), or headroom's own when that is more or there is no fresh reading.
fn load(b: &Backend, stale_after_ms: u64, now_ms: u64) -> Option<u64> {
    let (in_flight_plus_one, _) = b.load_score()?;
    Some(b.engine.whole_load(in_flight_plus_one - 1, now_ms, stale_after_ms))
}

/// The backend for a request with `hint` (see the module docs), or `None` to let the pool's
/// least-load picker choose (no prompt key, or no eligible backend).
pub fn pick(pool: &Pool, routing: &Routing, hint: &Hint, exclude: &impl Fn(usize) -> bool) -> Option<usize> {
    let now = crate::clock::now_ms();
    let stale = pool.config.engine.as_ref().map_or(0, crate::config::EngineConfig::stale_after_ms);
    let loads = || {
        pool.backends
            .iter()
            .enumerate()
            .filter(|(i, _)| !exclude(*i))
            .filter_map(|(i, b)| Some((i, load(b, stale, now)?)))
    };
    if let Some(session) = hint.session {
        if let Some(i) = bounded_rendezvous(pool, session, routing.config.hash_balance_factor, &loads) {
            return Some(i);
        }
    }
    let key = hint.prompt.filter(|k| !k.blocks.is_empty())?;
    let least = loads().map(|(_, l)| l).min()?;
    let limit = least.saturating_add(u64::from(routing.config.balance_threshold));
    let (found, n) = matches(pool, routing, key);
    let need = ((routing.config.min_match * key.blocks.len() as f64).ceil() as usize).max(1);
    let holder = found[..n]
        .iter()
        .filter(|(pos, held)| *held >= need && !exclude(*pos))
        .filter_map(|&(pos, held)| Some((pos, held, load(&pool.backends[pos], stale, now)?)))
        .filter(|&(_, _, l)| l <= limit)
        .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)))
        .map(|(pos, _, _)| pos);
    // Nobody balanced holds it: the emptiest cache among the balanced backends takes it.
    holder.or_else(|| {
        loads()
            .filter(|&(_, l)| l <= limit)
            .min_by_key(|&(i, l)| (routing.index.footprint(&pool.backends[i]), l))
            .map(|(i, _)| i)
    })
}

/// The session's highest-ranked backend (rendezvous hashing over addresses) among those whose
/// load is within `factor` of the average (Mirrokni et al.'s bound, HAProxy's
/// `hash-balance-factor`).
fn bounded_rendezvous<I: Iterator<Item = (usize, u64)>>(
    pool: &Pool,
    session: u64,
    factor: f64,
    loads: &impl Fn() -> I,
) -> Option<usize> {
    let (count, total) = loads().fold((0u64, 0u64), |(c, t), (_, l)| (c + 1, t + l));
    if count == 0 {
        return None;
    }
    let cap = ((total + 1) as f64 * factor / count as f64).ceil() as u64;
    loads().filter(|&(_, l)| l < cap.max(1)).max_by_key(|&(i, _)| rank(session, &pool.backends[i])).map(|(i, _)| i)
}

/// A backend's rank for a session: a hash of both (the same on every replica and reload).
fn rank(session: u64, b: &Backend) -> u64 {
    let addr = match b.addr {
        std::net::SocketAddr::V4(a) => (u64::from(a.ip().to_bits()) << 16) | u64::from(a.port()),
        std::net::SocketAddr::V6(a) => {
            (a.ip().to_bits() as u64) ^ ((a.ip().to_bits() >> 64) as u64) ^ u64::from(a.port())
        }
    };
    let mut h = session ^ addr.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests;
