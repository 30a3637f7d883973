//! The backend half of session setup: connect with a timeout, send the
//! startup message, and relay authentication untouched until the first
//! ReadyForQuery. The proxy never sees a password in the clear; SCRAM runs
//! end to end between client and server. BackendKeyData is captured on the
//! way for cancel routing.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use bytes::{BufMut, Bytes, BytesMut};
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Duration, Instant};

use crate::error::SessionError;
use crate::protocol::{
    self, parse_message, MessageTracker, Side, StartupMessage, AUTH_REQ_OK,
    MAX_AUTH_MESSAGE_LENGTH, MAX_CANCEL_KEY_LENGTH, PROTOCOL_NEWEST_MINOR,
};

/// The largest server message accepted before ReadyForQuery. Startup
/// messages (authentication, ParameterStatus, notices) are small.
const MAX_BACKEND_STARTUP_MESSAGE: usize = 1 << 20;

/// Socket options applied to both sides of every session.
#[derive(Debug, Clone, Copy)]
pub struct SocketOptions {
    /// TCP keepalive idle time and probe interval; `None` leaves the OS default.
    pub keepalive: Option<(Duration, Duration)>,
}

impl SocketOptions {
    pub fn apply(&self, s: &TcpStream) -> io::Result<()> {
        s.set_nodelay(true)?;
        if let Some((idle, interval)) = self.keepalive {
            let ka = TcpKeepalive::new().with_time(idle).with_interval(interval);
            SockRef::from(s).set_tcp_keepalive(&ka)?;
        }
        Ok(())
    }
}

/// Connects to `addr` (`host:port`) within `limit`.
pub async fn connect(
    addr: &str,
    limit: Duration,
    opts: &SocketOptions,
) -> Result<TcpStream, SessionError> {
    let s = match timeout(limit, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(SessionError::BackendConnectTimeout {
                addr: addr.to_owned(),
                timeout: limit,
            })
        }
        Ok(Err(source)) => {
            return Err(SessionError::BackendConnect {
                addr: addr.to_owned(),
                source,
            })
        }
        Ok(Ok(s)) => s,
    };
    opts.apply(&s)
        .map_err(|source| SessionError::BackendConnect {
            addr: addr.to_owned(),
            source,
        })?;
    Ok(s)
}

/// Asks the server at `addr` for TLS (an SSLRequest) on `s` and runs the
/// handshake, checking its certificate as `tls` says, within `limit`.
pub(crate) async fn secure(
    mut s: TcpStream,
    addr: &str,
    tls: &crate::tls::BackendTls,
    limit: Duration,
) -> Result<crate::stream::ServerStream, SessionError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let failed = |detail: String| SessionError::BackendTls {
        addr: addr.to_owned(),
        detail,
    };
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| failed(format!("{host:?} is not a name TLS can check: {e}")))?;
    let handshake = async {
        // SSLRequest: length 8, code 1234.5679.
        s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .map_err(|e| failed(format!("sending the SSLRequest: {e}")))?;
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer)
            .await
            .map_err(|e| failed(format!("reading the answer to the SSLRequest: {e}")))?;
        match answer[0] {
            b'S' => {}
            b'N' => {
                return Err(failed(
                    "the server does not accept TLS (ssl = off), and the proxy requires it (--backend-tls)"
                        .into(),
                ))
            }
            b => return Err(failed(format!("unexpected answer {b:#04x} to the SSLRequest"))),
        }
        let t = tls
            .connector
            .connect(name, s)
            .await
            .map_err(|e| failed(format!("TLS handshake ({}): {e}", tls.mode.as_str())))?;
        Ok(crate::stream::ServerStream::Tls(Box::new(t)))
    };
    match timeout(limit, handshake).await {
        Ok(r) => r,
        Err(_) => Err(failed(format!("no TLS handshake within {limit:?}"))),
    }
}

/// A session whose backend has sent its first ReadyForQuery.
#[derive(Debug)]
pub struct Established {
    /// BackendKeyData: process id and secret key (4 bytes, or up to 256 in
    /// protocol 3.2).
    pub cancel_key: Option<(u32, Bytes)>,
    /// Bytes the client sent during authentication beyond what the backend
    /// asked for; they go to the backend before forwarding starts.
    pub to_backend: BytesMut,
    /// Where the server stream stands after the messages relayed so far.
    pub tracker: MessageTracker,
    /// The last messages for the client, up to and including the first
    /// ReadyForQuery, not yet written: the caller records the cancel key
    /// first, so that a cancel sent as soon as the client is ready finds it.
    pub to_client: BytesMut,
}

