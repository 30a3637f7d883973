//! The proxy following a cluster store: routing by the stored primary,
//! fencing sessions on a demoted primary, holding clients while there is no
//! primary, refusing to route on a view it cannot confirm, and registration
//! under a lease. Most scenarios run against the file store and etcd.
//!
//! Faults are modelled as they happen: a proxy cut off from the store (its
//! requests time out, its watch goes silent), a lagging store member
//! replaying old watch events, a proxy process frozen whole (SIGSTOP), a
//! second proxy started with the same uid.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{AnyStore, ClusterSpec, Keys, Store};
use proxy_core::{ProxyConfig, View, ViewHandle};

use crate::support::{
    admin_get, connect, connect_watched, db_message, ended_with, free_port, init_cluster,
    keelson_bin, landing_port, must_fail, registration, set_master, sqlstate, try_connect,
    update_spec, EtcdServer, FaultyStore, PgServer, TestProxy,
};

async fn file_store() -> (AnyStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let s = cluster::open(&format!("file://{}", dir.path().display()))
        .await
        .unwrap();
    (s, dir)
}

async fn following_proxy<S: Store + Clone>(
    store: &S,
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
    // An idle session, and one idle in a transaction, both on A. The idle
    // one has just read a result of many small rows (with kernel
    // forwarding, thousands of messages per arrival).
    let (idle, idle_conn) = connect_watched(&conn).await;
    let rows = idle
        .simple_query("SELECT generate_series(1, 100000)")
        .await
        .unwrap();
    let rows = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(rows, 100_000);
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
    // The proxy acknowledged the generation it applied, under its lease,
    // with the cluster incarnation it belongs to.
    crate::assert_eventually!(
        registration(&store, &keys, "p1")
            .await
            .is_some_and(|(r, lease)| r.generation == generation && lease != 0),
        Duration::from_secs(5),
        "registration does not show generation {generation}"
    );
    let (report, _) = registration(&store, &keys, "p1").await.unwrap();
    let data = cluster::ClusterData::from_json(
        &store.get(&keys.clusterdata()).await.unwrap().unwrap().value,
    )
    .unwrap();
    assert_eq!(report.uid, "p1");
    assert_eq!(report.instance, status.instance());
    assert_eq!(report.cluster_uid, data.uid);
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

/// F8, end to end: the store's newest value is applied (and acknowledged),
/// then an older one arrives on the watch, as when a lagging etcd member
/// catches up or a poll overtook queued events. The view and the
/// acknowledgement stay where they were.
async fn outdated_values_never_move_the_view_back(store: AnyStore) {
    let (a, b) = tokio::join!(PgServer::start(), PgServer::start());
    let keys = Keys::new("keelson", "main");
    init_cluster(
        &store,
        &keys,
        ClusterSpec::default(),
        &[("a", a.addr()), ("b", b.addr())],
    )
    .await;
    set_master(&store, &keys, Some("a")).await;
    let old = store.get(&keys.clusterdata()).await.unwrap().unwrap();
    let faulty = FaultyStore::new(store.clone());
    let (proxy, status) = following_proxy(&faulty, &keys, "p1").await;
    let conn = proxy.conn("postgres");
    crate::assert_eventually!(
        landing_port(&conn).await == Some(a.port),
        Duration::from_secs(10),
        "never routed to A"
    );
    let generation = set_master(&store, &keys, Some("b")).await;
    crate::assert_eventually!(
        landing_port(&conn).await == Some(b.port)
            && registration(&store, &keys, "p1")
                .await
                .is_some_and(|(r, _)| r.generation == generation),
        Duration::from_secs(10),
        "never moved to B"
    );
    // The value that named A, at its old revision, delivered again.
    faulty.replay(cluster::WatchEvent::Put(old.clone())).await;
    crate::assert_eventually!(
        status.outdated_values() >= 1,
        Duration::from_secs(5),
        "the replayed event was never seen"
    );
    assert_eq!(
        proxy.proxy.view().load().primary,
        Some(proxy_core::Backend::new(b.addr())),
        "the view went back to A"
    );
    assert_eq!(landing_port(&conn).await, Some(b.port));
    let (report, _) = registration(&store, &keys, "p1").await.unwrap();
    assert_eq!(
        report.generation, generation,
        "the acknowledgement went back"
    );
    // A delete older than the applied value is ignored too.
    faulty
        .replay(cluster::WatchEvent::Delete {
            key: keys.clusterdata(),
            mod_revision: old.mod_revision,
        })
        .await;
    crate::assert_eventually!(
        status.outdated_values() >= 2,
        Duration::from_secs(5),
        "the replayed delete was never seen"
    );
    assert_eq!(landing_port(&conn).await, Some(b.port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outdated_values_never_move_the_view_back_file_store() {
    let (s, _dir) = file_store().await;
    outdated_values_never_move_the_view_back(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outdated_values_never_move_the_view_back_etcd() {
    let etcd = EtcdServer::start().await;
    outdated_values_never_move_the_view_back(cluster::open(&etcd.url()).await.unwrap()).await;
}

/// F2a, end to end: `proxy_timeout` is raised from 2 s to 6 s at run time,
/// then the proxy is cut off from the store while its primary session is
/// open. The proxy must stop routing before its registration expires (the
/// moment a sentinel counts it as fenced), by a margin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raised_proxy_timeout_stops_routing_before_the_registration_expires() {
    let (store, _dir) = file_store().await;
    let a = PgServer::start().await;
    let keys = Keys::new("keelson", "main");
    let spec = |secs| ClusterSpec {
        proxy_timeout: Duration::from_secs(secs),
        hold_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    init_cluster(&store, &keys, spec(2), &[("a", a.addr())]).await;
    set_master(&store, &keys, Some("a")).await;
    let faulty = FaultyStore::new(store.clone());
    let (proxy, status) = following_proxy(&faulty, &keys, "p1").await;
    let conn = proxy.conn("postgres");
    crate::assert_eventually!(
        landing_port(&conn).await == Some(a.port)
            && status.lease_ttl() == Some(spec(2).proxy_lease_ttl()),
        Duration::from_secs(10),
        "never routed to A under a lease for 2 s"
    );
    let (_, first_lease) = registration(&store, &keys, "p1").await.unwrap();

    update_spec(&store, &keys, |s| s.proxy_timeout = Duration::from_secs(6)).await;
    crate::assert_eventually!(
        status.lease_ttl() == Some(spec(6).proxy_lease_ttl())
            && status
                .valid_until()
                .is_some_and(|t| t > tokio::time::Instant::now() + Duration::from_secs(4)),
        Duration::from_secs(10),
        "the lease was never granted anew for 6 s"
    );
    let (_, lease) = registration(&store, &keys, "p1").await.unwrap();
    assert_ne!(
        lease, first_lease,
        "the registration moved to the new lease"
    );

    let (s1, s1_conn) = connect_watched(&conn).await;
    s1.simple_query("SELECT 1").await.unwrap();
    faulty.cut(true);
    let cut = Instant::now();
    let fenced = tokio::spawn(async move {
        let e = ended_with(s1_conn, Duration::from_secs(15), "the primary session").await;
        (e, cut.elapsed())
    });
    crate::assert_eventually!(
        registration(&store, &keys, "p1").await.is_none(),
        Duration::from_secs(20),
        "the registration never expired"
    );
    let expired = cut.elapsed();
    let (err, fenced_after) = fenced.await.unwrap();
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err:?}");
    assert!(db_message(&err).contains("cluster store"), "{err:?}");
    assert!(!status.is_fresh());
    assert!(
        fenced_after >= Duration::from_secs(4),
        "stopped routing before the 6 s window: {fenced_after:?}"
    );
    assert!(
        fenced_after + Duration::from_secs(1) < expired,
        "routed until {fenced_after:?}, registration gone at {expired:?}"
    );
    // Healed: the proxy registers again and routes by itself.
    faulty.cut(false);
    crate::assert_eventually!(
        status.ready() && landing_port(&conn).await == Some(a.port),
        Duration::from_secs(15),
        "did not recover after the partition healed"
    );
}

/// Whether an established socket whose local port is `port` (the proxy's
/// side of a session) has bytes it has not read, from /proc/net/tcp.
fn unread_bytes_on(port: u16) -> bool {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    tcp.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state), Some(queues)) = (f.get(1), f.get(3), f.get(4)) else {
            return false;
        };
        let local_port = local
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok());
        let unread = queues
            .split(':')
            .nth(1)
            .and_then(|q| u64::from_str_radix(q, 16).ok())
            .unwrap_or(0);
        local_port == Some(port) && *state == "01" && unread > 0
    })
}

