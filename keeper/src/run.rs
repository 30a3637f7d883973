//! The keeper's reconcile loop: read what the cluster data says this
//! keeper's database should be, make the local PostgreSQL match it, and
//! report its state under the keeper's lease every interval.
//!
//! The decision of what to do is the pure [`plan`]; this module only
//! gathers its inputs and carries out its actions.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cluster::data::{KeeperReport, Role};
use cluster::{AnyStore, Cas, ClusterData, Keys, LeaseId, Store, StoreError};

use crate::lease::Lease;
use crate::names::slot_name;
use crate::pg::{Instance, PgBin, PgError, Replication, Upstream};

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
    /// The cluster's PostgreSQL system identifier, when known (the
    /// primary's): a data directory of another system is never replaced.
    pub system_id: Option<String>,
    /// Synchronous mode with `min_sync >= 1`: a primary restarted in place
    /// holds clients out until a synchronous standby has caught up.
    pub hold_clients: bool,
    /// Copy the data afresh from the upstream (see `DbSpec::reinit`).
    pub reinit: bool,
    /// Maintenance mode (`ctl pause`): a stopped PostgreSQL is left
    /// stopped, unless its role changes (a switchover asked for).
    pub paused: bool,
    /// The first primary of a cluster created with `ctl init --mode pitr`
    /// (while the cluster has no data): restore, do not initdb.
    pub restore: Option<cluster::data::RestoreTarget>,
    /// The cluster is a standby cluster: nothing in it takes writes, so no
    /// member diverges from another, and a changed upstream is followed by
    /// a reload, never a rewind.
    pub standby_cluster: bool,
    /// This database leads a standby cluster: it runs as a standby (role
    /// [`Role::Standby`] here) of this source, whose address is `upstream`.
    pub source: Option<cluster::data::StandbySource>,
    /// The cluster's data came from a source (it is, or was, a standby
    /// cluster): a primary without data never runs initdb.
    pub from_source: bool,
}

/// The `ctl restart` and `ctl reload` counters a keeper has carried out,
/// kept in its directory across its own restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Requests {
    pub restart: u64,
    pub reload: u64,
}

/// What the keeper sees locally.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub initialized: bool,
    /// The data directory is in archive recovery for a restore
    /// (`recovery.signal` without `standby.signal`).
    pub restoring: bool,
    pub running: bool,
    /// `pg_is_in_recovery()` when running.
    pub in_recovery: bool,
    /// The upstream the standby configuration was last written for (kept
    /// in the keeper's directory across restarts).
    pub configured_upstream: Option<String>,
    /// On a running primary: `SHOW synchronous_standby_names`.
    pub loaded_sync: Option<String>,
    /// Whether this data directory was a primary since it was created or
    /// rewound (so it may have diverged from a new primary).
    pub was_primary: bool,
    /// The data directory's system identifier, when known.
    pub system_id: Option<String>,
    /// A running standby that has not streamed from its upstream for
    /// [`STUCK_AFTER`]: it may have replayed past the new primary's fork
    /// point, and then can never follow it without a rewind.
    pub stuck: bool,
    /// pg_hba.conf holds clients out (see [`Desired::hold_clients`]).
    pub clients_held: bool,
    /// On a primary: PostgreSQL reports one of the standbys the spec names
    /// as synchronous (it has caught up).
    pub sync_caught_up: bool,
    /// Stuck again after a rewind that changed nothing: the WAL it needs
    /// may be gone; only a fresh copy helps.
    pub rewind_did_not_help: bool,
    /// The cluster's `pg_parameters` or `pg_hba` differ from those last
    /// written into the configuration (a `ctl spec update`): written and
    /// reloaded.
    pub params_changed: bool,
    /// Settings this standby was last started with above the spec's
    /// value, its primary's from the control file (see
    /// [`raise_to_primary_minimums`]): reported as pending a restart.
    pub raised: Vec<(String, i64)>,
    /// The data was already copied afresh for this spec generation: a
    /// `reinit` still set (the sentinel clears it once it sees the copy
    /// run) is not done twice.
    pub reinit_done: bool,
    /// `ctl restart` asks this running PostgreSQL to restart.
    pub restart_requested: bool,
}

/// How long a standby may fail to stream from its upstream before the
/// keeper rewinds it onto that upstream (pg_rewind does nothing if it has
/// not diverged).
pub const STUCK_AFTER: Duration = Duration::from_secs(30);

/// How long a primary leaving its role in a planned switchover waits for
/// open transactions (see [`cluster::data::SWITCHOVER_DRAIN`]).
pub const SWITCHOVER_DRAIN: Duration = cluster::data::SWITCHOVER_DRAIN;

/// One step towards the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    InitDb,
    /// Restores the data directory from a backup (`ctl init --mode pitr`);
    /// PostgreSQL then replays the archive to the target and promotes.
    Restore {
        target: cluster::data::RestoreTarget,
    },
    BaseBackup {
        from: String,
    },
    /// Waits (fails this pass) until `from` runs as a primary: a rewind
    /// onto a server still in recovery finds "the same timeline" and keeps
    /// this server's diverged WAL.
    WaitPrimary {
        from: String,
    },
    Rewind {
        from: String,
    },
    /// Deletes the data directory and copies it afresh from `from`.
    Reinit {
        from: String,
    },
    WriteConfig,
    /// [`Action::WriteConfig`] with clients held out of pg_hba.conf.
    HoldClients,
    Start,
    Stop,
    /// Immediate shutdown (SIGQUIT): no checkpoint, no waiting for clients.
    StopNow,
    Reload,
    /// A primary leaving its role in a planned switchover: waits (up to
    /// the proxies' switchover drain) for open transactions to end.
    WaitTransactions,
    Promote,
    /// Makes no change: the data directory must not be touched.
    Refuse {
        why: String,
    },
}

