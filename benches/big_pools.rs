//! Big pools against the headroom binary: memory per backend, reload time, `/api/pools` and
//! `/metrics` at N backends, data-path latency while they render, health-check CPU and `/healthz`
//! latency, and registration churn. Prints one line per figure.
//!
//! `cargo bench --bench big_pools` (N = 10,000 by default; `BIG_POOL_N` changes it, and
//! `BIG_POOL_CHURN` the number of registrations churned, N by default). It runs the
//! binary at `HEADROOM_BIN`, else `target/release/headroom`: build it with `cargo build --release`
//! first (`cargo bench` itself leaves an unwinding build there). Every backend is a listener of
//! this process on 127.0.0.1; all traffic stays on loopback.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Answers every request (bodiless, as health checks and the data GETs here are) on every
/// listener with an empty 200, keeping the connection open as inference servers do.
async fn backends(n: usize) -> Vec<SocketAddr> {
    let mut addrs = Vec::with_capacity(n);
    for _ in 0..n {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind a backend");
        addrs.push(l.local_addr().expect("backend address"));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let mut seen = Vec::new();
                    loop {
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.is_err() {
                                return;
                            }
                        }
                        if seen.len() > 16384 {
                            return;
                        }
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => seen.extend_from_slice(&buf[..k]),
                        }
                    }
                });
            }
        });
    }
    addrs
}

/// One HTTP/1.1 exchange on a fresh connection: (status, body, time).
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Vec<u8>, Duration) {
    let started = Instant::now();
    let Ok(mut s) = TcpStream::connect(addr).await else { return (0, Vec::new(), started.elapsed()) };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, Vec::new(), started.elapsed());
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(120), s.read_to_end(&mut out)).await;
    let elapsed = started.elapsed();
    let status = std::str::from_utf8(out.get(9..12).unwrap_or_default()).ok().and_then(|t| t.parse().ok()).unwrap_or(0);
    let body = out.windows(4).position(|w| w == b"\r\n\r\n").map_or(Vec::new(), |i| out[i + 4..].to_vec());
    (status, body, elapsed)
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port")
}

fn config(proxy: SocketAddr, admin: SocketAddr, backends: &[SocketAddr], health: bool) -> String {
    let mut t = format!(
        "[server]\nlisten = [\"{proxy}\"]\nworkers = 1\naccess_log = false\n[admin]\nlisten = \"{admin}\"\n[pools.big]\n"
    );
    if health {
        t.push_str("[pools.big.health]\ninterval = \"1s\"\ntimeout = \"1s\"\npath = \"/health\"\n");
    }
    for a in backends {
        t.push_str(&format!("[[pools.big.backends]]\naddr = \"{a}\"\n"));
    }
    t
}

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<u64> = rest.split(' ').filter_map(|x| x.parse().ok()).collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3 (state is not numeric).
    Duration::from_millis((f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)) * 10)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

async fn reload(admin: SocketAddr, path: &std::path::Path, text: &str) -> Duration {
    std::fs::write(path, text).expect("write the config");
    let (status, body, took) = http(admin, "POST", "/api/reload", "").await;
    assert_eq!(status, 200, "reload: {}", String::from_utf8_lossy(&body));
    took
}

/// Sequential data-path GETs: their p99.
async fn data_p99(proxy: SocketAddr, count: usize) -> Duration {
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        times.push(http(proxy, "GET", "/x", "").await.2);
    }
    p99(times)
}

