//! Every on-media record of dm-pcache: layout constants, explicit encoding and
//! decoding, and the CRC (`pcache-format.md` §1–§4).
//!
//! Nothing here transmutes media bytes: each record is decoded field by field
//! from a byte array of its exact size, and encoded the same way. Decoding never
//! fails (any bytes decode to *some* record); whether a record is valid is a
//! separate question answered by its CRC and, for values used as indices or
//! lengths, by the bounds checks of the modules that use them.
//!
//! All multi-byte fields are little-endian (the kernel stores host order; a
//! compatible implementation writes little-endian, §0).

use serde::Serialize;

// ---------------------------------------------------------------------------
// §1 Layout constants
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

/// Number of whole segments a device of `dev_size` bytes holds (§1 "seg_num at
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
// §4 CRC
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

// ---------------------------------------------------------------------------
// Little-endian field helpers (bounds are fixed by the array types).
// ---------------------------------------------------------------------------

fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Splits an 8-aligned record into the little-endian words it is written as (§8).
pub fn words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    debug_assert!(bytes.len() % 8 == 0);
    bytes.chunks_exact(8).map(|c| get_u64(c, 0))
}

// ---------------------------------------------------------------------------
// §3.1 meta header
// ---------------------------------------------------------------------------

/// The 8-byte header of cache_info, cache_pos, seg_info and seg_gen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MetaHeader {
    /// Stored CRC over bytes 4..end of the record.
    pub crc: u32,
    /// 8-bit sequence number (wraps).
    pub seq: u8,
    /// Never set by the kernel; covered by the CRC, ignored by readers.
    pub version: u8,
    /// Never set by the kernel; covered by the CRC, ignored by readers.
    pub res: u16,
}

impl MetaHeader {
    fn decode(b: &[u8]) -> Self {
        MetaHeader {
            crc: get_u32(b, 0),
            seq: b[4],
            version: b[5],
            res: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    fn encode_tail(&self, b: &mut [u8]) {
        b[4] = self.seq;
        b[5] = self.version;
        b[6..8].copy_from_slice(&self.res.to_le_bytes());
    }
}

/// A record stored in two slots and selected by CRC and sequence (§5.1).
pub trait DualRecord: Sized + Copy {
    /// Encoded size in bytes (a multiple of 8).
    const SIZE: usize;
    /// Decodes the record from exactly `SIZE` bytes (any bytes decode).
    fn decode(bytes: &[u8]) -> Self;
    /// Encodes the record with a freshly computed CRC.
    fn encode(&self) -> alloc::vec::Vec<u8>;
    /// The header.
    fn header(&self) -> MetaHeader;
    /// The CRC the content calls for (over bytes 4..SIZE).
    fn computed_crc(&self) -> u32;
    /// Sets the sequence number (the CRC is computed by `encode`).
    fn set_seq(&mut self, seq: u8);
    /// Whether the stored CRC matches the content.
    fn crc_ok(&self) -> bool {
        self.header().crc == self.computed_crc()
    }
}

macro_rules! dual_record {
    ($t:ty, $size:expr) => {
        impl DualRecord for $t {
            const SIZE: usize = $size;
            fn decode(bytes: &[u8]) -> Self {
                let mut a = [0u8; $size];
                a.copy_from_slice(&bytes[..$size]);
                <$t>::from_bytes(&a)
            }
            fn encode(&self) -> alloc::vec::Vec<u8> {
                self.to_bytes().to_vec()
            }
            fn header(&self) -> MetaHeader {
                self.header
            }
            fn computed_crc(&self) -> u32 {
                pcache_crc(&self.raw_bytes()[4..])
            }
            fn set_seq(&mut self, seq: u8) {
                self.header.seq = seq;
            }
        }
    };
}

// ---------------------------------------------------------------------------
// §3.2 superblock
// ---------------------------------------------------------------------------

/// `pcache_sb`, 24 bytes at dev+4096.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Superblock {
    /// Stored CRC over bytes 4..23.
    pub crc: u32,
    /// Flags (bit 0: big-endian host).
    pub flags: u32,
    /// [`PCACHE_MAGIC`]; 0 = unformatted.
    pub magic: u64,
    /// Number of physical segments.
    pub seg_num: u32,
    /// Padding bytes 20..23, inside the CRC (kept as found by the kernel).
    pub pad: u32,
}

impl Superblock {
    /// Encoded size.
    pub const SIZE: usize = 24;

