//! A small KVM virtual machine monitor for the pcache test harness.
//!
//! * [`vm::run`] boots a guest kernel with a virtio-blk disk and a virtio-pmem
//!   region and returns a [`vm::RunResult`]: the [`vm::Outcome`], the guest's
//!   protocol messages and markers, its console, and the traced windows.
//! * [`crash`] saves a traced window and builds crash images from it.
//! * [`trace`] is the persistence trace and its file encoding.
//!
//! Module map (Firecracker-like): [`boot`] (kernel, zero page, long mode),
//! [`memory`] (RAM and the pmem slot), [`disk`] (the disk image),
//! [`devices`] (bus, COM1, virtio), [`vm`] (setup and the vCPU loop),
//! [`watchdog`] (time budget).

pub mod boot;
pub mod crash;
pub mod devices;
pub mod disk;
pub mod memory;
pub mod trace;
pub mod vm;
pub mod watchdog;

pub use crash::{CrashImages, SavedWindow, TraceWindow, WriteRef};
pub use disk::DiskImage;
pub use memory::{ImageMode, PmemRegion};
pub use trace::{Event, Trace};
pub use vm::{run, Message, Outcome, Registers, RunResult, VmConfig, VmError};
