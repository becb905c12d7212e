//! `cargo xtask reproduce`: boots recovery on one saved crash state, or on an
//! image from a corruption report, with the console on. Images are never
//! modified: the VM runs on copy-on-write views of them.

use crate::guest;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use scenarios::guest::{cmdline, Recovery};
use scenarios::runner::{replay, replay_saved};
use scenarios::spec::Mode;
use std::path::PathBuf;
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
    let timeout = Duration::from_secs(args.timeout);
    if let Some(dir) = &args.state {
        let (meta, rec) = replay_saved(&kernel, dir, timeout, true).with_context(|| {
            format!("replaying {} (is it a saved state folder?)", dir.display())
        })?;
        println!(
            "state {} of scenario {} ({} / {}): recorded outcome `{}`",
            meta.state, meta.scenario, meta.device, meta.mode, meta.outcome
        );
        for v in &meta.violations {
            println!("  recorded violation: {v}");
        }
        // A recorded failure (timeout, panic) that happens again is a
        // reproduction, not an error of this command: compare first.
        let _ = report(&rec);
        let differences = meta.differences(&rec);
        if !differences.is_empty() {
            bail!("the replay differs: {}", differences.join("; "));
        }
        println!("same outcome as recorded");
        return Ok(());
    }
    let pmem = args
        .pmem
        .clone()
        .expect("clap requires --pmem without STATE");
    let mode = match args.mode {
        CliMode::Strict => Mode::Strict,
        CliMode::Recover => Mode::Recover,
    };
    let line = cmdline(&args.steps, mode, false);
    let rec = match &args.disk {
        Some(disk) => replay(&kernel, &pmem, disk, &line, timeout, true)?,
        None => {
            // No disk given: an empty scratch disk, removed afterwards.
            let disk =
                std::env::temp_dir().join(format!("pcache-reproduce-{}.disk", std::process::id()));
            std::fs::File::create(&disk)?.set_len(64 << 20)?;
            let rec = replay(&kernel, &pmem, &disk, &line, timeout, true);
            let _ = std::fs::remove_file(&disk);
            rec?
        }
    };
    report(&rec)
}

fn report(rec: &Recovery) -> Result<()> {
    for step in &rec.steps {
        println!("{}", serde_json::to_string_pretty(step)?);
    }
    for e in &rec.errors {
        println!("guest error: {e}");
    }
    println!("outcome: {}", rec.outcome());
    if let Some(f) = &rec.failure {
        bail!("recovery did not finish cleanly: {f}");
    }
    Ok(())
}
