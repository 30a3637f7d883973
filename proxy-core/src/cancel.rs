//! Cancel routing.
//!
//! A CancelRequest carries the key from the BackendKeyData of the session to
//! cancel. Each session registers its key with the backend it is on, so a
//! cancel goes to exactly that backend. A key this proxy instance does not
//! know (its session may live on another proxy) is sent to every backend of
//! every view the proxy routes by (its own and those of its SNI clusters),
//! all at once: PostgreSQL ignores keys it does not own, so this is safe and
//! needs no state shared between proxies, and one hung backend does not
//! delay the others. Requests are rate-limited, since each one costs the
//! proxy and the servers a connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::time::Duration;

use crate::backend::{connect, SocketOptions};
use crate::protocol::CancelRequest;
use crate::view::{Backend, View};

type Key = (u32, Bytes);

/// Where each known cancel key lives.
#[derive(Debug)]
pub struct CancelRegistry {
    keys: Mutex<HashMap<Key, Backend>>,
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
            self.registry.lock().remove(&key);
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
    /// Dropped by the rate limit.
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
    /// `per_second` cancels are allowed on average, in bursts of as many.
    pub fn new(per_second: u32) -> Self {
        CancelRegistry {
            keys: Mutex::new(HashMap::new()),
            limiter: Mutex::new(TokenBucket::new(per_second)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Backend>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `backend` issued this key. Called once per session.
    pub fn register(self: &Arc<Self>, pid: u32, secret: Bytes, backend: Backend) -> CancelGuard {
        let key = (pid, secret);
        self.lock().insert(key.clone(), backend);
        CancelGuard {
            registry: self.clone(),
            key: Some(key),
        }
    }

    /// Number of sessions whose keys are known.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides where a cancel goes, consuming a rate-limit token. An
    /// unknown key goes to every backend of `views`, each once.
    pub fn route<'v>(
        &self,
        req: &CancelRequest,
        views: impl IntoIterator<Item = &'v View>,
    ) -> (CancelRoute, Vec<Backend>) {
        let allowed = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(Instant::now());
        if !allowed {
            return (CancelRoute::RateLimited, Vec::new());
        }
        if let Some(b) = self.lock().get(&(req.pid, req.key.clone())) {
            return (CancelRoute::Known, vec![b.clone()]);
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
/// all are done (each within `limit`). Failures are logged only: PostgreSQL
/// sends no reply to a cancel, so the client expects none.
pub async fn send(
    req: &CancelRequest,
    backends: &[Backend],
    limit: Duration,
    opts: &SocketOptions,
) {
    let one = |b: &Backend| {
        let (b, raw, opts) = (b.clone(), req.raw.clone(), *opts);
        async move {
            match connect(b.addr(), limit, &opts).await {
                Ok(mut s) => {
                    if let Err(e) = s.write_all(&raw).await {
                        tracing::debug!(backend = %b, error = %e, "could not send cancel request");
                    }
                    let _ = s.shutdown().await;
                }
                Err(e) => {
                    tracing::debug!(backend = %b, error = %e, "could not send cancel request")
                }
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
    fn rate_limit() {
        let reg = CancelRegistry::new(5);
        let view = View::default();
        let limited = (0..20)
            .filter(|_| reg.route(&req(1, b"k"), [&view]).0 == CancelRoute::RateLimited)
            .count();
        assert!(limited >= 14, "{limited}");
    }
}
