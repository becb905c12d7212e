//! The data path against a plain map of the logical device: random writes,
//! reads, flushes and FUA through the module, compared after every step, and
//! after a deactivation and a replay (`docs/format.md` §9.2–§9.6).

mod common;
use common::{content, opts, reopen, SIZE_512M};

use pcache::backing::{Backing, VecBacking};
use pcache::cache_req::IoError;
use pcache::format::{CACHE_SUBTREE_SIZE, DATA_SIZE, MB};
use pcache::pmem::{Access, RecordingPmem, SparsePmem};
use pcache::{start, Cache, CrashPoint, Mode, NoHooks, Outcome, Pmem};
use proptest::prelude::*;

const PMEM: u64 = SIZE_512M;
const DISK: u64 = 24 * MB;

/// A backing device whose every sector is distinct, so a read that returns
/// the wrong sector shows.
fn patterned_disk() -> VecBacking {
    let mut d = VecBacking::new(DISK / 512);
    let mut s = vec![0u8; 512];
    for lba in 0..DISK / 512 {
        for (i, b) in s.iter_mut().enumerate() {
            *b = (lba as u8) ^ (i as u8).wrapping_mul(7) ^ 0x5a;
        }
        s[..8].copy_from_slice(&lba.to_le_bytes());
        d.write(lba, &s).unwrap();
    }
    d
}

