//! The guest kernel carrying the pcache module (`pcache.run=` steps) under
//! KVM: a blank 512 MiB pmem file and a 64 MiB disk; `start` formats exactly
//! what the host's `cargo xtask format` makes, a second boot opens it, a torn
//! superblock is refused (strict) or formatted again (recover), the crash-point
//! markers and every traced store match the host module's own sequence,
//! exceptions from `fault:` steps reach the ring-0 print path, malformed
//! commands and failing steps are reported.
//!
//! Needs the guest built (`cargo xtask build-guest`, or `$PCACHE_GUEST`).

mod common;

use std::cell::RefCell;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use common::{describe, guest_kernel};
use pcache::format::{PCACHE_MAGIC, SB_OFF};
use pcache::pmem::MmapPmem;
use pcache::{activate, CrashPoint, Hooks, Mode, NoHooks, Options, Outcome, Pmem, SparsePmem};
use protocol::markers::{crash_point_begin, crash_point_end, decode_crash_point};
use protocol::{ExitCode, MessageKind};
use serde_json::Value;
use vmm::{Event, ImageMode, Outcome as VmOutcome, RunOutcome, VmConfig};
use vmm_sys_util::tempdir::TempDir;

const PMEM_SIZE: u64 = 512 << 20;
const DISK_SIZE: u64 = 64 << 20;
/// `fault:pf` reads this unmapped address (guest-images/src/pcache_run.rs).
const FAULT_PF_ADDRESS: u64 = 0x40_0000_0000;

/// A scratch directory with a blank sparse 512 MiB pmem file and a 64 MiB disk.
struct Dev {
    dir: TempDir,
}

impl Dev {
    fn new() -> Self {
        let dir = TempDir::new().expect("temp dir");
        let d = Dev { dir };
        vmm::memory::create_sparse_file(&d.pmem(), PMEM_SIZE).unwrap();
        vmm::memory::create_sparse_file(&d.disk(), DISK_SIZE).unwrap();
        d
    }

    fn pmem(&self) -> PathBuf {
        self.dir.as_path().join("pmem.img")
    }

    fn disk(&self) -> PathBuf {
        self.dir.as_path().join("disk.img")
    }

    fn config(&self, cmdline: &str) -> VmConfig {
        let mut c = VmConfig::new(guest_kernel(), cmdline, &self.pmem(), &self.disk()).unwrap();
        c.timeout = Duration::from_secs(20);
        c
    }

    /// A run on copy-on-write views: the files stay as they are.
    fn run(&self, cmdline: &str) -> RunOutcome {
        vmm::run(self.config(cmdline)).expect("the VMM runs")
    }

    /// A run whose pmem stores reach the file.
    fn run_write_through(&self, cmdline: &str) -> RunOutcome {
        let mut c = self.config(cmdline);
        c.pmem = vmm::PmemRegion::open(&self.pmem(), ImageMode::WriteThrough).unwrap();
        vmm::run(c).expect("the VMM runs")
    }
}

fn assert_exit(r: &RunOutcome, code: ExitCode) {
    assert_eq!(
        r.outcome,
        VmOutcome::Exited { code: code as u32 },
        "{}",
        describe(r)
    );
}

/// Every `StepResult` message, parsed.
fn results(r: &RunOutcome) -> Vec<Value> {
    r.messages
        .iter()
        .filter(|m| m.kind() == Some(MessageKind::StepResult))
        .map(|m| {
            serde_json::from_slice(&m.payload)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", m.text()))
        })
        .collect()
}

fn errors(r: &RunOutcome) -> Vec<String> {
    r.messages
        .iter()
        .filter(|m| m.kind() == Some(MessageKind::Error))
        .map(|m| m.text())
        .collect()
}

/// The reports of the `start` results, in order.
fn start_reports(r: &RunOutcome) -> Vec<Value> {
    results(r)
        .into_iter()
        .filter(|v| v["step"] == "start")
        .map(|v| v["report"].clone())
        .collect()
}

/// The one `start` report of a run that must have exited with success.
fn only_start(r: &RunOutcome) -> Value {
    assert_exit(r, ExitCode::Success);
    let mut s = start_reports(r);
    assert_eq!(s.len(), 1, "{}", describe(r));
    s.pop().unwrap()
}

