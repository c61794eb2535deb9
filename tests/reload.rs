//! Hot reload with a real config file on disk, real backends and real clients: reloads under
//! load, state carried over, removed backends draining, each way of writing a file, bad files.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const T: Duration = Duration::from_secs(10);

fn write_now(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Waits until `/api/config` counts `n` applied reloads; returns how long that took.
async fn until_reloads(hr: &Headroom, n: u64) -> Duration {
    let start = Instant::now();
    loop {
        let status = hr.config_status().await;
        let got = status["reloads"].as_u64().unwrap();
        assert!(got <= n, "more reloads applied than files written: {got} > {n}");
        if got == n {
            return start.elapsed();
        }
        assert!(start.elapsed() < T, "reload {n} not applied: {status}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn dir_with(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("headroom.toml");
    write_now(&path, text);
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_under_load_fail_no_request() {
    let (a, b, c) = (TestBackend::ok().await, TestBackend::ok().await, TestBackend::ok().await);
    let text = |i: usize| {
        let mut backends: Vec<(SocketAddr, u32)> = vec![(a.addr, 1), (b.addr, if i % 4 < 2 { 1 } else { 3 })];
        if i % 2 == 1 {
            backends.push((c.addr, 1));
        }
        config(&backends, "", "")
    };
    let (_dir, path) = dir_with(&text(0));
    let hr = Headroom::start_file(&path).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let (url, stop, ok, failed) = (hr.url("/x"), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let c = client();
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    match c.request(Request::get(url.clone()).body(full(Bytes::new())).unwrap()).await {
                        Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::SeqCst),
                        _ => failed.fetch_add(1, Ordering::SeqCst),
                    };
                }
            })
        })
        .collect();
    let mut took = Vec::new();
    for i in 1..=100 {
        write_now(&path, &text(i));
        took.push(until_reloads(&hr, i as u64).await);
    }
    stop.store(true, Ordering::SeqCst);
    for t in clients {
        t.await.unwrap();
    }
    took.sort();
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!(
        "100 reloads: {ok} requests ok, {failed} failed; write to applied: median {:?}, max {:?}",
        took[50], took[99]
    );
    assert_eq!(failed, 0);
    assert!(ok > 100, "the load did not run");
    assert!(c.hits.load(Ordering::SeqCst) > 0, "the added backend never served");
}

/// Answers `/hold` with an event stream that sends one event at once and ends only once
/// `release` turns true; answers other paths at once.
async fn holding(release: watch::Receiver<bool>) -> TestBackend {
    TestBackend::start(move |req: Request<hyper::body::Incoming>| {
        let mut release = release.clone();
        async move {
            if req.uri().path() != "/hold" {
                return http::Response::new(full("done"));
            }
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"data: first\n\n")).await;
                let _ = release.wait_for(|r| *r).await;
                let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
            });
            http::Response::builder().header("content-type", "text/event-stream").body(body).unwrap()
        }
    })
    .await
}

