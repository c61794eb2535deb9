//! Failures of backends: 502 and 504, and connect failures failed over to another backend.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::BodyExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

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
