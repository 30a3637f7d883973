//! The HA safety findings, end to end with real keepers, sentinels,
//! PostgreSQL and a proxy: each test models a fault the way it happens
//! (a dead PostgreSQL under a live keeper reports something; it does not
//! vanish) and asserts what a user sees: rows, `SHOW` values, `ctl status`.

use std::time::{Duration, Instant};

use cluster::ClusterSpec;

use crate::failover::{LocalCluster, Writer};
use crate::support::try_connect;

fn file_store() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    (dir, url)
}

fn sync_spec() -> ClusterSpec {
    ClusterSpec {
        synchronous_replication: true,
        ..Default::default()
    }
}

impl LocalCluster {
    /// What `synchronous_standby_names` of keeper `i` should be, from its
    /// spec in the cluster data.
    async fn wanted_sync_names(&self, i: usize) -> String {
        let d = self.data().await;
        keeper::names::synchronous_standby_names(&d.dbs[&self.uid(i)].spec.synchronous_standbys)
    }

    /// Waits until keeper `i` runs the synchronous standbys its spec names,
    /// some of which PostgreSQL reports synchronous.
    async fn wait_sync_confirmed(&self, i: usize, limit: Duration) {
        crate::assert_eventually!(
            {
                let d = self.data().await;
                let db = &d.dbs[&self.uid(i)];
                !db.status.sync_confirmed.is_empty()
                    && self.show(i, "synchronous_standby_names").await
                        == Some(self.wanted_sync_names(i).await)
            },
            limit,
            "k{i} never ran with a confirmed synchronous standby: {:?}",
            self.data().await.dbs[&self.uid(i)]
        );
    }

    /// Asserts that a commit directly on keeper `i` is not acknowledged
    /// within `wait`.
    async fn assert_commit_blocks(&self, i: usize, wait: Duration) {
        let conn = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.ports[i - 1]
        );
        let cl = try_connect(&conn).await.unwrap();
        let r = tokio::time::timeout(wait, cl.execute("INSERT INTO w VALUES (-7)", &[])).await;
        assert!(
            r.is_err(),
            "k{i} acknowledged a commit with no synchronous standby: {r:?}"
        );
    }
}

/// Review reproduction 2 (F6a1) and F6a, three keepers: after a failover
/// the new primary runs the synchronous standbys its spec names (checked
/// with SHOW within 2 s), a commit blocks while no standby is alive, and a
/// second failover succeeds; no acknowledged commit is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_survives_two_failovers_and_blocks_without_standbys() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up_with(&url, store, sync_spec(), 1, 3).await;
    let first = c.master;
    c.wait_sync_confirmed(first, Duration::from_secs(30)).await;
    let writer = Writer::start(&c.conn, 4);
    writer.wait_more(200, Duration::from_secs(30)).await;

    c.kill_primary();
    let second = c.wait_new_primary(first, Duration::from_secs(40)).await;
    let named = Instant::now();
    crate::assert_eventually!(
        c.show(second, "synchronous_standby_names").await
            == Some(c.wanted_sync_names(second).await),
        Duration::from_secs(2),
        "the new primary runs {:?}, its spec says {:?}",
        c.show(second, "synchronous_standby_names").await,
        c.wanted_sync_names(second).await
    );
    eprintln!(
        "SHOW matched the spec {:?} after the new primary was named",
        named.elapsed()
    );
    assert_ne!(c.wanted_sync_names(second).await, "", "sync mode is on");
    // The third keeper streams from the new primary and protects commits.
    writer.wait_more(100, Duration::from_secs(60)).await;
    let third = (1..=3).find(|i| *i != first && *i != second).unwrap();
    c.wait_sync_confirmed(second, Duration::from_secs(30)).await;

    // No standby alive: a commit is not acknowledged.
    c.kill_keeper_only(third);
    c.kill_postgres(third);
    c.assert_commit_blocks(second, Duration::from_secs(3)).await;
    // It comes back, and commits go on.
    c.keepers[third - 1] = Some(c.keeper_role(third));
    writer.wait_more(50, Duration::from_secs(60)).await;
    // The first primary rejoins.
    c.keepers[first - 1] = Some(c.keeper_role(first));
    c.wait_standby(first).await;
    c.wait_sync_confirmed(second, Duration::from_secs(30)).await;

    // A second failover, in sync mode.
    c.kill_primary();
    let last = c.wait_new_primary(second, Duration::from_secs(40)).await;
    writer.wait_more(50, Duration::from_secs(60)).await;
    let (acked, unknown) = writer.stop().await;
    eprintln!(
        "k{first} -> k{second} -> k{last}: {} acknowledged, {} in doubt",
        acked.len(),
        unknown.len()
    );
    c.assert_nothing_lost(&acked, &unknown).await;
}

