//! Replica routing: read-only TPS through keelson's replica route against
//! direct connections to the same standbys, measured side by side in one
//! run.
//!
//! One primary and two streaming standbys (pg_basebackup); keelson in
//! static mode with `--replicas` and `--replica-listen`. Each round runs,
//! interleaved:
//! - direct: `pgbench -S` with 8 clients on each standby at once (16 in all),
//!   TPS summed;
//! - keelson: `pgbench -S` with 16 clients on the replica port, which
//!   spreads them over the standbys by least sessions.
//!
//! Run: `cargo run --release -p keelson-benches --bin replicas [-- --rounds N]`

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use keelson_benches::harness::{
    as_postgres, build_keelson, cpu_us, free_port, pg_bindir, start_postgres, wait_port, Proc,
};

fn pgbench(bindir: &Path, port: u16, clients: u32, txns: u32) -> Result<std::process::Child> {
    Ok(Command::new(bindir.join("pgbench"))
        .args(["-n", "-S", "-h", "127.0.0.1", "-U", "postgres"])
        .args(["-p", &port.to_string()])
        .args(["-c", &clients.to_string(), "-j", "2"])
        .args(["-t", &txns.to_string(), "postgres"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

fn tps(child: std::process::Child) -> Result<f64> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    text.lines()
        .find(|l| l.starts_with("tps"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no tps in pgbench output")
}

/// A standby of the server on `primary_port`, by pg_basebackup -R.
fn start_standby(dir: &Path, name: &str, primary_port: u16) -> Result<(Proc, u16)> {
    let bindir = pg_bindir()?;
    let data = dir.join(name);
    let st = as_postgres(Command::new(bindir.join("pg_basebackup")))
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        ])
        .args(["-p", &primary_port.to_string(), "-D"])
        .arg(&data)
        .status()?;
    if !st.success() {
        bail!("pg_basebackup failed");
    }
    let port = free_port();
    let proc = Proc {
        name: "standby",
        child: as_postgres(Command::new(bindir.join("postgres")))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir)
            // A hot standby needs max_connections at least the primary's.
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "hot_standby=on"])
            .args(["-c", "max_connections=200", "-c", "shared_buffers=256MB"])
            .stderr(Stdio::null())
            .spawn()?,
    };
    wait_port(port, "standby")?;
    std::thread::sleep(Duration::from_millis(500));
    Ok((proc, port))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse())
        .transpose()
        .context("--rounds takes a number")?
        .unwrap_or(5);
    let bindir = pg_bindir()?;
    let keelson = build_keelson()?;
    let dir = tempfile::Builder::new()
        .prefix("keelson-replicas-")
        .tempdir()?;
    let (_primary, primary_port) = start_postgres(dir.path(), "primary", 200)?;
    eprintln!("preparing pgbench data...");
    let st = Command::new(bindir.join("pgbench"))
        .args(["-i", "-q", "-s", "10", "-h", "127.0.0.1", "-U", "postgres"])
        .args(["-p", &primary_port.to_string(), "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("pgbench -i failed");
    }
    let (_s1, p1) = start_standby(dir.path(), "standby1", primary_port)?;
    let (_s2, p2) = start_standby(dir.path(), "standby2", primary_port)?;
    let (listen, replica_listen) = (free_port(), free_port());
    let proxy = Proc {
        name: "keelson",
        child: Command::new(&keelson)
            .args(["proxy", "--workers", "2"])
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .args(["--replica-listen", &format!("127.0.0.1:{replica_listen}")])
            .args(["--backend", &format!("127.0.0.1:{primary_port}")])
            .args(["--replicas", &format!("127.0.0.1:{p1},127.0.0.1:{p2}")])
            .env("KEELSON_LOG", "warn")
            .spawn()?,
    };
    wait_port(replica_listen, "keelson")?;
    let pid = proxy.child.id();
    let txns = 2000;
    // Warm-up on every path.
    tps(pgbench(&bindir, replica_listen, 16, 200)?)?;
    tps(pgbench(&bindir, p1, 8, 200)?)?;
    let (mut direct, mut via, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let a = pgbench(&bindir, p1, 8, txns)?;
        let b = pgbench(&bindir, p2, 8, txns)?;
        let d = tps(a)? + tps(b)?;
        let c0 = cpu_us(pid);
        let k = tps(pgbench(&bindir, replica_listen, 16, txns)?)?;
        let c1 = cpu_us(pid);
        let us_per_tx = (c1 - c0) as f64 / f64::from(16 * txns);
        eprintln!(
            "round {round}/{rounds}: direct {d:.0} tps, keelson replica route {k:.0} tps ({:.3}), {us_per_tx:.1} µs CPU/tx",
            k / d
        );
        direct.push(d);
        via.push(k);
        cpu.push(us_per_tx);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (d, k, c) = (median(&mut direct), median(&mut via), median(&mut cpu));
    println!();
    println!("| target | tps@16 (median of {rounds}) | vs direct | proxy CPU µs/tx |");
    println!("|---|---|---|---|");
    println!("| direct to 2 standbys (8+8 clients) | {d:.0} | 1.000 | - |");
    println!(
        "| keelson replica route (16 clients) | {k:.0} | {:.3} | {c:.1} |",
        k / d
    );
    Ok(())
}
