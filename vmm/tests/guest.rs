//! The guest's device-level test steps (`harness.test=`) under KVM: console,
//! messages, exit codes, traced pmem stores, virtio flushes and writes in
//! trace order, crash images, timeouts and exceptions.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;
use protocol::{ExitCode, MessageKind, MARKER_TRACE_OFF, MARKER_TRACE_ON};
use vmm::{Event, Outcome, WriteRef};

fn assert_exit(r: &vmm::RunOutcome, code: ExitCode) {
    assert_eq!(
        r.outcome,
        Outcome::Exited { code: code as u32 },
        "{}",
        describe(r)
    );
}

#[test]
#[ignore = "needs /dev/kvm"]
fn console_line_and_message_arrive() {
    let img = Images::new();
    let r = run_steps(&img, "console:hello-console;message:hello-channel", "");
    assert_exit(&r, ExitCode::Success);
    assert!(
        r.console_text().contains("hello-console"),
        "{}",
        describe(&r)
    );
    let texts: Vec<_> = r
        .messages
        .iter()
        .filter(|m| m.kind() == Some(MessageKind::Text))
        .map(|m| m.text())
        .collect();
    assert!(
        texts.iter().any(|t| t == "hello-channel"),
        "{}",
        describe(&r)
    );
    assert!(r.protocol_errors.is_empty(), "{}", describe(&r));
}

#[test]
#[ignore = "needs /dev/kvm"]
fn exit_code_of_a_bad_command_comes_back_with_its_error() {
    let img = Images::new();
    let r = run_steps(&img, "no-such-step:1", "");
    assert_exit(&r, ExitCode::BadCommand);
    assert!(
        r.messages
            .iter()
            .any(|m| m.kind() == Some(MessageKind::Error)),
        "{}",
        describe(&r)
    );
}

#[test]
#[ignore = "needs /dev/kvm"]
fn traced_pmem_store_appears_with_its_address_and_value() {
    let img = Images::new();
    let mut c = img.config("harness.test=pmem-store:0x1238:0x1122334455667788");
    c.trace = true;
    let r = vmm::run(c).unwrap();
    assert_exit(&r, ExitCode::Success);
    let t = r.trace();
    assert_eq!(
        t.events(),
        &[Event::PmemStore {
            offset: 0x1238,
            len: 8,
            value: 0x1122_3344_5566_7788
        }],
        "{}",
        describe(&r)
    );
    assert_eq!(r.stats.traced_stores, 1);
    // The VMM applied the store to the guest's view ...
    assert_eq!(r.pmem.read_u64(0x1238).unwrap(), 0x1122_3344_5566_7788);
    // ... and the user's image file is untouched (copy-on-write).
    let mut b = [0u8; 8];
    std::fs::File::open(img.pmem())
        .unwrap()
        .read_exact_at(&mut b, 0x1238)
        .unwrap();
    assert_eq!(b, [0; 8]);
}

#[test]
#[ignore = "needs /dev/kvm"]
fn flushes_and_blk_writes_are_traced_in_order() {
    let img = Images::new();
    let mut c = img.config(
        "harness.test=pmem-store:0x40:7;pmem-flush;blk-write:3:0xab;blk-flush;marker:0x105",
    );
    c.trace = true;
    let r = vmm::run(c).unwrap();
    assert_exit(&r, ExitCode::Success);
    let t = r.trace();
    let ev = t.events();
    assert_eq!(ev.len(), 5, "{ev:?}");
    assert_eq!(
        ev[0],
        Event::PmemStore {
            offset: 0x40,
            len: 8,
            value: 7
        }
    );
    assert_eq!(ev[1], Event::PmemFlush);
    assert!(
        matches!(
            ev[2],
            Event::BlkWrite {
                sector: 3,
                len: 512,
                ..
            }
        ),
        "{ev:?}"
    );
    assert_eq!(t.blk_data(&ev[2]), &[0xab; 512][..]);
    assert_eq!(ev[3], Event::BlkFlush);
    assert_eq!(ev[4], Event::Marker { id: 0x105 });
    // The marker is also listed with its trace position.
    let m = r.markers.iter().find(|m| m.id == 0x105).unwrap();
    assert_eq!(m.trace_pos, Some((0, 4)));
}

