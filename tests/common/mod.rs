//! Test harness: real hyper backends on ephemeral loopback ports, a real headroom in-process on
//! its own listeners, and real clients. No fixed ports, no fixed sleeps: `poll_until` waits for a
//! condition with a deadline.

#![allow(dead_code)]
// Tests may lock; the rule is for the data path.
#![allow(clippy::disallowed_types)]

pub mod etcd;

use bytes::Bytes;
use headroom::config::Config;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Bodies of test backends and clients; the error lets a backend fail a body on purpose.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never: Infallible| match never {}).boxed()
}

/// A body fed by a channel: each message is one frame, sent when the test says so.
pub fn channel_body() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    (tx, ChannelBody(rx).map_err(|never: Infallible| match never {}).boxed())
}

struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A real backend: hyper (HTTP/1.1 and h2c) on 127.0.0.1:0, answering with `handler`.
pub struct TestBackend {
    pub addr: SocketAddr,
    /// TCP connections accepted so far.
    pub connections: Arc<AtomicU64>,
    /// Requests received so far.
    pub hits: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    /// Open connections, so `kill` can drop them mid-request.
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    /// Set by `kill`: a connection accepted while killing is aborted too.
    killed: Arc<std::sync::atomic::AtomicBool>,
}

impl TestBackend {
    pub async fn start<F, Fut>(handler: F) -> TestBackend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, handler)
    }

    pub fn serve<F, Fut>(listener: TcpListener, handler: F) -> TestBackend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let hits = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = oneshot::channel();
        let handler = Arc::new(handler);
        let (c, h) = (connections.clone(), hits.clone());
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let open = conns.clone();
        let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dead = killed.clone();
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut stopped => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                c.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let h = h.clone();
                let svc = hyper::service::service_fn(move |req| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let task = tokio::spawn(async move {
                    let _ = conn.await;
                });
                let mut open = open.lock().unwrap();
                if dead.load(Ordering::SeqCst) {
                    task.abort();
                } else {
                    open.push(task.abort_handle());
                }
            }
        });
        TestBackend { addr, connections, hits, stop: Some(stop), conns, killed }
    }

    /// Answers 200 with `X-Backend: addr` and a small body.
    pub async fn ok() -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        Self::serve(listener, move |_req| {
            let addr = addr.clone();
            async move { Response::builder().header("x-backend", addr).body(full("hello from backend")).unwrap() }
        })
    }

    /// Answers with a JSON echo of what it received: method, path, headers and body length.
    pub async fn echo() -> TestBackend {
        Self::start(|req: Request<Incoming>| async move {
            let (parts, body) = req.into_parts();
            let len = match body.collect().await {
                Ok(b) => b.to_bytes().len() as i64,
                Err(_) => -1,
            };
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
                .keys()
                .map(|k| {
                    let vals: Vec<String> = parts
                        .headers
                        .get_all(k)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .collect();
                    (k.as_str().to_string(), serde_json::Value::String(vals.join(" | ")))
                })
                .collect();
            let v = serde_json::json!({
                "method": parts.method.as_str(),
                "uri": parts.uri.to_string(),
                "version": format!("{:?}", parts.version),
                "headers": headers,
                "body_len": len,
            });
            Response::builder().header("content-type", "application/json").body(full(v.to_string())).unwrap()
        })
        .await
    }

    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Like a crash: stops accepting and drops every open connection, requests in flight included.
    pub fn kill(&mut self) {
        self.stop();
        let mut open = self.conns.lock().unwrap();
        self.killed.store(true, Ordering::SeqCst);
        for c in open.drain(..) {
            c.abort();
        }
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A headroom instance running in-process on ephemeral ports.
pub struct Headroom {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Headroom {
    /// Starts headroom with this config text (its listen addresses are ignored).
    pub async fn start(toml: &str) -> Headroom {
        Self::start_with_workers(toml, 1).await
    }

    /// Starts headroom with `workers` accepting threads (each with its own runtime).
    pub async fn start_with_workers(toml: &str, workers: usize) -> Headroom {
        let config = Config::parse(toml, Path::new(".")).unwrap_or_else(|e| panic!("test config invalid: {e}\n{toml}"));
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = proxy.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let listeners = headroom::Listeners { proxy: vec![proxy], admin };
            headroom::run_with_workers(
                config,
                listeners,
                async {
                    let _ = stopped.await;
                },
                workers,
            )
            .await
            .unwrap_or_else(|e| eprintln!("headroom stopped: {e}"));
        });
        Headroom { addr, admin: admin_addr, stop: Some(stop), task: Some(task) }
    }

    /// Starts headroom on the config file at `path` (its listen addresses are ignored), watching
    /// it for reloads.
    pub async fn start_file(path: &Path) -> Headroom {
        let config = Config::load(path).unwrap_or_else(|e| panic!("test config invalid: {e}"));
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = proxy.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let options = headroom::RunOptions { workers: 1, config_path: Some(path.to_path_buf()) };
        let task = tokio::spawn(async move {
            let listeners = headroom::Listeners { proxy: vec![proxy], admin };
            let stopped = async {
                let _ = stopped.await;
            };
            headroom::run_with(config, listeners, stopped, options)
                .await
                .unwrap_or_else(|e| eprintln!("headroom stopped: {e}"));
        });
        let hr = Headroom { addr, admin: admin_addr, stop: Some(stop), task: Some(task) };
        // Once the admin API answers, the file is being watched.
        hr.config_status().await;
        hr
    }

    /// `GET /api/config` from the admin listener.
    pub async fn config_status(&self) -> serde_json::Value {
        let (status, body) = get(&format!("http://{}/api/config", self.admin)).await;
        assert_eq!(status, 200);
        serde_json::from_slice(&body).unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `GET /api/pools` from the admin listener.
    pub async fn pools(&self) -> serde_json::Value {
        let (status, body) = get(&format!("http://{}/api/pools", self.admin)).await;
        assert_eq!(status, 200);
        serde_json::from_slice(&body).unwrap()
    }

    /// The pool's backends as (addr, in_flight) pairs.
    pub async fn in_flight(&self) -> Vec<(String, u64)> {
        let v = self.pools().await;
        v["pools"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b["addr"].as_str().unwrap().to_string(), b["in_flight"].as_u64().unwrap()))
            .collect()
    }

    pub async fn queue_depth(&self) -> u64 {
        self.pools().await["pools"][0]["queue_depth"].as_u64().unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for Headroom {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A pool config listing these backends with these weights; `pool_extra` goes into the pool
/// table and `server_extra` into `[server]`.
pub fn config(backends: &[(SocketAddr, u32)], pool_extra: &str, server_extra: &str) -> String {
    let mut s = format!("[server]\n{server_extra}\n[pools.default]\n{pool_extra}\n");
    for (addr, w) in backends {
        s.push_str(&format!("[[pools.default.backends]]\naddr = \"{addr}\"\nweight = {w}\n"));
    }
    s
}

pub fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET and collect: (status, body).
pub async fn get(url: &str) -> (StatusCode, Bytes) {
    let resp = client().request(Request::get(url).body(full(Bytes::new())).unwrap()).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

/// Waits until `cond` holds, checking every 10 ms, for at most `limit`.
pub async fn poll_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends raw bytes on a fresh connection and returns what came back until the server closed
/// (or `limit` passed).
pub async fn raw(addr: SocketAddr, request: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A loopback address nothing listens on.
pub async fn dead_addr() -> SocketAddr {
    // Bound but never listening: connections are refused, and the port stays taken for the rest
    // of the test process, so no server another test starts can land on it.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    std::mem::forget(socket);
    addr
}

/// Sends `method path` with a body to the admin listener: (status, JSON body).
pub async fn admin_call(admin: SocketAddr, method: http::Method, path: &str, body: &str) -> (u16, serde_json::Value) {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .header("content-type", "application/json")
        .body(full(Bytes::from(body.to_string())))
        .unwrap();
    let r = client().request(req).await.unwrap();
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
}

/// Unix time in seconds, as the provider scripts' `date +%s.%N` prints it.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The value of the series `name{labels}` exactly as written (e.g. `x_total{outcome="ok"}`) in a
/// Prometheus text page; 0 when absent.
pub fn metric_value(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Makes sure a test tool from Debian's packages is there, running `scripts/install-test-deps`
/// when `present` says it is not; panics, saying what is missing, if it still is not.
pub fn ensure_test_tool(what: &str, present: impl Fn() -> bool) {
    if present() {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install-test-deps");
    let ran = std::process::Command::new(script).status();
    assert!(
        present(),
        "{what} is missing and {script} could not install it ({ran:?}); install it (Debian: apt-get install {what})"
    );
}

/// A rustls client trusting the CA certificates in the PEM file `ca`, offering `alpn`.
pub fn tls_client_config(ca: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// Stops a child process the way an operator would (SIGTERM), so that a headroom stops the
/// backends it launched; SIGKILL only if it has not exited within 10 s.
pub fn stop_process(child: &mut std::process::Child) {
    if let Ok(None) = child.try_wait() {
        let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A free loopback address (for a child process that must be told its port).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A child process stopped (SIGTERM, then SIGKILL) on drop.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        stop_process(&mut self.0);
    }
}

/// Runs the headroom binary with `args`, its output discarded.
pub fn spawn(args: &[&str]) -> Proc {
    use std::process::{Command, Stdio};
    Proc(
        Command::new(env!("CARGO_BIN_EXE_headroom"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Waits until something accepts connections on `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    poll_until(Duration::from_secs(15), "process listening", || async move {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // The kernel reports in USER_HZ, 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// A backend whose response body is driven by the test through the returned channel.
pub async fn streaming_backend() -> (TestBackend, mpsc::UnboundedReceiver<mpsc::Sender<Bytes>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let b = TestBackend::start(move |_req| {
        let tx = tx.clone();
        async move {
            let (events, body) = channel_body();
            let _ = tx.send(events);
            Response::builder().header("content-type", "text/event-stream").body(body).unwrap()
        }
    })
    .await;
    (b, rx)
}

pub fn json_of(text: &str) -> serde_json::Value {
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    // A chunked response carries its size lines around the JSON.
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map_or(body.len(), |i| i + 1);
    serde_json::from_str(&body[start..end]).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}
