//! Streaming end to end: token streams pass unbuffered, a client that leaves cancels its upstream
//! work and is counted as aborted, drained backends finish their streams, and a client that stops
//! reading is cut off.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

/// Sets a flag when dropped: shows a handler future was cancelled.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_unbuffered_and_slot_is_held_to_end_of_body() {
    let (backend, mut streams) = streaming_backend().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;

    let resp =
        client().request(Request::get(hr.url("/v1/chat/completions")).body(full(Bytes::new())).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = streams.recv().await.unwrap();
    let mut body = resp.into_body();

    // The first event reaches the client while the backend has not produced the second.
    events.send(Bytes::from_static(b"data: one\n\n")).await.unwrap();
    let first = tokio::time::timeout(T, body.frame()).await.expect("first event was buffered").unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "data: one\n\n");

    // Headers were sent long ago, yet the backend's slot is still held.
    assert_eq!(hr.in_flight().await[0].1, 1);

    events.send(Bytes::from_static(b"data: [DONE]\n\n")).await.unwrap();
    drop(events);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "data: [DONE]\n\n");
    poll_until(T, "slot released at end of body", || async { hr.in_flight().await[0].1 == 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_cancels_upstream() {
    let cancelled = Arc::new(AtomicBool::new(false));
    let flag = cancelled.clone();
    let backend = TestBackend::start(move |_req| {
        let flag = flag.clone();
        async move {
            let (events, body) = channel_body();
            tokio::spawn(async move {
                // Produce tokens until nobody listens any more (bounded: 30 s).
                for _ in 0..1500 {
                    if events.send(Bytes::from_static(b"data: tok\n\n")).await.is_err() {
                        flag.store(true, Ordering::SeqCst);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            Response::new(body)
        }
    })
    .await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;

    let resp = client().request(Request::get(hr.url("/stream")).body(full(Bytes::new())).unwrap()).await.unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    poll_until(T, "backend sees the stream cancelled", || async { cancelled.load(Ordering::SeqCst) }).await;
    poll_until(T, "slot released", || async { hr.in_flight().await[0].1 == 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_before_response_cancels_upstream() {
    let cancelled = Arc::new(AtomicBool::new(false));
    let flag = cancelled.clone();
    let backend = TestBackend::start(move |_req| {
        let guard = DropFlag(flag.clone());
        async move {
            // A backend still "thinking": it would answer after a minute.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(guard);
            Response::new(full("late"))
        }
    })
    .await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let url = hr.url("/think");
    let req = tokio::spawn(async move { client().request(Request::get(url).body(full(Bytes::new())).unwrap()).await });
    poll_until(T, "request reached backend", || async { backend.hits.load(Ordering::SeqCst) == 1 }).await;
    req.abort(); // the client gives up, dropping its connection
    poll_until(T, "backend request cancelled", || async { cancelled.load(Ordering::SeqCst) }).await;
    poll_until(T, "slot released", || async { hr.in_flight().await[0].1 == 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_a_stream_is_counted_as_aborted_not_as_a_backend_error() {
    let (streaming, mut streams) = streaming_backend().await;
    let outlier = "[pools.default.outlier]\nconsecutive_failures = 1\n";
    let hr = Headroom::start(&config(&[(streaming.addr, 1)], outlier, "")).await;
    for _ in 0..3 {
        let resp = client().request(Request::get(hr.url("/stream")).body(full(Bytes::new())).unwrap()).await.unwrap();
        let events = streams.recv().await.unwrap();
        let mut body = resp.into_body();
        events.send(Bytes::from_static(b"data: one\n\n")).await.unwrap();
        body.frame().await.unwrap().unwrap();
        drop(body); // the client goes away mid-stream
        poll_until(T, "the backend sees the stream closed", || async { events.is_closed() }).await;
    }
    let pools = hr.pools().await;
    let b = &pools["pools"][0]["backends"][0];
    assert_eq!((b["errors"].as_u64(), b["aborted"].as_u64()), (Some(0), Some(3)), "{b}");
    assert_eq!(b["state"], "healthy", "client aborts ejected the backend: {b}");
    assert_eq!(pools["pools"][0]["aborted"], 3);
    assert_eq!(pools["pools"][0]["errors"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_backend_finishes_its_stream_and_takes_no_new_requests() {
    let (streaming, mut streams) = streaming_backend().await;
    let other = TestBackend::ok().await;
    let hr = Headroom::start(&config(&[(streaming.addr, 1000), (other.addr, 1)], "", "")).await;
    // The heavy weight sends the first request to the streaming backend.
    let resp = client().request(Request::get(hr.url("/stream")).body(full(Bytes::new())).unwrap()).await.unwrap();
    let events = streams.recv().await.unwrap();
    let mut body = resp.into_body();
    events.send(Bytes::from_static(b"data: one\n\n")).await.unwrap();
    body.frame().await.unwrap().unwrap();

    let drain = |path: String| async move {
        let r = client().request(Request::post(path).body(full(Bytes::new())).unwrap()).await.unwrap();
        let status = r.status();
        (
            status,
            serde_json::from_slice::<serde_json::Value>(&r.into_body().collect().await.unwrap().to_bytes()).unwrap(),
        )
    };
    let (status, v) = drain(format!("http://{}/api/pools/default/backends/{}/drain", hr.admin, streaming.addr)).await;
    assert_eq!(status, 200);
    assert_eq!(v["state"], "draining");
    assert_eq!(v["in_flight"], 1);
    let (status, _) = drain(format!("http://{}/api/pools/default/backends/127.0.0.1:1/drain", hr.admin)).await;
    assert_eq!(status, 404);
    let (status, _) = drain(format!("http://{}/api/pools/nope/backends/{}/drain", hr.admin, streaming.addr)).await;
    assert_eq!(status, 404);

    // New requests go elsewhere despite the weight; the open stream still completes.
    for _ in 0..10 {
        let r = client().request(Request::get(hr.url("/x")).body(full(Bytes::new())).unwrap()).await.unwrap();
        assert_eq!(r.headers()["x-backend"], other.addr.to_string());
    }
    events.send(Bytes::from_static(b"data: [DONE]\n\n")).await.unwrap();
    drop(events);
    assert_eq!(body.collect().await.unwrap().to_bytes(), "data: [DONE]\n\n");
    poll_until(T, "drained backend idle", || async {
        let pools = hr.pools().await;
        let b = pools["pools"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["addr"] == streaming.addr.to_string())
            .cloned()
            .unwrap();
        b["state"] == "draining" && b["in_flight"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_frees_the_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let size = 32 * 1024 * 1024;
    let backend = TestBackend::start(move |_req| async move { Response::new(full(vec![b'x'; size])) }).await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "send_timeout = \"300ms\"")).await;
    let mut s = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    // The client reads nothing: once the socket buffers are full, no byte moves for 300 ms.
    poll_until(T, "request reached backend", || async { backend.hits.load(Ordering::SeqCst) == 1 }).await;
    poll_until(T, "slot released while the client still reads nothing", || async { hr.in_flight().await[0].1 == 0 })
        .await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut got)).await.expect("connection left open");
    assert!(got.len() < size, "the whole body arrived: {} bytes", got.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_keep_a_stream_alive_past_its_idle_timeout_and_silence_cuts_it_off() {
    let (backend, mut streams) = streaming_backend().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "stream_idle_timeout = \"400ms\"", "")).await;
    let resp =
        client().request(Request::get(hr.url("/v1/chat/completions")).body(full(Bytes::new())).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let events = streams.recv().await.unwrap();
    let mut body = resp.into_body();
    // Eight events 150 ms apart: 1.2 s in all, three times the idle timeout, never 400 ms apart.
    let started = std::time::Instant::now();
    for i in 0..8 {
        events.send(Bytes::from(format!("data: {i}\n\n"))).await.unwrap();
        let frame = tokio::time::timeout(T, body.frame()).await.expect("event").unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), format!("data: {i}\n\n"));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(1200));
    // Then the backend goes quiet, its stream still open: the response is cut off (no last
    // chunk: the client sees a broken body, not a complete one) after the idle timeout.
    let quiet = std::time::Instant::now();
    let end = tokio::time::timeout(T, body.collect()).await.expect("cut off");
    assert!(end.is_err(), "a stream cut off must not look complete");
    let waited = quiet.elapsed();
    assert!(waited >= Duration::from_millis(200), "cut off {waited:?} after the last event (it was 150 ms old)");
    poll_until(T, "slot released after the idle timeout", || async { hr.in_flight().await[0].1 == 0 }).await;
    drop(events);
}
