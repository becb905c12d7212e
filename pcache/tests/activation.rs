//! First activation (byte-exact against `docs/format.md` §5.10), later activations, write order.

mod common;

use common::*;
use pcache::format::*;
use pcache::pmem::{Access, Pmem, RecordingPmem, SparsePmem, VecPmem};
use pcache::{activate, start, CrashPoint, Mode, NoHooks, Options, Outcome};

#[test]
fn first_activation_matches_kernel_image_512m_and_1g() {
    for (size, seg_num) in [(SIZE_512M, 31u32), (SIZE_1G, 63)] {
        for mode in MODES {
            for data_crc in [false, true] {
                let mut dev = SparsePmem::new(size);
                let r = activate(&mut dev, &Options { mode, data_crc }, &mut NoHooks);
                assert_eq!(r.outcome, Outcome::Formatted, "{r}");
                let want = expected_fresh_image(size, data_crc);
                assert!(
                    dev.same_bytes(&want),
                    "image differs from `docs/format.md` §5.10 ({size} bytes, {mode:?}, data_crc {data_crc})"
                );
                // The report.
                assert_eq!(r.seg_num, Some(seg_num));
                assert_eq!(r.n_segs, Some(seg_num));
                assert_eq!(r.chain_len, seg_num);
                let ci = r.cache_info.unwrap();
                assert_eq!((ci.slot, ci.seq), (1, 1));
                assert_eq!(
                    r.cache_info_flags,
                    Some(if data_crc { 0x1183 } else { 0x1182 })
                );
                for t in [r.key_tail.unwrap(), r.dirty_tail.unwrap()] {
                    assert_eq!(
                        (t.slot, t.seq, t.pos.cache_seg_id, t.pos.seg_off),
                        (0, 1, 0, 0)
                    );
                }
                assert_eq!(r.superblock, Some(pcache::SbState::Unformatted));
            }
        }
    }
}

#[test]
fn first_activation_records_are_the_documented_bytes() {
    // The literal vectors of `docs/format.md` §6.3 at the places §5.10 names (512 MiB).
    let dev = formatted(SIZE_512M, Mode::Recover);
    assert_eq!(
        read_vec(&dev, 4096, 24),
        hex("42777f04 00000000 ef96c596fa5eb065 1f000000 00000000")
    );
    assert_eq!(read_vec(&dev, 8192, 24), vec![0u8; 24]);
    assert_eq!(
        read_vec(&dev, 12288, 24),
        hex("6dfecadd 01000000 00000000 1f000000 82110000 00000000")
    );
    for off in [16384, 16416] {
        assert_eq!(
            read_vec(&dev, off, 16),
            hex("b0dff56e 01000000 00000000 00000000")
        );
        assert_eq!(read_vec(&dev, off + 16, 16), vec![0u8; 16]);
    }
    let seg1 = SEGMENTS_OFF + SEG_SIZE;
    let seg0 = SEGMENTS_OFF;
    assert_eq!(
        read_vec(&dev, seg0, 16),
        hex("318e663b 02000000 03000000 01000000")
    );
    assert_eq!(
        read_vec(&dev, seg1 - SEG_SIZE + 4096, 16),
        hex("fe258dfc 01000000 02000000 00000000")
    );
    assert_eq!(
        read_vec(&dev, seg0 + 8208, 16),
        hex("b0dff56e 01000000 00000000 00000000")
    );
    assert_eq!(read_vec(&dev, seg0 + 8192, 16), vec![0u8; 16]);
    let last = SEGMENTS_OFF + 30 * SEG_SIZE;
    assert_eq!(read_vec(&dev, last, 16), vec![0u8; 16]);
    assert_eq!(
        read_vec(&dev, last + 4096, 16),
        hex("fe258dfc 01000000 02000000 00000000")
    );
}

#[test]
fn contiguous_buffer_gives_the_same_image() {
    let mut v = VecPmem::new(SIZE_512M as usize);
    let r = activate(&mut v, &opts(Mode::Strict), &mut NoHooks);
    assert_eq!(r.outcome, Outcome::Formatted);
    let want = expected_fresh_image(SIZE_512M, false);
    for (i, chunk) in v.as_slice().chunks(1 << 20).enumerate() {
        let w = read_vec(&want, (i as u64) << 20, chunk.len());
        assert!(chunk == &w[..], "MiB {i} differs");
    }
}

