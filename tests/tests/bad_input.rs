//! Each case sends something a PostgreSQL server would refuse and checks
//! what the client gets back, while a healthy session beside it keeps
//! working through the same proxy.

use std::time::Duration;

use proxy_core::ProxyConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::{connect, parse_error, read_to_close, startup_packet, PgServer, TestProxy};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

async fn send(proxy: &TestProxy, bytes: &[u8], close_write: bool) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if close_write {
        s.shutdown().await.unwrap();
    }
    read_to_close(&mut s, Duration::from_secs(5)).await
}

fn expect_error(reply: &[u8], code: &str, words: &str) {
    let (sev, got, msg) =
        parse_error(reply).unwrap_or_else(|| panic!("no ErrorResponse in {reply:?}"));
    assert_eq!(sev, "FATAL");
    assert_eq!(got, code, "{msg}");
    assert!(
        msg.contains(words),
        "message {msg:?} should mention {words:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_startup_input_gets_a_protocol_error_and_the_proxy_stays_up() {
    let pg = PgServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::support::self_signed(dir.path());
    let cfg = ProxyConfig {
        tls: Some(proxy_core::tls::server_config(&cert, &key).unwrap()),
        ..Default::default()
    };
    let proxy = TestProxy::start(&pg.addr(), cfg).await;
    let healthy = connect(&proxy.conn("postgres")).await;
    healthy
        .batch_execute("BEGIN; CREATE TEMP TABLE alive (x int)")
        .await
        .unwrap();

    // An oversized length (10001 > MAX_STARTUP_PACKET_LENGTH).
    let (r, closed) = send(&proxy, &[0, 0, 0x27, 0x11, 0, 3, 0, 0], false).await;
    expect_error(&r, "08P01", "invalid length");
    assert!(closed);
    // A negative length, and lengths too short to hold a request code.
    for len in [-1i32, i32::MIN, 0, 4, 7] {
        let (r, _) = send(&proxy, &len.to_be_bytes(), false).await;
        expect_error(&r, "08P01", "invalid length");
    }
    // A truncated packet: the length promises more than arrives before EOF.
    let mut p = startup_packet(0, &[("user", "postgres")]);
    p.truncate(p.len() - 5);
    let (r, _) = send(&proxy, &p, true).await;
    expect_error(&r, "08P01", "incomplete startup packet");
    // An unknown request code.
    let (r, _) = send(&proxy, &[0, 0, 0, 8, 0x04, 0xd2, 0x99, 0x99], false).await;
    expect_error(&r, "08P01", "unsupported frontend protocol");
    // Garbage: an HTTP request, and random bytes.
    let (r, _) = send(&proxy, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false).await;
    expect_error(&r, "08P01", "invalid length");
    let junk: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (r, _) = send(&proxy, &junk, false).await;
    expect_error(&r, "08P01", "");
    // A startup packet whose parameters are not NUL-terminated.
    let (r, _) = send(
        &proxy,
        &[0, 0, 0, 12, 0, 3, 0, 0, b'u', b's', b'e', b'r'],
        false,
    )
    .await;
    expect_error(&r, "08P01", "invalid startup packet layout");
    // Plaintext injected after SSLRequest (CVE-2021-23214): refused before
    // any 'S' is sent.
    let mut injected = SSL_REQUEST.to_vec();
    injected.extend(startup_packet(0, &[("user", "postgres")]));
    let (r, _) = send(&proxy, &injected, false).await;
    assert_ne!(r.first(), Some(&b'S'), "the proxy must not start TLS");
    expect_error(&r, "08P01", "after SSLRequest");
    // Two SSLRequests in a row when TLS is off would be a loop; with TLS on the
    // second arrives inside TLS. A second GSSENCRequest is refused.
    let gss = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&gss).await.unwrap();
    let mut n = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut n)
        .await
        .unwrap();
    assert_eq!(&n, b"N");
    s.write_all(&gss).await.unwrap();
    let (r, _) = read_to_close(&mut s, Duration::from_secs(5)).await;
    expect_error(&r, "08P01", "twice");

    // The healthy session never noticed.
    healthy
        .batch_execute("INSERT INTO alive VALUES (1); COMMIT")
        .await
        .unwrap();
    let n: i64 = healthy
        .query_one("SELECT count(*) FROM alive", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(proxy.proxy.established_sessions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_gets_an_error_at_the_startup_timeout() {
    let pg = PgServer::start().await;
    let cfg = ProxyConfig {
        startup_timeout: Duration::from_millis(800),
        ..Default::default()
    };
    let proxy = TestProxy::start(&pg.addr(), cfg).await;
    let healthy = connect(&proxy.conn("postgres")).await;
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    // Half a startup packet, then silence.
    s.write_all(&startup_packet(0, &[("user", "postgres")])[..6])
        .await
        .unwrap();
    let (r, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    let waited = started.elapsed();
    expect_error(&r, "08006", "no complete startup message");
    assert!(closed);
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    healthy.simple_query("SELECT 1").await.unwrap();
    crate::assert_eventually!(
        proxy.proxy.active_connections() == 1,
        Duration::from_secs(2),
        "the timed-out connection was not released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_minor_version_is_negotiated_once() {
    let pg = PgServer::start().await;
    let proxy = TestProxy::start(&pg.addr(), ProxyConfig::default()).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let p = startup_packet(7, &[("user", "postgres"), ("_pq_.frobnicate", "on")]);
    s.write_all(&p).await.unwrap();
    // Terminate right after, so the server closes and we can read it all.
    let mut buf = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut s, &mut chunk),
        )
        .await
        .unwrap()
        .unwrap();
        buf.extend_from_slice(&chunk[..n]);
        if n == 0
            || buf.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I'])
            || std::time::Instant::now() > deadline
        {
            break;
        }
    }
    assert_eq!(
        buf[0], b'v',
        "NegotiateProtocolVersion comes first: {buf:?}"
    );
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    let minor = u16::from_be_bytes([buf[7], buf[8]]);
    // PostgreSQL 15 speaks 3.0 only, so the single merged answer says 3.0.
    assert_eq!(minor, 0);
    assert!(String::from_utf8_lossy(&buf[5..1 + len]).contains("_pq_.frobnicate"));
    let mut tags = Vec::new();
    let mut at = 0;
    while at + 5 <= buf.len() {
        tags.push(buf[at]);
        at += 1 + u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
    }
    assert_eq!(
        tags.iter().filter(|&&t| t == b'v').count(),
        1,
        "exactly one NegotiateProtocolVersion: {tags:?}"
    );
    assert_eq!(buf[1 + len], b'R', "then authentication: {buf:?}");
    assert!(
        buf.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']),
        "reaches ReadyForQuery"
    );
}
