//! The keeper's PostgreSQL primitives against real PostgreSQL: a primary
//! from initdb, a streaming standby from pg_basebackup, the reports the
//! sentinel decides by, the replication account and slots, synchronous
//! replication, and promotion.

fn repl() -> Replication {
    Replication {
        user: "keelson_repl".into(),
        password: "s3cret:with'quote".into(),
    }
}

use std::collections::BTreeMap;
use std::time::Duration;

use keeper::{slot_name, Instance, PgBin, Replication, Upstream};

use crate::support::free_port;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_standby_reports_sync_and_promotion() {
    let dir = tempfile::tempdir().unwrap();
    let bin = PgBin::find(None).unwrap();
    let mut a = Instance::new(
        bin.clone(),
        dir.path().join("a"),
        "127.0.0.1",
        free_port(),
        repl(),
    );
    a.initdb().await.unwrap();
    a.write_config(&BTreeMap::new(), None, &[]).unwrap();
    a.start(Duration::from_secs(30)).await.unwrap();
    let ra = a.report("a", 1).await;
    assert!(ra.healthy && !ra.in_recovery, "{ra:?}");
    assert_eq!(ra.timeline, Some(1));
    assert!(ra.lsn > Some(0));

    // The superuser cannot replicate over TCP; without its account and
    // slot a base backup fails.
    let mut b = Instance::new(bin, dir.path().join("b"), "127.0.0.1", free_port(), repl());
    let err = b
        .basebackup(&a.address(), Some(&slot_name("b")))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("pg_basebackup failed"), "{err}");
    assert!(!b.is_initialized(), "a failed base backup leaves no data");
    let superuser = std::process::Command::new("pg_basebackup")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &a.port.to_string(),
            "-U",
            "postgres",
            "-w",
        ])
        .args(["-D", &dir.path().join("x").display().to_string()])
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&superuser.stderr);
    assert!(
        !superuser.status.success() && msg.contains("no pg_hba.conf entry for replication"),
        "{msg}"
    );

    a.ensure_replication_account().await.unwrap();
    a.sync_slots(&[slot_name("b"), slot_name("Gone-1")])
        .await
        .unwrap();
    b.basebackup(&a.address(), Some(&slot_name("b")))
        .await
        .unwrap();
    let upstream = Upstream {
        address: a.address(),
        application_name: "b".into(),
        slot: Some(slot_name("b")),
    };
    b.write_config(&BTreeMap::new(), Some(&upstream), &[])
        .unwrap();
    b.start(Duration::from_secs(30)).await.unwrap();

    // Streaming replication: a row written on the primary shows on the standby.
    let ca = a.connect().await.unwrap();
    ca.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        .await
        .unwrap();
    let cb = b.connect().await.unwrap();
    crate::assert_eventually!(
        cb.query_opt("SELECT x FROM t", &[])
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.get::<_, i32>(0) == 42),
        Duration::from_secs(10),
        "the row never reached the standby"
    );
    let rb = b.report("b", 1).await;
    assert!(rb.healthy && rb.in_recovery, "{rb:?}");
    // b streams as the replication account through its own slot.
    let who = ca
        .query_one(
            "SELECT r.usename::text, s.slot_name::text FROM pg_stat_replication r \
             JOIN pg_replication_slots s ON s.active_pid = r.pid",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(who.get::<_, String>(0), "keelson_repl");
    assert_eq!(who.get::<_, String>(1), "keelson_b");
    // A standby that left the cluster loses its slot; b's, in use, stays.
    a.sync_slots(&[slot_name("b")]).await.unwrap();
    let slots: Vec<String> = ca
        .query("SELECT slot_name::text FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(slots, vec!["keelson_b".to_string()]);
    assert_eq!(rb.system_id, ra.system_id, "same system");
    assert_eq!(rb.timeline, Some(1));
    let ra = a.report("a", 1).await;
    assert!(
        rb.lsn > Some(0) && rb.lsn <= ra.lsn,
        "standby {:?} primary {:?}",
        rb.lsn,
        ra.lsn
    );

    // Synchronous replication: the primary reports b as synchronous.
    a.write_config(&BTreeMap::new(), None, &["b".to_owned()])
        .unwrap();
    a.reload().await.unwrap();
    crate::assert_eventually!(
        a.report("a", 2).await.synchronous_standbys == Some(vec!["b".to_string()]),
        Duration::from_secs(10),
        "b never became synchronous"
    );
    ca.execute("INSERT INTO t VALUES (43)", &[]).await.unwrap();

    // Promotion: b leaves recovery on timeline 2 with every committed row.
    b.promote().await.unwrap();
    crate::assert_eventually!(
        {
            let r = b.report("b", 2).await;
            r.healthy && !r.in_recovery && r.timeline == Some(2)
        },
        Duration::from_secs(15),
        "b was not promoted"
    );
    let n: i64 = cb
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "the synchronously committed row survived promotion");
    let last = b.report("b", 2).await.lsn.unwrap();
    b.stop(Duration::from_secs(10)).await;
    a.stop(Duration::from_secs(10)).await;
    // F1: a stopped instance reports unhealthy, and nothing it would have
    // read from PostgreSQL: unknown, not zero.
    let r = a.report("a", 2).await;
    assert!(!r.healthy, "a stopped instance reports unhealthy");
    assert_eq!((r.lsn, r.timeline, r.system_id.clone()), (None, None, None));
    assert_eq!(r.synchronous_standbys, None);
    assert!(r.problem.is_some(), "{r:?}");
    // The control file of a cleanly stopped primary: its shutdown
    // checkpoint is the last record it wrote, past everything reported.
    let c = b.control_data().await.unwrap();
    assert!(c.shut_down_cleanly(), "{c:?}");
    assert_eq!(c.timeline, 2);
    assert!(c.checkpoint_lsn >= last, "{c:?} vs {last}");
    assert_eq!(Some(c.system_id), rb.system_id);
}

