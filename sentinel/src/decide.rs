//! The sentinel's decisions, as one pure function:
//! `decide(current, observations, now) -> next`.
//!
//! All I/O stays outside: the caller reads `clusterdata`, the keepers'
//! reports and the proxies' registrations, calls [`decide`], and writes the
//! result back by compare-and-swap if it differs. The function is
//! deterministic, so every rule is pinned by table-driven tests.
//!
//! Rules, in the order they apply:
//! 1. keepers that report for the first time join, each with one database;
//! 2. database status follows the keepers' reports; a database without a
//!    report, or reported unhealthy, gets a failure timer, kept in the data
//!    so that a new sentinel leader does not restart it from zero;
//! 3. a new cluster elects its first primary among the reporting keepers
//!    (highest priority, then name), never one marked `never_primary`;
//! 4. a primary whose timer passes `fail_interval` is failed over, if an
//!    eligible standby exists: first the proxies are told there is no
//!    primary (fencing); only once every live proxy has acknowledged that
//!    generation is the most advanced eligible standby (highest timeline,
//!    then highest LSN, then priority) promoted;
//! 5. a promoted database is named to proxies once it reports it has left
//!    recovery at the generation it was given;
//! 6. a keeper an operator marked failed (`ctl failkeeper`) counts as
//!    failed past `fail_interval` for one decision, so its primary is
//!    failed over at once if a standby is eligible; the mark is then
//!    cleared;
//! 7. in synchronous mode the primary's synchronous standbys are kept
//!    between `min_sync` and `max_sync`, growing through the union of old
//!    and new sets and never dropping below `min_sync` (commits block
//!    rather than be lost); only a standby the primary reported as
//!    synchronous can be elected.

use std::collections::BTreeMap;

use cluster::data::{ClusterPhase, Db, DbSpec, Failover, Keeper, KeeperReport, Role, SWITCHOVER};
use cluster::ClusterData;

/// What the sentinel saw in the store this round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observations {
    /// Live keepers' reports, by keeper uid (`keepers/<uid>`).
    pub keepers: BTreeMap<String, KeeperReport>,
    /// Live proxies and the generation each has applied (`proxies/<uid>`).
    pub proxies: BTreeMap<String, u64>,
    /// When this sentinel last saw each keeper report a healthy database
    /// (wall-clock ms). A failure timer starts there rather than when the
    /// report vanished, a lease TTL later. Empty after a leader change.
    pub last_healthy_ms: BTreeMap<String, u64>,
}

/// Computes the next cluster data. Pure: same inputs, same output.
pub fn decide(current: &ClusterData, obs: &Observations, now_ms: u64) -> ClusterData {
    let mut d = current.clone();
    join_keepers(&mut d, obs);
    update_status(&mut d, obs, now_ms);
    if d.phase == ClusterPhase::Initializing {
        initialize(&mut d, obs);
    }
    rejoin(&mut d, obs);
    failover(&mut d, obs, now_ms);
    name_primary(&mut d);
    if d.spec.synchronous_replication {
        manage_sync(&mut d);
    }
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
        synchronous_standbys: Vec::new(),
    }
}

fn join_keepers(d: &mut ClusterData, obs: &Observations) {
    let m = master(d);
    for (uid, r) in &obs.keepers {
        if d.keepers.contains_key(uid) {
            continue;
        }
        d.keepers.insert(
            uid.clone(),
            Keeper {
                priority: r.priority,
                never_primary: r.never_primary,
                failed: false,
            },
        );
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
                status: Default::default(),
            },
        );
    }
}

fn update_status(d: &mut ClusterData, obs: &Observations, now_ms: u64) {
    for db in d.dbs.values_mut() {
        let s = &mut db.status;
        if d.keepers.get(&db.keeper).is_some_and(|k| k.failed) {
            s.healthy = false;
            s.unhealthy_since_ms = Some(0);
            continue;
        }
        match obs.keepers.get(&db.keeper) {
            Some(r) => {
                s.healthy = r.healthy;
                s.address = r.address.clone();
                s.in_recovery = r.in_recovery;
                s.lsn = r.lsn;
                s.timeline = r.timeline;
                if r.system_id.is_some() {
                    s.system_id = r.system_id.clone();
                }
                s.applied_generation = r.applied_generation;
                s.synchronous_standbys = r.synchronous_standbys.clone();
                s.replay_lsn = r.replay_lsn;
                s.replay_lag_ms = r.replay_lag_ms;
                s.streaming = r.streaming;
            }
            // Keep the last known LSN, timeline and sync set: they decide
            // who may take over from a dead primary.
            None => s.healthy = false,
        }
        if s.healthy {
            s.unhealthy_since_ms = None;
        } else if s.unhealthy_since_ms.is_none() {
            let last = obs
                .last_healthy_ms
                .get(&db.keeper)
                .copied()
                .unwrap_or(now_ms);
            s.unhealthy_since_ms = Some(last.min(now_ms));
        }
    }
}

