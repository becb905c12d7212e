//! Property tests of the persistence models against a brute-force reference.
//!
//! The reference knows nothing of the enumerator's shortcuts: it applies the
//! models' rules to *every* write of the trace (unchanged ones included) and
//! builds whole images. On small random traces (pmem stores of 1..=8 bytes at
//! any offset, overlapping and repeating values; multi-sector disk writes;
//! barriers of both domains; markers) it checks that
//! - every state the enumerator produces is reachable under the model at the
//!   state's own cut, and only names writes issued before that cut;
//! - no two produced states give the same images;
//! - the exact models (`prefix`, `flushed-only`) produce every reachable image,
//!   and so does `subsets` whenever at most `ALL_SUBSETS_MAX` writes of each
//!   domain are pending at every cut of the window;
//! - `at-fences` produces its fixed states: at each epoch's end what the
//!   barriers covered and everything issued, after each marker everything
//!   issued; and several windows enumerated together give distinct states.

use proptest::prelude::*;
use scenarios::persistence::{
    enumerate, enumerate_windows, BaseImage, CrashState, Event, Model, Trace, ALL_SUBSETS_MAX,
    SECTOR,
};
use std::collections::BTreeSet;

const PMEM_LEN: usize = 40;
const DISK_SECTORS: usize = 20;

/// Whole images: the pmem bytes, and the disk's sectors by their fill byte
/// (every sector of these traces and bases is one byte repeated, which the
/// image builder checks).
type Image = (Vec<u8>, Vec<u8>);

#[derive(Clone, Debug)]
struct Base {
    pmem: Vec<u8>,
    disk: Vec<Vec<u8>>,
}

impl BaseImage for Base {
    fn pmem_byte(&self, off: u64) -> u8 {
        self.pmem[off as usize]
    }
    fn disk_sector(&self, sector: u64) -> Vec<u8> {
        self.disk[sector as usize].clone()
    }
}

/// One unit of durability of the reference: a pmem store or one disk sector.
#[derive(Clone, Debug)]
struct Unit {
    event: usize,
    part: u32,
    disk: bool,
}

#[derive(Clone, Debug)]
enum Op {
    Store { offset: u64, bytes: Vec<u8> },
    Blk { sector: u64, fills: Vec<u8> },
    PmemFlush,
    BlkFlush,
    Marker,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (offset(), prop::collection::vec(0u8..3, 1..=8)).prop_map(|(offset, bytes)| Op::Store { offset, bytes }),
        2 => (0u64..3, prop::collection::vec(0u8..3, 1..=2)).prop_map(|(sector, fills)| Op::Blk { sector, fills }),
        1 => Just(Op::PmemFlush),
        1 => Just(Op::BlkFlush),
        1 => Just(Op::Marker),
    ]
}

/// Offsets that make stores overlap often, partly and wholly.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![(0u64..8).prop_map(|w| w * 4), 0u64..32]
}

fn build_trace(ops: &[Op]) -> Trace {
    let mut t = Trace::new();
    for o in ops {
        match o {
            Op::Store { offset, bytes } => {
                t.push_pmem_store(*offset, bytes);
            }
            Op::Blk { sector, fills } => {
                let data: Vec<u8> = fills.iter().flat_map(|&f| vec![f; SECTOR]).collect();
                t.push_blk_write(*sector, &data);
            }
            Op::PmemFlush => {
                t.push(Event::PmemFlush);
            }
            Op::BlkFlush => {
                t.push(Event::BlkFlush);
            }
            Op::Marker => {
                t.push(Event::Marker { id: 9 });
            }
        }
    }
    t
}

fn base() -> impl Strategy<Value = Base> {
    (
        prop::collection::vec(0u8..3, PMEM_LEN),
        prop::collection::vec(0u8..3, DISK_SECTORS),
    )
        .prop_map(|(pmem, fills)| Base {
            pmem,
            disk: fills.into_iter().map(|f| vec![f; SECTOR]).collect(),
        })
}

/// Every write unit of the trace, in trace order (nothing dropped).
fn units(trace: &Trace) -> Vec<Unit> {
    let mut out = Vec::new();
    for (i, e) in trace.events().iter().enumerate() {
        match e {
            Event::PmemStore { .. } => out.push(Unit {
                event: i,
                part: 0,
                disk: false,
            }),
            Event::BlkWrite { len, .. } => {
                for p in 0..*len as usize / SECTOR {
                    out.push(Unit {
                        event: i,
                        part: p as u32,
                        disk: true,
                    })
                }
            }
            _ => {}
        }
    }
    out
}

