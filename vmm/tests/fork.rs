//! The fork-server (`vmm::fork`) under KVM: runs from its snapshot give what
//! fresh VMs give, no write of one run (guest RAM, pmem, disk) is visible to
//! the next, and a run that crashes, panics or hangs changes nothing for the
//! runs after it.
//!
//! Needs the guest built (`cargo xtask build-guest`, or `$PCACHE_GUEST`).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{describe, guest_kernel};
use protocol::{ExitCode, MessageKind};
use vmm::{DiskImage, ForkConfig, ForkServer, ImageMode, Outcome, PmemRegion, RunOutcome};
use vmm_sys_util::tempdir::TempDir;

const PMEM_SIZE: u64 = 512 << 20;
const DISK_SIZE: u64 = 16 << 20;

/// A blank sparse pmem image and a disk whose sector 0 starts with `byte`.
fn images(dir: &Path, name: &str, byte: u8) -> (std::path::PathBuf, std::path::PathBuf) {
    let pmem = dir.join(format!("{name}.pmem"));
    let disk = dir.join(format!("{name}.disk"));
    vmm::memory::create_sparse_file(&pmem, PMEM_SIZE).unwrap();
    vmm::memory::create_sparse_file(&disk, DISK_SIZE).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::options().write(true).open(&disk).unwrap(),
        &[byte],
        0,
    )
    .unwrap();
    (pmem, disk)
}

fn open(p: &(std::path::PathBuf, std::path::PathBuf)) -> (PmemRegion, DiskImage) {
    (
        PmemRegion::open(&p.0, ImageMode::CopyOnWrite).unwrap(),
        DiskImage::open(&p.1, ImageMode::CopyOnWrite).unwrap(),
    )
}

/// What must be equal between a fresh run and a fork-server run: the
/// outcome (registers only for a clean exit: they differ by timing), and
/// every message's kind and payload.
type Essence = (String, Option<u32>, Vec<(u32, Vec<u8>)>, Vec<String>);

fn essence(r: &RunOutcome) -> Essence {
    (
        r.outcome.name().to_string(),
        r.outcome.exit_code(),
        r.messages
            .iter()
            .map(|m| (m.kind, m.payload.clone()))
            .collect(),
        r.protocol_errors.clone(),
    )
}

fn fresh(cfg: &ForkConfig, p: &(std::path::PathBuf, std::path::PathBuf)) -> RunOutcome {
    let (pmem, disk) = open(p);
    vmm::run(cfg.fresh(pmem, disk)).expect("the VMM runs")
}

fn fork(server: &mut ForkServer, p: &(std::path::PathBuf, std::path::PathBuf)) -> RunOutcome {
    let (pmem, disk) = open(p);
    server.run(pmem, disk).expect("the VMM runs")
}

/// A pcache recovery (`start;stop;start`) on blank, formatted and torn
/// images, alternating: every fork-server run reports what a fresh VM
/// reports, and the server was booted once.
#[test]
#[ignore = "needs /dev/kvm"]
fn fork_server_runs_report_what_fresh_vms_report() {
    let dir = TempDir::new().unwrap();
    let blank = images(dir.as_path(), "blank", 0);
    // A formatted image: a write-through run formats it.
    let formatted = images(dir.as_path(), "formatted", 0);
    let mut c = vmm::VmConfig::new(
        guest_kernel(),
        "pcache.run=start:mode=strict pcache.markers=off",
        &formatted.0,
        &formatted.1,
    )
    .unwrap();
    c.pmem = PmemRegion::open(&formatted.0, ImageMode::WriteThrough).unwrap();
    let r = vmm::run(c).unwrap();
    assert_eq!(r.outcome.exit_code(), Some(0), "{}", describe(&r));
    drop(r);
    // Torn: the formatted image with its superblock's CRC word broken.
    let torn = images(dir.as_path(), "torn", 0);
    std::fs::copy(&formatted.0, &torn.0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::options().write(true).open(&torn.0).unwrap(),
        &[0xff; 8],
        8,
    )
    .unwrap();
    for mode in ["strict", "recover"] {
        for fences in ["flush", "cpu"] {
            let mut cfg = ForkConfig::new(
                guest_kernel(),
                format!(
                    "pcache.run=start:mode={mode};stop;start:mode={mode} pcache.markers=off pcache.fences={fences}"
                ),
            );
            cfg.timeout = Duration::from_secs(20);
            let mut server = ForkServer::new(cfg.clone());
            for p in [&blank, &formatted, &torn, &blank, &torn, &formatted] {
                let want = fresh(&cfg, p);
                let got = fork(&mut server, p);
                assert_eq!(
                    got.outcome,
                    Outcome::Exited { code: 0 },
                    "{}",
                    describe(&got)
                );
                assert_eq!(
                    essence(&got),
                    essence(&want),
                    "{mode} {fences}: {}",
                    describe(&got)
                );
            }
            let s = server.stats();
            assert_eq!((s.boots, s.runs, s.fresh_runs), (1, 6, 0), "{s:?}");
        }
    }
}

