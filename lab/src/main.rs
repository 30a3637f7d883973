//! keelson's fault lab (run as root):
//!
//! ```text
//! lab run [--minutes M] [--seed S] [--store etcd|file] [--mode sync|async]
//!         [--target keelson|patroni] [--quick] [--dir DIR]
//! lab table [--dir DIR]
//! lab cleanup [--dir DIR]
//! ```
//!
//! `run` builds the hosts (network namespaces on a bridge), brings a
//! cluster up, runs the workload, applies the seeded schedule of faults
//! (fault, heal, settle), heals everything, waits for quiescence, and
//! checks the whole history. It prints the schedule as it goes and the
//! checker's table at the end, keeps every log and the history under
//! `DIR/results/`, and exits 1 on any violation. `--quick` runs every fault
//! class once with short durations (the CI subset). `table` prints a
//! Markdown table of every run kept under `DIR/results/`. `cleanup` removes
//! whatever a crashed run left behind.

mod check;
mod cluster;
mod faults;
mod net;
mod observe;
mod patroni;
mod procs;
mod schedule;
mod workload;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone)]
struct Args {
    command: String,
    minutes: f64,
    seed: u64,
    store: cluster::StoreKind,
    sync: bool,
    patroni: bool,
    quick: bool,
    dir: PathBuf,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        command: String::new(),
        minutes: 5.0,
        seed: 1,
        store: cluster::StoreKind::Etcd,
        sync: false,
        patroni: false,
        quick: false,
        dir: PathBuf::from("/var/lib/klab"),
    };
    let mut it = std::env::args().skip(1);
    a.command = it.next().unwrap_or_default();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--minutes" => a.minutes = value()?.parse().context("--minutes takes a number")?,
            "--seed" => a.seed = value()?.parse().context("--seed takes a number")?,
            "--store" => {
                a.store = match value()?.as_str() {
                    "etcd" => cluster::StoreKind::Etcd,
                    "file" => cluster::StoreKind::File,
                    other => bail!("--store is etcd or file, not {other:?}"),
                }
            }
            "--mode" => {
                a.sync = match value()?.as_str() {
                    "sync" => true,
                    "async" => false,
                    other => bail!("--mode is sync or async, not {other:?}"),
                }
            }
            "--target" => {
                a.patroni = match value()?.as_str() {
                    "patroni" => true,
                    "keelson" => false,
                    other => bail!("--target is keelson or patroni, not {other:?}"),
                }
            }
            "--quick" => a.quick = true,
            "--dir" => a.dir = PathBuf::from(value()?),
            other => bail!("unknown flag {other}; see the usage in lab/src/main.rs"),
        }
    }
    Ok(a)
}

fn keelson_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("KEELSON_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("keelson");
    if !bin.exists() {
        bail!(
            "no keelson binary next to {}: build it (cargo build -p keelson) or set KEELSON_BIN",
            exe.display()
        );
    }
    Ok(bin)
}

fn main() -> Result<()> {
    let args = parse()?;
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        bail!("the lab makes network namespaces and cgroups: run it as root");
    }
    match args.command.as_str() {
        "cleanup" => {
            net::cleanup(&args.dir.join("run"));
            println!("removed the lab's namespaces, links, cgroups and mounts");
            Ok(())
        }
        "table" => {
            print!("{}", table(&args.dir)?);
            Ok(())
        }
        "run" => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let violations = rt.block_on(run(args))?;
            if violations > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        _ => bail!("usage: lab run [--minutes M] [--seed S] [--store etcd|file] [--mode sync|async] [--target keelson|patroni] [--quick] | lab table | lab cleanup"),
    }
}

struct Clock(Instant);

