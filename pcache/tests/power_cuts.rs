//! Power cuts in the data path, on the host: a seeded workload (writes across
//! 4 MiB boundaries, overwrites, flushes, FUA) runs through the module over
//! the recording double; the crash image of a cut after every store of the
//! key-set log and of its fences, around the data writes, and of subsets of
//! what was pending at each key-set's fence, is recovered and read back, and
//! the durability oracle judges what it returns (`docs/format.md` §10).

use std::sync::OnceLock;

use pcache::backing::{Backing, VecBacking};
use pcache::format::MB;
use pcache::pmem::{Access, RecordingPmem, SparsePmem};
use pcache::{start, CrashPoint, Mode, NoHooks, Options, Outcome};
use workload::oracle::{check, touched_ranges, Violation};
use workload::pattern::{classify_range, fill, fill_sector, SECTOR};
use workload::{generate, GenKind, GenSpec, Op};

const PMEM: u64 = 512 * MB;
const DISK: u64 = 16 * MB;

/// The backing disk: every sector holds the tag-0 ("original") pattern.
fn original_disk() -> VecBacking {
    static DISK_IMAGE: OnceLock<VecBacking> = OnceLock::new();
    DISK_IMAGE
        .get_or_init(|| {
            let mut d = VecBacking::new(DISK / 512);
            let mut s = [0u8; SECTOR];
            for lba in 0..DISK / 512 {
                fill_sector(0, lba, &mut s);
                d.write(lba, &s).unwrap();
            }
            d
        })
        .clone()
}

fn formatted() -> SparsePmem {
    let mut p = SparsePmem::new(PMEM);
    let a = start(
        &mut p,
        &Options {
            mode: Mode::Recover,
            data_crc: false,
        },
        &mut NoHooks,
    );
    assert_eq!(a.report.outcome, Outcome::Formatted);
    p
}

struct Recorded {
    rec: RecordingPmem,
    ops: Vec<Op>,
    /// Event count when each op had completed.
    acks: Vec<usize>,
}

fn record(mode: Mode, data_crc: bool, ops: Vec<Op>) -> Recorded {
    let base = if data_crc {
        let mut p = SparsePmem::new(PMEM);
        start(&mut p, &Options { mode, data_crc }, &mut NoHooks);
        p
    } else {
        formatted()
    };
    let mut rec = RecordingPmem::new(base);
    let mut hooks = rec.hooks();
    let disk = original_disk();
    let mut cache = start(&mut rec, &Options { mode, data_crc }, &mut hooks)
        .cache
        .expect("opens");
    let mut acks = Vec::new();
    for op in &ops {
        match *op {
            Op::Write { off, len, id, fua } => {
                let mut data = vec![0u8; len as usize];
                fill(id, off, &mut data);
                cache
                    .write(&mut rec, &disk, &mut hooks, off, &data, fua)
                    .unwrap();
            }
            Op::Flush => cache.flush(&mut rec, &mut hooks).unwrap(),
            Op::CloseKsets => cache.close_kset(&mut rec, &mut hooks).unwrap(),
        }
        acks.push(rec.events().len());
    }
    Recorded { rec, ops, acks }
}

/// Recovers `img` and reads back every range the workload touched.
fn judge(r: &Recorded, img: SparsePmem, cut: usize, mode: Mode, data_crc: bool) -> Vec<Violation> {
    let mut img = img;
    let a = start(&mut img, &Options { mode, data_crc }, &mut NoHooks);
    assert_ne!(
        a.report.outcome,
        Outcome::Refused,
        "cut {cut}: recovery refused: {}",
        a.report
    );
    let mut cache = a.cache.unwrap();
    let mut disk = original_disk();
    let acked = r.acks.iter().filter(|&&a| a <= cut).count();
    let mut runs = Vec::new();
    for (off, len) in touched_ranges(&r.ops) {
        let mut buf = vec![0u8; len as usize];
        cache
            .read(&mut img, &mut disk, &mut NoHooks, off, &mut buf)
            .unwrap();
        runs.extend(classify_range(off, &buf));
    }
    check(&r.ops, acked, &runs)
}

