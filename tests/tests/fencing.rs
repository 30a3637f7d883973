//! The proxy following a cluster store: routing by the stored primary,
//! fencing sessions on a demoted primary, holding clients while there is no
//! primary, refusing to route on a view it cannot confirm, and registration
//! under a lease. Each scenario runs against the file store and etcd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{AnyStore, ClusterSpec, Keys, Store};
use proxy_core::{ProxyConfig, View, ViewHandle};

use crate::support::{
    connect, connect_watched, db_message, ended_with, init_cluster, keelson_bin, landing_port,
    must_fail, set_master, sqlstate, try_connect, EtcdServer, PgServer, TestProxy,
};

async fn file_store() -> (AnyStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let s = cluster::open(&format!("file://{}", dir.path().display()))
        .await
        .unwrap();
    (s, dir)
}

async fn following_proxy(
    store: &AnyStore,
    keys: &Keys,
    uid: &str,
) -> (TestProxy, Arc<keelson::follow::FollowStatus>) {
    let proxy =
        TestProxy::with_view(ViewHandle::new(View::default()), ProxyConfig::default()).await;
    let status = keelson::follow::spawn(
        store.clone(),
        keys.clone(),
        uid.to_owned(),
        proxy.proxy.clone(),
        proxy.proxy.view().clone(),
    );
    (proxy, status)
}

