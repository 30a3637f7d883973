//! One conformance suite, run unchanged against the embedded file store and
//! a real etcd: CAS conflicts, lease expiry, watch ordering and resume, and
//! leader election.

use std::time::Duration;

use cluster::{Cas, Store, StoreError, WatchEvent};

use crate::support::EtcdServer;

async fn cas_conflicts<S: Store>(s: &S) {
    let k = "/t/cas";
    let Cas::Done(r1) = s.put_if_revision(k, "one", 0, 0).await.unwrap() else {
        panic!("create must succeed")
    };
    // Creating again conflicts and shows the current value.
    match s.put_if_revision(k, "again", 0, 0).await.unwrap() {
        Cas::Conflict(Some(kv)) => assert_eq!((kv.value.as_str(), kv.mod_revision), ("one", r1)),
        other => panic!("{other:?}"),
    }
    let Cas::Done(r2) = s.put_if_revision(k, "two", r1, 0).await.unwrap() else {
        panic!("CAS on the read revision must succeed")
    };
    assert!(r2 > r1);
    // A writer holding the stale revision loses.
    assert!(matches!(
        s.put_if_revision(k, "stale", r1, 0).await.unwrap(),
        Cas::Conflict(Some(_))
    ));
    assert_eq!(s.get(k).await.unwrap().unwrap().value, "two");
    assert!(!s.delete_if_revision(k, r1).await.unwrap());
    assert!(s.delete_if_revision(k, r2).await.unwrap());
    assert!(s.get(k).await.unwrap().is_none());
    // Concurrent increments by CAS never lose an update.
    s.put("/t/counter", "0", 0).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let s2 = s;
        tasks.push(async move {
            for _ in 0..5 {
                loop {
                    let kv = s2.get("/t/counter").await.unwrap().unwrap();
                    let n: u32 = kv.value.parse().unwrap();
                    if let Cas::Done(_) = s2
                        .put_if_revision("/t/counter", &(n + 1).to_string(), kv.mod_revision, 0)
                        .await
                        .unwrap()
                    {
                        break;
                    }
                }
            }
        });
    }
    futures_util::future::join_all(tasks).await;
    assert_eq!(s.get("/t/counter").await.unwrap().unwrap().value, "20");
}

async fn lease_expiry<S: Store>(s: &S) {
    let lease = s.grant(Duration::from_secs(1)).await.unwrap();
    s.put("/t/leased/a", "x", lease).await.unwrap();
    s.put("/t/leased/b", "y", 0).await.unwrap();
    // Kept alive, it survives past its TTL.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.keep_alive(lease).await.unwrap();
    }
    assert!(s.get("/t/leased/a").await.unwrap().is_some());
    // Left alone, it expires and takes its keys with it.
    crate::assert_eventually!(
        s.get("/t/leased/a").await.unwrap().is_none(),
        Duration::from_secs(6),
        "leased key outlived its lease"
    );
    assert!(
        s.get("/t/leased/b").await.unwrap().is_some(),
        "unleased keys stay"
    );
    let r = s.keep_alive(lease).await;
    assert!(matches!(r, Err(StoreError::LeaseExpired(_))), "{r:?}");
    assert!(
        s.put("/t/leased/c", "z", lease).await.is_err(),
        "an expired lease takes no keys"
    );
    // Revoking deletes at once.
    let l2 = s.grant(Duration::from_secs(30)).await.unwrap();
    s.put("/t/leased/d", "w", l2).await.unwrap();
    s.revoke(l2).await.unwrap();
    assert!(s.get("/t/leased/d").await.unwrap().is_none());
}

async fn next_event(w: &mut cluster::Watch) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), w.recv())
        .await
        .expect("watch event within 5 s")
        .expect("watch open")
        .expect("no watch error")
}

async fn watch_order_and_resume<S: Store>(s: &S) {
    let (_, rev0) = s.list("/t/w/").await.unwrap();
    let mut w = s.watch("/t/w/", rev0 + 1).await.unwrap();
    let started = std::time::Instant::now();
    s.put("/t/w/a", "1", 0).await.unwrap();
    let first = next_event(&mut w).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "watch fired after {:?}",
        started.elapsed()
    );
    s.put("/t/other", "ignored", 0).await.unwrap();
    s.put("/t/w/b", "2", 0).await.unwrap();
    s.delete("/t/w/a").await.unwrap();
    s.put("/t/w/a", "3", 0).await.unwrap();
    let mut events = vec![first];
    for _ in 0..3 {
        events.push(next_event(&mut w).await);
    }
    let summary: Vec<(String, Option<String>)> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Put(kv) => (kv.key.clone(), Some(kv.value.clone())),
            WatchEvent::Delete { key, .. } => (key.clone(), None),
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("/t/w/a".into(), Some("1".into())),
            ("/t/w/b".into(), Some("2".into())),
            ("/t/w/a".into(), None),
            ("/t/w/a".into(), Some("3".into())),
        ]
    );
    let revs: Vec<i64> = events.iter().map(WatchEvent::revision).collect();
    assert!(
        revs.windows(2).all(|p| p[0] < p[1]),
        "revisions increase: {revs:?}"
    );
    drop(w);
    // Resume from the revision after the second event: the rest replays.
    let mut w2 = s.watch("/t/w/", revs[1] + 1).await.unwrap();
    assert_eq!(next_event(&mut w2).await.revision(), revs[2]);
    assert_eq!(next_event(&mut w2).await.revision(), revs[3]);
}

