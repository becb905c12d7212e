//! Guest memory: RAM (a vm-memory `GuestMemoryMmap`) and the pmem region, a
//! file mapped as its own KVM slot at [`protocol::layout::PMEM_START`].
//!
//! The pmem region is mapped either copy-on-write (`MAP_PRIVATE`: the file is
//! never modified, the default) or write-through (`MAP_SHARED`: stores reach
//! the file, a flush is `msync`). The slot is registered read-write (guest
//! stores run at full speed) or read-only (every guest store exits to the
//! VMM, which applies and traces it); the VMM switches between the two while
//! the guest runs by registering the slot again.
//!
//! The mapping is a vm-memory [`MmapRegion`] owned by [`PmemRegion`] (it
//! unmaps on drop). Whoever registers it as a KVM slot must remove the slot
//! before the region is dropped: `vm::Vm` does (its `VmMemory` removes the
//! slot on drop and at teardown).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use protocol::layout;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, VolatileMemory};

use crate::image_file::{open_image_file, ImageFileError, ImageKind};

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
    #[error("{what}: {source}")]
    Image {
        what: &'static str,
        source: ImageFileError,
    },
    #[error("pmem image {path} is {size} bytes; pcache needs at least {min} MiB (grow it with `truncate -s 512M {path}`)", min = layout::PMEM_MIN_SIZE >> 20)]
    PmemTooSmall { path: String, size: u64 },
    #[error("pmem device {path} is {size} bytes; pcache needs at least {min} MiB", min = layout::PMEM_MIN_SIZE >> 20)]
    PmemDeviceTooSmall { path: String, size: u64 },
    #[error("mapping pmem image {path}: {source}")]
    Map {
        path: String,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("pmem image {path} is {size} bytes; the guest maps at most {max} GiB", max = layout::PMEM_MAX_SIZE >> 30)]
    PmemTooLarge { path: String, size: u64 },
    #[error("pmem image {path} is {size} bytes, not a multiple of 2 MiB (the guest maps it with 2 MiB pages)")]
    PmemMisaligned { path: String, size: u64 },
    #[error("guest RAM of {0} MiB is outside 4..={max} MiB", max = layout::RAM_MAX >> 20)]
    RamSize(u64),
    #[error("creating guest RAM: {0}")]
    Ram(vm_memory::mmap::FromRangesError),
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
        .map_err(MemoryError::Ram)
}

/// The pmem region: a file mapped into the VMM and registered as a KVM slot.
pub struct PmemRegion {
    /// The mapping (private or shared, `MAP_NORESERVE`), unmapped on drop.
    map: MmapRegion,
    size: u64,
    mode: ImageMode,
    file: Arc<File>,
    path: PathBuf,
    /// Pages the VMM wrote through [`PmemRegion::write`] (a crash image's
    /// applied writes): the fork-server copies only these into its window.
    written: std::sync::Mutex<std::collections::BTreeSet<u64>>,
}

impl std::fmt::Debug for PmemRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PmemRegion")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("mode", &self.mode)
            .finish()
    }
}

/// Opens an image path for `mode` (written only in write-through mode) after
/// checking what it is ([`open_image_file`]: a FIFO, directory, socket or
/// character device is refused; a block device is usable copy-on-write and
/// sized from the device). Returns the file, its size and kind, and a
/// constructor of I/O errors that name it.
pub(crate) fn open_image(
    path: &Path,
    mode: ImageMode,
    what: &'static str,
) -> Result<(File, u64, ImageKind, impl Fn(io::Error) -> MemoryError), MemoryError> {
    let shown = path.display().to_string();
    let io_err = move |source| MemoryError::Io {
        what,
        path: shown.clone(),
        source,
    };
    let img = open_image_file(path, mode == ImageMode::WriteThrough)
        .map_err(|source| MemoryError::Image { what, source })?;
    Ok((img.file, img.size, img.kind, io_err))
}