/// A whole `/hold` stream: (status, body ends with the final event).
async fn stream_to_end(url: String) -> (u16, bool) {
    let r = client().request(Request::get(url).body(full(Bytes::new())).unwrap()).await.unwrap();
    let status = r.status().as_u16();
    match http_body_util::BodyExt::collect(r.into_body()).await {
        Ok(b) => (status, b.to_bytes().ends_with(b"data: [DONE]\n\n")),
        Err(_) => (status, false),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_backends_keep_their_state_and_removed_ones_finish_their_streams() {
    let (release, rx) = watch::channel(false);
    let kept = holding(rx.clone()).await;
    let removed = holding(rx.clone()).await;
    let failing =
        TestBackend::start(|_req| async { http::Response::builder().status(500).body(full("")).unwrap() }).await;
    let outlier =
        "[pools.default.outlier]\nconsecutive_failures = 1\nbase_ejection = \"60s\"\nmax_ejected_percent = 50\n";
    let first = format!("{}{outlier}", config(&[(kept.addr, 1), (removed.addr, 1), (failing.addr, 1)], "", ""));
    let (_dir, path) = dir_with(&first);
    let hr = Headroom::start_file(&path).await;

    // The failing backend gets ejected; the two others hold requests.
    poll_until(T, "failing backend ejected", || async {
        let _ = get(&hr.url("/x")).await;
        hr.pools().await["pools"][0]["backends"][2]["state"] == "ejected"
    })
    .await;
    let held: Vec<_> = (0..6)
        .map(|_| {
            let url = hr.url("/hold");
            tokio::spawn(stream_to_end(url))
        })
        .collect();
    // All six streams open, spread over the two holding backends.
    poll_until(T, "streams held on both", || async {
        let f = hr.in_flight().await;
        let on = |addr: SocketAddr| f.iter().find(|(a, _)| *a == addr.to_string()).map_or(0, |x| x.1);
        on(kept.addr) + on(removed.addr) == 6 && on(kept.addr) >= 1 && on(removed.addr) >= 1
    })
    .await;
    let before = hr.in_flight().await;

    // Reload: `removed` leaves the file, the weight of `kept` changes.
    let second = format!("{}{outlier}", config(&[(kept.addr, 5), (failing.addr, 1)], "", ""));
    write_now(&path, &second);
    until_reloads(&hr, 1).await;
    let pools = hr.pools().await;
    let backends = pools["pools"][0]["backends"].as_array().unwrap();
    let view = |addr: SocketAddr| backends.iter().find(|b| b["addr"] == addr.to_string().as_str()).cloned();
    let k = view(kept.addr).unwrap();
    let held_on_kept = before.iter().find(|(a, _)| *a == kept.addr.to_string()).unwrap().1;
    assert_eq!(k["in_flight"].as_u64().unwrap(), held_on_kept, "in-flight count lost: {k}");
    assert_eq!(k["weight"], 5);
    assert_eq!(view(failing.addr).unwrap()["state"], "ejected", "ejection lost");
    let r = view(removed.addr).expect("a removed backend with requests in flight stays listed");
    assert_eq!(r["state"], "draining", "{r}");
    let held_on_removed = before.iter().find(|(a, _)| *a == removed.addr.to_string()).unwrap().1;
    assert_eq!(r["in_flight"].as_u64().unwrap(), held_on_removed, "{r}");

    // New requests never go to the removed backend; its held requests still finish.
    let removed_hits = removed.hits.load(Ordering::SeqCst);
    let more: Vec<_> = (0..4)
        .map(|_| {
            let url = hr.url("/hold");
            tokio::spawn(stream_to_end(url))
        })
        .collect();
    poll_until(T, "new requests held on kept", || async {
        hr.in_flight().await.iter().find(|(a, _)| *a == kept.addr.to_string()).map_or(0, |x| x.1) == held_on_kept + 4
    })
    .await;
    assert_eq!(removed.hits.load(Ordering::SeqCst), removed_hits);
    release.send(true).unwrap();
    for r in held.into_iter().chain(more) {
        assert_eq!(r.await.unwrap(), (200, true), "a stream was cut");
    }
    // Idle now, it leaves.
    poll_until(T, "removed backend gone", || async {
        let pools = hr.pools().await;
        pools["pools"][0]["backends"].as_array().unwrap().iter().all(|b| b["addr"] != removed.addr.to_string().as_str())
    })
    .await;
    assert_eq!(hr.config_status().await["reloads"], 1, "leaving is not a reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_of_writing_the_file_reloads_once_and_bad_files_change_nothing() {
    let (a, b) = (TestBackend::ok().await, TestBackend::ok().await);
    let one = config(&[(a.addr, 1)], "", "");
    let two = config(&[(a.addr, 1), (b.addr, 1)], "", "");
    let (dir, path) = dir_with(&one);
    let hr = Headroom::start_file(&path).await;
    let backends = |hr_pools: serde_json::Value| hr_pools["pools"][0]["backends"].as_array().unwrap().len();

    // In place: same inode, overwritten from the start and cut to length.
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all(two.as_bytes()).unwrap();
    f.set_len(two.len() as u64).unwrap();
    f.sync_all().unwrap();
    drop(f);
    until_reloads(&hr, 1).await;
    assert_eq!(backends(hr.pools().await), 2);

    // Truncate, then write in two halves with a pause: the half-written file is never applied.
    let mut f = std::fs::File::create(&path).unwrap();
    let (head, tail) = one.split_at(one.len() / 2);
    f.write_all(head.as_bytes()).unwrap();
    f.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(40)).await;
    f.write_all(tail.as_bytes()).unwrap();
    f.flush().unwrap();
    drop(f);
    until_reloads(&hr, 2).await;
    assert_eq!(backends(hr.pools().await), 1);
    assert!(hr.config_status().await["last_error"].is_null(), "the half-written file was read");

    // Write a temporary file and rename it over.
    let tmp = dir.path().join(".headroom.toml.tmp");
    write_now(&tmp, &two);
    std::fs::rename(&tmp, &path).unwrap();
    until_reloads(&hr, 3).await;
    assert_eq!(backends(hr.pools().await), 2);
    // Nothing more arrives late.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(hr.config_status().await["reloads"], 3);

    // A bad file: nothing changes, and the error says where.
    let hash = hr.config_status().await["hash"].clone();
    write_now(&path, &two.replace("[pools.default]", "[pools.default]\nbalance = \"fastest\""));
    poll_until(T, "error reported", || async { !hr.config_status().await["last_error"].is_null() }).await;
    let status = hr.config_status().await;
    let error = status["last_error"].as_str().unwrap();
    assert!(error.contains("headroom.toml:") && error.contains("balance"), "{error}");
    assert_eq!(status["hash"], hash);
    assert_eq!(status["reloads"], 3);
    assert_eq!(backends(hr.pools().await), 2);
    assert_eq!(get(&hr.url("/x")).await.0, 200);
    let (_, metrics) = get(&format!("http://{}/metrics", hr.admin)).await;
    let metrics = String::from_utf8(metrics.to_vec()).unwrap();
    assert!(metric_value(&metrics, "headroom_config_reloads_total{outcome=\"error\"}") >= 1.0, "{metrics}");
    assert!(metrics.contains("headroom_config_last_reload_timestamp_seconds"));

    // POST /api/reload reports the same error, then applies a fixed file.
    let c = client();
    let r = c
        .request(Request::post(format!("http://{}/api/reload", hr.admin)).body(full(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    write_now(&path, &one);
    until_reloads(&hr, 4).await;
    let r = c
        .request(Request::post(format!("http://{}/api/reload", hr.admin)).body(full(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hr.config_status().await["reloads"], 5);
    assert_eq!(backends(hr.pools().await), 1);
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_addresses_are_added_and_removed_without_disturbing_the_others() {
    let (release, rx) = watch::channel(false);
    let backend = holding(rx).await;
    let (a, b) = (free_addr(), free_addr());
    let with = |listen: &[SocketAddr]| {
        let list: Vec<String> = listen.iter().map(|l| format!("\"{l}\"")).collect();
        config(&[(backend.addr, 1)], "", &format!("listen = [{}]", list.join(", ")))
    };
    let (_dir, path) = dir_with(&with(&[a]));
    // Started on an ephemeral listener standing for `a`.
    let hr = Headroom::start_file(&path).await;
    let held = tokio::spawn(stream_to_end(hr.url("/hold")));
    poll_until(T, "request held", || async { backend.hits.load(Ordering::SeqCst) >= 1 }).await;

    // Add `b`: it serves, and the first listener still does.
    write_now(&path, &with(&[a, b]));
    until_reloads(&hr, 1).await;
    assert_eq!(get(&format!("http://{b}/x")).await.0, 200);
    assert_eq!(get(&hr.url("/x")).await.0, 200);

    // Drop `a`: its listener stops accepting, its open request still finishes, `b` serves on.
    write_now(&path, &with(&[b]));
    until_reloads(&hr, 2).await;
    poll_until(T, "first listener closed", || async { tokio::net::TcpStream::connect(hr.addr).await.is_err() }).await;
    assert_eq!(get(&format!("http://{b}/x")).await.0, 200);
    release.send(true).unwrap();
    assert_eq!(held.await.unwrap(), (200, true), "the stream on the removed listener was cut");

    // An address that cannot be bound rejects the reload as a whole.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    write_now(&path, &with(&[b, busy]).replace("weight = 1", "weight = 7"));
    poll_until(T, "error reported", || async { !hr.config_status().await["last_error"].is_null() }).await;
    let error = hr.config_status().await["last_error"].as_str().unwrap().to_string();
    assert!(error.contains(&busy.to_string()), "{error}");
    assert_eq!(hr.pools().await["pools"][0]["backends"][0]["weight"], 1, "a rejected reload changed the weights");
    assert_eq!(get(&format!("http://{b}/x")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_registered_through_the_api_serve_survive_reloads_and_drain_on_delete() {
    let (fixed, added) = (TestBackend::ok().await, TestBackend::ok().await);
    let (_dir, path) = dir_with(&config(&[(fixed.addr, 1)], "", ""));
    let hr = Headroom::start_file(&path).await;
    let c = client();
    let call = |method: http::Method, path: &str, body: &str| {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", hr.admin))
            .header("content-type", "application/json")
            .body(full(Bytes::from(body.to_string())))
            .unwrap();
        let c = c.clone();
        async move {
            let r = c.request(req).await.unwrap();
            let status = r.status().as_u16();
            let body = http_body_util::BodyExt::collect(r.into_body()).await.unwrap().to_bytes();
            (status, serde_json::from_slice::<serde_json::Value>(&body).unwrap())
        }
    };
    let listed = |pools: serde_json::Value| -> Vec<String> {
        pools["pools"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["addr"].as_str().unwrap().to_string())
            .collect()
    };

    let reg = format!("{{\"addr\": \"{}\", \"weight\": 1000}}", added.addr);
    let (status, body) = call(http::Method::POST, "/api/pools/default/backends", &reg).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["state"], "healthy");
    assert_eq!(get(&hr.url("/x")).await.0, 200);
    assert!(added.hits.load(Ordering::SeqCst) >= 1, "the registered backend took no traffic");
    // Refusals: twice the same address, an unknown pool, bad input, a backend from the file.
    assert_eq!(call(http::Method::POST, "/api/pools/default/backends", &reg).await.0, 409);
    assert_eq!(call(http::Method::POST, "/api/pools/nope/backends", &reg).await.0, 404);
    assert_eq!(call(http::Method::POST, "/api/pools/default/backends", "{\"addr\": \"x\"}").await.0, 400);
    assert_eq!(call(http::Method::POST, "/api/pools/default/backends", "not json").await.0, 400);
    let fixed_path = format!("/api/pools/default/backends/{}", fixed.addr);
    assert_eq!(call(http::Method::DELETE, &fixed_path, "").await.0, 409);

    // A reload of the file keeps it.
    write_now(&path, &config(&[(fixed.addr, 2)], "", ""));
    until_reloads(&hr, 1).await;
    assert!(listed(hr.pools().await).contains(&added.addr.to_string()), "a reload dropped a registered backend");

    // DELETE: no new requests; gone once idle.
    let (status, body) = call(http::Method::DELETE, &format!("/api/pools/default/backends/{}", added.addr), "").await;
    assert_eq!(status, 200, "{body}");
    poll_until(T, "deregistered backend gone", || async {
        !listed(hr.pools().await).contains(&added.addr.to_string())
    })
    .await;
    let hits = added.hits.load(Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(get(&hr.url("/x")).await.0, 200);
    }
    assert_eq!(added.hits.load(Ordering::SeqCst), hits);
}

/// The state `GET /api/pools` shows for `addr` in the first pool.
async fn state_of(hr: &Headroom, addr: SocketAddr) -> String {
    let pools = hr.pools().await;
    let list = pools["pools"][0]["backends"].as_array().unwrap().clone();
    let b = list.iter().find(|b| b["addr"] == addr.to_string()).unwrap_or_else(|| panic!("{addr} not in {pools}"));
    b["state"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_comes_back_by_undrain_or_by_a_reload_that_still_lists_it() {
    let (a, b, c) = (TestBackend::ok().await, TestBackend::ok().await, TestBackend::ok().await);
    let text = config(&[(a.addr, 1), (b.addr, 1)], "", "");
    let (_dir, path) = dir_with(&text);
    let hr = Headroom::start_file(&path).await;
    let admin = hr.admin;
    let post = |path: String| async move { admin_call(admin, http::Method::POST, &path, "").await };
    for x in [a.addr, b.addr] {
        assert_eq!(post(format!("/api/pools/default/backends/{x}/drain")).await.0, 200);
    }
    assert_eq!(get(&hr.url("/x")).await.0, 503, "every backend drained");
    // Registering it again is refused, with the way back named.
    let (status, body) = admin_call(
        hr.admin,
        http::Method::POST,
        "/api/pools/default/backends",
        &format!("{{\"addr\":\"{}\"}}", a.addr),
    )
    .await;
    assert_eq!(status, 409);
    assert!(body["error"].as_str().unwrap().contains("undrain"), "{body}");

    let (status, body) = post(format!("/api/pools/default/backends/{}/undrain", a.addr)).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("healthy")), "{body}");
    assert_eq!(get(&hr.url("/x")).await.0, 200);
    assert!(a.hits.load(Ordering::SeqCst) >= 1, "the undrained backend took no traffic");
    assert_eq!(state_of(&hr, b.addr).await, "draining");
    // Undraining one that serves changes nothing; unknown ones and bad addresses are refused.
    assert_eq!(post(format!("/api/pools/default/backends/{}/undrain", a.addr)).await.0, 200);
    assert_eq!(post(format!("/api/pools/default/backends/{}/undrain", c.addr)).await.0, 404);
    assert_eq!(post(format!("/api/pools/nope/backends/{}/undrain", a.addr)).await.0, 404);
    assert_eq!(post("/api/pools/default/backends/nonsense/undrain".into()).await.0, 400);

    // A change through the API does not undrain; a reload of a file that still lists it does.
    let reg = format!("{{\"addr\":\"{}\"}}", c.addr);
    assert_eq!(admin_call(hr.admin, http::Method::POST, "/api/pools/default/backends", &reg).await.0, 201);
    assert_eq!(state_of(&hr, b.addr).await, "draining");
    write_now(&path, &format!("{text}\n# touched\n"));
    until_reloads(&hr, 1).await;
    assert_eq!(state_of(&hr, b.addr).await, "healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_the_running_text_clears_last_error_and_the_events_keep_the_history() {
    let a = TestBackend::ok().await;
    let text = config(&[(a.addr, 1)], "", "");
    let (_dir, path) = dir_with(&text);
    let hr = Headroom::start_file(&path).await;
    write_now(&path, "[pools.default\n");
    poll_until(T, "error reported", || async { !hr.config_status().await["last_error"].is_null() }).await;
    write_now(&path, &text);
    poll_until(T, "error cleared", || async { hr.config_status().await["last_error"].is_null() }).await;
    let status = hr.config_status().await;
    assert_eq!(status["reloads"], 0, "the same text is not applied again");
    assert!(status["last_error_at"].is_null());
    let (code, body) = get(&format!("http://{}/api/config/events", hr.admin)).await;
    assert_eq!(code, 200);
    let events: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let outcomes: Vec<&str> =
        events["events"].as_array().unwrap().iter().map(|e| e["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["rejected", "restored"], "{events}");
    assert!(events["events"][0]["error"].as_str().unwrap().contains(":1:"), "{events}");
    assert_eq!(events["events"][1]["trigger"], "file");
}
