//! WAL archiving and backups through the spec's tool (docs/backup.md):
//! the PostgreSQL parameters archiving needs, and pgBackRest's
//! configuration for this keeper's instance.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::data::{BackupDone, BackupRequest, BackupSpec, BackupTool};

use crate::pg::Tools;

/// Name of pgBackRest's configuration file in the keeper's directory.
pub const PGBACKREST_CONF: &str = "pgbackrest.conf";

/// A word for a shell command line (archive_command and restore_command
/// run through `sh -c`).
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=:,+".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The `pgbackrest` command line for this keeper's configuration.
pub fn pgbackrest_command(spec: &BackupSpec, dir: &Path) -> String {
    format!(
        "pgbackrest --config={} --stanza={}",
        shell_word(&dir.join(PGBACKREST_CONF).to_string_lossy()),
        shell_word(spec.stanza.as_deref().unwrap_or_default())
    )
}

/// The parameters archiving sets, as written into the spec's
/// `pg_parameters` (postgresql.conf literals); none without a tool.
///
/// `archive_mode = on` on every instance (pgBackRest supports no backup
/// with `always`): only the primary archives; a segment an old primary had
/// not archived when it died is pushed by the new primary's keeper
/// ([`Worker::tick`]'s sweep).
pub fn parameters(spec: &BackupSpec, dir: &Path) -> BTreeMap<String, String> {
    let mut p = BTreeMap::new();
    let (archive, restore) = match spec.tool {
        BackupTool::None => return p,
        BackupTool::Pgbackrest => {
            // PostgreSQL expands `%` sequences in the whole command.
            let base = pgbackrest_command(spec, dir).replace('%', "%%");
            (
                format!("{base} archive-push %p"),
                format!("{base} archive-get %f \"%p\""),
            )
        }
        BackupTool::Command => (
            spec.archive_command.clone().unwrap_or_default(),
            spec.restore_command.clone().unwrap_or_default(),
        ),
    };
    let lit = |v: &str| cluster::params::conf_literal(v);
    p.insert("archive_mode".into(), lit("on"));
    p.insert("archive_command".into(), lit(&archive));
    p.insert("restore_command".into(), lit(&restore));
    if let Some(t) = spec.archive_timeout {
        p.insert("archive_timeout".into(), lit(&format!("{}s", t.as_secs())));
    }
    p
}

/// pgBackRest's configuration for the instance in `dir` (data directory
/// `dir/pgdata`, socket in `dir`), or `None` without pgBackRest.
pub fn pgbackrest_conf(spec: &BackupSpec, dir: &Path, port: u16) -> Option<String> {
    if spec.tool != BackupTool::Pgbackrest {
        return None;
    }
    let own = dir.join("pgbackrest");
    let mut global = BTreeMap::new();
    global.insert("repo1-path".to_owned(), spec.repository.clone()?);
    global.insert(
        "log-path".to_owned(),
        own.join("log").to_string_lossy().into(),
    );
    global.insert(
        "lock-path".to_owned(),
        own.join("lock").to_string_lossy().into(),
    );
    global.insert(
        "spool-path".to_owned(),
        own.join("spool").to_string_lossy().into(),
    );
    global.insert("log-level-console".to_owned(), "warn".to_owned());
    global.insert("log-level-stderr".to_owned(), "warn".to_owned());
    global.insert("log-level-file".to_owned(), "info".to_owned());
    // A backup checkpoints at once instead of waiting for the next one.
    global.insert("start-fast".to_owned(), "y".to_owned());
    for (k, v) in &spec.options {
        global.insert(k.clone(), v.clone());
    }
    let mut out = String::from(
        "# Written by the keelson keeper from the cluster spec's backup section.\n[global]\n",
    );
    for (k, v) in &global {
        out.push_str(&format!("{k}={v}\n"));
    }
    out.push_str(&format!(
        "\n[{}]\npg1-path={}\npg1-port={port}\npg1-socket-path={}\npg1-user=postgres\n",
        spec.stanza.as_deref()?,
        dir.join("pgdata").display(),
        dir.display()
    ));
    Some(out)
}

