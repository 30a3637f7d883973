//! The etcd v3 store (`etcd://h1:2379,h2:2379`), through `etcd-client`.
//!
//! Every request has a deadline ([`REQUEST_TIMEOUT`]) so that a stopped or
//! partitioned etcd shows up as `Unavailable` quickly instead of hanging the
//! caller. There is one client per listed endpoint: requests go to the last
//! endpoint that answered and move on to the next when it cannot be reached
//! (a balanced gRPC channel was tried first, but it sends requests to dead
//! endpoints too). Watches resume from the revision after the last event
//! they delivered when their stream breaks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use crate::store::{Cas, KeyValue, LeaseId, Result, Store, StoreError, Watch, WatchEvent};

pub use crate::store::REQUEST_TIMEOUT;

/// The etcd store. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    /// Per endpoint, its client once made (with a user, making one
    /// authenticates, so it is made at first use and made again when the
    /// server no longer knows its token, after a restart of etcd).
    clients: Arc<Vec<std::sync::Mutex<Option<Client>>>>,
    /// Index of the endpoint that answered last.
    current: Arc<AtomicUsize>,
    endpoints: Vec<String>,
    /// `http` or `https`.
    scheme: &'static str,
    options: ConnectOptions,
}

/// How to reach a secured etcd: TLS (the CA its servers' certificates
/// chain to, and a client certificate where it requires one) and a user.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EtcdSecurity {
    /// PEM.
    pub ca: Option<Vec<u8>>,
    /// PEM certificate chain and private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// User and password.
    pub user: Option<(String, String)>,
}

impl EtcdSecurity {
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.identity.is_none() && self.user.is_none()
    }
}

impl std::fmt::Debug for EtcdSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
}

/// A failed attempt on one endpoint: worth trying the next endpoint, or not.
enum Fail {
    Retry(String),
    /// Retried with a new client (authenticated again).
    Token(String),
    Final(StoreError),
}

impl Fail {
    fn into_error(self) -> StoreError {
        match self {
            Fail::Retry(m) | Fail::Token(m) => unavailable(m),
            Fail::Final(e) => e,
        }
    }
}

async fn deadline<T>(
    limit: Duration,
    f: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> std::result::Result<T, Fail> {
    use etcd_client::Error as E;
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(E::TransportError(e))) => Err(Fail::Retry(e.to_string())),
        Ok(Err(E::GRpcStatus(s)))
            if matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
            ) =>
        {
            Err(Fail::Retry(s.to_string()))
        }
        Ok(Err(E::GRpcStatus(s))) if is_stale_token(&s) => Err(Fail::Token(s.message().to_owned())),
        Ok(Err(e)) => Err(Fail::Final(unavailable(e))),
        Err(_) => Err(Fail::Retry(format!("no answer within {limit:?}"))),
    }
}

/// The server does not know the client's token (it restarted, or the
/// token expired): authenticate again.
fn is_stale_token(s: &tonic::Status) -> bool {
    // As etcd's own client re-authenticates: a token etcd no longer knows,
    // one issued before a change of users or roles ("revision of auth
    // store is old"), or none where one is needed.
    s.code() == tonic::Code::Unauthenticated
        || [
            "invalid auth token",
            "auth token is expired",
            "revision of auth store is old",
            "user name is empty",
        ]
        .iter()
        .any(|m| s.message().contains(m))
}

