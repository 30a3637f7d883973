use std::time::{Duration, Instant};

use proxy_core::ProxyConfig;
use tokio_postgres::NoTls;

use crate::support::{connect, sqlstate, PgServer, TestProxy};

async fn wait_until_sleeping(pg: &PgServer) {
    let direct = pg.superuser().await;
    crate::assert_eventually!(
        direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%' AND state = 'active'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false),
        Duration::from_secs(10),
        "the query never started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_through_the_proxy_stops_the_query() {
    let pg = PgServer::start().await;
    let proxy = TestProxy::start(&pg.addr(), ProxyConfig::default()).await;
    let client = connect(&proxy.conn("postgres")).await;
    let token = client.cancel_token();
    let running = tokio::spawn(async move {
        let r = client.simple_query("SELECT pg_sleep(30)").await;
        (r, client)
    });
    wait_until_sleeping(&pg).await;
    let asked = Instant::now();
    token.cancel_query(NoTls).await.expect("send cancel");
    let (r, client) = running.await.unwrap();
    let elapsed = asked.elapsed();
    let e = r.expect_err("the query must be cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
    assert!(elapsed < Duration::from_secs(1), "cancel took {elapsed:?}");
    // The session survives its cancelled query.
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_sent_to_another_proxy_is_broadcast() {
    let pg = PgServer::start().await;
    let a = TestProxy::start(&pg.addr(), ProxyConfig::default()).await;
    let b = TestProxy::start(&pg.addr(), ProxyConfig::default()).await;
    let client = connect(&a.conn("postgres")).await;
    let token = client.cancel_token();
    let running = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    wait_until_sleeping(&pg).await;
    // Proxy B never saw this key: it must send the cancel to every backend.
    let asked = Instant::now();
    let s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    token.cancel_query_raw(s, NoTls).await.expect("send cancel");
    let e = running.await.unwrap().expect_err("cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"));
    assert!(asked.elapsed() < Duration::from_secs(1));
}
