//! Scripted power-cut scenarios: scenario files, persistence models, device
//! recipes and image generators, and the runner that boots recovery on every
//! crash state in fresh VMs.
//!
//! - [`spec`]: scenario files (format in `scenarios/README.md`).
//! - [`durability`]: the read-back of a state judged by the durability rule.
//! - [`explore`]: `cargo xtask explore`'s scenario: a whole trace, its own expectations.
//! - [`generate`]: image variants for scenarios without a power cut.
//! - [`guest`]: the guest's command lines and step results.
//! - [`persistence`]: persistence models that turn a traced window into crash states.
//! - [`recipe`]: the device images a scenario starts from.
//! - [`runner`]: runs a scenario: workload, crash states, recovery boots, verdicts.
//! - [`result`]: the result file of a run and the checks of expectations.
//! - [`report`]: the run's report page (`report.html`), from its result.

pub mod durability;
pub mod explore;
pub mod generate;
pub mod guest;
pub mod persistence;
pub mod recipe;
pub mod report;
pub mod result;
pub mod runner;
pub mod spec;
