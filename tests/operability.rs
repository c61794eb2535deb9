//! Operability: the status page in a real headless Chromium (driven over the DevTools protocol),
//! the history API behind it, and the Grafana dashboard against a live `/metrics`.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::Method;
use hyper::body::Incoming;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium with one page, driven over the DevTools protocol.
struct Browser {
    child: std::process::Child,
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn open(url: &str) -> Browser {
        ensure_test_tool("chromium", || std::path::Path::new(CHROMIUM).exists());
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=1200,800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start chromium");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let stderr = child.stderr.take().unwrap();
        let port = tokio::task::spawn_blocking(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let line = line.ok()?;
                if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                    return rest.split('/').next()?.parse::<u16>().ok();
                }
            }
            None
        });
        let port = tokio::time::timeout(T, port).await.expect("chromium did not start").unwrap().expect("no port");
        let deadline = tokio::time::Instant::now() + T;
        let ws_url = loop {
            let (_, body) = get(&format!("http://127.0.0.1:{port}/json/list")).await;
            let list: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let page = list.as_array().and_then(|l| {
                l.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(String::from))
            });
            if let Some(url) = page {
                break url;
            }
            assert!(tokio::time::Instant::now() < deadline, "chromium shows no page");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
        Browser { child, ws, next_id: 0, _profile: profile }
    }

    /// Calls a DevTools method and returns its result.
    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = serde_json::json!({ "id": id, "method": method, "params": params });
        self.ws.send(tokio_tungstenite::tungstenite::Message::text(msg.to_string())).await.unwrap();
        loop {
            let m = tokio::time::timeout(T, self.ws.next()).await.expect("DevTools went quiet").unwrap().unwrap();
            if let Ok(text) = m.to_text() {
                let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
                if v["id"] == id {
                    return v["result"].clone();
                }
            }
        }
    }

    /// Evaluates JavaScript in the page; returns its value.
    async fn eval(&mut self, expr: &str) -> serde_json::Value {
        let r = self.call("Runtime.evaluate", serde_json::json!({ "expression": expr, "returnByValue": true })).await;
        r["result"]["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The backends as the page shows them: (addr, state).
async fn shown(b: &mut Browser) -> Vec<(String, String)> {
    let v = b
        .eval("JSON.stringify([...document.querySelectorAll('tr[data-backend]')].map(r => [r.dataset.backend, r.dataset.state]))")
        .await;
    serde_json::from_str(v.as_str().unwrap_or("[]")).unwrap_or_default()
}

/// Evaluates `expr` until it returns `want` (compared as JSON), for at most `T`.
async fn wait_page(b: &mut Browser, what: &str, expr: &str, want: serde_json::Value) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let got = b.eval(expr).await;
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: last {got}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The state the page shows for `addr`.
fn state_of(addr: &str) -> String {
    format!("(document.querySelector('tr[data-backend=\"{addr}\"]') || {{dataset: {{}}}}).dataset.state || null")
}

/// A backend whose `/health` fails once `sick` is set.
async fn backend_with_health(sick: Arc<AtomicBool>) -> TestBackend {
    TestBackend::start(move |req: hyper::Request<Incoming>| {
        let bad = sick.load(Ordering::SeqCst) && req.uri().path() == "/health";
        async move { hyper::Response::builder().status(if bad { 503 } else { 200 }).body(full("ok")).unwrap() }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_each_backend_and_a_failure_without_a_reload() {
    let (a, mut b) = (TestBackend::ok().await, TestBackend::ok().await);
    let pool = "[pools.default.health]\ninterval = \"100ms\"\nunhealthy_threshold = 1\ntimeout = \"200ms\"\n";
    let hr = Headroom::start(
        &config(&[(a.addr, 1), (b.addr, 1)], pool, "")
            .replace("[server]", "[admin]\nhistory_interval = \"200ms\"\n[server]"),
    )
    .await;
    for _ in 0..20 {
        assert_eq!(get(&hr.url("/")).await.0, 200);
    }
    let mut browser = Browser::open(&format!("http://{}/?refresh=250", hr.admin)).await;
    let (sa, sb) = (a.addr.to_string(), b.addr.to_string());
    wait_page(&mut browser, "backend a healthy", &state_of(&sa), "healthy".into()).await;
    wait_page(&mut browser, "backend b healthy", &state_of(&sb), "healthy".into()).await;
    assert_eq!(shown(&mut browser).await.len(), 2);
    // A mark that a reload would wipe.
    browser.eval("window.__kept = 42").await;

    b.kill();
    wait_page(&mut browser, "the killed backend unhealthy", &state_of(&sb), "unhealthy".into()).await;
    assert_eq!(browser.eval(&state_of(&sa)).await, "healthy");
    assert_eq!(browser.eval("window.__kept").await, 42, "the page was reloaded");
    let badge = browser.eval(&format!("document.querySelector('tr[data-backend=\"{sb}\"] .badge').textContent")).await;
    assert_eq!(badge, "unhealthy");
    // The charts are drawn from the history API, with a time axis, a y scale and a legend.
    wait_page(&mut browser, "charts drawn", "document.querySelectorAll('.charts svg polyline').length", 4.into()).await;
    assert_eq!(browser.eval("document.querySelectorAll('.charts .axis').length").await, 4);
    assert_eq!(browser.eval("document.querySelectorAll('.charts .y.top').length").await, 4);
    let legend = browser.eval("document.querySelector('.legend').textContent").await;
    assert!(legend.as_str().unwrap().contains("scale up"), "{legend}");
    assert_eq!(browser.eval("document.querySelectorAll('.events').length").await, 1);
    // No traffic in the latest sample: no latency to show, not the last one seen.
    wait_page(
        &mut browser,
        "idle p99 shown as a dash",
        "document.querySelector('figure[data-chart=\"p99 latency\"] .now').textContent",
        "–".into(),
    )
    .await;

    let shot = browser.call("Page.captureScreenshot", serde_json::json!({ "format": "png" })).await;
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&out, &png).unwrap();
    eprintln!("screenshot: {} ({} bytes)", out.display(), png.len());
    hr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_live_rates_before_the_first_history_sample() {
    let a = TestBackend::ok().await;
    let hr = Headroom::start(
        &config(&[(a.addr, 1)], "", "").replace("[server]", "[admin]\nhistory_interval = \"60s\"\n[server]"),
    )
    .await;
    let url = hr.url("/x");
    let load = tokio::spawn(async move {
        for _ in 0..400 {
            get(&url).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut browser = Browser::open(&format!("http://{}/?refresh=250", hr.admin)).await;
    let rps = "(document.querySelector('.rps') || {textContent: '–'}).textContent";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let shown = browser.eval(rps).await;
        let value: f64 = shown.as_str().and_then(|t| t.parse().ok()).unwrap_or(0.0);
        if value > 0.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "req/s still {shown} with traffic running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let history: serde_json::Value =
        serde_json::from_slice(&get(&format!("http://{}/api/pools/default/history", hr.admin)).await.1).unwrap();
    assert_eq!(history["samples"].as_array().unwrap().len(), 0, "shown before any history sample");
    load.abort();
    hr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_api_samples_traffic_and_errors() {
    let sick = Arc::new(AtomicBool::new(false));
    let ok = backend_with_health(sick).await;
    let failing = TestBackend::start(|_req: hyper::Request<Incoming>| async {
        hyper::Response::builder().status(500).body(full("no")).unwrap()
    })
    .await;
    let text = format!(
        "[admin]\nhistory_interval = \"100ms\"\n[[routes]]\npath_prefix = \"/bad\"\npool = \"bad\"\n[[routes]]\npool = \"default\"\n\
         [pools.default]\n[[pools.default.backends]]\naddr = \"{}\"\n[pools.bad]\n[[pools.bad.backends]]\naddr = \"{}\"\n",
        ok.addr, failing.addr
    );
    let hr = Headroom::start(&text).await;
    for _ in 0..30 {
        assert_eq!(get(&hr.url("/x")).await.0, 200);
        assert_eq!(get(&hr.url("/bad")).await.0, 500);
    }
    let history = |pool: &'static str| {
        let admin = hr.admin;
        async move { admin_call(admin, Method::GET, &format!("/api/pools/{pool}/history"), "").await.1 }
    };
    poll_until(T, "samples with traffic", || async {
        let h = history("bad").await;
        h["samples"].as_array().unwrap().iter().any(|s| s["rps"].as_f64().unwrap() > 0.0)
    })
    .await;
    let bad = history("bad").await;
    assert_eq!(bad["capacity"], 3600, "15 minutes of 100 ms samples would be 9000: capped");
    let busy: Vec<&serde_json::Value> =
        bad["samples"].as_array().unwrap().iter().filter(|s| s["rps"].as_f64().unwrap() > 0.0).collect();
    assert!(busy.iter().all(|s| s["error_rate"] == 1.0), "{busy:?}");
    assert!(busy.iter().all(|s| s["backends"] == 1 && s["healthy"] == 1));
    let good = history("default").await;
    assert!(good["samples"].as_array().unwrap().iter().all(|s| s["error_rate"] == 0.0));
    assert!(good["samples"].as_array().unwrap().iter().any(|s| s["p99_ms"].is_u64()));
    assert_eq!(admin_call(hr.admin, Method::GET, "/api/pools/nope/history", "").await.0, 404);
    hr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_grafana_dashboard_uses_exists() {
    let text = std::fs::read_to_string("config/grafana-dashboard.json").unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is not valid JSON");
    assert_eq!(dash["uid"], "headroom-gateway");
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    let mut exprs: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()))
        .collect();
    exprs.extend(
        dash["annotations"]["list"].as_array().unwrap().iter().filter_map(|a| a["expr"].as_str().map(String::from)),
    );
    let mut names: Vec<String> = exprs
        .iter()
        .flat_map(|e| {
            e.match_indices("headroom_")
                .map(|(i, _)| e[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>())
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 15, "{names:?}");

    // A gateway with everything the dashboard shows: TLS, health checks, retries, an autoscaled
    // pool that asks the local provider for a backend, the queue, a reload.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_headroom"))
        .args(["gen-cert", "--names", "localhost", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let backend = TestBackend::ok().await;
    let cfg = format!(
        "[server.tls]\ncert = {:?}\nkey = {:?}\n[pools.default]\nmax_inflight_per_backend = 1\n\
         [pools.default.health]\ninterval = \"100ms\"\n[pools.default.retry]\n\
         [[pools.default.backends]]\naddr = \"{}\"\n\
         [pools.default.launch]\ncommand = [\"{}\", \"mock-backend\", \"--listen\", \"{{addr}}\"]\ncount = 0\n\
         [pools.default.autoscale]\nmin_backends = 2\nmax_backends = 2\n",
        dir.path().join("dev.crt"),
        dir.path().join("dev.key"),
        backend.addr,
        env!("CARGO_BIN_EXE_headroom")
    );
    let path = dir.path().join("headroom.toml");
    std::fs::write(&path, cfg).unwrap();
    let hr = Headroom::start_file(&path).await;
    assert_eq!(admin_call(hr.admin, Method::POST, "/api/reload", "").await.0, 200);
    poll_until(T, "the provisioned backend healthy", || async {
        let p = hr.pools().await;
        p["pools"][0]["backends"].as_array().unwrap().iter().filter(|b| b["state"] == "healthy").count() == 2
    })
    .await;
    let metrics =
        || async { String::from_utf8(get(&format!("http://{}/metrics", hr.admin)).await.1.to_vec()).unwrap() };
    // A failed handshake (plain HTTP to the TLS port), then requests over TLS.
    let _ = raw(hr.addr, b"GET / HTTP/1.1\r\n\r\n", Duration::from_secs(2)).await;
    // More concurrent requests than slots (2 backends × 1), so some queue.
    let gets: Vec<_> = (0..6).map(|_| tokio::spawn(tls_get(hr.addr, dir.path().join("dev.crt")))).collect();
    for g in gets {
        assert_eq!(g.await.unwrap(), 200);
    }
    let missing = |page: &str| -> Vec<String> {
        names
            .iter()
            .filter(|n| {
                let base = n.trim_end_matches("_bucket");
                !page.lines().any(|l| {
                    l.starts_with(&format!("{n}{{"))
                        || l.starts_with(&format!("{base}{{"))
                        || l.starts_with(&format!("{base} "))
                })
            })
            .cloned()
            .collect()
    };
    // The autoscaler books the provision time on its next look at the pool.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let gone = missing(&metrics().await);
        if gone.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the dashboard uses metrics /metrics doesn't have: {gone:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hr.stop().await;
}

/// One GET over TLS with a fresh connection.
async fn tls_get(addr: std::net::SocketAddr, ca: std::path::PathBuf) -> u16 {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls_client_config(&ca, &[]))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/v1/models").header("host", "localhost").body(full("")).unwrap();
    sender.send_request(req).await.map(|r| r.status().as_u16()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_each_engines_own_queue() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let engine = listener.local_addr().unwrap();
    let opts = headroom::mock::MockOptions { capacity: 2, ttft: Duration::from_secs(30), ..Default::default() };
    tokio::spawn(headroom::mock::serve(listener, opts, std::future::pending()));
    let section = "[pools.default.engine]\ninterval = \"100ms\"\n";
    let hr = Headroom::start(&format!("{}{section}", config(&[(engine, 1)], "", ""))).await;
    // Another client of the engine: two requests run, three wait in its scheduler.
    let url = format!("http://{engine}/v1/completions");
    let _load: Vec<_> = (0..5)
        .map(|_| {
            let req = hyper::Request::post(url.clone()).body(full("{\"prompt\":\"hi\"}")).unwrap();
            tokio::spawn(client().request(req))
        })
        .collect();
    let mut browser = Browser::open(&format!("http://{}/?refresh=250", hr.admin)).await;
    let cell = |class: &str| {
        format!("(document.querySelector('tr[data-backend=\"{engine}\"] .{class}') || {{}}).textContent || null")
    };
    wait_page(&mut browser, "the engine's queue", &cell("engine-queue"), "2 / 3".into()).await;
    wait_page(&mut browser, "the engine's KV usage", &cell("kv"), "90%".into()).await;
    assert_eq!(browser.eval(&cell("hits")).await, "0%", "two prompts looked up, none cached");
    let head = browser.eval("document.querySelector('section.pool thead').textContent").await;
    assert!(head.as_str().unwrap().contains("engine run / wait"), "{head}");
    // The page as served, before its script runs, has the same cells.
    let (_, page) = get(&format!("http://{}/", hr.admin)).await;
    assert!(String::from_utf8_lossy(&page).contains("<td class=\"engine-queue\">2 / 3</td>"));
    hr.stop().await;
}
