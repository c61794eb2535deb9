//! README.md's shell blocks, run as written: each ```sh block is taken from README.md itself (so
//! this test breaks when the README changes and its commands stop working), preceded by a
//! `<!-- readme-test: NAME -->` line that says how it is checked, or `skip (why)`.
//!
//! The blocks run in bash with three shims: `cargo run --release [-- ARGS]` and `headroom ARGS`
//! run the binary under test, and `watch -n1 "CMD"` runs CMD once. `HEADROOM_DEMO_DURATION`
//! (default 20s) replaces every `--duration` so the one-minute demo fits in a test run. They use
//! the ports the README names (8080, 9901, 8443, 9902), so everything runs in one test, in the
//! README's order, from an empty directory (which also shows the embedded default at work).

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_headroom");
const README: &str = include_str!("../README.md");

/// The tags this test knows how to check.
const KNOWN: [&str; 7] = ["run", "stream", "look", "demo", "tls", "admin", "load"];

struct Block {
    tag: String,
    line: usize,
    text: String,
}

/// Every ```sh block of the README with the tag on the line before it ("" when there is none).
fn blocks() -> Vec<Block> {
    fenced("```sh")
}

/// Every block fenced by `fence` (e.g. "```toml"), with its tag.
fn fenced(fence: &str) -> Vec<Block> {
    let lines: Vec<&str> = README.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() == fence {
            let tag = i
                .checked_sub(1)
                .and_then(|p| lines[p].strip_prefix("<!-- readme-test: "))
                .and_then(|t| t.strip_suffix(" -->"))
                .unwrap_or("")
                .to_string();
            let end = (i + 1..lines.len()).find(|&k| lines[k].trim_end() == "```").unwrap_or(lines.len());
            out.push(Block { tag, line: i + 1, text: lines[i + 1..end].join("\n") + "\n" });
            i = end;
        }
        i += 1;
    }
    out
}

fn block(tag: &str) -> String {
    let found: Vec<Block> = blocks().into_iter().filter(|b| b.tag == tag).collect();
    assert_eq!(found.len(), 1, "README.md should have one block tagged {tag:?}");
    found.into_iter().next().map(|b| b.text).unwrap_or_default()
}

