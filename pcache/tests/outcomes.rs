//! One test per row of the outcome table (issue 3), in both modes, plus the
//! "any other inconsistency" refusals. Every refusal must leave the image
//! untouched.

mod common;

use common::*;
use pcache::format::*;
use pcache::pmem::SparsePmem;
use pcache::records::*;
use pcache::report::RebuildBlocker;
use pcache::{activate, Mode, NoHooks, Options, Outcome, Refusal, SbState};

/// Activates a copy; on refusal checks nothing was written and returns it.
fn run(dev: &SparsePmem, mode: Mode) -> (pcache::ActivationReport, SparsePmem) {
    let mut d = dev.clone();
    let r = act(&mut d, mode);
    if r.outcome == Outcome::Refused {
        assert!(d.same_bytes(dev), "a refusal wrote to the device: {r}");
        assert!(r.message.is_some() && r.refusal.is_some());
    }
    (r, d)
}

fn refusal(dev: &SparsePmem, mode: Mode) -> Refusal {
    let (r, _) = run(dev, mode);
    assert_eq!(r.outcome, Outcome::Refused, "{mode:?}: {r}");
    r.refusal.unwrap()
}

fn corrupt_sb_crc(dev: &mut SparsePmem) {
    let mut b = read_vec(dev, SB_OFF, 4);
    b[0] ^= 0xFF;
    dev.write_bytes(SB_OFF, &b).unwrap();
}

fn zero(dev: &mut SparsePmem, off: u64, len: usize) {
    dev.write_bytes(off, &vec![0u8; len]).unwrap();
}

// Row 1: magic 0 -> formatted.
#[test]
fn row1_magic_zero_formats() {
    for mode in MODES {
        let (r, d) = run(&SparsePmem::new(SIZE_512M), mode);
        assert_eq!(r.outcome, Outcome::Formatted);
        assert!(d.same_bytes(&expected_fresh_image(SIZE_512M, false)));
        // A wiped older cache is formatted afresh too, whatever its metadata.
        let (r, d) = run(&older_cache(4), mode);
        assert_eq!(r.outcome, Outcome::Formatted, "{r}");
        assert_eq!(r.cache_info.unwrap().seq, 1);
        assert!(d.same_bytes(&expected_fresh_image(SIZE_512M, false)));
    }
}

// Row 2: valid superblock, no valid cache_info with INIT_DONE -> formatted.
#[test]
fn row2_valid_sb_without_cache_info_formats() {
    for mode in MODES {
        // Both cache_info copies invalid.
        let mut dev = formatted(SIZE_512M, mode);
        act(&mut dev, mode);
        zero(&mut dev, CACHE_INFO_OFF + 4, 4);
        zero(&mut dev, CACHE_INFO_OFF + CACHE_INFO_SIZE + 4, 4);
        let (r, d) = run(&dev, mode);
        assert_eq!(r.outcome, Outcome::Formatted, "{r}");
        assert_eq!(
            r.superblock,
            Some(SbState::Valid {
                seg_num: 31,
                flags: 0
            })
        );
        let (r2, _) = run(&d, mode);
        assert_eq!(r2.outcome, Outcome::Opened);

        // A valid cache_info without INIT_DONE (never written by a kernel).
        let mut dev = SparsePmem::new(SIZE_512M);
        dev.write_bytes(SB_OFF, &Superblock::new(31, 0).to_bytes())
            .unwrap();
        dev.write_bytes(CACHE_INFO_OFF, &cache_info_rec(9, 31, 70 << 6))
            .unwrap();
        let (r, _) = run(&dev, mode);
        assert_eq!(r.outcome, Outcome::Formatted, "{r}");
        // The found copy (slot 0, seq 9) is not overwritten: seq 10 in slot 1.
        let ci = r.cache_info.unwrap();
        assert_eq!((ci.slot, ci.seq), (1, 10));
    }
    // Strict mode takes n_segs from such a record, as the kernel does.
    let mut dev = SparsePmem::new(SIZE_512M);
    dev.write_bytes(SB_OFF, &Superblock::new(31, 0).to_bytes())
        .unwrap();
    dev.write_bytes(CACHE_INFO_OFF, &cache_info_rec(9, 5, 70 << 6))
        .unwrap();
    let (r, _) = run(&dev, Mode::Strict);
    assert_eq!(
        (r.outcome, r.n_segs, r.chain_len),
        (Outcome::Formatted, Some(5), 5)
    );
    let (r, _) = run(&dev, Mode::Recover);
    assert_eq!(
        (r.outcome, r.n_segs, r.chain_len),
        (Outcome::Formatted, Some(31), 31)
    );
}

