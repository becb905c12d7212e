//! Writeback (kernel `cache_writeback.c`, `docs/format.md` §9.7): the dirty
//! data of the log, one key-set at a time in log order from dirty_tail, to
//! the backing device; then a backing-device flush; then dirty_tail moves
//! past the key-set and is persisted (the step is C11, its tail write C5).
//!
//! The kernel runs this in a background worker; a single-vCPU guest has none,
//! so callers step it ([`Cache::writeback_step`]) or run it until clean
//! ([`Cache::writeback_all`]).

use alloc::format;
use alloc::vec;
use serde::Serialize;

use crate::backing::Backing;
use crate::cache::Cache;
use crate::cache_key::{CachePos, Extent, KeyIndex, Kset};
use crate::cache_req::IoError;
use crate::format::{data_pos, pcache_crc, DATA_SIZE, KEY_F_CLEAN, SECTOR_SIZE};
use crate::hooks::{CrashPoint, Hooks};
use crate::pmem::Pmem;
use crate::report::{Mode, Tail};

/// What one writeback step did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Writeback {
    /// Nothing to write back: dirty_tail is at the end of the log.
    Clean,
    /// A key-set was written back and dirty_tail moved past it.
    KeySet {
        /// Where the key-set was.
        pos: CachePos,
        /// Keys written to the backing device (non-CLEAN extents in force).
        written: u32,
    },
    /// A LAST record: dirty_tail moved to the next log segment.
    NextSegment {
        /// The new dirty_tail.
        pos: CachePos,
    },
    /// A backing write failed: dirty_tail stays, the same key-set is
    /// tried again next time (as the kernel).
    WriteFailed {
        /// The error.
        error: alloc::string::String,
    },
    /// The backing flush failed. Strict mode (the kernel) ignores it and
    /// moved dirty_tail anyway; recover mode keeps dirty_tail and retries.
    FlushFailed {
        /// The error.
        error: alloc::string::String,
        /// Whether dirty_tail moved regardless (strict).
        advanced: bool,
    },
    /// Writeback stopped for good, until the next activation (the kernel's
    /// `writeback_errors`): a record it cannot use.
    Stopped {
        /// Why.
        reason: alloc::string::String,
    },
}

