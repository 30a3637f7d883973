//! The PostgreSQL wire codec for the parts the proxy understands: the startup
//! phase sent by clients, the 5-byte message headers sent by servers, and the
//! few messages the proxy writes itself (ErrorResponse,
//! NegotiateProtocolVersion).
//!
//! Everything here is free of I/O. Parsers take `&mut BytesMut`, reserve only
//! the bytes still missing and hand out frames with `split_to().freeze()`.
//! Writers append to a `BytesMut` and fill in the length at the end. Every
//! length read off the wire is checked before anything is allocated from it.
//!
//! Wire constants cite where PostgreSQL defines them
//! (`src/include/libpq/pqcomm.h` unless noted otherwise).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// `MAX_STARTUP_PACKET_LENGTH` in pqcomm.h: the largest startup-phase packet,
/// length word included.
pub const MAX_STARTUP_PACKET_LENGTH: usize = 10_000;
/// The smallest startup-phase packet: the length word and a request code
/// (postmaster.c `ProcessStartupPacket` rejects `len < sizeof(ProtocolVersion)`).
pub const MIN_STARTUP_PACKET_LENGTH: usize = 8;
/// `CANCEL_REQUEST_CODE`, `PG_PROTOCOL(1234, 5678)`.
pub const CANCEL_REQUEST_CODE: u32 = (1234 << 16) | 5678;
/// `NEGOTIATE_SSL_CODE`, `PG_PROTOCOL(1234, 5679)`.
pub const NEGOTIATE_SSL_CODE: u32 = (1234 << 16) | 5679;
/// `NEGOTIATE_GSS_CODE`, `PG_PROTOCOL(1234, 5680)`.
pub const NEGOTIATE_GSS_CODE: u32 = (1234 << 16) | 5680;
/// The only protocol major version in use (`PG_PROTOCOL_MAJOR`).
pub const PROTOCOL_MAJOR: u16 = 3;
/// The newest minor version the proxy speaks (3.2, PostgreSQL 18).
pub const PROTOCOL_NEWEST_MINOR: u16 = 2;
/// Cancel keys are 4 bytes in protocol 3.0 and up to 256 bytes in 3.2
/// (`MAX_CANCEL_KEY_LENGTH` in PostgreSQL 18's `pqcomm.h`).
pub const MAX_CANCEL_KEY_LENGTH: usize = 256;
/// Every regular message after the startup packet starts with a type byte
/// and a 4-byte length that counts itself.
pub const HEADER_LEN: usize = 5;
/// PostgreSQL caps authentication messages from the client at
/// `PG_MAX_AUTH_TOKEN_LENGTH` (65535, `src/include/libpq/auth.h`).
pub const MAX_AUTH_MESSAGE_LENGTH: usize = 65_535;

/// A packet of the startup phase, as a client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// `SSLRequest`: the client asks for TLS.
    SslRequest,
    /// `GSSENCRequest`: the client asks for GSSAPI encryption.
    GssEncRequest,
    /// `CancelRequest` for a query running in another session.
    Cancel(CancelRequest),
    /// `StartupMessage`: the start of a session.
    Startup(StartupMessage),
}

/// A `CancelRequest`. The raw packet is kept so that it can be forwarded byte
/// for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRequest {
    pub pid: u32,
    /// The secret key: 4 bytes in protocol 3.0, up to 256 in 3.2.
    pub key: Bytes,
    pub raw: Bytes,
}

/// A `StartupMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    /// Parameters in the order the client sent them, as the client's bytes
    /// (slices of `raw`, without their NULs): PostgreSQL takes any bytes
    /// here, and a rebuilt startup message must carry them unchanged.
    pub params: Vec<(Bytes, Bytes)>,
    pub raw: Bytes,
}

impl StartupMessage {
    /// The value of a startup parameter, if the client sent it.
    pub fn param(&self, name: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .find(|(k, _)| k.as_ref() == name.as_bytes())
            .map(|(_, v)| v.as_ref())
    }

    /// The user the session is for (required by PostgreSQL), as bytes.
    pub fn user(&self) -> Option<&[u8]> {
        self.param("user")
    }

