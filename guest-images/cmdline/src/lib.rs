//! The guest kernel's command-line grammar, as plain `no_std` Rust.
//!
//! The guest crate itself is built with freestanding flags and cannot run host
//! tests, so everything that is pure parsing lives here and is unit-tested by
//! `cargo test --workspace` at the repository root. The grammar is documented
//! in `guest-images/README.md`; this crate is its reference implementation.
//!
//! The parsers do not allocate: they return borrowed slices of the command
//! line. Only [`ops_of_steps`] (for the host) and [`RunStep::ops`] build
//! vectors.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

#[cfg(test)]
extern crate std;

mod number;
mod ops;
mod params;
mod run;
mod steps;
mod virtio_mmio;

pub use number::{parse_u64, NumberError};
pub use ops::ops_of_steps;
pub use params::{flag, params, values, Param, Params};
pub use run::{on_off, run_steps, Fault, RunStep, StartMode, StartOptions};
pub use steps::{steps, steps_with_text, Step, StepError, StepErrorKind, Steps};
pub use virtio_mmio::{MmioDevice, MmioDeviceError, VIRTIO_MMIO_KEY};
