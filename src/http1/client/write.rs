//! Writing a request: the head with the body's framing header, then the body, a bounded batch
//! of frames per write.

use super::{Conn, Error};
use crate::http1::chunked::{write_chunk, LAST_CHUNK};
use crate::http1::framing::parse_length;
use crate::http1::head::{put_content_length, put_field};
use crate::http1::{BoxError, COALESCE};
use bytes::Bytes;
use http::header;
use http::Method;
use http_body::Frame;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::AsyncWrite;

/// How the request body goes on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum ReqFraming {
    None,
    Length(u64),
    Chunked,
}

/// Serialises the request line and headers into `out`, then `extra` (fields already in wire
/// form), adding the body's framing header.
pub(super) fn encode_head<B: http_body::Body>(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    extra: &[u8],
    body: &B,
) -> Result<ReqFraming, Error> {
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
            let n = parse_length(value.as_bytes());
            declared = Some(n.ok_or(Error::RequestBody("invalid Content-Length".into()))?);
        }
        put_field(out, name, value);
    }
    out.extend_from_slice(extra);
    let framing = if body.is_end_stream() {
        if declared.is_none() && matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        ReqFraming::None
    } else if let Some(n) = declared {
        ReqFraming::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        put_content_length(out, n);
        ReqFraming::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        ReqFraming::Chunked
    };
    out.extend_from_slice(b"\r\n");
    Ok(framing)
}

/// Writes the head and streams the request body, a bounded batch of frames per write.
pub(super) struct Writer {
    framing: ReqFraming,
    /// Bytes of `out` already written.
    written: usize,
    flushed: bool,
    pub(super) sent_any: bool,
    /// A body frame was taken (the body can no longer be sent again as it is).
    pub(super) body_polled: bool,
    body_done: bool,
    seen: u64,
}

impl Writer {
    pub(super) fn new(framing: ReqFraming) -> Self {
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

    pub(super) fn finished(&self, conn: &Conn) -> bool {
        self.body_done && self.written == conn.out.len() && self.flushed
    }

    pub(super) fn poll<B>(&mut self, cx: &mut Context<'_>, conn: &mut Conn, body: &mut B) -> Poll<Result<(), Error>>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        loop {
            // Gather what the body has ready, up to a batch.
            while !self.body_done && conn.out.len() - self.written < COALESCE {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Pending => break,
                    Poll::Ready(None) => self.end_body(&mut conn.out)?,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Error::RequestBody(e.into()))),
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

    pub(super) fn frame(&mut self, out: &mut Vec<u8>, frame: Frame<Bytes>) -> Result<(), Error> {
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
                    ReqFraming::Chunked => write_chunk(out, &data),
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

    pub(super) fn end_body(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        match self.framing {
            ReqFraming::Chunked => out.extend_from_slice(LAST_CHUNK),
            ReqFraming::Length(n) if self.seen != n => {
                return Err(Error::RequestBody("request body shorter than its Content-Length".into()))
            }
            _ => {}
        }
        self.body_done = true;
        Ok(())
    }
}
