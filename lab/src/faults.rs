//! Applying and healing faults on a running lab.

use std::time::Duration;

use anyhow::{Context, Result};
use cluster::Store;

use crate::cluster::{Lab, Target};
use crate::net;
use crate::schedule::{FaultKind, Rng, Who};

/// What must be undone when a fault heals.
#[derive(Debug)]
pub enum Heal {
    Nothing,
    Restart(String),
    Cont(Vec<String>),
    ContPid(u32),
    Thaw(String),
    Net(Vec<usize>),
    Link(usize),
    UnthrottleVeth(String),
    /// Restart keeper `i` with its normal environment.
    Unskew(usize),
    RemoveFile(std::path::PathBuf),
    RestoreSpec,
}

/// A fault as applied: what it did, to whom.
#[derive(Debug)]
pub struct Applied {
    pub target: String,
    pub heal: Heal,
}

async fn pick(lab: &Lab, who: Who, rng: &mut Rng) -> usize {
    let p = lab.primary().await.unwrap_or(0);
    match who {
        Who::Primary => p,
        Who::Standby => {
            let others: Vec<usize> = (0..lab.nodes.len()).filter(|i| *i != p).collect();
            others[rng.below(others.len() as u64) as usize]
        }
    }
}

async fn sentinel_leader(lab: &Lab) -> String {
    lab.store
        .get(&lab.keys.leader())
        .await
        .ok()
        .flatten()
        .map(|kv| kv.value)
        .unwrap_or_else(|| "s1".into())
}

fn ctl(lab: &Lab, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(&lab.keelson)
        .args(["ctl", "--store", &lab.store_url, "--cluster", "lab"])
        .args(args)
        .output()?;
    Ok(crate::procs::output_text(&out))
}

/// Bytes free on the filesystem holding `path`.
fn free_bytes(path: &std::path::Path) -> u64 {
    let Ok(c) = std::ffi::CString::new(path.display().to_string()) else {
        return 0;
    };
    // SAFETY: statvfs writes into the struct we own.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return 0;
        }
        s.f_bavail as u64 * s.f_frsize as u64
    }
}

