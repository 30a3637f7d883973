//! WAL archiving and backups through a real pgBackRest, with the
//! repository on local disk (docs/backup.md).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cluster::data::{BackupSpec, BackupTool};
use cluster::ClusterSpec;

use crate::failover::{LocalCluster, Writer};
use crate::support::*;

/// A repository directory the `postgres` account may write.
fn repository(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
        std::os::unix::fs::chown(&repo, Some(uid), Some(gid)).unwrap();
    }
    repo
}

fn pgbackrest_spec(repo: &Path) -> ClusterSpec {
    ClusterSpec {
        backup: BackupSpec {
            tool: BackupTool::Pgbackrest,
            repository: Some(repo.display().to_string()),
            stanza: Some("f".into()),
            // Cheap on CPU: the tests run beside others on two cores.
            options: [("compress-type".to_owned(), "lz4".to_owned())].into(),
            ..Default::default()
        },
        // Nothing acknowledged may be lost at a SIGKILL of the primary.
        synchronous_replication: true,
        ..Default::default()
    }
}

/// `pgbackrest ARGS` as the `postgres` account with keeper `i`'s
/// configuration; stdout, or what it said when it failed.
fn pgbackrest(c: &LocalCluster, i: usize, args: &[&str]) -> Result<String, String> {
    use std::os::unix::process::CommandExt;
    let conf = c.dir.path().join(format!("k{i}")).join("pgbackrest.conf");
    let mut cmd = Command::new("pgbackrest");
    cmd.arg(format!("--config={}", conf.display()))
        .arg("--stanza=f")
        .args(args)
        .current_dir("/");
    if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
        cmd.uid(uid).gid(gid);
    }
    let out = cmd.output().expect("pgbackrest runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Restores the newest backup into `target` with keeper `i`'s
/// configuration, archiving nothing, and starts PostgreSQL on it once it
/// has replayed the archive and promoted.
async fn restore(c: &LocalCluster, i: usize, target: &Path) -> Restored {
    std::fs::create_dir_all(target).unwrap();
    if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
        std::os::unix::fs::chown(target, Some(uid), Some(gid)).unwrap();
    }
    std::fs::set_permissions(target, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    pgbackrest(
        c,
        i,
        &[
            "restore",
            &format!("--pg1-path={}", target.display()),
            "--archive-mode=off",
        ],
    )
    .unwrap();
    let restored = Restored::start(target);
    restored.wait_promoted(target).await;
    restored
}

/// A text value from keeper `i`'s PostgreSQL.
async fn text(c: &LocalCluster, i: usize, sql: &str) -> String {
    let conn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        c.ports[i - 1]
    );
    let client = connect(&conn).await;
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// A PostgreSQL started on a restored data directory, stopped on drop.
struct Restored {
    child: std::process::Child,
    port: u16,
}

impl Drop for Restored {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let _ = self.child.wait();
    }
}

