//! Cache start (kernel `cache.c`, `cache_segment.c`; `docs/format.md` §8.3):
//! cache_info selection, the segment chain (formatted for a new cache, walked
//! for an existing one), the tails, the key-set log check and the activation's
//! cache_info write.
//!
//! An existing cache is first *loaded* without writing anything
//! (`load_existing`); only when every check passed does `open` write. This
//! is what lets superblock recovery try an open before it rewrites a
//! superblock.

use alloc::vec;
use alloc::vec::Vec;
use serde::Serialize;
use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::cache_dev::SegBitmap;
use crate::cache_key::{
    replay, walk_log_with, CachePos, KeyIndex, KeyOnMedia, Kset, KsetError, LogStop, Replayed,
    Rules,
};
use crate::format::{
    cache_info_slot_off, le, meta_record, DualRecord, MetaHeader, CACHE_INFO_F_DATA_CRC,
    CACHE_INFO_F_INIT_DONE, CACHE_INFO_GC_MASK, CACHE_INFO_GC_SHIFT, CACHE_INFO_MODE_MASK,
    CACHE_INFO_MODE_SHIFT, CACHE_INFO_OFF, CACHE_INFO_SIZE, CACHE_POS_STRIDE, DATA_SIZE,
    DIRTY_TAIL_OFF, GC_PERCENT_DEFAULT, GC_PERCENT_MAX, KEY_TAIL_OFF, KSET_KEYS_MAX,
};
use crate::hooks::{CrashPoint, Hooks};
use crate::meta::{read_slots, write_dual, DualCopy, Policy, Slots};
use crate::pmem::{Pmem, PmemError};
use crate::report::{ActivationReport, Mode, Options, Refusal, SlotSeq, Tail, TailReport};
use crate::segment::{format_segment, link_segment, read_seg_gen, read_seg_info, SegInfo, Segment};

/// `struct pcache_cache_info`, 24 bytes, slots at dev+8192 and dev+12288 (`docs/format.md` §5.3).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct CacheInfo {
    /// Header (CRC over bytes 4..23).
    pub header: MetaHeader,
    /// Physical segment id of cache segment 0.
    #[serde(serialize_with = "le")]
    pub seg_id: U32,
    /// Number of segments in the chain.
    #[serde(serialize_with = "le")]
    pub n_segs: U32,
    /// Flags (DATA_CRC, INIT_DONE, mode, gc_percent).
    #[serde(serialize_with = "le")]
    pub flags: U32,
    /// Reserved (0).
    #[serde(serialize_with = "le")]
    pub reserved: U32,
}

meta_record!(CacheInfo, 24);

impl CacheInfo {
    /// Flags of a fresh cache: INIT_DONE clear, mode 0, gc_percent 70, DATA_CRC as asked.
    pub fn default_flags(data_crc: bool) -> u32 {
        (GC_PERCENT_DEFAULT << CACHE_INFO_GC_SHIFT)
            | if data_crc { CACHE_INFO_F_DATA_CRC } else { 0 }
    }

    /// DATA_CRC flag.
    pub fn data_crc(&self) -> bool {
        self.flags.get() & CACHE_INFO_F_DATA_CRC != 0
    }

    /// INIT_DONE flag.
    pub fn init_done(&self) -> bool {
        self.flags.get() & CACHE_INFO_F_INIT_DONE != 0
    }

    /// Cache mode (0 = writeback).
    pub fn cache_mode(&self) -> u32 {
        (self.flags.get() >> CACHE_INFO_MODE_SHIFT) & CACHE_INFO_MODE_MASK
    }

    /// gc_percent.
    pub fn gc_percent(&self) -> u32 {
        (self.flags.get() >> CACHE_INFO_GC_SHIFT) & CACHE_INFO_GC_MASK
    }
}

