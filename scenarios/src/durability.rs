//! The durability check of a state: the `verify` results of its recovery
//! judged by `workload::oracle` against the ops acknowledged before the cut.

use crate::persistence::{Event, Trace};
use crate::result::Durability;
use serde::Deserialize as _;
use workload::{Op, Settled, TagRun, Violation};

/// The ops a state is judged against, with how many of them are
/// acknowledged: the prefill's, a flush for the deactivation that ends it
/// (it closes the open key-set), the `done` workload ops acknowledged before
/// the cut, the recovery's own ops, then the workload ops still in flight at
/// the cut (their writes may or may not have persisted, and no recovery
/// flush covers them; a scenario file that loaded keeps the workload's and
/// the recovery's writes on different sectors, so this order is exact).
pub fn judged_ops(
    prefill: &[Op],
    workload: &[Op],
    recovery: &[Op],
    done: usize,
) -> (Vec<Op>, usize) {
    let done = done.min(workload.len());
    let mut ops = prefill.to_vec();
    if !ops.is_empty() {
        ops.push(Op::Flush);
    }
    ops.extend_from_slice(&workload[..done]);
    let acked = ops.len();
    ops.extend_from_slice(recovery);
    ops.extend_from_slice(&workload[done..]);
    (ops, acked)
}

/// The settled part of ops that [`judged_ops`] made from `prefill`: the
/// prefill and the flush of the deactivation that ends it, acknowledged
/// before every cut; painted once for all of a run's states.
pub fn settled_prefill(prefill: &[Op], judged: &[Op]) -> Settled {
    let n = if prefill.is_empty() {
        0
    } else {
        prefill.len() + 1
    };
    Settled::new(&judged[..n.min(judged.len())]).expect("judged_ops ends the prefill with a flush")
}

/// `done[c]`: the op-done markers among the trace's first `c` events (the
/// workload ops acknowledged by a cut at `c`).
pub fn ops_done_before(trace: &Trace) -> Vec<usize> {
    let mut done = Vec::with_capacity(trace.len() + 1);
    let mut n = 0;
    done.push(0);
    for e in trace.events() {
        if let Event::Marker { id } = e {
            if protocol::markers::decode_op_done(*id).is_some() {
                n += 1;
            }
        }
        done.push(n);
    }
    done
}

/// Judges the `verify` results among a recovery's step results. `ops` ends
/// with the recovery's own data ops (if any), which follow the `acked` ones:
/// each verify is judged with the recovery ops done before it (the
/// `ops_done` its data steps report) acknowledged too.
pub fn judge(reports: &[serde_json::Value], ops: &[Op], acked: usize) -> Durability {
    judge_settled(reports, &Settled::default(), ops, acked)
}

/// [`judge`] with the settled beginning of `ops` painted beforehand
/// ([`settled_prefill`]).
pub fn judge_settled(
    reports: &[serde_json::Value],
    settled: &Settled,
    ops: &[Op],
    acked: usize,
) -> Durability {
    let mut checked = false;
    let mut violations = Vec::new();
    let mut recovery_done = 0usize;
    for r in reports {
        match r.get("step").and_then(|s| s.as_str()) {
            Some("write" | "flush" | "close-ksets" | "gen") => {
                if let Some(n) = r.get("ops_done").and_then(|n| n.as_u64()) {
                    recovery_done = n as usize;
                }
                continue;
            }
            Some("verify") => {}
            _ => continue,
        }
        checked = true;
        let runs = match r.get("runs").map(Vec::<TagRun>::deserialize) {
            Some(Ok(v)) => v,
            _ => {
                violations.push(format!("a verify result the runner cannot read: {r}"));
                continue;
            }
        };
        let now = (acked + recovery_done).min(ops.len());
        for v in workload::check_settled(settled, ops, now, &runs) {
            let text = describe(&v, ops, now);
            if !violations.contains(&text) {
                violations.push(text);
            }
        }
    }
    Durability {
        acked,
        checked,
        violations,
    }
}

