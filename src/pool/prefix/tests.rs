use super::*;
use crate::config::Config;
use crate::engine::EngineLoad;
use crate::pool::BackendState;
use std::path::Path;

fn pool(n: usize, prefix: &str) -> Pool {
    let mut text =
        format!("[pools.p]\nbalance = \"prefix\"\nmax_inflight_per_backend = 100\n[pools.p.prefix]\n{prefix}\n");
    for i in 0..n {
        text.push_str(&format!("[[pools.p.backends]]\naddr = \"127.0.0.1:{}\"\n", 9001 + i));
    }
    Pool::build(Config::parse(&text, Path::new(".")).unwrap().pools[0].clone(), &[], None)
}

fn key(blocks: std::ops::Range<u64>) -> PromptKey {
    let blocks: Vec<u64> = blocks.map(|b| b.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1).collect();
    PromptKey { full: blocks.len(), bytes: blocks.len() * 256, blocks }
}

fn hint(k: &PromptKey) -> Hint<'_> {
    Hint { prompt: Some(k), session: None }
}

const NONE: fn(usize) -> bool = |_| false;

#[test]
fn a_prompt_goes_where_its_longest_prefix_went() {
    let p = pool(4, "");
    let r = p.prefix.as_ref().unwrap();
    r.index.record(&key(0..10), &p.backends[1]);
    r.index.record(&key(0..4), &p.backends[2]);
    assert_eq!(pick(&p, r, &hint(&key(0..12)), &NONE), Some(1), "10 blocks held beat 4");
    assert_eq!(pick(&p, r, &hint(&key(0..4)), &NONE).map(|i| i == 1 || i == 2), Some(true));
    let new = pick(&p, r, &hint(&key(100..110)), &NONE);
    assert!(matches!(new, Some(0 | 3)), "nobody holds it: an empty cache takes it, not {new:?}");
    assert_eq!(pick(&p, r, &Hint::default(), &NONE), None, "no key: the least-load picker's turn");
    assert_eq!(pick(&p, r, &hint(&key(0..12)), &|i| i == 1), Some(2), "failover: not that one again");
}

#[test]
fn a_holder_loaded_past_the_threshold_is_passed_over() {
    let p = pool(3, "balance_threshold = 2");
    let r = p.prefix.as_ref().unwrap();
    r.index.record(&key(0..8), &p.backends[0]);
    let held: Vec<_> = (0..3).map(|_| p.backends[0].try_acquire().unwrap()).collect();
    assert_ne!(pick(&p, r, &hint(&key(0..8)), &NONE), Some(0), "3 in flight against 0: too far from the least loaded");
    drop(held.into_iter().next());
    assert_eq!(pick(&p, r, &hint(&key(0..8)), &NONE), Some(0), "2 against 0: within the threshold");
}

#[test]
fn the_engines_own_queue_counts_as_load() {
    let p = pool(
        2,
        "balance_threshold = 2
[pools.p.engine]
interval = \"1s\"",
    );
    let r = p.prefix.as_ref().unwrap();
    r.index.record(&key(0..8), &p.backends[0]);
    let waiting = EngineLoad { running: Some(4.0), waiting: Some(3.0), ..EngineLoad::default() };
    p.backends[0].engine.set(&waiting, crate::clock::now_ms());
    assert_eq!(pick(&p, r, &hint(&key(0..8)), &NONE), Some(1), "three waiting in the engine: too loaded");
}

#[test]
fn a_small_match_does_not_pin_a_prompt() {
    let p = pool(2, "min_match = 0.5");
    let r = p.prefix.as_ref().unwrap();
    r.index.record(&key(0..3), &p.backends[0]);
    assert_eq!(pick(&p, r, &hint(&key(0..10)), &NONE), Some(1), "3 of 10 blocks is below min_match");
    assert_eq!(pick(&p, r, &hint(&key(0..6)), &NONE), Some(0), "3 of 6 is enough");
}

