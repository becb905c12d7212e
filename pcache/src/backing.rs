//! The backing device: the slow block device the cache fronts, in 512-byte
//! sectors. Reads that miss the cache come from it (`cache_req`); writeback
//! (issue 12) will write to it.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Bytes per sector.
pub const SECTOR: usize = 512;

/// Errors of a backing-device access.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BackingError {
    /// The access reaches past the end of the device.
    #[error(
        "access of {sectors} sectors at sector {sector} is beyond the device ({size} sectors)"
    )]
    OutOfBounds {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Device size in sectors.
        size: u64,
    },
    /// A buffer that is not a whole number of sectors.
    #[error("buffer of {len} bytes is not a whole number of 512-byte sectors")]
    PartialSector {
        /// Buffer length.
        len: usize,
    },
    /// A write to a read-only device.
    #[error("the backing device is open read-only")]
    ReadOnly,
    /// An I/O error of the device.
    #[error("I/O error: {0}")]
    Io(String),
}

impl serde::Serialize for BackingError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn check(sector: u64, len: usize, size: u64) -> Result<(), BackingError> {
    if len % SECTOR != 0 {
        return Err(BackingError::PartialSector { len });
    }
    let sectors = (len / SECTOR) as u64;
    match sector.checked_add(sectors) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BackingError::OutOfBounds {
            sector,
            sectors,
            size,
        }),
    }
}

/// A block device of 512-byte sectors with a volatile write cache: writes are
/// durable only after [`Backing::flush`].
pub trait Backing {
    /// Size in sectors.
    fn sectors(&self) -> u64;
    /// Reads whole sectors starting at `sector`.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BackingError>;
    /// Writes whole sectors starting at `sector`.
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BackingError>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), BackingError>;
}

/// A backing device in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VecBacking {
    buf: Vec<u8>,
}

impl VecBacking {
    /// A zeroed device of `sectors` sectors.
    pub fn new(sectors: u64) -> Self {
        VecBacking {
            buf: vec![0; sectors as usize * SECTOR],
        }
    }

    /// A device holding `buf` (its length a multiple of 512).
    pub fn from_vec(buf: Vec<u8>) -> Self {
        VecBacking { buf }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }
}

