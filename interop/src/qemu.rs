//! One QEMU boot of Linux 7.2.13 activating a batch of images with its own
//! dm-pcache, and what its console says about each.
//!
//! Each image sits on its own virtio-pmem device at a fixed PCI slot
//! (`0x10 + i`), so the guest finds it by its slot, not by probe order. The
//! guest creates the target on it (`dmsetup create`), reads `dmsetup status`
//! and removes it (deactivation writes nothing), then the next image. QEMU
//! maps the files shared, so what the kernel wrote is in them after the boot.
//! Callers pass copies: a boot writes its images.
//!
//! The backing device is the boot's shared disk unless an image brings its
//! own (a cache holding dirty data needs the backing device its data belongs
//! to, and the kernel's writeback writes it); an image may also bring an
//! output disk its workload writes (`$OUT`), for results too big for the
//! console. Both are virtio-blk devices at fixed slots too.

use crate::prepare::Kernel;
use serde::Serialize;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Images per boot (QEMU memory-device slots; each image is address space, not RAM).
pub const MAX_IMAGES: usize = 8;
/// First PCI slot of the virtio-pmem devices.
const FIRST_SLOT: usize = 0x10;
/// First PCI slot of the images' own backing disks.
const FIRST_BACKING_SLOT: usize = 0x18;
/// First PCI slot of the images' output disks.
const FIRST_OUT_SLOT: usize = 0x08;

/// One image to activate.
#[derive(Clone, Debug)]
pub struct BootImage {
    /// Its name in the console markers (no spaces).
    pub name: String,
    /// The file QEMU maps (written by the boot).
    pub path: PathBuf,
    /// The target's `data_crc` option.
    pub data_crc: bool,
    /// Shell commands run on the active target (its block device is `$DM`,
    /// the image's name `$NAME`, its output disk `$OUT`) before its status is
    /// read: a workload that makes the kernel write its log. Lines it prints
    /// as `@@OUT $NAME text` are the verdict's `outputs`.
    pub workload: Option<String>,
    /// The image's own backing disk (else the boot's shared one); the
    /// target's length is its size.
    pub backing: Option<PathBuf>,
    /// A disk the workload may write, as `$OUT`.
    pub out: Option<PathBuf>,
}

/// `dmsetup status` of the target (the format document's device-mapper section).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DmStatus {
    pub sb_flags: u32,
    pub seg_num: u32,
    pub n_segs: u32,
    pub segs_used: u32,
    pub gc_percent: u32,
    pub cache_info_flags: u32,
    pub key_head: (u32, u32),
    pub dirty_tail: (u32, u32),
    pub key_tail: (u32, u32),
}

impl DmStatus {
    /// The status fields as pcache's report writes them (`ActivationReport::status`).
    pub fn line(&self) -> String {
        format!(
            "{:x} {} {} {} {} {:x} {}:{} {}:{} {}:{}",
            self.sb_flags,
            self.seg_num,
            self.n_segs,
            self.segs_used,
            self.gc_percent,
            self.cache_info_flags,
            self.key_head.0,
            self.key_head.1,
            self.dirty_tail.0,
            self.dirty_tail.1,
            self.key_tail.0,
            self.key_tail.1
        )
    }

    /// Parses `0 <len> pcache <sb_flags %x> <seg_num> <n_segs> <segs_used>
    /// <gc_percent> <cache_info_flags %x> <kh> <dt> <kt>` (positions `c:o`).
    pub fn parse(line: &str) -> Option<DmStatus> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let rest = match f.as_slice() {
            [_, _, "pcache", rest @ ..] if rest.len() == 9 => rest,
            _ => return None,
        };
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let dec = |s: &str| s.parse::<u32>().ok();
        let pos = |s: &str| {
            let (c, o) = s.split_once(':')?;
            Some((dec(c)?, dec(o)?))
        };
        Some(DmStatus {
            sb_flags: hex(rest[0])?,
            seg_num: dec(rest[1])?,
            n_segs: dec(rest[2])?,
            segs_used: dec(rest[3])?,
            gc_percent: dec(rest[4])?,
            cache_info_flags: hex(rest[5])?,
            key_head: pos(rest[6])?,
            dirty_tail: pos(rest[7])?,
            key_tail: pos(rest[8])?,
        })
    }
}