impl Cache {
    /// One step of the kernel's writeback worker.
    pub fn writeback_step<P: Pmem + ?Sized, B: Backing + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        backing: &mut B,
        hooks: &mut H,
    ) -> Result<Writeback, IoError> {
        if let Some(reason) = &self.rt.writeback_stopped {
            return Ok(Writeback::Stopped {
                reason: reason.clone(),
            });
        }
        let pos = self.dirty_tail.pos;
        let kset = match self.read_record_at(pmem, pos) {
            Ok(k) => k,
            // What ends a log is "clean", whatever it is: the kernel
            // checks only magic, key_num and CRC here. A next segment out of
            // range is the one stop of its own (below).
            Err(crate::cache_key::LogStop::Invalid {
                error:
                    crate::cache_key::KsetError::NextSegmentOutOfRange {
                        next_cache_seg_id, ..
                    },
            }) => {
                return Ok(self.stop_writeback(format!(
                    "invalid next_cache_seg_id {next_cache_seg_id} in writeback (n_segs {})",
                    self.seg_num
                )))
            }
            Err(crate::cache_key::LogStop::Io { error }) => return Err(error.into()),
            Err(_) => return Ok(Writeback::Clean),
        };
        let keys = match kset {
            Kset::Last { next_cache_seg_id } => {
                let next = CachePos {
                    cache_seg_id: next_cache_seg_id,
                    seg_off: 0,
                };
                hooks.begin(CrashPoint::Writeback);
                self.write_tail(pmem, hooks, Tail::DirtyTail, next)?;
                hooks.end(CrashPoint::Writeback);
                return Ok(Writeback::NextSegment { pos: next });
            }
            Kset::Keys { keys } => keys,
        };
        let size = (crate::format::KSET_HEADER_SIZE + keys.len() * crate::format::KEY_SIZE) as u64;
        if size > DATA_SIZE - pos.seg_off as u64 {
            return Ok(
                self.stop_writeback(format!("key-set at {pos} larger than its segment's rest"))
            );
        }
        // Decode into a temporary index (a later key wins within the set).
        let data_crc = self.info.data_crc();
        let mut index = KeyIndex::default();
        let mut buf = vec![];
        for k in &keys {
            let cseg = k.cache_seg_id.get();
            let seg = &self.segments[cseg as usize];
            let (off, len) = (k.off.get(), k.len.get());
            if data_crc {
                buf.resize(len as usize, 0);
                pmem.read(data_pos(seg.pseg, k.cache_seg_off.get()), &mut buf)?;
                if pcache_crc(&buf) != k.data_crc.get() {
                    return Ok(self.stop_writeback(format!(
                        "key {off:#x}+{len} at {pos}: data CRC mismatch"
                    )));
                }
            }
            // The kernel has no generation check here (a stale key that no
            // later key of the set meets is written back); recover mode
            // skips a key whose segment was reused, whose bytes are not its.
            if self.mode == Mode::Recover && k.seg_gen.get() < seg.gen {
                continue;
            }
            index.insert(Extent {
                off,
                len,
                cache_seg_id: cseg,
                cache_seg_off: k.cache_seg_off.get(),
                seg_gen: k.seg_gen.get(),
                clean: k.flags.get() & KEY_F_CLEAN != 0,
            });
        }
        hooks.begin(CrashPoint::Writeback);
        let mut written = 0;
        for e in index.extents().filter(|e| !e.clean) {
            let pseg = self.segments[e.cache_seg_id as usize].pseg;
            buf.resize(e.len as usize, 0);
            pmem.read(data_pos(pseg, e.cache_seg_off), &mut buf)?;
            if let Err(error) = backing.write(e.off / SECTOR_SIZE, &buf) {
                hooks.end(CrashPoint::Writeback);
                return Ok(Writeback::WriteFailed {
                    error: format!("{error}"),
                });
            }
            written += 1;
        }
        let flushed = backing.flush();
        if let Err(error) = &flushed {
            if self.mode == Mode::Recover {
                hooks.end(CrashPoint::Writeback);
                return Ok(Writeback::FlushFailed {
                    error: format!("{error}"),
                    advanced: false,
                });
            }
        }
        let next = CachePos {
            cache_seg_id: pos.cache_seg_id,
            seg_off: pos.seg_off + size as u32,
        };
        self.write_tail(pmem, hooks, Tail::DirtyTail, next)?;
        hooks.end(CrashPoint::Writeback);
        Ok(match flushed {
            Ok(()) => Writeback::KeySet { pos, written },
            Err(error) => Writeback::FlushFailed {
                error: format!("{error}"),
                advanced: true,
            },
        })
    }

    fn stop_writeback(&mut self, reason: alloc::string::String) -> Writeback {
        self.rt.writeback_stopped = Some(reason.clone());
        Writeback::Stopped { reason }
    }

    /// Writeback steps until the log is clean, writeback stops, or a step
    /// fails (a failed backing write or, in recover mode, flush, which the
    /// kernel would retry). Returns the steps taken. Bounded: every step
    /// that continues moves dirty_tail forward along a log that replay
    /// walked without a loop.
    pub fn writeback_all<P: Pmem + ?Sized, B: Backing + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        backing: &mut B,
        hooks: &mut H,
    ) -> Result<alloc::vec::Vec<Writeback>, IoError> {
        let mut steps = alloc::vec::Vec::new();
        // At most one step per record position a log can hold (LAST records
        // included), whatever the media says.
        let bound = (self.segments.len() as u64) * (DATA_SIZE / 24 + 1);
        for _ in 0..bound {
            let s = self.writeback_step(pmem, backing, hooks)?;
            let go_on = matches!(
                s,
                Writeback::KeySet { .. }
                    | Writeback::NextSegment { .. }
                    | Writeback::FlushFailed { advanced: true, .. }
            );
            steps.push(s);
            if !go_on {
                break;
            }
        }
        Ok(steps)
    }
}
