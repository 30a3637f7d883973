//! Workloads that record every operation: when it was invoked and when it
//! completed (`CLOCK_MONOTONIC`, which every namespace shares), its
//! outcome, and the server, timeline and LSN the statement itself
//! returned.
//!
//! - `proxy` writers insert unique ids through the proxies' primary route;
//! - `direct` writers insert unique ids straight into each node's
//!   PostgreSQL, bypassing the proxies (the promise to such clients is
//!   that an old primary stops before a new one takes writes);
//! - `bank` moves money between accounts through a proxy; every read of
//!   the total must give the same sum;
//! - `replica` readers read the newest ids through the proxies' replica
//!   route; no value read may be one that is later lost.
//!
//! The workload runs on threads that entered the client host's namespace.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_postgres::NoTls;

use crate::cluster::{ACCOUNTS, LAB_PASSWORD};
use crate::net::Host;

/// Nanoseconds on `CLOCK_MONOTONIC`.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged.
    Ok,
    /// Certainly not done (refused before it ran, or read-only).
    Fail,
    /// Unknown: the connection broke or timed out with it in flight.
    Info,
}

/// One operation of the history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    pub client: String,
    /// `proxy`, `direct`, `bank`, `replica`.
    pub kind: String,
    /// The id written, the total read, or the newest id read.
    pub value: i64,
    pub invoke_ns: u64,
    pub complete_ns: u64,
    pub outcome: Outcome,
    /// `inet_server_addr()` as the statement returned it.
    pub server: Option<String>,
    pub tli: Option<i32>,
    pub lsn: Option<String>,
    /// The error, when not Ok.
    pub error: Option<String>,
}

/// Where the workload goes.
#[derive(Debug, Clone)]
pub struct Targets {
    pub nodes: Vec<Host>,
}

fn conn(host: &str, port: u16) -> String {
    format!(
        "host={host} port={port} user=lab password={LAB_PASSWORD} dbname=postgres connect_timeout=2"
    )
}

/// The whole history of a run.
#[derive(Debug, Default, Clone)]
pub struct History {
    pub ops: Arc<Mutex<Vec<Op>>>,
}

impl History {
    fn push(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    pub fn snapshot(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A session within 3 s, its connection driven on the runtime.
pub async fn connect(c: &str) -> Option<tokio_postgres::Client> {
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(3), tokio_postgres::connect(c, NoTls))
            .await
            .ok()?
            .ok()?;
    tokio::spawn(connection);
    Some(client)
}

/// One value from a query, or `None`.
pub async fn query_i64(c: &str, sql: &str) -> Option<i64> {
    let client = connect(c).await?;
    tokio::time::timeout(Duration::from_secs(3), client.query_one(sql, &[]))
        .await
        .ok()?
        .ok()?
        .try_get(0)
        .ok()
}

/// The timeline is read from the name of the WAL file being written, which
/// changes at the promotion itself (the control file's checkpoint timeline
/// lags until the next checkpoint).
const INSERT: &str = "INSERT INTO ledger VALUES ($1, $2) \
     RETURNING inet_server_addr()::text, \
     ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int, \
     pg_current_wal_lsn()::text";

/// Is this a definite refusal (the statement did not run)?
fn definitely_not_done(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| {
        // read_only_sql_transaction: a standby refused it.
        d.code().code() == "25006"
    })
}

async fn writer(
    name: String,
    kind: &'static str,
    target: String,
    ids: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
    history: History,
) {
    while !stop.load(Ordering::Relaxed) {
        let Some(client) = connect(&target).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            let id = ids.fetch_add(1, Ordering::Relaxed);
            let invoke_ns = mono_ns();
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                client.query_one(INSERT, &[&id, &name]),
            )
            .await;
            let complete_ns = mono_ns();
            let mut op = Op {
                client: name.clone(),
                kind: kind.into(),
                value: id,
                invoke_ns,
                complete_ns,
                outcome: Outcome::Info,
                server: None,
                tli: None,
                lsn: None,
                error: None,
            };
            let broken = match r {
                Ok(Ok(row)) => {
                    op.outcome = Outcome::Ok;
                    op.server = row.try_get(0).ok();
                    op.tli = row.try_get(1).ok();
                    op.lsn = row.try_get(2).ok();
                    false
                }
                Ok(Err(e)) => {
                    op.outcome = if definitely_not_done(&e) {
                        Outcome::Fail
                    } else {
                        Outcome::Info
                    };
                    op.error = Some(e.to_string());
                    client.is_closed() || op.outcome == Outcome::Info
                }
                Err(_) => {
                    op.error = Some("no answer within 5 s".into());
                    true
                }
            };
            history.push(op);
            if broken {
                break;
            }
            // About 500 writes a second in all, leaving the 2-core host
            // room for the cluster; direct writers only probe.
            let pace = if kind == "direct" { 20 } else { 10 };
            tokio::time::sleep(Duration::from_millis(pace)).await;
        }
    }
}

