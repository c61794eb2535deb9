//! The data path: one client request in, one backend chosen, the response streamed back.
//!
//! Per request, in phases: check the request (`request::check`: framing, limits) → route → admit
//! (claim a backend slot, or wait in the pool's queue) → rewrite it for the backend
//! (`request::to_upstream`) → send upstream, failing over or retrying as `retry::decide` says →
//! stream the response body back, holding the slot until the body ends. Every failure becomes a
//! [`ProxyError`] and is answered in one place; every finished request is counted in one place
//! (`outcome::record`). Reads one config snapshot per request and never takes a lock.

mod access;
pub mod authority;
pub mod body;
pub mod headers;
mod models;
mod outcome;
mod request;
mod retry;

use crate::downstream::{ActiveRequest, ConnShared};
use crate::error::ProxyError;
use crate::gateway::{Gateway, Routed, Snapshot};
use crate::pool::prefix::Hint;
use crate::pool::traffic::Outcome;
use crate::pool::{Backend, InflightGuard, Pool};
use crate::upstream::{self, ClientBody, RequestBody, SendError, UpstreamBody};
use body::{ResponseBody, Upstream};
use headers::{new_request_id, X_REQUEST_ID};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use outcome::Scope;
use retry::{Attempts, Decision, Replay};
use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

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
        outcome::record(Scope::Unrouted(&self.0.gateway.unrouted), status, Outcome::of(status >= 500), 0.0);
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
    /// The access log line (when on), until the response body takes it.
    log: Option<Box<access::Entry>>,
}

/// A request that failed, and the backend to blame when one is.
struct Failed {
    error: ProxyError,
    backend: Option<Arc<Backend>>,
}

