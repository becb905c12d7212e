//! `cargo xtask bench`: builds the guest kernel and runs
//!
//! 1. the VMM benchmark (`vmm/benches/vm.rs`), which prints VMM start to first
//!    ring-3 instruction, boot-to-exit, cost per traced store, cost per
//!    message and the VMM's RSS;
//!    and the fork-server benchmark (`vmm/benches/fork.rs`): a recovery boot
//!    in a fresh VM and from the fork-server's snapshot, side by side;
//! 2. the pcache guest boots (`pcache_boots` below): a whole `start` on a
//!    blank 512 MiB device and on a formatted one, boot to exit, markers on
//!    and off, and the recovery boot the scenarios run thousands of times
//!    (`start;stop;start`, markers off) on a formatted device and on crash
//!    images cut from a traced format.
//!
//! The pcache figures run the VMM library in-process, so they must come from
//! an optimised build: from a debug `cargo xtask`, `bench` re-runs itself
//! with `cargo run --release` for that part.

use crate::guest;
use crate::util::{cargo, locked, run};
use anyhow::{bail, Context, Result};
use clap::builder::RangedU64ValueParser;
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmm::{ImageMode, VmConfig};

#[derive(Args)]
pub struct BenchArgs {
    /// Only the pcache guest boots (skip the VMM benchmark).
    #[arg(long)]
    pub pcache_only: bool,
    /// Runs per pcache figure (3 to 1000).
    #[arg(long, default_value_t = 40, value_parser = RangedU64ValueParser::<usize>::new().range(3..=1000))]
    pub runs: usize,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    let kernel = guest::build(guest::BuildGuestArgs {
        debug: false,
        feature: None,
    })?;
    if !args.pcache_only {
        run(locked(cargo().arg("bench"))
            .args(["--package", "vmm", "--bench", "vm"])
            .env("PCACHE_GUEST", &kernel))?;
        run(locked(cargo().arg("bench"))
            .args(["--package", "vmm", "--bench", "fork"])
            .env("PCACHE_GUEST", &kernel))?;
    }
    if cfg!(debug_assertions) {
        // The VMM library in a debug build would inflate every figure.
        return run(locked(cargo().arg("run"))
            .args(["--quiet", "--release", "--package", "xtask", "--"])
            .args(["bench", "--pcache-only", "--runs"])
            .arg(args.runs.to_string()));
    }
    pcache_boots(&kernel, args.runs)
}

/// Median and 90th percentile, in ms.
#[derive(Clone, Copy)]
struct Stat {
    median: f64,
    p90: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(|a, b| a.total_cmp(b));
    Stat {
        median: v[v.len() / 2],
        p90: v[(v.len() * 9 / 10).min(v.len() - 1)],
    }
}

struct Env {
    kernel: PathBuf,
    blank: PathBuf,
    formatted: PathBuf,
    disk: PathBuf,
}

impl Env {
    fn config(&self, pmem: &Path, cmdline: &str) -> Result<VmConfig> {
        let mut c = VmConfig::new(&self.kernel, cmdline, pmem, &self.disk)?;
        c.timeout = Duration::from_secs(30);
        Ok(c)
    }

    /// One boot; checks that it exited with success and that every `start`
    /// had the expected outcome. Returns the run.
    fn boot(&self, c: VmConfig, outcomes: &[&str]) -> Result<vmm::RunOutcome> {
        let r = vmm::run(c)?;
        check(&r, outcomes)?;
        Ok(r)
    }
}