/// Kills its child on drop.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(p: &Proc, sig: i32) {
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(p.0.id() as i32, sig);
    }
}

/// A `keelson proxy` following cluster `main` at `url` as `uid`: the
/// process, its listen and admin addresses, and its log file.
fn proxy_process(
    url: &str,
    uid: &str,
    dir: &std::path::Path,
) -> (Proc, String, String, std::path::PathBuf) {
    proxy_process_with(url, uid, dir, &[])
}

fn proxy_process_with(
    url: &str,
    uid: &str,
    dir: &std::path::Path,
    extra: &[&str],
) -> (Proc, String, String, std::path::PathBuf) {
    let (listen, admin) = (free_port(), free_port());
    let log = dir.join(format!("proxy-{listen}.log"));
    let child = std::process::Command::new(keelson_bin())
        .args(["proxy", "--store", url, "--cluster", "main", "--uid", uid])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(extra)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let conn =
        format!("host=127.0.0.1 port={listen} user=postgres dbname=postgres connect_timeout=10");
    (Proc(child), conn, format!("127.0.0.1:{admin}"), log)
}

/// F9d: two proxies started with the same uid. The second never routes
/// (it is invisible to the fencing handshake) and says why; the first keeps
/// working. When the first stops gracefully it withdraws its registration,
/// and the second takes the uid over without waiting for a lease to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_proxy_with_the_same_uid_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let store = cluster::open(&url).await.unwrap();
    let a = PgServer::start().await;
    let keys = Keys::new("keelson", "main");
    let spec = ClusterSpec {
        hold_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    init_cluster(&store, &keys, spec.clone(), &[("a", a.addr())]).await;
    set_master(&store, &keys, Some("a")).await;

    let (first, conn1, admin1, _) = proxy_process(&url, "p", dir.path());
    crate::assert_eventually!(
        admin_get(&admin1, "/readyz").await.0 == 200,
        Duration::from_secs(60),
        "the first proxy never became ready"
    );
    assert_eq!(landing_port(&conn1).await, Some(a.port));
    let (_, view1) = admin_get(&admin1, "/view").await;
    let view1: serde_json::Value = serde_json::from_str(&view1).unwrap();
    let instance1 = view1["instance"].as_str().unwrap().to_owned();

    let (_second, conn2, admin2, log2) = proxy_process(&url, "p", dir.path());
    let says_why = "another proxy is registered as uid p";
    crate::assert_eventually!(
        {
            let (code, body) = admin_get(&admin2, "/readyz").await;
            code == 503 && body.contains(says_why)
        },
        Duration::from_secs(30),
        "the second proxy's /readyz does not say why it is not ready: {:?}",
        admin_get(&admin2, "/readyz").await
    );
    let log = std::fs::read_to_string(&log2).unwrap();
    assert!(
        log.contains(says_why) && log.contains(&instance1) && log.contains("--uid"),
        "{log}"
    );
    let (_, metrics) = admin_get(&admin2, "/metrics").await;
    assert!(
        metrics.contains("keelson_registration_conflicts_total{cluster=\"main\"}"),
        "{metrics}"
    );
    let e = must_fail(try_connect(&conn2).await, "the second proxy must not route");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e:?}");
    // The first keeps working, and the registration is still its own.
    assert_eq!(admin_get(&admin1, "/readyz").await.0, 200);
    assert_eq!(landing_port(&conn1).await, Some(a.port));
    let (report, _) = registration(&store, &keys, "p").await.unwrap();
    assert_eq!(report.instance, instance1);

    // SIGTERM: the first shuts down and revokes its lease; the second
    // registers well before that lease would have expired.
    signal(&first, libc::SIGTERM);
    let mut first = first;
    let status = tokio::task::spawn_blocking(move || first.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let stopped = Instant::now();
    crate::assert_eventually!(
        admin_get(&admin2, "/readyz").await.0 == 200,
        Duration::from_secs(10),
        "the second proxy never took over the uid"
    );
    let waited = stopped.elapsed();
    assert!(
        waited < spec.proxy_lease_ttl() - Duration::from_secs(3),
        "took {waited:?}: the lease was not revoked"
    );
    assert_eq!(landing_port(&conn2).await, Some(a.port));
    let (report, _) = registration(&store, &keys, "p").await.unwrap();
    assert_ne!(report.instance, instance1);
}

