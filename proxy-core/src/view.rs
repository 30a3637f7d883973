//! The cluster view: which backend is the primary and which are replicas, at
//! which generation. The proxy reads it lock-free on every new session through
//! `ArcSwap::load`; whoever owns the view (a static config, or a store
//! follower) swaps in a new one with [`crate::Proxy::apply`], which stores it
//! and then ends the sessions the new view no longer allows.
//!
//! A [`ViewHandle`] also carries what belongs to one cluster rather than to
//! the whole proxy: its name (a metric label), how long clients wait for a
//! primary, and the view's validity [`Deadline`].
//!
//! Invariants:
//! - a session is routed only from a view it loaded; a newer view never
//!   changes where an already-routed session goes, it can only fence it;
//! - once a deadline has been set on a handle, no session is routed from it
//!   after the deadline and no primary session forwards client bytes after
//!   it, whether or not the view's owner has run since (a frozen process
//!   resumes its worker threads before its follower task).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;

/// A backend PostgreSQL server, as `host:port`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    addr: Arc<str>,
}

impl Backend {
    pub fn new(addr: impl Into<Arc<str>>) -> Self {
        Backend { addr: addr.into() }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// A standby that may take read-only sessions, with how far behind the
/// primary it was last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub backend: Backend,
    /// WAL bytes the primary has written that this standby has not replayed.
    pub lag_bytes: u64,
    /// Time since its last replayed transaction while it is behind; `None`
    /// when unknown.
    pub lag: Option<std::time::Duration>,
    /// Whether it is streaming from its upstream.
    pub streaming: bool,
}

impl Replica {
    /// A streaming standby with no known lag (static configuration).
    pub fn fresh(backend: Backend) -> Self {
        Replica {
            backend,
            lag_bytes: 0,
            lag: None,
            streaming: true,
        }
    }
}

/// One immutable snapshot of the cluster, as the proxy routes by it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Increases with every change the cluster store makes.
    pub generation: u64,
    /// Where primary traffic goes. `None` while there is no confirmed primary.
    pub primary: Option<Backend>,
    /// Standbys that may take read-only traffic.
    pub replicas: Vec<Replica>,
}

impl View {
    /// A view with a fixed primary and no replicas (static mode).
    pub fn fixed(primary: Backend) -> Self {
        View {
            generation: 1,
            primary: Some(primary),
            replicas: Vec::new(),
        }
    }

    /// Every backend the view knows, primary first, without duplicates.
    pub fn backends(&self) -> impl Iterator<Item = &Backend> {
        let primary = self.primary.iter();
        primary.chain(
            self.replicas
                .iter()
                .map(|r| &r.backend)
                .filter(move |r| Some(*r) != self.primary.as_ref()),
        )
    }
}

/// The instant until which a view may be routed by, on a monotonic clock.
///
/// Its owner (a store follower) advances it each time it confirms the view
/// against the store. Sessions read it with one atomic load and one clock
/// read; a handle that never had a deadline (static mode) has none, and its
/// sessions do not check it at all.
pub struct Deadline {
    epoch: Instant,
    /// Nanoseconds after `epoch`; [`Deadline::NONE`] while unset.
    nanos: AtomicU64,
    /// Its slot in the kernel's copy of deadlines, once a session of its
    /// view forwards in the kernel (`crate::kernel`).
    #[cfg(target_os = "linux")]
    pub(crate) kernel_slot: std::sync::OnceLock<u32>,
}

impl Deadline {
    const NONE: u64 = u64::MAX;

    fn new() -> Self {
        Deadline {
            epoch: Instant::now(),
            nanos: AtomicU64::new(Self::NONE),
            #[cfg(target_os = "linux")]
            kernel_slot: std::sync::OnceLock::new(),
        }
    }

    /// Whether a deadline was ever set. Once set it stays set.
    #[inline]
    pub fn is_set(&self) -> bool {
        self.nanos.load(Ordering::Acquire) != Self::NONE
    }

