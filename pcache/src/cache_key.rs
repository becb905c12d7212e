//! The key-set log (kernel `cache_key.c`): walking the records from a position
//! (§3.8, §5.6), with every header and key validated before it is used.
//!
//! Part 1 walks the log only to decide whether it is empty and to validate it;
//! replay into an index is part 2.

use alloc::vec;
use alloc::vec::Vec;
use serde::Serialize;

use crate::format::{
    data_pos, decode_kset, KeyOnMedia, Kset, KsetError, DATA_SIZE, KSET_HEADER_SIZE,
    KSET_ONMEDIA_SIZE_MAX,
};
use crate::pmem::{Pmem, PmemError};

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
        }
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
        let decoded = match decode_kset(&self.buf[..len], n_segs) {
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
                decode_kset(&whole, n_segs)
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
    mut each: impl FnMut(&LogRecord),
) -> LogSummary {
    let mut w = LogWalker::new(pmem, chain, start);
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
