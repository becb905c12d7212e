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

use crate::steps::{split_steps, Args, StepError, StepErrorKind};

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
        _ => return Err(StepErrorKind::Unknown),
    };
    args.finish()?;
    Ok(step)
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
