//! What an activation did: the outcome, the typed reason of a refusal, and the
//! state it found or left (superblock, cache_info, tails, chain, log).

use alloc::boxed::Box;
use alloc::string::String;
use core::fmt;
use serde::{Deserialize, Serialize};

use crate::cache_dev::SbState;
use crate::cache_key::{CachePos, LogEnd, LogStop};
use crate::pmem::PmemError;

/// Recovery mode of an activation (it governs the whole activation, format
/// included).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Exactly the kernel's behaviour (M2/H), write order and refusals included.
    Strict,
    /// The kernel's behaviour plus superblock recovery and safer ordering; never
    /// overwrites the newest valid copy of a record.
    #[default]
    Recover,
}

impl Mode {
    /// The mode's name, as in files and on command lines.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Strict => "strict",
            Mode::Recover => "recover",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Options of an activation (the constructor's arguments).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Options {
    /// Recovery mode.
    pub mode: Mode,
    /// The `data_crc` option: fixed at format; must match an existing cache.
    pub data_crc: bool,
}

/// The outcome of an activation (the outcome table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Formatted (if needed) and first activation of a new cache.
    Formatted,
    /// An existing cache was opened.
    Opened,
    /// Recover mode: an interrupted format was done again.
    FormatRedone,
    /// Recover mode: a corrupted superblock was rebuilt and the cache opened.
    SuperblockRebuilt,
    /// Nothing was activated; see the refusal.
    Refused,
}

impl Outcome {
    /// The outcome's name, as in reports and scenario files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Formatted => "formatted",
            Outcome::Opened => "opened",
            Outcome::FormatRedone => "format-redone",
            Outcome::SuperblockRebuilt => "superblock-rebuilt",
            Outcome::Refused => "refused",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tail of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tail {
    /// key_tail (advanced by GC).
    KeyTail,
    /// dirty_tail (advanced by writeback).
    DirtyTail,
}

impl fmt::Display for Tail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tail::KeyTail => "key_tail",
            Tail::DirtyTail => "dirty_tail",
        })
    }
}

/// Why a superblock with a wrong CRC (or a foreign magic) could not be
/// recovered in recover mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RebuildBlocker {
    /// A valid cache_info without INIT_DONE (no kernel writes one).
    CacheInfoWithoutInitDone {
        /// Slot.
        slot: usize,
        /// Seq.
        seq: u8,
    },
    /// Valid tails but no valid cache_info: not an interrupted format (a format
    /// writes the tails only after the superblock), and nothing to rebuild from.
    TailsWithoutCacheInfo {
        /// key_tail has a valid copy.
        key_tail: bool,
        /// dirty_tail has a valid copy.
        dirty_tail: bool,
    },
    /// The superblock derived from the device size does not agree with the
    /// cache_info.
    SegNumDisagrees {
        /// seg_num the device size gives.
        derived: u32,
        /// cache_info.n_segs.
        n_segs: u32,
    },
    /// The rest of the metadata is not a cache that could be opened.
    Metadata {
        /// Why it could not be opened.
        reason: Box<Refusal>,
    },
}

impl fmt::Display for RebuildBlocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RebuildBlocker::CacheInfoWithoutInitDone { slot, seq } => write!(
                f,
                "cache_info slot {slot} (seq {seq}) is valid but lacks INIT_DONE, which no kernel writes"
            ),
            RebuildBlocker::TailsWithoutCacheInfo {
                key_tail,
                dirty_tail,
            } => write!(
                f,
                "no valid cache_info but a valid {}: not an interrupted format, and no cache_info to rebuild from",
                match (key_tail, dirty_tail) {
                    (true, true) => "key_tail and dirty_tail",
                    (true, false) => "key_tail",
                    _ => "dirty_tail",
                }
            ),
            RebuildBlocker::SegNumDisagrees { derived, n_segs } => write!(
                f,
                "the device size gives seg_num {derived} but cache_info has n_segs {n_segs}"
            ),
            RebuildBlocker::Metadata { reason } => write!(f, "{reason}"),
        }
    }
}

