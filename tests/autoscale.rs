//! Elastic scaling end to end: a real headroom, real hyper backends, and real providers (a shell
//! script speaking the hook protocol, and the local provider starting `headroom mock-backend`
//! processes).

// Tests may lock; the rule is for the data path.
#![allow(clippy::disallowed_types)]

mod common;

use common::*;
use http::Method;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// The hook protocol in POSIX sh: logs each request with its time to `calls.log`, answers
/// `scale_up`/`replace` with addresses taken from `free` (one per line), and misbehaves as the
/// `mode` file says (ok, fail, garbage, hang).
const SCRIPT: &str = r#"#!/bin/sh
dir="$(dirname "$0")"
req="$(cat)"
mode="$(cat "$dir/mode")"
printf '%s %s\n' "$(date +%s.%N)" "$req" >> "$dir/calls.log"
case "$mode" in
  fail) echo "capacity service unavailable" >&2; exit 3 ;;
  garbage) echo "<html>502 Bad Gateway</html>"; exit 0 ;;
  hang) exec sleep 30 ;;
esac
case "$req" in
  *'"action":"scale_down"'*) exit 0 ;;
esac
count="$(printf '%s' "$req" | sed -n 's/.*"count":\([0-9]*\).*/\1/p')"
out=""
i=0
while [ "$i" -lt "$count" ]; do
  addr="$(head -n 1 "$dir/free")"
  [ -z "$addr" ] && break
  sed -i '1d' "$dir/free"
  out="$out${out:+,}{\"addr\":\"$addr\"}"
  i=$((i+1))
done
printf '{"backends":[%s]}\n' "$out"
"#;

struct ScriptProvider {
    dir: tempfile::TempDir,
}

impl ScriptProvider {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("provider.sh"), SCRIPT).unwrap();
        std::fs::write(dir.path().join("mode"), "ok").unwrap();
        std::fs::write(dir.path().join("free"), "").unwrap();
        ScriptProvider { dir }
    }

    /// The `[provider]` table for it.
    fn provider(&self, extra: &str) -> String {
        let script = self.dir.path().join("provider.sh");
        format!(
            "[pools.default.autoscale.provider]\nkind = \"command\"\ncommand = [\"sh\", \"{}\"]\n{extra}\n",
            script.display()
        )
    }

    fn offer(&self, addrs: &[SocketAddr]) {
        let mut free = std::fs::read_to_string(self.dir.path().join("free")).unwrap();
        for a in addrs {
            free.push_str(&format!("{a}\n"));
        }
        std::fs::write(self.dir.path().join("free"), free).unwrap();
    }

    fn set_mode(&self, mode: &str) {
        std::fs::write(self.dir.path().join("mode"), mode).unwrap();
    }

    /// Every call so far: (unix time, request).
    fn calls(&self) -> Vec<(f64, serde_json::Value)> {
        let log = std::fs::read_to_string(self.dir.path().join("calls.log")).unwrap_or_default();
        log.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(t, j)| (t.parse().unwrap(), serde_json::from_str(j).unwrap()))
            .collect()
    }

    fn calls_of(&self, action: &str) -> Vec<(f64, serde_json::Value)> {
        self.calls().into_iter().filter(|(_, r)| r["action"] == action).collect()
    }
}

/// A backend that answers after `delay` (`/slow`: after 4 s) and records when each request
/// ran, as unix-time intervals. `/health` answers at once: 200 while `ready`, else 503.
struct Timed {
    backend: TestBackend,
    spans: Arc<Mutex<Vec<(f64, f64)>>>,
    ready: Arc<AtomicBool>,
}

async fn timed(delay: Duration) -> Timed {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let ready = Arc::new(AtomicBool::new(true));
    let (s, r) = (spans.clone(), ready.clone());
    let backend = TestBackend::start(move |req: hyper::Request<Incoming>| {
        let (s, r) = (s.clone(), r.clone());
        async move {
            if req.uri().path() == "/health" {
                let status = if r.load(Ordering::SeqCst) { 200 } else { 503 };
                return hyper::Response::builder().status(status).body(full("")).unwrap();
            }
            let start = unix_now();
            let wait = if req.uri().path() == "/slow" { Duration::from_millis(4000) } else { delay };
            tokio::time::sleep(wait).await;
            s.lock().unwrap().push((start, unix_now()));
            hyper::Response::new(full("done"))
        }
    })
    .await;
    Timed { backend, spans, ready }
}

