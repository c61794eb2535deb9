//! The HTTP/1.1 client half of the data path: writes one request on a backend connection and
//! reads the response, on the task of the client connection that asked for it. The server half,
//! which reads requests from clients, is [`server`]; both share the chunked decoder.
//!
//! hyper's client runs every connection as a task of its own and talks to it over channels, so
//! each exchange costs two task hops and several moves of the request and response. Here the
//! request future, and then the response body, drive the socket themselves.
//!
//! This module owns request framing (the client's Content-Length, or chunked when the length is
//! unknown); response framing by RFC 9112 §6.3 (no body, Content-Length, chunked, or until
//! close); skipping 1xx answers; refusing malformed or ambiguous responses (invalid or
//! conflicting Content-Length, oversized heads, broken chunks); and deciding whether the
//! connection may carry another request. It never buffers a body: frames are slices of the read
//! buffer, handed on as they arrive. It never spawns a task and never locks; timeouts belong to
//! the caller.

use super::body::{BoxError, RequestBody};
use super::upstream::UpstreamIo;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use memchr::memchr;
use std::future::poll_fn;
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::AsyncWrite;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most response header fields accepted.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (with extensions), and the most trailer bytes, accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;
/// Request body bytes gathered into one write (with the head, when they are already there).
const COALESCE: usize = 16 * 1024;

