//! Configuration of `keelson proxy`, loaded in two steps.
//!
//! 1. [`ProxyArgs`] is the one schema of its settings: clap reads them from
//!    flags, `KEELSON_*` variables and the `--config` file (laid under them,
//!    see `args.rs`). The file's structured sections (`[[listeners]]`,
//!    `[[rules]]`, `[sni]`) are [`FileConfig`].
//! 2. [`ProxySettings::resolve`] applies the defaults, which come from one
//!    table ([`default_of`], itself [`ProxyConfig::default`] and two
//!    constants), and validates everything into typed values.
//!
//! Durations are humantime strings (`10s`, `1m30s`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use proxy_core::ProxyConfig;
use serde::Deserialize;

/// Where the proxy listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6432";
/// How long sessions get to finish on SIGTERM/SIGINT unless told otherwise.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The default of each `keelson proxy` flag that has one, as written on the
/// command line: the one table the help text, the resolver and the check of
/// docs/configuration.md use.
pub fn default_of(flag: &str) -> Option<String> {
    let d = ProxyConfig::default();
    let dur = |d: Duration| humantime::format_duration(d).to_string();
    Some(match flag {
        "listen" => DEFAULT_LISTEN.into(),
        "prefix" => cluster::store::DEFAULT_PREFIX.into(),
        "max-connections" => d.max_connections.to_string(),
        "startup-timeout" => dur(d.startup_timeout),
        "connect-timeout" => dur(d.connect_timeout),
        "auth-timeout" => dur(d.auth_timeout),
        "shutdown-grace" => dur(DEFAULT_SHUTDOWN_GRACE),
        "shutdown-delay" => dur(Duration::ZERO),
        "keepalive-idle" => dur(d.socket.keepalive.map_or(Duration::ZERO, |k| k.0)),
        "keepalive-interval" => dur(d.socket.keepalive.map_or(Duration::ZERO, |k| k.1)),
        "cancel-rate" => d.cancel_rate_per_second.to_string(),
        "max-replica-lag-bytes" => d.replica_lag.bytes.to_string(),
        "max-replica-lag" => dur(d.replica_lag.time),
        "replica-lag-fence" => d.replica_lag_fence.to_string(),
        "error-detail" => d.error_detail.to_string(),
        "forwarding" => proxy_core::ForwardingMode::default().as_str().into(),
        _ => return None,
    })
}

/// `text`, followed by the flag's default.
fn with_default(text: &str, flag: &str) -> String {
    match default_of(flag) {
        Some(d) => format!("{text} [default: {d}]"),
        None => text.to_owned(),
    }
}