/// `struct pcache_cache_pos_onmedia`, 16 bytes: a log position (key_tail,
/// dirty_tail), slots 16 bytes apart in cache_ctrl (`docs/format.md` §5.4).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct CachePosOnMedia {
    /// Header (CRC over bytes 4..15).
    pub header: MetaHeader,
    /// Cache segment id (chain index).
    #[serde(serialize_with = "le")]
    pub cache_seg_id: U32,
    /// Offset inside that segment's data area.
    #[serde(serialize_with = "le")]
    pub seg_off: U32,
}

meta_record!(CachePosOnMedia, 16);

impl CachePosOnMedia {
    /// The position it holds.
    pub fn pos(&self) -> CachePos {
        CachePos {
            cache_seg_id: self.cache_seg_id.get(),
            seg_off: self.seg_off.get(),
        }
    }
}

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
    /// The keys in force (replayed at activation).
    pub(crate) index: KeyIndex,
    /// Where the next key-set goes.
    pub(crate) key_head: CachePos,
    /// Per cache segment: references held by keys and the data head (the
    /// kernel's refcounts; signed, because the kernel's can go below zero).
    pub(crate) refs: Vec<i64>,
    /// What only the running cache holds (nothing of it is on media).
    pub(crate) rt: RunTime,
}

/// The volatile run-time state of a cache, empty at every activation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RunTime {
    /// The open key-set's keys (one per CPU in the kernel; the guest has one).
    pub(crate) open_kset: Vec<KeyOnMedia>,
    /// Where the next data goes (the kernel's per-CPU data head), if a data
    /// segment is current.
    pub(crate) data_head: Option<CachePos>,
    /// The next-fit hint of segment allocation (`last_cache_seg`).
    pub(crate) last_cache_seg: u32,
    /// Segments invalidated since activation (generation bumped, freed).
    pub(crate) invalidations: u64,
    /// Why writeback stopped for good (until the next activation), as the
    /// kernel's writeback does on a record it cannot use.
    pub(crate) writeback_stopped: Option<alloc::string::String>,
    /// Why GC stopped for good (the kernel's `gc_errors`).
    pub(crate) gc_stopped: Option<alloc::string::String>,
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
    /// Where the next key-set goes (the end of the replayed log).
    pub fn key_head(&self) -> CachePos {
        self.key_head
    }
    /// The keys in force.
    pub fn index(&self) -> &KeyIndex {
        &self.index
    }
    /// References keys and the data head hold on cache segment `cseg`.
    pub fn refs(&self, cseg: u32) -> i64 {
        self.refs.get(cseg as usize).copied().unwrap_or(0)
    }
    /// Segments invalidated since activation.
    pub fn invalidations(&self) -> u64 {
        self.rt.invalidations
    }
    /// Why writeback stopped for good, if it did.
    pub fn writeback_stopped(&self) -> Option<&str> {
        self.rt.writeback_stopped.as_deref()
    }
    /// Why GC stopped for good, if it did.
    pub fn gc_stopped(&self) -> Option<&str> {
        self.rt.gc_stopped.as_deref()
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
        rep.cache_info_flags = Some(self.info.flags.get());
        rep.n_segs = Some(self.info.n_segs.get());
        rep.key_tail = self.key_tail.report();
        rep.dirty_tail = self.dirty_tail.report();
        rep.chain_len = self.segments.len() as u32;
        let sb_flags = match rep.superblock {
            Some(crate::cache_dev::SbState::Valid { flags, .. }) => flags,
            _ => 0,
        };
        rep.status = Some(self.status_line(sb_flags));
    }

    /// The line `dmsetup status` prints for the target (`docs/format.md` §11):
    /// superblock flags, seg_num, n_segs, segments used, gc_percent,
    /// cache_info flags, key_head, dirty_tail, key_tail. The kernel prints
    /// its run-time segment count (seg_num) as n_segs.
    pub fn status_line(&self, sb_flags: u32) -> alloc::string::String {
        alloc::format!(
            "{sb_flags:x} {} {} {} {} {:x} {} {} {}",
            self.seg_num,
            self.seg_num,
            self.seg_map.count(),
            self.info.gc_percent(),
            self.info.flags.get(),
            self.key_head,
            self.dirty_tail.pos,
            self.key_tail.pos,
        )
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

impl Cache {
    /// Persists a tail at run time (C5): the next slot of the mode's update
    /// policy (strict: the kernel's, whose first update after an activation
    /// overwrites the newest copy; recover: never the newest copy).
    pub(crate) fn write_tail<P: Pmem + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        hooks: &mut H,
        tail: Tail,
        pos: CachePos,
    ) -> Result<(), PmemError> {
        let t = match tail {
            Tail::KeyTail => &mut self.key_tail,
            Tail::DirtyTail => &mut self.dirty_tail,
        };
        persist_tail(pmem, hooks, tail, &mut t.state, pos)?;
        t.pos = pos;
        Ok(())
    }

    /// Reads the record at a log position the cache holds (a tail), under
    /// the mode's rules, as writeback and GC do (`min(5144, space)` bytes).
    pub(crate) fn read_record_at<P: Pmem + ?Sized>(
        &self,
        pmem: &P,
        pos: CachePos,
    ) -> Result<Kset, LogStop> {
        let chain: Vec<u32> = self.segments.iter().map(|s| s.pseg).collect();
        let mut w =
            crate::cache_key::LogWalker::new(pmem, &chain, pos).with_rules(rules(self.mode));
        match w.step() {
            crate::cache_key::LogStep::Record(r) => Ok(r.kset),
            crate::cache_key::LogStep::End(e) => Err(e.stop),
        }
    }

    /// The gc_percent message (`gc_percent N`, 0..=90): persisted in
    /// cache_info (C4), as the kernel's.
    pub fn set_gc_percent<P: Pmem + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        hooks: &mut H,
        percent: u32,
    ) -> Result<(), GcPercentError> {
        if percent > GC_PERCENT_MAX {
            return Err(GcPercentError::OutOfRange { percent });
        }
        let mut info = self.info;
        let flags = info.flags.get() & !(CACHE_INFO_GC_MASK << CACHE_INFO_GC_SHIFT);
        info.flags
            .set(flags | (percent & CACHE_INFO_GC_MASK) << CACHE_INFO_GC_SHIFT);
        let (_, written) = write_cache_info(pmem, hooks, &mut self.info_state, info)
            .map_err(|error| GcPercentError::Pmem { error })?;
        self.info = written;
        Ok(())
    }
}

