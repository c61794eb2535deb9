//! The HTTP/1.1 server half: reads requests from a client connection (plain TCP or TLS), hands
//! each to a [`Handler`], and writes the response back, all on the connection's own task.
//!
//! This module owns, for HTTP/1.0 and 1.1 clients: the connection's loop; the header timeout (408
//! on a half-received head), the idle timeout (a quiet close) and the send timeout (a client that
//! takes no response bytes); `Expect: 100-continue`; keep-alive and pipelining; watching for a
//! client that goes away while its request is in flight (the request is then dropped, which
//! cancels it); draining on shutdown; and a lingering close, so that a client still sending is
//! not reset before it reads its answer. Parsing is [`parse`], request bodies [`body`], writing
//! responses [`respond`].
//!
//! It never buffers a body: request body frames are slices of the read buffer and response frames
//! are written as they come. An idle plain-TCP connection holds no buffer. It never spawns a task
//! and never locks (over TLS, tokio's split takes an uncontended per-connection lock).

mod body;
mod parse;
mod respond;
mod socket;

pub use body::{Body, BodyError, Reader};
pub use socket::{split_tcp, split_tls, ReadIo, WriteIo};

use crate::clock::{add_ms, now_ms};
use crate::downstream::ConnShared;
use crate::error::ProxyError;
use crate::http1::chunked::Chunk;
use crate::http1::framing::BodyState;
use crate::http1::AmbiguousFraming;
use body::{Inner, Stream};
use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, Version};
use parse::{parse_head, BodyKind, Head, HeadError};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch};

/// Bytes of pipelined requests read ahead while a response is in progress.
const READ_AHEAD: usize = 64 * 1024;
/// A write buffer larger than this is not kept while the connection is idle.
const KEEP_OUT: usize = 4 * 1024;
/// How long, and how much, a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// What serves the requests of a connection.
pub trait Handler {
    /// The response body (written as it comes; its exact size, when known, frames it).
    type Body: http_body::Body<Data = Bytes, Error: std::fmt::Display> + Unpin;

    /// Serves one request. Dropping the future cancels it (the client went away).
    fn call(&self, req: Request<Body>) -> impl Future<Output = Response<Self::Body>> + Send + '_;

    /// The answer to a request refused before it could be parsed (malformed or oversized head,
    /// header timeout); the connection closes after it.
    fn refuse(&self, e: &ProxyError) -> Response<Self::Body>;
}

/// Timeouts and limits of a client connection, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// A client that takes no response bytes for this long is cut off.
    pub send_timeout: Duration,
    /// A request head that grows past this without ending gets 431.
    pub max_head: usize,
}

/// Tells connections that the server is draining: idle ones close, busy ones close after their
/// response. Checking it costs one relaxed load; each connection registers for the wake-up once.
#[derive(Clone)]
pub struct Drain {
    flag: Arc<AtomicBool>,
    rx: watch::Receiver<()>,
}

/// The sending side of [`Drain`].
pub struct DrainTrigger {
    flag: Arc<AtomicBool>,
    tx: watch::Sender<()>,
}

/// A drain signal and its trigger.
pub fn drain() -> (DrainTrigger, Drain) {
    let flag = Arc::new(AtomicBool::new(false));
    let (tx, rx) = watch::channel(());
    (DrainTrigger { flag: flag.clone(), tx }, Drain { flag, rx })
}

impl DrainTrigger {
    /// Starts the drain and waits until every connection holding a [`Drain`] has ended.
    pub async fn drain(self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.tx.send(());
        self.tx.closed().await;
    }
}

/// What waiting for the next request head ended with. (Lives for one move; boxing the head
/// would cost an allocation per request.)
#[allow(clippy::large_enum_variant)]
enum Next {
    Head(Head),
    /// Closed by the client, idle for too long, or drained: close without a word.
    Quiet,
    /// Refused before the proxy saw it: answer, then close.
    Refuse(ProxyError),
}

/// Whether the client is still there, as seen while its request is in flight.
enum Client {
    Present,
    Gone,
}

/// The connection's read side: here, or lent to a request body that streams from the socket.
struct ReadSide {
    reader: Option<Reader>,
    /// Where a streaming body sends the reader back at its end.
    back: Option<oneshot::Receiver<Reader>>,
}

impl ReadSide {
    /// Gets the reader back from a body that streamed; false if that body ended early (or has
    /// not ended yet).
    fn take_back(&mut self) -> bool {
        if self.reader.is_some() {
            return true;
        }
        match self.back.as_mut().map(|rx| rx.try_recv()) {
            Some(Ok(reader)) => {
                self.reader = Some(reader);
                self.back = None;
                true
            }
            Some(Err(oneshot::error::TryRecvError::Empty)) => false,
            _ => {
                self.back = None;
                false
            }
        }
    }