/// Why an activation refused the device. Nothing was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Refusal {
    /// The device is smaller than 512 MiB.
    DeviceTooSmall {
        /// Device size.
        size: u64,
        /// Minimum.
        min: u64,
    },
    /// A non-zero magic that is not pcache's.
    NotPcache {
        /// Magic found.
        magic: u64,
        /// The rest of the device was searched for pcache metadata and none was
        /// found (false: refused on the magic alone, as the kernel does, or
        /// because a valid CRC over a foreign magic is no torn write).
        metadata_absent: bool,
    },
    /// Strict mode: pcache's magic with a wrong CRC (the kernel's "corrupted sb").
    CorruptedSuperblock {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// The superblock's big-endian flag is set.
    BigEndian {
        /// Flags found.
        flags: u32,
    },
    /// `seg_num` is 0, beyond the device or beyond the maximum.
    SegNum {
        /// seg_num found (or computed for a format).
        seg_num: u64,
        /// Largest allowed.
        max: u32,
    },
    /// Recover mode: the superblock is corrupted and the metadata does not
    /// allow a rebuild or a re-format.
    SuperblockUnrecoverable {
        /// The superblock as found.
        superblock: SbState,
        /// What was found instead.
        blocker: RebuildBlocker,
    },
    /// The `data_crc` option differs from the cache's.
    DataCrcOption {
        /// Option given.
        option: bool,
        /// The cache's setting.
        cache: bool,
    },
    /// cache_info.n_segs is 0 or larger than seg_num.
    NSegs {
        /// n_segs found.
        n_segs: u32,
        /// seg_num.
        seg_num: u32,
    },
    /// cache_info.seg_id (the head of the chain) is out of range.
    ChainSegOutOfRange {
        /// Cache segment id.
        cache_seg: u32,
        /// Physical id found.
        pseg: u32,
        /// seg_num.
        seg_num: u32,
    },
    /// The previous segment of the chain has no HAS_NEXT.
    ChainBroken {
        /// Cache segment id that has no successor.
        cache_seg: u32,
        /// Its physical id.
        pseg: u32,
        /// Chain length cache_info asks for.
        n_segs: u32,
    },
    /// A physical segment appears twice in the chain.
    ChainDuplicate {
        /// Cache segment id where it appears again.
        cache_seg: u32,
        /// Physical id.
        pseg: u32,
    },
    /// A segment of the chain has no valid segment info.
    SegInfoMissing {
        /// Cache segment id.
        cache_seg: u32,
        /// Physical id.
        pseg: u32,
    },
    /// A tail has no valid copy (the kernel's "Corrupted key tail or dirty tail").
    TailMissing {
        /// Which tail.
        tail: Tail,
    },
    /// A tail points outside the chain or the data area.
    TailOutOfRange {
        /// Which tail.
        tail: Tail,
        /// Position found.
        pos: CachePos,
        /// Chain length.
        n_segs: u32,
    },
    /// dirty_tail is not on the log that starts at key_tail.
    DirtyTailOffLog {
        /// key_tail.
        key_tail: CachePos,
        /// dirty_tail.
        dirty_tail: CachePos,
        /// Where the log ends.
        log_end: CachePos,
    },
    /// A log record no kernel writes.
    HostileLog {
        /// The record's position and what is wrong with it.
        end: LogEnd,
    },
    /// Replay failed on a key's data (a data-CRC mismatch, a read error):
    /// the kernel fails the activation with EIO.
    KeyData {
        /// What failed.
        error: crate::cache_key::ReplayError,
    },
    /// A persistent-memory access failed.
    Pmem {
        /// The error.
        error: PmemError,
    },
}