    /// Decodes 24 bytes.
    pub fn from_bytes(b: &[u8; 24]) -> Self {
        Superblock {
            crc: get_u32(b, 0),
            flags: get_u32(b, 4),
            magic: get_u64(b, 8),
            seg_num: get_u32(b, 16),
            pad: get_u32(b, 20),
        }
    }

    /// The bytes as stored (with the stored CRC).
    pub fn raw_bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        put_u32(&mut b, 0, self.crc);
        put_u32(&mut b, 4, self.flags);
        put_u64(&mut b, 8, self.magic);
        put_u32(&mut b, 16, self.seg_num);
        put_u32(&mut b, 20, self.pad);
        b
    }

    /// The CRC the content calls for.
    pub fn computed_crc(&self) -> u32 {
        pcache_crc(&self.raw_bytes()[4..])
    }

    /// Whether the stored CRC matches.
    pub fn crc_ok(&self) -> bool {
        self.crc == self.computed_crc()
    }

    /// A superblock for `seg_num` segments with the given padding, CRC computed.
    pub fn new(seg_num: u32, pad: u32) -> Self {
        let mut sb = Superblock {
            crc: 0,
            flags: 0,
            magic: PCACHE_MAGIC,
            seg_num,
            pad,
        };
        sb.crc = sb.computed_crc();
        sb
    }

    /// The bytes with a freshly computed CRC.
    pub fn to_bytes(&self) -> [u8; 24] {
        let mut s = *self;
        s.crc = s.computed_crc();
        s.raw_bytes()
    }
}

// ---------------------------------------------------------------------------
// §3.3 cache_info
// ---------------------------------------------------------------------------

/// `pcache_cache_info`, 24 bytes, slots at dev+8192 and dev+12288.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheInfo {
    /// Header (CRC over bytes 4..23).
    pub header: MetaHeader,
    /// Physical segment id of cache segment 0.
    pub seg_id: u32,
    /// Number of segments in the chain.
    pub n_segs: u32,
    /// Flags (DATA_CRC, INIT_DONE, mode, gc_percent).
    pub flags: u32,
    /// Reserved (0).
    pub reserved: u32,
}

impl CacheInfo {
    /// Decodes 24 bytes.
    pub fn from_bytes(b: &[u8; 24]) -> Self {
        CacheInfo {
            header: MetaHeader::decode(b),
            seg_id: get_u32(b, 8),
            n_segs: get_u32(b, 12),
            flags: get_u32(b, 16),
            reserved: get_u32(b, 20),
        }
    }

    /// The bytes as stored.
    pub fn raw_bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        put_u32(&mut b, 0, self.header.crc);
        self.header.encode_tail(&mut b);
        put_u32(&mut b, 8, self.seg_id);
        put_u32(&mut b, 12, self.n_segs);
        put_u32(&mut b, 16, self.flags);
        put_u32(&mut b, 20, self.reserved);
        b
    }

    /// The bytes with a freshly computed CRC.
    pub fn to_bytes(&self) -> [u8; 24] {
        let mut b = self.raw_bytes();
        let crc = pcache_crc(&b[4..]);
        put_u32(&mut b, 0, crc);
        b
    }

    /// Flags of a fresh cache: INIT_DONE clear, mode 0, gc_percent 70, DATA_CRC as asked.
    pub fn default_flags(data_crc: bool) -> u32 {
        (GC_PERCENT_DEFAULT << CACHE_INFO_GC_SHIFT)
            | if data_crc { CACHE_INFO_F_DATA_CRC } else { 0 }
    }

    /// DATA_CRC flag.
    pub fn data_crc(&self) -> bool {
        self.flags & CACHE_INFO_F_DATA_CRC != 0
    }

    /// INIT_DONE flag.
    pub fn init_done(&self) -> bool {
        self.flags & CACHE_INFO_F_INIT_DONE != 0
    }

    /// Cache mode (0 = writeback).
    pub fn cache_mode(&self) -> u32 {
        (self.flags >> CACHE_INFO_MODE_SHIFT) & CACHE_INFO_MODE_MASK
    }

    /// gc_percent.
    pub fn gc_percent(&self) -> u32 {
        (self.flags >> CACHE_INFO_GC_SHIFT) & CACHE_INFO_GC_MASK
    }
}

