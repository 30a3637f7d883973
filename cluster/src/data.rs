//! The cluster data model: the single source of truth stored as JSON under
//! `/<prefix>/<cluster>/clusterdata`.
//!
//! It holds the cluster spec (with defaults and validation), the keepers,
//! the databases (what each should be and what it was last seen doing) and
//! the proxy section (which database proxies route primary traffic to, at
//! which generation). Writers always replace it by compare-and-swap on the
//! store revision they read.
//!
//! Invariant: `proxy.master_db`, when set, names one database; so at any
//! generation at most one primary is named to proxies.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bumped when the JSON layout changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

/// The format version a standby cluster's data is written with. A keelson
/// older than standby clusters keeps `role` and `standby_source` as
/// unknown fields and would take the cluster for a primary one: its keeper
/// would promote the standby leader (a second writable copy of the
/// source's data), its proxy route writes to it. It refuses this version
/// instead ("upgrade keelson") and changes nothing. A primary cluster (a
/// standby cluster promoted too) is written as [`FORMAT_VERSION`].
pub const STANDBY_FORMAT_VERSION: u32 = 2;

/// Serde for durations as humantime strings ("5s", "1m30s").
pub mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not a duration like \"5s\": {e}"))
        })
    }
}

/// Cluster-wide settings. Every field has a default, so `{}` is a valid spec.
///
/// Fields this version does not know (written by a newer `ctl` or sentinel
/// during a rolling upgrade) are kept in `extra` and written back as they
/// were, so that an older component still follows failovers. `ctl` refuses
/// unknown fields in what an operator writes ([`ClusterSpec::unknown_fields`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterSpec {
    /// How often keepers report their state.
    #[serde(with = "duration_str")]
    pub keeper_report_interval: Duration,
    /// How long the primary must look unhealthy before failover.
    #[serde(with = "duration_str")]
    pub fail_interval: Duration,
    /// How long a proxy routes without confirming a fresh view.
    #[serde(with = "duration_str")]
    pub proxy_timeout: Duration,
    /// How long a proxy holds new clients while there is no primary.
    #[serde(with = "duration_str")]
    pub hold_timeout: Duration,
    /// How long a keeper whose database is primary may go without renewing
    /// its lease before it fences its PostgreSQL.
    #[serde(with = "duration_str")]
    pub fence_timeout: Duration,
    /// Use synchronous replication.
    pub synchronous_replication: bool,
    pub min_sync: u32,
    pub max_sync: u32,
    /// Standbys further behind than this many bytes are not eligible.
    pub max_standby_lag_bytes: u64,
    /// PostgreSQL parameters applied to every instance.
    pub pg_parameters: BTreeMap<String, String>,
    /// Extra pg_hba.conf lines, in order, placed after keelson's own rules
    /// (the keeper's local socket, the replication account) and before the
    /// default client rules, so they can reject or admit clients before
    /// those do. Applied by reload; not while a primary holds clients out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pg_hba: Vec<String>,
    /// How long a failover or switchover step may wait (a candidate that
    /// never becomes primary, an old primary that never stops, a target that
    /// never catches up) before the sentinel tries another way or gives up.
    #[serde(with = "duration_str")]
    pub convergence_timeout: Duration,
    /// The store-outage failsafe (docs/ha.md): a primary whose keeper
    /// cannot reach the store keeps serving past `fence_timeout` while
    /// every other keeper of the cluster promises it, over the node API,
    /// not to promote. Off: it fences at `fence_timeout`, always.
    pub failsafe: bool,
    /// WAL archiving and backups (docs/backup.md); none by default.
    #[serde(skip_serializing_if = "BackupSpec::is_off")]
    pub backup: BackupSpec,
    /// `primary` (the default), or `standby`: a standby cluster
    /// (docs/standby-cluster.md) takes no writes; its elected member, the
    /// standby leader, follows `standby_source`, and the others cascade
    /// from it. `keelson ctl promote` makes it a primary cluster.
    #[serde(skip_serializing_if = "ClusterRole::is_primary")]
    pub role: ClusterRole,
    /// What a standby cluster follows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby_source: Option<StandbySource>,
    /// Fields from a newer keelson, kept as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Whether a cluster takes writes ([`ClusterSpec::role`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClusterRole {
    #[default]
    Primary,
    Standby,
}

impl ClusterRole {
    pub fn is_primary(&self) -> bool {
        *self == ClusterRole::Primary
    }
}

/// The server a standby cluster's leader streams from: a PostgreSQL
/// outside keelson, or another keelson cluster's proxy (its primary
/// listener, which follows that cluster's failovers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct StandbySource {
    pub host: String,
    pub port: u16,
    /// The replication account on the source. It needs `REPLICATION`, and
    /// for pg_rewind (after the source failed over past what this cluster
    /// had replayed) the functions keelson grants its own account.
    pub user: String,
    /// A file holding the account's password (read at every use, so a
    /// Kubernetes Secret's update takes effect), the same path on every
    /// keeper's host.
    pub password_file: String,
    /// A physical replication slot on the source to stream through; it
    /// must exist on whichever server the source routes to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// libpq's `sslmode` for the source (libpq's default, `prefer`, when
    /// unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<String>,
    /// A CA file to check the source's certificate with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl StandbySource {
    /// `host:port`, as keepers name the servers they follow.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Checks what an operator wrote.
    pub fn check(&self) -> Result<(), SpecError> {
        let bad = |why: &str| Err(SpecError(format!("standby_source: {why}")));
        let line = |v: &str| v.contains(['\n', '\r', '\0', '\'', '\\']);
        if self.host.is_empty() || line(&self.host) || self.host.contains(char::is_whitespace) {
            return bad("needs host, the source's host name or address");
        }
        if self.port == 0 {
            return bad("needs port, the source's TCP port");
        }
        if self.user.is_empty() || line(&self.user) {
            return bad("needs user, the replication account on the source");
        }
        if !self.password_file.starts_with('/') || line(&self.password_file) {
            return bad(
                "needs password_file, the absolute path of a file holding the account's password",
            );
        }
        if let Some(slot) = &self.slot {
            let ok = !slot.is_empty()
                && slot.len() <= 63
                && slot
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return bad("slot must be 1 to 63 lower-case letters, digits or underscores, as PostgreSQL names slots");
            }
            if slot.starts_with("keelson_") {
                return bad("slot must not start with keelson_: a keelson source's keeper drops its inactive slots of that prefix");
            }
        }
        if let Some(m) = &self.sslmode {
            let modes = [
                "disable",
                "allow",
                "prefer",
                "require",
                "verify-ca",
                "verify-full",
            ];
            if !modes.contains(&m.as_str()) {
                return bad(&format!("sslmode must be one of {}", modes.join(", ")));
            }
        }
        if self
            .sslrootcert
            .as_ref()
            .is_some_and(|c| !c.starts_with('/') || line(c))
        {
            return bad("sslrootcert must be an absolute path");
        }
        Ok(())
    }
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            keeper_report_interval: Duration::from_secs(1),
            fail_interval: Duration::from_secs(5),
            proxy_timeout: Duration::from_secs(5),
            hold_timeout: Duration::from_secs(10),
            fence_timeout: Duration::from_secs(5),
            synchronous_replication: false,
            min_sync: 1,
            max_sync: 1,
            max_standby_lag_bytes: 16 * 1024 * 1024,
            pg_parameters: BTreeMap::new(),
            pg_hba: Vec::new(),
            convergence_timeout: Duration::from_secs(60),
            failsafe: true,
            backup: BackupSpec::default(),
            role: ClusterRole::Primary,
            standby_source: None,
            extra: BTreeMap::new(),
        }
    }
}

/// The tool that archives WAL and takes backups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackupTool {
    /// No archiving (the default).
    #[default]
    None,
    /// pgBackRest: keelson writes its configuration, creates the stanza,
    /// archives with `archive-push`, restores with `archive-get`, and takes
    /// backups (`ctl backup`).
    Pgbackrest,
    /// The spec's own `archive_command` and `restore_command`.
    Command,
}

