//! `pcache::backing::Backing` over virtio-blk: 512-byte sectors, bounds
//! checked against the disk's capacity (by the driver's wrapper), `flush` a
//! virtio-blk FLUSH (refused when the device does not offer it). Reads that
//! miss the cache come from it; writeback (issue 12) will write to it.

use crate::virtio::blk::{Blk, BlkError, SECTOR};
use alloc::format;
use pcache::backing::{Backing, BackingError};

/// `pcache::backing::Backing` over virtio-blk (whose wrapper checks every
/// transfer against the capacity).
pub struct GuestBacking<'a>(pub &'a mut Blk);

fn blk_error(e: BlkError) -> BackingError {
    match e {
        BlkError::OutOfRange {
            sector,
            count,
            capacity,
        } => BackingError::OutOfBounds {
            sector,
            sectors: count,
            size: capacity,
        },
        BlkError::Length(len) => BackingError::PartialSector { len },
        e => BackingError::Io(format!("{e}")),
    }
}

impl GuestBacking<'_> {
    /// An empty transfer is a no-op once its position is checked (the
    /// driver refuses empty transfers).
    fn empty(&self, sector: u64) -> Result<(), BackingError> {
        let size = self.0.capacity();
        if sector > size {
            return Err(BackingError::OutOfBounds {
                sector,
                sectors: 0,
                size,
            });
        }
        Ok(())
    }
}

impl Backing for GuestBacking<'_> {
    fn sectors(&self) -> u64 {
        self.0.capacity()
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        if buf.is_empty() {
            return self.empty(sector);
        }
        if !buf.len().is_multiple_of(SECTOR) {
            return Err(BackingError::PartialSector { len: buf.len() });
        }
        self.0.read_sectors(sector, buf).map_err(blk_error)
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BackingError> {
        if buf.is_empty() {
            return self.empty(sector);
        }
        if !buf.len().is_multiple_of(SECTOR) {
            return Err(BackingError::PartialSector { len: buf.len() });
        }
        self.0.write_sectors(sector, buf).map_err(blk_error)
    }

    fn flush(&mut self) -> Result<(), BackingError> {
        self.0.flush().map_err(blk_error)
    }
}
