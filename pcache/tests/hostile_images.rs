//! Hostile whole images (property tests).
//!
//! Start from a formatted and activated 512 MiB image (three bases: tails at
//! 0:0; tails moved along the log; a chain that is not the identity), damage
//! random records — superblock fields, either cache_info copy, either copy of
//! key_tail / dirty_tail, seg_info and generation copies of random segments,
//! key-set headers, keys and LAST records at the start of the log (optionally
//! after moving both tails, e.g. next to the data-area end), a wipe of the
//! cache_info/ctrl area — with values biased to the edges (0, 1, n−1, n, n+1,
//! u32::MAX, the data-area end, …) and the record's CRC recomputed (so the
//! value is *used*), left stale, or the record zeroed. Then activate a copy in
//! each mode and inspect the images, and check the product's promises:
//!
//! - no panic, and every call returns (each case runs on a thread with a
//!   deadline; a hang fails the test instead of blocking it);
//! - no access leaves the device (it would come back as a `pmem` refusal or a
//!   failed log read in the inspector);
//! - a refusal issues no store, zeroing, flush or fence (recording double) and
//!   leaves the image byte-identical;
//! - any other outcome leaves a consistent cache: a valid superblock, the
//!   cache_info and tails the report names are the latest valid copies on
//!   media, 1 ≤ n_segs ≤ seg_num, the chain has n_segs segments, the tails lie
//!   in the chain and the data area (at 0:0 after a format), the inspector
//!   sees the same chain and an ordinary end of log; and activating the result
//!   again opens it at the same tails;
//! - recover mode (and any open) never overwrites the newest valid copy of a
//!   dual-copy record: every copy that was the latest before is still on
//!   media after, except what a format zeroes by design (cache_info and tails
//!   under a magic-0 superblock, which asks for a re-format; the segments a
//!   first activation formats).
//!
//! One exemption, the kernel's own behaviour that strict mode keeps: a strict
//! first activation under a valid superblock writes the tails as fresh
//! records (seq 1, slot 0) even over valid copies, so a stale copy with a
//! later seq can stay the latest (see `row2_first_activation_over_valid_tails`
//! in `outcomes.rs`). There the written slot is checked instead of the
//! latest, and neither the inspector cross-check nor the follow-up activation
//! is required.
//!
//! `checks_detect_faulty_activations` shows each check rejects an activation
//! with the fault it is aimed at; `generators_reach_every_outcome` that the
//! generators reach every outcome and refusal kind.

mod common;

use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use pcache::cache_dev::max_seg_num;
use pcache::format::*;
use pcache::inspect::{inspect, InspectOptions};
use pcache::meta::read_slots;
use pcache::pmem::{Pmem, RecordingPmem, SparsePmem};
use pcache::records::*;
use pcache::{activate, ActivationReport, Mode, NoHooks, Outcome, SbState};
use proptest::prelude::*;

const SEG_NUM: u32 = 31;
/// A case (two activations per mode, their follow-ups, three inspections)
/// takes milliseconds; this only catches a hang.
const DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Base images
// ---------------------------------------------------------------------------

/// Base images, built once: every one is a cache that opens.
fn bases() -> &'static [SparsePmem] {
    static B: OnceLock<Vec<SparsePmem>> = OnceLock::new();
    B.get_or_init(|| {
        // Formatted and activated once more: both cache_info copies valid
        // (slot 1 seq 1, slot 0 seq 2), tails at (0, 0) in slot 0.
        let mut a = formatted(SIZE_512M, Mode::Recover);
        assert_eq!(act(&mut a, Mode::Recover).outcome, Outcome::Opened);
        // Tails moved along an empty log (slot 0 seq 2 at 0:5144, slot 1
        // seq 3 at 0:10288, the latest), as writeback and GC leave them.
        let mut b = a.clone();
        for base in [KEY_TAIL_OFF, DIRTY_TAIL_OFF] {
            b.write_bytes(base, &pos_rec(2, 0, 5144)).unwrap();
            b.write_bytes(base + 16, &pos_rec(3, 0, 10288)).unwrap();
        }
        let r = act(&mut b, Mode::Recover);
        assert_eq!(r.outcome, Outcome::Opened, "{r}");
        // A chain that is not the identity: cache segment c is physical
        // segment (c + 7) mod 31, and the tails at cache segment 2
        // (physical 9), so cache and physical ids differ everywhere.
        let mut c = a.clone();
        let rot = |cseg: u32| (cseg + 7) % SEG_NUM;
        c.write_bytes(cache_info_slot_off(1), &[0u8; 24]).unwrap();
        c.write_bytes(
            cache_info_slot_off(0),
            &CacheInfo {
                header: MetaHeader {
                    seq: 9,
                    ..Default::default()
                },
                seg_id: (rot(0)).into(),
                n_segs: SEG_NUM.into(),
                flags: 0x1182.into(),
                reserved: 0.into(),
            }
            .to_bytes(),
        )
        .unwrap();
        for cseg in 0..SEG_NUM {
            let p = rot(cseg);
            let (flags, next) = if cseg + 1 < SEG_NUM {
                (0x3, rot(cseg + 1))
            } else {
                (0x2, 0)
            };
            c.write_bytes(seg_info_slot_off(p, 0), &seg_info_rec(5, flags, next))
                .unwrap();
            c.write_bytes(seg_info_slot_off(p, 1), &seg_info_rec(4, 0x2, 0))
                .unwrap();
        }
        for base in [KEY_TAIL_OFF, DIRTY_TAIL_OFF] {
            c.write_bytes(base, &pos_rec(1, 0, 0)).unwrap();
            c.write_bytes(base + 16, &pos_rec(2, 2, 4096)).unwrap();
        }
        let r = act(&mut c, Mode::Recover);
        assert_eq!(r.outcome, Outcome::Opened, "{r}");
        assert_eq!(
            r.key_tail.unwrap().pos,
            pcache::CachePos {
                cache_seg_id: 2,
                seg_off: 4096
            }
        );
        vec![a, b, c]
    })
}

