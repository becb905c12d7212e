//! Garbage collection (kernel `cache_gc.c`, `docs/format.md` §9.8): behind
//! writeback, from key_tail, one key-set at a time: a reference dropped per
//! key (a data segment whose count reaches zero is invalidated: generation +
//! 1 persisted, then free), then key_tail persisted past the key-set (the
//! step is C12). A LAST record moves key_tail to the next log segment, then
//! frees the old one. GC never passes dirty_tail, and never leaves a log
//! segment that writeback has not left.
//!
//! As with writeback, the guest has no background worker: callers step it.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use serde::Serialize;

use crate::cache::Cache;
use crate::cache_key::{CachePos, Kset, KsetError, LogStop};
use crate::cache_req::IoError;
use crate::format::{data_pos, pcache_crc, DATA_SIZE, KEY_SIZE, KSET_HEADER_SIZE};
use crate::hooks::{CrashPoint, Hooks};
use crate::pmem::Pmem;
use crate::report::{Mode, Tail};

/// What one GC step did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Gc {
    /// Nothing to collect: key_tail is at dirty_tail, the record there is
    /// not valid, fewer segments are in use than gc_percent asks, or a LAST
    /// record would leave a log segment writeback is still in.
    Idle {
        /// Which of these.
        why: &'static str,
    },
    /// A key-set was collected and key_tail moved past it.
    KeySet {
        /// Where it was.
        pos: CachePos,
        /// Segments invalidated by this step.
        invalidated: u32,
    },
    /// A LAST record: key_tail moved to the next log segment, the old one freed.
    NextSegment {
        /// The new key_tail.
        pos: CachePos,
    },
    /// GC stopped for good, until the next activation (the kernel's `gc_errors`).
    Stopped {
        /// Why.
        reason: String,
    },
}

impl Cache {
    /// One step of the kernel's GC worker (one pass of its loop).
    pub fn gc_step<P: Pmem + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        hooks: &mut H,
    ) -> Result<Gc, IoError> {
        if let Some(reason) = &self.rt.gc_stopped {
            return Ok(Gc::Stopped {
                reason: reason.clone(),
            });
        }
        let (key_tail, dirty_tail) = (self.key_tail.pos, self.dirty_tail.pos);
        if key_tail == dirty_tail {
            return Ok(Gc::Idle {
                why: "key_tail is at dirty_tail",
            });
        }
        let kset = match self.read_record_at(pmem, key_tail) {
            Ok(k) => k,
            Err(LogStop::Invalid {
                error:
                    KsetError::NextSegmentOutOfRange {
                        next_cache_seg_id, ..
                    },
            }) => {
                return Ok(self.stop_gc(format!(
                    "invalid next_cache_seg_id {next_cache_seg_id} in gc (n_segs {})",
                    self.seg_num
                )))
            }
            Err(LogStop::Io { error }) => return Err(error.into()),
            Err(_) => {
                return Ok(Gc::Idle {
                    why: "no valid key-set at key_tail",
                })
            }
        };
        // The kernel counts its run-time segment count (seg_num), so a cache
        // whose chain is shorter (n_segs < seg_num) may never reach the
        // threshold (`docs/format.md` §10.4); recover mode counts the chain.
        let n = match self.mode {
            Mode::Strict => self.seg_num as u64,
            Mode::Recover => self.segments.len() as u64,
        };
        let threshold = n * self.info.gc_percent() as u64 / 100;
        if (self.seg_map.count() as u64) < threshold {
            return Ok(Gc::Idle {
                why: "fewer segments in use than gc_percent",
            });
        }
        let keys = match kset {
            Kset::Last { next_cache_seg_id } => {
                if dirty_tail.cache_seg_id == key_tail.cache_seg_id {
                    return Ok(Gc::Idle {
                        why: "writeback has not left key_tail's log segment",
                    });
                }
                let next = CachePos {
                    cache_seg_id: next_cache_seg_id,
                    seg_off: 0,
                };
                hooks.begin(CrashPoint::Gc);
                self.write_tail(pmem, hooks, Tail::KeyTail, next)?;
                hooks.end(CrashPoint::Gc);
                // Freed only once key_tail no longer points into it.
                self.seg_map.clear(key_tail.cache_seg_id);
                return Ok(Gc::NextSegment { pos: next });
            }
            Kset::Keys { keys } => keys,
        };
        let size = (KSET_HEADER_SIZE + keys.len() * KEY_SIZE) as u64;
        if size > DATA_SIZE - key_tail.seg_off as u64 {
            return Ok(self.stop_gc(format!(
                "key-set at {key_tail} larger than its segment's rest"
            )));
        }
        let before = self.rt.invalidations;
        let data_crc = self.info.data_crc();
        let mut buf = vec![];
        hooks.begin(CrashPoint::Gc);
        for k in &keys {
            let cseg = k.cache_seg_id.get();
            let seg = &self.segments[cseg as usize];
            let stale = k.seg_gen.get() < seg.gen;
            // Recover mode keeps the count balanced with replay, which gave
            // a stale key no reference: it drops none for one, and does not
            // check the data of a segment that was reused since.
            if self.mode == Mode::Recover && stale {
                continue;
            }
            if data_crc {
                let len = k.len.get() as usize;
                buf.resize(len, 0);
                pmem.read(data_pos(seg.pseg, k.cache_seg_off.get()), &mut buf)?;
                if pcache_crc(&buf) != k.data_crc.get() {
                    // The kernel cannot retry a partly collected key-set.
                    hooks.end(CrashPoint::Gc);
                    return Ok(self.stop_gc(format!(
                        "key {:#x}+{len} at {key_tail}: data CRC mismatch (failed to decode cache key in gc)",
                        k.off.get()
                    )));
                }
            }
            self.seg_put(pmem, hooks, cseg)?;
        }
        let next = CachePos {
            cache_seg_id: key_tail.cache_seg_id,
            seg_off: key_tail.seg_off + size as u32,
        };
        self.write_tail(pmem, hooks, Tail::KeyTail, next)?;
        hooks.end(CrashPoint::Gc);
        Ok(Gc::KeySet {
            pos: key_tail,
            invalidated: (self.rt.invalidations - before) as u32,
        })
    }

    fn stop_gc(&mut self, reason: String) -> Gc {
        self.rt.gc_stopped = Some(reason.clone());
        Gc::Stopped { reason }
    }

    /// GC steps until one does not move key_tail (bounded like writeback).
    pub fn gc_all<P: Pmem + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        hooks: &mut H,
    ) -> Result<alloc::vec::Vec<Gc>, IoError> {
        let mut steps = alloc::vec::Vec::new();
        let bound = (self.segments.len() as u64) * (DATA_SIZE / 24 + 1);
        for _ in 0..bound {
            let s = self.gc_step(pmem, hooks)?;
            let go_on = matches!(s, Gc::KeySet { .. } | Gc::NextSegment { .. });
            steps.push(s);
            if !go_on {
                break;
            }
        }
        Ok(steps)
    }
}

