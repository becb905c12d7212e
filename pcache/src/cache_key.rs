//! The key-set log (kernel `cache_key.c`): walking the records from a position
//! (`docs/format.md` §5.8, §9.2), with every header and key validated before it is used.
//!
//! Every activation of an existing cache replays the log ([`replay`]) into
//! the index of the keys in force ([`KeyIndex`]).

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use serde::Serialize;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::format::{
    crc32c_raw, data_pos, le, pcache_crc, CACHE_SUBTREE_SIZE, DATA_SIZE, KEY_F_CLEAN, KEY_SIZE,
    KSET_F_LAST, KSET_HEADER_SIZE, KSET_KEYS_MAX, KSET_MAGIC, KSET_ONMEDIA_SIZE_MAX, SECTOR_SIZE,
};
use crate::hooks::{CrashPoint, Hooks};
use crate::pmem::{write_words, Pmem, PmemError};

// ---------------------------------------------------------------------------
// On-media records: the key (`docs/format.md` §5.7) and the key-set (§5.8)
// ---------------------------------------------------------------------------

/// `struct pcache_cache_key_onmedia`, 40 bytes (`docs/format.md` §5.7).
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
pub struct KeyOnMedia {
    /// Logical byte offset on the backing device.
    #[serde(serialize_with = "le")]
    pub off: U64,
    /// Length in bytes.
    #[serde(serialize_with = "le")]
    pub len: U32,
    /// Flags (EMPTY, CLEAN).
    #[serde(serialize_with = "le")]
    pub flags: U32,
    /// Cache segment holding the data.
    #[serde(serialize_with = "le")]
    pub cache_seg_id: U32,
    /// Offset of the data inside that segment's data area.
    #[serde(serialize_with = "le")]
    pub cache_seg_off: U32,
    /// Generation of the segment at allocation time.
    #[serde(serialize_with = "le")]
    pub seg_gen: U64,
    /// CRC of the data (DATA_CRC caches only).
    #[serde(serialize_with = "le")]
    pub data_crc: U32,
    /// Reserved (0).
    #[serde(serialize_with = "le")]
    pub reserved: U32,
}

const _: () = assert!(core::mem::size_of::<KeyOnMedia>() == KEY_SIZE);

impl KeyOnMedia {
    /// Checks every value a reader would use as an index or a length, against a
    /// chain of `n_segs` segments (`docs/format.md` §5.7; bounds no kernel version checks).
    pub fn validate(&self, n_segs: u32) -> Result<(), KeyError> {
        let (off, len, flags) = (self.off.get(), self.len.get(), self.flags.get());
        let (cache_seg_id, cache_seg_off) = (self.cache_seg_id.get(), self.cache_seg_off.get());
        if len == 0 {
            return Err(KeyError::ZeroLength);
        }
        if off % SECTOR_SIZE != 0 || len as u64 % SECTOR_SIZE != 0 {
            return Err(KeyError::Unaligned { off, len });
        }
        if len as u64 > CACHE_SUBTREE_SIZE
            || (off % CACHE_SUBTREE_SIZE) + len as u64 > CACHE_SUBTREE_SIZE
        {
            return Err(KeyError::CrossesSubtree { off, len });
        }
        if off.checked_add(len as u64).is_none() {
            return Err(KeyError::CrossesSubtree { off, len });
        }
        if flags & !(KEY_F_CLEAN) != 0 {
            return Err(KeyError::Flags { flags });
        }
        if cache_seg_id >= n_segs {
            return Err(KeyError::SegmentOutOfRange {
                cache_seg_id,
                n_segs,
            });
        }
        if cache_seg_off as u64 + len as u64 > DATA_SIZE {
            return Err(KeyError::BeyondDataArea { cache_seg_off, len });
        }
        Ok(())
    }
}

/// Why an on-media key is impossible.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum KeyError {
    /// `len` is 0.
    #[error("length 0")]
    ZeroLength,
    /// `off` or `len` is not a multiple of 512.
    #[error("offset {off:#x} or length {len} is not sector aligned")]
    Unaligned {
        /// Logical offset.
        off: u64,
        /// Length.
        len: u32,
    },
    /// The key crosses a 4 MiB-aligned logical boundary.
    #[error("range {off:#x}+{len} crosses a 4 MiB logical boundary")]
    CrossesSubtree {
        /// Logical offset.
        off: u64,
        /// Length.
        len: u32,
    },
    /// Flags other than CLEAN (EMPTY is never persisted).
    #[error("flags {flags:#x} (only CLEAN may be persisted)")]
    Flags {
        /// Flags found.
        flags: u32,
    },
    /// `cache_seg_id` is not in the chain.
    #[error("cache segment {cache_seg_id} out of range (n_segs {n_segs})")]
    SegmentOutOfRange {
        /// Cache segment id found.
        cache_seg_id: u32,
        /// Chain length.
        n_segs: u32,
    },
    /// The data would cross the end of the segment's data area.
    #[error(
        "data at segment offset {cache_seg_off} length {len} crosses the end of the data area"
    )]
    BeyondDataArea {
        /// Offset in the data area.
        cache_seg_off: u32,
        /// Length.
        len: u32,
    },
}

// ---------------------------------------------------------------------------

/// `struct pcache_cache_kset_onmedia` header, 24 bytes (`docs/format.md` §5.8). Its CRC covers
/// bytes 4.. of the header and the keys that follow it.
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
pub struct KsetHeader {
    /// Stored CRC.
    #[serde(serialize_with = "le")]
    pub crc: U32,
    /// Number of keys (normal) or next log segment's cache id (LAST).
    #[serde(serialize_with = "le")]
    pub key_num: U32,
    /// [`KSET_MAGIC`].
    #[serde(serialize_with = "le")]
    pub magic: U64,
    /// Flags (bit 0 LAST).
    #[serde(serialize_with = "le")]
    pub flags: U64,
}

