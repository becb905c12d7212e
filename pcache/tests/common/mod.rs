//! Helpers shared by the integration tests.
#![allow(dead_code)]

use pcache::format::*;
use pcache::pmem::{Pmem, SparsePmem};
use pcache::records::*;
use pcache::{activate, ActivationReport, Mode, NoHooks, Options, Outcome};

pub const MIB: u64 = 1 << 20;
pub const SIZE_512M: u64 = 512 * MIB;
pub const SIZE_1G: u64 = 1024 * MIB;

pub fn opts(mode: Mode) -> Options {
    Options {
        mode,
        data_crc: false,
    }
}

pub const MODES: [Mode; 2] = [Mode::Strict, Mode::Recover];

/// Deactivates `cache` (closing its open key-set) and activates the device
/// again, which must open it (replaying its log).
pub fn reopen(cache: pcache::Cache, pmem: &mut SparsePmem, mode: Mode) -> pcache::Cache {
    pcache::deactivate(
        cache,
        pmem,
        &mut pcache::backing::ZeroBacking { sectors: 0 },
        &mut NoHooks,
    )
    .unwrap();
    let a = pcache::start(pmem, &opts(mode), &mut NoHooks);
    assert_eq!(a.report.outcome, Outcome::Opened, "{}", a.report);
    a.cache.unwrap()
}

/// Distinct bytes for write `id` of `len` bytes (each 512-byte sector and
/// each write differ), for tests that compare with a plain byte model.
pub fn content(id: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (id as u8).wrapping_mul(31) ^ (i / 512) as u8 ^ (i as u8))
        .collect()
}

pub fn act(dev: &mut SparsePmem, mode: Mode) -> ActivationReport {
    activate(dev, &opts(mode), &mut NoHooks)
}

/// A blank device after one first activation.
pub fn formatted(size: u64, mode: Mode) -> SparsePmem {
    let mut dev = SparsePmem::new(size);
    let r = act(&mut dev, mode);
    assert_eq!(r.outcome, Outcome::Formatted, "{r}");
    dev
}

pub fn read_vec(dev: &impl Pmem, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    dev.read(off, &mut b).unwrap();
    b
}

pub fn read_u64(dev: &impl Pmem, off: u64) -> u64 {
    u64::from_le_bytes(read_vec(dev, off, 8).try_into().unwrap())
}

pub fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn hdr(seq: u8) -> MetaHeader {
    MetaHeader {
        seq,
        ..Default::default()
    }
}

pub fn cache_info_rec(seq: u8, n_segs: u32, flags: u32) -> Vec<u8> {
    CacheInfo {
        header: hdr(seq),
        seg_id: 0.into(),
        n_segs: n_segs.into(),
        flags: flags.into(),
        reserved: 0.into(),
    }
    .to_bytes()
}

pub fn pos_rec(seq: u8, cseg: u32, off: u32) -> Vec<u8> {
    CachePosOnMedia {
        header: hdr(seq),
        cache_seg_id: cseg.into(),
        seg_off: off.into(),
    }
    .to_bytes()
}

pub fn seg_info_rec(seq: u8, flags: u32, next: u32) -> Vec<u8> {
    SegInfo {
        header: hdr(seq),
        flags: flags.into(),
        next_seg: next.into(),
    }
    .to_bytes()
}

pub fn seg_gen_rec(seq: u8, gen: u64) -> Vec<u8> {
    SegGen {
        header: hdr(seq),
        gen: gen.into(),
    }
    .to_bytes()
}

/// The image `docs/format.md` §5.10 says a kernel (M2/H) leaves after the first activation of
/// a blank device, built independently of the activation code.
pub fn expected_fresh_image(size: u64, data_crc: bool) -> SparsePmem {
    let seg_num = ((size - SEGMENTS_OFF) / SEG_SIZE) as u32;
    let mut img = SparsePmem::new(size);
    img.write_bytes(SB_OFF, &Superblock::new(seg_num, 0).to_bytes())
        .unwrap();
    let flags = if data_crc { 0x1183 } else { 0x1182 };
    img.write_bytes(
        CACHE_INFO_OFF + CACHE_INFO_SIZE,
        &cache_info_rec(1, seg_num, flags),
    )
    .unwrap();
    img.write_bytes(KEY_TAIL_OFF, &pos_rec(1, 0, 0)).unwrap();
    img.write_bytes(DIRTY_TAIL_OFF, &pos_rec(1, 0, 0)).unwrap();
    for s in 0..seg_num {
        let base = SEGMENTS_OFF + s as u64 * SEG_SIZE;
        img.write_bytes(base + 4096, &seg_info_rec(1, 0x2, 0))
            .unwrap();
        if s + 1 < seg_num {
            img.write_bytes(base, &seg_info_rec(2, 0x3, s + 1)).unwrap();
        }
        img.write_bytes(base + 8192 + 16, &seg_gen_rec(1, 0))
            .unwrap();
    }
    img
}

/// A device that held an older cache: formatted and activated `activations`
/// times in all, its tails moved along an empty log (as writeback and GC
/// would), then its superblock magic zeroed to ask for a re-format.
pub fn older_cache(activations: u32) -> SparsePmem {
    let mut dev = formatted(SIZE_512M, Mode::Strict);
    for _ in 1..activations {
        let r = act(&mut dev, Mode::Strict);
        assert_eq!(r.outcome, Outcome::Opened, "{r}");
    }
    // Tails: slot 0 seq 2 at 0:5144, slot 1 seq 3 at 0:10288 (latest).
    for base in [KEY_TAIL_OFF, DIRTY_TAIL_OFF] {
        dev.write_bytes(base, &pos_rec(2, 0, 5144)).unwrap();
        dev.write_bytes(base + 16, &pos_rec(3, 0, 10288)).unwrap();
    }
    let r = act(&mut dev, Mode::Strict);
    assert_eq!(r.outcome, Outcome::Opened, "{r}");
    assert_eq!(r.key_tail.unwrap().pos.seg_off, 10288);
    dev.write_bytes(SB_OFF + 8, &[0u8; 8]).unwrap();
    dev
}

/// cache_info seq an older cache from [`older_cache`] shows after one more open.
pub fn older_cache_next_seq(activations: u32) -> u8 {
    (activations + 2) as u8
}
