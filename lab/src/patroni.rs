//! The same lab with Patroni: Patroni 4.1.5 (from PyPI, in a virtualenv
//! the lab makes) on each database node, on the same etcd, with an HAProxy
//! per node in the keelson proxy's place. HAProxy health-checks Patroni's
//! REST API as Patroni's documentation recommends (`OPTIONS /primary` and
//! `/replica`, `inter 3s fall 3 rise 2 on-marked-down shutdown-sessions`).
//! Patroni runs with its default timing (`ttl` 30 s, `loop_wait` 10 s,
//! `retry_timeout` 10 s), as most users run it; no watchdog device.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use cluster::Store;

use crate::cluster::Lab;
use crate::procs::Proc;

pub const PATRONI_VERSION: &str = "4.1.5";

/// The virtualenv with Patroni, made on first use.
pub fn venv(dir: &Path) -> Result<PathBuf> {
    let v = dir.join("venv");
    let patroni = v.join("bin").join("patroni");
    let ok = Command::new(&patroni)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(PATRONI_VERSION));
    if ok {
        return Ok(v);
    }
    println!(
        "lab: installing Patroni {PATRONI_VERSION} from PyPI into {}",
        v.display()
    );
    // The system's Python: Patroni runs as the postgres account, which must
    // be able to read the interpreter (a per-user one, under /root, it
    // cannot; Patroni then starts no postgres).
    let st = Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(&v)
        .status()?;
    if !st.success() {
        bail!("/usr/bin/python3 -m venv failed (apt-get install python3-venv)");
    }
    let st = Command::new(v.join("bin").join("pip"))
        .args(["install", "-q"])
        .arg(format!("patroni[etcd3]=={PATRONI_VERSION}"))
        .arg("psycopg[binary]")
        .status()?;
    if !st.success() {
        bail!("pip install patroni failed");
    }
    Ok(v)
}

fn pg_bindir() -> String {
    Command::new("pg_config")
        .arg("--bindir")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into())
}

fn config(lab: &Lab, i: usize, fast: bool) -> String {
    let h = &lab.nodes[i];
    let dir = lab.pg_dir(i);
    let etcd: Vec<String> = lab
        .etcds
        .iter()
        .map(|e| format!("{}:2379", e.addr))
        .collect();
    let timing = if fast {
        // The quick schedule's faults are short: Patroni's smallest
        // consistent timing (loop_wait + 2 retry_timeout <= ttl).
        "ttl: 10\n    loop_wait: 2\n    retry_timeout: 4"
    } else {
        "ttl: 30\n    loop_wait: 10\n    retry_timeout: 10"
    };
    format!(
        r#"scope: lab
name: k{n}
restapi:
  listen: {addr}:8008
  connect_address: {addr}:8008
etcd3:
  hosts: {etcd}
bootstrap:
  dcs:
    {timing}
    synchronous_mode: {sync}
    postgresql:
      use_pg_rewind: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        max_wal_senders: 10
        max_replication_slots: 10
        wal_log_hints: "on"
  initdb:
    - encoding: UTF8
    - locale: C
postgresql:
  listen: {addr}:5432
  connect_address: {addr}:5432
  data_dir: {dir}/pgdata
  bin_dir: {bin}
  pgpass: {dir}/pgpass
  authentication:
    superuser:
      username: postgres
      password: lab-super
    replication:
      username: replicator
      password: lab-repl
    rewind:
      username: rewinder
      password: lab-rewind
  parameters:
    unix_socket_directories: '{dir}'
    password_encryption: scram-sha-256
  pg_hba:
    - local all all trust
    - host replication replicator 10.77.0.0/24 scram-sha-256
    - host all all 10.77.0.0/24 scram-sha-256
watchdog:
  mode: off
"#,
        n = i + 1,
        addr = h.addr,
        etcd = etcd.join(","),
        sync = lab.sync,
        dir = dir.display(),
        bin = pg_bindir(),
    )
}

fn haproxy_config(lab: &Lab, i: usize) -> String {
    let h = &lab.nodes[i];
    let servers = |port: u16| -> String {
        lab.nodes
            .iter()
            .enumerate()
            .map(|(j, n)| {
                format!(
                    "  server k{} {}:5432 maxconn 200 check port {port}\n",
                    j + 1,
                    n.addr
                )
            })
            .collect()
    };
    format!(
        "global\n  maxconn 2000\n\
         defaults\n  mode tcp\n  retries 2\n  timeout connect 3s\n  timeout client 30m\n  timeout server 30m\n  timeout check 2s\n\
         listen primary\n  bind {addr}:6432\n  option httpchk OPTIONS /primary\n  http-check expect status 200\n  default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions\n{p}\
         listen replicas\n  bind {addr}:6433\n  option httpchk OPTIONS /replica\n  http-check expect status 200\n  default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions\n{r}",
        addr = h.addr,
        p = servers(8008),
        r = servers(8008),
    )
}

/// Starts Patroni and HAProxy on every node.
pub fn start(lab: &mut Lab, fast: bool) -> Result<()> {
    if !Command::new("haproxy")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        bail!("the Patroni target needs HAProxy: apt-get install haproxy");
    }
    let v = venv(lab.dir.parent().unwrap_or(&lab.dir))?;
    for i in 0..lab.nodes.len() {
        let d = lab.mount_node_dir(i)?;
        let yml = d.join("patroni.yml");
        std::fs::write(&yml, config(lab, i, fast))?;
        let h = lab.nodes[i].clone();
        let mut k = Proc::new(
            &format!("k{}", i + 1),
            &h,
            "setpriv",
            vec![
                "--reuid=postgres".into(),
                "--regid=postgres".into(),
                "--init-groups".into(),
                "--".into(),
                v.join("bin").join("patroni").display().to_string(),
                yml.display().to_string(),
            ],
            lab.dir.join(format!("k{}.log", i + 1)),
        );
        k.start().context("cannot start Patroni")?;
        lab.procs.push(k);
        let cfg = d.join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(lab, i))?;
        let mut p = Proc::new(
            &format!("p{}", i + 1),
            &h,
            "haproxy",
            vec!["-f".into(), cfg.display().to_string(), "-db".into()],
            lab.dir.join(format!("p{}.log", i + 1)),
        );
        p.start().context("cannot start HAProxy")?;
        lab.procs.push(p);
    }
    Ok(())
}

/// The member holding Patroni's leader key.
pub async fn leader(lab: &Lab) -> Option<String> {
    lab.store
        .get("/service/lab/leader")
        .await
        .ok()
        .flatten()
        .map(|kv| kv.value)
}

/// Whether a TCP port answers.
pub fn answers(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>()
        .ok()
        .and_then(|a| {
            std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_millis(300)).ok()
        })
        .is_some()
}

/// `patronictl ARGS`, from the lab's own namespace.
pub fn patronictl(lab: &Lab, args: &[&str]) -> Result<String> {
    let v = lab.dir.parent().unwrap_or(&lab.dir).join("venv");
    let out = Command::new(v.join("bin").join("patronictl"))
        .arg("-c")
        .arg(lab.node_dir(0).join("patroni.yml"))
        .args(args)
        .output()?;
    Ok(crate::procs::output_text(&out))
}