const _: () = assert!(core::mem::size_of::<KsetHeader>() == KSET_HEADER_SIZE);

impl KsetHeader {
    /// LAST flag.
    pub fn is_last(&self) -> bool {
        self.flags.get() & KSET_F_LAST != 0
    }
}

/// A valid key-set log record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Kset {
    /// A normal key-set with 1..=128 keys.
    Keys {
        /// The keys, in log order.
        keys: Vec<KeyOnMedia>,
    },
    /// A chain link: the log continues at data offset 0 of this cache segment.
    Last {
        /// Next log segment (cache segment id).
        next_cache_seg_id: u32,
    },
}

impl Kset {
    /// Size of the record on media.
    pub fn size(&self) -> usize {
        match self {
            Kset::Keys { keys } => KSET_HEADER_SIZE + keys.len() * KEY_SIZE,
            Kset::Last { .. } => KSET_HEADER_SIZE,
        }
    }

    /// Encodes the record with magic and CRC.
    pub fn to_bytes(&self) -> Vec<u8> {
        let (key_num, flags, keys): (u32, u64, &[KeyOnMedia]) = match self {
            Kset::Keys { keys } => (keys.len() as u32, 0, keys),
            Kset::Last { next_cache_seg_id } => (*next_cache_seg_id, KSET_F_LAST, &[]),
        };
        let mut hdr = KsetHeader {
            crc: U32::ZERO,
            key_num: key_num.into(),
            magic: KSET_MAGIC.into(),
            flags: flags.into(),
        };
        // The CRC register has no final inversion, so it continues over the keys.
        let crc = crc32c_raw(pcache_crc(&hdr.as_bytes()[4..]), keys.as_bytes());
        hdr.crc.set(crc);
        let mut b = Vec::with_capacity(self.size());
        b.extend_from_slice(hdr.as_bytes());
        b.extend_from_slice(keys.as_bytes());
        b
    }
}

/// Why the bytes at a log position are not a valid key-set record.
///
/// [`KsetError::is_end_of_log`] tells the ordinary ends of a log (a terminator,
/// a record that never was, a torn record) from records that a kernel can never
/// have written: those have the key-set magic and a consistent CRC coverage but an
/// impossible value, and mean a crafted or corrupted image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum KsetError {
    /// 24 zero bytes: the terminator the writer leaves after the last record.
    #[error("terminator (zero record)")]
    Terminator,
    /// No key-set magic.
    #[error("no key-set magic (found {magic:#018x})")]
    NoMagic {
        /// Magic found.
        magic: u64,
    },
    /// The record's CRC does not match (a torn or never-completed write).
    #[error("CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    CrcMismatch {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// Fewer than 24 bytes are left in the data area at this position.
    #[error("only {space} bytes left in the data area, a record needs at least 24")]
    NoRoom {
        /// Bytes left.
        space: u64,
    },
    /// The header claims a record reaching past the data area, so its CRC
    /// cannot be checked: a torn or stale record (end of log).
    #[error("the header claims {size} bytes but only {space} are left in the data area (CRC cannot be checked)")]
    CrcUnverifiable {
        /// Claimed record size.
        size: u64,
        /// Bytes left.
        space: u64,
    },
    /// A normal key-set with a valid CRC and `key_num` 0 or above 128.
    #[error("key_num {key_num} out of range (1..=128)")]
    KeyNumOutOfRange {
        /// key_num found.
        key_num: u32,
    },
    /// A key-set with a valid CRC that leaves no room in the data area for the
    /// terminator the writer always leaves after it.
    #[error("key-set of {size} bytes does not fit in the {space} bytes left in the data area")]
    TooLarge {
        /// Record size.
        size: u64,
        /// Bytes left.
        space: u64,
    },
    /// Flag bits other than LAST.
    #[error("unknown key-set flags {flags:#x}")]
    Flags {
        /// Flags found.
        flags: u64,
    },
    /// A LAST record pointing outside the chain.
    #[error("next segment id {next_cache_seg_id} out of range (n_segs {n_segs})")]
    NextSegmentOutOfRange {
        /// Next cache segment id found.
        next_cache_seg_id: u32,
        /// Chain length.
        n_segs: u32,
    },
    /// A key with an impossible value.
    #[error("key {index}: {error}")]
    BadKey {
        /// Index of the key in the record.
        index: u32,
        /// What is wrong.
        error: KeyError,
    },
}

impl KsetError {
    /// True for the ordinary ends of a log (terminator, no magic, torn record);
    /// false for records no kernel writes (a crafted or corrupted image).
    pub fn is_end_of_log(&self) -> bool {
        matches!(
            self,
            KsetError::Terminator
                | KsetError::NoMagic { .. }
                | KsetError::CrcMismatch { .. }
                | KsetError::CrcUnverifiable { .. }
        )
    }
}

/// Decodes and validates the key-set record at the start of `buf`, which holds
/// the bytes from the record's position to the end of the segment's data area
/// (or fewer: what could be read). `n_segs` bounds segment ids.
///
/// Order of checks: room for a header; magic (absent ⇒ end of log); the CRC
/// over the bytes the header claims (mismatch, or a claim reaching past the
/// data area so that no CRC can be checked ⇒ end of log: a torn or stale
/// record, which is what the kernel's replay sees too); then, for a record
/// whose CRC is valid, every value (key_num 1..=128, room for the terminator
/// the writer leaves, flags, next segment, keys): a valid CRC over an
/// impossible value is a record no kernel writes.
pub fn decode_kset(buf: &[u8], n_segs: u32) -> Result<Kset, KsetError> {
    decode_kset_with(buf, n_segs, Rules::Ours)
}

