//! Cancel routing.
//!
//! A CancelRequest carries the key from the BackendKeyData of the session to
//! cancel. Each session registers its key with the backend it is on, so a
//! cancel goes to exactly that backend. A key this proxy instance does not
//! know (its session may live on another proxy) is sent to every backend of
//! the views it may belong to (the cluster of the cancel connection's SNI
//! name, or else the proxy's own and all its SNI clusters), all at once:
//! PostgreSQL ignores keys it does not own, so this is safe and needs no
//! state shared between proxies, and one hung backend does not delay the
//! others. Only these broadcasts are rate-limited, since each costs a
//! connection to every server; a cancel of a known key always goes.
//!
//! PostgreSQL closes a cancel connection only once it has signalled the
//! backend, and clients rely on it: libpq waits for that close so that the
//! next command is not the one cancelled. So the proxy closes the client's
//! cancel connection only after every backend it contacted closed its side
//! (each within a bound).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Duration;

use crate::backend::{connect, SocketOptions};
use crate::protocol::CancelRequest;
use crate::view::{Backend, View};

type Key = (u32, Secret);

/// A cancel key's secret: protocol 3.0's 4 bytes (and anything up to 8)
/// inline, so that a session's registration allocates nothing for it;
/// protocol 3.2's longer keys as they came.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Secret {
    Short(u8, [u8; 8]),
    Long(Bytes),
}

impl Secret {
    fn new(bytes: Bytes) -> Secret {
        if bytes.len() <= 8 {
            let mut b = [0u8; 8];
            b[..bytes.len()].copy_from_slice(&bytes);
            Secret::Short(bytes.len() as u8, b)
        } else {
            Secret::Long(bytes)
        }
    }
}

/// Shards of the key map: sessions start and end on every worker at once
/// (all clients reconnect together after a failover), so one lock would be
/// contended by all of them.
const SHARDS: usize = 32;

/// How long the proxy waits for a backend to close a cancel connection
/// (PostgreSQL's sign that it signalled the backend) after the request was
/// sent.
pub const CANCEL_COMPLETION_TIMEOUT: Duration = Duration::from_secs(5);

/// Where each known cancel key lives.
#[derive(Debug)]
pub struct CancelRegistry {
    shards: Box<[Mutex<HashMap<Key, Backend>>]>,
    limiter: Mutex<TokenBucket>,
}

/// Removes its key from the registry when the session ends.
pub struct CancelGuard {
    registry: Arc<CancelRegistry>,
    key: Option<Key>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.registry.shard(key.0).remove(&key);
        }
    }
}

/// Where a cancel request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRoute {
    /// To the one backend that issued the key.
    Known,
    /// The key is unknown here: to every backend of every view.
    Broadcast,
    /// A broadcast dropped by the rate limit.
    RateLimited,
}

impl CancelRoute {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelRoute::Known => "known",
            CancelRoute::Broadcast => "broadcast",
            CancelRoute::RateLimited => "rate_limited",
        }
    }
}

impl CancelRegistry {
    /// `per_second` broadcasts (cancels of unknown keys) are allowed on
    /// average, in bursts of as many.
    pub fn new(per_second: u32) -> Self {
        CancelRegistry {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            limiter: Mutex::new(TokenBucket::new(per_second)),
        }
    }

    /// The shard of a key, by its backend pid (PostgreSQL's pids spread
    /// evenly enough; the secret decides nothing here).
    fn shard(&self, pid: u32) -> std::sync::MutexGuard<'_, HashMap<Key, Backend>> {
        self.shards[pid as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `backend` issued this key. Called once per session.
    pub fn register(self: &Arc<Self>, pid: u32, secret: Bytes, backend: Backend) -> CancelGuard {
        let key = (pid, Secret::new(secret));
        self.shard(pid).insert(key.clone(), backend);
        CancelGuard {
            registry: self.clone(),
            key: Some(key),
        }
    }

    /// Number of sessions whose keys are known.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides where a cancel goes. A known key goes to its backend; an
    /// unknown one, if the rate limit allows, to every backend of `views`,
    /// each once.
    pub fn route<'v>(
        &self,
        req: &CancelRequest,
        views: impl IntoIterator<Item = &'v View>,
    ) -> (CancelRoute, Vec<Backend>) {
        if let Some(b) = self
            .shard(req.pid)
            .get(&(req.pid, Secret::new(req.key.clone())))
        {
            return (CancelRoute::Known, vec![b.clone()]);
        }
        let allowed = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(Instant::now());
        if !allowed {
            return (CancelRoute::RateLimited, Vec::new());
        }
        let mut all: Vec<Backend> = Vec::new();
        for b in views.into_iter().flat_map(View::backends) {
            if !all.contains(b) {
                all.push(b.clone());
            }
        }
        (CancelRoute::Broadcast, all)
    }
}