/// The chain of an image as cache segment -> physical segment (the identity
/// when the image has no walkable chain).
fn chain_map(img: &SparsePmem) -> Vec<u32> {
    let identity = (0..SEG_NUM).collect();
    let ci = read_slots::<_, CacheInfo>(img, CACHE_INFO_OFF, CACHE_INFO_SIZE).unwrap();
    let Some((_, ci)) = ci.latest_record() else {
        return identity;
    };
    let mut map = vec![ci.seg_id.get()];
    while map.len() < ci.n_segs.get().min(SEG_NUM) as usize {
        let p = *map.last().unwrap();
        if p >= SEG_NUM {
            return identity;
        }
        let si = read_slots::<_, SegInfo>(img, seg_info_slot_off(p, 0), SEG_INFO_SIZE).unwrap();
        match si.latest_record() {
            Some((_, i))
                if i.has_next() && i.next_seg < SEG_NUM && !map.contains(&i.next_seg.get()) =>
            {
                map.push(i.next_seg.get())
            }
            _ => return identity,
        }
    }
    map
}

// ---------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------

/// What happens to a damaged record's CRC.
#[derive(Clone, Copy, Debug)]
enum Crc {
    /// Recomputed: the record is valid and its values are used.
    Fixed,
    /// Left as it was: the record is (almost always) invalid.
    Stale,
    /// The whole record is zeroed (a never-written slot).
    Zeroed,
}

fn crc_mode() -> impl Strategy<Value = Crc> {
    prop_oneof![3 => Just(Crc::Fixed), 1 => Just(Crc::Stale), 1 => Just(Crc::Zeroed)]
}

/// Values biased to the edges of every field of the format.
fn edge_u64() -> impl Strategy<Value = u64> {
    let d = DATA_SIZE;
    let n = SEG_NUM as u64;
    prop_oneof![
        4 => prop::sample::select(vec![
            0u64, 1, 2, 3, n - 2, n - 1, n, n + 1, 63, 64,
            127, 128, 129, 254, 255, 256,
            24, 64, 5120, 5144, 5168, 10288,
            d - 5144 - 24, d - 88, d - 64, d - 48, d - 24, d - 8, d - 1, d, d + 1,
            SEG_SIZE, 4 << 20, (4 << 20) - 512, 1 << 20, (1 << 20) + 1,
            0x2, 0x3, 0x1180, 0x1181, 0x1182, 0x1183, 0x1186,
            0x7FFF_FFFF, 0x8000_0000, u32::MAX as u64 - 1, u32::MAX as u64,
            u64::MAX, u64::MAX - 1, PCACHE_MAGIC, KSET_MAGIC, 1 << 32,
        ]),
        1 => any::<u64>(),
    ]
}

/// A field of a record: byte offset and width (1, 2, 4 or 8).
#[derive(Clone, Copy, Debug)]
struct Field(usize, usize);

/// The records a mutation can hit.
#[derive(Clone, Copy, Debug)]
enum Rec {
    Superblock,
    CacheInfo(usize),
    KeyTail(usize),
    DirtyTail(usize),
    SegInfo(u32, usize),
    SegGen(u32, usize),
}

impl Rec {
    /// Device offset and size.
    fn place(self) -> (u64, usize) {
        match self {
            Rec::Superblock => (SB_OFF, 24),
            Rec::CacheInfo(s) => (cache_info_slot_off(s), 24),
            Rec::KeyTail(s) => (KEY_TAIL_OFF + 16 * s as u64, 16),
            Rec::DirtyTail(s) => (DIRTY_TAIL_OFF + 16 * s as u64, 16),
            Rec::SegInfo(p, s) => (seg_info_slot_off(p, s), 16),
            Rec::SegGen(p, s) => (seg_gen_slot_off(p, s), 16),
        }
    }

    /// The fields (the CRC itself included: writing it makes the record stale).
    fn fields(self) -> &'static [Field] {
        const HDR: [Field; 4] = [Field(0, 4), Field(4, 1), Field(5, 1), Field(6, 2)];
        match self {
            // crc, flags, magic, seg_num, pad
            Rec::Superblock => &[
                Field(0, 4),
                Field(4, 4),
                Field(8, 8),
                Field(16, 4),
                Field(20, 4),
            ],
            // header, seg_id, n_segs, flags, reserved
            Rec::CacheInfo(_) => &[
                HDR[0],
                HDR[1],
                HDR[2],
                HDR[3],
                Field(8, 4),
                Field(12, 4),
                Field(16, 4),
                Field(20, 4),
                Field(12, 4),
                Field(16, 4),
            ],
            // header, cache_seg_id, seg_off (the two values weighted up)
            Rec::KeyTail(_) | Rec::DirtyTail(_) => &[
                HDR[0],
                HDR[1],
                HDR[2],
                HDR[3],
                Field(8, 4),
                Field(12, 4),
                Field(8, 4),
                Field(12, 4),
            ],
            // header, flags, next_seg
            Rec::SegInfo(..) => &[
                HDR[0],
                HDR[1],
                HDR[2],
                HDR[3],
                Field(8, 4),
                Field(12, 4),
                Field(8, 4),
                Field(12, 4),
            ],
            // header, gen
            Rec::SegGen(..) => &[HDR[0], HDR[1], HDR[2], HDR[3], Field(8, 8), Field(8, 8)],
        }
    }
}

