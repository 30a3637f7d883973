//! Table-driven tests of `decide`: each row is a situation and what a
//! correct sentinel does in it.

use cluster::data::{ClusterPhase, Db, DbSpec, DbStatus, Keeper, KeeperReport, Role};
use cluster::{ClusterData, ClusterSpec};

use crate::decide::{choose_candidate, decide, master, Observations};

const T0: u64 = 1_000_000;
const SEC: u64 = 1000;

fn rep(uid: &str, healthy: bool, in_recovery: bool, lsn: u64, timeline: u32) -> KeeperReport {
    KeeperReport {
        uid: uid.into(),
        healthy,
        address: Some(format!("{uid}:5432")),
        in_recovery,
        lsn,
        timeline,
        system_id: Some("sys1".into()),
        applied_generation: 0,
        ..Default::default()
    }
}

/// A normal cluster: `m` is the named primary, the rest follow it; every
/// database healthy at LSN 100 on timeline 1, and specs applied.
fn cluster(m: &str, standbys: &[&str]) -> ClusterData {
    let mut d = ClusterData::new(ClusterSpec::default());
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
                spec,
                status: DbStatus {
                    healthy: true,
                    address: Some(format!("{uid}:5432")),
                    in_recovery: uid != m,
                    lsn: 100,
                    timeline: 1,
                    system_id: Some("sys1".into()),
                    applied_generation: 1,
                    ..Default::default()
                },
            },
        );
    }
    d.set_proxy_master(Some(m));
    d
}

/// Observations matching the cluster's current statuses, as keepers would
/// report them; `missing` keepers do not report.
fn observe(d: &ClusterData, missing: &[&str]) -> Observations {
    let mut o = Observations::default();
    for (uid, db) in &d.dbs {
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
        r.applied_generation = db.status.applied_generation;
        r.system_id = db.status.system_id.clone();
        r.synchronous_standbys = db.status.synchronous_standbys.clone();
        o.keepers.insert(uid.clone(), r);
    }
    o
}

fn with(mut o: Observations, uid: &str, f: impl FnOnce(&mut KeeperReport)) -> Observations {
    if let Some(r) = o.keepers.get_mut(uid) {
        f(r);
    }
    o
}

/// Runs decide until the master is reported dead for `fail_interval` and
/// the proxies (none here) have acknowledged: returns the data after
/// promotion.
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