/// How authentication ended.
#[derive(Debug)]
pub enum AuthResult {
    Ready(Established),
    /// The server sent an ErrorResponse (wrong password, unknown database,
    /// too many connections...). It has been relayed to the client.
    Refused,
    /// The server was not ready, and nothing has reached the client: the
    /// session may try again.
    NotReady(NotReady),
}

/// How a server that was not ready turned the session away.
#[derive(Debug)]
pub enum NotReady {
    /// It answered the startup message with 57P03 (starting up, shutting
    /// down, not yet accepting connections): what the client would have
    /// been sent.
    Refused(BytesMut),
    /// It closed the connection, or reset it, before answering (a server
    /// killed while the connection was in its listen backlog).
    Closed(SessionError),
}

/// A protocol version negotiation the proxy owes the client: it asked for a
/// minor version or `_pq_` options the proxy does not speak, and the startup
/// message was rewritten to `minor` without those options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiation {
    pub minor: u16,
    pub unrecognized: Vec<Bytes>,
}

/// The startup message to send to the backend and, for a protocol version
/// the proxy does not speak, the negotiation owed to the client: 3.1 was
/// never used and goes to 3.0; anything newer than 3.2 goes to 3.2. The
/// protocol options (`_pq_.*`) are taken out and reported as unrecognised.
pub(crate) fn negotiate(message: &StartupMessage) -> (Bytes, Option<Negotiation>) {
    if message.minor == 0 || message.minor == PROTOCOL_NEWEST_MINOR {
        return (message.raw.clone(), None);
    }
    let minor = if message.minor > PROTOCOL_NEWEST_MINOR {
        PROTOCOL_NEWEST_MINOR
    } else {
        0
    };
    let is_option = |k: &[u8]| k.starts_with(b"_pq_.");
    let unrecognized = message
        .params
        .iter()
        .map(|(k, _)| k)
        .filter(|k| is_option(k))
        .cloned()
        .collect();
    let mut startup = BytesMut::new();
    protocol::encode_startup(&mut startup, minor, &message.params, is_option);
    (
        startup.freeze(),
        Some(Negotiation {
            minor,
            unrecognized,
        }),
    )
}

impl Negotiation {
    /// Writes the one NegotiateProtocolVersion the client receives, merged
    /// with the backend's own if it sent one (`backend_npv` is its body):
    /// the lower minor version and the union of unrecognised options.
    fn write(&self, out: &mut BytesMut, backend_npv: Option<&[u8]>) {
        let mut minor = self.minor;
        let mut options: Vec<&[u8]> = self.unrecognized.iter().map(|o| o.as_ref()).collect();
        if let Some(body) = backend_npv.filter(|b| b.len() >= 8) {
            minor = minor.min(u16::from_be_bytes([body[2], body[3]]));
            for t in body[8..].split(|&b| b == 0).filter(|s| !s.is_empty()) {
                if !options.contains(&t) {
                    options.push(t);
                }
            }
        }
        protocol::write_negotiate_protocol_version(out, minor, &options);
    }
}

/// What the session owes the client and needs of the server.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// A protocol negotiation owed to the client.
    pub negotiation: Option<Negotiation>,
    /// The server must be a standby (`true`) or the primary (`false`).
    pub want_standby: Option<bool>,
}