#[test]
#[ignore = "needs /dev/kvm"]
fn control_markers_open_a_window_over_a_frozen_base() {
    let img = Images::new();
    let steps = format!(
        "pmem-store:0x100:1;blk-write:1:0x11;marker:{MARKER_TRACE_ON:#x};pmem-store:0x108:2;blk-write:2:0x22;marker:{MARKER_TRACE_OFF:#x};pmem-store:0x110:3"
    );
    let r = run_steps(&img, &steps, "");
    assert_exit(&r, ExitCode::Success);
    assert_eq!(r.windows.len(), 1, "{}", describe(&r));
    let w = &r.windows[0];
    assert!(!w.open_at_end);
    assert_eq!(w.trace.len(), 2, "{:?}", w.trace.events());
    assert_eq!(
        w.trace.events()[0],
        Event::PmemStore {
            offset: 0x108,
            len: 8,
            value: 2
        }
    );
    // Only the window's store exited; the others ran at full speed.
    assert_eq!(r.stats.traced_stores, 1);
    assert_eq!(r.pmem.read_u64(0x110).unwrap(), 3);

    // The base holds what was stored before the window, not what came in it.
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let saved = w.save(dir.as_path()).unwrap();
    let mut b = [0u8; 8];
    saved.base_pmem_read(0x100, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 1);
    saved.base_pmem_read(0x108, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0);
    let mut s = [0u8; 512];
    saved.base_disk_read(512, &mut s).unwrap();
    assert_eq!(s, [0x11; 512]);
    saved.base_disk_read(1024, &mut s).unwrap();
    assert_eq!(s, [0; 512]);
}

#[test]
#[ignore = "needs /dev/kvm"]
fn crash_images_hold_exactly_the_chosen_writes_and_boot() {
    let img = Images::new();
    let mut c = img.config(
        "harness.test=pmem-store:0x1000:0xaa;pmem-store:0x2000:0xbb;pmem-flush;pmem-store:0x3000:0xcc;blk-write:5:0x11;blk-write:6:0x22",
    );
    c.trace = true;
    let r = vmm::run(c).unwrap();
    assert_exit(&r, ExitCode::Success);
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let saved = r.windows[0].save(dir.as_path()).unwrap();
    let ev = saved.trace.events().to_vec();
    assert_eq!(ev.len(), 6, "{ev:?}");
    let cut = ev.len() as u64;
    assert_eq!(saved.trace.pending_at(cut), vec![3, 4, 5]);

    // Flushed stores, plus the pending 0x3000 store and blk write 6 only.
    let crash = saved.build_flushed_plus(cut, &[3, 5]).unwrap();
    let p = |off| crash.pmem.read_u64(off).unwrap();
    assert_eq!((p(0x1000), p(0x2000), p(0x3000)), (0xaa, 0xbb, 0xcc));
    let mut s = [0u8; 512];
    crash.disk.read(5 * 512, &mut s).unwrap();
    assert_eq!(s, [0; 512], "blk write 4 was not chosen");
    crash.disk.read(6 * 512, &mut s).unwrap();
    assert_eq!(s, [0x22; 512]);
    // Nothing else differs from the base: one private page per store page.
    assert_eq!(crash.pmem.private_pages().unwrap().len(), 3);
    assert_eq!(crash.disk.overlay().len(), 1);

    // An explicit subset: only the second store.
    let crash2 = saved.build(2, &[WriteRef { event: 1, part: 0 }]).unwrap();
    assert_eq!(crash2.pmem.read_u64(0x1000).unwrap(), 0);
    assert_eq!(crash2.pmem.read_u64(0x2000).unwrap(), 0xbb);

    // The crash images boot as the next run's devices.
    let mut c = img.config("harness.test=blk-read:5:0;blk-read:6:0x22");
    c.pmem = crash.pmem;
    c.disk = crash.disk;
    let r2 = vmm::run(c).unwrap();
    assert_exit(&r2, ExitCode::Success);
    assert_eq!(r2.pmem.read_u64(0x3000).unwrap(), 0xcc);
}

#[test]
#[ignore = "needs /dev/kvm"]
fn blk_read_sees_what_was_written() {
    let img = Images::new();
    let r = run_steps(&img, "blk-write:9:0x5a;blk-flush;blk-read:9:0x5a", "");
    assert_exit(&r, ExitCode::Success);
    let r = run_steps(&img, "blk-read:9:0x5a", "");
    assert_exit(&r, ExitCode::StepFailed);
}