/// A violation in words, e.g. `sectors 16..24: write 3 was flushed but reads write 1`.
pub fn describe(v: &Violation, ops: &[Op], acked: usize) -> String {
    let (s, n) = v.range();
    let range = format!("sectors {s}..{}", s + n);
    match *v {
        Violation::Garbage { .. } => {
            format!("{range}: garbage (neither the disk's content nor a whole sector of a write)")
        }
        Violation::Lost { durable, found, .. } => {
            let fua = ops[..acked.min(ops.len())]
                .iter()
                .any(|op| matches!(*op, Op::Write { id, fua: true, .. } if id == durable));
            let how = if fua { "a FUA write" } else { "flushed" };
            format!("{range}: write {durable} was {how} but reads {found}")
        }
        Violation::Unknown { id, .. } => {
            format!("{range}: reads write {id}, which never wrote there before the cut")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use workload::Tag;

    fn w(off: u64, len: u32, id: u32, fua: bool) -> Op {
        Op::Write { off, len, id, fua }
    }

    fn verify(runs: &[(u64, u64, i64)]) -> serde_json::Value {
        let runs: Vec<serde_json::Value> = runs
            .iter()
            .map(|&(sector, count, tag)| serde_json::json!({"sector": sector, "count": count, "tag": tag}))
            .collect();
        serde_json::json!({"step": "verify", "off": 0, "len": 8192, "runs": runs})
    }

    #[test]
    fn a_lost_flushed_write_is_named_in_words() {
        // Write 1, flush, write 3 over it, flush: 3 is durable.
        let ops = [
            w(8192, 4096, 1, false),
            Op::Flush,
            w(8192, 4096, 3, false),
            Op::Flush,
        ];
        let reports = [
            serde_json::json!({"step": "start"}),
            verify(&[(0, 16, 0), (16, 8, 1)]),
        ];
        let d = judge(&reports, &ops, 4);
        assert!(d.checked);
        assert_eq!(
            d.violations,
            ["sectors 16..24: write 3 was flushed but reads write 1"]
        );
        // Cut before the second flush completed: write 1 or 3 may show.
        assert!(judge(&reports, &ops, 3).violations.is_empty());
        // A FUA write is durable once acknowledged.
        let fua = [w(8192, 4096, 3, true)];
        let d = judge(&[verify(&[(16, 8, 0)])], &fua, 1);
        assert_eq!(
            d.violations,
            ["sectors 16..24: write 3 was a FUA write but reads backing"]
        );
    }

    #[test]
    fn the_recoverys_own_writes_count_from_the_step_that_made_them() {
        // A prefill write, its flush, then a FUA write made by the recovery.
        let (ops, before) = judged_ops(&[w(0, 512, 1, false)], &[], &[w(4096, 512, 9, true)], 0);
        assert_eq!(before, 2);
        let before_write = verify(&[(0, 1, 1), (8, 1, 0)]);
        let wrote = serde_json::json!({"step": "write", "ops_done": 1});
        let after_write = verify(&[(0, 1, 1), (8, 1, 9)]);
        let lost = verify(&[(0, 1, 1), (8, 1, 0)]);
        // Before the write the old content is right; after it, the FUA
        // write must read back.
        let d = judge(
            &[before_write.clone(), wrote.clone(), after_write],
            &ops,
            before,
        );
        assert!(d.violations.is_empty(), "{d:?}");
        let d = judge(&[before_write, wrote, lost], &ops, before);
        assert_eq!(
            d.violations,
            ["sectors 8..9: write 9 was a FUA write but reads backing"]
        );
    }

    #[test]
    fn garbage_and_unknown_writes_are_violations_whatever_was_acked() {
        let ops = [w(0, 512, 1, false)];
        let d = judge(&[verify(&[(0, 1, -1)])], &ops, 0);
        assert_eq!(d.violations.len(), 1);
        assert!(
            d.violations[0].starts_with("sectors 0..1: garbage"),
            "{:?}",
            d.violations
        );
        let d = judge(&[verify(&[(0, 1, 7)])], &ops, 1);
        assert_eq!(
            d.violations,
            ["sectors 0..1: reads write 7, which never wrote there before the cut"]
        );
    }

    #[test]
    fn no_verify_result_is_not_checked_and_a_bad_one_is_a_violation() {
        let d = judge(&[serde_json::json!({"step": "start"})], &[], 0);
        assert_eq!((d.checked, d.violations.len()), (false, 0));
        let bad = serde_json::json!({"step": "verify", "runs": [{"sector": 0}]});
        let d = judge(&[bad], &[], 0);
        assert!(
            d.checked && d.violations[0].contains("cannot read"),
            "{d:?}"
        );
    }

    #[test]
    fn a_prefill_is_acknowledged_and_flushed_before_the_workload() {
        let (ops, before) = judged_ops(&[w(0, 512, 1, false)], &[w(0, 512, 2, false)], &[], 0);
        assert_eq!(before, 2);
        assert_eq!(ops[1], Op::Flush);
        // No workload op acknowledged: the prefill's write must show.
        let d = judge(&[verify(&[(0, 1, 0)])], &ops, before);
        assert_eq!(
            d.violations,
            ["sectors 0..1: write 1 was flushed but reads backing"]
        );
        assert!(judge(&[verify(&[(0, 1, 2)])], &ops, before)
            .violations
            .is_empty());
        assert_eq!(judged_ops(&[], &[Op::Flush], &[], 0).1, 0);
        let _ = Tag::Backing;
    }

    #[test]
    fn a_workload_write_in_flight_stays_optional_through_the_recoverys_flushes() {
        // Workload: write 2 (FUA) in flight at the cut. Recovery: write 9
        // (FUA) elsewhere, which flushes, then a verify of both.
        let wl = [w(0, 512, 2, true)];
        let rec = [w(4096, 512, 9, true)];
        let (ops, acked) = judged_ops(&[w(0, 512, 1, false)], &wl, &rec, 0);
        assert_eq!((acked, ops[2], ops[3]), (2, rec[0], wl[0]));
        let wrote = serde_json::json!({"step": "write", "ops_done": 1});
        for sector0 in [1, 2] {
            let d = judge(
                &[wrote.clone(), verify(&[(0, 1, sector0), (8, 1, 9)])],
                &ops,
                acked,
            );
            assert!(d.violations.is_empty(), "write {sector0}: {d:?}");
        }
        // Acknowledged before the cut, it must read back.
        let (ops, acked) = judged_ops(&[w(0, 512, 1, false)], &wl, &rec, 1);
        let d = judge(&[wrote, verify(&[(0, 1, 1), (8, 1, 9)])], &ops, acked);
        assert_eq!(
            d.violations,
            ["sectors 0..1: write 2 was a FUA write but reads write 1"]
        );
    }

    #[test]
    fn a_settled_prefill_judges_as_the_whole_list() {
        // Prefill: write 1 then write 2 over its second half; workload:
        // write 3 (FUA) over the first sector, acknowledged or not.
        let prefill = [w(0, 1024, 1, false), w(512, 512, 2, false)];
        let wl = [w(0, 512, 3, true)];
        let rec = [w(4096, 512, 9, true)];
        let wrote = serde_json::json!({"step": "write", "ops_done": 1});
        let reads = [
            verify(&[(0, 1, 3), (1, 1, 2)]),
            verify(&[(0, 1, 1), (1, 1, 2)]),
            verify(&[(0, 1, 1), (1, 1, 1)]),
            verify(&[(0, 2, 0)]),
        ];
        for done in [0, 1] {
            let (ops, acked) = judged_ops(&prefill, &wl, &rec, done);
            let settled = settled_prefill(&prefill, &ops);
            assert_eq!(settled.len(), 3);
            for r in &reads {
                let reports = [wrote.clone(), r.clone()];
                let whole = judge(&reports, &ops, acked);
                assert_eq!(judge_settled(&reports, &settled, &ops, acked), whole);
            }
        }
        // Some of these read-backs break the rule (so the comparison above
        // compares violations, not only empty lists).
        let (ops, acked) = judged_ops(&prefill, &wl, &rec, 1);
        let settled = settled_prefill(&prefill, &ops);
        let d = judge_settled(&[wrote, reads[2].clone()], &settled, &ops, acked);
        assert_eq!(
            d.violations,
            [
                "sectors 0..1: write 3 was a FUA write but reads write 1",
                "sectors 1..2: write 2 was flushed but reads write 1"
            ]
        );
        assert!(settled_prefill(&[], &ops).is_empty());
    }

    #[test]
    fn op_done_markers_are_counted_by_position() {
        let mut t = Trace::new();
        t.push(Event::Marker {
            id: protocol::markers::op_done(0),
        });
        t.push(Event::PmemFlush);
        t.push(Event::Marker {
            id: protocol::markers::crash_point_begin(8),
        });
        t.push(Event::Marker {
            id: protocol::markers::op_done(1),
        });
        assert_eq!(ops_done_before(&t), [0, 1, 1, 1, 2]);
    }
}