dual_record!(CacheInfo, 24);

// ---------------------------------------------------------------------------
// §3.4 cache_pos_onmedia (tails)
// ---------------------------------------------------------------------------

/// `pcache_cache_pos_onmedia`, 16 bytes: a log position (key_tail, dirty_tail).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CachePosOnMedia {
    /// Header (CRC over bytes 4..15).
    pub header: MetaHeader,
    /// Cache segment id (chain index).
    pub cache_seg_id: u32,
    /// Offset inside that segment's data area.
    pub seg_off: u32,
}

impl CachePosOnMedia {
    /// Decodes 16 bytes.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        CachePosOnMedia {
            header: MetaHeader::decode(b),
            cache_seg_id: get_u32(b, 8),
            seg_off: get_u32(b, 12),
        }
    }

    /// The bytes as stored.
    pub fn raw_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        put_u32(&mut b, 0, self.header.crc);
        self.header.encode_tail(&mut b);
        put_u32(&mut b, 8, self.cache_seg_id);
        put_u32(&mut b, 12, self.seg_off);
        b
    }

    /// The bytes with a freshly computed CRC.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = self.raw_bytes();
        let crc = pcache_crc(&b[4..]);
        put_u32(&mut b, 0, crc);
        b
    }
}

dual_record!(CachePosOnMedia, 16);

// ---------------------------------------------------------------------------
// §3.5 segment info
// ---------------------------------------------------------------------------

/// `pcache_segment_info`, 16 bytes, slots at segment+0 and segment+4096.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SegInfo {
    /// Header (CRC over bytes 4..15).
    pub header: MetaHeader,
    /// Flags (HAS_NEXT, type).
    pub flags: u32,
    /// Physical id of the next segment (valid iff HAS_NEXT).
    pub next_seg: u32,
}

impl SegInfo {
    /// Decodes 16 bytes.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        SegInfo {
            header: MetaHeader::decode(b),
            flags: get_u32(b, 8),
            next_seg: get_u32(b, 12),
        }
    }

    /// The bytes as stored.
    pub fn raw_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        put_u32(&mut b, 0, self.header.crc);
        self.header.encode_tail(&mut b);
        put_u32(&mut b, 8, self.flags);
        put_u32(&mut b, 12, self.next_seg);
        b
    }

    /// The bytes with a freshly computed CRC.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = self.raw_bytes();
        let crc = pcache_crc(&b[4..]);
        put_u32(&mut b, 0, crc);
        b
    }

    /// HAS_NEXT flag.
    pub fn has_next(&self) -> bool {
        self.flags & SEG_INFO_F_HAS_NEXT != 0
    }

    /// Segment type field.
    pub fn seg_type(&self) -> u32 {
        (self.flags >> SEG_INFO_TYPE_SHIFT) & SEG_INFO_TYPE_MASK
    }
}

dual_record!(SegInfo, 16);

// ---------------------------------------------------------------------------
// §3.6 segment generation
// ---------------------------------------------------------------------------

/// `pcache_cache_seg_gen`, 16 bytes, slots at segment+8192 and segment+8208.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SegGen {
    /// Header (CRC over bytes 4..15).
    pub header: MetaHeader,
    /// Segment generation.
    pub gen: u64,
}

impl SegGen {
    /// Decodes 16 bytes.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        SegGen {
            header: MetaHeader::decode(b),
            gen: get_u64(b, 8),
        }
    }

    /// The bytes as stored.
    pub fn raw_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        put_u32(&mut b, 0, self.header.crc);
        self.header.encode_tail(&mut b);
        put_u64(&mut b, 8, self.gen);
        b
    }

    /// The bytes with a freshly computed CRC.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = self.raw_bytes();
        let crc = pcache_crc(&b[4..]);
        put_u32(&mut b, 0, crc);
        b
    }
}

dual_record!(SegGen, 16);

