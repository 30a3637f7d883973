//! keelson's keeper: drives one local PostgreSQL (initdb, start and stop,
//! standby creation with pg_basebackup, promotion) and reads the state the
//! sentinel needs from it. This crate holds the PostgreSQL primitives; the
//! reconcile loop around them comes with the failover work.

pub mod pg;
pub mod process;
pub mod run;

pub use pg::{Instance, PgBin, PgError};