/// The spec's `backup` section (docs/backup.md).
///
/// Every instance runs with `archive_mode = on`: the primary archives what
/// it writes; before a standby is promoted, its keeper pushes the segments
/// it holds that the old primary had not archived. The tool must accept a
/// segment already archived with the same content (pgBackRest does) and
/// refuse one with other content (pgBackRest does): a history that
/// diverged is never archived over the one in the repository. Every
/// instance also restores with the tool: a standby that fell behind its
/// upstream's WAL fetches it from the archive, and a promotion picks a
/// timeline number no history file in the archive has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct BackupSpec {
    pub tool: BackupTool,
    /// pgbackrest: the repository (`repo1-path`), an absolute path every
    /// keeper's host sees (a shared volume, or a local disk on one host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// pgbackrest: the stanza (one per cluster in a repository).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stanza: Option<String>,
    /// pgbackrest: more options for its `[global]` section, such as
    /// `repo1-retention-full` or `compress-type`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// command: PostgreSQL's `archive_command` (`%p` the path of the
    /// segment, `%f` its file name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_command: Option<String>,
    /// command: PostgreSQL's `restore_command` (`%f` the file wanted, `%p`
    /// where to put it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_command: Option<String>,
    /// PostgreSQL's `archive_timeout`: a segment is archived at least this
    /// often while anything is written (so at most this much acknowledged
    /// WAL is outside the archive). Off when absent.
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration_str")]
    pub archive_timeout: Option<Duration>,
    /// pgbackrest: new standbys (and `ctl reinit`) start from the newest
    /// backup and the archive instead of a `pg_basebackup` of the primary
    /// (for large databases: the primary is not read in full); a standby
    /// for which no backup exists yet is copied with `pg_basebackup`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub standbys_from_backup: bool,
    /// Fields from a newer keelson, kept as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Serde for an optional humantime duration.
mod opt_duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_str::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => humantime::parse_duration(&s).map(Some).map_err(|e| {
                serde::de::Error::custom(format!("{s:?} is not a duration like \"5s\": {e}"))
            }),
        }
    }
}

/// Where a restore stops replaying the archive (`ctl init --mode pitr`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct RestoreTarget {
    /// `time`, `lsn` or `name` (a restore point's, `pg_create_restore_point`).
    pub kind: String,
    /// A timestamp with its zone (`2026-12-03 10:20:00+00`), an LSN
    /// (`0/3000148`), or a restore point's name.
    pub target: String,
    /// The backup to start from (its label); the newest one that ends
    /// before the target when absent (pgBackRest's choice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
}

impl RestoreTarget {
    /// Checks what an operator gave.
    pub fn check(&self) -> Result<(), SpecError> {
        let bad = |why: String| Err(SpecError(why));
        if self.target.contains(['\n', '\r', '\0', '\'', '"']) || self.target.is_empty() {
            return bad(format!(
                "the restore target {:?} must be one line without quotes",
                self.target
            ));
        }
        match self.kind.as_str() {
            "lsn" => {
                let ok = self.target.split_once('/').is_some_and(|(a, b)| {
                    u32::from_str_radix(a, 16).is_ok() && u32::from_str_radix(b, 16).is_ok()
                });
                if !ok {
                    return bad(format!(
                        "--target-lsn {:?} is not an LSN like 0/3000148",
                        self.target
                    ));
                }
            }
            "time" => {
                let digits = self.target.chars().filter(char::is_ascii_digit).count();
                if digits < 12 || !self.target.contains('-') || !self.target.contains(':') {
                    return bad(format!(
                        "--target-time {:?} is not a timestamp like \"2026-12-03 10:20:00+00\"",
                        self.target
                    ));
                }
            }
            "name" => {
                if self.target.len() > 63 {
                    return bad("--target-name: a restore point's name has at most 63 bytes".into());
                }
            }
            k => return bad(format!("restore target kind {k:?}: time, lsn or name")),
        }
        if let Some(set) = &self.set {
            if !is_stanza_name(set) {
                return bad(format!("--backup {set:?} is not a backup label"));
            }
        }
        Ok(())
    }
}

/// A pgBackRest stanza name: what it accepts in a section header and a
/// repository path.
fn is_stanza_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl BackupSpec {
    pub fn is_off(&self) -> bool {
        self == &BackupSpec::default()
    }

    /// Whether instances archive WAL.
    pub fn archives(&self) -> bool {
        self.tool != BackupTool::None
    }

    /// Checks what an operator wrote in the section.
    pub fn check(&self) -> Result<(), SpecError> {
        let bad = |why: String| Err(SpecError(format!("backup: {why}")));
        let one_line = |name: &str, v: &str| -> Result<(), SpecError> {
            if v.contains(['\n', '\r', '\0']) {
                return bad(format!("{name} must be a single line"));
            }
            Ok(())
        };
        if let Some(t) = self.archive_timeout {
            if t < Duration::from_secs(1) || t > Duration::from_secs(3600) {
                return bad(format!(
                    "archive_timeout ({}) must be between 1s and 1h",
                    humantime::format_duration(t)
                ));
            }
        }
        match self.tool {
            BackupTool::None => {
                if !self.is_off() {
                    return bad(
                        "set tool to \"pgbackrest\" or \"command\" (the other settings need one)"
                            .into(),
                    );
                }
            }
            BackupTool::Pgbackrest => {
                if self.archive_command.is_some() || self.restore_command.is_some() {
                    return bad(
                        "archive_command and restore_command are for tool \"command\"; \
                         with pgbackrest keelson writes them"
                            .into(),
                    );
                }
                match self.repository.as_deref() {
                    Some(r) if r.starts_with('/') => one_line("repository", r)?,
                    Some(r) => return bad(format!("repository {r:?} must be an absolute path")),
                    None => return bad("pgbackrest needs repository, the repository's path".into()),
                }
                match self.stanza.as_deref() {
                    Some(s) if is_stanza_name(s) => {}
                    Some(s) => {
                        return bad(format!(
                            "stanza {s:?} may hold only letters, digits, '-', '_' and '.'"
                        ))
                    }
                    None => {
                        return bad(
                            "pgbackrest needs stanza, a name for this cluster in the repository"
                                .into(),
                        )
                    }
                }
                for (k, v) in &self.options {
                    let key_ok = !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                    if !key_ok {
                        return bad(format!("options: {k:?} is not a pgBackRest option name"));
                    }
                    if [
                        "repo1-path",
                        "pg1-path",
                        "pg1-port",
                        "pg1-socket-path",
                        "pg1-user",
                        "stanza",
                        "config",
                        "log-path",
                        "lock-path",
                        "spool-path",
                    ]
                    .contains(&k.as_str())
                    {
                        return bad(format!("options: {k} is set by keelson"));
                    }
                    one_line(k, v)?;
                }
            }
            BackupTool::Command => {
                if self.repository.is_some()
                    || self.stanza.is_some()
                    || !self.options.is_empty()
                    || self.standbys_from_backup
                {
                    return bad(
                        "repository, stanza, options and standbys_from_backup are for tool \"pgbackrest\""
                            .into(),
                    );
                }
                match self.archive_command.as_deref() {
                    Some(c) if c.contains("%p") || c.contains("%f") => {
                        one_line("archive_command", c)?
                    }
                    Some(_) => {
                        return bad("archive_command must use %p (the segment's path) or %f".into())
                    }
                    None => return bad("tool \"command\" needs archive_command".into()),
                }
                match self.restore_command.as_deref() {
                    Some(c) if c.contains("%p") && c.contains("%f") => {
                        one_line("restore_command", c)?
                    }
                    Some(_) => return bad(
                        "restore_command must use %f (the file wanted) and %p (where to put it)"
                            .into(),
                    ),
                    None => return bad("tool \"command\" needs restore_command".into()),
                }
            }
        }
        Ok(())
    }
}

/// Checks one pg_hba.conf line of the spec: a record of a known type with
/// enough fields (PostgreSQL checks the rest at reload, and keeps its old
/// rules if a line is wrong), on one line, with no include directive.
fn check_hba_line(line: &str) -> Result<(), SpecError> {
    let bad = |why: &str| SpecError(format!("pg_hba line {line:?}: {why}"));
    if line.contains(['\n', '\r', '\0']) {
        return Err(bad("must be a single line"));
    }
    let fields: Vec<&str> = line.split_whitespace().collect();
    let min = match fields.first().copied() {
        Some("local") => 4,
        Some("host" | "hostssl" | "hostnossl" | "hostgssenc" | "hostnogssenc") => 5,
        Some(t) if t.starts_with("include") => {
            return Err(bad("include directives are not allowed"))
        }
        Some(t) if t.starts_with('#') => return Err(bad("a comment is not a rule")),
        Some(t) => {
            return Err(bad(&format!(
                "unknown connection type {t:?} (local, host, hostssl, hostnossl, hostgssenc, hostnogssenc)"
            )))
        }
        None => return Err(bad("is empty")),
    };
    if fields.len() < min {
        return Err(bad(&format!(
            "a {} record needs at least {min} fields (type, database, user{}, method)",
            fields[0],
            if min == 5 { ", address" } else { "" }
        )));
    }
    Ok(())
}

