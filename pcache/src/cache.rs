//! Cache start (kernel `cache.c`, `cache_segment.c`; `pcache-format.md` §5.4):
//! cache_info selection, the segment chain (formatted for a new cache, walked
//! for an existing one), the tails, the key-set log check and the activation's
//! cache_info write.
//!
//! An existing cache is first *loaded* without writing anything
//! (`load_existing`); only when every check passed does `open` write. This
//! is what lets superblock recovery try an open before it rewrites a
//! superblock.

use alloc::vec::Vec;
use serde::Serialize;

use crate::cache_dev::SegBitmap;
use crate::cache_key::{walk_log, CachePos, LogSummary};
use crate::format::{
    cache_info_slot_off, CacheInfo, CachePosOnMedia, DualRecord, CACHE_INFO_F_INIT_DONE,
    CACHE_INFO_OFF, CACHE_INFO_SIZE, CACHE_POS_STRIDE, DATA_SIZE, DIRTY_TAIL_OFF, KEY_TAIL_OFF,
};
use crate::hooks::{CrashPoint, Hooks};
use crate::meta::{read_slots, write_dual, DualCopy, Policy, Slots};
use crate::pmem::{Pmem, PmemError};
use crate::report::{ActivationReport, Mode, Options, Refusal, SlotSeq, Tail, TailReport};
use crate::segment::{format_segment, link_segment, read_seg_gen, read_seg_info, Segment};

/// A tail in memory: position and dual-copy state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TailState {
    /// Position.
    pub pos: CachePos,
    /// Dual-copy state.
    pub state: DualCopy,
}

impl TailState {
    fn report(&self) -> Option<TailReport> {
        self.state.latest.map(|slot| TailReport {
            pos: self.pos,
            slot,
            seq: self.state.seq as u8,
        })
    }
}

/// An activated cache (what later parts build on). Deactivation
/// ([`crate::deactivate`]) writes nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cache {
    pub(crate) mode: Mode,
    pub(crate) seg_num: u32,
    pub(crate) info: CacheInfo,
    pub(crate) info_state: DualCopy,
    pub(crate) segments: Vec<Segment>,
    pub(crate) key_tail: TailState,
    pub(crate) dirty_tail: TailState,
    /// Cache segments in use (volatile; the kernel's `seg_map`).
    pub(crate) seg_map: SegBitmap,
    /// Physical segments allocated to the chain (the cache device's bitmap).
    pub(crate) dev_map: SegBitmap,
}

impl Cache {
    /// Recovery mode the cache runs in.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// Physical segments on the device (superblock seg_num).
    pub fn seg_num(&self) -> u32 {
        self.seg_num
    }
    /// The cache_info in memory (as last written).
    pub fn info(&self) -> &CacheInfo {
        &self.info
    }
    /// Segments of the chain, indexed by cache segment id.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }
    /// key_tail.
    pub fn key_tail(&self) -> TailState {
        self.key_tail
    }
    /// dirty_tail.
    pub fn dirty_tail(&self) -> TailState {
        self.dirty_tail
    }
    /// Number of cache segments marked in use.
    pub fn segs_used(&self) -> u32 {
        self.seg_map.count()
    }
    /// Physical segment of cache segment `cseg`.
    pub fn pseg(&self, cseg: u32) -> Option<u32> {
        self.segments.get(cseg as usize).map(|s| s.pseg)
    }

    pub(crate) fn fill_report(&self, rep: &mut ActivationReport) {
        rep.seg_num = Some(self.seg_num);
        rep.cache_info = self.info_state.latest.map(|slot| SlotSeq {
            slot,
            seq: self.info_state.seq as u8,
        });
        rep.cache_info_flags = Some(self.info.flags);
        rep.n_segs = Some(self.info.n_segs);
        rep.key_tail = self.key_tail.report();
        rep.dirty_tail = self.dirty_tail.report();
        rep.chain_len = self.segments.len() as u32;
    }
}

