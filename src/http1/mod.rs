//! The HTTP/1.1 codec: the client half ([`client`]: one request on a backend connection, the
//! response read back) and the server half ([`server`]: requests read from a client connection,
//! handed to a [`server::Handler`], responses written back), with the rules both share
//! ([`framing`]: Content-Length, transfer codings, `Connection` tokens, the body states; and
//! [`chunked`]: the chunked decoder and writer).
//!
//! It knows nothing of pools, routes or the proxy: the server calls a handler, the client is
//! generic over the request body. It never buffers a body (frames are slices of the read
//! buffer), never spawns a task and never locks.

pub mod chunked;
pub mod client;
pub mod framing;
mod head;
pub mod server;

pub use head::{ExtraFields, KEEP_ALIVE};

use bytes::BytesMut;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncRead;

/// A body error, as `http_body` bodies of the data path carry it.
pub use crate::error::BoxError;

/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;
/// Body bytes gathered into one write (with the head, when they are already there).
const COALESCE: usize = 16 * 1024;

/// A request whose framing was ambiguous (Content-Length with Transfer-Encoding, or two
/// Content-Lengths): the server half marks it with this extension, and the connection closes
/// after it. The handler refuses it (and counts it) rather than guessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmbiguousFraming;

/// Reads more of `io` into `buf`, growing it by [`READ_CHUNK`] when less than 1 KiB is free.
fn poll_read_more<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}
