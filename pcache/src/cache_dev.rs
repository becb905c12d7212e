//! The cache-device layer (kernel `cache_dev.c`): the superblock (`docs/format.md` §5.2, §8.1,
//! `docs/format.md` §8.2) and the physical-segment allocation bitmap.

use alloc::vec;
use alloc::vec::Vec;
use serde::Serialize;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::format::{
    le, seg_num_for_size, Record, CACHE_SEGS_MAX, META_ZERO_LEN, META_ZERO_OFF, PCACHE_MAGIC,
    SB_F_BIGENDIAN, SB_OFF,
};
use crate::hooks::{CrashPoint, Hooks};
use crate::pmem::{write_words, Pmem, PmemError};

/// `struct pcache_sb`, 24 bytes at dev+4096 (`docs/format.md` §5.2).
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
pub struct Superblock {
    /// Stored CRC over bytes 4..23.
    #[serde(serialize_with = "le")]
    pub crc: U32,
    /// Flags (bit 0: big-endian host).
    #[serde(serialize_with = "le")]
    pub flags: U32,
    /// [`PCACHE_MAGIC`]; 0 = unformatted.
    #[serde(serialize_with = "le")]
    pub magic: U64,
    /// Number of physical segments.
    #[serde(serialize_with = "le")]
    pub seg_num: U32,
    /// Padding bytes 20..23, inside the CRC (kept as found by the kernel).
    #[serde(serialize_with = "le")]
    pub pad: U32,
}

const _: () = assert!(
    core::mem::size_of::<Superblock>() == 24 && core::mem::offset_of!(Superblock, crc) == 0
);

impl Record for Superblock {
    fn crc(&self) -> u32 {
        self.crc.get()
    }
    fn set_crc(&mut self, crc: u32) {
        self.crc.set(crc);
    }
}

impl Superblock {
    /// A superblock for `seg_num` segments with the given padding, CRC computed.
    pub fn new(seg_num: u32, pad: u32) -> Self {
        Superblock {
            crc: U32::ZERO,
            flags: U32::ZERO,
            magic: PCACHE_MAGIC.into(),
            seg_num: seg_num.into(),
            pad: pad.into(),
        }
        .sealed()
    }
}

/// Reads the 24-byte superblock at dev+4096.
pub fn read_sb<P: Pmem + ?Sized>(pmem: &P) -> Result<Superblock, PmemError> {
    let mut sb = Superblock::new_zeroed();
    pmem.read(SB_OFF, sb.as_mut_bytes())?;
    Ok(sb)
}

/// The largest `seg_num` a device of `dev_size` bytes can have (its capacity,
/// capped at [`CACHE_SEGS_MAX`]), as the hardened kernel bounds it.
pub fn max_seg_num(dev_size: u64) -> u32 {
    core::cmp::min(seg_num_for_size(dev_size), CACHE_SEGS_MAX as u64) as u32
}

/// The superblock as an activation finds it, in the order the kernel checks it
/// (`docs/format.md` §8.2): magic, CRC, byte order, `seg_num` bounds (version H).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum SbState {
    /// Every check passes.
    Valid {
        /// Number of physical segments.
        seg_num: u32,
        /// Flags (bit 0 clear).
        flags: u32,
    },
    /// Magic 0: never formatted, or wiped to ask for a re-format.
    Unformatted,
    /// A non-zero magic that is not pcache's.
    BadMagic {
        /// The magic found.
        magic: u64,
        /// Whether the CRC matches anyway.
        crc_ok: bool,
    },
    /// pcache's magic with a CRC that does not match.
    CrcMismatch {
        /// Stored CRC.
        stored: u32,
        /// CRC of the content.
        computed: u32,
    },
    /// CRC valid but the big-endian flag is set.
    BigEndian {
        /// Flags found.
        flags: u32,
    },
    /// CRC valid but `seg_num` is 0, beyond the device or beyond the maximum.
    SegNumOutOfRange {
        /// seg_num found.
        seg_num: u32,
        /// The largest value the device allows.
        max: u32,
    },
}

