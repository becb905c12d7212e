//! Writeback and GC (`docs/format.md` §9.7, §9.8) against a plain map of the
//! logical device, over a backing disk with a volatile write cache: random
//! writes, flushes, idle periods (writeback and GC until neither moves),
//! reopens; the log cycles through its segments several times.

mod common;
use common::{content, opts, reopen, SIZE_512M};

use pcache::backing::VolatileBacking;
use pcache::cache_gc::Gc;
use pcache::cache_writeback::Writeback;
use pcache::format::MB;
use pcache::pmem::SparsePmem;
use pcache::{start, Cache, CachePos, Mode, NoHooks};
use proptest::prelude::*;

const PMEM: u64 = SIZE_512M;
const DISK: u64 = 64 * MB;

fn disk() -> VolatileBacking {
    VolatileBacking::new(DISK / 512, |lba, s| {
        s.fill(lba as u8 ^ 0x3c);
        s[..8].copy_from_slice(&lba.to_le_bytes());
    })
}

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, fua: bool },
    Flush,
    Idle,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..DISK / 4096, 1u64..=1024, any::<bool>()).prop_map(|(b, n, fua)| {
            let off = b * 4096;
            let len = (n * 4096).min(DISK - off);
            Op::Write { off, len, fua: fua && n % 3 == 0 }
        }),
        1 => Just(Op::Flush),
        2 => Just(Op::Idle),
        1 => Just(Op::Reopen),
    ]
}

/// What a run went through.
#[derive(Debug, Default)]
struct Stats {
    /// Log segment switches passed by writeback or GC.
    switches: u64,
    /// Data segments invalidated (and so free for reuse).
    invalidated: u64,
}

/// Runs `ops`.
fn run(ops: &[Op], mode: Mode, gc_percent: u32) -> Result<Stats, TestCaseError> {
    let mut pmem = SparsePmem::new(PMEM);
    let mut backing = disk();
    let mut model = backing.durable().to_vec();
    let mut cache = start(&mut pmem, &opts(mode), &mut NoHooks).cache.unwrap();
    cache
        .set_gc_percent(&mut pmem, &mut NoHooks, gc_percent)
        .unwrap();
    let mut st = Stats::default();
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { off, len, fua } => {
                let data = content(i as u32, len as usize);
                match cache.write(&mut pmem, &backing, &mut NoHooks, off, &data, fua) {
                    Ok(()) => model[off as usize..(off + len) as usize].copy_from_slice(&data),
                    // A full cache: what the kernel would defer until GC
                    // frees a segment. Idle, then retry once.
                    Err(pcache::cache_req::IoError::CacheFull) => {
                        cache.flush(&mut pmem, &mut NoHooks).unwrap();
                        let idle = cache.idle(&mut pmem, &mut backing, &mut NoHooks).unwrap();
                        st.switches += idle.segment_switches;
                        st.invalidated += idle.invalidated;
                        if cache
                            .write(&mut pmem, &backing, &mut NoHooks, off, &data, fua)
                            .is_ok()
                        {
                            model[off as usize..(off + len) as usize].copy_from_slice(&data);
                        } else {
                            // Pieces of it may be in: what is read back
                            // below decides (the request failed, so either
                            // content is allowed); take the module's word.
                            let mut now = vec![0u8; len as usize];
                            cache
                                .read(&mut pmem, &mut backing, &mut NoHooks, off, &mut now)
                                .unwrap();
                            for (s, (m, n)) in model[off as usize..(off + len) as usize]
                                .chunks_mut(512)
                                .zip(now.chunks(512))
                                .enumerate()
                            {
                                let new = &data[s * 512..s * 512 + 512];
                                prop_assert!(n == m || n == new, "op {i}: a torn sector");
                                m.copy_from_slice(n);
                            }
                        }
                    }
                    Err(e) => panic!("op {i}: {e}"),
                }
            }
            Op::Flush => cache.flush(&mut pmem, &mut NoHooks).unwrap(),
            Op::Idle => {
                // After a flush and an idle period everything is written
                // back and durable on the disk.
                cache.flush(&mut pmem, &mut NoHooks).unwrap();
                let idle = cache.idle(&mut pmem, &mut backing, &mut NoHooks).unwrap();
                st.switches += idle.segment_switches;
                st.invalidated += idle.invalidated;
                prop_assert!(
                    matches!(idle.writeback, Some(Writeback::Clean)),
                    "op {i}: {idle:?}"
                );
                prop_assert!(
                    backing.durable() == &model[..],
                    "op {i}: after an idle period the disk differs from the model"
                );
                if gc_percent == 0 {
                    prop_assert_eq!(cache.key_tail().pos, cache.dirty_tail().pos, "op {}", i);
                }
            }
            Op::Reopen => cache = reopen(cache, &mut pmem, mode),
        }
    }
    cache = reopen(cache, &mut pmem, mode);
    let mut all = vec![0u8; DISK as usize];
    cache
        .read(&mut pmem, &mut backing, &mut NoHooks, 0, &mut all)
        .unwrap();
    prop_assert!(all == model, "the device differs from the model");
    // Nothing the module holds may be unbalanced: no segment count below zero.
    for c in 0..cache.segments().len() as u32 {
        prop_assert!(cache.refs(c) >= 0, "segment {c}: refs {}", cache.refs(c));
    }
    Ok(st)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn random_writes_with_writeback_and_gc_read_back_what_a_plain_map_holds(
        ops in prop::collection::vec(op(), 1..120),
        strict in any::<bool>(),
        gc_percent in prop_oneof![Just(0u32), Just(70), Just(90)],
    ) {
        run(&ops, if strict { Mode::Strict } else { Mode::Recover }, gc_percent)?;
    }
}