// ---------------------------------------------------------------------------
// §3.7 key
// ---------------------------------------------------------------------------

/// `pcache_cache_key_onmedia`, 40 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KeyOnMedia {
    /// Logical byte offset on the backing device.
    pub off: u64,
    /// Length in bytes.
    pub len: u32,
    /// Flags (EMPTY, CLEAN).
    pub flags: u32,
    /// Cache segment holding the data.
    pub cache_seg_id: u32,
    /// Offset of the data inside that segment's data area.
    pub cache_seg_off: u32,
    /// Generation of the segment at allocation time.
    pub seg_gen: u64,
    /// CRC of the data (DATA_CRC caches only).
    pub data_crc: u32,
    /// Reserved (0).
    pub reserved: u32,
}

impl KeyOnMedia {
    /// Decodes 40 bytes.
    pub fn from_bytes(b: &[u8; 40]) -> Self {
        KeyOnMedia {
            off: get_u64(b, 0),
            len: get_u32(b, 8),
            flags: get_u32(b, 12),
            cache_seg_id: get_u32(b, 16),
            cache_seg_off: get_u32(b, 20),
            seg_gen: get_u64(b, 24),
            data_crc: get_u32(b, 32),
            reserved: get_u32(b, 36),
        }
    }

    /// Encodes 40 bytes.
    pub fn to_bytes(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        put_u64(&mut b, 0, self.off);
        put_u32(&mut b, 8, self.len);
        put_u32(&mut b, 12, self.flags);
        put_u32(&mut b, 16, self.cache_seg_id);
        put_u32(&mut b, 20, self.cache_seg_off);
        put_u64(&mut b, 24, self.seg_gen);
        put_u32(&mut b, 32, self.data_crc);
        put_u32(&mut b, 36, self.reserved);
        b
    }

