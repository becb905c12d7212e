//! The pcache steps of `pcache.run=STEP;STEP;...` and the `pcache.markers`
//! switch.
//!
//! Grammar (steps are separated by `;`; a step is `name` or `name:args`;
//! numbers are decimal or `0x`-hex):
//!
//! | step | meaning |
//! |---|---|
//! | `start[:mode=strict\|recover][:data_crc=true\|false]` | an activation (defaults: `recover`, `false`); options in any order, each at most once |
//! | `stop` | deactivation of the active cache |
//! | `status` | whether a cache is active, and the last `start`'s report |
//! | `marker:ID` | a 32-bit marker (ID ≤ 0xffffffff) |
//! | `trace:on\|off` | the VMM's trace-on / trace-off control marker |
//! | `fault:pf\|ud\|gp\|de` | test only: a page fault, `ud2`, a general-protection fault, a divide error |
//! | `write:OFF:LEN:ID[:fua]` | write LEN bytes of write ID's sector pattern at byte OFF (OFF, LEN multiples of 512; 1 ≤ LEN ≤ 16 MiB; 1 ≤ ID ≤ 0xffffffff), with FUA if `fua` |
//! | `read:OFF:LEN` | read LEN bytes at OFF (aligned as for `write`; LEN ≤ 64 MiB) |
//! | `flush` | a flush of the cached device |
//! | `close-ksets` | close the module's open key sets |
//! | `gen:KIND:seed=S:ops=N:span=BYTES[:base=OFF][:first-id=I]` | the ops of `workload::generate` (KIND `sequential`, `random`, `overwrite` or `mixed`; defaults base 0, first-id 1; options in any order, each at most once; checked by `GenSpec::validate`) |
//! | `verify:OFF:LEN` | read LEN bytes at OFF back as tag runs (aligned as for `write`; LEN ≤ 256 MiB) |
//! | `writeback` | the kernel's writeback worker until the log is clean (or it stops) |
//! | `gc` | the kernel's GC worker until it does not move key_tail |
//! | `idle` | writeback and GC in turn until neither moves |
//! | `gc-percent:N` | the target's `gc_percent N` message (0 ≤ N ≤ 90) |
//!
//! `write`, `flush`, `close-ksets` and the ops of a `gen` are the workload's
//! ops, numbered from 0 in this order ([`crate::ops_of_steps`]).

use crate::number::parse_u64;
use crate::steps::{split_steps, Args, StepError, StepErrorKind};
use workload::{GenError, GenKind, GenSpec};

const MIB: u64 = 1 << 20;
/// Largest `write` (bytes).
pub const WRITE_MAX: u64 = 16 * MIB;
/// Largest `read` (bytes).
pub const READ_MAX: u64 = 64 * MIB;
/// Largest `verify` (bytes).
pub const VERIFY_MAX: u64 = 256 * MIB;

/// Recovery mode of a `start` (mirrors `pcache::Mode`; this crate has no
/// dependencies so that it stays a plain host-testable parser).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartMode {
    Strict,
    #[default]
    Recover,
}

/// The options of a `start`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartOptions {
    pub mode: StartMode,
    pub data_crc: bool,
}

/// The exception a `fault:` step raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `pf`: a read of an unmapped address (#PF, vector 14).
    PageFault,
    /// `ud`: `ud2` (#UD, vector 6).
    InvalidOpcode,
    /// `gp`: a read of a non-canonical address (#GP, vector 13).
    GeneralProtection,
    /// `de`: an unsigned division by zero (#DE, vector 0).
    DivideError,
}

impl Fault {
    /// The exception vector the CPU reports for it.
    pub fn vector(self) -> u64 {
        match self {
            Fault::PageFault => 14,
            Fault::InvalidOpcode => 6,
            Fault::GeneralProtection => 13,
            Fault::DivideError => 0,
        }
    }
}

/// One parsed `pcache.run` step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStep {
    Start(StartOptions),
    Stop,
    Status,
    Marker(u32),
    Trace(bool),
    Fault(Fault),
    /// Bytes `[off, off + len)` of write `id`'s pattern.
    Write {
        off: u64,
        len: u32,
        id: u32,
        fua: bool,
    },
    Read {
        off: u64,
        len: u32,
    },
    Flush,
    CloseKsets,
    Generate(GenSpec),
    Verify {
        off: u64,
        len: u32,
    },
    Writeback,
    Gc,
    Idle,
    GcPercent(u8),
}