/// F6d: uids PostgreSQL's scanner cannot take unquoted are quoted, and
/// what PostgreSQL loads is what was asked; with the standbys absent a
/// commit waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_names_with_dashes_and_dots_are_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let bin = PgBin::find(None).unwrap();
    let mut a = Instance::new(bin, dir.path().join("a"), "127.0.0.1", free_port(), repl());
    a.initdb().await.unwrap();
    a.write_config(&BTreeMap::new(), None, &[]).unwrap();
    a.start(Duration::from_secs(30)).await.unwrap();
    let c = crate::support::connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        a.port
    ))
    .await;
    c.batch_execute("CREATE TABLE t (x int)").await.unwrap();
    let names = vec!["db.2".to_string(), "first".into(), "pg-1".into()];
    a.write_config(&BTreeMap::new(), None, &names).unwrap();
    a.reload().await.unwrap();
    crate::assert_eventually!(
        a.loaded_sync_names().await.ok().as_deref() == Some(r#"FIRST 3 ("db.2", "first", "pg-1")"#),
        Duration::from_secs(5),
        "PostgreSQL runs with {:?}",
        a.loaded_sync_names().await
    );
    let insert = tokio::time::timeout(
        Duration::from_secs(2),
        c.execute("INSERT INTO t VALUES (1)", &[]),
    );
    assert!(
        insert.await.is_err(),
        "a commit was acknowledged with no synchronous standby"
    );
    // The keeper's own statements do not wait (synchronous_commit=local).
    let k = a.connect().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        k.batch_execute("CREATE TABLE u (x int)"),
    )
    .await
    .expect("the keeper's own commit waited for a standby")
    .unwrap();
    a.stop_now(Duration::from_secs(10)).await;
}

/// F3: a keeper that dies leaves its postmaster running; the next one
/// adopts it (it does not start a second one, or delete its data), fences
/// it by its pid and stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_keeper_adopts_a_running_postmaster() {
    let dir = tempfile::tempdir().unwrap();
    let bin = PgBin::find(None).unwrap();
    let port = free_port();
    let mut a = Instance::new(bin.clone(), dir.path().join("a"), "127.0.0.1", port, repl());
    a.initdb().await.unwrap();
    a.write_config(&BTreeMap::new(), None, &[]).unwrap();
    a.start(Duration::from_secs(30)).await.unwrap();
    let pid = a.pid().unwrap();
    // The keeper dies without a word: its Instance is never dropped.
    std::mem::forget(a);
    let mut again = Instance::new(bin, dir.path().join("a"), "127.0.0.1", port, repl());
    assert_eq!(again.adopt(), Some(pid));
    assert!(again.is_running());
    assert!(again.report("a", 1).await.healthy);
    let e = again.remove_data().unwrap_err().to_string();
    assert!(e.contains("refusing to delete"), "{e}");
    let e = again.start(Duration::from_secs(5)).await;
    assert!(e.is_ok(), "starting an adopted server is a no-op: {e:?}");
    again.stop_now(Duration::from_secs(10)).await;
    assert!(
        !keeper::postmaster::alive(pid),
        "the adopted postmaster was stopped"
    );
    assert!(!again.is_running());
    again.remove_data().unwrap();
}
