//! Standby clusters (docs/standby-cluster.md): a cluster whose standby
//! leader follows a source (another keelson cluster's proxy, or a
//! PostgreSQL outside keelson) and whose other members cascade from it,
//! until `keelson ctl promote`.

use std::time::{Duration, Instant};

use cluster::data::{ClusterRole, StandbySource};
use cluster::{ClusterData, ClusterSpec, Keys, Store};

use crate::failover::LocalCluster;
use crate::support::*;

/// A file holding the replication password the source knows.
fn password_file(dir: &std::path::Path) -> String {
    let path = dir.join("source-password");
    std::fs::write(&path, "test-secret\n").unwrap();
    path.display().to_string()
}

/// A standby cluster of `keepers` keepers (k1..) following the server at
/// `port` as `keelson_repl`, with its own file store in `store_dir`.
async fn standby_cluster(
    store_dir: &std::path::Path,
    port: u16,
    keepers: usize,
    slot: Option<&str>,
) -> LocalCluster {
    std::fs::create_dir_all(store_dir).unwrap();
    let url = format!("file://{}", store_dir.display());
    let store = cluster::open(&url).await.unwrap();
    let spec = ClusterSpec {
        role: ClusterRole::Standby,
        standby_source: Some(StandbySource {
            host: "127.0.0.1".into(),
            port,
            user: "keelson_repl".into(),
            password_file: password_file(store_dir),
            slot: slot.map(str::to_owned),
            ..Default::default()
        }),
        hold_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    spec.validate_written(None).unwrap();
    store
        .put(
            &Keys::new("keelson", "f").clusterdata(),
            &ClusterData::new(spec).to_json(),
            0,
        )
        .await
        .unwrap();
    let uids: Vec<String> = (1..=keepers).map(|i| format!("k{i}")).collect();
    let uids: Vec<&str> = uids.iter().map(String::as_str).collect();
    LocalCluster::up_initialized(&url, store, 1, &uids, Vec::new(), Vec::new()).await
}

/// Waits until every running member of `c` counts `want` rows in `w`.
async fn all_see(c: &LocalCluster, want: i64, limit: Duration) {
    for i in 1..=c.keepers.len() {
        if c.keepers[i - 1].is_none() {
            continue;
        }
        crate::assert_eventually!(
            c.direct(i, "SELECT count(*) FROM w").await == Some(want),
            limit,
            "k{i} of the standby cluster never counted {want} rows: it has {:?}\n{}",
            c.direct(i, "SELECT count(*) FROM w").await,
            c.keeper_log(i)
        );
    }
}

/// Waits until A's primary streams to B's member `leader`, under the
/// name a standby leader streams as.
async fn streams_to_leader(a: &LocalCluster, b: &LocalCluster, leader: usize) {
    let name = keeper::run::source_application_name(&b.uid(leader));
    let on_a = format!(
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = '{name}' \
         AND state = 'streaming'"
    );
    crate::assert_eventually!(
        a.direct(a.master, &on_a).await == Some(1),
        Duration::from_secs(20),
        "A's primary does not stream to B's leader k{leader} as {name}"
    );
}

/// Waits until member `i`, asked to copy its data afresh, has (the
/// sentinel cleared the request) and streams again.
async fn streams_after_its_copy(b: &LocalCluster, i: usize) {
    crate::assert_eventually!(
        b.data()
            .await
            .dbs
            .get(&b.uid(i))
            .is_some_and(|db| !db.spec.reinit && db.status.healthy && db.status.streaming),
        Duration::from_secs(60),
        "k{i} does not stream again after its copy:\n{}",
        b.keeper_log(i)
    );
}

async fn insert(conn: &str, n: i32) {
    let client = connect(conn).await;
    client
        .execute("INSERT INTO w SELECT generate_series(1, $1)", &[&n])
        .await
        .unwrap();
}

/// Cluster B follows cluster A through A's proxy: rows written on A appear
/// on every member of B, B's leader streams from A under a name none of A's
/// keepers has, B's other members cascade from B's leader through their
/// slots; B's proxy refuses writes with 57P03 and serves reads. SIGKILL of
/// B's leader moves it within B, and B keeps following A; a failover inside
/// A does not break B. `ctl promote` makes B writable, and A is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_cluster_follows_another_through_its_proxy_and_is_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let url_a = format!("file://{}", dir.path().join("a").display());
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    let store_a = cluster::open(&url_a).await.unwrap();
    let mut a = LocalCluster::up_with(&url_a, store_a, ClusterSpec::default(), 1, 2).await;
    insert(&a.conn, 100).await;

    let mut b = standby_cluster(&dir.path().join("b"), a.proxy.port(), 3, None).await;
    all_see(&b, 100, Duration::from_secs(30)).await;
    let leader = b.master;
    streams_to_leader(&a, &b, leader).await;
    // Every member of B is in recovery; its standbys stream from its leader.
    for i in 1..=3 {
        assert_eq!(
            b.direct(
                i,
                "SELECT count(*) FROM (SELECT pg_is_in_recovery() AS r) s WHERE r"
            )
            .await,
            Some(1),
            "k{i} of B takes writes"
        );
    }
    b.assert_streams_to_all().await;

    // B's proxy: reads on a replica route; the primary route is held, then
    // refused with 57P03 and the reason.
    let reads = format!("{} options='-c keelson.route=replica'", b.conn);
    let client = connect(&reads).await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM w", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100);
    drop(client);
    let t = Instant::now();
    let e = must_fail(
        try_connect(&b.conn).await,
        "a write session on a standby cluster",
    );
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e}");
    assert!(db_message(&e).contains("standby cluster"), "{e}");
    eprintln!(
        "B's primary route refused after {:?}: {}",
        t.elapsed(),
        db_message(&e)
    );

    // SIGKILL of B's leader: another member of B leads, and follows A.
    b.kill_primary();
    let t = Instant::now();
    let new_leader = b.wait_new_primary(leader, Duration::from_secs(60)).await;
    eprintln!(
        "B's leader moved from k{leader} to k{new_leader} in {:?}",
        t.elapsed()
    );
    insert(&a.conn, 50).await;
    all_see(&b, 150, Duration::from_secs(30)).await;
    streams_to_leader(&a, &b, new_leader).await;
    // The old leader rejoins B, following the new one.
    b.keepers[leader - 1] = Some(b.keeper_role(leader));
    b.wait_standby(leader).await;
    all_see(&b, 150, Duration::from_secs(30)).await;

    // A failover inside A: B follows A's new primary through A's proxy.
    let old_a = a.master;
    a.kill_primary();
    a.wait_new_primary(old_a, Duration::from_secs(60)).await;
    insert(&a.conn, 25).await;
    all_see(&b, 175, Duration::from_secs(60)).await;
    crate::assert_eventually!(
        b.direct(
            new_leader,
            "SELECT received_tli::bigint FROM pg_stat_wal_receiver WHERE status = 'streaming'"
        )
        .await
            == Some(2),
        Duration::from_secs(20),
        "B's leader does not stream A's new timeline"
    );

    // The leader is copied afresh only on request, with failover paused
    // (docs/standby-cluster.md: after the source forked its timeline before
    // what the standby cluster replayed): from the source, and the cluster
    // keeps following it.
    let e = b.ctl(&["reinit", &b.uid(b.master)]).unwrap_err();
    assert!(e.contains("ctl pause"), "{e}");
    b.ctl(&["pause"]).unwrap();
    let leader = b.master;
    let out = b.ctl(&["reinit", &b.uid(leader)]).unwrap();
    assert!(out.contains("from the standby cluster's source"), "{out}");
    let copied = format!("Reinit {{ from: \"127.0.0.1:{}\" }}", a.proxy.port());
    crate::assert_eventually!(
        b.keeper_log(leader).contains(&copied),
        Duration::from_secs(30),
        "k{leader} was not copied afresh from the source:\n{}",
        b.keeper_log(leader)
    );
    streams_after_its_copy(&b, leader).await;
    assert_eq!(b.master, leader);
    assert_eq!(
        b.data().await.proxy.master_db.as_deref(),
        Some(b.uid(leader).as_str()),
        "paused: the leadership stayed"
    );
    // Then each other member, from the leader: the leader's new copy holds
    // neither their slots nor the WAL they would stream from.
    for i in b.standbys() {
        b.ctl(&["reinit", &b.uid(i)]).unwrap();
        streams_after_its_copy(&b, i).await;
    }
    b.ctl(&["resume"]).unwrap();
    insert(&a.conn, 5).await;
    all_see(&b, 180, Duration::from_secs(30)).await;
    b.assert_streams_to_all().await;

    // Promotion: B takes writes; A is unaffected.
    let out = b.ctl(&["promote"]).unwrap();
    assert!(out.contains("is the primary"), "{out}");
    eprintln!("{out}");
    insert(&b.conn, 7).await;
    let n = b.direct(b.master, "SELECT count(*) FROM w").await;
    assert_eq!(n, Some(187));
    assert_eq!(
        a.direct(a.master, "SELECT count(*) FROM w").await,
        Some(180)
    );
    insert(&a.conn, 1).await;
    assert_eq!(
        a.direct(a.master, "SELECT count(*) FROM w").await,
        Some(181)
    );
    // B's other members follow its new primary.
    b.wait_standbys_see("SELECT count(*) FROM w", 187).await;
    let again = b.ctl(&["promote"]).unwrap_err();
    assert!(again.contains("not a standby cluster"), "{again}");
    a.keepers.clear();
    b.keepers.clear();
}