/// Parses the steps of a `pcache.run` value, each with its text; an empty
/// value has no steps. Errors name the step (1-based) and its text.
pub fn run_steps(value: &str) -> impl Iterator<Item = Result<(&str, RunStep), StepError<'_>>> {
    split_steps(value, parse_run_step)
}

fn parse_run_step(text: &str) -> Result<RunStep, StepErrorKind> {
    if text.is_empty() {
        return Err(StepErrorKind::Empty);
    }
    let (name, args) = match text.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (text, None),
    };
    let mut args = Args(args.map(|a| a.split(':')));
    let step = match name {
        "start" => return parse_start(args),
        "stop" => RunStep::Stop,
        "status" => RunStep::Status,
        "marker" => {
            let id = args.number("ID")?;
            RunStep::Marker(u32::try_from(id).map_err(|_| StepErrorKind::OutOfRange("ID"))?)
        }
        "trace" => RunStep::Trace(match args.word("on|off")? {
            "on" => true,
            "off" => false,
            _ => return Err(StepErrorKind::BadValue("trace", "on or off")),
        }),
        "fault" => RunStep::Fault(match args.word("pf|ud|gp|de")? {
            "pf" => Fault::PageFault,
            "ud" => Fault::InvalidOpcode,
            "gp" => Fault::GeneralProtection,
            "de" => Fault::DivideError,
            _ => return Err(StepErrorKind::BadValue("fault", "pf, ud, gp or de")),
        }),
        "write" => {
            let (off, len) = byte_range(&mut args, WRITE_MAX)?;
            let id = args.number("ID")?;
            let id = u32::try_from(id)
                .ok()
                .filter(|&id| id != 0)
                .ok_or(StepErrorKind::OutOfRange("ID"))?;
            let fua = match args.optional() {
                None => false,
                Some("fua") => true,
                Some(_) => return Err(StepErrorKind::BadValue("flag", "fua")),
            };
            RunStep::Write { off, len, id, fua }
        }
        "read" => {
            let (off, len) = byte_range(&mut args, READ_MAX)?;
            RunStep::Read { off, len }
        }
        "verify" => {
            let (off, len) = byte_range(&mut args, VERIFY_MAX)?;
            RunStep::Verify { off, len }
        }
        "flush" => RunStep::Flush,
        "close-ksets" => RunStep::CloseKsets,
        "gen" => return parse_gen(args),
        "writeback" => RunStep::Writeback,
        "gc" => RunStep::Gc,
        "idle" => RunStep::Idle,
        "gc-percent" => {
            let n = args.number("N")?;
            RunStep::GcPercent(
                u8::try_from(n)
                    .ok()
                    .filter(|&n| n <= 90)
                    .ok_or(StepErrorKind::OutOfRange("N"))?,
            )
        }
        _ => return Err(StepErrorKind::Unknown),
    };
    args.finish()?;
    Ok(step)
}

/// `OFF:LEN`: both multiples of 512, 1 ≤ LEN ≤ `max`, OFF + LEN in range.
fn byte_range(args: &mut Args<'_>, max: u64) -> Result<(u64, u32), StepErrorKind> {
    let off = args.number("OFF")?;
    let len = args.number("LEN")?;
    if off % 512 != 0 {
        return Err(StepErrorKind::NotSectorAligned("OFF"));
    }
    if len % 512 != 0 {
        return Err(StepErrorKind::NotSectorAligned("LEN"));
    }
    if len == 0 || len > max {
        return Err(StepErrorKind::OutOfRange("LEN"));
    }
    if off.checked_add(len).is_none() {
        return Err(StepErrorKind::OutOfRange("OFF"));
    }
    // max ≤ 256 MiB, so LEN fits.
    Ok((off, len as u32))
}