/// `d` rounded up to whole seconds.
pub fn ceil_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// What a proxy registers under its lease at `proxies/<uid>`: the proxy
/// generation it has applied, which acknowledges the fencing handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ProxyReport {
    pub uid: String,
    /// A random id of the proxy process: a second proxy started with the
    /// same uid is refused instead of silently sharing the registration.
    pub instance: String,
    /// The proxy generation whose view this proxy has applied.
    pub generation: u64,
    /// The [`ClusterData::uid`] that generation belongs to: an
    /// acknowledgement left from an earlier incarnation of the cluster (a
    /// `ctl init` after the store was wiped) does not count.
    pub cluster_uid: String,
}

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cluster spec: {0}")]
pub struct SpecError(pub String);

/// How much longer a keeper's lease lives than its self-fence timer:
/// the fence watchdog's tick plus the time an immediate shutdown takes to
/// end every session, with room to spare.
pub const FENCE_SLACK: Duration = Duration::from_millis(500);

/// The longest duration a spec accepts: longer values are mistakes, and
/// would overflow the clocks they are added to.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

impl ClusterSpec {
    /// Checks each setting and the timing relations that safety depends on.
    ///
    /// The relations (see docs/ha.md, "Guarantees"):
    /// - a keeper's lease lives `fence_timeout + FENCE_SLACK`, and its
    ///   self-fence fires `fence_timeout` after the keep-alive that last
    ///   renewed it was sent: once the store has expired the lease, the
    ///   keeper has stopped its PostgreSQL. The sentinel promotes a new
    ///   primary only once the old one acknowledged its demotion or its lease
    ///   is gone, so promotion never precedes the self-fence. The keeper
    ///   renews every [`ClusterSpec::keeper_keepalive_period`]; at least
    ///   three renewals must fit in `fence_timeout`;
    /// - a proxy's lease lives [`ClusterSpec::proxy_lease_ttl`], longer than
    ///   its routing freshness (`proxy_timeout` from the keep-alive that last
    ///   confirmed it) by the keep-alive period plus a request timeout;
    /// - a report is stale after two report intervals, so `fail_interval`
    ///   must be at least two report intervals, or one late report looks
    ///   like a failure;
    /// - `convergence_timeout` must leave a promotion time to finish, and
    ///   exceed [`SWITCHOVER_DRAIN`].
    pub fn validate(&self) -> Result<(), SpecError> {
        let positive = [
            ("keeper_report_interval", self.keeper_report_interval),
            ("fail_interval", self.fail_interval),
            ("proxy_timeout", self.proxy_timeout),
            ("hold_timeout", self.hold_timeout),
            ("fence_timeout", self.fence_timeout),
            ("convergence_timeout", self.convergence_timeout),
        ];
        for (name, d) in positive {
            if d.is_zero() {
                return Err(SpecError(format!("{name} must be greater than zero")));
            }
            if d > MAX_DURATION {
                return Err(SpecError(format!(
                    "{name} ({}) is longer than the limit of {}",
                    humantime::format_duration(d),
                    humantime::format_duration(MAX_DURATION)
                )));
            }
        }
        if self.fail_interval < 2 * self.keeper_report_interval {
            return Err(SpecError(format!(
                "fail_interval ({}) must be at least twice keeper_report_interval ({}): \
                 a report counts as missing after two intervals, so a shorter fail_interval \
                 fails over a primary whose report was merely late",
                humantime::format_duration(self.fail_interval),
                humantime::format_duration(self.keeper_report_interval)
            )));
        }
        if self.fence_timeout < 3 * self.keeper_keepalive_period() {
            return Err(SpecError(format!(
                "fence_timeout ({}) must fit three lease renewals ({} each): \
                 with fewer, one slow store request makes a healthy primary fence itself",
                humantime::format_duration(self.fence_timeout),
                humantime::format_duration(self.keeper_keepalive_period())
            )));
        }
        if self.min_sync > self.max_sync {
            return Err(SpecError(format!(
                "min_sync ({}) must not exceed max_sync ({})",
                self.min_sync, self.max_sync
            )));
        }
        if self.is_standby() && self.standby_source.is_none() {
            return Err(SpecError(
                "role standby needs standby_source: the host, port, user and password_file of \
                 the server to follow"
                    .into(),
            ));
        }
        if self.is_standby() && self.synchronous_replication {
            return Err(SpecError(
                "a standby cluster cannot use synchronous_replication: its members replicate \
                 in cascade, which PostgreSQL never makes synchronous; turn it on after \
                 `keelson ctl promote`"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The shortest `fail_interval` that a store fault alone cannot
    /// exceed: a healthy keeper reports every `keeper_report_interval`,
    /// one of its requests may wait [`crate::store::REQUEST_TIMEOUT`] on a
    /// dead etcd member before its client tries the next, and 1 s covers
    /// the sentinel's tick and the keeper's own round.
    pub fn tolerant_fail_interval(&self) -> Duration {
        self.keeper_report_interval + crate::store::REQUEST_TIMEOUT + Duration::from_secs(1)
    }

    /// Settings that are safe but cost availability, each as a sentence
    /// (`ctl init` and `ctl spec update` print them; nothing is refused: a
    /// short `fail_interval` is a trade the operator may choose).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let tolerant = self.tolerant_fail_interval();
        if self.fail_interval < tolerant {
            out.push(format!(
                "fail_interval ({}) is shorter than keeper_report_interval + the 2s store request \
                 timeout + 1s ({}): a healthy primary whose keeper waits on one dead etcd member \
                 can be failed over",
                humantime::format_duration(self.fail_interval),
                humantime::format_duration(tolerant)
            ));
        }
        out
    }

    /// [`ClusterSpec::validate`], and the checks of what an operator
    /// writes (`ctl init`, `ctl spec update`) on top: pg_hba lines,
    /// `pg_parameters` names and values, `convergence_timeout` longer than
    /// the switchover drain. These apply only to what changes from
    /// `before` (the stored spec), and never to stored data as it is read:
    /// a spec an older keelson accepted keeps working, and can be patched.
    pub fn validate_written(&self, before: Option<&ClusterSpec>) -> Result<(), SpecError> {
        self.validate()?;
        self.check_standby(before)?;
        for line in &self.pg_hba {
            if before.is_none_or(|b| !b.pg_hba.contains(line)) {
                check_hba_line(line)?;
            }
        }
        if before.is_none_or(|b| b.backup != self.backup) {
            self.backup.check()?;
        }
        // A candidate's keeper pushes what the old primary left unarchived
        // (up to PUSH_UNARCHIVED_BUDGET, after a status query of up to 2 s)
        // before it promotes: the sentinel must not give up on it meanwhile.
        let push = PUSH_UNARCHIVED_BUDGET + Duration::from_secs(2) + SWITCHOVER_DRAIN;
        let push_changed = before.is_none_or(|b| {
            (b.backup.archives(), b.convergence_timeout)
                != (self.backup.archives(), self.convergence_timeout)
        });
        if self.backup.archives() && push_changed && self.convergence_timeout <= push {
            return Err(SpecError(format!(
                "convergence_timeout ({}) must be longer than {} with a backup tool: before a \
                 standby is promoted in a failover its keeper may spend {} pushing the WAL the \
                 old primary left unarchived",
                humantime::format_duration(self.convergence_timeout),
                humantime::format_duration(push),
                humantime::format_duration(PUSH_UNARCHIVED_BUDGET),
            )));
        }
        if self.backup.archives() {
            for name in self.pg_parameters.keys() {
                let lower = name.to_ascii_lowercase();
                if [
                    "archive_mode",
                    "archive_command",
                    "restore_command",
                    "archive_timeout",
                    "archive_library",
                ]
                .contains(&lower.as_str())
                {
                    return Err(SpecError(format!(
                        "pg_parameters: {name} is set by keelson from the backup section; remove it \
                         with --patch '{{\"pg_parameters\": {{\"{name}\": null}}}}'"
                    )));
                }
            }
        }
        for (name, value) in &self.pg_parameters {
            if before.and_then(|b| b.pg_parameters.get(name)) != Some(value) {
                crate::params::check_spec_parameter(name, value)
                    .map_err(|e| SpecError(format!("pg_parameters: {e}")))?;
            }
        }
        let drain_changed =
            before.is_none_or(|b| b.convergence_timeout != self.convergence_timeout);
        if drain_changed && self.convergence_timeout <= SWITCHOVER_DRAIN {
            return Err(SpecError(format!(
                "convergence_timeout ({}) must be longer than {}: a switchover's old primary \
                 waits that long for open transactions before it stops",
                humantime::format_duration(self.convergence_timeout),
                humantime::format_duration(SWITCHOVER_DRAIN)
            )));
        }
        // A candidate that gave the old primary a failsafe promise waits
        // for it to end (fence_timeout + FENCE_SLACK) before it promotes.
        let promise_changed = before.is_none_or(|b| {
            (b.convergence_timeout, b.fence_timeout, b.failsafe)
                != (self.convergence_timeout, self.fence_timeout, self.failsafe)
        });
        let wait = self.fence_timeout + FENCE_SLACK + SWITCHOVER_DRAIN;
        if self.failsafe && promise_changed && self.convergence_timeout <= wait {
            return Err(SpecError(format!(
                "convergence_timeout ({}) must be longer than {} (fence_timeout + {} + {}): \
                 with the failsafe on, a standby that promised the old primary not to promote \
                 waits fence_timeout + {} before it promotes, and then needs time to finish",
                humantime::format_duration(self.convergence_timeout),
                humantime::format_duration(wait),
                humantime::format_duration(FENCE_SLACK),
                humantime::format_duration(SWITCHOVER_DRAIN),
                humantime::format_duration(FENCE_SLACK),
            )));
        }
        Ok(())
    }

    /// Whether this is a standby cluster ([`ClusterSpec::role`]).
    pub fn is_standby(&self) -> bool {
        self.role == ClusterRole::Standby
    }

    /// The standby-cluster rules of what an operator writes.
    fn check_standby(&self, before: Option<&ClusterSpec>) -> Result<(), SpecError> {
        if let Some(s) = &self.standby_source {
            if before.is_none_or(|b| b.standby_source.as_ref() != Some(s)) {
                s.check()?;
            }
        }
        if self.is_standby() && before.is_some_and(|b| !b.is_standby()) {
            return Err(SpecError(
                "a primary cluster cannot become a standby cluster: its data may have diverged \
                 from the source's; make a new cluster with `keelson ctl init` and role standby"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Fields this version of keelson does not know; an operator's spec
    /// with any is refused by `ctl` (a typo must not be silently ignored).
    pub fn unknown_fields(&self) -> Vec<String> {
        let nested = self.backup.extra.keys().map(|k| format!("backup.{k}"));
        let source = self
            .standby_source
            .iter()
            .flat_map(|s| s.extra.keys().map(|k| format!("standby_source.{k}")));
        self.extra
            .keys()
            .cloned()
            .chain(nested)
            .chain(source)
            .collect()
    }

    /// How often a keeper renews its lease: a quarter of `fence_timeout`,
    /// between 100 ms and 1 s.
    pub fn keeper_keepalive_period(&self) -> Duration {
        (self.fence_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// The TTL of a keeper's lease: `fence_timeout` plus [`FENCE_SLACK`].
    /// The store rounds it up where it only has whole seconds (etcd).
    pub fn keeper_lease_ttl(&self) -> Duration {
        self.fence_timeout + FENCE_SLACK
    }

    /// How long after its last change a keeper's report counts as missing:
    /// two report intervals.
    pub fn report_stale_after(&self) -> Duration {
        2 * self.keeper_report_interval
    }

    /// How often a proxy renews its registration lease and re-reads the
    /// cluster data: a quarter of `proxy_timeout`, between 100 ms and 1 s.
    pub fn proxy_keepalive_period(&self) -> Duration {
        (self.proxy_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// The TTL of a proxy's registration lease. A proxy stops routing to
    /// the primary `proxy_timeout` after the keep-alive that last confirmed
    /// its view was sent; its lease, counted by the store from when that
    /// keep-alive arrived, must outlive that, by the keep-alive period plus
    /// a store request's timeout. Rounded up to whole seconds (etcd leases
    /// are whole seconds).
    pub fn proxy_lease_ttl(&self) -> Duration {
        ceil_secs(
            self.proxy_timeout + self.proxy_keepalive_period() + crate::store::REQUEST_TIMEOUT,
        )
    }
}

/// The phase of the whole cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClusterPhase {
    /// Created by `ctl init`; no primary elected yet.
    #[default]
    Initializing,
    /// A primary exists (or existed) and failover is managed.
    Normal,
}

/// A keeper, as the sentinel knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Keeper {
    /// Higher is preferred at failover, among equally advanced standbys.
    pub priority: i32,
    /// Never elect this keeper's database as primary.
    pub never_primary: bool,
    /// Never choose this keeper's database as a synchronous standby.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub no_sync: bool,
    /// Proxies send this keeper's database no replica sessions.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub no_loadbalance: bool,
    /// The tags this keeper's flags last set (see [`KeeperReport::tags`]):
    /// flags that change win over `ctl keeper set`; flags that stay do not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported_tags: Option<Tags>,
    /// Set by `keelson ctl failkeeper`: the sentinel treats this keeper's
    /// database as failed (past `fail_interval`) for one decision, then
    /// clears the flag.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub failed: bool,
    /// The cluster's [`ClusterData::membership`] when this keeper joined:
    /// a primary whose last report read cluster data older than that does
    /// not know this keeper, so never asked it for a failsafe promise.
    #[serde(skip_serializing_if = "is_zero")]
    pub joined: u64,
    /// Fields from a newer keelson, kept as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A keeper's tags: how the sentinel and the proxies treat its database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Tags {
    pub priority: i32,
    pub never_primary: bool,
    pub no_sync: bool,
    pub no_loadbalance: bool,
}

impl Keeper {
    pub fn tags(&self) -> Tags {
        Tags {
            priority: self.priority,
            never_primary: self.never_primary,
            no_sync: self.no_sync,
            no_loadbalance: self.no_loadbalance,
        }
    }

    pub fn set_tags(&mut self, t: &Tags) {
        self.priority = t.priority;
        self.never_primary = t.never_primary;
        self.no_sync = t.no_sync;
        self.no_loadbalance = t.no_loadbalance;
    }
}

/// The role a database should have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Master,
    Standby,
    #[default]
    None,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Standby => "standby",
            Role::None => "none",
        }
    }
}

/// What a database should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct DbSpec {
    pub role: Role,
    /// For a standby: the database it follows.
    pub follow: Option<String>,
    /// For a master: the standbys named in `synchronous_standby_names`.
    pub synchronous_standbys: Vec<String>,
    /// Replace the data with a fresh copy of the upstream's before
    /// following it: a candidate given up on may have promoted itself onto
    /// the timeline number the next primary also takes, where pg_rewind
    /// sees "the same timeline" and repairs nothing.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reinit: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How long a primary leaving its role in a planned switchover waits for
/// open transactions to end before it stops, and how long proxies let its
/// sessions finish one (proxy-core's `fence::SWITCHOVER_DRAIN`, kept equal
/// by a test).
pub const SWITCHOVER_DRAIN: Duration = Duration::from_secs(5);

/// WAL archiving on one instance, as PostgreSQL reports it
/// (`pg_stat_archiver`, since the server started or its statistics were
/// reset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ArchiveStatus {
    /// `archive_mode` the server runs with.
    pub mode: String,
    pub archived_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_archived_wal: Option<String>,
    pub failed_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failed_wal: Option<String>,
    /// The latest attempt failed (no segment was archived after it): WAL
    /// piles up in `pg_wal` until the tool succeeds again.
    pub failing: bool,
}

/// A `ctl backup` request: the keeper of the database it names takes a
/// backup once for each new `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct BackupRequest {
    pub id: u64,
    /// Taken on a standby (pgBackRest's `--backup-standby`): the files are
    /// copied from it, the primary only starts and stops the backup.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub from_standby: bool,
    /// pgBackRest's `--type` (`full`, `diff`, `incr`); its default (an
    /// incremental one, full when there is none) when empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
}

/// Where a keeper's pgBackRest TLS server listens, and what a client on
/// another host names to reach this keeper's PostgreSQL through it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PgbackrestServer {
    /// `host:port`.
    pub address: String,
    /// pgBackRest's configuration file on that host (`pg-host-config`).
    pub config: String,
    /// The data directory and socket directory on that host.
    pub data_dir: String,
    pub socket_dir: String,
    /// The common name of the keeper's certificate: the other keepers'
    /// servers let it in (`tls-server-auth`).
    pub cn: String,
}

/// The outcome of the last backup a keeper took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct BackupDone {
    /// The [`BackupRequest::id`] it answers.
    pub id: u64,
    pub ok: bool,
    /// The backup's label, or what the tool said when it failed.
    pub detail: String,
}

/// How long a standby's keeper may push, before it promotes it in a
/// failover, the segments the old primary left unarchived (with a backup
/// tool; docs/backup.md).
pub const PUSH_UNARCHIVED_BUDGET: Duration = Duration::from_secs(5);

/// Settings a standby must have at least as high as the primary's, or it
/// does not start (hot standby).
pub const HOT_STANDBY_SETTINGS: [&str; 5] = [
    "max_connections",
    "max_locks_per_transaction",
    "max_prepared_transactions",
    "max_wal_senders",
    "max_worker_processes",
];

/// What a database was last seen doing, from its keeper's reports.
///
/// A report never erases what is known: a keeper whose PostgreSQL is down
/// or hung reports `lsn`, `timeline` and the synchronous standbys as
/// unknown, and the last known values stay here. They decide who may take
/// over from a dead primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct DbStatus {
    /// PostgreSQL runs and answers queries, and its keeper reports.
    pub healthy: bool,
    /// The keeper reports its postmaster running (answering or not).
    pub running: bool,
    /// `host:port` clients and proxies connect to.
    pub address: Option<String>,
    /// The last known WAL position (see [`KeeperReport::lsn`]).
    pub lsn: u64,
    /// The last known timeline.
    pub timeline: u32,
    pub system_id: Option<String>,
    pub in_recovery: bool,
    /// The generation of this database's spec the keeper has applied.
    pub applied_generation: u64,
    /// Standbys PostgreSQL last reported as synchronous (`pg_stat_replication`).
    pub synchronous_standbys: Vec<String>,
    /// On a primary in synchronous mode: the standbys that hold every commit
    /// it acknowledged. A member joins once the primary runs a spec naming
    /// it and PostgreSQL reports it synchronous; it leaves as soon as the
    /// spec stops naming it. Only these may replace the primary.
    pub sync_confirmed: Vec<String>,
    /// After a clean shutdown: the location of the shutdown checkpoint, the
    /// last WAL record this database wrote. `None` while running or unknown.
    pub stopped_lsn: Option<u64>,
    /// On a standby: the last replayed LSN (what its queries see).
    pub replay_lsn: u64,
    /// On a standby: time since the last replayed transaction while replay
    /// is behind what was received; 0 when caught up; `None` if unknown.
    pub replay_lag_ms: Option<u64>,
    /// On a standby: whether its WAL receiver is streaming.
    pub streaming: bool,
    /// What is wrong, in words, when it is not healthy.
    pub problem: Option<String>,
    /// Parameters PostgreSQL reports changed in its configuration but not
    /// in effect until a restart (`pg_settings.pending_restart`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending_restart: Vec<String>,
    /// The values of [`HOT_STANDBY_SETTINGS`] PostgreSQL runs with.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub running_settings: BTreeMap<String, String>,
    /// The last [`Db::restart`] the keeper carried out.
    #[serde(skip_serializing_if = "is_zero")]
    pub restarted: u64,
    /// Its keeper's node API, `host:port` (see [`KeeperReport::api_address`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_address: Option<String>,
    /// The [`ClusterData::membership`] of the cluster data its keeper last
    /// read (see [`KeeperReport::membership`]).
    #[serde(skip_serializing_if = "is_zero")]
    pub membership: u64,
    /// WAL archiving, when the spec has a backup tool and PostgreSQL
    /// answers (see [`KeeperReport::archive`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveStatus>,
    /// The last backup its keeper took (see [`KeeperReport::backup`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupDone>,
    /// Its keeper's pgBackRest TLS server (see [`KeeperReport::pgbackrest_server`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgbackrest_server: Option<PgbackrestServer>,
}

/// One PostgreSQL instance, managed by one keeper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Db {
    pub keeper: String,
    /// Bumped whenever `spec` changes.
    pub generation: u64,
    /// Bumped by `ctl restart`: the keeper restarts its running PostgreSQL
    /// once for each new value (the sentinel never changes it).
    #[serde(skip_serializing_if = "is_zero")]
    pub restart: u64,
    /// Set by `ctl backup`: the keeper takes a backup once per new id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupRequest>,
    pub spec: DbSpec,
    pub status: DbStatus,
}