/// What `cargo xtask format` makes (xtask/src/image.rs): a sparse file and a
/// first activation through `MmapPmem`.
fn host_format(path: &Path, mode: Mode) {
    vmm::memory::create_sparse_file(path, PMEM_SIZE).unwrap();
    let mut pmem = MmapPmem::open(path).unwrap();
    let report = activate(
        &mut pmem,
        &Options {
            mode,
            data_crc: false,
        },
        &mut NoHooks,
    );
    assert_eq!(report.outcome, Outcome::Formatted, "{report}");
    pmem.sync_all().unwrap();
}

/// Compares two files byte by byte; names the first difference.
fn assert_same_bytes(a: &Path, b: &Path) {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    assert_eq!(
        fa.metadata().unwrap().len(),
        fb.metadata().unwrap().len(),
        "sizes differ"
    );
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = fa.read(&mut ba).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if n == 0 {
            break;
        }
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!(
                "{} and {} differ at byte {:#x}: {:#04x} vs {:#04x}",
                a.display(),
                b.display(),
                pos + i as u64,
                ba[i],
                bb[i]
            );
        }
        pos += n as u64;
    }
}

#[test]
#[ignore = "needs /dev/kvm"]
fn start_formats_a_blank_device_exactly_as_the_host_and_a_second_boot_opens_it() {
    for (mode, step) in [
        (Mode::Recover, "start"),
        (Mode::Strict, "start:mode=strict"),
    ] {
        let dev = Dev::new();
        let r = dev.run_write_through(&format!("pcache.run={step}"));
        let rep = only_start(&r);
        assert_eq!(rep["outcome"], "formatted", "{rep}");
        assert_eq!(rep["mode"], mode.to_string(), "{rep}");
        assert_eq!(rep["device_size"], PMEM_SIZE);
        assert_eq!(rep["superblock"]["state"], "unformatted", "{rep}");
        assert_eq!(rep["cache_info"]["seq"], 1, "{rep}");
        drop(r);

        let host = dev.dir.as_path().join("host.img");
        host_format(&host, mode);
        assert_same_bytes(&dev.pmem(), &host);

        // A second boot opens the cache and writes cache_info seq 2.
        let rep = only_start(&dev.run(&format!("pcache.run={step}")));
        assert_eq!(rep["outcome"], "opened", "{rep}");
        assert_eq!(rep["superblock"]["state"], "valid", "{rep}");
        assert_eq!(rep["cache_info"]["seq"], 2, "{rep}");
        assert_eq!(rep["log"]["ksets"], 0, "{rep}");
    }
}

#[test]
#[ignore = "needs /dev/kvm"]
fn the_runs_result_image_is_the_host_format_too() {
    // Copy-on-write run: the guest's image is read from `RunOutcome::pmem`.
    let dev = Dev::new();
    let r = dev.run("pcache.run=start");
    assert_eq!(only_start(&r)["outcome"], "formatted");
    let mut host = SparsePmem::new(PMEM_SIZE);
    activate(&mut host, &Options::default(), &mut NoHooks);
    let mut g = vec![0u8; 1 << 20];
    let mut h = vec![0u8; 1 << 20];
    for off in (0..PMEM_SIZE).step_by(1 << 20) {
        r.pmem.read(off, &mut g).unwrap();
        host.read(off, &mut h).unwrap();
        assert!(g == h, "the guest's image differs in MiB {}", off >> 20);
    }
    // The file itself is untouched.
    let mut b = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&File::open(dev.pmem()).unwrap(), &mut b, SB_OFF + 8)
        .unwrap();
    assert_eq!(b, [0; 8]);
}