/// What the kernel did with one image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelVerdict {
    /// `dmsetup create` succeeded.
    pub activated: bool,
    /// `dmsetup status` while it was active.
    pub status: Option<DmStatus>,
    /// dmsetup's own error text, when refused.
    pub error: Option<String>,
    /// The kernel's messages about it (dm-pcache and device-mapper lines).
    pub messages: Vec<String>,
    /// The guest saw the image through to the end of its script.
    pub done: bool,
    /// Whether the image's workload (if any) ended with status 0.
    pub workload_ok: Option<bool>,
    /// What the workload printed as `@@OUT`, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
}

/// Why a boot did not give verdicts.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{0} images in one boot (at most {MAX_IMAGES})")]
    TooMany(usize),
    #[error("image name `{0}` has characters the console markers cannot carry")]
    BadName(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("the boot did not finish within {seconds} s; console tail:\n{tail}")]
    Timeout { seconds: u64, tail: String },
    #[error(
        "the guest did not reach its script (modules or devices missing); console tail:\n{tail}"
    )]
    NoBoot { tail: String },
    /// A device the script needs never appeared in the guest (a harness
    /// fault, not something the kernel's dm-pcache decided).
    #[error("image `{image}`: {what} (the guest never saw the device; a harness error)")]
    NoDevice { image: String, what: String },
    /// The trace plugin or its markers failed (a harness error).
    #[error("tracing failed: {0}")]
    Trace(String),
}

/// A finished boot.
#[derive(Debug)]
pub struct Boot {
    /// The whole serial console.
    pub console: String,
    /// One verdict per image, in the order given.
    pub verdicts: Vec<KernelVerdict>,
    pub seconds: f64,
}

