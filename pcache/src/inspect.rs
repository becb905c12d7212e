//! Read-only inspection of a cache device, for people (`cargo xtask inspect`).
//!
//! [`inspect`] takes the device by shared reference: it cannot write. It reports
//! every record as found — both copies of every dual-copy record with their
//! CRC verdicts and which one is current — and walks the segment chain and the
//! key-set log from key_tail as far as the media allows, saying where and why
//! each stops. Any bytes give a report (or [`InspectError`] for a device that
//! is too small or cannot be read), never a panic. The JSON schema (serde) is
//! documented in `pcache/README.md`.
//!
//! The work is bounded by what the user asked for, not by what the superblock
//! claims: segments whose metadata was never written (a sparse file's holes,
//! [`Pmem::next_data`]) are reported as ranges without being read one by one,
//! at most [`InspectOptions::max_segments`] segments are listed (every
//! segment is still counted), and the listed segments and log records are
//! produced lazily while the report is serialized or displayed, so memory
//! does not grow with the output ([`InspectReport::segments`],
//! [`InspectReport::log_records`]). Only the chain (one u32 per segment of a
//! valid chain) is held.

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;
use serde::ser::{Error as _, SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};

use crate::cache::{
    read_cache_info, read_tail, walk_chain, Aliases, CacheInfo, CachePosOnMedia, ChainError,
};
use crate::cache_dev::{classify_sb, max_seg_num, read_sb, SbState, Superblock};
use crate::cache_key::{
    replay, walk_log, CachePos, KeyOnMedia, Kset, LogEnd, LogRecord, LogStep, LogWalker, Rules,
};
use crate::format::{
    cache_info_slot_off, data_pos, seg_gen_slot_off, seg_info_slot_off, seg_off, DualRecord,
    Record, CACHE_DEV_SIZE_MIN, CACHE_POS_STRIDE, DATA_SIZE, DIRTY_TAIL_OFF, KEY_F_CLEAN,
    KEY_TAIL_OFF, SB_OFF, SEGMENTS_OFF, SEG_GEN_STRIDE, SEG_HEADER_SIZE, SEG_INFO_SIZE, SEG_SIZE,
};
use crate::meta::Slots;
use crate::pmem::{Pmem, PmemError};
use crate::report::Tail;
use crate::segment::{read_seg_gen, read_seg_info, SegGen, SegInfo};

/// Why a device could not be inspected at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InspectError {
    /// Smaller than the minimum cache device.
    #[error("the device is {size} bytes, smaller than the 512 MiB ({min} bytes) minimum of a pcache cache device, so it cannot be one")]
    TooSmall {
        /// Size.
        size: u64,
        /// Minimum.
        min: u64,
    },
    /// A read failed.
    #[error("reading the device failed: {0}")]
    Pmem(#[from] PmemError),
}

/// Options of an inspection: how much the user asked to see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InspectOptions {
    /// At most this many log records are listed (all are counted).
    pub max_log_records: usize,
    /// At most this many keys are listed in all (all are counted): bounds the
    /// work a hostile log of full key-sets can make the inspector do.
    pub max_log_keys: usize,
    /// At most this many segments are read and listed (all are counted;
    /// segments whose metadata was never written do not count against it).
    pub max_segments: usize,
}

impl Default for InspectOptions {
    fn default() -> Self {
        InspectOptions {
            max_log_records: 100_000,
            max_log_keys: 100_000,
            max_segments: 1024,
        }
    }
}

/// One slot of a dual-copy record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SlotView<R> {
    /// Slot index.
    pub slot: usize,
    /// Device offset.
    pub offset: u64,
    /// Whether the stored CRC matches.
    pub valid: bool,
    /// Whether all its bytes are zero (never written, or zeroed).
    pub zero: bool,
    /// The CRC the content calls for.
    pub computed_crc: u32,
    /// The record as decoded (header with the stored CRC and seq).
    pub record: R,
}

/// Both slots of a dual-copy record and which one is current.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DualView<R> {
    /// Slot 0 and slot 1.
    pub slots: [SlotView<R>; 2],
    /// The current (latest valid) slot, if any.
    pub current: Option<usize>,
}

impl<R: DualRecord> DualView<R> {
    fn new(s: Slots<R>, base: u64, stride: u64) -> Self {
        let view = |i: usize| SlotView {
            slot: i,
            offset: base + i as u64 * stride,
            valid: s.valid[i],
            zero: s.slots[i].as_bytes().iter().all(|&b| b == 0),
            computed_crc: s.slots[i].computed_crc(),
            record: s.slots[i],
        };
        DualView {
            slots: [view(0), view(1)],
            current: s.latest,
        }
    }

    /// The current record.
    pub fn current_record(&self) -> Option<&R> {
        self.current.map(|i| &self.slots[i].record)
    }
}

/// The superblock as found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SuperblockView {
    /// Device offset.
    pub offset: u64,
    /// The fields as stored.
    pub record: Superblock,
    /// The CRC the content calls for.
    pub computed_crc: u32,
    /// Verdict (valid, or why not).
    pub state: SbState,
}

/// One physical segment's records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SegmentView {
    /// Physical segment id.
    pub pseg: u32,
    /// Device offset of the segment.
    pub offset: u64,
    /// Segment info copies.
    pub info: DualView<SegInfo>,
    /// Generation copies.
    pub gen: DualView<SegGen>,
    /// Cache segment id, if the segment is in the chain.
    pub cache_seg: Option<u32>,
}

/// The segment chain from cache_info.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainView {
    /// Physical segment of each cache segment, in chain order.
    pub psegs: Vec<u32>,
    /// n_segs of the current cache_info.
    pub n_segs: u32,
    /// Why the walk stopped before n_segs segments, if it did.
    pub error: Option<ChainError>,
    /// Cache segments whose physical segment an earlier one already has: the
    /// kernel (and strict mode) accepts such a chain, whose aliased segments
    /// overwrite each other's data; recover mode refuses it.
    pub aliased: Vec<u32>,
}