    /// Whether the deadline is set and has passed. Hot path: one atomic load
    /// and one monotonic clock read.
    #[inline]
    pub fn passed(&self) -> bool {
        let d = self.nanos.load(Ordering::Acquire);
        d != Self::NONE && self.now_nanos() >= d
    }

    /// The deadline, if set.
    pub fn get(&self) -> Option<Instant> {
        match self.nanos.load(Ordering::Acquire) {
            Self::NONE => None,
            n => Some(self.epoch + Duration::from_nanos(n)),
        }
    }

    #[inline]
    fn now_nanos(&self) -> u64 {
        Self::nanos_since(self.epoch, Instant::now())
    }

    fn nanos_since(epoch: Instant, t: Instant) -> u64 {
        // Saturates at 0 for an instant before the epoch: already passed.
        // u64 nanoseconds last 584 years; NONE is never reached.
        let n = t.saturating_duration_since(epoch).as_nanos();
        u64::try_from(n)
            .unwrap_or(Self::NONE - 1)
            .min(Self::NONE - 1)
    }

    /// Sets the deadline (earlier or later than before); returns whether
    /// the previous one had passed.
    fn set(&self, until: Instant) -> bool {
        let was_passed = self.passed();
        let n = Self::nanos_since(self.epoch, until);
        #[cfg(target_os = "linux")]
        crate::kernel::deadline_set(self, || self.nanos.store(n, Ordering::Release));
        #[cfg(not(target_os = "linux"))]
        self.nanos.store(n, Ordering::Release);
        was_passed
    }
}

impl fmt::Debug for Deadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.get() {
            None => f.write_str("none"),
            Some(t) => {
                let now = Instant::now();
                if t > now {
                    write!(f, "in {:?}", t - now)
                } else {
                    write!(f, "passed {:?} ago", now - t)
                }
            }
        }
    }
}

struct Shared {
    current: ArcSwap<View>,
    changed: watch::Sender<u64>,
    name: Arc<str>,
    /// Milliseconds; [`HOLD_UNSET`]: the proxy's configured hold timeout.
    hold_timeout_ms: AtomicU64,
    /// A standby cluster's view ([`ViewHandle::set_standby_cluster`]).
    standby_cluster: std::sync::atomic::AtomicBool,
    deadline: Deadline,
}

const HOLD_UNSET: u64 = u64::MAX;

/// Shared, hot-swappable access to the current view of one cluster.
///
/// Reads are lock-free. Writers also notify a `watch` channel so that
/// sessions waiting for a change (fencing, holding) wake at once. Clones
/// share everything.
#[derive(Clone)]
pub struct ViewHandle {
    shared: Arc<Shared>,
}

/// A borrowed view ([`ViewHandle::load`]).
pub struct ViewGuard(arc_swap::Guard<Arc<View>>);

impl std::ops::Deref for ViewGuard {
    type Target = View;
    fn deref(&self) -> &View {
        &self.0
    }
}

impl fmt::Debug for ViewGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        View::fmt(self, f)
    }
}

impl fmt::Debug for ViewHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ViewHandle")
            .field("name", &self.name())
            .field("view", &*self.load())
            .field("deadline", &self.shared.deadline)
            .finish()
    }
}

impl ViewHandle {
    /// A handle named `default`, with no deadline.
    pub fn new(view: View) -> Self {
        Self::named("default", view)
    }

