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
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::error::SessionError;

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
pub fn parse_v2(h: &[u8]) -> Result<Option<SocketAddr>, String> {
    if h.len() < FIXED || h[..12] != SIGNATURE {
        return Err("not a PROXY protocol v2 header".into());
    }
    let (ver, cmd) = (h[12] >> 4, h[12] & 0x0f);
    if ver != 2 {
        return Err(format!("PROXY protocol version {ver} is not supported"));
    }
    let body = &h[FIXED..];
    match cmd {
        0 => return Ok(None),
        1 => {}
        c => return Err(format!("unknown PROXY protocol command {c}")),
    }
    let short = || "PROXY protocol v2 address block too short".to_string();
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
/// stay in the socket for the startup phase.
pub async fn read(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    trusted: &[IpNet],
    deadline: Instant,
) -> Result<SocketAddr, SessionError> {
    let trusted = is_trusted(trusted, peer.ip());
    let mut head = [0u8; FIXED];
    let start = loop {
        let n = timeout_at(deadline, tcp.peek(&mut head))
            .await
            .map_err(|_| SessionError::ProxyHeader(format!("no data from {peer} in time")))?
            .map_err(SessionError::ClientIo)?;
        if n == 0 {
            return Err(SessionError::ClientGone);
        }
        match classify(&head[..n]) {
            // The rest of a header that began to arrive; peek returns at
            // once while some bytes are buffered, so pause briefly.
            Start::Unknown => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
            s => break s,
        }
    };
    let refuse = |tcp: &mut TcpStream, msg: String| {
        discard_pending(tcp);
        Err(SessionError::ProxyHeader(msg))
    };
    match (start, trusted) {
        (Start::Direct, false) => Ok(peer),
        (Start::Direct, true) => refuse(tcp, format!(
            "expected a PROXY protocol v2 header from {peer}, a trusted proxy address"
        )),
        (_, false) => refuse(tcp, format!(
            "a PROXY protocol header came from {peer}, which is not a trusted proxy; \
             connect directly, or add its network to proxy_protocol_trusted"
        )),
        (Start::V1, true) => refuse(tcp,
            "PROXY protocol version 1 (text) is not supported; configure the load balancer to send version 2".into(),
        ),
        (Start::V2 { len }, true) => {
            if len > MAX_BODY {
                return Err(SessionError::ProxyHeader(format!(
                    "PROXY protocol v2 header of {len} bytes is too long"
                )));
            }
            let mut h = vec![0u8; FIXED + len];
            timeout_at(deadline, tcp.read_exact(&mut h))
                .await
                .map_err(|_| SessionError::ProxyHeader(format!("incomplete PROXY header from {peer}")))?
                .map_err(SessionError::ClientIo)?;
            Ok(parse_v2(&h).map_err(SessionError::ProxyHeader)?.unwrap_or(peer))
        }
        (Start::Unknown, true) => unreachable!("the loop ends only on a decided start"),
    }
}

/// Reads and drops what the client has sent so far (only peeked at), so
/// that closing the socket after the error sends FIN, not RST: with unread
/// data the kernel resets the connection, and the client may lose the
/// ErrorResponse.
fn discard_pending(tcp: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match tcp.try_read(&mut buf) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
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
