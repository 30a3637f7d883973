//! The store-outage failsafe (docs/ha.md): while the whole store is
//! unreachable the primary keeps serving, because every other keeper
//! promises not to promote; cut from the store and from its peers, it
//! fences within `fence_timeout`, and the standby promoted once the
//! primary's lease ends has every acknowledged write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::ClusterSpec;

use crate::failover::LocalCluster;
use crate::support::try_connect;
use crate::support::{EtcdServer, Link};

/// Writes through `conn` every 20 ms on one session, and every 500 ms on a
/// new session (clients that reconnect); records every acknowledged id
/// and every error.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    acked: Arc<Mutex<Vec<i32>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Load {
    fn start(conn: &str, first_id: i32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (lane, pause, reconnect) in [(0, 20, false), (1, 500, true)] {
            let (stop, acked, errors, conn) =
                (stop.clone(), acked.clone(), errors.clone(), conn.to_owned());
            tasks.push(tokio::spawn(async move {
                let mut id = first_id + lane * 10_000_000;
                let mut session = None;
                while !stop.load(Ordering::Relaxed) {
                    if session.is_none() || reconnect {
                        match tokio::time::timeout(Duration::from_secs(5), try_connect(&conn)).await
                        {
                            Ok(Ok(c)) => session = Some(c),
                            Ok(Err(e)) => {
                                errors.lock().unwrap().push(format!("connect: {e}"));
                                tokio::time::sleep(Duration::from_millis(pause)).await;
                                continue;
                            }
                            Err(_) => {
                                errors.lock().unwrap().push("connect: timed out".into());
                                continue;
                            }
                        }
                    }
                    id += 1;
                    let c = session.as_ref().unwrap();
                    let r = tokio::time::timeout(
                        Duration::from_secs(5),
                        c.execute("INSERT INTO w VALUES ($1)", &[&id]),
                    )
                    .await;
                    match r {
                        Ok(Ok(_)) => acked.lock().unwrap().push(id),
                        Ok(Err(e)) => {
                            errors.lock().unwrap().push(format!("insert {id}: {e}"));
                            session = None;
                        }
                        Err(_) => {
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("insert {id}: timed out"));
                            session = None;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }));
        }
        Load {
            stop,
            tasks,
            acked,
            errors,
        }
    }

    fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    async fn stop(self) -> (Vec<i32>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let acked = self.acked.lock().unwrap().clone();
        let errors = self.errors.lock().unwrap().clone();
        (acked, errors)
    }
}

/// Every member of etcd is stopped (SIGSTOP) for 60 s under a write load
/// through the proxy (proxy_timeout 3 s): no client sees an error, the
/// primary is never stopped, and nothing changes when etcd resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60s_etcd_outage_under_load_fails_no_client_and_never_stops_the_primary() {
    let etcd = EtcdServer::start().await;
    // The proxy's store lists the member three times, as a three-member
    // etcd would be listed: each request tries every endpoint before it
    // fails, so a renewal fails long after proxy_timeout (3 s) and the
    // proxy must ask the primary's keeper while its store requests still
    // hang, not after.
    let listed = format!(
        "etcd://127.0.0.1:{0},127.0.0.1:{0},127.0.0.1:{0}",
        etcd.port()
    );
    let store = cluster::open(&listed).await.unwrap();
    let spec = ClusterSpec {
        proxy_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let c = LocalCluster::up_with(&etcd.url(), store, spec, 1, 2).await;
    let primary = c.master;
    let pid = c.primary_pid();
    let before = c.data().await;
    let load = Load::start(&c.conn, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    etcd.pause();
    let t = Instant::now();
    let mut seen_serving = false;
    while t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The primary's node API says it serves on the promises, and the
        // standby's that it promised.
        if t.elapsed() > Duration::from_secs(10) && !seen_serving {
            let status = |i: usize| {
                let addr = format!("127.0.0.1:{}", c.api_ports[i - 1]);
                async move {
                    let (_, body) =
                        cluster::node_api::call(&addr, "GET", "/status", Duration::from_secs(2))
                            .await
                            .unwrap();
                    serde_json::from_str::<serde_json::Value>(&body).unwrap()
                }
            };
            let p = status(primary).await;
            let s = status(c.other()).await;
            assert!(p["failsafe_ms"].as_u64().unwrap() > 0, "{p}");
            assert!(s["promised_ms"].as_u64().unwrap() > 0, "{s}");
            seen_serving = true;
        }
        let errors = load.errors();
        if !errors.is_empty() {
            etcd.resume();
            panic!(
                "{:?} into the outage, clients saw errors: {errors:?}\nkeeper log:\n{}",
                t.elapsed(),
                c.keeper_log(primary)
            );
        }
    }
    etcd.resume();
    assert!(seen_serving);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (acked, errors) = load.stop().await;
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    assert_eq!(c.primary_pid(), pid, "the primary PostgreSQL was restarted");
    let log = c.keeper_log(primary);
    assert!(!log.contains("self-fencing"), "the primary fenced:\n{log}");
    assert!(
        log.contains("the failsafe"),
        "the failsafe never acted:\n{log}"
    );
    let after = c.data().await;
    assert_eq!(
        after.proxy, before.proxy,
        "no failover, no fencing generation"
    );
    assert!(after.failover.is_none());
    // Every acknowledged write is there.
    let cl = try_connect(&c.conn).await.unwrap();
    let n: i64 = cl
        .query_one("SELECT count(*) FROM w WHERE x = ANY($1)", &[&acked])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, acked.len());
    eprintln!(
        "60 s etcd outage: {} writes acknowledged, 0 client errors, primary pid unchanged",
        acked.len()
    );
}

