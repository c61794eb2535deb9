//! State shared by a client connection and its requests ([`ConnShared`]), and the IO wrapper of
//! the connections hyper serves (h2c, and everything over TLS): it enforces the header and idle
//! timeouts (hyper closes on its own header timeout without a response, and conflates it with
//! keep-alive idleness), and spots request-smuggling shapes that hyper normalises away before the
//! service could see them. Plain-TCP HTTP/1.x connections are served by `h1::server` instead, which
//! does both itself.
//!
//! [`ClientIo`] sits between the socket and hyper. It keeps its own state, shares three atomics
//! with the service ([`ConnShared`]), and arms a single lazily-reset timer per connection, so a
//! read costs a few loads and (for HTTP/1) a newline scan of the bytes read.

use memchr::memchr;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Milliseconds since the first use, a cheap shared clock for the idle bookkeeping.
pub(crate) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

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
}

impl ConnShared {
    pub fn new() -> Arc<Self> {
        let s = ConnShared::default();
        s.idle_since_ms.store(now_ms(), Ordering::Relaxed);
        Arc::new(s)
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

    /// Records a smuggling shape found while parsing a head: the proxy refuses the request.
    pub(crate) fn set_suspicious(&self) {
        self.suspicious.store(true, Ordering::Relaxed);
    }
}

/// A request in progress on a connection; dropped when its response is done.
#[derive(Debug)]
pub struct ActiveRequest(Arc<ConnShared>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.idle_since_ms.store(now_ms(), Ordering::Relaxed);
        self.0.finished.fetch_add(1, Ordering::Relaxed);
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client socket: plain TCP or TLS over it.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Writes what it can right now without waiting (a best-effort last message).
    fn write_now(&mut self, bytes: &[u8]);
}

impl ClientStream for TcpStream {
    fn write_now(&mut self, bytes: &[u8]) {
        let _ = self.try_write(bytes);
    }
}

impl ClientStream for tokio_rustls::server::TlsStream<TcpStream> {
    fn write_now(&mut self, bytes: &[u8]) {
        use std::io::Write;
        /// The socket as a non-blocking `Write`, for rustls to flush records into.
        struct Now<'a>(&'a TcpStream);
        impl Write for Now<'_> {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.try_write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (tcp, conn) = self.get_mut();
        if conn.writer().write_all(bytes).is_ok() {
            while conn.wants_write() {
                if conn.write_tls(&mut Now(tcp)).is_err() {
                    break;
                }
            }
        }
    }
}

/// The client socket as hyper sees it.
pub struct ClientIo<S = TcpStream> {
    inner: S,
    shared: Arc<ConnShared>,
    header_timeout: Duration,
    idle_timeout: Duration,
    timer: Pin<Box<Sleep>>,
    /// The waker the timer was last polled with.
    timer_waker: Option<Waker>,
    opened_ms: u64,
    /// `None` until the first bytes show whether this is HTTP/2 (prior knowledge) or HTTP/1.
    h2: Option<bool>,
    /// Value of `shared.finished` when the current idle period began.
    seen_finished: u64,
    /// When the first byte of the pending request head arrived (HTTP/1).
    head_started_ms: Option<u64>,
    served_any: bool,
    scanner: HeadScanner,
    closed: bool,
}

const RESPONSE_408_HEAD: &str =
    "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n";

impl<S: ClientStream> ClientIo<S> {
    pub fn new(inner: S, shared: Arc<ConnShared>, header_timeout: Duration, idle_timeout: Duration) -> Self {
        ClientIo {
            inner,
            shared,
            header_timeout,
            idle_timeout,
            timer: Box::pin(tokio::time::sleep(header_timeout.min(idle_timeout))),
            timer_waker: None,
            opened_ms: now_ms(),
            h2: None,
            seen_finished: 0,
            head_started_ms: None,
            served_any: false,
            scanner: HeadScanner::new(),
            closed: false,
        }
    }

    fn on_bytes(&mut self, bytes: &[u8]) {
        let h2 = *self.h2.get_or_insert_with(|| bytes.starts_with(b"PRI "));
        if h2 {
            return;
        }
        if self.scanner.feed(bytes) {
            self.shared.suspicious.store(true, Ordering::Relaxed);
        }
        if self.shared.active.load(Ordering::Relaxed) == 0 {
            self.sync_idle_period();
            if self.head_started_ms.is_none() {
                self.head_started_ms = Some(now_ms());
            }
        }
    }

    /// Notices a request finished since we last looked: a new idle period, no head started yet.
    fn sync_idle_period(&mut self) {
        let f = self.shared.finished.load(Ordering::Relaxed);
        if f != self.seen_finished {
            self.seen_finished = f;
            self.head_started_ms = None;
            self.served_any = true;
        }
    }

    /// What to do when the timer fires: `Some(deadline_ms)` to keep waiting, `None` to close.
    fn next_deadline(&mut self) -> Option<u64> {
        let now = now_ms();
        if self.shared.active.load(Ordering::Relaxed) > 0 {
            // A request is in progress; its own timeouts apply. Look again later.
            return Some(now + self.idle_timeout.as_millis() as u64);
        }
        self.sync_idle_period();
        let deadline = match (self.h2 == Some(true), self.head_started_ms) {
            (false, Some(start)) => start + self.header_timeout.as_millis() as u64,
            _ if !self.served_any => self.opened_ms + self.header_timeout.min(self.idle_timeout).as_millis() as u64,
            _ => self.shared.idle_since_ms.load(Ordering::Relaxed) + self.idle_timeout.as_millis() as u64,
        };
        (deadline > now).then_some(deadline)
    }