/// The guest script activating each image in turn (each traced, with
/// `traced`: see [`boot_traced`]).
fn script(images: &[BootImage], traced: bool) -> String {
    let mut s = String::from(
        r#"# The block device (pmem* or vd*) at PCI slot $2.
at_slot() {
  for b in /sys/block/$1*; do
    case "$(readlink -f $b/device)" in *"0000:00:$2.0/"*) basename $b;; esac
  done
}
# Like at_slot, but waits up to 10 s: under TCG a disk may not be probed
# yet when the script starts. Nothing found: a harness error, not a verdict.
need_slot() {
  i=0
  while [ $i -lt 50 ]; do
    d=$(at_slot $1 $2)
    if [ -n "$d" ]; then echo "$d"; return 0; fi
    sleep 0.2; i=$((i + 1))
  done
  return 1
}
# Markers for the trace plugin (qemu-trace): a 40-byte record, padded to a
# sector, written with O_DIRECT to the marker device (`mark KIND DEV ARG ARG2`).
le() { v=$2; i=0; while [ $i -lt $1 ]; do printf "\\$(printf %03o $((v & 255)))"; v=$((v >> 8)); i=$((i + 1)); done; }
MSEQ=0
mark() {
  MSEQ=$((MSEQ + 1))
  { printf PCTMARK1; le 4 $1; le 4 $2; le 8 $3; le 8 $4; le 8 $MSEQ; head -c 472 /dev/zero; } > /tmp/mark
  dd if=/tmp/mark of=/dev/$MARKDEV bs=512 count=1 oflag=direct 2>/dev/null || echo "@@MARK-FAILED $1 $2"
}
# cal TRACE_INDEX DEV PMEM_SLOT: sector 0 rewritten with its own content
# between two markers (the plugin learns the device's address from it), and
# the device's virtio BAR 4 (its notify area: flush requests).
cal() {
  bar=$(sed -n 5p /sys/bus/pci/devices/0000:00:$3.0/resource | cut -d' ' -f1)
  mark 1 $1 0 $((bar))
  dd if=/dev/$2 of=/tmp/cal bs=512 count=1 2>/dev/null
  dd if=/tmp/cal of=/dev/$2 bs=512 count=1 oflag=direct 2>/dev/null || echo "@@CAL-FAILED $1"
  mark 2 $1 0 0
}
# act PMEM_SLOT NAME DATA_CRC BACKING_SLOT OUT_SLOT [TRACE_INDEX] (slots: - for none)
act() {
  if ! dev=$(need_slot pmem $1); then echo "@@NODEV $2 no pmem disk at slot $1"; echo "@@DONE $2"; return; fi
  back=vda
  if [ "$4" != - ] && ! back=$(need_slot vd $4); then echo "@@NODEV $2 no backing disk at slot $4"; echo "@@DONE $2"; return; fi
  OUT=""
  if [ "$5" != - ]; then
    if ! OUT=$(need_slot vd $5); then echo "@@NODEV $2 no output disk at slot $5"; echo "@@DONE $2"; return; fi
    OUT=/dev/$OUT
  fi
  NAME=$2
  T=${6:-}
  S=$(blockdev --getsz /dev/$back)
  echo "@@IMAGE $2 $dev $back"
  [ -z "$T" ] || { cal $T $dev $1; mark 3 $T 0 0; }
  dmesg -c > /dev/null
  if dmsetup create pc --table "0 $S pcache /dev/$dev /dev/$back 4 cache_mode writeback data_crc $3" 2>/tmp/err; then
    [ -z "$T" ] || mark 5 $T 1 0
    echo "@@ACTIVATED $2"
    # The target's block device (devtmpfs names it; no udev for /dev/mapper).
    DM=/dev/$(cd /sys/block && ls -d dm-* | head -n 1)
    if [ -f "/tmp/work-$2.sh" ]; then
      if [ -b "$DM" ]; then (. "/tmp/work-$2.sh"); echo "@@WORKLOAD $2 rc=$?"; else echo "@@WORKLOAD $2 rc=no-device"; fi
    fi
    [ -z "$T" ] || mark 4 $T 0 0
    echo "@@STATUS $2 $(dmsetup status pc)"
    dmsetup remove pc 2>/tmp/err || echo "@@REMOVE-FAILED $2 $(tr '\n' ' ' < /tmp/err)"
  else
    [ -z "$T" ] || mark 4 $T 0 0
    echo "@@REFUSED $2 $(tr '\n' ' ' < /tmp/err)"
  fi
  dmesg | grep -i -e pcache -e device-mapper | while read -r l; do echo "@@KMSG $2 $l"; done
  echo "@@DONE $2"
}
"#,
    );
    if traced {
        s.push_str(&format!(
            "MARKDEV=$(need_slot pmem {MARKER_SLOT:02x}) || echo \"@@NODEV marker no marker device at slot {MARKER_SLOT:02x}\"\n"
        ));
    }
    for (i, img) in images.iter().enumerate() {
        if let Some(w) = &img.workload {
            s.push_str(&format!(
                "cat > /tmp/work-{} <<'WORKLOAD'\n{w}\nWORKLOAD\n",
                img.name
            ));
            s.push_str(&format!("mv /tmp/work-{0} /tmp/work-{0}.sh\n", img.name));
        }
        let slot = |own: &Option<PathBuf>, first: usize| match own {
            Some(_) => format!("{:02x}", first + i),
            None => "-".into(),
        };
        s.push_str(&format!(
            "act {:02x} {} {} {} {}{}\n",
            FIRST_SLOT + i,
            img.name,
            img.data_crc,
            slot(&img.backing, FIRST_BACKING_SLOT),
            slot(&img.out, FIRST_OUT_SLOT),
            if traced {
                format!(" {i}")
            } else {
                String::new()
            }
        ));
    }
    s
}

/// A blank 64 MiB backing disk (sparse) in `dir`, for boots whose cases
/// never read the backing device.
pub fn blank_backing_disk(dir: &Path) -> std::io::Result<PathBuf> {
    let disk = dir.join("backing.disk");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;
    Ok(disk)
}

/// Boots the kernel once over `images` (each on its own virtio-pmem device)
/// and `disk` (the backing device), within `timeout`.
pub fn boot(
    kernel: &Kernel,
    images: &[BootImage],
    disk: &Path,
    work: &Path,
    timeout: Duration,
) -> Result<Boot, BootError> {
    boot_with(kernel, images, disk, work, timeout, None)
}

/// Like [`boot`], with the trace plugin (`qemu-trace`, the built shared
/// object at `plugin`) recording each image's activation and workload:
/// image `i`'s trace is `work/trace/trace-{i}.bin` (the VMM's trace form)
/// with its counts in `trace-{i}.json`. Each image is first calibrated (its
/// sector 0 rewritten with its own content: the image does not change).
pub fn boot_traced(
    kernel: &Kernel,
    images: &[BootImage],
    disk: &Path,
    work: &Path,
    timeout: Duration,
    plugin: &Path,
) -> Result<Boot, BootError> {
    boot_with(kernel, images, disk, work, timeout, Some(plugin))
}

