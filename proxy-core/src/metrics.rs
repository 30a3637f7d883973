//! Metric names and the handles a session looks up once. Labels are fixed
//! enums, never per-connection values. Bytes are counted once per read
//! batch through cached handles, never per message.
//!
//! The embedder installs the recorder (the `keelson` binary uses
//! Prometheus); without one every call is a no-op.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};

use crate::error::ErrorKind;
use crate::route::{LagLimit, Route};
use crate::view::View;

pub const CONNECTIONS_ACCEPTED: &str = "keelson_connections_accepted_total";
pub const CONNECTIONS_ACTIVE: &str = "keelson_connections_active";
pub const CONNECTIONS_REJECTED: &str = "keelson_connections_rejected_total";
pub const SESSIONS_ENDED: &str = "keelson_sessions_ended_total";
pub const BYTES: &str = "keelson_bytes_total";
pub const SESSIONS_FORWARDING: &str = "keelson_sessions_forwarding_total";
pub const BACKEND_CONNECT_SECONDS: &str = "keelson_backend_connect_seconds";
pub const HANDSHAKE_SECONDS: &str = "keelson_handshake_seconds";
pub const CANCEL_REQUESTS: &str = "keelson_cancel_requests_total";
pub const HOLD_SECONDS: &str = "keelson_hold_seconds";
pub const SESSIONS_ROUTED: &str = "keelson_sessions_routed_total";
pub const ROUTE_REFUSED: &str = "keelson_route_refused_total";
pub const BACKEND_RETRIES: &str = "keelson_backend_retries_total";
pub const REPLICA_LAG_BYTES: &str = "keelson_replica_lag_bytes";
pub const REPLICA_SESSIONS_ALLOWED: &str = "keelson_replica_admitted";
pub const PROXY_HEADERS: &str = "keelson_proxy_protocol_headers_total";
pub const VIEW_GENERATION: &str = "keelson_view_generation";
pub const VIEW_CHANGES: &str = "keelson_view_changes_total";

/// Registers help texts. Call once after installing a recorder.
pub fn describe() {
    describe_counter!(
        CONNECTIONS_ACCEPTED,
        "Client connections accepted by the listener."
    );
    describe_gauge!(
        CONNECTIONS_ACTIVE,
        "Client connections currently open (all phases)."
    );
    describe_counter!(
        CONNECTIONS_REJECTED,
        "Client connections refused before a session was established, by the side at fault (kind: client, backend, policy) and reason."
    );
    describe_counter!(
        SESSIONS_ENDED,
        "Established sessions that ended, by reason (fenced, stale, replica_promoted, replica_removed, replica_lag, shutdown, ...)."
    );
    describe_counter!(BYTES, Unit::Bytes, "Bytes forwarded, by direction.");
    describe_counter!(
        SESSIONS_FORWARDING,
        "Established sessions by how their bytes moved (mode: kernel, userspace) and, for user space on a kernel-forwarding listener, why (reason: tls, unavailable, pending_bytes, no_slot, error; none otherwise)."
    );
    describe_histogram!(
        BACKEND_CONNECT_SECONDS,
        Unit::Seconds,
        "Time to open the TCP connection to the backend."
    );
    describe_histogram!(
        HANDSHAKE_SECONDS,
        Unit::Seconds,
        "Time from accepting a client to relaying its first ReadyForQuery."
    );
    describe_counter!(
        CANCEL_REQUESTS,
        "Cancel requests received, by how they were routed."
    );
    describe_histogram!(
        HOLD_SECONDS,
        Unit::Seconds,
        "Time new clients were held waiting for a server, by cluster, route and outcome."
    );
    describe_counter!(
        SESSIONS_ROUTED,
        "Sessions routed, by route and the kind of server chosen (primary or standby)."
    );
    describe_counter!(
        ROUTE_REFUSED,
        "Sessions refused after their route was known, by route and reason."
    );
    describe_counter!(
        BACKEND_RETRIES,
        "Times a held client's server was tried again after it refused the connection or answered 57P03 (starting up, shutting down), by reason."
    );
    describe_gauge!(
        REPLICA_LAG_BYTES,
        Unit::Bytes,
        "Replay lag of each standby as the proxy's view reports it."
    );
    describe_counter!(
        PROXY_HEADERS,
        "PROXY protocol headers accepted from trusted proxies (refusals count in connections_rejected_total{reason=\"proxy_protocol\"})."
    );
    describe_gauge!(
        REPLICA_SESSIONS_ALLOWED,
        "1 if the standby is within the lag limit and takes new sessions, else 0."
    );
    describe_gauge!(
        VIEW_GENERATION,
        "Generation of the view applied, by cluster."
    );
    describe_counter!(VIEW_CHANGES, "Views applied, by cluster.");
}

