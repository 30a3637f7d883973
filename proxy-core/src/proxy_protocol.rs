//! PROXY protocol version 2 (the binary header load balancers such as
//! HAProxy and AWS NLB put before the client's own bytes), so that the real
//! client address shows in logs and can be matched by rules.
//!
//! The header is only believed from trusted networks, where it is required;
//! a header from anywhere else is refused, since it would let any client
//! claim any address. Layout: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>,
//! section 2.2.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use tokio::io::AsyncRead;
use tokio::time::{timeout_at, Instant};

use crate::error::SessionError;
use crate::stream::Prefixed;

/// Why a PROXY header was refused. The texts name no address: they reach
/// the client (the address is in the session's log span).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header arrived in time")]
    Timeout,
    #[error("the connection closed in the middle of a PROXY protocol header")]
    Incomplete,
    #[error(
        "expected a PROXY protocol v2 header: this connection comes from a trusted proxy address"
    )]
    Missing,
    #[error("a PROXY protocol header came from an address that is not a trusted proxy; connect directly, or add its network to proxy_protocol_trusted")]
    Untrusted,
    #[error("PROXY protocol version 1 (text) is not supported; configure the load balancer to send version 2")]
    Version1,
    #[error("PROXY protocol v2 header of {0} bytes is too long")]
    TooLong(usize),
    #[error("not a PROXY protocol v2 header")]
    NotV2,
    #[error("PROXY protocol version {0} is not supported")]
    Version(u8),
    #[error("unknown PROXY protocol command {0}")]
    Command(u8),
    #[error("PROXY protocol v2 address block too short")]
    Short,
}

/// The 12-byte signature that starts every version 2 header.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const FIXED: usize = 16;
/// Addresses and TLVs; real headers are far smaller.
const MAX_BODY: usize = 4096;

/// What the first bytes of a connection are.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// Not a PROXY header (a PostgreSQL client speaking directly).
    Direct,
    /// A version 2 header of `FIXED + len` bytes.
    V2 { len: usize },
    /// A version 1 (text) header.
    V1,
    /// Need more bytes to tell.
    Unknown,
}

fn classify(b: &[u8]) -> Start {
    if b.starts_with(b"PROXY ") {
        return Start::V1;
    }
    // A prefix of either header needs more bytes; anything else is not one.
    let is_prefix = |of: &[u8]| of.starts_with(&b[..b.len().min(of.len())]);
    if !is_prefix(&SIGNATURE) {
        return if is_prefix(b"PROXY ") {
            Start::Unknown
        } else {
            Start::Direct
        };
    }
    if b.len() < FIXED {
        return Start::Unknown;
    }
    Start::V2 {
        len: u16::from_be_bytes([b[14], b[15]]) as usize,
    }
}

/// Parses a whole version 2 header; returns the client address, or `None`
/// for a LOCAL header (the proxy's own health check) or an unknown family.
pub fn parse_v2(h: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    if h.len() < FIXED || h[..12] != SIGNATURE {
        return Err(ProxyHeaderError::NotV2);
    }
    let (ver, cmd) = (h[12] >> 4, h[12] & 0x0f);
    if ver != 2 {
        return Err(ProxyHeaderError::Version(ver));
    }
    let body = &h[FIXED..];
    match cmd {
        0 => return Ok(None),
        1 => {}
        c => return Err(ProxyHeaderError::Command(c)),
    }
    let short = || ProxyHeaderError::Short;
    match h[13] >> 4 {
        1 => {
            let a = body.get(..12).ok_or_else(short)?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Ok(Some(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([a[8], a[9]]),
            )))
        }
        2 => {
            let a = body.get(..36).ok_or_else(short)?;
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(ip)),
                u16::from_be_bytes([a[32], a[33]]),
            )))
        }
        _ => Ok(None),
    }
}

fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    trusted.iter().any(|n| n.contains(&ip))
}

