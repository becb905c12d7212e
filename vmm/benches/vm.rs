//! VMM figures (`cargo xtask bench`, or `cargo bench -p vmm --bench vm` with
//! the guest built): VMM start to first ring-3 instruction, boot-to-exit of
//! the guest, VMM setup, cost per traced pmem store, cost per protocol
//! message, crash-image build time and the `vmm` process's peak RSS.
//!
//! Each figure is the median of `RUNS` runs (p90 alongside). Per-store and
//! per-message costs are the difference between a run with `K` of them and a
//! run without, divided by `K`. Needs /dev/kvm and the guest kernel.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm::{VmConfig, WriteRef};
use vmm_sys_util::tempdir::TempDir;

const RUNS: usize = 30;
const K: usize = 150;

struct Env {
    dir: TempDir,
    kernel: PathBuf,
}

impl Env {
    fn config(&self, steps: &str, trace: bool) -> VmConfig {
        let mut c = VmConfig::new(
            &self.kernel,
            if steps.is_empty() {
                String::new()
            } else {
                format!("harness.test={steps}")
            },
            &self.dir.as_path().join("pmem.img"),
            &self.dir.as_path().join("disk.img"),
        )
        .expect("images");
        c.trace = trace;
        c.timeout = Duration::from_secs(30);
        c
    }

    fn run(&self, steps: &str, trace: bool) -> vmm::RunOutcome {
        let r = vmm::run(self.config(steps, trace)).expect("VMM run");
        assert_eq!(
            r.outcome.exit_code(),
            Some(0),
            "{steps}: {:?} {:?}",
            r.outcome,
            r.messages.iter().map(|m| m.text()).collect::<Vec<_>>()
        );
        r
    }
}

