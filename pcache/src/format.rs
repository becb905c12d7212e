//! What every on-media record of dm-pcache shares: the layout constants, the
//! CRC, the meta header and one encode/decode/CRC mechanism ([`Record`],
//! [`DualRecord`]) (`docs/format.md` §3–§6). Each record is declared next to
//! its concept, as in the kernel: the superblock in [`crate::cache_dev`],
//! segment info and generation in [`crate::segment`], the key and key-set in
//! [`crate::cache_key`], cache_info and the tails in [`crate::cache`].
//!
//! Records are `#[repr(C)]` structs of explicitly little-endian fields
//! (`zerocopy`; the kernel stores host order, a compatible implementation
//! writes little-endian, `docs/format.md` §2), so any bytes decode to *some* record without
//! `unsafe`; whether a record is valid is a separate question answered by its
//! CRC and, for values used as indices or lengths, by the bounds checks of the
//! modules that use them.

use alloc::vec::Vec;
use serde::Serialize;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

// ---------------------------------------------------------------------------
// `docs/format.md` §3 Layout constants
// ---------------------------------------------------------------------------

/// 1 KiB.
pub const KB: u64 = 1024;
/// 1 MiB.
pub const MB: u64 = 1024 * 1024;
/// Number of copies ("slots") of every dual-copy record.
pub const META_INDEX_MAX: usize = 2;
/// Initial CRC register value of every CRC in the format.
pub const CRC_SEED: u32 = 0x0003_B15A;
/// Superblock magic.
pub const PCACHE_MAGIC: u64 = 0x65B0_5EFA_96C5_96EF;
/// Key-set magic.
pub const KSET_MAGIC: u64 = 0x6768_94A6_4E16_4F1A;
/// Superblock region offset (the 24-byte record is at its start).
pub const SB_OFF: u64 = 4096;
/// Superblock region size.
pub const SB_SIZE: u64 = 4096;
/// cache_info slot 0.
pub const CACHE_INFO_OFF: u64 = 8192;
/// Stride between cache_info slots.
pub const CACHE_INFO_SIZE: u64 = 4096;
/// cache_ctrl region (tails).
pub const CACHE_CTRL_OFF: u64 = 16384;
/// cache_ctrl region size.
pub const CACHE_CTRL_SIZE: u64 = 4096;
/// key_tail slot 0 (slot 1 is 16 bytes later).
pub const KEY_TAIL_OFF: u64 = CACHE_CTRL_OFF;
/// dirty_tail slot 0 (slot 1 is 16 bytes later).
pub const DIRTY_TAIL_OFF: u64 = CACHE_CTRL_OFF + 32;
/// Stride between the slots of a tail.
pub const CACHE_POS_STRIDE: u64 = 16;
/// First segment.
pub const SEGMENTS_OFF: u64 = 20480;
/// Segment size (16 MiB).
pub const SEG_SIZE: u64 = 16 * MB;
/// Stride of the seg_info slots inside a segment.
pub const SEG_INFO_SIZE: u64 = 4096;
/// Per-segment control (generation records) offset inside a segment.
pub const CACHE_SEG_CTRL_OFF: u64 = 8192;
/// Per-segment control size.
pub const CACHE_SEG_CTRL_SIZE: u64 = 4096;
/// Stride of the generation slots.
pub const SEG_GEN_STRIDE: u64 = 16;
/// Start of the data area inside a segment.
pub const DATA_OFF: u64 = 12288;
/// Usable bytes per segment.
pub const DATA_SIZE: u64 = SEG_SIZE - DATA_OFF;
/// Bytes zeroed at the start of every segment when it is formatted.
pub const SEG_HEADER_SIZE: u64 = DATA_OFF;
/// The metadata area zeroed at format: both cache_info slots and cache_ctrl.
pub const META_ZERO_OFF: u64 = CACHE_INFO_OFF;
/// Length of [`META_ZERO_OFF`]'s area (12 KiB).
pub const META_ZERO_LEN: u64 = SEGMENTS_OFF - CACHE_INFO_OFF;
/// Minimum cache device size (512 MiB).
pub const CACHE_DEV_SIZE_MIN: u64 = 512 * MB;
/// Maximum number of segments (enforced by the hardened kernel, version H).
pub const CACHE_SEGS_MAX: u32 = 1024 * 1024;
/// Maximum keys in one key-set.
pub const KSET_KEYS_MAX: u32 = 128;
/// Size of one on-media key.
pub const KEY_SIZE: usize = 40;
/// Size of a key-set header.
pub const KSET_HEADER_SIZE: usize = 24;
/// Largest key-set record.
pub const KSET_ONMEDIA_SIZE_MAX: usize = KSET_HEADER_SIZE + KSET_KEYS_MAX as usize * KEY_SIZE;
/// Logical sharding unit: no key crosses a 4 MiB-aligned logical boundary.
pub const CACHE_SUBTREE_SIZE: u64 = 4 * MB;
/// Default gc_percent.
pub const GC_PERCENT_DEFAULT: u32 = 70;
/// Largest gc_percent.
pub const GC_PERCENT_MAX: u32 = 90;
/// Backing-device sector size.
pub const SECTOR_SIZE: u64 = 512;

