//! The fork-server: one VM reused for many untraced recovery runs.
//!
//! A recovery boot of a crash state costs a new VM (KVM VM, memory slots,
//! ELF load, vCPU), the guest's ring-0 setup (emulated on PVM hosts), the
//! parse of its command line and the start of both virtio drivers (about 60
//! register exits) before the first byte of the state is read. All of that is
//! the same for every state of a run. [`ForkServer`] pays it once:
//!
//! 1. **Boot to the snapshot point.** The guest gets
//!    [`protocol::CMDLINE_SNAPSHOT_FLAG`]: after parsing its command line it
//!    starts both drivers and writes [`protocol::MARKER_SNAPSHOT`], in ring 3,
//!    before any step reads a device. The VMM stops there and records the
//!    vCPU's registers (general, special, FPU/SSE, pending events), the
//!    contents of every guest RAM page present at that moment, and every
//!    virtio-mmio register write the drivers made (their initialisation).
//! 2. **Per state**: restore the guest to the snapshot and run it on that
//!    state's copy-on-write crash images: the state's pmem image is loaded
//!    into the server's pmem window (the KVM slot, never changed: see
//!    `PmemWindow`), fresh virtio devices are built on its region and disk
//!    and given the recorded register writes (which rebuilds exactly the
//!    device state the drivers' memory expects), and the run produces the
//!    same [`RunOutcome`] a fresh VM would.
//!
//! **How RAM is restored.** The VMM restores it itself; the guest does not
//! reset its own state (a guest that went wrong is the very thing a crash
//! state tests, so it cannot be trusted to clean up after itself). Guest RAM
//! is anonymous memory, so a page the guest (or a device) ever touched is
//! *present* in the VMM's page tables, and one that is not present reads as
//! zeros, as it did at the snapshot. Before each state the VMM lists the
//! present pages of the RAM mapping (`PAGEMAP_SCAN` on `/proc/self/pagemap`:
//! the whole restore, registers included, is ≈ 0.05 ms) and gives each its
//! snapshot contents (zeros for a page the snapshot did not have), copying
//! only pages that differ. The pages stay mapped: the shadow page tables of
//! PVM hosts keep them, so the next state does not fault them in again.
//! (Dropping the pages with `MADV_DONTNEED` over a `MAP_PRIVATE` view of a
//! snapshot file was not used, so it was not checked on PVM: it would make
//! every page the next state touches fault in again, and a first touch costs
//! ≈ 20 µs here — measured on pmem pages, `benches/fork.rs` — against well
//! under 1 µs to compare or copy a page.)
//!
//! A restore behind KVM's back is sound for data pages but not for the
//! guest's own page tables, which a shadow MMU write-protects and tracks: the
//! VMM walks the page tables from CR3 at the snapshot and, if a state changed
//! any of those pages, boots a new server instead of restoring.
//!
//! **Isolation.** Nothing of one state reaches the next: RAM is restored as
//! above, the vCPU's registers are set again, the devices are new (new
//! transports, the state's own disk; the pmem window put back to the base
//! and loaded with the state's image). A state that ends in an
//! exception, a panic, a timeout, a shutdown, an internal error or any other
//! stop than the guest's own exit from ring 3 ends the server: the next
//! state boots a new one (see `reusable_after`). Such a state is reported
//! exactly as a fresh VM reports it. The tests in `tests/fork.rs` check all
//! of this.
//!
//! Only untraced runs: a command line with a `trace:` or `marker:` step, or
//! a write-through pmem region, goes to a fresh VM (and a trace marker in a
//! fork-server run anyway is refused, a protocol error).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_fpu, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events,
    KVM_CAP_DISABLE_QUIRKS2, KVM_X86_QUIRK_SLOT_ZAP_ALL,
};
use kvm_ioctls::{VcpuFd, VmFd};
use protocol::layout;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::boot;
use crate::devices::MmioBus;
use crate::disk::DiskImage;
use crate::faults::BlkFaults;
use crate::memory::{self, MemoryError, PmemRegion, PAGE_SIZE};
use crate::vcpu::{self, Devices, LoopEnd};
use crate::vm::{
    build_bus, finish_run, host, kvm_err, reap, unwrap_images, virtio_devices, Outcome, RunOutcome,
    Tracer, VmConfig, VmError,
};
use crate::watchdog::Watchdog;

/// What every run of a [`ForkServer`] shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkConfig {
    pub kernel: PathBuf,
    /// The guest command line of every run (the VMM adds the snapshot flag
    /// and the `virtio_mmio.device=` entries).
    pub cmdline: String,
    pub mem_mib: u64,
    /// Time budget of one run (and of the boot to the snapshot point).
    pub timeout: Duration,
    /// Copy the run's pmem writes back into the region it was given, so that
    /// [`RunOutcome::pmem`] holds the image as the run left it, as a fresh
    /// VM's does (default). Callers that drop the region (the scenario
    /// runner) switch it off: each copied page is a copy-on-write fault in
    /// the region, with a TLB shootdown that interrupts the other workers.
    pub pmem_writes_back: bool,
}

