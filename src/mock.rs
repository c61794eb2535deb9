//! The built-in mock inference server (`headroom mock-backend`), for the default config, tests,
//! benches and demos. It speaks the OpenAI-shaped endpoints vLLM serves and queues like a real
//! engine: at most `capacity` requests run at once, the rest wait FIFO.
//!
//! - `POST /v1/chat/completions`, `POST /v1/completions`: `"stream": true` gives SSE chunks and
//!   `data: [DONE]`, otherwise one JSON body. `max_tokens` in the request caps the token count.
//! - `GET /v1/models`, `GET /health`, `GET /` (a tiny body, for benches).
//! - `GET /metrics`: `vllm:num_requests_running` and `vllm:num_requests_waiting`.

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Full, Limited};
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
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Requests served at once; the rest queue. Default 8.
    pub capacity: usize,
    /// Time to first token. Default 50ms.
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
        }
    }
}

struct Engine {
    opts: MockOptions,
    slots: Arc<Semaphore>,
    running: AtomicU64,
    waiting: AtomicU64,
    ids: AtomicU64,
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

const WORDS: [&str; 12] =
    ["The", "gateway", "routes", "every", "token", "to", "the", "least", "loaded", "backend", "in", "order."];

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
            (Method::GET, "/metrics") => full(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                format!(
                    "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running {}\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting {}\n",
                    self.running.load(Ordering::Relaxed),
                    self.waiting.load(Ordering::Relaxed)
                ),
            ),
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

    /// A completion: parses the request, waits for a slot like an engine's FIFO, then answers
    /// whole or as a token stream.
    async fn infer(self: Arc<Self>, req: Request<Incoming>, chat: bool) -> Response<MockBody> {
        let body = match Limited::new(req.into_body(), 4 << 20).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return full(StatusCode::PAYLOAD_TOO_LARGE, "application/json", r#"{"error":"body too large"}"#),
        };
        let params: Value = if body.is_empty() {
            json!({})
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    let error = json!({"error": format!("invalid JSON: {e}")}).to_string();
                    return full(StatusCode::BAD_REQUEST, "application/json", error);
                }
            }
        };
        let stream = params.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let model = params.get("model").and_then(Value::as_str).unwrap_or("mock-model").to_string();
        if !self.opts.models.is_empty() && !self.opts.models.contains(&model) {
            let message = format!("The model `{model}` does not exist.");
            let error = json!({"error": {"message": message, "type": "NotFoundError", "code": 404}});
            return full(StatusCode::NOT_FOUND, "application/json", error.to_string());
        }
        let tokens = params
            .get("max_tokens")
            .and_then(Value::as_u64)
            .map_or(self.opts.tokens, |m| (m as u32).min(self.opts.tokens).max(1));
        // Queue like an engine: FIFO for a slot.
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = {
            let _w = Count(&self.waiting);
            match self.slots.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => {
                    return full(StatusCode::SERVICE_UNAVAILABLE, "application/json", r#"{"error":"shutting down"}"#)
                }
            }
        };
        if self.opts.fail_rate > 0.0 && fastrand::f64() < self.opts.fail_rate {
            return full(StatusCode::INTERNAL_SERVER_ERROR, "application/json", r#"{"error":"injected failure"}"#);
        }
        self.running.fetch_add(1, Ordering::Relaxed);
        let chunks = Chunks {
            id: format!("cmpl-{}", self.ids.fetch_add(1, Ordering::Relaxed)),
            created: unix_now(),
            model,
            chat,
        };
        if stream {
            self.stream(permit, chunks, tokens)
        } else {
            self.whole(permit, &chunks, tokens, body.len()).await
        }
    }

    /// The whole completion, after the time its tokens take.
    async fn whole(
        &self,
        permit: OwnedSemaphorePermit,
        chunks: &Chunks,
        tokens: u32,
        prompt_bytes: usize,
    ) -> Response<MockBody> {
        let _r = Count(&self.running);
        tokio::time::sleep(self.opts.ttft + self.opts.token_interval * tokens.saturating_sub(1)).await;
        drop(permit);
        let text: String = (0..tokens).map(|i| format!("{} ", WORDS[i as usize % WORDS.len()])).collect();
        let chat = chunks.chat;
        let mut v = chunks.chunk(0, true);
        v["object"] = json!(if chat { "chat.completion" } else { "text_completion" });
        if chat {
            v["choices"][0] =
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"});
        } else {
            v["choices"][0]["text"] = json!(text);
        }
        let prompt = prompt_bytes / 4;
        v["usage"] =
            json!({"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens as usize});
        full(StatusCode::OK, "application/json", v.to_string())
    }

    /// The completion as server-sent events, one token at a time; a client that leaves stops it.
    fn stream(self: Arc<Self>, permit: OwnedSemaphorePermit, chunks: Chunks, tokens: u32) -> Response<MockBody> {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let opts = self.opts.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _r = Count(&self.running);
            tokio::time::sleep(opts.ttft).await;
            for i in 0..tokens {
                if i > 0 {
                    tokio::time::sleep(opts.token_interval).await;
                }
                let event = format!("data: {}\n\n", chunks.chunk(i, i + 1 == tokens));
                if tx.send(Bytes::from(event)).await.is_err() {
                    return; // client went away: stop generating, free the slot
                }
            }
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        });
        let mut r = Response::new(Either::Right(TokenStream(rx)));
        r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
        r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
        r
    }
}

/// What every chunk of one completion shares.
struct Chunks {
    id: String,
    created: u64,
    model: String,
    chat: bool,
}

impl Chunks {
    /// Chunk `i` (one word); `last` carries the finish reason.
    fn chunk(&self, i: u32, last: bool) -> Value {
        let (id, created, model) = (&self.id, self.created, &self.model);
        let word = format!("{} ", WORDS[i as usize % WORDS.len()]);
        let finish = if last { json!("length") } else { Value::Null };
        if self.chat {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": finish}]})
        } else {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": word, "finish_reason": finish}]})
        }
    }
}

/// Serves the mock engine on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, opts: MockOptions, shutdown: impl Future<Output = ()>) {
    let engine = Arc::new(Engine {
        slots: Arc::new(Semaphore::new(opts.capacity.max(1))),
        opts,
        running: AtomicU64::new(0),
        waiting: AtomicU64::new(0),
        ids: AtomicU64::new(0),
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
