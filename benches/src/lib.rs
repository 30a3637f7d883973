//! Shared code of keelson's benchmark harnesses.

pub mod harness;