/// What `keelson ctl switchover` writes.
fn switchover_requested(mut d: ClusterData, to: Option<&str>) -> ClusterData {
    d.set_proxy_master(None);
    d.failover = Some(cluster::data::Failover {
        from: "m".into(),
        fence_generation: d.proxy.generation,
        to: None,
        reason: cluster::data::SWITCHOVER.into(),
        requested: to.map(str::to_owned),
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
                o.keepers.insert("k1".into(), rep("k1", false, false, 0, 0));
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
                o.keepers.insert("a".into(), rep("a", false, false, 0, 0));
                let mut b = rep("b", false, false, 0, 0);
                b.priority = 5;
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
                    o.keepers.insert(k.into(), rep(k, false, false, 0, 0));
                }
                decide(&ClusterData::new(ClusterSpec::default()), &o, T0)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("a")),
        },
        Case {
            name: "a never-primary keeper is not the first primary",
            run: || {
                let mut o = Observations::default();
                let mut a = rep("a", false, false, 0, 0);
                a.never_primary = true;
                o.keepers.insert("a".into(), a);
                o.keepers.insert("b".into(), rep("b", false, false, 0, 0));
                decide(&ClusterData::new(ClusterSpec::default()), &o, T0)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("b")),
        },
        Case {
            name: "only never-primary keepers: no primary",
            run: || {
                let mut o = Observations::default();
                let mut a = rep("a", false, false, 0, 0);
                a.never_primary = true;
                o.keepers.insert("a".into(), a);
                decide(&ClusterData::new(ClusterSpec::default()), &o, T0)
            },
            check: |d| {
                assert!(master(d).is_none());
                assert_eq!(d.phase, ClusterPhase::Initializing);
            },
        },
        Case {
            name: "the primary is named once it runs its generation",
            run: || {
                let mut o = Observations::default();
                o.keepers.insert("k1".into(), rep("k1", false, false, 0, 0));
                let d = decide(&ClusterData::new(ClusterSpec::default()), &o, T0);
                let gen = d.dbs["k1"].generation;
                let o = with(o, "k1", |r| {
                    r.healthy = true;
                    r.applied_generation = gen;
                    r.timeline = 1;
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
                o.keepers.insert("k1".into(), rep("k1", true, false, 0, 1));
                decide(&ClusterData::new(ClusterSpec::default()), &o, T0)
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
                o.keepers
                    .insert("new".into(), rep("new", false, true, 0, 0));
                decide(&d, &o, T0)
            },
            check: |d| {
                assert_eq!(d.dbs["new"].spec.role, Role::Standby);
                assert_eq!(d.dbs["new"].spec.follow.as_deref(), Some("m"));
                assert_eq!(d.proxy.master_db.as_deref(), Some("m"));
            },
        },
        Case {
            name: "a primary down for less than fail_interval is not failed over",
            run: || {
                let d = cluster("m", &["s1"]);
                let o = observe(&d, &["m"]);
                let d = decide(&d, &o, T0);
                decide(&d, &o, T0 + 4 * SEC)
            },
            check: |d| {
                assert_eq!(d.proxy.master_db.as_deref(), Some("m"));
                assert_eq!(d.dbs["m"].status.unhealthy_since_ms, Some(T0));
                assert!(d.failover.is_none());
            },
        },
        Case {
            name: "past fail_interval the proxies are fenced first",
            run: || {
                let d = cluster("m", &["s1"]);
                let o = observe(&d, &["m"]);
                let d = decide(&d, &o, T0);
                let mut o = o;
                o.proxies.insert("p1".into(), 1);
                decide(&d, &o, T0 + 5 * SEC)
            },
            check: |d| {
                assert_eq!(d.proxy.master_db, None);
                assert_eq!(d.proxy.generation, 2);
                let f = d.failover.as_ref().expect("failover started");
                assert_eq!(
                    (f.from.as_str(), f.fence_generation, f.to.as_deref()),
                    ("m", 2, None)
                );
                assert_eq!(master(d).as_deref(), Some("m"), "nothing promoted yet");
            },
        },
        Case {
            name: "promotion waits for every live proxy to acknowledge",
            run: || {
                let d = cluster("m", &["s1"]);
                let mut o = observe(&d, &["m"]);
                o.proxies.insert("p1".into(), 1);
                o.proxies.insert("p2".into(), 1);
                let d = decide(&d, &o, T0);
                let d = decide(&d, &o, T0 + 5 * SEC);
                o.proxies.insert("p1".into(), 2);
                decide(&d, &o, T0 + 6 * SEC)
            },
            check: |d| {
                assert_eq!(master(d).as_deref(), Some("m"), "p2 has not acknowledged");
                assert!(d.failover.as_ref().is_some_and(|f| f.to.is_none()));
            },
        },
        Case {
            name: "a proxy whose lease ended does not hold up the promotion",
            run: || {
                let d = cluster("m", &["s1"]);
                let mut o = observe(&d, &["m"]);
                o.proxies.insert("p1".into(), 1);
                let d = decide(&d, &o, T0);
                let d = decide(&d, &o, T0 + 5 * SEC);
                o.proxies.clear();
                decide(&d, &o, T0 + 6 * SEC)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "failover elects the standby with the highest LSN",
            run: || {
                let d = cluster("m", &["s1", "s2", "s3"]);
                fail_master(&d, "m", |o| {
                    with(with(o, "s2", |r| r.lsn = 150), "s3", |r| r.lsn = 120)
                })
            },
            check: |d| {
                assert_eq!(master(d).as_deref(), Some("s2"));
                assert_eq!(d.dbs["s1"].spec.follow.as_deref(), Some("s2"));
                assert_eq!(d.dbs["s3"].spec.follow.as_deref(), Some("s2"));
                assert_eq!(
                    d.dbs["m"].spec.role,
                    Role::None,
                    "the old primary waits to rejoin"
                );
            },
        },
        Case {
            name: "a higher timeline beats a higher LSN",
            run: || {
                let d = cluster("m", &["s1", "s2"]);
                fail_master(&d, "m", |o| {
                    with(with(o, "s1", |r| r.lsn = 500), "s2", |r| {
                        r.timeline = 2;
                        r.lsn = 110
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
                fail_master(&d, "m", |o| with(o, "s2", |r| r.lsn = 999))
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "a standby lagging beyond max_standby_lag is not eligible",
            run: || {
                let mut d = cluster("m", &["s1"]);
                if let Some(db) = d.dbs.get_mut("m") {
                    db.status.lsn = 100 + 64 * 1024 * 1024;
                }
                fail_master(&d, "m", |o| o)
            },
            check: |d| {
                assert!(d.failover.is_none(), "no eligible standby: no fencing");
                assert_eq!(d.proxy.master_db.as_deref(), Some("m"));
            },
        },
        Case {
            name: "a standby of another system (forked) is not eligible",
            run: || {
                let d = cluster("m", &["s1", "s2"]);
                fail_master(&d, "m", |o| {
                    with(o, "s2", |r| {
                        r.system_id = Some("other".into());
                        r.lsn = 900
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
                    with(with(o, "s1", |r| r.timeline = 2), "s2", |r| r.timeline = 3)
                })
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s2")),
        },
        Case {
            name: "an unhealthy standby is not eligible",
            run: || {
                let d = cluster("m", &["s1", "s2"]);
                fail_master(&d, "m", |o| {
                    with(o, "s2", |r| {
                        r.healthy = false;
                        r.lsn = 999
                    })
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
                    r.timeline = 2;
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
                let o = with(observe(&d, &[]), "m", |r| r.healthy = false);
                let o = with(o, "s1", |r| {
                    r.in_recovery = false;
                    r.applied_generation = gen;
                });
                decide(&d, &o, T0 + 20 * SEC)
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
        Case {
            name: "a flapping primary does not accumulate failure time",
            run: || {
                let d = cluster("m", &["s1"]);
                let down = observe(&d, &["m"]);
                let up = observe(&d, &[]);
                let d = decide(&d, &down, T0);
                let d = decide(&d, &up, T0 + 3 * SEC);
                let d = decide(&d, &down, T0 + 4 * SEC);
                decide(&d, &down, T0 + 8 * SEC)
            },
            check: |d| {
                assert!(d.failover.is_none());
                assert_eq!(d.dbs["m"].status.unhealthy_since_ms, Some(T0 + 4 * SEC));
            },
        },
        Case {
            name: "a new sentinel leader keeps the failure timer",
            run: || {
                let d = cluster("m", &["s1"]);
                let o = observe(&d, &["m"]);
                let d = decide(&d, &o, T0);
                // The leader dies; the next one reads clusterdata from the store.
                let stored = ClusterData::from_json(&d.to_json()).expect("valid");
                decide(&stored, &o, T0 + 5 * SEC)
            },
            check: |d| {
                assert!(
                    d.failover.is_some(),
                    "failover at T0 + fail_interval, not later"
                )
            },
        },
        Case {
            name: "the failure timer starts when the primary was last seen healthy",
            run: || {
                let d = cluster("m", &["s1"]);
                let mut o = observe(&d, &["m"]);
                o.last_healthy_ms.insert("m".into(), T0 - 3 * SEC);
                let d = decide(&d, &o, T0);
                decide(&d, &o, T0 + 2 * SEC)
            },
            check: |d| {
                assert_eq!(d.dbs["m"].status.unhealthy_since_ms, Some(T0 - 3 * SEC));
                assert!(d.failover.is_some(), "5 s after the last healthy report");
            },
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
            name: "fencing without a candidate any more, and the old primary back: keep it",
            run: || {
                let d = cluster("m", &["s1"]);
                let o = observe(&d, &["m"]);
                let d = decide(&d, &o, T0);
                let d = decide(&d, &o, T0 + 5 * SEC);
                let o = with(observe(&d, &["s1"]), "m", |r| r.healthy = true);
                decide(&d, &o, T0 + 6 * SEC)
            },
            check: |d| {
                assert!(d.failover.is_none());
                assert_eq!(d.proxy.master_db.as_deref(), Some("m"));
                assert_eq!(d.proxy.generation, 3, "named again at a new generation");
            },
        },
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
            name:
                "switchover: the target is promoted after the old primary stopped and it caught up",
            run: || {
                let d = switchover_requested(cluster("m", &["s1", "s2"]), None);
                let d = decide(&d, &observe(&d, &[]), T0);
                let gen = d.dbs["m"].generation;
                let stopped = with(observe(&d, &[]), "m", |r| {
                    r.healthy = false;
                    r.applied_generation = gen;
                });
                decide(&d, &stopped, T0 + SEC)
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
            name: "switchover: a target behind the old primary is not promoted yet",
            run: || {
                let d = switchover_requested(cluster("m", &["s1"]), None);
                let d = decide(&d, &observe(&d, &[]), T0);
                let gen = d.dbs["m"].generation;
                let o = with(
                    with(observe(&d, &[]), "m", |r| {
                        r.healthy = false;
                        r.applied_generation = gen;
                        r.lsn = 500;
                    }),
                    "s1",
                    |r| r.lsn = 400,
                );
                decide(&d, &o, T0 + SEC)
            },
            check: |d| assert_eq!(master(d), None, "waiting for s1 to receive everything"),
        },
        Case {
            name: "switchover: the requested standby is promoted, not the most advanced",
            run: || {
                let mut d = switchover_requested(cluster("m", &["s1", "s2"]), Some("s1"));
                if let Some(db) = d.dbs.get_mut("s2") {
                    db.status.lsn = 150;
                }
                let d = decide(&d, &observe(&d, &[]), T0);
                let gen = d.dbs["m"].generation;
                let o = with(observe(&d, &[]), "m", |r| {
                    r.healthy = false;
                    r.applied_generation = gen;
                });
                decide(&d, &o, T0 + SEC)
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
        Case {
            name: "sync mode, one standby: it becomes synchronous",
            run: || {
                let mut d = cluster("m", &["s1"]);
                d.spec.synchronous_replication = true;
                decide(&d, &observe(&d, &[]), T0)
            },
            check: |d| assert_eq!(d.dbs["m"].spec.synchronous_standbys, vec!["s1".to_string()]),
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
                let mut d = cluster("m", &["s1"]);
                d.spec.synchronous_replication = true;
                if let Some(db) = d.dbs.get_mut("m") {
                    db.spec.synchronous_standbys = vec!["s1".into()];
                }
                decide(&d, &observe(&d, &["s1"]), T0)
            },
            check: |d| assert_eq!(d.dbs["m"].spec.synchronous_standbys, vec!["s1".to_string()]),
        },
        Case {
            name: "sync mode: replacing a sync standby goes through the union",
            run: || {
                let mut d = cluster("m", &["s1", "s2"]);
                d.spec.synchronous_replication = true;
                if let Some(db) = d.dbs.get_mut("m") {
                    db.spec.synchronous_standbys = vec!["s1".into()];
                }
                // s1 dies; s2 is healthy and should replace it.
                decide(&d, &observe(&d, &["s1"]), T0)
            },
            check: |d| {
                assert_eq!(
                    d.dbs["m"].spec.synchronous_standbys,
                    vec!["s1".to_string(), "s2".into()]
                )
            },
        },
        Case {
            name: "sync mode: the set shrinks only after the primary applied the union",
            run: || {
                let mut d = cluster("m", &["s1", "s2"]);
                d.spec.synchronous_replication = true;
                if let Some(db) = d.dbs.get_mut("m") {
                    db.spec.synchronous_standbys = vec!["s1".into()];
                }
                let d = decide(&d, &observe(&d, &["s1"]), T0);
                let not_applied = decide(&d, &observe(&d, &["s1"]), T0 + SEC);
                assert_eq!(not_applied.dbs["m"].spec.synchronous_standbys.len(), 2);
                let gen = d.dbs["m"].generation;
                let o = with(observe(&d, &["s1"]), "m", |r| r.applied_generation = gen);
                decide(&d, &o, T0 + 2 * SEC)
            },
            check: |d| assert_eq!(d.dbs["m"].spec.synchronous_standbys, vec!["s2".to_string()]),
        },
        Case {
            name: "sync mode: only a standby the primary reported synchronous is elected",
            run: || {
                let mut d = cluster("m", &["s1", "s2"]);
                d.spec.synchronous_replication = true;
                if let Some(db) = d.dbs.get_mut("m") {
                    db.spec.synchronous_standbys = vec!["s1".into()];
                    db.status.synchronous_standbys = vec!["s1".into()];
                }
                fail_master(&d, "m", |o| with(o, "s2", |r| r.lsn = 999))
            },
            check: |d| assert_eq!(master(d).as_deref(), Some("s1")),
        },
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
                // The old primary still reports healthy: the failover goes on.
                decide(&fenced, &o, T0 + 1)
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
        Case {
            name: "sync mode: no synchronous standby, no failover",
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
    ]
}

#[test]
fn decide_table() {
    let cases = cases();
    assert!(cases.len() >= 30, "{} scenarios", cases.len());
    for c in cases {
        let result = std::panic::catch_unwind(|| {
            let d = (c.run)();
            (c.check)(&d);
        });
        assert!(result.is_ok(), "scenario failed: {}", c.name);
    }
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
    assert_eq!(choose_candidate(&d, "m").as_deref(), Some("s1"));
}