    /// The database; PostgreSQL defaults it to the user name.
    pub fn database(&self) -> Option<&[u8]> {
        self.param("database").or_else(|| self.user())
    }
}

/// Why a packet was refused. Each of these is a protocol violation (08P01).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error(
        "invalid length of startup packet ({0} bytes; the limit is {MAX_STARTUP_PACKET_LENGTH})"
    )]
    BadLength(i64),
    #[error("unsupported frontend protocol {0}.{1}: the proxy supports protocol 3.0 to 3.{PROTOCOL_NEWEST_MINOR}")]
    UnsupportedProtocol(u16, u16),
    #[error("invalid startup packet layout: {0}")]
    BadLayout(&'static str),
    #[error("invalid cancel request: key of {0} bytes")]
    BadCancelKey(usize),
    #[error("invalid message length {0} from the {1}")]
    BadMessageLength(i64, &'static str),
}

/// Reads one startup-phase packet.
///
/// Returns `Ok(None)` when more bytes are needed; the buffer then has room
/// reserved for the rest of the packet. Malformed packets are errors.
pub fn parse_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, ProtocolError> {
    if buf.len() < 4 {
        buf.reserve(4 - buf.len());
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let len_ok = usize::try_from(len)
        .ok()
        .filter(|l| (MIN_STARTUP_PACKET_LENGTH..=MAX_STARTUP_PACKET_LENGTH).contains(l));
    let Some(len) = len_ok else {
        return Err(ProtocolError::BadLength(len.into()));
    };
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let raw = buf.split_to(len).freeze();
    let code = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
    let packet = match code {
        NEGOTIATE_SSL_CODE if len == 8 => StartupPacket::SslRequest,
        NEGOTIATE_GSS_CODE if len == 8 => StartupPacket::GssEncRequest,
        NEGOTIATE_SSL_CODE | NEGOTIATE_GSS_CODE => {
            return Err(ProtocolError::BadLayout("encryption request with a body"))
        }
        CANCEL_REQUEST_CODE => {
            let key_len = len.saturating_sub(12);
            if len < 16 || key_len > MAX_CANCEL_KEY_LENGTH {
                return Err(ProtocolError::BadCancelKey(key_len));
            }
            let pid = u32::from_be_bytes([raw[8], raw[9], raw[10], raw[11]]);
            StartupPacket::Cancel(CancelRequest {
                pid,
                key: raw.slice(12..),
                raw,
            })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != PROTOCOL_MAJOR {
                return Err(ProtocolError::UnsupportedProtocol(major, minor));
            }
            let params = parse_params(&raw, 8)?;
            StartupPacket::Startup(StartupMessage {
                major,
                minor,
                params,
                raw,
            })
        }
    };
    Ok(Some(packet))
}

/// Parses the NUL-terminated name/value pairs of a StartupMessage from
/// `raw[at..]`, which end with one extra NUL. Names and values are slices of
/// `raw`.
fn parse_params(raw: &Bytes, mut at: usize) -> Result<Vec<(Bytes, Bytes)>, ProtocolError> {
    let mut params = Vec::new();
    loop {
        let Some(&first) = raw.get(at) else {
            return Err(ProtocolError::BadLayout("missing terminator"));
        };
        if first == 0 {
            if at + 1 != raw.len() {
                return Err(ProtocolError::BadLayout("bytes after the terminator"));
            }
            return Ok(params);
        }
        let name = take_cstr(raw, &mut at)?;
        let value = take_cstr(raw, &mut at)?;
        params.push((name, value));
    }
}

fn take_cstr(raw: &Bytes, at: &mut usize) -> Result<Bytes, ProtocolError> {
    let nul = raw[*at..]
        .iter()
        .position(|&b| b == 0)
        .ok_or(ProtocolError::BadLayout("unterminated string"))?;
    let s = raw.slice(*at..*at + nul);
    *at += nul + 1;
    Ok(s)
}

/// Builds a StartupMessage at another minor version from `params` (the
/// client's bytes, unchanged), without those `skip` selects. Used after a
/// `keelson.route` setting was taken out, and after NegotiateProtocolVersion
/// when the session continues at the version the proxy offered.
pub fn encode_startup(
    buf: &mut BytesMut,
    minor: u16,
    params: &[(Bytes, Bytes)],
    skip: impl Fn(&[u8]) -> bool,
) {
    let start = buf.len();
    buf.put_u32(0);
    buf.put_u16(PROTOCOL_MAJOR);
    buf.put_u16(minor);
    for (k, v) in params.iter().filter(|(k, _)| !skip(k)) {
        put_cbytes(buf, k);
        put_cbytes(buf, v);
    }
    buf.put_u8(0);
    fill_len(buf, start, start);
}

/// A NUL-terminated string of the client's bytes. A NUL inside one would
/// end it early on the server side; they come from the client's own
/// NUL-terminated strings, so they hold none.
fn put_cbytes(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

/// A NUL-terminated string the proxy writes itself (its messages hold no
/// NUL).
fn put_cstr(buf: &mut BytesMut, s: &str) {
    put_cbytes(buf, s.as_bytes());
}

/// Writes the length word at `len_at`, counting from `from` to the end.
fn fill_len(buf: &mut BytesMut, len_at: usize, from: usize) {
    let len = (buf.len() - from) as u32;
    buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Severity of an ErrorResponse the proxy writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Appends an ErrorResponse ('E'). Field codes are those of
/// `src/include/postgres_ext.h` (`PG_DIAG_*`).
pub fn write_error(
    buf: &mut BytesMut,
    severity: Severity,
    sqlstate: &str,
    message: &str,
    hint: Option<&str>,
) {
    write_error_with_detail(buf, severity, sqlstate, message, None, hint)
}

/// [`write_error`] with a detail field ('D').
pub fn write_error_with_detail(
    buf: &mut BytesMut,
    severity: Severity,
    sqlstate: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) {
    let start = buf.len();
    buf.put_u8(b'E');
    buf.put_u32(0);
    buf.put_u8(b'S');
    put_cstr(buf, severity.as_str());
    buf.put_u8(b'V');
    put_cstr(buf, severity.as_str());
    buf.put_u8(b'C');
    put_cstr(buf, sqlstate);
    buf.put_u8(b'M');
    put_cstr(buf, message);
    if let Some(detail) = detail {
        buf.put_u8(b'D');
        put_cstr(buf, detail);
    }
    if let Some(hint) = hint {
        buf.put_u8(b'H');
        put_cstr(buf, hint);
    }
    buf.put_u8(0);
    fill_len(buf, start + 1, start + 1);
}

/// Appends NegotiateProtocolVersion ('v'): the newest minor version the proxy
/// supports and the protocol options (`_pq_.*`) it did not recognise.
pub fn write_negotiate_protocol_version(
    buf: &mut BytesMut,
    newest_minor: u16,
    unrecognized: &[&[u8]],
) {
    let start = buf.len();
    buf.put_u8(b'v');
    buf.put_u32(0);
    buf.put_u32((u32::from(PROTOCOL_MAJOR) << 16) | u32::from(newest_minor));
    buf.put_u32(unrecognized.len() as u32);
    for opt in unrecognized {
        put_cbytes(buf, opt);
    }
    fill_len(buf, start + 1, start + 1);
}

/// Which side of the connection sent a message; used in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "server",
        }
    }
}

/// A regular (post-startup) message header: its type byte and the length of
/// the body that follows the 5-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    pub body_len: usize,
}