/// F4, the proxy part: the whole proxy process is frozen (SIGSTOP, as a
/// node pause does) while a session is open on the primary. Its
/// registration expires meanwhile, so a sentinel would count it as fenced
/// and may promote another primary; the client then sends an INSERT. When
/// the process thaws, its worker threads run before anything else could
/// fence the session, and must still forward nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_proxy_forwards_nothing_when_it_thaws() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let store = cluster::open(&url).await.unwrap();
    let a = PgServer::start().await;
    a.superuser()
        .await
        .batch_execute("CREATE TABLE t (x int)")
        .await
        .unwrap();
    let keys = Keys::new("keelson", "main");
    let spec = ClusterSpec {
        proxy_timeout: Duration::from_secs(1),
        hold_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    init_cluster(&store, &keys, spec, &[("a", a.addr())]).await;
    set_master(&store, &keys, Some("a")).await;
    let (proxy, conn, admin, log) = proxy_process(&url, "frozen", dir.path());
    let port: u16 = conn
        .split_whitespace()
        .find_map(|w| w.strip_prefix("port="))
        .and_then(|p| p.parse().ok())
        .unwrap();
    crate::assert_eventually!(
        admin_get(&admin, "/readyz").await.0 == 200,
        Duration::from_secs(60),
        "the proxy never became ready"
    );
    let (client, client_conn) = connect_watched(&conn).await;
    client.simple_query("SELECT 1").await.unwrap();

    signal(&proxy, libc::SIGSTOP);
    crate::assert_eventually!(
        registration(&store, &keys, "frozen").await.is_none(),
        Duration::from_secs(15),
        "the frozen proxy's registration never expired"
    );
    let insert = tokio::spawn(async move { client.simple_query("INSERT INTO t VALUES (1)").await });
    // The INSERT waits, unread, in the frozen proxy's socket.
    crate::assert_eventually!(
        unread_bytes_on(port),
        Duration::from_secs(5),
        "the INSERT never reached the frozen proxy's socket"
    );
    signal(&proxy, libc::SIGCONT);
    // The FATAL answers the INSERT in flight.
    let err = tokio::time::timeout(Duration::from_secs(10), insert)
        .await
        .expect("the session did not end after the thaw")
        .unwrap()
        .expect_err("the INSERT must not succeed");
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err:?}\n{log}");
    assert!(db_message(&err).contains("cluster store"), "{err:?}");
    assert!(client_conn.await.unwrap().is_err(), "the session is over");
    let rows: i64 = a
        .superuser()
        .await
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the INSERT reached the primary after the thaw");
    // The proxy then registers anew and routes again.
    crate::assert_eventually!(
        admin_get(&admin, "/readyz").await.0 == 200 && landing_port(&conn).await == Some(a.port),
        Duration::from_secs(15),
        "the proxy did not recover after the thaw"
    );
}