/// Flags of `keelson proxy`. Every one can also come from `KEELSON_<FLAG>`
/// or the config file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ProxyArgs {
    #[arg(long, env = "KEELSON_LISTEN", help = with_default("Address to accept PostgreSQL clients on.", "listen"))]
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
    #[arg(long, env = "KEELSON_PREFIX", help = with_default("Key prefix in the store.", "prefix"))]
    pub prefix: Option<String>,
    /// This proxy's name in the store [default: proxy-<hostname>-<pid>].
    #[arg(long, env = "KEELSON_UID")]
    pub uid: Option<String>,
    #[command(flatten)]
    pub store_security: crate::args::StoreSecurityArgs,
    /// Address for /metrics and /healthz; off unless set.
    #[arg(long, env = "KEELSON_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// PEM certificate chain for TLS to clients (needs --tls-key).
    #[arg(long, env = "KEELSON_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS to clients (needs --tls-cert).
    #[arg(long, env = "KEELSON_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// TLS on the connections to PostgreSQL: disable, require, verify-ca or
    /// verify-full (as libpq's sslmode) [default: disable].
    #[arg(long, env = "KEELSON_BACKEND_TLS")]
    pub backend_tls: Option<String>,
    /// CA certificates (PEM) the servers' certificates must chain to
    /// (verify-ca, verify-full).
    #[arg(long, env = "KEELSON_BACKEND_TLS_CA_FILE")]
    pub backend_tls_ca_file: Option<PathBuf>,
    #[arg(long, env = "KEELSON_MAX_CONNECTIONS", help = with_default("Client connections open at once before new ones get 53300.", "max-connections"))]
    pub max_connections: Option<usize>,
    #[arg(long, env = "KEELSON_STARTUP_TIMEOUT", help = with_default("Time a client has to complete the startup phase.", "startup-timeout"))]
    pub startup_timeout: Option<String>,
    #[arg(long, env = "KEELSON_CONNECT_TIMEOUT", help = with_default("Time to open a connection to the backend.", "connect-timeout"))]
    pub connect_timeout: Option<String>,
    #[arg(long, env = "KEELSON_AUTH_TIMEOUT", help = with_default("Time to complete authentication with the backend.", "auth-timeout"))]
    pub auth_timeout: Option<String>,
    #[arg(long, env = "KEELSON_SHUTDOWN_GRACE", help = with_default("On SIGTERM/SIGINT, time sessions get to finish before they are closed.", "shutdown-grace"))]
    pub shutdown_grace: Option<String>,
    #[arg(long, env = "KEELSON_SHUTDOWN_DELAY", help = with_default("On SIGTERM/SIGINT, time the proxy still accepts new sessions (its readiness already failing, so that a load balancer or Kubernetes Service stops sending it clients) before it stops accepting and the grace begins.", "shutdown-delay"))]
    pub shutdown_delay: Option<String>,
    #[arg(long, env = "KEELSON_KEEPALIVE_IDLE", help = with_default("TCP keepalive idle time on both sockets; \"off\" to disable.", "keepalive-idle"))]
    pub keepalive_idle: Option<String>,
    #[arg(long, env = "KEELSON_KEEPALIVE_INTERVAL", help = with_default("TCP keepalive probe interval.", "keepalive-interval"))]
    pub keepalive_interval: Option<String>,
    #[arg(long, env = "KEELSON_CANCEL_RATE", help = with_default("Cancel requests of unknown keys broadcast per second.", "cancel-rate"))]
    pub cancel_rate: Option<u32>,
    /// Worker threads, each with its own event loop and listener socket
    /// [default: half the CPUs, at least 1].
    #[arg(long, env = "KEELSON_WORKERS")]
    pub workers: Option<usize>,
    /// A second address whose sessions go to replicas by default.
    #[arg(long, env = "KEELSON_REPLICA_LISTEN")]
    pub replica_listen: Option<String>,
    /// Static mode: standbys for replica routes, as HOST:PORT,HOST:PORT
    /// (no lag information; follow a store for lag limits).
    #[arg(long, env = "KEELSON_REPLICAS", value_delimiter = ',')]
    pub replicas: Option<Vec<String>>,
    #[arg(long, env = "KEELSON_MAX_REPLICA_LAG_BYTES", help = with_default("Replicas further behind the primary than this many WAL bytes get no new sessions.", "max-replica-lag-bytes"))]
    pub max_replica_lag_bytes: Option<u64>,
    #[arg(long, env = "KEELSON_MAX_REPLICA_LAG", help = with_default("Replicas whose replay is behind by more than this time get no new sessions.", "max-replica-lag"))]
    pub max_replica_lag: Option<String>,
    #[arg(long, env = "KEELSON_REPLICA_LAG_FENCE", help = with_default("Also end the sessions of a replica that falls beyond the lag limits.", "replica-lag-fence"))]
    pub replica_lag_fence: Option<bool>,
    #[arg(long, env = "KEELSON_ERROR_DETAIL", help = with_default("Send refused clients the full error (backend address, OS error) as the ErrorResponse detail.", "error-detail"))]
    pub error_detail: Option<bool>,
    #[arg(long, env = "KEELSON_FORWARDING", help = with_default("How established sessions move their bytes: \"userspace\", or \"kernel\" (plaintext sessions handed to a BPF sockhash after authentication, on Linux as root; TLS sessions, and every session where the kernel cannot, stay in user space). Applies to `listen` and `replica_listen`; `[[listeners]]` take theirs from this unless they set `forwarding`.", "forwarding"))]
    pub forwarding: Option<String>,
    /// Accept PROXY protocol v2 headers from these networks (comma
    /// separated CIDRs), and require them from there; off unless set.
    #[arg(long, env = "KEELSON_PROXY_PROTOCOL_TRUSTED", value_delimiter = ',')]
    pub proxy_protocol_trusted: Option<Vec<String>>,
}