/// Every run leaves a mark in guest RAM (`.bss` and a page the snapshot did
/// not have), in pmem and on the disk, and fails if it finds one: none is
/// ever found, whatever the runs before it did.
#[test]
#[ignore = "needs /dev/kvm"]
fn no_write_of_one_run_is_visible_to_the_next() {
    let dir = TempDir::new().unwrap();
    let p = images(dir.as_path(), "a", 0);
    let mut cfg = ForkConfig::new(guest_kernel(), "harness.test=mark;message:clean");
    cfg.timeout = Duration::from_secs(20);
    // The step does find a mark when one is there: a second `mark` in the
    // same run fails.
    let twice = ForkConfig::new(guest_kernel(), "harness.test=mark;mark");
    let r = fresh(&twice, &p);
    assert_eq!(
        r.outcome.exit_code(),
        Some(ExitCode::StepFailed as u32),
        "{}",
        describe(&r)
    );
    assert!(
        r.messages[0]
            .text()
            .contains("the .bss word holds 0x6d61726b"),
        "{}",
        describe(&r)
    );
    let mut server = ForkServer::new(cfg);
    for i in 0..5 {
        let r = fork(&mut server, &p);
        assert_eq!(
            r.outcome,
            Outcome::Exited { code: 0 },
            "run {i}: {}",
            describe(&r)
        );
        assert_eq!(r.messages.last().map(|m| m.text()), Some("clean".into()));
        // The run's own writes are in its images (and nowhere else).
        assert_eq!(r.pmem.read_u64(0x1000).unwrap(), 0x6d61_726b);
        let mut s = [0u8; 512];
        r.disk.read(512, &mut s).unwrap();
        assert_eq!(s, [0x6d; 512]);
    }
    assert_eq!((server.stats().boots, server.stats().runs), (1, 5));
}

/// Runs whose disk asks for a page fault, a hang, a panic or a failed step,
/// between clean runs: each is reported as a fresh VM reports it, the server
/// boots again after a crash or hang (and is reset after the failed step),
/// and the clean runs after it find no mark of it.
#[test]
#[ignore = "needs /dev/kvm"]
fn a_run_that_crashes_or_hangs_does_not_affect_the_next() {
    let dir = TempDir::new().unwrap();
    let clean = images(dir.as_path(), "clean", 0);
    let pf = images(dir.as_path(), "pf", 1);
    let hang = images(dir.as_path(), "hang", 2);
    let panic = images(dir.as_path(), "panic", 3);
    // An unknown byte: the step fails, the guest exits `StepFailed` from ring 3.
    let failed = images(dir.as_path(), "failed", 4);
    // `mark` first: a crashed run leaves its marks behind in its VM.
    let mut cfg = ForkConfig::new(
        guest_kernel(),
        "harness.test=mark;disk-fault:0;message:survived",
    );
    cfg.timeout = Duration::from_secs(2);
    let mut server = ForkServer::new(cfg.clone());
    let mut boots = 1;
    for (p, want) in [
        (&clean, "exited"),
        (&pf, "exited"),
        (&clean, "exited"),
        (&hang, "timeout"),
        (&clean, "exited"),
        (&panic, "exited"),
        (&clean, "exited"),
        (&failed, "exited"),
        (&clean, "exited"),
    ] {
        let got = fork(&mut server, p);
        assert_eq!(got.outcome.name(), want, "{}", describe(&got));
        let reference = fresh(&cfg, p);
        assert_eq!(essence(&got), essence(&reference), "{}", describe(&got));
        if p.1 == clean.1 {
            assert_eq!(got.outcome, Outcome::Exited { code: 0 });
            assert_eq!(
                got.messages.last().map(|m| m.text()),
                Some("survived".into())
            );
        } else {
            let code = got.outcome.exit_code();
            assert_ne!(code, Some(0), "{}", describe(&got));
            if p.1 == pf.1 {
                assert_eq!(code, Some(ExitCode::Exception as u32));
                assert_eq!(got.messages[0].kind(), Some(MessageKind::Exception));
            }
            if p.1 == panic.1 {
                assert_eq!(code, Some(ExitCode::Panic as u32));
            }
            if p.1 == failed.1 {
                // A failed step exits from ring 3 like a clean run: the
                // server is reset for the next run, not booted again.
                assert_eq!(code, Some(ExitCode::StepFailed as u32));
                assert!(server.is_booted());
            } else {
                assert!(
                    !server.is_booted(),
                    "the server is ended after a crash or hang"
                );
                boots += 1;
            }
        }
    }
    // One boot, plus one after each crash or hang (each is followed by a clean run).
    assert_eq!(server.stats().boots, boots, "{:?}", server.stats());
}

/// What the server does not take on goes to a fresh VM, with the fresh
/// VM's result: a write-through image (its file must see the stores) and a
/// command line that may trace.
#[test]
#[ignore = "needs /dev/kvm"]
fn write_through_images_and_traced_command_lines_run_in_fresh_vms() {
    let dir = TempDir::new().unwrap();
    let p = images(dir.as_path(), "wt", 0);
    let cfg = ForkConfig::new(guest_kernel(), "harness.test=pmem-store:0x40:7");
    let mut server = ForkServer::new(cfg);
    let pmem = PmemRegion::open(&p.0, ImageMode::WriteThrough).unwrap();
    let disk = DiskImage::open(&p.1, ImageMode::CopyOnWrite).unwrap();
    let r = server.run(pmem, disk).unwrap();
    assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{}", describe(&r));
    let mut b = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&p.0).unwrap(), &mut b, 0x40)
        .unwrap();
    assert_eq!(u64::from_le_bytes(b), 7, "the store reached the file");
    assert_eq!((server.stats().fresh_runs, server.stats().boots), (1, 0));

    let traced = ForkConfig::new(
        guest_kernel(),
        "harness.test=marker:0x80000001;pmem-store:0x48:9;marker:0x80000002",
    );
    let mut server = ForkServer::new(traced);
    let r = fork(&mut server, &p);
    assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "{}", describe(&r));
    assert_eq!(r.windows.len(), 1, "traced as in a fresh VM");
    assert_eq!(r.windows[0].trace.len(), 1);
    assert_eq!((server.stats().fresh_runs, server.stats().boots), (1, 0));
}