impl ForkConfig {
    /// Default RAM, a 10 s budget.
    pub fn new(kernel: impl Into<PathBuf>, cmdline: impl Into<String>) -> Self {
        ForkConfig {
            kernel: kernel.into(),
            cmdline: cmdline.into(),
            mem_mib: layout::RAM_DEFAULT_MIB,
            timeout: Duration::from_secs(10),
            pmem_writes_back: true,
        }
    }

    /// The fresh-VM configuration of the same run (the reference path, and
    /// the fallback when the guest does not reach the snapshot point).
    pub fn fresh(&self, pmem: PmemRegion, disk: DiskImage) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone(),
            cmdline: self.cmdline.clone(),
            mem_mib: self.mem_mib,
            pmem,
            disk,
            trace: false,
            timeout: self.timeout,
            console: Default::default(),
            interrupts: false,
            blk_faults: BlkFaults::default(),
        }
    }
}

/// Counters of a server's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForkStats {
    /// Boots to the snapshot point (the first, and one after every state
    /// that did not exit cleanly).
    pub boots: u64,
    /// Runs from the snapshot.
    pub runs: u64,
    /// Runs in a fresh VM because the guest did not reach the snapshot point.
    pub fresh_runs: u64,
    /// Pages copied back to their snapshot contents, over all restores.
    pub restored_pages: u64,
    /// Restores that found the guest's page tables changed (a new boot instead).
    pub page_table_rebuilds: u64,
    /// Time in boots to the snapshot point, in ns.
    pub boot_ns: u64,
    /// Time putting RAM and the vCPU back to the snapshot, in ns.
    pub restore_ns: u64,
}

/// A recovery VM reused across crash states (see the module documentation).
pub struct ForkServer {
    config: ForkConfig,
    vm: Option<Booted>,
    /// `(pmem size, disk size)` for which the guest did not reach the
    /// snapshot point: runs on such images go to a fresh VM directly.
    no_snapshot: Option<(u64, u64)>,
    stats: ForkStats,
}

impl std::fmt::Debug for ForkServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForkServer")
            .field("config", &self.config)
            .field("booted", &self.vm.is_some())
            .field("stats", &self.stats)
            .finish()
    }
}

/// The vCPU and RAM state at the snapshot point.
struct Snapshot {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    events: kvm_vcpu_events,
    /// Page number → contents, for every RAM page present at the snapshot.
    pages: std::collections::HashMap<u64, Box<[u8]>>,
    /// The guest's page-table pages (numbers), found from CR3.
    page_tables: Vec<u64>,
    /// The drivers' virtio-mmio register writes, in order.
    bus_writes: Vec<(u64, Vec<u8>)>,
}

/// A VM stopped at (or run on from) its snapshot point.
struct Booted {
    vcpu: Option<VcpuFd>,
    fd: Option<VmFd>,
    ram: GuestMemoryMmap,
    /// The pmem slot's memory (dropped after the slot is removed).
    window: PmemWindow,
    snap: Snapshot,
    pmem_size: u64,
    disk_size: u64,
    /// A run ended since the last restore: its last exit may still need
    /// completing inside KVM before the registers are set.
    ran: bool,
}

impl Drop for Booted {
    fn drop(&mut self) {
        // The vCPU first, then the pmem slot (the window is unmapped when
        // this value's fields go), then the VM fd and RAM together (the
        // reaper closes the VM before RAM is unmapped).
        drop(self.vcpu.take());
        if let Some(fd) = self.fd.take() {
            self.window.unregister(&fd);
            reap(fd, self.ram.clone());
        }
    }
}

/// The server's pmem slot: a fixed range of the VMM's address space,
/// registered as the KVM slot once, holding a copy-on-write view of the
/// runs' common base file (a saved window's `pmem.img`).
///
/// Why not the run's own region: every pmem page a guest touches for the
/// first time in a mapping costs a shadow-MMU fault, about 20 µs on PVM
/// hosts (measured: 100 stores to 100 new pages 2.0–2.5 ms, to one page
/// 0.1 ms), and a recovery that formats a cache touches some 130 pages. A
/// new mapping per run (or a new slot: that also waits for an SRCU grace
/// period, 0.1–3 ms) pays them again every time. Here the mapping stays:
/// before a run the window's pages that may differ from the base are put
/// back to the base's contents and the run's own image (the pages its
/// crash image wrote over the base, [`PmemRegion::written_pages`]) is copied
/// in, all by the VMM into pages that stay mapped; only pages no run touched
/// before fault.
struct PmemWindow {
    addr: *mut u8,
    size: usize,
    /// `(device, inode)` of the file the window is a view of, and the file.
    base: Option<((u64, u64), Arc<File>)>,
    /// Every page of the window that may differ from the base file (written
    /// by a run's image, by a guest, or a device), with the base's contents.
    private: std::collections::HashMap<u64, Box<[u8]>>,
}

/// The file's identity, to tell whether a region is a view of the window's base.
fn file_id(f: &File) -> Result<(u64, u64), VmError> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata().map_err(window_err)?;
    Ok((m.dev(), m.ino()))
}

fn window_err(e: std::io::Error) -> VmError {
    VmError::Memory(MemoryError::Io {
        what: "fork-server pmem window",
        path: String::new(),
        source: e,
    })
}

