//! Segments (kernel `segment.c` and the segment part of `cache_segment.c`):
//! per-segment info and generation records (§3.5, §3.6), each a dual copy, and
//! the formatting of a segment (§5.4 step 2, §8 C3).

use serde::Serialize;

use crate::format::{
    data_pos, seg_gen_slot_off, seg_info_slot_off, seg_off, SegGen, SegInfo, KSET_HEADER_SIZE,
    SEG_GEN_STRIDE, SEG_HEADER_SIZE, SEG_INFO_F_HAS_NEXT, SEG_INFO_SIZE, SEG_INFO_TYPE_SHIFT,
    SEG_TYPE_CACHE_DATA,
};
use crate::hooks::{CrashPoint, Hooks};
use crate::meta::{read_slots, write_dual, DualCopy, Policy, Slots};
use crate::pmem::{write_words, Pmem, PmemError};

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
            flags: SEG_INFO_FLAGS_LAST,
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
        gen: g.gen,
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
    info.flags |= SEG_INFO_F_HAS_NEXT;
    info.next_seg = next;
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
