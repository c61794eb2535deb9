//! The admission queue on tokio's paused clock: order, timeout, overflow and wake-ups, with no
//! real waiting (time moves only when every task is idle, straight to the next timer).

use super::*;
use crate::config::Config;
use std::path::Path;

/// A pool of `backends` backends of capacity 1 each, with a queue of `depth` and `timeout`.
fn pool(backends: usize, depth: usize, timeout: &str) -> Arc<Pool> {
    let mut text = format!(
        "[pools.p]\nmax_inflight_per_backend = 1\nqueue = {{ max_depth = {depth}, timeout = \"{timeout}\" }}\n"
    );
    for i in 0..backends {
        text.push_str(&format!("[[pools.p.backends]]\naddr = \"127.0.0.1:{}\"\n", 9000 + i));
    }
    let config = Config::parse(&text, Path::new(".")).expect("valid pool");
    Arc::new(Pool::build(config.pools[0].clone(), &[], None))
}

/// Starts a request that waits for a slot; it reports its number once admitted and holds the
/// slot until `hold` passes.
fn waiter(
    pool: &Arc<Pool>,
    n: u32,
    admitted: tokio::sync::mpsc::UnboundedSender<u32>,
    hold: Duration,
) -> tokio::task::JoinHandle<Result<(), Rejection>> {
    let pool = pool.clone();
    tokio::spawn(async move {
        let (guard, _, _) = admit(&pool, || None, &Default::default()).await?;
        let _ = admitted.send(n);
        tokio::time::sleep(hold).await;
        drop(guard);
        Ok(())
    })
}

#[tokio::test(start_paused = true)]
async fn queued_requests_are_admitted_in_arrival_order() {
    let pool = pool(1, 8, "20s");
    let first = admit_now(&pool).expect("a free slot");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut waiting = Vec::new();
    for n in 1..=4 {
        waiting.push(waiter(&pool, n, tx.clone(), Duration::from_millis(10)));
        // Let it join the queue before the next one arrives.
        while pool.queue.depth() < n as usize {
            tokio::task::yield_now().await;
        }
    }
    assert!(admit_now(&pool).is_none(), "nobody jumps the queue");
    drop(first);
    for want in 1..=4 {
        assert_eq!(rx.recv().await, Some(want));
    }
    for w in waiting {
        assert_eq!(w.await.unwrap(), Ok(()));
    }
    assert_eq!(pool.queue.depth(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_gives_up_at_its_timeout_and_leaves_the_queue() {
    let pool = pool(1, 8, "300ms");
    let _busy = admit_now(&pool).expect("a free slot");
    let started = tokio::time::Instant::now();
    let refused = admit(&pool, || None, &Default::default()).await.err();
    assert_eq!(refused, Some(Rejection::QueueTimeout));
    assert_eq!(started.elapsed(), Duration::from_millis(300), "exactly the queue timeout, on the paused clock");
    assert_eq!(pool.queue.depth(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_at_once() {
    let pool = pool(1, 1, "20s");
    let _busy = admit_now(&pool).expect("a free slot");
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let _queued = waiter(&pool, 1, tx, Duration::ZERO);
    while pool.queue.depth() < 1 {
        tokio::task::yield_now().await;
    }
    let started = tokio::time::Instant::now();
    assert_eq!(admit(&pool, || None, &Default::default()).await.err(), Some(Rejection::QueueFull));
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn many_waiters_are_all_served_as_slots_free() {
    // 40 requests on 2 backends of capacity 1, each holding its slot 5 ms: 38 queue, none lost.
    let pool = pool(2, 64, "20s");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let all: Vec<_> = (0..40).map(|n| waiter(&pool, n, tx.clone(), Duration::from_millis(5))).collect();
    for w in all {
        assert_eq!(w.await.unwrap(), Ok(()));
    }
    drop(tx);
    let mut served = 0;
    while rx.recv().await.is_some() {
        served += 1;
    }
    assert_eq!(served, 40);
    assert_eq!(pool.queue.depth(), 0);
    assert_eq!(pool.in_flight(), 0);
}
