//! Fences: how the proxy ends sessions that must not go on, such as those on a
//! demoted primary or those still open when a shutdown's grace period ends.
//!
//! Each backend has a current [`Fence`] per [`Role`] it serves in: sessions
//! routed to it as the primary hold one, sessions routed to it as a standby
//! another, so that promoting a standby ends its standby sessions and never
//! the primary sessions that the promotion brings. A session takes its fence
//! when it is routed. Triggering a fence sets an atomic flag and wakes every
//! session holding it. A session checks the flag with one atomic load each
//! time it wakes, so the data path never takes a lock. After a fence has
//! fired the backend gets a fresh one, so that sessions routed later (if the
//! backend is named again) are not affected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use tokio::sync::Notify;

use crate::view::Backend;

/// Why sessions are being ended; becomes the FATAL the client receives.
#[derive(Debug, Clone)]
pub struct FenceReason {
    pub sqlstate: &'static str,
    pub message: String,
    /// Metric label for `sessions_ended_total{reason=...}`.
    pub label: &'static str,
    /// End each session only once no transaction is open (at a
    /// ReadyForQuery saying idle), within [`SWITCHOVER_DRAIN`]; after that,
    /// at the next message boundary as usual.
    pub drain: bool,
}

/// How long a session fenced by a planned switchover may take to finish
/// its open transaction before it is ended anyway. The old primary's
/// keeper waits as long for transactions before it stops PostgreSQL.
pub const SWITCHOVER_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

impl FenceReason {
    fn admin_shutdown(message: impl Into<String>, label: &'static str) -> Self {
        FenceReason {
            sqlstate: crate::error::ADMIN_SHUTDOWN,
            message: message.into(),
            label,
            drain: false,
        }
    }

    /// For sessions on a primary left in a planned switchover: they end
    /// between transactions.
    pub fn primary_switched_over() -> Self {
        FenceReason {
            drain: true,
            ..Self::admin_shutdown(
                "terminating connection because of a planned switchover; reconnect to reach the new primary",
                "switchover",
            )
        }
    }

    /// For sessions on a primary that a new view no longer names.
    pub fn primary_changed() -> Self {
        Self::admin_shutdown(
            "terminating connection because the primary changed; reconnect to reach the new primary",
            "fenced",
        )
    }

    /// For primary sessions of a view that could not be confirmed against
    /// the cluster store in time (the view's deadline passed).
    pub fn primary_unconfirmed() -> Self {
        Self::admin_shutdown(
            "terminating connection because the proxy lost contact with the cluster store and cannot confirm the primary",
            "stale",
        )
    }

    /// For standby sessions of a view that could not be confirmed in time:
    /// the standby's lag is no longer known.
    pub fn standby_unconfirmed() -> Self {
        Self::admin_shutdown(
            "terminating connection because the proxy lost contact with the cluster store and cannot confirm this standby's lag",
            "stale",
        )
    }

    /// For sessions on a standby that the new view names primary.
    pub fn standby_promoted() -> Self {
        Self::admin_shutdown(
            "terminating connection because this standby was promoted to primary and this session was routed to a standby; reconnect to reach a standby",
            "replica_promoted",
        )
    }

    /// For sessions on a standby that left the view's replica set.
    pub fn standby_removed() -> Self {
        Self::admin_shutdown(
            "terminating connection because this standby left the cluster's replica set (it is unhealthy, not replicating, or was removed); reconnect to reach another standby",
            "replica_removed",
        )
    }

    /// For sessions on a standby that fell beyond the replica lag limit.
    pub fn standby_lagging(lag_bytes: u64) -> Self {
        Self::admin_shutdown(
            format!(
                "terminating connection because the replica fell behind the primary ({lag_bytes} bytes); reconnect to reach a fresh one"
            ),
            "replica_lag",
        )
    }
}

/// A one-shot signal shared by all sessions routed to one backend.
#[derive(Debug, Default)]
pub struct Fence {
    fired: AtomicBool,
    reason: OnceLock<FenceReason>,
    notify: Notify,
    /// The socket cookies of this fence's sessions that forward in the
    /// kernel: [`Fence::trigger`] stops their streams there itself, so no
    /// client byte reaches the server after the fence even before the
    /// sessions' tasks run.
    #[cfg(target_os = "linux")]
    kernel: std::sync::Mutex<Vec<u64>>,
}

impl Fence {
    /// Waits until every session holding `fence` has let go of it (they
    /// have closed), or `limit` passes. Returns whether all were released.
    /// The caller's own reference is the only one left then.
    pub async fn wait_released(fence: &Arc<Fence>, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while Arc::strong_count(fence) > 1 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        true
    }

    /// Fires the fence. The first reason wins.
    pub fn trigger(&self, reason: FenceReason) {
        let _ = self.reason.set(reason);
        self.fired.store(true, Ordering::Release);
        // After `fired`: a session entering the kernel from now on sees it
        // (enter_kernel), and every one that entered before is stopped
        // here.
        #[cfg(target_os = "linux")]
        crate::kernel::stop_streams(&self.kernel.lock().unwrap_or_else(|e| e.into_inner()));
        self.notify.notify_waiters();
    }

    /// A session's two sockets entered the kernel's sockhash: whether the
    /// fence had fired already (the caller then stops them itself).
    #[cfg(target_os = "linux")]
    pub(crate) fn enter_kernel(&self, cookies: [u64; 2]) -> bool {
        self.kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(cookies);
        self.is_fired()
    }

