//! The embedded file store (`file:///dir`), for clusters on one host.
//!
//! The whole store is one JSON document, `<dir>/store.json`. Every write
//! takes an exclusive `flock` on `<dir>/store.lock`, reads the document,
//! changes it, writes a temporary file, fsyncs it and renames it into place,
//! so readers (which take no lock) always see a complete document and
//! several processes can share the store safely.
//!
//! Leases expire by wall-clock time, which all processes on the host share.
//! Expired leases are purged, with delete events, by the next operation
//! that notices them; watchers poll every [`POLL_INTERVAL`], so even an idle
//! store expires its leases promptly and watches fire within 100 ms.
//! The last [`EVENT_HISTORY`] events are kept so that watches can resume.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// Lease id -> (expiry in ms since the epoch, ttl in ms).
    leases: BTreeMap<i64, (u64, u64)>,
    events: VecDeque<Event>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
        self.leases.values().any(|(exp, _)| *exp <= now)
    }

    /// Drops expired leases and their keys. True if anything changed.
    fn expire(&mut self, now: u64) -> bool {
        let dead: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, (exp, _))| *exp <= now)
            .map(|(id, _)| *id)
            .collect();
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
        // SAFETY: flock on a file descriptor we own; released when `lock` closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err(
                "cannot lock the store",
                std::io::Error::last_os_error(),
            ));
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
        if let Ok(d) = File::open(&*self.dir) {
            let _ = d.sync_all();
        }
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
            loop {
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
                        Ok((evs, st.revision))
                    })
                    .await;
                match batch {
                    Ok((evs, rev)) => {
                        for ev in evs {
                            if tx.send(Ok(ev)).await.is_err() {
                                return;
                            }
                        }
                        next = next.max(rev + 1);
                    }
                    Err(e) => {
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