/// Runs one request against the endpoints in turn, starting with the one
/// that answered last, until one answers; each gets [`REQUEST_TIMEOUT`], or
/// the limit given first.
macro_rules! call {
    ($self:ident, |$c:ident| $req:expr) => {
        call!($self, REQUEST_TIMEOUT, |$c| $req)
    };
    ($self:ident, $limit:expr, |$c:ident| $req:expr) => {{
        let n = $self.clients.len();
        let start = $self.current.load(Ordering::Relaxed);
        let mut result = Err(StoreError::Unavailable("etcd: no endpoint".into()));
        for i in 0..n {
            let idx = (start + i) % n;
            let attempt = match $self.client(idx, $limit).await {
                Ok(c) => {
                    #[allow(unused_mut)]
                    let mut $c = c;
                    deadline($limit, $req).await
                }
                Err(f) => Err(f),
            };
            match attempt {
                Ok(v) => {
                    $self.current.store(idx, Ordering::Relaxed);
                    result = Ok(v);
                    break;
                }
                Err(Fail::Token(m)) => {
                    tracing::info!(endpoint = %$self.endpoints[idx], error = %m, "etcd no longer knows our token; authenticating again");
                    *$self.slot(idx) = None;
                    result = Err(Fail::Token(format!("{}: {m}", $self.endpoints[idx])).into_error());
                }
                Err(Fail::Retry(m)) => {
                    tracing::debug!(endpoint = %$self.endpoints[idx], error = %m, "etcd endpoint failed; trying the next");
                    result = Err(Fail::Retry(format!("{}: {m}", $self.endpoints[idx])).into_error());
                }
                Err(f) => {
                    result = Err(f.into_error());
                    break;
                }
            }
        }
        result
    }};
}

fn to_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: String::from_utf8_lossy(kv.value()).into_owned(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

impl EtcdStore {
    /// Connects lazily to `endpoints` (`host:port`); requests fail over
    /// between them.
    pub async fn connect(endpoints: Vec<String>) -> Result<Self> {
        Self::connect_secured(endpoints, &EtcdSecurity::default()).await
    }

    /// [`EtcdStore::connect`] over TLS and with a user, as `security`
    /// says. Then tries each endpoint once: a certificate or a password
    /// that an endpoint refuses is an error now, with what to check; an
    /// etcd that is merely down is not (the roles wait for it).
    pub async fn connect_secured(endpoints: Vec<String>, security: &EtcdSecurity) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid(
                "an etcd store URL needs at least one host:port".into(),
            ));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), REQUEST_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let tls = security.ca.is_some() || security.identity.is_some();
        if tls {
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = &security.ca {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &security.identity {
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(t);
        }
        if let Some((user, password)) = &security.user {
            options = options.with_user(user.clone(), password.clone());
        }
        let store = EtcdStore {
            clients: Arc::new(
                endpoints
                    .iter()
                    .map(|_| std::sync::Mutex::new(None))
                    .collect(),
            ),
            current: Arc::new(AtomicUsize::new(0)),
            endpoints,
            scheme: if tls { "https" } else { "http" },
            options,
        };
        if tls || security.user.is_some() {
            store.check_security().await?;
        }
        Ok(store)
    }

    /// Endpoint `idx`'s client, made (and authenticated) if need be.
    async fn client(&self, idx: usize, limit: Duration) -> std::result::Result<Client, Fail> {
        if let Some(c) = self.slot(idx).as_ref() {
            return Ok(c.clone());
        }
        // Made without holding the slot (with a user, making a client
        // authenticates, a request to etcd), within the caller's limit: a
        // hung member costs a renewal no more than any other request.
        let url = format!("{}://{}", self.scheme, self.endpoints[idx]);
        let c = deadline(
            limit,
            Client::connect([url.as_str()], Some(self.options.clone())),
        )
        .await
        .map_err(|f| match f {
            Fail::Final(StoreError::Unavailable(m)) if m.contains("authentication failed") => {
                Fail::Final(StoreError::Invalid(format!(
                    "etcd at {} refused the user and password: {m}",
                    self.endpoints[idx]
                )))
            }
            f => f,
        })?;
        Ok(self.slot(idx).get_or_insert(c).clone())
    }

    fn slot(&self, idx: usize) -> std::sync::MutexGuard<'_, Option<Client>> {
        self.clients[idx].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One request to each endpoint until one answers: a TLS or
    /// authentication failure is explained; unreachable endpoints are not
    /// an error.
    async fn check_security(&self) -> Result<()> {
        let mut refused = Vec::new();
        for idx in 0..self.endpoints.len() {
            let r = match self.client(idx, REQUEST_TIMEOUT).await {
                Ok(mut c) => deadline(REQUEST_TIMEOUT, c.get("keelson-check", None)).await,
                Err(f) => Err(f),
            };
            let e = match r {
                Ok(_) => return Ok(()),
                Err(Fail::Retry(m)) | Err(Fail::Token(m)) => m,
                Err(Fail::Final(e)) => e.to_string(),
            };
            let lower = e.to_lowercase();
            let why = if lower.contains("certificate")
                || lower.contains("tls")
                || lower.contains("handshake")
                || lower.contains("unknownissuer")
            {
                Some("TLS failed: check --store-ca-file (the CA that signed etcd's server certificate) and, where etcd requires client certificates, --store-cert-file and --store-key-file")
            } else if lower.contains("authentication failed")
                || lower.contains("user name is empty")
                || lower.contains("permission denied")
            {
                Some("etcd refused the user: check --store-user and its password (--store-password-file or KEELSON_STORE_PASSWORD)")
            } else if lower.contains("connection refused") || lower.contains("no answer within") {
                None
            } else if self.scheme == "https"
                && [
                    "broken pipe",
                    "reset by peer",
                    "connection closed",
                    "canceled",
                    "transport error",
                ]
                .iter()
                .any(|m| lower.contains(m))
            {
                Some("TLS failed: etcd closed the connection during the handshake; if it requires client certificates (--client-cert-auth), give --store-cert-file and --store-key-file signed by its --trusted-ca-file")
            } else if lower.contains("unavailable") {
                None
            } else {
                Some("etcd refused the connection")
            };
            match why {
                Some(w) => refused.push(format!("{}: {w} ({e})", self.endpoints[idx])),
                None => {
                    tracing::warn!(endpoint = %self.endpoints[idx], error = %e, "etcd endpoint unreachable at start")
                }
            }
        }
        if refused.is_empty() {
            return Ok(());
        }
        Err(StoreError::Invalid(format!(
            "cannot use the etcd store: {}",
            refused.join("; ")
        )))
    }
}

