//! `headroom load`: its statistics against a backend with known delays, its open-loop pacing, and
//! the command against a mock backend and the embedded default config.

mod common;

use common::*;
use headroom::load::{self, Mode, Plan};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_headroom");

fn plan(url: String, mode: Mode, duration: Duration) -> Plan {
    Plan {
        workload: None,
        engine_metrics: vec![],
        url: url.parse().unwrap(),
        method: http::Method::GET,
        headers: vec![],
        body: bytes::Bytes::new(),
        mode,
        duration,
        timeout: Duration::from_secs(10),
        max_inflight: 1000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percentiles_match_a_backend_with_fixed_delays() {
    // Every tenth request takes 200 ms, the others 20 ms: p50 ≈ 20, p90 ≈ 20, p99 ≈ 200.
    let n = Arc::new(AtomicU64::new(0));
    let backend = TestBackend::start(move |_req: hyper::Request<Incoming>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            let ms = if i % 10 == 9 { 200 } else { 20 };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            hyper::Response::new(full("ok"))
        }
    })
    .await;
    let p = plan(
        format!("http://{}/", backend.addr),
        Mode::Rate { per_second: 50.0, ramp: Duration::ZERO },
        Duration::from_secs(2),
    );
    let (report, _, _) = load::run_with_progress(&p, false).await;
    assert_eq!((report.sent, report.ok), (100, 100), "{}", report.table());
    let t = report.total_ms;
    eprintln!("total ms: p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}", t.p50, t.p90, t.p99, t.max);
    // Lower bounds are exact (the delays); upper bounds leave room for a loaded machine while
    // still telling the 20 ms class from the 200 ms one.
    assert!(t.p50 >= 20.0 && t.p50 < 150.0, "p50 {}", t.p50);
    assert!(t.p90 >= 20.0 && t.p90 < 150.0, "p90 {}: 90 of 100 take 20 ms", t.p90);
    assert!(t.p99 >= 200.0 && t.p99 < 400.0, "p99 {}: 10 of 100 take 200 ms", t.p99);
    assert!(t.max >= 200.0);
    assert_eq!(report.statuses["200"], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_pacing_holds_the_asked_rate() {
    let arrivals = Arc::new(AtomicU64::new(0));
    let a = arrivals.clone();
    let backend = TestBackend::start(move |_req: hyper::Request<Incoming>| {
        a.fetch_add(1, Ordering::SeqCst);
        async { hyper::Response::new(full("ok")) }
    })
    .await;
    let p = plan(
        format!("http://{}/", backend.addr),
        Mode::Rate { per_second: 200.0, ramp: Duration::ZERO },
        Duration::from_secs(3),
    );
    let (report, _, _) = load::run_with_progress(&p, false).await;
    eprintln!("asked 200/s, sent {:.2}/s, send lag p99 {:.2} ms", report.achieved_rate, report.send_lag_ms.p99);
    assert_eq!(report.sent, 600);
    assert_eq!(arrivals.load(Ordering::SeqCst), 600, "every request reached the backend");
    assert!((report.achieved_rate - 200.0).abs() <= 200.0 * 0.02, "achieved {:.2}/s", report.achieved_rate);
    assert_eq!(report.errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_shows_as_latency_not_as_a_lower_rate() {
    // One slot, 100 ms per request, 20 requests/s asked: an open loop keeps sending at 20/s and
    // the queueing shows in the latency (coordinated omission avoided).
    let backend = TestBackend::start(|_req: hyper::Request<Incoming>| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        hyper::Response::new(full("ok"))
    })
    .await;
    let cfg = config(&[(backend.addr, 1)], "max_inflight_per_backend = 1", "");
    let hr = Headroom::start(&cfg).await;
    let p = plan(hr.url("/"), Mode::Rate { per_second: 20.0, ramp: Duration::ZERO }, Duration::from_secs(2));
    let (report, _, _) = load::run_with_progress(&p, false).await;
    assert_eq!(report.sent, 40);
    assert!((report.achieved_rate - 20.0).abs() <= 0.4, "{}", report.achieved_rate);
    assert!(report.total_ms.p99 > 1000.0, "queueing must show in latency: p99 {}", report.total_ms.p99);
    hr.stop().await;
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Runs `headroom load ... --json` and parses the report.
fn load_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN).arg("load").args(args).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_streams_from_a_mock_backend_and_through_the_default_config() {
    let mock = free_addr();
    let mut backend = Command::new(BIN)
        .args([
            "mock-backend",
            "--listen",
            &mock.to_string(),
            "--ttft",
            "20ms",
            "--token-interval",
            "5ms",
            "--tokens",
            "8",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    poll_until(Duration::from_secs(10), "mock listening", || async move {
        tokio::net::TcpStream::connect(mock).await.is_ok()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("run.svg");
    let url = format!("http://{mock}/v1/chat/completions");
    let r = load_json(&[&url, "--rate", "20/s", "--duration", "1s", "--stream", "--plot", svg.to_str().unwrap()]);
    let _ = backend.kill();
    let _ = backend.wait();
    assert_eq!(r["ok"], 20, "{r}");
    assert_eq!(r["tokens_per_request"]["p50"], 8.0);
    assert!(r["ttft_ms"]["p50"].as_f64().unwrap() >= 20.0);
    assert!(r["itl_ms"]["count"].as_u64().unwrap() >= 20 * 7);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));

    // The embedded default config, on free ports.
    let text = std::fs::read_to_string("config/headroom.toml").unwrap();
    let (proxy, admin) = (free_addr(), free_addr());
    let text = text.replace("127.0.0.1:8080", &proxy.to_string()).replace("127.0.0.1:9901", &admin.to_string());
    let cfg = dir.path().join("headroom.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut hr = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    poll_until(Duration::from_secs(20), "headroom listening", || async move {
        tokio::net::TcpStream::connect(proxy).await.is_ok()
    })
    .await;
    let url = format!("http://{proxy}/v1/chat/completions");
    let r = load_json(&[&url, "--concurrency", "4", "--duration", "2s", "--stream", "--max-tokens", "4"]);
    stop_process(&mut hr);
    assert!(r["ok"].as_u64().unwrap() >= 4, "{r}");
    assert_eq!(r["errors"], 0);
    assert_eq!(r["tokens_per_request"]["max"], 4.0);
    assert_eq!(r["mode"], "closed loop, 4 clients");
}

#[test]
fn a_target_where_nothing_listens_stops_the_run_after_its_first_second() {
    let dead = free_addr();
    for mode in [&["--concurrency", "2"][..], &["--rate", "50/s"]] {
        let started = std::time::Instant::now();
        let url = format!("http://{dead}/v1/chat/completions");
        let out = Command::new(BIN).args(["load", &url, "--duration", "30s", "--json"]).args(mode).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{mode:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "{mode:?}: ran {:?}", started.elapsed());
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(report["stopped_early"].as_str().unwrap().contains("failed to connect"), "{report}");
        assert_eq!(report["ok"], 0);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("stopped early"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prompt_workloads_report_what_the_engines_prefix_cache_held() {
    let mock = free_addr();
    let mut backend = Command::new(BIN)
        .args(["mock-backend", "--listen", &mock.to_string(), "--ttft", "1ms", "--token-interval", "1ms"])
        .args(["--tokens", "4", "--prefix-cache-blocks", "1024", "--prefill-per-token", "10us"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    poll_until(Duration::from_secs(10), "mock listening", || async move {
        tokio::net::TcpStream::connect(mock).await.is_ok()
    })
    .await;
    let (url, metrics) = (format!("http://{mock}/v1/chat/completions"), format!("http://{mock}/metrics"));
    let shared = ["--workload", "shared-prefix", "--prefixes", "2", "--prefix-chars", "4000", "--suffix-chars", "100"];
    let r = load_json(
        &[&[url.as_str(), "--rate", "40/s", "--duration", "1s", "--engine-metrics", &metrics], &shared[..]].concat(),
    );
    let turns = ["--workload", "multi-turn", "--sessions", "4", "--turns", "3"];
    let t = load_json(&[&[url.as_str(), "--rate", "40/s", "--duration", "1s"], &turns[..]].concat());
    let _ = backend.kill();
    let _ = backend.wait();
    assert_eq!((r["ok"].as_u64(), r["errors"].as_u64()), (Some(40), Some(0)), "{r}");
    let hit = r["prefix_cache"]["hit_rate"].as_f64().unwrap();
    // Two prompts of 4,000 bytes: each missed once, then (15 whole blocks of about 16) cached.
    assert!(hit > 0.8 && hit < 0.97, "{r}");
    let engines = r["engine_prefix_hit_rate"].as_f64().unwrap();
    assert!((engines - hit).abs() < 0.01, "the engine's counters agree: {engines} vs {hit}");
    assert!(r["prefix_cache"]["hit_rate_later_turns"].is_null());
    assert!(r["ttft_ms"]["count"].as_u64() == Some(40), "TTFT of every streamed answer: {r}");
    let later = t["prefix_cache"]["hit_rate_later_turns"].as_f64().unwrap();
    assert!(later > 0.8, "turns 2 and 3 resend the conversation, cached: {t}");
    assert!(t["prefix_cache"]["hit_rate"].as_f64().unwrap() < later, "first turns are not");
}
