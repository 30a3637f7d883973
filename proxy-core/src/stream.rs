//! The client side of a session: a byte stream (TCP in production, any
//! `AsyncRead + AsyncWrite` in tests and for embedders) with a buffered
//! prefix, plain or with TLS terminated by the proxy.
//!
//! The prefix holds bytes read ahead while deciding what a connection
//! starts with (a PROXY header, a direct TLS handshake): they are read
//! again before anything else, so no reader needs to peek at the socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A stream whose first bytes may already have been read into `prefix`.
#[derive(Debug)]
pub(crate) struct Prefixed<S> {
    prefix: BytesMut,
    io: S,
}

impl<S> Prefixed<S> {
    /// Whether no bytes are buffered.
    pub(crate) fn prefix_is_empty(&self) -> bool {
        self.prefix.is_empty()
    }

    /// The stream under the buffer.
    pub(crate) fn get_ref(&self) -> &S {
        &self.io
    }

    /// The stream under the buffer, to change.
    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }
}

impl<S: AsyncRead + Unpin> Prefixed<S> {
    pub(crate) fn new(io: S) -> Self {
        Prefixed {
            prefix: BytesMut::new(),
            io,
        }
    }

    /// Reads until at least `n` bytes are buffered, or the peer closes;
    /// returns the buffered bytes (possibly fewer than `n` at EOF). They are
    /// read again by the next reader.
    pub(crate) async fn fill(&mut self, n: usize) -> io::Result<&[u8]> {
        while self.prefix.len() < n {
            // Read what has arrived, as one read of the socket would: a
            // reader that checks what was sent together (SSLRequest and
            // anything after it) sees it all.
            self.prefix.reserve((n - self.prefix.len()).max(512));
            if self.io.read_buf(&mut self.prefix).await? == 0 {
                break;
            }
        }
        Ok(&self.prefix)
    }

    /// Takes the buffered bytes out.
    pub(crate) fn take_prefix(&mut self) -> BytesMut {
        std::mem::take(&mut self.prefix)
    }

    /// Drops `n` buffered bytes.
    pub(crate) fn consume(&mut self, n: usize) {
        self.prefix.advance(n.min(self.prefix.len()));
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A client connection. Starts as `Plain` and may be upgraded to `Tls` once
/// during the startup phase.
pub(crate) enum ClientStream<S = TcpStream> {
    Plain(Prefixed<S>),
    Tls(Box<TlsStream<Prefixed<S>>>),
    /// The connection was given up (a failed TLS upgrade).
    Closed,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientStream<S> {
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// Runs the TLS handshake on a plain connection.
    pub(crate) async fn upgrade(&mut self, acceptor: &TlsAcceptor) -> io::Result<()> {
        match std::mem::replace(self, ClientStream::Closed) {
            ClientStream::Plain(io) => {
                let tls = acceptor.accept(io).await?;
                *self = ClientStream::Tls(Box::new(tls));
                Ok(())
            }
            other => {
                *self = other;
                Err(io::Error::other("TLS was already negotiated"))
            }
        }
    }

    /// The ALPN protocol agreed in the TLS handshake, if any.
    pub(crate) fn alpn(&self) -> Option<&[u8]> {
        match self {
            ClientStream::Tls(t) => t.get_ref().1.alpn_protocol(),
            _ => None,
        }
    }

    /// The SNI server name the client sent, if any.
    pub(crate) fn server_name(&self) -> Option<&str> {
        match self {
            ClientStream::Tls(t) => t.get_ref().1.server_name(),
            _ => None,
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "client connection closed")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientStream::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ClientStream::Closed => Poll::Ready(Ok(())),
        }
    }
}

/// The proxy's connection to a server: plain TCP, or TLS to it
/// ([`crate::tls::BackendTls`]).
pub(crate) enum ServerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

macro_rules! server_io {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ServerStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            ServerStream::Tls(t) => {
                let $s = Pin::new(t.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        server_io!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        server_io!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        server_io!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerStream::Plain(s) => s.is_write_vectored(),
            ServerStream::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        server_io!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        server_io!(self, s => s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn prefixed_bytes_are_read_again_first() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"hello world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(b);
        assert_eq!(p.fill(3).await.unwrap().get(..3), Some(&b"hel"[..]));
        p.consume(1);
        let mut all = Vec::new();
        p.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"ello world");
    }
}
