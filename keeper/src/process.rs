//! Stopping a child process politely, then firmly.

use std::process::Child;
use std::time::{Duration, Instant};

/// Sends `signal` to `child`, waits up to `grace` for it to exit, then kills
/// it. Returns whether it exited within the grace period.
pub fn terminate(child: &mut Child, signal: i32, grace: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    // SAFETY: signalling a child this process started.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}
