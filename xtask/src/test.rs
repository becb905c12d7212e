//! `cargo xtask test`: every check the project has, in one command.
//!
//! Tests that need KVM are marked `#[ignore = "needs /dev/kvm"]` so that a plain
//! `cargo test` never reports them `ok` without running them. This command runs
//! them (with `--include-ignored`) when `/dev/kvm` opens read-write, and says how
//! many ran. With `REQUIRE_KVM=1` a host without usable KVM is a failure.
//! Every `#[ignore]`d test in the workspace is, by convention, a KVM test.
//!
//! The report page's test (`scenarios/tests/report_page.rs`) needs headless
//! Chromium and is not ignored: a host without it fails that test, and this
//! command says so before it builds anything.

use crate::guest;
use crate::util::{cargo, locked, output, run, workspace_root};
use anyhow::{bail, Result};
use clap::Args;

#[derive(Args)]
pub struct TestArgs {
    /// Skip fmt and clippy (for a quick local loop; CI never uses this).
    #[arg(long)]
    pub no_lint: bool,
}

pub fn test_all(args: TestArgs) -> Result<()> {
    let guest_dir = workspace_root().join("guest-images");
    let plugin_dir = workspace_root().join("qemu-trace");
    let browser = find_chromium().ok_or_else(|| {
        anyhow::anyhow!(
            "headless Chromium not found, which the report page's test needs: \
             install Debian's `chromium` package (apt-get install chromium), \
             or set CHROMIUM to a Chromium binary"
        )
    })?;
    eprintln!("report page test: Chromium at {}", browser.display());
    if !args.no_lint {
        step("format");
        run(cargo().args(["fmt", "--all", "--check"]))?;
        run(cargo()
            .current_dir(&guest_dir)
            .args(["fmt", "--all", "--check"]))?;

        step("clippy");
        run(locked(cargo().arg("clippy")).args([
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        run(locked(
            cargo()
                .current_dir(&guest_dir)
                .env_remove("RUSTFLAGS")
                .env(
                    "CARGO_TARGET_DIR",
                    workspace_root().join("target/guest-build"),
                )
                .arg("clippy"),
        )
        .args(["--release", "--", "-D", "warnings"]))?;
        // The QEMU trace plugin (GPL, outside the workspace).
        run(cargo()
            .current_dir(&plugin_dir)
            .args(["fmt", "--all", "--check"]))?;
        run(locked(plugin_cargo(&plugin_dir).arg("clippy")).args([
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }

    step("the QEMU trace plugin's tests");
    run(locked(plugin_cargo(&plugin_dir).arg("test")))?;

    step("pcache without std (the guest's build of the module)");
    run(cargo().args(["build", "--package", "pcache", "--no-default-features"]))?;

    step("guest kernel");
    let kernel = guest::build(guest::BuildGuestArgs {
        debug: false,
        feature: None,
    })?;
    eprintln!("guest kernel built at {}", kernel.display());
    // The deliberately broken module `explore`'s KVM test must catch.
    for f in guest::TEST_FEATURES {
        step(&format!("guest kernel with the test feature {f}"));
        let k = guest::build(guest::BuildGuestArgs {
            debug: false,
            feature: Some(f.to_string()),
        })?;
        eprintln!("built at {}", k.display());
    }

    let kvm = probe_kvm();
    let require_kvm = std::env::var("REQUIRE_KVM").is_ok_and(|v| v == "1");
    let kvm_tests = count_ignored_tests()?;

    step("workspace tests");
    let mut test = cargo();
    locked(test.arg("test")).arg("--workspace");
    if kvm.is_ok() {
        test.args(["--", "--include-ignored"]);
    }
    run(&mut test)?;

    step("summary");
    match kvm {
        Ok(()) => {
            println!("KVM tests: {kvm_tests} ran, 0 skipped");
            Ok(())
        }
        Err(why) => {
            println!("KVM tests: 0 ran, {kvm_tests} skipped ({why})");
            if require_kvm {
                bail!("REQUIRE_KVM=1 but {why}: the {kvm_tests} KVM tests could not run");
            }
            Ok(())
        }
    }
}

/// A cargo in `qemu-trace/` with the target folder `cargo xtask interop` builds it in.
fn plugin_cargo(dir: &std::path::Path) -> std::process::Command {
    let mut c = cargo();
    c.current_dir(dir).env_remove("RUSTFLAGS").env(
        "CARGO_TARGET_DIR",
        workspace_root().join("target/qemu-trace-build"),
    );
    c
}

fn step(name: &str) {
    eprintln!("\n==> {name}");
}

/// `$CHROMIUM`, else `chromium` or `chromium-browser` on the PATH (as the
/// report page's test looks for it).
fn find_chromium() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|n| dir.join(n)))
        .find(|p| p.is_file())
}

/// `Ok` when `/dev/kvm` opens read-write, else why not.
fn probe_kvm() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm could not be opened: {e}"))
}

/// Number of `#[ignore]`d (KVM) tests in the workspace, from the test harness's own listing.
fn count_ignored_tests() -> Result<usize> {
    let listing = output(locked(cargo().arg("test")).args([
        "--workspace",
        "--quiet",
        "--",
        "--list",
        "--ignored",
    ]))?;
    Ok(listing.lines().filter(|l| l.ends_with(": test")).count())
}
