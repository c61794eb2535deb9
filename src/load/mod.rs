//! `headroom load`: a load generator for inference endpoints.
//!
//! - Open loop (`--rate`): request *i* is scheduled at a fixed time whatever happened to the
//!   ones before, and its latency counts from that time, so a slow server shows up as latency
//!   instead of a lower sending rate (no coordinated omission). `--ramp` grows the rate linearly
//!   from zero. At most `max_inflight` requests are open at once; beyond that, scheduled requests
//!   are counted as dropped rather than queued without bound.
//! - Closed loop (`--concurrency`): N clients send back to back.
//!
//! SSE-aware: each `data:` event other than `[DONE]` is a token; it measures time to first byte,
//! time to first token, inter-token latency, tokens/s and total latency, and errors by status.
//! Every run is bounded by `--duration` (plus the request timeout).

pub mod plot;
pub mod stats;
pub mod workload;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use stats::{Report, Sample};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Requests per second (open loop), reached after `ramp`.
    Rate { per_second: f64, ramp: Duration },
    /// Clients sending back to back (closed loop).
    Concurrency(usize),
}

/// A load run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub url: http::Uri,
    pub method: http::Method,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub body: Bytes,
    /// Prompts that change from request to request (then `body` is not sent).
    pub workload: Option<Arc<workload::Workload>>,
    /// Engines' metrics pages, read before and after the run for their prefix-cache hit rate.
    pub engine_metrics: Vec<http::Uri>,
    pub mode: Mode,
    pub duration: Duration,
    /// Per request.
    pub timeout: Duration,
    pub max_inflight: usize,
}

/// The built-in chat-completion request.
pub fn chat_body(model: &str, stream: bool, max_tokens: u32, prompt: &str) -> Bytes {
    let v = serde_json::json!({
        "model": model,
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    });
    Bytes::from(v.to_string())
}

/// When request `i` is due, seconds from the start: constant rate `r`, or a linear ramp from 0
/// to `r` over `ramp` seconds followed by `r` (the inverse of the requests-so-far curve).
pub fn due_at(i: usize, r: f64, ramp: f64) -> f64 {
    let n = i as f64;
    if ramp <= 0.0 {
        return n / r;
    }
    // Requests sent by time t during the ramp: r t² / (2 ramp); all of the ramp: r ramp / 2.
    let in_ramp = r * ramp / 2.0;
    if n <= in_ramp {
        (2.0 * n * ramp / r).sqrt()
    } else {
        ramp + (n - in_ramp) / r
    }
}

/// Live counters (the progress bar reads them).
#[derive(Debug, Default)]
pub struct Progress {
    pub sent: AtomicUsize,
    pub done: AtomicUsize,
    pub errors: AtomicUsize,
    pub inflight: AtomicUsize,
    pub dropped: AtomicUsize,
    /// Requests that could not connect.
    pub connect_failed: AtomicUsize,
    /// Set when the run should stop sending (see [`FIRST_SECOND`]).
    pub stop: std::sync::atomic::AtomicBool,
}

/// When every request finished in the run's first second failed to connect, nothing listens
/// there: the run stops rather than hammer a closed port for its whole duration.
pub const FIRST_SECOND: Duration = Duration::from_secs(1);

/// Whether to stop now: something was tried, and every try so far failed to connect.
fn nothing_listens(p: &Progress) -> bool {
    let done = p.done.load(Ordering::Relaxed);
    done > 0 && p.connect_failed.load(Ordering::Relaxed) == done
}

/// Runs `plan` and returns every sample and the elapsed time.
pub async fn run(plan: &Plan, progress: Arc<Progress>) -> (Vec<Sample>, f64, usize) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(plan.max_inflight.min(4096)).build_http();
    let plan = Arc::new(plan.clone());
    let start = Instant::now();
    let end = start + plan.duration;
    let mut tasks = tokio::task::JoinSet::new();
    let mut samples = Vec::new();
    let watcher = {
        let progress = progress.clone();
        tokio::spawn(async move {
            tokio::time::sleep(FIRST_SECOND).await;
            if nothing_listens(&progress) {
                progress.stop.store(true, Ordering::Relaxed);
            }
        })
    };
    match plan.mode {
        Mode::Rate { per_second, ramp } => {
            let mut i = 0usize;
            loop {
                let at = due_at(i, per_second, ramp.as_secs_f64());
                let due = start + Duration::from_secs_f64(at);
                if due >= end || progress.stop.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                while let Some(done) = tasks.try_join_next() {
                    samples.extend(done.unwrap_or_default());
                }
                if progress.inflight.load(Ordering::Relaxed) >= plan.max_inflight {
                    progress.dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    let (client, plan, progress) = (client.clone(), plan.clone(), progress.clone());
                    tasks.spawn(async move { one(&client, &plan, &progress, due, at).await });
                }
                i += 1;
            }
        }
        Mode::Concurrency(n) => {
            for _ in 0..n.max(1) {
                let (client, plan, progress) = (client.clone(), plan.clone(), progress.clone());
                tasks.spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let now = Instant::now();
                        if now >= end || progress.stop.load(Ordering::Relaxed) {
                            break;
                        }
                        mine.extend(one(&client, &plan, &progress, now, now.duration_since(start).as_secs_f64()).await);
                    }
                    mine
                });
            }
        }
    }
    // Closed-loop tasks return their samples as a Vec; open-loop ones one each.
    while let Some(r) = tasks.join_next().await {
        if let Ok(s) = r {
            samples.extend(s);
        }
    }
    watcher.abort();
    samples.sort_by(|a, b| a.at.total_cmp(&b.at));
    let elapsed = start.elapsed().as_secs_f64();
    (samples, elapsed, progress.dropped.load(Ordering::Relaxed))
}