fn pseg() -> impl Strategy<Value = u32> {
    prop_oneof![
        1 => prop::sample::select(vec![0u32, 1, SEG_NUM - 2, SEG_NUM - 1]),
        2 => 0..SEG_NUM,
    ]
}

fn rec() -> impl Strategy<Value = Rec> {
    let slot = || 0usize..2;
    prop_oneof![
        2 => Just(Rec::Superblock),
        2 => slot().prop_map(Rec::CacheInfo),
        2 => slot().prop_map(Rec::KeyTail),
        2 => slot().prop_map(Rec::DirtyTail),
        2 => (pseg(), slot()).prop_map(|(p, s)| Rec::SegInfo(p, s)),
        1 => (pseg(), slot()).prop_map(|(p, s)| Rec::SegGen(p, s)),
    ]
}

/// One field of one record set to a value.
#[derive(Clone, Debug)]
struct FieldMutation {
    rec: Rec,
    field: usize,
    value: u64,
    crc: Crc,
}

fn field_mutation() -> impl Strategy<Value = FieldMutation> {
    // Small values hit segment ids, n_segs and seqs near the chain's.
    let value = prop_oneof![3 => edge_u64(), 2 => 0u64..40];
    (rec(), any::<usize>(), value, crc_mode()).prop_map(|(rec, f, value, crc)| FieldMutation {
        rec,
        field: f % rec.fields().len(),
        value,
        crc,
    })
}

fn put(b: &mut [u8], f: Field, v: u64) {
    b[f.0..f.0 + f.1].copy_from_slice(&v.to_le_bytes()[..f.1]);
}

impl FieldMutation {
    fn apply(&self, img: &mut SparsePmem) {
        let (off, size) = self.rec.place();
        let mut b = read_vec(img, off, size);
        match self.crc {
            Crc::Zeroed => b.fill(0),
            crc => {
                let f = self.rec.fields()[self.field];
                put(&mut b, f, self.value);
                if matches!(crc, Crc::Fixed) && f.0 != 0 {
                    let c = pcache_crc(&b[4..]);
                    b[..4].copy_from_slice(&c.to_le_bytes());
                }
            }
        }
        img.write_bytes(off, &b).unwrap();
    }
}

/// A key with fields biased to the edges (otherwise a valid 4 KiB key).
fn key() -> impl Strategy<Value = KeyOnMedia> {
    let small = || {
        prop_oneof![
            3 => prop::sample::select(vec![0u64, 1, 2, SEG_NUM as u64 - 1, SEG_NUM as u64, 4096]),
            1 => edge_u64(),
        ]
    };
    (
        prop_oneof![2 => Just(4096u64), 1 => edge_u64()],
        prop_oneof![2 => Just(4096u64), 1 => edge_u64()],
        prop_oneof![3 => Just(0u64), 1 => edge_u64()],
        small(),
        prop_oneof![2 => Just(0u64), 1 => edge_u64()],
        prop_oneof![3 => Just(0u64), 1 => edge_u64()],
    )
        .prop_map(|(off, len, flags, cseg, cseg_off, gen)| KeyOnMedia {
            off: off.into(),
            len: (len as u32).into(),
            flags: (flags as u32).into(),
            cache_seg_id: (cseg as u32).into(),
            cache_seg_off: (cseg_off as u32).into(),
            seg_gen: gen.into(),
            data_crc: 0.into(),
            reserved: 0.into(),
        })
}

/// A record written into the log.
#[derive(Clone, Debug)]
enum LogRec {
    /// A key-set with these keys (1..=3).
    Keys(Vec<KeyOnMedia>, Crc),
    /// A bare header: key_num, magic (KSET_MAGIC or another), flags. With
    /// `Crc::Fixed` its CRC covers what follows it on media (bounded).
    Header(u32, u64, u64, Crc),
    /// A LAST record.
    Last(u32, Crc),
    /// A terminator.
    Terminator,
}

fn log_rec() -> impl Strategy<Value = LogRec> {
    prop_oneof![
        3 => (prop::collection::vec(key(), 1..4), crc_mode()).prop_map(|(k, c)| LogRec::Keys(k, c)),
        2 => (
            edge_u64(),
            prop_oneof![3 => Just(KSET_MAGIC), 1 => edge_u64()],
            prop_oneof![2 => Just(0u64), 2 => Just(1u64), 1 => edge_u64()],
            crc_mode(),
        )
            .prop_map(|(n, m, f, c)| LogRec::Header(n as u32, m, f, c)),
        2 => (
            prop_oneof![3 => 0u32..SEG_NUM, 1 => edge_u64().prop_map(|v| v as u32)],
            crc_mode(),
        )
            .prop_map(|(n, c)| LogRec::Last(n, c)),
        1 => Just(LogRec::Terminator),
    ]
}

