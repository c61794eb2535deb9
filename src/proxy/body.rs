//! Body wrappers of the data path. Both stream frame by frame; neither waits to buffer.
//!
//! [`RequestBody`] forwards the client's body upstream and enforces `max_request_body` on bodies
//! of unknown length. When the request may be retried, it also keeps references to the frames it
//! forwarded, up to [`KEEP_LIMIT`] bytes, so a small body can be sent again ([`Kept`]). [`ResponseBody`] carries the upstream body (or a small local one) to the
//! client and holds everything that must live exactly as long as the response: the backend's
//! in-flight slot, the upstream connection (given back only after a clean end), and the
//! connection-activity marker. It finishes on the last frame, not on `None`, because hyper stops
//! polling a body whose `is_end_stream()` is true.

use super::conn::ActiveRequest;
use super::upstream::UpstreamBody;
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

/// The largest request body kept for a retry. Larger bodies are streamed and not retried.
pub const KEEP_LIMIT: usize = 64 * 1024;

/// Hands the frames of a fully forwarded small body to whoever wants to send it again.
pub type Kept = tokio::sync::oneshot::Receiver<Vec<Bytes>>;

/// Collects forwarded frames while they stay under [`KEEP_LIMIT`] bytes.
struct Keeper {
    frames: Vec<Bytes>,
    bytes: usize,
    done: tokio::sync::oneshot::Sender<Vec<Bytes>>,
}

/// How a request body ended early, as seen by the proxy after the upstream send failed.
pub mod outcome {
    pub const TOO_LARGE: u8 = 1;
    pub const IDLE: u8 = 2;
    /// The client's body itself failed (malformed chunks, connection closed mid-body).
    pub const CLIENT: u8 = 3;
}