#[test]
#[ignore = "needs /dev/kvm"]
fn a_torn_superblock_is_refused_in_strict_mode_and_formatted_again_in_recover_mode() {
    let dev = Dev::new();
    // Only the superblock's magic word persisted.
    std::os::unix::fs::FileExt::write_all_at(
        &File::options().write(true).open(dev.pmem()).unwrap(),
        &PCACHE_MAGIC.to_le_bytes(),
        SB_OFF + 8,
    )
    .unwrap();

    let r = dev.run("pcache.run=start:mode=strict");
    let rep = only_start(&r);
    assert_eq!(rep["outcome"], "refused", "{rep}");
    assert_eq!(rep["superblock"]["state"], "crc-mismatch", "{rep}");
    assert!(rep["message"].is_string(), "{rep}");
    assert!(rep["refusal"]["kind"].is_string(), "{rep}");
    // A refusal writes nothing.
    assert_eq!(r.pmem.read_u64(SB_OFF).unwrap(), 0);
    assert_eq!(r.pmem.read_u64(SB_OFF + 8).unwrap(), PCACHE_MAGIC);

    let rep = only_start(&dev.run("pcache.run=start:mode=recover"));
    assert_eq!(rep["outcome"], "format-redone", "{rep}");
    assert_eq!(rep["cache_info"]["seq"], 1, "{rep}");

    // A refusal is a result, not a failure: the next steps run.
    let r = dev.run("pcache.run=start:mode=strict;status;start;status");
    assert_exit(&r, ExitCode::Success);
    let v = results(&r);
    assert_eq!(v.len(), 4, "{}", describe(&r));
    assert_eq!(v[0]["report"]["outcome"], "refused");
    assert_eq!(v[1]["active"], false);
    assert_eq!(v[1]["report"]["outcome"], "refused");
    assert_eq!(v[2]["report"]["outcome"], "format-redone");
    assert_eq!(v[3]["active"], true);
    assert_eq!(v[3]["report"]["outcome"], "format-redone");
}

#[test]
#[ignore = "needs /dev/kvm"]
fn status_stop_marker_and_trace_steps_report_their_results() {
    let dev = Dev::new();
    let r = dev.run(
        "pcache.run=status;start:data_crc=true;status;stop;status;marker:0x1234;trace:on;trace:off",
    );
    assert_exit(&r, ExitCode::Success);
    let v = results(&r);
    assert_eq!(v.len(), 8, "{}", describe(&r));
    assert_eq!(
        v[0],
        serde_json::json!({"step": "status", "active": false, "dm_status": null, "report": null})
    );
    assert_eq!(v[1]["report"]["outcome"], "formatted");
    assert_eq!(v[1]["report"]["data_crc_option"], true);
    assert_eq!(v[2]["active"], true);
    assert_eq!(v[2]["report"], v[1]["report"]);
    // The live status line: data_crc on (flags 0x1183), nothing logged yet.
    assert_eq!(v[2]["dm_status"], "0 31 31 1 70 1183 0:0 0:0 0:0");
    assert_eq!(v[3], serde_json::json!({"step": "stop"}));
    assert_eq!(v[4]["active"], false);
    assert_eq!(v[4]["report"], v[1]["report"]);
    assert_eq!(v[5], serde_json::json!({"step": "marker", "id": 0x1234}));
    assert_eq!(v[6], serde_json::json!({"step": "trace", "on": true}));
    assert_eq!(v[7], serde_json::json!({"step": "trace", "on": false}));
    assert!(r.markers.iter().any(|m| m.id == 0x1234), "{:?}", r.markers);
    assert_eq!(r.windows.len(), 1, "trace:on/off open and close a window");
    assert!(r.windows[0].trace.events().is_empty());
}

#[test]
#[ignore = "needs /dev/kvm"]
fn steps_that_cannot_run_fail_with_step_failed() {
    let dev = Dev::new();
    let r = dev.run("pcache.run=stop");
    assert_exit(&r, ExitCode::StepFailed);
    assert!(results(&r).is_empty(), "{}", describe(&r));
    let e = errors(&r);
    assert_eq!(e.len(), 1, "{}", describe(&r));
    assert!(
        e[0].contains("`stop`") && e[0].contains("no cache is active"),
        "{e:?}"
    );

    let r = dev.run("pcache.run=start;start;status");
    assert_exit(&r, ExitCode::StepFailed);
    assert_eq!(start_reports(&r).len(), 1, "{}", describe(&r));
    assert_eq!(
        results(&r).len(),
        1,
        "status must not run: {}",
        describe(&r)
    );
    let e = errors(&r);
    assert!(
        e.len() == 1 && e[0].contains("step 2") && e[0].contains("already active"),
        "{e:?}"
    );
}

