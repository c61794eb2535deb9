//! The data path: one client request in, one backend chosen, the response streamed back.
//!
//! Per request: check the request (framing, limits) → route → admit (claim a backend slot, or
//! wait in the pool's queue) → rewrite headers → send upstream → stream the response body back,
//! holding the slot until the body ends. Every failure becomes a [`ProxyError`] and is answered in
//! one place. Reads one config snapshot per request and never takes a lock.

mod access;
pub mod body;
pub mod headers;

use crate::downstream::{ActiveRequest, ConnShared};
use crate::error::{error_body, ProxyError};
use crate::gateway::{Gateway, Snapshot};
use crate::http1::AmbiguousFraming;
use crate::pool::{Backend, InflightGuard, Pool};
use crate::upstream::{self, ClientBody, RequestBody};
use body::{ResponseBody, Upstream};
use headers::{new_request_id, X_REQUEST_ID};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

/// How many other backends a request that never reached its backend may be sent to.
const MAX_FAILOVER: usize = 2;

/// The hyper service for one client connection.
#[derive(Clone)]
pub struct ProxyService(Arc<ConnCtx>);

struct ConnCtx {
    gateway: Arc<Gateway>,
    client: headers::Client,
    conn: Arc<ConnShared>,
}

impl ProxyService {
    pub fn new(gateway: Arc<Gateway>, client: headers::Client, conn: Arc<ConnShared>) -> Self {
        ProxyService(Arc::new(ConnCtx { gateway, client, conn }))
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let ctx = self.0.clone();
        Box::pin(async move { Ok(ctx.handle(req.map(ClientBody::Hyper)).await) })
    }
}

impl crate::http1::server::Handler for ProxyService {
    type Body = ResponseBody;

    /// Serves one request read by the own HTTP/1.1 codec.
    fn call(
        &self,
        req: Request<crate::http1::server::Body>,
    ) -> impl Future<Output = Response<ResponseBody>> + Send + '_ {
        self.0.handle(req.map(ClientBody::Own))
    }

    /// The answer to a request refused before it could be parsed (malformed or oversized head,
    /// header timeout), counted like any other unrouted failure.
    fn refuse(&self, e: &ProxyError) -> Response<ResponseBody> {
        let status = e.status().as_u16();
        self.0.gateway.unrouted.record_local(status, 0.0);
        tracing::debug!(error = %e, status, "request refused before parsing finished");
        error_response(e, &new_request_id(), None)
    }
}

/// What a request leaves behind for its answer, whichever way it ends.
struct Tracking<'s> {
    /// Marks the connection busy until the response body is done.
    active: Option<ActiveRequest>,
    /// The pool chosen, once routed: borrowed from the request's snapshot (no reference count
    /// written per request), owned only when a queued request moved to a newer pool.
    pool: Option<Cow<'s, Arc<Pool>>>,
    /// Whether the outcome was already counted against a backend.
    counted_on_backend: bool,
    /// The access log line (when on), until the response body takes it.
    log: Option<Box<access::Entry>>,
}

impl ConnCtx {
    async fn handle(&self, req: Request<ClientBody>) -> Response<ResponseBody> {
        let started = Instant::now();
        let snapshot = self.gateway.snapshot();
        let request_id = match req.headers().get(&X_REQUEST_ID) {
            Some(v) if !v.is_empty() => v.clone(),
            _ => new_request_id(),
        };
        let log = snapshot
            .config
            .server
            .access_log
            .then(|| access::Entry::new(req.method(), req.uri().path(), &request_id, self.client.ip, started));
        let mut track = Tracking { active: Some(self.conn.start()), pool: None, counted_on_backend: false, log };
        match self.forward(req, &snapshot, &request_id, &mut track, started).await {
            Ok(resp) => resp,
            Err(e) => {
                let status = e.status().as_u16();
                let seconds = started.elapsed().as_secs_f64();
                // Failures after a backend was chosen were counted against that backend.
                if !track.counted_on_backend {
                    match &track.pool {
                        Some(p) => {
                            p.metrics.record_local(status, seconds);
                            p.state.traffic.record(crate::pool::traffic::Outcome::of(status >= 500), seconds);
                        }
                        None => self.gateway.unrouted.record_local(status, seconds),
                    }
                }
                tracing::debug!(error = %e, status, request_id = ?request_id, "request failed");
                let resp = error_response(&e, &request_id, track.active.take());
                if let Some(mut log) = track.log.take() {
                    log.pool = track.pool.as_ref().map(|p| p.metrics.name().clone());
                    log.ttfb_ms = started.elapsed().as_secs_f64() * 1000.0;
                    log.bytes = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
                    log.write(status, "-", "complete");
                }
                resp
            }
        }
    }