    /// A handle whose `name` labels its metrics (`cluster="..."`): the
    /// cluster it follows.
    pub fn named(name: impl Into<Arc<str>>, view: View) -> Self {
        let (changed, _) = watch::channel(view.generation);
        ViewHandle {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(view),
                changed,
                name: name.into(),
                hold_timeout_ms: AtomicU64::new(HOLD_UNSET),
                standby_cluster: std::sync::atomic::AtomicBool::new(false),
                deadline: Deadline::new(),
            }),
        }
    }

    /// The cluster this view belongs to, as a metric label.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub(crate) fn name_label(&self) -> Arc<str> {
        self.shared.name.clone()
    }

    /// The current view, borrowed: lock-free, and no reference count is
    /// touched. Hold it briefly (not across an `.await`); use
    /// [`ViewHandle::load_full`] to keep a view.
    pub fn load(&self) -> ViewGuard {
        ViewGuard(self.shared.current.load())
    }

    /// The current view, owned.
    pub fn load_full(&self) -> Arc<View> {
        self.shared.current.load_full()
    }

    /// Replaces the view and wakes everyone watching for changes. This does
    /// not end sessions the new view removed; [`crate::Proxy::apply`] does.
    pub fn store(&self, view: View) {
        let generation = view.generation;
        self.shared.current.store(Arc::new(view));
        self.shared.changed.send_replace(generation);
    }

    /// A receiver that is marked changed whenever a new view is stored, or
    /// the deadline moves from passed to the future.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    /// How long clients wait for a primary (or a replica) of this cluster;
    /// `None`: the proxy's configured `hold_timeout`.
    pub fn hold_timeout(&self) -> Option<Duration> {
        match self.shared.hold_timeout_ms.load(Ordering::Relaxed) {
            HOLD_UNSET => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Sets this cluster's hold timeout (the cluster spec's `hold_timeout`).
    pub fn set_hold_timeout(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(HOLD_UNSET - 1);
        self.shared
            .hold_timeout_ms
            .store(ms.min(HOLD_UNSET - 1), Ordering::Relaxed);
    }

    /// Marks the view's cluster as a standby cluster (it takes no writes
    /// until promoted): a primary-route client held past the hold timeout
    /// is told so, instead of "no primary".
    pub fn set_standby_cluster(&self, standby: bool) {
        self.shared
            .standby_cluster
            .store(standby, Ordering::Relaxed);
    }

    /// Whether [`ViewHandle::set_standby_cluster`] said so.
    pub fn is_standby_cluster(&self) -> bool {
        self.shared.standby_cluster.load(Ordering::Relaxed)
    }

    /// Until when this view may be routed by.
    pub fn deadline(&self) -> &Deadline {
        &self.shared.deadline
    }

    /// Sets the instant until which the view may be routed by. Set it before
    /// storing a view with a primary, so that every session routed from that
    /// view sees a deadline. Clients held while it had passed are woken when
    /// it moves back into the future.
    pub fn set_valid_until(&self, until: Instant) {
        let was_passed = self.shared.deadline.set(until);
        if was_passed && until > Instant::now() {
            self.shared.changed.send_modify(|_| {});
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_passes_on_the_monotonic_clock_and_wakes_held_clients_when_renewed() {
        let h = ViewHandle::new(View::default());
        assert!(!h.deadline().is_set());
        assert!(!h.deadline().passed(), "no deadline: never passed");
        h.set_valid_until(Instant::now() + Duration::from_secs(5));
        assert!(h.deadline().is_set() && !h.deadline().passed());
        tokio::time::advance(Duration::from_millis(4999)).await;
        assert!(!h.deadline().passed());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(h.deadline().passed());
        let mut rx = h.subscribe();
        rx.borrow_and_update();
        h.set_valid_until(Instant::now() + Duration::from_secs(5));
        assert!(rx.has_changed().unwrap(), "renewal wakes held clients");
        assert!(!h.deadline().passed());
        // Moving it earlier (a shorter proxy_timeout) takes effect at once.
        h.set_valid_until(Instant::now() - Duration::from_millis(1));
        assert!(h.deadline().passed());
    }

    #[test]
    fn hold_timeout_is_per_handle() {
        let a = ViewHandle::named("a", View::default());
        let b = ViewHandle::named("b", View::default());
        a.set_hold_timeout(Duration::from_millis(300));
        assert_eq!(a.hold_timeout(), Some(Duration::from_millis(300)));
        assert_eq!(b.hold_timeout(), None);
        assert_eq!(a.clone().name(), "a");
    }
}
