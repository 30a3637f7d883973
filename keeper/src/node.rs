//! What a keeper's node API answers (`--api-listen`): the health checks
//! load balancers, Consul and Kubernetes probes use (`/primary`,
//! `/replica?lag=`, `/health`, `/liveness`, ...; Patroni's convention),
//! `/status` as JSON and `/metrics`. The reconcile loop publishes a
//! [`NodeSnapshot`] every round; the answers are pure functions of it, so
//! the HTTP layer (in the binary) knows nothing of PostgreSQL.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cluster::data::{ClusterData, KeeperReport, Role, Tags};
use serde::Serialize;

/// How long the reconcile loop may go without finishing a round, while
/// not inside a step, before `/liveness` fails.
pub const LIVENESS_LIMIT: Duration = Duration::from_secs(30);

/// What the keeper last knew, for its node API.
#[derive(Debug, Clone, Default)]
pub struct NodeSnapshot {
    pub uid: String,
    /// This round's report.
    pub report: Option<KeeperReport>,
    /// The role the newest cluster data gives this keeper's database.
    pub role: Option<Role>,
    /// The cluster data names this keeper's database as the proxies'
    /// primary.
    pub view_primary: bool,
    /// The proxy generation of that cluster data.
    pub generation: u64,
    /// The primary's last reported WAL position.
    pub primary_lsn: Option<u64>,
    /// The primary's synchronous set holds this database.
    pub sync_member: bool,
    /// ... and the primary has seen it confirmed (streaming in sync).
    pub sync_confirmed: bool,
    pub paused: bool,
    /// The keeper's lease could not be renewed in time: a primary has
    /// been fenced (stopped) by now.
    pub fenced: bool,
    /// The tags in force (flags, or `ctl keeper set`).
    pub tags: Tags,
    /// When the reconcile loop last finished a round.
    pub last_round: Option<Instant>,
    /// The step the reconcile loop is in now.
    pub busy: Option<&'static str>,
    /// The newest cluster data this keeper read (kept while the store is
    /// unreachable): the failsafe's peers and rules come from it.
    pub data: Option<std::sync::Arc<ClusterData>>,
    /// How long this primary still serves beyond its lease on the other
    /// keepers' failsafe promises, in ms (0: it does not).
    pub failsafe_ms: u64,
    /// How long this keeper's own failsafe promise not to promote still
    /// holds, in ms (0: none).
    pub promised_ms: u64,
    /// The backup list (`pgbackrest info --output=json`) when this keeper
    /// has read one: `/backups`.
    pub backups: Option<String>,
}

impl NodeSnapshot {
    /// Takes the newest cluster data's view of this keeper.
    pub fn set_data(&mut self, d: &ClusterData) {
        if self.data.as_deref() != Some(d) {
            self.data = Some(std::sync::Arc::new(d.clone()));
        }
        let db = d.dbs.get(&self.uid);
        self.role = db.map(|db| db.spec.role);
        self.view_primary = d.proxy.master_db.as_deref() == Some(self.uid.as_str());
        self.generation = d.proxy.generation;
        self.paused = d.paused;
        self.tags = d
            .keepers
            .get(&self.uid)
            .map(|k| k.tags())
            .unwrap_or_default();
        let master = d.proxy.master_db.as_ref().and_then(|m| d.dbs.get(m));
        self.primary_lsn = master.map(|m| m.status.lsn);
        self.sync_member = master.is_some_and(|m| m.spec.synchronous_standbys.contains(&self.uid));
        self.sync_confirmed = master.is_some_and(|m| m.status.sync_confirmed.contains(&self.uid));
    }

    pub(crate) fn healthy(&self) -> bool {
        self.report.as_ref().is_some_and(|r| r.healthy && r.running)
    }

    /// The healthy primary the newest view names, not fenced.
    pub fn is_primary(&self) -> bool {
        self.healthy()
            && self.report.as_ref().is_some_and(|r| !r.in_recovery)
            && self.view_primary
            && !self.fenced
    }

