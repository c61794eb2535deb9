//! A request body read from the client connection: whole when it came with the head, else
//! streamed from the socket by the body itself, which borrows the connection's read side and
//! hands it back at its end.

use super::socket::ReadIo;
use super::CONTINUE;
use crate::downstream::ConnShared;
use crate::http1::framing::{next_frame, BodyState};
use crate::http1::BoxError;
use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::sync::oneshot;

/// The client socket's read side and the bytes read from it but not yet consumed. It travels
/// into a request body that must stream from the socket, and comes back at the body's end.
pub struct Reader {
    pub(super) rd: ReadIo,
    pub(super) buf: BytesMut,
}

impl Reader {
    /// Reads more. With nothing buffered, waits for the socket to be readable before taking a
    /// buffer, so an idle connection holds none.
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if let (0, Some(tcp)) = (self.buf.capacity(), self.rd.tcp()) {
            ready!(tcp.poll_read_ready(cx))?;
        }
        crate::http1::poll_read_more(&mut self.rd, &mut self.buf, cx)
    }

    /// Gives the buffer back to the allocator when it holds nothing (plain TCP only: over TLS,
    /// only a read can tell whether data is waiting, and a read needs the buffer).
    pub(super) fn release_if_empty(&mut self) {
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
pub struct Body(pub(super) Inner);

pub(super) enum Inner {
    /// The whole body (or none), already read with the head.
    Full(Option<Bytes>),
    /// A body still arriving: it reads from the socket itself.
    Stream(Stream),
}

pub(super) struct Stream {
    pub(super) reader: Option<Reader>,
    pub(super) framing: BodyState,
    /// Where the reader goes once the body has ended cleanly.
    pub(super) back: Option<oneshot::Sender<Reader>>,
    /// `Expect: 100-continue` still to be answered (when the body is first waited for).
    pub(super) expect_continue: bool,
    pub(super) shared: Arc<ConnShared>,
}

impl Body {
    pub(super) fn full(bytes: Option<Bytes>) -> Self {
        Body(Inner::Full(bytes.filter(|b| !b.is_empty())))
    }
}

impl Stream {
    /// The body has ended: the reader goes back to the connection.
    fn finish(&mut self) {
        self.framing = BodyState::Done;
        if let (Some(reader), Some(back)) = (self.reader.take(), self.back.take()) {
            let _ = back.send(reader);
        }
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.framing = BodyState::Done;
        self.reader = None;
        self.back = None;
        Poll::Ready(Some(Err(Box::new(e))))
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(reader) = self.reader.as_mut() else { return Poll::Ready(None) };
            match next_frame(&mut self.framing, &mut reader.buf) {
                Ok(frame) => {
                    if self.framing == BodyState::Done {
                        self.finish();
                    }
                    if let Some(data) = frame {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if self.framing == BodyState::Done {
                        return Poll::Ready(None);
                    }
                }
                Err(m) => return self.fail(BodyError::Malformed(m.0)),
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
            Inner::Stream(s) => s.framing == BodyState::Done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Stream(Stream { framing: BodyState::Length(n), .. }) => SizeHint::with_exact(*n),
            Inner::Stream(Stream { framing: BodyState::Done, .. }) => SizeHint::with_exact(0),
            Inner::Stream(_) => SizeHint::default(),
        }
    }
}