pub async fn apply(lab: &mut Lab, kind: FaultKind, rng: &mut Rng) -> Result<Applied> {
    use FaultKind::*;
    let (target, heal) = match kind {
        KillKeeper(who) => {
            let i = pick(lab, who, rng).await;
            let n = format!("k{}", i + 1);
            lab.proc(&n).kill();
            (n.clone(), Heal::Restart(n))
        }
        KillPostmaster(who) => {
            let i = pick(lab, who, rng).await;
            if let Some(pm) = lab.postmaster(i) {
                keeper::postmaster::kill_tree(pm);
            }
            (format!("postgres on n{}", i + 1), Heal::Nothing)
        }
        KillProxy => {
            let i = rng.below(lab.nodes.len() as u64) as usize;
            let n = format!("p{}", i + 1);
            lab.proc(&n).kill();
            (n.clone(), Heal::Restart(n))
        }
        KillSentinelLeader => {
            let n = sentinel_leader(lab).await;
            lab.proc(&n).kill();
            (n.clone(), Heal::Restart(n))
        }
        KillEtcdMember => {
            let i = rng.below(lab.etcds.len() as u64) as usize;
            let n = lab.etcds[i].name.clone();
            lab.proc(&n).kill();
            (n.clone(), Heal::Restart(n))
        }
        PauseKeeper(who) => {
            let i = pick(lab, who, rng).await;
            let n = format!("k{}", i + 1);
            lab.proc(&n).signal(libc::SIGSTOP);
            (n.clone(), Heal::Cont(vec![n]))
        }
        PausePostmaster(who) => {
            let i = pick(lab, who, rng).await;
            match lab.postmaster(i) {
                Some(pm) => {
                    keeper::postmaster::signal(pm, libc::SIGSTOP);
                    (format!("postgres on n{}", i + 1), Heal::ContPid(pm))
                }
                None => (
                    format!("postgres on n{} (not running)", i + 1),
                    Heal::Nothing,
                ),
            }
        }
        PauseProxy => {
            let i = rng.below(lab.nodes.len() as u64) as usize;
            let n = format!("p{}", i + 1);
            lab.proc(&n).signal(libc::SIGSTOP);
            (n.clone(), Heal::Cont(vec![n]))
        }
        PauseSentinelLeader => {
            let n = sentinel_leader(lab).await;
            lab.proc(&n).signal(libc::SIGSTOP);
            (n.clone(), Heal::Cont(vec![n]))
        }
        PauseEtcdMember => {
            let i = rng.below(lab.etcds.len() as u64) as usize;
            let n = lab.etcds[i].name.clone();
            lab.proc(&n).signal(libc::SIGSTOP);
            (n.clone(), Heal::Cont(vec![n]))
        }
        PauseAllEtcd | StoreBlip => {
            let names: Vec<String> = lab.etcds.iter().map(|e| e.name.clone()).collect();
            for n in &names {
                lab.proc(n).signal(libc::SIGSTOP);
            }
            ("all etcd members".into(), Heal::Cont(names))
        }
        FreezeNode(who) => {
            let i = pick(lab, who, rng).await;
            let pids = lab.node_pids(i);
            let group = format!("n{}", i + 1);
            net::freeze(&group, &pids)?;
            (group.clone(), Heal::Thaw(group))
        }
        IsolateNode(who) => {
            let i = pick(lab, who, rng).await;
            net::isolate(&lab.nodes[i])?;
            (format!("n{}", i + 1), Heal::Link(i))
        }
        CutFromStore(who) => {
            let i = pick(lab, who, rng).await;
            let peers: Vec<&net::Host> = lab.etcds.iter().chain(&lab.sentinel_hosts).collect();
            net::cut(&lab.nodes[i], &peers)?;
            (
                format!("n{} from etcd and sentinels", i + 1),
                Heal::Net(vec![i]),
            )
        }
        OneWayLoss(who) => {
            let i = pick(lab, who, rng).await;
            let peers: Vec<&net::Host> = lab.etcds.iter().chain(&lab.sentinel_hosts).collect();
            net::cut_outgoing(&lab.nodes[i], &peers)?;
            (
                format!("n{} to etcd and sentinels", i + 1),
                Heal::Net(vec![i]),
            )
        }
        EtcdMinority => {
            let i = rng.below(lab.etcds.len() as u64) as usize;
            let others: Vec<&net::Host> = lab
                .etcds
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, h)| h)
                .collect();
            for o in &others {
                lab.etcds[i].run(&[
                    "iptables", "-A", "OUTPUT", "-d", &o.addr, "-p", "tcp", "--dport", "2380",
                    "-j", "DROP",
                ])?;
                lab.etcds[i].run(&[
                    "iptables", "-A", "INPUT", "-s", &o.addr, "-p", "tcp", "--dport", "2380", "-j",
                    "DROP",
                ])?;
            }
            // Healed as a "node" index past the database nodes.
            (
                format!("{} cut from its peers", lab.etcds[i].name),
                Heal::Net(vec![100 + i]),
            )
        }
        CutReplication => {
            let p = lab.primary().await.unwrap_or(0);
            let i = pick(lab, Who::Standby, rng).await;
            net::cut_replication(&lab.nodes[i], &lab.nodes[p])?;
            (
                format!("n{} from n{} (replication)", i + 1, p + 1),
                Heal::Net(vec![i]),
            )
        }
        PacketLoss(who) => {
            let i = pick(lab, who, rng).await;
            net::lossy(&lab.nodes[i], 0.05)?;
            (format!("n{} 5% loss", i + 1), Heal::Net(vec![i]))
        }
        ThrottleStandby => {
            let i = pick(lab, Who::Standby, rng).await;
            // Shape what the bridge sends towards the standby.
            let veth = format!("kv-{}", lab.nodes[i].name);
            net::sh(
                "tc",
                &[
                    "qdisc", "replace", "dev", &veth, "root", "tbf", "rate", "256kbit", "burst",
                    "32kbit", "latency", "400ms",
                ],
            )?;
            (
                format!("n{} at 256 kbit/s", i + 1),
                Heal::UnthrottleVeth(veth),
            )
        }
        ClockSkew(who) => {
            let i = pick(lab, who, rng).await;
            let skew = if who == Who::Primary { "-3s" } else { "+3s" };
            let n = format!("k{}", i + 1);
            let patroni = lab.target == Target::Patroni;
            let p = lab.proc(&n);
            p.env = vec![
                (
                    "LD_PRELOAD".into(),
                    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1".into(),
                ),
                ("FAKETIME".into(), skew.into()),
                // keelson's timers are monotonic: leave that clock alone,
                // so only the wall clock is wrong. Python's sleep fails
                // with EINVAL under libfaketime 0.9.10 when the monotonic
                // clock is left alone (clock_nanosleep), so Patroni gets
                // both clocks offset, its only way to run skewed.
                (
                    "DONT_FAKE_MONOTONIC".into(),
                    if patroni { "0" } else { "1" }.into(),
                ),
            ];
            p.restart()?;
            (format!("{n} wall clock {skew}"), Heal::Unskew(i))
        }
        DiskFull(who) => {
            let i = pick(lab, who, rng).await;
            let dir = lab.node_dir(i);
            let fill = dir.join("fill");
            let free = free_bytes(&dir);
            let size = free.saturating_sub(1 << 20);
            net::sh(
                "fallocate",
                &["-l", &size.to_string(), &fill.display().to_string()],
            )?;
            (format!("n{} disk full", i + 1), Heal::RemoveFile(fill))
        }
        Switchover if lab.target == Target::Patroni => {
            let out = crate::patroni::patronictl(lab, &["switchover", "--force"])?;
            (
                format!(
                    "patronictl switchover: {}",
                    out.lines().last().unwrap_or("").trim()
                ),
                Heal::Nothing,
            )
        }
        Failkeeper if lab.target == Target::Patroni => {
            let to = pick(lab, Who::Standby, rng).await;
            let out = crate::patroni::patronictl(
                lab,
                &[
                    "failover",
                    "--candidate",
                    &format!("k{}", to + 1),
                    "--force",
                ],
            )?;
            (
                format!(
                    "patronictl failover to k{}: {}",
                    to + 1,
                    out.lines().last().unwrap_or("").trim()
                ),
                Heal::Nothing,
            )
        }
        SpecUpdate if lab.target == Target::Patroni => {
            let out = crate::patroni::patronictl(
                lab,
                &["edit-config", "--force", "-s", "retry_timeout=12"],
            )?;
            (
                format!(
                    "patronictl edit-config: {}",
                    out.lines().last().unwrap_or("").trim()
                ),
                Heal::RestoreSpec,
            )
        }
        Switchover => {
            let out = ctl(lab, &["switchover"])?;
            (format!("ctl switchover: {}", out.trim()), Heal::Nothing)
        }
        Failkeeper => {
            let p = lab.primary().await.unwrap_or(0);
            let out = ctl(lab, &["failkeeper", &format!("k{}", p + 1)])?;
            (
                format!(
                    "ctl failkeeper k{}: {}",
                    p + 1,
                    out.lines().last().unwrap_or("")
                ),
                Heal::Nothing,
            )
        }
        SpecUpdate => {
            // Longer proxy and fence timeouts at run time: the leases that
            // back them must follow (F2a).
            let mut spec: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(lab.dir.join("spec.json"))?)?;
            spec["proxy_timeout"] = "10s".into();
            spec["fence_timeout"] = "8s".into();
            let f = lab.dir.join("spec-update.json");
            std::fs::write(&f, spec.to_string())?;
            let out = ctl(lab, &["spec", "update", "--file", &f.display().to_string()])?;
            (format!("spec update: {}", out.trim()), Heal::RestoreSpec)
        }
    };
    Ok(Applied { target, heal })
}

