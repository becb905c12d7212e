//! The ring-0 scan: every instruction of the guest kernel that runs at CPL 0
//! lies between the symbols `__ring0_start` and `__ring0_end` (one linker
//! section, see `guest-images/linker.ld`). PVM emulates CPL 0 and rejects some
//! instructions there with `KVM_EXIT_INTERNAL_ERROR` (see
//! `docs/platform.md`); this scan decodes that range and fails the
//! guest build if it finds one, naming the instruction and its address.
//!
//! Rejected: anything undecodable; every VEX/EVEX/XOP/MVEX/3DNow! encoding
//! (AVX and kin); every MMX/SSE-family instruction (the notes measured `pxor`,
//! `xorps`, `paddq`, `pcmpeqb`, `pmovmskb`, `movq xmm,r64` failing) except the
//! plain moves measured to work (`movups`, `movaps`, `movdqu`); `popcnt`,
//! `cmpxchg16b`, the XSAVE family, and the other SIMD extensions (AES,
//! PCLMULQDQ, SHA, GFNI, F16C, FMA). `fxsave`/`fxrstor`, `lzcnt`, `bsf`,
//! control-register moves, `lgdt`/`lidt`/`ltr`, `iretq` and port I/O pass.

use anyhow::{bail, Context, Result};
use iced_x86::{
    CpuidFeature, Decoder, DecoderOptions, EncodingKind, Formatter, Instruction, IntelFormatter,
    Mnemonic,
};
use object::{Object, ObjectKind, ObjectSection, ObjectSymbol};
use std::path::Path;

pub const START_SYMBOL: &str = "__ring0_start";
pub const END_SYMBOL: &str = "__ring0_end";

/// CPUID features whose instructions PVM's CPL-0 emulator rejects (or that
/// belong to the same SIMD families and were never shown to work).
const REJECTED_FEATURES: &[CpuidFeature] = &[
    CpuidFeature::MMX,
    CpuidFeature::SSE,
    CpuidFeature::SSE2,
    CpuidFeature::SSE3,
    CpuidFeature::SSSE3,
    CpuidFeature::SSE4_1,
    CpuidFeature::SSE4_2,
    CpuidFeature::SSE4A,
    CpuidFeature::D3NOW,
    CpuidFeature::D3NOWEXT,
    CpuidFeature::POPCNT,
    CpuidFeature::CMPXCHG16B,
    CpuidFeature::XSAVE,
    CpuidFeature::XSAVEC,
    CpuidFeature::XSAVEOPT,
    CpuidFeature::XSAVES,
    CpuidFeature::AES,
    CpuidFeature::PCLMULQDQ,
    CpuidFeature::SHA,
    CpuidFeature::GFNI,
    CpuidFeature::F16C,
    CpuidFeature::FMA,
    CpuidFeature::FMA4,
];

/// SSE moves measured to work at CPL 0 on PVM.
const ALLOWED_MNEMONICS: &[Mnemonic] = &[Mnemonic::Movups, Mnemonic::Movaps, Mnemonic::Movdqu];

/// One rejected instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub addr: u64,
    /// The instruction in Intel syntax.
    pub text: String,
    pub reason: String,
}

/// What a clean scan covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub start: u64,
    pub end: u64,
    pub instructions: usize,
}

/// Why `instr` must not run at CPL 0, if it must not.
fn rejection(instr: &Instruction) -> Option<String> {
    if instr.is_invalid() {
        return Some("undecodable bytes".into());
    }
    if instr.encoding() != EncodingKind::Legacy {
        return Some(format!(
            "{:?} encoding (AVX or other vector extension)",
            instr.encoding()
        ));
    }
    if ALLOWED_MNEMONICS.contains(&instr.mnemonic()) {
        return None;
    }
    instr
        .cpuid_features()
        .iter()
        .find(|f| REJECTED_FEATURES.contains(f))
        .map(|f| format!("{f:?} instruction"))
}

/// Decodes `code` (loaded at `base`) linearly and returns the rejected
/// instructions and the number decoded. The range must hold code only.
pub fn scan_code(code: &[u8], base: u64) -> (Vec<Finding>, usize) {
    let mut decoder = Decoder::with_ip(64, code, base, DecoderOptions::NONE);
    let mut formatter = IntelFormatter::new();
    let mut findings = Vec::new();
    let mut count = 0;
    let mut instr = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instr);
        count += 1;
        if let Some(reason) = rejection(&instr) {
            let mut text = String::new();
            formatter.format(&instr, &mut text);
            findings.push(Finding {
                addr: instr.ip(),
                text,
                reason,
            });
        }
    }
    (findings, count)
}

