//! Reading the engines' own load (`[pools.X.engine]`): a mock engine loaded by a client that
//! bypasses headroom shows its queue in `/api/pools`; a backend whose metrics do not answer
//! shows none, and stays healthy; with `balance = "least_load"` new requests go around an engine
//! whose own queue is long, where `least_conn` does not see it.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use std::time::Duration;
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(10);

/// A mock engine serving 2 requests at once, each taking 30 s before its first token.
async fn slow_engine() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let opts = headroom::mock::MockOptions { capacity: 2, ttft: Duration::from_secs(30), ..Default::default() };
    tokio::spawn(headroom::mock::serve(l, opts, std::future::pending()));
    addr
}

fn engine_of(pools: &serde_json::Value, addr: &str) -> serde_json::Value {
    let backends = pools["pools"][0]["backends"].as_array().unwrap();
    backends.iter().find(|b| b["addr"] == addr).map(|b| b["engine"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engines_own_queue_shows_in_the_api_and_a_silent_one_shows_none() {
    let engine = slow_engine().await;
    let silent =
        TestBackend::start(|_req| async { http::Response::builder().status(404).body(full("")).unwrap() }).await;
    let section = "[pools.default.engine]\ninterval = \"100ms\"\nkind = \"vllm\"\n";
    let hr = Headroom::start(&format!("{}{section}", config(&[(engine, 1), (silent.addr, 1)], "", ""))).await;

    // Five completions straight to the engine, not through headroom: two run, three wait.
    let url = format!("http://{engine}/v1/completions");
    let _load: Vec<_> = (0..5)
        .map(|_| {
            let req = Request::post(url.clone()).body(full(Bytes::from_static(b"{\"prompt\":\"hi\"}"))).unwrap();
            tokio::spawn(client().request(req))
        })
        .collect();
    let addr = engine.to_string();
    poll_until(T, "the engine's queue in /api/pools", || async {
        let e = engine_of(&hr.pools().await, &addr);
        e["requests_running"] == 2 && e["requests_waiting"] == 3
    })
    .await;
    let pools = hr.pools().await;
    let e = engine_of(&pools, &addr);
    assert!(e["age_ms"].as_u64().unwrap() <= 300, "{e}");
    assert_eq!(pools["pools"][0]["in_flight"], 0, "none of that load went through headroom");
    let (_, metrics) = get(&format!("http://{}/metrics", hr.admin)).await;
    let metrics = String::from_utf8_lossy(&metrics);
    let line = format!("headroom_engine_requests_waiting{{pool=\"default\",backend=\"{addr}\"}} 3");
    assert!(metrics.contains(&line), "{line} in {metrics}");
    let silent_line = format!("headroom_engine_requests_waiting{{pool=\"default\",backend=\"{}\"}}", silent.addr);
    assert!(!metrics.contains(&silent_line), "a backend without a reading has no engine series");

    // The backend whose metrics answer 404 has no reading, and is not held against it.
    let silent_addr = silent.addr.to_string();
    assert_eq!(engine_of(&pools, &silent_addr), serde_json::Value::Null);
    let backends = pools["pools"][0]["backends"].as_array().unwrap();
    assert!(backends.iter().all(|b| b["state"] == "healthy"), "{pools}");
}

/// Requests each backend of the first pool has served, by address.
fn served(pools: &serde_json::Value, addr: &str) -> u64 {
    let backends = pools["pools"][0]["backends"].as_array().unwrap();
    backends.iter().find(|b| b["addr"] == addr).and_then(|b| b["requests"].as_u64()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_load_sends_new_requests_around_an_engine_with_a_long_queue_and_least_conn_does_not() {
    let (idle, busy) = (slow_engine().await, slow_engine().await);
    // Ten completions straight to `busy`: two run, eight wait in its own scheduler.
    let url = format!("http://{busy}/v1/completions");
    let _load: Vec<_> = (0..10)
        .map(|_| {
            let req = Request::post(url.clone()).body(full(Bytes::from_static(b"{\"prompt\":\"hi\"}"))).unwrap();
            tokio::spawn(client().request(req))
        })
        .collect();
    let engine = "[pools.default.engine]\ninterval = \"100ms\"\nkind = \"vllm\"\n";
    let mut busy_share = Vec::new();
    for balance in ["least_load", "least_conn"] {
        let pool = format!("balance = \"{balance}\"");
        let hr = Headroom::start(&format!("{}{engine}", config(&[(idle, 1), (busy, 1)], &pool, ""))).await;
        let busy_addr = busy.to_string();
        poll_until(T, "busy's queue read", || async {
            engine_of(&hr.pools().await, &busy_addr)["requests_waiting"] == 8
        })
        .await;
        // Twenty quick requests (the engine's health page), one at a time: headroom's own
        // in-flight count is 0 for both backends at every pick.
        for _ in 0..20 {
            assert_eq!(get(&hr.url("/health")).await.0, 200);
        }
        busy_share.push(served(&hr.pools().await, &busy_addr));
    }
    assert_eq!(busy_share[0], 0, "least_load: none to the engine with eight waiting");
    assert!(busy_share[1] >= 5, "least_conn takes turns regardless: {} of 20", busy_share[1]);
}

/// A provider that answers every scale-up with the one address in its `offer` file.
const OFFER_ONE: &str = r#"#!/bin/sh
req="$(cat)"
case "$req" in
  *'"action":"scale_up"'*) printf '{"backends":[{"addr":"%s"}]}\n' "$(cat "$(dirname "$0")/offer")" ;;
esac
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engines_own_queues_scale_a_pool_whose_gateway_queue_stays_empty() {
    let (busy, spare) = (slow_engine().await, slow_engine().await);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("provider.sh"), OFFER_ONE).unwrap();
    std::fs::write(dir.path().join("offer"), spare.to_string()).unwrap();
    // Capacity so high that headroom would admit everything at once: its own queue never forms.
    let pool = format!(
        "max_inflight_per_backend = 1000\n\
         [pools.default.engine]\ninterval = \"100ms\"\n\
         [pools.default.autoscale]\nsignal = \"engine_queue\"\nmin_backends = 1\nmax_backends = 2\n\
         target_inflight_per_backend = 2\nscale_up_queue_depth = 2\nscale_up_window = \"300ms\"\ncooldown = \"60s\"\n\
         [pools.default.autoscale.provider]\nkind = \"command\"\ncommand = [\"sh\", \"{}\"]\n",
        dir.path().join("provider.sh").display()
    );
    let hr = Headroom::start(&config(&[(busy, 1)], &pool, "")).await;

    // Another client of the same engine: two requests run, four wait in the engine's scheduler.
    let url = format!("http://{busy}/v1/completions");
    let _load: Vec<_> = (0..6)
        .map(|_| {
            let req = Request::post(url.clone()).body(full(Bytes::from_static(b"{\"prompt\":\"hi\"}"))).unwrap();
            tokio::spawn(client().request(req))
        })
        .collect();
    let spare_addr = spare.to_string();
    poll_until(T, "the spare engine added by the autoscaler", || async {
        hr.pools().await["pools"][0]["backends"].as_array().unwrap().iter().any(|b| b["addr"] == spare_addr)
    })
    .await;
    let pools = hr.pools().await;
    assert_eq!(
        (pools["pools"][0]["queue_depth"].as_u64(), pools["pools"][0]["in_flight"].as_u64()),
        (Some(0), Some(0))
    );
    let (status, v) = admin_call(hr.admin, http::Method::GET, "/api/pools/default/events", "").await;
    assert_eq!(status, 200);
    let up = v["events"].as_array().unwrap().iter().find(|e| e["action"] == "scale_up").cloned().unwrap();
    assert!(up["reason"].as_str().unwrap().contains("queue depth 4"), "the engine's four waiting requests: {up}");
}
