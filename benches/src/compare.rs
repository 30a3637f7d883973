//! Side-by-side comparison: one PostgreSQL, and in front of it keelson
//! (user-space forwarding at the default and at one worker per CPU, and
//! kernel forwarding), HAProxy (`mode tcp`) and pgbouncer (session mode),
//! each on a free port.
//! Everything is measured in one run, interleaved, and printed as ratios.
//!
//! Run: `cargo run --release -p keelson-benches --bin compare [-- --quick]`
//!
//! For each target it prints:
//! - `pgbench -S` TPS at 16 clients, as a ratio to a direct connection;
//! - the proxy's CPU microseconds per transaction (utime+stime from /proc
//!   over a fixed transaction count);
//! - the machine's CPU per transaction (user, nice, system, irq and
//!   softirq of all cores from /proc/stat, steal and idle excluded) minus a
//!   direct connection's in the same round: a proxy's own process time
//!   hides the kernel work it causes elsewhere (softirq on other cores,
//!   wake-ups of the client and the server);
//! - the average latency added at 1 client;
//! - syscalls per transaction (strace -c -f), for keelson and HAProxy;
//! - resident memory per idle session with 2000 idle sessions open;
//! - COPY OUT throughput and the proxy's CPU seconds per GB.

use std::collections::BTreeMap;

use keelson_benches::harness::{
    as_postgres, build_keelson, chown, cpu_us, free_port, pg_bindir, rss_kib, start_postgres,
    wait_port, which, Proc,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

struct Target<'a> {
    name: &'a str,
    port: u16,
    /// The proxy process to measure; `None` for the direct connection.
    pid: Option<u32>,
}

struct PgbenchResult {
    tps: f64,
    latency_ms: f64,
    cpu_us_per_tx: Option<f64>,
    /// Every core's busy time (see the module's notes) per transaction.
    machine_us_per_tx: f64,
}

/// The machine's busy CPU time so far, in microseconds: user, nice,
/// system, irq and softirq of the `cpu` line of /proc/stat (guest time is
/// inside user; idle, iowait and steal are left out).
fn machine_busy_us() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|i| f.get(*i)).sum();
    busy * 1_000_000 / hz
}

fn pgbench(bindir: &Path, t: &Target, clients: u32, txns_per_client: u32) -> Result<PgbenchResult> {
    let cpu0 = t.pid.map(cpu_us);
    let machine0 = machine_busy_us();
    let out = Command::new(bindir.join("pgbench"))
        .args(["-n", "-S", "-h", "127.0.0.1", "-U", "postgres"])
        .args(["-p", &t.port.to_string()])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
        ])
        .args(["-t", &txns_per_client.to_string(), "postgres"])
        .output()?;
    let cpu1 = t.pid.map(cpu_us);
    let machine1 = machine_busy_us();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench via {} failed: {}{}",
            t.name,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let grab = |key: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let tps = grab("tps").context("no tps in pgbench output")?;
    let latency_ms = grab("latency average").context("no latency in pgbench output")?;
    let total = f64::from(clients * txns_per_client);
    let cpu_us_per_tx = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some((b - a) as f64 / total),
        _ => None,
    };
    Ok(PgbenchResult {
        tps,
        latency_ms,
        cpu_us_per_tx,
        machine_us_per_tx: machine1.saturating_sub(machine0) as f64 / total,
    })
}

fn syscalls_per_tx(bindir: &Path, t: &Target, dir: &Path) -> Result<f64> {
    let pid = t.pid.context("no process")?;
    let out = dir.join(format!("strace-{}.txt", t.name));
    let mut cmd = Command::new("strace");
    cmd.args(["-c", "-f", "-o"]).arg(&out);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        cmd.arg("-p").arg(task?.file_name());
    }
    let mut strace = cmd
        .stderr(Stdio::null())
        .spawn()
        .context("strace not found")?;
    std::thread::sleep(Duration::from_millis(500));
    let clients = 16;
    let per_client = 1000;
    let r = pgbench(bindir, t, clients, per_client);
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(strace.id() as i32, libc::SIGINT);
    }
    strace.wait()?;
    r?;
    let text = std::fs::read_to_string(&out)?;
    let total = text
        .lines()
        .find(|l| l.trim_end().ends_with("total"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<f64>().ok())
        .context("no total in strace output")?;
    Ok(total / f64::from(clients * per_client))
}

