//! Scripted power-cut scenarios: the pieces that do not need a VM.
//!
//! - [`spec`]: scenario files (format in `scenarios/README.md`).
//! - [`persistence`]: persistence models that turn a traced window into crash states.
//! - [`recipe`]: the device images a scenario starts from.
//! - [`result`]: the result file of a run and the checks of expectations.

pub mod persistence;
pub mod recipe;
pub mod result;
pub mod spec;
