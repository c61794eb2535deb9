//! Prefix-cache-aware routing against mock engines that model a prefix cache (an LRU of prompt
//! blocks; time to first token grows with every uncached prompt token): the mock's cache itself,
//! then `balance = "prefix"` against `least_conn` in the same run, for many users sharing a few
//! long system prompts and for multi-turn conversations, and a hot prompt that one engine cannot
//! carry alone.

mod common;

use common::*;
use headroom::load::workload::{Shape, Workload};
use headroom::load::{self, Mode, Plan};
use headroom::mock::MockOptions;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Four engines of four slots each; every engine's cache holds about 4 of 16 prompts of 8,000
/// bytes (31 blocks each): together, exactly the working set.
fn engine_options() -> MockOptions {
    engine_with_cache(128)
}

fn engine_with_cache(blocks: usize) -> MockOptions {
    MockOptions {
        capacity: 4,
        ttft: Duration::from_millis(5),
        token_interval: Duration::from_millis(5),
        tokens: 8,
        prefix_cache_blocks: blocks,
        block_chars: 256,
        prefill_per_token: Duration::from_micros(50),
        ..Default::default()
    }
}

async fn engines(n: usize, opts: &MockOptions) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for _ in 0..n {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        out.push(l.local_addr().unwrap());
        tokio::spawn(headroom::mock::serve(l, opts.clone(), std::future::pending()));
    }
    out
}