// Row 3: everything valid -> opened.
#[test]
fn row3_valid_cache_opens() {
    for mode in MODES {
        let (r, _) = run(&formatted(SIZE_512M, mode), mode);
        assert_eq!(r.outcome, Outcome::Opened, "{r}");
        assert_eq!(r.chain_len, 31);
        // A cache formatted in one mode opens in the other.
        let other = if mode == Mode::Strict {
            Mode::Recover
        } else {
            Mode::Strict
        };
        let (r, _) = run(&formatted(SIZE_512M, mode), other);
        assert_eq!(r.outcome, Outcome::Opened, "{r}");
    }
}

// Row 4: PCACHE_MAGIC, CRC wrong, no cache_info, no tail.
#[test]
fn row4_interrupted_format() {
    // The torn superblock write of a format on a blank device: only the
    // magic word persisted.
    let mut dev = SparsePmem::new(SIZE_512M);
    dev.write_bytes(SB_OFF + 8, &PCACHE_MAGIC.to_le_bytes())
        .unwrap();
    // Segment info left by an older cache does not count.
    dev.write_bytes(SEGMENTS_OFF + 4096, &seg_info_rec(1, 2, 0))
        .unwrap();
    assert!(matches!(
        refusal(&dev, Mode::Strict),
        Refusal::CorruptedSuperblock { .. }
    ));
    let (r, d) = run(&dev, Mode::Recover);
    assert_eq!(r.outcome, Outcome::FormatRedone, "{r}");
    assert!(matches!(r.superblock, Some(SbState::CrcMismatch { .. })));
    assert!(d.same_bytes(&expected_fresh_image(SIZE_512M, false)));
    let (r, _) = run(&d, Mode::Strict);
    assert_eq!(r.outcome, Outcome::Opened);
}

// Row 5: non-zero magic, CRC wrong, a complete cache that agrees with the
// device size.
#[test]
fn row5_superblock_rebuilt() {
    let base = formatted(SIZE_512M, Mode::Recover);
    let good_sb = read_vec(&base, SB_OFF, 24);
    let mut crc = base.clone();
    corrupt_sb_crc(&mut crc);
    let mut magic = base.clone();
    magic.write_bytes(SB_OFF + 9, &[0x00]).unwrap();
    let mut seg_num = base.clone();
    seg_num.write_bytes(SB_OFF + 16, &[0x20]).unwrap();
    for dev in [crc, magic, seg_num] {
        let r = refusal(&dev, Mode::Strict);
        assert!(
            matches!(
                r,
                Refusal::CorruptedSuperblock { .. } | Refusal::NotPcache { .. }
            ),
            "{r}"
        );
        let (r, d) = run(&dev, Mode::Recover);
        assert_eq!(r.outcome, Outcome::SuperblockRebuilt, "{r}");
        assert_eq!(read_vec(&d, SB_OFF, 24), good_sb);
        assert_eq!(r.cache_info.unwrap().seq, 2);
        let (r, _) = run(&d, Mode::Strict);
        assert_eq!(r.outcome, Outcome::Opened);
    }
}

// Row 5, the negative: the derived superblock disagrees (the device grew).
#[test]
fn row5_no_rebuild_when_the_device_size_disagrees() {
    let small = formatted(SIZE_512M, Mode::Recover);
    let mut grown = SparsePmem::new(SIZE_1G);
    for p in small.page_indices() {
        grown
            .write_bytes(p * 4096, &read_vec(&small, p * 4096, 4096))
            .unwrap();
    }
    // Intact superblock: opens (seg_num 31 is within the larger device).
    assert_eq!(run(&grown, Mode::Recover).0.outcome, Outcome::Opened);
    corrupt_sb_crc(&mut grown);
    match refusal(&grown, Mode::Recover) {
        Refusal::SuperblockUnrecoverable {
            blocker:
                RebuildBlocker::SegNumDisagrees {
                    derived: 63,
                    n_segs: 31,
                },
            ..
        } => {}
        r => panic!("{r}"),
    }
}

