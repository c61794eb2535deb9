//! The HTTP/1.1 server half: reads requests from a client connection (plain TCP or TLS), hands
//! each to the proxy, and writes the response back, all on the connection's own task.
//!
//! This module owns, for HTTP/1.0 and 1.1 clients: parsing request heads (httparse, header
//! values are slices of the read buffer); request framing by RFC 9112 §6.3 (Content-Length,
//! chunked, or none; Transfer-Encoding with Content-Length, or two Content-Lengths, is flagged for
//! the proxy to refuse); the header timeout (408 on a half-received head), the idle timeout (a
//! quiet close) and the send timeout (a client that takes no response bytes); `Expect:
//! 100-continue`; keep-alive and pipelining; response framing (the body's exact length, else
//! chunked, else until close for HTTP/1.0) and `Date`; watching for a client that goes away while
//! its request is in flight (the request is then dropped, which cancels it upstream); draining on
//! shutdown; and a lingering close, so that a client still sending is not reset before it reads
//! its answer.
//!
//! It never buffers a body: request body frames are slices of the read buffer and response frames
//! are written as they come. An idle plain-TCP connection holds no buffer. It never spawns a task
//! and never locks (over TLS, tokio's split takes an uncontended per-connection lock). h2 is
//! served by hyper (see `server.rs`).

use super::{next_frame, Chunk, ConnectionTokens, State as Framing, KEEP_ALIVE};
use crate::clock::add_ms;
use crate::clock::now_ms;
use crate::error::ProxyError;
use crate::proxy::body::{BoxError, ClientBody, ResponseBody};
use crate::proxy::conn::ConnShared;
use crate::proxy::ProxyService;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use std::future::{poll_fn, Future};
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch};

/// Most request header fields accepted (more is 431).
const MAX_HEADERS: usize = 256;
/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;
/// Response bytes gathered into one write.
const COALESCE: usize = 16 * 1024;
/// Bytes of pipelined requests read ahead while a response is in progress.
const READ_AHEAD: usize = 64 * 1024;
/// A write buffer larger than this is not kept while the connection is idle.
const KEEP_OUT: usize = 4 * 1024;
/// How long, and how much, a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

mod socket;
pub use socket::{split_tcp, split_tls, ReadIo, WriteIo};

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

/// The client socket's read side and the bytes read from it but not yet consumed. It travels
/// into a request body that must stream from the socket, and comes back at the body's end.
pub struct Reader {
    rd: ReadIo,
    buf: BytesMut,
}

impl Reader {
    /// Reads more. With nothing buffered, waits for the socket to be readable before taking a
    /// buffer, so an idle connection holds none.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            if let (0, Some(tcp)) = (self.buf.capacity(), self.rd.tcp()) {
                ready!(tcp.poll_read_ready(cx))?;
            }
            self.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.rd), cx, &mut self.buf)
    }

    /// Gives the buffer back to the allocator when it holds nothing (plain TCP only: over TLS,
    /// only a read can tell whether data is waiting, and a read needs the buffer).
    fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 && self.rd.tcp().is_some() {
            self.buf = BytesMut::new();
        }
    }
}

