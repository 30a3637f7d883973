//! The terms of the lease that holds a proxy's registration, and how they
//! bound the proxy's freshness window.
//!
//! The sentinel counts a proxy whose registration has gone (its lease
//! expired) as fenced. So the proxy must stop routing to the primary before
//! its lease can expire:
//! - the proxy's view is valid until `origin + window`, where `origin` is
//!   when the keep-alive that confirmed it was *sent*;
//! - the store counts the lease's TTL from when that keep-alive *arrived*,
//!   which is later;
//! - so `window < ttl` keeps the order, and the TTL adds the keep-alive
//!   period and a store request's timeout on top, so that a late keep-alive
//!   does not let the lease lapse between two renewals.
//!
//! When `proxy_timeout` changes at run time the lease is granted anew with
//! the new TTL and the registration moved under it. Until then the window
//! and the period are the smaller of the old and the new ones: the old lease
//! was sized for the old timeout only.

use std::time::Duration;

use cluster::ClusterSpec;

/// What a lease was granted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeaseTerms {
    /// The `proxy_timeout` the lease was sized for.
    pub proxy_timeout: Duration,
    /// The keep-alive period that goes with it.
    pub period: Duration,
    /// The lease's TTL.
    pub ttl: Duration,
}

impl LeaseTerms {
    /// The terms of a lease granted now under `spec`.
    pub fn for_spec(spec: &ClusterSpec) -> Self {
        LeaseTerms {
            proxy_timeout: spec.proxy_timeout,
            period: spec.proxy_keepalive_period(),
            ttl: spec.proxy_lease_ttl(),
        }
    }

    /// The freshness window under `spec` with this lease.
    pub fn window(&self, spec: &ClusterSpec) -> Duration {
        self.proxy_timeout.min(spec.proxy_timeout)
    }

    /// How often to renew the lease and re-read the store under `spec`.
    pub fn period(&self, spec: &ClusterSpec) -> Duration {
        self.period.min(spec.proxy_keepalive_period())
    }

    /// The terms after `spec` was applied: the spec's own if a lease granted
    /// for it would have the same TTL (nothing to re-grant), else these.
    pub fn adopt(self, spec: &ClusterSpec) -> Self {
        let theirs = Self::for_spec(spec);
        if theirs.ttl == self.ttl {
            theirs
        } else {
            self
        }
    }

    /// Whether `spec` wants a lease with another TTL.
    pub fn needs_regrant(&self, spec: &ClusterSpec) -> bool {
        self.ttl != spec.proxy_lease_ttl()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::store::REQUEST_TIMEOUT;

    fn spec(ms: u64) -> ClusterSpec {
        ClusterSpec {
            proxy_timeout: Duration::from_millis(ms),
            ..Default::default()
        }
    }

    /// The safety relation: a lease outlives the freshness window it backs
    /// by the keep-alive period plus a store request's timeout.
    fn relation_holds(terms: &LeaseTerms, s: &ClusterSpec) -> bool {
        let window = terms.window(s);
        window < terms.ttl && window + terms.period(s) + REQUEST_TIMEOUT <= terms.ttl
    }

    #[test]
    fn a_lease_outlives_the_freshness_it_backs() {
        for ms in [
            1, 100, 250, 999, 1000, 2500, 5000, 5001, 15_000, 60_000, 3_600_000,
        ] {
            let s = spec(ms);
            let t = LeaseTerms::for_spec(&s);
            assert!(relation_holds(&t, &s), "proxy_timeout {ms} ms: {t:?}");
            assert_eq!(t.ttl.subsec_nanos(), 0, "whole seconds (etcd)");
            assert_eq!(t.window(&s), s.proxy_timeout);
            assert!(!t.needs_regrant(&s));
        }
    }

    /// Every run-time change of `proxy_timeout`, before and after the lease
    /// is granted anew: the relation holds at each step.
    #[test]
    fn run_time_changes_keep_the_relation_and_regrant() {
        let timeouts = [
            5000, 15_000, 2500, 200, 100, 8000, 8100, 8200, 1000, 60_000, 5000,
        ];
        let mut terms = LeaseTerms::for_spec(&spec(timeouts[0]));
        for pair in timeouts.windows(2) {
            let (old, new) = (spec(pair[0]), spec(pair[1]));
            terms = terms.adopt(&new);
            // Between the change and the re-grant, with the old lease.
            assert!(relation_holds(&terms, &new), "{pair:?}: {terms:?}");
            if old.proxy_lease_ttl() != new.proxy_lease_ttl() {
                let smaller = old.proxy_timeout.min(new.proxy_timeout);
                assert!(terms.window(&new) <= smaller, "{pair:?}");
            }
            if terms.needs_regrant(&new) {
                assert_ne!(old.proxy_lease_ttl(), new.proxy_lease_ttl(), "{pair:?}");
                terms = LeaseTerms::for_spec(&new);
            }
            // After it: the new timeout in full.
            assert!(!terms.needs_regrant(&new), "{pair:?}");
            assert!(relation_holds(&terms, &new), "{pair:?}: {terms:?}");
            assert_eq!(terms.window(&new), new.proxy_timeout, "{pair:?}");
        }
    }

    #[test]
    fn a_larger_timeout_waits_for_the_new_lease() {
        let old = LeaseTerms::for_spec(&spec(5000));
        let raised = spec(15_000);
        assert!(old.needs_regrant(&raised));
        assert_eq!(old.adopt(&raised), old, "kept until re-granted");
        assert_eq!(old.window(&raised), Duration::from_secs(5));
        let lowered = spec(2000);
        assert_eq!(old.window(&lowered), Duration::from_secs(2), "at once");
        // 8.1 s and 8.2 s need the same 12 s lease: adopted, no re-grant.
        let a = LeaseTerms::for_spec(&spec(8100));
        assert!(!a.needs_regrant(&spec(8200)));
        assert_eq!(
            a.adopt(&spec(8200)).window(&spec(8200)),
            Duration::from_millis(8200)
        );
    }
}