impl From<PmemError> for Refusal {
    fn from(error: PmemError) -> Self {
        Refusal::Pmem { error }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::DeviceTooSmall { size, min } => write!(
                f,
                "device too small: {size} bytes, a pcache cache device needs at least {min} bytes (512 MiB)"
            ),
            Refusal::NotPcache {
                magic,
                metadata_absent,
            } => write!(
                f,
                "not a pcache device: superblock magic {magic:#018x} is not pcache's{} (never formatting over unknown data)",
                if *metadata_absent {
                    " and no pcache metadata was found"
                } else {
                    ""
                }
            ),
            Refusal::CorruptedSuperblock { stored, computed } => write!(
                f,
                "corrupted superblock: CRC mismatch (stored {stored:#010x}, computed {computed:#010x}); clear the magic to re-format"
            ),
            Refusal::BigEndian { flags } => write!(
                f,
                "superblock flags {flags:#x}: big-endian flag set (formatted by a big-endian host)"
            ),
            Refusal::SegNum { seg_num, max } => write!(
                f,
                "superblock seg_num {seg_num} out of range (1..={max} for this device)"
            ),
            Refusal::SuperblockUnrecoverable {
                superblock,
                blocker,
            } => write!(
                f,
                "superblock {superblock}; cannot rebuild or re-format: {blocker}"
            ),
            Refusal::DataCrcOption { option, cache } => write!(
                f,
                "invalid option for data_crc: {option} given, the cache was formatted with {cache}"
            ),
            Refusal::NSegs { n_segs, seg_num } => write!(
                f,
                "cache_info n_segs {n_segs} out of range (1..={seg_num})"
            ),
            Refusal::ChainSegOutOfRange {
                cache_seg,
                pseg,
                seg_num,
            } => write!(
                f,
                "segment chain: cache segment {cache_seg} maps to physical segment {pseg}, beyond seg_num {seg_num}"
            ),
            Refusal::ChainBroken {
                cache_seg,
                pseg,
                n_segs,
            } => write!(
                f,
                "segment chain: cache segment {cache_seg} (physical {pseg}) has no next segment, but n_segs is {n_segs}"
            ),
            Refusal::ChainDuplicate { cache_seg, pseg } => write!(
                f,
                "segment chain: physical segment {pseg} appears again as cache segment {cache_seg} (cycle or duplicate)"
            ),
            Refusal::SegInfoMissing { cache_seg, pseg } => write!(
                f,
                "segment chain: cache segment {cache_seg} (physical {pseg}) has no valid segment info"
            ),
            Refusal::TailMissing { tail } => {
                write!(f, "corrupted key tail or dirty tail: {tail} has no valid copy")
            }
            Refusal::TailOutOfRange { tail, pos, n_segs } => write!(
                f,
                "{tail} {pos} out of range (n_segs {n_segs}, data area {} bytes)",
                crate::format::DATA_SIZE
            ),
            Refusal::DirtyTailOffLog {
                key_tail,
                dirty_tail,
                log_end,
            } => write!(
                f,
                "dirty_tail {dirty_tail} is not on the log from key_tail {key_tail} (log ends at {log_end})"
            ),
            Refusal::HostileLog { end } => match &end.stop {
                LogStop::Io { error } => write!(f, "reading the log at {}: {error}", end.pos),
                stop => write!(f, "key-set log: record at {}: {stop}", end.pos),
            },
            Refusal::KeyData { error } => write!(f, "replaying the key-set log: {error}"),
            Refusal::Pmem { error } => write!(f, "persistent memory: {error}"),
        }
    }
}

/// Slot and seq of a dual-copy record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SlotSeq {
    /// Slot (0 or 1).
    pub slot: usize,
    /// Seq (8 bits as on media).
    pub seq: u8,
}

/// A tail: position and the copy it came from (or was written to).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TailReport {
    /// Position.
    pub pos: CachePos,
    /// Slot.
    pub slot: usize,
    /// Seq.
    pub seq: u8,
}