/// Name of the pgBackRest TLS server's configuration file.
pub const SERVER_CONF: &str = "pgbackrest-server.conf";

/// The TLS files the keeper installs for PostgreSQL (`<dir>/tls`), which
/// the pgBackRest server and its clients present too.
fn tls_file(dir: &Path, name: &str) -> String {
    dir.join("tls").join(name).to_string_lossy().into()
}

/// The pgBackRest TLS server's configuration: listening on `listen`
/// (`host:port`), with the keeper's certificate, letting in the keepers
/// whose certificates have the common names `clients` for the spec's
/// stanza; `None` without pgBackRest or without a client.
pub fn server_conf(
    spec: &BackupSpec,
    dir: &Path,
    listen: &str,
    clients: &[String],
) -> Option<String> {
    if spec.tool != BackupTool::Pgbackrest || clients.is_empty() {
        return None;
    }
    let stanza = spec.stanza.as_deref()?;
    let (host, port) = crate::pg::split_address(listen)?;
    let own = dir.join("pgbackrest");
    let mut out = String::from(
        "# Written by the keelson keeper: its pgBackRest TLS server (--pgbackrest-listen).\n[global]\n",
    );
    for (k, v) in [
        ("tls-server-address", host.to_owned()),
        ("tls-server-port", port.to_owned()),
        ("tls-server-cert-file", tls_file(dir, "server.crt")),
        ("tls-server-key-file", tls_file(dir, "server.key")),
        ("tls-server-ca-file", tls_file(dir, "ca.crt")),
        ("log-path", own.join("log").to_string_lossy().into()),
        ("lock-path", own.join("lock").to_string_lossy().into()),
        ("log-level-console", "warn".into()),
        ("log-level-file", "info".into()),
    ] {
        out.push_str(&format!("{k}={v}\n"));
    }
    for cn in clients {
        out.push_str(&format!("tls-server-auth={cn}={stanza}\n"));
    }
    Some(out)
}

/// The common name of the certificate at `path` (`openssl x509`).
pub fn certificate_cn(path: &Path) -> Option<String> {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let subject = text.trim().strip_prefix("subject=")?;
    subject
        .split(',')
        .find_map(|part| part.trim().strip_prefix("CN="))
        .map(str::to_owned)
}

/// The pgBackRest TLS server a keeper runs, restarted whenever its
/// configuration changes.
#[derive(Debug, Default)]
pub struct Server {
    child: Option<tokio::process::Child>,
    config: Option<String>,
}

