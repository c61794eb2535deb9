//! Parsing a request head (httparse; header values are slices of the read buffer) and its
//! framing by RFC 9112 §6.3: Content-Length, chunked, or none. Transfer-Encoding with
//! Content-Length, or two Content-Lengths, is flagged for the handler to refuse.

use crate::http1::framing::{self, Codings, ConnectionTokens};
use crate::http1::head::{offsets, Spans, KEEP_ALIVE};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};
use std::mem::MaybeUninit;

/// Most request header fields accepted (more is 431).
const MAX_HEADERS: usize = 256;
/// The longest request target kept (the `http` crate's limit for a URI).
pub(super) const MAX_TARGET: u32 = u16::MAX as u32 - 1;

/// A parsed request head and what the connection needs to know about it.
pub(super) struct Head {
    pub(super) request: http::request::Parts,
    pub(super) body: BodyKind,
    /// The client asked to close after this request (or is HTTP/1.0 without keep-alive).
    pub(super) close: bool,
    /// HTTP/1.0 with `Connection: keep-alive`: the answer must say so.
    pub(super) keep_alive_10: bool,
    pub(super) expect_continue: bool,
    /// Ambiguous framing: the handler refuses it and the connection closes.
    pub(super) suspicious: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BodyKind {
    None,
    Length(u64),
    Chunked,
}

/// Why a request head was refused before it reached the handler.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HeadError {
    TooLarge,
    Bad(&'static str),
    /// Well-formed, but asks for something the gateway does not do (501).
    Unsupported(&'static str),
    /// A request target longer than a URI can be here (414).
    TargetTooLong,
}

/// What the framing fields of a head said, as they were read.
#[derive(Default)]
struct Fields {
    /// Content-Length fields, and the last one's value.
    lengths: u32,
    length: Option<u64>,
    /// Transfer-Encoding fields, and whether the last one was chunked alone.
    te: u32,
    chunked: bool,
    hosts: u32,
    conn: ConnectionTokens,
    expect_continue: bool,
}

/// Parses a request head at the front of `buf`, consuming it. `None` while incomplete.
pub(super) fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, HeadError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Bad("malformed request head")),
    };
    let method =
        Method::from_bytes(req.method.unwrap_or("").as_bytes()).map_err(|_| HeadError::Bad("invalid method"))?;
    let version = if req.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // Offsets into the head, so that the target, names and values are read from it once frozen.
    let target = offsets(&buf[..len], req.path.unwrap_or("").as_bytes())
        .filter(|(start, end)| end > start)
        .ok_or(HeadError::Bad("malformed request head"))?;
    if target.1 - target.0 > MAX_TARGET {
        return Err(HeadError::TargetTooLong);
    }
    let spans = Spans::of(&buf[..len], req.headers).ok_or(HeadError::Bad("malformed request head"))?;
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.0 as usize..target.1 as usize))
        .map_err(|_| HeadError::Bad("invalid request target"))?;
    let (headers, fields) = read_fields(&head, &spans)?;
    // RFC 9112 §3.2: exactly one Host in HTTP/1.1 (a target in absolute form names the host
    // itself), at most one in HTTP/1.0.
    if fields.hosts > 1 || (fields.hosts == 0 && version == Version::HTTP_11 && uri.authority().is_none()) {
        return Err(HeadError::Bad("an HTTP/1.1 request needs exactly one Host"));
    }
    // RFC 9112 §6.3: Transfer-Encoding wins, but a request with both, or with two lengths, is a
    // smuggling shape: it is refused (by the handler, which counts and logs it).
    let suspicious = fields.lengths > 1 || (fields.te > 0 && fields.lengths > 0);
    let body = if suspicious { BodyKind::None } else { body_kind(&fields, version)? };
    let conn = fields.conn;
    let close = if version == Version::HTTP_10 { !conn.keep_alive || conn.close } else { conn.close };
    let mut request = Request::new(()).into_parts().0;
    request.method = method;
    request.uri = uri;
    request.version = version;
    request.headers = headers;
    let keep_alive_10 = version == Version::HTTP_10 && !close;
    Ok(Some(Head { request, body, close, keep_alive_10, expect_continue: fields.expect_continue, suspicious }))
}

/// The header fields of a frozen head: the map the request carries (without the framing and
/// hop-by-hop fields the codec consumes) and what the framing fields said.
fn read_fields(head: &Bytes, spans: &Spans) -> Result<(HeaderMap, Fields), HeadError> {
    let mut headers = HeaderMap::with_capacity(spans.len + 8);
    let mut f = Fields::default();
    for &(ns, ne, vs, ve) in spans.as_slice() {
        let name = HeaderName::from_bytes(&head[ns as usize..ne as usize])
            .map_err(|_| HeadError::Bad("invalid header name"))?;
        let raw = &head[vs as usize..ve as usize];
        if name == header::CONTENT_LENGTH {
            f.lengths += 1;
            f.length = framing::parse_length(raw);
        } else if name == header::TRANSFER_ENCODING {
            // The body's framing is ours to decode; the field does not go upstream.
            f.te += 1;
            f.chunked = chunked_alone(raw)?;
            continue;
        } else if name == header::CONNECTION {
            // Read here, and left out when it holds only close/keep-alive (nothing else to strip).
            if f.conn.read(raw) {
                continue;
            }
        } else if name == KEEP_ALIVE {
            continue;
        } else if name == header::HOST {
            f.hosts += 1;
        } else if name == header::EXPECT && raw.eq_ignore_ascii_case(b"100-continue") {
            f.expect_continue = true;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
            .map_err(|_| HeadError::Bad("invalid header value"))?;
        headers.append(name, value);
    }
    Ok((headers, f))
}

/// The body's framing, for a head without a smuggling shape.
fn body_kind(f: &Fields, version: Version) -> Result<BodyKind, HeadError> {
    if f.te > 0 {
        // HTTP/1.0 has no chunked framing, so a Transfer-Encoding there is a framing fault
        // (RFC 9112 §6.1), as is a second Transfer-Encoding field.
        if version == Version::HTTP_10 {
            return Err(HeadError::Bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if f.te > 1 {
            return Err(HeadError::Bad("Transfer-Encoding twice"));
        }
        if !f.chunked {
            return Err(HeadError::Bad("Transfer-Encoding without chunked as the last coding"));
        }
        return Ok(BodyKind::Chunked);
    }
    match (f.lengths, f.length) {
        (0, _) => Ok(BodyKind::None),
        (_, None) => Err(HeadError::Bad("invalid Content-Length")),
        (_, Some(0)) => Ok(BodyKind::None),
        (_, Some(n)) => Ok(BodyKind::Length(n)),
    }
}

/// Whether a Transfer-Encoding value is chunked alone. Only that is decoded: chunked applied
/// twice is malformed (400); another coding before chunked would reach the backend still encoded
/// with nothing to say so, and is refused (501). A value not ending in chunked is `false`.
fn chunked_alone(raw: &[u8]) -> Result<bool, HeadError> {
    match framing::codings(raw) {
        Codings::Chunked => Ok(true),
        Codings::NotChunkedLast => Ok(false),
        Codings::ChunkedTwice => Err(HeadError::Bad("chunked applied more than once")),
        Codings::OtherBeforeChunked => {
            Err(HeadError::Unsupported("transfer codings other than chunked are not supported"))
        }
    }
}
