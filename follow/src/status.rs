//! What a follower has applied, whether it is fresh, and the rules that
//! change either: every change of the view goes through here, under one
//! lock, so the follower's loop and its watchdog never interleave.
//!
//! Invariants:
//! - the view only moves forward: a clusterdata value whose store revision
//!   is not newer than the last one applied is ignored, whether it comes
//!   from a watch event or a read (invariant 10);
//! - only a confirmation makes the view fresh: a keep-alive that succeeded
//!   followed by a linearizable read that succeeded, with this proxy's own
//!   registration in place. Its validity runs from when that keep-alive was
//!   sent, for the lease's freshness window ([`crate::lease`]). Watch events
//!   apply newer data at once but confirm nothing;
//! - the view handle's deadline is set before any fresh view is stored, so
//!   the data path stops primary sessions on time even if this follower
//!   does not run (invariant 3);
//! - what is acknowledged is what was applied: the generation and the
//!   cluster incarnation of the data in the stored view.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use cluster::data::ProxyReport;
use cluster::{ClusterData, ClusterSpec};
use metrics::{counter, histogram};
use proxy_core::fence::Fence;
use proxy_core::{Proxy, View, ViewChange, ViewHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::lease::LeaseTerms;
use crate::metrics as m;
use crate::view::view_of;

/// What a follower has applied and whether it is fresh. Shared with the
/// embedder (the `keelson` binary's admin endpoints); knows nothing of HTTP.
#[derive(Debug)]
pub struct FollowStatus {
    uid: String,
    instance: String,
    proxy: Proxy,
    view: ViewHandle,
    /// Whether the applied view is a fresh one (names its servers).
    fresh: AtomicBool,
    outdated: AtomicU64,
    state: Mutex<State>,
    pub(crate) stop: CancellationToken,
    pub(crate) stopped: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    /// The newest usable cluster data (`None`: none, or deleted).
    data: Option<ClusterData>,
    /// The highest store revision of `clusterdata` taken in (a delete
    /// counts at its revision); 0 before the first.
    revision: i64,
    /// Set while the newest value could not be used: why.
    unusable: Option<String>,
    /// When the keep-alive behind the current confirmation was sent.
    origin: Option<Instant>,
    /// The last confirmation's origin, kept when it lapses (for `age`).
    last_confirmed: Option<Instant>,
    /// The lease holding this proxy's registration, if any.
    terms: Option<LeaseTerms>,
    /// Set while another instance holds this proxy's registration key.
    conflict: Option<String>,
    /// The store-outage failsafe: the primary's keeper (this database)
    /// said its fence holds off until then, so this proxy may route to it
    /// until then without confirming its view.
    failsafe: Option<(String, Instant)>,
}

/// How a clusterdata value was taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Newer than anything applied: applied.
    Applied,
    /// Not newer than what was applied: ignored.
    Outdated,
    /// Newer, but this proxy cannot use it.
    Unusable,
}