impl PmemWindow {
    /// Reserves `size` bytes (no access, no memory).
    fn new(size: u64) -> Result<Self, VmError> {
        // SAFETY: a new anonymous mapping at an address the kernel picks.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(window_err(std::io::Error::last_os_error()));
        }
        Ok(PmemWindow {
            addr: addr.cast(),
            size: size as usize,
            base: None,
            private: Default::default(),
        })
    }

    /// Registers the window as the pmem slot.
    fn register(&self, fd: &VmFd) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot: memory::PMEM_SLOT,
            flags: 0,
            guest_phys_addr: layout::PMEM_START,
            memory_size: self.size as u64,
            userspace_addr: self.addr as u64,
        };
        // SAFETY: the window stays mapped until `Booted` drops it, after
        // removing this slot.
        unsafe { fd.set_user_memory_region(region) }
            .map_err(|e| VmError::Memory(MemoryError::Slot(e)))
    }

    fn unregister(&self, fd: &VmFd) {
        let region = kvm_userspace_memory_region {
            slot: memory::PMEM_SLOT,
            flags: 0,
            guest_phys_addr: layout::PMEM_START,
            memory_size: 0,
            userspace_addr: self.addr as u64,
        };
        // SAFETY: deleting a slot gives KVM no memory to access.
        if let Err(e) = unsafe { fd.set_user_memory_region(region) } {
            log::warn!("fork-server: removing the pmem slot: {e}");
        }
    }

    /// The base file's contents of page `n`.
    fn base_page(file: &File, n: u64) -> Result<Box<[u8]>, VmError> {
        let mut buf = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
        file.read_exact_at(&mut buf, n * PAGE_SIZE)
            .map_err(window_err)?;
        Ok(buf)
    }

    /// Makes the window show exactly `region`: a view of the same file with
    /// the same pages written over it.
    fn load(&mut self, region: &PmemRegion) -> Result<(), VmError> {
        let id = file_id(region.file())?;
        if self.base.as_ref().map(|b| b.0) != Some(id) {
            // Another base: a new view replaces the old one (and all its pages).
            // SAFETY: the window's own range, replaced in place (MAP_FIXED)
            // by a private view of a file that is never written.
            let r = unsafe {
                libc::mmap(
                    self.addr.cast(),
                    self.size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    std::os::fd::AsRawFd::as_raw_fd(&**region.file()),
                    0,
                )
            };
            if r == libc::MAP_FAILED {
                return Err(window_err(std::io::Error::last_os_error()));
            }
            // Advice only (see `PmemRegion::open`).
            // SAFETY: advice on the window's own mapping.
            unsafe { libc::madvise(self.addr.cast(), self.size, libc::MADV_RANDOM) };
            self.base = Some((id, region.file().clone()));
            self.private.clear();
        }
        for (&n, base) in &self.private {
            // SAFETY: a page of this window, between runs.
            let now = unsafe { window_page(self.addr, n) };
            if *now != **base {
                now.copy_from_slice(base);
            }
        }
        let file = self.base.as_ref().expect("set above").1.clone();
        for n in region.written_pages() {
            if let std::collections::hash_map::Entry::Vacant(e) = self.private.entry(n) {
                e.insert(Self::base_page(&file, n)?);
            }
            region
                // SAFETY: as above.
                .read(n * PAGE_SIZE, unsafe { window_page(self.addr, n) })
                .map_err(window_err)?;
        }
        Ok(())
    }

    /// After a run: notes every page the run made private and, with
    /// `write_back`, gives `region` the run's writes (so that the run's
    /// outcome holds the image as the run left it, as a fresh VM's does).
    fn unload(&mut self, region: &PmemRegion, write_back: bool) -> Result<(), VmError> {
        let file = self.base.as_ref().expect("loaded before").1.clone();
        for n in scan(self.addr, self.size, Scan::Private)? {
            if let std::collections::hash_map::Entry::Vacant(e) = self.private.entry(n) {
                e.insert(Self::base_page(&file, n)?);
            }
        }
        if !write_back {
            return Ok(());
        }
        let mut theirs = vec![0u8; PAGE_SIZE as usize];
        for &n in self.private.keys() {
            region
                .read(n * PAGE_SIZE, &mut theirs)
                .map_err(window_err)?;
            // SAFETY: as above.
            let ours = unsafe { window_page(self.addr, n) };
            if theirs != *ours {
                region.write(n * PAGE_SIZE, ours).map_err(window_err)?;
            }
        }
        Ok(())
    }
}

/// Page `n` of the window at `addr`.
///
/// # Safety
/// `addr` is a live window's mapping and `n` one of its pages; the vCPU is
/// stopped (the server calls this between runs only) and nothing else holds
/// a reference to that page.
unsafe fn window_page<'a>(addr: *mut u8, n: u64) -> &'a mut [u8] {
    // SAFETY: the caller's contract.
    unsafe {
        std::slice::from_raw_parts_mut(addr.add((n * PAGE_SIZE) as usize), PAGE_SIZE as usize)
    }
}

impl Drop for PmemWindow {
    fn drop(&mut self) {
        // SAFETY: the window's own range; no slot refers to it any more.
        unsafe { libc::munmap(self.addr.cast(), self.size) };
    }
}