/// The actions that take the local database from `o` to `d`. Pure.
pub fn plan(d: &Desired, o: &Observed) -> Vec<Action> {
    use Action::*;
    let mut a = Vec::new();
    let sync_names = crate::names::synchronous_standby_names(&d.synchronous_standbys);
    match d.role {
        // Not (or no longer) a member with a role: a former primary is
        // stopped, so that nobody writes to it.
        Role::None => {
            if o.running {
                if d.switchover && !o.in_recovery {
                    a.push(WaitTransactions);
                }
                a.push(if o.in_recovery || d.switchover {
                    Stop
                } else {
                    StopNow
                });
            }
        }
        Role::Master => {
            if !o.initialized && d.system_id.is_some() {
                // The cluster has data; an empty directory here means it
                // was lost (a volume not mounted): initdb would serve an
                // empty database as the primary.
                return vec![Refuse {
                    why: format!(
                        "the data directory is empty, but this database belongs to PostgreSQL \
                         system {}: restore it, or run `keelson ctl failkeeper` to promote a standby",
                        d.system_id.as_deref().unwrap_or_default()
                    ),
                }];
            }
            if !o.initialized && d.from_source {
                // Promoted before its leader had a copy of the source
                // (`ctl promote` refuses that; a spec update does not).
                return vec![Refuse {
                    why: "the data directory is empty, and this cluster's data comes from its \
                          standby_source: initdb would serve an empty database as the primary; \
                          restore it, or copy the source with a new standby cluster"
                        .into(),
                }];
            }
            if !o.initialized {
                match &d.restore {
                    // Clients stay out until it has replayed to the target
                    // and promoted.
                    Some(t) => a.extend([Restore { target: t.clone() }, HoldClients, Start]),
                    None => a.extend([InitDb, WriteConfig, Start]),
                }
            } else if o.restoring {
                // Replaying the archive to the restore target: PostgreSQL
                // promotes itself there (a promotion now would stop short).
                if !o.running {
                    a.extend([HoldClients, Start]);
                }
                return a;
            } else if !o.running {
                let restart = o.configured_upstream.is_none();
                if restart && d.paused {
                    // The operator may be working on it.
                    return a;
                }
                if restart && d.hold_clients && !d.synchronous_standbys.is_empty() {
                    // A synchronous primary restarting in place (after a
                    // crash) may hold commits no standby confirmed: no
                    // client may read them before a standby has them.
                    a.extend([HoldClients, Start]);
                } else {
                    a.extend([WriteConfig, Start]);
                }
                if !restart {
                    a.push(Promote);
                }
            } else if o.clients_held && (o.sync_caught_up || !d.hold_clients) {
                a.extend([WriteConfig, Reload]);
            } else if o.in_recovery {
                // The synchronous standbys are loaded before the promotion
                // (pg_promote does not read the configuration), so that the
                // first commit on the new primary already waits for them.
                a.extend([WriteConfig, Reload, Promote]);
            } else if o.loaded_sync.as_ref().is_some_and(|l| *l != sync_names) {
                // (Unknown while PostgreSQL does not answer: nothing to do.)
                a.extend([WriteConfig, Reload]);
            }
        }
        Role::Standby => {
            let Some(up) = d.upstream.clone() else {
                return a;
            };
            if let (Some(mine), Some(theirs)) = (&o.system_id, &d.system_id) {
                if o.initialized && mine != theirs {
                    return vec![Refuse {
                        why: format!(
                            "the data directory holds another PostgreSQL system ({mine}) than \
                             the cluster's ({theirs}); move it away to let this keeper join"
                        ),
                    }];
                }
            }
            if !o.initialized {
                a.extend([BaseBackup { from: up }, WriteConfig, Start]);
            } else if d.standby_cluster && o.stuck && !o.was_primary && (!d.reinit || o.reinit_done)
            {
                // Nothing is rewound or copied by itself in a standby
                // cluster: the reasons a standby does not stream there
                // (its slot still held, replication refused, the source
                // gone, an upstream behind it) leave its data the newest
                // copy there may be. Only a fork of the source's timeline
                // before what it replayed needs a new copy (`ctl reinit`).
                return vec![Refuse {
                    why: format!(
                        "has not streamed from {up} for {}s; PostgreSQL's log says why. Nothing is \
                         rewound or copied by itself in a standby cluster: if the source forked \
                         its timeline before this server's position, `keelson ctl reinit` copies it \
                         afresh (docs/standby-cluster.md)",
                        STUCK_AFTER.as_secs()
                    ),
                }];
            } else if (d.reinit && !o.reinit_done) || (o.stuck && o.rewind_did_not_help) {
                a.push(WaitPrimary { from: up.clone() });
                if o.running {
                    a.push(if o.was_primary { StopNow } else { Stop });
                }
                a.extend([Reinit { from: up }, WriteConfig, Start]);
            } else if d.standby_cluster
                && !o.was_primary
                && !o.stuck
                && o.running
                && o.configured_upstream.as_deref() != Some(up.as_str())
            {
                // A standby cluster's members all replay the source's WAL:
                // a new upstream there (a new standby leader, or the source
                // for a new leader) holds the same history, at most behind
                // this one for a while. primary_conninfo is reloaded.
                a.extend([WriteConfig, Reload]);
            } else if o.was_primary
                || o.stuck
                || (o.running && o.configured_upstream.as_deref() != Some(up.as_str()))
            {
                // A former primary may hold WAL the new primary never saw;
                // so may a standby that followed another upstream (it can
                // have replayed past the new primary's fork point).
                // pg_rewind rewinds only what diverged.
                a.push(WaitPrimary { from: up.clone() });
                if o.running {
                    // A standby stops cleanly ("shut down in recovery", as
                    // pg_rewind wants it); a primary at once, keeping the
                    // WAL pg_rewind reads.
                    a.push(if o.was_primary { StopNow } else { Stop });
                }
                a.extend([Rewind { from: up }, WriteConfig, Start]);
            } else if !o.running && !d.paused {
                a.extend([WriteConfig, Start]);
            }
        }
    }
    if a.is_empty() && o.running && o.restart_requested && d.role != Role::None {
        // A clean restart in place. A synchronous primary's stop ends the
        // commits still waiting for a standby (flushed here, never
        // acknowledged): clients are held out as after a crash.
        a.push(Stop);
        if d.role == Role::Master
            && !o.in_recovery
            && d.hold_clients
            && !d.synchronous_standbys.is_empty()
        {
            a.push(HoldClients);
        } else {
            a.push(if o.clients_held {
                HoldClients
            } else {
                WriteConfig
            });
        }
        a.push(Start);
        return a;
    }
    if a.is_empty() && o.running && o.params_changed && d.role != Role::None {
        // New parameters reach a running server by reload; what needs a
        // restart is then reported as pending (pg_settings).
        a.extend([
            if o.clients_held {
                HoldClients
            } else {
                WriteConfig
            },
            Reload,
        ]);
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
    /// The command that runs the fence guard for a keeper directory (it is
    /// given the directory as its last argument); `None` runs none.
    pub guard: Option<(PathBuf, Vec<String>)>,
    /// Tags set by flags at start (see [`cluster::data::KeeperReport::tags`]);
    /// a SIGHUP's re-read flags ([`crate::node::NodeState::set_flag_tags`])
    /// win over them.
    pub tags: Option<cluster::data::Tags>,
    /// What the node API answers from, updated every round.
    pub node: std::sync::Arc<crate::node::NodeState>,
    /// TLS for PostgreSQL and replication (see [`crate::pg::PgTls`]).
    pub tls: Option<crate::pg::PgTls>,
    /// Where other keepers and proxies reach this keeper's node API
    /// (`host:port`), reported to the cluster; `None` without one.
    pub api_address: Option<String>,
    /// Where this keeper runs a pgBackRest TLS server (`host:port`), with
    /// pgBackRest as the spec's tool and TLS with a CA; `None`: none.
    pub pgbackrest_listen: Option<String>,
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
    #[error("{0}")]
    Config(String),
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
    crate::names::validate_uid(&cfg.uid).map_err(KeeperError::Config)?;
    let _lock = lock_dir(&cfg.dir)?;
    let bin = PgBin::find(cfg.pg_bin_dir.clone())?;
    let mut pg = Instance::new(bin, &cfg.dir, &cfg.host, cfg.port, cfg.replication.clone());
    pg.set_tls(cfg.tls.clone());
    pg.install_tls()?;
    let spec = cluster::ClusterSpec::default();
    let lease = Lease::new(&spec);
    cfg.node.set_lease(lease.clone());
    cfg.node.promises.keep_in(&cfg.dir);
    if let Some(pid) = pg.adopt() {
        // Until the cluster data says otherwise, a server that is not a
        // standby is fenced like a primary.
        if !pg.has_standby_signal() {
            lease.set_primary_pid(pid);
        }
    }
    if let Some(previous) = crate::guard::FenceFile::read(&cfg.dir) {
        lease.resume(&previous);
    }
    crate::lease::spawn_fence_thread(lease.clone(), cfg.dir.clone()).map_err(PgError::Io)?;
    if let Some((program, args)) = &cfg.guard {
        spawn_guard(program, args, &cfg.dir);
    }
    let _renewal = AbortOnDrop(tokio::spawn(crate::lease::renew(
        store.clone(),
        lease.clone(),
        cfg.dir.join("keeper.lease"),
    )));
    let _failsafe = AbortOnDrop(tokio::spawn(crate::failsafe::run(
        cfg.node.clone(),
        lease.clone(),
    )));
    let mut k = Keeper {
        instance: cluster::store::instance_id(),
        upstream_file: cfg.dir.join("upstream"),
        backup: Some(crate::backup::Worker::new(&cfg.dir)),
        ..Keeper::default()
    };
    let mut obs = Observed {
        initialized: pg.is_initialized(),
        configured_upstream: std::fs::read_to_string(&k.upstream_file)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty()),
        clients_held: cfg.dir.join("clients-held").exists(),
        ..Default::default()
    };
    let mut interval = spec.keeper_report_interval;
    let mut watch: Option<cluster::Watch> = None;
    loop {
        let data = match store.get(&keys.clusterdata()).await {
            Ok(Some(kv)) => match ClusterData::from_json(&kv.value) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot use the cluster data");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster data");
                None
            }
        };
        if let Some(data) = &data {
            interval = data.spec.keeper_report_interval;
            lease.set_spec(&data.spec);
        }
        // While the lease cannot be renewed, or another keeper holds this
        // uid, the keeper changes nothing: it may no longer be what the
        // cluster data says.
        // A report put under a new lease before this read makes the read
        // trustworthy even after the fence ran out: a failover the
        // sentinel started while the lease was gone is in this data.
        let id = lease.id();
        let fresh = k.unconfirmed.is_some_and(|(u, _)| u == id);
        let may_act = k.registered == id && id != 0 && (fresh || !lease.expired());
        if let (Some(data), true) = (&data, may_act) {
            if let Some(desired) = desired_of(data, &cfg.uid) {
                pg.set_source(desired.source.clone());
                if desired.role != Role::Master {
                    cfg.node.promises.end_promotion();
                }
                // The newest data first: a switchover or failover it
                // starts shows at once (no longer primary), not after
                // the step.
                cfg.node.update(|s| {
                    s.set_data(data);
                    s.busy = Some("reconcile");
                });
                // A standby asked to become primary while a failsafe
                // promise it gave holds stays a streaming standby until
                // then: the old primary may still take commits (no promise
                // is given any more, the data above names this one).
                let held = (desired.role == Role::Master && pg.has_standby_signal())
                    .then(|| cfg.node.promises.holding())
                    .flatten();
                match held {
                    Some(why) => {
                        if k.promise_noted != Some(data.proxy.generation) {
                            tracing::warn!("{why}; promoting after it ends");
                            k.promise_noted = Some(data.proxy.generation);
                        }
                    }
                    None => {
                        k.reconcile(&mut pg, &cfg, &desired, &mut obs, data, &lease)
                            .await
                    }
                }
                let cn = k.own_cn(&cfg.dir);
                if let Some(w) = k.backup.as_mut() {
                    let primary =
                        desired.role == Role::Master && pg.is_running() && !obs.in_recovery;
                    let request = data.dbs.get(&cfg.uid).and_then(|d| d.backup.as_ref());
                    let streaming_standby =
                        desired.role == Role::Standby && pg.is_running() && obs.in_recovery;
                    let standby = standby_backup_args(data, &cfg.dir)
                        .filter(|_| streaming_standby && cn.is_some());
                    let taken: String = data
                        .dbs
                        .iter()
                        .filter_map(|(u, db)| {
                            Some(format!("{u}:{} ", db.status.backup.as_ref()?.id))
                        })
                        .collect();
                    w.tick(
                        &pg.tools(),
                        &data.spec.backup,
                        request,
                        primary,
                        standby,
                        &taken,
                    );
                }
                let server = match (&cfg.pgbackrest_listen, &cn) {
                    (Some(listen), Some(_)) if pg.is_initialized() => {
                        let mut clients: Vec<String> = data
                            .dbs
                            .values()
                            .filter_map(|db| db.status.pgbackrest_server.as_ref())
                            .map(|s| s.cn.clone())
                            .collect();
                        clients.sort();
                        clients.dedup();
                        crate::backup::server_conf(&data.spec.backup, &cfg.dir, listen, &clients)
                    }
                    _ => None,
                };
                k.backup_server.keep(&pg.tools(), server);
            }
            if let Some((id, _)) = k.unconfirmed.take() {
                // Acted on: only now may this lease hold the fence off.
                lease.confirm(id);
            }
        }
        let running = pg.is_running();
        lease.set_primary_pid(match (running, obs.in_recovery, pg.pid()) {
            (true, false, Some(pid)) => pid,
            _ => 0,
        });
        let mut report = k.report(&pg, &cfg, running, &mut obs).await;
        if let (Some(listen), Some((_, Some(cn)))) = (&cfg.pgbackrest_listen, &k.own_cn) {
            report.pgbackrest_server = Some(cluster::data::PgbackrestServer {
                address: listen.clone(),
                config: cfg
                    .dir
                    .join(crate::backup::PGBACKREST_CONF)
                    .to_string_lossy()
                    .into(),
                data_dir: cfg.dir.join("pgdata").to_string_lossy().into(),
                socket_dir: cfg.dir.to_string_lossy().into(),
                cn: cn.clone(),
            });
        }
        k.publish(&store, &keys, &lease, &cfg.uid, &report).await;
        cfg.node.update(|s| {
            s.report = Some(report.clone());
            // Without the store, the last cluster data known holds; the
            // lease says whether this keeper may still act on it.
            if let Some(d) = &data {
                s.set_data(d);
            }
            s.fenced = lease.expired();
            s.backups = k.backup.as_ref().and_then(|w| w.list());
            s.last_round = Some(Instant::now());
            s.busy = None;
        });
        if report.healthy && !k.catalog_published {
            k.catalog_published = publish_catalog(&pg, &store, &keys, &cfg.uid).await;
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

/// Before this standby is promoted: pushes the segments it holds that the
/// old primary had not archived by its last report.
async fn archive_what_the_old_primary_did_not(pg: &Instance, cx: &Context<'_>, o: &Observed) {
    let data = cx.data;
    let old = data.failover.as_ref().map(|f| f.from.as_str());
    let after = old
        .and_then(|f| data.dbs.get(f))
        .and_then(|db| db.status.archive.as_ref())
        .and_then(|a| a.last_archived_wal.clone());
    let Some(after) = after else {
        tracing::warn!(
            old_primary = old.unwrap_or("-"),
            "the old primary reported no archived segment; nothing pushed before the promotion"
        );
        return;
    };
    if !o.in_recovery {
        return;
    }
    let r = pg.report(&cx.cfg.uid, 0).await;
    let (Some(received), Some(timeline)) = (r.lsn, r.timeline) else {
        return;
    };
    let t = Instant::now();
    let (pushed, failed) = crate::backup::push_unarchived(
        &pg.tools(),
        &data.spec.backup,
        &after,
        (timeline, received),
        cluster::data::PUSH_UNARCHIVED_BUDGET,
    )
    .await;
    if failed.is_empty() {
        tracing::info!(pushed, %after, took = ?t.elapsed(), "archived the segments the old primary had not");
    } else {
        tracing::error!(pushed, ?failed, %after, "could not archive every segment the old primary had not; the archive may have a gap");
    }
}

/// A standby's data directory, copied afresh: from the newest backup
/// when the spec says so (`backup.standbys_from_backup`; the standby then
/// replays the archive and streams from `from`), else, or when that fails
/// (no backup yet), with `pg_basebackup` from `from`.
async fn copy_from(
    pg: &Instance,
    data: &ClusterData,
    from: &str,
    uid: &str,
) -> Result<(), PgError> {
    if let Some(src) = data
        .spec
        .standby_source
        .as_ref()
        .filter(|s| data.spec.is_standby() && s.address() == from)
    {
        // A standby cluster's leader copies the source.
        return pg.basebackup(from, src.slot.as_deref()).await;
    }
    if data.spec.backup.standbys_from_backup {
        let t = Instant::now();
        match pg.restore_standby(&data.spec.backup).await {
            Ok(()) => {
                tracing::info!(took = ?t.elapsed(), "the standby's data restored from the newest backup; it replays the archive, then streams");
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot restore the standby from a backup; copying it with pg_basebackup");
                pg.remove_data()?;
            }
        }
    }
    pg.basebackup(from, Some(&slot_name(uid))).await
}

/// The spec's `pg_parameters` with what its backup section sets
/// ([`crate::backup::parameters`]; `validate_written` refuses those names
/// in `pg_parameters`, and keelson's win here).
fn effective_parameters(
    data: &ClusterData,
    dir: &std::path::Path,
    restoring: bool,
) -> std::collections::BTreeMap<String, String> {
    let mut p = data.spec.pg_parameters.clone();
    p.extend(crate::backup::parameters(&data.spec.backup, dir));
    // While a restore replays the archive: its target, from the keeper's
    // own directory (never from the data directory, which standbys copy).
    let target = std::fs::read_to_string(dir.join(RESTORE_TARGET_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<cluster::data::RestoreTarget>(&t).ok());
    if let (true, Some(t)) = (restoring, target) {
        let lit = |v: &str| cluster::params::conf_literal(v);
        p.insert(format!("recovery_target_{}", t.kind), lit(&t.target));
        p.insert("recovery_target_action".into(), lit("promote"));
    }
    p
}

/// The restore target a `ctl init --mode pitr` restore replays to, in the
/// keeper's directory while the restore runs.
const RESTORE_TARGET_FILE: &str = "restore-target";

/// Starts the fence guard, in its own process group so that a signal to
/// the keeper's group (a Ctrl-C) does not end it before the server it
/// guards. A guard already watching the directory makes it exit at once.
fn spawn_guard(program: &std::path::Path, args: &[String], dir: &std::path::Path) {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("fence-guard.log"));
    let mut c = std::process::Command::new(program);
    c.args(args)
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .process_group(0);
    if let Ok(log) = log {
        c.stderr(log);
    }
    match c.spawn() {
        Ok(child) => tracing::info!(pid = child.id(), "fence guard started"),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the fence guard; a paused keeper will not fence its primary")
        }
    }
}

