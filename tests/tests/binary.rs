//! The `keelson` binary: configuration from file, environment and flags,
//! the admin endpoints, and SIGTERM.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    connect_watched, ended_with, free_port, keelson_bin, sqlstate, try_connect, PgServer,
};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_config_layers_admin_endpoints_and_sigterm() {
    let pg = PgServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port(), free_port());
    let config = dir.path().join("keelson.toml");
    // The file sets a backend and a limit of 1 connection; the environment
    // raises the limit (env beats file) and the flag sets the grace.
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{listen}\"\nbackend = \"{}\"\nmax_connections = 1\nshutdown_grace = \"1h\"\n",
            pg.addr()
        ),
    )
    .unwrap();
    let child = Command::new(keelson_bin())
        .args(["proxy", "--config"])
        .arg(&config)
        .args(["--shutdown-grace", "2s"])
        .env("KEELSON_MAX_CONNECTIONS", "10")
        .env("KEELSON_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    let conn = format!("host=127.0.0.1 port={listen} user=postgres dbname=postgres");
    crate::assert_eventually!(
        try_connect(&conn).await.is_ok(),
        Duration::from_secs(60),
        "the proxy never accepted a session"
    );
    let (a, a_conn) = connect_watched(&conn).await;
    let b = try_connect(&conn)
        .await
        .expect("env max_connections=10 beats the file's 1");
    b.simple_query("SELECT 1").await.unwrap();
    drop(b);

    let admin = format!("127.0.0.1:{admin}");
    assert_eq!(http_get(&admin, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(http_get(&admin, "/readyz").await.0, 200);
    let (status, view) = http_get(&admin, "/view").await;
    assert_eq!(status, 200);
    assert!(view.contains(&pg.addr()), "{view}");
    let (status, metrics) = http_get(&admin, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "keelson_connections_accepted_total",
        "keelson_connections_active",
        "keelson_bytes_total{direction=\"server_to_client\"}",
        "keelson_backend_connect_seconds_bucket",
        "keelson_handshake_seconds_bucket",
        "keelson_sessions_ended_total{reason=\"client_closed\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    assert_eq!(http_get(&admin, "/nope").await.0, 404);

    // SIGTERM: no new sessions, the open one continues during the grace.
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(proc.0.id() as i32, libc::SIGTERM);
    }
    crate::assert_eventually!(
        try_connect(&conn).await.is_err(),
        Duration::from_secs(2),
        "still accepting after SIGTERM"
    );
    a.simple_query("SELECT 1")
        .await
        .expect("open session works during the grace period");
    let err = ended_with(
        a_conn,
        Duration::from_secs(10),
        "ended after the grace period",
    )
    .await;
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err}");
    let status = tokio::task::spawn_blocking(move || proc.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reports_bad_configuration_clearly() {
    let out = Command::new(keelson_bin())
        .args(["proxy", "--listen", "127.0.0.1:1"])
        .env_remove("KEELSON_BACKEND")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no backend given"), "{err}");
    let out = Command::new(keelson_bin())
        .args([
            "proxy",
            "--backend",
            "127.0.0.1:5432",
            "--startup-timeout",
            "soon",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("startup_timeout") && err.contains("10s"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_routes_two_clusters_by_sni_in_store_mode() {
    use crate::support::{init_cluster, self_signed_for, set_master};
    let (a, b) = tokio::join!(PgServer::start(), PgServer::start());
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let store = cluster::open(&url).await.unwrap();
    for (name, pg) in [("main", &a), ("other", &b)] {
        let keys = cluster::Keys::new("keelson", name);
        init_cluster(&store, &keys, Default::default(), &[("db", pg.addr())]).await;
        set_master(&store, &keys, Some("db")).await;
    }
    let (cert, key, _) = self_signed_for(dir.path(), &["main.test", "other.test"]);
    let listen = free_port();
    let config = dir.path().join("keelson.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{listen}\"\nstore = \"{url}\"\ncluster = \"main\"\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\n[sni]\n\"other.test\" = \"other\"\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let child = proxy_with_config(&config);
    let _proc = Proc(child);
    let port_via = |name: &str| {
        let out = Command::new("psql")
            .arg(format!(
                "host={name} hostaddr=127.0.0.1 port={listen} user=postgres dbname=postgres sslmode=require connect_timeout=5"
            ))
            .args(["-XAtc", "SELECT inet_server_port()"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    crate::assert_eventually!(
        port_via("other.test") == b.port.to_string(),
        Duration::from_secs(15),
        "other.test did not reach the other cluster"
    );
    // A server name without an entry uses the main cluster.
    assert_eq!(port_via("main.test"), a.port.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_static_replicas_behind_a_replica_listener() {
    let pair = crate::routing::Pair::start_with(keeper::PgBin::find(None).unwrap()).await;
    let (listen, replica) = (free_port(), free_port());
    let child = Command::new(keelson_bin())
        .args(["proxy", "--listen", &format!("127.0.0.1:{listen}")])
        .args(["--replica-listen", &format!("127.0.0.1:{replica}")])
        .args(["--backend", &pair.primary.address()])
        .args(["--replicas", &pair.standby.address()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _proc = Proc(child);
    let on = |port: u16| format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let recovery = |conn: String| async move {
        let c = try_connect(&conn).await.ok()?;
        let r = c
            .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
            .await
            .ok()?;
        Some((r.get::<_, bool>(0), r.get::<_, i32>(1) as u16))
    };
    crate::assert_eventually!(
        recovery(on(replica)).await == Some((true, pair.standby.port)),
        Duration::from_secs(10),
        "the replica listener did not reach the standby"
    );
    assert_eq!(recovery(on(listen)).await, Some((false, pair.primary.port)));
}

/// `proxy-core/examples/embed.rs`, the embedding example, run as its users
/// would: it serves clients through a real PostgreSQL, and a view fed from
/// its own code (stdin) ends the old primary's sessions with a FATAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedding_example_serves_and_applies_views_from_its_own_code() {
    use std::io::Write;
    let pg = crate::support::PgServer::start().await;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-p", "proxy-core", "--example", "embed"])
        .status()
        .unwrap();
    assert!(status.success(), "building the example failed");
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/embed");
    let port = free_port();
    let mut child = Command::new(bin)
        .args([format!("127.0.0.1:{port}"), pg.addr()])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let conn = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    crate::assert_eventually!(
        crate::support::try_connect(&conn).await.is_ok(),
        Duration::from_secs(10),
        "the example never served a client"
    );
    let (client, watched) = connect_watched(&conn).await;
    client.simple_query("SELECT 1").await.unwrap();
    // The embedder's code says: no primary now.
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "none").unwrap();
    let e = ended_with(watched, Duration::from_secs(5), "the old primary's session").await;
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    // Back to the primary; closing stdin shuts the example down cleanly.
    writeln!(stdin, "{}", pg.addr()).unwrap();
    crate::assert_eventually!(
        crate::support::try_connect(&conn).await.is_ok(),
        Duration::from_secs(10),
        "no session after the primary came back"
    );
    drop(stdin);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

/// A CA and a certificate for "localhost" it signed, written as
/// `{name}-ca.pem`, `{name}.pem`, `{name}-key.pem`; returns the CA's path.
fn ca_and_cert(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} CA"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let ca_path = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca_path, ca.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    ca_path
}

/// A psql session kept open: statements in on stdin, one line out each.
struct Session {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Session {
    fn open(conn: &str) -> Session {
        let mut child = Command::new("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", conn])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        Session { child, out }
    }

    fn query(&mut self, sql: &str) -> String {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{sql}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Issue 13: SIGHUP makes the proxy take a new TLS certificate and key
/// (and routing rules) from its files without dropping a session: a
/// session opened with the old certificate goes on; new sessions get the
/// new one; a certificate that does not load is refused and the old one
/// stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_tls_certificate_without_dropping_a_session() {
    let pg = PgServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let old_ca = ca_and_cert(dir.path(), "old");
    let new_ca = ca_and_cert(dir.path(), "new");
    let (cert, key) = (
        dir.path().join("server.pem"),
        dir.path().join("server-key.pem"),
    );
    std::fs::copy(dir.path().join("old.pem"), &cert).unwrap();
    std::fs::copy(dir.path().join("old-key.pem"), &key).unwrap();
    let listen = free_port();
    let log = dir.path().join("proxy.log");
    let child = Command::new(keelson_bin())
        .args(["proxy", "--listen", &format!("127.0.0.1:{listen}")])
        .args(["--backend", &pg.addr()])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let conn = |ca: &std::path::Path| {
        format!(
            "host=localhost hostaddr=127.0.0.1 port={listen} user=postgres dbname=postgres \
             sslmode=verify-full sslrootcert={}",
            ca.display()
        )
    };
    let works = |ca: &std::path::Path| {
        Command::new("psql")
            .args(["-X", "-A", "-t", &conn(ca), "-c", "SELECT 1"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    crate::assert_eventually!(
        works(&old_ca),
        Duration::from_secs(60),
        "the proxy never accepted a TLS session"
    );
    assert!(!works(&new_ca));
    let mut old_session = Session::open(&conn(&old_ca));
    assert_eq!(old_session.query("SELECT 'before';"), "before");

    let hup = |p: &Proc| {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(p.0.id() as i32, libc::SIGHUP) };
    };
    // A broken key is refused; the running certificate stays.
    std::fs::write(&key, "not a key").unwrap();
    hup(&proc);
    crate::assert_eventually!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("keeping the running"),
        Duration::from_secs(10),
        "no refusal logged"
    );
    assert!(works(&old_ca), "a bad reload must keep the old certificate");

    std::fs::copy(dir.path().join("new.pem"), &cert).unwrap();
    std::fs::copy(dir.path().join("new-key.pem"), &key).unwrap();
    hup(&proc);
    crate::assert_eventually!(
        works(&new_ca),
        Duration::from_secs(10),
        "new sessions do not get the new certificate"
    );
    assert!(!works(&old_ca), "the old certificate is still served");
    assert_eq!(
        old_session.query("SELECT 'after';"),
        "after",
        "the session opened before the reload was dropped"
    );
}

/// Issue 13: SIGHUP takes new routing rules from the config file: a
/// session whose application_name a new rule sends to the replica route
/// goes there (here the static "replica" is the primary itself, so the
/// route's role check refuses it with 57P03, which shows the rule is in
/// force); other sessions are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_takes_new_routing_rules() {
    let pg = PgServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    let config = dir.path().join("keelson.toml");
    let base = format!(
        "listen = \"127.0.0.1:{listen}\"\nbackend = \"{0}\"\nreplicas = [\"{0}\"]\n",
        pg.addr()
    );
    std::fs::write(&config, &base).unwrap();
    let child = proxy_with_config(&config);
    let proc = Proc(child);
    let conn = |app: &str| {
        format!("host=127.0.0.1 port={listen} user=postgres dbname=postgres application_name={app}")
    };
    crate::assert_eventually!(
        try_connect(&conn("report")).await.is_ok(),
        Duration::from_secs(60),
        "the proxy never accepted a session"
    );
    let open = try_connect(&conn("other")).await.unwrap();
    std::fs::write(
        &config,
        format!("{base}[[rules]]\napplication_name = \"report\"\nroute = \"replica\"\n"),
    )
    .unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(proc.0.id() as i32, libc::SIGHUP) };
    crate::assert_eventually!(
        try_connect(&conn("report"))
            .await
            .err()
            .is_some_and(|e| sqlstate(&e).as_deref() == Some("57P03")),
        Duration::from_secs(10),
        "the new rule is not in force"
    );
    assert!(try_connect(&conn("other")).await.is_ok());
    open.simple_query("SELECT 1")
        .await
        .expect("a session from before the reload");
}

/// SIGHUP also takes a listener's new settings (here its route, and the
/// PROXY protocol on another): a `[[listeners]]` entry whose route changes
/// from primary to replica sends its next sessions to the replica route
/// (the static "replica" is the primary itself, so the role check refuses
/// them with 57P03), while a session opened before goes on; once
/// 127.0.0.1 is trusted to send PROXY protocol headers, a listener that
/// wants them refuses a client without one, and one that does not still
/// takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_takes_new_listener_settings() {
    let pg = PgServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, extra, other) = (free_port(), free_port(), free_port());
    let config = dir.path().join("keelson.toml");
    let file = |route: &str, trusted: &str| {
        format!(
            "listen = \"127.0.0.1:{listen}\"\nbackend = \"{0}\"\nreplicas = [\"{0}\"]\n\
             proxy_protocol_trusted = [{trusted}]\n\
             [[listeners]]\nlisten = \"127.0.0.1:{extra}\"\nroute = \"{route}\"\nproxy_protocol = false\n\
             [[listeners]]\nlisten = \"127.0.0.1:{other}\"\nroute = \"primary\"\n",
            pg.addr()
        )
    };
    std::fs::write(&config, file("primary", "")).unwrap();
    let child = proxy_with_config(&config);
    let proc = Proc(child);
    let conn = |port: u16| format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    crate::assert_eventually!(
        try_connect(&conn(extra)).await.is_ok() && try_connect(&conn(other)).await.is_ok(),
        Duration::from_secs(60),
        "the proxy never accepted a session"
    );
    let open = try_connect(&conn(extra)).await.unwrap();
    std::fs::write(&config, file("replica", "\"127.0.0.1\"")).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(proc.0.id() as i32, libc::SIGHUP) };
    crate::assert_eventually!(
        try_connect(&conn(extra))
            .await
            .err()
            .is_some_and(|e| sqlstate(&e).as_deref() == Some("57P03")),
        Duration::from_secs(10),
        "the listener's new route is not in force"
    );
    // The other listener (PROXY protocol on by default) now wants a header
    // from 127.0.0.1: a direct client is refused.
    crate::assert_eventually!(
        try_connect(&conn(other)).await.is_err(),
        Duration::from_secs(10),
        "the listener's PROXY protocol setting is not in force"
    );
    open.simple_query("SELECT 1")
        .await
        .expect("a session from before the reload");
}

/// `keelson proxy --config FILE`, quiet.
fn proxy_with_config(config: &std::path::Path) -> std::process::Child {
    Command::new(keelson_bin())
        .args(["proxy", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}