/// A client's request body as it arrives: from our own HTTP/1.1 codec, or from hyper (h2, TLS).
pub enum ClientBody {
    Own(super::h1::server::Body),
    Hyper(Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Own(b) => Pin::new(b).poll_frame(cx),
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Own(b) => b.is_end_stream(),
            ClientBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Own(b) => b.size_hint(),
            ClientBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// The client's request body on its way upstream. It fails (aborting the upstream request) when
/// more than `limit` bytes arrive, or when the client sends nothing for `idle_timeout`; the
/// shared `outcome` says which, so the caller answers 413 or 408 rather than 502.
pub struct RequestBody {
    /// `None`: a body from memory (`replay`), or none at all.
    inner: Option<ClientBody>,
    /// What was already taken from `inner` (see [`RequestBody::settle_h2`]), forwarded first.
    first: Option<Result<Frame<Bytes>, BoxError>>,
    /// A kept body being sent again, front first.
    replay: Vec<Bytes>,
    /// Set while the frames are kept for a retry.
    keep: Option<Keeper>,
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
    pub fn new(inner: ClientBody, limit: u64, idle_timeout: Duration) -> (Self, Option<Arc<AtomicU8>>) {
        let outcome = (!inner.is_end_stream()).then(|| Arc::new(AtomicU8::new(0)));
        let body = RequestBody {
            inner: Some(inner),
            first: None,
            replay: Vec::new(),
            keep: None,
            limit,
            seen: 0,
            idle_timeout,
            idle: None,
            outcome: outcome.clone(),
        };
        (body, outcome)
    }

    /// An h2 request may carry "no body" as one empty DATA frame with END_STREAM after its
    /// HEADERS; hyper cannot tell that from the HEADERS alone, and the request would go upstream
    /// chunked. This takes the first frame: an empty last one leaves the body empty; any other
    /// is kept and forwarded first. `wait`: wait for it (at most `idle_timeout`; methods whose
    /// requests have no body by custom, GET and the like); otherwise only look.
    pub async fn settle_h2(mut self, wait: bool) -> Self {
        let idle = self.idle_timeout;
        let Some(inner) = self.inner.as_mut().filter(|b| !b.is_end_stream()) else { return self };
        let polled = if wait {
            let next = std::future::poll_fn(|cx| Pin::new(&mut *inner).poll_frame(cx));
            tokio::time::timeout(idle, next).await.ok().flatten()
        } else {
            let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
            match Pin::new(inner).poll_frame(&mut cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => None,
            }
        };
        match polled {
            Some(Ok(frame)) if frame.data_ref().is_some_and(|d| d.is_empty()) => {}
            other => self.first = other,
        }
        self
    }

    /// Keeps what is forwarded for a retry; the receiver gets the frames once the body has been
    /// forwarded in full, if it stayed within [`KEEP_LIMIT`] bytes and had no trailers.
    pub fn keep(&mut self) -> Kept {
        let (done, kept) = tokio::sync::oneshot::channel();
        self.keep = Some(Keeper { frames: Vec::new(), bytes: 0, done });
        if self.inner.is_some() && self.is_end_stream() {
            self.finish_keep();
        }
        kept
    }

    /// A body sent from memory: a kept one, sent again (empty for a request that had none).
    pub fn replay(mut frames: Vec<Bytes>) -> Self {
        frames.reverse();
        RequestBody {
            inner: None,
            first: None,
            replay: frames,
            keep: None,
            limit: u64::MAX,
            seen: 0,
            idle_timeout: Duration::MAX,
            idle: None,
            outcome: None,
        }
    }

    fn finish_keep(&mut self) {
        if let Some(k) = self.keep.take() {
            let _ = k.done.send(k.frames);
        }
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
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(this.replay.pop().map(|b| Ok(Frame::data(b))));
        };
        let polled = match this.first.take() {
            Some(first) => Poll::Ready(Some(first)),
            None => Pin::new(inner).poll_frame(cx),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        this.keep = None;
                        return this.fail(outcome::TOO_LARGE, RequestBodyError::TooLarge(this.limit));
                    }
                }
                if let Some(k) = &mut this.keep {
                    match frame.data_ref() {
                        Some(data) if k.bytes + data.len() <= KEEP_LIMIT => {
                            k.bytes += data.len();
                            k.frames.push(data.clone());
                        }
                        // Too big, or trailers: this body will not be sent again.
                        _ => this.keep = None,
                    }
                }
                // hyper stops polling once the body says it has ended, so the end is seen here.
                if this.inner.as_ref().is_some_and(ClientBody::is_end_stream) {
                    this.finish_keep();
                }
                if let Some(sleep) = &mut this.idle {
                    sleep.as_mut().reset(crate::clock::deadline(this.idle_timeout));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.keep = None;
                if let Some(o) = &this.outcome {
                    o.store(outcome::CLIENT, Ordering::Relaxed);
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish_keep();
                Poll::Ready(None)
            }
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
        match &self.inner {
            Some(inner) => self.first.is_none() && inner.is_end_stream(),
            None => self.replay.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) if self.first.is_none() => inner.size_hint(),
            Some(_) => SizeHint::default(),
            None => SizeHint::with_exact(self.replay.iter().map(|b| b.len() as u64).sum()),
        }
    }
}

/// What finishing an upstream response releases.
pub struct Upstream {
    pub guard: InflightGuard,
    pub started: Instant,
    pub status: u16,
    pub stream_idle_timeout: Duration,
    /// The access log line, when the access log is on.
    pub log: Option<Box<super::access::Entry>>,
}

enum Inner {
    Full(Option<Bytes>),
    Upstream { body: UpstreamBody, done: Option<Upstream>, idle: Option<Pin<Box<Sleep>>> },
}

/// The body sent to the client.
pub struct ResponseBody {
    inner: Inner,
    active: Option<ActiveRequest>,
    /// A frame was handed to an h2 connection that has not asked for the next one yet.
    handed: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("backend sent nothing for {0:?} in the middle of a response body")]
pub struct StreamIdle(Duration);

impl ResponseBody {
    pub fn full(bytes: Bytes, active: Option<ActiveRequest>) -> Self {
        ResponseBody { inner: Inner::Full(Some(bytes)), active, handed: false }
    }