async fn election<S: Store>(s: &S) {
    let key = "/t/leader";
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(s.grant(Duration::from_secs(1)).await.unwrap());
    }
    let names = ["s1", "s2", "s3"];
    let results = futures_util::future::join_all(
        names
            .iter()
            .zip(&leases)
            .map(|(n, l)| s.campaign(key, n, *l)),
    )
    .await;
    let winners: Vec<&str> = names
        .iter()
        .zip(&results)
        .filter(|(_, r)| *r.as_ref().unwrap())
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one winner: {winners:?}");
    let winner = winners[0];
    assert_eq!(s.leader(key).await.unwrap().as_deref(), Some(winner));
    // Campaigning again keeps the winner, and losers still lose.
    let wi = names.iter().position(|n| *n == winner).unwrap();
    assert!(s.campaign(key, winner, leases[wi]).await.unwrap());
    // The others keep their leases alive; the winner's ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    let next = loop {
        for (i, l) in leases.iter().enumerate() {
            if i != wi {
                s.keep_alive(*l).await.unwrap();
                if s.campaign(key, names[i], *l).await.unwrap() {
                    assert!(names[i] != winner);
                }
            }
        }
        if let Some(l) = s.leader(key).await.unwrap() {
            if l != winner {
                break l;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no one took over");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(next, winner);
    // Resigning hands over too.
    s.resign(key, &next).await.unwrap();
    assert_eq!(s.leader(key).await.unwrap(), None);
}

async fn suite<S: Store>(s: &S) {
    cas_conflicts(s).await;
    watch_order_and_resume(s).await;
    election(s).await;
    lease_expiry(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let s = cluster::open(&format!("file://{}", dir.path().display()))
        .await
        .unwrap();
    suite(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_etcd() {
    let etcd = EtcdServer::start().await;
    let s = cluster::open(&etcd.url()).await.unwrap();
    suite(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_store_urls_are_explained() {
    let e = cluster::open("zk://x").await.unwrap_err().to_string();
    assert!(e.contains("file:///dir") && e.contains("etcd://"), "{e}");
    let e = cluster::open("file://relative")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("absolute path"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_fails_over_between_listed_endpoints() {
    let etcd = EtcdServer::start().await;
    let dead = crate::support::free_port();
    // The first endpoint has nothing listening; every request must still
    // succeed through the second.
    let url = format!("etcd://127.0.0.1:{dead},127.0.0.1:{}", etcd.port);
    let s = cluster::open(&url).await.unwrap();
    for i in 0..20 {
        let key = format!("/t/failover/{i}");
        s.put(&key, "v", 0).await.unwrap();
        assert_eq!(s.get(&key).await.unwrap().unwrap().value, "v");
    }
    let mut w = s.watch("/t/failover/", 0).await.unwrap();
    s.put("/t/failover/w", "x", 0).await.unwrap();
    assert_eq!(next_event(&mut w).await.key(), "/t/failover/w");
}

/// F10: the leader sentinel compacts etcd's history, which otherwise grows
/// with every write until etcd refuses writes (NOSPACE). A watch resuming
/// from before the compaction is told so (and re-reads), and the current
/// values are all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_history_is_compacted_and_old_watches_are_told() {
    let etcd = EtcdServer::start().await;
    let s = cluster::open(&etcd.url()).await.unwrap();
    let first = s.put("/t/c/k", "0", 0).await.unwrap();
    for i in 1..50 {
        s.put("/t/c/k", &i.to_string(), 0).await.unwrap();
    }
    s.compact_keeping(5).await.unwrap();
    // Compacting again below the compacted revision is not an error.
    s.compact_keeping(5).await.unwrap();
    assert_eq!(s.get("/t/c/k").await.unwrap().unwrap().value, "49");
    let mut w = s.watch("/t/c/", first).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), w.recv())
        .await
        .expect("an answer");
    assert!(
        matches!(got, Some(Err(StoreError::Compacted(_)))),
        "{got:?}"
    );
}

/// The keeper renews its lease within `fence_timeout` (F), every keep-alive
/// period (P). When the etcd member it talks to hangs (cut from its peers,
/// or its link stalls), the renewal must reach another member in time:
/// each member gets P, so the hung one costs P and the renewal lands by
/// 2P + a round trip, within F (>= 3P). With the store's 2 s request
/// timeout per member, a renewal took over 2 s, leaving 250 ms of a 3 s
/// fence timeout: the fault lab saw a primary fence itself that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_renewal_moves_past_a_hung_etcd_member_within_one_period() {
    let etcd = EtcdServer::start().await;
    let hung = crate::support::Link::start(etcd.port).await;
    let good = crate::support::Link::start(etcd.port).await;
    let url = format!("etcd://127.0.0.1:{},127.0.0.1:{}", hung.port, good.port);
    let s = cluster::open(&url).await.unwrap();
    let lease = s.grant(Duration::from_secs(10)).await.unwrap();
    s.keep_alive(lease).await.unwrap();
    // The first endpoint answered; now it stalls.
    hung.cut();
    // The fault lab's spec: F = 3 s, so P = 750 ms.
    let spec = cluster::ClusterSpec {
        fence_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    spec.validate().unwrap();
    let (period, fence) = (spec.keeper_keepalive_period(), spec.fence_timeout);
    let t = std::time::Instant::now();
    s.keep_alive_within(lease, period).await.unwrap();
    let took = t.elapsed();
    eprintln!("renewal past a hung member took {took:?} (period {period:?}, fence {fence:?})");
    // It must land before the previous renewal's time plus F, that is
    // within F - P of being sent, and keep a third of F to spare for a
    // slow round trip on a loaded host.
    assert!(
        took + period <= fence - fence / 3,
        "a renewal past a hung member took {took:?}: with a {period:?} period it leaves less than a third of the {fence:?} fence timeout"
    );
    // The next renewal starts from the member that answered.
    let t = std::time::Instant::now();
    s.keep_alive_within(lease, period).await.unwrap();
    assert!(t.elapsed() < period, "{:?}", t.elapsed());
}