impl Clock {
    fn s(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

async fn run(args: Args) -> Result<usize> {
    let target = if args.patroni {
        cluster::Target::Patroni
    } else {
        cluster::Target::Keelson
    };
    let run_dir = args.dir.join("run");
    let keelson = keelson_bin()?;
    let clock = Clock(Instant::now());
    let label = format!(
        "{} seed {} {} {} {}",
        if args.patroni { "patroni" } else { "keelson" },
        args.seed,
        if args.sync { "sync" } else { "async" },
        match args.store {
            cluster::StoreKind::Etcd => "etcd",
            cluster::StoreKind::File => "file",
        },
        if args.quick {
            "quick".to_owned()
        } else {
            format!("{} min", args.minutes)
        }
    );
    println!("lab: {label}: bringing up 3 nodes, 3 etcd, 2 sentinels, a client host");
    let mut lab = cluster::Lab::up(
        &run_dir, &keelson, args.store, args.sync, args.quick, target,
    )
    .await?;
    println!(
        "[{:6.1}] cluster up; primary n{}",
        clock.s(),
        lab.primary().await.map_or(0, |p| p + 1)
    );
    let result = drive(&mut lab, &args, &clock).await;
    let results = save(&lab, &args, &label);
    lab.down();
    let (report, steps) = result?;
    let text = report_text(&label, &report, &steps);
    print!("{text}");
    if let Some(dir) = results {
        let _ = std::fs::write(dir.join("report.txt"), &text);
        let _ = std::fs::write(
            dir.join("summary.json"),
            summary(&label, &args, &report, &steps).to_string(),
        );
        println!("report, history and logs: {}", dir.display());
    }
    Ok(report.violations().len())
}

type Outcome = (check::Report, Vec<check::Window>);

async fn drive(lab: &mut cluster::Lab, args: &Args, clock: &Clock) -> Result<Outcome> {
    let keelson = lab.target == cluster::Target::Keelson;
    let observers = observe::Observers::start(
        lab.store.clone(),
        lab.keys.clone(),
        if keelson {
            lab.nodes
                .iter()
                .enumerate()
                .map(|(i, h)| (format!("p{}", i + 1), format!("{}:9187", h.addr)))
                .collect()
        } else {
            Vec::new()
        },
        (0..lab.nodes.len())
            .map(|i| (lab.nodes[i].addr.to_string(), lab.socket_conn(i)))
            .collect(),
        lab.sync && keelson,
        (!keelson).then(|| "/service/lab/leader".to_owned()),
    );
    let wl = workload::Workload::start(
        &lab.client,
        workload::Targets {
            nodes: lab.nodes.clone(),
        },
        args.seed,
    )?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let steps = schedule::make(
        args.seed,
        args.minutes,
        args.quick,
        lab.store_kind == cluster::StoreKind::Etcd,
        keelson,
    );
    let mut rng = schedule::Rng::new(args.seed.wrapping_mul(31).wrapping_add(7));
    let mut windows = Vec::new();
    for step in &steps {
        let master_before = lab.primary().await.map(|i| format!("k{}", i + 1));
        let start_ns = workload::mono_ns();
        let applied = match faults::apply(lab, step.fault, &mut rng).await {
            Ok(a) => a,
            Err(e) => {
                println!(
                    "[{:6.1}] {:?}: could not apply: {e:#}",
                    clock.s(),
                    step.fault
                );
                continue;
            }
        };
        println!(
            "[{:6.1}] {:<28} {} for {:.1} s",
            clock.s(),
            step.fault.name(),
            applied.target,
            step.lasts.as_secs_f64()
        );
        tokio::time::sleep(step.lasts).await;
        if let Err(e) = faults::heal(lab, &applied).await {
            println!("[{:6.1}] heal failed: {e:#}", clock.s());
        }
        let healed_ns = workload::mono_ns();
        tokio::time::sleep(step.settle).await;
        let settled_ns = workload::mono_ns();
        let master_after = lab.primary().await.map(|i| format!("k{}", i + 1));
        windows.push(check::Window {
            master_after,
            kind: step.fault,
            target: applied.target,
            start_ns,
            healed_ns,
            settled_ns,
            master_before,
        });
    }
    println!("[{:6.1}] schedule done; waiting for quiescence", clock.s());
    let quiescent = lab.wait_healthy(Duration::from_secs(90)).await.is_ok();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ops = wl.stop();
    let seen = observers.stop().await;
    let fin = final_state(lab, quiescent).await;
    println!(
        "[{:6.1}] {} operations recorded; checking",
        clock.s(),
        ops.len()
    );
    std::fs::write(
        lab.dir.join("history.jsonl"),
        ops.iter()
            .filter_map(|o| serde_json::to_string(o).ok())
            .collect::<Vec<_>>()
            .join("\n"),
    )?;
    let revisions = seen
        .revisions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    std::fs::write(
        lab.dir.join("revisions.jsonl"),
        revisions
            .iter()
            .filter_map(|r| serde_json::to_string(r).ok())
            .collect::<Vec<_>>()
            .join("\n"),
    )?;
    let mode = check::Mode {
        sync: lab.sync,
        sync_observed: lab.sync && lab.target == cluster::Target::Keelson,
    };
    Ok((check::check(&ops, &seen, &windows, &fin, mode), windows))
}

async fn ids(conn: &str) -> Option<HashSet<i64>> {
    let c = workload::connect(conn).await?;
    let rows = tokio::time::timeout(
        Duration::from_secs(20),
        c.query("SELECT id FROM ledger", &[]),
    )
    .await
    .ok()?
    .ok()?;
    Some(rows.iter().filter_map(|r| r.try_get(0).ok()).collect())
}

async fn final_state(lab: &cluster::Lab, quiescent: bool) -> check::Final {
    let mut fin = check::Final {
        quiescent,
        ..Default::default()
    };
    let Some(p) = lab.primary().await else {
        fin.unreadable = Some("no primary named".into());
        return fin;
    };
    let Some(rows) = ids(&lab.socket_conn(p)).await else {
        fin.unreadable = Some(format!("cannot read the ledger on n{}", p + 1));
        return fin;
    };
    fin.bank_total =
        workload::query_i64(&lab.socket_conn(p), "SELECT sum(bal)::bigint FROM bank").await;
    fin.primary_timeline = workload::query_i64(
        &lab.socket_conn(p),
        "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int::bigint",
    )
    .await;
    let primary_addr = lab.nodes[p].addr.to_string();
    for i in (0..lab.nodes.len()).filter(|i| *i != p) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = None;
        while Instant::now() < deadline {
            if let Some(s) = ids(&lab.socket_conn(i)).await {
                let done = s == rows;
                got = Some(s);
                if done {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        fin.standby_rows.push((format!("n{}", i + 1), got));
        // What the standby's WAL receiver streams: from whom, on which
        // timeline.
        let rx = workload::query_i64(
            &lab.socket_conn(i),
            &format!(
                "SELECT received_tli::bigint FROM pg_stat_wal_receiver \
                 WHERE status = 'streaming' AND sender_host = '{primary_addr}'"
            ),
        )
        .await;
        fin.standby_timelines.push((format!("n{}", i + 1), rx));
    }
    fin.rows = rows;
    fin
}

/// Keeps the logs and the history of the run under `dir/results/<label>`.
fn save(lab: &cluster::Lab, args: &Args, label: &str) -> Option<PathBuf> {
    let dest = args.dir.join("results").join(label.replace(' ', "-"));
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest).ok()?;
    copy_logs(&lab.dir, &dest);
    Some(dest)
}

fn copy_logs(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_file() && (name.ends_with(".log") || name.ends_with(".jsonl")) {
            let _ = std::fs::copy(&p, to.join(&name));
        }
        if p.is_dir() && name.starts_with('n') {
            let pg = p.join("keeper").join("postgres.log");
            let _ = std::fs::copy(&pg, to.join(format!("{name}-postgres.log")));
            let g = p.join("keeper").join("fence-guard.log");
            let _ = std::fs::copy(&g, to.join(format!("{name}-fence-guard.log")));
        }
    }
}

fn report_text(label: &str, r: &check::Report, windows: &[check::Window]) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o);
    let _ = writeln!(o, "== lab report: {label} ==");
    let _ = writeln!(
        o,
        "{} faults; {} writes acknowledged, {} in doubt",
        windows.len(),
        r.acked,
        r.in_doubt
    );
    let (refused, doubt, all) = r.proxy_errors;
    let _ = writeln!(
        o,
        "client-visible errors through proxies: {} of {all} writes ({refused} refused, {doubt} in doubt)",
        refused + doubt
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "{:<40} {:<6} detail", "check", "result");
    for l in &r.lines {
        let _ = writeln!(
            o,
            "{:<40} {:<6} {}",
            l.check,
            if !l.ok {
                "FAIL"
            } else if l.limit {
                "limit"
            } else {
                "ok"
            },
            l.detail
        );
    }
    let (p50, p99) = check::percentiles(r.outages.iter().map(|(_, d)| *d).collect());
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "longest stretch without a write acknowledged through a proxy, per fault: p50 {:.1} s, p99 {:.1} s",
        p50.as_secs_f64(),
        p99.as_secs_f64()
    );
    for ((k, d), w) in r.outages.iter().zip(windows) {
        let _ = writeln!(
            o,
            "  {:<28} {:<40} fault {:4.1} s, no write for {:.1} s",
            k.name(),
            w.target.chars().take(40).collect::<String>(),
            (w.healed_ns - w.start_ns) as f64 / 1e9,
            d.as_secs_f64()
        );
    }
    let v = r.violations();
    let _ = writeln!(o);
    if v.is_empty() {
        let _ = writeln!(o, "no violations");
    } else {
        let _ = writeln!(o, "{} VIOLATIONS", v.len());
    }
    o
}

