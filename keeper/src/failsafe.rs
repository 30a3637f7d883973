//! The store-outage failsafe (docs/ha.md, "When the store is down").
//!
//! A primary's keeper that cannot renew its lease would fence its primary
//! `fence_timeout` after its last renewal. With the failsafe on (the
//! spec's `failsafe`), it asks every other keeper of the newest cluster
//! data it read, over their node APIs, for a promise not to promote
//! (`POST /failsafe/promise?primary=<uid>`), and keeps serving for as long
//! as all of them give one:
//! - a keeper promises only while the newest cluster data it read names
//!   the asker primary, no failover or switchover is in progress, and its
//!   own database is not, and is not becoming, primary. Its promise lasts
//!   `fence_timeout + FENCE_SLACK` from when it received the request, on
//!   its own clock, and it does not promote before then, whatever the
//!   store says meanwhile;
//! - the asker counts each promise from when it *sent* the request (before
//!   the peer received it), minus the slack: its fence fires before the
//!   first promise ends, as it fires before its lease ends;
//! - a peer that does not answer, or refuses, means no extension: the
//!   fence fires at the end of the promises already given.
//!
//! Proxies that cannot confirm their view against the store ask the
//! primary's keeper (`GET /failsafe/route`) how long they may route to it:
//! until its fence fires, counted from when they sent the question.
//! The sentinel never promotes, in place of a primary whose keeper lost
//! its lease, a keeper that joined after the cluster data that primary last
//! reported reading (it was never asked).

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use cluster::data::{ClusterData, Role, FENCE_SLACK};
use cluster::file::boot_id;
use cluster::node_api::{query_param, Promise, Route, FAILSAFE_PROMISE_PATH};

use crate::lease::{now_ms, Lease};
use crate::node::{Answer, NodeSnapshot, NodeState};

/// What a keeper promised. Kept in `<data dir>/failsafe-promise` too
/// before it is given, so that a keeper restarted within a promise still
/// keeps it.
#[derive(Debug, Default)]
pub struct Promises(Mutex<Promised>, std::sync::OnceLock<std::path::PathBuf>);

#[derive(Debug, Default, Clone)]
struct Promised {
    /// No promotion before this (`CLOCK_BOOTTIME` ms).
    until_ms: u64,
    /// To whom.
    to: String,
    /// This keeper has begun promoting: it promises nothing any more.
    promoting: bool,
}

impl Promised {
    fn holding(&self) -> Option<String> {
        let now = now_ms();
        (now < self.until_ms).then(|| {
            format!(
                "this keeper promised {} (the failsafe) not to promote for another {} ms",
                self.to,
                self.until_ms - now
            )
        })
    }
}

impl Promises {
    fn lock(&self) -> std::sync::MutexGuard<'_, Promised> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps promises in `dir`, and takes in those an earlier run of this
    /// keeper gave. One given before the host rebooted (another boot id:
    /// its boot clock started again) counts its whole length from now.
    pub fn keep_in(&self, dir: &std::path::Path) {
        let path = dir.join("failsafe-promise");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let mut it = text.split_whitespace();
            let (boot, until, ms, to) = (it.next(), it.next(), it.next(), it.next());
            let until = until.and_then(|u| u.parse::<u64>().ok()).unwrap_or(0);
            let ms = ms.and_then(|u| u.parse::<u64>().ok()).unwrap_or(0);
            let until = if boot == Some(boot_id().as_str()) {
                until
            } else {
                now_ms() + ms
            };
            let mut p = self.lock();
            p.until_ms = p.until_ms.max(until);
            p.to = to.unwrap_or_default().to_owned();
            if until > now_ms() {
                tracing::warn!(
                    to = %p.to,
                    in_ms = until - now_ms(),
                    "an earlier run of this keeper promised not to promote (the failsafe); keeping it"
                );
            }
        }
        let _ = self.1.set(path);
    }

    /// Promises `to` not to promote for `ms` from now.
    fn give(&self, to: &str, ms: u64) -> Result<(), String> {
        let mut p = self.lock();
        if p.promoting {
            return Err("this keeper is promoting its database".into());
        }
        let until = p.until_ms.max(now_ms() + ms);
        if let Some(path) = self.1.get() {
            let text = format!("{} {until} {ms} {to}\n", boot_id());
            write_durably(path, &text)
                .map_err(|e| format!("cannot record the promise in {}: {e}", path.display()))?;
        }
        p.until_ms = until;
        p.to = to.to_owned();
        Ok(())
    }

    /// Before promoting: fails while a promise holds; after it succeeds no
    /// promise is given until [`Promises::end_promotion`].
    pub fn begin_promotion(&self) -> Result<(), String> {
        let mut p = self.lock();
        if let Some(why) = p.holding() {
            return Err(why);
        }
        p.promoting = true;
        Ok(())
    }

    /// Why this keeper may not promote yet, while a promise holds.
    pub fn holding(&self) -> Option<String> {
        self.lock().holding()
    }

    /// This keeper's database is not to be primary (any more).
    pub fn end_promotion(&self) {
        self.lock().promoting = false;
    }

    /// Until when a promise holds (0: none was given).
    pub fn until_ms(&self) -> u64 {
        self.lock().until_ms
    }
}

