//! The GDT and the TSS, as pre-built data.
//!
//! Selectors follow Linux's x86-64 layout (kernel CS 0x10, user DS 0x2b, user
//! CS 0x33): PVM runs ring 3 on the host's own segments and shows CS 0x33 to the
//! guest, so the same numbers keep what the guest sees and what it loaded equal.
//!
//! The TSS gives RSP0 (the stack exceptions from ring 3 land on) and an I/O
//! permission bitmap that opens every port to ring 3: on PVM `IOPL=3` does not
//! allow port I/O at CPL 3, the bitmap does (base 104, 8 KiB of zero bits, a
//! closing 0xff byte, limit 104 + 8192).

use core::arch::global_asm;

pub const KERNEL_CS: u16 = 0x10;
pub const USER_DS: u16 = 0x28 | 3;
pub const USER_CS: u16 = 0x30 | 3;
pub const TSS_SELECTOR: u16 = 0x40;

const TSS_HEADER: u64 = 104;
const IO_BITMAP_BYTES: u64 = 8192;
/// Limit = offset of the last byte (the closing 0xff of the bitmap).
const TSS_LIMIT: u64 = TSS_HEADER + IO_BITMAP_BYTES;
/// Low quadword of the TSS descriptor without its base (filled in at boot):
/// limit[15:0], type 9 (available 64-bit TSS), present.
const TSS_DESC_LOW: u64 = (TSS_LIMIT & 0xffff) | (0x89 << 40) | ((TSS_LIMIT >> 16) << 48);

const _: () = assert!(TSS_LIMIT < 1 << 20);

global_asm!(
    ".pushsection .data.ring0, \"aw\"",
    ".balign 16",
    ".global gdt",
    "gdt:",
    "    .quad 0",
    "    .quad 0",                  // 0x08: Linux's 32-bit kernel CS, unused
    "    .quad 0x00af9b000000ffff", // 0x10: kernel code, 64-bit
    "    .quad 0x00cf93000000ffff", // 0x18: kernel data
    "    .quad 0",                  // 0x20: Linux's 32-bit user CS, unused
    "    .quad 0x00cff3000000ffff", // 0x28: user data, DPL 3
    "    .quad 0x00affb000000ffff", // 0x30: user code, 64-bit, DPL 3
    "    .quad 0",
    "    .quad {tss_low}", // 0x40: TSS (base patched by _start)
    "    .quad 0",
    "gdt_end:",
    ".balign 8",
    "    .short 0",
    "    .short 0",
    "    .short 0",
    ".global gdt_ptr",
    "gdt_ptr:",
    "    .short gdt_end - gdt - 1",
    "    .quad gdt",
    ".balign 16",
    ".global tss",
    "tss:",
    "    .long 0",
    "    .quad kernel_stack_top", // RSP0
    "    .quad 0",                // RSP1
    "    .quad 0",                // RSP2
    "    .quad 0",
    "    .fill 7, 8, 0", // IST1-7
    "    .quad 0",
    "    .short 0",
    "    .short {iomap}", // I/O map base
    "    .fill {iobytes}, 1, 0",
    "    .byte 0xff",
    ".popsection",
    tss_low = const TSS_DESC_LOW,
    iomap = const TSS_HEADER,
    iobytes = const IO_BITMAP_BYTES,
);
