//! Test harness: real PostgreSQL servers and in-process proxies on free
//! loopback ports, cleaned up on drop even when a test fails.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root every
//! PostgreSQL command runs as the `postgres` account (setuid/setgid on the
//! child), and its directories are owned by that account.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proxy_core::{Backend, Proxy, ProxyConfig, View, ViewHandle};
use tokio::net::TcpListener;
use tokio_postgres::{Client, NoTls};

/// The password of the SCRAM test role `alice`.
pub const ALICE_PASSWORD: &str = "correct horse battery staple";

/// Waits for a condition, polling, up to a deadline; panics with the message
/// if it never holds.
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, $timeout:expr, $($msg:tt)+) => {{
        let deadline = std::time::Instant::now() + $timeout;
        loop {
            if $cond {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!($($msg)+);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}

thread_local! {
    static PANIC_MESSAGE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Remembers each thread's panic message (once installed), so that a
/// failed test can repeat it after its backtrace and logs: CI keeps the
/// end of a failure's output, where the message would otherwise not be.
pub fn note_panics() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // KEELSON_TEST_LOG=filter: the in-process proxies' logs on stderr.
        if let Ok(filter) = std::env::var("KEELSON_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .try_init();
        }
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let at = info
                .location()
                .map(|l| format!("{}:{}: ", l.file(), l.line()))
                .unwrap_or_default();
            PANIC_MESSAGE.with(|m| *m.borrow_mut() = Some(format!("{at}{msg}")));
            previous(info)
        }));
    });
}

/// This thread's last panic message, on one line, at most `max` bytes.
pub fn panic_message(max: usize) -> Option<String> {
    PANIC_MESSAGE.with(|m| {
        m.borrow().as_ref().map(|s| {
            let mut s = s.replace('\n', " | ");
            if s.len() > max {
                let mut cut = max;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
                s.push_str(" ...");
            }
            s
        })
    })
}

/// Raises the open-file limit to its hard maximum once: the bad-input tests
/// hold thousands of sockets, both ends in this process.
pub fn raise_fd_limit() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain libc calls on a valid, owned struct.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    });
}

/// Where PostgreSQL's server binaries are: `pg_config --bindir`, else PATH.
pub fn pg_bindir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(dir) = std::env::var("KEELSON_PG_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let out = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .expect("pg_config not found: install PostgreSQL's server package (scripts/test does)");
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            dir
        } else {
            // pg_config from the client package may point at a bindir
            // without server binaries; fall back to PATH.
            PathBuf::new()
        }
    })
    .clone()
}

fn pg_command(name: &str) -> Command {
    let dir = pg_bindir();
    let mut c = if dir.as_os_str().is_empty() {
        Command::new(name)
    } else {
        Command::new(dir.join(name))
    };
    if let Some((uid, gid)) = unprivileged() {
        use std::os::unix::process::CommandExt;
        c.uid(uid).gid(gid);
        c.env("HOME", "/tmp");
    }
    c
}

/// The `postgres` account's uid and gid when running as root.
pub fn unprivileged() -> Option<(u32, u32)> {
    keeper::pg::unprivileged_ids()
}

fn chown_tree(path: &Path) {
    if let Some((uid, gid)) = unprivileged() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
    }
}

/// A free loopback port (bound and released; a server binds it next),
/// below the kernel's ephemeral range: a port the OS hands out for `:0`
/// can be taken as the source port of any client connection once its
/// server stops, and a keeper restarted on it then fails with "Address
/// already in use" (seen in CI). Ports are handed out once per process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral.max(10_001));
    let span = high - low;
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port in {low}..{high}");
}

/// A running PostgreSQL server in a temporary directory.
pub struct PgServer {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl PgServer {
    /// initdb, configure (SCRAM for `alice`, trust for others on loopback),
    /// start, and wait until it accepts queries.
    pub async fn start() -> PgServer {
        Self::start_with(false).await
    }