/// Records written one after the other from a log position (an identity
/// chain: cache segment c is physical segment c), optionally after moving
/// both tails there.
#[derive(Clone, Debug)]
struct LogMutation {
    /// Move both tails to (cseg, off) first (a new latest copy of each).
    move_tails: Option<(u32, u32)>,
    recs: Vec<LogRec>,
}

fn log_mutation() -> impl Strategy<Value = Option<LogMutation>> {
    let d = DATA_SIZE as u32;
    let offs = prop::sample::select(vec![
        0u32,
        24,
        4096,
        d - 5144 - 24,
        d - 5144,
        d - 88,
        d - 64,
        d - 48,
        d - 24,
        d - 16,
    ]);
    let mv = prop_oneof![
        2 => Just(None),
        1 => (prop::sample::select(vec![0u32, 1, SEG_NUM - 1]), offs).prop_map(Some),
    ];
    prop_oneof![
        1 => Just(None),
        2 => (mv, prop::collection::vec(log_rec(), 1..4))
            .prop_map(|(move_tails, recs)| Some(LogMutation { move_tails, recs })),
    ]
}

fn stale_or_zero(b: &mut [u8], crc: Crc) {
    match crc {
        Crc::Fixed => {}
        Crc::Stale => b[0] ^= 0x5A,
        Crc::Zeroed => b.fill(0),
    }
}

impl LogMutation {
    fn apply(&self, img: &mut SparsePmem) {
        if let Some((cseg, off)) = self.move_tails {
            for base in [KEY_TAIL_OFF, DIRTY_TAIL_OFF] {
                let s = read_slots::<_, CachePosOnMedia>(img, base, 16).unwrap();
                let (slot, seq) = match s.latest_record() {
                    Some((i, r)) => (i ^ 1, r.header.seq.wrapping_add(1)),
                    None => (0, 1),
                };
                img.write_bytes(base + 16 * slot as u64, &pos_rec(seq, cseg, off))
                    .unwrap();
            }
        }
        let kt = read_slots::<_, CachePosOnMedia>(img, KEY_TAIL_OFF, 16).unwrap();
        let Some((_, kt)) = kt.latest_record() else {
            return;
        };
        let chain = chain_map(img);
        let (mut cseg, mut off) = (kt.cache_seg_id.get(), kt.seg_off.get() as u64);
        for r in &self.recs {
            let Some(&pseg) = chain.get(cseg as usize) else {
                return;
            };
            if off >= DATA_SIZE {
                return;
            }
            let at = data_pos(pseg, 0) + off;
            let room = (DATA_SIZE - off) as usize;
            let (bytes, next) = match r {
                LogRec::Keys(keys, crc) => {
                    let mut b = Kset::Keys { keys: keys.clone() }.to_bytes();
                    stale_or_zero(&mut b, *crc);
                    let n = b.len() as u64;
                    (b, (cseg, off + n))
                }
                LogRec::Header(key_num, magic, flags, crc) => {
                    let mut h = KsetHeader {
                        crc: 0.into(),
                        key_num: (*key_num).into(),
                        magic: (*magic).into(),
                        flags: (*flags).into(),
                    }
                    .as_bytes()
                    .to_vec();
                    // The CRC over what the header claims to cover, with the
                    // bytes that follow it on media.
                    let keys = if flags & KSET_F_LAST != 0 {
                        0
                    } else {
                        (*key_num).min(KSET_KEYS_MAX) as usize
                    };
                    let cover = (KSET_HEADER_SIZE + keys * KEY_SIZE).min(room);
                    let mut c = h.clone();
                    if cover > 24 {
                        c.extend(read_vec(img, at + 24, cover - 24));
                    }
                    let crc_v = pcache_crc(&c[4..cover.max(24)]);
                    h[..4].copy_from_slice(&crc_v.to_le_bytes());
                    stale_or_zero(&mut h, *crc);
                    (h, (cseg, off + cover.max(24) as u64))
                }
                LogRec::Last(next, crc) => {
                    let mut b = Kset::Last {
                        next_cache_seg_id: *next,
                    }
                    .to_bytes();
                    stale_or_zero(&mut b, *crc);
                    (b, (*next, 0))
                }
                LogRec::Terminator => (vec![0u8; 24], (cseg, off + 24)),
            };
            let n = bytes.len().min(room);
            img.write_bytes(at, &bytes[..n]).unwrap();
            (cseg, off) = next;
        }
    }
}

#[derive(Clone, Debug)]
struct Case {
    base: usize,
    /// Zero both cache_info slots and cache_ctrl first (what C1 leaves).
    wipe_meta: bool,
    log: Option<LogMutation>,
    fields: Vec<FieldMutation>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0..bases().len(),
        prop::bool::weighted(0.2),
        log_mutation(),
        prop::collection::vec(field_mutation(), 0..5),
    )
        .prop_map(|(base, wipe_meta, log, fields)| Case {
            base,
            wipe_meta,
            log,
            fields,
        })
}

impl Case {
    fn image(&self) -> SparsePmem {
        let mut img = bases()[self.base].clone();
        if let Some(l) = &self.log {
            l.apply(&mut img);
        }
        if self.wipe_meta {
            img.write_bytes(META_ZERO_OFF, &vec![0u8; META_ZERO_LEN as usize])
                .unwrap();
        }
        for f in &self.fields {
            f.apply(&mut img);
        }
        img
    }
}

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