/// One request, timed from `scheduled`.
async fn one(
    client: &Client<HttpConnector, Full<Bytes>>,
    plan: &Plan,
    progress: &Progress,
    scheduled: Instant,
    at: f64,
) -> Vec<Sample> {
    let i = progress.sent.fetch_add(1, Ordering::Relaxed);
    progress.inflight.fetch_add(1, Ordering::Relaxed);
    let lag_ms = ms(scheduled);
    let (body, turn) = match &plan.workload {
        Some(w) => w.request(i),
        None => (plan.body.clone(), None),
    };
    let sample = match tokio::time::timeout(plan.timeout, exchange(client, plan, body, scheduled, at)).await {
        Ok(s) => Sample { lag_ms, turn, ..s },
        Err(_) => Sample {
            at,
            lag_ms,
            total_ms: ms(scheduled),
            error: Some(format!("timeout after {:?}", plan.timeout)),
            ..Default::default()
        },
    };
    progress.inflight.fetch_sub(1, Ordering::Relaxed);
    progress.done.fetch_add(1, Ordering::Relaxed);
    if !sample.ok() {
        progress.errors.fetch_add(1, Ordering::Relaxed);
    }
    if sample.error.as_deref().is_some_and(|e| e.starts_with("connect:")) {
        progress.connect_failed.fetch_add(1, Ordering::Relaxed);
    }
    vec![sample]
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

async fn exchange(
    client: &Client<HttpConnector, Full<Bytes>>,
    plan: &Plan,
    body: Bytes,
    scheduled: Instant,
    at: f64,
) -> Sample {
    let mut req = http::Request::builder().method(plan.method.clone()).uri(plan.url.clone());
    for (k, v) in &plan.headers {
        req = req.header(k, v);
    }
    let mut sample = Sample { at, ..Default::default() };
    let req = match req.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => {
            sample.error = Some(format!("bad request: {e}"));
            return sample;
        }
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => {
            sample.error = Some(format!("connect: {}", crate::upstream::error_chain(&e)));
            sample.total_ms = ms(scheduled);
            return sample;
        }
    };
    sample.status = resp.status().as_u16();
    sample.ttfb_ms = Some(ms(scheduled));
    let sse = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut body = resp.into_body();
    let mut pending = Vec::new();
    let mut whole = Vec::new();
    let mut last_token: Option<f64> = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                sample.error = Some(format!("body: {e}"));
                break;
            }
        };
        let Ok(data) = frame.into_data() else { continue };
        if !sse {
            if whole.len() < 1 << 20 {
                whole.extend_from_slice(&data);
            }
            continue;
        }
        pending.extend_from_slice(&data);
        while let Some(end) = find_event_end(&pending) {
            let event: Vec<u8> = pending.drain(..end).collect();
            if let Some(usage) = usage_of_event(&event) {
                usage.apply(&mut sample);
            } else if is_token_event(&event) {
                let now = ms(scheduled);
                sample.tokens += 1;
                sample.ttft_ms.get_or_insert(now);
                if let Some(prev) = last_token {
                    sample.itl_ms.push(now - prev);
                }
                last_token = Some(now);
            }
        }
    }
    if !sse {
        // A JSON completion: its usage says how many tokens it produced.
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&whole) {
            sample.tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
            Usage::of(&v).apply(&mut sample);
        }
    }
    sample.total_ms = ms(scheduled);
    sample
}

/// The end (exclusive, separator included) of the first complete SSE event in `buf`.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What a completion's `usage` says of its prompt.
struct Usage {
    prompt_tokens: u64,
    cached_tokens: u64,
}

impl Usage {
    fn of(v: &serde_json::Value) -> Usage {
        Usage {
            prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
            cached_tokens: v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0),
        }
    }

    fn apply(&self, s: &mut Sample) {
        s.prompt_tokens = self.prompt_tokens;
        s.cached_tokens = self.cached_tokens;
    }
}

