//! The bodies that go upstream and come back: [`ClientBody`] (a client's request body as it
//! arrives: from the own HTTP/1.1 codec, or from hyper for h2), [`RequestBody`] (it forwards the
//! client's body, enforces `max_request_body` on bodies of unknown length and the request body
//! idle timeout, and, when the request may be retried, keeps references to the frames it
//! forwarded, up to [`KEEP_LIMIT`] bytes, so a small body can be sent again), and
//! [`UpstreamBody`] (a backend's response body: read by this task from an HTTP/1.1 connection,
//! or a stream of a shared h2 connection). All stream frame by frame; none waits to buffer.

use crate::clock::IdleTimeout;
use crate::error::{BoxError, ProxyError};
use crate::http1;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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

/// How a request body ended early. The body records it, and the proxy reads it after a failed
/// send: an h2 backend's connection reports a failing request body only as a reset stream
/// (hyper pipes the body apart from the response future), so the cause cannot travel in the
/// send's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFailure {
    /// More than `max_request_body` arrived.
    TooLarge(u64),
    /// The client sent nothing for the idle timeout.
    Idle(Duration),
    /// The client's body itself failed (malformed chunks, connection closed mid-body).
    Client(String),
}

impl From<BodyFailure> for ProxyError {
    fn from(f: BodyFailure) -> Self {
        match f {
            BodyFailure::TooLarge(limit) => ProxyError::BodyTooLarge(limit),
            BodyFailure::Idle(d) => ProxyError::BodyTimeout(d),
            BodyFailure::Client(message) => ProxyError::ClientBody(message),
        }
    }
}

/// Where a request body records its [`BodyFailure`] (set once).
pub type BodyEnd = Arc<std::sync::OnceLock<BodyFailure>>;

/// A client's request body as it arrives: from our own HTTP/1.1 codec, or from hyper (h2, TLS).
pub enum ClientBody {
    Own(http1::server::Body),
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
    /// What was already taken from `inner` ([`RequestBody::settle_h2`],
    /// [`RequestBody::read_ahead`]), forwarded first, in order.
    front: VecDeque<Result<Frame<Bytes>, BoxError>>,
    /// A kept body being sent again, front first.
    replay: Vec<Bytes>,
    /// Set while the frames are kept for a retry.
    keep: Option<Keeper>,
    limit: u64,
    seen: u64,
    /// The client's idle timeout on the body (`after()` is its length).
    idle: IdleTimeout,
    outcome: Option<BodyEnd>,
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
    pub fn new(inner: ClientBody, limit: u64, idle_timeout: Duration) -> (Self, Option<BodyEnd>) {
        let outcome = (!inner.is_end_stream()).then(BodyEnd::default);
        let body = RequestBody {
            inner: Some(inner),
            front: VecDeque::new(),
            replay: Vec::new(),
            keep: None,
            limit,
            seen: 0,
            idle: IdleTimeout::new(idle_timeout),
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
        let idle = self.idle.after();
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
            Some(other) => self.front.push_back(other),
            None => {}
        }
        self
    }

    /// Reads the body ahead, before it goes anywhere, up to `limit` bytes (to route by what it
    /// says). Everything read is forwarded first, unchanged. The whole body, when it ended
    /// within `limit` without trailers (it is then sent from memory, and kept for a retry at any
    /// size); `None` when it is longer, and the rest streams as usual. Fails as forwarding the
    /// body would: larger than `max_request_body`, idle for the idle timeout, or broken.
    pub async fn read_ahead(&mut self, limit: usize) -> Result<Option<Bytes>, BodyFailure> {
        let idle = self.idle.after();
        let mut data = Vec::new();
        let mut bytes = 0usize;
        while let Some(inner) = self.inner.as_mut().filter(|b| !b.is_end_stream()) {
            let next = std::future::poll_fn(|cx| Pin::new(&mut *inner).poll_frame(cx));
            let frame = match tokio::time::timeout(idle, next).await {
                Err(_) => return Err(BodyFailure::Idle(idle)),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(BodyFailure::Client(crate::upstream::error_chain(&*e))),
                Ok(Some(Ok(frame))) => frame,
            };
            let Some(chunk) = frame.data_ref() else {
                self.front.push_back(Ok(frame)); // trailers: only a stream carries them on
                return Ok(None);
            };
            bytes = bytes.saturating_add(chunk.len());
            if bytes as u64 > self.limit {
                return Err(BodyFailure::TooLarge(self.limit));
            }
            data.push(chunk.clone());
            self.front.push_back(Ok(frame));
            if bytes > limit {
                return Ok(None);
            }
        }
        let whole = match data.len() {
            1 => data.pop().unwrap_or_default(),
            _ => Bytes::from(data.concat()),
        };
        // Counted once, here; from now on the body is sent from memory.
        self.seen = bytes as u64;
        self.front.clear();
        self.inner = None;
        self.replay = if whole.is_empty() { Vec::new() } else { vec![whole.clone()] };
        Ok(Some(whole))
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
            front: VecDeque::new(),
            replay: frames,
            keep: None,
            limit: u64::MAX,
            seen: 0,
            idle: IdleTimeout::new(Duration::MAX),
            outcome: None,
        }
    }

    fn finish_keep(&mut self) {
        if let Some(k) = self.keep.take() {
            let _ = k.done.send(k.frames);
        }
    }

    fn fail(&self, e: RequestBodyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let failure = match e {
            RequestBodyError::TooLarge(limit) => BodyFailure::TooLarge(limit),
            RequestBodyError::Idle(d) => BodyFailure::Idle(d),
        };
        if let Some(o) = &self.outcome {
            let _ = o.set(failure);
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
        let polled = match this.front.pop_front() {
            Some(front) => Poll::Ready(Some(front)),
            None => Pin::new(inner).poll_frame(cx),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        this.keep = None;
                        return this.fail(RequestBodyError::TooLarge(this.limit));
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
                this.idle.touch();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.keep = None;
                if let Some(o) = &this.outcome {
                    let _ = o.set(BodyFailure::Client(crate::upstream::error_chain(&*e)));
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish_keep();
                Poll::Ready(None)
            }
            Poll::Pending => {
                // Armed only once the body actually has to wait for the client.
                if this.idle.poll_expired(cx) {
                    return this.fail(RequestBodyError::Idle(this.idle.after()));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Some(inner) => self.front.is_empty() && inner.is_end_stream(),
            None => self.replay.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) if self.front.is_empty() => inner.size_hint(),
            Some(_) => SizeHint::default(),
            None => SizeHint::with_exact(self.replay.iter().map(|b| b.len() as u64).sum()),
        }
    }
}

/// A backend's response body: read by this task from an HTTP/1.1 connection, or a stream of a
/// shared h2 connection.
pub enum UpstreamBody {
    H1(http1::client::Body),
    H2(Incoming),
}

impl UpstreamBody {
    /// The HTTP/1.1 connection, once the body ended cleanly and the connection may be reused.
    pub fn take_reusable(&mut self) -> Option<http1::client::Conn> {
        match self {
            UpstreamBody::H1(b) => b.take_reusable(),
            UpstreamBody::H2(_) => None,
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::H1(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(b) => b.is_end_stream(),
            UpstreamBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(b) => b.size_hint(),
            UpstreamBody::H2(b) => b.size_hint(),
        }
    }
}
