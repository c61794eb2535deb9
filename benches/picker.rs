//! Pick-and-release cost of the lock-free pool against a `Mutex`-guarded baseline, at 4, 64 and
//! 1,024 backends, on one thread and on two threads at once.
//!
//! `cargo bench --bench picker`

// The baseline is a mutex on purpose: it is what the lock-free design is measured against.
#![allow(clippy::disallowed_types)]

mod common;

use common::concurrent;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use headroom::config::{BackendConfig, BalanceKind, PoolConfig, Protocol, QueueConfig};
use headroom::pool::{InflightGuard, Pool};
use std::hint::black_box;
use std::sync::Mutex;
use std::time::Duration;

fn pool(n: usize, balance: BalanceKind) -> (Pool, Vec<InflightGuard>) {
    let backends: Vec<BackendConfig> = (0..n)
        .map(|i| BackendConfig {
            addr: format!("10.{}.{}.{}:8000", i >> 16, (i >> 8) & 255, i & 255).parse().unwrap(),
            weight: 1 + (i % 4) as u32,
            max_inflight: 1_000_000,
            backup: false,
        })
        .collect();
    let cfg = PoolConfig {
        name: "bench".into(),
        balance,
        protocol: Protocol::Http1,
        max_inflight_per_backend: 1_000_000,
        connect_timeout: Duration::from_secs(1),
        response_header_timeout: Duration::from_secs(1),
        stream_idle_timeout: Duration::from_secs(1),
        panic_threshold: 0.0,
        slow_start: None,
        honor_retry_after: true,
        models: Vec::new(),
        discover_models: false,
        queue: QueueConfig { max_depth: 0, timeout: Duration::from_secs(1) },
        backends,
        launch: None,
        health: None,
        outlier: None,
        retry: None,
        engine: None,
        prefix: None,
        autoscale: None,
        tls: None,
    };
    let p = Pool::build(cfg, &[], None);
    // Some standing load, so scores differ and the picker has real work to do.
    let mut held = Vec::new();
    for (i, b) in p.backends.iter().enumerate() {
        for _ in 0..(i * 7 % 5) {
            held.push(b.try_acquire().unwrap());
        }
    }
    (p, held)
}

/// The naive design: all per-backend state behind one lock.
struct MutexPool {
    state: Mutex<Vec<(u32, u32)>>, // (in_flight, weight)
}

impl MutexPool {
    fn new(n: usize) -> Self {
        MutexPool { state: Mutex::new((0..n).map(|i| ((i * 7 % 5) as u32, 1 + (i % 4) as u32)).collect()) }
    }

    fn acquire(&self) -> Option<usize> {
        let mut s = self.state.lock().unwrap();
        let mut best: Option<(usize, u64, u64)> = None;
        for (i, &(load, w)) in s.iter().enumerate() {
            let (a, b) = (load as u64 + 1, w as u64);
            if best.is_none_or(|(_, ba, bb)| a * bb < ba * b) {
                best = Some((i, a, b));
            }
        }
        let i = best?.0;
        s[i].0 += 1;
        Some(i)
    }

    fn release(&self, i: usize) {
        self.state.lock().unwrap()[i].0 -= 1;
    }
}

fn bench(c: &mut Criterion) {
    for threads in [1usize, 2] {
        let mut g = c.benchmark_group(format!("pick_release/{threads}t"));
        for n in [4usize, 64, 1024] {
            let (lock_free, _held) = pool(n, BalanceKind::LeastConn);
            g.bench_with_input(BenchmarkId::new("least_conn", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    concurrent(iters, threads, || {
                        black_box(lock_free.try_acquire());
                    })
                })
            });
            let (p2c, _held2) = pool(n, BalanceKind::P2c);
            g.bench_with_input(BenchmarkId::new("p2c", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    concurrent(iters, threads, || {
                        black_box(p2c.try_acquire());
                    })
                })
            });
            let (wrr, _held3) = pool(n, BalanceKind::WeightedRoundRobin);
            g.bench_with_input(BenchmarkId::new("weighted_round_robin", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    concurrent(iters, threads, || {
                        black_box(wrr.try_acquire());
                    })
                })
            });
            let baseline = MutexPool::new(n);
            g.bench_with_input(BenchmarkId::new("mutex_baseline", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    concurrent(iters, threads, || {
                        if let Some(i) = baseline.acquire() {
                            baseline.release(black_box(i));
                        }
                    })
                })
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
