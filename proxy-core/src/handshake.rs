//! The client half of the startup phase: SSLRequest, GSSENCRequest,
//! CancelRequest and StartupMessage, read under a deadline and a length
//! limit, before any backend is involved.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Duration, Instant};
use tokio_rustls::TlsAcceptor;

use crate::error::SessionError;
use crate::protocol::{parse_startup, CancelRequest, ProtocolError, StartupMessage, StartupPacket};
use crate::stream::ClientStream;

/// The first byte of a TLS handshake record (ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// What the client wants once the startup phase is over.
#[derive(Debug)]
pub(crate) enum Startup {
    /// A session. `pipelined` holds bytes the client sent after the
    /// StartupMessage without waiting; they go to the backend after it.
    Session {
        message: StartupMessage,
        pipelined: BytesMut,
    },
    /// A request to cancel a query of another session.
    Cancel(CancelRequest),
}

/// Reads the startup phase. On error nothing has been written to the client
/// about it yet; the caller sends the ErrorResponse.
///
/// Not cancel-safe: bytes read so far live in a local buffer and are lost if
/// the future is dropped. Timeouts are therefore applied inside, per read.
pub(crate) async fn read_startup<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut ClientStream<S>,
    tls: Option<&TlsAcceptor>,
    deadline: Instant,
    limit: Duration,
) -> Result<Startup, SessionError> {
    let mut buf = BytesMut::with_capacity(512);
    let mut gss_answered = false;
    let mut ssl_answered = false;
    if let (ClientStream::Plain(io), Some(acceptor)) = (&mut *stream, tls) {
        // Direct TLS (PostgreSQL 17, `sslnegotiation=direct`): a TLS
        // handshake record instead of SSLRequest. A startup packet's first
        // byte is 0 (lengths are below 10000), so 0x16 cannot be one. The
        // byte stays buffered for whoever reads next.
        let first = timeout_at(deadline, io.fill(1))
            .await
            .map_err(|_| SessionError::StartupTimeout(limit))?
            .map_err(SessionError::ClientIo)?
            .first()
            .copied();
        let Some(first) = first else {
            return Err(SessionError::ClientGone);
        };
        if first == TLS_HANDSHAKE {
            timeout_at(deadline, stream.upgrade(acceptor))
                .await
                .map_err(|_| SessionError::StartupTimeout(limit))?
                .map_err(SessionError::ClientTls)?;
            // As PostgreSQL does: ALPN proves the client meant to speak
            // PostgreSQL over this TLS connection.
            if stream.alpn() != Some(b"postgresql".as_slice()) {
                return Err(SessionError::DirectTlsWithoutAlpn);
            }
            ssl_answered = true;
        }
    }
    // Bytes read ahead (PROXY header, direct TLS check) count as received
    // with the first packet: the SSLRequest injection check sees them.
    if let ClientStream::Plain(io) = stream {
        buf.extend_from_slice(&io.take_prefix());
    }
    loop {
        let packet = loop {
            if let Some(p) = parse_startup(&mut buf)? {
                break p;
            }
            let n = timeout_at(deadline, stream.read_buf(&mut buf))
                .await
                .map_err(|_| SessionError::StartupTimeout(limit))?
                .map_err(SessionError::ClientIo)?;
            if n == 0 {
                return Err(if buf.is_empty() {
                    SessionError::ClientGone
                } else {
                    ProtocolError::BadLayout("incomplete startup packet").into()
                });
            }
        };
        match packet {
            StartupPacket::SslRequest => {
                if ssl_answered || stream.is_tls() {
                    return Err(SessionError::RepeatedRequest("SSLRequest"));
                }
                ssl_answered = true;
                if !buf.is_empty() {
                    return Err(SessionError::SslInjection);
                }
                match tls {
                    Some(acceptor) => {
                        stream
                            .write_all(b"S")
                            .await
                            .map_err(SessionError::ClientIo)?;
                        timeout_at(deadline, stream.upgrade(acceptor))
                            .await
                            .map_err(|_| SessionError::StartupTimeout(limit))?
                            .map_err(SessionError::ClientTls)?;
                    }
                    None => stream
                        .write_all(b"N")
                        .await
                        .map_err(SessionError::ClientIo)?,
                }
            }
            StartupPacket::GssEncRequest => {
                if gss_answered || stream.is_tls() {
                    return Err(SessionError::RepeatedRequest("GSSENCRequest"));
                }
                gss_answered = true;
                if !buf.is_empty() {
                    return Err(SessionError::SslInjection);
                }
                stream
                    .write_all(b"N")
                    .await
                    .map_err(SessionError::ClientIo)?;
            }
            StartupPacket::Cancel(c) => return Ok(Startup::Cancel(c)),
            StartupPacket::Startup(message) => {
                return Ok(Startup::Session {
                    message,
                    pipelined: buf,
                })
            }
        }
    }
}
