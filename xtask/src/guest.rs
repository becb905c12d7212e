//! `cargo xtask build-guest`: builds the freestanding guest kernel.
//!
//! The guest crate is not a workspace member: it needs its own target flags
//! (`guest-images/.cargo/config.toml`), which cargo only reads when it runs
//! from inside `guest-images/`. So we run a nested cargo there, with its own
//! target directory, scan its ring-0 code (`ring0_scan`), and copy the ELF
//! to a fixed path.

use crate::ring0_scan;
use crate::util::{cargo, locked, run, workspace_root};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct BuildGuestArgs {
    /// Build without optimisations (slow in ring 0; for debugging only).
    #[arg(long)]
    pub debug: bool,
    /// A test-only feature of the guest (a deliberately broken module, e.g.
    /// `test-drop-data-fence`); built in its own target folder into
    /// `target/guest/pcache-guest-FEATURE`, never over the normal kernel.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(TEST_FEATURES))]
    pub feature: Option<String>,
}

/// The guest's test-only features (`guest-images/Cargo.toml`).
pub const TEST_FEATURES: &[&str] = &["test-drop-data-fence"];

/// Where `build-guest` puts the kernel; the VMM's tests and the scenarios load it from here.
pub fn guest_kernel_path() -> PathBuf {
    workspace_root().join("target/guest/pcache-guest")
}

/// Where `build-guest --feature FEATURE` puts its kernel.
pub fn guest_kernel_path_with(feature: Option<&str>) -> PathBuf {
    match feature {
        None => guest_kernel_path(),
        Some(f) => workspace_root().join(format!("target/guest/pcache-guest-{f}")),
    }
}

pub fn build(args: BuildGuestArgs) -> Result<PathBuf> {
    let root = workspace_root();
    let guest_dir = root.join("guest-images");
    // A test feature builds in a folder of its own: the normal kernel's
    // build is never touched by it (nor rebuilt after it).
    let target_dir = match &args.feature {
        None => root.join("target/guest-build"),
        Some(f) => root.join(format!("target/guest-build-{f}")),
    };
    let profile = if args.debug { "dev" } else { "release" };
    let mut cmd = cargo();
    cmd.current_dir(&guest_dir)
        // The guest's rustflags come from guest-images/.cargo/config.toml; an outer
        // RUSTFLAGS would override them.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("CARGO_TARGET_DIR", &target_dir)
        .arg("build");
    locked(&mut cmd).args(["--profile", profile, "--bin", "pcache-guest"]);
    if let Some(f) = &args.feature {
        cmd.args(["--features", f]);
    }
    run(&mut cmd)?;

    let profile_dir = if args.debug { "debug" } else { "release" };
    let built = target_dir.join(format!(
        "x86_64-unknown-linux-gnu/{profile_dir}/pcache-guest"
    ));
    // A kernel with an instruction PVM cannot run at CPL 0 never reaches `dest`.
    let scan = ring0_scan::check_kernel(&built)?;
    eprintln!(
        "ring-0 scan: {} instructions in {:#x}..{:#x}, none rejected",
        scan.instructions, scan.start, scan.end
    );
    let dest = guest_kernel_path_with(args.feature.as_deref());
    std::fs::create_dir_all(dest.parent().unwrap())?;
    // Copy to a temporary name and rename, so a reader never sees half a kernel.
    let tmp = dest.with_extension("tmp");
    std::fs::copy(&built, &tmp)
        .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}