impl SbState {
    /// Whether the superblock may be used as it is.
    pub fn is_valid(&self) -> bool {
        matches!(self, SbState::Valid { .. })
    }
}

impl core::fmt::Display for SbState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            SbState::Valid { seg_num, flags } => {
                write!(f, "valid (seg_num {seg_num}, flags {flags:#x})")
            }
            SbState::Unformatted => write!(f, "unformatted (magic 0)"),
            SbState::BadMagic { magic, crc_ok } => write!(
                f,
                "magic {magic:#018x} is not pcache's (CRC {})",
                if crc_ok { "valid" } else { "wrong" }
            ),
            SbState::CrcMismatch { stored, computed } => write!(
                f,
                "corrupted: CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            SbState::BigEndian { flags } => {
                write!(
                    f,
                    "flags {flags:#x} have the big-endian bit set (formatted by a big-endian host)"
                )
            }
            SbState::SegNumOutOfRange { seg_num, max } => {
                write!(
                    f,
                    "seg_num {seg_num} out of range (1..={max} for this device)"
                )
            }
        }
    }
}

/// Classifies a superblock read from a device of `dev_size` bytes.
pub fn classify_sb(sb: &Superblock, dev_size: u64) -> SbState {
    let (magic, flags, seg_num) = (sb.magic.get(), sb.flags.get(), sb.seg_num.get());
    if magic == 0 {
        return SbState::Unformatted;
    }
    let crc_ok = sb.crc_ok();
    if magic != PCACHE_MAGIC {
        return SbState::BadMagic { magic, crc_ok };
    }
    if !crc_ok {
        return SbState::CrcMismatch {
            stored: sb.crc(),
            computed: sb.computed_crc(),
        };
    }
    if flags & SB_F_BIGENDIAN != 0 {
        return SbState::BigEndian { flags };
    }
    let max = max_seg_num(dev_size);
    if seg_num == 0 || seg_num > max {
        return SbState::SegNumOutOfRange { seg_num, max };
    }
    SbState::Valid { seg_num, flags }
}

/// C1: zeroes both cache_info slots and cache_ctrl (12 KiB) with ordinary
/// stores and writes the lines back. The kernel issues no fence here (the
/// superblock write's fence orders it); `fence` adds one (recover mode).
pub fn zero_meta<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    hooks: &mut H,
    fence: bool,
) -> Result<(), PmemError> {
    hooks.begin(CrashPoint::ZeroMeta);
    pmem.zero_range(META_ZERO_OFF, META_ZERO_LEN)?;
    pmem.flush(META_ZERO_OFF, META_ZERO_LEN)?;
    if fence {
        pmem.fence()?;
    }
    hooks.end(CrashPoint::ZeroMeta);
    Ok(())
}

/// C2: writes the 24-byte superblock (3 words, CRC computed) and fences.
pub fn write_sb<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    hooks: &mut H,
    sb: &Superblock,
) -> Result<(), PmemError> {
    hooks.begin(CrashPoint::SbWrite);
    write_words(pmem, SB_OFF, sb.sealed().as_bytes())?;
    pmem.fence()?;
    hooks.end(CrashPoint::SbWrite);
    Ok(())
}

/// A volatile bitmap over segments (the kernel's `seg_bitmap` and `seg_map`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegBitmap {
    words: Vec<u64>,
    len: u32,
}

impl SegBitmap {
    /// An empty bitmap over `len` segments.
    pub fn new(len: u32) -> Self {
        SegBitmap {
            words: vec![0; (len as usize).div_ceil(64)],
            len,
        }
    }

    /// Number of segments covered.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the bitmap covers no segment.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `i` is set (false beyond the end).
    pub fn test(&self, i: u32) -> bool {
        i < self.len && self.words[i as usize / 64] & (1 << (i % 64)) != 0
    }