/// Why a gc_percent message was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum GcPercentError {
    /// Above 90, as the kernel refuses (EINVAL).
    #[error("gc_percent {percent} is out of range (0..=90)")]
    OutOfRange {
        /// The value asked for.
        percent: u32,
    },
    /// The cache_info write failed.
    #[error("{error}")]
    Pmem {
        /// The error.
        error: PmemError,
    },
}

/// Writes `pos` as `tail`'s next copy under `state`'s policy (C5).
fn persist_tail<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    hooks: &mut H,
    tail: Tail,
    state: &mut DualCopy,
    pos: CachePos,
) -> Result<(), PmemError> {
    write_dual(
        pmem,
        hooks,
        CrashPoint::TailUpdate,
        tail_base(tail),
        CACHE_POS_STRIDE,
        state,
        CachePosOnMedia {
            cache_seg_id: pos.cache_seg_id.into(),
            seg_off: pos.seg_off.into(),
            ..Default::default()
        },
    )?;
    Ok(())
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

/// Why the segment chain of a cache_info cannot be followed (`docs/format.md` §8.3; checks no
/// kernel has beyond n_segs and the range: cycles and duplicates).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ChainError {
    /// cache_info.n_segs is 0 or larger than seg_num.
    #[error("cache_info n_segs {n_segs} out of range (1..={seg_num})")]
    NSegs {
        /// n_segs found.
        n_segs: u32,
        /// seg_num.
        seg_num: u32,
    },
    /// A cache segment maps to a physical segment beyond seg_num.
    #[error("cache segment {cache_seg} maps to physical segment {pseg}, beyond seg_num {seg_num}")]
    SegOutOfRange {
        /// Cache segment id.
        cache_seg: u32,
        /// Physical id found.
        pseg: u32,
        /// seg_num.
        seg_num: u32,
    },
    /// A segment before the end of the chain has no HAS_NEXT.
    #[error(
        "cache segment {cache_seg} (physical {pseg}) has no next segment, but n_segs is {n_segs}"
    )]
    Broken {
        /// Cache segment id that has no successor.
        cache_seg: u32,
        /// Its physical id.
        pseg: u32,
        /// Chain length cache_info asks for.
        n_segs: u32,
    },
    /// A physical segment appears twice in the chain.
    #[error(
        "physical segment {pseg} appears again as cache segment {cache_seg} (cycle or duplicate)"
    )]
    Duplicate {
        /// Cache segment id where it appears again.
        cache_seg: u32,
        /// Physical id.
        pseg: u32,
    },
    /// A segment of the chain has no valid segment info.
    #[error("cache segment {cache_seg} (physical {pseg}) has no valid segment info")]
    SegInfoMissing {
        /// Cache segment id.
        cache_seg: u32,
        /// Physical id.
        pseg: u32,
    },
}