/// Relays the authentication exchange between `client` and `backend` until
/// the first ReadyForQuery or ErrorResponse. `startup` is written to the
/// backend first. The messages up to the first ReadyForQuery are returned
/// in [`Established::to_client`] for the caller to write. With a `negotiation`, the client gets exactly one
/// NegotiateProtocolVersion before anything else.
///
/// With `want_standby`, the server must be a standby (`true`) or a primary
/// (`false`), whatever the view said: it is checked at the first
/// ReadyForQuery, from the `in_hot_standby` ParameterStatus (PostgreSQL 14
/// and later) or else with `SELECT pg_is_in_recovery()`, before anything
/// after authentication reaches the client.
///
/// Not cancel-safe: a dropped future leaves both connections mid-exchange;
/// the caller closes them. The deadline is applied inside, per read.
#[allow(clippy::too_many_arguments)]
pub async fn authenticate<C, B>(
    client: &mut C,
    backend: &mut B,
    addr: &str,
    startup: &[u8],
    expect: Expect,
    deadline: Instant,
    limit: Duration,
    relayed: &AtomicBool,
) -> Result<AuthResult, SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    // `relayed`: whether the client has been sent anything, or the server
    // may have run what the client sent. Until then a refusal, a server
    // that closed the connection, or a fence that fired (the caller drops
    // this future) can be tried again without the client knowing.
    let r = relay_authentication(
        client, backend, addr, startup, expect, deadline, limit, relayed,
    )
    .await;
    match r {
        Err(e @ SessionError::BackendIo { .. }) if !relayed.load(Relaxed) => {
            Ok(AuthResult::NotReady(NotReady::Closed(e)))
        }
        r => r,
    }
}

#[allow(clippy::too_many_arguments)]
async fn relay_authentication<C, B>(
    client: &mut C,
    backend: &mut B,
    addr: &str,
    startup: &[u8],
    expect: Expect,
    deadline: Instant,
    limit: Duration,
    relayed: &AtomicBool,
) -> Result<AuthResult, SessionError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let backend_err = |source: io::Error| SessionError::BackendIo {
        addr: addr.to_owned(),
        source,
    };
    let timed_out = || SessionError::AuthTimeout {
        addr: addr.to_owned(),
        timeout: limit,
    };
    let Expect {
        mut negotiation,
        want_standby,
    } = expect;
    backend.write_all(startup).await.map_err(backend_err)?;

    let mut from_backend = BytesMut::with_capacity(1024);
    let mut to_client = BytesMut::with_capacity(1024);
    let mut from_client = BytesMut::new();
    let mut cancel_key = None;
    let mut hot_standby: Option<bool> = None;
    loop {
        while let Some((tag, body)) = parse_message(
            &mut from_backend,
            MAX_BACKEND_STARTUP_MESSAGE,
            Side::Backend,
        )? {
            if let Some(n) = negotiation.take() {
                if tag == b'v' {
                    n.write(&mut to_client, Some(&body));
                    continue;
                }
                n.write(&mut to_client, None);
            }
            to_client.put_u8(tag);
            to_client.put_u32(body.len() as u32 + 4);
            to_client.put_slice(&body);
            match tag {
                b'R' => {
                    let code = body
                        .get(..4)
                        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                    match code {
                        Some(AUTH_REQ_OK) => {}
                        Some(c) if protocol::auth_needs_reply(c) => {
                            relayed.store(true, Relaxed);
                            client
                                .write_all(&to_client)
                                .await
                                .map_err(SessionError::ClientIo)?;
                            to_client.clear();
                            let reply =
                                read_client_message(client, &mut from_client, deadline, limit)
                                    .await?;
                            backend.write_all(&reply).await.map_err(backend_err)?;
                        }
                        _ => {}
                    }
                }
                b'S' if body.starts_with(b"in_hot_standby\0") => {
                    hot_standby = Some(&body[b"in_hot_standby\0".len()..] == b"on\0");
                }
                b'K' if body.len() >= 8 && body.len() <= 4 + MAX_CANCEL_KEY_LENGTH => {
                    let pid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    cancel_key = Some((pid, Bytes::copy_from_slice(&body[4..])));
                }
                b'E' => {
                    // Before anything was relayed the server has run
                    // nothing and the client seen nothing: a server not
                    // accepting yet (57P03), or ending the session because
                    // it is going down (57P01: its postmaster died, or a
                    // shutdown; 57P02: a crash restart) is tried again.
                    let retry = matches!(
                        protocol::error_code(&body),
                        Some(b"57P03" | b"57P01" | b"57P02")
                    );
                    if !relayed.load(Relaxed) && retry {
                        return Ok(AuthResult::NotReady(NotReady::Refused(to_client)));
                    }
                    client
                        .write_all(&to_client)
                        .await
                        .map_err(SessionError::ClientIo)?;
                    let _ = client.flush().await;
                    return Ok(AuthResult::Refused);
                }
                b'Z' => {
                    // From here the server may run what the client sent
                    // after its startup message: not to be tried again.
                    relayed.store(true, Relaxed);
                    if let Some(want) = want_standby {
                        let is_standby = match hot_standby {
                            Some(s) => s,
                            None => query_in_recovery(
                                backend,
                                &mut from_backend,
                                &mut to_client,
                                deadline,
                            )
                            .await
                            .map_err(|e| match e {
                                Some(source) => backend_err(source),
                                None => timed_out(),
                            })?,
                        };
                        if is_standby != want {
                            return Err(SessionError::WrongServerRole {
                                addr: addr.to_owned(),
                                is_standby,
                            });
                        }
                    }
                    // Anything the server sent after ReadyForQuery belongs to
                    // the forwarded stream; the tracker must see it.
                    let mut tracker = MessageTracker::after_ready();
                    tracker.observe(&from_backend);
                    to_client.put_slice(&from_backend);
                    return Ok(AuthResult::Ready(Established {
                        cancel_key,
                        to_backend: from_client,
                        tracker,
                        to_client,
                    }));
                }
                _ => {}
            }
        }
        let n = timeout_at(deadline, backend.read_buf(&mut from_backend))
            .await
            .map_err(|_| timed_out())?
            .map_err(backend_err)?;
        if n == 0 {
            return Err(backend_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection during authentication",
            )));
        }
    }
}