fn check(r: &vmm::RunOutcome, outcomes: &[&str]) -> Result<()> {
    let texts: Vec<String> = r.messages.iter().map(|m| m.text()).collect();
    if r.outcome.exit_code() != Some(0) {
        bail!("guest run failed: {:?} {texts:?}", r.outcome);
    }
    let got: Vec<String> = r
        .messages
        .iter()
        .filter(|m| m.kind() == Some(protocol::MessageKind::StepResult))
        .filter_map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).ok())
        .filter(|v| v["step"] == "start")
        .map(|v| v["report"]["outcome"].as_str().unwrap_or("?").to_string())
        .collect();
    if !outcomes.is_empty() && got != outcomes {
        bail!("expected outcomes {outcomes:?}, got {got:?}: {texts:?}");
    }
    Ok(())
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The pcache guest's boots; prints a table and a JSON line.
fn pcache_boots(kernel: &Path, runs: usize) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("pcache-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = pcache_boots_in(kernel, runs, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn pcache_boots_in(kernel: &Path, runs: usize, dir: &Path) -> Result<()> {
    let env = Env {
        kernel: kernel.to_path_buf(),
        blank: dir.join("blank.img"),
        formatted: dir.join("formatted.img"),
        disk: dir.join("disk.img"),
    };
    vmm::memory::create_sparse_file(&env.blank, 512 << 20)?;
    vmm::memory::create_sparse_file(&env.formatted, 512 << 20)?;
    vmm::memory::create_sparse_file(&env.disk, 64 << 20)?;
    // The formatted device: the guest's own format, written through.
    let mut c = env.config(&env.formatted, "pcache.run=start")?;
    c.pmem = vmm::PmemRegion::open(&env.formatted, ImageMode::WriteThrough)?;
    env.boot(c, &["formatted"])?;

    // Warm up: /dev/kvm, CPUID, the kernel file, the images' page cache.
    for _ in 0..3 {
        env.boot(env.config(&env.blank, "pcache.run=start")?, &["formatted"])?;
        env.boot(env.config(&env.formatted, "pcache.run=start")?, &["opened"])?;
    }

    // (label, device, command line, expected start outcomes)
    let cases: [(&str, &Path, &str, &[&str]); 6] = [
        (
            "start, blank 512 MiB (format), markers on",
            &env.blank,
            "pcache.run=start",
            &["formatted"],
        ),
        (
            "start, blank 512 MiB (format), markers off",
            &env.blank,
            "pcache.run=start pcache.markers=off",
            &["formatted"],
        ),
        (
            "start, formatted (open), markers on",
            &env.formatted,
            "pcache.run=start",
            &["opened"],
        ),
        (
            "start, formatted (open), markers off",
            &env.formatted,
            "pcache.run=start pcache.markers=off",
            &["opened"],
        ),
        (
            "recovery boot start;stop;start, formatted, markers off",
            &env.formatted,
            "pcache.run=start;stop;start pcache.markers=off",
            &["opened", "opened"],
        ),
        (
            "recovery boot start;stop;start, blank, markers off",
            &env.blank,
            "pcache.run=start;stop;start pcache.markers=off",
            &["formatted", "opened"],
        ),
    ];
    let mut samples: Vec<(Vec<f64>, Vec<f64>, u64)> = vec![(vec![], vec![], 0); cases.len()];
    // Interleaved, so that load changes spread over every case.
    for _ in 0..runs {
        for (i, (_, dev, cmdline, outcomes)) in cases.iter().enumerate() {
            let r = env.boot(env.config(dev, cmdline)?, outcomes)?;
            samples[i].0.push(ms(r.stats.stop_ns));
            samples[i].1.push(ms(r.stats.total_ns));
            samples[i].2 = r.stats.exits;
        }
    }

    // Recovery boots on crash images: a traced format, cut at `runs` points
    // spread over its trace, every pending write kept or dropped in turn.
    let traced = env.boot(
        env.config(&env.blank, "pcache.run=trace:on;start;trace:off")?,
        &["formatted"],
    )?;
    let wdir = dir.join("window");
    let saved = traced
        .windows
        .first()
        .context("the traced format opened no window")?
        .save(&wdir)?;
    let n = saved.trace.len() as u64;
    let mut crash_boot = Vec::new();
    let mut crash_total = Vec::new();
    let mut crash_stop = Vec::new();
    for i in 0..runs {
        let cut = (i as u64 * n) / runs as u64 + 1;
        let keep = if i % 2 == 0 {
            saved.trace.pending_at(cut)
        } else {
            Vec::new()
        };
        let t0 = Instant::now();
        let images = saved.build_flushed_plus(cut, &keep)?;
        let mut c = env.config(&env.blank, "pcache.run=start;stop;start pcache.markers=off")?;
        c.pmem = images.pmem;
        c.disk = images.disk;
        let r = vmm::run(c)?;
        crash_total.push(t0.elapsed().as_secs_f64() * 1e3);
        // Any outcome is a valid answer for a crash image; the run must end cleanly.
        check(&r, &[])?;
        crash_boot.push(ms(r.stats.stop_ns));
        crash_stop.push(ms(r.stats.total_ns));
    }

    println!("pcache guest boots ({runs} runs each; median / p90; boot = VMM start to guest exit)");
    let mut json = serde_json::Map::new();
    let keys = [
        "start_blank_ms",
        "start_blank_markers_off_ms",
        "start_formatted_ms",
        "start_formatted_markers_off_ms",
        "recovery_boot_formatted_ms",
        "recovery_boot_blank_ms",
    ];
    for ((label, ..), ((boot, total, exits), key)) in
        cases.iter().zip(samples.into_iter().zip(keys))
    {
        let b = stat(boot);
        let t = stat(total);
        println!(
            "  {label:<56} boot {:6.2} / {:6.2} ms, with teardown {:6.2} / {:6.2} ms, {exits} exits",
            b.median, b.p90, t.median, t.p90
        );
        json.insert(key.into(), serde_json::json!(b.median));
        json.insert(
            format!("{}_p90", key.trim_end_matches("_ms")) + "_ms",
            serde_json::json!(b.p90),
        );
    }
    let b = stat(crash_boot);
    let s = stat(crash_stop);
    let t = stat(crash_total);
    println!(
        "  {:<56} boot {:6.2} / {:6.2} ms, with teardown {:6.2} / {:6.2} ms",
        format!("recovery boot on crash images ({n}-event format trace)"),
        b.median,
        b.p90,
        s.median,
        s.p90
    );
    println!(
        "  {:<56} {:6.2} / {:6.2} ms",
        "  same, crash-image build + boot + teardown", t.median, t.p90
    );
    json.insert(
        "recovery_boot_crash_images_ms".into(),
        serde_json::json!(b.median),
    );
    json.insert(
        "recovery_boot_crash_images_p90_ms".into(),
        serde_json::json!(b.p90),
    );
    json.insert(
        "crash_build_boot_teardown_ms".into(),
        serde_json::json!(t.median),
    );
    println!("{}", serde_json::Value::Object(json));
    data_path_boots(&env, runs, dir)
}

