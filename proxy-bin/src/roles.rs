//! `keelson keeper`, `keelson sentinel` and `keelson demo`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cluster::{Cas, ClusterData, ClusterSpec, Keys, Store};

pub use crate::args::ClusterArgs;

#[derive(Debug, Clone, clap::Args)]
pub struct KeeperArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// This keeper's name, unique in the cluster.
    #[arg(long, env = "KEELSON_UID")]
    pub uid: String,
    /// Directory for PostgreSQL's data and the keeper's state.
    #[arg(long, env = "KEELSON_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address PostgreSQL listens on, as HOST:PORT.
    #[arg(long, env = "KEELSON_PG_LISTEN")]
    pub pg_listen: String,
    /// Directory of PostgreSQL's programs [default: pg_config --bindir, else PATH].
    #[arg(long, env = "KEELSON_PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,
    /// Account standbys replicate as; created with SCRAM on a new primary.
    #[arg(long, env = "KEELSON_PG_REPL_USERNAME", default_value = "keelson_repl")]
    pub pg_repl_username: String,
    /// Its password (prefer --pg-repl-password-file or the environment:
    /// arguments are visible to every local user).
    #[arg(long, env = "KEELSON_PG_REPL_PASSWORD", hide_env_values = true)]
    pub pg_repl_password: Option<String>,
    /// File holding its password (the first line is used).
    #[arg(
        long,
        env = "KEELSON_PG_REPL_PASSWORD_FILE",
        conflicts_with = "pg_repl_password"
    )]
    pub pg_repl_password_file: Option<PathBuf>,
    /// Tag: preferred at failover among equally advanced standbys (higher
    /// first). Any tag flag sets all four tags (the others to their
    /// defaults) whenever it changes; without one, `keelson ctl keeper UID
    /// set` manages them.
    #[arg(long, env = "KEELSON_PRIORITY", allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Tag: never promote this keeper's database.
    #[arg(long, env = "KEELSON_NEVER_PRIMARY")]
    pub never_primary: bool,
    /// Tag: never choose this keeper's database as a synchronous standby.
    #[arg(long, env = "KEELSON_NO_SYNC")]
    pub no_sync: bool,
    /// Tag: proxies send this keeper's database no replica sessions.
    #[arg(long, env = "KEELSON_NO_LOADBALANCE")]
    pub no_loadbalance: bool,
    /// Server certificate (PEM) for this keeper's PostgreSQL: turns on TLS
    /// for its clients and requires it for replication (with
    /// --pg-ssl-key-file). Renewed files at the same paths are picked up.
    #[arg(long, env = "KEELSON_PG_SSL_CERT_FILE", requires = "pg_ssl_key_file")]
    pub pg_ssl_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "KEELSON_PG_SSL_KEY_FILE", requires = "pg_ssl_cert_file")]
    pub pg_ssl_key_file: Option<PathBuf>,
    /// CA (PEM) that signed the other keepers' server certificates: this
    /// keeper's replication, pg_basebackup and pg_rewind connections check
    /// them (verify-full) instead of only encrypting (require).
    #[arg(long, env = "KEELSON_PG_SSL_CA_FILE", requires = "pg_ssl_cert_file")]
    pub pg_ssl_ca_file: Option<PathBuf>,
    /// Address of the node API (health checks for load balancers and
    /// probes, /status, /metrics; docs/api.md), as HOST:PORT. 8008 is the
    /// usual port (Patroni's).
    #[arg(long, env = "KEELSON_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// Where the other keepers and the proxies reach this node API
    /// (HOST:PORT), for the store-outage failsafe [default: the
    /// --api-listen address; with an unspecified IP, the --pg-listen host
    /// and the --api-listen port].
    #[arg(long, env = "KEELSON_API_ADVERTISE", requires = "api_listen")]
    pub api_advertise: Option<String>,
    /// On SIGTERM, if this keeper's PostgreSQL is the primary, ask for a
    /// switchover and wait up to this long for it to finish before stopping
    /// PostgreSQL (clients through the proxy are held, not refused). Set it
    /// a few seconds below the time the service manager waits (Kubernetes:
    /// `terminationGracePeriodSeconds`). 0 stops at once, as before.
    /// A second SIGTERM or SIGINT stops at once.
    #[arg(long, env = "KEELSON_STOP_SWITCHOVER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "0s")]
    pub stop_switchover_timeout: std::time::Duration,
    /// Run a pgBackRest TLS server here (HOST:PORT, reachable from the
    /// other keepers' hosts) while the spec's backup tool is pgbackrest:
    /// a standby's keeper takes `ctl backup --from-standby` through the
    /// primary's. Needs the --pg-ssl-* files with a CA: the server and the
    /// clients present the keepers' certificates (docs/backup.md).
    #[arg(long, env = "KEELSON_PGBACKREST_LISTEN", requires = "pg_ssl_ca_file")]
    pub pgbackrest_listen: Option<String>,
}

