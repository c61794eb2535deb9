//! The two halves of a client socket as the server codec uses them: plain TCP (split without a
//! lock) or TLS (split by tokio, whose halves share the stream behind a per-connection lock that
//! only this connection's task takes in practice).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

pub type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// A client socket to serve: the halves of either kind.
pub fn split_tcp(stream: TcpStream) -> (ReadIo, WriteIo) {
    let (rd, wr) = stream.into_split();
    (ReadIo::Tcp(rd), WriteIo::Tcp(wr))
}

pub fn split_tls(stream: TlsStream) -> (ReadIo, WriteIo) {
    let (rd, wr) = tokio::io::split(stream);
    (ReadIo::Tls(rd), WriteIo::Tls(wr))
}

pub enum ReadIo {
    Tcp(OwnedReadHalf),
    Tls(ReadHalf<TlsStream>),
}

pub enum WriteIo {
    Tcp(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream>),
}

impl ReadIo {
    /// The TCP socket, when nothing sits between it and the codec.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            ReadIo::Tcp(rd) => Some(rd.as_ref()),
            ReadIo::Tls(_) => None,
        }
    }
}

impl WriteIo {
    /// The TCP socket, when nothing sits between it and the codec.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            WriteIo::Tcp(wr) => Some(wr.as_ref()),
            WriteIo::Tls(_) => None,
        }
    }
}

impl AsyncRead for ReadIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadIo::Tcp(rd) => Pin::new(rd).poll_read(cx, buf),
            ReadIo::Tls(rd) => Pin::new(rd).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteIo::Tcp(wr) => Pin::new(wr).poll_write(cx, buf),
            WriteIo::Tls(wr) => Pin::new(wr).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteIo::Tcp(wr) => Pin::new(wr).poll_flush(cx),
            WriteIo::Tls(wr) => Pin::new(wr).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteIo::Tcp(wr) => Pin::new(wr).poll_shutdown(cx),
            WriteIo::Tls(wr) => Pin::new(wr).poll_shutdown(cx),
        }
    }
}
