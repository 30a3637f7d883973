//! The proxy's side of keelson's HA protocol (safety invariants 1 to 3 and
//! 10): follows one cluster in the cluster store and feeds its view to a
//! [`proxy_core::Proxy`].
//!
//! - The view is derived from `clusterdata` by the pure [`view_of`] and
//!   applied with [`proxy_core::Proxy::apply`], which stores it and then
//!   ends the sessions it removed (the former primary's, and those of
//!   standbys that left the replica set).
//! - The view only moves forward: values not newer (by store revision) than
//!   the one applied are ignored, and the acknowledged generation never
//!   decreases.
//! - The proxy registers at `proxies/<uid>` ([`cluster::data::ProxyReport`])
//!   under a lease whose TTL outlives its freshness window, create-only, so
//!   that a second proxy with the same uid is refused rather than sharing
//!   the acknowledgement.
//! - A view that was not confirmed (a keep-alive that succeeded, then a
//!   linearizable read that succeeded) within `proxy_timeout` names no
//!   servers; the view handle's deadline stops primary sessions on the data
//!   path even before this follower runs again.
//!
//! One follower per cluster: the proxy's own, and one per SNI cluster, each
//! with its own [`proxy_core::ViewHandle`].

mod lease;
pub mod metrics;
mod run;
mod status;
mod view;

use std::sync::Arc;

use cluster::{Keys, Store};
use proxy_core::{Proxy, ViewHandle};

pub use status::FollowStatus;
pub use view::view_of;

/// How often the watchdog looks at the view's deadline (the data path
/// checks it on its own at every wake-up).
const WATCHDOG_TICK: std::time::Duration = std::time::Duration::from_millis(50);

/// Starts following the cluster under `keys` in `store`, feeding `view`
/// (the proxy's own view, `proxy.view()`, or one of its SNI views) of
/// `proxy`, and registering as `uid`. Runs on the current tokio runtime
/// until [`FollowStatus::shutdown`].
pub fn spawn<S: Store>(
    store: S,
    keys: Keys,
    uid: String,
    proxy: Proxy,
    view: ViewHandle,
) -> Arc<FollowStatus> {
    let status = Arc::new(FollowStatus::new(uid, proxy, view));
    tokio::spawn(watchdog(status.clone()));
    tokio::spawn(run::run(store, keys, status.clone()));
    status
}

/// Drops the servers from the view once its validity has passed, and
/// publishes the gauges.
async fn watchdog(status: Arc<FollowStatus>) {
    let mut tick = tokio::time::interval(WATCHDOG_TICK);
    loop {
        tokio::select! {
            _ = status.stopped.cancelled() => return,
            _ = tick.tick() => {}
        }
        status.expire_if_due();
        status.publish();
    }
}