/// The images after applying `units` (in trace order) over the base.
fn image(trace: &Trace, base: &Base, units: &[(usize, u32)]) -> Image {
    let mut sorted = units.to_vec();
    sorted.sort();
    let mut pmem = base.pmem.clone();
    let mut disk: Vec<u8> = base.disk.iter().map(|s| s[0]).collect();
    for (event, part) in sorted {
        match trace.get(event as u64).unwrap() {
            e @ Event::PmemStore { offset, .. } => {
                for (i, b) in Trace::store_bytes(e).into_iter().enumerate() {
                    pmem[*offset as usize + i] = b;
                }
            }
            e @ Event::BlkWrite { sector, .. } => {
                let p = part as usize;
                let data = &trace.blk_data(e)[p * SECTOR..(p + 1) * SECTOR];
                assert!(data.iter().all(|&b| b == data[0]), "a uniform sector");
                disk[*sector as usize + p] = data[0];
            }
            _ => unreachable!(),
        }
    }
    (pmem, disk)
}

fn state_image(trace: &Trace, base: &Base, s: &CrashState) -> Image {
    let units: Vec<(usize, u32)> = s
        .pmem
        .iter()
        .chain(&s.disk)
        .map(|w| (w.event as usize, w.part))
        .collect();
    image(trace, base, &units)
}

/// Position just after the last barrier of the domain before `cut` (0 if none).
fn barrier_before(trace: &Trace, disk: bool, cut: usize) -> usize {
    trace.events()[..cut]
        .iter()
        .rposition(|e| {
            if disk {
                matches!(e, Event::BlkFlush)
            } else {
                matches!(e, Event::PmemFlush)
            }
        })
        .map_or(0, |i| i + 1)
}

/// (durable, pending) units at `cut`.
fn split(trace: &Trace, all: &[Unit], cut: usize) -> (Vec<Unit>, Vec<Unit>) {
    let mut durable = Vec::new();
    let mut pending = Vec::new();
    for u in all.iter().filter(|u| u.event < cut) {
        if u.event < barrier_before(trace, u.disk, cut) {
            durable.push(u.clone());
        } else {
            pending.push(u.clone());
        }
    }
    (durable, pending)
}

fn key(u: &Unit) -> (usize, u32) {
    (u.event, u.part)
}

/// The images reachable under `model` with power cut at `cut`.
fn reachable_at(
    trace: &Trace,
    base: &Base,
    model: &Model,
    cut: usize,
    window_start: usize,
) -> BTreeSet<Image> {
    let all = units(trace);
    let mut out = BTreeSet::new();
    match model {
        Model::Prefix => {
            // The units before the cut, in order; a cut may also fall between
            // the sectors of a disk write issued inside the window.
            let before: Vec<(usize, u32)> = all.iter().filter(|u| u.event < cut).map(key).collect();
            out.insert(image(trace, base, &before));
            if cut > window_start {
                let last = cut - 1;
                let earlier: Vec<(usize, u32)> =
                    all.iter().filter(|u| u.event < last).map(key).collect();
                let parts: Vec<(usize, u32)> =
                    all.iter().filter(|u| u.event == last).map(key).collect();
                for k in 0..parts.len() {
                    let mut s = earlier.clone();
                    s.extend_from_slice(&parts[..k]);
                    out.insert(image(trace, base, &s));
                }
            }
        }
        Model::FlushedOnly => {
            let (durable, _) = split(trace, &all, cut);
            out.insert(image(
                trace,
                base,
                &durable.iter().map(key).collect::<Vec<_>>(),
            ));
        }
        Model::Subsets { .. } | Model::AtFences { .. } => {
            let (durable, pending) = split(trace, &all, cut);
            let durable: Vec<(usize, u32)> = durable.iter().map(key).collect();
            for mask in 0u64..1 << pending.len() {
                let mut s = durable.clone();
                s.extend(
                    pending
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| mask & (1 << i) != 0)
                        .map(|(_, u)| key(u)),
                );
                out.insert(image(trace, base, &s));
            }
        }
    }
    out
}