/// Where the number of segments inspected comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SegNumSource {
    /// The (valid) superblock's seg_num.
    Superblock,
    /// The device size (the superblock is not valid).
    DeviceSize,
}

/// How the segments were covered: `listed + unwritten + not_listed = total`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SegmentCounts {
    /// Segments inspected (seg_num).
    pub total: u32,
    /// Segments read and listed.
    pub listed: u32,
    /// Segments whose metadata the device holds no data for (never written;
    /// they read as zero): reported as ranges, not read.
    pub unwritten: u32,
    /// Segments neither read nor listed: beyond `max_segments`.
    pub not_listed: u32,
}

/// A run of segments that is not listed one by one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SegmentRange {
    /// First physical segment.
    pub first: u32,
    /// Last physical segment (inclusive).
    pub last: u32,
}

/// What the segment scan yields, in physical order.
// Items are produced and consumed one at a time: no collection of them exists
// for the size difference to waste.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentItem {
    /// A segment read and listed.
    Listed(SegmentView),
    /// Segments whose metadata was never written.
    Unwritten(SegmentRange),
    /// Segments beyond the budget.
    NotListed(SegmentRange),
}

/// Why the log was not walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotWalked {
    /// No cache_info, so no chain.
    #[error("no valid cache_info, so no segment chain")]
    NoCacheInfo,
    /// The chain could not be followed.
    #[error("the segment chain is broken: {0}")]
    ChainBroken(ChainError),
    /// key_tail has no valid copy.
    #[error("key_tail has no valid copy")]
    NoKeyTail,
    /// key_tail is outside the chain or the data area.
    #[error("key_tail {pos} is out of range (n_segs {n_segs}, data area {DATA_SIZE} bytes)")]
    KeyTailOutOfRange {
        /// key_tail.
        pos: CachePos,
        /// Chain length.
        n_segs: u32,
    },
}

/// The JSON keeps the reason as text (`not_walked: string or null`).
impl Serialize for NotWalked {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The key-set log from key_tail: the counts and the end (the listed records
/// are produced by [`InspectReport::log_records`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogView {
    /// Where it starts (current key_tail), if the walk could start.
    pub start: Option<CachePos>,
    /// Why the log was not walked.
    pub not_walked: Option<NotWalked>,
    /// Normal key-sets found.
    pub ksets: u64,
    /// Keys in them.
    pub keys: u64,
    /// LAST records found.
    pub lasts: u64,
    /// Records listed (at most `max_log_records`, with at most `max_log_keys`
    /// keys in all).
    pub listed: u64,
    /// Whether records were left out of the list.
    pub truncated: bool,
    /// Where and why the log ends.
    pub end: Option<LogEnd>,
    /// Whether the end is an ordinary end of a log (terminator, no magic, torn
    /// record) rather than a record no kernel writes.
    pub end_is_ordinary: Option<bool>,
    /// What replay keeps in force (our rules, no data-CRC check), by (cache
    /// segment, offset in its data area) → length: how much of each key
    /// still serves reads. `None` when the log was not walked, does not end
    /// ordinarily, or holds more keys than `max_log_keys`.
    pub in_force: Option<BTreeMap<(u32, u32), u32>>,
    /// The line `dmsetup status` would print after an activation that
    /// replays this log (`docs/format.md` §11), when the log was replayed.
    pub status: Option<String>,
}

/// What replay made of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    /// All of its range is served from it.
    Current,
    /// Later keys override part of its range.
    PartlyOverridden,
    /// Later keys override all of its range.
    Overridden,
    /// Its segment's generation moved on: replay drops it.
    Stale,
    /// Not computed (see [`LogView::in_force`]).
    Unknown,
}

/// Everything [`inspect`] found. Holds the device: the listed segments and
/// log records are read again, lazily, when they are iterated, serialized or
/// displayed (the device is borrowed read-only for the report's life).
pub struct InspectReport<'a, P: Pmem + ?Sized> {
    pmem: &'a P,
    opts: InspectOptions,
    /// (pseg, cache segment id) of the chain, sorted by pseg.
    cache_segs: Vec<(u32, u32)>,
    /// Device size.
    pub device_size: u64,
    /// The superblock.
    pub superblock: SuperblockView,
    /// Segments inspected.
    pub seg_num: u32,
    /// Where `seg_num` comes from.
    pub seg_num_source: SegNumSource,
    /// cache_info copies.
    pub cache_info: DualView<CacheInfo>,
    /// key_tail copies.
    pub key_tail: DualView<CachePosOnMedia>,
    /// dirty_tail copies.
    pub dirty_tail: DualView<CachePosOnMedia>,
    /// The chain from the current cache_info (None without one).
    pub chain: Option<ChainView>,
    /// How the segments were covered.
    pub segment_counts: SegmentCounts,
    /// The log from key_tail.
    pub log: LogView,
}

impl<P: Pmem + ?Sized> fmt::Debug for InspectReport<'_, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InspectReport")
            .field("device_size", &self.device_size)
            .field("superblock", &self.superblock)
            .field("seg_num", &self.seg_num)
            .field("chain", &self.chain)
            .field("segment_counts", &self.segment_counts)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

/// Decides which log records are listed: at most `max_log_records`, with at
/// most `max_log_keys` keys in all (a record that would exceed the keys is
/// skipped; a later, smaller one may still be listed). Both passes over the
/// log use it, so they agree.
struct Lister {
    records: usize,
    keys: usize,
    max_records: usize,
    max_keys: usize,
}

impl Lister {
    fn new(opts: &InspectOptions) -> Self {
        Lister {
            records: 0,
            keys: 0,
            max_records: opts.max_log_records,
            max_keys: opts.max_log_keys,
        }
    }

    fn admit(&mut self, n_keys: usize) -> bool {
        let list =
            self.records < self.max_records && self.keys.saturating_add(n_keys) <= self.max_keys;
        if list {
            self.records += 1;
            self.keys += n_keys;
        }
        list
    }
}