    /// [`PgServer::start`]; `durable` keeps PostgreSQL's defaults for
    /// fsync, synchronous_commit and full_page_writes (a standby of this
    /// server can then be base-backed-up: PostgreSQL refuses to copy a
    /// standby that replayed WAL written without full page writes).
    pub async fn start_with(durable: bool) -> PgServer {
        let fast: &[&str] = if durable {
            &[]
        } else {
            &[
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        };
        let mut dir = tempfile::Builder::new()
            .prefix("keelson-pg-")
            .tempdir()
            .expect("tempdir");
        chown_tree(dir.path());
        let data = dir.path().join("data");
        let out = pg_command("initdb")
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all alice 127.0.0.1/32 scram-sha-256\n\
             host all all 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n",
        )
        .expect("write pg_hba.conf");
        let mut attempt = 0;
        loop {
            let port = free_port();
            let log = std::fs::File::create(dir.path().join("log")).expect("log file");
            chown_tree(&dir.path().join("log"));
            let child = pg_command("postgres")
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-k"])
                .arg(dir.path())
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "max_connections=700",
                    "-c",
                    "shared_buffers=64MB",
                ])
                .args(fast)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start postgres");
            let mut server = PgServer { port, child, dir };
            if server.wait_ready(Duration::from_secs(30)).await {
                server
                    .superuser()
                    .await
                    .batch_execute(&format!(
                        "CREATE ROLE alice LOGIN PASSWORD '{ALICE_PASSWORD}'; GRANT ALL ON SCHEMA public TO alice;"
                    ))
                    .await
                    .expect("create role alice");
                return server;
            }
            // Most likely the port was taken meanwhile: stop and retry.
            attempt += 1;
            let log = server.log();
            assert!(attempt < 3, "postgres did not start: {log}");
            dir = server.take_dir();
        }
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let placeholder = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, placeholder)
    }

    async fn wait_ready(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            let conn = format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                self.port
            );
            if let Ok((client, connection)) = tokio_postgres::connect(&conn, NoTls).await {
                tokio::spawn(connection);
                if client.simple_query("SELECT 1").await.is_ok() {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the server with a fast shutdown (SIGINT): clients are ended,
    /// and its WAL senders send everything up to the shutdown checkpoint
    /// before it exits.
    pub fn stop_fast(&mut self) {
        keeper::process::terminate(&mut self.child, libc::SIGINT, Duration::from_secs(30));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// A direct superuser connection.
    pub async fn superuser(&self) -> Client {
        connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        ))
        .await
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown; the data directory is thrown away.
        keeper::process::terminate(&mut self.child, libc::SIGQUIT, Duration::from_secs(10));
    }
}

/// Connects with tokio-postgres, driving the connection on a task.
pub async fn connect(conn: &str) -> Client {
    try_connect(conn)
        .await
        .unwrap_or_else(|e| panic!("connect {conn}: {e}"))
}

pub async fn try_connect(conn: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A proxy running in this process on a free port.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub proxy: Proxy,
}

impl TestProxy {
    pub async fn start(backend: &str, cfg: ProxyConfig) -> TestProxy {
        Self::with_view(ViewHandle::new(View::fixed(Backend::new(backend))), cfg).await
    }

    pub async fn with_view(view: ViewHandle, cfg: ProxyConfig) -> TestProxy {
        raise_fd_limit();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let proxy = Proxy::new(cfg, view);
        let p = proxy.clone();
        let opts = proxy_core::ListenerOptions {
            forwarding: forwarding(),
            ..Default::default()
        };
        tokio::spawn(async move { p.serve_with(listener, opts).await });
        TestProxy { addr, proxy }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A listener whose default route is `replica`; its connection string.
    pub async fn replica_conn(&self) -> String {
        let addr = self
            .listen(proxy_core::ListenerOptions {
                route: proxy_core::Route::Replica,
                ..Default::default()
            })
            .await;
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=10",
            addr.port()
        )
    }

    /// Another listener on the same proxy, with its own options.
    pub async fn listen(&self, opts: proxy_core::ListenerOptions) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let p = self.proxy.clone();
        tokio::spawn(async move { p.serve_with(listener, opts).await });
        addr
    }

    /// A libpq-style connection string through the proxy.
    pub fn conn(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres connect_timeout=10",
            self.addr.port()
        )
    }
}