    /// Reads ahead on the client socket while a request is in flight: pipelined bytes are kept,
    /// the end of the stream means the client is gone.
    fn watch(&mut self, cx: &mut Context<'_>) -> Client {
        if self.reader.is_none() {
            match self.back.as_mut().map(|rx| Pin::new(rx).poll(cx)) {
                Some(Poll::Ready(Ok(reader))) => {
                    self.reader = Some(reader);
                    self.back = None;
                }
                Some(Poll::Ready(Err(_))) => self.back = None,
                _ => {}
            }
        }
        let Some(reader) = self.reader.as_mut() else { return Client::Present };
        while reader.buf.len() < READ_AHEAD {
            match reader.poll_fill(cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Client::Gone,
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => break,
            }
        }
        Client::Present
    }
}

/// One client connection.
struct Conn<H> {
    handler: H,
    shared: Arc<ConnShared>,
    limits: Limits,
    read: ReadSide,
    wr: WriteIo,
    out: Vec<u8>,
    timer: Pin<Box<tokio::time::Sleep>>,
    drain: Drain,
    opened_ms: u64,
    /// A request was served (the idle time then counts from `shared`'s end of the last one).
    served_any: bool,
    /// When the first byte of the pending head arrived.
    head_started_ms: Option<u64>,
}

/// Serves HTTP/1.x on `stream` (`initial`: bytes already read from it) until the client closes, a timeout or an error ends it, or the
/// server drains.
pub async fn serve<H: Handler>(
    (rd, wr): (ReadIo, WriteIo),
    initial: BytesMut,
    handler: H,
    shared: Arc<ConnShared>,
    limits: Limits,
    drain: Drain,
) {
    let mut rx = drain.rx.clone();
    let mut drain_wait = std::pin::pin!(async move {
        let _ = rx.changed().await;
    });
    // Registers this task for the drain wake-up, once: the flag is what is checked after that.
    let _ = poll_fn(|cx| Poll::Ready(drain_wait.as_mut().poll(cx))).await;
    let mut conn = Conn {
        handler,
        shared,
        limits,
        read: ReadSide { reader: Some(Reader { rd, buf: initial }), back: None },
        wr,
        out: Vec::new(),
        timer: Box::pin(tokio::time::sleep(limits.header_timeout.min(limits.idle_timeout))),
        drain,
        opened_ms: now_ms(),
        served_any: false,
        head_started_ms: None,
    };
    conn.run().await;
}

impl<H: Handler> Conn<H> {
    async fn run(&mut self) {
        loop {
            let keep_open = match poll_fn(|cx| self.poll_next(cx)).await {
                Next::Quiet => false,
                Next::Refuse(e) => {
                    let resp = self.handler.refuse(&e);
                    let _ = self.respond(resp, &Method::GET, Version::HTTP_11, true, false).await;
                    false
                }
                Next::Head(head) => self.exchange(head).await,
            };
            if !keep_open || self.drain.flag.load(Ordering::Relaxed) {
                // Boxed: the lingering close reads into a 4 KiB scratch buffer, which would
                // otherwise be part of every connection's task for the whole of its life.
                Box::pin(self.close()).await;
                return;
            }
            if self.out.capacity() > KEEP_OUT {
                self.out = Vec::new();
            }
            self.served_any = true;
            self.head_started_ms = None;
        }
    }

    /// Serves one request; returns whether the connection may carry another.
    async fn exchange(&mut self, head: Head) -> bool {
        let Head { request, body, close, keep_alive_10, expect_continue, suspicious } = head;
        let method = request.method.clone();
        let version = request.version;
        let Some(reader) = self.read.reader.as_mut() else { return false };
        let body = match body {
            BodyKind::None => Body::full(None),
            BodyKind::Length(n) if reader.buf.len() as u64 >= n => {
                Body::full(Some(reader.buf.split_to(n as usize).freeze()))
            }
            BodyKind::Length(_) | BodyKind::Chunked => {
                let (back, back_rx) = oneshot::channel();
                self.read.back = Some(back_rx);
                Body(Inner::Stream(Stream {
                    reader: self.read.reader.take(),
                    framing: match body {
                        BodyKind::Length(n) => BodyState::Length(n),
                        _ => BodyState::Chunked(Chunk::Size),
                    },
                    back: Some(back),
                    expect_continue,
                    shared: self.shared.clone(),
                }))
            }
        };
        self.shared.responding.store(false, Ordering::Relaxed);
        let mut req = Request::from_parts(request, body);
        if suspicious {
            req.extensions_mut().insert(AmbiguousFraming);
        }
        let read = &mut self.read;
        let (wr, shared) = (&mut self.wr, &self.shared);
        // Bytes of a `100 Continue` (asked for by a body read over TLS) still to be written.
        let mut continue_left = 0;
        let mut handling = Box::pin(self.handler.call(req));
        let resp = poll_fn(|cx| {
            if let Poll::Ready(resp) = handling.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            // (A load first: the swap's read-modify-write is paid only when it is set.)
            if shared.continue_wanted.load(Ordering::Relaxed) && shared.continue_wanted.swap(false, Ordering::Relaxed) {
                continue_left = CONTINUE.len();
            }
            while continue_left > 0 {
                match Pin::new(&mut *wr).poll_write(cx, &CONTINUE[CONTINUE.len() - continue_left..]) {
                    Poll::Ready(Ok(n)) if n > 0 => continue_left -= n,
                    Poll::Ready(_) => continue_left = 0, // the response's write will see the error
                    Poll::Pending => break,
                }
            }
            if continue_left == 0 {
                let _ = Pin::new(&mut *wr).poll_flush(cx);
            }
            match read.watch(cx) {
                Client::Gone => Poll::Ready(None),
                Client::Present => Poll::Pending,
            }
        })
        .await;
        drop(handling);
        if continue_left > 0 && self.wr.write_all(&CONTINUE[CONTINUE.len() - continue_left..]).await.is_err() {
            return false;
        }
        let Some(resp) = resp else {
            tracing::debug!("client went away before its response; request cancelled");
            return false;
        };
        // The connection is kept only if the request body was read to its end.
        let close = close || suspicious || !self.read.take_back();
        match self.respond(resp, &method, version, close, keep_alive_10).await {
            Ok(keep) => keep && self.read.take_back(),
            Err(_) => false,
        }
    }

