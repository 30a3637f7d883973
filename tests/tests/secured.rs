//! A secured etcd (issue 13): TLS with client certificates
//! (`--client-cert-auth`, rcgen certificates) and authentication enabled;
//! a cluster run on it through the binary's flags, and clear errors at
//! start for a wrong CA, a missing client certificate or a wrong password.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster::etcd::EtcdSecurity;
use cluster::Store;

use crate::support::{free_port, keelson_bin};

/// A CA, and certificates it signed: PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    /// A CA that signed nothing here.
    other_ca: PathBuf,
}

pub(crate) fn ca(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (cert, rcgen::Issuer::new(params, key))
}

/// Keeper `k{i}`'s `--pg-ssl-*` flags: a certificate for 127.0.0.1 and
/// localhost with the common name `k{i}`, signed by `issuer`, whose
/// certificate is at `ca_path`.
pub(crate) fn keeper_tls_args(
    dir: &Path,
    i: usize,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    ca_path: &Path,
) -> Vec<String> {
    let name = format!("k{i}");
    let (c, k) = signed(dir, &name, &["127.0.0.1", "localhost"], &name, issuer);
    vec![
        "--pg-ssl-cert-file".into(),
        c.display().to_string(),
        "--pg-ssl-key-file".into(),
        k.display().to_string(),
        "--pg-ssl-ca-file".into(),
        ca_path.display().to_string(),
    ]
}

