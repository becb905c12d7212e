//! The virtio-blk disk image: a file, seen either copy-on-write (writes land in
//! an in-memory overlay of 512-byte sectors; the file is never written) or
//! write-through (writes reach the file, a flush is `fdatasync`).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::devices::virtio::BlockBackend;
use crate::memory::{ImageMode, MemoryError};

/// Sector size of the disk and of its overlay.
pub const SECTOR: u64 = 512;

/// Sectors written over a copy-on-write disk (sector index → contents).
pub type Overlay = HashMap<u64, Box<[u8; SECTOR as usize]>>;

/// A disk image behind the virtio-blk device.
#[derive(Debug)]
pub struct DiskImage {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    mode: ImageMode,
    overlay: Overlay,
}

impl DiskImage {
    /// Opens a disk image; its size must be a multiple of 512 bytes.
    pub fn open(path: &Path, mode: ImageMode) -> Result<Self, MemoryError> {
        let (file, size, _, io_err) = crate::memory::open_image(path, mode, "disk image")?;
        if size % SECTOR != 0 || size == 0 {
            return Err(io_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("size {size} is not a non-zero multiple of 512 bytes"),
            )));
        }
        Ok(DiskImage {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size,
            mode,
            overlay: HashMap::new(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn mode(&self) -> ImageMode {
        self.mode
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying file (never written in copy-on-write mode).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// The sectors written over the file so far (copy-on-write mode).
    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "disk access of {len} bytes at {offset:#x} is past the end ({:#x})",
                    self.size
                ),
            )),
        }
    }

    /// Reads `buf.len()` bytes at byte `offset` (any alignment).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        self.file.read_exact_at(buf, offset)?;
        if self.overlay.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let mut sector = offset / SECTOR;
        while sector * SECTOR < end {
            if let Some(data) = self.overlay.get(&sector) {
                let s = sector * SECTOR;
                let from = offset.max(s);
                let to = end.min(s + SECTOR);
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - s) as usize..(to - s) as usize]);
            }
            sector += 1;
        }
        Ok(())
    }

    /// Writes `data` at byte `offset` (any alignment).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len())?;
        if self.mode == ImageMode::WriteThrough {
            return self.file.write_all_at(data, offset);
        }
        let end = offset + data.len() as u64;
        let mut sector = offset / SECTOR;
        while sector * SECTOR < end {
            let s = sector * SECTOR;
            let from = offset.max(s);
            let to = end.min(s + SECTOR);
            if !self.overlay.contains_key(&sector) {
                let mut fresh = Box::new([0u8; SECTOR as usize]);
                if to - from < SECTOR {
                    // Partial sector: start from the file's contents.
                    self.file.read_exact_at(&mut fresh[..], s)?;
                }
                self.overlay.insert(sector, fresh);
            }
            let slot = self.overlay.get_mut(&sector).expect("inserted above");
            slot[(from - s) as usize..(to - s) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            sector += 1;
        }
        Ok(())
    }

    /// Makes completed writes durable: `fdatasync` in write-through mode,
    /// nothing for a copy-on-write view.
    pub fn flush(&self) -> io::Result<()> {
        match self.mode {
            ImageMode::WriteThrough => self.file.sync_data(),
            ImageMode::CopyOnWrite => Ok(()),
        }
    }
}

impl BlockBackend for DiskImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read(offset, buf)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.write(offset, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        DiskImage::flush(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    #[test]
    fn copy_on_write_overlay_reads_back_and_leaves_the_file_alone() {
        let t = TempFile::new().unwrap();
        t.as_file().set_len(8 * SECTOR).unwrap();
        t.as_file().write_all_at(&[5u8; 1024], 512).unwrap();
        let mut d = DiskImage::open(t.as_path(), ImageMode::CopyOnWrite).unwrap();
        d.write(512 + 100, &[9u8; 600]).unwrap(); // sectors 1 and 2, partial
        let mut b = vec![0u8; 2048];
        d.read(0, &mut b).unwrap();
        assert!(b[..512].iter().all(|&x| x == 0));
        assert!(b[512..612].iter().all(|&x| x == 5));
        assert!(b[612..1212].iter().all(|&x| x == 9));
        assert!(b[1212..1536].iter().all(|&x| x == 5));
        assert!(b[1536..].iter().all(|&x| x == 0));
        assert_eq!(d.overlay().len(), 2);
        assert!(d.write(8 * SECTOR - 1, &[1, 2]).is_err());
        assert!(d.read(u64::MAX, &mut [0u8; 1]).is_err());
        let mut f = vec![0u8; 1024];
        t.as_file().read_exact_at(&mut f, 512).unwrap();
        assert!(f.iter().all(|&x| x == 5), "file untouched");
    }

    #[test]
    fn odd_sizes_are_refused() {
        let t = TempFile::new().unwrap();
        t.as_file().set_len(1000).unwrap();
        assert!(DiskImage::open(t.as_path(), ImageMode::CopyOnWrite).is_err());
    }
}
