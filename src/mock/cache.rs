//! The mock engine's prefix cache: an LRU of the full prompt blocks it has prefilled, keyed by the
//! same chained block hashes headroom routes by (`prompt::key_of`), as vLLM's automatic prefix
//! caching keys its KV blocks. A prompt's hit is its longest run of leading blocks still cached;
//! its blocks are then (re)inserted as the newest, its head newer than its tail.

// The mock engine is a test and demo tool, never on headroom's data path.
#![allow(clippy::disallowed_types)]

use crate::prompt::PromptKey;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

pub struct PrefixCache {
    capacity: usize,
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    /// Each cached block and the stamp of its latest use.
    stamps: HashMap<u64, u64>,
    /// Uses in order; entries whose stamp is no longer the block's are stale.
    order: VecDeque<(u64, u64)>,
    next: u64,
}

impl PrefixCache {
    /// A cache of `capacity` blocks (0: no cache, every prompt is prefilled in full).
    pub fn new(capacity: usize) -> Self {
        PrefixCache { capacity, inner: Mutex::new(Lru::default()) }
    }

    /// How many of `key`'s leading full blocks were cached; then caches all of them.
    pub fn lookup_and_insert(&self, key: &PromptKey) -> usize {
        if self.capacity == 0 {
            return 0;
        }
        let Ok(mut lru) = self.inner.lock() else { return 0 };
        let blocks = &key.blocks[..key.full];
        let hit = blocks.iter().take_while(|h| lru.stamps.contains_key(h)).count();
        // Last block first, as vLLM frees a request's blocks: a prompt's tail is evicted before
        // its head, so a shared prefix outlives the questions that follow it.
        for &h in blocks.iter().rev() {
            lru.touch(h);
        }
        lru.evict_to(self.capacity);
        hit
    }

    /// Blocks cached now.
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |l| l.stamps.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Lru {
    fn touch(&mut self, h: u64) {
        self.next += 1;
        self.stamps.insert(h, self.next);
        self.order.push_back((h, self.next));
    }

    fn evict_to(&mut self, capacity: usize) {
        while self.stamps.len() > capacity {
            let Some((h, stamp)) = self.order.pop_front() else { break };
            if self.stamps.get(&h) == Some(&stamp) {
                self.stamps.remove(&h);
            }
        }
        // Stale entries pile up behind blocks used again and again: drop them now and then.
        if self.order.len() > 4 * capacity.max(16) {
            let stamps = &self.stamps;
            self.order.retain(|(h, s)| stamps.get(h) == Some(s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(blocks: &[u64]) -> PromptKey {
        PromptKey { blocks: blocks.to_vec(), full: blocks.len(), bytes: blocks.len() * 256 }
    }

    #[test]
    fn a_prompt_hits_on_its_leading_cached_blocks_and_the_oldest_are_evicted() {
        let c = PrefixCache::new(4);
        assert_eq!(c.lookup_and_insert(&key(&[1, 2, 3])), 0);
        assert_eq!(c.lookup_and_insert(&key(&[1, 2, 9])), 2, "the first two blocks were cached");
        assert_eq!(c.len(), 4);
        assert_eq!(c.lookup_and_insert(&key(&[7, 8])), 0);
        assert_eq!(c.len(), 4, "bounded");
        assert_eq!(c.lookup_and_insert(&key(&[1, 2])), 2, "the tails 3 and 9 went first");
        // A long prompt's tail goes before its head.
        let c = PrefixCache::new(4);
        c.lookup_and_insert(&key(&[1, 2, 3, 4]));
        c.lookup_and_insert(&key(&[9]));
        assert_eq!(c.lookup_and_insert(&key(&[1, 2, 3, 4])), 3, "only the last block was evicted");
        let c = PrefixCache::new(8);
        let partial = PromptKey { blocks: vec![7, 8, 50], full: 2, bytes: 600 };
        c.lookup_and_insert(&partial);
        assert_eq!(c.len(), 2, "a partial last block is never cached");
        assert_eq!(c.lookup_and_insert(&partial), 2);
        assert!(!c.is_empty());
        assert_eq!(PrefixCache::new(0).lookup_and_insert(&key(&[1])), 0, "no cache");
    }
}
