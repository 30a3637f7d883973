//! The keepers' and sentinels' node API (issue 13), checked with curl and
//! with a real HAProxy routing by it.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::ClusterSpec;

use crate::failover::LocalCluster;
use crate::support::{free_port, try_connect};

/// `curl` of `path` on `port` with `method`: the status (0 when nothing
/// answered) and the body.
fn curl(port: u16, path: &str, method: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-m", "5", "-o", "-", "-w", "\n%{http_code}"]);
    match method {
        "HEAD" => cmd.arg("-I"),
        "GET" => &mut cmd,
        m => cmd.args(["-X", m]),
    };
    let out = cmd.arg(&url).output().expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn code(port: u16, path: &str) -> u16 {
    curl(port, path, "GET").0
}

/// Issue 13: every keeper answers each check as what it is; HEAD and
/// OPTIONS answer like GET; a dead PostgreSQL under a live keeper turns
/// its checks 503 but not its liveness; synchronous and asynchronous
/// standbys are told apart; the sentinels say which one leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_api_answers_each_check_as_the_node_is() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up_with(&url, store, ClusterSpec::default(), 2, 3).await;
    let m = c.master;
    let ports = c.api_ports.clone();
    let api = move |i: usize| ports[i - 1];
    for i in 1..=3 {
        let primary = i == m;
        let (yes, no) = if primary { (200, 503) } else { (503, 200) };
        crate::assert_eventually!(
            code(api(i), "/primary") == yes && code(api(i), "/replica") == no,
            Duration::from_secs(15),
            "k{i}: /primary {} /replica {}",
            code(api(i), "/primary"),
            code(api(i), "/replica")
        );
        assert_eq!(code(api(i), "/master"), yes, "k{i}");
        assert_eq!(code(api(i), "/replica?lag=16MB"), no, "k{i}");
        assert_eq!(code(api(i), "/async"), no, "k{i}");
        assert_eq!(
            code(api(i), "/sync"),
            503,
            "k{i}: no synchronous replication"
        );
        for path in [
            "/read-only",
            "/health",
            "/liveness",
            "/readiness",
            "/status",
        ] {
            assert_eq!(code(api(i), path), 200, "k{i} {path}");
        }
        assert_eq!(code(api(i), "/replica?lag=ten"), 400);
        assert_eq!(code(api(i), "/nope"), 404);
        let (head, body) = curl(api(i), "/primary", "HEAD");
        assert_eq!(head, yes, "k{i}: HEAD /primary");
        assert!(body.starts_with("HTTP/1.1"), "only the head: {body}");
        assert_eq!(
            curl(api(i), "/replica", "OPTIONS"),
            (no, String::new()),
            "k{i}"
        );
        assert_eq!(curl(api(i), "/primary", "POST").0, 405);
        let (_, status) = curl(api(i), "/status", "GET");
        let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
        assert_eq!(status["uid"], format!("k{i}"));
        assert_eq!(status["role"], if primary { "master" } else { "standby" });
        assert_eq!(status["streaming"], !primary);
        let (_, metrics) = curl(api(i), "/metrics", "GET");
        assert!(
            metrics.contains(&format!(
                "keelson_keeper_primary{{uid=\"k{i}\"}} {}\n",
                u8::from(primary)
            )),
            "{metrics}"
        );
    }
    // The sentinels: one leads, both are healthy, /cluster is ctl status.
    let sentinel_ports = c.sentinel_api_ports.clone();
    let sentinel = move |i: usize| sentinel_ports[i - 1];
    crate::assert_eventually!(
        (1..=2)
            .filter(|i| code(sentinel(*i), "/leader") == 200)
            .count()
            == 1
            && (1..=2).all(|i| code(sentinel(i), "/health") == 200),
        Duration::from_secs(15),
        "sentinels: /leader {:?}",
        (1..=2)
            .map(|i| code(sentinel(i), "/leader"))
            .collect::<Vec<_>>()
    );
    let (_, cluster) = curl(sentinel(1), "/cluster", "GET");
    let cluster: serde_json::Value = serde_json::from_str(&cluster).expect("JSON");
    assert_eq!(
        cluster["keepers"].as_array().map(Vec::len),
        Some(3),
        "{cluster}"
    );
    assert_eq!(cluster["master"]["keeper"], format!("k{m}"));
    let (_, metrics) = curl(sentinel(1), "/metrics", "GET");
    assert!(
        metrics.contains("keelson_sentinel_leader{uid=\"s1\"}"),
        "{metrics}"
    );

    // A dead PostgreSQL under a live keeper (paused, so that the keeper
    // leaves it dead): its checks say so, and its liveness does not
    // (restarting the keeper would not help).
    c.ctl(&["pause"]).unwrap();
    let s = c.standbys()[0];
    c.kill_postgres(s);
    let t = Instant::now();
    crate::assert_eventually!(
        code(api(s), "/health") == 503 && code(api(s), "/replica") == 503,
        Duration::from_secs(10),
        "k{s} still answers as healthy"
    );
    assert_eq!(code(api(s), "/read-only"), 503);
    // A round may still see the killed postmaster's process before it is
    // gone ("not answering"); the next says stopped.
    crate::assert_eventually!(
        curl(api(s), "/status", "GET")
            .1
            .contains(r#""state":"stopped""#),
        Duration::from_secs(5),
        "k{s}'s status: {}",
        curl(api(s), "/status", "GET").1
    );
    eprintln!(
        "k{s}'s checks failed {:?} after its PostgreSQL died",
        t.elapsed()
    );
    assert_eq!(code(api(s), "/liveness"), 200);
    c.ctl(&["resume"]).unwrap();
    crate::assert_eventually!(
        code(api(s), "/replica") == 200,
        Duration::from_secs(30),
        "k{s} never came back"
    );

    // Synchronous mode: the confirmed member answers /sync, the other
    // standby /async.
    c.update_spec(|spec| spec.synchronous_replication = true)
        .await;
    crate::assert_eventually!(
        c.standbys()
            .iter()
            .filter(|i| code(api(**i), "/sync") == 200)
            .count()
            == 1
            && c.standbys()
                .iter()
                .filter(|i| code(api(**i), "/async") == 200)
                .count()
                == 1,
        Duration::from_secs(30),
        "/sync: {:?} /async: {:?}",
        c.standbys()
            .iter()
            .map(|i| code(api(*i), "/sync"))
            .collect::<Vec<_>>(),
        c.standbys()
            .iter()
            .map(|i| code(api(*i), "/async"))
            .collect::<Vec<_>>()
    );

    // After a failover, the new primary answers /primary and no one else.
    c.kill_primary();
    crate::assert_eventually!(
        (1..=3).filter(|i| code(api(*i), "/primary") == 200).count() == 1,
        Duration::from_secs(60),
        "no single keeper answers /primary after the failover"
    );
    let new = (1..=3).find(|i| code(api(*i), "/primary") == 200).unwrap();
    assert_ne!(new, m);
    let d = c.data().await;
    assert_eq!(d.proxy.master_db, Some(c.uid(new)));
}

/// The HAProxy example of docs/api.md, with keeper `i`'s PostgreSQL port
/// and API port, and the two listeners' ports, put in.
fn haproxy_config(c: &LocalCluster, primary: u16, replicas: u16) -> String {
    let doc = include_str!("../../docs/api.md");
    let start = doc.find("```haproxy\n").expect("the example") + "```haproxy\n".len();
    let end = start + doc[start..].find("```").expect("its end");
    doc[start..end]
        .lines()
        .map(|l| {
            let mut l = l
                .replace("bind 127.0.0.1:5000", &format!("bind 127.0.0.1:{primary}"))
                .replace("bind 127.0.0.1:5001", &format!("bind 127.0.0.1:{replicas}"));
            for i in 1..=c.ports.len() {
                if l.trim_start().starts_with(&format!("server k{i} ")) {
                    l = l
                        .replace(
                            &format!("10.0.0.{i}:5432"),
                            &format!("127.0.0.1:{}", c.ports[i - 1]),
                        )
                        .replace("port 8008", &format!("port {}", c.api_ports[i - 1]));
                }
            }
            l + "\n"
        })
        .collect()
}

/// What a client saw that opened a session, wrote one row and closed,
/// every 20 ms.
#[derive(Debug, Default)]
struct Attempts {
    /// When each attempt ended, and whether it wrote.
    log: Vec<(Instant, bool)>,
}

fn writer(
    conn: String,
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Attempts>>) {
    let seen = Arc::new(Mutex::new(Attempts::default()));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let ok = tokio::time::timeout(Duration::from_secs(10), async {
                let cl = try_connect(&conn).await.ok()?;
                cl.execute("INSERT INTO w VALUES (1)", &[]).await.ok()
            })
            .await
            .ok()
            .flatten()
            .is_some();
            s.lock().unwrap().log.push((Instant::now(), ok));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (task, seen)
}

/// Issue 13: HAProxy with `option httpchk` against the keepers' node API
/// (docs/api.md's example, used as it is) routes writes to the primary and
/// reads to standbys, and follows a failover (keeper and PostgreSQL of the
/// primary SIGKILLed). Measured beside keelson's proxy on the same
/// failover: failed attempts and the time to the first write after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_checking_the_node_api_follows_a_failover() {
    let Some(haproxy) = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        panic!("HAProxy is not installed; scripts/test installs it");
    };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let mut c = LocalCluster::up_with(&url, store, ClusterSpec::default(), 1, 3).await;
    let (primary_port, replica_port) = (free_port(), free_port());
    let cfg = c.dir.path().join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(&c, primary_port, replica_port)).unwrap();
    let log = std::fs::File::create(c.dir.path().join("haproxy.log")).unwrap();
    let mut hap = Command::new(haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("haproxy starts");
    let via = |port: u16| {
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5")
    };
    let landing = |conn: String| async move {
        let cl = try_connect(&conn).await.ok()?;
        let row = cl
            .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
            .await
            .ok()?;
        Some((row.get::<_, i32>(0) as u16, row.get::<_, bool>(1)))
    };
    let primary_pg = c.ports[c.master - 1];
    crate::assert_eventually!(
        landing(via(primary_port)).await == Some((primary_pg, false)),
        Duration::from_secs(15),
        "HAProxy never routed to the primary: {:?}",
        landing(via(primary_port)).await
    );
    crate::assert_eventually!(
        landing(via(replica_port))
            .await
            .is_some_and(|(p, recovery)| recovery && p != primary_pg),
        Duration::from_secs(15),
        "HAProxy never routed reads to a standby"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (h_task, h_seen) = writer(via(primary_port), stop.clone());
    let (k_task, k_seen) = writer(c.conn.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    c.kill_primary();
    let wrote_after = |a: &Mutex<Attempts>| {
        a.lock()
            .unwrap()
            .log
            .iter()
            .find(|(t, ok)| *ok && *t > killed + Duration::from_millis(100))
            .map(|(t, _)| *t - killed)
    };
    crate::assert_eventually!(
        wrote_after(&h_seen).is_some() && wrote_after(&k_seen).is_some(),
        Duration::from_secs(60),
        "no write after the failover: HAProxy {:?}, keelson {:?}",
        wrote_after(&h_seen),
        wrote_after(&k_seen)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = h_task.await;
    let _ = k_task.await;
    let failed = |a: &Mutex<Attempts>| {
        let a = a.lock().unwrap();
        let after: Vec<_> = a.log.iter().filter(|(t, _)| *t >= killed).collect();
        (after.iter().filter(|(_, ok)| !ok).count(), after.len())
    };
    let (h_failed, h_all) = failed(&h_seen);
    let (k_failed, k_all) = failed(&k_seen);
    eprintln!(
        "SIGKILL failover, one client writing every 20 ms:\n  \
         HAProxy + node API: first write after {:?}, {h_failed} of {h_all} attempts failed\n  \
         keelson proxy:      first write after {:?}, {k_failed} of {k_all} attempts failed",
        wrote_after(&h_seen).unwrap(),
        wrote_after(&k_seen).unwrap()
    );
    let new_pg = c.ports[c.index(c.data().await.proxy.master_db.as_deref().unwrap()) - 1];
    assert_eq!(
        landing(via(primary_port)).await,
        Some((new_pg, false)),
        "HAProxy routes writes to the new primary"
    );
    // keelson's proxy holds new clients while there is no primary: only
    // an attempt that was open on the dead primary can fail.
    assert!(
        k_failed <= 1,
        "{k_failed} attempts failed through keelson's proxy"
    );
    let _ = hap.kill();
    let _ = hap.wait();
}
