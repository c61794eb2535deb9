//! The built-in mock inference server (`headroom mock-backend`), for the default config, tests,
//! benches and demos. It speaks the OpenAI-shaped endpoints vLLM serves and behaves like an
//! engine where it matters to a gateway:
//!
//! - At most `capacity` requests run at once; the rest wait FIFO in its own scheduler queue.
//! - With `prefix_cache_blocks`, a prefix cache ([`cache`]): the leading prompt blocks it has
//!   prefilled recently are not prefilled again. Time to first token is `ttft` plus
//!   `prefill_per_token` for every uncached prompt token (about 4 bytes of prompt text each).
//! - `POST /v1/chat/completions`, `POST /v1/completions` ([`reply`]): `"stream": true` gives SSE
//!   chunks and `data: [DONE]`, otherwise one JSON body; `usage` reports the prompt tokens and
//!   how many were cached (`prompt_tokens_details.cached_tokens`, also in a last stream chunk
//!   with `stream_options.include_usage`).
//! - `GET /v1/models`, `GET /health`, `GET /` (a tiny body, for benches).
//! - `GET /metrics` in vLLM's names: requests running and waiting, KV-cache usage (90% when
//!   every slot runs), prefix-cache queries and hits (tokens).

pub mod cache;
mod reply;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Requests served at once; the rest queue. Default 8.
    pub capacity: usize,
    /// Time to first token, before any prefill. Default 50ms.
    pub ttft: Duration,
    /// Time between tokens. Default 20ms.
    pub token_interval: Duration,
    /// Tokens per completion. Default 16.
    pub tokens: u32,
    /// Share of inference requests failed with 500. Default 0.
    pub fail_rate: f64,
    /// The models served: listed by `/v1/models`, and a request naming another gets 404 (as
    /// vLLM answers). Default none: `mock-model` is listed and any name accepted.
    pub models: Vec<String>,
    /// Prompt blocks the prefix cache holds. Default 0: no cache.
    pub prefix_cache_blocks: usize,
    /// Bytes of prompt text per cached block (headroom's `block_chars`). Default 256.
    pub block_chars: usize,
    /// Prefill time per uncached prompt token. Default 0.
    pub prefill_per_token: Duration,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            capacity: 8,
            ttft: Duration::from_millis(50),
            token_interval: Duration::from_millis(20),
            tokens: 16,
            fail_rate: 0.0,
            models: Vec::new(),
            prefix_cache_blocks: 0,
            block_chars: 256,
            prefill_per_token: Duration::ZERO,
        }
    }
}

struct Engine {
    opts: MockOptions,
    slots: Arc<Semaphore>,
    running: AtomicU64,
    waiting: AtomicU64,
    ids: AtomicU64,
    cache: cache::PrefixCache,
    /// Prompt tokens looked up in the prefix cache, and those found, since start.
    prefix_queries: AtomicU64,
    prefix_hits: AtomicU64,
}

type MockBody = Either<Full<Bytes>, TokenStream>;

/// SSE events produced by a task, delivered as they come.
pub struct TokenStream(mpsc::Receiver<Bytes>);

impl Body for TokenStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<MockBody> {
    let mut r = Response::new(Either::Left(Full::new(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Decrements a counter when dropped.
struct Count<'a>(&'a AtomicU64);
impl Drop for Count<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Engine {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<MockBody> {
        let path = req.uri().path().to_string();
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/") => full(StatusCode::OK, "text/plain", "ok\n"),
            (Method::GET, "/health") => full(StatusCode::OK, "application/json", r#"{"status":"ok"}"#),
            (Method::GET, "/v1/models") => self.models(),
            (Method::GET, "/metrics") => full(StatusCode::OK, "text/plain; version=0.0.4", self.metrics()),
            (Method::POST, "/v1/chat/completions") => self.infer(req, true).await,
            (Method::POST, "/v1/completions") => self.infer(req, false).await,
            _ => full(StatusCode::NOT_FOUND, "application/json", r#"{"error":"not found"}"#),
        }
    }

    /// The models served, as vLLM lists them.
    fn models(&self) -> Response<MockBody> {
        let names: Vec<&str> = match self.opts.models.as_slice() {
            [] => vec!["mock-model"],
            m => m.iter().map(String::as_str).collect(),
        };
        let data: Vec<Value> = names
            .iter()
            .map(|id| json!({"id": id, "object": "model", "created": unix_now(), "owned_by": "headroom-mock"}))
            .collect();
        full(StatusCode::OK, "application/json", json!({"object": "list", "data": data}).to_string())
    }

    /// The metrics page, in vLLM's names.
    fn metrics(&self) -> String {
        let running = self.running.load(Ordering::Relaxed);
        // A full batch fills 90% of the KV cache: just short of the pressure that makes a
        // gateway steer away, as a well-sized engine runs.
        let kv = 0.9 * running as f64 / self.opts.capacity.max(1) as f64;
        let mut out = String::new();
        for (name, kind, value) in [
            ("vllm:num_requests_running", "gauge", running.to_string()),
            ("vllm:num_requests_waiting", "gauge", self.waiting.load(Ordering::Relaxed).to_string()),
            ("vllm:kv_cache_usage_perc", "gauge", format!("{:.4}", kv.min(1.0))),
            ("vllm:prefix_cache_queries_total", "counter", self.prefix_queries.load(Ordering::Relaxed).to_string()),
            ("vllm:prefix_cache_hits_total", "counter", self.prefix_hits.load(Ordering::Relaxed).to_string()),
        ] {
            let family = name.strip_suffix("_total").unwrap_or(name);
            out.push_str(&format!("# TYPE {family} {kind}\n{name} {value}\n"));
        }
        out
    }
}

/// Serves the mock engine on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, opts: MockOptions, shutdown: impl Future<Output = ()>) {
    let engine = Arc::new(Engine {
        slots: Arc::new(Semaphore::new(opts.capacity.max(1))),
        cache: cache::PrefixCache::new(opts.prefix_cache_blocks),
        opts,
        running: AtomicU64::new(0),
        waiting: AtomicU64::new(0),
        ids: AtomicU64::new(0),
        prefix_queries: AtomicU64::new(0),
        prefix_hits: AtomicU64::new(0),
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = crate::server::accept(&listener) => accepted,
        };
        let _ = stream.set_nodelay(true);
        let engine = engine.clone();
        let svc = hyper::service::service_fn(move |req| {
            let engine = engine.clone();
            async move { Ok::<_, Infallible>(engine.handle(req).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