impl FollowStatus {
    pub(crate) fn new(uid: String, proxy: Proxy, view: ViewHandle) -> Self {
        FollowStatus {
            uid,
            instance: cluster::store::instance_id(),
            proxy,
            view,
            fresh: AtomicBool::new(false),
            outdated: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            stop: CancellationToken::new(),
            stopped: CancellationToken::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This proxy's uid: its registration is `proxies/<uid>`.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// A random id of this follower, registered with the uid, so that a
    /// second proxy started with the same uid is told apart.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The view this follower feeds.
    pub fn view(&self) -> &ViewHandle {
        &self.view
    }

    /// The cluster this follower's metrics are labelled with.
    pub fn cluster(&self) -> &str {
        self.view.name()
    }

    /// Whether the view has been confirmed within its freshness window.
    pub fn is_fresh(&self) -> bool {
        self.fresh.load(Ordering::Acquire) && !self.view.deadline().passed()
    }

    /// Time since the view was last confirmed (from when the confirming
    /// keep-alive was sent); `None` before the first confirmation.
    pub fn age(&self) -> Option<Duration> {
        self.lock().last_confirmed.map(|t| t.elapsed())
    }

    /// Until when the view may be routed by, if it was ever confirmed.
    pub fn valid_until(&self) -> Option<Instant> {
        self.view.deadline().get()
    }

    /// The TTL of the lease that holds this proxy's registration.
    pub fn lease_ttl(&self) -> Option<Duration> {
        self.lock().terms.map(|t| t.ttl)
    }

    /// Why this proxy refuses to register, if another instance holds its uid.
    pub fn conflict(&self) -> Option<String> {
        self.lock().conflict.clone()
    }

    /// clusterdata values ignored because a newer revision was applied.
    pub fn outdated_values(&self) -> u64 {
        self.outdated.load(Ordering::Relaxed)
    }

    /// Whether the proxy can route primary traffic now (`/readyz`).
    pub fn ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Why the proxy is not ready, in words for a person; `None` if ready.
    pub fn not_ready_reason(&self) -> Option<String> {
        let st = self.lock();
        if let Some(c) = &st.conflict {
            return Some(c.clone());
        }
        if let Some(e) = &st.unusable {
            return Some(format!(
                "the cluster data in the store cannot be used by this proxy ({e}); upgrade the proxy"
            ));
        }
        drop(st);
        if !self.is_fresh() {
            return Some(
                "the view is not confirmed against the cluster store; check that the store is reachable"
                    .to_owned(),
            );
        }
        if self.view.load().primary.is_none() {
            return Some(
                "the cluster names no primary now (it may be failing over, or not initialised yet)"
                    .to_owned(),
            );
        }
        None
    }

    /// What this proxy registers: the generation and cluster incarnation of
    /// the data whose view it has applied.
    pub fn report(&self) -> ProxyReport {
        let st = self.lock();
        let (generation, cluster_uid) = st
            .data
            .as_ref()
            .map_or((0, String::new()), |d| (d.proxy.generation, d.uid.clone()));
        ProxyReport {
            uid: self.uid.clone(),
            instance: self.instance.clone(),
            generation,
            cluster_uid,
        }
    }

    /// Stops following: the view names no servers any more (its sessions
    /// end), then the registration's lease is revoked, so that a restarted
    /// proxy with this uid need not wait for it to expire and the sentinel
    /// need not wait for this proxy. Returns once done (or after a few
    /// seconds if the store does not answer).
    pub async fn shutdown(&self) {
        // Stop routing first, whatever the store does; no confirmation
        // counts once `stop` is cancelled.
        self.stop.cancel();
        self.unconfirm("the proxy is shutting down");
        let limit = cluster::store::REQUEST_TIMEOUT + Duration::from_secs(1);
        let _ = tokio::time::timeout(limit, self.stopped.cancelled()).await;
    }

    /// The spec in force: the applied data's, or the default.
    pub(crate) fn spec(&self) -> ClusterSpec {
        self.lock()
            .data
            .as_ref()
            .map(|d| d.spec.clone())
            .unwrap_or_default()
    }

    /// How often to renew the lease and re-read the store.
    pub(crate) fn period(&self) -> Duration {
        let st = self.lock();
        let spec = st.data.as_ref().map(|d| &d.spec);
        let default = ClusterSpec::default();
        let spec = spec.unwrap_or(&default);
        match st.terms {
            Some(t) => t.period(spec),
            None => spec.proxy_keepalive_period(),
        }
    }

    /// Whether cluster data was read and applied (`false`: the cluster is
    /// not initialised, or was deleted, or nothing was read yet).
    pub fn has_data(&self) -> bool {
        self.lock().data.is_some()
    }

    pub(crate) fn is_unusable(&self) -> bool {
        self.lock().unusable.is_some()
    }

    pub(crate) fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// Takes in a clusterdata value (`None`: the key is absent) at store
    /// `revision`: the key's mod revision, or for an absent key the
    /// revision the read was made at.
    pub(crate) fn take(&self, value: Option<&str>, revision: i64, source: &'static str) -> Taken {
        let mut st = self.lock();
        if revision <= st.revision {
            if revision < st.revision {
                self.outdated.fetch_add(1, Ordering::Relaxed);
                counter!(m::OUTDATED_VALUES, "cluster" => self.cluster().to_owned()).increment(1);
                tracing::info!(
                    cluster = self.cluster(),
                    source,
                    revision,
                    applied = st.revision,
                    "ignoring an outdated clusterdata value"
                );
                return Taken::Outdated;
            }
            // The value already applied, seen again (a read after its
            // watch event): nothing to do.
            return if st.unusable.is_some() {
                Taken::Unusable
            } else {
                Taken::Applied
            };
        }
        st.revision = revision;
        let data = match value.map(ClusterData::from_json) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                counter!(m::STORE_ERRORS, "cluster" => self.cluster().to_owned(), "op" => "parse")
                    .increment(1);
                if st.unusable.is_none() {
                    tracing::error!(
                        cluster = self.cluster(),
                        revision,
                        error = %e,
                        "cannot use the cluster data in the store: not routing, and withdrawing this proxy's registration so that failover is not blocked by it"
                    );
                }
                st.unusable = Some(e.to_string());
                self.unconfirm_locked(&mut st, "the cluster data cannot be used");
                return Taken::Unusable;
            }
        };
        if st.unusable.take().is_some() {
            tracing::info!(cluster = self.cluster(), "the cluster data is usable again");
        }
        if data.is_none() && st.data.is_some() {
            tracing::warn!(
                cluster = self.cluster(),
                "clusterdata was deleted from the store"
            );
        }
        if let (Some(new), Some(old)) = (&data, &st.data) {
            if new.uid != old.uid {
                tracing::warn!(
                    cluster = self.cluster(),
                    "the cluster was initialised anew (new cluster uid); following it"
                );
            }
        }
        st.data = data;
        if let Some(d) = &st.data {
            let spec = d.spec.clone();
            st.terms = st.terms.map(|t| t.adopt(&spec));
        }
        self.refresh_locked(&mut st);
        self.apply_locked(&st);
        Taken::Applied
    }

