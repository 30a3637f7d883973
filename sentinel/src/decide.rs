//! The sentinel's decisions, as one pure function:
//! `decide(current, observations, now) -> next`.
//!
//! All I/O stays outside: the caller reads `clusterdata`, the keepers'
//! reports and the proxies' registrations, keeps its own memory of when it
//! saw what (on its own monotonic clock), calls [`decide`], and writes the
//! result back by compare-and-swap if it differs. The function is
//! deterministic, so every rule is pinned by table-driven tests.
//!
//! Rules, in the order they apply:
//! 1. keepers that report for the first time join, each with one database;
//! 2. database status follows the keepers' reports, but a report never
//!    erases what is known: values a keeper could not read stay as they
//!    were last seen;
//! 3. a new cluster elects its first primary among the reporting keepers
//!    (highest priority, then name), never one marked `never_primary`, and
//!    never over existing data unless the operator named the keeper whose
//!    data to keep (`ctl init --existing`);
//! 4. a primary not seen healthy for `fail_interval` (by this sentinel,
//!    counting only time it could observe) is failed over, if an eligible
//!    standby exists: the proxies are told there is no primary and the old
//!    primary is told to stop; a standby is promoted only once every live
//!    proxy acknowledged and the old primary acknowledged its stop or lost
//!    its keeper's lease (so it fenced itself). The most advanced eligible
//!    standby wins: highest timeline, then highest LSN, then priority;
//! 5. a promoted database is named to proxies once it reports it has left
//!    recovery at the generation it was given, and the other databases
//!    then follow it; a candidate that does not get there within
//!    `convergence_timeout` is stopped and another one chosen;
//! 6. a keeper an operator marked failed (`ctl failkeeper`) counts as
//!    failed past `fail_interval` for one decision; the mark is then
//!    cleared;
//! 7. in synchronous mode the primary's synchronous standbys are kept
//!    between `min_sync` and `max_sync`, preferring current members, among
//!    streaming followers only; a live member is replaced through the union
//!    of old and new sets; with too few, dead members are kept, so that
//!    commits block rather than go unprotected. Only a standby in the
//!    primary's confirmed synchronous set can be elected.

use std::collections::{BTreeMap, BTreeSet};

use cluster::data::{
    ClusterPhase, Db, DbSpec, Failover, Keeper, KeeperReport, PrimaryChange, ProxyReport, Role,
    HISTORY_LEN, SWITCHOVER,
};
use cluster::ClusterData;

/// What the sentinel saw in the store this round, and what it remembers.
/// Every time is on the sentinel's own monotonic clock, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observations {
    /// Reports of keepers that report (their report changed recently), by
    /// keeper uid (`keepers/<uid>`).
    pub keepers: BTreeMap<String, KeeperReport>,
    /// Keepers whose registration exists (their lease is alive), reporting
    /// or not. A keeper missing here has lost its lease: it has fenced
    /// itself.
    pub registered: BTreeSet<String>,
    /// Live proxies' registrations (`proxies/<uid>`).
    pub proxies: BTreeMap<String, ProxyReport>,
    /// When this sentinel last saw each keeper report a healthy database.
    pub last_healthy_ms: BTreeMap<String, u64>,
    /// Since when this sentinel has observed without a gap (it became
    /// leader, or the store came back): no timer starts earlier.
    pub since_ms: u64,
    /// When this sentinel first saw the failover in progress in its current
    /// step; `None` without one.
    pub failover_since_ms: Option<u64>,
    /// The wall clock (ms since the Unix epoch), only to date history
    /// entries: no decision depends on it.
    pub wall_ms: u64,
}

/// Computes the next cluster data. Pure: same inputs, same output.
pub fn decide(current: &ClusterData, obs: &Observations, now_ms: u64) -> ClusterData {
    let mut d = current.clone();
    d.notice = None;
    join_keepers(&mut d, obs);
    update_status(&mut d, obs);
    if d.phase == ClusterPhase::Initializing {
        initialize(&mut d, obs);
    }
    rejoin(&mut d, obs);
    failover(&mut d, obs, now_ms);
    name_primary(&mut d, obs.wall_ms);
    manage_sync(&mut d);
    for k in d.keepers.values_mut() {
        k.failed = false;
    }
    d
}

/// The database whose spec says it is the primary.
pub fn master(d: &ClusterData) -> Option<String> {
    d.dbs
        .iter()
        .find(|(_, db)| db.spec.role == Role::Master)
        .map(|(uid, _)| uid.clone())
}

fn set_spec(db: &mut Db, spec: DbSpec) {
    if db.spec != spec {
        db.spec = spec;
        db.generation += 1;
    }
}

