//! The body sent to the client. [`ResponseBody`] carries the upstream body (or a small local one)
//! to the client, frame by frame, and holds everything that must live exactly as long as the
//! response: the backend's in-flight slot, the upstream connection (given back only after a clean
//! end), and the connection-activity marker. It finishes on the last frame, not on `None`,
//! because hyper stops polling a body whose `is_end_stream()` is true.

use crate::clock::IdleTimeout;
use crate::downstream::ActiveRequest;
use crate::error::BoxError;
use crate::pool::InflightGuard;
use crate::upstream::UpstreamBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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
    Upstream { body: UpstreamBody, done: Option<Upstream>, idle: IdleTimeout },
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
        let idle = IdleTimeout::new(done.stream_idle_timeout);
        ResponseBody { inner: Inner::Upstream { body, done: Some(done), idle }, active, handed }
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
    use crate::pool::traffic::Outcome;
    let Some(up) = done.take() else { return };
    let backend = up.guard.backend();
    if end == End::Complete {
        if let Some(conn) = body.take_reusable() {
            crate::upstream::put_back(backend, conn);
        }
    }
    let outcome = match end {
        End::Complete if up.status < 500 => Outcome::Ok,
        End::Complete | End::BackendFailed => Outcome::Failed,
        End::ClientGone { .. } => Outcome::Aborted,
    };
    let seconds = up.started.elapsed().as_secs_f64();
    super::outcome::record(super::outcome::Scope::Backend(backend), up.status, outcome, seconds);
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
                    idle.touch();
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
                    if done.is_none() || !idle.poll_expired(cx) {
                        return Poll::Pending;
                    }
                    finish(done, body, End::BackendFailed);
                    Poll::Ready(Some(Err(Box::new(StreamIdle(idle.after())))))
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