/// Why a request body read from the client failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("client closed the connection in the middle of the request body")]
    ClosedEarly,
    #[error("reading the request body: {0}")]
    Read(#[source] io::Error),
    #[error("invalid chunked request body: {0}")]
    Malformed(&'static str),
}

/// A request body on the client connection.
pub struct Body(Inner);

enum Inner {
    /// The whole body (or none), already read with the head.
    Full(Option<Bytes>),
    /// A body still arriving: it reads from the socket itself.
    Stream(Stream),
}

struct Stream {
    reader: Option<Reader>,
    framing: Framing,
    /// Where the reader goes once the body has ended cleanly.
    back: Option<oneshot::Sender<Reader>>,
    /// `Expect: 100-continue` still to be answered (when the body is first waited for).
    expect_continue: bool,
    shared: Arc<ConnShared>,
}

impl Body {
    fn full(bytes: Option<Bytes>) -> Self {
        Body(Inner::Full(bytes.filter(|b| !b.is_empty())))
    }
}

impl Stream {
    /// The body has ended: the reader goes back to the connection.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let (Some(reader), Some(back)) = (self.reader.take(), self.back.take()) {
            let _ = back.send(reader);
        }
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.framing = Framing::Done;
        self.reader = None;
        self.back = None;
        Poll::Ready(Some(Err(Box::new(e))))
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(reader) = self.reader.as_mut() else { return Poll::Ready(None) };
            match next_frame(&mut self.framing, &mut reader.buf) {
                Ok(frame) => {
                    if self.framing == Framing::Done {
                        self.finish();
                    }
                    if let Some(data) = frame {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if self.framing == Framing::Done {
                        return Poll::Ready(None);
                    }
                }
                Err(super::Error::Malformed(m)) => return self.fail(BodyError::Malformed(m)),
                Err(_) => return self.fail(BodyError::Malformed("broken chunk")),
            }
            let Some(reader) = self.reader.as_mut() else { return Poll::Ready(None) };
            if std::mem::take(&mut self.expect_continue) && !self.shared.responding.load(Ordering::Relaxed) {
                // The client waits for this before sending the body. Nothing else is being
                // written on the connection before the response, and 25 bytes fit an empty
                // socket buffer; if they do not, the client sends after its own short wait.
                // Over TLS the connection's task writes it, through the encryption.
                match reader.rd.tcp() {
                    Some(tcp) => {
                        let _ = tcp.try_write(CONTINUE);
                    }
                    None => self.shared.continue_wanted.store(true, Ordering::Relaxed),
                }
            }
            match reader.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => return self.fail(BodyError::ClosedEarly),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return self.fail(BodyError::Read(e)),
            }
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Stream(s) => s.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Full(b) => b.is_none(),
            Inner::Stream(s) => s.framing == Framing::Done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Stream(Stream { framing: Framing::Length(n), .. }) => SizeHint::with_exact(*n),
            Inner::Stream(Stream { framing: Framing::Done, .. }) => SizeHint::with_exact(0),
            Inner::Stream(_) => SizeHint::default(),
        }
    }
}

/// A parsed request head and what the connection needs to know about it.
struct Head {
    request: http::request::Parts,
    body: BodyKind,
    /// The client asked to close after this request (or is HTTP/1.0 without keep-alive).
    close: bool,
    /// HTTP/1.0 with `Connection: keep-alive`: the answer must say so.
    keep_alive_10: bool,
    expect_continue: bool,
    /// Ambiguous framing: the proxy refuses it and the connection closes.
    suspicious: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    None,
    Length(u64),
    Chunked,
}