/// Raises each setting in `params` that a standby needs at least as high
/// as its primary to the primary's value in the control file, where the
/// value the server would run with is lower: `configured` (what
/// `postgres -C` reads from the configuration just written), else the
/// spec's, else PostgreSQL's default. The names raised, with their values.
fn raise_to_primary_minimums(
    params: &mut std::collections::BTreeMap<String, String>,
    minimums: &[(&'static str, i64)],
    configured: &std::collections::BTreeMap<&'static str, i64>,
) -> Vec<(String, i64)> {
    let mut raised = Vec::new();
    for (name, min) in minimums {
        let current = configured.get(name).copied().or_else(|| {
            params
                .get(*name)
                .and_then(|v| cluster::params::text(v).trim().parse::<i64>().ok())
                .or_else(|| crate::control::hot_standby_default(name))
        });
        if current.is_some_and(|v| v < *min) {
            tracing::info!(
                parameter = name,
                configured = current,
                primary = min,
                "this standby starts with its primary's value until it has replayed the lower one"
            );
            params.insert((*name).to_owned(), min.to_string());
            raised.push(((*name).to_owned(), *min));
        }
    }
    raised
}

/// Writes the running server's parameter catalog to the store where it
/// differs from what is there; whether the store has it now.
async fn publish_catalog(pg: &Instance, store: &impl Store, keys: &Keys, uid: &str) -> bool {
    let catalog = match pg.settings_catalog(uid).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the parameter catalog");
            return false;
        }
    };
    let key = keys.pg_settings();
    let stored = match store.get(&key).await {
        Ok(kv) => {
            kv.and_then(|kv| serde_json::from_str::<cluster::params::Catalog>(&kv.value).ok())
        }
        Err(_) => return false,
    };
    if stored.is_some_and(|s| {
        s.server_version_num == catalog.server_version_num && s.settings == catalog.settings
    }) {
        return true;
    }
    let json = serde_json::to_string(&catalog).unwrap_or_default();
    match store.put(&key, &json, 0).await {
        Ok(_) => {
            tracing::info!(version = %catalog.server_version, parameters = catalog.settings.len(), "parameter catalog written to the store");
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot write the parameter catalog");
            false
        }
    }
}