impl From<ChainError> for Refusal {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::NSegs { n_segs, seg_num } => Refusal::NSegs { n_segs, seg_num },
            ChainError::SegOutOfRange {
                cache_seg,
                pseg,
                seg_num,
            } => Refusal::ChainSegOutOfRange {
                cache_seg,
                pseg,
                seg_num,
            },
            ChainError::Broken {
                cache_seg,
                pseg,
                n_segs,
            } => Refusal::ChainBroken {
                cache_seg,
                pseg,
                n_segs,
            },
            ChainError::Duplicate { cache_seg, pseg } => {
                Refusal::ChainDuplicate { cache_seg, pseg }
            }
            ChainError::SegInfoMissing { cache_seg, pseg } => {
                Refusal::SegInfoMissing { cache_seg, pseg }
            }
        }
    }
}

/// Whether a chain may visit a physical segment twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aliases {
    /// A segment already in the chain is [`ChainError::Duplicate`]: aliased
    /// cache segments share their bytes, so data and log records written
    /// through one overwrite the other's (recover mode, the inspector).
    Refused,
    /// Accepted, as Linux 7.2.13 accepts them (its walk checks only the
    /// range and HAS_NEXT): strict mode. Aliases are still listed.
    Accepted,
}

/// The segment chain as far as it could be followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainWalk {
    /// Physical segment of each cache segment followed, in chain order (a
    /// segment without valid info is included, as the last).
    pub psegs: Vec<u32>,
    /// The physical segments in `psegs` (over seg_num segments).
    pub map: SegBitmap,
    /// Why the walk stopped before n_segs segments, if it did.
    pub error: Option<ChainError>,
    /// Cache segments whose physical segment an earlier one already has
    /// (only with [`Aliases::Accepted`]; otherwise the first is the error).
    pub aliased: Vec<u32>,
}