/// What [`Cache::idle`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Idle {
    /// Key-sets written back.
    pub written_back: u64,
    /// Key-sets collected.
    pub collected: u64,
    /// Log segments left by either.
    pub segment_switches: u64,
    /// Segments invalidated.
    pub invalidated: u64,
    /// The last writeback step (why it stopped).
    pub writeback: Option<crate::cache_writeback::Writeback>,
    /// The last GC step (why it stopped).
    pub gc: Option<Gc>,
}

impl Cache {
    /// What the kernel's workers do when the device is idle: writeback and
    /// GC in turn until neither moves its tail.
    pub fn idle<P: Pmem + ?Sized, B: crate::backing::Backing + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        backing: &mut B,
        hooks: &mut H,
    ) -> Result<Idle, IoError> {
        use crate::cache_writeback::Writeback;
        let mut out = Idle::default();
        let before = self.rt.invalidations;
        loop {
            let mut moved = false;
            for s in self.writeback_all(pmem, backing, hooks)? {
                match s {
                    Writeback::KeySet { .. } | Writeback::FlushFailed { advanced: true, .. } => {
                        out.written_back += 1;
                        moved = true;
                    }
                    Writeback::NextSegment { .. } => {
                        out.segment_switches += 1;
                        moved = true;
                    }
                    other => out.writeback = Some(other),
                }
            }
            for s in self.gc_all(pmem, hooks)? {
                match s {
                    Gc::KeySet { .. } => {
                        out.collected += 1;
                        moved = true;
                    }
                    Gc::NextSegment { .. } => {
                        out.segment_switches += 1;
                        moved = true;
                    }
                    other => out.gc = Some(other),
                }
            }
            if !moved {
                break;
            }
        }
        out.invalidated = self.rt.invalidations - before;
        Ok(out)
    }
}