/// The migration recipe: a PostgreSQL outside keelson takes writes; a
/// standby cluster follows it; at the cut-over the old server is stopped
/// cleanly, the application connects to keelson's proxy (held there), and
/// `ctl promote` lets it write. Every acknowledged write is kept, and the
/// write downtime the client saw is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_from_a_postgresql_outside_keelson_loses_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let mut old = PgServer::start_with(true).await;
    old.superuser()
        .await
        .batch_execute(
            "CREATE ROLE keelson_repl LOGIN REPLICATION PASSWORD 'test-secret'; \
             CREATE TABLE w (x int); \
             SELECT pg_create_physical_replication_slot('site_b')",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let b = standby_cluster(&dir.path().join("b"), old.port, 2, Some("site_b")).await;
    // The leader streams through the slot the spec names.
    let active = "SELECT active FROM pg_replication_slots WHERE slot_name = 'site_b'";
    let su = old.superuser().await;
    crate::assert_eventually!(
        su.query_one(active, &[]).await.unwrap().get::<_, bool>(0),
        Duration::from_secs(20),
        "the standby leader does not stream through slot site_b"
    );
    drop(su);

    // The application: one client inserting in a loop into whatever its
    // connection string names; it reconnects after an error.
    let target = Arc::new(Mutex::new(format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=10",
        old.port
    )));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<(i32, Instant)>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let app = {
        let (target, stop, acked, errors) =
            (target.clone(), stop.clone(), acked.clone(), errors.clone());
        tokio::spawn(async move {
            let mut id = 0;
            while !stop.load(Ordering::Relaxed) {
                let conn = target.lock().unwrap().clone();
                let client = match try_connect(&conn).await {
                    Ok(c) => c,
                    Err(e) => {
                        errors.lock().unwrap().push(db_message(&e));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    id += 1;
                    match client.execute("INSERT INTO w VALUES ($1)", &[&id]).await {
                        Ok(_) => acked.lock().unwrap().push((id, Instant::now())),
                        Err(e) => {
                            errors.lock().unwrap().push(db_message(&e));
                            break;
                        }
                    }
                }
            }
        })
    };
    crate::assert_eventually!(
        acked.lock().unwrap().len() > 200,
        Duration::from_secs(20),
        "the application never wrote"
    );
    // The standby cluster keeps up with the load.
    let n = acked.lock().unwrap().len() as i64;
    crate::assert_eventually!(
        b.direct(b.master, "SELECT count(*) FROM w").await >= Some(n),
        Duration::from_secs(30),
        "the standby cluster does not follow the old server"
    );

    // The cut-over.
    let t = Instant::now();
    *target.lock().unwrap() = b.conn.clone();
    old.stop_fast();
    let stopped = t.elapsed();
    let out = b.ctl(&["promote"]).unwrap();
    eprintln!("{out}");
    let promoted = t.elapsed();
    let before = acked.lock().unwrap().len();
    crate::assert_eventually!(
        acked.lock().unwrap().len() > before + 100,
        Duration::from_secs(30),
        "the application never wrote through keelson: {:?}",
        errors.lock().unwrap()
    );
    stop.store(true, Ordering::Relaxed);
    app.await.unwrap();

    let acked = acked.lock().unwrap().clone();
    let ids: Vec<i32> = acked.iter().map(|(id, _)| *id).collect();
    let client = connect(&b.conn).await;
    let present: i64 = client
        .query_one("SELECT count(*) FROM w WHERE x = ANY($1)", &[&ids])
        .await
        .unwrap()
        .get(0);
    assert_eq!(present, ids.len() as i64, "an acknowledged write was lost");
    // The longest gap between two acknowledged writes is the downtime.
    let gap = acked
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .max()
        .unwrap_or_default();
    let errors = errors.lock().unwrap().clone();
    // Only the old server's shutdown ends a session: keelson's proxy held
    // the application until the promoted leader took writes, and never
    // sent a write to it while it was in recovery.
    assert!(
        !errors.iter().any(|e| e.contains("standby")),
        "a session reached the standby leader before it was promoted: {errors:?}"
    );
    eprintln!(
        "migration: {} writes acknowledged, none lost; old server stopped in {stopped:?}, \
         promoted at {promoted:?}; write downtime {gap:?}; {} client errors (the old \
         server's shutdown): {:?}",
        ids.len(),
        errors.len(),
        errors
    );
}
