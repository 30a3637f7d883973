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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
        }
    }
}

impl ClusterSpec {
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

impl ClusterSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let positive = [
            ("keeper_report_interval", self.keeper_report_interval),
            ("fail_interval", self.fail_interval),
            ("proxy_timeout", self.proxy_timeout),
            ("hold_timeout", self.hold_timeout),
            ("fence_timeout", self.fence_timeout),
        ];
        for (name, d) in positive {
            if d.is_zero() {
                return Err(SpecError(format!("{name} must be greater than zero")));
            }
        }
        if self.fail_interval < self.keeper_report_interval {
            return Err(SpecError(
                "fail_interval must be at least keeper_report_interval, or every late report looks like a failure"
                    .into(),
            ));
        }
        if self.min_sync > self.max_sync {
            return Err(SpecError(format!(
                "min_sync ({}) must not exceed max_sync ({})",
                self.min_sync, self.max_sync
            )));
        }
        Ok(())
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
    /// Set by `keelson ctl failkeeper`: the sentinel treats this keeper's
    /// database as failed (past `fail_interval`) for one decision, then
    /// clears the flag.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub failed: bool,
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
}

/// What a database was last seen doing, from its keeper's reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct DbStatus {
    pub healthy: bool,
    /// `host:port` clients and proxies connect to.
    pub address: Option<String>,
    pub lsn: u64,
    pub timeline: u32,
    pub system_id: Option<String>,
    pub in_recovery: bool,
    /// The generation of this database's spec the keeper has applied.
    pub applied_generation: u64,
    /// Standbys PostgreSQL reports as synchronous (`pg_stat_replication`).
    pub synchronous_standbys: Vec<String>,
    /// On a standby: the last replayed LSN (what its queries see).
    pub replay_lsn: u64,
    /// On a standby: time since the last replayed transaction while replay
    /// is behind what was received; 0 when caught up; `None` if unknown.
    pub replay_lag_ms: Option<u64>,
    /// On a standby: whether its WAL receiver is streaming.
    pub streaming: bool,
    /// Wall-clock milliseconds since which the database has looked
    /// unhealthy, as the sentinel saw it. Kept in the store so that a new
    /// sentinel leader does not restart failure timers from zero.
    pub unhealthy_since_ms: Option<u64>,
}

/// One PostgreSQL instance, managed by one keeper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Db {
    pub keeper: String,
    /// Bumped whenever `spec` changes.
    pub generation: u64,
    pub spec: DbSpec,
    pub status: DbStatus,
}

/// What a keeper reports about its database, under its lease at
/// `keepers/<uid>`. A missing report means the keeper is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct KeeperReport {
    pub uid: String,
    /// Whether PostgreSQL is running and answering queries.
    pub healthy: bool,
    /// `host:port` of its PostgreSQL.
    pub address: Option<String>,
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// The current WAL position: write LSN on a primary, last received (or
    /// replayed, whichever is higher) on a standby.
    pub lsn: u64,
    pub timeline: u32,
    pub system_id: Option<String>,
    /// The database spec generation the keeper has applied.
    pub applied_generation: u64,
    /// Standbys reported as synchronous by `pg_stat_replication`.
    pub synchronous_standbys: Vec<String>,
    /// On a standby: the last replayed LSN.
    pub replay_lsn: u64,
    /// On a standby: time since the last replayed transaction while replay
    /// is behind; 0 when caught up; `None` if unknown.
    pub replay_lag_ms: Option<u64>,
    /// On a standby: whether its WAL receiver is streaming.
    pub streaming: bool,
    /// When the keeper made this report (wall-clock ms; 0 = unknown).
    pub reported_at_ms: u64,
    /// Keeper settings, taken into the cluster data when it joins.
    pub priority: i32,
    pub never_primary: bool,
}

/// A failover in progress: the fencing handshake and the promotion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Failover {
    /// The database that was primary.
    pub from: String,
    /// The proxy generation that named no primary; every live proxy must
    /// acknowledge it before a new primary is named.
    pub fence_generation: u64,
    /// The database chosen to be promoted, once chosen.
    pub to: Option<String>,
    /// Why: "failover" or "switchover".
    pub reason: String,
    /// For a switchover: the standby the operator asked for, if any.
    pub requested: Option<String>,
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
        }
    }

    pub fn to_json(&self) -> String {
        // Serializing plain structs with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parses and validates stored cluster data.
    pub fn from_json(s: &str) -> Result<Self, DataError> {
        let d: ClusterData = serde_json::from_str(s)?;
        if d.format_version != FORMAT_VERSION {
            return Err(DataError::Version(d.format_version));
        }
        d.spec.validate()?;
        if let Some(m) = &d.proxy.master_db {
            if !d.dbs.contains_key(m) {
                return Err(DataError::UnknownMaster(m.clone()));
            }
        }
        Ok(d)
    }

    /// What proxies should route by.
    pub fn proxy_view(&self) -> ProxyView {
        let primary = self
            .proxy
            .master_db
            .as_ref()
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
                Some(*uid) != self.proxy.master_db.as_ref()
                    && db.spec.role == Role::Standby
                    && db.status.healthy
                    && db.status.in_recovery
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
        assert!(serde_json::from_str::<ClusterSpec>(r#"{"no_such":1}"#).is_err());
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
}
