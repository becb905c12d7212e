//! The kernel side: Debian sid's Linux 7.2.13 and its modules, dm-pcache
//! built out of tree with the kernel's own compiler, and an initramfs.
//!
//! `prepare.sh` does the work in a cache folder outside the repository
//! (`$XDG_CACHE_HOME/pcache-harness/kernel-7.2.13`, or `~/.cache/...`), each step
//! once; this module checks the host tools first, runs it, relays its steps
//! as progress and checks what it left.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The kernel release, pinned: the packages, the module's source and the
/// compiler all follow from it.
pub const KERNEL_RELEASE: &str = "7.2.13+deb14-amd64";
/// The `linux-source-*` package version.
pub const SOURCE_VERSION: &str = "7.2";
/// Debian's archive, as this machine's own apt sources name it.
pub const MIRROR: &str = "http://deb.debian.org/debian";

const PREPARE_SH: &str = include_str!("../prepare.sh");
const INIT_SH: &str = include_str!("../init.sh");

/// A host tool the suite needs, and the package that has it.
struct Tool {
    command: &'static str,
    package: &'static str,
}

const TOOLS: &[Tool] = &[
    Tool {
        command: "qemu-system-x86_64",
        package: "qemu-system-x86",
    },
    Tool {
        command: "debootstrap",
        package: "debootstrap",
    },
    Tool {
        command: "apt-get",
        package: "apt",
    },
    Tool {
        command: "dpkg-deb",
        package: "dpkg",
    },
    Tool {
        command: "cpio",
        package: "cpio",
    },
    Tool {
        command: "xz",
        package: "xz-utils",
    },
    Tool {
        command: "chroot",
        package: "coreutils",
    },
    Tool {
        command: "mountpoint",
        package: "util-linux",
    },
];

/// Why the kernel side could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("missing host tools: {}; install them with: apt-get install -y {}", .commands.join(", "), .packages.join(" "))]
    MissingTools {
        commands: Vec<&'static str>,
        packages: Vec<&'static str>,
    },
    #[error("preparing the kernel side needs root (debootstrap, chroot, mount)")]
    NotRoot,
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("preparation failed at step `{step}` (exit {code:?}); last output:\n{tail}")]
    Failed {
        step: String,
        code: Option<i32>,
        tail: String,
    },
    #[error("preparation finished but {0} is missing")]
    Incomplete(PathBuf),
}

/// What the boots need.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// The cache folder.
    pub cache: PathBuf,
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// The initramfs without a run script.
    pub initrd: PathBuf,
    /// sha256 of the dm-pcache module that was built.
    pub module_sha256: String,
}

/// The cache folder: `$XDG_CACHE_HOME/pcache-harness/kernel-<release>` or
/// `$HOME/.cache/pcache-harness/kernel-<release>` (named by the pinned
/// release, so a change of pin never reuses another kernel's files).
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("pcache-harness").join(format!(
        "kernel-{}",
        KERNEL_RELEASE.split('+').next().unwrap_or(KERNEL_RELEASE)
    ))
}

/// The host tools that are not on `PATH`.
pub fn missing_tools() -> Result<(), PrepareError> {
    let missing: Vec<&Tool> = TOOLS.iter().filter(|t| !on_path(t.command)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&'static str> = missing.iter().map(|t| t.package).collect();
    packages.dedup();
    Err(PrepareError::MissingTools {
        commands: missing.iter().map(|t| t.command).collect(),
        packages,
    })
}

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let p = dir.join(command);
            p.metadata().is_ok_and(|m| m.is_file())
        })
    })
}

/// Prepares (or finds ready) the kernel side in `cache`, calling `step` with
/// each step that runs.
pub fn prepare(cache: &Path, mut step: impl FnMut(&str)) -> Result<Kernel, PrepareError> {
    missing_tools()?;
    std::fs::create_dir_all(cache).map_err(|source| PrepareError::Io {
        what: format!("creating {}", cache.display()),
        source,
    })?;
    let io = |what: &str| {
        let what = what.to_string();
        move |source| PrepareError::Io { what, source }
    };
    let script = cache.join("prepare.sh");
    let init = cache.join("init.sh");
    std::fs::write(&script, PREPARE_SH).map_err(io("writing prepare.sh"))?;
    std::fs::write(&init, INIT_SH).map_err(io("writing init.sh"))?;
    let kernel = || Kernel {
        cache: cache.to_path_buf(),
        vmlinuz: cache.join("vmlinuz"),
        initrd: cache.join("initrd-base.cpio"),
        module_sha256: String::new(),
    };
    // A ready cache whose init matches is used as it is, without root.
    let stamp = cache.join("stamps/initramfs");
    let init_current =
        std::fs::read(cache.join("initrd/init")).is_ok_and(|b| b == INIT_SH.as_bytes());
    if !(stamp.exists() && init_current) {
        if !is_root() {
            return Err(PrepareError::NotRoot);
        }
        if !init_current {
            // The init script changed: only the initramfs is rebuilt.
            let _ = std::fs::remove_file(&stamp);
        }
        run_script(cache, &script, &init, &mut step)?;
    }
    let mut k = kernel();
    for p in [&k.vmlinuz, &k.initrd] {
        if !p.exists() {
            return Err(PrepareError::Incomplete(p.clone()));
        }
    }
    k.module_sha256 = std::fs::read_to_string(cache.join("module.sha256"))
        .map_err(io("reading module.sha256"))?
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    Ok(k)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn run_script(
    cache: &Path,
    script: &Path,
    init: &Path,
    step: &mut impl FnMut(&str),
) -> Result<(), PrepareError> {
    let mut child = Command::new("bash")
        .arg(script)
        .env("CACHE", cache)
        .env("KVER", KERNEL_RELEASE)
        .env("SRCVER", SOURCE_VERSION)
        .env("MIRROR", MIRROR)
        .env("INIT", init)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| PrepareError::Io {
            what: "starting prepare.sh".into(),
            source,
        })?;
    // stderr is collected on a thread so neither pipe can fill and block.
    let stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            lines.push(line);
        }
        lines
    });
    let mut current = String::from("start");
    let mut tail: Vec<String> = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        if let Some(s) = line.strip_prefix("@@STEP ") {
            current = s.to_string();
            step(s);
        }
        tail.push(line);
        if tail.len() > 20 {
            tail.remove(0);
        }
    }
    let status = child.wait().map_err(|source| PrepareError::Io {
        what: "waiting for prepare.sh".into(),
        source,
    })?;
    let err_lines = errors.join().unwrap_or_default();
    if !status.success() {
        tail.extend(err_lines.iter().rev().take(20).rev().cloned());
        return Err(PrepareError::Failed {
            step: current,
            code: status.code(),
            tail: tail.join("\n"),
        });
    }
    Ok(())
}
