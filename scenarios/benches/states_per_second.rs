//! Crash states checked per second by the scenario runner, with the
//! fork-server and with fresh VMs, side by side in one run
//! (`cargo bench -p scenarios`). Needs `/dev/kvm` and the guest kernel
//! (`cargo xtask build-guest`).
//!
//! The figure is states / wall time of their recovery boots (each state:
//! build its crash images, boot recovery on them, check the outcome), with as
//! many parallel boots as the machine has CPUs. Three ways of booting, in
//! turn for each scenario so that the machine's load hits them alike:
//! `fork` (the default: one fork-server per worker, CPU fences),
//! `fork+flush` (the fork-server, every fence a virtio-pmem FLUSH exit) and
//! `fresh` (a new VM per state, `--fresh`). Each also checks that the three
//! found the same outcomes.
//!
//! `BENCH_SCENARIOS=a,b` picks the scenarios (default: crash-mid-sb-write,
//! crash-mid-format, crash-mid-kset-append, crash-mid-data-write);
//! `BENCH_WAYS=fork,fresh` the ways.

use scenarios::runner::{self, Quiet, RecoveryVms, RunnerConfig};
use scenarios::spec::Scenario;
use std::path::Path;
use std::time::Duration;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let kernel = root.join("target/guest/pcache-guest");
    if !kernel.exists() {
        eprintln!(
            "{} is missing: run `cargo xtask build-guest` first",
            kernel.display()
        );
        std::process::exit(2);
    }
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let names = std::env::var("BENCH_SCENARIOS").unwrap_or_else(|_| {
        "crash-mid-sb-write,crash-mid-format,crash-mid-kset-append,crash-mid-data-write".into()
    });
    println!("crash states per second ({jobs} parallel recovery boots)");
    let ways = [
        ("fork", RecoveryVms::ForkServer),
        ("fork+flush", RecoveryVms::ForkServerFlushFences),
        ("fresh", RecoveryVms::Fresh),
    ];
    // `BENCH_WAYS=fork` runs only some ways (for profiling one).
    let only = std::env::var("BENCH_WAYS").ok();
    let ways: Vec<_> = ways
        .into_iter()
        .filter(|(w, _)| only.as_ref().is_none_or(|o| o.split(',').any(|x| x == *w)))
        .collect();
    for name in names.split(',') {
        let scenario = Scenario::load(&root.join("scenarios").join(format!("{name}.json")))
            .expect("scenario file");
        let mut outcomes = Vec::new();
        let mut line = format!("{name:24}");
        for &(way, vms) in &ways {
            let tmp = std::env::temp_dir().join(format!("scn-bench-{name}-{}", std::process::id()));
            let cfg = RunnerConfig {
                kernel: kernel.clone(),
                out_dir: tmp.join("out"),
                work_dir: tmp.join("work"),
                jobs,
                state_timeout: Duration::from_secs(20),
                workload_timeout: Duration::from_secs(120),
                recovery_vms: vms,
            };
            let r = runner::run(name, &scenario, &cfg, &Quiet).expect("scenario run");
            let _ = std::fs::remove_dir_all(&tmp);
            let states: usize = r.runs.iter().map(|r| r.states.len()).sum();
            let secs: f64 = r.runs.iter().map(|r| r.recovery_seconds).sum();
            for run in &r.runs {
                let saved = run.states.iter().filter(|s| s.saved.is_some()).count();
                println!(
                    "  {name:24} {way:10} {:12} {:8} {:5} states in {:7.3} s: {:6.0} states/s{}",
                    run.device,
                    run.mode.to_string(),
                    run.states.len(),
                    run.recovery_seconds,
                    run.states_per_second(),
                    if saved > 0 {
                        format!(" ({saved} violating states saved)")
                    } else {
                        String::new()
                    }
                );
            }
            line.push_str(&format!("  {way}: {:6.0} states/s", states as f64 / secs));
            outcomes.push(
                r.runs
                    .iter()
                    .flat_map(|r| {
                        r.states
                            .iter()
                            .map(|s| (s.id.clone(), s.outcome.clone(), s.usable))
                    })
                    .collect::<Vec<_>>(),
            );
        }
        assert!(
            outcomes.windows(2).all(|w| w[0] == w[1]),
            "{name}: the ways of booting found different outcomes"
        );
        println!("{line}  ({} states)", outcomes[0].len());
    }
}