    /// A healthy standby streaming from its upstream, as the view wants.
    pub fn is_streaming_standby(&self) -> bool {
        self.healthy()
            && self.role == Some(Role::Standby)
            && self
                .report
                .as_ref()
                .is_some_and(|r| r.in_recovery && r.streaming)
    }

    /// WAL bytes this standby's replay is behind the primary's last
    /// report; `None` on a primary.
    pub fn lag_bytes(&self) -> Option<u64> {
        let r = self.report.as_ref().filter(|r| r.in_recovery)?;
        let replayed = if r.replay_lsn > 0 {
            r.replay_lsn
        } else {
            r.lsn?
        };
        Some(self.primary_lsn?.saturating_sub(replayed))
    }

    /// How far behind in time its replay is.
    pub fn lag_ms(&self) -> Option<u64> {
        self.report.as_ref()?.replay_lag_ms
    }

    /// The reconcile loop runs: it finished a round within
    /// [`LIVENESS_LIMIT`], or it is inside a step (a base backup may take
    /// hours; `/status` shows which). It does not depend on the store.
    pub fn is_alive(&self, now: Instant) -> bool {
        self.busy.is_some()
            || self
                .last_round
                .is_some_and(|t| now.saturating_duration_since(t) <= LIVENESS_LIMIT)
    }
}

/// A `lag` limit of `/replica?lag=`: bytes (`16MB`, `1048576`) or time
/// (`10s`, `500ms`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LagLimit {
    Bytes(u64),
    Millis(u64),
}

/// Parses a `lag` value: a number with an optional unit, `B`, `kB`, `MB`,
/// `GB`, `TB` (1024-based, as PostgreSQL's; `KB` too) or `ms`, `s`,
/// `min`, `h`. A bare number is bytes, as in Patroni.
pub fn parse_lag(v: &str) -> Result<LagLimit, String> {
    let v = v.trim();
    let end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (n, unit) = v.split_at(end);
    let n: f64 = n
        .parse()
        .map_err(|_| format!("lag {v:?} is not a number with a unit, like 16MB or 10s"))?;
    let bytes = |m: f64| Ok(LagLimit::Bytes((n * m) as u64));
    let millis = |m: f64| Ok(LagLimit::Millis((n * m) as u64));
    match unit.trim() {
        "" | "B" => bytes(1.0),
        "kB" | "KB" => bytes(1024.0),
        "MB" => bytes(1024.0 * 1024.0),
        "GB" => bytes(1024.0 * 1024.0 * 1024.0),
        "TB" => bytes(1024.0 * 1024.0 * 1024.0 * 1024.0),
        "ms" => millis(1.0),
        "s" => millis(1e3),
        "min" => millis(60e3),
        "h" => millis(3600e3),
        u => Err(format!(
            "lag unit {u:?} is unknown: use B, kB, MB, GB, TB, ms, s, min or h"
        )),
    }
}

/// One answer of the node API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Answer {
    pub(crate) fn json(status: u16, body: String) -> Answer {
        Answer {
            status,
            content_type: "application/json",
            body,
        }
    }
}

/// The endpoints, for the 404 message and docs/api.md.
pub const ENDPOINTS: &[&str] = &[
    "/primary",
    "/replica",
    "/read-only",
    "/sync",
    "/async",
    "/health",
    "/liveness",
    "/readiness",
    "/status",
    "/backups",
    "/metrics",
];

#[derive(Serialize)]
struct Status<'a> {
    uid: &'a str,
    /// `master`, `standby` or `none`: the role the cluster data gives.
    role: &'a str,
    /// What PostgreSQL is: `primary`, `standby` or `stopped`.
    state: &'a str,
    healthy: bool,
    view_primary: bool,
    timeline: Option<u32>,
    lsn: Option<String>,
    replay_lsn: Option<String>,
    lag_bytes: Option<u64>,
    lag_ms: Option<u64>,
    streaming: bool,
    sync_standby: bool,
    tags: &'a Tags,
    pending_restart: &'a [String],
    applied_generation: u64,
    generation: u64,
    paused: bool,
    fenced: bool,
    failsafe_ms: u64,
    promised_ms: u64,
    problem: Option<&'a str>,
    last_round_seconds_ago: Option<f64>,
    busy: Option<&'a str>,
}

