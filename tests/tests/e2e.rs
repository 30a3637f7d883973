//! End-to-end tests of keelson against real PostgreSQL servers.
//!
//! One test binary; each module covers one area. Every test starts its own
//! PostgreSQL on a free port and checks what a client would see.

mod support;

/// The keepers' and sentinels' node API, with curl and a real HAProxy.
mod api;

/// WAL archiving, backups and restores through a real pgBackRest.
mod backup;

/// Garbage, malformed and hostile input during the startup phase.
mod bad_input;
/// Graceful shutdown, the binary's configuration sources and admin endpoints.
mod binary;
/// Query cancellation through the proxy.
mod cancel;
/// Real clients through the proxy: psql, tokio-postgres, SCRAM, TLS.
mod clients;
/// COPY of 100 MB each way, byte-exact.
mod copy;
/// Automatic failover with real keepers and a sentinel.
mod failover;
/// The store-outage failsafe: a primary keeps serving while its peers
/// promise not to promote; cut from them too, it fences.
mod failsafe;
/// The proxy following a cluster store: routing, fencing, holding, outages.
mod fencing;
/// The keeper's PostgreSQL primitives: initdb, basebackup, reports, promotion.
mod keeper;
/// Connection limits, backend failures, concurrency and idle connections.
mod limits;
/// L7 routing: replica routes, lag limits, role checks, direct TLS, PROXY
/// protocol, SNI.
mod routing;
/// The HA safety findings end to end: dead PostgreSQL under live keepers,
/// synchronous mode across failovers, fencing, adoption, divergence.
mod safety;
/// A secured etcd: TLS with client certificates, and authentication.
mod secured;
/// Standby clusters following another cluster or a PostgreSQL outside
/// keelson, and the migration recipe.
mod standby;
/// The store conformance suite, against the file store and etcd.
mod store;
/// PostgreSQL 13 to 18 and a libpq 18 client (fetched by scripts/pg-versions).
mod versions;
