//! `vmm`: runs the guest kernel under KVM with a virtio-pmem region and a
//! virtio-blk disk, and reports how the run ended.
//!
//! Exit status: the guest's exit code when it exited (0 = success), 124 on a
//! timeout, 125 for any other way the guest stopped, 100 when the VMM itself
//! failed (the message says what to fix).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use vmm::vm::ConsoleConfig;
use vmm::{BlkFaults, DiskImage, FaultWhen, ImageMode, Outcome, PmemRegion, VmConfig};

#[derive(Parser)]
#[command(name = "vmm", about = "A small KVM monitor for the pcache harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel and run it to its end.
    Run(RunArgs),
    /// Build the crash images of a saved traced window (see `run --save-trace`).
    Crash(CrashArgs),
}

#[derive(clap::Args)]
struct CrashArgs {
    /// A window directory written by `vmm run --save-trace`.
    #[arg(long)]
    window: PathBuf,
    /// Cut position: events [0, CUT) were issued before power failed (default: all).
    #[arg(long)]
    cut: Option<u64>,
    /// Pending writes (sequence numbers) that reached the media; the flushed
    /// ones always did. Default: none.
    #[arg(long, value_delimiter = ',')]
    keep: Vec<u64>,
    /// Keep every pending write.
    #[arg(long, conflicts_with = "keep")]
    keep_all: bool,
    /// Where to write the pmem crash image.
    #[arg(long)]
    pmem_out: PathBuf,
    /// Where to write the disk crash image.
    #[arg(long)]
    disk_out: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The guest kernel (64-bit ELF; `cargo xtask build-guest` builds target/guest/pcache-guest).
    #[arg(long)]
    kernel: PathBuf,
    /// Kernel command line (the VMM appends the virtio-mmio device entries).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// The pmem image (at least 512 MiB, a multiple of 2 MiB).
    #[arg(long)]
    pmem: PathBuf,
    /// The disk image (a multiple of 512 bytes).
    #[arg(long)]
    disk: PathBuf,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = protocol::layout::RAM_DEFAULT_MIB)]
    mem: u64,
    /// Trace pmem stores, flushes and disk writes from the first instruction.
    #[arg(long)]
    trace: bool,
    /// Save the traced windows (base images + trace) under this directory, one
    /// subdirectory each (windows come from --trace or the guest's trace markers).
    #[arg(long, value_name = "DIR")]
    save_trace: Option<PathBuf>,
    /// Time budget in seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Echo the guest console to standard error.
    #[arg(long)]
    console: bool,
    /// Append the guest console to this file.
    #[arg(long, value_name = "FILE")]
    console_log: Option<PathBuf>,
    /// Let the guest modify the image files (default: copy-on-write views; the files are never written).
    #[arg(long)]
    write_through: bool,
    /// Create the in-kernel irqchip and wire device interrupts as irqfds (traced stores cost 2x; the project's guest polls).
    #[arg(long)]
    interrupts: bool,
    /// Fail virtio-blk WRITE number N (1-based, since boot) with IOERR, or with
    /// N+ that one and every later one; the disk is left unchanged. Repeat the
    /// flag or separate with commas for several.
    #[arg(long, value_name = "N[+]", value_delimiter = ',')]
    blk_fail_write: Vec<FaultWhen>,
    /// Fail virtio-blk FLUSH number N (1-based, since boot) with IOERR, or with
    /// N+ that one and every later one; a failed flush is no barrier in the trace.
    #[arg(long, value_name = "N[+]", value_delimiter = ',')]
    blk_fail_flush: Vec<FaultWhen>,
    /// Print the run's summary as JSON on standard output.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Run(args) => run(args),
        Command::Crash(args) => crash(args).map(|()| ExitCode::SUCCESS),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmm: error: {e:#}");
            ExitCode::from(100)
        }
    }
}

fn run(a: RunArgs) -> Result<ExitCode> {
    if !(a.timeout > 0.0 && a.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    // Cheap checks first, so each mistake is reported on its own.
    vmm::boot::check_kernel(&a.kernel)?;
    let mode = if a.write_through {
        ImageMode::WriteThrough
    } else {
        ImageMode::CopyOnWrite
    };
    let config = VmConfig {
        kernel: a.kernel,
        cmdline: a.cmdline,
        mem_mib: a.mem,
        pmem: PmemRegion::open(&a.pmem, mode)?,
        disk: DiskImage::open(&a.disk, mode)?,
        trace: a.trace,
        timeout: Duration::from_secs_f64(a.timeout),
        console: ConsoleConfig {
            log: a.console_log,
            terminal: a.console,
        },
        interrupts: a.interrupts,
        blk_faults: BlkFaults {
            fail_writes: a.blk_fail_write,
            fail_flushes: a.blk_fail_flush,
        },
    };
    vmm::vm::check_kvm()?;
    let result = vmm::run(config)?;
    if let Some(dir) = &a.save_trace {
        for (i, w) in result.windows.iter().enumerate() {
            let d = dir.join(format!("window-{i}"));
            w.save(&d)
                .with_context(|| format!("saving traced window {i}"))?;
            eprintln!(
                "vmm: saved window {i} ({} events) to {}",
                w.trace.len(),
                d.display()
            );
        }
    }
    let summary = result.summary();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        for m in &summary.messages {
            match &m.exception {
                Some(e) => println!(
                    "[{}] vector {} error {:#x} rip {:#x} cr2 {:#x}",
                    m.kind, e.vector, e.error_code, e.rip, e.cr2
                ),
                None => println!("[{}] {}", m.kind, m.text),
            }
        }
        for p in &summary.protocol_errors {
            println!("[protocol error] {p}");
        }
        for f in &summary.blk_faults {
            println!(
                "[blk fault] {} {} failed with IOERR (fault plan)",
                f.kind, f.nth
            );
        }
        println!(
            "outcome: {} {}",
            summary.outcome.name(),
            serde_json::to_string(&summary.outcome)?
        );
        println!(
            "setup {:.2} ms, total {:.2} ms, {} exits, {} traced stores, windows {:?}",
            summary.stats.setup_ns as f64 / 1e6,
            summary.stats.total_ns as f64 / 1e6,
            summary.stats.exits,
            summary.stats.traced_stores,
            summary.window_events
        );
    }
    Ok(match summary.outcome {
        Outcome::Exited { code } => ExitCode::from(code.min(99) as u8),
        Outcome::Timeout { .. } => ExitCode::from(124),
        _ => ExitCode::from(125),
    })
}

fn crash(a: CrashArgs) -> Result<()> {
    let saved = vmm::SavedWindow::open(&a.window)?;
    let cut = a.cut.unwrap_or(saved.trace.len() as u64);
    let pending = saved.trace.pending_at(cut);
    let keep = if a.keep_all { pending.clone() } else { a.keep };
    let images = saved.build_flushed_plus(cut, &keep)?;
    images.write_files(&a.pmem_out, &a.disk_out)?;
    println!(
        "cut {cut} of {}: {} writes applied ({} pending, {} kept); wrote {} and {}",
        saved.trace.len(),
        images.applied.len(),
        pending.len(),
        keep.len(),
        a.pmem_out.display(),
        a.disk_out.display()
    );
    Ok(())
}