/// Which pages [`scan`] returns.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Present (or swapped): every page touched since the mapping was made.
    Present,
    /// Present and not the file's page: written (copied) pages of a private
    /// file mapping.
    Private,
}

/// `struct pm_scan_arg` of `linux/fs.h` (Linux 6.7).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region` of `linux/fs.h`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;

/// Page numbers (from `addr`) of the pages of `[addr, addr + size)` that
/// match `what`: `PAGEMAP_SCAN` (which skips unpopulated page tables whole),
/// or a read of `/proc/self/pagemap` where the host lacks it.
fn scan(addr: *mut u8, size: usize, what: Scan) -> Result<Vec<u64>, VmError> {
    let pagemap = File::open("/proc/self/pagemap").map_err(pagemap_err)?;
    let start = addr as u64;
    let end = start + size as u64;
    let mut out = Vec::new();
    let mut regions = vec![PageRegion::default(); 512];
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: at,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            ..Default::default()
        };
        match what {
            Scan::Present => arg.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            Scan::Private => {
                arg.category_mask = PAGE_IS_PRESENT | PAGE_IS_FILE;
                arg.category_inverted = PAGE_IS_FILE;
            }
        }
        arg.return_mask = arg.category_mask | arg.category_anyof_mask;
        // SAFETY: the argument and result buffers are valid for the call.
        let n = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&pagemap),
                PAGEMAP_SCAN,
                &mut arg,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if at == start && matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) {
                return scan_pagemap(&pagemap, addr, size, what);
            }
            return Err(pagemap_err(e));
        }
        for r in &regions[..n as usize] {
            out.extend((r.start - start) / PAGE_SIZE..(r.end - start) / PAGE_SIZE);
        }
        if arg.walk_end <= at {
            break;
        }
        at = arg.walk_end;
    }
    Ok(out)
}

/// [`scan`] by reading `/proc/self/pagemap` entries.
fn scan_pagemap(
    pagemap: &File,
    addr: *mut u8,
    size: usize,
    what: Scan,
) -> Result<Vec<u64>, VmError> {
    let npages = size / PAGE_SIZE as usize;
    let first = addr as u64 / PAGE_SIZE;
    let mut out = Vec::new();
    const CHUNK: usize = 32 * 1024;
    let mut buf = vec![0u8; CHUNK * 8];
    let mut page = 0;
    while page < npages {
        let n = CHUNK.min(npages - page);
        pagemap
            .read_exact_at(&mut buf[..n * 8], (first + page as u64) * 8)
            .map_err(pagemap_err)?;
        for (i, e) in buf[..n * 8].chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            let (present, swapped, file) = (e >> 63 & 1 == 1, e >> 62 & 1 == 1, e >> 61 & 1 == 1);
            let hit = match what {
                Scan::Present => present || swapped,
                Scan::Private => (present && !file) || swapped,
            };
            if hit {
                out.push((page + i) as u64);
            }
        }
        page += n;
    }
    Ok(out)
}

/// Errors of the fork-server's own (as opposed to the guest's).
fn pagemap_err(e: std::io::Error) -> VmError {
    VmError::Memory(MemoryError::Pagemap(e))
}

impl ForkServer {
    /// A server for `config`; nothing is booted until the first run.
    pub fn new(config: ForkConfig) -> Self {
        ForkServer {
            config,
            vm: None,
            no_snapshot: None,
            stats: ForkStats::default(),
        }
    }

    pub fn config(&self) -> &ForkConfig {
        &self.config
    }

    pub fn stats(&self) -> ForkStats {
        self.stats
    }

    /// Whether a booted VM waits at its snapshot point for the next run.
    pub fn is_booted(&self) -> bool {
        self.vm.is_some()
    }

    /// One run on these images, as [`crate::vm::run`] of
    /// [`ForkConfig::fresh`] would do it. Errors are VMM failures.
    pub fn run(&mut self, pmem: PmemRegion, disk: DiskImage) -> Result<RunOutcome, VmError> {
        let start = Instant::now();
        let sizes = (pmem.size(), disk.size());
        // A write-through image must see the guest's stores in its file: the
        // window is a private view (and the fresh path is the reference). A
        // command line that may turn tracing on needs the fresh path too.
        if self.no_snapshot == Some(sizes)
            || pmem.mode() != crate::memory::ImageMode::CopyOnWrite
            || may_trace(&self.config.cmdline)
        {
            self.stats.fresh_runs += 1;
            return crate::vm::run(self.config.fresh(pmem, disk));
        }
        // The drivers read both sizes before the snapshot: other images need
        // another boot.
        if self
            .vm
            .as_ref()
            .is_some_and(|b| (b.pmem_size, b.disk_size) != sizes)
        {
            self.vm = None;
        }
        let pmem = Arc::new(pmem);
        let disk = Arc::new(Mutex::new(disk));
        if self.vm.is_none() {
            match self.boot(&pmem, &disk)? {
                Some(b) => self.vm = Some(b),
                None => {
                    // The guest stopped before its snapshot point (a bad
                    // command line, a driver that would not start): a fresh
                    // VM reports that exactly as the reference path does.
                    self.no_snapshot = Some(sizes);
                    self.stats.fresh_runs += 1;
                    let (pmem, disk) = unwrap_images(pmem, disk)?;
                    return crate::vm::run(self.config.fresh(pmem, disk));
                }
            }
        }
        let r = self.restore_and_run(pmem, disk, start);
        // A VMM error half-way (a failed ioctl, an unreadable page) leaves the
        // server in a state the next restore may not cover: drop it.
        match r {
            Ok((out, true)) => Ok(out),
            Ok((out, false)) => {
                self.vm = None;
                Ok(out)
            }
            Err(e) => {
                self.vm = None;
                Err(e)
            }
        }
    }

