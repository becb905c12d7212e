//! Entry (CPL 0) and the switch to ring 3.
//!
//! The VMM enters `_start` in 64-bit mode with its own identity page tables,
//! a flat GDT, interrupts off and RSI pointing at the Linux zero page. Under
//! PVM every CPL-0 instruction is emulated (≈ 1 µs each), so ring 0 does only
//! what must be done there, in about 40 instructions and without a single
//! loop: enable SSE, load the pre-built GDT/TSS/IDT, switch to the pre-built
//! page tables, `iretq` to ring 3. Everything else, zeroing `.bss` included,
//! runs natively in ring 3.
//!
//! All of this file's CPL-0 code is in `.text.ring0`, which the build scans
//! (see `xtask/src/ring0_scan.rs`).

use crate::gdt::{TSS_SELECTOR, USER_CS, USER_DS};
use core::arch::global_asm;

/// Size of the ring-3 stack (the only stack Rust code runs on).
pub const USER_STACK_SIZE: usize = 1 << 20;
/// Size of the ring-0 stack: the `iretq` frame at boot and the exception stubs only.
pub const KERNEL_STACK_SIZE: usize = 4096;
/// The unmapped page below the ring-3 stack.
pub const GUARD_SIZE: usize = 4096;
/// Where the guard page is (linker.ld puts the stacks first, at KERNEL_START).
pub const STACK_GUARD: u64 = protocol::layout::KERNEL_START;
/// Where the ring-0 code starts, right after the stacks: the exception stubs
/// are there (linker.ld asserts the same number), so the IDT is constant.
pub const RING0_TEXT: u64 = STACK_GUARD + (GUARD_SIZE + USER_STACK_SIZE + KERNEL_STACK_SIZE) as u64;

// The guard must fall in the 4 KiB-paged first 2 MiB (paging.rs).
const _: () = assert!(STACK_GUARD + GUARD_SIZE as u64 <= 2 << 20);
const _: () = assert!(RING0_TEXT == 0x20_2000, "keep linker.ld's ASSERT in step");

// CR0.EM (bit 2) cleared, CR0.MP (bit 1) set; CR4.OSFXSR (bit 9) | CR4.OSXMMEXCPT (bit 10).
const CR0_EM: u64 = 1 << 2;
const CR0_MP: u64 = 1 << 1;
const CR4_SSE: u64 = (1 << 9) | (1 << 10);
/// RFLAGS for ring 3: only the always-one bit 1; IF = 0 (we poll), IOPL = 0
/// (port access comes from the TSS I/O bitmap, as PVM requires).
const USER_RFLAGS: u64 = 1 << 1;

global_asm!(
    ".pushsection .text.ring0, \"ax\"",
    ".global _start",
    "_start:",
    // The zero page travels to ring 3 in RDI, which nothing below touches.
    "    mov rdi, rsi",
    "    lea rsp, [rip + kernel_stack_top]",
    "    mov rax, cr0",
    "    and rax, {not_em}",
    "    or rax, {mp}",
    "    mov cr0, rax",
    "    mov rax, cr4",
    "    or rax, {cr4_sse}",
    "    mov cr4, rax",
    // The TSS base is the one address the GDT cannot hold as a link-time
    // constant (it is split into three fields); five stores put it there.
    "    lea rax, [rip + tss]",
    "    mov word ptr [rip + gdt + {tss_sel} + 2], ax",
    "    shr rax, 16",
    "    mov byte ptr [rip + gdt + {tss_sel} + 4], al",
    "    mov byte ptr [rip + gdt + {tss_sel} + 7], ah",
    "    shr rax, 16",
    "    mov dword ptr [rip + gdt + {tss_sel} + 8], eax",
    "    lgdt [rip + gdt_ptr]",
    "    mov ax, {tss_sel}",
    "    ltr ax",
    "    lidt [rip + idt_ptr]",
    "    lea rax, [rip + boot_pml4]",
    "    mov cr3, rax",
    // iretq loads CS and SS from our GDT and drops to CPL 3.
    "    push {user_ds}",
    "    lea rax, [rip + user_stack_top]",
    "    push rax",
    "    push {rflags}",
    "    push {user_cs}",
    "    lea rax, [rip + ring3_entry]",
    "    push rax",
    "    iretq",
    ".popsection",
    // Ring 3 from here on (ordinary .text, not scanned).
    ".pushsection .text.ring3_entry, \"ax\"",
    "ring3_entry:",
    // First act in ring 3: tell the VMM (it times boot to here).
    "    mov dx, {port_marker}",
    "    mov eax, {ring3_marker}",
    "    out dx, eax",
    "    mov r12, rdi",
    "    lea rdi, [rip + __bss_start]",
    "    lea rcx, [rip + __bss_end]",
    "    sub rcx, rdi",
    "    xor eax, eax",
    "    cld",
    "    rep stosb",
    // A known FPU/SSE state whatever the VMM set: x87 reset, MXCSR default (all masked).
    "    fninit",
    "    push 0x1f80",
    "    ldmxcsr [rsp]",
    "    pop rax",
    "    mov rdi, r12",
    "    call {main}",
    "    ud2",
    ".popsection",
    // Stacks, at KERNEL_START (linker.ld): a guard page the page tables leave
    // unmapped, so a ring-3 stack overflow faults (and is reported on the
    // kernel stack) instead of overwriting the image; not zeroed, not in the file.
    ".pushsection .stack, \"aw\", @nobits",
    ".balign 4096",
    ".global stack_guard",
    "stack_guard:",
    "    .skip {guard}",
    "user_stack:",
    "    .skip {ustack}",
    "user_stack_top:",
    "kernel_stack:",
    "    .skip {kstack}",
    ".global kernel_stack_top",
    "kernel_stack_top:",
    ".popsection",
    not_em = const !CR0_EM,
    mp = const CR0_MP,
    cr4_sse = const CR4_SSE,
    tss_sel = const TSS_SELECTOR,
    user_ds = const USER_DS,
    user_cs = const USER_CS,
    rflags = const USER_RFLAGS,
    guard = const GUARD_SIZE,
    kstack = const KERNEL_STACK_SIZE,
    ustack = const USER_STACK_SIZE,
    port_marker = const protocol::PORT_MARKER,
    ring3_marker = const protocol::MARKER_RING3_ENTERED,
    main = sym crate::kernel_main,
);