/// Whether the state's images are reachable under `model` at the state's cut.
fn reachable(
    trace: &Trace,
    base: &Base,
    model: &Model,
    s: &CrashState,
    start: usize,
    img: &Image,
) -> bool {
    if let Model::Subsets { .. } | Model::AtFences { .. } = model {
        // Quick check: everything durable at the cut plus the state's pending writes.
        let all = units(trace);
        let (durable, pending) = split(trace, &all, s.cut);
        let mine: BTreeSet<(usize, u32)> = s
            .pmem
            .iter()
            .chain(&s.disk)
            .map(|w| (w.event as usize, w.part))
            .collect();
        let mut units: Vec<(usize, u32)> = durable.iter().map(key).collect();
        units.extend(pending.iter().map(key).filter(|k| mine.contains(k)));
        if image(trace, base, &units) == *img {
            return true;
        }
    }
    reachable_at(trace, base, model, s.cut, start).contains(img)
}

/// The most writes of one domain pending at any cut of the window, counting
/// only writes that change the image as issued (upper bound of what the
/// enumerator sees as pending).
fn max_pending(trace: &Trace, start: usize, end: usize) -> usize {
    let all = units(trace);
    (start..=end)
        .map(|c| {
            let (_, pending) = split(trace, &all, c);
            let pm = pending.iter().filter(|u| !u.disk).count();
            let dk = pending.iter().filter(|u| u.disk).count();
            pm.max(dk)
        })
        .max()
        .unwrap_or(0)
}

fn check(ops: &[Op], base: &Base, model: &Model, a: usize, b: usize) -> Result<(), TestCaseError> {
    let trace = build_trace(ops);
    let len = trace.len();
    let (start, end) = (a.min(len).min(b.min(len)), a.min(len).max(b.min(len)));
    let e = enumerate(&trace, start, end, model, base).unwrap();
    let mut produced = BTreeSet::new();
    for s in &e.states {
        prop_assert!(
            (start..=end).contains(&s.cut),
            "cut {} outside {start}..={end}",
            s.cut
        );
        prop_assert!(
            s.pmem
                .iter()
                .chain(&s.disk)
                .all(|w| (w.event as usize) < s.cut),
            "a state names a write issued after its cut: {s:?}"
        );
        let img = state_image(&trace, base, s);
        prop_assert!(
            reachable(&trace, base, model, s, start, &img),
            "state {s:?} is not reachable under {model:?} at its cut"
        );
        prop_assert!(
            produced.insert(img),
            "two states give the same images: {s:?}"
        );
    }
    // Each domain on its own: at every cut where at most ALL_SUBSETS_MAX of a
    // domain's writes are pending, every subset of them shows in that
    // domain's part of some state (whatever the other domain holds).
    if let Model::Subsets { .. } = model {
        let all = units(&trace);
        let pmem_parts: BTreeSet<&Vec<u8>> = produced.iter().map(|i| &i.0).collect();
        let disk_parts: BTreeSet<&Vec<u8>> = produced.iter().map(|i| &i.1).collect();
        for c in start..=end {
            let (durable, pending) = split(&trace, &all, c);
            for disk in [false, true] {
                let mine: Vec<&Unit> = pending.iter().filter(|u| u.disk == disk).collect();
                if mine.len() > ALL_SUBSETS_MAX {
                    continue;
                }
                let durable: Vec<(usize, u32)> = durable.iter().map(key).collect();
                for mask in 0u64..1 << mine.len() {
                    let mut units = durable.clone();
                    units.extend(
                        mine.iter()
                            .enumerate()
                            .filter(|(i, _)| mask & (1 << i) != 0)
                            .map(|(_, u)| key(u)),
                    );
                    let img = image(&trace, base, &units);
                    let found = if disk {
                        disk_parts.contains(&img.1)
                    } else {
                        pmem_parts.contains(&img.0)
                    };
                    prop_assert!(
                        found,
                        "cut {c}: a subset of the {} pending {} writes is in no state",
                        mine.len(),
                        if disk { "disk" } else { "pmem" }
                    );
                }
            }
        }
    }
    let exhaustive = match model {
        Model::Prefix | Model::FlushedOnly => true,
        Model::Subsets { .. } => max_pending(&trace, start, end) <= ALL_SUBSETS_MAX,
        Model::AtFences { .. } => false,
    };
    // At-fences: its fixed states are all there. At each epoch's end (a cut
    // just before a barrier, or the window's end) what the barriers covered
    // and everything issued; at the window's start and after each marker,
    // everything issued.
    if let Model::AtFences { .. } = model {
        let all = units(&trace);
        let events = trace.events();
        for c in start..=end {
            let epoch_end =
                c == end || matches!(events.get(c), Some(Event::PmemFlush | Event::BlkFlush));
            let after_marker =
                c == start || matches!(events.get(c - 1), Some(Event::Marker { .. }));
            let (durable, _) = split(&trace, &all, c);
            let issued: Vec<(usize, u32)> = all.iter().filter(|u| u.event < c).map(key).collect();
            let durable: Vec<(usize, u32)> = durable.iter().map(key).collect();
            if epoch_end || after_marker {
                prop_assert!(
                    produced.contains(&image(&trace, base, &issued)),
                    "cut {c}: the state with everything issued is missing"
                );
            }
            if epoch_end {
                prop_assert!(
                    produced.contains(&image(&trace, base, &durable)),
                    "cut {c}: the state with only what the barriers covered is missing"
                );
            }
        }
    }
    if exhaustive {
        let mut reachable = BTreeSet::new();
        for c in start..=end {
            reachable.extend(reachable_at(&trace, base, model, c, start));
        }
        let missing: Vec<_> = reachable.difference(&produced).collect();
        prop_assert!(
            missing.is_empty(),
            "{} reachable image(s) not produced, e.g. pmem {:?} disk fills {:?}",
            missing.len(),
            missing[0].0,
            missing[0].1
        );
    }
    Ok(())
}