impl EtcdStore {
    async fn open_watch(
        &self,
        prefix: &str,
        revision: i64,
    ) -> Result<(etcd_client::Watcher, etcd_client::WatchStream)> {
        let mut opts = WatchOptions::new().with_prefix();
        if revision > 0 {
            opts = opts.with_start_revision(revision);
        }
        call!(self, |c| c.watch(prefix, Some(opts.clone())))
    }
}

impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> Self {
        unavailable(e)
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let r = call!(self, |c| c.get(key, None))?;
        Ok(r.kvs().first().map(to_kv))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        let r = call!(self, |c| c
            .get(prefix, Some(GetOptions::new().with_prefix())))?;
        let rev = r.header().map_or(0, |h| h.revision());
        Ok((r.kvs().iter().map(to_kv).collect(), rev))
    }

    async fn put_if_revision(
        &self,
        key: &str,
        value: &str,
        expected: i64,
        lease: LeaseId,
    ) -> Result<Cas> {
        let cmp = if expected == 0 {
            Compare::create_revision(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, expected)
        };
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let txn = Txn::new()
            .when(vec![cmp])
            .and_then(vec![TxnOp::put(key, value, opts)])
            .or_else(vec![TxnOp::get(key, None)]);
        let r = call!(self, |c| c.txn(txn.clone()))?;
        if r.succeeded() {
            return Ok(Cas::Done(r.header().map_or(0, |h| h.revision())));
        }
        let current = r.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(to_kv),
            _ => None,
        });
        Ok(Cas::Conflict(current))
    }

    async fn put(&self, key: &str, value: &str, lease: LeaseId) -> Result<i64> {
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let r = call!(self, |c| c.put(key, value, opts.clone())).map_err(|e| match e {
            StoreError::Unavailable(m) if m.contains("requested lease not found") => {
                StoreError::LeaseExpired(lease)
            }
            e => e,
        })?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        Ok(call!(self, |c| c.delete(key, None))?.deleted() > 0)
    }

    async fn delete_if_revision(&self, key: &str, expected: i64) -> Result<bool> {
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then(vec![TxnOp::delete(key, None)]);
        Ok(call!(self, |c| c.txn(txn.clone()))?.succeeded())
    }

    async fn watch(&self, prefix: &str, revision: i64) -> Result<Watch> {
        let (tx, rx) = mpsc::channel(256);
        let store = self.clone();
        let prefix = prefix.to_owned();
        // Fail fast if etcd cannot be reached at all.
        let first = store.open_watch(&prefix, revision).await?;
        tokio::spawn(async move {
            let mut next = revision;
            let mut current = Some(first);
            loop {
                let (watcher, mut stream) = match current.take() {
                    Some(w) => w,
                    None => match store.open_watch(&prefix, next).await {
                        Ok(w) => w,
                        Err(e) => {
                            if tx.send(Err(e)).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    },
                };
                loop {
                    let msg = tokio::select! {
                        _ = tx.closed() => return,
                        m = stream.message() => m,
                    };
                    match msg {
                        Ok(Some(resp)) => {
                            if resp.compact_revision() > 0
                                && next > 0
                                && next < resp.compact_revision()
                            {
                                let _ = tx.send(Err(StoreError::Compacted(next))).await;
                                return;
                            }
                            if resp.canceled() {
                                break;
                            }
                            for ev in resp.events() {
                                let Some(kv) = ev.kv() else { continue };
                                let out = match ev.event_type() {
                                    EventType::Put => WatchEvent::Put(to_kv(kv)),
                                    EventType::Delete => WatchEvent::Delete {
                                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                                        mod_revision: kv.mod_revision(),
                                    },
                                };
                                next = out.revision() + 1;
                                if tx.send(Ok(out)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                drop(watcher);
                tracing::debug!(next, "etcd watch broke; resuming");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(rx)
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        // etcd leases are whole seconds: round up, never down, so that a
        // lease never ends before the time its holder counts on.
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let secs = secs.max(1) as i64;
        Ok(call!(self, |c| c.lease_grant(secs, None))?.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.keep_alive_within(lease, REQUEST_TIMEOUT).await
    }

    async fn keep_alive_within(&self, lease: LeaseId, attempt: Duration) -> Result<()> {
        let r = call!(self, attempt.min(REQUEST_TIMEOUT), |c| async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        });
        match r {
            Ok(Some(r)) if r.ttl() > 0 => Ok(()),
            Ok(_) => Err(StoreError::LeaseExpired(lease)),
            Err(StoreError::Unavailable(m)) if m.contains("lease not found") => {
                Err(StoreError::LeaseExpired(lease))
            }
            Err(e) => {
                tracing::debug!(lease, error = %e, "keep-alive failed");
                Err(e)
            }
        }
    }

    async fn compact_keeping(&self, keep: i64) -> Result<()> {
        let r = call!(self, |c| c
            .get("/", Some(GetOptions::new().with_keys_only().with_limit(1))))?;
        let current = r.header().map_or(0, |h| h.revision());
        let upto = current - keep;
        if upto <= 0 {
            return Ok(());
        }
        match call!(self, |c| c.compact(upto, None)) {
            Ok(_) => {
                tracing::info!(revision = upto, "compacted the etcd history");
                Ok(())
            }
            // Already compacted past it (another sentinel did).
            Err(StoreError::Unavailable(m)) if m.contains("compacted") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        match call!(self, |c| c.lease_revoke(lease)) {
            Ok(_) => Ok(()),
            Err(StoreError::Unavailable(m)) if m.contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }
}