#[test]
fn data_segments_are_reused_and_the_log_moves_through_its_segments() {
    // 300 writes of 4 MiB (more than twice the 480 MiB of data segments),
    // then 600,000 one-sector writes (about 30 MiB of log: the log leaves
    // its segment, writeback and GC follow it), idle periods in between.
    let mut ops = Vec::new();
    for i in 0..300u64 {
        ops.push(Op::Write {
            off: (i * 4 * MB) % DISK,
            len: 4 * MB,
            fua: i % 7 == 0,
        });
        if i % 16 == 15 {
            ops.push(Op::Idle);
        }
    }
    ops.push(Op::Reopen);
    for i in 0..600_000u64 {
        ops.push(Op::Write {
            off: (i * 512 * 7) % DISK,
            len: 512,
            fua: false,
        });
        if i % 50_000 == 49_999 {
            ops.push(Op::Idle);
        }
        if i == 300_000 {
            ops.push(Op::Reopen);
        }
    }
    for mode in [Mode::Recover, Mode::Strict] {
        let st = run(&ops, mode, 0).unwrap();
        assert!(st.invalidated > 30, "{mode:?}: {st:?}");
        assert!(st.switches >= 2, "{mode:?}: {st:?}");
    }
}

/// A new cache in `mode` with 4 KiB written (FUA) at 0: its pmem, its disk
/// and the cache.
fn one_write(mode: Mode) -> (SparsePmem, VolatileBacking, Cache) {
    let mut pmem = SparsePmem::new(PMEM);
    let backing = disk();
    let mut cache = start(&mut pmem, &opts(mode), &mut NoHooks).cache.unwrap();
    cache
        .write(
            &mut pmem,
            &backing,
            &mut NoHooks,
            0,
            &content(1, 4096),
            true,
        )
        .unwrap();
    (pmem, backing, cache)
}

/// A cache whose first writeback's backing flush failed.
struct FailedFlush {
    pmem: SparsePmem,
    /// Still failing its flushes.
    backing: VolatileBacking,
    cache: Cache,
    /// dirty_tail before the writeback.
    before: CachePos,
    /// The writeback's step.
    wb: Writeback,
}

/// [`one_write`], then a writeback step over a disk that fails its flushes.
fn failed_flush(mode: Mode) -> FailedFlush {
    let (mut pmem, mut backing, mut cache) = one_write(mode);
    let before = cache.dirty_tail().pos;
    backing.fail_flushes = true;
    let wb = cache
        .writeback_step(&mut pmem, &mut backing, &mut NoHooks)
        .unwrap();
    FailedFlush {
        pmem,
        backing,
        cache,
        before,
        wb,
    }
}