// Row 6: foreign magic, no pcache metadata.
#[test]
fn row6_foreign_device() {
    let mut dev = SparsePmem::new(SIZE_512M);
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for p in 0..8 {
        dev.write_bytes(p * 4096, &junk).unwrap();
    }
    for mode in MODES {
        let r = refusal(&dev, mode);
        assert!(matches!(r, Refusal::NotPcache { .. }), "{r}");
        assert!(r.to_string().contains("not a pcache device"));
        // Recover mode searched the rest of the device; strict refuses on the magic.
        assert_eq!(
            r.to_string().contains("no pcache metadata was found"),
            mode == Mode::Recover,
            "{r}"
        );
    }
    // A foreign magic whose CRC happens to be valid is refused too.
    let mut sb = Superblock::new(31, 0);
    sb.magic.set(0x1234_5678);
    let mut dev = SparsePmem::new(SIZE_512M);
    dev.write_bytes(SB_OFF, &sb.to_bytes()).unwrap();
    for mode in MODES {
        assert!(matches!(
            refusal(&dev, mode),
            Refusal::NotPcache {
                magic: 0x1234_5678,
                metadata_absent: false
            }
        ));
    }
}

// Row 7: CRC valid, a field impossible.
#[test]
fn row7_impossible_fields() {
    let base = formatted(SIZE_512M, Mode::Recover);
    let with_sb = |sb: Superblock| {
        let mut d = base.clone();
        d.write_bytes(SB_OFF, &sb.to_bytes()).unwrap();
        d
    };
    let mut be = Superblock::new(31, 0);
    be.flags.set(1);
    for mode in MODES {
        let r = refusal(&with_sb(be), mode);
        assert_eq!(r, Refusal::BigEndian { flags: 1 });
        assert!(r.to_string().contains("big-endian"));
        for n in [0u32, 32, 1 << 20, (1 << 20) + 1, u32::MAX] {
            let r = refusal(&with_sb(Superblock::new(n, 0)), mode);
            assert_eq!(
                r,
                Refusal::SegNum {
                    seg_num: n as u64,
                    max: 31
                },
                "{r}"
            );
            assert!(r.to_string().contains("seg_num"));
        }
    }
}