/// The structured sections of the proxy's config file, at its top level
/// or in its `[proxy]` table. Its other keys are flags (`args.rs`).
#[derive(Debug, Default, Clone, Deserialize)]
pub struct FileConfig {
    /// More listeners, each with its own default route.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// Routing rules, first match wins.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// SNI routing: TLS server name -> name of a cluster in the same store.
    #[serde(default)]
    pub sni: std::collections::BTreeMap<String, String>,
    /// TLS to PostgreSQL per cluster (`[cluster_backend_tls.NAME]`),
    /// instead of `backend_tls` for that cluster's servers.
    #[serde(default)]
    pub cluster_backend_tls: std::collections::BTreeMap<String, BackendTlsConfig>,
}

/// `[cluster_backend_tls.NAME]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsConfig {
    /// `disable`, `require`, `verify-ca` or `verify-full`.
    pub mode: String,
    pub ca_file: Option<PathBuf>,
}

/// `[[listeners]]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub listen: String,
    #[serde(default)]
    pub route: Option<String>,
    /// Whether PROXY protocol applies here (when trusted networks are set)
    /// [default: true].
    #[serde(default)]
    pub proxy_protocol: Option<bool>,
    /// `userspace` or `kernel` [default: the `forwarding` setting].
    #[serde(default)]
    pub forwarding: Option<String>,
}

/// `[[rules]]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub database: Option<String>,
    pub user: Option<String>,
    pub application_name: Option<String>,
    /// Client network, such as 10.0.0.0/8.
    pub source: Option<String>,
    pub route: String,
}

/// One validated listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub route: proxy_core::Route,
    pub proxy_protocol: bool,
    pub forwarding: proxy_core::ForwardingMode,
}

fn parse_forwarding(where_: &str, s: &str) -> Result<proxy_core::ForwardingMode> {
    proxy_core::ForwardingMode::parse(s)
        .with_context(|| format!("{where_}: forwarding {s:?} is not one of userspace, kernel"))
}

fn parse_route(where_: &str, s: &str) -> Result<proxy_core::Route> {
    proxy_core::Route::parse(s).with_context(|| {
        format!("{where_}: route {s:?} is not one of primary, replica, prefer-replica, any")
    })
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("could not read the config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text)?;
        let mut sections = toml::Table::new();
        if let Some(toml::Value::Table(proxy)) = table.remove("proxy") {
            sections.extend(proxy);
        }
        sections.extend(table);
        sections.retain(|k, _| crate::args::PROXY_SECTIONS.contains(&k));
        Ok(sections.try_into()?)
    }
}

/// Where the proxy learns which server is the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A fixed backend, `host:port`, and fixed replicas.
    Static(String, Vec<String>),
    /// Follow a cluster in a store.
    Store {
        url: String,
        cluster: String,
        prefix: String,
        uid: String,
        /// TLS and the user for etcd.
        security: cluster::etcd::EtcdSecurity,
    },
}

/// Validated settings of one proxy process.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub source: Source,
    pub admin_listen: Option<SocketAddr>,
    pub tls: Option<(PathBuf, PathBuf)>,
    /// TLS to PostgreSQL: its mode and CA file.
    pub backend_tls: Option<(proxy_core::tls::BackendTlsMode, Option<PathBuf>)>,
    /// ... per cluster, instead of `backend_tls` (`None`: plain TCP).
    pub cluster_backend_tls: std::collections::BTreeMap<
        String,
        Option<(proxy_core::tls::BackendTlsMode, Option<PathBuf>)>,
    >,
    pub max_connections: usize,
    pub startup_timeout: Duration,
    pub connect_timeout: Duration,
    pub auth_timeout: Duration,
    pub shutdown_grace: Duration,
    pub shutdown_delay: Duration,
    pub keepalive: Option<(Duration, Duration)>,
    pub cancel_rate_per_second: u32,
    pub workers: usize,
    /// Every listener; the first is `listen` (primary route).
    pub listeners: Vec<Listener>,
    pub rules: Vec<proxy_core::Rule>,
    pub replica_lag: proxy_core::LagLimit,
    pub replica_lag_fence: bool,
    /// Refused clients get the full error as the ErrorResponse detail.
    pub error_detail: bool,
    /// Networks trusted to send PROXY protocol headers; empty = off.
    pub proxy_protocol_trusted: Vec<ipnet::IpNet>,
    /// SNI routing: server name -> cluster name (store mode).
    pub sni: std::collections::BTreeMap<String, String>,
}