/// Writes `text` to `path` through a synced temporary file.
fn write_durably(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    // The rename is durable only once the directory is.
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn refuse(status: u16, why: String) -> Answer {
    Answer::json(status, serde_json::json!({ "refused": why }).to_string())
}

/// How long this keeper may promise `primary` not to promote, by what it
/// knows (its snapshot `s`), or why it may not.
fn promisable(s: &NodeSnapshot, primary: &str) -> Result<Duration, String> {
    let Some(d) = s.data.as_deref() else {
        return Err("this keeper has read no cluster data".into());
    };
    if !d.spec.failsafe {
        return Err("the failsafe is off in the cluster spec".into());
    }
    if d.proxy.master_db.as_deref() != Some(primary) {
        return Err(format!(
            "the newest cluster data this keeper read names {} primary, not {primary}",
            d.proxy.master_db.as_deref().unwrap_or("no")
        ));
    }
    if let Some(f) = &d.failover {
        return Err(format!("a {} from {} is in progress", f.reason, f.from));
    }
    if primary == s.uid || s.role == Some(Role::Master) {
        return Err("this keeper's database is named primary".into());
    }
    if s.report
        .as_ref()
        .is_some_and(|r| r.healthy && !r.in_recovery)
    {
        return Err("this keeper's PostgreSQL is not in recovery".into());
    }
    Ok(d.spec.fence_timeout + FENCE_SLACK)
}

/// `POST /failsafe/promise?primary=<uid>`.
pub fn promise(node: &NodeState, method: &str, query: &str) -> Answer {
    if method != "POST" {
        return refuse(405, format!("{FAILSAFE_PROMISE_PATH} takes POST"));
    }
    let Some(primary) = query_param(query, "primary").filter(|p| !p.is_empty()) else {
        return refuse(400, "give the primary: ?primary=<uid>".into());
    };
    let s = node.snapshot();
    let ms = match promisable(&s, primary) {
        Ok(d) => d.as_millis() as u64,
        Err(why) => return refuse(409, why),
    };
    if let Err(why) = node.promises.give(primary, ms) {
        return refuse(409, why);
    }
    let body = serde_json::to_string(&Promise {
        uid: s.uid,
        promised_ms: ms,
    })
    .unwrap_or_default();
    Answer::json(200, body)
}

/// `GET /failsafe/route`: how long a proxy may route to this primary.
pub fn route(node: &NodeState) -> Answer {
    let s = node.snapshot();
    let Some(lease) = node.lease() else {
        return refuse(503, "the keeper is starting".into());
    };
    if !s.is_primary() || lease.primary_pid() == 0 {
        return refuse(503, "this keeper's database is not the primary now".into());
    }
    let remaining_ms = lease.deadline_ms().saturating_sub(now_ms());
    let body = serde_json::to_string(&Route {
        uid: s.uid,
        remaining_ms,
    })
    .unwrap_or_default();
    Answer::json(200, body)
}

/// The other keepers of `d`, with their node API addresses.
fn peers(d: &ClusterData, me: &str) -> Vec<(String, Option<String>)> {
    d.keepers
        .keys()
        .filter(|u| *u != me)
        .map(|u| {
            let addr = d.dbs.get(u).and_then(|db| db.status.api_address.clone());
            (u.clone(), addr)
        })
        .collect()
}

/// Asks every peer for a promise; the earliest end of the promises, counted
/// from `sent`, if every one gave one.
async fn ask(
    peers: Vec<(String, Option<String>)>,
    me: &str,
    limit: Duration,
    alone_ms: u64,
) -> Result<u64, String> {
    let sent = now_ms();
    let mut set = tokio::task::JoinSet::new();
    for (uid, addr) in peers {
        let path = format!("{FAILSAFE_PROMISE_PATH}?primary={me}");
        set.spawn(async move {
            let Some(addr) = addr else {
                return Err(format!("{uid} has no node API address (--api-listen)"));
            };
            match cluster::node_api::call(&addr, "POST", &path, limit).await {
                Ok((200, body)) => match serde_json::from_str::<Promise>(&body) {
                    Ok(p) if p.uid == uid => Ok(p.promised_ms),
                    Ok(p) => Err(format!("{addr} answered as {}, not {uid}", p.uid)),
                    Err(e) => Err(format!("{uid} answered {body:?}: {e}")),
                },
                Ok((status, body)) => Err(format!("{uid} refused ({status}): {}", body.trim())),
                Err(e) => Err(format!("{uid}: {e}")),
            }
        });
    }
    let slack = FENCE_SLACK.as_millis() as u64;
    let mut until: Option<u64> = None;
    let mut refused = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(ms)) => {
                let end = sent + ms.saturating_sub(slack);
                until = Some(until.map_or(end, |u| u.min(end)));
            }
            Ok(Err(why)) => refused.push(why),
            Err(e) => refused.push(e.to_string()),
        }
    }
    if !refused.is_empty() {
        refused.sort();
        return Err(refused.join("; "));
    }
    // With no other keeper there is no one to promote: as if the lease
    // had been renewed.
    Ok(until.unwrap_or(sent + alone_ms))
}

