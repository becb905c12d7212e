//! Power-cut workloads, shared by the host and the guest kernel.
//!
//! A scenario runs a workload of writes in the guest, cuts power, recovers,
//! reads the device back and asks the [`oracle`] whether what it read is
//! allowed. Everything both sides must compute identically lives here:
//!
//! - [`pattern`]: every sector a write puts on the device names its write
//!   and its own address, so a read-back can be classified sector by sector;
//! - [`ops`]: the operations of a workload;
//! - [`gen`]: seeded generators (the guest expands a `gen:` step and the host
//!   recomputes the same op list from the same spec);
//! - [`oracle`]: the durability rule for one workload and one power cut.
//!
//! `no_std` + `alloc` and no floating point: the guest is freestanding.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod gen;
pub mod ops;
pub mod oracle;
pub mod pattern;

pub use gen::{generate, GenError, GenKind, GenSpec};
pub use ops::Op;
pub use oracle::{allowed, check, check_settled, touched_ranges, Allowed, Settled, Violation};
pub use pattern::{classify, classify_range, digest, fill, fill_sector, Tag, TagRun, SECTOR};
