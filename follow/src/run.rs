//! The follower's loop: the store I/O around [`FollowStatus`].
//!
//! Each tick (the lease's keep-alive period, at most 1 s):
//! 1. renew the lease (or grant one); the instant the keep-alive is sent is
//!    the origin of the confirmation this tick may make;
//! 2. register `proxies/<uid>` if this proxy is not registered: create-only,
//!    under the lease, with its instance id; a key held by another instance
//!    is refused, not overwritten. If it is registered, check that the key
//!    is still the one it wrote (an operator may have deleted it);
//! 3. read `clusterdata` (a linearizable read) and take it in;
//! 4. confirm the view from the origin of step 1;
//! 5. if `proxy_timeout` changed, grant a lease with the new TTL, move the
//!    registration under it (compare-and-swap on the key), revoke the old;
//! 6. acknowledge the applied generation (compare-and-swap on the revision
//!    this proxy last wrote).
//!
//! Between ticks, watch events are applied at once and acknowledged (steps
//! 3 and 6), but confirm nothing. A proxy that cannot use the cluster data
//! withdraws its registration (it routes nothing, and the sentinel must not
//! wait for an acknowledgement it will never give) until the data is usable.

use std::future::pending;
use std::sync::Arc;

use cluster::data::ProxyReport;
use cluster::{Cas, KeyValue, Keys, LeaseId, Store, StoreError, Watch, WatchEvent};
use metrics::counter;
use tokio::time::{sleep_until, Instant};

use crate::lease::LeaseTerms;
use crate::metrics as m;
use crate::status::{FollowStatus, Taken};

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// This proxy's registration in the store.
#[derive(Debug, Default)]
struct Registration {
    /// The lease, and what it was granted for.
    lease: Option<(LeaseId, LeaseTerms)>,
    /// The revision of `proxies/<uid>` as this proxy last wrote it; `None`
    /// while not registered.
    key_rev: Option<i64>,
    /// What it last wrote.
    written: Option<ProxyReport>,
}

fn store_error(status: &FollowStatus, op: &'static str, e: &StoreError) {
    counter!(m::STORE_ERRORS, "cluster" => status.cluster().to_owned(), "op" => op).increment(1);
    tracing::warn!(cluster = status.cluster(), op, error = %e, "cluster store error");
}

fn json(r: &ProxyReport) -> String {
    // Plain strings and integers: serialising cannot fail.
    serde_json::to_string(r).unwrap_or_default()
}

struct Follower<'a, S> {
    store: &'a S,
    keys: &'a Keys,
    status: &'a FollowStatus,
    reg: Registration,
    key: String,
    /// The revision to watch from, after the last read.
    watch_from: i64,
}

pub(crate) async fn run<S: Store>(store: S, keys: Keys, status: Arc<FollowStatus>) {
    let mut f = Follower {
        store: &store,
        keys: &keys,
        status: &status,
        reg: Registration::default(),
        key: keys.proxy(status.uid()),
        watch_from: 0,
    };
    // A first read, so that the first lease is sized for the cluster's
    // proxy_timeout; it confirms nothing.
    if f.read().await.is_some() && !status.has_data() {
        tracing::warn!(
            cluster = keys.base(),
            "the cluster has no clusterdata yet; create it with `keelson ctl init`"
        );
    }
    let _failsafe = AbortOnDrop(tokio::spawn(failsafe(status.clone())));
    let mut watch: Option<Watch> = None;
    loop {
        let tick = Instant::now();
        // A tick can take a while against a store that does not answer;
        // shutting down does not wait for it.
        tokio::select! {
            biased;
            _ = status.stop.cancelled() => {}
            _ = f.tick() => {}
        }
        if status.stop.is_cancelled() {
            f.withdraw("the proxy is shutting down").await;
            status.stopped.cancel();
            return;
        }
        if watch.is_none() && f.watch_from > 0 {
            match store.watch(&keys.clusterdata(), f.watch_from).await {
                Ok(w) => watch = Some(w),
                Err(e) => store_error(&status, "watch", &e),
            }
        }
        let next = tick + status.period();
        loop {
            tokio::select! {
                biased;
                _ = status.stop.cancelled() => {
                    f.withdraw("the proxy is shutting down").await;
                    status.stopped.cancel();
                    return;
                }
                _ = sleep_until(next) => break,
                ev = recv(&mut watch) => match ev {
                    Some(Ok(WatchEvent::Put(kv))) if kv.key == keys.clusterdata() => {
                        f.taken(status.take(Some(&kv.value), kv.mod_revision, "watch")).await;
                    }
                    Some(Ok(WatchEvent::Delete { key, mod_revision })) if key == keys.clusterdata() => {
                        f.taken(status.take(None, mod_revision, "watch")).await;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        store_error(&status, "watch", &e);
                        watch = None;
                    }
                    None => watch = None,
                },
            }
        }
    }
}

