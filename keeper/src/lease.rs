//! The keeper's lease and its self-fence.
//!
//! The keeper's report lives under one lease. The sentinel counts a keeper
//! whose lease the store has expired as fenced, so the keeper must have
//! stopped its primary by then:
//! - the lease is renewed by its own task, every
//!   [`cluster::ClusterSpec::keeper_keepalive_period`], independent of slow
//!   PostgreSQL work in the reconcile loop;
//! - the self-fence timer starts at the instant a successful keep-alive was
//!   *sent* (before the store received it, so before the store's own timer
//!   restarted), and fires `fence_timeout` later; the lease lives
//!   `fence_timeout + FENCE_SLACK` from when the store received it. So the
//!   fence fires before the lease ends, by at least the slack;
//! - a lease granted anew (the old one expired, or the keeper restarted)
//!   renews the fence only once the keeper has put its report under it and
//!   then read the cluster data: a sentinel that saw the old lease gone may
//!   already be failing the primary over, and the keeper must learn that
//!   before it counts itself safe;
//! - the fence is watched by a thread of its own, not a task, so that a
//!   stalled runtime cannot keep it from firing;
//! - a renewal gives each store server one keep-alive period `P` before it
//!   tries the next (`Store::keep_alive_within`). With `F` the fence
//!   timeout: a keep-alive sent at `t` follows one sent at `t - P`, so when
//!   the server it goes to hangs, the next server must answer before
//!   `t - P + F`; the hung one costs `P`, so that leaves `F - 2P` for it,
//!   at least `F / 3` since the spec validates `F >= 3P` (1 s with the
//!   defaults). With the store's 2 s request timeout instead, it left
//!   250 ms, and a primary whose etcd member was cut from its peers fenced
//!   itself (seen in the fault lab's `EtcdMinority`).
//!
//! Times are `CLOCK_BOOTTIME` milliseconds, which go on while the machine
//! is suspended: a host that wakes up finds its fence expired.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cluster::{AnyStore, LeaseId, Store, StoreError};

/// Milliseconds on `CLOCK_BOOTTIME`.
pub fn now_ms() -> u64 {
    cluster::store::boottime_ms()
}

/// State shared by the reconcile loop, the renewal task and the fence
/// thread.
#[derive(Debug)]
pub struct Lease {
    /// The current lease; 0 while there is none.
    id: AtomicI64,
    /// Its TTL as granted, in ms.
    ttl_ms: AtomicU64,
    /// Whether the reconcile loop has confirmed it (report put, then
    /// cluster data read); only a confirmed lease renews the fence.
    confirmed: AtomicBool,
    /// The TTL to grant next, in ms (from the spec).
    want_ttl_ms: AtomicU64,
    /// How often to renew, in ms.
    period_ms: AtomicU64,
    /// When the last renewal that counts was sent.
    renewed_ms: AtomicU64,
    /// When the last keep-alive (or grant) of the current lease that
    /// succeeded was sent, confirmed or not.
    sent_ms: AtomicU64,
    /// Whether a spec has been read (the first lease waits for it, so that
    /// its TTL is the cluster's and not the default's).
    spec_known: AtomicBool,
    /// The fence timeout from the spec, in ms.
    fence_ms: AtomicU64,
    /// The postmaster's pid while it runs as a primary; 0 otherwise.
    primary_pid: AtomicU32,
    /// Until when every other keeper has promised not to promote (the
    /// store-outage failsafe, [`crate::failsafe`]); 0: no promise.
    failsafe_ms: AtomicU64,
}

impl Lease {
    pub fn new(spec: &cluster::ClusterSpec) -> Arc<Lease> {
        Arc::new(Lease {
            id: AtomicI64::new(0),
            ttl_ms: AtomicU64::new(0),
            confirmed: AtomicBool::new(false),
            want_ttl_ms: AtomicU64::new(spec.keeper_lease_ttl().as_millis() as u64),
            period_ms: AtomicU64::new(spec.keeper_keepalive_period().as_millis() as u64),
            // A keeper that starts (perhaps next to a running primary it
            // adopted) has one fence_timeout to register.
            renewed_ms: AtomicU64::new(now_ms()),
            sent_ms: AtomicU64::new(0),
            spec_known: AtomicBool::new(false),
            fence_ms: AtomicU64::new(spec.fence_timeout.as_millis() as u64),
            primary_pid: AtomicU32::new(0),
            failsafe_ms: AtomicU64::new(0),
        })
    }

