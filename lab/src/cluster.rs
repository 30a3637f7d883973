//! The topology and its bring-up: three database nodes (keeper +
//! PostgreSQL, and a proxy on the same host), three etcd members, two
//! sentinels and a client host, each in its own namespace with its own
//! address.
//!
//! ```text
//! bridge klab0 10.77.0.254 (the lab's own observers)
//! n1 n2 n3   10.77.0.11-13   keeper kN, PostgreSQL :5432, proxy pN :6432 (replicas :6433, admin :9187)
//! e1 e2 e3   10.77.0.21-23   etcd :2379 (peers :2380)
//! s1 s2      10.77.0.31-32   sentinels
//! c1         10.77.0.40      the workload
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cluster::{AnyStore, ClusterData, Keys, Store};

use crate::net::{self, Host};
use crate::procs::Proc;

/// Which store the cluster runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Etcd,
    /// One directory all hosts share (the file store is for one machine:
    /// network faults do not reach it).
    File,
}

/// The password of the lab's client role.
pub const LAB_PASSWORD: &str = "lab-secret";
/// Accounts the bank workload moves money between, and each one's start.
pub const ACCOUNTS: i32 = 10;
pub const START_BALANCE: i64 = 1000;

/// What runs on the database nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// keelson keepers, sentinels and a keelson proxy per node.
    Keelson,
    /// Patroni per node (members `k1`..`k3`, so that the rest of the lab
    /// names them alike) and an HAProxy per node in the proxy's place,
    /// health-checking Patroni's REST API as Patroni's docs recommend.
    Patroni,
}

/// A running lab.
pub struct Lab {
    pub target: Target,
    pub dir: PathBuf,
    pub nodes: Vec<Host>,
    pub etcds: Vec<Host>,
    pub sentinel_hosts: Vec<Host>,
    pub client: Host,
    pub procs: Vec<Proc>,
    pub store_kind: StoreKind,
    pub store_url: String,
    pub store: AnyStore,
    pub keys: Keys,
    pub keelson: PathBuf,
    pub sync: bool,
}

pub fn hosts() -> (Vec<Host>, Vec<Host>, Vec<Host>, Host) {
    let nodes = (1..=3)
        .map(|i| Host::new(&format!("n{i}"), 10 + i))
        .collect();
    let etcds = (1..=3)
        .map(|i| Host::new(&format!("e{i}"), 20 + i))
        .collect();
    let sentinels = (1..=2)
        .map(|i| Host::new(&format!("s{i}"), 30 + i))
        .collect();
    (nodes, etcds, sentinels, Host::new("c1", 40))
}

fn chown(p: &Path) {
    if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
        let _ = std::os::unix::fs::chown(p, Some(uid), Some(gid));
    }
}

impl Lab {
    pub fn etcd_member(i: usize, etcds: &[Host], dir: &Path, existing: bool) -> Proc {
        let h = &etcds[i];
        let cluster: Vec<String> = etcds
            .iter()
            .map(|e| format!("{}=http://{}:2380", e.name, e.addr))
            .collect();
        let args = vec![
            "--name".into(),
            h.name.clone(),
            "--data-dir".into(),
            dir.join(format!("etcd-{}", h.name)).display().to_string(),
            "--listen-client-urls".into(),
            format!("http://{}:2379", h.addr),
            "--advertise-client-urls".into(),
            format!("http://{}:2379", h.addr),
            "--listen-peer-urls".into(),
            format!("http://{}:2380", h.addr),
            "--initial-advertise-peer-urls".into(),
            format!("http://{}:2380", h.addr),
            "--initial-cluster".into(),
            cluster.join(","),
            "--initial-cluster-state".into(),
            if existing { "existing" } else { "new" }.into(),
            "--auto-compaction-retention".into(),
            "10m".into(),
        ];
        Proc::new(
            &h.name,
            h,
            "etcd",
            args,
            dir.join(format!("{}.log", h.name)),
        )
    }

    fn keelson_proc(&self, name: &str, host: &Host, args: Vec<String>) -> Proc {
        let mut all = args;
        all.extend([
            "--store".into(),
            self.store_url.clone(),
            "--cluster".into(),
            "lab".into(),
        ]);
        Proc::new(
            name,
            host,
            &self.keelson,
            all,
            self.dir.join(format!("{name}.log")),
        )
    }

    pub fn keeper_proc(&self, i: usize) -> Proc {
        let h = &self.nodes[i];
        let args = vec![
            "keeper".into(),
            "--uid".into(),
            format!("k{}", i + 1),
            "--data-dir".into(),
            self.node_dir(i).join("keeper").display().to_string(),
            "--pg-listen".into(),
            format!("{}:5432", h.addr),
            "--pg-repl-password-file".into(),
            self.dir.join("repl-password").display().to_string(),
            // The node API: the store-outage failsafe's promises between
            // keepers, and the proxies' questions to the primary's keeper.
            "--api-listen".into(),
            format!("{}:8008", h.addr),
        ];
        self.keelson_proc(&format!("k{}", i + 1), h, args)
    }