    pub fn upstream(body: UpstreamBody, done: Upstream, active: Option<ActiveRequest>) -> Self {
        // Over h2 the response head goes out at once, but hyper asks for the body only when the
        // client's window has room: until then it counts as a frame waiting for the client.
        let handed = active.as_ref().is_some_and(|a| a.conn().watches_sends());
        if let (true, Some(a)) = (handed, &active) {
            a.conn().frame_handed();
        }
        ResponseBody { inner: Inner::Upstream { body, done: Some(done), idle: None }, active, handed }
    }
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Complete,
    /// The backend broke the stream or went silent past `stream_idle_timeout`.
    BackendFailed,
    /// The client went away first; `stalled`: it was cut off for taking no response bytes.
    ClientGone {
        stalled: bool,
    },
}

/// Releases the slot, records the request, and gives the connection back if the body ended
/// cleanly. A client that leaves early is counted as `aborted`, never as the backend's error.
fn finish(done: &mut Option<Upstream>, body: &mut UpstreamBody, end: End) {
    use crate::traffic::Outcome;
    let Some(up) = done.take() else { return };
    let backend = up.guard.backend();
    if end == End::Complete {
        if let Some(conn) = body.take_reusable() {
            backend.conns.put_back(conn);
        }
    }
    let outcome = match end {
        End::Complete if up.status < 500 => Outcome::Ok,
        End::Complete | End::BackendFailed => Outcome::Failed,
        End::ClientGone { .. } => Outcome::Aborted,
    };
    if outcome == Outcome::Aborted {
        backend.count_aborted(up.status);
    } else {
        backend.count_response(up.status, outcome == Outcome::Failed);
    }
    backend.observe(up.status, outcome, up.started.elapsed().as_secs_f64());
    if let Some(log) = &up.log {
        let outcome = match end {
            End::Complete => "complete",
            End::BackendFailed => "backend_failed",
            End::ClientGone { stalled: true } => "client_stalled",
            End::ClientGone { stalled: false } => "aborted",
        };
        log.write(up.status, &backend.label, outcome);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // Asked for more: the frame handed last was taken by the client (h2 flow control).
        if std::mem::take(&mut this.handed) {
            if let Some(a) = &this.active {
                a.conn().frame_taken();
            }
        }
        match &mut this.inner {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream { body, done, idle } => match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let (Some(data), Some(Upstream { log: Some(log), .. })) = (frame.data_ref(), done.as_mut()) {
                        log.bytes += data.len() as u64;
                    }
                    if body.is_end_stream() {
                        finish(done, body, End::Complete);
                    } else if let Some(a) = this.active.as_ref().filter(|a| a.conn().watches_sends()) {
                        a.conn().frame_handed();
                        this.handed = true;
                    }
                    if let (false, Some(sleep)) = (body.is_end_stream(), idle) {
                        if let Some(up) = done {
                            sleep.as_mut().reset(crate::clock::deadline(up.stream_idle_timeout));
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    finish(done, body, End::BackendFailed);
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(None) => {
                    finish(done, body, End::Complete);
                    Poll::Ready(None)
                }
                Poll::Pending => {
                    // The idle timer is created only when a body actually waits, so short
                    // responses that arrive in one read never touch the timer wheel.
                    let Some(up) = done else { return Poll::Pending };
                    let timeout = up.stream_idle_timeout;
                    let sleep = idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    if sleep.as_mut().poll(cx).is_ready() {
                        finish(done, body, End::BackendFailed);
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
        let stalled = self.active.as_ref().is_some_and(|a| a.conn().stalled());
        if self.handed {
            if let Some(a) = &self.active {
                a.conn().frame_taken();
            }
        }
        if let Inner::Upstream { body, done, .. } = &mut self.inner {
            // Dropped before the end means the client went away: the upstream connection is
            // mid-response and is closed rather than reused.
            let end = if body.is_end_stream() { End::Complete } else { End::ClientGone { stalled } };
            finish(done, body, end);
        }
    }
}