    /// The store's revision went back below what was applied: it was
    /// restored from a backup or replaced. Its history is a new one.
    pub(crate) fn store_reset(&self, revision: i64) {
        let mut st = self.lock();
        tracing::warn!(
            cluster = self.cluster(),
            applied = st.revision,
            now = revision,
            "the cluster store's revision went back (restored or replaced store); following its new history"
        );
        st.revision = 0;
    }

    /// A confirmation: a keep-alive sent at `origin` succeeded, this
    /// proxy's registration is in place, and a linearizable read made after
    /// it succeeded and was taken in.
    pub(crate) fn confirm(&self, origin: Instant) {
        let mut st = self.lock();
        let stopping = self.stop.is_cancelled();
        if stopping || st.terms.is_none() || st.conflict.is_some() || st.unusable.is_some() {
            return;
        }
        if st.origin.is_none_or(|o| o < origin) {
            st.origin = Some(origin);
            st.last_confirmed = Some(origin);
        }
        if !self.fresh.load(Ordering::Acquire) {
            tracing::info!(
                cluster = self.cluster(),
                "cluster view confirmed against the store"
            );
        }
        self.refresh_locked(&mut st);
        self.apply_locked(&st);
    }

    /// Time since the keep-alive behind the newest confirmation was sent;
    /// `None` before the first.
    pub(crate) fn confirmation_age(&self) -> Option<Duration> {
        self.lock().last_confirmed.map(|t| t.elapsed())
    }

    /// The primary's keeper and node API, if the failsafe may extend the
    /// view: the newest data names a primary whose keeper has an API, and
    /// the failsafe is on.
    pub(crate) fn primary_api(&self) -> Option<(String, String)> {
        let st = self.lock();
        let d = st.data.as_ref()?;
        let m = d.proxy.master_db.as_ref()?;
        let addr = d.dbs.get(m)?.status.api_address.clone()?;
        d.spec.failsafe.then(|| (m.clone(), addr))
    }

    /// The primary's keeper `db` answered, to a question sent at `sent`,
    /// that its fence holds off for `remaining` more: routing to it stays
    /// safe until `sent + remaining` (its answer came after `sent`).
    pub(crate) fn hold_primary(&self, db: &str, sent: Instant, remaining: Duration) {
        let mut st = self.lock();
        if self.stop.is_cancelled() || st.conflict.is_some() || st.unusable.is_some() {
            return;
        }
        let named = st
            .data
            .as_ref()
            .is_some_and(|d| d.proxy.master_db.as_deref() == Some(db));
        if !named {
            return;
        }
        let until = sent + remaining;
        if st
            .failsafe
            .as_ref()
            .is_some_and(|(u, t)| u == db && *t >= until)
        {
            return;
        }
        let was = self.fresh.load(Ordering::Acquire) && !self.confirmed_locked(&st);
        st.failsafe = Some((db.to_owned(), until));
        if !was {
            tracing::warn!(
                cluster = self.cluster(),
                primary = db,
                "cannot confirm the view against the store; routing to the primary while its \
                 keeper confirms its fence holds off (the failsafe)"
            );
        }
        self.refresh_locked(&mut st);
        self.apply_locked(&st);
    }