    /// Sets `i`; returns whether it was already set. Out of range: no-op, false.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let was = self.test(i);
        self.words[i as usize / 64] |= 1 << (i % 64);
        was
    }

    /// Clears `i`.
    pub fn clear(&mut self, i: u32) {
        if i < self.len {
            self.words[i as usize / 64] &= !(1 << (i % 64));
        }
    }

    /// Sets and returns the lowest clear bit.
    pub fn alloc_lowest(&mut self) -> Option<u32> {
        let i = (0..self.len).find(|&i| !self.test(i))?;
        self.set(i);
        Some(i)
    }

    /// Number of set bits.
    pub fn count(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{pcache_crc, MB};

    fn hex(s: &str) -> Vec<u8> {
        let s: alloc::string::String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn superblock_vectors() {
        for (size, seg_num, crc, bytes) in [
            (
                512 * MB,
                31,
                0x047f_7742,
                "42777f04 00000000 ef96c596fa5eb065 1f000000 00000000",
            ),
            (
                1024 * MB,
                63,
                0x097f_12db,
                "db127f09 00000000 ef96c596fa5eb065 3f000000 00000000",
            ),
        ] {
            assert_eq!(seg_num_for_size(size), seg_num);
            let sb = Superblock::new(seg_num as u32, 0);
            assert_eq!(sb.crc(), crc);
            assert_eq!(sb.to_bytes().to_vec(), hex(bytes));
            let d = Superblock::read_from_bytes(&hex(bytes)).unwrap();
            assert!(d.crc_ok());
            assert_eq!(d, sb);
            assert_eq!(d.computed_crc(), pcache_crc(&hex(bytes)[4..]));
        }
    }

    #[test]
    fn classify_in_kernel_order() {
        let size = 512 * MB;
        let good = Superblock::new(31, 0);
        assert_eq!(
            classify_sb(&good, size),
            SbState::Valid {
                seg_num: 31,
                flags: 0
            }
        );
        assert_eq!(
            classify_sb(&Superblock::default(), size),
            SbState::Unformatted
        );
        let mut foreign = good;
        foreign.magic.set(0x1234);
        assert!(matches!(
            classify_sb(&foreign, size),
            SbState::BadMagic {
                magic: 0x1234,
                crc_ok: false
            }
        ));
        let mut torn = good;
        torn.seg_num.set(0);
        assert!(matches!(
            classify_sb(&torn, size),
            SbState::CrcMismatch { .. }
        ));
        for seg_num in [0, 32, u32::MAX] {
            let sb = Superblock::new(seg_num, 0);
            assert_eq!(
                classify_sb(&sb, size),
                SbState::SegNumOutOfRange { seg_num, max: 31 }
            );
        }
        let mut be = Superblock::new(31, 0);
        be.flags.set(1);
        let be = be.sealed();
        assert_eq!(classify_sb(&be, size), SbState::BigEndian { flags: 1 });
        // Other flag bits are not interpreted (as the kernel).
        let mut other = Superblock::new(31, 0);
        other.flags.set(0x10);
        let other = other.sealed();
        assert!(classify_sb(&other, size).is_valid());
        // The maximum applies to huge devices.
        assert_eq!(max_seg_num(u64::MAX), CACHE_SEGS_MAX);
    }

    #[test]
    fn bitmap() {
        let mut b = SegBitmap::new(70);
        assert_eq!(b.alloc_lowest(), Some(0));
        assert!(!b.set(65));
        assert!(b.set(65));
        assert!(b.test(65) && !b.test(64) && !b.test(700));
        assert_eq!(b.count(), 2);
        b.clear(0);
        assert_eq!(b.alloc_lowest(), Some(0));
        for _ in 0..68 {
            assert!(b.alloc_lowest().is_some());
        }
        assert_eq!(b.alloc_lowest(), None);
        assert_eq!(b.count(), 70);
    }
}
