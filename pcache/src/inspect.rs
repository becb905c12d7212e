//! Read-only inspection of a cache device, for people (`cargo xtask inspect`).
//!
//! [`inspect`] takes the device by shared reference: it cannot write. It reports
//! every record as found — both copies of every dual-copy record with their
//! CRC verdicts and which one is current — and walks the segment chain and the
//! key-set log from key_tail as far as the media allows, saying where and why
//! each stops. Any bytes give a report (or [`InspectError`] for a device that
//! is too small or cannot be read), never a panic. The JSON schema (serde) is
//! documented in `pcache/README.md`.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use serde::Serialize;

use crate::cache::{
    read_cache_info, read_tail, walk_chain, CacheInfo, CachePosOnMedia, ChainError,
};
use crate::cache_dev::{classify_sb, max_seg_num, read_sb, SbState, Superblock};
use crate::cache_key::{CachePos, KeyOnMedia, Kset, LogEnd, LogStep, LogWalker};
use crate::format::{
    cache_info_slot_off, seg_gen_slot_off, seg_info_slot_off, DualRecord, Record,
    CACHE_DEV_SIZE_MIN, CACHE_POS_STRIDE, DATA_SIZE, DIRTY_TAIL_OFF, KEY_F_CLEAN, KEY_TAIL_OFF,
    SB_OFF,
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

/// Options of an inspection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InspectOptions {
    /// At most this many log records are listed (all are counted).
    pub max_log_records: usize,
    /// At most this many keys are listed in all (all are counted): bounds the
    /// memory a hostile log of full key-sets can make the inspector use.
    pub max_log_keys: usize,
}

impl Default for InspectOptions {
    fn default() -> Self {
        InspectOptions {
            max_log_records: 100_000,
            max_log_keys: 100_000,
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

/// The key-set log from key_tail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogView {
    /// Where it starts (current key_tail), if the walk could start.
    pub start: Option<CachePos>,
    /// Why the log was not walked.
    pub not_walked: Option<String>,
    /// Normal key-sets found.
    pub ksets: u64,
    /// Keys in them.
    pub keys: u64,
    /// LAST records found.
    pub lasts: u64,
    /// Listed records (at most `max_log_records`, with at most `max_log_keys`
    /// keys in all).
    pub records: Vec<RecordView>,
    /// Whether records were left out of the list.
    pub truncated: bool,
    /// Where and why the log ends.
    pub end: Option<LogEnd>,
    /// The end as text.
    pub end_message: Option<String>,
    /// Whether the end is an ordinary end of a log (terminator, no magic, torn
    /// record) rather than a record no kernel writes.
    pub end_is_ordinary: Option<bool>,
}

/// Everything [`inspect`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InspectReport {
    /// Device size.
    pub device_size: u64,
    /// The superblock.
    pub superblock: SuperblockView,
    /// Segments inspected.
    pub seg_num: u32,
    /// Where `seg_num` comes from: `superblock`, or `device-size` when the
    /// superblock is not valid.
    pub seg_num_source: &'static str,
    /// cache_info copies.
    pub cache_info: DualView<CacheInfo>,
    /// key_tail copies.
    pub key_tail: DualView<CachePosOnMedia>,
    /// dirty_tail copies.
    pub dirty_tail: DualView<CachePosOnMedia>,
    /// The chain from the current cache_info (None without one).
    pub chain: Option<ChainView>,
    /// Every physical segment.
    pub segments: Vec<SegmentView>,
    /// The log from key_tail.
    pub log: LogView,
}

/// Inspects a device, read-only.
pub fn inspect<P: Pmem + ?Sized>(
    pmem: &P,
    opts: &InspectOptions,
) -> Result<InspectReport, InspectError> {
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
        SbState::Valid { seg_num, .. } => (seg_num, "superblock"),
        _ => (max_seg_num(size), "device-size"),
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

    let mut segments = Vec::with_capacity(seg_num as usize);
    for pseg in 0..seg_num {
        segments.push(SegmentView {
            pseg,
            offset: crate::format::seg_off(pseg),
            info: DualView::new(
                read_seg_info(pmem, pseg)?,
                seg_info_slot_off(pseg, 0),
                crate::format::SEG_INFO_SIZE,
            ),
            gen: DualView::new(
                read_seg_gen(pmem, pseg)?,
                seg_gen_slot_off(pseg, 0),
                crate::format::SEG_GEN_STRIDE,
            ),
            cache_seg: None,
        });
    }

    let chain = match cache_info.current_record() {
        None => None,
        Some(ci) => {
            let n_segs = ci.n_segs.get();
            let walk = walk_chain(pmem, ci.seg_id.get(), n_segs, seg_num, |_, _, _| true)?;
            Some(ChainView {
                psegs: walk.psegs,
                n_segs,
                error: walk.error,
            })
        }
    };
    if let Some(c) = &chain {
        for (i, &p) in c.psegs.iter().enumerate() {
            segments[p as usize].cache_seg = Some(i as u32);
        }
    }
    let log = walk(pmem, opts, chain.as_ref(), &key_tail, &segments);

    Ok(InspectReport {
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
        segments,
        log,
    })
}

fn walk<P: Pmem + ?Sized>(
    pmem: &P,
    opts: &InspectOptions,
    chain: Option<&ChainView>,
    key_tail: &DualView<CachePosOnMedia>,
    segs: &[SegmentView],
) -> LogView {
    let mut v = LogView {
        start: None,
        not_walked: None,
        ksets: 0,
        keys: 0,
        lasts: 0,
        records: Vec::new(),
        truncated: false,
        end: None,
        end_message: None,
        end_is_ordinary: None,
    };
    let Some(chain) = chain else {
        v.not_walked = Some("no valid cache_info, so no segment chain".into());
        return v;
    };
    if let Some(e) = &chain.error {
        v.not_walked = Some(alloc::format!("the segment chain is broken: {e}"));
        return v;
    }
    let Some(kt) = key_tail.current_record() else {
        v.not_walked = Some("key_tail has no valid copy".into());
        return v;
    };
    let start = kt.pos();
    if start.cache_seg_id as usize >= chain.psegs.len() || start.seg_off as u64 >= DATA_SIZE {
        v.not_walked = Some(alloc::format!(
            "key_tail {start} is out of range (n_segs {}, data area {DATA_SIZE} bytes)",
            chain.psegs.len()
        ));
        return v;
    }
    v.start = Some(start);
    let mut w = LogWalker::new(pmem, &chain.psegs, start);
    let mut listed_keys = 0usize;
    loop {
        match w.step() {
            LogStep::Record(r) => {
                let n_keys = match &r.kset {
                    Kset::Keys { keys } => keys.len(),
                    Kset::Last { .. } => 0,
                };
                // Decide before building the record's view, so that what is
                // not listed costs no memory.
                let list = v.records.len() < opts.max_log_records
                    && listed_keys + n_keys <= opts.max_log_keys;
                let pseg = chain.psegs[r.pos.cache_seg_id as usize];
                let mut rv = RecordView {
                    pos: r.pos,
                    offset: crate::format::data_pos(pseg, r.pos.seg_off),
                    size: r.kset.size() as u64,
                    next_cache_seg_id: None,
                    keys: Vec::new(),
                };
                match &r.kset {
                    Kset::Last { next_cache_seg_id } => {
                        v.lasts += 1;
                        rv.next_cache_seg_id = Some(*next_cache_seg_id);
                    }
                    Kset::Keys { keys } => {
                        v.ksets += 1;
                        v.keys += keys.len() as u64;
                        for k in keys.iter().filter(|_| list) {
                            // Validated by the decoder: cache_seg_id < n_segs.
                            let kp = chain.psegs[k.cache_seg_id.get() as usize];
                            let segment_gen = segs[kp as usize]
                                .gen
                                .current_record()
                                .map_or(0, |g| g.gen.get());
                            rv.keys.push(KeyView {
                                key: *k,
                                pseg: kp,
                                data_offset: crate::format::data_pos(kp, k.cache_seg_off.get()),
                                segment_gen,
                                stale: k.seg_gen.get() < segment_gen,
                                clean: k.flags.get() & KEY_F_CLEAN != 0,
                            });
                        }
                    }
                }
                if list {
                    listed_keys += n_keys;
                    v.records.push(rv);
                } else {
                    v.truncated = true;
                }
            }
            LogStep::End(e) => {
                v.end_message = Some(e.stop.to_string());
                v.end_is_ordinary = Some(e.stop.is_end_of_log());
                v.end = Some(e);
                return v;
            }
        }
    }
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

impl fmt::Display for InspectReport {
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
            if self.seg_num_source == "superblock" {
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
                } else if !c.psegs.is_empty() {
                    let list: Vec<String> = c.psegs.iter().map(|p| p.to_string()).collect();
                    write!(f, ": {}", list.join(" -> "))?;
                }
                writeln!(f)?;
                if let Some(e) = &c.error {
                    writeln!(f, "  broken: {e}")?;
                }
            }
        }