/// The handles of the metrics every session touches, registered once per
/// [`crate::Proxy`]: the common path of a session (accept, route, connect,
/// authenticate, forward, end) takes no registry lock. Refusals and rare
/// outcomes look their handle up when they happen.
pub(crate) struct Metrics {
    accepted: Counter,
    active: Gauge,
    backend_connect: Histogram,
    handshake: Histogram,
    to_backend: Counter,
    to_client: Counter,
    /// By route (in [`Route::ALL`] order), then primary (0) or standby (1).
    routed: [[Counter; 2]; 4],
    client_closed: Counter,
    backend_closed: Counter,
    proxy_headers: Counter,
}

impl Metrics {
    /// Registers the handles with the recorder installed now (a no-op
    /// recorder if none is).
    pub(crate) fn new() -> Self {
        let routed = Route::ALL.map(|r| {
            ["primary", "standby"]
                .map(|server| counter!(SESSIONS_ROUTED, "route" => r.as_str(), "server" => server))
        });
        Metrics {
            accepted: counter!(CONNECTIONS_ACCEPTED),
            active: gauge!(CONNECTIONS_ACTIVE),
            backend_connect: histogram!(BACKEND_CONNECT_SECONDS),
            handshake: histogram!(HANDSHAKE_SECONDS),
            to_backend: counter!(BYTES, "direction" => "client_to_server"),
            to_client: counter!(BYTES, "direction" => "server_to_client"),
            routed,
            client_closed: counter!(SESSIONS_ENDED, "reason" => "client_closed"),
            backend_closed: counter!(SESSIONS_ENDED, "reason" => "backend_closed"),
            proxy_headers: counter!(PROXY_HEADERS),
        }
    }

    pub(crate) fn accepted(&self) {
        self.accepted.increment(1);
    }

    pub(crate) fn active(&self, delta: f64) {
        self.active.increment(delta);
    }

    /// A refused connection, by the side at fault and the reason.
    #[cold]
    pub(crate) fn rejected(&self, kind: ErrorKind, reason: &'static str) {
        counter!(CONNECTIONS_REJECTED, "kind" => kind.as_str(), "reason" => reason).increment(1);
    }

    pub(crate) fn ended(&self, reason: &'static str) {
        match reason {
            "client_closed" => self.client_closed.increment(1),
            "backend_closed" => self.backend_closed.increment(1),
            other => counter!(SESSIONS_ENDED, "reason" => other).increment(1),
        }
    }

    pub(crate) fn backend_connect(&self, took: Duration) {
        self.backend_connect.record(took.as_secs_f64());
    }

    pub(crate) fn forwarding(&self, mode: &'static str, reason: &'static str) {
        counter!(SESSIONS_FORWARDING, "mode" => mode, "reason" => reason).increment(1);
    }

    pub(crate) fn handshake(&self, took: Duration) {
        self.handshake.record(took.as_secs_f64());
    }

    #[cold]
    pub(crate) fn cancel(&self, route: &'static str) {
        counter!(CANCEL_REQUESTS, "route" => route).increment(1);
    }

