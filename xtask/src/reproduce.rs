//! `cargo xtask reproduce`: boots recovery on one saved crash state, or on an
//! image from a corruption report, with the console on. Images are never
//! modified: the VM runs on copy-on-write views of them.

use crate::guest;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use scenarios::guest::{cmdline, Recovery};
use scenarios::runner::{replay, replay_saved};
use scenarios::spec::Mode;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmm::image_file::open_image_file;

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
    // Check the user's image paths before the (slow) guest build: a FIFO,
    // directory, socket or character device is a clear error, never a hang.
    for p in [&args.pmem, &args.disk].into_iter().flatten() {
        open_image_file(p, false).with_context(|| format!("cannot open {}", p.display()))?;
    }
    let kernel = guest::build(guest::BuildGuestArgs {
        debug: false,
        feature: None,
    })?;
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
            let (_file, disk) = scratch_disk()?;
            replay(&kernel, &pmem, &disk, &line, timeout, true)?
        }
    };
    report(&rec)
}

/// Size of the empty disk used when none is given.
const SCRATCH_DISK_SIZE: u64 = 64 << 20;

/// An empty scratch disk that leaves nothing behind, even if the process is
/// killed: the file is unlinked as it is created, and the VMM opens it again
/// through `/proc/self/fd/N` while `File` (returned with its path) is held.
fn scratch_disk() -> Result<(File, PathBuf)> {
    let file = tempfile::tempfile().context("creating a scratch disk")?;
    file.set_len(SCRATCH_DISK_SIZE)
        .context("sizing the scratch disk")?;
    let path = Path::new("/proc/self/fd").join(file.as_raw_fd().to_string());
    Ok((file, path))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_scratch_disk_has_no_name_left_to_leak() {
        let (file, path) = scratch_disk().unwrap();
        // No directory entry: nothing remains after a SIGKILL.
        assert_eq!(file.metadata().unwrap().nlink(), 0);
        // The VMM's image opening accepts the /proc path with the right size.
        let img = open_image_file(&path, false).unwrap();
        assert_eq!(img.size, SCRATCH_DISK_SIZE);
        assert_eq!(
            img.file.metadata().unwrap().ino(),
            file.metadata().unwrap().ino()
        );
        let d = vmm::DiskImage::open(&path, vmm::ImageMode::CopyOnWrite).unwrap();
        assert_eq!(d.size(), SCRATCH_DISK_SIZE);
    }
}
