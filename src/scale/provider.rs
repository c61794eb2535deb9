//! Provider hooks: how the autoscaler asks the user's infrastructure for backends and gives them
//! back. One JSON request, one JSON reply, whatever the transport:
//!
//! - `command`: the program gets the request on stdin and prints the reply on stdout; a non-zero
//!   exit is a failure.
//! - `webhook`: the request is POSTed (`content-type: application/json`, optional bearer token)
//!   over http:// or https:// (public roots); a non-2xx status is a failure.
//! - `local`: headroom starts the pool's `[launch]` command itself on free loopback ports.
//!
//! Every call is bounded by the provider's `timeout`, and its output by [`MAX_OUTPUT`]: a
//! command runs in its own process group, killed whole when it overstays, prints too much, or
//! headroom stops. What a hook prints reaches logs and events only with control characters
//! escaped.
//! Runs in the autoscaler's task, never on the request path.

use super::launch::{LaunchError, Launched};
use crate::config::{BackendConfig, PoolConfig, ProviderKind};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// What the autoscaler asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    ScaleUp,
    ScaleDown,
    Replace,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScaleUp => "scale_up",
            Self::ScaleDown => "scale_down",
            Self::Replace => "replace",
        }
    }
}

/// The pool as the autoscaler saw it when it decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    pub ready: u32,
    pub starting: u32,
    pub queue_depth: u32,
    pub inflight: u32,
}

/// The request every provider receives (the hook protocol).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HookRequest {
    pub action: Action,
    pub pool: String,
    /// Backends wanted (`scale_up`, `replace`) or released (`scale_down`).
    pub count: u32,
    /// The backends released (`scale_down`) or replaced (`replace`).
    pub backends: Vec<String>,
    pub current: Current,
    pub reason: String,
}

/// A backend in a provider's reply.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyBackend {
    pub addr: String,
    pub weight: Option<u32>,
    pub max_inflight: Option<u32>,
}

/// A provider's reply: the new backends (possibly none, when they will register themselves).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HookReply {
    #[serde(default)]
    pub backends: Vec<ReplyBackend>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("{program}: {message}; the hook and its children were killed")]
    Output { program: String, message: String },
    #[error("{program} exited with {status}: {stderr}")]
    Exit { program: String, status: std::process::ExitStatus, stderr: String },
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("invalid reply: {0}")]
    BadReply(String),
    #[error("webhook {url}: {message}")]
    Http { url: String, message: String },
    #[error("webhook {url} answered {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error(transparent)]
    Launch(#[from] LaunchError),
}

/// Calls the pool's provider with `req`, within its timeout. `base_dir` resolves a relative
/// command path; `launched` holds the local provider's processes.
pub async fn call(
    pool: &PoolConfig,
    base_dir: &Path,
    launched: &Launched,
    req: &HookRequest,
) -> Result<HookReply, ProviderError> {
    let Some(auto) = &pool.autoscale else {
        return Err(ProviderError::BadReply("the pool has no [autoscale] section".into()));
    };
    let timeout = auto.provider.timeout;
    let body = serde_json::to_vec(req).map_err(|e| ProviderError::BadReply(e.to_string()))?;
    let work = async {
        match &auto.provider.kind {
            ProviderKind::Command { command } => {
                let out = run_command(command, base_dir, &body).await?;
                parse_reply(req.action, &out)
            }
            ProviderKind::Webhook { url, token_env } => {
                let out = post(url, token_env.as_deref(), body.clone()).await?;
                parse_reply(req.action, &out)
            }
            ProviderKind::Local => local(pool, launched, req).await,
        }
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| ProviderError::Timeout(timeout))?
}

/// Turns a reply's backends into backend configs, with the pool's defaults.
pub fn reply_backends(pool: &PoolConfig, reply: &HookReply) -> Result<Vec<BackendConfig>, ProviderError> {
    reply
        .backends
        .iter()
        .map(|b| {
            let addr: SocketAddr = b
                .addr
                .parse()
                .map_err(|_| ProviderError::BadReply(format!("backend addr {:?} is not an ip:port address", b.addr)))?;
            let weight = b.weight.unwrap_or(1);
            if !(1..=crate::config::MAX_WEIGHT).contains(&weight) {
                return Err(ProviderError::BadReply(format!("backend {addr}: weight {weight} is out of range")));
            }
            let max_inflight = b.max_inflight.unwrap_or(pool.max_inflight_per_backend);
            if !(1..=1_000_000).contains(&max_inflight) {
                return Err(ProviderError::BadReply(format!(
                    "backend {addr}: max_inflight {max_inflight} is out of range"
                )));
            }
            Ok(BackendConfig { addr, weight, max_inflight, backup: false })
        })
        .collect()
}