/// The `/status` document.
pub fn status_json(s: &NodeSnapshot, now: Instant) -> String {
    let r = s.report.as_ref();
    let state = match r {
        Some(r) if r.healthy && !r.in_recovery => "primary",
        Some(r) if r.healthy => "standby",
        Some(r) if r.running => "not answering",
        _ => "stopped",
    };
    let st = Status {
        uid: &s.uid,
        role: s.role.map_or("none", |r| r.as_str()),
        state,
        healthy: s.healthy(),
        view_primary: s.view_primary,
        timeline: r.and_then(|r| r.timeline),
        lsn: r.and_then(|r| r.lsn).map(cluster::status::format_lsn),
        replay_lsn: r
            .filter(|r| r.in_recovery && r.replay_lsn > 0)
            .map(|r| cluster::status::format_lsn(r.replay_lsn)),
        lag_bytes: s.lag_bytes(),
        lag_ms: s.lag_ms(),
        streaming: r.is_some_and(|r| r.streaming),
        sync_standby: s.sync_member && s.sync_confirmed,
        tags: &s.tags,
        pending_restart: r
            .and_then(|r| r.pending_restart.as_deref())
            .unwrap_or_default(),
        applied_generation: r.map_or(0, |r| r.applied_generation),
        generation: s.generation,
        paused: s.paused,
        fenced: s.fenced,
        failsafe_ms: s.failsafe_ms,
        promised_ms: s.promised_ms,
        problem: r.and_then(|r| r.problem.as_deref()),
        last_round_seconds_ago: s
            .last_round
            .map(|t| now.saturating_duration_since(t).as_secs_f64()),
        busy: s.busy,
    };
    serde_json::to_string(&st).unwrap_or_default()
}

