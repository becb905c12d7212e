//! `cargo xtask export`: the logical content of a cached device, as a read
//! through the module returns it (the backing device's bytes with the cache's
//! keys in force over them), from a corruption report's images. The inputs are
//! never written: the cache is activated (and replayed) on an in-memory copy.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use pcache::backing::{Backing, FileBacking, ZeroBacking};
use pcache::pmem::{FilePmem, SparsePmem};
use pcache::{start, Mode, NoHooks, Options, Outcome};
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use vmm::image_file::open_image_file;

#[derive(Args)]
pub struct ExportArgs {
    /// The cache device image (pmem).
    #[arg(long)]
    pub pmem: PathBuf,
    /// The backing device image (default: zeros, as long as the last cached byte).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Where to write the logical content (a new file).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` if it exists.
    #[arg(long)]
    pub force: bool,
    /// pcache's mode for the activation (replay) on the in-memory copy.
    #[arg(long, value_enum, default_value_t = CliMode::Recover)]
    pub mode: CliMode,
    /// The cache's data_crc option.
    #[arg(long)]
    pub data_crc: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CliMode {
    Strict,
    Recover,
}

pub fn export(args: ExportArgs) -> Result<()> {
    let img = open_image_file(&args.pmem, false)
        .with_context(|| format!("cannot open {}", args.pmem.display()))?;
    let file = FilePmem::from_file(img.file, img.size, false);
    let mut copy = SparsePmem::copy_of(&file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", args.pmem.display()))?;
    let mode = match args.mode {
        CliMode::Strict => Mode::Strict,
        CliMode::Recover => Mode::Recover,
    };
    let opts = Options {
        mode,
        data_crc: args.data_crc,
    };
    let activation = start(&mut copy, &opts, &mut NoHooks);
    let Some(mut cache) = activation
        .cache
        .filter(|_| activation.report.outcome == Outcome::Opened)
    else {
        bail!(
            "{} does not open as an existing cache in {mode} mode, so it has no content to export:\n{}",
            args.pmem.display(),
            activation.report
        );
    };
    let cached_end = cache
        .index()
        .extents()
        .map(|e| e.off + e.len as u64)
        .max()
        .unwrap_or(0);
    let disk = match &args.disk {
        Some(p) => Some((
            open_image_file(p, false).with_context(|| format!("cannot open {}", p.display()))?,
            p,
        )),
        None => None,
    };
    let size = disk.as_ref().map_or(cached_end, |(d, _)| d.size);
    if args.out.exists() && !args.force {
        bail!("{} exists; pass --force to replace it", args.out.display());
    }
    let mut out = std::fs::File::create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    out.set_len(size)?;
    // The backing device first, then the cache's keys over it.
    let (mut extents, mut bytes, mut beyond) = (0u64, 0u64, 0u64);
    for e in cache.index().extents() {
        if e.off >= size {
            beyond += 1;
            continue;
        }
        extents += 1;
        bytes += (e.len as u64).min(size - e.off);
    }
    let source = disk
        .as_ref()
        .map_or("zeros (no --disk)".to_string(), |(_, p)| {
            p.display().to_string()
        });
    // Every byte as a read through the module returns it (cached extents
    // from the in-memory copy, the rest from the backing device); the
    // misses it fills go into the copy, never into the user's image.
    let mut backing: Box<dyn Backing> = match disk {
        Some((d, _)) => Box::new(FileBacking::from_file(d.file, d.size, false)),
        None => Box::new(ZeroBacking {
            sectors: size.div_ceil(512),
        }),
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = buf.len().min((size - off) as usize);
        cache
            .read(
                &mut copy,
                backing.as_mut(),
                &mut NoHooks,
                off,
                &mut buf[..n],
            )
            .map_err(|e| anyhow::anyhow!("reading {off:#x}+{n} through the module: {e}"))?;
        if buf[..n].iter().any(|&b| b != 0) {
            out.write_all_at(&buf[..n], off)?;
        }
        off += n as u64;
    }
    out.flush()?;
    println!(
        "{}: {size} bytes; {extents} cached extent(s), {bytes} bytes from the cache (key_head {}), the rest from {}",
        args.out.display(),
        cache.key_head(),
        source
    );
    if beyond > 0 {
        println!("warning: {beyond} cached extent(s) lie beyond the backing device's end and were left out");
    }
    Ok(())
}