    /// Whether a confirmation against the store backs the view now.
    fn confirmed_locked(&self, st: &State) -> bool {
        match (st.origin, self.window_locked(st)) {
            (Some(o), Some(w)) => o + w > Instant::now(),
            _ => false,
        }
    }

    /// Until when the failsafe backs the view's primary, if it does.
    fn failsafe_locked(&self, st: &State) -> Option<Instant> {
        let (db, until) = st.failsafe.as_ref()?;
        let named = st
            .data
            .as_ref()
            .is_some_and(|d| d.proxy.master_db.as_deref() == Some(db.as_str()));
        named.then_some(*until)
    }

    /// The view can no longer be taken as confirmed (the lease or the
    /// registration was lost, or the data cannot be used): it names no
    /// servers from now on.
    pub(crate) fn unconfirm(&self, why: &str) {
        let mut st = self.lock();
        self.unconfirm_locked(&mut st, why);
    }

    fn unconfirm_locked(&self, st: &mut State, why: &str) {
        let was = self.fresh.load(Ordering::Acquire);
        st.origin = None;
        self.refresh_locked(st);
        if was {
            tracing::warn!(cluster = self.cluster(), why, "no longer routing: {why}");
        }
        self.apply_locked(st);
    }

    /// The lease holding the registration now has `terms` (`None`: none).
    pub(crate) fn set_terms(&self, terms: Option<LeaseTerms>) {
        let mut st = self.lock();
        st.terms = terms;
        if terms.is_none() {
            self.unconfirm_locked(&mut st, "the registration lease was lost");
        } else {
            self.refresh_locked(&mut st);
            self.apply_locked(&st);
        }
    }

    /// Records that another instance holds this proxy's uid (`Some`), or no
    /// longer does.
    pub(crate) fn set_conflict(&self, conflict: Option<String>) {
        let mut st = self.lock();
        match (&st.conflict, &conflict) {
            (None, Some(c)) => tracing::error!(cluster = self.cluster(), "{c}"),
            (Some(_), None) => {
                tracing::info!(cluster = self.cluster(), uid = %self.uid, "registered; the uid is this proxy's own now")
            }
            _ => {}
        }
        let refused = conflict.is_some();
        st.conflict = conflict;
        if refused {
            counter!(m::REGISTRATION_CONFLICTS, "cluster" => self.cluster().to_owned())
                .increment(1);
            self.unconfirm_locked(&mut st, "another proxy holds this proxy's uid");
        }
    }

    /// Called by the watchdog: drops the servers from the view once its
    /// validity has passed without a new confirmation.
    pub(crate) fn expire_if_due(&self) {
        if !self.fresh.load(Ordering::Acquire) || !self.view.deadline().passed() {
            return;
        }
        let mut st = self.lock();
        if !self.fresh.load(Ordering::Acquire) || !self.view.deadline().passed() {
            return;
        }
        let window = self.window_locked(&st);
        tracing::warn!(
            cluster = self.cluster(),
            window = ?window,
            "cannot confirm the cluster view: no longer routing to its servers"
        );
        st.origin = None;
        self.refresh_locked(&mut st);
        self.apply_locked(&st);
    }

    fn window_locked(&self, st: &State) -> Option<Duration> {
        let default = ClusterSpec::default();
        let spec = st.data.as_ref().map_or(&default, |d| &d.spec);
        st.terms.map(|t| t.window(spec))
    }

    /// Sets the view's deadline from the confirmation and the window, and
    /// whether the view is fresh.
    fn refresh_locked(&self, st: &mut State) {
        let until = match (st.origin, self.window_locked(st)) {
            (Some(o), Some(w)) => o + w,
            // Nothing backs the view: routing stops now.
            _ => Instant::now(),
        };
        let until = until.max(self.failsafe_locked(st).unwrap_or(until));
        // Before any fresh view is stored (apply_locked), so that sessions
        // routed from it see the deadline.
        if self.view.deadline().is_set() || until > Instant::now() {
            self.view.set_valid_until(until);
        }
        self.fresh.store(until > Instant::now(), Ordering::Release);
    }

