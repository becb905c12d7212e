//! Segments (kernel `segment.c` and the segment part of `cache_segment.c`):
//! per-segment info and generation records (`docs/format.md` §5.5, §5.6), each a dual copy, and
//! the formatting of a segment (`docs/format.md` §8.3 step 2, §10 C3).

use serde::Serialize;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::format::{
    data_pos, le, meta_record, seg_gen_slot_off, seg_info_slot_off, seg_off, MetaHeader,
    KSET_HEADER_SIZE, SEG_GEN_STRIDE, SEG_HEADER_SIZE, SEG_INFO_F_HAS_NEXT, SEG_INFO_SIZE,
    SEG_INFO_TYPE_MASK, SEG_INFO_TYPE_SHIFT, SEG_TYPE_CACHE_DATA,
};
use crate::hooks::{CrashPoint, Hooks};
use crate::meta::{read_slots, write_dual, DualCopy, Policy, Slots};
use crate::pmem::{write_words, Pmem, PmemError};

/// `struct pcache_segment_info`, 16 bytes, slots at segment+0 and segment+4096
/// (`docs/format.md` §5.5).
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
pub struct SegInfo {
    /// Header (CRC over bytes 4..15).
    pub header: MetaHeader,
    /// Flags (HAS_NEXT, type).
    #[serde(serialize_with = "le")]
    pub flags: U32,
    /// Physical id of the next segment (valid iff HAS_NEXT).
    #[serde(serialize_with = "le")]
    pub next_seg: U32,
}

meta_record!(SegInfo, 16);

impl SegInfo {
    /// HAS_NEXT flag.
    pub fn has_next(&self) -> bool {
        self.flags.get() & SEG_INFO_F_HAS_NEXT != 0
    }

    /// Segment type field.
    pub fn seg_type(&self) -> u32 {
        (self.flags.get() >> SEG_INFO_TYPE_SHIFT) & SEG_INFO_TYPE_MASK
    }
}

/// `struct pcache_cache_seg_gen`, 16 bytes, slots at segment+8192 and
/// segment+8208 (`docs/format.md` §5.6).
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
pub struct SegGen {
    /// Header (CRC over bytes 4..15).
    pub header: MetaHeader,
    /// Segment generation.
    #[serde(serialize_with = "le")]
    pub gen: U64,
}

meta_record!(SegGen, 16);

/// Flags of a cache-data segment at the end of the chain (0x2).
pub const SEG_INFO_FLAGS_LAST: u32 = SEG_TYPE_CACHE_DATA << SEG_INFO_TYPE_SHIFT;

/// In-memory state of one segment of the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// Physical segment id.
    pub pseg: u32,
    /// Latest segment info.
    pub info: SegInfo,
    /// Dual-copy state of the segment info.
    pub info_state: DualCopy,
    /// Current generation.
    pub gen: u64,
    /// Dual-copy state of the generation record.
    pub gen_state: DualCopy,
}

/// Reads both seg_info slots of physical segment `pseg`.
pub fn read_seg_info<P: Pmem + ?Sized>(pmem: &P, pseg: u32) -> Result<Slots<SegInfo>, PmemError> {
    read_slots(pmem, seg_info_slot_off(pseg, 0), SEG_INFO_SIZE)
}

/// Reads both generation slots of physical segment `pseg`.
pub fn read_seg_gen<P: Pmem + ?Sized>(pmem: &P, pseg: u32) -> Result<Slots<SegGen>, PmemError> {
    read_slots(pmem, seg_gen_slot_off(pseg, 0), SEG_GEN_STRIDE)
}

/// C3: formats physical segment `pseg` as the kernel does for a new cache:
/// zero the 12 KiB header (unfenced), write the generation record (gen 0, C7),
/// the segment info (last in chain, C6) and a 24-byte terminator at data
/// offset 0, each fenced.
pub fn format_segment<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    hooks: &mut H,
    pseg: u32,
) -> Result<Segment, PmemError> {
    hooks.begin(CrashPoint::SegFormat);
    pmem.zero_range(seg_off(pseg), SEG_HEADER_SIZE)?;
    pmem.flush(seg_off(pseg), SEG_HEADER_SIZE)?;

    let mut gen_state = DualCopy::fresh(Policy::A);
    let (_, g) = write_dual(
        pmem,
        hooks,
        CrashPoint::SegGen,
        seg_gen_slot_off(pseg, 0),
        SEG_GEN_STRIDE,
        &mut gen_state,
        SegGen::default(),
    )?;

    let mut info_state = DualCopy::fresh(Policy::A);
    let (_, info) = write_dual(
        pmem,
        hooks,
        CrashPoint::SegInfo,
        seg_info_slot_off(pseg, 0),
        SEG_INFO_SIZE,
        &mut info_state,
        SegInfo {
            flags: SEG_INFO_FLAGS_LAST.into(),
            ..Default::default()
        },
    )?;

    write_words(pmem, data_pos(pseg, 0), &[0u8; KSET_HEADER_SIZE])?;
    pmem.fence()?;
    hooks.end(CrashPoint::SegFormat);
    Ok(Segment {
        pseg,
        info,
        info_state,
        gen: g.gen.get(),
        gen_state,
    })
}