    #[allow(clippy::too_many_lines)] // longer than 80 lines: to be split
    async fn forward<'s>(
        &self,
        req: Request<ClientBody>,
        snap: &'s Snapshot,
        request_id: &HeaderValue,
        track: &mut Tracking<'s>,
        started: Instant,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let server = &snap.config.server;
        let (mut parts, incoming) = req.into_parts();

        // 1. The request itself: framing and limits.
        let is_h1 = parts.version != Version::HTTP_2;
        if is_h1 && parts.extensions.get::<AmbiguousFraming>().is_some() {
            return Err(ProxyError::BadRequest(
                "ambiguous framing: Content-Length with Transfer-Encoding, or Content-Length twice",
            ));
        }
        if parts.method == Method::CONNECT {
            return Err(ProxyError::NotImplemented("CONNECT (tunnels) is not supported"));
        }
        let scan = headers::scan(&parts.headers);
        if scan.bytes > server.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge(server.max_header_bytes));
        }
        if self.gateway.via.seen_in(&parts.headers, &scan) {
            crate::telemetry::loop_detected();
            return Err(ProxyError::LoopDetected);
        }
        let mut lengths = parts.headers.get_all(header::CONTENT_LENGTH).iter();
        let declared = match (lengths.next(), lengths.next()) {
            (None, _) => None,
            (Some(v), None) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or(ProxyError::BadRequest("invalid Content-Length"))?,
            ),
            (Some(_), Some(_)) => return Err(ProxyError::BadRequest("duplicate Content-Length")),
        };
        if declared.is_some_and(|n| n > server.max_request_body) {
            return Err(ProxyError::BodyTooLarge(server.max_request_body));
        }

        // 2. Route.
        // A target in absolute form (HTTP/1.1) or h2's :authority names the host, whatever Host
        // says (RFC 9112 §3.2.2, RFC 9113 §8.3.1); routing and the upstream request see that one.
        let host_value = Some(headers::request_authority(&parts.uri, &parts.headers).map_err(ProxyError::BadRequest)?);
        let host = host_value.as_ref().and_then(|h| h.to_str().ok()).map(host_without_port);
        let pool = snap.route(host.as_deref(), parts.uri.path()).ok_or(ProxyError::NoRoute)?;
        track.pool = Some(Cow::Borrowed(pool));

        // 3. Admit: a slot on a backend, now or after queueing.
        let latest = || self.gateway.snapshot().pool(&pool.config.name).cloned();
        let (guard, waited, newer) = match crate::pool::admit_now(pool) {
            Some(g) => (g, None, None),
            None => Box::pin(crate::pool::admit(pool, latest)).await.map_err(ProxyError::Unavailable)?,
        };
        // A request that waited may have been admitted to a newer version of its pool.
        let pool = match &newer {
            Some(p) => {
                track.pool = Some(Cow::Owned(p.clone()));
                p
            }
            None => pool,
        };
        if let Some(w) = waited {
            pool.metrics.queued(w.as_secs_f64());
        }
        let cfg = &pool.config;

        // 4. The upstream request.
        // Room for the forwarding headers and the request id in one allocation, instead of
        // regrowing hyper's exactly-sized map on the way.
        parts.headers.reserve(8);
        headers::strip_hop_by_hop(&mut parts.headers, &scan);
        headers::strip_expect(&mut parts.headers, &scan);
        let via = self.gateway.via.value(parts.version);
        headers::add_forwarding(&mut parts.headers, &scan, &self.client, host_value.as_ref(), via);
        if !scan.has_request_id() {
            parts.headers.insert(X_REQUEST_ID, request_id.clone());
        }
        if parts.uri.authority().is_some() {
            if let Some(h) = host_value {
                parts.headers.insert(header::HOST, h);
            }
        }
        // Upstream requests are origin-form (the h2c sender makes its own absolute form).
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            parts.uri = path.parse::<Uri>().map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        }
        parts.version = Version::HTTP_11;
        // A declared length was checked above and hyper holds the client to it; bodies of unknown
        // length are counted as they stream.
        let (body, body_outcome) = RequestBody::new(incoming, server.max_request_body, server.idle_timeout);
        let mut body = if is_h1 || declared.is_some() {
            body
        } else {
            let bodiless = matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS);
            // Boxed: only h2 requests pay for this future, not every request's.
            Box::pin(body.settle_h2(bodiless)).await
        };
        let has_body = !http_body::Body::is_end_stream(&body);
        // With [retry], a request of an idempotent method (any method, if so configured) can be
        // sent again after it reached a backend: keep what it takes to rebuild it, its body too
        // when that is small enough to keep.
        let mut replay = match &cfg.retry {
            Some(r) => {
                pool.state.retry_requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let method_ok = !r.idempotent_only || parts.method.is_idempotent();
                let small = declared.is_none_or(|n| n <= upstream::KEEP_LIMIT as u64);
                // A refused h2 stream was not processed, so any method may go again.
                ((method_ok || r.on_refused_stream) && small).then(|| Replay {
                    method_ok,
                    method: parts.method.clone(),
                    uri: parts.uri.clone(),
                    headers: parts.headers.clone(),
                    body: if has_body { Kept::Waiting(body.keep()) } else { Kept::Frames(Vec::new()) },
                })
            }
            None => None,
        };
        let upstream_req = Request::from_parts(parts, body);

        // 5. Send, bounded by the response header timeout. A request that never reached its
        //    backend (no connection) goes to another one, up to MAX_FAILOVER times.
        // The backend is always the guard's (borrowed, not cloned: no reference count written).
        let mut guard = guard;
        let mut req = upstream_req;
        let mut tried: Vec<usize> = Vec::new();
        let mut retries = 0;
        let resp = loop {
            let sent =
                tokio::time::timeout(cfg.response_header_timeout, upstream::send(guard.backend(), cfg, req)).await;
            if let Ok(Ok(r)) = &sent {
                if cfg.honor_retry_after && matches!(r.status().as_u16(), 429 | 503) {
                    if let Some(pause) = r.headers().get(header::RETRY_AFTER).and_then(headers::retry_after) {
                        guard.backend().saturate(pause);
                    }
                }
            }
            // What kind of retry this outcome allows, if any.
            let method_ok = replay.as_ref().is_some_and(|r| r.method_ok);
            let retry_kind = match (&sent, &cfg.retry) {
                (Ok(Err(upstream::SendError { unsent: None, refused: true, .. })), Some(rc))
                    if rc.on_refused_stream && replay.is_some() =>
                {
                    Some("refused-stream")
                }
                (Ok(Ok(r)), Some(rc)) if method_ok && r.status() == 503 && rc.on_503 => Some("503"),
                (Ok(Ok(r)), Some(rc)) if method_ok && r.status() == 429 && rc.on_429 => Some("429"),
                (Ok(Err(upstream::SendError { unsent: None, error: ProxyError::Upstream(_), .. })), Some(rc))
                    if method_ok && rc.on_reset =>
                {
                    Some("reset")
                }
                _ => None,
            };
            if let (Some(kind), Some(rc), Some(template)) = (retry_kind, &cfg.retry, replay.as_mut()) {
                let again = if retries < rc.attempts { template.request() } else { None };
                // The budget is spent only when another backend actually takes the retry.
                let next = again.as_ref().and_then(|_| untried_backend(pool, &mut tried, guard.backend()));
                if let (Some(again), Some(next)) = (again, next.filter(|_| pool.state.take_retry(rc.budget_percent))) {
                    let status = match &sent {
                        Ok(Ok(r)) => r.status().as_u16(),
                        _ => 502,
                    };
                    drop(sent); // a 503/429 answer is discarded with its connection
                    guard = hand_over(pool, guard.backend(), status, kind, next);
                    req = again;
                    retries += 1;
                    continue;
                }
            }
            let e = match sent {
                Ok(Ok(r)) => break r,
                Ok(Err(upstream::SendError { error, unsent: Some(back), .. })) if tried.len() < MAX_FAILOVER => {
                    match untried_backend(pool, &mut tried, guard.backend()) {
                        Some(next) => {
                            tracing::debug!(error = %error, "request never reached its backend");
                            guard = hand_over(pool, guard.backend(), error.status().as_u16(), "connect-failure", next);
                            req = back;
                            continue;
                        }
                        None => error,
                    }
                }
                Ok(Err(upstream::SendError { error, .. })) => {
                    match body_outcome.as_ref().map(|o| o.load(std::sync::atomic::Ordering::Relaxed)) {
                        Some(upstream::body::outcome::TOO_LARGE) => ProxyError::BodyTooLarge(server.max_request_body),
                        Some(upstream::body::outcome::IDLE) => ProxyError::BodyTimeout(server.idle_timeout),
                        Some(upstream::body::outcome::CLIENT) => ProxyError::ClientBody(error.to_string()),
                        _ => error,
                    }
                }
                Err(_) => ProxyError::ResponseTimeout(cfg.response_header_timeout),
            };
            // A failure of the client's own (a malformed or stalled request body) is not the
            // backend's: it is counted for the pool only.
            if e.source() != crate::error::Source::Client {
                let status = e.status().as_u16();
                guard.backend().count_response(status, e.status().is_server_error());
                let outcome = crate::pool::traffic::Outcome::of(e.status().is_server_error());
                guard.backend().observe(status, outcome, started.elapsed().as_secs_f64());
                track.counted_on_backend = true;
            }
            return Err(e);
        };

        // 6. Stream the response back; the slot and connection travel with the body.
        let (mut rparts, rbody) = resp.into_parts();
        let rscan = headers::scan(&rparts.headers);
        headers::strip_hop_by_hop(&mut rparts.headers, &rscan);
        rparts.headers.insert(X_REQUEST_ID, request_id.clone());
        let status = rparts.status.as_u16();
        let log = track.log.take().map(|mut log| {
            log.pool = Some(pool.metrics.name().clone());
            log.ttfb_ms = started.elapsed().as_secs_f64() * 1000.0;
            log
        });
        let done = Upstream { guard, started, status, stream_idle_timeout: cfg.stream_idle_timeout, log };
        Ok(Response::from_parts(rparts, ResponseBody::upstream(rbody, done, track.active.take())))
    }
}

