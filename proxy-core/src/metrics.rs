//! Metric names and the handles a session looks up once. Labels are fixed
//! enums, never per-connection values. Bytes are counted once per read
//! batch through cached handles, never per message.
//!
//! The embedder installs the recorder (the `keelson` binary uses
//! Prometheus); without one every call is a no-op.

use std::sync::Arc;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Unit,
};

use crate::route::LagLimit;
use crate::view::View;

pub const CONNECTIONS_ACCEPTED: &str = "keelson_connections_accepted_total";
pub const CONNECTIONS_ACTIVE: &str = "keelson_connections_active";
pub const CONNECTIONS_REJECTED: &str = "keelson_connections_rejected_total";
pub const SESSIONS_ENDED: &str = "keelson_sessions_ended_total";
pub const BYTES: &str = "keelson_bytes_total";
pub const BACKEND_CONNECT_SECONDS: &str = "keelson_backend_connect_seconds";
pub const HANDSHAKE_SECONDS: &str = "keelson_handshake_seconds";
pub const CANCEL_REQUESTS: &str = "keelson_cancel_requests_total";
pub const HOLD_SECONDS: &str = "keelson_hold_seconds";
pub const SESSIONS_ROUTED: &str = "keelson_sessions_routed_total";
pub const ROUTE_REFUSED: &str = "keelson_route_refused_total";
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
        "Client connections refused before a session was established, by reason."
    );
    describe_counter!(
        SESSIONS_ENDED,
        "Established sessions that ended, by reason (fenced, stale, replica_promoted, replica_removed, replica_lag, shutdown, ...)."
    );
    describe_counter!(BYTES, Unit::Bytes, "Bytes forwarded, by direction.");
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

/// Handles a session uses on its data path.
pub struct SessionCounters {
    pub to_backend: Counter,
    pub to_client: Counter,
}

impl SessionCounters {
    pub fn new() -> Self {
        SessionCounters {
            to_backend: counter!(BYTES, "direction" => "client_to_server"),
            to_client: counter!(BYTES, "direction" => "server_to_client"),
        }
    }
}

impl Default for SessionCounters {
    fn default() -> Self {
        Self::new()
    }
}

pub(crate) fn accepted() {
    counter!(CONNECTIONS_ACCEPTED).increment(1);
}

pub(crate) fn active(delta: f64) {
    gauge!(CONNECTIONS_ACTIVE).increment(delta);
}

pub(crate) fn rejected(reason: &'static str) {
    counter!(CONNECTIONS_REJECTED, "reason" => reason).increment(1);
}

pub(crate) fn ended(reason: &'static str) {
    counter!(SESSIONS_ENDED, "reason" => reason).increment(1);
}

pub(crate) fn backend_connect(secs: f64) {
    histogram!(BACKEND_CONNECT_SECONDS).record(secs);
}

pub(crate) fn handshake(secs: f64) {
    histogram!(HANDSHAKE_SECONDS).record(secs);
}

pub(crate) fn cancel(route: &'static str) {
    counter!(CANCEL_REQUESTS, "route" => route).increment(1);
}

pub(crate) fn held(secs: f64, outcome: &'static str, route: &'static str, cluster: Arc<str>) {
    histogram!(HOLD_SECONDS, "outcome" => outcome, "route" => route, "cluster" => cluster)
        .record(secs);
}

pub(crate) fn proxy_header_accepted() {
    counter!(PROXY_HEADERS).increment(1);
}

pub(crate) fn routed(route: &'static str, standby: bool) {
    let server = if standby { "standby" } else { "primary" };
    counter!(SESSIONS_ROUTED, "route" => route, "server" => server).increment(1);
}

pub(crate) fn route_refused(route: &'static str, reason: &'static str) {
    counter!(ROUTE_REFUSED, "route" => route, "reason" => reason).increment(1);
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
