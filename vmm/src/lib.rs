//! A small KVM virtual machine monitor for the pcache test harness.
//!
//! * [`vm::run`] (or [`Vm::new`] then [`Vm::run`]) boots a guest kernel with a virtio-blk disk and a virtio-pmem
//!   region and returns a [`vm::RunOutcome`]: the [`vm::Outcome`], the guest's
//!   protocol messages and markers, its console, and the traced windows.
//! * [`crash`] saves a traced window and builds crash images from it.
//! * [`trace`] is the persistence trace and its file encoding.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::Path;
//! let mut cfg = vmm::VmConfig::new(
//!     "target/guest/pcache-guest",
//!     "harness.test=pmem-store:0x40:7;pmem-flush",
//!     Path::new("pmem.img"),
//!     Path::new("disk.img"),
//! )?;
//! cfg.trace = true;
//! let run = vmm::run(cfg)?;
//! assert_eq!(run.outcome.exit_code(), Some(0));
//! let saved = run.windows[0].save(Path::new("window"))?;
//! let cut = saved.trace.len() as u64;
//! let images = saved.build_flushed_plus(cut, &saved.trace.pending_at(cut))?;
//! # let _ = images; Ok(()) }
//! ```
//!
//! Module map (Firecracker-like): [`boot`] (kernel, zero page, long mode),
//! [`memory`] (RAM and the pmem slot), [`disk`] (the disk image),
//! [`devices`] (bus, COM1, virtio), [`faults`] (virtio-blk fault
//! injection), [`image_file`] (what a user's image
//! path is, checked before it is opened), [`vm`] (configuration, results,
//! [`Vm`]: construction and teardown), [`vcpu`] (registers, the exit
//! handler, the run loop), [`trace`], [`crash`], [`watchdog`] (time budget).

pub mod boot;
pub mod crash;
pub mod devices;
pub mod disk;
pub mod faults;
pub mod fork;
pub mod image_file;
pub mod memory;
pub mod trace;
pub mod vcpu;
pub mod vm;
pub mod watchdog;

pub use crash::{CrashImages, SavedWindow, TraceWindow, WriteRef};
pub use disk::DiskImage;
pub use faults::{BlkFaults, BlkRequest, FaultError, FaultWhen, InjectedFault};
pub use fork::{ForkConfig, ForkServer, ForkStats};
pub use memory::{ImageMode, PmemRegion};
pub use trace::{Event, Trace};
pub use vm::{
    check_kvm, run, ConsoleConfig, MarkerRecord, Message, Outcome, Registers, RunOutcome, RunStats,
    RunSummary, Vm, VmConfig, VmError,
};