/// C6: links `seg` to physical segment `next` (HAS_NEXT, next_seg) with a
/// dual-copy update of its segment info.
pub fn link_segment<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    hooks: &mut H,
    seg: &mut Segment,
    next: u32,
) -> Result<(), PmemError> {
    let mut info = seg.info;
    info.flags.set(info.flags.get() | SEG_INFO_F_HAS_NEXT);
    info.next_seg.set(next);
    let (_, written) = write_dual(
        pmem,
        hooks,
        CrashPoint::SegInfo,
        seg_info_slot_off(seg.pseg, 0),
        SEG_INFO_SIZE,
        &mut seg.info_state,
        info,
    )?;
    seg.info = written;
    Ok(())
}

// ---------------------------------------------------------------------------
// Run-time allocation and references (kernel `cache_segment.c`, `docs/format.md` §9.1)
// ---------------------------------------------------------------------------

impl crate::cache::Cache {
    /// `get_cache_segment`: the first free cache segment from the next-fit
    /// hint, wrapping once; marks it used. `None` is "cache full". Searches
    /// [0, n_segs), as Linux 7.2.13 does. Writes nothing: a new data
    /// segment's old bytes stay until keys overwrite them.
    pub(crate) fn get_cache_segment(&mut self) -> Option<u32> {
        let n = self.segments.len() as u32;
        let from = self.rt.last_cache_seg.min(n);
        let found = (from..n).chain(0..from).find(|&i| !self.seg_map.test(i))?;
        self.seg_map.set(found);
        self.rt.last_cache_seg = found;
        Some(found)
    }

    /// `cache_seg_get`.
    pub(crate) fn seg_get(&mut self, cseg: u32) {
        if let Some(r) = self.refs.get_mut(cseg as usize) {
            *r += 1;
        }
    }

    /// `cache_seg_put`: drops a reference; the drop that brings the count
    /// to exactly zero invalidates the segment (as `atomic_dec_and_test`: a
    /// count already at zero goes negative and invalidates nothing — the
    /// kernel's unbalanced count after stale keys, `docs/format.md` §10.4).
    pub(crate) fn seg_put<P: Pmem + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        hooks: &mut H,
        cseg: u32,
    ) -> Result<(), PmemError> {
        let Some(r) = self.refs.get_mut(cseg as usize) else {
            return Ok(());
        };
        *r -= 1;
        if *r == 0 {
            self.invalidate_segment(pmem, hooks, cseg)?;
        }
        Ok(())
    }

    /// `cache_seg_invalidate`: generation + 1, persisted (C7, the other
    /// slot), then the segment is free for reuse. Keys written under the
    /// old generation are stale from then on.
    pub(crate) fn invalidate_segment<P: Pmem + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        hooks: &mut H,
        cseg: u32,
    ) -> Result<(), PmemError> {
        let seg = &mut self.segments[cseg as usize];
        seg.gen += 1;
        write_dual(
            pmem,
            hooks,
            CrashPoint::SegGen,
            seg_gen_slot_off(seg.pseg, 0),
            SEG_GEN_STRIDE,
            &mut seg.gen_state,
            SegGen {
                gen: seg.gen.into(),
                ..Default::default()
            },
        )?;
        self.seg_map.clear(cseg);
        self.rt.invalidations += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{DualRecord, Record};
    use alloc::vec::Vec;

    fn hex(s: &str) -> Vec<u8> {
        let s: alloc::string::String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn seg_info_and_gen_vectors() {
        let si = |seq, flags: u32, next_seg: u32| SegInfo {
            header: MetaHeader::with_seq(seq),
            flags: flags.into(),
            next_seg: next_seg.into(),
        };
        let sg = |seq, gen: u64| SegGen {
            header: MetaHeader::with_seq(seq),
            gen: gen.into(),
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
        let d = SegInfo::read_from_bytes(&hex("318e663b 02000000 03000000 01000000")).unwrap();
        assert!(d.crc_ok() && d.has_next() && d.seg_type() == SEG_TYPE_CACHE_DATA);
        let g = SegGen::read_from_bytes(&hex("c7de5b74 02000000 01000000 00000000")).unwrap();
        assert!(g.crc_ok() && g.gen == 1 && g.header().seq == 2);
    }
}