/// A backend TLS mode and CA file, checked (`what` names the setting).
fn backend_tls_setting(
    what: &str,
    ca_name: &str,
    mode: Option<&str>,
    ca: Option<PathBuf>,
) -> Result<Option<(proxy_core::tls::BackendTlsMode, Option<PathBuf>)>> {
    match mode.unwrap_or("disable") {
        "disable" => {
            if ca.is_some() {
                bail!("{ca_name} is for {what} = verify-ca or verify-full");
            }
            Ok(None)
        }
        m => {
            let mode: proxy_core::tls::BackendTlsMode = m
                .parse()
                .map_err(|e: String| anyhow::anyhow!("{what}: {e}"))?;
            if mode != proxy_core::tls::BackendTlsMode::Require && ca.is_none() {
                bail!(
                    "{what} = {m} needs {ca_name}: the CA the servers' certificates must chain to"
                );
            }
            Ok(Some((mode, ca)))
        }
    }
}

/// A name for this proxy that is unique on the host.
pub fn default_uid() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("proxy-{}-{}", host.trim(), std::process::id())
}

/// The duration setting `name` (its file key), or its default. Longer
/// than [`cluster::data::MAX_DURATION`] is refused: deadlines are computed
/// by adding it to the clock, which must not overflow.
fn duration(name: &str, v: Option<String>) -> Result<Duration> {
    let s = v
        .or_else(|| default_of(&name.replace('_', "-")))
        .unwrap_or_default();
    let d = humantime::parse_duration(&s).with_context(|| {
        format!("{name} = {s:?} is not a duration; write it like \"10s\" or \"1m30s\"")
    })?;
    let max = cluster::data::MAX_DURATION;
    if d > max {
        bail!(
            "{name} = {s:?} is longer than the limit of {}",
            humantime::format_duration(max)
        );
    }
    Ok(d)
}

fn socket_addr(name: &str, s: &str) -> Result<SocketAddr> {
    s.parse().with_context(|| {
        format!("{name} = {s:?} is not an IP address and port, such as 127.0.0.1:6432")
    })
}