/// Opens `n` sessions (startup, trust auth, first ReadyForQuery) and keeps
/// them idle; returns the sockets.
fn open_idle_sessions(port: u16, n: usize) -> Result<Vec<TcpStream>> {
    let mut startup = Vec::new();
    startup.extend_from_slice(&0u32.to_be_bytes());
    startup.extend_from_slice(&(3u32 << 16).to_be_bytes());
    for (k, v) in [("user", "postgres"), ("database", "postgres")] {
        startup.extend_from_slice(k.as_bytes());
        startup.push(0);
        startup.extend_from_slice(v.as_bytes());
        startup.push(0);
    }
    startup.push(0);
    let len = startup.len() as u32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    let mut socks = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&startup)?;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
            let k = s.read(&mut buf).with_context(|| format!("session {i}"))?;
            if k == 0 {
                bail!(
                    "session {i} closed during startup: {:?}",
                    String::from_utf8_lossy(&got)
                );
            }
            got.extend_from_slice(&buf[..k]);
        }
        socks.push(s);
    }
    Ok(socks)
}

fn copy_out(bindir: &Path, t: &Target) -> Result<(f64, Option<f64>)> {
    let cpu0 = t.pid.map(cpu_us);
    let start = Instant::now();
    let out = Command::new(bindir.join("psql"))
        .args([
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-p", &t.port.to_string()])
        .args(["-c", "COPY bulk TO STDOUT"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdout = out.stdout.context("stdout")?;
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu1 = t.pid.map(cpu_us);
    let gb = bytes as f64 / 1e9;
    let cpu_per_gb = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some((b - a) as f64 / 1e6 / gb),
        _ => None,
    };
    Ok((gb / secs, cpu_per_gb))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Resident memory per idle session: each proxy's RSS before and after
/// `n` sessions are opened and left idle (bytes per session, and the RSS
/// after in KiB).
fn measure_idle<'a>(targets: &[Target<'a>], n: usize) -> Result<BTreeMap<&'a str, (f64, u64)>> {
    eprintln!("opening {n} idle sessions through each proxy...");
    let mut idle = BTreeMap::new();
    for t in targets.iter().filter(|t| t.pid.is_some()) {
        let pid = t.pid.unwrap_or(0);
        let before = rss_kib(pid);
        let socks = open_idle_sessions(t.port, n)?;
        std::thread::sleep(Duration::from_millis(500));
        let after = rss_kib(pid);
        idle.insert(
            t.name,
            (
                after.saturating_sub(before) as f64 * 1024.0 / n as f64,
                after,
            ),
        );
        drop(socks);
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(idle)
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    // Only the idle sessions' memory (for work on it; seconds, not minutes).
    let idle_only = std::env::args().any(|a| a == "--idle-only");
    let rounds = if quick { 1 } else { 5 };
    let idle_n = if quick { 500 } else { 2000 };
    let bindir = pg_bindir()?;
    let haproxy = which("haproxy", "haproxy")?;
    let pgbouncer = which("pgbouncer", "pgbouncer")?;
    which("strace", "strace")?;

    let keelson = build_keelson()?;
    let dir = tempfile::Builder::new()
        .prefix("keelson-compare-")
        .tempdir()?;
    let (_pg, pg_port) = start_postgres(dir.path(), "data", 2300)?;
    let psql = |port: u16, sql: &str| -> Result<()> {
        let st = Command::new(bindir.join("psql"))
            .args([
                "-X",
                "-q",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-p",
                &port.to_string(),
                "-c",
                sql,
            ])
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("psql failed: {sql}");
        }
        Ok(())
    };
    let copy_rows = if quick { 2_000_000 } else { 5_000_000 };
    if !idle_only {
        eprintln!("preparing pgbench data and a COPY table...");
        let st = Command::new(bindir.join("pgbench"))
            .args([
                "-i",
                "-q",
                "-s",
                "10",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
                &pg_port.to_string(),
                "postgres",
            ])
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("pgbench -i failed");
        }
        psql(
            pg_port,
            &format!("CREATE TABLE bulk AS SELECT g AS id, repeat(md5(g::text), 3) AS v FROM generate_series(1, {copy_rows}) g"),
        )?;
    }

    // keelson, with its default worker count (half the CPUs) and with one
    // worker per CPU (the default before it was measured).
    let start_keelson = |port: u16, workers: Option<&str>, forwarding: &str| -> Result<Proc> {
        let mut c = Command::new(&keelson);
        c.args(["proxy", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--forwarding", forwarding])
            .args([
                "--backend",
                &format!("127.0.0.1:{pg_port}"),
                "--log",
                "warn",
            ]);
        if let Some(w) = workers {
            c.args(["--workers", w]);
        }
        Ok(Proc {
            name: "keelson",
            child: c.spawn()?,
        })
    };
    let k_port = free_port();
    let keelson_proc = start_keelson(k_port, None, "userspace")?;
    // Kernel forwarding: plaintext sessions in a BPF sockhash.
    let kk_port = free_port();
    let kernel_proc = start_keelson(kk_port, None, "kernel")?;
    let k1_port = free_port();
    let ncpu = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    let keelson1_proc = start_keelson(k1_port, Some(&ncpu), "userspace")?;
    // HAProxy
    let h_port = free_port();
    let hcfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &hcfg,
        format!(
            "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
             listen pg\n  bind 127.0.0.1:{h_port}\n  server pg1 127.0.0.1:{pg_port}\n"
        ),
    )?;
    let haproxy_proc = Proc {
        name: "haproxy",
        child: Command::new(&haproxy)
            .arg("-f")
            .arg(&hcfg)
            .arg("-db")
            .stdout(Stdio::null())
            .spawn()?,
    };
    // pgbouncer
    let b_port = free_port();
    let bcfg = dir.path().join("pgbouncer.ini");
    let users = dir.path().join("userlist.txt");
    std::fs::write(&users, "\"postgres\" \"\"\n")?;
    std::fs::write(
        &bcfg,
        format!(
            "[databases]\n* = host=127.0.0.1 port={pg_port}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {b_port}\n\
             unix_socket_dir =\nauth_type = trust\nauth_file = {}\npool_mode = session\nmax_client_conn = 5000\n\
             default_pool_size = 2200\nmax_db_connections = 0\nignore_startup_parameters = extra_float_digits\n\
             logfile = {}\n",
            users.display(),
            dir.path().join("pgbouncer.log").display()
        ),
    )?;
    chown(&bcfg);
    chown(&users);
    let bouncer_proc = Proc {
        name: "pgbouncer",
        child: as_postgres(Command::new(&pgbouncer))
            .arg(&bcfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    };
    for (p, n) in [
        (k_port, "keelson"),
        (kk_port, "keelson-kernel"),
        (k1_port, "keelson-ncpu"),
        (h_port, "haproxy"),
        (b_port, "pgbouncer"),
    ] {
        wait_port(p, n)?;
    }
    let targets = [
        Target {
            name: "direct",
            port: pg_port,
            pid: None,
        },
        Target {
            name: "keelson",
            port: k_port,
            pid: Some(keelson_proc.child.id()),
        },
        Target {
            name: "keelson-kernel",
            port: kk_port,
            pid: Some(kernel_proc.child.id()),
        },
        Target {
            name: "keelson-ncpu",
            port: k1_port,
            pid: Some(keelson1_proc.child.id()),
        },
        Target {
            name: "haproxy",
            port: h_port,
            pid: Some(haproxy_proc.child.id()),
        },
        Target {
            name: "pgbouncer",
            port: b_port,
            pid: Some(bouncer_proc.child.id()),
        },
    ];

    if idle_only {
        for (name, (per, rss)) in measure_idle(&targets, idle_n)? {
            println!("{name:<15} idle B/session {per:>8.0}  (RSS after {rss} KiB)");
        }
        return Ok(());
    }
    // Warm up every path.
    for t in &targets {
        pgbench(&bindir, t, 16, 200)?;
    }
    let per_client = if quick { 2000 } else { 5000 };
    let mut tps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut cpu: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut lat: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    // Per round, each target's machine CPU per transaction.
    let mut machine: Vec<BTreeMap<&str, f64>> = Vec::new();
    for round in 0..rounds {
        machine.push(BTreeMap::new());
        eprintln!(
            "round {}/{rounds}: pgbench -S, 16 clients and 1 client",
            round + 1
        );
        // Rotate the order so that no target always runs first.
        let n = targets.len();
        for k in 0..n {
            let t = &targets[(k + round) % n];
            let r = pgbench(&bindir, t, 16, per_client)?;
            tps.entry(t.name).or_default().push(r.tps);
            machine[round].insert(t.name, r.machine_us_per_tx);
            if let Some(c) = r.cpu_us_per_tx {
                cpu.entry(t.name).or_default().push(c);
            }
            let r1 = pgbench(&bindir, t, 1, per_client / 2)?;
            lat.entry(t.name).or_default().push(r1.latency_ms);
        }
    }
    eprintln!("counting syscalls with strace...");
    let mut sys = BTreeMap::new();
    for t in targets
        .iter()
        .filter(|t| t.name.starts_with("keelson") || t.name == "haproxy")
    {
        sys.insert(t.name, syscalls_per_tx(&bindir, t, dir.path())?);
    }
    eprintln!("COPY OUT of the bulk table...");
    let mut copy = BTreeMap::new();
    for t in &targets {
        let mut best = (0.0f64, None);
        for _ in 0..2 {
            let r = copy_out(&bindir, t)?;
            if r.0 > best.0 {
                best = r;
            }
        }
        copy.insert(t.name, best);
    }
    let idle = measure_idle(&targets, idle_n)?;

    let direct_tps = median(tps["direct"].clone());
    let direct_lat = median(lat["direct"].clone());
    let hap_cpu = cpu.get("haproxy").cloned().unwrap_or_default();
    // CPU ratios are taken round by round (adjacent runs see the same
    // machine), then the median is reported.
    let cpu_ratio = |name: &str| -> Option<f64> {
        let mine = cpu.get(name)?;
        Some(median(
            mine.iter().zip(&hap_cpu).map(|(m, h)| m / h).collect(),
        ))
    };
    // Machine CPU added per transaction: the target's minus the direct
    // connection's in the same round; its ratio to HAProxy's, round by
    // round.
    let added = |name: &str| -> Vec<f64> {
        machine
            .iter()
            .filter_map(|r| Some(r.get(name)? - r.get("direct")?))
            .collect()
    };
    let hap_added = added("haproxy");
    let added_ratio = |name: &str| -> Option<f64> {
        let v: Vec<f64> = added(name)
            .iter()
            .zip(&hap_added)
            .filter(|(_, h)| **h > 0.0)
            .map(|(m, h)| m / h)
            .collect();
        (!v.is_empty()).then(|| median(v))
    };
    println!();
    println!("keelson comparison, {rounds} round(s), medians; PostgreSQL on 127.0.0.1:{pg_port}");
    println!(
        "{:<15} {:>10} {:>9} {:>12} {:>10} {:>14} {:>10} {:>14} {:>13} {:>11}",
        "target",
        "tps@16",
        "vs direct",
        "cpu µs/tx",
        "vs haproxy",
        "added lat µs",
        "syscalls/tx",
        "idle B/session",
        "copy GB/s",
        "cpu s/GB"
    );
    for t in &targets {
        let tp = median(tps[t.name].clone());
        let c = cpu.get(t.name).map(|v| median(v.clone()));
        let l = median(lat[t.name].clone());
        let (gbs, cpg) = copy[t.name];
        let fmt_opt = |v: Option<f64>, p: usize| v.map_or("-".to_owned(), |v| format!("{v:.p$}"));
        println!(
            "{:<15} {:>10.0} {:>9.3} {:>12} {:>10} {:>14.1} {:>10} {:>14} {:>13.3} {:>11}",
            t.name,
            tp,
            tp / direct_tps,
            fmt_opt(c, 2),
            fmt_opt(cpu_ratio(t.name), 3),
            (l - direct_lat) * 1000.0,
            fmt_opt(sys.get(t.name).copied(), 2),
            fmt_opt(idle.get(t.name).map(|i| i.0), 0),
            gbs,
            fmt_opt(cpg, 3),
        );
    }
    println!("(tps: pgbench -S -c 16 -t {per_client}; latency: -c 1; idle: {idle_n} sessions after startup; copy: {copy_rows} rows)");
    println!();
    println!(
        "{:<15} {:>16} {:>18} {:>10}",
        "target", "machine µs/tx", "added vs direct", "vs haproxy"
    );
    for t in &targets {
        let m: Vec<f64> = machine
            .iter()
            .filter_map(|r| r.get(t.name).copied())
            .collect();
        let a = added(t.name);
        println!(
            "{:<15} {:>16.2} {:>18} {:>10}",
            t.name,
            median(m),
            if t.name == "direct" {
                "-".to_owned()
            } else {
                format!("{:.2}", median(a))
            },
            added_ratio(t.name)
                .filter(|_| t.name != "direct")
                .map_or("-".to_owned(), |v| format!("{v:.3}")),
        );
    }
    println!(
        "(machine: user+nice+system+irq+softirq of all cores per transaction, pgbench -S -c 16)"
    );
    for name in ["keelson", "keelson-kernel", "keelson-ncpu", "pgbouncer"] {
        if let Some(mine) = cpu.get(name) {
            let per_round: Vec<String> = mine
                .iter()
                .zip(&hap_cpu)
                .map(|(m, h)| format!("{:.3}", m / h))
                .collect();
            println!("cpu vs haproxy per round, {name}: {}", per_round.join(" "));
        }
    }
    Ok(())
}
