//! `cargo xtask format` and `cargo xtask inspect`: make and read pcache cache
//! device images on the host.
//!
//! `format` creates a sparse image file and runs a first activation on it
//! through the `pcache` crate, leaving exactly the image the kernel leaves
//! (`docs/format.md` §5.10). `inspect` opens an image read-only (it never
//! writes) and prints what `pcache::inspect` finds, or its JSON (schema in
//! `pcache/README.md`).

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use pcache::format::CACHE_DEV_SIZE_MIN;
use pcache::inspect::{inspect as inspect_device, InspectError, InspectOptions};
use pcache::pmem::{FilePmem, MmapPmem};
use pcache::{activate, Mode, NoHooks, Options, Outcome};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use vmm::image_file::{check_kind, classify, open_image_file, ImageKind};

/// Recovery mode of the first activation.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    /// Exactly the kernel's behaviour and write order.
    Strict,
    /// The kernel's behaviour plus safer ordering and superblock recovery.
    Recover,
}

#[derive(Args)]
pub struct FormatArgs {
    /// Image file to create.
    pub image: PathBuf,
    /// Size: bytes, or with a binary suffix K, M, G, T (e.g. 512M, 1G, 1GiB). At least 512M.
    #[arg(long)]
    pub size: String,
    /// Enable per-key data CRCs (fixed at format).
    #[arg(long)]
    pub data_crc: bool,
    /// Overwrite an existing file.
    #[arg(long)]
    pub force: bool,
    /// Recovery mode of the activation.
    #[arg(long, value_enum, default_value_t = ModeArg::Recover)]
    pub mode: ModeArg,
}

#[derive(Args)]
pub struct InspectArgs {
    /// Image file to inspect (opened read-only).
    pub image: PathBuf,
    /// Print JSON (schema in pcache/README.md) instead of text.
    #[arg(long)]
    pub json: bool,
    /// List at most this many key-set log records (all are counted).
    #[arg(long, default_value_t = 100_000)]
    pub max_records: usize,
    /// List at most this many keys in all (all are counted).
    #[arg(long, default_value_t = 100_000)]
    pub max_keys: usize,
    /// Read and list at most this many segments (all are counted; segments
    /// whose metadata was never written are reported as ranges, not read).
    #[arg(long, default_value_t = 1024)]
    pub max_segments: usize,
}

/// Parses `512M`, `1G`, `1GiB`, `536870912`, ... (binary multiples): the
/// scenario files' size syntax, one parser for both.
pub fn parse_size(s: &str) -> Result<u64> {
    Ok(scenarios::spec::Size::parse(s)?.0)
}

pub fn format(args: FormatArgs) -> Result<()> {
    let size = parse_size(&args.size)?;
    if size < CACHE_DEV_SIZE_MIN {
        bail!(
            "size {} ({size} bytes) is below the minimum of a pcache cache device: 512 MiB ({CACHE_DEV_SIZE_MIN} bytes)",
            args.size
        );
    }
    let path = &args.image;
    // What is there decides: nothing (create it), a regular file (only with
    // --force), anything else is refused without opening it (a FIFO would
    // block the open) or writing to it (a block device is only read).
    let existing = classify(path)?;
    match existing {
        None => {}
        Some(ImageKind::Regular) if !args.force => bail!(
            "{} already exists; pass --force to overwrite it",
            path.display()
        ),
        Some(ImageKind::Regular) => {}
        Some(ImageKind::BlockDevice) => bail!(
            "{} is a block device; `format` makes image files only (block devices are only read, by `inspect` and `reproduce`)",
            path.display()
        ),
        Some(kind) => check_kind(path, kind)?,
    }
    // A file this command created is removed again if formatting fails
    // (a file it did not create is never removed).
    let mut created = existing.is_none().then(|| Created(path.clone()));
    {
        let mut o = OpenOptions::new();
        o.write(true)
            .create(true)
            .truncate(true)
            // A FIFO that replaced the path fails the open instead of
            // waiting for a reader.
            .custom_flags(libc::O_NONBLOCK);
        if existing.is_none() {
            o.create_new(true);
        }
        let f = o
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        // The path could have changed since `classify` (with --force; a
        // file made by `create_new` is always regular).
        if !f.metadata()?.file_type().is_file() {
            bail!("{} is not a regular file", path.display());
        }
        // Sparse: only the records the activation writes take space.
        f.set_len(size)
            .with_context(|| format!("cannot size {} to {size} bytes", path.display()))?;
    }
    let mut pmem =
        MmapPmem::open(path).with_context(|| format!("cannot map {}", path.display()))?;
    let opts = Options {
        mode: match args.mode {
            ModeArg::Strict => Mode::Strict,
            ModeArg::Recover => Mode::Recover,
        },
        data_crc: args.data_crc,
    };
    let report = activate(&mut pmem, &opts, &mut NoHooks);
    pmem.sync_all()
        .with_context(|| format!("cannot write {} back", path.display()))?;
    println!("image: {} ({size} bytes)", path.display());
    print!("{report}");
    if report.outcome != Outcome::Formatted {
        bail!(
            "the first activation did not format the image: {}",
            report.outcome
        );
    }
    if let Some(c) = created.as_mut() {
        c.keep();
    }
    Ok(())
}

/// A file created by `format`, removed on drop unless kept.
struct Created(PathBuf);

impl Created {
    fn keep(&mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

pub fn inspect(args: InspectArgs) -> Result<()> {
    let path: &Path = &args.image;
    // Regular files and block devices (sized from the device); a FIFO,
    // socket, directory or character device is refused without blocking.
    let img =
        open_image_file(path, false).with_context(|| format!("cannot open {}", path.display()))?;
    let pmem = FilePmem::from_file(img.file, img.size, false);
    let report = match inspect_device(
        &pmem,
        &InspectOptions {
            max_log_records: args.max_records,
            max_log_keys: args.max_keys,
            max_segments: args.max_segments,
        },
    ) {
        Ok(r) => r,
        Err(e @ InspectError::TooSmall { .. }) => bail!("{}: {e}", path.display()),
        Err(e) => bail!("{}: {e}", path.display()),
    };
    // Streamed: the listed segments and records are read while they are
    // written out, so memory does not grow with the output.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        writeln!(out, "image: {}", path.display())?;
        write!(out, "{report}")?;
    }
    out.flush()?;
    Ok(())
}
