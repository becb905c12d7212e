//! Guest memory: RAM (a vm-memory `GuestMemoryMmap`) and the pmem region, a
//! file mapped as its own KVM slot at [`protocol::layout::PMEM_START`].
//!
//! The pmem region is mapped either copy-on-write (`MAP_PRIVATE`: the file is
//! never modified, the default) or write-through (`MAP_SHARED`: stores reach
//! the file, a flush is `msync`). The slot is registered read-write (guest
//! stores run at full speed) or read-only (every guest store exits to the
//! VMM, which applies and traces it); the VMM switches between the two while
//! the guest runs by registering the slot again.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use protocol::layout;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// KVM slot of guest RAM.
pub const RAM_SLOT: u32 = 0;
/// KVM slot of the pmem region.
pub const PMEM_SLOT: u32 = 1;
/// Host page size used for copy-on-write bookkeeping.
pub const PAGE_SIZE: u64 = 4096;

/// Errors about guest memory and images.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("pmem image {path} is {size} bytes; pcache needs at least {min} MiB (grow it with `truncate -s 512M {path}`)", min = layout::PMEM_MIN_SIZE >> 20)]
    PmemTooSmall { path: String, size: u64 },
    #[error("pmem image {path} is {size} bytes; the guest maps at most {max} GiB", max = layout::PMEM_MAX_SIZE >> 30)]
    PmemTooLarge { path: String, size: u64 },
    #[error("pmem image {path} is {size} bytes, not a multiple of 2 MiB (the guest maps it with 2 MiB pages)")]
    PmemMisaligned { path: String, size: u64 },
    #[error("guest RAM of {0} MiB is outside 4..={max} MiB", max = layout::RAM_MAX >> 20)]
    RamSize(u64),
    #[error("creating guest RAM: {0}")]
    Ram(String),
    #[error("registering a KVM memory slot: {0}")]
    Slot(kvm_ioctls::Error),
    #[error("reading /proc/self/pagemap: {0}")]
    Pagemap(io::Error),
}

/// Whether an image handed to the VMM may be modified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ImageMode {
    /// The VMM works on a private copy-on-write view; the file is never written.
    CopyOnWrite,
    /// Writes reach the file; flushes make them durable (`msync`/`fdatasync`).
    WriteThrough,
}

/// Creates guest RAM of `mib` MiB at guest-physical 0.
pub fn create_ram(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if !(4..=layout::RAM_MAX >> 20).contains(&mib) {
        return Err(MemoryError::RamSize(mib));
    }
    GuestMemoryMmap::from_ranges(&[(GuestAddress(layout::RAM_START), (mib << 20) as usize)])
        .map_err(|e| MemoryError::Ram(e.to_string()))
}

/// The pmem region: a file mapped into the VMM and registered as a KVM slot.
pub struct PmemRegion {
    ptr: *mut u8,
    size: u64,
    mode: ImageMode,
    file: Arc<File>,
    path: PathBuf,
}

// SAFETY: the mapping is owned by this value and only accessed through it
// (and by the guest through KVM, which is the point of guest memory).
unsafe impl Send for PmemRegion {}
// SAFETY: as above; concurrent readers see guest memory, which is volatile by nature.
unsafe impl Sync for PmemRegion {}

impl std::fmt::Debug for PmemRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PmemRegion")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("mode", &self.mode)
            .finish()
    }
}

/// Opens an image file for `mode` (written only in write-through mode) and
/// returns it, its size, and a constructor of I/O errors that name it.
pub(crate) fn open_image(
    path: &Path,
    mode: ImageMode,
    what: &'static str,
) -> Result<(File, u64, impl Fn(io::Error) -> MemoryError), MemoryError> {
    let shown = path.display().to_string();
    let io_err = move |source| MemoryError::Io {
        what,
        path: shown.clone(),
        source,
    };
    let file = File::options()
        .read(true)
        .write(mode == ImageMode::WriteThrough)
        .open(path)
        .map_err(&io_err)?;
    let size = file.metadata().map_err(&io_err)?.len();
    Ok((file, size, io_err))
}