        writeln!(
            f,
            "segments ({}; * = current copy, identical neighbours grouped):",
            self.segments.len()
        )?;
        let mut i = 0;
        while i < self.segments.len() {
            let line = seg_line(&self.segments[i]);
            let mut j = i + 1;
            while j < self.segments.len() && seg_line(&self.segments[j]) == line {
                j += 1;
            }
            if j - i > 1 {
                writeln!(f, "  {}..={}: {line}", i, j - 1)?;
            } else {
                writeln!(f, "  {i}: {line}")?;
            }
            i = j;
        }

        let l = &self.log;
        match (&l.start, &l.not_walked) {
            (_, Some(why)) => writeln!(f, "log: not walked: {why}")?,
            (Some(start), None) => {
                writeln!(
                    f,
                    "log from key_tail {start}: {} key-set(s), {} key(s), {} segment switch(es)",
                    l.ksets, l.keys, l.lasts
                )?;
                for r in &l.records {
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
                                    if k.stale { " (stale)" } else { "" }
                                )?;
                            }
                        }
                    }
                }
                if l.truncated {
                    writeln!(
                        f,
                        "  ... {} more record(s) not listed",
                        l.ksets + l.lasts - l.records.len() as u64
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

    #[test]
    fn listed_keys_are_bounded_and_every_key_is_counted() {
        let dev = with_log(3, 2);
        let opts = |records, keys| InspectOptions {
            max_log_records: records,
            max_log_keys: keys,
        };
        let all = inspect(&dev, &opts(100, 100)).unwrap();
        let log = all.log;
        assert_eq!((log.ksets, log.keys, log.records.len()), (3, 6, 3));
        assert!(!log.truncated);

        // Three keys allowed: the first record (2 keys) fits, the second would not.
        let log = inspect(&dev, &opts(100, 3)).unwrap().log;
        assert_eq!((log.ksets, log.keys), (3, 6), "every key is still counted");
        assert_eq!(log.records.len(), 1);
        assert_eq!(log.records[0].keys.len(), 2);
        assert!(log.truncated);

        let log = inspect(&dev, &opts(2, 100)).unwrap().log;
        assert_eq!(log.records.len(), 2);
        assert!(log.truncated);
    }
}