/// PCI slot of the trace plugin's marker device.
const MARKER_SLOT: usize = 0x07;
/// Size of the marker device's file.
const MARKER_SIZE: u64 = 4 << 20;
/// The guest's RAM (`-m`); QEMU 7.2's plugin addresses below it are main RAM.
const GUEST_RAM: u64 = 2 << 30;

fn boot_with(
    kernel: &Kernel,
    images: &[BootImage],
    disk: &Path,
    work: &Path,
    timeout: Duration,
    plugin: Option<&Path>,
) -> Result<Boot, BootError> {
    if images.len() > MAX_IMAGES {
        return Err(BootError::TooMany(images.len()));
    }
    if let Some(bad) = images
        .iter()
        .find(|i| i.name.is_empty() || !i.name.chars().all(|c| c.is_ascii_graphic()))
    {
        return Err(BootError::BadName(bad.name.clone()));
    }
    let io = |what: String| move |source| BootError::Io { what, source };
    let initrd = write_initrd(kernel, &script(images, plugin.is_some()), work)?;
    let mut cmd = Command::new("qemu-system-x86_64");
    if plugin.is_some() {
        // The guest's RAM as the first memory object, so it is the first
        // block of QEMU's RAM address space: QEMU 7.2's plugin addresses of
        // RAM are that space's (plus the region's place in its container),
        // so main RAM is [0, GUEST_RAM) and every pmem device lies above it.
        cmd.args([
            "-object",
            &format!("memory-backend-ram,id=mainram,size={GUEST_RAM}"),
        ])
        .args(["-M", "pc,memory-backend=mainram"]);
    } else {
        cmd.args(["-M", "pc"]);
    }
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
        .args([
            "-m",
            &format!("{}G,slots={},maxmem=40G", GUEST_RAM >> 30, MAX_IMAGES + 1),
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args(["-nographic", "-no-reboot", "-net", "none"]);
    for (i, img) in images.iter().enumerate() {
        let size = std::fs::metadata(&img.path)
            .map_err(io(format!("reading {}", img.path.display())))?
            .len();
        cmd.arg("-object").arg(format!(
            "memory-backend-file,id=pm{i},share=on,mem-path={},size={size}",
            img.path.display()
        ));
        cmd.arg("-device").arg(format!(
            "virtio-pmem-pci,memdev=pm{i},addr={:#x}",
            FIRST_SLOT + i
        ));
        for (disk, id, first) in [
            (&img.backing, "bd", FIRST_BACKING_SLOT),
            (&img.out, "od", FIRST_OUT_SLOT),
        ] {
            if let Some(path) = disk {
                cmd.arg("-drive").arg(format!(
                    "file={},format=raw,if=none,id={id}{i}",
                    path.display()
                ));
                cmd.arg("-device").arg(format!(
                    "virtio-blk-pci,drive={id}{i},addr={:#x}",
                    first + i
                ));
            }
        }
    }
    cmd.arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()));
    if let Some(plugin) = plugin {
        let marker = work.join("marker.pmem");
        std::fs::File::create(&marker)
            .and_then(|f| f.set_len(MARKER_SIZE))
            .map_err(io(format!("creating {}", marker.display())))?;
        let out = work.join("trace");
        cmd.arg("-object").arg(format!(
            "memory-backend-file,id=mk,share=on,mem-path={},size={MARKER_SIZE}",
            marker.display()
        ));
        cmd.arg("-device")
            .arg(format!("virtio-pmem-pci,memdev=mk,addr={MARKER_SLOT:#x}"));
        let mut arg = format!(
            "{},out={},ram={GUEST_RAM},marker={}",
            plugin.display(),
            out.display(),
            marker.display()
        );
        for (i, img) in images.iter().enumerate() {
            arg.push_str(&format!(",pmem{i}={}", img.path.display()));
        }
        cmd.arg("-plugin").arg(arg);
    }
    let console_path = work.join("console.log");
    let console_file = std::fs::File::create(&console_path)
        .map_err(io(format!("creating {}", console_path.display())))?;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(console_file.try_clone().map_err(io("console".into()))?)
        .stderr(console_file)
        .spawn()
        .map_err(io("starting qemu-system-x86_64".into()))?;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(io("waiting for QEMU".into()))? {
            break Some(st);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let console = String::from_utf8_lossy(
        &std::fs::read(&console_path).map_err(io(format!("reading {}", console_path.display())))?,
    )
    .into_owned();
    let tail = || {
        console
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    };
    if status.is_none() {
        return Err(BootError::Timeout {
            seconds: timeout.as_secs(),
            tail: tail(),
        });
    }
    if !console.contains("@@BOOTED") {
        return Err(BootError::NoBoot { tail: tail() });
    }
    if let Some((image, what)) = missing_device(&console) {
        return Err(BootError::NoDevice { image, what });
    }
    if plugin.is_some() {
        if let Some(line) = console.lines().find(|l| {
            ["@@QTRACE-ERROR", "@@MARK-FAILED", "@@CAL-FAILED"]
                .iter()
                .any(|m| l.contains(m))
        }) {
            return Err(BootError::Trace(line.trim().to_string()));
        }
    }
    let verdicts = images.iter().map(|i| verdict(&console, &i.name)).collect();
    Ok(Boot {
        verdicts,
        console,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The initramfs of one boot: the prepared base plus a cpio holding the
/// script (the kernel reads concatenated archives in order).
fn write_initrd(kernel: &Kernel, script: &str, work: &Path) -> Result<PathBuf, BootError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| BootError::Io { what, source }
    };
    let stage = work.join("stage");
    std::fs::create_dir_all(&stage).map_err(io("creating the stage folder"))?;
    std::fs::write(stage.join("run.sh"), script).map_err(io("writing run.sh"))?;
    let out = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(&stage)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("piped").write_all(b"run.sh\n")?;
            c.wait_with_output()
        })
        .map_err(io("running cpio"))?;
    if !out.status.success() {
        return Err(BootError::Io {
            what: "cpio".into(),
            source: std::io::Error::other(format!("exit {:?}", out.status.code())),
        });
    }
    let mut initrd = std::fs::read(&kernel.initrd).map_err(io("reading the base initramfs"))?;
    initrd.extend_from_slice(&out.stdout);
    let path = work.join("initrd.cpio");
    std::fs::write(&path, initrd).map_err(io("writing the initramfs"))?;
    Ok(path)
}