/// Everything an activation reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ActivationReport {
    /// The outcome.
    pub outcome: Outcome,
    /// Why it refused (outcome `refused`).
    pub refusal: Option<Refusal>,
    /// The refusal as text.
    pub message: Option<String>,
    /// Mode used.
    pub mode: Mode,
    /// The data_crc option given.
    pub data_crc_option: bool,
    /// Device size in bytes.
    pub device_size: u64,
    /// The superblock as the activation found it (None if it was not read).
    pub superblock: Option<SbState>,
    /// seg_num in use (from the superblock, or computed by a format/rebuild).
    pub seg_num: Option<u32>,
    /// cache_info in use: the copy written by this activation, or the latest
    /// valid copy found when refusing.
    pub cache_info: Option<SlotSeq>,
    /// cache_info flags (of that copy).
    pub cache_info_flags: Option<u32>,
    /// n_segs.
    pub n_segs: Option<u32>,
    /// key_tail.
    pub key_tail: Option<TailReport>,
    /// dirty_tail.
    pub dirty_tail: Option<TailReport>,
    /// Number of segments in the chain (walked or formatted).
    pub chain_len: u32,
    /// The key-set log from key_tail (existing caches).
    pub log: Option<crate::cache_key::LogSummary>,
    /// What `dmsetup status` shows of the active target
    /// (`docs/format.md` §11): `sb_flags seg_num n_segs segs_used gc_percent
    /// cache_info_flags key_head dirty_tail key_tail`, flags in hex,
    /// positions `cseg:off`.
    pub status: Option<String>,
}

impl ActivationReport {
    pub(crate) fn new(opts: &Options, device_size: u64) -> Self {
        ActivationReport {
            outcome: Outcome::Refused,
            refusal: None,
            message: None,
            mode: opts.mode,
            data_crc_option: opts.data_crc,
            device_size,
            superblock: None,
            seg_num: None,
            cache_info: None,
            cache_info_flags: None,
            n_segs: None,
            key_tail: None,
            dirty_tail: None,
            chain_len: 0,
            log: None,
            status: None,
        }
    }
}

impl fmt::Display for ActivationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "outcome: {}", self.outcome)?;
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "mode: {}, data_crc option: {}, device: {} bytes",
            self.mode, self.data_crc_option, self.device_size
        )?;
        match &self.superblock {
            Some(s) => writeln!(f, "superblock (as found): {s}")?,
            None => writeln!(f, "superblock: not read")?,
        }
        if let Some(n) = self.seg_num {
            writeln!(f, "seg_num: {n}")?;
        }
        match (self.cache_info, self.cache_info_flags, self.n_segs) {
            (Some(ci), Some(flags), n) => {
                write!(
                    f,
                    "cache_info: slot {} seq {}, flags {flags:#x}",
                    ci.slot, ci.seq
                )?;
                if let Some(n) = n {
                    write!(f, ", n_segs {n}")?;
                }
                writeln!(f)?;
            }
            _ => writeln!(f, "cache_info: none")?,
        }
        for (name, t) in [
            ("key_tail", &self.key_tail),
            ("dirty_tail", &self.dirty_tail),
        ] {
            match t {
                Some(t) => writeln!(f, "{name}: {} (slot {} seq {})", t.pos, t.slot, t.seq)?,
                None => writeln!(f, "{name}: none")?,
            }
        }
        writeln!(f, "chain: {} segment(s)", self.chain_len)?;
        if let Some(s) = &self.status {
            writeln!(f, "status: {s}")?;
        }
        if let Some(l) = &self.log {
            write!(
                f,
                "log: {} key-set(s), {} key(s), {} segment switch(es)",
                l.ksets, l.keys, l.lasts
            )?;
            if let Some(e) = &l.end {
                write!(f, "; ends at {}: {}", e.pos, e.stop)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