fn follower(of: &str) -> DbSpec {
    DbSpec {
        role: Role::Standby,
        follow: Some(of.to_owned()),
        ..Default::default()
    }
}

fn stopped() -> DbSpec {
    DbSpec::default()
}

/// Sets a note for `ctl status`; the first note of a round wins.
fn note(d: &mut ClusterData, text: String) {
    if d.notice.is_none() {
        d.notice = Some(text);
    }
}

/// `n` bytes for people.
pub fn bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if n >= 1024 * 1024 {
        format!("{:.1} MiB", n as f64 / MIB)
    } else if n >= 1024 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} bytes")
    }
}

fn join_keepers(d: &mut ClusterData, obs: &Observations) {
    let m = master(d);
    for (uid, r) in &obs.keepers {
        if let Some(k) = d.keepers.get_mut(uid) {
            // Flags that changed (the keeper restarted with others) win
            // over tags set with `ctl keeper set`; the same flags again
            // change nothing.
            if r.tags.is_some() && r.tags != k.reported_tags {
                if let Some(t) = &r.tags {
                    k.set_tags(t);
                }
                k.reported_tags = r.tags.clone();
            }
            continue;
        }
        if let Some(other) = d
            .dbs
            .keys()
            .find(|o| keeper_slot(o) == keeper_slot(uid))
            .cloned()
        {
            note(
                d,
                format!(
                    "keeper {uid} cannot join: its replication slot name would be the same as \
                     keeper {other}'s; give it a uid that differs by more than case, '-', '.' or '_'"
                ),
            );
            continue;
        }
        d.membership += 1;
        let mut k = Keeper {
            reported_tags: r.tags.clone(),
            joined: d.membership,
            ..Keeper::default()
        };
        if let Some(t) = &r.tags {
            k.set_tags(t);
        }
        d.keepers.insert(uid.clone(), k);
        let spec = match &m {
            Some(m) => follower(m),
            None => DbSpec::default(),
        };
        d.dbs.insert(
            uid.clone(),
            Db {
                keeper: uid.clone(),
                generation: 1,
                spec,
                ..Db::default()
            },
        );
    }
}

