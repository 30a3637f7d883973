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
    clients: Arc<Vec<Client>>,
    /// Index of the endpoint that answered last.
    current: Arc<AtomicUsize>,
    endpoints: Vec<String>,
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
    Final(StoreError),
}

impl Fail {
    fn into_error(self) -> StoreError {
        match self {
            Fail::Retry(m) => unavailable(m),
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
        Ok(Err(e)) => Err(Fail::Final(unavailable(e))),
        Err(_) => Err(Fail::Retry(format!("no answer within {limit:?}"))),
    }
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
            #[allow(unused_mut)]
            let mut $c = $self.clients[idx].clone();
            match deadline($limit, $req).await {
                Ok(v) => {
                    $self.current.store(idx, Ordering::Relaxed);
                    result = Ok(v);
                    break;
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
        if endpoints.is_empty() {
            return Err(StoreError::Invalid(
                "an etcd store URL needs at least one host:port".into(),
            ));
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), REQUEST_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let mut clients = Vec::new();
        for e in &endpoints {
            // Connecting is lazy: nothing is dialled until the first request.
            let c = Client::connect([format!("http://{e}")], Some(opts.clone()))
                .await
                .map_err(|err| StoreError::Invalid(format!("bad etcd endpoint {e:?}: {err}")))?;
            clients.push(c);
        }
        Ok(EtcdStore {
            clients: Arc::new(clients),
            current: Arc::new(AtomicUsize::new(0)),
            endpoints,
        })
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