impl Server {
    /// Runs the server with `config` (written to [`SERVER_CONF`]), or
    /// stops it with `None`. A server that exited is started again.
    pub fn keep(&mut self, tools: &Tools, config: Option<String>) {
        let exited = self
            .child
            .as_mut()
            .is_some_and(|c| !matches!(c.try_wait(), Ok(None)));
        if exited {
            tracing::warn!("the pgBackRest TLS server exited; starting it again");
            self.child = None;
        }
        if self.config == config && (self.child.is_some() || config.is_none()) {
            return;
        }
        self.child = None; // killed on drop
        self.config = config.clone();
        let Some(text) = config else { return };
        let path = tools.dir().join(SERVER_CONF);
        if let Err(e) = std::fs::write(&path, text) {
            tracing::error!(error = %e, "cannot write the pgBackRest server's configuration");
            return;
        }
        match tools.pgbackrest_server(&path) {
            Ok(c) => {
                tracing::info!("pgBackRest TLS server started");
                self.child = Some(c);
            }
            Err(e) => tracing::error!(error = %e, "cannot start the pgBackRest TLS server"),
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// The options that take a backup from this standby through the
/// primary's pgBackRest TLS server `primary` (its PostgreSQL at
/// `pg_port`): pgBackRest starts and stops the backup on the primary and
/// copies the files from here.
pub fn standby_backup_args(
    dir: &Path,
    primary: &cluster::data::PgbackrestServer,
    pg_port: u16,
) -> Vec<String> {
    let (host, port) =
        crate::pg::split_address(&primary.address).unwrap_or((primary.address.as_str(), "8432"));
    vec![
        "--backup-standby".into(),
        format!("--pg2-host={host}"),
        "--pg2-host-type=tls".into(),
        format!("--pg2-host-port={port}"),
        format!("--pg2-host-config={}", primary.config),
        format!("--pg2-host-ca-file={}", tls_file(dir, "ca.crt")),
        format!("--pg2-host-cert-file={}", tls_file(dir, "server.crt")),
        format!("--pg2-host-key-file={}", tls_file(dir, "server.key")),
        format!("--pg2-path={}", primary.data_dir),
        format!("--pg2-socket-path={}", primary.socket_dir),
        format!("--pg2-port={pg_port}"),
        "--pg2-user=postgres".into(),
    ]
}

/// How long a backup may take before the keeper gives up on it.
const BACKUP_LIMIT: Duration = Duration::from_secs(6 * 3600);
/// How long `stanza-create` and `info` may take.
const TOOL_LIMIT: Duration = Duration::from_secs(120);
/// How often a primary tries `stanza-create` again after it failed.
const STANZA_RETRY: Duration = Duration::from_secs(30);
/// How often a primary refreshes the backup list `ctl backups` reads.
const LIST_EVERY: Duration = Duration::from_secs(60);

/// The backup tool's work, off the keeper's loop: creating the stanza on
/// the primary, the backups `ctl backup` asks for, and the list of backups
/// `ctl backups` reads from the node API.
#[derive(Debug)]
pub struct Worker {
    shared: Arc<Mutex<Shared>>,
    task: Option<tokio::task::JoinHandle<()>>,
    done_file: PathBuf,
}

#[derive(Debug, Default)]
struct Shared {
    /// The last backup taken for a request (kept in `done_file`).
    done: Option<BackupDone>,
    /// The repository and stanza the stanza was created (or found valid)
    /// for, and when that was last tried.
    stanza_ok: Option<String>,
    stanza_tried: Option<Instant>,
    /// Why the stanza could not be created, while it cannot.
    problem: Option<String>,
    /// `pgbackrest info --output=json`, and when it was read.
    list: Option<String>,
    listed: Option<Instant>,
    /// The backups the cluster's keepers reported taken when the list was
    /// last read (a standby's backup makes the primary's list stale).
    listed_for: String,
}

impl Worker {
    pub fn new(dir: &Path) -> Worker {
        let done_file = dir.join("backup-done");
        let done = std::fs::read_to_string(&done_file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        Worker {
            shared: Arc::new(Mutex::new(Shared {
                done,
                ..Default::default()
            })),
            task: None,
            done_file,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last backup taken for a request.
    pub fn done(&self) -> Option<BackupDone> {
        self.lock().done.clone()
    }

    /// What keeps the tool from working, if anything.
    pub fn problem(&self) -> Option<String> {
        self.lock().problem.clone()
    }

    /// The backup list, as `pgbackrest info --output=json` printed it.
    pub fn list(&self) -> Option<String> {
        self.lock().list.clone()
    }

    /// Starts what is due, unless a task is still running: the backup
    /// `request` asks for if it is new, else on a primary the stanza (once
    /// per repository and stanza) and a fresh backup list.
    pub fn tick(
        &mut self,
        tools: &Tools,
        spec: &BackupSpec,
        request: Option<&BackupRequest>,
        primary: bool,
        standby: Option<Vec<String>>,
        taken: &str,
    ) {
        if self.task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        self.task = None;
        if spec.tool != BackupTool::Pgbackrest {
            let mut s = self.lock();
            s.stanza_ok = None;
            s.problem = None;
            s.list = None;
            return;
        }
        // Any change of the section (repository, stanza, options) checks
        // the stanza again.
        let key = serde_json::to_string(spec).unwrap_or_default();
        let (backup, stanza, list) = {
            let s = self.lock();
            let done = s.done.as_ref().map_or(0, |d| d.id);
            let backup = request.filter(|r| r.id > done).cloned();
            let stanza = primary
                && s.stanza_ok.as_ref() != Some(&key)
                && s.stanza_tried.is_none_or(|t| t.elapsed() >= STANZA_RETRY);
            let list = primary
                && (s.listed.is_none_or(|t| t.elapsed() >= LIST_EVERY) || s.listed_for != taken);
            (backup, stanza, list)
        };
        if backup.is_none() && !stanza && !list {
            return;
        }
        let (shared, tools, spec) = (self.shared.clone(), tools.clone(), spec.clone());
        let done_file = self.done_file.clone();
        self.lock().listed_for = taken.to_owned();
        let from_standby = backup.as_ref().is_some_and(|r| r.from_standby);
        self.task = Some(tokio::spawn(async move {
            let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
            // On a standby the stanza is the primary's to create.
            if (backup.is_some() && !from_standby) || stanza {
                let r = tools
                    .pgbackrest(&spec, &["stanza-create"], TOOL_LIMIT)
                    .await;
                let mut s = lock();
                s.stanza_tried = Some(Instant::now());
                match r {
                    Ok(_) => {
                        s.stanza_ok = Some(key.clone());
                        s.problem = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot create the pgBackRest stanza");
                        s.problem = Some(format!("backup: {e}"));
                    }
                }
            }
            if let Some(req) = backup {
                tracing::info!(id = req.id, kind = %req.kind, "taking a backup");
                let kind = format!("--type={}", req.kind);
                let mut args = vec!["backup"];
                if !req.kind.is_empty() {
                    args.push(&kind);
                }
                if from_standby {
                    args.extend(standby.iter().flatten().map(String::as_str));
                }
                let t = Instant::now();
                let r = match (&standby, from_standby) {
                    (None, true) => Err(crate::pg::PgError::Program {
                        program: "keeper".into(),
                        detail: "a backup from a standby is taken on a streaming standby whose \
                                 primary's keeper runs a pgBackRest TLS server \
                                 (--pgbackrest-listen); this keeper's database is not one, or \
                                 the primary runs none"
                            .into(),
                    }),
                    _ => tools.pgbackrest(&spec, &args, BACKUP_LIMIT).await,
                };
                let info = tools
                    .pgbackrest(&spec, &["info", "--output=json"], TOOL_LIMIT)
                    .await;
                let done = match r {
                    Ok(_) => {
                        let label = info
                            .as_ref()
                            .ok()
                            .and_then(|i| newest_label(i))
                            .unwrap_or_default();
                        tracing::info!(%label, from_standby, took = ?t.elapsed(), "backup taken");
                        BackupDone {
                            id: req.id,
                            ok: true,
                            detail: label,
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the backup failed");
                        BackupDone {
                            id: req.id,
                            ok: false,
                            detail: e.to_string(),
                        }
                    }
                };
                let _ =
                    std::fs::write(&done_file, serde_json::to_string(&done).unwrap_or_default());
                let mut s = lock();
                s.done = Some(done);
                if let Ok(i) = info {
                    s.list = Some(i);
                    s.listed = Some(Instant::now());
                }
            } else if list {
                let r = tools
                    .pgbackrest(&spec, &["info", "--output=json"], TOOL_LIMIT)
                    .await;
                let mut s = lock();
                s.listed = Some(Instant::now());
                match r {
                    Ok(i) => s.list = Some(i),
                    Err(e) => tracing::debug!(error = %e, "cannot list the backups"),
                }
            }
        }));
    }
}

/// Before a standby is promoted: pushes, with the spec's archive
/// command, the segments it received that the old primary had not
/// archived by its last report (`after`, its `last_archived_wal`), so that
/// a primary that died with its archiver behind leaves no gap in the
/// archive (with `archive_mode = on` a standby archives nothing itself,
/// and its end-of-recovery checkpoint recycles those segments). Only
/// segments of `after`'s timeline that come after it and end at or below
/// `received` (the end of the WAL this standby has: the segment it was
/// receiving into is incomplete), within `budget`. The tool takes a
/// segment it has with the same content again, and refuses one that
/// differs. Returns how many were pushed, and what failed.
pub async fn push_unarchived(
    tools: &Tools,
    spec: &BackupSpec,
    after: &str,
    (timeline, received): (u32, u64),
    budget: Duration,
) -> (usize, Vec<String>) {
    let template = match spec.tool {
        // Synchronously, whatever the options say: an asynchronous push
        // sends only what PostgreSQL marked ready, and a standby marks
        // nothing ready.
        BackupTool::Pgbackrest => format!(
            "{} archive-push --no-archive-async %p",
            pgbackrest_command(spec, tools.dir()).replace('%', "%%")
        ),
        BackupTool::Command => spec.archive_command.clone().unwrap_or_default(),
        BackupTool::None => return (0, Vec::new()),
    };
    // The last file archived may be a segment, a backup's history file
    // (`<segment>.<offset>.backup`, its segment is archived), or a
    // timeline's history file (`<tli>.history`, archived at the promotion
    // that began it: none of that timeline's segments may be).
    let (tli, after) = match (after.get(..24), after.strip_suffix(".history")) {
        (Some(seg), _) if segment_start(seg, 1 << 24).is_some() => {
            (u32::from_str_radix(&seg[..8], 16).unwrap_or(0), seg)
        }
        (_, Some(t)) if t.len() == 8 && u32::from_str_radix(t, 16).is_ok() => {
            (u32::from_str_radix(t, 16).unwrap_or(0), "")
        }
        _ => return (0, vec![format!("{after:?} is not a WAL file name")]),
    };
    // Segments of the timeline this standby follows only: the old
    // primary's last file may be of a parent timeline (its own promotion's
    // `.partial`), whose later segments here are recycled files or hold
    // the fork.
    if tli != timeline {
        return (
            0,
            vec![format!(
                "the old primary's last archived file {after} is of timeline {tli}, this standby follows {timeline}"
            )],
        );
    }
    let wal = tools.data_dir().join("pg_wal");
    let mut names: Vec<String> = match std::fs::read_dir(&wal) {
        Ok(d) => d
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let size = e.metadata().ok()?.len();
                let (t, start) = segment_start(&n, size)?;
                (t == tli
                    && n.as_str() > after
                    && start + size <= received
                    && written_as(&e.path(), t, start))
                .then_some(n)
            })
            .collect(),
        Err(e) => return (0, vec![format!("cannot read {}: {e}", wal.display())]),
    };
    names.sort();
    let deadline = Instant::now() + budget;
    let (mut pushed, mut failed) = (0, Vec::new());
    for n in &names {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            failed.push(format!("{n}: no time left of {budget:?}"));
            continue;
        }
        let cmd = expand(&template, &format!("pg_wal/{n}"), n);
        match tools.shell(&cmd, left).await {
            Ok(()) => pushed += 1,
            Err(e) => failed.push(format!("{n}: {e}")),
        }
    }
    (pushed, failed)
}

/// Whether the segment file at `path` begins with the page header of
/// timeline `tli` at `start` (a recycled file still has its old one).
fn written_as(path: &Path, tli: u32, start: u64) -> bool {
    use std::io::Read;
    let mut h = [0u8; 16];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut h));
    // XLogPageHeaderData: xlp_magic u16, xlp_info u16, xlp_tli u32,
    // xlp_pageaddr u64, in the server's (little-endian) byte order.
    read.is_ok()
        && u32::from_le_bytes([h[4], h[5], h[6], h[7]]) == tli
        && u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]) == start
}