// Any other inconsistency: refused, with a reason that names it.
#[test]
fn other_inconsistencies_are_refused() {
    let base = formatted(SIZE_512M, Mode::Recover);
    let seg = |p: u64| SEGMENTS_OFF + p * SEG_SIZE;
    type Case = (
        &'static str,
        Box<dyn Fn(&mut SparsePmem)>,
        Box<dyn Fn(&Refusal) -> bool>,
    );
    let cases: Vec<Case> = vec![
        (
            "key_tail missing",
            Box::new(|d| zero(d, KEY_TAIL_OFF, 32)),
            Box::new(|r| {
                matches!(
                    r,
                    Refusal::TailMissing {
                        tail: pcache::report::Tail::KeyTail
                    }
                )
            }),
        ),
        (
            "dirty_tail missing",
            Box::new(|d| zero(d, DIRTY_TAIL_OFF, 32)),
            Box::new(|r| {
                matches!(
                    r,
                    Refusal::TailMissing {
                        tail: pcache::report::Tail::DirtyTail
                    }
                )
            }),
        ),
        (
            "key_tail segment out of range",
            Box::new(|d| {
                d.write_bytes(KEY_TAIL_OFF + 16, &pos_rec(2, 31, 0))
                    .unwrap()
            }),
            Box::new(|r| matches!(r, Refusal::TailOutOfRange { .. })),
        ),
        (
            "dirty_tail offset out of range",
            Box::new(|d| {
                d.write_bytes(DIRTY_TAIL_OFF + 16, &pos_rec(2, 0, DATA_SIZE as u32))
                    .unwrap()
            }),
            Box::new(|r| matches!(r, Refusal::TailOutOfRange { .. })),
        ),
        (
            "dirty_tail off the (empty) log",
            Box::new(|d| {
                d.write_bytes(DIRTY_TAIL_OFF + 16, &pos_rec(2, 0, 64))
                    .unwrap()
            }),
            Box::new(|r| matches!(r, Refusal::DirtyTailOffLog { .. })),
        ),
        (
            "segment info missing",
            Box::new(move |d| {
                zero(d, seg(5), 16);
                zero(d, seg(5) + 4096, 16);
            }),
            Box::new(|r| {
                matches!(
                    r,
                    Refusal::SegInfoMissing {
                        cache_seg: 5,
                        pseg: 5
                    }
                )
            }),
        ),
        (
            "chain broken (no HAS_NEXT)",
            Box::new(move |d| zero(d, seg(7), 16)),
            Box::new(|r| {
                matches!(
                    r,
                    Refusal::ChainBroken {
                        cache_seg: 7,
                        pseg: 7,
                        ..
                    }
                )
            }),
        ),
        (
            "chain cycle",
            Box::new(move |d| d.write_bytes(seg(9), &seg_info_rec(3, 3, 4)).unwrap()),
            Box::new(|r| {
                matches!(
                    r,
                    Refusal::ChainDuplicate {
                        cache_seg: 10,
                        pseg: 4
                    }
                )
            }),
        ),
        (
            "chain leaves the device",
            Box::new(move |d| d.write_bytes(seg(9), &seg_info_rec(3, 3, 77)).unwrap()),
            Box::new(|r| matches!(r, Refusal::ChainSegOutOfRange { pseg: 77, .. })),
        ),
        (
            "n_segs beyond seg_num",
            Box::new(|d| {
                d.write_bytes(CACHE_INFO_OFF, &cache_info_rec(2, 32, 0x1182))
                    .unwrap()
            }),
            Box::new(|r| {
                matches!(
                    r,
                    Refusal::NSegs {
                        n_segs: 32,
                        seg_num: 31
                    }
                )
            }),
        ),
        (
            "n_segs zero",
            Box::new(|d| {
                d.write_bytes(CACHE_INFO_OFF, &cache_info_rec(2, 0, 0x1182))
                    .unwrap()
            }),
            Box::new(|r| matches!(r, Refusal::NSegs { n_segs: 0, .. })),
        ),
        (
            // A valid CRC over 4000 (zero) keys: a record no kernel writes. (With
            // a wrong CRC the same header is just the end of the log.)
            "hostile key_num",
            Box::new(move |d| {
                let mut rec = vec![0u8; KSET_HEADER_SIZE + 4000 * KEY_SIZE];
                rec[..24].copy_from_slice(
                    KsetHeader {
                        key_num: 4000.into(),
                        magic: KSET_MAGIC.into(),
                        ..Default::default()
                    }
                    .as_bytes(),
                );
                let crc = pcache_crc(&rec[4..]);
                rec[..4].copy_from_slice(&crc.to_le_bytes());
                d.write_bytes(seg(0) + DATA_OFF, &rec).unwrap();
            }),
            Box::new(|r| {
                matches!(r, Refusal::HostileLog { .. }) && r.to_string().contains("key_num 4000")
            }),
        ),
        (
            "hostile next segment",
            Box::new(move |d| {
                let l = Kset::Last {
                    next_cache_seg_id: 31,
                }
                .to_bytes();
                d.write_bytes(seg(0) + DATA_OFF, &l).unwrap();
            }),
            Box::new(|r| r.to_string().contains("next segment id 31 out of range")),
        ),
        (
            "hostile key (segment outside the chain)",
            Box::new(move |d| {
                let k = KeyOnMedia {
                    off: 0.into(),
                    len: 4096.into(),
                    cache_seg_id: 99.into(),
                    ..Default::default()
                };
                d.write_bytes(seg(0) + DATA_OFF, &Kset::Keys { keys: vec![k] }.to_bytes())
                    .unwrap();
            }),
            Box::new(|r| r.to_string().contains("cache segment 99 out of range")),
        ),
        (
            "log loop",
            Box::new(move |d| {
                d.write_bytes(
                    seg(0) + DATA_OFF,
                    &Kset::Last {
                        next_cache_seg_id: 2,
                    }
                    .to_bytes(),
                )
                .unwrap();
                d.write_bytes(
                    seg(2) + DATA_OFF,
                    &Kset::Last {
                        next_cache_seg_id: 0,
                    }
                    .to_bytes(),
                )
                .unwrap();
            }),
            Box::new(|r| r.to_string().contains("loop")),
        ),
    ];
    // What Linux 7.2.13 activates (`cargo xtask interop` shows it on the
    // forged-metadata images): strict mode opens these as the kernel does,
    // recover mode refuses them.
    const KERNEL_OPENS: [&str; 3] = [
        "chain cycle",
        "hostile key_num",
        // The kernel only checks that the log walked from dirty_tail ends as
        // a log ends (its cache_verify_dirty_tail); recover requires a record
        // boundary on the replayed log.
        "dirty_tail off the (empty) log",
    ];
    for (name, damage, check) in &cases {
        for mode in MODES {
            let mut d = base.clone();
            damage(&mut d);
            if mode == Mode::Strict && KERNEL_OPENS.contains(name) {
                let (r, _) = run(&d, mode);
                assert_eq!(r.outcome, Outcome::Opened, "{name} ({mode:?}): {r}");
                continue;
            }
            let r = refusal(&d, mode);
            assert!(check(&r), "{name} ({mode:?}): {r}");
            // With a corrupted superblock too, recover mode names the same problem.
            if mode == Mode::Recover {
                corrupt_sb_crc(&mut d);
                let r2 = refusal(&d, mode);
                match &r2 {
                    Refusal::SuperblockUnrecoverable {
                        blocker: RebuildBlocker::Metadata { reason },
                        ..
                    } => assert!(check(reason), "{name} with bad sb: {r2}"),
                    Refusal::SuperblockUnrecoverable {
                        blocker: RebuildBlocker::SegNumDisagrees { .. },
                        ..
                    } => assert!(name.starts_with("n_segs")),
                    _ => panic!("{name} with bad sb: {r2}"),
                }
            }
        }
    }
}

