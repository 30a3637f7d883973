//! The keeper's reconcile loop: read what the cluster data says this
//! keeper's database should be, make the local PostgreSQL match it, and
//! report its state under the keeper's lease every interval.
//!
//! The decision of what to do is the pure [`plan`]; this module only
//! gathers its inputs and carries out its actions.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cluster::data::Role;
use cluster::{AnyStore, ClusterData, Keys, LeaseId, Store, StoreError};

use crate::pg::{slot_name, Instance, PgBin, PgError, Replication, Upstream};

/// What the cluster data asks of this keeper's database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub role: Role,
    /// For a standby: the address of the database it follows.
    pub upstream: Option<String>,
    pub synchronous_standbys: Vec<String>,
    pub generation: u64,
    /// A primary losing its role in a planned switchover stops cleanly, so
    /// that its standbys receive every WAL record. In a failover it stops
    /// at once (an immediate shutdown, crash-safe): a shutdown checkpoint
    /// would remove the WAL that pg_rewind needs to rejoin it later.
    pub switchover: bool,
}

/// What the keeper sees locally.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub initialized: bool,
    pub running: bool,
    /// `pg_is_in_recovery()` when running.
    pub in_recovery: bool,
    /// The upstream and sync list the running configuration was written for.
    pub configured_upstream: Option<String>,
    pub configured_sync: Vec<String>,
    /// Whether this data directory was a primary since it was created or
    /// rewound (so it may have diverged from a new primary).
    pub was_primary: bool,
}

/// One step towards the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    InitDb,
    BaseBackup {
        from: String,
    },
    Rewind {
        from: String,
    },
    WriteConfig,
    Start,
    Stop,
    /// Immediate shutdown (SIGQUIT): no checkpoint, no waiting for clients.
    StopNow,
    Restart,
    Reload,
    Promote,
}

/// The actions that take the local database from `o` to `d`. Pure.
pub fn plan(d: &Desired, o: &Observed) -> Vec<Action> {
    use Action::*;
    let mut a = Vec::new();
    match d.role {
        // Not (or no longer) a member with a role: a former primary is
        // stopped, so that nobody writes to it.
        Role::None => {
            if o.running {
                a.push(if o.in_recovery || d.switchover {
                    Stop
                } else {
                    StopNow
                });
            }
        }
        Role::Master => {
            if !o.initialized {
                a.extend([InitDb, WriteConfig, Start]);
            } else if !o.running {
                a.extend([WriteConfig, Start]);
                if o.configured_upstream.is_some() {
                    a.push(Promote);
                }
            } else if o.in_recovery {
                a.extend([WriteConfig, Promote]);
            } else if o.configured_sync != d.synchronous_standbys {
                a.extend([WriteConfig, Reload]);
            }
        }
        Role::Standby => {
            let Some(up) = d.upstream.clone() else {
                return a;
            };
            if !o.initialized {
                a.extend([BaseBackup { from: up }, WriteConfig, Start]);
            } else if o.was_primary {
                // A former primary may hold WAL the new primary never saw.
                if o.running {
                    a.push(Stop);
                }
                a.extend([Rewind { from: up }, WriteConfig, Start]);
            } else if !o.running {
                a.extend([WriteConfig, Start]);
            } else if o.configured_upstream.as_deref() != Some(up.as_str()) {
                a.extend([WriteConfig, Restart]);
            }
        }
    }
    a
}

/// Settings of one keeper process.
#[derive(Debug, Clone)]
pub struct KeeperConfig {
    pub uid: String,
    pub dir: PathBuf,
    pub host: String,
    pub port: u16,
    pub pg_bin_dir: Option<PathBuf>,
    pub replication: Replication,
}

/// Errors that stop a keeper.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("another keeper holds {0}; two keepers cannot share a data directory")]
    Locked(String),
}

fn lock_dir(dir: &std::path::Path) -> Result<std::fs::File, KeeperError> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).map_err(PgError::Io)?;
    let path = dir.join("keeper.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(PgError::Io)?;
    // SAFETY: flock on a descriptor we own; held for the process lifetime.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(KeeperError::Locked(path.display().to_string()));
    }
    Ok(f)
}

