//! Several replicas as one gateway (`[cluster]`): a real 3-member etcd cluster on loopback ports,
//! headroom replicas as child processes, real backends. Membership, the shared registry of
//! runtime backends (convergence, removal, a late replica), and serving through etcd's absence.

mod common;

use common::etcd::EtcdCluster;
use common::*;
use http::Method;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

/// One test of this file at a time: each runs a 3-member etcd and several replicas, and side by
/// side on a 2-core machine they starve each other's start-up.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Replica {
    proxy: SocketAddr,
    admin: SocketAddr,
    _proc: Proc,
    _file: tempfile::NamedTempFile,
}

/// Starts replica `name` of the group on `etcd`, with pool `default` listing `file_backend`.
async fn replica(etcd: &EtcdCluster, name: &str, file_backend: SocketAddr) -> Replica {
    replica_with(etcd, name, file_backend, "").await
}

/// Like [`replica`], with `pool` added to the pool's table (keys, then sub-tables).
async fn replica_with(etcd: &EtcdCluster, name: &str, file_backend: SocketAddr, pool: &str) -> Replica {
    let r = start_replica(etcd, name, file_backend, pool, "").await;
    poll_until(T, "replica connected to etcd", || async {
        admin_call(r.admin, Method::GET, "/api/cluster", "").await.1["connected"] == true
    })
    .await;
    r
}