    /// Makes the view match the data and the freshness.
    fn apply_locked(&self, st: &State) {
        let fresh = self.fresh.load(Ordering::Acquire);
        let mut view = match &st.data {
            Some(d) => view_of(d, fresh),
            None => View::default(),
        };
        if fresh && !self.confirmed_locked(st) {
            // Only the failsafe backs the view: the primary's keeper
            // vouches for the primary, but the replicas' lag figures are
            // frozen.
            view.replicas.clear();
        }
        if let Some(d) = &st.data {
            self.view.set_hold_timeout(d.spec.hold_timeout);
            self.view.set_standby_cluster(d.spec.is_standby());
        }
        let switchover = st.data.as_ref().is_some_and(|d| {
            d.failover
                .as_ref()
                .is_some_and(|f| f.reason == cluster::data::SWITCHOVER)
        });
        let change = match (fresh, switchover) {
            (false, _) => ViewChange::Unconfirmed,
            (true, true) => ViewChange::Switchover,
            (true, false) => ViewChange::Update,
        };
        let applied = self.proxy.apply(&self.view, view, change);
        for ended in applied.ended {
            if let Some(fence) = ended.fence {
                let cluster = self.cluster().to_owned();
                let since = Instant::now();
                tokio::spawn(async move {
                    if Fence::wait_released(&fence, Duration::from_secs(30)).await {
                        histogram!(m::FENCE_SECONDS, "cluster" => cluster)
                            .record(since.elapsed().as_secs_f64());
                    }
                });
            }
        }
    }

    /// Publishes the gauges of this follower.
    pub(crate) fn publish(&self) {
        let cluster = self.cluster().to_owned();
        if let Some(a) = self.age() {
            metrics::gauge!(m::VIEW_AGE_SECONDS, "cluster" => cluster.clone()).set(a.as_secs_f64());
        }
        let ready = if self.ready() { 1.0 } else { 0.0 };
        metrics::gauge!(m::READY, "cluster" => cluster).set(ready);
    }
}