/// Asks a server without the `in_hot_standby` parameter (before
/// PostgreSQL 14) whether it is in recovery, right after its first
/// ReadyForQuery. Messages the server sent unasked meanwhile go to the
/// client; the query's own replies do not. `Err(None)` is a timeout.
async fn query_in_recovery<B>(
    backend: &mut B,
    from_backend: &mut BytesMut,
    to_client: &mut BytesMut,
    deadline: Instant,
) -> Result<bool, Option<io::Error>>
where
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    const SQL: &[u8] = b"SELECT pg_catalog.pg_is_in_recovery()\0";
    let mut q = BytesMut::with_capacity(5 + SQL.len());
    q.put_u8(b'Q');
    q.put_u32(4 + SQL.len() as u32);
    q.put_slice(SQL);
    backend.write_all(&q).await.map_err(Some)?;
    let bad = |what: &str| Some(io::Error::new(io::ErrorKind::InvalidData, what.to_owned()));
    let mut answer = None;
    loop {
        while let Some((tag, body)) =
            parse_message(from_backend, MAX_BACKEND_STARTUP_MESSAGE, Side::Backend)
                .map_err(|e| bad(&e.to_string()))?
        {
            match tag {
                b'T' | b'C' => {}
                // DataRow: 1 column, its length, "t" or "f".
                b'D' => answer = Some(body.len() == 7 && body[6] == b't'),
                b'E' => return Err(bad("the server refused SELECT pg_is_in_recovery()")),
                b'Z' => return answer.ok_or_else(|| bad("no answer to pg_is_in_recovery()")),
                _ => {
                    to_client.put_u8(tag);
                    to_client.put_u32(body.len() as u32 + 4);
                    to_client.put_slice(&body);
                }
            }
        }
        match timeout_at(deadline, backend.read_buf(from_backend)).await {
            Err(_) => return Err(None),
            Ok(Err(e)) => return Err(Some(e)),
            Ok(Ok(0)) => return Err(bad("the server closed the connection")),
            Ok(Ok(_)) => {}
        }
    }
}

/// Reads one whole message from the client during authentication and returns
/// its bytes, header included.
async fn read_client_message<C>(
    client: &mut C,
    buf: &mut BytesMut,
    deadline: Instant,
    limit: Duration,
) -> Result<Bytes, SessionError>
where
    C: AsyncRead + Unpin + ?Sized,
{
    loop {
        if buf.len() >= protocol::HEADER_LEN {
            let h = protocol::decode_header(
                [buf[0], buf[1], buf[2], buf[3], buf[4]],
                MAX_AUTH_MESSAGE_LENGTH,
                Side::Client,
            )?;
            let total = protocol::HEADER_LEN + h.body_len;
            if buf.len() >= total {
                return Ok(buf.split_to(total).freeze());
            }
            buf.reserve(total - buf.len());
        }
        let n = timeout_at(deadline, client.read_buf(buf))
            .await
            .map_err(|_| SessionError::StartupTimeout(limit))?
            .map_err(SessionError::ClientIo)?;
        if n == 0 {
            return Err(SessionError::ClientGone);
        }
    }
}