/// The cuts worth trying: after every store inside a key-set append or a log
/// switch, at every fence, and at the first, middle and last store of every
/// data write.
fn cuts(ev: &[Access]) -> Vec<usize> {
    let mut out = vec![0];
    let mut inside: Option<CrashPoint> = None;
    let mut data_stores: Vec<usize> = Vec::new();
    for (i, e) in ev.iter().enumerate() {
        match e {
            Access::Begin(cp) => inside = Some(*cp),
            Access::End(CrashPoint::DataWrite) => {
                if let (Some(&f), Some(&l)) = (data_stores.first(), data_stores.last()) {
                    out.extend([f + 1, data_stores[data_stores.len() / 2] + 1, l + 1]);
                }
                data_stores.clear();
                inside = None;
            }
            Access::End(_) => inside = None,
            Access::Fence => out.push(i + 1),
            Access::Store { .. } => match inside {
                Some(CrashPoint::DataWrite) => data_stores.push(i),
                Some(_) => out.push(i + 1),
                None => {}
            },
            _ => {}
        }
    }
    out.push(ev.len());
    out.sort_unstable();
    out.dedup();
    out
}

fn workload(seed: u64) -> Vec<Op> {
    // 24 ops over 8 MiB: writes crossing the 4 MiB boundary, flushes, FUA.
    let mut ops = generate(&GenSpec {
        kind: GenKind::Mixed,
        seed,
        ops: 24,
        base: 0,
        span: 8 * MB,
        first_id: 1,
    });
    // And a last overwrite left in the open key-set.
    if let Some(Op::Write { off, len, .. }) = ops.iter().find(|o| matches!(o, Op::Write { .. })) {
        ops.push(Op::Write {
            off: *off,
            len: *len,
            id: 1000,
            fua: false,
        });
    }
    ops
}

#[test]
fn every_prefix_cut_recovers_to_allowed_content_in_both_modes() {
    for (mode, data_crc) in [
        (Mode::Recover, false),
        (Mode::Strict, false),
        (Mode::Recover, true),
    ] {
        let r = record(mode, data_crc, workload(7));
        let ev = r.rec.events();
        let cuts = cuts(&ev);
        assert!(cuts.len() > 100, "{} cuts", cuts.len());
        for &cut in &cuts {
            let v = judge(&r, r.rec.image_at(cut), cut, mode, data_crc);
            assert!(v.is_empty(), "{mode:?} crc {data_crc}: cut {cut}: {v:?}");
        }
    }
}

#[test]
fn subsets_of_a_key_sets_pending_stores_never_lose_or_invent_data() {
    // On a fresh device the bytes after the log's end are zeros, so the
    // kernel's order (strict) is safe here too; recover mode's extra fence
    // must not change what is durable.
    for mode in [Mode::Strict, Mode::Recover] {
        subsets_at_key_set_appends(mode);
    }
}

fn subsets_at_key_set_appends(mode: Mode) {
    let r = record(mode, false, workload(11));
    let ev = r.rec.events();
    let mut states = 0;
    // At the fence that ends each key-set append, every subset of what is
    // pending (all of them up to 12 stores, else a seeded sample).
    for (i, e) in ev.iter().enumerate() {
        if !matches!(e, Access::End(CrashPoint::KsetAppend)) {
            continue;
        }
        // The cut just before the append's last fence.
        let fence = (0..i).rev().find(|&j| ev[j] == Access::Fence).unwrap();
        let pending = r.rec.pending(fence);
        // Every subset up to 12 pending stores; beyond, every prefix, suffix,
        // single drop and single store, and a seeded sample.
        for keep in persist::subset_family(&pending, 32, i as u64) {
            let img = r.rec.crash_image(fence, |j| keep.contains(&j));
            let v = judge(&r, img, fence, mode, false);
            assert!(
                v.is_empty(),
                "{mode:?}: append ending at {i}, kept {keep:?} of {pending:?}: {v:?}"
            );
            states += 1;
        }
    }
    assert!(states > 100, "{states} states");
}

#[test]
fn the_oracle_sees_a_lost_flushed_write() {
    // The checks above can fail: drop the stores of the first flushed
    // key-set from a complete run and the oracle reports the loss.
    let ops = vec![
        Op::Write {
            off: 0,
            len: 4096,
            id: 1,
            fua: false,
        },
        Op::Flush,
    ];
    let r = record(Mode::Recover, false, ops);
    let ev = r.rec.events();
    let append = ev
        .iter()
        .position(|e| *e == Access::Begin(CrashPoint::KsetAppend))
        .unwrap();
    let img = r.rec.crash_image(ev.len(), |_| true);
    let mut img_without = r.rec.base().clone();
    for (i, e) in ev.iter().enumerate() {
        if i <= append || !matches!(e, Access::Store { .. }) {
            pcache::pmem::apply_event(&mut img_without, e);
        }
    }
    assert!(judge(&r, img, ev.len(), Mode::Recover, false).is_empty());
    let v = judge(&r, img_without, ev.len(), Mode::Recover, false);
    assert!(
        matches!(v.as_slice(), [Violation::Lost { durable: 1, .. }]),
        "{v:?}"
    );
}

