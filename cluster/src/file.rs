//! The embedded file store (`file:///dir`), for clusters on one host.
//!
//! The whole store is one JSON document, committed in generations:
//! `<dir>/gen.<n>` is the store after its n-th write. A writer reads the
//! newest generation, changes it, writes and fsyncs a temporary file and
//! links it as the next generation; `link(2)` never replaces a file, so of
//! the writers that read the same generation one commits and the others
//! read again and retry. There is no lock: a writer stopped anywhere in a
//! write (SIGSTOP, a frozen cgroup, a stalled VM) holds no one up, and when
//! it resumes its commit fails instead of undoing the writes made in the
//! meantime. Readers always see a complete document. The newest
//! [`KEEP_GENERATIONS`] are kept for readers that listed one just before it
//! was superseded.
//!
//! Leases expire by `CLOCK_BOOTTIME`, which all processes on the host share
//! and which a wall-clock step (NTP, an operator's `date -s`) does not move:
//! a step forward must not expire every lease at once (every proxy would
//! count as fenced), a step back must not keep dead holders alive. The
//! store records the host's boot id; after a reboot every lease has
//! expired (their holders are gone, and the boot clock started again).
//! Expired leases are purged, with delete events, by the next operation
//! that notices them; watchers look every [`POLL_INTERVAL`] (a directory
//! listing, unless there is a new generation or a lease is due), so even an idle store
//! expires its leases promptly and watches fire within 100 ms.
//! The last [`EVENT_HISTORY`] events are kept so that watches can resume.
//! A write retried for [`crate::store::REQUEST_TIMEOUT`] under constant
//! contention fails as unavailable.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::Write;
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
/// Committed generations are files named this and their number.
const GENERATION_PREFIX: &str = "gen.";
/// Generations kept behind the newest, for readers that listed one of them
/// just before it was superseded.
const KEEP_GENERATIONS: u64 = 16;
/// Commit ids each generation remembers. A writer stopped in its write for
/// this many commits by others cannot tell whether its write landed, and
/// says so.
const COMMIT_HISTORY: usize = 256;
/// A writer's file before it is committed.
const TMP_PREFIX: &str = "tmp.";
/// A temporary file this old belongs to a writer that died.
const ABANDONED_AFTER: Duration = Duration::from_secs(60);

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
    /// The ids of the last [`COMMIT_HISTORY`] commits, newest last: a
    /// writer finds its own here once it is on the line of commits.
    #[serde(default)]
    commits: VecDeque<u64>,
}

/// A commit's id: unique among this host's writers, past ones included.
fn commit_id(seq: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(seq);
    h.write_u64(now_ms());
    h.finish()
}

/// Milliseconds on `CLOCK_BOOTTIME`.
fn now_ms() -> u64 {
    crate::store::boottime_ms()
}

