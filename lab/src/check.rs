//! The checker, run after heal and quiescence over the whole history.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use crate::observe::Observed;
use crate::schedule::FaultKind;
use crate::workload::{Op, Outcome};

/// A fault as it happened, in `CLOCK_MONOTONIC` ns.
#[derive(Debug, Clone)]
pub struct Window {
    pub kind: FaultKind,
    pub target: String,
    pub start_ns: u64,
    pub healed_ns: u64,
    pub settled_ns: u64,
    /// The named primary when it began.
    pub master_before: Option<String>,
    /// The named primary at the end of its settle time.
    pub master_after: Option<String>,
}

/// What the checker may expect of the run.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    /// Synchronous replication.
    pub sync: bool,
    /// The primary's synchronous settings were sampled (keelson only).
    pub sync_observed: bool,
}

/// What the run ended with.
#[derive(Debug, Default)]
pub struct Final {
    /// Ids in `ledger` on the primary.
    pub rows: HashSet<i64>,
    /// Ids in `ledger` on each standby once it caught up (None: it never did).
    pub standby_rows: Vec<(String, Option<HashSet<i64>>)>,
    pub bank_total: Option<i64>,
    /// The primary's timeline at the end.
    pub primary_timeline: Option<i64>,
    /// Each standby's WAL receiver timeline, when it streams from the
    /// primary's address (None: it does not).
    pub standby_timelines: Vec<(String, Option<i64>)>,
    /// A primary was named and every other node streamed from it in time.
    pub quiescent: bool,
    /// Why the final state could not be read (then the row checks below
    /// have nothing to compare).
    pub unreadable: Option<String>,
}

#[derive(Debug)]
pub struct Line {
    pub check: &'static str,
    pub ok: bool,
    /// Not a violation, but a documented limit that was reached (shown as
    /// `limit`, with its measured size in the detail).
    pub limit: bool,
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<Line>,
    /// Per fault: the longest stretch with no write acknowledged through a
    /// proxy, from its start to the end of its settle time.
    pub outages: Vec<(FaultKind, Duration)>,
    pub acked: usize,
    pub in_doubt: usize,
    /// Writes through a proxy that a client saw fail: (refused, in doubt,
    /// all attempted).
    pub proxy_errors: (usize, usize, usize),
    pub lost: usize,
    /// The worst overlap of acknowledged writes on two servers, ms:
    /// through proxies, and direct.
    pub overlap_ms: (f64, f64),
}

impl Report {
    pub fn violations(&self) -> Vec<&Line> {
        self.lines.iter().filter(|l| !l.ok).collect()
    }

    fn add(&mut self, check: &'static str, ok: bool, detail: String) {
        self.lines.push(Line {
            check,
            ok,
            limit: false,
            detail,
        });
    }

