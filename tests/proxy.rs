//! The data path end to end, what is left after the concerns split out (balancing, streaming,
//! http1, limits, failover): upstream connection reuse, h2c, metrics and the admin API, several
//! workers, shutdown.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::BodyExt;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;

const T: Duration = Duration::from_secs(10);

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
        assert_forwarded_once(&seen, hr.addr);
    }
}

/// The headers headroom adds, each once, as a backend that echoes them saw them.
fn assert_forwarded_once(seen: &serde_json::Value, proxy: std::net::SocketAddr) {
    let h = &seen["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{seen}");
    assert_eq!(h["x-forwarded-proto"], "http", "{seen}");
    assert_eq!(h["x-forwarded-host"], proxy.to_string(), "{seen}");
    assert_eq!(h["forwarded"], format!("for=127.0.0.1;proto=http;host=\"{proxy}\""), "{seen}");
    assert!(h["via"].as_str().is_some_and(|v| v.starts_with("1.1 headroom-") && !v.contains('|')), "{seen}");
    let id = h["x-request-id"].as_str().unwrap_or("");
    assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_failed_over_from_an_unreachable_h2c_backend_carries_the_forwarding_headers_once() {
    let dead = dead_addr().await;
    let echo = TestBackend::echo().await;
    // The unreachable backend is nearly always picked first; the echo one answers after failover.
    let hr = Headroom::start(&config(&[(dead, 1000), (echo.addr, 1)], "protocol = \"h2c\"", "")).await;
    for _ in 0..3 {
        let (status, body) = get(&hr.url("/up")).await;
        assert_eq!(status, 200);
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["version"], "HTTP/2.0");
        assert_forwarded_once(&seen, hr.addr);
    }
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
