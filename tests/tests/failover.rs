//! Automatic failover with the real roles: a sentinel and two keepers run
//! as child processes of the `keelson` binary, a proxy follows the store.
//! The primary's keeper and its PostgreSQL are killed with SIGKILL; writes
//! through the proxy must resume on the standby, and the old primary,
//! restarted, must rejoin as a standby.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster::{AnyStore, ClusterData, ClusterSpec, Keys, Store};
use proxy_core::{ProxyConfig, View, ViewHandle};

use crate::support::{free_port, keelson_bin, landing_port, try_connect, EtcdServer, TestProxy};

struct Role(Child);

impl Drop for Role {
    fn drop(&mut self) {
        // SAFETY: signalling our own child; the keeper stops its PostgreSQL.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
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

async fn status(store: &AnyStore, keys: &Keys) -> Option<ClusterData> {
    let kv = store.get(&keys.clusterdata()).await.ok()??;
    ClusterData::from_json(&kv.value).ok()
}

async fn failover_after_sigkill(url: &str, store: AnyStore) {
    let dir = tempfile::tempdir().unwrap();
    if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
    }
    let keys = Keys::new("keelson", "f");
    store
        .put(
            &keys.clusterdata(),
            &ClusterData::new(ClusterSpec::default()).to_json(),
            0,
        )
        .await
        .unwrap();
    let common = ["--store", url, "--cluster", "f"];
    let _sentinel = spawn(
        &[&["sentinel", "--uid", "s1"][..], &common].concat(),
        &dir.path().join("sentinel.log"),
    );
    let ports = [free_port(), free_port()];
    let keeper_args = |i: usize| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "keeper".into(),
            "--uid".into(),
            format!("k{i}"),
            "--data-dir".into(),
            dir.path().join(format!("k{i}")).display().to_string(),
            "--pg-listen".into(),
            format!("127.0.0.1:{}", ports[i - 1]),
        ];
        v.extend(common.iter().map(|s| s.to_string()));
        v
    };
    let start_keeper = |i: usize| {
        let a = keeper_args(i);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        spawn(&a, &dir.path().join(format!("keeper{i}.log")))
    };
    let mut keepers = [Some(start_keeper(1)), Some(start_keeper(2))];

    let proxy =
        TestProxy::with_view(ViewHandle::new(View::default()), ProxyConfig::default()).await;
    let _follow = keelson::follow::spawn(
        store.clone(),
        keys.clone(),
        "p1".into(),
        proxy.proxy.clone(),
    );
    let conn = proxy.conn("postgres");
    crate::assert_eventually!(
        status(&store, &keys)
            .await
            .is_some_and(|d| d.proxy.master_db.is_some()
                && d.dbs.values().filter(|db| db.status.healthy).count() == 2),
        Duration::from_secs(120),
        "the cluster never came up: {:?}",
        status(&store, &keys).await
    );
    let data = status(&store, &keys).await.unwrap();
    let master = data.proxy.master_db.clone().unwrap();
    let (mi, other) = if master == "k1" { (1, 2) } else { (2, 1) };
    crate::assert_eventually!(
        landing_port(&conn).await == Some(ports[mi - 1]),
        Duration::from_secs(10),
        "the proxy never routed to the primary"
    );
    let c = try_connect(&conn).await.unwrap();
    c.batch_execute("CREATE TABLE w (x int)").await.unwrap();
    // Replication works: the standby has the table.
    let standby = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        ports[other - 1]
    );
    crate::assert_eventually!(
        match try_connect(&standby).await {
            Ok(s) => s.query_one("SELECT count(*) FROM w", &[]).await.is_ok(),
            Err(_) => false,
        },
        Duration::from_secs(10),
        "the table never reached the standby"
    );

    // SIGKILL the primary's keeper and its PostgreSQL.
    let pgpid: i32 =
        std::fs::read_to_string(dir.path().join(format!("k{mi}/pgdata/postmaster.pid")))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .parse()
            .unwrap();
    let killed = Instant::now();
    if let Some(mut k) = keepers[mi - 1].take() {
        let _ = k.0.kill();
        let _ = k.0.wait();
        std::mem::forget(k);
    }
    // SAFETY: killing the orphaned postmaster by pid.
    unsafe {
        libc::kill(pgpid, libc::SIGKILL);
    }
    let resumed = loop {
        if let Ok(c) = try_connect(&format!("{conn} connect_timeout=2")).await {
            if let Ok(row) = c
                .query_one("INSERT INTO w VALUES (1) RETURNING inet_server_port()", &[])
                .await
            {
                break (killed.elapsed(), row.get::<_, i32>(0));
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "writes never resumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("writes resumed {:?} after the SIGKILL", resumed.0);
    assert_eq!(
        resumed.1,
        i32::from(ports[other - 1]),
        "writes resumed on the standby"
    );
    assert!(
        resumed.0 < Duration::from_secs(20),
        "failover took {:?}",
        resumed.0
    );

    // The old primary comes back and rejoins as a standby of the new one.
    keepers[mi - 1] = Some(start_keeper(mi));
    let old = format!("k{mi}");
    crate::assert_eventually!(
        status(&store, &keys).await.is_some_and(|d| {
            let db = &d.dbs[&old];
            db.spec.role == cluster::data::Role::Standby
                && db.status.healthy
                && db.status.in_recovery
        }),
        Duration::from_secs(60),
        "the old primary did not rejoin as a standby: {:?}",
        status(&store, &keys).await.map(|d| d.dbs[&old].clone())
    );
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
        std::fs::read_to_string(dir.path().join(format!("k{mi}/postgres.log"))).unwrap_or_default(),
        std::fs::read_to_string(dir.path().join(format!("keeper{mi}.log"))).unwrap_or_default()
    );
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
