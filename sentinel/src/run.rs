//! The sentinel's loop: hold a lease, campaign for leadership, and while
//! leader read the cluster data, the keepers' reports and the proxies'
//! acknowledgements, call [`decide`], and write the result by
//! compare-and-swap on the revision read.
//!
//! Every timer is this sentinel's own, on its monotonic clock: a keeper
//! reports while its report keeps changing (its `seq`), and it was healthy
//! when this sentinel last saw a healthy report change. No clocks of two
//! hosts are compared. The memory starts afresh when this sentinel gains
//! leadership and after any gap in its observations (the store could not
//! be read): time the sentinel could not observe never counts as failure
//! time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cluster::data::{KeeperReport, ProxyReport};
use cluster::{AnyStore, Cas, ClusterData, Keys, LeaseId, Store, StoreError};

use crate::decide::{decide, Observations};

/// How often the sentinel looks at the cluster.
pub const TICK: Duration = Duration::from_millis(250);
/// The sentinel's lease: leadership moves on this long after it dies.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
/// Clusterdata writes that change only LSNs and replay lag are made at
/// most this often (they are what proxies judge replica lag by).
pub const STATUS_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// What one sentinel remembers between rounds, on its own clock.
#[derive(Debug, Default)]
pub struct Memory {
    /// Since when it has observed without a gap.
    since_ms: u64,
    /// The end of the last round that read the store.
    last_round_ms: Option<u64>,
    /// Per keeper: the (instance, seq) last seen and when it changed.
    seen: BTreeMap<String, (String, u64, u64)>,
    last_healthy: BTreeMap<String, u64>,
    /// The failover step last seen and since when.
    failover: Option<(String, u64)>,
    /// When clusterdata was last written by this sentinel.
    last_write_ms: Option<u64>,
    /// Decisions written since the caller last took them, by kind.
    pub decided: Vec<String>,
}

impl Memory {
    /// Forgets everything: timers start again from `now`.
    pub fn reset(&mut self, now_ms: u64) {
        *self = Memory {
            since_ms: now_ms,
            ..Default::default()
        };
    }
}

/// A monotonic clock in milliseconds; starts at 1, so that 0 never means
/// "now".
pub type Clock<'a> = &'a (dyn Fn() -> u64 + Sync);

/// Reads what the keepers and proxies report, judged by `mem` at `now`.
pub async fn observe<S: Store>(
    store: &S,
    keys: &Keys,
    data: &ClusterData,
    mem: &mut Memory,
    now_ms: u64,
) -> Result<Observations, StoreError> {
    let (keepers, _) = store.list(&keys.keepers()).await?;
    let (proxies, _) = store.list(&keys.proxies()).await?;
    Ok(judge(keys, data, keepers, proxies, mem, now_ms))
}