    #[cold]
    pub(crate) fn held(
        &self,
        took: Duration,
        outcome: &'static str,
        route: Route,
        cluster: Arc<str>,
    ) {
        histogram!(HOLD_SECONDS, "outcome" => outcome, "route" => route.as_str(), "cluster" => cluster)
            .record(took.as_secs_f64());
    }

    pub(crate) fn proxy_header_accepted(&self) {
        self.proxy_headers.increment(1);
    }

    pub(crate) fn routed(&self, route: Route, standby: bool) {
        let r = Route::ALL.iter().position(|x| *x == route).unwrap_or(0);
        self.routed[r][usize::from(standby)].increment(1);
    }

    #[cold]
    pub(crate) fn retried(&self, reason: &'static str) {
        counter!(BACKEND_RETRIES, "reason" => reason).increment(1);
    }

    #[cold]
    pub(crate) fn route_refused(&self, route: Route, reason: &'static str) {
        counter!(ROUTE_REFUSED, "route" => route.as_str(), "reason" => reason).increment(1);
    }
}

/// Bytes one session forwarded that are not yet in the shared counter.
/// The session owns it, so counting a read batch writes no cache line that
/// another worker writes; it is flushed once it holds [`FLUSH_BYTES`] and
/// when the session ends.
pub struct LocalBytes {
    pending: AtomicU64,
    shared: Counter,
}

/// Unflushed bytes per session and direction, at most.
pub const FLUSH_BYTES: u64 = 1 << 20;

impl LocalBytes {
    pub fn new(shared: Counter) -> Self {
        LocalBytes {
            pending: AtomicU64::new(0),
            shared,
        }
    }

    fn flush(&self) {
        let n = self.pending.swap(0, Ordering::Relaxed);
        if n > 0 {
            self.shared.increment(n);
        }
    }
}

impl crate::forward::ByteCounter for LocalBytes {
    #[inline]
    fn add(&self, n: u64) {
        // Only this session's task touches `pending`: uncontended.
        let now = self.pending.load(Ordering::Relaxed) + n;
        if now >= FLUSH_BYTES {
            self.pending.store(0, Ordering::Relaxed);
            self.shared.increment(now);
        } else {
            self.pending.store(now, Ordering::Relaxed);
        }
    }
}

impl Drop for LocalBytes {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The byte counters of one session.
pub(crate) struct SessionCounters {
    pub to_backend: LocalBytes,
    pub to_client: LocalBytes,
}

impl SessionCounters {
    pub(crate) fn new(m: &Metrics) -> Self {
        SessionCounters {
            to_backend: LocalBytes::new(m.to_backend.clone()),
            to_client: LocalBytes::new(m.to_client.clone()),
        }
    }
}

/// Publishes a view that replaces `old`: its generation, and its replicas'
/// lag and whether they take new sessions (0 for replicas that left it).
/// Label values are the cluster's name and backend addresses, bounded by
/// the configuration and the cluster's size.
pub(crate) fn view_applied(cluster: &Arc<str>, old: &View, new: &View, limit: &LagLimit) {
    counter!(VIEW_CHANGES, "cluster" => cluster.clone()).increment(1);
    gauge!(VIEW_GENERATION, "cluster" => cluster.clone()).set(new.generation as f64);
    for r in &new.replicas {
        let addr = r.backend.addr().to_owned();
        gauge!(REPLICA_LAG_BYTES, "backend" => addr.clone()).set(r.lag_bytes as f64);
        let ok = if limit.admits(r) { 1.0 } else { 0.0 };
        gauge!(REPLICA_SESSIONS_ALLOWED, "backend" => addr).set(ok);
    }
    for r in &old.replicas {
        if !new.replicas.iter().any(|n| n.backend == r.backend) {
            gauge!(REPLICA_SESSIONS_ALLOWED, "backend" => r.backend.addr().to_owned()).set(0.0);
        }
    }
}
