//! The `keelson` binary's library: command-line parsing and the wiring of
//! each role. `main` only starts tracing and calls [`run`].

pub mod admin;
pub mod args;
pub mod config;
pub mod ctl;
pub mod http;
pub mod roles;
pub mod serve;

/// The proxy's side of the HA protocol, re-exported for embedders and tests.
pub use follow;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// keelson: high availability and routing for PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "keelson", version, about)]
pub struct Cli {
    /// Log filter, as in RUST_LOG (e.g. "info" or "proxy_core=debug").
    #[arg(long, global = true, env = "KEELSON_LOG", default_value = "info")]
    pub log: String,
    /// TOML file with settings of any command: keys are flag names in snake
    /// case, at the top level or in a table named after the command
    /// (flags and KEELSON_* variables win over it).
    #[arg(long, global = true, env = "KEELSON_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up; its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the PostgreSQL proxy.
    Proxy(config::ProxyArgs),
    /// Create and inspect a cluster in the store.
    Ctl(ctl::CtlArgs),
    /// Run a keeper: manage one local PostgreSQL.
    Keeper(roles::KeeperArgs),
    /// Run a sentinel: elect the primary and fail over.
    Sentinel(roles::SentinelArgs),
    /// Run a whole local cluster (sentinel, keepers, proxy) on the file store.
    Demo(roles::DemoArgs),
    /// The keeper's fence guard (started by the keeper itself): stops the
    /// primary PostgreSQL of keeper directory DIR when its keeper stopped
    /// renewing its lease.
    #[command(hide = true)]
    KeeperGuard { dir: std::path::PathBuf },
}

/// Starts logging to stderr, in colour only on a terminal (the demo and
/// service managers send it to files).
pub fn init_tracing(filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Proxy(args) => {
            serve::run(config::ProxySettings::load(args, cli.config.as_deref())?)
        }
        Command::Ctl(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(ctl::run(args)),
        Command::Keeper(args) => roles::keeper(args),
        Command::Sentinel(args) => roles::sentinel(args),
        Command::Demo(args) => roles::demo(args),
        Command::KeeperGuard { dir } => Ok(keeper::guard::run(&dir)?),
    }
}

/// Resolves on SIGTERM or SIGINT with the signal's name.
pub async fn shutdown_signal() -> Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
