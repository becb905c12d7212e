//! Virtio devices for the VMM: the virtio-mmio transport (version 2, modern
//! only), virtio-blk and virtio-pmem.
//!
//! How the VMM uses this module:
//!
//! 1. Build a device: [`Block::new`] with a [`BlockBackend`] (for example
//!    [`FileBackend`]) or [`Pmem::new`] with the region's guest-physical
//!    start/size and a [`PmemBackend`]; give each an [`IoObserver`] (the
//!    tracer) with `set_observer`.
//! 2. Wrap it in an [`MmioTransport`] with the guest memory (a clone of the
//!    VMM's `GuestMemoryMmap`; its regions are shared, not copied) and,
//!    optionally, an interrupt [`EventFd`] that the VMM registers as an irqfd.
//!    Give the transports RAM only, not the pmem region: device DMA into a
//!    traced pmem region would bypass the trace, and with RAM only such a
//!    buffer is simply "outside guest memory" (the request fails).
//! 3. Route every guest MMIO access inside the device's window
//!    ([`MMIO_WINDOW_SIZE`] bytes) to [`MmioTransport::read`] /
//!    [`MmioTransport::write`] with the offset from the window's base.
//!
//! Requests are processed synchronously inside the `QueueNotify` write, on the
//! vCPU thread: there are no worker threads. When the write returns, the used
//! ring is updated, the backend has the data, and the observer has been told.
//!
//! Everything the guest controls (register values, queue addresses, descriptor
//! chains, request headers) is validated; bad input ends in an error status for
//! the request, in `DEVICE_NEEDS_RESET`, or in an ignored register access,
//! never in a panic or a hang.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::faults::BlkRequest;

pub use vmm_sys_util::eventfd::EventFd;

mod blk;
mod chain;
mod mmio;
mod pmem;

pub use blk::{Block, BLK_ID_BYTES, MAX_REQUEST_BYTES, SECTOR_SIZE};
pub use mmio::{MmioTransport, TransportError, MMIO_WINDOW_SIZE};
pub use pmem::{Pmem, VIRTIO_PMEM_REQ_TYPE_FLUSH, VIRTIO_PMEM_RESP_EIO, VIRTIO_PMEM_RESP_OK};

/// Virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Virtio device id of a persistent-memory device.
pub const VIRTIO_ID_PMEM: u32 = 27;

/// Feature bit `VIRTIO_F_VERSION_1` as a mask: every device offers it and the
/// transport refuses `FEATURES_OK` without it.
pub const FEATURE_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1 as u64;

/// Guest memory type used by the devices (no dirty bitmap).
pub type GuestMem = GuestMemoryMmap<()>;

/// Why a device could not complete a descriptor chain and needs a reset.
///
/// Returned by [`VirtioDevice::process_queue`]; the transport then sets
/// `DEVICE_NEEDS_RESET` in the status register, raises a configuration-change
/// interrupt and ignores further notifications until the driver resets it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The available ring could not be read (bad index or address).
    #[error("available ring is invalid: {0}")]
    AvailRing(virtio_queue::Error),
    /// The chain yields no descriptor: its head index is outside the
    /// descriptor table, or it starts with a bad indirect table.
    #[error("descriptor chain at head {0} has no readable descriptor")]
    EmptyChain(u16),
    /// The chain loops, is longer than the queue, or links to a descriptor
    /// outside the table.
    #[error("descriptor chain starting at {0} loops or is longer than the queue")]
    Unterminated(u16),
    /// There is no device-writable byte (in guest memory) to put a status or
    /// response into, so the request cannot be completed at all.
    #[error("descriptor chain starting at {0} has no writable status/response")]
    NoStatus(u16),
    /// The used ring could not be written.
    #[error("used ring update failed: {0}")]
    UsedRing(virtio_queue::Error),
}

/// Same variant and same cause. virtio-queue's error has no `PartialEq`, so
/// ring errors compare by their message.
impl PartialEq for DeviceError {
    fn eq(&self, other: &Self) -> bool {
        use DeviceError::*;
        match (self, other) {
            (AvailRing(a), AvailRing(b)) | (UsedRing(a), UsedRing(b)) => {
                a.to_string() == b.to_string()
            }
            (EmptyChain(a), EmptyChain(b))
            | (Unterminated(a), Unterminated(b))
            | (NoStatus(a), NoStatus(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for DeviceError {}

/// A virtio device model behind a transport.
///
/// All methods are called on the vCPU thread, one at a time.
pub trait VirtioDevice: Send {
    /// Virtio device id ([`VIRTIO_ID_BLOCK`], [`VIRTIO_ID_PMEM`], ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (each a power of two); the length of the
    /// slice is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers, [`FEATURE_VERSION_1`] included.
    fn avail_features(&self) -> u64;
    /// Copies device configuration space bytes at `offset` into `data`.
    /// Bytes outside the configuration space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Called when the driver sets `DRIVER_OK`, with the features it accepted.
    fn activate(&mut self, acked_features: u64) {
        let _ = acked_features;
    }
    /// Called when the driver resets the device (status 0).
    fn reset(&mut self) {}
    /// Processes every available chain of queue `index`.
    ///
    /// Returns `Ok(true)` if the used ring was updated (an interrupt is due),
    /// `Ok(false)` if there was nothing to do, and `Err` if a chain could not
    /// be completed (the device then needs a reset).
    fn process_queue(
        &mut self,
        index: usize,
        mem: &GuestMem,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError>;
}

/// Receives device I/O in the order it happens, for the persistence trace.
///
/// Each call happens after the operation reached its backend and before the
/// request is marked used, so the trace order matches what the guest can
/// observe. The default methods do nothing.
pub trait IoObserver: Send {
    /// A virtio-blk OUT request of `data` at 512-byte `sector` reached the
    /// backend.
    fn blk_write(&mut self, sector: u64, data: &[u8]) {
        let _ = (sector, data);
    }
    /// A virtio-blk FLUSH returned from the backend.
    fn blk_flush(&mut self) {}
    /// A virtio-blk request was failed on purpose (the fault plan): nothing
    /// reached the backend. `sector` is a write's first sector.
    fn blk_fault(&mut self, kind: BlkRequest, nth: u64, sector: Option<u64>) {
        let _ = (kind, nth, sector);
    }
    /// A virtio-pmem FLUSH returned from the backend successfully.
    fn pmem_flush(&mut self) {}
}

/// An observer that ignores everything (the default of each device).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl IoObserver for NoopObserver {}

/// Storage behind a virtio-blk device.
pub trait BlockBackend: Send {
    /// Size in bytes. The device exposes `size / 512` sectors; a trailing
    /// partial sector is not accessible.
    fn size(&self) -> u64;
    /// Fills `buf` from byte `offset` (the whole buffer or an error).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at byte `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
}

/// A [`BlockBackend`] on a regular file (writes go straight to the file;
/// `flush` is `fdatasync`).
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
}

impl FileBackend {
    /// Uses an open file; its size is taken now and does not change.
    pub fn new(file: File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }

    /// Opens `path` read-write.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::options().read(true).write(true).open(path)?;
        Self::new(file)
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Durability behind a virtio-pmem device. The VMM maps the memory itself (a
/// KVM slot); the device only asks the backend to make stores durable.
pub trait PmemBackend: Send {
    /// Makes every store to the region durable: `msync` of the mapping for a
    /// real file, nothing for a copy-on-write crash image.
    fn flush(&mut self) -> io::Result<()>;
}

#[cfg(test)]
mod blk_tests;
#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod mmio_tests;
#[cfg(test)]
mod pmem_tests;
#[cfg(test)]
pub(crate) mod testutil;