/// The store-outage failsafe, beside the store I/O (which can take a
/// request timeout to fail, longer than some `proxy_timeout`s): every half
/// period, once no confirmation has come for a period and a half, asks the
/// primary's keeper how long its fence holds off, and routes to it until
/// then (docs/fencing.md).
async fn failsafe(status: Arc<FollowStatus>) {
    loop {
        let period = status.period();
        tokio::select! {
            _ = status.stop.cancelled() => return,
            _ = tokio::time::sleep(period / 2) => {}
        }
        if status
            .confirmation_age()
            .is_none_or(|age| age < period + period / 2)
        {
            continue;
        }
        let Some((db, addr)) = status.primary_api() else {
            continue;
        };
        let sent = Instant::now();
        let path = cluster::node_api::FAILSAFE_ROUTE_PATH;
        match cluster::node_api::call(&addr, "GET", path, period / 2).await {
            Ok((200, body)) => match serde_json::from_str::<cluster::node_api::Route>(&body) {
                Ok(r) if r.uid == db => {
                    status.hold_primary(
                        &db,
                        sent,
                        std::time::Duration::from_millis(r.remaining_ms),
                    );
                }
                _ => {
                    tracing::warn!(cluster = status.cluster(), %addr, body, "the primary's keeper answered something else")
                }
            },
            Ok((code, body)) => {
                tracing::debug!(cluster = status.cluster(), %addr, code, body, "the primary's keeper does not vouch for it")
            }
            Err(e) => {
                tracing::debug!(cluster = status.cluster(), error = %e, "cannot ask the primary's keeper")
            }
        }
    }
}

/// The next event of `watch`, or never if there is none.
async fn recv(watch: &mut Option<Watch>) -> Option<cluster::store::Result<WatchEvent>> {
    match watch {
        Some(w) => w.recv().await,
        None => pending().await,
    }
}

