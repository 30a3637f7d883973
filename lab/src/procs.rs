//! The lab's processes: each runs in its host's namespace, logs to a file,
//! and can be killed, paused, resumed and started again.

use std::path::PathBuf;
use std::process::{Child, Stdio};

use anyhow::{Context, Result};

use crate::net::Host;

/// One process of the lab.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub host: Host,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Extra environment (libfaketime for a skewed clock).
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn new(
        name: &str,
        host: &Host,
        program: impl Into<PathBuf>,
        args: Vec<String>,
        log: PathBuf,
    ) -> Proc {
        Proc {
            name: name.to_owned(),
            host: host.clone(),
            program: program.into(),
            args,
            env: Vec::new(),
            log,
            child: None,
        }
    }

    pub fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut c = self.host.command(&self.program);
        c.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let child = c
            .spawn()
            .with_context(|| format!("cannot start {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// The pid (that of the program itself: `ip netns exec` execs it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) has no memory effects.
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: as above.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.start()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A finished command's standard output, then its standard error.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
