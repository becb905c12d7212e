//! Crash-point tests of the first activation (`docs/format.md` §10 C1..C7), with the recording
//! double, in both modes, on a blank device and on a device that held an older
//! cache whose superblock magic was zeroed to ask for a re-format.
//!
//! Crash states: the persistence model of `docs/format.md` §10 — everything before the last
//! fence is durable, and any subset of the writes issued since may be. At every
//! fence (and at the end) every subset of the pending writes is a state. That
//! covers what the issue asks for:
//! - the superblock write (C2): every subset of its 3 words, combined with the
//!   zeroing of C1 persisted or not (in strict mode C1 is pending at C2's
//!   fence; in recover mode C1 has its own fence, so "C1 lost" only combines
//!   with "no superblock word", and the other combinations cannot occur);
//! - the rest of the first activation: a cut after every store that changes
//!   the image (checked explicitly below), and more.
//!
//! Each state is activated in the same mode; its outcome must be the row of the
//! outcome table that an independent classification of the image gives. In
//! recover mode no state is refused and none opens the older cache. In strict
//! mode the states where the kernel opens the older cache or refuses for ever
//! are listed (and checked against the analysis of `dm_pcache`'s docs).

mod common;

use std::collections::BTreeSet;

use common::*;
use pcache::format::*;
use pcache::meta::read_slots;
use pcache::pmem::{apply_event, Access, RecordingPmem, SparsePmem};
use pcache::records::*;
use pcache::{activate, ActivationReport, CrashPoint, Mode, NoHooks, Outcome};
use persist::all_subsets;

/// The table row an image falls in, from the raw records only (independent of
/// the activation code's decision logic), and the outcome the row gives.
fn table_outcome(img: &SparsePmem, mode: Mode) -> (&'static str, Outcome) {
    let sb = Superblock::read_from_bytes(&read_vec(img, SB_OFF, 24)).unwrap();
    let ci = read_slots::<_, CacheInfo>(img, CACHE_INFO_OFF, CACHE_INFO_SIZE).unwrap();
    let ci_done = ci.latest_record().is_some_and(|(_, c)| c.init_done());
    let kt = read_slots::<_, CachePosOnMedia>(img, KEY_TAIL_OFF, 16).unwrap();
    let dt = read_slots::<_, CachePosOnMedia>(img, DIRTY_TAIL_OFF, 16).unwrap();
    let strict = mode == Mode::Strict;
    if sb.magic == 0 {
        return ("1: magic 0", Outcome::Formatted);
    }
    if sb.crc_ok() && sb.magic == PCACHE_MAGIC {
        // (No crash state has an impossible field: the format writes seg_num
        // from the device size.)
        return if ci_done {
            ("3: valid, cache_info INIT_DONE", Outcome::Opened)
        } else {
            ("2: valid, no INIT_DONE cache_info", Outcome::Formatted)
        };
    }
    if sb.magic == PCACHE_MAGIC && !ci.any_valid() && !kt.any_valid() && !dt.any_valid() {
        let o = if strict {
            Outcome::Refused
        } else {
            Outcome::FormatRedone
        };
        return ("4: pcache magic, CRC wrong, no cache_info, no tail", o);
    }
    if ci_done {
        let o = if strict {
            Outcome::Refused
        } else {
            Outcome::SuperblockRebuilt
        };
        return ("5: CRC wrong, complete cache", o);
    }
    ("8: other inconsistency", Outcome::Refused)
}

struct State {
    label: String,
    image: SparsePmem,
}

/// Where a cut falls: the innermost open crash point and the segment.
fn context(events: &[Access], cut: usize) -> String {
    let mut stack: Vec<CrashPoint> = Vec::new();
    let mut seg = 0usize;
    for e in &events[..cut] {
        match e {
            Access::Begin(cp) => {
                if *cp == CrashPoint::SegFormat {
                    seg += 1;
                }
                stack.push(*cp);
            }
            Access::End(_) => {
                stack.pop();
            }
            _ => {}
        }
    }
    match stack.as_slice() {
        [] => "between sequences".into(),
        s => {
            let names: Vec<String> = s.iter().map(|c| format!("C{}", c.number())).collect();
            format!("in {} (segment {})", names.join("/"), seg.saturating_sub(1))
        }
    }
}

