//! Store mode of the proxy: follows `clusterdata` in the cluster store and
//! hot-swaps the proxy's view, registers this proxy under a lease, and
//! fences sessions on a primary that is no longer named.
//!
//! Invariants:
//! - the view is stored before the old primary is fenced, so no session can
//!   be routed to a backend the applied view no longer names;
//! - a view that could not be confirmed against the store for
//!   `proxy_timeout` names no primary: primary sessions are fenced, new
//!   clients are held, and `/readyz` fails, until the store answers again
//!   (consistency over availability);
//! - the store is watched for immediate reaction and polled every tick as a
//!   safety net; one lease per process is kept alive, never one per write.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster::{AnyStore, ClusterData, Keys, LeaseId, Store, StoreError, WatchEvent};
use metrics::{counter, gauge, histogram};
use proxy_core::fence::Fence;
use proxy_core::{Backend, FenceReason, Proxy, Replica, View, ViewHandle};
use tokio::time::Instant;

use crate::admin::AdminState;

/// SQLSTATE 57P01 admin_shutdown, as PostgreSQL uses for pg_terminate_backend.
const ADMIN_SHUTDOWN: &str = "57P01";

/// What the follower has applied and whether it is fresh; shared with the
/// admin endpoints.
#[derive(Debug)]
pub struct FollowStatus {
    proxy: Proxy,
    /// The view this follower feeds: the proxy's own, or one SNI cluster's.
    view: ViewHandle,
    started: Instant,
    /// Milliseconds after `started` of the last confirmation; 0 = never.
    confirmed_ms: AtomicU64,
    fresh: AtomicBool,
    proxy_timeout_ms: AtomicU64,
    /// The last cluster data read, to re-apply when freshness changes.
    data: Mutex<Option<ClusterData>>,
    uid: String,
}

impl FollowStatus {
    /// Whether the view has been confirmed within `proxy_timeout`.
    pub fn is_fresh(&self) -> bool {
        self.fresh.load(Ordering::Acquire)
    }

    /// Time since the view was last confirmed against the store.
    pub fn age(&self) -> Option<Duration> {
        match self.confirmed_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(
                self.started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }

    pub fn uid(&self) -> &str {
        &self.uid
    }

    fn proxy_timeout(&self) -> Duration {
        Duration::from_millis(self.proxy_timeout_ms.load(Ordering::Relaxed))
    }

    fn confirm(&self) {
        let ms = (self.started.elapsed().as_millis() as u64).max(1);
        self.confirmed_ms.store(ms, Ordering::Release);
        if !self.fresh.swap(true, Ordering::AcqRel) {
            tracing::info!("cluster view confirmed against the store");
        }
    }

    /// Makes the proxy's view match the last data read and the freshness.
    /// Returns the generation applied.
    fn apply(&self) -> u64 {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let fresh = self.is_fresh();
        let (mut next, spec) = match &data {
            Some(d) => {
                let pv = d.proxy_view();
                let view = View {
                    generation: pv.generation,
                    primary: pv.primary.map(Backend::new),
                    replicas: pv
                        .replicas
                        .into_iter()
                        .map(|r| Replica {
                            backend: Backend::new(r.address),
                            lag_bytes: r.lag_bytes,
                            lag: r.lag_ms.map(Duration::from_millis),
                            streaming: r.streaming,
                        })
                        .collect(),
                };
                (view, Some(d.spec.clone()))
            }
            None => (View::default(), None),
        };
        if let Some(spec) = spec {
            self.proxy.set_hold_timeout(spec.hold_timeout);
            self.proxy_timeout_ms
                .store(spec.proxy_timeout.as_millis() as u64, Ordering::Relaxed);
        }
        if !fresh {
            next.primary = None;
        }
        let generation = next.generation;
        let current = self.view.load();
        if *current == next {
            return generation;
        }
        let old_primary = current.primary.clone();
        let changed_primary = old_primary != next.primary;
        tracing::info!(
            generation,
            primary = ?next.primary,
            replicas = ?next.replicas,
            fresh,
            "applying cluster view"
        );
        self.view.store(next.clone());
        self.proxy.apply_replica_lag(&current, &next);
        counter!("keelson_view_changes_total").increment(1);
        gauge!("keelson_view_generation").set(generation as f64);
        if let (true, Some(old)) = (changed_primary, old_primary) {
            let message = if fresh {
                "terminating connection because the primary changed; reconnect to reach the new primary"
            } else {
                "terminating connection because the proxy lost contact with the cluster store and cannot confirm the primary"
            };
            let reason = FenceReason {
                sqlstate: ADMIN_SHUTDOWN,
                message: message.into(),
                label: "fenced",
            };
            if let Some(fence) = self.proxy.fence_backend(&old, reason) {
                let applied = Instant::now();
                tracing::info!(backend = %old, "fencing sessions on the former primary");
                tokio::spawn(async move {
                    if Fence::wait_released(&fence, Duration::from_secs(30)).await {
                        histogram!("keelson_fence_seconds").record(applied.elapsed().as_secs_f64());
                    }
                });
            }
        }
        generation
    }
}

impl AdminState for FollowStatus {
    fn ready(&self) -> bool {
        self.is_fresh() && self.view.load().primary.is_some()
    }

