//! Automatic failover with the real roles: a sentinel and two keepers run
//! as child processes of the `keelson` binary, a proxy follows the store.
//! The primary's keeper and its PostgreSQL are killed with SIGKILL; writes
//! through the proxy must resume on the standby, and the old primary,
//! restarted, must rejoin as a standby.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicI32;
use std::time::{Duration, Instant};

use cluster::{AnyStore, ClusterData, ClusterSpec, Keys, Store};
use proxy_core::{ProxyConfig, View, ViewHandle};

use crate::support::{free_port, keelson_bin, landing_port, try_connect, EtcdServer, TestProxy};

pub(crate) struct Role(pub(crate) Child);

impl Drop for Role {
    fn drop(&mut self) {
        // SIGTERM: the keeper stops its PostgreSQL on the way out.
        keeper::process::terminate(&mut self.0, libc::SIGTERM, Duration::from_secs(15));
    }
}

fn spawn(args: &[&str], log: &std::path::Path) -> Role {
    let f = std::fs::File::create(log).unwrap();
    Role(
        Command::new(keelson_bin())
            .args(args)
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap(),
    )
}

/// The database the cluster data makes primary.
pub(crate) fn master_of(d: &ClusterData) -> Option<String> {
    sentinel::decide::master(d)
}

async fn status(store: &AnyStore, keys: &Keys) -> Option<ClusterData> {
    let kv = store.get(&keys.clusterdata()).await.ok()??;
    ClusterData::from_json(&kv.value).ok()
}

/// A sentinel and two keepers as child processes, a proxy following the
/// store in this process, and a table `w` created through the proxy.
pub(crate) struct LocalCluster {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) url: String,
    pub(crate) store: AnyStore,
    pub(crate) keys: Keys,
    pub(crate) ports: Vec<u16>,
    pub(crate) keepers: Vec<Option<Role>>,
    /// Sentinels s1, s2, ...; `None` once killed.
    pub(crate) sentinels: Vec<Option<Role>>,
    pub(crate) proxy: TestProxy,
    pub(crate) conn: String,
    /// 1-based index of the keeper whose database is primary.
    pub(crate) master: usize,
    /// The keepers' uids, by index - 1 (`k1`, `k2`, ... unless named).
    pub(crate) uids: Vec<String>,
    /// Per keeper, a store URL other than the cluster's (through a `Link`).
    pub(crate) keeper_urls: Vec<Option<String>>,
    /// The keepers' node API ports, by index - 1.
    pub(crate) api_ports: Vec<u16>,
    /// The sentinels' node API ports, by index - 1.
    pub(crate) sentinel_api_ports: Vec<u16>,
    /// Extra flags of keeper `i`, by index - 1.
    pub(crate) keeper_args: Vec<Vec<String>>,
}

/// A failed test keeps its cluster's logs (keepers, sentinels, each
/// keeper's PostgreSQL): its
/// temporary directory, data and all, is removed with it. With
/// `KEELSON_KEEP_LOGS` set, a test that passed keeps them too.
impl Drop for LocalCluster {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if !failed && std::env::var_os("KEELSON_KEEP_LOGS").is_none() {
            return;
        }
        let keep = std::env::temp_dir().join(format!(
            "keelson-{}-{}-{}",
            if failed { "failed" } else { "passed" },
            std::process::id(),
            std::thread::current()
                .name()
                .unwrap_or("test")
                .replace("::", "-")
        ));
        let _ = std::fs::create_dir_all(&keep);
        for e in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(&path, keep.join(e.file_name()));
            }
            // Each keeper's PostgreSQL log, as k1-postgres.log.
            let pg_log = path.join("postgres.log");
            if pg_log.is_file() {
                let name = format!("{}-postgres.log", e.file_name().to_string_lossy());
                let _ = std::fs::copy(&pg_log, keep.join(name));
            }
        }
        eprintln!("the cluster's logs are kept in {}", keep.display());
        if let Some(m) = crate::support::panic_message(600).filter(|_| failed) {
            eprintln!("the test failed at {m}");
        }
    }
}

impl LocalCluster {
    pub(crate) fn keeper_role(&self, i: usize) -> Role {
        crate::support::note_panics();
        let data = self.dir.path().join(format!("k{i}")).display().to_string();
        let listen = format!("127.0.0.1:{}", self.ports[i - 1]);
        let uid = self.uid(i);
        let api = format!("127.0.0.1:{}", self.api_ports[i - 1]);
        let url = self
            .keeper_urls
            .get(i - 1)
            .cloned()
            .flatten()
            .unwrap_or_else(|| self.url.clone());
        let extra: Vec<&str> = self
            .keeper_args
            .get(i - 1)
            .map(|a| a.iter().map(String::as_str).collect())
            .unwrap_or_default();
        // Extra arguments may name the node API address themselves.
        let api_args = if extra.contains(&"--api-listen") {
            Vec::new()
        } else {
            vec!["--api-listen", api.as_str()]
        };
        spawn(
            &[
                &[
                    "keeper",
                    "--uid",
                    &uid,
                    "--data-dir",
                    &data,
                    "--pg-listen",
                    &listen,
                    "--pg-repl-password",
                    "test-secret",
                    "--store",
                    &url,
                    "--cluster",
                    "f",
                ][..],
                &api_args[..],
                &extra[..],
            ]
            .concat(),
            &self.dir.path().join(format!("keeper{i}.log")),
        )
    }

    /// Sentinel `i` (1-based) of this cluster, started again.
    pub(crate) fn sentinel_role(&self, i: usize) -> Role {
        let uid = format!("s{i}");
        let api = format!(
            "127.0.0.1:{}",
            self.sentinel_api_ports.get(i - 1).copied().unwrap_or(0)
        );
        spawn(
            &[
                "sentinel",
                "--uid",
                &uid,
                "--store",
                &self.url,
                "--cluster",
                "f",
                "--api-listen",
                &api,
            ],
            &self.dir.path().join(format!("sentinel{i}.log")),
        )
    }

    pub(crate) async fn up(url: &str, store: AnyStore) -> LocalCluster {
        Self::up_with(url, store, ClusterSpec::default(), 1, 2).await
    }

    pub(crate) async fn up_with(
        url: &str,
        store: AnyStore,
        spec: ClusterSpec,
        sentinels: usize,
        keepers: usize,
    ) -> LocalCluster {
        let uids: Vec<String> = (1..=keepers).map(|i| format!("k{i}")).collect();
        let uids: Vec<&str> = uids.iter().map(String::as_str).collect();
        Self::up_named(url, store, spec, sentinels, &uids).await
    }

    /// A cluster whose keeper `i` reaches the store at `keeper_urls[i-1]`.
    pub(crate) async fn up_linked(
        url: &str,
        store: AnyStore,
        spec: ClusterSpec,
        keeper_urls: Vec<String>,
    ) -> LocalCluster {
        let uids: Vec<String> = (1..=keeper_urls.len()).map(|i| format!("k{i}")).collect();
        let uids: Vec<&str> = uids.iter().map(String::as_str).collect();
        Self::up_full(
            url,
            store,
            spec,
            1,
            &uids,
            keeper_urls.into_iter().map(Some).collect(),
            Vec::new(),
        )
        .await
    }

    /// The uid of keeper `i` (1-based).
    pub(crate) fn uid(&self, i: usize) -> String {
        self.uids[i - 1].clone()
    }

    /// The 1-based index of keeper `uid`.
    pub(crate) fn index(&self, uid: &str) -> usize {
        self.uids.iter().position(|u| u == uid).expect("a keeper") + 1
    }

    /// A cluster whose keepers have these uids.
    pub(crate) async fn up_named(
        url: &str,
        store: AnyStore,
        spec: ClusterSpec,
        sentinels: usize,
        uids: &[&str],
    ) -> LocalCluster {
        Self::up_full(url, store, spec, sentinels, uids, Vec::new(), Vec::new()).await
    }

    /// A cluster whose keeper `i` gets `keeper_args[i-1]` as extra flags.
    pub(crate) async fn up_with_keeper_args(
        url: &str,
        store: AnyStore,
        spec: ClusterSpec,
        keeper_args: Vec<Vec<String>>,
    ) -> LocalCluster {
        let uids: Vec<String> = (1..=keeper_args.len()).map(|i| format!("k{i}")).collect();
        let uids: Vec<&str> = uids.iter().map(String::as_str).collect();
        Self::up_full(url, store, spec, 1, &uids, Vec::new(), keeper_args).await
    }

    pub(crate) async fn up_full(
        url: &str,
        store: AnyStore,
        spec: ClusterSpec,
        sentinels: usize,
        uids: &[&str],
        keeper_urls: Vec<Option<String>>,
        keeper_args: Vec<Vec<String>>,
    ) -> LocalCluster {
        let keys = Keys::new("keelson", "f");
        store
            .put(&keys.clusterdata(), &ClusterData::new(spec).to_json(), 0)
            .await
            .unwrap();
        Self::up_initialized(url, store, sentinels, uids, keeper_urls, keeper_args).await
    }

