//! Balancing end to end: weighted least-connection under load and one request at a time, and routes
//! choosing pools by host and path.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;

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
