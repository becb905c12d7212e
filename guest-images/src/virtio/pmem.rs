//! virtio-pmem (device id 27) on virtio-drivers' `Transport` trait and
//! `VirtQueue` (the crate has no pmem driver).
//!
//! The region itself is not reached through the device: it is the memory slot
//! at `PMEM_START` that ring 0's page tables already map. The device gives its
//! config (`start`, `size`) and one request queue whose only request is FLUSH
//! (4-byte type 0 in, 4-byte `ret` out; `ret` != 0 is an error), the
//! durability barrier. Stores into the region are 8-byte volatile stores
//! only, so a traced store is exactly one exit with its exact value.

use super::hal::IdentityHal;
use super::mmio::RawTransport;
use super::wait_used;
use protocol::layout::{PMEM_MAX_SIZE, PMEM_START};
use virtio_drivers::device::common::Feature;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;

const REQUEST_QUEUE: u16 = 0;
/// Flushes are synchronous, one at a time.
const QUEUE_SIZE: usize = 4;
const REQ_TYPE_FLUSH: u32 = 0;
const CONFIG_START: usize = 0;
const CONFIG_SIZE: usize = 8;

pub struct Pmem {
    transport: RawTransport,
    queue: VirtQueue<IdentityHal, QUEUE_SIZE>,
    size: u64,
    /// A store happened since the last completed FLUSH.
    dirty: bool,
}

#[derive(Debug)]
pub enum PmemError {
    NotModern,
    Virtio(virtio_drivers::Error),
    /// The device's region is not where our page tables map pmem.
    Start(u64),
    Size(u64),
    OutOfBounds {
        offset: u64,
        size: u64,
    },
    Misaligned(u64),
    /// The device answered with fewer bytes than the 4-byte `ret`.
    ShortResponse(u32),
    /// FLUSH completed with a non-zero `ret`.
    FlushFailed(u32),
    Timeout,
}

impl core::fmt::Display for PmemError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PmemError::NotModern => f.write_str("virtio-pmem does not offer VIRTIO_F_VERSION_1"),
            PmemError::Virtio(e) => write!(f, "virtio-pmem: {e}"),
            PmemError::Start(s) => {
                write!(
                    f,
                    "virtio-pmem region starts at {s:#x}, not at {PMEM_START:#x}"
                )
            }
            PmemError::Size(s) => {
                write!(
                    f,
                    "virtio-pmem size {s:#x} is zero or above {PMEM_MAX_SIZE:#x}"
                )
            }
            PmemError::OutOfBounds { offset, size } => {
                write!(
                    f,
                    "pmem offset {offset:#x} + 8 is beyond the region's {size:#x} bytes"
                )
            }
            PmemError::Misaligned(o) => write!(f, "pmem offset {o:#x} is not 8-byte aligned"),
            PmemError::ShortResponse(n) => {
                write!(f, "virtio-pmem answered FLUSH with {n} bytes, not 4")
            }
            PmemError::FlushFailed(r) => write!(f, "virtio-pmem FLUSH returned {r:#x}"),
            PmemError::Timeout => f.write_str("virtio-pmem did not complete FLUSH"),
        }
    }
}

impl From<virtio_drivers::Error> for PmemError {
    fn from(e: virtio_drivers::Error) -> Self {
        PmemError::Virtio(e)
    }
}

impl Pmem {
    /// Initialises the device (virtio 3.1.1) and checks its region against the map.
    pub fn new(mut transport: RawTransport) -> Result<Self, PmemError> {
        let features = transport.begin_init(Feature::VERSION_1);
        if !features.contains(Feature::VERSION_1) {
            transport.set_status(virtio_drivers::transport::DeviceStatus::FAILED);
            return Err(PmemError::NotModern);
        }
        let (start, size) = transport.read_consistent(|| {
            Ok((
                transport.read_config_space::<u64>(CONFIG_START)?,
                transport.read_config_space::<u64>(CONFIG_SIZE)?,
            ))
        })?;
        let bad = if start != PMEM_START {
            Some(PmemError::Start(start))
        } else if size == 0 || size > PMEM_MAX_SIZE {
            Some(PmemError::Size(size))
        } else {
            None
        };
        if let Some(e) = bad {
            // Tell the device we gave up on it (virtio 3.1.1).
            transport.set_status(virtio_drivers::transport::DeviceStatus::FAILED);
            return Err(e);
        }
        let queue = VirtQueue::new(&mut transport, REQUEST_QUEUE, false, false)?;
        transport.finish_init();
        Ok(Pmem {
            transport,
            queue,
            size,
            dirty: false,
        })
    }

    /// The region's first byte (virtual = physical, mapped by ring 0).
    pub fn base(&self) -> *mut u8 {
        PMEM_START as *mut u8
    }

    /// The region's size in bytes, as the device reports it.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// One 8-byte volatile store of `value` at byte `offset`.
    pub fn store_u64(&mut self, offset: u64, value: u64) -> Result<(), PmemError> {
        if !offset.is_multiple_of(8) {
            return Err(PmemError::Misaligned(offset));
        }
        if offset.checked_add(8).is_none_or(|end| end > self.size) {
            return Err(PmemError::OutOfBounds {
                offset,
                size: self.size,
            });
        }
        // SAFETY: inside the mapped region, aligned; pmem is plain memory to us.
        unsafe {
            self.base()
                .add(offset as usize)
                .cast::<u64>()
                .write_volatile(value)
        };
        self.dirty = true;
        Ok(())
    }

    /// Whether a store happened since the last successful FLUSH.
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// FLUSH: returns when the device reports every earlier store durable.
    pub fn flush(&mut self) -> Result<(), PmemError> {
        let req = REQ_TYPE_FLUSH.to_le_bytes();
        // Pre-set to non-zero so that a device that never writes `ret` fails.
        let mut resp = [0xffu8; 4];
        let used = wait_used(
            &mut self.queue,
            &mut self.transport,
            REQUEST_QUEUE,
            &[&req],
            &mut [&mut resp],
        )
        .map_err(|e| e.map_or(PmemError::Timeout, PmemError::Virtio))?;
        if used < 4 {
            return Err(PmemError::ShortResponse(used));
        }
        match u32::from_le_bytes(resp) {
            0 => {
                self.dirty = false;
                Ok(())
            }
            ret => Err(PmemError::FlushFailed(ret)),
        }
    }
}
