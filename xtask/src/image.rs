//! `cargo xtask format` and `cargo xtask inspect`: make and read pcache cache
//! device images on the host.
//!
//! `format` creates a sparse image file and runs a first activation on it
//! through the `pcache` crate, leaving exactly the image the kernel leaves
//! (`pcache-format.md` §3.10). `inspect` opens an image read-only (it never
//! writes) and prints what `pcache::inspect` finds, or its JSON (schema in
//! `pcache/README.md`).

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use pcache::format::CACHE_DEV_SIZE_MIN;
use pcache::inspect::{inspect as inspect_device, InspectError, InspectOptions};
use pcache::pmem::{FilePmem, MmapPmem};
use pcache::{activate, Mode, NoHooks, Options, Outcome};
use std::fs::OpenOptions;
use std::path::PathBuf;

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
    if path.exists() && !args.force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            path.display()
        );
    }
    {
        let mut o = OpenOptions::new();
        o.write(true).create(true).truncate(true);
        if !args.force {
            o.create_new(true);
        }
        let f = o
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
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
    Ok(())
}

pub fn inspect(args: InspectArgs) -> Result<()> {
    let path = &args.image;
    let pmem = FilePmem::open_read_only(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let report = match inspect_device(
        &pmem,
        &InspectOptions {
            max_log_records: args.max_records,
            max_log_keys: args.max_keys,
        },
    ) {
        Ok(r) => r,
        Err(e @ InspectError::TooSmall { .. }) => bail!("{}: {e}", path.display()),
        Err(e) => bail!("{}: {e}", path.display()),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("image: {}", path.display());
        print!("{report}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2t").unwrap(), 2 << 40);
        assert_eq!(parse_size("536870912").unwrap(), 536_870_912);
        assert_eq!(parse_size(" 64k ").unwrap(), 64 << 10);
        for bad in ["", "M", "12X", "1.5G", "-1G", "99999999999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
