//! L7 routing against real PostgreSQL: replica routes with lag limits and
//! per-session settings (through real keepers and a sentinel), the server
//! role check at the first ReadyForQuery, standby sessions ended when their
//! standby leaves the view or the view goes stale, direct TLS, PROXY
//! protocol v2 and SNI routing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::ClusterSpec;
use proxy_core::{
    Backend, ListenerOptions, ProxyConfig, Replica, Route, Rule, View, ViewChange, ViewHandle,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

use crate::failover::LocalCluster;
use crate::support::{
    connect_watched, db_message, ended_with, self_signed_for, sqlstate, try_connect, PgServer,
    TestProxy,
};

/// Where a session through `conn` lands: its server port and whether that
/// server is a standby.
async fn landing(conn: &str) -> Result<(u16, bool), tokio_postgres::Error> {
    let c = try_connect(conn).await?;
    let row = c
        .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
        .await?;
    Ok((row.get::<_, i32>(0) as u16, row.get(1)))
}

fn with_options(conn: &str, options: &str) -> String {
    format!("{conn} options='{options}'")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_routes_follow_roles_lag_and_session_settings() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let spec = ClusterSpec {
        hold_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let mut c = LocalCluster::up_with(&url, store, spec, 1, 2).await;
    let replica_conn = c.proxy.replica_conn().await;
    let (primary_port, standby) = (c.ports[c.master - 1], c.other());
    let standby_port = c.ports[standby - 1];
    crate::assert_eventually!(
        landing(&replica_conn).await.ok() == Some((standby_port, true)),
        Duration::from_secs(20),
        "the replica port never reached the standby: {:?}",
        c.proxy.proxy.view().load()
    );

    // The route setting picks a standby from the primary port, and is
    // taken out of the startup message; other options stay.
    let opts = with_options(
        &c.conn,
        "-c keelson.route=replica -c statement_timeout=1234",
    );
    assert_eq!(landing(&opts).await.unwrap(), (standby_port, true));
    let s = try_connect(&opts).await.unwrap();
    let shown = s.query_one("SHOW keelson.route", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&shown).as_deref(), Some("42704"), "{shown}");
    let timeout: String = s
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "1234ms");
    let bad = try_connect(&with_options(&c.conn, "-c keelson.route=nowhere"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&bad).as_deref(), Some("22023"), "{bad}");
    assert!(db_message(&bad).contains("keelson.route"), "{bad}");
    assert_eq!(landing(&c.conn).await.unwrap(), (primary_port, false));

    // A cancel through the replica port stops a query on the standby.
    let sleeper = try_connect(&replica_conn).await.unwrap();
    let token = sleeper.cancel_token();
    let started = Instant::now();
    let running = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(30)").await });
    crate::assert_eventually!(
        c.direct(
            standby,
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
        )
        .await
            == Some(1),
        Duration::from_secs(10),
        "the query never started on the standby"
    );
    token.cancel_query(NoTls).await.unwrap();
    let err = running.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // Replay paused while the primary writes: the standby falls beyond the
    // 1 MiB limit and gets no new replica sessions; prefer-replica goes to
    // the primary.
    let (_held, held_conn) = connect_watched(&replica_conn).await;
    let standby_conn = format!("host=127.0.0.1 port={standby_port} user=postgres dbname=postgres");
    let sc = try_connect(&standby_conn).await.unwrap();
    sc.batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let w = try_connect(&c.conn).await.unwrap();
    w.batch_execute("INSERT INTO w SELECT generate_series(1, 200000)")
        .await
        .unwrap();
    let lagging = |v: &View| v.replicas.iter().any(|r| r.lag_bytes > 1 << 20);
    crate::assert_eventually!(
        lagging(&c.proxy.proxy.view().load()),
        Duration::from_secs(20),
        "the proxy never saw the lag: {:?}",
        c.proxy.proxy.view().load()
    );
    // replica_lag_fence: its open replica session ends with a clean FATAL.
    let e = ended_with(
        held_conn,
        Duration::from_secs(5),
        "session on the lagging standby",
    )
    .await;
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    assert!(db_message(&e).contains("fell behind"), "{e}");
    let refused = try_connect(&replica_conn).await.unwrap_err();
    assert_eq!(sqlstate(&refused).as_deref(), Some("57P03"), "{refused}");
    assert!(db_message(&refused).contains("lag limit"), "{refused}");
    let prefer = with_options(&c.conn, "-c keelson.route=prefer-replica");
    assert_eq!(landing(&prefer).await.unwrap(), (primary_port, false));
    // Caught up again: replica sessions come back.
    sc.batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    crate::assert_eventually!(
        landing(&replica_conn).await.ok() == Some((standby_port, true)),
        Duration::from_secs(20),
        "the standby never took replica sessions again: {:?}",
        c.proxy.proxy.view().load()
    );
    assert_eq!(landing(&prefer).await.unwrap(), (standby_port, true));

    // Every standby down: prefer-replica goes to the primary, replica is
    // held and then refused.
    drop(sc);
    c.keepers[standby - 1] = None;
    crate::assert_eventually!(
        c.proxy.proxy.view().load().replicas.is_empty(),
        Duration::from_secs(20),
        "the stopped standby stayed in the view"
    );
    assert_eq!(landing(&prefer).await.unwrap(), (primary_port, false));
    let t = Instant::now();
    let refused = try_connect(&replica_conn).await.unwrap_err();
    assert_eq!(sqlstate(&refused).as_deref(), Some("57P03"), "{refused}");
    assert!(t.elapsed() >= Duration::from_millis(900), "held first");
}

