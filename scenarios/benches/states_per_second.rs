//! Crash states checked per second by the scenario runner, for
//! `crash-mid-sb-write` and `crash-mid-format` (`cargo bench -p scenarios`).
//! Needs `/dev/kvm` and the guest kernel (`cargo xtask build-guest`).
//!
//! The figure is states / wall time of their recovery boots (each state: build
//! its crash images, boot a fresh VM, run recovery, check the outcome), with
//! as many parallel boots as the machine has CPUs.

use scenarios::runner::{self, Quiet, RunnerConfig};
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
    println!("crash states per second ({jobs} parallel recovery boots)");
    for name in ["crash-mid-sb-write", "crash-mid-format"] {
        let scenario = Scenario::load(&root.join("scenarios").join(format!("{name}.json")))
            .expect("scenario file");
        let tmp = std::env::temp_dir().join(format!("scn-bench-{name}-{}", std::process::id()));
        let cfg = RunnerConfig {
            kernel: kernel.clone(),
            out_dir: tmp.join("out"),
            work_dir: tmp.join("work"),
            jobs,
            state_timeout: Duration::from_secs(20),
            workload_timeout: Duration::from_secs(120),
        };
        let r = runner::run(name, &scenario, &cfg, &Quiet).expect("scenario run");
        let _ = std::fs::remove_dir_all(&tmp);
        let (mut states, mut secs) = (0usize, 0f64);
        for run in &r.runs {
            println!(
                "  {name:20} {:12} {:8} {:5} states in {:7.3} s: {:6.0} states/s",
                run.device,
                run.mode.to_string(),
                run.states.len(),
                run.recovery_seconds,
                run.states_per_second()
            );
            states += run.states.len();
            secs += run.recovery_seconds;
        }
        println!(
            "{name}: {states} states, {:.0} states/s over the recovery boots; whole run {:.2} s (recipes and traced workloads included)",
            states as f64 / secs,
            r.elapsed_seconds
        );
    }
}
