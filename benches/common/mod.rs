//! Helpers shared by the criterion benches.

use std::time::{Duration, Instant};

/// Runs `op` `iters` times on each of `threads` threads at once; returns the wall time, which
/// criterion divides by `iters`: the time per operation as each thread sees it.
pub fn concurrent(iters: u64, threads: usize, op: impl Fn() + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..iters {
                    op();
                }
            });
        }
    });
    start.elapsed()
}
