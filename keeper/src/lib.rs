//! keelson's keeper: drives one local PostgreSQL (initdb, start and stop,
//! standby creation with pg_basebackup, promotion) and reads the state the
//! sentinel needs from it: [`pg`] holds the PostgreSQL primitives, [`run`]
//! the reconcile loop around them.

pub mod pg;
pub mod process;
pub mod run;

pub use pg::{slot_name, Instance, PgBin, PgError, Replication, Upstream};