/// The figures of one run, for `lab table`.
fn summary(
    label: &str,
    args: &Args,
    r: &check::Report,
    windows: &[check::Window],
) -> serde_json::Value {
    let (p50, p99) = check::percentiles(r.outages.iter().map(|(_, d)| *d).collect());
    serde_json::json!({
        "label": label,
        "target": if args.patroni { "patroni" } else { "keelson" },
        "seed": args.seed,
        "mode": if args.sync { "sync" } else { "async" },
        "store": match args.store {
            cluster::StoreKind::Etcd => "etcd",
            cluster::StoreKind::File => "file",
        },
        "minutes": if args.quick { 0.0 } else { args.minutes },
        "faults": windows.len(),
        "acked": r.acked,
        "in_doubt": r.in_doubt,
        "lost": r.lost,
        "overlap_proxy_ms": r.overlap_ms.0,
        "overlap_direct_ms": r.overlap_ms.1,
        "proxy_refused": r.proxy_errors.0,
        "proxy_in_doubt": r.proxy_errors.1,
        "proxy_writes": r.proxy_errors.2,
        "outage_p50_s": p50.as_secs_f64(),
        "outage_p99_s": p99.as_secs_f64(),
        "violations": r.violations().iter().map(|l| format!("{}: {}", l.check, l.detail)).collect::<Vec<_>>(),
    })
}