/// Builds the status (without tasks) for unit tests.
#[cfg(test)]
pub(crate) fn for_tests(view: ViewHandle) -> std::sync::Arc<FollowStatus> {
    let proxy = Proxy::new(proxy_core::ProxyConfig::default(), view.clone());
    std::sync::Arc::new(FollowStatus::new("p1".into(), proxy, view))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::data::{Db, DbSpec, DbStatus, Role};
    use proxy_core::Backend;

    fn data(master: &str, generation: u64) -> ClusterData {
        let mut d = ClusterData::new(ClusterSpec::default());
        d.uid = "c1".into();
        for (uid, port) in [("a", 1), ("b", 2)] {
            d.dbs.insert(
                uid.into(),
                Db {
                    keeper: uid.into(),
                    spec: DbSpec {
                        role: if uid == master {
                            Role::Master
                        } else {
                            Role::Standby
                        },
                        ..Default::default()
                    },
                    status: DbStatus {
                        healthy: true,
                        address: Some(format!("h:{port}")),
                        in_recovery: uid != master,
                        streaming: true,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            );
        }
        d.proxy.master_db = Some(master.into());
        d.proxy.generation = generation;
        d
    }

    fn confirmed(view: &ViewHandle) -> std::sync::Arc<FollowStatus> {
        let s = for_tests(view.clone());
        s.set_terms(Some(LeaseTerms::for_spec(&ClusterSpec::default())));
        s
    }

    #[tokio::test]
    async fn an_older_revision_changes_neither_the_view_nor_the_acknowledgement() {
        let view = ViewHandle::new(View::default());
        let s = confirmed(&view);
        // Revision 201 (b primary, generation 8) is applied first, say by
        // a read that overtook the queued watch events.
        assert_eq!(
            s.take(Some(&data("b", 8).to_json()), 201, "read"),
            Taken::Applied
        );
        s.confirm(Instant::now());
        assert_eq!(view.load().primary, Some(Backend::new("h:2")));
        assert_eq!(s.report().generation, 8);
        // Then the watch delivers revision 200 (a primary, generation 7).
        let before = view.load();
        assert_eq!(
            s.take(Some(&data("a", 7).to_json()), 200, "watch"),
            Taken::Outdated
        );
        assert_eq!(*view.load(), *before, "the view did not move back");
        assert_eq!(
            s.report().generation,
            8,
            "the acknowledgement did not move back"
        );
        assert_eq!(s.report().cluster_uid, "c1");
        assert_eq!(s.outdated_values(), 1);
        // An older delete is ignored too; the same revision again is not
        // counted as outdated.
        assert_eq!(s.take(None, 150, "watch"), Taken::Outdated);
        assert_eq!(
            s.take(Some(&data("b", 8).to_json()), 201, "read"),
            Taken::Applied
        );
        assert_eq!(s.outdated_values(), 2);
        assert_eq!(*view.load(), *before);
        // A newer one is applied.
        assert_eq!(
            s.take(Some(&data("a", 9).to_json()), 202, "watch"),
            Taken::Applied
        );
        assert_eq!(view.load().primary, Some(Backend::new("h:1")));
        assert_eq!(s.report().generation, 9);
    }

    #[tokio::test]
    async fn watch_events_apply_at_once_but_only_a_confirmation_makes_the_view_fresh() {
        let view = ViewHandle::new(View::default());
        let s = confirmed(&view);
        s.take(Some(&data("a", 1).to_json()), 10, "watch");
        assert!(!s.is_fresh());
        assert_eq!(view.load().primary, None, "not confirmed: no primary");
        assert_eq!(view.load().generation, 1, "but the data is applied");
        s.confirm(Instant::now());
        assert!(s.is_fresh() && s.ready());
        assert_eq!(view.load().primary, Some(Backend::new("h:1")));
        let until = s.valid_until().unwrap();
        s.take(Some(&data("b", 2).to_json()), 11, "watch");
        assert_eq!(
            view.load().primary,
            Some(Backend::new("h:2")),
            "applied at once"
        );
        assert_eq!(s.valid_until(), Some(until), "not extended");
    }

    #[tokio::test(start_paused = true)]
    async fn the_view_lapses_at_origin_plus_window_and_a_shorter_timeout_applies_at_once() {
        let view = ViewHandle::new(View::default());
        let s = confirmed(&view);
        s.take(Some(&data("a", 1).to_json()), 10, "read");
        let origin = Instant::now();
        s.confirm(origin);
        assert_eq!(s.valid_until(), Some(origin + Duration::from_secs(5)));
        tokio::time::advance(Duration::from_millis(4900)).await;
        s.expire_if_due();
        assert!(s.is_fresh());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(!s.is_fresh(), "past the deadline before the watchdog ran");
        s.expire_if_due();
        assert_eq!(
            *view.load(),
            View {
                generation: 1,
                ..View::default()
            }
        );
        // Confirmed again; then proxy_timeout is lowered to 2 s: the
        // deadline moves back at once, before any re-grant.
        s.confirm(Instant::now());
        assert!(s.is_fresh());
        tokio::time::advance(Duration::from_secs(3)).await;
        let mut lowered = data("a", 2);
        lowered.spec.proxy_timeout = Duration::from_secs(2);
        s.take(Some(&lowered.to_json()), 11, "watch");
        assert!(!s.is_fresh(), "3 s old, with a 2 s timeout");
        assert_eq!(view.load().primary, None);
    }

    #[tokio::test]
    async fn unusable_data_and_conflicts_stop_routing_at_once() {
        let view = ViewHandle::new(View::default());
        let s = confirmed(&view);
        s.take(Some(&data("a", 1).to_json()), 10, "read");
        s.confirm(Instant::now());
        assert!(s.ready());
        // A format this keelson cannot read.
        let newer = data("a", 2)
            .to_json()
            .replace("\"format_version\": 1", "\"format_version\": 2");
        assert_eq!(s.take(Some(&newer), 11, "watch"), Taken::Unusable);
        assert!(!s.is_fresh() && view.load().primary.is_none());
        assert!(s.not_ready_reason().unwrap().contains("cannot be used"));
        s.confirm(Instant::now());
        assert!(!s.is_fresh(), "no confirmation while the data is unusable");
        assert_eq!(
            s.take(Some(&data("a", 3).to_json()), 12, "read"),
            Taken::Applied
        );
        s.confirm(Instant::now());
        assert!(s.ready());
        s.set_conflict(Some("another proxy is registered as uid p1".into()));
        assert!(!s.is_fresh() && view.load().primary.is_none());
        assert_eq!(
            s.not_ready_reason().as_deref(),
            Some("another proxy is registered as uid p1")
        );
    }
}