/// The verdict on image `name` from the console's markers. Markers may be
/// preceded by terminal escapes on the same line.
pub fn verdict(console: &str, name: &str) -> KernelVerdict {
    let mut v = KernelVerdict::default();
    for line in console.lines() {
        let Some(at) = line.find("@@") else { continue };
        let mut words = line[at + 2..].splitn(3, ' ');
        let (Some(tag), Some(who)) = (words.next(), words.next()) else {
            continue;
        };
        if who != name {
            continue;
        }
        let rest = words.next().unwrap_or("").trim();
        match tag {
            "ACTIVATED" => v.activated = true,
            "STATUS" => v.status = DmStatus::parse(rest),
            "REFUSED" => v.error = Some(rest.to_string()),
            "KMSG" => v.messages.push(strip_timestamp(rest).to_string()),
            "WORKLOAD" => v.workload_ok = Some(rest == "rc=0"),
            "OUT" => v.outputs.push(rest.to_string()),
            "DONE" => v.done = true,
            _ => {}
        }
    }
    v
}

/// The first `@@NODEV image what` line of the console, if any.
fn missing_device(console: &str) -> Option<(String, String)> {
    console.lines().find_map(|line| {
        let at = line.find("@@NODEV ")?;
        let (image, what) = line[at + 8..].split_once(' ')?;
        Some((image.to_string(), what.trim().to_string()))
    })
}