/// `gen:KIND` then `seed=`, `ops=`, `span=` (required) and `base=`,
/// `first-id=` (optional), in any order, each at most once.
fn parse_gen(mut args: Args<'_>) -> Result<RunStep, StepErrorKind> {
    let kind: GenKind = args
        .word("KIND")?
        .parse()
        .map_err(|_| StepErrorKind::BadValue("KIND", "sequential, random, overwrite or mixed"))?;
    let mut seed = None;
    let mut ops = None;
    let mut span = None;
    let mut base = None;
    let mut first_id = None;
    for opt in args.0.into_iter().flatten() {
        let (key, value) = opt.split_once('=').ok_or(StepErrorKind::UnknownOption)?;
        let (name, slot) = match key {
            "seed" => ("seed", &mut seed),
            "ops" => ("ops", &mut ops),
            "span" => ("span", &mut span),
            "base" => ("base", &mut base),
            "first-id" => ("first-id", &mut first_id),
            _ => return Err(StepErrorKind::UnknownOption),
        };
        let v = parse_u64(value).map_err(|e| StepErrorKind::BadNumber(name, e))?;
        if slot.replace(v).is_some() {
            return Err(StepErrorKind::DuplicateOption(name));
        }
    }
    let required = |v: Option<u64>, name| v.ok_or(StepErrorKind::MissingArgument(name));
    let narrow = |v: u64, e| u32::try_from(v).map_err(|_| StepErrorKind::Workload(e));
    let spec = GenSpec {
        kind,
        seed: required(seed, "seed=S")?,
        ops: narrow(required(ops, "ops=N")?, GenError::Ops)?,
        span: required(span, "span=BYTES")?,
        base: base.unwrap_or(0),
        first_id: narrow(first_id.unwrap_or(1), GenError::FirstId)?,
    };
    spec.validate().map_err(StepErrorKind::Workload)?;
    Ok(RunStep::Generate(spec))
}

/// `start` options: `mode=strict|recover`, `data_crc=true|false`, each at most once.
fn parse_start(args: Args<'_>) -> Result<RunStep, StepErrorKind> {
    let mut mode = None;
    let mut data_crc = None;
    for opt in args.0.into_iter().flatten() {
        let (key, value) = opt.split_once('=').ok_or(StepErrorKind::UnknownOption)?;
        match key {
            "mode" => {
                let m = match value {
                    "strict" => StartMode::Strict,
                    "recover" => StartMode::Recover,
                    _ => return Err(StepErrorKind::BadValue("mode", "strict or recover")),
                };
                if mode.replace(m).is_some() {
                    return Err(StepErrorKind::DuplicateOption("mode"));
                }
            }
            "data_crc" => {
                let d = match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err(StepErrorKind::BadValue("data_crc", "true or false")),
                };
                if data_crc.replace(d).is_some() {
                    return Err(StepErrorKind::DuplicateOption("data_crc"));
                }
            }
            _ => return Err(StepErrorKind::UnknownOption),
        }
    }
    Ok(RunStep::Start(StartOptions {
        mode: mode.unwrap_or_default(),
        data_crc: data_crc.unwrap_or(false),
    }))
}