    fn limit(&mut self, check: &'static str, detail: String) {
        self.lines.push(Line {
            check,
            ok: true,
            limit: true,
            detail,
        });
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The longest overlap between acknowledged writes on two different
/// servers: no write may be acknowledged on one after the first write
/// acknowledged by its successor was invoked. Epochs are (server,
/// timeline); returns (overlap ns, description) of the worst pair.
fn overlap(ops: &[&Op]) -> Option<(u64, String)> {
    let mut epochs: BTreeMap<(String, i32), (u64, u64)> = BTreeMap::new();
    for o in ops {
        let (Some(s), Some(t)) = (&o.server, o.tli) else {
            continue;
        };
        let e = epochs
            .entry((s.clone(), t))
            .or_insert((o.invoke_ns, o.complete_ns));
        e.0 = e.0.min(o.invoke_ns);
        e.1 = e.1.max(o.complete_ns);
    }
    let list: Vec<_> = epochs.iter().collect();
    let mut worst: Option<(u64, String)> = None;
    for (i, (ka, a)) in list.iter().enumerate() {
        for (kb, b) in list.iter().skip(i + 1) {
            if ka.0 == kb.0 {
                continue;
            }
            // Overlap of [first invoke, last acknowledgement] windows.
            if a.0 < b.1 && b.0 < a.1 {
                let over = a.1.min(b.1) - a.0.max(b.0);
                if worst.as_ref().is_none_or(|(w, _)| over > *w) {
                    worst = Some((
                        over,
                        format!(
                            "{} (timeline {}) and {} (timeline {}) both acknowledged writes for {:.1} ms",
                            ka.0, ka.1, kb.0, kb.1, ms(over)
                        ),
                    ));
                }
            }
        }
    }
    worst
}

pub fn check(ops: &[Op], seen: &Observed, windows: &[Window], fin: &Final, mode: Mode) -> Report {
    let sync = mode.sync;
    let mut r = Report::default();
    let writes: Vec<&Op> = ops
        .iter()
        .filter(|o| o.kind == "proxy" || o.kind == "direct")
        .collect();
    let acked: HashSet<i64> = writes
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .map(|o| o.value)
        .collect();
    let in_doubt: HashSet<i64> = writes
        .iter()
        .filter(|o| o.outcome == Outcome::Info)
        .map(|o| o.value)
        .collect();
    r.acked = acked.len();
    r.in_doubt = in_doubt.len();
    let through: Vec<&&Op> = writes.iter().filter(|o| o.kind == "proxy").collect();
    r.proxy_errors = (
        through
            .iter()
            .filter(|o| o.outcome == Outcome::Fail)
            .count(),
        through
            .iter()
            .filter(|o| o.outcome == Outcome::Info)
            .count(),
        through.len(),
    );

    r.add(
        "quiescence",
        fin.quiescent,
        if fin.quiescent {
            "a primary, and every other node streaming from it, within 90 s of the last heal".into()
        } else {
            "no quiescent cluster within 90 s of the last heal (liveness)".into()
        },
    );

    if let Some(why) = &fin.unreadable {
        r.add("final state read", false, why.clone());
    }

    let mut lost: Vec<i64> = acked
        .iter()
        .filter(|i| !fin.rows.contains(i))
        .copied()
        .collect();
    lost.sort();
    r.lost = lost.len();
    let lost_detail = if lost.is_empty() {
        format!(
            "0 of {} acknowledged ({} in doubt)",
            acked.len(),
            in_doubt.len()
        )
    } else {
        format!(
            "{} of {} lost, first {:?}",
            lost.len(),
            acked.len(),
            &lost[..lost.len().min(8)]
        )
    };
    if lost.is_empty() || sync {
        r.add("lost acknowledged writes", lost.is_empty(), lost_detail);
    } else {
        // docs/ha.md: in asynchronous mode a failover loses the tail the
        // promoted standby had not received.
        r.limit(
            "lost acknowledged writes",
            format!("{lost_detail} (async mode: the documented tail)"),
        );
    }

    let mut stray: Vec<i64> = fin
        .rows
        .iter()
        .filter(|i| !acked.contains(i) && !in_doubt.contains(i))
        .copied()
        .collect();
    stray.sort();
    r.add(
        "rows nobody wrote",
        stray.is_empty(),
        format!("{} {:?}", stray.len(), &stray[..stray.len().min(8)]),
    );

    // Bank transfers go through the proxies too and say where they ran.
    let all_writes: Vec<&Op> = ops
        .iter()
        .filter(|o| matches!(o.kind.as_str(), "proxy" | "direct" | "bank_move"))
        .filter(|o| o.outcome == Outcome::Ok)
        .collect();
    for (kinds, label) in [
        (
            &["proxy", "bank_move"][..],
            "two primaries (through proxies)",
        ),
        (&["direct"][..], "two primaries (direct clients)"),
        (
            &["proxy", "bank_move", "direct"][..],
            "two primaries (all clients)",
        ),
    ] {
        let ok_ops: Vec<&Op> = all_writes
            .iter()
            .filter(|o| kinds.contains(&o.kind.as_str()))
            .copied()
            .collect();
        match overlap(&ok_ops) {
            None => r.add(
                label,
                true,
                format!("no overlap ({} acknowledged)", ok_ops.len()),
            ),
            Some((over, d)) => {
                match kinds.len() {
                    2 => r.overlap_ms.0 = ms(over),
                    1 => r.overlap_ms.1 = ms(over),
                    _ => {}
                }
                r.add(label, false, d)
            }
        }
    }

    for (name, rows) in &fin.standby_rows {
        let ok = rows.as_ref().is_some_and(|s| s == &fin.rows);
        r.add(
            "standbys hold the primary's rows",
            ok,
            match rows {
                None => format!("{name} never caught up"),
                Some(s) if ok => format!("{name}: {} rows, the same", s.len()),
                Some(s) => format!(
                    "{name}: {} rows, {} missing, {} extra",
                    s.len(),
                    fin.rows.difference(s).count(),
                    s.difference(&fin.rows).count()
                ),
            },
        );
    }

    for (name, tli) in &fin.standby_timelines {
        let ok = tli.is_some() && *tli == fin.primary_timeline;
        r.add(
            "standbys stream the primary's timeline",
            ok,
            match tli {
                None => format!("{name} is not streaming from the primary"),
                Some(t) => format!(
                    "{name}: timeline {t}, the primary's {:?}",
                    fin.primary_timeline
                ),
            },
        );
    }

    // An id in doubt may be lost and may have been seen on an
    // asynchronous standby (PostgreSQL's behaviour); only acknowledged
    // ids count.
    let replica_lost: Vec<i64> = ops
        .iter()
        .filter(|o| o.kind == "replica" && o.outcome == Outcome::Ok && o.value > 0)
        .filter(|o| !fin.rows.contains(&o.value) && !in_doubt.contains(&o.value))
        .map(|o| o.value)
        .collect();
    let replica_detail = if replica_lost.is_empty() {
        "none".to_owned()
    } else {
        format!(
            "{} reads, e.g. id {} ({})",
            replica_lost.len(),
            replica_lost[0],
            if sync {
                "sync mode: a violation"
            } else {
                "async mode: within the lag tail"
            }
        )
    };
    if replica_lost.is_empty() || sync {
        r.add(
            "replica reads of data later lost",
            replica_lost.is_empty(),
            replica_detail,
        );
    } else {
        r.limit("replica reads of data later lost", replica_detail);
    }

    let want = i64::from(crate::cluster::ACCOUNTS) * crate::cluster::START_BALANCE;
    let bad: Vec<i64> = ops
        .iter()
        .filter(|o| o.kind == "bank_read" && o.outcome == Outcome::Ok && o.value != want)
        .map(|o| o.value)
        .collect();
    let final_ok = fin.bank_total == Some(want);
    r.add(
        "bank total",
        bad.is_empty() && final_ok,
        format!(
            "{} reads off the total {want}; final {:?}",
            bad.len(),
            fin.bank_total
        ),
    );

    let mut by_proxy: BTreeMap<&str, u64> = BTreeMap::new();
    let mut back = Vec::new();
    for v in seen.views.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        // A restarted proxy shows generation 0 until its first read of
        // the store.
        if v.generation == 0 {
            continue;
        }
        let last = by_proxy.entry(&v.proxy).or_insert(0);
        if v.generation < *last {
            back.push(format!("{} {} -> {}", v.proxy, last, v.generation));
        }
        *last = (*last).max(v.generation);
    }
    // The borrow of the lock ends with the loop above.
    r.add(
        "proxy views only move forward",
        back.is_empty(),
        if back.is_empty() {
            "yes".into()
        } else {
            back.join(", ")
        },
    );

    let revisions = seen
        .revisions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut false_failovers = Vec::new();
    // A window that began while a failover was still under way (no
    // primary named) says nothing about its own fault.
    for w in windows
        .iter()
        .filter(|w| w.kind.tolerated() && w.master_before.is_some())
    {
        let changed = revisions.iter().any(|rev| {
            rev.at_ns >= w.start_ns
                && rev.at_ns <= w.settled_ns
                && rev.master.is_some()
                && rev.master != w.master_before
        }) || (w.master_after.is_some() && w.master_after != w.master_before);
        if changed {
            false_failovers.push(format!("{} ({})", w.kind.name(), w.target));
        }
    }
    r.add(
        "no failover for tolerated faults",
        false_failovers.is_empty(),
        if false_failovers.is_empty() {
            "none".into()
        } else {
            false_failovers.join(", ")
        },
    );

    if mode.sync_observed {
        let samples = seen.sync.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut worst = 0u64;
        let mut since: Option<u64> = None;
        for (i, s) in samples.iter().enumerate() {
            // A new primary, or a gap in the looks (a failover under way),
            // starts a new count.
            if i > 0
                && (samples[i - 1].primary != s.primary
                    || s.at_ns - samples[i - 1].at_ns > 1_500_000_000)
            {
                since = None;
            }
            if s.running != s.wanted {
                let t = *since.get_or_insert(s.at_ns);
                worst = worst.max(s.at_ns - t);
            } else {
                since = None;
            }
        }
        if samples.is_empty() {
            r.add(
                "synchronous settings observed",
                false,
                "no look at the primary's settings succeeded".into(),
            );
        }
        let (blocked_ok, detail) = commits_blocked(&samples, &all_writes);
        r.add(
            "commits block with no listed standby streaming",
            blocked_ok,
            detail,
        );
        r.add(
            "synchronous names as the spec says",
            worst <= 2_000_000_000,
            format!(
                "longest mismatch {:.1} s over {} samples",
                worst as f64 / 1e9,
                samples.len()
            ),
        );
    }

    let mut proxy_ok: Vec<u64> = ops
        .iter()
        .filter(|o| o.kind == "proxy" && o.outcome == Outcome::Ok)
        .map(|o| o.complete_ns)
        .collect();
    proxy_ok.sort();
    for w in windows {
        let mut last = w.start_ns;
        let mut longest = 0u64;
        for t in proxy_ok
            .iter()
            .filter(|t| **t > w.start_ns && **t <= w.settled_ns)
        {
            longest = longest.max(t - last);
            last = *t;
        }
        longest = longest.max(w.settled_ns.saturating_sub(last));
        r.outages.push((w.kind, Duration::from_nanos(longest)));
    }
    r
}

/// `synchronous_standby_names` as (number required, names listed).
fn parse_sync_names(v: &str) -> (usize, Vec<String>) {
    let v = v.trim();
    if v.is_empty() {
        return (0, Vec::new());
    }
    let (head, list) = match v.split_once('(') {
        Some((h, l)) => (h.trim(), l.trim_end().trim_end_matches(')')),
        None => ("", v),
    };
    let names: Vec<String> = list
        .split(',')
        .map(|n| n.trim().trim_matches('"').to_owned())
        .filter(|n| !n.is_empty())
        .collect();
    let n = head
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    (n, names)
}

/// In synchronous mode a commit is acknowledged only once enough listed
/// standbys confirmed it, and PostgreSQL counts only walsenders in state
/// `streaming`. Between two looks at the same primary with the same
/// setting, fewer listed standbys streaming (in either look) than the
/// setting needs means no write on that server may be acknowledged in
/// between. Looks more than 2 s apart are not paired: a standby could
/// have come and gone unseen.
fn commits_blocked(samples: &[crate::observe::SyncSample], writes: &[&Op]) -> (bool, String) {
    let mut bad = Vec::new();
    let mut windows = 0usize;
    for pair in samples.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.primary != b.primary
            || a.running != b.running
            || b.began_ns.saturating_sub(a.at_ns) > 2_000_000_000
        {
            continue;
        }
        let (need, listed) = parse_sync_names(&a.running);
        let streaming = listed
            .iter()
            .filter(|n| a.streaming.contains(n) || b.streaming.contains(n))
            .count();
        if streaming >= need.max(1) {
            continue;
        }
        windows += 1;
        for o in writes.iter().filter(|o| {
            o.outcome == Outcome::Ok
                && o.invoke_ns > a.at_ns
                && o.complete_ns < b.began_ns
                && o.server.as_deref().and_then(|s| s.split('/').next()) == Some(a.addr.as_str())
        }) {
            bad.push(format!(
                "id {} acknowledged by {} ({:?}, streaming {:?})",
                o.value, a.primary, a.running, a.streaming
            ));
        }
    }
    if bad.is_empty() {
        (
            true,
            format!("0 acknowledged in {windows} stretches with too few listed standbys streaming"),
        )
    } else {
        let n = bad.len();
        bad.truncate(4);
        (false, format!("{n} acknowledged, e.g. {}", bad.join("; ")))
    }
}