impl KeeperArgs {
    /// The tags the flags set, if any tag flag was given.
    fn tags(&self) -> Option<cluster::data::Tags> {
        let any =
            self.priority.is_some() || self.never_primary || self.no_sync || self.no_loadbalance;
        any.then(|| cluster::data::Tags {
            priority: self.priority.unwrap_or(0),
            never_primary: self.never_primary,
            no_sync: self.no_sync,
            no_loadbalance: self.no_loadbalance,
        })
    }

    fn replication(&self) -> Result<keeper::Replication> {
        let password = match (&self.pg_repl_password, &self.pg_repl_password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("cannot read --pg-repl-password-file {}", f.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            (None, None) => bail!(
                "the replication account needs a password: set --pg-repl-password-file FILE \
                 or KEELSON_PG_REPL_PASSWORD, the same on every keeper of the cluster"
            ),
        };
        if password.is_empty() {
            bail!("the replication password is empty");
        }
        if self.pg_repl_username.is_empty() || self.pg_repl_username == "postgres" {
            bail!(
                "--pg-repl-username must name a dedicated account, not {:?}",
                self.pg_repl_username
            );
        }
        Ok(keeper::Replication {
            user: self.pg_repl_username.clone(),
            password,
        })
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct SentinelArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// This sentinel's name [default: sentinel-<hostname>-<pid>].
    #[arg(long, env = "KEELSON_UID")]
    pub uid: Option<String>,
    /// Address of the node API (/health, /leader, /cluster, /metrics;
    /// docs/api.md), as HOST:PORT. 8009 is the usual port.
    #[arg(long, env = "KEELSON_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo's store and data [default: a new temporary directory].
    #[arg(long, env = "KEELSON_DIR")]
    pub dir: Option<PathBuf>,
    /// Number of keepers (PostgreSQL instances).
    #[arg(long, env = "KEELSON_KEEPERS", default_value_t = 2)]
    pub keepers: usize,
    /// Address of the proxy.
    #[arg(long, env = "KEELSON_LISTEN", default_value = crate::config::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Address of the proxy's replica route [default: the next port].
    #[arg(long, env = "KEELSON_REPLICA_LISTEN")]
    pub replica_listen: Option<SocketAddr>,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn keeper(args: KeeperArgs) -> Result<()> {
    keeper::validate_uid(&args.uid).map_err(|e| anyhow::anyhow!("--uid: {e}"))?;
    let (host, port) = args
        .pg_listen
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .with_context(|| {
            format!(
                "--pg-listen {:?} must be HOST:PORT, such as 127.0.0.1:5433",
                args.pg_listen
            )
        })?;
    let replication = args.replication()?;
    let node = std::sync::Arc::new(keeper::node::NodeState::new(&args.uid));
    let tls = match (&args.pg_ssl_cert_file, &args.pg_ssl_key_file) {
        (Some(cert), Some(key)) => Some(keeper::pg::PgTls {
            cert: cert.clone(),
            key: key.clone(),
            ca: args.pg_ssl_ca_file.clone(),
        }),
        _ => None,
    };
    let api_address = args.api_advertise.clone().or_else(|| {
        args.api_listen.map(|a| {
            if a.ip().is_unspecified() {
                format!("{host}:{}", a.port())
            } else {
                a.to_string()
            }
        })
    });
    let cfg = keeper::run::KeeperConfig {
        api_address,
        pgbackrest_listen: args.pgbackrest_listen.clone(),
        tls,
        node: node.clone(),
        tags: args.tags(),
        replication,
        uid: args.uid,
        dir: args.data_dir,
        host,
        port,
        pg_bin_dir: args.pg_bin_dir,
        guard: std::env::current_exe()
            .ok()
            .map(|exe| (exe, vec!["keeper-guard".to_owned()])),
    };
    // Two workers: the lease renewal goes on while the reconcile loop
    // waits on (or blocks in) PostgreSQL work.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        if let Some(addr) = args.api_listen {
            let l = crate::http::bind(addr, "--api-listen").await?;
            tracing::info!(%addr, "node API listening");
            let node = node.clone();
            let handler: crate::http::Handler = std::sync::Arc::new(move |req| {
                let a = match req.path.as_str() {
                    cluster::node_api::FAILSAFE_PROMISE_PATH => {
                        keeper::failsafe::promise(&node, &req.method, &req.query)
                    }
                    cluster::node_api::FAILSAFE_ROUTE_PATH => keeper::failsafe::route(&node),
                    _ => keeper::node::answer(
                        &node.snapshot(),
                        &req.path,
                        &req.query,
                        std::time::Instant::now(),
                    ),
                };
                Box::pin(async move { crate::http::Response::new(a.status, a.content_type, a.body) })
            });
            tokio::spawn(crate::http::serve(l, handler));
        }
        let store = args.cluster.open().await?;
        let keys = args.cluster.keys();
        let (uid, limit) = (cfg.uid.clone(), args.stop_switchover_timeout);
        let reload = move || match reparse() {
            Ok(crate::Command::Keeper(new)) => {
                node.set_flag_tags(new.tags());
                tracing::info!(tags = ?new.tags(), "SIGHUP: tags reloaded; other settings take effect at the next start");
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %format!("{e:#}"), "SIGHUP: the configuration does not load; keeping the running one"),
        };
        let run = keeper::run::run(cfg, store.clone(), keys.clone());
        tokio::pin!(run);
        let signal = tokio::select! {
            r = &mut run => return Ok(r?),
            _ = hangups(reload) => return Ok(()),
            s = crate::shutdown_signal() => s?,
        };
        if !limit.is_zero() {
            // The keeper goes on running (it carries out its own demotion)
            // while the switchover is asked for and awaited.
            tokio::select! {
                r = &mut run => return Ok(r?),
                s = crate::shutdown_signal() => {
                    tracing::warn!(signal = s?, "second signal: stopping without waiting for the switchover");
                }
                () = switch_over_before_stopping(&store, &keys, &uid, limit) => {}
            }
        }
        tracing::info!(signal, "keeper stopping; PostgreSQL stops with it");
        anyhow::Ok(())
    })
}

