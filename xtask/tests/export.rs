//! `cargo xtask export` on an image Linux 7.2.13 wrote: the module replays the
//! kernel's log and the exported content is exactly what the kernel's
//! workload wrote; the input is not modified and an existing output is kept.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("run xtask")
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The kernel-written fixture, decompressed to a sparse file in `dir`.
fn kernel_image(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../interop/fixtures/kernel-writes-512M.img.zst");
    let path = dir.join("kernel.img");
    interop::image::write_sparse(&interop::image::read_zst(&src).unwrap(), &path).unwrap();
    path
}

#[test]
fn export_gives_the_content_the_kernel_wrote_in_both_modes() {
    let d = TempDir(std::env::temp_dir().join(format!("xtask-export-{}", std::process::id())));
    std::fs::create_dir_all(&d.0).unwrap();
    let img = kernel_image(&d.0);
    let before = std::fs::read(&img).unwrap();
    for mode in ["strict", "recover"] {
        let out = d.0.join(format!("{mode}.out"));
        let o = xtask(&[
            "export",
            "--pmem",
            img.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--mode",
            mode,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), (4 << 20) + (512 << 10), "{mode}");
        for (off, &b) in got.iter().enumerate() {
            assert_eq!(
                b,
                interop::cases::kernel_writes_content(off as u64),
                "{mode}: logical byte {off:#x}"
            );
        }
        // An existing output is not replaced without --force.
        let o = xtask(&[
            "export",
            "--pmem",
            img.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    }
    assert!(
        std::fs::read(&img).unwrap() == before,
        "export modified its input"
    );
}

#[test]
fn export_of_a_disk_overlays_the_cache_on_the_backing_device() {
    let d = TempDir(std::env::temp_dir().join(format!("xtask-export-disk-{}", std::process::id())));
    std::fs::create_dir_all(&d.0).unwrap();
    let img = kernel_image(&d.0);
    let disk = d.0.join("disk.img");
    std::fs::write(&disk, vec![0x5au8; 8 << 20]).unwrap();
    let out = d.0.join("out");
    let o = xtask(&[
        "export",
        "--pmem",
        img.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), 8 << 20);
    for (off, &b) in got.iter().enumerate() {
        let cached = interop::cases::kernel_writes_content(off as u64);
        // Bytes the workload never wrote come from the backing device.
        let want = if cached == 0 { 0x5a } else { cached };
        assert_eq!(b, want, "logical byte {off:#x}");
    }
}