/// `cargo`, `headroom` and `watch` as executables put first on PATH: each ends in `exec`, so a
/// block's `cargo run --release ... &` is the headroom process itself, and `kill %1` stops it.
const SHIMS: [(&str, &str); 3] = [
    (
        "cargo",
        r#"#!/usr/bin/env bash
if [ "${1:-}" != run ] || [ "${2:-}" != --release ]; then echo "README test: unexpected cargo $*" >&2; exit 97; fi
shift 2
if [ "${1:-}" = -- ]; then shift; fi
exec headroom "$@"
"#,
    ),
    (
        "headroom",
        r#"#!/usr/bin/env bash
args=()
while [ $# -gt 0 ]; do
  if [ "$1" = --duration ]; then args+=(--duration "$HEADROOM_DEMO_DURATION"); shift 2; continue; fi
  args+=("$1"); shift
done
exec "$HEADROOM_TEST_BIN" "${args[@]}"
"#,
    ),
    ("watch", "#!/usr/bin/env bash\nif [ \"$1\" = -n1 ]; then shift; fi\nexec bash -c \"$1\"\n"),
];

fn install_shims(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join(".shims");
    std::fs::create_dir_all(&bin).unwrap();
    for (name, text) in SHIMS {
        let path = bin.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

fn bash(script: &str, dir: &Path) -> Command {
    let shims = dir.join(".shims");
    let path = format!("{}:{}", shims.display(), std::env::var("PATH").unwrap_or_default());
    let mut c = Command::new("bash");
    c.arg("-c").arg(script).current_dir(dir).env("PATH", path);
    c.env("HEADROOM_TEST_BIN", BIN);
    c.env("HEADROOM_DEMO_DURATION", std::env::var("HEADROOM_DEMO_DURATION").unwrap_or_else(|_| "20s".into()));
    c.env_remove("HEADROOM_ADMIN_TOKEN");
    c
}

/// Runs a block to its end; returns stdout, failing on a non-zero exit.
fn run_block(tag: &str, script: &str, dir: &Path) -> String {
    let out = bash(script, dir).stderr(Stdio::piped()).stdout(Stdio::piped()).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "README block {tag:?} failed ({}):\n{script}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout.into_owned()
}

fn listening(addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().unwrap();
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

fn wait_for(what: &str, limit: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pools() -> serde_json::Value {
    let out = Command::new("curl").args(["-s", "http://127.0.0.1:9901/api/pools"]).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// The numbers `load`'s table prints: (sent, ok, errors) and per window (ttft p50, ttft p99).
fn parse_load_table(text: &str) -> ((u64, u64, u64), Vec<(f64, f64)>) {
    let first = text.lines().find(|l| l.contains(" sent, ")).unwrap_or_else(|| panic!("no summary in {text}"));
    let tail = first.rsplit(": ").next().unwrap_or("");
    let nums: Vec<u64> = tail.split(", ").filter_map(|p| p.split_whitespace().next()?.parse().ok()).collect();
    let windows = text
        .lines()
        .skip_while(|l| !l.starts_with("window s"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(4)?.parse().ok()?, f.get(5)?.parse().ok()?))
        })
        .collect();
    ((nums[0], nums[1], nums[2]), windows)
}

/// Kills the child's process group on drop, so a failing assertion leaves no process behind.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the group this test created for the child.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

#[test]
fn every_shell_block_in_the_readme_has_a_check_named_before_it() {
    for b in blocks() {
        let known = KNOWN.contains(&b.tag.as_str()) || (b.tag.starts_with("skip (") && b.tag.ends_with(')'));
        assert!(known, "README.md:{}: a ```sh block needs <!-- readme-test: NAME --> before it (one of {KNOWN:?}, or skip (why)); found {:?}", b.line, b.tag);
    }
    for tag in KNOWN {
        block(tag);
    }
}

#[test]
fn every_whole_config_in_the_readme_is_accepted_as_written() {
    let configs: Vec<Block> = fenced("```toml").into_iter().filter(|b| b.tag == "config").collect();
    assert!(!configs.is_empty(), "README.md tags its complete example configs <!-- readme-test: config -->");
    for b in configs {
        if let Err(e) = headroom::config::Config::parse(&b.text, Path::new(".")) {
            panic!("README.md:{}: the example config is refused: {e}", b.line);
        }
    }
}

#[test]
fn the_readme_commands_work_as_written_one_after_another() {
    ensure_test_tool("curl", || Command::new("curl").arg("--version").output().is_ok());
    ensure_test_tool("python3", || Command::new("python3").arg("--version").output().is_ok());
    for port in ["127.0.0.1:8080", "127.0.0.1:9901", "127.0.0.1:8443", "127.0.0.1:9902"] {
        assert!(!listening(port), "{port} is taken; the README test needs the ports the README uses");
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    install_shims(dir);

    // Quick start: `cargo run --release` from an empty directory runs the embedded default.
    let run = block("run");
    assert!(run.lines().any(|l| l.starts_with("cargo test ")), "the run block names cargo test: {run}");
    let start: String = run.lines().filter(|l| !l.starts_with("cargo test")).collect::<Vec<_>>().join("\n");
    let log = dir.join("headroom.log");
    let mut cmd = bash(&start, dir);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let quick = Kill(cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap());
    wait_for("the quick start to listen", Duration::from_secs(30), || {
        listening("127.0.0.1:8080") && listening("127.0.0.1:9901")
    });
    let first = std::fs::read_to_string(&log).unwrap();
    let first = first.lines().next().unwrap_or("");
    assert!(
        first.contains("headroom starting") && first.contains("config=embedded default"),
        "first log line: {first}"
    );

    let out = run_block("stream", &block("stream"), dir);
    assert!(out.lines().filter(|l| l.starts_with("data: {")).count() >= 10, "{out}");
    assert!(out.contains("data: [DONE]"), "{out}");

    let out = run_block("look", &block("look"), dir);
    assert!(out.contains("\"pools\"") && out.contains("headroom_requests_total"), "{out}");

    demo(dir);
    tls(dir);
    admin(dir);
    load(dir);

    // SIGTERM: the quick start drains and exits 0.
    let mut quick = quick;
    let pid = quick.0.id();
    // bash runs a one-command script by exec: the child is headroom itself (else its child).
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let target = if exe == Path::new(BIN).canonicalize().unwrap() {
        pid.to_string()
    } else {
        let out = Command::new("pgrep").args(["-P", &pid.to_string()]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(Command::new("kill").args(["-TERM", &target]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = quick.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the quick start did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}

/// The scaling demo: the queue builds, backends come, the time to first token falls back, and
/// no request fails.
fn demo(dir: &Path) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut queue_peak, mut healthy_peak) = (0u64, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let p = pools();
                let pool = &p["pools"][0];
                queue_peak = queue_peak.max(pool["queue_depth"].as_u64().unwrap_or(0));
                let healthy =
                    pool["backends"].as_array().map_or(0, |b| b.iter().filter(|b| b["state"] == "healthy").count());
                healthy_peak = healthy_peak.max(healthy);
                std::thread::sleep(Duration::from_millis(100));
            }
            (queue_peak, healthy_peak)
        })
    };
    let out = run_block("demo", &format!("{}\nwait\n", block("demo")), dir);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (queue_peak, healthy_peak) = watcher.join().unwrap();
    let ((sent, ok, errors), windows) = parse_load_table(&out);
    let last = windows.last().copied().unwrap_or_default();
    let worst = windows.iter().map(|w| w.1).fold(0.0, f64::max);
    eprintln!(
        "demo: sent {sent}, ok {ok}, errors {errors}, queue peak {queue_peak}, healthy backends peak {healthy_peak}, \
         ttft p99 worst window {worst:.0} ms, last window p50 {:.0} ms",
        last.0
    );
    assert!(sent > 0 && errors == 0 && ok == sent, "the demo had errors:\n{out}");
    assert!(queue_peak >= 4, "the queue never built (peak {queue_peak})");
    assert!(healthy_peak >= 5, "backends did not come (peak {healthy_peak} healthy)");
    assert!(last.0 > 0.0 && last.0 <= 400.0, "TTFT did not fall back: last window p50 {} ms\n{out}", last.0);
    assert!(worst >= 2.0 * last.0, "no queueing showed in TTFT (worst p99 {worst}, last p50 {})\n{out}", last.0);
    // The block asks for the events as the load starts; by now they show what happened.
    let events = Command::new("curl").args(["-s", "http://127.0.0.1:9901/api/pools/default/events"]).output().unwrap();
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(events.contains("\"scale_up\""), "the events show no scale-up: {events}");
}

/// The TLS example beside the quick start, stopped as the README says.
fn tls(dir: &Path) {
    let out = run_block("tls", &format!("{}\nkill %1\nwait\n", block("tls")), dir);
    assert!(out.contains("mock-model"), "{out}");
    assert!(dir.join("certs/dev.crt").exists());
}

/// Registering, draining, undraining and removing a backend through the admin API.
fn admin(dir: &Path) {
    let out = run_block("admin", &block("admin"), dir);
    let states: Vec<String> = serde_json::Deserializer::from_str(&out)
        .into_iter::<serde_json::Value>()
        .map(|v| v.map_or("?".to_string(), |v| v["state"].as_str().unwrap_or("?").to_string()))
        .collect();
    assert_eq!(out.lines().count(), 4, "each answer ends its line: {out}");
    assert_eq!(states, ["starting", "draining", "starting", "draining"], "{out}");
}

/// The load examples: the demo drawn to an SVG, and a closed loop with a JSON report.
fn load(dir: &Path) {
    let out = run_block("load", &block("load"), dir);
    assert!(std::fs::read_to_string(dir.join("burst.svg")).unwrap().contains("<svg"));
    let json = &out[out.find("\n{").map_or(0, |i| i + 1)..];
    let report: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(report["ok"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
}
