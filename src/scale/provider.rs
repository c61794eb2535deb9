//! Provider hooks: how the autoscaler asks the user's infrastructure for backends and gives them
//! back. One JSON request, one JSON reply, whatever the transport:
//!
//! - `command`: the program gets the request on stdin and prints the reply on stdout; a non-zero
//!   exit is a failure.
//! - `webhook`: the request is POSTed (`content-type: application/json`, optional bearer token)
//!   over http:// or https:// (public roots); a non-2xx status is a failure.
//! - `local`: headroom starts the pool's `[launch]` command itself on free loopback ports.
//!
//! Every call is bounded by the provider's `timeout` (a command that overstays is killed).
//! Runs in the autoscaler's task, never on the request path.

use super::launch::{LaunchError, Launched};
use crate::config::{BackendConfig, PoolConfig, ProviderKind};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
            let max_inflight = b.max_inflight.unwrap_or(pool.max_inflight_per_backend).max(1);
            Ok(BackendConfig { addr, weight, max_inflight, backup: false })
        })
        .collect()
}

fn parse_reply(action: Action, out: &[u8]) -> Result<HookReply, ProviderError> {
    if action != Action::ScaleUp && out.iter().all(u8::is_ascii_whitespace) {
        return Ok(HookReply::default());
    }
    serde_json::from_slice(out).map_err(|e| {
        let text = String::from_utf8_lossy(&out[..out.len().min(200)]).into_owned();
        ProviderError::BadReply(format!("{e} in {text:?}"))
    })
}

/// A relative path with a directory part is taken from the config file's directory.
fn resolve(program: &str, base_dir: &Path) -> PathBuf {
    let p = Path::new(program);
    if p.is_relative() && program.contains('/') {
        base_dir.join(p)
    } else {
        p.to_path_buf()
    }
}

async fn run_command(command: &[String], base_dir: &Path, input: &[u8]) -> Result<Vec<u8>, ProviderError> {
    let program = resolve(&command[0], base_dir);
    let shown = program.display().to_string();
    let mut child = tokio::process::Command::new(&program)
        .args(&command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProviderError::Spawn { program: shown.clone(), source })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A program that doesn't read its input is allowed; its exit status decides.
        let _ = stdin.write_all(input).await;
    }
    let out =
        child.wait_with_output().await.map_err(|source| ProviderError::Spawn { program: shown.clone(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr[..out.stderr.len().min(500)]).trim().to_string();
        return Err(ProviderError::Exit { program: shown, status: out.status, stderr });
    }
    Ok(out.stdout)
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
    let bytes = resp.into_body().collect().await.map_err(|e| fail(format!("reply body: {e}")))?.to_bytes();
    if !status.is_success() {
        let body = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
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