/// F6a2: in a two-node cluster, the new primary's commits wait until a
/// standby streams again (as Stolon and Patroni's strict mode do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_two_nodes_commits_wait_for_the_old_primary_to_rejoin() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up_with(&url, store, sync_spec(), 1, 2).await;
    let old = c.master;
    c.wait_sync_confirmed(old, Duration::from_secs(30)).await;
    let writer = Writer::start(&c.conn, 2);
    writer.wait_more(100, Duration::from_secs(30)).await;
    c.kill_primary();
    let new = c.wait_new_primary(old, Duration::from_secs(40)).await;
    assert_eq!(
        c.show(new, "synchronous_standby_names").await.as_deref(),
        Some(format!("FIRST 1 (\"k{old}\")").as_str()),
        "the old primary holds the synchronous place"
    );
    c.assert_commit_blocks(new, Duration::from_secs(3)).await;
    let before = writer.acked_count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        writer.acked_count(),
        before,
        "commits were acknowledged with no standby"
    );
    c.keepers[old - 1] = Some(c.keeper_role(old));
    writer.wait_more(50, Duration::from_secs(90)).await;
    let (acked, unknown) = writer.stop().await;
    c.assert_nothing_lost(&acked, &unknown).await;
}

impl LocalCluster {
    /// The pid of keeper `i`'s WAL receiver.
    async fn walreceiver_pid(&self, i: usize) -> i32 {
        let conn = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.ports[i - 1]
        );
        let cl = try_connect(&conn).await.unwrap();
        cl.query_one("SELECT pid FROM pg_stat_wal_receiver", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Runs `sql` directly on keeper `i`'s PostgreSQL.
    async fn exec(&self, i: usize, sql: &str) {
        let conn = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.ports[i - 1]
        );
        try_connect(&conn)
            .await
            .unwrap()
            .batch_execute(sql)
            .await
            .unwrap();
    }

    /// `keelson ctl status` as a user reads it.
    fn status_text(&self) -> String {
        self.ctl(&["status"]).unwrap_or_else(|e| e)
    }

    /// Makes keeper `i`'s data directory unreadable, as a failed disk
    /// would: PostgreSQL cannot start on it.
    fn break_data_dir(&self, i: usize) {
        use std::os::unix::fs::PermissionsExt;
        let d = self.dir.path().join(format!("k{i}/pgdata"));
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o000)).unwrap();
    }

    fn repair_data_dir(&self, i: usize) {
        use std::os::unix::fs::PermissionsExt;
        let d = self.dir.path().join(format!("k{i}/pgdata"));
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
}

/// Review reproduction 1 (F1a): the standby stops receiving WAL and falls
/// far behind; the primary's PostgreSQL dies and cannot restart while its
/// keeper runs on. The lagging standby is not promoted, `ctl status` says
/// why, and once the disk is back every acknowledged row is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_standby_is_not_promoted_when_the_primary_dies_under_a_live_keeper() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let c = LocalCluster::up(&url, store).await;
    let (p, s) = (c.master, c.other());
    let receiver = c.walreceiver_pid(s).await;
    // SAFETY: pausing (later resuming) the standby's WAL receiver by pid.
    unsafe { libc::kill(receiver, libc::SIGSTOP) };
    c.exec(
        p,
        "INSERT INTO w SELECT g FROM generate_series(1, 150000) g; \
         CREATE TABLE pad AS SELECT repeat('x', 200) AS v FROM generate_series(1, 100000)",
    )
    .await;
    crate::assert_eventually!(
        c.data().await.dbs[&c.uid(p)]
            .status
            .lsn
            .saturating_sub(c.data().await.dbs[&c.uid(s)].status.lsn)
            > 17 << 20,
        Duration::from_secs(10),
        "the standby is not behind: {}",
        c.status_text()
    );
    c.kill_postgres(p);
    c.break_data_dir(p);
    // Well past fail_interval: no promotion, and the status says why.
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let d = c.data().await;
        assert_ne!(
            crate::failover::master_of(&d).as_deref(),
            Some(c.uid(s).as_str()),
            "the lagging standby was promoted: {}",
            c.status_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let text = c.status_text();
    eprintln!("{text}");
    assert!(
        text.contains(&format!("no eligible standby: k{s} is"))
            && text.contains("MiB behind the last known primary LSN, limit 16.0 MiB"),
        "{text}"
    );
    // SAFETY: as above.
    unsafe { libc::kill(receiver, libc::SIGCONT) };
    // The disk comes back: the same primary, with every row.
    c.repair_data_dir(p);
    let (port, took) = c
        .next_write(
            "INSERT INTO w VALUES (-1) RETURNING inet_server_port()",
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(port, c.ports[p - 1]);
    eprintln!("writes resumed on the repaired primary after {took:?}");
    let n: i64 = try_connect(&c.conn)
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM w WHERE x > 0", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 150_000, "acknowledged rows lost");
}

/// Whether keeper `i` of `c` is the one the cluster data makes primary.
async fn is_master(c: &LocalCluster, i: usize) -> bool {
    crate::failover::master_of(&c.data().await).as_deref() == Some(c.uid(i).as_str())
}

/// F1: the primary's PostgreSQL dies and cannot start again (its data
/// directory is unreadable), while its keeper runs on and reports it:
/// async mode fails over to the standby, and the old primary rejoins once
/// its disk is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_crash_looping_primary_under_a_live_keeper_is_failed_over() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up(&url, store).await;
    let (old, new) = (c.master, c.other());
    c.kill_postgres(old);
    c.break_data_dir(old);
    let (port, took) = c
        .next_write(
            "INSERT INTO w VALUES (1) RETURNING inet_server_port()",
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(port, c.ports[new - 1]);
    eprintln!("writes resumed on the standby {took:?} after the crash");
    assert!(c.keeper_log(old).contains("cannot read") || !c.keeper_log(old).is_empty());
    c.master = new;
    c.repair_data_dir(old);
    c.wait_standby(old).await;
}

/// F1b: the same in synchronous mode, three keepers: the failover goes to
/// the confirmed synchronous standby, with no acknowledged commit lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_crash_looping_primary_under_a_live_keeper_is_failed_over() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up_with(&url, store, sync_spec(), 1, 3).await;
    let old = c.master;
    c.wait_sync_confirmed(old, Duration::from_secs(30)).await;
    let confirmed = c.data().await.dbs[&c.uid(old)].status.sync_confirmed.clone();
    let writer = Writer::start(&c.conn, 4);
    writer.wait_more(200, Duration::from_secs(30)).await;
    c.kill_postgres(old);
    c.break_data_dir(old);
    let new = c.wait_new_primary(old, Duration::from_secs(40)).await;
    assert!(confirmed.contains(&c.uid(new)), "k{new} was not a confirmed sync standby: {confirmed:?}");
    writer.wait_more(100, Duration::from_secs(60)).await;
    let (acked, unknown) = writer.stop().await;
    c.assert_nothing_lost(&acked, &unknown).await;
    c.repair_data_dir(old);
    c.wait_standby(old).await;
}

