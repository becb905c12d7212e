//! `cargo xtask scenario NAME`: runs a power-cut scenario and reports.

use crate::guest;
use crate::util::workspace_root;
use anyhow::{bail, Context, Result};
use clap::builder::RangedU64ValueParser;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use scenarios::result::{write_atomic, KernelRun, RunResult, Shard};
use scenarios::runner::{self, Progress, RunOptions, RunnerConfig};
use scenarios::spec::{self, Scenario};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Args)]
pub struct ScenarioArgs {
    /// The scenario to run (a file `scenarios/NAME.json`).
    #[arg(required_unless_present_any = ["list", "all"])]
    pub name: Option<String>,
    /// List the scenarios and exit.
    #[arg(long, conflicts_with_all = ["name", "all"])]
    pub list: bool,
    /// Run every scenario.
    #[arg(long, conflicts_with = "name")]
    pub all: bool,
    /// Also write JUnit XML to this file.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Recovery boots run at once (default: the number of CPUs; at most 256,
    /// each is a VM with its own memory).
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..=JOBS_MAX))]
    pub jobs: Option<usize>,
    /// Time budget of one recovery boot, in seconds (1 to 3600: with 0 every
    /// state would time out).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=STATE_TIMEOUT_MAX))]
    pub state_timeout: u64,
    /// Run only shard K of N: the states whose index i (after
    /// deduplication, in stable order) has i % N = K - 1; pinned counts are
    /// checked when `cargo xtask merge-results` joins the N shards.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<Shard>,
    /// Boot a fresh VM for every crash state (the reference path) instead of
    /// resetting one fork-server VM per worker to its snapshot (same
    /// results, several times slower).
    #[arg(long)]
    pub fresh: bool,
    /// Also run the scenario against Linux's own dm-pcache under QEMU: crash
    /// states built from the kernel's traced workload (the `qemu-trace`
    /// plugin) with the scenario's model, each recovered by the kernel;
    /// the outcomes go into result.json's `kernel` beside strict and recover
    /// (power-cut scenarios whose workload is `start`).
    #[arg(long, conflicts_with = "shard")]
    pub kernel: bool,
    /// With --kernel: at most this many states per device are recovered by
    /// the kernel (spread evenly over the enumeration).
    #[arg(long, default_value_t = 64, requires = "kernel")]
    pub kernel_states: usize,
    /// With --kernel: no recovery boot starts after this many seconds.
    #[arg(long, default_value_t = 1200, requires = "kernel")]
    pub kernel_budget: u64,
}

/// Most recovery boots at once.
pub(crate) const JOBS_MAX: u64 = 256;
/// Longest time budget of one recovery boot, in seconds (an hour: a state
/// that needs more is a hang).
pub(crate) const STATE_TIMEOUT_MAX: u64 = 3600;

fn scenarios_dir() -> PathBuf {
    workspace_root().join("scenarios")
}

