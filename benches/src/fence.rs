//! Fence benchmark: 1000 sessions on primary A, the cluster store switches
//! the primary to B, and we measure, from the moment of the store write:
//! - when each A session was closed (p50, p99, max over all sessions of all
//!   runs), each having received its FATAL 57P01;
//! - when the first new session was served by B (p50 and max over runs).
//!
//! Run: `cargo run --release -p keelson-benches --bin fence [-- --etcd] [--sessions N] [--runs N]
//! [--forwarding kernel|userspace]`
//! The keelson proxy is the release binary in store mode; the store is the
//! embedded file store, or a real etcd with `--etcd`. With `--forwarding
//! kernel` the sessions sit in the kernel's sockhash when the fence comes;
//! the proxy's own counters (from its admin listener) say which mode each
//! session used.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cluster::data::{Db, DbSpec, DbStatus, Role};
use cluster::{Cas, ClusterData, ClusterSpec, Keys, Store};
use keelson_benches::harness::{
    build_keelson, free_port, start_etcd, start_postgres, wait_port, Proc,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn startup_packet() -> Vec<u8> {
    let mut p = vec![0, 0, 0, 0, 0, 3, 0, 0];
    for s in ["user", "postgres", "database", "postgres"] {
        p.extend_from_slice(s.as_bytes());
        p.push(0);
    }
    p.push(0);
    let len = p.len() as u32;
    p[..4].copy_from_slice(&len.to_be_bytes());
    p
}

/// Opens a session and reads up to its first ReadyForQuery.
async fn open_session(port: u16) -> Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    s.write_all(&startup_packet()).await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while !got.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("closed during startup: {:?}", String::from_utf8_lossy(&got));
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(s)
}

/// The port of the server a new session lands on.
async fn landing_port(port: u16) -> Result<u16> {
    let mut s = open_session(port).await?;
    let q = b"SELECT inet_server_port()\0";
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&((q.len() + 4) as u32).to_be_bytes());
    msg.extend_from_slice(q);
    s.write_all(&msg).await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("closed");
        }
        got.extend_from_slice(&buf[..n]);
        // DataRow: 'D' len(4) nfields(2) flen(4) value
        if let Some(i) = got.iter().position(|&b| b == b'D') {
            if got.len() >= i + 11 {
                let flen =
                    u32::from_be_bytes([got[i + 7], got[i + 8], got[i + 9], got[i + 10]]) as usize;
                if got.len() >= i + 11 + flen {
                    let v = String::from_utf8_lossy(&got[i + 11..i + 11 + flen]).into_owned();
                    return v.parse().context("port");
                }
            }
        }
    }
}

/// The proxy's `keelson_sessions_forwarding_total` series, from its
/// admin listener's /metrics, as `mode/reason=N` pairs.
async fn forwarding_counters(admin_port: u16) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", admin_port)).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    let mut out = Vec::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("keelson_sessions_forwarding_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(k))
                .map(|v| v.trim_matches('"').to_string())
                .unwrap_or_default()
        };
        out.push(format!("{}/{}={value}", label("mode="), label("reason=")));
    }
    if out.is_empty() {
        bail!("the proxy's /metrics has no keelson_sessions_forwarding_total");
    }
    Ok(out.join(" "))
}

