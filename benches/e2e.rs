//! End-to-end load: the same closed-loop HTTP/1.1 load sent straight to a backend and through
//! headroom to that backend, in one run, reported as req/s, p50, p99 and the ratio.
//!
//! `cargo bench --bench e2e` (env: `E2E_SECS`, default 5; `E2E_CONNS`, default 32;
//! `E2E_PATH`, default `/`, the mock backend's tiny response). Both processes are the release
//! binary: `headroom mock-backend` as the backend and `headroom` with one worker thread.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_headroom");

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Result {
    requests: u64,
    errors: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
}

/// `conns` connections, each sending requests back to back for `secs` (bounded by time).
async fn drive(addr: SocketAddr, path: &str, conns: usize, secs: f64) -> Result {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut send, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(conn);
            while Instant::now() < deadline {
                let t = Instant::now();
                let req = http::Request::get(path.as_str()).header("host", "bench").body(Empty::new()).unwrap();
                match send.send_request(req).await {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = resp.into_body().collect().await;
                        lat.push(t.elapsed().as_micros() as u64);
                    }
                    _ => {
                        errors += 1;
                        break;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.unwrap();
        all.extend(lat);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct =
        |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0);
    Result { requests: all.len() as u64, errors, secs, p50_us: pct(0.50), p99_us: pct(0.99) }
}

fn main() {
    // `cargo bench` passes flags such as --bench; this bench takes its settings from env.
    let secs: f64 = std::env::var("E2E_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(5.0);
    let conns: usize = std::env::var("E2E_CONNS").ok().and_then(|v| v.parse().ok()).unwrap_or(32);
    let path = std::env::var("E2E_PATH").unwrap_or_else(|_| "/".to_string());

    let backend = free_addr();
    let _mock = Proc(
        Command::new(BIN)
            .args(["mock-backend", "--listen", &backend.to_string(), "--capacity", "100000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(backend);

    let (proxy, admin) = (free_addr(), free_addr());
    let mut cfg = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        cfg,
        "[server]\nlisten = [\"{proxy}\"]\nworkers = 1\n[admin]\nlisten = \"{admin}\"\n[pools.default]\nmax_inflight_per_backend = 100000\n[[pools.default.backends]]\naddr = \"{backend}\"\n"
    )
    .unwrap();
    let _hr = Proc(
        Command::new(BIN)
            .arg("--config")
            .arg(cfg.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(proxy);

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    // Warm up both paths (connection pools, caches), then measure direct and proxied in turn.
    rt.block_on(drive(backend, &path, conns, 1.0));
    rt.block_on(drive(proxy, &path, conns, 1.0));
    let direct = rt.block_on(drive(backend, &path, conns, secs));
    let via = rt.block_on(drive(proxy, &path, conns, secs));

    println!("e2e: {conns} connections, {secs} s each, GET {path}");
    println!("{:<10} {:>12} {:>10} {:>10} {:>8}", "target", "req/s", "p50 us", "p99 us", "errors");
    for (name, r) in [("direct", &direct), ("headroom", &via)] {
        println!("{:<10} {:>12.0} {:>10} {:>10} {:>8}", name, r.requests as f64 / r.secs, r.p50_us, r.p99_us, r.errors);
    }
    let ratio = (via.requests as f64 / via.secs) / (direct.requests as f64 / direct.secs);
    println!("headroom / direct: req/s {ratio:.2}x, p99 {:.2}x", via.p99_us as f64 / direct.p99_us.max(1) as f64);
}
