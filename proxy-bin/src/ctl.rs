//! `keelson ctl`: create and inspect a cluster's data in the store.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cluster::status::ClusterStatus;
use cluster::{AnyStore, Cas, ClusterData, ClusterSpec, Keys, Store};

/// Options shared by every `ctl` command.
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    #[command(flatten)]
    pub cluster: crate::args::ClusterArgs,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CtlCommand {
    /// Create the cluster's data (fails if it exists).
    Init {
        /// JSON file with the cluster spec; every field is optional.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// The keepers already hold data (the store was lost, or it is an
        /// existing cluster): make this keeper's data the primary's; the
        /// others are rewound or copied from it. Without it, a cluster whose
        /// keepers hold data elects no primary.
        #[arg(long, value_name = "UID")]
        existing: Option<String>,
        /// How the first primary gets its data: `new` (initdb), `existing`
        /// (the data directory of --keeper, as --existing), or `pitr`
        /// (restored from a backup of the spec's pgbackrest repository and
        /// replayed to --target-time, --target-lsn or --target-name; see
        /// docs/backup.md).
        #[arg(long, value_enum, default_value = "new")]
        mode: InitMode,
        /// With --mode existing: the keeper whose data becomes the primary's.
        #[arg(long, value_name = "UID")]
        keeper: Option<String>,
        /// With --mode pitr: replay to this time ("2026-12-03 10:20:00+00").
        #[arg(long, value_name = "TIMESTAMP")]
        target_time: Option<String>,
        /// With --mode pitr: replay to this LSN (0/3000148).
        #[arg(long, value_name = "LSN")]
        target_lsn: Option<String>,
        /// With --mode pitr: replay to this restore point (pg_create_restore_point).
        #[arg(long, value_name = "NAME")]
        target_name: Option<String>,
        /// With --mode pitr: the backup (label) to start from [default: the
        /// newest one before the target].
        #[arg(long, value_name = "LABEL")]
        backup: Option<String>,
    },
    /// Show the cluster: generation, primary, keepers and proxies.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show or change the cluster spec.
    #[command(subcommand)]
    Spec(SpecCommand),
    /// Mark a keeper failed: if its database is the primary, the sentinel
    /// fails over at once to the most advanced eligible standby (with the
    /// usual fencing); the old primary then rejoins as a standby.
    Failkeeper {
        /// The keeper's uid.
        uid: String,
    },
    /// Remove a keeper that is not the primary from the cluster.
    Removekeeper {
        /// The keeper's uid.
        uid: String,
    },
    /// Change a keeper's tags at run time.
    Keeper {
        /// The keeper's uid.
        uid: String,
        #[command(subcommand)]
        action: KeeperCommand,
    },
    /// Copy a standby's data afresh from the primary (its data directory is
    /// deleted first); refused for the primary.
    Reinit {
        /// The standby's keeper uid.
        uid: String,
    },
    /// Restart PostgreSQL: standbys one at a time, then the primary role
    /// moves by switchover and the old primary restarts as a standby.
    Restart {
        /// Only instances that report parameters pending a restart.
        #[arg(long)]
        pending: bool,
        /// How long each step may take.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Restart only these keepers' instances [default: all].
        uids: Vec<String>,
    },
    /// Every keeper rewrites its configuration and reloads PostgreSQL.
    Reload,
    /// Maintenance mode: no automatic failover, and keepers leave
    /// PostgreSQL as it is (a stopped one stays stopped); `switchover` and
    /// `failkeeper` still work.
    Pause,
    /// End maintenance mode: a primary that failed meanwhile is failed
    /// over at once.
    Resume,
    /// Make a standby cluster a primary cluster: its standby leader stops
    /// following the source and is promoted, and its proxies route writes
    /// to it (docs/standby-cluster.md). Stop writes on the source first:
    /// what it commits after the leader's last replayed record is not here.
    Promote {
        /// How long to wait for the promoted leader to take writes.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Promote even though another member was last seen further ahead
        /// than the leader (its WAL beyond the leader's is then lost).
        #[arg(long)]
        force: bool,
    },
    /// Every change of primary: when, why, from and to, timeline and LSN.
    History {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Take a backup with the spec's tool (pgBackRest) on the primary and
    /// wait for it (docs/backup.md).
    Backup {
        /// full, diff or incr [default: pgBackRest's: incr, full when the
        /// repository has none].
        #[arg(long = "type", value_name = "TYPE")]
        kind: Option<String>,
        /// How long to wait for it.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Copy the files from a streaming standby instead of the primary
        /// (pgBackRest's --backup-standby; the primary only starts and
        /// stops the backup). Needs the keepers' --pgbackrest-listen.
        #[arg(long)]
        from_standby: bool,
    },
    /// The backups in the repository, each with the WAL it needs, and the
    /// archive's WAL range (from the primary's keeper).
    Backups {
        /// Print pgBackRest's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Planned switchover: hold new clients, stop the primary, promote a
    /// standby once it has everything, release the clients to it.
    Switchover {
        /// The standby to promote [default: the most advanced eligible one].
        #[arg(long)]
        to: Option<String>,
    },
}

/// `ctl init --mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitMode {
    New,
    Existing,
    Pitr,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeeperCommand {
    /// Set tags; those not given keep their values. A keeper restarted with
    /// different tag flags takes its flags' values again.
    Set {
        /// Preferred at failover among equally advanced standbys (higher first).
        #[arg(long, allow_negative_numbers = true)]
        priority: Option<i32>,
        /// Never promote this keeper's database.
        #[arg(long, value_name = "BOOL")]
        never_primary: Option<bool>,
        /// Never choose it as a synchronous standby.
        #[arg(long, value_name = "BOOL")]
        no_sync: Option<bool>,
        /// Proxies send it no replica sessions.
        #[arg(long, value_name = "BOOL")]
        no_loadbalance: Option<bool>,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum SpecCommand {
    /// Print the spec as JSON, defaults filled in.
    Show,
    /// Replace the spec with the one in FILE (JSON; missing fields take
    /// their defaults), or change only what --patch gives (a JSON merge
    /// patch, RFC 7386: objects merge, null removes a key), by
    /// compare-and-swap. Prints what changed and what needs a restart.
    Update {
        #[arg(long, required_unless_present = "patch", conflicts_with = "patch")]
        file: Option<PathBuf>,
        /// e.g. '{"pg_parameters": {"work_mem": "64MB"}}'
        #[arg(long, value_name = "JSON")]
        patch: Option<String>,
    },
}

/// Parameters PostgreSQL (15) reads only at server start (`context =
/// postmaster` in pg_settings): a change to one needs a restart.
const RESTART_PARAMETERS: &[&str] = &[
    "archive_mode",
    "autovacuum_freeze_max_age",
    "autovacuum_max_workers",
    "autovacuum_multixact_freeze_max_age",
    "bonjour",
    "bonjour_name",
    "cluster_name",
    "data_directory",
    "data_sync_retry",
    "dynamic_shared_memory_type",
    "event_source",
    "external_pid_file",
    "hba_file",
    "hot_standby",
    "huge_page_size",
    "huge_pages",
    "ident_file",
    "jit_provider",
    "listen_addresses",
    "logging_collector",
    "max_connections",
    "max_files_per_process",
    "max_locks_per_transaction",
    "max_logical_replication_workers",
    "max_pred_locks_per_transaction",
    "max_prepared_transactions",
    "max_replication_slots",
    "max_wal_senders",
    "max_worker_processes",
    "min_dynamic_shared_memory",
    "old_snapshot_threshold",
    "port",
    "shared_buffers",
    "shared_memory_type",
    "shared_preload_libraries",
    "superuser_reserved_connections",
    "track_activity_query_size",
    "track_commit_timestamp",
    "unix_socket_directories",
    "unix_socket_group",
    "unix_socket_permissions",
    "wal_buffers",
    "wal_decode_buffer_size",
    "wal_level",
    "wal_log_hints",
];

/// The parameter catalog a keeper wrote to the store, if any.
async fn read_catalog(store: &AnyStore, keys: &Keys) -> Option<cluster::params::Catalog> {
    let kv = store.get(&keys.pg_settings()).await.ok()??;
    serde_json::from_str(&kv.value).ok()
}

/// Checks every parameter `new` sets differently from `old` against the
/// servers' own catalog, with PostgreSQL's message for a refused value.
fn check_parameters(
    old: &ClusterSpec,
    new: &ClusterSpec,
    catalog: &cluster::params::Catalog,
) -> Result<()> {
    let refused: Vec<String> = new
        .pg_parameters
        .iter()
        .filter(|(n, v)| old.pg_parameters.get(*n) != Some(*v))
        .filter_map(|(n, v)| catalog.check(n, v).err())
        .collect();
    if !refused.is_empty() {
        bail!(
            "PostgreSQL {} would refuse {}: {}",
            catalog.server_version,
            if refused.len() == 1 {
                "this value"
            } else {
                "these values"
            },
            refused.join("; ")
        );
    }
    Ok(())
}

/// RFC 7386 JSON merge patch of `patch` onto `target`.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// What changes from `old` to `new`, one line each, and whether any
/// change needs a restart.
fn spec_changes(
    old: &ClusterSpec,
    new: &ClusterSpec,
    catalog: Option<&cluster::params::Catalog>,
) -> (Vec<String>, bool) {
    let (a, b) = (
        serde_json::to_value(old).unwrap_or_default(),
        serde_json::to_value(new).unwrap_or_default(),
    );
    let show =
        |v: Option<&serde_json::Value>| v.map_or_else(|| "(unset)".to_owned(), |v| v.to_string());
    let mut lines = Vec::new();
    let mut restart = false;
    let empty = serde_json::Map::new();
    let (ao, bo) = (
        a.as_object().unwrap_or(&empty),
        b.as_object().unwrap_or(&empty),
    );
    let keys: std::collections::BTreeSet<&String> = ao.keys().chain(bo.keys()).collect();
    for k in keys {
        let (x, y) = (ao.get(k), bo.get(k));
        if x == y {
            continue;
        }
        if k == "pg_parameters" {
            let (px, py) = (
                x.and_then(|v| v.as_object()).unwrap_or(&empty),
                y.and_then(|v| v.as_object()).unwrap_or(&empty),
            );
            let names: std::collections::BTreeSet<&String> = px.keys().chain(py.keys()).collect();
            for n in names {
                if px.get(n) != py.get(n) {
                    let needs = catalog
                        .and_then(|c| c.needs_restart(n))
                        .unwrap_or_else(|| RESTART_PARAMETERS.contains(&n.as_str()));
                    restart |= needs;
                    lines.push(format!(
                        "pg_parameters.{n}: {} -> {}{}",
                        show(px.get(n)),
                        show(py.get(n)),
                        if needs {
                            " (needs a restart)"
                        } else {
                            " (reload)"
                        }
                    ));
                }
            }
        } else {
            lines.push(format!("{k}: {} -> {}", show(x), show(y)));
        }
    }
    (lines, restart)
}

/// Reads, changes and writes clusterdata by compare-and-swap, retrying on
/// conflicts with concurrent writers (the sentinel).
async fn update(
    store: &AnyStore,
    keys: &Keys,
    mut f: impl FnMut(&mut ClusterData) -> Result<()>,
) -> Result<()> {
    loop {
        let (mut data, rev) = read(store, keys).await?;
        f(&mut data)?;
        if let Cas::Done(_) = store
            .put_if_revision(&keys.clusterdata(), &data.to_json(), rev, 0)
            .await?
        {
            return Ok(());
        }
    }
}

async fn read(store: &AnyStore, keys: &Keys) -> Result<(ClusterData, i64)> {
    let kv = store.get(&keys.clusterdata()).await?.with_context(|| {
        format!(
            "cluster {:?} has no data in the store; create it with `keelson ctl init`",
            keys.base()
        )
    })?;
    Ok((ClusterData::from_json(&kv.value)?, kv.mod_revision))
}

/// Reads a spec file an operator wrote: JSON, every field optional,
/// unknown fields refused (a typo must not be silently ignored).
fn read_spec(path: &std::path::Path) -> Result<ClusterSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read the spec file {}", path.display()))?;
    let spec: ClusterSpec = serde_json::from_str(&text)
        .with_context(|| format!("invalid spec in {}", path.display()))?;
    let unknown = spec.unknown_fields();
    if !unknown.is_empty() {
        bail!(
            "invalid spec in {}: unknown field(s) {}; `keelson ctl spec show` lists the fields",
            path.display(),
            unknown.join(", ")
        );
    }
    Ok(spec)
}

/// Starts a planned switchover (to `to`, or the most advanced eligible
/// standby); returns the primary it moves away from.
async fn switchover(store: &AnyStore, keys: &Keys, to: Option<&str>) -> Result<String> {
    start_switchover(store, keys, to, None)
        .await
        .map(|from| from.unwrap_or_default())
}

/// A switchover away from `uid` if it is the primary, awaited for up to
/// `limit` (a keeper stopping on SIGTERM): `None` if `uid` is not the
/// primary, else the new primary.
pub async fn switchover_from(
    store: &AnyStore,
    keys: &Keys,
    uid: &str,
    limit: std::time::Duration,
) -> Result<Option<String>> {
    let deadline = tokio::time::Instant::now() + limit;
    let (d, _) = read(store, keys).await?;
    let ours = d.proxy.master_db.as_deref() == Some(uid)
        || d.failover.as_ref().is_some_and(|f| f.from == uid);
    if !ours {
        return Ok(None);
    }
    if d.failover.is_none()
        && start_switchover(store, keys, None, Some(uid))
            .await?
            .is_none()
    {
        return Ok(None);
    }
    tracing::info!(
        from = uid,
        "SIGTERM: switchover started; waiting for it before stopping"
    );
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    wait_for(store, keys, left, "the switchover", |d| {
        d.failover.is_none() && d.proxy.master_db.as_deref().is_some_and(|m| m != uid)
    })
    .await?;
    Ok(read(store, keys).await?.0.proxy.master_db)
}

/// Writes a switchover request (to `to`, or the best candidate); with
/// `only_from`, only if that keeper is the primary (else `None`).
async fn start_switchover(
    store: &AnyStore,
    keys: &Keys,
    to: Option<&str>,
    only_from: Option<&str>,
) -> Result<Option<String>> {
    loop {
        let kv = store
            .get(&keys.clusterdata())
            .await?
            .context("the cluster has no data in the store; create it with `keelson ctl init`")?;
        let mut data = ClusterData::from_json(&kv.value)?;
        let Some(from) = data.proxy.master_db.clone() else {
            bail!("the cluster has no primary to switch over from");
        };
        if only_from.is_some_and(|u| u != from) {
            return Ok(None);
        }
        if data.failover.is_some() {
            bail!("a failover or switchover is already in progress; `keelson ctl status` shows it");
        }
        let obs = sentinel::run::observe_once(store, keys).await?;
        match to {
            Some(t) if !data.dbs.contains_key(t) => bail!("the cluster has no keeper {t}"),
            Some(t) => {
                if let Some(why) = sentinel::decide::ineligible(&data, &obs, &from, t, 0) {
                    bail!("{t} cannot take over from {from}: it {why}");
                }
            }
            None => {
                if let Err(why) = sentinel::decide::choose_candidate(&data, &obs, &from, &[], 0) {
                    bail!("cannot switch over from {from}: {why}");
                }
            }
        }
        let sync = data
            .dbs
            .get(&from)
            .map(|db| db.spec.synchronous_standbys.clone())
            .unwrap_or_default();
        data.set_proxy_master(None);
        data.failover = Some(cluster::data::Failover {
            synchronous_standbys: sync,
            from: from.clone(),
            fence: vec![from.clone()],
            excluded: Vec::new(),
            fence_generation: data.proxy.generation,
            to: None,
            reason: cluster::data::SWITCHOVER.into(),
            requested: to.map(str::to_owned),
        });
        if let Cas::Done(_) = store
            .put_if_revision(&keys.clusterdata(), &data.to_json(), kv.mod_revision, 0)
            .await?
        {
            return Ok(Some(from));
        }
    }
}

/// Whether the spec lowers a setting standbys need at least as high as the
/// primary's (see [`cluster::data::HOT_STANDBY_SETTINGS`]) below what the
/// primary runs: then the primary restarts first.
fn lowers_hot_standby_settings(d: &ClusterData, primary: &str) -> Vec<String> {
    let Some(running) = d.dbs.get(primary).map(|db| &db.status.running_settings) else {
        return Vec::new();
    };
    settings_below(
        |n| {
            d.spec
                .pg_parameters
                .get(n)
                .and_then(|v| cluster::params::text(v).trim().parse().ok())
        },
        |n| running.get(n).and_then(|v| v.parse().ok()),
    )
}

/// The hot-standby settings whose value in `a` is below that in `b`
/// (where both are known).
fn settings_below(a: impl Fn(&str) -> Option<i64>, b: impl Fn(&str) -> Option<i64>) -> Vec<String> {
    cluster::data::HOT_STANDBY_SETTINGS
        .iter()
        .filter(|n| matches!((a(n), b(n)), (Some(x), Some(y)) if x < y))
        .map(|n| (*n).to_owned())
        .collect()
}

/// Whether a standby running `standby` has a setting it needs at least as
/// high as its primary's below the primary's `primary`.
fn below_primary(
    standby: &std::collections::BTreeMap<String, String>,
    primary: &std::collections::BTreeMap<String, String>,
) -> bool {
    let v = |m: &std::collections::BTreeMap<String, String>, n: &str| m.get(n)?.parse().ok();
    !settings_below(|n| v(standby, n), |n| v(primary, n)).is_empty()
}

/// Waits until `check` holds on the cluster data, up to `limit`.
async fn wait_for(
    store: &AnyStore,
    keys: &Keys,
    limit: std::time::Duration,
    what: &str,
    check: impl Fn(&ClusterData) -> bool,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (d, _) = read(store, keys).await?;
        if check(&d) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{what} did not happen within {}; `keelson ctl status` shows where it stands",
                humantime::format_duration(limit)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `ctl backup`: asks the primary's keeper for a backup and waits for it.
async fn backup(
    store: &AnyStore,
    keys: &Keys,
    kind: Option<&str>,
    limit: std::time::Duration,
    from_standby: bool,
) -> Result<()> {
    if let Some(k) = kind {
        if !["full", "diff", "incr"].contains(&k) {
            bail!("--type {k:?}: pgBackRest takes full, diff or incr");
        }
    }
    let t = std::time::Instant::now();
    let (mut uid, mut id) = (String::new(), 0);
    update(store, keys, |d| {
        if d.spec.backup.tool == cluster::data::BackupTool::Command {
            bail!(
                "ctl backup runs pgBackRest, and this cluster archives with its own commands \
                 (backup.tool command): take base backups with that tool (docs/backup.md)"
            );
        }
        if d.spec.backup.tool != cluster::data::BackupTool::Pgbackrest {
            bail!(
                "the cluster spec has no pgbackrest backup section; add one with `keelson ctl \
                 spec update --patch '{{\"backup\": {{\"tool\": \"pgbackrest\", \
                 \"repository\": \"/path\", \"stanza\": \"name\"}}}}'` (docs/backup.md)"
            );
        }
        let Some(primary) = d.proxy.master_db.clone() else {
            bail!("the cluster has no primary now (a failover may be under way); try again once `keelson ctl status` shows one");
        };
        let on = if from_standby {
            if d.dbs
                .get(&primary)
                .is_none_or(|db| db.status.pgbackrest_server.is_none())
            {
                bail!(
                    "the primary {primary}'s keeper runs no pgBackRest TLS server: start the \
                     keepers with --pgbackrest-listen HOST:PORT and the --pg-ssl-* files with a \
                     CA (docs/backup.md)"
                );
            }
            // The standby closest to the primary, among those that stream
            // and whose keeper presents a certificate the server knows.
            let best = d
                .dbs
                .iter()
                .filter(|(u, db)| {
                    **u != primary
                        && db.spec.role == cluster::data::Role::Standby
                        && db.status.healthy
                        && db.status.in_recovery
                        && db.status.streaming
                        && db.status.pgbackrest_server.is_some()
                })
                .max_by_key(|(u, db)| (db.status.replay_lsn, std::cmp::Reverse((*u).clone())))
                .map(|(u, _)| u.clone());
            let Some(best) = best else {
                bail!(
                    "no streaming standby can take the backup (each needs a healthy, streaming \
                     database and a keeper with --pgbackrest-listen); take it from the primary \
                     without --from-standby"
                );
            };
            best
        } else {
            primary.clone()
        };
        let Some(db) = d.dbs.get_mut(&on) else {
            bail!("the cluster data names {on:?} but has no such database");
        };
        let last = db.backup.as_ref().map_or(0, |r| r.id);
        let done = db.status.backup.as_ref().map_or(0, |b| b.id);
        id = last.max(done) + 1;
        db.backup = Some(cluster::data::BackupRequest {
            id,
            kind: kind.unwrap_or_default().to_owned(),
            from_standby,
        });
        uid = on;
        Ok(())
    })
    .await?;
    if from_standby {
        println!(
            "backup {id} requested from {uid}, a standby (the primary starts and stops it) ..."
        );
    } else {
        println!("backup {id} requested from {uid}, the primary ...");
    }
    wait_for(store, keys, limit, &format!("backup {id} on {uid}"), |d| {
        d.dbs
            .get(&uid)
            .and_then(|db| db.status.backup.as_ref())
            .is_some_and(|b| b.id >= id)
    })
    .await?;
    let (d, _) = read(store, keys).await?;
    let done = d
        .dbs
        .get(&uid)
        .and_then(|db| db.status.backup.clone())
        .unwrap_or_default();
    if !done.ok {
        bail!("the backup on {uid} failed: {}", done.detail);
    }
    println!(
        "backup {} taken on {uid} in {:.1}s; `keelson ctl backups` lists it",
        done.detail,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `ctl backups`: the primary's keeper's backup list (its node API's
/// `/backups`, `pgbackrest info --output=json`).
async fn backups(store: &AnyStore, keys: &Keys, json: bool) -> Result<()> {
    let (d, _) = read(store, keys).await?;
    if d.spec.backup.tool != cluster::data::BackupTool::Pgbackrest {
        bail!("the cluster spec has no pgbackrest backup section (docs/backup.md)");
    }
    let Some(primary) = d.proxy.master_db.clone() else {
        bail!("the cluster has no primary now; try again once `keelson ctl status` shows one");
    };
    let Some(api) = d
        .dbs
        .get(&primary)
        .and_then(|db| db.status.api_address.clone())
    else {
        bail!("the primary {primary}'s keeper reports no node API address (--api-listen)");
    };
    let (status, body) =
        cluster::node_api::call(&api, "GET", "/backups", std::time::Duration::from_secs(10))
            .await
            .map_err(|e| anyhow::anyhow!("asking {primary}'s keeper at {api}: {e}"))?;
    if status != 200 {
        bail!(
            "{primary}'s keeper at {api} answered {status}: {}",
            body.trim()
        );
    }
    if json {
        println!("{body}");
        return Ok(());
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).context("the keeper's backup list is not JSON")?;
    for stanza in v.as_array().into_iter().flatten() {
        let s = |v: &serde_json::Value, path: &[&str]| {
            let mut v = v;
            for p in path {
                v = &v[*p];
            }
            match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".into(),
                other => other.to_string(),
            }
        };
        println!(
            "stanza {} ({})",
            s(stanza, &["name"]),
            s(stanza, &["status", "message"])
        );
        for a in stanza["archive"].as_array().into_iter().flatten() {
            println!("archive: WAL {} .. {}", s(a, &["min"]), s(a, &["max"]));
        }
        println!(
            "{:<26} {:<5} {:<20} {:<20} {:<24} {:<24} {:>12}",
            "LABEL", "TYPE", "STARTED", "STOPPED", "WAL START", "WAL STOP", "SIZE"
        );
        let when = |v: &serde_json::Value| {
            v.as_i64()
                .and_then(|t| {
                    std::time::UNIX_EPOCH
                        .checked_add(std::time::Duration::from_secs(t.max(0) as u64))
                })
                .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                .unwrap_or_else(|| "-".into())
        };
        for b in stanza["backup"].as_array().into_iter().flatten() {
            println!(
                "{:<26} {:<5} {:<20} {:<20} {:<24} {:<24} {:>12}",
                s(b, &["label"]),
                s(b, &["type"]),
                when(&b["timestamp"]["start"]),
                when(&b["timestamp"]["stop"]),
                s(b, &["archive", "start"]),
                s(b, &["archive", "stop"]),
                s(b, &["info", "size"])
            );
        }
    }
    Ok(())
}

/// Restarts `uid`'s PostgreSQL in place and waits until it runs again (a
/// standby: streaming), with nothing pending.
async fn restart_one(
    store: &AnyStore,
    keys: &Keys,
    uid: &str,
    limit: std::time::Duration,
) -> Result<()> {
    let t = std::time::Instant::now();
    let mut want = 0;
    update(store, keys, |d| {
        let Some(db) = d.dbs.get_mut(uid) else {
            bail!("the cluster has no keeper {uid:?}");
        };
        db.restart += 1;
        want = db.restart;
        Ok(())
    })
    .await?;
    println!("restarting {uid} ...");
    wait_for(store, keys, limit, &format!("the restart of {uid}"), |d| {
        d.dbs.get(uid).is_some_and(|db| {
            let s = &db.status;
            s.restarted >= want
                && s.healthy
                && s.pending_restart.is_empty()
                && (db.spec.role != cluster::data::Role::Standby || s.streaming)
                && (db.spec.role != cluster::data::Role::Master
                    || d.proxy.master_db.as_deref() == Some(uid))
        })
    })
    .await?;
    println!("{uid} restarted in {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}

/// `ctl restart`: standbys one at a time, each streaming again before the
/// next; then the primary role moves by switchover to a restarted standby,
/// and the old primary restarts as it rejoins. A change lowering a setting
/// standbys need at least as high as the primary's restarts the primary
/// first, in place (a standby with the lower value would not start).
async fn rolling_restart(
    store: &AnyStore,
    keys: &Keys,
    uids: Vec<String>,
    pending: bool,
    limit: std::time::Duration,
) -> Result<()> {
    let (d, _) = read(store, keys).await?;
    let Some(primary) = d.proxy.master_db.clone() else {
        bail!("the cluster has no primary now; restart when `keelson ctl status` shows one");
    };
    if d.failover.is_some() {
        bail!(
            "a failover or switchover is in progress; wait for it to finish (`keelson ctl status`)"
        );
    }
    for u in &uids {
        if !d.dbs.contains_key(u) {
            bail!("the cluster has no keeper {u:?}");
        }
    }
    let mut targets: Vec<String> = d
        .dbs
        .iter()
        .filter(|(u, db)| {
            (uids.is_empty() || uids.contains(u))
                && db.spec.role != cluster::data::Role::None
                && (!pending || !db.status.pending_restart.is_empty())
        })
        .map(|(u, _)| u.clone())
        .collect();
    if targets.is_empty() {
        println!("nothing to restart");
        return Ok(());
    }
    let with_primary = targets.contains(&primary);
    targets.retain(|u| *u != primary);
    let lowered = lowers_hot_standby_settings(&d, &primary);
    if with_primary && (!lowered.is_empty() || targets.is_empty()) {
        if !lowered.is_empty() {
            println!(
                "{} lowered: the primary {primary} restarts first, in place",
                lowered.join(", ")
            );
        }
        restart_one(store, keys, &primary, limit).await?;
        // The restarted primary wrote its new values to its WAL first
        // thing; a standby restarted before it replayed them would start
        // with its primary's old, higher ones.
        let (d, _) = read(store, keys).await?;
        let at = d.dbs.get(&primary).map_or(0, |db| db.status.lsn);
        for s in &targets {
            // Done waiting when it replayed past the restart; at once for
            // a standby that is down (it starts with its primary's values
            // from its control file) or that runs a setting below the
            // primary's new one (raised in the same change: its replay
            // pauses at the change, and only its restart helps).
            wait_for(
                store,
                keys,
                limit,
                &format!("{s} replaying {primary}'s restart"),
                |d| {
                    let new = d.dbs.get(&primary).map(|p| &p.status.running_settings);
                    d.dbs.get(s).is_some_and(|db| {
                        let below =
                            new.is_some_and(|new| below_primary(&db.status.running_settings, new));
                        !db.status.healthy || db.status.replay_lsn >= at || below
                    })
                },
            )
            .await?;
        }
    }
    for s in &targets {
        restart_one(store, keys, s, limit).await?;
    }
    if with_primary && lowered.is_empty() && !targets.is_empty() {
        let t = std::time::Instant::now();
        let from = switchover(store, keys, None).await?;
        println!("switchover from {from} started (its clients are held, not refused) ...");
        wait_for(store, keys, limit, "the switchover", |d| {
            d.failover.is_none() && d.proxy.master_db.as_deref().is_some_and(|m| m != from)
        })
        .await?;
        let (d, _) = read(store, keys).await?;
        println!(
            "{} is the primary after {:.1}s",
            d.proxy.master_db.unwrap_or_default(),
            t.elapsed().as_secs_f64()
        );
        wait_for(store, keys, limit, &format!("{from} rejoining"), |d| {
            d.dbs.get(&from).is_some_and(|db| {
                db.spec.role == cluster::data::Role::Standby
                    && db.status.healthy
                    && db.status.streaming
                    && db.status.pending_restart.is_empty()
            })
        })
        .await?;
        println!(
            "{from} restarted as a standby in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Marks `uid` failed and reports what the sentinel did about it.
async fn failkeeper(store: &AnyStore, keys: &Keys, uid: &str) -> Result<()> {
    let mut was_master = false;
    update(store, keys, |d| {
        if !d.keepers.contains_key(uid) {
            bail!("the cluster has no keeper {uid:?}");
        }
        was_master = d.proxy.master_db.as_deref() == Some(uid);
        if let Some(k) = d.keepers.get_mut(uid) {
            k.failed = true;
        }
        Ok(())
    })
    .await?;
    println!("keeper {uid} marked failed");
    // The sentinel leader clears the mark at its next decision.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (d, _) = read(store, keys).await?;
        if !d.keepers.get(uid).is_some_and(|k| k.failed) {
            match &d.failover {
                Some(f) if f.from == uid => {
                    println!("failover from {uid} started; `keelson ctl status` shows its progress")
                }
                _ if was_master && d.proxy.master_db.as_deref() == Some(uid) => {
                    println!("{uid} is still the primary: no standby is eligible to take over")
                }
                _ if was_master => println!("{uid} is no longer the primary"),
                _ => println!("{uid} is not the primary; nothing to fail over"),
            }
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no sentinel acted on the mark within 10 s; is a sentinel running?");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

pub async fn run(args: CtlArgs) -> Result<()> {
    let store = args.cluster.open().await?;
    let keys = args.cluster.keys();
    match args.command {
        CtlCommand::Init {
            spec,
            existing,
            mode,
            keeper,
            target_time,
            target_lsn,
            target_name,
            backup,
        } => {
            let spec: ClusterSpec = match spec {
                Some(path) => read_spec(&path)?,
                None => ClusterSpec::default(),
            };
            spec.validate_written(None)?;
            for w in spec.warnings() {
                eprintln!("warning: {w}");
            }
            let targets: Vec<(&str, String)> = [
                ("time", target_time),
                ("lsn", target_lsn),
                ("name", target_name),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
            let mode = if existing.is_some() && mode == InitMode::New {
                InitMode::Existing
            } else {
                mode
            };
            let existing = match (mode, existing, keeper) {
                (InitMode::Existing, Some(_), Some(_)) => {
                    bail!("give the keeper once: --keeper UID (or the older --existing UID)")
                }
                (InitMode::Existing, Some(uid), None) | (InitMode::Existing, None, Some(uid)) => {
                    Some(uid)
                }
                (InitMode::Existing, None, None) => {
                    bail!("--mode existing needs --keeper UID: the keeper whose data becomes the primary's")
                }
                (_, Some(_), _) => {
                    bail!("--existing is --mode existing; it does not go with --mode {mode:?}")
                }
                (_, None, Some(_)) => bail!("--keeper goes with --mode existing"),
                (_, None, None) => None,
            };
            if let Some(uid) = &existing {
                keeper::validate_uid(uid).map_err(anyhow::Error::msg)?;
            }
            if spec.is_standby() && mode != InitMode::New {
                bail!(
                    "a standby cluster's leader copies its source (role standby in the spec): \
                     --mode {} does not go with it",
                    if mode == InitMode::Pitr {
                        "pitr"
                    } else {
                        "existing"
                    }
                );
            }
            if mode != InitMode::Pitr && (!targets.is_empty() || backup.is_some()) {
                bail!(
                    "--target-time, --target-lsn, --target-name and --backup go with --mode pitr"
                );
            }
            let restore = match mode {
                InitMode::Pitr => {
                    if spec.backup.tool != cluster::data::BackupTool::Pgbackrest {
                        bail!(
                            "--mode pitr restores from the spec's pgbackrest repository: give a \
                             spec (--spec FILE) whose backup section names it (docs/backup.md)"
                        );
                    }
                    let [(kind, target)] = <[_; 1]>::try_from(targets).map_err(|_| {
                        anyhow::anyhow!(
                            "--mode pitr needs one target: --target-time, --target-lsn or --target-name"
                        )
                    })?;
                    let t = cluster::data::RestoreTarget {
                        kind: kind.to_owned(),
                        target,
                        set: backup,
                    };
                    t.check()?;
                    Some(t)
                }
                _ => None,
            };
            let mut data = ClusterData::new(spec);
            data.init_existing = existing;
            data.init_restore = restore;
            match store
                .put_if_revision(&keys.clusterdata(), &data.to_json(), 0, 0)
                .await?
            {
                Cas::Done(_) => println!(
                    "cluster {:?} created in {}",
                    args.cluster.cluster, args.cluster.store
                ),
                Cas::Conflict(_) => bail!(
                    "cluster {:?} already exists in {}; `keelson ctl status` shows it",
                    args.cluster.cluster,
                    args.cluster.store
                ),
            }
        }
        CtlCommand::Switchover { to } => {
            let from = switchover(&store, &keys, to.as_deref()).await?;
            println!("switchover from {from} started; new clients are held until the new primary takes them");
        }
        CtlCommand::Failkeeper { uid } => failkeeper(&store, &keys, &uid).await?,
        CtlCommand::Keeper {
            uid,
            action:
                KeeperCommand::Set {
                    priority,
                    never_primary,
                    no_sync,
                    no_loadbalance,
                },
        } => {
            let mut tags = None;
            update(&store, &keys, |d| {
                let Some(k) = d.keepers.get_mut(&uid) else {
                    bail!("the cluster has no keeper {uid:?}");
                };
                let mut t = k.tags();
                if let Some(v) = priority {
                    t.priority = v;
                }
                if let Some(v) = never_primary {
                    t.never_primary = v;
                }
                if let Some(v) = no_sync {
                    t.no_sync = v;
                }
                if let Some(v) = no_loadbalance {
                    t.no_loadbalance = v;
                }
                k.set_tags(&t);
                tags = Some(t);
                Ok(())
            })
            .await?;
            if let Some(t) = tags {
                println!("keeper {uid}: {}", format_tags(&t));
            }
        }
        CtlCommand::Reinit { uid } => {
            let mut leader = false;
            update(&store, &keys, |d| {
                let standby_cluster = d.spec.is_standby();
                let paused = d.paused;
                let Some(db) = d.dbs.get_mut(&uid) else {
                    bail!("the cluster has no keeper {uid:?}");
                };
                match db.spec.role {
                    // A standby cluster's leader holds a copy of the source:
                    // it is copied afresh from it (after the source forked
                    // its timeline before what this cluster replayed).
                    cluster::data::Role::Master if standby_cluster && paused => leader = true,
                    cluster::data::Role::Master if standby_cluster => bail!(
                        "{uid} leads the standby cluster: run `keelson ctl pause` first (its copy \
                         from the source takes a while, and must not start a failover), then this, \
                         then `ctl reinit` each other member, then `keelson ctl resume`"
                    ),
                    cluster::data::Role::Master => bail!(
                        "{uid} is the primary: its data is the cluster's; run `keelson ctl switchover` first"
                    ),
                    cluster::data::Role::None => bail!(
                        "{uid} has no role now (it is stopped, or taking part in a failover); \
                         it is copied or rewound when it rejoins"
                    ),
                    cluster::data::Role::Standby => {}
                }
                if !db.spec.reinit {
                    db.spec.reinit = true;
                    db.generation += 1;
                }
                Ok(())
            })
            .await?;
            if leader {
                println!("{uid} will copy its data afresh from the standby cluster's source; `keelson ctl status` shows when it streams again");
            } else {
                println!("{uid} will copy its data afresh from the primary; `keelson ctl status` shows when it streams again");
            }
        }
        CtlCommand::Restart {
            pending,
            timeout,
            uids,
        } => rolling_restart(&store, &keys, uids, pending, timeout).await?,
        CtlCommand::Backup {
            kind,
            timeout,
            from_standby,
        } => backup(&store, &keys, kind.as_deref(), timeout, from_standby).await?,
        CtlCommand::Backups { json } => backups(&store, &keys, json).await?,
        CtlCommand::Reload => {
            update(&store, &keys, |d| {
                d.reload += 1;
                Ok(())
            })
            .await?;
            println!("every keeper reloads its PostgreSQL's configuration");
        }
        CtlCommand::Pause | CtlCommand::Resume => {
            let pause = matches!(args.command, CtlCommand::Pause);
            let mut was = false;
            update(&store, &keys, |d| {
                was = d.paused;
                d.paused = pause;
                Ok(())
            })
            .await?;
            println!(
                "{}",
                match (pause, was) {
                    (true, false) =>
                        "cluster paused: no automatic failover; keepers leave PostgreSQL as it is",
                    (true, true) => "cluster was already paused",
                    (false, true) => "cluster resumed: automatic failover is on again",
                    (false, false) => "cluster was not paused",
                }
            );
        }
        CtlCommand::Promote { timeout, force } => {
            let mut leader = None;
            update(&store, &keys, |d| {
                if let Some(why) = d.why_not_promote(force) {
                    bail!("{why}");
                }
                let spec = ClusterSpec {
                    role: cluster::data::ClusterRole::Primary,
                    ..d.spec.clone()
                };
                spec.validate_written(Some(&d.spec))?;
                leader = d.proxy.master_db.clone();
                d.set_spec(spec);
                Ok(())
            })
            .await?;
            let t = std::time::Instant::now();
            println!(
                "promoting the standby cluster (standby leader {}) ...",
                leader.as_deref().unwrap_or("not elected yet")
            );
            loop {
                let (d, _) = read(&store, &keys).await?;
                let writable = d
                    .proxy
                    .master_db
                    .as_ref()
                    .and_then(|m| d.dbs.get(m))
                    .filter(|db| db.status.healthy && !db.status.in_recovery);
                if let (Some(m), Some(db)) = (&d.proxy.master_db, writable) {
                    println!(
                        "{m} is the primary (timeline {}, LSN {}) after {:.1}s; the proxies route writes to it",
                        db.status.timeline,
                        cluster::status::format_lsn(db.status.lsn),
                        t.elapsed().as_secs_f64()
                    );
                    break;
                }
                if t.elapsed() > timeout {
                    bail!(
                        "the cluster is a primary cluster now, but no primary took writes within {}: \
                         `keelson ctl status` says why",
                        humantime::format_duration(timeout)
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        CtlCommand::History { json } => {
            let (data, _) = read(&store, &keys).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&data.history)?);
            } else {
                print_history(&data.history);
            }
        }
        CtlCommand::Spec(SpecCommand::Show) => {
            let (data, _) = read(&store, &keys).await?;
            println!("{}", serde_json::to_string_pretty(&data.spec)?);
        }
        CtlCommand::Spec(SpecCommand::Update { file, patch }) => {
            let from_file = file.as_deref().map(read_spec).transpose()?;
            let patch: Option<serde_json::Value> = patch
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .context("--patch is not valid JSON")?;
            let catalog = read_catalog(&store, &keys).await;
            let mut changes = (Vec::new(), false);
            update(&store, &keys, |d| {
                let spec = match (&from_file, &patch) {
                    (Some(spec), _) => spec.clone(),
                    (None, Some(p)) => {
                        let mut v = serde_json::to_value(&d.spec)?;
                        merge_patch(&mut v, p);
                        let spec: ClusterSpec =
                            serde_json::from_value(v).context("the patched spec is not valid")?;
                        let unknown = spec
                            .unknown_fields()
                            .into_iter()
                            .filter(|f| !d.spec.extra.contains_key(f))
                            .collect::<Vec<_>>();
                        if !unknown.is_empty() {
                            bail!(
                                "unknown field(s) {}; `keelson ctl spec show` lists the fields",
                                unknown.join(", ")
                            );
                        }
                        spec
                    }
                    (None, None) => bail!("give --file or --patch"),
                };
                spec.validate_written(Some(&d.spec))?;
                if spec.fail_interval != d.spec.fail_interval
                    || spec.keeper_report_interval != d.spec.keeper_report_interval
                {
                    for w in spec.warnings() {
                        eprintln!("warning: {w}");
                    }
                }
                // Fields a newer keelson wrote stay as they are.
                let extra = d.spec.extra.clone();
                let spec = ClusterSpec { extra, ..spec };
                if let Some(c) = &catalog {
                    check_parameters(&d.spec, &spec, c)?;
                }
                changes = spec_changes(&d.spec, &spec, catalog.as_ref());
                d.set_spec(spec);
                Ok(())
            })
            .await?;
            let (lines, restart) = changes;
            if lines.is_empty() {
                println!("spec unchanged");
            } else {
                println!("spec updated:");
                for l in &lines {
                    println!("  {l}");
                }
                if restart {
                    println!(
                        "some parameters take effect only after a restart of every instance; \
                         `keelson ctl status` lists them as pending"
                    );
                }
            }
        }
        CtlCommand::Removekeeper { uid } => {
            update(&store, &keys, |d| {
                if !d.keepers.contains_key(&uid) && !d.dbs.contains_key(&uid) {
                    bail!("the cluster has no keeper {uid}");
                }
                if d.proxy.master_db.as_deref() == Some(uid.as_str())
                    || d.dbs
                        .get(&uid)
                        .is_some_and(|db| db.spec.role == cluster::data::Role::Master)
                {
                    bail!("{uid} is the primary; run `keelson ctl switchover` first");
                }
                if let Some(f) = &d.failover {
                    if f.from == uid || f.to.as_deref() == Some(uid.as_str()) || f.fence.contains(&uid) {
                        bail!(
                            "{uid} takes part in the {} in progress; wait for it to finish (`keelson ctl status`)",
                            f.reason
                        );
                    }
                }
                d.keepers.remove(&uid);
                d.dbs.remove(&uid);
                d.membership += 1;
                for db in d.dbs.values_mut() {
                    if db.spec.synchronous_standbys.contains(&uid) {
                        db.spec.synchronous_standbys.retain(|s| s != &uid);
                        db.generation += 1;
                    }
                }
                Ok(())
            })
            .await?;
            println!("keeper {uid} removed; stop its process, or it joins again as a new standby");
        }
        CtlCommand::Status { json } => {
            let s = cluster::status::read(&store, &keys).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_table(&s);
            }
        }
    }
    Ok(())
}

/// Tags as `ctl status` and `ctl keeper set` print them.
fn format_tags(t: &cluster::data::Tags) -> String {
    format!(
        "priority={} never-primary={} no-sync={} no-loadbalance={}",
        t.priority, t.never_primary, t.no_sync, t.no_loadbalance
    )
}

fn print_history(h: &[cluster::data::PrimaryChange]) {
    println!(
        "{:<21} {:<11} {:<16} {:<16} {:>8} {:>14}",
        "TIME (UTC)", "REASON", "FROM", "TO", "TIMELINE", "LSN"
    );
    for c in h {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(c.at_ms);
        println!(
            "{:<21} {:<11} {:<16} {:<16} {:>8} {:>14}",
            humantime::format_rfc3339_seconds(at).to_string(),
            c.reason,
            c.from.as_deref().unwrap_or("-"),
            c.to,
            c.timeline,
            cluster::status::format_lsn(c.lsn)
        );
    }
}

fn print_table(s: &ClusterStatus) {
    let or_dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
    let num = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |n| n.to_string());
    if s.paused {
        println!("PAUSED: no automatic failover; `keelson ctl resume` ends it");
    }
    if let Some(source) = &s.standby_of {
        println!(
            "STANDBY CLUSTER following {source}: no writes; the primary below is its standby \
             leader; `keelson ctl promote` makes it a primary cluster"
        );
    }
    println!("cluster:    {}", s.cluster);
    println!(
        "phase:      {}",
        serde_json::to_value(s.phase)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    );
    println!("generation: {}", s.generation);
    println!(
        "sentinels:  {} (leader: {})",
        if s.sentinels.is_empty() {
            "none".to_owned()
        } else {
            s.sentinels.join(", ")
        },
        or_dash(s.leader.as_deref())
    );
    match &s.master {
        Some(m) => println!(
            "primary:    {} at {}",
            m.keeper,
            or_dash(m.address.as_deref())
        ),
        None => println!("primary:    none"),
    }
    if let Some(f) = &s.failover {
        println!(
            "{}: from {} to {}",
            f.reason,
            f.from,
            f.to.as_deref().unwrap_or("(not chosen yet)")
        );
    }
    if let Some(n) = &s.notice {
        println!("notice:     {n}");
    }
    println!();
    println!(
        "{:<16} {:<8} {:<8} {:<22} {:<12} {:>10} {:>8}",
        "KEEPER", "ROLE", "HEALTHY", "ADDRESS", "LSN", "LAG", "TIMELINE"
    );
    for k in &s.keepers {
        println!(
            "{:<16} {:<8} {:<8} {:<22} {:<12} {:>10} {:>8}",
            k.uid,
            k.role,
            k.healthy,
            or_dash(k.address.as_deref()),
            or_dash(k.lsn.as_deref()),
            num(k.lag_bytes),
            k.timeline
        );
        if let Some(p) = &k.problem {
            println!("    {}: {p}", k.uid);
        }
        if k.tags != cluster::data::Tags::default() {
            println!("    tags: {}", format_tags(&k.tags));
        }
        if !k.pending_restart.is_empty() {
            println!("    pending restart: {}", k.pending_restart.join(", "));
        }
        if let Some(a) = &k.archive {
            println!(
                "    archive ({}): {} archived, last {}; {} failed{}",
                a.mode,
                a.archived_count,
                a.last_archived_wal.as_deref().unwrap_or("-"),
                a.failed_count,
                match (&a.last_failed_wal, a.failing) {
                    (Some(w), true) => format!(", FAILING since {w}: WAL piles up in pg_wal"),
                    (Some(w), false) => format!(" (last {w})"),
                    _ => String::new(),
                }
            );
        }
        if let Some(b) = k.backup.as_ref().filter(|b| !b.ok) {
            println!("    last backup failed: {}", b.detail);
        }
        if let Some(sync) = k.synchronous_standbys.as_ref().filter(|a| !a.is_empty()) {
            let confirmed = k.sync_confirmed.clone().unwrap_or_default();
            println!(
                "    synchronous standbys: {} (confirmed: {})",
                sync.join(", "),
                if confirmed.is_empty() {
                    "none".into()
                } else {
                    confirmed.join(", ")
                }
            );
        }
    }
    println!();
    println!("{:<32} {:>10}", "PROXY", "GENERATION");
    for p in &s.proxies {
        println!("{:<32} {:>10}", p.uid, p.generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merge_patch_changes_only_what_it_names() {
        let mut v = serde_json::json!({"a": 1, "m": {"x": "1", "y": "2"}});
        merge_patch(
            &mut v,
            &serde_json::json!({"m": {"x": null, "z": "3"}, "b": true}),
        );
        assert_eq!(
            v,
            serde_json::json!({"a": 1, "b": true, "m": {"y": "2", "z": "3"}})
        );
    }

    #[test]
    fn spec_changes_say_what_needs_a_restart() {
        let old = ClusterSpec::default();
        let mut new = old.clone();
        new.fail_interval = std::time::Duration::from_secs(3);
        new.pg_parameters.insert("work_mem".into(), "64MB".into());
        let (lines, restart) = spec_changes(&old, &new, None);
        assert_eq!(
            lines,
            vec![
                r#"fail_interval: "5s" -> "3s""#.to_owned(),
                r#"pg_parameters.work_mem: (unset) -> "64MB" (reload)"#.into()
            ]
        );
        assert!(!restart);
        new.pg_parameters
            .insert("shared_buffers".into(), "1GB".into());
        assert!(spec_changes(&old, &new, None).1);
    }
}