/// A dual-copy record: where its slots are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dual {
    CacheInfo,
    KeyTail,
    DirtyTail,
    SegInfo(u32),
    SegGen(u32),
}

fn latest_copy(img: &SparsePmem, d: Dual) -> Option<(u64, Vec<u8>)> {
    fn get<R: DualRecord>(img: &SparsePmem, base: u64, stride: u64) -> Option<(u64, Vec<u8>)> {
        let s = read_slots::<_, R>(img, base, stride).unwrap();
        let (i, _) = s.latest_record()?;
        let off = base + i as u64 * stride;
        Some((off, read_vec(img, off, R::SIZE)))
    }
    match d {
        Dual::CacheInfo => get::<CacheInfo>(img, CACHE_INFO_OFF, CACHE_INFO_SIZE),
        Dual::KeyTail => get::<CachePosOnMedia>(img, KEY_TAIL_OFF, 16),
        Dual::DirtyTail => get::<CachePosOnMedia>(img, DIRTY_TAIL_OFF, 16),
        Dual::SegInfo(p) => get::<SegInfo>(img, seg_info_slot_off(p, 0), SEG_INFO_SIZE),
        Dual::SegGen(p) => get::<SegGen>(img, seg_gen_slot_off(p, 0), SEG_GEN_STRIDE),
    }
}

fn all_duals(size: u64) -> Vec<Dual> {
    let mut v = vec![Dual::CacheInfo, Dual::KeyTail, Dual::DirtyTail];
    for p in 0..max_seg_num(size) {
        v.push(Dual::SegInfo(p));
        v.push(Dual::SegGen(p));
    }
    v
}

/// The newest valid copies of every dual-copy record before an activation.
fn newest_copies(img: &SparsePmem) -> Vec<(Dual, u64, Vec<u8>)> {
    all_duals(img.size())
        .into_iter()
        .filter_map(|d| latest_copy(img, d).map(|(o, b)| (d, o, b)))
        .collect()
}

/// What one activation of `img` in `mode` did, checked.
struct Checked {
    report: ActivationReport,
    after: SparsePmem,
}

/// An activation under test (the real one, or a faulty one that shows the
/// checks can fail).
type Activator = fn(&mut RecordingPmem, Mode) -> ActivationReport;

fn real_activation(pmem: &mut RecordingPmem, mode: Mode) -> ActivationReport {
    activate(pmem, &opts(mode), &mut NoHooks)
}