impl Restored {
    /// Starts PostgreSQL on `data` on its own port and socket, archiving
    /// nothing (it must not write into the cluster's stanza) and waiting
    /// for no standby.
    fn start(data: &Path) -> Restored {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let mut cmd = Command::new(pg_bindir().join("postgres"));
        cmd.arg("-D")
            .arg(data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(data)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "archive_mode=off",
                "-c",
                "synchronous_standby_names=",
                "-c",
                "primary_conninfo=",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(data.with_extension("log")).unwrap());
        if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
            cmd.uid(uid).gid(gid);
        }
        Restored {
            child: cmd.spawn().unwrap(),
            port,
        }
    }

    fn conn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// Waits until recovery has replayed the archive and the server
    /// accepts writes.
    async fn wait_promoted(&self, data: &Path) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(client) = try_connect(&self.conn()).await {
                if let Ok(r) = client.query_one("SELECT pg_is_in_recovery()", &[]).await {
                    if !r.get::<_, bool>(0) {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "the restored server did not finish recovery:\n{}",
                std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Every instance archives (`archive_mode = always`, as PostgreSQL runs
/// it); a backup through `ctl backup`; two failovers under a write load
/// (a SIGKILL of the primary and `failkeeper`); afterwards every segment
/// and timeline history file needed to restore to now is in the
/// repository (`pgbackrest check` passes), and a restore of the backup
/// replays to the last acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_survives_two_failovers_and_a_restore_replays_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let url = format!("file://{}", dir.path().join("store").display());
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up_with(&url, store, pgbackrest_spec(&repo), 1, 3).await;
    for i in 1..=3 {
        assert_eq!(
            c.show(i, "archive_mode").await.as_deref(),
            Some("on"),
            "k{i}"
        );
        let cmd = c.show(i, "archive_command").await.unwrap_or_default();
        assert!(cmd.contains("archive-push %p"), "k{i}: {cmd}");
    }
    // Bad input is explained.
    let err = c.ctl(&["backup", "--type", "weekly"]).unwrap_err();
    assert!(err.contains("full, diff or incr"), "{err}");
    let err = c.ctl(&["backup", "--from-standby"]).unwrap_err();
    assert!(err.contains("--pgbackrest-listen"), "{err}");

    let out = c.ctl(&["backup", "--type", "full"]).unwrap();
    assert!(out.contains("taken on"), "{out}");
    let list = c.ctl(&["backups"]).unwrap();
    assert!(list.contains(" full "), "{list}");
    assert!(list.contains("archive: WAL 0000000100000000"), "{list}");
    eprintln!("{out}{list}");

    let writer = Writer::start(&c.conn, 2);
    writer.wait_more(50, Duration::from_secs(20)).await;
    // A failover after SIGKILL of a primary whose archiver is behind:
    // it is stopped, three segments complete that it never archives (the
    // writes in them are acknowledged: the standbys have them), then the
    // primary dies. The new primary's keeper pushes them.
    let old = c.master;
    let archiver: i32 = text(
        &c,
        old,
        "SELECT pid::text FROM pg_stat_activity WHERE backend_type = 'archiver'",
    )
    .await
    .parse()
    .unwrap();
    unsafe { libc::kill(archiver, libc::SIGSTOP) };
    for _ in 0..3 {
        writer.wait_more(20, Duration::from_secs(20)).await;
        text(&c, old, "SELECT pg_switch_wal()::text").await;
    }
    writer.wait_more(20, Duration::from_secs(20)).await;
    c.kill_primary();
    unsafe { libc::kill(archiver, libc::SIGKILL) };
    let new = c.wait_new_primary(old, Duration::from_secs(60)).await;
    writer.wait_more(50, Duration::from_secs(30)).await;
    c.keepers[old - 1] = Some(c.keeper_role(old));
    c.wait_standby(old).await;
    // Before it promoted, k{new} pushed what k{old} had left unarchived
    // (the three segments, and any it had not reported archived yet).
    let log = c.keeper_log(new);
    let line = log
        .lines()
        .find(|l| l.contains("archived the segments the old primary had not"))
        .unwrap_or_else(|| panic!("k{new} pushed nothing before promoting:\n{log}"));
    let pushed: u32 = line
        .split("pushed=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(pushed >= 3, "{line}");
    eprintln!("{line}");
    // And one by failkeeper.
    let out = c.ctl(&["failkeeper", &c.uid(new)]).unwrap();
    assert!(out.contains("failover from"), "{out}");
    c.wait_new_primary(new, Duration::from_secs(60)).await;
    writer.wait_more(50, Duration::from_secs(30)).await;
    let (acked, unknown) = writer.stop().await;
    c.assert_nothing_lost(&acked, &unknown).await;
    let m = c.master;
    assert_eq!(c.data().await.dbs[&c.uid(m)].status.timeline, 3);

    // Everything up to now reaches the repository: the segment the last
    // write is in (switched), and both timelines' history files.
    let last = text(&c, m, "SELECT pg_walfile_name(pg_switch_wal() - 1)").await;
    let archived_sql = "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver";
    crate::assert_eventually!(
        text(&c, m, archived_sql).await >= last,
        Duration::from_secs(60),
        "segment {last} was not archived"
    );
    pgbackrest(&c, m, &["check"]).unwrap();
    let archive = std::fs::read_dir(repo.join("archive/f"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .expect("an archive directory for the stanza");
    for h in ["00000002.history", "00000003.history"] {
        assert!(
            std::fs::read_dir(&archive)
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(h)),
            "{h} is not in {}",
            archive.display()
        );
    }
    let status = c.ctl(&["status"]).unwrap();
    assert!(status.contains("archive (on)"), "{status}");
    assert!(!status.contains("FAILING"), "{status}");

    // A restore of the backup taken before both failovers replays the
    // archive across both timelines to the last acknowledged write.
    let t = Instant::now();
    let restored = restore(&c, m, &dir.path().join("restored")).await;
    eprintln!("restored and replayed in {:?}", t.elapsed());
    let client = connect(&restored.conn()).await;
    let present: i64 = client
        .query_one("SELECT count(*) FROM w WHERE x = ANY($1)", &[&acked])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        present,
        acked.len() as i64,
        "every acknowledged write is in the restored database"
    );
    let timeline: i32 = client
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        timeline >= 3,
        "recovery followed both failovers: {timeline}"
    );
    drop(client);
    drop(restored);

    // A standby copied afresh from the backup and the archive (taken on
    // timeline 1, two failovers ago) instead of a pg_basebackup.
    c.ctl(&[
        "spec",
        "update",
        "--patch",
        r#"{"backup": {"standbys_from_backup": true}}"#,
    ])
    .unwrap();
    let standby = c.standbys()[0];
    c.ctl(&["reinit", &c.uid(standby)]).unwrap();
    crate::assert_eventually!(
        c.keeper_log(standby)
            .contains("the standby's data restored from the newest backup"),
        Duration::from_secs(60),
        "k{standby} was not restored from the backup:\n{}",
        c.keeper_log(standby)
    );
    c.wait_standby(standby).await;
    let total = c.direct(c.master, "SELECT count(*) FROM w").await.unwrap();
    // It replays two timelines of archive before it streams: under a full
    // CI run that takes longer than an ordinary standby's catching up.
    crate::assert_eventually!(
        c.direct(standby, "SELECT count(*) FROM w").await == Some(total),
        Duration::from_secs(60),
        "k{standby}, restored from the backup, never saw {total} rows: {:?}\n{}",
        c.direct(standby, "SELECT count(*) FROM w").await,
        c.keeper_log(standby)
    );
    c.wait_standbys_see("SELECT count(*) FROM w", total).await;
    c.assert_streams_to_all().await;
    c.keepers.clear();
}

/// A spec that cannot work is refused with the reason, before anything
/// is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_section_that_cannot_work_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let spec = dir.path().join("spec.json");
    let ctl = |args: &[&str]| {
        Command::new(keelson_bin())
            .args(["ctl", "--store", &url, "--cluster", "b"])
            .args(args)
            .output()
            .unwrap()
    };
    for (json, says) in [
        (
            r#"{"backup": {"tool": "pgbackrest", "stanza": "b"}}"#,
            "needs repository",
        ),
        (
            r#"{"backup": {"tool": "pgbackrest", "repository": "/r", "stanza": "b"}, "failsafe": false, "convergence_timeout": "12s"}"#,
            "must be longer than 12s with a backup tool",
        ),
        (
            r#"{"backup": {"tool": "pgbackrest", "repository": "/r", "stanza": ".."}}"#,
            "stanza",
        ),
        (
            r#"{"backup": {"tool": "pgbackrest", "repository": "/r", "stanza": "b"}, "pg_parameters": {"archive_command": "true"}}"#,
            "set by keelson from the backup section",
        ),
        (
            r#"{"backup": {"tool": "command", "archive_command": "true", "restore_command": "cp /a/%f %p"}}"#,
            "%p",
        ),
        (
            r#"{"backup": {"tool": "pgbackrest", "repository": "/r", "stanza": "b", "retention": 2}}"#,
            "backup.retention",
        ),
    ] {
        std::fs::write(&spec, json).unwrap();
        let out = ctl(&["init", "--spec", &spec.display().to_string()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{json}: {err}");
    }
    let out = ctl(&["status"]);
    assert!(!out.status.success(), "nothing was created");
}

/// The `command` kind: the operator's own templates (here `cp` into a
/// directory; a segment pushed again must be the same file, as
/// docs/backup.md asks of a tool). The primary archives through them, a
/// failover's new primary archives its timeline history file and its own
/// segments there, each instance runs them as PostgreSQL shows, and `ctl
/// backup` says that base backups are the tool's business.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_tool_archives_through_the_operators_templates_across_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    std::fs::create_dir_all(&archive).unwrap();
    if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
        std::os::unix::fs::chown(&archive, Some(uid), Some(gid)).unwrap();
    }
    let a = archive.display();
    let spec = ClusterSpec {
        backup: BackupSpec {
            tool: BackupTool::Command,
            archive_command: Some(format!(
                "if test -f {a}/%f; then cmp -s %p {a}/%f; else cp %p {a}/%f; fi"
            )),
            restore_command: Some(format!("cp {a}/%f %p")),
            ..Default::default()
        },
        // Asynchronous: with two keepers, a synchronous new primary would
        // wait for the dead one to rejoin before taking a commit.
        synchronous_replication: false,
        ..Default::default()
    };
    let url = format!("file://{}", dir.path().join("store").display());
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up_with(&url, store, spec, 1, 2).await;
    for i in 1..=2 {
        assert_eq!(c.show(i, "archive_mode").await.as_deref(), Some("on"));
        let cmd = c.show(i, "archive_command").await.unwrap_or_default();
        assert!(cmd.contains(&format!("else cp %p {a}/%f")), "k{i}: {cmd}");
        let cmd = c.show(i, "restore_command").await.unwrap_or_default();
        assert!(cmd.contains(&format!("cp {a}/%f %p")), "k{i}: {cmd}");
    }
    let err = c.ctl(&["backup"]).unwrap_err();
    assert!(err.contains("take base backups with that tool"), "{err}");

    let archived = |name: String| {
        let path = archive.join(&name);
        async move {
            crate::assert_eventually!(
                path.exists(),
                Duration::from_secs(60),
                "{name} never reached the archive"
            );
        }
    };
    let old = c.master;
    let proxy = c.conn.clone();
    let insert = |x: i32| {
        let conn = proxy.clone();
        async move {
            let client = connect(&conn).await;
            client
                .execute("INSERT INTO w VALUES ($1)", &[&x])
                .await
                .unwrap();
        }
    };
    insert(1).await;
    let seg = text(&c, old, "SELECT pg_walfile_name(pg_switch_wal() - 1)").await;
    archived(seg).await;
    c.kill_primary();
    let new = c.wait_new_primary(old, Duration::from_secs(60)).await;
    // The timeline, as the first 8 hex digits of a WAL file's name.
    let timeline = text(
        &c,
        new,
        "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
    )
    .await;
    assert_ne!(
        timeline, "00000001",
        "the new primary is still on timeline 1"
    );
    archived(format!("{timeline}.history")).await;
    insert(2).await;
    let seg = text(&c, new, "SELECT pg_walfile_name(pg_switch_wal() - 1)").await;
    assert!(seg.starts_with(&timeline), "{seg}");
    archived(seg).await;
    let failed = text(&c, new, "SELECT failed_count::text FROM pg_stat_archiver").await;
    assert_eq!(failed, "0", "the new primary's archiver failed");
    let log = c.keeper_log(new);
    assert!(
        !log.contains("could not archive every segment"),
        "the pre-promotion push failed:\n{log}"
    );
}

/// `ctl init --mode pitr` to a time, an LSN and a restore point's name
/// taken between two marked inserts: each restored cluster (a primary
/// restored and replayed by its keeper, a standby copied from it) has the
/// first insert and not the second, takes writes, and carries no recovery
/// target into its configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pitr_to_a_time_an_lsn_and_a_restore_point_keeps_the_first_insert_not_the_second() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let url = format!("file://{}", dir.path().join("store").display());
    let store = cluster::open(&url).await.unwrap();
    let a = LocalCluster::up_with(&url, store, pgbackrest_spec(&repo), 1, 2).await;
    a.ctl(&["backup"]).unwrap();
    let client = connect(&a.conn).await;
    client
        .batch_execute("INSERT INTO w VALUES (1)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let marks = client
        .query_one(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00', \
             pg_current_wal_lsn()::text, pg_create_restore_point('between')::text",
            &[],
        )
        .await
        .unwrap();
    let (time, lsn): (String, String) = (marks.get(0), marks.get(1));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    client
        .batch_execute("INSERT INTO w VALUES (2)")
        .await
        .unwrap();
    let last = text(&a, a.master, "SELECT pg_walfile_name(pg_switch_wal() - 1)").await;
    let archived_sql = "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver";
    crate::assert_eventually!(
        text(&a, a.master, archived_sql).await >= last,
        Duration::from_secs(60),
        "segment {last} was not archived"
    );
    drop(client);
    drop(a);

    for (flag, target) in [
        ("--target-time", time.as_str()),
        ("--target-lsn", lsn.as_str()),
        ("--target-name", "between"),
    ] {
        // Each restore reads a copy of the repository as A left it (a
        // restored cluster archives its own new timeline into it).
        let copy = dir.path().join(format!("repo{}", &flag[9..]));
        let out = Command::new("cp")
            .args(["-a"])
            .arg(&repo)
            .arg(&copy)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let spec_file = dir.path().join(format!("spec{}.json", &flag[9..]));
        std::fs::write(
            &spec_file,
            serde_json::to_string(&pgbackrest_spec(&copy)).unwrap(),
        )
        .unwrap();
        let url = format!(
            "file://{}",
            dir.path().join(format!("store{}", &flag[9..])).display()
        );
        let init = Command::new(keelson_bin())
            .args([
                "ctl",
                "--store",
                &url,
                "--cluster",
                "f",
                "init",
                "--mode",
                "pitr",
            ])
            .args([flag, target])
            .arg("--spec")
            .arg(&spec_file)
            .output()
            .unwrap();
        assert!(init.status.success(), "{init:?}");
        let t = Instant::now();
        let store = cluster::open(&url).await.unwrap();
        let b = LocalCluster::up_initialized(&url, store, 1, &["k1", "k2"], Vec::new(), Vec::new())
            .await;
        eprintln!(
            "{flag} {target}: restored, promoted and a standby streaming in {:?}",
            t.elapsed()
        );
        for (x, want) in [(1, 1), (2, 0)] {
            assert_eq!(
                b.direct(b.master, &format!("SELECT count(*) FROM w WHERE x = {x}"))
                    .await,
                Some(want),
                "{flag} {target}: insert {x}"
            );
        }
        let client = connect(&b.conn).await;
        client
            .batch_execute("INSERT INTO w VALUES (3)")
            .await
            .unwrap();
        b.wait_standbys_see("SELECT count(*) FROM w WHERE x IN (1, 3)", 2)
            .await;
        // No recovery target is left anywhere a server could read it again:
        // not in the standby's settings, not in either's files, not as a
        // restart pending.
        let name = format!("recovery_target_{}", &flag[9..]);
        let standby = b.standbys()[0];
        assert_eq!(
            b.show(standby, &name).await.as_deref(),
            Some(""),
            "the standby runs with {name}"
        );
        for i in 1..=2 {
            for f in ["postgresql.auto.conf", "keelson.conf", "postgresql.conf"] {
                let path = b.dir.path().join(format!("k{i}/pgdata/{f}"));
                let text: String = std::fs::read_to_string(&path)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| !l.trim_start().starts_with('#'))
                    .map(|l| format!("{l}\n"))
                    .collect();
                assert!(
                    !text.contains(&format!("{name} ")) && !text.contains("recovery_target_action"),
                    "{}: {text}",
                    path.display()
                );
            }
        }
        crate::assert_eventually!(
            b.data().await.dbs[&b.uid(b.master)]
                .status
                .pending_restart
                .is_empty(),
            Duration::from_secs(10),
            "the restored primary reports a restart pending: {:?}",
            b.data().await.dbs[&b.uid(b.master)].status.pending_restart
        );
    }
}

/// Runs a PostgreSQL program as the `postgres` account; its stdout.
fn pg_program(name: &str, args: &[&str]) -> String {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(pg_bindir().join(name));
    cmd.args(args).current_dir("/");
    if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
        cmd.uid(uid).gid(gid);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{name} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A data directory made outside keelson (`initdb`, a table `w` with
/// `rows` rows, stopped cleanly) as `keeper_dir/pgdata`; its system id.
fn data_made_elsewhere(keeper_dir: &Path, rows: i64) -> String {
    std::fs::create_dir_all(keeper_dir).unwrap();
    if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
        std::os::unix::fs::chown(keeper_dir, Some(uid), Some(gid)).unwrap();
    }
    let data = keeper_dir.join("pgdata");
    let (d, sock) = (data.display().to_string(), keeper_dir.display().to_string());
    pg_program(
        "initdb",
        &["-D", &d, "-U", "postgres", "-A", "trust", "--no-sync"],
    );
    let port = free_port().to_string();
    let opts = format!("-p {port} -k {sock} -c listen_addresses=''");
    pg_program(
        "pg_ctl",
        &[
            "-D",
            &d,
            "-o",
            &opts,
            "-w",
            "-l",
            &format!("{sock}/seed.log"),
            "start",
        ],
    );
    pg_program(
        "psql",
        &[
            "-h",
            &sock,
            "-p",
            &port,
            "-U",
            "postgres",
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!("CREATE TABLE w (x int); INSERT INTO w SELECT generate_series(1, {rows})"),
        ],
    );
    pg_program("pg_ctl", &["-D", &d, "-m", "fast", "-w", "stop"]);
    system_id(&data)
}

fn system_id(data: &Path) -> String {
    pg_program("pg_controldata", &[&data.display().to_string()])
        .lines()
        .find_map(|l| {
            l.strip_prefix("Database system identifier:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap()
}

/// `ctl init --mode existing --keeper k1` over a data directory made
/// outside keelson: its rows survive, the other keeper copies them, and a
/// keeper whose directory holds another PostgreSQL system refuses to join
/// and leaves it as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_existing_adopts_data_made_elsewhere_and_another_system_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let adopted = data_made_elsewhere(&dir.path().join("k1"), 500);
    let store_dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", store_dir.path().display());
    let ctl = |args: &[&str]| {
        Command::new(keelson_bin())
            .args(["ctl", "--store", &url, "--cluster", "f"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = ctl(&["init", "--mode", "existing"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("needs --keeper"),
        "{err}"
    );
    let out = ctl(&["init", "--mode", "existing", "--keeper", "k1"]);
    assert!(out.status.success(), "{out:?}");
    let store = cluster::open(&url).await.unwrap();
    let mut c =
        LocalCluster::up_in(dir, &url, store, 1, &["k1", "k2"], Vec::new(), Vec::new()).await;
    assert_eq!(c.uid(c.master), "k1");
    assert_eq!(c.direct(1, "SELECT count(*) FROM w").await, Some(500));
    c.wait_standbys_see("SELECT count(*) FROM w", 500).await;
    assert_eq!(
        c.data().await.dbs["k1"].status.system_id.as_deref(),
        Some(adopted.as_str())
    );

    // k3's directory holds another system's data.
    let k3 = c.dir.path().join("k3");
    let other = data_made_elsewhere(&k3, 7);
    assert_ne!(other, adopted);
    let marker = k3.join("pgdata").join("still-here");
    std::fs::write(&marker, "").unwrap();
    c.uids.push("k3".into());
    c.ports.push(free_port());
    c.api_ports.push(free_port());
    c.keepers.push(Some(c.keeper_role(3)));
    crate::assert_eventually!(
        c.data()
            .await
            .dbs
            .get("k3")
            .and_then(|d| d.status.problem.clone())
            .is_some_and(|p| p.contains("another PostgreSQL system")),
        Duration::from_secs(30),
        "k3 did not refuse: {:?}",
        c.data().await.dbs.get("k3").map(|d| d.status.clone())
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        system_id(&k3.join("pgdata")),
        other,
        "k3's data was replaced"
    );
    assert!(marker.exists(), "k3's data directory was touched");
    let status = c.ctl(&["status"]).unwrap();
    assert!(status.contains("another PostgreSQL system"), "{status}");
    c.keepers.clear();
}

/// `ctl backup --from-standby`: pgBackRest copies the files from a
/// streaming standby, and only starts and stops the backup on the primary,
/// through the primary's keeper's pgBackRest TLS server
/// (`--pgbackrest-listen`, with the keepers' certificates); the backup
/// restores with every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_from_a_standby_goes_through_the_primarys_tls_server_and_restores() {
    let certs = tempfile::tempdir().unwrap();
    let (ca_cert, issuer) = crate::secured::ca("keelson test PostgreSQL CA");
    let ca_path = certs.path().join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let args: Vec<Vec<String>> = (1..=2)
        .map(|i| {
            let mut a = crate::secured::keeper_tls_args(certs.path(), i, &issuer, &ca_path);
            // pgBackRest checks the server's certificate for a host name
            // (an IP address SAN does not match).
            a.extend([
                "--pgbackrest-listen".into(),
                format!("localhost:{}", free_port()),
            ]);
            a
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path());
    let url = format!("file://{}", dir.path().join("store").display());
    let store = cluster::open(&url).await.unwrap();
    let spec = ClusterSpec {
        synchronous_replication: false,
        ..pgbackrest_spec(&repo)
    };
    let c = LocalCluster::up_with_keeper_args(&url, store, spec, args).await;
    let client = connect(&c.conn).await;
    client
        .batch_execute("INSERT INTO w SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    drop(client);
    crate::assert_eventually!(
        c.data()
            .await
            .dbs
            .values()
            .all(|db| db.status.pgbackrest_server.is_some()),
        Duration::from_secs(30),
        "the keepers do not report their pgBackRest servers"
    );
    let standby = c.standbys()[0];
    c.wait_standbys_see("SELECT count(*) FROM w", 1000).await;
    // `ctl backup --from-standby` takes a standby the cluster data shows
    // streaming.
    crate::assert_eventually!(
        c.data().await.dbs[&c.uid(standby)].status.streaming,
        Duration::from_secs(30),
        "k{standby} is not reported streaming"
    );
    let out = c
        .ctl(&["backup", "--from-standby", "--type", "full"])
        .unwrap_or_else(|e| panic!("{e}\n{}", c.keeper_log(standby)));
    eprintln!("{out}");
    assert!(out.contains("a standby"), "{out}");
    assert!(out.contains(&format!("taken on k{standby}")), "{out}");
    // pgBackRest waited for the standby to replay the backup's start.
    let log = std::fs::read_to_string(
        c.dir
            .path()
            .join(format!("k{standby}/pgbackrest/log/f-backup.log")),
    )
    .unwrap_or_default();
    assert!(
        log.contains("replay on the standby"),
        "pgBackRest did not back up from the standby:\n{log}"
    );
    // The primary's list (what `ctl backups` reads) is read again once a
    // standby reports a backup.
    crate::assert_eventually!(
        c.ctl(&["backups"]).unwrap().contains(" full "),
        Duration::from_secs(20),
        "`ctl backups` does not list the standby's backup: {}",
        c.ctl(&["backups"]).unwrap()
    );

    // It restores, with every row.
    let restored = restore(&c, standby, &dir.path().join("restored")).await;
    let client = connect(&restored.conn()).await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM w", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1000, "the backup from the standby restores every row");
    drop(client);
    drop(restored);
    // The server ends with its keeper, even a SIGKILLed one.
    let conf = c
        .dir
        .path()
        .join(format!("k{}/pgbackrest-server.conf", c.master));
    let running = || {
        Command::new("pgrep")
            .args(["-f", &conf.display().to_string()])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(
        running(),
        "k{}'s pgBackRest server is not running",
        c.master
    );
    let mut c = c;
    c.kill_primary();
    crate::assert_eventually!(
        !running(),
        Duration::from_secs(5),
        "the pgBackRest server outlived its SIGKILLed keeper"
    );
}
