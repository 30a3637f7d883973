//! Process plumbing shared by the benchmark harnesses: start PostgreSQL
//! and other servers on free ports, as the `postgres` account when root,
//! and read a process's CPU time and memory from /proc.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child process, stopped with SIGTERM (then SIGKILL) on drop.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !keeper::process::terminate(&mut self.child, libc::SIGTERM, Duration::from_secs(5)) {
            eprintln!("{} had to be killed", self.name);
        }
    }
}

pub fn postgres_ids() -> Option<(u32, u32)> {
    keeper::pg::unprivileged_ids()
}

pub fn as_postgres(mut c: Command) -> Command {
    if let Some((uid, gid)) = postgres_ids() {
        c.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    c
}

pub fn chown(p: &Path) {
    if let Some((uid, gid)) = postgres_ids() {
        let _ = std::os::unix::fs::chown(p, Some(uid), Some(gid));
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

pub fn which(name: &str, apt: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    // SAFETY: no preconditions.
    if unsafe { libc::getuid() } == 0 {
        eprintln!("installing {apt}...");
        let ok = Command::new("sh")
            .args(["-c", &format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {apt} >/dev/null")])
            .status()?
            .success();
        if ok {
            return which(name, apt);
        }
    }
    bail!("{name} not found; install it with: apt-get install {apt}")
}

pub fn pg_bindir() -> Result<PathBuf> {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .context("pg_config not found")?;
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

pub fn wait_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not start listening on {port}")
}

/// utime+stime of a process and all its threads, in microseconds.
pub fn cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the comm.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    ticks * 1_000_000 / hz.max(1)
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Builds the release `keelson` binary and returns its path.
pub fn build_keelson() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "keelson", "--bin", "keelson"])
        .current_dir(&root)
        .status()?;
    if !status.success() {
        bail!("building keelson failed");
    }
    Ok(root.join("target/release/keelson"))
}

/// initdb into `dir/name` and start PostgreSQL on a free port with
/// `max_connections`. Returns the process and its port.
pub fn start_postgres(dir: &Path, name: &str, max_connections: u32) -> Result<(Proc, u16)> {
    let bindir = pg_bindir()?;
    chown(dir);
    let data = dir.join(name);
    let st = as_postgres(Command::new(bindir.join("initdb")))
        .args(["-U", "postgres", "-A", "trust", "--no-sync", "-D"])
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !st.success() {
        bail!("initdb failed");
    }
    let port = free_port();
    let proc = Proc {
        name: "postgres",
        child: as_postgres(Command::new(bindir.join("postgres")))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                &format!("max_connections={max_connections}"),
            ])
            .args([
                "-c",
                "shared_buffers=256MB",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
            ])
            .stderr(std::process::Stdio::null())
            .spawn()?,
    };
    wait_port(port, "postgres")?;
    // The port opens before PostgreSQL accepts sessions.
    std::thread::sleep(Duration::from_millis(500));
    Ok((proc, port))
}

/// Starts a single-member etcd on free loopback ports with its data in
/// `dir`; returns the process and the store URL.
pub fn start_etcd(dir: &Path) -> Result<(Proc, String)> {
    let (cp, pp) = (free_port(), free_port());
    let c = format!("http://127.0.0.1:{cp}");
    let p = format!("http://127.0.0.1:{pp}");
    let proc = Proc {
        name: "etcd",
        child: Command::new("etcd")
            .args(["--name", "default", "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &format!("default={p}")])
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("etcd not found (apt-get install etcd-server)")?,
    };
    wait_port(cp, "etcd")?;
    std::thread::sleep(Duration::from_secs(1));
    Ok((proc, format!("etcd://127.0.0.1:{cp}")))
}