fn record_keys(r: &LogRecord) -> usize {
    match &r.kset {
        Kset::Keys { keys } => keys.len(),
        Kset::Last { .. } => 0,
    }
}

/// Inspects a device, read-only. What is read here: the superblock,
/// cache_info, the tails, the chain's segment infos and one counting walk of
/// the log; the listed segments and records are read when iterated.
pub fn inspect<'a, P: Pmem + ?Sized>(
    pmem: &'a P,
    opts: &InspectOptions,
) -> Result<InspectReport<'a, P>, InspectError> {
    let size = pmem.size();
    if size < CACHE_DEV_SIZE_MIN {
        return Err(InspectError::TooSmall {
            size,
            min: CACHE_DEV_SIZE_MIN,
        });
    }
    let sb = read_sb(pmem)?;
    let state = classify_sb(&sb, size);
    let (seg_num, seg_num_source) = match state {
        SbState::Valid { seg_num, .. } => (seg_num, SegNumSource::Superblock),
        _ => (max_seg_num(size), SegNumSource::DeviceSize),
    };
    let cache_info = DualView::new(
        read_cache_info(pmem)?,
        cache_info_slot_off(0),
        cache_info_slot_off(1) - cache_info_slot_off(0),
    );
    let key_tail = DualView::new(
        read_tail(pmem, Tail::KeyTail)?,
        KEY_TAIL_OFF,
        CACHE_POS_STRIDE,
    );
    let dirty_tail = DualView::new(
        read_tail(pmem, Tail::DirtyTail)?,
        DIRTY_TAIL_OFF,
        CACHE_POS_STRIDE,
    );

    let chain = match cache_info.current_record() {
        None => None,
        Some(ci) => {
            let n_segs = ci.n_segs.get();
            let walk = walk_chain(
                pmem,
                ci.seg_id.get(),
                n_segs,
                seg_num,
                Aliases::Accepted,
                |_, _, _| true,
            )?;
            Some(ChainView {
                psegs: walk.psegs,
                n_segs,
                error: walk.error,
                aliased: walk.aliased,
            })
        }
    };
    let mut cache_segs: Vec<(u32, u32)> = chain
        .iter()
        .flat_map(|c| c.psegs.iter().enumerate().map(|(i, &p)| (p, i as u32)))
        .collect();
    cache_segs.sort_unstable();

    let mut report = InspectReport {
        pmem,
        opts: *opts,
        cache_segs,
        device_size: size,
        superblock: SuperblockView {
            offset: SB_OFF,
            record: sb,
            computed_crc: sb.computed_crc(),
            state,
        },
        seg_num,
        seg_num_source,
        cache_info,
        key_tail,
        dirty_tail,
        chain,
        segment_counts: SegmentCounts {
            total: seg_num,
            ..Default::default()
        },
        log: LogView {
            start: None,
            not_walked: None,
            ksets: 0,
            keys: 0,
            lasts: 0,
            listed: 0,
            truncated: false,
            end: None,
            end_is_ordinary: None,
            in_force: None,
            status: None,
        },
    };
    // Count the segments (no record is read for that).
    let mut counts = report.segment_counts;
    for item in SegmentScan::new(&report) {
        match item {
            Scanned::Segment(_) => counts.listed += 1,
            Scanned::Unwritten(r) => counts.unwritten += r.last - r.first + 1,
            Scanned::NotListed(r) => counts.not_listed += r.last - r.first + 1,
        }
    }
    report.segment_counts = counts;
    report.log = count_log(pmem, opts, &report);
    Ok(report)
}

/// Where the log walk starts: the chain's psegs and the current key_tail, or
/// why there is no walk.
fn log_start<'r>(
    chain: Option<&'r ChainView>,
    key_tail: &DualView<CachePosOnMedia>,
) -> Result<(&'r [u32], CachePos), NotWalked> {
    let chain = chain.ok_or(NotWalked::NoCacheInfo)?;
    if let Some(e) = chain.error {
        return Err(NotWalked::ChainBroken(e));
    }
    let start = key_tail.current_record().ok_or(NotWalked::NoKeyTail)?.pos();
    if start.cache_seg_id as usize >= chain.psegs.len() || start.seg_off as u64 >= DATA_SIZE {
        return Err(NotWalked::KeyTailOutOfRange {
            pos: start,
            n_segs: chain.psegs.len() as u32,
        });
    }
    Ok((&chain.psegs, start))
}

/// The counting walk: every record counted, the listing decided (not built).
fn count_log<P: Pmem + ?Sized>(
    pmem: &P,
    opts: &InspectOptions,
    report: &InspectReport<'_, P>,
) -> LogView {
    let mut v = report.log.clone();
    let (psegs, start) = match log_start(report.chain.as_ref(), &report.key_tail) {
        Ok(s) => s,
        Err(why) => {
            v.not_walked = Some(why);
            return v;
        }
    };
    v.start = Some(start);
    let mut lister = Lister::new(opts);
    let mut listed = 0u64;
    let mut truncated = false;
    let summary = walk_log(pmem, psegs, start, |r| {
        if lister.admit(record_keys(r)) {
            listed += 1;
        } else {
            truncated = true;
        }
    });
    v.ksets = summary.ksets;
    v.keys = summary.keys;
    v.lasts = summary.lasts;
    v.listed = listed;
    v.truncated = truncated;
    v.end_is_ordinary = summary.end.as_ref().map(|e| e.stop.is_end_of_log());
    v.end = summary.end;
    if v.end_is_ordinary == Some(true) && v.keys <= opts.max_log_keys as u64 {
        replay_for_states(pmem, report, psegs, start, &mut v);
    }
    v
}

