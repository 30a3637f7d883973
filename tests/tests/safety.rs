//! The HA safety findings, end to end with real keepers, sentinels,
//! PostgreSQL and a proxy: each test models a fault the way it happens
//! (a dead PostgreSQL under a live keeper reports something; it does not
//! vanish) and asserts what a user sees: rows, `SHOW` values, `ctl status`.

use std::time::{Duration, Instant};

use cluster::{ClusterSpec, Store};

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
    pub(crate) async fn wait_sync_confirmed(&self, i: usize, limit: Duration) {
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

/// A synchronous cluster of `keepers` with a confirmed synchronous
/// standby, and 4 writers that have had 200 commits acknowledged.
async fn sync_cluster_under_load(keepers: usize) -> (tempfile::TempDir, LocalCluster, Writer) {
    let (dir, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let c = LocalCluster::up_with(&url, store, sync_spec(), 1, keepers).await;
    c.wait_sync_confirmed(c.master, Duration::from_secs(30))
        .await;
    let writer = Writer::start(&c.conn, 4);
    writer.wait_more(200, Duration::from_secs(30)).await;
    (dir, c, writer)
}

/// After the test's fault: writes go on, and nothing acknowledged is lost.
async fn finish_under_load(c: &LocalCluster, writer: Writer) {
    writer.wait_more(100, Duration::from_secs(60)).await;
    let (acked, unknown) = writer.stop().await;
    c.assert_nothing_lost(&acked, &unknown).await;
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
    /// The pid of keeper `i`'s WAL receiver, `None` while there is none
    /// (it is restarting).
    async fn walreceiver_pid(&self, i: usize) -> Option<i32> {
        self.direct(i, "SELECT pid::bigint FROM pg_stat_wal_receiver")
            .await
            .map(|p| p as i32)
    }

    /// Pauses keeper `i`'s WAL receiver (SIGSTOP) and returns its pid, once
    /// the kernel reports it stopped and PostgreSQL still names it as its
    /// receiver: a test whose premise is "the standby receives nothing" must
    /// not go on when the signal missed (a receiver that was restarting).
    async fn pause_walreceiver(&self, i: usize) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let Some(pid) = self.walreceiver_pid(i).await else {
                assert!(Instant::now() < deadline, "k{i} has no WAL receiver");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            // SAFETY: pausing the WAL receiver by pid.
            let rc = unsafe { libc::kill(pid, libc::SIGSTOP) };
            let stopped = rc == 0 && {
                let mut state = None;
                for _ in 0..100 {
                    state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .ok()
                        .and_then(|s| s.rsplit(')').next().map(|r| r.trim().to_owned()))
                        .and_then(|r| r.chars().next());
                    if state == Some('T') {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                state == Some('T')
            };
            if stopped && self.walreceiver_pid(i).await == Some(pid) {
                return pid;
            }
            // SAFETY: resuming what was paused, before trying again.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            assert!(
                Instant::now() < deadline,
                "k{i}'s WAL receiver {pid} could not be paused (kill rc {rc})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
    // Paused now, resumed later.
    let receiver = c.pause_walreceiver(s).await;
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
    // SAFETY: resuming the paused WAL receiver by pid.
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

/// The row count of `w` on keeper `i`, directly.
async fn count_on(c: &LocalCluster, i: usize) -> Option<i64> {
    c.direct(i, "SELECT count(*) FROM w").await
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
    let (_s, mut c, writer) = sync_cluster_under_load(3).await;
    let old = c.master;
    let confirmed = c.data().await.dbs[&c.uid(old)]
        .status
        .sync_confirmed
        .clone();
    c.kill_postgres(old);
    c.break_data_dir(old);
    let new = c.wait_new_primary(old, Duration::from_secs(40)).await;
    assert!(
        confirmed.contains(&c.uid(new)),
        "k{new} was not a confirmed sync standby: {confirmed:?}"
    );
    finish_under_load(&c, writer).await;
    c.repair_data_dir(old);
    c.wait_standby(old).await;
}

/// F1b: a hung primary (its postmaster stopped, its keeper alive and
/// reporting it unhealthy) in synchronous mode is failed over to the
/// synchronous standby; nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_hung_primary_under_a_live_keeper_is_failed_over() {
    let (_s, mut c, writer) = sync_cluster_under_load(3).await;
    let old = c.master;
    let pid = c.primary_pid();
    // SAFETY: stopping the primary's postmaster by pid.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let new = c.wait_new_primary(old, Duration::from_secs(40)).await;
    finish_under_load(&c, writer).await;
    // The old postmaster was killed by its keeper (a stopped process does
    // not take SIGQUIT); the old primary rejoins.
    assert!(
        !keeper::postmaster::alive(pid as u32),
        "the hung postmaster still exists"
    );
    eprintln!("hung k{old} failed over to k{new}");
    c.wait_standby(old).await;
}

/// F1c: a planned switchover in synchronous mode, under write load: it
/// completes to the synchronous standby, no commit is lost, no client is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_switchover_under_write_load_loses_nothing_and_refuses_no_one() {
    let (_s, mut c, writer) = sync_cluster_under_load(3).await;
    let old = c.master;
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

/// F3: a keeper SIGKILLed while its PostgreSQL runs is restarted: it adopts
/// the running postmaster (no second one, no deleted data). Then a planned
/// switchover stops it and completes, and after another keeper restart a
/// failkeeper stops the adopted primary and fails over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_keeper_adopts_its_postgres_then_switchover_and_failover_work() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up_with(&url, store, ClusterSpec::default(), 1, 3).await;
    let first = c.master;
    let pid = c.primary_pid();
    c.kill_keeper_only(first);
    c.keepers[first - 1] = Some(c.keeper_role(first));
    crate::assert_eventually!(
        c.keeper_log(first)
            .contains("adopting the PostgreSQL already running"),
        Duration::from_secs(10),
        "k{first} did not adopt its postmaster:\n{}",
        c.keeper_log(first)
    );
    assert_eq!(c.primary_pid(), pid, "the same postmaster goes on");
    let (port, _) = c
        .next_write(
            "INSERT INTO w VALUES (1) RETURNING inet_server_port()",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(port, c.ports[first - 1]);

    // A switchover stops the adopted primary cleanly.
    c.ctl(&["switchover"]).unwrap();
    let second = c.wait_new_primary(first, Duration::from_secs(30)).await;
    assert!(
        keeper::postmaster::wait_gone(pid as u32, Duration::from_secs(10)).await,
        "the adopted postmaster was not stopped"
    );
    c.wait_standby(first).await;

    // The new primary's keeper dies and comes back; failkeeper moves the
    // primary away and stops the adopted postmaster.
    let pid = c.primary_pid();
    c.kill_keeper_only(second);
    c.keepers[second - 1] = Some(c.keeper_role(second));
    crate::assert_eventually!(
        c.keeper_log(second)
            .contains("adopting the PostgreSQL already running"),
        Duration::from_secs(10),
        "k{second} did not adopt its postmaster"
    );
    crate::assert_eventually!(
        c.data().await.dbs[&c.uid(second)].status.healthy,
        Duration::from_secs(10),
        "k{second} does not report"
    );
    let out = c.ctl(&["failkeeper", &c.uid(second)]).unwrap();
    assert!(out.contains("failover from"), "{out}");
    let third = c.wait_new_primary(second, Duration::from_secs(30)).await;
    assert!(
        keeper::postmaster::wait_gone(pid as u32, Duration::from_secs(10)).await,
        "the adopted old primary still runs"
    );
    let (port, _) = c
        .next_write(
            "INSERT INTO w VALUES (2) RETURNING inet_server_port()",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(port, c.ports[third - 1]);
    c.wait_standby(second).await;
}

/// F5: three keepers in synchronous mode under write load. The
/// synchronous standby stops receiving; commits block, but their WAL still
/// reaches the asynchronous standby, which so goes past what the
/// synchronous one has. The primary dies: the synchronous standby is
/// promoted, and the asynchronous one, diverged, is rewound onto it and
/// streams again. Nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_a_surviving_standby_that_diverged_is_rewound() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up_with(&url, store, sync_spec(), 1, 3).await;
    let a = c.master;
    c.wait_sync_confirmed(a, Duration::from_secs(30)).await;
    let d = c.data().await;
    let b = c.index(&d.dbs[&c.uid(a)].status.sync_confirmed[0]);
    let cc = (1..=3).find(|i| *i != a && *i != b).unwrap();
    let writer = Writer::start(&c.conn, 4);
    writer.wait_more(200, Duration::from_secs(30)).await;
    // Paused now, resumed later.
    let receiver = c.pause_walreceiver(b).await;
    // Commits wait for b; the WAL of a big transaction still goes to c,
    // more of it than b's socket buffers hold.
    let conn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        c.ports[a - 1]
    );
    let big = tokio::spawn(async move {
        let cl = try_connect(&conn).await.ok()?;
        cl.batch_execute("INSERT INTO w SELECT -g FROM generate_series(1, 1000000) g")
            .await
            .ok()
    });
    // As the primary sees it: c has flushed well past everything the
    // primary ever sent b (b gets what sits in its socket once resumed).
    let ahead = format!(
        "SELECT CASE WHEN (SELECT flush_lsn FROM pg_stat_replication WHERE application_name = '{}') \
           - (SELECT sent_lsn FROM pg_stat_replication WHERE application_name = '{}') > {} \
           THEN 1::bigint ELSE 0 END",
        c.uid(cc),
        c.uid(b),
        1 << 20
    );
    crate::assert_eventually!(
        c.direct(a, &ahead).await == Some(1),
        Duration::from_secs(20),
        "k{cc} did not get ahead of k{b}"
    );
    // Its WAL is all written: the big transaction's commit waits for b.
    crate::assert_eventually!(
        c.direct(
            a,
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event = 'SyncRep' AND query LIKE 'INSERT INTO w SELECT -g%'"
        )
        .await
            == Some(1)
            || big.is_finished(),
        Duration::from_secs(60),
        "the big transaction's commit is not waiting for k{b}"
    );
    assert!(
        !big.is_finished(),
        "the big transaction ended while its synchronous standby k{b} received nothing: {:?}",
        big.await
    );
    c.kill_primary();
    // SAFETY: resuming the paused WAL receiver by pid.
    unsafe { libc::kill(receiver, libc::SIGCONT) };
    let new = c.wait_new_primary(a, Duration::from_secs(40)).await;
    assert_eq!(new, b, "the synchronous standby is promoted");
    // c had flushed past b's end of WAL: it is rewound (not found to need
    // no rewind), then streams.
    crate::assert_eventually!(
        {
            let log = c.keeper_log(cc);
            log.contains("rewinding from last common checkpoint")
                && log.contains("pg_rewind: Done!")
                && !log.contains("pg_rewind failed")
        },
        Duration::from_secs(60),
        "k{cc} was not rewound:\n{}",
        c.keeper_log(cc)
    );
    writer.wait_more(100, Duration::from_secs(60)).await;
    let (acked, unknown) = writer.stop().await;
    assert_eq!(
        big.await.unwrap(),
        None,
        "the big transaction was acknowledged"
    );
    c.assert_nothing_lost(&acked, &unknown).await;
    let on_primary = count_on(&c, b).await;
    crate::assert_eventually!(
        count_on(&c, cc).await == on_primary,
        Duration::from_secs(20),
        "k{cc} does not follow k{b}"
    );
    assert!(c.is_standby(cc).await);
}

/// F9d: a second keeper started with a uid already in use is refused: it
/// changes nothing (no PostgreSQL of its own, no takeover of the other's
/// registration) and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_keeper_with_the_same_uid_is_refused() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let c = LocalCluster::up(&url, store).await;
    let s = c.other();
    let before = c.data().await.dbs[&c.uid(s)].status.address.clone();
    let dir = c.dir.path().join("dup");
    let port = crate::support::free_port();
    let log = c.dir.path().join("dup.log");
    let listen = format!("127.0.0.1:{port}");
    let dup = std::process::Command::new(crate::support::keelson_bin())
        .args([
            "keeper",
            "--uid",
            &c.uid(s),
            "--data-dir",
            &dir.display().to_string(),
            "--pg-listen",
            &listen,
            "--pg-repl-password",
            "test-secret",
            "--store",
            &url,
            "--cluster",
            "f",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _dup = crate::failover::Role(dup);
    crate::assert_eventually!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("another keeper is registered with this uid"),
        Duration::from_secs(15),
        "the duplicate did not say why it waits:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !dir.join("pgdata").exists(),
        "the duplicate made a data directory"
    );
    let d = c.data().await;
    assert_eq!(
        d.dbs[&c.uid(s)].status.address,
        before,
        "the registration was taken over"
    );
    assert!(d.dbs[&c.uid(s)].status.healthy);
}

/// F9a: the standby chosen for promotion never becomes primary (its keeper
/// is stopped right then): after `convergence_timeout` it is fenced and
/// another standby is promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_candidate_is_replaced_after_the_convergence_timeout() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let spec = ClusterSpec {
        convergence_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let mut c = LocalCluster::up_with(&url, store, spec, 1, 3).await;
    let old = c.master;
    c.wait_standbys_see("SELECT count(*) FROM w", 0).await;
    let t = Instant::now();
    c.ctl(&["failkeeper", &c.uid(old)]).unwrap();
    // The chosen candidate dies as soon as it is chosen, before it is
    // named primary.
    let deadline = Instant::now() + Duration::from_secs(20);
    let stuck = loop {
        if let Some(to) = c.data().await.failover.as_ref().and_then(|f| f.to.clone()) {
            let i = c.index(&to);
            c.kill_keeper_only(i);
            c.kill_postgres(i);
            break i;
        }
        assert!(Instant::now() < deadline, "no candidate was chosen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_ne!(
        c.data().await.proxy.master_db.as_deref(),
        Some(c.uid(stuck).as_str()),
        "k{stuck} was named before it died"
    );
    let other = (1..=3).find(|i| *i != old && *i != stuck).unwrap();
    let new = c.wait_new_primary(old, Duration::from_secs(60)).await;
    assert_eq!(new, other, "the other standby took over");
    eprintln!(
        "k{other} became primary {:?} after k{stuck} got stuck",
        t.elapsed()
    );
    let (port, _) = c
        .next_write(
            "INSERT INTO w VALUES (3) RETURNING inet_server_port()",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(port, c.ports[other - 1]);
    let d = c.data().await;
    assert!(d.dbs[&c.uid(stuck)].spec.role == cluster::data::Role::None);
    c.keepers[stuck - 1] = Some(c.keeper_role(stuck));
    c.wait_standby(stuck).await;
}

/// F7b: etcd is paused for 20 s under a write load with every keeper
/// healthy. The primary fences itself (it cannot renew its lease), but
/// once etcd is back it starts again and stays primary: time the sentinel
/// could not observe is not failure time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_is_not_a_keeper_failure() {
    let etcd = crate::support::EtcdServer::start().await;
    let store = cluster::open(&etcd.url()).await.unwrap();
    let c = LocalCluster::up(&etcd.url(), store).await;
    let before = c.data().await;
    let writer = Writer::start(&c.conn, 2);
    writer.wait_more(100, Duration::from_secs(30)).await;
    etcd.pause();
    tokio::time::sleep(Duration::from_secs(20)).await;
    etcd.resume();
    writer.wait_more(100, Duration::from_secs(60)).await;
    // Watch for a while: no failover after the outage either.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let d = c.data().await;
        assert!(
            d.failover.is_none(),
            "failed over after the outage: {:?}",
            d.notice
        );
        assert_eq!(d.proxy.master_db, before.proxy.master_db);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let d = c.data().await;
    assert_eq!(
        d.dbs[&c.uid(c.master)].status.timeline,
        before.dbs[&c.uid(c.master)].status.timeline,
        "a promotion happened"
    );
    let (acked, unknown) = writer.stop().await;
    c.assert_nothing_lost(&acked, &unknown).await;
}

/// F12: the store is lost while the keepers keep their data, and the
/// newest data is on the keeper that is not first by name. `ctl init`
/// elects nobody and says why; `ctl init --existing UID` keeps that
/// keeper's data, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_init_over_existing_data_keeps_the_data_it_is_told_to() {
    let (store_dir, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up(&url, store).await;
    let (a, b) = (c.master, c.other());
    try_connect(&c.conn)
        .await
        .unwrap()
        .batch_execute("INSERT INTO w SELECT generate_series(1, 100)")
        .await
        .unwrap();
    // Fail over to b (its timeline 2), then let a rejoin.
    c.ctl(&["failkeeper", &c.uid(a)]).unwrap();
    c.wait_new_primary(a, Duration::from_secs(30)).await;
    c.wait_standby(a).await;
    // a stops; b takes more writes; then everything stops.
    c.keepers[a - 1] = None;
    c.next_write(
        "WITH i AS (INSERT INTO w SELECT generate_series(101, 200) RETURNING 1) \
         SELECT count(*)::int FROM i",
        Duration::from_secs(30),
    )
    .await;
    c.keepers[b - 1] = None;
    c.sentinels[0] = None;
    // The store is lost.
    for f in std::fs::read_dir(store_dir.path()).unwrap() {
        let _ = std::fs::remove_file(f.unwrap().path());
    }
    let out = c.ctl(&["init"]).unwrap();
    assert!(out.contains("created"), "{out}");
    c.sentinels[0] = Some(c.sentinel_role(1));
    c.keepers[a - 1] = Some(c.keeper_role(a));
    c.keepers[b - 1] = Some(c.keeper_role(b));
    crate::assert_eventually!(
        c.status_text().contains("--existing"),
        Duration::from_secs(20),
        "ctl status does not say why no primary is elected:\n{}",
        c.status_text()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let d = c.data().await;
    assert!(
        crate::failover::master_of(&d).is_none(),
        "elected over existing data"
    );
    eprintln!("{}", c.status_text());
    // Told which data to keep: b's.
    c.store.delete(&c.keys.clusterdata()).await.unwrap();
    let out = c.ctl(&["init", "--existing", &c.uid(b)]).unwrap();
    assert!(out.contains("created"), "{out}");
    crate::assert_eventually!(
        c.data().await.proxy.master_db.as_deref() == Some(c.uid(b).as_str()),
        Duration::from_secs(60),
        "b was not elected: {}",
        c.status_text()
    );
    c.master = b;
    let n: i64 = crate::support::connect(&c.conn)
        .await
        .query_one("SELECT count(*) FROM w WHERE x BETWEEN 1 AND 200", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200, "rows written before the store was lost are gone");
    c.wait_standby(a).await;
    c.wait_standbys_see("SELECT count(*) FROM w WHERE x BETWEEN 1 AND 200", 200)
        .await;
}

/// Writes with their times and where they landed: (invoke, complete,
/// server port) of every acknowledged INSERT.
struct Timed {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    ops: std::sync::Arc<std::sync::Mutex<Vec<(Instant, Instant, u16)>>>,
}

impl Timed {
    fn start(conn: &str, first_id: i32) -> Timed {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let ops = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, o, conn) = (stop.clone(), ops.clone(), conn.to_owned());
        let task = tokio::spawn(async move {
            let mut id = first_id;
            while !s.load(Ordering::Relaxed) {
                let Ok(Ok(cl)) =
                    tokio::time::timeout(Duration::from_secs(2), try_connect(&conn)).await
                else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                while !s.load(Ordering::Relaxed) {
                    id += 1;
                    let invoked = Instant::now();
                    let r = tokio::time::timeout(
                        Duration::from_secs(2),
                        cl.query_one(
                            "INSERT INTO w VALUES ($1) RETURNING inet_server_port()",
                            &[&id],
                        ),
                    )
                    .await;
                    match r {
                        Ok(Ok(row)) => o.lock().unwrap().push((
                            invoked,
                            Instant::now(),
                            row.get::<_, i32>(0) as u16,
                        )),
                        _ => break,
                    }
                }
            }
        });
        Timed { stop, task, ops }
    }

    async fn stop(self) -> Vec<(Instant, Instant, u16)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        self.ops.lock().unwrap().clone()
    }
}

/// No write is acknowledged by the old primary after the first write that
/// the new one acknowledged was invoked (DESIGN invariant 4, with 9):
/// returns the gap between the old primary's last acknowledgement and the
/// new one's first invoke.
fn assert_no_two_primaries(
    direct: &[(Instant, Instant, u16)],
    proxied: &[(Instant, Instant, u16)],
    old_port: u16,
    new_port: u16,
) -> Duration {
    let first_new = proxied
        .iter()
        .filter(|(_, _, p)| *p == new_port)
        .map(|(i, _, _)| *i)
        .min()
        .expect("a write on the new primary");
    let last_old = direct
        .iter()
        .filter(|(_, _, p)| *p == old_port)
        .map(|(_, c, _)| *c)
        .max()
        .expect("a direct write on the old primary");
    assert!(
        last_old < first_new,
        "the old primary acknowledged a direct write {:?} after the new primary's first write was invoked",
        last_old - first_new
    );
    first_new - last_old
}

/// F2b: the primary's keeper is cut from the store (etcd), while clients
/// still reach its PostgreSQL directly. It fences itself before the
/// sentinel can promote the standby: no direct write is acknowledged by
/// the old primary once the new one takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_from_the_store_fences_itself_before_the_standby_is_promoted() {
    let etcd = crate::support::EtcdServer::start().await;
    let links = [
        crate::support::Link::start(etcd.port()).await,
        crate::support::Link::start(etcd.port()).await,
    ];
    let urls = links
        .iter()
        .map(|l| format!("etcd://127.0.0.1:{}", l.port))
        .collect();
    let store = cluster::open(&etcd.url()).await.unwrap();
    let mut c = LocalCluster::up_linked(&etcd.url(), store, ClusterSpec::default(), urls).await;
    let (old, new) = (c.master, c.other());
    let direct = Timed::start(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=2",
            c.ports[old - 1]
        ),
        1_000_000,
    );
    let proxied = Timed::start(&c.conn, 2_000_000);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    links[old - 1].cut();
    c.wait_new_primary(old, Duration::from_secs(40)).await;
    let (_, took) = c
        .next_write(
            "INSERT INTO w VALUES (5) RETURNING inet_server_port()",
            Duration::from_secs(30),
        )
        .await;
    eprintln!(
        "the standby took writes {:?} after the cut",
        t.elapsed() - took + took
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let direct = direct.stop().await;
    let proxied = proxied.stop().await;
    let gap = assert_no_two_primaries(&direct, &proxied, c.ports[old - 1], c.ports[new - 1]);
    eprintln!("the old primary's last direct write came {gap:?} before the new primary's first");
    assert!(
        c.keeper_log(old).contains("self-fencing"),
        "{}",
        c.keeper_log(old)
    );
    // The failsafe path, asymmetric: the old primary served on the
    // standby's promises until the failover began, then the standby
    // refused more and waited for its last promise to end (streaming
    // meanwhile) before it promoted.
    assert!(
        c.keeper_log(old)
            .contains("every other keeper promised not to promote"),
        "{}",
        c.keeper_log(old)
    );
    assert!(
        c.keeper_log(new).contains("promoting after it ends"),
        "{}",
        c.keeper_log(new)
    );
    links[old - 1].heal();
    c.wait_standby(old).await;
}

/// F4: the primary's keeper is paused (SIGSTOP, as a stalled VM or a
/// debugger would): its fence guard, a process of its own, stops the
/// primary before the standby is promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_keeper_s_guard_fences_its_primary_before_the_standby_is_promoted() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up(&url, store).await;
    let (old, new) = (c.master, c.other());
    let direct = Timed::start(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=2",
            c.ports[old - 1]
        ),
        1_000_000,
    );
    let proxied = Timed::start(&c.conn, 2_000_000);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let keeper = c.keepers[old - 1].as_ref().unwrap().0.id() as i32;
    // SAFETY: pausing (later resuming) the primary's keeper.
    unsafe { libc::kill(keeper, libc::SIGSTOP) };
    c.wait_new_primary(old, Duration::from_secs(40)).await;
    c.next_write(
        "INSERT INTO w VALUES (5) RETURNING inet_server_port()",
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let direct = direct.stop().await;
    let proxied = proxied.stop().await;
    let gap = assert_no_two_primaries(&direct, &proxied, c.ports[old - 1], c.ports[new - 1]);
    eprintln!("the old primary's last direct write came {gap:?} before the new primary's first");
    let guard = std::fs::read_to_string(c.dir.path().join(format!("k{old}/fence-guard.log")))
        .unwrap_or_default();
    assert!(
        guard.contains("stopping the primary"),
        "the guard did not act: {guard}"
    );
    // SAFETY: as above.
    unsafe { libc::kill(keeper, libc::SIGCONT) };
    c.wait_standby(old).await;
}

/// F6e: a synchronous primary whose PostgreSQL crashes and is restarted in
/// place by its keeper holds commits it flushed but no standby confirmed
/// (their clients never got an answer). Until a synchronous standby has
/// caught up, no client can connect and read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_a_primary_restarted_in_place_holds_clients_until_a_standby_caught_up() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let c = LocalCluster::up_with(&url, store, sync_spec(), 1, 2).await;
    let (p, s) = (c.master, c.other());
    c.wait_sync_confirmed(p, Duration::from_secs(30)).await;
    // Paused now, resumed later.
    let receiver = c.pause_walreceiver(s).await;
    let direct = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=2",
        c.ports[p - 1]
    );
    let d2 = direct.clone();
    let waiting = tokio::spawn(async move {
        let cl = try_connect(&d2).await.ok()?;
        cl.execute("INSERT INTO w VALUES (4242)", &[]).await.ok()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the commit did not wait for the standby"
    );
    c.kill_postgres(p);
    assert_eq!(waiting.await.unwrap(), None, "the commit was acknowledged");
    // The keeper restarts it; clients are held out.
    crate::assert_eventually!(
        c.keeper_log(p).contains("HoldClients"),
        Duration::from_secs(20),
        "k{p} did not restart with clients held:\n{}",
        c.keeper_log(p)
    );
    let held_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < held_until {
        match try_connect(&direct).await {
            Ok(cl) => {
                let n: i64 = cl
                    .query_one("SELECT count(*) FROM w WHERE x = 4242", &[])
                    .await
                    .unwrap()
                    .get(0);
                panic!("a client connected to the restarted primary and saw {n} unconfirmed rows");
            }
            Err(e) => {
                // 28000: held out by pg_hba.conf; 57P03: still in crash
                // recovery (refused before authentication). Either way no
                // client got in.
                let state = crate::support::sqlstate(&e);
                assert!(
                    matches!(state.as_deref(), None | Some("28000" | "57P03")),
                    "a client was refused with an unexpected error: {state:?} {e:?}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // SAFETY: resuming the paused WAL receiver by pid.
    unsafe { libc::kill(receiver, libc::SIGCONT) };
    // The standby catches up (it gets the row), then clients are let in.
    crate::assert_eventually!(
        try_connect(&direct).await.is_ok(),
        Duration::from_secs(30),
        "clients were never let back in"
    );
    crate::assert_eventually!(
        c.direct(s, "SELECT count(*) FROM w WHERE x = 4242").await == Some(1),
        Duration::from_secs(10),
        "the standby does not have the row clients can now see"
    );
    let d = c.data().await;
    assert!(d.failover.is_none(), "the restart caused a failover");
}

/// Review (second pass) 1: the keeper of the standby chosen for promotion
/// is killed right after it was chosen, while its PostgreSQL goes on (and
/// may finish promoting). Its fence guard stops that PostgreSQL before
/// another standby is promoted in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_whose_keeper_dies_while_promoting_is_fenced_by_its_guard() {
    let (_s, url) = file_store();
    let store = cluster::open(&url).await.unwrap();
    let spec = ClusterSpec {
        convergence_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let mut c = LocalCluster::up_with(&url, store, spec, 1, 3).await;
    let old = c.master;
    c.wait_standbys_see("SELECT count(*) FROM w", 0).await;
    c.ctl(&["failkeeper", &c.uid(old)]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (stuck, pid) = loop {
        if let Some(to) = c.data().await.failover.as_ref().and_then(|f| f.to.clone()) {
            let i = c.index(&to);
            let pid = c.pg_pid(i);
            // Let it promote, then kill its keeper before it reports.
            let conn = format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=2",
                c.ports[i - 1]
            );
            let cl = try_connect(&conn).await.unwrap();
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                let r = cl.query_one("SELECT pg_is_in_recovery()", &[]).await;
                if r.is_ok_and(|r| !r.get::<_, bool>(0)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            c.kill_keeper_only(i);
            break (i, pid);
        }
        assert!(Instant::now() < deadline, "no candidate was chosen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let other = (1..=3).find(|i| *i != old && *i != stuck).unwrap();
    let new = c.wait_new_primary(old, Duration::from_secs(60)).await;
    if new == stuck {
        // It was named before its keeper died: an ordinary failover.
        eprintln!("k{stuck} was named primary before its keeper died; nothing to check");
        return;
    }
    assert_eq!(new, other);
    // Either its guard stopped it, or it never got to promote: it must not
    // take writes next to the new primary.
    if keeper::postmaster::alive(pid as u32) {
        let conn = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=2",
            c.ports[stuck - 1]
        );
        if let Ok(cl) = try_connect(&conn).await {
            let r = cl.execute("INSERT INTO w VALUES (-99)", &[]).await;
            assert!(
                r.is_err(),
                "the abandoned candidate takes writes next to the new primary"
            );
        }
        eprintln!("k{stuck}'s keeper died before it promoted: it stayed a read-only standby");
    }
    let guard = std::fs::read_to_string(c.dir.path().join(format!("k{stuck}/fence-guard.log")))
        .unwrap_or_default();
    eprintln!("guard: {guard}");
    // It comes back as a fresh copy of the new primary.
    c.keepers[stuck - 1] = Some(c.keeper_role(stuck));
    c.wait_standby(stuck).await;
}