    /// Puts the booted server back to its snapshot and runs it on these
    /// images; the run, and whether the server may serve another.
    fn restore_and_run(
        &mut self,
        pmem: Arc<PmemRegion>,
        disk: Arc<Mutex<DiskImage>>,
        start: Instant,
    ) -> Result<(RunOutcome, bool), VmError> {
        let b = self.vm.as_mut().expect("booted before");
        let t = Instant::now();
        let restored = restore(b)?;
        self.stats.restore_ns += t.elapsed().as_nanos() as u64;
        let restored = match restored {
            Some(n) => n,
            None => {
                // The guest's page tables changed: boot again (the images
                // were not read by the failed attempt).
                self.stats.page_table_rebuilds += 1;
                self.vm = None;
                let b = self.boot(&pmem, &disk)?.ok_or(VmError::Fork(
                    "a second boot did not reach the snapshot point",
                ))?;
                let b = self.vm.insert(b);
                restore(b)?.unwrap_or(0)
            }
        };
        self.stats.restored_pages += restored;
        self.stats.runs += 1;
        let b = self.vm.as_mut().expect("booted above");
        run_state(b, &self.config, pmem, disk, start)
    }

    /// Boots a VM on these images up to the guest's snapshot point; `None`
    /// when the guest stopped before it.
    fn boot(
        &mut self,
        pmem: &Arc<PmemRegion>,
        disk: &Arc<Mutex<DiskImage>>,
    ) -> Result<Option<Booted>, VmError> {
        let t = Instant::now();
        let b = self.boot_once(pmem, disk);
        self.stats.boots += 1;
        self.stats.boot_ns += t.elapsed().as_nanos() as u64;
        b
    }

    fn boot_once(
        &mut self,
        pmem: &Arc<PmemRegion>,
        disk: &Arc<Mutex<DiskImage>>,
    ) -> Result<Option<Booted>, VmError> {
        let cfg = &self.config;
        let host = host()?;
        if !cfg.kernel.exists() {
            return Err(boot::BootError::KernelMissing(cfg.kernel.display().to_string()).into());
        }
        let fd = host.kvm.create_vm().map_err(kvm_err("create VM"))?;
        // Replacing the pmem slot per run must not throw away the shadow
        // pages of RAM: without this quirk KVM zaps every shadow page when a
        // slot is deleted. Best effort (older hosts lack it: slower, not wrong).
        if fd.check_extension_raw(KVM_CAP_DISABLE_QUIRKS2.into()) as u32
            & KVM_X86_QUIRK_SLOT_ZAP_ALL
            != 0
        {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_DISABLE_QUIRKS2,
                ..Default::default()
            };
            cap.args[0] = KVM_X86_QUIRK_SLOT_ZAP_ALL.into();
            if let Err(e) = fd.enable_cap(&cap) {
                log::warn!("fork-server: cannot disable KVM's slot-zap-all quirk: {e}");
            }
        }
        let ram = memory::create_ram(cfg.mem_mib)?;
        memory::register_ram(&fd, &ram)?;
        let kernel = boot::load_kernel(&ram, &cfg.kernel)?;
        let line = format!("{} {}", cfg.cmdline, protocol::CMDLINE_SNAPSHOT_FLAG);
        let cmdline = boot::build_cmdline(&line, &virtio_devices())?;
        boot::write_boot_params(&ram, &cmdline, cfg.mem_mib << 20)?;
        let mut vcpu = fd.create_vcpu(0).map_err(kvm_err("create vCPU"))?;
        boot::setup_vcpu(&ram, &vcpu, &host.cpuid, kernel.entry)?;
        let window = PmemWindow::new(pmem.size())?;
        let mut b = Booted {
            vcpu: None,
            fd: Some(fd),
            ram,
            window,
            snap: Snapshot {
                regs: Default::default(),
                sregs: Default::default(),
                fpu: Default::default(),
                events: Default::default(),
                pages: Default::default(),
                page_tables: Vec::new(),
                bus_writes: Vec::new(),
            },
            pmem_size: pmem.size(),
            disk_size: disk.lock().unwrap_or_else(|e| e.into_inner()).size(),
            ran: false,
        };
        let fd = b.fd.as_ref().expect("set above");
        b.window.register(fd)?;
        b.window.load(pmem)?;
        let tracer = Arc::new(Mutex::new(Tracer::new()));
        let mut bus = build_bus(fd, &b.ram, pmem, disk, &tracer, false, BlkFaults::default())?;
        bus.record_writes();
        let mut dev = devices(
            &b.ram,
            pmem.clone(),
            disk.clone(),
            tracer,
            bus,
            Instant::now(),
        );
        dev.stop_at_snapshot = true;
        let watchdog = Watchdog::start(cfg.timeout);
        let end = vcpu::run_loop(&mut vcpu, fd, &mut dev, &watchdog)?;
        drop(watchdog);
        if let LoopEnd::Stopped(o) = end {
            log::info!("fork-server: the guest stopped before its snapshot point ({o:?})");
            return Ok(None);
        }
        // The marker's `out` completes inside KVM on the next entry: enter
        // with `immediate_exit` so that it completes (RIP moves past it)
        // without running the guest, and the registers read below are the
        // ones to resume from.
        complete_exit(&mut vcpu)?;
        let writes = dev.bus.take_writes();
        if let Some((addr, _)) = writes
            .iter()
            .find(|(a, _)| a % layout::VIRTIO_MMIO_SIZE == QUEUE_NOTIFY)
        {
            // A request before the snapshot would be processed again by the
            // replay; the guest's snapshot point comes before any.
            log::warn!("fork-server: a queue notification at {addr:#x} before the snapshot");
            return Ok(None);
        }
        drop(dev);
        b.snap = Snapshot {
            regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            fpu: vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
            pages: Default::default(),
            page_tables: Vec::new(),
            bus_writes: writes,
        };
        b.vcpu = Some(vcpu);
        let ram = ram_slice(&mut b.ram);
        for page in present_pages(ram)? {
            let at = (page * PAGE_SIZE) as usize;
            b.snap
                .pages
                .insert(page, ram[at..at + PAGE_SIZE as usize].into());
        }
        b.snap.page_tables = page_table_pages(ram, b.snap.sregs.cr3);
        Ok(Some(b))
    }
}

