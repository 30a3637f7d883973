//! Configuration of `keelson proxy`, loaded in two steps.
//!
//! 1. [`ProxyArgs`] holds raw values from flags and `KEELSON_*` environment
//!    variables (clap reads both; a flag wins over its variable), and
//!    [`FileConfig`] holds those of the TOML file given by `--config`.
//! 2. [`ProxySettings::resolve`] merges them, flag/env over file over
//!    default, and validates everything into typed values that need no
//!    further parsing.
//!
//! Durations are humantime strings (`10s`, `1m30s`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Flags of `keelson proxy`. Every one can also come from `KEELSON_<FLAG>`
/// or the config file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ProxyArgs {
    /// TOML file with any of these settings (flags and env win over it).
    #[arg(long, env = "KEELSON_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to accept PostgreSQL clients on [default: 127.0.0.1:6432].
    #[arg(long, env = "KEELSON_LISTEN")]
    pub listen: Option<String>,
    /// The PostgreSQL server to send sessions to, as HOST:PORT (static mode).
    #[arg(long, env = "KEELSON_BACKEND")]
    pub backend: Option<String>,
    /// Cluster store to follow instead of a fixed backend: file:///dir or
    /// etcd://host:2379[,host:2379...].
    #[arg(long, env = "KEELSON_STORE")]
    pub store: Option<String>,
    /// Name of the cluster in the store (with --store).
    #[arg(long, env = "KEELSON_CLUSTER")]
    pub cluster: Option<String>,
    /// Key prefix in the store [default: keelson].
    #[arg(long, env = "KEELSON_PREFIX")]
    pub prefix: Option<String>,
    /// This proxy's name in the store [default: proxy-<hostname>-<pid>].
    #[arg(long, env = "KEELSON_UID")]
    pub uid: Option<String>,
    /// Address for /metrics and /healthz; off unless set.
    #[arg(long, env = "KEELSON_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// PEM certificate chain for TLS to clients (needs --tls-key).
    #[arg(long, env = "KEELSON_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS to clients (needs --tls-cert).
    #[arg(long, env = "KEELSON_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Client connections open at once before new ones get 53300 [default: 10000].
    #[arg(long, env = "KEELSON_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Time a client has to complete the startup phase [default: 10s].
    #[arg(long, env = "KEELSON_STARTUP_TIMEOUT")]
    pub startup_timeout: Option<String>,
    /// Time to open a connection to the backend [default: 5s].
    #[arg(long, env = "KEELSON_CONNECT_TIMEOUT")]
    pub connect_timeout: Option<String>,
    /// Time to complete authentication with the backend [default: 60s].
    #[arg(long, env = "KEELSON_AUTH_TIMEOUT")]
    pub auth_timeout: Option<String>,
    /// On SIGTERM/SIGINT, time sessions get to finish before they are closed [default: 30s].
    #[arg(long, env = "KEELSON_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// TCP keepalive idle time on both sockets; "off" to disable [default: 60s].
    #[arg(long, env = "KEELSON_KEEPALIVE_IDLE")]
    pub keepalive_idle: Option<String>,
    /// TCP keepalive probe interval [default: 10s].
    #[arg(long, env = "KEELSON_KEEPALIVE_INTERVAL")]
    pub keepalive_interval: Option<String>,
    /// Cancel requests forwarded per second [default: 100].
    #[arg(long, env = "KEELSON_CANCEL_RATE")]
    pub cancel_rate: Option<u32>,
    /// Worker threads, each with its own event loop and listener socket
    /// [default: the number of CPUs].
    #[arg(long, env = "KEELSON_WORKERS")]
    pub workers: Option<usize>,
}

/// The same settings, from a TOML file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub backend: Option<String>,
    pub store: Option<String>,
    pub cluster: Option<String>,
    pub prefix: Option<String>,
    pub uid: Option<String>,
    pub admin_listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub max_connections: Option<usize>,
    pub startup_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub auth_timeout: Option<String>,
    pub shutdown_grace: Option<String>,
    pub keepalive_idle: Option<String>,
    pub keepalive_interval: Option<String>,
    pub cancel_rate: Option<u32>,
    pub workers: Option<usize>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("could not read the config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        Ok(toml::from_str(text)?)
    }
}

/// Where the proxy learns which server is the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A fixed backend, `host:port`.
    Static(String),
    /// Follow a cluster in a store.
    Store {
        url: String,
        cluster: String,
        prefix: String,
        uid: String,
    },
}

/// Validated settings of one proxy process.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    pub source: Source,
    pub admin_listen: Option<SocketAddr>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub max_connections: usize,
    pub startup_timeout: Duration,
    pub connect_timeout: Duration,
    pub auth_timeout: Duration,
    pub shutdown_grace: Duration,
    pub keepalive: Option<(Duration, Duration)>,
    pub cancel_rate_per_second: u32,
    pub workers: usize,
}

/// A name for this proxy that is unique on the host.
pub fn default_uid() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("proxy-{}-{}", host.trim(), std::process::id())
}

fn duration(name: &str, v: Option<String>, default: &str) -> Result<Duration> {
    let s = v.unwrap_or_else(|| default.to_owned());
    humantime::parse_duration(&s).with_context(|| {
        format!("{name} = {s:?} is not a duration; write it like \"10s\" or \"1m30s\"")
    })
}

