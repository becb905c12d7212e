//! Runs the device-level test steps of `harness.test=` (grammar in
//! `guest-images/cmdline/src/steps.rs` and the README). The whole list is
//! parsed before the first step runs, so a malformed command has no side
//! effects.

use crate::channel::{self, fatal};
use crate::console;
use crate::virtio::blk::SECTOR;
use crate::virtio::Devices;
use alloc::vec::Vec;
use core::fmt::Display;
use guest_cmdline::Step;
use protocol::{ExitCode, MessageKind, CMDLINE_TEST_KEY};

/// The parsed steps, or exits with `BadCommand`.
pub fn parse(cmdline: &str) -> Vec<(&str, Step<'_>)> {
    let mut values = guest_cmdline::values(cmdline, CMDLINE_TEST_KEY);
    let Some(value) = values.next() else {
        return Vec::new();
    };
    if values.next().is_some() {
        bad_command(format_args!("{CMDLINE_TEST_KEY}= given more than once"));
    }
    guest_cmdline::steps_with_text(value)
        .map(|s| s.unwrap_or_else(|e| bad_command(format_args!("{CMDLINE_TEST_KEY}: {e}"))))
        .collect()
}

fn bad_command(args: core::fmt::Arguments<'_>) -> ! {
    fatal(MessageKind::Error, ExitCode::BadCommand, args)
}

/// Runs `steps` in order; the first failure ends the run.
pub fn run(steps: &[(&str, Step<'_>)], devices: &mut Devices) {
    for (i, (text, step)) in steps.iter().enumerate() {
        if let Err(e) = run_one(step, devices) {
            fail(CMDLINE_TEST_KEY, i, text, e);
        }
    }
}

/// Reports step `i` (0-based) of `key` as failed and exits: `DeviceError`
/// for a device that is missing or would not start, else `StepFailed`.
pub fn fail(key: &str, i: usize, text: &str, e: Failure) -> ! {
    let code = match e {
        Failure::Device(_) => ExitCode::DeviceError,
        Failure::Step(_) => ExitCode::StepFailed,
    };
    fatal(
        MessageKind::Error,
        code,
        format_args!("{key} step {} `{text}` failed: {e}", i + 1),
    )
}

/// A device that is missing or would not start, versus a step that ran and failed.
pub enum Failure {
    Device(crate::virtio::DeviceError),
    Step(alloc::string::String),
}

impl core::fmt::Display for Failure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Failure::Device(e) => write!(f, "{e}"),
            Failure::Step(s) => f.write_str(s),
        }
    }
}

fn failed(e: impl Display) -> Failure {
    Failure::Step(alloc::format!("{e}"))
}

fn run_one(step: &Step<'_>, devices: &mut Devices) -> Result<(), Failure> {
    match *step {
        Step::Console(text) => console::line(text),
        Step::Message(text) => channel::send_bytes(MessageKind::Text, text.as_bytes()),
        Step::PmemStore { offset, value } => {
            let pmem = devices.pmem().map_err(Failure::Device)?;
            pmem.store_u64(offset, value).map_err(failed)?;
        }
        Step::PmemFlush => {
            let pmem = devices.pmem().map_err(Failure::Device)?;
            pmem.flush().map_err(failed)?;
        }
        Step::BlkWrite { sector, byte } => {
            let blk = devices.blk().map_err(Failure::Device)?;
            blk.write_sectors(sector, &[byte; SECTOR]).map_err(failed)?;
        }
        Step::BlkRead { sector, byte } => {
            let blk = devices.blk().map_err(Failure::Device)?;
            let mut buf = [!byte; SECTOR];
            blk.read_sectors(sector, &mut buf).map_err(failed)?;
            if let Some(at) = buf.iter().position(|&b| b != byte) {
                return Err(Failure::Step(alloc::format!(
                    "sector {sector} byte {at} is {:#04x}, expected {byte:#04x}",
                    buf[at]
                )));
            }
        }
        Step::BlkFlush => {
            let blk = devices.blk().map_err(Failure::Device)?;
            blk.flush().map_err(failed)?;
        }
        Step::Marker(id) => channel::marker(id),
        Step::Spin => loop {
            core::hint::spin_loop();
        },
        Step::Touch(addr) => {
            // SAFETY: deliberately unchecked: an unmapped address must fault and be reported.
            let _ = unsafe { core::ptr::read_volatile(addr as *const u8) };
        }
    }
    Ok(())
}