impl PmemRegion {
    /// Maps a pmem image, checking its size against what pcache and the
    /// guest's page tables accept.
    pub fn open(path: &Path, mode: ImageMode) -> Result<Self, MemoryError> {
        let (file, size, kind, _) = open_image(path, mode, "pmem image")?;
        let shown = path.display().to_string();
        if size < layout::PMEM_MIN_SIZE {
            return Err(if kind == ImageKind::BlockDevice {
                MemoryError::PmemDeviceTooSmall { path: shown, size }
            } else {
                MemoryError::PmemTooSmall { path: shown, size }
            });
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
        let file = Arc::new(file);
        let map = MmapRegionBuilder::new(size as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_file_offset(FileOffset::from_arc(file.clone(), 0))
            .build()
            .map_err(|source| MemoryError::Map {
                path: shown,
                source,
            })?;
        // Sparse images: default readahead makes the first touch of a hole cost
        // ~1.3 ms; random access brings it to ~5 µs (see docs/platform.md). Advice
        // only: a failure changes speed, not behaviour.
        // SAFETY: advice on the whole of a mapping this value owns.
        unsafe { libc::madvise(map.as_ptr().cast(), size as usize, libc::MADV_RANDOM) };
        Ok(PmemRegion {
            map,
            size,
            mode,
            file,
            path: path.to_path_buf(),
            written: Default::default(),
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

    /// The pages written through [`PmemRegion::write`] so far (numbers).
    pub(crate) fn written_pages(&self) -> Vec<u64> {
        let w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        w.iter().copied().collect()
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
        if !data.is_empty() {
            let mut w = self.written.lock().unwrap_or_else(|e| e.into_inner());
            w.extend(offset / PAGE_SIZE..=(offset + data.len() as u64 - 1) / PAGE_SIZE);
        }
        self.map
            .get_slice(offset as usize, data.len())
            .map_err(io::Error::other)?
            .copy_from(data);
        Ok(())
    }

    /// Copies region bytes at `offset` into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        self.map
            .get_slice(offset as usize, buf.len())
            .map_err(io::Error::other)?
            .copy_to(buf);
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
        // SAFETY: msync of the whole of a mapping this value owns.
        let r = unsafe { libc::msync(self.map.as_ptr().cast(), self.size as usize, libc::MS_SYNC) };
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
        let first = self.map.as_ptr() as u64 / PAGE_SIZE;
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
    ///
    /// The caller must remove the slot ([`PmemRegion::unregister`]) before
    /// this region is dropped, or close the VM first: `vm::Vm` does.
    pub(crate) fn register(
        &self,
        vm: &VmFd,
        traced: bool,
        replace: bool,
    ) -> Result<(), MemoryError> {
        if replace {
            self.unregister(vm)?;
        }
        let region = kvm_userspace_memory_region {
            slot: PMEM_SLOT,
            flags: if traced { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: layout::PMEM_START,
            memory_size: self.size,
            userspace_addr: self.map.as_ptr() as u64,
        };
        // SAFETY: the range is this region's whole mapping, which stays mapped
        // until the region is dropped. The VMM's only caller, `vm::Vm`, keeps
        // the region alive in its `VmMemory`, which removes this slot before
        // it drops that reference (on drop, and at teardown before the VM fd
        // goes to the reaper), so KVM does not keep an address the region's
        // owner may then unmap.
        unsafe { vm.set_user_memory_region(region) }.map_err(MemoryError::Slot)
    }

    /// Removes KVM slot [`PMEM_SLOT`] (a zero-size registration); the mapping
    /// stays valid. Removing a slot that is not there is an error of KVM's.
    pub(crate) fn unregister(&self, vm: &VmFd) -> Result<(), MemoryError> {
        let region = kvm_userspace_memory_region {
            slot: PMEM_SLOT,
            flags: 0,
            guest_phys_addr: layout::PMEM_START,
            memory_size: 0,
            userspace_addr: self.map.as_ptr() as u64,
        };
        // SAFETY: deleting a slot gives KVM no memory to access.
        unsafe { vm.set_user_memory_region(region) }.map_err(MemoryError::Slot)
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
        // SAFETY: `ram`'s mapping lives as long as any clone of it, and
        // `vm::Vm` keeps one next to the VM fd (`VmMemory`): on drop the fd
        // field goes first, and the reaper receives `(fd, ram)` and drops
        // them in that order, so the VM is closed before RAM can be unmapped.
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
    fn pmem_and_disk_refuse_fifos_and_directories_without_blocking() {
        use crate::disk::DiskImage;
        let d = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let fifo = d.as_path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let dir = d.as_path().to_path_buf();
        // On a thread with a deadline: a blocking open must fail the test, not hang it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut errs = Vec::new();
            for mode in [ImageMode::CopyOnWrite, ImageMode::WriteThrough] {
                for p in [&fifo, &dir] {
                    errs.push(PmemRegion::open(p, mode).unwrap_err().to_string());
                    errs.push(DiskImage::open(p, mode).unwrap_err().to_string());
                }
            }
            let _ = tx.send(errs);
        });
        let errs = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening an image blocked");
        for (i, e) in errs.iter().enumerate() {
            let want = if i % 4 < 2 {
                "is a FIFO"
            } else {
                "is a directory"
            };
            assert!(e.contains(want), "{e}");
            assert!(
                e.contains(if i % 2 == 0 {
                    "pmem image"
                } else {
                    "disk image"
                }),
                "{e}"
            );
        }
    }

    /// A 512 MiB loop device as the pmem image: mapped copy-on-write with the
    /// device's size, never written; write-through is refused.
    #[test]
    #[ignore = "needs root and losetup (a loop device)"]
    fn a_block_device_is_a_copy_on_write_pmem_image() {
        let t = image(layout::PMEM_MIN_SIZE);
        t.as_file().write_all_at(&[7u8; 8], 0x1000).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(t.as_path())
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup failed");
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        struct Detach(String);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = std::process::Command::new("losetup")
                    .args(["-d", &self.0])
                    .status();
            }
        }
        let _d = Detach(dev.clone());
        let r = PmemRegion::open(Path::new(&dev), ImageMode::CopyOnWrite).unwrap();
        assert_eq!(r.size(), layout::PMEM_MIN_SIZE);
        assert_eq!(r.read_u64(0x1000).unwrap(), u64::from_le_bytes([7; 8]));
        r.write(0x1000, &[1; 8]).unwrap();
        drop(r);
        let mut b = [0u8; 8];
        t.as_file().read_exact_at(&mut b, 0x1000).unwrap();
        assert_eq!(b, [7; 8], "the device is untouched");
        let e = PmemRegion::open(Path::new(&dev), ImageMode::WriteThrough).unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");

        // A device too small says so with its real size, and does not
        // suggest `truncate` (which cannot grow a device).
        let small = image(64 << 20);
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(small.as_path())
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup failed");
        let small_dev = Detach(String::from_utf8(out.stdout).unwrap().trim().to_string());
        let e = PmemRegion::open(Path::new(&small_dev.0), ImageMode::CopyOnWrite).unwrap_err();
        assert!(
            matches!(e, MemoryError::PmemDeviceTooSmall { size, .. } if size == 64 << 20),
            "{e}"
        );
        assert!(!e.to_string().contains("truncate"), "{e}");
    }

    #[test]
    #[ignore = "needs /dev/kvm"]
    fn unregister_removes_the_pmem_slot() {
        let vm = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
        let t = image(layout::PMEM_MIN_SIZE);
        let r = PmemRegion::open(t.as_path(), ImageMode::CopyOnWrite).unwrap();
        r.register(&vm, false, false).unwrap();
        // KVM cannot change a live slot's flags: the slot is there.
        assert!(r.register(&vm, true, false).is_err());
        r.unregister(&vm).unwrap();
        // Gone: it can be added again with other flags.
        r.register(&vm, true, false).unwrap();
        r.unregister(&vm).unwrap();
    }

    #[test]
    fn ram_size_is_checked() {
        assert!(create_ram(2).is_err());
        assert!(create_ram((layout::RAM_MAX >> 20) + 1).is_err());
        assert!(create_ram(16).is_ok());
    }
}
