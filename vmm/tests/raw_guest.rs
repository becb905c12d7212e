//! Tiny hand-assembled kernels (a few bytes of 64-bit code in an ELF) that do
//! what the project's guest never should: fault in ring 0, halt, send bad
//! messages, touch unclaimed ports and addresses. The VMM must end each run
//! with the right outcome and the guest's registers, never hang or panic.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::Images;
use vmm::Outcome;

const LOAD: u64 = 0x10_0000;

/// An ELF64 executable with one PT_LOAD segment holding `code` at 1 MiB.
fn elf(code: &[u8]) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01");
    e.resize(16, 0);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&LOAD.to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    e.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    e.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    e.extend_from_slice(&1u16.to_le_bytes()); // phnum
    e.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    assert_eq!(e.len(), 64);
    let off = 0x1000u64;
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    e.extend_from_slice(&off.to_le_bytes());
    e.extend_from_slice(&LOAD.to_le_bytes()); // vaddr
    e.extend_from_slice(&LOAD.to_le_bytes()); // paddr
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    e.resize(off as usize, 0);
    e.extend_from_slice(code);
    e
}

/// `mov dx, port; mov eax, value; out dx, eax`
fn out32(port: u16, value: u32) -> Vec<u8> {
    let mut c = vec![0x66, 0xba];
    c.extend_from_slice(&port.to_le_bytes());
    c.push(0xb8);
    c.extend_from_slice(&value.to_le_bytes());
    c.push(0xef);
    c
}

fn run(img: &Images, code: &[u8], timeout: Duration) -> vmm::RunOutcome {
    let k: PathBuf = img.dir.as_path().join("raw.elf");
    std::fs::write(&k, elf(code)).unwrap();
    let mut c = vmm::VmConfig::new(&k, "", &img.pmem(), &img.disk()).unwrap();
    c.timeout = timeout;
    vmm::run(c).expect("the VMM runs")
}

fn exit(code: u32) -> Vec<u8> {
    out32(protocol::PORT_EXIT, code)
}

#[test]
#[ignore = "needs /dev/kvm"]
fn exit_code_written_by_the_guest_comes_back() {
    let img = Images::new();
    let r = run(&img, &exit(42), Duration::from_secs(5));
    assert_eq!(r.outcome, Outcome::Exited { code: 42 });
}

#[test]
#[ignore = "needs /dev/kvm"]
fn triple_fault_ends_as_shutdown_with_registers() {
    let img = Images::new();
    // ud2 with the boot IDT (one empty gate): #UD -> #GP -> #DF -> triple fault.
    let r = run(&img, &[0x0f, 0x0b], Duration::from_secs(5));
    match r.outcome {
        Outcome::Shutdown { regs } => assert_eq!(regs.rip, LOAD, "{regs:?}"),
        other => panic!("{other:?}"),
    }
}

#[test]
#[ignore = "needs /dev/kvm"]
fn halt_with_interrupts_off_ends_as_halted() {
    let img = Images::new();
    let r = run(&img, &[0xfa, 0xf4, 0xeb, 0xfe], Duration::from_secs(5));
    match r.outcome {
        Outcome::Halted { regs } => assert_eq!(regs.rip, LOAD + 2, "{regs:?}"),
        // A hlt that KVM keeps in the kernel is ended by the watchdog instead.
        Outcome::Timeout { regs } => assert_eq!(regs.rip, LOAD + 2, "{regs:?}"),
        other => panic!("{other:?}"),
    }
}

