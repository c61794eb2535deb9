//! What taking the config snapshot costs per request: `Gateway::snapshot` (a per-thread copy)
//! against cloning one shared `Arc` out of the `ArcSwap` (every thread writes the same reference
//! count), on one thread and on two threads at once.
//!
//! `cargo bench --bench snapshot`

mod common;

use arc_swap::ArcSwap;
use common::concurrent;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use headroom::config::Config;
use headroom::gateway::{Gateway, Snapshot};
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

fn snapshot() -> Snapshot {
    let text = "[pools.a]\n[[pools.a.backends]]\naddr = \"127.0.0.1:9\"\n";
    Snapshot::build(Config::parse(text, Path::new(".")).expect("bench config"), &[], None)
}

fn bench(c: &mut Criterion) {
    let gateway = Gateway::new(snapshot());
    let shared = ArcSwap::from_pointee(snapshot());
    let mut g = c.benchmark_group("snapshot");
    for threads in [1usize, 2] {
        g.bench_with_input(BenchmarkId::new("per_thread_copy", threads), &threads, |b, &t| {
            b.iter_custom(|iters| concurrent(iters, t, || drop(black_box(gateway.snapshot()))))
        });
        g.bench_with_input(BenchmarkId::new("shared_arc", threads), &threads, |b, &t| {
            b.iter_custom(|iters| concurrent(iters, t, || drop(black_box(shared.load_full()))))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