/// The forwarding mode of the proxies tests start: `kernel` with
/// `KEELSON_TEST_FORWARDING=kernel` (scripts/test runs the client tests so
/// a second time), `userspace` otherwise.
pub fn forwarding() -> proxy_core::ForwardingMode {
    match std::env::var("KEELSON_TEST_FORWARDING").ok().as_deref() {
        None | Some("") => proxy_core::ForwardingMode::Userspace,
        Some(m) => proxy_core::ForwardingMode::parse(m)
            .unwrap_or_else(|| panic!("KEELSON_TEST_FORWARDING={m}: not userspace or kernel")),
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        // A test run in kernel mode whose sessions stayed in user space
        // proves nothing about it.
        if forwarding() == proxy_core::ForwardingMode::Kernel && !std::thread::panicking() {
            let (k, u) = (self.proxy.kernel_sessions(), self.proxy.kernel_fallbacks());
            assert!(
                u == 0,
                "KEELSON_TEST_FORWARDING=kernel, but {u} sessions (and {k} in the kernel) forwarded in user space ({})",
                proxy_core::kernel_forwarding().err().unwrap_or_default()
            );
        }
        self.proxy.stop_accepting();
    }
}

/// The SQLSTATE of a tokio-postgres error, if the server (or proxy) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

/// Path of the `keelson` binary, built on first use.
pub fn keelson_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("KEELSON_BIN") {
            return PathBuf::from(p);
        }
        // target/<profile>/deps/e2e-hash -> target/<profile>/keelson
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
        let bin = profile_dir.join("keelson");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "keelson", "--bin", "keelson"]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building the keelson binary failed");
        bin
    })
    .clone()
}

/// Reads everything the peer sends until it closes (or `limit` passes).
pub async fn read_to_close(s: &mut tokio::net::TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let r = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    (out, r.is_ok())
}

/// Parses the fields of the first message if it is an ErrorResponse:
/// returns (severity, SQLSTATE, message).
pub fn parse_error(bytes: &[u8]) -> Option<(String, String, String)> {
    if bytes.first() != Some(&b'E') || bytes.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    let body = bytes.get(5..1 + len)?;
    let (mut sev, mut code, mut msg) = (String::new(), String::new(), String::new());
    for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let v = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'S' => sev = v,
            b'C' => code = v,
            b'M' => msg = v,
            _ => {}
        }
    }
    Some((sev, code, msg))
}

/// A StartupMessage for `user` at protocol 3.`minor` with extra parameters.
pub fn startup_packet(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&3u16.to_be_bytes());
    body.extend_from_slice(&minor.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

/// Writes a self-signed certificate for `localhost` and its key; returns
/// their paths.
pub fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (c, k, _) = self_signed_for(dir, &["localhost"]);
    (c, k)
}

/// The server-sent message of a tokio-postgres error ("" if none).
pub fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default()
}

/// The error of a connection attempt that must fail.
pub fn must_fail(r: Result<Client, tokio_postgres::Error>, why: &str) -> tokio_postgres::Error {
    match r {
        Ok(_) => panic!("{why}"),
        Err(e) => e,
    }
}

/// A one-member etcd serving clients at `client` and its peer port at
/// `peer` (URLs), its data in `data`.
pub fn etcd_command(data: &Path, client: &str, peer: &str) -> Command {
    let mut c = Command::new("etcd");
    c.args(["--name", "default", "--data-dir"])
        .arg(data)
        .args([
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
        ])
        .args([
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
        ])
        .args(["--initial-cluster", &format!("default={peer}")]);
    c
}

