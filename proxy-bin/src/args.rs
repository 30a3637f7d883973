//! One configuration schema for every role: the clap definition of each
//! command's flags. Every flag has its `KEELSON_*` variable, and every flag
//! can also be set in the TOML file given by `--config` (or
//! `KEELSON_CONFIG`), under the flag's name in snake case. For each setting
//! the first source that has it wins: flag, environment, file, default.
//!
//! The file is laid over the command line before clap parses it: each key
//! becomes the flag it names, unless that flag was given on the command line
//! or in the environment. So the file has exactly the flags' names, types,
//! checks and defaults, and nothing can drift between them. A key no flag of
//! the running command has is an error. A file can serve several roles: a
//! table named after a command (`[keeper]`, `[sentinel]`, `[proxy]`,
//! `[ctl]`, `[demo]`) applies to that command only, and top-level keys to
//! whichever runs. The proxy's structured sections (`[[listeners]]`,
//! `[[rules]]`, `[sni]`) are read by its own config (config.rs).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, Parser};

use crate::Cli;

/// The commands a file may have a table for.
const COMMANDS: [&str; 5] = ["proxy", "keeper", "sentinel", "ctl", "demo"];
/// Keys of the proxy's file that are sections, not flags.
pub const PROXY_SECTIONS: [&str; 4] = ["listeners", "rules", "sni", "cluster_backend_tls"];

/// Where a role finds its cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Cluster store: file:///dir or etcd://host:2379[,host:2379...].
    #[arg(long, env = "KEELSON_STORE")]
    pub store: String,
    /// Name of the cluster.
    #[arg(long, env = "KEELSON_CLUSTER")]
    pub cluster: String,
    /// Key prefix in the store.
    #[arg(long, env = "KEELSON_PREFIX", default_value = cluster::store::DEFAULT_PREFIX)]
    pub prefix: String,
    #[command(flatten)]
    pub security: StoreSecurityArgs,
}

impl ClusterArgs {
    pub fn keys(&self) -> cluster::Keys {
        cluster::Keys::new(&self.prefix, &self.cluster)
    }

    /// Opens the store, secured as the flags say.
    pub async fn open(&self) -> Result<cluster::AnyStore> {
        let security = self.security.load()?;
        Ok(cluster::open_with(&self.store, &security).await?)
    }
}

/// How to reach a secured etcd: TLS and a user. The password is never a
/// flag: a file, or `KEELSON_STORE_PASSWORD`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreSecurityArgs {
    /// CA certificate (PEM) that etcd's server certificates must chain to;
    /// connects to etcd over TLS.
    #[arg(long, env = "KEELSON_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for an etcd started with
    /// --client-cert-auth (with --store-key-file).
    #[arg(long, env = "KEELSON_STORE_CERT_FILE", requires = "store_key_file")]
    pub store_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "KEELSON_STORE_KEY_FILE", requires = "store_cert_file")]
    pub store_key_file: Option<PathBuf>,
    /// etcd user, for an etcd with authentication enabled; its password
    /// comes from --store-password-file or KEELSON_STORE_PASSWORD.
    #[arg(long, env = "KEELSON_STORE_USER")]
    pub store_user: Option<String>,
    /// File holding the etcd user's password (its first line).
    #[arg(long, env = "KEELSON_STORE_PASSWORD_FILE", requires = "store_user")]
    pub store_password_file: Option<PathBuf>,
}