/// Follows the chain of `n_segs` segments from physical segment `seg_id` on a
/// device of `seg_num` segments, reading each segment's info (`docs/format.md` §8.3): the one
/// place where the chain rule lives, for activation and the inspector alike.
/// n_segs is checked first (0 or above seg_num: nothing is read); then each
/// segment must be in range, not already in the chain, and hold a valid
/// segment info, whose HAS_NEXT / next_seg lead to the next one. `each(cseg,
/// pseg, (slot, info))` sees every segment with valid info, in order; it
/// returns false to stop the walk. Terminates on any media: at most n_segs ≤
/// seg_num steps.
pub fn walk_chain<P: Pmem + ?Sized>(
    pmem: &P,
    seg_id: u32,
    n_segs: u32,
    seg_num: u32,
    aliases: Aliases,
    mut each: impl FnMut(u32, u32, (usize, SegInfo)) -> bool,
) -> Result<ChainWalk, PmemError> {
    let mut walk = ChainWalk {
        psegs: Vec::new(),
        map: SegBitmap::new(seg_num),
        error: None,
        aliased: Vec::new(),
    };
    if n_segs == 0 || n_segs > seg_num {
        walk.error = Some(ChainError::NSegs { n_segs, seg_num });
        return Ok(walk);
    }
    let mut pseg = seg_id;
    for cache_seg in 0..n_segs {
        if pseg >= seg_num {
            walk.error = Some(ChainError::SegOutOfRange {
                cache_seg,
                pseg,
                seg_num,
            });
            break;
        }
        if walk.map.set(pseg) {
            if aliases == Aliases::Refused {
                walk.error = Some(ChainError::Duplicate { cache_seg, pseg });
                break;
            }
            walk.aliased.push(cache_seg);
        }
        walk.psegs.push(pseg);
        let slots = read_seg_info(pmem, pseg)?;
        let Some(latest) = slots.latest_record() else {
            walk.error = Some(ChainError::SegInfoMissing { cache_seg, pseg });
            break;
        };
        if !each(cache_seg, pseg, latest) {
            break;
        }
        if cache_seg + 1 < n_segs {
            let info = latest.1;
            if !info.has_next() {
                walk.error = Some(ChainError::Broken {
                    cache_seg,
                    pseg,
                    n_segs,
                });
                break;
            }
            pseg = info.next_seg.get();
        }
    }
    Ok(walk)
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
    replayed: Replayed,
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
    let pos = rec.pos();
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
    rep.cache_info_flags = Some(info.flags.get());
    rep.n_segs = Some(info.n_segs.get());
    if info.data_crc() != opts.data_crc {
        return Err(Refusal::DataCrcOption {
            option: opts.data_crc,
            cache: info.data_crc(),
        });
    }
    let n_segs = info.n_segs.get();

    // The chain (the walker checks n_segs before reading anything; n_segs is
    // untrusted until then, so it does not size the allocation).
    let mut segments: Vec<Segment> = Vec::with_capacity(n_segs.min(seg_num) as usize);
    let mut gen_err = None;
    // Strict mode accepts aliased segments as the kernel does (a hardening
    // gap the format document's crash analysis names); recover refuses them.
    let aliases = match opts.mode {
        Mode::Strict => Aliases::Accepted,
        Mode::Recover => Aliases::Refused,
    };
    let walk = walk_chain(
        pmem,
        info.seg_id.get(),
        n_segs,
        seg_num,
        aliases,
        |_, pseg, (slot, seg_info)| {
            let gen = match read_seg_gen(pmem, pseg) {
                Ok(g) => g,
                Err(e) => {
                    gen_err = Some(e);
                    return false;
                }
            };
            let (gen_val, gen_state) = match gen.latest_record() {
                Some((slot, g)) => (g.gen.get(), DualCopy::loaded(Policy::A, slot, g.header.seq)),
                None => (0, DualCopy::fresh(Policy::A)),
            };
            segments.push(Segment {
                pseg,
                info: seg_info,
                info_state: DualCopy::loaded(Policy::A, slot, seg_info.header.seq),
                gen: gen_val,
                gen_state,
            });
            rep.chain_len = segments.len() as u32;
            true
        },
    )?;
    if let Some(e) = gen_err {
        return Err(e.into());
    }
    if let Some(e) = walk.error {
        return Err(e.into());
    }
    let dev_map = walk.map;

    // The tails (key_tail first, as the kernel).
    let key_tail = load_tail(pmem, Tail::KeyTail, n_segs, opts.mode)?;
    rep.key_tail = key_tail.report();
    let dirty_tail = load_tail(pmem, Tail::DirtyTail, n_segs, opts.mode)?;
    rep.dirty_tail = dirty_tail.report();

    // Replay from key_tail: every record is validated (a record no kernel
    // writes is refused for what is wrong with it), every valid key goes
    // into the index in log order.
    let chain: Vec<u32> = segments.iter().map(|s| s.pseg).collect();
    let gens: Vec<u64> = segments.iter().map(|s| s.gen).collect();
    let replayed = replay(
        pmem,
        &chain,
        &gens,
        key_tail.pos,
        info.data_crc(),
        rules(opts.mode),
    )
    .map_err(|error| Refusal::KeyData { error })?;
    rep.log = Some(replayed.log.clone());
    let end = replayed.end.clone();
    if !end.stop.is_end_of_log() && !ends_log_for_the_kernel(&end.stop, opts.mode) {
        return Err(Refusal::HostileLog { end });
    }
    check_dirty_tail(pmem, &chain, &key_tail, &dirty_tail, &replayed, opts.mode)?;

    Ok(Loaded {
        info,
        info_state: DualCopy::loaded(Policy::A, info_slot, info.header.seq),
        segments,
        key_tail,
        dirty_tail,
        dev_map,
        replayed,
    })
}