/// Marks `failed` as tried and claims a slot on a backend of `pool` not tried yet.
fn untried_backend(pool: &Pool, tried: &mut Vec<usize>, failed: &Arc<Backend>) -> Option<InflightGuard> {
    if let Some(i) = pool.index_of(failed).filter(|i| !tried.contains(i)) {
        tried.push(i);
    }
    pool.try_acquire_except(|i| tried.contains(&i))
}

/// Counts the failed attempt against `failed` and moves the request to `next`'s slot.
fn hand_over(pool: &Pool, failed: &Backend, status: u16, kind: &'static str, next: InflightGuard) -> InflightGuard {
    failed.count_response(status, true);
    pool.metrics.retried(kind);
    tracing::debug!(failed = %failed.addr, next = %next.backend().addr, kind, "sending the request to another backend");
    next
}

/// What it takes to send a request again.
struct Replay {
    /// The method may be retried after a backend processed it (`retry.idempotent_only`).
    method_ok: bool,
    method: http::Method,
    uri: Uri,
    headers: http::HeaderMap,
    body: Kept,
}

/// The body of a request that may be sent again.
enum Kept {
    /// Still streaming upstream; the frames arrive once it has been forwarded in full.
    Waiting(upstream::Kept),
    /// The whole body (empty for a request that had none).
    Frames(Vec<bytes::Bytes>),
    /// Too big to keep, not fully forwarded, or broken: cannot be sent again.
    Lost,
}