/// A device that held an older cache whose log has records past the new
/// cache's first key-set (same record sizes: the same kind of workload).
fn older_cache_with_a_log() -> SparsePmem {
    let mut p = formatted();
    let opts = Options {
        mode: Mode::Recover,
        data_crc: false,
    };
    let mut cache = start(&mut p, &opts, &mut NoHooks).cache.unwrap();
    let mut disk = original_disk();
    for (i, off) in [0u64, 4096, 8192].into_iter().enumerate() {
        let mut data = vec![0u8; 4096];
        fill(500 + i as u32, off, &mut data);
        cache
            .write(&mut p, &disk, &mut NoHooks, off, &data, true)
            .unwrap();
    }
    pcache::deactivate(cache, &mut p, &mut disk, &mut NoHooks).unwrap();
    // The user asks for a re-format: the superblock's magic is zeroed.
    p.write_bytes(pcache::format::SB_OFF + 8, &[0; 8]).unwrap();
    p
}

#[test]
fn the_kernels_key_set_order_can_resurrect_an_older_caches_records_and_recover_mode_cannot() {
    // The new cache writes one 4 KiB FUA write: its key-set goes where the
    // older cache's first one was, and its terminator over the older cache's
    // second record. Under the kernel's order (one fence for both) the record
    // can persist without the terminator; replay then reads the older
    // cache's second record as the log's continuation, and its key serves
    // the older cache's data.
    let mut found = [0usize; 2];
    for (m, mode) in [Mode::Strict, Mode::Recover].into_iter().enumerate() {
        let mut rec = RecordingPmem::new(older_cache_with_a_log());
        let mut hooks = rec.hooks();
        let opts = Options {
            mode,
            data_crc: false,
        };
        let a = start(&mut rec, &opts, &mut hooks);
        assert_eq!(a.report.outcome, Outcome::Formatted);
        let mut cache = a.cache.unwrap();
        let ops = vec![Op::Write {
            off: 12288,
            len: 4096,
            id: 1,
            fua: true,
        }];
        let mut data = vec![0u8; 4096];
        fill(1, 12288, &mut data);
        let disk = original_disk();
        cache
            .write(&mut rec, &disk, &mut hooks, 12288, &data, true)
            .unwrap();
        let ev = rec.events();
        let r = Recorded {
            acks: vec![ev.len()],
            rec,
            ops,
        };
        let begin = ev
            .iter()
            .position(|e| *e == Access::Begin(CrashPoint::KsetAppend))
            .unwrap();
        let fence = ev.len() - 2; // the append's last fence, then its End marker
        assert_eq!(ev[fence], Access::Fence);
        for keep in persist::subset_family(&r.rec.pending(fence), 0, 0) {
            let img = r.rec.crash_image(fence, |j| j < begin || keep.contains(&j));
            // Read what the older cache had cached too: it must not show.
            let mut img = img;
            let a = start(&mut img, &opts, &mut NoHooks);
            let mut cache = a.cache.unwrap();
            let mut buf = vec![0u8; 4 * 4096];
            let mut disk = original_disk();
            cache
                .read(&mut img, &mut disk, &mut NoHooks, 0, &mut buf)
                .unwrap();
            let runs = classify_range(0, &buf);
            let v = check(&r.ops, 0, &runs);
            if v.iter()
                .any(|v| matches!(v, Violation::Unknown { id, .. } if *id >= 500))
            {
                found[m] += 1;
            }
        }
    }
    eprintln!(
        "states that resurrect the older cache: strict {}, recover {}",
        found[0], found[1]
    );
    assert!(found[0] > 0, "strict: no state resurrected the older cache");
    assert_eq!(found[1], 0, "recover: a state resurrected the older cache");
}

#[test]
fn a_cut_after_every_single_store_of_a_small_workload_recovers_to_allowed_content() {
    // Small writes, so that every store can be a cut: overwrites, a write
    // across the 4 MiB boundary, FUA, a flush, and a key-set left open.
    let w = |off: u64, len: u32, id: u32, fua: bool| Op::Write { off, len, id, fua };
    let ops = vec![
        w(0, 1024, 1, false),
        w(512, 1024, 2, false),
        w((4 << 20) - 512, 1024, 3, true),
        Op::Flush,
        w(0, 512, 4, false),
        Op::CloseKsets,
        w(1024, 1536, 5, true),
        w(512, 512, 6, false),
    ];
    for mode in [Mode::Strict, Mode::Recover] {
        let r = record(mode, false, ops.clone());
        let n = r.rec.events().len();
        for cut in 0..=n {
            let v = judge(&r, r.rec.image_at(cut), cut, mode, false);
            assert!(v.is_empty(), "{mode:?}: cut {cut} of {n}: {v:?}");
        }
    }
}