impl StoreSecurityArgs {
    /// Reads the files the flags name.
    pub fn load(&self) -> Result<cluster::etcd::EtcdSecurity> {
        let read = |flag: &str, p: &Path| {
            std::fs::read(p).with_context(|| format!("cannot read {flag} {}", p.display()))
        };
        let ca = self
            .store_ca_file
            .as_deref()
            .map(|p| read("--store-ca-file", p))
            .transpose()?;
        let identity = match (&self.store_cert_file, &self.store_key_file) {
            (Some(c), Some(k)) => {
                Some((read("--store-cert-file", c)?, read("--store-key-file", k)?))
            }
            _ => None,
        };
        let user = match &self.store_user {
            None => None,
            Some(u) => {
                let password = match (&self.store_password_file, std::env::var("KEELSON_STORE_PASSWORD")) {
                    (Some(f), _) => String::from_utf8_lossy(&read("--store-password-file", f)?)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                    (None, Ok(p)) => p,
                    (None, Err(_)) => bail!(
                        "--store-user {u:?} needs a password: --store-password-file FILE or KEELSON_STORE_PASSWORD"
                    ),
                };
                if password.is_empty() {
                    bail!("the password of the etcd user {u:?} is empty");
                }
                Some((u.clone(), password))
            }
        };
        Ok(cluster::etcd::EtcdSecurity { ca, identity, user })
    }
}

/// Parses the command line, with the `--config` file laid under it.
/// Errors are clap's (usage, `--help`, `--version`: see
/// [`clap::Error::exit`]) or a file's, explained.
pub fn parse(argv: Vec<OsString>) -> Result<Cli> {
    // A first look, tolerant of what the file may still provide (required
    // flags): which command, which file, what the command line and the
    // environment already set.
    let matches = Cli::command()
        .ignore_errors(true)
        .try_get_matches_from(&argv)
        .ok();
    let found = matches.as_ref().and_then(|m| {
        let (sub, sm) = m.subcommand()?;
        let path = sm
            .get_one::<PathBuf>("config")
            .or_else(|| m.get_one::<PathBuf>("config"))?;
        Some((sub.to_owned(), sm.clone(), path.clone()))
    });
    let Some((sub, sub_matches, path)) = found else {
        return Ok(Cli::try_parse_from(argv)?);
    };
    let flags = file_flags(&path, &sub, &sub_matches)?;
    if flags.is_empty() {
        return Ok(Cli::try_parse_from(argv)?);
    }
    let sub = sub.as_str();
    // The file's flags go right after the command's name, before its own
    // flags and any nested command (`ctl status`).
    let at = command_position(&argv, sub).context("could not find the command name")?;
    let mut layered = argv[..=at].to_vec();
    layered.extend(flags.into_iter().map(OsString::from));
    layered.extend_from_slice(&argv[at + 1..]);
    Cli::try_parse_from(layered)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.render().to_string().trim()))
}

/// The index of the command name in `argv`, past the top-level flags
/// (`--log X`, `--config X`).
fn command_position(argv: &[OsString], sub: &str) -> Option<usize> {
    let mut i = 1;
    while i < argv.len() {
        let a = argv[i].to_string_lossy();
        if a == sub {
            return Some(i);
        }
        if a == "--log" || a == "--config" {
            i += 1;
        }
        i += 1;
    }
    None
}