#[test]
fn entries_stop_counting_when_the_backend_forgets_its_cache_or_stops_serving() {
    let p = pool(2, "");
    let r = p.prefix.as_ref().unwrap();
    r.index.record(&key(0..8), &p.backends[0]);
    p.backends[0].set_state(BackendState::Draining);
    assert_eq!(pick(&p, r, &hint(&key(0..8)), &NONE), Some(1), "a draining backend takes nothing new");
    p.backends[0].set_state(BackendState::Healthy);
    assert_eq!(pick(&p, r, &hint(&key(0..8)), &NONE), Some(0));
    // The engine restarted: its prefix-cache query counter went down.
    let load = |q: f64| EngineLoad { running: Some(0.0), prefix_queries: Some(q), ..EngineLoad::default() };
    p.backends[0].engine.set(&load(500.0), 1_000);
    assert_eq!(pick(&p, r, &hint(&key(0..8)), &NONE), Some(0), "counters that grow change nothing");
    p.backends[0].engine.set(&load(20.0), 2_000);
    // Both caches look empty to the index now: the less loaded (a tie: the first) takes it.
    let _busy = p.backends[0].try_acquire().unwrap();
    assert_eq!(pick(&p, r, &hint(&key(0..8)), &NONE), Some(1), "a restart forgets the cache");
    // A backend removed from the pool: the new pool does not know its id.
    r.index.record(&key(0..8), &p.backends[1]);
    let text = "[pools.p]\nbalance = \"prefix\"\n[[pools.p.backends]]\naddr = \"127.0.0.1:9001\"\n";
    let smaller = Pool::build(Config::parse(text, Path::new(".")).unwrap().pools[0].clone(), &[], Some(&p));
    let r2 = smaller.prefix.as_ref().unwrap();
    assert!(Arc::ptr_eq(&r.index, &r2.index), "the index survives the pool's rebuild");
    assert_eq!(pick(&smaller, r2, &hint(&key(0..8)), &NONE), Some(0), "the removed backend's entries do not count");
}

#[test]
fn the_index_stays_within_its_size_and_keeps_the_newest_entries() {
    let index = PrefixIndex::new(1024);
    assert_eq!(index.capacity(), 1024);
    let p = pool(1, "");
    for k in 0..100u64 {
        index.record(&key(k * 1000..k * 1000 + 64), &p.backends[0]);
    }
    let newest = key(99_000..99_064);
    let mut held = 0;
    for &h in &newest.blocks {
        index.holders(h, |_, _| held += 1);
    }
    assert!(held >= 60, "the last prompt recorded is (nearly all) there: {held} of 64");
    let used = index.sets.iter().flatten().filter(|s| s.load(Ordering::Relaxed) != 0).count();
    assert!(used <= 1024);
}

#[test]
fn a_session_sticks_to_one_backend_until_it_is_loaded_past_the_balance_factor() {
    let p = pool(4, "hash_balance_factor = 1.25");
    let r = p.prefix.as_ref().unwrap();
    let h = Hint { prompt: None, session: Some(42) };
    let first = pick(&p, r, &h, &NONE).unwrap();
    assert!((0..20).all(|_| pick(&p, r, &h, &NONE) == Some(first)), "the same session, the same backend");
    let spread: std::collections::HashSet<_> =
        (0..64u64).filter_map(|s| pick(&p, r, &Hint { prompt: None, session: Some(s) }, &NONE)).collect();
    assert_eq!(spread.len(), 4, "sessions spread over the pool");
    // Load it: past 1.25 × the average, the session moves on.
    let _held: Vec<_> = (0..4).map(|_| p.backends[first].try_acquire().unwrap()).collect();
    assert_ne!(pick(&p, r, &h, &NONE), Some(first));
}

#[test]
fn new_prompts_fill_the_emptiest_caches_so_prompts_spread_evenly() {
    let p = pool(4, "");
    let r = p.prefix.as_ref().unwrap();
    let mut owners = Vec::new();
    for k in 0..16u64 {
        let prompt = key(k * 100..k * 100 + 32);
        let g = p.try_acquire_with(&hint(&prompt)).unwrap();
        owners.push(p.index_of(g.backend()).unwrap());
    }
    for i in 0..4 {
        assert_eq!(owners.iter().filter(|&&o| o == i).count(), 4, "four prompts each: {owners:?}");
        assert_eq!(r.index.footprint(&p.backends[i]), 4 * 32);
    }
}

#[test]
fn a_prefix_pool_records_where_each_prompt_went() {
    let p = pool(4, "");
    let k = key(0..16);
    let g = p.try_acquire_with(&hint(&k)).unwrap();
    let first = p.index_of(g.backend()).unwrap();
    drop(g);
    for _ in 0..10 {
        let g = p.try_acquire_with(&hint(&k)).unwrap();
        assert_eq!(p.index_of(g.backend()), Some(first), "the prompt comes back to its cache");
    }
}