fn check_activation(img: &SparsePmem, mode: Mode, activator: Activator) -> Result<Checked, String> {
    let before_copies = newest_copies(img);
    let sb_before = Superblock::read_from_bytes(&read_vec(img, SB_OFF, 24)).unwrap();
    let mut rec = RecordingPmem::new(img.clone());
    let r = activator(&mut rec, mode);
    let after = rec.current().clone();
    // The report renders, as text and JSON, whatever it holds.
    let _ = r.to_string();
    serde_json::to_string(&r).map_err(|e| format!("report json: {e}"))?;
    let ctx = || format!("{mode:?}: {r}");

    if r.outcome == Outcome::Refused {
        if !rec.events().is_empty() {
            return Err(format!(
                "a refusal issued {} pmem events ({:?}...): {}",
                rec.events().len(),
                rec.events().first(),
                ctx()
            ));
        }
        if !after.same_bytes(img) {
            return Err(format!("a refusal changed the image: {}", ctx()));
        }
        if r.refusal.is_none() || r.message.is_none() {
            return Err(format!("a refusal without a reason: {}", ctx()));
        }
        // Every access stays inside the device: an out-of-bounds one would
        // come back from the device as an error and be refused as such.
        if matches!(r.refusal, Some(pcache::Refusal::Pmem { .. })) {
            return Err(format!("a device access failed: {}", ctx()));
        }
        return Ok(Checked { report: r, after });
    }
    if r.refusal.is_some() {
        return Err(format!(
            "a refusal reason on a non-refused outcome: {}",
            ctx()
        ));
    }
    if mode == Mode::Strict
        && matches!(
            r.outcome,
            Outcome::FormatRedone | Outcome::SuperblockRebuilt
        )
    {
        return Err(format!("strict mode recovered: {}", ctx()));
    }

    // Recover mode never overwrites the newest valid copy of a record (but
    // for what a format zeroes by design), and no open does.
    // (Strict mode keeps the kernel's writes, which do overwrite newest copies
    // in a format, but an open writes only cache_info into its older slot.)
    if mode == Mode::Recover || r.outcome == Outcome::Opened {
        let reformat_meta = sb_before.magic == 0;
        let formatted_segs = match r.outcome {
            Outcome::Formatted | Outcome::FormatRedone => r.n_segs.unwrap_or(0),
            _ => 0,
        };
        for (d, off, bytes) in &before_copies {
            let exempt = match d {
                Dual::CacheInfo | Dual::KeyTail | Dual::DirtyTail => reformat_meta,
                // The first activation formats physical segments 0..n_segs.
                Dual::SegInfo(p) | Dual::SegGen(p) => *p < formatted_segs,
            };
            if !exempt && read_vec(&after, *off, bytes.len()) != *bytes {
                return Err(format!(
                    "{mode:?} mode overwrote the newest copy of {d:?} at {off}: {}",
                    ctx()
                ));
            }
        }
    }
    // A consistent cache.
    let size = img.size();
    let sb = Superblock::read_from_bytes(&read_vec(&after, SB_OFF, 24)).unwrap();
    let seg_num = match pcache::cache_dev::classify_sb(&sb, size) {
        SbState::Valid { seg_num, .. } => seg_num,
        s => return Err(format!("superblock left {s}: {}", ctx())),
    };
    if r.seg_num != Some(seg_num) {
        return Err(format!(
            "report seg_num {:?} vs media {seg_num}: {}",
            r.seg_num,
            ctx()
        ));
    }
    let n_segs = r.n_segs.ok_or_else(|| format!("no n_segs: {}", ctx()))?;
    if n_segs == 0 || n_segs > seg_num || seg_num > max_seg_num(size) {
        return Err(format!(
            "n_segs {n_segs} / seg_num {seg_num} out of range: {}",
            ctx()
        ));
    }
    if r.chain_len != n_segs {
        return Err(format!(
            "chain_len {} != n_segs {n_segs}: {}",
            r.chain_len,
            ctx()
        ));
    }
    let ci = read_slots::<_, CacheInfo>(&after, CACHE_INFO_OFF, CACHE_INFO_SIZE).unwrap();
    match (ci.latest_record(), r.cache_info) {
        (Some((slot, info)), Some(rep))
            if slot == rep.slot
                && info.header.seq == rep.seq
                && info.init_done()
                && info.n_segs == n_segs
                && r.cache_info_flags == Some(info.flags.get()) => {}
        (got, rep) => {
            return Err(format!(
                "cache_info on media {got:?} is not the reported {rep:?}: {}",
                ctx()
            ))
        }
    }
    for (name, rep, base) in [
        ("key_tail", r.key_tail, KEY_TAIL_OFF),
        ("dirty_tail", r.dirty_tail, DIRTY_TAIL_OFF),
    ] {
        let rep = rep.ok_or_else(|| format!("no {name}: {}", ctx()))?;
        if rep.pos.cache_seg_id >= n_segs || rep.pos.seg_off as u64 >= DATA_SIZE {
            return Err(format!("{name} {} out of range: {}", rep.pos, ctx()));
        }
        let s = read_slots::<_, CachePosOnMedia>(&after, base, 16).unwrap();
        // The kernel (strict mode) writes a format's tails as fresh records,
        // seq 1 in slot 0, even over valid copies, so a stale copy with a
        // later seq can stay the latest; there the written slot is checked.
        let kernel_fresh = mode == Mode::Strict && r.outcome == Outcome::Formatted;
        let found = if kernel_fresh {
            s.valid[rep.slot].then(|| (rep.slot, s.slots[rep.slot]))
        } else {
            s.latest_record()
        };
        match found {
            Some((slot, t))
                if slot == rep.slot && t.header.seq == rep.seq && t.pos() == rep.pos => {}
            got => {
                return Err(format!(
                    "{name} on media {got:?} is not the reported {rep:?}: {}",
                    ctx()
                ))
            }
        }
        let formatted = matches!(r.outcome, Outcome::Formatted | Outcome::FormatRedone);
        if formatted && (rep.pos.cache_seg_id, rep.pos.seg_off) != (0, 0) {
            return Err(format!("{name} not at 0:0 after a format: {}", ctx()));
        }
    }

    Ok(Checked { report: r, after })
}

/// The inspector on an image: a report, never a panic, and (on a cache the
/// activation left consistent) the same chain and an ordinary end of log.
fn check_inspect(img: &SparsePmem, opened: Option<&ActivationReport>) -> Result<(), String> {
    let before = img.clone();
    let rep = inspect(img, &InspectOptions::default()).map_err(|e| format!("inspect: {e}"))?;
    let _ = rep.to_string();
    serde_json::to_string(&rep).map_err(|e| format!("inspect json: {e}"))?;
    if !img.same_bytes(&before) {
        return Err("inspect changed the image".into());
    }
    if let Some(e) = &rep.log.end {
        if matches!(e.stop, pcache::cache_key::LogStop::Io { .. }) {
            return Err(format!(
                "inspect: a log read failed at {}: {}",
                e.pos, e.stop
            ));
        }
    }
    if let Some(r) = opened {
        let chain = rep.chain.as_ref().ok_or("inspect found no chain")?;
        if chain.error.is_some() || chain.psegs.len() as u32 != r.chain_len {
            return Err(format!("inspect chain {chain:?} vs report {r}"));
        }
        // The inspector judges records by our rules; strict mode replays
        // past (or stops at) the CRC-valid records Linux 7.2.13 accepts.
        let kernel_accepts = r.mode == Mode::Strict
            && rep.log.end.as_ref().is_some_and(|e| {
                matches!(
                    e.stop,
                    pcache::cache_key::LogStop::Invalid {
                        error: KsetError::KeyNumOutOfRange { .. }
                            | KsetError::Flags { .. }
                            | KsetError::TooLarge { .. }
                    }
                )
            });
        if rep.log.end_is_ordinary != Some(true) && !kernel_accepts {
            return Err(format!("inspect log {:?} vs report {r}", rep.log.end));
        }
    }
    Ok(())
}

fn check_case(img: &SparsePmem) -> Result<(), String> {
    check_case_with(img, real_activation)
}