#[test]
fn superblock_recovery_refusals_name_what_was_found() {
    // Wrong CRC, no cache_info, but valid tails: not an interrupted format.
    let mut d = formatted(SIZE_512M, Mode::Recover);
    corrupt_sb_crc(&mut d);
    zero(&mut d, CACHE_INFO_OFF, 4096 * 2);
    match refusal(&d, Mode::Recover) {
        Refusal::SuperblockUnrecoverable {
            blocker:
                RebuildBlocker::TailsWithoutCacheInfo {
                    key_tail: true,
                    dirty_tail: true,
                },
            ..
        } => {}
        r => panic!("{r}"),
    }
    // Wrong CRC, a cache_info without INIT_DONE.
    let mut d = formatted(SIZE_512M, Mode::Recover);
    corrupt_sb_crc(&mut d);
    d.write_bytes(CACHE_INFO_OFF, &cache_info_rec(7, 31, 0x1180))
        .unwrap();
    zero(&mut d, CACHE_INFO_OFF + CACHE_INFO_SIZE, 24);
    let r = refusal(&d, Mode::Recover);
    assert!(r.to_string().contains("lacks INIT_DONE"), "{r}");
    // Foreign magic with pcache metadata present but broken: named, not "not pcache".
    let mut d = formatted(SIZE_512M, Mode::Recover);
    d.write_bytes(SB_OFF + 8, &0xdead_beefu64.to_le_bytes())
        .unwrap();
    zero(&mut d, KEY_TAIL_OFF, 32);
    let r = refusal(&d, Mode::Recover);
    assert!(r.to_string().contains("key_tail has no valid copy"), "{r}");
    // The data_crc option is reported as such, not as a superblock problem.
    let mut d = formatted(SIZE_512M, Mode::Recover);
    corrupt_sb_crc(&mut d);
    let before = d.clone();
    let r = activate(
        &mut d,
        &Options {
            mode: Mode::Recover,
            data_crc: true,
        },
        &mut NoHooks,
    );
    assert!(matches!(
        r.refusal,
        Some(Refusal::DataCrcOption {
            option: true,
            cache: false
        })
    ));
    assert!(d.same_bytes(&before));
}