impl ProxySettings {
    /// Merges flags/env over the file over defaults, and validates.
    pub fn resolve(args: ProxyArgs, file: FileConfig) -> Result<Self> {
        let defaults = ProxyConfig::default();
        let listen = args.listen.unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = socket_addr("listen", &listen)?;
        let source = match (args.backend, args.store) {
            (Some(_), Some(_)) => bail!("give either backend (static mode) or store (follow a cluster), not both"),
            (None, None) => bail!(
                "no backend given: pass --backend HOST:PORT for a fixed server, or --store URL --cluster NAME to follow a cluster (or set them in the environment or the config file)"
            ),
            (Some(backend), None) => {
                let host_port = |name: &str, a: &str| -> Result<()> {
                    match a.rsplit_once(':') {
                        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                            Ok(())
                        }
                        _ => bail!("{name} = {a:?} must be HOST:PORT, such as 127.0.0.1:5432"),
                    }
                };
                host_port("backend", &backend)?;
                let replicas = args.replicas.clone().unwrap_or_default();
                for r in &replicas {
                    host_port("replicas", r)?;
                }
                Source::Static(backend, replicas)
            }
            (None, Some(url)) => {
                if args.replicas.is_some() {
                    bail!("replicas are for static mode; in store mode the cluster names them");
                }
                let Some(cluster) = args.cluster else {
                    bail!("--store needs --cluster NAME: the name of the cluster to follow");
                };
                let uid = args.uid.unwrap_or_else(default_uid);
                Source::Store {
                    url,
                    cluster,
                    prefix: args.prefix.unwrap_or_else(|| cluster::store::DEFAULT_PREFIX.into()),
                    uid,
                    security: args.store_security.load()?,
                }
            }
        };
        let admin_listen = args
            .admin_listen
            .map(|a| socket_addr("admin_listen", &a))
            .transpose()?;
        let tls = match (args.tls_cert, args.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => bail!("TLS needs both tls_cert and tls_key"),
        };
        let backend_tls = backend_tls_setting(
            "backend_tls",
            "backend_tls_ca_file",
            args.backend_tls.as_deref(),
            args.backend_tls_ca_file,
        )?;
        let max_connections = args.max_connections.unwrap_or(defaults.max_connections);
        if max_connections == 0 {
            bail!("max_connections must be at least 1");
        }
        let keepalive_idle = args.keepalive_idle;
        let keepalive = if keepalive_idle.as_deref() == Some("off") {
            None
        } else {
            Some((
                duration("keepalive_idle", keepalive_idle)?,
                duration("keepalive_interval", args.keepalive_interval)?,
            ))
        };
        let workers = args.workers.unwrap_or_else(default_workers);
        if workers == 0 {
            bail!("workers must be at least 1");
        }
        let forwarding = match &args.forwarding {
            Some(f) => parse_forwarding("forwarding", f)?,
            None => proxy_core::ForwardingMode::default(),
        };
        let mut listeners = vec![Listener {
            addr: listen,
            route: proxy_core::Route::Primary,
            proxy_protocol: true,
            forwarding,
        }];
        if let Some(r) = args.replica_listen {
            listeners.push(Listener {
                addr: socket_addr("replica_listen", &r)?,
                route: proxy_core::Route::Replica,
                proxy_protocol: true,
                forwarding,
            });
        }
        for (i, l) in file.listeners.iter().enumerate() {
            let name = format!("listeners[{i}]");
            listeners.push(Listener {
                addr: socket_addr(&name, &l.listen)?,
                route: match &l.route {
                    Some(r) => parse_route(&name, r)?,
                    None => proxy_core::Route::Primary,
                },
                proxy_protocol: l.proxy_protocol.unwrap_or(true),
                forwarding: match &l.forwarding {
                    Some(f) => parse_forwarding(&name, f)?,
                    None => forwarding,
                },
            });
        }
        for (i, a) in listeners.iter().enumerate() {
            if listeners[..i]
                .iter()
                .any(|b| b.addr == a.addr && a.addr.port() != 0)
            {
                bail!("{} is listed twice among the listen addresses", a.addr);
            }
        }
        let rules = file
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let name = format!("rules[{i}]");
                Ok(proxy_core::Rule {
                    database: r.database.clone(),
                    user: r.user.clone(),
                    application_name: r.application_name.clone(),
                    source: r
                        .source
                        .as_deref()
                        .map(|s| {
                            s.parse().with_context(|| {
                                format!("{name}: source {s:?} is not a network such as 10.0.0.0/8")
                            })
                        })
                        .transpose()?,
                    route: parse_route(&name, &r.route)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let default_lag = defaults.replica_lag;
        let replica_lag = proxy_core::LagLimit {
            bytes: args.max_replica_lag_bytes.unwrap_or(default_lag.bytes),
            time: duration("max_replica_lag", args.max_replica_lag)?,
        };
        let proxy_protocol_trusted = args
            .proxy_protocol_trusted
            .unwrap_or_default()
            .iter()
            .map(|s| s.trim())
            // An empty list in the file is no network (off).
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .with_context(|| {
                        format!("proxy_protocol_trusted: {s:?} is not a network such as 10.0.0.0/8")
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        if !file.sni.is_empty() && !matches!(source, Source::Store { .. }) {
            bail!("sni routing needs store mode: each server name names a cluster in the store");
        }
        if !file.sni.is_empty() && tls.is_none() {
            bail!("sni routing needs TLS (tls_cert and tls_key)");
        }
        let mut cluster_backend_tls = std::collections::BTreeMap::new();
        for (name, c) in file.cluster_backend_tls {
            let own = matches!(&source, Source::Store { cluster, .. } if *cluster == name);
            if !own && !file.sni.values().any(|v| *v == name) {
                bail!(
                    "cluster_backend_tls.{name}: no cluster of this proxy is named {name:?} \
                     (its own, or one an [sni] entry names)"
                );
            }
            let what = format!("cluster_backend_tls.{name}.mode");
            let ca_name = format!("cluster_backend_tls.{name}.ca_file");
            let t = backend_tls_setting(&what, &ca_name, Some(&c.mode), c.ca_file)?;
            cluster_backend_tls.insert(name, t);
        }
        Ok(ProxySettings {
            listeners,
            rules,
            replica_lag,
            replica_lag_fence: args.replica_lag_fence.unwrap_or(defaults.replica_lag_fence),
            error_detail: args.error_detail.unwrap_or(defaults.error_detail),
            proxy_protocol_trusted,
            sni: file.sni,
            source,
            admin_listen,
            tls,
            backend_tls,
            cluster_backend_tls,
            max_connections,
            startup_timeout: duration("startup_timeout", args.startup_timeout)?,
            connect_timeout: duration("connect_timeout", args.connect_timeout)?,
            auth_timeout: duration("auth_timeout", args.auth_timeout)?,
            shutdown_grace: duration("shutdown_grace", args.shutdown_grace)?,
            shutdown_delay: duration("shutdown_delay", args.shutdown_delay)?,
            keepalive,
            cancel_rate_per_second: args.cancel_rate.unwrap_or(defaults.cancel_rate_per_second),
            workers,
        })
    }

    /// Reads the sections of the file named by `--config` (if any; its
    /// other keys are already in `args`) and resolves.
    pub fn load(args: ProxyArgs, config: Option<&Path>) -> Result<Self> {
        let file = match config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        Self::resolve(args, file)
    }
}

/// The default worker count: half the CPUs, at least one. A proxy shares
/// its machine with the clients (a sidecar) or the kernel work of its own
/// sockets (softirq on the other cores): on this project's 2-core machine
/// one worker gave more throughput and less CPU per transaction than two
/// (comparison harness, 5 rounds: tps 0.631 against 0.590 of direct, 13.9
/// against 15.4 µs of process CPU and 20.0 against 24.3 µs of machine CPU
/// added per transaction; docs/benchmarks.md).
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `keelson proxy ARGS --config FILE` with FILE holding `toml`.
    fn settings(args: &[&str], toml: &str) -> Result<ProxySettings> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("proxy.toml");
        std::fs::write(&file, toml).unwrap();
        let mut argv: Vec<std::ffi::OsString> = vec!["keelson".into(), "proxy".into()];
        argv.extend(args.iter().map(Into::into));
        argv.extend(["--config".into(), file.clone().into_os_string()]);
        let cli = crate::args::parse(argv)?;
        let crate::Command::Proxy(a) = cli.command else {
            panic!("not the proxy")
        };
        ProxySettings::load(a, Some(&file))
    }

    #[test]
    fn flags_win_over_file_over_defaults() {
        let s = settings(
            &["--listen", "127.0.0.1:7001"],
            r#"
            listen = "0.0.0.0:7000"
            backend = "db:5432"
            startup_timeout = "3s"
            max_connections = 5
            "#,
        )
        .unwrap();
        assert_eq!(s.listeners[0].addr.to_string(), "127.0.0.1:7001");
        assert_eq!(s.source, Source::Static("db:5432".into(), vec![]));
        assert_eq!(s.startup_timeout, Duration::from_secs(3));
        assert_eq!(s.max_connections, 5);
        assert_eq!(s.connect_timeout, Duration::from_secs(5));
        assert_eq!(s.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn routing_settings() {
        let s = settings(
            &[],
            r#"
            store = "file:///x"
            cluster = "main"
            listen = "127.0.0.1:7000"
            replica_listen = "127.0.0.1:7001"
            max_replica_lag = "2s"
            proxy_protocol_trusted = ["10.0.0.0/8", "192.0.2.1"]
            tls_cert = "c.pem"
            tls_key = "k.pem"
            [[listeners]]
            listen = "127.0.0.1:7002"
            route = "prefer-replica"
            proxy_protocol = false
            [[rules]]
            application_name = "report"
            source = "10.1.0.0/16"
            route = "any"
            [sni]
            "b.example.com" = "b"
            "#,
        )
        .unwrap();
        let routes: Vec<_> = s
            .listeners
            .iter()
            .map(|l| (l.addr.port(), l.route))
            .collect();
        assert_eq!(
            routes,
            vec![
                (7000, proxy_core::Route::Primary),
                (7001, proxy_core::Route::Replica),
                (7002, proxy_core::Route::PreferReplica)
            ]
        );
        assert!(!s.listeners[2].proxy_protocol);
        assert_eq!(s.replica_lag.time, Duration::from_secs(2));
        assert_eq!(s.replica_lag.bytes, 16 * 1024 * 1024);
        assert_eq!(s.proxy_protocol_trusted.len(), 2);
        assert_eq!(s.rules[0].route, proxy_core::Route::Any);
        assert_eq!(s.sni["b.example.com"], "b");
        let bad = |toml: &str| {
            format!(
                "{:#}",
                settings(&[], &format!("backend = \"h:1\"\n{toml}")).unwrap_err()
            )
        };
        assert!(bad("[[rules]]\nroute = \"sideways\"").contains("rules[0]: route \"sideways\""));
        assert!(bad("[[rules]]\nsource = \"nope\"\nroute = \"any\"").contains("not a network"));
        assert!(bad("proxy_protocol_trusted = [\"x\"]").contains("proxy_protocol_trusted"));
        assert!(bad("[sni]\n\"a\" = \"b\"").contains("store mode"));
        assert!(bad("bogus = 1").contains("no setting \"bogus\""));
    }

    #[test]
    fn backend_tls_per_cluster() {
        let base = r#"
            store = "file:///x"
            cluster = "main"
            tls_cert = "c.pem"
            tls_key = "k.pem"
            backend_tls = "require"
            [sni]
            "b.example.com" = "b"
            "#;
        let s = settings(
            &[],
            &format!(
                "{base}\n[cluster_backend_tls.b]\nmode = \"verify-full\"\nca_file = \"ca.pem\"\n\
                 [cluster_backend_tls.main]\nmode = \"disable\"\n"
            ),
        )
        .unwrap();
        assert_eq!(
            s.cluster_backend_tls["b"],
            Some((
                proxy_core::tls::BackendTlsMode::VerifyFull,
                Some(PathBuf::from("ca.pem"))
            ))
        );
        assert_eq!(s.cluster_backend_tls["main"], None);
        let bad = |extra: &str| {
            format!(
                "{:#}",
                settings(&[], &format!("{base}\n{extra}")).unwrap_err()
            )
        };
        let e = bad("[cluster_backend_tls.nope]\nmode = \"require\"");
        assert!(
            e.contains("no cluster of this proxy is named \"nope\""),
            "{e}"
        );
        let e = bad("[cluster_backend_tls.b]\nmode = \"verify-ca\"");
        assert!(
            e.contains(
                "cluster_backend_tls.b.mode = verify-ca needs cluster_backend_tls.b.ca_file"
            ),
            "{e}"
        );
        let e = bad("[cluster_backend_tls.b]\nmode = \"sideways\"");
        assert!(e.contains("cluster_backend_tls.b.mode"), "{e}");
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
        // A duration that would overflow the clock is refused, not a panic
        // at the first session.
        let huge = ProxyArgs {
            backend: Some("h:1".into()),
            auth_timeout: Some("100000y".into()),
            ..Default::default()
        };
        let e = format!(
            "{:#}",
            ProxySettings::resolve(huge, FileConfig::default()).unwrap_err()
        );
        assert!(
            e.contains("auth_timeout") && e.contains("longer than the limit"),
            "{e}"
        );
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

    /// docs/configuration.md lists every flag of `keelson proxy` with its
    /// file key and its default from [`default_of`], and nothing else: the
    /// page cannot drift from the schema.
    #[test]
    fn the_configuration_page_matches_the_schema() {
        use clap::CommandFactory;
        let page = include_str!("../../docs/configuration.md");
        let rows: Vec<Vec<String>> = page
            .lines()
            .filter(|l| l.starts_with("| `--"))
            .map(|l| l.split('|').map(|c| c.trim().to_owned()).collect())
            .collect();
        let cmd = crate::Cli::command();
        let proxy = cmd.find_subcommand("proxy").unwrap();
        let mut documented = std::collections::BTreeSet::new();
        for row in &rows {
            // | `--a`, `--b` | `a`, `b` | default | meaning |
            for (flag, key) in row[1].split(", ").zip(row[2].split(", ")) {
                let flag = flag.trim_matches('`').trim_start_matches("--").to_owned();
                documented.insert(flag.clone());
                if flag == "log" || flag == "config" {
                    continue;
                }
                let arg = proxy
                    .get_arguments()
                    .find(|a| a.get_long() == Some(flag.as_str()))
                    .unwrap_or_else(|| panic!("--{flag} is documented but not a flag"));
                assert_eq!(key.trim_matches('`'), flag.replace('-', "_"), "--{flag}");
                let env = format!("KEELSON_{}", flag.replace('-', "_").to_uppercase());
                assert_eq!(
                    arg.get_env().and_then(|e| e.to_str()),
                    Some(env.as_str()),
                    "--{flag}"
                );
                if let Some(d) = default_of(&flag) {
                    assert_eq!(row[3], format!("`{d}`"), "the default of --{flag}");
                }
            }
        }
        for a in proxy.get_arguments() {
            if let Some(l) = a.get_long() {
                if l != "help" {
                    assert!(
                        documented.contains(l),
                        "--{l} is not in docs/configuration.md"
                    );
                }
            }
        }
    }
}