    /// Polls the timer; returns true when the connection should be closed now.
    fn poll_timeout(&mut self, cx: &mut Context<'_>) -> bool {
        // Reads go pending after every request; the timer already holds this task's waker, so
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
                Some(ms) => {
                    let wait = Duration::from_millis(ms.saturating_sub(now_ms()).max(1));
                    self.timer.as_mut().reset(tokio::time::Instant::now() + wait);
                }
                None => {
                    if self.h2 == Some(false) && self.head_started_ms.is_some() {
                        self.send_408();
                    }
                    return true;
                }
            }
        }
    }

    /// Best-effort 408 on a half-received request head, written straight to the socket (hyper
    /// is not in the middle of writing anything: no request is active).
    fn send_408(&mut self) {
        let id = crate::proxy::headers::new_request_id();
        let body = crate::error::error_body("request header timeout", id.to_str().unwrap_or("-"));
        let msg = format!("{RESPONSE_408_HEAD}content-length: {}\r\n\r\n", body.len());
        let mut out = msg.into_bytes();
        out.extend_from_slice(&body);
        self.inner.write_now(&out);
        tracing::debug!("closed a connection whose request head did not arrive in time (408)");
    }
}

impl<S: ClientStream> AsyncRead for ClientIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let filled = buf.filled().len();
                if filled > before {
                    // Copy-free view of just the new bytes.
                    let new = &buf.filled()[before..filled];
                    this.on_bytes(new);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.poll_timeout(cx) {
                    this.closed = true;
                    // End of stream: hyper closes the connection.
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
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

/// Finds header blocks that carry two `Content-Length` lines, or `Content-Length` together with
/// `Transfer-Encoding`, in the raw bytes of an HTTP/1 connection. A block is the run of lines
/// between blank lines. It looks only at the first 18 bytes after each newline, so its cost is a
/// `memchr` over the bytes read. Body text that happens to look like such a block makes it flag
/// the connection too; the cost of that rare false positive is a 400 and a new connection.
struct HeadScanner {
    prefix: [u8; 18],
    len: usize,
    collecting: bool,
    content_length: u8,
    transfer_encoding: u8,
}

impl HeadScanner {
    fn new() -> Self {
        HeadScanner { prefix: [0; 18], len: 0, collecting: true, content_length: 0, transfer_encoding: 0 }
    }

    /// Feeds bytes; returns true if a suspicious header block was completed or is in progress.
    fn feed(&mut self, data: &[u8]) -> bool {
        let mut flagged = false;
        let mut pos = 0;
        loop {
            // Only Content-Length and Transfer-Encoding lines (and the blank line ending a head)
            // matter: any other line is skipped whole from its first byte.
            if self.collecting && self.len == 0 && pos < data.len() {
                let first = data[pos];
                if !matches!(first | 0x20, b'c' | b't') && first != b'\r' && first != b'\n' {
                    self.collecting = false;
                }
            }
            if self.collecting {
                while pos < data.len() && self.len < self.prefix.len() && data[pos] != b'\n' {
                    self.prefix[self.len] = data[pos].to_ascii_lowercase();
                    self.len += 1;
                    pos += 1;
                }
                if self.len == self.prefix.len() || pos < data.len() {
                    flagged |= self.line_done();
                    self.collecting = false;
                } else {
                    return flagged;
                }
            }
            match memchr(b'\n', &data[pos..]) {
                Some(k) => {
                    pos += k + 1;
                    self.collecting = true;
                    self.len = 0;
                }
                None => return flagged,
            }
        }
    }

    fn line_done(&mut self) -> bool {
        let p = &self.prefix[..self.len];
        if p.is_empty() || p == b"\r" {
            self.content_length = 0;
            self.transfer_encoding = 0;
            return false;
        }
        if p.starts_with(b"content-length:") {
            self.content_length = self.content_length.saturating_add(1);
        } else if p.starts_with(b"transfer-encoding:") {
            self.transfer_encoding = self.transfer_encoding.saturating_add(1);
        }
        self.content_length >= 2 || (self.content_length >= 1 && self.transfer_encoding >= 1)
    }
}

#[cfg(test)]
mod tests {
    use super::HeadScanner;

    fn scan_in_pieces(text: &[u8], piece: usize) -> bool {
        let mut s = HeadScanner::new();
        text.chunks(piece).fold(false, |acc, c| acc | s.feed(c))
    }

    #[test]
    fn flags_smuggling_shapes_however_split() {
        let cl_te = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let te_cl = b"POST / HTTP/1.1\r\nTRANSFER-ENCODING: chunked\r\ncontent-length: 4\r\n\r\n";
        let cl_cl = b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd";
        for piece in [1, 2, 3, 7, 1000] {
            assert!(scan_in_pieces(cl_te, piece), "cl+te, pieces of {piece}");
            assert!(scan_in_pieces(te_cl, piece), "te+cl, pieces of {piece}");
            assert!(scan_in_pieces(cl_cl, piece), "cl+cl, pieces of {piece}");
        }
    }

    #[test]
    fn ordinary_requests_pass() {
        let two = b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcdPOST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nab";
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        for piece in [1, 5, 1000] {
            assert!(!scan_in_pieces(two, piece));
            assert!(!scan_in_pieces(chunked, piece));
        }
    }
}