/// A real etcd server on free loopback ports, killed and removed on drop.
pub struct EtcdServer {
    pub port: u16,
    peer_port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl EtcdServer {
    pub async fn start() -> EtcdServer {
        let dir = tempfile::Builder::new()
            .prefix("keelson-etcd-")
            .tempdir()
            .expect("tempdir");
        let mut e = EtcdServer {
            port: free_port(),
            peer_port: free_port(),
            child: None,
            dir,
        };
        e.spawn().await;
        e
    }

    async fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("log"))
            .expect("etcd log");
        let child = etcd_command(&self.dir.path().join("data"), &client, &peer)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd not found: scripts/test installs etcd-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                use cluster::Store;
                if let Ok(store) = cluster::open(&self.url()).await {
                    if store.get("/health").await.is_ok() {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not start: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Freezes etcd (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Kills etcd with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports and data.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// Writes a new cluster whose databases are the given `(uid, address)`
/// pairs, all healthy standbys, with no primary named yet.
pub async fn init_cluster(
    store: &cluster::AnyStore,
    keys: &cluster::Keys,
    spec: cluster::ClusterSpec,
    dbs: &[(&str, String)],
) {
    use cluster::data::{Db, DbSpec, DbStatus, Role};
    use cluster::Store;
    let mut data = cluster::ClusterData::new(spec);
    data.phase = cluster::data::ClusterPhase::Normal;
    for (uid, addr) in dbs {
        data.dbs.insert(
            (*uid).to_owned(),
            Db {
                keeper: (*uid).to_owned(),
                spec: DbSpec {
                    role: Role::Standby,
                    ..Default::default()
                },
                status: DbStatus {
                    healthy: true,
                    address: Some(addr.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
    }
    store
        .put(&keys.clusterdata(), &data.to_json(), 0)
        .await
        .expect("write clusterdata");
}

/// Names `master` (or nobody) as the primary, by compare-and-swap, as a
/// sentinel would. Returns the new proxy generation.
pub async fn set_master(
    store: &cluster::AnyStore,
    keys: &cluster::Keys,
    master: Option<&str>,
) -> u64 {
    use cluster::data::Role;
    use cluster::{Cas, Store};
    loop {
        let kv = store
            .get(&keys.clusterdata())
            .await
            .expect("read")
            .expect("clusterdata exists");
        let mut data = cluster::ClusterData::from_json(&kv.value).expect("valid");
        for (uid, db) in data.dbs.iter_mut() {
            db.spec.role = if Some(uid.as_str()) == master {
                Role::Master
            } else {
                Role::Standby
            };
        }
        data.set_proxy_master(master);
        if let Cas::Done(_) = store
            .put_if_revision(&keys.clusterdata(), &data.to_json(), kv.mod_revision, 0)
            .await
            .expect("cas")
        {
            return data.proxy.generation;
        }
    }
}

/// The port of the server a new session through `conn` lands on.
pub async fn landing_port(conn: &str) -> Option<u16> {
    let c = try_connect(conn).await.ok()?;
    let p: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .ok()?
        .get(0);
    u16::try_from(p).ok()
}

/// Connects and drives the connection on a task whose result is returned:
/// an error the server sends outside a query (a FATAL on an idle session)
/// shows up there.
pub async fn connect_watched(
    conn: &str,
) -> (
    Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = tokio_postgres::connect(conn, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {conn}: {e}"));
    (client, tokio::spawn(connection))
}

/// Waits for a watched connection to be ended by the server and returns the
/// error it ended with.
pub async fn ended_with(
    conn: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    within: Duration,
    what: &str,
) -> tokio_postgres::Error {
    match tokio::time::timeout(within, conn).await {
        Err(_) => panic!("{what}: not ended within {within:?}"),
        Ok(r) => match r.expect("connection task") {
            Ok(()) => panic!("{what}: ended without an error"),
            Err(e) => e,
        },
    }
}

/// A self-signed certificate for `names`, written as PEM files into `dir`;
/// returns the certificate and key paths and the certificate in DER.
pub fn self_signed_for(
    dir: &Path,
    names: &[&str],
) -> (PathBuf, PathBuf, rustls::pki_types::CertificateDer<'static>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params");
    let cert = params.self_signed(&key).expect("cert");
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).expect("write cert");
    std::fs::write(&k, key.serialize_pem()).expect("write key");
    (c, k, cert.der().clone())
}

/// A TCP relay to `upstream` that can be cut like a network link: cut, it
/// forwards nothing and answers nothing (connections stall, as behind a
/// dropped route), until it is healed.
pub struct Link {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    pub async fn start(upstream: u16) -> Link {
        use std::sync::atomic::AtomicBool;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cut = std::sync::Arc::new(AtomicBool::new(false));
        let c = cut.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let c = c.clone();
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = server.split();
                    tokio::select! {
                        _ = pump(&mut cr, &mut sw, &c) => {}
                        _ = pump(&mut sr, &mut cw, &c) => {}
                    }
                });
            }
        });
        Link { port, cut, task }
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Copies `r` to `w` until either ends, holding the bytes while `cut`.
async fn pump(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    cut: &std::sync::atomic::AtomicBool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16384];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while cut.load(std::sync::atomic::Ordering::Relaxed) {
            // Cut: hold the bytes, like a dead route.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EtcdServer {
    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// A cluster store seen through a network the test controls, for one
/// client (a proxy's follower):
/// - [`FaultyStore::cut`] cuts that client off, as a partition does: each
///   request hangs for the store's request timeout and then fails, and open
///   watches go silent;
/// - [`FaultyStore::replay`] delivers an old event on the open watches
///   after the newer ones, as a lagging etcd member does when it catches up
///   (or as a queued event does when a poll overtook it).
#[derive(Clone)]
pub struct FaultyStore {
    inner: cluster::AnyStore,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    watches: std::sync::Arc<
        std::sync::Mutex<
            Vec<tokio::sync::mpsc::Sender<cluster::store::Result<cluster::WatchEvent>>>,
        >,
    >,
}

impl FaultyStore {
    pub fn new(inner: cluster::AnyStore) -> Self {
        FaultyStore {
            inner,
            cut: Default::default(),
            watches: Default::default(),
        }
    }

    /// Cuts the client off from the store (`true`) or heals (`false`).
    pub fn cut(&self, off: bool) {
        self.cut.store(off, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_cut(&self) -> bool {
        self.cut.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits out the request timeout while cut off; then fails.
    async fn reach(&self) -> cluster::store::Result<()> {
        if self.is_cut() {
            tokio::time::sleep(cluster::store::REQUEST_TIMEOUT).await;
            return Err(cluster::StoreError::Unavailable(
                "cut off from the store by the test".into(),
            ));
        }
        Ok(())
    }

    /// Delivers `event` to every open watch.
    pub async fn replay(&self, event: cluster::WatchEvent) {
        let senders: Vec<_> = self.watches.lock().unwrap().clone();
        for s in senders {
            let _ = s.send(Ok(event.clone())).await;
        }
    }
}

impl cluster::Store for FaultyStore {
    async fn get(&self, key: &str) -> cluster::store::Result<Option<cluster::KeyValue>> {
        self.reach().await?;
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> cluster::store::Result<(Vec<cluster::KeyValue>, i64)> {
        self.reach().await?;
        self.inner.list(prefix).await
    }
    async fn put_if_revision(
        &self,
        key: &str,
        value: &str,
        expected: i64,
        lease: cluster::LeaseId,
    ) -> cluster::store::Result<cluster::Cas> {
        self.reach().await?;
        self.inner
            .put_if_revision(key, value, expected, lease)
            .await
    }
    async fn put(
        &self,
        key: &str,
        value: &str,
        lease: cluster::LeaseId,
    ) -> cluster::store::Result<i64> {
        self.reach().await?;
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, key: &str) -> cluster::store::Result<bool> {
        self.reach().await?;
        self.inner.delete(key).await
    }
    async fn delete_if_revision(&self, key: &str, expected: i64) -> cluster::store::Result<bool> {
        self.reach().await?;
        self.inner.delete_if_revision(key, expected).await
    }
    async fn watch(&self, prefix: &str, revision: i64) -> cluster::store::Result<cluster::Watch> {
        self.reach().await?;
        let mut upstream = self.inner.watch(prefix, revision).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        self.watches.lock().unwrap().push(tx.clone());
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(ev) = upstream.recv().await {
                // Cut off: the events never arrive.
                if !me.is_cut() && tx.send(ev).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
    async fn grant(&self, ttl: Duration) -> cluster::store::Result<cluster::LeaseId> {
        self.reach().await?;
        self.inner.grant(ttl).await
    }
    async fn keep_alive(&self, lease: cluster::LeaseId) -> cluster::store::Result<()> {
        self.reach().await?;
        self.inner.keep_alive(lease).await
    }
    async fn revoke(&self, lease: cluster::LeaseId) -> cluster::store::Result<()> {
        self.reach().await?;
        self.inner.revoke(lease).await
    }
}

/// The registration a proxy has in the store, typed.
pub async fn registration(
    store: &cluster::AnyStore,
    keys: &cluster::Keys,
    uid: &str,
) -> Option<(cluster::data::ProxyReport, cluster::LeaseId)> {
    use cluster::Store;
    let kv = store
        .get(&keys.proxy(uid))
        .await
        .expect("read registration")?;
    let report = serde_json::from_str(&kv.value).expect("a ProxyReport");
    Some((report, kv.lease))
}

/// Changes the cluster spec by compare-and-swap, as `keelson ctl spec
/// update` does.
pub async fn update_spec(
    store: &cluster::AnyStore,
    keys: &cluster::Keys,
    change: impl Fn(&mut cluster::ClusterSpec),
) {
    use cluster::{Cas, Store};
    loop {
        let kv = store
            .get(&keys.clusterdata())
            .await
            .expect("read")
            .expect("clusterdata exists");
        let mut data = cluster::ClusterData::from_json(&kv.value).expect("valid");
        change(&mut data.spec);
        if let Cas::Done(_) = store
            .put_if_revision(&keys.clusterdata(), &data.to_json(), kv.mod_revision, 0)
            .await
            .expect("cas")
        {
            return;
        }
    }
}

/// GET `path` from an admin listener at `addr`: (status, body).
pub async fn admin_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A minimal frontend over one TCP connection (trust authentication), for
/// tests that need the cancel key or byte-exact startup parameters, which
/// tokio-postgres does not expose.
pub struct RawSession {
    pub stream: tokio::net::TcpStream,
    pub pid: u32,
    pub secret: Vec<u8>,
}

impl RawSession {
    /// Sends `startup` (a whole StartupMessage) and reads until ReadyForQuery.
    pub async fn start(addr: SocketAddr, startup: &[u8]) -> Result<RawSession, String> {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(startup).await.map_err(|e| e.to_string())?;
        let mut s = RawSession {
            stream,
            pid: 0,
            secret: Vec::new(),
        };
        s.until_ready().await?;
        Ok(s)
    }

    /// Reads messages until ReadyForQuery; an ErrorResponse's SQLSTATE is
    /// the error.
    async fn until_ready(&mut self) -> Result<(), String> {
        use tokio::io::AsyncReadExt;
        let mut error = None;
        loop {
            let mut head = [0u8; 5];
            self.stream
                .read_exact(&mut head)
                .await
                .map_err(|e| format!("read: {e}"))?;
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0u8; len.saturating_sub(4)];
            self.stream
                .read_exact(&mut body)
                .await
                .map_err(|e| format!("read: {e}"))?;
            match head[0] {
                b'K' if body.len() >= 8 => {
                    self.pid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    self.secret = body[4..].to_vec();
                }
                b'E' => {
                    let mut whole = head.to_vec();
                    whole.extend_from_slice(&body);
                    let (severity, code, _) = parse_error(&whole).unwrap_or_default();
                    // A FATAL ends the connection: no ReadyForQuery follows.
                    if severity == "FATAL" {
                        return Err(code);
                    }
                    error = Some(code);
                }
                b'Z' => return error.map_or(Ok(()), Err),
                _ => {}
            }
        }
    }

    /// Runs one simple query; Err carries the SQLSTATE of its error.
    pub async fn query(&mut self, sql: &str) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        self.stream
            .write_all(&m)
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.until_ready().await
    }

    /// The CancelRequest packet for this session.
    pub fn cancel_packet(&self) -> Vec<u8> {
        let mut p = ((12 + self.secret.len()) as u32).to_be_bytes().to_vec();
        p.extend_from_slice(&80877102u32.to_be_bytes());
        p.extend_from_slice(&self.pid.to_be_bytes());
        p.extend_from_slice(&self.secret);
        p
    }
}

/// Sends a CancelRequest to `addr` and, as libpq's `PQcancel` does, waits
/// until the server closes the connection: PostgreSQL closes it only after
/// it has signalled the backend. Returns how long the close took.
pub async fn cancel_like_libpq(addr: SocketAddr, packet: &[u8]) -> Duration {
    use tokio::io::AsyncWriteExt;
    let t = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(packet).await.unwrap();
    let (_, closed) = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "the cancel connection was not closed within 10 s");
    t.elapsed()
}

/// A StartupMessage with parameters given as bytes.
pub fn startup_packet_bytes(minor: u16, params: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&3u16.to_be_bytes());
    body.extend_from_slice(&minor.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k);
        body.push(0);
        body.extend_from_slice(v);
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

/// Waits until `n` sessions on `pg` are running exactly `query`.
pub async fn wait_until_running(pg: &PgServer, query: &str, n: i64, limit: Duration) {
    let direct = pg.superuser().await;
    crate::assert_eventually!(
        direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'",
                &[&query],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == n)
            .unwrap_or(false),
        limit,
        "{n} sessions never ran {query:?} at once"
    );
}