/// A Markdown table of every run under `dir/results` with a summary.
fn table(dir: &Path) -> Result<String> {
    use std::fmt::Write;
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for e in std::fs::read_dir(dir.join("results"))
        .context("no results yet")?
        .flatten()
    {
        if let Ok(t) = std::fs::read_to_string(e.path().join("summary.json")) {
            if let Ok(v) = serde_json::from_str(&t) {
                rows.push(v);
            }
        }
    }
    rows.sort_by_key(|v| {
        (
            v["minutes"].as_f64().unwrap_or(0.0) == 0.0,
            v["seed"].as_u64(),
            v["target"].as_str().map(str::to_owned),
        )
    });
    let mut o = String::new();
    let _ = writeln!(
        o,
        "| target | seed | mode | store | min | faults | acked | in doubt | lost | two primaries, proxies (ms) | two primaries, direct (ms) | client errors (proxy writes) | no-write stretch p50 / p99 (s) | violations |"
    );
    let _ = writeln!(
        o,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for v in rows {
        let errs =
            v["proxy_refused"].as_u64().unwrap_or(0) + v["proxy_in_doubt"].as_u64().unwrap_or(0);
        let viol: Vec<String> = v["violations"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .map(|x| x.split(':').next().unwrap_or(x).to_owned())
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {} of {} | {:.1} / {:.1} | {} |",
            v["target"].as_str().unwrap_or("?"),
            v["seed"],
            v["mode"].as_str().unwrap_or("?"),
            v["store"].as_str().unwrap_or("?"),
            match v["minutes"].as_f64() {
                Some(m) if m > 0.0 => format!("{m}"),
                _ => "quick".into(),
            },
            v["faults"],
            v["acked"],
            v["in_doubt"],
            v["lost"],
            v["overlap_proxy_ms"].as_f64().unwrap_or(0.0),
            v["overlap_direct_ms"].as_f64().unwrap_or(0.0),
            errs,
            v["proxy_writes"],
            v["outage_p50_s"].as_f64().unwrap_or(0.0),
            v["outage_p99_s"].as_f64().unwrap_or(0.0),
            if viol.is_empty() { "none".to_owned() } else { viol.join("; ").replace('|', "/") },
        );
    }
    Ok(o)
}