/// The flags the file at `path` sets for command `sub` that neither the
/// command line nor the environment set.
fn file_flags(path: &Path, sub: &str, given: &clap::ArgMatches) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read the config file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    let cmd = Cli::command();
    let Some(sub_cmd) = cmd.find_subcommand(sub) else {
        return Ok(Vec::new());
    };
    let mut entries: Vec<(String, toml::Value)> = Vec::new();
    for (k, v) in &table {
        match v {
            toml::Value::Table(t) if COMMANDS.contains(&k.as_str()) => {
                if k == sub {
                    entries.extend(t.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
            _ => entries.push((k.clone(), v.clone())),
        }
    }
    let mut flags = Vec::new();
    for (key, value) in entries {
        if sub == "proxy" && PROXY_SECTIONS.contains(&key.as_str()) {
            continue;
        }
        let long = key.replace('_', "-");
        let Some(arg) = sub_cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
        else {
            let known: Vec<String> = sub_cmd
                .get_arguments()
                .filter_map(|a| a.get_long())
                .filter(|l| *l != "config" && *l != "help")
                .map(|l| l.replace('-', "_"))
                .collect();
            bail!(
                "{}: `keelson {sub}` has no setting {key:?}; its settings are {}",
                path.display(),
                known.join(", ")
            );
        };
        if matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let scalar = |v: &toml::Value| -> Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => bail!(
                    "{}: {key} = {other:?} is not a string, number or boolean",
                    path.display()
                ),
            })
        };
        match (arg.get_action(), &value) {
            (ArgAction::SetTrue, toml::Value::Boolean(true)) => flags.push(format!("--{long}")),
            (ArgAction::SetTrue, toml::Value::Boolean(false)) => {}
            (_, toml::Value::Array(items)) => {
                let items: Vec<String> = items.iter().map(scalar).collect::<Result<_>>()?;
                flags.push(format!("--{long}={}", items.join(",")));
            }
            (_, v) => flags.push(format!("--{long}={}", scalar(v)?)),
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("keelson")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn every_role_reads_the_file_under_its_flags_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(
            &file,
            r#"
            store = "file:///from-file"
            cluster = "main"
            [keeper]
            uid = "k9"
            data_dir = "/data/k9"
            pg_listen = "127.0.0.1:5432"
            [sentinel]
            uid = "s9"
            [proxy]
            max_connections = 77
            replicas = ["h1:5432", "h2:5432"]
            [[proxy.listeners]]
            listen = "127.0.0.1:7002"
            "#,
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let keeper = parse(argv(&["--config", f, "keeper"])).unwrap();
        let crate::Command::Keeper(k) = keeper.command else {
            panic!()
        };
        assert_eq!(k.cluster.store, "file:///from-file");
        assert_eq!(k.uid, "k9");
        assert_eq!(k.cluster.prefix, "keelson", "the default stays");
        // A flag wins over the file.
        let keeper = parse(argv(&["keeper", "--config", f, "--uid", "k1"])).unwrap();
        let crate::Command::Keeper(k) = keeper.command else {
            panic!()
        };
        assert_eq!(k.uid, "k1");
        let sentinel = parse(argv(&["sentinel", "--config", f])).unwrap();
        let crate::Command::Sentinel(s) = sentinel.command else {
            panic!()
        };
        assert_eq!(s.uid.as_deref(), Some("s9"));
        let ctl = parse(argv(&["--config", f, "ctl", "status"])).unwrap();
        let crate::Command::Ctl(c) = ctl.command else {
            panic!()
        };
        assert_eq!(c.cluster.cluster, "main");
        let proxy = parse(argv(&["proxy", "--config", f, "--backend", "h:1"])).unwrap();
        let crate::Command::Proxy(p) = proxy.command else {
            panic!()
        };
        assert_eq!(p.max_connections, Some(77));
        assert_eq!(
            p.replicas.as_deref(),
            Some(&["h1:5432".to_owned(), "h2:5432".to_owned()][..])
        );
    }

    #[test]
    fn unknown_and_malformed_keys_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(
            &file,
            "store = \"file:///x\"\ncluster = \"c\"\nmax_conections = 5\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let e = format!(
            "{:#}",
            parse(argv(&["sentinel", "--config", f])).unwrap_err()
        );
        assert!(
            e.contains("has no setting \"max_conections\"") && e.contains("uid"),
            "{e}"
        );
        std::fs::write(&file, "[proxy]\nmax_connections = \"lots\"\n").unwrap();
        let e = format!(
            "{:#}",
            parse(argv(&["proxy", "--config", f, "--backend", "h:1"])).unwrap_err()
        );
        assert!(e.contains("k.toml") && e.contains("lots"), "{e}");
        let e = format!(
            "{:#}",
            parse(argv(&["proxy", "--config", "/nonexistent.toml"])).unwrap_err()
        );
        assert!(e.contains("could not read the config file"), "{e}");
    }
}