#[test]
fn device_too_small() {
    for mode in MODES {
        let r = refusal(&SparsePmem::new(SIZE_512M - 4096), mode);
        assert!(matches!(r, Refusal::DeviceTooSmall { .. }));
        assert!(r.to_string().contains("512 MiB"));
        let r = refusal(&SparsePmem::new(0), mode);
        assert!(matches!(r, Refusal::DeviceTooSmall { size: 0, .. }));
    }
}

#[test]
fn report_serializes_with_kebab_case_outcomes() {
    let mut dev = SparsePmem::new(SIZE_512M);
    let r = act(&mut dev, Mode::Recover);
    let j = serde_json::to_value(&r).unwrap();
    assert_eq!(j["outcome"], "formatted");
    assert_eq!(j["cache_info"]["slot"], 1);
    assert_eq!(j["key_tail"]["pos"]["seg_off"], 0);
    let r = act(&mut dev, Mode::Recover);
    assert_eq!(serde_json::to_value(&r).unwrap()["outcome"], "opened");
    corrupt_sb_crc(&mut dev);
    let r = act(&mut dev, Mode::Strict);
    let j = serde_json::to_value(&r).unwrap();
    assert_eq!(j["outcome"], "refused");
    assert_eq!(j["refusal"]["kind"], "corrupted-superblock");
    assert!(j["message"]
        .as_str()
        .unwrap()
        .contains("corrupted superblock"));
    let r = act(&mut dev, Mode::Recover);
    assert_eq!(
        serde_json::to_value(&r).unwrap()["outcome"],
        "superblock-rebuilt"
    );
    let text = r.to_string();
    assert!(text.starts_with("outcome: superblock-rebuilt"), "{text}");
    let mut d = SparsePmem::new(SIZE_512M);
    d.write_bytes(SB_OFF + 8, &PCACHE_MAGIC.to_le_bytes())
        .unwrap();
    let r = act(&mut d, Mode::Recover);
    assert_eq!(
        serde_json::to_value(&r).unwrap()["outcome"],
        "format-redone"
    );
}

/// A device too large for the hardened kernel's `seg_num` maximum (over
/// 16 TiB): the format is refused in both modes, and the refusal writes
/// nothing — not even strict mode's C1 zeroing, which would otherwise wipe the
/// cache_info and tails of a device whose magic was zeroed.
#[test]
fn oversized_device_refusal_writes_nothing() {
    use pcache::pmem::RecordingPmem;
    let size = 17u64 << 40;
    let mut dev = SparsePmem::new(size);
    // Metadata of an older cache under a zeroed magic.
    dev.write_bytes(CACHE_INFO_OFF, &cache_info_rec(5, 31, 0x1182))
        .unwrap();
    dev.write_bytes(KEY_TAIL_OFF, &pos_rec(3, 0, 64)).unwrap();
    for mode in MODES {
        let mut rec = RecordingPmem::new(dev.clone());
        let r = activate(&mut rec, &opts(mode), &mut NoHooks);
        assert_eq!(r.outcome, Outcome::Refused, "{mode:?}: {r}");
        assert!(
            matches!(
                r.refusal,
                Some(Refusal::SegNum {
                    seg_num: 1_114_111,
                    max: 1_048_576
                })
            ),
            "{mode:?}: {r}"
        );
        assert_eq!(rec.events(), vec![], "{mode:?}: the refusal wrote");
        assert!(rec.current().same_bytes(&dev));
    }
}

