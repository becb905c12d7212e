//! The `vmm` command line: errors that say what to fix (no KVM needed), and a
//! run whose exit status is the guest's exit code (KVM).

mod common;

use std::process::Command;

use common::*;

fn vmm(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .output()
        .expect("run the vmm binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn paths(img: &Images) -> (String, String) {
    (
        img.pmem().display().to_string(),
        img.disk().display().to_string(),
    )
}

#[test]
fn missing_kernel_says_how_to_build_one() {
    let img = Images::new();
    let (p, d) = paths(&img);
    let (code, _, err) = vmm(&[
        "run",
        "--kernel",
        "/no/such/kernel",
        "--pmem",
        &p,
        "--disk",
        &d,
    ]);
    assert_eq!(code, 100, "{err}");
    assert!(
        err.contains("/no/such/kernel") && err.contains("cargo xtask build-guest"),
        "{err}"
    );
}

#[test]
fn non_elf_kernel_is_refused() {
    let img = Images::new();
    let (p, d) = paths(&img);
    let (code, _, err) = vmm(&["run", "--kernel", &d, "--pmem", &p, "--disk", &d]);
    assert_eq!(code, 100, "{err}");
    assert!(err.contains("not an ELF"), "{err}");
}

#[test]
fn small_pmem_is_refused_before_boot_with_a_fix() {
    let img = Images::new();
    let small = img.dir.as_path().join("small.img");
    vmm::memory::create_sparse_file(&small, 64 << 20).unwrap();
    let elf = std::env::current_exe().unwrap(); // any ELF will do: nothing boots
    let (code, _, err) = vmm(&[
        "run",
        "--kernel",
        elf.to_str().unwrap(),
        "--pmem",
        small.to_str().unwrap(),
        "--disk",
        &img.disk().display().to_string(),
    ]);
    assert_eq!(code, 100, "{err}");
    assert!(
        err.contains("at least 512 MiB") && err.contains("truncate -s 512M"),
        "{err}"
    );
}

#[test]
fn bad_timeout_is_refused() {
    let img = Images::new();
    let (p, d) = paths(&img);
    let (code, _, err) = vmm(&[
        "run",
        "--kernel",
        "k",
        "--pmem",
        &p,
        "--disk",
        &d,
        "--timeout",
        "-1",
    ]);
    assert_ne!(code, 0, "{err}");
}

#[test]
#[ignore = "needs /dev/kvm"]
fn run_reports_the_outcome_and_exits_with_the_guest_code() {
    let img = Images::new();
    let (p, d) = paths(&img);
    let kernel = guest_kernel().display().to_string();
    let (code, out, err) = vmm(&[
        "run",
        "--kernel",
        &kernel,
        "--pmem",
        &p,
        "--disk",
        &d,
        "--trace",
        "--json",
        "--cmdline",
        "harness.test=message:from-cli;pmem-store:0x10:1",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON on stdout");
    assert_eq!(v["outcome"]["kind"], "exited");
    assert_eq!(v["outcome"]["code"], 0);
    assert_eq!(v["messages"][0]["text"], "from-cli");
    assert_eq!(v["window_events"][0], 1);

    let (code, out, err) = vmm(&[
        "run",
        "--kernel",
        &kernel,
        "--pmem",
        &p,
        "--disk",
        &d,
        "--timeout",
        "0.3",
        "--cmdline",
        "harness.test=spin",
    ]);
    assert_eq!(code, 124, "{out}{err}");
    assert!(out.contains("outcome: timeout"), "{out}");
}

#[test]
#[ignore = "needs /dev/kvm"]
fn saved_window_becomes_crash_image_files() {
    let img = Images::new();
    let (p, d) = paths(&img);
    let kernel = guest_kernel().display().to_string();
    let win = img.dir.as_path().join("win");
    let (code, out, err) = vmm(&[
        "run",
        "--kernel",
        &kernel,
        "--pmem",
        &p,
        "--disk",
        &d,
        "--trace",
        "--save-trace",
        win.to_str().unwrap(),
        "--cmdline",
        "harness.test=pmem-store:0x10:5;pmem-flush;pmem-store:0x18:6",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let w0 = win.join("window-0");
    let po = img.dir.as_path().join("crash-pmem");
    let dout = img.dir.as_path().join("crash-disk");
    let (code, out, err) = vmm(&[
        "crash",
        "--window",
        w0.to_str().unwrap(),
        "--pmem-out",
        po.to_str().unwrap(),
        "--disk-out",
        dout.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("1 writes applied (1 pending, 0 kept)"),
        "{out}"
    );
    let f = std::fs::File::open(&po).unwrap();
    let mut b = [0u8; 16];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0x10).unwrap();
    assert_eq!(&b[..8], &5u64.to_le_bytes());
    assert_eq!(&b[8..], &[0; 8], "the pending store was not kept");
}

#[test]
fn bad_fault_plans_are_refused_with_the_form_expected() {
    let img = Images::new();
    let (p, d) = paths(&img);
    for (flag, value, says) in [
        ("--blk-fail-flush", "0", "start at 1"),
        ("--blk-fail-write", "0+", "start at 1"),
        ("--blk-fail-flush", "x", "is not N or N+"),
        ("--blk-fail-write", "+3", "is not N or N+"),
        ("--blk-fail-flush", "2,3++", "is not N or N+"),
    ] {
        let (code, _, err) = vmm(&[
            "run", "--kernel", "k", "--pmem", &p, "--disk", &d, flag, value,
        ]);
        assert_eq!(code, 2, "{flag} {value}: {err}");
        assert!(
            err.contains(flag) && err.contains(says),
            "{flag} {value}: {err}"
        );
    }
}

#[test]
#[ignore = "needs /dev/kvm"]
fn fault_flags_fail_the_chosen_requests() {
    let img = Images::new();
    let (p, d) = paths(&img);
    let kernel = guest_kernel().display().to_string();
    let run = |extra: &[&str], json: bool| {
        let mut args = vec![
            "run",
            "--kernel",
            &kernel,
            "--pmem",
            &p,
            "--disk",
            &d,
            "--cmdline",
            "harness.test=blk-write:1:7;blk-flush",
        ];
        if json {
            args.push("--json");
        }
        args.extend_from_slice(extra);
        vmm(&args)
    };
    let (code, out, err) = run(&["--blk-fail-flush", "1"], false);
    assert_eq!(code, protocol::ExitCode::StepFailed as i32, "{out}{err}");
    assert!(out.contains("`blk-flush` failed"), "{out}");
    assert!(
        out.contains("[blk fault] flush 1 failed with IOERR"),
        "{out}"
    );

    let (code, out, err) = run(&["--blk-fail-write", "1+", "--blk-fail-flush", "5"], true);
    assert_eq!(code, protocol::ExitCode::StepFailed as i32, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON on stdout");
    assert_eq!(v["blk_faults"][0]["kind"], "write");
    assert_eq!(v["blk_faults"][0]["nth"], 1);
    assert_eq!(v["blk_faults"][0]["sector"], 1);

    let (code, out, err) = run(&[], true);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v.get("blk_faults").is_none(), "{out}");
}
