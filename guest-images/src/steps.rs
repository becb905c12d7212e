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

/// `mark`'s word in `.bss`.
static MARK: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// `mark`'s RAM word outside the image and below any heap use (96 MiB:
/// the default RAM is 128 MiB).
const MARK_RAM: u64 = 0x600_0000;
const MARK_PMEM: u64 = 0x1000;
const MARK_SECTOR: u64 = 1;
const MARK_VALUE: u64 = 0x6d61_726b;

/// Checks that no earlier run left its mark (RAM, pmem, disk), then leaves one.
fn mark(devices: &mut Devices) -> Result<(), Failure> {
    use core::sync::atomic::Ordering;
    let seen = |what: &str, v: u64| {
        Failure::Step(alloc::format!(
            "mark: {what} holds {v:#x}, left by an earlier run"
        ))
    };
    let v = MARK.load(Ordering::Relaxed);
    if v != 0 {
        return Err(seen("the .bss word", v));
    }
    let ram = MARK_RAM as *mut u64;
    // SAFETY: identity-mapped RAM that nothing else uses (see MARK_RAM).
    let v = unsafe { ram.read_volatile() };
    if v != 0 {
        return Err(seen("the RAM word", v));
    }
    let pmem = devices.pmem().map_err(Failure::Device)?;
    // SAFETY: inside the mapped region (the device checked its size >= 512 MiB).
    let v = unsafe {
        pmem.base()
            .add(MARK_PMEM as usize)
            .cast::<u64>()
            .read_volatile()
    };
    if v != 0 {
        return Err(seen("the pmem word", v));
    }
    let blk = devices.blk().map_err(Failure::Device)?;
    let mut buf = [0u8; SECTOR];
    blk.read_sectors(MARK_SECTOR, &mut buf).map_err(failed)?;
    if let Some(&b) = buf.iter().find(|&&b| b != 0) {
        return Err(seen("the disk sector", b.into()));
    }
    MARK.store(MARK_VALUE, Ordering::Relaxed);
    // SAFETY: as above.
    unsafe { ram.write_volatile(MARK_VALUE) };
    blk.write_sectors(MARK_SECTOR, &[0x6d; SECTOR])
        .map_err(failed)?;
    blk.flush().map_err(failed)?;
    let pmem = devices.pmem().map_err(Failure::Device)?;
    pmem.store_u64(MARK_PMEM, MARK_VALUE).map_err(failed)?;
    pmem.flush().map_err(failed)?;
    Ok(())
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
        Step::Mark => mark(devices)?,
        Step::DiskFault { sector } => {
            let blk = devices.blk().map_err(Failure::Device)?;
            let mut buf = [0u8; SECTOR];
            blk.read_sectors(sector, &mut buf).map_err(failed)?;
            match buf[0] {
                0 => {}
                1 => {
                    // SAFETY: deliberately unmapped: the fault is the point.
                    let _ = unsafe {
                        core::ptr::read_volatile(crate::pcache_run::FAULT_PF_ADDRESS as *const u8)
                    };
                }
                2 => loop {
                    core::hint::spin_loop();
                },
                3 => panic!("disk-fault: sector {sector} asks for a panic"),
                b => {
                    return Err(Failure::Step(alloc::format!(
                        "disk-fault: unknown byte {b}"
                    )))
                }
            }
        }
        Step::Touch(addr) => {
            // SAFETY: deliberately unchecked: an unmapped address must fault and be reported.
            let _ = unsafe { core::ptr::read_volatile(addr as *const u8) };
        }
    }
    Ok(())
}
