//! Fork-server figures (`cargo xtask bench`, or `cargo bench -p vmm --bench
//! fork` with the guest built): one recovery boot in a fresh VM and from the
//! fork-server's snapshot, side by side, and where the fork-server's time
//! goes (putting RAM and the vCPU back, the run, after the run), plus the
//! cost of pmem pages a guest touches for the first time. Medians of `RUNS`.
//! Needs /dev/kvm and the guest kernel.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::{DiskImage, ForkConfig, ForkServer, ImageMode, PmemRegion, RunOutcome};
use vmm_sys_util::tempdir::TempDir;

const RUNS: usize = 50;

fn images(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let p = (
        dir.join(format!("{name}.pmem")),
        dir.join(format!("{name}.disk")),
    );
    vmm::memory::create_sparse_file(&p.0, 512 << 20).unwrap();
    vmm::memory::create_sparse_file(&p.1, 16 << 20).unwrap();
    p
}

fn open(p: &(PathBuf, PathBuf)) -> (PmemRegion, DiskImage) {
    (
        PmemRegion::open(&p.0, ImageMode::CopyOnWrite).unwrap(),
        DiskImage::open(&p.1, ImageMode::CopyOnWrite).unwrap(),
    )
}

fn ok(r: RunOutcome) -> RunOutcome {
    assert_eq!(r.outcome.exit_code(), Some(0), "{:?}", r.summary());
    r
}

fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    v[v.len() / 2] as f64 / 1e6
}

fn main() {
    let kernel = common::guest();
    let dir = TempDir::new().unwrap();
    let blank = images(dir.as_path(), "blank");
    let formatted = images(dir.as_path(), "formatted");
    let mut c = vmm::VmConfig::new(
        &kernel,
        "pcache.run=start:mode=strict pcache.markers=off",
        &formatted.0,
        &formatted.1,
    )
    .unwrap();
    c.pmem = PmemRegion::open(&formatted.0, ImageMode::WriteThrough).unwrap();
    ok(vmm::run(c).unwrap());

    let recovery = "pcache.run=start:mode=strict;stop;start:mode=strict pcache.markers=off";
    let verify =
        "pcache.run=start:mode=strict;verify:0:0x4000;stop;start:mode=strict pcache.markers=off";
    let pages: Vec<String> = (0..100)
        .map(|k| format!("pmem-store:{}:1", 0x10_0000 + k * 4096))
        .collect();
    let one_page: Vec<String> = (0..100)
        .map(|k| format!("pmem-store:{}:1", 0x10_0000 + k * 8))
        .collect();
    let cases = [
        (
            "recovery start;stop;start, formatted, CPU fences",
            format!("{recovery} pcache.fences=cpu"),
            &formatted,
        ),
        ("same, FLUSH fences", recovery.to_string(), &formatted),
        (
            "recovery with verify:0:0x4000, formatted, CPU fences",
            format!("{verify} pcache.fences=cpu"),
            &formatted,
        ),
        (
            "recovery start;stop;start, blank (a format), CPU fences",
            format!("{recovery} pcache.fences=cpu"),
            &blank,
        ),
        (
            "recovery start;stop;start, blank (a format), FLUSH fences",
            recovery.to_string(),
            &blank,
        ),
        (
            "100 pmem stores, 100 pages",
            format!("harness.test={}", pages.join(";")),
            &blank,
        ),
        (
            "100 pmem stores, one page",
            format!("harness.test={}", one_page.join(";")),
            &blank,
        ),
    ];
    println!("fork-server figures, medians of {RUNS} runs, ms");
    println!(
        "{:58} {:>7} {:>7} {:>8} {:>6} {:>7} {:>6}",
        "run", "fresh", "fork", "restore", "run", "after", "boot"
    );
    for (what, line, image) in &cases {
        let mut cfg = ForkConfig::new(&kernel, line.as_str());
        cfg.timeout = Duration::from_secs(20);
        let fresh: Vec<u64> = (0..RUNS)
            .map(|_| {
                let (pmem, disk) = open(image);
                ok(vmm::run(cfg.fresh(pmem, disk)).unwrap()).stats.total_ns
            })
            .collect();
        // As the scenario runner uses it: the run's pmem writes are not
        // copied back into the region it was given.
        let mut server = ForkServer::new(ForkConfig {
            pmem_writes_back: false,
            ..cfg.clone()
        });
        let (mut total, mut run, mut after) = (vec![], vec![], vec![]);
        for _ in 0..RUNS {
            let (pmem, disk) = open(image);
            let s = ok(server.run(pmem, disk).unwrap()).stats;
            total.push(s.total_ns);
            run.push(s.stop_ns - s.setup_ns);
            after.push(s.total_ns - s.stop_ns);
        }
        let st = server.stats();
        println!(
            "{what:58} {:7.3} {:7.3} {:8.3} {:6.3} {:7.3} {:6.2}",
            median(fresh),
            median(total),
            st.restore_ns as f64 / st.runs as f64 / 1e6,
            median(run),
            median(after),
            st.boot_ns as f64 / st.boots as f64 / 1e6,
        );
    }
    println!(
        "fork: total per run; restore: RAM and vCPU back to the snapshot (mean); run: first \
         KVM_RUN to the guest's exit; after: noting the pmem pages the run wrote (not copied \
         back into its region, as in the scenario runner); boot: boot to the snapshot point \
         (once per server)"
    );
}