    /// A cluster whose data is in the store already (`keelson ctl init`).
    pub(crate) async fn up_initialized(
        url: &str,
        store: AnyStore,
        sentinels: usize,
        uids: &[&str],
        keeper_urls: Vec<Option<String>>,
        keeper_args: Vec<Vec<String>>,
    ) -> LocalCluster {
        let dir = tempfile::tempdir().unwrap();
        Self::up_in(dir, url, store, sentinels, uids, keeper_urls, keeper_args).await
    }

    /// [`LocalCluster::up_initialized`] with the keepers' directories in
    /// `dir` (which may hold their data already: `kN/pgdata`).
    pub(crate) async fn up_in(
        dir: tempfile::TempDir,
        url: &str,
        store: AnyStore,
        sentinels: usize,
        uids: &[&str],
        keeper_urls: Vec<Option<String>>,
        keeper_args: Vec<Vec<String>>,
    ) -> LocalCluster {
        let keepers = uids.len();
        if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let keys = Keys::new("keelson", "f");
        let sentinel_api_ports: Vec<u16> = (0..sentinels).map(|_| free_port()).collect();
        let sentinels = (1..=sentinels)
            .map(|i| {
                let uid = format!("s{i}");
                let api = format!("127.0.0.1:{}", sentinel_api_ports[i - 1]);
                Some(spawn(
                    &[
                        "sentinel",
                        "--uid",
                        &uid,
                        "--store",
                        url,
                        "--cluster",
                        "f",
                        "--api-listen",
                        &api,
                    ],
                    &dir.path().join(format!("sentinel{i}.log")),
                ))
            })
            .collect();
        // Routing tests use a replica listener, a 1 MiB lag limit, and end
        // the sessions of a replica that falls behind it.
        let cfg = ProxyConfig {
            replica_lag: proxy_core::LagLimit {
                bytes: 1 << 20,
                time: Duration::from_secs(30),
            },
            replica_lag_fence: true,
            ..Default::default()
        };
        let proxy = TestProxy::with_view(ViewHandle::new(View::default()), cfg).await;
        let _ = keelson::follow::spawn(
            store.clone(),
            keys.clone(),
            "p1".into(),
            proxy.proxy.clone(),
            proxy.proxy.view().clone(),
        );
        let conn = proxy.conn("postgres");
        let mut c = LocalCluster {
            dir,
            url: url.to_owned(),
            store,
            keys,
            ports: (0..keepers).map(|_| free_port()).collect(),
            keepers: Vec::new(),
            sentinels,
            proxy,
            conn,
            master: 0,
            uids: uids.iter().map(|u| u.to_string()).collect(),
            keeper_urls,
            api_ports: (0..keepers).map(|_| free_port()).collect(),
            sentinel_api_ports,
            keeper_args,
        };
        c.keepers = (1..=keepers).map(|i| Some(c.keeper_role(i))).collect();
        crate::assert_eventually!(
            status(&c.store, &c.keys)
                .await
                .is_some_and(|d| d.proxy.master_db.is_some()
                    && d.dbs.values().filter(|db| db.status.healthy).count() == keepers),
            Duration::from_secs(120),
            "the cluster never came up: {:?}",
            status(&c.store, &c.keys).await
        );
        let data = status(&c.store, &c.keys).await.unwrap();
        c.master = c.index(&data.proxy.master_db.unwrap());
        if data.spec.is_standby() {
            // A standby cluster takes no writes (tests/tests/standby.rs).
            return c;
        }
        crate::assert_eventually!(
            landing_port(&c.conn).await == Some(c.ports[c.master - 1]),
            Duration::from_secs(10),
            "the proxy never routed to the primary"
        );
        let client = try_connect(&c.conn).await.unwrap();
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS w (x int)")
            .await
            .unwrap();
        // Replication works: every standby has the table (and the rows a
        // restored primary has).
        let rows = c.direct(c.master, "SELECT count(*) FROM w").await.unwrap();
        c.wait_standbys_see("SELECT count(*) FROM w", rows).await;
        c
    }

    /// Waits until `sql` (a count) gives `want` on every standby.
    pub(crate) async fn wait_standbys_see(&self, sql: &str, want: i64) {
        for i in self.standbys() {
            crate::assert_eventually!(
                self.direct(i, sql).await == Some(want),
                Duration::from_secs(10),
                "standby k{i} never saw {sql} = {want}"
            );
        }
    }

    /// The 1-based indexes of the keepers that are not the primary.
    pub(crate) fn standbys(&self) -> Vec<usize> {
        (1..=self.keepers.len())
            .filter(|i| *i != self.master)
            .collect()
    }

    /// The first keeper that is not the primary.
    pub(crate) fn other(&self) -> usize {
        self.standbys()[0]
    }