/// Judges the keepers' and proxies' registrations read at `now_ms` by
/// what `mem` remembers of earlier rounds.
fn judge(
    keys: &Keys,
    data: &ClusterData,
    keepers: Vec<cluster::KeyValue>,
    proxies: Vec<cluster::KeyValue>,
    mem: &mut Memory,
    now_ms: u64,
) -> Observations {
    let mut obs = Observations::default();
    let stale_ms = data.spec.report_stale_after().as_millis() as u64 + TICK.as_millis() as u64;
    for kv in keepers {
        // A registration that cannot be read still holds a live lease: its
        // keeper has not fenced itself.
        if let Some(uid) = kv.key.strip_prefix(&keys.keepers()) {
            obs.registered.insert(uid.to_owned());
        }
        let r = match serde_json::from_str::<KeeperReport>(&kv.value) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(key = kv.key, error = %e, "ignoring an unreadable keeper report");
                continue;
            }
        };
        obs.registered.insert(r.uid.clone());
        let changed = match mem.seen.get(&r.uid) {
            Some((instance, seq, at)) if *instance == r.instance && *seq == r.seq => *at,
            _ => now_ms,
        };
        mem.seen
            .insert(r.uid.clone(), (r.instance.clone(), r.seq, changed));
        if now_ms.saturating_sub(changed) > stale_ms {
            continue;
        }
        if r.healthy {
            let t = mem.last_healthy.entry(r.uid.clone()).or_insert(changed);
            *t = (*t).max(changed);
        }
        obs.keepers.insert(r.uid.clone(), r);
    }
    mem.seen.retain(|uid, _| obs.registered.contains(uid));
    for kv in proxies {
        match serde_json::from_str::<ProxyReport>(&kv.value) {
            Ok(p) => {
                obs.proxies.insert(p.uid.clone(), p);
            }
            Err(e) => {
                // An unreadable registration still belongs to a live proxy
                // that must acknowledge: count it as acknowledging nothing.
                let uid = kv.key.rsplit('/').next().unwrap_or_default().to_owned();
                tracing::warn!(key = kv.key, error = %e, "unreadable proxy registration");
                obs.proxies.insert(
                    uid.clone(),
                    ProxyReport {
                        uid,
                        ..Default::default()
                    },
                );
            }
        }
    }
    obs.last_healthy_ms = mem.last_healthy.clone();
    obs.since_ms = mem.since_ms;
    let step = data.failover.as_ref().map(|f| {
        format!(
            "{}>{:?}@{}/{:?}/{}",
            f.from, f.to, f.fence_generation, f.fence, f.reason
        )
    });
    mem.failover = match (step, mem.failover.take()) {
        (Some(s), Some((old, t))) if s == old => Some((old, t)),
        (Some(s), _) => Some((s, now_ms)),
        (None, _) => None,
    };
    obs.failover_since_ms = mem.failover.as_ref().map(|(_, t)| *t);
    obs.wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    obs
}

/// The keepers' and proxies' registrations as they are now, every report
/// taken as current (for `ctl`, which has no memory of earlier rounds).
pub async fn observe_once(store: &AnyStore, keys: &Keys) -> Result<Observations, StoreError> {
    let mut mem = Memory::default();
    let data = ClusterData::new(cluster::ClusterSpec::default());
    observe(store, keys, &data, &mut mem, 1).await
}

/// Whether two cluster data differ only in what changes with every WAL
/// record (LSNs and replay lag).
fn only_volatile(a: &ClusterData, b: &ClusterData) -> bool {
    let strip = |d: &ClusterData| {
        let mut d = d.clone();
        for db in d.dbs.values_mut() {
            db.status.lsn = 0;
            db.status.replay_lsn = 0;
            db.status.replay_lag_ms = None;
        }
        d
    };
    strip(a) == strip(b)
}

/// Longer than this from the end of one round to the start of the next
/// one's reads is a gap in observation: a store outage, a stall of this
/// process. Every keeper's writes may have waited as long, so that time
/// never counts as failure time.
pub const OBSERVATION_GAP: Duration = Duration::from_millis(
    2 * TICK.as_millis() as u64 + cluster::store::REQUEST_TIMEOUT.as_millis() as u64,
);

/// A round's reads that took longer than this waited on the store past
/// one request's timeout (a request stuck on a dead etcd member until the
/// client tried the next one, an election): a gap in observation too.
/// Reads that are merely slow (each request answered within its timeout)
/// are not, so a slow store still fails a dead primary over.
pub const READ_STALL: Duration = cluster::store::REQUEST_TIMEOUT;

/// Restarts every timer, as of `done`, if this round's reads began more
/// than [`OBSERVATION_GAP`] after the last round ended or took longer than
/// [`READ_STALL`].
fn after_gap(mem: &mut Memory, started: u64, done: u64) {
    let before = mem.last_round_ms.map(|t| started.saturating_sub(t));
    let read = done.saturating_sub(started);
    let gap = before.is_none_or(|b| b > OBSERVATION_GAP.as_millis() as u64)
        || read > READ_STALL.as_millis() as u64;
    if gap {
        if before.is_some() {
            tracing::info!(
                since_last_round_ms = before,
                read_ms = read,
                "observation gap: restarting failure timers"
            );
        }
        mem.reset(done);
    }
}

