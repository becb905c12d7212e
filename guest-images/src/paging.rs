//! The page tables, pre-built as data in the image.
//!
//! Building them at run time would cost ≈ 768 emulated CPL-0 stores (6-8 ms
//! on PVM); as data they cost nothing but the ELF load. One `mov cr3` in
//! `_start` switches to them. 2 MiB pages throughout (PVM faults on 1 GiB
//! pages), every leaf with the User bit, since everything runs in ring 3.
//!
//! | virtual = physical | mapping |
//! |---|---|
//! | 0 .. 4 KiB | **not mapped**, so null-pointer accesses fault |
//! | 4 KiB .. 2 MiB | 4 KiB pages (zero page, command line, kernel start), except the ring-3 stack's guard page (`boot::STACK_GUARD`), **not mapped** |
//! | 2 MiB .. `RAM_MAX` (3 GiB) | RAM, write-back |
//! | `VIRTIO_MMIO_BASE` .. + 2 MiB | the virtio-mmio windows, cache-disabled |
//! | `PMEM_START` .. + `PMEM_MAX_SIZE` | the pmem region, write-back |
//! | anything else | not mapped: an access page-faults and is reported |
//!
//! RAM is mapped up to `RAM_MAX` whatever the VMM's RAM size: an access past
//! the end of real RAM becomes an MMIO exit in the VMM rather than a fault.

use core::arch::global_asm;
use protocol::layout::{
    PAGE_2M, PMEM_MAX_SIZE, PMEM_START, RAM_MAX, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
    VIRTIO_MMIO_SLOTS,
};

const GIB: u64 = 1 << 30;
const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;

/// Non-leaf entries.
const TABLE: u64 = PRESENT | WRITABLE | USER;
/// 4 KiB leaves.
const PAGE_4K: u64 = PRESENT | WRITABLE | USER;
/// 2 MiB leaves of RAM and pmem.
const PAGE_RAM: u64 = PRESENT | WRITABLE | USER | HUGE;
/// 2 MiB leaf of device registers.
const PAGE_MMIO: u64 = PAGE_RAM | WRITE_THROUGH | CACHE_DISABLE;

const RAM_GIB: u64 = RAM_MAX / GIB;
const PMEM_GIB: u64 = PMEM_MAX_SIZE / GIB;
const PMEM_FIRST_GIB: u64 = PMEM_START / GIB;
const MMIO_GIB: u64 = VIRTIO_MMIO_BASE / GIB;
/// Index of the virtio window's 2 MiB page within its GiB.
const MMIO_PD_INDEX: u64 = (VIRTIO_MMIO_BASE % GIB) / PAGE_2M;

// The layout these tables assume; a protocol change that breaks it fails the build.
const _: () = {
    assert!(RAM_MAX.is_multiple_of(GIB) && RAM_GIB >= 1);
    assert!(
        MMIO_GIB == RAM_GIB,
        "virtio windows in the GiB right after RAM"
    );
    assert!(VIRTIO_MMIO_BASE.is_multiple_of(PAGE_2M));
    assert!(VIRTIO_MMIO_SLOTS * VIRTIO_MMIO_SIZE <= PAGE_2M);
    assert!(PMEM_START.is_multiple_of(GIB) && PMEM_MAX_SIZE.is_multiple_of(GIB));
    assert!(PMEM_FIRST_GIB > MMIO_GIB);
    // One PML4 entry (512 GiB) covers everything.
    assert!(PMEM_FIRST_GIB + PMEM_GIB <= 512);
};

global_asm!(
    ".pushsection .data.pagetables, \"aw\"",
    ".balign 4096",
    ".global boot_pml4",
    "boot_pml4:",
    "    .quad pdpt + {table}",
    "    .fill 511, 8, 0",
    "pdpt:",
    ".set i, 0",
    ".rept {ram_gib}",
    "    .quad pd_ram + i * 4096 + {table}",
    ".set i, i + 1",
    ".endr",
    "    .quad pd_mmio + {table}",
    "    .fill {pmem_first} - {ram_gib} - 1, 8, 0",
    ".set i, 0",
    ".rept {pmem_gib}",
    "    .quad pd_pmem + i * 4096 + {table}",
    ".set i, i + 1",
    ".endr",
    "    .fill 512 - {pmem_first} - {pmem_gib}, 8, 0",
    // First 2 MiB in 4 KiB pages; page 0 and the stack guard left out.
    "pt_low:",
    "    .quad 0",
    ".set i, 1",
    ".rept 511",
    ".if i == {guard_page}",
    "    .quad 0",
    ".else",
    "    .quad i * 4096 + {page_4k}",
    ".endif",
    ".set i, i + 1",
    ".endr",
    "pd_ram:",
    "    .quad pt_low + {table}",
    ".set i, 1",
    ".rept {ram_gib} * 512 - 1",
    "    .quad i * {page_2m} + {page_ram}",
    ".set i, i + 1",
    ".endr",
    "pd_mmio:",
    "    .fill {mmio_index}, 8, 0",
    "    .quad {mmio_base} + {page_mmio}",
    "    .fill 511 - {mmio_index}, 8, 0",
    "pd_pmem:",
    ".set i, 0",
    ".rept {pmem_gib} * 512",
    "    .quad {pmem_start} + i * {page_2m} + {page_ram}",
    ".set i, i + 1",
    ".endr",
    ".popsection",
    table = const TABLE,
    page_4k = const PAGE_4K,
    page_ram = const PAGE_RAM,
    page_mmio = const PAGE_MMIO,
    page_2m = const PAGE_2M,
    ram_gib = const RAM_GIB,
    pmem_gib = const PMEM_GIB,
    pmem_first = const PMEM_FIRST_GIB,
    pmem_start = const PMEM_START,
    mmio_index = const MMIO_PD_INDEX,
    mmio_base = const VIRTIO_MMIO_BASE,
    guard_page = const crate::boot::STACK_GUARD / 4096,
);
