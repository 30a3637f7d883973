//! `keelson ctl`: create and inspect a cluster's data in the store.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cluster::{AnyStore, Cas, ClusterData, ClusterSpec, Keys, Store};

/// Options shared by every `ctl` command.
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    #[command(flatten)]
    pub cluster: crate::roles::ClusterArgs,
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
    /// Planned switchover: hold new clients, stop the primary, promote a
    /// standby once it has everything, release the clients to it.
    Switchover {
        /// The standby to promote [default: the most advanced eligible one].
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum SpecCommand {
    /// Print the spec as JSON, defaults filled in.
    Show,
    /// Replace the spec with the one in FILE (JSON; missing fields take
    /// their defaults), by compare-and-swap.
    Update {
        #[arg(long)]
        file: PathBuf,
    },
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

fn lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
}

/// The `status --json` document.
pub async fn status_json(store: &AnyStore, keys: &Keys) -> Result<serde_json::Value> {
    let (data, _) = read(store, keys).await?;
    let master = data.proxy.master_db.as_ref().and_then(|m| data.dbs.get(m));
    let keepers: Vec<_> = data
        .dbs
        .values()
        .map(|db| {
            serde_json::json!({
                "uid": db.keeper,
                "role": db.spec.role.as_str(),
                "healthy": db.status.healthy,
                "address": db.status.address,
                "lsn": lsn(db.status.lsn),
                "lag_bytes": master.map(|m| m.status.lsn.saturating_sub(db.status.lsn)),
                "timeline": db.status.timeline,
            })
        })
        .collect();
    let (proxies, _) = store.list(&keys.proxies()).await?;
    let proxies: Vec<_> = proxies
        .iter()
        .filter_map(|kv| serde_json::from_str::<serde_json::Value>(&kv.value).ok())
        .map(|v| serde_json::json!({ "uid": v["uid"], "generation": v["generation"] }))
        .collect();
    Ok(serde_json::json!({
        "cluster": keys.base(),
        "phase": data.phase,
        "generation": data.proxy.generation,
        "master": master.map(|m| serde_json::json!({ "keeper": m.keeper, "address": m.status.address })),
        "keepers": keepers,
        "proxies": proxies,
    }))
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
    let store = cluster::open(&args.cluster.store).await?;
    let keys = args.cluster.keys();
    match args.command {
        CtlCommand::Init { spec } => {
            let spec: ClusterSpec = match spec {
                Some(path) => {
                    let text = std::fs::read_to_string(&path).with_context(|| {
                        format!("could not read the spec file {}", path.display())
                    })?;
                    serde_json::from_str(&text)
                        .with_context(|| format!("invalid spec in {}", path.display()))?
                }
                None => ClusterSpec::default(),
            };
            spec.validate()?;
            let data = ClusterData::new(spec);
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
        CtlCommand::Switchover { to } => loop {
            let kv = store.get(&keys.clusterdata()).await?.context(
                "the cluster has no data in the store; create it with `keelson ctl init`",
            )?;
            let mut data = ClusterData::from_json(&kv.value)?;
            let Some(from) = data.proxy.master_db.clone() else {
                bail!("the cluster has no primary to switch over from");
            };
            if data.failover.is_some() {
                bail!("a failover or switchover is already in progress; `keelson ctl status` shows it");
            }
            if let Some(t) = &to {
                match data.dbs.get(t) {
                    Some(db)
                        if db.spec.role == cluster::data::Role::Standby && db.status.healthy => {}
                    Some(_) => bail!("{t} is not a healthy standby"),
                    None => bail!("the cluster has no keeper {t}"),
                }
            }
            if sentinel::decide::choose_candidate(&data, &from).is_none() {
                bail!("no standby is eligible to take over from {from}");
            }
            data.set_proxy_master(None);
            data.failover = Some(cluster::data::Failover {
                from: from.clone(),
                fence_generation: data.proxy.generation,
                to: None,
                reason: cluster::data::SWITCHOVER.into(),
                requested: to.clone(),
            });
            if let Cas::Done(_) = store
                .put_if_revision(&keys.clusterdata(), &data.to_json(), kv.mod_revision, 0)
                .await?
            {
                println!("switchover from {from} started; new clients are held until the new primary takes them");
                break;
            }
        },
        CtlCommand::Failkeeper { uid } => failkeeper(&store, &keys, &uid).await?,
        CtlCommand::Spec(SpecCommand::Show) => {
            let (data, _) = read(&store, &keys).await?;
            println!("{}", serde_json::to_string_pretty(&data.spec)?);
        }
        CtlCommand::Spec(SpecCommand::Update { file }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("could not read the spec file {}", file.display()))?;
            let spec: ClusterSpec = serde_json::from_str(&text)
                .with_context(|| format!("invalid spec in {}", file.display()))?;
            spec.validate()?;
            update(&store, &keys, |d| {
                d.spec = spec.clone();
                Ok(())
            })
            .await?;
            println!("spec updated");
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
                d.keepers.remove(&uid);
                d.dbs.remove(&uid);
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
            let s = status_json(&store, &keys).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_table(&s);
            }
        }
    }
    Ok(())
}

fn print_table(s: &serde_json::Value) {
    let text = |v: &serde_json::Value| {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    };
    println!("cluster:    {}", text(&s["cluster"]));
    println!("phase:      {}", text(&s["phase"]));
    println!("generation: {}", s["generation"]);
    match s["master"].as_object() {
        Some(m) => println!(
            "primary:    {} at {}",
            text(&m["keeper"]),
            text(&m["address"])
        ),
        None => println!("primary:    none"),
    }
    println!();
    println!(
        "{:<16} {:<8} {:<8} {:<22} {:<12} {:>10} {:>8}",
        "KEEPER", "ROLE", "HEALTHY", "ADDRESS", "LSN", "LAG", "TIMELINE"
    );
    for k in s["keepers"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<8} {:<8} {:<22} {:<12} {:>10} {:>8}",
            text(&k["uid"]),
            text(&k["role"]),
            text(&k["healthy"]),
            text(&k["address"]),
            text(&k["lsn"]),
            text(&k["lag_bytes"]),
            text(&k["timeline"])
        );
    }
    println!();
    println!("{:<32} {:>10}", "PROXY", "GENERATION");
    for p in s["proxies"].as_array().into_iter().flatten() {
        println!("{:<32} {:>10}", text(&p["uid"]), text(&p["generation"]));
    }
}