/// A freshly formatted 512 MiB cache in recover mode.
fn fresh_cache() -> (SparsePmem, Cache) {
    let mut pmem = SparsePmem::new(PMEM);
    let cache = start(&mut pmem, &opts(Mode::Recover), &mut NoHooks)
        .cache
        .unwrap();
    (pmem, cache)
}

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, fua: bool },
    Read { off: u64, len: u64 },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    // Offsets in sectors, near 4 MiB boundaries half of the time.
    let off = prop_oneof![
        (0..DISK / 512 - 256).prop_map(|s| s * 512),
        (1..DISK / CACHE_SUBTREE_SIZE, 0u64..64)
            .prop_map(|(b, d)| b * CACHE_SUBTREE_SIZE - d * 512),
    ];
    prop_oneof![
        6 => (off.clone(), 1u64..256, any::<bool>())
            .prop_map(|(off, n, fua)| Op::Write { off, len: n * 512, fua: fua && n % 5 == 0 }),
        3 => (off, 1u64..256).prop_map(|(off, n)| Op::Read { off, len: n * 512 }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn run_against_model(ops: &[Op], mode: Mode) -> Result<(), TestCaseError> {
    let mut pmem = SparsePmem::new(PMEM);
    let mut disk = patterned_disk();
    let mut model = disk.as_slice().to_vec();
    let a = start(&mut pmem, &opts(mode), &mut NoHooks);
    let mut cache = a.cache.unwrap();
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { off, len, fua } => {
                let data = content(i as u32, len as usize);
                cache
                    .write(&mut pmem, &disk, &mut NoHooks, off, &data, fua)
                    .unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Read { off, len } => {
                let mut buf = vec![0u8; len as usize];
                cache
                    .read(&mut pmem, &mut disk, &mut NoHooks, off, &mut buf)
                    .unwrap();
                prop_assert!(
                    buf == model[off as usize..(off + len) as usize],
                    "op {i}: read {off:#x}+{len} differs"
                );
            }
            Op::Flush => cache.flush(&mut pmem, &mut NoHooks).unwrap(),
            Op::Reopen => cache = reopen(cache, &mut pmem, mode),
        }
    }
    // Everything, after a replay.
    cache = reopen(cache, &mut pmem, mode);
    let mut all = vec![0u8; DISK as usize];
    cache
        .read(&mut pmem, &mut disk, &mut NoHooks, 0, &mut all)
        .unwrap();
    prop_assert!(all == model, "the replayed device differs from the model");
    // The backing device is never written (writeback is issue 12).
    prop_assert!(disk.as_slice() == patterned_disk().as_slice());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_read_back_what_a_plain_map_holds(
        ops in prop::collection::vec(op(), 1..40),
        strict in any::<bool>(),
    ) {
        run_against_model(&ops, if strict { Mode::Strict } else { Mode::Recover })?;
    }
}

#[test]
fn keys_are_cut_at_4_mib_and_at_the_end_of_a_data_segment() {
    let (mut pmem, mut cache) = fresh_cache();
    let disk = VecBacking::new(DISK / 512);
    // 1 MiB straddling the 4 MiB boundary: two keys.
    let off = CACHE_SUBTREE_SIZE - 512 * 1024;
    cache
        .write(
            &mut pmem,
            &disk,
            &mut NoHooks,
            off,
            &content(1, MB as usize),
            true,
        )
        .unwrap();
    let ext: Vec<(u64, u32)> = cache.index().extents().map(|e| (e.off, e.len)).collect();
    assert_eq!(ext, [(off, 512 * 1024), (CACHE_SUBTREE_SIZE, 512 * 1024)]);
    // Fill the rest of the first data segment: the key that reaches its end
    // takes what is left and the next key starts a new segment at offset 0.
    let first_seg = cache.index().extents().next().unwrap().cache_seg_id;
    let left = DATA_SIZE - MB;
    let mut done = 0;
    while done < left + MB {
        let n = (left + MB - done).min(4 * MB - (done % (4 * MB)));
        cache
            .write(
                &mut pmem,
                &disk,
                &mut NoHooks,
                8 * MB + done,
                &content(2, n as usize),
                false,
            )
            .unwrap();
        done += n;
    }
    let segs: Vec<(u32, u32, u32)> = cache
        .index()
        .extents()
        .filter(|e| e.off >= 8 * MB)
        .map(|e| (e.cache_seg_id, e.cache_seg_off, e.len))
        .collect();
    let at_end = segs
        .iter()
        .find(|(s, o, l)| *s == first_seg && (*o + *l) as u64 == DATA_SIZE)
        .expect("a key ends exactly at the end of the first data segment");
    assert!(at_end.2 > 0);
    assert!(segs.iter().any(|(s, o, _)| *s != first_seg && *o == 0));
}

#[test]
fn a_write_fences_its_data_before_its_key_set_and_fua_closes_it() {
    let base = {
        let mut p = SparsePmem::new(PMEM);
        start(&mut p, &opts(Mode::Strict), &mut NoHooks);
        p
    };
    for mode in [Mode::Strict, Mode::Recover] {
        let mut rec = RecordingPmem::new(base.clone());
        let disk = VecBacking::new(DISK / 512);
        let mut hooks = rec.hooks();
        let mut cache = start(&mut rec, &opts(mode), &mut hooks).cache.unwrap();
        let n0 = rec.events().len();
        cache
            .write(&mut rec, &disk, &mut hooks, 0, &content(1, 4096), false)
            .unwrap();
        // Non-FUA: the data is written and fenced; the key waits in memory.
        let ev = &rec.events()[n0..];
        let fences = ev.iter().filter(|e| matches!(e, Access::Fence)).count();
        assert_eq!(
            fences, 1,
            "{mode:?}: one fence for the data, no key-set yet"
        );
        assert_eq!(cache.open_keys().len(), 1);
        let n1 = rec.events().len();
        cache
            .write(&mut rec, &disk, &mut hooks, 4096, &content(2, 4096), true)
            .unwrap();
        let ev = &rec.events()[n1..];
        let marks: Vec<(CrashPoint, bool)> = ev
            .iter()
            .filter_map(|e| match e {
                Access::Begin(cp) => Some((*cp, false)),
                Access::End(cp) => Some((*cp, true)),
                _ => None,
            })
            .collect();
        assert_eq!(
            marks,
            [
                (CrashPoint::DataWrite, false),
                (CrashPoint::DataWrite, true),
                (CrashPoint::KsetAppend, false),
                (CrashPoint::KsetAppend, true)
            ]
        );
        // The key-set: terminator (3 words) and record (3 + 2·5 words), fenced
        // once by the kernel, the terminator fenced first by recover.
        let inside: Vec<&Access> = ev
            .iter()
            .skip_while(|e| !matches!(e, Access::Begin(CrashPoint::KsetAppend)))
            .collect();
        let fences = inside.iter().filter(|e| matches!(e, Access::Fence)).count();
        assert_eq!(fences, if mode == Mode::Strict { 1 } else { 2 }, "{mode:?}");
        assert!(cache.open_keys().is_empty());
        assert_eq!(cache.key_head().seg_off, 24 + 2 * 40);
    }
}

#[test]
fn a_full_log_segment_switches_with_a_last_record() {
    let (mut pmem, mut cache) = fresh_cache();
    let mut disk = VecBacking::new(DISK / 512);
    // One-key FUA writes of 512 bytes: 64 bytes of log each.
    let per_seg = (DATA_SIZE - 24) / 64;
    let mut i = 0u64;
    while cache.key_head().cache_seg_id == 0 {
        let off = (i * 512) % DISK;
        cache
            .write(
                &mut pmem,
                &disk,
                &mut NoHooks,
                off,
                &content(i as u32, 512),
                true,
            )
            .unwrap();
        i += 1;
        assert!(i <= per_seg + 1);
    }
    let head = cache.key_head();
    assert_eq!(
        head.seg_off, 64,
        "the record that did not fit went first in the new segment"
    );
    let status_before = cache.status_line(0);
    let a = {
        pcache::deactivate(cache, &mut pmem, &mut disk, &mut NoHooks).unwrap();
        start(&mut pmem, &opts(Mode::Recover), &mut NoHooks)
    };
    assert_eq!(a.report.outcome, Outcome::Opened);
    let log = a.report.log.clone().unwrap();
    assert_eq!((log.ksets, log.lasts), (i, 1));
    let cache = a.cache.unwrap();
    assert_eq!(cache.key_head(), head);
    assert_eq!(cache.status_line(0), status_before);
}

#[test]
fn without_gc_a_full_cache_refuses_writes_and_says_so() {
    let (mut pmem, mut cache) = fresh_cache();
    let disk = VecBacking::new(1024 * MB / 512);
    let chunk = content(9, 4 * MB as usize);
    let mut off = 0;
    let err = loop {
        match cache.write(&mut pmem, &disk, &mut NoHooks, off, &chunk, false) {
            Ok(()) => off = (off + 4 * MB) % (1024 * MB),
            Err(e) => break e,
        }
        assert!(off < 1024 * MB);
    };
    assert_eq!(err, IoError::CacheFull, "{err}");
    // What was written before is still read back, and the log still closes
    // (its segment has room).
    cache.flush(&mut pmem, &mut NoHooks).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut disk = disk;
    cache
        .read(&mut pmem, &mut disk, &mut NoHooks, 0, &mut buf)
        .unwrap();
    assert_eq!(buf, chunk[..4096]);
}

#[test]
fn bad_requests_are_errors_not_writes() {
    let (mut pmem, mut cache) = fresh_cache();
    let disk = VecBacking::new(DISK / 512);
    let before = pmem.clone();
    assert!(matches!(
        cache.write(&mut pmem, &disk, &mut NoHooks, 100, &[0; 512], false),
        Err(IoError::Unaligned { .. })
    ));
    assert!(matches!(
        cache.write(
            &mut pmem,
            &disk,
            &mut NoHooks,
            DISK - 512,
            &[0; 1024],
            false
        ),
        Err(IoError::BeyondDevice { .. })
    ));
    assert!(matches!(
        cache.write(
            &mut pmem,
            &disk,
            &mut NoHooks,
            u64::MAX - 511,
            &[0; 512],
            false
        ),
        Err(IoError::BeyondDevice { .. })
    ));
    assert!(pmem.same_bytes(&before));
    let _ = pmem.size();
}

#[test]
fn the_inspector_tells_current_overridden_and_partly_overridden_keys_and_the_status() {
    use pcache::inspect::{inspect, InspectOptions, KeyState};
    let (mut pmem, mut cache) = fresh_cache();
    let mut disk = VecBacking::new(DISK / 512);
    for (off, len) in [(0u64, 8192usize), (0, 8192), (4096, 8192), (65536, 4096)] {
        cache
            .write(&mut pmem, &disk, &mut NoHooks, off, &content(1, len), false)
            .unwrap();
    }
    pcache::deactivate(cache, &mut pmem, &mut disk, &mut NoHooks).unwrap();
    let rep = inspect(&pmem, &InspectOptions::default()).unwrap();
    let states: Vec<KeyState> = rep
        .log_records()
        .flat_map(|r| r.unwrap().keys)
        .map(|k| k.state)
        .collect();
    assert_eq!(
        states,
        [
            KeyState::Overridden,
            KeyState::PartlyOverridden,
            KeyState::Current,
            KeyState::Current
        ]
    );
    let text = rep.to_string();
    assert!(text.contains("(partly overridden)"), "{text}");
    assert!(text.contains("status after replay"), "{text}");
    // The status line an activation reports.
    let status = rep.log.status.clone().expect("a status line");
    drop(rep);
    let a = start(&mut pmem, &opts(Mode::Recover), &mut NoHooks);
    assert_eq!(Some(status), a.report.status);
}
