//! virtio-blk through virtio-drivers' `VirtIOBlk` on its `MmioTransport`.

use super::hal::IdentityHal;
use super::mmio::Window;
use core::ptr::NonNull;
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, VirtIOHeader};
use virtio_drivers::transport::Transport;

/// VIRTIO_BLK_F_FLUSH.
const FEATURE_FLUSH: u64 = 1 << 9;

pub const SECTOR: usize = SECTOR_SIZE;

pub struct Blk {
    dev: VirtIOBlk<IdentityHal, MmioTransport<'static>>,
    flush: bool,
}

#[derive(Debug)]
pub enum BlkError {
    Transport(MmioError),
    Virtio(virtio_drivers::Error),
    OutOfRange {
        sector: u64,
        capacity: u64,
    },
    /// `VirtIOBlk::flush` silently does nothing without this feature; we refuse instead.
    NoFlush,
}

impl core::fmt::Display for BlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BlkError::Transport(e) => write!(f, "virtio-blk transport: {e}"),
            BlkError::Virtio(e) => write!(f, "virtio-blk: {e}"),
            BlkError::OutOfRange { sector, capacity } => {
                write!(f, "sector {sector} is beyond the disk's {capacity} sectors")
            }
            BlkError::NoFlush => f.write_str("virtio-blk does not offer VIRTIO_BLK_F_FLUSH"),
        }
    }
}

impl From<virtio_drivers::Error> for BlkError {
    fn from(e: virtio_drivers::Error) -> Self {
        BlkError::Virtio(e)
    }
}

impl Blk {
    pub fn new(window: Window) -> Result<Self, BlkError> {
        let header =
            NonNull::new(window.base as *mut VirtIOHeader).expect("window base is non-zero");
        // SAFETY: a validated, mapped window used by nothing else, for the kernel's lifetime.
        let mut transport = unsafe { MmioTransport::new(header, window.size as usize) }
            .map_err(BlkError::Transport)?;
        let flush = transport.read_device_features() & FEATURE_FLUSH != 0;
        let dev = VirtIOBlk::new(transport)?;
        Ok(Blk { dev, flush })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.dev.capacity()
    }

    fn check(&self, sector: u64) -> Result<usize, BlkError> {
        let capacity = self.capacity();
        if sector >= capacity {
            return Err(BlkError::OutOfRange { sector, capacity });
        }
        usize::try_from(sector).map_err(|_| BlkError::OutOfRange { sector, capacity })
    }

    pub fn write_sector(&mut self, sector: u64, data: &[u8; SECTOR]) -> Result<(), BlkError> {
        let s = self.check(sector)?;
        Ok(self.dev.write_blocks(s, data)?)
    }

    pub fn read_sector(&mut self, sector: u64, data: &mut [u8; SECTOR]) -> Result<(), BlkError> {
        let s = self.check(sector)?;
        Ok(self.dev.read_blocks(s, data)?)
    }

    pub fn flush(&mut self) -> Result<(), BlkError> {
        if !self.flush {
            return Err(BlkError::NoFlush);
        }
        Ok(self.dev.flush()?)
    }
}