async fn run(n: usize) {
    let bin = std::env::var("HEADROOM_BIN")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/headroom").into());
    let addrs = backends(n).await;
    let (proxy, admin) = (free_addr(), free_addr());
    let dir = std::env::temp_dir().join(format!("headroom-big-pools-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let path = dir.join("headroom.toml");
    std::fs::write(&path, config(proxy, admin, &addrs[..1], false)).expect("write the config");
    let mut child = std::process::Command::new(&bin)
        .arg("--config")
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    let pid = child.id();
    while http(admin, "GET", "/healthz", "").await.0 != 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("binary: {bin}; backends: {n}");
    let rss0 = proc_field(pid, "status", "VmRSS:");
    let took = reload(admin, &path, &config(proxy, admin, &addrs, false)).await;
    let rss1 = proc_field(pid, "status", "VmRSS:");
    println!("reload 1 -> {n} backends: {} ms", took.as_millis());
    println!(
        "RSS: {rss0} KiB at 1 backend, {rss1} KiB at {n}: {:.2} KiB per backend",
        (rss1 as f64 - rss0 as f64) / n as f64
    );
    // What stays once the reload's transient memory (the parsed file, the old snapshot) is gone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = proc_field(pid, "status", "VmRSS:");
    println!("RSS 3 s later: {later} KiB: {:.2} KiB per backend", (later as f64 - rss0 as f64) / n as f64);
    let mut pools = Vec::new();
    let mut metrics = Vec::new();
    for _ in 0..3 {
        pools.push(http(admin, "GET", "/api/pools", "").await.2);
        metrics.push(http(admin, "GET", "/metrics", "").await.2);
    }
    println!(
        "/api/pools at {n}: median {} ms; /metrics: median {} ms",
        median(pools).as_millis(),
        median(metrics).as_millis()
    );
    let quiet = data_p99(proxy, 300).await;
    let scraping = tokio::spawn(async move {
        let mut k = 0;
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until && k < 200 {
            http(admin, "GET", "/metrics", "").await;
            http(admin, "GET", "/api/pools", "").await;
            k += 1;
        }
    });
    let busy = data_p99(proxy, 300).await;
    scraping.abort();
    println!(
        "data p99: {:.2} ms quiet, {:.2} ms while /metrics and /api/pools render",
        quiet.as_secs_f64() * 1e3,
        busy.as_secs_f64() * 1e3
    );

    // Health checks at 1 s intervals over every backend.
    let took = reload(admin, &path, &config(proxy, admin, &addrs, true)).await;
    println!("reload to {n} backends with [health]: {} ms", took.as_millis());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (c0, t0) = (cpu(pid), Instant::now());
    let mut healthz = Vec::new();
    while t0.elapsed() < Duration::from_secs(10) {
        healthz.push(http(admin, "GET", "/healthz", "").await.2);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let share = (cpu(pid) - c0).as_secs_f64() / t0.elapsed().as_secs_f64();
    println!(
        "health checks of {n} backends every 1 s: {:.1}% of a core; /healthz p99 {:.2} ms ({} probes)",
        share * 100.0,
        p99(healthz.clone()).as_secs_f64() * 1e3,
        healthz.len()
    );

    // Back to one backend: memory and series of the removed ones.
    let took = reload(admin, &path, &config(proxy, admin, &addrs[..1], false)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rss2 = proc_field(pid, "status", "VmRSS:");
    let page = http(admin, "GET", "/metrics", "").await.1;
    let removed = format!("backend=\"{}\"", addrs[n - 1]);
    let stale = String::from_utf8_lossy(&page).lines().filter(|l| l.contains(&removed)).count();
    println!("reload back to 1: {} ms; RSS {rss2} KiB; series left of a removed backend: {stale}", took.as_millis());

    // Churn: register and remove backends through the API.
    let churn = std::env::var("BIG_POOL_CHURN").ok().and_then(|v| v.parse().ok()).unwrap_or(n).clamp(2, n.max(2));
    let rss3 = proc_field(pid, "status", "VmRSS:");
    let t = Instant::now();
    for a in &addrs[1..churn] {
        http(admin, "POST", "/api/pools/big/backends", &format!("{{\"addr\": \"{a}\"}}")).await;
    }
    for a in &addrs[1..churn] {
        http(admin, "DELETE", &format!("/api/pools/big/backends/{a}"), "").await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rss4 = proc_field(pid, "status", "VmRSS:");
    let took = t.elapsed();
    println!(
        "churn of {} registrations and removals: {} ms ({:.2} ms each); RSS {rss3} -> {rss4} KiB ({:+.1}%)",
        churn - 1,
        took.as_millis(),
        took.as_secs_f64() * 1e3 / (2 * (churn - 1)).max(1) as f64,
        (rss4 as f64 - rss3 as f64) * 100.0 / rss3.max(1) as f64
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    // Criterion-style arguments (`--bench`) are accepted and ignored.
    let n: usize = std::env::var("BIG_POOL_N").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    // Room for n listeners, their probe connections and the client's.
    let want = (4 * n as u64 + 4096) as libc::rlim_t;
    let limit = libc::rlimit { rlim_cur: want, rlim_max: want };
    // SAFETY: setrlimit reads the struct passed; a failure leaves the old limit.
    unsafe {
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("a runtime");
    rt.block_on(run(n));
}