impl PmemRegion {
    /// Maps a pmem image, checking its size against what pcache and the
    /// guest's page tables accept.
    pub fn open(path: &Path, mode: ImageMode) -> Result<Self, MemoryError> {
        let (file, size, io_err) = open_image(path, mode, "pmem image")?;
        let shown = path.display().to_string();
        if size < layout::PMEM_MIN_SIZE {
            return Err(MemoryError::PmemTooSmall { path: shown, size });
        }
        if size > layout::PMEM_MAX_SIZE {
            return Err(MemoryError::PmemTooLarge { path: shown, size });
        }
        if size % layout::PAGE_2M != 0 {
            return Err(MemoryError::PmemMisaligned { path: shown, size });
        }
        let flags = match mode {
            ImageMode::CopyOnWrite => libc::MAP_PRIVATE,
            ImageMode::WriteThrough => libc::MAP_SHARED,
        } | libc::MAP_NORESERVE;
        // SAFETY: a fresh mapping of a file we hold open; checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io_err(io::Error::last_os_error()));
        }
        // Sparse images: default readahead makes the first touch of a hole cost
        // ~1.3 ms; random access brings it to ~5 µs (see kvm-notes).
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(ptr, size as usize, libc::MADV_RANDOM) };
        Ok(PmemRegion {
            ptr: ptr.cast(),
            size,
            mode,
            file: Arc::new(file),
            path: path.to_path_buf(),
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

    /// The image file (opened read-only in copy-on-write mode).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "pmem access of {len} bytes at {offset:#x} is outside the {:#x}-byte region",
                    self.size
                ),
            )),
        }
    }

    /// Copies `data` into the region at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: bounds checked above; the mapping lives as long as self.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset as usize), data.len())
        };
        Ok(())
    }

    /// Copies region bytes at `offset` into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: bounds checked above; the mapping lives as long as self.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// Reads a little-endian u64 at `offset`.
    pub fn read_u64(&self, offset: u64) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read(offset, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Makes stores durable: `msync` for a write-through image, nothing for a
    /// copy-on-write view (there is nowhere durable to write to).
    pub fn flush(&self) -> io::Result<()> {
        if self.mode == ImageMode::CopyOnWrite {
            return Ok(());
        }
        // SAFETY: our own mapping, whole length.
        let r = unsafe { libc::msync(self.ptr.cast(), self.size as usize, libc::MS_SYNC) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The pages of a copy-on-write view that differ from the file (written
    /// since the mapping was made), with their current contents. Found with
    /// `/proc/self/pagemap`: a private page that is no longer the file's page
    /// cache page is present-and-anonymous or swapped.
    pub fn private_pages(&self) -> Result<BTreeMap<u64, Box<[u8]>>, MemoryError> {
        let mut out = BTreeMap::new();
        if self.mode != ImageMode::CopyOnWrite {
            return Ok(out);
        }
        let pagemap = File::open("/proc/self/pagemap").map_err(MemoryError::Pagemap)?;
        let npages = (self.size / PAGE_SIZE) as usize;
        let first = self.ptr as u64 / PAGE_SIZE;
        // Read the entries in chunks to bound the buffer.
        const CHUNK: usize = 32 * 1024;
        let mut buf = vec![0u8; CHUNK * 8];
        let mut page = 0usize;
        while page < npages {
            let n = CHUNK.min(npages - page);
            pagemap
                .read_exact_at(&mut buf[..n * 8], (first + page as u64) * 8)
                .map_err(MemoryError::Pagemap)?;
            for i in 0..n {
                let e = u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap());
                let present = e >> 63 & 1 == 1;
                let swapped = e >> 62 & 1 == 1;
                let file_page = e >> 61 & 1 == 1;
                if (present && !file_page) || swapped {
                    let off = (page + i) as u64 * PAGE_SIZE;
                    let mut data = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
                    self.read(off, &mut data).expect("page inside the region");
                    out.insert(off, data);
                }
            }
            page += n;
        }
        Ok(out)
    }

    /// Registers (or re-registers) the region as KVM slot [`PMEM_SLOT`],
    /// read-only when `traced`. KVM cannot flip `KVM_MEM_READONLY` on a live
    /// slot, so a switch deletes the slot and adds it again.
    pub(crate) fn register(
        &self,
        vm: &VmFd,
        traced: bool,
        replace: bool,
    ) -> Result<(), MemoryError> {
        let mut region = kvm_userspace_memory_region {
            slot: PMEM_SLOT,
            flags: 0,
            guest_phys_addr: layout::PMEM_START,
            memory_size: 0,
            userspace_addr: self.ptr as u64,
        };
        if replace {
            // SAFETY: deleting our own slot; the mapping stays valid.
            unsafe { vm.set_user_memory_region(region) }.map_err(MemoryError::Slot)?;
        }
        region.memory_size = self.size;
        region.flags = if traced { KVM_MEM_READONLY } else { 0 };
        // SAFETY: the mapping outlives the VM (the VM is dropped before the region).
        unsafe { vm.set_user_memory_region(region) }.map_err(MemoryError::Slot)
    }
}

impl Drop for PmemRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `open`, exactly once.
        unsafe { libc::munmap(self.ptr.cast(), self.size as usize) };
    }
}