/// Row 2 on a device whose tails are still valid (no valid cache_info, e.g.
/// both copies torn or damaged, but C1 did not run: the superblock is valid).
/// The kernel writes each tail as a fresh record (seq 1 into slot 0), which
/// overwrites the newest copy when it is in slot 0 and loses to it when it is
/// in slot 1 with a later seq: the next activation then loads the old
/// position, not the new cache's (0, 0). Recover mode continues each tail's
/// sequence in the other slot instead, so the new tail is the latest and the
/// old newest copy survives. Strict mode keeps the kernel's writes.
#[test]
fn row2_first_activation_over_valid_tails() {
    use pcache::meta::read_slots;
    // (slot 0, slot 1) of both tails before: (seq, seg_off), None = zero.
    type Slot = Option<(u8, u32)>;
    let cases: [(Slot, Slot); 4] = [
        (Some((2, 5144)), Some((3, 10288))), // newest in slot 1
        (Some((4, 10288)), Some((3, 5144))), // newest in slot 0
        (Some((7, 10288)), None),            // only slot 0
        (None, Some((255, 10288))),          // only slot 1, seq about to wrap
    ];
    for (s0, s1) in cases {
        let mut dev = formatted(SIZE_512M, Mode::Recover);
        for base in [KEY_TAIL_OFF, DIRTY_TAIL_OFF] {
            for (i, s) in [s0, s1].into_iter().enumerate() {
                let rec = s.map_or(vec![0u8; 16], |(seq, off)| pos_rec(seq, 0, off));
                dev.write_bytes(base + 16 * i as u64, &rec).unwrap();
            }
        }
        zero(&mut dev, CACHE_INFO_OFF, 24);
        zero(&mut dev, CACHE_INFO_OFF + CACHE_INFO_SIZE, 24);
        let slot = pcache::meta::select_latest([s0.map(|s| s.0), s1.map(|s| s.0)]).unwrap();
        let newest = (slot, [s0, s1][slot].unwrap());
        let newest_bytes = pos_rec(newest.1 .0, 0, newest.1 .1);

        // Recover: the new tails are the latest copies; the old newest survive.
        let (r, d) = run(&dev, Mode::Recover);
        assert_eq!(r.outcome, Outcome::Formatted, "{s0:?} {s1:?}: {r}");
        for (t, base) in [(r.key_tail, KEY_TAIL_OFF), (r.dirty_tail, DIRTY_TAIL_OFF)] {
            let t = t.unwrap();
            assert_eq!(
                (t.pos.cache_seg_id, t.pos.seg_off, t.slot, t.seq),
                (0, 0, newest.0 ^ 1, newest.1 .0.wrapping_add(1)),
                "{s0:?} {s1:?}"
            );
            let old = base + 16 * newest.0 as u64;
            assert_eq!(read_vec(&d, old, 16), newest_bytes.to_vec());
            let s = read_slots::<_, CachePosOnMedia>(&d, base, 16).unwrap();
            assert_eq!(s.latest, Some(newest.0 ^ 1), "{s0:?} {s1:?}");
        }
        let (r2, _) = run(&d, Mode::Recover);
        assert_eq!(r2.outcome, Outcome::Opened, "{s0:?} {s1:?}: {r2}");
        for t in [r2.key_tail.unwrap(), r2.dirty_tail.unwrap()] {
            assert_eq!((t.pos.cache_seg_id, t.pos.seg_off), (0, 0), "{s0:?} {s1:?}");
        }

        // Strict: the kernel's fresh write, seq 1 into slot 0.
        let (r, d) = run(&dev, Mode::Strict);
        assert_eq!(r.outcome, Outcome::Formatted, "{r}");
        for base in [KEY_TAIL_OFF, DIRTY_TAIL_OFF] {
            assert_eq!(read_vec(&d, base, 16), pos_rec(1, 0, 0).to_vec());
        }
    }
}