    /// The session's sockets leave the kernel's maps: once this returns,
    /// [`Fence::trigger`] no longer touches them.
    #[cfg(target_os = "linux")]
    pub(crate) fn leave_kernel(&self, cookies: [u64; 2]) {
        self.kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|c| !cookies.contains(c));
    }

    #[inline]
    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> Option<&FenceReason> {
        if self.is_fired() {
            self.reason.get()
        } else {
            None
        }
    }

    /// A future that completes when the fence fires. Poll it once to
    /// register; afterwards [`Fence::is_fired`] tells whether it has.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

/// What a session was routed to a backend as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The primary named by the view (primary routes, and prefer-replica or
    /// any sessions that landed on the primary).
    Primary,
    /// One of the view's replicas.
    Standby,
}

/// The current fence of every backend that sessions have been routed to.
///
/// Read on every session's setup and written only when a backend is first
/// routed to or fenced, so the map is copied on write and read without a
/// lock: sessions starting on every worker at once (all clients reconnect
/// together after a failover) do not queue on a mutex.
#[derive(Debug, Default)]
pub(crate) struct Fences {
    by_backend: ArcSwap<HashMap<Backend, [Option<Arc<Fence>>; 2]>>,
}

fn slot(role: Role) -> usize {
    match role {
        Role::Primary => 0,
        Role::Standby => 1,
    }
}

impl Fences {
    /// The fence a session routed to `backend` as `role` now should hold.
    pub(crate) fn for_backend(&self, backend: &Backend, role: Role) -> Arc<Fence> {
        if let Some(f) = self
            .by_backend
            .load()
            .get(backend)
            .and_then(|s| s[slot(role)].clone())
        {
            return f;
        }
        let fresh = Arc::new(Fence::default());
        let mut got = fresh.clone();
        self.by_backend.rcu(|m| {
            if let Some(f) = m.get(backend).and_then(|s| s[slot(role)].clone()) {
                got = f;
                return Arc::clone(m);
            }
            let mut m = HashMap::clone(m);
            m.entry(backend.clone()).or_default()[slot(role)] = Some(fresh.clone());
            got = fresh.clone();
            Arc::new(m)
        });
        got
    }

    /// Sessions routed to `backend`, in either role, that are still open.
    pub(crate) fn sessions(&self, backend: &Backend) -> usize {
        self.by_backend.load().get(backend).map_or(0, |s| {
            s.iter()
                .flatten()
                .map(|f| Arc::strong_count(f).saturating_sub(1))
                .sum()
        })
    }

    /// Ends every session routed to `backend` as `role` so far. Returns the
    /// fired fence, if any such session had been routed there.
    pub(crate) fn fence(
        &self,
        backend: &Backend,
        role: Role,
        reason: FenceReason,
    ) -> Option<Arc<Fence>> {
        let mut old = None;
        self.by_backend.rcu(|m| {
            old = m.get(backend).and_then(|s| s[slot(role)].clone());
            if old.is_none() {
                return Arc::clone(m);
            }
            let mut m = HashMap::clone(m);
            if let Some(s) = m.get_mut(backend) {
                s[slot(role)] = None;
                if s.iter().all(Option::is_none) {
                    m.remove(backend);
                }
            }
            Arc::new(m)
        });
        old.inspect(|f| f.trigger(reason))
    }

    /// Ends every session routed to `backend` so far, in either role.
    /// Returns the fired fences.
    pub(crate) fn fence_backend(&self, backend: &Backend, reason: FenceReason) -> Vec<Arc<Fence>> {
        [Role::Primary, Role::Standby]
            .into_iter()
            .filter_map(|r| self.fence(backend, r, reason.clone()))
            .collect()
    }

    /// Ends every session on every backend.
    pub(crate) fn fence_all(&self, reason: FenceReason) {
        let all = self.by_backend.swap(Arc::new(HashMap::new()));
        for f in all.values().flatten().flatten() {
            f.trigger(reason.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_share_a_fence_until_it_fires_then_get_a_fresh_one() {
        let fences = Fences::default();
        let (a, b) = (Backend::new("a:1"), Backend::new("b:1"));
        let f1 = fences.for_backend(&a, Role::Primary);
        let f2 = fences.for_backend(&a, Role::Primary);
        assert!(Arc::ptr_eq(&f1, &f2));
        let s = fences.for_backend(&a, Role::Standby);
        assert!(!Arc::ptr_eq(&f1, &s));
        let _other = fences.for_backend(&b, Role::Primary);
        assert_eq!(fences.sessions(&a), 3);
        let fired = fences.fence(&a, Role::Primary, FenceReason::primary_changed());
        assert!(fired.is_some_and(|f| Arc::ptr_eq(&f, &f1)));
        assert!(f1.is_fired() && !s.is_fired());
        assert_eq!(fences.sessions(&a), 1, "the standby session only");
        let f3 = fences.for_backend(&a, Role::Primary);
        assert!(!f3.is_fired() && !Arc::ptr_eq(&f1, &f3));
        assert!(fences
            .fence(&b, Role::Standby, FenceReason::primary_changed())
            .is_none());
        fences.fence_all(FenceReason::primary_changed());
        assert!(f3.is_fired() && s.is_fired() && _other.is_fired());
        assert_eq!(fences.sessions(&a), 0);
    }
}