/// Runs the keeper until the task is dropped.
pub async fn run(cfg: KeeperConfig, store: AnyStore, keys: Keys) -> Result<(), KeeperError> {
    let _lock = lock_dir(&cfg.dir)?;
    let bin = PgBin::find(cfg.pg_bin_dir.clone())?;
    let mut pg = Instance::new(bin, &cfg.dir, &cfg.host, cfg.port, cfg.replication.clone());
    // Set once the replication account is known to match this keeper's
    // settings on the primary.
    let mut account_ready = false;
    let mut obs = Observed {
        initialized: pg.is_initialized(),
        ..Default::default()
    };
    let mut applied = 0u64;
    let mut lease: LeaseId = 0;
    let fence = Arc::new(SelfFence::default());
    let _watchdog = AbortOnDrop(tokio::spawn(fence.clone().watch()));
    let mut interval = Duration::from_secs(1);
    let mut watch: Option<cluster::Watch> = None;
    loop {
        let data = match store.get(&keys.clusterdata()).await {
            Ok(Some(kv)) => ClusterData::from_json(&kv.value).ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster data");
                None
            }
        };
        if let Some(data) = &data {
            interval = data.spec.keeper_report_interval;
            fence.timeout_ms.store(
                data.spec.fence_timeout.as_millis() as u64,
                Ordering::Relaxed,
            );
        }
        // While the lease cannot be renewed the keeper changes nothing: it
        // may no longer be what the cluster data says.
        let fenced = fence.expired();
        if let (Some(data), false) = (&data, fenced) {
            if let Some(desired) = desired_of(data, &cfg.uid) {
                obs.running = pg.is_running();
                obs.initialized = pg.is_initialized();
                obs.was_primary = obs.initialized && !pg.has_standby_signal();
                if obs.running {
                    obs.in_recovery = pg.report(&cfg.uid, applied).await.in_recovery;
                }
                let steps = plan(&desired, &obs);
                if !steps.is_empty() {
                    tracing::info!(?steps, role = desired.role.as_str(), "reconciling");
                }
                match act(&mut pg, &cfg, &desired, &mut obs, &steps, data).await {
                    Ok(()) => applied = desired.generation,
                    Err(e) => tracing::error!(error = %e, "could not reconcile PostgreSQL"),
                }
                let primary = desired.role == Role::Master && pg.is_running();
                if primary && !obs.in_recovery {
                    if let Err(e) = serve_standbys(&pg, data, &cfg.uid, &mut account_ready).await {
                        tracing::warn!(error = %e, "cannot set up replication for the standbys");
                    }
                }
                fence.primary_pid.store(
                    if primary { pg.pid().unwrap_or(0) } else { 0 },
                    Ordering::Relaxed,
                );
            }
        }
        let mut report = pg.report(&cfg.uid, applied).await;
        report.reported_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if lease == 0 {
            match store.grant(interval * 3).await {
                Ok(l) => {
                    lease = l;
                    fence.renewed();
                }
                Err(e) => tracing::warn!(error = %e, "cannot get a lease"),
            }
        } else {
            match store.keep_alive(lease).await {
                Ok(()) => fence.renewed(),
                Err(e) => {
                    if matches!(e, StoreError::LeaseExpired(_)) {
                        lease = 0;
                    }
                    tracing::warn!(error = %e, "cannot renew the lease");
                }
            }
        }
        if lease != 0 {
            let json = serde_json::to_string(&report).unwrap_or_default();
            if let Err(e) = store.put(&keys.keeper(&cfg.uid), &json, lease).await {
                tracing::warn!(error = %e, "cannot report");
            }
        }
        // Wake at the next interval, or at once when the cluster data
        // changes (a promotion order must not wait for the next report).
        if watch.is_none() {
            watch = store.watch(&keys.clusterdata(), 0).await.ok();
        }
        match watch.as_mut() {
            Some(w) => {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    ev = w.recv() => if !matches!(ev, Some(Ok(_))) { watch = None; },
                }
            }
            None => tokio::time::sleep(interval).await,
        }
    }
}

