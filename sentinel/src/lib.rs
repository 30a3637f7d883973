//! keelson's sentinel. This crate holds the decision function; the leader
//! election and the reconcile loop around it come with the failover work.

pub mod decide;

#[cfg(test)]
mod decide_tests;

pub use decide::{decide, Observations};