/// One round as leader. Returns whether the cluster data changed.
pub async fn step<S: Store>(
    store: &S,
    keys: &Keys,
    mem: &mut Memory,
    clock: Clock<'_>,
) -> Result<bool, StoreError> {
    let result = round(store, keys, mem, clock).await;
    if result.is_ok() {
        mem.last_round_ms = Some(clock());
    }
    result
}

async fn round<S: Store>(
    store: &S,
    keys: &Keys,
    mem: &mut Memory,
    clock: Clock<'_>,
) -> Result<bool, StoreError> {
    // The three reads at once (a slow store costs one request's time, not
    // three); the keepers are judged as of when their list returned.
    let (data_key, keepers_prefix, proxies_prefix) =
        (keys.clusterdata(), keys.keepers(), keys.proxies());
    let started = clock();
    let (kv, (keepers, now), (proxies, _)) = tokio::try_join!(
        store.get(&data_key),
        async {
            let (kvs, _) = store.list(&keepers_prefix).await?;
            Ok::<_, StoreError>((kvs, clock()))
        },
        store.list(&proxies_prefix),
    )?;
    after_gap(mem, started, clock());
    let Some(kv) = kv else {
        return Ok(false);
    };
    let data = ClusterData::from_json(&kv.value).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let obs = judge(keys, &data, keepers, proxies, mem, now);
    let next = decide(&data, &obs, now);
    if next == data {
        return Ok(false);
    }
    if only_volatile(&next, &data)
        && mem
            .last_write_ms
            .is_some_and(|t| now.saturating_sub(t) < STATUS_WRITE_INTERVAL.as_millis() as u64)
    {
        return Ok(false);
    }
    if next.proxy != data.proxy || next.failover != data.failover {
        tracing::info!(
            generation = next.proxy.generation,
            master = ?next.proxy.master_db,
            failover = ?next.failover,
            "cluster decision"
        );
    }
    for (uid, db) in &next.dbs {
        let before = data.dbs.get(uid).map(|d| &d.spec);
        if before != Some(&db.spec) {
            // Why a set changed is in what the members reported.
            let members: Vec<String> = before
                .into_iter()
                .flat_map(|s| s.synchronous_standbys.iter())
                .chain(db.spec.synchronous_standbys.iter())
                .filter_map(|m| next.dbs.get(m).map(|x| (m, &x.status)))
                .map(|(m, s)| format!("{m}: healthy={} streaming={}", s.healthy, s.streaming))
                .collect();
            tracing::info!(
                db = %uid,
                generation = db.generation,
                role = db.spec.role.as_str(),
                follow = ?db.spec.follow,
                synchronous_standbys = ?db.spec.synchronous_standbys,
                before = ?before.map(|s| &s.synchronous_standbys),
                confirmed = ?db.status.sync_confirmed,
                ?members,
                "database spec changed"
            );
        }
    }
    if next.notice != data.notice {
        if let Some(n) = &next.notice {
            tracing::warn!(notice = %n, "cluster waiting");
        }
    }
    match store
        .put_if_revision(&keys.clusterdata(), &next.to_json(), kv.mod_revision, 0)
        .await?
    {
        Cas::Done(_) => {
            mem.last_write_ms = Some(now);
            mem.decided.extend(decisions(&data, &next));
            Ok(true)
        }
        // Someone else wrote meanwhile (ctl, or a leader we did not know
        // about): decide again from what is there now.
        Cas::Conflict(_) => Ok(false),
    }
}

/// What a written decision changed, for the decision counters: a
/// failover or switchover started (by its reason), a new primary for the
/// proxies, a synchronous set changed, another database spec changed.
fn decisions(before: &ClusterData, next: &ClusterData) -> Vec<String> {
    let mut out = Vec::new();
    if let (None, Some(f)) = (&before.failover, &next.failover) {
        out.push(format!("{}_started", f.reason));
    }
    if before.proxy.master_db != next.proxy.master_db {
        out.push("primary_changed".into());
    }
    for (uid, db) in &next.dbs {
        match before.dbs.get(uid).map(|d| &d.spec) {
            Some(b) if b.synchronous_standbys != db.spec.synchronous_standbys => {
                out.push("sync_set_changed".into())
            }
            Some(b) if *b != db.spec => out.push("db_spec_changed".into()),
            None => out.push("db_spec_changed".into()),
            _ => {}
        }
    }
    out
}