#[test]
fn later_activations_rewrite_cache_info_in_the_other_slot() {
    for mode in MODES {
        let mut dev = formatted(SIZE_512M, mode);
        let mut before = dev.clone();
        for (n, want_slot) in [(2u8, 0usize), (3, 1), (4, 0)] {
            let r = act(&mut dev, mode);
            assert_eq!(r.outcome, Outcome::Opened, "{r}");
            let ci = r.cache_info.unwrap();
            assert_eq!((ci.slot, ci.seq), (want_slot, n));
            assert_eq!(r.chain_len, 31);
            assert_eq!(
                r.superblock,
                Some(pcache::SbState::Valid {
                    seg_num: 31,
                    flags: 0
                })
            );
            let kt = r.key_tail.unwrap();
            assert_eq!((kt.slot, kt.seq), (0, 1));
            let log = r.log.as_ref().unwrap();
            assert_eq!((log.ksets, log.keys, log.lasts), (0, 0, 0));
            // Only that cache_info slot changed, to the documented record.
            let slot_off = CACHE_INFO_OFF + want_slot as u64 * CACHE_INFO_SIZE;
            before
                .write_bytes(slot_off, &cache_info_rec(n, 31, 0x1182))
                .unwrap();
            assert!(
                dev.same_bytes(&before),
                "activation {n} wrote more than cache_info"
            );
        }
        // The documented seq-2 vector (1 GiB, n_segs 63).
        let mut g = formatted(SIZE_1G, mode);
        act(&mut g, mode);
        assert_eq!(
            read_vec(&g, 8192, 24),
            hex("8c565db6 02000000 00000000 3f000000 82110000 00000000")
        );
    }
}

#[test]
fn cache_info_seq_wraps() {
    let mut dev = formatted(SIZE_512M, Mode::Recover);
    for i in 2..=300u32 {
        let r = act(&mut dev, Mode::Recover);
        assert_eq!(r.outcome, Outcome::Opened);
        assert_eq!(r.cache_info.unwrap().seq, i as u8);
    }
}

#[test]
fn deactivate_without_open_keys_writes_nothing() {
    let mut rec = RecordingPmem::new(formatted(SIZE_512M, Mode::Recover));
    let a = start(&mut rec, &opts(Mode::Recover), &mut NoHooks);
    let n = rec.events().len();
    pcache::deactivate(
        a.cache.unwrap(),
        &mut rec,
        &mut pcache::backing::ZeroBacking { sectors: 0 },
        &mut NoHooks,
    )
    .unwrap();
    assert_eq!(rec.events().len(), n);
}

#[test]
fn data_crc_option_must_match() {
    let mut dev = formatted(SIZE_512M, Mode::Recover);
    let before = dev.clone();
    let r = activate(
        &mut dev,
        &Options {
            mode: Mode::Recover,
            data_crc: true,
        },
        &mut NoHooks,
    );
    assert_eq!(r.outcome, Outcome::Refused);
    assert!(r.message.unwrap().contains("data_crc"));
    assert!(dev.same_bytes(&before));
}

