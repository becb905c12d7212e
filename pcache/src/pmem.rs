//! Persistent memory: the [`Pmem`] trait and its implementations.
//!
//! The model is x86-64 persistent memory (`docs/format.md` §10): data reaches
//! the device through 8-byte aligned stores ([`Pmem::store_u64`], the unit of
//! power-fail atomicity) and ordinary zeroing ([`Pmem::zero_range`]); nothing is
//! durable until it has been flushed ([`Pmem::flush`]) and a fence
//! ([`Pmem::fence`]) has completed. Stores issued since the last fence may
//! persist in any order and any subset. Reads always see the latest stores.
//!
//! Implementations:
//! - [`VecPmem`]: a contiguous byte buffer.
//! - [`SparsePmem`]: a buffer that stores only the 4 KiB pages ever written with
//!   a non-zero value, so a 512 MiB or 1 GiB device costs a few hundred KiB.
//! - [`RecordingPmem`]: a test double over a [`SparsePmem`] that records every
//!   store, zeroing, flush and fence in order and can rebuild the image of any
//!   crash state.
//! - `FilePmem` and `MmapPmem` (feature `std`): a host file, through positioned
//!   reads and writes or through a shared mapping.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use persist::{Domain, Persistence, Role};

use crate::hooks::{CrashPoint, Hooks};

/// Errors of a persistent-memory access.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PmemError {
    /// The access reaches past the end of the device.
    #[error("access of {len} bytes at {off:#x} is beyond the device ({size} bytes)")]
    OutOfBounds {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// A store or zeroing that is not 8-byte aligned.
    #[error("unaligned access at {off:#x} (length {len}): stores are 8-byte words")]
    Unaligned {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// A store to a read-only device.
    #[error("the device is open read-only")]
    ReadOnly,
    /// An I/O error of the host.
    #[error("I/O error: {0}")]
    Io(String),
}

impl serde::Serialize for PmemError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Checks that `[off, off+len)` lies inside a device of `size` bytes.
pub fn check_bounds(off: u64, len: u64, size: u64) -> Result<(), PmemError> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(PmemError::OutOfBounds { off, len, size }),
    }
}

fn check_word(off: u64, len: u64, size: u64) -> Result<(), PmemError> {
    if off % 8 != 0 || len % 8 != 0 {
        return Err(PmemError::Unaligned { off, len });
    }
    check_bounds(off, len, size)
}

/// A persistent-memory device.
pub trait Pmem {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Reads `buf.len()` bytes at `off` (sees every store issued so far).
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), PmemError>;

    /// Stores one little-endian 8-byte word at an 8-aligned `off`. Not durable
    /// until flushed and fenced.
    fn store_u64(&mut self, off: u64, val: u64) -> Result<(), PmemError>;

    /// Stores `bytes` (a multiple of 8, at an 8-aligned `off`) as ascending
    /// 8-byte words: the same as calling [`Pmem::store_u64`] for each, which
    /// is the default. An in-memory device may copy them at once (the words
    /// are unordered until a fence anyway); a traced one must not.
    fn store_words(&mut self, off: u64, bytes: &[u8]) -> Result<(), PmemError> {
        check_word(off, bytes.len() as u64, self.size())?;
        for (i, w) in crate::format::words(bytes).enumerate() {
            self.store_u64(off + 8 * i as u64, w)?;
        }
        Ok(())
    }

    /// Zeroes `[off, off+len)` (8-aligned) with ordinary, unfenced stores.
    /// Implementations may skip words that are already zero.
    fn zero_range(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
        check_word(off, len, self.size())?;
        let mut o = off;
        while o < off + len {
            self.store_u64(o, 0)?;
            o += 8;
        }
        Ok(())
    }

    /// Writes back the cache lines of `[off, off+len)` (no ordering by itself).
    fn flush(&mut self, off: u64, len: u64) -> Result<(), PmemError>;

    /// Waits until every flushed store is durable.
    fn fence(&mut self) -> Result<(), PmemError>;

    /// `flush` then `fence`.
    fn persist(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
        self.flush(off, len)?;
        self.fence()
    }

    /// The lowest offset at or after `off` where non-zero bytes may be, or
    /// `None` when every byte from `off` to the end reads as zero (a sparse
    /// file's holes, pages never written). Lets a reader skip what was never
    /// written instead of reading it; the default knows nothing and says
    /// `Some(off)`.
    fn next_data(&self, off: u64) -> Option<u64> {
        Some(off)
    }
}

