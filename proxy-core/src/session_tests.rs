//! Whole sessions over in-memory client streams (`tokio::io::duplex`), with
//! fake backends on loopback where a path needs one: every refusal a client
//! can meet, and what its ErrorResponse says.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;

use crate::error::SessionError;
use crate::fence::FenceReason;
use crate::protocol::{self, NEGOTIATE_GSS_CODE, NEGOTIATE_SSL_CODE};
use crate::proxy_protocol::ProxyHeaderError;
use crate::view::{Backend, View, ViewHandle};
use crate::{ListenerOptions, Proxy, ProxyConfig, Route};

const PEER: &str = "192.0.2.10:40000";

fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let p: Vec<_> = params
        .iter()
        .map(|(k, v)| {
            (
                bytes::Bytes::from(k.to_string()),
                bytes::Bytes::from(v.to_string()),
            )
        })
        .collect();
    let mut b = BytesMut::new();
    protocol::encode_startup(&mut b, 0, &p, |_| false);
    b.to_vec()
}

/// The fields of the first ErrorResponse in `bytes`, by field code.
fn error_fields(bytes: &[u8]) -> Vec<(u8, String)> {
    let start = bytes
        .iter()
        .position(|&b| b == b'E')
        .expect("no ErrorResponse");
    let b = &bytes[start..];
    let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    b[5..1 + len]
        .split(|&c| c == 0)
        .filter(|f| !f.is_empty())
        .map(|f| (f[0], String::from_utf8_lossy(&f[1..]).into_owned()))
        .collect()
}

fn field(fields: &[(u8, String)], code: u8) -> Option<&str> {
    fields
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, v)| v.as_str())
}

/// No IPv4 address, port of ours, or OS error text in what a client reads.
fn assert_client_safe(what: &str, text: &str, ports: &[u16]) {
    let lower = text.to_lowercase();
    for os in [
        "os error",
        "connection refused",
        "connection reset",
        "broken pipe",
        "unexpected end of file",
    ] {
        assert!(!lower.contains(os), "{what}: OS error text in {text:?}");
    }
    let ipv4 = text
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .any(|w| w.split('.').count() == 4 && w.split('.').all(|o| o.parse::<u8>().is_ok()));
    assert!(!ipv4, "{what}: an IP address in {text:?}");
    for p in ports {
        assert!(
            !text.contains(&p.to_string()),
            "{what}: port {p} in {text:?}"
        );
    }
}

/// Runs one client connection through `proxy`: writes `send`, then reads
/// until the proxy closes; returns what it read.
async fn exchange(proxy: &Proxy, opts: ListenerOptions, send: &[u8]) -> Vec<u8> {
    let (mut client, server): (DuplexStream, DuplexStream) = tokio::io::duplex(64 * 1024);
    proxy.serve_connection(server, PEER.parse().unwrap(), &Arc::new(opts));
    client.write_all(send).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out)).await;
    out
}

/// A fake PostgreSQL on loopback that does `serve` with each connection.
async fn fake_backend<F, Fut>(serve: F) -> (String, u16)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let serve = serve.clone();
            tokio::spawn(async move { serve(s).await });
        }
    });
    (format!("127.0.0.1:{port}"), port)
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

fn cfg() -> ProxyConfig {
    ProxyConfig {
        startup_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(500),
        auth_timeout: Duration::from_millis(300),
        hold_timeout: Duration::from_millis(100),
        ..ProxyConfig::default()
    }
}