async fn set_master<S: Store>(store: &S, keys: &Keys, master: &str) -> Result<()> {
    loop {
        let kv = store
            .get(&keys.clusterdata())
            .await?
            .context("no clusterdata")?;
        let mut d = ClusterData::from_json(&kv.value)?;
        for (uid, db) in d.dbs.iter_mut() {
            db.spec.role = if uid == master {
                Role::Master
            } else {
                Role::Standby
            };
        }
        d.set_proxy_master(Some(master));
        if let Cas::Done(_) = store
            .put_if_revision(&keys.clusterdata(), &d.to_json(), kv.mod_revision, 0)
            .await?
        {
            return Ok(());
        }
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let arg =
        |name: &str, default: usize| value(name).and_then(|v| v.parse().ok()).unwrap_or(default);
    let sessions = arg("--sessions", 1000);
    let runs = arg("--runs", 5);
    let use_etcd = args.iter().any(|a| a == "--etcd");
    let forwarding = value("--forwarding").map_or("userspace", |v| v.as_str());
    // SAFETY: plain libc calls on an owned struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let keelson = build_keelson()?;
    let dir = tempfile::Builder::new()
        .prefix("keelson-fence-")
        .tempdir()?;
    let max = (sessions + 100) as u32;
    let (_a, a_port) = start_postgres(dir.path(), "a", max)?;
    let (_b, b_port) = start_postgres(dir.path(), "b", max)?;

    let mut _etcd = None;
    let url = if use_etcd {
        let (proc, url) = start_etcd(dir.path())?;
        _etcd = Some(proc);
        url
    } else {
        format!("file://{}", dir.path().join("store").display())
    };
    let store = loop {
        if let Ok(s) = cluster::open(&url).await {
            if s.get("/probe").await.is_ok() {
                break s;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let keys = Keys::new("keelson", "bench");
    let mut data = ClusterData::new(ClusterSpec::default());
    for (uid, port) in [("a", a_port), ("b", b_port)] {
        data.dbs.insert(
            uid.into(),
            Db {
                keeper: uid.into(),
                spec: DbSpec {
                    role: Role::Standby,
                    ..Default::default()
                },
                status: DbStatus {
                    healthy: true,
                    address: Some(format!("127.0.0.1:{port}")),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
    }
    store.put(&keys.clusterdata(), &data.to_json(), 0).await?;
    set_master(&store, &keys, "a").await?;

    let proxy_port = free_port();
    let admin_port = free_port();
    let _proxy = Proc {
        name: "keelson",
        child: std::process::Command::new(&keelson)
            .args([
                "proxy",
                "--store",
                &url,
                "--cluster",
                "bench",
                "--log",
                &std::env::var("FENCE_LOG").unwrap_or_else(|_| "warn".into()),
            ])
            .args(["--listen", &format!("127.0.0.1:{proxy_port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--forwarding", forwarding])
            .spawn()?,
    };
    wait_port(proxy_port, "keelson")?;

    let mut close_ms = Vec::new();
    let mut first_ms = Vec::new();
    let mut unclean = 0usize;
    let mut current = ("a", a_port);
    for run in 0..runs {
        let next = if current.0 == "a" {
            ("b", b_port)
        } else {
            ("a", a_port)
        };
        // Wait until new sessions land on the current primary.
        let deadline = Instant::now() + Duration::from_secs(30);
        while landing_port(proxy_port).await.ok() != Some(current.1) {
            if Instant::now() > deadline {
                bail!("sessions never reached {}", current.0);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut socks = Vec::with_capacity(sessions);
        for _ in 0..sessions {
            socks.push(open_session(proxy_port).await?);
        }
        let t0 = Instant::now();
        let mut waiters = Vec::new();
        for mut s in socks {
            waiters.push(tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 512];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let clean = got.first() == Some(&b'E') && got.windows(6).any(|w| w == b"C57P01");
                (t0.elapsed(), clean)
            }));
        }
        let prober = tokio::spawn(async move {
            loop {
                if landing_port(proxy_port).await.ok() == Some(next.1) {
                    return t0.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        set_master(&store, &keys, next.0).await?;
        let write_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut last = 0.0f64;
        for w in waiters {
            let (t, clean) = tokio::time::timeout(Duration::from_secs(30), w)
                .await
                .context("a session was never closed")??;
            let ms = t.as_secs_f64() * 1e3;
            last = last.max(ms);
            close_ms.push(ms);
            if !clean {
                unclean += 1;
            }
        }
        let first = tokio::time::timeout(Duration::from_secs(30), prober)
            .await
            .context("B never served")??;
        first_ms.push(first.as_secs_f64() * 1e3);
        eprintln!(
            "run {}: store write {write_ms:.1} ms, last {} session closed at {last:.1} ms, first {} session at {:.1} ms",
            run + 1,
            current.0,
            next.0,
            first.as_secs_f64() * 1e3
        );
        current = next;
    }
    let store_name = if use_etcd { "etcd" } else { "file store" };
    let counters = forwarding_counters(admin_port).await?;
    println!();
    println!("fence benchmark ({store_name}, forwarding = {forwarding}): {sessions} sessions x {runs} runs, times from the store write");
    println!("  sessions by forwarding mode: {counters}");
    println!(
        "  sessions closed:          p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} of {} without a clean FATAL 57P01)",
        pct(&mut close_ms, 0.5),
        pct(&mut close_ms, 0.99),
        pct(&mut close_ms, 1.0),
        unclean,
        close_ms.len()
    );
    println!(
        "  first session on new primary: p50 {:.1} ms  p99 {:.1} ms",
        pct(&mut first_ms, 0.5),
        pct(&mut first_ms, 0.99)
    );
    Ok(())
}