#[test]
#[ignore = "needs /dev/kvm"]
fn spinning_guest_times_out_with_its_registers() {
    let img = Images::new();
    let mut c = img.config("harness.test=spin");
    c.timeout = Duration::from_millis(500);
    let t0 = std::time::Instant::now();
    let r = vmm::run(c).unwrap();
    let took = t0.elapsed();
    match r.outcome {
        Outcome::Timeout { regs } => {
            assert_ne!(regs.rip, 0, "{regs:?}");
            assert_ne!(regs.cr3, 0, "{regs:?}");
        }
        _ => panic!("{}", describe(&r)),
    }
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
#[ignore = "needs /dev/kvm"]
fn touching_an_unmapped_address_reports_a_page_fault() {
    let img = Images::new();
    let r = run_steps(&img, "touch:0xdead0000", "");
    assert_exit(&r, ExitCode::Exception);
    let rep = r
        .messages
        .iter()
        .find_map(|m| m.exception())
        .unwrap_or_else(|| panic!("no exception report: {}", describe(&r)));
    assert_eq!(rep.vector, 14);
    assert_eq!(rep.cr2, 0xdead_0000);
    assert_ne!(rep.rip, 0);
}

#[test]
#[ignore = "needs /dev/kvm"]
fn write_through_images_keep_what_the_guest_flushed() {
    let img = Images::new();
    let mut c =
        img.config("harness.test=pmem-store:0x2000:0x77;pmem-flush;blk-write:2:0x99;blk-flush");
    c.pmem = vmm::PmemRegion::open(&img.pmem(), vmm::ImageMode::WriteThrough).unwrap();
    c.disk = vmm::DiskImage::open(&img.disk(), vmm::ImageMode::WriteThrough).unwrap();
    let r = vmm::run(c).unwrap();
    assert_exit(&r, ExitCode::Success);
    drop(r);
    let mut b = [0u8; 8];
    std::fs::File::open(img.pmem())
        .unwrap()
        .read_exact_at(&mut b, 0x2000)
        .unwrap();
    assert_eq!(u64::from_le_bytes(b), 0x77);
    let mut s = [0u8; 512];
    std::fs::File::open(img.disk())
        .unwrap()
        .read_exact_at(&mut s, 1024)
        .unwrap();
    assert_eq!(s, [0x99; 512]);
    // Tracing is refused on write-through images: there is no frozen base.
    let mut c = img.config("");
    c.pmem = vmm::PmemRegion::open(&img.pmem(), vmm::ImageMode::WriteThrough).unwrap();
    c.trace = true;
    assert!(matches!(
        vmm::run(c),
        Err(vmm::VmError::TraceNeedsCopyOnWrite)
    ));
}

fn faults(writes: &[&str], flushes: &[&str]) -> vmm::BlkFaults {
    vmm::BlkFaults {
        fail_writes: writes.iter().map(|s| s.parse().unwrap()).collect(),
        fail_flushes: flushes.iter().map(|s| s.parse().unwrap()).collect(),
    }
}

/// The guest's error message for a failed step, if it sent one.
fn step_error(r: &vmm::RunOutcome) -> String {
    r.messages
        .iter()
        .find(|m| m.kind() == Some(MessageKind::Error))
        .map(|m| m.text())
        .unwrap_or_else(|| panic!("no error message: {}", describe(r)))
}

fn disk_sector(disk: &vmm::DiskImage, sector: u64) -> [u8; 512] {
    let mut s = [0u8; 512];
    disk.read(sector * 512, &mut s).unwrap();
    s
}

#[test]
#[ignore = "needs /dev/kvm"]
fn failed_blk_flush_is_a_step_failure_and_no_barrier_in_the_trace() {
    let img = Images::new();
    let mut c = img.config("harness.test=blk-write:1:7;blk-flush");
    c.trace = true;
    c.blk_faults = faults(&[], &["1"]);
    let r = vmm::run(c).unwrap();
    assert_exit(&r, ExitCode::StepFailed);
    let err = step_error(&r);
    assert!(err.contains("step 2 `blk-flush` failed"), "{err}");
    // The write went through; the failed flush is not in the trace, so the
    // write is still pending at the end of the window.
    assert_eq!(disk_sector(&r.disk, 1), [7; 512]);
    let t = r.trace();
    assert!(
        matches!(
            t.events(),
            [Event::BlkWrite {
                sector: 1,
                len: 512,
                ..
            }]
        ),
        "{:?}",
        t.events()
    );
    assert_eq!(t.pending_at(t.len() as u64), vec![0]);
    assert_eq!(
        r.blk_faults,
        vec![vmm::InjectedFault {
            kind: vmm::BlkRequest::Flush,
            nth: 1,
            sector: None,
            trace_pos: Some((0, 1)),
        }]
    );

    // Without the plan the same steps pass and the flush is a barrier.
    let mut c = img.config("harness.test=blk-write:1:7;blk-flush");
    c.trace = true;
    let r = vmm::run(c).unwrap();
    assert_exit(&r, ExitCode::Success);
    assert_eq!(r.trace().events().last(), Some(&Event::BlkFlush));
    assert!(r.blk_faults.is_empty());
}

#[test]
#[ignore = "needs /dev/kvm"]
fn every_flush_from_the_second_on_fails() {
    let img = Images::new();
    let mut c = img.config("harness.test=blk-flush;blk-flush");
    c.blk_faults = faults(&[], &["2+"]);
    let r = vmm::run(c).unwrap();
    assert_exit(&r, ExitCode::StepFailed);
    let err = step_error(&r);
    assert!(err.contains("step 2 `blk-flush` failed"), "{err}");
    // The guest's driver may flush on its own at start-up; whatever it did,
    // the first failure is flush 2 and every later flush fails too.
    assert_eq!(
        r.blk_faults.first().map(|f| f.nth),
        Some(2),
        "{:?}",
        r.blk_faults
    );
    assert!(r
        .blk_faults
        .iter()
        .all(|f| f.kind == vmm::BlkRequest::Flush));
}

#[test]
#[ignore = "needs /dev/kvm"]
fn failed_blk_write_leaves_the_disk_and_its_overlay_unchanged() {
    let img = Images::new();
    // Sector 2 of the file holds 0x33 before the run.
    std::fs::OpenOptions::new()
        .write(true)
        .open(img.disk())
        .unwrap()
        .write_all_at(&[0x33; 512], 2 * 512)
        .unwrap();
    let steps = "harness.test=blk-write:1:7;blk-write:2:9";
    // Copy-on-write: the overlay keeps sector 1's write, not sector 2's.
    let mut c = img.config(steps);
    c.trace = true;
    c.blk_faults = faults(&["2"], &[]);
    let r = vmm::run(c).unwrap();
    assert_exit(&r, ExitCode::StepFailed);
    let err = step_error(&r);
    assert!(err.contains("step 2 `blk-write:2:9` failed"), "{err}");
    assert_eq!(disk_sector(&r.disk, 1), [7; 512]);
    assert_eq!(disk_sector(&r.disk, 2), [0x33; 512]);
    assert_eq!(r.disk.overlay().len(), 1, "only sector 1 was written");
    assert_eq!(r.trace().len(), 1, "{:?}", r.trace().events());
    assert_eq!(
        r.blk_faults,
        vec![vmm::InjectedFault {
            kind: vmm::BlkRequest::Write,
            nth: 2,
            sector: Some(2),
            trace_pos: Some((0, 1)),
        }]
    );
    // Write-through: the file itself keeps its old sector.
    let mut c = img.config(steps);
    c.disk = vmm::DiskImage::open(&img.disk(), vmm::ImageMode::WriteThrough).unwrap();
    c.blk_faults = faults(&["2"], &[]);
    let r = vmm::run(c).unwrap();
    assert_exit(&r, ExitCode::StepFailed);
    drop(r);
    let f = std::fs::File::open(img.disk()).unwrap();
    let mut s = [0u8; 512];
    f.read_exact_at(&mut s, 512).unwrap();
    assert_eq!(s, [7; 512]);
    f.read_exact_at(&mut s, 2 * 512).unwrap();
    assert_eq!(s, [0x33; 512]);
}

/// No KVM needed: the plan is checked before anything else, even the kernel.
#[test]
fn a_plan_with_a_zeroth_request_is_refused_before_boot() {
    let img = Images::new();
    let mut c = vmm::VmConfig::new("/no/such/kernel", "", &img.pmem(), &img.disk()).unwrap();
    c.blk_faults.fail_flushes.push(vmm::FaultWhen {
        nth: 0,
        onward: false,
    });
    let e = vmm::run(c).unwrap_err();
    assert!(
        matches!(e, vmm::VmError::Faults(vmm::FaultError::ZeroNth)),
        "{e}"
    );
}
