//! Other PostgreSQL majors, fetched by `scripts/pg-versions`: the keeper's
//! primitives on 13 to 18, the proxy's role check on a server without
//! `in_hot_standby` (13), and a libpq 18 client speaking protocol 3.2 with
//! direct TLS through the proxy to PostgreSQL 18, cancel included.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use keeper::{Instance, PgBin, Replication};
use proxy_core::ProxyConfig;

use crate::routing::{check_server_roles, Pair};
use crate::support::{free_port, self_signed_for, TestProxy};

/// `target/pg-versions`, fetched on first use (idempotent).
fn versions() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::process::Command::new(root.join("scripts/pg-versions"))
            .output()
            .expect("run scripts/pg-versions");
        assert!(
            out.status.success(),
            "scripts/pg-versions failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

fn bin(major: u32) -> PgBin {
    PgBin::find(Some(versions().join(major.to_string()).join("bin"))).unwrap()
}

fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeper_primitives_on_postgres_13_to_18() {
    let dir = tempdir();
    for major in [13u32, 14, 16, 17, 18] {
        let repl = Replication {
            user: "keelson_repl".into(),
            password: "pw".into(),
        };
        let mut pg = Instance::new(
            bin(major),
            dir.path().join(major.to_string()),
            "127.0.0.1",
            free_port(),
            repl,
        );
        pg.initdb().await.unwrap();
        pg.write_config(&Default::default(), None, &[]).unwrap();
        pg.start(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL {major}: {e}"));
        let r = pg.report("k", 1).await;
        assert!(
            r.healthy && !r.in_recovery && r.timeline == Some(1) && r.lsn > Some(0),
            "PostgreSQL {major}: {r:?}"
        );
        pg.ensure_replication_account().await.unwrap();
        pg.sync_slots(&[keeper::slot_name("b")]).await.unwrap();
        let c = pg.connect().await.unwrap();
        let row = c
            .query_one(
                "SELECT current_setting('server_version_num')::int / 10000, \
                 (SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'keelson_b'), \
                 (SELECT rolreplication FROM pg_roles WHERE rolname = 'keelson_repl')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0) as u32, major);
        assert_eq!(row.get::<_, i64>(1), 1, "PostgreSQL {major}: slot");
        assert!(
            row.get::<_, bool>(2),
            "PostgreSQL {major}: replication role"
        );
        pg.stop(Duration::from_secs(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_check_without_in_hot_standby_on_postgres_13() {
    // PostgreSQL 13 does not report in_hot_standby: the proxy asks
    // pg_is_in_recovery() itself, and its answer must not reach the client.
    let pair = Pair::start_with(bin(13)).await;
    check_server_roles(&pair).await;
}

const LIBPQ18_CLIENT: &str = r#"
import sys, threading, time
import psycopg
with psycopg.connect(sys.argv[1]) as c:
    print("libpq", psycopg.pq.version())
    print("protocol", c.pgconn.full_protocol_version)
    print("ssl", c.pgconn.ssl_in_use)
    print("server", c.execute("SHOW server_version_num").fetchone()[0])
    def cancel():
        time.sleep(1)
        c.cancel_safe()
    threading.Thread(target=cancel).start()
    t = time.time()
    try:
        c.execute("SELECT pg_sleep(30)")
        print("cancel none")
    except psycopg.errors.QueryCanceled:
        print("cancel", round(time.time() - t, 2))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_18_protocol_3_2_direct_tls_and_cancel_through_the_proxy() {
    let dir = tempdir();
    let mut pg = Instance::new(
        bin(18),
        dir.path().join("18"),
        "127.0.0.1",
        free_port(),
        Replication {
            user: "keelson_repl".into(),
            password: "pw".into(),
        },
    );
    pg.initdb().await.unwrap();
    pg.write_config(&Default::default(), None, &[]).unwrap();
    pg.start(Duration::from_secs(30)).await.unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, _) = self_signed_for(certs.path(), &["localhost"]);
    let cfg = ProxyConfig {
        tls: Some(proxy_core::tls::server_config(&cert, &key).unwrap()),
        ..Default::default()
    };
    let proxy = TestProxy::start(&pg.address(), cfg).await;
    let script = certs.path().join("client.py");
    std::fs::write(&script, LIBPQ18_CLIENT).unwrap();
    let python = versions().join("py/bin/python");
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres \
         max_protocol_version=3.2 sslmode=require sslnegotiation=direct connect_timeout=10",
        proxy.port()
    );
    let out = tokio::process::Command::new(python)
        .arg(&script)
        .arg(&dsn)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_owned()
    };
    assert!(field("libpq").starts_with("18"), "{text}");
    // Protocol 3.2 end to end: its cancel keys are 32 bytes, not 4.
    assert_eq!(field("protocol"), "30002", "{text}");
    assert_eq!(field("ssl"), "True", "direct TLS: {text}");
    assert!(field("server").starts_with("18"), "{text}");
    let took: f64 = field("cancel").parse().expect("the query was cancelled");
    assert!(took < 5.0, "cancel took {took} s");
    pg.stop(Duration::from_secs(10)).await;
}
