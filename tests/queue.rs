//! The admission queue: FIFO order, timeout and overflow, with a real backend at capacity.

// Tests may lock; the rule is for the data path.
#![allow(clippy::disallowed_types)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

const T: Duration = Duration::from_secs(10);

/// A backend that records the `x-seq` of each request as it arrives and answers only when the
/// test hands out a permit.
async fn gated_backend() -> (TestBackend, Arc<Semaphore>, Arc<Mutex<Vec<u32>>>) {
    let gate = Arc::new(Semaphore::new(0));
    let order = Arc::new(Mutex::new(Vec::new()));
    let (g, o) = (gate.clone(), order.clone());
    let b = TestBackend::start(move |req: Request<hyper::body::Incoming>| {
        let (g, o) = (g.clone(), o.clone());
        async move {
            let seq =
                req.headers().get("x-seq").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
            o.lock().unwrap().push(seq);
            g.acquire().await.unwrap().forget();
            Response::new(full(seq.to_string()))
        }
    })
    .await;
    (b, gate, order)
}

fn send(hr: &Headroom, seq: u32) -> tokio::task::JoinHandle<(u16, Option<String>, Duration)> {
    let url = hr.url("/v1/completions");
    tokio::spawn(async move {
        let started = Instant::now();
        let r = client()
            .request(Request::post(url).header("x-seq", seq.to_string()).body(full(Bytes::from_static(b"{}"))).unwrap())
            .await
            .unwrap();
        let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        (r.status().as_u16(), retry, started.elapsed())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_are_admitted_in_arrival_order() {
    let (backend, gate, order) = gated_backend().await;
    let pool = "max_inflight_per_backend = 1\nqueue = { max_depth = 8, timeout = \"20s\" }";
    let hr = Headroom::start(&config(&[(backend.addr, 1)], pool, "")).await;

    let mut reqs = vec![send(&hr, 0)];
    poll_until(T, "first request at the backend", || async { order.lock().unwrap().len() == 1 }).await;
    for seq in 1..=4u32 {
        reqs.push(send(&hr, seq));
        poll_until(T, "request queued", || async { hr.queue_depth().await == seq as u64 }).await;
    }
    // The backend is full: nothing else reached it.
    assert_eq!(*order.lock().unwrap(), vec![0]);
    gate.add_permits(5);
    for r in reqs {
        assert_eq!(r.await.unwrap().0, 200);
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    assert_eq!(hr.queue_depth().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_times_out_with_503_and_retry_after() {
    let (backend, gate, order) = gated_backend().await;
    let pool = "max_inflight_per_backend = 1\nqueue = { max_depth = 8, timeout = \"300ms\" }";
    let hr = Headroom::start(&config(&[(backend.addr, 1)], pool, "")).await;

    let first = send(&hr, 0);
    poll_until(T, "first request at the backend", || async { order.lock().unwrap().len() == 1 }).await;
    let (status, retry, waited) = send(&hr, 1).await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(waited >= Duration::from_millis(250), "gave up after {waited:?}");
    assert_eq!(hr.queue_depth().await, 0);
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().0, 200);
    // The timed-out request never reached the backend.
    assert_eq!(*order.lock().unwrap(), vec![0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_rejects_at_once() {
    let (backend, gate, order) = gated_backend().await;
    let pool = "max_inflight_per_backend = 1\nqueue = { max_depth = 1, timeout = \"20s\" }";
    let hr = Headroom::start(&config(&[(backend.addr, 1)], pool, "")).await;

    let first = send(&hr, 0);
    poll_until(T, "first request at the backend", || async { order.lock().unwrap().len() == 1 }).await;
    let queued = send(&hr, 1);
    poll_until(T, "one request queued", || async { hr.queue_depth().await == 1 }).await;
    let (status, retry, waited) = send(&hr, 2).await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(waited < Duration::from_secs(5), "a full queue should answer at once, took {waited:?}");
    gate.add_permits(2);
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(queued.await.unwrap().0, 200);
    assert_eq!(*order.lock().unwrap(), vec![0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waiters_all_get_served_as_slots_free() {
    // 40 requests on 2 backends of capacity 2: 36 queue, all are served, none lost.
    let (b1, gate1, _) = gated_backend().await;
    let (b2, gate2, _) = gated_backend().await;
    let pool = "max_inflight_per_backend = 2\nqueue = { max_depth = 64, timeout = \"20s\" }";
    let hr = Headroom::start(&config(&[(b1.addr, 1), (b2.addr, 1)], pool, "")).await;
    let reqs: Vec<_> = (0..40).map(|i| send(&hr, i)).collect();
    poll_until(T, "36 requests queued", || async { hr.queue_depth().await == 36 }).await;
    gate1.add_permits(40);
    gate2.add_permits(40);
    for r in reqs {
        assert_eq!(r.await.unwrap().0, 200);
    }
    let total = b1.hits.load(std::sync::atomic::Ordering::SeqCst) + b2.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(total, 40);
}
