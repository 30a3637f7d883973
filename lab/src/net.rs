//! Hosts made of network namespaces on one bridge, and the network faults
//! between them.
//!
//! Every object the lab makes carries its prefix (`klab`), so that
//! `lab cleanup` (and the start of every run) finds and removes what a
//! crashed run left: namespaces `klab-<host>`, veth links `kv-<host>`, the
//! bridge `klab0`, freezer cgroups under `klab/`, tmpfs mounts under the lab
//! directory.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub const BRIDGE: &str = "klab0";
pub const BRIDGE_ADDR: &str = "10.77.0.254";
const PREFIX: &str = "klab-";
const FREEZER: &str = "/sys/fs/cgroup/freezer/klab";

/// A host of the lab: a network namespace with one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub addr: String,
}

impl Host {
    pub fn new(name: &str, last_octet: u8) -> Host {
        Host {
            name: name.to_owned(),
            addr: format!("10.77.0.{last_octet}"),
        }
    }

    pub fn netns(&self) -> String {
        format!("{PREFIX}{}", self.name)
    }

    fn veth(&self) -> String {
        format!("kv-{}", self.name)
    }

    /// A command that runs inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns()]).arg(program);
        c
    }

    /// Runs `args` (iptables, tc, ...) inside the namespace.
    pub fn run(&self, args: &[&str]) -> Result<()> {
        sh(
            "ip",
            &[&["netns", "exec", &self.netns()][..], args].concat(),
        )
    }
}

/// Runs a command, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn sh_quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

/// Makes the bridge and one namespace per host, each with its address.
pub fn build(hosts: &[Host]) -> Result<()> {
    sh("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    sh(
        "ip",
        &["addr", "add", &format!("{BRIDGE_ADDR}/24"), "dev", BRIDGE],
    )?;
    sh("ip", &["link", "set", BRIDGE, "up"])?;
    for h in hosts {
        let ns = h.netns();
        sh("ip", &["netns", "add", &ns])?;
        sh(
            "ip",
            &[
                "link",
                "add",
                &h.veth(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns,
            ],
        )?;
        sh("ip", &["link", "set", &h.veth(), "master", BRIDGE, "up"])?;
        h.run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", h.addr),
            "dev",
            "eth0",
        ])?;
        h.run(&["ip", "link", "set", "eth0", "up"])?;
        h.run(&["ip", "link", "set", "lo", "up"])?;
    }
    Ok(())
}

/// Removes everything the lab made: processes in its namespaces, the
/// namespaces, links, bridge, freezer cgroups and tmpfs mounts under `dir`.
pub fn cleanup(dir: &Path) {
    thaw_all();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(ns) = line.split_whitespace().next() else {
                continue;
            };
            if !ns.starts_with(PREFIX) {
                continue;
            }
            if let Ok(pids) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: kill(2) has no memory effects.
                        unsafe {
                            libc::kill(pid, libc::SIGCONT);
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
            sh_quiet("ip", &["netns", "del", ns]);
        }
    }
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line
                .split(':')
                .nth(1)
                .map(|n| n.trim().split('@').next().unwrap_or(""))
            {
                if name.starts_with("kv-") {
                    sh_quiet("ip", &["link", "del", name]);
                }
            }
        }
    }
    sh_quiet("ip", &["link", "del", BRIDGE]);
    if let Ok(dirs) = std::fs::read_dir(FREEZER) {
        for d in dirs.flatten() {
            let _ = std::fs::remove_dir(d.path());
        }
    }
    let _ = std::fs::remove_dir(FREEZER);
    if let Ok(mounts) = std::fs::read_to_string("/proc/mounts") {
        let prefix = dir.display().to_string();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            sh_quiet("umount", &["-l", p]);
        }
    }
}

/// iptables in `host`: drop everything to and from `peers`.
pub fn cut(host: &Host, peers: &[&Host]) -> Result<()> {
    for p in peers {
        host.run(&["iptables", "-A", "OUTPUT", "-d", &p.addr, "-j", "DROP"])?;
        host.run(&["iptables", "-A", "INPUT", "-s", &p.addr, "-j", "DROP"])?;
    }
    Ok(())
}

/// iptables in `host`: drop what it sends to `peers` only (one-way loss).
pub fn cut_outgoing(host: &Host, peers: &[&Host]) -> Result<()> {
    for p in peers {
        host.run(&["iptables", "-A", "OUTPUT", "-d", &p.addr, "-j", "DROP"])?;
    }
    Ok(())
}

/// iptables in `host`: drop its PostgreSQL replication connections to
/// `primary` (the postgres account's TCP to port 5432).
pub fn cut_replication(host: &Host, primary: &Host) -> Result<()> {
    host.run(&[
        "iptables",
        "-A",
        "OUTPUT",
        "-d",
        &primary.addr,
        "-p",
        "tcp",
        "--dport",
        "5432",
        "-m",
        "owner",
        "--uid-owner",
        "postgres",
        "-j",
        "DROP",
    ])
}

/// iptables in `host`: drop a random share of its outgoing packets.
pub fn lossy(host: &Host, probability: f64) -> Result<()> {
    host.run(&[
        "iptables",
        "-A",
        "OUTPUT",
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        &format!("{probability:.3}"),
        "-j",
        "DROP",
    ])
}

/// Takes every network fault off `host`.
pub fn heal(host: &Host) {
    let ns = host.netns();
    sh_quiet("ip", &["netns", "exec", &ns, "iptables", "-F"]);
    sh_quiet(
        "ip",
        &[
            "netns", "exec", &ns, "tc", "qdisc", "del", "dev", "eth0", "root",
        ],
    );
    sh_quiet("ip", &["link", "set", &host.veth(), "up"]);
}

/// Takes `host` off the bridge (full isolation: TCP stalls, no RST).
pub fn isolate(host: &Host) -> Result<()> {
    sh("ip", &["link", "set", &host.veth(), "down"])
}

/// Freezes `pids` (and their threads) with the cgroup freezer.
pub fn freeze(group: &str, pids: &[u32]) -> Result<()> {
    let dir = Path::new(FREEZER).join(group);
    std::fs::create_dir_all(&dir).context("cannot make a freezer cgroup")?;
    for pid in pids {
        // A process that exited meanwhile is no reason to fail.
        let _ = std::fs::write(dir.join("cgroup.procs"), pid.to_string());
    }
    std::fs::write(dir.join("freezer.state"), "FROZEN").context("cannot freeze")?;
    Ok(())
}

pub fn thaw(group: &str) {
    let dir = Path::new(FREEZER).join(group);
    let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
}

fn thaw_all() {
    if let Ok(dirs) = std::fs::read_dir(FREEZER) {
        for d in dirs.flatten() {
            let _ = std::fs::write(d.path().join("freezer.state"), "THAWED");
            // Move the processes back to the root group.
            if let Ok(procs) = std::fs::read_to_string(d.path().join("cgroup.procs")) {
                for p in procs.lines() {
                    let _ = std::fs::write("/sys/fs/cgroup/freezer/cgroup.procs", p);
                }
            }
        }
    }
}

/// Enters `host`'s network namespace on the calling thread (sockets this
/// thread makes from now on belong to it).
pub fn enter(host: &Host) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/var/run/netns/{}", host.netns()))
        .with_context(|| format!("no namespace {}", host.netns()))?;
    // SAFETY: setns on a descriptor we own, for this thread only.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