/// Replays the log (bounded: the caller checked the key count) to tell each
/// key's state and the status line an activation would report.
fn replay_for_states<P: Pmem + ?Sized>(
    pmem: &P,
    report: &InspectReport<'_, P>,
    psegs: &[u32],
    start: CachePos,
    v: &mut LogView,
) {
    let gens: Vec<u64> = psegs
        .iter()
        .map(|&p| {
            read_seg_gen(pmem, p)
                .ok()
                .and_then(|g| g.latest_record().map(|(_, g)| g.gen.get()))
                .unwrap_or(0)
        })
        .collect();
    let Ok(r) = replay(pmem, psegs, &gens, start, false, Rules::Ours) else {
        return;
    };
    v.in_force = Some(
        r.index
            .extents()
            .map(|e| ((e.cache_seg_id, e.cache_seg_off), e.len))
            .collect(),
    );
    let (Some(ci), Some(dt)) = (
        report.cache_info.current_record(),
        report.dirty_tail.current_record(),
    ) else {
        return;
    };
    let sb_flags = match report.superblock.state {
        SbState::Valid { flags, .. } => flags,
        _ => 0,
    };
    v.status = Some(alloc::format!(
        "{sb_flags:x} {} {} {} {} {:x} {} {} {}",
        report.seg_num,
        report.seg_num,
        r.used.iter().filter(|u| **u).count(),
        ci.gc_percent(),
        ci.flags.get(),
        r.key_head,
        dt.pos(),
        start,
    ));
}

/// The state of a key of the log, from what replay keeps in force.
fn key_state(
    k: &KeyOnMedia,
    stale: bool,
    in_force: Option<&BTreeMap<(u32, u32), u32>>,
) -> KeyState {
    if stale {
        return KeyState::Stale;
    }
    let Some(m) = in_force else {
        return KeyState::Unknown;
    };
    let (seg, off, len) = (k.cache_seg_id.get(), k.cache_seg_off.get(), k.len.get());
    // Data space is never shared by two keys (until GC reuses a segment,
    // which bumps its generation), so what is in force inside this key's
    // data range is what is left of it.
    let kept: u64 = m
        .range((seg, off)..(seg, off.saturating_add(len)))
        .map(|(_, &l)| l as u64)
        .sum();
    if kept == len as u64 {
        KeyState::Current
    } else if kept == 0 {
        KeyState::Overridden
    } else {
        KeyState::PartlyOverridden
    }
}

/// The segments in physical order: runs without written metadata are skipped
/// with one [`Pmem::next_data`] question each, at most `max_segments` are
/// read, the rest is one range.
struct SegmentScan<'r, 'a, P: Pmem + ?Sized> {
    report: &'r InspectReport<'a, P>,
    next: u32,
    listed: usize,
}

/// A step of the scan: a segment to list (not read yet), or a range.
#[derive(Clone, Copy, Debug)]
enum Scanned {
    Segment(u32),
    Unwritten(SegmentRange),
    NotListed(SegmentRange),
}

impl<'r, 'a, P: Pmem + ?Sized> SegmentScan<'r, 'a, P> {
    fn new(report: &'r InspectReport<'a, P>) -> Self {
        SegmentScan {
            report,
            next: 0,
            listed: 0,
        }
    }

    /// Whether physical segment `pseg`'s metadata (its first 12 KiB) may hold
    /// data; if not, the first segment after it that may (or seg_num).
    fn written_from(&self, pseg: u32) -> u32 {
        let seg_num = self.report.seg_num;
        let pmem = self.report.pmem;
        let mut p = pseg;
        while p < seg_num {
            let off = seg_off(p);
            let Some(d) = pmem.next_data(off) else {
                return seg_num;
            };
            if d < off + SEG_HEADER_SIZE {
                return p;
            }
            // The segment holding `d` (or past the end); it is checked next,
            // its metadata may start after `d`.
            let at = (d.saturating_sub(SEGMENTS_OFF) / SEG_SIZE).min(seg_num as u64) as u32;
            p = if at > p { at } else { p + 1 };
        }
        seg_num
    }
}

impl<P: Pmem + ?Sized> Iterator for SegmentScan<'_, '_, P> {
    type Item = Scanned;

    fn next(&mut self) -> Option<Self::Item> {
        let seg_num = self.report.seg_num;
        let first = self.next;
        if first >= seg_num {
            return None;
        }
        if self.listed >= self.report.opts.max_segments {
            self.next = seg_num;
            return Some(Scanned::NotListed(SegmentRange {
                first,
                last: seg_num - 1,
            }));
        }
        let written = self.written_from(first);
        if written > first {
            self.next = written;
            return Some(Scanned::Unwritten(SegmentRange {
                first,
                last: written - 1,
            }));
        }
        self.next = first + 1;
        self.listed += 1;
        Some(Scanned::Segment(first))
    }
}

/// The listed log records, built while iterated (the second walk).
struct RecordScan<'r, 'a, P: Pmem + ?Sized> {
    report: &'r InspectReport<'a, P>,
    walker: Option<LogWalker<'r, P>>,
    psegs: &'r [u32],
    lister: Lister,
    left: u64,
    gens: BTreeMap<u32, u64>,
}

impl<P: Pmem + ?Sized> RecordScan<'_, '_, P> {
    fn segment_gen(&mut self, pseg: u32) -> Result<u64, PmemError> {
        if let Some(&g) = self.gens.get(&pseg) {
            return Ok(g);
        }
        let g = read_seg_gen(self.report.pmem, pseg)?
            .latest_record()
            .map_or(0, |(_, g)| g.gen.get());
        self.gens.insert(pseg, g);
        Ok(g)
    }