/// sb.flags bit 0: formatted by a big-endian host.
pub const SB_F_BIGENDIAN: u32 = 1 << 0;

/// cache_info.flags bit 0: per-key data CRC.
pub const CACHE_INFO_F_DATA_CRC: u32 = 1 << 0;
/// cache_info.flags bit 1: cache fully initialised.
pub const CACHE_INFO_F_INIT_DONE: u32 = 1 << 1;
/// cache_info.flags bits 2..5: cache mode.
pub const CACHE_INFO_MODE_SHIFT: u32 = 2;
/// Mask of the cache-mode field (after shifting).
pub const CACHE_INFO_MODE_MASK: u32 = 0xF;
/// cache_info.flags bits 6..12: gc_percent.
pub const CACHE_INFO_GC_SHIFT: u32 = 6;
/// Mask of the gc_percent field (after shifting).
pub const CACHE_INFO_GC_MASK: u32 = 0x7F;

/// seg_info.flags bit 0: next_seg is valid.
pub const SEG_INFO_F_HAS_NEXT: u32 = 1 << 0;
/// seg_info.flags bits 1..4: segment type.
pub const SEG_INFO_TYPE_SHIFT: u32 = 1;
/// Mask of the segment-type field (after shifting).
pub const SEG_INFO_TYPE_MASK: u32 = 0xF;
/// The only segment type: cache data.
pub const SEG_TYPE_CACHE_DATA: u32 = 1;

/// key.flags bit 0: placeholder for an in-flight miss read (never persisted).
pub const KEY_F_EMPTY: u32 = 1 << 0;
/// key.flags bit 1: data equals the backing device (miss fill).
pub const KEY_F_CLEAN: u32 = 1 << 1;

/// kset.flags bit 0: the record links to the next log segment.
pub const KSET_F_LAST: u64 = 1 << 0;

/// Number of whole segments a device of `dev_size` bytes holds (`docs/format.md` §3 "seg_num at
/// format"); 0 for a device too small to hold one.
pub const fn seg_num_for_size(dev_size: u64) -> u64 {
    if dev_size < SEGMENTS_OFF {
        0
    } else {
        (dev_size - SEGMENTS_OFF) / SEG_SIZE
    }
}

/// Device offset of physical segment `pseg`.
pub const fn seg_off(pseg: u32) -> u64 {
    SEGMENTS_OFF + pseg as u64 * SEG_SIZE
}

/// Device offset of byte `off` of physical segment `pseg`'s data area.
pub const fn data_pos(pseg: u32, off: u32) -> u64 {
    seg_off(pseg) + DATA_OFF + off as u64
}

/// Device offset of seg_info slot `slot` of physical segment `pseg`.
pub const fn seg_info_slot_off(pseg: u32, slot: usize) -> u64 {
    seg_off(pseg) + slot as u64 * SEG_INFO_SIZE
}

/// Device offset of generation slot `slot` of physical segment `pseg`.
pub const fn seg_gen_slot_off(pseg: u32, slot: usize) -> u64 {
    seg_off(pseg) + CACHE_SEG_CTRL_OFF + slot as u64 * SEG_GEN_STRIDE
}

/// Device offset of cache_info slot `slot`.
pub const fn cache_info_slot_off(slot: usize) -> u64 {
    CACHE_INFO_OFF + slot as u64 * CACHE_INFO_SIZE
}

// ---------------------------------------------------------------------------
// `docs/format.md` §6 CRC
// ---------------------------------------------------------------------------

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32C_TABLE: [u32; 256] = crc32c_table();

/// The kernel's `crc32c(seed, data, len)`: CRC-32C (reflected 0x82F63B78) register
/// update from `seed`, with no pre- or post-inversion.
pub fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    let mut crc = seed;
    for &b in data {
        crc = (crc >> 8) ^ CRC32C_TABLE[((crc ^ b as u32) & 0xFF) as usize];
    }
    crc
}

/// The CRC of every pcache record and of key data: `crc32c_raw(0x3B15A, data)`.
pub fn pcache_crc(data: &[u8]) -> u32 {
    crc32c_raw(CRC_SEED, data)
}

/// Splits an 8-aligned record into the little-endian words it is written as (`docs/format.md` §10).
pub fn words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    debug_assert!(bytes.len() % 8 == 0);
    bytes.chunks_exact(8).map(|c| {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        u64::from_le_bytes(w)
    })
}

/// Serializes a little-endian field as the number it holds (the JSON of every
/// record shows values, not bytes).
pub(crate) fn le<T: Copy + Into<u64>, S: serde::Serializer>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_u64((*v).into())
}

// ---------------------------------------------------------------------------
// Records: one mechanism for all of them
// ---------------------------------------------------------------------------