async fn switch_primary(store: AnyStore) {
    let (a, b) = (PgServer::start().await, PgServer::start().await);
    let keys = Keys::new("keelson", "main");
    init_cluster(
        &store,
        &keys,
        ClusterSpec::default(),
        &[("a", a.addr()), ("b", b.addr())],
    )
    .await;
    set_master(&store, &keys, Some("a")).await;
    let (proxy, status) = following_proxy(&store, &keys, "p1").await;
    let conn = proxy.conn("postgres");
    crate::assert_eventually!(
        landing_port(&conn).await == Some(a.port),
        Duration::from_secs(10),
        "sessions never reached primary A"
    );
    // An idle session, and one idle in a transaction, both on A.
    let (idle, idle_conn) = connect_watched(&conn).await;
    idle.simple_query("SELECT 1").await.unwrap();
    let (txn, txn_conn) = connect_watched(&conn).await;
    txn.batch_execute("BEGIN; CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    let switched = Instant::now();
    let generation = set_master(&store, &keys, Some("b")).await;
    for (name, c) in [("idle", idle_conn), ("idle in transaction", txn_conn)] {
        let err = ended_with(
            c,
            Duration::from_secs(3),
            &format!("the {name} session on the old primary"),
        )
        .await;
        assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{name}: {err:?}");
        assert!(
            db_message(&err).contains("primary changed"),
            "{name}: {err:?}"
        );
    }
    let fenced_after = switched.elapsed();
    crate::assert_eventually!(
        landing_port(&conn).await == Some(b.port),
        Duration::from_secs(3),
        "new sessions did not reach B"
    );
    assert!(
        fenced_after < Duration::from_secs(2),
        "fencing took {fenced_after:?}"
    );
    // A's server sessions end too, once their linger is over.
    let direct_a = a.superuser().await;
    crate::assert_eventually!(
        direct_a
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0,
        proxy_core::FENCED_BACKEND_LINGER + Duration::from_secs(3),
        "sessions left on the demoted primary"
    );
    // The proxy acknowledged the generation it applied, under its lease.
    crate::assert_eventually!(
        store
            .get(&keys.proxy("p1"))
            .await
            .unwrap()
            .is_some_and(
                |kv| kv.value.contains(&format!("\"generation\":{generation}")) && kv.lease != 0
            ),
        Duration::from_secs(5),
        "registration does not show generation {generation}"
    );
    assert!(status.is_fresh());
}

async fn hold_until_primary(store: AnyStore) {
    let a = PgServer::start().await;
    let keys = Keys::new("keelson", "main");
    let spec = ClusterSpec {
        hold_timeout: Duration::from_millis(1500),
        ..Default::default()
    };
    init_cluster(&store, &keys, spec, &[("a", a.addr())]).await;
    let (proxy, status) = following_proxy(&store, &keys, "p1").await;
    crate::assert_eventually!(
        status.is_fresh(),
        Duration::from_secs(5),
        "never read the store"
    );
    let conn = proxy.conn("postgres");
    // No primary: the client is held, then released when one is named.
    let c2 = conn.clone();
    let waiting = tokio::spawn(async move { landing_port(&c2).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!waiting.is_finished(), "the client should be held");
    set_master(&store, &keys, Some("a")).await;
    let port = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        port,
        Some(a.port),
        "the held client reached the new primary"
    );
    // Held past hold_timeout: 57P03 with a clear message.
    set_master(&store, &keys, None).await;
    crate::assert_eventually!(
        proxy.proxy.view().load().primary.is_none(),
        Duration::from_secs(3),
        "the view still names a primary"
    );
    let t = Instant::now();
    let e = must_fail(try_connect(&conn).await, "no primary: must be refused");
    let waited = t.elapsed();
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e:?}");
    assert!(
        db_message(&e).contains("no primary server became available"),
        "{e:?}"
    );
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_primary_file_store() {
    let (s, _dir) = file_store().await;
    switch_primary(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_primary_etcd() {
    let etcd = EtcdServer::start().await;
    switch_primary(cluster::open(&etcd.url()).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_until_primary_file_store() {
    let (s, _dir) = file_store().await;
    hold_until_primary(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_until_primary_etcd() {
    let etcd = EtcdServer::start().await;
    hold_until_primary(cluster::open(&etcd.url()).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_stops_routing_after_proxy_timeout_and_recovers() {
    let mut etcd = EtcdServer::start().await;
    let store = cluster::open(&etcd.url()).await.unwrap();
    let a = PgServer::start().await;
    let keys = Keys::new("keelson", "main");
    let spec = ClusterSpec {
        proxy_timeout: Duration::from_secs(3),
        hold_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    init_cluster(&store, &keys, spec, &[("a", a.addr())]).await;
    set_master(&store, &keys, Some("a")).await;
    let (proxy, status) = following_proxy(&store, &keys, "p1").await;
    let conn = proxy.conn("postgres");
    crate::assert_eventually!(
        landing_port(&conn).await == Some(a.port),
        Duration::from_secs(10),
        "never routed"
    );
    let (s1, s1_conn) = connect_watched(&conn).await;

    // SIGSTOP: etcd hangs. A short outage is tolerated...
    etcd.pause();
    let paused = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s1.simple_query("SELECT 1")
        .await
        .expect("no fencing before proxy_timeout");
    assert!(status.is_fresh());
    // ...but past proxy_timeout the proxy stops routing to the primary.
    crate::assert_eventually!(
        !status.is_fresh(),
        Duration::from_secs(5),
        "still fresh with etcd stopped"
    );
    let noticed = paused.elapsed();
    assert!(
        noticed >= Duration::from_millis(2900),
        "went stale too early: {noticed:?}"
    );
    let err = ended_with(s1_conn, Duration::from_secs(3), "primary session ended").await;
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"));
    assert!(db_message(&err).contains("cluster store"), "{err:?}");
    let e = must_fail(try_connect(&conn).await, "no routing while stale");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"));
    assert!(!status.ready(), "/readyz must fail");

    // Then SIGKILL and a restart: the proxy recovers by itself.
    etcd.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.restart().await;
    crate::assert_eventually!(
        status.ready(),
        Duration::from_secs(15),
        "did not recover after etcd came back"
    );
    assert_eq!(landing_port(&conn).await, Some(a.port));
    connect(&conn).await.simple_query("SELECT 1").await.unwrap();
}

async fn killed_proxy_registration_expires(url: String, store: AnyStore) {
    let keys = Keys::new("keelson", "main");
    let spec = ClusterSpec {
        proxy_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    init_cluster(&store, &keys, spec, &[]).await;
    let port = crate::support::free_port();
    let mut child = std::process::Command::new(keelson_bin())
        .args([
            "proxy",
            "--store",
            &url,
            "--cluster",
            "main",
            "--uid",
            "doomed",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    crate::assert_eventually!(
        store.get(&keys.proxy("doomed")).await.unwrap().is_some(),
        Duration::from_secs(30),
        "the proxy never registered"
    );
    let killed = Instant::now();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    crate::assert_eventually!(
        store.get(&keys.proxy("doomed")).await.unwrap().is_none(),
        Duration::from_secs(8),
        "the registration outlived its lease"
    );
    assert!(
        killed.elapsed() >= Duration::from_millis(500),
        "removed too soon to be lease expiry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_proxy_registration_expires_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    killed_proxy_registration_expires(url, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_proxy_registration_expires_etcd() {
    let etcd = EtcdServer::start().await;
    let store = cluster::open(&etcd.url()).await.unwrap();
    killed_proxy_registration_expires(etcd.url(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_init_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let ctl = |args: &[&str]| {
        std::process::Command::new(keelson_bin())
            .args(["ctl", "--store", &url, "--cluster", "c1"])
            .args(args)
            .output()
            .unwrap()
    };
    let spec = dir.path().join("spec.json");
    std::fs::write(&spec, r#"{"fail_interval": "3s", "hold_timeout": "2s"}"#).unwrap();
    let out = ctl(&["init", "--spec", spec.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = ctl(&["init"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let out = ctl(&["spec", "show"]);
    let spec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(spec["fail_interval"], "3s");
    assert_eq!(spec["proxy_timeout"], "5s", "defaults fill the rest");
    let out = ctl(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["generation"], 0);
    assert!(status["master"].is_null());
    assert!(status["keepers"].as_array().unwrap().is_empty());
    assert!(status["proxies"].as_array().unwrap().is_empty());
    let newspec = dir.path().join("new.json");
    std::fs::write(&newspec, r#"{"fail_interval": "2s"}"#).unwrap();
    let out = ctl(&["spec", "update", "--file", newspec.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&["spec", "show"]);
    let spec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(spec["fail_interval"], "2s");
    let out = ctl(&["removekeeper", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no keeper nobody"));
    let out = ctl(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("primary:    none"));
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"min_sync": 3, "max_sync": 1}"#).unwrap();
    let out = std::process::Command::new(keelson_bin())
        .args([
            "ctl",
            "--store",
            &url,
            "--cluster",
            "c2",
            "init",
            "--spec",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("min_sync"));
}
