//! Helpers shared by the KVM integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::{RunOutcome, VmConfig};
use vmm_sys_util::tempdir::TempDir;

/// The guest kernel built by `cargo xtask build-guest` (or `$PCACHE_GUEST`).
pub fn guest_kernel() -> PathBuf {
    let p = std::env::var_os("PCACHE_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest/pcache-guest")
        });
    assert!(
        p.exists(),
        "guest kernel {} is missing: run `cargo xtask build-guest` first",
        p.display()
    );
    p
}

/// A scratch directory with a fresh sparse 512 MiB pmem image and a 16 MiB disk.
pub struct Images {
    pub dir: TempDir,
}

impl Images {
    pub fn new() -> Self {
        let dir = TempDir::new().expect("temp dir");
        vmm::memory::create_sparse_file(&dir.as_path().join("pmem.img"), 512 << 20).unwrap();
        vmm::memory::create_sparse_file(&dir.as_path().join("disk.img"), 16 << 20).unwrap();
        Images { dir }
    }
    pub fn pmem(&self) -> PathBuf {
        self.dir.as_path().join("pmem.img")
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.as_path().join("disk.img")
    }
    pub fn config(&self, cmdline: &str) -> VmConfig {
        let mut c = VmConfig::new(guest_kernel(), cmdline, &self.pmem(), &self.disk()).unwrap();
        c.timeout = Duration::from_secs(20);
        c
    }
}

/// Runs the guest with `harness.test=<steps>`.
pub fn run_steps(images: &Images, steps: &str, extra: &str) -> RunOutcome {
    let c = images.config(&format!("harness.test={steps} {extra}"));
    vmm::run(c).expect("the VMM runs")
}

/// A readable summary for assertion messages.
pub fn describe(r: &RunOutcome) -> String {
    format!(
        "outcome {:?}\nmessages {:?}\nconsole {:?}\nprotocol errors {:?}",
        r.outcome,
        r.messages
            .iter()
            .map(|m| (m.kind, m.text()))
            .collect::<Vec<_>>(),
        r.console_text(),
        r.protocol_errors
    )
}