    fn view(&mut self, r: &LogRecord) -> Result<RecordView, PmemError> {
        let pseg = self.psegs[r.pos.cache_seg_id as usize];
        let mut rv = RecordView {
            pos: r.pos,
            offset: data_pos(pseg, r.pos.seg_off),
            size: r.kset.size() as u64,
            next_cache_seg_id: None,
            keys: Vec::new(),
        };
        match &r.kset {
            Kset::Last { next_cache_seg_id } => rv.next_cache_seg_id = Some(*next_cache_seg_id),
            Kset::Keys { keys } => {
                for k in keys {
                    // Validated by the decoder: cache_seg_id < n_segs.
                    let kp = self.psegs[k.cache_seg_id.get() as usize];
                    let segment_gen = self.segment_gen(kp)?;
                    let stale = k.seg_gen.get() < segment_gen;
                    rv.keys.push(KeyView {
                        key: *k,
                        pseg: kp,
                        data_offset: data_pos(kp, k.cache_seg_off.get()),
                        segment_gen,
                        stale,
                        clean: k.flags.get() & KEY_F_CLEAN != 0,
                        state: key_state(k, stale, self.report.log.in_force.as_ref()),
                    });
                }
            }
        }
        Ok(rv)
    }
}

impl<P: Pmem + ?Sized> Iterator for RecordScan<'_, '_, P> {
    type Item = Result<RecordView, PmemError>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.left > 0 {
            let r = match self.walker.as_mut()?.step() {
                LogStep::Record(r) => r,
                LogStep::End(_) => return None,
            };
            if self.lister.admit(record_keys(&r)) {
                self.left -= 1;
                return Some(self.view(&r));
            }
        }
        None
    }
}

impl<'a, P: Pmem + ?Sized> InspectReport<'a, P> {
    /// Reads physical segment `pseg`'s records.
    fn segment_view(&self, pseg: u32) -> Result<SegmentView, PmemError> {
        let pmem = self.pmem;
        let cache_seg = self
            .cache_segs
            .binary_search_by_key(&pseg, |&(p, _)| p)
            .ok()
            .map(|i| self.cache_segs[i].1);
        Ok(SegmentView {
            pseg,
            offset: seg_off(pseg),
            info: DualView::new(
                read_seg_info(pmem, pseg)?,
                seg_info_slot_off(pseg, 0),
                SEG_INFO_SIZE,
            ),
            gen: DualView::new(
                read_seg_gen(pmem, pseg)?,
                seg_gen_slot_off(pseg, 0),
                SEG_GEN_STRIDE,
            ),
            cache_seg,
        })
    }

    /// The segments in physical order: each listed one read now, runs of
    /// unwritten segments and the segments beyond the budget as ranges.
    pub fn segments(&self) -> impl Iterator<Item = Result<SegmentItem, PmemError>> + '_ {
        SegmentScan::new(self).map(move |s| match s {
            Scanned::Segment(p) => self.segment_view(p).map(SegmentItem::Listed),
            Scanned::Unwritten(r) => Ok(SegmentItem::Unwritten(r)),
            Scanned::NotListed(r) => Ok(SegmentItem::NotListed(r)),
        })
    }

    /// The runs of never-written segments, in order (nothing is read).
    pub fn unwritten_segments(&self) -> impl Iterator<Item = SegmentRange> + '_ {
        SegmentScan::new(self).filter_map(|s| match s {
            Scanned::Unwritten(r) => Some(r),
            _ => None,
        })
    }

    /// The listed log records, read and built now, in log order.
    pub fn log_records(&self) -> impl Iterator<Item = Result<RecordView, PmemError>> + '_ {
        let start = log_start(self.chain.as_ref(), &self.key_tail).ok();
        RecordScan {
            report: self,
            walker: start.map(|(psegs, pos)| LogWalker::new(self.pmem, psegs, pos)),
            psegs: start.map_or(&[][..], |(psegs, _)| psegs),
            lister: Lister::new(&self.opts),
            left: self.log.listed,
            gens: BTreeMap::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// JSON: the same schema as an owned report, produced while it is written.
// ---------------------------------------------------------------------------

/// Serializes an iterator of results as a sequence, one element at a time.
struct Lazy<F>(RefCell<Option<F>>);

impl<I, T, F> Serialize for Lazy<F>
where
    F: FnOnce() -> I,
    I: Iterator<Item = Result<T, PmemError>>,
    T: Serialize,
{
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let make = self
            .0
            .borrow_mut()
            .take()
            .ok_or_else(|| S::Error::custom("a lazy sequence is serialized once"))?;
        let mut seq = s.serialize_seq(None)?;
        for item in make() {
            seq.serialize_element(&item.map_err(S::Error::custom)?)?;
        }
        seq.end()
    }
}

fn lazy<F>(f: F) -> Lazy<F> {
    Lazy(RefCell::new(Some(f)))
}

impl<P: Pmem + ?Sized> Serialize for InspectReport<'_, P> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("InspectReport", 12)?;
        st.serialize_field("device_size", &self.device_size)?;
        st.serialize_field("superblock", &self.superblock)?;
        st.serialize_field("seg_num", &self.seg_num)?;
        st.serialize_field("seg_num_source", &self.seg_num_source)?;
        st.serialize_field("cache_info", &self.cache_info)?;
        st.serialize_field("key_tail", &self.key_tail)?;
        st.serialize_field("dirty_tail", &self.dirty_tail)?;
        st.serialize_field("chain", &self.chain)?;
        st.serialize_field(
            "segments",
            &lazy(|| {
                self.segments().filter_map(|i| match i {
                    Ok(SegmentItem::Listed(v)) => Some(Ok(v)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
            }),
        )?;
        st.serialize_field("segment_counts", &self.segment_counts)?;
        st.serialize_field(
            "unwritten_segments",
            &lazy(|| self.unwritten_segments().map(Ok::<_, PmemError>)),
        )?;
        st.serialize_field("log", &LogJson(self))?;
        st.end()
    }
}

struct LogJson<'r, 'a, P: Pmem + ?Sized>(&'r InspectReport<'a, P>);

impl<P: Pmem + ?Sized> Serialize for LogJson<'_, '_, P> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let l = &self.0.log;
        let mut st = s.serialize_struct("LogView", 11)?;
        st.serialize_field("start", &l.start)?;
        st.serialize_field("not_walked", &l.not_walked)?;
        st.serialize_field("ksets", &l.ksets)?;
        st.serialize_field("keys", &l.keys)?;
        st.serialize_field("lasts", &l.lasts)?;
        st.serialize_field("records", &lazy(|| self.0.log_records()))?;
        st.serialize_field("truncated", &l.truncated)?;
        st.serialize_field("end", &l.end)?;
        st.serialize_field("end_message", &l.end.as_ref().map(|e| e.stop.to_string()))?;
        st.serialize_field("end_is_ordinary", &l.end_is_ordinary)?;
        st.serialize_field("status", &l.status)?;
        st.end()
    }
}

