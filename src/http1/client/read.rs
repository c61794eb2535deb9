//! Reading a response: the head (1xx answers skipped), its framing by RFC 9112 §6.3, and the
//! body, read straight from the backend connection.

use super::{Conn, Error};
use crate::http1::chunked::Chunk;
use crate::http1::framing::{self, next_frame, BodyState, ConnectionTokens};
use crate::http1::head::{Spans, KEEP_ALIVE};
use crate::http1::BoxError;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// Largest response head accepted.
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// Most response header fields accepted.
const MAX_HEADERS: usize = 128;

/// A parsed response head.
pub(super) struct Head {
    status: u16,
    version: Version,
    headers: HeaderMap,
    conn: ConnectionTokens,
}

/// Reads until a complete head is buffered. `Ok(None)` for a 1xx answer (consumed).
pub(super) fn poll_head(
    cx: &mut Context<'_>,
    conn: &mut Conn,
    answered: &mut bool,
) -> Poll<Result<Option<Head>, Error>> {
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
pub(super) fn parse_head(buf: &mut BytesMut) -> Result<Option<Option<Head>>, Error> {
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

impl Head {
    /// The response, with its body framed as RFC 9112 §6.3 says.
    pub(super) fn into_response(
        mut self,
        conn: Conn,
        head_only: bool,
        request_done: bool,
    ) -> Result<Response<Body>, Error> {
        let status = StatusCode::from_u16(self.status).map_err(|_| Error::Malformed("invalid status code"))?;
        if self.status == 101 {
            return Err(Error::Malformed("switched protocols without an upgrade request"));
        }
        let mut reusable = request_done && self.conn.persistent(self.version);
        let state = if head_only || self.status == 204 || self.status == 304 {
            BodyState::Done
        } else if let Some(te) = self.headers.get_all(header::TRANSFER_ENCODING).iter().next_back() {
            // Transfer-Encoding wins over Content-Length; a message with both is suspect, so the
            // length goes and the connection is not trusted again.
            let chunked = framing::codings(te.as_bytes()).chunked_last();
            if self.headers.remove(header::CONTENT_LENGTH).is_some() {
                reusable = false;
            }
            if chunked {
                BodyState::Chunked(Chunk::Size)
            } else {
                reusable = false;
                BodyState::UntilClose
            }
        } else if self.headers.contains_key(header::CONTENT_LENGTH) {
            let fields = self.headers.get_all(header::CONTENT_LENGTH).iter().map(HeaderValue::as_bytes);
            match framing::list_length(fields) {
                Ok(Some(0)) => BodyState::Done,
                Ok(Some(n)) => BodyState::Length(n),
                _ => return Err(Error::Malformed("invalid or conflicting Content-Length")),
            }
        } else {
            reusable = false;
            BodyState::UntilClose
        };
        let mut resp = Response::new(Body { conn: Some(conn), state, reusable });
        *resp.status_mut() = status;
        *resp.version_mut() = self.version;
        *resp.headers_mut() = self.headers;
        Ok(resp)
    }
}

/// The response body, read straight from the backend connection.
pub struct Body {
    conn: Option<Conn>,
    state: BodyState,
    reusable: bool,
}

impl Body {
    /// The connection, once the body has ended cleanly and it may carry another request.
    pub fn take_reusable(&mut self) -> Option<Conn> {
        let reusable =
            self.state == BodyState::Done && self.reusable && self.conn.as_ref().is_some_and(|c| c.buf.is_empty());
        if reusable {
            self.conn.take()
        } else {
            None
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = BodyState::Done;
        self.reusable = false;
        self.conn = None;
        Poll::Ready(Some(Err(Box::new(e))))
    }
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
                Ok(None) if this.state == BodyState::Done => return Poll::Ready(None),
                Ok(None) => {}
                Err(e) => return this.fail(e.into()),
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if this.state == BodyState::UntilClose => {
                    this.state = BodyState::Done;
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
        self.state == BodyState::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Done => SizeHint::with_exact(0),
            BodyState::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}