fn model() -> impl Strategy<Value = Model> {
    prop_oneof![
        Just(Model::Prefix),
        Just(Model::FlushedOnly),
        (0usize..8, any::<u64>()).prop_map(|(sample, seed)| Model::Subsets { sample, seed }),
        (0usize..8, any::<u64>()).prop_map(|(sample, seed)| Model::AtFences { sample, seed }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn states_match_the_brute_force_reference(
        ops in prop::collection::vec(op(), 0..12),
        base in base(),
        model in model(),
        a in 0usize..16,
        b in 0usize..16,
    ) {
        check(&ops, &base, &model, a, b)?;
    }

    /// Long epochs (more than `ALL_SUBSETS_MAX` pending stores): the families
    /// and the sample must still be reachable and distinct.
    #[test]
    fn long_epochs_give_reachable_distinct_states(
        ops in prop::collection::vec((0u64..32, prop::collection::vec(0u8..4, 8..=8)), 13..18),
        base in base(),
        sample in 0usize..16,
        seed in any::<u64>(),
    ) {
        let ops: Vec<Op> = ops.into_iter().map(|(o, bytes)| Op::Store { offset: o & !7, bytes }).collect();
        let len = ops.len();
        check(&ops, &base, &Model::Subsets { sample, seed }, 0, len)?;
    }

    /// Long epochs under `at-fences`: its states are reachable and distinct.
    #[test]
    fn at_fences_on_long_epochs(
        ops in prop::collection::vec(op(), 13..30),
        base in base(),
        sample in 0usize..16,
        seed in any::<u64>(),
    ) {
        let len = ops.len();
        check(&ops, &base, &Model::AtFences { sample, seed }, 0, len)?;
    }

    /// Several windows together: every state lies in one of them, is
    /// reachable at its cut, and no two give the same images; each window's
    /// own states are all there.
    #[test]
    fn windows_enumerated_together(
        ops in prop::collection::vec(op(), 0..14),
        base in base(),
        model in model(),
        cuts in prop::collection::vec(0usize..16, 4),
    ) {
        let trace = build_trace(&ops);
        let len = trace.len();
        let w = |a: usize, b: usize| (a.min(b).min(len), a.max(b).min(len));
        let windows = [w(cuts[0], cuts[1]), w(cuts[2], cuts[3])];
        let e = enumerate_windows(&trace, &windows, &model, &base).unwrap();
        let mut produced = BTreeSet::new();
        for s in &e.states {
            let img = state_image(&trace, &base, s);
            // Reachable from one of the windows its cut lies in (a prefix
            // state may split a disk write issued inside its own window only).
            let mut inside = windows.iter().filter(|(a, b)| (*a..=*b).contains(&s.cut)).peekable();
            prop_assert!(inside.peek().is_some(), "cut {} in no window", s.cut);
            prop_assert!(inside.any(|w| reachable(&trace, &base, &model, s, w.0, &img)));
            prop_assert!(produced.insert(img), "two states give the same images");
        }
        for &(a, b) in &windows {
            let one = enumerate(&trace, a, b, &model, &base).unwrap();
            for s in &one.states {
                prop_assert!(produced.contains(&state_image(&trace, &base, s)));
            }
        }
    }
}