/// The value of a `pcache.markers` parameter: `on` or `off` (`None` for
/// anything else, a bare key included, which the kernel rejects).
pub fn on_off(value: Option<&str>) -> Option<bool> {
    match value? {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NumberError;
    use StepErrorKind::*;

    fn one(s: &str) -> Result<RunStep, StepErrorKind> {
        let mut it = run_steps(s);
        let r = it
            .next()
            .expect("one step")
            .map(|(_, s)| s)
            .map_err(|e| e.kind);
        assert!(it.next().is_none(), "more than one step in {s:?}");
        r
    }

    fn start(mode: StartMode, data_crc: bool) -> Result<RunStep, StepErrorKind> {
        Ok(RunStep::Start(StartOptions { mode, data_crc }))
    }

    #[test]
    fn start_options_and_defaults() {
        use StartMode::*;
        assert_eq!(one("start"), start(Recover, false));
        assert_eq!(one("start:mode=strict"), start(Strict, false));
        assert_eq!(one("start:mode=recover"), start(Recover, false));
        assert_eq!(one("start:data_crc=true"), start(Recover, true));
        assert_eq!(one("start:data_crc=false"), start(Recover, false));
        assert_eq!(one("start:mode=strict:data_crc=true"), start(Strict, true));
        assert_eq!(one("start:data_crc=true:mode=strict"), start(Strict, true));
    }

    #[test]
    fn malformed_start_options() {
        assert_eq!(one("start:"), Err(UnknownOption));
        assert_eq!(one("start:strict"), Err(UnknownOption));
        assert_eq!(one("start:mode"), Err(UnknownOption));
        assert_eq!(one("start:speed=fast"), Err(UnknownOption));
        assert_eq!(
            one("start:mode=fast"),
            Err(BadValue("mode", "strict or recover"))
        );
        assert_eq!(
            one("start:mode=Strict"),
            Err(BadValue("mode", "strict or recover"))
        );
        assert_eq!(
            one("start:mode="),
            Err(BadValue("mode", "strict or recover"))
        );
        assert_eq!(
            one("start:data_crc=1"),
            Err(BadValue("data_crc", "true or false"))
        );
        assert_eq!(
            one("start:mode=strict:mode=recover"),
            Err(DuplicateOption("mode"))
        );
        assert_eq!(
            one("start:data_crc=true:data_crc=true"),
            Err(DuplicateOption("data_crc"))
        );
        assert_eq!(one("start:mode=strict:"), Err(UnknownOption));
    }

    #[test]
    fn other_steps() {
        assert_eq!(one("stop"), Ok(RunStep::Stop));
        assert_eq!(one("status"), Ok(RunStep::Status));
        assert_eq!(one("marker:7"), Ok(RunStep::Marker(7)));
        assert_eq!(one("marker:0xffffffff"), Ok(RunStep::Marker(u32::MAX)));
        assert_eq!(one("trace:on"), Ok(RunStep::Trace(true)));
        assert_eq!(one("trace:off"), Ok(RunStep::Trace(false)));
        assert_eq!(one("fault:pf"), Ok(RunStep::Fault(Fault::PageFault)));
        assert_eq!(one("fault:ud"), Ok(RunStep::Fault(Fault::InvalidOpcode)));
        assert_eq!(
            one("fault:gp"),
            Ok(RunStep::Fault(Fault::GeneralProtection))
        );
        assert_eq!(one("fault:de"), Ok(RunStep::Fault(Fault::DivideError)));
        assert_eq!(
            [
                Fault::PageFault,
                Fault::InvalidOpcode,
                Fault::GeneralProtection,
                Fault::DivideError
            ]
            .map(Fault::vector),
            [14, 6, 13, 0]
        );
    }

    #[test]
    fn malformed_other_steps() {
        assert_eq!(one("stop:now"), Err(ExtraArgument));
        assert_eq!(one("status:"), Err(ExtraArgument));
        assert_eq!(one("marker"), Err(MissingArgument("ID")));
        assert_eq!(one("marker:0x100000000"), Err(OutOfRange("ID")));
        assert_eq!(
            one("marker:-1"),
            Err(BadNumber("ID", NumberError::BadDigit))
        );
        assert_eq!(one("marker:1:2"), Err(ExtraArgument));
        assert_eq!(one("trace"), Err(MissingArgument("on|off")));
        assert_eq!(one("trace:yes"), Err(BadValue("trace", "on or off")));
        assert_eq!(one("trace:on:off"), Err(ExtraArgument));
        assert_eq!(one("fault"), Err(MissingArgument("pf|ud|gp|de")));
        assert_eq!(one("fault:nmi"), Err(BadValue("fault", "pf, ud, gp or de")));
        assert_eq!(one("fault:pf:1"), Err(ExtraArgument));
        assert_eq!(one("bogus"), Err(Unknown));
        assert_eq!(one("Start"), Err(Unknown));
        // harness.test steps are not pcache steps.
        assert_eq!(one("pmem-flush"), Err(Unknown));
    }

    #[test]
    fn data_steps() {
        let write = |off, len, id, fua| Ok(RunStep::Write { off, len, id, fua });
        assert_eq!(one("write:0:512:1"), write(0, 512, 1, false));
        assert_eq!(
            one("write:0x1000:0x1000000:0xffffffff:fua"),
            write(0x1000, 16 << 20, u32::MAX, true)
        );
        assert_eq!(
            one("write:18446744073709534720:16384:7"),
            write(u64::MAX - 16895, 16384, 7, false)
        );
        assert_eq!(
            one("read:4096:0x4000000"),
            Ok(RunStep::Read {
                off: 4096,
                len: 64 << 20
            })
        );
        assert_eq!(
            one("verify:0:0x10000000"),
            Ok(RunStep::Verify {
                off: 0,
                len: 256 << 20
            })
        );
        assert_eq!(one("flush"), Ok(RunStep::Flush));
        assert_eq!(one("close-ksets"), Ok(RunStep::CloseKsets));
        assert_eq!(one("writeback"), Ok(RunStep::Writeback));
        assert_eq!(one("gc"), Ok(RunStep::Gc));
        assert_eq!(one("idle"), Ok(RunStep::Idle));
        assert_eq!(one("gc-percent:0"), Ok(RunStep::GcPercent(0)));
        assert_eq!(one("gc-percent:90"), Ok(RunStep::GcPercent(90)));
        assert_eq!(one("gc-percent:91"), Err(OutOfRange("N")));
        assert_eq!(one("gc-percent"), Err(MissingArgument("N")));
        assert_eq!(one("idle:1"), Err(ExtraArgument));
    }

    #[test]
    fn malformed_data_steps() {
        assert_eq!(one("write"), Err(MissingArgument("OFF")));
        assert_eq!(one("write:0"), Err(MissingArgument("LEN")));
        assert_eq!(one("write:0:512"), Err(MissingArgument("ID")));
        assert_eq!(one("write:1:512:1"), Err(NotSectorAligned("OFF")));
        assert_eq!(one("write:0:100:1"), Err(NotSectorAligned("LEN")));
        assert_eq!(one("write:0:0:1"), Err(OutOfRange("LEN")));
        assert_eq!(one("write:0:0x1000200:1"), Err(OutOfRange("LEN")));
        assert_eq!(one("write:0:512:0"), Err(OutOfRange("ID")));
        assert_eq!(one("write:0:512:0x100000000"), Err(OutOfRange("ID")));
        assert_eq!(
            one("write:18446744073709551104:512:1"),
            Err(OutOfRange("OFF"))
        );
        assert_eq!(one("write:0:512:1:FUA"), Err(BadValue("flag", "fua")));
        assert_eq!(one("write:0:512:1:"), Err(BadValue("flag", "fua")));
        assert_eq!(one("write:0:512:1:fua:fua"), Err(ExtraArgument));
        assert_eq!(
            one("write:x:512:1"),
            Err(BadNumber("OFF", NumberError::BadDigit))
        );
        assert_eq!(one("read:0"), Err(MissingArgument("LEN")));
        assert_eq!(one("read:0:0x4000200"), Err(OutOfRange("LEN")));
        assert_eq!(one("read:0:511"), Err(NotSectorAligned("LEN")));
        assert_eq!(one("read:0:512:1"), Err(ExtraArgument));
        assert_eq!(one("verify:0:0x10000200"), Err(OutOfRange("LEN")));
        assert_eq!(one("verify:256:512"), Err(NotSectorAligned("OFF")));
        assert_eq!(one("verify:0:0"), Err(OutOfRange("LEN")));
        assert_eq!(one("verify:0:512:x"), Err(ExtraArgument));
        assert_eq!(one("flush:now"), Err(ExtraArgument));
        assert_eq!(one("close-ksets:"), Err(ExtraArgument));
        assert_eq!(one("close_ksets"), Err(Unknown));
        let e = run_steps("write:0:100:1").find_map(Result::err).unwrap();
        assert_eq!(
            std::format!("{e}"),
            "step 1 `write:0:100:1`: LEN must be a multiple of 512"
        );
    }

    fn spec(kind: GenKind, seed: u64, ops: u32, span: u64, base: u64, first_id: u32) -> GenSpec {
        GenSpec {
            kind,
            seed,
            ops,
            base,
            span,
            first_id,
        }
    }

    #[test]
    fn gen_options_and_defaults() {
        use GenKind::*;
        let gen = |s| Ok(RunStep::Generate(s));
        assert_eq!(
            one("gen:random:seed=7:ops=100:span=0x1000000"),
            gen(spec(Random, 7, 100, 16 << 20, 0, 1))
        );
        assert_eq!(
            one("gen:mixed:span=65536:first-id=50:ops=1:base=0x200:seed=0"),
            gen(spec(Mixed, 0, 1, 65536, 512, 50))
        );
        for (name, kind) in [
            ("sequential", Sequential),
            ("overwrite", Overwrite),
            ("random", Random),
            ("mixed", Mixed),
        ] {
            let s = std::format!("gen:{name}:seed=1:ops=100000:span=0x10000");
            assert_eq!(one(&s), gen(spec(kind, 1, 100_000, 0x10000, 0, 1)));
        }
    }

    #[test]
    fn malformed_gen() {
        let kinds = "sequential, random, overwrite or mixed";
        assert_eq!(one("gen"), Err(MissingArgument("KIND")));
        assert_eq!(one("gen:"), Err(BadValue("KIND", kinds)));
        assert_eq!(
            one("gen:Random:seed=1:ops=1:span=65536"),
            Err(BadValue("KIND", kinds))
        );
        assert_eq!(
            one("gen:random:ops=1:span=65536"),
            Err(MissingArgument("seed=S"))
        );
        assert_eq!(
            one("gen:random:seed=1:span=65536"),
            Err(MissingArgument("ops=N"))
        );
        assert_eq!(
            one("gen:random:seed=1:ops=1"),
            Err(MissingArgument("span=BYTES"))
        );
        assert_eq!(
            one("gen:random:seed=1:seed=2:ops=1:span=65536"),
            Err(DuplicateOption("seed"))
        );
        assert_eq!(
            one("gen:random:seed=1:ops=1:span=65536:first-id=2:first-id=2"),
            Err(DuplicateOption("first-id"))
        );
        assert_eq!(
            one("gen:random:seed=1:ops=1:span=65536:size=1"),
            Err(UnknownOption)
        );
        assert_eq!(one("gen:random:seed"), Err(UnknownOption));
        assert_eq!(
            one("gen:random:seed=1:ops=1:span=65536:"),
            Err(UnknownOption)
        );
        assert_eq!(
            one("gen:random:seed=x:ops=1:span=65536"),
            Err(BadNumber("seed", NumberError::BadDigit))
        );
        assert_eq!(
            one("gen:random:seed=1:ops=:span=65536"),
            Err(BadNumber("ops", NumberError::Empty))
        );
        // The workload crate's checks.
        let bad = |opts: &str| one(&std::format!("gen:random:{opts}"));
        assert_eq!(bad("seed=1:ops=0:span=65536"), Err(Workload(GenError::Ops)));
        assert_eq!(
            bad("seed=1:ops=100001:span=65536"),
            Err(Workload(GenError::Ops))
        );
        assert_eq!(
            bad("seed=1:ops=0x100000000:span=65536"),
            Err(Workload(GenError::Ops))
        );
        assert_eq!(
            bad("seed=1:ops=1:span=65024"),
            Err(Workload(GenError::Span))
        );
        assert_eq!(
            bad("seed=1:ops=1:span=65537"),
            Err(Workload(GenError::Span))
        );
        assert_eq!(
            bad("seed=1:ops=1:span=65536:base=1"),
            Err(Workload(GenError::Base))
        );
        assert_eq!(
            bad("seed=1:ops=1:span=65536:base=0xfffffffffffffe00"),
            Err(Workload(GenError::Overflow))
        );
        assert_eq!(
            bad("seed=1:ops=1:span=65536:first-id=0"),
            Err(Workload(GenError::FirstId))
        );
        assert_eq!(
            bad("seed=1:ops=2:span=65536:first-id=0xffffffff"),
            Err(Workload(GenError::FirstId))
        );
        assert_eq!(
            bad("seed=1:ops=1:span=65536:first-id=0x100000000"),
            Err(Workload(GenError::FirstId))
        );
        let e = run_steps("gen:random:seed=1:ops=0:span=65536")
            .find_map(Result::err)
            .unwrap();
        assert_eq!(
            std::format!("{e}"),
            "step 1 `gen:random:seed=1:ops=0:span=65536`: ops must be 1..=100000"
        );
    }

    #[test]
    fn sequences_keep_order_and_text_and_locate_errors() {
        let v: Result<std::vec::Vec<_>, _> =
            run_steps("trace:on;start:mode=strict;trace:off;stop;status").collect();
        let v = v.unwrap();
        assert_eq!(v.len(), 5);
        assert_eq!(v[0], ("trace:on", RunStep::Trace(true)));
        assert_eq!(v[1].0, "start:mode=strict");
        assert_eq!(v[4], ("status", RunStep::Status));
        assert_eq!(run_steps("").count(), 0);

        let e = run_steps("start;stop;frob:1;status")
            .find_map(Result::err)
            .unwrap();
        assert_eq!((e.index, e.step, e.kind), (3, "frob:1", Unknown));
        assert_eq!(std::format!("{e}"), "step 3 `frob:1`: unknown step");
        let e = run_steps("start;;stop").find_map(Result::err).unwrap();
        assert_eq!((e.index, e.kind), (2, Empty));
        let e = run_steps("start;").find_map(Result::err).unwrap();
        assert_eq!((e.index, e.kind), (2, Empty));
        let e = run_steps("start:mode=x").find_map(Result::err).unwrap();
        assert_eq!(
            std::format!("{e}"),
            "step 1 `start:mode=x`: mode must be strict or recover"
        );
    }

    #[test]
    fn markers_switch() {
        assert_eq!(on_off(Some("off")), Some(false));
        assert_eq!(on_off(Some("on")), Some(true));
        assert_eq!(on_off(Some("0")), None);
        assert_eq!(on_off(Some("")), None);
        assert_eq!(on_off(None), None);
    }
}
