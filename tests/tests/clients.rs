use std::process::Command;

use proxy_core::ProxyConfig;
use tokio_postgres::SimpleQueryMessage;

use crate::support::{
    connect, must_fail, sqlstate, try_connect, PgServer, TestProxy, ALICE_PASSWORD,
};

fn psql(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = Command::new("psql");
    c.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_works_through_the_proxy() {
    let pg = PgServer::start().await;
    let proxy = TestProxy::start(&pg.addr(), ProxyConfig::default()).await;
    let port = proxy.port().to_string();
    let (ok, out, err) = psql(
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            "SELECT 40 + 2, inet_server_port()",
        ],
        &[],
    );
    assert!(ok, "psql failed: {err}");
    assert_eq!(out, format!("42|{}", pg.port));
    // A multi-statement script with a transaction and an error in the middle.
    let (ok, _, err) = psql(
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-c",
            "BEGIN; SELECT 1/0; COMMIT;",
        ],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("division by zero"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_simple_extended_and_prepared() {
    let pg = PgServer::start().await;
    let proxy = TestProxy::start(&pg.addr(), ProxyConfig::default()).await;
    let client = connect(&proxy.conn("postgres")).await;

    // Simple protocol.
    let msgs = client
        .simple_query("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 1000) g; SELECT count(*) FROM t")
        .await
        .expect("simple query");
    let count = msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(count.as_deref(), Some("1000"));

    // Extended protocol with parameters, and a prepared statement reused.
    let row = client
        .query_one("SELECT v FROM t WHERE id = $1", &[&500i32])
        .await
        .expect("extended query");
    assert_eq!(row.get::<_, String>(0), "v500");
    let stmt = client
        .prepare("SELECT sum(id)::bigint FROM t WHERE id <= $1")
        .await
        .expect("prepare");
    for n in [10i32, 100, 1000] {
        let sum: i64 = client
            .query_one(&stmt, &[&n])
            .await
            .expect("execute")
            .get(0);
        assert_eq!(sum, i64::from(n) * i64::from(n + 1) / 2);
    }
    // An error does not break the session.
    let e = client
        .simple_query("SELECT * FROM missing")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42P01"));
    let port: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, i32::from(pg.port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_authentication_is_relayed_end_to_end() {
    let pg = PgServer::start().await;
    let proxy = TestProxy::start(&pg.addr(), ProxyConfig::default()).await;
    let ok = connect(&format!(
        "{} password='{ALICE_PASSWORD}'",
        proxy.conn("alice")
    ))
    .await;
    let who: String = ok
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "alice");
    let method: String = ok
        .query_one(
            "SELECT CASE WHEN rolpassword LIKE 'SCRAM-SHA-256$%' THEN 'scram' ELSE 'other' END FROM pg_authid WHERE rolname = 'alice'",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or_else(|_| "scram".into()); // alice may not read pg_authid; the hba line forces SCRAM anyway
    assert_eq!(method, "scram");

    let e = must_fail(
        try_connect(&format!("{} password=wrong", proxy.conn("alice"))).await,
        "wrong password must fail",
    );
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");

    // psql sees the same.
    let port = proxy.port().to_string();
    let (ok, _, err) = psql(
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "alice",
            "-d",
            "postgres",
            "-c",
            "SELECT 1",
        ],
        &[("PGPASSWORD", "nope")],
    );
    assert!(!ok);
    assert!(err.contains("password authentication failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_with_require_and_verify_full() {
    let pg = PgServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A CA and a server certificate for "localhost" signed by it.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keelson test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (ca_path, cert_path, key_path) = (
        dir.path().join("ca.pem"),
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
    );
    std::fs::write(&ca_path, ca.pem()).unwrap();
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();

    let cfg = ProxyConfig {
        tls: Some(proxy_core::tls::server_config(&cert_path, &key_path).unwrap()),
        ..Default::default()
    };
    let proxy = TestProxy::start(&pg.addr(), cfg).await;
    let port = proxy.port();
    let query = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    // The proxy terminates TLS: the client sees TLS, the server a plain session.
    for mode in [
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=require"),
        format!(
            "host=localhost hostaddr=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
            ca_path.display()
        ),
    ] {
        let (ok, out, err) = psql(&[&mode, "-c", "SELECT 'tls-ok'"], &[]);
        assert!(ok, "{mode}: {err}");
        assert_eq!(out, "tls-ok");
        let (ok, out, err) = psql(&[&mode, "-c", "\\conninfo"], &[]);
        assert!(ok, "{err}");
        assert!(out.contains("SSL connection"), "{out}");
        let (ok, out, _) = psql(&[&mode, "-c", query], &[]);
        assert!(ok);
        assert_eq!(out, "f", "proxy-to-server hop is plaintext");
    }
    // verify-full with the wrong host name must fail on the client side.
    let wrong = format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
        ca_path.display()
    );
    let (ok, _, err) = psql(&[&wrong, "-c", "SELECT 1"], &[]);
    assert!(!ok);
    assert!(
        err.contains("does not match host name") || err.contains("certificate"),
        "{err}"
    );
    // A TLS session with SCRAM on top.
    let (ok, out, err) = psql(
        &[
            &format!("host=127.0.0.1 port={port} user=alice dbname=postgres sslmode=require"),
            "-c",
            "SELECT current_user",
        ],
        &[("PGPASSWORD", ALICE_PASSWORD)],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "alice");
}

/// Turns TLS on in `pg` with a certificate for 127.0.0.1 signed by a new
/// CA; returns the CA's path and that of another CA.
pub(crate) async fn pg_with_tls(
    pg: &PgServer,
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let ca = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        (cert, rcgen::Issuer::new(p, key))
    };
    let (ca_cert, issuer) = ca("server CA");
    let (other_cert, _) = ca("other CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (ca_path, other_path) = (dir.join("ca.pem"), dir.join("other-ca.pem"));
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    std::fs::write(&other_path, other_cert.pem()).unwrap();
    let (crt, k) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
    if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
        for p in [dir, &crt, &k] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
        }
    }
    let su = pg.superuser().await;
    for sql in [
        format!("ALTER SYSTEM SET ssl_cert_file = '{}'", crt.display()),
        format!("ALTER SYSTEM SET ssl_key_file = '{}'", k.display()),
        "ALTER SYSTEM SET ssl = on".into(),
        "SELECT pg_reload_conf()".into(),
    ] {
        su.simple_query(&sql).await.unwrap();
    }
    crate::assert_eventually!(
        pg.superuser()
            .await
            .query_one("SHOW ssl", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
            == "on",
        std::time::Duration::from_secs(10),
        "ssl did not come on"
    );
    (ca_path, other_path)
}

/// Issue 13: the proxy's hop to PostgreSQL over TLS (`backend_tls`):
/// `pg_stat_ssl` shows the server side encrypted for each mode; a
/// certificate from another CA is refused under verify-ca and
/// verify-full, and a server without TLS under require, each with a clear
/// error (08006) and nothing sent in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_reaches_postgresql_over_tls_and_refuses_a_wrong_ca() {
    use proxy_core::tls::{backend_tls, BackendTlsMode};
    let plain_pg = PgServer::start().await;
    let pg = PgServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = pg_with_tls(&pg, dir.path()).await;
    let query = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    for (mode, ca) in [
        (BackendTlsMode::Require, None),
        (BackendTlsMode::VerifyCa, Some(&ca)),
        (BackendTlsMode::VerifyFull, Some(&ca)),
    ] {
        let cfg = ProxyConfig {
            backend_tls: Some(backend_tls(mode, ca.map(|p| p.as_path())).unwrap()),
            ..Default::default()
        };
        let proxy = TestProxy::start(&pg.addr(), cfg).await;
        let c = try_connect(&proxy.conn("postgres")).await.unwrap();
        let ssl: bool = c.query_one(query, &[]).await.unwrap().get(0);
        assert!(ssl, "{mode:?}: the server side is not encrypted");
        // The client's side is plain here: TLS ends and starts at the proxy.
    }
    for mode in [BackendTlsMode::VerifyCa, BackendTlsMode::VerifyFull] {
        let cfg = ProxyConfig {
            backend_tls: Some(backend_tls(mode, Some(&other)).unwrap()),
            ..Default::default()
        };
        let proxy = TestProxy::start(&pg.addr(), cfg).await;
        let e = try_connect(&proxy.conn("postgres")).await.unwrap_err();
        let msg = crate::support::db_message(&e);
        let hint = e.as_db_error().and_then(|d| d.hint()).unwrap_or_default();
        eprintln!("{mode:?} with another CA: {msg} (HINT: {hint})");
        assert_eq!(
            crate::support::sqlstate(&e).as_deref(),
            Some("08006"),
            "{e}"
        );
        assert!(msg.contains("TLS"), "{msg}");
    }
    let cfg = ProxyConfig {
        backend_tls: Some(backend_tls(BackendTlsMode::Require, None).unwrap()),
        ..Default::default()
    };
    let proxy = TestProxy::start(&plain_pg.addr(), cfg).await;
    let e = try_connect(&proxy.conn("postgres")).await.unwrap_err();
    eprintln!(
        "require against a server without TLS: {}",
        crate::support::db_message(&e)
    );
    assert_eq!(
        crate::support::sqlstate(&e).as_deref(),
        Some("08006"),
        "{e}"
    );
    assert!(matches!(
        backend_tls(BackendTlsMode::VerifyFull, None),
        Err(proxy_core::tls::BackendTlsError::CaNeeded(_))
    ));
}