/// The order of `docs/format.md` §10.2 / §10, with the crash-point markers.
#[test]
fn write_order_and_markers() {
    use CrashPoint::*;
    for mode in MODES {
        let mut rec = RecordingPmem::new(SparsePmem::new(SIZE_512M));
        let mut hooks = rec.hooks();
        let r = activate(&mut rec, &opts(mode), &mut hooks);
        assert_eq!(r.outcome, Outcome::Formatted);
        let ev = rec.events();
        // Compress to a token string.
        let tok: Vec<String> = ev
            .iter()
            .map(|e| match e {
                Access::Store { off, .. } => format!("S{off}"),
                Access::ZeroRange { off, len } => format!("Z{off}+{len}"),
                Access::Flush { .. } => "F".into(),
                Access::Fence => "|".into(),
                Access::Begin(cp) => format!("<{}", cp.number()),
                Access::End(cp) => format!("{}>", cp.number()),
                Access::DiskWrite { sector, .. } => format!("D{sector}"),
                Access::DiskFlush => "DF".into(),
            })
            .collect();
        let s = tok.join(" ");
        let c1 = if mode == Mode::Strict {
            "<1 Z8192+12288 F 1>"
        } else {
            "<1 Z8192+12288 F | 1>"
        };
        let c2 = "<2 S4096 S4104 S4112 F | 2>";
        let seg = |p: u64| {
            let b = SEGMENTS_OFF + p * SEG_SIZE;
            format!(
                "<3 Z{b}+12288 F <7 S{} S{} F | 7> <6 S{} S{} F | 6> S{} S{} S{} F | 3>",
                b + 8208,
                b + 8216,
                b + 4096,
                b + 4104,
                b + 12288,
                b + 12296,
                b + 12304
            )
        };
        let link = |p: u64, slot: u64| {
            let b = SEGMENTS_OFF + p * SEG_SIZE + slot * 4096;
            format!("<6 S{b} S{} F | 6>", b + 8)
        };
        let mut want = vec![c1.to_string(), c2.to_string(), seg(0)];
        for p in 1..31u64 {
            want.push(link(p - 1, 0));
            want.push(seg(p));
        }
        want.push("<5 S16416 S16424 F | 5>".into());
        want.push("<5 S16384 S16392 F | 5>".into());
        want.push("<4 S12288 S12296 S12304 F | 4>".into());
        assert_eq!(s, want.join(" "), "{mode:?}");
        // Markers are balanced and the kinds used are C1..C7.
        let mut depth = 0i32;
        for e in &ev {
            match e {
                Access::Begin(cp) => {
                    depth += 1;
                    assert!(
                        cp.number() <= 7
                            && [
                                ZeroMeta, SbWrite, SegFormat, CacheInfo, TailUpdate, SegInfo,
                                SegGen
                            ]
                            .contains(cp)
                    );
                }
                Access::End(_) => depth -= 1,
                _ => {}
            }
            assert!(depth >= 0);
        }
        assert_eq!(depth, 0);
        // A later activation writes exactly C4.
        let mut rec2 = RecordingPmem::new(rec.current().clone());
        let mut hooks2 = rec2.hooks();
        assert_eq!(
            activate(&mut rec2, &opts(mode), &mut hooks2).outcome,
            Outcome::Opened
        );
        let n_writes = rec2.events().iter().filter(|e| e.is_write()).count();
        assert_eq!(n_writes, 3);
        assert_eq!(rec2.events().first(), Some(&Access::Begin(CacheInfo)));
    }
}

