//! Active health checks with real backends: gating, fall, rise, killed backends, and traffic
//! following the states.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(10);

/// A backend answering `/health` with 200 or 503 as the flag says, and anything else with
/// `X-Backend: addr`.
async fn backend(healthy: Arc<AtomicBool>) -> TestBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    TestBackend::serve(listener, move |req: Request<hyper::body::Incoming>| {
        let (addr, healthy) = (addr.clone(), healthy.clone());
        async move {
            if req.uri().path() == "/health" {
                let status = if healthy.load(Ordering::SeqCst) { 200 } else { 503 };
                return Response::builder().status(status).body(full("")).unwrap();
            }
            Response::builder().header("x-backend", addr).body(full("ok")).unwrap()
        }
    })
}

const HEALTH: &str = "[pools.default.health]\ninterval = \"50ms\"\ntimeout = \"500ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2\n";

async fn states(hr: &Headroom) -> Vec<(String, String)> {
    hr.pools().await["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["addr"].as_str().unwrap().to_string(), b["state"].as_str().unwrap().to_string()))
        .collect()
}

async fn state_of(hr: &Headroom, addr: &str) -> String {
    states(hr).await.into_iter().find(|(a, _)| a == addr).unwrap().1
}

async fn served_by(hr: &Headroom, n: usize) -> Vec<String> {
    let c = client();
    let mut out = Vec::new();
    for _ in 0..n {
        let r = c.request(Request::get(hr.url("/x")).body(full(Bytes::new())).unwrap()).await.unwrap();
        assert_eq!(r.status(), 200);
        out.push(r.headers()["x-backend"].to_str().unwrap().to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_backend_is_ejected_and_readmitted() {
    let a_ok = Arc::new(AtomicBool::new(true));
    let a = backend(a_ok.clone()).await;
    let b = backend(Arc::new(AtomicBool::new(true))).await;
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let hr = Headroom::start(&format!("{}{HEALTH}", config(&[(a.addr, 1), (b.addr, 1)], "", ""))).await;

    poll_until(T, "both healthy", || async { states(&hr).await.iter().all(|(_, s)| s == "healthy") }).await;
    let (_, text) = get(&format!("http://{}/metrics", hr.admin)).await;
    let text = String::from_utf8(text.to_vec()).unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("headroom_health_checks_total")
            && l.contains(&a_addr)
            && l.contains("result=\"pass\"")),
        "no health check counter:\n{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("headroom_panic_mode{pool=\"default\"}")));
    let both = served_by(&hr, 20).await;
    assert!(both.contains(&a_addr) && both.contains(&b_addr));

    a_ok.store(false, Ordering::SeqCst);
    poll_until(T, "a unhealthy", || async { state_of(&hr, &a_addr).await == "unhealthy" }).await;
    assert!(served_by(&hr, 20).await.iter().all(|x| *x == b_addr), "traffic went to an unhealthy backend");

    a_ok.store(true, Ordering::SeqCst);
    poll_until(T, "a healthy again", || async { state_of(&hr, &a_addr).await == "healthy" }).await;
    poll_until(T, "a serves again", || async { served_by(&hr, 10).await.contains(&a_addr) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_turns_unhealthy_and_all_down_is_503() {
    let mut a = backend(Arc::new(AtomicBool::new(true))).await;
    let b_ok = Arc::new(AtomicBool::new(true));
    let b = backend(b_ok.clone()).await;
    let a_addr = a.addr.to_string();
    let hr = Headroom::start(&format!("{}{HEALTH}", config(&[(a.addr, 1), (b.addr, 1)], "", ""))).await;
    poll_until(T, "both healthy", || async { states(&hr).await.iter().all(|(_, s)| s == "healthy") }).await;

    a.stop(); // the listener goes away: probes are refused
    poll_until(T, "killed backend unhealthy", || async { state_of(&hr, &a_addr).await == "unhealthy" }).await;

    b_ok.store(false, Ordering::SeqCst);
    poll_until(T, "all unhealthy", || async { states(&hr).await.iter().all(|(_, s)| s == "unhealthy") }).await;
    let started = std::time::Instant::now();
    let (status, body) = get(&hr.url("/x")).await;
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("no backend available"));
    assert!(started.elapsed() < Duration::from_secs(5), "answered at once, not after queueing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_backends_wait_for_their_first_passing_check() {
    let a = backend(Arc::new(AtomicBool::new(false))).await; // never passes
    let b = backend(Arc::new(AtomicBool::new(true))).await;
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let hr = Headroom::start(&format!("{}{HEALTH}", config(&[(a.addr, 1), (b.addr, 1)], "", ""))).await;
    // Before any check has passed, nothing is served by a gated backend.
    assert_eq!(state_of(&hr, &a_addr).await, "starting");
    poll_until(T, "b admitted", || async { state_of(&hr, &b_addr).await == "healthy" }).await;
    // Several rounds later a is still gated and has served nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state_of(&hr, &a_addr).await, "starting");
    assert!(served_by(&hr, 20).await.iter().all(|x| *x == b_addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_in_the_queue_while_every_backend_is_starting() {
    let ok = Arc::new(AtomicBool::new(false));
    let a = backend(ok.clone()).await;
    let hr = Headroom::start(&format!(
        "{}{HEALTH}",
        config(&[(a.addr, 1)], "queue = { max_depth = 8, timeout = \"10s\" }", "")
    ))
    .await;
    let url = hr.url("/x");
    let waiting = tokio::spawn(async move { get(&url).await.0 });
    poll_until(T, "request queued", || async { hr.queue_depth().await == 1 }).await;
    assert_eq!(state_of(&hr, &a.addr.to_string()).await, "starting");
    ok.store(true, Ordering::SeqCst);
    assert_eq!(waiting.await.unwrap(), 200, "served once the backend passed its first check");
}

/// Answers every request with `status` and `X-Backend`.
async fn answering(status: u16) -> TestBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    TestBackend::serve(listener, move |_req| {
        let addr = addr.clone();
        async move { Response::builder().status(status).header("x-backend", addr).body(full("")).unwrap() }
    })
}

const OUTLIER: &str = "[pools.default.outlier]\nconsecutive_failures = 3\nbase_ejection = \"1s\"\nmax_ejection = \"2s\"\nmax_ejected_percent = 50\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_backend_is_ejected_by_real_traffic_and_readmitted() {
    let bad = answering(500).await;
    let good = answering(200).await;
    let bad_addr = bad.addr.to_string();
    let hr = Headroom::start(&format!("{}{OUTLIER}", config(&[(bad.addr, 1), (good.addr, 1)], "", ""))).await;

    // Traffic until the bad backend has failed three times in a row.
    let c = client();
    poll_until(T, "bad backend ejected", || {
        let (c, url) = (c.clone(), hr.url("/x"));
        let hr = &hr;
        let bad_addr = bad_addr.clone();
        async move {
            let _ = c.request(Request::get(url).body(full(Bytes::new())).unwrap()).await.unwrap();
            state_of(hr, &bad_addr).await == "ejected"
        }
    })
    .await;
    let hits_before = bad.hits.load(Ordering::SeqCst);
    for _ in 0..10 {
        let (status, _) = get(&hr.url("/x")).await;
        assert_eq!(status, 200, "an ejected backend was used");
    }
    assert_eq!(bad.hits.load(Ordering::SeqCst), hits_before);
    let (_, text) = get(&format!("http://{}/metrics", hr.admin)).await;
    let text = String::from_utf8(text.to_vec()).unwrap();
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix) && l.contains(&format!("backend=\"{bad_addr}\"")))
            .unwrap_or_else(|| panic!("no {prefix} for {bad_addr}:\n{text}"))
            .to_string()
    };
    assert!(line("headroom_ejections_total").ends_with(" 1"));
    assert!(line("headroom_backend_healthy").ends_with(" 0"));
    let ejected_state = text
        .lines()
        .find(|l| l.starts_with("headroom_backend_state") && l.contains(&bad_addr) && l.contains("state=\"ejected\""))
        .unwrap();
    assert!(ejected_state.ends_with(" 1"), "{ejected_state}");
    // Readmitted after base_ejection, without any health check.
    poll_until(T, "readmitted", || async { state_of(&hr, &bad_addr).await == "healthy" }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejection_never_takes_more_than_the_allowed_share() {
    let a = answering(500).await;
    let b = answering(500).await;
    let hr = Headroom::start(&format!("{}{OUTLIER}", config(&[(a.addr, 1), (b.addr, 1)], "", ""))).await;
    let mut saw_ejection = false;
    for _ in 0..20 {
        let (status, _) = get(&hr.url("/x")).await;
        assert_eq!(status, 500);
        let ejected = states(&hr).await.iter().filter(|(_, s)| s == "ejected").count();
        assert!(ejected <= 1, "more than 50% of the pool ejected");
        saw_ejection |= ejected == 1;
    }
    assert!(saw_ejection, "nothing was ejected at all");
}

/// A body that sends one event, then fails 50 ms later (after it went out on the wire).
struct BreaksLater {
    sent: bool,
    later: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for BreaksLater {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        use std::future::Future;
        if !self.sent {
            self.sent = true;
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(b"data: partial\n\n")))));
        }
        match self.later.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Some(Err(std::io::Error::other("backend crashed")))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_broken_by_the_backend_is_never_passed_off_as_complete() {
    let backend = TestBackend::start(|_req| async {
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(
                BreaksLater { sent: false, later: Box::pin(tokio::time::sleep(Duration::from_millis(50))) }
                    .map_err(|e| Box::new(e) as BoxError)
                    .boxed(),
            )
            .unwrap()
    })
    .await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "")).await;

    // HTTP/1.1: the chunked response is cut without its final chunk.
    let raw_resp = raw(hr.addr, b"GET /s HTTP/1.1\r\nHost: a\r\n\r\n", T).await;
    assert!(raw_resp.starts_with("HTTP/1.1 200"), "{raw_resp}");
    assert!(raw_resp.contains("data: partial"), "{raw_resp}");
    assert!(!raw_resp.ends_with("0\r\n\r\n"), "a broken stream ended like a complete one: {raw_resp:?}");

    // A client library sees an error, not a short but valid body; over h2 as well (RST_STREAM).
    let r = client().request(Request::get(hr.url("/s")).body(full(Bytes::new())).unwrap()).await.unwrap();
    assert!(r.into_body().collect().await.is_err());
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Body>();
    let r = h2.request(Request::get(hr.url("/s")).body(full(Bytes::new())).unwrap()).await.unwrap();
    assert!(r.into_body().collect().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_backends_serve_only_while_no_primary_is_up() {
    let primary_ok = Arc::new(AtomicBool::new(true));
    let primary = backend(primary_ok.clone()).await;
    let backup = backend(Arc::new(AtomicBool::new(true))).await;
    let (p_addr, b_addr) = (primary.addr.to_string(), backup.addr.to_string());
    let toml = format!(
        "[pools.default]\nmax_inflight_per_backend = 4\n[[pools.default.backends]]\naddr = \"{p_addr}\"\n\
         [[pools.default.backends]]\naddr = \"{b_addr}\"\nbackup = true\n{HEALTH}"
    );
    let hr = Headroom::start(&toml).await;
    poll_until(T, "both healthy", || async { states(&hr).await.iter().all(|(_, s)| s == "healthy") }).await;
    assert!(served_by(&hr, 20).await.iter().all(|x| *x == p_addr), "a backup served while the primary was up");

    primary_ok.store(false, Ordering::SeqCst);
    poll_until(T, "primary unhealthy", || async { state_of(&hr, &p_addr).await == "unhealthy" }).await;
    assert!(served_by(&hr, 20).await.iter().all(|x| *x == b_addr), "the backup did not take over");

    primary_ok.store(true, Ordering::SeqCst);
    poll_until(T, "primary back", || async { state_of(&hr, &p_addr).await == "healthy" }).await;
    assert!(served_by(&hr, 20).await.iter().all(|x| *x == p_addr), "traffic did not return to the primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_fails_open_when_too_few_backends_are_healthy() {
    let flags: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::new(AtomicBool::new(true))).collect();
    let mut backends = Vec::new();
    for f in &flags {
        backends.push(backend(f.clone()).await);
    }
    let addrs: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let hr = Headroom::start(&format!("{}{HEALTH}", config(&list, "panic_threshold = 0.5", ""))).await;
    poll_until(T, "all healthy", || async { states(&hr).await.iter().all(|(_, s)| s == "healthy") }).await;

    // One unhealthy of three: 2/3 healthy is above the threshold, the unhealthy one gets nothing.
    flags[0].store(false, Ordering::SeqCst);
    poll_until(T, "first unhealthy", || async { state_of(&hr, &addrs[0]).await == "unhealthy" }).await;
    assert!(!served_by(&hr, 30).await.contains(&addrs[0]));

    // Two of three: 1/3 is below 0.5, so traffic goes to every backend again (fail open).
    flags[1].store(false, Ordering::SeqCst);
    poll_until(T, "second unhealthy", || async { state_of(&hr, &addrs[1]).await == "unhealthy" }).await;
    let served = served_by(&hr, 30).await;
    for a in &addrs {
        assert!(served.contains(a), "{a} got no traffic in panic mode: {served:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_health_checks_an_ejected_backend_returns_only_after_passing_them() {
    // Its requests fail (500) but its health endpoint passes once allowed to.
    let health_ok = Arc::new(AtomicBool::new(false));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bad_addr = listener.local_addr().unwrap().to_string();
    let flag = health_ok.clone();
    let _bad = TestBackend::serve(listener, move |req: Request<hyper::body::Incoming>| {
        let flag = flag.clone();
        async move {
            let status = match req.uri().path() {
                "/health" if flag.load(Ordering::SeqCst) => 200,
                "/health" => 503,
                _ => 500,
            };
            Response::builder().status(status).body(full("")).unwrap()
        }
    });
    let good = answering(200).await;
    let toml = format!(
        "[pools.default]\n[[pools.default.backends]]\naddr = \"{bad_addr}\"\n[[pools.default.backends]]\naddr = \"{}\"\n\
         [pools.default.health]\ninterval = \"50ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 100\ngate_new_backends = false\n{OUTLIER}",
        good.addr
    );
    let hr = Headroom::start(&toml).await;
    let c = client();
    poll_until(T, "ejected by traffic", || {
        let (c, url, hr, bad_addr) = (c.clone(), hr.url("/x"), &hr, bad_addr.clone());
        async move {
            let _ = c.request(Request::get(url).body(full(Bytes::new())).unwrap()).await.unwrap();
            state_of(hr, &bad_addr).await == "ejected"
        }
    })
    .await;
    // The ejection (1 s) ends, but failing checks keep it out...
    poll_until(T, "ejection over", || async { state_of(&hr, &bad_addr).await == "unhealthy" }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(state_of(&hr, &bad_addr).await, "unhealthy");
    // ...until its checks pass.
    health_ok.store(true, Ordering::SeqCst);
    poll_until(T, "back after passing checks", || async { state_of(&hr, &bad_addr).await == "healthy" }).await;
}

/// `/health` by the flag; every other request is held until `release` turns true.
async fn holding_with_health(healthy: Arc<AtomicBool>, release: tokio::sync::watch::Receiver<bool>) -> TestBackend {
    TestBackend::start(move |req: Request<hyper::body::Incoming>| {
        let (healthy, mut release) = (healthy.clone(), release.clone());
        async move {
            if req.uri().path() == "/health" {
                let status = if healthy.load(Ordering::SeqCst) { 200 } else { 503 };
                return Response::builder().status(status).body(full("")).unwrap();
            }
            let _ = release.wait_for(|r| *r).await;
            Response::new(full("done"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_backend_ramps_up_with_slow_start() {
    let (release, rx) = tokio::sync::watch::channel(false);
    let a_ok = Arc::new(AtomicBool::new(true));
    let a = holding_with_health(a_ok.clone(), rx.clone()).await;
    let b = holding_with_health(Arc::new(AtomicBool::new(true)), rx.clone()).await;
    let a_addr = a.addr.to_string();
    let pool = "max_inflight_per_backend = 20\nslow_start = \"10s\"";
    let hr = Headroom::start(&format!("{}{HEALTH}", config(&[(a.addr, 1), (b.addr, 1)], pool, ""))).await;
    poll_until(T, "both healthy", || async { states(&hr).await.iter().all(|(_, s)| s == "healthy") }).await;

    // a goes down and comes back: it restarts at 10% of its weight and capacity.
    a_ok.store(false, Ordering::SeqCst);
    poll_until(T, "a unhealthy", || async { state_of(&hr, &a_addr).await == "unhealthy" }).await;
    a_ok.store(true, Ordering::SeqCst);
    poll_until(T, "a healthy", || async { state_of(&hr, &a_addr).await == "healthy" }).await;
    let view = hr.pools().await["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["addr"] == a_addr.as_str())
        .cloned()
        .unwrap();
    assert!(view["slow_start_percent"].as_u64().unwrap() < 30, "{view}");
    assert!(view["effective_max_inflight"].as_u64().unwrap() <= 6, "{view}");

    // Under 16 held requests, the ramping backend takes a small share.
    let reqs: Vec<_> = (0..16)
        .map(|_| {
            let url = hr.url("/x");
            tokio::spawn(async move { get(&url).await.0 })
        })
        .collect();
    poll_until(T, "16 in flight", || async { a.hits.load(Ordering::SeqCst) + b.hits.load(Ordering::SeqCst) >= 16 })
        .await;
    let in_flight: Vec<(String, u64)> = hr.in_flight().await;
    let on_a = in_flight.iter().find(|(x, _)| *x == a_addr).unwrap().1;
    assert!(on_a <= 6, "a ramping backend took {on_a} of 16");
    release.send(true).unwrap();
    for r in reqs {
        assert_eq!(r.await.unwrap(), 200);
    }
}

const RETRY: &str = "[pools.default.retry]\nattempts = 2\nbudget_percent = 100\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_elsewhere_for_replayable_requests_only() {
    let busy = answering(503).await;
    let fine = answering(200).await;
    let fine_addr = fine.addr.to_string();
    // The busy backend's weight makes it the first choice.
    let hr = Headroom::start(&format!("{}{RETRY}", config(&[(busy.addr, 1000), (fine.addr, 1)], "", ""))).await;
    for _ in 0..5 {
        let r = client().request(Request::get(hr.url("/x")).body(full(Bytes::new())).unwrap()).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-backend"], fine_addr.as_str());
    }
    // A POST is not idempotent: the 503 goes back to the client.
    let r = client().request(Request::post(hr.url("/x")).body(full(Bytes::new())).unwrap()).await.unwrap();
    assert_eq!(r.status(), 503);
    // A GET with a body cannot be replayed yet: not retried either.
    let r = client().request(Request::get(hr.url("/x")).body(full(Bytes::from_static(b"{}"))).unwrap()).await.unwrap();
    assert_eq!(r.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_under_load_costs_no_client_request() {
    let (release, rx) = tokio::sync::watch::channel(false);
    let mut doomed = holding_with_health(Arc::new(AtomicBool::new(true)), rx.clone()).await;
    let steady = answering(200).await;
    let pool = "max_inflight_per_backend = 500";
    let hr =
        Headroom::start(&format!("{}{HEALTH}{RETRY}", config(&[(doomed.addr, 1), (steady.addr, 1)], pool, ""))).await;
    poll_until(T, "both healthy", || async { states(&hr).await.iter().all(|(_, s)| s == "healthy") }).await;

    // 200 concurrent GETs; those on the doomed backend hang until it is killed.
    let started = std::time::Instant::now();
    let reqs: Vec<_> = (0..200)
        .map(|_| {
            let url = hr.url("/x");
            tokio::spawn(async move { get(&url).await.0 })
        })
        .collect();
    poll_until(T, "requests held by the doomed backend", || async { doomed.hits.load(Ordering::SeqCst) >= 20 }).await;
    let held = doomed.hits.load(Ordering::SeqCst);
    doomed.kill();
    let mut failed = 0;
    for r in reqs {
        if r.await.unwrap() != 200 {
            failed += 1;
        }
    }
    eprintln!("sent 200, {held} were on the killed backend, {failed} failed, all done in {:?}", started.elapsed());
    assert_eq!(failed, 0, "{failed} of 200 requests failed at the client");
    let killed_at = std::time::Instant::now();
    poll_until(T, "killed backend out of rotation", || async {
        state_of(&hr, &doomed.addr.to_string()).await == "unhealthy"
    })
    .await;
    eprintln!("out of rotation {:?} after the kill", killed_at.elapsed());
    drop(release);
}