/// The Prometheus text for `/metrics`.
pub fn metrics_text(s: &NodeSnapshot, now: Instant) -> String {
    let r = s.report.as_ref();
    let uid = &s.uid;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, labels: &str, v: f64| {
        let v = if v.is_infinite() {
            "+Inf".to_owned()
        } else {
            v.to_string()
        };
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{uid=\"{uid}\"{labels}}} {v}\n"
        ));
    };
    let role = s.role.map_or("none", |r| r.as_str());
    gauge(
        "keelson_keeper_role",
        "The role the cluster data gives this keeper's database (1 for the role in the label).",
        &format!(",role=\"{role}\""),
        1.0,
    );
    gauge(
        "keelson_keeper_primary",
        "1 on the healthy primary the newest view names (what /primary answers 200 to).",
        "",
        f64::from(u8::from(s.is_primary())),
    );
    gauge(
        "keelson_keeper_healthy",
        "1 while PostgreSQL runs and answers.",
        "",
        f64::from(u8::from(s.healthy())),
    );
    gauge(
        "keelson_keeper_streaming",
        "1 on a standby streaming from its upstream.",
        "",
        f64::from(u8::from(r.is_some_and(|r| r.streaming))),
    );
    gauge(
        "keelson_keeper_timeline",
        "The timeline PostgreSQL is on.",
        "",
        r.and_then(|r| r.timeline).unwrap_or(0) as f64,
    );
    gauge(
        "keelson_keeper_lag_bytes",
        "WAL bytes this standby's replay is behind the primary's last report (0 on a primary).",
        "",
        s.lag_bytes().unwrap_or(0) as f64,
    );
    gauge(
        "keelson_keeper_applied_generation",
        "The generation of this database's spec the keeper last applied.",
        "",
        r.map_or(0, |r| r.applied_generation) as f64,
    );
    gauge(
        "keelson_keeper_pending_restart",
        "Parameters that take effect only at a restart.",
        "",
        r.and_then(|r| r.pending_restart.as_ref())
            .map_or(0, |p| p.len()) as f64,
    );
    gauge(
        "keelson_keeper_fenced",
        "1 while the keeper's lease is not renewed: its primary is fenced.",
        "",
        f64::from(u8::from(s.fenced)),
    );
    gauge(
        "keelson_keeper_failsafe_seconds",
        "Seconds this primary still serves beyond its lease on the other keepers' failsafe promises (0: it does not).",
        "",
        s.failsafe_ms as f64 / 1000.0,
    );
    gauge(
        "keelson_keeper_promised_seconds",
        "Seconds this keeper's failsafe promise not to promote still holds (0: none).",
        "",
        s.promised_ms as f64 / 1000.0,
    );
    if let Some(a) = r.and_then(|r| r.archive.as_ref()) {
        gauge(
            "keelson_keeper_wal_archived",
            "WAL files PostgreSQL archived since it started (pg_stat_archiver.archived_count).",
            "",
            a.archived_count as f64,
        );
        gauge(
            "keelson_keeper_wal_archive_failures",
            "Failed attempts to archive a WAL file since PostgreSQL started (pg_stat_archiver.failed_count).",
            "",
            a.failed_count as f64,
        );
        gauge(
            "keelson_keeper_wal_archive_failing",
            "1 while the latest attempt to archive a WAL file failed: WAL piles up until the tool succeeds.",
            "",
            f64::from(u8::from(a.failing)),
        );
    }
    if let Some(b) = r.and_then(|r| r.backup.as_ref()) {
        gauge(
            "keelson_keeper_last_backup_ok",
            "1 if the last backup this keeper took for `ctl backup` succeeded.",
            "",
            f64::from(u8::from(b.ok)),
        );
    }
    gauge(
        "keelson_keeper_last_round_age_seconds",
        "Seconds since the reconcile loop last finished a round.",
        "",
        s.last_round.map_or(f64::INFINITY, |t| {
            now.saturating_duration_since(t).as_secs_f64()
        }),
    );
    out
}

/// Answers `path` (with its `query`) from `s`; every health check has the
/// `/status` document as its body.
pub fn answer(s: &NodeSnapshot, path: &str, query: &str, now: Instant) -> Answer {
    let ok = |yes: bool| Answer::json(if yes { 200 } else { 503 }, status_json(s, now));
    let lag = cluster::node_api::query_param(query, "lag").map(parse_lag);
    let lag = match lag.transpose() {
        Ok(l) => l,
        Err(e) => {
            return Answer {
                status: 400,
                content_type: "text/plain",
                body: format!("{e}\n"),
            }
        }
    };
    let within_lag = || match lag {
        None => true,
        Some(LagLimit::Bytes(max)) => s.lag_bytes().is_some_and(|l| l <= max),
        Some(LagLimit::Millis(max)) => s.lag_ms().is_some_and(|l| l <= max),
    };
    let replica = || s.is_streaming_standby() && within_lag();
    match path {
        "/primary" | "/master" | "/leader" | "/read-write" => ok(s.is_primary()),
        "/replica" => ok(replica() && !s.tags.no_loadbalance),
        "/read-only" => ok(s.is_primary() || replica()),
        "/sync" | "/synchronous" => ok(replica() && s.sync_member && s.sync_confirmed),
        "/async" | "/asynchronous" => ok(replica() && !(s.sync_member && s.sync_confirmed)),
        "/health" => ok(s.healthy()),
        "/liveness" => ok(s.is_alive(now)),
        "/readiness" => ok(s.is_primary() || s.is_streaming_standby()),
        "/status" | "/" => ok(true),
        "/backups" => match &s.backups {
            Some(b) => Answer::json(200, b.clone()),
            None => Answer {
                status: 404,
                content_type: "text/plain",
                body: "no backup list here: the spec has no pgbackrest backup section, or this \
                       keeper is not the primary, or it has not read one yet\n"
                    .into(),
            },
        },
        "/metrics" => Answer {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: metrics_text(s, now),
        },
        _ => Answer {
            status: 404,
            content_type: "text/plain",
            body: format!("not found; the endpoints are {}\n", ENDPOINTS.join(", ")),
        },
    }
}

