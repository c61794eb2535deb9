//! Denial of service: what one client (or many cheap ones) must not be able to take from all
//! the others. These run the real binary, so its CPU time can be read from `/proc`.

#![allow(clippy::disallowed_types)] // a test backend hands out one body

mod common;

use common::*;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);

/// headroom as a child process with one worker, on free ports; `[pools.default]` gets `pool`.
fn start(backend: std::net::SocketAddr, server: &str) -> (Proc, std::net::SocketAddr, tempfile::NamedTempFile) {
    let (proxy, admin) = (free_addr(), free_addr());
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        f,
        "[server]\nlisten = [\"{proxy}\"]\nworkers = 1\naccess_log = false\n{server}\n[admin]\nlisten = \"{admin}\"\n\
         [pools.default]\n[[pools.default.backends]]\naddr = \"{backend}\"\n"
    )
    .unwrap();
    let p = spawn(&["--config", f.path().to_str().unwrap()]);
    (p, proxy, f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_one_byte_cost_no_cpu_while_they_wait() {
    let backend = TestBackend::ok().await;
    let (p, proxy, _f) = start(backend.addr, "request_header_timeout = \"60s\"");
    wait_listening(proxy).await;
    // 300 clients send the first byte of the h2 preface and stop.
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
        s.write_all(b"P").await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = cpu_time(p.0.id());
    tokio::time::sleep(Duration::from_millis(700)).await;
    let used = cpu_time(p.0.id()) - before;
    eprintln!("CPU used by headroom in 700 ms with 300 clients stalled after one byte: {used:?}");
    // Polling for the rest of the preface (one wake-up per client per millisecond) costs a busy
    // core here; waiting for readiness costs nothing measurable.
    assert!(used < Duration::from_millis(100), "{used:?} of CPU in 700 ms with 300 stalled clients");

    // A client that goes on after its first byte is served by the codec its bytes name.
    let mut s = stalled.pop().unwrap();
    s.write_all(b"OST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out)).await.unwrap().unwrap();
    assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
    // And one that sends a request a byte at a time.
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    for b in b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n" {
        s.write_all(&[*b]).await.unwrap();
    }
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out)).await.unwrap().unwrap();
    assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_gives_no_window_is_cut_off_and_frees_every_slot_it_held() {
    let backend = TestBackend::start(|_req| async { http::Response::new(full(vec![b'x'; 256 * 1024])) }).await;
    let pool = "max_inflight_per_backend = 8";
    let server = "send_timeout = \"300ms\"\nmax_inflight_per_connection = 4";
    let hr = Headroom::start(&config(&[(backend.addr, 1)], pool, server)).await;
    // A client that opens no flow-control window at all and asks for 6 responses.
    let tcp = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    let (client, conn) =
        h2::client::Builder::new().initial_window_size(0).handshake::<_, bytes::Bytes>(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut responses = Vec::new();
    for _ in 0..6 {
        let mut c = client.clone().ready().await.unwrap();
        let req = http::Request::get(format!("http://{}/big", hr.addr)).body(()).unwrap();
        let (resp, _) = c.send_request(req, true).unwrap();
        responses.push(tokio::spawn(resp));
    }
    // One connection holds at most 4 slots (its SETTINGS_MAX_CONCURRENT_STREAMS)...
    poll_until(T, "4 requests at the backend", || async { backend.hits.load(Ordering::SeqCst) >= 4 }).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(hr.in_flight().await[0].1 <= 4, "{:?}", hr.in_flight().await);
    // ...and is cut off once nothing moved for send_timeout, which frees them.
    let waiting = std::time::Instant::now();
    let ended = tokio::time::timeout(T, conn).await.expect("the stalled connection was not closed");
    assert!(waiting.elapsed() < Duration::from_secs(3), "closed only after {:?}", waiting.elapsed());
    assert!(ended.is_ok(), "{ended:?}");
    poll_until(T, "every slot released", || async { hr.in_flight().await[0].1 == 0 }).await;
    let page = String::from_utf8_lossy(&get(&format!("http://{}/metrics", hr.admin)).await.1).into_owned();
    assert!(metric_value(&page, "headroom_client_stalled_total") >= 1.0, "{page}");
    // Other clients were served all along.
    assert_eq!(get(&hr.url("/")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_reads_slowly_but_steadily_is_not_cut_off() {
    use http_body_util::BodyExt;
    let (tx, body) = channel_body();
    let body = std::sync::Mutex::new(Some(body));
    let backend = TestBackend::start(move |_req| {
        let b = body.lock().unwrap().take().unwrap_or_else(|| full("second"));
        async move { http::Response::new(b) }
    })
    .await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "send_timeout = \"300ms\"")).await;
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Body>();
    let resp = c.request(http::Request::get(hr.url("/")).body(full(bytes::Bytes::new())).unwrap()).await.unwrap();
    let mut body = resp.into_body();
    // The backend is silent for longer than send_timeout between tokens: that is not a stall.
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tx.send(bytes::Bytes::from(format!("token{i}"))).await.unwrap();
        let frame = tokio::time::timeout(T, body.frame()).await.unwrap().unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), format!("token{i}"));
    }
    drop(tx);
    let last = tokio::time::timeout(T, body.frame()).await.unwrap();
    assert!(
        last.as_ref().is_none_or(|f| f.as_ref().is_ok_and(|f| f.data_ref().is_some_and(|d| d.is_empty()))),
        "{last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_logs_once_a_second_and_backs_off() {
    let backend = TestBackend::ok().await;
    let (proxy, admin) = (free_addr(), free_addr());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("headroom.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"{proxy}\"]\nworkers = 1\naccess_log = false\n[admin]\nlisten = \"{admin}\"\n\
             [pools.default]\n[[pools.default.backends]]\naddr = \"{}\"\n",
            backend.addr
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    // A file-descriptor limit low enough for a hundred idle clients to exhaust it.
    let script = format!("ulimit -n 48 && exec {} --config {}", env!("CARGO_BIN_EXE_headroom"), config.display());
    let child = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let p = Proc(child);
    wait_listening(proxy).await;
    let mut held = Vec::new();
    for _ in 0..100 {
        if let Ok(s) = tokio::net::TcpStream::connect(proxy).await {
            held.push(s);
        }
    }
    let before = cpu_time(p.0.id());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let used = cpu_time(p.0.id()) - before;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.lines().filter(|l| l.contains("accept failed")).count();
    assert!(lines >= 1, "the descriptors never ran out:\n{text}");
    assert!(lines <= 3, "{lines} 'accept failed' lines in about 1.5 s:\n{text}");
    assert!(text.contains("count="), "{text}");
    assert!(used < Duration::from_millis(300), "{used:?} of CPU while out of descriptors");
}
