//! The `headroom` binary: `check`, `mock-backend`, the embedded default config, and graceful
//! shutdown on SIGTERM. These run the real executable as a child process.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::BodyExt;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_headroom");
const T: Duration = Duration::from_secs(15);

fn check(text: &str) -> (i32, String) {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(f.path()).output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    (out.status.code().unwrap_or(-1), stdout)
}

#[test]
fn check_accepts_the_default_config() {
    let out = Command::new(BIN).args(["check", "--config", "config/headroom.toml"]).output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    assert_eq!(stdout.lines().count(), 1);
    assert!(stdout.contains(": ok: listen 127.0.0.1:8080"), "{stdout}");
}

#[test]
fn with_no_config_file_here_check_checks_the_embedded_default() {
    let elsewhere = tempfile::tempdir().unwrap();
    let out = Command::new(BIN).arg("check").current_dir(elsewhere.path()).output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.starts_with("embedded default: ok: listen 127.0.0.1:8080"), "{stdout}");
    // In the source tree, the file there is used (and named) instead.
    let out = Command::new(BIN).arg("check").output().unwrap();
    assert!(String::from_utf8(out.stdout).unwrap().starts_with("config/headroom.toml: ok:"));
}

#[test]
fn load_help_lists_only_what_load_uses() {
    let out = Command::new(BIN).args(["load", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("--concurrency"), "{help}");
    assert!(!help.contains("--config") && !help.contains("--log-format"), "{help}");
    let out = Command::new(BIN).args(["mock-backend", "--help"]).output().unwrap();
    assert!(String::from_utf8(out.stdout).unwrap().contains("--log-format"));
    // Both places for --config keep working.
    for args in [&["--config", "config/headroom.toml", "check"][..], &["check", "--config", "config/headroom.toml"]] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
    }
}

#[test]
fn gen_cert_keeps_an_existing_key_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let gen = |force: bool| {
        let mut c = Command::new(BIN);
        c.args(["gen-cert", "--out"]).arg(dir.path());
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    assert!(gen(false).status.success());
    let key = std::fs::read(dir.path().join("dev.key")).unwrap();
    let out = gen(false);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --force"));
    assert_eq!(std::fs::read(dir.path().join("dev.key")).unwrap(), key);
    assert!(gen(true).status.success());
    assert_ne!(std::fs::read(dir.path().join("dev.key")).unwrap(), key);
}

#[test]
fn check_reports_broken_configs_on_one_line_with_position() {
    let backend = "[pools.default]\n[[pools.default.backends]]\naddr = \"127.0.0.1:9001\"\n";
    let cases: [(&str, String, &str, &str); 7] = [
        (
            "weight as a string",
            format!("{backend}weight = \"2\"\n"),
            ":4:10:",
            "pools.default.backends[0].weight: expected an integer 1..=1000, found the string \"2\"",
        ),
        (
            "bare duration",
            "[server]\nidle_timeout = 5\n".into(),
            ":2:16:",
            "server.idle_timeout: expected a duration string such as \"5s\" or \"150ms\", found the integer 5; write \"5s\"",
        ),
        ("syntax error", "[server\nlisten = [\"127.0.0.1:8080\"]\n".into(), ":1:8:", "unclosed table"),
        (
            "unknown key",
            format!("[server]\nlisten_addr = \"127.0.0.1:1\"\n{backend}"),
            ":2:1:",
            "unknown field `listen_addr`",
        ),
        (
            "unknown pool",
            format!("{backend}[[routes]]\npath_prefix = \"/\"\npool = \"gpu\"\n"),
            ":6:8:",
            "unknown pool \"gpu\"",
        ),
        ("weight 0", format!("{backend}weight = 0\n"), ":4:10:", "allowed 1..=1000"),
        (
            "duplicate backend",
            format!("{backend}[[pools.default.backends]]\naddr = \"127.0.0.1:9001\"\n"),
            ":5:8:",
            "duplicate backend address 127.0.0.1:9001",
        ),
    ];
    for (what, text, position, message) in cases {
        let (code, out) = check(&text);
        assert_eq!(code, 1, "{what}: exit code; output {out}");
        assert_eq!(out.lines().count(), 1, "{what}: not one line: {out:?}");
        assert!(out.contains(".toml") && out.contains(position), "{what}: no {position} in {out:?}");
        assert!(out.contains(message), "{what}: no {message:?} in {out:?}");
    }
}

