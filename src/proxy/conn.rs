//! State shared by a client connection and its requests ([`ConnShared`]), and the IO wrapper of
//! the connections hyper serves (h2, by prior knowledge or ALPN): it enforces the connection's
//! first-request and idle timeouts, which hyper's h2 server does not have. HTTP/1.x connections
//! are served by `h1::server`, which does this (and spots request-smuggling shapes) itself.
//!
//! [`ClientIo`] sits between the socket and hyper. It keeps its own state, shares a few atomics
//! with the service ([`ConnShared`]), and arms a single lazily-reset timer per connection, so a
//! read costs a few loads.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// State shared between a client connection's IO wrapper and its service.
#[derive(Debug, Default)]
pub struct ConnShared {
    /// Requests being served on this connection (several on h2).
    active: AtomicU32,
    /// Bumped each time a request finishes, so the IO side notices a new idle period.
    finished: AtomicU64,
    /// When the last request finished (`now_ms`).
    idle_since_ms: AtomicU64,
    /// A header block with two Content-Lengths, or Content-Length and Transfer-Encoding, was read.
    suspicious: AtomicBool,
    /// The current response's head is being written (own HTTP/1.1 codec): too late for a
    /// `100 Continue`.
    pub(crate) responding: AtomicBool,
    /// A request body read over TLS wants a `100 Continue` written (own HTTP/1.1 codec).
    pub(crate) continue_wanted: AtomicBool,
    /// The connection was cut off because the client took no response bytes for
    /// `send_timeout`; the requests it ends are logged as `client_stalled`.
    stalled: AtomicBool,
    /// h2 only: response bodies that handed a frame to hyper and were not asked for the next one
    /// yet (hyper asks only once the client's flow-control window has room).
    unsent: AtomicU32,
    /// h2 only: when a body waiting for the client last made progress (`now_ms`).
    unsent_progress_ms: AtomicU64,
    /// Whether response bodies report their frames to `unsent` (h2 connections).
    watch_sends: bool,
}

impl ConnShared {
    pub fn new() -> Arc<Self> {
        let s = ConnShared::default();
        s.idle_since_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
        Arc::new(s)
    }

    /// Shared state of an h2 connection: response bodies report frames waiting for the client.
    pub fn new_h2() -> Arc<Self> {
        let s = ConnShared { watch_sends: true, ..ConnShared::default() };
        s.idle_since_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
        Arc::new(s)
    }

    /// Whether the connection was cut off for taking no response bytes.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// Marks the connection as cut off for taking no response bytes (counted once).
    pub(crate) fn set_stalled(&self) {
        if !self.stalled.swap(true, Ordering::Relaxed) {
            crate::telemetry::client_stalled();
        }
    }

    /// Whether this connection's response bodies report [`Self::frame_handed`].
    pub(crate) fn watches_sends(&self) -> bool {
        self.watch_sends
    }

    /// A response body handed a frame to the connection and waits to be asked for the next.
    pub(crate) fn frame_handed(&self) {
        if self.unsent.fetch_add(1, Ordering::Relaxed) == 0 {
            self.unsent_progress_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
        }
    }

    /// A body that had handed a frame was asked for more (or dropped): the client took it.
    pub(crate) fn frame_taken(&self) {
        self.unsent.fetch_sub(1, Ordering::Relaxed);
        self.unsent_progress_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
    }

    /// When the bodies waiting on the client will have waited `send_timeout` with no progress
    /// (`now_ms`), or `None` when none waits.
    fn send_deadline_ms(&self, send_timeout: Duration) -> Option<u64> {
        (self.unsent.load(Ordering::Relaxed) > 0)
            .then(|| crate::clock::add_ms(self.unsent_progress_ms.load(Ordering::Relaxed), send_timeout))
    }