    /// Checks every value a reader would use as an index or a length, against a
    /// chain of `n_segs` segments (§3.7; bounds no kernel version checks).
    pub fn validate(&self, n_segs: u32) -> Result<(), KeyError> {
        if self.len == 0 {
            return Err(KeyError::ZeroLength);
        }
        if self.off % SECTOR_SIZE != 0 || self.len as u64 % SECTOR_SIZE != 0 {
            return Err(KeyError::Unaligned {
                off: self.off,
                len: self.len,
            });
        }
        if self.len as u64 > CACHE_SUBTREE_SIZE
            || (self.off % CACHE_SUBTREE_SIZE) + self.len as u64 > CACHE_SUBTREE_SIZE
        {
            return Err(KeyError::CrossesSubtree {
                off: self.off,
                len: self.len,
            });
        }
        if self.off.checked_add(self.len as u64).is_none() {
            return Err(KeyError::CrossesSubtree {
                off: self.off,
                len: self.len,
            });
        }
        if self.flags & !(KEY_F_CLEAN) != 0 {
            return Err(KeyError::Flags { flags: self.flags });
        }
        if self.cache_seg_id >= n_segs {
            return Err(KeyError::SegmentOutOfRange {
                cache_seg_id: self.cache_seg_id,
                n_segs,
            });
        }
        if self.cache_seg_off as u64 + self.len as u64 > DATA_SIZE {
            return Err(KeyError::BeyondDataArea {
                cache_seg_off: self.cache_seg_off,
                len: self.len,
            });
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
// §3.8 key-set
// ---------------------------------------------------------------------------

/// `pcache_cache_kset_onmedia` header, 24 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KsetHeader {
    /// Stored CRC.
    pub crc: u32,
    /// Number of keys (normal) or next log segment's cache id (LAST).
    pub key_num: u32,
    /// [`KSET_MAGIC`].
    pub magic: u64,
    /// Flags (bit 0 LAST).
    pub flags: u64,
}

impl KsetHeader {
    /// Decodes 24 bytes.
    pub fn from_bytes(b: &[u8; 24]) -> Self {
        KsetHeader {
            crc: get_u32(b, 0),
            key_num: get_u32(b, 4),
            magic: get_u64(b, 8),
            flags: get_u64(b, 16),
        }
    }

    /// The bytes as stored.
    pub fn raw_bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        put_u32(&mut b, 0, self.crc);
        put_u32(&mut b, 4, self.key_num);
        put_u64(&mut b, 8, self.magic);
        put_u64(&mut b, 16, self.flags);
        b
    }

    /// LAST flag.
    pub fn is_last(&self) -> bool {
        self.flags & KSET_F_LAST != 0
    }
}

/// A valid key-set log record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Kset {
    /// A normal key-set with 1..=128 keys.
    Keys {
        /// The keys, in log order.
        keys: alloc::vec::Vec<KeyOnMedia>,
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
    pub fn to_bytes(&self) -> alloc::vec::Vec<u8> {
        let mut b = alloc::vec![0u8; self.size()];
        match self {
            Kset::Keys { keys } => {
                put_u32(&mut b, 4, keys.len() as u32);
                for (i, k) in keys.iter().enumerate() {
                    let o = KSET_HEADER_SIZE + i * KEY_SIZE;
                    b[o..o + KEY_SIZE].copy_from_slice(&k.to_bytes());
                }
            }
            Kset::Last { next_cache_seg_id } => {
                put_u32(&mut b, 4, *next_cache_seg_id);
                put_u64(&mut b, 16, KSET_F_LAST);
            }
        }
        put_u64(&mut b, 8, KSET_MAGIC);
        let crc = pcache_crc(&b[4..]);
        put_u32(&mut b, 0, crc);
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
    if buf.len() < KSET_HEADER_SIZE {
        return Err(KsetError::NoRoom {
            space: buf.len() as u64,
        });
    }
    let mut h = [0u8; 24];
    h.copy_from_slice(&buf[..24]);
    let hdr = KsetHeader::from_bytes(&h);
    if hdr.magic != KSET_MAGIC {
        if h == [0u8; 24] {
            return Err(KsetError::Terminator);
        }
        return Err(KsetError::NoMagic { magic: hdr.magic });
    }
    // The size the header claims (u64: key_num is untrusted).
    let size = if hdr.is_last() {
        KSET_HEADER_SIZE as u64
    } else {
        KSET_HEADER_SIZE as u64 + hdr.key_num as u64 * KEY_SIZE as u64
    };
    if size > buf.len() as u64 {
        return Err(KsetError::CrcUnverifiable {
            size,
            space: buf.len() as u64,
        });
    }
    let size = size as usize;
    let computed = pcache_crc(&buf[4..size]);
    if computed != hdr.crc {
        return Err(KsetError::CrcMismatch {
            stored: hdr.crc,
            computed,
        });
    }
    if !hdr.is_last() {
        if hdr.key_num == 0 || hdr.key_num > KSET_KEYS_MAX {
            return Err(KsetError::KeyNumOutOfRange {
                key_num: hdr.key_num,
            });
        }
        // The writer leaves room for a terminator after every normal record.
        if size + KSET_HEADER_SIZE > buf.len() {
            return Err(KsetError::TooLarge {
                size: size as u64,
                space: buf.len() as u64,
            });
        }
    }
    if hdr.flags & !KSET_F_LAST != 0 {
        return Err(KsetError::Flags { flags: hdr.flags });
    }
    if hdr.is_last() {
        if hdr.key_num >= n_segs {
            return Err(KsetError::NextSegmentOutOfRange {
                next_cache_seg_id: hdr.key_num,
                n_segs,
            });
        }
        return Ok(Kset::Last {
            next_cache_seg_id: hdr.key_num,
        });
    }
    let mut keys = alloc::vec::Vec::with_capacity(hdr.key_num as usize);
    for i in 0..hdr.key_num as usize {
        let o = KSET_HEADER_SIZE + i * KEY_SIZE;
        let mut kb = [0u8; 40];
        kb.copy_from_slice(&buf[o..o + KEY_SIZE]);
        let key = KeyOnMedia::from_bytes(&kb);
        key.validate(n_segs).map_err(|error| KsetError::BadKey {
            index: i as u32,
            error,
        })?;
        keys.push(key);
    }
    Ok(Kset::Keys { keys })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn hex(s: &str) -> Vec<u8> {
        let s: alloc::string::String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

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
            assert_eq!(sb.crc, crc);
            assert_eq!(sb.to_bytes().to_vec(), hex(bytes));
            let mut a = [0u8; 24];
            a.copy_from_slice(&hex(bytes));
            let d = Superblock::from_bytes(&a);
            assert!(d.crc_ok());
            assert_eq!(d, sb);
        }
    }

    fn ci(seq: u8, seg_id: u32, n_segs: u32, flags: u32) -> CacheInfo {
        CacheInfo {
            header: MetaHeader {
                seq,
                ..Default::default()
            },
            seg_id,
            n_segs,
            flags,
            reserved: 0,
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
            let d = <CacheInfo as DualRecord>::decode(&hex(bytes));
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
            cache_seg_id: cseg,
            seg_off: off,
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
            let d = <CachePosOnMedia as DualRecord>::decode(&hex(bytes));
            assert!(d.crc_ok());
            assert_eq!((d.cache_seg_id, d.seg_off), (rec.cache_seg_id, rec.seg_off));
        }
    }

    #[test]
    fn seg_info_and_gen_vectors() {
        let si = |seq, flags, next_seg| SegInfo {
            header: MetaHeader {
                seq,
                ..Default::default()
            },
            flags,
            next_seg,
        };
        let sg = |seq, gen| SegGen {
            header: MetaHeader {
                seq,
                ..Default::default()
            },
            gen,
        };
        assert_eq!(
            si(1, 2, 0).to_bytes().to_vec(),
            hex("fe258dfc 01000000 02000000 00000000")
        );
        assert_eq!(
            si(2, 3, 1).to_bytes().to_vec(),
            hex("318e663b 02000000 03000000 01000000")
        );
        assert_eq!(
            sg(1, 0).to_bytes().to_vec(),
            hex("b0dff56e 01000000 00000000 00000000")
        );
        assert_eq!(
            sg(2, 1).to_bytes().to_vec(),
            hex("c7de5b74 02000000 01000000 00000000")
        );
        assert_eq!(si(1, 2, 0).computed_crc(), 0xfc8d_25fe);
        assert_eq!(si(2, 3, 1).computed_crc(), 0x3b66_8e31);
        assert_eq!(sg(1, 0).computed_crc(), 0x6ef5_dfb0);
        assert_eq!(sg(2, 1).computed_crc(), 0x745b_dec7);
        let d = <SegInfo as DualRecord>::decode(&hex("318e663b 02000000 03000000 01000000"));
        assert!(d.crc_ok() && d.has_next() && d.seg_type() == SEG_TYPE_CACHE_DATA);
        let g = <SegGen as DualRecord>::decode(&hex("c7de5b74 02000000 01000000 00000000"));
        assert!(g.crc_ok() && g.gen == 1 && g.header.seq == 2);
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
            off: 0,
            len: 4096,
            flags: 0,
            cache_seg_id: 1,
            cache_seg_off: 0,
            seg_gen: 0,
            data_crc: 0,
            reserved: 0,
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
            off: 0x10_0000,
            len: 4096,
            flags: KEY_F_CLEAN,
            cache_seg_id: 2,
            cache_seg_off: 4096,
            seg_gen: 7,
            data_crc: 0x6cfb_71ab,
            reserved: 0,
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
            off: 0,
            len: 4096,
            cache_seg_id: 40,
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
            off: 4 * MB - 4096,
            len: 4096,
            cache_seg_id: 3,
            cache_seg_off: (DATA_SIZE - 4096) as u32,
            ..Default::default()
        };
        assert_eq!(ok.validate(4), Ok(()));
        assert!(ok.validate(3).is_err());
        let cross = KeyOnMedia { len: 8192, ..ok };
        assert!(matches!(
            cross.validate(4),
            Err(KeyError::CrossesSubtree { .. })
        ));
        let beyond = KeyOnMedia {
            off: 0,
            len: 8192,
            ..ok
        };
        assert!(matches!(
            beyond.validate(4),
            Err(KeyError::BeyondDataArea { .. })
        ));
        let empty = KeyOnMedia {
            flags: KEY_F_EMPTY,
            ..ok
        };
        assert!(matches!(empty.validate(4), Err(KeyError::Flags { .. })));
        let huge = KeyOnMedia {
            off: u64::MAX - 511,
            len: 512,
            ..ok
        };
        assert!(huge.validate(4).is_err());
    }
}
