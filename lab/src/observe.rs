//! Observers, from the lab's own namespace: every `clusterdata` revision,
//! every proxy's applied view, and in synchronous mode what the primary
//! runs with (`SHOW synchronous_standby_names`) against its spec.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster::{AnyStore, ClusterData, Keys, Store, WatchEvent};
use serde::Serialize;

use crate::workload::mono_ns;

/// A tiny HTTP GET: (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let a: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&a, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: lab\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

pub fn http_status(addr: &str, path: &str) -> Option<u16> {
    http_get(addr, path).map(|(s, _)| s)
}

/// One `clusterdata` revision.
#[derive(Debug, Clone, Serialize)]
pub struct Revision {
    pub at_ns: u64,
    pub revision: i64,
    pub generation: u64,
    pub master: Option<String>,
    pub failover: bool,
    pub master_timeline: Option<u32>,
}

/// One poll of a proxy's `/view`.
#[derive(Debug, Clone, Serialize)]
pub struct ViewSample {
    pub at_ns: u64,
    pub proxy: String,
    pub generation: u64,
    pub primary: Option<String>,
}

/// One look at the primary's synchronous settings.
#[derive(Debug, Clone, Serialize)]
pub struct SyncSample {
    pub at_ns: u64,
    pub primary: String,
    /// What the spec names, as PostgreSQL's value would read.
    pub wanted: String,
    /// `SHOW synchronous_standby_names`.
    pub running: String,
    /// The primary's address, as `inet_server_addr()` reads it.
    pub addr: String,
    /// `application_name` of every walsender in state `streaming`, read
    /// in the same session right after the `SHOW`.
    pub streaming: Vec<String>,
    /// When the look began (the sample's `at_ns` is when it ended).
    pub began_ns: u64,
}

#[derive(Debug, Default)]
pub struct Observed {
    pub revisions: Mutex<Vec<Revision>>,
    pub views: Mutex<Vec<ViewSample>>,
    pub sync: Mutex<Vec<SyncSample>>,
}

/// Observers running on the lab's runtime.
pub struct Observers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub seen: Arc<Observed>,
}

impl Observers {
    pub fn start(
        store: AnyStore,
        keys: Keys,
        proxies: Vec<(String, String)>,
        sockets: Vec<(String, String)>,
        sync: bool,
        leader_key: Option<String>,
    ) -> Observers {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Observed::default());
        let mut tasks = Vec::new();
        if let Some(key) = leader_key {
            // Patroni: who holds the leader key, polled.
            let (stop, seen, store) = (stop.clone(), seen.clone(), store.clone());
            tasks.push(tokio::spawn(async move {
                let mut last: Option<String> = None;
                let mut generation = 0;
                while !stop.load(Ordering::Relaxed) {
                    let now = store.get(&key).await.ok().flatten();
                    let master = now.as_ref().map(|kv| kv.value.clone());
                    if master != last {
                        generation += 1;
                        seen.revisions
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Revision {
                                at_ns: mono_ns(),
                                revision: now.map_or(0, |kv| kv.mod_revision),
                                generation,
                                master: master.clone(),
                                failover: false,
                                master_timeline: None,
                            });
                        last = master;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        } else {
            let (stop, seen, store, keys) =
                (stop.clone(), seen.clone(), store.clone(), keys.clone());
            tasks.push(tokio::spawn(async move {
                let mut from = 0;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut w) = store.watch(&keys.clusterdata(), from).await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    while let Some(Ok(ev)) = w.recv().await {
                        if let WatchEvent::Put(kv) = ev {
                            from = kv.mod_revision + 1;
                            if let Ok(d) = ClusterData::from_json(&kv.value) {
                                let master_timeline = d
                                    .proxy
                                    .master_db
                                    .as_ref()
                                    .and_then(|m| d.dbs.get(m))
                                    .map(|db| db.status.timeline);
                                seen.revisions
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(Revision {
                                        at_ns: mono_ns(),
                                        revision: kv.mod_revision,
                                        generation: d.proxy.generation,
                                        master: d.proxy.master_db.clone(),
                                        failover: d.failover.is_some(),
                                        master_timeline,
                                    });
                            }
                        }
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                }
            }));
        }
        {
            let (stop, seen) = (stop.clone(), seen.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    for (name, admin) in &proxies {
                        let admin = admin.clone();
                        let got = tokio::task::spawn_blocking(move || http_get(&admin, "/view"))
                            .await
                            .ok()
                            .flatten();
                        if let Some((200, body)) = got {
                            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                                seen.views.lock().unwrap_or_else(|e| e.into_inner()).push(
                                    ViewSample {
                                        at_ns: mono_ns(),
                                        proxy: name.clone(),
                                        generation: v["generation"].as_u64().unwrap_or(0),
                                        primary: v["primary"].as_str().map(str::to_owned),
                                    },
                                );
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }));
        }
        if sync {
            let (stop, seen, store, keys) = (stop.clone(), seen.clone(), store, keys);
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let Some(d) = store
                        .get(&keys.clusterdata())
                        .await
                        .ok()
                        .flatten()
                        .and_then(|kv| ClusterData::from_json(&kv.value).ok())
                    else {
                        continue;
                    };
                    let Some(m) = d.proxy.master_db.clone() else {
                        continue;
                    };
                    if d.failover.is_some() {
                        continue;
                    }
                    let Some(i) = m.strip_prefix('k').and_then(|n| n.parse::<usize>().ok()) else {
                        continue;
                    };
                    let Some((addr, sock)) = sockets.get(i - 1) else {
                        continue;
                    };
                    let wanted = keeper::names::synchronous_standby_names(
                        &d.dbs[&m].spec.synchronous_standbys,
                    );
                    let began_ns = mono_ns();
                    if let Some((running, streaming)) = show(sock).await {
                        seen.sync
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(SyncSample {
                                at_ns: mono_ns(),
                                primary: m,
                                wanted,
                                running,
                                addr: addr.clone(),
                                streaming,
                                began_ns,
                            });
                    }
                }
            }));
        }
        Observers { stop, tasks, seen }
    }

    pub async fn stop(self) -> Arc<Observed> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        self.seen
    }
}

/// `SHOW synchronous_standby_names` and the standbys streaming, in one
/// session.
async fn show(conn: &str) -> Option<(String, Vec<String>)> {
    let c = crate::workload::connect(conn).await?;
    let q = async {
        let names: String = c
            .query_one("SHOW synchronous_standby_names", &[])
            .await?
            .try_get(0)?;
        let rows = c
            .query(
                "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
                &[],
            )
            .await?;
        let streaming = rows.iter().filter_map(|r| r.try_get(0).ok()).collect();
        Ok::<_, tokio_postgres::Error>((names, streaming))
    };
    tokio::time::timeout(Duration::from_secs(2), q)
        .await
        .ok()?
        .ok()
}
