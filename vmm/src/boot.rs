//! Boot: loads the kernel, writes the zero page and the command line, and
//! puts the vCPU in 64-bit long mode as the Linux 64-bit boot protocol expects.
//!
//! Layout (Firecracker's): GDT at 0x500, IDT at 0x520, page tables at
//! 0x9000 (PML4), 0xa000 (PDPT), 0xb000.. (one page directory per GiB), boot
//! stack below 0x8ff0, zero page and command line where `protocol::layout` says.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, CpuId};
use kvm_ioctls::VcpuFd;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, Elf, KernelLoader};
use protocol::layout;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Errors while preparing the guest for its first instruction.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {path}: {source}")]
    KernelOpen {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel {0} does not exist (the project's guest kernel is built by `cargo xtask build-guest` into target/guest/pcache-guest)")]
    KernelMissing(String),
    #[error("kernel {0} is not an ELF file (the VMM boots 64-bit ELF kernels; build the guest with `cargo xtask build-guest`)")]
    NotElf(String),
    #[error("loading kernel {path}: {source}")]
    Load {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("kernel command line {text:?}: {source}")]
    CmdlineText {
        text: String,
        source: linux_loader::cmdline::Error,
    },
    #[error("writing the kernel command line into guest memory: {0}")]
    CmdlineLoad(linux_loader::loader::Error),
    #[error("writing the zero page: {0}")]
    ZeroPage(#[from] linux_loader::configurator::Error),
    #[error("bzImage without a setup header")]
    NoSetupHeader,
    #[error("writing boot structures into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("setting up vCPU registers: {0}")]
    Vcpu(#[from] kvm_ioctls::Error),
    #[error("guest RAM of {0} MiB is too small to boot (at least 4 MiB)")]
    RamTooSmall(u64),
}

const GDT_ADDR: u64 = 0x500;
const IDT_ADDR: u64 = 0x520;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// The boot page tables identity-map the first 5 GiB: RAM, the virtio-mmio
/// hole and the first GiB of the pmem region (the page directories fill
/// 0xb000..0x10000, below the command line).
const IDENTITY_GIB: u64 = 5;
const BOOT_STACK: u64 = 0x8ff0;
/// Start of the legacy EBDA/VGA/BIOS hole kept out of the e820 map.
const EBDA_START: u64 = 0x9fc00;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const E820_RAM: u32 = 1;

/// Where the loaded kernel starts executing.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: GuestAddress,
    pub end: u64,
}

/// Checks that `path` exists and starts with the ELF magic, so that a wrong
/// path fails before any VM is made, with an error that says what to do.
pub fn check_kernel(path: &Path) -> Result<(), BootError> {
    let shown = path.display().to_string();
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BootError::KernelMissing(shown))
        }
        Err(source) => {
            return Err(BootError::KernelOpen {
                path: shown,
                source,
            })
        }
    };
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_err() || magic != *b"\x7fELF" {
        return Err(BootError::NotElf(shown));
    }
    Ok(())
}

/// Loads a 64-bit ELF kernel into guest RAM. The file is checked for the ELF
/// magic first so that the error says what is wrong.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    check_kernel(path)?;
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::KernelOpen {
        path: shown.clone(),
        source,
    })?;
    let res = Elf::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::KERNEL_START)),
    )
    .map_err(|source| BootError::Load {
        path: shown,
        source,
    })?;
    Ok(LoadedKernel {
        entry: res.kernel_load,
        end: res.kernel_end,
    })
}

/// Builds the kernel command line: the caller's text plus one
/// `virtio_mmio.device=` entry per device `(size, base, irq)`.
pub fn build_cmdline(extra: &str, devices: &[(u64, u64, u32)]) -> Result<Cmdline, BootError> {
    let mut cl = Cmdline::new(layout::CMDLINE_MAX)?;
    let extra = extra.trim();
    if !extra.is_empty() {
        cl.insert_str(extra)
            .map_err(|source| BootError::CmdlineText {
                text: extra.to_string(),
                source,
            })?;
    }
    for &(size, base, irq) in devices {
        cl.add_virtio_mmio_device(size, GuestAddress(base), irq, None)?;
    }
    Ok(cl)
}