impl<P: Pmem + ?Sized> Pmem for &mut P {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), PmemError> {
        (**self).read(off, buf)
    }
    fn store_u64(&mut self, off: u64, val: u64) -> Result<(), PmemError> {
        (**self).store_u64(off, val)
    }
    fn store_words(&mut self, off: u64, bytes: &[u8]) -> Result<(), PmemError> {
        (**self).store_words(off, bytes)
    }
    fn zero_range(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
        (**self).zero_range(off, len)
    }
    fn flush(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
        (**self).flush(off, len)
    }
    fn fence(&mut self) -> Result<(), PmemError> {
        (**self).fence()
    }
    fn persist(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
        (**self).persist(off, len)
    }
    fn next_data(&self, off: u64) -> Option<u64> {
        (**self).next_data(off)
    }
}

/// Writes an 8-aligned record as ascending 8-byte stores (what the kernel's
/// `memcpy_flushcache` does for these sizes), then flushes it. No fence.
pub fn write_words<P: Pmem + ?Sized>(
    pmem: &mut P,
    off: u64,
    bytes: &[u8],
) -> Result<(), PmemError> {
    if bytes.len() % 8 != 0 {
        return Err(PmemError::Unaligned {
            off,
            len: bytes.len() as u64,
        });
    }
    pmem.store_words(off, bytes)?;
    pmem.flush(off, bytes.len() as u64)
}

// ---------------------------------------------------------------------------
// VecPmem
// ---------------------------------------------------------------------------

/// Persistent memory over a contiguous byte buffer (flush and fence are no-ops).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VecPmem {
    buf: Vec<u8>,
}

impl VecPmem {
    /// A zeroed device of `size` bytes (the allocation is zero-initialised by the
    /// allocator, so untouched pages cost nothing on a host).
    pub fn new(size: usize) -> Self {
        VecPmem { buf: vec![0; size] }
    }

