//! Runs the pcache steps of `pcache.run=` (grammar in
//! `guest-images/cmdline/src/run.rs` and the README): activation,
//! deactivation, status, markers, trace control, test faults. Each step sends
//! one `StepResult` message (JSON). The whole list is parsed before the first
//! step runs, so a malformed command has no side effects.

use crate::backends::{GuestPmem, MarkerHooks};
use crate::channel::{self, fatal};
use crate::steps::{fail, Failure};
use crate::virtio::Devices;
use alloc::string::String;
use alloc::vec::Vec;
use guest_cmdline::{Fault, RunStep, StartMode, StartOptions};
use pcache::{ActivationReport, Cache, Mode, Options};
use protocol::{
    ExitCode, MessageKind, CMDLINE_MARKERS_KEY, CMDLINE_RUN_KEY, MARKER_TRACE_OFF, MARKER_TRACE_ON,
};

/// An address no page table maps (PML4 entry 0, PDPT entry 256): `fault:pf`
/// reads it, so the report's CR2 is this value.
pub const FAULT_PF_ADDRESS: u64 = 0x40_0000_0000;
/// A non-canonical address: `fault:gp` reads it (#GP, error code 0).
pub const FAULT_GP_ADDRESS: u64 = 0x8000_0000_0000_0000;

/// The parsed `pcache.run` steps and the marker switch.
pub struct Plan<'a> {
    steps: Vec<(&'a str, RunStep)>,
    markers: bool,
}

/// Parses `pcache.run` (at most once) and `pcache.markers` (at most once,
/// `on` or `off`), or exits with `BadCommand`.
pub fn parse(cmdline: &str) -> Plan<'_> {
    let mut markers = true;
    let mut values = guest_cmdline::values(cmdline, CMDLINE_MARKERS_KEY);
    if let Some(v) = values.next() {
        if values.next().is_some() {
            bad_command(format_args!("{CMDLINE_MARKERS_KEY}= given more than once"));
        }
        markers = guest_cmdline::on_off(Some(v)).unwrap_or_else(|| {
            // A bare key comes back as an empty value.
            bad_command(format_args!(
                "{CMDLINE_MARKERS_KEY}=`{v}`: expected `on` or `off`"
            ))
        });
    }
    let mut values = guest_cmdline::values(cmdline, CMDLINE_RUN_KEY);
    let Some(value) = values.next() else {
        return Plan {
            steps: Vec::new(),
            markers,
        };
    };
    if values.next().is_some() {
        bad_command(format_args!("{CMDLINE_RUN_KEY}= given more than once"));
    }
    let steps = guest_cmdline::run_steps(value)
        .map(|s| s.unwrap_or_else(|e| bad_command(format_args!("{CMDLINE_RUN_KEY}: {e}"))))
        .collect();
    Plan { steps, markers }
}

fn bad_command(args: core::fmt::Arguments<'_>) -> ! {
    fatal(MessageKind::Error, ExitCode::BadCommand, args)
}

/// The module's state across steps.
struct State {
    active: Option<Cache>,
    last: Option<ActivationReport>,
    hooks: MarkerHooks,
}

/// Runs the steps in order; the first failure ends the run.
pub fn run(plan: &Plan<'_>, devices: &mut Devices) {
    let mut state = State {
        active: None,
        last: None,
        hooks: MarkerHooks { on: plan.markers },
    };
    for (i, (text, step)) in plan.steps.iter().enumerate() {
        if let Err(e) = run_one(*step, &mut state, devices) {
            fail(CMDLINE_RUN_KEY, i, text, e);
        }
    }
}

fn result(json: &str) {
    channel::send_bytes(MessageKind::StepResult, json.as_bytes());
}

fn report_json(r: &ActivationReport) -> Result<String, Failure> {
    serde_json::to_string(r)
        .map_err(|e| Failure::Step(alloc::format!("cannot serialize the report: {e}")))
}

fn run_one(step: RunStep, s: &mut State, devices: &mut Devices) -> Result<(), Failure> {
    match step {
        RunStep::Start(StartOptions { mode, data_crc }) => {
            if s.active.is_some() {
                return Err(Failure::Step(
                    "a cache is already active (stop it first)".into(),
                ));
            }
            let opts = Options {
                mode: match mode {
                    StartMode::Strict => Mode::Strict,
                    StartMode::Recover => Mode::Recover,
                },
                data_crc,
            };
            let dev = devices.pmem().map_err(Failure::Device)?;
            let mut pmem = GuestPmem::new(dev);
            let activation = pcache::start(&mut pmem, &opts, &mut s.hooks);
            // A refusal is a result, not a failure: the next steps run.
            let json = report_json(&activation.report)?;
            s.active = activation.cache;
            s.last = Some(activation.report);
            result(&alloc::format!(r#"{{"step":"start","report":{json}}}"#));
        }
        RunStep::Stop => {
            let cache = s
                .active
                .take()
                .ok_or_else(|| Failure::Step("no cache is active".into()))?;
            let dev = devices.pmem().map_err(Failure::Device)?;
            let mut pmem = GuestPmem::new(dev);
            // The kernel ignores a failed close; the result says so.
            match pcache::deactivate(cache, &mut pmem, &mut s.hooks) {
                Ok(()) => result(r#"{"step":"stop"}"#),
                Err(e) => result(&alloc::format!(
                    r#"{{"step":"stop","error":{}}}"#,
                    serde_json::to_string(&e).unwrap_or_else(|_| "null".into())
                )),
            }
        }
        RunStep::Status => {
            let report = match &s.last {
                Some(r) => report_json(r)?,
                None => "null".into(),
            };
            result(&alloc::format!(
                r#"{{"step":"status","active":{},"report":{report}}}"#,
                s.active.is_some()
            ));
        }
        RunStep::Marker(id) => {
            channel::marker(id);
            result(&alloc::format!(r#"{{"step":"marker","id":{id}}}"#));
        }
        RunStep::Trace(on) => {
            channel::marker(if on {
                MARKER_TRACE_ON
            } else {
                MARKER_TRACE_OFF
            });
            result(&alloc::format!(r#"{{"step":"trace","on":{on}}}"#));
        }
        RunStep::Fault(f) => raise(f),
    }
    Ok(())
}

/// Raises the exception; ring 0's print path reports it and exits.
fn raise(f: Fault) -> ! {
    // SAFETY: each deliberately faults; the exception handler never returns here.
    unsafe {
        match f {
            Fault::PageFault => core::arch::asm!(
                "mov al, byte ptr [{a}]", a = in(reg) FAULT_PF_ADDRESS, out("al") _,
                options(nostack, readonly)
            ),
            Fault::GeneralProtection => core::arch::asm!(
                "mov al, byte ptr [{a}]", a = in(reg) FAULT_GP_ADDRESS, out("al") _,
                options(nostack, readonly)
            ),
            Fault::InvalidOpcode => core::arch::asm!("ud2", options(nostack, nomem)),
            Fault::DivideError => core::arch::asm!(
                "xor edx, edx", "div ecx",
                in("ecx") 0u32, inout("eax") 1u32 => _, out("edx") _,
                options(nostack, nomem)
            ),
        }
    }
    // Not reached: an exception ends the run. If the CPU did not raise it,
    // say so rather than continue.
    fatal(
        MessageKind::Error,
        ExitCode::StepFailed,
        format_args!("fault:{f:?} did not raise an exception"),
    )
}
