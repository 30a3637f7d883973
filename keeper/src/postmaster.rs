//! Finding, watching and stopping a postmaster by its pid, whether the
//! keeper started it or adopted it after a restart.
//!
//! A postmaster whose keeper dies keeps running. The next keeper must not
//! start a second one, delete its data directory, or lose the ability to
//! fence it: it finds it through `postmaster.pid` (first line: the pid;
//! second line: the data directory) and checks that the process lives and
//! runs in that data directory (a postmaster's working directory is its
//! data directory), so that a stale file whose pid was reused by another
//! process is not taken for it.

use std::path::Path;
use std::time::Duration;

/// The pid of the postmaster running on `data_dir`, if one is.
pub fn running_on(data_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let mut lines = text.lines();
    let pid: u32 = lines.next()?.trim().parse().ok()?;
    if pid == 0 {
        return None;
    }
    let dir = Path::new(lines.next()?.trim());
    let want = std::fs::canonicalize(dir).ok()?;
    let have = std::fs::canonicalize(data_dir).ok()?;
    if want != have || !alive(pid) {
        return None;
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    (cwd == have).then_some(pid)
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

/// The pids whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Sends `signal` to every process of the process group `pgid`.
pub fn signal_group(pgid: u32, signal: i32) {
    // SAFETY: kill(2) with a negative pid (a process group) and a signal
    // number has no memory effects.
    unsafe {
        libc::kill(-(pgid as i32), signal);
    }
}

/// SIGKILLs a postmaster and its children. A SIGKILLed postmaster does not
/// end its backends itself; they would go on serving (and committing) for
/// as long as they take to notice. SIGKILL also ends a stopped (SIGSTOP)
/// process, which SIGQUIT does not.
///
/// The postmaster is stopped first (SIGSTOP, then up to 20 ms until the
/// kernel reports it stopped): a running one forks a backend for every
/// connection, and one forked between listing the children and killing
/// the parent would outlive both. A stopped process forks nothing, and
/// its children are still its own (a dead one's go to init). The 20 ms
/// bound keeps [`fence`] (a 50 ms watchdog tick, 300 ms for SIGQUIT, then
/// this) well inside `FENCE_SLACK` (500 ms): a postmaster that does not
/// stop in time is in uninterruptible sleep, where it forks nothing either.
pub fn kill_tree(pid: u32) {
    signal(pid, libc::SIGSTOP);
    let deadline = std::time::Instant::now() + Duration::from_millis(20);
    while !matches!(state(pid), None | Some('T' | 't' | 'Z' | 'X'))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let kids = children(pid);
    signal(pid, libc::SIGKILL);
    for k in kids {
        signal(k, libc::SIGKILL);
    }
}

/// The state letter of process `pid` (`R`, `S`, `T`, `Z`, ...), if it
/// exists.
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().next()?.chars().next()
}

/// Fences a primary at once: SIGQUIT (immediate shutdown) to the
/// postmaster *and* its backends, so that they stop even if the postmaster
/// itself cannot act on the signal (it is stopped or hung); then, if it
/// has not gone within 300 ms, SIGKILL to all of them. Blocking.
pub fn fence(pid: u32) {
    let kids = children(pid);
    signal(pid, libc::SIGQUIT);
    for k in kids {
        signal(k, libc::SIGQUIT);
    }
    let deadline = std::time::Instant::now() + Duration::from_millis(300);
    while alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if alive(pid) {
        kill_tree(pid);
    }
}

/// Waits until `pid` has exited, up to `limit`. True if it has.
pub async fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while alive(pid) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_pid_file_names_no_postmaster() {
        let dir = tempfile::tempdir().unwrap();
        // This process is alive but does not run in `dir`.
        let me = std::process::id();
        std::fs::write(
            dir.path().join("postmaster.pid"),
            format!("{me}\n{}\n", dir.path().display()),
        )
        .unwrap();
        assert_eq!(running_on(dir.path()), None);
        std::fs::write(dir.path().join("postmaster.pid"), "999999999\n/x\n").unwrap();
        assert_eq!(running_on(dir.path()), None);
        assert!(alive(me));
        assert!(!alive(999_999_999));
    }

    #[test]
    fn a_process_in_the_data_directory_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(dir.path())
            .spawn()
            .unwrap();
        std::fs::write(
            dir.path().join("postmaster.pid"),
            format!("{}\n{}\n", child.id(), dir.path().display()),
        )
        .unwrap();
        assert_eq!(running_on(dir.path()), Some(child.id()));
        assert!(children(std::process::id()).contains(&child.id()));
        kill_tree(child.id());
        let _ = child.wait();
        assert_eq!(running_on(dir.path()), None);
    }

    /// The pids whose command line has `arg` as an argument.
    fn with_arg(arg: &str) -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
            })
            .collect()
    }

    /// A postmaster forks a backend for every connection. One forked while
    /// `kill_tree` lists the children must not survive it: a backend whose
    /// postmaster was SIGKILLed serves (and commits) until it notices.
    #[test]
    fn a_child_forked_while_the_tree_is_killed_is_killed_too() {
        // Unique, so that only this test's children match.
        let mark = format!("{}.{}", 900 + std::process::id() % 99, std::process::id());
        // At most 20,000 children (seconds of forking: still at it when
        // killed).
        let mut parent = std::process::Command::new("sh")
            .args([
                "-c",
                &format!("i=0; while [ $i -lt 20000 ]; do sleep {mark} & i=$((i+1)); done"),
            ])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let forked = !with_arg(&mark).is_empty();
        kill_tree(parent.id());
        let _ = parent.wait();
        std::thread::sleep(Duration::from_millis(100));
        let left = with_arg(&mark);
        for p in &left {
            signal(*p, libc::SIGKILL);
        }
        assert!(forked, "the parent forked nothing");
        assert!(
            left.is_empty(),
            "{} children outlived kill_tree",
            left.len()
        );
    }
}
