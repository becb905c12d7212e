//! The guest kernel (skeleton): enters through the Linux 64-bit boot protocol
//! and reports success on the protocol's exit port. The VMM issue grows this
//! into the real skeleton (ring-0 setup, ring 3, drivers).
#![no_std]
#![no_main]

use core::arch::global_asm;

global_asm!(
    ".section .text.boot, \"ax\"",
    ".global _start",
    "_start:",
    "    mov dx, {exit_port}",
    "    mov eax, {success}",
    "    out dx, eax",
    "2:  hlt",
    "    jmp 2b",
    exit_port = const protocol::PORT_EXIT,
    success = const protocol::ExitCode::Success as u32,
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The precompiled libcore references this symbol even with `panic = "abort"`.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