fn check_case_with(img: &SparsePmem, activator: Activator) -> Result<(), String> {
    check_inspect(img, None)?;
    for mode in MODES {
        let c = check_activation(img, mode, activator)?;
        if c.report.outcome == Outcome::Refused {
            continue;
        }
        // A strict (kernel) format can leave a stale tail copy the latest
        // (see `check_activation`); the inspector then walks from it.
        let kernel_fresh = mode == Mode::Strict && c.report.outcome == Outcome::Formatted;
        check_inspect(&c.after, (!kernel_fresh).then_some(&c.report))?;
        check_data_path(&c.after, mode)?;
        // Activating the result again opens it where it was left (strict
        // mode: only after an open, see the module documentation).
        if mode == Mode::Recover || c.report.outcome == Outcome::Opened {
            let again = check_activation(&c.after, mode, activator)?;
            let (a, b) = (&c.report, &again.report);
            let pos = |t: Option<pcache::report::TailReport>| t.map(|t| t.pos);
            if b.outcome != Outcome::Opened
                || pos(a.key_tail) != pos(b.key_tail)
                || pos(a.dirty_tail) != pos(b.dirty_tail)
                || a.chain_len != b.chain_len
                || b.cache_info.map(|c| c.seq) != a.cache_info.map(|c| c.seq.wrapping_add(1))
            {
                return Err(format!(
                    "{mode:?}: after\n{a}\nthe next activation gave\n{b}"
                ));
            }
        }
    }
    Ok(())
}

/// The data path over whatever a hostile image opened to: writes (one FUA,
/// one left open, one across a 4 MiB boundary), a flush, reads of both and of
/// a range never written; each may fail (a full cache, a log that leaves no
/// room), none may panic, hang or touch bytes outside the device, and (in
/// recover mode) what was written and flushed reads back; then writeback and
/// GC over the whole log.
fn check_data_path(img: &SparsePmem, mode: Mode) -> Result<(), String> {
    let mut img = img.clone();
    let opts = pcache::Options {
        mode,
        data_crc: false,
    };
    let Some(mut cache) = pcache::start(&mut img, &opts, &mut NoHooks).cache else {
        return Ok(());
    };
    let mut disk = pcache::backing::VecBacking::new((16 << 20) / 512);
    let a = vec![0xa1u8; 4096];
    let b = vec![0xb2u8; 8192];
    let wrote_a = cache
        .write(&mut img, &disk, &mut NoHooks, 0, &a, true)
        .is_ok();
    let wrote_b = cache
        .write(&mut img, &disk, &mut NoHooks, (4 << 20) - 4096, &b, false)
        .is_ok();
    let flushed = cache.flush(&mut img, &mut NoHooks).is_ok();
    for (off, want, ok) in [
        (0u64, &a, wrote_a),
        ((4 << 20) - 4096, &b, wrote_b && flushed),
    ] {
        let mut buf = vec![0u8; want.len()];
        match cache.read(&mut img, &mut disk, &mut NoHooks, off, &mut buf) {
            // Strict mode opens what the kernel opens, aliased segments
            // included, where a write can land on other data: only recover
            // mode promises the read-back.
            Ok(()) if ok && mode == Mode::Recover && buf != *want => {
                return Err(format!("{mode:?}: a write at {off:#x} does not read back"))
            }
            _ => {}
        }
    }
    let mut buf = vec![0u8; 4096];
    let _ = cache.read(&mut img, &mut disk, &mut NoHooks, 8 << 20, &mut buf);
    // Writeback and GC walk the (hostile) log from the tails: errors and
    // stops are results, never panics or hangs.
    let _ = cache.set_gc_percent(&mut img, &mut NoHooks, 0);
    let _ = cache.idle(&mut img, &mut disk, &mut NoHooks);
    Ok(())
}

/// Runs `check_case` on a thread with a deadline.
fn bounded(img: SparsePmem) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(check_case(&img));
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(r) => {
            h.join().unwrap();
            r
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            Err(format!("no result within {DEADLINE:?}: a hang"))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => Err("the check thread ended without a result".into()),
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES overrides, for a longer search.
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            ProptestConfig::default().cases
        } else {
            1000
        },
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_images(c in case()) {
        let img = c.image();
        if let Err(e) = bounded(img) {
            prop_assert!(false, "{}\ncase: {:?}", e, c);
        }
    }
}

// ---------------------------------------------------------------------------
// The checks can fail
// ---------------------------------------------------------------------------

/// The generators reach the interesting outcomes (so the property above is
/// not vacuous): every outcome row, and refusals of several kinds.
#[test]
fn generators_reach_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::BTreeSet;
    let mut runner = TestRunner::deterministic();
    let strat = case();
    let mut outcomes = BTreeSet::new();
    let mut refusals = BTreeSet::new();
    for _ in 0..3000 {
        let img = strat.new_tree(&mut runner).unwrap().current().image();
        for mode in MODES {
            let r = act(&mut img.clone(), mode);
            outcomes.insert(format!("{mode:?} {}", r.outcome));
            if let Some(f) = r.refusal {
                let j = serde_json::to_value(&f).unwrap();
                refusals.insert(j["kind"].as_str().unwrap().to_string());
            }
        }
        if WANT_OUTCOMES.iter().all(|w| outcomes.contains(*w))
            && WANT_REFUSALS.iter().all(|w| refusals.contains(*w))
        {
            break;
        }
    }
    for want in WANT_OUTCOMES {
        assert!(outcomes.contains(want), "{want} not reached: {outcomes:?}");
    }
    for want in WANT_REFUSALS {
        assert!(refusals.contains(want), "{want} not reached: {refusals:?}");
    }
}