/// Decodes a 5-byte message header, refusing lengths below 4 (the length word
/// counts itself) or above `max_body`.
pub fn decode_header(
    h: [u8; HEADER_LEN],
    max_body: usize,
    from: Side,
) -> Result<Header, ProtocolError> {
    let len = i32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    match usize::try_from(len) {
        Ok(l) if l >= 4 && l - 4 <= max_body => Ok(Header {
            tag: h[0],
            body_len: l - 4,
        }),
        _ => Err(ProtocolError::BadMessageLength(len.into(), from.as_str())),
    }
}

/// Reads one complete regular message (header and body) from `buf`.
/// Returns `Ok(None)` when more bytes are needed.
pub fn parse_message(
    buf: &mut BytesMut,
    max_body: usize,
    from: Side,
) -> Result<Option<(u8, Bytes)>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        buf.reserve(HEADER_LEN - buf.len());
        return Ok(None);
    }
    let h = decode_header([buf[0], buf[1], buf[2], buf[3], buf[4]], max_body, from)?;
    let total = HEADER_LEN + h.body_len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(HEADER_LEN);
    Ok(Some((h.tag, frame.freeze())))
}

/// Authentication request codes (`AUTH_REQ_*` in `src/include/libpq/protocol.h`,
/// formerly pqcomm.h) after which the client must answer with a message.
pub fn auth_needs_reply(code: u32) -> bool {
    // 3 password, 5 MD5, 7 GSS, 8 GSS continue, 9 SSPI, 10 SASL, 11 SASL continue.
    matches!(code, 3 | 5 | 7 | 8 | 9 | 10 | 11)
}