impl Replay {
    /// The request again, or `None` when its body cannot be rebuilt.
    fn request(&mut self) -> Option<Request<RequestBody>> {
        if let Kept::Waiting(rx) = &mut self.body {
            self.body = match rx.try_recv() {
                Ok(frames) => Kept::Frames(frames),
                Err(_) => Kept::Lost,
            };
        }
        let Kept::Frames(frames) = &self.body else { return None };
        let mut r = Request::new(RequestBody::replay(frames.clone()));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = Version::HTTP_11;
        *r.headers_mut() = self.headers.clone();
        Some(r)
    }
}

/// A Host value without its port, lower-case (borrowed when it already is).
fn host_without_port(raw: &str) -> Cow<'_, str> {
    let host = match raw.rfind(':') {
        Some(i) if !raw.ends_with(']') && raw[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &raw[..i],
        _ => raw,
    };
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// The one shape of every error answer.
fn error_response(e: &ProxyError, request_id: &HeaderValue, active: Option<ActiveRequest>) -> Response<ResponseBody> {
    let id = request_id.to_str().unwrap_or("-");
    let mut resp = Response::new(ResponseBody::full(error_body(&e.to_string(), id), active));
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(X_REQUEST_ID, request_id.clone());
    if let Some(secs) = e.retry_after() {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if e.closes_connection() {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A plain local response (used by the admin API too).
pub fn local_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<bytes::Bytes>,
) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body.into(), None));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_without_port_strips_ports_only() {
        assert_eq!(host_without_port("API.example:8080"), "api.example");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
        assert_eq!(host_without_port("b.example"), "b.example");
    }
}
