//! The sentinel's loop: hold a lease, campaign for leadership, and while
//! leader read the cluster data, the keepers' reports and the proxies'
//! acknowledgements, call [`decide`], and write the result by
//! compare-and-swap on the revision read.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cluster::data::KeeperReport;
use cluster::{AnyStore, Cas, ClusterData, Keys, LeaseId, Store, StoreError};

use crate::decide::{decide, Observations};

/// How often the sentinel looks at the cluster.
pub const TICK: Duration = Duration::from_millis(250);
/// The sentinel's lease: leadership moves on this long after it dies.
pub const LEASE_TTL: Duration = Duration::from_secs(3);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads what the keepers and proxies report.
pub async fn observe(store: &AnyStore, keys: &Keys) -> Result<Observations, StoreError> {
    let mut obs = Observations::default();
    let (kvs, _) = store.list(&keys.keepers()).await?;
    for kv in kvs {
        match serde_json::from_str::<KeeperReport>(&kv.value) {
            Ok(r) => {
                obs.keepers.insert(r.uid.clone(), r);
            }
            Err(e) => {
                tracing::warn!(key = kv.key, error = %e, "ignoring an unreadable keeper report")
            }
        }
    }
    let (kvs, _) = store.list(&keys.proxies()).await?;
    for kv in kvs {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&kv.value) {
            if let (Some(uid), Some(g)) = (v["uid"].as_str(), v["generation"].as_u64()) {
                obs.proxies.insert(uid.to_owned(), g);
            }
        }
    }
    Ok(obs)
}

/// One round as leader. Returns whether the cluster data changed.
/// `last_healthy` is this sentinel's memory of when each keeper last
/// reported a healthy database.
pub async fn step(
    store: &AnyStore,
    keys: &Keys,
    last_healthy: &mut BTreeMap<String, u64>,
) -> Result<bool, StoreError> {
    let Some(kv) = store.get(&keys.clusterdata()).await? else {
        return Ok(false);
    };
    let data = ClusterData::from_json(&kv.value).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let mut obs = observe(store, keys).await?;
    let now = now_ms();
    // A report outlives its keeper by up to a lease TTL. Judge it by when
    // it was made: older than two report intervals means the keeper is not
    // reporting, as if there were no report.
    let stale_ms = 2 * data.spec.keeper_report_interval.as_millis() as u64;
    obs.keepers
        .retain(|_, r| r.reported_at_ms == 0 || now.saturating_sub(r.reported_at_ms) <= stale_ms);
    for (uid, r) in &obs.keepers {
        let made = if r.reported_at_ms > 0 {
            r.reported_at_ms.min(now)
        } else {
            now
        };
        if r.healthy {
            let seen = last_healthy.entry(uid.clone()).or_insert(made);
            *seen = (*seen).max(made);
        }
    }
    obs.last_healthy_ms = last_healthy.clone();
    let next = decide(&data, &obs, now);
    if next == data {
        return Ok(false);
    }
    if next.proxy != data.proxy || next.failover != data.failover {
        tracing::info!(
            generation = next.proxy.generation,
            master = ?next.proxy.master_db,
            failover = ?next.failover,
            "cluster decision"
        );
    }
    match store
        .put_if_revision(&keys.clusterdata(), &next.to_json(), kv.mod_revision, 0)
        .await?
    {
        Cas::Done(_) => Ok(true),
        // Someone else wrote meanwhile (ctl, or a leader we did not know
        // about): decide again from what is there now.
        Cas::Conflict(_) => Ok(false),
    }
}

/// Runs a sentinel named `uid` until the task is dropped.
pub async fn run(store: AnyStore, keys: Keys, uid: String) {
    let mut lease: LeaseId = 0;
    let mut leading = false;
    let mut last_healthy = BTreeMap::new();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        if lease == 0 {
            match store.grant(LEASE_TTL).await {
                Ok(l) => lease = l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot get a lease");
                    continue;
                }
            }
        } else if let Err(e) = store.keep_alive(lease).await {
            tracing::warn!(error = %e, "cannot renew the lease");
            if matches!(e, StoreError::LeaseExpired(_)) {
                lease = 0;
                leading = false;
            }
            continue;
        }
        let _ = store
            .put(&format!("{}{uid}", keys.sentinels()), "{}", lease)
            .await;
        match store.campaign(&keys.leader(), &uid, lease).await {
            Ok(now) => {
                if now != leading {
                    tracing::info!(leader = now, "sentinel leadership changed");
                }
                leading = now;
            }
            Err(e) => tracing::warn!(error = %e, "campaign failed"),
        }
        if leading {
            if let Err(e) = step(&store, &keys, &mut last_healthy).await {
                tracing::warn!(error = %e, "sentinel round failed");
            }
        }
    }
}
