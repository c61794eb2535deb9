//! The data path end to end: real backends, real headroom, real clients.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

const T: Duration = Duration::from_secs(10);

/// Holds every request until released; the backends' own hit counters give the in-flight split.
async fn holding_backend(release: watch::Receiver<bool>) -> TestBackend {
    TestBackend::start(move |_req| {
        let mut release = release.clone();
        async move {
            let _ = release.wait_for(|r| *r).await;
            Response::new(full("done"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_least_conn_splits_in_flight_by_weight() {
    let (release, rx) = watch::channel(false);
    let b1 = holding_backend(rx.clone()).await;
    let b2 = holding_backend(rx.clone()).await;
    let b3 = holding_backend(rx.clone()).await;
    let hr =
        Headroom::start(&config(&[(b1.addr, 1), (b2.addr, 2), (b3.addr, 3)], "max_inflight_per_backend = 100", ""))
            .await;

    let client = client();
    let mut reqs = Vec::new();
    for _ in 0..60 {
        let c = client.clone();
        let url = hr.url("/slow");
        reqs.push(tokio::spawn(async move {
            let r = c.request(Request::get(url).body(full(Bytes::new())).unwrap()).await.unwrap();
            r.status()
        }));
    }
    let hits = |b: &TestBackend| b.hits.load(Ordering::SeqCst);
    poll_until(T, "60 requests in flight", || async { hits(&b1) + hits(&b2) + hits(&b3) == 60 }).await;
    let split = [hits(&b1), hits(&b2), hits(&b3)];
    for (got, want) in split.iter().zip([10u64, 20, 30]) {
        assert!(got.abs_diff(want) * 10 <= want, "in-flight split {split:?}, want 10:20:30 within 10%");
    }
    // headroom's own view agrees with the backends'.
    let view: Vec<u64> = hr.in_flight().await.into_iter().map(|(_, n)| n).collect();
    assert_eq!(view, split.to_vec());

    release.send(true).unwrap();
    for r in reqs {
        assert_eq!(r.await.unwrap(), 200);
    }
    poll_until(T, "in-flight back to zero", || async { hr.in_flight().await.iter().all(|(_, n)| *n == 0) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_at_a_time_is_split_by_weight_too() {
    let (b1, b2, b3) = (TestBackend::ok().await, TestBackend::ok().await, TestBackend::ok().await);
    let hr = Headroom::start(&config(&[(b1.addr, 1), (b2.addr, 2), (b3.addr, 3)], "", "")).await;
    for _ in 0..600 {
        assert_eq!(get(&hr.url("/x")).await.0, 200);
    }
    let split = [&b1, &b2, &b3].map(|b| b.hits.load(Ordering::SeqCst) as f64 / 600.0);
    for (got, weight) in split.iter().zip([1.0, 2.0, 3.0]) {
        assert!((got - weight / 6.0).abs() <= 0.05, "sequential split {split:?}, want 1:2:3 within 5 points");
    }
}

/// A backend whose response body is driven by the test through the returned channel.
async fn streaming_backend() -> (TestBackend, mpsc::UnboundedReceiver<mpsc::Sender<Bytes>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let b = TestBackend::start(move |_req| {
        let tx = tx.clone();
        async move {
            let (events, body) = channel_body();
            let _ = tx.send(events);
            Response::builder().header("content-type", "text/event-stream").body(body).unwrap()
        }
    })
    .await;
    (b, rx)
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

/// Sets a flag when dropped: shows a handler future was cancelled.
struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
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

fn json_of(text: &str) -> serde_json::Value {
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    // A chunked response carries its size lines around the JSON.
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map_or(body.len(), |i| i + 1);
    serde_json::from_str(&body[start..end]).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_and_forwarding_headers_added() {
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let req = "GET /echo?x=1 HTTP/1.1\r\nHost: api.example:8080\r\nConnection: close, x-custom\r\nX-Custom: secret\r\n\
               Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: x-t\r\nProxy-Authorization: Basic abc\r\n\
               Proxy-Connection: keep-alive\r\nX-Forwarded-For: 10.0.0.1\r\nX-Request-Id: my-id-1\r\nAccept: */*\r\n\r\n";
    let resp = raw(hr.addr, req.as_bytes(), T).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("x-request-id: my-id-1"), "{resp}");
    let seen = json_of(&resp);
    let h = &seen["headers"];
    for gone in ["connection", "x-custom", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection"] {
        assert!(h.get(gone).is_none(), "{gone} reached the backend: {h}");
    }
    assert_eq!(seen["uri"], "/echo?x=1");
    assert_eq!(h["host"], "api.example:8080");
    assert_eq!(h["accept"], "*/*");
    assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "api.example:8080");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=\"api.example:8080\"");
    assert!(h["via"].as_str().unwrap().starts_with("1.1 headroom-"), "{}", h["via"]);
    assert_eq!(h["x-request-id"], "my-id-1");

    // Without an id, one is made up and passed both ways.
    let resp = client().request(Request::get(hr.url("/echo")).body(full(Bytes::new())).unwrap()).await.unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    let seen: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(seen["headers"]["x-request-id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_stripped() {
    let backend = TestBackend::start(|_req: Request<Incoming>| async {
        Response::builder()
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("trailer", "x-t")
            .header("upgrade", "h2c")
            .header("x-kept", "yes")
            .body(full("ok"))
            .unwrap()
    })
    .await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let resp = client().request(Request::get(hr.url("/")).body(full(Bytes::new())).unwrap()).await.unwrap();
    let h = resp.headers();
    for gone in ["keep-alive", "proxy-authenticate", "trailer", "upgrade"] {
        assert!(!h.contains_key(gone), "{gone} reached the client");
    }
    assert_eq!(h["x-kept"], "yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shapes_are_refused_and_not_forwarded() {
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let shapes: [&[u8]; 4] = [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ];
    for shape in shapes {
        let resp = raw(hr.addr, shape, T).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{:?} got {resp}", String::from_utf8_lossy(shape));
    }
    // Framing and Host shapes that backends read differently, and what a gateway does not do.
    let refused: [(&[u8], &str); 6] = [
        (b"GET / HTTP/1.1\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", "400"),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "400"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "501"),
        (b"CONNECT b.example:443 HTTP/1.1\r\nHost: b.example:443\r\n\r\n", "501"),
    ];
    for (shape, status) in refused {
        let resp = raw(hr.addr, shape, T).await;
        assert!(resp.starts_with(&format!("HTTP/1.1 {status}")), "{:?} got {resp}", String::from_utf8_lossy(shape));
        assert!(resp.to_ascii_lowercase().contains("connection: close"), "{resp}");
    }
    let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(70_000));
    let resp = raw(hr.addr, long.as_bytes(), T).await;
    assert!(resp.starts_with("HTTP/1.1 414"), "{resp}");
    assert_eq!(backend.hits.load(Ordering::SeqCst), 0, "a refused request reached the backend");

    // The same connection shapes without the ambiguity are fine.
    let ok =
        raw(hr.addr, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello", T).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert_eq!(json_of(&ok)["body_len"], 5);
    // A target in absolute form names the host, whatever Host says; it goes upstream as Host.
    for text in [
        &b"GET http://b.example:81/x HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        b"GET http://b.example:81/x HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    ] {
        let resp = raw(hr.addr, text, T).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert_eq!(json_of(&resp)["headers"]["host"], "b.example:81", "{resp}");
    }
    let chunked = raw(
        hr.addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        T,
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 200"), "{chunked}");
    assert_eq!(json_of(&chunked)["body_len"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_timeouts_give_408_413_431() {
    let backend = TestBackend::echo().await;
    let server = "max_request_body = \"1KiB\"\nmax_header_bytes = \"2KiB\"\nrequest_header_timeout = \"300ms\"";
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", server)).await;

    // 413 by declared length: refused before anything is forwarded.
    let big = vec![b'x'; 2000];
    let mut req = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n", big.len()).into_bytes();
    req.extend_from_slice(&big);
    let resp = raw(hr.addr, &req, T).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert_eq!(backend.hits.load(Ordering::SeqCst), 0);
    assert!(json_of(&resp)["request_id"].is_string());

    // 413 for a chunked body that grows past the limit while streaming.
    let mut req = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'y'; 512]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(hr.addr, &req, T).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");

    // 431: a head over max_header_bytes (checked by headroom) and one over hyper's buffer.
    for size in [3_000, 40_000] {
        let req = format!("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Big: {}\r\n\r\n", "z".repeat(size));
        let resp = raw(hr.addr, req.as_bytes(), T).await;
        assert!(resp.starts_with("HTTP/1.1 431"), "{size}: {resp}");
    }

    // 408: a head that never completes.
    let started = std::time::Instant::now();
    let resp = raw(hr.addr, b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow:", T).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(json_of(&resp)["error"], "request header timeout");

    // And a request within every limit still goes through.
    let ok = raw(hr.addr, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc", T).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_are_closed_quietly() {
    let backend = TestBackend::ok().await;
    let server = "idle_timeout = \"300ms\"\nrequest_header_timeout = \"5s\"";
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", server)).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Then silence: the connection is closed after the idle timeout, without a 408.
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(rest.is_empty(), "unexpected bytes on idle close: {:?}", String::from_utf8_lossy(&rest));
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_backend_is_502_and_silent_backend_is_504() {
    let dead = dead_addr().await;
    let hr = Headroom::start(&config(&[(dead, 1)], "connect_timeout = \"1s\"", "")).await;
    let (status, body) = get(&hr.url("/")).await;
    assert_eq!(status, 502);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("cannot connect"), "{v}");
    assert_eq!(v["request_id"].as_str().unwrap().len(), 32);
    // Counted once, against the backend that failed.
    let (_, text) = get(&format!("http://{}/metrics", hr.admin)).await;
    let text = String::from_utf8(text.to_vec()).unwrap();
    // (The registry is shared by the tests in this binary: look only at this backend and "none".)
    let counted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("headroom_requests_total") && l.contains("code=\"502\""))
        .filter(|l| l.contains(&format!("backend=\"{dead}\"")) || l.contains("backend=\"none\""))
        .collect();
    assert_eq!(counted.len(), 1, "{counted:?}");
    assert!(counted[0].contains(&format!("backend=\"{dead}\"")) && counted[0].ends_with(" 1"), "{counted:?}");
    hr.stop().await;

    let stall = TestBackend::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Response::new(full("late"))
    })
    .await;
    let hr = Headroom::start(&config(&[(stall.addr, 1)], "response_header_timeout = \"300ms\"", "")).await;
    let started = std::time::Instant::now();
    let (status, _) = get(&hr.url("/")).await;
    assert_eq!(status, 504);
    assert!(started.elapsed() >= Duration::from_millis(250));
    poll_until(T, "slot released after 504", || async { hr.in_flight().await[0].1 == 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let backend = TestBackend::ok().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let c = client();
    for _ in 0..50 {
        let r = c.request(Request::get(hr.url("/")).body(full(Bytes::new())).unwrap()).await.unwrap();
        assert_eq!(r.status(), 200);
        r.into_body().collect().await.unwrap();
    }
    assert_eq!(backend.hits.load(Ordering::SeqCst), 50);
    assert_eq!(backend.connections.load(Ordering::SeqCst), 1, "each request opened a new upstream connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_and_h2c_backends_work() {
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;

    // An h2c client (prior knowledge) to an HTTP/1.1 pool.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Body>();
    for _ in 0..3 {
        let resp = h2.request(Request::get(hr.url("/h2?q=1")).body(full(Bytes::new())).unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let seen: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(seen["version"], "HTTP/1.1");
        assert_eq!(seen["uri"], "/h2?q=1");
        assert!(seen["headers"]["via"].as_str().unwrap().starts_with("2 headroom-"), "{}", seen["headers"]["via"]);
        assert_eq!(seen["headers"]["host"], hr.addr.to_string());
    }
    hr.stop().await;

    // An h2c pool: headroom speaks HTTP/2 to the backend.
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "protocol = \"h2c\"", "")).await;
    for _ in 0..3 {
        let (status, body) = get(&hr.url("/up")).await;
        assert_eq!(status, 200);
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["version"], "HTTP/2.0");
        assert_eq!(seen["uri"], format!("http://{}/up", backend.addr));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_pick_pools_by_host_and_path() {
    let a = TestBackend::ok().await;
    let b = TestBackend::ok().await;
    let toml = format!(
        "[[routes]]\nhost = \"b.example\"\npool = \"b\"\n[[routes]]\npath_prefix = \"/v1/\"\npool = \"b\"\n[[routes]]\npool = \"a\"\n\
         [pools.a]\n[[pools.a.backends]]\naddr = \"{}\"\n[pools.b]\n[[pools.b.backends]]\naddr = \"{}\"\n",
        a.addr, b.addr
    );
    let hr = Headroom::start(&toml).await;
    let backend_of = |host: &'static str, path: &'static str| {
        let url = hr.url(path);
        async move {
            let r = client()
                .request(Request::get(url).header("host", host).body(full(Bytes::new())).unwrap())
                .await
                .unwrap();
            r.headers()["x-backend"].to_str().unwrap().to_string()
        }
    };
    assert_eq!(backend_of("a.example", "/x").await, a.addr.to_string());
    assert_eq!(backend_of("B.example:80", "/x").await, b.addr.to_string());
    assert_eq!(backend_of("a.example", "/v1/models").await, b.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_admin_api_report_traffic() {
    let backend = TestBackend::ok().await;
    let hr = Headroom::start(&config(&[(backend.addr, 3)], "", "")).await;
    for _ in 0..5 {
        assert_eq!(get(&hr.url("/")).await.0, 200);
    }
    let pools = hr.pools().await;
    let b = &pools["pools"][0]["backends"][0];
    assert_eq!(b["addr"], backend.addr.to_string());
    assert_eq!(b["weight"], 3);
    assert_eq!(b["state"], "healthy");
    assert_eq!(b["max_inflight"], 64);
    assert!(b["requests"].as_u64().unwrap() >= 5);
    assert_eq!(pools["pools"][0]["queue_depth"], 0);

    let (status, text) = get(&format!("http://{}/metrics", hr.admin)).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(text.to_vec()).unwrap();
    let label = format!("backend=\"{}\"", backend.addr);
    for name in [
        "headroom_requests_total",
        "headroom_request_duration_seconds_bucket",
        "headroom_backend_inflight",
        "headroom_queue_depth",
        "headroom_upstream_connects_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("headroom_requests_total") && l.contains(&label) && l.contains("code=\"200\""))
        .unwrap_or_else(|| panic!("no request counter for {label}:\n{text}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 5.0, "{line}");
    assert_eq!(get(&format!("http://{}/healthz", hr.admin)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_share_the_listener_and_reuse_connections() {
    let backend = TestBackend::ok().await;
    let hr = Headroom::start_with_workers(&config(&[(backend.addr, 1)], "", ""), 3).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        let url = hr.url("/");
        clients.push(tokio::spawn(async move {
            // One client, one keep-alive connection, 25 requests on it.
            let c = client();
            for _ in 0..25 {
                let r = c.request(Request::get(url.as_str()).body(full(Bytes::new())).unwrap()).await.unwrap();
                assert_eq!(r.status(), 200);
                r.into_body().collect().await.unwrap();
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(backend.hits.load(Ordering::SeqCst), 200);
    // At most one upstream connection per concurrent client connection.
    assert!(
        backend.connections.load(Ordering::SeqCst) <= 8,
        "{} upstream connections",
        backend.connections.load(Ordering::SeqCst)
    );
    hr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_body_gets_408_and_frees_the_slot() {
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "idle_timeout = \"300ms\"")).await;
    // Ten of the hundred declared bytes, then silence.
    let started = std::time::Instant::now();
    let resp = raw(hr.addr, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789", T).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(json_of(&resp)["error"].as_str().unwrap().contains("request body timeout"), "{resp}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    poll_until(T, "slot released", || async { hr.in_flight().await[0].1 == 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_once_and_not_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let mut s = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"));
    s.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut rest)).await.unwrap().unwrap();
    let rest = String::from_utf8_lossy(&rest).into_owned();
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    let seen = json_of(&rest);
    assert_eq!(seen["body_len"], 5);
    assert!(seen["headers"].get("expect").is_none(), "Expect reached the backend");
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
async fn connect_failures_fail_over_to_another_backend() {
    let dead = dead_addr().await;
    let live = TestBackend::echo().await;
    // The dead backend's weight makes it the first choice every time.
    let hr = Headroom::start(&config(&[(dead, 1000), (live.addr, 1)], "connect_timeout = \"1s\"", "")).await;
    for i in 0..5 {
        let body = format!("prompt {i}");
        let r = client()
            .request(Request::post(hr.url("/v1/completions")).body(full(Bytes::from(body.clone()))).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i} was not failed over");
        let seen: serde_json::Value =
            serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(seen["body_len"], body.len(), "the body arrived whole after failover");
    }
    let pools = hr.pools().await;
    let dead_view = pools["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == dead.to_string())
        .cloned()
        .unwrap();
    assert_eq!(dead_view["errors"], 5);
    let (_, text) = get(&format!("http://{}/metrics", hr.admin)).await;
    let text = String::from_utf8(text.to_vec()).unwrap();
    let retries = text
        .lines()
        .find(|l| {
            l.starts_with("headroom_retries_total")
                && l.contains("pool=\"default\"")
                && l.contains("reason=\"connect-failure\"")
        })
        .unwrap_or_else(|| panic!("no retry counter:\n{text}"));
    assert!(retries.rsplit(' ').next().unwrap().parse::<f64>().unwrap() >= 5.0, "{retries}");
    assert_eq!(live.hits.load(Ordering::SeqCst), 5);
    hr.stop().await;

    // With nothing reachable the answer is still a clean 502.
    let (dead2, dead3) = (dead_addr().await, dead_addr().await);
    let hr = Headroom::start(&config(&[(dead2, 1), (dead3, 1)], "connect_timeout = \"1s\"", "")).await;
    assert_eq!(get(&hr.url("/")).await.0, 502);
}

/// A backend that answers every request on a connection with the same raw bytes.
async fn raw_backend(answer: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = s.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    // Requests here have no body: one answer per blank line.
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn malformed_or_ambiguous_backend_responses_are_refused_or_reframed() {
    // Two different lengths: which one the client would believe is exactly what smuggling needs.
    let conflicting = raw_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!").await;
    let hr = Headroom::start(&config(&[(conflicting, 1)], "", "")).await;
    let (status, body) = get(&hr.url("/")).await;
    assert_eq!(status, 502);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("invalid response from backend"), "{text}");

    // Transfer-Encoding and Content-Length together: read by its chunks, the length is dropped.
    let both = raw_backend(
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let hr = Headroom::start(&config(&[(both, 1)], "", "")).await;
    for _ in 0..3 {
        let resp = client().request(Request::get(hr.url("/")).body(full(Bytes::new())).unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("content-length").is_none_or(|v| v == "5"), "{:?}", resp.headers());
        assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], b"hello");
    }
    // ... and such a connection is not reused: each request opened its own.
    let (_, page) = get(&format!("http://{}/metrics", hr.admin)).await;
    let metrics = String::from_utf8_lossy(&page).to_string();
    let connects =
        metric_value(&metrics, &format!("headroom_upstream_connects_total{{pool=\"default\",backend=\"{both}\"}}"));
    assert_eq!(connects, 3.0, "{metrics}");

    // A head that never ends within 64 KiB.
    let endless: &'static [u8] =
        Box::leak(format!("HTTP/1.1 200 OK\r\nx-pad: {}\r\n\r\n", "a".repeat(70_000)).into_bytes().into_boxed_slice());
    let hr = Headroom::start(&config(&[(raw_backend(endless).await, 1)], "", "")).await;
    assert_eq!(get(&hr.url("/")).await.0, 502);
}

/// One response as a client reads it off the wire: status, head text, body (de-chunked).
struct WireResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Splits the bytes of consecutive responses. `head_only[i]` marks answers to HEAD requests.
fn split_responses(mut wire: &[u8], head_only: &[bool]) -> Vec<WireResponse> {
    let mut out = Vec::new();
    while !wire.is_empty() {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut fields);
        let len = match resp.parse(wire).expect("unparsable response") {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => panic!("truncated head: {:?}", String::from_utf8_lossy(wire)),
        };
        let field = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        let head = String::from_utf8_lossy(&wire[..len]).to_ascii_lowercase();
        let status = resp.code.unwrap();
        let (length, chunked) = (field("content-length"), field("transfer-encoding").is_some_and(|t| t == "chunked"));
        let rest = &wire[len..];
        let (body, used) = if head_only.get(out.len()).copied().unwrap_or(false) {
            (Vec::new(), 0)
        } else if chunked {
            let (mut body, mut at) = (Vec::new(), 0);
            loop {
                let nl = rest[at..].windows(2).position(|w| w == b"\r\n").unwrap() + at;
                let size = usize::from_str_radix(std::str::from_utf8(&rest[at..nl]).unwrap(), 16).unwrap();
                at = nl + 2;
                if size == 0 {
                    assert_eq!(&rest[at..at + 2], b"\r\n", "trailers where none were expected");
                    break (body, at + 2);
                }
                body.extend_from_slice(&rest[at..at + size]);
                assert_eq!(&rest[at + size..at + size + 2], b"\r\n");
                at += size + 2;
            }
        } else if let Some(n) = length {
            let n: usize = n.parse().unwrap();
            (rest[..n].to_vec(), n)
        } else {
            (rest.to_vec(), rest.len())
        };
        out.push(WireResponse { status, head, body });
        wire = &rest[used..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_pipeline_keep_alive_and_get_framing_their_version_understands() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(echo.addr, 1)], "", "")).await;

    // Three pipelined requests in one write (a GET, a POST with its body, a HEAD) and a last one
    // that closes: four answers, in order, each framed so the next one parses.
    let wire = raw(
        hr.addr,
        b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nPOST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
          HEAD /c HTTP/1.1\r\nHost: a\r\n\r\nGET /d HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        T,
    )
    .await;
    let answers = split_responses(wire.as_bytes(), &[false, false, true, false]);
    assert_eq!(answers.len(), 4, "{wire}");
    let seen: Vec<serde_json::Value> =
        [&answers[0], &answers[1], &answers[3]].iter().map(|a| serde_json::from_slice(&a.body).unwrap()).collect();
    assert_eq!(
        (seen[0]["uri"].as_str(), seen[1]["uri"].as_str(), seen[2]["uri"].as_str()),
        (Some("/a"), Some("/b"), Some("/d"))
    );
    assert_eq!(seen[1]["body_len"], 3);
    assert!(answers.iter().all(|a| a.status == 200 && a.head.contains("\r\ndate: ")), "{wire}");
    // HEAD: the backend's length, no body.
    assert!(answers[2].head.contains("content-length: "), "{}", answers[2].head);
    assert!(answers[3].head.contains("connection: close"), "{}", answers[3].head);

    // HTTP/1.0 without keep-alive: answered with a length, then closed.
    let wire = raw(hr.addr, b"GET /e HTTP/1.0\r\nHost: a\r\n\r\n", T).await;
    let answers = split_responses(wire.as_bytes(), &[]);
    assert_eq!(answers.len(), 1);
    assert!(answers[0].head.contains("content-length: ") && answers[0].head.contains("connection: close"));

    // HTTP/1.0 with keep-alive: told so, and the connection carries a second request.
    let mut s = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    s.write_all(b"GET /f HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 8192];
    let n = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap().unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(first.contains("connection: keep-alive"), "{first}");
    s.write_all(b"GET /g HTTP/1.0\r\nHost: a\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut rest)).await.unwrap().unwrap();
    let second = split_responses(&rest, &[]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&second[0].body).unwrap()["uri"], "/g");

    // A body of unknown length: chunked for HTTP/1.1, until close for HTTP/1.0.
    let (streaming, mut streams) = streaming_backend().await;
    let hr2 = Headroom::start(&config(&[(streaming.addr, 1)], "", "")).await;
    tokio::spawn(async move {
        while let Some(events) = streams.recv().await {
            for part in ["data: one\n\n", "data: two\n\n"] {
                events.send(Bytes::from_static(part.as_bytes())).await.unwrap();
            }
        }
    });
    let wire = raw(hr2.addr, b"GET /s HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", T).await;
    let answers = split_responses(wire.as_bytes(), &[]);
    assert!(answers[0].head.contains("transfer-encoding: chunked"), "{wire}");
    assert_eq!(answers[0].body, b"data: one\n\ndata: two\n\n");
    let wire = raw(hr2.addr, b"GET /s HTTP/1.0\r\nHost: a\r\n\r\n", T).await;
    let answers = split_responses(wire.as_bytes(), &[]);
    assert!(!answers[0].head.contains("transfer-encoding") && !answers[0].head.contains("content-length"), "{wire}");
    assert_eq!(answers[0].body, b"data: one\n\ndata: two\n\n");
    hr.stop().await;
    hr2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_at_once_and_lets_a_request_in_flight_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (release, held) = watch::channel(false);
    let backend = TestBackend::start(move |req| {
        let mut held = held.clone();
        async move {
            if req.uri().path() == "/hold" {
                let _ = held.wait_for(|r| *r).await;
            }
            Response::new(full("done"))
        }
    })
    .await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "shutdown_timeout = \"20s\"")).await;

    // An idle keep-alive connection, after one request.
    let mut idle = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(T, idle.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // A request in flight on another.
    let mut busy = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    busy.write_all(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    poll_until(T, "request reached backend", || async { backend.hits.load(Ordering::SeqCst) == 2 }).await;

    let started = std::time::Instant::now();
    let stopping = tokio::spawn(hr.stop());
    // The idle connection is closed without a word, long before the drain period ends.
    let mut rest = Vec::new();
    tokio::time::timeout(T, idle.read_to_end(&mut rest)).await.expect("idle connection left open").unwrap();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(started.elapsed() < Duration::from_secs(5), "idle close took {:?}", started.elapsed());

    // The busy one gets its answer, marked as the last on this connection, then the close.
    release.send(true).unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(T, busy.read_to_end(&mut answer)).await.expect("busy connection left open").unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200") && answer.contains("connection: close"), "{answer}");
    assert!(answer.ends_with("done"), "{answer}");
    tokio::time::timeout(T, stopping).await.expect("drain did not finish").unwrap();
    assert!(started.elapsed() < Duration::from_secs(8), "drain took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_writes_a_whole_refused_body_before_reading_gets_its_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "max_request_body = \"1KiB\"")).await;
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
        // A 512 KiB body, refused by its declared length: the client writes all of it before it
        // reads, and still gets the answer (headroom closes with FIN, then reads and discards).
        let head = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 524288\r\n\r\n";
        s.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..8 {
            s.write_all(&chunk).await.expect("writing the body failed: the connection was reset");
        }
        let mut answer = Vec::new();
        let read = tokio::time::timeout(T, s.read_to_end(&mut answer)).await.expect("no answer");
        let text = String::from_utf8_lossy(&answer);
        assert!(read.is_ok(), "reading the answer failed: {read:?} after {text:?}");
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(text.contains("request body larger than"), "{text}");
    }
    assert_eq!(backend.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_that_stream_from_the_socket_give_the_connection_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(echo.addr, 1)], "", "")).await;
    let mut s = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    // A chunked body in slow pieces, then (in its last write) the next request, pipelined.
    s.write_all(b"POST /one HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
    for piece in [&b"4\r\nab"[..], b"cd\r\n", b"3;x=1\r\nefg\r\n", b"0\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\n"] {
        tokio::time::sleep(Duration::from_millis(30)).await;
        s.write_all(piece).await.unwrap();
    }
    // Then a 200 KiB body by length, larger than any one read, and a last request that closes.
    let big = vec![b'z'; 200 * 1024];
    s.write_all(format!("PUT /three HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n", big.len()).as_bytes())
        .await
        .unwrap();
    s.write_all(&big).await.unwrap();
    s.write_all(b"GET /four HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut wire = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut wire)).await.unwrap().unwrap();
    let answers = split_responses(&wire, &[]);
    let seen: Vec<serde_json::Value> = answers.iter().map(|a| serde_json::from_slice(&a.body).unwrap()).collect();
    let got: Vec<(&str, i64)> =
        seen.iter().map(|v| (v["uri"].as_str().unwrap(), v["body_len"].as_i64().unwrap())).collect();
    assert_eq!(got, [("/one", 7), ("/two", 0), ("/three", 200 * 1024), ("/four", 0)]);
    // All four came over one client connection, and the backend connection was reused.
    assert!(echo.connections.load(Ordering::SeqCst) <= 2, "{}", echo.connections.load(Ordering::SeqCst));
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