/// `n` clients sending GETs back to back until `stop`; returns (ok, failed).
fn load(url: String, n: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (url, stop, ok, failed) = (url.clone(), stop.clone(), ok.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let c = client();
                // Bounded: at most this many requests per client, whatever happens.
                for _ in 0..2_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let req = hyper::Request::get(&url).body(full("")).unwrap();
                    let good = match c.request(req).await {
                        Ok(r) if r.status() == 200 => r.into_body().collect().await.is_ok(),
                        _ => false,
                    };
                    if good { &ok } else { &failed }.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst))
    })
}

fn backends(pools: &serde_json::Value) -> Vec<(String, String)> {
    pools["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["addr"].as_str().unwrap().to_string(), b["state"].as_str().unwrap().to_string()))
        .collect()
}

async fn events(hr: &Headroom) -> Vec<serde_json::Value> {
    let pool = hr.pools().await["pools"][0]["name"].as_str().unwrap().to_string();
    let (status, v) = admin_call(hr.admin, Method::GET, &format!("/api/pools/{pool}/events"), "").await;
    assert_eq!(status, 200);
    v["events"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_scales_up_once_and_idle_scales_back_down_draining_first() {
    let provider = ScriptProvider::new();
    let fixed = timed(Duration::from_millis(150)).await;
    let (b1, b2) = (timed(Duration::from_millis(150)).await, timed(Duration::from_millis(150)).await);
    provider.offer(&[b1.backend.addr, b2.backend.addr]);
    // The new backends start unready: they stay `starting` (health-gated) until the test says.
    b1.ready.store(false, Ordering::SeqCst);
    b2.ready.store(false, Ordering::SeqCst);
    let pool = format!(
        "max_inflight_per_backend = 2\nqueue = {{ max_depth = 100, timeout = \"20s\" }}\n\
         [pools.default.health]\ninterval = \"100ms\"\nhealthy_threshold = 1\n\
         [pools.default.autoscale]\nmin_backends = 1\nmax_backends = 5\ntarget_inflight_per_backend = 2\n\
         scale_up_queue_depth = 2\nscale_up_window = \"300ms\"\nscale_down_window = \"2s\"\ncooldown = \"500ms\"\n{}",
        provider.provider("timeout = \"5s\"")
    );
    // A pool name of its own: the metrics recorder is shared by the tests in this process.
    let hr =
        Headroom::start(&config(&[(fixed.backend.addr, 1)], &pool, "").replace("pools.default", "pools.burst")).await;

    // A burst of 5 clients on 2 slots: the queue holds 3, above the threshold but below twice it,
    // so the window applies. 5 requests / 2 per backend = 3 backends: one call for 2 more.
    let stop = Arc::new(AtomicBool::new(false));
    let burst = load(hr.url("/work"), 5, stop.clone());
    poll_until(T, "the queue to reach the threshold", || async { hr.queue_depth().await >= 2 }).await;
    let crossed = unix_now();
    // While the new backends are starting, the queue stays high past the window and the
    // cooldown, with room under max_backends: they count as capacity, so nothing more is asked.
    poll_until(T, "the scale-up call", || async { provider.calls_of("scale_up").len() == 1 }).await;
    poll_until(T, "both new backends registered", || async { backends(&hr.pools().await).len() == 3 }).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let pools = hr.pools().await;
    assert!(pools["pools"][0]["queue_depth"].as_u64().unwrap() >= 2, "the queue stayed high: {pools}");
    assert_eq!(backends(&pools).iter().filter(|(_, s)| s == "starting").count(), 2, "{pools}");
    assert_eq!(provider.calls_of("scale_up").len(), 1, "asked again for capacity already on its way");
    let became_ready = unix_now();
    b1.ready.store(true, Ordering::SeqCst);
    b2.ready.store(true, Ordering::SeqCst);
    poll_until(T, "both new backends to take traffic", || async {
        !b1.spans.lock().unwrap().is_empty() && !b2.spans.lock().unwrap().is_empty()
    })
    .await;
    poll_until(T, "the queue to drain", || async { hr.queue_depth().await == 0 }).await;
    // Keep the burst on a while: nothing more may be asked for (capacity arrived).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let ups = provider.calls_of("scale_up");
    assert_eq!(ups.len(), 1, "exactly one scale-up call: {ups:?}");
    assert_eq!(ups[0].1["count"], 2);
    assert_eq!(ups[0].1["current"]["ready"], 1);
    let called = ups[0].0;
    let first_served = b1.spans.lock().unwrap()[0].0.min(b2.spans.lock().unwrap()[0].0);
    eprintln!(
        "threshold crossed -> hook called: {:.0} ms (window 300 ms); hook called -> registered: {:.0} ms; \
         health check passing -> first request on a new backend: {:.0} ms",
        (called - crossed) * 1000.0,
        (ups_done(&hr).await - called) * 1000.0,
        (first_served - became_ready) * 1000.0
    );
    // Below twice the threshold: the call came from the window, not from panic.
    let depth = ups[0].1["current"]["queue_depth"].as_u64().unwrap();
    assert!((2..4).contains(&depth), "queue depth at the call: {depth}");
    assert!(ups[0].1["reason"].as_str().unwrap().contains("stayed at or above 2"), "{:?}", ups[0].1);
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = burst.await.unwrap();

    // Idle, but one long request on each backend: the first release drains a busy backend. They
    // are sent one at a time (least_conn sends each to an idle backend), until every backend still
    // listed has one: the autoscaler may already have released an idle one meanwhile.
    let mut slow = Vec::new();
    while slow.len() < 3 && hr.in_flight().await.iter().any(|(_, n)| *n == 0) {
        slow.push(tokio::spawn(get_owned(hr.url("/slow"))));
        let sent = slow.len() as u64;
        poll_until(T, "the slow request in flight", || async {
            hr.in_flight().await.iter().map(|(_, n)| *n).sum::<u64>() >= sent
        })
        .await;
    }
    poll_until(T, "released down to min_backends", || async { backends(&hr.pools().await).len() == 1 }).await;
    for s in slow {
        assert_eq!(s.await.unwrap(), 200, "a draining backend's request was cut");
    }
    poll_until(T, "both scale_down calls", || async { provider.calls_of("scale_down").len() == 2 }).await;
    assert_eq!(backends(&hr.pools().await)[0].0, fixed.backend.addr.to_string(), "the configured backend stays");

    // Each scale_down came after its backend's last request ended, and one was drained while busy.
    let mut drained_busy = false;
    let evs = events(&hr).await;
    for (t, req) in provider.calls_of("scale_down") {
        let addr = req["backends"][0].as_str().unwrap().to_string();
        let spans = if addr == b1.backend.addr.to_string() { &b1.spans } else { &b2.spans };
        let spans = spans.lock().unwrap().clone();
        assert!(spans.iter().all(|(_, end)| *end <= t), "scale_down for {addr} before its last request ended");
        let ev = evs.iter().find(|e| e["action"] == "scale_down" && e["backends"][0] == addr.as_str()).unwrap();
        let released_at = ev["time"].as_f64().unwrap() - ev["duration_ms"].as_f64().unwrap() / 1000.0;
        drained_busy |= spans.iter().any(|(start, end)| *start < released_at && *end > released_at);
        assert_eq!(ev["outcome"], "ok");
    }
    assert!(drained_busy, "no backend was released while a request ran on it");
    assert_eq!(provider.calls_of("scale_up").len(), 1, "scaled up again after the burst");
    eprintln!("burst: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "requests failed during the cycle");
    assert!(ok > 20);

    let metrics = String::from_utf8(get(&format!("http://{}/metrics", hr.admin)).await.1.to_vec()).unwrap();
    for needle in [
        "headroom_scale_events_total{pool=\"burst\",action=\"scale_up\",outcome=\"ok\"} 1",
        "headroom_scale_events_total{pool=\"burst\",action=\"scale_down\",outcome=\"ok\"} 2",
        "headroom_desired_backends{pool=\"burst\"} 1",
        "headroom_backends{pool=\"burst\",state=\"healthy\"} 1",
        "headroom_provision_seconds_count{pool=\"burst\"} 2",
    ] {
        assert!(metrics.contains(needle), "missing {needle}");
    }
    hr.stop().await;
}

/// When the first scale-up call finished (its event's time).
async fn ups_done(hr: &Headroom) -> f64 {
    events(hr).await.iter().find(|e| e["action"] == "scale_up").unwrap()["time"].as_f64().unwrap()
}

async fn get_owned(url: String) -> u16 {
    get(&url).await.0.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_hanging_or_garbled_provider_is_retried_with_backoff_while_traffic_flows() {
    let provider = ScriptProvider::new();
    let fixed = timed(Duration::from_millis(50)).await;
    let extra = timed(Duration::from_millis(50)).await;
    provider.offer(&[extra.backend.addr]);
    provider.set_mode("fail");
    let pool = format!(
        "max_inflight_per_backend = 2\nqueue = {{ max_depth = 100, timeout = \"20s\" }}\n\
         [pools.default.autoscale]\nmax_backends = 2\ntarget_inflight_per_backend = 2\n\
         scale_up_queue_depth = 1\nscale_up_window = \"100ms\"\ncooldown = \"300ms\"\n{}",
        provider.provider("timeout = \"300ms\"\nretry_backoff = \"100ms\"")
    );
    let hr = Headroom::start(&config(&[(fixed.backend.addr, 1)], &pool, "")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(hr.url("/work"), 4, stop.clone());

    poll_until(T, "two failed calls", || async { provider.calls().len() >= 2 }).await;
    provider.set_mode("garbage");
    let n = provider.calls().len();
    poll_until(T, "a call answered with garbage", || async { provider.calls().len() > n }).await;
    provider.set_mode("hang");
    let n = provider.calls().len();
    poll_until(T, "a call that hangs", || async { provider.calls().len() > n }).await;
    let hung = provider.calls().len();
    provider.set_mode("ok");
    poll_until(T, "the new backend to serve", || async { !extra.spans.lock().unwrap().is_empty() }).await;
    // At max_backends now: the load goes on and no more calls are made.
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = traffic.await.unwrap();

    let calls = provider.calls();
    assert_eq!(calls.len(), hung + 1, "one successful call after the failures, then none: {calls:?}");
    // The wait between failed calls doubles: 100, 200, 400 ms ... (lower bounds; a loaded
    // machine only makes them longer).
    let starts: Vec<f64> = calls.iter().map(|(t, _)| *t).collect();
    for (k, pair) in starts.windows(2).enumerate() {
        let least = 0.1 * (1 << k) as f64 * 0.9;
        assert!(pair[1] - pair[0] >= least, "call {} came {:.3}s after the previous one", k + 1, pair[1] - pair[0]);
    }
    let errors: Vec<String> =
        events(&hr).await.iter().filter_map(|e| e["error"].as_str().map(str::to_string)).collect();
    assert!(
        errors.iter().any(|e| e.contains("exited with") && e.contains("capacity service unavailable")),
        "{errors:?}"
    );
    assert!(errors.iter().any(|e| e.contains("invalid reply")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("no reply within 300ms")), "{errors:?}");
    assert_eq!(backends(&hr.pools().await).len(), 2, "max_backends holds");
    eprintln!("during provider failures: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "the proxy stopped serving while the provider failed");
    assert!(ok > 10);
    let metrics = String::from_utf8(get(&format!("http://{}/metrics", hr.admin)).await.1.to_vec()).unwrap();
    let failed =
        metric_value(&metrics, "headroom_scale_events_total{pool=\"default\",action=\"scale_up\",outcome=\"error\"}");
    assert!(failed >= 3.0, "failed calls counted: {failed}");
    hr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_backend_is_replaced_through_the_provider() {
    let provider = ScriptProvider::new();
    let fixed = TestBackend::ok().await;
    let sick = Arc::new(AtomicBool::new(false));
    let s = sick.clone();
    let doomed = TestBackend::start(move |req: hyper::Request<Incoming>| {
        let sick = s.load(Ordering::SeqCst) && req.uri().path() == "/health";
        async move {
            let status = if sick { 500 } else { 200 };
            hyper::Response::builder().status(status).body(full("")).unwrap()
        }
    })
    .await;
    let fresh = TestBackend::ok().await;
    provider.offer(&[doomed.addr, fresh.addr]);
    // min_backends 2 with one in the file: the provider is asked for one at start.
    let pool = format!(
        "[pools.default.health]\ninterval = \"50ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 2\n\
         [pools.default.autoscale]\nmin_backends = 2\nmax_backends = 3\nreplace_unhealthy_after = \"300ms\"\n{}",
        provider.provider("")
    );
    let hr = Headroom::start(&config(&[(fixed.addr, 1)], &pool, "")).await;
    let doomed_addr = doomed.addr.to_string();
    poll_until(T, "the asked-for backend healthy", || async {
        backends(&hr.pools().await).contains(&(doomed_addr.clone(), "healthy".into()))
    })
    .await;
    assert_eq!(provider.calls_of("scale_up")[0].1["reason"], "below min_backends");

    sick.store(true, Ordering::SeqCst);
    let fresh_addr = fresh.addr.to_string();
    poll_until(T, "the replacement healthy and the sick one gone", || async {
        let b = backends(&hr.pools().await);
        b.contains(&(fresh_addr.clone(), "healthy".into())) && !b.iter().any(|(a, _)| *a == doomed_addr)
    })
    .await;
    let replaced = provider.calls_of("replace");
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert_eq!(replaced[0].1["backends"][0], doomed_addr.as_str());
    assert_eq!(provider.calls_of("scale_up").len(), 1, "the replacement was not asked for twice");
    let ev = events(&hr).await;
    assert!(ev.iter().any(|e| e["action"] == "replace"
        && e["outcome"] == "ok"
        && e["reason"].as_str().unwrap().contains("replace_unhealthy_after")));
    hr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_from_zero_with_the_local_provider_and_back_to_zero() {
    let cfg = format!(
        "[pools.default]\nqueue = {{ max_depth = 16, timeout = \"20s\" }}\n\
         [pools.default.launch]\ncommand = [\"{}\", \"mock-backend\", \"--listen\", \"{{addr}}\", \"--ttft\", \"5ms\", \"--tokens\", \"2\"]\n\
         count = 0\n\
         [pools.default.autoscale]\nmin_backends = 0\nmax_backends = 1\nscale_down_window = \"500ms\"\ncooldown = \"200ms\"\n",
        env!("CARGO_BIN_EXE_headroom")
    );
    let hr = Headroom::start(&cfg).await;
    assert!(backends(&hr.pools().await).is_empty(), "starts with no backend");
    let started = std::time::Instant::now();
    let (status, body) = get(&hr.url("/v1/models")).await;
    assert_eq!(status, 200, "{body:?}");
    eprintln!("scale from zero: first request answered after {:?}", started.elapsed());
    let ev = events(&hr).await;
    assert_eq!(ev[0]["action"], "scale_up");
    assert!(ev[0]["reason"].as_str().unwrap().contains("scale from zero"), "{ev:?}");
    let addr: SocketAddr = ev[0]["backends"][0].as_str().unwrap().parse().unwrap();

    // Idle: released again, and the process is gone.
    poll_until(T, "scaled back to zero", || async { backends(&hr.pools().await).is_empty() }).await;
    poll_until(T, "the scale_down event", || async {
        events(&hr).await.iter().any(|e| e["action"] == "scale_down" && e["outcome"] == "ok")
    })
    .await;
    poll_until(T, "the local process stopped", || async { tokio::net::TcpStream::connect(addr).await.is_err() }).await;
    hr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_backends_survive_a_restart_and_a_corrupt_state_file_is_reported_not_fatal() {
    let state = tempfile::tempdir().unwrap();
    let (fixed, added) = (TestBackend::ok().await, TestBackend::ok().await);
    let cfg = config(&[(fixed.addr, 1)], "", &format!("state_dir = \"{}\"", state.path().display()));
    let hr = Headroom::start(&cfg).await;
    let (status, body) =
        admin_call(hr.admin, Method::POST, "/api/pools/default/backends", "{\"addr\": \"nope\"}").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("expected ip:port"), "{body}");
    let reg = format!("{{\"addr\": \"{}\", \"weight\": 7}}", added.addr);
    assert_eq!(admin_call(hr.admin, Method::POST, "/api/pools/default/backends", &reg).await.0, 201);
    hr.stop().await;

    let hr = Headroom::start(&cfg).await;
    let pools = hr.pools().await;
    let restored =
        pools["pools"][0]["backends"].as_array().unwrap().iter().find(|b| b["addr"] == added.addr.to_string());
    let restored = restored.expect("the registered backend was not restored");
    assert_eq!((restored["weight"].as_u64(), restored["dynamic"].as_bool()), (Some(7), Some(true)));
    let before = added.hits.load(Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(get(&hr.url("/")).await.0, 200);
    }
    assert!(added.hits.load(Ordering::SeqCst) > before, "the restored backend takes traffic");
    // Deregistered: gone from the file too.
    let path = format!("/api/pools/default/backends/{}", added.addr);
    assert_eq!(admin_call(hr.admin, Method::DELETE, &path, "").await.0, 200);
    let saved = std::fs::read_to_string(state.path().join("dynamic-backends.json")).unwrap();
    assert!(!saved.contains(&added.addr.to_string()), "{saved}");
    hr.stop().await;

    std::fs::write(state.path().join("dynamic-backends.json"), "{\"version\": 1, \"pools\": {\"default\": [{").unwrap();
    let hr = Headroom::start(&cfg).await;
    assert_eq!(get(&hr.url("/")).await.0, 200, "a corrupt state file stopped headroom");
    let status = hr.config_status().await;
    assert!(status["state_error"].as_str().unwrap().contains("not a valid state file"), "{status}");
    assert_eq!(backends(&hr.pools().await).len(), 1);
    hr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_provider_posts_the_request_with_a_bearer_token_and_registers_the_reply() {
    let fixed = TestBackend::ok().await;
    let added = TestBackend::ok().await;
    // (Authorization header, request) per call.
    type Calls = Arc<Mutex<Vec<(Option<String>, serde_json::Value)>>>;
    let seen: Calls = Arc::default();
    let (log, reply) = (seen.clone(), format!("{{\"backends\": [{{\"addr\": \"{}\", \"weight\": 3}}]}}", added.addr));
    let hook = TestBackend::start(move |req: hyper::Request<Incoming>| {
        let (log, reply) = (log.clone(), reply.clone());
        async move {
            let auth = req.headers().get("authorization").map(|v| v.to_str().unwrap().to_string());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            log.lock().unwrap().push((auth, serde_json::from_slice(&body).unwrap()));
            hyper::Response::new(full(reply))
        }
    })
    .await;
    // A variable of this test's own: nothing else reads it.
    std::env::set_var("HEADROOM_TEST_WEBHOOK_TOKEN", "s3cret");
    let pool = format!(
        "[pools.default.autoscale]\nmin_backends = 2\nmax_backends = 2\n\
         [pools.default.autoscale.provider]\nkind = \"webhook\"\nurl = \"http://{}/scale?pool=default\"\n\
         token_env = \"HEADROOM_TEST_WEBHOOK_TOKEN\"\ntimeout = \"2s\"\n",
        hook.addr
    );
    let hr = Headroom::start(&config(&[(fixed.addr, 1)], &pool, "")).await;
    let addr = added.addr.to_string();
    poll_until(T, "the webhook's backend registered", || async {
        backends(&hr.pools().await).iter().any(|(a, _)| *a == addr)
    })
    .await;
    let calls = seen.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].0.as_deref(), Some("Bearer s3cret"));
    assert_eq!(calls[0].1["action"], "scale_up");
    assert_eq!(calls[0].1["count"], 1);
    assert_eq!(calls[0].1["pool"], "default");
    let pools = hr.pools().await;
    let b = pools["pools"][0]["backends"].as_array().unwrap().iter().find(|b| b["addr"] == addr.as_str()).unwrap();
    assert_eq!(b["weight"], 3);
    hr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_returns_thousands_of_backends_for_one_gets_one_and_hands_the_rest_back() {
    let dir = tempfile::tempdir().unwrap();
    // Answers every scale_up with 3,000 addresses; logs every call.
    let script = r#"#!/bin/sh
dir="$(dirname "$0")"
req="$(cat)"
printf '%s\n' "$req" >> "$dir/calls.log"
case "$req" in *'"action":"scale_down"'*) exit 0 ;; esac
seq 20000 22999 | awk 'BEGIN { printf "{\"backends\":[" } { printf "%s{\"addr\":\"127.0.0.1:%s\"}", (NR > 1 ? "," : ""), $1 } END { print "]}" }'
"#;
    std::fs::write(dir.path().join("provider.sh"), script).unwrap();
    let fixed = TestBackend::ok().await;
    let pool = format!(
        "[pools.default.autoscale]\nmin_backends = 2\nmax_backends = 4\ncooldown = \"1h\"\n\
         [pools.default.autoscale.provider]\nkind = \"command\"\ncommand = [\"sh\", \"{}\"]\ntimeout = \"10s\"\n",
        dir.path().join("provider.sh").display()
    );
    let hr = Headroom::start(&config(&[(fixed.addr, 1)], &pool, "").replace("pools.default", "pools.surplus")).await;
    let log = dir.path().join("calls.log");
    let calls = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    poll_until(T, "the surplus handed back", || async { calls().iter().any(|c| c["action"] == "scale_down") }).await;
    let ups: Vec<_> = calls().into_iter().filter(|c| c["action"] == "scale_up").collect();
    assert_eq!(ups.len(), 1, "{ups:?}");
    assert_eq!(ups[0]["count"], 1);
    let down = calls().into_iter().find(|c| c["action"] == "scale_down").unwrap();
    assert_eq!(down["count"], 2999);
    assert_eq!(down["backends"].as_array().unwrap().len(), 2999);
    let listed = backends(&hr.pools().await);
    assert_eq!(listed.len(), 2, "the fixed backend and the one asked for: {listed:?}");
    assert!(listed.iter().any(|(a, _)| a == "127.0.0.1:20000"), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_from_a_provider_is_replaced_on_passive_signals_without_health_checks() {
    let provider = ScriptProvider::new();
    let live = TestBackend::ok().await;
    // The first backend the provider hands out refuses every connection; the next one works.
    provider.offer(&[dead_addr().await, live.addr]);
    let pool = format!(
        "[pools.default.autoscale]\nmin_backends = 1\nmax_backends = 2\ncooldown = \"100ms\"\n\
         replace_unhealthy_after = \"500ms\"\n{}",
        provider.provider("timeout = \"5s\"")
    );
    let text = format!("[pools.passive]\n{}", pool.replace("pools.default", "pools.passive"));
    let hr = Headroom::start(&text).await;
    poll_until(T, "the first backend registered", || async { backends(&hr.pools().await).len() == 1 }).await;
    // Every request fails (502) until the dead backend is replaced; no [health], no [outlier].
    let mut failed = 0;
    let served = async {
        for _ in 0..400 {
            if get(&hr.url("/")).await.0 == 200 {
                return true;
            }
            failed += 1;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    };
    assert!(tokio::time::timeout(T, served).await.unwrap_or(false), "never served after {failed} failures");
    assert!(failed > 0, "the dead backend was tried first");
    let replaced = provider.calls_of("replace");
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert_eq!(backends(&hr.pools().await), vec![(live.addr.to_string(), "healthy".to_string())]);
}