/// Scans the ring-0 range of an ELF image (executable or relocatable object).
pub fn scan_elf(data: &[u8]) -> Result<(Summary, Vec<Finding>)> {
    let file = object::File::parse(data).context("not an ELF file")?;
    let symbol = |name: &str| {
        file.symbols()
            .find(|s| s.name() == Ok(name))
            .with_context(|| {
                format!("symbol {name} not found (is the ring-0 section in linker.ld?)")
            })
    };
    let start = symbol(START_SYMBOL)?;
    let end = symbol(END_SYMBOL)?;
    let (s, e) = (start.address(), end.address());
    if e <= s {
        bail!("empty ring-0 range: {START_SYMBOL} = {s:#x}, {END_SYMBOL} = {e:#x}");
    }
    let section = start
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .with_context(|| format!("{START_SYMBOL} is not in a section"))?;
    let bytes = section.data()?;
    let from = s
        .checked_sub(section.address())
        .context("ring-0 start before its section")? as usize;
    let to = from + (e - s) as usize;
    if to > bytes.len() {
        bail!(
            "{END_SYMBOL} ({e:#x}) is past the end of section {}",
            section.name()?
        );
    }
    if file.kind() == ObjectKind::Executable && !(s..e).contains(&file.entry()) {
        bail!(
            "the entry point {:#x} is not in the ring-0 range {s:#x}..{e:#x}",
            file.entry()
        );
    }
    let (findings, instructions) = scan_code(&bytes[from..to], s);
    Ok((
        Summary {
            start: s,
            end: e,
            instructions,
        },
        findings,
    ))
}