/// What a keeper reports about its database, under its lease at
/// `keepers/<uid>`. A missing report means the keeper is gone.
///
/// Values the keeper could not read this time (its PostgreSQL is down or
/// hung) are `None`: they are unknown, not zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct KeeperReport {
    pub uid: String,
    /// A random id of the keeper process.
    pub instance: String,
    /// Counts this keeper process's reports. The sentinel judges whether a
    /// keeper reports by seeing this change, on its own clock: no clocks of
    /// different hosts are compared.
    pub seq: u64,
    /// Whether PostgreSQL is running and answering queries.
    pub healthy: bool,
    /// Whether the keeper's postmaster process is running.
    pub running: bool,
    /// `host:port` of its PostgreSQL.
    pub address: Option<String>,
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// The current WAL position: write LSN on a primary, last received (or
    /// replayed, whichever is higher) on a standby; after a clean shutdown,
    /// the shutdown checkpoint's location from the control file.
    pub lsn: Option<u64>,
    pub timeline: Option<u32>,
    /// From the control file, so known while PostgreSQL is stopped too.
    pub system_id: Option<String>,
    /// The database spec generation the keeper has applied. On a primary in
    /// synchronous mode, applied means `SHOW synchronous_standby_names`
    /// returned what that generation asks for.
    pub applied_generation: u64,
    /// Standbys reported as synchronous by `pg_stat_replication`.
    pub synchronous_standbys: Option<Vec<String>>,
    /// After a clean shutdown (`pg_controldata` says "shut down"): the
    /// shutdown checkpoint's location.
    pub stopped_lsn: Option<u64>,
    /// On a standby: the last replayed LSN.
    pub replay_lsn: u64,
    /// On a standby: time since the last replayed transaction while replay
    /// is behind; 0 when caught up; `None` if unknown.
    pub replay_lag_ms: Option<u64>,
    /// On a standby: whether its WAL receiver is streaming.
    pub streaming: bool,
    /// On a standby: milliseconds since its WAL receiver was last seen
    /// streaming (0 while it streams), by the keeper's own clock; `None`
    /// if it has not streamed since the keeper started.
    pub streaming_age_ms: Option<u64>,
    /// What is wrong, in words, when it is not healthy.
    pub problem: Option<String>,
    /// The tags the keeper's flags set, if any were given: taken into the
    /// cluster data when it joins, and again whenever they change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
    /// Parameters changed in the configuration PostgreSQL runs with that
    /// take effect only at a restart (`pg_settings.pending_restart`);
    /// `None` when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_restart: Option<Vec<String>>,
    /// The values of [`HOT_STANDBY_SETTINGS`] PostgreSQL runs with;
    /// `None` when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running_settings: Option<BTreeMap<String, String>>,
    /// The last [`Db::restart`] this keeper carried out.
    pub restarted: u64,
    /// Its node API (`--api-advertise`, else `--api-listen`), `host:port`:
    /// where a primary asks it for a failsafe promise, and proxies ask a
    /// primary's keeper how long they may route to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_address: Option<String>,
    /// The [`ClusterData::membership`] of the cluster data it read last:
    /// the keepers it would ask for failsafe promises.
    #[serde(skip_serializing_if = "is_zero")]
    pub membership: u64,
    /// `pg_stat_archiver` when the spec has a backup tool and PostgreSQL
    /// answers; `None` otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveStatus>,
    /// The last backup this keeper took for a [`BackupRequest`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupDone>,
    /// The pgBackRest TLS server this keeper runs (`--pgbackrest-listen`),
    /// through which a standby's keeper takes a backup from its standby
    /// with this primary's help (`ctl backup --from-standby`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgbackrest_server: Option<PgbackrestServer>,
}