    /// A device holding `buf`.
    pub fn from_vec(buf: Vec<u8>) -> Self {
        VecPmem { buf }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    /// The bytes, mutably (for tests that corrupt an image).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The buffer.
    pub fn into_vec(self) -> Vec<u8> {
        self.buf
    }
}

impl Pmem for VecPmem {
    fn size(&self) -> u64 {
        self.buf.len() as u64
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), PmemError> {
        check_bounds(off, buf.len() as u64, self.size())?;
        buf.copy_from_slice(&self.buf[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn store_u64(&mut self, off: u64, val: u64) -> Result<(), PmemError> {
        check_word(off, 8, self.size())?;
        self.buf[off as usize..off as usize + 8].copy_from_slice(&val.to_le_bytes());
        Ok(())
    }
    fn store_words(&mut self, off: u64, bytes: &[u8]) -> Result<(), PmemError> {
        check_word(off, bytes.len() as u64, self.size())?;
        self.buf[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
    fn zero_range(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
        check_word(off, len, self.size())?;
        self.buf[off as usize..(off + len) as usize].fill(0);
        Ok(())
    }
    fn flush(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
        check_bounds(off, len, self.size())
    }
    fn fence(&mut self) -> Result<(), PmemError> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// SparsePmem
// ---------------------------------------------------------------------------

/// Page size of [`SparsePmem`].
pub const SPARSE_PAGE: u64 = 4096;

/// Persistent memory that keeps only pages holding non-zero bytes; reads of
/// other pages return zeros. Flush and fence are no-ops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SparsePmem {
    size: u64,
    pages: BTreeMap<u64, Box<[u8; SPARSE_PAGE as usize]>>,
}

impl SparsePmem {
    /// A zeroed device of `size` bytes.
    pub fn new(size: u64) -> Self {
        SparsePmem {
            size,
            pages: BTreeMap::new(),
        }
    }

    /// An in-memory copy of `src` (its non-zero pages; runs `src` reports as
    /// never written are skipped without reading): a copy-on-write view for
    /// work that must not change the source, such as activating a user's image.
    pub fn copy_of<P: Pmem + ?Sized>(src: &P) -> Result<Self, PmemError> {
        const CHUNK: u64 = 1 << 20;
        let size = src.size();
        let mut img = SparsePmem::new(size);
        let mut buf = vec![0u8; CHUNK as usize];
        let mut off = 0;
        while off < size {
            let Some(data) = src.next_data(off).filter(|&d| d < size) else {
                break;
            };
            // Whole pages, whatever offset the source reports.
            let start = core::cmp::max(off, data - data % SPARSE_PAGE);
            let n = core::cmp::min(CHUNK, size - start) as usize;
            src.read(start, &mut buf[..n])?;
            for (i, page) in buf[..n].chunks(SPARSE_PAGE as usize).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    img.write_bytes(start + i as u64 * SPARSE_PAGE, page)?;
                }
            }
            off = start + n as u64;
        }
        Ok(img)
    }

    /// Number of pages held.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// Writes bytes directly (no store model; for building test images).
    pub fn write_bytes(&mut self, off: u64, data: &[u8]) -> Result<(), PmemError> {
        check_bounds(off, data.len() as u64, self.size)?;
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let page = pos / SPARSE_PAGE;
            let in_page = (pos % SPARSE_PAGE) as usize;
            let n = core::cmp::min(SPARSE_PAGE as usize - in_page, data.len() - done);
            let chunk = &data[done..done + n];
            if let Some(p) = self.pages.get_mut(&page) {
                p[in_page..in_page + n].copy_from_slice(chunk);
            } else if chunk.iter().any(|&b| b != 0) {
                let mut p = Box::new([0u8; SPARSE_PAGE as usize]);
                p[in_page..in_page + n].copy_from_slice(chunk);
                self.pages.insert(page, p);
            }
            done += n;
        }
        Ok(())
    }

    /// Whether any byte of `[off, off+len)` is non-zero.
    pub fn any_nonzero(&self, off: u64, len: u64) -> bool {
        let end = off.saturating_add(len);
        let first = off / SPARSE_PAGE;
        let last = end.div_ceil(SPARSE_PAGE);
        self.pages.range(first..last).any(|(&k, p)| {
            let ps = k * SPARSE_PAGE;
            let a = core::cmp::max(ps, off);
            let b = core::cmp::min(ps + SPARSE_PAGE, end);
            p[(a - ps) as usize..(b - ps) as usize]
                .iter()
                .any(|&x| x != 0)
        })
    }

    /// Indices of the pages held, ascending.
    pub fn page_indices(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages.keys().copied()
    }

    /// Whether two images hold the same bytes.
    pub fn same_bytes(&self, other: &SparsePmem) -> bool {
        if self.size != other.size {
            return false;
        }
        let zero = [0u8; SPARSE_PAGE as usize];
        let mut keys: Vec<u64> = self
            .pages
            .keys()
            .chain(other.pages.keys())
            .copied()
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys.into_iter().all(|k| {
            let a = self.pages.get(&k).map_or(&zero, |p| p);
            let b = other.pages.get(&k).map_or(&zero, |p| p);
            a == b
        })
    }
}

impl Pmem for SparsePmem {
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), PmemError> {
        check_bounds(off, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let page = pos / SPARSE_PAGE;
            let in_page = (pos % SPARSE_PAGE) as usize;
            let n = core::cmp::min(SPARSE_PAGE as usize - in_page, buf.len() - done);
            match self.pages.get(&page) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[in_page..in_page + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }
    fn store_u64(&mut self, off: u64, val: u64) -> Result<(), PmemError> {
        check_word(off, 8, self.size)?;
        self.write_bytes(off, &val.to_le_bytes())
    }
    fn store_words(&mut self, off: u64, bytes: &[u8]) -> Result<(), PmemError> {
        check_word(off, bytes.len() as u64, self.size)?;
        self.write_bytes(off, bytes)
    }
    fn zero_range(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
        check_word(off, len, self.size)?;
        let end = off + len;
        let first = off / SPARSE_PAGE;
        let last = end.div_ceil(SPARSE_PAGE);
        let keys: Vec<u64> = self.pages.range(first..last).map(|(k, _)| *k).collect();
        for k in keys {
            let ps = k * SPARSE_PAGE;
            let a = core::cmp::max(ps, off);
            let b = core::cmp::min(ps + SPARSE_PAGE, end);
            let p = self.pages.get_mut(&k).expect("key listed above");
            p[(a - ps) as usize..(b - ps) as usize].fill(0);
            if p.iter().all(|&x| x == 0) {
                self.pages.remove(&k);
            }
        }
        Ok(())
    }
    fn flush(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
        check_bounds(off, len, self.size)
    }
    fn fence(&mut self) -> Result<(), PmemError> {
        Ok(())
    }
    fn next_data(&self, off: u64) -> Option<u64> {
        // Only pages held can hold non-zero bytes.
        let (&page, _) = self.pages.range(off / SPARSE_PAGE..).next()?;
        Some(core::cmp::max(page * SPARSE_PAGE, off))
    }
}

// ---------------------------------------------------------------------------
// RecordingPmem
// ---------------------------------------------------------------------------

/// One recorded persistent-memory access (or a crash-point marker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `store_u64(off, val)`.
    Store {
        /// Offset.
        off: u64,
        /// Value.
        val: u64,
    },
    /// `zero_range(off, len)`.
    ZeroRange {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// `flush(off, len)`.
    Flush {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// `fence()`.
    Fence,
    /// A crash-point sequence begins ([`RecordingHooks`]).
    Begin(CrashPoint),
    /// A crash-point sequence ends ([`RecordingHooks`]).
    End(CrashPoint),
    /// A 512-byte sector written to the backing device ([`RecordingBacking`]);
    /// `data` indexes the recorder's sector store.
    DiskWrite {
        /// Sector.
        sector: u64,
        /// Index of its content in the sector store.
        data: u32,
    },
    /// A completed backing-device flush ([`RecordingBacking`]).
    DiskFlush,
}

impl Access {
    /// Whether the access writes to the image (a store or a zeroing).
    pub fn is_write(&self) -> bool {
        matches!(self, Access::Store { .. } | Access::ZeroRange { .. })
    }
}

/// Stores and zeroings are writes to the pmem domain, a fence is its barrier;
/// flushes (cache-line write-backs without a fence) and markers are neither.
impl Persistence for Access {
    fn role(&self) -> Role {
        match self {
            Access::Store { .. } | Access::ZeroRange { .. } => Role::Write(Domain::Pmem),
            Access::Fence => Role::Barrier(Domain::Pmem),
            Access::DiskWrite { .. } => Role::Write(Domain::Disk),
            Access::DiskFlush => Role::Barrier(Domain::Disk),
            Access::Flush { .. } | Access::Begin(_) | Access::End(_) => Role::Neither,
        }
    }
}

/// A test double that applies every access to an in-memory image and records
/// it, so that the image of any crash state can be rebuilt.
///
/// A crash state is a *cut* (the number of events issued before power failed)
/// plus the choice of which writes issued since the last fence before the cut
/// persisted; everything before that fence is durable.
#[derive(Clone, Debug)]
pub struct RecordingPmem {
    base: SparsePmem,
    current: SparsePmem,
    events: Rc<RefCell<Vec<Access>>>,
    sectors: Rc<RefCell<Vec<[u8; 512]>>>,
}

impl RecordingPmem {
    /// Starts recording over `base` (the durable image at the start).
    pub fn new(base: SparsePmem) -> Self {
        RecordingPmem {
            current: base.clone(),
            base,
            events: Rc::new(RefCell::new(Vec::new())),
            sectors: Rc::new(RefCell::new(Vec::new())),
        }
    }

    /// A backing device over `base` whose writes and flushes are recorded
    /// in this recorder's event list, so a cut covers both devices.
    pub fn backing(&self, base: Vec<u8>) -> RecordingBacking {
        RecordingBacking {
            current: crate::backing::VecBacking::from_vec(base.clone()),
            base,
            events: self.events.clone(),
            sectors: self.sectors.clone(),
        }
    }

    /// The backing device's image at a cut: `base` (the image the recording
    /// backing started from), the disk writes before the last completed
    /// disk flush preceding `cut`, and of the writes pending since, those for
    /// which `persisted(index)` is true, in issue order (each sector alone).
    pub fn disk_image(
        &self,
        base: &[u8],
        cut: usize,
        persisted: impl Fn(usize) -> bool,
    ) -> Vec<u8> {
        let ev = self.events.borrow();
        let sectors = self.sectors.borrow();
        let cut = cut.min(ev.len());
        let start = persist::durable_prefix(&ev, Domain::Disk, cut);
        let mut img = base.to_vec();
        for (i, e) in ev[..cut].iter().enumerate() {
            if let Access::DiskWrite { sector, data } = *e {
                if i >= start && !persisted(i) {
                    continue;
                }
                let o = sector as usize * 512;
                img[o..o + 512].copy_from_slice(&sectors[data as usize]);
            }
        }
        img
    }

    /// Hooks that record crash-point markers into the same event list.
    pub fn hooks(&self) -> RecordingHooks {
        RecordingHooks {
            events: self.events.clone(),
        }
    }

    /// The events so far.
    pub fn events(&self) -> Vec<Access> {
        self.events.borrow().clone()
    }

    /// The image as the running code sees it (every store applied).
    pub fn current(&self) -> &SparsePmem {
        &self.current
    }

    /// The image at the start.
    pub fn base(&self) -> &SparsePmem {
        &self.base
    }

    /// Index just after the last fence among the first `cut` events (0 if
    /// none), by the shared rule ([`persist::durable_prefix`]).
    pub fn durable_prefix(&self, cut: usize) -> usize {
        persist::durable_prefix(&self.events.borrow(), Domain::Pmem, cut)
    }

    /// Indices of the writes issued after the last fence among the first `cut`
    /// events: the ones that may or may not have persisted at that cut
    /// ([`persist::pending`]).
    pub fn pending(&self, cut: usize) -> Vec<usize> {
        persist::pending(&self.events.borrow(), Domain::Pmem, cut)
    }

    /// The durable image of the crash state: events before the last fence
    /// preceding `cut` applied, and of the pending writes those for which
    /// `persisted(index)` is true, applied in issue order.
    pub fn crash_image(&self, cut: usize, persisted: impl Fn(usize) -> bool) -> SparsePmem {
        let ev = self.events.borrow();
        let cut = cut.min(ev.len());
        let start = persist::durable_prefix(&ev, Domain::Pmem, cut);
        let mut img = self.base.clone();
        for (i, e) in ev[..cut].iter().enumerate() {
            if i >= start && !persisted(i) {
                continue;
            }
            apply_event(&mut img, e);
        }
        img
    }

    /// The image after the first `cut` events with every write persisted.
    pub fn image_at(&self, cut: usize) -> SparsePmem {
        self.crash_image(cut, |_| true)
    }

    /// For every event, whether it is a write that changes the image when
    /// applied on top of all earlier events (all persisted). One pass.
    pub fn changing_writes(&self) -> Vec<bool> {
        let ev = self.events.borrow();
        let mut img = self.base.clone();
        let mut out = Vec::with_capacity(ev.len());
        for e in ev.iter() {
            let changes = match *e {
                Access::Store { off, val } => {
                    let mut b = [0u8; 8];
                    img.read(off, &mut b).is_ok() && u64::from_le_bytes(b) != val
                }
                Access::ZeroRange { off, len } => img.any_nonzero(off, len),
                _ => false,
            };
            out.push(changes);
            apply_event(&mut img, e);
        }
        out
    }
}

/// Applies a recorded write to an image (other events are no-ops). Events
/// were bounds-checked when they were recorded.
pub fn apply_event(img: &mut SparsePmem, e: &Access) {
    // The events were validated when they were recorded.
    match *e {
        Access::Store { off, val } => {
            let _ = img.store_u64(off, val);
        }
        Access::ZeroRange { off, len } => {
            let _ = img.zero_range(off, len);
        }
        _ => {}
    }
}

impl Pmem for RecordingPmem {
    fn size(&self) -> u64 {
        self.current.size()
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), PmemError> {
        self.current.read(off, buf)
    }
    fn store_u64(&mut self, off: u64, val: u64) -> Result<(), PmemError> {
        self.current.store_u64(off, val)?;
        self.events.borrow_mut().push(Access::Store { off, val });
        Ok(())
    }
    fn zero_range(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
        self.current.zero_range(off, len)?;
        self.events
            .borrow_mut()
            .push(Access::ZeroRange { off, len });
        Ok(())
    }
    fn flush(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
        check_bounds(off, len, self.size())?;
        self.events.borrow_mut().push(Access::Flush { off, len });
        Ok(())
    }
    fn fence(&mut self) -> Result<(), PmemError> {
        self.events.borrow_mut().push(Access::Fence);
        Ok(())
    }
    fn next_data(&self, off: u64) -> Option<u64> {
        self.current.next_data(off)
    }
}

/// A backing device that records its sector writes and flushes into a
/// [`RecordingPmem`]'s event list ([`RecordingPmem::backing`]).
#[derive(Clone, Debug)]
pub struct RecordingBacking {
    base: Vec<u8>,
    current: crate::backing::VecBacking,
    events: Rc<RefCell<Vec<Access>>>,
    sectors: Rc<RefCell<Vec<[u8; 512]>>>,
}

impl RecordingBacking {
    /// The image it started from.
    pub fn base(&self) -> &[u8] {
        &self.base
    }
}

impl crate::backing::Backing for RecordingBacking {
    fn sectors(&self) -> u64 {
        self.current.sectors()
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), crate::backing::BackingError> {
        self.current.read(sector, buf)
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), crate::backing::BackingError> {
        self.current.write(sector, buf)?;
        let mut ev = self.events.borrow_mut();
        let mut store = self.sectors.borrow_mut();
        for (i, s) in buf.chunks_exact(512).enumerate() {
            ev.push(Access::DiskWrite {
                sector: sector + i as u64,
                data: store.len() as u32,
            });
            store.push(s.try_into().expect("a sector"));
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), crate::backing::BackingError> {
        self.events.borrow_mut().push(Access::DiskFlush);
        Ok(())
    }
}

/// Hooks that record crash-point markers into a [`RecordingPmem`]'s event list.
#[derive(Clone, Debug)]
pub struct RecordingHooks {
    events: Rc<RefCell<Vec<Access>>>,
}

impl Hooks for RecordingHooks {
    fn begin(&mut self, cp: CrashPoint) {
        self.events.borrow_mut().push(Access::Begin(cp));
    }
    fn end(&mut self, cp: CrashPoint) {
        self.events.borrow_mut().push(Access::End(cp));
    }
}

// ---------------------------------------------------------------------------
// Host files (std)
// ---------------------------------------------------------------------------

#[cfg(feature = "std")]
pub use host::{FilePmem, MmapPmem};

#[cfg(feature = "std")]
mod host {
    use super::{check_bounds, check_word, Pmem, PmemError};
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    fn io(e: std::io::Error) -> PmemError {
        PmemError::Io(e.to_string())
    }

    /// `lseek(SEEK_DATA)`: where the file's next data (not a hole) starts.
    /// ENXIO means none up to the end; any other answer (a file system or a
    /// device without holes) is no knowledge, so `off` itself.
    fn seek_data(file: &File, off: u64, size: u64) -> Option<u64> {
        if off >= size {
            return None;
        }
        match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(off)) {
            Ok(d) if d >= size => None,
            Ok(d) => Some(d.max(off)),
            Err(rustix::io::Errno::NXIO) => None,
            Err(_) => Some(off),
        }
    }

    /// A host file accessed with positioned reads and writes. Opened read-only,
    /// every store fails with [`PmemError::ReadOnly`]; read-write, a fence is an
    /// `fdatasync` when anything was written since the last one.
    #[derive(Debug)]
    pub struct FilePmem {
        file: File,
        size: u64,
        writable: bool,
        dirty: bool,
    }

    impl FilePmem {
        /// Opens `path` read-only.
        pub fn open_read_only(path: &Path) -> std::io::Result<Self> {
            let file = File::open(path)?;
            let size = file.metadata()?.len();
            Ok(FilePmem {
                file,
                size,
                writable: false,
                dirty: false,
            })
        }

        /// Uses an already opened file of `size` bytes (for example a block
        /// device, whose metadata says 0 bytes), read-only or read-write.
        pub fn from_file(file: File, size: u64, writable: bool) -> Self {
            FilePmem {
                file,
                size,
                writable,
                dirty: false,
            }
        }

        /// Opens `path` read-write.
        pub fn open(path: &Path) -> std::io::Result<Self> {
            let file = OpenOptions::new().read(true).write(true).open(path)?;
            let size = file.metadata()?.len();
            Ok(FilePmem {
                file,
                size,
                writable: true,
                dirty: false,
            })
        }
    }

    impl Pmem for FilePmem {
        fn size(&self) -> u64 {
            self.size
        }
        fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), PmemError> {
            check_bounds(off, buf.len() as u64, self.size)?;
            self.file.read_exact_at(buf, off).map_err(io)
        }
        fn store_u64(&mut self, off: u64, val: u64) -> Result<(), PmemError> {
            if !self.writable {
                return Err(PmemError::ReadOnly);
            }
            check_word(off, 8, self.size)?;
            self.dirty = true;
            self.file.write_all_at(&val.to_le_bytes(), off).map_err(io)
        }
        fn store_words(&mut self, off: u64, bytes: &[u8]) -> Result<(), PmemError> {
            if !self.writable {
                return Err(PmemError::ReadOnly);
            }
            check_word(off, bytes.len() as u64, self.size)?;
            self.dirty = true;
            self.file.write_all_at(bytes, off).map_err(io)
        }
        fn zero_range(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
            if !self.writable {
                return Err(PmemError::ReadOnly);
            }
            check_word(off, len, self.size)?;
            // Skip words already zero so that a sparse file stays sparse.
            let mut buf = vec![0u8; len as usize];
            self.read(off, &mut buf)?;
            for (i, c) in buf.chunks_exact(8).enumerate() {
                if c.iter().any(|&b| b != 0) {
                    self.store_u64(off + 8 * i as u64, 0)?;
                }
            }
            Ok(())
        }
        fn flush(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
            check_bounds(off, len, self.size)
        }
        fn fence(&mut self) -> Result<(), PmemError> {
            if self.dirty {
                self.file.sync_data().map_err(io)?;
                self.dirty = false;
            }
            Ok(())
        }
        fn next_data(&self, off: u64) -> Option<u64> {
            seek_data(&self.file, off, self.size)
        }
    }

    /// A host file mapped shared and writable (`memmap2`). A flush records the
    /// range; a fence `msync`s the ranges flushed since the last fence.
    pub struct MmapPmem {
        map: memmap2::MmapMut,
        file: File,
        flushed: Option<(u64, u64)>,
    }

    impl core::fmt::Debug for MmapPmem {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("MmapPmem")
                .field("size", &self.map.len())
                .finish()
        }
    }

    impl MmapPmem {
        /// Maps `path` read-write.
        pub fn open(path: &Path) -> std::io::Result<Self> {
            let file = OpenOptions::new().read(true).write(true).open(path)?;
            // SAFETY: the mapping is private to this process's use of the file;
            // the caller must not truncate the file while it is mapped (a
            // truncation would turn accesses past the new end into SIGBUS).
            let map = unsafe { memmap2::MmapMut::map_mut(&file)? };
            Ok(MmapPmem {
                map,
                file,
                flushed: None,
            })
        }

        /// Flushes the whole mapping to the file.
        pub fn sync_all(&self) -> std::io::Result<()> {
            self.map.flush()
        }
    }

    impl Pmem for MmapPmem {
        fn size(&self) -> u64 {
            self.map.len() as u64
        }
        fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), PmemError> {
            check_bounds(off, buf.len() as u64, self.size())?;
            buf.copy_from_slice(&self.map[off as usize..off as usize + buf.len()]);
            Ok(())
        }
        fn store_u64(&mut self, off: u64, val: u64) -> Result<(), PmemError> {
            check_word(off, 8, self.size())?;
            self.map[off as usize..off as usize + 8].copy_from_slice(&val.to_le_bytes());
            Ok(())
        }
        fn store_words(&mut self, off: u64, bytes: &[u8]) -> Result<(), PmemError> {
            check_word(off, bytes.len() as u64, self.size())?;
            self.map[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
            Ok(())
        }
        fn zero_range(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
            check_word(off, len, self.size())?;
            // Skip words already zero: writing a hole's page would allocate it.
            for w in self.map[off as usize..(off + len) as usize].chunks_exact_mut(8) {
                if w.iter().any(|&b| b != 0) {
                    w.fill(0);
                }
            }
            Ok(())
        }
        fn flush(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
            check_bounds(off, len, self.size())?;
            let end = off + len;
            self.flushed = Some(match self.flushed {
                None => (off, end),
                Some((a, b)) => (a.min(off), b.max(end)),
            });
            Ok(())
        }
        fn fence(&mut self) -> Result<(), PmemError> {
            if let Some((a, b)) = self.flushed.take() {
                self.map
                    .flush_range(a as usize, (b - a) as usize)
                    .map_err(io)?;
            }
            Ok(())
        }
        fn next_data(&self, off: u64) -> Option<u64> {
            seek_data(&self.file, off, self.size())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_alignment_are_errors() {
        let mut v = VecPmem::new(64);
        let mut s = SparsePmem::new(64);
        for p in [&mut v as &mut dyn Pmem, &mut s as &mut dyn Pmem] {
            assert!(matches!(
                p.store_u64(60, 1),
                Err(PmemError::Unaligned { .. })
            ));
            assert!(matches!(
                p.store_u64(64, 1),
                Err(PmemError::OutOfBounds { .. })
            ));
            assert!(matches!(
                p.zero_range(8, 4),
                Err(PmemError::Unaligned { .. })
            ));
            assert!(matches!(
                p.zero_range(0, 72),
                Err(PmemError::OutOfBounds { .. })
            ));
            let mut b = [0u8; 8];
            assert!(matches!(
                p.read(u64::MAX, &mut b),
                Err(PmemError::OutOfBounds { .. })
            ));
            assert!(p.read(57, &mut b).is_err());
            p.store_u64(56, 0x0102_0304_0506_0708).unwrap();
            p.read(56, &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), 0x0102_0304_0506_0708);
            p.zero_range(0, 64).unwrap();
            p.read(56, &mut b).unwrap();
            assert_eq!(b, [0; 8]);
        }
    }

    #[test]
    fn sparse_pmem_keeps_only_nonzero_pages() {
        let mut s = SparsePmem::new(1 << 30);
        s.zero_range(0, 1 << 20).unwrap();
        s.store_u64(8192, 0).unwrap();
        assert_eq!(s.pages(), 0);
        s.store_u64(8192 + 4088, 7).unwrap();
        s.store_u64(8192 + 4096, 9).unwrap();
        assert_eq!(s.pages(), 2);
        let mut b = [0u8; 16];
        s.read(8192 + 4088, &mut b).unwrap();
        assert_eq!(&b[..8], &7u64.to_le_bytes());
        assert_eq!(&b[8..], &9u64.to_le_bytes());
        s.zero_range(8192, 8192).unwrap();
        assert_eq!(s.pages(), 0);
    }

    #[test]
    fn recording_rebuilds_crash_states() {
        let mut r = RecordingPmem::new(SparsePmem::new(1 << 20));
        r.store_u64(0, 1).unwrap(); // 0
        r.flush(0, 8).unwrap(); // 1
        r.fence().unwrap(); // 2
        r.store_u64(8, 2).unwrap(); // 3
        r.store_u64(16, 3).unwrap(); // 4
        r.store_u64(8, 4).unwrap(); // 5
        r.fence().unwrap(); // 6
        let word = |img: &SparsePmem, off| {
            let mut b = [0u8; 8];
            img.read(off, &mut b).unwrap();
            u64::from_le_bytes(b)
        };
        assert_eq!(r.pending(6), vec![3, 4, 5]);
        assert_eq!(r.pending(7), Vec::<usize>::new());
        let img = r.crash_image(6, |i| i == 4);
        assert_eq!((word(&img, 0), word(&img, 8), word(&img, 16)), (1, 0, 3));
        let img = r.crash_image(6, |i| i == 3);
        assert_eq!(word(&img, 8), 2);
        let img = r.crash_image(6, |_| true);
        assert_eq!(word(&img, 8), 4);
        let img = r.crash_image(1, |_| false);
        assert_eq!(word(&img, 0), 0);
        assert!(r.image_at(7).same_bytes(r.current()));
        let ch = r.changing_writes();
        assert_eq!(ch, vec![true, false, false, true, true, true, false]);
    }
}