/// Scans the kernel at `path`; an error names every rejected instruction.
pub fn check_kernel(path: &Path) -> Result<Summary> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (summary, findings) =
        scan_elf(&data).with_context(|| format!("ring-0 scan of {}", path.display()))?;
    if !findings.is_empty() {
        let list: Vec<String> = findings
            .iter()
            .map(|f| format!("  {:#x}: {}  ({})", f.addr, f.text, f.reason))
            .collect();
        bail!(
            "ring-0 scan of {}: {} instruction(s) PVM cannot run at CPL 0:\n{}",
            path.display(),
            findings.len(),
            list.join("\n")
        );
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(code: &[u8]) -> Vec<Finding> {
        scan_code(code, 0x1000).0
    }

    #[test]
    fn rejects_what_pvm_cannot_emulate() {
        let cases: &[(&[u8], &str)] = &[
            (&[0x66, 0x0f, 0xef, 0xc0], "pxor"),
            (&[0x66, 0x48, 0x0f, 0x6e, 0xc0], "movq"),
            (&[0x66, 0x48, 0x0f, 0x7e, 0xc0], "movq"),
            (&[0x0f, 0x57, 0xc0], "xorps"),
            (&[0x66, 0x0f, 0xd4, 0xc0], "paddq"),
            (&[0x66, 0x0f, 0x74, 0xc0], "pcmpeqb"),
            (&[0x66, 0x0f, 0xd7, 0xc0], "pmovmskb"),
            (&[0x48, 0x0f, 0xc7, 0x0f], "cmpxchg16b"),
            (&[0x0f, 0xae, 0x27], "xsave"),
            (&[0x0f, 0xae, 0x2f], "xrstor"),
            (&[0xf3, 0x0f, 0xb8, 0xc1], "popcnt"),
            (&[0xc5, 0xf9, 0xef, 0xc0], "vpxor"),
            (&[0xc5, 0xf8, 0x10, 0x07], "vmovups"),
            (&[0x62, 0xf1, 0xfe, 0x48, 0x6f, 0x07], "vmovdqu64"),
            (&[0x0f, 0xef, 0xc0], "pxor"), // MMX form
            (&[0x0f, 0xae, 0x17], "ldmxcsr"),
        ];
        for (code, name) in cases {
            let f = rejected(code);
            assert_eq!(f.len(), 1, "{name} ({code:02x?}) not rejected");
            assert!(f[0].text.starts_with(name), "{name}: {:?}", f[0]);
            assert_eq!(f[0].addr, 0x1000);
        }
    }

    #[test]
    fn rejects_undecodable_bytes() {
        let f = rejected(&[0x0f, 0xff]);
        assert!(!f.is_empty());
        assert_eq!(f[0].reason, "undecodable bytes");
    }

    #[test]
    fn accepts_what_pvm_emulates() {
        let cases: &[&[u8]] = &[
            &[0x0f, 0x10, 0x07],             // movups xmm0,[rdi]
            &[0x0f, 0x28, 0x07],             // movaps
            &[0xf3, 0x0f, 0x6f, 0x07],       // movdqu
            &[0x0f, 0xae, 0x07],             // fxsave
            &[0x0f, 0xae, 0x0f],             // fxrstor
            &[0xf3, 0xa4],                   // rep movsb
            &[0x0f, 0xa2],                   // cpuid
            &[0x0f, 0x31],                   // rdtsc
            &[0x0f, 0x32],                   // rdmsr
            &[0x0f, 0xbc, 0xc1],             // bsf
            &[0xf3, 0x0f, 0xbd, 0xc1],       // lzcnt
            &[0x48, 0xf7, 0xe1],             // mul rcx
            &[0x0f, 0x01, 0x15, 0, 0, 0, 0], // lgdt
            &[0x0f, 0x01, 0x1d, 0, 0, 0, 0], // lidt
            &[0x0f, 0x00, 0xd8],             // ltr ax
            &[0x0f, 0x22, 0xc0],             // mov cr0,rax
            &[0x0f, 0x20, 0xd0],             // mov rax,cr2
            &[0x48, 0xcb],                   // retfq
            &[0x48, 0xcf],                   // iretq
            &[0x9d],                         // popfq
            &[0xef],                         // out dx,eax
            &[0xf4],                         // hlt
            &[0x0f, 0x1f, 0x80, 0, 0, 0, 0], // multi-byte nop (alignment padding)
        ];
        for code in cases {
            let (f, n) = scan_code(code, 0);
            assert_eq!(n, 1, "{code:02x?} did not decode as one instruction");
            assert!(f.is_empty(), "{code:02x?} rejected: {f:?}");
        }
    }

    #[test]
    fn reports_each_finding_at_its_address() {
        // nop; pxor xmm0,xmm0; mov eax,1; popcnt eax,ecx
        let code = [
            0x90, 0x66, 0x0f, 0xef, 0xc0, 0xb8, 1, 0, 0, 0, 0xf3, 0x0f, 0xb8, 0xc1,
        ];
        let (f, n) = scan_code(&code, 0x10_0000);
        assert_eq!(n, 4);
        let addrs: Vec<u64> = f.iter().map(|f| f.addr).collect();
        assert_eq!(addrs, [0x10_0001, 0x10_000a]);
    }

    /// A relocatable ELF with `code` in `.text.ring0` between the two symbols,
    /// plus a rejected instruction outside that range.
    fn elf_with_ring0(code: &[u8]) -> Vec<u8> {
        use object::write::{Object, Symbol, SymbolSection};
        use object::{
            Architecture, BinaryFormat, Endianness, SectionKind, SymbolFlags, SymbolKind,
            SymbolScope,
        };
        let mut obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let text = obj.add_section(Vec::new(), b".text.ring0".to_vec(), SectionKind::Text);
        let mut bytes = vec![0x90];
        bytes.extend_from_slice(code);
        let end = bytes.len() as u64;
        bytes.extend_from_slice(&[0x66, 0x0f, 0xef, 0xc0]); // pxor, outside the range
        obj.append_section_data(text, &bytes, 16);
        for (name, value) in [(START_SYMBOL, 1), (END_SYMBOL, end)] {
            obj.add_symbol(Symbol {
                name: name.as_bytes().to_vec(),
                value,
                size: 0,
                kind: SymbolKind::Label,
                scope: SymbolScope::Linkage,
                weak: false,
                section: SymbolSection::Section(text),
                flags: SymbolFlags::None,
            });
        }
        obj.write().unwrap()
    }

    #[test]
    fn elf_scan_covers_exactly_the_ring0_range() {
        // mov cr3,rax; iretq: clean (the pxor after __ring0_end is not scanned).
        let (summary, f) = scan_elf(&elf_with_ring0(&[0x0f, 0x22, 0xd8, 0x48, 0xcf])).unwrap();
        assert!(f.is_empty(), "{f:?}");
        assert_eq!(summary.instructions, 2);
        assert_eq!((summary.start, summary.end), (1, 6));
        // xorps inside the range.
        let (_, f) = scan_elf(&elf_with_ring0(&[0x48, 0xcf, 0x0f, 0x57, 0xc0])).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].addr, f[0].text.as_str()), (3, "xorps xmm0,xmm0"));
    }

    #[test]
    fn elf_without_the_symbols_is_an_error() {
        use object::write::Object;
        use object::{Architecture, BinaryFormat, Endianness};
        let obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let err = scan_elf(&obj.write().unwrap()).unwrap_err();
        assert!(format!("{err:#}").contains(START_SYMBOL), "{err:#}");
        assert!(scan_elf(b"not an elf").is_err());
    }

    /// The real guest kernel: `build` scans it (and fails on a finding); check
    /// here that the scan saw its whole ring-0 code and nothing was rejected.
    #[test]
    fn the_built_guest_passes_the_scan() {
        let path = crate::guest::build(crate::guest::BuildGuestArgs {
            debug: false,
            feature: None,
        })
        .expect("guest build (with its ring-0 scan) failed");
        let (summary, findings) = scan_elf(&std::fs::read(path).unwrap()).unwrap();
        assert!(findings.is_empty(), "{findings:?}");
        // 32 exception stubs (2-3 instructions each) plus entry and handler code.
        assert!(summary.instructions > 100, "{summary:?}");
        // The range opens with the exception stubs, page-aligned (guest-images/linker.ld);
        // `scan_elf` already checked that the entry point lies inside it.
        assert_eq!(summary.start % 4096, 0, "{summary:?}");
    }
}
