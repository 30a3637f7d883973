//! A cluster's status as an operator reads it (`keelson ctl status`, the
//! demo): typed, built from the store in one place, rendered as JSON or a
//! table by its users.

use serde::Serialize;

use crate::data::{ClusterData, ClusterPhase, DataError, ProxyReport, Role};
use crate::store::{Keys, Store, StoreError};

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cluster {0:?} has no data in the store; create it with `keelson ctl init`")]
    NoCluster(String),
    #[error(transparent)]
    Data(#[from] DataError),
}

/// The whole cluster.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// The cluster's key in the store (`prefix/name`).
    pub cluster: String,
    pub phase: ClusterPhase,
    /// The proxy generation: it grows with every change of the primary or
    /// the replica set.
    pub generation: u64,
    /// The primary proxies route to, if any.
    pub master: Option<PrimaryStatus>,
    /// A failover or switchover under way.
    pub failover: Option<FailoverStatus>,
    /// What the sentinel wants an operator to know.
    pub notice: Option<String>,
    pub keepers: Vec<KeeperStatus>,
    pub proxies: Vec<ProxyStatus>,
    /// Sentinels registered now (their leases alive), by uid.
    pub sentinels: Vec<String>,
    /// The sentinel that leads, if one does.
    pub leader: Option<String>,
    /// Maintenance mode (`ctl pause`).
    pub paused: bool,
    /// A standby cluster's source (`host:port`); `None` for a primary
    /// cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby_of: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrimaryStatus {
    pub keeper: String,
    pub address: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverStatus {
    /// `failover` or `switchover`.
    pub reason: String,
    pub from: String,
    /// The database chosen to be promoted, once chosen.
    pub to: Option<String>,
}

/// One keeper's database.
#[derive(Debug, Clone, Serialize)]
pub struct KeeperStatus {
    pub uid: String,
    pub role: &'static str,
    pub healthy: bool,
    pub address: Option<String>,
    /// The last WAL position reported, as PostgreSQL writes it (`0/3000060`);
    /// `None` before the keeper reported a running PostgreSQL.
    pub lsn: Option<String>,
    /// WAL bytes behind the primary's last report.
    pub lag_bytes: Option<u64>,
    pub timeline: u32,
    pub streaming: bool,
    pub problem: Option<String>,
    /// On the primary: the standbys it waits for, and those confirmed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synchronous_standbys: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_confirmed: Option<Vec<String>>,
    /// Parameters that take effect only at a restart.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending_restart: Vec<String>,
    pub tags: crate::data::Tags,
    /// WAL archiving, when the spec has a backup tool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<crate::data::ArchiveStatus>,
    /// The last backup its keeper took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<crate::data::BackupDone>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxyStatus {
    pub uid: String,
    /// The proxy generation whose view it has applied.
    pub generation: u64,
}

impl ClusterStatus {
    /// Keepers whose database is healthy.
    pub fn healthy_keepers(&self) -> usize {
        self.keepers.iter().filter(|k| k.healthy).count()
    }
}

/// An LSN as PostgreSQL prints it.
pub fn format_lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
}

/// Reads the cluster's data and its proxies' registrations.
pub async fn read(store: &impl Store, keys: &Keys) -> Result<ClusterStatus, StatusError> {
    let kv = store
        .get(&keys.clusterdata())
        .await?
        .ok_or_else(|| StatusError::NoCluster(keys.base().to_owned()))?;
    let data = ClusterData::from_json(&kv.value)?;
    let (proxies, _) = store.list(&keys.proxies()).await?;
    let proxies = proxies
        .iter()
        .filter_map(|kv| serde_json::from_str::<ProxyReport>(&kv.value).ok())
        .map(|p| ProxyStatus {
            uid: p.uid,
            generation: p.generation,
        })
        .collect();
    let mut s = of(&data, keys.base(), proxies);
    let (sentinels, _) = store.list(&keys.sentinels()).await?;
    s.sentinels = sentinels
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(&keys.sentinels()))
        .map(str::to_owned)
        .collect();
    s.leader = store.leader(&keys.leader()).await?;
    Ok(s)
}

