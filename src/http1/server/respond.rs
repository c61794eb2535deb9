//! Writing a response: its framing (the body's exact length, else chunked, else until close for
//! HTTP/1.0), `Date`, and the body as it comes, a bounded batch per write, with the send timeout
//! (a client that takes no response bytes is cut off) and an eye on a client that goes away.

use super::{Client, Conn, Handler};
use crate::clock::IdleTimeout;
use crate::http1::chunked::{write_chunk, LAST_CHUNK};
use crate::http1::framing::ConnectionTokens;
use crate::http1::head::{put_content_length, put_field};
use crate::http1::COALESCE;
use bytes::Bytes;
use http::header;
use http::{Method, Response, Version};
use http_body::Body as _;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;

/// How a response's body goes on the wire, and how far it got.
struct Sending {
    /// The exact length announced, if any.
    length: Option<u64>,
    chunked: bool,
    /// Bytes of the connection's `out` already written.
    written: usize,
    /// Body bytes taken from the body.
    sent: u64,
    done: bool,
    /// The body ended as announced (no error, no short or long body).
    clean: bool,
    flushed: bool,
    /// Armed only when the client stops taking bytes: a client that accepts nothing for
    /// `send_timeout` is cut off, releasing the backend slot its response holds.
    stalled: IdleTimeout,
}

impl Sending {
    /// Takes what the body has ready into `out`, up to a batch.
    fn gather<B>(&mut self, cx: &mut Context<'_>, mut body: Option<&mut B>, out: &mut Vec<u8>)
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        while !self.done && out.len() - self.written < COALESCE {
            let Some(b) = body.as_deref_mut() else { return self.end(out) };
            match Pin::new(&mut *b).poll_frame(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => self.end(out),
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "response body failed; closing the client connection");
                    self.done = true;
                    self.clean = false;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are dropped: HTTP/1.1 clients rarely ask for them.
                    if let Ok(data) = frame.into_data() {
                        if !self.data(&data, out) {
                            break;
                        }
                    }
                    if b.is_end_stream() {
                        self.end(out);
                    }
                }
            }
        }
    }

    /// Adds one data frame; false when it goes past the announced length (the body stops there).
    fn data(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        self.sent += data.len() as u64;
        if self.length.is_some_and(|n| self.sent > n) {
            self.done = true;
            self.clean = false;
            return false;
        }
        if self.chunked {
            write_chunk(out, data);
        } else {
            out.extend_from_slice(data);
        }
        true
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        self.done = true;
        if self.chunked {
            out.extend_from_slice(LAST_CHUNK);
        } else if self.length.is_some_and(|n| n != self.sent) {
            self.clean = false;
        }
    }
}

impl<H: Handler> Conn<H> {
    /// Writes `resp`; returns whether the connection may stay open.
    pub(super) async fn respond(
        &mut self,
        resp: Response<H::Body>,
        method: &Method,
        version: Version,
        close: bool,
        keep_alive_10: bool,
    ) -> io::Result<bool> {
        self.shared.responding.store(true, Ordering::Relaxed);
        let (parts, body) = resp.into_parts();
        let status = parts.status;
        let no_body = method == Method::HEAD || status.is_informational() || status == 204 || status == 304;
        let mut close = close || self.drain.flag.load(Ordering::Relaxed);
        // Framing: the body's exact length, else chunked (HTTP/1.1), else until close.
        let length = if no_body { None } else { body.size_hint().exact() };
        let chunked = !no_body && length.is_none() && version == Version::HTTP_11;
        close |= !no_body && length.is_none() && !chunked;
        let close = encode_head(&mut self.out, &parts, no_body, (length, chunked), close, keep_alive_10);
        let mut st = Sending {
            length,
            chunked,
            written: 0,
            sent: 0,
            done: no_body,
            clean: true,
            flushed: true,
            stalled: IdleTimeout::new(self.limits.send_timeout),
        };
        let result = if no_body {
            // Not polled: it goes (releasing what it holds) before the head is written.
            drop(body);
            poll_fn(|cx| self.poll_send(cx, &mut st, None)).await
        } else {
            let mut body = body;
            let result = poll_fn(|cx| self.poll_send(cx, &mut st, Some(&mut body))).await;
            drop(body);
            result
        };
        Ok(result? && !close)
    }

    /// Moves the response along: gathers body frames, writes them, and stops when all is
    /// written (whether the body ended cleanly), the client stalls past the send timeout, or
    /// the client goes away.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        st: &mut Sending,
        mut body: Option<&mut H::Body>,
    ) -> Poll<io::Result<bool>> {
        loop {
            st.gather(cx, body.as_deref_mut(), &mut self.out);
            let mut blocked = false;
            if st.written < self.out.len() {
                match Pin::new(&mut self.wr).poll_write(cx, &self.out[st.written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero))),
                    Poll::Ready(Ok(n)) => {
                        st.written += n;
                        st.flushed = false;
                        if st.written == self.out.len() {
                            self.out.clear();
                            st.written = 0;
                        }
                        st.stalled.touch();
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => blocked = true,
                }
            } else if !st.flushed {
                // A no-op over plain TCP; over TLS it pushes the encrypted records out.
                match Pin::new(&mut self.wr).poll_flush(cx) {
                    Poll::Ready(Ok(())) => st.flushed = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => blocked = true,
                }
            }
            if blocked && st.stalled.poll_expired(cx) {
                tracing::debug!(timeout = ?st.stalled.after(), "client took no response bytes; closing");
                self.shared.set_stalled();
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::TimedOut)));
            }
            if st.done && st.written == self.out.len() && st.flushed {
                return Poll::Ready(Ok(st.clean));
            }
            // Waiting for the body or the socket: notice a client that went away. A stream
            // waiting for its next event holds no client read buffer meanwhile.
            return match self.read.watch(cx) {
                Client::Gone => Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionReset))),
                Client::Present => {
                    if let Some(reader) = self.read.reader.as_mut() {
                        reader.release_if_empty();
                    }
                    Poll::Pending
                }
            };
        }
    }
}

/// Serialises the status line and headers into `out` (cleared first), with the framing and
/// connection fields; returns whether the connection closes after this response (the handler's
/// own `Connection: close` included).
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    no_body: bool,
    (length, chunked): (Option<u64>, bool),
    mut close: bool,
    keep_alive_10: bool,
) -> bool {
    let status = parts.status;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    for (name, value) in &parts.headers {
        if name == header::CONNECTION {
            let mut tokens = ConnectionTokens::default();
            tokens.read(value.as_bytes());
            close |= tokens.close;
            continue;
        }
        if !no_body && (name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING) {
            continue;
        }
        has_date |= name == header::DATE;
        put_field(out, name, value);
    }
    if let Some(n) = length {
        put_content_length(out, n);
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
    close
}

/// The `Date` header value, formatted once per second per thread.
pub(super) mod date {
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