/// The tail update policy of a mode: the kernel's B, or B that never
/// overwrites the newest copy.
pub fn tail_policy(mode: Mode) -> Policy {
    match mode {
        Mode::Strict => Policy::B,
        Mode::Recover => Policy::BSafe,
    }
}

fn tail_base(tail: Tail) -> u64 {
    match tail {
        Tail::KeyTail => KEY_TAIL_OFF,
        Tail::DirtyTail => DIRTY_TAIL_OFF,
    }
}

/// H bounds cache_info.n_segs by seg_num; 0 is refused too: such a cache
/// cannot hold its tails (the kernel would refuse them as out of range).
fn check_n_segs(n_segs: u32, seg_num: u32) -> Result<(), Refusal> {
    if n_segs == 0 || n_segs > seg_num {
        return Err(Refusal::NSegs { n_segs, seg_num });
    }
    Ok(())
}

/// Reads both cache_info slots.
pub fn read_cache_info<P: Pmem + ?Sized>(pmem: &P) -> Result<Slots<CacheInfo>, PmemError> {
    read_slots(pmem, CACHE_INFO_OFF, CACHE_INFO_SIZE)
}

/// Reads both slots of a tail.
pub fn read_tail<P: Pmem + ?Sized>(
    pmem: &P,
    tail: Tail,
) -> Result<Slots<CachePosOnMedia>, PmemError> {
    read_slots(pmem, tail_base(tail), CACHE_POS_STRIDE)
}

/// An existing cache, checked and not yet written to.
#[derive(Clone, Debug)]
pub(crate) struct Loaded {
    info: CacheInfo,
    info_state: DualCopy,
    segments: Vec<Segment>,
    key_tail: TailState,
    dirty_tail: TailState,
    dev_map: SegBitmap,
}

/// Loads the tail `tail`: latest valid copy, bounds checked (version H).
fn load_tail<P: Pmem + ?Sized>(
    pmem: &P,
    tail: Tail,
    n_segs: u32,
    mode: Mode,
) -> Result<TailState, Refusal> {
    let slots = read_tail(pmem, tail)?;
    let (slot, rec) = slots.latest_record().ok_or(Refusal::TailMissing { tail })?;
    let pos = CachePos {
        cache_seg_id: rec.cache_seg_id,
        seg_off: rec.seg_off,
    };
    if pos.cache_seg_id >= n_segs || pos.seg_off as u64 >= DATA_SIZE {
        return Err(Refusal::TailOutOfRange { tail, pos, n_segs });
    }
    Ok(TailState {
        pos,
        state: DualCopy::loaded(tail_policy(mode), slot, rec.header().seq),
    })
}