/// Where dirty_tail may be. Recover mode: on the log just replayed, at a
/// record's start or at its end (writeback never passes key_head, and never
/// stops inside a record). Strict mode: Linux 7.2.13's check
/// (`cache_verify_dirty_tail`, `docs/format.md` §8.4): the log walked from
/// dirty_tail must end as a log ends, wherever dirty_tail is.
fn check_dirty_tail<P: Pmem + ?Sized>(
    pmem: &P,
    chain: &[u32],
    key_tail: &TailState,
    dirty_tail: &TailState,
    replayed: &Replayed,
    mode: Mode,
) -> Result<(), Refusal> {
    let off_log = || Refusal::DirtyTailOffLog {
        key_tail: key_tail.pos,
        dirty_tail: dirty_tail.pos,
        log_end: replayed.key_head,
    };
    match mode {
        Mode::Recover => {
            let on_log =
                dirty_tail.pos == replayed.key_head || replayed.records.contains(&dirty_tail.pos);
            if on_log {
                Ok(())
            } else {
                Err(off_log())
            }
        }
        Mode::Strict => {
            let walk = walk_log_with(pmem, chain, dirty_tail.pos, rules(mode), |_| {});
            let end = walk.end.expect("a walk always ends");
            if end.stop.is_end_of_log() || ends_log_for_the_kernel(&end.stop, mode) {
                Ok(())
            } else {
                Err(off_log())
            }
        }
    }
}

/// The log validity rules of a mode: strict reads the log as Linux 7.2.13
/// does; recover refuses CRC-valid records no kernel writes.
pub fn rules(mode: Mode) -> Rules {
    match mode {
        Mode::Strict => Rules::Kernel,
        Mode::Recover => Rules::Ours,
    }
}

/// Whether strict mode, like Linux 7.2.13's replay, takes `stop` as the end
/// of the log although no kernel writes such a record: a normal key-set
/// claiming more than 128 keys fails the kernel's validity test before its
/// CRC is checked, and replay stops there (observed on 7.2.13 media). Recover
/// mode refuses a CRC-valid one as crafted. (A CRC-valid key-set of 0 keys,
/// which the kernel replays past as empty, still ends both modes' walks as a
/// record no kernel writes in recover mode; strict replays past it, see [`Rules`].)
fn ends_log_for_the_kernel(stop: &LogStop, mode: Mode) -> bool {
    mode == Mode::Strict
        && matches!(
            stop,
            LogStop::Invalid {
                error: KsetError::KeyNumOutOfRange { key_num }
            } if *key_num > KSET_KEYS_MAX
        )
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
        replayed,
    } = loaded;
    let mut seg_map = SegBitmap::new(seg_num);
    for (cseg, used) in replayed.used.iter().enumerate() {
        if *used {
            seg_map.set(cseg as u32);
        }
    }
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
        index: replayed.index,
        key_head: replayed.key_head,
        refs: replayed.refs.iter().map(|&r| r as i64).collect(),
        rt: RunTime::default(),
    })
}

