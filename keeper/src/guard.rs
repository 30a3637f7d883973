//! The fence guard: a small process of its own that stops the primary
//! when its keeper cannot.
//!
//! The keeper's fence thread only runs while the keeper runs: a keeper
//! that is paused (SIGSTOP, a stalled VM) or killed leaves its PostgreSQL
//! writable to clients that connect to it directly, after the cluster may
//! have promoted another primary. So the keeper writes its fence deadline
//! to `<dir>/fence` (its pid, the postmaster's pid, and the
//! `CLOCK_BOOTTIME` millisecond at which the fence fires) whenever it
//! changes, and a guard process watches that file: once the deadline has
//! passed it gives the postmaster an immediate shutdown, and kills it and
//! its backends if it has not gone within a second.
//!
//! One guard runs per keeper directory (it holds `<dir>/fence.guard.lock`);
//! it outlives a killed keeper, and the keeper that starts next takes over
//! the file. It exits once neither the keeper nor the postmaster it names
//! runs.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

/// What the keeper writes for the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceFile {
    pub keeper_pid: u32,
    /// 0 while no primary runs.
    pub postmaster_pid: u32,
    /// `CLOCK_BOOTTIME` ms at which the primary must be stopped.
    pub deadline_ms: u64,
    /// The fence timeout in force, for the keeper's next run.
    pub fence_ms: u64,
}

impl FenceFile {
    pub fn path(dir: &Path) -> std::path::PathBuf {
        dir.join("fence")
    }

    pub fn render(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.keeper_pid, self.postmaster_pid, self.deadline_ms, self.fence_ms
        )
    }

    pub fn parse(text: &str) -> Option<FenceFile> {
        let mut it = text.split_whitespace().map(str::parse::<u64>);
        Some(FenceFile {
            keeper_pid: u32::try_from(it.next()?.ok()?).ok()?,
            postmaster_pid: u32::try_from(it.next()?.ok()?).ok()?,
            deadline_ms: it.next()?.ok()?,
            fence_ms: it.next().and_then(|v| v.ok()).unwrap_or(0),
        })
    }

    /// Writes the file atomically (a temporary file renamed into place).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join("fence.tmp");
        std::fs::write(&tmp, self.render())?;
        std::fs::rename(tmp, Self::path(dir))
    }

    pub fn read(dir: &Path) -> Option<FenceFile> {
        Self::parse(&std::fs::read_to_string(Self::path(dir)).ok()?)
    }
}

/// How often the guard looks.
const TICK: Duration = Duration::from_millis(50);

/// Runs the guard for the keeper directory `dir` until there is nothing
/// left to guard. Returns at once if another guard watches `dir`.
pub fn run(dir: &Path) -> std::io::Result<()> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("fence.guard.lock"))?;
    // SAFETY: flock on a descriptor we own; held for the process lifetime.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Ok(());
    }
    let data = dir.join("pgdata");
    let mut missing = 0u32;
    loop {
        std::thread::sleep(TICK);
        let Some(f) = FenceFile::read(dir) else {
            // No fence file (yet): the keeper writes it as it starts. Gone
            // for good (the directory was removed): nothing to guard.
            missing += 1;
            if !dir.exists() || missing > 200 {
                return Ok(());
            }
            continue;
        };
        missing = 0;
        let keeper = crate::postmaster::alive(f.keeper_pid);
        let running = crate::postmaster::running_on(&data);
        if !keeper && running.is_none() {
            return Ok(());
        }
        // The postmaster the keeper named; with the keeper dead, also one
        // it had not named yet (it died starting or promoting it), unless
        // it is a standby.
        let pm = match running {
            Some(pid) if pid == f.postmaster_pid => pid,
            Some(pid) if !keeper && !data.join("standby.signal").exists() => pid,
            _ => continue,
        };
        if crate::lease::now_ms() <= f.deadline_ms {
            continue;
        }
        eprintln!(
            "keelson fence guard: the keeper (pid {}) did not renew its lease in time: \
             stopping the primary PostgreSQL (pid {pm})",
            f.keeper_pid
        );
        crate::postmaster::fence(pm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_file_round_trips() {
        let f = FenceFile {
            keeper_pid: 12,
            postmaster_pid: 34,
            deadline_ms: 56_789,
            fence_ms: 5000,
        };
        assert_eq!(FenceFile::parse(&f.render()), Some(f));
        assert_eq!(FenceFile::parse("1 2"), None);
        assert_eq!(FenceFile::parse("1 2 3").map(|f| f.fence_ms), Some(0));
        let dir = tempfile::tempdir().unwrap();
        f.write(dir.path()).unwrap();
        assert_eq!(FenceFile::read(dir.path()), Some(f));
    }

    #[test]
    fn a_guard_whose_directory_is_gone_exits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let t = std::thread::spawn(move || run(&path));
        std::thread::sleep(Duration::from_millis(200));
        drop(dir);
        t.join().unwrap().unwrap_or(());
    }

    #[test]
    fn a_guard_with_nothing_to_guard_exits() {
        let dir = tempfile::tempdir().unwrap();
        FenceFile {
            keeper_pid: 999_999_999,
            postmaster_pid: 0,
            deadline_ms: 0,
            fence_ms: 0,
        }
        .write(dir.path())
        .unwrap();
        run(dir.path()).unwrap();
    }
}