    /// Waits for the next request head, enforcing the header and idle timeouts and the drain.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        let Some(reader) = self.read.reader.as_mut() else { return Poll::Ready(Next::Quiet) };
        loop {
            if !reader.buf.is_empty() {
                match parse_head(&mut reader.buf) {
                    Ok(Some(head)) => return Poll::Ready(Next::Head(head)),
                    Ok(None) if reader.buf.len() > self.limits.max_head => {
                        return Poll::Ready(Next::Refuse(ProxyError::HeadersTooLarge(self.limits.max_head)))
                    }
                    Ok(None) => {
                        // A head arriving in pieces: the header timeout runs from its first
                        // piece (a head that arrives whole never reads the clock here).
                        if self.head_started_ms.is_none() {
                            self.head_started_ms = Some(now_ms());
                            let due = crate::clock::deadline(self.limits.header_timeout);
                            if due < self.timer.deadline() {
                                self.timer.as_mut().reset(due);
                            }
                        }
                    }
                    Err(HeadError::TooLarge) => {
                        return Poll::Ready(Next::Refuse(ProxyError::HeadersTooLarge(self.limits.max_head)))
                    }
                    Err(HeadError::Bad(why)) => return Poll::Ready(Next::Refuse(ProxyError::BadRequest(why))),
                    Err(HeadError::TargetTooLong) => return Poll::Ready(Next::Refuse(ProxyError::UriTooLong)),
                    Err(HeadError::Unsupported(why)) => {
                        return Poll::Ready(Next::Refuse(ProxyError::NotImplemented(why)))
                    }
                }
            }
            match reader.poll_fill(cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Next::Quiet),
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => {}
            }
            reader.release_if_empty();
            if self.drain.flag.load(Ordering::Relaxed) && reader.buf.is_empty() {
                return Poll::Ready(Next::Quiet);
            }
            // The timer is set lazily: when it fires, the deadline is worked out from the state.
            while self.timer.as_mut().poll(cx).is_ready() {
                let now = now_ms();
                let (header, idle) = (self.limits.header_timeout, self.limits.idle_timeout);
                let deadline = match self.head_started_ms {
                    Some(start) => add_ms(start, header),
                    None => self.shared.quiet_deadline_ms(self.opened_ms, self.served_any, header, idle),
                };
                if deadline <= now {
                    if self.head_started_ms.is_some() {
                        return Poll::Ready(Next::Refuse(ProxyError::HeaderTimeout));
                    }
                    return Poll::Ready(Next::Quiet);
                }
                self.timer.as_mut().reset(crate::clock::deadline(Duration::from_millis(deadline - now)));
            }
            return Poll::Pending;
        }
    }

    /// Closes the connection: FIN first, then keeps reading (briefly, boundedly) what the client
    /// may still be sending, so that it reads its answer rather than a reset.
    async fn close(&mut self) {
        let _ = self.wr.shutdown().await;
        // Over TLS the close_notify and FIN are sent; what the client still sends is not read.
        let Some(stream) = self.wr.tcp() else { return };
        let lingering = async {
            let mut scratch = [0u8; 4096];
            let mut total = 0;
            while total < LINGER_BYTES {
                if stream.readable().await.is_err() {
                    return;
                }
                match stream.try_read(&mut scratch) {
                    Ok(0) => return,
                    Ok(n) => total += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, lingering).await;
    }
}

#[cfg(test)]
mod differential;
#[cfg(test)]
mod tests;