/// p50 and p99 of durations.
pub fn percentiles(mut d: Vec<Duration>) -> (Duration, Duration) {
    if d.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    d.sort();
    let at = |q: f64| d[((d.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(server: &str, tli: i32, invoke: u64, complete: u64) -> Op {
        Op {
            client: "c".into(),
            kind: "proxy".into(),
            value: 1,
            invoke_ns: invoke,
            complete_ns: complete,
            outcome: Outcome::Ok,
            server: Some(server.into()),
            tli: Some(tli),
            lsn: None,
            error: None,
        }
    }

    #[test]
    fn synchronous_names_parse() {
        assert_eq!(parse_sync_names(""), (0, vec![]));
        assert_eq!(
            parse_sync_names("FIRST 2 (\"k2\", \"k3\")"),
            (2, vec!["k2".to_owned(), "k3".to_owned()])
        );
        assert_eq!(parse_sync_names("ANY 1 (a, b)").0, 1);
        assert_eq!(parse_sync_names("k2").1, vec!["k2".to_owned()]);
    }

    #[test]
    fn a_commit_acknowledged_with_no_listed_standby_streaming_is_found() {
        let look = |at: u64, streaming: &[&str]| crate::observe::SyncSample {
            at_ns: at,
            began_ns: at - 1,
            primary: "k1".into(),
            wanted: "FIRST 1 (\"k2\")".into(),
            running: "FIRST 1 (\"k2\")".into(),
            addr: "10.0.0.1".into(),
            streaming: streaming.iter().map(|s| s.to_string()).collect(),
        };
        let w = op("10.0.0.1/32", 1, 15, 20);
        let other = op("10.0.0.2/32", 2, 15, 20);
        let writes = [&w, &other];
        assert!(!commits_blocked(&[look(10, &[]), look(30, &[])], &writes).0);
        // One of the looks saw k2 streaming: it may have confirmed.
        assert!(commits_blocked(&[look(10, &["k2"]), look(30, &[])], &writes).0);
        // Only k3 streams, and k3 is not listed.
        assert!(!commits_blocked(&[look(10, &["k3"]), look(30, &["k3"])], &writes).0);
        assert!(commits_blocked(&[look(10, &[]), look(30, &[])], &[&other]).0);
    }

    #[test]
    fn overlapping_acknowledgements_on_two_servers_are_found() {
        let a = [op("a", 1, 0, 10), op("a", 1, 20, 30), op("b", 2, 40, 50)];
        assert!(overlap(&a.iter().collect::<Vec<_>>()).is_none());
        let b = [op("a", 1, 0, 10), op("a", 1, 20, 45), op("b", 2, 40, 50)];
        let (over, _) = overlap(&b.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(over, 5);
        // The same server again later, on a new timeline, is not a second
        // primary of the first epoch.
        let c = [op("a", 1, 0, 10), op("b", 2, 20, 30), op("a", 3, 40, 50)];
        assert!(overlap(&c.iter().collect::<Vec<_>>()).is_none());
    }
}