/// This boot of the host (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> String {
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

    /// The document an earlier keelson kept the whole store in; read as
    /// generation 0 until the first commit.
    fn legacy_path(&self) -> PathBuf {
        self.dir.join("store.json")
    }

    fn generation_path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{GENERATION_PREFIX}{n:020}"))
    }

    /// The committed generations present, oldest first (none: a new store).
    fn generations(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let dir = std::fs::read_dir(&*self.dir).map_err(|e| io_err("cannot read the store", e))?;
        for entry in dir {
            let entry = entry.map_err(|e| io_err("cannot read the store", e))?;
            let name = entry.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_prefix(GENERATION_PREFIX))
                .and_then(|n| n.parse::<u64>().ok())
            {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The newest committed generation (0 before the first commit).
    fn latest(&self) -> Result<u64> {
        Ok(self.generations()?.last().copied().unwrap_or(0))
    }

    /// The newest generation and its state.
    fn read_state(&self) -> Result<(u64, State)> {
        loop {
            let n = self.latest()?;
            let path = if n == 0 {
                self.legacy_path()
            } else {
                self.generation_path(n)
            };
            match std::fs::read_to_string(&path) {
                Ok(s) => {
                    return serde_json::from_str(&s).map(|st| (n, st)).map_err(|e| {
                        StoreError::Invalid(format!("{} is corrupt: {e}", path.display()))
                    });
                }
                // No store yet, unless the first generation was committed
                // (and the earlier keelson's document removed) just now.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && n == 0 => {
                    if self.latest()? == 0 {
                        return Ok((0, State::default()));
                    }
                }
                // Collected after we listed it: a newer one has been
                // committed since, read that.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("cannot read the store", e)),
            }
        }
    }

    /// Runs `f` on the newest state and commits the result as the next
    /// generation if `f` changed it (lease expiry included). If another
    /// writer committed that generation first, runs `f` again on theirs.
    fn update<T>(&self, mut f: impl FnMut(&mut State) -> Result<(T, bool)>) -> Result<T> {
        let deadline = std::time::Instant::now() + crate::store::REQUEST_TIMEOUT;
        loop {
            let (n, mut state) = self.read_state()?;
            let expired = state.expire(now_ms());
            let (out, changed) = f(&mut state)?;
            if !(changed || expired) || self.commit(n, &mut state)? {
                return Ok(out);
            }
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "the store in {} was changed by other writers before every attempt of this \
                     write for {:?}",
                    self.dir.display(),
                    crate::store::REQUEST_TIMEOUT
                )));
            }
        }
    }

    /// Commits `state` as generation `base + 1`: false if another writer
    /// committed it first (or, for a writer stopped long enough, a later
    /// one), and nothing was written.
    fn commit(&self, base: u64, state: &mut State) -> Result<bool> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = commit_id(seq);
        state.commits.push_back(id);
        while state.commits.len() > COMMIT_HISTORY {
            state.commits.pop_front();
        }
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{}.{seq}", std::process::id()));
        let text = serde_json::to_vec(state).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let written = File::create(&tmp).and_then(|mut f| {
            f.write_all(&text)?;
            f.sync_all()
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err("cannot write the store", e));
        }
        // link(2) never replaces: of all writers that read generation
        // `base`, exactly one commits `base + 1`.
        let target = self.generation_path(base + 1);
        let linked = std::fs::hard_link(&tmp, &target);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            // Taken for a dead writer's and removed: write it again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("cannot commit to the store", e)),
        }
        // The link is durable only once the directory is.
        File::open(&*self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("cannot sync the store's directory", e))?;
        // A writer stopped between reading `base` and linking can find
        // `base + 1` collected and link a generation older than the newest,
        // which no one reads: it is on the line of commits only if it is
        // the newest, or the newest descends from it.
        let gens = self.generations()?;
        if gens.last().is_some_and(|&newest| newest > base + 1) {
            let (newest, head) = self.read_state()?;
            if !head.commits.contains(&id) {
                let _ = std::fs::remove_file(&target);
                if newest.saturating_sub(base + 1) >= COMMIT_HISTORY as u64 {
                    return Err(StoreError::Unavailable(format!(
                        "this process was stopped during a write to the store in {} for {} \
                         commits by others: the write may or may not have been applied",
                        self.dir.display(),
                        newest - base - 1
                    )));
                }
                return Ok(false);
            }
        }
        for &old in gens
            .iter()
            .take_while(|&&g| g + KEEP_GENERATIONS <= base + 1)
        {
            let _ = std::fs::remove_file(self.generation_path(old));
        }
        if base == 0 {
            let _ = std::fs::remove_file(self.legacy_path());
        }
        // Rarely needed (a writer killed between its write and its link):
        // looked for once every KEEP_GENERATIONS commits.
        if (base + 1) % KEEP_GENERATIONS == 0 {
            self.remove_abandoned_temporaries();
        }
        Ok(true)
    }

    /// Temporary files of writers killed before they linked theirs.
    fn remove_abandoned_temporaries(&self) {
        let Ok(dir) = std::fs::read_dir(&*self.dir) else {
            return;
        };
        for entry in dir.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > ABANDONED_AFTER);
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(TMP_PREFIX) else {
                continue;
            };
            // tmp.<pid>.<seq>: only a writer that is gone (a writer in
            // another pid namespace looks gone: it writes again).
            let pid = rest.split('.').next().unwrap_or_default();
            let gone = pid.is_empty() || !Path::new("/proc").join(pid).exists();
            if old && gone {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Reads the state, purging expired leases first if there are any.
    fn snapshot(&self) -> Result<State> {
        let (_, state) = self.read_state()?;
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
            // Every write is a new generation: unless there is one, or a
            // lease is due to expire, there is nothing to read.
            let mut seen: Option<u64> = None;
            let mut due: Option<u64> = None;
            loop {
                let now_seen = store.latest().ok();
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
    use super::*;

    #[tokio::test]
    async fn leases_of_an_earlier_boot_have_expired() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        let l = s.grant(Duration::from_secs(600)).await.unwrap();
        s.put("/k", "v", l).await.unwrap();
        assert!(s.get("/k").await.unwrap().is_some());
        // The host rebooted: the boot id changed.
        let (n, mut st) = s.read_state().unwrap();
        st.boot_id = "another boot".into();
        assert!(s.commit(n, &mut st).unwrap());
        assert!(
            s.get("/k").await.unwrap().is_none(),
            "a lease outlived a reboot"
        );
        assert!(matches!(
            s.keep_alive(l).await,
            Err(StoreError::LeaseExpired(_))
        ));
    }

    /// A writer stopped in the middle of a commit (SIGSTOP, a frozen cgroup,
    /// a stalled VM) must stop no one else from writing, and its commit,
    /// when it resumes, must not undo theirs.
    #[test]
    fn a_writer_stopped_mid_commit_blocks_no_one_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        s.update(|st| Ok((st.put("/k", "0", 0)?, true))).unwrap();
        // SAFETY: the child runs only the synchronous commit loop below and
        // never returns; the guard kills and reaps it.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            let mut i = 0u64;
            loop {
                i += 1;
                let _ = s.update(|st| Ok((st.put("/busy", &i.to_string(), 0)?, true)));
            }
        }
        struct Reap(i32);
        impl Drop for Reap {
            fn drop(&mut self) {
                // SAFETY: our own child.
                unsafe {
                    libc::kill(self.0, libc::SIGKILL);
                    libc::waitpid(self.0, std::ptr::null_mut(), 0);
                }
            }
        }
        let reap = Reap(child);
        for round in 1..=10 {
            std::thread::sleep(Duration::from_millis(30 + 7 * round));
            // SAFETY: our own child; WUNTRACED returns once it has stopped.
            unsafe {
                libc::kill(child, libc::SIGSTOP);
                let mut status = 0;
                libc::waitpid(child, &mut status, libc::WUNTRACED);
            }
            let t = std::time::Instant::now();
            let r = s.update(|st| Ok((st.put("/k", &round.to_string(), 0)?, true)));
            assert!(
                r.is_ok() && t.elapsed() < Duration::from_secs(1),
                "round {round}: a stopped writer held up a write for {:?}: {r:?}",
                t.elapsed()
            );
            // SAFETY: as above.
            unsafe { libc::kill(child, libc::SIGCONT) };
        }
        std::thread::sleep(Duration::from_millis(200));
        drop(reap);
        let (_, st) = s.read_state().unwrap();
        assert_eq!(
            st.kv("/k").unwrap().value,
            "10",
            "a resumed writer undid a commit"
        );
        assert!(st.kv("/busy").is_some());
    }

    /// Writers on several threads (as several processes would) racing on
    /// one key: every increment lands.
    #[test]
    fn racing_writers_lose_no_update() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        s.update(|st| {
                            let n: u64 = st.kv("/n").map_or(0, |kv| kv.value.parse().unwrap());
                            Ok((st.put("/n", &(n + 1).to_string(), 0)?, true))
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (_, st) = s.read_state().unwrap();
        assert_eq!(st.kv("/n").unwrap().value, "200");
        let gens = s.generations().unwrap();
        assert!(gens.len() as u64 <= KEEP_GENERATIONS + 1, "{gens:?}");
    }

    /// A writer that read a generation long since collected (stopped for a
    /// while) cannot commit over the newer ones, even though the name of
    /// the generation it would write is free again.
    #[test]
    fn a_commit_on_a_collected_generation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        s.update(|st| Ok((st.put("/k", "old", 0)?, true))).unwrap();
        let (n, mut stale) = s.read_state().unwrap();
        for i in 0..2 * KEEP_GENERATIONS {
            s.update(|st| Ok((st.put("/k", &i.to_string(), 0)?, true)))
                .unwrap();
        }
        assert!(!s.generation_path(n + 1).exists());
        stale.put("/k", "stale", 0).unwrap();
        assert!(!s.commit(n, &mut stale).unwrap());
        let (_, st) = s.read_state().unwrap();
        assert_eq!(
            st.kv("/k").unwrap().value,
            (2 * KEEP_GENERATIONS - 1).to_string()
        );
        assert!(!s.generation_path(n + 1).exists());
    }

    /// A store an earlier keelson wrote as one `store.json` is read, and
    /// its first write moves it to generations.
    #[tokio::test]
    async fn a_store_json_of_an_earlier_keelson_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = State::default();
        st.put("/k", "v", 0).unwrap();
        std::fs::write(
            dir.path().join("store.json"),
            serde_json::to_vec(&st).unwrap(),
        )
        .unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        assert_eq!(s.get("/k").await.unwrap().unwrap().value, "v");
        s.put("/j", "w", 0).await.unwrap();
        assert_eq!(s.get("/k").await.unwrap().unwrap().value, "v");
        assert!(!dir.path().join("store.json").exists());
    }
}
