//! The embedded file store (`file:///dir`), for clusters on one host.
//!
//! The whole store is one JSON document, `<dir>/store.json`. Every write
//! takes an exclusive `flock` on `<dir>/store.lock`, reads the document,
//! changes it, writes a temporary file, fsyncs it and renames it into place,
//! so readers (which take no lock) always see a complete document and
//! several processes can share the store safely.
//!
//! Leases expire by `CLOCK_BOOTTIME`, which all processes on the host share
//! and which a wall-clock step (NTP, an operator's `date -s`) does not move:
//! a step forward must not expire every lease at once (every proxy would
//! count as fenced), a step back must not keep dead holders alive. The
//! store records the host's boot id; after a reboot every lease has
//! expired (their holders are gone, and the boot clock started again).
//! Expired leases are purged, with delete events, by the next operation
//! that notices them; watchers look every [`POLL_INTERVAL`] (a `stat`
//! unless the file changed or a lease is due), so even an idle store
//! expires its leases promptly and watches fire within 100 ms.
//! The last [`EVENT_HISTORY`] events are kept so that watches can resume.
//! The lock is waited for at most [`crate::store::REQUEST_TIMEOUT`]: a
//! process stuck while holding it makes the others fail, not hang.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::store::{Cas, KeyValue, LeaseId, Result, Store, StoreError, Watch, WatchEvent};

/// How often watchers look for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Events kept for watches that resume from an older revision.
pub const EVENT_HISTORY: usize = 1_000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Entry {
    value: String,
    mod_revision: i64,
    lease: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Event {
    revision: i64,
    key: String,
    /// `None` for a delete.
    value: Option<String>,
    lease: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    revision: i64,
    next_lease: i64,
    keys: BTreeMap<String, Entry>,
    /// Lease id -> (expiry in `CLOCK_BOOTTIME` ms, ttl in ms).
    leases: BTreeMap<i64, (u64, u64)>,
    events: VecDeque<Event>,
    /// The boot the lease times belong to.
    #[serde(default)]
    boot_id: String,
}

/// Milliseconds on `CLOCK_BOOTTIME`.
fn now_ms() -> u64 {
    crate::store::boottime_ms()
}

/// This boot of the host.
fn boot_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    })
    .clone()
}

impl State {
    fn kv(&self, key: &str) -> Option<KeyValue> {
        self.keys.get(key).map(|e| KeyValue {
            key: key.to_owned(),
            value: e.value.clone(),
            mod_revision: e.mod_revision,
            lease: e.lease,
        })
    }

    fn record(&mut self, key: &str, value: Option<&str>, lease: i64) {
        self.events.push_back(Event {
            revision: self.revision,
            key: key.to_owned(),
            value: value.map(str::to_owned),
            lease,
        });
        while self.events.len() > EVENT_HISTORY {
            self.events.pop_front();
        }
    }

    fn put(&mut self, key: &str, value: &str, lease: i64) -> Result<i64> {
        if lease != 0 && !self.leases.contains_key(&lease) {
            return Err(StoreError::LeaseExpired(lease));
        }
        self.revision += 1;
        let rev = self.revision;
        self.keys.insert(
            key.to_owned(),
            Entry {
                value: value.to_owned(),
                mod_revision: rev,
                lease,
            },
        );
        self.record(key, Some(value), lease);
        Ok(rev)
    }

    fn delete(&mut self, key: &str) -> bool {
        if self.keys.remove(key).is_none() {
            return false;
        }
        self.revision += 1;
        self.record(key, None, 0);
        true
    }

    fn has_expired(&self, now: u64) -> bool {
        (!self.leases.is_empty() && self.boot_id != boot_id())
            || self.leases.values().any(|(exp, _)| *exp <= now)
    }

    /// The earliest lease expiry, if any lease is held.
    fn next_expiry(&self) -> Option<u64> {
        self.leases.values().map(|(exp, _)| *exp).min()
    }

    /// Drops expired leases and their keys. True if anything changed.
    fn expire(&mut self, now: u64) -> bool {
        let rebooted = self.boot_id != boot_id();
        let dead: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, (exp, _))| rebooted || *exp <= now)
            .map(|(id, _)| *id)
            .collect();
        self.boot_id = boot_id();
        for id in &dead {
            self.drop_lease(*id);
        }
        !dead.is_empty()
    }

    fn drop_lease(&mut self, id: i64) {
        self.leases.remove(&id);
        let keys: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, e)| e.lease == id)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.delete(&k);
        }
    }
}