/// The reconcile loop's own state.
#[derive(Debug, Default)]
struct Keeper {
    /// The proxy generation at which waiting for a failsafe promise to end
    /// was last logged.
    promise_noted: Option<u64>,
    /// This keeper's server's parameter catalog is in the store.
    catalog_published: bool,
    instance: String,
    seq: u64,
    /// The generation of this database's spec last applied.
    applied: u64,
    /// Why the last reconcile failed, for the report.
    problem: Option<String>,
    /// The lease our registration was last written under, and the key's
    /// revision then.
    registered: LeaseId,
    revision: i64,
    /// A lease our report went under that is not confirmed yet, and when
    /// that put was sent.
    unconfirmed: Option<(LeaseId, u64)>,
    /// Replication account known to match this keeper's settings.
    account_ready: bool,
    /// When the WAL receiver was last seen streaming, and when the keeper
    /// began following its current upstream.
    streamed_at: Option<Instant>,
    following_since: Option<Instant>,
    /// The highest timeline this data directory has reported (a standby's
    /// checkpoint timeline lags behind the one it replays).
    max_timeline: u32,
    /// When a rewind that a stuck standby got ended.
    rewound_at: Option<Instant>,
    upstream_file: PathBuf,
    /// The cluster's `pg_parameters` and `pg_hba` as this keeper last wrote
    /// them into the configuration; `None` before its first write.
    written_params: Option<(std::collections::BTreeMap<String, String>, Vec<String>)>,
    /// The spec generation the data was last copied afresh for.
    reinit_generation: Option<u64>,
    /// The `ctl restart`/`ctl reload` counters carried out; `None` until
    /// read from the directory or first seen.
    requests: Option<Requests>,
    /// The backup tool's work (`None` until the loop starts).
    backup: Option<crate::backup::Worker>,
    /// The pgBackRest TLS server (`--pgbackrest-listen`).
    backup_server: crate::backup::Server,
    /// This keeper's certificate, and its common name.
    own_cn: Option<(Vec<u8>, Option<String>)>,
}