#[test]
#[ignore = "needs /dev/kvm"]
fn malformed_commands_are_errors_and_nothing_runs() {
    let dev = Dev::new();
    for (cmdline, names) in [
        ("pcache.run=start;marker:1;bogus:2", "step 3 `bogus:2`"),
        ("pcache.run=start:mode=fast", "step 1 `start:mode=fast`"),
        ("pcache.run=start;;status", "step 2 ``"),
        ("pcache.run=start;trace:maybe", "step 2 `trace:maybe`"),
        ("pcache.run=start;fault:nmi", "step 2 `fault:nmi`"),
        ("pcache.run=start pcache.run=status", "more than once"),
        ("pcache.run=start pcache.markers=maybe", "pcache.markers"),
        (
            "pcache.run=start pcache.markers",
            "pcache.markers=``: expected `on` or `off`",
        ),
        (
            "pcache.run=start pcache.markers=off pcache.markers=on",
            "pcache.markers= given more than once",
        ),
        ("pcache.run=start harness.test=nope", "step 1 `nope`"),
    ] {
        let r = dev.run(cmdline);
        assert_exit(&r, ExitCode::BadCommand);
        let e = errors(&r);
        assert_eq!(e.len(), 1, "{cmdline}: {}", describe(&r));
        assert!(e[0].contains(names), "{cmdline}: {e:?}");
        assert!(results(&r).is_empty(), "{cmdline}: {}", describe(&r));
        // No step ran: no marker (beyond the ring-3 one), nothing stored.
        assert!(
            r.markers
                .iter()
                .all(|m| m.id == protocol::MARKER_RING3_ENTERED),
            "{cmdline}: {:?}",
            r.markers
        );
        assert_eq!(r.pmem.read_u64(SB_OFF + 8).unwrap(), 0, "{cmdline}");
    }
}

#[test]
#[ignore = "needs /dev/kvm"]
fn faults_are_reported_with_their_vector_through_the_ring0_print_path() {
    let dev = Dev::new();
    for (fault, vector) in [("pf", 14), ("ud", 6), ("gp", 13), ("de", 0)] {
        // A step before the fault runs; the one after it never does.
        let r = dev.run(&format!("pcache.run=marker:7;fault:{fault};marker:8"));
        assert_exit(&r, ExitCode::Exception);
        let reports: Vec<_> = r.messages.iter().filter_map(|m| m.exception()).collect();
        assert_eq!(reports.len(), 1, "{fault}: {}", describe(&r));
        let rep = reports[0];
        assert_eq!(rep.vector, vector, "{fault}: {rep:?}");
        assert_ne!(rep.rip, 0, "{fault}: {rep:?}");
        if fault == "pf" {
            assert_eq!(rep.cr2, FAULT_PF_ADDRESS, "{rep:?}");
        } else {
            assert_eq!(rep.cr2, 0, "{fault}: {rep:?}");
        }
        assert_eq!(results(&r).len(), 1, "{fault}: {}", describe(&r));
        assert!(r.markers.iter().any(|m| m.id == 7));
        assert!(!r.markers.iter().any(|m| m.id == 8));
    }
}

/// What the host module does, in the trace's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    Store(u64, u64),
    Flush,
    Marker(u32),
}

/// A host `Pmem` that records what the guest's backend would put in the
/// trace: each 8-byte store, zeroing only of non-zero words, and a FLUSH per
/// fence that follows a store.
struct Recorder {
    dev: SparsePmem,
    log: Rc<RefCell<Vec<Ev>>>,
    dirty: bool,
}

impl Pmem for Recorder {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), pcache::PmemError> {
        self.dev.read(off, buf)
    }
    fn store_u64(&mut self, off: u64, val: u64) -> Result<(), pcache::PmemError> {
        self.dev.store_u64(off, val)?;
        self.log.borrow_mut().push(Ev::Store(off, val));
        self.dirty = true;
        Ok(())
    }
    fn zero_range(&mut self, off: u64, len: u64) -> Result<(), pcache::PmemError> {
        for o in (off..off + len).step_by(8) {
            let mut b = [0u8; 8];
            self.dev.read(o, &mut b)?;
            if b != [0; 8] {
                self.store_u64(o, 0)?;
            }
        }
        Ok(())
    }
    fn flush(&mut self, off: u64, len: u64) -> Result<(), pcache::PmemError> {
        self.dev.flush(off, len)
    }
    fn fence(&mut self) -> Result<(), pcache::PmemError> {
        if self.dirty {
            self.log.borrow_mut().push(Ev::Flush);
            self.dirty = false;
        }
        Ok(())
    }
}

struct MarkerLog(Rc<RefCell<Vec<Ev>>>);

impl Hooks for MarkerLog {
    fn begin(&mut self, cp: CrashPoint) {
        self.0
            .borrow_mut()
            .push(Ev::Marker(crash_point_begin(cp.number())));
    }
    fn end(&mut self, cp: CrashPoint) {
        self.0
            .borrow_mut()
            .push(Ev::Marker(crash_point_end(cp.number())));
    }
}