    fn view_json(&self) -> String {
        let v = self.view.load();
        serde_json::json!({
            "mode": "store",
            "uid": self.uid,
            "generation": v.generation,
            "primary": v.primary.as_ref().map(|b| b.addr()),
            "replicas": crate::serve::replicas_json(&v),
            "fresh": self.is_fresh(),
            "age_seconds": self.age().map(|a| a.as_secs_f64()),
        })
        .to_string()
    }
}

fn store_error(op: &'static str, e: &StoreError) {
    counter!("keelson_store_errors_total", "op" => op).increment(1);
    tracing::warn!(op, error = %e, "cluster store error");
}

/// Starts following `cluster` on the current runtime; returns the status.
pub fn spawn(store: AnyStore, keys: Keys, uid: String, proxy: Proxy) -> Arc<FollowStatus> {
    let view = proxy.view().clone();
    spawn_for(store, keys, uid, proxy, view)
}

/// Starts following `cluster` into `view` (for SNI routing, a view other
/// than the proxy's own); returns the status.
pub fn spawn_for(
    store: AnyStore,
    keys: Keys,
    uid: String,
    proxy: Proxy,
    view: ViewHandle,
) -> Arc<FollowStatus> {
    let status = Arc::new(FollowStatus {
        proxy,
        view,
        started: Instant::now(),
        confirmed_ms: AtomicU64::new(0),
        fresh: AtomicBool::new(false),
        proxy_timeout_ms: AtomicU64::new(
            cluster::ClusterSpec::default().proxy_timeout.as_millis() as u64
        ),
        data: Mutex::new(None),
        uid,
    });
    tokio::spawn(watchdog(status.clone()));
    tokio::spawn(follow(store, keys, status.clone()));
    status
}

/// Drops the primary from the view once it has not been confirmed for
/// `proxy_timeout`.
async fn watchdog(status: Arc<FollowStatus>) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        let age = status.age();
        if let Some(a) = age {
            gauge!("keelson_view_age_seconds").set(a.as_secs_f64());
        }
        let stale = age.is_some_and(|a| a > status.proxy_timeout());
        if stale && status.fresh.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                timeout = ?status.proxy_timeout(),
                "cannot confirm the cluster view: no longer routing to the primary"
            );
            status.apply();
        }
        gauge!("keelson_ready").set(if status.ready() { 1.0 } else { 0.0 });
    }
}

struct Registration {
    lease: LeaseId,
    generation: Option<u64>,
}

