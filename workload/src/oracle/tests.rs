use super::*;
use alloc::vec;
use proptest::prelude::*;

/// A write of `n` sectors at sector `s`.
fn w(s: u64, n: u32, id: u32) -> Op {
    Op::Write {
        off: s * 512,
        len: n * 512,
        id,
        fua: false,
    }
}

fn fua(s: u64, n: u32, id: u32) -> Op {
    Op::Write {
        off: s * 512,
        len: n * 512,
        id,
        fua: true,
    }
}

fn run(sector: u64, count: u64, tag: Tag) -> TagRun {
    TagRun { sector, count, tag }
}

fn lost(sector: u64, count: u64, durable: u32, found: Tag) -> Violation {
    Violation::Lost {
        sector,
        count,
        durable,
        found,
    }
}

fn unknown(sector: u64, count: u64, id: u32) -> Violation {
    Violation::Unknown { sector, count, id }
}

#[test]
fn only_a_prefix_ending_with_a_flush_settles() {
    assert!(Settled::new(&[w(0, 1, 1)]).is_none());
    assert!(Settled::new(&[]).is_some_and(|s| s.is_empty()));
    assert_eq!(
        Settled::new(&[w(0, 1, 1), Op::Flush]).map(|s| s.len()),
        Some(2)
    );
}

#[test]
#[should_panic(expected = "settled prefix")]
fn a_settled_prefix_longer_than_the_acknowledged_ops_is_refused() {
    let ops = [w(0, 1, 1), Op::Flush, w(0, 1, 2)];
    let settled = Settled::new(&ops[..2]).unwrap();
    check_settled(&settled, &ops, 1, &[]);
}

#[test]
fn flushed_write_lost() {
    let ops = [w(0, 4, 1), Op::Flush];
    assert_eq!(
        check(&ops, 2, &[run(0, 4, Tag::Backing)]),
        vec![lost(0, 4, 1, Tag::Backing)]
    );
    assert!(check(&ops, 2, &[run(0, 4, Tag::Write(1))]).is_empty());
    // Sectors beyond the write only ever held the original content.
    assert!(check(&ops, 2, &[run(4, 100, Tag::Backing)]).is_empty());
}

#[test]
fn unflushed_write_may_show_old_or_new_sector_by_sector() {
    let ops = [w(0, 4, 1), Op::CloseKsets];
    for acked in [0, 1, 2] {
        assert!(check(&ops, acked, &[run(0, 4, Tag::Backing)]).is_empty());
        assert!(check(&ops, acked, &[run(0, 4, Tag::Write(1))]).is_empty());
        assert!(check(
            &ops,
            acked,
            &[
                run(0, 1, Tag::Write(1)),
                run(1, 2, Tag::Backing),
                run(3, 1, Tag::Write(1))
            ]
        )
        .is_empty());
    }
    assert_eq!(allowed(&ops, 2, 0).ids, vec![1]);
    assert!(allowed(&ops, 2, 0).backing);
}

#[test]
fn flush_in_flight_makes_nothing_durable() {
    let ops = [w(0, 4, 1), Op::Flush];
    assert!(check(&ops, 1, &[run(0, 4, Tag::Backing)]).is_empty());
}

#[test]
fn fua_is_durable_once_acknowledged() {
    let ops = [fua(0, 4, 1)];
    assert_eq!(
        check(&ops, 1, &[run(0, 4, Tag::Backing)]),
        vec![lost(0, 4, 1, Tag::Backing)]
    );
    // In flight, it may be anywhere from absent to complete.
    assert!(check(
        &ops,
        0,
        &[run(0, 2, Tag::Backing), run(2, 2, Tag::Write(1))]
    )
    .is_empty());
}

#[test]
fn overwrite_after_flush_may_show_either() {
    let ops = [w(0, 8, 1), Op::Flush, w(2, 4, 2)];
    let obs = [
        run(0, 3, Tag::Write(1)),
        run(3, 3, Tag::Write(2)),
        run(6, 2, Tag::Write(1)),
    ];
    assert!(check(&ops, 3, &obs).is_empty());
    assert!(check(&ops, 3, &[run(0, 8, Tag::Write(1))]).is_empty());
    assert_eq!(
        check(&ops, 3, &[run(0, 8, Tag::Backing)]),
        vec![lost(0, 8, 1, Tag::Backing)]
    );
    let a = allowed(&ops, 3, 2);
    assert_eq!((a.durable, a.backing, a.ids), (Some(1), false, vec![1, 2]));
}

