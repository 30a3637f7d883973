//! Table-driven tests of `decide`: each row is a situation and what a
//! correct sentinel does in it.

use cluster::data::{ClusterPhase, Db, DbSpec, DbStatus, Keeper, KeeperReport, ProxyReport, Role};
use cluster::{ClusterData, ClusterSpec};

use crate::decide::{choose_candidate, decide, master, Observations};

const T0: u64 = 1_000_000;
const SEC: u64 = 1000;

fn rep(uid: &str, healthy: bool, in_recovery: bool, lsn: u64, timeline: u32) -> KeeperReport {
    KeeperReport {
        uid: uid.into(),
        instance: "i1".into(),
        seq: 1,
        healthy,
        running: healthy,
        address: Some(format!("{uid}:5432")),
        in_recovery,
        lsn: Some(lsn),
        timeline: Some(timeline),
        system_id: Some("sys1".into()),
        applied_generation: 0,
        synchronous_standbys: Some(Vec::new()),
        streaming: healthy && in_recovery,
        streaming_age_ms: (healthy && in_recovery).then_some(0),
        ..Default::default()
    }
}

/// What a live keeper reports when its PostgreSQL is down, hung or
/// crash-looping: nothing it would have to read from PostgreSQL.
fn dead_pg(uid: &str, applied: u64) -> KeeperReport {
    KeeperReport {
        uid: uid.into(),
        instance: "i1".into(),
        seq: 2,
        address: Some(format!("{uid}:5432")),
        applied_generation: applied,
        system_id: Some("sys1".into()),
        problem: Some("PostgreSQL does not answer".into()),
        ..Default::default()
    }
}

/// A normal cluster: `m` is the named primary, the rest follow it and
/// stream; every database healthy at LSN 100 on timeline 1, specs applied.
fn cluster(m: &str, standbys: &[&str]) -> ClusterData {
    let mut d = ClusterData::new(ClusterSpec::default());
    d.uid = "c1".into();
    d.phase = ClusterPhase::Normal;
    let all: Vec<&str> = std::iter::once(m).chain(standbys.iter().copied()).collect();
    for uid in all {
        d.keepers.insert(uid.into(), Keeper::default());
        let spec = if uid == m {
            DbSpec {
                role: Role::Master,
                ..Default::default()
            }
        } else {
            DbSpec {
                role: Role::Standby,
                follow: Some(m.into()),
                ..Default::default()
            }
        };
        d.dbs.insert(
            uid.into(),
            Db {
                keeper: uid.into(),
                generation: 1,
                restart: 0,
                backup: None,
                spec,
                status: DbStatus {
                    healthy: true,
                    running: true,
                    address: Some(format!("{uid}:5432")),
                    in_recovery: uid != m,
                    lsn: 100,
                    timeline: 1,
                    system_id: Some("sys1".into()),
                    applied_generation: 1,
                    streaming: uid != m,
                    ..Default::default()
                },
            },
        );
    }
    d.set_proxy_master(Some(m));
    d
}

/// A cluster in synchronous mode whose primary `m` runs with, and has
/// confirmed, the synchronous standbys `sync`.
fn sync_cluster(m: &str, standbys: &[&str], sync: &[&str]) -> ClusterData {
    let mut d = cluster(m, standbys);
    d.spec.synchronous_replication = true;
    let names: Vec<String> = sync.iter().map(|s| s.to_string()).collect();
    let db = d.dbs.get_mut(m).expect("primary");
    db.spec.synchronous_standbys = names.clone();
    db.status.synchronous_standbys = names.clone();
    db.status.sync_confirmed = names;
    d
}

/// Observations matching the cluster's current statuses, as keepers would
/// report them; `missing` keepers do not report and hold no lease. This
/// sentinel has observed since a minute before T0 and saw every healthy
/// database healthy at T0.
fn observe(d: &ClusterData, missing: &[&str]) -> Observations {
    let mut o = Observations {
        since_ms: T0 - 60 * SEC,
        ..Default::default()
    };
    for (uid, db) in &d.dbs {
        if db.status.healthy {
            o.last_healthy_ms.insert(uid.clone(), T0);
        }
        if missing.contains(&uid.as_str()) {
            continue;
        }
        let mut r = rep(
            uid,
            db.status.healthy,
            db.status.in_recovery,
            db.status.lsn,
            db.status.timeline,
        );
        r.running = db.status.running;
        r.applied_generation = db.status.applied_generation;
        r.system_id = db.status.system_id.clone();
        r.synchronous_standbys = Some(db.status.synchronous_standbys.clone());
        r.streaming = db.status.streaming;
        r.streaming_age_ms = db.status.streaming.then_some(0);
        o.keepers.insert(uid.clone(), r);
        o.registered.insert(uid.clone());
    }
    o
}

fn with(mut o: Observations, uid: &str, f: impl FnOnce(&mut KeeperReport)) -> Observations {
    if let Some(r) = o.keepers.get_mut(uid) {
        f(r);
    }
    o
}

/// The keeper of `uid` acknowledges its demotion: PostgreSQL stopped at
/// the database's current generation.
fn acked(o: Observations, d: &ClusterData, uid: &str) -> Observations {
    let gen = d.dbs[uid].generation;
    with(o, uid, |r| {
        r.healthy = false;
        r.running = false;
        r.applied_generation = gen;
        r.lsn = None;
        r.synchronous_standbys = None;
    })
}

fn proxy(generation: u64) -> ProxyReport {
    ProxyReport {
        uid: "p".into(),
        instance: "pi".into(),
        generation,
        cluster_uid: "c1".into(),
    }
}

/// Runs decide until the master is reported dead for `fail_interval` and
/// the proxies (none here) have acknowledged: returns the data after
/// promotion. The primary's keeper is gone (no report, no lease).
fn fail_master(
    d: &ClusterData,
    m: &str,
    tweak: impl Fn(Observations) -> Observations,
) -> ClusterData {
    let o = tweak(observe(d, &[m]));
    let d1 = decide(d, &o, T0);
    let d2 = decide(&d1, &o, T0 + 5 * SEC);
    decide(&d2, &o, T0 + 5 * SEC + 1)
}

/// The primary m, whose keeper lost its lease, last reported reading the
/// cluster data of membership 2; s1 joined at 2, s2 (more advanced) at 3:
/// the data after the failover.
fn late_joiner(failsafe: bool) -> ClusterData {
    let mut d = cluster("m", &["s1", "s2"]);
    d.spec.failsafe = failsafe;
    d.membership = 3;
    d.dbs.get_mut("m").unwrap().status.membership = 2;
    d.keepers.get_mut("s1").unwrap().joined = 2;
    d.keepers.get_mut("s2").unwrap().joined = 3;
    d.dbs.get_mut("s2").unwrap().status.lsn = 200;
    let o = with(observe(&d, &["m"]), "s2", |r| r.lsn = Some(200));
    fail_master(&d, "m", |_| o.clone())
}

/// Decides at each of `times` with the same observations.
fn rounds(d: &ClusterData, o: &Observations, times: &[u64]) -> ClusterData {
    let mut d = d.clone();
    for t in times {
        d = decide(&d, o, *t);
    }
    d
}

/// What `keelson ctl switchover` writes.
fn switchover_requested(mut d: ClusterData, to: Option<&str>) -> ClusterData {
    let sync = d.dbs["m"].spec.synchronous_standbys.clone();
    d.set_proxy_master(None);
    d.failover = Some(cluster::data::Failover {
        from: "m".into(),
        fence: vec!["m".into()],
        fence_generation: d.proxy.generation,
        to: None,
        reason: cluster::data::SWITCHOVER.into(),
        requested: to.map(str::to_owned),
        synchronous_standbys: sync,
        ..Default::default()
    });
    d
}

type Check = fn(&ClusterData);

struct Case {
    name: &'static str,
    run: fn() -> ClusterData,
    check: Check,
}