/// Reads the PROXY header a connection from `peer` starts with, if it must
/// have one, and returns the real client address. Bytes after the header
/// stay buffered in `io` for the startup phase.
pub(crate) async fn read<S: AsyncRead + Unpin>(
    io: &mut Prefixed<S>,
    peer: SocketAddr,
    trusted: &[IpNet],
    deadline: Instant,
) -> Result<SocketAddr, SessionError> {
    let trusted = is_trusted(trusted, peer.ip());
    let fail = |e: ProxyHeaderError| Err(SessionError::ProxyHeader(e));
    let mut want = 1;
    let start = loop {
        let head = timeout_at(deadline, io.fill(want))
            .await
            .map_err(|_| SessionError::ProxyHeader(ProxyHeaderError::Timeout))?
            .map_err(SessionError::ClientIo)?;
        if head.is_empty() {
            return Err(SessionError::ClientGone);
        }
        match classify(&head[..head.len().min(FIXED)]) {
            Start::Unknown if head.len() < want => {
                return fail(ProxyHeaderError::Incomplete);
            }
            Start::Unknown => want = (head.len() + 1).min(FIXED),
            s => break s,
        }
    };
    match (start, trusted) {
        (Start::Direct, false) => Ok(peer),
        (Start::Direct, true) => fail(ProxyHeaderError::Missing),
        (_, false) => fail(ProxyHeaderError::Untrusted),
        (Start::V1, true) => fail(ProxyHeaderError::Version1),
        (Start::V2 { len }, true) => {
            if len > MAX_BODY {
                return fail(ProxyHeaderError::TooLong(len));
            }
            let h = timeout_at(deadline, io.fill(FIXED + len))
                .await
                .map_err(|_| SessionError::ProxyHeader(ProxyHeaderError::Timeout))?
                .map_err(SessionError::ClientIo)?;
            if h.len() < FIXED + len {
                return fail(ProxyHeaderError::Incomplete);
            }
            let addr = parse_v2(&h[..FIXED + len]).map_err(SessionError::ProxyHeader)?;
            io.consume(FIXED + len);
            Ok(addr.unwrap_or(peer))
        }
        (Start::Unknown, true) => fail(ProxyHeaderError::Incomplete),
    }
}

/// Builds a version 2 PROXY header for `client` connecting to `server`
/// (for tests and benchmarks).
pub fn encode_v2(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let mut h = SIGNATURE.to_vec();
    h.push(0x21);
    match (client, server) {
        (SocketAddr::V4(c), SocketAddr::V4(s)) => {
            h.push(0x11);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&c.ip().octets());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&c.port().to_be_bytes());
            h.extend_from_slice(&s.port().to_be_bytes());
        }
        (c, s) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            h.push(0x21);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(c).octets());
            h.extend_from_slice(&v6(s).octets());
            h.extend_from_slice(&c.port().to_be_bytes());
            h.extend_from_slice(&s.port().to_be_bytes());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_garbage_is_refused() {
        let c: SocketAddr = "203.0.113.7:51000".parse().unwrap();
        let s: SocketAddr = "10.0.0.1:5432".parse().unwrap();
        let h = encode_v2(c, s);
        assert_eq!(classify(&h), Start::V2 { len: 12 });
        assert_eq!(parse_v2(&h).unwrap(), Some(c));
        let c6: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let h6 = encode_v2(c6, "[2001:db8::2]:5432".parse().unwrap());
        assert_eq!(parse_v2(&h6).unwrap(), Some(c6));
        let mut local = h.clone();
        local[12] = 0x20;
        assert_eq!(parse_v2(&local).unwrap(), None);
        let mut v3 = h.clone();
        v3[12] = 0x31;
        assert!(parse_v2(&v3).is_err());
        assert!(parse_v2(&h[..20]).is_err());
        assert_eq!(classify(&[0, 0, 0, 8, 4, 210, 22, 47]), Start::Direct);
        assert_eq!(classify(&h[..5]), Start::Unknown);
        assert_eq!(classify(b"PRO"), Start::Unknown);
        assert_eq!(classify(b"PROXY TCP4 1.2.3.4"), Start::V1);
        assert_eq!(classify(&[0x16, 3, 1]), Start::Direct);
    }
}