#[test]
fn gc_waits_for_gc_percent_and_never_passes_dirty_tail() {
    let (mut pmem, mut backing, mut cache) = one_write(Mode::Recover);
    // Default gc_percent 70: 2 of 31 segments in use is below it.
    assert_eq!(
        cache.gc_step(&mut pmem, &mut NoHooks).unwrap(),
        Gc::Idle {
            why: "key_tail is at dirty_tail"
        }
    );
    let wb = cache
        .writeback_step(&mut pmem, &mut backing, &mut NoHooks)
        .unwrap();
    assert!(matches!(wb, Writeback::KeySet { written: 1, .. }), "{wb:?}");
    assert_eq!(
        backing.pending_sectors(),
        0,
        "flushed before dirty_tail moved"
    );
    assert_eq!(
        cache.gc_step(&mut pmem, &mut NoHooks).unwrap(),
        Gc::Idle {
            why: "fewer segments in use than gc_percent"
        }
    );
    cache.set_gc_percent(&mut pmem, &mut NoHooks, 0).unwrap();
    let gc = cache.gc_step(&mut pmem, &mut NoHooks).unwrap();
    assert!(matches!(gc, Gc::KeySet { invalidated: 0, .. }), "{gc:?}");
    assert_eq!(cache.key_tail().pos, cache.dirty_tail().pos);
    assert!(cache.set_gc_percent(&mut pmem, &mut NoHooks, 91).is_err());
    // gc_percent persists in cache_info.
    let a = {
        pcache::deactivate(cache, &mut pmem, &mut backing, &mut NoHooks).unwrap();
        start(&mut pmem, &opts(Mode::Recover), &mut NoHooks)
    };
    assert_eq!(a.cache.unwrap().info().gc_percent(), 0);
}

#[test]
fn a_failed_backing_flush_stops_dirty_tail_in_recover_but_not_in_strict() {
    for mode in [Mode::Strict, Mode::Recover] {
        let FailedFlush {
            mut pmem,
            mut backing,
            mut cache,
            before,
            wb,
        } = failed_flush(mode);
        match mode {
            // The kernel ignores the flush's result: dirty_tail passes data
            // that is not durable on the disk.
            Mode::Strict => {
                assert!(matches!(wb, Writeback::FlushFailed { advanced: true, .. }));
                assert_ne!(cache.dirty_tail().pos, before);
                assert!(backing.pending_sectors() > 0);
            }
            Mode::Recover => {
                assert!(matches!(
                    wb,
                    Writeback::FlushFailed {
                        advanced: false,
                        ..
                    }
                ));
                assert_eq!(cache.dirty_tail().pos, before);
                backing.fail_flushes = false;
                let wb = cache
                    .writeback_step(&mut pmem, &mut backing, &mut NoHooks)
                    .unwrap();
                assert!(matches!(wb, Writeback::KeySet { .. }), "{wb:?}");
                assert_eq!(backing.pending_sectors(), 0);
            }
        }
    }
}

/// Deactivation flushes the backing disk as the kernel's does (`docs/format.md` §9.9 step 7):
/// strict writeback past a failed flush leaves the disk's writes volatile, and
/// a deactivation whose flush completes makes them durable; a failed one is
/// returned, after the key-set close was still done.
#[test]
fn deactivation_flushes_the_backing_disk() {
    for flush_fails in [false, true] {
        let FailedFlush {
            mut pmem,
            mut backing,
            mut cache,
            wb,
            ..
        } = failed_flush(Mode::Strict);
        assert!(matches!(wb, Writeback::FlushFailed { advanced: true, .. }));
        // A write left open in the log: the close must still happen.
        cache
            .write(
                &mut pmem,
                &backing,
                &mut NoHooks,
                8192,
                &content(2, 4096),
                false,
            )
            .unwrap();
        assert!(backing.pending_sectors() > 0);
        backing.fail_flushes = flush_fails;
        let r = pcache::deactivate(cache, &mut pmem, &mut backing, &mut NoHooks);
        assert_eq!(r.is_err(), flush_fails, "{r:?}");
        assert_eq!(backing.pending_sectors() == 0, !flush_fails);
        if !flush_fails {
            assert_eq!(&backing.durable()[..4096], &content(1, 4096)[..]);
        }
        // The open key-set was closed either way: the next activation reads it.
        let mut cache = start(&mut pmem, &opts(Mode::Strict), &mut NoHooks)
            .cache
            .unwrap();
        let mut buf = vec![0; 4096];
        cache
            .read(&mut pmem, &mut backing, &mut NoHooks, 8192, &mut buf)
            .unwrap();
        assert_eq!(buf, content(2, 4096));
    }
}