pub(crate) fn signed(
    dir: &Path,
    name: &str,
    sans: &[&str],
    cn: &str,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.signed_by(&key, issuer).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn pki(dir: &Path) -> Pki {
    let (ca_cert, issuer) = ca("keelson test etcd CA");
    let (other, _) = ca("another CA");
    let (ca, other_ca) = (dir.join("ca.pem"), dir.join("other-ca.pem"));
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    std::fs::write(&other_ca, other.pem()).unwrap();
    Pki {
        ca,
        server: signed(dir, "server", &["localhost", "127.0.0.1"], "etcd", &issuer),
        client: signed(dir, "client", &[], "root", &issuer),
        other_ca,
    }
}

/// An etcd serving clients over TLS only and requiring client
/// certificates.
struct TlsEtcd {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsEtcd {
    async fn start(pki: &Pki) -> TlsEtcd {
        let dir = tempfile::tempdir().unwrap();
        let (port, peer) = (free_port(), free_port());
        let client = format!("https://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = crate::support::etcd_command(&dir.path().join("data"), &client, &peer)
            .arg("--cert-file")
            .arg(&pki.server.0)
            .arg("--key-file")
            .arg(&pki.server.1)
            .arg("--trusted-ca-file")
            .arg(&pki.ca)
            .arg("--client-cert-auth")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd runs");
        let e = TlsEtcd {
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "etcd did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        e
    }

    fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.port)
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn security(pki: &Pki, user: Option<(&str, &str)>) -> EtcdSecurity {
    EtcdSecurity {
        ca: Some(read(&pki.ca)),
        identity: Some((read(&pki.client.0), read(&pki.client.1))),
        user: user.map(|(u, p)| (u.to_owned(), p.to_owned())),
    }
}

/// Turns etcd's authentication on, with a `root` user.
async fn enable_auth(url: &str, pki: &Pki, password: &str) {
    let endpoint = url.replace("etcd://", "https://");
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read(&pki.ca)))
        .identity(etcd_client::Identity::from_pem(
            read(&pki.client.0),
            read(&pki.client.1),
        ));
    let mut c = etcd_client::Client::connect(
        [endpoint],
        Some(etcd_client::ConnectOptions::new().with_tls(tls)),
    )
    .await
    .unwrap();
    c.user_add("root", password, None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.auth_enable().await.unwrap();
}

/// Issue 13: the store over TLS with client certificates, and with
/// authentication: reads and writes work with the right settings; a wrong
/// CA, no client certificate or a wrong password is refused at start with
/// what to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secured_etcd_is_used_with_tls_and_a_user_and_wrong_settings_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let etcd = TlsEtcd::start(&pki).await;
    let url = etcd.url();
    let store = cluster::open_with(&url, &security(&pki, None))
        .await
        .unwrap();
    store.put("/t/a", "1", 0).await.unwrap();
    assert_eq!(store.get("/t/a").await.unwrap().unwrap().value, "1");

    let wrong_ca = EtcdSecurity {
        ca: Some(read(&pki.other_ca)),
        ..security(&pki, None)
    };
    let e = cluster::open_with(&url, &wrong_ca)
        .await
        .unwrap_err()
        .to_string();
    eprintln!("wrong CA: {e}");
    assert!(e.contains("--store-ca-file"), "{e}");
    let no_client_cert = EtcdSecurity {
        identity: None,
        ..security(&pki, None)
    };
    let e = cluster::open_with(&url, &no_client_cert)
        .await
        .unwrap_err()
        .to_string();
    eprintln!("no client certificate: {e}");
    assert!(e.contains("TLS failed"), "{e}");
    // Plain http to a TLS etcd.
    let plain = cluster::open(&url).await.unwrap();
    assert!(plain.get("/t/a").await.is_err());

    enable_auth(&url, &pki, "root-secret").await;
    let store = cluster::open_with(&url, &security(&pki, Some(("root", "root-secret"))))
        .await
        .unwrap();
    assert_eq!(store.get("/t/a").await.unwrap().unwrap().value, "1");
    let e = cluster::open_with(&url, &security(&pki, Some(("root", "wrong"))))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("wrong password: {e}");
    assert!(e.contains("--store-user"), "{e}");
}

/// Issue 13: a cluster (ctl, a sentinel, a keeper) on an etcd with TLS,
/// client certificates and authentication, configured by flags, a file
/// and the environment; the binary refuses a wrong CA at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_on_a_secured_etcd_through_the_binarys_flags() {
    let dir = tempfile::tempdir().unwrap();
    if let Some((uid, gid)) = keeper::pg::unprivileged_ids() {
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
    }
    let pki = pki(dir.path());
    let etcd = TlsEtcd::start(&pki).await;
    let url = etcd.url();
    enable_auth(&url, &pki, "root-secret").await;
    let password_file = dir.path().join("etcd-password");
    std::fs::write(&password_file, "root-secret\n").unwrap();
    let flags = |ca: &Path| {
        vec![
            "--store".to_owned(),
            url.clone(),
            "--cluster".into(),
            "sec".into(),
            "--store-ca-file".into(),
            ca.display().to_string(),
            "--store-cert-file".into(),
            pki.client.0.display().to_string(),
            "--store-key-file".into(),
            pki.client.1.display().to_string(),
            "--store-user".into(),
            "root".into(),
        ]
    };
    let ctl = |args: &[&str], ca: &Path| {
        let out = Command::new(keelson_bin())
            .arg("ctl")
            .args(flags(ca))
            .args(args)
            .env("KEELSON_STORE_PASSWORD", "root-secret")
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = ctl(&["init"], &pki.ca);
    assert!(ok, "{out}");
    let (ok, out) = ctl(&["status"], &pki.other_ca);
    eprintln!("ctl with a wrong CA: {out}");
    assert!(!ok && out.contains("--store-ca-file"), "{out}");

    let spawn = |args: Vec<String>, log: &str| -> Child {
        Command::new(keelson_bin())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
            .spawn()
            .unwrap()
    };
    let mut sentinel_args = vec!["sentinel".to_owned(), "--uid".into(), "s1".into()];
    sentinel_args.extend(flags(&pki.ca));
    sentinel_args.extend([
        "--store-password-file".into(),
        password_file.display().to_string(),
    ]);
    let sentinel = spawn(sentinel_args, "sentinel.log");
    let mut keeper_args = vec![
        "keeper".to_owned(),
        "--uid".into(),
        "k1".into(),
        "--data-dir".into(),
        dir.path().join("k1").display().to_string(),
        "--pg-listen".into(),
        format!("127.0.0.1:{}", free_port()),
        "--pg-repl-password".into(),
        "test-secret".into(),
    ];
    keeper_args.extend(flags(&pki.ca));
    keeper_args.extend([
        "--store-password-file".into(),
        password_file.display().to_string(),
    ]);
    let keeper = spawn(keeper_args, "keeper.log");
    struct Kill(Vec<Child>);
    impl Drop for Kill {
        fn drop(&mut self) {
            for c in &mut self.0 {
                // SAFETY: signalling our own children.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                let _ = c.wait();
            }
        }
    }
    let _children = Kill(vec![keeper, sentinel]);
    crate::assert_eventually!(
        ctl(&["status"], &pki.ca).1.contains("primary:    k1 at"),
        Duration::from_secs(90),
        "no primary on the secured etcd: {}\nkeeper: {}\nsentinel: {}",
        ctl(&["status"], &pki.ca).1,
        std::fs::read_to_string(dir.path().join("keeper.log")).unwrap_or_default(),
        std::fs::read_to_string(dir.path().join("sentinel.log")).unwrap_or_default()
    );
}

/// Issue 13: keepers run PostgreSQL with their server certificates;
/// standbys stream over TLS, checking the primary's certificate against
/// the CA (verify-full); a renewed certificate at the same path is picked
/// up by reload; a certificate from another CA is refused by a standby
/// with a clear error, and streaming resumes once it is put right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_runs_over_tls_with_keeper_managed_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let (ca_cert, issuer) = ca("keelson test PostgreSQL CA");
    let (other_cert, other) = ca("another CA");
    let ca_path = certs.path().join("ca.pem");
    let other_ca = certs.path().join("other-ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    std::fs::write(&other_ca, other_cert.pem()).unwrap();
    let args: Vec<Vec<String>> = (1..=2)
        .map(|i| keeper_tls_args(certs.path(), i, &issuer, &ca_path))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = cluster::open(&url).await.unwrap();
    let c = crate::failover::LocalCluster::up_with_keeper_args(
        &url,
        store,
        cluster::ClusterSpec::default(),
        args,
    )
    .await;
    let (p, s) = (c.master, c.standbys()[0]);
    let direct = |i: usize| {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            c.ports[i - 1]
        )
    };
    let streams_over_tls = || async {
        let cl = crate::support::try_connect(&direct(p)).await.ok()?;
        let row = cl
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_replication r \
                 JOIN pg_stat_ssl s USING (pid)",
                &[],
            )
            .await
            .ok()?;
        Some((row.get::<_, i64>(0), row.get::<_, i64>(1)))
    };
    crate::assert_eventually!(
        streams_over_tls().await == Some((1, 1)),
        Duration::from_secs(20),
        "the standby does not stream over TLS: {:?}",
        streams_over_tls().await
    );
    for i in [p, s] {
        assert_eq!(c.show(i, "ssl").await.as_deref(), Some("on"), "k{i}");
    }
    let verify = |i: usize, ca: &Path| {
        Command::new("psql")
            .args([
                "-X",
                "-A",
                "-t",
                &format!(
                    "{} sslmode=verify-full sslrootcert={}",
                    direct(i),
                    ca.display()
                ),
                "-c",
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "t")
            .unwrap_or(false)
    };
    assert!(
        verify(p, &ca_path),
        "the primary's certificate does not verify"
    );
    assert!(!verify(p, &other_ca));

    // The primary's certificate renewed, by another CA, at the same path:
    // the keeper reloads PostgreSQL, which serves it to new connections.
    let (cert, key) = signed(certs.path(), "renewed", &["127.0.0.1"], "k-renewed", &other);
    std::fs::copy(&cert, certs.path().join(format!("k{p}.pem"))).unwrap();
    std::fs::copy(&key, certs.path().join(format!("k{p}-key.pem"))).unwrap();
    crate::assert_eventually!(
        verify(p, &other_ca),
        Duration::from_secs(15),
        "the renewed certificate is not served"
    );
    // A standby that connects anew refuses it: it is not from the CA.
    c.kill_postgres(s);
    let log = || {
        std::fs::read_to_string(c.dir.path().join(format!("k{s}/postgres.log"))).unwrap_or_default()
    };
    crate::assert_eventually!(
        log().contains("certificate verify failed"),
        Duration::from_secs(30),
        "no certificate error in k{s}'s log:\n{}",
        log()
    );
    let line = log()
        .lines()
        .rev()
        .find(|l| l.contains("certificate verify failed"))
        .unwrap_or_default()
        .to_owned();
    eprintln!("k{s}: {line}");
    // Put right: streaming resumes.
    let (cert, key) = signed(certs.path(), "fixed", &["127.0.0.1"], "k-fixed", &issuer);
    std::fs::copy(&cert, certs.path().join(format!("k{p}.pem"))).unwrap();
    std::fs::copy(&key, certs.path().join(format!("k{p}-key.pem"))).unwrap();
    crate::assert_eventually!(
        streams_over_tls().await == Some((1, 1)),
        Duration::from_secs(30),
        "streaming did not resume over TLS: {:?}",
        streams_over_tls().await
    );
}