/// Sends the raw cancel packet to every backend at once, and returns when
/// each has closed the connection (PostgreSQL's sign that it signalled the
/// backend), or `connect_timeout` plus [`CANCEL_COMPLETION_TIMEOUT`] passed.
/// Failures are logged only: PostgreSQL sends no reply to a cancel, so the
/// client expects none.
pub async fn send(
    req: &CancelRequest,
    backends: &[Backend],
    connect_timeout: Duration,
    opts: &SocketOptions,
) {
    let one = |b: &Backend| {
        let (b, raw, opts) = (b.clone(), req.raw.clone(), *opts);
        async move {
            let mut s = match connect(b.addr(), connect_timeout, &opts).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(backend = %b, error = %e, "could not send cancel request");
                    return;
                }
            };
            if let Err(e) = s.write_all(&raw).await {
                tracing::debug!(backend = %b, error = %e, "could not send cancel request");
                return;
            }
            // PostgreSQL sends nothing back; anything read is discarded.
            let closed = tokio::time::timeout(CANCEL_COMPLETION_TIMEOUT, async {
                let mut sink = [0u8; 64];
                while let Ok(n) = s.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
            if closed.is_err() {
                tracing::info!(backend = %b, timeout = ?CANCEL_COMPLETION_TIMEOUT,
                    "the server did not close the cancel connection in time");
            }
        }
    };
    match backends {
        [] => {}
        [b] => one(b).await,
        many => {
            let mut all = tokio::task::JoinSet::new();
            for b in many {
                all.spawn(one(b));
            }
            while all.join_next().await.is_some() {}
        }
    }
}

/// Step 3 of a session that is a CancelRequest: routes it (to the backend
/// of a known key, else to every backend of `cluster`, or of every cluster
/// when the cancel came without an SNI name) and sends it; returns once
/// every backend closed its side.
pub(crate) async fn relay(
    shared: &crate::proxy::Shared,
    cluster: Option<&crate::view::ViewHandle>,
    req: &CancelRequest,
) {
    let to = {
        let guards: Vec<_> = match cluster {
            Some(v) => vec![v.load()],
            None => std::iter::once(&shared.view)
                .chain(shared.cfg.server_names.values())
                .map(crate::view::ViewHandle::load)
                .collect(),
        };
        let (route, to) = shared.cancel.route(req, guards.iter().map(|v| &**v));
        drop(guards);
        shared.metrics.cancel(route.as_str());
        tracing::debug!(route = route.as_str(), pid = req.pid, "cancel request");
        to
    };
    send(req, &to, shared.cfg.connect_timeout, &shared.cfg.socket).await;
}

/// A token bucket with a burst equal to its rate.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        TokenBucket {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(pid: u32, key: &[u8]) -> CancelRequest {
        CancelRequest {
            pid,
            key: Bytes::copy_from_slice(key),
            raw: Bytes::new(),
        }
    }

    #[test]
    fn known_keys_go_to_their_backend_and_unknown_ones_everywhere() {
        let reg = Arc::new(CancelRegistry::new(100));
        let view = View {
            generation: 1,
            primary: Some(Backend::new("a:1")),
            replicas: vec![
                crate::view::Replica::fresh(Backend::new("b:1")),
                crate::view::Replica::fresh(Backend::new("a:1")),
            ],
        };
        let guard = reg.register(7, Bytes::from_static(b"abcd"), Backend::new("b:1"));
        assert_eq!(
            reg.route(&req(7, b"abcd"), [&view]),
            (CancelRoute::Known, vec![Backend::new("b:1")])
        );
        let (r, to) = reg.route(&req(7, b"zzzz"), [&view]);
        assert_eq!(r, CancelRoute::Broadcast);
        assert_eq!(to, vec![Backend::new("a:1"), Backend::new("b:1")]);
        // With SNI clusters, an unknown key reaches their servers too.
        let other = View {
            generation: 3,
            primary: Some(Backend::new("c:1")),
            replicas: vec![crate::view::Replica::fresh(Backend::new("b:1"))],
        };
        let (r, to) = reg.route(&req(7, b"zzzz"), [&view, &other]);
        assert_eq!(r, CancelRoute::Broadcast);
        let want: Vec<Backend> = ["a:1", "b:1", "c:1"]
            .into_iter()
            .map(Backend::new)
            .collect();
        assert_eq!(to, want);
        drop(guard);
        assert!(reg.is_empty());
    }

    #[test]
    fn protocol_3_2_keys_route_like_3_0_keys() {
        let reg = Arc::new(CancelRegistry::new(100));
        let view = View {
            generation: 1,
            primary: Some(Backend::new("p:1")),
            replicas: vec![crate::view::Replica::fresh(Backend::new("standby:1"))],
        };
        for len in [32usize, 256] {
            let key: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let _g = reg.register(9, Bytes::from(key.clone()), Backend::new("standby:1"));
            assert_eq!(
                reg.route(&req(9, &key), [&view]),
                (CancelRoute::Known, vec![Backend::new("standby:1")]),
                "{len}-byte key"
            );
            let mut wrong = key.clone();
            wrong[len - 1] ^= 1;
            assert_eq!(
                reg.route(&req(9, &wrong), [&view]).0,
                CancelRoute::Broadcast
            );
        }
    }

    #[test]
    fn only_broadcasts_are_rate_limited() {
        let reg = Arc::new(CancelRegistry::new(5));
        let view = View::default();
        let limited = (0..20)
            .filter(|_| reg.route(&req(1, b"k"), [&view]).0 == CancelRoute::RateLimited)
            .count();
        assert!(limited >= 14, "{limited}");
        // With the bucket empty, known keys still go.
        let guards: Vec<CancelGuard> = (0..200)
            .map(|pid| reg.register(pid, Bytes::from_static(b"abcd"), Backend::new("a:1")))
            .collect();
        assert!((0..200).all(|pid| reg.route(&req(pid, b"abcd"), [&view]).0 == CancelRoute::Known));
        assert_eq!(reg.len(), 200);
        drop(guards);
        assert!(reg.is_empty());
    }
}