/// A fixed-size on-media record whose first four bytes are a CRC over the rest
/// (`docs/format.md` §6): the superblock and every dual-copy record. Decoding is zerocopy's
/// (`read_from_bytes`, `new_zeroed` + `as_mut_bytes`), encoding is
/// `as_bytes` after [`Record::sealed`].
pub trait Record: FromBytes + IntoBytes + KnownLayout + Immutable + Unaligned + Copy {
    /// Size in bytes on media (a multiple of 8).
    const SIZE: usize = core::mem::size_of::<Self>();

    /// The stored CRC.
    fn crc(&self) -> u32;

    /// Sets the stored CRC.
    fn set_crc(&mut self, crc: u32);

    /// The CRC the content calls for (over bytes 4..SIZE).
    fn computed_crc(&self) -> u32 {
        pcache_crc(&self.as_bytes()[4..])
    }

    /// Whether the stored CRC matches the content.
    fn crc_ok(&self) -> bool {
        self.crc() == self.computed_crc()
    }

    /// The record with a freshly computed CRC.
    fn sealed(mut self) -> Self {
        let crc = self.computed_crc();
        self.set_crc(crc);
        self
    }

    /// The bytes with a freshly computed CRC.
    fn to_bytes(&self) -> Vec<u8> {
        self.sealed().as_bytes().to_vec()
    }
}

/// A record stored in two slots and selected by CRC and sequence (`docs/format.md` §7); it
/// starts with a [`MetaHeader`].
pub trait DualRecord: Record {
    /// The header.
    fn header(&self) -> &MetaHeader;
    /// The header, mutably (the sequence number is set by the writer).
    fn header_mut(&mut self) -> &mut MetaHeader;
}

/// Implements [`Record`] and [`DualRecord`] for a record whose first field is
/// `header: MetaHeader`, and checks its size and that layout at compile time.
macro_rules! meta_record {
    ($t:ty, $size:expr) => {
        const _: () =
            assert!(core::mem::size_of::<$t>() == $size && core::mem::offset_of!($t, header) == 0);
        impl $crate::format::Record for $t {
            fn crc(&self) -> u32 {
                self.header.crc.get()
            }
            fn set_crc(&mut self, crc: u32) {
                self.header.crc.set(crc);
            }
        }
        impl $crate::format::DualRecord for $t {
            fn header(&self) -> &$crate::format::MetaHeader {
                &self.header
            }
            fn header_mut(&mut self) -> &mut $crate::format::MetaHeader {
                &mut self.header
            }
        }
    };
}
pub(crate) use meta_record;

// ---------------------------------------------------------------------------
// `docs/format.md` §5.1 meta header
// ---------------------------------------------------------------------------

/// The 8-byte header of cache_info, cache_pos, seg_info and seg_gen
/// (`struct pcache_meta_header`).
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
pub struct MetaHeader {
    /// Stored CRC over bytes 4..end of the record.
    #[serde(serialize_with = "le")]
    pub crc: U32,
    /// 8-bit sequence number (wraps).
    pub seq: u8,
    /// Never set by the kernel; covered by the CRC, ignored by readers.
    pub version: u8,
    /// Never set by the kernel; covered by the CRC, ignored by readers.
    #[serde(serialize_with = "le")]
    pub res: U16,
}

const _: () = assert!(core::mem::size_of::<MetaHeader>() == 8);

impl MetaHeader {
    /// A header with sequence number `seq` (CRC 0 until sealed).
    pub fn with_seq(seq: u8) -> Self {
        MetaHeader {
            seq,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn crc_table_matches_standard_check_value() {
        assert_eq!(
            crc32c_raw(0xFFFF_FFFF, b"123456789") ^ 0xFFFF_FFFF,
            0xE306_9283
        );
    }

    #[test]
    fn crc_of_zero_slots_is_not_zero() {
        assert_eq!(pcache_crc(&[0u8; 20]), 0xB9B6_9066);
        assert_eq!(pcache_crc(&[0u8; 12]), 0x5F84_0B80);
    }

    #[test]
    fn crc_matches_bitwise_reference() {
        fn bitwise(seed: u32, data: &[u8]) -> u32 {
            let mut crc = seed;
            for &b in data {
                crc ^= b as u32;
                for _ in 0..8 {
                    crc = if crc & 1 != 0 {
                        (crc >> 1) ^ 0x82F6_3B78
                    } else {
                        crc >> 1
                    };
                }
            }
            crc
        }
        let mut x: u64 = 0x1234_5678_9abc_def0;
        for len in 0..300 {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            assert_eq!(pcache_crc(&data), bitwise(CRC_SEED, &data));
        }
    }

    #[test]
    fn data_crc_vectors() {
        assert_eq!(pcache_crc(&[0u8; 4096]), 0x6035_71b1);
        assert_eq!(pcache_crc(&[0xABu8; 4096]), 0x6cfb_71ab);
    }
}
