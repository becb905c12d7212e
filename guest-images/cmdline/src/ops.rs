//! The workload ops a `pcache.run` value performs.

use crate::run::{run_steps, RunStep};
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use workload::Op;

impl RunStep {
    /// The workload ops this step performs, in order (`gen` expanded; none
    /// for steps that are not ops).
    pub fn ops(&self) -> Vec<Op> {
        match *self {
            RunStep::Write { off, len, id, fua } => vec![Op::Write { off, len, id, fua }],
            RunStep::Flush => vec![Op::Flush],
            RunStep::CloseKsets => vec![Op::CloseKsets],
            RunStep::Generate(spec) => workload::generate(&spec),
            RunStep::Start(_)
            | RunStep::Stop
            | RunStep::Status
            | RunStep::Marker(_)
            | RunStep::Trace(_)
            | RunStep::Fault(_)
            | RunStep::Read { .. }
            | RunStep::Verify { .. }
            | RunStep::Writeback
            | RunStep::Gc
            | RunStep::Idle
            | RunStep::GcPercent(_) => Vec::new(),
        }
    }
}

/// The ops of a `pcache.run` value in the order the guest runs them, which is
/// the numbering of its "op done" markers (0-based). A malformed value is an
/// error naming the step.
pub fn ops_of_steps(value: &str) -> Result<Vec<Op>, String> {
    let mut ops = Vec::new();
    for step in run_steps(value) {
        let (_, step) = step.map_err(|e| e.to_string())?;
        ops.extend(step.ops());
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use workload::{GenKind, GenSpec};

    #[test]
    fn ops_in_order_with_gen_expanded() {
        let spec = GenSpec {
            kind: GenKind::Mixed,
            seed: 3,
            ops: 20,
            base: 0,
            span: 1 << 20,
            first_id: 100,
        };
        let ops = ops_of_steps(
            "start;trace:on;write:0:4096:1:fua;flush;gen:mixed:seed=3:ops=20:span=0x100000:first-id=100;\
             read:0:4096;close-ksets;verify:0:0x100000;marker:5;stop",
        )
        .unwrap();
        let mut want = vec![
            Op::Write {
                off: 0,
                len: 4096,
                id: 1,
                fua: true,
            },
            Op::Flush,
        ];
        want.extend(workload::generate(&spec));
        want.push(Op::CloseKsets);
        assert_eq!(ops, want);
        assert_eq!(ops_of_steps("start;status"), Ok(Vec::new()));
        assert_eq!(ops_of_steps(""), Ok(Vec::new()));
    }

    #[test]
    fn malformed_values_name_the_step() {
        assert_eq!(
            ops_of_steps("flush;write:1:512:1"),
            Err("step 2 `write:1:512:1`: OFF must be a multiple of 512".into())
        );
        assert_eq!(
            ops_of_steps("gen:random:seed=1:ops=0:span=0x10000"),
            Err("step 1 `gen:random:seed=1:ops=0:span=0x10000`: ops must be 1..=100000".into())
        );
    }
}