    pub fn proxy_proc(&self, i: usize) -> Proc {
        let h = &self.nodes[i];
        let args = vec![
            "proxy".into(),
            "--uid".into(),
            format!("p{}", i + 1),
            "--listen".into(),
            format!("{}:6432", h.addr),
            "--replica-listen".into(),
            format!("{}:6433", h.addr),
            "--admin-listen".into(),
            format!("{}:9187", h.addr),
        ];
        self.keelson_proc(&format!("p{}", i + 1), h, args)
    }

    pub fn sentinel_proc(&self, i: usize) -> Proc {
        let h = &self.sentinel_hosts[i];
        let args = vec!["sentinel".into(), "--uid".into(), format!("s{}", i + 1)];
        self.keelson_proc(&format!("s{}", i + 1), h, args)
    }

    /// The directory (a tmpfs of its own) of node `i` (0-based).
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{}", i + 1))
    }

    /// Makes node `i`'s directory a tmpfs of a fixed size (so that a
    /// disk-full fault is real), owned by the postgres account.
    pub fn mount_node_dir(&self, i: usize) -> Result<PathBuf> {
        let d = self.node_dir(i);
        std::fs::create_dir_all(&d)?;
        net::sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=768m",
                "tmpfs",
                &d.display().to_string(),
            ],
        )?;
        chown(&d);
        Ok(d)
    }

    pub fn proc(&mut self, name: &str) -> &mut Proc {
        let i = self
            .procs
            .iter()
            .position(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        &mut self.procs[i]
    }

    /// Brings the whole topology up and waits until a primary is named,
    /// both standbys stream, and every proxy is ready; then makes the
    /// client role and the workload's tables.
    pub async fn up(
        dir: &Path,
        keelson: &Path,
        store_kind: StoreKind,
        sync: bool,
        fast: bool,
        target: Target,
    ) -> Result<Lab> {
        if target == Target::Patroni && store_kind != StoreKind::Etcd {
            bail!("Patroni runs on etcd only");
        }
        net::cleanup(dir);
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        chown(dir);
        let (nodes, etcds, sentinel_hosts, client) = hosts();
        let all: Vec<Host> = nodes
            .iter()
            .chain(&etcds)
            .chain(&sentinel_hosts)
            .chain(std::iter::once(&client))
            .cloned()
            .collect();
        net::build(&all).context("cannot build the lab's network")?;
        let mut procs = Vec::new();
        let store_url = match store_kind {
            StoreKind::Etcd => {
                for i in 0..etcds.len() {
                    let mut p = Self::etcd_member(i, &etcds, dir, false);
                    p.start()?;
                    procs.push(p);
                }
                let urls: Vec<String> = etcds.iter().map(|e| format!("{}:2379", e.addr)).collect();
                format!("etcd://{}", urls.join(","))
            }
            StoreKind::File => {
                let d = dir.join("store");
                std::fs::create_dir_all(&d)?;
                format!("file://{}", d.display())
            }
        };
        let store = cluster::open(&store_url).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.put("/lab-probe", "x", 0).await.is_err() {
            if Instant::now() > deadline {
                bail!("the store never answered");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        std::fs::write(dir.join("repl-password"), "lab-repl-secret\n")?;
        let mut lab = Lab {
            target,
            dir: dir.to_owned(),
            nodes,
            etcds,
            sentinel_hosts,
            client,
            procs,
            store_kind,
            store_url,
            store,
            keys: Keys::new(cluster::store::DEFAULT_PREFIX, "lab"),
            keelson: keelson.to_owned(),
            sync,
        };
        // The quick (CI) schedule has short faults: a faster spec makes
        // them fail over too.
        if target == Target::Patroni {
            crate::patroni::start(&mut lab, fast)?;
            lab.wait_healthy(Duration::from_secs(240)).await?;
            lab.make_schema().await?;
            return Ok(lab);
        }
        let spec = if fast {
            serde_json::json!({
                "synchronous_replication": sync,
                // At least keeper_report_interval + REQUEST_TIMEOUT +
                // 1 s (docs/ha.md, "Timing relations"): a healthy keeper
                // whose request waits on a paused etcd member until its
                // client tries the next one is silent about 3.2 s.
                "fail_interval": "4s",
                "fence_timeout": "3s",
                "proxy_timeout": "3s",
            })
        } else {
            serde_json::json!({ "synchronous_replication": sync })
        };
        std::fs::write(dir.join("spec.json"), spec.to_string())?;
        let out = std::process::Command::new(keelson)
            .args([
                "ctl",
                "--store",
                &lab.store_url,
                "--cluster",
                "lab",
                "init",
                "--spec",
            ])
            .arg(dir.join("spec.json"))
            .output()?;
        if !out.status.success() {
            bail!("ctl init: {}", String::from_utf8_lossy(&out.stderr));
        }
        for i in 0..lab.sentinel_hosts.len() {
            let mut p = lab.sentinel_proc(i);
            p.start()?;
            lab.procs.push(p);
        }
        for i in 0..lab.nodes.len() {
            lab.mount_node_dir(i)?;
            let mut k = lab.keeper_proc(i);
            k.start()?;
            lab.procs.push(k);
            let mut p = lab.proxy_proc(i);
            p.start()?;
            lab.procs.push(p);
        }
        lab.wait_healthy(Duration::from_secs(180)).await?;
        lab.make_schema().await?;
        Ok(lab)
    }

    pub async fn data(&self) -> Option<ClusterData> {
        let kv = self.store.get(&self.keys.clusterdata()).await.ok()??;
        ClusterData::from_json(&kv.value).ok()
    }

    /// The 0-based index of the node named primary to proxies.
    pub async fn primary(&self) -> Option<usize> {
        let m = match self.target {
            Target::Keelson => self.data().await?.proxy.master_db?,
            Target::Patroni => crate::patroni::leader(self).await?,
        };
        m.strip_prefix('k')?.parse::<usize>().ok().map(|i| i - 1)
    }

    /// Where node `i`'s PostgreSQL keeps its data directory and socket.
    pub fn pg_dir(&self, i: usize) -> PathBuf {
        match self.target {
            Target::Keelson => self.node_dir(i).join("keeper"),
            Target::Patroni => self.node_dir(i),
        }
    }

    /// A superuser connection over node `i`'s local socket.
    pub fn socket_conn(&self, i: usize) -> String {
        format!(
            "host={} port=5432 user=postgres dbname=postgres connect_timeout=3",
            self.pg_dir(i).display()
        )
    }

    /// Waits until a primary is named and every other database streams
    /// from it, and every proxy answers `/readyz`.
    pub async fn wait_healthy(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(p) = self.primary().await {
                let streaming = crate::workload::query_i64(
                    &self.socket_conn(p),
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                )
                .await;
                let ready = self.nodes.iter().all(|h| match self.target {
                    Target::Keelson => {
                        crate::observe::http_status(&format!("{}:9187", h.addr), "/readyz")
                            == Some(200)
                    }
                    Target::Patroni => crate::patroni::answers(&format!("{}:6432", h.addr)),
                });
                if streaming == Some(self.nodes.len() as i64 - 1) && ready {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the lab cluster is not healthy after {limit:?}: {:?}",
                    self.data().await.map(|d| d.notice)
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn make_schema(&self) -> Result<()> {
        let p = self.primary().await.context("no primary")?;
        let sql = format!(
            "CREATE ROLE lab LOGIN SUPERUSER PASSWORD '{LAB_PASSWORD}';
             CREATE TABLE ledger (id bigint PRIMARY KEY, client text NOT NULL);
             CREATE TABLE bank (id int PRIMARY KEY, bal bigint NOT NULL);
             INSERT INTO bank SELECT g, {START_BALANCE} FROM generate_series(1, {ACCOUNTS}) g;"
        );
        let (c, conn) =
            tokio_postgres::connect(&self.socket_conn(p), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.batch_execute(&sql).await?;
        // Every standby has it before the workload starts.
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..self.nodes.len() {
            while crate::workload::query_i64(&self.socket_conn(i), "SELECT count(*) FROM bank")
                .await
                != Some(i64::from(ACCOUNTS))
            {
                if Instant::now() > deadline {
                    bail!("n{} never got the schema", i + 1);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// The postmaster of node `i`, from its pid file.
    pub fn postmaster(&self, i: usize) -> Option<u32> {
        keeper::postmaster::running_on(&self.pg_dir(i).join("pgdata"))
    }

    /// Every pid that belongs to node `i`: keeper, proxy, fence guard,
    /// postmaster and its children.
    pub fn node_pids(&mut self, i: usize) -> Vec<u32> {
        let mut pids = Vec::new();
        for name in [format!("k{}", i + 1), format!("p{}", i + 1)] {
            if let Some(p) = self.proc(&name).pid() {
                pids.push(p);
            }
        }
        if let Some(pm) = self.postmaster(i) {
            pids.push(pm);
            pids.extend(keeper::postmaster::children(pm));
        }
        // The fence guard is the keeper's child in its own group.
        if let Some(k) = self.proc(&format!("k{}", i + 1)).pid() {
            pids.extend(keeper::postmaster::children(k));
        }
        pids.sort();
        pids.dedup();
        pids
    }

    /// Stops everything and removes what the lab made.
    pub fn down(mut self) {
        for p in self.procs.iter_mut() {
            p.kill();
        }
        // Postmasters and guards are not the lab's children.
        net::cleanup(&self.dir);
        for i in 0..self.nodes.len() {
            if let Some(pm) = self.postmaster(i) {
                keeper::postmaster::kill_tree(pm);
            }
        }
        net::cleanup(&self.dir);
    }
}