/// The snapshot shared between the reconcile loop and the API, and the
/// tags a SIGHUP re-read from the flags and the configuration file.
#[derive(Debug, Default)]
pub struct NodeState {
    snapshot: Mutex<NodeSnapshot>,
    /// The tag flags the last SIGHUP read (`Some(None)`: none given).
    flag_tags: Mutex<Option<Option<Tags>>>,
    lease: std::sync::OnceLock<std::sync::Arc<crate::lease::Lease>>,
    /// The failsafe promises this keeper gave.
    pub promises: crate::failsafe::Promises,
}

impl NodeState {
    pub fn new(uid: &str) -> NodeState {
        NodeState {
            snapshot: Mutex::new(NodeSnapshot {
                uid: uid.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The keeper's lease: whether it is fenced is read from it at each
    /// request, not from the last round (which a slow step may hold up).
    pub fn set_lease(&self, lease: std::sync::Arc<crate::lease::Lease>) {
        let _ = self.lease.set(lease);
    }

    pub fn lease(&self) -> Option<&std::sync::Arc<crate::lease::Lease>> {
        self.lease.get()
    }

    /// The tags the flags give after a SIGHUP (`Some(None)`: no tag flag
    /// any more); `None` before any.
    pub fn set_flag_tags(&self, tags: Option<Tags>) {
        *self.flag_tags.lock().unwrap_or_else(|e| e.into_inner()) = Some(tags);
    }

    /// The tags the last SIGHUP read from the flags (`Some(None)`: no
    /// tag flag); `None` before any SIGHUP.
    pub fn flag_tags(&self) -> Option<Option<Tags>> {
        self.flag_tags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut NodeSnapshot)) {
        let mut g = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g);
    }

    /// The newest cluster data this keeper read.
    pub fn data(&self) -> Option<std::sync::Arc<ClusterData>> {
        self.snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .data
            .clone()
    }

    pub fn snapshot(&self) -> NodeSnapshot {
        let mut s = self
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let now = crate::lease::now_ms();
        if let Some(lease) = self.lease.get() {
            s.fenced |= lease.expired();
            s.failsafe_ms = lease.failsafe_remaining_ms(now);
        }
        s.promised_ms = self.promises.until_ms().saturating_sub(now);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary() -> NodeSnapshot {
        NodeSnapshot {
            uid: "k1".into(),
            report: Some(KeeperReport {
                healthy: true,
                running: true,
                lsn: Some(1000),
                timeline: Some(2),
                ..Default::default()
            }),
            role: Some(Role::Master),
            view_primary: true,
            primary_lsn: Some(1000),
            last_round: Some(Instant::now()),
            ..Default::default()
        }
    }

    fn standby(replayed: u64, lag_ms: u64) -> NodeSnapshot {
        NodeSnapshot {
            uid: "k2".into(),
            report: Some(KeeperReport {
                healthy: true,
                running: true,
                in_recovery: true,
                streaming: true,
                lsn: Some(replayed),
                replay_lsn: replayed,
                replay_lag_ms: Some(lag_ms),
                ..Default::default()
            }),
            role: Some(Role::Standby),
            primary_lsn: Some(100_000),
            last_round: Some(Instant::now()),
            ..Default::default()
        }
    }

    fn status(s: &NodeSnapshot, path: &str, query: &str) -> u16 {
        answer(s, path, query, Instant::now()).status
    }

    #[test]
    fn each_check_answers_200_only_where_it_holds() {
        let p = primary();
        let s = standby(100_000 - 4096, 20);
        for (path, on_primary, on_standby) in [
            ("/primary", 200, 503),
            ("/replica", 503, 200),
            ("/read-only", 200, 200),
            ("/sync", 503, 503),
            ("/async", 503, 200),
            ("/health", 200, 200),
            ("/liveness", 200, 200),
            ("/readiness", 200, 200),
            ("/status", 200, 200),
        ] {
            assert_eq!(status(&p, path, ""), on_primary, "{path} on the primary");
            assert_eq!(status(&s, path, ""), on_standby, "{path} on the standby");
        }
        assert_eq!(status(&p, "/nope", ""), 404);
        // Lag limits, in bytes and in time.
        assert_eq!(status(&s, "/replica", "lag=4kB"), 200);
        assert_eq!(status(&s, "/replica", "lag=4095"), 503);
        assert_eq!(status(&s, "/replica", "lag=1MB"), 200);
        assert_eq!(status(&s, "/replica", "lag=20ms"), 200);
        assert_eq!(status(&s, "/replica", "lag=10ms"), 503);
        assert_eq!(status(&s, "/replica", "lag=10s"), 200);
        assert_eq!(status(&s, "/replica", "lag=ten"), 400);
        // Synchronous, confirmed.
        let sync = NodeSnapshot {
            sync_member: true,
            sync_confirmed: true,
            ..standby(1000, 0)
        };
        assert_eq!(status(&sync, "/sync", ""), 200);
        assert_eq!(status(&sync, "/async", ""), 503);
        // no-loadbalance keeps it out of /replica only.
        let nolb = NodeSnapshot {
            tags: Tags {
                no_loadbalance: true,
                ..Default::default()
            },
            ..standby(1000, 0)
        };
        assert_eq!(status(&nolb, "/replica", ""), 503);
        assert_eq!(status(&nolb, "/read-only", ""), 200);
    }

    #[test]
    fn a_primary_the_view_moved_away_from_or_fenced_is_not_primary() {
        let moved = NodeSnapshot {
            view_primary: false,
            ..primary()
        };
        assert_eq!(status(&moved, "/primary", ""), 503);
        let fenced = NodeSnapshot {
            fenced: true,
            ..primary()
        };
        assert_eq!(status(&fenced, "/primary", ""), 503);
        // A dead PostgreSQL under a live keeper reports unhealthy.
        let dead = NodeSnapshot {
            report: Some(KeeperReport {
                running: true,
                healthy: false,
                problem: Some("PostgreSQL does not answer".into()),
                ..Default::default()
            }),
            ..primary()
        };
        assert_eq!(status(&dead, "/primary", ""), 503);
        assert_eq!(status(&dead, "/health", ""), 503);
        assert_eq!(status(&dead, "/liveness", ""), 200);
        let body = answer(&dead, "/status", "", Instant::now()).body;
        assert!(body.contains(r#""state":"not answering""#), "{body}");
    }

    #[test]
    fn liveness_fails_only_when_the_loop_stopped_outside_a_step() {
        let now = Instant::now();
        let stale = NodeSnapshot {
            last_round: Some(now - LIVENESS_LIMIT - Duration::from_secs(1)),
            ..primary()
        };
        assert!(!stale.is_alive(now));
        let busy = NodeSnapshot {
            busy: Some("reconcile"),
            ..stale.clone()
        };
        assert!(busy.is_alive(now));
        let edge = NodeSnapshot {
            last_round: Some(now - LIVENESS_LIMIT),
            ..primary()
        };
        assert!(edge.is_alive(now));
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let m = metrics_text(&primary(), Instant::now());
        assert!(m.contains("keelson_keeper_primary{uid=\"k1\"} 1\n"), "{m}");
        assert!(
            m.contains("keelson_keeper_role{uid=\"k1\",role=\"master\"} 1\n"),
            "{m}"
        );
        assert!(m.contains("keelson_keeper_timeline{uid=\"k1\"} 2\n"), "{m}");
    }
}
