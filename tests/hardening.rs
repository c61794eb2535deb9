//! What a hostile client, a hostile web page or a careless operator must not be able to do: drive
//! the admin API from a browser, register addresses no backend may have, erase the forwarding
//! headers, loop a request back into headroom, or crash it with a config value.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::BodyExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

/// An admin request with these headers: (status, JSON body).
async fn admin(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, serde_json::Value) {
    let mut b = Request::builder().method(method).uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let r = client().request(b.body(full(Bytes::from(body.to_string()))).unwrap()).await.unwrap();
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
}

fn backend_addrs(pools: &serde_json::Value) -> Vec<String> {
    pools["pools"][0]["backends"].as_array().unwrap().iter().map(|b| b["addr"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_cannot_register_drain_or_reload_through_the_admin_api() {
    let (backend, other) = (TestBackend::ok().await, TestBackend::ok().await);
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let reg = format!("{{\"addr\": \"{}\"}}", other.addr);
    let drain = format!("/api/pools/default/backends/{}/drain", backend.addr);
    // What a cross-origin "simple" request from a page looks like.
    let page = [("origin", "http://evil.example"), ("content-type", "text/plain"), ("sec-fetch-site", "cross-site")];
    assert_eq!(admin(hr.admin, "POST", "/api/pools/default/backends", &page, &reg).await.0, 403);
    assert_eq!(admin(hr.admin, "POST", &drain, &page, "").await.0, 403);
    assert_eq!(admin(hr.admin, "POST", "/api/reload", &page, "").await.0, 403);
    // Each browser signal alone is enough, and a text body without an Origin is refused too.
    assert_eq!(admin(hr.admin, "POST", &drain, &[("origin", "http://localhost:3000")], "").await.0, 403);
    assert_eq!(admin(hr.admin, "POST", &drain, &[("sec-fetch-site", "same-site")], "").await.0, 403);
    let text = [("content-type", "text/plain")];
    assert_eq!(admin(hr.admin, "POST", "/api/pools/default/backends", &text, &reg).await.0, 415);
    assert_eq!(admin(hr.admin, "POST", "/api/pools/default/backends", &[], &reg).await.0, 415);
    // A page whose name was rebound to 127.0.0.1 sends its own name as Host.
    let rebound = [("host", "evil.example:9901")];
    assert_eq!(admin(hr.admin, "GET", "/api/pools", &rebound, "").await.0, 403);

    let pools = hr.pools().await;
    assert_eq!(backend_addrs(&pools), vec![backend.addr.to_string()], "nothing was registered");
    assert_eq!(pools["pools"][0]["backends"][0]["state"], "healthy", "nothing was drained");
    let metrics = get(&format!("http://{}/metrics", hr.admin)).await.1;
    let page = String::from_utf8_lossy(&metrics);
    assert!(metric_value(&page, "headroom_admin_requests_refused_total{reason=\"origin\"}") >= 5.0, "{page}");

    // The same calls from the listener's own origin, with JSON, work.
    let json = [("content-type", "application/json")];
    let own = format!("http://{}", hr.admin);
    let same = [("origin", own.as_str()), ("sec-fetch-site", "same-origin"), ("content-type", "application/json")];
    assert_eq!(admin(hr.admin, "POST", "/api/pools/default/backends", &same, &reg).await.0, 201);
    assert_eq!(admin(hr.admin, "POST", &drain, &json, "").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_every_mutating_admin_call_needs_the_bearer_and_reads_do_not() {
    let backend = TestBackend::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let token = "s3cret-token-0123456789";
    std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
    let text = config(&[(backend.addr, 1)], "", "")
        .replace("[pools.default]", &format!("[admin]\ntoken_file = {:?}\n[pools.default]", dir.path().join("token")));
    let hr = Headroom::start(&text).await;
    let drain = format!("/api/pools/default/backends/{}/drain", backend.addr);
    let (status, body) = admin(hr.admin, "POST", &drain, &[], "").await;
    assert_eq!(status, 401, "{body}");
    let wrong = [("authorization", "Bearer s3cret-token-0123456788")];
    assert_eq!(admin(hr.admin, "POST", &drain, &wrong, "").await.0, 401);
    assert_eq!(admin(hr.admin, "POST", "/api/reload", &[], "").await.0, 401);
    assert_eq!(hr.pools().await["pools"][0]["backends"][0]["state"], "healthy");
    // Reads need no token; a named Host is fine once a token guards the API.
    assert_eq!(admin(hr.admin, "GET", "/api/pools", &[("host", "headroom.internal")], "").await.0, 200);
    let bearer = format!("Bearer {token}");
    let (status, body) = admin(hr.admin, "POST", &drain, &[("authorization", bearer.as_str())], "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "draining");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_no_backend_may_have_are_refused_with_the_rule_named() {
    let backend = TestBackend::ok().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let admin_addr = hr.admin.to_string();
    let proxy_addr = hr.addr.to_string();
    let cases = [
        ("169.254.169.254:80", "link-local"),
        ("[fe80::1]:80", "link-local"),
        ("0.0.0.0:9901", "unspecified"),
        ("[::]:9901", "unspecified"),
        ("255.255.255.255:80", "broadcast"),
        ("224.0.0.1:80", "multicast"),
        ("127.0.0.1:0", "port 0"),
        (admin_addr.as_str(), "headroom itself listens"),
        (proxy_addr.as_str(), "headroom itself listens"),
    ];
    for (addr, rule) in cases {
        let (status, body) = admin_call(
            hr.admin,
            http::Method::POST,
            "/api/pools/default/backends",
            &format!("{{\"addr\": \"{addr}\"}}"),
        )
        .await;
        assert_eq!(status, 400, "{addr}: {body}");
        assert!(body["error"].as_str().unwrap().contains(rule), "{addr}: {body}");
    }
    let (status, body) = admin_call(
        hr.admin,
        http::Method::POST,
        "/api/pools/default/backends",
        &format!("{{\"addr\": \"{}\", \"max_inflight\": 0}}", dead_addr().await),
    )
    .await;
    assert_eq!(status, 400, "max_inflight 0 is refused, not changed to 1: {body}");
    assert_eq!(backend_addrs(&hr.pools().await), vec![backend.addr.to_string()]);

    // The config file is held to the same rules, with the line and column.
    let text = config(&[(backend.addr, 1), ("169.254.169.254:80".parse().unwrap(), 1)], "", "");
    let e = headroom::config::Config::parse(&text, std::path::Path::new(".")).unwrap_err();
    assert!(e.message.contains("link-local") && e.line.is_some(), "{e}");
    let allowed = text.replace("[pools.default]", "[admin]\nallow_link_local_backends = true\n[pools.default]");
    assert!(headroom::config::Config::parse(&allowed, std::path::Path::new(".")).is_ok());
    let own = config(&[(backend.addr, 1), ("127.0.0.1:9901".parse().unwrap(), 1)], "", "");
    let e = headroom::config::Config::parse(&own, std::path::Path::new(".")).unwrap_err();
    assert!(e.message.contains("headroom itself listens"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_comes_back_around_gets_508_at_once() {
    // a → b → a: a's only backend is b, and b's is a.
    let dead = dead_addr().await;
    let a = Headroom::start(&config(&[(dead, 1)], "", "")).await;
    let b = Headroom::start(&config(&[(a.addr, 1)], "", "")).await;
    let reg = format!("{{\"addr\": \"{}\"}}", b.addr);
    assert_eq!(admin_call(a.admin, http::Method::POST, "/api/pools/default/backends", &reg).await.0, 201);
    let drain = format!("/api/pools/default/backends/{dead}/drain");
    assert_eq!(admin_call(a.admin, http::Method::POST, &drain, "").await.0, 200);

    let started = std::time::Instant::now();
    let resp = raw(a.addr, b"GET /x HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n", T).await;
    assert!(resp.starts_with("HTTP/1.1 508"), "{resp}");
    assert!(started.elapsed() < Duration::from_secs(2), "answered at once, took {:?}", started.elapsed());
    let page = String::from_utf8_lossy(&get(&format!("http://{}/metrics", a.admin)).await.1).into_owned();
    assert!(metric_value(&page, "headroom_loops_detected_total") >= 1.0, "{page}");
    // Nothing is left holding a slot.
    poll_until(T, "no request in flight on either", || async {
        a.in_flight().await.iter().all(|(_, n)| *n == 0) && b.in_flight().await.iter().all(|(_, n)| *n == 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_listing_cannot_erase_what_headroom_tells_the_backend() {
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let req = "GET /x HTTP/1.1\r\nHost: api.example\r\nX-Request-Id: client-id-1\r\nVia: 1.1 edge\r\n\
               Connection: close, forwarded, x-forwarded-for, via, x-forwarded-proto, x-forwarded-host, x-request-id, host\r\n\r\n";
    let resp = raw(hr.addr, req.as_bytes(), T).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    let seen: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {resp}"));
    let h = &seen["headers"];
    assert_eq!(h["host"], "api.example", "{h}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{h}");
    assert_eq!(h["x-forwarded-proto"], "http", "{h}");
    assert_eq!(h["x-forwarded-host"], "api.example", "{h}");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=\"api.example\"", "{h}");
    assert!(h["via"].as_str().is_some_and(|v| v.starts_with("1.1 edge, 1.1 headroom-")), "{h}");
    assert_eq!(h["x-request-id"], "client-id-1", "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_authority_get_400_and_reach_no_backend() {
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    for req in [
        "GET / HTTP/1.0\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: u@evil.example\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: evil.example:80x\r\n\r\n",
        "GET http://u@evil.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
        // An invalid Host is refused even where the target's authority overrides it.
        "GET http://a.example/ HTTP/1.1\r\nHost: a b\r\n\r\n",
    ] {
        let resp = raw(hr.addr, req.as_bytes(), T).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{req:?} → {resp}");
    }
    assert_eq!(backend.hits.load(Ordering::SeqCst), 0);
    let ok = raw(hr.addr, b"GET / HTTP/1.0\r\nHost: a.example:8080\r\n\r\n", T).await;
    assert!(ok.starts_with("HTTP/1.0 200") || ok.starts_with("HTTP/1.1 200"), "{ok}");
}

#[test]
fn a_duration_past_seven_days_is_refused_by_check_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("headroom.toml");
    let text = "[server]\nrequest_header_timeout = \"18446744073709551615s\"\n[pools.default]\n\
                [[pools.default.backends]]\naddr = \"127.0.0.1:9001\"\n";
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_headroom"))
        .arg("--config")
        .arg(&path)
        .arg("check")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains(":2:26:") && said.contains("server.request_header_timeout") && said.contains("7d"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_timeouts_allowed_serve_heads_that_arrive_in_pieces() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = TestBackend::ok().await;
    let server = "request_header_timeout = \"7d\"\nidle_timeout = \"7d\"\nshutdown_timeout = \"7d\"";
    let pool = "connect_timeout = \"7d\"\nresponse_header_timeout = \"7d\"\nstream_idle_timeout = \"7d\"";
    let hr = Headroom::start(&config(&[(backend.addr, 1)], pool, server)).await;
    let mut s = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"st: a.example\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out)).await.unwrap().unwrap();
    assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
    assert_eq!(get(&hr.url("/")).await.0, 200, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_that_cannot_be_saved_answers_500_and_changes_nothing() {
    let (backend, other) = (TestBackend::ok().await, TestBackend::ok().await);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let server = format!("state_dir = {state:?}");
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", &server)).await;
    // The state directory turns into a file: nothing can be written there any more.
    let _ = std::fs::remove_dir_all(&state);
    std::fs::write(&state, "not a directory").unwrap();
    let reg = format!("{{\"addr\": \"{}\"}}", other.addr);
    let (status, body) = admin_call(hr.admin, http::Method::POST, "/api/pools/default/backends", &reg).await;
    assert_eq!(status, 500, "{body}");
    assert!(body["error"].as_str().unwrap().contains("state file"), "{body}");
    assert_eq!(backend_addrs(&hr.pools().await), vec![backend.addr.to_string()]);
    // Writable again: the same registration goes through.
    std::fs::remove_file(&state).unwrap();
    assert_eq!(admin_call(hr.admin, http::Method::POST, "/api/pools/default/backends", &reg).await.0, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_request_body_is_the_clients_fault_not_the_backends() {
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    for body in ["5;a\rb\r\nhello\r\n0\r\n\r\n", "5\r\nhello\r\n0\r\ngarbage\r\n\r\n", "5;x\0\r\nhello\r\n0\r\n\r\n"] {
        let req = format!("POST /x HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
        let resp = raw(hr.addr, req.as_bytes(), T).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{body:?} → {resp}");
    }
    let page = String::from_utf8_lossy(&get(&format!("http://{}/metrics", hr.admin)).await.1).into_owned();
    let on_backend = format!("headroom_requests_total{{pool=\"default\",backend=\"{}\",code=\"400\"}}", backend.addr);
    assert_eq!(metric_value(&page, &on_backend), 0.0, "counted against the backend:\n{page}");
    let backend_side = hr.pools().await["pools"][0]["backends"][0]["errors"].as_u64().unwrap();
    assert_eq!(backend_side, 0, "the backend's error count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_request_whose_body_is_one_empty_data_frame_goes_upstream_without_a_body() {
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let tcp = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("http://{}/x", hr.addr)).body(()).unwrap();
    let (resp, mut stream) = client.send_request(req, false).unwrap();
    stream.send_data(Bytes::new(), true).unwrap();
    let resp = tokio::time::timeout(T, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    let seen: serde_json::Value = serde_json::from_slice(&got).unwrap();
    let h = &seen["headers"];
    assert!(h.get("transfer-encoding").is_none(), "sent upstream as chunked: {h}");
    assert!(h.get("content-length").is_none_or(|v| v == "0"), "{h}");
    assert_eq!(seen["body_len"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backend_leaves_no_series_behind() {
    let (backend, other) = (TestBackend::ok().await, TestBackend::ok().await);
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;
    let reg = format!("{{\"addr\": \"{}\"}}", other.addr);
    assert_eq!(admin_call(hr.admin, http::Method::POST, "/api/pools/default/backends", &reg).await.0, 201);
    let scrape =
        || async { String::from_utf8_lossy(&get(&format!("http://{}/metrics", hr.admin)).await.1).into_owned() };
    let series = |page: &str| -> usize {
        page.lines().filter(|l| !l.starts_with('#') && l.contains(&format!("backend=\"{}\"", other.addr))).count()
    };
    // Traffic to both, so each has request counters too.
    for _ in 0..10 {
        assert_eq!(get(&hr.url("/")).await.0, 200);
    }
    let page = scrape().await;
    let served = format!("headroom_requests_total{{pool=\"default\",backend=\"{}\",code=\"200\"}}", other.addr);
    assert!(metric_value(&page, &served) >= 1.0, "{page}");
    assert_eq!(series(&page), 10, "in-flight, healthy, five states, connects, ejections, requests:\n{page}");
    assert_eq!(
        metric_value(&page, &format!("headroom_backend_healthy{{pool=\"default\",backend=\"{}\"}}", other.addr)),
        1.0
    );
    let path = format!("/api/pools/default/backends/{}", other.addr);
    assert_eq!(admin_call(hr.admin, http::Method::DELETE, &path, "").await.0, 200);
    poll_until(T, "the backend gone from the pool", || async { backend_addrs(&hr.pools().await).len() == 1 }).await;
    let page = scrape().await;
    assert_eq!(series(&page), 0, "{page}");
}