/// `AUTH_REQ_OK`.
pub const AUTH_REQ_OK: u32 = 0;

/// The SQLSTATE (`C` field) of an ErrorResponse or NoticeResponse body:
/// fields of a type byte and a NUL-terminated string, ended by a NUL.
pub fn error_code(mut body: &[u8]) -> Option<&[u8]> {
    while let Some((&kind, rest)) = body.split_first() {
        if kind == 0 {
            return None;
        }
        let end = rest.iter().position(|b| *b == 0)?;
        if kind == b'C' {
            return Some(&rest[..end]);
        }
        body = &rest[end + 1..];
    }
    None
}

/// Follows message boundaries in the server-to-client byte stream, and
/// whether the last message was a ReadyForQuery saying idle.
#[derive(Debug, Clone, Default)]
pub struct MessageTracker {
    header: [u8; HEADER_LEN],
    header_len: u8,
    body_left: usize,
    /// Set when the server sent a length below 4; boundaries are unknown from
    /// then on (PostgreSQL never does this).
    lost: bool,
    /// The type of the message being (or last) forwarded, and for a
    /// ReadyForQuery its transaction status.
    tag: u8,
    status: u8,
    /// A statement ran to its end (CommandComplete, EmptyQueryResponse or
    /// ErrorResponse) since the last ReadyForQuery.
    ran: bool,
    /// The last ReadyForQuery closed a round in which a statement ran (not
    /// only a prepare or a describe, nor the end of authentication).
    ran_before_ready: bool,
}

impl MessageTracker {
    /// A tracker for the stream right after a ReadyForQuery that said idle
    /// (the end of authentication).
    pub fn after_ready() -> Self {
        MessageTracker {
            tag: b'Z',
            status: b'I',
            ..Default::default()
        }
    }

    /// A tracker for the stream where the kernel's parser left it (kernel
    /// forwarding, `crate::kernel`): the last message begun was of type
    /// `tag` (with `status`, for a ReadyForQuery whose status byte came),
    /// `header` holds the first bytes of a header split at that point, or
    /// `body_left` bytes of the current message are still to come; `lost`
    /// if the parser lost the boundaries. `ran` says whether the round
    /// before may have run a statement.
    pub fn resume(
        tag: u8,
        status: u8,
        header: &[u8],
        body_left: usize,
        lost: bool,
        ran: bool,
    ) -> Self {
        let mut t = MessageTracker {
            tag,
            status: if tag == b'Z' { status } else { 0 },
            ran_before_ready: ran,
            lost,
            ..Default::default()
        };
        if !lost {
            let n = header.len().min(HEADER_LEN - 1);
            t.header[..n].copy_from_slice(&header[..n]);
            t.header_len = n as u8;
            t.body_left = if n == 0 { body_left } else { 0 };
        }
        t
    }

    /// Whether the stream is at a message boundary right after a
    /// ReadyForQuery saying idle: no transaction is open.
    pub fn idle(&self) -> bool {
        !self.lost
            && self.header_len == 0
            && self.body_left == 0
            && self.tag == b'Z'
            && self.status == b'I'
    }

