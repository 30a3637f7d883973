//! One local PostgreSQL instance: its binaries, its data directory, the
//! configuration keelson manages, the supervised `postgres` process, and the
//! queries that tell what it is doing.
//!
//! PostgreSQL refuses to run as root. When the keeper runs as root, every
//! PostgreSQL program runs as the `postgres` account (setuid/setgid on the
//! child) and the data directory belongs to that account.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cluster::data::KeeperReport;
use tokio::process::{Child, Command};
use tokio_postgres::{Client, NoTls};

/// Why an operation on PostgreSQL failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("PostgreSQL binaries not found: {0}")]
    Binaries(String),
    #[error("{program} failed: {detail}")]
    Program { program: String, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("PostgreSQL did not accept connections within {0:?}; see its log at {1}")]
    NotReady(Duration, String),
    #[error("query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("PostgreSQL did not answer {0} within {1:?}")]
    Timeout(&'static str, Duration),
}

/// Runs `f`, failing with [`PgError::Timeout`] after `limit`: a hung
/// PostgreSQL (stopped, stuck on I/O) must never hang the keeper, whose
/// statement_timeout it would not enforce.
async fn within<T>(
    what: &'static str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| PgError::Timeout(what, limit))?
}

/// How long one of the keeper's own statements may take.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

pub type Result<T> = std::result::Result<T, PgError>;

/// Where PostgreSQL's programs are.
#[derive(Debug, Clone)]
pub struct PgBin {
    dir: Option<PathBuf>,
}

impl PgBin {
    /// `dir` if given; else `pg_config --bindir` when it holds `initdb`;
    /// else the programs on PATH.
    pub fn find(dir: Option<PathBuf>) -> Result<Self> {
        if let Some(d) = dir {
            if !d.join("postgres").exists() {
                return Err(PgError::Binaries(format!("no postgres in {}", d.display())));
            }
            return Ok(PgBin { dir: Some(d) });
        }
        if let Ok(out) = std::process::Command::new("pg_config")
            .arg("--bindir")
            .output()
        {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if d.join("initdb").exists() {
                return Ok(PgBin { dir: Some(d) });
            }
        }
        Ok(PgBin { dir: None })
    }

    fn program(&self, name: &str) -> PathBuf {
        match &self.dir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        }
    }
}

/// The `postgres` account's uid and gid when running as root.
pub fn unprivileged_ids() -> Option<(u32, u32)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let f: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))?
        .split(':')
        .collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

/// The account standbys stream WAL as, and pg_rewind reads a new primary
/// as. It is created on a new primary with SCRAM authentication; the
/// superuser is never reachable over TCP for replication.
#[derive(Clone)]
pub struct Replication {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// TLS for this keeper's PostgreSQL: its server certificate and key, and
/// the CA that signed the other keepers' certificates. With it, the server
/// runs `ssl = on`, replication and pg_rewind connections to it must use
/// TLS (`hostssl`), and this keeper's standby, pg_basebackup and pg_rewind
/// connections check the upstream's certificate (`verify-full` against the
/// CA; `require` without one). The files are copied into the keeper's
/// directory, owned by the server's account, and copied again and the
/// server reloaded when they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
}

/// Where a standby streams from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `host:port` of the database followed.
    pub address: String,
    /// Shown as `application_name` in the primary's `pg_stat_replication`,
    /// and named in `synchronous_standby_names`.
    pub application_name: String,
    /// The replication slot the primary keeps for this standby.
    pub slot: Option<String>,
}

pub use crate::names::{slot_name, SLOT_PREFIX};

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// An SQL string literal (standard_conforming_strings is on).
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `host:port` split in two; the port defaults to 5432.
fn host_port(address: &str) -> (&str, &str) {
    split_address(address).unwrap_or((address, "5432"))
}

/// `host:port` (or `[v6]:port`) split, the host without brackets, as
/// libpq and pgBackRest take it; `None` without a port.
pub(crate) fn split_address(address: &str) -> Option<(&str, &str)> {
    let (host, port) = address.rsplit_once(':')?;
    Some((host.trim_start_matches('[').trim_end_matches(']'), port))
}