/// Which validity rules a log reader applies to records that no kernel
/// writes but that carry a valid CRC (`docs/format.md` §9.2, §13).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rules {
    /// Every value checked: such a record is refused for what is wrong with it.
    #[default]
    Ours,
    /// Linux 7.2.13's replay (strict mode): a key_num 0 record is an empty
    /// key-set, flag bits above LAST are ignored, and a record only has to
    /// fit in what remains of the data area (no room for a terminator needed).
    Kernel,
}

/// [`decode_kset`] under the given rules.
pub fn decode_kset_with(buf: &[u8], n_segs: u32, rules: Rules) -> Result<Kset, KsetError> {
    let kernel = rules == Rules::Kernel;
    let Ok((hdr, _)) = KsetHeader::read_from_prefix(buf) else {
        return Err(KsetError::NoRoom {
            space: buf.len() as u64,
        });
    };
    let (key_num, magic) = (hdr.key_num.get(), hdr.magic.get());
    if magic != KSET_MAGIC {
        if hdr == KsetHeader::new_zeroed() {
            return Err(KsetError::Terminator);
        }
        return Err(KsetError::NoMagic { magic });
    }
    // The size the header claims (u64: key_num is untrusted).
    let size = if hdr.is_last() {
        KSET_HEADER_SIZE as u64
    } else {
        KSET_HEADER_SIZE as u64 + key_num as u64 * KEY_SIZE as u64
    };
    if size > buf.len() as u64 {
        return Err(KsetError::CrcUnverifiable {
            size,
            space: buf.len() as u64,
        });
    }
    let size = size as usize;
    let computed = pcache_crc(&buf[4..size]);
    if computed != hdr.crc.get() {
        return Err(KsetError::CrcMismatch {
            stored: hdr.crc.get(),
            computed,
        });
    }
    if !hdr.is_last() {
        if kernel && key_num == 0 {
            // cache_key.c replays past it as an empty key-set.
            return Ok(Kset::Keys { keys: Vec::new() });
        }
        if key_num == 0 || key_num > KSET_KEYS_MAX {
            return Err(KsetError::KeyNumOutOfRange { key_num });
        }
        // The writer leaves room for a terminator after every normal record
        // (the kernel only requires the record itself to fit).
        let needed = if kernel {
            size
        } else {
            size + KSET_HEADER_SIZE
        };
        if needed > buf.len() {
            return Err(KsetError::TooLarge {
                size: size as u64,
                space: buf.len() as u64,
            });
        }
    }
    if !kernel && hdr.flags.get() & !KSET_F_LAST != 0 {
        return Err(KsetError::Flags {
            flags: hdr.flags.get(),
        });
    }
    if hdr.is_last() {
        if key_num >= n_segs {
            return Err(KsetError::NextSegmentOutOfRange {
                next_cache_seg_id: key_num,
                n_segs,
            });
        }
        return Ok(Kset::Last {
            next_cache_seg_id: key_num,
        });
    }
    // `size` bytes are in `buf` (checked above), so the keys are too.
    let keys = <[KeyOnMedia]>::ref_from_bytes(&buf[KSET_HEADER_SIZE..size]).map_err(|_| {
        KsetError::CrcUnverifiable {
            size: size as u64,
            space: buf.len() as u64,
        }
    })?;
    for (i, key) in keys.iter().enumerate() {
        key.validate(n_segs).map_err(|error| KsetError::BadKey {
            index: i as u32,
            error,
        })?;
    }
    Ok(Kset::Keys {
        keys: keys.to_vec(),
    })
}

// ---------------------------------------------------------------------------
// The log walk (`docs/format.md` §9.2)
// ---------------------------------------------------------------------------

/// A position in the cache: cache segment id and offset in its data area.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct CachePos {
    /// Cache segment id (chain index).
    pub cache_seg_id: u32,
    /// Offset inside the segment's data area.
    pub seg_off: u32,
}

impl core::fmt::Display for CachePos {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}:{}", self.cache_seg_id, self.seg_off)
    }
}

/// A valid record of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogRecord {
    /// Where the record starts.
    pub pos: CachePos,
    /// The record.
    pub kset: Kset,
}

/// Why the walk stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum LogStop {
    /// The bytes at `pos` are not a valid record. For a terminator, missing
    /// magic or CRC mismatch that is the ordinary end of the log
    /// ([`KsetError::is_end_of_log`]); anything else is a record no kernel writes.
    #[error("{error}")]
    Invalid {
        /// The bytes that were tried.
        error: KsetError,
    },
    /// A LAST record leads back to a segment the log already went through.
    #[error(
        "LAST record leads back to cache segment {next_cache_seg_id}, already in the log (loop)"
    )]
    Loop {
        /// The segment revisited.
        next_cache_seg_id: u32,
    },
    /// A read failed.
    #[error("read failed: {error}")]
    Io {
        /// The error.
        error: PmemError,
    },
}

impl LogStop {
    /// Whether this is the ordinary end of a log (not a crafted image).
    pub fn is_end_of_log(&self) -> bool {
        matches!(self, LogStop::Invalid { error } if error.is_end_of_log())
    }
}

/// The end of a walk: the position where it stopped and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogEnd {
    /// Position of the record that ended the log.
    pub pos: CachePos,
    /// Why it ended there.
    pub stop: LogStop,
}

/// One step of a walk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogStep {
    /// A valid record; the walk continues after it.
    Record(LogRecord),
    /// The walk ended.
    End(LogEnd),
}

/// Walks the log from a position through the chain `chain` (cache segment id ->
/// physical segment id). Terminates on any media: inside a segment the offset
/// only grows, and a LAST record may not lead to a segment already visited.
pub struct LogWalker<'a, P: Pmem + ?Sized> {
    pmem: &'a P,
    chain: &'a [u32],
    pos: CachePos,
    visited: Vec<bool>,
    buf: Vec<u8>,
    rules: Rules,
}

