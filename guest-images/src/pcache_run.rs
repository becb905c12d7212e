//! Runs the pcache steps of `pcache.run=` (grammar in
//! `guest-images/cmdline/src/run.rs` and the README): activation,
//! deactivation, status, the data path (write, read, flush, close-ksets,
//! generated workloads, verify), markers, trace control, test faults. Each
//! step sends one `StepResult` message (JSON); every workload op (a write, a
//! flush, a close-ksets, each op of a `gen`) also writes the marker
//! `op_done(k)` when it completes (unless `pcache.markers=off`), k counting ops from 0 in the order
//! `guest_cmdline::ops_of_steps` lists them, so the host knows which writes
//! were acknowledged before a power cut. The whole list is parsed before the
//! first step runs, so a malformed command has no side effects.

use crate::backends::{GuestPmem, MarkerHooks};
use crate::backing::GuestBacking;
use crate::channel::{self, fatal};
use crate::steps::{fail, Failure};
use crate::virtio::Devices;
use alloc::string::String;
use alloc::vec::Vec;
use guest_cmdline::{Fault, RunStep, StartMode, StartOptions};
use pcache::cache_req::IoError;
use pcache::{ActivationReport, Cache, Mode, Options};
use protocol::{
    ExitCode, MessageKind, CMDLINE_FENCES_KEY, CMDLINE_MARKERS_KEY, CMDLINE_RUN_KEY,
    MARKER_TRACE_OFF, MARKER_TRACE_ON,
};
use workload::Op;

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

/// Parses `pcache.fences` (at most once, `flush` or `cpu`) and switches the
/// fences accordingly (see `backends::set_cpu_fences`), or exits with
/// `BadCommand`.
pub fn parse_fences(cmdline: &str) {
    let mut values = guest_cmdline::values(cmdline, CMDLINE_FENCES_KEY);
    let Some(v) = values.next() else { return };
    if values.next().is_some() {
        bad_command(format_args!("{CMDLINE_FENCES_KEY}= given more than once"));
    }
    let cpu = match v {
        "flush" => false,
        "cpu" => true,
        _ => bad_command(format_args!(
            "{CMDLINE_FENCES_KEY}=`{v}`: expected `flush` or `cpu`"
        )),
    };
    crate::backends::set_cpu_fences(cpu);
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
    /// Workload ops completed so far (the next op-done marker's number).
    ops_done: u32,
}