/// An archive command template with `%p`, `%f` and `%%` expanded as
/// PostgreSQL expands them.
fn expand(template: &str, p: &str, f: &str) -> String {
    let mut out = String::with_capacity(template.len() + p.len());
    let mut it = template.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('p') => out.push_str(p),
            Some('f') => out.push_str(f),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The timeline and start LSN of WAL segment file `name` of `size` bytes
/// (`TTTTTTTTXXXXXXXXYYYYYYYY`), or `None` for any other file.
fn segment_start(name: &str, size: u64) -> Option<(u32, u64)> {
    if name.len() != 24 || !name.chars().all(|c| c.is_ascii_hexdigit()) || size == 0 {
        return None;
    }
    if !size.is_power_of_two() || size > 1 << 30 {
        return None;
    }
    let tli = u32::from_str_radix(&name[..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..], 16).ok()?;
    Some((tli, (log << 32) + seg * size))
}

/// The label of the newest backup in `pgbackrest info --output=json`.
fn newest_label(info: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(info).ok()?;
    v.get(0)?
        .get("backup")?
        .as_array()?
        .last()?
        .get("label")?
        .as_str()
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pgbackrest() -> BackupSpec {
        BackupSpec {
            tool: BackupTool::Pgbackrest,
            repository: Some("/var/lib/backups".into()),
            stanza: Some("main".into()),
            archive_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        }
    }

    #[test]
    fn pgbackrest_archives_and_restores_with_the_keepers_configuration() {
        let p = parameters(&pgbackrest(), Path::new("/data/k 1"));
        assert_eq!(p["archive_mode"], "'on'");
        assert_eq!(
            p["archive_command"],
            "'pgbackrest --config=''/data/k 1/pgbackrest.conf'' --stanza=main archive-push %p'"
        );
        assert_eq!(
            cluster::params::text(&p["restore_command"]),
            "pgbackrest --config='/data/k 1/pgbackrest.conf' --stanza=main archive-get %f \"%p\""
        );
        assert_eq!(p["archive_timeout"], "'60s'");
        let conf = pgbackrest_conf(&pgbackrest(), Path::new("/data/k1"), 5433).unwrap();
        assert!(conf.contains("repo1-path=/var/lib/backups\n"), "{conf}");
        assert!(
            conf.contains(
                "[main]\npg1-path=/data/k1/pgdata\npg1-port=5433\npg1-socket-path=/data/k1\n"
            ),
            "{conf}"
        );
    }

    #[test]
    fn a_standby_backs_up_through_the_primarys_tls_server() {
        let spec = pgbackrest();
        let dir = Path::new("/k2");
        assert_eq!(
            server_conf(&spec, dir, "db1:8432", &[]),
            None,
            "no client, no server"
        );
        let conf = server_conf(&spec, dir, "db1:8432", &["k1".into(), "k2".into()]).unwrap();
        for line in [
            "tls-server-address=db1\n",
            "tls-server-port=8432\n",
            "tls-server-cert-file=/k2/tls/server.crt\n",
            "tls-server-ca-file=/k2/tls/ca.crt\n",
            "tls-server-auth=k1=main\n",
            "tls-server-auth=k2=main\n",
        ] {
            assert!(conf.contains(line), "{line} not in\n{conf}");
        }
        let v6 = server_conf(&spec, dir, "[::1]:8432", &["k1".into()]).unwrap();
        assert!(v6.contains("tls-server-address=::1\n"), "{v6}");
        let primary = cluster::data::PgbackrestServer {
            address: "db1:8432".into(),
            config: "/k1/pgbackrest.conf".into(),
            data_dir: "/k1/pgdata".into(),
            socket_dir: "/k1".into(),
            cn: "k1".into(),
        };
        let args = standby_backup_args(dir, &primary, 5432);
        for a in [
            "--backup-standby",
            "--pg2-host=db1",
            "--pg2-host-type=tls",
            "--pg2-host-port=8432",
            "--pg2-host-config=/k1/pgbackrest.conf",
            "--pg2-host-cert-file=/k2/tls/server.crt",
            "--pg2-path=/k1/pgdata",
            "--pg2-socket-path=/k1",
            "--pg2-port=5432",
        ] {
            assert!(args.iter().any(|x| x == a), "{a} not in {args:?}");
        }
    }

    #[test]
    fn templates_expand_as_postgresql_expands_them() {
        assert_eq!(
            expand("cp %p /a/%f # 100%% %x", "pg_wal/X", "X"),
            "cp pg_wal/X /a/X # 100% %x"
        );
        let spec = pgbackrest();
        let p = parameters(&spec, Path::new("/data/50%full"));
        let cmd = cluster::params::text(&p["archive_command"]).into_owned();
        assert!(
            cmd.contains("--config='/data/50%%full/pgbackrest.conf'"),
            "{cmd}"
        );
        assert!(cmd.ends_with(" archive-push %p"), "{cmd}");
    }

    #[test]
    fn segment_names_give_their_timeline_and_start() {
        let mb16 = 16 << 20;
        assert_eq!(
            segment_start("000000010000000000000004", mb16),
            Some((1, 0x400_0000))
        );
        assert_eq!(
            segment_start("000000020000000100000001", mb16),
            Some((2, 0x1_0100_0000))
        );
        assert!(segment_start("000000010000000000000005.partial", mb16).is_none());
        assert!(segment_start("00000002.history", 60).is_none());
    }

    #[test]
    fn no_tool_sets_nothing_and_a_command_is_taken_as_written() {
        assert!(parameters(&BackupSpec::default(), Path::new("/d")).is_empty());
        assert!(pgbackrest_conf(&BackupSpec::default(), Path::new("/d"), 1).is_none());
        let spec = BackupSpec {
            tool: BackupTool::Command,
            archive_command: Some("test ! -f /a/%f && cp %p /a/%f".into()),
            restore_command: Some("cp /a/%f %p".into()),
            ..Default::default()
        };
        spec.check().unwrap();
        let p = parameters(&spec, Path::new("/d"));
        assert_eq!(
            cluster::params::text(&p["archive_command"]),
            "test ! -f /a/%f && cp %p /a/%f"
        );
        assert!(!p.contains_key("archive_timeout"));
    }

    #[test]
    fn the_spec_refuses_what_cannot_work() {
        let err = |s: BackupSpec| s.check().unwrap_err().to_string();
        assert!(err(BackupSpec {
            repository: None,
            ..pgbackrest()
        })
        .contains("needs repository"));
        assert!(err(BackupSpec {
            repository: Some("relative".into()),
            ..pgbackrest()
        })
        .contains("absolute"));
        assert!(err(BackupSpec {
            stanza: Some("a b".into()),
            ..pgbackrest()
        })
        .contains("stanza"));
        assert!(err(BackupSpec {
            archive_command: Some("cp %p /x".into()),
            ..pgbackrest()
        })
        .contains("for tool \"command\""));
        let mut o = pgbackrest();
        o.options.insert("repo1-path".into(), "/x".into());
        assert!(err(o).contains("set by keelson"));
        assert!(err(BackupSpec {
            tool: BackupTool::Command,
            archive_command: Some("cp x y".into()),
            restore_command: Some("cp /a/%f %p".into()),
            ..Default::default()
        })
        .contains("%p"));
        assert!(err(BackupSpec {
            stanza: Some("x".into()),
            ..Default::default()
        })
        .contains("set tool"));
        assert!(err(BackupSpec {
            archive_timeout: Some(std::time::Duration::from_millis(100)),
            ..pgbackrest()
        })
        .contains("archive_timeout"));
        pgbackrest().check().unwrap();
    }
}
