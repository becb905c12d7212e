//! The guest kernel: a freestanding `no_std` kernel entered through the Linux
//! 64-bit boot protocol, carrying the pcache module. Ring 0 only sets up (see
//! `boot.rs`); everything else, pcache included, runs in ring 3 and polls its
//! devices.
//! See `guest-images/README.md` for the boot flow and the command line.
#![no_std]
#![no_main]

extern crate alloc;

mod backends;
mod backing;
mod boot;
mod bootparams;
mod channel;
mod console;
mod gdt;
mod heap;
mod idt;
mod paging;
mod pcache_run;
mod rt;
mod steps;
mod virtio;

use bootparams::BootParams;
use channel::{exit, fatal};
use core::fmt::Display;
use protocol::{
    ExitCode, MessageKind, CMDLINE_CONSOLE_FLAG, CMDLINE_SNAPSHOT_FLAG, MARKER_SNAPSHOT,
};

/// Ring 3's Rust entry, called by `ring3_entry` (boot.rs) with the zero page address.
extern "C" fn kernel_main(zero_page: u64) -> ! {
    let boot = or_exit(BootParams::new(zero_page), ExitCode::DeviceError);
    let cmdline = or_exit(boot.cmdline(), ExitCode::BadCommand);
    console::set_echo(guest_cmdline::flag(cmdline, CMDLINE_CONSOLE_FLAG));
    let e820 = or_exit(boot.e820(), ExitCode::DeviceError);
    or_exit(heap::init(e820), ExitCode::DeviceError);
    let mut devices = or_exit(virtio::Devices::from_cmdline(cmdline), ExitCode::BadCommand);
    // Every step of both keys is parsed before the first one runs.
    let steps = steps::parse(cmdline);
    let plan = pcache_run::parse(cmdline);
    pcache_run::parse_fences(cmdline);
    if guest_cmdline::flag(cmdline, CMDLINE_SNAPSHOT_FLAG) {
        // The VMM's fork-server snapshots here and resumes once per crash
        // state with that state's images: start both drivers now (their
        // exits are paid once, not per state), then say where we are.
        // Nothing after this point has read a device's data yet.
        or_exit(devices.pmem_and_blk(), ExitCode::DeviceError);
        channel::marker(MARKER_SNAPSHOT);
    }
    steps::run(&steps, &mut devices);
    pcache_run::run(&plan, &mut devices);
    exit(ExitCode::Success)
}

/// The value, or an `Error` message and exit `code`.
fn or_exit<T, E: Display>(r: Result<T, E>, code: ExitCode) -> T {
    r.unwrap_or_else(|e| fatal(MessageKind::Error, code, format_args!("{e}")))
}