pub fn scenario(args: ScenarioArgs) -> Result<()> {
    let all = spec::list(&scenarios_dir())?;
    if args.list {
        for (name, path) in &all {
            match Scenario::load(path) {
                Ok(s) => println!("{name:24} {}", s.description),
                Err(e) => println!("{name:24} (unreadable: {e})"),
            }
        }
        return Ok(());
    }
    let names: Vec<String> = if args.all {
        all.iter().map(|(n, _)| n.clone()).collect()
    } else {
        let name = args
            .name
            .clone()
            .expect("clap requires NAME without --list/--all");
        if !all.iter().any(|(n, _)| *n == name) {
            let known: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
            bail!(
                "no scenario `{name}` in scenarios/ (known: {})",
                known.join(", ")
            );
        }
        vec![name]
    };
    // Load every scenario before building anything: a typo fails at once.
    let loaded: Vec<(String, Scenario)> = names
        .iter()
        .map(|n| {
            Ok((
                n.clone(),
                Scenario::load(&scenarios_dir().join(format!("{n}.json")))?,
            ))
        })
        .collect::<Result<_>>()?;

    let kernel = guest::build(guest::BuildGuestArgs {
        debug: false,
        feature: None,
    })?;
    vmm::vm::check_kvm()?;
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));

    let mut results = Vec::new();
    let mut errors = Vec::new();
    for (name, scenario) in &loaded {
        let cfg = new_run(
            "scenario",
            name,
            args.shard,
            &kernel,
            jobs,
            args.state_timeout,
            args.fresh,
        )?;
        let (out_dir, work_dir) = (cfg.out_dir.clone(), cfg.work_dir.clone());
        println!("scenario {name}: {}", scenario.description);
        let opts = RunOptions {
            shard: args.shard,
            // What the other shards must agree on to be merged.
            config: args
                .shard
                .map(|_| serde_json::json!({ "command": "scenario", "scenario": scenario })),
            ..Default::default()
        };
        let outcome = runner::run_with(name, scenario, &cfg, &Bar::default(), &opts);
        let _ = std::fs::remove_dir_all(&work_dir);
        match outcome {
            Ok(mut result) => {
                // A shard is not a whole run: `latest` stays on the last one.
                if args.shard.is_none() {
                    point_latest(&out_dir)?;
                }
                print_table(&result);
                if args.kernel {
                    match kernel_side(name, scenario, &out_dir, &args) {
                        // Into result.json, before the page is written from it.
                        Ok(k) => {
                            result.kernel = Some(k);
                            let path = out_dir.join("result.json");
                            write_atomic(&path, &serde_json::to_vec_pretty(&result)?)
                                .with_context(|| format!("writing {}", path.display()))?;
                        }
                        Err(e) => {
                            eprintln!("scenario {name} --kernel could not run: {e:#}");
                            errors.push(RunError {
                                scenario: name.clone(),
                                message: format!("--kernel: {e:#}"),
                            });
                        }
                    }
                }
                println!("result: {}", out_dir.join("result.json").display());
                let page = write_report(&out_dir, &result)?;
                println!("report: {}", page.display());
                results.push(result);
            }
            // A scenario that could not run stops neither the others nor the
            // JUnit report: it is reported as an error there and fails the
            // command at the end.
            Err(e) => {
                let _ = std::fs::remove_dir(&out_dir); // empty: nothing was written
                eprintln!("scenario {name} could not run: {e}");
                errors.push(RunError {
                    scenario: name.clone(),
                    message: e.to_string(),
                });
            }
        }
    }
    if let Some(path) = &args.junit {
        write_atomic(path, junit(&results, &errors)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.scenario.as_str())
        .collect();
    if !errors.is_empty() {
        let names: Vec<&str> = errors.iter().map(|e| e.scenario.as_str()).collect();
        bail!(
            "scenario(s) could not run: {}{}",
            names.join(", "),
            if failed.is_empty() {
                String::new()
            } else {
                format!("; scenario(s) failed: {}", failed.join(", "))
            }
        );
    }
    if !failed.is_empty() {
        bail!("scenario(s) failed: {}", failed.join(", "));
    }
    Ok(())
}

/// A scenario that could not be run (as opposed to one whose states failed).
pub(crate) struct RunError {
    pub scenario: String,
    pub message: String,
}

/// The name of a run's folder: the UTC time, and the shard for one.
pub(crate) fn run_stamp(shard: Option<Shard>) -> String {
    let stamp = runner::now_rfc3339().replace(':', "");
    match shard {
        Some(s) => format!("{stamp}-shard{}of{}", s.index, s.count),
        None => stamp,
    }
}

