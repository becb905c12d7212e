//! `cargo xtask reproduce`: boots recovery on one saved crash state, or on an
//! image from a corruption report, with the console on. Images are never
//! modified: the VM runs on copy-on-write views of them.

use crate::guest;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use scenarios::guest::{cmdline, Recovery};
use scenarios::runner::SavedState;
use scenarios::spec::Mode;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args)]
pub struct ReproduceArgs {
    /// A saved state: `results/NAME/<run>/<state>` (holds state.json, pmem.img, disk.img).
    #[arg(required_unless_present = "pmem", conflicts_with_all = ["pmem", "disk", "mode"])]
    pub state: Option<PathBuf>,
    /// A pmem (cache device) image, e.g. from a corruption report.
    #[arg(long)]
    pub pmem: Option<PathBuf>,
    /// The backing disk image (default: an empty 64 MiB disk).
    #[arg(long, requires = "pmem")]
    pub disk: Option<PathBuf>,
    /// pcache's recovery mode, with --pmem.
    #[arg(long, value_enum, default_value_t = CliMode::Recover)]
    pub mode: CliMode,
    /// The guest steps to run, with --pmem.
    #[arg(long, default_value = "start;stop;start")]
    pub steps: String,
    /// Time budget of the boot, in seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CliMode {
    Strict,
    Recover,
}

pub fn reproduce(args: ReproduceArgs) -> Result<()> {
    let kernel = guest::build(guest::BuildGuestArgs { debug: false })?;
    let mut scratch = None;
    let (pmem, disk, line, expected) = match &args.state {
        Some(dir) => {
            let meta_path = dir.join("state.json");
            let text = std::fs::read(&meta_path).with_context(|| {
                format!("{} (is this a saved state folder?)", meta_path.display())
            })?;
            let meta: SavedState = serde_json::from_slice(&text)
                .with_context(|| format!("{}: not a saved state", meta_path.display()))?;
            println!(
                "state {} of scenario {} ({} / {}): recorded outcome `{}`",
                meta.state,
                meta.scenario,
                meta.device,
                meta.mode.as_str(),
                meta.outcome
            );
            for v in &meta.violations {
                println!("  recorded violation: {v}");
            }
            (
                dir.join("pmem.img"),
                dir.join("disk.img"),
                meta.cmdline,
                Some(meta.outcome),
            )
        }
        None => {
            let pmem = args
                .pmem
                .clone()
                .expect("clap requires --pmem without STATE");
            let disk = match &args.disk {
                Some(d) => d.clone(),
                None => {
                    let d = std::env::temp_dir()
                        .join(format!("pcache-reproduce-{}.disk", std::process::id()));
                    std::fs::File::create(&d)?.set_len(64 << 20)?;
                    scratch = Some(d.clone());
                    d
                }
            };
            let mode = match args.mode {
                CliMode::Strict => Mode::Strict,
                CliMode::Recover => Mode::Recover,
            };
            (pmem, disk, cmdline(&args.steps, mode, false), None)
        }
    };
    let result = boot(&kernel, &pmem, &disk, &line, args.timeout);
    if let Some(d) = scratch {
        let _ = std::fs::remove_file(d);
    }
    let rec = result?;
    println!("outcome: {}", rec.outcome());
    if let Some(want) = expected {
        if rec.outcome() == want {
            println!("same outcome as recorded");
        } else {
            bail!(
                "outcome `{}` differs from the recorded `{want}`",
                rec.outcome()
            );
        }
    }
    if let Some(f) = &rec.failure {
        bail!("recovery did not finish cleanly: {f}");
    }
    Ok(())
}

fn boot(kernel: &Path, pmem: &Path, disk: &Path, line: &str, timeout: u64) -> Result<Recovery> {
    let line = format!("{line} {}", protocol::CMDLINE_CONSOLE_FLAG);
    println!(
        "$ vmm run --pmem {} --disk {} --cmdline '{line}'",
        pmem.display(),
        disk.display()
    );
    let mut vm = vmm::VmConfig::new(kernel, line, pmem, disk)?;
    vm.timeout = Duration::from_secs(timeout);
    vm.console.terminal = true;
    let out = vmm::run(vm)?;
    let rec = Recovery::from_run(&out);
    for step in &rec.steps {
        println!("{}", serde_json::to_string_pretty(step)?);
    }
    for e in &rec.errors {
        println!("guest error: {e}");
    }
    Ok(rec)
}
