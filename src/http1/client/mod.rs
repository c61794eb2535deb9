//! The HTTP/1.1 client half: writes one request on a backend connection and reads the response,
//! on the task of the client connection that asked for it.
//!
//! hyper's client runs every connection as a task of its own and talks to it over channels, so
//! each exchange costs two task hops and several moves of the request and response. Here the
//! request future, and then the response body, drive the socket themselves.
//!
//! This module owns request framing ([`write`]: the request's Content-Length, or chunked when
//! the length is unknown); response framing by RFC 9112 §6.3 ([`read`]: no body,
//! Content-Length, chunked, or until close); skipping 1xx answers; refusing malformed or
//! ambiguous responses (invalid or conflicting Content-Length, oversized heads, broken chunks);
//! and deciding whether the connection may carry another request. It is generic over the
//! request body, knows nothing of backends or pools, and leaves timeouts to the caller.

mod read;
mod write;

pub use read::Body;

use super::chunked::Malformed;
use super::BoxError;
use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response};
use std::future::poll_fn;
use std::io;
use std::task::{ready, Context, Poll};
use tokio::net::TcpStream;
use write::Writer;

/// A backend socket: plain TCP or TLS over it (an enum, so the plain case pays no dispatch).
pub type Io = tokio_util::either::Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

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

impl From<Malformed> for Error {
    fn from(m: Malformed) -> Self {
        Error::Malformed(m.0)
    }
}

/// One connection to a backend.
pub struct Conn {
    io: Io,
    /// Bytes read and not yet handed on.
    buf: BytesMut,
    /// The request being written (its allocation is reused).
    out: Vec<u8>,
    /// Whether it carried an exchange before.
    reused: bool,
}

impl Conn {
    pub fn new(io: Io) -> Self {
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

    /// Gives its buffers back to the allocator while it waits (a connection kept for the control
    /// plane's next check holds none in between); nothing unread is dropped.
    pub fn release_buffers(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        self.out = Vec::new();
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        super::poll_read_more(&mut self.io, &mut self.buf, cx)
    }
}

/// A failed exchange. `request` comes back when it may be sent again on another connection:
/// nothing of it was written, or the connection was a reused one that the backend had closed
/// (`stale`) and the request is idempotent with no body consumed.
pub struct Failed<B> {
    pub error: Error,
    pub request: Option<Request<B>>,
    pub stale: bool,
}

/// Writes `req` on `conn`, its head followed by `extra` (header fields in wire form, see
/// [`super::ExtraFields`]), and reads the response head. The response body then reads from the
/// connection itself and hands it back at its end if it may carry another request.
pub async fn exchange<B>(mut conn: Conn, req: Request<B>, extra: &[u8]) -> Result<Response<Body>, Failed<B>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (parts, mut body) = req.into_parts();
    let framing = match write::encode_head(&mut conn.out, &parts, extra, &body) {
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
            match ready!(read::poll_head(cx, &mut conn, &mut answered)) {
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

#[cfg(test)]
mod tests;
