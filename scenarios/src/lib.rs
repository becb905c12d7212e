//! Scripted power-cut scenarios: the pieces that do not need a VM.
//!
//! - [`persistence`]: persistence models that turn a traced window into crash states.

pub mod persistence;