/// The status of `data` (pure).
pub fn of(data: &ClusterData, cluster: &str, proxies: Vec<ProxyStatus>) -> ClusterStatus {
    let master = data.proxy.master_db.as_ref().and_then(|m| data.dbs.get(m));
    let keepers = data
        .dbs
        .values()
        .map(|db| {
            let primary = db.spec.role == Role::Master;
            KeeperStatus {
                uid: db.keeper.clone(),
                role: db.spec.role.as_str(),
                healthy: db.status.healthy,
                address: db.status.address.clone(),
                // Never known (a keeper that has not reported a running
                // PostgreSQL yet) is not 0/0.
                lsn: (db.status.lsn > 0 || db.status.timeline > 0)
                    .then(|| format_lsn(db.status.lsn)),
                lag_bytes: master.map(|m| m.status.lsn.saturating_sub(db.status.lsn)),
                timeline: db.status.timeline,
                streaming: db.status.streaming,
                problem: db.status.problem.clone(),
                synchronous_standbys: primary.then(|| db.spec.synchronous_standbys.clone()),
                sync_confirmed: primary.then(|| db.status.sync_confirmed.clone()),
                pending_restart: db.status.pending_restart.clone(),
                archive: db.status.archive.clone(),
                backup: db.status.backup.clone(),
                tags: data
                    .keepers
                    .get(&db.keeper)
                    .map(|k| k.tags())
                    .unwrap_or_default(),
            }
        })
        .collect();
    ClusterStatus {
        cluster: cluster.to_owned(),
        phase: data.phase,
        generation: data.proxy.generation,
        master: master.map(|m| PrimaryStatus {
            keeper: m.keeper.clone(),
            address: m.status.address.clone(),
        }),
        failover: data.failover.as_ref().map(|f| FailoverStatus {
            reason: f.reason.clone(),
            from: f.from.clone(),
            to: f.to.clone(),
        }),
        notice: data.notice.clone(),
        paused: data.paused,
        standby_of: data
            .spec
            .standby_source
            .as_ref()
            .filter(|_| data.spec.is_standby())
            .map(|s| s.address()),
        keepers,
        proxies,
        sentinels: Vec::new(),
        leader: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Db, DbSpec, DbStatus};
    use crate::ClusterSpec;

    #[test]
    fn the_status_names_the_primary_lags_and_unknown_positions() {
        let mut d = ClusterData::new(ClusterSpec::default());
        let db = |keeper: &str, role: Role, lsn: u64, timeline: u32| Db {
            keeper: keeper.into(),
            spec: DbSpec {
                role,
                synchronous_standbys: vec!["k2".into()],
                ..Default::default()
            },
            status: DbStatus {
                healthy: true,
                address: Some(format!("{keeper}:5432")),
                lsn,
                timeline,
                sync_confirmed: vec!["k2".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        d.dbs
            .insert("k1".into(), db("k1", Role::Master, 0x1_0000_0100, 2));
        d.dbs
            .insert("k2".into(), db("k2", Role::Standby, 0x1_0000_0000, 2));
        d.dbs.insert("k3".into(), db("k3", Role::Standby, 0, 0));
        d.proxy.master_db = Some("k1".into());
        let s = of(&d, "keelson/main", vec![]);
        assert_eq!(s.master.as_ref().map(|m| m.keeper.as_str()), Some("k1"));
        assert_eq!(s.keepers[0].lsn.as_deref(), Some("1/100"));
        assert_eq!(s.keepers[1].lag_bytes, Some(0x100));
        assert_eq!(s.keepers[2].lsn, None, "never reported is not 0/0");
        assert_eq!(
            s.keepers[0].synchronous_standbys.as_deref(),
            Some(&["k2".to_owned()][..])
        );
        assert!(
            s.keepers[1].synchronous_standbys.is_none(),
            "only on the primary"
        );
        assert_eq!(s.healthy_keepers(), 3);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["master"]["keeper"], "k1");
        assert!(json["keepers"][1].get("synchronous_standbys").is_none());
    }
}
