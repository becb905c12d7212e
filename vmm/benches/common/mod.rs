//! Helpers shared by the VMM benches.

use std::path::PathBuf;

/// The guest kernel built by `cargo xtask build-guest` (or `$PCACHE_GUEST`);
/// without it the bench stops with status 2.
pub fn guest() -> PathBuf {
    let p = std::env::var_os("PCACHE_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest/pcache-guest")
        });
    if !p.exists() {
        eprintln!(
            "guest kernel {} is missing: run `cargo xtask build-guest` (or `cargo xtask bench`)",
            p.display()
        );
        std::process::exit(2);
    }
    p
}