fn write_cache_info<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    hooks: &mut H,
    state: &mut DualCopy,
    mut info: CacheInfo,
) -> Result<(usize, CacheInfo), PmemError> {
    info.flags.set(info.flags.get() | CACHE_INFO_F_INIT_DONE);
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
/// in the kernel's order (`docs/format.md` §10.2): for every segment, link the previous one
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
        n_segs: seg_num.into(),
        flags: (CacheInfo::default_flags(opts.data_crc)).into(),
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
    let n_segs = info.n_segs.get();
    check_n_segs(n_segs, seg_num)?;

    let mut dev_map = SegBitmap::new(seg_num);
    let mut segments: Vec<Segment> = Vec::with_capacity(n_segs as usize);
    for i in 0..n_segs {
        let pseg = dev_map
            .alloc_lowest()
            .ok_or(Refusal::NSegs { n_segs, seg_num })?;
        match segments.last_mut() {
            None => info.seg_id.set(pseg),
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
        persist_tail(pmem, hooks, tail, &mut t.state, t.pos)?;
    }

    let (_, info) = write_cache_info(pmem, hooks, &mut info_state, info)?;
    let n = segments.len();
    Ok(Cache {
        mode: opts.mode,
        seg_num,
        info,
        info_state,
        segments,
        key_head: key_tail.pos,
        key_tail,
        dirty_tail,
        seg_map,
        dev_map,
        index: KeyIndex::default(),
        refs: vec![0; n],
        rt: RunTime::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Record;

    fn hex(s: &str) -> Vec<u8> {
        let s: alloc::string::String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn ci(seq: u8, seg_id: u32, n_segs: u32, flags: u32) -> CacheInfo {
        CacheInfo {
            header: MetaHeader {
                seq,
                ..Default::default()
            },
            seg_id: seg_id.into(),
            n_segs: n_segs.into(),
            flags: flags.into(),
            reserved: 0.into(),
        }
    }

    #[test]
    fn cache_info_vectors() {
        for (rec, crc, bytes) in [
            (
                ci(1, 0, 31, 0x1182),
                0xddca_fe6d,
                "6dfecadd 01000000 00000000 1f000000 82110000 00000000",
            ),
            (
                ci(1, 0, 31, 0x1183),
                0x94f6_834a,
                "4a83f694 01000000 00000000 1f000000 83110000 00000000",
            ),
            (
                ci(2, 0, 63, 0x1182),
                0xb65d_568c,
                "8c565db6 02000000 00000000 3f000000 82110000 00000000",
            ),
        ] {
            assert_eq!(rec.computed_crc(), crc);
            assert_eq!(rec.to_bytes().to_vec(), hex(bytes));
            let d = CacheInfo::read_from_bytes(&hex(bytes)).unwrap();
            assert!(d.crc_ok());
            assert_eq!(d.header.crc, crc);
            assert_eq!(
                (d.seg_id, d.n_segs, d.flags),
                (rec.seg_id, rec.n_segs, rec.flags)
            );
        }
        assert_eq!(
            CacheInfo::default_flags(false) | CACHE_INFO_F_INIT_DONE,
            0x1182
        );
        assert_eq!(
            CacheInfo::default_flags(true) | CACHE_INFO_F_INIT_DONE,
            0x1183
        );
        let d = ci(1, 0, 31, 0x1181);
        assert!(d.data_crc() && !d.init_done());
        assert!(ci(1, 0, 31, 0x1182).init_done());
        assert_eq!(d.gc_percent(), 70);
        assert_eq!(d.cache_mode(), 0);
    }

    fn pos(seq: u8, cseg: u32, off: u32) -> CachePosOnMedia {
        CachePosOnMedia {
            header: MetaHeader {
                seq,
                ..Default::default()
            },
            cache_seg_id: cseg.into(),
            seg_off: off.into(),
        }
    }

    #[test]
    fn cache_pos_vectors() {
        for (rec, crc, bytes) in [
            (
                pos(1, 0, 0),
                0x6ef5_dfb0,
                "b0dff56e 01000000 00000000 00000000",
            ),
            (
                pos(2, 0, 5144),
                0xcc3b_a8ab,
                "aba83bcc 02000000 00000000 18140000",
            ),
            (
                pos(255, 3, 4096),
                0x6ac6_c263,
                "63c2c66a ff000000 03000000 00100000",
            ),
            (
                pos(0, 3, 8192),
                0x6584_77fd,
                "fd778465 00000000 03000000 00200000",
            ),
        ] {
            assert_eq!(rec.computed_crc(), crc);
            assert_eq!(rec.to_bytes().to_vec(), hex(bytes));
            let d = CachePosOnMedia::read_from_bytes(&hex(bytes)).unwrap();
            assert!(d.crc_ok());
            assert_eq!((d.cache_seg_id, d.seg_off), (rec.cache_seg_id, rec.seg_off));
        }
    }

    /// Activation and the inspector follow the chain with the same walker,
    /// so they stop at the same segment for the same reason.
    #[test]
    fn activation_and_inspector_share_the_chain_rule() {
        use crate::format::seg_info_slot_off;
        use crate::inspect::{inspect, InspectOptions};
        use crate::pmem::SparsePmem;
        use crate::{activate, NoHooks, Options, Outcome};

        let info = |flags: u32, next: u32| {
            SegInfo {
                header: MetaHeader::with_seq(9),
                flags: flags.into(),
                next_seg: next.into(),
            }
            .to_bytes()
        };
        let cases: [(&str, u32, u32, ChainError); 3] = [
            // cache segment 4 (physical 4) leads back to physical 2.
            (
                "cycle",
                4,
                0x3,
                ChainError::Duplicate {
                    cache_seg: 5,
                    pseg: 2,
                },
            ),
            (
                "broken",
                4,
                0x2,
                ChainError::Broken {
                    cache_seg: 4,
                    pseg: 4,
                    n_segs: 31,
                },
            ),
            (
                "out of range",
                4,
                0x3,
                ChainError::SegOutOfRange {
                    cache_seg: 5,
                    pseg: 99,
                    seg_num: 31,
                },
            ),
        ];
        for (name, pseg, flags, want) in cases {
            let mut dev = SparsePmem::new(512 << 20);
            let opts = Options::default();
            assert_eq!(
                activate(&mut dev, &opts, &mut NoHooks).outcome,
                Outcome::Formatted
            );
            let next = if name == "out of range" { 99 } else { 2 };
            // Both slots, so whichever is current says the same.
            for slot in 0..2 {
                dev.write_bytes(seg_info_slot_off(pseg, slot), &info(flags, next))
                    .unwrap();
            }
            let seen = inspect(&dev, &InspectOptions::default()).unwrap();
            let chain = seen.chain.expect("a valid cache_info");
            let strict = Options {
                mode: Mode::Strict,
                ..opts
            };
            if let ChainError::Duplicate { cache_seg, .. } = want {
                // Aliases: the inspector walks the whole chain and lists them
                // (cache segments 5.. are physical 2, 3, 4, 2, ...); strict
                // mode opens the cache as Linux 7.2.13 does.
                assert_eq!(chain.error, None, "{name}: inspector");
                assert_eq!(chain.psegs.len(), 31, "{name}: inspector");
                assert_eq!(chain.aliased, (cache_seg..31).collect::<Vec<_>>());
                let mut copy = dev.clone();
                let rep = activate(&mut copy, &strict, &mut NoHooks);
                assert_eq!(rep.outcome, Outcome::Opened, "{name}: strict");
            } else {
                assert_eq!(chain.error, Some(want), "{name}: inspector");
                assert!(chain.aliased.is_empty());
                let mut copy = dev.clone();
                let rep = activate(&mut copy, &strict, &mut NoHooks);
                assert_eq!(rep.refusal, Some(Refusal::from(want)), "{name}: strict");
            }
            let rep = activate(&mut dev, &opts, &mut NoHooks);
            assert_eq!(rep.outcome, Outcome::Refused, "{name}");
            assert_eq!(rep.refusal, Some(Refusal::from(want)), "{name}: activation");
        }
    }
}