/// One value of a libpq connection string, quoted.
fn conninfo_value(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// One PostgreSQL instance managed by a keeper.
#[derive(Debug)]
pub struct Instance {
    bin: PgBin,
    repl: Replication,
    /// The keeper's directory: `pgdata/`, the socket and the log live here.
    dir: PathBuf,
    pub host: String,
    pub port: u16,
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
    /// A postmaster found running on the data directory when the keeper
    /// started (its previous keeper died), adopted instead of started.
    adopted: Option<u32>,
    tls: Option<PgTls>,
    /// A standby cluster's source, when this instance leads it: connections
    /// to its address use its account and TLS settings, not keelson's.
    source: Option<cluster::data::StandbySource>,
}

/// How long the status queries of one report may take.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// Name of the file with keelson's managed parameters, included from
/// postgresql.conf; keelson's own parameters win over user ones.
const MANAGED_CONF: &str = "keelson.conf";

impl Instance {
    pub fn new(
        bin: PgBin,
        dir: impl Into<PathBuf>,
        host: &str,
        port: u16,
        repl: Replication,
    ) -> Self {
        Instance {
            bin,
            repl,
            dir: dir.into(),
            host: host.to_owned(),
            port,
            run_as: unprivileged_ids(),
            child: None,
            adopted: None,
            tls: None,
            source: None,
        }
    }

    /// Connections to `source`'s address (a standby cluster's leader
    /// following it) use its account and TLS settings.
    pub fn set_source(&mut self, source: Option<cluster::data::StandbySource>) {
        self.source = source;
    }

    /// The standby cluster's source, if `address` is its address.
    fn source_at(&self, address: &str) -> Option<&cluster::data::StandbySource> {
        self.source.as_ref().filter(|s| s.address() == address)
    }

    /// A password file for the source's account, from the spec's
    /// `password_file` (read at every use).
    ///
    /// A keeper running as root reads only a file the PostgreSQL account
    /// could read itself: the spec (anyone who may write the store) must
    /// not make it send a root-only file to the host the spec names.
    fn source_passfile(&self, s: &cluster::data::StandbySource) -> Result<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let refuse = |why: String| PgError::Program {
            program: "keeper".into(),
            detail: format!(
                "the standby source's password_file {}: {why}",
                s.password_file
            ),
        };
        let meta = std::fs::metadata(&s.password_file).map_err(|e| refuse(e.to_string()))?;
        if let Some((uid, gid)) = self.run_as {
            let mode = meta.mode();
            let readable = (meta.uid() == uid && mode & 0o400 != 0)
                || (meta.gid() == gid && mode & 0o040 != 0)
                || mode & 0o004 != 0;
            if !readable {
                return Err(refuse(
                    "the PostgreSQL account cannot read it; keelson reads it only as that account could".into(),
                ));
            }
        }
        let text = std::fs::read_to_string(&s.password_file).map_err(|e| refuse(e.to_string()))?;
        let password = text.strip_suffix('\n').unwrap_or(&text);
        let password = password.strip_suffix('\r').unwrap_or(password);
        if password.contains(['\n', '\r']) || password.is_empty() {
            return Err(refuse("it must hold the password on one line".into()));
        }
        self.write_passfile("source-pgpass", &s.user, password)
    }

    /// Runs the server with TLS (see [`PgTls`]).
    pub fn set_tls(&mut self, tls: Option<PgTls>) {
        self.tls = tls;
    }

    fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// Copies the TLS files into the keeper's directory where they differ
    /// from the copies there (the key readable by the server's account
    /// only); whether anything changed.
    pub fn install_tls(&self) -> Result<bool> {
        use std::os::unix::fs::OpenOptionsExt;
        let Some(tls) = &self.tls else {
            return Ok(false);
        };
        let dir = self.tls_dir();
        std::fs::create_dir_all(&dir)?;
        self.chown(&dir)?;
        let mut changed = false;
        let files = [
            (Some(&tls.cert), "server.crt"),
            (Some(&tls.key), "server.key"),
            (tls.ca.as_ref(), "ca.crt"),
        ];
        for (src, name) in files {
            let Some(src) = src else { continue };
            let bytes = std::fs::read(src).map_err(|e| PgError::Program {
                program: "keeper".into(),
                detail: format!("cannot read the TLS file {}: {e}", src.display()),
            })?;
            let dst = dir.join(name);
            if std::fs::read(&dst).ok().as_deref() == Some(&bytes[..]) {
                continue;
            }
            let tmp = dir.join(format!(".{name}.new"));
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            std::io::Write::write_all(&mut f, &bytes)?;
            self.chown(&tmp)?;
            std::fs::rename(&tmp, &dst)?;
            changed = true;
        }
        Ok(changed)
    }

    /// Adopts a postmaster already running on the data directory (left by
    /// a keeper that died), so that this keeper supervises, fences and
    /// stops it instead of starting a second one. Returns its pid.
    pub fn adopt(&mut self) -> Option<u32> {
        if self.child.is_some() {
            return None;
        }
        let pid = crate::postmaster::running_on(&self.data_dir())?;
        tracing::warn!(
            pid,
            "adopting the PostgreSQL already running on the data directory"
        );
        self.adopted = Some(pid);
        Some(pid)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("pgdata")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn is_initialized(&self) -> bool {
        self.data_dir().join("PG_VERSION").exists()
    }

    /// Whether the data directory is in archive recovery for a restore
    /// (`recovery.signal` without `standby.signal`).
    pub fn is_restoring(&self) -> bool {
        !self.has_standby_signal() && self.data_dir().join("recovery.signal").exists()
    }

    /// Whether the data directory is set up as a standby. An initialized
    /// directory without it has been a primary, and may hold WAL that a new
    /// primary never saw.
    pub fn has_standby_signal(&self) -> bool {
        self.data_dir().join("standby.signal").exists()
    }

    /// A PostgreSQL program, run as the `postgres` account when the keeper
    /// is root; killed if the keeper drops it (a hung pg_basebackup), but
    /// see [`Instance::start`] for the server itself.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.program(program));
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
            c.env("HOME", &self.dir);
        }
        c.env("LC_ALL", "C");
        c.kill_on_drop(program != "postgres");
        c
    }

    /// Writes pgBackRest's configuration for this instance when the spec
    /// archives with it (with its log, lock and spool directories, owned
    /// by the account PostgreSQL runs as), and removes it otherwise.
    pub fn write_backup_config(&self, spec: &cluster::data::BackupSpec) -> Result<()> {
        let path = self.dir.join(crate::backup::PGBACKREST_CONF);
        let Some(conf) = crate::backup::pgbackrest_conf(spec, &self.dir, self.port) else {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => return Ok(()),
            }
        };
        let own = self.dir.join("pgbackrest");
        for d in [
            own.clone(),
            own.join("log"),
            own.join("lock"),
            own.join("spool"),
        ] {
            std::fs::create_dir_all(&d)?;
            self.chown(&d)?;
        }
        if std::fs::read_to_string(&path).ok().as_deref() != Some(conf.as_str()) {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, conf)?;
            self.chown(&tmp)?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }

    /// What runs the backup tool for this instance, off the keeper's loop.
    pub fn tools(&self) -> Tools {
        Tools {
            dir: self.dir.clone(),
            run_as: self.run_as,
        }
    }

    fn chown(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// The replication account's password file (mode 0600), written on
    /// every use so that a changed password takes effect.
    fn passfile(&self) -> Result<PathBuf> {
        self.write_passfile("pgpass", &self.repl.user, &self.repl.password)
    }

    /// Writes a libpq password file `name` in the keeper's directory (mode
    /// 0600, owned by the server's account) for `user` on every host, when
    /// its text changes. Replaced whole: a WAL receiver reading it meanwhile
    /// sees the old file or the new one.
    fn write_passfile(&self, name: &str, user: &str, password: &str) -> Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join(name);
        let esc = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
        let line = format!("*:*:*:{}:{}\n", esc(user), esc(password));
        if std::fs::read_to_string(&path).is_ok_and(|old| old == line) {
            return Ok(path);
        }
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, line.as_bytes())?;
        drop(f);
        self.chown(&tmp)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// A libpq connection string to `address` as the replication account.
    fn repl_conninfo(&self, address: &str) -> Result<String> {
        let (host, port) = host_port(address);
        if let Some(s) = self.source_at(address) {
            let mut tls = String::new();
            if let Some(m) = &s.sslmode {
                tls.push_str(&format!(" sslmode={}", conninfo_value(m)));
            }
            if let Some(ca) = &s.sslrootcert {
                tls.push_str(&format!(" sslrootcert={}", conninfo_value(ca)));
            }
            return Ok(format!(
                "host={} port={} user={} passfile={}{tls}",
                conninfo_value(host),
                conninfo_value(port),
                conninfo_value(&s.user),
                conninfo_value(&self.source_passfile(s)?.to_string_lossy()),
            ));
        }
        let tls = match &self.tls {
            Some(t) if t.ca.is_some() => format!(
                " sslmode=verify-full sslrootcert={}",
                conninfo_value(&self.tls_dir().join("ca.crt").to_string_lossy())
            ),
            Some(_) => " sslmode=require".to_owned(),
            None => String::new(),
        };
        Ok(format!(
            "host={} port={} user={} passfile={}{tls}",
            conninfo_value(host),
            conninfo_value(port),
            conninfo_value(&self.repl.user),
            conninfo_value(&self.passfile()?.to_string_lossy()),
        ))
    }

    async fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await?;
        if !out.status.success() {
            return Err(PgError::Program {
                program: program.to_owned(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        tracing::info!(
            program,
            output = %String::from_utf8_lossy(&out.stdout).trim(),
            messages = %String::from_utf8_lossy(&out.stderr).trim(),
            "done"
        );
        Ok(())
    }

    fn prepare_dir(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        self.chown(&self.dir)?;
        Ok(())
    }

    /// Creates a new primary's data directory (`initdb`), with the
    /// superuser `postgres` trusted on the local socket only.
    pub async fn initdb(&self) -> Result<()> {
        self.prepare_dir()?;
        let data = self.data_dir();
        let data = data.to_string_lossy();
        self.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )
        .await
    }

    /// Restores the data directory from a backup in the spec's repository
    /// (`ctl init --mode pitr`), ready to replay the archive to `target`:
    /// pgBackRest writes `recovery.signal`; the recovery settings it puts
    /// into `postgresql.auto.conf` are taken out again (a standby copied
    /// from this server would inherit them, and stop or promote at the
    /// target), and the keeper writes the target into its own
    /// configuration for as long as the restore runs.
    pub async fn restore(
        &self,
        spec: &cluster::data::BackupSpec,
        target: &cluster::data::RestoreTarget,
    ) -> Result<()> {
        self.prepare_restore(spec)?;
        let mut args = vec![
            "restore".to_owned(),
            format!("--type={}", target.kind),
            format!("--target={}", target.target),
            "--target-action=promote".to_owned(),
        ];
        if let Some(set) = &target.set {
            args.push(format!("--set={set}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.tools()
            .pgbackrest(spec, &args, Duration::from_secs(6 * 3600))
            .await?;
        self.strip_recovery_settings()?;
        tracing::info!(kind = %target.kind, target = %target.target, "restored the backup; PostgreSQL replays the archive to the target");
        Ok(())
    }

    /// An empty data directory (mode 0700, owned by the account PostgreSQL
    /// runs as) and pgBackRest's configuration, for a restore into it.
    fn prepare_restore(&self, spec: &cluster::data::BackupSpec) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        self.prepare_dir()?;
        self.write_backup_config(spec)?;
        let data = self.data_dir();
        std::fs::create_dir_all(&data)?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;
        self.chown(&data)
    }

    /// Creates a standby's data directory from the newest backup in the
    /// spec's repository (`pgbackrest restore --type=standby`); the
    /// recovery settings pgBackRest writes into `postgresql.auto.conf` are
    /// taken out (the keeper's configuration has its own).
    pub async fn restore_standby(&self, spec: &cluster::data::BackupSpec) -> Result<()> {
        self.prepare_restore(spec)?;
        self.tools()
            .pgbackrest(
                spec,
                &["restore", "--type=standby"],
                Duration::from_secs(6 * 3600),
            )
            .await?;
        self.strip_recovery_settings()
    }

    /// Takes the recovery settings out of `postgresql.auto.conf`.
    fn strip_recovery_settings(&self) -> Result<()> {
        let auto = self.data_dir().join("postgresql.auto.conf");
        if let Ok(text) = std::fs::read_to_string(&auto) {
            let kept: String = text
                .lines()
                .filter(|l| {
                    let l = l.trim_start();
                    !(l.starts_with("recovery_target")
                        || l.starts_with("restore_command")
                        || l.starts_with("primary_conninfo"))
                })
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&auto, kept)?;
        }
        Ok(())
    }

    /// Creates a standby's data directory with `pg_basebackup` from
    /// `primary` (`host:port`) as the replication account, streaming WAL
    /// through `slot` (which the primary's keeper creates) when given.
    pub async fn basebackup(&self, primary: &str, slot: Option<&str>) -> Result<()> {
        self.prepare_dir()?;
        let data = self.data_dir();
        let data = data.to_string_lossy();
        let conninfo = self.repl_conninfo(primary)?;
        let mut args = vec![
            "-D",
            &data,
            "-d",
            &conninfo,
            "-w",
            "-X",
            "stream",
            "--no-sync",
            "-c",
            "fast",
        ];
        if let Some(slot) = slot {
            args.extend(["-S", slot]);
        }
        let r = self.run("pg_basebackup", &args).await;
        if r.is_err() {
            // A half-copied directory must not look initialized.
            let _ = self.remove_data();
        }
        r
    }

    /// Whether `address` answers as a primary (out of recovery), asked as
    /// the replication account.
    pub async fn is_primary(&self, address: &str) -> Result<bool> {
        if self.tls.is_some() || self.source_at(address).is_some() {
            // Over TLS, checked as libpq checks it (as pg_rewind will).
            let conninfo = format!(
                "{} dbname=postgres connect_timeout=5",
                self.repl_conninfo(address)?
            );
            let out = within("whether it is a primary", Duration::from_secs(10), async {
                Ok(self
                    .command("psql")
                    .args([
                        "-X",
                        "-A",
                        "-t",
                        "-c",
                        "SELECT pg_is_in_recovery()",
                        &conninfo,
                    ])
                    .stdin(Stdio::null())
                    .output()
                    .await?)
            })
            .await?;
            if !out.status.success() {
                return Err(PgError::Program {
                    program: "psql".into(),
                    detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
            return Ok(String::from_utf8_lossy(&out.stdout).trim() == "f");
        }
        within("whether it is a primary", Duration::from_secs(10), async {
            let (host, port) = host_port(address);
            let (c, conn) = tokio_postgres::Config::new()
                .host(host)
                .port(port.parse().unwrap_or(5432))
                .user(&self.repl.user)
                .password(&self.repl.password)
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(5))
                .connect(NoTls)
                .await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let in_recovery: bool = c
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await?
                .try_get(0)?;
            Ok(!in_recovery)
        })
        .await
    }

    /// Rewinds this (stopped) former primary onto `source` (`host:port`)
    /// with pg_rewind, which first runs crash recovery if needed. It reads
    /// the source as the replication account, which the new primary's
    /// keeper granted the functions pg_rewind needs.
    pub async fn rewind(&self, source: &str) -> Result<()> {
        let data = self.data_dir();
        let data = data.to_string_lossy();
        let src = format!(
            "{} dbname=postgres connect_timeout=5",
            self.repl_conninfo(source)?
        );
        self.run("pg_rewind", &["-D", &data, "--source-server", &src])
            .await
    }

    /// Deletes the data directory (before a fresh base backup). Never
    /// while a postmaster runs on it.
    pub fn remove_data(&self) -> Result<()> {
        let d = self.data_dir();
        if let Some(pid) = crate::postmaster::running_on(&d) {
            return Err(PgError::Program {
                program: "keeper".into(),
                detail: format!(
                    "refusing to delete {}: PostgreSQL (pid {pid}) runs on it",
                    d.display()
                ),
            });
        }
        if d.exists() {
            std::fs::remove_dir_all(&d)?;
        }
        Ok(())
    }

    /// Writes keelson's managed parameters (merged over `user`, keelson
    /// wins) and makes postgresql.conf include them; writes pg_hba.conf.
    pub fn write_config(
        &self,
        user: &BTreeMap<String, String>,
        upstream: Option<&Upstream>,
        synchronous_standbys: &[String],
    ) -> Result<()> {
        self.write_config_with(user, upstream, synchronous_standbys, true, &[])
    }

    /// [`Instance::write_config`]; with `clients` false, pg_hba.conf lets
    /// in only the keeper (local socket) and the replication account
    /// (streaming, and pg_rewind's reads), not clients: a synchronous
    /// primary restarted in place holds commits it flushed but no standby
    /// confirmed, which must not become visible before a standby has them.
    pub fn write_config_with(
        &self,
        user: &BTreeMap<String, String>,
        upstream: Option<&Upstream>,
        synchronous_standbys: &[String],
        clients: bool,
        hba: &[String],
    ) -> Result<()> {
        // Every user value is written as a literal of the text PostgreSQL
        // reads, so no value can end the line and add another setting.
        let mut p: BTreeMap<String, String> = user
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    cluster::params::conf_literal(&cluster::params::text(v)),
                )
            })
            .collect();
        let managed = [
            ("listen_addresses", format!("'{}'", self.host)),
            ("port", self.port.to_string()),
            (
                "unix_socket_directories",
                format!("'{}'", self.dir.display()),
            ),
            ("wal_level", "replica".into()),
            ("hot_standby", "on".into()),
            ("max_wal_senders", at_least(user, "max_wal_senders", 10)),
            (
                "max_replication_slots",
                at_least(user, "max_replication_slots", 10),
            ),
            ("wal_log_hints", "on".into()),
            ("password_encryption", "'scram-sha-256'".into()),
            // Only the keeper (root or the owner) uses the socket, where
            // the superuser is trusted.
            ("unix_socket_permissions", "0700".into()),
        ];
        for (k, v) in managed {
            p.insert(k.to_owned(), v);
        }
        // A commit waiting for a synchronous standby is released only when
        // that standby next reports its position. When the synchronous set
        // changes to a standby that is already up to date (after a
        // switchover or failover) it reports next only at this interval:
        // PostgreSQL's 10 s held such commits for up to 10 s; 1 s bounds
        // it, for one small message a second. The spec may set another.
        p.entry("wal_receiver_status_interval".to_owned())
            .or_insert_with(|| "'1s'".to_owned());
        if let Some(up) = upstream {
            let ci = format!(
                "{} application_name={}",
                self.repl_conninfo(&up.address)?,
                conninfo_value(&up.application_name)
            );
            p.insert(
                "primary_conninfo".into(),
                cluster::params::conf_literal(&ci),
            );
            if let Some(slot) = &up.slot {
                p.insert(
                    "primary_slot_name".into(),
                    cluster::params::conf_literal(slot),
                );
            }
        }
        if let Some(tls) = &self.tls {
            let d = self.tls_dir();
            p.insert("ssl".into(), "on".into());
            let path = |n: &str| cluster::params::conf_literal(&d.join(n).to_string_lossy());
            p.insert("ssl_cert_file".into(), path("server.crt"));
            p.insert("ssl_key_file".into(), path("server.key"));
            if tls.ca.is_some() {
                p.insert("ssl_ca_file".into(), path("ca.crt"));
            }
        }
        // Written for a primary too: it is read only at server start, so
        // dropping it at promotion would show as a restart pending.
        p.insert("recovery_target_timeline".into(), "'latest'".into());
        p.insert(
            "synchronous_standby_names".into(),
            cluster::params::conf_literal(&crate::names::synchronous_standby_names(
                synchronous_standbys,
            )),
        );
        let text: String = p.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        let data = self.data_dir();
        std::fs::write(
            data.join(MANAGED_CONF),
            format!("# Managed by keelson; edits are overwritten.\n{text}"),
        )?;
        let conf = data.join("postgresql.conf");
        let current = std::fs::read_to_string(&conf)?;
        let include = format!("include_if_exists = '{MANAGED_CONF}'");
        if !current.contains(&include) {
            std::fs::write(&conf, format!("{current}\n{include}\n"))?;
        }
        // An instance listening on loopback only (a one-host cluster, the
        // demo) trusts local TCP clients; any other requires SCRAM.
        // Replication always requires the replication account's password.
        let loopback = self.host == "localhost" || self.host.starts_with("127.");
        let local_clients = if loopback { "trust" } else { "scram-sha-256" };
        let repl = quote_ident(&self.repl.user);
        // With TLS, replication (and pg_rewind, pg_basebackup) must use it.
        let repl_type = if self.tls.is_some() {
            "hostssl"
        } else {
            "host"
        };
        let client_lines = if clients {
            let spec: String = hba.iter().map(|l| format!("{l}\n")).collect();
            format!(
                "{spec}host all all 127.0.0.1/32 {local_clients}\n\
                 host all all ::1/128 {local_clients}\n\
                 host all all 0.0.0.0/0 scram-sha-256\n\
                 host all all ::/0 scram-sha-256\n"
            )
        } else {
            format!(
                "# Clients are held out until a synchronous standby has caught up.\n\
                 host postgres {repl} 0.0.0.0/0 scram-sha-256\n\
                 host postgres {repl} ::/0 scram-sha-256\n"
            )
        };
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "# Managed by keelson; edits are overwritten.\n\
                 local all postgres trust\n\
                 {repl_type} replication {repl} 0.0.0.0/0 scram-sha-256\n\
                 {repl_type} replication {repl} ::/0 scram-sha-256\n\
                 {client_lines}"
            ),
        )?;
        // standby.signal makes a starting PostgreSQL a standby. It is never
        // removed here: promotion removes it, and removing it under a
        // running standby makes the promotion fail.
        if upstream.is_some() {
            std::fs::write(data.join("standby.signal"), "")?;
        }
        for f in [
            MANAGED_CONF,
            "postgresql.conf",
            "pg_hba.conf",
            "standby.signal",
        ] {
            if data.join(f).exists() {
                self.chown(&data.join(f))?;
            }
        }
        Ok(())
    }

    /// Starts `postgres` as a supervised child and waits until it accepts
    /// connections.
    pub async fn start(&mut self, limit: Duration) -> Result<()> {
        self.start_with(limit, |_| {}).await
    }

    /// [`Instance::start`], calling `spawned` with the postmaster's pid as
    /// soon as it exists (a primary must be fenceable from its first
    /// moment, not once it is ready).
    pub async fn start_with(&mut self, limit: Duration, spawned: impl FnOnce(u32)) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        if let Some(pid) = crate::postmaster::running_on(&self.data_dir()) {
            return Err(PgError::Program {
                program: "postgres".into(),
                detail: format!("another postmaster (pid {pid}) runs on the data directory"),
            });
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        self.chown(&self.log_path())?;
        let data = self.data_dir();
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        if let Some(pid) = child.id() {
            spawned(pid);
        }
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(PgError::Program {
                        program: "postgres".into(),
                        detail: format!("exited with {status}; see {}", self.log_path().display()),
                    });
                }
            }
            if let Ok(c) = self.connect().await {
                if c.simple_query("SELECT 1").await.is_ok() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(PgError::NotReady(
            limit,
            self.log_path().display().to_string(),
        ))
    }

    /// Stops PostgreSQL with a fast shutdown (SIGINT), killing it if it has
    /// not stopped within `limit`.
    pub async fn stop(&mut self, limit: Duration) {
        self.stop_with(libc::SIGINT, limit).await
    }

    /// Stops PostgreSQL with an immediate shutdown (SIGQUIT): no
    /// checkpoint, crash recovery at the next start.
    pub async fn stop_now(&mut self, limit: Duration) {
        self.stop_with(libc::SIGQUIT, limit).await
    }

    async fn stop_with(&mut self, signal: i32, limit: Duration) {
        let Some(pid) = self.pid() else {
            self.child = None;
            self.adopted = None;
            return;
        };
        crate::postmaster::signal(pid, signal);
        let gone = match self.child.as_mut() {
            Some(c) => tokio::time::timeout(limit, c.wait()).await.is_ok(),
            None => crate::postmaster::wait_gone(pid, limit).await,
        };
        if !gone {
            tracing::warn!(
                pid,
                ?limit,
                "PostgreSQL did not stop in time: killing it and its backends"
            );
            crate::postmaster::kill_tree(pid);
            match self.child.as_mut() {
                Some(c) => {
                    let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
                }
                None => {
                    crate::postmaster::wait_gone(pid, Duration::from_secs(5)).await;
                }
            }
        }
        self.child = None;
        self.adopted = None;
    }

    /// Whether the supervised (or adopted) `postgres` is still running
    /// (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        if let Some(pid) = self.adopted {
            // Still the postmaster of this data directory, not a process
            // that reused its pid.
            if crate::postmaster::running_on(&self.data_dir()) == Some(pid) {
                return true;
            }
            self.adopted = None;
            return false;
        }
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// The pid of the supervised (or adopted) `postgres`, if running.
    pub fn pid(&self) -> Option<u32> {
        self.adopted
            .or_else(|| self.child.as_ref().and_then(Child::id))
    }

    /// A superuser connection over the local socket. The keeper's own
    /// statements never wait for synchronous standbys (a commit of the
    /// replication account's password must not hang on a standby that
    /// needs that password to connect) and give up after 10 s.
    pub async fn connect(&self) -> Result<Client> {
        let conn = format!(
            "host={} port={} user=postgres dbname=postgres connect_timeout=2 \
             options='-c synchronous_commit=local -c statement_timeout=10s'",
            self.dir.display(),
            self.port
        );
        // connect_timeout covers the socket only: a stopped postmaster
        // accepts it and never answers the startup message.
        let (client, connection) = within("a connection", Duration::from_secs(3), async {
            Ok(tokio_postgres::connect(&conn, NoTls).await?)
        })
        .await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Makes a running PostgreSQL re-read its configuration.
    pub async fn reload(&self) -> Result<()> {
        within("a reload", STATEMENT_TIMEOUT, async {
            self.connect()
                .await?
                .execute("SELECT pg_reload_conf()", &[])
                .await?;
            Ok(())
        })
        .await
    }

    /// Waits up to `limit` until no transaction is open and no session
    /// over TCP remains (the proxies end theirs between transactions once
    /// they apply a switchover; a session whose client just connected runs
    /// its first statement first): PostgreSQL stopped earlier would end a
    /// session the proxies have not fenced yet, an error to its client.
    /// Sessions over the Unix socket (this keeper's own) are waited for
    /// only while in a transaction. Returns the transactions and TCP
    /// sessions still there at the end.
    pub async fn wait_for_sessions(&self, limit: Duration) -> Result<(i64, i64)> {
        let deadline = tokio::time::Instant::now() + limit;
        let c = self.connect().await?;
        let others = "FROM pg_stat_activity WHERE backend_type = 'client backend' \
                      AND pid <> pg_backend_pid() \
                      AND (xact_start IS NOT NULL OR client_addr IS NOT NULL)";
        loop {
            let (open, remote): (i64, i64) =
                within("counting open sessions", STATEMENT_TIMEOUT, async {
                    let r = c
                        .query_one(
                            &format!(
                                "SELECT count(*) FILTER (WHERE xact_start IS NOT NULL), \
                                        count(*) FILTER (WHERE client_addr IS NOT NULL) {others}"
                            ),
                            &[],
                        )
                        .await?;
                    Ok((r.get(0), r.get(1)))
                })
                .await?;
            if (open == 0 && remote == 0) || tokio::time::Instant::now() >= deadline {
                if open > 0 || remote > 0 {
                    let rows = c
                        .query(
                            &format!(
                                "SELECT concat_ws(' ', pid, client_addr, state, wait_event_type, \
                                        wait_event, left(query, 60)) {others}"
                            ),
                            &[],
                        )
                        .await
                        .unwrap_or_default();
                    let left: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                    tracing::warn!(?left, "sessions still open");
                }
                return Ok((open, remote));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Promotes a standby, waits for it to leave recovery, and checkpoints:
    /// a new primary records its timeline in its control file only at its
    /// next checkpoint, and until then pg_rewind sees "the same timeline"
    /// in a former primary and rewinds nothing.
    pub async fn promote(&self) -> Result<()> {
        within("its promotion", Duration::from_secs(90), async {
            let c = self.connect().await?;
            let promoted: bool = c
                .query_one("SELECT pg_promote(true, 60)", &[])
                .await?
                .try_get(0)?;
            if !promoted {
                return Err(PgError::Program {
                    program: "pg_promote".into(),
                    detail: "the standby did not finish its promotion within 60 s".into(),
                });
            }
            c.batch_execute("CHECKPOINT").await?;
            Ok(())
        })
        .await
    }

    /// `SHOW synchronous_standby_names`: what the server runs with, which
    /// is not always what was written (an invalid value is ignored, and a
    /// value written before a promotion is not loaded by it).
    pub async fn loaded_sync_names(&self) -> Result<String> {
        within("SHOW", STATEMENT_TIMEOUT, async {
            let c = self.connect().await?;
            Ok(c.query_one("SHOW synchronous_standby_names", &[])
                .await?
                .try_get(0)?)
        })
        .await
    }

    /// The control file's view of the data directory.
    pub async fn control_data(&self) -> Result<crate::control::ControlData> {
        let data = self.data_dir();
        let out = self
            .command("pg_controldata")
            .arg("-D")
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .await?;
        if !out.status.success() {
            return Err(PgError::Program {
                program: "pg_controldata".into(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        crate::control::parse(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| {
            PgError::Program {
                program: "pg_controldata".into(),
                detail: "unexpected output".into(),
            }
        })
    }

    /// The value of integer parameter `name` the server would start with,
    /// as `postgres -C` reads the configuration files (while stopped).
    pub async fn configured(&self, name: &str) -> Option<i64> {
        let out = self
            .command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-C", name])
            .stdin(Stdio::null())
            .output()
            .await
            .ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// On a primary: creates the replication account, or sets its
    /// password, and grants it what pg_rewind reads.
    pub async fn ensure_replication_account(&self) -> Result<()> {
        within("the replication account", STATEMENT_TIMEOUT, async {
            let c = self.connect().await?;
            let exists = c
                .query_opt(
                    "SELECT 1 FROM pg_roles WHERE rolname = $1",
                    &[&self.repl.user],
                )
                .await?
                .is_some();
            let (user, password) = (
                quote_ident(&self.repl.user),
                quote_literal(&self.repl.password),
            );
            let verb = if exists { "ALTER" } else { "CREATE" };
            let mut sql = format!("{verb} ROLE {user} WITH LOGIN REPLICATION PASSWORD {password};");
            for f in [
                "pg_ls_dir(text, boolean, boolean)",
                "pg_stat_file(text, boolean)",
                "pg_read_binary_file(text)",
                "pg_read_binary_file(text, bigint, bigint, boolean)",
            ] {
                sql.push_str(&format!(
                    "GRANT EXECUTE ON FUNCTION pg_catalog.{f} TO {user};"
                ));
            }
            c.batch_execute(&sql).await?;
            Ok(())
        })
        .await
    }

    /// On a primary: makes keelson's replication slots exactly `wanted`,
    /// creating missing ones (reserving WAL at once) and dropping those of
    /// standbys that left the cluster. Slots in use are not dropped.
    pub async fn sync_slots(&self, wanted: &[String]) -> Result<()> {
        within("the replication slots", STATEMENT_TIMEOUT, async {
            let c = self.connect().await?;
            let have: Vec<(String, bool)> = c
                .query(
                    "SELECT slot_name::text, active FROM pg_replication_slots \
                     WHERE slot_type = 'physical' AND starts_with(slot_name::text, $1)",
                    &[&SLOT_PREFIX],
                )
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<std::result::Result<_, tokio_postgres::Error>>()?;
            for w in wanted {
                if !have.iter().any(|(h, _)| h == w) {
                    c.execute("SELECT pg_create_physical_replication_slot($1, true)", &[w])
                        .await?;
                    tracing::info!(slot = %w, "created replication slot");
                }
            }
            for (h, active) in &have {
                if !wanted.contains(h) && !active {
                    c.execute("SELECT pg_drop_replication_slot($1)", &[h])
                        .await?;
                    tracing::info!(slot = %h, "dropped replication slot");
                }
            }
            Ok(())
        })
        .await
    }

    /// What the sentinel needs to know about this instance, as far as
    /// PostgreSQL answers within [`REPORT_TIMEOUT`]. What it could not read
    /// is `None` (unknown), and `problem` says why, so that the sentinel
    /// keeps what it knew: a dead or hung PostgreSQL has no LSN of zero.
    pub async fn report(&self, uid: &str, applied_generation: u64) -> KeeperReport {
        let mut r = KeeperReport {
            uid: uid.to_owned(),
            address: Some(self.address()),
            applied_generation,
            ..Default::default()
        };
        // A hung PostgreSQL (SIGSTOP, stuck I/O) must read as unhealthy, not
        // stop the keeper from reporting.
        match tokio::time::timeout(REPORT_TIMEOUT, self.query_report(&mut r)).await {
            Ok(Ok(())) => r.healthy = true,
            Ok(Err(e)) => {
                r = KeeperReport {
                    problem: Some(format!("PostgreSQL does not answer: {e}")),
                    ..r
                }
            }
            Err(_) => {
                r = KeeperReport {
                    problem: Some(format!(
                        "PostgreSQL does not answer within {REPORT_TIMEOUT:?}"
                    )),
                    ..r
                }
            }
        }
        if !r.healthy {
            // Only what the status queries gave is taken back: an
            // unhealthy report carries nothing half-read.
            r = KeeperReport {
                uid: r.uid,
                address: r.address,
                applied_generation: r.applied_generation,
                problem: r.problem,
                ..Default::default()
            };
        }
        r
    }

    /// Every parameter the running server knows, for `ctl spec update` to
    /// check values against ([`cluster::params::Catalog`]).
    pub async fn settings_catalog(&self, keeper: &str) -> Result<cluster::params::Catalog> {
        within("the parameter catalog", REPORT_TIMEOUT, async {
            let c = self.connect().await?;
            let rows = c
                .query(
                    "SELECT name::text, vartype::text, unit::text, min_val::text, max_val::text, \
                     coalesce(enumvals, '{}')::text[], context::text FROM pg_settings",
                    &[],
                )
                .await?;
            let version = c
                .query_one(
                    "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
                    &[],
                )
                .await?;
            let mut settings = BTreeMap::new();
            for r in rows {
                settings.insert(
                    // Names are case-insensitive (TimeZone, DateStyle).
                    r.try_get::<_, String>(0)?.to_ascii_lowercase(),
                    cluster::params::Setting {
                        vartype: r.try_get(1)?,
                        unit: r.try_get(2)?,
                        min: r.try_get(3)?,
                        max: r.try_get(4)?,
                        enumvals: r.try_get(5)?,
                        context: r.try_get(6)?,
                    },
                );
            }
            Ok(cluster::params::Catalog {
                server_version_num: version.try_get::<_, i32>(0)?.max(0) as u32,
                server_version: version.try_get(1)?,
                keeper: keeper.to_owned(),
                settings,
            })
        })
        .await
    }

    async fn query_report(&self, r: &mut KeeperReport) -> Result<()> {
        let c = self.connect().await?;
        let q = "SELECT pg_is_in_recovery(), \
                 (CASE WHEN pg_is_in_recovery() \
                       THEN greatest(coalesce(pg_last_wal_receive_lsn(), '0/0'), coalesce(pg_last_wal_replay_lsn(), '0/0')) \
                       ELSE pg_current_wal_lsn() END - '0/0')::text, \
                 (SELECT timeline_id FROM pg_control_checkpoint())::int, \
                 (SELECT system_identifier FROM pg_control_system())::text, \
                 coalesce((SELECT array_agg(application_name::text ORDER BY application_name) FROM pg_stat_replication WHERE sync_state = 'sync'), '{}'), \
                 coalesce((SELECT array_agg(name::text ORDER BY name) FROM pg_settings WHERE pending_restart), '{}'), \
                 coalesce((SELECT array_agg(name::text || '=' || setting ORDER BY name) FROM pg_settings \
                           WHERE name IN ('max_connections', 'max_locks_per_transaction', \
                                          'max_prepared_transactions', 'max_wal_senders', 'max_worker_processes')), '{}')";
        let row = c.query_one(q, &[]).await?;
        let number = |v: String| {
            v.parse::<u64>().map_err(|_| PgError::Program {
                program: "report".into(),
                detail: format!("unexpected LSN {v:?}"),
            })
        };
        r.in_recovery = row.try_get(0)?;
        r.lsn = Some(number(row.try_get(1)?)?);
        r.timeline = Some(row.try_get::<_, i32>(2)?.max(0) as u32);
        r.system_id = Some(row.try_get(3)?);
        r.synchronous_standbys = Some(row.try_get(4)?);
        let mut pending: Vec<String> = row.try_get(5)?;
        if !r.in_recovery {
            // A primary restored to a target (`ctl init --mode pitr`) runs
            // with the target it no longer has in its configuration; a
            // target applies only in recovery, which a running primary
            // never enters again: no restart is needed for it.
            pending.retain(|n| !n.starts_with("recovery_target"));
        }
        r.pending_restart = Some(pending);
        let settings: Vec<String> = row.try_get(6)?;
        r.running_settings = Some(
            settings
                .iter()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        );
        let archive = c
            .query_one(
                "SELECT current_setting('archive_mode'), archived_count, last_archived_wal, \
                 failed_count, last_failed_wal, \
                 coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) \
                 FROM pg_stat_archiver",
                &[],
            )
            .await?;
        let mode: String = archive.try_get(0)?;
        if mode != "off" {
            r.archive = Some(cluster::data::ArchiveStatus {
                mode,
                archived_count: archive.try_get::<_, i64>(1)?.max(0) as u64,
                last_archived_wal: archive.try_get(2)?,
                failed_count: archive.try_get::<_, i64>(3)?.max(0) as u64,
                last_failed_wal: archive.try_get(4)?,
                failing: archive.try_get(5)?,
            });
        }
        if r.in_recovery {
            // The checkpoint's timeline lags behind on a standby that has
            // followed a promotion; the received one is current.
            let q = "SELECT (SELECT received_tli FROM pg_stat_wal_receiver), \
                     coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false), \
                     (coalesce(pg_last_wal_replay_lsn(), '0/0') - '0/0')::text, \
                     CASE WHEN coalesce(pg_last_wal_receive_lsn(), '0/0') <= coalesce(pg_last_wal_replay_lsn(), '0/0') THEN 0 \
                          ELSE (extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint END";
            let row = c.query_one(q, &[]).await?;
            if let Some(tli) = row.try_get::<_, Option<i32>>(0)? {
                r.timeline = r.timeline.max(Some(tli.max(0) as u32));
            }
            r.streaming = row.try_get(1)?;
            r.replay_lsn = number(row.try_get(2)?)?;
            r.replay_lag_ms = row.try_get::<_, Option<i64>>(3)?.map(|ms| ms.max(0) as u64);
        }
        Ok(())
    }
}

/// Runs the backup tool as the account PostgreSQL runs as, with the
/// configuration the keeper wrote ([`Instance::write_backup_config`]).
#[derive(Debug, Clone)]
pub struct Tools {
    dir: PathBuf,
    run_as: Option<(u32, u32)>,
}

impl Tools {
    /// The keeper's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("pgdata")
    }

    /// Runs `cmd` with `sh -c` in the data directory, as PostgreSQL runs
    /// its archive command.
    pub async fn shell(&self, cmd: &str, limit: Duration) -> Result<()> {
        let mut c = Command::new("sh");
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
            c.env("HOME", &self.dir);
        }
        // In its own process group, all of which is killed if it overruns
        // (a `cp` left running could finish a file after the promotion).
        c.kill_on_drop(true)
            .process_group(0)
            .arg("-c")
            .arg(cmd)
            .current_dir(self.data_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = c.spawn()?;
        let pid = child.id();
        let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
            Ok(out) => out?,
            Err(_) => {
                if let Some(pid) = pid {
                    crate::postmaster::signal_group(pid, libc::SIGKILL);
                }
                return Err(PgError::Timeout("the archive command", limit));
            }
        };
        if !out.status.success() {
            return Err(PgError::Program {
                program: "the archive command".into(),
                detail: format!(
                    "exited {}: {}",
                    out.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(())
    }

    /// Runs `pgbackrest` with this instance's configuration and `args`, as
    /// the account PostgreSQL runs as, for at most `limit`; returns what
    /// it printed.
    /// Starts `pgbackrest server` with the configuration at `config`, as
    /// the server's account; it is killed when the handle is dropped.
    pub fn pgbackrest_server(&self, config: &Path) -> Result<tokio::process::Child> {
        let mut c = Command::new("pgbackrest");
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
            c.env("HOME", &self.dir);
        }
        // It ends with the keeper, even a SIGKILLed one: an orphan would
        // hold the port, and serve a configuration no longer kept.
        // SAFETY: prctl is async-signal-safe, and only sets a flag of the
        // child.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = c
            .kill_on_drop(true)
            .arg(format!("--config={}", config.display()))
            .arg("server")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| PgError::Program {
                program: "pgbackrest".into(),
                detail: format!("cannot run it: {e}"),
            })?;
        Ok(child)
    }

    pub async fn pgbackrest(
        &self,
        spec: &cluster::data::BackupSpec,
        args: &[&str],
        limit: Duration,
    ) -> Result<String> {
        let mut c = Command::new("pgbackrest");
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
            c.env("HOME", &self.dir);
        }
        c.kill_on_drop(true)
            .arg(format!(
                "--config={}",
                self.dir.join(crate::backup::PGBACKREST_CONF).display()
            ))
            .arg(format!(
                "--stanza={}",
                spec.stanza.as_deref().unwrap_or_default()
            ))
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        let out = tokio::time::timeout(limit, c.output())
            .await
            .map_err(|_| PgError::Timeout("pgbackrest", limit))?
            .map_err(|e| PgError::Program {
                program: "pgbackrest".into(),
                detail: format!("cannot run it: {e}"),
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let said: Vec<&str> = stderr.lines().chain(stdout.lines()).collect();
            return Err(PgError::Program {
                program: format!("pgbackrest {}", args.join(" ")),
                detail: format!(
                    "exited {}: {}",
                    out.status.code().unwrap_or(-1),
                    said[said.len().saturating_sub(3)..].join(" / ")
                ),
            });
        }
        Ok(stdout)
    }
}

/// The user's value of `name` where it is a number of at least `min`
/// (what keelson needs), else `min`.
fn at_least(user: &BTreeMap<String, String>, name: &str, min: u32) -> String {
    let n = user
        .get(name)
        .and_then(|v| cluster::params::text(v).trim().parse::<u32>().ok())
        .map_or(min, |v| v.max(min));
    n.to_string()
}

impl Drop for Instance {
    /// An immediate shutdown of the server this keeper runs, and nothing
    /// after it: a SIGKILL right behind it would keep the postmaster from
    /// ending its backends.
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            crate::postmaster::signal(pid, libc::SIGQUIT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A standby source's `[v6]:port` reaches libpq without brackets.
    #[test]
    fn addresses_split_as_libpq_takes_them() {
        assert_eq!(host_port("[::1]:5433"), ("::1", "5433"));
        assert_eq!(host_port("db1:5433"), ("db1", "5433"));
        assert_eq!(host_port("db1"), ("db1", "5432"));
        assert_eq!(split_address("db1"), None);
    }
}