/// The file store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: Arc<PathBuf>,
}

fn io_err(what: &str, e: std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

impl FileStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| io_err(&format!("cannot create {}", dir.display()), e))?;
        Ok(FileStore { dir: Arc::new(dir) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn data_path(&self) -> PathBuf {
        self.dir.join("store.json")
    }

    fn read_state(&self) -> Result<State> {
        match std::fs::read_to_string(self.data_path()) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| {
                StoreError::Invalid(format!("{} is corrupt: {e}", self.data_path().display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io_err("cannot read the store", e)),
        }
    }

    /// Runs `f` on the state under the exclusive lock and saves the result
    /// if `f` changed it (lease expiry included).
    fn update<T>(&self, f: impl FnOnce(&mut State) -> Result<(T, bool)>) -> Result<T> {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("store.lock"))
            .map_err(|e| io_err("cannot open the store lock", e))?;
        let deadline = std::time::Instant::now() + crate::store::REQUEST_TIMEOUT;
        loop {
            // SAFETY: flock on a file descriptor we own; released when `lock` closes.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io_err("cannot lock the store", e));
            }
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "the store in {} has been locked by another process for more than {:?}",
                    self.dir.display(),
                    crate::store::REQUEST_TIMEOUT
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut state = self.read_state()?;
        let expired = state.expire(now_ms());
        let (out, changed) = f(&mut state)?;
        if changed || expired {
            self.save(&state)?;
        }
        drop(lock);
        Ok(out)
    }

    fn save(&self, state: &State) -> Result<()> {
        let tmp = self
            .dir
            .join(format!("store.json.tmp{}", std::process::id()));
        let text = serde_json::to_vec(state).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let mut f = File::create(&tmp).map_err(|e| io_err("cannot write the store", e))?;
        f.write_all(&text)
            .map_err(|e| io_err("cannot write the store", e))?;
        f.sync_all()
            .map_err(|e| io_err("cannot sync the store", e))?;
        std::fs::rename(&tmp, self.data_path())
            .map_err(|e| io_err("cannot replace the store", e))?;
        // The rename is durable only once the directory is.
        File::open(&*self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("cannot sync the store's directory", e))?;
        Ok(())
    }

    /// Reads the state, purging expired leases first if there are any.
    fn snapshot(&self) -> Result<State> {
        let state = self.read_state()?;
        if state.has_expired(now_ms()) {
            return self.update(|s| Ok((s.clone(), false)));
        }
        Ok(state)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(FileStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(me))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }
}

impl Store for FileStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_owned();
        self.blocking(move |s| Ok(s.snapshot()?.kv(&key))).await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        let prefix = prefix.to_owned();
        self.blocking(move |s| {
            let st = s.snapshot()?;
            let kvs = st
                .keys
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter_map(|(k, _)| st.kv(k))
                .collect();
            Ok((kvs, st.revision))
        })
        .await
    }

    async fn put_if_revision(
        &self,
        key: &str,
        value: &str,
        expected: i64,
        lease: LeaseId,
    ) -> Result<Cas> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.blocking(move |s| {
            s.update(|st| {
                let current = st.kv(&key);
                let rev = current.as_ref().map_or(0, |kv| kv.mod_revision);
                if rev != expected {
                    return Ok((Cas::Conflict(current), false));
                }
                Ok((Cas::Done(st.put(&key, &value, lease)?), true))
            })
        })
        .await
    }

    async fn put(&self, key: &str, value: &str, lease: LeaseId) -> Result<i64> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.blocking(move |s| s.update(|st| Ok((st.put(&key, &value, lease)?, true))))
            .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.to_owned();
        self.blocking(move |s| {
            s.update(|st| {
                let d = st.delete(&key);
                Ok((d, d))
            })
        })
        .await
    }

    async fn delete_if_revision(&self, key: &str, expected: i64) -> Result<bool> {
        let key = key.to_owned();
        self.blocking(move |s| {
            s.update(|st| {
                if st.keys.get(&key).map(|e| e.mod_revision) != Some(expected) {
                    return Ok((false, false));
                }
                let d = st.delete(&key);
                Ok((d, d))
            })
        })
        .await
    }

    async fn watch(&self, prefix: &str, revision: i64) -> Result<Watch> {
        let (tx, rx) = mpsc::channel(256);
        let store = self.clone();
        let prefix = prefix.to_owned();
        let mut next = revision;
        if next <= 0 {
            // "From now on": start after the current revision.
            next = self.blocking(|s| Ok(s.snapshot()?.revision)).await? + 1;
        }
        tokio::spawn(async move {
            // The file is replaced (a new inode) on every write: unless it
            // was, or a lease is due to expire, there is nothing to read.
            let mut seen: Option<(u64, u64)> = None;
            let mut due: Option<u64> = None;
            loop {
                let now_seen = std::fs::metadata(store.data_path())
                    .ok()
                    .map(|m| (std::os::unix::fs::MetadataExt::ino(&m), m.len()));
                let unchanged = now_seen.is_some() && now_seen == seen;
                if unchanged && due.is_none_or(|t| now_ms() < t) {
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(POLL_INTERVAL) => {}
                    }
                    continue;
                }
                seen = now_seen;
                let p = prefix.clone();
                let from = next;
                let batch = store
                    .blocking(move |s| {
                        let st = s.snapshot()?;
                        let oldest = st.events.front().map_or(st.revision + 1, |e| e.revision);
                        if from < oldest && from <= st.revision {
                            return Err(StoreError::Compacted(from));
                        }
                        let evs: Vec<WatchEvent> = st
                            .events
                            .iter()
                            .filter(|e| e.revision >= from && e.key.starts_with(&p))
                            .map(|e| match &e.value {
                                Some(v) => WatchEvent::Put(KeyValue {
                                    key: e.key.clone(),
                                    value: v.clone(),
                                    mod_revision: e.revision,
                                    lease: e.lease,
                                }),
                                None => WatchEvent::Delete {
                                    key: e.key.clone(),
                                    mod_revision: e.revision,
                                },
                            })
                            .collect();
                        Ok((evs, st.revision, st.next_expiry()))
                    })
                    .await;
                match batch {
                    Ok((evs, rev, next_due)) => {
                        due = next_due;
                        for ev in evs {
                            if tx.send(Ok(ev)).await.is_err() {
                                return;
                            }
                        }
                        next = next.max(rev + 1);
                    }
                    Err(e) => {
                        seen = None;
                        let fatal = matches!(e, StoreError::Compacted(_));
                        if tx.send(Err(e)).await.is_err() || fatal {
                            return;
                        }
                    }
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(POLL_INTERVAL) => {}
                }
            }
        });
        Ok(rx)
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl_ms = ttl.as_millis() as u64;
        self.blocking(move |s| {
            s.update(|st| {
                st.next_lease += 1;
                let id = st.next_lease;
                st.leases.insert(id, (now_ms() + ttl_ms, ttl_ms));
                Ok((id, true))
            })
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.blocking(move |s| {
            s.update(|st| match st.leases.get_mut(&lease) {
                Some((exp, ttl)) => {
                    *exp = now_ms() + *ttl;
                    Ok(((), true))
                }
                None => Err(StoreError::LeaseExpired(lease)),
            })
        })
        .await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.blocking(move |s| {
            s.update(|st| {
                let had = st.leases.contains_key(&lease);
                st.drop_lease(lease);
                Ok(((), had))
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[tokio::test]
    async fn leases_of_an_earlier_boot_have_expired() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        let l = s.grant(Duration::from_secs(600)).await.unwrap();
        s.put("/k", "v", l).await.unwrap();
        assert!(s.get("/k").await.unwrap().is_some());
        // The host rebooted: the boot id changed.
        let mut st = s.read_state().unwrap();
        st.boot_id = "another boot".into();
        s.save(&st).unwrap();
        assert!(
            s.get("/k").await.unwrap().is_none(),
            "a lease outlived a reboot"
        );
        assert!(matches!(
            s.keep_alive(l).await,
            Err(StoreError::LeaseExpired(_))
        ));
    }

    #[tokio::test]
    async fn a_stuck_lock_holder_makes_others_fail_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        s.put("/k", "v", 0).await.unwrap();
        let lock = File::create(dir.path().join("store.lock")).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        let t = std::time::Instant::now();
        let e = s.put("/k", "w", 0).await.unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("locked by another process"), "{e}");
        assert!(t.elapsed() < crate::store::REQUEST_TIMEOUT + Duration::from_secs(1));
        // Readers are not blocked by it.
        assert_eq!(s.get("/k").await.unwrap().unwrap().value, "v");
    }
}
