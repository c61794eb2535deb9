//! Body wrappers of the data path. Both stream frame by frame; neither buffers.
//!
//! [`RequestBody`] forwards the client's body upstream and enforces `max_request_body` on bodies
//! of unknown length. [`ResponseBody`] carries the upstream body (or a small local one) to the
//! client and holds everything that must live exactly as long as the response: the backend's
//! in-flight slot, the upstream connection (given back only after a clean end), and the
//! connection-activity marker. It finishes on the last frame, not on `None`, because hyper stops
//! polling a body whose `is_end_stream()` is true.

use super::conn::ActiveRequest;
use super::upstream::H1Sender;
use crate::backend::InflightGuard;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::time::Sleep;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a request body ended early, as seen by the proxy after the upstream send failed.
pub mod outcome {
    pub const TOO_LARGE: u8 = 1;
    pub const IDLE: u8 = 2;
}

/// The client's request body on its way upstream. It fails (aborting the upstream request) when
/// more than `limit` bytes arrive, or when the client sends nothing for `idle_timeout`; the
/// shared `outcome` says which, so the caller answers 413 or 408 rather than 502.
pub struct RequestBody {
    /// `None`: an empty body (a replayed request that had none).
    inner: Option<Incoming>,
    limit: u64,
    seen: u64,
    idle_timeout: Duration,
    idle: Option<Pin<Box<Sleep>>>,
    outcome: Option<Arc<AtomicU8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    #[error("client sent no request body data for {0:?}")]
    Idle(Duration),
}

impl RequestBody {
    /// Wraps `inner`. `limit` is enforced on what streams through (a declared length was checked
    /// before). `outcome` is only needed, and only allocated, for requests that have a body.
    pub fn new(inner: Incoming, limit: u64, idle_timeout: Duration) -> (Self, Option<Arc<AtomicU8>>) {
        let outcome = (!inner.is_end_stream()).then(|| Arc::new(AtomicU8::new(0)));
        let body =
            RequestBody { inner: Some(inner), limit, seen: 0, idle_timeout, idle: None, outcome: outcome.clone() };
        (body, outcome)
    }

    /// An empty body, for replaying a request that had none.
    pub fn empty() -> Self {
        RequestBody { inner: None, limit: 0, seen: 0, idle_timeout: Duration::MAX, idle: None, outcome: None }
    }

    fn fail(&self, code: u8, e: RequestBodyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(o) = &self.outcome {
            o.store(code, Ordering::Relaxed);
        }
        Poll::Ready(Some(Err(Box::new(e))))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        return this.fail(outcome::TOO_LARGE, RequestBodyError::TooLarge(this.limit));
                    }
                }
                if let Some(sleep) = &mut this.idle {
                    sleep.as_mut().reset(tokio::time::Instant::now() + this.idle_timeout);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                // Armed only once the body actually has to wait for the client.
                let timeout = this.idle_timeout;
                let sleep = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if sleep.as_mut().poll(cx).is_ready() {
                    return this.fail(outcome::IDLE, RequestBodyError::Idle(timeout));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or(SizeHint::with_exact(0), Incoming::size_hint)
    }
}

/// What finishing an upstream response releases.
pub struct Upstream {
    pub guard: InflightGuard,
    pub conn: Option<H1Sender>,
    pub started: Instant,
    pub status: u16,
    pub stream_idle_timeout: Duration,
}

enum Inner {
    Full(Option<Bytes>),
    Upstream { body: Incoming, done: Option<Upstream>, idle: Option<Pin<Box<Sleep>>> },
}

/// The body sent to the client.
pub struct ResponseBody {
    inner: Inner,
    _active: Option<ActiveRequest>,
}

#[derive(Debug, thiserror::Error)]
#[error("backend sent nothing for {0:?} in the middle of a response body")]
pub struct StreamIdle(Duration);

impl ResponseBody {
    pub fn full(bytes: Bytes, active: Option<ActiveRequest>) -> Self {
        ResponseBody { inner: Inner::Full(Some(bytes)), _active: active }
    }

    pub fn upstream(body: Incoming, done: Upstream, active: Option<ActiveRequest>) -> Self {
        ResponseBody { inner: Inner::Upstream { body, done: Some(done), idle: None }, _active: active }
    }
}

/// Releases the slot, records the request, and gives the connection back if the body ended cleanly.
fn finish(done: &mut Option<Upstream>, clean: bool) {
    let Some(mut up) = done.take() else { return };
    let backend = up.guard.backend();
    if clean {
        if let Some(conn) = up.conn.take() {
            backend.conns.put_back(conn);
        }
    }
    backend.count_response(up.status, up.status >= 500 || !clean);
    backend.metrics.observe(up.status, up.started.elapsed().as_secs_f64());
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.inner {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream { body, done, idle } => match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if body.is_end_stream() {
                        finish(done, true);
                    } else if let Some(sleep) = idle {
                        if let Some(up) = done {
                            sleep.as_mut().reset(tokio::time::Instant::now() + up.stream_idle_timeout);
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    finish(done, false);
                    Poll::Ready(Some(Err(Box::new(e))))
                }
                Poll::Ready(None) => {
                    finish(done, true);
                    Poll::Ready(None)
                }
                Poll::Pending => {
                    // The idle timer is created only when a body actually waits, so short
                    // responses that arrive in one read never touch the timer wheel.
                    let Some(up) = done else { return Poll::Pending };
                    let timeout = up.stream_idle_timeout;
                    let sleep = idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    if sleep.as_mut().poll(cx).is_ready() {
                        finish(done, false);
                        return Poll::Ready(Some(Err(Box::new(StreamIdle(timeout)))));
                    }
                    Poll::Pending
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Upstream { body, .. } => body.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Inner::Upstream { body, done, .. } = &mut self.inner {
            // Dropped before the end means the client went away: the upstream connection is
            // mid-response and is closed rather than reused.
            let clean = body.is_end_stream();
            finish(done, clean);
        }
    }
}