impl<P: Pmem + ?Sized> core::fmt::Debug for LogWalker<'_, P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LogWalker")
            .field("chain_len", &self.chain.len())
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl<'a, P: Pmem + ?Sized> LogWalker<'a, P> {
    /// Starts at `start`, which the caller has bounds-checked (cache_seg_id <
    /// chain.len(), seg_off < data_size).
    pub fn new(pmem: &'a P, chain: &'a [u32], start: CachePos) -> Self {
        let mut visited = vec![false; chain.len()];
        if let Some(v) = visited.get_mut(start.cache_seg_id as usize) {
            *v = true;
        }
        LogWalker {
            pmem,
            chain,
            pos: start,
            visited,
            buf: vec![0u8; KSET_ONMEDIA_SIZE_MAX + KSET_HEADER_SIZE],
            rules: Rules::Ours,
        }
    }

    /// The same walker, validating records under `rules`.
    pub fn with_rules(mut self, rules: Rules) -> Self {
        self.rules = rules;
        self
    }

    /// The position of the next record.
    pub fn pos(&self) -> CachePos {
        self.pos
    }

    /// Reads and validates the record at the current position and advances
    /// past it. An `End` does not advance: calling again returns it again.
    pub fn step(&mut self) -> LogStep {
        let pos = self.pos;
        let end = |stop| LogStep::End(LogEnd { pos, stop });
        let n_segs = self.chain.len() as u32;
        let Some(&pseg) = self.chain.get(pos.cache_seg_id as usize) else {
            // Callers bound the start; LAST records are checked below.
            return end(LogStop::Invalid {
                error: KsetError::NextSegmentOutOfRange {
                    next_cache_seg_id: pos.cache_seg_id,
                    n_segs,
                },
            });
        };
        let space = DATA_SIZE.saturating_sub(pos.seg_off as u64);
        let len = core::cmp::min(space, self.buf.len() as u64) as usize;
        if let Err(error) = self
            .pmem
            .read(data_pos(pseg, pos.seg_off), &mut self.buf[..len])
        {
            return end(LogStop::Io { error });
        }
        let decoded = match decode_kset_with(&self.buf[..len], n_segs, self.rules) {
            // The header claims more than any record the kernel writes, but
            // within the data area: read the whole claim so its CRC can be
            // checked (valid: a hostile record; invalid: a torn one, the end).
            // Bounded by the data area (16 MiB), and only for the record that
            // ends the log.
            Err(KsetError::CrcUnverifiable { size, .. }) if size <= space => {
                let want = core::cmp::min(space, size + KSET_HEADER_SIZE as u64) as usize;
                let mut whole = vec![0u8; want];
                if let Err(error) = self.pmem.read(data_pos(pseg, pos.seg_off), &mut whole) {
                    return end(LogStop::Io { error });
                }
                decode_kset_with(&whole, n_segs, self.rules)
            }
            other => other,
        };
        let kset = match decoded {
            Ok(k) => k,
            Err(error) => {
                return end(LogStop::Invalid { error });
            }
        };
        match kset {
            Kset::Last { next_cache_seg_id } => {
                let v = &mut self.visited[next_cache_seg_id as usize];
                if *v {
                    return end(LogStop::Loop { next_cache_seg_id });
                }
                *v = true;
                self.pos = CachePos {
                    cache_seg_id: next_cache_seg_id,
                    seg_off: 0,
                };
            }
            Kset::Keys { .. } => {
                self.pos.seg_off += kset.size() as u32;
            }
        }
        LogStep::Record(LogRecord { pos, kset })
    }
}

/// Counts of a walked log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LogSummary {
    /// Normal key-sets.
    pub ksets: u64,
    /// Keys in them.
    pub keys: u64,
    /// LAST records (segment switches).
    pub lasts: u64,
    /// Where and why the log ends.
    pub end: Option<LogEnd>,
}

/// Walks the whole log from `start`, calling `each` on every valid record.
pub fn walk_log<P: Pmem + ?Sized>(
    pmem: &P,
    chain: &[u32],
    start: CachePos,
    each: impl FnMut(&LogRecord),
) -> LogSummary {
    walk_log_with(pmem, chain, start, Rules::Ours, each)
}

/// [`walk_log`] under the given rules.
pub fn walk_log_with<P: Pmem + ?Sized>(
    pmem: &P,
    chain: &[u32],
    start: CachePos,
    rules: Rules,
    mut each: impl FnMut(&LogRecord),
) -> LogSummary {
    let mut w = LogWalker::new(pmem, chain, start).with_rules(rules);
    let mut s = LogSummary::default();
    loop {
        match w.step() {
            LogStep::Record(r) => {
                match &r.kset {
                    Kset::Keys { keys } => {
                        s.ksets += 1;
                        s.keys += keys.len() as u64;
                    }
                    Kset::Last { .. } => s.lasts += 1,
                }
                each(&r);
            }
            LogStep::End(e) => {
                s.end = Some(e);
                return s;
            }
        }
    }
}

/// The keys of a record, if it is a normal key-set.
pub fn record_keys(r: &LogRecord) -> &[KeyOnMedia] {
    match &r.kset {
        Kset::Keys { keys } => keys,
        Kset::Last { .. } => &[],
    }
}

// ---------------------------------------------------------------------------
// The index of keys in force, and replay (`docs/format.md` §9.2)
// ---------------------------------------------------------------------------

/// Logical bytes `[off, off + len)` are cached at `(cache_seg_id,
/// cache_seg_off)` of the data area.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Extent {
    /// Logical byte offset.
    pub off: u64,
    /// Length in bytes.
    pub len: u32,
    /// Cache segment holding the data.
    pub cache_seg_id: u32,
    /// Offset of the data in that segment's data area.
    pub cache_seg_off: u32,
    /// Generation of the segment the key was written under.
    pub seg_gen: u64,
    /// A miss-fill key (data equals the backing device's).
    pub clean: bool,
}

impl Extent {
    /// One past the last logical byte.
    pub fn end(&self) -> u64 {
        self.off + self.len as u64
    }
}

