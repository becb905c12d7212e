//! virtio-blk through virtio-drivers' `VirtIOBlk` on its `MmioTransport`.

use super::hal::IdentityHal;
use super::mmio::Window;
use core::ptr::NonNull;
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, VirtIOHeader};

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
        count: u64,
        capacity: u64,
    },
    /// A transfer that is empty or not a whole number of sectors.
    Length(usize),
    /// `VirtIOBlk::flush` silently does nothing without this feature; we refuse instead.
    NoFlush,
}

impl core::fmt::Display for BlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BlkError::Transport(e) => write!(f, "virtio-blk transport: {e}"),
            BlkError::Virtio(e) => write!(f, "virtio-blk: {e}"),
            BlkError::OutOfRange {
                sector,
                count,
                capacity,
            } => write!(
                f,
                "sectors {sector}..+{count} are beyond the disk's {capacity} sectors"
            ),
            BlkError::Length(n) => write!(f, "transfer of {n} bytes is not whole sectors"),
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
        // Bit 9 lies in the low word: read it before the transport owns the window.
        let flush = u64::from(window.device_features_low()) & FEATURE_FLUSH != 0;
        let header =
            NonNull::new(window.base as *mut VirtIOHeader).expect("window base is non-zero");
        // SAFETY: a validated, mapped window used by nothing else, for the kernel's lifetime.
        let transport = unsafe { MmioTransport::new(header, window.size as usize) }
            .map_err(BlkError::Transport)?;
        let dev = VirtIOBlk::new(transport)?;
        Ok(Blk { dev, flush })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.dev.capacity()
    }

    /// The first sector of `len` bytes at `sector`, checked against the disk's end.
    fn check(&self, sector: u64, len: usize) -> Result<usize, BlkError> {
        if len == 0 || !len.is_multiple_of(SECTOR) {
            return Err(BlkError::Length(len));
        }
        let capacity = self.capacity();
        let count = (len / SECTOR) as u64;
        let out_of_range = BlkError::OutOfRange {
            sector,
            count,
            capacity,
        };
        if sector.checked_add(count).is_none_or(|end| end > capacity) {
            return Err(out_of_range);
        }
        usize::try_from(sector).map_err(|_| out_of_range)
    }

    /// Writes `data` (a non-zero multiple of 512 bytes) from `sector` on.
    pub fn write_sectors(&mut self, sector: u64, data: &[u8]) -> Result<(), BlkError> {
        let s = self.check(sector, data.len())?;
        Ok(self.dev.write_blocks(s, data)?)
    }

    /// Reads `data.len()` bytes (a non-zero multiple of 512) from `sector` on.
    pub fn read_sectors(&mut self, sector: u64, data: &mut [u8]) -> Result<(), BlkError> {
        let s = self.check(sector, data.len())?;
        Ok(self.dev.read_blocks(s, data)?)
    }

    pub fn flush(&mut self) -> Result<(), BlkError> {
        if !self.flush {
            return Err(BlkError::NoFlush);
        }
        Ok(self.dev.flush()?)
    }
}