/// Whether a command line may ask for tracing: a `trace:` step, or a marker
/// step whose id could be a trace marker (ids are decimal or hex: only the
/// absence of `marker:` rules that out).
fn may_trace(cmdline: &str) -> bool {
    cmdline.contains("trace:") || cmdline.contains("marker:")
}

/// Offset of the QueueNotify register in a virtio-mmio window.
const QUEUE_NOTIFY: u64 = 0x50;

/// Enters the vCPU with `immediate_exit` so that KVM completes the last exit
/// (a port or MMIO access) without running the guest.
fn complete_exit(vcpu: &mut VcpuFd) -> Result<(), VmError> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
        Err(source) => Err(VmError::Kvm {
            what: "KVM_RUN (completing an exit)",
            source,
        }),
        // KVM returns EINTR before entering the guest; an exit here would
        // mean the guest ran, which the snapshot must not include.
        Ok(()) => Err(VmError::Fork("the vCPU ran while completing an exit")),
    }
}

/// Guest RAM as the VMM's bytes.
fn ram_slice(ram: &mut GuestMemoryMmap) -> &mut [u8] {
    let r = ram.iter().next().expect("guest RAM is one region");
    // SAFETY: the region's whole mapping, alive as long as `ram`. The vCPU is
    // not running (the fork-server only calls this between runs), and the
    // devices that write guest RAM are gone, so nothing else accesses it.
    unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len() as usize) }
}

/// Page numbers of the present pages of `mem`.
fn present_pages(mem: &[u8]) -> Result<Vec<u64>, VmError> {
    scan(mem.as_ptr().cast_mut(), mem.len(), Scan::Present)
}

/// The guest's page-table pages inside RAM, from its CR3 (4-level paging).
fn page_table_pages(ram: &[u8], cr3: u64) -> Vec<u64> {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    const PRESENT: u64 = 1;
    const HUGE: u64 = 1 << 7;
    let ram_pages = ram.len() as u64 / PAGE_SIZE;
    let entry = |page: u64, i: usize| {
        let at = (page * PAGE_SIZE) as usize + i * 8;
        u64::from_le_bytes(ram[at..at + 8].try_into().expect("8 bytes"))
    };
    let mut out = Vec::new();
    let mut level = vec![(cr3 & ADDR) / PAGE_SIZE];
    for depth in 0..4 {
        let mut next = Vec::new();
        for &page in &level {
            if page >= ram_pages || out.contains(&page) {
                continue;
            }
            out.push(page);
            if depth == 3 {
                continue;
            }
            for i in 0..512 {
                let e = entry(page, i);
                // PML4 entries never map; PDPT and PD entries with PS do.
                if e & PRESENT != 0 && (depth == 0 || e & HUGE == 0) {
                    next.push((e & ADDR) / PAGE_SIZE);
                }
            }
        }
        next.sort_unstable();
        next.dedup();
        level = next;
    }
    out
}

