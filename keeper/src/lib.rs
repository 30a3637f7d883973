//! keelson's keeper: drives one local PostgreSQL (initdb, start and stop,
//! standby creation with pg_basebackup, promotion) and reads the state the
//! sentinel needs from it: [`pg`] holds the PostgreSQL primitives, [`run`]
//! the reconcile loop around them.

pub mod backup;
pub mod control;
pub mod failsafe;
pub mod guard;
pub mod lease;
pub mod names;
pub mod node;
pub mod pg;
pub mod postmaster;
pub mod process;
pub mod run;

pub use names::{slot_name, validate_uid};
pub use pg::{Instance, PgBin, PgError, Replication, Upstream};