fn plan(url: String, shape: Shape, rate: f64, duration: Duration) -> Plan {
    Plan {
        url: url.parse().unwrap(),
        method: http::Method::POST,
        headers: vec![(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"))],
        body: bytes::Bytes::new(),
        engine_metrics: vec![],
        workload: Some(Arc::new(Workload { shape, model: "mock-model".into(), max_tokens: 8 })),
        mode: Mode::Rate { per_second: rate, ramp: Duration::ZERO },
        duration,
        timeout: Duration::from_secs(20),
        max_inflight: 1000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_engine_prefills_only_what_its_cache_does_not_hold() {
    let opts = MockOptions {
        ttft: Duration::from_millis(1),
        prefill_per_token: Duration::from_micros(100),
        ..engine_options()
    };
    let engine = engines(1, &opts).await[0];
    let shape = Shape::SharedPrefix { prefixes: 1, prefix_chars: 4000, suffix_chars: 100 };
    let w = Workload { shape, model: "m".into(), max_tokens: 2 };
    let send = |i: usize| {
        let body = w.request(i).0;
        async move {
            let url = format!("http://{engine}/v1/chat/completions");
            let started = std::time::Instant::now();
            let resp = client().request(http::Request::post(url).body(full(body)).unwrap()).await.unwrap();
            let text = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
            let text = String::from_utf8_lossy(&text).into_owned();
            let usage =
                text.lines().filter_map(|l| l.strip_prefix("data: ")).find(|l| l.contains("\"usage\"")).unwrap();
            (serde_json::from_str::<serde_json::Value>(usage).unwrap()["usage"].clone(), started.elapsed())
        }
    };
    let (cold, cold_time) = send(0).await;
    let (warm, warm_time) = send(1).await;
    assert_eq!(cold["prompt_tokens_details"]["cached_tokens"], 0, "{cold}");
    let prompt = warm["prompt_tokens"].as_u64().unwrap();
    let cached = warm["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= 960 && cached < prompt, "the 4,000-byte system prompt's 15 whole blocks: {warm}");
    assert!(cold_time > warm_time + Duration::from_millis(50), "{cold_time:?} then {warm_time:?}");
    let (_, metrics) = get(&format!("http://{engine}/metrics")).await;
    let load = headroom::engine::read(&String::from_utf8_lossy(&metrics), headroom::config::EngineKind::Vllm);
    assert_eq!(load.prefix_hits, Some(cached as f64));
    assert!(load.prefix_queries.unwrap() >= 2.0 * prompt as f64 - 2.0);
}

/// One run's figures: the prefix-cache hit rate the engines reported, TTFT p50 and p99, and the
/// requests each engine served during it.
#[derive(Debug)]
struct Outcome {
    hit_rate: f64,
    later_turns: Option<f64>,
    ttft_p50: f64,
    ttft_p99: f64,
    served: Vec<u64>,
    errors: usize,
}

fn served(pools: &serde_json::Value) -> Vec<u64> {
    pools["pools"][0]["backends"].as_array().unwrap().iter().map(|b| b["requests"].as_u64().unwrap()).collect()
}

/// A warm-up, then the measured run, through a fresh headroom in front of fresh engines.
async fn run(balance: &str, shape: Shape, rate: f64, measure: Duration, engine: &MockOptions) -> Outcome {
    let addrs = engines(4, engine).await;
    let backends: Vec<_> = addrs.iter().map(|a| (*a, 1)).collect();
    let pool = format!(
        "balance = \"{balance}\"\nmax_inflight_per_backend = 64\n[pools.default.engine]\ninterval = \"100ms\"\n"
    );
    let hr = Headroom::start_with_workers(&config(&backends, &pool, ""), 2).await;
    let url = hr.url("/v1/chat/completions");
    let progress = || Arc::new(load::Progress::default());
    load::run(&plan(url.clone(), shape.clone(), rate, Duration::from_secs(2)), progress()).await;
    let before = served(&hr.pools().await);
    let (samples, elapsed, dropped) = load::run(&plan(url.clone(), shape, rate, measure), progress()).await;
    let pools = hr.pools().await;
    let after = served(&pools);
    let blocks: Vec<_> =
        pools["pools"][0]["backends"].as_array().unwrap().iter().map(|b| b["prefix_blocks"].clone()).collect();
    match balance {
        "prefix" => {
            let total: u64 = blocks.iter().map(|b| b.as_u64().unwrap()).sum();
            assert!(total > 0, "the index holds the prompts sent: {blocks:?}");
        }
        _ => assert!(blocks.iter().all(serde_json::Value::is_null)),
    }
    let report = load::stats::Report::build(&url, "open loop".into(), Some(rate), elapsed, &samples, dropped);
    let cache = report.prefix_cache.expect("the engines report cached tokens");
    hr.stop().await;
    Outcome {
        hit_rate: cache.hit_rate,
        later_turns: cache.hit_rate_later_turns,
        ttft_p50: report.ttft_ms.p50,
        ttft_p99: report.ttft_ms.p99,
        served: after.iter().zip(&before).map(|(a, b)| a - b).collect(),
        errors: report.errors,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefix_routing_keeps_each_system_prompt_where_it_is_cached() {
    let shape = Shape::SharedPrefix { prefixes: 16, prefix_chars: 8000, suffix_chars: 200 };
    // About 70% of what the four engines serve when every prompt is prefilled in full.
    let (rate, measure) = (60.0, Duration::from_secs(5));
    let lc = run("least_conn", shape.clone(), rate, measure, &engine_options()).await;
    let px = run("prefix", shape, rate, measure, &engine_options()).await;
    eprintln!("least_conn: {lc:?}\nprefix:     {px:?}");
    assert_eq!((lc.errors, px.errors), (0, 0));
    assert!(px.hit_rate >= 3.0 * lc.hit_rate, "hit rate {:.2} vs {:.2}", px.hit_rate, lc.hit_rate);
    assert!(px.ttft_p50 <= 0.4 * lc.ttft_p50, "TTFT p50 {:.1} vs {:.1} ms", px.ttft_p50, lc.ttft_p50);
    assert!(px.ttft_p99 <= 0.6 * lc.ttft_p99, "TTFT p99 {:.1} vs {:.1} ms", px.ttft_p99, lc.ttft_p99);
    let (most, least) = (*px.served.iter().max().unwrap(), *px.served.iter().min().unwrap());
    assert!(most as f64 <= 1.5 * least as f64, "requests per engine {:?}", px.served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefix_routing_keeps_each_conversation_with_its_history() {
    let shape = Shape::MultiTurn { sessions: 64, turns: 6 };
    // Caches that hold every conversation, in vLLM's 16-token blocks: what is left to lose is
    // where each turn goes.
    let engine = MockOptions { block_chars: 64, ..engine_with_cache(4096) };
    let lc = run("least_conn", shape.clone(), 60.0, Duration::from_secs(4), &engine).await;
    let px = run("prefix", shape, 60.0, Duration::from_secs(4), &engine).await;
    eprintln!("least_conn: {lc:?}\nprefix:     {px:?}");
    let later = px.later_turns.unwrap();
    assert!(later >= 0.9, "turns 2 and later: {later:.3} of their prompt cached (least_conn: {:?})", lc.later_turns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prompt_too_hot_for_one_engine_is_spread_by_the_load_rule() {
    // One system prompt for everyone, at about twice what one engine serves with it cached.
    let shape = Shape::SharedPrefix { prefixes: 1, prefix_chars: 8000, suffix_chars: 200 };
    let px = run("prefix", shape, 150.0, Duration::from_secs(3), &engine_options()).await;
    eprintln!("prefix, one hot prompt: {px:?}");
    assert_eq!(px.errors, 0);
    let helping = px.served.iter().filter(|&&n| n > 0).count();
    assert!(helping >= 2, "the hot prompt stays on one engine: {:?}", px.served);
    assert!(px.ttft_p99 < 1000.0, "TTFT p99 {:.0} ms", px.ttft_p99);
}