/// Loads an existing cache (cache_info with INIT_DONE found in `info_slot`) on a
/// device of `seg_num` segments, checking everything and writing nothing:
/// options, n_segs, the chain (with cycle and duplicate detection, which the
/// kernel lacks), the tails, and the key-set log from key_tail. Fills `rep` as
/// it goes, so a refusal reports what was found.
pub(crate) fn load_existing<P: Pmem + ?Sized>(
    pmem: &P,
    seg_num: u32,
    opts: &Options,
    info_slot: usize,
    info: CacheInfo,
    rep: &mut ActivationReport,
) -> Result<Loaded, Refusal> {
    rep.cache_info = Some(SlotSeq {
        slot: info_slot,
        seq: info.header.seq,
    });
    rep.cache_info_flags = Some(info.flags);
    rep.n_segs = Some(info.n_segs);
    if info.data_crc() != opts.data_crc {
        return Err(Refusal::DataCrcOption {
            option: opts.data_crc,
            cache: info.data_crc(),
        });
    }
    check_n_segs(info.n_segs, seg_num)?;

    // The chain.
    let mut dev_map = SegBitmap::new(seg_num);
    let mut segments: Vec<Segment> = Vec::with_capacity(info.n_segs as usize);
    for i in 0..info.n_segs {
        let pseg = match segments.last() {
            None => info.seg_id,
            Some(prev) => {
                if !prev.info.has_next() {
                    return Err(Refusal::ChainBroken {
                        cache_seg: i - 1,
                        pseg: prev.pseg,
                        n_segs: info.n_segs,
                    });
                }
                prev.info.next_seg
            }
        };
        if pseg >= seg_num {
            return Err(Refusal::ChainSegOutOfRange {
                cache_seg: i,
                pseg,
                seg_num,
            });
        }
        if dev_map.set(pseg) {
            return Err(Refusal::ChainDuplicate { cache_seg: i, pseg });
        }
        let si = read_seg_info(pmem, pseg)?;
        let (info_slot, seg_info) = si
            .latest_record()
            .ok_or(Refusal::SegInfoMissing { cache_seg: i, pseg })?;
        let gen = read_seg_gen(pmem, pseg)?;
        let (gen_val, gen_state) = match gen.latest_record() {
            Some((slot, g)) => (g.gen, DualCopy::loaded(Policy::A, slot, g.header.seq)),
            None => (0, DualCopy::fresh(Policy::A)),
        };
        segments.push(Segment {
            pseg,
            info: seg_info,
            info_state: DualCopy::loaded(Policy::A, info_slot, seg_info.header.seq),
            gen: gen_val,
            gen_state,
        });
        rep.chain_len = segments.len() as u32;
    }

    // The tails (key_tail first, as the kernel).
    let key_tail = load_tail(pmem, Tail::KeyTail, info.n_segs, opts.mode)?;
    rep.key_tail = key_tail.report();
    let dirty_tail = load_tail(pmem, Tail::DirtyTail, info.n_segs, opts.mode)?;
    rep.dirty_tail = dirty_tail.report();

    // The log from key_tail: every record is validated; a record no kernel
    // writes is refused for what is wrong with it. Replay is part 2, so a log
    // holding records is refused rather than opened as empty.
    let chain: Vec<u32> = segments.iter().map(|s| s.pseg).collect();
    let log: LogSummary = walk_log(pmem, &chain, key_tail.pos, |_| {});
    rep.log = Some(log.clone());
    let end = log.end.clone().expect("a walk always ends");
    if !end.stop.is_end_of_log() {
        return Err(Refusal::HostileLog { end });
    }
    if log.ksets + log.lasts > 0 {
        return Err(Refusal::ReplayNotImplemented {
            ksets: log.ksets,
            keys: log.keys,
            lasts: log.lasts,
        });
    }
    // An empty log: key_head = key_tail, and dirty_tail must lie between.
    if dirty_tail.pos != key_tail.pos {
        return Err(Refusal::DirtyTailOffLog {
            key_tail: key_tail.pos,
            dirty_tail: dirty_tail.pos,
            log_end: end.pos,
        });
    }

    Ok(Loaded {
        info,
        info_state: DualCopy::loaded(Policy::A, info_slot, info.header.seq),
        segments,
        key_tail,
        dirty_tail,
        dev_map,
    })
}

/// Opens a loaded cache: the activation's cache_info write (INIT_DONE, seq+1,
/// the other slot; C4).
pub(crate) fn open<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    hooks: &mut H,
    mode: Mode,
    seg_num: u32,
    loaded: Loaded,
) -> Result<Cache, Refusal> {
    let Loaded {
        info,
        mut info_state,
        segments,
        key_tail,
        dirty_tail,
        dev_map,
    } = loaded;
    let mut seg_map = SegBitmap::new(seg_num);
    seg_map.set(key_tail.pos.cache_seg_id);
    let (_, info) = write_cache_info(pmem, hooks, &mut info_state, info)?;
    Ok(Cache {
        mode,
        seg_num,
        info,
        info_state,
        segments,
        key_tail,
        dirty_tail,
        seg_map,
        dev_map,
    })
}

fn write_cache_info<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    hooks: &mut H,
    state: &mut DualCopy,
    mut info: CacheInfo,
) -> Result<(usize, CacheInfo), PmemError> {
    info.flags |= CACHE_INFO_F_INIT_DONE;
    write_dual(
        pmem,
        hooks,
        CrashPoint::CacheInfo,
        cache_info_slot_off(0),
        CACHE_INFO_SIZE,
        state,
        info,
    )
}

