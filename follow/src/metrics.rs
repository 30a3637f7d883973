//! Metric names of the follower. Every one has a `cluster` label: the name
//! of the view it feeds (the proxy's cluster, or an SNI cluster), bounded by
//! the configuration.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const VIEW_AGE_SECONDS: &str = "keelson_view_age_seconds";
pub const READY: &str = "keelson_ready";
pub const FENCE_SECONDS: &str = "keelson_fence_seconds";
pub const STORE_ERRORS: &str = "keelson_store_errors_total";
pub const REGISTRATION_CONFLICTS: &str = "keelson_registration_conflicts_total";
pub const OUTDATED_VALUES: &str = "keelson_view_outdated_values_total";
pub const LEASE_REGRANTS: &str = "keelson_lease_regrants_total";

/// Registers help texts. Call once after installing a recorder.
pub fn describe() {
    describe_gauge!(
        VIEW_AGE_SECONDS,
        Unit::Seconds,
        "Time since the view was last confirmed against the cluster store (measured from when the confirming keep-alive was sent)."
    );
    describe_gauge!(
        READY,
        "1 while the view is confirmed, names a primary and this proxy's registration is its own, else 0."
    );
    describe_histogram!(
        FENCE_SECONDS,
        Unit::Seconds,
        "From applying a view to the last session it ended closing."
    );
    describe_counter!(
        STORE_ERRORS,
        "Cluster store operations that failed, by operation (read, watch, keepalive, grant, register, revoke, parse)."
    );
    describe_counter!(
        REGISTRATION_CONFLICTS,
        "Registration attempts refused because another proxy instance is registered under this proxy's uid."
    );
    describe_counter!(
        OUTDATED_VALUES,
        "clusterdata values ignored because a newer store revision had already been applied (replayed or overtaken watch events, late reads)."
    );
    describe_counter!(
        LEASE_REGRANTS,
        "Registration leases granted anew because proxy_timeout changed."
    );
}