async fn bank(name: String, target: String, stop: Arc<AtomicBool>, history: History, seed: u64) {
    let mut rng = crate::schedule::Rng::new(seed);
    while !stop.load(Ordering::Relaxed) {
        let Some(client) = connect(&target).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            let invoke_ns = mono_ns();
            let read = rng.below(3) == 0;
            let mut moved: Option<i32> = None;
            let r = if read {
                tokio::time::timeout(
                    Duration::from_secs(5),
                    client.query_one(
                        "SELECT sum(bal)::bigint, inet_server_addr()::text FROM bank",
                        &[],
                    ),
                )
                .await
                .map(|r| r.map(|row| (row.try_get::<_, i64>(0).ok(), row.try_get(1).ok())))
            } else {
                let a = 1 + rng.below(ACCOUNTS as u64) as i32;
                let b = 1 + rng.below(ACCOUNTS as u64) as i32;
                let amount = 1 + rng.below(50) as i64;
                // One simple query is one implicit transaction; its last
                // statement says where it ran, on which timeline.
                let sql = format!(
                    "UPDATE bank SET bal = bal - {amount} WHERE id = {a}; \
                     UPDATE bank SET bal = bal + {amount} WHERE id = {b}; \
                     SELECT inet_server_addr()::text, \
                     ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int::text"
                );
                tokio::time::timeout(Duration::from_secs(5), client.simple_query(&sql))
                    .await
                    .map(|r| {
                        r.map(|msgs| {
                            let row = msgs.iter().find_map(|m| match m {
                                tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
                                _ => None,
                            });
                            moved = row.and_then(|r| r.get(1)).and_then(|t| t.parse().ok());
                            (None, row.and_then(|r| r.get(0)).map(str::to_owned))
                        })
                    })
            };
            let complete_ns = mono_ns();
            let (outcome, value, server, error, broken) = match r {
                Ok(Ok((v, s))) => (Outcome::Ok, v.unwrap_or(-1), s, None, false),
                Ok(Err(e)) => (Outcome::Info, -1, None, Some(e.to_string()), true),
                Err(_) => (Outcome::Info, -1, None, Some("timeout".into()), true),
            };
            history.push(Op {
                client: name.clone(),
                kind: if read { "bank_read" } else { "bank_move" }.into(),
                value,
                invoke_ns,
                complete_ns,
                outcome,
                server,
                tli: moved,
                lsn: None,
                error,
            });
            if broken {
                break;
            }
        }
    }
}

async fn replica_reader(name: String, target: String, stop: Arc<AtomicBool>, history: History) {
    while !stop.load(Ordering::Relaxed) {
        let Some(client) = connect(&target).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            let invoke_ns = mono_ns();
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                client.query_one(
                    "SELECT coalesce(max(id), 0)::bigint, inet_server_addr()::text \
                     FROM ledger WHERE id < 1000000000",
                    &[],
                ),
            )
            .await;
            let complete_ns = mono_ns();
            let ok = matches!(r, Ok(Ok(_)));
            let (value, server) = match &r {
                Ok(Ok(row)) => (row.try_get(0).unwrap_or(0), row.try_get(1).ok()),
                _ => (0, None),
            };
            history.push(Op {
                client: name.clone(),
                kind: "replica".into(),
                value,
                invoke_ns,
                complete_ns,
                outcome: if ok { Outcome::Ok } else { Outcome::Info },
                server,
                tli: None,
                lsn: None,
                error: None,
            });
            if !ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A running workload; [`Workload::stop`] ends it and returns the history.
pub struct Workload {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub history: History,
}

/// Direct writers' ids start here, so that they never collide with the
/// proxies' (and the replica readers leave them out).
pub const DIRECT_IDS: i64 = 1_000_000_000;

impl Workload {
    pub fn start(client: &Host, targets: Targets, seed: u64) -> anyhow::Result<Workload> {
        let stop = Arc::new(AtomicBool::new(false));
        let history = History::default();
        let (s, h, client) = (stop.clone(), history.clone(), client.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("lab-workload".into())
            .spawn(move || {
                if let Err(e) = crate::net::enter(&client) {
                    let _ = tx.send(Err(e));
                    return;
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = tx.send(Ok(()));
                rt.block_on(run(targets, s, h, seed));
            })?;
        rx.recv()??;
        Ok(Workload {
            stop,
            thread: Some(thread),
            history,
        })
    }

    pub fn stop(mut self) -> Vec<Op> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.history.snapshot()
    }
}

async fn run(targets: Targets, stop: Arc<AtomicBool>, history: History, seed: u64) {
    let proxy_ids = Arc::new(AtomicI64::new(1));
    let direct_ids = Arc::new(AtomicI64::new(DIRECT_IDS));
    let mut tasks = Vec::new();
    for (i, h) in targets.nodes.iter().enumerate() {
        for j in 0..2 {
            tasks.push(tokio::spawn(writer(
                format!("w{}{}", i + 1, j),
                "proxy",
                conn(&h.addr, 6432),
                proxy_ids.clone(),
                stop.clone(),
                history.clone(),
            )));
        }
        tasks.push(tokio::spawn(writer(
            format!("d{}", i + 1),
            "direct",
            conn(&h.addr, 5432),
            direct_ids.clone(),
            stop.clone(),
            history.clone(),
        )));
        tasks.push(tokio::spawn(replica_reader(
            format!("r{}", i + 1),
            conn(&h.addr, 6433),
            stop.clone(),
            history.clone(),
        )));
    }
    for (i, h) in targets.nodes.iter().take(2).enumerate() {
        tasks.push(tokio::spawn(bank(
            format!("b{}", i + 1),
            conn(&h.addr, 6432),
            stop.clone(),
            history.clone(),
            seed.wrapping_add(i as u64),
        )));
    }
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Operations in flight end with what they got; give them a moment.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for t in tasks {
        t.abort();
    }
}