/// The e820 map: RAM below the EBDA and from 1 MiB to the end of RAM. Device
/// windows (virtio-mmio, pmem) are not RAM and are left out.
pub fn e820_map(ram_size: u64) -> Vec<(u64, u64)> {
    vec![
        (0, EBDA_START),
        (layout::KERNEL_START, ram_size - layout::KERNEL_START),
    ]
}

/// Writes the command line and the zero page.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    cmdline: &Cmdline,
    ram_size: u64,
) -> Result<(), BootError> {
    if ram_size < (4 << 20) {
        return Err(BootError::RamTooSmall(ram_size >> 20));
    }
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline)
        .map_err(BootError::CmdlineLoad)?;
    let len = cmdline.as_cstring()?.as_bytes().len();

    let mut params = boot_params::default();
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x0100_0000;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = len as u32;
    let map = e820_map(ram_size);
    for (i, (addr, size)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE)),
        mem,
    )
    .map_err(BootError::ZeroPage)
}

/// A GDT entry from flags, base and limit (the kernel's `GDT_ENTRY` macro).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and identity page tables (2 MiB pages) and
/// puts the vCPU in long mode at `entry` with RSI = zero page.
pub fn setup_vcpu(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    cpuid: &CpuId,
    entry: GuestAddress,
) -> Result<(), BootError> {
    vcpu.set_cpuid2(cpuid)?;

    let gdt = [
        gdt_entry(0, 0, 0),            // null
        gdt_entry(0xa09b, 0, 0xfffff), // code, 64-bit
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;

    // PML4[0] -> PDPT; PDPT[i] -> PD i; PD i maps GiB i with 2 MiB pages.
    const _: () = assert!(PD_ADDR + IDENTITY_GIB * 4096 <= layout::CMDLINE_START);
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))?;
    let mut pd = vec![0u8; 4096 * IDENTITY_GIB as usize];
    for i in 0..IDENTITY_GIB {
        let pd_i = PD_ADDR + i * 4096;
        mem.write_obj(pd_i | 0x3, GuestAddress(PDPT_ADDR + i * 8))?;
    }
    for (j, chunk) in pd.chunks_exact_mut(8).enumerate() {
        // present | writable | page size (2 MiB)
        let v = ((j as u64) << 21) | 0x83;
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PD_ADDR))?;

    let mut sregs: kvm_sregs = vcpu.get_sregs()?;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    let tss = segment(gdt[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: layout::ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs)?;
    Ok(())
}