impl Keeper {
    async fn reconcile(
        &mut self,
        pg: &mut Instance,
        cfg: &KeeperConfig,
        desired: &Desired,
        obs: &mut Observed,
        data: &ClusterData,
        lease: &Lease,
    ) {
        obs.running = pg.is_running();
        obs.initialized = pg.is_initialized();
        obs.was_primary = obs.initialized && !pg.has_standby_signal();
        obs.restoring = obs.initialized && pg.is_restoring();
        let target = cfg.dir.join(RESTORE_TARGET_FILE);
        if !obs.restoring && target.exists() {
            tracing::info!("the restore reached its target and PostgreSQL promoted");
            // The target leaves the configuration at the next write (the
            // parameters differ from those written).
            let _ = std::fs::remove_file(&target);
        }
        obs.loaded_sync = None;
        obs.sync_caught_up = false;
        if obs.running {
            let r = pg.report(&cfg.uid, self.applied).await;
            if r.healthy {
                obs.in_recovery = r.in_recovery;
                obs.system_id = r.system_id;
                obs.sync_caught_up = r
                    .synchronous_standbys
                    .unwrap_or_default()
                    .iter()
                    .any(|s| desired.synchronous_standbys.contains(s));
                if !obs.in_recovery {
                    obs.loaded_sync = pg.loaded_sync_names().await.ok();
                }
            }
        } else if obs.initialized {
            obs.system_id = pg.control_data().await.ok().map(|c| c.system_id);
        }
        obs.stuck = desired.role == Role::Standby
            && obs.running
            && obs.in_recovery
            && obs.configured_upstream == desired.upstream
            && [self.streamed_at, self.following_since]
                .into_iter()
                .flatten()
                .max()
                .is_some_and(|t| t.elapsed() >= STUCK_AFTER);
        // Stuck again soon after the last rewind, with no streaming since.
        obs.rewind_did_not_help = obs.stuck
            && self
                .rewound_at
                .is_some_and(|t| t.elapsed() < 4 * STUCK_AFTER)
            && self.streamed_at.is_none_or(|s| Some(s) < self.rewound_at);
        // pgBackRest's configuration follows the spec at once (a changed
        // repository or option changes no PostgreSQL parameter); it is
        // written only when its text changes.
        if obs.initialized {
            if let Err(e) = pg.write_backup_config(&data.spec.backup) {
                tracing::error!(error = %e, "cannot write pgBackRest's configuration");
            }
        }
        obs.params_changed = self.written_params.as_ref().is_none_or(|(p, h)| {
            *p != effective_parameters(data, &cfg.dir, pg.is_restoring()) || *h != data.spec.pg_hba
        });
        // A renewed certificate (the same paths, new files) is copied and
        // the server reloaded.
        match pg.install_tls() {
            Ok(true) => {
                tracing::info!("TLS files changed: reloading PostgreSQL");
                obs.params_changed = true;
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cannot install the TLS files"),
        }
        obs.reinit_done = self.reinit_generation == Some(desired.generation);
        let wanted = Requests {
            restart: data.dbs.get(&cfg.uid).map_or(0, |db| db.restart),
            reload: data.reload,
        };
        let file = cfg.dir.join("requests");
        let done_before = *self.requests.get_or_insert_with(|| {
            // Requests made before this keeper ever ran are not for it.
            std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(wanted)
        });
        obs.restart_requested = wanted.restart != done_before.restart;
        if wanted.reload != done_before.reload {
            obs.params_changed = true;
        }
        let upstream_before = obs.configured_upstream.clone();
        let steps = plan(desired, obs);
        if !steps.is_empty() {
            tracing::info!(?steps, role = desired.role.as_str(), "reconciling");
        }
        let mut done = Vec::new();
        let cx = Context { cfg, data, lease };
        match act(pg, &cx, desired, obs, &steps, &mut done).await {
            Ok(()) => {
                self.applied = desired.generation;
                self.problem = None;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not reconcile PostgreSQL");
                self.problem = Some(e.to_string());
            }
        }
        if done
            .iter()
            .any(|s| matches!(s, Action::WriteConfig | Action::HoldClients))
        {
            self.written_params = Some((
                effective_parameters(data, &cfg.dir, pg.is_restoring()),
                data.spec.pg_hba.clone(),
            ));
            let up = obs.configured_upstream.clone().unwrap_or_default();
            let _ = std::fs::write(&self.upstream_file, up);
            let held = self.upstream_file.with_file_name("clients-held");
            if obs.clients_held {
                let _ = std::fs::write(&held, "");
            } else {
                let _ = std::fs::remove_file(&held);
            }
        }
        if done.iter().any(|s| matches!(s, Action::Rewind { .. })) {
            self.rewound_at = Some(Instant::now());
        }
        if done.iter().any(|s| matches!(s, Action::Reinit { .. })) {
            self.reinit_generation = Some(desired.generation);
        }
        let mut requests = self.requests.unwrap_or(wanted);
        if obs.restart_requested && done.contains(&Action::Stop) {
            requests.restart = wanted.restart;
        }
        if done
            .iter()
            .any(|s| *s == Action::Reload || *s == Action::Start)
        {
            // A start reads the configuration afresh too.
            requests.reload = wanted.reload;
        }
        if Some(requests) != self.requests {
            self.requests = Some(requests);
            let _ = std::fs::write(&file, serde_json::to_string(&requests).unwrap_or_default());
        }
        if done.iter().any(|s| matches!(s, Action::Rewind { .. })) {
            self.following_since = Some(Instant::now());
        }
        if done
            .iter()
            .any(|s| matches!(s, Action::BaseBackup { .. } | Action::Reinit { .. }))
        {
            // Another copy of the data: what this one reported is gone.
            self.max_timeline = 0;
            self.following_since = Some(Instant::now());
            self.streamed_at = None;
        }
        let new_upstream = obs.configured_upstream != upstream_before;
        if desired.role == Role::Standby
            && (new_upstream || done.iter().any(|s| matches!(s, Action::Start)))
        {
            self.following_since = Some(Instant::now());
        }
        let primary = desired.role == Role::Master && pg.is_running() && !obs.in_recovery;
        // A standby cluster's leader keeps its standbys' slots; the
        // replication account came with the source's data.
        let leader = desired.source.is_some() && pg.is_running() && obs.in_recovery;
        if primary || leader {
            if let Err(e) =
                serve_standbys(pg, data, &cfg.uid, &mut self.account_ready, primary).await
            {
                tracing::warn!(error = %e, "cannot set up replication for the standbys");
            }
        }
    }

    /// This round's report: what PostgreSQL answers, and while it is down
    /// what the control file says.
    async fn report(
        &mut self,
        pg: &Instance,
        cfg: &KeeperConfig,
        running: bool,
        obs: &mut Observed,
    ) -> KeeperReport {
        let mut r = pg.report(&cfg.uid, self.applied).await;
        self.seq += 1;
        r.instance = self.instance.clone();
        r.seq = self.seq;
        r.running = running;
        r.tags = cfg.node.flag_tags().unwrap_or_else(|| cfg.tags.clone());
        r.restarted = self.requests.map_or(0, |q| q.restart);
        if let Some(w) = &self.backup {
            r.backup = w.done();
            if let (Some(p), true) = (w.problem(), r.healthy) {
                r.problem = Some(p);
            }
        }
        r.api_address = cfg.api_address.clone();
        r.membership = cfg.node.data().map_or(0, |d| d.membership);
        if r.healthy && !obs.raised.is_empty() {
            let pending = r.pending_restart.get_or_insert_with(Vec::new);
            pending.extend(obs.raised.iter().map(|(n, _)| n.clone()));
            pending.sort();
            pending.dedup();
        }
        if r.healthy {
            obs.in_recovery = r.in_recovery;
        }
        if !running {
            match pg.control_data().await {
                Ok(c) => {
                    r.system_id = Some(c.system_id.clone());
                    if c.shut_down_cleanly() {
                        // The last record this server wrote.
                        r.lsn = Some(c.checkpoint_lsn);
                        r.timeline = Some(c.timeline);
                        r.stopped_lsn = Some(c.checkpoint_lsn);
                    }
                }
                Err(e) if pg.is_initialized() => {
                    r.problem = Some(format!("cannot read the data directory: {e}"));
                }
                Err(_) => {}
            }
            if r.problem.is_none() {
                r.problem = Some("PostgreSQL is not running".into());
            }
        }
        if let Some(t) = r.timeline {
            self.max_timeline = self.max_timeline.max(t);
            r.timeline = Some(self.max_timeline);
        }
        if r.streaming {
            self.streamed_at = Some(Instant::now());
        }
        r.streaming_age_ms = self.streamed_at.map(|t| t.elapsed().as_millis() as u64);
        if let Some(p) = &self.problem {
            r.problem = Some(match r.problem.take() {
                Some(q) if r.healthy => format!("{p}; {q}"),
                Some(q) => format!("{q}; {p}"),
                None => p.clone(),
            });
        }
        r
    }

    /// The common name of the certificate installed for PostgreSQL
    /// (`<dir>/tls/server.crt`), read again when the file changes.
    fn own_cn(&mut self, dir: &std::path::Path) -> Option<String> {
        let path = dir.join("tls").join("server.crt");
        let bytes = std::fs::read(&path).ok()?;
        if self.own_cn.as_ref().map(|(b, _)| b) != Some(&bytes) {
            let cn = crate::backup::certificate_cn(&path);
            if cn.is_none() {
                tracing::warn!(path = %path.display(), "cannot read the certificate's common name (openssl x509)");
            }
            self.own_cn = Some((bytes, cn));
        }
        self.own_cn.as_ref().and_then(|(_, cn)| cn.clone())
    }

    /// Puts the report under the lease: created only if the key is free,
    /// then replaced only by compare-and-swap, so that two keepers started
    /// with one uid do not take turns in one registration.
    async fn publish(
        &mut self,
        store: &AnyStore,
        keys: &Keys,
        lease: &Lease,
        uid: &str,
        report: &KeeperReport,
    ) {
        let id = lease.id();
        if id == 0 {
            return;
        }
        if self.registered != id {
            self.revision = 0;
        }
        let json = serde_json::to_string(report).unwrap_or_default();
        for _ in 0..2 {
            let sent = crate::lease::now_ms();
            match store
                .put_if_revision(&keys.keeper(uid), &json, self.revision, id)
                .await
            {
                Ok(Cas::Done(rev)) => {
                    self.revision = rev;
                    if self.registered != id || !lease.is_confirmed() {
                        self.unconfirmed = Some((id, sent));
                    }
                    self.registered = id;
                    return;
                }
                // Our own key (taken back after a restart, or a put whose
                // answer was lost): carry on from its revision.
                Ok(Cas::Conflict(Some(kv))) if kv.lease == id => self.revision = kv.mod_revision,
                Ok(Cas::Conflict(None)) => self.revision = 0,
                Ok(Cas::Conflict(Some(kv))) => {
                    let other = serde_json::from_str::<KeeperReport>(&kv.value).unwrap_or_default();
                    tracing::error!(
                        uid,
                        other_instance = %other.instance,
                        other_address = ?other.address,
                        "another keeper is registered with this uid: each keeper needs its own \
                         --uid; this one changes nothing until that registration ends"
                    );
                    self.registered = 0;
                    return;
                }
                Err(StoreError::LeaseExpired(_)) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot report");
                    return;
                }
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
    writable: bool,
) -> Result<(), PgError> {
    if writable && !*account_ready {
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

/// The pgBackRest options that take a backup on this standby through the
/// primary's TLS server, if the primary's keeper runs one.
fn standby_backup_args(data: &ClusterData, dir: &std::path::Path) -> Option<Vec<String>> {
    let primary = data.dbs.get(data.proxy.master_db.as_ref()?)?;
    let server = primary.status.pgbackrest_server.as_ref()?;
    let port = crate::pg::split_address(primary.status.address.as_deref()?)?
        .1
        .parse()
        .ok()?;
    Some(crate::backup::standby_backup_args(dir, server, port))
}

/// The `application_name` a standby cluster's leader streams from its
/// source as.
pub fn source_application_name(uid: &str) -> String {
    format!("{uid}.standby-leader")
}

fn desired_of(data: &ClusterData, uid: &str) -> Option<Desired> {
    let db = data.dbs.get(uid)?;
    let standby_cluster = data.spec.is_standby();
    let source = data
        .spec
        .standby_source
        .clone()
        .filter(|_| standby_cluster && db.spec.role == Role::Master);
    let upstream = match &source {
        Some(s) => Some(s.address()),
        None => db
            .spec
            .follow
            .as_ref()
            .and_then(|f| data.dbs.get(f))
            .and_then(|f| f.status.address.clone()),
    };
    let system_id = match db.spec.role {
        Role::Master => db.status.system_id.clone(),
        _ => db
            .spec
            .follow
            .as_ref()
            .and_then(|f| data.dbs.get(f))
            .and_then(|f| f.status.system_id.clone()),
    };
    Some(Desired {
        role: if standby_cluster && db.spec.role == Role::Master {
            Role::Standby
        } else {
            db.spec.role
        },
        upstream,
        synchronous_standbys: db.spec.synchronous_standbys.clone(),
        generation: db.generation,
        switchover: data
            .failover
            .as_ref()
            .is_some_and(|f| f.from == uid && f.reason == cluster::data::SWITCHOVER),
        system_id,
        hold_clients: data.spec.synchronous_replication && data.spec.min_sync > 0,
        reinit: db.spec.reinit,
        paused: data.paused,
        restore: data.init_restore.clone().filter(|_| {
            db.spec.role == Role::Master && db.status.system_id.is_none() && !standby_cluster
        }),
        standby_cluster,
        source,
        from_source: data.spec.standby_source.is_some(),
    })
}

/// How long a demoted primary gets to stop with an immediate shutdown
/// before it and its backends are killed (a hung or stopped postmaster
/// ignores SIGQUIT).
const STOP_NOW_LIMIT: Duration = Duration::from_secs(3);

/// What [`act`] works with besides the instance and the plan.
struct Context<'a> {
    cfg: &'a KeeperConfig,
    data: &'a ClusterData,
    lease: &'a Lease,
}

async fn act(
    pg: &mut Instance,
    cx: &Context<'_>,
    d: &Desired,
    o: &mut Observed,
    steps: &[Action],
    done: &mut Vec<Action>,
) -> Result<(), PgError> {
    let (cfg, data, lease) = (cx.cfg, cx.data, cx.lease);
    const START: Duration = Duration::from_secs(60);
    let sync_names = crate::names::synchronous_standby_names(&d.synchronous_standbys);
    for step in steps {
        done.push(step.clone());
        match step {
            Action::Refuse { why } => {
                return Err(PgError::Program {
                    program: "keeper".into(),
                    detail: why.clone(),
                })
            }
            Action::InitDb => {
                pg.initdb().await?;
                o.initialized = true;
            }
            Action::Restore { target } => {
                pg.restore(&data.spec.backup, target).await?;
                std::fs::write(
                    cfg.dir.join(RESTORE_TARGET_FILE),
                    serde_json::to_string(target).unwrap_or_default(),
                )?;
                o.initialized = true;
                o.restoring = true;
            }
            Action::BaseBackup { from } => {
                copy_from(pg, data, from, &cfg.uid).await?;
                o.initialized = true;
                o.was_primary = false;
            }
            Action::WaitPrimary { from } => {
                // An unreachable source is no reason to stop this server
                // or drop its data: wait. In a standby cluster the leader
                // is in recovery: that it answers is enough.
                let inside = d.standby_cluster && d.source.is_none();
                if !pg.is_primary(from).await? && !inside {
                    return Err(PgError::Program {
                        program: "pg_rewind".into(),
                        detail: format!("the new upstream {from} is not a primary yet; waiting"),
                    });
                }
            }
            Action::Rewind { from } if d.standby_cluster => {
                // Never a fresh copy in place of a failed rewind here (see
                // plan): the data may be the newest copy of the source.
                pg.rewind(from).await?;
                o.was_primary = false;
                o.stuck = false;
            }
            Action::Rewind { from } => {
                if let Err(e) = pg.rewind(from).await {
                    tracing::warn!(error = %e, "pg_rewind failed; taking a fresh base backup");
                    pg.remove_data()?;
                    copy_from(pg, data, from, &cfg.uid).await?;
                }
                o.was_primary = false;
                o.stuck = false;
            }
            Action::WriteConfig | Action::HoldClients => {
                let upstream = match (d.role, &d.upstream) {
                    (Role::Standby, Some(up)) => Some(match &d.source {
                        // Named apart from the source cluster's own
                        // members: a keeper of it with this uid must never
                        // be taken for this server in its
                        // synchronous_standby_names.
                        Some(src) => Upstream {
                            address: up.clone(),
                            application_name: source_application_name(&cfg.uid),
                            slot: src.slot.clone(),
                        },
                        None => Upstream {
                            address: up.clone(),
                            application_name: cfg.uid.clone(),
                            slot: Some(slot_name(&cfg.uid)),
                        },
                    }),
                    _ => None,
                };
                let clients = *step != Action::HoldClients;
                let write = |params: &std::collections::BTreeMap<String, String>| {
                    pg.write_config_with(
                        params,
                        upstream.as_ref(),
                        &d.synchronous_standbys,
                        clients,
                        &data.spec.pg_hba,
                    )
                };
                pg.write_backup_config(&data.spec.backup)?;
                let params = effective_parameters(data, &cfg.dir, pg.is_restoring());
                write(&params)?;
                // Written while running (a reload), the spec's values are
                // in the file, and PostgreSQL reports any that differ from
                // what it runs as pending.
                o.raised.clear();
                if !o.running && (d.role == Role::Standby || pg.has_standby_signal()) {
                    // A server starting in recovery below its primary's last
                    // values refuses to start; it starts with those, and a
                    // restart once it has replayed the change lowers it.
                    if let Ok(c) = pg.control_data().await {
                        let mut configured = std::collections::BTreeMap::new();
                        for (name, _) in &c.hot_standby_minimums {
                            if let Some(v) = pg.configured(name).await {
                                configured.insert(*name, v);
                            }
                        }
                        let mut params = params.clone();
                        let raised = raise_to_primary_minimums(
                            &mut params,
                            &c.hot_standby_minimums,
                            &configured,
                        );
                        if !raised.is_empty() {
                            write(&params)?;
                        }
                        o.raised = raised;
                    }
                }
                o.clients_held = !clients;
                o.configured_upstream = if d.role == Role::Standby {
                    d.upstream.clone()
                } else {
                    None
                };
            }
            Action::Start if d.role == Role::Master => {
                check_lease(lease)?;
                // Fenceable from its first moment: a keeper that dies or
                // is cut off while this server recovers must not leave it
                // unguarded.
                pg.start_with(START, |pid| lease.set_primary_pid(pid))
                    .await?;
                o.running = true;
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
                pg.stop_now(STOP_NOW_LIMIT).await;
                o.running = false;
            }
            Action::Reload => pg.reload().await?,
            Action::WaitTransactions => {
                let t = Instant::now();
                // Within the proxies' drain: their sessions end between
                // transactions, so these end without an error.
                match pg.wait_for_sessions(SWITCHOVER_DRAIN).await {
                    Ok((0, 0)) => tracing::info!(
                        took = ?t.elapsed(),
                        "no transaction or client session open; stopping"
                    ),
                    Ok((open, sessions)) => tracing::warn!(
                        open,
                        sessions,
                        "transactions or client sessions still open; stopping anyway"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot count open sessions; stopping")
                    }
                }
            }
            Action::Promote => {
                check_lease(lease)?;
                // A failsafe promise given to the old primary holds first.
                cfg.node
                    .promises
                    .begin_promotion()
                    .map_err(|detail| PgError::Program {
                        program: "keeper".into(),
                        detail,
                    })?;
                if let Some(pid) = pg.pid() {
                    lease.set_primary_pid(pid);
                }
                // In a switchover the old primary stopped cleanly, and its
                // archiver pushed what it had before it stopped.
                let switchover = data
                    .failover
                    .as_ref()
                    .is_some_and(|f| f.reason == cluster::data::SWITCHOVER);
                if data.spec.backup.archives() && !switchover {
                    archive_what_the_old_primary_did_not(pg, cx, o).await;
                    check_lease(lease)?;
                }
                pg.promote().await?;
                o.in_recovery = false;
            }
            Action::Reinit { from } => {
                pg.remove_data()?;
                o.initialized = false;
                copy_from(pg, data, from, &cfg.uid).await?;
                o.initialized = true;
                o.was_primary = false;
                o.stuck = false;
            }
        }
    }
    if d.role == Role::Master && o.running {
        // What PostgreSQL runs is what counts: the generation is applied
        // only once it runs with the synchronous standbys asked for.
        verify_sync_names(pg, &sync_names).await?;
        o.loaded_sync = Some(sync_names);
    }
    Ok(())
}

/// Refuses to make a primary (start one, or promote) without a lease
/// whose fence is running: the cluster may be promoting another.
fn check_lease(lease: &Lease) -> Result<(), PgError> {
    if lease.expired() {
        return Err(PgError::Program {
            program: "keeper".into(),
            detail: "the lease is not renewed; not making a primary".into(),
        });
    }
    Ok(())
}

/// Waits (up to 2 s) until `SHOW synchronous_standby_names` returns
/// `want`; fails with what it returns instead.
async fn verify_sync_names(pg: &Instance, want: &str) -> Result<(), PgError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let have = pg.loaded_sync_names().await?;
        if have == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(PgError::Program {
                program: "postgres".into(),
                detail: format!(
                    "PostgreSQL runs with synchronous_standby_names = {have:?}, not {want:?} \
                     (see its log for why it refused the value)"
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_starts_with_its_primarys_higher_values() {
        let mut p = std::collections::BTreeMap::from([
            ("max_connections".to_owned(), "'110'".to_owned()),
            ("max_locks_per_transaction".to_owned(), "128".to_owned()),
        ]);
        let minimums = [
            ("max_connections", 150),
            ("max_worker_processes", 16),
            ("max_prepared_transactions", 0),
            ("max_locks_per_transaction", 64),
        ];
        let raised = raise_to_primary_minimums(&mut p, &minimums, &Default::default());
        assert_eq!(
            raised,
            [
                ("max_connections".to_owned(), 150),
                ("max_worker_processes".to_owned(), 16)
            ]
        );
        assert_eq!(p["max_connections"], "150");
        assert_eq!(p["max_worker_processes"], "16");
        assert_eq!(p["max_locks_per_transaction"], "128");
        assert!(!p.contains_key("max_prepared_transactions"));
        // What the server would run with (postgresql.conf's 300, not the
        // default the spec leaves unset) is what counts.
        let mut p = std::collections::BTreeMap::new();
        let configured = std::collections::BTreeMap::from([
            ("max_connections", 300),
            ("max_worker_processes", 16),
        ]);
        let raised = raise_to_primary_minimums(&mut p, &minimums, &configured);
        assert!(raised.is_empty(), "{raised:?}");
        assert!(p.is_empty());
    }
    use Action::*;

    fn desired(role: Role, upstream: Option<&str>) -> Desired {
        Desired {
            role,
            upstream: upstream.map(str::to_owned),
            synchronous_standbys: vec![],
            generation: 1,
            switchover: false,
            system_id: Some("sys".into()),
            hold_clients: false,
            reinit: false,
            paused: false,
            restore: None,
            standby_cluster: false,
            source: None,
            from_source: false,
        }
    }

    /// `ctl init --mode pitr`: the first primary restores instead of
    /// running initdb, holds clients out, and is left alone (never
    /// promoted by the keeper, which would stop short of the target) while
    /// PostgreSQL replays to the target.
    #[test]
    fn a_restore_is_left_to_replay_to_its_target() {
        let target = cluster::data::RestoreTarget {
            kind: "time".into(),
            target: "2026-12-03 10:00:00+00".into(),
            set: None,
        };
        let d = Desired {
            system_id: None,
            restore: Some(target.clone()),
            ..desired(Role::Master, None)
        };
        assert_eq!(
            plan(&d, &Observed::default()),
            vec![
                Action::Restore { target },
                Action::HoldClients,
                Action::Start
            ]
        );
        let replaying = Observed {
            initialized: true,
            running: true,
            in_recovery: true,
            restoring: true,
            ..Default::default()
        };
        assert_eq!(plan(&d, &replaying), vec![]);
        let d = Desired { restore: None, ..d };
        assert_eq!(
            plan(&d, &replaying),
            vec![],
            "not promoted once the cluster knows its data"
        );
        let stopped = Observed {
            running: false,
            ..replaying
        };
        assert_eq!(plan(&d, &stopped), vec![Action::HoldClients, Action::Start]);
    }

    /// A standby cluster: its leader is a standby of the source; a new
    /// upstream is followed by a reload (no member diverges from another);
    /// a leader elected is never promoted; after `ctl promote` it is.
    #[test]
    fn standby_cluster_plans() {
        let mut data = ClusterData::new(cluster::ClusterSpec {
            role: cluster::data::ClusterRole::Standby,
            standby_source: Some(cluster::data::StandbySource {
                host: "src".into(),
                port: 5432,
                user: "r".into(),
                password_file: "/p".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        for (uid, role) in [("a", Role::Master), ("b", Role::Standby)] {
            data.dbs.insert(
                uid.into(),
                cluster::data::Db {
                    keeper: uid.into(),
                    spec: cluster::data::DbSpec {
                        role,
                        follow: (role == Role::Standby).then(|| "a".into()),
                        ..Default::default()
                    },
                    status: cluster::data::DbStatus {
                        address: Some(format!("{uid}:1")),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            );
        }
        let leader = desired_of(&data, "a").unwrap();
        assert_eq!(leader.role, Role::Standby);
        assert_eq!(leader.upstream.as_deref(), Some("src:5432"));
        assert!(leader.source.is_some() && leader.restore.is_none());
        let member = desired_of(&data, "b").unwrap();
        assert_eq!(
            (
                member.role,
                member.upstream.as_deref(),
                member.source.is_some()
            ),
            (Role::Standby, Some("a:1"), false)
        );
        assert_eq!(
            plan(&leader, &Observed::default()),
            vec![
                Action::BaseBackup {
                    from: "src:5432".into()
                },
                Action::WriteConfig,
                Action::Start
            ],
            "the first leader copies the source"
        );
        let following_b = Observed {
            initialized: true,
            running: true,
            in_recovery: true,
            configured_upstream: Some("b:1".into()),
            ..Default::default()
        };
        assert_eq!(
            plan(&leader, &following_b),
            vec![Action::WriteConfig, Action::Reload],
            "a member elected leader follows the source by a reload"
        );
        let stuck = Observed {
            configured_upstream: Some("src:5432".into()),
            stuck: true,
            ..following_b.clone()
        };
        // A leader that does not stream from the source (a slot still
        // held, replication refused, the source gone, or its timeline
        // forked) keeps its data, and says so; so does a member.
        for (d, o) in [
            (&leader, stuck.clone()),
            (
                &member,
                Observed {
                    configured_upstream: Some("a:1".into()),
                    rewind_did_not_help: true,
                    ..stuck.clone()
                },
            ),
        ] {
            let p = plan(d, &o);
            assert!(
                matches!(&p[..], [Action::Refuse { why }] if why.contains("ctl reinit")),
                "{p:?}"
            );
        }
        // `ctl reinit` (the cluster paused) copies the leader from the source.
        let reinit = Desired {
            reinit: true,
            ..leader.clone()
        };
        assert_eq!(
            plan(&reinit, &stuck),
            vec![
                Action::WaitPrimary {
                    from: "src:5432".into()
                },
                Action::Stop,
                Action::Reinit {
                    from: "src:5432".into()
                },
                Action::WriteConfig,
                Action::Start
            ]
        );
        data.spec.role = cluster::data::ClusterRole::Primary;
        let promoted = desired_of(&data, "a").unwrap();
        assert_eq!(
            (promoted.role, promoted.source.is_none()),
            (Role::Master, true)
        );
        let following_src = Observed {
            configured_upstream: Some("src:5432".into()),
            ..following_b
        };
        assert_eq!(
            plan(&promoted, &following_src),
            vec![Action::WriteConfig, Action::Reload, Action::Promote]
        );
        // Promoted without a copy of the source: never initdb.
        let empty = Desired {
            system_id: None,
            ..promoted
        };
        let p = plan(&empty, &Observed::default());
        assert!(
            matches!(&p[..], [Action::Refuse { why }] if why.contains("initdb")),
            "{p:?}"
        );
    }

    #[test]
    fn plans() {
        let fresh = Observed::default();
        let running_primary = Observed {
            initialized: true,
            running: true,
            was_primary: true,
            loaded_sync: Some(String::new()),
            system_id: Some("sys".into()),
            ..Default::default()
        };
        let running_standby = Observed {
            initialized: true,
            running: true,
            in_recovery: true,
            configured_upstream: Some("a:1".into()),
            system_id: Some("sys".into()),
            ..Default::default()
        };
        let sync_s1 = Desired {
            synchronous_standbys: vec!["s1".into()],
            ..desired(Role::Master, None)
        };
        let paused = |d: Desired| Desired { paused: true, ..d };
        let stopped_primary = Observed {
            initialized: true,
            system_id: Some("sys".into()),
            ..Default::default()
        };
        let table: Vec<(&str, Desired, Observed, Vec<Action>)> = vec![
            (
                "a reinit already done for this generation is not done again",
                Desired {
                    reinit: true,
                    ..desired(Role::Standby, Some("b:1"))
                },
                Observed {
                    reinit_done: true,
                    configured_upstream: Some("b:1".into()),
                    ..running_standby.clone()
                },
                vec![],
            ),
            (
                "paused: a stopped primary is left stopped",
                paused(desired(Role::Master, None)),
                stopped_primary.clone(),
                vec![],
            ),
            (
                "paused: a stopped standby is left stopped",
                paused(desired(Role::Standby, Some("a:1"))),
                Observed {
                    configured_upstream: Some("a:1".into()),
                    ..stopped_primary.clone()
                },
                vec![],
            ),
            (
                "paused: a standby asked to become primary (a switchover) is promoted",
                paused(desired(Role::Master, None)),
                Observed {
                    configured_upstream: Some("a:1".into()),
                    ..stopped_primary.clone()
                },
                vec![WriteConfig, Start, Promote],
            ),
            (
                "new parameters reach a running primary by reload",
                desired(Role::Master, None),
                Observed {
                    params_changed: true,
                    ..running_primary.clone()
                },
                vec![WriteConfig, Reload],
            ),
            (
                "new parameters on a primary holding clients out keep them out",
                Desired {
                    hold_clients: true,
                    ..desired(Role::Master, None)
                },
                Observed {
                    params_changed: true,
                    clients_held: true,
                    ..running_primary.clone()
                },
                vec![HoldClients, Reload],
            ),
            (
                "new primary",
                Desired {
                    system_id: None,
                    ..desired(Role::Master, None)
                },
                fresh.clone(),
                vec![InitDb, WriteConfig, Start],
            ),
            (
                "review 6: a primary whose data directory is gone does not initdb over the cluster",
                desired(Role::Master, None),
                fresh.clone(),
                vec![Refuse {
                    why: "the data directory is empty, but this database belongs to PostgreSQL \
                          system sys: restore it, or run `keelson ctl failkeeper` to promote a standby"
                        .into(),
                }],
            ),
            (
                "review 7: a candidate given up on rejoins with a fresh copy",
                Desired {
                    reinit: true,
                    ..desired(Role::Standby, Some("b:1"))
                },
                running_primary.clone(),
                vec![
                    WaitPrimary { from: "b:1".into() },
                    StopNow,
                    Reinit { from: "b:1".into() },
                    WriteConfig,
                    Start,
                ],
            ),
            (
                "a standby still stuck after a rewind gets a fresh copy",
                desired(Role::Standby, Some("a:1")),
                Observed {
                    stuck: true,
                    rewind_did_not_help: true,
                    ..running_standby.clone()
                },
                vec![
                    WaitPrimary { from: "a:1".into() },
                    Stop,
                    Reinit { from: "a:1".into() },
                    WriteConfig,
                    Start,
                ],
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
                "a primary that does not answer (hung): nothing to reload",
                sync_s1.clone(),
                Observed {
                    loaded_sync: None,
                    ..running_primary.clone()
                },
                vec![],
            ),
            (
                "steady standby",
                desired(Role::Standby, Some("a:1")),
                running_standby.clone(),
                vec![],
            ),
            (
                "F6a1: promote a standby: its synchronous standbys are loaded first",
                sync_s1.clone(),
                running_standby.clone(),
                vec![WriteConfig, Reload, Promote],
            ),
            (
                "F5: follow a new primary: rewind, it may have replayed past the fork",
                desired(Role::Standby, Some("b:1")),
                running_standby.clone(),
                vec![
                    WaitPrimary { from: "b:1".into() },
                    Stop,
                    Rewind { from: "b:1".into() },
                    WriteConfig,
                    Start,
                ],
            ),
            (
                "F5: a standby stuck on its upstream is rewound onto it",
                desired(Role::Standby, Some("a:1")),
                Observed {
                    stuck: true,
                    ..running_standby.clone()
                },
                vec![
                    WaitPrimary { from: "a:1".into() },
                    Stop,
                    Rewind { from: "a:1".into() },
                    WriteConfig,
                    Start,
                ],
            ),
            (
                "old primary rejoins with pg_rewind, stopped at once to keep its WAL",
                desired(Role::Standby, Some("b:1")),
                running_primary.clone(),
                vec![
                    WaitPrimary { from: "b:1".into() },
                    StopNow,
                    Rewind { from: "b:1".into() },
                    WriteConfig,
                    Start,
                ],
            ),
            (
                "F12: a data directory of another system is never replaced",
                Desired {
                    system_id: Some("other".into()),
                    ..desired(Role::Standby, Some("b:1"))
                },
                running_primary.clone(),
                vec![Refuse {
                    why: "the data directory holds another PostgreSQL system (sys) than the \
                          cluster's (other); move it away to let this keeper join"
                        .into(),
                }],
            ),
            (
                "F6: sync standbys change: reload",
                sync_s1.clone(),
                running_primary.clone(),
                vec![WriteConfig, Reload],
            ),
            (
                "F6: what PostgreSQL runs differs from the spec (it refused a value): reload",
                desired(Role::Master, None),
                Observed {
                    loaded_sync: Some("FIRST 1 (s1)".into()),
                    ..running_primary.clone()
                },
                vec![WriteConfig, Reload],
            ),
            (
                "F6: it runs what the spec asks: nothing",
                sync_s1.clone(),
                Observed {
                    loaded_sync: Some(r#"FIRST 1 ("s1")"#.into()),
                    ..running_primary.clone()
                },
                vec![],
            ),
            (
                "F6e: a synchronous primary restarting in place holds clients out",
                Desired {
                    hold_clients: true,
                    ..sync_s1.clone()
                },
                Observed {
                    running: false,
                    ..running_primary.clone()
                },
                vec![HoldClients, Start],
            ),
            (
                "F6e: ... and lets them in once a synchronous standby caught up",
                Desired {
                    hold_clients: true,
                    ..sync_s1.clone()
                },
                Observed {
                    clients_held: true,
                    sync_caught_up: true,
                    loaded_sync: Some(r#"FIRST 1 ("s1")"#.into()),
                    ..running_primary.clone()
                },
                vec![WriteConfig, Reload],
            ),
            (
                "F6e: ... not before",
                Desired {
                    hold_clients: true,
                    ..sync_s1.clone()
                },
                Observed {
                    clients_held: true,
                    loaded_sync: Some(r#"FIRST 1 ("s1")"#.into()),
                    ..running_primary.clone()
                },
                vec![],
            ),
            (
                "F6e: a promoted standby does not hold clients (what it has, a standby had)",
                Desired {
                    hold_clients: true,
                    ..sync_s1.clone()
                },
                Observed {
                    running: false,
                    ..running_standby.clone()
                },
                vec![WriteConfig, Start, Promote],
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
                vec![WaitTransactions, Stop],
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