impl<S: Store> Follower<'_, S> {
    async fn tick(&mut self) {
        if self.status.is_unusable() {
            // Not registered while the data cannot be used; look again.
            if self.read().await != Some(Taken::Applied) {
                return;
            }
        }
        let sent = Instant::now();
        if !self.renew().await {
            return;
        }
        let registered = match self.reg.key_rev {
            None => self.register().await,
            Some(rev) => self.verify(rev).await,
        };
        if !registered {
            return;
        }
        match self.read().await {
            Some(Taken::Applied | Taken::Outdated) => self.status.confirm(sent),
            Some(Taken::Unusable) => return self.withdraw("the cluster data cannot be used").await,
            None => return,
        }
        self.regrant().await;
        self.acknowledge().await;
    }

    /// After a watch event was taken in.
    async fn taken(&mut self, t: Taken) {
        match t {
            Taken::Applied => self.acknowledge().await,
            Taken::Outdated => {}
            Taken::Unusable => self.withdraw("the cluster data cannot be used").await,
        }
    }

    /// Renews the lease, or grants one. True if the lease is alive.
    async fn renew(&mut self) -> bool {
        match self.reg.lease {
            Some((id, _)) => match self.store.keep_alive(id).await {
                Ok(()) => true,
                Err(StoreError::LeaseExpired(_)) => {
                    tracing::warn!(
                        cluster = self.status.cluster(),
                        "the registration lease expired; registering again"
                    );
                    self.lost_lease();
                    false
                }
                Err(e) => {
                    store_error(self.status, "keepalive", &e);
                    false
                }
            },
            None => {
                let terms = LeaseTerms::for_spec(&self.status.spec());
                match self.store.grant(terms.ttl).await {
                    Ok(id) => {
                        self.reg.lease = Some((id, terms));
                        self.reg.key_rev = None;
                        self.status.set_terms(Some(terms));
                        true
                    }
                    Err(e) => {
                        store_error(self.status, "grant", &e);
                        false
                    }
                }
            }
        }
    }

    fn lost_lease(&mut self) {
        self.reg = Registration::default();
        self.status.set_terms(None);
    }

    /// Our registration is gone or another instance holds the key.
    fn lost_key(&mut self, now: Option<KeyValue>) {
        self.reg.key_rev = None;
        self.reg.written = None;
        match now {
            // Ours, written by an attempt whose answer was lost: register()
            // takes it over.
            Some(kv) if self.is_ours(&kv) => {}
            Some(kv) => self.refused(&kv),
            None => self
                .status
                .unconfirm("this proxy's registration was removed from the store"),
        }
    }

    fn is_ours(&self, kv: &KeyValue) -> bool {
        serde_json::from_str::<ProxyReport>(&kv.value)
            .is_ok_and(|r| r.instance == self.status.instance())
    }

    fn refused(&self, kv: &KeyValue) {
        let other: ProxyReport = serde_json::from_str(&kv.value).unwrap_or_default();
        let ttl = self.status.spec().proxy_lease_ttl();
        self.status.set_conflict(Some(format!(
            "another proxy is registered as uid {} (instance {}); give each proxy its own --uid. \
             This proxy routes nothing meanwhile; if that proxy has just stopped, its registration \
             expires within {ttl:?} and this proxy then registers by itself",
            self.status.uid(),
            if other.instance.is_empty() {
                "unknown"
            } else {
                &other.instance
            },
        )));
    }

    /// Creates the registration, create-only. True once registered.
    async fn register(&mut self) -> bool {
        let Some((lease, _)) = self.reg.lease else {
            return false;
        };
        let report = self.status.report();
        match self
            .store
            .put_if_revision(&self.key, &json(&report), 0, lease)
            .await
        {
            Ok(Cas::Done(rev)) => self.registered(rev, report),
            Ok(Cas::Conflict(Some(kv))) => {
                if !self.is_ours(&kv) {
                    self.refused(&kv);
                    return false;
                }
                // Ours, written by an attempt whose answer was lost (or
                // under a lease since lost): take it over.
                match self
                    .store
                    .put_if_revision(&self.key, &json(&report), kv.mod_revision, lease)
                    .await
                {
                    Ok(Cas::Done(rev)) => self.registered(rev, report),
                    Ok(Cas::Conflict(_)) => false,
                    Err(e) => self.write_failed("register", &e),
                }
            }
            Ok(Cas::Conflict(None)) => false,
            Err(e) => self.write_failed("register", &e),
        }
    }

    /// Checks that the registration is still the one this proxy wrote at
    /// `rev`. True if it is.
    async fn verify(&mut self, rev: i64) -> bool {
        match self.store.get(&self.key).await {
            Ok(Some(kv)) if kv.mod_revision == rev => true,
            Ok(now) => {
                tracing::warn!(
                    cluster = self.status.cluster(),
                    "this proxy's registration changed under it"
                );
                self.lost_key(now);
                self.status.conflict().is_none() && self.register().await
            }
            Err(e) => {
                store_error(self.status, "read", &e);
                false
            }
        }
    }

    fn registered(&mut self, rev: i64, report: ProxyReport) -> bool {
        tracing::info!(
            cluster = self.status.cluster(),
            uid = self.status.uid(),
            instance = self.status.instance(),
            generation = report.generation,
            "registered"
        );
        self.reg.key_rev = Some(rev);
        self.reg.written = Some(report);
        self.status.set_conflict(None);
        true
    }

    fn write_failed(&mut self, op: &'static str, e: &StoreError) -> bool {
        match e {
            StoreError::LeaseExpired(_) => self.lost_lease(),
            e => store_error(self.status, op, e),
        }
        false
    }

    /// Reads clusterdata and takes it in; `None` if the read failed.
    async fn read(&mut self) -> Option<Taken> {
        let cd = self.keys.clusterdata();
        let (kvs, header) = match self.store.list(&cd).await {
            Ok(r) => r,
            Err(e) => {
                store_error(self.status, "read", &e);
                return None;
            }
        };
        if header < self.status.revision() {
            self.status.store_reset(header);
        }
        self.watch_from = self.watch_from.max(header + 1);
        let kv = kvs.into_iter().find(|kv| kv.key == cd);
        Some(match &kv {
            // The key's own revision: the header's may be newer than a
            // watch event not yet delivered, and must not hide it.
            Some(kv) => self.status.take(Some(&kv.value), kv.mod_revision, "read"),
            // Absent as of the read's revision.
            None => self.status.take(None, header, "read"),
        })
    }

    /// Moves the registration to a lease sized for the current
    /// `proxy_timeout`, if it changed.
    async fn regrant(&mut self) {
        let (Some((old, terms)), Some(rev)) = (self.reg.lease, self.reg.key_rev) else {
            return;
        };
        let spec = self.status.spec();
        if !terms.needs_regrant(&spec) {
            if terms.adopt(&spec) != terms {
                self.reg.lease = Some((old, terms.adopt(&spec)));
            }
            return;
        }
        let new_terms = LeaseTerms::for_spec(&spec);
        let new = match self.store.grant(new_terms.ttl).await {
            Ok(id) => id,
            Err(e) => return store_error(self.status, "grant", &e),
        };
        let report = self.status.report();
        match self
            .store
            .put_if_revision(&self.key, &json(&report), rev, new)
            .await
        {
            Ok(Cas::Done(rev)) => {
                tracing::info!(
                    cluster = self.status.cluster(),
                    from = ?terms.ttl,
                    to = ?new_terms.ttl,
                    "proxy_timeout changed: the registration moved to a lease with the new TTL"
                );
                counter!(m::LEASE_REGRANTS, "cluster" => self.status.cluster().to_owned())
                    .increment(1);
                self.reg.lease = Some((new, new_terms));
                self.reg.key_rev = Some(rev);
                self.reg.written = Some(report);
                self.status.set_terms(Some(new_terms));
                if let Err(e) = self.store.revoke(old).await {
                    // It expires by itself; nothing is left under it.
                    tracing::debug!(error = %e, "could not revoke the old lease");
                }
            }
            Ok(Cas::Conflict(now)) => {
                let _ = self.store.revoke(new).await;
                self.lost_key(now);
            }
            Err(e) => {
                let _ = self.store.revoke(new).await;
                store_error(self.status, "register", &e);
            }
        }
    }

    /// Writes the applied generation, if it is not what is registered.
    async fn acknowledge(&mut self) {
        let (Some((lease, _)), Some(rev)) = (self.reg.lease, self.reg.key_rev) else {
            return;
        };
        let report = self.status.report();
        if self.reg.written.as_ref() == Some(&report) {
            return;
        }
        match self
            .store
            .put_if_revision(&self.key, &json(&report), rev, lease)
            .await
        {
            Ok(Cas::Done(rev)) => {
                self.reg.key_rev = Some(rev);
                self.reg.written = Some(report);
            }
            Ok(Cas::Conflict(now)) => self.lost_key(now),
            Err(e) => {
                self.write_failed("register", &e);
            }
        }
    }

    /// Stops routing, then revokes the lease (deleting the registration).
    async fn withdraw(&mut self, why: &str) {
        self.status.unconfirm(why);
        if let Some((lease, _)) = self.reg.lease {
            match self.store.revoke(lease).await {
                Ok(()) => tracing::info!(
                    cluster = self.status.cluster(),
                    why,
                    "registration withdrawn"
                ),
                Err(e) => store_error(self.status, "revoke", &e),
            }
        }
        self.reg = Registration::default();
        self.status.set_terms(None);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cluster::{ClusterData, ClusterSpec, Keys, Store, StoreError};
    use proxy_core::{Proxy, ProxyConfig, View, ViewHandle};

    async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond().await {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_proxy_timeout_moves_the_registration_to_a_new_lease() {
        let dir = tempfile::tempdir().unwrap();
        let store = cluster::open(&format!("file://{}", dir.path().display()))
            .await
            .unwrap();
        let keys = Keys::new("keelson", "main");
        let spec = |secs| ClusterSpec {
            proxy_timeout: Duration::from_secs(secs),
            ..Default::default()
        };
        let data = ClusterData::new(spec(2));
        store
            .put(&keys.clusterdata(), &data.to_json(), 0)
            .await
            .unwrap();
        let view = ViewHandle::new(View::default());
        let proxy = Proxy::new(ProxyConfig::default(), view.clone());
        let status = crate::spawn(store.clone(), keys.clone(), "p1".into(), proxy, view);
        eventually("never fresh with a lease for 2 s", async || {
            status.is_fresh() && status.lease_ttl() == Some(spec(2).proxy_lease_ttl())
        })
        .await;
        let first = store.get(&keys.proxy("p1")).await.unwrap().unwrap();
        let valid_for =
            |s: &crate::FollowStatus| s.valid_until().unwrap() - tokio::time::Instant::now();
        assert!(valid_for(&status) <= Duration::from_secs(2));

        // `ctl spec update`: proxy_timeout 2 s -> 6 s.
        let mut raised =
            ClusterData::from_json(&store.get(&keys.clusterdata()).await.unwrap().unwrap().value)
                .unwrap();
        raised.spec = spec(6);
        store
            .put(&keys.clusterdata(), &raised.to_json(), 0)
            .await
            .unwrap();
        eventually("the lease was not granted anew", async || {
            status.lease_ttl() == Some(spec(6).proxy_lease_ttl())
        })
        .await;
        let moved = store.get(&keys.proxy("p1")).await.unwrap().unwrap();
        assert_ne!(moved.lease, first.lease, "moved under the new lease");
        let report: cluster::data::ProxyReport = serde_json::from_str(&moved.value).unwrap();
        assert_eq!(report.instance, status.instance());
        assert_eq!(report.cluster_uid, data.uid);
        assert!(
            matches!(
                store.keep_alive(first.lease).await,
                Err(StoreError::LeaseExpired(_))
            ),
            "the old lease was revoked"
        );
        eventually("the window never grew to 6 s", async || {
            valid_for(&status) > Duration::from_secs(5)
        })
        .await;

        // A graceful shutdown withdraws the registration at once.
        status.shutdown().await;
        assert!(store.get(&keys.proxy("p1")).await.unwrap().is_none());
        assert!(!status.is_fresh());
    }

    /// F9c: cluster data this proxy cannot parse (a spec field written by a
    /// newer keelson) must not leave a registration behind that the
    /// sentinel would wait on forever: the proxy stops routing and
    /// withdraws it, and registers again once the data is usable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unusable_cluster_data_withdraws_the_registration_until_it_is_usable() {
        let dir = tempfile::tempdir().unwrap();
        let store = cluster::open(&format!("file://{}", dir.path().display()))
            .await
            .unwrap();
        let keys = Keys::new("keelson", "main");
        let data = ClusterData::new(ClusterSpec::default());
        store
            .put(&keys.clusterdata(), &data.to_json(), 0)
            .await
            .unwrap();
        let view = ViewHandle::new(View::default());
        let proxy = Proxy::new(ProxyConfig::default(), view.clone());
        let status = crate::spawn(store.clone(), keys.clone(), "p1".into(), proxy, view);
        let registered = async || store.get(&keys.proxy("p1")).await.unwrap().is_some();
        eventually("never registered", async || {
            status.is_fresh() && registered().await
        })
        .await;

        // A format this keelson cannot read (unknown fields alone are
        // kept, and do not make data unusable).
        let newer = data
            .to_json()
            .replace("\"format_version\": 1", "\"format_version\": 2");
        store.put(&keys.clusterdata(), &newer, 0).await.unwrap();
        eventually("the registration was not withdrawn", async || {
            !status.is_fresh() && !registered().await
        })
        .await;
        let why = status.not_ready_reason().unwrap();
        assert!(
            why.contains("cannot be used") && why.contains("upgrade"),
            "{why}"
        );

        store
            .put(&keys.clusterdata(), &data.to_json(), 0)
            .await
            .unwrap();
        eventually("never registered again", async || {
            status.is_fresh() && registered().await
        })
        .await;
        status.shutdown().await;
    }

    /// A registration deleted under a running proxy (by hand) is noticed at
    /// the next tick: the proxy stops counting its view as confirmed and
    /// registers again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_registration_is_noticed_and_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = cluster::open(&format!("file://{}", dir.path().display()))
            .await
            .unwrap();
        let keys = Keys::new("keelson", "main");
        let data = ClusterData::new(ClusterSpec::default());
        store
            .put(&keys.clusterdata(), &data.to_json(), 0)
            .await
            .unwrap();
        let view = ViewHandle::new(View::default());
        let proxy = Proxy::new(ProxyConfig::default(), view.clone());
        let status = crate::spawn(store.clone(), keys.clone(), "p1".into(), proxy, view);
        let key = keys.proxy("p1");
        eventually("never registered", async || {
            status.is_fresh() && store.get(&key).await.unwrap().is_some()
        })
        .await;
        let before = store.get(&key).await.unwrap().unwrap();
        assert!(store.delete(&key).await.unwrap());
        eventually("never registered again", async || {
            store
                .get(&key)
                .await
                .unwrap()
                .is_some_and(|kv| kv.mod_revision > before.mod_revision)
        })
        .await;
        eventually("not fresh again", async || status.is_fresh()).await;
        status.shutdown().await;
    }
}
