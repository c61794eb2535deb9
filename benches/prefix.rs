//! What prefix-cache-aware routing costs per request: keying a prompt (JSON parse + chained block
//! hashes, per KiB of prompt), and a prefix pool's pick-and-record at 16 and 256 backends with
//! an index that knows 64 prompts of 32 blocks.
//!
//! `cargo bench --bench prefix`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use headroom::config::Config;
use headroom::pool::prefix::Hint;
use headroom::pool::Pool;
use headroom::prompt::{key_of, PromptKey};
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

/// A chat request whose system prompt is `bytes` long, and a question.
fn chat(seed: usize, bytes: usize) -> Vec<u8> {
    let system: String = (0..bytes).map(|i| (b'a' + ((i * 7 + seed) % 26) as u8) as char).collect();
    serde_json::json!({"model": "m", "stream": true, "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": format!("question {seed}")},
    ]})
    .to_string()
    .into_bytes()
}

fn pool(n: usize) -> Pool {
    let mut text = String::from("[pools.p]\nbalance = \"prefix\"\nmax_inflight_per_backend = 1000000\n");
    for i in 0..n {
        text.push_str(&format!("[[pools.p.backends]]\naddr = \"10.0.{}.{}:8000\"\n", i / 256, i % 256));
    }
    Pool::build(Config::parse(&text, Path::new(".")).unwrap().pools[0].clone(), &[], None)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("prompt_key");
    for kib in [1usize, 8, 64] {
        let body = chat(1, kib << 10);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(format!("{kib}KiB")), &body, |b, body| {
            b.iter(|| black_box(key_of(black_box(body), 256)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("prefix_pick");
    for n in [16usize, 256] {
        let p = pool(n);
        let keys: Vec<PromptKey> = (0..64).map(|s| key_of(&chat(s, 8 << 10), 256).unwrap()).collect();
        for k in &keys {
            drop(p.try_acquire_with(&Hint { prompt: Some(k), session: None }));
        }
        let mut i = 0;
        g.bench_with_input(BenchmarkId::new("pick_and_record", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(p.try_acquire_with(&Hint { prompt: Some(&keys[i]), session: None }))
            })
        });
        g.bench_with_input(BenchmarkId::new("least_load_alone", n), &n, |b, _| b.iter(|| black_box(p.try_acquire())));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