/// The primary's side, forever: once a renewal of the lease is late,
/// asks for promises every renewal period while this keeper runs the
/// primary the newest cluster data names.
pub async fn run(node: Arc<NodeState>, lease: Arc<Lease>) {
    let mut serving = false;
    let mut last_refusal = String::new();
    loop {
        let period = lease.period_ms();
        // Every half period: the first ask, once a renewal is a quarter of
        // a period late, ends by 1.25 + 0.5 + 0.5 = 2.25 periods after the
        // last renewal, before the fence (at least 3 periods).
        tokio::time::sleep(Duration::from_millis(period / 2)).await;
        let s = node.snapshot();
        let Some(d) = s.data.clone() else { continue };
        let named =
            d.proxy.master_db.as_deref() == Some(s.uid.as_str()) && s.role == Some(Role::Master);
        if !d.spec.failsafe || !named {
            lease.drop_promises();
            serving = false;
            continue;
        }
        // Not running a primary now (a restart in place): nothing to ask
        // for, but what was promised still holds.
        if lease.primary_pid() == 0 {
            continue;
        }
        // The lease holds the fence off while renewals arrive.
        if now_ms().saturating_sub(lease.renewed_ms()) < period + period / 4 {
            if serving {
                tracing::info!("the lease is renewed again; the failsafe is no longer needed");
                serving = false;
            }
            continue;
        }
        let limit = Duration::from_millis(period / 2);
        let alone_ms = d.spec.fence_timeout.as_millis() as u64;
        match ask(peers(&d, &s.uid), &s.uid, limit, alone_ms).await {
            Ok(until) => {
                lease.hold_off_until(until);
                if !serving {
                    tracing::warn!(
                        "cannot renew the lease: every other keeper promised not to promote; \
                         the primary keeps serving (the failsafe)"
                    );
                    serving = true;
                }
                last_refusal.clear();
            }
            Err(why) => {
                if why != last_refusal {
                    tracing::error!(
                        why,
                        in_ms = lease.deadline_ms().saturating_sub(now_ms()),
                        "cannot renew the lease and not every other keeper promised not to \
                         promote: the primary is fenced when the promises given end"
                    );
                    last_refusal = why;
                }
                serving = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_promise_holds_off_promotion_and_a_promoting_keeper_promises_nothing() {
        let p = Promises::default();
        p.give("k1", 200).unwrap();
        let e = p.begin_promotion().unwrap_err();
        assert!(e.contains("promised k1"), "{e}");
        std::thread::sleep(Duration::from_millis(250));
        p.begin_promotion().unwrap();
        assert!(p.give("k1", 200).is_err());
        p.end_promotion();
        p.give("k1", 200).unwrap();
    }

    #[test]
    fn a_restarted_keeper_keeps_the_promise_an_earlier_run_gave() {
        let dir = tempfile::tempdir().unwrap();
        let first = Promises::default();
        first.keep_in(dir.path());
        first.give("k1", 60_000).unwrap();
        let second = Promises::default();
        second.keep_in(dir.path());
        let e = second.begin_promotion().unwrap_err();
        assert!(e.contains("promised k1"), "{e}");
        // Given in another boot: its whole length counts from now.
        std::fs::write(
            dir.path().join("failsafe-promise"),
            "another-boot 1 60000 k1\n",
        )
        .unwrap();
        let third = Promises::default();
        third.keep_in(dir.path());
        assert!(third.until_ms() > now_ms() + 59_000);
    }
}