/// The reply parser and what follows it, for property tests: a reply to each action, turned into
/// backends of a default pool.
#[cfg(test)]
pub(crate) fn parse_reply_for_test(out: &[u8]) {
    for action in [Action::ScaleUp, Action::ScaleDown, Action::Replace] {
        if let Ok(reply) = parse_reply(action, out) {
            let text = "[pools.p]\n[[pools.p.backends]]\naddr = \"127.0.0.1:9001\"\n";
            if let Ok(c) = crate::config::Config::parse(text, Path::new(".")) {
                let _ = reply_backends(&c.pools[0], &reply);
            }
        }
    }
}

fn parse_reply(action: Action, out: &[u8]) -> Result<HookReply, ProviderError> {
    if action != Action::ScaleUp && out.iter().all(u8::is_ascii_whitespace) {
        return Ok(HookReply::default());
    }
    serde_json::from_slice(out).map_err(|e| ProviderError::BadReply(format!("{e} in \"{}\"", printable(out, 200))))
}

/// The most a hook may print on stdout, and on stderr: past it the call fails and the hook is
/// killed.
pub const MAX_OUTPUT: usize = 1 << 20;

/// A hook's process group, killed whole when the call ends early (timeout, output over the cap,
/// headroom stopping): a provider script's children go with it.
struct Group(Option<u32>);