/// The crash states of the recorded first activation. Images are built
/// incrementally: the durable image is carried from fence to fence, and each
/// state is that image plus the chosen pending writes.
///
/// - Up to the superblock's fence (C1, C2) and in the first two and the last
///   segment formats, the tails and the cache_info write: every subset of the
///   writes pending at each fence.
/// - In every other segment format: a cut after every write that changes the
///   image (all issued writes persisted), plus the durable image alone.
fn crash_states(rec: &RecordingPmem) -> Vec<State> {
    let ev = rec.events();
    let changing = rec.changing_writes();
    let sb_words: Vec<usize> = ev
        .iter()
        .enumerate()
        .filter(
            |(_, e)| matches!(e, Access::Store { off, .. } if (SB_OFF..SB_OFF + 24).contains(off)),
        )
        .map(|(i, _)| i)
        .collect();
    assert_eq!(sb_words.len(), 3);
    let zero_meta = ev
        .iter()
        .position(|e| matches!(e, Access::ZeroRange { off, .. } if *off == META_ZERO_OFF))
        .unwrap();
    let sb_fence = sb_words[2] + 2;
    assert_eq!(ev[sb_fence], Access::Fence);
    // Segment of each event (-1 before the first segment format).
    let mut seg_of = Vec::with_capacity(ev.len());
    let mut seg = -1i64;
    for e in &ev {
        if *e == Access::Begin(CrashPoint::SegFormat) {
            seg += 1;
        }
        seg_of.push(seg);
    }
    let last_seg = seg;
    let mut cuts: Vec<usize> = ev
        .iter()
        .enumerate()
        .filter(|(_, e)| **e == Access::Fence)
        .map(|(i, _)| i)
        .collect();
    cuts.push(ev.len());

    let mut out = Vec::new();
    let mut durable = rec.base().clone();
    let mut durable_idx = 0usize;
    for &cut in &cuts {
        let pending = rec.pending(cut);
        let s = seg_of[cut.min(ev.len() - 1)];
        let exhaustive = cut <= sb_fence || s <= 1 || s == last_seg;
        let mut kept_sets: Vec<Vec<usize>> = Vec::new();
        if exhaustive {
            assert!(pending.len() <= 10, "{} pending writes", pending.len());
            kept_sets.extend(all_subsets(&pending));
        } else {
            kept_sets.push(vec![]);
            for (k, &i) in pending.iter().enumerate() {
                if changing[i] {
                    kept_sets.push(pending[..=k].to_vec());
                }
            }
        }
        for kept in kept_sets {
            let label = if cut <= sb_fence {
                let c1 = zero_meta < durable_idx || kept.contains(&zero_meta);
                let words: Vec<String> = (0..3)
                    .filter(|w| kept.contains(&sb_words[*w]) || sb_words[*w] < durable_idx)
                    .map(|w| format!("w{w}"))
                    .collect();
                format!(
                    "C1 zeroing {}, superblock words {{{}}}",
                    if c1 { "persisted" } else { "lost" },
                    words.join(",")
                )
            } else {
                format!(
                    "cut {cut} {}, {} of {} pending writes persisted",
                    context(&ev, cut),
                    kept.len(),
                    pending.len()
                )
            };
            let mut image = durable.clone();
            for &i in &kept {
                apply_event(&mut image, &ev[i]);
            }
            out.push(State { label, image });
        }
        for e in &ev[durable_idx..cut] {
            apply_event(&mut durable, e);
        }
        durable_idx = cut;
    }
    // The enumeration ends with the complete image.
    assert!(out.last().unwrap().image.same_bytes(rec.current()));
    out
}

struct Findings {
    states: usize,
    opens_older: Vec<String>,
    refuses_forever: Vec<String>,
    refused_images: Vec<(String, SparsePmem)>,
    outcomes: BTreeSet<String>,
}

fn run_device(device: &SparsePmem, mode: Mode, older_seq: Option<u8>) -> Findings {
    let mut rec = RecordingPmem::new(device.clone());
    let mut hooks = rec.hooks();
    let r = activate(&mut rec, &opts(mode), &mut hooks);
    assert_eq!(r.outcome, Outcome::Formatted, "{r}");
    let states = crash_states(&rec);
    let mut f = Findings {
        states: states.len(),
        opens_older: vec![],
        refuses_forever: vec![],
        refused_images: vec![],
        outcomes: BTreeSet::new(),
    };
    let is_older = |r: &ActivationReport| {
        older_seq.is_some_and(|s| r.cache_info.map(|c| c.seq) == Some(s))
            || r.key_tail.is_some_and(|t| t.pos.seg_off != 0)
    };
    for s in &states {
        let (row, want) = table_outcome(&s.image, mode);
        let mut img = s.image.clone();
        let r = act(&mut img, mode);
        assert_eq!(r.outcome, want, "{mode:?} {}: row {row}: {r}", s.label);
        f.outcomes.insert(format!("{} ({row})", r.outcome));
        match r.outcome {
            Outcome::Refused => {
                assert!(img.same_bytes(&s.image));
                // Refused again and again: the device needs a person.
                let again = act(&mut img, mode);
                assert_eq!(again.outcome, Outcome::Refused);
                f.refuses_forever
                    .push(format!("{}: {}", s.label, r.message.unwrap()));
                f.refused_images.push((s.label.clone(), s.image.clone()));
            }
            Outcome::Opened if is_older(&r) => {
                f.opens_older.push(format!(
                    "{}: opened the older cache (cache_info seq {}, key_tail {})",
                    s.label,
                    r.cache_info.unwrap().seq,
                    r.key_tail.unwrap().pos
                ));
            }
            _ => {
                // The fresh cache: it opens from now on, in either mode.
                if r.outcome == Outcome::Opened {
                    assert_eq!(r.cache_info.unwrap().seq, 2, "{}", s.label);
                }
                let again = act(&mut img, mode);
                assert_eq!(again.outcome, Outcome::Opened, "{}: {again}", s.label);
                assert!(!is_older(&again));
            }
        }
    }
    f
}