impl Backing for VecBacking {
    fn sectors(&self) -> u64 {
        (self.buf.len() / SECTOR) as u64
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        check(sector, buf.len(), self.sectors())?;
        let o = sector as usize * SECTOR;
        buf.copy_from_slice(&self.buf[o..o + buf.len()]);
        Ok(())
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BackingError> {
        check(sector, buf.len(), self.sectors())?;
        let o = sector as usize * SECTOR;
        self.buf[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BackingError> {
        Ok(())
    }
}

/// A test double with a volatile write cache, like a disk: a write is
/// durable only after a completed [`Backing::flush`], each 512-byte sector
/// on its own. Faults can be injected: every write, or every flush, fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolatileBacking {
    durable: Vec<u8>,
    /// Written since the last flush, per sector (the latest write wins).
    pending: alloc::collections::BTreeMap<u64, [u8; SECTOR]>,
    /// Writes fail with an I/O error.
    pub fail_writes: bool,
    /// Flushes fail with an I/O error (and make nothing durable).
    pub fail_flushes: bool,
}

impl VolatileBacking {
    /// A device of `sectors` sectors holding `init(lba)`'s content, durable.
    pub fn new(sectors: u64, mut init: impl FnMut(u64, &mut [u8; SECTOR])) -> Self {
        let mut durable = vec![0u8; sectors as usize * SECTOR];
        for (lba, chunk) in durable.chunks_exact_mut(SECTOR).enumerate() {
            let s: &mut [u8; SECTOR] = chunk.try_into().expect("a sector");
            init(lba as u64, s);
        }
        VolatileBacking {
            durable,
            pending: Default::default(),
            fail_writes: false,
            fail_flushes: false,
        }
    }

    /// What a power cut now would leave.
    pub fn durable(&self) -> &[u8] {
        &self.durable
    }

    /// Sectors written since the last completed flush.
    pub fn pending_sectors(&self) -> usize {
        self.pending.len()
    }
}

impl Backing for VolatileBacking {
    fn sectors(&self) -> u64 {
        (self.durable.len() / SECTOR) as u64
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        check(sector, buf.len(), self.sectors())?;
        for (i, out) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let lba = sector + i as u64;
            match self.pending.get(&lba) {
                Some(p) => out.copy_from_slice(p),
                None => {
                    let o = lba as usize * SECTOR;
                    out.copy_from_slice(&self.durable[o..o + SECTOR]);
                }
            }
        }
        Ok(())
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BackingError> {
        check(sector, buf.len(), self.sectors())?;
        if self.fail_writes {
            return Err(BackingError::Io("injected write error".into()));
        }
        for (i, s) in buf.chunks_exact(SECTOR).enumerate() {
            self.pending
                .insert(sector + i as u64, s.try_into().expect("a sector"));
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BackingError> {
        if self.fail_flushes {
            return Err(BackingError::Io("injected flush error".into()));
        }
        for (lba, s) in core::mem::take(&mut self.pending) {
            let o = lba as usize * SECTOR;
            self.durable[o..o + SECTOR].copy_from_slice(&s);
        }
        Ok(())
    }
}

/// A read-only backing device of zeros that takes no memory (a disk that was
/// never written, of any size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroBacking {
    /// Size in sectors.
    pub sectors: u64,
}

impl Backing for ZeroBacking {
    fn sectors(&self) -> u64 {
        self.sectors
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        check(sector, buf.len(), self.sectors)?;
        buf.fill(0);
        Ok(())
    }
    fn write(&mut self, _: u64, _: &[u8]) -> Result<(), BackingError> {
        Err(BackingError::ReadOnly)
    }
    fn flush(&mut self) -> Result<(), BackingError> {
        Ok(())
    }
}

#[cfg(feature = "std")]
pub use host::FileBacking;

#[cfg(feature = "std")]
mod host {
    use super::{check, Backing, BackingError, SECTOR};
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    fn io(e: std::io::Error) -> BackingError {
        BackingError::Io(e.to_string())
    }

    /// A backing device in a host file (its length rounded down to sectors).
    #[derive(Debug)]
    pub struct FileBacking {
        file: File,
        sectors: u64,
        writable: bool,
    }

    impl FileBacking {
        /// Opens `path` read-write.
        pub fn open(path: &Path) -> std::io::Result<Self> {
            let file = OpenOptions::new().read(true).write(true).open(path)?;
            let sectors = file.metadata()?.len() / SECTOR as u64;
            Ok(FileBacking {
                file,
                sectors,
                writable: true,
            })
        }

        /// A backing device over an open file of `size` bytes (rounded down
        /// to sectors; a block device's size comes from the device, not its
        /// metadata, so the caller gives it).
        pub fn from_file(file: File, size: u64, writable: bool) -> Self {
            FileBacking {
                file,
                sectors: size / SECTOR as u64,
                writable,
            }
        }

        /// Opens `path` read-only.
        pub fn open_read_only(path: &Path) -> std::io::Result<Self> {
            let file = File::open(path)?;
            let sectors = file.metadata()?.len() / SECTOR as u64;
            Ok(FileBacking {
                file,
                sectors,
                writable: false,
            })
        }
    }

    impl Backing for FileBacking {
        fn sectors(&self) -> u64 {
            self.sectors
        }
        fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BackingError> {
            check(sector, buf.len(), self.sectors)?;
            self.file
                .read_exact_at(buf, sector * SECTOR as u64)
                .map_err(io)
        }
        fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BackingError> {
            if !self.writable {
                return Err(BackingError::ReadOnly);
            }
            check(sector, buf.len(), self.sectors)?;
            self.file
                .write_all_at(buf, sector * SECTOR as u64)
                .map_err(io)
        }
        fn flush(&mut self) -> Result<(), BackingError> {
            if self.writable {
                self.file.sync_data().map_err(io)?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vec_backing_bounds() {
        let mut b = VecBacking::new(4);
        let mut buf = [0u8; 1024];
        assert!(b.read(3, &mut buf).is_err());
        assert!(b.read(0, &mut buf[..100]).is_err());
        b.write(2, &[7u8; 1024]).unwrap();
        b.read(2, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 1024]);
        assert!(b.write(u64::MAX, &[0u8; 512]).is_err());
        b.flush().unwrap();
    }
}
