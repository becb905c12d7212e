//! The self-describing sector pattern.
//!
//! Sector layout (512 bytes):
//!
//! | bytes | content |
//! |---|---|
//! | 0..8 | [`MAGIC`] |
//! | 8..12 | write id, little-endian (0: the backing disk's original content) |
//! | 12..16 | zero |
//! | 16..24 | the sector's LBA (512-byte units), little-endian |
//! | 24..512 | a pseudo-random stream seeded from (id, LBA) |
//!
//! The body makes a torn or misdirected sector detectable: a right header over
//! another sector's body, or a sector written at the wrong LBA, is garbage.

use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes in a sector.
pub const SECTOR: usize = 512;

/// The first 8 bytes of every patterned sector.
pub const MAGIC: [u8; 8] = *b"PCWLSECT";

const HEADER: usize = 24;

/// splitmix64, written out rather than taken from a crate: it must be
/// bit-identical on host and guest, work without std, and is six lines.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn body_stream(id: u32, lba: u64) -> SplitMix64 {
    // One mixing round first so that neighbouring (id, lba) pairs start far apart.
    let mut s = SplitMix64(lba ^ (u64::from(id) << 40) ^ u64::from(id).rotate_right(7));
    SplitMix64(s.next_u64())
}

/// Writes the sector of write `id` (0: backing content) at `lba` into `out`.
pub fn fill_sector(id: u32, lba: u64, out: &mut [u8; SECTOR]) {
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&id.to_le_bytes());
    out[12..16].fill(0);
    out[16..24].copy_from_slice(&lba.to_le_bytes());
    let mut rng = body_stream(id, lba);
    // 488 body bytes are exactly 61 words.
    for chunk in out[HEADER..].chunks_exact_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
}

/// Fills `buf` with write `id`'s sectors for the byte range starting at `off`.
///
/// # Panics
/// If `off` or `buf.len()` is not a multiple of [`SECTOR`].
pub fn fill(id: u32, off: u64, buf: &mut [u8]) {
    assert!(
        off % SECTOR as u64 == 0 && buf.len() % SECTOR == 0,
        "pattern::fill: range {off}+{} is not sector-aligned",
        buf.len()
    );
    let first = off / SECTOR as u64;
    for (i, chunk) in buf.chunks_exact_mut(SECTOR).enumerate() {
        let sector: &mut [u8; SECTOR] = chunk.try_into().expect("chunks_exact");
        fill_sector(id, first + i as u64, sector);
    }
}

/// What a sector read back is.
///
/// Serialized as one integer: `0` backing, the id for a write, `-1` garbage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tag {
    /// The backing disk's original content (the pattern with id 0).
    Backing,
    /// The complete sector of write `id` (≥ 1) for this LBA.
    Write(u32),
    /// Anything else: no magic, a torn body, another LBA's sector, zeros.
    Garbage,
}

impl Tag {
    /// The serialized integer.
    pub fn to_i64(self) -> i64 {
        match self {
            Tag::Backing => 0,
            Tag::Write(id) => i64::from(id),
            Tag::Garbage => -1,
        }
    }

    /// The tag of a serialized integer; `None` outside -1..=u32::MAX.
    pub fn from_i64(v: i64) -> Option<Tag> {
        match v {
            -1 => Some(Tag::Garbage),
            0 => Some(Tag::Backing),
            _ => u32::try_from(v).ok().map(Tag::Write),
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tag::Backing => f.write_str("backing"),
            Tag::Write(id) => write!(f, "write {id}"),
            Tag::Garbage => f.write_str("garbage"),
        }
    }
}

impl Serialize for Tag {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(self.to_i64())
    }
}

impl<'de> Deserialize<'de> for Tag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        Tag::from_i64(v).ok_or_else(|| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Signed(v),
                &"-1 (garbage), 0 (backing) or a write id",
            )
        })
    }
}

/// Classifies the sector read at `lba` by regenerating it whole.
pub fn classify(lba: u64, sector: &[u8; SECTOR]) -> Tag {
    if sector[..8] != MAGIC || sector[12..16] != [0; 4] || sector[16..24] != lba.to_le_bytes() {
        return Tag::Garbage;
    }
    let id = u32::from_le_bytes(sector[8..12].try_into().expect("4 bytes"));
    let mut rng = body_stream(id, lba);
    let body_ok = sector[HEADER..]
        .chunks_exact(8)
        .all(|w| w == rng.next_u64().to_le_bytes());
    match (body_ok, id) {
        (false, _) => Tag::Garbage,
        (true, 0) => Tag::Backing,
        (true, id) => Tag::Write(id),
    }
}

/// Consecutive sectors with the same tag (`sector`, `count` in 512-byte units).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRun {
    pub sector: u64,
    pub count: u64,
    pub tag: Tag,
}

