//! The admission queue as clients see it: a timeout or a full queue is a 503 with Retry-After,
//! with a real backend at capacity. Order and wake-ups are tested on the paused clock, in
//! `pool::tests`.

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
