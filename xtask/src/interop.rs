//! `cargo xtask interop`: Linux's own dm-pcache under QEMU as the oracle
//! (the `interop` crate does the work; this is its command line and report).

use crate::scenario::{new_run_dir, point_latest};
use crate::util::workspace_root;
use anyhow::{bail, Context, Result};
use clap::Args;
use interop::cases::{self, CaseResult};
use interop::report::{findings, RunReport};
use scenarios::result::write_atomic;
use std::path::PathBuf;

#[derive(Args)]
pub struct InteropArgs {
    /// Run only this case (repeatable): first-activation, kernel-writes,
    /// hostile-images, power-cuts, module-writes, module-gc,
    /// trace-first-activation, trace-writes (both build the QEMU trace
    /// plugin, `qemu-trace/`).
    #[arg(long = "case", value_parser = clap::builder::PossibleValuesParser::new(cases::CASES))]
    pub cases: Vec<String>,
    /// Crash states per distinct strict result class, in power-cuts (the
    /// other cases have nothing to sample).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub sample: u64,
    /// Keep the boots' images (512 MiB sparse files) beside the consoles.
    #[arg(long)]
    pub keep: bool,
    /// Also write a JUnit XML report here.
    #[arg(long)]
    pub junit: Option<PathBuf>,
    /// Write the image kernel-writes leaves here, zstd-compressed (how
    /// interop/fixtures/ is made).
    #[arg(long)]
    pub fixture: Option<PathBuf>,
}

pub fn interop(args: InteropArgs) -> Result<()> {
    let cache = interop::prepare::cache_dir();
    println!("kernel side in {}", cache.display());
    let kernel = interop::prepare::prepare(&cache, |step| println!("  preparing: {step}"))?;
    println!(
        "Linux {} with dm-pcache built out of tree (sha256 {})",
        interop::prepare::KERNEL_RELEASE,
        kernel.module_sha256
    );
    let stamp = scenarios::runner::now_rfc3339().replace(':', "");
    let out_dir = new_run_dir(&workspace_root().join("results").join("interop"), &stamp)?;
    let wanted = |c: &str| args.cases.is_empty() || args.cases.iter().any(|w| w == c);
    let mut results: Vec<CaseResult> = Vec::new();
    for name in cases::CASES.iter().copied().filter(|c| wanted(c)) {
        println!("case {name} ...");
        let work = out_dir.join(name);
        std::fs::create_dir_all(&work)?;
        let r = match name {
            "first-activation" => cases::first_activation(&kernel, &work),
            "kernel-writes" => cases::kernel_writes(&kernel, &work, args.fixture.as_deref()),
            "hostile-images" => cases::hostile_images(&kernel, &work),
            "power-cuts" => cases::power_cuts(
                &kernel,
                &work,
                &workspace_root().join("scenarios"),
                args.sample as usize,
            ),
            "module-writes" => interop::module_writes::module_writes(
                &kernel,
                &work,
                &workspace_root().join("interop/fixtures/kernel-writes-512M.img.zst"),
            ),
            "module-gc" => interop::module_gc::module_gc(&kernel, &work),
            "trace-first-activation" => {
                let plugin = crate::qtrace::build_plugin()?;
                interop::ktrace::trace_first_activation(
                    &kernel,
                    &work,
                    &workspace_root().join("scenarios"),
                    &plugin,
                )
            }
            "trace-writes" => {
                let plugin = crate::qtrace::build_plugin()?;
                interop::ktrace_writes::trace_writes(&kernel, &work, &plugin)
            }
            other => unreachable!("clap only accepts known cases, got {other}"),
        };
        print_case(&r);
        if !args.keep {
            remove_images(&work);
        }
        results.push(r);
    }
    let report = RunReport {
        kernel_release: interop::prepare::KERNEL_RELEASE,
        module_sha256: kernel.module_sha256.clone(),
        passed: results.iter().all(|c| c.passed),
        cases: results,
    };
    write_atomic(
        &out_dir.join("result.json"),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    write_atomic(&out_dir.join("findings.md"), findings(&report).as_bytes())?;
    point_latest(&out_dir)?;
    if let Some(path) = &args.junit {
        write_atomic(path, junit(&report)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("result: {}", out_dir.join("result.json").display());
    println!("findings: {}", out_dir.join("findings.md").display());
    let all: Vec<_> = report.cases.iter().flat_map(|c| &c.comparisons).collect();
    let agree = all.iter().filter(|c| c.agree).count();
    let errors = report.cases.iter().filter(|c| c.error.is_some()).count();
    println!(
        "interop: {agree} passed, {} failed",
        all.len() - agree + errors
    );
    if !report.passed {
        let failed: Vec<&str> = report
            .cases
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.as_str())
            .collect();
        bail!(
            "interop case(s) disagree with the kernel or could not run: {} (see findings.md)",
            failed.join(", ")
        );
    }
    Ok(())
}

fn print_case(r: &CaseResult) {
    if let Some(e) = &r.error {
        println!("  could not run: {e}");
        return;
    }
    let agree = r.comparisons.iter().filter(|c| c.agree).count();
    println!(
        "  {agree} of {} images agree; {} boot(s): {}",
        r.comparisons.len(),
        r.boots.len(),
        r.boots
            .iter()
            .map(|s| format!("{s:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for c in r.comparisons.iter().filter(|c| !c.agree) {
        println!(
            "  DISAGREE {}: strict `{}`{}, the kernel {}{}",
            c.image,
            c.strict.outcome,
            c.strict
                .refusal
                .as_deref()
                .map(|k| format!(" ({k})"))
                .unwrap_or_default(),
            if c.kernel.activated {
                "activated"
            } else {
                "refused"
            },
            c.first_difference
                .as_deref()
                .map(|d| format!("; images differ at {d}"))
                .unwrap_or_default()
        );
    }
}

/// Removes the boots' images, keeping consoles (and the rest) for reading.
fn remove_images(dir: &std::path::Path) {
    for e in walk(dir) {
        if e.extension().is_some_and(|x| x == "img") {
            let _ = std::fs::remove_file(&e);
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn junit(report: &RunReport) -> Result<String> {
    use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
    let mut rep = Report::new("interop");
    for case in &report.cases {
        let mut suite = TestSuite::new(format!("interop {}", case.name));
        if let Some(e) = &case.error {
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Error);
            status.set_message(e.clone());
            suite.add_test_case(TestCase::new(case.name.clone(), status));
        }
        for c in &case.comparisons {
            let status = if c.agree {
                TestCaseStatus::success()
            } else {
                let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                s.set_message(format!(
                    "strict {} / kernel {}",
                    c.strict.outcome,
                    if c.kernel.activated {
                        "activated"
                    } else {
                        "refused"
                    }
                ));
                s
            };
            suite.add_test_case(TestCase::new(c.image.clone(), status));
        }
        rep.add_test_suite(suite);
    }
    Ok(rep.to_string()?)
}