/// The first activation of a new cache (no valid cache_info with INIT_DONE),
/// in the kernel's order (§5.14): for every segment, link the previous one
/// (C6) and format it (C3); dirty_tail then key_tail (C5); cache_info with
/// INIT_DONE (C4).
///
/// `found` is a valid cache_info without INIT_DONE, if any (no kernel writes
/// one). Strict mode uses it as the kernel does (its n_segs, flags and seq);
/// recover mode starts from the defaults but keeps its seq, so the found copy
/// is not overwritten. Likewise for tails that still have valid copies:
/// strict writes them fresh (seq 1, slot 0) as the kernel does, recover
/// continues their sequences in the slot after the newest copy.
pub(crate) fn first_activation<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    hooks: &mut H,
    seg_num: u32,
    opts: &Options,
    found: Option<(usize, CacheInfo)>,
    rep: &mut ActivationReport,
) -> Result<Cache, Refusal> {
    let defaults = CacheInfo {
        n_segs: seg_num,
        flags: CacheInfo::default_flags(opts.data_crc),
        ..Default::default()
    };
    let (mut info, mut info_state) = match found {
        None => (defaults, DualCopy::fresh(Policy::A)),
        Some((slot, ci)) => {
            let state = DualCopy::loaded(Policy::A, slot, ci.header.seq);
            match opts.mode {
                Mode::Strict => {
                    if ci.data_crc() != opts.data_crc {
                        return Err(Refusal::DataCrcOption {
                            option: opts.data_crc,
                            cache: ci.data_crc(),
                        });
                    }
                    (ci, state)
                }
                Mode::Recover => (defaults, state),
            }
        }
    };
    check_n_segs(info.n_segs, seg_num)?;

    let mut dev_map = SegBitmap::new(seg_num);
    let mut segments: Vec<Segment> = Vec::with_capacity(info.n_segs as usize);
    for i in 0..info.n_segs {
        let pseg = dev_map.alloc_lowest().ok_or(Refusal::NSegs {
            n_segs: info.n_segs,
            seg_num,
        })?;
        match segments.last_mut() {
            None => info.seg_id = pseg,
            Some(prev) => link_segment(pmem, hooks, prev, pseg)?,
        }
        segments.push(format_segment(pmem, hooks, pseg)?);
        rep.chain_len = i + 1;
    }

    let mut seg_map = SegBitmap::new(seg_num);
    seg_map.set(0);
    let origin = CachePos::default();
    let policy = tail_policy(opts.mode);
    let mut dirty_tail = TailState {
        pos: origin,
        state: DualCopy::fresh(policy),
    };
    let mut key_tail = dirty_tail;
    for (tail, t) in [
        (Tail::DirtyTail, &mut dirty_tail),
        (Tail::KeyTail, &mut key_tail),
    ] {
        // The kernel writes a fresh record (seq 1, slot 0) even when the tail
        // still has valid copies (a valid superblock means C1 did not run):
        // that overwrites the newest copy when it is in slot 0, and a newer
        // seq left in slot 1 wins over the new tail at the next activation.
        // Recover mode continues the sequence in the other slot instead. On a
        // zeroed ctrl (every format) both are the same fresh write.
        if opts.mode == Mode::Recover {
            t.state = read_tail(pmem, tail)?.state(policy);
        }
        write_dual(
            pmem,
            hooks,
            CrashPoint::TailUpdate,
            tail_base(tail),
            CACHE_POS_STRIDE,
            &mut t.state,
            CachePosOnMedia {
                cache_seg_id: t.pos.cache_seg_id,
                seg_off: t.pos.seg_off,
                ..Default::default()
            },
        )?;
    }

    let (_, info) = write_cache_info(pmem, hooks, &mut info_state, info)?;
    Ok(Cache {
        mode: opts.mode,
        seg_num,
        info,
        info_state,
        segments,
        key_tail,
        dirty_tail,
        seg_map,
        dev_map,
    })
}