/// A failover in progress: the fencing handshake and the promotion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Failover {
    /// The database that was primary.
    pub from: String,
    /// Databases that must have stopped (their keeper acknowledged the
    /// demotion) or lost their keeper's lease before a new primary is
    /// promoted: the old primary, and any candidate given up on.
    pub fence: Vec<String>,
    /// Candidates given up on (they did not become primary in time).
    pub excluded: Vec<String>,
    /// The proxy generation that named no primary; every live proxy must
    /// acknowledge it before a new primary is named.
    pub fence_generation: u64,
    /// The database chosen to be promoted, once chosen.
    pub to: Option<String>,
    /// Why: "failover" or "switchover".
    pub reason: String,
    /// For a switchover: the standby the operator asked for, if any.
    pub requested: Option<String>,
    /// The old primary's synchronous standbys when the failover began: the
    /// new primary's set starts from them, and a primary given back gets
    /// them back.
    pub synchronous_standbys: Vec<String>,
}

/// Reason of a planned switchover in [`Failover::reason`].
pub const SWITCHOVER: &str = "switchover";

/// What proxies route by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ProxySection {
    /// Bumped on every change of this section.
    pub generation: u64,
    /// The database that takes primary traffic; `None` while there is none
    /// (also during the fencing handshake of a failover).
    pub master_db: Option<String>,
}