/// One key of a key-set, placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct KeyView {
    /// The key as stored.
    pub key: KeyOnMedia,
    /// Physical segment holding its data.
    pub pseg: u32,
    /// Device offset of its data.
    pub data_offset: u64,
    /// Current generation of that segment.
    pub segment_gen: u64,
    /// seg_gen < the segment's generation: the key is stale and replay drops it.
    pub stale: bool,
    /// CLEAN (miss fill) rather than dirty.
    pub clean: bool,
    /// Whether replay keeps it (current, overridden by later keys, stale).
    pub state: KeyState,
}

/// One valid log record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecordView {
    /// Position.
    pub pos: CachePos,
    /// Device offset.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// For a LAST record: where the log continues.
    pub next_cache_seg_id: Option<u32>,
    /// For a normal key-set: its keys.
    pub keys: Vec<KeyView>,
}

// ---------------------------------------------------------------------------
// Display
// ---------------------------------------------------------------------------

fn slot_verdict<R: DualRecord>(f: &mut fmt::Formatter<'_>, s: &SlotView<R>) -> fmt::Result {
    if s.valid {
        write!(f, "valid, seq {}", s.record.header().seq)
    } else if s.zero {
        write!(f, "empty (zero)")
    } else {
        write!(
            f,
            "invalid (CRC stored {:#010x}, computed {:#010x})",
            s.record.header().crc,
            s.computed_crc
        )
    }
}

fn cache_info_flags(flags: u32) -> String {
    let ci = CacheInfo {
        flags: flags.into(),
        ..Default::default()
    };
    let mut parts: Vec<String> = Vec::new();
    if ci.init_done() {
        parts.push("INIT_DONE".into());
    }
    if ci.data_crc() {
        parts.push("DATA_CRC".into());
    }
    parts.push(match ci.cache_mode() {
        0 => "mode writeback".into(),
        m => alloc::format!("mode {m} (unsupported)"),
    });
    parts.push(alloc::format!("gc_percent {}", ci.gc_percent()));
    parts.join(", ")
}

fn seg_line(s: &SegmentView) -> String {
    let mut out = String::new();
    let info_part = |out: &mut String| {
        for v in &s.info.slots {
            if v.slot == 1 {
                out.push_str(" |");
            }
            let r = v.record;
            let cur = if s.info.current == Some(v.slot) {
                "*"
            } else {
                ""
            };
            if v.valid {
                let next = if r.has_next() {
                    if r.next_seg == s.pseg + 1 {
                        String::from(" next +1")
                    } else {
                        alloc::format!(" next {}", r.next_seg)
                    }
                } else {
                    String::new()
                };
                out.push_str(&alloc::format!(
                    " slot{}{cur} seq {} flags {:#x}{next}",
                    v.slot,
                    r.header.seq,
                    r.flags
                ));
            } else if v.zero {
                out.push_str(&alloc::format!(" slot{} empty", v.slot));
            } else {
                out.push_str(&alloc::format!(" slot{} invalid", v.slot));
            }
        }
    };
    out.push_str("info");
    info_part(&mut out);
    out.push_str("; gen");
    for v in &s.gen.slots {
        if v.slot == 1 {
            out.push_str(" |");
        }
        let cur = if s.gen.current == Some(v.slot) {
            "*"
        } else {
            ""
        };
        if v.valid {
            out.push_str(&alloc::format!(
                " slot{}{cur} seq {} gen {}",
                v.slot,
                v.record.header.seq,
                v.record.gen
            ));
        } else if v.zero {
            out.push_str(&alloc::format!(" slot{} empty", v.slot));
        } else {
            out.push_str(&alloc::format!(" slot{} invalid", v.slot));
        }
    }
    match s.cache_seg {
        Some(c) if c == s.pseg => out.push_str("; in chain"),
        Some(c) => out.push_str(&alloc::format!("; cache segment {c}")),
        None => out.push_str("; not in chain"),
    }
    out
}