/// A primary and a streaming standby, started with the keeper's primitives.
pub(crate) struct Pair {
    _dir: tempfile::TempDir,
    pub(crate) primary: keeper::Instance,
    pub(crate) standby: keeper::Instance,
}

impl Pair {
    /// With this machine's PostgreSQL.
    async fn start() -> Pair {
        Self::start_with(keeper::PgBin::find(None).unwrap()).await
    }

    pub(crate) async fn start_with(bin: keeper::PgBin) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let repl = keeper::Replication {
            user: "keelson_repl".into(),
            password: "pw".into(),
        };
        let port = crate::support::free_port;
        let mut primary = keeper::Instance::new(
            bin.clone(),
            dir.path().join("a"),
            "127.0.0.1",
            port(),
            repl.clone(),
        );
        primary.initdb().await.unwrap();
        primary
            .write_config(&Default::default(), None, &[])
            .unwrap();
        primary.start(Duration::from_secs(30)).await.unwrap();
        primary.ensure_replication_account().await.unwrap();
        let mut standby =
            keeper::Instance::new(bin, dir.path().join("b"), "127.0.0.1", port(), repl);
        standby.basebackup(&primary.address(), None).await.unwrap();
        let up = keeper::Upstream {
            address: primary.address(),
            application_name: "b".into(),
            slot: None,
        };
        standby
            .write_config(&Default::default(), Some(&up), &[])
            .unwrap();
        standby.start(Duration::from_secs(30)).await.unwrap();
        Pair {
            _dir: dir,
            primary,
            standby,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_role_is_checked_whatever_the_view_says() {
    check_server_roles(&Pair::start().await).await;
}

/// A stale view is caught by the server's own word; the right one works,
/// and sessions through it are clean.
pub(crate) async fn check_server_roles(pair: &Pair) {
    let (a, b) = (pair.primary.address(), pair.standby.address());
    // A stale view: it names the standby as primary and the primary as a
    // replica.
    let wrong = View {
        generation: 1,
        primary: Some(Backend::new(b.clone())),
        replicas: vec![Replica::fresh(Backend::new(a.clone()))],
    };
    let view = ViewHandle::new(wrong);
    let proxy = TestProxy::with_view(view.clone(), ProxyConfig::default()).await;
    let replica_conn = proxy.replica_conn().await;
    let e = try_connect(&proxy.conn("postgres")).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e}");
    assert!(db_message(&e).contains("is a standby"), "{e}");
    let e = try_connect(&replica_conn).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e}");
    assert!(db_message(&e).contains("is a primary"), "{e}");
    // The right view: both routes work.
    view.store(View {
        generation: 2,
        primary: Some(Backend::new(a)),
        replicas: vec![Replica::fresh(Backend::new(b))],
    });
    assert_eq!(
        landing(&proxy.conn("postgres")).await.unwrap(),
        (pair.primary.port, false)
    );
    assert_eq!(
        landing(&replica_conn).await.unwrap(),
        (pair.standby.port, true)
    );
    // Nothing of the proxy's own checks reaches the client: a simple and an
    // extended query give exactly their results.
    for conn in [proxy.conn("postgres"), replica_conn] {
        let c = try_connect(&conn).await.unwrap();
        let msgs = c.simple_query("SELECT 41 + 1").await.unwrap();
        let rows: Vec<_> = msgs
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
                _ => None,
            })
            .collect();
        assert_eq!(rows, vec![Some("42".to_owned())], "{conn}");
        assert!(
            matches!(
                msgs.last(),
                Some(tokio_postgres::SimpleQueryMessage::CommandComplete(1))
            ),
            "{conn}"
        );
        let n: i32 = c
            .query_one("SELECT $1::int", &[&7i32])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 7);
    }
}