/// The slot name a keeper's standby streams through (as the keeper makes
/// it): two keepers must not share one.
fn keeper_slot(uid: &str) -> String {
    uid.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Copies what the reports say into the status, keeping what a report does
/// not know.
fn update_status(d: &mut ClusterData, obs: &Observations) {
    for db in d.dbs.values_mut() {
        let failed = d.keepers.get(&db.keeper).is_some_and(|k| k.failed);
        let s = &mut db.status;
        match obs.keepers.get(&db.keeper) {
            Some(r) => {
                if let (Some(known), Some(new)) = (&s.system_id, &r.system_id) {
                    if known != new {
                        // A database's system never changes (a copy from
                        // the primary keeps it): another one is another
                        // cluster's data, or a fresh initdb over lost data.
                        // Nothing of it is taken in.
                        s.healthy = false;
                        s.streaming = false;
                        s.problem = Some(format!(
                            "its data directory holds another PostgreSQL system ({new}, not {known})"
                        ));
                        continue;
                    }
                }
                s.healthy = r.healthy && !failed;
                s.running = r.running;
                s.address = r.address.clone();
                if r.healthy {
                    s.in_recovery = r.in_recovery;
                    s.replay_lsn = r.replay_lsn;
                    s.replay_lag_ms = r.replay_lag_ms;
                    s.streaming = r.streaming;
                } else {
                    s.streaming = false;
                    s.replay_lag_ms = None;
                }
                if let Some(lsn) = r.lsn {
                    s.lsn = lsn;
                }
                if let Some(tli) = r.timeline {
                    // A data directory's timeline never goes back (a
                    // rewind or a base backup moves it to the primary's);
                    // a standby's checkpoint timeline, which it reports
                    // while it is not streaming, can lag behind the one it
                    // replays.
                    s.timeline = s.timeline.max(tli);
                }
                if s.system_id.is_none() {
                    s.system_id = r.system_id.clone();
                }
                if let Some(sync) = &r.synchronous_standbys {
                    s.synchronous_standbys = sync.clone();
                }
                if let Some(p) = &r.pending_restart {
                    s.pending_restart = p.clone();
                }
                if let Some(v) = &r.running_settings {
                    s.running_settings = v.clone();
                }
                s.restarted = s.restarted.max(r.restarted);
                if let Some(mut a) = r.archive.clone() {
                    // Statistics reset (a crash restart) forget the last
                    // file archived; the last one known stays: a failover
                    // pushes what came after it.
                    if a.last_archived_wal.is_none() {
                        a.last_archived_wal =
                            s.archive.as_ref().and_then(|o| o.last_archived_wal.clone());
                    }
                    s.archive = Some(a);
                }
                if r.backup.is_some() {
                    s.backup = r.backup.clone();
                }
                s.api_address = r.api_address.clone();
                s.pgbackrest_server = r.pgbackrest_server.clone();
                s.membership = s.membership.max(r.membership);
                s.applied_generation = r.applied_generation;
                s.stopped_lsn = r.stopped_lsn;
                s.problem = if failed {
                    Some("marked failed by `keelson ctl failkeeper`".into())
                } else {
                    r.problem.clone()
                };
            }
            None => {
                s.healthy = false;
                s.streaming = false;
                s.replay_lag_ms = None;
                s.problem = Some(if obs.registered.contains(&db.keeper) {
                    "its keeper's reports stopped changing".into()
                } else {
                    "its keeper is not running or cannot reach the store".into()
                });
            }
        }
    }
}

/// Whether the database is seen healthy now (its keeper reports, and
/// PostgreSQL answers).
fn healthy_now(d: &ClusterData, obs: &Observations, uid: &str) -> bool {
    d.dbs.get(uid).is_some_and(|db| {
        db.status.healthy && obs.keepers.get(&db.keeper).is_some_and(|r| r.healthy)
    })
}

/// How long this sentinel has seen `uid` not healthy, counting only time it
/// has been observing.
fn unhealthy_for(d: &ClusterData, obs: &Observations, uid: &str, now_ms: u64) -> u64 {
    if healthy_now(d, obs, uid) {
        return 0;
    }
    let keeper = d.dbs.get(uid).map_or(uid, |db| db.keeper.as_str());
    let last = obs
        .last_healthy_ms
        .get(keeper)
        .copied()
        .unwrap_or(obs.since_ms)
        .max(obs.since_ms);
    now_ms.saturating_sub(last)
}

fn initialize(d: &mut ClusterData, obs: &Observations) {
    if master(d).is_some() {
        d.phase = ClusterPhase::Normal;
        return;
    }
    let first = if let Some(existing) = d.init_existing.clone() {
        match obs.keepers.get(&existing) {
            Some(r) if r.system_id.is_some() => Some(existing),
            Some(_) => {
                note(
                    d,
                    format!(
                        "`ctl init --existing {existing}`: keeper {existing} reports no data \
                         directory; waiting for its data"
                    ),
                );
                None
            }
            None => {
                note(
                    d,
                    format!(
                        "`ctl init --existing {existing}`: waiting for keeper {existing} to report"
                    ),
                );
                None
            }
        }
    } else {
        let with_data: Vec<&String> = obs
            .keepers
            .iter()
            .filter(|(_, r)| r.system_id.is_some())
            .map(|(uid, _)| uid)
            .collect();
        if !with_data.is_empty() {
            let names: Vec<&str> = with_data.iter().map(|s| s.as_str()).collect();
            let text = format!(
                "no primary elected: keepers {} already hold data; electing one by name could \
                 discard newer data on another. Run `keelson ctl init --existing UID` (on a new \
                 cluster) naming the keeper whose data to keep",
                names.join(", ")
            );
            note(d, text);
            return;
        }
        obs.keepers
            .keys()
            .filter(|uid| d.keepers.get(*uid).is_some_and(|k| !k.never_primary))
            .max_by(|a, b| {
                let (pa, pb) = (d.keepers[*a].priority, d.keepers[*b].priority);
                pa.cmp(&pb).then_with(|| b.cmp(a))
            })
            .cloned()
    };
    let Some(first) = first else { return };
    for (uid, db) in d.dbs.iter_mut() {
        let spec = if *uid == first {
            DbSpec {
                role: Role::Master,
                ..Default::default()
            }
        } else {
            follower(&first)
        };
        set_spec(db, spec);
    }
    d.phase = ClusterPhase::Normal;
}

/// Databases left without a role (a failed primary, a candidate given up
/// on, a new keeper before a primary existed) follow the primary once their
/// keeper reports again, whether or not its PostgreSQL runs: the keeper
/// rewinds and starts it as a standby. Not before the primary has left
/// recovery: pg_rewind onto a standby that is still being promoted finds
/// "the same timeline", keeps the diverged WAL, and never can follow.
fn rejoin(d: &mut ClusterData, obs: &Observations) {
    let Some(m) = master(d) else { return };
    // A standby cluster's leader may be copied afresh too (`ctl reinit`).
    let standby = d.spec.is_standby();
    if !is_ready(d, &d.dbs[&m]) || d.failover.is_some() {
        return;
    }
    for (uid, db) in d.dbs.iter_mut() {
        let stopped = db.spec.role == Role::None && obs.keepers.contains_key(&db.keeper);
        let elsewhere =
            db.spec.role == Role::Standby && db.spec.follow.as_deref() != Some(m.as_str());
        if *uid != m && (stopped || elsewhere) {
            let spec = DbSpec {
                reinit: db.spec.reinit,
                ..follower(&m)
            };
            set_spec(db, spec);
        } else if db.spec.reinit
            && (db.spec.role == Role::Standby || standby)
            && db.status.healthy
            && db.status.applied_generation >= db.generation
        {
            // Copied afresh: an ordinary standby from now on.
            let spec = DbSpec {
                reinit: false,
                ..db.spec.clone()
            };
            set_spec(db, spec);
        }
    }
}

/// Whether every live proxy has applied `generation` of this cluster.
/// Proxies whose lease ended are not in the observations and do not hold
/// the failover up.
fn proxies_pending(d: &ClusterData, obs: &Observations, generation: u64) -> Vec<String> {
    obs.proxies
        .iter()
        .filter(|(_, p)| p.generation < generation || p.cluster_uid != d.uid)
        .map(|(uid, _)| uid.clone())
        .collect()
}

/// Why `uid` may not replace the primary `from`, or `None` if it may.
pub fn ineligible(
    d: &ClusterData,
    obs: &Observations,
    from: &str,
    uid: &str,
    now_ms: u64,
) -> Option<String> {
    let Some(old) = d.dbs.get(from) else {
        // Nothing is known of what the old primary had.
        return Some(format!(
            "cannot be judged: the old primary {from} is not in the cluster"
        ));
    };
    let Some(db) = d.dbs.get(uid) else {
        return Some("is not in the cluster".into());
    };
    let keeper = d.keepers.get(&db.keeper);
    if keeper.is_some_and(|k| k.never_primary) {
        return Some("is never_primary".into());
    }
    if db.spec.role != Role::Standby {
        return Some("is not a standby".into());
    }
    if !db.status.healthy || !obs.keepers.contains_key(&db.keeper) {
        let why = db
            .status
            .problem
            .clone()
            .unwrap_or_else(|| "unhealthy".into());
        return Some(format!("is not healthy ({why})"));
    }
    if !db.status.in_recovery {
        return Some("is not in recovery".into());
    }
    // With the failsafe, a primary whose keeper lost its lease may still
    // serve, for as long as every keeper it knows of promises not to
    // promote (docs/ha.md). It knows the keepers of the cluster data it
    // last read; one that joined after the last such data it reported
    // reading was never asked, so it cannot replace it. This holds with
    // the failsafe off too: it may have been turned off while the old
    // primary, which cannot read that, served on promises.
    let joined = keeper.map_or(0, |k| k.joined);
    if !obs.registered.contains(&old.keeper) && joined > old.status.membership {
        return Some(format!(
            "joined the cluster after the last cluster data {from}'s keeper reported reading: \
             {from} may still be serving under the failsafe, and never asked it for a promise"
        ));
    }
    if old.status.system_id.is_some() && db.status.system_id != old.status.system_id {
        return Some("belongs to another PostgreSQL system".into());
    }
    if db.status.timeline < old.status.timeline {
        return Some(format!(
            "is on timeline {}, the primary was on {}",
            db.status.timeline, old.status.timeline
        ));
    }
    if d.spec.is_standby() {
        // Nothing is lost in a standby cluster, whichever member leads: the
        // data is the source's, and a new leader catches up from it.
        return None;
    }
    let sync = d.spec.synchronous_replication && d.spec.min_sync > 0;
    let confirmed = old.status.sync_confirmed.iter().any(|s| s == uid);
    if sync && !confirmed {
        let set = if old.status.sync_confirmed.is_empty() {
            "none".to_owned()
        } else {
            old.status.sync_confirmed.join(", ")
        };
        return Some(format!(
            "was not a confirmed synchronous standby of {from} (confirmed: {set})"
        ));
    }
    // A confirmed synchronous standby has every acknowledged commit even
    // if WAL not yet acknowledged puts it far behind.
    let behind = old.status.lsn.saturating_sub(db.status.lsn);
    if !confirmed && behind > d.spec.max_standby_lag_bytes {
        return Some(format!(
            "is {} behind the last known primary LSN, limit {}",
            bytes(behind),
            bytes(d.spec.max_standby_lag_bytes)
        ));
    }
    if !db.status.streaming {
        let r = obs.keepers.get(&db.keeper);
        // It must have been streaming until about when the primary was
        // last seen healthy. A sentinel that never saw the primary healthy
        // (it took over after the failure) cannot bound this; the lag limit
        // still applies.
        let failed_for = obs
            .last_healthy_ms
            .get(&old.keeper)
            .map(|t| now_ms.saturating_sub(*t));
        let bound =
            failed_for.map(|f| f + 2 * d.spec.keeper_report_interval.as_millis() as u64 + 2000);
        match (r.and_then(|r| r.streaming_age_ms), bound) {
            (None, _) => return Some("has not streamed since its keeper started".into()),
            (Some(age), Some(bound)) if age > bound => {
                return Some(format!(
                    "stopped streaming {:.1}s before the primary failed",
                    (age - bound) as f64 / 1000.0
                ))
            }
            _ => {}
        }
    }
    None
}

/// The standby to promote in place of `from` (never one in `excluded`), or
/// why there is none.
pub fn choose_candidate(
    d: &ClusterData,
    obs: &Observations,
    from: &str,
    excluded: &[String],
    now_ms: u64,
) -> Result<String, String> {
    let mut reasons = Vec::new();
    let mut best: Option<&String> = None;
    for uid in d.dbs.keys() {
        if uid == from {
            continue;
        }
        if excluded.contains(uid) {
            reasons.push(format!("{uid} did not become primary in time"));
            continue;
        }
        if let Some(why) = ineligible(d, obs, from, uid, now_ms) {
            reasons.push(format!("{uid} {why}"));
            continue;
        }
        let better = match best {
            None => true,
            Some(b) => {
                let (x, y) = (&d.dbs[uid], &d.dbs[b]);
                let px = d.keepers.get(&x.keeper).map_or(0, |k| k.priority);
                let py = d.keepers.get(&y.keeper).map_or(0, |k| k.priority);
                // Most advanced first: highest timeline, then highest LSN,
                // then priority, then name for determinism.
                (x.status.timeline, x.status.lsn, px) > (y.status.timeline, y.status.lsn, py)
            }
        };
        if better {
            best = Some(uid);
        }
    }
    match best {
        Some(b) => Ok(b.clone()),
        None if reasons.is_empty() => Err("no eligible standby: there is no standby".into()),
        None => Err(format!("no eligible standby: {}", reasons.join("; "))),
    }
}

/// Whether the keeper of `uid` has stopped its PostgreSQL as its spec asks
/// (role none at the current generation), or has lost its lease, so it has
/// fenced itself.
fn fenced(d: &ClusterData, obs: &Observations, uid: &str) -> bool {
    let Some(db) = d.dbs.get(uid) else {
        return true;
    };
    if !obs.registered.contains(&db.keeper) {
        return true;
    }
    db.spec.role == Role::None
        && obs
            .keepers
            .get(&db.keeper)
            .is_some_and(|r| !r.running && r.applied_generation >= db.generation)
}

fn failover(d: &mut ClusterData, obs: &Observations, now_ms: u64) {
    let timed_out = obs
        .failover_since_ms
        .is_some_and(|t| now_ms.saturating_sub(t) >= d.spec.convergence_timeout.as_millis() as u64);
    if let Some(mut f) = d.failover.clone() {
        if let Some(to) = f.to.clone() {
            if d.dbs.get(&to).is_some_and(|db| is_ready(d, db)) {
                return;
            }
            if timed_out {
                // The candidate never became primary: stop it too, and
                // choose again once it is fenced.
                if let Some(db) = d.dbs.get_mut(&to) {
                    // It may have promoted itself: its data is discarded
                    // when it rejoins, and what it reported no longer
                    // ranks it among standbys.
                    // A standby cluster's candidate never promotes: its
                    // data cannot have diverged, and is kept.
                    set_spec(
                        db,
                        DbSpec {
                            reinit: !d.spec.is_standby(),
                            ..stopped()
                        },
                    );
                    db.status.lsn = 0;
                    db.status.timeline = 0;
                    db.status.sync_confirmed.clear();
                }
                f.fence.push(to.clone());
                f.excluded.push(to.clone());
                f.to = None;
                let text = format!(
                    "{to} did not become primary within {}; stopping it and choosing another standby",
                    humantime::format_duration(d.spec.convergence_timeout)
                );
                d.failover = Some(f);
                note(d, text);
            } else {
                note(d, format!("waiting for {to} to become primary"));
            }
            return;
        }
        let pending = proxies_pending(d, obs, f.fence_generation);
        if !pending.is_empty() {
            note(
                d,
                format!(
                    "waiting for proxies {} to stop routing to the old primary (or for their leases to end)",
                    pending.join(", ")
                ),
            );
            return;
        }
        // Everything in the fence list must have stopped first: the old
        // primary (in a switchover, stopping it is the switchover's own
        // first step) and any candidate given up on, which may still be
        // promoting itself.
        let unfenced: Vec<String> = f
            .fence
            .iter()
            .filter(|u| !(f.reason == SWITCHOVER && **u == f.from))
            .filter(|u| !fenced(d, obs, u))
            .cloned()
            .collect();
        if f.reason == SWITCHOVER && unfenced.is_empty() {
            switchover(d, obs, &f, now_ms, timed_out);
            return;
        }
        if !unfenced.is_empty() {
            note(
                d,
                format!(
                    "waiting for {} to stop PostgreSQL (or for its keeper's lease to end) before promoting a standby",
                    unfenced.join(", ")
                ),
            );
            return;
        }
        match choose_candidate(d, obs, &f.from, &f.excluded, now_ms) {
            Ok(to) => promote(d, &f, &to),
            Err(why) => {
                let from = f.from.clone();
                if obs.keepers.contains_key(&from) && !f.excluded.contains(&from) {
                    // No one to promote, but the old primary's keeper is
                    // here and its database has stopped: give it back its
                    // role; nobody else was promoted, so nothing diverged.
                    give_back(d, &from);
                    note(d, format!("failover from {from} cancelled, {why}"));
                } else {
                    note(d, format!("the primary {from} has failed; {why}"));
                }
            }
        }
        return;
    }
    let Some(m) = master(d) else { return };
    let marked = d.keepers.get(&d.dbs[&m].keeper).is_some_and(|k| k.failed);
    let dead = unhealthy_for(d, obs, &m, now_ms) >= d.spec.fail_interval.as_millis() as u64;
    if dead && !marked && d.paused {
        // Maintenance: the operator may be working on it. Only a request
        // (`failkeeper`, `switchover`) moves the primary.
        let problem = d.dbs[&m]
            .status
            .problem
            .clone()
            .unwrap_or_else(|| "unhealthy".into());
        note(
            d,
            format!(
                "the primary {m} has failed ({problem}); the cluster is paused, so no automatic \
                 failover happens: `keelson ctl resume` lets it happen"
            ),
        );
        return;
    }
    let failed = marked || dead;
    if !failed {
        return;
    }
    if let Err(why) = choose_candidate(d, obs, &m, &[], now_ms) {
        let problem = d.dbs[&m]
            .status
            .problem
            .clone()
            .unwrap_or_else(|| "unhealthy".into());
        note(d, format!("the primary {m} has failed ({problem}); {why}"));
        return;
    }
    // Step one of the fencing handshake: no proxy may route to the old
    // primary, and it must stop, before a new one is named.
    d.set_proxy_master(None);
    let sync = d.dbs[&m].spec.synchronous_standbys.clone();
    if let Some(db) = d.dbs.get_mut(&m) {
        set_spec(db, stopped());
    }
    d.failover = Some(Failover {
        from: m.clone(),
        fence: vec![m],
        excluded: Vec::new(),
        fence_generation: d.proxy.generation,
        to: None,
        reason: "failover".into(),
        requested: None,
        synchronous_standbys: sync,
    });
}

/// Ends a failover or switchover by making `from` the primary again, with
/// the synchronous standbys it had.
fn give_back(d: &mut ClusterData, from: &str) {
    let sync = d
        .failover
        .as_ref()
        .map(|f| f.synchronous_standbys.clone())
        .unwrap_or_default();
    if let Some(db) = d.dbs.get_mut(from) {
        let spec = DbSpec {
            role: Role::Master,
            follow: None,
            synchronous_standbys: sync,
            reinit: false,
        };
        set_spec(db, spec);
    }
    d.failover = None;
}

/// A planned switchover, once the proxies hold new clients: stop the old
/// primary cleanly (a fast shutdown sends every WAL record to the
/// streaming standbys), wait until the target has received everything up
/// to the old primary's shutdown checkpoint, then promote it. Any step
/// that does not finish within `convergence_timeout` gives the primary
/// back.
fn switchover(d: &mut ClusterData, obs: &Observations, f: &Failover, now_ms: u64, timed_out: bool) {
    let from = f.from.clone();
    let target = match &f.requested {
        Some(t) => ineligible(d, obs, &from, t, now_ms)
            .map_or(Ok(t.clone()), |why| Err(format!("{t} {why}"))),
        None => choose_candidate(d, obs, &from, &f.excluded, now_ms),
    };
    let target = match target {
        Ok(t) => t,
        Err(why) => {
            give_back(d, &from);
            note(d, format!("switchover from {from} cancelled: {why}"));
            return;
        }
    };
    let Some(old) = d.dbs.get(&from) else {
        return;
    };
    if old.spec.role == Role::Master {
        if let Some(db) = d.dbs.get_mut(&from) {
            set_spec(db, stopped());
        }
        return;
    }
    let stopped_lsn = if fenced(d, obs, &from) && obs.registered.contains(&old.keeper) {
        old.status.stopped_lsn
    } else {
        None
    };
    let waiting = match stopped_lsn {
        None => format!("waiting for {from} to stop cleanly"),
        Some(end) => {
            let t = &d.dbs[&target].status;
            // A standby cluster's new leader catches up from the source.
            if d.spec.is_standby() || (t.lsn >= end && t.timeline >= old.status.timeline) {
                promote(d, f, &target);
                return;
            }
            format!(
                "waiting for {target} to receive {} more of {from}'s WAL",
                bytes(end.saturating_sub(t.lsn))
            )
        }
    };
    if timed_out {
        give_back(d, &from);
        note(
            d,
            format!(
                "switchover from {from} aborted after {}: {waiting}",
                humantime::format_duration(d.spec.convergence_timeout)
            ),
        );
    } else {
        note(d, waiting);
    }
}

fn promote(d: &mut ClusterData, f: &Failover, to: &str) {
    let from = f.from.as_str();
    // The new primary's synchronous set starts as the old one's, without
    // itself, plus the old primary as a placeholder: until a standby
    // streams from it and takes a place, commits wait rather than being
    // acknowledged with no standby holding them.
    let seeded: Vec<String> = if d.spec.synchronous_replication && d.spec.min_sync > 0 {
        let old = f.synchronous_standbys.clone();
        let mut s: BTreeSet<String> = old.into_iter().filter(|u| u != to).collect();
        s.insert(from.to_owned());
        s.into_iter().collect()
    } else {
        Vec::new()
    };
    for (uid, db) in d.dbs.iter_mut() {
        let spec = if uid == to {
            DbSpec {
                role: Role::Master,
                follow: None,
                synchronous_standbys: seeded.clone(),
                reinit: false,
            }
        } else if db.spec.role == Role::None || uid == from || f.fence.contains(uid) {
            // Stopped ones rejoin as standbys once the new primary runs.
            DbSpec {
                reinit: db.spec.reinit,
                ..stopped()
            }
        } else {
            // The other standbys follow the new primary once it runs as
            // one, not before: a candidate that never gets there (it is
            // given up on) must not have been followed, and rewound onto.
            db.spec.clone()
        };
        set_spec(db, spec);
        if uid == to {
            db.status.sync_confirmed.clear();
        }
    }
    if let Some(f) = d.failover.as_mut() {
        f.to = Some(to.to_owned());
    }
}

/// Whether a database given the primary role runs as one, with its spec
/// (synchronous standbys included) applied. In a standby cluster the
/// standby leader runs in recovery, following the source.
fn is_ready(d: &ClusterData, db: &Db) -> bool {
    db.status.healthy
        && (d.spec.is_standby() || !db.status.in_recovery)
        && db.status.applied_generation >= db.generation
}

fn name_primary(d: &mut ClusterData, wall_ms: u64) {
    if d.failover.as_ref().is_some_and(|f| f.to.is_none()) {
        return;
    }
    let Some(m) = master(d) else { return };
    let db = &d.dbs[&m];
    if !d.spec.is_standby()
        && d.spec.standby_source.is_some()
        && d.proxy.master_db.as_deref() == Some(m.as_str())
        && db.status.healthy
        && db.status.in_recovery
    {
        // A standby cluster promoted (`ctl promote`): its leader is named
        // again once it has left recovery, so that no write is routed to
        // it while it cannot take one.
        d.set_proxy_master(None);
    }
    let ready = is_ready(d, &d.dbs[&m]);
    if ready && d.proxy.master_db.as_deref() != Some(m.as_str()) {
        // A primary given back after a cancelled failover is no change.
        let change = match &d.failover {
            Some(f) => Some((f.reason.clone(), Some(f.from.clone()))),
            None if d.proxy.generation == 0 => Some(("initial".to_owned(), None)),
            None if d
                .history
                .last()
                .is_some_and(|h| h.to == m && h.timeline < d.dbs[&m].status.timeline) =>
            {
                Some(("promoted".to_owned(), Some(m.clone())))
            }
            None => None,
        };
        if let Some((reason, from)) = change {
            let s = &d.dbs[&m].status;
            d.history.push(PrimaryChange {
                at_ms: wall_ms,
                reason,
                from,
                to: m.clone(),
                timeline: s.timeline,
                lsn: s.lsn,
            });
            let excess = d.history.len().saturating_sub(HISTORY_LEN);
            d.history.drain(..excess);
        }
        d.set_proxy_master(Some(&m));
    }
    if ready {
        d.failover = None;
    }
}

/// Keeps the primary's synchronous standbys and its confirmed set.
fn manage_sync(d: &mut ClusterData) {
    let Some(m) = master(d) else { return };
    if !d.spec.synchronous_replication || d.spec.max_sync == 0 {
        if let Some(db) = d.dbs.get_mut(&m) {
            let spec = DbSpec {
                synchronous_standbys: Vec::new(),
                ..db.spec.clone()
            };
            set_spec(db, spec);
            db.status.sync_confirmed.clear();
        }
        return;
    }
    confirm_sync(d, &m);
    if d.failover.is_some() || !is_ready(d, &d.dbs[&m]) {
        // Only a running primary can take a new set: changing it for one
        // that is down or being promoted would only shrink what is
        // confirmed. A promoted primary's set was seeded; it changes once
        // the primary runs.
        return;
    }
    let (min, max) = (d.spec.min_sync as usize, d.spec.max_sync as usize);
    let master_db = &d.dbs[&m];
    let cur = master_db.spec.synchronous_standbys.clone();
    let reported = &master_db.status.synchronous_standbys;
    let applied = master_db.status.applied_generation >= master_db.generation;
    let live = |uid: &str| {
        d.dbs.get(uid).is_some_and(|db| {
            uid != m
                && db.spec.role == Role::Standby
                && db.spec.follow.as_deref() == Some(m.as_str())
                && db.status.healthy
                && db.status.streaming
        })
    };
    let no_sync = |uid: &str| {
        d.dbs
            .get(uid)
            .and_then(|db| d.keepers.get(&db.keeper))
            .is_some_and(|k| k.no_sync)
    };
    let sync_now = |uid: &str| reported.iter().any(|r| r == uid);
    // Current members first (no flapping between equally good standbys),
    // then the most advanced other streaming followers.
    let mut candidates: Vec<&String> = d.dbs.keys().filter(|u| live(u) && !no_sync(u)).collect();
    candidates.sort_by(|a, b| {
        let (ia, ib) = (cur.contains(a), cur.contains(b));
        ib.cmp(&ia)
            .then_with(|| d.dbs[*b].status.lsn.cmp(&d.dbs[*a].status.lsn))
            .then_with(|| a.cmp(b))
    });
    let mut target: Vec<String> = candidates.into_iter().take(max).cloned().collect();
    // Never fewer than min_sync: keep members that are gone, so that
    // commits wait rather than succeed unprotected.
    for o in &cur {
        if target.len() >= min {
            break;
        }
        if !target.contains(o) {
            target.push(o.clone());
        }
    }
    target.sort();
    if target == cur {
        return;
    }
    let added: Vec<&String> = target.iter().filter(|t| !cur.contains(t)).collect();
    let dropped_live: Vec<&String> = cur
        .iter()
        .filter(|c| !target.contains(c) && live(c) && sync_now(c))
        .collect();
    // The confirmed members hold every acknowledged commit, and only they
    // can be promoted. A change that would leave none of them (a member
    // that merely missed a report replaced at once) would leave a window
    // in which the primary's failure could not be failed over.
    let confirmed = &master_db.status.sync_confirmed;
    let orphans_confirmed =
        min > 0 && !confirmed.is_empty() && !target.iter().any(|t| confirmed.contains(t));
    let next = if !added.is_empty() && (!dropped_live.is_empty() || orphans_confirmed) {
        // Replacing a member that protects commits now, or the last
        // confirmed one: first the union, so the new members protect
        // commits (and are confirmed) before the old one leaves.
        let mut u = cur.clone();
        u.extend(added.into_iter().cloned());
        u.sort();
        u
    } else if added.is_empty()
        && !dropped_live.is_empty()
        && !(applied && target.iter().all(|t| sync_now(t)))
    {
        // Shrinking away from a live synchronous member: only once the
        // members that stay are reported synchronous.
        return;
    } else if orphans_confirmed {
        // Shrinking away from the last confirmed members: only once a
        // member that stays is confirmed.
        return;
    } else {
        target
    };
    if next != cur {
        if let Some(db) = d.dbs.get_mut(&m) {
            let spec = DbSpec {
                synchronous_standbys: next,
                ..db.spec.clone()
            };
            set_spec(db, spec);
        }
        confirm_sync(d, &m);
    }
}

/// The confirmed set: members the primary runs with and reports
/// synchronous join; members the spec no longer names leave at once.
fn confirm_sync(d: &mut ClusterData, m: &str) {
    let Some(db) = d.dbs.get_mut(m) else { return };
    let spec = db.spec.synchronous_standbys.clone();
    let s = &mut db.status;
    s.sync_confirmed.retain(|u| spec.contains(u));
    if s.healthy && s.applied_generation >= db.generation {
        for u in &s.synchronous_standbys {
            if spec.contains(u) && !s.sync_confirmed.contains(u) {
                s.sync_confirmed.push(u.clone());
            }
        }
    }
    s.sync_confirmed.sort();
}