/// Creates this run's folder `parent/<stamp>`; a run started in the same second
/// as an earlier one gets `<stamp>-2`, `-3`, ... instead of overwriting its
/// result and mixing saved states with it.
pub(crate) fn new_run_dir(parent: &Path, stamp: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    for n in 1.. {
        let dir = if n == 1 {
            parent.join(stamp)
        } else {
            parent.join(format!("{stamp}-{n}"))
        };
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    unreachable!("some suffix is free")
}

/// `--kernel`: the scenario against the kernel (`interop::kernel_mode`), a
/// table printed; the caller adds the result to result.json as `kernel`.
fn kernel_side(
    name: &str,
    scenario: &Scenario,
    out_dir: &Path,
    args: &ScenarioArgs,
) -> Result<KernelRun> {
    let cache = interop::prepare::cache_dir();
    let kernel = interop::prepare::prepare(&cache, |step| println!("  preparing: {step}"))?;
    let plugin = crate::qtrace::build_plugin()?;
    let work = out_dir.join("kernel");
    println!(
        "against Linux {} under QEMU (the kernel's own trace) ...",
        interop::prepare::KERNEL_RELEASE
    );
    let r = interop::kernel_mode::run(
        &kernel,
        &plugin,
        name,
        scenario,
        &work,
        args.kernel_states,
        Duration::from_secs(args.kernel_budget),
    )?;
    println!("  traced boot: {:.1} s", r.trace_boot_seconds);
    for d in &r.devices {
        println!(
            "  {}: kernel trace {} events, {} epochs (agrees with strict's: {}); distinct states: kernel {}, strict {} (epoch-aligned window {}); {} recovered by the kernel in {} boot(s), {:.2} s per state; kernel = strict on {} of {}",
            d.device,
            d.kernel_events,
            d.kernel_epochs,
            d.trace_difference.is_none(),
            d.kernel_states,
            d.strict_states,
            d.strict_states_aligned,
            d.tried,
            d.boots.len(),
            d.seconds_per_state,
            d.kernel_agrees,
            d.tried
        );
        let line = |counts: &std::collections::BTreeMap<String, usize>| {
            let c: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
            c.join(", ")
        };
        println!("    the {} recovered by the kernel:", d.tried);
        for (col, counts) in &d.counts {
            println!("      {col:8} {}", line(counts));
        }
        println!(
            "    all {} states of the kernel's trace, on the host:",
            d.kernel_states
        );
        for (col, counts) in &d.all_states_host {
            println!("      {col:8} {}", line(counts));
        }
    }
    Ok(r)
}

/// Starts a `scenario` or `explore` run of `name`: makes its results folder
/// (see [`new_run_dir`]) and clears its scratch folder. `--fresh` boots a
/// fresh VM per state instead of resetting a fork-server.
pub(crate) fn new_run(
    command: &str,
    name: &str,
    shard: Option<Shard>,
    kernel: &Path,
    jobs: usize,
    state_timeout_secs: u64,
    fresh: bool,
) -> Result<RunnerConfig> {
    let out_dir = new_run_dir(
        &workspace_root().join("results").join(name),
        &run_stamp(shard),
    )?;
    let work_dir =
        std::env::temp_dir().join(format!("pcache-{command}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work_dir);
    Ok(RunnerConfig {
        kernel: kernel.to_path_buf(),
        out_dir,
        work_dir,
        jobs,
        state_timeout: Duration::from_secs(state_timeout_secs),
        workload_timeout: Duration::from_secs(120),
        recovery_vms: if fresh {
            runner::RecoveryVms::Fresh
        } else {
            runner::RecoveryVms::ForkServer
        },
    })
}

/// Writes the run's report page beside its result.json; the reproduce
/// commands on it name the run's folder from the workspace root.
pub(crate) fn write_report(out_dir: &Path, result: &RunResult) -> Result<PathBuf> {
    let root = workspace_root();
    let shown = out_dir.strip_prefix(&root).unwrap_or(out_dir);
    scenarios::report::write(out_dir, result, &shown.display().to_string())
        .with_context(|| format!("writing the report page in {}", out_dir.display()))
}

/// Points `results/NAME/latest` at this run (a relative link, replaced atomically).
pub(crate) fn point_latest(out_dir: &Path) -> Result<()> {
    let parent = out_dir.parent().expect("results/NAME/<stamp>");
    let stamp = out_dir.file_name().expect("a run folder");
    let tmp = parent.join(format!(".latest-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(stamp, &tmp)?;
    std::fs::rename(&tmp, parent.join("latest"))?;
    Ok(())
}

pub(crate) fn print_table(r: &RunResult) {
    println!(
        "{:<14} {:<8} {:>7} {:<48} {:>9} {:>10} {:>9}",
        "device", "mode", "states", "outcomes", "unusable", "violations", "states/s"
    );
    for run in &r.runs {
        let outcomes: Vec<String> = run
            .counts
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!(
            "{:<14} {:<8} {:>7} {:<48} {:>9} {:>10} {:>9.0}",
            run.device,
            // pcache's Display ignores widths: pad the text.
            run.mode.to_string(),
            run.counts.states,
            outcomes.join(", "),
            run.counts.unusable,
            run.counts.violations,
            run.states_per_second()
        );
        for v in &run.violations {
            println!("  violation: {v}");
        }
        // What the scenario allows but a reader must see (in strict mode: the
        // kernel's own behaviour), listed rather than hidden.
        let prefix = format!("{}-{}-", run.device, run.mode);
        let listed = |what: &str, pick: &dyn Fn(&scenarios::result::StateResult) -> bool| {
            let ids: Vec<&str> = run
                .states
                .iter()
                .filter(|s| s.violations.is_empty() && pick(s))
                .map(|s| s.id.strip_prefix(&prefix).unwrap_or(&s.id))
                .collect();
            if !ids.is_empty() {
                println!("  {what}: {} state(s): {}", ids.len(), ids.join(" "));
            }
        };
        listed("refused (for ever: nothing is written)", &|s| {
            s.outcome == "refused"
        });
        listed("the older cache came back", &|s| s.older_cache_back);
        listed("read back against the durability rule", &|s| {
            s.durability
                .as_ref()
                .is_some_and(|d| !d.violations.is_empty())
        });
        // An explore can find thousands: the first ones, and how many more.
        const LISTED: usize = 20;
        let bad = run
            .states
            .iter()
            .filter(|s| !s.violations.is_empty())
            .count();
        if bad > LISTED {
            println!(
                "  {bad} violating states, the first {LISTED} (and every minimized one) below; result.json lists them all"
            );
        }
        let mut listed = 0;
        for s in run.states.iter().filter(|s| !s.violations.is_empty()) {
            if listed >= LISTED && s.minimized.is_none() {
                continue;
            }
            listed += 1;
            println!("  {} ({}): {}", s.id, s.outcome, s.violations.join("; "));
            if let Some(saved) = &s.saved {
                println!("    replay: cargo xtask reproduce {saved}");
            }
            if let Some(m) = &s.minimized {
                println!(
                    "    minimized: {} of its {} pending writes still violate ({} boots):",
                    m.writes.len(),
                    m.from,
                    m.boots
                );
                for w in &m.writes {
                    println!("      {}: {}", describe_write(&w.write), w.context);
                }
            }
        }
    }
    let what = match (&r.shard, r.partial) {
        (_, true) => "PARTIAL (interrupted; pinned counts not checked)".to_string(),
        (Some(s), _) => format!(
            "shard {}/{} {} (pinned counts are checked by merge-results)",
            s.index,
            s.count,
            if r.passed { "passed" } else { "FAILED" }
        ),
        (None, _) => (if r.passed { "PASSED" } else { "FAILED" }).to_string(),
    };
    println!("{} in {:.1} s: {what}", r.scenario, r.elapsed_seconds);
}

/// A write of a result in a few words.
fn describe_write(w: &scenarios::result::AppliedWrite) -> String {
    use scenarios::result::AppliedWrite;
    match w {
        AppliedWrite::Pmem {
            event,
            offset,
            len,
            value,
        } => format!("event {event}: pmem {offset:#x} ({len} bytes) = {value}"),
        AppliedWrite::Disk { event, sector } => format!("event {event}: disk sector {sector}"),
        AppliedWrite::Patch { offset, bytes } => format!("patch at {offset:#x}: {bytes}"),
    }
}

/// JUnit XML: one suite per scenario, one test case per (device, mode, state);
/// a scenario that could not run is one case in error.
pub(crate) fn junit(results: &[RunResult], errors: &[RunError]) -> Result<String> {
    use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
    let mut report = Report::new("pcache-scenarios");
    for e in errors {
        let mut suite = TestSuite::new(e.scenario.as_str());
        let mut status = TestCaseStatus::non_success(NonSuccessKind::Error);
        status.set_message(e.message.as_str());
        suite.add_test_case(TestCase::new("run", status));
        report.add_test_suite(suite);
    }
    for r in results {
        let mut suite = TestSuite::new(r.scenario.as_str());
        for run in &r.runs {
            let class = format!("{}.{}", run.device, run.mode);
            if !run.violations.is_empty() {
                let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
                status.set_message(run.violations.join("; "));
                let mut case = TestCase::new(format!("{class}.counts"), status);
                case.set_classname(class.as_str());
                suite.add_test_case(case);
            }
            for s in &run.states {
                let status = if s.violations.is_empty() {
                    TestCaseStatus::success()
                } else {
                    let mut st = TestCaseStatus::non_success(NonSuccessKind::Failure);
                    st.set_message(s.violations.join("; "));
                    st
                };
                let mut case = TestCase::new(format!("{} ({})", s.id, s.outcome), status);
                case.set_classname(class.as_str());
                suite.add_test_case(case);
            }
        }
        report.add_test_suite(suite);
    }
    Ok(report.to_string()?)
}

/// An indicatif bar per device and mode: states done, states per second,
/// violations so far (of the whole run), time left.
#[derive(Default)]
pub(crate) struct Bar(Mutex<Option<ProgressBar>>, AtomicUsize);

impl Bar {
    fn message(&self) -> String {
        match self.1.load(Ordering::Relaxed) {
            1 => "1 violation".into(),
            n => format!("{n} violations"),
        }
    }
}

impl Progress for Bar {
    fn begin(&self, label: &str, states: usize) {
        let bar = ProgressBar::new(states as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>22} [{bar:30}] {pos}/{len} states {per_sec} {msg} {eta} left",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        bar.set_message(self.message());
        *self.0.lock().unwrap() = Some(bar);
    }
    fn state_done(&self) {
        if let Some(b) = &*self.0.lock().unwrap() {
            b.inc(1);
        }
    }
    fn violation_found(&self) {
        self.1.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = &*self.0.lock().unwrap() {
            b.set_message(self.message());
        }
    }
    fn end(&self) {
        if let Some(b) = self.0.lock().unwrap().take() {
            b.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scenarios::result::{DeviceModeRun, ObservedCounts, StateResult};
    use scenarios::spec::Mode;

    fn state(id: &str, violations: Vec<String>) -> StateResult {
        StateResult {
            id: id.into(),
            cut: Some(3),
            applied: vec![],
            settled: None,
            applied_omitted: None,
            outcome: "refused".parse().unwrap(),
            reason: None,
            refusal: None,
            usable: false,
            older_cache_back: false,
            failure: None,
            reports: vec![],
            verdict: Default::default(),
            violations,
            saved: None,
            durability: None,
            minimized: None,
        }
    }

    #[test]
    fn runs_in_the_same_second_get_their_own_folders_and_latest_follows() {
        let parent = std::env::temp_dir().join(format!("xtask-runs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        let a = new_run_dir(&parent, "2026-11-26T010000Z").unwrap();
        let b = new_run_dir(&parent, "2026-11-26T010000Z").unwrap();
        let c = new_run_dir(&parent, "2026-11-26T010000Z").unwrap();
        assert_eq!(a, parent.join("2026-11-26T010000Z"));
        assert_eq!(b, parent.join("2026-11-26T010000Z-2"));
        assert_eq!(c, parent.join("2026-11-26T010000Z-3"));
        point_latest(&a).unwrap();
        point_latest(&b).unwrap();
        assert_eq!(
            std::fs::read_link(parent.join("latest")).unwrap(),
            PathBuf::from("2026-11-26T010000Z-2")
        );
        // Only the runs and the link: no temporary link left behind.
        let mut names: Vec<String> = std::fs::read_dir(&parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "2026-11-26T010000Z",
                "2026-11-26T010000Z-2",
                "2026-11-26T010000Z-3",
                "latest"
            ]
        );
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn junit_has_a_case_per_state_and_fails_the_violations() {
        let run = DeviceModeRun {
            prefill: None,
            device: "blank".into(),
            mode: Mode::Strict,
            model: serde_json::Value::Null,
            counts: ObservedCounts::default(),
            recovery_seconds: 0.1,
            states: vec![
                state("blank-strict-0000", vec![]),
                state("blank-strict-0001", vec!["not usable".into()]),
            ],
            violations: vec!["pinned count `states`: expected 8, got 2".into()],
            timeline: None,
        };
        let result = RunResult {
            schema_version: 1,
            scenario: "x".into(),
            started: "2026-11-26T00:00:00Z".into(),
            elapsed_seconds: 1.0,
            runs: vec![run],
            passed: false,
            partial: false,
            shard: None,
            config: None,
            kernel: None,
        };
        let xml = junit(
            &[result],
            &[RunError {
                scenario: "y".into(),
                message: "y/strict: the workload run failed: timeout".into(),
            }],
        )
        .unwrap();
        assert!(
            xml.contains(r#"<testsuite name="y" tests="1" disabled="0" errors="1""#),
            "{xml}"
        );
        assert!(xml.contains("the workload run failed: timeout"), "{xml}");
        assert!(xml.contains(r#"<testsuite name="x" tests="3""#), "{xml}");
        assert!(xml.contains(r#"failures="2""#), "{xml}");
        assert!(xml.contains("not usable"), "{xml}");
        assert!(xml.contains("expected 8, got 2"), "{xml}");
        assert!(xml.contains(r#"classname="blank.strict""#), "{xml}");
    }
}