#[test]
fn older_than_durable_resurrected_is_lost() {
    let ops = [w(0, 4, 1), Op::Flush, w(0, 2, 2), Op::Flush];
    assert_eq!(
        check(&ops, 4, &[run(0, 4, Tag::Write(1))]),
        vec![lost(0, 2, 2, Tag::Write(1))]
    );
    assert_eq!(
        check(&ops, 4, &[run(0, 4, Tag::Backing)]),
        vec![lost(0, 2, 2, Tag::Backing), lost(2, 2, 1, Tag::Backing)]
    );
    // Only the first flush acknowledged: write 2 is not yet durable.
    assert!(check(&ops, 3, &[run(0, 4, Tag::Write(1))]).is_empty());
}

#[test]
fn garbage_is_always_a_violation() {
    let ops = [w(0, 4, 1)];
    assert_eq!(
        check(&ops, 0, &[run(0, 1, Tag::Garbage), run(1, 2, Tag::Garbage)]),
        vec![Violation::Garbage {
            sector: 0,
            count: 3
        }]
    );
    assert_eq!(
        check(&[], 0, &[run(7, 1, Tag::Garbage)]),
        vec![Violation::Garbage {
            sector: 7,
            count: 1
        }]
    );
}

#[test]
fn in_flight_write_is_allowed_and_later_ops_are_unknown() {
    let ops = [w(0, 4, 1), Op::Flush, w(0, 4, 2), w(0, 4, 3), Op::Flush];
    // Op 2 (write 2) in flight: it may show, over the durable write 1.
    assert!(check(
        &ops,
        2,
        &[run(0, 2, Tag::Write(2)), run(2, 2, Tag::Write(1))]
    )
    .is_empty());
    // Op 3 had not started.
    assert_eq!(
        check(&ops, 2, &[run(0, 4, Tag::Write(3))]),
        vec![unknown(0, 4, 3)]
    );
    // An id no op has, and an id that wrote elsewhere.
    assert_eq!(
        check(
            &ops,
            5,
            &[run(0, 4, Tag::Write(9)), run(4, 2, Tag::Write(1))]
        ),
        vec![unknown(0, 4, 9), unknown(4, 2, 1)]
    );
}

#[test]
fn write_partly_over_its_range_is_unknown_outside() {
    let ops = [w(2, 2, 1)];
    assert_eq!(
        check(&ops, 1, &[run(0, 6, Tag::Write(1))]),
        vec![unknown(0, 2, 1), unknown(4, 2, 1)]
    );
}

#[test]
fn runs_merge_across_observed_runs_and_sort() {
    let ops = [w(0, 8, 1), Op::Flush];
    let obs = [run(4, 4, Tag::Backing), run(0, 4, Tag::Backing)];
    assert_eq!(check(&ops, 2, &obs), vec![lost(0, 8, 1, Tag::Backing)]);
}

#[test]
fn touched_ranges_sorted_and_merged() {
    let ops = [
        w(10, 2, 1),
        Op::Flush,
        w(0, 4, 2),
        w(4, 2, 3),
        w(11, 4, 4),
        w(20, 1, 5),
    ];
    assert_eq!(
        touched_ranges(&ops),
        vec![(0, 6 * 512), (10 * 512, 5 * 512), (20 * 512, 512)]
    );
    assert!(touched_ranges(&[Op::Flush]).is_empty());
}

#[test]
fn violations_serialize_with_numeric_tags() {
    let v = vec![lost(8, 4, 3, Tag::Write(2)), unknown(1, 1, 5)];
    let json = serde_json::to_string(&v).unwrap();
    assert_eq!(
        json,
        r#"[{"kind":"lost","sector":8,"count":4,"durable":3,"found":2},{"kind":"unknown","sector":1,"count":1,"id":5}]"#
    );
    assert_eq!(serde_json::from_str::<Vec<Violation>>(&json).unwrap(), v);
    assert_eq!(
        alloc::format!("{}", v[0]),
        "sectors 8..12: durable write 3 lost, found write 2"
    );
}

#[test]
fn large_workload_is_fast_and_clean_when_everything_persisted() {
    use crate::gen::{generate, GenKind, GenSpec};
    use crate::pattern::classify_range;
    // 5000 mixed ops over 64 MiB; the device image as if every op completed.
    let spec = GenSpec {
        kind: GenKind::Mixed,
        seed: 7,
        ops: 5000,
        base: 0,
        span: 64 << 20,
        first_id: 1,
    };
    let ops = generate(&spec);
    let mut disk = vec![0u8; 64 << 20];
    crate::pattern::fill(0, 0, &mut disk);
    for op in &ops {
        if let Op::Write { off, len, id, .. } = *op {
            let r = off as usize..off as usize + len as usize;
            crate::pattern::fill(id, off, &mut disk[r]);
        }
    }
    let obs = classify_range(0, &disk);
    assert!(check(&ops, ops.len(), &obs).is_empty());
    // Roll every sector back to the original content: each sector whose
    // last write was durable is reported lost.
    let back = [run(0, disk.len() as u64 / 512, Tag::Backing)];
    let v = check(&ops, ops.len(), &back);
    assert!(!v.is_empty());
    // Only lost writes, only where something was written.
    let touched = touched_ranges(&ops);
    for x in &v {
        assert!(
            matches!(
                x,
                Violation::Lost {
                    found: Tag::Backing,
                    ..
                }
            ),
            "{x}"
        );
        let (s, n) = x.range();
        assert!(touched
            .iter()
            .any(|&(off, len)| off <= s * 512 && (s + n) * 512 <= off + len));
    }
}

