//! `cargo xtask bench`: builds the guest kernel and runs the VMM benchmark
//! (`vmm/benches/vm.rs`), which prints VMM start to first ring-3 instruction,
//! boot-to-exit, cost per traced store, cost per message and the VMM's RSS.

use crate::guest;
use crate::util::{cargo, locked, run};
use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct BenchArgs {}

pub fn bench(_args: BenchArgs) -> Result<()> {
    let kernel = guest::build(guest::BuildGuestArgs { debug: false })?;
    run(locked(cargo().arg("bench"))
        .args(["--package", "vmm", "--bench", "vm"])
        .env("PCACHE_GUEST", &kernel))
}