/// F1b: a hung primary (its postmaster stopped, its keeper alive and
/// reporting it unhealthy) in synchronous mode is failed over to the
/// synchronous standby; nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_hung_primary_under_a_live_keeper_is_failed_over() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up_with(&url, store, sync_spec(), 1, 3).await;
    let old = c.master;
    c.wait_sync_confirmed(old, Duration::from_secs(30)).await;
    let writer = Writer::start(&c.conn, 4);
    writer.wait_more(200, Duration::from_secs(30)).await;
    let pid = c.primary_pid();
    // SAFETY: stopping the primary's postmaster by pid.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let new = c.wait_new_primary(old, Duration::from_secs(40)).await;
    writer.wait_more(100, Duration::from_secs(60)).await;
    let (acked, unknown) = writer.stop().await;
    c.assert_nothing_lost(&acked, &unknown).await;
    // The old postmaster was killed by its keeper (a stopped process does
    // not take SIGQUIT); the old primary rejoins.
    assert!(!keeper::postmaster::alive(pid as u32), "the hung postmaster still exists");
    eprintln!("hung k{old} failed over to k{new}");
    c.wait_standby(old).await;
}

/// F1c: a planned switchover in synchronous mode, under write load: it
/// completes to the synchronous standby, no commit is lost, no client is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_switchover_under_write_load_loses_nothing_and_refuses_no_one() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up_with(&url, store, sync_spec(), 1, 3).await;
    let old = c.master;
    c.wait_sync_confirmed(old, Duration::from_secs(30)).await;
    let writer = Writer::start(&c.conn, 4);
    writer.wait_more(200, Duration::from_secs(30)).await;
    let out = c.ctl(&["switchover"]).unwrap();
    assert!(out.contains("switchover from"), "{out}");
    let t = Instant::now();
    let new = c.wait_new_primary(old, Duration::from_secs(30)).await;
    eprintln!("sync switchover k{old} -> k{new} in {:?}", t.elapsed());
    writer.wait_more(100, Duration::from_secs(60)).await;
    let refused = writer.refused.lock().unwrap().clone();
    let (acked, unknown) = writer.stop().await;
    assert!(refused.is_empty(), "connections refused: {refused:?}");
    c.assert_nothing_lost(&acked, &unknown).await;
    c.wait_standby(old).await;
}

/// F6d: keeper uids with '-' and '.' in synchronous mode: PostgreSQL runs
/// the names quoted, and commits wait while the standby is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_with_dashes_and_dots_in_uids() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let c = LocalCluster::up_named(&url, store, sync_spec(), 1, &["pg-1", "db.2"]).await;
    let (p, s) = (c.master, c.other());
    c.wait_sync_confirmed(p, Duration::from_secs(30)).await;
    assert_eq!(
        c.show(p, "synchronous_standby_names").await,
        Some(format!("FIRST 1 (\"{}\")", c.uid(s)))
    );
    let mut c = c;
    c.kill_keeper_only(s);
    c.kill_postgres(s);
    c.assert_commit_blocks(p, Duration::from_secs(3)).await;
    c.keepers[s - 1] = Some(c.keeper_role(s));
    let (_, took) = c
        .next_write(
            "INSERT INTO w VALUES (2) RETURNING inet_server_port()",
            Duration::from_secs(60),
        )
        .await;
    eprintln!("commits resumed {took:?} after the standby came back");
}