/// POSTs a streaming chat completion; returns the events with their arrival times.
async fn stream_chat(url: &str) -> (u16, Vec<(Duration, String)>) {
    let body = r#"{"model":"mock-model","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let started = Instant::now();
    let resp = client()
        .request(Request::post(url).header("content-type", "application/json").body(full(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut events = Vec::new();
    let mut pending = String::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            pending.push_str(std::str::from_utf8(&data).unwrap());
            while let Some(i) = pending.find("\n\n") {
                events.push((started.elapsed(), pending[..i].to_string()));
                pending.drain(..i + 2);
            }
        }
    }
    (status, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_backend_speaks_openai_and_streams_tokens_as_made() {
    let addr = free_addr();
    let a = addr.to_string();
    let _mock =
        spawn(&["mock-backend", "--listen", &a, "--ttft", "50ms", "--token-interval", "100ms", "--tokens", "5"]);
    wait_listening(addr).await;

    let (status, events) = stream_chat(&format!("http://{a}/v1/chat/completions")).await;
    assert_eq!(status, 200);
    assert_eq!(events.len(), 6, "{events:?}");
    assert_eq!(events.last().unwrap().1, "data: [DONE]");
    let first: serde_json::Value = serde_json::from_str(events[0].1.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert!(first["choices"][0]["delta"]["content"].is_string());
    // Tokens arrive as they are made: the first one 400 ms before the last.
    assert!(events[4].0 - events[0].0 >= Duration::from_millis(300), "{events:?}");

    let (status, body) = get(&format!("http://{a}/v1/models")).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("mock-model"));
    let (_, metrics) = get(&format!("http://{a}/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("vllm:num_requests_running 0") && metrics.contains("vllm:num_requests_waiting 0"),
        "{metrics}"
    );
    assert_eq!(get(&format!("http://{a}/health")).await.0, 200);

    let resp = client()
        .request(
            Request::post(format!("http://{a}/v1/completions"))
                .body(full(Bytes::from_static(br#"{"prompt":"x"}"#)))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_backend_queues_beyond_capacity_and_injects_failures() {
    let addr = free_addr();
    let a = addr.to_string();
    let _mock = spawn(&["mock-backend", "--listen", &a, "--capacity", "1", "--ttft", "300ms", "--tokens", "1"]);
    wait_listening(addr).await;
    let url = format!("http://{a}/v1/completions");
    let reqs: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let r =
                    client().request(Request::post(url).body(full(Bytes::from_static(b"{}"))).unwrap()).await.unwrap();
                r.into_body().collect().await.unwrap();
            })
        })
        .collect();
    poll_until(T, "one running, one waiting", || {
        let m = format!("http://{a}/metrics");
        async move {
            let text = String::from_utf8_lossy(&get(&m).await.1).into_owned();
            text.contains("vllm:num_requests_running 1") && text.contains("vllm:num_requests_waiting 1")
        }
    })
    .await;
    for r in reqs {
        r.await.unwrap();
    }

    let addr = free_addr();
    let a = addr.to_string();
    let _failing = spawn(&["mock-backend", "--listen", &a, "--fail-rate", "1", "--ttft", "1ms"]);
    wait_listening(addr).await;
    let r = client()
        .request(Request::post(format!("http://{a}/v1/completions")).body(full(Bytes::from_static(b"{}"))).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
}

/// The embedded default config, on free ports: launches its mock backends and streams through.
fn default_config_on_free_ports() -> (tempfile::NamedTempFile, SocketAddr, SocketAddr) {
    let text = std::fs::read_to_string("config/headroom.toml").unwrap();
    let (proxy, admin) = (free_addr(), free_addr());
    let text = text.replace("127.0.0.1:8080", &proxy.to_string()).replace("127.0.0.1:9901", &admin.to_string());
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    (f, proxy, admin)
}

fn sigterm(p: &Proc) {
    let ok = Command::new("kill").args(["-TERM", &p.0.id().to_string()]).status().unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_config_streams_a_chat_completion_and_drains_on_sigterm() {
    let (file, proxy, admin) = default_config_on_free_ports();
    let mut hr = spawn(&["--config", file.path().to_str().unwrap()]);
    wait_listening(proxy).await;

    let url = format!("http://{proxy}/v1/chat/completions");
    let (status, events) = stream_chat(&url).await;
    assert_eq!(status, 200);
    assert_eq!(events.last().unwrap().1, "data: [DONE]");
    assert!(events.len() >= 10, "{events:?}");
    // Unbuffered through the proxy: the first token long before the last.
    let spread = events[events.len() - 2].0 - events[0].0;
    assert!(spread >= Duration::from_millis(500), "events arrived together: {spread:?}");

    let pools: serde_json::Value = serde_json::from_slice(&get(&format!("http://{admin}/api/pools")).await.1).unwrap();
    assert_eq!(pools["pools"][0]["backends"].as_array().unwrap().len(), 2);

    // A stream in flight when SIGTERM arrives still finishes; then the process exits 0.
    let in_flight = tokio::spawn(async move { stream_chat(&url).await });
    poll_until(T, "stream in flight", || async move {
        let v: serde_json::Value = serde_json::from_slice(&get(&format!("http://{admin}/api/pools")).await.1).unwrap();
        v["pools"][0]["in_flight"].as_u64() == Some(1)
    })
    .await;
    sigterm(&hr);
    let (status, events) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(events.last().unwrap().1, "data: [DONE]", "stream cut by shutdown");
    let deadline = Instant::now() + T;
    let code = loop {
        if let Some(s) = hr.0.try_wait().unwrap() {
            break s.code();
        }
        assert!(Instant::now() < deadline, "headroom did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(0));
    // New connections are refused once it is gone.
    assert!(tokio::net::TcpStream::connect(proxy).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_once_keeps_launched_backends_and_survives_a_bad_file() {
    let (file, proxy, admin) = default_config_on_free_ports();
    let hr = spawn(&["--config", file.path().to_str().unwrap()]);
    wait_listening(proxy).await;
    let config = || async move {
        serde_json::from_slice::<serde_json::Value>(&get(&format!("http://{admin}/api/config")).await.1).unwrap()
    };
    let hup = || {
        let ok = Command::new("kill").args(["-HUP", &hr.0.id().to_string()]).status().unwrap();
        assert!(ok.success());
    };
    assert_eq!(config().await["reloads"], 0);
    hup();
    poll_until(T, "reloaded on SIGHUP", || async move { config().await["reloads"] == 1 }).await;
    let pools: serde_json::Value = serde_json::from_slice(&get(&format!("http://{admin}/api/pools")).await.1).unwrap();
    assert_eq!(pools["pools"][0]["backends"].as_array().unwrap().len(), 2, "launched backends kept: {pools}");

    // A broken file and SIGHUP: the error is reported, the process keeps serving the old config.
    std::fs::write(file.path(), "[pools.default\n").unwrap();
    hup();
    poll_until(T, "error reported", || async move { !config().await["last_error"].is_null() }).await;
    let status = config().await;
    assert_eq!(status["reloads"], 1);
    assert!(status["last_error"].as_str().unwrap().contains(":1:"), "{status}");
    let (code, events) = stream_chat(&format!("http://{proxy}/v1/chat/completions")).await;
    assert_eq!(code, 200);
    assert_eq!(events.last().unwrap().1, "data: [DONE]");
}

#[test]
fn bad_config_exits_64_with_one_line() {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(b"[pools.default]\n").unwrap();
    let out = Command::new(BIN).arg("--config").arg(f.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("no backends"), "{err}");
}

#[test]
fn gen_cert_writes_a_pair_that_check_accepts_and_check_refuses_a_mismatched_pair() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["one", "two"] {
        let out = Command::new(BIN)
            .args(["gen-cert", "--names", "localhost,127.0.0.1", "--out"])
            .arg(dir.path().join(sub))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let backend = "[pools.default]\n[[pools.default.backends]]\naddr = \"127.0.0.1:9001\"\n";
    let tls = |cert: &str, key: &str| {
        let (c, k) = (dir.path().join(cert), dir.path().join(key));
        format!("[server.tls]\ncert = {c:?}\nkey = {k:?}\n{backend}")
    };
    let (code, out) = check(&tls("one/dev.crt", "one/dev.key"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("TLS with 1 certificate(s)"), "{out}");
    let (code, out) = check(&tls("one/dev.crt", "two/dev.key"));
    assert_eq!(code, 1);
    assert!(out.contains(":2:8:") && out.contains("do not belong together"), "{out}");
    let (code, out) = check(&tls("one/missing.crt", "one/dev.key"));
    assert_eq!(code, 1);
    assert!(out.contains("missing.crt"), "{out}");
}

/// Runs headroom with `args` in front of one echo backend, sends a GET and a request that gets a
/// 404 (no route), stops it with SIGTERM, and returns its stderr.
async fn access_log_of(extra_args: &[&str]) -> (String, SocketAddr) {
    let backend = TestBackend::ok().await;
    let (proxy, admin) = (free_addr(), free_addr());
    let text = format!(
        "[server]\nlisten = [\"{proxy}\"]\n[admin]\nlisten = \"{admin}\"\n[[routes]]\npath_prefix = \"/v1\"\npool = \"default\"\n\
         [pools.default]\n[[pools.default.backends]]\naddr = \"{}\"\n",
        backend.addr
    );
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    let mut args = vec!["--config", f.path().to_str().unwrap()];
    args.extend_from_slice(extra_args);
    let child = Command::new(BIN)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let hr = Proc(child);
    wait_listening(proxy).await;
    let req = Request::get(format!("http://{proxy}/v1/models?secret=1"))
        .header("x-request-id", "req-abc-123")
        .body(full(Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await.unwrap();
    assert_eq!(get(&format!("http://{proxy}/nope")).await.0, 404);
    sigterm(&hr);
    let mut hr = hr;
    let mut stderr = String::new();
    std::io::Read::read_to_string(hr.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (stderr, backend.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_carry_every_field_in_text_and_json() {
    let (text, backend) = access_log_of(&[]).await;
    let line =
        text.lines().find(|l| l.contains("access") && l.contains("status=200")).unwrap_or_else(|| panic!("{text}"));
    for field in [
        "method=GET",
        "path=/v1/models",
        "pool=\"default\"",
        &format!("backend=\"{backend}\""),
        "bytes=18",
        "duration_ms=",
        "ttfb_ms=",
        "request_id=\"req-abc-123\"",
        "client=127.0.0.1",
        "outcome=\"complete\"",
    ] {
        assert!(line.contains(field), "{field} missing in: {line}");
    }
    assert!(!line.contains("secret"), "the query string is not logged: {line}");
    assert!(text.lines().any(|l| l.contains("access") && l.contains("status=404") && l.contains("backend=\"-\"")));

    let (json, backend) = access_log_of(&["--log-format", "json"]).await;
    let lines: Vec<serde_json::Value> =
        json.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let access: Vec<&serde_json::Value> = lines.iter().filter(|v| v["target"] == "access").collect();
    assert_eq!(access.len(), 2, "{json}");
    let ok = access.iter().find(|v| v["status"] == 200).unwrap();
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["path"], "/v1/models");
    assert_eq!(ok["pool"], "default");
    assert_eq!(ok["backend"], backend.to_string());
    assert_eq!(ok["bytes"], 18);
    assert_eq!(ok["request_id"], "req-abc-123");
    assert!(ok["duration_ms"].as_f64().unwrap() >= ok["ttfb_ms"].as_f64().unwrap());
    let missed = access.iter().find(|v| v["status"] == 404).unwrap();
    assert_eq!((missed["pool"].as_str(), missed["backend"].as_str()), (Some("-"), Some("-")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_that_cuts_streams_exits_75_and_one_that_finishes_them_exits_0() {
    let (release, held) = tokio::sync::watch::channel(false);
    let backend = TestBackend::start(move |_req| {
        let mut held = held.clone();
        async move {
            let _ = held.wait_for(|r| *r).await;
            hyper::Response::new(full("done"))
        }
    })
    .await;
    for (cut, code) in [(true, 75), (false, 0)] {
        let (proxy, admin) = (free_addr(), free_addr());
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        write!(
            f,
            "[server]\nlisten = [\"{proxy}\"]\nshutdown_timeout = \"300ms\"\n[admin]\nlisten = \"{admin}\"\n\
             [pools.default]\n[[pools.default.backends]]\naddr = \"{}\"\n",
            backend.addr
        )
        .unwrap();
        let mut p = spawn(&["--config", f.path().to_str().unwrap()]);
        wait_listening(proxy).await;
        let _ = release.send(!cut);
        let url = format!("http://{proxy}/held");
        let pending = tokio::spawn(async move { client().request(Request::get(url).body(full("")).unwrap()).await });
        poll_until(T, "the request at the backend", || async {
            backend.hits.load(std::sync::atomic::Ordering::SeqCst) > 0
        })
        .await;
        backend.hits.store(0, std::sync::atomic::Ordering::SeqCst);
        let _ = Command::new("kill").args(["-TERM", &p.0.id().to_string()]).status();
        let status = tokio::task::spawn_blocking(move || {
            let s = p.0.wait();
            std::mem::forget(p);
            s
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(status.code(), Some(code), "cut: {cut}");
        let _ = pending.await;
    }
}

#[test]
fn a_state_dir_that_cannot_be_written_is_reported_by_check_and_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let (proxy, admin) = (free_addr(), free_addr());
    let text = format!(
        "[server]\nlisten = [\"{proxy}\"]\nstate_dir = {:?}\n[admin]\nlisten = \"{admin}\"\n\
         [pools.default]\n[[pools.default.backends]]\naddr = \"127.0.0.1:9001\"\n",
        file.join("state")
    );
    let (code, out) = check(&text);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("server.state_dir") && out.contains("not-a-dir"), "{out}");
    let path = dir.path().join("headroom.toml");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new(BIN).arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(73), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.state_dir"), "{out:?}");
}