#[test]
#[ignore = "needs /dev/kvm"]
fn ring0_spin_times_out() {
    let img = Images::new();
    let t0 = std::time::Instant::now();
    let r = run(&img, &[0xeb, 0xfe], Duration::from_millis(300));
    match r.outcome {
        Outcome::Timeout { regs } => assert_eq!(regs.rip, LOAD, "{regs:?}"),
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[test]
#[ignore = "needs /dev/kvm"]
fn rejected_ring0_instruction_is_an_internal_error_or_a_fault() {
    let img = Images::new();
    // cmpxchg16b [rsp-64]: the notes list it as rejected by PVM's emulator.
    let r = run(
        &img,
        &[0x48, 0x0f, 0xc7, 0x4c, 0x24, 0xc0],
        Duration::from_secs(5),
    );
    match r.outcome {
        Outcome::InternalError { suberror, regs } => {
            assert_eq!(suberror, 1);
            assert_eq!(regs.rip, LOAD, "{regs:?}");
        }
        // On hardware KVM the instruction runs (or faults) instead.
        Outcome::Shutdown { .. } | Outcome::Timeout { .. } => {}
        other => panic!("{other:?}"),
    }
}

#[test]
#[ignore = "needs /dev/kvm"]
fn bad_messages_and_stray_accesses_are_refused_not_fatal() {
    let img = Images::new();
    let mut code = Vec::new();
    // A message header outside RAM, and one claiming too many bytes.
    code.extend(out32(protocol::PORT_MESSAGE, 0xbfff_fff0));
    // A 1-byte write to the exit port (the protocol's ports take 32 bits).
    code.extend([0x66, 0xba, 0x14, 0x05, 0xb0, 0x01, 0xee]); // mov dx,0x514; mov al,1; out dx,al
                                                             // An unclaimed port, read and written.
    code.extend([0x66, 0xba, 0x34, 0x12, 0xed, 0xef]); // mov dx,0x1234; in eax,dx; out dx,eax
                                                       // An unclaimed MMIO address inside the virtio hole: mov eax, [0xd0008000]
    code.extend(movabs_rax(0xd000_8000));
    code.extend([0x8b, 0x00]);
    // A trace-off marker while tracing is off.
    code.extend(out32(protocol::PORT_MARKER, protocol::MARKER_TRACE_OFF));
    code.extend(exit(0));
    let r = run(&img, &code, Duration::from_secs(5));
    assert_eq!(r.outcome, Outcome::Exited { code: 0 });
    assert!(r.messages.is_empty());
    assert_eq!(r.protocol_errors.len(), 3, "{:?}", r.protocol_errors);
    assert!(r.protocol_errors[0].contains("outside guest RAM"));
    assert!(r.protocol_errors[1].contains("32-bit"));
    assert!(r.protocol_errors[2].contains("tracing is off"));
    assert_eq!(r.stats.stray_accesses, 3, "{:?}", r.stats);
}

/// `mov rax, imm64`
fn movabs_rax(v: u64) -> Vec<u8> {
    let mut c = vec![0x48, 0xb8];
    c.extend_from_slice(&v.to_le_bytes());
    c
}

#[test]
#[ignore = "needs /dev/kvm"]
fn stores_into_the_traced_region_are_traced_and_others_are_not() {
    let img = Images::new();
    let pmem = protocol::layout::PMEM_START;
    let mut code = Vec::new();
    // Untraced: a native store into pmem and one into RAM.
    code.extend(movabs_rax(pmem + 0x100));
    code.extend([0xc7, 0x00, 0x11, 0x00, 0x00, 0x00]); // mov dword [rax], 0x11
    code.extend(out32(protocol::PORT_MARKER, protocol::MARKER_TRACE_ON));
    code.extend([
        0xc7, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0x01, 0x00, 0x00, 0x00,
    ]); // mov dword [0x200000], 1
        // Traced: an 8-byte and a 2-byte store, a marker between them.
    code.extend(movabs_rax(pmem + 0x1008));
    code.extend([0x48, 0xc7, 0x00, 0x44, 0x33, 0x22, 0x11]); // mov qword [rax], 0x11223344
    code.extend(out32(protocol::PORT_MARKER, 0x123)); // clobbers rax
    code.extend(movabs_rax(pmem + 0x1008));
    code.extend([0x66, 0xc7, 0x40, 0x08, 0xcd, 0xab]); // mov word [rax+8], 0xabcd
    code.extend(out32(protocol::PORT_MARKER, protocol::MARKER_TRACE_OFF));
    code.extend(exit(0));
    let r = run(&img, &code, Duration::from_secs(5));
    assert_eq!(r.outcome, Outcome::Exited { code: 0 });
    assert!(r.protocol_errors.is_empty(), "{:?}", r.protocol_errors);
    assert_eq!(r.windows.len(), 1);
    assert_eq!(
        r.windows[0].trace.events(),
        &[
            vmm::Event::PmemStore {
                offset: 0x1008,
                len: 8,
                value: 0x1122_3344
            },
            vmm::Event::Marker { id: 0x123 },
            vmm::Event::PmemStore {
                offset: 0x1010,
                len: 2,
                value: 0xabcd
            },
        ]
    );
    assert_eq!(r.stats.traced_stores, 2);
    assert_eq!(r.pmem.read_u64(0x100).unwrap(), 0x11);
    assert_eq!(r.pmem.read_u64(0x1008).unwrap(), 0x1122_3344);
    assert_eq!(r.pmem.read_u64(0x1010).unwrap(), 0xabcd);
    // The untraced store before the window is in the window's base.
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let saved = r.windows[0].save(dir.as_path()).unwrap();
    let mut b = [0u8; 8];
    saved.base_pmem_read(0x100, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0x11);
    saved.base_pmem_read(0x1008, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0);
}

#[test]
#[ignore = "needs /dev/kvm"]
fn guest_reads_back_its_traced_stores() {
    let img = Images::new();
    let pmem = protocol::layout::PMEM_START;
    let mut code = Vec::new();
    code.extend(out32(protocol::PORT_MARKER, protocol::MARKER_TRACE_ON));
    code.extend(movabs_rax(pmem + 0x3000));
    code.extend([0x48, 0x8b, 0x18]); // mov rbx, [rax]: the page is mapped for reading first
    code.extend([0x48, 0xc7, 0x00, 0x2a, 0x00, 0x00, 0x00]); // mov qword [rax], 42 (traced)
    code.extend([0x48, 0x8b, 0x08]); // mov rcx, [rax]: must see 42
    code.extend([0x48, 0x01, 0xd9]); // add rcx, rbx (rbx was 0)
    code.extend([0x66, 0xba, 0x14, 0x05]); // mov dx, PORT_EXIT
    code.extend([0x89, 0xc8, 0xef]); // mov eax, ecx; out dx, eax
    let r = run(&img, &code, Duration::from_secs(5));
    assert_eq!(
        r.outcome,
        Outcome::Exited { code: 42 },
        "{:?}",
        r.protocol_errors
    );
    assert_eq!(r.stats.traced_stores, 1);
}

#[test]
#[ignore = "needs /dev/kvm"]
fn parallel_runs_keep_their_own_outcomes() {
    // Spinners with short budgets next to guests that exit: each watchdog
    // kick must reach its own vCPU thread only.
    let img = Images::new();
    let spin = img.dir.as_path().join("spin.elf");
    std::fs::write(&spin, elf(&[0xeb, 0xfe])).unwrap();
    let quit = img.dir.as_path().join("quit.elf");
    let mut code = Vec::new();
    for _ in 0..200 {
        code.extend(out32(protocol::PORT_MARKER, 7)); // a few ms of exits
    }
    code.extend(exit(3));
    std::fs::write(&quit, elf(&code)).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let kernel = if i % 2 == 0 { &spin } else { &quit };
                let img = &img;
                s.spawn(move || {
                    let mut c = vmm::VmConfig::new(kernel, "", &img.pmem(), &img.disk()).unwrap();
                    c.timeout =
                        Duration::from_millis(if i % 2 == 0 { 100 + i * 20 } else { 20_000 });
                    (i, vmm::run(c).unwrap())
                })
            })
            .collect();
        for h in handles {
            let (i, r) = h.join().unwrap();
            if i % 2 == 0 {
                assert!(
                    matches!(r.outcome, Outcome::Timeout { .. }),
                    "{i}: {:?}",
                    r.outcome
                );
            } else {
                assert_eq!(r.outcome, Outcome::Exited { code: 3 }, "{i}");
                assert_eq!(r.markers.len(), 200);
            }
        }
    });
}
