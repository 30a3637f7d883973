use std::time::Duration;

use proxy_core::ProxyConfig;
use tokio::net::TcpStream;

use crate::support::{
    connect, connect_watched, db_message, free_port, must_fail, sqlstate, try_connect, PgServer,
    TestProxy,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_with_53300() {
    let pg = PgServer::start().await;
    let cfg = ProxyConfig {
        max_connections: 2,
        ..Default::default()
    };
    let proxy = TestProxy::start(&pg.addr(), cfg).await;
    let a = connect(&proxy.conn("postgres")).await;
    let b = connect(&proxy.conn("postgres")).await;
    let e = must_fail(
        try_connect(&proxy.conn("postgres")).await,
        "third must be refused",
    );
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
    assert!(
        db_message(&e).contains("too many client connections"),
        "{e:?}"
    );
    // The two admitted sessions are unaffected, and a slot frees on close.
    a.simple_query("SELECT 1").await.unwrap();
    drop(a);
    crate::assert_eventually!(
        try_connect(&proxy.conn("postgres")).await.is_ok(),
        Duration::from_secs(5),
        "a freed slot was not reused"
    );
    b.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_gives_08006_with_a_clear_message() {
    let port = free_port();
    let proxy = TestProxy::start(&format!("127.0.0.1:{port}"), ProxyConfig::default()).await;
    let e = must_fail(try_connect(&proxy.conn("postgres")).await, "must fail");
    assert_eq!(sqlstate(&e).as_deref(), Some("08006"), "{e}");
    let db = e.as_db_error().unwrap();
    // A client that has not authenticated learns nothing of the network:
    // the address and the OS error are in the proxy's log only.
    assert_eq!(
        db.message(),
        "could not connect to the database server",
        "{db:?}"
    );
    assert!(db.detail().is_none(), "{db:?}");
    assert!(db.hint().unwrap_or("").contains("retrying is safe"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_sessions() {
    let pg = PgServer::start().await;
    let proxy = TestProxy::start(&pg.addr(), ProxyConfig::default()).await;
    let conn = proxy.conn("postgres");
    let mut tasks = Vec::new();
    for _ in 0..500 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move { connect(&conn).await }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    assert_eq!(proxy.proxy.established_sessions(), 500);
    // All 500 are open at once; each runs a query on its own backend.
    let mut queries = Vec::new();
    for c in &clients {
        queries.push(c.query_one("SELECT pg_backend_pid(), pg_sleep(0.2)::text", &[]));
    }
    let mut pids = std::collections::HashSet::new();
    for r in futures_util::future::join_all(queries).await {
        pids.insert(r.unwrap().get::<_, i32>(0));
    }
    assert_eq!(pids.len(), 500);
    drop(clients);
    crate::assert_eventually!(
        proxy.proxy.active_connections() == 0,
        Duration::from_secs(10),
        "sessions were not released: {}",
        proxy.proxy.active_connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_silent_connections_do_not_starve_real_clients() {
    let pg = PgServer::start().await;
    let proxy = TestProxy::start(&pg.addr(), ProxyConfig::default()).await;
    let healthy = connect(&proxy.conn("postgres")).await;
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    crate::assert_eventually!(
        proxy.proxy.active_connections() == 2001,
        Duration::from_secs(10),
        "accepted {}",
        proxy.proxy.active_connections()
    );
    // New clients and the existing one are served while 2000 sit silent.
    let t = std::time::Instant::now();
    let fresh = connect(&proxy.conn("postgres")).await;
    fresh.simple_query("SELECT 1").await.unwrap();
    healthy.simple_query("SELECT 1").await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a new session took {:?}",
        t.elapsed()
    );
    drop(idle);
    crate::assert_eventually!(
        proxy.proxy.active_connections() == 2,
        Duration::from_secs(10),
        "silent connections were not released: {}",
        proxy.proxy.active_connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_work_finish_then_ends_the_rest() {
    let pg = PgServer::start().await;
    let proxy = TestProxy::start(&pg.addr(), ProxyConfig::default()).await;
    // One session that is idle for ever, one that is busy for a while.
    let (idle, idle_conn) = connect_watched(&proxy.conn("postgres")).await;
    idle.simple_query("SELECT 1").await.unwrap();
    let busy = connect(&proxy.conn("postgres")).await;
    let busy_query = tokio::spawn(async move {
        let r = busy.simple_query("SELECT pg_sleep(1)").await;
        drop(busy);
        r
    });
    // The busy query is running before shutdown begins.
    crate::support::wait_until_running(&pg, "SELECT pg_sleep(1)", 1, Duration::from_millis(900))
        .await;
    let p = proxy.proxy.clone();
    let shutdown = tokio::spawn(async move { p.shutdown(Duration::from_secs(2)).await });
    // New connections are refused from now on.
    crate::assert_eventually!(
        try_connect(&proxy.conn("postgres")).await.is_err(),
        Duration::from_secs(2),
        "still accepting after shutdown began"
    );
    // The busy session finishes its work within the grace period.
    busy_query
        .await
        .unwrap()
        .expect("work in progress completes");
    // The idle one is ended after the grace period with a clean FATAL.
    let ended = shutdown.await.unwrap();
    assert_eq!(ended, 1);
    let err = idle_conn
        .await
        .unwrap()
        .expect_err("the idle session is terminated");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err}");
    assert!(db_message(&err).contains("shutting down"), "{err:?}");
    assert_eq!(proxy.proxy.active_connections(), 0);
}