impl From<ProxyError> for Failed {
    fn from(error: ProxyError) -> Self {
        Failed { error, backend: None }
    }
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
        let mut track = Tracking { active: Some(self.conn.start()), pool: None, log };
        match self.forward(req, &snapshot, &request_id, &mut track, started).await {
            Ok(resp) => resp,
            Err(failed) => self.fail(failed, &request_id, &mut track, started),
        }
    }

    /// Counts a failed request against whom it belongs to, and answers it.
    fn fail(
        &self,
        failed: Failed,
        request_id: &HeaderValue,
        track: &mut Tracking,
        started: Instant,
    ) -> Response<ResponseBody> {
        let Failed { error: e, backend } = failed;
        let status = e.status().as_u16();
        // A failure of the client's own (a malformed or stalled request body) is not the
        // backend's: it is counted for the pool only.
        let scope = match (&backend, &track.pool) {
            (Some(b), _) if e.source() != crate::error::Source::Client => Scope::Backend(b),
            (_, Some(p)) => Scope::Pool(p),
            (_, None) => Scope::Unrouted(&self.gateway.unrouted),
        };
        outcome::record(scope, status, Outcome::of(status >= 500), started.elapsed().as_secs_f64());
        tracing::debug!(error = %e, status, request_id = ?request_id, "request failed");
        let resp = error_response(&e, request_id, track.active.take());
        if let Some(mut log) = track.log.take() {
            log.pool = track.pool.as_ref().map(|p| p.metrics.name().clone());
            log.ttfb_ms = started.elapsed().as_secs_f64() * 1000.0;
            log.bytes = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
            log.write(status, "-", "complete");
        }
        resp
    }

    /// The request's way through: check → route → admit → rewrite → send, failing over or
    /// retrying as `retry::decide` says → the response, streaming back with the backend's slot.
    /// (One async function on purpose: the request and response are moved as little as can be.)
    async fn forward<'s>(
        &self,
        req: Request<ClientBody>,
        snap: &'s Snapshot,
        request_id: &HeaderValue,
        track: &mut Tracking<'s>,
        started: Instant,
    ) -> Result<Response<ResponseBody>, Failed> {
        let server = &snap.config.server;
        let (mut parts, incoming) = req.into_parts();
        let scan = headers::scan(&parts.headers);
        let declared = request::check(&parts, &scan, server, &self.gateway.via)?;
        let authority = request::authority(&parts)?;
        let host = authority.to_str().ok().map(request::host_without_port);
        if let Some(list) = models::answer(snap, &parts) {
            return Ok(self.answer_locally(list?, request_id, track, started));
        }
        // A declared length was checked above and the codecs hold the client to it; bodies of
        // unknown length are counted as they stream.
        let (mut body, body_outcome) = RequestBody::new(incoming, server.max_request_body, server.idle_timeout);
        let target = match snap.route(host.as_deref(), parts.uri.path()) {
            Routed::Pool(pool) if pool.prefix.is_none() => Target { pool, whole: None, key: None, session: None },
            Routed::Nowhere => return Err(ProxyError::NoRoute.into()),
            _ => Box::pin(target(snap, host.as_deref(), &parts, &mut body)).await?,
        };
        let (pool, whole) = (target.pool, target.whole);
        track.pool = Some(Cow::Borrowed(pool));
        let hint = Hint { prompt: target.key.as_ref(), session: target.session };
        let (mut guard, newer) = self.admit(pool, &hint).await?;
        let pool = match &newer {
            Some(p) => {
                track.pool = Some(Cow::Owned(p.clone()));
                p
            }
            None => pool,
        };
        let is_h1 = parts.version != Version::HTTP_2;
        let extra = request::to_upstream(&mut parts, &scan, &self.client, authority, &self.gateway.via, request_id)?;
        let cfg = &pool.config;
        if !is_h1 && declared.is_none() {
            // Boxed: only h2 requests pay for this future, not every request's.
            body = Box::pin(body.settle_h2(request::bodiless(&parts.method))).await;
        }
        let mut replay = cfg.retry.as_ref().and_then(|rc| {
            pool.state.retry_requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Replay::of(&parts, &mut body, whole.as_ref(), declared, rc)
        });
        let mut req = Request::from_parts(parts, body);
        let mut attempts = Attempts::new(replay.as_ref());
        // What a send that goes no further ends with: its response, or its failure.
        macro_rules! settle {
            ($sent:expr) => {
                match $sent {
                    Ok(Ok(r)) => break r,
                    Ok(Err(SendError { error, .. })) => {
                        let error = body_failure(error, body_outcome.as_ref());
                        return Err(Failed { error, backend: Some(guard.backend().clone()) });
                    }
                    Err(_) => {
                        let error = ProxyError::ResponseTimeout(cfg.response_header_timeout);
                        return Err(Failed { error, backend: Some(guard.backend().clone()) });
                    }
                }
            };
        }
        let resp = loop {
            let sent =
                tokio::time::timeout(cfg.response_header_timeout, upstream::send(guard.backend(), cfg, req, &extra))
                    .await;
            let (again, next, reason, status) = match attempts.decide(&sent, guard.backend(), cfg) {
                Decision::Stop => settle!(sent),
                Decision::Failover => match sent {
                    Ok(Err(SendError { error, unsent: Some(back), .. })) => match attempts.untried(pool, &guard) {
                        Some(next) => (back, next, "connect-failure", error.status().as_u16()),
                        None => return Err(Failed { error, backend: Some(guard.backend().clone()) }),
                    },
                    other => settle!(other),
                },
                Decision::Retry(reason) => match attempts.retry(pool, &guard, replay.as_mut()) {
                    Some((again, next)) => (again, next, reason, Attempts::status(&sent)),
                    None => settle!(sent),
                },
            };
            outcome::attempt_failed(pool, guard.backend(), status, reason);
            tracing::debug!(failed = %guard.backend().addr, next = %next.backend().addr, reason, "sending the request to another backend");
            guard = next;
            req = again;
        };
        Ok(respond(resp, guard, pool, request_id, track, started))
    }

    /// A response headroom makes itself (the model list), counted and logged like any other.
    fn answer_locally(
        &self,
        body: bytes::Bytes,
        request_id: &HeaderValue,
        track: &mut Tracking,
        started: Instant,
    ) -> Response<ResponseBody> {
        outcome::record(
            Scope::Unrouted(&self.gateway.unrouted),
            200,
            Outcome::of(false),
            started.elapsed().as_secs_f64(),
        );
        if let Some(mut log) = track.log.take() {
            log.ttfb_ms = started.elapsed().as_secs_f64() * 1000.0;
            log.bytes = body.len() as u64;
            log.write(200, "-", "complete");
        }
        let mut resp = Response::new(ResponseBody::full(body, track.active.take()));
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(X_REQUEST_ID, request_id.clone());
        resp
    }

    /// A slot on a backend of `pool`, now or after queueing, and the newer version of the pool
    /// it is in when a request that waited was admitted to one.
    async fn admit(&self, pool: &Arc<Pool>, hint: &Hint<'_>) -> Result<(InflightGuard, Option<Arc<Pool>>), ProxyError> {
        let latest = || self.gateway.snapshot().pool(&pool.config.name).cloned();
        let (guard, waited, newer) = match crate::pool::admit_now_with(pool, hint) {
            Some(g) => (g, None, None),
            None => Box::pin(crate::pool::admit(pool, latest, hint)).await.map_err(ProxyError::Unavailable)?,
        };
        if let Some(w) = waited {
            newer.as_ref().unwrap_or(pool).metrics.queued(w.as_secs_f64());
        }
        Ok((guard, newer))
    }
}

