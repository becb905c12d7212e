//! pcache's device traits over the guest's drivers, and its crash-point hooks.
//!
//! * [`GuestPmem`]: `pcache::Pmem` over the virtio-pmem region that ring 0
//!   mapped at `PMEM_START`. Reads come straight from the mapping; every store
//!   is one 8-byte volatile store (the VMM traces each as one exit, and the
//!   persistence models count 8-byte words); `zero_range` stores only the words
//!   that are not already zero; `flush` only checks its range (the region is
//!   write-back RAM to the guest; durability is the device's FLUSH); `fence`
//!   is one virtio-pmem FLUSH, skipped when nothing was stored since the last,
//!   or a plain CPU fence with `pcache.fences=cpu` (see [`set_cpu_fences`]).
//! * `GuestBacking` (`backing.rs`): `pcache::backing::Backing` over
//!   virtio-blk (part 2 of the module uses it; part 1 never does).
//! * [`MarkerHooks`]: `pcache::Hooks` writing `crash_point_begin/end(n)` to the
//!   marker port, one `out` each, unless switched off.

use crate::channel;
use crate::virtio::pmem::{Pmem as PmemDevice, PmemError as DeviceError};
use alloc::format;
use core::sync::atomic::{AtomicBool, Ordering};
use pcache::pmem::check_bounds;
use pcache::{CrashPoint, Hooks, Pmem, PmemError};
use protocol::markers::{crash_point_begin, crash_point_end};
use protocol::ExitCode;

/// Whether fences are plain CPU fences (`pcache.fences=cpu`).
static CPU_FENCES: AtomicBool = AtomicBool::new(false);

/// Makes every later `fence` a CPU fence (`true`) or a virtio-pmem FLUSH.
///
/// Why a CPU fence is sound where it is used (untraced recovery boots): a
/// FLUSH is a VM exit so that the VMM can put a `PmemFlush` event in the
/// trace, where it orders which stores a power cut may lose. An untraced run
/// has no trace and no cut inside it: the host never asks what was durable
/// at any point of it, only what the guest reported at the end, and a FLUSH
/// of a copy-on-write image changes nothing on the host (`PmemRegion::flush`).
/// So the only ordering left to keep is the guest's own, which the CPU fence
/// keeps. A run that is cut (the workload of every scenario, and the traced
/// recovery of `crash-during-recovery`) never sets this flag.
pub fn set_cpu_fences(on: bool) {
    CPU_FENCES.store(on, Ordering::Relaxed);
}

/// `pcache::Pmem` over the virtio-pmem region.
pub struct GuestPmem<'a> {
    dev: &'a mut PmemDevice,
    size: u64,
}

impl<'a> GuestPmem<'a> {
    pub fn new(dev: &'a mut PmemDevice) -> Self {
        let size = dev.size();
        GuestPmem { dev, size }
    }

    fn check_words(&self, off: u64, len: u64) -> Result<(), PmemError> {
        if !off.is_multiple_of(8) || !len.is_multiple_of(8) {
            return Err(PmemError::Unaligned { off, len });
        }
        check_bounds(off, len, self.size)
    }

    fn word(&self, off: u64) -> u64 {
        // SAFETY: callers checked `off` (8-aligned, `off + 8 <= size`); the
        // region is mapped by ring 0 for PMEM_MAX_SIZE >= size bytes.
        unsafe {
            self.dev
                .base()
                .add(off as usize)
                .cast::<u64>()
                .read_volatile()
        }
    }

    fn store(&mut self, off: u64, val: u64) -> Result<(), PmemError> {
        self.dev.store_u64(off, val).map_err(io)
    }
}

fn io(e: DeviceError) -> PmemError {
    PmemError::Io(format!("{e}"))
}

impl Pmem for GuestPmem<'_> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), PmemError> {
        check_bounds(off, buf.len() as u64, self.size)?;
        // SAFETY: `[off, off + len)` lies inside the mapped region (checked);
        // `buf` is a distinct, valid buffer of that length.
        unsafe {
            core::ptr::copy_nonoverlapping(
                self.dev.base().add(off as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    fn store_u64(&mut self, off: u64, val: u64) -> Result<(), PmemError> {
        self.check_words(off, 8)?;
        self.store(off, val)
    }

    fn zero_range(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
        self.check_words(off, len)?;
        let mut o = off;
        while o < off + len {
            // Zeroing a zero word changes nothing (and is not a crash state);
            // a traced store costs an exit.
            if self.word(o) != 0 {
                self.store(o, 0)?;
            }
            o += 8;
        }
        Ok(())
    }

    fn flush(&mut self, off: u64, len: u64) -> Result<(), PmemError> {
        // Write-back RAM to the guest: the FLUSH in `fence` makes it durable.
        check_bounds(off, len, self.size)
    }

    fn fence(&mut self) -> Result<(), PmemError> {
        if CPU_FENCES.load(Ordering::Relaxed) {
            core::sync::atomic::fence(Ordering::SeqCst);
            return Ok(());
        }
        // The driver knows whether anything was stored since its last FLUSH
        // (by this module or by a `harness.test` step).
        if !self.dev.dirty() {
            return Ok(());
        }
        match self.dev.flush() {
            Ok(()) => Ok(()),
            // The device answered with an error: the module reports it.
            Err(e @ (DeviceError::FlushFailed(_) | DeviceError::ShortResponse(_))) => Err(io(e)),
            // No answer, or a broken queue: the device was marked FAILED and
            // may still write into our buffers; nothing more can be trusted.
            Err(e) => channel::fatal(
                protocol::MessageKind::Error,
                ExitCode::DeviceError,
                format_args!("pcache fence: {e}"),
            ),
        }
    }
}

/// Crash-point markers (one `out` each), or nothing when switched off.
pub struct MarkerHooks {
    pub on: bool,
}

impl Hooks for MarkerHooks {
    fn begin(&mut self, cp: CrashPoint) {
        if self.on {
            channel::marker(crash_point_begin(cp.number()));
        }
    }

    fn end(&mut self, cp: CrashPoint) {
        if self.on {
            channel::marker(crash_point_end(cp.number()));
        }
    }
}