const WANT_OUTCOMES: [&str; 8] = [
    "Strict opened",
    "Strict formatted",
    "Strict refused",
    "Recover opened",
    "Recover formatted",
    "Recover refused",
    "Recover superblock-rebuilt",
    "Recover format-redone",
];

/// Every refusal kind a hostile image of this shape can give (not
/// device-too-small or pmem).
const WANT_REFUSALS: [&str; 15] = [
    "not-pcache",
    "corrupted-superblock",
    "big-endian",
    "seg-num",
    "superblock-unrecoverable",
    "data-crc-option",
    "n-segs",
    "chain-seg-out-of-range",
    "chain-broken",
    "chain-duplicate",
    "seg-info-missing",
    "tail-missing",
    "tail-out-of-range",
    "dirty-tail-off-log",
    "hostile-log",
];

/// The checks catch what they are meant to catch: faulty activations are
/// rejected, each by the check aimed at its fault.
#[test]
fn checks_detect_faulty_activations() {
    let base = &bases()[1];
    assert_eq!(check_case(base), Ok(()));
    let mut foreign = base.clone();
    foreign
        .write_bytes(SB_OFF + 8, &0xdead_beefu64.to_le_bytes())
        .unwrap();
    foreign.write_bytes(CACHE_INFO_OFF, &[0u8; 8192]).unwrap();
    foreign.write_bytes(KEY_TAIL_OFF, &[0u8; 64]).unwrap();
    // A refusal that wrote.
    fn refuses_after_a_store(p: &mut RecordingPmem, mode: Mode) -> ActivationReport {
        let r = real_activation(p, mode);
        if r.outcome == Outcome::Refused {
            p.store_u64(CACHE_INFO_OFF, 0).unwrap();
        }
        r
    }
    let e = check_case_with(&foreign, refuses_after_a_store).unwrap_err();
    assert!(e.contains("a refusal issued 1 pmem events"), "{e}");
    // Recover mode overwriting the newest copy of key_tail (slot 1, seq 3).
    fn overwrites_newest_tail(p: &mut RecordingPmem, mode: Mode) -> ActivationReport {
        let r = real_activation(p, mode);
        if mode == Mode::Recover {
            for (i, w) in pos_rec(3, 0, 10288).chunks(8).enumerate() {
                let mut w = u64::from_le_bytes(w.try_into().unwrap());
                if i == 1 {
                    w ^= 1 << 40;
                }
                p.store_u64(KEY_TAIL_OFF + 16 + 8 * i as u64, w).unwrap();
            }
        }
        r
    }
    let e = check_case_with(base, overwrites_newest_tail).unwrap_err();
    assert!(e.contains("overwrote the newest copy of KeyTail"), "{e}");
    // A report naming a tail that is not the one on media.
    fn misreports_tail(p: &mut RecordingPmem, mode: Mode) -> ActivationReport {
        let mut r = real_activation(p, mode);
        if let Some(t) = r.key_tail.as_mut() {
            t.seq = t.seq.wrapping_add(1);
        }
        r
    }
    let e = check_case_with(base, misreports_tail).unwrap_err();
    assert!(e.contains("key_tail on media"), "{e}");
    // A chain shorter than n_segs.
    fn short_chain(p: &mut RecordingPmem, mode: Mode) -> ActivationReport {
        let mut r = real_activation(p, mode);
        r.chain_len = r.chain_len.saturating_sub(1);
        r
    }
    let e = check_case_with(base, short_chain).unwrap_err();
    assert!(e.contains("chain_len 30 != n_segs 31"), "{e}");
    // A tail out of the chain.
    fn tail_out_of_range(p: &mut RecordingPmem, mode: Mode) -> ActivationReport {
        let mut r = real_activation(p, mode);
        if let Some(t) = r.dirty_tail.as_mut() {
            t.pos.cache_seg_id = 31;
        }
        r
    }
    let e = check_case_with(base, tail_out_of_range).unwrap_err();
    assert!(e.contains("dirty_tail 31:10288 out of range"), "{e}");
    // An activation that zeroes a segment header.
    fn zeroes_a_segment(p: &mut RecordingPmem, mode: Mode) -> ActivationReport {
        let r = real_activation(p, mode);
        if r.outcome != Outcome::Refused {
            p.zero_range(seg_info_slot_off(3, 0), 8192).unwrap();
        }
        r
    }
    let e = check_case_with(base, zeroes_a_segment).unwrap_err();
    assert!(
        e.contains("Strict mode overwrote the newest copy of SegInfo(3)"),
        "{e}"
    );
    // An activation that leaves a broken chain (a newer seg_info of segment 3
    // without HAS_NEXT, in its older slot).
    fn breaks_the_chain(p: &mut RecordingPmem, mode: Mode) -> ActivationReport {
        let r = real_activation(p, mode);
        if r.outcome != Outcome::Refused {
            for (i, w) in seg_info_rec(3, 0x2, 0).chunks(8).enumerate() {
                let w = u64::from_le_bytes(w.try_into().unwrap());
                p.store_u64(seg_info_slot_off(3, 1) + 8 * i as u64, w)
                    .unwrap();
            }
        }
        r
    }
    let e = check_case_with(base, breaks_the_chain).unwrap_err();
    assert!(e.contains("inspect chain"), "{e}");
}