/// Runs the steps in order; the first failure ends the run.
pub fn run(plan: &Plan<'_>, devices: &mut Devices) {
    let mut state = State {
        active: None,
        last: None,
        hooks: MarkerHooks { on: plan.markers },
        ops_done: 0,
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
            let (dev, blk) = devices.pmem_and_blk().map_err(Failure::Device)?;
            let mut pmem = GuestPmem::new(dev);
            let mut backing = GuestBacking(blk);
            // The kernel ignores a failed close or disk flush; the result says so.
            match pcache::deactivate(cache, &mut pmem, &mut backing, &mut s.hooks) {
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
            // The target's `dmsetup status` line as it is now (the report's
            // is the one at activation).
            let sb_flags = match s.last.as_ref().and_then(|r| r.superblock) {
                Some(pcache::SbState::Valid { flags, .. }) => flags,
                _ => 0,
            };
            let status = match &s.active {
                Some(c) => serde_json::to_string(&c.status_line(sb_flags))
                    .map_err(|e| Failure::Step(alloc::format!("cannot serialize: {e}")))?,
                None => "null".into(),
            };
            result(&alloc::format!(
                r#"{{"step":"status","active":{},"dm_status":{status},"report":{report}}}"#,
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
        RunStep::Write { .. } | RunStep::Flush | RunStep::CloseKsets => {
            for op in step.ops() {
                run_op(op, s, devices)?;
            }
            let op = step_name(&step);
            result(&alloc::format!(
                r#"{{"step":"{op}","ops_done":{}}}"#,
                s.ops_done
            ));
        }
        RunStep::Generate(spec) => {
            let ops = workload::generate(&spec);
            for op in &ops {
                run_op(*op, s, devices)?;
            }
            result(&alloc::format!(
                r#"{{"step":"gen","ops":{},"ops_done":{}}}"#,
                ops.len(),
                s.ops_done
            ));
        }
        RunStep::Read { off, len } => {
            let mut buf = alloc::vec![0u8; len as usize];
            read(s, devices, off, &mut buf)?;
            result(&alloc::format!(
                r#"{{"step":"read","off":{off},"len":{len},"digest":"{:#018x}"}}"#,
                workload::digest(&buf)
            ));
        }
        RunStep::Verify { off, len } => {
            // In 1 MiB pieces: the heap need not hold the whole range.
            const PIECE: u64 = 1 << 20;
            let mut runs: Vec<workload::TagRun> = Vec::new();
            // No bigger than the range: a zeroed buffer is RAM the VMM's
            // fork-server puts back after every recovery boot.
            let mut buf = alloc::vec![0u8; PIECE.min(len as u64) as usize];
            let end = off + len as u64;
            let mut at = off;
            while at < end {
                let n = (end - at).min(PIECE) as usize;
                read(s, devices, at, &mut buf[..n])?;
                for r in workload::classify_range(at, &buf[..n]) {
                    match runs.last_mut() {
                        Some(l) if l.tag == r.tag && l.sector + l.count == r.sector => {
                            l.count += r.count
                        }
                        _ => runs.push(r),
                    }
                }
                at += n as u64;
            }
            let runs = serde_json::to_string(&runs)
                .map_err(|e| Failure::Step(alloc::format!("cannot serialize: {e}")))?;
            result(&alloc::format!(
                r#"{{"step":"verify","off":{off},"len":{len},"runs":{runs}}}"#
            ));
        }
        RunStep::Writeback | RunStep::Gc | RunStep::Idle => {
            let cache = s
                .active
                .as_mut()
                .ok_or_else(|| Failure::Step("no cache is active".into()))?;
            let (dev, blk) = devices.pmem_and_blk().map_err(Failure::Device)?;
            let mut pmem = GuestPmem::new(dev);
            let mut backing = GuestBacking(blk);
            let json = match step {
                RunStep::Writeback => {
                    let steps = cache
                        .writeback_all(&mut pmem, &mut backing, &mut s.hooks)
                        .map_err(io_failed)?;
                    list_json("writeback", &steps)?
                }
                RunStep::Gc => {
                    let steps = cache.gc_all(&mut pmem, &mut s.hooks).map_err(io_failed)?;
                    list_json("gc", &steps)?
                }
                _ => {
                    let idle = cache
                        .idle(&mut pmem, &mut backing, &mut s.hooks)
                        .map_err(io_failed)?;
                    to_json("idle", &idle)?
                }
            };
            result(&json);
        }
        RunStep::GcPercent(n) => {
            let cache = s
                .active
                .as_mut()
                .ok_or_else(|| Failure::Step("no cache is active".into()))?;
            let dev = devices.pmem().map_err(Failure::Device)?;
            cache
                .set_gc_percent(&mut GuestPmem::new(dev), &mut s.hooks, n.into())
                .map_err(|e| Failure::Step(alloc::format!("{e}")))?;
            result(&alloc::format!(r#"{{"step":"gc-percent","percent":{n}}}"#));
        }
    }
    Ok(())
}

/// `{"step":NAME,"result":…}`.
fn to_json(name: &str, v: &impl serde::Serialize) -> Result<String, Failure> {
    let v = serde_json::to_string(v)
        .map_err(|e| Failure::Step(alloc::format!("cannot serialize: {e}")))?;
    Ok(alloc::format!(r#"{{"step":"{name}","result":{v}}}"#))
}

/// A step's list of results, or its length alone when the list is longer
/// than one message holds (the channel would cut it: GC over a log segment
/// of one-key sets is 200,000 entries).
fn list_json<T: serde::Serialize>(name: &str, v: &[T]) -> Result<String, Failure> {
    let json = to_json(name, &v)?;
    if json.len() <= protocol::MESSAGE_MAX_LEN as usize {
        return Ok(json);
    }
    Ok(alloc::format!(r#"{{"step":"{name}","count":{}}}"#, v.len()))
}

fn step_name(step: &RunStep) -> &'static str {
    match step {
        RunStep::Write { .. } => "write",
        RunStep::Flush => "flush",
        _ => "close-ksets",
    }
}

fn io_failed(e: IoError) -> Failure {
    Failure::Step(alloc::format!("{e}"))
}

/// One workload op through the module, then its op-done marker.
fn run_op(op: Op, s: &mut State, devices: &mut Devices) -> Result<(), Failure> {
    let cache = s
        .active
        .as_mut()
        .ok_or_else(|| Failure::Step("no cache is active".into()))?;
    match op {
        Op::Write { off, len, id, fua } => {
            let mut data = alloc::vec![0u8; len as usize];
            workload::fill(id, off, &mut data);
            let (dev, blk) = devices.pmem_and_blk().map_err(Failure::Device)?;
            let backing = GuestBacking(blk);
            let mut pmem = GuestPmem::new(dev);
            cache
                .write(&mut pmem, &backing, &mut s.hooks, off, &data, fua)
                .map_err(io_failed)?;
        }
        Op::Flush => {
            let dev = devices.pmem().map_err(Failure::Device)?;
            cache
                .flush(&mut GuestPmem::new(dev), &mut s.hooks)
                .map_err(io_failed)?;
        }
        Op::CloseKsets => {
            let dev = devices.pmem().map_err(Failure::Device)?;
            cache
                .close_kset(&mut GuestPmem::new(dev), &mut s.hooks)
                .map_err(|e| io_failed(e.into()))?;
        }
    }
    // Like the crash-point markers, switched off by `pcache.markers=off`
    // (recovery boots and benchmarks, where nobody cuts power).
    if s.hooks.on {
        channel::marker(protocol::markers::op_done(s.ops_done));
    }
    s.ops_done += 1;
    Ok(())
}

/// A read through the module.
fn read(s: &mut State, devices: &mut Devices, off: u64, buf: &mut [u8]) -> Result<(), Failure> {
    let cache = s
        .active
        .as_mut()
        .ok_or_else(|| Failure::Step("no cache is active".into()))?;
    let (dev, blk) = devices.pmem_and_blk().map_err(Failure::Device)?;
    let mut backing = GuestBacking(blk);
    cache
        .read(
            &mut GuestPmem::new(dev),
            &mut backing,
            &mut s.hooks,
            off,
            buf,
        )
        .map_err(io_failed)
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
