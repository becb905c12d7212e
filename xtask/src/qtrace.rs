//! Builds the QEMU trace plugin (`qemu-trace/`, GPL-2.0-only, outside the
//! workspace) with a nested cargo in its own target folder, the way
//! `build-guest` builds the guest: cargo's incremental build is the cache,
//! so a later run that changed nothing there costs a second.

use crate::util::{cargo, locked, run, workspace_root};
use anyhow::{Context, Result};
use std::path::PathBuf;

/// Where the built plugin is put (QEMU loads it with `-plugin`).
pub fn plugin_path() -> PathBuf {
    workspace_root().join("target/qemu-trace/libqemu_trace.so")
}

pub fn build_plugin() -> Result<PathBuf> {
    let root = workspace_root();
    let target_dir = root.join("target/qemu-trace-build");
    let mut cmd = cargo();
    cmd.current_dir(root.join("qemu-trace"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("CARGO_TARGET_DIR", &target_dir)
        .arg("build");
    locked(&mut cmd).args(["--release", "--lib"]);
    run(&mut cmd)?;
    let built = target_dir.join("release/libqemu_trace.so");
    let dest = plugin_path();
    std::fs::create_dir_all(dest.parent().expect("has a parent"))?;
    // Copy and rename: a QEMU starting meanwhile never maps half a plugin.
    let tmp = dest.with_extension("tmp");
    std::fs::copy(&built, &tmp)
        .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}