    /// [`MessageTracker::idle`], and the round that ReadyForQuery ended ran
    /// a statement: the client's unit of work is done. After a round that
    /// only prepared or described (an extended-protocol client's first
    /// round trip of two), or right after authentication, it is not.
    pub fn idle_after_work(&self) -> bool {
        self.idle() && self.ran_before_ready
    }

    #[inline]
    fn begin(&mut self, tag: u8) {
        self.tag = tag;
        self.status = 0;
        match tag {
            b'Z' => {
                self.ran_before_ready = self.ran;
                self.ran = false;
            }
            b'C' | b'I' | b'E' => self.ran = true,
            _ => {}
        }
    }

    /// Accounts for bytes about to be forwarded.
    #[inline]
    pub fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.lost {
            if self.body_left > 0 {
                if self.tag == b'Z' && self.body_left == 1 {
                    self.status = data[0];
                }
                let n = self.body_left.min(data.len());
                self.body_left -= n;
                data = &data[n..];
            } else if self.header_len == 0 && data.len() >= HEADER_LEN {
                self.begin(data[0]);
                self.start_body(data[1], data[2], data[3], data[4]);
                data = &data[HEADER_LEN..];
            } else {
                let have = usize::from(self.header_len);
                let n = (HEADER_LEN - have).min(data.len());
                self.header[have..have + n].copy_from_slice(&data[..n]);
                self.header_len += n as u8;
                data = &data[n..];
                if usize::from(self.header_len) == HEADER_LEN {
                    self.header_len = 0;
                    let h = self.header;
                    self.begin(h[0]);
                    self.start_body(h[1], h[2], h[3], h[4]);
                }
            }
        }
    }

    #[inline]
    fn start_body(&mut self, a: u8, b: u8, c: u8, d: u8) {
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        match len.checked_sub(4) {
            Some(body) => self.body_left = body,
            None => self.lost = true,
        }
    }

    /// Bytes still to forward before the stream is at a message boundary:
    /// `Some(0)` at a boundary, `None` if boundaries were lost. While a
    /// header is incomplete this is the rest of the header only; call again
    /// after observing it.
    pub fn to_boundary(&self) -> Option<usize> {
        if self.lost {
            None
        } else if self.header_len > 0 {
            Some(HEADER_LEN - usize::from(self.header_len))
        } else {
            Some(self.body_left)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(minor: u16, params: &[(&str, &str)]) -> BytesMut {
        let mut b = BytesMut::new();
        let p: Vec<(Bytes, Bytes)> = params
            .iter()
            .map(|(k, v)| (Bytes::from(k.to_string()), Bytes::from(v.to_string())))
            .collect();
        encode_startup(&mut b, minor, &p, |_| false);
        b
    }

    #[test]
    fn non_utf8_parameters_survive_a_rebuild_byte_for_byte() {
        let mut b = BytesMut::new();
        let p = vec![
            (Bytes::from_static(b"user"), Bytes::from_static(b"alice")),
            (
                Bytes::from_static(b"application_name"),
                Bytes::from_static(b"caf\xe9 \xff\xfe"),
            ),
        ];
        encode_startup(&mut b, 0, &p, |_| false);
        let raw = b.clone().freeze();
        let Some(StartupPacket::Startup(m)) = parse_startup(&mut b).unwrap() else {
            panic!("not a startup")
        };
        assert_eq!(m.param("application_name"), Some(&b"caf\xe9 \xff\xfe"[..]));
        let mut again = BytesMut::new();
        encode_startup(&mut again, 0, &m.params, |_| false);
        assert_eq!(again.freeze(), raw);
    }

    #[test]
    fn parses_startup_in_pieces() {
        let full = startup(0, &[("user", "alice"), ("database", "db")]);
        let mut buf = BytesMut::new();
        for (i, byte) in full.iter().enumerate() {
            buf.put_u8(*byte);
            let r = parse_startup(&mut buf).expect("valid");
            if i + 1 < full.len() {
                assert!(r.is_none(), "complete at byte {i}");
            } else {
                let Some(StartupPacket::Startup(m)) = r else {
                    panic!("not a startup")
                };
                assert_eq!(m.user(), Some(&b"alice"[..]));
                assert_eq!(m.database(), Some(&b"db"[..]));
                assert_eq!(m.minor, 0);
                assert_eq!(&m.raw[..], &full[..]);
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn ssl_gss_and_cancel() {
        let mut b = BytesMut::new();
        b.put_u32(8);
        b.put_u32(NEGOTIATE_SSL_CODE);
        b.put_u32(8);
        b.put_u32(NEGOTIATE_GSS_CODE);
        b.put_u32(16);
        b.put_u32(CANCEL_REQUEST_CODE);
        b.put_u32(42);
        b.put_u32(7);
        assert_eq!(
            parse_startup(&mut b).unwrap(),
            Some(StartupPacket::SslRequest)
        );
        assert_eq!(
            parse_startup(&mut b).unwrap(),
            Some(StartupPacket::GssEncRequest)
        );
        let Some(StartupPacket::Cancel(c)) = parse_startup(&mut b).unwrap() else {
            panic!()
        };
        assert_eq!(c.pid, 42);
        assert_eq!(&c.key[..], &7u32.to_be_bytes());
        assert_eq!(c.raw.len(), 16);
    }

    #[test]
    fn long_cancel_key_of_protocol_3_2() {
        let mut b = BytesMut::new();
        b.put_u32(12 + 32);
        b.put_u32(CANCEL_REQUEST_CODE);
        b.put_u32(1);
        b.put_slice(&[9u8; 32]);
        let Some(StartupPacket::Cancel(c)) = parse_startup(&mut b).unwrap() else {
            panic!()
        };
        assert_eq!(c.key.len(), 32);
        let mut b = BytesMut::new();
        b.put_u32(12 + 257);
        b.put_u32(CANCEL_REQUEST_CODE);
        b.put_u32(1);
        b.put_slice(&[9u8; 257]);
        assert_eq!(parse_startup(&mut b), Err(ProtocolError::BadCancelKey(257)));
    }

    #[test]
    fn refuses_bad_lengths_before_allocating() {
        for len in [-1i32, 0, 3, 7, 10_001, i32::MAX] {
            let mut b = BytesMut::new();
            b.put_i32(len);
            assert_eq!(
                parse_startup(&mut b),
                Err(ProtocolError::BadLength(len.into()))
            );
            assert!(b.capacity() < 1024);
        }
    }

    #[test]
    fn refuses_bad_layouts() {
        let mut b = BytesMut::new();
        b.put_u32(12);
        b.put_u32(3 << 16);
        b.put_slice(b"ab\0c");
        assert!(matches!(
            parse_startup(&mut b),
            Err(ProtocolError::BadLayout(_))
        ));
        let mut b = BytesMut::new();
        b.put_u32(8);
        b.put_u32(2 << 16);
        assert_eq!(
            parse_startup(&mut b),
            Err(ProtocolError::UnsupportedProtocol(2, 0))
        );
    }

    #[test]
    fn error_response_layout() {
        let mut b = BytesMut::new();
        write_error(&mut b, Severity::Fatal, "57P01", "bye", None);
        assert_eq!(b[0], b'E');
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len + 1, b.len());
        assert_eq!(&b[5..], b"SFATAL\0VFATAL\0C57P01\0Mbye\0\0");
    }

    #[test]
    fn messages_and_headers() {
        let mut b = BytesMut::new();
        b.put_u8(b'Z');
        b.put_u32(5);
        b.put_u8(b'I');
        b.put_u8(b'R');
        let (tag, body) = parse_message(&mut b, 100, Side::Backend).unwrap().unwrap();
        assert_eq!((tag, &body[..]), (b'Z', &b"I"[..]));
        assert_eq!(parse_message(&mut b, 100, Side::Backend).unwrap(), None);
        assert!(decode_header([b'D', 0, 0, 0, 3], 100, Side::Backend).is_err());
        assert!(decode_header([b'D', 0xff, 0xff, 0xff, 0xff], 100, Side::Backend).is_err());
        assert!(decode_header([b'D', 0, 0, 1, 0], 100, Side::Backend).is_err());
    }
}