/// The first key-set torn so that only its magic word persisted (key_num and
/// CRC read as 0): the kernel's replay sees a CRC mismatch, the end of an empty
/// log, and opens. So do both modes (never refused for ever as hostile).
#[test]
fn a_torn_first_key_set_ends_an_empty_log() {
    for mode in MODES {
        let mut d = formatted(SIZE_512M, mode);
        d.write_bytes(SEGMENTS_OFF + DATA_OFF + 8, &KSET_MAGIC.to_le_bytes())
            .unwrap();
        let opts = Options {
            mode,
            data_crc: false,
        };
        let r = activate(&mut d, &opts, &mut NoHooks);
        assert_eq!(r.outcome, Outcome::Opened, "{mode:?}: {r}");
        let end = r
            .log
            .and_then(|l| l.end)
            .expect("the log's end is reported");
        assert!(end.stop.is_end_of_log(), "{mode:?}: {}", end.stop);
    }
}

/// A cache whose log holds key-sets is replayed and opened, in both modes:
/// key_head is the log's end, the index holds the later key where keys
/// overlap, segments get a reference per key, and dirty_tail may sit at any
/// record boundary of the log.
#[test]
fn logs_are_replayed_and_opened() {
    let base = formatted(SIZE_512M, Mode::Recover);
    let seg = |p: u64| SEGMENTS_OFF + p * SEG_SIZE;
    let key = |off: u64, len: u32, cseg: u32, seg_off: u32| KeyOnMedia {
        off: off.into(),
        len: len.into(),
        cache_seg_id: cseg.into(),
        cache_seg_off: seg_off.into(),
        ..Default::default()
    };
    // Segment 0: a key-set, then a LAST record to segment 3; segment 3: a
    // key-set whose key overlaps the first one's.
    let first = Kset::Keys {
        keys: vec![key(0, 8192, 1, 0)],
    }
    .to_bytes();
    let second = Kset::Keys {
        keys: vec![key(4096, 512, 2, 0), key(4096 + 512, 512, 2, 512)],
    }
    .to_bytes();
    let mut d = base.clone();
    d.write_bytes(seg(0) + DATA_OFF, &first).unwrap();
    d.write_bytes(
        seg(0) + DATA_OFF + first.len() as u64,
        &Kset::Last {
            next_cache_seg_id: 3,
        }
        .to_bytes(),
    )
    .unwrap();
    d.write_bytes(seg(3) + DATA_OFF, &second).unwrap();
    for mode in MODES {
        for dirty in [
            (0u32, 0u32),
            (0, first.len() as u32),
            (3, 0),
            (3, second.len() as u32),
        ] {
            let mut img = d.clone();
            img.write_bytes(DIRTY_TAIL_OFF + 16, &pos_rec(2, dirty.0, dirty.1))
                .unwrap();
            let mut dev = img.clone();
            let a = pcache::dm_pcache::start(&mut dev, &opts(mode), &mut pcache::NoHooks);
            let (r, cache) = (a.report, a.cache);
            assert_eq!(r.outcome, Outcome::Opened, "{mode:?} dirty {dirty:?}: {r}");
            let cache = cache.unwrap();
            assert_eq!(cache.key_head().cache_seg_id, 3);
            assert_eq!(cache.key_head().seg_off as usize, second.len());
            let got: Vec<(u64, u32, u32)> = cache
                .index()
                .extents()
                .map(|e| (e.off, e.len, e.cache_seg_id))
                .collect();
            assert_eq!(
                got,
                [
                    (0, 4096, 1),
                    (4096, 512, 2),
                    (4608, 512, 2),
                    (5120, 3072, 1)
                ]
            );
            assert_eq!((cache.refs(1), cache.refs(2), cache.refs(3)), (1, 2, 0));
            let log = r.log.as_ref().unwrap();
            assert_eq!((log.ksets, log.keys, log.lasts), (2, 3, 1));
        }
        // Inside a record: recover refuses (not a boundary of the log);
        // the kernel's walk from there reads the middle of a record, which
        // ends as a log ends, so strict opens as the kernel does.
        let mut img = d.clone();
        img.write_bytes(DIRTY_TAIL_OFF + 16, &pos_rec(2, 0, 24))
            .unwrap();
        let (r, _) = run(&img, mode);
        match mode {
            Mode::Recover => assert!(
                matches!(r.refusal, Some(Refusal::DirtyTailOffLog { .. })),
                "{r}"
            ),
            Mode::Strict => assert_eq!(r.outcome, Outcome::Opened, "{r}"),
        }
    }
}