pub async fn heal(lab: &mut Lab, a: &Applied) -> Result<()> {
    match &a.heal {
        Heal::Nothing => {}
        Heal::Restart(n) => lab
            .proc(n)
            .restart()
            .with_context(|| format!("restart {n}"))?,
        Heal::Cont(names) => {
            for n in names {
                lab.proc(n).signal(libc::SIGCONT);
            }
        }
        Heal::ContPid(pid) => keeper::postmaster::signal(*pid, libc::SIGCONT),
        Heal::Thaw(g) => net::thaw(g),
        Heal::Net(idx) => {
            for i in idx {
                match *i {
                    i if i >= 100 => net::heal(&lab.etcds[i - 100]),
                    i => net::heal(&lab.nodes[i]),
                }
            }
        }
        Heal::Link(i) => net::heal(&lab.nodes[*i]),
        Heal::UnthrottleVeth(v) => {
            let _ = net::sh("tc", &["qdisc", "del", "dev", v, "root"]);
        }
        Heal::Unskew(i) => {
            let n = format!("k{}", i + 1);
            let p = lab.proc(&n);
            p.env.clear();
            p.restart()?;
        }
        Heal::RemoveFile(f) => {
            let _ = std::fs::remove_file(f);
        }
        Heal::RestoreSpec if lab.target == Target::Patroni => {
            crate::patroni::patronictl(lab, &["edit-config", "--force", "-s", "retry_timeout=10"])?;
        }
        Heal::RestoreSpec => {
            let f = lab.dir.join("spec.json");
            ctl(lab, &["spec", "update", "--file", &f.display().to_string()])?;
        }
    }
    // Processes killed meanwhile by the fault (a keeper that exited on its
    // own) are started again.
    for p in lab.procs.iter_mut() {
        if !p.running() {
            let _ = p.start();
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}