/// On SIGTERM: if `uid` is the primary, a switchover away from it, awaited
/// for up to `limit`; what happened is logged, never an error (the keeper
/// stops either way).
async fn switch_over_before_stopping(
    store: &cluster::AnyStore,
    keys: &cluster::Keys,
    uid: &str,
    limit: std::time::Duration,
) {
    let started = std::time::Instant::now();
    match crate::ctl::switchover_from(store, keys, uid, limit).await {
        Ok(None) => tracing::info!("SIGTERM: not the primary; no switchover needed"),
        Ok(Some(to)) => tracing::info!(
            to,
            secs = started.elapsed().as_secs_f64(),
            "SIGTERM: switched over before stopping"
        ),
        Err(e) => tracing::warn!(
            error = %format!("{e:#}"),
            "SIGTERM: no switchover before stopping; the sentinel fails over once this keeper is gone"
        ),
    }
}

pub fn sentinel(args: SentinelArgs) -> Result<()> {
    let uid = args
        .uid
        .unwrap_or_else(|| crate::config::default_uid().replacen("proxy", "sentinel", 1));
    let node = std::sync::Arc::new(sentinel::run::SentinelNode::new(&uid));
    runtime()?.block_on(async {
        let store = args.cluster.open().await?;
        if let Some(addr) = args.api_listen {
            let l = crate::http::bind(addr, "--api-listen").await?;
            tracing::info!(%addr, "node API listening");
            tokio::spawn(crate::http::serve(
                l,
                sentinel_api(node.clone(), store.clone(), args.cluster.keys()),
            ));
        }
        let reload = || match reparse() {
            Ok(_) => tracing::info!("SIGHUP: a sentinel has nothing to reload; changed settings take effect at the next start"),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "SIGHUP: the configuration does not load"),
        };
        tokio::select! {
            _ = sentinel::run::run(store, args.cluster.keys(), uid, node) => {}
            _ = hangups(reload) => {}
            s = crate::shutdown_signal() => tracing::info!(signal = s?, "sentinel stopping"),
        }
        anyhow::Ok(())
    })
}