/// The keys in force, by logical offset, never overlapping: an insert
/// overrides what earlier extents held on its range, trimming or splitting
/// them, as the kernel's index fixups do (a later key wins).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyIndex {
    map: BTreeMap<u64, Extent>,
}

impl KeyIndex {
    /// Inserts `e` over whatever the index held on its range.
    pub fn insert(&mut self, e: Extent) {
        self.insert_returning(e);
    }

    /// Takes back an [`KeyIndex::insert_returning`] of `e` that returned
    /// `removed`: the index is as before the insert.
    pub fn undo_insert(&mut self, e: Extent, removed: Vec<Extent>) {
        self.map.remove(&e.off);
        for x in &removed {
            if x.off < e.off {
                self.map.remove(&x.off);
            }
            if x.end() > e.end() {
                self.map.remove(&e.end());
            }
        }
        for x in removed {
            self.map.insert(x.off, x);
        }
    }

    /// Removes the extent starting at `off`.
    pub fn remove(&mut self, off: u64) -> Option<Extent> {
        self.map.remove(&off)
    }

    /// The first extent starting at or after `off`.
    pub fn next_at_or_after(&self, off: u64) -> Option<&Extent> {
        self.map.range(off..).next().map(|(_, x)| x)
    }

    /// [`KeyIndex::insert`], returning the extents it overrode, as they were.
    pub fn insert_returning(&mut self, e: Extent) -> Vec<Extent> {
        let mut removed = Vec::new();
        let (start, end) = (e.off, e.end());
        let mut overlapped: Vec<u64> = Vec::new();
        if let Some((&k, x)) = self.map.range(..start).next_back() {
            if x.end() > start {
                overlapped.push(k);
            }
        }
        overlapped.extend(self.map.range(start..end).map(|(&k, _)| k));
        for k in overlapped {
            let Some(x) = self.map.remove(&k) else {
                continue;
            };
            removed.push(x);
            if x.off < start {
                self.map.insert(
                    x.off,
                    Extent {
                        len: (start - x.off) as u32,
                        ..x
                    },
                );
            }
            if x.end() > end {
                let cut = (end - x.off) as u32;
                self.map.insert(
                    end,
                    Extent {
                        off: end,
                        len: x.len - cut,
                        cache_seg_off: x.cache_seg_off + cut,
                        ..x
                    },
                );
            }
        }
        self.map.insert(start, e);
        removed
    }

    /// The extent holding logical byte `off`, if one does.
    pub fn lookup(&self, off: u64) -> Option<&Extent> {
        self.map
            .range(..=off)
            .next_back()
            .map(|(_, x)| x)
            .filter(|x| x.end() > off)
    }

    /// The extents in logical order.
    pub fn extents(&self) -> impl Iterator<Item = &Extent> + '_ {
        self.map.values()
    }

    /// How many extents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// What a replay rebuilt.
#[derive(Clone, Debug)]
pub struct Replayed {
    /// The keys in force.
    pub index: KeyIndex,
    /// Where the next key-set goes: the first record that is not valid.
    pub key_head: CachePos,
    /// Where and why the walk ended; the caller decides whether that end is
    /// the ordinary end of a log ([`LogStop::is_end_of_log`]).
    pub end: LogEnd,
    /// Where every valid record starts, in log order.
    pub records: Vec<CachePos>,
    /// Per cache segment: keys referring to it (valid ones only, as Linux
    /// 7.2.13's replay counts them).
    pub refs: Vec<u32>,
    /// Per cache segment: in use (a log segment walked, or data of a valid key).
    pub used: Vec<bool>,
    /// Counts of the walk.
    pub log: LogSummary,
    /// Keys dropped because their segment's generation moved on.
    pub stale: u64,
}

/// Why a log cannot be replayed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ReplayError {
    /// A key's data does not match its CRC (data-CRC caches; checked before
    /// the generation, as the kernel does).
    #[error(
        "key at {pos}, logical {off:#x}+{len}: data CRC {computed:#010x}, stored {stored:#010x}"
    )]
    DataCrc {
        /// The key-set holding the key.
        pos: CachePos,
        /// Logical offset.
        off: u64,
        /// Length.
        len: u32,
        /// CRC of the data found.
        computed: u32,
        /// CRC the key carries.
        stored: u32,
    },
    /// A read failed.
    #[error("reading key data: {error}")]
    Io {
        /// The error.
        error: PmemError,
    },
}