fn cases() -> Vec<Case> {
    vec![
        // ---- tags
        Case {
            name: "tags: a no-sync standby is never chosen as synchronous, however advanced",
            run: || {
                let mut d = cluster("m", &["s1", "s2"]);
                d.spec.synchronous_replication = true;
                d.keepers.get_mut("s1").unwrap().no_sync = true;
                let o = with(observe(&d, &[]), "s1", |r| r.lsn = Some(500));
                rounds(&d, &o, &[T0, T0 + SEC])
            },
            check: |d| assert_eq!(d.dbs["m"].spec.synchronous_standbys, vec!["s2".to_string()]),
        },
        Case {
            name: "tags: a no-loadbalance standby is left out of the proxies' replicas",
            run: || {
                let mut d = cluster("m", &["s1", "s2"]);
                d.keepers.get_mut("s2").unwrap().no_loadbalance = true;
                d
            },
            check: |d| {
                let v = d.proxy_view();
                let addrs: Vec<&str> = v.replicas.iter().map(|r| r.address.as_str()).collect();
                assert_eq!(addrs, vec!["s1:5432"]);
            },
        },
        Case {
            name: "tags: flags are taken at join and when they change; the same flags leave ctl's values",
            run: || {
                let d = cluster("m", &["s1"]);
                let flags = |p: i32| {
                    Some(cluster::data::Tags {
                        priority: p,
                        ..Default::default()
                    })
                };
                // A new keeper joins with its flags.
                let o = with(observe(&d, &[]), "s2", |_| ());
                let mut o = o;
                let mut r = fresh_keeper("s2");
                r.tags = flags(1);
                o.keepers.insert("s2".into(), r);
                let mut d = decide(&d, &o, T0);
                assert_eq!(d.keepers["s2"].priority, 1, "taken at join");
                // `ctl keeper s2 set --priority 7`; the keeper reports the same flags.
                d.keepers.get_mut("s2").unwrap().priority = 7;
                let d = decide(&d, &o, T0 + SEC);
                assert_eq!(d.keepers["s2"].priority, 7, "unchanged flags do not undo ctl");
                // Restarted with other flags: they win.
                let o = with(o, "s2", |r| r.tags = flags(3));
                decide(&d, &o, T0 + 2 * SEC)
            },
            check: |d| assert_eq!(d.keepers["s2"].priority, 3),
        },
        // ---- maintenance mode and history
        Case {
            name: "paused: a dead primary is not failed over, and the notice says why",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.paused = true;
                let o = observe(&d, &["m"]);
                rounds(&d, &o, &[T0, T0 + 5 * SEC, T0 + 15 * SEC, T0 + 15 * SEC + 1])
            },
            check: |d| {
                assert!(d.failover.is_none(), "{:?}", d.failover);
                assert_eq!(d.proxy.master_db.as_deref(), Some("m"));
                let n = d.notice.as_deref().unwrap_or_default();
                assert!(n.contains("paused") && n.contains("ctl resume"), "{n}");
            },
        },
        Case {
            name: "paused: failkeeper still fails over",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.paused = true;
                d.keepers.get_mut("m").unwrap().failed = true;
                decide(&d, &observe(&d, &[]), T0)
            },
            check: |d| assert_eq!(d.failover.as_ref().map(|f| f.from.as_str()), Some("m")),
        },
        Case {
            name: "resumed: a primary that failed while paused is failed over at once",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.paused = true;
                let o = observe(&d, &["m"]);
                let mut d = rounds(&d, &o, &[T0, T0 + 5 * SEC, T0 + 15 * SEC]);
                assert!(d.failover.is_none());
                d.paused = false;
                decide(&d, &o, T0 + 15 * SEC + 1)
            },
            check: |d| assert_eq!(d.failover.as_ref().map(|f| f.from.as_str()), Some("m")),
        },
        Case {
            name: "history: a failover is recorded once the new primary runs, with reason, timeline and LSN",
            run: || {
                let d = cluster("m", &["s1"]);
                let d = fail_master(&d, "m", |o| o);
                assert_eq!(d.failover.as_ref().and_then(|f| f.to.as_deref()), Some("s1"));
                assert!(d.history.is_empty(), "not before it runs as primary");
                let gen = d.dbs["s1"].generation;
                let o = with(observe(&d, &["m"]), "s1", |r| {
                    r.in_recovery = false;
                    r.applied_generation = gen;
                    r.timeline = Some(2);
                    r.lsn = Some(300);
                });
                let o = Observations {
                    wall_ms: 1_700_000_000_000,
                    ..o
                };
                rounds(&d, &o, &[T0 + 7 * SEC, T0 + 8 * SEC])
            },
            check: |d| {
                assert_eq!(d.proxy.master_db.as_deref(), Some("s1"));
                assert_eq!(
                    d.history,
                    vec![cluster::data::PrimaryChange {
                        at_ms: 1_700_000_000_000,
                        reason: "failover".into(),
                        from: Some("m".into()),
                        to: "s1".into(),
                        timeline: 2,
                        lsn: 300,
                    }],
                    "recorded once"
                );
            },
        },
        // ---- bring-up
        Case {
            name: "a new cluster with no keepers waits",
            run: || {
                decide(
                    &ClusterData::new(ClusterSpec::default()),
                    &Observations::default(),
                    T0,
                )
            },
            check: |d| {
                assert_eq!(d.phase, ClusterPhase::Initializing);
                assert!(master(d).is_none());
            },
        },
        Case {
            name: "the first keeper becomes the first primary",
            run: || {
                let mut o = Observations::default();
                o.keepers.insert("k1".into(), fresh_keeper("k1"));
                decide(&ClusterData::new(ClusterSpec::default()), &o, T0)
            },
            check: |d| {
                assert_eq!(d.phase, ClusterPhase::Normal);
                assert_eq!(master(d).as_deref(), Some("k1"));
                assert_eq!(d.proxy.master_db, None, "not named before it runs");
            },
        },
        Case {
            name: "the highest priority keeper is the first primary",
            run: || {
                let mut o = Observations::default();
                o.keepers.insert("a".into(), fresh_keeper("a"));
                let mut b = fresh_keeper("b");
                b.tags = Some(cluster::data::Tags {
                    priority: 5,
                    ..Default::default()
                });
                o.keepers.insert("b".into(), b);
                decide(&ClusterData::new(ClusterSpec::default()), &o, T0)
            },
            check: |d| {
                assert_eq!(master(d).as_deref(), Some("b"));
                assert_eq!(d.dbs["a"].spec.follow.as_deref(), Some("b"));
            },
        },
        Case {
            name: "equal priorities: the first name wins",
            run: || {
                let mut o = Observations::default();
                for k in ["c", "a", "b"] {
                    o.keepers.insert(k.into(), fresh_keeper(k));
                }
                decide(&ClusterData::new(ClusterSpec::default()), &o, T0)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("a")),
        },
        Case {
            name: "a never-primary keeper is not the first primary",
            run: || {
                let mut o = Observations::default();
                let mut a = fresh_keeper("a");
                a.tags = Some(cluster::data::Tags {
                    never_primary: true,
                    ..Default::default()
                });
                o.keepers.insert("a".into(), a);
                o.keepers.insert("b".into(), fresh_keeper("b"));
                decide(&ClusterData::new(ClusterSpec::default()), &o, T0)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("b")),
        },
        Case {
            name: "only never-primary keepers: no primary",
            run: || {
                let mut o = Observations::default();
                let mut a = fresh_keeper("a");
                a.tags = Some(cluster::data::Tags {
                    never_primary: true,
                    ..Default::default()
                });
                o.keepers.insert("a".into(), a);
                decide(&ClusterData::new(ClusterSpec::default()), &o, T0)
            },
            check: |d| {
                assert!(master(d).is_none());
                assert_eq!(d.phase, ClusterPhase::Initializing);
            },
        },
        Case {
            name: "F12: keepers that already hold data: no election without --existing",
            run: || {
                let mut o = Observations::default();
                o.keepers.insert("k1".into(), rep("k1", true, false, 100, 1));
                o.keepers.insert("k2".into(), rep("k2", true, false, 900, 2));
                decide(&ClusterData::new(ClusterSpec::default()), &o, T0)
            },
            check: |d| {
                assert!(master(d).is_none(), "electing by name could discard k2's newer data");
                let n = d.notice.as_deref().unwrap_or_default();
                assert!(n.contains("k1, k2") && n.contains("--existing"), "{n}");
            },
        },
        Case {
            name: "F12: --existing elects the named keeper's data",
            run: || {
                let mut o = Observations::default();
                o.keepers.insert("k1".into(), rep("k1", true, false, 100, 1));
                o.keepers.insert("k2".into(), rep("k2", true, false, 900, 2));
                let mut d = ClusterData::new(ClusterSpec::default());
                d.init_existing = Some("k2".into());
                decide(&d, &o, T0)
            },
            check: |d| {
                assert_eq!(master(d).as_deref(), Some("k2"));
                assert_eq!(d.dbs["k1"].spec.follow.as_deref(), Some("k2"));
            },
        },
        Case {
            name: "F12: --existing waits for the named keeper",
            run: || {
                let mut o = Observations::default();
                o.keepers.insert("k1".into(), fresh_keeper("k1"));
                let mut d = ClusterData::new(ClusterSpec::default());
                d.init_existing = Some("k2".into());
                decide(&d, &o, T0)
            },
            check: |d| {
                assert!(master(d).is_none());
                assert!(d.notice.as_deref().unwrap_or_default().contains("k2"));
            },
        },
        Case {
            name: "a keeper whose slot name collides with another's does not join",
            run: || {
                let d = cluster("m", &["k-1"]);
                let mut o = observe(&d, &[]);
                o.keepers.insert("k_1".into(), fresh_keeper("k_1"));
                o.registered.insert("k_1".into());
                decide(&d, &o, T0)
            },
            check: |d| {
                assert!(!d.dbs.contains_key("k_1"));
                assert!(d.notice.as_deref().unwrap_or_default().contains("k-1"));
            },
        },
        Case {
            name: "the primary is named once it runs its generation",
            run: || {
                let mut o = Observations::default();
                o.keepers.insert("k1".into(), fresh_keeper("k1"));
                let d = decide(&ClusterData::new(ClusterSpec::default()), &o, T0);
                let gen = d.dbs["k1"].generation;
                let o = with(o, "k1", |r| {
                    *r = rep("k1", true, false, 100, 1);
                    r.applied_generation = gen;
                });
                decide(&d, &o, T0 + SEC)
            },
            check: |d| {
                assert_eq!(d.proxy.master_db.as_deref(), Some("k1"));
                assert_eq!(d.proxy.generation, 1);
            },
        },
        Case {
            name: "a primary that has not applied its generation is not named",
            run: || {
                let mut o = Observations::default();
                o.keepers.insert("k1".into(), fresh_keeper("k1"));
                let d = decide(&ClusterData::new(ClusterSpec::default()), &o, T0);
                let o = with(o, "k1", |r| *r = rep("k1", true, false, 100, 1));
                decide(&d, &o, T0 + SEC)
            },
            check: |d| assert_eq!(d.proxy.master_db, None),
        },
        Case {
            name: "healthy steady state changes nothing",
            run: || {
                let d = cluster("m", &["s1", "s2"]);
                let next = decide(&d, &observe(&d, &[]), T0);
                assert_eq!(next, d);
                next
            },
            check: |d| assert_eq!(d.proxy.generation, 1),
        },
        Case {
            name: "a new keeper joins as a standby of the primary",
            run: || {
                let d = cluster("m", &["s1"]);
                let mut o = observe(&d, &[]);
                o.keepers.insert("new".into(), fresh_keeper("new"));
                decide(&d, &o, T0)
            },
            check: |d| {
                assert_eq!(d.dbs["new"].spec.role, Role::Standby);
                assert_eq!(d.dbs["new"].spec.follow.as_deref(), Some("m"));
                assert_eq!(d.proxy.master_db.as_deref(), Some("m"));
            },
        },
        // ---- failure detection
        Case {
            name: "a primary down for less than fail_interval is not failed over",
            run: || {
                let d = cluster("m", &["s1"]);
                let o = observe(&d, &["m"]);
                rounds(&d, &o, &[T0, T0 + 4 * SEC])
            },
            check: |d| {
                assert_eq!(d.proxy.master_db.as_deref(), Some("m"));
                assert!(d.failover.is_none());
            },
        },
        Case {
            name: "past fail_interval the proxies are fenced and the old primary told to stop",
            run: || {
                let d = cluster("m", &["s1"]);
                let mut o = observe(&d, &["m"]);
                o.proxies.insert("p1".into(), proxy(1));
                rounds(&d, &o, &[T0, T0 + 5 * SEC])
            },
            check: |d| {
                assert_eq!(d.proxy.master_db, None);
                assert_eq!(d.proxy.generation, 2);
                let f = d.failover.as_ref().expect("failover started");
                assert_eq!(
                    (f.from.as_str(), f.fence_generation, f.to.as_deref()),
                    ("m", 2, None)
                );
                assert_eq!(f.fence, vec!["m".to_string()]);
                assert_eq!(d.dbs["m"].spec.role, Role::None, "told to stop");
                assert_eq!(d.dbs["s1"].spec.role, Role::Standby, "nothing promoted yet");
            },
        },
        Case {
            name: "promotion waits for every live proxy to acknowledge",
            run: || {
                let d = cluster("m", &["s1"]);
                let mut o = observe(&d, &["m"]);
                o.proxies.insert("p1".into(), proxy(1));
                o.proxies.insert("p2".into(), proxy(1));
                let d = rounds(&d, &o, &[T0, T0 + 5 * SEC]);
                o.proxies.insert("p1".into(), proxy(2));
                decide(&d, &o, T0 + 6 * SEC)
            },
            check: |d| {
                assert_eq!(master(d), None, "p2 has not acknowledged");
                assert!(d.failover.as_ref().is_some_and(|f| f.to.is_none()));
                assert!(d.notice.as_deref().unwrap_or_default().contains("p2"));
            },
        },
        Case {
            name: "an acknowledgement from an earlier incarnation of the cluster does not count",
            run: || {
                let d = cluster("m", &["s1"]);
                let mut o = observe(&d, &["m"]);
                let mut old = proxy(99);
                old.cluster_uid = "before-ctl-init".into();
                o.proxies.insert("p1".into(), old);
                rounds(&d, &o, &[T0, T0 + 5 * SEC, T0 + 6 * SEC])
            },
            check: |d| assert_eq!(master(d), None),
        },
        Case {
            name: "a proxy whose lease ended does not hold up the promotion",
            run: || {
                let d = cluster("m", &["s1"]);
                let mut o = observe(&d, &["m"]);
                o.proxies.insert("p1".into(), proxy(1));
                let d = rounds(&d, &o, &[T0, T0 + 5 * SEC]);
                o.proxies.clear();
                decide(&d, &o, T0 + 6 * SEC)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "F2b: promotion waits until the old primary stopped or lost its lease",
            run: || {
                // The primary's keeper still holds its lease (it reports,
                // PostgreSQL is dead) but has not applied the demotion yet.
                let d = cluster("m", &["s1"]);
                let o = observe(&d, &[]);
                let o = with(o, "m", |r| *r = dead_pg("m", 1));
                rounds(&d, &o, &[T0, T0 + 5 * SEC, T0 + 6 * SEC, T0 + 7 * SEC])
            },
            check: |d| {
                assert_eq!(master(d), None, "promoted next to a primary that may still run");
                assert!(d.notice.as_deref().unwrap_or_default().contains("stop PostgreSQL"));
            },
        },
        Case {
            name: "F2b: once the old primary acknowledged its stop, a standby is promoted",
            run: || {
                let d = cluster("m", &["s1"]);
                let o = with(observe(&d, &[]), "m", |r| *r = dead_pg("m", 1));
                let d = rounds(&d, &o, &[T0, T0 + 5 * SEC]);
                let o = acked(o, &d, "m");
                decide(&d, &o, T0 + 6 * SEC)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "F2b: a registered but silent old primary holds the promotion until its lease ends",
            run: || {
                let d = cluster("m", &["s1"]);
                // The keeper's report went stale, but its lease lives:
                // it may still renew and not have fenced itself.
                let mut o = observe(&d, &["m"]);
                o.registered.insert("m".into());
                let d1 = rounds(&d, &o, &[T0, T0 + 5 * SEC, T0 + 6 * SEC]);
                assert_eq!(master(&d1), None);
                o.registered.remove("m");
                decide(&d1, &o, T0 + 7 * SEC)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        // ---- the store-outage failsafe
        Case {
            name: "failsafe: a keeper joined after the primary's last read cluster data is not promoted in place of a primary that lost its lease",
            run: || late_joiner(true),
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "failsafe: with only an unknown keeper left, no one is promoted",
            run: || {
                let mut d = cluster("m", &["s2"]);
                d.membership = 3;
                d.dbs.get_mut("m").unwrap().status.membership = 2;
                d.keepers.get_mut("s2").unwrap().joined = 3;
                fail_master(&d, "m", |o| o)
            },
            check: |d| {
                // No failover starts: there is no one to promote.
                assert_eq!(master(d).as_deref(), Some("m"));
                assert!(
                    d.notice.as_deref().unwrap_or_default().contains("never asked it for a promise"),
                    "{:?}",
                    d.notice
                );
            },
        },
        Case {
            name: "failsafe: even with the failsafe off (turned off while the old primary served on promises), a keeper it never knew of does not replace it",
            run: || late_joiner(false),
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "failsafe: a keeper that joined after the primary's last report replaces a primary whose keeper reported it stopped",
            run: || {
                // The old primary's keeper is registered and acknowledged
                // its stop: it is not serving on promises.
                let mut d = cluster("m", &["s2"]);
                d.membership = 3;
                d.dbs.get_mut("m").unwrap().status.membership = 2;
                d.keepers.get_mut("s2").unwrap().joined = 3;
                let o = with(observe(&d, &[]), "m", |r| *r = dead_pg("m", 1));
                let d = rounds(&d, &o, &[T0, T0 + 5 * SEC]);
                let o = acked(o, &d, "m");
                decide(&d, &o, T0 + 6 * SEC)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s2")),
        },
        Case {
            name: "failsafe: a joining keeper gets the next membership; reports carry what the keeper read",
            run: || {
                let d = cluster("m", &["s1"]);
                let mut o = observe(&d, &[]);
                o = with(o, "m", |r| {
                    r.membership = 7;
                    r.api_address = Some("m:8008".into());
                });
                let mut n = rep("n", true, true, 100, 1);
                n.api_address = Some("n:8008".into());
                o.keepers.insert("n".into(), n);
                o.registered.insert("n".into());
                decide(&d, &o, T0)
            },
            check: |d| {
                assert_eq!(d.membership, 1);
                assert_eq!(d.keepers["n"].joined, 1);
                assert_eq!(d.dbs["m"].status.membership, 7);
                assert_eq!(d.dbs["m"].status.api_address.as_deref(), Some("m:8008"));
            },
        },
        // ---- F1: a live keeper reporting a dead PostgreSQL
        Case {
            name: "F1: an unhealthy report keeps the last known LSN, timeline and sync set",
            run: || {
                let mut d = sync_cluster("m", &["s1"], &["s1"]);
                d.dbs.get_mut("m").unwrap().status.lsn = 5000;
                d.dbs.get_mut("m").unwrap().status.timeline = 3;
                let o = with(observe(&d, &[]), "m", |r| *r = dead_pg("m", 1));
                decide(&d, &o, T0)
            },
            check: |d| {
                let s = &d.dbs["m"].status;
                assert!(!s.healthy);
                assert_eq!((s.lsn, s.timeline), (5000, 3));
                assert_eq!(s.synchronous_standbys, vec!["s1".to_string()]);
                assert_eq!(s.sync_confirmed, vec!["s1".to_string()]);
                assert_eq!(s.system_id.as_deref(), Some("sys1"));
            },
        },
        Case {
            name: "F1b: the last file a primary archived survives a dead PostgreSQL's report and a statistics reset",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.dbs.get_mut("m").unwrap().status.archive = Some(cluster::data::ArchiveStatus {
                    mode: "on".into(),
                    archived_count: 40,
                    last_archived_wal: Some("000000010000000000000007".into()),
                    ..Default::default()
                });
                // A live keeper reporting its dead PostgreSQL: no archive
                // status at all.
                let o = with(observe(&d, &[]), "m", |r| *r = dead_pg("m", 1));
                let d = decide(&d, &o, T0);
                // PostgreSQL back after a crash: its statistics start over.
                let o = with(observe(&d, &[]), "m", |r| {
                    r.archive = Some(cluster::data::ArchiveStatus {
                        mode: "on".into(),
                        ..Default::default()
                    })
                });
                decide(&d, &o, T0 + SEC)
            },
            check: |d| {
                let a = d.dbs["m"].status.archive.as_ref().expect("archive status");
                assert_eq!(a.last_archived_wal.as_deref(), Some("000000010000000000000007"));
                assert_eq!(a.archived_count, 0, "the counters are what PostgreSQL says now");
            },
        },
        Case {
            name: "F1a: a standby beyond the lag limit is not promoted when the primary's keeper reports it dead",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.dbs.get_mut("m").unwrap().status.lsn = 100 + 38 * 1024 * 1024;
                let o = with(observe(&d, &[]), "m", |r| *r = dead_pg("m", 1));
                rounds(&d, &o, &[T0, T0 + 5 * SEC, T0 + 6 * SEC, T0 + 7 * SEC])
            },
            check: |d| {
                assert!(d.failover.is_none(), "no eligible standby: no fencing");
                assert_eq!(master(d).as_deref(), Some("m"));
                let n = d.notice.as_deref().unwrap_or_default();
                assert!(
                    n.contains("s1 is 38.0 MiB behind the last known primary LSN, limit 16.0 MiB"),
                    "{n}"
                );
            },
        },
        Case {
            name: "F1a: a standby beyond the lag limit is not eligible (keeper gone)",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.dbs.get_mut("m").unwrap().status.lsn = 100 + 64 * 1024 * 1024;
                fail_master(&d, "m", |o| o)
            },
            check: |d| {
                assert!(d.failover.is_none());
                assert_eq!(d.proxy.master_db.as_deref(), Some("m"));
            },
        },
        Case {
            name: "F1: a standby not seen streaming since its keeper started is not eligible",
            run: || {
                let d = cluster("m", &["s1"]);
                fail_master(&d, "m", |o| {
                    with(o, "s1", |r| {
                        r.streaming = false;
                        r.streaming_age_ms = None;
                    })
                })
            },
            check: |d| {
                assert!(d.failover.is_none());
                let n = d.notice.as_deref().unwrap_or_default();
                assert!(n.contains("has not streamed"), "{n}");
            },
        },
        Case {
            name: "F1: a standby that stopped streaming long before the primary failed is not eligible",
            run: || {
                let d = cluster("m", &["s1"]);
                fail_master(&d, "m", |o| {
                    with(o, "s1", |r| {
                        r.streaming = false;
                        r.streaming_age_ms = Some(3600 * SEC);
                    })
                })
            },
            check: |d| assert!(d.failover.is_none()),
        },
        Case {
            name: "F1: a standby that stopped streaming when the primary died is eligible",
            run: || {
                let d = cluster("m", &["s1"]);
                fail_master(&d, "m", |o| {
                    with(o, "s1", |r| {
                        r.streaming = false;
                        r.streaming_age_ms = Some(5 * SEC);
                    })
                })
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "F1b: sync mode, dead PostgreSQL under a live keeper: fails over to the sync standby",
            run: || {
                let d = sync_cluster("m", &["s1", "s2"], &["s1"]);
                let o = with(observe(&d, &[]), "m", |r| *r = dead_pg("m", 1));
                // The standbys lost their upstream when it died.
                let o = with(o, "s1", |r| {
                    r.streaming = false;
                    r.streaming_age_ms = Some(5 * SEC);
                });
                let o = with(o, "s2", |r| r.lsn = Some(999));
                let d = rounds(&d, &o, &[T0, T0 + 5 * SEC]);
                decide(&d, &acked(o, &d, "m"), T0 + 6 * SEC)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        // ---- election
        Case {
            name: "failover elects the standby with the highest LSN",
            run: || {
                let d = cluster("m", &["s1", "s2", "s3"]);
                fail_master(&d, "m", |o| {
                    with(with(o, "s2", |r| r.lsn = Some(150)), "s3", |r| {
                        r.lsn = Some(120)
                    })
                })
            },
            check: |d| {
                assert_eq!(master(d).as_deref(), Some("s2"));
                assert_eq!(
                    d.dbs["m"].spec.role,
                    Role::None,
                    "the old primary waits to rejoin"
                );
                // The others follow it once it runs as a primary, not before.
                assert_eq!(d.dbs["s1"].spec.follow.as_deref(), Some("m"));
                let gen = d.dbs["s2"].generation;
                let o = with(observe(d, &["m"]), "s2", |r| {
                    r.in_recovery = false;
                    r.applied_generation = gen;
                });
                let d = decide(&decide(d, &o, T0 + 7 * SEC), &o, T0 + 8 * SEC);
                assert_eq!(d.dbs["s1"].spec.follow.as_deref(), Some("s2"));
                assert_eq!(d.dbs["s3"].spec.follow.as_deref(), Some("s2"));
            },
        },
        Case {
            name: "a higher timeline beats a higher LSN",
            run: || {
                let d = cluster("m", &["s1", "s2"]);
                fail_master(&d, "m", |o| {
                    with(with(o, "s1", |r| r.lsn = Some(500)), "s2", |r| {
                        r.timeline = Some(2);
                        r.lsn = Some(110)
                    })
                })
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s2")),
        },
        Case {
            name: "equal LSN and timeline: the higher priority wins",
            run: || {
                let mut d = cluster("m", &["s1", "s2"]);
                if let Some(k) = d.keepers.get_mut("s2") {
                    k.priority = 10;
                }
                fail_master(&d, "m", |o| o)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s2")),
        },
        Case {
            name: "a never-primary standby is never elected",
            run: || {
                let mut d = cluster("m", &["s1", "s2"]);
                if let Some(k) = d.keepers.get_mut("s2") {
                    k.never_primary = true;
                }
                fail_master(&d, "m", |o| with(o, "s2", |r| r.lsn = Some(999)))
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "a standby of another system (forked) is not eligible",
            run: || {
                let d = cluster("m", &["s1", "s2"]);
                fail_master(&d, "m", |o| {
                    with(o, "s2", |r| {
                        r.system_id = Some("other".into());
                        r.lsn = Some(900)
                    })
                })
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "a standby on an older timeline than the primary is not eligible",
            run: || {
                let mut d = cluster("m", &["s1", "s2"]);
                if let Some(db) = d.dbs.get_mut("m") {
                    db.status.timeline = 3;
                }
                fail_master(&d, "m", |o| {
                    with(with(o, "s1", |r| r.timeline = Some(2)), "s2", |r| {
                        r.timeline = Some(3)
                    })
                })
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s2")),
        },
        Case {
            name: "an unhealthy standby is not eligible",
            run: || {
                let d = cluster("m", &["s1", "s2"]);
                fail_master(&d, "m", |o| {
                    with(o, "s2", |r| *r = dead_pg("s2", 1))
                })
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "no eligible standby: the primary stays named",
            run: || {
                let d = cluster("m", &[]);
                fail_master(&d, "m", |o| o)
            },
            check: |d| {
                assert!(d.failover.is_none());
                assert_eq!(d.proxy.master_db.as_deref(), Some("m"));
            },
        },
        Case {
            name: "the new primary is named once it reports out of recovery",
            run: || {
                let d = cluster("m", &["s1"]);
                let d = fail_master(&d, "m", |o| o);
                let gen = d.dbs["s1"].generation;
                let o = with(observe(&d, &["m"]), "s1", |r| {
                    r.in_recovery = false;
                    r.applied_generation = gen;
                    r.timeline = Some(2);
                });
                decide(&d, &o, T0 + 7 * SEC)
            },
            check: |d| {
                assert_eq!(d.proxy.master_db.as_deref(), Some("s1"));
                assert_eq!(d.proxy.generation, 3);
                assert!(d.failover.is_none(), "failover complete");
            },
        },
        Case {
            name: "the old primary rejoins as a standby of the new one",
            run: || {
                let d = cluster("m", &["s1"]);
                let d = fail_master(&d, "m", |o| o);
                // Its keeper reports again; its PostgreSQL is not running
                // yet. s1 has been promoted.
                let gen = d.dbs["s1"].generation;
                let o = with(observe(&d, &[]), "m", |r| *r = dead_pg("m", 0));
                let o = with(o, "s1", |r| {
                    r.in_recovery = false;
                    r.applied_generation = gen;
                });
                let d = decide(&d, &o, T0 + 20 * SEC);
                decide(&d, &o, T0 + 21 * SEC)
            },
            check: |d| {
                assert_eq!(d.dbs["m"].spec.role, Role::Standby);
                assert_eq!(d.dbs["m"].spec.follow.as_deref(), Some("s1"));
            },
        },
        Case {
            name: "the old primary does not rejoin before the new one has left recovery",
            run: || {
                let d = cluster("m", &["s1"]);
                let d = fail_master(&d, "m", |o| o);
                // Both report; s1 is still promoting.
                decide(&d, &observe(&d, &[]), T0 + 20 * SEC)
            },
            check: |d| {
                assert_eq!(master(d).as_deref(), Some("s1"));
                assert_eq!(
                    d.dbs["m"].spec.role,
                    Role::None,
                    "a rewind onto a standby finds the same timeline and keeps diverged WAL"
                );
            },
        },
        // ---- timers on the sentinel's own clock
        Case {
            name: "a flapping primary does not accumulate failure time",
            run: || {
                let d = cluster("m", &["s1"]);
                let down = observe(&d, &["m"]);
                let mut up = observe(&d, &[]);
                let d = decide(&d, &down, T0);
                up.last_healthy_ms.insert("m".into(), T0 + 3 * SEC);
                let d = decide(&d, &up, T0 + 3 * SEC);
                let mut down = down;
                down.last_healthy_ms.insert("m".into(), T0 + 3 * SEC);
                let d = decide(&d, &down, T0 + 4 * SEC);
                decide(&d, &down, T0 + 7 * SEC)
            },
            check: |d| assert!(d.failover.is_none(), "down 3 s, up, down 4 s: no failover"),
        },
        Case {
            name: "F7a: a new sentinel leader starts its health timers afresh",
            run: || {
                let d = cluster("m", &["s1"]);
                // The new leader began observing at T0 + 4 s and never saw
                // m healthy: the old leader's hour-old memory is not used.
                let mut o = observe(&d, &["m"]);
                o.last_healthy_ms.clear();
                o.since_ms = T0 + 4 * SEC;
                rounds(&d, &o, &[T0 + 4 * SEC, T0 + 5 * SEC, T0 + 8 * SEC])
            },
            check: |d| assert!(d.failover.is_none(), "4 s of observation is not 5 s of failure"),
        },
        Case {
            name: "F7a: ... and fails over once it has observed fail_interval",
            run: || {
                let d = cluster("m", &["s1"]);
                let mut o = observe(&d, &["m"]);
                o.last_healthy_ms.clear();
                o.since_ms = T0 + 4 * SEC;
                rounds(&d, &o, &[T0 + 4 * SEC, T0 + 9 * SEC, T0 + 9 * SEC + 1])
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "F7b: time the store could not be read is not failure time",
            run: || {
                // Last seen healthy at T0; the store was unreachable for a
                // minute; the sentinel's observation restarted at T0 + 60 s.
                let d = cluster("m", &["s1"]);
                let mut o = observe(&d, &["m"]);
                o.since_ms = T0 + 60 * SEC;
                rounds(&d, &o, &[T0 + 60 * SEC, T0 + 61 * SEC, T0 + 64 * SEC])
            },
            check: |d| assert!(d.failover.is_none()),
        },
        Case {
            name: "the failure timer starts when the primary was last seen healthy",
            run: || {
                let d = cluster("m", &["s1"]);
                let mut o = observe(&d, &["m"]);
                o.last_healthy_ms.insert("m".into(), T0 - 3 * SEC);
                rounds(&d, &o, &[T0, T0 + 2 * SEC])
            },
            check: |d| assert!(d.failover.is_some(), "5 s after the last healthy report"),
        },
        Case {
            name: "a standby's timeline does not go back when it reports its checkpoint's",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.dbs.get_mut("s1").unwrap().status.timeline = 2;
                decide(&d, &with(observe(&d, &[]), "s1", |r| r.timeline = Some(1)), T0)
            },
            check: |d| assert_eq!(d.dbs["s1"].status.timeline, 2),
        },
        Case {
            name: "a standby whose keeper vanished is marked unhealthy",
            run: || {
                let d = cluster("m", &["s1", "s2"]);
                decide(&d, &observe(&d, &["s2"]), T0)
            },
            check: |d| {
                assert!(!d.dbs["s2"].status.healthy);
                assert_eq!(d.dbs["s2"].status.lsn, 100, "last known LSN kept");
                assert_eq!(d.proxy.master_db.as_deref(), Some("m"));
            },
        },
        Case {
            name: "no candidate any more at promotion time, and the old primary's keeper back: give it back",
            run: || {
                let d = cluster("m", &["s1"]);
                let o = observe(&d, &["m"]);
                let d = rounds(&d, &o, &[T0, T0 + 5 * SEC]);
                // s1 vanished; m's keeper is back and has stopped PostgreSQL.
                let o = acked(observe(&d, &["s1"]), &d, "m");
                let d = decide(&d, &o, T0 + 6 * SEC);
                assert!(d.failover.is_none());
                assert_eq!(d.dbs["m"].spec.role, Role::Master, "given back");
                // It starts again and runs its new generation.
                let gen = d.dbs["m"].generation;
                let o = with(observe(&d, &["s1"]), "m", |r| {
                    *r = rep("m", true, false, 100, 1);
                    r.applied_generation = gen;
                });
                decide(&d, &o, T0 + 7 * SEC)
            },
            check: |d| {
                assert!(d.failover.is_none());
                assert_eq!(d.proxy.master_db.as_deref(), Some("m"));
                assert_eq!(d.proxy.generation, 3, "named again at a new generation");
            },
        },
        // ---- F9: no state without an exit
        Case {
            name: "F9a: a candidate that never becomes primary is stopped and another chosen",
            run: || {
                let mut d = cluster("m", &["s1", "s2"]);
                d.dbs.get_mut("s2").unwrap().status.lsn = 150;
                let d = fail_master(&d, "m", |o| o);
                assert_eq!(master(&d).as_deref(), Some("s2"));
                // s2's keeper dies before it is ready.
                let mut o = observe(&d, &["m", "s2"]);
                o.failover_since_ms = Some(T0 + 5 * SEC);
                let d = decide(&d, &o, T0 + 66 * SEC);
                assert_eq!(master(&d), None);
                assert!(d.notice.as_deref().unwrap_or_default().contains("s2 did not become primary"));
                let f = d.failover.clone().expect("still failing over");
                assert_eq!(f.excluded, vec!["s2".to_string()]);
                assert!(f.fence.contains(&"s2".to_string()));
                // s2 holds no lease any more: it is fenced; s1 is promoted.
                o.failover_since_ms = Some(T0 + 66 * SEC);
                decide(&d, &o, T0 + 67 * SEC)
            },
            check: |d| {
                assert_eq!(master(d).as_deref(), Some("s1"));
                assert_eq!(d.dbs["s2"].spec.role, Role::None);
            },
        },
        Case {
            name: "F9a: a slow promotion within convergence_timeout is left alone",
            run: || {
                let d = cluster("m", &["s1", "s2"]);
                let d = fail_master(&d, "m", |o| o);
                let mut o = observe(&d, &["m"]);
                o.failover_since_ms = Some(T0 + 5 * SEC);
                decide(&d, &o, T0 + 64 * SEC)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        // ---- switchover
        Case {
            name: "switchover: once proxies hold clients, the primary is stopped",
            run: || {
                let d = switchover_requested(cluster("m", &["s1", "s2"]), None);
                decide(&d, &observe(&d, &[]), T0)
            },
            check: |d| {
                assert_eq!(d.dbs["m"].spec.role, Role::None, "told to stop");
                assert_eq!(master(d), None);
                assert_eq!(d.proxy.master_db, None);
            },
        },
        Case {
            name: "switchover: the target is promoted once the old primary stopped and it has everything",
            run: || {
                let d = switchover_requested(cluster("m", &["s1", "s2"]), None);
                let d = decide(&d, &observe(&d, &[]), T0);
                let o = with(acked(observe(&d, &[]), &d, "m"), "m", |r| {
                    r.stopped_lsn = Some(100);
                    r.lsn = Some(100);
                });
                decide(&d, &o, T0 + SEC)
            },
            check: |d| {
                let m = master(d).expect("promoted");
                assert!(m == "s1" || m == "s2");
                assert_eq!(
                    d.failover.as_ref().and_then(|f| f.to.as_deref()),
                    Some(m.as_str())
                );
            },
        },
        Case {
            name: "F1d: switchover: a target behind the old primary's shutdown checkpoint waits",
            run: || {
                let d = switchover_requested(cluster("m", &["s1"]), None);
                let d = decide(&d, &observe(&d, &[]), T0);
                // The real stopped report: no LSN from a query, the
                // shutdown checkpoint from the control file.
                let o = with(acked(observe(&d, &[]), &d, "m"), "m", |r| {
                    r.stopped_lsn = Some(500);
                    r.lsn = Some(500);
                });
                let o = with(o, "s1", |r| r.lsn = Some(400));
                decide(&d, &o, T0 + SEC)
            },
            check: |d| {
                assert_eq!(master(d), None, "waiting for s1 to receive everything");
                assert!(d.notice.as_deref().unwrap_or_default().contains("100 bytes"));
            },
        },
        Case {
            name: "F1d: switchover: an old primary stopped without a known shutdown checkpoint waits",
            run: || {
                let d = switchover_requested(cluster("m", &["s1"]), None);
                let d = decide(&d, &observe(&d, &[]), T0);
                decide(&d, &acked(observe(&d, &[]), &d, "m"), T0 + SEC)
            },
            check: |d| assert_eq!(master(d), None),
        },
        Case {
            name: "F9b: switchover: an old primary that never stops is given back after convergence_timeout",
            run: || {
                let d = switchover_requested(cluster("m", &["s1"]), None);
                let d = decide(&d, &observe(&d, &[]), T0);
                let mut o = observe(&d, &[]);
                o.failover_since_ms = Some(T0);
                decide(&d, &o, T0 + 61 * SEC)
            },
            check: |d| {
                assert!(d.failover.is_none());
                assert_eq!(d.dbs["m"].spec.role, Role::Master);
                assert!(d.notice.as_deref().unwrap_or_default().contains("aborted"));
            },
        },
        Case {
            name: "switchover: the requested standby is promoted, not the most advanced",
            run: || {
                let mut d = switchover_requested(cluster("m", &["s1", "s2"]), Some("s1"));
                if let Some(db) = d.dbs.get_mut("s2") {
                    db.status.lsn = 150;
                }
                let d = decide(&d, &observe(&d, &[]), T0);
                let o = with(acked(observe(&d, &[]), &d, "m"), "m", |r| {
                    r.stopped_lsn = Some(100)
                });
                decide(&d, &o, T0 + SEC)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "F1c: sync switchover completes to the confirmed synchronous standby",
            run: || {
                let d = switchover_requested(sync_cluster("m", &["s1", "s2"], &["s1"]), None);
                let d = decide(&d, &observe(&d, &[]), T0);
                let o = with(acked(observe(&d, &[]), &d, "m"), "m", |r| {
                    r.stopped_lsn = Some(100)
                });
                let o = with(o, "s2", |r| r.lsn = Some(999));
                decide(&d, &o, T0 + SEC)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        // ---- synchronous replication
        Case {
            name: "sync mode, one streaming standby: it becomes synchronous",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.spec.synchronous_replication = true;
                decide(&d, &observe(&d, &[]), T0)
            },
            check: |d| assert_eq!(d.dbs["m"].spec.synchronous_standbys, vec!["s1".to_string()]),
        },
        Case {
            name: "F5: a standby that does not stream is never chosen as synchronous",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.spec.synchronous_replication = true;
                let o = with(observe(&d, &[]), "s1", |r| {
                    r.streaming = false;
                    r.streaming_age_ms = Some(60 * SEC);
                });
                decide(&d, &o, T0)
            },
            check: |d| assert!(d.dbs["m"].spec.synchronous_standbys.is_empty()),
        },
        Case {
            name: "sync mode, max_sync 2 with two standbys: both",
            run: || {
                let mut d = cluster("m", &["s1", "s2"]);
                d.spec.synchronous_replication = true;
                d.spec.max_sync = 2;
                decide(&d, &observe(&d, &[]), T0)
            },
            check: |d| {
                assert_eq!(
                    d.dbs["m"].spec.synchronous_standbys,
                    vec!["s1".to_string(), "s2".into()]
                )
            },
        },
        Case {
            name: "sync mode, min_sync 0 and max_sync 0: none",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.spec.synchronous_replication = true;
                d.spec.min_sync = 0;
                d.spec.max_sync = 0;
                decide(&d, &observe(&d, &[]), T0)
            },
            check: |d| assert!(d.dbs["m"].spec.synchronous_standbys.is_empty()),
        },
        Case {
            name: "sync mode: a dead sync standby is kept to honour min_sync",
            run: || {
                let d = sync_cluster("m", &["s1"], &["s1"]);
                decide(&d, &observe(&d, &["s1"]), T0)
            },
            check: |d| assert_eq!(d.dbs["m"].spec.synchronous_standbys, vec!["s1".to_string()]),
        },
        Case {
            name: "sync mode: a dead confirmed sync standby is replaced through the union, never leaving none confirmed",
            run: || {
                let d = sync_cluster("m", &["s1", "s2"], &["s1"]);
                let o = with(observe(&d, &["s1"]), "m", |r| {
                    r.synchronous_standbys = Some(vec![])
                });
                let d = decide(&d, &o, T0);
                assert_eq!(
                    d.dbs["m"].spec.synchronous_standbys,
                    vec!["s1".to_string(), "s2".into()],
                    "s2 joins before s1, the one confirmed member, leaves"
                );
                assert_eq!(
                    d.dbs["m"].status.sync_confirmed,
                    vec!["s1".to_string()],
                    "s1 holds every acknowledged commit until s2 is confirmed"
                );
                // Not yet applied: nothing moves.
                let d = decide(&d, &o, T0 + SEC);
                assert_eq!(d.dbs["m"].status.sync_confirmed, vec!["s1".to_string()]);
                assert_eq!(d.dbs["m"].spec.synchronous_standbys.len(), 2);
                // The primary runs the union and reports s2 synchronous.
                let gen = d.dbs["m"].generation;
                let o = with(o, "m", |r| {
                    r.applied_generation = gen;
                    r.synchronous_standbys = Some(vec!["s2".into()]);
                });
                decide(&d, &o, T0 + 2 * SEC)
            },
            check: |d| {
                assert_eq!(d.dbs["m"].spec.synchronous_standbys, vec!["s2".to_string()]);
                assert_eq!(d.dbs["m"].status.sync_confirmed, vec!["s2".to_string()]);
            },
        },
        Case {
            name: "sync mode: a dead primary's stale report while its confirmed standby stops streaming first: still failed over to it",
            run: || {
                // The primary's host dies. Its last report still reads
                // healthy for a while; s1, the confirmed standby, notices
                // first and reports it no longer streams, while s2 still
                // reports streaming. Swapping s1 for s2 now would leave no
                // confirmed standby (the dead primary never confirms s2):
                // no failover, ever.
                let d0 = sync_cluster("m", &["s1", "s2"], &["s1"]);
                let lost = |o: Observations| {
                    with(o, "s1", |r| {
                        r.streaming = false;
                        r.streaming_age_ms = Some(500);
                    })
                };
                let d = decide(&d0, &lost(observe(&d0, &[])), T0);
                assert_eq!(d.dbs["m"].status.sync_confirmed, vec!["s1".to_string()]);
                let o = lost(observe(&d0, &["m"]));
                rounds(&d, &o, &[T0 + SEC, T0 + 6 * SEC, T0 + 6 * SEC + 1])
            },
            check: |d| {
                let f = d.failover.as_ref();
                assert_eq!(
                    f.and_then(|f| f.to.as_deref()),
                    Some("s1"),
                    "the confirmed standby is promoted: {:?}",
                    d.notice
                );
            },
        },
        Case {
            name: "sync mode: the set does not shrink away from its last confirmed member",
            run: || {
                // {s1, s2} with only s2 confirmed; s2 dies. s1 stays, but
                // s2 leaves only once s1 is confirmed.
                let mut d = sync_cluster("m", &["s1", "s2"], &["s1", "s2"]);
                d.spec.max_sync = 2;
                d.dbs.get_mut("m").unwrap().status.sync_confirmed = vec!["s2".into()];
                let o = with(observe(&d, &["s2"]), "m", |r| {
                    r.synchronous_standbys = Some(vec![])
                });
                let d = decide(&d, &o, T0);
                assert_eq!(d.dbs["m"].spec.synchronous_standbys.len(), 2, "s2 is kept");
                let o = with(o, "m", |r| r.synchronous_standbys = Some(vec!["s1".into()]));
                decide(&d, &o, T0 + SEC)
            },
            check: |d| {
                assert_eq!(d.dbs["m"].spec.synchronous_standbys, vec!["s1".to_string()]);
                assert_eq!(d.dbs["m"].status.sync_confirmed, vec!["s1".to_string()]);
            },
        },
        Case {
            name: "sync mode: replacing a live synchronous member goes through the union",
            run: || {
                let mut d = sync_cluster("m", &["s1", "s2"], &["s1", "s2"]);
                d.spec.max_sync = 2;
                let d = decide(&d, &observe(&d, &[]), T0);
                // Now only one may stay, and s3 joins... simplest live
                // replacement: s1 becomes never-primary-free? Shrink max.
                let mut d = d;
                d.spec.max_sync = 1;
                d.spec.min_sync = 1;
                decide(&d, &observe(&d, &[]), T0 + SEC)
            },
            check: |d| {
                assert_eq!(
                    d.dbs["m"].spec.synchronous_standbys,
                    vec!["s1".to_string()],
                    "shrinks once the member that stays is reported synchronous"
                );
            },
        },
        Case {
            name: "F6b: shrinking away from a live member waits until the one that stays is reported synchronous",
            run: || {
                let mut d = sync_cluster("m", &["s1", "s2"], &["s1", "s2"]);
                d.spec.max_sync = 1;
                let o = with(observe(&d, &[]), "m", |r| {
                    r.synchronous_standbys = Some(vec!["s2".into()])
                });
                decide(&d, &o, T0)
            },
            check: |d| {
                assert_eq!(
                    d.dbs["m"].spec.synchronous_standbys,
                    vec!["s1".to_string(), "s2".into()],
                    "s1, which stays, is not reported synchronous yet"
                );
            },
        },
        Case {
            name: "F6b: a member the spec no longer names is not electable, whatever the last report said",
            run: || {
                let mut d = sync_cluster("m", &["s1", "s2"], &["s1"]);
                // The spec moved to {s2}; the primary died before
                // reporting s2 synchronous.
                let m = d.dbs.get_mut("m").unwrap();
                m.spec.synchronous_standbys = vec!["s2".into()];
                m.generation = 2;
                fail_master(&d, "m", |o| o)
            },
            check: |d| {
                assert!(d.failover.is_none(), "neither s1 (dropped) nor s2 (unconfirmed) is safe");
                let n = d.notice.as_deref().unwrap_or_default();
                assert!(n.contains("not a confirmed synchronous standby"), "{n}");
            },
        },
        Case {
            name: "F6c: the synchronous standby does not flap to a more advanced one",
            run: || {
                let d = sync_cluster("m", &["s1", "s2"], &["s1"]);
                let o = with(observe(&d, &[]), "s2", |r| r.lsn = Some(200));
                rounds(&d, &o, &[T0, T0 + SEC, T0 + 2 * SEC])
            },
            check: |d| assert_eq!(d.dbs["m"].spec.synchronous_standbys, vec!["s1".to_string()]),
        },
        Case {
            name: "sync mode: a member joins the confirmed set once the primary runs it and reports it",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.spec.synchronous_replication = true;
                let d = decide(&d, &observe(&d, &[]), T0);
                assert!(d.dbs["m"].status.sync_confirmed.is_empty());
                let gen = d.dbs["m"].generation;
                let o = with(observe(&d, &[]), "m", |r| {
                    r.applied_generation = gen;
                    r.synchronous_standbys = Some(vec!["s1".into()]);
                });
                decide(&d, &o, T0 + SEC)
            },
            check: |d| assert_eq!(d.dbs["m"].status.sync_confirmed, vec!["s1".to_string()]),
        },
        Case {
            name: "sync mode: only a confirmed synchronous standby is elected",
            run: || {
                let d = sync_cluster("m", &["s1", "s2"], &["s1"]);
                fail_master(&d, "m", |o| with(o, "s2", |r| r.lsn = Some(999)))
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "sync mode: a confirmed standby far behind in WAL nobody acknowledged is still electable",
            run: || {
                let mut d = sync_cluster("m", &["s1"], &["s1"]);
                d.dbs.get_mut("m").unwrap().status.lsn = 100 + 64 * 1024 * 1024;
                fail_master(&d, "m", |o| o)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "sync mode: no confirmed synchronous standby, no failover",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.spec.synchronous_replication = true;
                fail_master(&d, "m", |o| o)
            },
            check: |d| {
                assert!(
                    d.failover.is_none(),
                    "electing an async standby could lose commits"
                );
                assert_eq!(master(d).as_deref(), Some("m"));
            },
        },
        Case {
            name: "F6a2: after a failover in a two-node sync cluster, commits on the new primary still wait",
            run: || {
                let d = sync_cluster("m", &["s1"], &["s1"]);
                fail_master(&d, "m", |o| o)
            },
            check: |d| {
                assert_eq!(master(d).as_deref(), Some("s1"));
                assert_eq!(
                    d.dbs["s1"].spec.synchronous_standbys,
                    vec!["m".to_string()],
                    "the old primary holds the place until a standby streams"
                );
                assert!(d.dbs["s1"].status.sync_confirmed.is_empty());
            },
        },
        Case {
            name: "F6a: a standby streaming from the new primary takes the placeholder's place",
            run: || {
                let d = sync_cluster("m", &["s1", "s2"], &["s1"]);
                let d = fail_master(&d, "m", |o| o);
                assert_eq!(d.dbs["s1"].spec.synchronous_standbys, vec!["m".to_string()]);
                // s1 runs as primary; s2 streams from it.
                let gen = d.dbs["s1"].generation;
                let g2 = d.dbs["s2"].generation;
                let o = with(observe(&d, &["m"]), "s1", |r| {
                    r.in_recovery = false;
                    r.applied_generation = gen;
                    r.timeline = Some(2);
                });
                let o = with(o, "s2", |r| {
                    r.applied_generation = g2;
                    r.timeline = Some(2);
                });
                let d = decide(&d, &o, T0 + 7 * SEC);
                decide(&d, &o, T0 + 8 * SEC)
            },
            check: |d| {
                assert_eq!(d.proxy.master_db.as_deref(), Some("s1"));
                assert_eq!(d.dbs["s1"].spec.synchronous_standbys, vec!["s2".to_string()]);
            },
        },
        Case {
            name: "F6a: a second failover in sync mode goes to the confirmed standby",
            run: || {
                let d = sync_cluster("m", &["s1", "s2"], &["s1"]);
                let d = fail_master(&d, "m", |o| o);
                let gen = d.dbs["s1"].generation;
                let o = with(observe(&d, &["m"]), "s1", |r| {
                    r.in_recovery = false;
                    r.applied_generation = gen;
                    r.timeline = Some(2);
                });
                // s2 follows s1 on its timeline.
                let o = with(o, "s2", |r| r.timeline = Some(2));
                let d = rounds(&d, &o, &[T0 + 7 * SEC, T0 + 8 * SEC]);
                let gen = d.dbs["s1"].generation;
                let o = with(o, "s1", |r| {
                    r.applied_generation = gen;
                    r.synchronous_standbys = Some(vec!["s2".into()]);
                });
                let d = decide(&d, &o, T0 + 9 * SEC);
                assert_eq!(d.dbs["s1"].status.sync_confirmed, vec!["s2".to_string()]);
                // Now s1 dies too.
                let mut o = observe(&d, &["m", "s1"]);
                o.last_healthy_ms.insert("s1".into(), T0 + 9 * SEC);
                rounds(&d, &o, &[T0 + 10 * SEC, T0 + 15 * SEC, T0 + 15 * SEC + 1])
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s2")),
        },
        // ---- second review
        Case {
            name: "review 2: a switchover whose timed-out target may still be promoting waits for it to stop",
            run: || {
                let d = switchover_requested(cluster("m", &["s1", "s2"]), Some("s1"));
                let d = decide(&d, &observe(&d, &[]), T0);
                let o = with(acked(observe(&d, &[]), &d, "m"), "m", |r| {
                    r.stopped_lsn = Some(100)
                });
                let d = decide(&d, &o, T0 + SEC);
                assert_eq!(master(&d).as_deref(), Some("s1"));
                // s1 does not become ready; the timeout gives up on it, but
                // its keeper still holds its lease (it is slow, not gone).
                let mut o = with(o, "s1", |r| r.applied_generation = 0);
                o.failover_since_ms = Some(T0 + SEC);
                let d = decide(&d, &o, T0 + 62 * SEC);
                assert!(d.failover.as_ref().is_some_and(|f| f.fence.contains(&"s1".to_string())));
                decide(&d, &o, T0 + 63 * SEC)
            },
            check: |d| {
                assert_ne!(d.dbs["m"].spec.role, Role::Master, "given back next to a promoting s1");
                assert_ne!(master(d).as_deref(), Some("s2"), "promoted next to a promoting s1");
                assert!(d.notice.as_deref().unwrap_or_default().contains("s1"));
            },
        },
        Case {
            name: "review 4: a sync primary given back gets its synchronous standbys back",
            run: || {
                let d = sync_cluster("m", &["s1"], &["s1"]);
                let o = with(observe(&d, &[]), "m", |r| *r = dead_pg("m", 1));
                let o = with(o, "s1", |r| {
                    r.streaming = false;
                    r.streaming_age_ms = Some(5 * SEC);
                });
                let d = rounds(&d, &o, &[T0, T0 + 5 * SEC]);
                assert!(d.failover.is_some());
                // s1 dies before it is promoted; m's keeper stopped PostgreSQL.
                let mut o = acked(o, &d, "m");
                o.keepers.remove("s1");
                o.registered.remove("s1");
                decide(&d, &o, T0 + 6 * SEC)
            },
            check: |d| {
                assert!(d.failover.is_none());
                assert_eq!(d.dbs["m"].spec.role, Role::Master);
                assert_eq!(
                    d.dbs["m"].spec.synchronous_standbys,
                    vec!["s1".to_string()],
                    "given back asynchronous"
                );
            },
        },
        Case {
            name: "review 4: the new primary's set starts from the old one's",
            run: || {
                let mut d = sync_cluster("m", &["s1", "s2"], &["s1", "s2"]);
                d.spec.max_sync = 2;
                fail_master(&d, "m", |o| with(o, "s1", |r| r.lsn = Some(200)))
            },
            check: |d| {
                assert_eq!(master(d).as_deref(), Some("s1"));
                assert_eq!(
                    d.dbs["s1"].spec.synchronous_standbys,
                    vec!["m".to_string(), "s2".into()]
                );
            },
        },
        Case {
            name: "review 5: an old primary removed from the cluster makes nobody eligible",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.dbs.get_mut("s1").unwrap().status.lsn = 1;
                let o = observe(&d, &["m"]);
                let mut d = rounds(&d, &o, &[T0, T0 + 5 * SEC]);
                assert!(d.failover.is_some());
                d.dbs.remove("m");
                d.keepers.remove("m");
                decide(&d, &o, T0 + 6 * SEC)
            },
            check: |d| {
                assert_ne!(master(d).as_deref(), Some("s1"));
                assert!(d.notice.as_deref().unwrap_or_default().contains("not in the cluster"));
            },
        },
        Case {
            name: "review 6: a database that reports another system is not taken in",
            run: || {
                let d = cluster("m", &["s1"]);
                let o = with(observe(&d, &[]), "s1", |r| {
                    r.system_id = Some("fresh-initdb".into());
                    r.lsn = Some(999);
                });
                decide(&d, &o, T0)
            },
            check: |d| {
                let s = &d.dbs["s1"].status;
                assert!(!s.healthy);
                assert_eq!(s.system_id.as_deref(), Some("sys1"));
                assert_eq!(s.lsn, 100);
                assert!(s.problem.as_deref().unwrap_or_default().contains("another PostgreSQL system"));
            },
        },
        Case {
            name: "review 7: a candidate given up on is copied afresh when it rejoins",
            run: || {
                let mut d = cluster("m", &["s1", "s2"]);
                d.dbs.get_mut("s2").unwrap().status.lsn = 150;
                let d = fail_master(&d, "m", |o| o);
                assert_eq!(master(&d).as_deref(), Some("s2"));
                let mut o = observe(&d, &["m", "s2"]);
                o.failover_since_ms = Some(T0 + 5 * SEC);
                let d = decide(&d, &o, T0 + 66 * SEC);
                assert!(d.dbs["s2"].spec.reinit);
                assert_eq!(d.dbs["s2"].status.timeline, 0, "what it reported no longer ranks it");
                let d = decide(&d, &o, T0 + 67 * SEC);
                assert_eq!(master(&d).as_deref(), Some("s1"));
                // s1 runs; s2's keeper comes back: it rejoins with a copy.
                let gen = d.dbs["s1"].generation;
                let o = with(observe(&d, &["m"]), "s1", |r| {
                    r.in_recovery = false;
                    r.applied_generation = gen;
                });
                let d = rounds(&d, &o, &[T0 + 68 * SEC, T0 + 69 * SEC]);
                assert_eq!(d.dbs["s2"].spec.role, Role::Standby);
                assert!(d.dbs["s2"].spec.reinit, "the flag survives the rejoin");
                // Once it has applied that and runs healthy, it is cleared.
                let g2 = d.dbs["s2"].generation;
                let o = with(o, "s2", |r| {
                    *r = rep("s2", true, true, 100, 1);
                    r.applied_generation = g2;
                });
                decide(&d, &o, T0 + 70 * SEC)
            },
            check: |d| assert!(!d.dbs["s2"].spec.reinit),
        },
        // ---- failkeeper
        Case {
            name: "failkeeper on a healthy primary: fenced failover at once, mark cleared",
            run: || {
                let mut d = cluster("m", &["s1", "s2"]);
                if let Some(db) = d.dbs.get_mut("s2") {
                    db.status.lsn = 150;
                }
                d.keepers.get_mut("m").unwrap().failed = true;
                let o = observe(&d, &[]);
                let fenced = decide(&d, &o, T0);
                assert_eq!(fenced.proxy.master_db, None, "fenced first");
                assert!(!fenced.keepers["m"].failed, "the mark lasts one decision");
                // The old primary stops as told; the failover goes on.
                decide(&fenced, &acked(o, &fenced, "m"), T0 + 1)
            },
            check: |d| {
                assert_eq!(master(d).as_deref(), Some("s2"), "most advanced standby");
                assert_eq!(d.dbs["m"].spec.role, Role::None);
            },
        },
        Case {
            name: "failkeeper with no eligible standby changes nothing but the mark",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.keepers.get_mut("s1").unwrap().never_primary = true;
                d.keepers.get_mut("m").unwrap().failed = true;
                // The keepers go on reporting healthy databases.
                let o = observe(&d, &[]);
                let once = decide(&d, &o, T0);
                decide(&once, &o, T0 + SEC)
            },
            check: |d| {
                assert!(d.failover.is_none());
                assert_eq!(d.proxy.master_db.as_deref(), Some("m"));
                assert!(d.dbs["m"].status.healthy && !d.keepers["m"].failed);
            },
        },
    ]
}

/// A keeper that reports for the first time, with no data directory yet.
fn fresh_keeper(uid: &str) -> KeeperReport {
    KeeperReport {
        uid: uid.into(),
        instance: "i1".into(),
        seq: 1,
        address: Some(format!("{uid}:5432")),
        ..Default::default()
    }
}

#[test]
fn decide_table() {
    let cases = cases();
    assert!(cases.len() >= 60, "{} scenarios", cases.len());
    let mut failed = Vec::new();
    for c in cases {
        let result = std::panic::catch_unwind(|| {
            let d = (c.run)();
            (c.check)(&d);
        });
        if result.is_err() {
            failed.push(c.name);
        }
    }
    assert!(failed.is_empty(), "scenarios failed: {failed:#?}");
}

#[test]
fn decide_is_deterministic_and_idempotent() {
    let d = cluster("m", &["s1", "s2"]);
    let o = observe(&d, &["m"]);
    let a = decide(&d, &o, T0 + 9 * SEC);
    let b = decide(&d, &o, T0 + 9 * SEC);
    assert_eq!(a, b);
    let healthy = cluster("m", &["s1"]);
    let once = decide(&healthy, &observe(&healthy, &[]), T0);
    assert_eq!(decide(&once, &observe(&once, &[]), T0 + SEC), once);
}

#[test]
fn candidate_order_is_not_stolons_ascending_sort() {
    // Stolon sorted by LSN ascending and could pick the least advanced
    // standby; keelson must pick the most advanced.
    let mut d = cluster("m", &["s1", "s2", "s3"]);
    for (uid, lsn) in [("s1", 300u64), ("s2", 100), ("s3", 200)] {
        if let Some(db) = d.dbs.get_mut(uid) {
            db.status.lsn = lsn;
        }
    }
    let o = observe(&d, &["m"]);
    assert_eq!(
        choose_candidate(&d, &o, "m", &[], T0 + 5 * SEC).as_deref(),
        Ok("s1")
    );
}

/// A standby cluster: `m` leads (in recovery, following the source), the
/// rest cascade from it.
fn standby_cluster(m: &str, standbys: &[&str]) -> ClusterData {
    let mut d = cluster(m, standbys);
    d.spec.role = cluster::data::ClusterRole::Standby;
    d.spec.standby_source = Some(cluster::data::StandbySource {
        host: "source".into(),
        port: 5432,
        user: "keelson_repl".into(),
        password_file: "/p".into(),
        ..Default::default()
    });
    d.dbs.get_mut(m).unwrap().status.in_recovery = true;
    d
}

#[test]
fn a_standby_leader_in_recovery_is_named_and_replaced_without_lag_limits() {
    // Named at the start although it is in recovery.
    let mut d = standby_cluster("m", &["s1", "s2"]);
    d.proxy.master_db = None;
    d.proxy.generation = 0;
    let o = observe(&d, &[]);
    let d1 = decide(&d, &o, T0);
    assert_eq!(d1.proxy.master_db.as_deref(), Some("m"));
    assert_eq!(
        d1.proxy_view().primary,
        None,
        "no writes in a standby cluster"
    );
    assert_eq!(
        d1.proxy_view().replicas.len(),
        3,
        "the leader serves reads too"
    );
    // Its failure moves the leadership to the most advanced member, even
    // one far behind and not streaming (it catches up from the source).
    let mut d = standby_cluster("m", &["s1", "s2"]);
    for (uid, lsn) in [("s1", 100 << 30), ("s2", 1)] {
        let db = d.dbs.get_mut(uid).unwrap();
        db.status.lsn = lsn;
        db.status.streaming = false;
    }
    let o = observe(&d, &["m"]);
    let o = with(o, "s1", |r| {
        r.lsn = Some(100 << 30);
        r.streaming = false;
        r.streaming_age_ms = None;
    });
    let d2 = rounds(&d, &o, &[T0, T0 + 5 * SEC, T0 + 5 * SEC + 1]);
    assert_eq!(master(&d2).as_deref(), Some("s1"), "{:?}", d2.notice);
    // The new leader is "ready" once its keeper applied the generation, in
    // recovery: the proxies name it (for reads) and the others follow it.
    let gen = d2.dbs["s1"].generation;
    let o2 = with(o.clone(), "s1", |r| r.applied_generation = gen);
    let d3 = rounds(&d2, &o2, &[T0 + 6 * SEC, T0 + 6 * SEC + 1]);
    assert_eq!(d3.proxy.master_db.as_deref(), Some("s1"), "{:?}", d3.notice);
    assert!(d3.failover.is_none());
    assert_eq!(d3.dbs["s2"].spec.follow.as_deref(), Some("s1"));
}

#[test]
fn a_promoted_standby_cluster_routes_writes_only_once_its_leader_left_recovery() {
    let mut d = standby_cluster("m", &["s1"]);
    d.proxy.master_db = None;
    d.proxy.generation = 0;
    let mut d = decide(&d, &observe(&d, &[]), T0 - SEC);
    assert_eq!(d.history.last().map(|h| h.reason.as_str()), Some("initial"));
    d.spec.role = cluster::data::ClusterRole::Primary;
    let o = observe(&d, &[]);
    let d1 = decide(&d, &o, T0);
    assert_eq!(d1.proxy.master_db, None, "still in recovery: no primary");
    assert!(d1.proxy.generation > d.proxy.generation);
    assert_eq!(decide(&d1, &o, T0 + 1).proxy.master_db, None);
    // Promoted (a new timeline, out of recovery): named again, in history.
    let o2 = with(o, "m", |r| {
        r.in_recovery = false;
        r.timeline = Some(2);
    });
    let d2 = decide(&d1, &o2, T0 + SEC);
    assert_eq!(d2.proxy.master_db.as_deref(), Some("m"));
    assert_eq!(d2.proxy_view().primary.as_deref(), Some("m:5432"));
    assert_eq!(
        d2.history.last().map(|h| h.reason.as_str()),
        Some("promoted")
    );
}

#[test]
fn a_standby_cluster_candidate_given_up_on_keeps_its_data() {
    let d = standby_cluster("m", &["s1", "s2"]);
    let o = observe(&d, &["m"]);
    let d1 = rounds(&d, &o, &[T0, T0 + 5 * SEC, T0 + 5 * SEC + 1]);
    let to = master(&d1).expect("a candidate");
    assert_ne!(to, "m");
    // It never applies its generation (its keeper cannot reach the
    // source, say): given up on after convergence_timeout, but not
    // copied afresh when it rejoins, as a primary cluster's would be.
    let later = T0 + 6 * SEC + d.spec.convergence_timeout.as_millis() as u64;
    let waiting = Observations {
        failover_since_ms: Some(T0 + 6 * SEC),
        ..o.clone()
    };
    let d2 = rounds(&d1, &waiting, &[T0 + 6 * SEC, later, later + 1]);
    assert_eq!(d2.dbs[&to].spec.role, Role::None, "{:?}", d2.notice);
    assert!(!d2.dbs[&to].spec.reinit);
    let mut primary = cluster("m", &["s1", "s2"]);
    primary.dbs.get_mut("s1").unwrap().status.lsn = 200;
    let o = with(observe(&primary, &["m"]), "s1", |r| r.lsn = Some(200));
    let p1 = rounds(&primary, &o, &[T0, T0 + 5 * SEC, T0 + 5 * SEC + 1]);
    let waiting = Observations {
        failover_since_ms: Some(T0 + 6 * SEC),
        ..o.clone()
    };
    let p2 = rounds(&p1, &waiting, &[T0 + 6 * SEC, later, later + 1]);
    assert!(
        p2.dbs["s1"].spec.reinit,
        "a primary cluster's candidate may have promoted itself"
    );
}
