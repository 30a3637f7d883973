//! Failover benchmark: brings up a local cluster (one sentinel, two keepers,
//! one proxy, release binaries, default settings), kills the primary's
//! keeper and PostgreSQL with SIGKILL, and measures the seconds until the
//! first successful write through the proxy. Repeats on a fresh cluster and
//! prints min, median and max, and the acknowledged writes lost.
//!
//! Run: `cargo run --release -p keelson-benches --bin failover [-- --runs N] [--etcd]
//! [--fail-interval 2s] [--fence-timeout 1s] [--report-interval 500ms]`
//!
//! A standby is promoted only once the old primary's keeper has lost its
//! lease (`fence_timeout` + 0.5 s) or acknowledged its stop: with a killed
//! keeper, `fence_timeout` bounds the failover time from below, so a fast
//! `fail_interval` needs a short `fence_timeout` too.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cluster::{ClusterData, ClusterSpec, Keys, Store};
use keelson_benches::harness::{
    build_keelson, chown, free_port, pg_bindir, start_etcd, wait_port, Proc,
};

fn psql(bindir: &Path, port: u16, sql: &str) -> Option<String> {
    let out = Command::new(bindir.join("psql"))
        .args(["-X", "-qtA", "-c", sql])
        .arg(format!(
            "host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2"
        ))
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn one_run(
    keelson: &Path,
    bindir: &Path,
    etcd_url: Option<&str>,
    spec: &ClusterSpec,
) -> Result<(f64, i64)> {
    let dir = tempfile::Builder::new()
        .prefix("keelson-failover-")
        .tempdir()?;
    chown(dir.path());
    let url = match etcd_url {
        Some(u) => u.to_owned(),
        None => format!("file://{}", dir.path().join("store").display()),
    };
    let cluster_name = format!("f{}", free_port());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = rt.block_on(cluster::open(&url))?;
    let keys = Keys::new("keelson", &cluster_name);
    rt.block_on(store.put(
        &keys.clusterdata(),
        &ClusterData::new(spec.clone()).to_json(),
        0,
    ))?;
    let common = [
        "--store",
        url.as_str(),
        "--cluster",
        cluster_name.as_str(),
        "--log",
        "warn",
    ];
    let spawn = |name: &'static str, args: Vec<String>| -> Result<Proc> {
        Ok(Proc {
            name,
            child: Command::new(keelson)
                .args(args)
                .args(common)
                .stderr(Stdio::null())
                .spawn()?,
        })
    };
    let _sentinel = spawn(
        "sentinel",
        vec!["sentinel".into(), "--uid".into(), "s1".into()],
    )?;
    let ports = [free_port(), free_port()];
    let mut keepers = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let uid = format!("k{}", i + 1);
        keepers.push(Some(spawn(
            "keeper",
            vec![
                "keeper".into(),
                "--uid".into(),
                uid.clone(),
                "--data-dir".into(),
                dir.path().join(&uid).display().to_string(),
                "--pg-listen".into(),
                format!("127.0.0.1:{port}"),
                "--pg-repl-password".into(),
                "bench-secret".into(),
            ],
        )?));
    }
    let proxy_port = free_port();
    let _proxy = spawn(
        "proxy",
        vec![
            "proxy".into(),
            "--listen".into(),
            format!("127.0.0.1:{proxy_port}"),
            "--uid".into(),
            "p1".into(),
        ],
    )?;
    wait_port(proxy_port, "proxy")?;
    // Wait until both databases are healthy and the primary is named.
    let deadline = Instant::now() + Duration::from_secs(120);
    let master = loop {
        let d = rt
            .block_on(store.get(&keys.clusterdata()))?
            .and_then(|kv| ClusterData::from_json(&kv.value).ok());
        if let Some(d) = d {
            if d.dbs.values().filter(|db| db.status.healthy).count() == 2 {
                if let Some(m) = d.proxy.master_db.clone() {
                    break m;
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the cluster did not come up");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    psql(bindir, proxy_port, "CREATE TABLE w (x int)").context("create table through the proxy")?;
    let mi: usize = if master == "k1" { 0 } else { 1 };
    // Writes before the kill, each acknowledged.
    let mut acked = 0i64;
    for i in 0..50 {
        if psql(bindir, proxy_port, &format!("INSERT INTO w VALUES ({i})")).is_some() {
            acked += 1;
        }
    }
    let pid_file = dir.path().join(format!("{master}/pgdata/postmaster.pid"));
    let pgpid: i32 = std::fs::read_to_string(pid_file)?
        .lines()
        .next()
        .unwrap_or("0")
        .parse()?;
    let killed = Instant::now();
    if let Some(mut k) = keepers[mi].take() {
        let _ = k.child.kill();
        let _ = k.child.wait();
        std::mem::forget(k);
    }
    // SAFETY: killing the orphaned postmaster by pid.
    unsafe {
        libc::kill(pgpid, libc::SIGKILL);
    }
    loop {
        if psql(bindir, proxy_port, "INSERT INTO w VALUES (-1)").is_some() {
            break;
        }
        if killed.elapsed() > Duration::from_secs(120) {
            bail!("writes never resumed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = killed.elapsed().as_secs_f64();
    let present: i64 = psql(bindir, proxy_port, "SELECT count(*) FROM w WHERE x >= 0")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((secs, acked - present))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut spec = ClusterSpec::default();
    let flag = |name: &str| -> Result<Option<Duration>> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| {
                humantime::parse_duration(v)
                    .with_context(|| format!("{name} takes a duration like 2s"))
            })
            .transpose()
    };
    if let Some(d) = flag("--fail-interval")? {
        spec.fail_interval = d;
    }
    if let Some(d) = flag("--fence-timeout")? {
        spec.fence_timeout = d;
    }
    if let Some(d) = flag("--report-interval")? {
        spec.keeper_report_interval = d;
    }
    spec.validate()?;
    let keelson = build_keelson()?;
    let bindir = pg_bindir()?;
    let mut _etcd = None;
    let etcd_url = if args.iter().any(|a| a == "--etcd") {
        let dir = tempfile::tempdir()?;
        let (proc, url) = start_etcd(dir.path())?;
        _etcd = Some((proc, dir));
        Some(url)
    } else {
        None
    };
    let mut times = Vec::new();
    let mut lost = 0;
    for r in 0..runs {
        let (secs, l) = one_run(&keelson, &bindir, etcd_url.as_deref(), &spec)?;
        eprintln!(
            "run {}: writes resumed {secs:.2} s after SIGKILL; acknowledged writes lost: {l}",
            r + 1
        );
        times.push(secs);
        lost += l;
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let store = if etcd_url.is_some() {
        "etcd"
    } else {
        "file store"
    };
    println!(
        "failover ({store}, fail_interval {}, fence_timeout {}, keeper_report_interval {}, {runs} runs): min {:.2} s  median {:.2} s  max {:.2} s  acknowledged writes lost: {lost}",
        humantime::format_duration(spec.fail_interval),
        humantime::format_duration(spec.fence_timeout),
        humantime::format_duration(spec.keeper_report_interval),
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );
    Ok(())
}
