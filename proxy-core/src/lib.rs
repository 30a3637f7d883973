//! keelson's proxy data path, as an embeddable library.
//!
//! A [`Proxy`] accepts PostgreSQL clients, understands the startup phase
//! (SSL and GSS encryption requests, cancel requests, startup messages),
//! routes each session to the backend named by the current [`View`], relays
//! authentication untouched and then forwards bytes with pooled buffers. It
//! knows where every server message starts, so when a session must end
//! (its backend was fenced, or the proxy is shutting down) the client gets a
//! clean FATAL rather than a reset.
//!
//! The view is fed by the embedder: it builds a [`View`] and hands it to
//! [`Proxy::apply`] with the [`ViewHandle`] of its cluster, which stores it
//! and then ends the sessions the new view removed. An embedder that follows
//! a store also advances the handle's validity deadline at each
//! confirmation ([`ViewHandle::set_valid_until`]); primary sessions stop
//! forwarding once it passes. This crate has no store or CLI code (the
//! `keelson-follow` crate follows keelson's cluster store).

// The public API: the proxy handle and its configuration (re-exported
// below), views, fences, errors, routes, metric names, TLS loading, the
// wire codec and the forwarding loop.
pub mod error;
pub mod fence;
pub mod forward;
pub mod metrics;
pub mod protocol;
pub mod proxy_protocol;
pub mod route;
pub mod tls;
pub mod view;

// Internals: one session's steps and what they share.
mod backend;
mod cancel;
mod handshake;
// Kernel forwarding: a listener's `forwarding = "kernel"`.
#[cfg(target_os = "linux")]
mod kernel;
mod pool;
mod proxy;
mod session;
mod stream;

pub use backend::SocketOptions;
pub use error::{ErrorKind, SessionError};
pub use fence::{FenceReason, Role};
pub use proxy::{
    kernel_forwarding, Applied, Ended, ForwardingMode, ListenerOptions, Proxy, ProxyConfig,
    ViewChange,
};
pub use route::{LagLimit, Route, Rule, FENCED_BACKEND_LINGER};
pub use view::{Backend, Deadline, Replica, View, ViewGuard, ViewHandle};