fn print(name: &str, f: &Findings) {
    eprintln!("== {name}: {} crash states", f.states);
    for o in &f.outcomes {
        eprintln!("   outcome {o}");
    }
    for s in &f.opens_older {
        eprintln!("   OPENS OLDER CACHE: {s}");
    }
    for s in &f.refuses_forever {
        eprintln!("   REFUSES FOREVER: {s}");
    }
}

fn words(list: &[String]) -> BTreeSet<String> {
    list.iter()
        .map(|s| s.split(':').next().unwrap().to_string())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn blank_device_recover() {
    let f = run_device(&SparsePmem::new(SIZE_512M), Mode::Recover, None);
    print("blank device, recover", &f);
    assert!(f.opens_older.is_empty() && f.refuses_forever.is_empty());
    assert!(f.outcomes.iter().any(|o| o.starts_with("format-redone")));
}

#[test]
fn blank_device_strict() {
    let f = run_device(&SparsePmem::new(SIZE_512M), Mode::Strict, None);
    print("blank device, strict (kernel)", &f);
    assert!(f.opens_older.is_empty());
    // The torn superblock write with the magic but not both other words: the
    // kernel's "corrupted sb" until a person clears the magic. (On a blank
    // device C1 zeroes zeros, so "persisted" and "lost" are the same image.)
    assert_eq!(
        words(&f.refuses_forever),
        set(&[
            "C1 zeroing lost, superblock words {w0,w1}",
            "C1 zeroing lost, superblock words {w1,w2}",
            "C1 zeroing lost, superblock words {w1}",
            "C1 zeroing persisted, superblock words {w0,w1}",
            "C1 zeroing persisted, superblock words {w1,w2}",
            "C1 zeroing persisted, superblock words {w1}",
        ])
    );
    // Recover mode repairs every one of them: an interrupted format.
    for (label, img) in &f.refused_images {
        let r = act(&mut img.clone(), Mode::Recover);
        assert_eq!(r.outcome, Outcome::FormatRedone, "{label}: {r}");
    }
}

#[test]
fn older_cache_device_recover() {
    let activations = 4;
    let dev = older_cache(activations);
    let f = run_device(&dev, Mode::Recover, Some(older_cache_next_seq(activations)));
    print("older-cache device, recover", &f);
    assert!(
        f.opens_older.is_empty(),
        "recover mode opened the older cache"
    );
    assert!(f.refuses_forever.is_empty());
}

#[test]
fn older_cache_device_strict() {
    let activations = 4;
    let dev = older_cache(activations);
    let f = run_device(&dev, Mode::Strict, Some(older_cache_next_seq(activations)));
    print("older-cache device, strict (kernel)", &f);
    // Only the magic was wiped, so the superblock's other words already hold
    // the new values: whenever the magic word persists, the superblock is
    // valid. If C1's zeroing did not persist, the older cache's cache_info
    // and tails are still there, and the kernel opens the older cache.
    assert_eq!(
        words(&f.opens_older),
        set(&[
            "C1 zeroing lost, superblock words {w0,w1,w2}",
            "C1 zeroing lost, superblock words {w0,w1}",
            "C1 zeroing lost, superblock words {w1,w2}",
            "C1 zeroing lost, superblock words {w1}",
        ])
    );
    assert!(f.refuses_forever.is_empty());
}

/// An older cache whose whole superblock record was wiped: a persisted magic
/// without both other words now gives a wrong CRC, so strict mode refuses
/// those states for ever (whether C1 persisted or not), and opens the older
/// cache only if all three words persisted while C1 did not. Recover mode
/// fences C1 and re-formats the torn states.
#[test]
fn older_cache_wiped_whole_superblock() {
    let activations = 3;
    let mut dev = older_cache(activations);
    dev.write_bytes(SB_OFF, &[0u8; 24]).unwrap();
    let older = Some(older_cache_next_seq(activations));
    let f = run_device(&dev, Mode::Recover, older);
    print("older cache, whole sb wiped, recover", &f);
    assert!(f.opens_older.is_empty() && f.refuses_forever.is_empty());
    let f = run_device(&dev, Mode::Strict, older);
    print("older cache, whole sb wiped, strict (kernel)", &f);
    assert_eq!(
        words(&f.opens_older),
        set(&["C1 zeroing lost, superblock words {w0,w1,w2}"])
    );
    assert_eq!(f.refuses_forever.len(), 6, "{:?}", f.refuses_forever);
    // Recover mode on these kernel crash states: with C1 persisted it is an
    // interrupted format; with C1 lost the older cache is complete beside a
    // damaged superblock, indistinguishable from a live cache, and is rebuilt
    // (see `dm_pcache`'s documentation).
    for (label, img) in &f.refused_images {
        let r = act(&mut img.clone(), Mode::Recover);
        let want = if label.starts_with("C1 zeroing persisted") {
            Outcome::FormatRedone
        } else {
            Outcome::SuperblockRebuilt
        };
        assert_eq!(r.outcome, want, "{label}: {r}");
    }
}

/// C1 is 1536 unfenced words in strict mode (`docs/format.md` §10): any subset can persist
/// before the superblock's fence. The states above take C1 as a whole; here,
/// on the older-cache device, the superblock persisted complete and C1 only
/// partly, by 4 KiB region (cache_info slot 0, slot 1, cache_ctrl).
///
/// Where a cache_info copy survived: with cache_ctrl intact the older cache
/// opens (both modes, as when all of C1 is lost); with cache_ctrl zeroed its
/// cache_info has no tails, refused for ever in both modes.
///
/// With both cache_info slots zeroed and cache_ctrl not, the device is a new
/// cache (row 2) that still holds the older cache's tails (latest: slot 1,
/// seq 3, at 0:10288). The kernel (strict) writes the new tails as fresh
/// records, seq 1 into slot 0, which lose to them: the next activation starts
/// the log at the older cache's 0:10288. Recover mode continues their
/// sequences, so its next activation starts at 0:0.
#[test]
fn older_cache_c1_torn_by_region() {
    let dev = older_cache(4);
    let mut rec = RecordingPmem::new(dev.clone());
    let r = activate(&mut rec, &opts(Mode::Strict), &mut NoHooks);
    assert_eq!(r.outcome, Outcome::Formatted);
    let ev = rec.events();
    let sb_fence = ev
        .iter()
        .position(|e| *e == Access::Fence)
        .expect("the superblock's fence");
    assert!(matches!(
        ev[0],
        Access::ZeroRange {
            off: 8192,
            len: 12288
        }
    ));
    let regions = [CACHE_INFO_OFF, CACHE_INFO_OFF + 4096, CACHE_CTRL_OFF];
    // Subset number `mask` keeps region `b` iff bit `b` is set (persist's order).
    for (mask, zeroed) in (0u32..).zip(all_subsets(&regions)) {
        let mut img = dev.clone();
        for off in zeroed {
            img.write_bytes(off, &[0u8; 4096]).unwrap();
        }
        for e in &ev[1..sb_fence] {
            apply_event(&mut img, e);
        }
        let label = format!("C1 regions zeroed {mask:03b} (ctrl, ci1, ci0), superblock complete");
        for mode in MODES {
            let mut d = img.clone();
            let first = act(&mut d, mode);
            let next = act(&mut d, mode);
            let ci_zeroed = mask & 0b011 == 0b011;
            let ctrl_zeroed = mask & 0b100 != 0;
            if !ci_zeroed && !ctrl_zeroed {
                // A complete older cache under a valid superblock: opened, by
                // the kernel and by recover mode alike (nothing tells it from
                // a live cache).
                assert_eq!(first.outcome, Outcome::Opened, "{mode:?} {label}: {first}");
                assert_eq!(first.key_tail.unwrap().pos.seg_off, 10288);
                continue;
            }
            if !ci_zeroed {
                // The older cache's INIT_DONE cache_info without tails: the
                // kernel's "corrupted key tail" for ever, and recover mode's
                // too (a valid superblock, so no recovery applies).
                assert!(
                    matches!(first.refusal, Some(pcache::Refusal::TailMissing { .. })),
                    "{mode:?} {label}: {first}"
                );
                assert_eq!(next.outcome, Outcome::Refused);
                assert!(d.same_bytes(&img));
                continue;
            }
            assert_eq!(
                first.outcome,
                Outcome::Formatted,
                "{mode:?} {label}: {first}"
            );
            assert_eq!(next.outcome, Outcome::Opened, "{mode:?} {label}: {next}");
            let kt = next.key_tail.unwrap().pos;
            let stale = mode == Mode::Strict && !ctrl_zeroed;
            assert_eq!(
                (kt.cache_seg_id, kt.seg_off),
                (0, if stale { 10288 } else { 0 }),
                "{mode:?} {label}: {next}"
            );
        }
    }
}