/// The command line, environment and configuration file, read again.
fn reparse() -> Result<crate::Command> {
    Ok(crate::args::parse(std::env::args_os().collect())?.command)
}

/// Calls `f` at every SIGHUP (which would otherwise end the process).
async fn hangups(f: impl Fn()) {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            while hup.recv().await.is_some() {
                f();
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGHUP"),
    }
    std::future::pending::<()>().await
}

/// The sentinel's node API: `/health`, `/leader`, `/cluster` (what `ctl
/// status --json` prints) and `/metrics`.
fn sentinel_api(
    node: std::sync::Arc<sentinel::run::SentinelNode>,
    store: cluster::AnyStore,
    keys: Keys,
) -> crate::http::Handler {
    use crate::http::Response;
    std::sync::Arc::new(move |req| {
        let (node, store, keys) = (node.clone(), store.clone(), keys.clone());
        Box::pin(async move {
            let now = std::time::Instant::now();
            let json = |ok: bool| {
                Response::new(
                    if ok { 200 } else { 503 },
                    "application/json",
                    node.status_json(now),
                )
            };
            match req.path.as_str() {
                "/health" | "/readiness" => json(node.is_healthy(now)),
                // Never fails only because the store is down: restarting
                // the sentinel would not bring it back.
                "/liveness" => json(node.is_alive(now)),
                "/leader" => json(node.is_leader(now)),
                "/status" | "/" => json(true),
                "/metrics" => Response::new(200, "text/plain; version=0.0.4", node.metrics_text(now)),
                "/cluster" => match cluster::status::read(&store, &keys).await {
                    Ok(s) => Response::new(
                        200,
                        "application/json",
                        serde_json::to_string(&s).unwrap_or_default(),
                    ),
                    Err(e) => Response::new(503, "text/plain", format!("{e}\n")),
                },
                _ => Response::new(
                    404,
                    "text/plain",
                    "not found; the endpoints are /health, /leader, /cluster, /status and /metrics\n",
                ),
            }
        })
    })
}

struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        // Signal all first so they stop in parallel, then wait for each.
        for (_, c) in &self.0 {
            // SAFETY: signalling our own children.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        for (name, c) in &mut self.0 {
            if !keeper::process::terminate(c, libc::SIGTERM, Duration::from_secs(15)) {
                eprintln!("demo: {name} did not stop in time and was killed");
            }
        }
    }
}

/// The demo's replication password: random, kept in `DIR/repl-password`
/// (mode 0600) so that a restarted demo reuses it.
fn demo_password(dir: &std::path::Path) -> Result<String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("repl-password");
    if !path.exists() {
        let mut bytes = [0u8; 18];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&path)?
            .write_all(format!("{hex}\n").as_bytes())?;
    }
    Ok(path.display().to_string())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A whole local cluster on the file store: one sentinel, N keepers and one