/// The primary's keeper is cut from the store and from the other keeper's
/// node API, in synchronous mode, under load: it cannot get a promise, so
/// it fences within `fence_timeout`; the proxies stop routing to it; the
/// standby is promoted once the old primary's lease has ended, with every
/// acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_a_primary_cut_from_the_store_and_its_peers_fences_and_no_acknowledged_write_is_lost()
{
    let etcd = EtcdServer::start().await;
    let store_links = [
        Link::start(etcd.port()).await,
        Link::start(etcd.port()).await,
    ];
    let urls = store_links
        .iter()
        .map(|l| Some(format!("etcd://127.0.0.1:{}", l.port)))
        .collect();
    // Each keeper's node API is reached through a link of its own.
    let api_ports = [crate::support::free_port(), crate::support::free_port()];
    let api_links = [
        Link::start(api_ports[0]).await,
        Link::start(api_ports[1]).await,
    ];
    let args = (0..2)
        .map(|i| {
            vec![
                "--api-listen".to_owned(),
                format!("127.0.0.1:{}", api_ports[i]),
                "--api-advertise".to_owned(),
                format!("127.0.0.1:{}", api_links[i].port),
            ]
        })
        .collect();
    let store = cluster::open(&etcd.url()).await.unwrap();
    let spec = ClusterSpec {
        synchronous_replication: true,
        ..Default::default()
    };
    let fence = spec.fence_timeout;
    let mut c = LocalCluster::up_full(&etcd.url(), store, spec, 1, &["k1", "k2"], urls, args).await;
    let (old, new) = (c.master, c.other());
    c.wait_sync_confirmed(old, Duration::from_secs(30)).await;
    let load = Load::start(&c.conn, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The primary's node: no store, and no way to the other keeper.
    let cut = Instant::now();
    store_links[old - 1].cut();
    api_links[new - 1].cut();
    let direct = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=1",
        c.ports[old - 1]
    );
    let fenced = loop {
        let up = match try_connect(&direct).await {
            Ok(cl) => cl.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        };
        if !up {
            break cut.elapsed();
        }
        assert!(
            cut.elapsed() < fence + Duration::from_secs(10),
            "the old primary still answers {:?} after the cut:\n{}",
            cut.elapsed(),
            c.keeper_log(old)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The fence counts from the last renewal sent before the cut (at most
    // one renewal period, 1 s, earlier), and the guard looks every 50 ms.
    assert!(
        fenced <= fence + Duration::from_millis(500),
        "fenced {fenced:?} after the cut, fence_timeout {fence:?}"
    );
    // The keeper's fence thread or its guard process stopped it, whichever
    // looked first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = c.keeper_log(old);
    let guard = std::fs::read_to_string(c.dir.path().join(format!("k{old}/fence-guard.log")))
        .unwrap_or_default();
    assert!(
        log.contains("self-fencing") || guard.contains("stopping the primary"),
        "{log}\nguard:\n{guard}"
    );
    assert!(log.contains("not every other keeper promised"), "{log}");
    c.wait_new_primary(old, Duration::from_secs(40)).await;
    // The old primary may rejoin now: in synchronous mode the new one
    // takes commits once a standby streams from it.
    store_links[old - 1].heal();
    api_links[new - 1].heal();
    let (port, _) = c
        .next_write(
            "INSERT INTO w VALUES (-1) RETURNING inet_server_port()",
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(port, c.ports[new - 1]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (acked, _errors) = load.stop().await;
    let cl = try_connect(&c.conn).await.unwrap();
    let present: Vec<i32> = cl
        .query("SELECT x FROM w WHERE x = ANY($1)", &[&acked])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<&i32> = acked.iter().filter(|v| !present.contains(v)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    eprintln!(
        "cut from the store and its peers: fenced {fenced:?} after the cut (fence_timeout {fence:?}); \
         {} acknowledged writes, 0 lost",
        acked.len()
    );
    c.wait_standby(old).await;
}