/// Why a request head was refused before it reached the proxy.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    TooLarge,
    Bad(&'static str),
    /// Well-formed, but asks for something the gateway does not do (501).
    Unsupported(&'static str),
    /// A request target longer than a URI can be here (414).
    TargetTooLong,
}

/// The longest request target kept (the `http` crate's limit for a URI).
const MAX_TARGET: u32 = u16::MAX as u32 - 1;

/// Parses a request head at the front of `buf`, consuming it. `None` while incomplete.
#[allow(clippy::too_many_lines)] // longer than 80 lines: to be split
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, HeadError> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Bad("malformed request head")),
    };
    let method =
        Method::from_bytes(req.method.unwrap_or("").as_bytes()).map_err(|_| HeadError::Bad("invalid method"))?;
    let version = if req.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // Offsets into the head, so that the target, names and values are read from it once frozen.
    let target = super::offsets(&buf[..len], req.path.unwrap_or("").as_bytes())
        .filter(|(start, end)| end > start)
        .ok_or(HeadError::Bad("malformed request head"))?;
    if target.1 - target.0 > MAX_TARGET {
        return Err(HeadError::TargetTooLong);
    }
    let spans = super::Spans::of(&buf[..len], req.headers).ok_or(HeadError::Bad("malformed request head"))?;
    let count = spans.len;
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.0 as usize..target.1 as usize))
        .map_err(|_| HeadError::Bad("invalid request target"))?;

    let mut headers = HeaderMap::with_capacity(count + 8);
    let mut conn = ConnectionTokens::default();
    let (mut lengths, mut length, mut te, mut chunked) = (0, None, 0, false);
    let mut hosts = 0;
    let mut expect_continue = false;
    for &(ns, ne, vs, ve) in spans.as_slice() {
        let name = HeaderName::from_bytes(&head[ns as usize..ne as usize])
            .map_err(|_| HeadError::Bad("invalid header name"))?;
        let raw = &head[vs as usize..ve as usize];
        if name == header::CONTENT_LENGTH {
            lengths += 1;
            length = parse_length(raw);
        } else if name == header::TRANSFER_ENCODING {
            // The body's framing is ours to decode; the field does not go upstream.
            te += 1;
            chunked = transfer_coding(raw)?;
            continue;
        } else if name == header::CONNECTION {
            // Read here, and left out when it holds only close/keep-alive (nothing else to strip).
            if conn.read(raw) {
                continue;
            }
        } else if name == KEEP_ALIVE {
            continue;
        } else if name == header::HOST {
            hosts += 1;
        } else if name == header::EXPECT && raw.eq_ignore_ascii_case(b"100-continue") {
            expect_continue = true;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
            .map_err(|_| HeadError::Bad("invalid header value"))?;
        headers.append(name, value);
    }
    // RFC 9112 §6.3: Transfer-Encoding wins, but a request with both, or with two lengths, is a
    // smuggling shape: it is refused (by the proxy, which counts and logs it).
    let suspicious = lengths > 1 || (te > 0 && lengths > 0);
    // RFC 9112 §3.2: exactly one Host in HTTP/1.1 (a target in absolute form names the host
    // itself), at most one in HTTP/1.0.
    if hosts > 1 || (hosts == 0 && version == Version::HTTP_11 && uri.authority().is_none()) {
        return Err(HeadError::Bad("an HTTP/1.1 request needs exactly one Host"));
    }
    let body = if suspicious {
        BodyKind::None
    } else if te > 0 {
        // HTTP/1.0 has no chunked framing, so a Transfer-Encoding there is a framing fault
        // (RFC 9112 §6.1), as is a second Transfer-Encoding field.
        if version == Version::HTTP_10 {
            return Err(HeadError::Bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if te > 1 {
            return Err(HeadError::Bad("Transfer-Encoding twice"));
        }
        if !chunked {
            return Err(HeadError::Bad("Transfer-Encoding without chunked as the last coding"));
        }
        BodyKind::Chunked
    } else {
        match (lengths, length) {
            (0, _) => BodyKind::None,
            (_, None) => return Err(HeadError::Bad("invalid Content-Length")),
            (_, Some(0)) => BodyKind::None,
            (_, Some(n)) => BodyKind::Length(n),
        }
    };
    let close = if version == Version::HTTP_10 { !conn.keep_alive || conn.close } else { conn.close };
    let mut request = Request::new(()).into_parts().0;
    request.method = method;
    request.uri = uri;
    request.version = version;
    request.headers = headers;
    Ok(Some(Head {
        request,
        body,
        close,
        keep_alive_10: version == Version::HTTP_10 && !close,
        expect_continue,
        suspicious,
    }))
}

/// Whether a Transfer-Encoding value ends in chunked. Only chunked alone is decoded: chunked
/// applied twice, or ending in another coding, is malformed (400); another coding before chunked
/// would reach the backend still encoded with nothing to say so, and is refused (501).
fn transfer_coding(raw: &[u8]) -> Result<bool, HeadError> {
    let mut codings = raw.split(|&b| b == b',').map(<[u8]>::trim_ascii).rev();
    let is_chunked = |t: &[u8]| t.eq_ignore_ascii_case(b"chunked");
    if !codings.next().is_some_and(is_chunked) {
        return Ok(false);
    }
    let mut earlier = codings.peekable();
    if earlier.peek().is_none() {
        Ok(true)
    } else if earlier.any(is_chunked) {
        Err(HeadError::Bad("chunked applied more than once"))
    } else {
        Err(HeadError::Unsupported("transfer codings other than chunked are not supported"))
    }
}

/// A Content-Length value: digits only.
fn parse_length(raw: &[u8]) -> Option<u64> {
    let t = raw.trim_ascii();
    if t.is_empty() || t.len() > 19 || !t.iter().all(u8::is_ascii_digit) {
        return None;
    }
    t.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
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
struct Conn {
    service: ProxyService,
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
pub async fn serve(
    (rd, wr): (ReadIo, WriteIo),
    initial: BytesMut,
    service: ProxyService,
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
        service,
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

impl Conn {
    async fn run(&mut self) {
        loop {
            let keep_open = match poll_fn(|cx| self.poll_next(cx)).await {
                Next::Quiet => false,
                Next::Refuse(e) => {
                    let resp = self.service.local_error(&e);
                    let _ = self.respond(resp, &Method::GET, Version::HTTP_11, true, false).await;
                    false
                }
                Next::Head(head) => self.exchange(head).await,
            };
            if !keep_open || self.drain.flag.load(Ordering::Relaxed) {
                self.close().await;
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
        if suspicious {
            self.shared.set_suspicious();
        }
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
                        BodyKind::Length(n) => Framing::Length(n),
                        _ => Framing::Chunked(Chunk::Size),
                    },
                    back: Some(back),
                    expect_continue,
                    shared: self.shared.clone(),
                }))
            }
        };
        self.shared.responding.store(false, Ordering::Relaxed);
        let req = Request::from_parts(request, ClientBody::Own(body));
        let read = &mut self.read;
        let (wr, shared) = (&mut self.wr, &self.shared);
        // Bytes of a `100 Continue` (asked for by a body read over TLS) still to be written.
        let mut continue_left = 0;
        let mut handling = Box::pin(self.service.handle_request(req));
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
                let deadline = match (self.head_started_ms, self.served_any) {
                    (Some(start), _) => add_ms(start, self.limits.header_timeout),
                    (None, false) => add_ms(self.opened_ms, self.limits.header_timeout.min(self.limits.idle_timeout)),
                    (None, true) => add_ms(self.shared.idle_since_ms(), self.limits.idle_timeout),
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

    /// Writes `resp`; returns whether the connection may stay open.
    #[allow(clippy::too_many_lines)] // longer than 80 lines: to be split
    async fn respond(
        &mut self,
        resp: Response<ResponseBody>,
        method: &Method,
        version: Version,
        mut close: bool,
        keep_alive_10: bool,
    ) -> io::Result<bool> {
        self.shared.responding.store(true, Ordering::Relaxed);
        let (parts, mut body) = resp.into_parts();
        let status = parts.status;
        let no_body = method == Method::HEAD || status.is_informational() || status == 204 || status == 304;
        if self.drain.flag.load(Ordering::Relaxed) {
            close = true;
        }
        // Framing: the body's exact length, else chunked (HTTP/1.1), else until close.
        let length = if no_body { None } else { body.size_hint().exact() };
        let chunked = !no_body && length.is_none() && version == Version::HTTP_11;
        if !no_body && length.is_none() && !chunked {
            close = true;
        }
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut has_date = false;
        for (name, value) in &parts.headers {
            if name == header::CONNECTION {
                close |= value.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
                continue;
            }
            if !no_body && (name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING) {
                continue;
            }
            has_date |= name == header::DATE;
            super::put_field(out, name, value);
        }
        if let Some(n) = length {
            let _ = write!(out, "content-length: {n}\r\n");
        } else if chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if !has_date {
            out.extend_from_slice(b"date: ");
            date::append(out);
            out.extend_from_slice(b"\r\n");
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        } else if keep_alive_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");

        let mut written = 0;
        let mut sent: u64 = 0;
        let mut done = no_body;
        let mut clean = true;
        // Armed only when the client stops taking bytes: a client that accepts nothing for
        // `send_timeout` is cut off, releasing the backend slot its response holds.
        let send_timeout = self.limits.send_timeout;
        let mut stalled: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut flushed = true;
        if no_body {
            drop(body);
            body = ResponseBody::full(Bytes::new(), None);
        }
        let result = poll_fn(|cx| loop {
            while !done && self.out.len() - written < COALESCE {
                match Pin::new(&mut body).poll_frame(cx) {
                    Poll::Pending => break,
                    Poll::Ready(None) => {
                        done = true;
                        if chunked {
                            self.out.extend_from_slice(b"0\r\n\r\n");
                        } else if length.is_some_and(|n| n != sent) {
                            clean = false;
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        tracing::debug!(error = %e, "response body failed; closing the client connection");
                        done = true;
                        clean = false;
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            if !data.is_empty() {
                                sent += data.len() as u64;
                                if length.is_some_and(|n| sent > n) {
                                    // More than the length the answer announced: stop here.
                                    done = true;
                                    clean = false;
                                    break;
                                }
                                if chunked {
                                    let _ = write!(self.out, "{:x}\r\n", data.len());
                                    self.out.extend_from_slice(&data);
                                    self.out.extend_from_slice(b"\r\n");
                                } else {
                                    self.out.extend_from_slice(&data);
                                }
                            }
                        }
                        // Trailers are dropped: HTTP/1.1 clients rarely ask for them.
                        if body.is_end_stream() {
                            done = true;
                            if chunked {
                                self.out.extend_from_slice(b"0\r\n\r\n");
                            } else if length.is_some_and(|n| n != sent) {
                                clean = false;
                            }
                        }
                    }
                }
            }
            let mut blocked = false;
            if written < self.out.len() {
                match Pin::new(&mut self.wr).poll_write(cx, &self.out[written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero))),
                    Poll::Ready(Ok(n)) => {
                        written += n;
                        flushed = false;
                        if written == self.out.len() {
                            self.out.clear();
                            written = 0;
                        }
                        if let Some(timer) = &mut stalled {
                            timer.as_mut().reset(crate::clock::deadline(send_timeout));
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => blocked = true,
                }
            } else if !flushed {
                // A no-op over plain TCP; over TLS it pushes the encrypted records out.
                match Pin::new(&mut self.wr).poll_flush(cx) {
                    Poll::Ready(Ok(())) => flushed = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => blocked = true,
                }
            }
            if blocked {
                let timer = stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(send_timeout)));
                if timer.as_mut().poll(cx).is_ready() {
                    tracing::debug!(timeout = ?send_timeout, "client took no response bytes; closing");
                    self.shared.set_stalled();
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::TimedOut)));
                }
            }
            if done && written == self.out.len() && flushed {
                return Poll::Ready(Ok(clean));
            }
            // Waiting for the body or the socket: notice a client that went away.
            return match self.read.watch(cx) {
                Client::Gone => Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionReset))),
                Client::Present => Poll::Pending,
            };
        })
        .await;
        drop(body);
        Ok(result? && !close)
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

/// The `Date` header value, formatted once per second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
    }

    pub fn append(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                let text = httpdate::fmt_http_date(now);
                if text.len() == 29 {
                    c.1.copy_from_slice(text.as_bytes());
                    c.0 = secs;
                } else {
                    out.extend_from_slice(text.as_bytes());
                    return;
                }
            }
            out.extend_from_slice(&c.1);
        });
    }
}

#[cfg(test)]
mod differential;
#[cfg(test)]
mod tests;
