//! The IDT and the exception handlers (CPL 0).
//!
//! Every vector 0-31 reports an [`protocol::ExceptionReport`] (vector, error
//! code, RIP, CR2) through the message channel and ends the run with
//! [`protocol::ExitCode::Exception`]. The handlers are plain integer
//! assembly: no `core::fmt` (it emits `pxor`, which PVM's CPL-0 emulator
//! rejects), no Rust.
//!
//! The IDT is constant data: the stubs sit at `RING0_TEXT + 16 * vector`
//! (the linker script places them there and asserts it), so each gate's
//! address is known at compile time and no CPL-0 loop has to fill the table.
//! Vectors above 31 have no gate (the IDT limit covers 32): they would raise
//! #GP, which is reported.

use crate::boot::RING0_TEXT;
use crate::gdt::KERNEL_CS;
use core::arch::global_asm;
use protocol::{ExceptionReport, ExitCode, MessageHeader, MessageKind, PORT_EXIT, PORT_MESSAGE};

const VECTORS: u64 = 32;
const STUB_STRIDE: u64 = 16;
/// Interrupt gate, present, DPL 0.
const GATE_TYPE: u64 = 0x8e;

// The gates hold 32-bit offsets here (high half written as 0).
const _: () = assert!(RING0_TEXT + VECTORS * STUB_STRIDE < 1 << 32);
const _: () = assert!(MessageHeader::SIZE == 8 && ExceptionReport::SIZE == 32);

global_asm!(
    // Vectors that push an error code: 8, 10-14, 17, 21, 29, 30.
    ".macro isr_noerr vec",
    "    .balign 16",
    "    push 0",
    "    push \\vec",
    "    jmp isr_common",
    ".endm",
    ".macro isr_err vec",
    "    .balign 16",
    "    push \\vec",
    "    jmp isr_common",
    ".endm",
    ".pushsection .text.ring0.vectors, \"ax\"",
    ".global isr_stubs",
    "isr_stubs:",
    "isr_noerr 0", "isr_noerr 1", "isr_noerr 2", "isr_noerr 3",
    "isr_noerr 4", "isr_noerr 5", "isr_noerr 6", "isr_noerr 7",
    "isr_err 8", "isr_noerr 9", "isr_err 10", "isr_err 11",
    "isr_err 12", "isr_err 13", "isr_err 14", "isr_noerr 15",
    "isr_noerr 16", "isr_err 17", "isr_noerr 18", "isr_noerr 19",
    "isr_noerr 20", "isr_err 21", "isr_noerr 22", "isr_noerr 23",
    "isr_noerr 24", "isr_noerr 25", "isr_noerr 26", "isr_noerr 27",
    "isr_noerr 28", "isr_err 29", "isr_err 30", "isr_noerr 31",
    ".balign 16",
    ".global isr_stubs_end",
    "isr_stubs_end:",
    ".popsection",
    // Stack here: vector, error code, then the CPU's frame (RIP first).
    ".pushsection .text.ring0, \"ax\"",
    "isr_common:",
    "    mov rax, [rsp]",
    "    mov [rip + exception_message + 8], rax",
    "    mov rax, [rsp + 8]",
    "    mov [rip + exception_message + 16], rax",
    "    mov rax, [rsp + 16]",
    "    mov [rip + exception_message + 24], rax",
    // CR2 means something only for #PF; report 0 otherwise, not a stale value.
    "    xor eax, eax",
    "    cmp qword ptr [rsp], 14",
    "    jne 2f",
    "    mov rax, cr2",
    "2:  mov [rip + exception_message + 32], rax",
    "    lea rax, [rip + exception_message]",
    "    mov dx, {port_message}",
    "    out dx, eax",
    "    mov eax, {exit_exception}",
    "    mov dx, {port_exit}",
    "    out dx, eax",
    // The VMM ends the run at the exit write; never return to the faulting code.
    "3:  hlt",
    "    jmp 3b",
    ".popsection",
    ".pushsection .data.ring0, \"aw\"",
    ".balign 8",
    "exception_message:",
    "    .long {kind_exception}",
    "    .long {report_size}",
    "    .fill 4, 8, 0",
    ".balign 16",
    "idt:",
    ".set vec, 0",
    ".rept {vectors}",
    "    .short ({base} + vec * {stride}) & 0xffff",
    "    .short {kcs}",
    "    .byte 0",
    "    .byte {gate}",
    "    .short (({base} + vec * {stride}) >> 16) & 0xffff",
    "    .long 0",
    "    .long 0",
    "    .set vec, vec + 1",
    ".endr",
    ".balign 8",
    "    .short 0",
    "    .short 0",
    "    .short 0",
    ".global idt_ptr",
    "idt_ptr:",
    "    .short {vectors} * 16 - 1",
    "    .quad idt",
    ".popsection",
    port_message = const PORT_MESSAGE,
    port_exit = const PORT_EXIT,
    exit_exception = const ExitCode::Exception as u32,
    kind_exception = const MessageKind::Exception as u32,
    report_size = const ExceptionReport::SIZE,
    vectors = const VECTORS,
    base = const RING0_TEXT,
    stride = const STUB_STRIDE,
    kcs = const KERNEL_CS,
    gate = const GATE_TYPE,
);