#[test]
fn file_and_mmap_pmem_give_the_same_image() {
    let dir = std::env::temp_dir().join(format!("pcache-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let want = expected_fresh_image(SIZE_512M, false);
    for kind in ["file", "mmap"] {
        let path = dir.join(format!("{kind}.img"));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(SIZE_512M).unwrap();
        drop(f);
        let r = if kind == "file" {
            let mut p = pcache::pmem::FilePmem::open(&path).unwrap();
            activate(&mut p, &opts(Mode::Recover), &mut NoHooks)
        } else {
            let mut p = pcache::pmem::MmapPmem::open(&path).unwrap();
            activate(&mut p, &opts(Mode::Recover), &mut NoHooks)
        };
        assert_eq!(r.outcome, Outcome::Formatted, "{kind}: {r}");
        let ro = pcache::pmem::FilePmem::open_read_only(&path).unwrap();
        for page in want.page_indices().chain([0, 1, 2, 3, 4, 5]) {
            let off = page * 4096;
            assert_eq!(
                read_vec(&ro, off, 4096),
                read_vec(&want, off, 4096),
                "{kind} page {page}"
            );
        }
        let mut ro = ro;
        assert!(ro.store_u64(0, 1).is_err());
        std::fs::remove_file(&path).unwrap();
    }
    let _ = std::fs::remove_dir(&dir);
}

/// The write order of `docs/format.md` §10.2, checked beyond offsets: on a blank device and on
/// one that held an older cache (magic wiped), 512 MiB and 1 GiB, every store
/// writes the word the finished image holds (each word is stored once, so no
/// intermediate value is ever written), every flush covers exactly the
/// record (or zeroing) just issued, each record's fence follows its flush
/// with nothing in between, and the two modes' event lists are identical but
/// for the one fence recover mode adds after C1's flush.
#[test]
fn write_order_values_flushes_and_mode_difference() {
    for size in [SIZE_512M, SIZE_1G] {
        let seg_num = ((size - SEGMENTS_OFF) / SEG_SIZE) as u32;
        let mut per_mode = Vec::new();
        for mode in MODES {
            let mut lists = Vec::new();
            let devices = if size == SIZE_512M {
                vec![SparsePmem::new(size), older_cache(4)]
            } else {
                vec![SparsePmem::new(size)]
            };
            for dev in devices {
                let mut rec = RecordingPmem::new(dev);
                let r = activate(&mut rec, &opts(mode), &mut NoHooks);
                assert_eq!(r.outcome, Outcome::Formatted, "{r}");
                let ev = rec.events();
                let fin = rec.current();
                // Values: each stored word is the final one, stored once.
                let mut seen = std::collections::BTreeSet::new();
                for e in &ev {
                    if let Access::Store { off, val } = *e {
                        assert!(seen.insert(off), "{mode:?}: word {off} stored twice");
                        assert_eq!(val, read_u64(fin, off), "{mode:?}: store at {off}");
                    }
                }
                // Words stored: sb 3; per segment gen 2, seg_info 2,
                // terminator 3; per link 2; tails 2 + 2; cache_info 3.
                let n_stores = seen.len() as u32;
                assert_eq!(n_stores, 3 + 7 * seg_num + 2 * (seg_num - 1) + 4 + 3);
                // Flushes: each covers exactly the run of stores (or the
                // zeroing) just before it; a fence comes right after a flush
                // or is recover mode's C1 fence (also right after a flush).
                let mut run: Option<(u64, u64)> = None;
                for (i, e) in ev.iter().enumerate() {
                    match *e {
                        Access::Store { off, .. } => {
                            run = Some(match run {
                                None => (off, off + 8),
                                Some((a, b)) => {
                                    assert_eq!(off, b, "{mode:?}: stores of a record ascend");
                                    (a, off + 8)
                                }
                            });
                        }
                        Access::ZeroRange { off, len } => {
                            assert!(run.is_none());
                            run = Some((off, off + len));
                        }
                        Access::Flush { off, len } => {
                            assert_eq!(run.take(), Some((off, off + len)), "{mode:?}: flush {i}");
                        }
                        Access::Fence => {
                            assert!(run.is_none(), "{mode:?}: fence {i} over unflushed stores");
                            assert!(
                                matches!(ev[i - 1], Access::Flush { .. }),
                                "{mode:?}: fence {i} not right after a flush"
                            );
                        }
                        _ => {}
                    }
                }
                assert!(run.is_none());
                assert_eq!(ev.last(), Some(&Access::Fence));
                lists.push(ev);
            }
            // The order does not depend on what the device held.
            for l in &lists[1..] {
                assert_eq!(l, &lists[0], "{mode:?}: an older cache changes the writes");
            }
            per_mode.push(lists.swap_remove(0));
        }
        let (strict, recover) = (&per_mode[0], &per_mode[1]);
        // Strict: C1 = zero, flush, and then directly the superblock's stores.
        assert!(matches!(
            strict[0],
            Access::ZeroRange {
                off: 8192,
                len: 12288
            }
        ));
        assert!(matches!(
            strict[1],
            Access::Flush {
                off: 8192,
                len: 12288
            }
        ));
        assert!(matches!(strict[2], Access::Store { off: 4096, .. }));
        // Recover: the same with a fence at index 2, and nothing else differs.
        assert_eq!(recover[2], Access::Fence);
        let mut without = recover.clone();
        without.remove(2);
        assert_eq!(
            &without, strict,
            "{size}: the modes differ beyond C1's fence"
        );
    }
}