/// Replays the log from `start` through the chain `chain` (cache segment ->
/// physical segment), with `gens` the generation of each cache segment:
/// every record validated as [`LogWalker`] does (the walk's end is returned
/// for the caller to judge), every valid key inserted
/// into the index in log order, keys whose generation is behind their
/// segment's dropped (with no reference, as in 7.2.13). With `data_crc`,
/// each key's data is checked: first under the kernel's rules, after the
/// generation (a stale key is never read) under ours. Bounded by the log's validation: at
/// most one pass over each segment's data area.
pub fn replay<P: Pmem + ?Sized>(
    pmem: &P,
    chain: &[u32],
    gens: &[u64],
    start: CachePos,
    data_crc: bool,
    rules: Rules,
) -> Result<Replayed, ReplayError> {
    let n = chain.len();
    let mut out = Replayed {
        index: KeyIndex::default(),
        key_head: start,
        end: LogEnd {
            pos: start,
            stop: LogStop::Invalid {
                error: KsetError::Terminator,
            },
        },
        records: Vec::new(),
        refs: vec![0; n],
        used: vec![false; n],
        log: LogSummary::default(),
        stale: 0,
    };
    if let Some(u) = out.used.get_mut(start.cache_seg_id as usize) {
        *u = true;
    }
    let mut error: Option<ReplayError> = None;
    let mut data = Vec::new();
    let log = walk_log_with(pmem, chain, start, rules, |r| {
        if error.is_some() {
            return;
        }
        out.records.push(r.pos);
        let keys = match &r.kset {
            Kset::Last { next_cache_seg_id } => {
                out.used[*next_cache_seg_id as usize] = true;
                return;
            }
            Kset::Keys { keys } => keys,
        };
        for k in keys {
            // The walker validated the key: its segment is in the chain and
            // its data inside the data area.
            let cseg = k.cache_seg_id.get() as usize;
            let (off, len) = (k.off.get(), k.len.get());
            let stale = k.seg_gen.get() < gens.get(cseg).copied().unwrap_or(0);
            // The kernel checks the data CRC before the generation, so a
            // stale key whose segment was reused fails activation
            // (`docs/format.md` §10.4); ours drops a stale key unread.
            if stale && rules == Rules::Ours {
                out.stale += 1;
                continue;
            }
            if data_crc {
                data.resize(len as usize, 0);
                let at = data_pos(chain[cseg], k.cache_seg_off.get());
                if let Err(e) = pmem.read(at, &mut data) {
                    error = Some(ReplayError::Io { error: e });
                    return;
                }
                let computed = pcache_crc(&data);
                if computed != k.data_crc.get() {
                    error = Some(ReplayError::DataCrc {
                        pos: r.pos,
                        off,
                        len,
                        computed,
                        stored: k.data_crc.get(),
                    });
                    return;
                }
            }
            if stale {
                out.stale += 1;
                continue;
            }
            out.used[cseg] = true;
            out.refs[cseg] += 1;
            out.index.insert(Extent {
                off,
                len,
                cache_seg_id: cseg as u32,
                cache_seg_off: k.cache_seg_off.get(),
                seg_gen: k.seg_gen.get(),
                clean: k.flags.get() & KEY_F_CLEAN != 0,
            });
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    out.end = log.end.clone().expect("a walk always ends");
    out.key_head = out.end.pos;
    out.log = log;
    Ok(out)
}

// ---------------------------------------------------------------------------
// Appending to the log (`cache_key_append`, `cache_kset_close`; `docs/format.md` §9.3)
// ---------------------------------------------------------------------------

/// Why a key-set could not be closed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AppendError {
    /// The log needs a new segment and none is free (the kernel's EBUSY;
    /// until GC exists nothing frees one).
    #[error("cache full: the key-set log needs a new segment and none is free")]
    CacheFull,
    /// key_head leaves no room for the LAST record a segment switch writes
    /// (only a CRC-valid record that fills its segment, which strict mode
    /// replays as the kernel does, can put it there; the kernel would write
    /// past the data area).
    #[error("key_head {key_head} leaves no room for a LAST record")]
    NoRoomForLast {
        /// key_head.
        key_head: CachePos,
    },
    /// A store or fence failed.
    #[error("{error}")]
    Pmem {
        /// The error.
        error: PmemError,
    },
}

impl From<PmemError> for AppendError {
    fn from(error: PmemError) -> Self {
        AppendError::Pmem { error }
    }
}

/// The 24 zero bytes written after every record (`pcache_empty_kset`).
const TERMINATOR: [u8; KSET_HEADER_SIZE] = [0; KSET_HEADER_SIZE];

impl crate::cache::Cache {
    fn log_pos(&self, pos: CachePos) -> u64 {
        // key_head only ever names a segment of the chain.
        data_pos(self.segments[pos.cache_seg_id as usize].pseg, pos.seg_off)
    }

    /// Keys waiting in the open key-set.
    pub fn open_keys(&self) -> &[KeyOnMedia] {
        &self.rt.open_kset
    }

    /// `cache_key_append`: adds `key` to the open key-set and closes it when
    /// it reaches 128 keys or `force_close` (FUA). A failed close takes the
    /// key back out, as the kernel does. The kernel also closes an open
    /// key-set about a second later; callers model that with
    /// [`Cache::close_kset`].
    pub fn append_key<P: Pmem + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        hooks: &mut H,
        key: KeyOnMedia,
        force_close: bool,
    ) -> Result<(), AppendError> {
        self.rt.open_kset.push(key);
        if self.rt.open_kset.len() as u32 == KSET_KEYS_MAX || force_close {
            if let Err(e) = self.close_kset(pmem, hooks) {
                self.rt.open_kset.pop();
                return Err(e);
            }
        }
        Ok(())
    }

    /// `cache_kset_close`: writes the open key-set at key_head (C8),
    /// switching the log to a new segment first (C9) when what remains of
    /// the segment cannot hold the record and a LAST record after it.
    ///
    /// The kernel writes the terminator after the record and the record
    /// with one fence for both, so a record can persist while its
    /// terminator does not, and replay then reads whatever follows as the
    /// log's continuation. Recover mode fences the terminator first (and the
    /// new segment's terminator before the LAST record that leads to it);
    /// the bytes on media are the same.
    pub fn close_kset<P: Pmem + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        hooks: &mut H,
    ) -> Result<(), AppendError> {
        if self.rt.open_kset.is_empty() {
            return Ok(());
        }
        let record = Kset::Keys {
            keys: core::mem::take(&mut self.rt.open_kset),
        };
        let result = self.write_record(pmem, hooks, &record);
        if let Kset::Keys { keys } = record {
            if result.is_err() {
                self.rt.open_kset = keys;
            }
        }
        result
    }

    fn write_record<P: Pmem + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        hooks: &mut H,
        record: &Kset,
    ) -> Result<(), AppendError> {
        let size = record.size() as u64;
        let recover = self.mode == crate::report::Mode::Recover;
        while DATA_SIZE - (self.key_head.seg_off as u64) < size + KSET_HEADER_SIZE as u64 {
            if DATA_SIZE - (self.key_head.seg_off as u64) < KSET_HEADER_SIZE as u64 {
                return Err(AppendError::NoRoomForLast {
                    key_head: self.key_head,
                });
            }
            let next = self.get_cache_segment().ok_or(AppendError::CacheFull)?;
            hooks.begin(CrashPoint::LogSwitch);
            let next_start = data_pos(self.segments[next as usize].pseg, 0);
            write_words(pmem, next_start, &TERMINATOR)?;
            if recover {
                pmem.fence()?;
            }
            let last = Kset::Last {
                next_cache_seg_id: next,
            }
            .to_bytes();
            write_words(pmem, self.log_pos(self.key_head), &last)?;
            pmem.fence()?;
            hooks.end(CrashPoint::LogSwitch);
            self.key_head = CachePos {
                cache_seg_id: next,
                seg_off: 0,
            };
        }
        hooks.begin(CrashPoint::KsetAppend);
        let at = self.log_pos(self.key_head);
        write_words(pmem, at + size, &TERMINATOR)?;
        if recover {
            pmem.fence()?;
        }
        write_words(pmem, at, &record.to_bytes())?;
        pmem.fence()?;
        hooks.end(CrashPoint::KsetAppend);
        self.key_head.seg_off += size as u32;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{KEY_F_EMPTY, MB};

    fn hex(s: &str) -> Vec<u8> {
        let s: alloc::string::String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn put_u32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn kset_vectors() {
        let last = Kset::Last {
            next_cache_seg_id: 5,
        };
        let lb = hex("a5c21759 05000000 1a4f164ea6946867 0100000000000000");
        assert_eq!(last.to_bytes(), lb);
        let mut area = lb.clone();
        area.resize(4096, 0);
        assert_eq!(decode_kset(&area, 31), Ok(last));

        let k1 = KeyOnMedia {
            off: 0.into(),
            len: 4096.into(),
            flags: 0.into(),
            cache_seg_id: 1.into(),
            cache_seg_off: 0.into(),
            seg_gen: 0.into(),
            data_crc: 0.into(),
            reserved: 0.into(),
        };
        let k1b = "0000000000000000 00100000 00000000 01000000 00000000 0000000000000000 00000000 00000000";
        let one = Kset::Keys {
            keys: alloc::vec![k1],
        };
        let ob = hex(&(alloc::string::String::from(
            "14c6d6d4 01000000 1a4f164ea6946867 0000000000000000",
        ) + k1b));
        assert_eq!(one.size(), 64);
        assert_eq!(one.to_bytes(), ob);
        let mut area = ob.clone();
        area.resize(4096, 0);
        assert_eq!(decode_kset(&area, 31), Ok(one));

        let k2 = KeyOnMedia {
            off: 0x10_0000.into(),
            len: 4096.into(),
            flags: KEY_F_CLEAN.into(),
            cache_seg_id: 2.into(),
            cache_seg_off: 4096.into(),
            seg_gen: 7.into(),
            data_crc: 0x6cfb_71ab.into(),
            reserved: 0.into(),
        };
        let two = Kset::Keys {
            keys: alloc::vec![k1, k2],
        };
        let tb = hex(&(alloc::string::String::from(
            "196ae580 02000000 1a4f164ea6946867 0000000000000000",
        ) + k1b
            + "0000100000000000 00100000 02000000 02000000 00100000 0700000000000000 ab71fb6c 00000000"));
        assert_eq!(two.size(), 104);
        assert_eq!(two.to_bytes(), tb);
        let mut area = tb.clone();
        area.resize(4096, 0);
        assert_eq!(decode_kset(&area, 31), Ok(two));
        // Torn: flip a key byte.
        area[30] ^= 1;
        assert!(matches!(
            decode_kset(&area, 31),
            Err(KsetError::CrcMismatch { .. })
        ));
    }

    #[test]
    fn kset_hostile_values() {
        assert_eq!(decode_kset(&[0u8; 64], 31), Err(KsetError::Terminator));
        assert_eq!(
            decode_kset(&[0u8; 10], 31),
            Err(KsetError::NoRoom { space: 10 })
        );
        // key_num out of range with the magic: hostile only under a valid CRC.
        let mut b = alloc::vec![0u8; 8192];
        put_u64(&mut b, 8, KSET_MAGIC);
        for key_num in [129u32, 0] {
            put_u32(&mut b, 4, key_num);
            // A torn write (the magic persisted, the CRC word did not): the
            // ordinary end of the log, as the kernel's replay sees it.
            put_u32(&mut b, 0, 0);
            let torn = decode_kset(&b, 31).unwrap_err();
            assert!(matches!(torn, KsetError::CrcMismatch { .. }), "{torn:?}");
            assert!(torn.is_end_of_log());
            // The same header under a valid CRC: a record no kernel writes.
            let size = KSET_HEADER_SIZE + key_num as usize * KEY_SIZE;
            let crc = pcache_crc(&b[4..size]);
            put_u32(&mut b, 0, crc);
            let hostile = decode_kset(&b, 31).unwrap_err();
            assert_eq!(hostile, KsetError::KeyNumOutOfRange { key_num });
            assert!(!hostile.is_end_of_log());
        }
        // A claim past the data area: no CRC can be checked; end of log.
        put_u32(&mut b, 4, 1_000_000);
        let far = decode_kset(&b, 31).unwrap_err();
        assert_eq!(
            far,
            KsetError::CrcUnverifiable {
                size: 24 + 40_000_000,
                space: 8192
            }
        );
        assert!(far.is_end_of_log());
        // LAST pointing out of the chain (with a valid CRC).
        let l = Kset::Last {
            next_cache_seg_id: 31,
        }
        .to_bytes();
        assert_eq!(
            decode_kset(&l, 31),
            Err(KsetError::NextSegmentOutOfRange {
                next_cache_seg_id: 31,
                n_segs: 31
            })
        );
        // A key in a segment outside the chain (valid CRC).
        let k = KeyOnMedia {
            off: 0.into(),
            len: 4096.into(),
            cache_seg_id: 40.into(),
            ..Default::default()
        };
        let mut r = Kset::Keys {
            keys: alloc::vec![k],
        }
        .to_bytes();
        r.resize(200, 0);
        assert!(matches!(
            decode_kset(&r, 31),
            Err(KsetError::BadKey {
                index: 0,
                error: KeyError::SegmentOutOfRange { .. }
            })
        ));
        // Too large for the space left.
        assert!(matches!(
            decode_kset(&r[..70], 31),
            Err(KsetError::TooLarge {
                size: 64,
                space: 70
            })
        ));
    }

    #[test]
    fn key_validation() {
        let ok = KeyOnMedia {
            off: (4 * MB - 4096).into(),
            len: 4096.into(),
            cache_seg_id: 3.into(),
            cache_seg_off: ((DATA_SIZE - 4096) as u32).into(),
            ..Default::default()
        };
        assert_eq!(ok.validate(4), Ok(()));
        assert!(ok.validate(3).is_err());
        let cross = KeyOnMedia {
            len: 8192.into(),
            ..ok
        };
        assert!(matches!(
            cross.validate(4),
            Err(KeyError::CrossesSubtree { .. })
        ));
        let beyond = KeyOnMedia {
            off: 0.into(),
            len: 8192.into(),
            ..ok
        };
        assert!(matches!(
            beyond.validate(4),
            Err(KeyError::BeyondDataArea { .. })
        ));
        let empty = KeyOnMedia {
            flags: KEY_F_EMPTY.into(),
            ..ok
        };
        assert!(matches!(empty.validate(4), Err(KeyError::Flags { .. })));
        let huge = KeyOnMedia {
            off: (u64::MAX - 511).into(),
            len: 512.into(),
            ..ok
        };
        assert!(huge.validate(4).is_err());
    }

    fn extent(off: u64, len: u32, seg: u32, seg_off: u32) -> Extent {
        Extent {
            off,
            len,
            cache_seg_id: seg,
            cache_seg_off: seg_off,
            seg_gen: 0,
            clean: false,
        }
    }

    #[test]
    fn a_later_key_trims_splits_and_covers_earlier_ones() {
        let mut ix = KeyIndex::default();
        ix.insert(extent(0, 8192, 1, 0));
        ix.insert(extent(16384, 4096, 1, 8192));
        // Splits the first, covers nothing else.
        ix.insert(extent(2048, 1024, 2, 0));
        let got: Vec<(u64, u32, u32, u32)> = ix
            .extents()
            .map(|e| (e.off, e.len, e.cache_seg_id, e.cache_seg_off))
            .collect();
        assert_eq!(
            got,
            [
                (0, 2048, 1, 0),
                (2048, 1024, 2, 0),
                (3072, 5120, 1, 3072),
                (16384, 4096, 1, 8192)
            ]
        );
        // Covers the middle piece and the tail, trims the head and the last.
        ix.insert(extent(1024, 16384, 3, 0));
        let got: Vec<(u64, u32, u32, u32)> = ix
            .extents()
            .map(|e| (e.off, e.len, e.cache_seg_id, e.cache_seg_off))
            .collect();
        assert_eq!(
            got,
            [(0, 1024, 1, 0), (1024, 16384, 3, 0), (17408, 3072, 1, 9216)]
        );
        assert_eq!(ix.lookup(17407).unwrap().cache_seg_id, 3);
        assert_eq!(ix.lookup(17408).unwrap().cache_seg_off, 9216);
        assert_eq!(ix.lookup(20480), None);
    }

    #[test]
    fn replay_keeps_the_later_key_and_drops_stale_generations() {
        use crate::pmem::SparsePmem;
        let mut dev = SparsePmem::new(512 << 20);
        let key = |off: u64, len: u32, seg: u32, seg_off: u32, gen: u64| KeyOnMedia {
            off: off.into(),
            len: len.into(),
            cache_seg_id: seg.into(),
            cache_seg_off: seg_off.into(),
            seg_gen: gen.into(),
            ..Default::default()
        };
        let first = Kset::Keys {
            keys: vec![key(0, 8192, 1, 0, 0), key(1 << 20, 4096, 2, 0, 0)],
        }
        .to_bytes();
        let second = Kset::Keys {
            keys: vec![key(4096, 4096, 1, 8192, 0)],
        }
        .to_bytes();
        dev.write_bytes(data_pos(0, 0), &first).unwrap();
        dev.write_bytes(data_pos(0, first.len() as u32), &second)
            .unwrap();
        let chain: Vec<u32> = (0..31).collect();
        // Segment 2 was invalidated (generation 1): its key is stale.
        let mut gens = vec![0u64; 31];
        gens[2] = 1;
        let r = replay(&dev, &chain, &gens, CachePos::default(), false, Rules::Ours).unwrap();
        assert_eq!(r.key_head.seg_off as usize, first.len() + second.len());
        assert!(r.end.stop.is_end_of_log());
        assert_eq!(
            r.records,
            [
                CachePos::default(),
                CachePos {
                    cache_seg_id: 0,
                    seg_off: first.len() as u32
                }
            ]
        );
        assert_eq!((r.log.ksets, r.log.keys, r.stale), (2, 3, 1));
        assert_eq!((r.refs[1], r.refs[2]), (2, 0));
        assert!(r.used[0] && r.used[1] && !r.used[2]);
        let got: Vec<(u64, u32, u32)> = r
            .index
            .extents()
            .map(|e| (e.off, e.len, e.cache_seg_off))
            .collect();
        assert_eq!(got, [(0, 4096, 0), (4096, 4096, 8192)]);
        // A data-CRC cache refuses a key whose data does not match.
        let e = replay(&dev, &chain, &gens, CachePos::default(), true, Rules::Ours).unwrap_err();
        assert!(
            matches!(
                e,
                ReplayError::DataCrc {
                    off: 0,
                    len: 8192,
                    ..
                }
            ),
            "{e}"
        );
    }
}
