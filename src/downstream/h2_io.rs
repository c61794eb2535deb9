//! The client socket of an h2 connection as hyper sees it ([`ClientIo`]): it enforces the
//! connection's first-request, idle and send timeouts, which hyper's h2 server does not have.
//! It keeps its own state, shares a few atomics with the requests ([`ConnShared`]), and arms a
//! single lazily-reset timer per connection, so a read costs a few loads.

use super::ConnShared;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

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
        let deadline =
            self.shared.quiet_deadline_ms(self.opened_ms, self.served_any, self.header_timeout, self.idle_timeout);
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
