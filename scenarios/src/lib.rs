//! Scripted power-cut scenarios: the pieces that do not need a VM.
//!
//! - [`spec`]: scenario files (format in `scenarios/README.md`).
//! - [`persistence`]: persistence models that turn a traced window into crash states.

pub mod persistence;
pub mod spec;
