//! Denial of service: what one client (or many cheap ones) must not be able to take from all
//! the others. These run the real binary, so its CPU time can be read from `/proc`.

mod common;

use common::*;
use std::io::Write;
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