/// The usage of a stream's last chunk (`stream_options.include_usage`: no choices, a `usage`).
fn usage_of_event(event: &[u8]) -> Option<Usage> {
    let text = std::str::from_utf8(event).ok()?;
    let data = text.lines().find_map(|l| l.strip_prefix("data:"))?.trim();
    if !data.contains("\"usage\"") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    let no_choices = v["choices"].as_array().is_none_or(|c| c.is_empty());
    (no_choices && v["usage"].is_object()).then(|| Usage::of(&v))
}

/// The engines' prefix-cache hits and queries (counters), summed over `urls`; `None` when there
/// are none, or a page did not answer or does not report them.
async fn engine_prefix_counters(urls: &[http::Uri]) -> Option<(f64, f64)> {
    if urls.is_empty() {
        return None;
    }
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let (mut hits, mut queries) = (0.0, 0.0);
    for url in urls {
        let req = http::Request::get(url.clone()).body(Full::new(Bytes::new())).ok()?;
        let read = async { client.request(req).await.ok()?.into_body().collect().await.ok() };
        let page = tokio::time::timeout(Duration::from_secs(5), read).await.ok()??.to_bytes();
        let load = crate::engine::read(&String::from_utf8_lossy(&page), crate::config::EngineKind::Auto);
        hits += load.prefix_hits?;
        queries += load.prefix_queries?;
    }
    Some((hits, queries))
}

/// A `data:` event other than `data: [DONE]`.
fn is_token_event(event: &[u8]) -> bool {
    let text = String::from_utf8_lossy(event);
    text.lines().any(|l| l.starts_with("data:") && l[5..].trim() != "[DONE]")
}

/// Runs `plan` with a live progress bar on stderr (when `show`) and returns the report and the
/// samples (for `--plot`).
pub async fn run_with_progress(plan: &Plan, show: bool) -> (Report, Vec<Sample>, f64) {
    let progress = Arc::new(Progress::default());
    let bar = if show {
        let b = indicatif::ProgressBar::new(plan.duration.as_millis() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {elapsed:>4}/{duration} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let ticker = bar.clone().map(|b| {
        let p = progress.clone();
        let started = Instant::now();
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0usize);
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let done = p.done.load(Ordering::Relaxed);
                let rate = (done - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
                last = (Instant::now(), done);
                b.set_position(started.elapsed().as_millis() as u64);
                b.set_message(format!(
                    "{rate:>7.1} req/s  in flight {:>4}  done {:>6}  errors {}  dropped {}",
                    p.inflight.load(Ordering::Relaxed),
                    done,
                    p.errors.load(Ordering::Relaxed),
                    p.dropped.load(Ordering::Relaxed),
                ));
            }
        })
    });
    let before = engine_prefix_counters(&plan.engine_metrics).await;
    let (samples, elapsed, dropped) = run(plan, progress.clone()).await;
    let after = engine_prefix_counters(&plan.engine_metrics).await;
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let (mode, rate) = match plan.mode {
        Mode::Rate { per_second, .. } => ("open loop".to_string(), Some(per_second)),
        Mode::Concurrency(n) => (format!("closed loop, {n} clients"), None),
    };
    let mut report = Report::build(&plan.url.to_string(), mode, rate, elapsed, &samples, dropped);
    if let (Some((h0, q0)), Some((h1, q1))) = (before, after) {
        report.engine_prefix_hit_rate = (q1 > q0).then(|| ((h1 - h0) / (q1 - q0)).clamp(0.0, 1.0));
    }
    if progress.stop.load(Ordering::Relaxed) {
        report.stopped_early = Some(format!(
            "every request in the first {}s failed to connect to {}; is anything listening there?",
            FIRST_SECOND.as_secs(),
            plan.url.authority().map_or("the target".to_string(), |a| a.to_string())
        ));
    }
    (report, samples, elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_are_evenly_spaced_and_ramp_up() {
        assert_eq!(due_at(0, 10.0, 0.0), 0.0);
        assert_eq!(due_at(25, 10.0, 0.0), 2.5);
        // A 4 s ramp to 10/s sends 20 requests during the ramp, then 10 per second.
        assert!((due_at(20, 10.0, 4.0) - 4.0).abs() < 1e-9);
        assert!((due_at(30, 10.0, 4.0) - 5.0).abs() < 1e-9);
        assert!((due_at(5, 10.0, 4.0) - 2.0).abs() < 1e-9, "a quarter of the ramp's requests by half its time");
        let gaps: Vec<f64> = (1..20).map(|i| due_at(i, 10.0, 4.0) - due_at(i - 1, 10.0, 4.0)).collect();
        assert!(gaps.windows(2).all(|w| w[1] <= w[0]), "the gaps shrink while ramping");
    }

    #[test]
    fn sse_events_are_split_and_counted() {
        let buf = b"data: {\"a\":1}\n\ndata: [DONE]\n\n";
        let end = find_event_end(buf).unwrap();
        assert!(is_token_event(&buf[..end]));
        assert!(!is_token_event(&buf[end..]));
        assert_eq!(find_event_end(b"data: x\r\n\r\nmore"), Some(11));
        assert_eq!(find_event_end(b"data: partial"), None);
    }
}