/// What a sentinel's node API answers from.
#[derive(Debug, Default)]
pub struct SentinelNode {
    pub uid: String,
    leading: std::sync::atomic::AtomicBool,
    state: std::sync::Mutex<SentinelState>,
}

#[derive(Debug, Default, Clone)]
struct SentinelState {
    /// When the loop last registered in the store (its lease renewed).
    registered: Option<Instant>,
    /// When the loop last began a round, whatever the store answered.
    turned: Option<Instant>,
    decisions: BTreeMap<String, u64>,
}

/// How long a sentinel may go without registering in the store before
/// `/health` fails.
pub const SENTINEL_HEALTH_LIMIT: Duration = Duration::from_secs(10);

/// How long a sentinel's loop may go without beginning a round before
/// `/liveness` fails: far above the longest a round can wait on an
/// unreachable store, so that a store outage never restarts sentinels.
pub const SENTINEL_LIVENESS_LIMIT: Duration = Duration::from_secs(60);

impl SentinelNode {
    pub fn new(uid: &str) -> SentinelNode {
        SentinelNode {
            uid: uid.to_owned(),
            ..Default::default()
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut SentinelState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// It won the last election it ran, and it is still registered (a
    /// sentinel cut off from the store leads no more once its lease ends).
    pub fn is_leader(&self, now: Instant) -> bool {
        // Registered within its lease's TTL: past that, another sentinel
        // may have won the election.
        self.leading.load(std::sync::atomic::Ordering::Relaxed)
            && self.with(|s| {
                s.registered
                    .is_some_and(|t| now.saturating_duration_since(t) < LEASE_TTL)
            })
    }

    /// Its loop began a round within [`SENTINEL_LIVENESS_LIMIT`], whether
    /// or not the store answers (`/liveness`; before the first round, it
    /// counts as alive).
    pub fn is_alive(&self, now: Instant) -> bool {
        self.with(|s| {
            s.turned
                .is_none_or(|t| now.saturating_duration_since(t) <= SENTINEL_LIVENESS_LIMIT)
        })
    }

    /// Its loop runs and it renewed its registration in the store within
    /// [`SENTINEL_HEALTH_LIMIT`].
    pub fn is_healthy(&self, now: Instant) -> bool {
        self.with(|s| {
            s.registered
                .is_some_and(|t| now.saturating_duration_since(t) <= SENTINEL_HEALTH_LIMIT)
        })
    }

    /// `/health` and `/leader` bodies.
    pub fn status_json(&self, now: Instant) -> String {
        let s = self.with(|s| s.clone());
        serde_json::json!({
            "uid": self.uid,
            "leader": self.is_leader(now),
            "healthy": self.is_healthy(now),
            "registered_seconds_ago": s.registered.map(|t| now.saturating_duration_since(t).as_secs_f64()),
            "decisions": s.decisions,
        })
        .to_string()
    }

    /// The Prometheus text for `/metrics`.
    pub fn metrics_text(&self, now: Instant) -> String {
        let uid = &self.uid;
        let s = self.with(|s| s.clone());
        let mut out = format!(
            "# HELP keelson_sentinel_leader 1 on the sentinel that leads.\n\
             # TYPE keelson_sentinel_leader gauge\n\
             keelson_sentinel_leader{{uid=\"{uid}\"}} {}\n\
             # HELP keelson_sentinel_healthy 1 while the sentinel renews its registration in the store.\n\
             # TYPE keelson_sentinel_healthy gauge\n\
             keelson_sentinel_healthy{{uid=\"{uid}\"}} {}\n\
             # HELP keelson_sentinel_decisions_total Cluster data changes this sentinel wrote, by what they changed.\n\
             # TYPE keelson_sentinel_decisions_total counter\n",
            u8::from(self.is_leader(now)),
            u8::from(self.is_healthy(now)),
        );
        for (d, n) in &s.decisions {
            out.push_str(&format!(
                "keelson_sentinel_decisions_total{{uid=\"{uid}\",decision=\"{d}\"}} {n}\n"
            ));
        }
        out
    }
}

/// How often the leader compacts the store's history (etcd keeps every
/// revision until compacted).
const COMPACT_EVERY: Duration = Duration::from_secs(300);
/// Revisions kept behind the current one when compacting.
const COMPACT_KEEP: i64 = 10_000;

/// Runs a sentinel named `uid` until the task is dropped.
pub async fn run(store: AnyStore, keys: Keys, uid: String, node: std::sync::Arc<SentinelNode>) {
    let started = Instant::now();
    let clock = move || started.elapsed().as_millis() as u64 + 1;
    let mut lease: LeaseId = 0;
    let mut leading = false;
    let mut mem = Memory::default();
    let mut last_compact = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        node.with(|s| s.turned = Some(Instant::now()));
        if lease == 0 {
            match store.grant(LEASE_TTL).await {
                Ok(l) => lease = l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot get a lease");
                    continue;
                }
            }
        } else if let Err(e) = store.keep_alive(lease).await {
            tracing::warn!(error = %e, "cannot renew the lease");
            if matches!(e, StoreError::LeaseExpired(_)) {
                lease = 0;
                leading = false;
                node.leading
                    .store(false, std::sync::atomic::Ordering::Relaxed);
            }
            continue;
        }
        match store
            .put(&format!("{}{uid}", keys.sentinels()), "{}", lease)
            .await
        {
            Ok(_) => node.with(|s| s.registered = Some(Instant::now())),
            Err(e) => tracing::debug!(error = %e, "cannot register"),
        }
        match store.campaign(&keys.leader(), &uid, lease).await {
            Ok(now) => {
                if now != leading {
                    tracing::info!(leader = now, "sentinel leadership changed");
                    // A new leader starts its health timers afresh.
                    mem = Memory::default();
                }
                leading = now;
                node.leading
                    .store(now, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "campaign failed"),
        }
        if leading {
            if let Err(e) = step(&store, &keys, &mut mem, &clock).await {
                tracing::warn!(error = %e, "sentinel round failed");
            }
            let decided = std::mem::take(&mut mem.decided);
            node.with(|s| {
                for d in decided {
                    *s.decisions.entry(d).or_default() += 1;
                }
            });
            if last_compact.elapsed() >= COMPACT_EVERY {
                last_compact = Instant::now();
                if let Err(e) = store.compact_keeping(COMPACT_KEEP).await {
                    tracing::warn!(error = %e, "cannot compact the store's history");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use cluster::data::{ClusterPhase, Db, DbSpec, DbStatus, Keeper, Role};
    use cluster::ClusterSpec;

    use super::*;

    /// `/liveness` follows the loop, not the store: a sentinel whose every
    /// store call fails (never registered) stays alive while its rounds
    /// begin, and is dead only past the limit.
    #[test]
    fn liveness_follows_the_loop_not_the_store() {
        let node = SentinelNode::new("s");
        let t = Instant::now();
        assert!(node.is_alive(t), "alive before its first round");
        node.with(|s| s.turned = Some(t));
        assert!(node.is_alive(t + SENTINEL_LIVENESS_LIMIT));
        assert!(
            !node.is_healthy(t),
            "never registered: /health and /readiness fail"
        );
        assert!(!node.is_alive(t + SENTINEL_LIVENESS_LIMIT + Duration::from_millis(1)));
    }

    /// A two-database cluster in the file store, `m` primary; reports are
    /// written by the test under one long lease.
    async fn setup() -> (tempfile::TempDir, AnyStore, Keys, LeaseId) {
        let dir = tempfile::tempdir().unwrap();
        let store = cluster::open(&format!("file://{}", dir.path().display()))
            .await
            .unwrap();
        let keys = Keys::new("keelson", "t");
        let mut d = ClusterData::new(ClusterSpec::default());
        d.phase = ClusterPhase::Normal;
        for (uid, role) in [("m", Role::Master), ("s1", Role::Standby)] {
            d.keepers.insert(uid.into(), Keeper::default());
            d.dbs.insert(
                uid.into(),
                Db {
                    keeper: uid.into(),
                    generation: 1,
                    restart: 0,
                    backup: None,
                    spec: DbSpec {
                        role,
                        follow: (role == Role::Standby).then(|| "m".to_owned()),
                        ..Default::default()
                    },
                    status: DbStatus {
                        healthy: true,
                        address: Some(format!("{uid}:1")),
                        in_recovery: role == Role::Standby,
                        applied_generation: 1,
                        streaming: role == Role::Standby,
                        ..Default::default()
                    },
                },
            );
        }
        d.set_proxy_master(Some("m"));
        store
            .put(&keys.clusterdata(), &d.to_json(), 0)
            .await
            .unwrap();
        let lease = store.grant(Duration::from_secs(600)).await.unwrap();
        (dir, store, keys, lease)
    }

    async fn report(store: &AnyStore, keys: &Keys, lease: LeaseId, uid: &str, seq: u64) {
        let r = KeeperReport {
            uid: uid.into(),
            instance: "i".into(),
            seq,
            healthy: true,
            running: true,
            address: Some(format!("{uid}:1")),
            in_recovery: uid != "m",
            lsn: Some(100),
            timeline: Some(1),
            system_id: Some("s".into()),
            applied_generation: 1,
            synchronous_standbys: Some(vec![]),
            streaming: uid != "m",
            streaming_age_ms: Some(0),
            ..Default::default()
        };
        store
            .put(
                &keys.keeper(uid),
                &serde_json::to_string(&r).unwrap(),
                lease,
            )
            .await
            .unwrap();
    }

    async fn data(store: &AnyStore, keys: &Keys) -> ClusterData {
        ClusterData::from_json(&store.get(&keys.clusterdata()).await.unwrap().unwrap().value)
            .unwrap()
    }

    /// Runs rounds every 250 ms of test time from `from` to `to` (ms),
    /// with both keepers reporting (their seq changing) unless `silent`.
    async fn rounds(
        store: &AnyStore,
        keys: &Keys,
        lease: LeaseId,
        mem: &mut Memory,
        now: &AtomicU64,
        (from, to): (u64, u64),
        silent: &[&str],
    ) {
        let mut t = from;
        while t <= to {
            now.store(t, Ordering::Relaxed);
            for uid in ["m", "s1"] {
                if !silent.contains(&uid) {
                    report(store, keys, lease, uid, t).await;
                }
            }
            let clock = || now.load(Ordering::Relaxed);
            step(store, keys, mem, &clock).await.unwrap();
            t += 250;
        }
    }

    #[tokio::test]
    async fn a_primary_whose_reports_stop_changing_is_failed_over() {
        let (_dir, store, keys, lease) = setup().await;
        let now = AtomicU64::new(1);
        let mut mem = Memory::default();
        rounds(&store, &keys, lease, &mut mem, &now, (1, 3000), &[]).await;
        // m's keeper stops reporting (its last report stays, its lease lives).
        rounds(&store, &keys, lease, &mut mem, &now, (3250, 7750), &["m"]).await;
        assert!(
            data(&store, &keys).await.failover.is_none(),
            "4.5 s after the last report"
        );
        rounds(&store, &keys, lease, &mut mem, &now, (8000, 8500), &["m"]).await;
        let d = data(&store, &keys).await;
        assert!(
            d.failover.is_some(),
            "5 s after the last report: {:?}",
            d.notice
        );
    }

    /// An unreadable report under a live lease still counts as registered:
    /// its keeper has not fenced itself (a rolling upgrade can make a
    /// newer report unreadable to an older sentinel).
    #[tokio::test]
    async fn an_unreadable_report_under_a_live_lease_is_registered() {
        let (_dir, store, keys, lease) = setup().await;
        store
            .put(&keys.keeper("m"), "{\"seq\": \"not a number\"}", lease)
            .await
            .unwrap();
        let data = data(&store, &keys).await;
        let mut mem = Memory::default();
        let obs = observe(&store, &keys, &data, &mut mem, 1).await.unwrap();
        assert!(obs.registered.contains("m"));
        assert!(!obs.keepers.contains_key("m"));
    }

    /// F7b: the store (or this sentinel) could not be used for a minute:
    /// no report changed meanwhile. That is not failure time.
    #[tokio::test]
    async fn an_observation_gap_is_not_failure_time() {
        let (_dir, store, keys, lease) = setup().await;
        let now = AtomicU64::new(1);
        let mut mem = Memory::default();
        rounds(&store, &keys, lease, &mut mem, &now, (1, 3000), &[]).await;
        // 60 s with no round; then the keepers' reports are as they were,
        // and for the first 1.5 s after the gap they have not written yet.
        rounds(
            &store,
            &keys,
            lease,
            &mut mem,
            &now,
            (63_000, 64_500),
            &["m", "s1"],
        )
        .await;
        assert!(data(&store, &keys).await.failover.is_none());
        rounds(&store, &keys, lease, &mut mem, &now, (64_750, 70_000), &[]).await;
        let d = data(&store, &keys).await;
        assert!(
            d.failover.is_none(),
            "the healthy primary was failed over: {d:?}"
        );
        assert_eq!(d.proxy.master_db.as_deref(), Some("m"));
    }

    /// ... but a primary that really stopped reporting is failed over
    /// fail_interval after the gap ended, not at once.
    #[tokio::test]
    async fn after_a_gap_the_failure_timer_starts_afresh() {
        let (_dir, store, keys, lease) = setup().await;
        let now = AtomicU64::new(1);
        let mut mem = Memory::default();
        rounds(&store, &keys, lease, &mut mem, &now, (1, 3000), &[]).await;
        rounds(
            &store,
            &keys,
            lease,
            &mut mem,
            &now,
            (63_000, 67_750),
            &["m"],
        )
        .await;
        assert!(
            data(&store, &keys).await.failover.is_none(),
            "within 5 s of the gap's end"
        );
        rounds(
            &store,
            &keys,
            lease,
            &mut mem,
            &now,
            (68_000, 68_500),
            &["m"],
        )
        .await;
        assert!(data(&store, &keys).await.failover.is_some());
    }

    /// A store whose next read of the cluster data waits `stall` ms of
    /// test time: a request stuck on a paused etcd member until the
    /// client tries the next one, or an etcd election.
    #[derive(Clone)]
    struct Stalling {
        inner: AnyStore,
        now: std::sync::Arc<AtomicU64>,
        stall: std::sync::Arc<AtomicU64>,
    }

    impl Store for Stalling {
        async fn get(&self, key: &str) -> Result<Option<cluster::KeyValue>, StoreError> {
            let stall = self.stall.swap(0, Ordering::Relaxed);
            self.now.fetch_add(stall, Ordering::Relaxed);
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<(Vec<cluster::KeyValue>, i64), StoreError> {
            self.inner.list(prefix).await
        }
        async fn put_if_revision(
            &self,
            key: &str,
            value: &str,
            expected: i64,
            lease: LeaseId,
        ) -> Result<Cas, StoreError> {
            self.inner
                .put_if_revision(key, value, expected, lease)
                .await
        }
        async fn put(&self, key: &str, value: &str, lease: LeaseId) -> Result<i64, StoreError> {
            self.inner.put(key, value, lease).await
        }
        async fn delete(&self, key: &str) -> Result<bool, StoreError> {
            self.inner.delete(key).await
        }
        async fn delete_if_revision(&self, key: &str, expected: i64) -> Result<bool, StoreError> {
            self.inner.delete_if_revision(key, expected).await
        }
        async fn watch(&self, prefix: &str, revision: i64) -> Result<cluster::Watch, StoreError> {
            self.inner.watch(prefix, revision).await
        }
        async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
            self.inner.grant(ttl).await
        }
        async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.inner.revoke(lease).await
        }
    }

    struct Round<'a> {
        store: &'a Stalling,
        keys: &'a Keys,
        lease: LeaseId,
        mem: &'a mut Memory,
    }

    impl Round<'_> {
        /// A round at `t` whose read waits `stall` ms; the keepers not
        /// `silent` reported just before it.
        async fn at(&mut self, t: u64, silent: &[&str], stall: u64) {
            let s = self.store;
            s.now.store(t, Ordering::Relaxed);
            for uid in ["m", "s1"] {
                if !silent.contains(&uid) {
                    report(&s.inner, self.keys, self.lease, uid, t).await;
                }
            }
            s.stall.store(stall, Ordering::Relaxed);
            let clock = || s.now.load(Ordering::Relaxed);
            step(s, self.keys, self.mem, &clock).await.unwrap();
        }
    }

    /// The lab's PauseEtcdMember of the etcd leader: a round begins on
    /// time, its read waits 6 s on the store, and meanwhile the standby's
    /// keeper (its client on a live member) reported while the primary's
    /// (its client on the paused member) could not. The time the read
    /// waited is a gap in observation, as if the round had begun late: no
    /// failover (the old rule measured the gap at the round's start only,
    /// and failed the primary over at once). A primary that then really
    /// stays silent is failed over fail_interval after the read returned.
    #[tokio::test]
    async fn a_read_that_waits_on_the_store_is_a_gap_in_observation() {
        let (_dir, inner, keys, lease) = setup().await;
        let now = std::sync::Arc::new(AtomicU64::new(1));
        let store = Stalling {
            inner: inner.clone(),
            now: now.clone(),
            stall: Default::default(),
        };
        let mut mem = Memory::default();
        let mut t = 1;
        let mut round = Round {
            store: &store,
            keys: &keys,
            lease,
            mem: &mut mem,
        };
        while t <= 3000 {
            round.at(t, &[], 0).await;
            t += 250;
        }
        // m's last report is from 3000; the read of the round at 3250
        // returns at 9250 with s1's newer report.
        round.at(3250, &["m"], 6000).await;
        let d = data(&inner, &keys).await;
        assert!(
            d.failover.is_none(),
            "a primary failed over for the time the sentinel's read waited: {d:?}"
        );
        // m's keeper writes again 1 s later; all is well.
        t = 9500;
        while t <= 20_000 {
            round.at(t, if t < 10_250 { &["m"] } else { &[] }, 0).await;
            t += 250;
        }
        assert!(data(&inner, &keys).await.failover.is_none());
        // Then m really stops: failed over after fail_interval (5 s), not
        // before.
        while t <= 24_750 {
            round.at(t, &["m"], 0).await;
            t += 250;
        }
        assert!(data(&inner, &keys).await.failover.is_none(), "before 5 s");
        while t <= 26_000 {
            round.at(t, &["m"], 0).await;
            t += 250;
        }
        assert!(data(&inner, &keys).await.failover.is_some(), "after 5 s");
    }

    /// ... but a store that is merely slow (every read answered in 1.5 s,
    /// within the request timeout) is observed through: a primary whose
    /// reports stop is failed over after fail_interval (5 s), not before
    /// and not never.
    #[tokio::test]
    async fn a_slow_store_still_fails_a_silent_primary_over() {
        let (_dir, inner, keys, lease) = setup().await;
        let store = Stalling {
            inner: inner.clone(),
            now: Default::default(),
            stall: Default::default(),
        };
        let mut mem = Memory::default();
        let mut round = Round {
            store: &store,
            keys: &keys,
            lease,
            mem: &mut mem,
        };
        // Rounds every 1.75 s: a 250 ms tick and a 1.5 s read.
        let mut t = 1;
        while t <= 7001 {
            round.at(t, &[], 1500).await;
            t += 1750;
        }
        // m's last report is at 7001 (seen when that read returned, 8501).
        let mut failed_at = None;
        while t <= 30_000 {
            round.at(t, &["m"], 1500).await;
            if failed_at.is_none() && data(&inner, &keys).await.failover.is_some() {
                failed_at = Some(t + 1500);
            }
            t += 1750;
        }
        let at = failed_at.expect("the silent primary was never failed over");
        assert!(
            (8501 + 5000..=8501 + 5000 + 2 * 1750).contains(&at),
            "failed over at {at}, the last report seen at 8501"
        );
    }
}