async fn register(
    store: &AnyStore,
    keys: &Keys,
    status: &FollowStatus,
    reg: &mut Registration,
    generation: u64,
) {
    if reg.lease == 0 {
        let ttl = status.proxy_timeout().max(Duration::from_secs(1));
        match store.grant(ttl).await {
            Ok(l) => {
                reg.lease = l;
                reg.generation = None;
            }
            Err(e) => return store_error("grant", &e),
        }
    }
    if reg.generation == Some(generation) {
        return;
    }
    let cluster_uid = status
        .data
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|d| d.uid.clone())
        .unwrap_or_default();
    let value = serde_json::to_string(&cluster::data::ProxyReport {
        uid: status.uid.clone(),
        instance: String::new(),
        generation,
        cluster_uid,
    })
    .unwrap_or_default();
    match store.put(&keys.proxy(&status.uid), &value, reg.lease).await {
        Ok(_) => reg.generation = Some(generation),
        Err(StoreError::LeaseExpired(_)) => reg.lease = 0,
        Err(e) => store_error("register", &e),
    }
}

/// Reads clusterdata once; `Some(revision)` on success.
async fn read(store: &AnyStore, keys: &Keys, status: &FollowStatus) -> Option<i64> {
    match store.list(&keys.clusterdata()).await {
        Ok((kvs, rev)) => {
            let kv = kvs.into_iter().find(|kv| kv.key == keys.clusterdata());
            if !accept(kv.as_ref().map(|kv| kv.value.as_str()), status) {
                return None;
            }
            Some(rev)
        }
        Err(e) => {
            store_error("read", &e);
            None
        }
    }
}

/// Takes in a new clusterdata value (`None`: absent). True if usable.
fn accept(value: Option<&str>, status: &FollowStatus) -> bool {
    let data = match value.map(ClusterData::from_json) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            counter!("keelson_store_errors_total", "op" => "parse").increment(1);
            tracing::error!(error = %e, "ignoring unusable clusterdata");
            return false;
        }
    };
    let mut current = status.data.lock().unwrap_or_else(|e| e.into_inner());
    if data.is_none() && current.is_some() {
        tracing::warn!("clusterdata was deleted from the store");
    }
    *current = data;
    drop(current);
    status.confirm();
    true
}

async fn follow(store: AnyStore, keys: Keys, status: Arc<FollowStatus>) {
    if let Ok(None) = store.get(&keys.clusterdata()).await {
        tracing::warn!(
            cluster = keys.base(),
            "the cluster has no clusterdata yet; create it with `keelson ctl init`"
        );
    }
    let mut reg = Registration {
        lease: 0,
        generation: None,
    };
    loop {
        let Some(rev) = read(&store, &keys, &status).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let generation = status.apply();
        register(&store, &keys, &status, &mut reg, generation).await;
        let mut watch = match store.watch(&keys.clusterdata(), rev + 1).await {
            Ok(w) => w,
            Err(e) => {
                store_error("watch", &e);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let period =
            (status.proxy_timeout() / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = watch.recv() => match ev {
                    Some(Ok(WatchEvent::Put(kv))) if kv.key == keys.clusterdata() => {
                        accept(Some(&kv.value), &status);
                    }
                    Some(Ok(WatchEvent::Delete { key, .. })) if key == keys.clusterdata() => {
                        accept(None, &status);
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        store_error("watch", &e);
                        break;
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if reg.lease != 0 {
                        match store.keep_alive(reg.lease).await {
                            Ok(()) => {}
                            Err(StoreError::LeaseExpired(_)) => {
                                tracing::warn!("registration lease expired; registering again");
                                reg.lease = 0;
                            }
                            Err(e) => store_error("keepalive", &e),
                        }
                    }
                    // Safety net: re-read even when the watch is quiet.
                    read(&store, &keys, &status).await;
                }
            }
            let generation = status.apply();
            register(&store, &keys, &status, &mut reg, generation).await;
        }
    }
}
