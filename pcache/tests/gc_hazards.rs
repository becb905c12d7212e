//! The kernel's GC hazards (`docs/format.md` §10.4), shown on the host: the
//! exact states a power cut leaves, recovered in both modes, then the
//! workload goes on and a read is judged by the durability oracle.

mod common;
use common::{opts, SIZE_512M};

use pcache::backing::VecBacking;
use pcache::format::MB;
use pcache::pmem::{Access, RecordingPmem, SparsePmem};
use pcache::{start, CrashPoint, Mode, NoHooks, Outcome};
use workload::oracle::{check, Violation};
use workload::pattern::{classify_range, fill};
use workload::Op;

const PMEM: u64 = SIZE_512M;
const DISK: u64 = 64 * MB;

/// A cache whose first data segment is exactly full of 4,093 keys of 4 KiB
/// (the last key-set holds 125 of them), all written back; gc_percent 0.
fn full_first_segment(mode: Mode) -> (SparsePmem, VecBacking, Vec<Op>) {
    let mut pmem = SparsePmem::new(PMEM);
    // The original content: tag 0 everywhere.
    let mut orig = vec![0u8; DISK as usize];
    fill(0, 0, &mut orig);
    let mut disk = VecBacking::from_vec(orig);
    let mut cache = start(&mut pmem, &opts(mode), &mut NoHooks).cache.unwrap();
    cache.set_gc_percent(&mut pmem, &mut NoHooks, 0).unwrap();
    let mut ops = Vec::new();
    for i in 0..4093u64 {
        let (off, id) = (i * 4096, 1 + i as u32);
        let mut data = vec![0u8; 4096];
        fill(id, off, &mut data);
        cache
            .write(&mut pmem, &disk, &mut NoHooks, off, &data, false)
            .unwrap();
        ops.push(Op::Write {
            off,
            len: 4096,
            id,
            fua: false,
        });
    }
    cache.flush(&mut pmem, &mut NoHooks).unwrap();
    ops.push(Op::Flush);
    let wb = cache
        .writeback_all(&mut pmem, &mut disk, &mut NoHooks)
        .unwrap();
    assert_eq!(wb.len(), 33, "32 key-sets written back, then clean");
    pcache::deactivate(cache, &mut pmem, &mut disk, &mut NoHooks).unwrap();
    (pmem, disk, ops)
}

#[test]
fn a_cut_between_an_invalidation_and_key_tail_loses_acknowledged_data_in_strict_only() {
    let mut lost = [false; 2];
    for (m, mode) in [Mode::Strict, Mode::Recover].into_iter().enumerate() {
        let (base, disk, mut ops) = full_first_segment(mode);
        // GC over the whole log, recorded: the last key-set's puts bring
        // the first data segment's count to zero, so it is invalidated
        // (C7), and then key_tail moves past the key-set (C5).
        let mut rec = RecordingPmem::new(base);
        let mut hooks = rec.hooks();
        let mut cache = start(&mut rec, &opts(mode), &mut hooks).cache.unwrap();
        let steps = cache.gc_all(&mut rec, &mut hooks).unwrap();
        assert_eq!(cache.invalidations(), 1, "{steps:?}");
        let ev = rec.events();
        let gen_end = ev
            .iter()
            .position(|e| *e == Access::End(CrashPoint::SegGen))
            .expect("an invalidation");
        // Power fails right after the generation is durable.
        let mut img = rec.image_at(gen_end + 1);
        drop(cache);

        // Recovery replays from the old key_tail: the last key-set's keys
        // are stale now (dropped, no reference). The workload goes on: a
        // FUA write lands in the freed segment, and GC runs.
        let a = start(&mut img, &opts(mode), &mut NoHooks);
        assert_eq!(a.report.outcome, Outcome::Opened, "{}", a.report);
        let mut cache = a.cache.unwrap();
        let mut disk = disk.clone();
        let (off, id) = (32 * MB, 10_000);
        let mut data = vec![0u8; 4096];
        fill(id, off, &mut data);
        cache
            .write(&mut img, &disk, &mut NoHooks, off, &data, true)
            .unwrap();
        ops.push(Op::Write {
            off,
            len: 4096,
            id,
            fua: true,
        });
        let new_seg = cache.index().lookup(off).unwrap().cache_seg_id;
        assert_eq!(new_seg, 1, "the new data went to the freed segment");
        cache.gc_all(&mut img, &mut NoHooks).unwrap();
        // Read it back.
        let mut buf = vec![0u8; 4096];
        cache
            .read(&mut img, &mut disk, &mut NoHooks, off, &mut buf)
            .unwrap();
        let v = check(&ops, ops.len(), &classify_range(off, &buf));
        lost[m] = v
            .iter()
            .any(|v| matches!(v, Violation::Lost { durable, .. } if *durable == id));
        if mode == Mode::Strict {
            // The kernel's count went below zero.
            assert!(cache.refs(1) < 0, "refs {}", cache.refs(1));
        } else {
            assert!(v.is_empty(), "{v:?}");
            assert_eq!(cache.refs(1), 2, "the data head and the new key");
        }
    }
    assert_eq!(
        lost,
        [true, false],
        "strict loses the FUA write, recover does not"
    );
}

#[test]
fn a_torn_first_tail_update_after_an_activation_falls_back_two_steps_in_strict_one_in_recover() {
    for mode in [Mode::Strict, Mode::Recover] {
        // Three key-sets written back one at a time: dirty_tail at the end
        // of each, persisted each time.
        let mut pmem = SparsePmem::new(PMEM);
        let mut disk = VecBacking::new(DISK / 512);
        let mut cache = start(&mut pmem, &opts(mode), &mut NoHooks).cache.unwrap();
        let mut ends = vec![cache.dirty_tail().pos];
        for i in 0..4u64 {
            let mut data = vec![0u8; 4096];
            fill(1 + i as u32, i * 4096, &mut data);
            cache
                .write(&mut pmem, &disk, &mut NoHooks, i * 4096, &data, true)
                .unwrap();
        }
        for _ in 0..3 {
            cache
                .writeback_step(&mut pmem, &mut disk, &mut NoHooks)
                .unwrap();
            ends.push(cache.dirty_tail().pos);
        }
        pcache::deactivate(cache, &mut pmem, &mut disk, &mut NoHooks).unwrap();
        // A new activation, then one more key-set written back; power fails
        // with only the first word of that dirty_tail write persisted (the
        // record is torn: its CRC fails).
        let mut rec = RecordingPmem::new(pmem);
        let mut hooks = rec.hooks();
        let mut cache = start(&mut rec, &opts(mode), &mut hooks).cache.unwrap();
        let n = rec.events().len();
        cache
            .writeback_step(&mut rec, &mut disk, &mut hooks)
            .unwrap();
        let ev = rec.events();
        let first_tail_store = (n..ev.len())
            .find(|&i| {
                ev[i - 1] == Access::Begin(CrashPoint::TailUpdate)
                    && matches!(ev[i], Access::Store { .. })
            })
            .unwrap();
        let mut img = rec.image_at(first_tail_store + 1);
        let a = start(&mut img, &opts(mode), &mut NoHooks);
        let back = a.cache.unwrap().dirty_tail().pos;
        let want = match mode {
            // Policy B overwrote the newest copy: the older one is two
            // key-sets behind.
            Mode::Strict => ends[2],
            Mode::Recover => ends[3],
        };
        assert_eq!(back, want, "{mode:?}: dirty_tail after the cut ({ends:?})");
    }
}