    /// Starts from what the previous run of this keeper left in its fence
    /// file: its fence timeout, and its deadline if that comes sooner than
    /// a fresh one (a restart must not extend the fence of a primary whose
    /// lease may be ending).
    pub fn resume(&self, previous: &crate::guard::FenceFile) {
        if previous.fence_ms > 0 {
            self.fence_ms.store(previous.fence_ms, Ordering::Relaxed);
        }
        let fence = self.fence_ms.load(Ordering::Relaxed);
        let from_previous = previous.deadline_ms.saturating_sub(fence);
        self.renewed_ms.fetch_min(from_previous, Ordering::AcqRel);
    }

    /// Takes in a (possibly changed) spec.
    pub fn set_spec(&self, spec: &cluster::ClusterSpec) {
        self.spec_known.store(true, Ordering::Release);
        self.want_ttl_ms.store(
            spec.keeper_lease_ttl().as_millis() as u64,
            Ordering::Relaxed,
        );
        self.period_ms.store(
            spec.keeper_keepalive_period().as_millis() as u64,
            Ordering::Relaxed,
        );
        self.fence_ms
            .store(spec.fence_timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// The lease the report goes under; 0 for none.
    pub fn id(&self) -> LeaseId {
        self.id.load(Ordering::Acquire)
    }

    pub fn is_confirmed(&self) -> bool {
        self.confirmed.load(Ordering::Acquire)
    }

    /// The reconcile loop has put its report under `id` and read the
    /// cluster data since, and acted on it. The fence then counts from
    /// the last keep-alive of that lease that was sent (a put does not
    /// renew a lease; only that keep-alive tells how long it lives).
    pub fn confirm(&self, id: LeaseId) {
        if self.id() == id && !self.confirmed.swap(true, Ordering::AcqRel) {
            self.renewed(self.sent_ms.load(Ordering::Acquire));
            tracing::info!(lease = id, "lease confirmed");
        }
    }

    fn renewed(&self, sent_ms: u64) {
        self.renewed_ms.fetch_max(sent_ms, Ordering::AcqRel);
    }

    /// The fence timeout in force: the spec's, but never so long that the
    /// lease held (granted with an older spec) could end first.
    pub fn fence_timeout_ms(&self) -> u64 {
        let spec = self.fence_ms.load(Ordering::Relaxed);
        let ttl = self.ttl_ms.load(Ordering::Relaxed);
        let slack = cluster::data::FENCE_SLACK.as_millis() as u64;
        if ttl == 0 {
            spec
        } else {
            spec.min(ttl.saturating_sub(slack))
        }
    }

    /// When the fence fires: `fence_timeout` after the last renewal that
    /// counts was sent, or later while the other keepers' failsafe
    /// promises last.
    pub fn deadline_ms(&self) -> u64 {
        (self.renewed_ms.load(Ordering::Acquire) + self.fence_timeout_ms())
            .max(self.failsafe_ms.load(Ordering::Acquire))
    }

    /// Whether the fence timer has run out.
    pub fn expired(&self) -> bool {
        now_ms() > self.deadline_ms()
    }

    /// When the last renewal that counts was sent.
    pub fn renewed_ms(&self) -> u64 {
        self.renewed_ms.load(Ordering::Acquire)
    }

    /// How often the lease is renewed, in ms.
    pub fn period_ms(&self) -> u64 {
        self.period_ms.load(Ordering::Relaxed).max(50)
    }

    /// Every other keeper has promised not to promote before `until_ms`.
    pub fn hold_off_until(&self, until_ms: u64) {
        self.failsafe_ms.fetch_max(until_ms, Ordering::AcqRel);
    }

    /// How long past `now` the promises hold the fence off beyond the
    /// lease (0: they do not).
    pub fn failsafe_remaining_ms(&self, now: u64) -> u64 {
        let lease = self.renewed_ms.load(Ordering::Acquire) + self.fence_timeout_ms();
        let promised = self.failsafe_ms.load(Ordering::Acquire);
        if promised > lease {
            promised.saturating_sub(now)
        } else {
            0
        }
    }

    /// No promise counts any more (this keeper is no longer primary).
    pub fn drop_promises(&self) {
        self.failsafe_ms.store(0, Ordering::Release);
    }

    /// The postmaster to fence if the timer runs out (0: none).
    pub fn set_primary_pid(&self, pid: u32) {
        self.primary_pid.store(pid, Ordering::Release);
    }

    pub fn primary_pid(&self) -> u32 {
        self.primary_pid.load(Ordering::Acquire)
    }

    fn lost(&self) {
        self.id.store(0, Ordering::Release);
        self.confirmed.store(false, Ordering::Release);
    }
}

/// Renews the lease forever (a task; drop it to stop). `saved` keeps the
/// lease id across keeper restarts, so that a restarted keeper takes its
/// own registration back instead of waiting for it to expire.
pub async fn renew(store: AnyStore, lease: Arc<Lease>, saved: std::path::PathBuf) {
    // "<id> <ttl ms>" of the lease this keeper held last.
    let previous = std::fs::read_to_string(&saved).ok().and_then(|s| {
        let mut it = s.split_whitespace();
        Some((
            it.next()?.parse::<LeaseId>().ok()?,
            it.next()?.parse::<u64>().ok()?,
        ))
    });
    if let Some((id, ttl)) = previous {
        let sent = now_ms();
        if store.keep_alive(id).await.is_ok() {
            tracing::info!(
                lease = id,
                "took back the lease of this keeper's previous run"
            );
            lease.ttl_ms.store(ttl, Ordering::Relaxed);
            lease.sent_ms.store(sent, Ordering::Release);
            lease.id.store(id, Ordering::Release);
        }
    }
    loop {
        let period = Duration::from_millis(lease.period_ms.load(Ordering::Relaxed).max(50));
        let id = lease.id();
        if id == 0 && !lease.spec_known.load(Ordering::Acquire) {
            // The first lease waits for the cluster's spec, whose
            // fence_timeout sets its TTL.
        } else if id == 0 {
            let ttl = lease.want_ttl_ms.load(Ordering::Relaxed);
            let sent = now_ms();
            match store.grant(Duration::from_millis(ttl)).await {
                Ok(new) => {
                    lease.ttl_ms.store(ttl, Ordering::Relaxed);
                    lease.confirmed.store(false, Ordering::Release);
                    lease.sent_ms.store(sent, Ordering::Release);
                    lease.id.store(new, Ordering::Release);
                    let _ = std::fs::write(&saved, format!("{new} {ttl}"));
                    tracing::info!(lease = new, ttl_ms = ttl, "lease granted");
                }
                Err(e) => tracing::warn!(error = %e, "cannot get a lease"),
            }
        } else {
            let sent = now_ms();
            // One hung store server may cost one period, not the store's
            // request timeout (module doc).
            match store.keep_alive_within(id, period).await {
                Ok(()) => {
                    if lease.id() == id {
                        lease.sent_ms.store(sent, Ordering::Release);
                        if lease.is_confirmed() {
                            lease.renewed(sent);
                        }
                    }
                }
                Err(StoreError::LeaseExpired(_)) => {
                    tracing::warn!(
                        lease = id,
                        "the lease expired; the sentinel may count this keeper as gone"
                    );
                    lease.lost();
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew the lease"),
            }
        }
        tokio::time::sleep(period).await;
    }
}

/// How often the fence thread looks.
const FENCE_TICK: Duration = Duration::from_millis(50);

/// Starts the fence thread: once the timer runs out while a primary runs,
/// it stops it with an immediate shutdown (every session ends at once, and
/// no shutdown checkpoint recycles the WAL pg_rewind needs later), then
/// kills it and its backends if it has not gone within a second.
/// It also keeps the fence file the guard process reads (see
/// [`crate::guard`]) up to date in `dir`.
pub fn spawn_fence_thread(lease: Arc<Lease>, dir: std::path::PathBuf) -> std::io::Result<()> {
    let me = std::process::id();
    let mut written: Option<crate::guard::FenceFile> = None;
    let mut publish = move |lease: &Lease| {
        let f = crate::guard::FenceFile {
            keeper_pid: me,
            postmaster_pid: lease.primary_pid(),
            deadline_ms: lease.deadline_ms(),
            fence_ms: lease.fence_ms.load(Ordering::Relaxed),
        };
        if written != Some(f) && f.write(&dir).is_ok() {
            written = Some(f);
        }
    };
    publish(&lease);
    std::thread::Builder::new()
        .name("keelson-fence".into())
        .spawn(move || loop {
            std::thread::sleep(FENCE_TICK);
            if Arc::strong_count(&lease) == 1 {
                // The keeper is gone.
                return;
            }
            publish(&lease);
            let pid = lease.primary_pid();
            if pid == 0 || !lease.expired() {
                continue;
            }
            tracing::error!(
                pid,
                timeout_ms = lease.fence_timeout_ms(),
                "cannot renew the lease: stopping the primary PostgreSQL (self-fencing)"
            );
            crate::postmaster::fence(pid);
            let _ = lease
                .primary_pid
                .compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire);
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_never_outlives_the_lease_held() {
        let spec = cluster::ClusterSpec::default();
        let l = Lease::new(&spec);
        assert_eq!(l.fence_timeout_ms(), 5000);
        // Granted with 5.5 s; then fence_timeout was raised to 10 s: the
        // lease held still ends 5.5 s after its last renewal.
        l.ttl_ms.store(5500, Ordering::Relaxed);
        l.set_spec(&cluster::ClusterSpec {
            fence_timeout: Duration::from_secs(10),
            ..spec.clone()
        });
        assert_eq!(l.fence_timeout_ms(), 5000);
        l.set_spec(&cluster::ClusterSpec {
            fence_timeout: Duration::from_secs(2),
            ..spec
        });
        assert_eq!(l.fence_timeout_ms(), 2000);
    }

    #[test]
    fn a_restart_never_extends_the_previous_deadline() {
        let l = Lease::new(&cluster::ClusterSpec::default());
        let now = now_ms();
        // The previous run's fence was 2 s and would fire 1 s from now.
        l.resume(&crate::guard::FenceFile {
            keeper_pid: 1,
            postmaster_pid: 2,
            deadline_ms: now + 1000,
            fence_ms: 2000,
        });
        assert_eq!(l.fence_timeout_ms(), 2000);
        let deadline = l.renewed_ms.load(Ordering::Relaxed) + l.fence_timeout_ms();
        assert!(deadline <= now + 1000, "the deadline moved out");
        // A deadline further out than a fresh one does not move it out.
        let l = Lease::new(&cluster::ClusterSpec::default());
        let before = l.renewed_ms.load(Ordering::Relaxed);
        l.resume(&crate::guard::FenceFile {
            keeper_pid: 1,
            postmaster_pid: 0,
            deadline_ms: now + 60_000,
            fence_ms: 5000,
        });
        assert_eq!(l.renewed_ms.load(Ordering::Relaxed), before);
    }

    #[test]
    fn an_unconfirmed_lease_does_not_renew_the_fence() {
        let l = Lease::new(&cluster::ClusterSpec::default());
        l.id.store(7, Ordering::Relaxed);
        let before = l.renewed_ms.load(Ordering::Relaxed);
        assert!(!l.is_confirmed());
        l.sent_ms.store(before + 100, Ordering::Relaxed);
        l.confirm(8);
        assert!(!l.is_confirmed(), "another lease's confirmation");
        l.confirm(7);
        assert!(l.is_confirmed());
        assert_eq!(l.renewed_ms.load(Ordering::Relaxed), before + 100);
        l.lost();
        assert!(!l.is_confirmed() && l.id() == 0);
    }
}