/// The rule, sector by sector, straight from its definition.
fn reference(ops: &[Op], acked: usize, observed: &[TagRun]) -> Vec<Violation> {
    let acked = acked.min(ops.len());
    let started = &ops[..(acked + 1).min(ops.len())];
    let mut out = Vec::new();
    for r in observed {
        for lba in r.sector..r.sector + r.count {
            // (index, id, durable) of the writes to this sector, in order.
            let writes: Vec<(usize, u32, bool)> = started
                .iter()
                .enumerate()
                .filter_map(|(i, op)| match *op {
                    Op::Write { off, len, id, fua }
                        if off / 512 <= lba && lba < (off + u64::from(len)).div_ceil(512) =>
                    {
                        let flushed = (i + 1..acked).any(|j| ops[j] == Op::Flush);
                        Some((i, id, i < acked && (fua || flushed)))
                    }
                    _ => None,
                })
                .collect();
            let durable = writes.iter().rev().find(|x| x.2).copied();
            let v = match r.tag {
                Tag::Garbage => Some(Violation::Garbage {
                    sector: lba,
                    count: 1,
                }),
                Tag::Backing => durable.map(|d| lost(lba, 1, d.1, Tag::Backing)),
                Tag::Write(id) => match writes.iter().rev().find(|x| x.1 == id) {
                    None => Some(unknown(lba, 1, id)),
                    Some(x) => match durable {
                        Some(d) if x.0 < d.0 => Some(lost(lba, 1, d.1, r.tag)),
                        _ => None,
                    },
                },
            };
            out.extend(v);
        }
    }
    merge(out)
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..48, 1u32..12, 1u32..10, proptest::bool::weighted(0.2))
            .prop_map(|(s, n, id, f)| Op::Write { off: s * 512, len: n * 512, id, fua: f }),
        2 => Just(Op::Flush),
        1 => Just(Op::CloseKsets),
    ]
}

fn arb_tag() -> impl Strategy<Value = Tag> {
    prop_oneof![
        2 => Just(Tag::Backing),
        1 => Just(Tag::Garbage),
        6 => (1u32..12).prop_map(Tag::Write),
    ]
}

/// Disjoint runs tiling sectors from 0 upwards (with gaps).
fn arb_runs() -> impl Strategy<Value = Vec<TagRun>> {
    proptest::collection::vec((0u64..3, 1u64..10, arb_tag()), 0..12).prop_map(|v| {
        let mut at = 0;
        v.into_iter()
            .map(|(gap, count, tag)| {
                at += gap;
                let r = run(at, count, tag);
                at += count;
                r
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn check_matches_the_reference(
        ops in proptest::collection::vec(arb_op(), 0..24),
        acked in 0usize..26,
        obs in arb_runs(),
    ) {
        prop_assert_eq!(check(&ops, acked, &obs), reference(&ops, acked, &obs));
    }

    #[test]
    fn a_settled_prefix_judges_as_the_whole_list(
        prefix in proptest::collection::vec(arb_op(), 0..16),
        rest in proptest::collection::vec(arb_op(), 0..12),
        extra in 0usize..14,
        obs in arb_runs(),
    ) {
        // A prefill: its ops, then the flush that settles them.
        let mut ops = prefix;
        ops.push(Op::Flush);
        let settled = Settled::new(&ops).expect("ends with a flush");
        prop_assert_eq!(settled.len(), ops.len());
        let acked = ops.len() + extra;
        ops.extend(rest);
        prop_assert_eq!(
            check_settled(&settled, &ops, acked, &obs),
            reference(&ops, acked, &obs)
        );
    }

    #[test]
    fn allowed_matches_the_reference(
        ops in proptest::collection::vec(arb_op(), 0..24),
        acked in 0usize..26,
        lba in 0u64..64,
    ) {
        let a = allowed(&ops, acked, lba);
        // What `allowed` permits is exactly what the reference accepts.
        let ok = |tag| reference(&ops, acked, &[run(lba, 1, tag)]).is_empty();
        prop_assert_eq!(a.backing, ok(Tag::Backing));
        prop_assert_eq!(a.durable.is_none(), a.backing);
        for id in 1..12 {
            prop_assert_eq!(a.ids.contains(&id), ok(Tag::Write(id)), "id {}", id);
        }
        prop_assert_eq!(a.ids.first().copied().filter(|_| a.durable.is_some()), a.durable);
    }
}