/// Registers guest RAM as KVM slot [`RAM_SLOT`].
pub(crate) fn register_ram(vm: &VmFd, ram: &GuestMemoryMmap) -> Result<(), MemoryError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for (i, r) in ram.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: RAM_SLOT + i as u32 * 16,
            flags: 0,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
        };
        // SAFETY: the RAM mapping outlives the VM.
        unsafe { vm.set_user_memory_region(region) }.map_err(MemoryError::Slot)?;
    }
    Ok(())
}

/// Creates a sparse file of `size` bytes (a fresh pmem or disk image).
pub fn create_sparse_file(path: &Path, size: u64) -> io::Result<()> {
    let f = File::create(path)?;
    f.set_len(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    fn image(size: u64) -> TempFile {
        let t = TempFile::new().unwrap();
        t.as_file().set_len(size).unwrap();
        t
    }

    #[test]
    fn pmem_sizes_are_checked_with_a_fix() {
        let t = image(64 << 20);
        let e = PmemRegion::open(t.as_path(), ImageMode::CopyOnWrite).unwrap_err();
        assert!(matches!(e, MemoryError::PmemTooSmall { .. }));
        assert!(e.to_string().contains("truncate -s 512M"), "{e}");
        let t = image(layout::PMEM_MIN_SIZE + 4096);
        let e = PmemRegion::open(t.as_path(), ImageMode::CopyOnWrite).unwrap_err();
        assert!(matches!(e, MemoryError::PmemMisaligned { .. }));
        let e =
            PmemRegion::open(Path::new("/nonexistent/pmem"), ImageMode::CopyOnWrite).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/pmem"));
    }

    #[test]
    fn copy_on_write_view_never_writes_the_file_and_reports_its_private_pages() {
        let t = image(layout::PMEM_MIN_SIZE);
        t.as_file().write_all_at(&[7u8; 16], 0x3000).unwrap();
        let r = PmemRegion::open(t.as_path(), ImageMode::CopyOnWrite).unwrap();
        // Reading pages (hole or data) does not make them private.
        let mut b = [0u8; 16];
        r.read(0x3000, &mut b).unwrap();
        assert_eq!(b, [7u8; 16]);
        r.read(0x10_0000, &mut b).unwrap();
        assert!(r.private_pages().unwrap().is_empty());

        r.write(0x3008, &0xdead_beefu64.to_le_bytes()).unwrap();
        r.write(layout::PMEM_MIN_SIZE - 8, &[1; 8]).unwrap();
        assert!(r.write(layout::PMEM_MIN_SIZE - 7, &[1; 8]).is_err());
        assert!(r.write(u64::MAX - 2, &[1; 8]).is_err());
        let pages = r.private_pages().unwrap();
        assert_eq!(
            pages.keys().copied().collect::<Vec<_>>(),
            vec![0x3000, layout::PMEM_MIN_SIZE - 4096]
        );
        assert_eq!(&pages[&0x3000][8..16], &0xdead_beefu64.to_le_bytes());
        r.flush().unwrap();
        drop(r);
        let mut f = [0u8; 16];
        t.as_file().read_exact_at(&mut f, 0x3000).unwrap();
        assert_eq!(f, [7u8; 16], "the image file is untouched");
    }

    #[test]
    fn write_through_reaches_the_file() {
        let t = image(layout::PMEM_MIN_SIZE);
        let r = PmemRegion::open(t.as_path(), ImageMode::WriteThrough).unwrap();
        r.write(0x40, &[9u8; 8]).unwrap();
        r.flush().unwrap();
        let mut f = [0u8; 8];
        t.as_file().read_exact_at(&mut f, 0x40).unwrap();
        assert_eq!(f, [9u8; 8]);
    }

    #[test]
    fn ram_size_is_checked() {
        assert!(create_ram(2).is_err());
        assert!(create_ram((layout::RAM_MAX >> 20) + 1).is_err());
        assert!(create_ram(16).is_ok());
    }
}
