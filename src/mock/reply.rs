//! A completion as the mock engine answers it: the request parsed, a slot waited for in FIFO
//! order, the prompt looked up in the prefix cache and the uncached part prefilled, then the
//! tokens, whole or as server-sent events, with `usage` (cached prompt tokens included).

use super::{full, unix_now, Count, Engine, MockBody, TokenStream};
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

const WORDS: [&str; 12] =
    ["The", "gateway", "routes", "every", "token", "to", "the", "least", "loaded", "backend", "in", "order."];

/// About this many bytes of prompt text make a token.
const BYTES_PER_TOKEN: usize = 4;

/// What every chunk of one completion shares, and what its usage reports.
struct Chunks {
    id: String,
    created: u64,
    model: String,
    chat: bool,
    prompt_tokens: u64,
    cached_tokens: u64,
}

impl Engine {
    /// A completion: parses the request, waits for a slot like an engine's FIFO, prefills what
    /// the prefix cache does not hold, then answers whole or as a token stream.
    pub(super) async fn infer(self: Arc<Self>, req: Request<Incoming>, chat: bool) -> Response<MockBody> {
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
        let model = params.get("model").and_then(Value::as_str).unwrap_or("mock-model").to_string();
        if !self.opts.models.is_empty() && !self.opts.models.contains(&model) {
            let message = format!("The model `{model}` does not exist.");
            let error = json!({"error": {"message": message, "type": "NotFoundError", "code": 404}});
            return full(StatusCode::NOT_FOUND, "application/json", error.to_string());
        }
        let tokens = params
            .get("max_tokens")
            .and_then(Value::as_u64)
            .map_or(self.opts.tokens, |m| (m.min(u64::from(u32::MAX)) as u32).min(self.opts.tokens).max(1));
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
        let (prompt_tokens, cached_tokens) = self.prefill_cost(&body);
        let chunks = Chunks {
            id: format!("cmpl-{}", self.ids.fetch_add(1, Ordering::Relaxed)),
            created: unix_now(),
            model,
            chat,
            prompt_tokens,
            cached_tokens,
        };
        let first = self.opts.ttft.saturating_add(
            self.opts
                .prefill_per_token
                .saturating_mul(u32::try_from(prompt_tokens - cached_tokens).unwrap_or(u32::MAX)),
        );
        let usage_chunk = params.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
        if params.get("stream").and_then(Value::as_bool).unwrap_or(false) {
            self.stream(permit, chunks, tokens, first, usage_chunk)
        } else {
            self.whole(permit, &chunks, tokens, first).await
        }
    }

    /// The prompt's tokens and how many of them the prefix cache holds (counted in the metrics);
    /// the prompt's blocks are cached from now on.
    fn prefill_cost(&self, body: &[u8]) -> (u64, u64) {
        let key = crate::prompt::key_of(body, self.opts.block_chars).unwrap_or_default();
        let prompt = (key.bytes / BYTES_PER_TOKEN).max(1) as u64;
        let hit_blocks = self.cache.lookup_and_insert(&key);
        let cached = ((hit_blocks * self.opts.block_chars / BYTES_PER_TOKEN) as u64).min(prompt);
        self.prefix_queries.fetch_add(prompt, Ordering::Relaxed);
        self.prefix_hits.fetch_add(cached, Ordering::Relaxed);
        (prompt, cached)
    }

    /// The whole completion, after the time its tokens take.
    async fn whole(
        &self,
        permit: OwnedSemaphorePermit,
        chunks: &Chunks,
        tokens: u32,
        first: Duration,
    ) -> Response<MockBody> {
        let _r = Count(&self.running);
        tokio::time::sleep(first.saturating_add(self.opts.token_interval.saturating_mul(tokens.saturating_sub(1))))
            .await;
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
        v["usage"] = chunks.usage(tokens);
        full(StatusCode::OK, "application/json", v.to_string())
    }

    /// The completion as server-sent events, one token at a time; a client that leaves stops it.
    fn stream(
        self: Arc<Self>,
        permit: OwnedSemaphorePermit,
        chunks: Chunks,
        tokens: u32,
        first: Duration,
        usage_chunk: bool,
    ) -> Response<MockBody> {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let interval = self.opts.token_interval;
        tokio::spawn(async move {
            let _permit = permit;
            let _r = Count(&self.running);
            tokio::time::sleep(first).await;
            for i in 0..tokens {
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                let event = format!("data: {}\n\n", chunks.chunk(i, i + 1 == tokens));
                if tx.send(Bytes::from(event)).await.is_err() {
                    return; // client went away: stop generating, free the slot
                }
            }
            if usage_chunk {
                let mut last = chunks.chunk(0, true);
                last["choices"] = json!([]);
                last["usage"] = chunks.usage(tokens);
                let _ = tx.send(Bytes::from(format!("data: {last}\n\n"))).await;
            }
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        });
        let mut r = Response::new(Either::Right(TokenStream(rx)));
        r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
        r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
        r
    }
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

    fn usage(&self, tokens: u32) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": tokens,
            "total_tokens": self.prompt_tokens + u64::from(tokens),
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }
}