fn initialize(d: &mut ClusterData, obs: &Observations) {
    if master(d).is_some() {
        d.phase = ClusterPhase::Normal;
        return;
    }
    let first = obs
        .keepers
        .keys()
        .filter(|uid| d.keepers.get(*uid).is_some_and(|k| !k.never_primary))
        .max_by(|a, b| {
            let (pa, pb) = (d.keepers[*a].priority, d.keepers[*b].priority);
            pa.cmp(&pb).then_with(|| b.cmp(a))
        })
        .cloned();
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

/// Databases left without a role (a failed primary, a new keeper before a
/// primary existed) follow the primary once their keeper reports again,
/// whether or not its PostgreSQL runs: the keeper starts it as a standby.
/// Not before the primary has left recovery: a former primary rewound onto
/// a standby that is still being promoted would find "the same timeline",
/// keep its diverged WAL, and never be able to follow.
fn rejoin(d: &mut ClusterData, obs: &Observations) {
    let Some(m) = master(d) else { return };
    if !is_ready(&d.dbs[&m]) {
        return;
    }
    for (uid, db) in d.dbs.iter_mut() {
        if *uid != m && db.spec.role == Role::None && obs.keepers.contains_key(&db.keeper) {
            set_spec(db, follower(&m));
        }
    }
}

/// Whether every live proxy has applied `generation`. Proxies whose lease
/// ended are not in the observations and do not hold the failover up.
fn proxies_acked(obs: &Observations, generation: u64) -> bool {
    obs.proxies.values().all(|g| *g >= generation)
}

/// The standby to promote in place of `from`, if one is eligible.
pub fn choose_candidate(d: &ClusterData, from: &str) -> Option<String> {
    choose_candidate_among(d, from, |_| true)
}

fn choose_candidate_among(
    d: &ClusterData,
    from: &str,
    only: impl Fn(&str) -> bool,
) -> Option<String> {
    let old = d.dbs.get(from)?;
    let sync_set = &old.status.synchronous_standbys;
    d.dbs
        .iter()
        .filter(|(uid, db)| {
            let keeper = d.keepers.get(&db.keeper);
            *uid != from
                && only(uid)
                && db.spec.role == Role::Standby
                && db.status.healthy
                && db.status.in_recovery
                && keeper.is_some_and(|k| !k.never_primary)
                && (old.status.system_id.is_none() || db.status.system_id == old.status.system_id)
                && db.status.timeline >= old.status.timeline
                && old.status.lsn.saturating_sub(db.status.lsn) <= d.spec.max_standby_lag_bytes
                && (!d.spec.synchronous_replication || sync_set.contains(uid))
        })
        // Most advanced first: highest timeline, then highest LSN, then
        // priority, then name for determinism.
        .max_by(|(ua, a), (ub, b)| {
            let pa = d.keepers.get(&a.keeper).map_or(0, |k| k.priority);
            let pb = d.keepers.get(&b.keeper).map_or(0, |k| k.priority);
            a.status
                .timeline
                .cmp(&b.status.timeline)
                .then(a.status.lsn.cmp(&b.status.lsn))
                .then(pa.cmp(&pb))
                .then_with(|| ub.cmp(ua))
        })
        .map(|(uid, _)| uid.clone())
}

fn failover(d: &mut ClusterData, obs: &Observations, now_ms: u64) {
    if let Some(f) = d.failover.clone() {
        if f.to.is_some() {
            return;
        }
        if !proxies_acked(obs, f.fence_generation) {
            return;
        }
        if f.reason == SWITCHOVER {
            switchover(d, obs, &f);
            return;
        }
        match choose_candidate(d, &f.from) {
            Some(to) => promote(d, &f.from, &to),
            None if d.dbs.get(&f.from).is_some_and(|db| db.status.healthy) => {
                // No one to promote and the old primary is back: keep it.
                d.failover = None;
            }
            None => {}
        }
        return;
    }
    let Some(m) = master(d) else { return };
    let fail_ms = d.spec.fail_interval.as_millis() as u64;
    let failed = d.dbs[&m]
        .status
        .unhealthy_since_ms
        .is_some_and(|since| now_ms.saturating_sub(since) >= fail_ms);
    if !failed || choose_candidate(d, &m).is_none() {
        return;
    }
    // Step one of the fencing handshake: no proxy may route to the old
    // primary before a new one is named.
    d.set_proxy_master(None);
    d.failover = Some(Failover {
        from: m,
        fence_generation: d.proxy.generation,
        to: None,
        reason: "failover".into(),
        requested: None,
    });
}

/// A planned switchover, once the proxies hold new clients: stop the old
/// primary (a clean shutdown sends every WAL record to the streaming
/// standbys), wait until the target has received all the old primary had,
/// then promote it.
fn switchover(d: &mut ClusterData, obs: &Observations, f: &Failover) {
    let target = f
        .requested
        .clone()
        .filter(|t| eligible(d, &f.from, t))
        .or_else(|| choose_candidate(d, &f.from));
    let Some(target) = target else {
        // No standby can take over: give the primary back.
        if let Some(db) = d.dbs.get_mut(&f.from) {
            set_spec(
                db,
                DbSpec {
                    role: Role::Master,
                    ..db.spec.clone()
                },
            );
        }
        d.failover = None;
        return;
    };
    let Some(old) = d.dbs.get(&f.from) else {
        return;
    };
    if old.spec.role == Role::Master {
        let spec = DbSpec {
            role: Role::None,
            ..Default::default()
        };
        if let Some(db) = d.dbs.get_mut(&f.from) {
            set_spec(db, spec);
        }
        return;
    }
    let stopped = obs
        .keepers
        .get(&old.keeper)
        .is_some_and(|r| !r.healthy && r.applied_generation >= old.generation);
    let caught_up = d
        .dbs
        .get(&target)
        .is_some_and(|t| t.status.lsn >= old.status.lsn);
    if stopped && caught_up {
        let from = f.from.clone();
        promote(d, &from, &target);
    }
}

/// Whether `uid` may replace the primary `from`.
fn eligible(d: &ClusterData, from: &str, uid: &str) -> bool {
    choose_candidate_among(d, from, |u| u == uid).is_some()
}

fn promote(d: &mut ClusterData, from: &str, to: &str) {
    for (uid, db) in d.dbs.iter_mut() {
        let spec = if uid == to {
            DbSpec {
                role: Role::Master,
                ..Default::default()
            }
        } else if uid == from {
            // The old primary rejoins as a standby once it is back.
            DbSpec::default()
        } else {
            follower(to)
        };
        set_spec(db, spec);
    }
    if let Some(f) = d.failover.as_mut() {
        f.to = Some(to.to_owned());
    }
}

/// Whether a database given the primary role runs as one.
fn is_ready(db: &Db) -> bool {
    db.status.healthy && !db.status.in_recovery && db.status.applied_generation >= db.generation
}

fn name_primary(d: &mut ClusterData) {
    if d.failover.as_ref().is_some_and(|f| f.to.is_none()) {
        return;
    }
    let Some(m) = master(d) else { return };
    let ready = is_ready(&d.dbs[&m]);
    if ready && d.proxy.master_db.as_deref() != Some(m.as_str()) {
        d.set_proxy_master(Some(&m));
    }
    if ready {
        d.failover = None;
    }
}

fn manage_sync(d: &mut ClusterData) {
    let Some(m) = master(d) else { return };
    let (min, max) = (d.spec.min_sync as usize, d.spec.max_sync as usize);
    let mut followers: Vec<(&String, &Db)> = d
        .dbs
        .iter()
        .filter(|(uid, db)| {
            **uid != m
                && db.spec.role == Role::Standby
                && db.spec.follow.as_deref() == Some(m.as_str())
                && db.status.healthy
        })
        .collect();
    followers.sort_by(|(ua, a), (ub, b)| b.status.lsn.cmp(&a.status.lsn).then_with(|| ua.cmp(ub)));
    let mut desired: Vec<String> = followers
        .iter()
        .take(max)
        .map(|(uid, _)| (*uid).clone())
        .collect();
    let master_db = &d.dbs[&m];
    let old = master_db.spec.synchronous_standbys.clone();
    // Never fewer than min_sync: keep unhealthy ones from the old set, so
    // that commits wait rather than succeed unprotected.
    for o in &old {
        if desired.len() >= min {
            break;
        }
        if !desired.contains(o) {
            desired.push(o.clone());
        }
    }
    desired.sort();
    let mut next = old.clone();
    let grow = desired.iter().any(|s| !old.contains(s));
    if grow {
        // First the union: the new members start protecting commits before
        // any old member stops.
        for s in &desired {
            if !next.contains(s) {
                next.push(s.clone());
            }
        }
    } else if desired != old && master_db.status.applied_generation >= master_db.generation {
        next = desired;
    }
    next.sort();
    if next != old {
        let mut spec = master_db.spec.clone();
        spec.synchronous_standbys = next;
        if let Some(db) = d.dbs.get_mut(&m) {
            set_spec(db, spec);
        }
    }
}