/// A workload with writeback and GC between its writes, over a recorded
/// backing disk: every store, disk write and flush is a cut; the disk keeps
/// what its last completed flush covered, with none or all of the writes
/// pending since.
#[test]
fn cuts_through_writeback_and_gc_on_both_devices_recover_to_allowed_content() {
    let w = |off: u64, len: u32, id: u32, fua: bool| Op::Write { off, len, id, fua };
    // `None`: an idle period (writeback then GC, gc_percent 0).
    let steps: Vec<Option<Op>> = vec![
        Some(w(0, 1024, 1, false)),
        Some(w((4 << 20) - 512, 1024, 2, true)),
        Some(Op::Flush),
        None,
        Some(w(512, 1024, 3, false)),
        Some(Op::CloseKsets),
        None,
        Some(w(0, 512, 4, true)),
        None,
    ];
    let ops: Vec<Op> = steps.iter().flatten().copied().collect();
    for mode in [Mode::Strict, Mode::Recover] {
        let mut rec = RecordingPmem::new(formatted());
        let mut hooks = rec.hooks();
        // A small disk (the workload stays below 5 MiB): every state copies it.
        let original = {
            let mut d = original_disk();
            let mut v = vec![0u8; 5 << 20];
            d.read(0, &mut v).unwrap();
            v
        };
        let mut disk = rec.backing(original.clone());
        let o = Options {
            mode,
            data_crc: false,
        };
        let mut cache = start(&mut rec, &o, &mut hooks).cache.unwrap();
        cache.set_gc_percent(&mut rec, &mut hooks, 0).unwrap();
        let mut acks = Vec::new();
        let mut idles = 0;
        for step in &steps {
            match step {
                Some(Op::Write { off, len, id, fua }) => {
                    let mut data = vec![0u8; *len as usize];
                    fill(*id, *off, &mut data);
                    cache
                        .write(&mut rec, &disk, &mut hooks, *off, &data, *fua)
                        .unwrap();
                }
                Some(Op::Flush) => cache.flush(&mut rec, &mut hooks).unwrap(),
                Some(Op::CloseKsets) => cache.close_kset(&mut rec, &mut hooks).unwrap(),
                None => {
                    let idle = cache.idle(&mut rec, &mut disk, &mut hooks).unwrap();
                    idles += idle.written_back + idle.collected;
                    continue;
                }
            }
            acks.push(rec.events().len());
        }
        assert!(idles >= 4, "writeback and GC ran ({idles} steps)");
        let ev = rec.events();
        let (mut states, mut refused) = (0, 0);
        for cut in 0..=ev.len() {
            let acked = acks.iter().filter(|&&a| a <= cut).count();
            for keep_pending_disk in [false, true] {
                let mut img = rec.image_at(cut);
                let disk_img = rec.disk_image(&original, cut, |_| keep_pending_disk);
                let a = start(&mut img, &o, &mut NoHooks);
                if a.report.outcome == Outcome::Refused {
                    // The kernel's tail policy: the first dirty_tail update
                    // after the format overwrites the only copy; torn, the
                    // cache has no dirty_tail and is refused for ever.
                    assert_eq!(mode, Mode::Strict, "cut {cut}: {}", a.report);
                    assert!(
                        matches!(a.report.refusal, Some(pcache::Refusal::TailMissing { .. })),
                        "cut {cut}: {}",
                        a.report
                    );
                    refused += 1;
                    continue;
                }
                let mut cache = a.cache.unwrap();
                let mut backing = VecBacking::from_vec(disk_img);
                let mut runs = Vec::new();
                for (off, len) in touched_ranges(&ops) {
                    let mut buf = vec![0u8; len as usize];
                    cache
                        .read(&mut img, &mut backing, &mut NoHooks, off, &mut buf)
                        .unwrap();
                    runs.extend(classify_range(off, &buf));
                }
                let v = check(&ops, acked, &runs);
                assert!(
                    v.is_empty(),
                    "{mode:?}: cut {cut}, pending disk writes kept {keep_pending_disk}: {v:?}"
                );
                states += 1;
            }
        }
        assert!(states > 200, "{states}");
        match mode {
            Mode::Strict => assert!(
                refused > 0,
                "strict: the torn first tail update never showed"
            ),
            Mode::Recover => assert_eq!(refused, 0),
        }
        eprintln!("{mode:?}: {states} states, {refused} refused for ever");
    }
}