/// Issue 16: `/serving`, the proxy's Kubernetes readiness. It fails until a
/// view is applied and from SIGTERM on, but holds while the cluster has no
/// primary (a failover: the proxy holds new clients, which a Service
/// without the pod would refuse), where `/readyz` fails. After SIGTERM
/// the proxy still takes new sessions for `--shutdown-delay`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_holds_through_a_failover_and_fails_at_sigterm_while_sessions_are_still_taken() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let store = cluster::open(&url).await.unwrap();
    let a = PgServer::start().await;
    let keys = Keys::new("keelson", "main");
    let (proxy, conn, admin, log) =
        proxy_process_with(&url, "serving", dir.path(), &["--shutdown-delay", "3s"]);
    crate::assert_eventually!(
        admin_get(&admin, "/serving").await.0 == 503,
        Duration::from_secs(30),
        "the proxy's admin listener never answered"
    );
    let (_, body) = admin_get(&admin, "/serving").await;
    assert!(body.contains("no data"), "{body}");
    init_cluster(&store, &keys, ClusterSpec::default(), &[("a", a.addr())]).await;
    set_master(&store, &keys, Some("a")).await;
    crate::assert_eventually!(
        admin_get(&admin, "/serving").await.0 == 200 && admin_get(&admin, "/readyz").await.0 == 200,
        Duration::from_secs(30),
        "the proxy never became ready"
    );
    // A failover in progress: no primary named.
    set_master(&store, &keys, None).await;
    crate::assert_eventually!(
        admin_get(&admin, "/readyz").await.0 == 503,
        Duration::from_secs(10),
        "/readyz did not notice the missing primary"
    );
    assert_eq!(
        admin_get(&admin, "/serving").await,
        (200, "serving\n".to_owned()),
        "/serving must hold while the proxy holds clients"
    );
    set_master(&store, &keys, Some("a")).await;
    crate::assert_eventually!(
        admin_get(&admin, "/readyz").await.0 == 200,
        Duration::from_secs(10),
        "the proxy did not route again"
    );
    let t = std::time::Instant::now();
    signal(&proxy, libc::SIGTERM);
    crate::assert_eventually!(
        admin_get(&admin, "/serving").await.0 == 503,
        Duration::from_secs(1),
        "/serving still passes after SIGTERM"
    );
    // Within the delay a new session is still taken and served.
    let c = try_connect(&conn)
        .await
        .expect("a session within the delay");
    c.simple_query("SELECT 1").await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    drop(c);
    // After it, the proxy stops accepting and exits.
    crate::assert_eventually!(
        try_connect(&conn).await.is_err(),
        Duration::from_secs(10),
        "the proxy still accepts after its delay"
    );
    assert!(
        t.elapsed() >= Duration::from_secs(3),
        "the proxy stopped accepting {:?} after SIGTERM, before its delay",
        t.elapsed()
    );
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log.contains("still accepting for the delay"), "{log}");
}