fn crash_points(ev: &[Ev]) -> Vec<(u32, bool)> {
    ev.iter()
        .filter_map(|e| match e {
            Ev::Marker(id) => decode_crash_point(*id),
            _ => None,
        })
        .collect()
}

#[test]
#[ignore = "needs /dev/kvm"]
fn crash_point_markers_and_stores_are_traced_in_the_modules_order() {
    let dev = Dev::new();
    let r = dev.run("pcache.run=trace:on;start;trace:off");
    assert_eq!(only_start(&r)["outcome"], "formatted");
    assert_eq!(r.windows.len(), 1, "{}", describe(&r));
    let guest: Vec<Ev> = r.windows[0]
        .trace
        .events()
        .iter()
        .map(|e| match *e {
            Event::PmemStore { offset, len, value } => {
                assert_eq!(len, 8, "every traced store is one 8-byte word");
                Ev::Store(offset, value)
            }
            Event::PmemFlush => Ev::Flush,
            Event::Marker { id } => Ev::Marker(id),
            ref e => panic!("unexpected event {e:?}"),
        })
        .collect();

    // The host module on the same blank device, same options.
    let log = Rc::new(RefCell::new(Vec::new()));
    let mut host = Recorder {
        dev: SparsePmem::new(PMEM_SIZE),
        log: log.clone(),
        dirty: false,
    };
    let rep = activate(&mut host, &Options::default(), &mut MarkerLog(log.clone()));
    assert_eq!(rep.outcome, Outcome::Formatted);
    let expected = log.borrow().clone();
    assert_eq!(guest.len(), expected.len(), "event counts differ");
    assert!(
        guest == expected,
        "the guest's trace differs from the module's sequence"
    );

    // C1..C7 all appear, brackets nest, and the sequences come in the
    // format's order: C1 zeroing, C2 superblock, the segment formats (C3
    // holding C7 and C6), then C5 tails and C4 cache_info last.
    let cps = crash_points(&guest);
    let mut stack = Vec::new();
    for &(n, end) in &cps {
        if end {
            assert_eq!(stack.pop(), Some(n), "unbalanced C{n} in {cps:?}");
        } else {
            stack.push(n);
        }
    }
    assert!(stack.is_empty());
    let begins: Vec<u32> = cps.iter().filter(|c| !c.1).map(|c| c.0).collect();
    for n in 1..=7 {
        assert!(begins.contains(&n), "C{n} missing: {begins:?}");
    }
    let first = |n| begins.iter().position(|&b| b == n).unwrap();
    let last = |n| begins.iter().rposition(|&b| b == n).unwrap();
    assert_eq!(begins[0], 1, "{begins:?}");
    assert_eq!(begins[1], 2, "{begins:?}");
    assert!(first(3) > 1 && first(7) > first(3) && first(6) > first(3));
    assert!(first(5) > last(3) && first(4) > last(5), "{begins:?}");
    assert_eq!(*begins.last().unwrap(), 4, "{begins:?}");
    // Every store lies inside a bracket.
    let mut depth = 0i32;
    for e in &guest {
        match e {
            Ev::Marker(id) => match decode_crash_point(*id) {
                Some((_, false)) => depth += 1,
                Some((_, true)) => depth -= 1,
                None => {}
            },
            Ev::Store(..) => assert!(depth > 0, "a store outside every crash point"),
            Ev::Flush => {}
        }
    }

    // The run's marker list has them too, also with an explicit `on`;
    // markers off removes every one.
    assert!(r.markers.iter().any(|m| m.id == crash_point_begin(1)));
    let on = dev.run("pcache.run=start pcache.markers=on");
    assert_eq!(only_start(&on)["outcome"], "formatted");
    let on_ids: Vec<u32> = on
        .markers
        .iter()
        .map(|m| m.id)
        .filter(|&id| decode_crash_point(id).is_some())
        .collect();
    let expected_ids: Vec<u32> = expected
        .iter()
        .filter_map(|e| match e {
            Ev::Marker(id) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(on_ids, expected_ids);
    let r = dev.run("pcache.run=trace:on;start;trace:off pcache.markers=off");
    assert_eq!(only_start(&r)["outcome"], "formatted");
    assert!(
        r.markers.iter().all(|m| decode_crash_point(m.id).is_none()),
        "{:?}",
        r.markers
    );
    let ev = r.windows[0].trace.events();
    assert!(
        ev.iter().all(|e| !matches!(e, Event::Marker { .. })),
        "{ev:?}"
    );
    // The same stores and flushes, without the markers.
    let no_markers: Vec<Ev> = expected
        .iter()
        .copied()
        .filter(|e| !matches!(e, Ev::Marker(_)))
        .collect();
    assert_eq!(ev.len(), no_markers.len());
}

#[test]
#[ignore = "needs /dev/kvm"]
fn harness_test_steps_still_run_before_the_pcache_steps() {
    let dev = Dev::new();
    let r = dev.run("harness.test=pmem-store:0x100000:5;marker:3 pcache.run=marker:4;start");
    assert_eq!(only_start(&r)["outcome"], "formatted");
    let ids: Vec<u32> = r
        .markers
        .iter()
        .map(|m| m.id)
        .filter(|&id| id == 3 || id == 4)
        .collect();
    assert_eq!(ids, [3, 4]);
    assert_eq!(r.pmem.read_u64(0x10_0000).unwrap(), 5);
}

#[test]
#[ignore = "needs /dev/kvm"]
fn a_writeback_or_gc_longer_than_a_message_reports_its_count() {
    // About a thousand key-sets (FUA writes, flushes and closes of a mixed
    // workload): their writeback and GC lists are longer than one message.
    let dev = Dev::new();
    let r = dev.run(
        "pcache.run=start;gc-percent:0;gen:mixed:seed=5:ops=4000:span=0x800000;writeback;gc;status pcache.markers=off",
    );
    assert_exit(&r, ExitCode::Success);
    let v = results(&r);
    assert_eq!(v.len(), 6, "{}", describe(&r));
    for (k, step) in [(3, "writeback"), (4, "gc")] {
        assert_eq!(v[k]["step"], step);
        assert_eq!(v[k].get("result"), None, "{}", v[k]);
        // Hundreds of key-sets (each entry is 60 to 90 bytes of JSON).
        let n = v[k]["count"].as_u64().unwrap();
        assert!(n > 700, "{step}: {n}");
    }
    // Everything was written back and collected.
    let status = v[5]["dm_status"].as_str().unwrap();
    let f: Vec<&str> = status.split(' ').collect();
    assert_eq!((f[6] == f[7], f[7] == f[8]), (true, true), "{status}");
}

#[test]
#[ignore = "needs /dev/kvm"]
fn data_steps_write_read_verify_writeback_and_gc_through_the_module() {
    let dev = Dev::new();
    let r = dev.run(
        "pcache.run=start;gc-percent:0;write:0:8192:1;write:4096:4096:2:fua;read:0:8192;flush;verify:0:12288;idle;status;stop;start;verify:0:12288",
    );
    assert_exit(&r, ExitCode::Success);
    let v = results(&r);
    assert_eq!(v.len(), 12, "{}", describe(&r));
    assert_eq!(v[2], serde_json::json!({"step": "write", "ops_done": 1}));
    assert_eq!(v[3], serde_json::json!({"step": "write", "ops_done": 2}));
    assert_eq!(v[4]["step"], "read");
    // Sectors 0..8 of write 1, 8..16 of write 2 (it overwrote the second
    // half of write 1), then the disk's zeros: not a tagged sector.
    let runs = serde_json::json!([
        {"sector": 0, "count": 8, "tag": 1},
        {"sector": 8, "count": 8, "tag": 2},
        {"sector": 16, "count": 8, "tag": -1}
    ]);
    assert_eq!(v[6]["runs"], runs);
    assert_eq!(v[7]["step"], "idle");
    assert_eq!(v[7]["result"]["writeback"]["kind"], "clean");
    assert!(
        v[7]["result"]["written_back"].as_u64().unwrap() >= 1,
        "{}",
        v[7]
    );
    // After the idle period every tail is at the log's end.
    let status = v[8]["dm_status"].as_str().unwrap();
    let f: Vec<&str> = status.split(' ').collect();
    assert_eq!((f[6] == f[7], f[7] == f[8]), (true, true), "{status}");
    assert_eq!(v[10]["report"]["outcome"], "opened");
    assert_eq!(v[11]["runs"], runs);
    // One op-done marker per write and flush, in order.
    let done: Vec<u32> = r
        .markers
        .iter()
        .filter_map(|m| protocol::markers::decode_op_done(m.id))
        .collect();
    assert_eq!(done, [0, 1, 2]);
}