fn socket_addr(name: &str, s: &str) -> Result<SocketAddr> {
    s.parse().with_context(|| {
        format!("{name} = {s:?} is not an IP address and port, such as 127.0.0.1:6432")
    })
}

impl ProxySettings {
    /// Merges flags/env over the file over defaults, and validates.
    pub fn resolve(args: ProxyArgs, file: FileConfig) -> Result<Self> {
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:6432".into());
        let listen = socket_addr("listen", &listen)?;
        let source = match (args.backend.or(file.backend), args.store.or(file.store)) {
            (Some(_), Some(_)) => bail!("give either backend (static mode) or store (follow a cluster), not both"),
            (None, None) => bail!(
                "no backend given: pass --backend HOST:PORT for a fixed server, or --store URL --cluster NAME to follow a cluster (or set them in the environment or the config file)"
            ),
            (Some(backend), None) => {
                match backend.rsplit_once(':') {
                    Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
                    _ => bail!("backend = {backend:?} must be HOST:PORT, such as 127.0.0.1:5432"),
                }
                Source::Static(backend)
            }
            (None, Some(url)) => {
                let Some(cluster) = args.cluster.or(file.cluster) else {
                    bail!("--store needs --cluster NAME: the name of the cluster to follow");
                };
                let uid = args.uid.or(file.uid).unwrap_or_else(default_uid);
                Source::Store {
                    url,
                    cluster,
                    prefix: args.prefix.or(file.prefix).unwrap_or_else(|| "keelson".into()),
                    uid,
                }
            }
        };
        let admin_listen = args
            .admin_listen
            .or(file.admin_listen)
            .map(|a| socket_addr("admin_listen", &a))
            .transpose()?;
        let tls = match (
            args.tls_cert.or(file.tls_cert),
            args.tls_key.or(file.tls_key),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => bail!("TLS needs both tls_cert and tls_key"),
        };
        let max_connections = args
            .max_connections
            .or(file.max_connections)
            .unwrap_or(10_000);
        if max_connections == 0 {
            bail!("max_connections must be at least 1");
        }
        let keepalive_idle = args.keepalive_idle.or(file.keepalive_idle);
        let keepalive = if keepalive_idle.as_deref() == Some("off") {
            None
        } else {
            Some((
                duration("keepalive_idle", keepalive_idle, "60s")?,
                duration(
                    "keepalive_interval",
                    args.keepalive_interval.or(file.keepalive_interval),
                    "10s",
                )?,
            ))
        };
        let workers = args
            .workers
            .or(file.workers)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if workers == 0 {
            bail!("workers must be at least 1");
        }
        Ok(ProxySettings {
            listen,
            source,
            admin_listen,
            tls,
            max_connections,
            startup_timeout: duration(
                "startup_timeout",
                args.startup_timeout.or(file.startup_timeout),
                "10s",
            )?,
            connect_timeout: duration(
                "connect_timeout",
                args.connect_timeout.or(file.connect_timeout),
                "5s",
            )?,
            auth_timeout: duration(
                "auth_timeout",
                args.auth_timeout.or(file.auth_timeout),
                "60s",
            )?,
            shutdown_grace: duration(
                "shutdown_grace",
                args.shutdown_grace.or(file.shutdown_grace),
                "30s",
            )?,
            keepalive,
            cancel_rate_per_second: args.cancel_rate.or(file.cancel_rate).unwrap_or(100),
            workers,
        })
    }

    /// Loads the file named by `--config` (if any) and resolves.
    pub fn load(args: ProxyArgs) -> Result<Self> {
        let file = match &args.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        Self::resolve(args, file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_over_defaults() {
        let file = FileConfig::parse(
            r#"
            listen = "0.0.0.0:7000"
            backend = "db:5432"
            startup_timeout = "3s"
            max_connections = 5
            "#,
        )
        .unwrap();
        let args = ProxyArgs {
            listen: Some("127.0.0.1:7001".into()),
            ..Default::default()
        };
        let s = ProxySettings::resolve(args, file).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:7001");
        assert_eq!(s.source, Source::Static("db:5432".into()));
        assert_eq!(s.startup_timeout, Duration::from_secs(3));
        assert_eq!(s.max_connections, 5);
        assert_eq!(s.connect_timeout, Duration::from_secs(5));
        assert_eq!(s.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn clear_errors() {
        let err = |args: ProxyArgs| {
            ProxySettings::resolve(args, FileConfig::default())
                .unwrap_err()
                .to_string()
        };
        assert!(err(ProxyArgs::default()).contains("no backend given"));
        let bad_backend = ProxyArgs {
            backend: Some("nope".into()),
            ..Default::default()
        };
        assert!(err(bad_backend).contains("HOST:PORT"));
        let bad_duration = ProxyArgs {
            backend: Some("h:1".into()),
            startup_timeout: Some("ten".into()),
            ..Default::default()
        };
        let e = ProxySettings::resolve(bad_duration, FileConfig::default()).unwrap_err();
        assert!(format!("{e:#}").contains("startup_timeout"));
        assert!(FileConfig::parse("bogus = 1").is_err());
        let both = ProxyArgs {
            backend: Some("h:1".into()),
            store: Some("file:///x".into()),
            ..Default::default()
        };
        assert!(err(both).contains("not both"));
        let no_cluster = ProxyArgs {
            store: Some("file:///x".into()),
            ..Default::default()
        };
        assert!(err(no_cluster).contains("--cluster"));
    }
}