/// Classifies every sector of `data`, read from byte offset `off`, merging
/// neighbours with the same tag into runs.
///
/// # Panics
/// If `off` or `data.len()` is not a multiple of [`SECTOR`].
pub fn classify_range(off: u64, data: &[u8]) -> Vec<TagRun> {
    assert!(
        off % SECTOR as u64 == 0 && data.len() % SECTOR == 0,
        "pattern::classify_range: range {off}+{} is not sector-aligned",
        data.len()
    );
    let first = off / SECTOR as u64;
    let mut runs: Vec<TagRun> = Vec::new();
    for (i, chunk) in data.chunks_exact(SECTOR).enumerate() {
        let lba = first + i as u64;
        let tag = classify(lba, chunk.try_into().expect("chunks_exact"));
        match runs.last_mut() {
            Some(r) if r.tag == tag => r.count += 1,
            _ => runs.push(TagRun {
                sector: lba,
                count: 1,
                tag,
            }),
        }
    }
    runs
}

/// FNV-1a (64-bit) of `data`: a cheap fingerprint for a `read` step's result.
pub fn digest(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn sector(id: u32, lba: u64) -> [u8; SECTOR] {
        let mut s = [0u8; SECTOR];
        fill_sector(id, lba, &mut s);
        s
    }

    #[test]
    fn header_layout() {
        let s = sector(0x0102_0304, 0x1122_3344_5566);
        assert_eq!(&s[..8], b"PCWLSECT");
        assert_eq!(s[8..12], [4, 3, 2, 1]);
        assert_eq!(s[12..16], [0; 4]);
        assert_eq!(s[16..24], 0x1122_3344_5566u64.to_le_bytes());
        // Bodies differ between ids and between LBAs.
        assert_ne!(s[24..], sector(0x0102_0305, 0x1122_3344_5566)[24..]);
        assert_ne!(s[24..], sector(0x0102_0304, 0x1122_3344_5567)[24..]);
    }

    #[test]
    fn body_is_pinned() {
        // Images and results written by one version are read by the next;
        // pin the stream so that a change to it is a deliberate one.
        assert_eq!(digest(&sector(1, 0)), PINNED[0]);
        assert_eq!(digest(&sector(0, 12_345)), PINNED[1]);
    }
    const PINNED: [u64; 2] = [0xac9e_9deb_a34e_e225, 0x8b2b_c30b_751d_2281];

    #[test]
    fn round_trip() {
        for (id, lba) in [(0, 0), (1, 0), (7, 123_456), (u32::MAX, u64::MAX)] {
            let want = if id == 0 {
                Tag::Backing
            } else {
                Tag::Write(id)
            };
            assert_eq!(classify(lba, &sector(id, lba)), want);
        }
    }

    #[test]
    fn damage_is_garbage() {
        let good = sector(5, 77);
        for i in [0, 7, 9, 12, 15, 16, 24, 300, 511] {
            let mut s = good;
            s[i] ^= 0x20;
            // A flipped id byte (8..12) names another write whose body differs.
            assert_eq!(classify(77, &s), Tag::Garbage, "byte {i}");
        }
        assert_eq!(classify(78, &good), Tag::Garbage, "wrong lba");
        assert_eq!(classify(0, &[0; SECTOR]), Tag::Garbage, "zeros");
        // The right header over another write's body (a torn sector).
        let mut torn = good;
        torn[200..].copy_from_slice(&sector(6, 77)[200..]);
        assert_eq!(classify(77, &torn), Tag::Garbage);
    }

    #[test]
    fn fill_and_classify_range_merge_runs() {
        let mut buf = vec![0u8; 10 * SECTOR];
        fill(3, 4096, &mut buf[..4 * SECTOR]);
        fill(0, 4096 + 4 * 512, &mut buf[4 * SECTOR..6 * SECTOR]);
        fill(4, 4096 + 6 * 512, &mut buf[6 * SECTOR..8 * SECTOR]);
        // Sectors 8 and 9 stay zero.
        let runs = classify_range(4096, &buf);
        let r = |sector, count, tag| TagRun { sector, count, tag };
        assert_eq!(
            runs,
            vec![
                r(8, 4, Tag::Write(3)),
                r(12, 2, Tag::Backing),
                r(14, 2, Tag::Write(4)),
                r(16, 2, Tag::Garbage),
            ]
        );
        assert!(classify_range(0, &[]).is_empty());
    }

    #[test]
    #[should_panic(expected = "not sector-aligned")]
    fn fill_rejects_unaligned() {
        fill(1, 100, &mut [0u8; SECTOR]);
    }

    #[test]
    fn tag_serializes_as_a_number() {
        let runs = vec![
            TagRun {
                sector: 1,
                count: 2,
                tag: Tag::Backing,
            },
            TagRun {
                sector: 3,
                count: 1,
                tag: Tag::Write(9),
            },
            TagRun {
                sector: 4,
                count: 5,
                tag: Tag::Garbage,
            },
        ];
        let json = serde_json::to_string(&runs).unwrap();
        assert_eq!(
            json,
            r#"[{"sector":1,"count":2,"tag":0},{"sector":3,"count":1,"tag":9},{"sector":4,"count":5,"tag":-1}]"#
        );
        let back: Vec<TagRun> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, runs);
        assert!(serde_json::from_str::<Tag>("-2").is_err());
        assert!(serde_json::from_str::<Tag>("4294967296").is_err());
        assert_eq!(
            serde_json::from_str::<Tag>("4294967295").unwrap(),
            Tag::Write(u32::MAX)
        );
    }

    #[test]
    fn digest_is_fnv1a() {
        assert_eq!(digest(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(digest(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(digest(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
