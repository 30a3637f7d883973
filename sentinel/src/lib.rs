//! keelson's sentinel: leader election through the store, the pure
//! decision function, and the loop that applies it.

pub mod decide;
pub mod run;

#[cfg(test)]
mod decide_tests;

pub use decide::{decide, Observations};