/// The whole cluster state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterData {
    pub format_version: u32,
    /// A random id made when the cluster data is created (`ctl init`).
    #[serde(default)]
    pub uid: String,
    pub phase: ClusterPhase,
    pub spec: ClusterSpec,
    #[serde(default)]
    pub keepers: BTreeMap<String, Keeper>,
    #[serde(default)]
    pub dbs: BTreeMap<String, Db>,
    #[serde(default)]
    pub proxy: ProxySection,
    /// A failover or switchover in progress.
    #[serde(default)]
    pub failover: Option<Failover>,
    /// Bumped by `ctl reload`: every keeper rewrites its configuration and
    /// reloads PostgreSQL once for each new value.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reload: u64,
    /// Set by `ctl init --existing UID`: the keeper whose existing data
    /// becomes the first primary. Without it, a new cluster whose keepers
    /// already hold data elects no one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_existing: Option<String>,
    /// `ctl init --mode pitr`: the first primary is restored from a backup
    /// of the spec's repository and stanza and replays the archive to this
    /// target instead of running initdb.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_restore: Option<RestoreTarget>,
    /// Why the sentinel is waiting, in words (no eligible standby, a fence
    /// not yet acknowledged, ...); `None` when nothing is blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// Maintenance mode (`ctl pause`): no automatic failover, and keepers
    /// leave PostgreSQL as it is; a switchover or `failkeeper` on request
    /// still works.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Every change of primary, oldest first (the last [`HISTORY_LEN`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<PrimaryChange>,
    /// Counts the sentinel's changes to the set of keepers (a keeper
    /// joining or removed); see [`Keeper::joined`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub membership: u64,
    /// Fields from a newer keelson, kept as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// How many primary changes [`ClusterData::history`] keeps.
pub const HISTORY_LEN: usize = 100;

/// One change of primary, as `ctl history` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PrimaryChange {
    /// When the new primary was named: milliseconds since the Unix epoch,
    /// by the deciding sentinel's wall clock (for people to read; no timer
    /// depends on it).
    pub at_ms: u64,
    /// `failover`, `switchover`, or `initial` (the first primary).
    pub reason: String,
    pub from: Option<String>,
    pub to: String,
    /// The new primary's timeline and WAL position when it was named.
    pub timeline: u32,
    pub lsn: u64,
}

/// Why stored cluster data could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("clusterdata is not valid JSON for this version of keelson: {0}")]
    Json(#[from] serde_json::Error),
    #[error("clusterdata has format version {0}; this keelson reads version {FORMAT_VERSION}; upgrade keelson")]
    Version(u32),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("clusterdata names master database {0:?}, which it does not contain")]
    UnknownMaster(String),
}

/// The part of the cluster data a proxy routes by.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyView {
    pub generation: u64,
    /// Address of the primary, if one is named and has an address.
    pub primary: Option<String>,
    /// Healthy standbys, with their lag.
    pub replicas: Vec<ReplicaView>,
}

/// A standby as proxies see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicaView {
    pub address: String,
    /// The primary's last reported LSN minus this standby's replayed LSN.
    pub lag_bytes: u64,
    pub lag_ms: Option<u64>,
    pub streaming: bool,
}

impl ClusterData {
    /// A new cluster, not yet initialised by a sentinel.
    pub fn new(spec: ClusterSpec) -> Self {
        ClusterData {
            format_version: FORMAT_VERSION,
            uid: crate::store::instance_id(),
            phase: ClusterPhase::Initializing,
            spec,
            keepers: BTreeMap::new(),
            dbs: BTreeMap::new(),
            proxy: ProxySection::default(),
            failover: None,
            init_existing: None,
            init_restore: None,
            notice: None,
            paused: false,
            history: Vec::new(),
            membership: 0,
            reload: 0,
            extra: BTreeMap::new(),
        }
    }

    pub fn to_json(&self) -> String {
        let text = if self.spec.is_standby() && self.format_version == FORMAT_VERSION {
            let d = ClusterData {
                format_version: STANDBY_FORMAT_VERSION,
                ..self.clone()
            };
            serde_json::to_string_pretty(&d)
        } else {
            serde_json::to_string_pretty(self)
        };
        // Serializing plain structs with string keys cannot fail.
        text.unwrap_or_default()
    }

    /// Parses and validates stored cluster data.
    pub fn from_json(s: &str) -> Result<Self, DataError> {
        let mut d: ClusterData = serde_json::from_str(s)?;
        // A standby cluster's version (see STANDBY_FORMAT_VERSION) only
        // with its role.
        let standby = d.format_version == STANDBY_FORMAT_VERSION && d.spec.is_standby();
        if d.format_version != FORMAT_VERSION && !standby {
            return Err(DataError::Version(d.format_version));
        }
        d.format_version = FORMAT_VERSION;
        d.spec.validate()?;
        if let Some(m) = &d.proxy.master_db {
            if !d.dbs.contains_key(m) {
                return Err(DataError::UnknownMaster(m.clone()));
            }
        }
        Ok(d)
    }

    /// What proxies should route by.
    ///
    /// A standby cluster names no primary (nothing in it takes writes);
    /// its standby leader takes replica sessions with the other members.
    pub fn proxy_view(&self) -> ProxyView {
        let standby = self.spec.is_standby();
        let primary = self
            .proxy
            .master_db
            .as_ref()
            .filter(|_| !standby)
            .and_then(|m| self.dbs.get(m))
            .and_then(|db| db.status.address.clone());
        let master_lsn = self
            .proxy
            .master_db
            .as_ref()
            .and_then(|m| self.dbs.get(m))
            .map(|db| db.status.lsn);
        let replicas = self
            .dbs
            .iter()
            .filter(|(uid, db)| {
                let leader = standby
                    && db.spec.role == Role::Master
                    && Some(*uid) == self.proxy.master_db.as_ref();
                (leader
                    || (Some(*uid) != self.proxy.master_db.as_ref()
                        && db.spec.role == Role::Standby))
                    && db.status.healthy
                    && db.status.in_recovery
                    && !self
                        .keepers
                        .get(&db.keeper)
                        .is_some_and(|k| k.no_loadbalance)
            })
            .filter_map(|(_, db)| {
                Some(ReplicaView {
                    address: db.status.address.clone()?,
                    // Without a primary there is nothing to lag behind.
                    lag_bytes: master_lsn.map_or(0, |m| m.saturating_sub(db.status.replay_lsn)),
                    lag_ms: db.status.replay_lag_ms,
                    streaming: db.status.streaming,
                })
            })
            .collect();
        ProxyView {
            generation: self.proxy.generation,
            primary,
            replicas,
        }
    }

    /// Replaces the spec (`ctl spec update`, `ctl promote`). A standby
    /// cluster made a primary cluster names no primary in the same write:
    /// its leader is still in recovery, and a proxy reading the new spec
    /// with it named would route writes to it. The sentinel names it again
    /// once it has left recovery.
    pub fn set_spec(&mut self, spec: ClusterSpec) {
        let promoted = self.spec.is_standby() && !spec.is_standby();
        self.spec = spec;
        if promoted && self.proxy.master_db.is_some() {
            self.set_proxy_master(None);
        }
    }

    /// Why `ctl promote` must not promote this standby cluster now, or
    /// `None`. What is promoted must be a copy of the source, and the most
    /// advanced one there is: not while a failover or switchover inside it
    /// is electing another leader (it may elect a less advanced member), not
    /// without a healthy leader holding data, and, unless `force`, not while
    /// a member that is down was last seen ahead of the leader (it may hold
    /// the source's WAL the leader lacks: with the source gone, the newest
    /// copy). A healthy member streams from the leader: never really ahead
    /// of it, though its newer report can be.
    pub fn why_not_promote(&self, force: bool) -> Option<String> {
        use crate::status::format_lsn;
        if !self.spec.is_standby() {
            return Some("the cluster is not a standby cluster: it takes writes already".into());
        }
        if let Some(f) = &self.failover {
            return Some(format!(
                "a {} from {} is under way: promote once `keelson ctl status` shows a standby \
                 leader again (the member it elects may not be the most advanced)",
                f.reason, f.from
            ));
        }
        let Some((m, db)) = self
            .proxy
            .master_db
            .as_ref()
            .and_then(|m| self.dbs.get(m).map(|db| (m, db)))
        else {
            return Some(
                "the standby cluster has no standby leader yet: nothing to promote".into(),
            );
        };
        if !(db.status.healthy && db.status.in_recovery && db.status.system_id.is_some()) {
            return Some(format!(
                "the standby leader {m} is not a healthy standby holding the source's data ({}); \
                 promote once it is",
                db.status.problem.as_deref().unwrap_or("not healthy")
            ));
        }
        let ahead: Vec<String> = self
            .dbs
            .iter()
            .filter(|(u, o)| *u != m && !o.status.healthy && o.status.lsn > db.status.lsn)
            .map(|(u, o)| format!("{u} (last seen at {})", format_lsn(o.status.lsn)))
            .collect();
        if !ahead.is_empty() && !force {
            return Some(format!(
                "{} ahead of the standby leader {m} ({}): promoting {m} would lose the source's \
                 WAL beyond it. Bring it back (it then catches up, or leads), or promote anyway \
                 with --force",
                ahead.join(", "),
                format_lsn(db.status.lsn)
            ));
        }
        None
    }

