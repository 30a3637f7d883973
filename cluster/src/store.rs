//! The Store trait: the few operations keelson needs from a consistent
//! key-value store, implemented by the embedded file store and by etcd v3.
//!
//! Semantics follow etcd: one revision counter for the whole store, bumped
//! by every write; each key remembers the revision that last modified it;
//! keys put under a lease disappear when the lease expires or is revoked;
//! watches deliver events in revision order and can resume from a revision.
//! Values are UTF-8 text (keelson stores JSON).

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;

/// A stored key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    /// The store revision of the last write to this key.
    pub mod_revision: i64,
    /// The lease the key is attached to, or 0.
    pub lease: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, mod_revision: i64 },
}

impl WatchEvent {
    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
}

/// A lease id; 0 is "no lease".
pub type LeaseId = i64;

/// Store failures, classified for the caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time. Retrying
    /// later is the right response.
    #[error("the cluster store is unavailable: {0}")]
    Unavailable(String),
    /// A watch asked for history the store no longer keeps; re-read and
    /// watch again from the current revision.
    #[error("the store no longer has revision {0}; re-read and watch again")]
    Compacted(i64),
    /// The lease does not exist (it expired or was revoked).
    #[error("lease {0} has expired or was revoked")]
    LeaseExpired(LeaseId),
    /// The store URL or its content is wrong.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Result of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cas {
    /// Written; the new revision.
    Done(i64),
    /// The key's revision was not the expected one; its current state.
    Conflict(Option<KeyValue>),
}

/// A stream of watch events. It ends (returns `None`) or yields an error when
/// the watch cannot go on; the caller then re-reads and watches again.
pub type Watch = mpsc::Receiver<Result<WatchEvent>>;

/// The operations keelson needs from its cluster store.
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>>> + Send;
    /// Reads every key under `prefix`, and the store revision they were read at.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<(Vec<KeyValue>, i64)>> + Send;
    /// Writes `key` only if its mod revision is `expected` (0: only if absent),
    /// optionally under a lease.
    fn put_if_revision(
        &self,
        key: &str,
        value: &str,
        expected: i64,
        lease: LeaseId,
    ) -> impl Future<Output = Result<Cas>> + Send;
    /// Writes `key` unconditionally, under `lease` if non-zero.
    fn put(
        &self,
        key: &str,
        value: &str,
        lease: LeaseId,
    ) -> impl Future<Output = Result<i64>> + Send;
    /// Deletes `key`; true if it existed.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool>> + Send;
    /// Deletes `key` only if its mod revision is `expected`; true if deleted.
    fn delete_if_revision(
        &self,
        key: &str,
        expected: i64,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// Watches every key under `prefix`, from `revision` on (inclusive).
    fn watch(&self, prefix: &str, revision: i64) -> impl Future<Output = Result<Watch>> + Send;
    /// Grants a lease that expires `ttl` after its last keep-alive.
    fn grant(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId>> + Send;
    /// Renews a lease once. Fails with `LeaseExpired` if it is gone.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<()>> + Send;
    /// [`Store::keep_alive`], giving each server of the store at most
    /// `attempt` before trying the next one (a store with several servers;
    /// the others ignore `attempt`). A holder that must renew within a
    /// budget (the keeper's lease, within `fence_timeout`) bounds what one
    /// hung server can cost it: `attempt`, not [`REQUEST_TIMEOUT`].
    fn keep_alive_within(
        &self,
        lease: LeaseId,
        attempt: Duration,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = attempt;
        self.keep_alive(lease)
    }
    /// Revokes a lease, deleting its keys.
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<()>> + Send;

    /// Tries once to become leader of `election`: creates the key with
    /// `candidate` under `lease` if no one holds it. True if `candidate` is
    /// (now or already) the leader.
    fn campaign(
        &self,
        election: &str,
        candidate: &str,
        lease: LeaseId,
    ) -> impl Future<Output = Result<bool>> + Send {
        async move {
            match self.put_if_revision(election, candidate, 0, lease).await? {
                Cas::Done(_) => Ok(true),
                Cas::Conflict(Some(kv)) => Ok(kv.value == candidate && kv.lease == lease),
                Cas::Conflict(None) => Ok(false),
            }
        }
    }

    /// Gives up leadership if `candidate` holds it.
    fn resign(&self, election: &str, candidate: &str) -> impl Future<Output = Result<()>> + Send {
        async move {
            if let Some(kv) = self.get(election).await? {
                if kv.value == candidate {
                    // Only delete what we hold, even if it changes meanwhile.
                    self.delete_if_revision(election, kv.mod_revision).await?;
                }
            }
            Ok(())
        }
    }

    /// Drops the history older than `keep` revisions behind the current
    /// one, so that it does not grow without bound (etcd keeps every
    /// revision until compacted). Watches resuming from before it get
    /// [`StoreError::Compacted`] and re-read. A no-op where history is
    /// bounded anyway (the file store).
    fn compact_keeping(&self, keep: i64) -> impl Future<Output = Result<()>> + Send {
        let _ = keep;
        async { Ok(()) }
    }

    /// The current leader of `election`, if any.
    fn leader(&self, election: &str) -> impl Future<Output = Result<Option<String>>> + Send {
        async move { Ok(self.get(election).await?.map(|kv| kv.value)) }
    }
}

/// Where the keys of one cluster live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    base: String,
}

impl Keys {
    /// Keys under `/<prefix>/<cluster>/`.
    pub fn new(prefix: &str, cluster: &str) -> Self {
        Keys {
            base: format!("/{}/{}/", prefix.trim_matches('/'), cluster),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn clusterdata(&self) -> String {
        format!("{}clusterdata", self.base)
    }

    pub fn keepers(&self) -> String {
        format!("{}keepers/", self.base)
    }

    pub fn keeper(&self, uid: &str) -> String {
        format!("{}keepers/{uid}", self.base)
    }

    pub fn proxies(&self) -> String {
        format!("{}proxies/", self.base)
    }

    pub fn proxy(&self, uid: &str) -> String {
        format!("{}proxies/{uid}", self.base)
    }

    pub fn sentinels(&self) -> String {
        format!("{}sentinels/", self.base)
    }

    /// The parameter catalog a keeper read from its PostgreSQL
    /// ([`crate::params::Catalog`]).
    pub fn pg_settings(&self) -> String {
        format!("{}pg_settings", self.base)
    }

    pub fn leader(&self) -> String {
        format!("{}leader", self.base)
    }
}

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "keelson";

/// The longest one store request may take before it fails as
/// [`StoreError::Unavailable`] (per etcd endpoint; the file store's lock
/// wait). Timing relations in [`crate::ClusterSpec::validate`] count it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Milliseconds on `CLOCK_BOOTTIME`: monotonic, shared by every process
/// of the host, not moved by wall-clock steps, and counting the time the
/// host was suspended.
pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts);
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// A random id for one process instance (16 hex digits), so that two
/// processes started with the same uid can be told apart.
pub fn instance_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if ok.is_err() {
        // No /dev/urandom: time and pid still differ between instances.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = (t ^ (u64::from(std::process::id()) << 32)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