/// Why an exchange, or a response body, failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the request: {0}")]
    Write(#[source] io::Error),
    #[error("reading the response: {0}")]
    Read(#[source] io::Error),
    #[error("backend closed the connection before answering")]
    ClosedBeforeAnswer,
    #[error("backend closed the connection in the middle of the response")]
    ClosedEarly,
    #[error("invalid response from backend: {0}")]
    Malformed(&'static str),
    #[error("request body: {0}")]
    RequestBody(#[source] BoxError),
}

/// One connection to a backend.
pub struct Conn {
    io: UpstreamIo,
    /// Bytes read and not yet handed on.
    buf: BytesMut,
    /// The request being written (its allocation is reused).
    out: Vec<u8>,
    /// Whether it carried an exchange before.
    reused: bool,
}

impl Conn {
    pub fn new(io: UpstreamIo) -> Self {
        Conn { io, buf: BytesMut::new(), out: Vec::new(), reused: false }
    }

    /// Whether an idle connection can take a request: the backend has neither closed it nor sent
    /// anything unasked. Costs no system call while the socket has nothing to read.
    pub fn poll_usable(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        // Pending is the healthy answer; data, end of stream or an error all disqualify it.
        matches!(self.poll_fill(cx), Poll::Pending)
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

/// A failed exchange. `request` comes back when it may be sent again on another connection:
/// nothing of it was written, or the connection was a reused one that the backend had closed
/// (`stale`) and the request is idempotent with no body consumed.
pub struct Failed {
    pub error: Error,
    pub request: Option<Request<RequestBody>>,
    pub stale: bool,
}

/// How the request body goes on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ReqFraming {
    None,
    Length(u64),
    Chunked,
}

/// Writes `req` on `conn` and reads the response head. The response body then reads from the
/// connection itself and hands it back at its end if it may carry another request.
pub async fn exchange(mut conn: Conn, req: Request<RequestBody>) -> Result<Response<Body>, Failed> {
    let (parts, mut body) = req.into_parts();
    let framing = match encode_head(&mut conn.out, &parts, &body) {
        Ok(f) => f,
        Err(error) => return Err(Failed { error, request: None, stale: false }),
    };
    let reused = conn.reused;
    conn.reused = true;
    let mut w = Writer::new(framing);
    let mut answered = false;
    let head = poll_fn(|cx| {
        if !w.finished(&conn) {
            if let Poll::Ready(Err(e)) = w.poll(cx, &mut conn, &mut body) {
                return Poll::Ready(Err(e));
            }
        }
        // The answer is read while the request is still going out: a backend may answer early
        // (and refuse the body).
        loop {
            match ready!(poll_head(cx, &mut conn, &mut answered)) {
                Ok(Some(head)) => return Poll::Ready(Ok(head)),
                Ok(None) => continue, // a 1xx answer; the final one follows
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    })
    .await;
    match head {
        Ok(head) => {
            // Answered before the whole request went out: the rest of the body is dropped and
            // the connection is not reused (the backend may still be reading it).
            let request_done = w.finished(&conn);
            conn.out.clear();
            head.into_response(conn, parts.method == Method::HEAD, request_done).map_err(|error| Failed {
                error,
                request: None,
                stale: false,
            })
        }
        Err(error) => {
            let stale =
                reused && !answered && matches!(error, Error::ClosedBeforeAnswer | Error::Read(_) | Error::Write(_));
            let unsent = !w.sent_any && !w.body_polled;
            // A failing request body is the client's doing: sending it elsewhere cannot help.
            let client_side = matches!(error, Error::RequestBody(_));
            let again = !client_side && (unsent || (stale && !w.body_polled && parts.method.is_idempotent()));
            let request = again.then(|| Request::from_parts(parts, body));
            Err(Failed { error, request, stale })
        }
    }
}

/// Serialises the request line and headers into `out`, adding the body's framing header.
fn encode_head(out: &mut Vec<u8>, parts: &http::request::Parts, body: &RequestBody) -> Result<ReqFraming, Error> {
    use http_body::Body as _;
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    match parts.uri.path_and_query().map(|p| p.as_str()) {
        Some(p) if !p.is_empty() => out.extend_from_slice(p.as_bytes()),
        _ => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut declared = None;
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING {
            continue; // framing is ours to choose (and it is stripped as hop-by-hop anyway)
        }
        if name == header::CONTENT_LENGTH {
            let n = value.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok());
            declared = Some(n.ok_or(Error::RequestBody("invalid Content-Length".into()))?);
        }
        put_field(out, name, value);
    }
    let framing = if body.is_end_stream() {
        if declared.is_none() && matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        ReqFraming::None
    } else if let Some(n) = declared {
        ReqFraming::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        let _ = write!(out, "content-length: {n}\r\n");
        ReqFraming::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        ReqFraming::Chunked
    };
    out.extend_from_slice(b"\r\n");
    Ok(framing)
}

/// Appends one `name: value` line.
fn put_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes the head and streams the request body, a bounded batch of frames per write.
struct Writer {
    framing: ReqFraming,
    /// Bytes of `out` already written.
    written: usize,
    flushed: bool,
    sent_any: bool,
    /// A body frame was taken (the body can no longer be sent again as it is).
    body_polled: bool,
    body_done: bool,
    seen: u64,
}

impl Writer {
    fn new(framing: ReqFraming) -> Self {
        Writer {
            framing,
            written: 0,
            flushed: true,
            sent_any: false,
            body_polled: false,
            body_done: framing == ReqFraming::None,
            seen: 0,
        }
    }

    fn finished(&self, conn: &Conn) -> bool {
        self.body_done && self.written == conn.out.len() && self.flushed
    }

    fn poll(&mut self, cx: &mut Context<'_>, conn: &mut Conn, body: &mut RequestBody) -> Poll<Result<(), Error>> {
        use http_body::Body as _;
        loop {
            // Gather what the body has ready, up to a batch.
            while !self.body_done && conn.out.len() - self.written < COALESCE {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Pending => break,
                    Poll::Ready(None) => self.end_body(&mut conn.out)?,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Error::RequestBody(e))),
                    Poll::Ready(Some(Ok(frame))) => {
                        self.body_polled = true;
                        self.frame(&mut conn.out, frame)?;
                    }
                }
            }
            if self.written < conn.out.len() {
                match Pin::new(&mut conn.io).poll_write(cx, &conn.out[self.written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(Error::Write(io::ErrorKind::WriteZero.into()))),
                    Poll::Ready(Ok(n)) => {
                        self.written += n;
                        self.sent_any = true;
                        self.flushed = false;
                        if self.written == conn.out.len() {
                            conn.out.clear();
                            self.written = 0;
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::Write(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !self.flushed {
                ready!(Pin::new(&mut conn.io).poll_flush(cx)).map_err(Error::Write)?;
                self.flushed = true;
            }
            // All written: done, or waiting for the body (which holds our waker).
            return if self.body_done { Poll::Ready(Ok(())) } else { Poll::Pending };
        }
    }

    fn frame(&mut self, out: &mut Vec<u8>, frame: Frame<Bytes>) -> Result<(), Error> {
        match frame.into_data() {
            Ok(data) => {
                if data.is_empty() {
                    return Ok(());
                }
                self.seen += data.len() as u64;
                match self.framing {
                    ReqFraming::Length(n) if self.seen > n => {
                        return Err(Error::RequestBody("request body longer than its Content-Length".into()))
                    }
                    ReqFraming::Chunked => {
                        let _ = write!(out, "{:x}\r\n", data.len());
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    }
                    _ => out.extend_from_slice(&data),
                }
            }
            Err(frame) => {
                // Trailers end the body; only chunked framing can carry them.
                if let (ReqFraming::Chunked, Ok(trailers)) = (self.framing, frame.into_trailers()) {
                    out.extend_from_slice(b"0\r\n");
                    for (name, value) in &trailers {
                        put_field(out, name, value);
                    }
                    out.extend_from_slice(b"\r\n");
                    self.body_done = true;
                }
            }
        }
        Ok(())
    }

    fn end_body(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        match self.framing {
            ReqFraming::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
            ReqFraming::Length(n) if self.seen != n => {
                return Err(Error::RequestBody("request body shorter than its Content-Length".into()))
            }
            _ => {}
        }
        self.body_done = true;
        Ok(())
    }
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// A parsed response head.
struct Head {
    status: u16,
    version: Version,
    headers: HeaderMap,
    conn: ConnectionTokens,
}

/// What the Connection header fields said.
#[derive(Default)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
}

impl ConnectionTokens {
    /// Reads one Connection value; true when it holds nothing but `close` and `keep-alive`.
    fn read(&mut self, value: &[u8]) -> bool {
        let mut only_ours = true;
        for token in value.split(|&b| b == b',') {
            let t = token.trim_ascii();
            if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if !t.is_empty() {
                only_ours = false;
            }
        }
        only_ours
    }

    /// Whether the backend lets the connection carry another request.
    fn reusable(&self, version: Version) -> bool {
        if version == Version::HTTP_10 {
            self.keep_alive && !self.close
        } else {
            !self.close
        }
    }
}

/// Reads until a complete head is buffered. `Ok(None)` for a 1xx answer (consumed).
fn poll_head(cx: &mut Context<'_>, conn: &mut Conn, answered: &mut bool) -> Poll<Result<Option<Head>, Error>> {
    loop {
        if !conn.buf.is_empty() {
            *answered = true;
            if let Some(parsed) = parse_head(&mut conn.buf)? {
                return Poll::Ready(Ok(parsed));
            }
            if conn.buf.len() >= MAX_HEAD {
                return Poll::Ready(Err(Error::Malformed("response head larger than 64 KiB")));
            }
        }
        match ready!(conn.poll_fill(cx)) {
            Ok(0) if conn.buf.is_empty() => return Poll::Ready(Err(Error::ClosedBeforeAnswer)),
            Ok(0) => return Poll::Ready(Err(Error::ClosedEarly)),
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(Error::Read(e))),
        }
    }
}

/// Parses a head at the front of `buf`. `None` when incomplete; `Some(None)` for a 1xx answer,
/// which is consumed; `Some(Some(head))` otherwise, with the head's bytes consumed.
#[allow(clippy::type_complexity)]
fn parse_head(buf: &mut BytesMut) -> Result<Option<Option<Head>>, Error> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::Malformed("more than 128 header fields")),
        Err(_) => return Err(Error::Malformed("unparsable response head")),
    };
    let status = resp.code.unwrap_or(0);
    if (100..200).contains(&status) && status != 101 {
        buf.advance(len);
        return Ok(Some(None));
    }
    let version = if resp.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // Offsets into the head, so that names and values are read from it once it is frozen.
    let spans = Spans::of(&buf[..len], resp.headers).ok_or(Error::Malformed("unparsable response head"))?;
    let count = spans.len;
    let head = buf.split_to(len).freeze();
    // Room for the request id the proxy adds.
    let mut headers = HeaderMap::with_capacity(count + 1);
    let mut conn = ConnectionTokens::default();
    for &(ns, ne, vs, ve) in spans.as_slice() {
        let name = HeaderName::from_bytes(&head[ns as usize..ne as usize])
            .map_err(|_| Error::Malformed("invalid header name"))?;
        let raw = &head[vs as usize..ve as usize];
        // Connection and Keep-Alive concern this hop only. They are read here and left out,
        // unless Connection names other headers: then the caller's hop-by-hop strip needs it.
        if name == header::CONNECTION {
            if conn.read(raw) {
                continue;
            }
        } else if name == KEEP_ALIVE {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
            .map_err(|_| Error::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    Ok(Some(Some(Head { status, version, headers, conn })))
}

/// A field's name and value, as offsets into its head.
type Span = (u32, u32, u32, u32);

/// Where `part` (a slice of `head`) starts and ends in `head`; `None` if it is not inside it.
fn offsets(head: &[u8], part: &[u8]) -> Option<(u32, u32)> {
    let start = (part.as_ptr() as usize).wrapping_sub(head.as_ptr() as usize);
    let end = start.checked_add(part.len())?;
    (end <= head.len()).then_some((start as u32, end as u32))
}
/// Heads with up to this many fields (nearly all) keep their spans on the stack.
const INLINE_SPANS: usize = 32;

/// Where each field's name and value sit in a head: the fields are read again from the head
/// once it is split off and frozen (the parser's slices borrow the buffer being split). Kept on
/// the stack for ordinary heads, in a `Vec` for long ones: neither a large array to initialise
/// nor an allocation per request.
struct Spans {
    inline: [Span; INLINE_SPANS],
    heap: Vec<Span>,
    len: usize,
}

impl Spans {
    /// `None` if a field does not lie within `head` (the parser's slices always do; this keeps
    /// a surprise from turning into an out-of-bounds slice).
    fn of(head: &[u8], fields: &[httparse::Header<'_>]) -> Option<Self> {
        let span = |h: &httparse::Header<'_>| -> Option<Span> {
            let (ns, ne) = offsets(head, h.name.as_bytes())?;
            let (vs, ve) = offsets(head, h.value)?;
            Some((ns, ne, vs, ve))
        };
        let mut spans = Spans { inline: [(0, 0, 0, 0); INLINE_SPANS], heap: Vec::new(), len: fields.len() };
        if fields.len() <= INLINE_SPANS {
            for (slot, h) in spans.inline.iter_mut().zip(fields) {
                *slot = span(h)?;
            }
        } else {
            spans.heap = fields.iter().map(span).collect::<Option<_>>()?;
        }
        Some(spans)
    }

    fn as_slice(&self) -> &[Span] {
        if self.len <= INLINE_SPANS {
            &self.inline[..self.len]
        } else {
            &self.heap
        }
    }
}

impl Head {
    /// The response, with its body framed as RFC 9112 §6.3 says.
    fn into_response(mut self, conn: Conn, head_only: bool, request_done: bool) -> Result<Response<Body>, Error> {
        let status = StatusCode::from_u16(self.status).map_err(|_| Error::Malformed("invalid status code"))?;
        if self.status == 101 {
            return Err(Error::Malformed("switched protocols without an upgrade request"));
        }
        let mut reusable = request_done && self.conn.reusable(self.version);
        let state = if head_only || self.status == 204 || self.status == 304 {
            State::Done
        } else if self.headers.contains_key(header::TRANSFER_ENCODING) {
            // Transfer-Encoding wins over Content-Length; a message with both is suspect, so the
            // length goes and the connection is not trusted again.
            if self.headers.remove(header::CONTENT_LENGTH).is_some() {
                reusable = false;
            }
            if chunked_last(&self.headers) {
                State::Chunked(Chunk::Size)
            } else {
                reusable = false;
                State::UntilClose
            }
        } else if self.headers.contains_key(header::CONTENT_LENGTH) {
            match content_length(&self.headers) {
                Some(0) => State::Done,
                Some(n) => State::Length(n),
                None => return Err(Error::Malformed("invalid or conflicting Content-Length")),
            }
        } else {
            reusable = false;
            State::UntilClose
        };
        let mut resp = Response::new(Body { conn: Some(conn), state, reusable });
        *resp.status_mut() = status;
        *resp.version_mut() = self.version;
        *resp.headers_mut() = self.headers;
        Ok(resp)
    }
}

/// Whether the last transfer coding is chunked.
fn chunked_last(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The Content-Length: every value (lists included) must be the same number.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut found = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let t = part.trim_ascii();
            if t.is_empty() || t.len() > 19 || !t.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n: u64 = std::str::from_utf8(t).ok()?.parse().ok()?;
            if found.is_some_and(|f| f != n) {
                return None;
            }
            found = Some(n);
        }
    }
    found
}

/// Where a response body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Done,
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines (discarded) up to an empty line; bytes seen so far.
    Trailers(usize),
}

/// What one step of chunked decoding found.
enum Step {
    /// The next this many buffered bytes are body data.
    Data(usize),
    NeedMore,
    End,
}

/// The response body, read straight from the backend connection.
pub struct Body {
    conn: Option<Conn>,
    state: State,
    reusable: bool,
}

impl Body {
    /// The connection, once the body has ended cleanly and it may carry another request.
    pub fn take_reusable(&mut self) -> Option<Conn> {
        let reusable =
            self.state == State::Done && self.reusable && self.conn.as_ref().is_some_and(|c| c.buf.is_empty());
        if reusable {
            self.conn.take()
        } else {
            None
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Done;
        self.reusable = false;
        self.conn = None;
        Poll::Ready(Some(Err(Box::new(e))))
    }
}

/// One step of chunked decoding over the buffered bytes, from state `chunk`. Returns what it
/// found and how many framing bytes at the front of `buf` it consumed (data is left for the
/// caller to take). Pure over the slice, so it also serves to look ahead.
fn chunk_step(chunk: &mut Chunk, buf: &[u8]) -> Result<(Step, usize), Error> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        match *chunk {
            Chunk::Size => {
                let Some(nl) = memchr(b'\n', rest) else {
                    return if rest.len() > MAX_CHUNK_LINE {
                        Err(Error::Malformed("chunk-size line too long"))
                    } else {
                        Ok((Step::NeedMore, at))
                    };
                };
                let size = chunk_size(&rest[..nl])?;
                at += nl + 1;
                *chunk = if size == 0 { Chunk::Trailers(0) } else { Chunk::Data(size) };
            }
            Chunk::Data(rem) => {
                if rest.is_empty() {
                    return Ok((Step::NeedMore, at));
                }
                let n = rem.min(rest.len() as u64);
                *chunk = if n == rem { Chunk::DataEnd } else { Chunk::Data(rem - n) };
                return Ok((Step::Data(n as usize), at));
            }
            Chunk::DataEnd => {
                if rest.len() < 2 {
                    return Ok((Step::NeedMore, at));
                }
                if &rest[..2] != b"\r\n" {
                    return Err(Error::Malformed("chunk data not followed by CRLF"));
                }
                at += 2;
                *chunk = Chunk::Size;
            }
            Chunk::Trailers(seen) => {
                let Some(nl) = memchr(b'\n', rest) else {
                    return if seen + rest.len() > MAX_TRAILERS {
                        Err(Error::Malformed("trailers too large"))
                    } else {
                        Ok((Step::NeedMore, at))
                    };
                };
                let empty = nl == 1 && rest[0] == b'\r';
                if nl == 0 || (!empty && rest[nl - 1] != b'\r') {
                    return Err(Error::Malformed("trailer line not ended by CRLF"));
                }
                if !empty && !is_field_line(&rest[..nl - 1]) {
                    return Err(Error::Malformed("trailer line is not a header field"));
                }
                at += nl + 1;
                if empty {
                    return Ok((Step::End, at));
                }
                *chunk = Chunk::Trailers(seen + nl + 1);
            }
        }
    }
}

/// Takes the next data frame of a body framed by `state` out of the buffered bytes, consuming
/// framing bytes on the way: `Some` with a frame (after which `state` may be `Done`), `None` when
/// the body has ended (`state` is `Done`) or more bytes are needed. Frames are slices of `buf`.
/// Shared by response bodies (client half) and request bodies (server half).
fn next_frame(state: &mut State, buf: &mut BytesMut) -> Result<Option<Bytes>, Error> {
    match state {
        State::Done => Ok(None),
        State::Length(_) | State::UntilClose if buf.is_empty() => Ok(None),
        State::Length(rem) => {
            let n = (*rem).min(buf.len() as u64);
            *rem -= n;
            if *rem == 0 {
                *state = State::Done;
            }
            Ok(Some(buf.split_to(n as usize).freeze()))
        }
        State::UntilClose => Ok(Some(buf.split().freeze())),
        State::Chunked(chunk) => match chunk_step(chunk, buf)? {
            (Step::Data(n), used) => {
                buf.advance(used);
                let data = buf.split_to(n).freeze();
                // If the rest of the framing (the CRLF, the last chunk, trailers) is already here,
                // take it now: the end shows at once and the connection goes back without another
                // read. Anything else is left for the next call.
                let mut ahead = *chunk;
                if let Ok((Step::End, used)) = chunk_step(&mut ahead, buf) {
                    buf.advance(used);
                    *state = State::Done;
                }
                Ok(Some(data))
            }
            (Step::End, used) => {
                buf.advance(used);
                *state = State::Done;
                Ok(None)
            }
            (Step::NeedMore, used) => {
                buf.advance(used);
                Ok(None)
            }
        },
    }
}

/// A control byte other than HTAB.
fn is_ctl(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// `token ":" OWS field-value OWS` with no control bytes (RFC 9110 §5): a trailer line.
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = memchr(b':', line) else { return false };
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    colon > 0 && line[..colon].iter().all(tchar) && !line[colon + 1..].iter().any(|&b| is_ctl(b))
}

/// Parses `1*HEXDIG [ BWS ";" ext ] CR` (the LF is already cut off).
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let line = line.strip_suffix(b"\r").ok_or(Error::Malformed("chunk-size line not ended by CRLF"))?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(Error::Malformed("invalid chunk size"));
    }
    let rest = &line[digits..];
    if !rest.is_empty() && !matches!(rest.trim_ascii_start().first(), Some(b';')) {
        return Err(Error::Malformed("invalid chunk size"));
    }
    // Extensions are ignored, but must not smuggle control bytes (a bare CR, NUL).
    if rest.iter().any(|&b| is_ctl(b)) {
        return Err(Error::Malformed("control character in a chunk extension"));
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| Error::Malformed("invalid chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| Error::Malformed("invalid chunk size"))
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            match next_frame(&mut this.state, &mut conn.buf) {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(None) if this.state == State::Done => return Poll::Ready(None),
                Ok(None) => {}
                Err(e) => return this.fail(e),
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if this.state == State::UntilClose => {
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => return this.fail(Error::ClosedEarly),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.fail(Error::Read(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

pub mod server;

#[cfg(test)]
mod tests;