    /// Names `db` (or nobody) as the primary proxies route to, bumping the
    /// proxy generation.
    pub fn set_proxy_master(&mut self, db: Option<&str>) {
        self.proxy.master_db = db.map(str::to_owned);
        self.proxy.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_roundtrip_and_validate() {
        let d = ClusterData::new(ClusterSpec::default());
        let back = ClusterData::from_json(&d.to_json()).unwrap();
        assert_eq!(back, d);
        assert!(d.to_json().contains("\"fail_interval\": \"5s\""));
        let spec: ClusterSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec, ClusterSpec::default());
    }

    #[test]
    fn pg_hba_lines_are_checked() {
        let spec = |l: &str| ClusterSpec {
            pg_hba: vec![l.to_owned()],
            ..Default::default()
        };
        for ok in [
            "host all mallory 0.0.0.0/0 reject",
            "local all all peer",
            "hostssl app app 10.0.0.0/8 scram-sha-256 clientcert=verify-full",
        ] {
            assert!(spec(ok).validate_written(None).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("host all all reject", "at least 5 fields"),
            ("hots all all 0.0.0.0/0 trust", "unknown connection type"),
            ("include_dir /etc", "include"),
            ("host all all 0/0 trust\nlocal all all trust", "single line"),
            ("", "empty"),
        ] {
            let e = spec(bad).validate_written(None).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// A spec an older keelson accepted (a managed parameter, a low
    /// max_wal_senders, a short convergence_timeout) still parses, so that
    /// every role keeps working after an upgrade; only what an operator
    /// changes is checked, so such a spec can be patched.
    #[test]
    fn stored_specs_from_older_versions_still_load_and_can_be_patched() {
        let mut spec = ClusterSpec {
            convergence_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        spec.pg_parameters
            .insert("wal_level".into(), "logical".into());
        spec.pg_parameters
            .insert("max_wal_senders".into(), "5".into());
        let d = ClusterData::new(spec.clone());
        assert_eq!(ClusterData::from_json(&d.to_json()).unwrap().spec, spec);
        let mut patched = spec.clone();
        patched
            .pg_parameters
            .insert("work_mem".into(), "8MB".into());
        assert_eq!(patched.validate_written(Some(&spec)), Ok(()));
        // Written anew, each is refused.
        let e = spec.validate_written(None).unwrap_err().to_string();
        assert!(
            e.contains("pg_parameters") || e.contains("convergence_timeout"),
            "{e}"
        );
        let mut changed = spec.clone();
        changed
            .pg_parameters
            .insert("wal_level".into(), "minimal".into());
        assert!(changed.validate_written(Some(&spec)).is_err());
        // convergence_timeout must exceed the switchover drain, at the
        // boundary (the failsafe's relation is tested on its own).
        let at = |ms: u64| ClusterSpec {
            convergence_timeout: Duration::from_millis(ms),
            failsafe: false,
            ..Default::default()
        };
        assert!(at(5000).validate_written(None).is_err());
        assert_eq!(at(5001).validate_written(None), Ok(()));
    }

    #[test]
    fn bad_specs_are_refused_with_reasons() {
        let s = ClusterSpec {
            min_sync: 2,
            max_sync: 1,
            ..Default::default()
        };
        assert!(s.validate().unwrap_err().to_string().contains("min_sync"));
        let s = ClusterSpec {
            proxy_timeout: Duration::ZERO,
            ..Default::default()
        };
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("proxy_timeout"));
        assert!(serde_json::from_str::<ClusterSpec>(r#"{"fail_interval":"soon"}"#).is_err());
        let huge = ClusterSpec {
            hold_timeout: Duration::from_secs(300_000_000_000),
            ..Default::default()
        };
        let e = huge.validate().unwrap_err().to_string();
        assert!(e.contains("hold_timeout") && e.contains("limit"), "{e}");
    }

    #[test]
    fn unknown_spec_fields_survive_a_round_trip() {
        // A newer ctl wrote a field this version does not know: it is kept,
        // so that writing the data back does not drop it, and it does not
        // stop this version from reading the rest.
        let json = r#"{"fail_interval":"3s","from_the_future":{"a":1}}"#;
        let spec: ClusterSpec = serde_json::from_str(json).unwrap();
        assert_eq!(spec.fail_interval, Duration::from_secs(3));
        assert_eq!(spec.unknown_fields(), vec!["from_the_future".to_string()]);
        let back = serde_json::to_string(&spec).unwrap();
        assert!(back.contains(r#""from_the_future":{"a":1}"#), "{back}");
        let mut d = ClusterData::new(spec);
        d.extra.insert("later".into(), serde_json::json!(true));
        let again = ClusterData::from_json(&d.to_json()).unwrap();
        assert_eq!(again, d);
    }

    /// The warning's boundary: keeper_report_interval + 2 s + 1 s.
    #[test]
    fn a_fail_interval_a_store_fault_can_exceed_is_warned_of() {
        let at = |fail_ms: u64| ClusterSpec {
            fail_interval: Duration::from_millis(fail_ms),
            ..Default::default()
        };
        assert!(ClusterSpec::default().warnings().is_empty());
        assert!(at(4000).warnings().is_empty());
        let w = at(3999).warnings();
        assert!(
            w.len() == 1 && w[0].contains("fail_interval (3s 999ms)"),
            "{w:?}"
        );
        assert!(at(3999).validate().is_ok(), "warned, not refused");
    }

    /// The timing relations are checked at their boundary, not far inside.
    #[test]
    fn timing_relations_are_enforced_at_the_boundary() {
        let base = ClusterSpec::default();
        // fail_interval >= 2 report intervals.
        let ok = ClusterSpec {
            keeper_report_interval: Duration::from_millis(1500),
            fail_interval: Duration::from_secs(3),
            ..base.clone()
        };
        assert_eq!(ok.validate(), Ok(()));
        let bad = ClusterSpec {
            fail_interval: Duration::from_millis(2999),
            ..ok.clone()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("fail_interval") && e.contains("twice"), "{e}");
        // fence_timeout fits three renewals of fence_timeout/4 (at least
        // 100 ms each): 300 ms is the smallest.
        let ok = ClusterSpec {
            fence_timeout: Duration::from_millis(300),
            ..base.clone()
        };
        assert_eq!(ok.validate(), Ok(()));
        let bad = ClusterSpec {
            fence_timeout: Duration::from_millis(299),
            ..base.clone()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("fence_timeout") && e.contains("renewals"), "{e}");
        // The keeper's lease outlives its self-fence.
        for ms in [300u64, 1000, 5000, 7300] {
            let s = ClusterSpec {
                fence_timeout: Duration::from_millis(ms),
                ..base.clone()
            };
            assert!(s.keeper_lease_ttl() >= s.fence_timeout + FENCE_SLACK);
        }
        // The proxy's lease outlives its freshness by the keep-alive period
        // plus a request timeout, in whole seconds.
        for ms in [100u64, 2500, 5000, 15_000] {
            let s = ClusterSpec {
                proxy_timeout: Duration::from_millis(ms),
                ..base.clone()
            };
            let ttl = s.proxy_lease_ttl();
            assert_eq!(ttl.subsec_nanos(), 0);
            assert!(
                ttl >= s.proxy_timeout + s.proxy_keepalive_period() + crate::store::REQUEST_TIMEOUT
            );
        }
        assert_eq!(
            ClusterSpec {
                proxy_timeout: Duration::from_millis(2500),
                ..base.clone()
            }
            .proxy_lease_ttl(),
            Duration::from_secs(6),
            "2.5 s + 625 ms + 2 s, rounded up"
        );
    }

    #[test]
    fn with_a_backup_tool_convergence_outlasts_the_pre_promotion_push_at_the_boundary() {
        let spec = |secs: u64| ClusterSpec {
            failsafe: false,
            convergence_timeout: Duration::from_secs(secs),
            backup: BackupSpec {
                tool: BackupTool::Pgbackrest,
                repository: Some("/r".into()),
                stanza: Some("s".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        // PUSH_UNARCHIVED_BUDGET 5 s + a 2 s status query + the 5 s drain.
        let err = spec(12).validate_written(None).unwrap_err().to_string();
        assert!(
            err.contains("must be longer than 12s with a backup tool"),
            "{err}"
        );
        let mut just_above = spec(12);
        just_above.convergence_timeout += Duration::from_millis(1);
        just_above.validate_written(None).unwrap();
        // Without a tool, 12 s is fine.
        let no_tool = ClusterSpec {
            backup: BackupSpec::default(),
            ..spec(12)
        };
        no_tool.validate_written(None).unwrap();
    }

    #[test]
    fn with_the_failsafe_convergence_outlasts_a_promise_at_the_boundary() {
        let mut s = ClusterSpec {
            fence_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        // 5 s + 0.5 s + 5 s.
        s.convergence_timeout = Duration::from_millis(10_500);
        let e = s.validate_written(None).unwrap_err().0;
        assert!(e.contains("failsafe"), "{e}");
        s.convergence_timeout = Duration::from_millis(10_501);
        s.validate_written(None).unwrap();
        s.convergence_timeout = Duration::from_millis(10_500);
        s.failsafe = false;
        s.validate_written(None).unwrap();
    }

    #[test]
    fn proxy_view_names_one_primary_and_healthy_standbys() {
        let mut d = ClusterData::new(ClusterSpec::default());
        for (uid, role, healthy, port) in [
            ("a", Role::Master, true, 1),
            ("b", Role::Standby, true, 2),
            ("c", Role::Standby, false, 3),
        ] {
            d.dbs.insert(
                uid.into(),
                Db {
                    keeper: uid.into(),
                    spec: DbSpec {
                        role,
                        ..Default::default()
                    },
                    status: DbStatus {
                        healthy,
                        address: Some(format!("h:{port}")),
                        in_recovery: role == Role::Standby,
                        lsn: 1000,
                        replay_lsn: 900,
                        streaming: true,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            );
        }
        assert_eq!(d.proxy_view().primary, None);
        d.set_proxy_master(Some("a"));
        let v = d.proxy_view();
        assert_eq!(v.generation, 1);
        assert_eq!(v.primary.as_deref(), Some("h:1"));
        assert_eq!(
            v.replicas,
            vec![ReplicaView {
                address: "h:2".to_owned(),
                lag_bytes: 100,
                lag_ms: None,
                streaming: true,
            }]
        );
        let mut bad = d.clone();
        bad.proxy.master_db = Some("zz".into());
        assert!(matches!(
            ClusterData::from_json(&bad.to_json()),
            Err(DataError::UnknownMaster(_))
        ));
        let mut old = d.clone();
        old.format_version = 99;
        assert!(ClusterData::from_json(&old.to_json())
            .unwrap_err()
            .to_string()
            .contains("upgrade"));
    }

    fn standby_spec() -> ClusterSpec {
        ClusterSpec {
            role: ClusterRole::Standby,
            standby_source: Some(StandbySource {
                host: "a-proxy".into(),
                port: 5432,
                user: "keelson_repl".into(),
                password_file: "/etc/keelson/source-password".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn standby_cluster_specs_are_checked_and_roundtrip() {
        let s = standby_spec();
        s.validate_written(None).unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""role":"standby""#), "{json}");
        assert_eq!(serde_json::from_str::<ClusterSpec>(&json).unwrap(), s);
        // A primary cluster's spec does not mention the role.
        let plain = serde_json::to_string(&ClusterSpec::default()).unwrap();
        assert!(!plain.contains("role"), "{plain}");
        let refused = |spec: ClusterSpec, before: Option<&ClusterSpec>, says: &str| {
            let e = spec.validate_written(before).unwrap_err().to_string();
            assert!(e.contains(says), "{e} does not say {says}");
        };
        refused(
            ClusterSpec {
                standby_source: None,
                ..standby_spec()
            },
            None,
            "needs standby_source",
        );
        refused(
            ClusterSpec {
                synchronous_replication: true,
                ..standby_spec()
            },
            None,
            "cannot use synchronous_replication",
        );
        refused(
            standby_spec(),
            Some(&ClusterSpec::default()),
            "cannot become a standby cluster",
        );
        let with = |f: fn(&mut StandbySource)| {
            let mut s = standby_spec();
            f(s.standby_source.as_mut().unwrap());
            s
        };
        refused(with(|s| s.host.clear()), None, "needs host");
        refused(with(|s| s.port = 0), None, "needs port");
        refused(with(|s| s.user.clear()), None, "needs user");
        refused(
            with(|s| s.password_file = "rel".into()),
            None,
            "password_file",
        );
        refused(
            with(|s| s.slot = Some("Bad-Slot".into())),
            None,
            "slot must be",
        );
        refused(
            with(|s| s.sslmode = Some("on".into())),
            None,
            "sslmode must be",
        );
        refused(
            with(|s| s.slot = Some("keelson_k1".into())),
            None,
            "keelson_",
        );
        refused(with(|s| s.host = "h' port=1".into()), None, "needs host");
        refused(with(|s| s.user = "u\nx".into()), None, "needs user");
        // Stored data is checked too; a standby cluster's is written with a
        // version older keelsons refuse, and read back.
        let d = ClusterData::new(standby_spec());
        let json = d.to_json();
        assert!(
            json.contains(&format!("\"format_version\": {STANDBY_FORMAT_VERSION}")),
            "{json}"
        );
        assert_eq!(ClusterData::from_json(&json).unwrap(), d);
        let bad = json.replace("\"role\": \"standby\"", "\"role\": \"primary\"");
        assert!(
            ClusterData::from_json(&bad).is_err(),
            "version 2 without the role"
        );
        let mut no_source = d.clone();
        no_source.spec.standby_source = None;
        assert!(ClusterData::from_json(&no_source.to_json())
            .unwrap_err()
            .to_string()
            .contains("needs standby_source"));
        // Promotion (role primary) is always allowed; the source may stay.
        let promoted = ClusterSpec {
            role: ClusterRole::Primary,
            ..standby_spec()
        };
        promoted.validate_written(Some(&standby_spec())).unwrap();
        // Promoted in one write with no primary named: the leader is still
        // in recovery.
        let mut d = ClusterData::new(standby_spec());
        d.set_proxy_master(Some("k1"));
        let generation = d.proxy.generation;
        d.set_spec(promoted.clone());
        assert_eq!(
            (d.proxy.master_db.as_deref(), d.proxy.generation),
            (None, generation + 1)
        );
        d.set_proxy_master(Some("k1"));
        d.set_spec(promoted);
        assert_eq!(
            d.proxy.master_db.as_deref(),
            Some("k1"),
            "no change, no unnaming"
        );
        assert_eq!(
            with(|s| s.host = "::1".into())
                .standby_source
                .unwrap()
                .address(),
            "[::1]:5432"
        );
    }

    #[test]
    fn promotion_needs_a_healthy_leader_ahead_of_every_member_that_is_down() {
        let mut d = ClusterData::new(standby_spec());
        let why = |d: &ClusterData, force| d.why_not_promote(force).unwrap_or_default();
        assert!(why(&d, false).contains("no standby leader yet"));
        for (uid, lsn) in [("k1", 100), ("k2", 100), ("k3", 90)] {
            d.dbs.insert(
                uid.into(),
                Db {
                    keeper: uid.into(),
                    status: DbStatus {
                        healthy: true,
                        in_recovery: true,
                        lsn,
                        system_id: Some("s".into()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            );
        }
        d.set_proxy_master(Some("k1"));
        assert_eq!(d.why_not_promote(false), None);
        // A healthy member's newer report may show it ahead: no refusal.
        d.dbs.get_mut("k3").unwrap().status.lsn = 120;
        assert_eq!(d.why_not_promote(false), None);
        // One that is down and was last seen ahead: refused, unless forced.
        d.dbs.get_mut("k2").unwrap().status.healthy = false;
        d.dbs.get_mut("k2").unwrap().status.lsn = 200;
        assert!(
            why(&d, false).contains("k2 (last seen at 0/C8) ahead"),
            "{}",
            why(&d, false)
        );
        assert_eq!(d.why_not_promote(true), None);
        d.failover = Some(Failover {
            from: "k1".into(),
            reason: "failover".into(),
            ..Default::default()
        });
        assert!(why(&d, true).contains("under way"));
        d.failover = None;
        d.dbs.get_mut("k1").unwrap().status.healthy = false;
        assert!(why(&d, true).contains("not a healthy standby"));
        d.spec.role = ClusterRole::Primary;
        assert!(why(&d, true).contains("not a standby cluster"));
    }
}