/// `[    5.546612] text` → `text`.
fn strip_timestamp(line: &str) -> &str {
    match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
        Some((_, text)) => text,
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse_as_the_kernel_prints_them() {
        let s = DmStatus::parse("0 131072 pcache 0 31 31 1 70 1182 0:0 0:0 0:0").unwrap();
        assert_eq!(s.seg_num, 31);
        assert_eq!(s.segs_used, 1);
        assert_eq!(s.gc_percent, 70);
        assert_eq!(s.cache_info_flags, 0x1182);
        assert_eq!(s.key_head, (0, 0));
        assert_eq!(s.line(), "0 31 31 1 70 1182 0:0 0:0 0:0");
        let t = DmStatus::parse("0 8 pcache 1 63 63 4 70 1183 2:5144 1:24 0:10288").unwrap();
        assert_eq!(t.line(), "1 63 63 4 70 1183 2:5144 1:24 0:10288");
        assert_eq!((t.sb_flags, t.cache_info_flags), (1, 0x1183));
        assert_eq!(
            (t.key_head, t.dirty_tail, t.key_tail),
            ((2, 5144), (1, 24), (0, 10288))
        );
        for bad in [
            "",
            "0 8 linear 0 31 31 1 70 1182 0:0 0:0 0:0",
            "0 8 pcache 0 31 31 1 70 1182 0:0 0:0",
            "0 8 pcache 0 x 31 1 70 1182 0:0 0:0 0:0",
            "0 8 pcache 0 31 31 1 70 1182 0-0 0:0 0:0",
        ] {
            assert_eq!(DmStatus::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn verdicts_are_read_per_image_from_noisy_consoles() {
        let console = "\x1b[2J@@BOOTED\n@@IMAGE a pmem0\n@@ACTIVATED a\n@@OUT a sha256 0f00\n@@OUT ab x\n@@STATUS a 0 131072 pcache 0 31 31 1 70 1182 0:0 0:0 0:0\n@@KMSG a [    5.5] dm_pcache: loading out-of-tree module taints kernel.\n@@DONE a\n@@IMAGE ab pmem1\n@@REFUSED ab device-mapper: reload ioctl on pc  failed: Invalid argument \n@@KMSG ab [    6.1] dm-pcache: sb_validate:198 253:0 corrupted sb: 1, expected: 2\n@@DONE ab\n@@END\n";
        let a = verdict(console, "a");
        assert!(a.activated && a.done && a.error.is_none());
        assert_eq!(a.status.unwrap().seg_num, 31);
        assert_eq!(a.outputs, ["sha256 0f00"]);
        assert_eq!(
            a.messages,
            ["dm_pcache: loading out-of-tree module taints kernel."]
        );
        let ab = verdict(console, "ab");
        assert!(!ab.activated && ab.done && ab.status.is_none());
        assert_eq!(
            ab.error.as_deref(),
            Some("device-mapper: reload ioctl on pc  failed: Invalid argument")
        );
        assert_eq!(
            ab.messages,
            ["dm-pcache: sb_validate:198 253:0 corrupted sb: 1, expected: 2"]
        );
        let missing = verdict(console, "b");
        assert!(!missing.done && !missing.activated);
        assert_eq!(missing_device(console), None);
        assert_eq!(
            missing_device("@@BOOTED\n\x1b[0m@@NODEV ab no pmem disk at slot 11\n@@DONE ab\n"),
            Some(("ab".into(), "no pmem disk at slot 11".into()))
        );
    }

    #[test]
    fn the_script_names_each_image_by_its_slot() {
        let imgs = [
            BootImage {
                name: "x".into(),
                path: "/a".into(),
                data_crc: false,
                workload: None,
                backing: None,
                out: None,
            },
            BootImage {
                name: "y".into(),
                path: "/b".into(),
                data_crc: true,
                workload: Some("sync".into()),
                backing: Some("/b.disk".into()),
                out: Some("/b.out".into()),
            },
        ];
        let s = script(&imgs, false);
        assert!(
            s.contains("act 10 x false - -\ncat > /tmp/work-y <<'WORKLOAD'\nsync\nWORKLOAD\n"),
            "{s}"
        );
        // The second image's own disks sit at the second backing and output slots.
        assert!(s.ends_with("act 11 y true 19 09\n"), "{s}");
        // Traced, each image names its trace index and the marker device is found first.
        let t = script(&imgs, true);
        assert!(t.contains("MARKDEV=$(need_slot pmem 07)"), "{t}");
        assert!(t.contains("act 10 x false - - 0\n") && t.ends_with("act 11 y true 19 09 1\n"));
        // And both are shell scripts (syntax only: `sh -n`).
        for s in [s, t] {
            let mut sh = Command::new("sh")
                .arg("-n")
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            sh.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
            assert!(sh.wait().unwrap().success(), "{s}");
        }
    }
}
