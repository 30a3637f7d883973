//! Fences: how the proxy ends sessions that must not go on, such as those on a
//! demoted primary or those still open when a shutdown's grace period ends.
//!
//! Each backend has a current [`Fence`]; a session takes it when it is routed.
//! Triggering a fence sets an atomic flag and wakes every session holding it.
//! A session checks the flag with one atomic load each time it wakes, so the
//! data path never takes a lock. After a fence has fired the backend gets a
//! fresh one, so that sessions routed later (if the backend is named again)
//! are not affected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;

use crate::view::Backend;

/// Why sessions are being ended; becomes the FATAL the client receives.
#[derive(Debug, Clone)]
pub struct FenceReason {
    pub sqlstate: &'static str,
    pub message: String,
    /// Metric label for `sessions_ended_total{reason=...}`.
    pub label: &'static str,
}

/// A one-shot signal shared by all sessions routed to one backend.
#[derive(Debug, Default)]
pub struct Fence {
    fired: AtomicBool,
    reason: OnceLock<FenceReason>,
    notify: Notify,
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
        self.notify.notify_waiters();
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

/// The current fence of every backend that sessions have been routed to.
#[derive(Debug, Default)]
pub struct Fences {
    by_backend: Mutex<HashMap<Backend, Arc<Fence>>>,
}

impl Fences {
    /// The fence a session routed to `backend` now should hold.
    pub fn for_backend(&self, backend: &Backend) -> Arc<Fence> {
        let mut map = self.by_backend.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(backend.clone()).or_default().clone()
    }

    /// Sessions routed to `backend` that are still open.
    pub fn sessions(&self, backend: &Backend) -> usize {
        let map = self.by_backend.lock().unwrap_or_else(|e| e.into_inner());
        map.get(backend)
            .map_or(0, |f| Arc::strong_count(f).saturating_sub(1))
    }

    /// Ends every session routed to `backend` so far. Returns the fired
    /// fence, if any session had been routed there.
    pub fn fence_backend(&self, backend: &Backend, reason: FenceReason) -> Option<Arc<Fence>> {
        let old = {
            let mut map = self.by_backend.lock().unwrap_or_else(|e| e.into_inner());
            map.remove(backend)
        };
        old.inspect(|f| f.trigger(reason))
    }

    /// Ends every session on every backend.
    pub fn fence_all(&self, reason: FenceReason) {
        let all: Vec<Arc<Fence>> = {
            let mut map = self.by_backend.lock().unwrap_or_else(|e| e.into_inner());
            map.drain().map(|(_, f)| f).collect()
        };
        for f in all {
            f.trigger(reason.clone());
        }
    }
}