impl Group {
    /// The call finished normally: what the hook left running is its own business.
    fn release(mut self) {
        self.0 = None;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0) {
            // SAFETY: kill(2) with a negative pid signals that process group; no memory is shared.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

/// Reads `from` to its end, failing once it passes [`MAX_OUTPUT`].
async fn read_capped(from: Option<impl tokio::io::AsyncRead + Unpin>, what: &'static str) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncReadExt;
    let Some(from) = from else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    let n = from.take(MAX_OUTPUT as u64 + 1).read_to_end(&mut out).await.map_err(|e| format!("{what}: {e}"))?;
    if n > MAX_OUTPUT {
        return Err(format!("{what} over {MAX_OUTPUT} bytes"));
    }
    Ok(out)
}

async fn run_command(command: &[String], base_dir: &Path, input: &[u8]) -> Result<Vec<u8>, ProviderError> {
    let program = super::child::program(&command[0], base_dir);
    let shown = program.display().to_string();
    let mut child = super::child::command(&program, &command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| ProviderError::Spawn { program: shown.clone(), source })?;
    let group = Group(child.id());
    if let Some(mut stdin) = child.stdin.take() {
        // A program that doesn't read its input is allowed; its exit status decides.
        let _ = stdin.write_all(input).await;
    }
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (stdout, stderr) = tokio::join!(read_capped(stdout, "stdout"), read_capped(stderr, "stderr"));
    let (stdout, stderr) = match (stdout, stderr) {
        (Ok(o), Ok(e)) => (o, e),
        // Over the cap: dropping `group` kills the hook and everything it started.
        (Err(e), _) | (_, Err(e)) => return Err(ProviderError::Output { program: shown, message: e }),
    };
    let status = child.wait().await.map_err(|source| ProviderError::Spawn { program: shown.clone(), source })?;
    group.release();
    if !status.success() {
        let stderr = printable(&stderr, 500);
        return Err(ProviderError::Exit { program: shown, status, stderr });
    }
    Ok(stdout)
}

/// At most `max` bytes of a hook's output as one printable line: lossy UTF-8, control
/// characters (NUL, escape sequences, line breaks) escaped, trimmed.
pub fn printable(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]);
    let mut out = String::with_capacity(text.len());
    for c in text.trim().chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

async fn post(url: &http::Uri, token_env: Option<&str>, body: Vec<u8>) -> Result<Vec<u8>, ProviderError> {
    let fail = |message: String| ProviderError::Http { url: url.to_string(), message };
    let authority = url.authority().ok_or_else(|| fail("no host".into()))?;
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let https = url.scheme_str() == Some("https");
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let stream = tokio::net::TcpStream::connect((host, port)).await.map_err(|e| fail(format!("connect: {e}")))?;
    let mut sender = if https {
        // The system's usual public roots (webpki-roots): a webhook is an ordinary HTTPS service.
        let config =
            crate::tls::client_config(crate::tls::default_roots(), &[b"http/1.1"]).map_err(|e| fail(e.to_string()))?;
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| fail(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|e| fail(format!("TLS: {e}")))?;
        handshake(tls).await.map_err(|e| fail(format!("handshake: {e}")))?
    } else {
        handshake(stream).await.map_err(|e| fail(format!("handshake: {e}")))?
    };
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let mut req = http::Request::post(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, concat!("headroom/", env!("CARGO_PKG_VERSION")));
    if let Some(var) = token_env {
        match std::env::var(var) {
            Ok(token) => req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}")),
            Err(_) => return Err(fail(format!("environment variable {var} (token_env) is not set"))),
        }
    }
    let req = req.body(http_body_util::Full::new(bytes::Bytes::from(body))).map_err(|e| fail(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(|e| fail(format!("request: {e}")))?;
    let status = resp.status();
    let limited = http_body_util::Limited::new(resp.into_body(), MAX_OUTPUT);
    let bytes = limited.collect().await.map_err(|e| fail(format!("reply body: {e}")))?.to_bytes();
    if !status.is_success() {
        let body = printable(&bytes, 200);
        return Err(ProviderError::Status { url: url.to_string(), status: status.as_u16(), body });
    }
    Ok(bytes.to_vec())
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// An HTTP/1.1 client connection over `io`, driven by its own task.
async fn handshake<T>(io: T) -> hyper::Result<Sender>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The local provider: processes from the pool's launch template.
async fn local(pool: &PoolConfig, launched: &Launched, req: &HookRequest) -> Result<HookReply, ProviderError> {
    let Some(l) = &pool.launch else {
        return Err(ProviderError::BadReply("the local provider needs a [launch] section".into()));
    };
    if req.action != Action::ScaleUp {
        for b in &req.backends {
            if let Ok(addr) = b.parse() {
                launched.stop(addr).await;
            }
        }
    }
    if req.action == Action::ScaleDown {
        return Ok(HookReply::default());
    }
    let mut backends = Vec::new();
    let mut first_error = None;
    for started in launched.start_many(&pool.name, l, req.count).await {
        match started {
            Ok(b) => backends.push(ReplyBackend {
                addr: b.addr.to_string(),
                weight: Some(b.weight),
                max_inflight: Some(b.max_inflight),
            }),
            Err(e) => {
                tracing::warn!(pool = %pool.name, error = %e, "local backend failed to start");
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) if backends.is_empty() => Err(e.into()),
        _ => Ok(HookReply { backends }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_serialises_as_documented() {
        let req = HookRequest {
            action: Action::ScaleUp,
            pool: "default".into(),
            count: 2,
            backends: vec![],
            current: Current { ready: 1, starting: 0, queue_depth: 9, inflight: 8 },
            reason: "queue".into(),
        };
        let v: serde_json::Value = serde_json::to_value(&req).unwrap();
        assert_eq!(v["action"], "scale_up");
        assert_eq!(v["current"]["queue_depth"], 9);
        assert_eq!(v["count"], 2);
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn a_hook_that_prints_endlessly_fails_at_the_cap_and_is_killed() {
        let started = std::time::Instant::now();
        let e = run_command(&sh("yes"), Path::new("."), b"").await.unwrap_err();
        assert!(matches!(e, ProviderError::Output { .. }), "{e}");
        assert!(e.to_string().contains("stdout over 1048576 bytes"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let e = run_command(&sh("yes >&2"), Path::new("."), b"").await.unwrap_err();
        assert!(e.to_string().contains("stderr over"), "{e}");
    }

    #[tokio::test]
    async fn a_hook_that_overstays_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let script = format!("sleep 300 & echo $! > {}; wait", pids.display());
        let command = sh(&script);
        let call = run_command(&command, Path::new("."), b"");
        assert!(tokio::time::timeout(Duration::from_millis(500), call).await.is_err());
        let pid = std::fs::read_to_string(&pids).unwrap().trim().to_string();
        // The grandchild is gone (or a zombie waiting for init to reap it).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next().unwrap_or('?'));
            if stat.is_empty() || state == Some('Z') {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the hook's child {pid} still runs: {stat}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_failing_hook_is_reported_with_its_stderr_escaped() {
        let e =
            run_command(&sh("printf 'no\\000capacity\\033[2J' >&2; exit 3"), Path::new("."), b"").await.unwrap_err();
        let text = e.to_string();
        assert!(text.contains("no\\u{0}capacity\\u{1b}[2J"), "{text}");
        assert!(!text.chars().any(char::is_control), "{text:?}");
    }

    #[test]
    fn hook_output_is_shown_on_one_line_without_control_characters() {
        assert_eq!(printable(b"  bad\0thing\x1b[31m\nnext  ", 100), "bad\\u{0}thing\\u{1b}[31m\\nnext");
        assert_eq!(printable(b"abcdef", 3), "abc");
        assert_eq!(printable(&[0xff, b'a'], 10), "\u{fffd}a");
    }

    #[test]
    fn replies_are_parsed_strictly() {
        let r = parse_reply(Action::ScaleUp, br#"{"backends":[{"addr":"10.0.0.7:8000","weight":2}]}"#).unwrap();
        assert_eq!(r.backends[0].addr, "10.0.0.7:8000");
        assert_eq!(parse_reply(Action::ScaleUp, br#"{"backends":[]}"#).unwrap().backends.len(), 0);
        assert!(parse_reply(Action::ScaleUp, b"").is_err(), "scale_up needs a reply");
        assert!(parse_reply(Action::ScaleUp, b"ok!").is_err());
        assert!(parse_reply(Action::ScaleDown, b"\n").is_ok(), "scale_down may print nothing");
        assert!(parse_reply(Action::ScaleDown, b"nonsense").is_err());
    }
}