    /// Runs a one-value count query directly on keeper `i`'s PostgreSQL.
    pub(crate) async fn direct(&self, i: usize, sql: &str) -> Option<i64> {
        let conn = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.ports[i - 1]
        );
        let client = try_connect(&conn).await.ok()?;
        client.query_one(sql, &[]).await.ok().map(|r| r.get(0))
    }

    /// Asserts that keeper `i` rejoined with pg_rewind, not a new copy.
    pub(crate) fn assert_rewound(&self, i: usize) {
        let log = std::fs::read_to_string(self.dir.path().join(format!("keeper{i}.log")))
            .unwrap_or_default();
        assert!(
            log.contains("pg_rewind: Done!") && !log.contains("pg_rewind failed"),
            "k{i} did not rejoin through pg_rewind:\n{log}"
        );
    }

    /// Whether keeper `i`'s database is a healthy standby by the cluster data.
    pub(crate) async fn is_standby(&self, i: usize) -> bool {
        status(&self.store, &self.keys).await.is_some_and(|d| {
            let db = &d.dbs[&self.uid(i)];
            db.spec.role == cluster::data::Role::Standby
                && db.status.healthy
                && db.status.in_recovery
        })
    }

    /// Waits until keeper `i`'s database has rejoined as a standby.
    pub(crate) async fn wait_standby(&self, i: usize) {
        crate::assert_eventually!(
            self.is_standby(i).await,
            Duration::from_secs(60),
            "k{i} did not rejoin as a standby: {:?}",
            status(&self.store, &self.keys)
                .await
                .map(|d| d.dbs[&self.uid(i)].clone())
        );
    }

    /// The pid of the primary's postmaster.
    pub(crate) fn primary_pid(&self) -> i32 {
        self.pg_pid(self.master)
    }

    /// The pid of keeper `i`'s postmaster.
    pub(crate) fn pg_pid(&self, i: usize) -> i32 {
        let pid_file = self.dir.path().join(format!("k{i}/pgdata/postmaster.pid"));
        std::fs::read_to_string(pid_file)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// SIGKILLs keeper `i` alone; its PostgreSQL goes on running.
    pub(crate) fn kill_keeper_only(&mut self, i: usize) {
        if let Some(mut k) = self.keepers[i - 1].take() {
            let _ = k.0.kill();
            let _ = k.0.wait();
            std::mem::forget(k);
        }
    }

    /// SIGKILLs keeper `i`'s postmaster and its backends; the keeper lives.
    pub(crate) fn kill_postgres(&self, i: usize) {
        let pid = self.pg_pid(i) as u32;
        keeper::postmaster::kill_tree(pid);
    }

    /// The cluster data now.
    pub(crate) async fn data(&self) -> ClusterData {
        status(&self.store, &self.keys).await.expect("cluster data")
    }

    /// `SHOW name` on keeper `i`'s PostgreSQL.
    pub(crate) async fn show(&self, i: usize, name: &str) -> Option<String> {
        let conn = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=2",
            self.ports[i - 1]
        );
        let client = try_connect(&conn).await.ok()?;
        client
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .ok()
            .map(|r| r.get(0))
    }

    /// The log of keeper `i`.
    pub(crate) fn keeper_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("keeper{i}.log"))).unwrap_or_default()
    }

    /// Waits until the cluster names a primary other than `old` (an index)
    /// and the proxy routes there; returns its index.
    pub(crate) async fn wait_new_primary(&mut self, old: usize, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let d = self.data().await;
            if let Some(m) = d.proxy.master_db.as_deref() {
                let i = self.index(m);
                if i != old {
                    self.master = i;
                    return i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no new primary within {limit:?}: {:?}\n{}\nsentinel log:\n{}",
                d.notice,
                d.to_json(),
                std::fs::read_to_string(self.dir.path().join("sentinel1.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs the primary's keeper and its PostgreSQL.
    pub(crate) fn kill_primary(&mut self) {
        let pgpid = self.primary_pid();
        if let Some(mut k) = self.keepers[self.master - 1].take() {
            let _ = k.0.kill();
            let _ = k.0.wait();
            std::mem::forget(k);
        }
        // SAFETY: killing the orphaned postmaster by pid.
        unsafe {
            libc::kill(pgpid, libc::SIGKILL);
        }
    }

    /// Inserts through the proxy until a write succeeds; returns the port
    /// it landed on and how long it took.
    pub(crate) async fn next_write(&self, sql: &str, limit: Duration) -> (u16, Duration) {
        let t = Instant::now();
        loop {
            let attempt = tokio::time::timeout(Duration::from_secs(15), async {
                let cl = try_connect(&self.conn).await.ok()?;
                let r = cl.query_one(sql, &[]).await.ok()?;
                Some(r.get::<_, i32>(0))
            });
            if let Ok(Some(p)) = attempt.await {
                return (p as u16, t.elapsed());
            }
            assert!(t.elapsed() < limit, "no write succeeded within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn failover_after_sigkill(url: &str, store: AnyStore) {
    let mut c = LocalCluster::up(url, store).await;
    let (mi, other) = (c.master, c.other());
    let (dir, ports) = (c.dir.path().to_owned(), c.ports.clone());

    c.kill_primary();
    let (port, took) = c
        .next_write(
            "INSERT INTO w VALUES (1) RETURNING inet_server_port()",
            Duration::from_secs(60),
        )
        .await;
    eprintln!("writes resumed {took:?} after the SIGKILL");
    assert_eq!(port, ports[other - 1], "writes resumed on the standby");
    assert!(took < Duration::from_secs(20), "failover took {took:?}");

    // The old primary comes back and rejoins as a standby of the new one.
    c.keepers[mi - 1] = Some(c.keeper_role(mi));
    c.wait_standby(mi).await;
    let rejoined = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        ports[mi - 1]
    );
    crate::assert_eventually!(
        match try_connect(&rejoined).await {
            Ok(s) => s
                .query_one("SELECT count(*) FROM w", &[])
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) >= 1),
            Err(_) => false,
        },
        Duration::from_secs(20),
        "the rejoined standby does not replicate from the new primary: {}\n{}",
        std::fs::read_to_string(dir.join(format!("k{mi}/postgres.log"))).unwrap_or_default(),
        std::fs::read_to_string(dir.join(format!("keeper{mi}.log"))).unwrap_or_default()
    );
    c.assert_rewound(mi);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_after_sigkill_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    failover_after_sigkill(&url, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_after_sigkill_etcd() {
    let etcd = EtcdServer::start().await;
    let store = cluster::open(&etcd.url()).await.unwrap();
    failover_after_sigkill(&etcd.url(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_unavailable_for_3s_changes_nothing() {
    let etcd = EtcdServer::start().await;
    let store = cluster::open(&etcd.url()).await.unwrap();
    let c = LocalCluster::up(&etcd.url(), store).await;
    let before = status(&c.store, &c.keys).await.unwrap();
    let (session, session_conn) = crate::support::connect_watched(&c.conn).await;
    session.simple_query("SELECT 1").await.unwrap();
    etcd.pause();
    tokio::time::sleep(Duration::from_secs(3)).await;
    etcd.resume();
    // Well past fail_interval and proxy_timeout after the outage began.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = status(&c.store, &c.keys).await.unwrap();
    assert_eq!(
        after.proxy, before.proxy,
        "no failover, no fencing generation"
    );
    assert!(after.failover.is_none());
    assert!(
        !session_conn.is_finished(),
        "the primary session was not fenced"
    );
    let port: i32 = session
        .query_one("INSERT INTO w VALUES (7) RETURNING inet_server_port()", &[])
        .await
        .expect("the session still writes")
        .get(0);
    assert_eq!(port, i32::from(c.ports[c.master - 1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_primary_is_failed_over_and_never_written_again_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let c = LocalCluster::up(&url, store).await;
    let (old, new) = (c.master, c.other());
    let pgpid = c.primary_pid();
    // SAFETY: pausing (then resuming) the primary's postmaster by pid.
    unsafe {
        libc::kill(pgpid, libc::SIGSTOP);
    }
    // A session connecting to the hung server when the primary changes is
    // refused at once (57P03), so the next attempt reaches the new primary.
    let (port, _) = c
        .next_write(
            "INSERT INTO w VALUES (1) RETURNING inet_server_port()",
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(port, c.ports[new - 1], "writes moved to the standby");
    // SAFETY: as above.
    unsafe {
        libc::kill(pgpid, libc::SIGCONT);
    }
    // The old instance wakes up still thinking it is a primary. Through the
    // proxy no write ever reaches it, and it is turned into a standby.
    let old_port = i32::from(c.ports[old - 1]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let cl = try_connect(&c.conn).await.unwrap();
        let p: i32 = cl
            .query_one("INSERT INTO w VALUES (2) RETURNING inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        assert_ne!(
            p, old_port,
            "a write through the proxy reached the old primary"
        );
        if c.is_standby(old).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old primary never became a standby"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let direct = format!("host=127.0.0.1 port={old_port} user=postgres dbname=postgres");
    let e = try_connect(&direct)
        .await
        .unwrap()
        .execute("INSERT INTO w VALUES (3)", &[])
        .await;
    assert!(e.is_err(), "the old primary is read-only now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_still_happens_after_the_sentinel_leader_dies() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up_with(&url, store, ClusterSpec::default(), 2, 2).await;
    let leader = c
        .store
        .get(&c.keys.leader())
        .await
        .unwrap()
        .expect("a leader")
        .value;
    let li: usize = leader.trim_start_matches('s').parse().unwrap();
    let status = c.ctl(&["status"]).unwrap();
    assert!(
        status.contains(&format!("sentinels:  s1, s2 (leader: {leader})")),
        "{status}"
    );
    if let Some(mut s) = c.sentinels[li - 1].take() {
        let _ = s.0.kill();
        let _ = s.0.wait();
        std::mem::forget(s);
    }
    c.kill_primary();
    let (port, took) = c
        .next_write(
            "INSERT INTO w VALUES (1) RETURNING inet_server_port()",
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(port, c.ports[c.other() - 1]);
    let new_leader = c
        .store
        .get(&c.keys.leader())
        .await
        .unwrap()
        .expect("a leader")
        .value;
    assert_ne!(new_leader, leader, "another sentinel took over");
    // The dead sentinel's registration goes with its lease.
    crate::assert_eventually!(
        c.ctl(&["status"])
            .unwrap()
            .contains(&format!("sentinels:  {new_leader} (leader: {new_leader})")),
        Duration::from_secs(30),
        "{}",
        c.ctl(&["status"]).unwrap()
    );
    eprintln!("failover with a new sentinel leader took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_write_load_loses_nothing_and_refuses_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let c = LocalCluster::up(&url, store).await;
    let (old, new) = (c.master, c.other());
    let conn = c.conn.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let refused = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (s2, a2, r2) = (stop.clone(), acked.clone(), refused.clone());
    let writer = tokio::spawn(async move {
        let mut i = 0i32;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            match try_connect(&conn).await {
                Ok(cl) => {
                    while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                        i += 1;
                        if cl
                            .execute("INSERT INTO w VALUES ($1)", &[&i])
                            .await
                            .is_err()
                        {
                            break;
                        }
                        a2.lock().unwrap().push(i);
                    }
                }
                Err(e) => r2.lock().unwrap().push(format!("{e:?}")),
            }
        }
    });
    // Writes flow before the switchover begins.
    crate::assert_eventually!(
        acked.lock().unwrap().len() >= 50,
        Duration::from_secs(20),
        "the writer got no acknowledgements"
    );
    let out = Command::new(keelson_bin())
        .args([
            "ctl",
            "--store",
            &url,
            "--cluster",
            "f",
            "switchover",
            "--to",
            &format!("k{new}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started = Instant::now();
    crate::assert_eventually!(
        status(&c.store, &c.keys)
            .await
            .is_some_and(|d| d.proxy.master_db.as_deref() == Some(&*format!("k{new}"))),
        Duration::from_secs(30),
        "the switchover did not complete"
    );
    let took = started.elapsed();
    // And flow again after it, on the new primary.
    let before = acked.lock().unwrap().len();
    crate::assert_eventually!(
        acked.lock().unwrap().len() >= before + 50,
        Duration::from_secs(20),
        "no writes acknowledged after the switchover"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    eprintln!("switchover named the new primary after {took:?}");
    let refused = refused.lock().unwrap().clone();
    assert!(
        refused.is_empty(),
        "connections refused during the switchover: {refused:?}"
    );
    let acked = acked.lock().unwrap().clone();
    let cl = try_connect(&c.conn).await.unwrap();
    let port: i32 = cl
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, i32::from(c.ports[new - 1]));
    let present: std::collections::HashSet<i32> = cl
        .query("SELECT x FROM w", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<&i32> = acked.iter().filter(|i| !present.contains(i)).collect();
    assert!(lost.is_empty(), "{} acknowledged commits lost", lost.len());
    assert!(
        acked.len() > 10,
        "the writer committed {} rows",
        acked.len()
    );
    // The old primary rejoins as a standby of the new one.
    c.wait_standby(old).await;
}

/// Issue 16 (a node drain): SIGTERM to the primary's keeper, started with
/// `--stop-switchover-timeout`, first moves the primary by switchover and
/// only then stops PostgreSQL. A client opening a connection per write
/// through the proxy sees no error and loses nothing; the keeper exits
/// within its timeout. Without the flag the same SIGTERM stops PostgreSQL
/// at once (the other keeper's old behaviour, checked at the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_the_primary_keeper_switches_over_before_stopping_and_costs_clients_no_error() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let flags = vec!["--stop-switchover-timeout".to_owned(), "25s".to_owned()];
    let mut c = LocalCluster::up_with_keeper_args(
        &url,
        store,
        ClusterSpec::default(),
        vec![flags.clone(), flags],
    )
    .await;
    let old = c.master;
    // What the standby runs: it reports every second, so that a commit
    // waiting for it after the synchronous set moves is released within
    // a second (PostgreSQL's default is 10 s).
    assert_eq!(
        c.show(c.other(), "wal_receiver_status_interval")
            .await
            .as_deref(),
        Some("1s")
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Writes acknowledged so far: the test waits on this count, not on
    // time (a loaded machine writes slower).
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (s, conn, n) = (stop.clone(), c.conn.clone(), count.clone());
    // A connection per write, one every 20 ms; every failure counts.
    let writer = tokio::spawn(async move {
        let (mut acked, mut failed, mut longest) = (Vec::new(), Vec::new(), Duration::ZERO);
        let mut i = 0i32;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            i += 1;
            let t = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(30), async {
                let cl = try_connect(&conn).await?;
                cl.execute("INSERT INTO w VALUES ($1)", &[&i]).await
            })
            .await;
            longest = longest.max(t.elapsed());
            match r {
                Ok(Ok(_)) => {
                    acked.push(i);
                    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(Err(e)) => failed.push(format!(
                    "write {i} after {:?}: {:?} {e}",
                    t.elapsed(),
                    crate::support::sqlstate(&e)
                )),
                Err(_) => failed.push(format!("write {i}: no answer within 30 s")),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (acked, failed, longest)
    });
    let acked_by = |k: usize| {
        let count = count.clone();
        async move {
            crate::assert_eventually!(
                count.load(std::sync::atomic::Ordering::Relaxed) >= k,
                Duration::from_secs(60),
                "the writer acknowledged fewer than {k} writes in a minute"
            );
        }
    };
    acked_by(20).await;
    let pg = c.pg_pid(old);
    let mut k = c.keepers[old - 1].take().expect("the primary's keeper");
    let t = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(k.0.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || {
        let r = k.0.wait();
        std::mem::forget(k);
        r
    })
    .await
    .unwrap()
    .unwrap();
    let exited = t.elapsed();
    assert!(status.success(), "the keeper exited with {status}");
    let d = c.data().await;
    let new = c.index(d.proxy.master_db.as_deref().expect("a primary"));
    assert_ne!(
        new,
        old,
        "the keeper stopped without a switchover:\n{}",
        c.keeper_log(old)
    );
    assert!(
        c.keeper_log(old).contains("switched over before stopping"),
        "{}",
        c.keeper_log(old)
    );
    // SAFETY: signal 0 only checks that the process exists.
    assert!(
        unsafe { libc::kill(pg, 0) } != 0,
        "the old primary's PostgreSQL still runs after its keeper exited"
    );
    c.master = new;
    // Writes go on through the new primary.
    acked_by(count.load(std::sync::atomic::Ordering::Relaxed) + 20).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, failed, longest) = writer.await.unwrap();
    eprintln!(
        "SIGTERM of the primary's keeper: exited after {exited:?}, k{old} -> k{new}; \
         {} writes acknowledged, {} failed, longest {longest:?}",
        acked.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "clients saw errors: {failed:#?}");
    let cl = try_connect(&c.conn).await.unwrap();
    let present: std::collections::HashSet<i32> = cl
        .query("SELECT x FROM w", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<&i32> = acked.iter().filter(|i| !present.contains(i)).collect();
    assert!(lost.is_empty(), "{} acknowledged writes lost", lost.len());
    // The last keeper has no standby to hand over to: SIGTERM stops it at
    // once rather than waiting out its timeout.
    let mut k = c.keepers[new - 1].take().unwrap();
    let t = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(k.0.id() as i32, libc::SIGTERM) };
    tokio::task::spawn_blocking(move || {
        let _ = k.0.wait();
        std::mem::forget(k);
    })
    .await
    .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "a keeper with no standby to hand over to waited {:?} to stop",
        t.elapsed()
    );
}

/// With the failsafe off (the spec's `failsafe: false`), a primary whose
/// keeper cannot reach the store fences at `fence_timeout` even though
/// every other keeper would promise not to promote (with it on,
/// `failsafe::a_60s_etcd_outage_...` keeps serving).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_keeper_fences_itself_when_it_cannot_renew_its_lease_with_the_failsafe_off() {
    let etcd = EtcdServer::start().await;
    let store = cluster::open(&etcd.url()).await.unwrap();
    let spec = ClusterSpec {
        failsafe: false,
        ..Default::default()
    };
    let c = LocalCluster::up_with(&etcd.url(), store, spec, 1, 2).await;
    let direct = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=2",
        c.ports[c.master - 1]
    );
    try_connect(&direct)
        .await
        .unwrap()
        .execute("INSERT INTO w VALUES (1)", &[])
        .await
        .unwrap();
    etcd.pause();
    let paused = Instant::now();
    // Within fence_timeout (5 s) plus a report interval, the orphaned
    // primary stops taking connections, so direct clients cannot write.
    crate::assert_eventually!(
        match tokio::time::timeout(Duration::from_secs(3), try_connect(&direct)).await {
            Ok(Ok(cl)) => cl.execute("INSERT INTO w VALUES (2)", &[]).await.is_err(),
            _ => true,
        },
        Duration::from_secs(12),
        "the primary still takes writes with its keeper cut off from the store"
    );
    let fenced_after = paused.elapsed();
    assert!(
        fenced_after >= Duration::from_secs(3),
        "fenced too early: {fenced_after:?}"
    );
    eprintln!("the primary fenced itself {fenced_after:?} after the store became unreachable");
    etcd.resume();
    // Once the store is back, writes through the proxy work again.
    let (_, took) = c
        .next_write(
            "INSERT INTO w VALUES (3) RETURNING inet_server_port()",
            Duration::from_secs(60),
        )
        .await;
    eprintln!("writes through the proxy resumed {took:?} after etcd came back");
}

impl LocalCluster {
    /// `keelson ctl ARGS` against this cluster; stdout, or the failure.
    pub(crate) fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(keelson_bin())
            .args(["ctl", "--store", &self.url, "--cluster", "f"])
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Waits until the primary streams to every other database, as the
    /// replication account, each through its own replication slot.
    pub(crate) async fn assert_streams_to_all(&self) {
        let want = self.standbys().len() as i64;
        let sql = "SELECT count(*) FROM pg_stat_replication r \
                   JOIN pg_replication_slots s ON s.active_pid = r.pid \
                   WHERE r.usename = 'keelson_repl' AND r.state = 'streaming' \
                   AND s.slot_name = 'keelson_' || r.application_name";
        crate::assert_eventually!(
            self.direct(self.master, sql).await == Some(want),
            Duration::from_secs(30),
            "k{} does not stream to its {want} standbys through their slots",
            self.master
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_keepers_replicate_and_failkeeper_moves_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up_with(&url, store, ClusterSpec::default(), 1, 3).await;
    c.assert_streams_to_all().await;
    // A row written through the proxy reaches both standbys (the writers
    // below use positive ids).
    let client = try_connect(&c.conn).await.unwrap();
    client
        .batch_execute("INSERT INTO w VALUES (-7)")
        .await
        .unwrap();
    c.wait_standbys_see("SELECT count(*) FROM w WHERE x = -7", 1)
        .await;

    // Bad input is explained.
    let err = c.ctl(&["failkeeper", "nobody"]).unwrap_err();
    assert!(err.contains("no keeper \"nobody\""), "{err}");

    // failkeeper on the (healthy) primary moves it to a standby at once,
    // under write load.
    let writer = Writer::start(&c.conn, 2);
    writer.wait_more(50, Duration::from_secs(20)).await;
    let old = c.master;
    let t = Instant::now();
    let out = c.ctl(&["failkeeper", &format!("k{old}")]).unwrap();
    assert!(out.contains("failover from"), "{out}");
    // Until the proxies see the fenced view, a write may still land on the
    // old primary (seen in CI 127 ms after `failkeeper` returned): each one
    // acknowledged there must survive the failover.
    let mut on_old = 0;
    let new = loop {
        let (port, _) = c
            .next_write(
                &format!(
                    "INSERT INTO w VALUES ({}) RETURNING inet_server_port()",
                    -100 - on_old
                ),
                Duration::from_secs(30),
            )
            .await;
        let i = c.ports.iter().position(|p| *p == port).unwrap() + 1;
        if i != old {
            break i;
        }
        on_old += 1;
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "writes still land on k{old} {:?} after failkeeper",
            t.elapsed()
        );
    };
    eprintln!(
        "failkeeper moved writes in {:?}, {on_old} probe(s) acknowledged on k{old} first",
        t.elapsed(),
    );
    c.master = new;
    writer.wait_more(50, Duration::from_secs(20)).await;
    let (acked, unknown) = writer.stop().await;
    c.assert_nothing_lost(&acked, &unknown).await;
    assert_eq!(
        // Distinct: a probe whose answer was lost (committed, then its
        // session ended) is sent again with the same value.
        c.direct(new, "SELECT count(DISTINCT x) FROM w WHERE x <= -100")
            .await,
        Some(i64::from(on_old) + 1),
        "every probe acknowledged on k{old} before the fence reached the proxy"
    );
    // The old primary, still running, rejoins through pg_rewind; the other
    // standby follows the new primary; each streams through its slot.
    c.wait_standby(old).await;
    c.assert_rewound(old);
    c.assert_streams_to_all().await;
    let total = c.direct(new, "SELECT count(*) FROM w").await.unwrap();
    c.wait_standbys_see("SELECT count(*) FROM w", total).await;
    drop(client);
    c.keepers.clear();
}

/// Writers inserting unique ids into `w` through the proxy, reconnecting
/// after errors, recording every outcome: acknowledged, failed for sure
/// (refused before anything was sent), or unknown (the connection broke
/// with the INSERT in flight).
pub(crate) struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Per writer, the id of the INSERT in flight (0: none).
    in_flight: Vec<std::sync::Arc<AtomicI32>>,
    pub(crate) acked: std::sync::Arc<std::sync::Mutex<Vec<i32>>>,
    pub(crate) unknown: std::sync::Arc<std::sync::Mutex<Vec<i32>>>,
    /// Connection attempts refused, with their SQLSTATE.
    pub(crate) refused: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Writer {
    pub(crate) fn start(conn: &str, clients: usize) -> Writer {
        use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
        use std::sync::{Arc, Mutex};
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicI32::new(1));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let unknown = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let in_flight: Vec<Arc<AtomicI32>> =
            (0..clients).map(|_| Arc::new(AtomicI32::new(0))).collect();
        let tasks = in_flight
            .iter()
            .map(|current| {
                let current = current.clone();
                let (conn, stop, next) = (conn.to_owned(), stop.clone(), next.clone());
                let (acked, unknown, refused) = (acked.clone(), unknown.clone(), refused.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let cl = match try_connect(&conn).await {
                            Ok(c) => c,
                            Err(e) => {
                                refused.lock().unwrap().push(
                                    crate::support::sqlstate(&e).unwrap_or_else(|| e.to_string()),
                                );
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        };
                        while !stop.load(Ordering::Relaxed) {
                            let id = next.fetch_add(1, Ordering::Relaxed);
                            current.store(id, Ordering::Relaxed);
                            let r = tokio::time::timeout(
                                Duration::from_secs(30),
                                cl.execute("INSERT INTO w VALUES ($1)", &[&id]),
                            )
                            .await;
                            current.store(0, Ordering::Relaxed);
                            match r {
                                Ok(Ok(_)) => acked.lock().unwrap().push(id),
                                _ => {
                                    unknown.lock().unwrap().push(id);
                                    break;
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Writer {
            stop,
            tasks,
            in_flight,
            acked,
            unknown,
            refused,
        }
    }

    pub(crate) fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `n` more writes than now were acknowledged.
    pub(crate) async fn wait_more(&self, n: usize, limit: Duration) {
        let want = self.acked_count() + n;
        crate::assert_eventually!(
            self.acked_count() >= want,
            limit,
            "the writers got {} of {want} acknowledgements",
            self.acked_count()
        );
    }

    /// Stops the writers; returns the acknowledged and the unknown ids.
    pub(crate) async fn stop(self) -> (Vec<i32>, Vec<i32>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        let acked = self.acked.lock().unwrap().clone();
        let mut unknown = self.unknown.lock().unwrap().clone();
        // An INSERT cut off by the abort may have committed.
        unknown.extend(
            self.in_flight
                .iter()
                .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
                .filter(|id| *id != 0),
        );
        (acked, unknown)
    }
}

impl LocalCluster {
    /// The ids in `w` on the primary, through the proxy.
    pub(crate) async fn rows(&self) -> std::collections::HashSet<i32> {
        let cl = try_connect(&self.conn).await.unwrap();
        cl.query("SELECT x FROM w", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Asserts that every acknowledged id is in `w`, and that nothing is
    /// there that was neither acknowledged nor in doubt.
    pub(crate) async fn assert_nothing_lost(&self, acked: &[i32], unknown: &[i32]) {
        let rows = self.rows().await;
        let lost: Vec<&i32> = acked.iter().filter(|i| !rows.contains(i)).collect();
        assert!(
            lost.is_empty(),
            "{} of {} acknowledged commits lost: {:?}",
            lost.len(),
            acked.len(),
            &lost[..lost.len().min(10)]
        );
        let known: std::collections::HashSet<&i32> = acked.iter().chain(unknown).collect();
        let stray: Vec<&i32> = rows
            .iter()
            .filter(|i| **i > 0 && !known.contains(i))
            .collect();
        assert!(stray.is_empty(), "rows nobody wrote: {stray:?}");
    }
}

/// What a client that opens a new connection every 20 ms saw.
struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// When the fault was injected: an attempt already under way then
    /// had its session on the dead server, which may end it.
    fault: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
    task: tokio::task::JoinHandle<(usize, Vec<String>, Duration)>,
}

impl Prober {
    fn start(conn: &str) -> Prober {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fault = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
        let (s, conn, f) = (stop.clone(), conn.to_owned(), fault.clone());
        let task = tokio::spawn(async move {
            let (mut ok, mut failed, mut longest) = (0, Vec::new(), Duration::ZERO);
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(30), async {
                    let cl = try_connect(&conn).await?;
                    cl.query_one("SELECT 1", &[]).await
                })
                .await;
                longest = longest.max(t.elapsed());
                let open_at_fault = f.lock().unwrap().is_some_and(|at| t < at);
                match r {
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err(e)) if open_at_fault => eprintln!(
                        "an attempt under way at the fault ended (its session was on the dead server): {e}"
                    ),
                    Ok(Err(e)) => failed.push(format!(
                        "after {:?}: {:?} {e}",
                        t.elapsed(),
                        crate::support::sqlstate(&e)
                    )),
                    Err(_) => failed.push("no answer within 30 s".into()),
                }
                if open_at_fault {
                    // The one attempt under way is past; later ones all
                    // started after the fault.
                    *f.lock().unwrap() = None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed, longest)
        });
        Prober { stop, fault, task }
    }

    /// Marks the fault's instant: call right before injecting it.
    fn fault_now(&self) {
        *self.fault.lock().unwrap() = Some(Instant::now());
    }

    async fn stop(self) -> (usize, Vec<String>, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// Issue 12: a client connecting every 20 ms through the proxy sees no
/// failed connection attempt while the primary's PostgreSQL is SIGKILLed
/// and restarted in place by its live keeper, nor across a full failover
/// (keeper and PostgreSQL SIGKILLed): it is held and the server is tried
/// again until it lets the client in, or a new primary is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connecting_every_20ms_sees_no_failed_attempt_across_a_restart_and_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up(&url, store).await;
    let old = c.master;

    let probe = Prober::start(&c.conn);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = c.pg_pid(old);
    probe.fault_now();
    c.kill_postgres(old);
    tokio::time::sleep(Duration::from_millis(100)).await;
    crate::assert_eventually!(
        c.direct(old, "SELECT 1::bigint").await == Some(1) && c.pg_pid(old) != pid,
        Duration::from_secs(30),
        "k{old}'s keeper did not restart its PostgreSQL"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failed, longest) = probe.stop().await;
    eprintln!(
        "restart in place: {ok} connections, {} failed, longest {longest:?}",
        failed.len()
    );
    assert!(ok > 10, "the prober hardly ran: {ok}");
    assert!(
        failed.is_empty(),
        "connection attempts failed across the restart: {failed:#?}"
    );
    assert!(
        c.data().await.failover.is_none(),
        "the restart caused a failover"
    );

    let probe = Prober::start(&c.conn);
    tokio::time::sleep(Duration::from_secs(1)).await;
    probe.fault_now();
    c.kill_primary();
    let new = c.wait_new_primary(old, Duration::from_secs(40)).await;
    crate::assert_eventually!(
        landing_port(&c.conn).await == Some(c.ports[new - 1]),
        Duration::from_secs(20),
        "the proxy never routed to the new primary"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failed, longest) = probe.stop().await;
    eprintln!(
        "failover k{old} -> k{new}: {ok} connections, {} failed, longest {longest:?}",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "connection attempts failed across the failover: {failed:#?}"
    );
}

impl LocalCluster {
    /// `keelson ctl spec update` with the current spec changed by `f`.
    pub(crate) async fn update_spec(&self, f: impl FnOnce(&mut ClusterSpec)) {
        let mut spec = self.data().await.spec;
        f(&mut spec);
        let file = self.dir.path().join("spec-update.json");
        std::fs::write(&file, serde_json::to_string(&spec).unwrap()).unwrap();
        self.ctl(&["spec", "update", "--file", file.to_str().unwrap()])
            .expect("spec update");
    }
}

/// Issue 12: a `pg_parameters` change reaches every running instance by
/// reload; one that needs a restart is reported pending on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_are_reloaded_on_every_instance_and_restart_ones_reported_pending() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let c = LocalCluster::up_with(&url, store, ClusterSpec::default(), 1, 3).await;
    let before = c.show(1, "max_connections").await.unwrap();

    // Values the servers would refuse are refused by `spec update`, with
    // PostgreSQL's own message (the catalog keepers wrote to the store).
    crate::assert_eventually!(
        c.store
            .get(&c.keys.pg_settings())
            .await
            .ok()
            .flatten()
            .is_some(),
        Duration::from_secs(10),
        "no keeper wrote the parameter catalog"
    );
    let own = |i: usize| {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            c.ports[i - 1]
        )
    };
    let pg = try_connect(&own(1)).await.unwrap();
    for (name, value) in [
        ("work_mem", "lots"),
        ("work_mem", "5XB"),
        ("work_mem", "32kB"),
        ("statement_timeout", "5 kB"),
        ("enable_seqscan", "maybe"),
        ("log_min_messages", "loud"),
        ("wrok_mem", "1MB"),
    ] {
        let theirs = pg
            .batch_execute(&format!("SET {name} = '{value}'"))
            .await
            .expect_err(value);
        let theirs = theirs.as_db_error().expect("a server error");
        let patch = format!(r#"{{"pg_parameters": {{"{name}": "{value}"}}}}"#);
        let ours = c.ctl(&["spec", "update", "--patch", &patch]).unwrap_err();
        eprintln!("{name} = {value}: {ours}");
        assert!(
            ours.contains(theirs.message()),
            "{ours} vs PostgreSQL's {theirs:?}"
        );
        if let Some(hint) = theirs.hint() {
            assert!(ours.contains(hint), "{ours} lacks the hint {hint}");
        }
    }
    let ours = c
        .ctl(&[
            "spec",
            "update",
            "--patch",
            r#"{"pg_parameters": {"max_connections": "0"}}"#,
        ])
        .unwrap_err();
    assert!(
        ours.contains(
            r#"0 is outside the valid range for parameter "max_connections" (1 .. 262143)"#
        ),
        "{ours}"
    );
    let ours = c
        .ctl(&[
            "spec",
            "update",
            "--patch",
            r#"{"pg_parameters": {"port": "5999"}}"#,
        ])
        .unwrap_err();
    assert!(ours.contains("set by keelson"), "{ours}");
    assert!(c.data().await.spec.pg_parameters.is_empty());

    // A user's value of max_wal_senders above what keelson needs is kept.
    let out = c
        .ctl(&[
            "spec",
            "update",
            "--patch",
            r#"{"pg_parameters": {"work_mem": "'7MB'", "max_connections": "150", "max_wal_senders": "12"}}"#,
        ])
        .unwrap();
    eprintln!("{out}");
    assert!(
        out.contains(r#"pg_parameters.work_mem: (unset) -> "'7MB'" (reload)"#),
        "{out}"
    );
    assert!(
        out.contains(r#"pg_parameters.max_connections: (unset) -> "150" (needs a restart)"#),
        "{out}"
    );
    assert!(out.contains("after a restart"), "{out}");
    let t = Instant::now();
    for i in 1..=3 {
        crate::assert_eventually!(
            c.show(i, "work_mem").await.as_deref() == Some("7MB"),
            Duration::from_secs(10),
            "k{i} runs work_mem {:?}",
            c.show(i, "work_mem").await
        );
    }
    eprintln!(
        "work_mem reloaded on all 3 instances {:?} after the spec update",
        t.elapsed()
    );
    let again = c
        .ctl(&[
            "spec",
            "update",
            "--patch",
            r#"{"pg_parameters": {"work_mem": "'7MB'"}}"#,
        ])
        .unwrap();
    assert!(again.contains("spec unchanged"), "{again}");
    crate::assert_eventually!(
        c.data().await.dbs.values().all(|db| {
            db.status.pending_restart == ["max_connections".to_string(), "max_wal_senders".into()]
        }),
        Duration::from_secs(10),
        "not every instance reports the restart pending: {:?}",
        c.data()
            .await
            .dbs
            .values()
            .map(|d| d.status.pending_restart.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(c.show(1, "max_connections").await.unwrap(), before);
    let status = c.ctl(&["status"]).unwrap();
    assert!(
        status.contains("pending restart: max_connections, max_wal_senders"),
        "{status}"
    );
    assert!(status.contains("sentinels:  s1 (leader: s1)"), "{status}");

    // A spec pg_hba rule that rejects a user is enforced after reload, on
    // every instance; other clients still get in.
    c.exec_via_proxy("CREATE ROLE mallory LOGIN").await;
    let as_user = |i: usize, user: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres",
            c.ports[i - 1]
        )
    };
    c.wait_standbys_see("SELECT count(*) FROM pg_roles WHERE rolname = 'mallory'", 1)
        .await;
    assert!(try_connect(&as_user(1, "mallory")).await.is_ok());
    let bad = c.ctl(&["spec", "show"]).map(|_| ()).and_then(|_| {
        let file = c.dir.path().join("bad-hba.json");
        std::fs::write(&file, r#"{"pg_hba": ["host all mallory reject"]}"#).unwrap();
        c.ctl(&["spec", "update", "--file", file.to_str().unwrap()])
    });
    let bad = bad.unwrap_err();
    assert!(bad.contains("at least 5 fields"), "{bad}");
    c.update_spec(|s| s.pg_hba = vec!["host all mallory 127.0.0.1/32 reject".into()])
        .await;
    for i in 1..=3 {
        crate::assert_eventually!(
            try_connect(&as_user(i, "mallory"))
                .await
                .err()
                .is_some_and(|e| crate::support::sqlstate(&e).as_deref() == Some("28000")),
            Duration::from_secs(10),
            "k{i} still lets mallory in"
        );
        assert!(try_connect(&as_user(i, "postgres")).await.is_ok());
    }
}

/// Issue 12: while paused, a dead primary is not failed over (for three
/// times `fail_interval`) and a keeper leaves its stopped PostgreSQL
/// stopped; on resume the failover happens. `ctl history` then lists the
/// first election, that failover, a switchover and a failkeeper failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_cluster_does_not_fail_over_until_resumed_and_history_lists_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let spec = ClusterSpec {
        fail_interval: Duration::from_secs(3),
        ..Default::default()
    };
    let mut c = LocalCluster::up_with(&url, store, spec, 1, 3).await;
    let first = c.master;
    let standby = c.standbys()[0];
    c.ctl(&["pause"]).unwrap();
    let status = c.ctl(&["status"]).unwrap();
    assert!(status.starts_with("PAUSED"), "{status}");

    // A keeper leaves its stopped PostgreSQL as it is.
    c.kill_postgres(standby);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        c.direct(standby, "SELECT 1::bigint").await,
        None,
        "k{standby}'s keeper restarted PostgreSQL while paused"
    );

    // No automatic failover.
    c.kill_primary();
    tokio::time::sleep(Duration::from_secs(9)).await;
    let d = c.data().await;
    assert!(
        d.failover.is_none(),
        "failed over while paused: {:?}",
        d.failover
    );
    assert_eq!(d.proxy.master_db, Some(c.uid(first)));
    let notice = d.notice.unwrap_or_default();
    assert!(notice.contains("paused"), "{notice}");

    c.ctl(&["resume"]).unwrap();
    let second = c.wait_new_primary(first, Duration::from_secs(40)).await;
    // The paused standby is started again and follows.
    crate::assert_eventually!(
        c.direct(standby, "SELECT 1::bigint").await == Some(1),
        Duration::from_secs(30),
        "k{standby} was not started after resume"
    );

    // The first primary rejoins; a switchover back to it, then failkeeper.
    c.keepers[first - 1] = Some(c.keeper_role(first));
    c.wait_standby(first).await;
    // Eligible once it streams and has caught up.
    crate::assert_eventually!(
        c.ctl(&["switchover", "--to", &c.uid(first)]).is_ok(),
        Duration::from_secs(30),
        "the switchover to k{first} was refused: {:?}",
        c.ctl(&["switchover", "--to", &c.uid(first)])
    );
    // The sentinel cancels a switchover whose target stops looking healthy
    // meanwhile (seen in CI under load: its reports stalled on a slow file
    // store); then it is asked again.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let d = c.data().await;
        if d.proxy.master_db.as_deref() == Some(c.uid(first).as_str()) {
            break;
        }
        let cancelled =
            d.failover.is_none() && d.proxy.master_db.as_deref() == Some(c.uid(second).as_str());
        if cancelled {
            eprintln!("switchover not under way ({:?}); asking again", d.notice);
            let _ = c.ctl(&["switchover", "--to", &c.uid(first)]);
        }
        assert!(
            Instant::now() < deadline,
            "no switchover to k{first}: {:?}",
            d.notice
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let third = c.wait_new_primary(second, Duration::from_secs(60)).await;
    assert_eq!(third, first);
    c.wait_standby(second).await;
    c.ctl(&["failkeeper", &c.uid(first)]).unwrap();
    let fourth = c.wait_new_primary(first, Duration::from_secs(60)).await;

    let history: Vec<cluster::data::PrimaryChange> =
        serde_json::from_str(&c.ctl(&["history", "--json"]).unwrap()).unwrap();
    let seen: Vec<(&str, Option<String>, String)> = history
        .iter()
        .map(|h| (h.reason.as_str(), h.from.clone(), h.to.clone()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("initial", None, c.uid(first)),
            ("failover", Some(c.uid(first)), c.uid(second)),
            ("switchover", Some(c.uid(second)), c.uid(first)),
            ("failover", Some(c.uid(first)), c.uid(fourth)),
        ],
        "{history:?}"
    );
    assert!(history
        .windows(2)
        .all(|w| w[0].at_ms <= w[1].at_ms && w[0].timeline < w[1].timeline));
    let table = c.ctl(&["history"]).unwrap();
    eprintln!("{table}");
    assert_eq!(table.lines().count(), 5, "{table}");
}

impl LocalCluster {
    /// The port a new session through `conn` lands on.
    async fn port_of(conn: &str) -> Option<u16> {
        let cl = try_connect(conn).await.ok()?;
        let p: i32 = cl
            .query_one("SELECT inet_server_port()", &[])
            .await
            .ok()?
            .get(0);
        u16::try_from(p).ok()
    }
}

/// Issue 12: tags set at run time with `ctl keeper UID set` steer the
/// election (never-primary wins over priority) and replica routing
/// (no-loadbalance); `ctl reinit` copies a standby whose data directory was
/// damaged afresh, and it streams again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_steer_election_and_replica_routing_and_reinit_recopies_a_damaged_standby() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up_with(&url, store, ClusterSpec::default(), 1, 3).await;
    let m = c.master;
    let (x, y) = (c.standbys()[0], c.standbys()[1]);
    c.wait_standbys_see("SELECT count(*) FROM w", 0).await;

    // no-loadbalance: every replica session lands on y.
    let out = c
        .ctl(&["keeper", &c.uid(x), "set", "--no-loadbalance", "true"])
        .unwrap();
    assert!(out.contains("no-loadbalance=true"), "{out}");
    let replica = c.proxy.replica_conn().await;
    crate::assert_eventually!(
        c.proxy.proxy.view().load().replicas.len() == 1,
        Duration::from_secs(10),
        "k{x} is still in the view"
    );
    for _ in 0..20 {
        assert_eq!(
            LocalCluster::port_of(&replica).await,
            Some(c.ports[y - 1]),
            "a replica session landed elsewhere than k{y}"
        );
    }
    assert!(c.ctl(&["status"]).unwrap().contains("no-loadbalance=true"));

    // never-primary wins over priority: x, preferred by priority among
    // equally advanced standbys, is never promoted.
    c.ctl(&[
        "keeper",
        &c.uid(x),
        "set",
        "--priority",
        "10",
        "--never-primary",
        "true",
    ])
    .unwrap();
    c.ctl(&["failkeeper", &c.uid(m)]).unwrap();
    let new = c.wait_new_primary(m, Duration::from_secs(40)).await;
    assert_eq!(new, y, "the never-primary standby was promoted");

    // reinit: x's data directory loses its control file while its keeper
    // is down; the keeper cannot start it; `ctl reinit` copies it afresh.
    c.wait_standby(x).await;
    c.kill_keeper_only(x);
    c.kill_postgres(x);
    let pgdata = c.dir.path().join(format!("k{x}")).join("pgdata");
    std::fs::remove_file(pgdata.join("global/pg_control")).unwrap();
    c.keepers[x - 1] = Some(c.keeper_role(x));
    crate::assert_eventually!(
        c.data().await.dbs[&c.uid(x)].status.problem.is_some(),
        Duration::from_secs(20),
        "k{x} did not report its damage"
    );
    let refused = c.ctl(&["reinit", &c.uid(new)]).unwrap_err();
    assert!(refused.contains("is the primary"), "{refused}");
    c.ctl(&["reinit", &c.uid(x)]).unwrap();
    c.exec_via_proxy("INSERT INTO w VALUES (99)").await;
    crate::assert_eventually!(
        c.direct(x, "SELECT count(*) FROM w WHERE x = 99").await == Some(1),
        Duration::from_secs(60),
        "k{x} does not stream again:\n{}",
        c.keeper_log(x)
    );
    crate::assert_eventually!(
        c.is_standby(x).await,
        Duration::from_secs(20),
        "k{x} is not reported a healthy standby"
    );
    let log = c.keeper_log(x);
    assert_eq!(
        log.matches("Reinit {").count(),
        1,
        "copied once, afresh:\n{log}"
    );
}

/// Issue 12: a no-sync standby never appears in the primary's
/// `synchronous_standby_names`, even when it is the synchronous one when
/// the tag is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_sync_standby_leaves_and_never_reenters_the_synchronous_set() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let spec = ClusterSpec {
        synchronous_replication: true,
        ..Default::default()
    };
    let c = LocalCluster::up_with(&url, store, spec, 1, 3).await;
    let m = c.master;
    let names = || async {
        c.show(m, "synchronous_standby_names")
            .await
            .unwrap_or_default()
    };
    crate::assert_eventually!(
        !names().await.is_empty(),
        Duration::from_secs(30),
        "no synchronous standby"
    );
    let sync = c.data().await.dbs[&c.uid(m)].spec.synchronous_standbys[0].clone();
    let other = c
        .standbys()
        .into_iter()
        .map(|i| c.uid(i))
        .find(|u| *u != sync)
        .unwrap();
    c.ctl(&["keeper", &sync, "set", "--no-sync", "true"])
        .unwrap();
    crate::assert_eventually!(
        names().await == format!("FIRST 1 (\"{other}\")"),
        Duration::from_secs(20),
        "the set did not move to {other}: {}",
        names().await
    );
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = names().await;
        assert!(!n.contains(&format!("\"{sync}\"")), "{sync} came back: {n}");
    }
    // Commits go on with the other standby.
    c.exec_via_proxy("INSERT INTO w VALUES (5)").await;
}

impl LocalCluster {
    /// Runs `sql` through the proxy, retrying until it succeeds (30 s).
    pub(crate) async fn exec_via_proxy(&self, sql: &str) {
        crate::assert_eventually!(
            match try_connect(&self.conn).await {
                Ok(cl) => cl.batch_execute(sql).await.is_ok(),
                Err(_) => false,
            },
            Duration::from_secs(30),
            "{sql} did not succeed through the proxy"
        );
    }
}

/// pgbench through `conn`'s host and port, a new connection per
/// transaction (`-C`), for `secs`; returns (transactions, errors, output).
fn pgbench(port: u16, clients: usize, secs: u64) -> std::process::Child {
    Command::new(crate::support::pg_bindir().join("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        // A thread per client: pgbench connects synchronously, so a held
        // connection would otherwise stall every client of its thread.
        .args([
            "-n",
            "-C",
            "-c",
            &clients.to_string(),
            "-j",
            &clients.to_string(),
            "-T",
            &secs.to_string(),
        ])
        .arg("postgres")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench")
}

/// When each instance started, as seconds since the epoch.
async fn started_at(c: &LocalCluster, i: usize) -> f64 {
    let conn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=2",
        c.ports[i - 1]
    );
    try_connect(&conn)
        .await
        .unwrap()
        .query_one(
            "SELECT extract(epoch FROM pg_postmaster_start_time())::float8",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Issue 12: `max_connections` lowered. A standby whose value is below its
/// primary's refuses to start ("insufficient parameter settings"), so
/// `ctl restart --pending` restarts the primary first, in place, and then
/// the standbys; every instance ends on the new value, streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_max_connections_restarts_the_primary_first_and_no_standby_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let mut spec = ClusterSpec::default();
    spec.pg_parameters
        .insert("max_connections".into(), "150".into());
    let c = LocalCluster::up_with(&url, store, spec, 1, 3).await;
    for i in 1..=3 {
        assert_eq!(c.show(i, "max_connections").await.as_deref(), Some("150"));
    }
    c.ctl(&[
        "spec",
        "update",
        "--patch",
        // Lowered, and in the same change another one raised: the
        // standbys' replay pauses at the restarted primary's new values
        // until they restart too.
        r#"{"pg_parameters": {"max_connections": "110", "max_worker_processes": "16"}}"#,
    ])
    .unwrap();
    crate::assert_eventually!(
        c.data().await.dbs.values().all(|db| db
            .status
            .pending_restart
            .contains(&"max_connections".to_string())),
        Duration::from_secs(10),
        "not pending everywhere"
    );
    let primary = c.master;
    // A standby that crashes now, before its primary runs the lower value,
    // starts again (with its primary's value) instead of refusing to.
    let crashed = c.standbys()[0];
    c.kill_postgres(crashed);
    crate::assert_eventually!(
        c.show(crashed, "max_connections").await.as_deref() == Some("150"),
        Duration::from_secs(20),
        "the crashed standby k{crashed} does not start again: {}",
        std::fs::read_to_string(c.dir.path().join(format!("k{crashed}/postgres.log")))
            .unwrap_or_default()
    );
    crate::assert_eventually!(
        c.data().await.dbs.values().all(|db| db.status.healthy
            && db
                .status
                .pending_restart
                .contains(&"max_connections".to_string())),
        Duration::from_secs(20),
        "not pending everywhere after the crash"
    );
    let mut before = Vec::new();
    for i in 1..=3 {
        before.push(started_at(&c, i).await);
    }
    let t = Instant::now();
    let out = c.ctl(&["restart", "--pending"]).expect("ctl restart");
    eprintln!("ctl restart --pending took {:?}:\n{out}", t.elapsed());
    let mut after = Vec::new();
    for i in 1..=3 {
        assert_eq!(
            c.show(i, "max_connections").await.as_deref(),
            Some("110"),
            "k{i}"
        );
        assert_eq!(
            c.show(i, "max_worker_processes").await.as_deref(),
            Some("16"),
            "k{i}"
        );
        after.push(started_at(&c, i).await);
        assert!(after[i - 1] > before[i - 1], "k{i} was not restarted");
    }
    for i in (1..=3).filter(|i| *i != primary) {
        assert!(
            after[primary - 1] < after[i - 1],
            "the standby k{i} restarted before the primary k{primary}: {after:?}"
        );
        let log = std::fs::read_to_string(c.dir.path().join(format!("k{i}/postgres.log")))
            .unwrap_or_default();
        // (Its replay pausing at the raised setting, "hot standby is not
        // possible because of insufficient parameter settings", is
        // expected: its restart resolves it.)
        assert!(
            !log.contains("recovery aborted because of insufficient parameter settings"),
            "k{i} refused to start:\n{log}"
        );
    }
    crate::assert_eventually!(
        c.data().await.dbs.values().all(|db| db.status.healthy
            && db.status.pending_restart.is_empty()
            && (db.spec.role == cluster::data::Role::Master || db.status.streaming)),
        Duration::from_secs(20),
        "not every instance is back, streaming, on the new value: {:?}",
        c.data()
            .await
            .dbs
            .values()
            .map(|db| (db.keeper.clone(), db.status.healthy, db.status.streaming))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        c.data().await.proxy.master_db,
        Some(c.uid(primary)),
        "restarted in place, the primary stayed"
    );
}

/// Issue 12: `max_connections` raised is pending on every instance; `ctl
/// restart --pending` under a pgbench write load through the proxy (a new
/// connection per transaction) restarts the standbys one at a time, moves
/// the primary by switchover, and ends with every instance on the new
/// value. pgbench's errors are printed (and counted in the closing note).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_applies_a_raised_max_connections_everywhere_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let c = LocalCluster::up_with(&url, store, ClusterSpec::default(), 1, 3).await;
    let proxy_port = c.proxy.addr.port();
    let init = Command::new(crate::support::pg_bindir().join("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &proxy_port.to_string(),
            "-U",
            "postgres",
        ])
        .args(["-i", "-s", "1", "-q", "postgres"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    c.ctl(&[
        "spec",
        "update",
        "--patch",
        r#"{"pg_parameters": {"max_connections": "130"}}"#,
    ])
    .unwrap();
    crate::assert_eventually!(
        c.data()
            .await
            .dbs
            .values()
            .all(|db| db.status.pending_restart == ["max_connections".to_string()]),
        Duration::from_secs(10),
        "not pending everywhere"
    );
    let old_primary = c.master;
    let bench = pgbench(proxy_port, 4, 40);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = Instant::now();
    let out = c.ctl(&["restart", "--pending"]);
    let took = t.elapsed();
    let bench = bench.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&bench.stdout).into_owned(),
        String::from_utf8_lossy(&bench.stderr).into_owned(),
    );
    let out = out.expect("ctl restart");
    eprintln!("ctl restart --pending took {took:?}:\n{out}");
    eprintln!("pgbench:\n{stdout}\n{stderr}");
    for i in 1..=3 {
        assert_eq!(
            c.show(i, "max_connections").await.as_deref(),
            Some("130"),
            "k{i}"
        );
    }
    crate::assert_eventually!(
        c.data()
            .await
            .dbs
            .values()
            .all(|db| db.status.pending_restart.is_empty()),
        Duration::from_secs(10),
        "a restart is still pending: {:?}",
        c.data()
            .await
            .dbs
            .iter()
            .map(|(u, db)| (
                u.clone(),
                db.status.pending_restart.clone(),
                db.status.healthy
            ))
            .collect::<Vec<_>>()
    );
    let d = c.data().await;
    assert_ne!(
        d.proxy.master_db,
        Some(c.uid(old_primary)),
        "the primary role moved"
    );
    // pgbench stops a client at its first error: one line per client.
    let errors = stderr
        .lines()
        .filter(|l| l.contains("client ") && l.contains("aborted"))
        .count();
    eprintln!("pgbench client errors across the rolling restart: {errors}");
    // A session that connected in the instant before the switchover's
    // fence, and had not sent its first query, cannot be moved: it is
    // ended when it is idle, and its client sees that. Anything more is a
    // failure.
    assert!(errors <= 1, "pgbench saw errors:\n{stderr}");
    let processed = stdout
        .lines()
        .find(|l| l.starts_with("number of transactions actually processed"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        !processed.is_empty(),
        "pgbench did not finish: {stdout}\n{stderr}"
    );
}

/// Issue 12: a planned switchover lets a session's open transaction
/// finish on the old primary (it commits, and survives), then ends the
/// session between transactions; new sessions are held and reach the new
/// primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_lets_an_open_transaction_commit_then_ends_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up(&url, store).await;
    let old = c.master;
    let s = try_connect(&c.conn).await.unwrap();
    s.batch_execute("BEGIN; INSERT INTO w VALUES (31)")
        .await
        .unwrap();
    c.ctl(&["switchover"]).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.batch_execute("INSERT INTO w VALUES (32)")
        .await
        .expect("the open transaction goes on");
    s.batch_execute("COMMIT").await.expect("and commits");
    let ended = s.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(
        ended.to_string().contains("switchover") || ended.is_closed(),
        "{ended}"
    );
    let new = c.wait_new_primary(old, Duration::from_secs(30)).await;
    crate::assert_eventually!(
        c.direct(new, "SELECT count(*) FROM w WHERE x IN (31, 32)")
            .await
            == Some(2),
        Duration::from_secs(10),
        "the committed transaction is not on the new primary"
    );
}

/// The old primary's keeper waits for open transactions as long as the
/// proxies let a switched-over session finish one.
#[test]
fn the_keeper_and_the_proxy_drain_a_switchover_for_as_long() {
    assert_eq!(
        keeper::run::SWITCHOVER_DRAIN,
        proxy_core::fence::SWITCHOVER_DRAIN
    );
}

/// Issue 13: a SIGHUP (a `systemctl reload`, a closed terminal) used to
/// end keepers and sentinels; they now read their configuration again and
/// go on, PostgreSQL untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepers_and_sentinels_survive_a_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up(&url, store).await;
    let pid_before = c.primary_pid();
    let hup = |r: &Option<Role>| {
        if let Some(r) = r {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(r.0.id() as i32, libc::SIGHUP) };
        }
    };
    c.keepers.iter().for_each(hup);
    c.sentinels.iter().for_each(hup);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, k) in c.keepers.iter_mut().enumerate() {
        let k = k.as_mut().unwrap();
        assert!(
            k.0.try_wait().unwrap().is_none(),
            "keeper {} ended at SIGHUP",
            i + 1
        );
    }
    for s in c.sentinels.iter_mut().flatten() {
        assert!(
            s.0.try_wait().unwrap().is_none(),
            "a sentinel ended at SIGHUP"
        );
    }
    assert_eq!(c.primary_pid(), pid_before, "PostgreSQL was restarted");
    c.next_write(
        "INSERT INTO w VALUES (1) RETURNING inet_server_port()",
        Duration::from_secs(10),
    )
    .await;
    assert!(c.keeper_log(1).contains("SIGHUP"), "{}", c.keeper_log(1));
}