/// proxy, each a child process of this binary so that each can be killed
/// alone.
pub fn demo(args: DemoArgs) -> Result<()> {
    if args.keepers == 0 {
        bail!("--keepers must be at least 1");
    }
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("keelson-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
        // PostgreSQL runs as `postgres`; it must reach its directories.
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
    }
    let store_url = format!("file://{}", dir.join("store").display());
    let password_file = demo_password(&dir)?;
    let exe = std::env::current_exe()?;
    let rt = runtime()?;
    let keys = Keys::new(cluster::store::DEFAULT_PREFIX, "demo");
    let store = rt.block_on(cluster::open(&store_url))?;
    let created = rt.block_on(store.put_if_revision(
        &keys.clusterdata(),
        &ClusterData::new(ClusterSpec::default()).to_json(),
        0,
        0,
    ))?;
    println!("keelson demo in {}", dir.display());
    if let Cas::Conflict(_) = created {
        println!("  reusing the existing cluster");
    }
    let log = |name: &str| -> Result<Stdio> {
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))?
            .into())
    };
    let common = ["--store", &store_url, "--cluster", "demo"];
    let mut children = Children(Vec::new());
    let spawn = |name: &str, args: &[&str], children: &mut Children| -> Result<()> {
        // The demo's roles get every setting as a flag; a config file
        // meant for the demo command is not theirs.
        let c = Command::new(&exe)
            .args(args)
            .env_remove("KEELSON_CONFIG")
            .stdout(log(name)?)
            .stderr(log(name)?)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        println!(
            "  started {name} (pid {}, log {}/{name}.log)",
            c.id(),
            dir.display()
        );
        children.0.push((name.to_owned(), c));
        Ok(())
    };
    let mut sargs = vec!["sentinel", "--uid", "sentinel-1"];
    sargs.extend(common);
    spawn("sentinel", &sargs, &mut children)?;
    for i in 1..=args.keepers {
        let uid = format!("keeper{i}");
        let port = free_port()?.to_string();
        let data = dir.join(&uid).display().to_string();
        let listen = format!("127.0.0.1:{port}");
        let mut kargs = vec![
            "keeper",
            "--uid",
            &uid,
            "--data-dir",
            &data,
            "--pg-listen",
            &listen,
            "--pg-repl-password-file",
            &password_file,
        ];
        kargs.extend(common);
        spawn(&uid, &kargs, &mut children)?;
    }
    let listen = args.listen.to_string();
    let replica_listen = args
        .replica_listen
        .unwrap_or_else(|| SocketAddr::new(args.listen.ip(), args.listen.port().wrapping_add(1)));
    let replica = replica_listen.to_string();
    let mut pargs = vec![
        "proxy",
        "--listen",
        &listen,
        "--replica-listen",
        &replica,
        "--uid",
        "proxy-1",
    ];
    pargs.extend(common);
    spawn("proxy", &pargs, &mut children)?;

    println!("waiting for the cluster to elect its first primary...");
    let status = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(s) = cluster::status::read(&store, &keys).await {
                if s.master.is_some() && s.healthy_keepers() >= args.keepers {
                    return Ok(s);
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the cluster did not come up within 2 minutes; see the logs in {}",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })?;
    println!();
    println!("{}", serde_json::to_string_pretty(&status)?);
    println!();
    println!("The cluster is up. Connect through the proxy:");
    println!(
        "  psql 'host={} port={} user=postgres dbname=postgres'",
        args.listen.ip(),
        args.listen.port()
    );
    if args.keepers > 1 {
        println!("Read-only sessions on a standby:");
        println!(
            "  psql 'host={} port={} user=postgres dbname=postgres'",
            replica_listen.ip(),
            replica_listen.port()
        );
    }
    println!("Status: keelson ctl --store {store_url} --cluster demo status");
    println!("Press Ctrl-C to stop everything.");
    let signal = rt.block_on(crate::shutdown_signal())?;
    println!("{signal}: stopping the demo...");
    drop(children);
    Ok(())
}