/// Starts a replica (`cluster` added to its `[cluster]` table) without waiting for etcd.
async fn start_replica(etcd: &EtcdCluster, name: &str, file_backend: SocketAddr, pool: &str, cluster: &str) -> Replica {
    let (proxy, admin) = (free_addr(), free_addr());
    let text = format!(
        "[cluster]\netcd = {}\nname = \"{name}\"\nprefix = \"/headroom/test\"\nlease_ttl = \"2s\"\n{cluster}\n\
         [server]\nlisten = \"{proxy}\"\naccess_log = false\n[admin]\nlisten = \"{admin}\"\n\
         [[pools.default.backends]]\naddr = \"{file_backend}\"\n[pools.default]\n{pool}\n",
        etcd.endpoints_toml()
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    let mut p = spawn(&["--config", file.path().to_str().unwrap()]);
    let deadline = Instant::now() + T;
    while tokio::net::TcpStream::connect(admin).await.is_err() {
        assert!(p.0.try_wait().unwrap().is_none(), "the replica exited at start (a port taken meanwhile?)");
        assert!(Instant::now() < deadline, "the replica did not listen within {T:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Replica { proxy, admin, _proc: p, _file: file }
}

async fn backends_of(admin: SocketAddr) -> Vec<(String, String)> {
    let (_, v) = admin_call(admin, Method::GET, "/api/pools", "").await;
    v["pools"][0]["backends"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|b| (b["addr"].as_str().unwrap().to_string(), b["state"].as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

async fn serving(admin: SocketAddr, addr: SocketAddr) -> bool {
    backends_of(admin).await.iter().any(|(a, s)| *a == addr.to_string() && s == "healthy")
}

/// Whether a request through `proxy` reached the backend at `addr` within `n` tries.
async fn reaches(proxy: SocketAddr, addr: SocketAddr, n: usize) -> bool {
    for _ in 0..n {
        let req = http::Request::get(format!("http://{proxy}/")).body(full(bytes::Bytes::new())).unwrap();
        if let Ok(r) = client().request(req).await {
            if r.headers().get("x-backend").and_then(|v| v.to_str().ok()) == Some(addr.to_string().as_str()) {
                return true;
            }
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_registered_on_one_replica_serves_on_all_and_a_late_replica_sees_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let etcd = EtcdCluster::start(3).await;
    let (file_backend, added) = (TestBackend::ok().await, TestBackend::ok().await);
    let a = replica(&etcd, "a", file_backend.addr).await;
    let b = replica(&etcd, "b", file_backend.addr).await;
    let c = replica(&etcd, "c", file_backend.addr).await;
    // A reads the members each time it renews its lease (every third of lease_ttl).
    poll_until(Duration::from_secs(3), "A lists the three members", || async {
        let (_, view) = admin_call(a.admin, Method::GET, "/api/cluster", "").await;
        let mut names: Vec<String> =
            view["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect();
        names.sort_unstable();
        names == ["a", "b", "c"]
    })
    .await;

    let (status, _) =
        admin_call(a.admin, Method::POST, "/api/pools/default/backends", &format!("{{\"addr\": \"{}\"}}", added.addr))
            .await;
    assert_eq!(status, 201);
    poll_until(Duration::from_secs(1), "B and C list the backend A registered", || async {
        serving(b.admin, added.addr).await && serving(c.admin, added.addr).await
    })
    .await;
    for r in [&a, &b, &c] {
        assert!(reaches(r.proxy, added.addr, 10).await, "requests through {} reach the registered backend", r.proxy);
    }

    // Drained through A: every replica stops sending it requests; undrained through B: back
    // everywhere.
    let state_on = |admin: SocketAddr| async move {
        backends_of(admin).await.into_iter().find(|(a, _)| *a == added.addr.to_string()).map(|(_, s)| s)
    };
    let path = format!("/api/pools/default/backends/{}", added.addr);
    assert_eq!(admin_call(a.admin, Method::POST, &format!("{path}/drain"), "").await.0, 200);
    poll_until(Duration::from_secs(2), "B and C drain it too", || async {
        state_on(b.admin).await.as_deref() == Some("draining") && state_on(c.admin).await.as_deref() == Some("draining")
    })
    .await;
    assert_eq!(admin_call(b.admin, Method::POST, &format!("{path}/undrain"), "").await.0, 200);
    poll_until(Duration::from_secs(2), "A and C undrain it too", || async {
        state_on(a.admin).await.as_deref() == Some("healthy") && state_on(c.admin).await.as_deref() == Some("healthy")
    })
    .await;

    // Deleted through C: every replica drains it.
    let (status, _) =
        admin_call(c.admin, Method::DELETE, &format!("/api/pools/default/backends/{}", added.addr), "").await;
    assert_eq!(status, 200);
    poll_until(Duration::from_secs(2), "A and B stop serving the deleted backend", || async {
        !serving(a.admin, added.addr).await && !serving(b.admin, added.addr).await
    })
    .await;
    let before = added.hits.load(std::sync::atomic::Ordering::Relaxed);
    for r in [&a, &b, &c] {
        assert!(!reaches(r.proxy, added.addr, 5).await);
    }
    assert_eq!(added.hits.load(std::sync::atomic::Ordering::Relaxed), before);

    // Registered again, then a replica that starts late gets it from the registry.
    let (status, _) =
        admin_call(b.admin, Method::POST, "/api/pools/default/backends", &format!("{{\"addr\": \"{}\"}}", added.addr))
            .await;
    assert_eq!(status, 201);
    let d = replica(&etcd, "d", file_backend.addr).await;
    poll_until(Duration::from_secs(2), "the late replica lists the backend", || serving(d.admin, added.addr)).await;
    assert!(reaches(d.proxy, added.addr, 10).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_registrations_reach_every_replica_within_a_second_at_p99() {
    let _one = ONE_AT_A_TIME.lock().await;
    let etcd = EtcdCluster::start(3).await;
    let file_backend = TestBackend::ok().await;
    let a = replica(&etcd, "a", file_backend.addr).await;
    let b = replica(&etcd, "b", file_backend.addr).await;
    let c = replica(&etcd, "c", file_backend.addr).await;
    let mut took = Vec::new();
    for _ in 0..100 {
        let addr = dead_addr().await;
        let (status, _) =
            admin_call(a.admin, Method::POST, "/api/pools/default/backends", &format!("{{\"addr\": \"{addr}\"}}"))
                .await;
        assert_eq!(status, 201);
        let t = Instant::now();
        poll_until(Duration::from_secs(5), "B and C list the registered backend", || async {
            let (lb, lc) = (backends_of(b.admin).await, backends_of(c.admin).await);
            [lb, lc].iter().all(|l| l.iter().any(|(x, _)| *x == addr.to_string()))
        })
        .await;
        took.push(t.elapsed());
    }
    took.sort();
    let p99 = took[98];
    eprintln!("registry convergence over 100 additions: p50 {:?}, p99 {p99:?}, max {:?}", took[49], took[99]);
    assert!(p99 <= Duration::from_secs(1), "p99 {p99:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_through_etcd_going_away_and_rejoin_when_it_returns() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut etcd = EtcdCluster::start(3).await;
    let (file_backend, added) = (TestBackend::ok().await, TestBackend::ok().await);
    let a = replica(&etcd, "a", file_backend.addr).await;
    let b = replica(&etcd, "b", file_backend.addr).await;
    let (status, _) =
        admin_call(a.admin, Method::POST, "/api/pools/default/backends", &format!("{{\"addr\": \"{}\"}}", added.addr))
            .await;
    assert_eq!(status, 201);
    poll_until(Duration::from_secs(2), "B lists the backend", || serving(b.admin, added.addr)).await;

    // One member of three lost: nothing visible changes.
    etcd.stop_member(0);
    let other = dead_addr().await;
    let (status, body) =
        admin_call(b.admin, Method::POST, "/api/pools/default/backends", &format!("{{\"addr\": \"{other}\"}}")).await;
    assert_eq!(status, 201, "{body}");
    poll_until(Duration::from_secs(2), "A lists the backend B registered", || async {
        backends_of(a.admin).await.iter().any(|(x, _)| *x == other.to_string())
    })
    .await;
    for r in [&a, &b] {
        assert_eq!(admin_call(r.admin, Method::GET, "/api/cluster", "").await.1["connected"], true);
    }

    // All of etcd gone: both keep serving with what they had, and say so.
    etcd.stop_member(1);
    etcd.stop_member(2);
    poll_until(T, "replicas see etcd unreachable", || async {
        admin_call(a.admin, Method::GET, "/api/cluster", "").await.1["connected"] == false
            && admin_call(b.admin, Method::GET, "/api/cluster", "").await.1["connected"] == false
    })
    .await;
    let mut failed = 0;
    for r in [&a, &b] {
        for _ in 0..100 {
            let req = http::Request::get(format!("http://{}/", r.proxy)).body(full(bytes::Bytes::new())).unwrap();
            match client().request(req).await {
                Ok(resp) if resp.status() == 200 => {}
                _ => failed += 1,
            }
        }
        assert!(serving(r.admin, added.addr).await, "the registered backend stays");
        let health = get(&format!("http://{}/healthz", r.admin)).await;
        assert_eq!(health.0, 200);
        assert!(String::from_utf8_lossy(&health.1).contains("etcd unreachable"));
        let page = String::from_utf8_lossy(&get(&format!("http://{}/metrics", r.admin)).await.1).into_owned();
        assert_eq!(metric_value(&page, "headroom_cluster_connected"), 0.0);
        let status = String::from_utf8_lossy(&get(&format!("http://{}/", r.admin)).await.1).into_owned();
        assert!(status.contains("etcd unreachable; serving with the last known backends"), "the status page says so");
    }
    assert_eq!(failed, 0, "requests failed while etcd was away");
    // A registration needs etcd: refused, nothing changed.
    let third = dead_addr().await;
    let (status, _) =
        admin_call(a.admin, Method::POST, "/api/pools/default/backends", &format!("{{\"addr\": \"{third}\"}}")).await;
    assert_eq!(status, 503);
    assert!(!backends_of(a.admin).await.iter().any(|(x, _)| *x == third.to_string()));

    // etcd back: both rejoin by themselves.
    for i in 0..3 {
        etcd.start_member(i);
    }
    poll_until(Duration::from_secs(30), "replicas reconnect", || async {
        admin_call(a.admin, Method::GET, "/api/cluster", "").await.1["connected"] == true
            && admin_call(b.admin, Method::GET, "/api/cluster", "").await.1["connected"] == true
    })
    .await;
    let page = String::from_utf8_lossy(&get(&format!("http://{}/metrics", a.admin)).await.1).into_owned();
    assert_eq!(metric_value(&page, "headroom_cluster_connected"), 1.0);
    assert!(serving(a.admin, added.addr).await && serving(b.admin, added.addr).await);
}

/// A provider in POSIX sh: logs each request to `calls.log` and answers `scale_up` with the
/// addresses in `free` (one per line), as many as asked.
const PROVIDER: &str = r#"#!/bin/sh
dir="$(dirname "$0")"
req="$(cat)"
printf '%s\n' "$req" >> "$dir/calls.log"
case "$req" in
  *'"action":"scale_down"'*) exit 0 ;;
esac
count="$(printf '%s' "$req" | sed -n 's/.*"count":\([0-9]*\).*/\1/p')"
out=""
i=0
while [ "$i" -lt "$count" ]; do
  addr="$(sed -n "$((i+1))p" "$dir/free")"
  [ -z "$addr" ] && break
  out="$out${out:+,}{\"addr\":\"$addr\"}"
  i=$((i+1))
done
printf '{"backends":[%s]}\n' "$out"
"#;

/// The provider script in a directory of its own, offering the addresses in its `free` file.
struct Provider {
    dir: tempfile::TempDir,
}

impl Provider {
    fn new(free: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("provider.sh"), PROVIDER).unwrap();
        std::fs::write(dir.path().join("free"), free.iter().map(|a| format!("{a}\n")).collect::<String>()).unwrap();
        Provider { dir }
    }

    /// A pool's keys (`pool`), its `[autoscale]` table (`autoscale`) and this provider.
    fn pool(&self, pool: &str, autoscale: &str) -> String {
        format!(
            "{pool}\n[pools.default.autoscale]\n{autoscale}\n[pools.default.autoscale.provider]\nkind = \"command\"\ncommand = [\"sh\", \"{}\"]\n",
            self.dir.path().join("provider.sh").display()
        )
    }

    /// The calls so far.
    fn calls(&self) -> Vec<serde_json::Value> {
        let log = std::fs::read_to_string(self.dir.path().join("calls.log")).unwrap_or_default();
        log.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

/// A backend that answers after 300 ms.
async fn slow() -> TestBackend {
    TestBackend::start(|_req| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        hyper::Response::new(full("slow"))
    })
    .await
}

/// `n` clients sending GETs back to back through `proxy` until `stop`; returns the failures.
fn clients(
    proxy: SocketAddr,
    n: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..n {
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut failed = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let req = http::Request::get(format!("http://{proxy}/")).body(full(bytes::Bytes::new())).unwrap();
                    match client().request(req).await {
                        Ok(r) if r.status() == 200 => {
                            use http_body_util::BodyExt;
                            let _ = r.into_body().collect().await;
                        }
                        Ok(r) => {
                            use http_body_util::BodyExt;
                            let status = r.status();
                            let body = r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            eprintln!("a request through {proxy} got {status}: {}", String::from_utf8_lossy(&body));
                            failed += 1;
                        }
                        Err(e) => {
                            eprintln!("a request through {proxy} failed: {e:?}");
                            failed += 1;
                        }
                    }
                }
                failed
            }));
        }
        let mut failed = 0;
        for t in tasks {
            failed += t.await.unwrap();
        }
        failed
    })
}

/// The group's autoscaler: each replica's queue (2) stays below the threshold (4); their sum (6)
/// crosses it. Only the leader calls the provider, once, for the summed demand; the backends it
/// registers serve on every replica. Then the leader is killed: another leads within
/// lease_ttl + 1 s, carries the cooldown over (no second call), and the others lose no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_scales_once_on_its_summed_demand_and_a_new_leader_does_not_scale_again() {
    let _one = ONE_AT_A_TIME.lock().await;
    let etcd = EtcdCluster::start(3).await;
    let backend = slow().await;
    let fresh: Vec<TestBackend> = futures_util::future::join_all((0..8).map(|_| TestBackend::ok())).await;
    let provider = Provider::new(&fresh.iter().map(|b| b.addr).collect::<Vec<_>>());
    let pool = provider.pool(
        "max_inflight_per_backend = 1\nqueue = { max_depth = 100, timeout = \"20s\" }",
        "min_backends = 1\nmax_backends = 12\ntarget_inflight_per_backend = 1\nscale_up_queue_depth = 4\n\
         scale_up_window = \"400ms\"\nscale_down_window = \"600s\"\ncooldown = \"60s\"",
    );
    let mut replicas = Vec::new();
    for name in ["a", "b", "c"] {
        replicas.push(replica_with(&etcd, name, backend.addr, &pool).await);
    }
    let leader = |r: &Replica| {
        let admin = r.admin;
        async move { admin_call(admin, Method::GET, "/api/cluster", "").await.1["leader"].as_str().map(str::to_string) }
    };
    poll_until(T, "a leader elected", || async { leader(&replicas[0]).await.is_some() }).await;

    let stops: Vec<_> = (0..3).map(|_| std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))).collect();
    let mut loads: Vec<_> =
        replicas.iter().zip(&stops).map(|(r, stop)| Some(clients(r.proxy, 3, stop.clone()))).collect();
    poll_until(T, "the scale-up call", || async { !provider.calls().is_empty() }).await;
    let first = provider.calls();
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["action"], "scale_up");
    // 3 in flight + 6 queued over the group, one request per backend: 9 backends, 1 there, so 8
    // (a client between two requests may make it one or two fewer); one replica's own demand
    // (3) would ask for 2 at most.
    let count = first[0]["count"].as_u64().unwrap();
    assert!((6..=8).contains(&count), "{}", first[0]);
    assert!(first[0]["current"]["queue_depth"].as_u64().unwrap() >= 4, "{}", first[0]);
    for r in &replicas {
        poll_until(T, "the new backends on every replica", || async { backends_of(r.admin).await.len() == 9 }).await;
    }

    // The leader is killed (SIGKILL: its lease has to run out); the group goes on.
    let name = leader(&replicas[0]).await.unwrap();
    let idx = ["a", "b", "c"].iter().position(|n| *n == name).unwrap();
    let mut killed = replicas.remove(idx);
    stops[idx].store(true, std::sync::atomic::Ordering::Relaxed);
    let t = Instant::now();
    killed._proc.0.kill().unwrap();
    let _ = killed._proc.0.wait();
    let _ = loads[idx].take().unwrap().await;
    poll_until(Duration::from_secs(10), "another leader", || async {
        leader(&replicas[0]).await.is_some_and(|l| l != name)
    })
    .await;
    let took = t.elapsed();
    eprintln!("new leader {:?} after {took:?}", leader(&replicas[0]).await);
    assert!(took <= Duration::from_secs(3) + Duration::from_millis(500), "{took:?} (lease_ttl 2 s + 1 s)");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(provider.calls().len(), 1, "the new leader called the provider again: {:?}", provider.calls());
    for stop in &stops {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    for l in loads.into_iter().flatten() {
        assert_eq!(l.await.unwrap(), 0, "requests failed on a surviving replica");
    }
}

/// `n` clients sending completions back to back through `proxy` until `stop`, counting each
/// answered one in `done`: (ok, failed).
fn completions(
    proxy: SocketAddr,
    n: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (stop, done) = (stop.clone(), done.clone());
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0u64, 0u64);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let req = http::Request::post(format!("http://{proxy}/v1/completions"))
                            .header("content-type", "application/json")
                            .body(full(r#"{"model": "m", "prompt": "hi"}"#))
                            .unwrap();
                        match client().request(req).await {
                            Ok(r) if r.status() == 200 => {
                                use http_body_util::BodyExt;
                                let _ = r.into_body().collect().await;
                                ok += 1;
                                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            _ => failed += 1,
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        let mut sum = (0, 0);
        for t in tasks {
            let (o, f) = t.await.unwrap();
            sum = (sum.0 + o, sum.1 + f);
        }
        sum
    })
}

/// What the mock engine itself counts as in its hands: running + waiting.
async fn engine_count(engine: SocketAddr) -> u64 {
    let page = String::from_utf8_lossy(&get(&format!("http://{engine}/metrics")).await.1).into_owned();
    (metric_value(&page, "vllm:num_requests_running") + metric_value(&page, "vllm:num_requests_waiting")) as u64
}

/// Completions done through `proxies` by 40 clients split 32 / 6 / 2 (or all through one) over
/// `window`, with the engine's own count sampled every 50 ms: (completions, highest count).
async fn measure(proxies: &[SocketAddr], split: &[usize], engine: SocketAddr, window: Duration) -> (u64, u64) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let loads: Vec<_> =
        proxies.iter().zip(split).map(|(p, n)| completions(*p, *n, stop.clone(), done.clone())).collect();
    // The shares follow the load within a few exchange periods; the engine's count is watched
    // from the start, the completions counted after it.
    let t = Instant::now();
    let mut highest = 0;
    while t.elapsed() < Duration::from_secs(2) {
        highest = highest.max(engine_count(engine).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start_count = done.load(std::sync::atomic::Ordering::Relaxed);
    let t = Instant::now();
    let (mut sum, mut n) = (0, 0);
    while t.elapsed() < window {
        let count = engine_count(engine).await;
        highest = highest.max(count);
        (sum, n) = (sum + count, n + 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("engine count over the window: mean {:.1}, highest {highest}", sum as f64 / n.max(1) as f64);
    let done = done.load(std::sync::atomic::Ordering::Relaxed) - start_count;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loads {
        let (_, failed) = l.await.unwrap();
        assert_eq!(failed, 0);
    }
    (done, highest)
}

/// A backend's `max_inflight` is the group's budget: under an uneven load (80 / 15 / 5% of the
/// clients on three replicas) the engine never holds more than its capacity, and the group serves
/// at least 90% of what one replica with the whole capacity serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_a_backends_capacity_instead_of_multiplying_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let etcd = EtcdCluster::start(3).await;
    let engine = free_addr();
    let args = ["--capacity", "64", "--ttft", "250ms", "--tokens", "3", "--token-interval", "10ms"];
    let _mock = spawn(&[&["mock-backend", "--listen", &engine.to_string()][..], &args[..]].concat());
    wait_listening(engine).await;
    let pool = "max_inflight_per_backend = 20\nqueue = { max_depth = 200, timeout = \"20s\" }\n";
    let mut replicas = Vec::new();
    for name in ["a", "b", "c"] {
        replicas.push(replica_with(&etcd, name, engine, pool).await);
    }
    // Every replica holds a share, and the shares sum to the capacity.
    poll_until(T, "shares applied on every replica", || async {
        let mut sum = 0;
        for r in &replicas {
            let (_, v) = admin_call(r.admin, Method::GET, "/api/pools", "").await;
            match v["pools"][0]["backends"][0]["share"].as_u64() {
                Some(s) => sum += s,
                None => return false,
            }
        }
        sum == 20
    })
    .await;
    let proxies: Vec<SocketAddr> = replicas.iter().map(|r| r.proxy).collect();
    let admins: Vec<SocketAddr> = replicas.iter().map(|r| r.admin).collect();
    // The shares as the load runs: sampled every 100 ms from 2.5 s on.
    let sampling = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let mut seen = Vec::new();
        for _ in 0..30 {
            let mut shares = Vec::new();
            for a in &admins {
                let (_, v) = admin_call(*a, Method::GET, "/api/pools", "").await;
                shares.push(v["pools"][0]["backends"][0]["share"].as_u64().unwrap_or(0));
            }
            seen.push(shares);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen
    });
    let (group, highest) = measure(&proxies, &[32, 6, 2], engine, Duration::from_secs(4)).await;
    let shares = sampling.await.unwrap();
    drop(replicas);

    // One replica alone, with the whole capacity, under the same 40 clients.
    let alone = Headroom::start(&config(&[(engine, 1)], pool, "access_log = false")).await;
    let (single, _) = measure(&[alone.addr], &[40], engine, Duration::from_secs(4)).await;
    eprintln!(
        "shares while loaded {:?}; engine count at most {highest} (capacity 20); completions: group {group}, one replica {single}",
        shares.iter().collect::<std::collections::BTreeSet<_>>()
    );
    assert!(highest <= 20, "the engine held {highest} requests: more than the capacity of 20");
    assert!(group as f64 >= 0.9 * single as f64, "group {group} vs one replica {single}");
}

/// POSTs `body` to etcd's JSON gateway at `path` (the test's own set-up calls).
async fn etcd_call(etcd: &EtcdCluster, path: &str, body: &str) -> serde_json::Value {
    let req =
        http::Request::post(format!("http://{}{path}", etcd.members[0].client)).body(full(body.to_string())).unwrap();
    let r = client().request(req).await.unwrap();
    use http_body_util::BodyExt;
    serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

/// etcd with authentication on: a replica with the right user and password (from the
/// environment variable `password_env` names) joins and registers; one with a wrong password
/// stays out and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_signs_in_to_an_etcd_that_requires_a_user() {
    let _one = ONE_AT_A_TIME.lock().await;
    let etcd = EtcdCluster::start(1).await;
    etcd_call(&etcd, "/v3/auth/user/add", r#"{"name": "root", "password": "s3cret-pw"}"#).await;
    etcd_call(&etcd, "/v3/auth/role/add", r#"{"name": "root"}"#).await;
    etcd_call(&etcd, "/v3/auth/user/grant", r#"{"user": "root", "role": "root"}"#).await;
    etcd_call(&etcd, "/v3/auth/enable", "{}").await;
    // Without a token etcd now refuses.
    let refused = etcd_call(&etcd, "/v3/kv/range", r#"{"key": "Zm9v"}"#).await;
    assert!(refused["error"].as_str().is_some(), "{refused}");
    // Read by each child process from its environment when it loads its config.
    std::env::set_var("HEADROOM_TEST_ETCD_PASSWORD", "s3cret-pw");
    std::env::set_var("HEADROOM_TEST_ETCD_WRONG", "not-it");
    let backend = TestBackend::ok().await;
    let good = start_replica(
        &etcd,
        "a",
        backend.addr,
        "",
        "username = \"root\"\npassword_env = \"HEADROOM_TEST_ETCD_PASSWORD\"",
    )
    .await;
    poll_until(T, "the replica with the password connected", || async {
        admin_call(good.admin, Method::GET, "/api/cluster", "").await.1["connected"] == true
    })
    .await;
    let added = dead_addr().await;
    let (status, body) =
        admin_call(good.admin, Method::POST, "/api/pools/default/backends", &format!("{{\"addr\": \"{added}\"}}"))
            .await;
    assert_eq!(status, 201, "{body}");
    let bad =
        start_replica(&etcd, "b", backend.addr, "", "username = \"root\"\npassword_env = \"HEADROOM_TEST_ETCD_WRONG\"")
            .await;
    poll_until(T, "the replica with a wrong password reports why", || async {
        let v = admin_call(bad.admin, Method::GET, "/api/cluster", "").await.1;
        v["connected"] == false && v["last_error"].as_str().is_some_and(|e| e.contains("authentication failed"))
    })
    .await;
    assert!(!backends_of(bad.admin).await.iter().any(|(a, _)| *a == added.to_string()));
}

/// etcd serving TLS on its client port: a replica given the CA (`ca_file`) joins over https.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_joins_an_etcd_that_speaks_tls() {
    let _one = ONE_AT_A_TIME.lock().await;
    let certs = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_headroom"))
        .args(["gen-cert", "--out", certs.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let (cert, key) = (certs.path().join("dev.crt"), certs.path().join("dev.key"));
    let etcd = EtcdCluster::start_with(1, Some((cert.clone(), key))).await;
    let backend = TestBackend::ok().await;
    let ca = format!("ca_file = \"{}\"", cert.display());
    let r = start_replica(&etcd, "a", backend.addr, "", &ca).await;
    poll_until(T, "the replica connected over TLS", || async {
        admin_call(r.admin, Method::GET, "/api/cluster", "").await.1["connected"] == true
    })
    .await;
    let (_, v) = admin_call(r.admin, Method::GET, "/api/cluster", "").await;
    assert!(v["etcd"][0].as_str().unwrap().starts_with("https://"), "{v}");
    // Without the CA, the certificate is not trusted: no connection.
    let other = start_replica(&etcd, "b", backend.addr, "", "").await;
    poll_until(T, "the replica without the CA reports the untrusted certificate", || async {
        let v = admin_call(other.admin, Method::GET, "/api/cluster", "").await.1;
        v["connected"] == false && v["last_error"].as_str().is_some_and(|e| e.contains("certificate"))
    })
    .await;
}

/// With every etcd member stopped for 30 s of load that would scale the pool, the replicas serve
/// every request and nobody calls the provider (no lease, no leader); when etcd returns they
/// reconnect, elect a leader, and scaling resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_nobody_scales_and_every_request_is_served_then_scaling_resumes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut etcd = EtcdCluster::start(3).await;
    let backend = slow().await;
    let extra = TestBackend::ok().await;
    let provider = Provider::new(&[extra.addr]);
    // Capacity 4 for two replicas: each keeps a share of at least one through etcd's absence.
    let pool = provider.pool(
        "max_inflight_per_backend = 4\nqueue = { max_depth = 100, timeout = \"60s\" }",
        "min_backends = 1\nmax_backends = 3\ntarget_inflight_per_backend = 4\nscale_up_queue_depth = 2\n\
         scale_up_window = \"400ms\"\nscale_down_window = \"600s\"\ncooldown = \"60s\"",
    );
    let a = replica_with(&etcd, "a", backend.addr, &pool).await;
    let b = replica_with(&etcd, "b", backend.addr, &pool).await;
    poll_until(T, "shares on both replicas", || async {
        let mut sum = 0;
        for r in [&a, &b] {
            match admin_call(r.admin, Method::GET, "/api/pools", "").await.1["pools"][0]["backends"][0]["share"]
                .as_u64()
            {
                Some(s) if s > 0 => sum += s,
                _ => return false,
            }
        }
        sum == 4
    })
    .await;
    for i in 0..3 {
        etcd.stop_member(i);
    }
    poll_until(T, "both replicas see etcd gone", || async {
        admin_call(a.admin, Method::GET, "/api/cluster", "").await.1["connected"] == false
            && admin_call(b.admin, Method::GET, "/api/cluster", "").await.1["connected"] == false
    })
    .await;
    // 8 clients on each replica against 2 slots each: the queues stay far above the threshold.
    let stops: Vec<_> = (0..2).map(|_| std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))).collect();
    let loads: Vec<_> = [&a, &b].iter().zip(&stops).map(|(r, s)| clients(r.proxy, 8, s.clone())).collect();
    tokio::time::sleep(Duration::from_secs(30)).await;
    for s in &stops {
        s.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    for l in loads {
        assert_eq!(l.await.unwrap(), 0, "requests failed while etcd was away");
    }
    assert!(provider.calls().is_empty(), "a provider call without etcd: {:?}", provider.calls());

    // etcd back, load again: a leader is elected and scales.
    for i in 0..3 {
        etcd.start_member(i);
    }
    let stops: Vec<_> = (0..2).map(|_| std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))).collect();
    let loads: Vec<_> = [&a, &b].iter().zip(&stops).map(|(r, s)| clients(r.proxy, 8, s.clone())).collect();
    poll_until(T, "a scale-up once etcd is back", || async { !provider.calls().is_empty() }).await;
    assert_eq!(provider.calls()[0]["action"], "scale_up");
    for s in &stops {
        s.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    for l in loads {
        assert_eq!(l.await.unwrap(), 0);
    }
}