#[derive(Clone, Copy)]
struct Stat {
    median: f64,
    p90: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stat {
        median: v[v.len() / 2],
        p90: v[(v.len() * 9 / 10).min(v.len() - 1)],
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn main() {
    // `cargo bench` passes `--bench`; a plain `cargo test --benches` must not run this.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = TempDir::new().unwrap();
    vmm::memory::create_sparse_file(&dir.as_path().join("pmem.img"), 512 << 20).unwrap();
    vmm::memory::create_sparse_file(&dir.as_path().join("disk.img"), 16 << 20).unwrap();
    let env = Env {
        dir,
        kernel: common::guest(),
    };
    // Warm up (opens /dev/kvm, reads the supported CPUID, faults in the binary).
    for _ in 0..3 {
        env.run("", false);
    }

    let mut setup = Vec::new();
    let mut exit = Vec::new();
    let mut stop = Vec::new();
    let mut ring3 = Vec::new();
    let mut ring3_from_marker = true;
    let mut devices = Vec::new();
    for _ in 0..RUNS {
        devices.push(ms(env.run("blk-flush;pmem-flush", false).stats.total_ns));
        let r = env.run("", false);
        setup.push(ms(r.stats.setup_ns));
        exit.push(ms(r.stats.total_ns));
        stop.push(ms(r.stats.stop_ns));
        let r = env.run("marker:1", false);
        match r.ring3_entered_ns() {
            Some(ns) => ring3.push(ms(ns)),
            None => {
                // The guest does not announce ring 3: time its first step instead.
                ring3_from_marker = false;
                let m = r.markers.iter().find(|m| m.id == 1).expect("marker 1");
                ring3.push(ms(m.at_ns));
            }
        }
    }
    let setup = stat(setup);
    let exit = stat(exit);
    let stop = stat(stop);
    let ring3 = stat(ring3);
    let devices = stat(devices);

    let stores: String = (0..K)
        .map(|i| format!("pmem-store:{:#x}:{i}", i * 8))
        .collect::<Vec<_>>()
        .join(";");
    let messages = vec!["message:m"; K].join(";");
    let mut base = Vec::new();
    let mut traced = Vec::new();
    let mut untraced = Vec::new();
    let mut msgs = Vec::new();
    for _ in 0..RUNS {
        base.push(ms(env.run("marker:1", false).stats.total_ns));
        let r = env.run(&stores, true);
        assert_eq!(r.stats.traced_stores, K as u64);
        traced.push(ms(r.stats.total_ns));
        untraced.push(ms(env.run(&stores, false).stats.total_ns));
        let r = env.run(&messages, false);
        assert_eq!(r.messages.len(), K);
        msgs.push(ms(r.stats.total_ns));
    }
    let base = stat(base);
    let per_store_us = (stat(traced).median - stat(untraced).median) * 1000.0 / K as f64;
    let per_message_us = (stat(msgs).median - base.median) * 1000.0 / K as f64;

    // Crash images: save the K-store window once, then build images for cuts.
    let r = env.run(&stores, true);
    let wdir = TempDir::new().unwrap();
    let t0 = Instant::now();
    let saved = r.windows[0].save(wdir.as_path()).unwrap();
    let save_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut build = Vec::new();
    for i in 0..RUNS {
        let cut = (i * K / RUNS) as u64 + 1;
        let writes: Vec<_> = (0..cut).map(|event| WriteRef { event, part: 0 }).collect();
        let t0 = Instant::now();
        let c = saved.build(cut, &writes).unwrap();
        build.push(t0.elapsed().as_secs_f64() * 1e3);
        drop(c);
    }
    let build = stat(build);

    // A recovery boot: crash images in, guest checks the disk, exit.
    let mut recovery = Vec::new();
    for i in 0..RUNS {
        let cut = (i * K / RUNS) as u64 + 1;
        let t0 = Instant::now();
        let c = saved
            .build_flushed_plus(cut, &saved.trace.pending_at(cut))
            .unwrap();
        let mut cfg = env.config("blk-read:0:0", false);
        cfg.pmem = c.pmem;
        cfg.disk = c.disk;
        let r = vmm::run(cfg).unwrap();
        assert_eq!(r.outcome.exit_code(), Some(0));
        recovery.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let recovery = stat(recovery);

    let rss_kib = vmm_rss(&env);

    println!("vmm benchmark ({RUNS} runs each; median / p90)");
    println!(
        "  VMM setup (create VM .. first KVM_RUN)     {:7.3} / {:7.3} ms",
        setup.median, setup.p90
    );
    println!(
        "  VMM start to first ring-3 {}  {:7.3} / {:7.3} ms",
        if ring3_from_marker {
            "instruction     "
        } else {
            "test step       "
        },
        ring3.median,
        ring3.p90
    );
    println!(
        "  VMM start to guest exit (no steps)         {:7.3} / {:7.3} ms",
        stop.median, stop.p90
    );
    println!(
        "  same, VM teardown included                 {:7.3} / {:7.3} ms",
        exit.median, exit.p90
    );
    println!(
        "  boot + init blk and pmem + flush each + exit {:5.3} / {:7.3} ms",
        devices.median, devices.p90
    );
    println!("  traced pmem store, extra cost per store    {per_store_us:7.1} µs  ({K} stores)");
    println!(
        "  protocol message, cost per message         {per_message_us:7.1} µs  ({K} messages)"
    );
    println!("  save a {K}-event window (512 MiB sparse)   {save_ms:7.3} ms");
    println!(
        "  build crash images (cut ≤ {K} stores)      {:7.3} / {:7.3} ms",
        build.median, build.p90
    );
    println!(
        "  crash images + boot + blk-read + exit      {:7.3} / {:7.3} ms",
        recovery.median, recovery.p90
    );
    match rss_kib {
        Some(k) => println!(
            "  `vmm run` peak RSS                         {:7.1} MiB",
            k as f64 / 1024.0
        ),
        None => println!("  `vmm run` peak RSS                         (vmm binary not found)"),
    }
    println!(
        "{}",
        serde_json::json!({
            "setup_ms": setup.median,
            "start_to_ring3_ms": ring3.median,
            "start_to_ring3_is_marker": ring3_from_marker,
            "boot_to_exit_ms": stop.median,
            "boot_to_exit_with_teardown_ms": exit.median,
            "boot_to_exit_p90_ms": exit.p90,
            "boot_devices_flush_exit_ms": devices.median,
            "traced_store_us": per_store_us,
            "message_us": per_message_us,
            "window_save_ms": save_ms,
            "crash_build_ms": build.median,
            "recovery_boot_ms": recovery.median,
            "vmm_rss_kib": rss_kib,
        })
    );
}

/// Peak RSS of a `vmm run` child process (from `getrusage(RUSAGE_CHILDREN)`).
fn vmm_rss(env: &Env) -> Option<i64> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_vmm"));
    if !bin.exists() {
        return None;
    }
    let status = std::process::Command::new(bin)
        .args(["run", "--kernel"])
        .arg(&env.kernel)
        .arg("--pmem")
        .arg(env.dir.as_path().join("pmem.img"))
        .arg("--disk")
        .arg(env.dir.as_path().join("disk.img"))
        .args([
            "--cmdline",
            "harness.test=message:m;pmem-store:0:1;blk-write:0:1",
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .ok()?;
    if !status.success() {
        return None;
    }
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    Some(ru.ru_maxrss)
}