/// Self-fencing: a keeper whose database is primary and which cannot renew
/// its lease for `fence_timeout` stops its PostgreSQL (an immediate
/// shutdown ends every session), so that clients connecting directly cannot write to a
/// primary the cluster may already have replaced. A watchdog task checks
/// every 100 ms, independently of the reconcile loop, which can itself be
/// stuck on an unreachable store.
#[derive(Debug)]
struct SelfFence {
    started: std::time::Instant,
    renewed_ms: AtomicU64,
    timeout_ms: AtomicU64,
    /// The postmaster's pid while the database is primary; 0 otherwise.
    primary_pid: AtomicU32,
}

impl Default for SelfFence {
    fn default() -> Self {
        SelfFence {
            started: std::time::Instant::now(),
            renewed_ms: AtomicU64::new(0),
            timeout_ms: AtomicU64::new(
                cluster::ClusterSpec::default().fence_timeout.as_millis() as u64
            ),
            primary_pid: AtomicU32::new(0),
        }
    }
}

impl SelfFence {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn renewed(&self) {
        self.renewed_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn expired(&self) -> bool {
        self.now_ms()
            .saturating_sub(self.renewed_ms.load(Ordering::Relaxed))
            > self.timeout_ms.load(Ordering::Relaxed)
    }

    async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let pid = self.primary_pid.load(Ordering::Relaxed);
            if pid != 0 && self.expired() {
                tracing::error!(
                    pid,
                    timeout_ms = self.timeout_ms.load(Ordering::Relaxed),
                    "cannot renew the lease: stopping the primary PostgreSQL (self-fencing)"
                );
                // An immediate shutdown: it ends every session at once,
                // and writes no shutdown checkpoint, which would recycle WAL
                // that pg_rewind needs if the cluster failed over meanwhile.
                // SAFETY: signalling the postmaster this keeper started.
                unsafe {
                    libc::kill(pid as i32, libc::SIGQUIT);
                }
                self.primary_pid.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// On the primary: the replication account exists with this keeper's
/// password, and there is one replication slot per other database in the
/// cluster (and none for databases that left it).
async fn serve_standbys(
    pg: &Instance,
    data: &ClusterData,
    uid: &str,
    account_ready: &mut bool,
) -> Result<(), PgError> {
    if !*account_ready {
        pg.ensure_replication_account().await?;
        *account_ready = true;
    }
    let wanted: Vec<String> = data
        .dbs
        .keys()
        .filter(|u| *u != uid)
        .map(|u| slot_name(u))
        .collect();
    pg.sync_slots(&wanted).await
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn desired_of(data: &ClusterData, uid: &str) -> Option<Desired> {
    let db = data.dbs.get(uid)?;
    let upstream = db
        .spec
        .follow
        .as_ref()
        .and_then(|f| data.dbs.get(f))
        .and_then(|f| f.status.address.clone());
    Some(Desired {
        role: db.spec.role,
        upstream,
        synchronous_standbys: db.spec.synchronous_standbys.clone(),
        generation: db.generation,
        switchover: data
            .failover
            .as_ref()
            .is_some_and(|f| f.from == uid && f.reason == cluster::data::SWITCHOVER),
    })
}

async fn act(
    pg: &mut Instance,
    cfg: &KeeperConfig,
    d: &Desired,
    o: &mut Observed,
    steps: &[Action],
    data: &ClusterData,
) -> Result<(), PgError> {
    const START: Duration = Duration::from_secs(60);
    for step in steps {
        match step {
            Action::InitDb => {
                pg.initdb().await?;
                o.initialized = true;
            }
            Action::BaseBackup { from } => {
                pg.basebackup(from, Some(&slot_name(&cfg.uid))).await?;
                o.initialized = true;
                o.was_primary = false;
            }
            Action::Rewind { from } => {
                // Rewinding onto a server still in recovery finds "the same
                // timeline" and keeps this server's diverged WAL; and an
                // unreachable source is no reason to drop this data.
                if !pg.is_primary(from).await? {
                    return Err(PgError::Program {
                        program: "pg_rewind".into(),
                        detail: format!("the source {from} is not a primary yet; waiting"),
                    });
                }
                if let Err(e) = pg.rewind(from).await {
                    tracing::warn!(error = %e, "pg_rewind failed; taking a fresh base backup");
                    pg.remove_data()?;
                    pg.basebackup(from, Some(&slot_name(&cfg.uid))).await?;
                }
                o.was_primary = false;
            }
            Action::WriteConfig => {
                let upstream = match (d.role, &d.upstream) {
                    (Role::Standby, Some(up)) => Some(Upstream {
                        address: up.clone(),
                        application_name: cfg.uid.clone(),
                        slot: Some(slot_name(&cfg.uid)),
                    }),
                    _ => None,
                };
                pg.write_config(
                    &data.spec.pg_parameters,
                    upstream.as_ref(),
                    &d.synchronous_standbys,
                )?;
                o.configured_upstream = if d.role == Role::Standby {
                    d.upstream.clone()
                } else {
                    None
                };
                o.configured_sync = d.synchronous_standbys.clone();
            }
            Action::Start => {
                pg.start(START).await?;
                o.running = true;
            }
            Action::Stop => {
                pg.stop(START).await;
                o.running = false;
            }
            Action::StopNow => {
                pg.stop_now(START).await;
                o.running = false;
            }
            Action::Restart => {
                pg.stop(START).await;
                pg.start(START).await?;
            }
            Action::Reload => pg.reload().await?,
            Action::Promote => {
                pg.promote().await?;
                o.in_recovery = false;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    fn desired(role: Role, upstream: Option<&str>) -> Desired {
        Desired {
            role,
            upstream: upstream.map(str::to_owned),
            synchronous_standbys: vec![],
            generation: 1,
            switchover: false,
        }
    }

    #[test]
    fn plans() {
        let fresh = Observed::default();
        let running_primary = Observed {
            initialized: true,
            running: true,
            was_primary: true,
            ..Default::default()
        };
        let running_standby = Observed {
            initialized: true,
            running: true,
            in_recovery: true,
            configured_upstream: Some("a:1".into()),
            ..Default::default()
        };
        let table: Vec<(&str, Desired, Observed, Vec<Action>)> = vec![
            (
                "new primary",
                desired(Role::Master, None),
                fresh.clone(),
                vec![InitDb, WriteConfig, Start],
            ),
            (
                "new standby",
                desired(Role::Standby, Some("a:1")),
                fresh.clone(),
                vec![BaseBackup { from: "a:1".into() }, WriteConfig, Start],
            ),
            (
                "standby without a known upstream waits",
                desired(Role::Standby, None),
                fresh.clone(),
                vec![],
            ),
            (
                "steady primary",
                desired(Role::Master, None),
                running_primary.clone(),
                vec![],
            ),
            (
                "steady standby",
                desired(Role::Standby, Some("a:1")),
                running_standby.clone(),
                vec![],
            ),
            (
                "promote a standby",
                desired(Role::Master, None),
                running_standby.clone(),
                vec![WriteConfig, Promote],
            ),
            (
                "follow a new primary",
                desired(Role::Standby, Some("b:1")),
                running_standby.clone(),
                vec![WriteConfig, Restart],
            ),
            (
                "old primary rejoins with pg_rewind",
                desired(Role::Standby, Some("b:1")),
                running_primary.clone(),
                vec![Stop, Rewind { from: "b:1".into() }, WriteConfig, Start],
            ),
            (
                "sync standbys change: reload",
                Desired {
                    synchronous_standbys: vec!["s1".into()],
                    ..desired(Role::Master, None)
                },
                running_primary.clone(),
                vec![WriteConfig, Reload],
            ),
            (
                "failed over while running: stop at once, keeping WAL for pg_rewind",
                desired(Role::None, None),
                running_primary.clone(),
                vec![StopNow],
            ),
            (
                "switched over: stop cleanly, so that standbys get every record",
                Desired {
                    switchover: true,
                    ..desired(Role::None, None)
                },
                running_primary,
                vec![Stop],
            ),
            (
                "no role and stopped: nothing",
                desired(Role::None, None),
                fresh.clone(),
                vec![],
            ),
        ];
        for (name, d, o, want) in table {
            assert_eq!(plan(&d, &o), want, "{name}");
        }
    }
}