/// A rustls client that trusts `cert`, offering `alpn`.
fn tls_client(
    cert: rustls::pki_types::CertificateDer<'static>,
    alpn: &[&[u8]],
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A session over direct TLS (TLS from the first byte, as
/// `sslnegotiation=direct`) to `addr`, with SNI `name`.
async fn direct_tls_session(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    name: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let tls = connector.connect(server_name, tcp).await.unwrap();
    let mut cfg = tokio_postgres::Config::new();
    cfg.user("postgres").dbname("postgres");
    let (client, conn) = cfg.connect_raw(tls, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_postgresql() {
    let pg = PgServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = self_signed_for(dir.path(), &["localhost"]);
    let cfg = ProxyConfig {
        tls: Some(proxy_core::tls::server_config(&cert, &key).unwrap()),
        ..Default::default()
    };
    let proxy = TestProxy::start(&pg.addr(), cfg).await;
    let good = tls_client(der.clone(), &[b"postgresql"]);
    let client = direct_tls_session(&good, proxy.addr, "localhost")
        .await
        .unwrap();
    let port: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port as u16, pg.port);
    // Without ALPN the proxy refuses, over TLS, with a protocol violation.
    let none = tls_client(der, &[]);
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let mut tls = none
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut reply)).await;
    let text = String::from_utf8_lossy(&reply);
    assert_eq!(reply.first(), Some(&b'E'), "{text}");
    assert!(text.contains("08P01") && text.contains("ALPN"), "{text}");
    // Plain SSLRequest clients are unaffected.
    assert!(try_connect(&proxy.conn("postgres")).await.is_ok());
}

/// Connects through `addr` after sending `header` (a PROXY header) first.
async fn via_proxy_header(
    addr: SocketAddr,
    header: Option<Vec<u8>>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    if let Some(h) = header {
        tcp.write_all(&h).await.unwrap();
    }
    let mut cfg = tokio_postgres::Config::new();
    cfg.user("postgres").dbname("postgres");
    let (client, conn) = cfg.connect_raw(tcp, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_from_trusted_and_untrusted_sources() {
    let pg = PgServer::start().await;
    // Clients from 203.0.113.0/24 must use replicas; there are none, so
    // they are refused after a short hold. Only a real client address
    // taken from the header can match that rule.
    let cfg = ProxyConfig {
        rules: vec![Rule {
            source: Some("203.0.113.0/24".parse().unwrap()),
            route: Route::Replica,
            ..Default::default()
        }],
        hold_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let proxy = TestProxy::start(&pg.addr(), cfg).await;
    let nets = |n: &str| -> Option<Arc<[ipnet::IpNet]>> { Some(vec![n.parse().unwrap()].into()) };
    let trusted = proxy
        .listen(ListenerOptions {
            proxy_protocol: nets("127.0.0.0/8"),
            ..Default::default()
        })
        .await;
    let untrusted = proxy
        .listen(ListenerOptions {
            proxy_protocol: nets("10.0.0.0/8"),
            ..Default::default()
        })
        .await;
    let header = |client: &str| {
        Some(proxy_core::proxy_protocol::encode_v2(
            client.parse().unwrap(),
            trusted,
        ))
    };
    let c = via_proxy_header(trusted, header("198.51.100.9:40000"))
        .await
        .unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    let e = via_proxy_header(trusted, header("203.0.113.7:40000"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e}");
    assert!(db_message(&e).contains("replica"), "{e}");
    let e = via_proxy_header(trusted, None).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("08P01"), "{e}");
    assert!(db_message(&e).contains("expected a PROXY protocol"), "{e}");
    let e = via_proxy_header(untrusted, header("198.51.100.9:40000"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("08P01"), "{e}");
    assert!(db_message(&e).contains("not a trusted proxy"), "{e}");
    let c = via_proxy_header(untrusted, None).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_routes_two_clusters_through_one_proxy() {
    let (a, b) = tokio::join!(PgServer::start(), PgServer::start());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = self_signed_for(dir.path(), &["a.test", "b.test", "c.test"]);
    let view_of = |pg: &PgServer| ViewHandle::new(View::fixed(Backend::new(pg.addr())));
    // c.test has no primary; its own hold timeout applies, not the proxy's.
    let c = ViewHandle::named("c", View::default());
    c.set_hold_timeout(Duration::from_millis(300));
    let cfg = ProxyConfig {
        tls: Some(proxy_core::tls::server_config(&cert, &key).unwrap()),
        server_names: HashMap::from([
            ("a.test".to_owned(), view_of(&a)),
            ("b.test".to_owned(), view_of(&b)),
            ("c.test".to_owned(), c),
        ]),
        hold_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    // The proxy's own view has no primary: only SNI reaches a cluster.
    let proxy = TestProxy::with_view(ViewHandle::new(View::default()), cfg).await;
    let client = tls_client(der.clone(), &[b"postgresql"]);
    for (name, pg) in [("a.test", &a), ("b.test", &b)] {
        let c = direct_tls_session(&client, proxy.addr, name).await.unwrap();
        let port: i32 = c
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(port as u16, pg.port, "{name}");
    }
    let t = Instant::now();
    let e = direct_tls_session(&client, proxy.addr, "c.test")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e}");
    assert!(db_message(&e).contains("300ms"), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the proxy-wide 30 s applied"
    );
    // libpq over SSLRequest sends SNI too.
    let out = std::process::Command::new("psql")
        .arg(format!(
            "host=b.test hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
            proxy.port()
        ))
        .args(["-XAtc", "SELECT inet_server_port()"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        b.port.to_string(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 13: TLS to PostgreSQL per SNI cluster. The proxy-wide setting is
/// `require`; cluster `a` overrides it with verify-full against its CA,
/// cluster `b` (a server without TLS) with plain TCP. `pg_stat_ssl` shows
/// a's hop encrypted; b's session works, which the proxy-wide `require`
/// would have refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_is_chosen_per_sni_cluster() {
    use proxy_core::tls::{backend_tls, BackendTlsMode};
    let (a, b) = tokio::join!(PgServer::start(), PgServer::start());
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = crate::clients::pg_with_tls(&a, dir.path()).await;
    let (cert, key, der) = self_signed_for(dir.path(), &["a.test", "b.test"]);
    let named =
        |name: &str, pg: &PgServer| ViewHandle::named(name, View::fixed(Backend::new(pg.addr())));
    let cfg = ProxyConfig {
        tls: Some(proxy_core::tls::server_config(&cert, &key).unwrap()),
        server_names: HashMap::from([
            ("a.test".to_owned(), named("a", &a)),
            ("b.test".to_owned(), named("b", &b)),
        ]),
        backend_tls: Some(backend_tls(BackendTlsMode::Require, None).unwrap()),
        cluster_backend_tls: HashMap::from([
            (
                "a".to_owned(),
                Some(backend_tls(BackendTlsMode::VerifyFull, Some(&ca)).unwrap()),
            ),
            ("b".to_owned(), None),
        ]),
        ..Default::default()
    };
    let proxy = TestProxy::with_view(ViewHandle::new(View::default()), cfg).await;
    let client = tls_client(der, &[b"postgresql"]);
    let query = "SELECT inet_server_port(), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    for (name, pg, encrypted) in [("a.test", &a, true), ("b.test", &b, false)] {
        let c = direct_tls_session(&client, proxy.addr, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let row = c.query_one(query, &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0) as u16, pg.port, "{name}");
        assert_eq!(row.get::<_, bool>(1), encrypted, "{name}: pg_stat_ssl.ssl");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_replicas_are_skipped() {
    let pair = Pair::start().await;
    let dead = |_| format!("127.0.0.1:{}", crate::support::free_port());
    let (dead1, dead2) = (dead(1), dead(2));
    let view = ViewHandle::new(View {
        generation: 1,
        primary: Some(Backend::new(pair.primary.address())),
        replicas: [dead1.clone(), pair.standby.address(), dead2.clone()]
            .into_iter()
            .map(|a| Replica::fresh(Backend::new(a)))
            .collect(),
    });
    let proxy = TestProxy::with_view(view.clone(), ProxyConfig::default()).await;
    let replica_conn = proxy.replica_conn().await;
    // Whichever replica is tried first, every session reaches the live one.
    for _ in 0..6 {
        assert_eq!(
            landing(&replica_conn).await.unwrap(),
            (pair.standby.port, true)
        );
    }
    // No live replica: replica gets the connection error, prefer-replica
    // the primary.
    view.store(View {
        generation: 2,
        primary: Some(Backend::new(pair.primary.address())),
        replicas: vec![
            Replica::fresh(Backend::new(dead1)),
            Replica::fresh(Backend::new(dead2)),
        ],
    });
    let e = try_connect(&replica_conn).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("08006"), "{e}");
    let prefer = with_options(&proxy.conn("postgres"), "-c keelson.route=prefer-replica");
    assert_eq!(landing(&prefer).await.unwrap(), (pair.primary.port, false));
}

/// F11: sessions on a standby that leaves the replica set end, saying why;
/// in particular a replica-route session whose standby is promoted never
/// becomes read-write. Primary sessions are not touched by either change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_sessions_end_when_their_standby_leaves_or_is_promoted() {
    let pair = Pair::start().await;
    let (a, b) = (pair.primary.address(), pair.standby.address());
    let full = |generation| View {
        generation,
        primary: Some(Backend::new(a.clone())),
        replicas: vec![Replica::fresh(Backend::new(b.clone()))],
    };
    let view = ViewHandle::new(full(1));
    let cfg = ProxyConfig {
        hold_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let proxy = TestProxy::with_view(view.clone(), cfg).await;
    let replica_conn = proxy.replica_conn().await;
    let (primary, _primary_conn) = connect_watched(&proxy.conn("postgres")).await;
    primary
        .batch_execute("CREATE TABLE IF NOT EXISTS f11 (x int)")
        .await
        .unwrap();

    // The standby turns unhealthy: the sentinel's view drops it.
    let (_r1, r1_conn) = connect_watched(&replica_conn).await;
    let without = View {
        replicas: vec![],
        ..full(2)
    };
    proxy.proxy.apply(&view, without, ViewChange::Update);
    let e = ended_with(
        r1_conn,
        Duration::from_secs(5),
        "the removed standby's session",
    )
    .await;
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    assert!(
        db_message(&e).contains("left the cluster's replica set"),
        "{e}"
    );
    primary
        .simple_query("SELECT 1")
        .await
        .expect("the primary session goes on");

    // Back in the set; then it is promoted (failover to B).
    proxy.proxy.apply(&view, full(3), ViewChange::Update);
    let (r2, r2_conn) = connect_watched(&replica_conn).await;
    let in_recovery: bool = r2
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery);
    pair.standby.promote().await.unwrap();
    let promoted = View {
        generation: 4,
        primary: Some(Backend::new(b.clone())),
        replicas: vec![],
    };
    proxy.proxy.apply(&view, promoted, ViewChange::Update);
    let e = ended_with(
        r2_conn,
        Duration::from_secs(5),
        "the promoted standby's session",
    )
    .await;
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    assert!(db_message(&e).contains("promoted"), "{e}");
    let write = r2.batch_execute("INSERT INTO f11 VALUES (1)").await;
    assert!(write.is_err(), "the replica session became read-write");
    // New replica sessions have no standby to go to; primary sessions go to B.
    let refused = try_connect(&replica_conn).await.unwrap_err();
    assert_eq!(sqlstate(&refused).as_deref(), Some("57P03"), "{refused}");
    assert_eq!(
        landing(&proxy.conn("postgres")).await.unwrap(),
        (pair.standby.port, false)
    );
}

/// A cluster whose databases are the pair: `a` primary, `b` a healthy,
/// streaming standby.
fn pair_cluster(pair: &Pair, spec: ClusterSpec) -> cluster::ClusterData {
    use cluster::data::{Db, DbSpec, DbStatus, Role};
    let mut data = cluster::ClusterData::new(spec);
    data.phase = cluster::data::ClusterPhase::Normal;
    for (uid, addr, role) in [
        ("a", pair.primary.address(), Role::Master),
        ("b", pair.standby.address(), Role::Standby),
    ] {
        data.dbs.insert(
            uid.to_owned(),
            Db {
                keeper: uid.to_owned(),
                spec: DbSpec {
                    role,
                    ..Default::default()
                },
                status: DbStatus {
                    healthy: true,
                    address: Some(addr),
                    in_recovery: role == Role::Standby,
                    streaming: role == Role::Standby,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
    }
    data.set_proxy_master(Some("a"));
    data
}

/// F11: a proxy that cannot confirm its view drops the replicas too (their
/// lag figures are frozen): replica sessions end, new ones are held and
/// refused with 57P03 while it is stale, and come back when it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_proxy_serves_no_replica_sessions() {
    use cluster::Store;
    let pair = Pair::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = cluster::open(&format!("file://{}", dir.path().display()))
        .await
        .unwrap();
    let keys = cluster::Keys::new("keelson", "main");
    let spec = ClusterSpec {
        proxy_timeout: Duration::from_secs(2),
        hold_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    store
        .put(&keys.clusterdata(), &pair_cluster(&pair, spec).to_json(), 0)
        .await
        .unwrap();
    let faulty = crate::support::FaultyStore::new(store.clone());
    let proxy =
        TestProxy::with_view(ViewHandle::new(View::default()), ProxyConfig::default()).await;
    let status = keelson::follow::spawn(
        faulty.clone(),
        keys.clone(),
        "p1".into(),
        proxy.proxy.clone(),
        proxy.proxy.view().clone(),
    );
    let replica_conn = proxy.replica_conn().await;
    crate::assert_eventually!(
        landing(&replica_conn).await.ok() == Some((pair.standby.port, true)),
        Duration::from_secs(10),
        "replica sessions never reached the standby"
    );
    let (_r, r_conn) = connect_watched(&replica_conn).await;

    faulty.cut(true);
    let e = ended_with(r_conn, Duration::from_secs(10), "the replica session").await;
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    assert!(
        db_message(&e).contains("cannot confirm this standby"),
        "{e}"
    );
    assert!(!status.is_fresh());
    let t = Instant::now();
    let refused = try_connect(&replica_conn).await.unwrap_err();
    assert_eq!(sqlstate(&refused).as_deref(), Some("57P03"), "{refused}");
    assert!(t.elapsed() >= Duration::from_millis(900), "held first");
    let prefer = with_options(&proxy.conn("postgres"), "-c keelson.route=prefer-replica");
    let refused = try_connect(&prefer).await.unwrap_err();
    assert_eq!(sqlstate(&refused).as_deref(), Some("57P03"), "{refused}");

    faulty.cut(false);
    crate::assert_eventually!(
        landing(&replica_conn).await.ok() == Some((pair.standby.port, true)),
        Duration::from_secs(15),
        "replica sessions did not come back"
    );
}

/// Startup parameters are the client's bytes: PostgreSQL accepts any, and
/// when the proxy rebuilds the startup message (here, to take out
/// `keelson.route`, and to rewrite protocol 3.1 to 3.0) what PostgreSQL
/// receives is what the client sent, not U+FFFD replacements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_startup_parameters_reach_postgres_unchanged_through_a_rewrite() {
    let pg = crate::support::PgServer::start().await;
    let proxy = crate::support::TestProxy::start(&pg.addr(), ProxyConfig::default()).await;
    let direct = pg.superuser().await;
    for minor in [0u16, 1] {
        let startup = crate::support::startup_packet_bytes(
            minor,
            &[
                (b"user", b"postgres"),
                (b"application_name", b"caf\xe9"),
                (b"options", b"-c keelson.route=primary"),
            ],
        );
        let mut s = crate::support::RawSession::start(proxy.addr, &startup)
            .await
            .unwrap();
        s.query("SELECT 1").await.unwrap();
        // PostgreSQL shows a non-ASCII byte of application_name as `?`
        // (up to 15) or `\xE9` (16 and later); U+FFFD would be 3 bytes.
        let name: String = direct
            .query_one(
                "SELECT application_name FROM pg_stat_activity WHERE pid = $1",
                &[&(s.pid as i32)],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            name == "caf?" || name == "caf\\xE9",
            "protocol 3.{minor}: PostgreSQL received application_name {name:?}"
        );
    }
}