/// What a bzImage's setup header says (checked by the unit test; later Linux
/// guests would boot from it, which is impractical on PVM hosts).
pub fn bzimage_header(
    image: &[u8],
    mem: &GuestMemoryMmap,
) -> Result<linux_loader::loader::bootparam::setup_header, BootError> {
    let mut cursor = std::io::Cursor::new(image);
    let res = linux_loader::loader::BzImage::load(
        mem,
        None,
        &mut cursor,
        Some(GuestAddress(layout::KERNEL_START)),
    )
    .map_err(|source| BootError::Load {
        path: "<bzImage>".into(),
        source,
    })?;
    res.setup_header.ok_or(BootError::NoSetupHeader)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    /// A synthetic bzImage: boot sector + setup sectors with a protocol 2.15
    /// header (as `arch/x86/boot/header.S` lays it out), then the payload.
    fn synthetic_bzimage(setup_sects: u8, payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; (setup_sects as usize + 1) * 512];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x01; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn bzimage_header_is_read_and_payload_loaded_at_code32_start() {
        let m = mem(8 << 20);
        let payload: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let img = synthetic_bzimage(4, &payload);
        let hdr = bzimage_header(&img, &m).unwrap();
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.setup_sects }, 4);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.code32_start }, 0x10_0000);
        assert_eq!({ hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ hdr.cmdline_size }, 2048);
        let mut back = vec![0u8; payload.len()];
        m.read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(back, payload);
    }

    #[test]
    fn real_bzimage_header_if_the_host_has_one() {
        // A host kernel, when present, must parse too; CI machines have none.
        let Ok(dir) = std::fs::read_dir("/boot") else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("vmlinuz") {
                continue;
            }
            let Ok(img) = std::fs::read(e.path()) else {
                continue;
            };
            let m = mem(128 << 20);
            let hdr = bzimage_header(&img, &m).unwrap();
            assert_eq!({ hdr.header }, 0x5372_6448, "{name}");
            assert!({ hdr.version } >= 0x0200, "{name}");
        }
    }

    #[test]
    fn bzimage_without_magic_or_too_old_is_rejected() {
        let m = mem(8 << 20);
        let mut img = synthetic_bzimage(4, &[1, 2, 3]);
        img[0x202] = b'X';
        assert!(bzimage_header(&img, &m).is_err());
        let mut img = synthetic_bzimage(4, &[1, 2, 3]);
        img[0x206..0x208].copy_from_slice(&0x0100u16.to_le_bytes());
        assert!(bzimage_header(&img, &m).is_err());
        let mut img = synthetic_bzimage(4, &[1, 2, 3]);
        img[0x211] = 0; // not loaded high: a zImage
        assert!(bzimage_header(&img, &m).is_err());
    }

    #[test]
    fn zero_page_has_cmdline_and_e820_without_device_windows() {
        let ram = 64u64 << 20;
        let m = mem(ram as usize);
        let cl = build_cmdline(
            "harness.test=console:hi",
            &[(0x1000, layout::virtio_mmio_addr(0), 5)],
        )
        .unwrap();
        write_boot_params(&m, &cl, ram).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(layout::ZERO_PAGE)).unwrap();
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.cmd_line_ptr } as u64, layout::CMDLINE_START);
        let mut text = vec![0u8; p.hdr.cmdline_size as usize];
        m.read_slice(&mut text, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&text).unwrap(),
            "harness.test=console:hi virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(p.e820_entries, 2);
        let end = |e: &boot_e820_entry| e.addr + e.size;
        assert_eq!(end(&p.e820_table[1]), ram);
        for e in &p.e820_table[..2] {
            assert!(end(e) <= layout::MMIO_HOLE_START);
            assert!(e.addr + e.size <= layout::PMEM_START);
        }
    }

    #[test]
    fn overlong_or_invalid_command_lines_are_refused() {
        let long = "x".repeat(layout::CMDLINE_MAX);
        assert!(build_cmdline(&long, &[]).is_err());
        let dev = [(0x1000, layout::virtio_mmio_addr(0), 5)];
        let near = "y".repeat(layout::CMDLINE_MAX - 20);
        assert!(
            build_cmdline(&near, &dev).is_err(),
            "no room for the device entry"
        );
        assert!(build_cmdline("bad\0nul", &[]).is_err());
        assert!(build_cmdline("  ", &dev).is_ok());
    }

    #[test]
    fn gdt_entries_decode_to_long_mode_segments() {
        let code = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code.l, code.db, code.present, code.s), (1, 0, 1, 1));
        assert_eq!((code.type_, code.selector, code.g), (0xb, 8, 1));
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.l, data.db, data.type_, data.selector), (0, 1, 3, 16));
    }

    #[test]
    fn non_elf_kernel_is_named_as_such() {
        let m = mem(4 << 20);
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(f.as_path(), b"MZ not an elf").unwrap();
        let err = load_kernel(&m, f.as_path()).unwrap_err();
        assert!(matches!(err, BootError::NotElf(_)), "{err}");
        let err = load_kernel(&m, Path::new("/nonexistent/kernel")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/kernel"), "{err}");
    }
}