/// Requests per data-path boot (the command line holds at most 4 KiB).
const DATA_OPS: u64 = 60;

/// The data path inside the guest (ring 3, untraced, markers off): the cost
/// of one 4 KiB request is the difference between a boot that makes
/// `DATA_OPS` of them and the same boot without them, divided by
/// `DATA_OPS`; VM exits likewise. Replay: a `start` on a device whose log
/// holds 10,000 keys against one on an empty log.
fn data_path_boots(env: &Env, runs: usize, dir: &Path) -> Result<()> {
    let writes = |mode: &str, fua: bool| {
        let mut s = format!("pcache.markers=off pcache.run=start:mode={mode}");
        for i in 0..DATA_OPS {
            s += &format!(";write:{:#x}:4096:{}", i * 8192, i + 1);
            if fua {
                s += ":fua";
            }
        }
        s
    };
    let reads = |base: String| {
        let mut s = base;
        for i in 0..DATA_OPS {
            s += &format!(";read:{:#x}:4096", i * 8192);
        }
        s
    };
    let cases: Vec<(&str, String)> = vec![
        ("base", "pcache.markers=off pcache.run=start".into()),
        ("write", writes("recover", false)),
        ("write-fua", writes("recover", true)),
        ("write-fua-strict", writes("strict", true)),
        ("write-fua+read-hit", reads(writes("recover", true))),
    ];
    for (_, c) in &cases {
        anyhow::ensure!(c.len() < 4000, "bench command line too long");
    }
    // 10,000 keys, written by the module on the host (2,500 writes of 16 KiB
    // cut in 4 KiB keys would differ; 10,000 writes of 4 KiB, flushed).
    let keys = dir.join("10000-keys.img");
    std::fs::copy(&env.formatted, &keys)?;
    {
        let mut pmem = pcache::pmem::FilePmem::open(&keys)?;
        let mut backing = pcache::backing::VecBacking::new(64 << 11);
        let opts = pcache::Options {
            mode: pcache::Mode::Recover,
            data_crc: false,
        };
        let mut cache = pcache::start(&mut pmem, &opts, &mut pcache::NoHooks)
            .cache
            .context("the formatted image does not open")?;
        let data = vec![0x5au8; 4096];
        for k in 0..10_000u64 {
            cache
                .write(
                    &mut pmem,
                    &backing,
                    &mut pcache::NoHooks,
                    (k * 4096) % (32 << 20),
                    &data,
                    false,
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        pcache::deactivate(cache, &mut pmem, &mut backing, &mut pcache::NoHooks)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut samples: Vec<(Vec<f64>, u64)> = vec![(vec![], 0); cases.len() + 1];
    for _ in 0..runs {
        for (i, (_, cmdline)) in cases.iter().enumerate() {
            let r = env.boot(env.config(&env.formatted, cmdline)?, &[])?;
            samples[i].0.push(ms(r.stats.stop_ns));
            samples[i].1 = r.stats.exits;
        }
        let r = env.boot(
            env.config(&keys, "pcache.markers=off pcache.run=start")?,
            &["opened"],
        )?;
        samples[cases.len()].0.push(ms(r.stats.stop_ns));
        samples[cases.len()].1 = r.stats.exits;
    }
    let med: Vec<(f64, u64)> = samples
        .into_iter()
        .map(|(v, e)| (stat(v).median, e))
        .collect();
    let per_op = |i: usize, base: usize| {
        (
            (med[i].0 - med[base].0) * 1e3 / DATA_OPS as f64,
            (med[i].1 as f64 - med[base].1 as f64) / DATA_OPS as f64,
        )
    };
    println!("pcache data path in the guest ({runs} runs each, medians; {DATA_OPS} requests per boot, minus the same boot without them)");
    let mut json = serde_json::Map::new();
    for (label, key, i, base) in [
        (
            "4 KiB write, key left in the open key-set (recover)",
            "write_4k",
            1,
            0,
        ),
        ("4 KiB write, FUA (recover)", "write_4k_fua", 2, 0),
        ("4 KiB write, FUA (strict)", "write_4k_fua_strict", 3, 0),
        ("4 KiB read hit", "read_4k_hit", 4, 2),
    ] {
        let (us, exits) = per_op(i, base);
        println!("  {label:<56} {us:8.1} µs, {exits:5.1} VM exits");
        json.insert(format!("{key}_us"), serde_json::json!(us));
        json.insert(format!("{key}_exits"), serde_json::json!(exits));
    }
    let replay = med[cases.len()].0 - med[0].0;
    println!(
        "  {:<56} {:8.2} ms ({} exits, empty log: {})",
        "start on a log of 10,000 keys, minus an empty log",
        replay,
        med[cases.len()].1,
        med[0].1
    );
    json.insert("replay_10000_keys_ms".into(), serde_json::json!(replay));
    writeback_gc_boots(env, runs, &mut json)?;
    println!("{}", serde_json::Value::Object(json));
    Ok(())
}

/// Writeback and GC in the guest: 16 MiB of sequential writes, flushed, then
/// `writeback` (time over the same boot without it: MiB/s), then `gc` with
/// gc_percent 0 (time over the boot without it, per key-set collected).
fn writeback_gc_boots(
    env: &Env,
    runs: usize,
    json: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let spec = workload::GenSpec {
        kind: workload::GenKind::Sequential,
        seed: 1,
        ops: 600,
        base: 0,
        span: 16 << 20,
        first_id: 1,
    };
    spec.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let bytes: u64 = workload::generate(&spec)
        .iter()
        .filter_map(|o| match o {
            workload::Op::Write { len, .. } => Some(*len as u64),
            _ => None,
        })
        .sum();
    let base = "pcache.markers=off pcache.run=start;gc-percent:0;gen:sequential:seed=1:ops=600:span=0x1000000;flush";
    let cases = [
        base.to_string(),
        format!("{base};writeback"),
        format!("{base};writeback;gc"),
    ];
    let mut samples: Vec<Vec<f64>> = vec![vec![]; cases.len()];
    let mut collected = 0u64;
    for _ in 0..runs {
        for (i, c) in cases.iter().enumerate() {
            let r = env.boot(env.config(&env.formatted, c)?, &[])?;
            samples[i].push(ms(r.stats.stop_ns));
            if i == 2 {
                collected = gc_key_sets(&r);
            }
        }
    }
    let med: Vec<f64> = samples.into_iter().map(|v| stat(v).median).collect();
    let wb_ms = med[1] - med[0];
    let mib_s = (bytes as f64 / (1 << 20) as f64) / (wb_ms / 1e3);
    let gc_us = (med[2] - med[1]) * 1e3 / collected.max(1) as f64;
    println!(
        "  {:<56} {:8.1} MiB/s ({:.1} MiB in {wb_ms:.1} ms)",
        "writeback, 600 sequential writes",
        mib_s,
        bytes as f64 / (1 << 20) as f64
    );
    println!(
        "  {:<56} {:8.1} µs per key-set ({collected} key-sets)",
        "GC after writeback, gc_percent 0", gc_us
    );
    json.insert("writeback_mib_s".into(), serde_json::json!(mib_s));
    json.insert("gc_us_per_key_set".into(), serde_json::json!(gc_us));
    Ok(())
}

/// Key-sets collected by the `gc` step of a run (its step result).
fn gc_key_sets(r: &vmm::RunOutcome) -> u64 {
    r.messages
        .iter()
        .filter(|m| m.kind() == Some(protocol::MessageKind::StepResult))
        .filter_map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).ok())
        .filter(|v| v["step"] == "gc")
        .filter_map(|v| v["result"].as_array().cloned())
        .flatten()
        .filter(|s| s["kind"] == "key-set")
        .count() as u64
}
