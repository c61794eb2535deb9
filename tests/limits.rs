//! Limits and timeouts on the client side: 408, 413, 431, idle connections, stalled bodies.

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_timeouts_give_408_413_431() {
    let backend = TestBackend::echo().await;
    let server = "max_request_body = \"1KiB\"\nmax_header_bytes = \"2KiB\"\nrequest_header_timeout = \"300ms\"";
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", server)).await;

    // 413 by declared length: refused before anything is forwarded.
    let big = vec![b'x'; 2000];
    let mut req = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n", big.len()).into_bytes();
    req.extend_from_slice(&big);
    let resp = raw(hr.addr, &req, T).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert_eq!(backend.hits.load(Ordering::SeqCst), 0);
    assert!(json_of(&resp)["request_id"].is_string());

    // 413 for a chunked body that grows past the limit while streaming.
    let mut req = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'y'; 512]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(hr.addr, &req, T).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");

    // 431: a head over max_header_bytes (checked by headroom) and one over hyper's buffer.
    for size in [3_000, 40_000] {
        let req = format!("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Big: {}\r\n\r\n", "z".repeat(size));
        let resp = raw(hr.addr, req.as_bytes(), T).await;
        assert!(resp.starts_with("HTTP/1.1 431"), "{size}: {resp}");
    }

    // 408: a head that never completes.
    let started = std::time::Instant::now();
    let resp = raw(hr.addr, b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow:", T).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(json_of(&resp)["error"], "request header timeout");

    // And a request within every limit still goes through.
    let ok = raw(hr.addr, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc", T).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_are_closed_quietly() {
    let backend = TestBackend::ok().await;
    let server = "idle_timeout = \"300ms\"\nrequest_header_timeout = \"5s\"";
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", server)).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Then silence: the connection is closed after the idle timeout, without a 408.
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(rest.is_empty(), "unexpected bytes on idle close: {:?}", String::from_utf8_lossy(&rest));
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_body_gets_408_and_frees_the_slot() {
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "idle_timeout = \"300ms\"")).await;
    // Ten of the hundred declared bytes, then silence.
    let started = std::time::Instant::now();
    let resp = raw(hr.addr, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789", T).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(json_of(&resp)["error"].as_str().unwrap().contains("request body timeout"), "{resp}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    poll_until(T, "slot released", || async { hr.in_flight().await[0].1 == 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_writes_a_whole_refused_body_before_reading_gets_its_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = TestBackend::echo().await;
    let hr = Headroom::start(&config(&[(backend.addr, 1)], "", "max_request_body = \"1KiB\"")).await;
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(hr.addr).await.unwrap();
        // A 512 KiB body, refused by its declared length: the client writes all of it before it
        // reads, and still gets the answer (headroom closes with FIN, then reads and discards).
        let head = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 524288\r\n\r\n";
        s.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..8 {
            s.write_all(&chunk).await.expect("writing the body failed: the connection was reset");
        }
        let mut answer = Vec::new();
        let read = tokio::time::timeout(T, s.read_to_end(&mut answer)).await.expect("no answer");
        let text = String::from_utf8_lossy(&answer);
        assert!(read.is_ok(), "reading the answer failed: {read:?} after {text:?}");
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(text.contains("request body larger than"), "{text}");
    }
    assert_eq!(backend.hits.load(Ordering::SeqCst), 0);
}