/// Puts the guest back at its snapshot: RAM, then the vCPU. Returns the
/// number of pages copied, or `None` when the guest's page tables changed
/// (the caller boots a new server).
fn restore(b: &mut Booted) -> Result<Option<u64>, VmError> {
    let vcpu = b.vcpu.as_mut().expect("a booted server has its vCPU");
    if b.ran {
        complete_exit(vcpu)?;
        b.ran = false;
    }
    let ram = ram_slice(&mut b.ram);
    let page = |n: u64| {
        let at = (n * PAGE_SIZE) as usize;
        at..at + PAGE_SIZE as usize
    };
    // Page-table pages: compared, never copied. The (shadow) MMU sets their
    // accessed and dirty bits as the guest runs, which the guest never
    // reads; any other change means the guest rewrote its page tables.
    for &n in &b.snap.page_tables {
        let snap = b.snap.pages.get(&n).map_or(&[][..], |p| &p[..]);
        if !same_page_table(&ram[page(n)], snap) {
            return Ok(None);
        }
    }
    let mut copied = 0;
    for n in present_pages(ram)? {
        if b.snap.page_tables.contains(&n) {
            continue;
        }
        let now = &mut ram[page(n)];
        match b.snap.pages.get(&n) {
            Some(snap) if now != &snap[..] => {
                now.copy_from_slice(snap);
                copied += 1;
            }
            Some(_) => {}
            None if now.iter().any(|&x| x != 0) => {
                now.fill(0);
                copied += 1;
            }
            None => {}
        }
    }
    vcpu.set_regs(&b.snap.regs)
        .map_err(kvm_err("KVM_SET_REGS"))?;
    vcpu.set_fpu(&b.snap.fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    vcpu.set_vcpu_events(&b.snap.events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    // Setting the special registers resets the (shadow) MMU: only when a run
    // changed them.
    let now = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    if !same_sregs(&now, &b.snap.sregs) {
        vcpu.set_sregs(&b.snap.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
    }
    Ok(Some(copied))
}

/// Whether a page-table page equals its snapshot but for the accessed and
/// dirty bits of its entries.
fn same_page_table(now: &[u8], snap: &[u8]) -> bool {
    const AD: u64 = (1 << 5) | (1 << 6);
    now.len() == snap.len()
        && now.chunks_exact(8).zip(snap.chunks_exact(8)).all(|(a, b)| {
            let a = u64::from_le_bytes(a.try_into().expect("8 bytes"));
            let b = u64::from_le_bytes(b.try_into().expect("8 bytes"));
            (a ^ b) & !AD == 0
        })
}

/// Whether two special-register sets are the same for the guest.
fn same_sregs(a: &kvm_sregs, b: &kvm_sregs) -> bool {
    let seg = |x: &kvm_bindings::kvm_segment, y: &kvm_bindings::kvm_segment| {
        (
            x.base, x.limit, x.selector, x.type_, x.present, x.dpl, x.db, x.s, x.l, x.g,
        ) == (
            y.base, y.limit, y.selector, y.type_, y.present, y.dpl, y.db, y.s, y.l, y.g,
        )
    };
    let dt = |x: &kvm_bindings::kvm_dtable, y: &kvm_bindings::kvm_dtable| {
        (x.base, x.limit) == (y.base, y.limit)
    };
    [
        (&a.cs, &b.cs),
        (&a.ds, &b.ds),
        (&a.es, &b.es),
        (&a.fs, &b.fs),
        (&a.gs, &b.gs),
        (&a.ss, &b.ss),
        (&a.tr, &b.tr),
        (&a.ldt, &b.ldt),
    ]
    .iter()
    .all(|(x, y)| seg(x, y))
        && dt(&a.gdt, &b.gdt)
        && dt(&a.idt, &b.idt)
        && (a.cr0, a.cr2, a.cr3, a.cr4, a.cr8, a.efer, a.apic_base)
            == (b.cr0, b.cr2, b.cr3, b.cr4, b.cr8, b.efer, b.apic_base)
        && a.interrupt_bitmap == b.interrupt_bitmap
}

/// A fork-server's device set for one run (see [`Devices::fork_run`]).
fn devices(
    ram: &GuestMemoryMmap,
    pmem: Arc<PmemRegion>,
    disk: Arc<Mutex<DiskImage>>,
    tracer: Arc<Mutex<Tracer>>,
    bus: MmioBus,
    start: Instant,
) -> Devices {
    let mut dev = Devices::new(start, ram.clone(), pmem, disk, tracer, bus);
    dev.fork_run = true;
    dev
}

/// Whether the server may serve another state after a run that ended so.
///
/// A run that exits through the exit port from ring 3 (success, or a failed
/// step, a bad command, a device error: `channel::exit` in the guest) left
/// nothing the restore does not put back: RAM, registers and devices are all
/// restored or new. An exception ends in the guest's ring-0 handler, a panic
/// may come from anywhere (a corrupted heap), a timeout stops the guest
/// anywhere: after those the server is not trusted and a new one is booted
/// (costs one boot, and such states are rare).
fn reusable_after(outcome: &Outcome) -> bool {
    use protocol::ExitCode;
    matches!(outcome, Outcome::Exited { code }
        if ![ExitCode::Exception as u32, ExitCode::Panic as u32].contains(code))
}

/// Runs the restored guest on one state's images. Returns the run and
/// whether the server may serve another state.
fn run_state(
    b: &mut Booted,
    config: &ForkConfig,
    pmem: Arc<PmemRegion>,
    disk: Arc<Mutex<DiskImage>>,
    start: Instant,
) -> Result<(RunOutcome, bool), VmError> {
    let fd = b.fd.as_ref().expect("a booted server has its VM");
    let vcpu = b.vcpu.as_mut().expect("a booted server has its vCPU");
    b.window.load(&pmem)?;
    let tracer = Arc::new(Mutex::new(Tracer::new()));
    let mut bus = build_bus(
        fd,
        &b.ram,
        &pmem,
        &disk,
        &tracer,
        false,
        BlkFaults::default(),
    )?;
    for (addr, data) in &b.snap.bus_writes {
        bus.write(*addr, data);
    }
    let mut dev = devices(&b.ram, pmem, disk, tracer, bus, start);
    dev.stats.setup_ns = start.elapsed().as_nanos() as u64;
    b.ran = true;
    let outcome = vcpu::run_to_end(vcpu, fd, &mut dev, config.timeout)?;
    let window = &mut b.window;
    let out = finish_run(dev, outcome, |pmem| {
        window.unload(pmem, config.pmem_writes_back)
    })?;
    // A traced run (refused in a fork-server run) left a trace window.
    let reusable = reusable_after(&out.outcome) && out.windows.is_empty();
    Ok((out, reusable))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PAGEMAP_SCAN` and the `/proc/self/pagemap` fallback agree: present
    /// pages of anonymous memory, written pages of a private file view.
    #[test]
    fn both_page_scans_find_the_same_pages() {
        let size = 64 * PAGE_SIZE as usize;
        // SAFETY: a new anonymous mapping, unmapped below.
        let anon = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(anon, libc::MAP_FAILED);
        let anon = anon.cast::<u8>();
        for page in [0usize, 3, 4, 63] {
            // SAFETY: inside the mapping.
            unsafe { anon.add(page * PAGE_SIZE as usize).write_volatile(1) };
        }
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let scanned = scan(anon, size, Scan::Present).unwrap();
        assert_eq!(scanned, vec![0, 3, 4, 63]);
        assert_eq!(
            scan_pagemap(&pagemap, anon, size, Scan::Present).unwrap(),
            scanned
        );
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(anon.cast(), size) };

        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        f.as_file().write_all_at(&[7u8; 8192], 0).unwrap();
        f.as_file().set_len(size as u64).unwrap();
        // SAFETY: a new private view of the file, unmapped below.
        let view = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(f.as_file()),
                0,
            )
        }
        .cast::<u8>();
        // SAFETY: inside the view: page 0 read (the file's page), 1 and 9 written.
        unsafe {
            assert_eq!(view.read_volatile(), 7);
            view.add(PAGE_SIZE as usize).write_volatile(1);
            view.add(9 * PAGE_SIZE as usize).write_volatile(1);
        }
        let scanned = scan(view, size, Scan::Private).unwrap();
        assert_eq!(scanned, vec![1, 9]);
        assert_eq!(
            scan_pagemap(&pagemap, view, size, Scan::Private).unwrap(),
            scanned
        );
        // SAFETY: the view made above.
        unsafe { libc::munmap(view.cast(), size) };
    }

    #[test]
    fn command_lines_that_may_trace_are_told_apart() {
        assert!(!may_trace(
            "pcache.run=start:mode=strict;stop;start:mode=strict pcache.markers=off"
        ));
        assert!(may_trace("pcache.run=start;trace:on;stop"));
        assert!(may_trace("harness.test=marker:0x80000001"));
        assert!(!may_trace("harness.test=mark;disk-fault:0"));
    }

    #[test]
    fn page_tables_compare_without_accessed_and_dirty_bits() {
        let snap = [0x1003u64, 0, 0x20_0083].map(u64::to_le_bytes).concat();
        let ad = [0x1063u64, 0, 0x20_00e3].map(u64::to_le_bytes).concat();
        assert!(same_page_table(&ad, &snap));
        let writable_flipped = [0x1001u64, 0, 0x20_0083].map(u64::to_le_bytes).concat();
        assert!(!same_page_table(&writable_flipped, &snap));
        let remapped = [0x2003u64, 0, 0x20_0083].map(u64::to_le_bytes).concat();
        assert!(!same_page_table(&remapped, &snap));
    }

    #[test]
    fn page_table_walk_finds_every_table_page_and_no_mapped_page() {
        // RAM of 8 pages: PML4 at page 1 -> PDPT at 2 -> PD at 3 -> PT at 4;
        // the PD also maps a 2 MiB page (PS), the PT a 4 KiB page 6, and one
        // PDPT entry points outside RAM.
        let mut ram = vec![0u8; 8 * PAGE_SIZE as usize];
        let mut set = |page: u64, i: usize, v: u64| {
            let at = (page * PAGE_SIZE) as usize + i * 8;
            ram[at..at + 8].copy_from_slice(&v.to_le_bytes());
        };
        set(1, 0, 0x2000 | 3);
        set(2, 0, 0x3000 | 3);
        set(2, 1, 0x10_0000_0000 | 3);
        set(3, 0, 0x4000 | 3);
        set(3, 1, 0x20_0000 | 0x83);
        set(4, 0, 0x6000 | 3);
        set(4, 1, 0x7000); // not present
        let mut found = page_table_pages(&ram, 0x1000);
        found.sort_unstable();
        assert_eq!(found, vec![1, 2, 3, 4]);
    }
}