/// Where a request goes, and what its pool's picker should know of it.
struct Target<'s> {
    pool: &'s Arc<Pool>,
    /// The body, when it was read whole before routing.
    whole: Option<bytes::Bytes>,
    /// The prompt's key, for a prefix pool.
    key: Option<crate::prompt::PromptKey>,
    /// The hash of the session header's value, for a prefix pool that names one.
    session: Option<u64>,
}

/// The target of a request whose body counts: routed by the model it names (a route names one),
/// and, for a prefix pool, keyed by its prompt and session. The body is read ahead once, up to
/// `route_body_limit`; the whole body when it was read in full. A model no route serves is
/// `ModelNotFound`; a body that names none (or is too long to read) goes by the routes without a
/// model, and a prompt too long to read has no key (the pool's least-load picker takes it).
async fn target<'s>(
    snap: &'s Snapshot,
    host: Option<&str>,
    parts: &http::request::Parts,
    body: &mut RequestBody,
) -> Result<Target<'s>, ProxyError> {
    let limit = snap.config.server.route_body_limit;
    let path = parts.uri.path();
    let (pool, whole, read) = match snap.route(host, path) {
        Routed::Nowhere => return Err(ProxyError::NoRoute),
        Routed::Pool(pool) => (pool, None, false),
        Routed::ByModel => {
            let whole = body.read_ahead(limit).await?;
            let model = whole.as_deref().and_then(crate::openai::model_of);
            match snap.route_model(host, path, model.as_deref()) {
                Some(pool) => (pool, whole, true),
                None => return Err(model.map_or(ProxyError::NoRoute, ProxyError::ModelNotFound)),
            }
        }
    };
    let mut target = Target { pool, whole, key: None, session: None };
    let Some(routing) = &pool.prefix else { return Ok(target) };
    let header = routing.config.affinity_header.as_ref();
    target.session = header.and_then(|h| parts.headers.get(h)).map(|v| crate::prompt::hash(v.as_bytes()));
    if !read {
        target.whole = body.read_ahead(limit).await?;
    }
    target.key = target.whole.as_deref().and_then(|b| crate::prompt::key_of(b, routing.config.block_chars));
    Ok(target)
}

/// The response as the client gets it: hop-by-hop fields out, the request id in; the slot and
/// the connection travel with the body, which counts the request when it ends.
fn respond(
    resp: Response<UpstreamBody>,
    guard: InflightGuard,
    pool: &Pool,
    request_id: &HeaderValue,
    track: &mut Tracking,
    started: Instant,
) -> Response<ResponseBody> {
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
    let done = Upstream { guard, started, status, stream_idle_timeout: pool.config.stream_idle_timeout, log };
    Response::from_parts(rparts, ResponseBody::upstream(rbody, done, track.active.take()))
}

/// A failed send whose request body failed first is that body's failure: too large (413), idle
/// (408), or the client's own (400), rather than the backend's (502).
fn body_failure(error: ProxyError, outcome: Option<&upstream::body::BodyEnd>) -> ProxyError {
    match outcome.and_then(|o| o.get()) {
        Some(failure) if matches!(error, ProxyError::Upstream(_)) => failure.clone().into(),
        _ => error,
    }
}

/// The one shape of every error answer.
fn error_response(e: &ProxyError, request_id: &HeaderValue, active: Option<ActiveRequest>) -> Response<ResponseBody> {
    let id = request_id.to_str().unwrap_or("-");
    let mut resp = Response::new(ResponseBody::full(e.body(id), active));
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
    use crate::http1::server::{drain, serve, split_tcp, Limits};
    use std::time::Duration;
    use tokio::net::{TcpListener, TcpStream};

    /// A client connection's task holds the HTTP/1 server's state for as long as the connection
    /// is open, idle or streaming: that state is most of what an open connection costs.
    #[tokio::test]
    async fn an_http1_client_connection_holds_under_4_kib_of_task_state() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let _client = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (stream, peer) = listener.accept().await.expect("accept");
        let text = "[pools.p]\n[[pools.p.backends]]\naddr = \"127.0.0.1:9\"\n";
        let config = crate::config::Config::parse(text, std::path::Path::new(".")).expect("valid config");
        let gateway = Gateway::new(crate::gateway::Snapshot::build(config, &[], None));
        let shared = ConnShared::new();
        let service = ProxyService::new(gateway, headers::Client::new(peer.ip(), "http"), shared.clone());
        let (_trigger, drain) = drain();
        let t = Duration::from_secs(5);
        let limits = Limits { header_timeout: t, idle_timeout: t, send_timeout: t, max_head: 16 * 1024 };
        let conn = serve(split_tcp(stream), bytes::BytesMut::new(), service, shared, limits, drain);
        let size = std::mem::size_of_val(&conn);
        assert!(size <= 4096, "{size} bytes");
    }
}