impl<P: Pmem + ?Sized> fmt::Display for InspectReport<'_, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sb = &self.superblock;
        writeln!(f, "device: {} bytes", self.device_size)?;
        writeln!(f, "superblock @{}: {}", sb.offset, sb.state)?;
        writeln!(
            f,
            "  crc {:#010x} (computed {:#010x}), flags {:#x}, magic {:#018x}, seg_num {}, pad {:#x}",
            sb.record.crc, sb.computed_crc, sb.record.flags, sb.record.magic, sb.record.seg_num, sb.record.pad
        )?;
        writeln!(
            f,
            "  inspecting {} segment(s) ({})",
            self.seg_num,
            if self.seg_num_source == SegNumSource::Superblock {
                "from the superblock"
            } else {
                "from the device size: the superblock is not valid"
            }
        )?;

        writeln!(f, "cache_info:")?;
        for s in &self.cache_info.slots {
            write!(f, "  slot {} @{}: ", s.slot, s.offset)?;
            slot_verdict(f, s)?;
            if s.valid {
                write!(
                    f,
                    ": seg_id {}, n_segs {}, flags {:#x} ({})",
                    s.record.seg_id,
                    s.record.n_segs,
                    s.record.flags,
                    cache_info_flags(s.record.flags.get())
                )?;
            }
            if self.cache_info.current == Some(s.slot) {
                write!(f, "  <- current")?;
            }
            writeln!(f)?;
        }
        if self.cache_info.current.is_none() {
            writeln!(
                f,
                "  no valid copy: an activation treats this as a new cache"
            )?;
        }

        for (name, t) in [
            ("key_tail", &self.key_tail),
            ("dirty_tail", &self.dirty_tail),
        ] {
            writeln!(f, "{name}:")?;
            for s in &t.slots {
                write!(f, "  slot {} @{}: ", s.slot, s.offset)?;
                slot_verdict(f, s)?;
                if s.valid {
                    write!(f, ": {}:{}", s.record.cache_seg_id, s.record.seg_off)?;
                }
                if t.current == Some(s.slot) {
                    write!(f, "  <- current")?;
                }
                writeln!(f)?;
            }
        }

        match &self.chain {
            None => writeln!(f, "chain: none (no valid cache_info)")?,
            Some(c) => {
                write!(f, "chain: {} of {} segment(s)", c.psegs.len(), c.n_segs)?;
                let identity = c.psegs.iter().enumerate().all(|(i, &p)| p == i as u32);
                if identity && !c.psegs.is_empty() {
                    write!(f, ", physical 0..={} in order", c.psegs.len() - 1)?;
                } else if let Some((first, rest)) = c.psegs.split_first() {
                    write!(f, ": {first}")?;
                    for p in rest {
                        write!(f, " -> {p}")?;
                    }
                }
                writeln!(f)?;
                if let Some(e) = &c.error {
                    writeln!(f, "  broken: {e}")?;
                }
                if !c.aliased.is_empty() {
                    writeln!(
                        f,
                        "  aliased: cache segment(s) {:?} reuse a physical segment already in the chain (Linux 7.2.13 and strict mode accept this; their data overwrite each other's; recover mode refuses it)",
                        c.aliased
                    )?;
                }
            }
        }

        let c = &self.segment_counts;
        writeln!(
            f,
            "segments ({}; {} listed, {} never written, {} beyond the --max-segments budget; * = current copy, identical neighbours grouped):",
            c.total, c.listed, c.unwritten, c.not_listed
        )?;
        // Streamed: a run of identical lines is printed when it ends.
        let mut run: Option<(u32, u32, String)> = None;
        let flush =
            |f: &mut fmt::Formatter<'_>, run: &mut Option<(u32, u32, String)>| match run.take() {
                Some((a, b, line)) if b > a => writeln!(f, "  {a}..={b}: {line}"),
                Some((a, _, line)) => writeln!(f, "  {a}: {line}"),
                None => Ok(()),
            };
        for item in self.segments() {
            match item {
                Ok(SegmentItem::Listed(v)) => {
                    let line = seg_line(&v);
                    match &mut run {
                        Some((_, b, l)) if *l == line && *b + 1 == v.pseg => *b = v.pseg,
                        _ => {
                            flush(f, &mut run)?;
                            run = Some((v.pseg, v.pseg, line));
                        }
                    }
                }
                Ok(SegmentItem::Unwritten(r)) => {
                    flush(f, &mut run)?;
                    writeln!(
                        f,
                        "  {}..={}: never written (the device holds no data for their metadata; they read as zero)",
                        r.first, r.last
                    )?;
                }
                Ok(SegmentItem::NotListed(r)) => {
                    flush(f, &mut run)?;
                    writeln!(
                        f,
                        "  {}..={}: not read (beyond the budget of {} segments)",
                        r.first, r.last, self.opts.max_segments
                    )?;
                }
                Err(e) => {
                    flush(f, &mut run)?;
                    writeln!(f, "  reading a segment failed: {e}")?;
                    break;
                }
            }
        }
        flush(f, &mut run)?;

        let l = &self.log;
        match (&l.start, &l.not_walked) {
            (_, Some(why)) => writeln!(f, "log: not walked: {why}")?,
            (Some(start), None) => {
                writeln!(
                    f,
                    "log from key_tail {start}: {} key-set(s), {} key(s), {} segment switch(es)",
                    l.ksets, l.keys, l.lasts
                )?;
                if let Some(st) = &l.status {
                    writeln!(f, "status after replay (as dmsetup status prints it): {st}")?;
                }
                for r in self.log_records() {
                    let r = match r {
                        Ok(r) => r,
                        Err(e) => {
                            writeln!(f, "  reading a record failed: {e}")?;
                            break;
                        }
                    };
                    match r.next_cache_seg_id {
                        Some(n) => writeln!(f, "  {} LAST -> cache segment {n}", r.pos)?,
                        None => {
                            writeln!(
                                f,
                                "  {} key-set, {} key(s), {} bytes",
                                r.pos,
                                r.keys.len(),
                                r.size
                            )?;
                            for k in &r.keys {
                                writeln!(
                                    f,
                                    "    off {:#x} len {} -> segment {} (physical {}) offset {} gen {}{}{}",
                                    k.key.off,
                                    k.key.len,
                                    k.key.cache_seg_id,
                                    k.pseg,
                                    k.key.cache_seg_off,
                                    k.key.seg_gen,
                                    if k.clean { " clean" } else { " dirty" },
                                    match k.state {
                                        KeyState::Current => "",
                                        KeyState::PartlyOverridden => " (partly overridden)",
                                        KeyState::Overridden => " (overridden)",
                                        KeyState::Stale => " (stale)",
                                        KeyState::Unknown => "",
                                    }
                                )?;
                            }
                        }
                    }
                }
                if l.truncated {
                    writeln!(
                        f,
                        "  ... {} more record(s) not listed",
                        (l.ksets + l.lasts).saturating_sub(l.listed)
                    )?;
                }
                if let (Some(e), Some(ordinary)) = (&l.end, l.end_is_ordinary) {
                    writeln!(
                        f,
                        "  log ends at {}: {}{}",
                        e.pos,
                        e.stop,
                        if ordinary {
                            ""
                        } else {
                            " (not an ordinary end: no kernel writes this record)"
                        }
                    )?;
                }
            }
            (None, None) => writeln!(f, "log: not walked")?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache_key::{KeyOnMedia, Kset};
    use crate::format::data_pos;
    use crate::pmem::SparsePmem;
    use crate::{activate, NoHooks, Options};
    use alloc::vec::Vec;

    /// A formatted device whose log holds `ksets` key-sets of `keys` keys each.
    fn with_log(ksets: usize, keys: usize) -> SparsePmem {
        let mut dev = SparsePmem::new(512 << 20);
        activate(&mut dev, &Options::default(), &mut NoHooks);
        let key = KeyOnMedia {
            off: 0.into(),
            len: 4096.into(),
            cache_seg_id: 1.into(),
            ..Default::default()
        };
        let rec = Kset::Keys {
            keys: alloc::vec![key; keys],
        }
        .to_bytes();
        for i in 0..ksets {
            dev.write_bytes(data_pos(0, (i * rec.len()) as u32), &rec)
                .unwrap();
        }
        dev
    }

    fn listed(rep: &InspectReport<'_, SparsePmem>) -> Vec<RecordView> {
        rep.log_records().map(Result::unwrap).collect()
    }

    #[test]
    fn listed_keys_are_bounded_and_every_key_is_counted() {
        let dev = with_log(3, 2);
        let opts = |records, keys| InspectOptions {
            max_log_records: records,
            max_log_keys: keys,
            ..Default::default()
        };
        let all = inspect(&dev, &opts(100, 100)).unwrap();
        let log = &all.log;
        assert_eq!((log.ksets, log.keys, listed(&all).len()), (3, 6, 3));
        assert!(!log.truncated);

        // Three keys allowed: the first record (2 keys) fits, the second would not.
        let rep = inspect(&dev, &opts(100, 3)).unwrap();
        assert_eq!(
            (rep.log.ksets, rep.log.keys),
            (3, 6),
            "every key is still counted"
        );
        let records = listed(&rep);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].keys.len(), 2);
        assert!(rep.log.truncated);

        let rep = inspect(&dev, &opts(2, 100)).unwrap();
        assert_eq!(listed(&rep).len(), 2);
        assert!(rep.log.truncated);
        // The JSON lists the same records.
        let j = serde_json::to_value(&rep).unwrap();
        assert_eq!(j["log"]["records"].as_array().unwrap().len(), 2);
    }

    /// A device claiming 16 TiB with the largest legal seg_num, holding only
    /// its superblock: the never-written segments are one range, not read one
    /// by one, and the JSON stays small.
    #[test]
    fn a_huge_sparse_device_costs_what_it_holds() {
        use crate::cache_dev::{max_seg_num, Superblock};
        use crate::format::{Record, CACHE_SEGS_MAX};
        let size = 16u64 << 40;
        let seg_num = max_seg_num(size);
        assert_eq!(seg_num, CACHE_SEGS_MAX - 1);
        let mut dev = SparsePmem::new(size);
        dev.write_bytes(SB_OFF, &Superblock::new(seg_num, 0).to_bytes())
            .unwrap();
        let rep = inspect(&dev, &InspectOptions::default()).unwrap();
        assert!(rep.superblock.state.is_valid());
        assert_eq!(
            rep.segment_counts,
            SegmentCounts {
                total: seg_num,
                listed: 0,
                unwritten: seg_num,
                not_listed: 0
            }
        );
        let ranges: Vec<SegmentRange> = rep.unwritten_segments().collect();
        assert_eq!(
            ranges,
            [SegmentRange {
                first: 0,
                last: seg_num - 1
            }]
        );
        let json = serde_json::to_vec(&rep).unwrap();
        assert!(json.len() < 4096, "{} bytes of JSON", json.len());
        let text = alloc::format!("{rep}");
        assert!(text.contains("0..=1048574: never written"), "{text}");
        assert!(text.len() < 4096, "{} bytes of text", text.len());

        // Metadata written in two segments far apart: those two are read and
        // listed, the runs around them are ranges.
        let far = seg_num - 7;
        for p in [3, far] {
            dev.write_bytes(seg_info_slot_off(p, 0), &[1u8; 16])
                .unwrap();
        }
        let rep = inspect(&dev, &InspectOptions::default()).unwrap();
        assert_eq!(rep.segment_counts.listed, 2);
        assert_eq!(rep.segment_counts.unwritten, seg_num - 2);
        let listed: Vec<u32> = rep
            .segments()
            .filter_map(|i| match i.unwrap() {
                SegmentItem::Listed(v) => Some(v.pseg),
                _ => None,
            })
            .collect();
        assert_eq!(listed, [3, far]);
        let ranges: Vec<SegmentRange> = rep.unwritten_segments().collect();
        assert_eq!(
            ranges,
            [
                SegmentRange { first: 0, last: 2 },
                SegmentRange {
                    first: 4,
                    last: far - 1
                },
                SegmentRange {
                    first: far + 1,
                    last: seg_num - 1
                },
            ]
        );
    }

    /// Every segment written: at most `max_segments` are read and listed, the
    /// rest is counted as one range.
    #[test]
    fn the_segment_budget_bounds_the_listing() {
        let dev = with_log(0, 0);
        let opts = InspectOptions {
            max_segments: 5,
            ..Default::default()
        };
        let rep = inspect(&dev, &opts).unwrap();
        assert_eq!(
            rep.segment_counts,
            SegmentCounts {
                total: 31,
                listed: 5,
                unwritten: 0,
                not_listed: 26
            }
        );
        let j = serde_json::to_value(&rep).unwrap();
        assert_eq!(j["segments"].as_array().unwrap().len(), 5);
        assert_eq!(j["segments"][4]["cache_seg"], 4);
        assert_eq!(j["segment_counts"]["not_listed"], 26);
        let text = alloc::format!("{rep}");
        assert!(
            text.contains("5..=30: not read (beyond the budget of 5 segments)"),
            "{text}"
        );
        // The chain and the log do not depend on the budget.
        assert_eq!(rep.chain.as_ref().unwrap().psegs.len(), 31);
        assert_eq!(rep.log.end.as_ref().unwrap().pos, CachePos::default());
    }
}