    /// Marks a request as started; the returned marker ends it when dropped (with the response body).
    pub fn start(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    /// Whether the bytes read so far contain a smuggling shape (HTTP/1 only).
    pub fn suspicious(&self) -> bool {
        self.suspicious.load(Ordering::Relaxed)
    }

    /// When the last request on this connection finished (`now_ms`), as its response body ended.
    pub(crate) fn idle_since_ms(&self) -> u64 {
        self.idle_since_ms.load(Ordering::Relaxed)
    }

    /// Records a smuggling shape found while parsing a head: the proxy refuses the request.
    pub(crate) fn set_suspicious(&self) {
        self.suspicious.store(true, Ordering::Relaxed);
    }
}

/// A request in progress on a connection; dropped when its response is done.
#[derive(Debug)]
pub struct ActiveRequest(Arc<ConnShared>);

impl ActiveRequest {
    /// The connection the request came on.
    pub fn conn(&self) -> &ConnShared {
        &self.0
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.idle_since_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
        self.0.finished.fetch_add(1, Ordering::Relaxed);
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client socket: plain TCP or TLS over it.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl ClientStream for TcpStream {}
impl ClientStream for tokio_rustls::server::TlsStream<TcpStream> {}

/// The client socket of an h2 connection as hyper sees it.
pub struct ClientIo<S = TcpStream> {
    inner: S,
    /// Bytes read from the socket before hyper took over (while telling h2 from HTTP/1.x),
    /// handed to hyper first.
    prefix: bytes::Bytes,
    shared: Arc<ConnShared>,
    header_timeout: Duration,
    idle_timeout: Duration,
    send_timeout: Duration,
    timer: Pin<Box<Sleep>>,
    /// The waker the timer was last polled with.
    timer_waker: Option<Waker>,
    /// When the timer is set to fire (`now_ms`).
    timer_due_ms: u64,
    opened_ms: u64,
    /// Value of `shared.finished` when the current idle period began.
    seen_finished: u64,
    served_any: bool,
    closed: bool,
}

impl<S: ClientStream> ClientIo<S> {
    pub fn new(inner: S, shared: Arc<ConnShared>, header_timeout: Duration, idle_timeout: Duration) -> Self {
        ClientIo {
            send_timeout: idle_timeout,
            inner,
            prefix: bytes::Bytes::new(),
            shared,
            header_timeout,
            idle_timeout,
            timer: Box::pin(tokio::time::sleep(header_timeout.min(idle_timeout))),
            timer_waker: None,
            timer_due_ms: crate::clock::add_ms(crate::clock::now_ms(), header_timeout.min(idle_timeout)),
            opened_ms: crate::clock::now_ms(),
            seen_finished: 0,
            served_any: false,
            closed: false,
        }
    }

    /// Cuts the connection off once response bodies have waited this long for the client to
    /// take their frames, with no progress (default: the idle timeout).
    pub fn with_send_timeout(mut self, send_timeout: Duration) -> Self {
        self.send_timeout = send_timeout;
        self
    }

    /// Hands `prefix` to hyper before anything read from the socket.
    pub fn with_prefix(mut self, prefix: bytes::Bytes) -> Self {
        self.prefix = prefix;
        self
    }

    /// Notices a request finished since we last looked: a new idle period.
    fn sync_idle_period(&mut self) {
        let f = self.shared.finished.load(Ordering::Relaxed);
        if f != self.seen_finished {
            self.seen_finished = f;
            self.served_any = true;
        }
    }

    /// What to do when the timer fires: `Some(deadline_ms)` to keep waiting, `None` to close.
    fn next_deadline(&mut self) -> Option<u64> {
        let now = crate::clock::now_ms();
        if self.shared.active.load(Ordering::Relaxed) > 0 {
            // A request is in progress; its own timeouts apply, and the send timeout here.
            let later = crate::clock::add_ms(now, self.idle_timeout);
            return match self.shared.send_deadline_ms(self.send_timeout) {
                Some(due) if due <= now => {
                    self.shared.set_stalled();
                    None
                }
                Some(due) => Some(due.min(later)),
                None => Some(later),
            };
        }
        self.sync_idle_period();
        let deadline = if self.served_any {
            crate::clock::add_ms(self.shared.idle_since_ms(), self.idle_timeout)
        } else {
            crate::clock::add_ms(self.opened_ms, self.header_timeout.min(self.idle_timeout))
        };
        (deadline > now).then_some(deadline)
    }

    /// Polls the timer; returns true when the connection should be closed now.
    fn poll_timeout(&mut self, cx: &mut Context<'_>) -> bool {
        // Responses started waiting for the client's window: the send timeout may come first.
        if let Some(due) = self.shared.send_deadline_ms(self.send_timeout).filter(|d| *d < self.timer_due_ms) {
            self.set_timer(due);
        }
        // Reads go pending after every frame; the timer already holds this task's waker, so
        // unless it fired there is nothing to do.
        if !self.timer.is_elapsed() && self.timer_waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return false;
        }
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                self.timer_waker = Some(cx.waker().clone());
                return false;
            }
            match self.next_deadline() {
                Some(ms) => self.set_timer(ms),
                None => return true,
            }
        }
    }

    /// Sets the timer to fire at `due_ms` (`now_ms`); it is polled again before it counts.
    fn set_timer(&mut self, due_ms: u64) {
        let wait = Duration::from_millis(due_ms.saturating_sub(crate::clock::now_ms()).max(1));
        self.timer.as_mut().reset(crate::clock::deadline(wait));
        self.timer_due_ms = due_ms;
        self.timer_waker = None;
    }
}

impl<S: ClientStream> AsyncRead for ClientIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {
                if this.poll_timeout(cx) {
                    this.closed = true;
                    if this.shared.stalled() {
                        tracing::debug!(timeout = ?this.send_timeout, "h2 client took no response bytes; closing");
                        // An error, not an end of stream: hyper drops the streams at once.
                        return Poll::Ready(Err(io::Error::from(io::ErrorKind::TimedOut)));
                    }
                    // End of stream: hyper closes the connection.
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<S: ClientStream> AsyncWrite for ClientIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