fn msg(m: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![m];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// AuthenticationOk, `in_hot_standby = on`, ReadyForQuery: a standby.
fn standby_greeting() -> Vec<u8> {
    let mut v = msg(b'R', &0u32.to_be_bytes());
    v.extend(msg(b'S', b"in_hot_standby\0on\0"));
    v.extend(msg(b'K', &[0, 0, 0, 7, 1, 2, 3, 4]));
    v.extend(msg(b'Z', b"I"));
    v
}

struct Case {
    name: &'static str,
    proxy: Proxy,
    opts: ListenerOptions,
    send: Vec<u8>,
    sqlstate: &'static str,
    ports: Vec<u16>,
    /// A fence to fire on this backend once the session is connecting.
    fence: Option<Backend>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_reaches_the_client_with_a_sqlstate_and_no_address() {
    let user = startup(&[("user", "u")]);
    let refused_port = closed_port().await;
    let refused = format!("127.0.0.1:{refused_port}");
    // Accepts, then says nothing.
    let (silent, silent_port) = fake_backend(|s| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    })
    .await;
    // Accepts, then closes at once.
    let (hangup, hangup_port) = fake_backend(|s| async move { drop(s) }).await;
    // A standby.
    let (standby, standby_port) = fake_backend(|mut s| async move {
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(&standby_greeting()).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let ports = vec![refused_port, silent_port, hangup_port, standby_port];
    let with = |primary: Option<&str>, c: ProxyConfig| {
        let view = View {
            generation: 1,
            primary: primary.map(Backend::new),
            replicas: Vec::new(),
        };
        Proxy::new(c, ViewHandle::new(view))
    };
    let on = |addr: &str| with(Some(addr), cfg());
    let trusted = ListenerOptions {
        proxy_protocol: Some(Arc::from(vec!["192.0.2.0/24".parse().unwrap()])),
        ..ListenerOptions::default()
    };
    let untrusted = ListenerOptions {
        proxy_protocol: Some(Arc::from(vec!["198.51.100.0/24".parse().unwrap()])),
        ..ListenerOptions::default()
    };
    let replica_route = ListenerOptions {
        route: Route::Replica,
        ..ListenerOptions::default()
    };
    let mut ssl_injected = BytesMut::new();
    ssl_injected.put_u32(8);
    ssl_injected.put_u32(NEGOTIATE_SSL_CODE);
    ssl_injected.extend_from_slice(&user);
    let mut gss_twice = BytesMut::new();
    for _ in 0..2 {
        gss_twice.put_u32(8);
        gss_twice.put_u32(NEGOTIATE_GSS_CODE);
    }
    let header = crate::proxy_protocol::encode_v2(
        "203.0.113.5:1234".parse().unwrap(),
        "10.0.0.1:5432".parse().unwrap(),
    );
    let mut with_header = header.clone();
    with_header.extend_from_slice(&user);
    let cases = vec![
        Case {
            name: "bad startup length",
            proxy: on(&refused),
            opts: ListenerOptions::default(),
            send: vec![0, 0, 0, 2],
            sqlstate: "08P01",
            ports: ports.clone(),
            fence: None,
        },
        Case {
            name: "data after SSLRequest",
            proxy: on(&refused),
            opts: ListenerOptions::default(),
            send: ssl_injected.to_vec(),
            sqlstate: "08P01",
            ports: ports.clone(),
            fence: None,
        },
        Case {
            name: "GSSENCRequest twice",
            proxy: on(&refused),
            opts: ListenerOptions::default(),
            send: gss_twice.to_vec(),
            sqlstate: "08P01",
            ports: ports.clone(),
            fence: None,
        },
        Case {
            name: "startup timeout",
            proxy: on(&refused),
            opts: ListenerOptions::default(),
            send: vec![0, 0],
            sqlstate: "08006",
            ports: ports.clone(),
            fence: None,
        },
        Case {
            name: "too many connections",
            proxy: with(
                Some(&refused),
                ProxyConfig {
                    max_connections: 0,
                    ..cfg()
                },
            ),
            opts: ListenerOptions::default(),
            send: user.clone(),
            sqlstate: "53300",
            ports: ports.clone(),
            fence: None,
        },
        Case {
            name: "no primary",
            proxy: with(None, cfg()),
            opts: ListenerOptions::default(),
            send: user.clone(),
            sqlstate: "57P03",
            ports: ports.clone(),
            fence: None,
        },
        Case {
            name: "no replica",
            proxy: on(&refused),
            opts: replica_route,
            send: user.clone(),
            sqlstate: "57P03",
            ports: ports.clone(),
            fence: None,
        },
        Case {
            name: "bad keelson.route",
            proxy: on(&refused),
            opts: ListenerOptions::default(),
            send: startup(&[("user", "u"), ("options", "-c keelson.route=nowhere")]),
            sqlstate: "22023",
            ports: ports.clone(),
            fence: None,
        },
        Case {
            name: "backend refuses the connection",
            proxy: on(&refused),
            opts: ListenerOptions::default(),
            send: user.clone(),
            sqlstate: "08006",
            ports: ports.clone(),
            fence: None,
        },
        Case {
            name: "backend says nothing (authentication timeout)",
            proxy: on(&silent),
            opts: ListenerOptions::default(),
            send: user.clone(),
            sqlstate: "08006",
            ports: ports.clone(),
            fence: None,
        },
        Case {
            name: "backend hangs up",
            proxy: on(&hangup),
            opts: ListenerOptions::default(),
            send: user.clone(),
            sqlstate: "08006",
            ports: ports.clone(),
            fence: None,
        },
        Case {
            name: "primary route lands on a standby",
            proxy: on(&standby),
            opts: ListenerOptions::default(),
            send: user.clone(),
            sqlstate: "57P03",
            ports: ports.clone(),
            fence: None,
        },
        Case {
            name: "fenced while connecting",
            proxy: with(
                Some(&silent),
                ProxyConfig {
                    auth_timeout: Duration::from_secs(5),
                    ..cfg()
                },
            ),
            opts: ListenerOptions::default(),
            send: user.clone(),
            sqlstate: "57P03",
            ports: ports.clone(),
            fence: Some(Backend::new(silent.clone())),
        },
        Case {
            name: "PROXY header missing from a trusted address",
            proxy: on(&refused),
            opts: trusted,
            send: user.clone(),
            sqlstate: "08P01",
            // The client's own address is not ours to hide, but it is not
            // shown either.
            ports: vec![40000],
            fence: None,
        },
        Case {
            name: "PROXY header from an untrusted address",
            proxy: on(&refused),
            opts: untrusted,
            send: with_header,
            sqlstate: "08P01",
            ports: vec![40000, 1234],
            fence: None,
        },
    ];
    for c in cases {
        let out = if let Some(b) = &c.fence {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            c.proxy
                .serve_connection(server, PEER.parse().unwrap(), &Arc::new(c.opts));
            client.write_all(&c.send).await.unwrap();
            // Fire once the session holds the fence (it is connecting):
            // until then there is no fence to fire.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let fired = c.proxy.fence_backend(
                    b,
                    FenceReason {
                        sqlstate: "57P01",
                        message: "primary changed".into(),
                        label: "fenced",
                        drain: false,
                    },
                );
                if !fired.is_empty() {
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "never connected");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut out = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out)).await;
            out
        } else {
            exchange(&c.proxy, c.opts, &c.send).await
        };
        let fields = error_fields(&out);
        assert_eq!(field(&fields, b'S'), Some("FATAL"), "{}", c.name);
        assert_eq!(
            field(&fields, b'C'),
            Some(c.sqlstate),
            "{}: {fields:?}",
            c.name
        );
        assert!(field(&fields, b'D').is_none(), "{}: detail sent", c.name);
        for (code, text) in &fields {
            assert_client_safe(&format!("{} ({})", c.name, *code as char), text, &c.ports);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_error_is_sent_as_detail_only_when_configured() {
    let port = closed_port().await;
    let addr = format!("127.0.0.1:{port}");
    let user = startup(&[("user", "u")]);
    for detail in [false, true] {
        let proxy = Proxy::new(
            ProxyConfig {
                error_detail: detail,
                ..cfg()
            },
            ViewHandle::new(View::fixed(Backend::new(addr.clone()))),
        );
        let fields = error_fields(&exchange(&proxy, ListenerOptions::default(), &user).await);
        assert_eq!(
            field(&fields, b'M'),
            Some("could not connect to the database server")
        );
        match detail {
            false => assert!(field(&fields, b'D').is_none()),
            true => {
                let d = field(&fields, b'D').unwrap();
                assert!(d.contains(&addr), "{d}");
            }
        }
    }
}

/// Every variant, built with an address and an OS error inside: its client
/// message holds neither. The match makes a new variant fail to compile
/// here until it is added.
#[test]
fn no_variant_shows_an_address_or_os_error_to_clients() {
    use SessionError::*;
    let addr = || "10.1.2.3:5432".to_owned();
    let os = || std::io::Error::from_raw_os_error(111);
    let t = Duration::from_secs(5);
    let all = vec![
        Protocol(protocol::ProtocolError::BadLength(2)),
        SslInjection,
        RepeatedRequest("SSLRequest"),
        StartupTimeout(t),
        ClientTls(os()),
        ClientGone,
        ClientIo(os()),
        TooManyConnections(10),
        NoPrimaryAfter(t),
        StandbyCluster(t),
        BackendConnect {
            addr: addr(),
            source: os(),
        },
        BackendConnectTimeout {
            addr: addr(),
            timeout: t,
        },
        BackendTls {
            addr: addr(),
            detail: "TLS handshake (verify-full): invalid peer certificate: UnknownIssuer".into(),
        },
        AuthTimeout {
            addr: addr(),
            timeout: t,
        },
        BackendIo {
            addr: addr(),
            source: os(),
        },
        ShuttingDown,
        FencedWhileConnecting,
        BadRoute(crate::route::BadRoute("x".into())),
        NoReplicaAfter(t),
        WrongServerRole {
            addr: addr(),
            is_standby: true,
        },
        ProxyHeader(ProxyHeaderError::Untrusted),
        DirectTlsWithoutAlpn,
    ];
    for e in &all {
        // Exhaustive on purpose: a new variant must be listed above.
        match e {
            Protocol(_)
            | SslInjection
            | RepeatedRequest(_)
            | StartupTimeout(_)
            | ClientTls(_)
            | ClientGone
            | ClientIo(_)
            | TooManyConnections(_)
            | NoPrimaryAfter(_)
            | StandbyCluster(_)
            | BackendConnect { .. }
            | BackendConnectTimeout { .. }
            | BackendTls { .. }
            | AuthTimeout { .. }
            | BackendIo { .. }
            | ShuttingDown
            | FencedWhileConnecting
            | BadRoute(_)
            | NoReplicaAfter(_)
            | WrongServerRole { .. }
            | ProxyHeader(_)
            | DirectTlsWithoutAlpn => {}
        }
        let m = e.meta();
        assert_client_safe(&format!("{e:?}"), &m.message, &[5432]);
        if let Some(h) = m.hint {
            assert_client_safe(&format!("{e:?} hint"), h, &[5432]);
        }
        assert!(!m.message.is_empty());
    }
    // The log line keeps what the operator needs.
    let e = BackendConnect {
        addr: addr(),
        source: os(),
    };
    assert!(e.to_string().contains("10.1.2.3:5432") && e.to_string().contains("os error 111"));
}

/// Every idle session keeps its whole future: the setup steps run in
/// their own boxed future, dropped once the session forwards, and the
/// forwarding future is a plain struct, so only the forwarding state stays
/// (640 bytes over an in-memory stream when this was measured; 1008 with
/// the setup's inner futures boxed one by one, 3328 with nothing boxed).
#[test]
fn the_session_future_stays_small() {
    let (_a, b) = tokio::io::duplex(64);
    let size = crate::proxy::session_future_size(b);
    eprintln!("session future: {size} bytes");
    assert!(size <= 768, "the session future grew to {size} bytes");
}

/// An ErrorResponse body with SQLSTATE `code`.
fn error_body(code: &str, text: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (k, v) in [(b'S', "FATAL"), (b'C', code), (b'M', text)] {
        b.push(k);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    b.push(0);
    b
}

/// A primary that answers its first `refusals` connections with 57P03
/// ("the database system is starting up"), then lets clients in.
async fn starting_primary(refusals: usize) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    refusing_primary(refusals, "57P03", "the database system is starting up").await
}

/// A primary that ends its first `refusals` sessions in their startup
/// with a FATAL `code`, then lets clients in; how many it was asked for.
async fn refusing_primary(
    refusals: usize,
    code: &'static str,
    text: &'static str,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let seen = Arc::new(AtomicUsize::new(0));
    let n = seen.clone();
    let (addr, _) = fake_backend(move |mut s| {
        let n = n.clone();
        async move {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            if n.fetch_add(1, Ordering::SeqCst) < refusals {
                let e = msg(b'E', &error_body(code, text));
                let _ = s.write_all(&e).await;
                return;
            }
            let mut v = msg(b'R', &0u32.to_be_bytes());
            v.extend(msg(b'S', b"in_hot_standby\0off\0"));
            v.extend(msg(b'K', &[0, 0, 0, 9, 1, 2, 3, 4]));
            v.extend(msg(b'Z', b"I"));
            let _ = s.write_all(&v).await;
        }
    })
    .await;
    (addr, seen)
}

fn primary_proxy(addr: &str, hold: Duration) -> Proxy {
    let view = View {
        generation: 1,
        primary: Some(Backend::new(addr)),
        replicas: Vec::new(),
    };
    let c = ProxyConfig {
        hold_timeout: hold,
        ..cfg()
    };
    Proxy::new(c, ViewHandle::new(view))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_is_starting_up_holds_the_client_until_it_lets_it_in() {
    let (addr, seen) = starting_primary(4).await;
    let proxy = primary_proxy(&addr, Duration::from_secs(5));
    let out = exchange(
        &proxy,
        ListenerOptions::default(),
        &startup(&[("user", "u")]),
    )
    .await;
    assert_eq!(out.first(), Some(&b'R'), "the client was let in: {out:?}");
    assert!(!out.contains(&b'E'), "no error reached the client: {out:?}");
    assert!(out.ends_with(&msg(b'Z', b"I")), "{out:?}");
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_still_starting_after_the_hold_timeout_refuses_with_its_own_error() {
    let (addr, seen) = starting_primary(usize::MAX).await;
    let proxy = primary_proxy(&addr, Duration::from_millis(300));
    let t = std::time::Instant::now();
    let out = exchange(
        &proxy,
        ListenerOptions::default(),
        &startup(&[("user", "u")]),
    )
    .await;
    let fields = error_fields(&out);
    assert_eq!(field(&fields, b'C'), Some("57P03"), "{out:?}");
    assert_eq!(
        field(&fields, b'M'),
        Some("the database system is starting up")
    );
    assert!(
        seen.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "it was tried again"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_refuses_connections_is_tried_again_until_it_listens() {
    // A port that refuses for a while, then a server on it.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let proxy = primary_proxy(&addr.to_string(), Duration::from_secs(5));
    let server = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let l = TcpListener::bind(addr).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let mut v = msg(b'R', &0u32.to_be_bytes());
        v.extend(msg(b'S', b"in_hot_standby\0off\0"));
        v.extend(msg(b'Z', b"I"));
        s.write_all(&v).await.unwrap();
    });
    let out = exchange(
        &proxy,
        ListenerOptions::default(),
        &startup(&[("user", "u")]),
    )
    .await;
    assert_eq!(out.first(), Some(&b'R'), "the client was let in: {out:?}");
    assert!(!out.contains(&b'E'), "{out:?}");
    server.await.unwrap();
}

#[test]
fn the_sqlstate_is_read_from_an_error_body() {
    assert_eq!(
        protocol::error_code(&error_body("57P03", "x")),
        Some(&b"57P03"[..])
    );
    assert_eq!(protocol::error_code(b"Mno code\0\0"), None);
    assert_eq!(protocol::error_code(b"Cunterminated"), None);
    assert_eq!(protocol::error_code(b""), None);
}

/// A switchover's fence fires while a client is half way through its
/// password exchange with the old primary (what a client that connects for
/// every write meets in a switchover): the session cannot be set up
/// elsewhere, the old primary still serves during the drain, so the
/// authentication finishes and the first statement runs there; no error
/// reaches the client before its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_fence_lets_a_session_in_its_password_exchange_finish() {
    let (got, answer) = fenced_in_password_exchange(FenceReason::primary_switched_over()).await;
    assert_eq!(got.first(), Some(&b'R'), "{got:?}");
    assert!(
        !got.contains(&b'E'),
        "no error before the first statement: {got:?}"
    );
    let mut expect = msg(b'C', b"INSERT 0 1\0");
    expect.extend(msg(b'Z', b"I"));
    assert!(
        answer.starts_with(&expect),
        "the first statement's answer reached the client: {answer:?}"
    );
    let fields = error_fields(&answer[expect.len()..]);
    assert_eq!(
        field(&fields, b'C'),
        Some("57P01"),
        "then a clean FATAL: {answer:?}"
    );
}

/// A failover's fence (the old primary may be cut off, and is stopping)
/// still ends a session in its password exchange at once, with 57P03.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_fence_ends_a_session_in_its_password_exchange() {
    let (got, _) = fenced_in_password_exchange(FenceReason::primary_changed()).await;
    assert!(got.contains(&b'E'), "no ErrorResponse in {got:?}");
    let fields = error_fields(&got);
    assert_eq!(field(&fields, b'C'), Some("57P03"), "{got:?}");
    assert!(!got.starts_with(b"R"), "{got:?}");
}

/// A client sends its password; `reason`'s fence fires on the primary
/// before the server answers it. Returns what the client read up to the
/// first ReadyForQuery (or the end), and what it read after one query.
async fn fenced_in_password_exchange(reason: FenceReason) -> (Vec<u8>, Vec<u8>) {
    let asked = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(tokio::sync::Notify::new());
    let (a, g) = (asked.clone(), go.clone());
    let (addr, _) = fake_backend(move |mut s| {
        let (a, g) = (a.clone(), g.clone());
        async move {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await; // startup
            let _ = s.write_all(&msg(b'R', &3u32.to_be_bytes())).await; // cleartext
            let _ = s.read(&mut buf).await; // the password
            a.notify_one();
            g.notified().await;
            let mut v = msg(b'R', &0u32.to_be_bytes());
            v.extend(msg(b'S', b"in_hot_standby\0off\0"));
            v.extend(msg(b'K', &[0, 0, 0, 9, 1, 2, 3, 4]));
            v.extend(msg(b'Z', b"I"));
            let _ = s.write_all(&v).await;
            let _ = s.read(&mut buf).await; // the query
            let mut v = msg(b'C', b"INSERT 0 1\0");
            v.extend(msg(b'Z', b"I"));
            let _ = s.write_all(&v).await;
            let _ = s.read(&mut buf).await;
        }
    })
    .await;
    let proxy = primary_proxy(&addr, Duration::from_secs(5));
    let (mut client, server): (DuplexStream, DuplexStream) = tokio::io::duplex(64 * 1024);
    proxy.serve_connection(
        server,
        PEER.parse().unwrap(),
        &Arc::new(ListenerOptions::default()),
    );
    client.write_all(&startup(&[("user", "u")])).await.unwrap();
    let mut out = vec![0u8; 9];
    client.read_exact(&mut out).await.unwrap();
    assert_eq!(out, msg(b'R', &3u32.to_be_bytes()));
    client.write_all(&msg(b'p', b"secret\0")).await.unwrap();
    asked.notified().await;
    // What a switchover does: the view names no primary, the sessions on
    // the old one are fenced for a drain.
    proxy.view().store(View {
        generation: 2,
        primary: None,
        replicas: Vec::new(),
    });
    proxy.fence_backend(&Backend::new(addr.as_str()), reason);
    go.notify_one();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(&msg(b'Z', b"I")) {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the greeting arrives")
            .unwrap();
        if n == 0 {
            return (got, Vec::new());
        }
        got.extend_from_slice(&buf[..n]);
    }
    client.write_all(&msg(b'Q', b"INSERT 1\0")).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer)).await;
    (got, answer)
}

/// A server that ends a session in its startup with 57P01 or 57P02 (its
/// postmaster died under it, or it is restarting after a crash) has run
/// nothing and the client has seen nothing: the session is held and set
/// up again, as for 57P03.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_ending_a_session_in_its_startup_is_tried_again() {
    use std::sync::atomic::Ordering;
    for code in ["57P01", "57P02"] {
        let text = "terminating connection due to unexpected postmaster exit";
        let (addr, seen) = refusing_primary(1, code, text).await;
        let proxy = primary_proxy(&addr, Duration::from_secs(5));
        let out = exchange(
            &proxy,
            ListenerOptions::default(),
            &startup(&[("user", "u")]),
        )
        .await;
        assert_eq!(
            out.first(),
            Some(&b'R'),
            "{code}: the client was let in: {out:?}"
        );
        assert!(!out.contains(&b'E'), "{code}: {out:?}");
        assert_eq!(seen.load(Ordering::SeqCst), 2, "{code}");
    }
}
