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
}

/// Where `build-guest` puts the kernel; the VMM's tests and the scenarios load it from here.
pub fn guest_kernel_path() -> PathBuf {
    workspace_root().join("target/guest/pcache-guest")
}

pub fn build(args: BuildGuestArgs) -> Result<PathBuf> {
    let root = workspace_root();
    let guest_dir = root.join("guest-images");
    let target_dir = root.join("target/guest-build");
    let profile = if args.debug { "dev" } else { "release" };
    let mut cmd = cargo();
    cmd.current_dir(&guest_dir)
        // The guest's rustflags come from guest-images/.cargo/config.toml; an outer
        // RUSTFLAGS would override them.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("CARGO_TARGET_DIR", &target_dir)
        .arg("build");
    run(locked(&mut cmd).args(["--profile", profile, "--bin", "pcache-guest"]))?;

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
    let dest = guest_kernel_path();
    std::fs::create_dir_all(dest.parent().unwrap())?;
    // Copy to a temporary name and rename, so a reader never sees half a kernel.
    let tmp = dest.with_extension("tmp");
    std::fs::copy(&built, &tmp)
        .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}
