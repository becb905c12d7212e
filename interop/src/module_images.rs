//! What the module-image cases ([`crate::module_writes`], [`crate::module_gc`])
//! share: the step language of their workloads, the host half that runs
//! steps through the module beside a byte-array model and replays the
//! deactivated image, the guest's reads, the judging of what the kernel
//! read, and the boot and comparison plumbing. Each case keeps only its
//! workloads, its variants and its own checks.

use crate::cases::{io, strict, CaseError, Comparison, StrictSide};
use crate::prepare::Kernel;
use crate::qemu::{self, BootImage, KernelVerdict};
use pcache::backing::{VecBacking, VolatileBacking};
use pcache::cache_gc::Gc;
use pcache::cache_req::IoError;
use pcache::cache_writeback::Writeback;
use pcache::pmem::SparsePmem;
use pcache::{activate, deactivate, start, ActivationReport, Cache, Mode, NoHooks, Options};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const SECTOR: u64 = 512;
/// Every image starts as a blank device of this size.
pub(crate) const DEVICE: u64 = 512 * MIB;

/// One request of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `sectors` sectors at sector `lba` of write `id`'s pattern
    /// (`workload::pattern`: each sector names its write and its own LBA).
    Write {
        id: u32,
        lba: u64,
        sectors: u64,
        fua: bool,
    },
    Flush,
    /// A flush, then the kernel's workers until neither moves (`Cache::idle`).
    Idle,
    /// Deactivate and start again.
    Reopen,
}

/// A workload being built: writes are numbered in order.
#[derive(Default)]
pub(crate) struct Steps {
    pub steps: Vec<Step>,
    ids: u32,
}

impl Steps {
    pub fn write(&mut self, off: u64, len: u64, fua: bool) {
        self.ids += 1;
        self.steps.push(Step::Write {
            id: self.ids,
            lba: off / SECTOR,
            sectors: len / SECTOR,
            fua,
        });
    }
}

/// Why the host half failed (a bug in the module or in the model, found
/// before any boot).
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("the module refused the image at its {stage}: {message}")]
    Refused {
        stage: &'static str,
        message: String,
    },
    #[error("step {step} ({what}) failed: {error}")]
    Io {
        step: usize,
        what: String,
        error: IoError,
    },
    #[error("our own read-back differs from the model: {0}")]
    ReadBack(String),
}

/// What the host half leaves; `F` is what the case learnt from strict
/// mode's replay of the image.
#[derive(Clone, Debug)]
pub struct Written<F> {
    /// The image after the deactivation.
    pub image: SparsePmem,
    /// The backing disk as our writeback left it (durable content).
    pub disk: Vec<u8>,
    /// The logical content the workload leaves (the model).
    pub expected: Vec<u8>,
    /// Strict mode's activation of the image: the kernel's rules.
    pub strict_report: ActivationReport,
    /// `dmsetup status` fields as strict mode's replay of the image gives them.
    pub strict_status: String,
    /// The same from a replay in the mode that wrote the image.
    pub own_status: String,
    /// Keys in the open key-set when the workload ended (closed by deactivate).
    pub open_at_deactivate: usize,
    pub facts: F,
}

/// What the run itself saw, beside the image.
#[derive(Clone, Debug, Default)]
pub(crate) struct Trace {
    /// Segments invalidated during the run.
    pub invalidated: u64,
    /// The log segments key_head went through, in order.
    pub log_segments: Vec<u32>,
    pub open_at_deactivate: usize,
}

/// Where a host half starts.
pub(crate) struct Start {
    /// A blank device, or an image with a log.
    pub base: SparsePmem,
    /// The backing disk.
    pub disk: VolatileBacking,
    /// The logical content before the workload.
    pub initial: Vec<u8>,
    /// A gc_percent message after the first start, if any.
    pub gc_percent: Option<u32>,
}

/// Runs `steps` through the module from `from`, deactivates, lets `inspect`
/// read strict mode's replay of the image, and checks that our own replay
/// (in the mode that wrote it) reads back the model over our disk. After
/// every idle period the disk must hold the model already (everything was
/// flushed and written back).
pub(crate) fn run_steps<F>(
    from: Start,
    mode: Mode,
    data_crc: bool,
    steps: &[Step],
    inspect: impl FnOnce(&SparsePmem, &Cache, &Trace) -> F,
) -> Result<Written<F>, HostError> {
    let opts = Options { mode, data_crc };
    let refused = |stage, a: &pcache::Activation| HostError::Refused {
        stage,
        message: a.report.message.clone().unwrap_or_default(),
    };
    let Start {
        base: mut pmem,
        mut disk,
        initial: mut expected,
        gc_percent,
    } = from;
    let a = start(&mut pmem, &opts, &mut NoHooks);
    let mut cache = a.cache.clone().ok_or_else(|| refused("first start", &a))?;
    if let Some(gc_percent) = gc_percent {
        cache
            .set_gc_percent(&mut pmem, &mut NoHooks, gc_percent)
            .map_err(|e| HostError::Refused {
                stage: "gc_percent message",
                message: e.to_string(),
            })?;
    }
    let mut trace = Trace {
        log_segments: vec![cache.key_head().cache_seg_id],
        ..Trace::default()
    };
    let mut data = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let fail = |what: String| {
            move |error| HostError::Io {
                step: i,
                what,
                error,
            }
        };
        match *step {
            Step::Write {
                id,
                lba,
                sectors,
                fua,
            } => {
                let off = lba * SECTOR;
                data.resize((sectors * SECTOR) as usize, 0);
                workload::fill(id, off, &mut data);
                cache
                    .write(&mut pmem, &disk, &mut NoHooks, off, &data, fua)
                    .map_err(fail(format!(
                        "write {id}: {sectors} sectors at sector {lba}"
                    )))?;
                expected[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            Step::Flush => cache
                .flush(&mut pmem, &mut NoHooks)
                .map_err(fail("flush".into()))?,
            Step::Idle => {
                cache
                    .flush(&mut pmem, &mut NoHooks)
                    .map_err(fail("flush".into()))?;
                let idle = cache
                    .idle(&mut pmem, &mut disk, &mut NoHooks)
                    .map_err(fail("idle".into()))?;
                if idle.writeback != Some(Writeback::Clean)
                    || matches!(idle.gc, Some(Gc::Stopped { .. }))
                {
                    return Err(HostError::ReadBack(format!(
                        "step {i}: an idle period ended with writeback {:?}, GC {:?}",
                        idle.writeback, idle.gc
                    )));
                }
                if disk.durable() != &expected[..] {
                    let d =
                        first_sector_difference(disk.durable(), &expected).expect("they differ");
                    return Err(HostError::ReadBack(format!(
                        "step {i}: after an idle period the disk is not the model: {}",
                        d.describe("the disk", "the model")
                    )));
                }
            }
            Step::Reopen => {
                trace.invalidated += cache.invalidations();
                deactivate(cache, &mut pmem, &mut disk, &mut NoHooks)
                    .map_err(fail("deactivate".into()))?;
                let a = start(&mut pmem, &opts, &mut NoHooks);
                cache = a.cache.clone().ok_or_else(|| refused("reopen", &a))?;
            }
        }
        let head = cache.key_head().cache_seg_id;
        if trace.log_segments.last() != Some(&head) {
            trace.log_segments.push(head);
        }
    }
    trace.invalidated += cache.invalidations();
    trace.open_at_deactivate = cache.open_keys().len();
    deactivate(cache, &mut pmem, &mut disk, &mut NoHooks).map_err(|error| HostError::Io {
        step: steps.len(),
        what: "deactivate".into(),
        error,
    })?;

    // Our replays, on copies: the image the kernel gets is the deactivated one.
    let replay = |mode| {
        let mut copy = pmem.clone();
        let a = start(&mut copy, &Options { mode, data_crc }, &mut NoHooks);
        (copy, a)
    };
    let (_, strict) = replay(Mode::Strict);
    let sc = strict
        .cache
        .as_ref()
        .ok_or_else(|| refused("strict replay", &strict))?;
    let facts = inspect(&pmem, sc, &trace);
    let (mut copy, own) = replay(mode);
    let mut own_cache = own.cache.clone().ok_or_else(|| refused("replay", &own))?;
    let mut got = vec![0u8; expected.len()];
    own_cache
        .read(
            &mut copy,
            &mut VecBacking::from_vec(disk.durable().to_vec()),
            &mut NoHooks,
            0,
            &mut got,
        )
        .map_err(|e| HostError::ReadBack(format!("the read failed: {e}")))?;
    if let Some(d) = first_sector_difference(&got, &expected) {
        return Err(HostError::ReadBack(d.describe("ours", "the model")));
    }
    Ok(Written {
        image: pmem,
        disk: disk.durable().to_vec(),
        expected,
        strict_status: strict.report.status.clone().unwrap_or_default(),
        strict_report: strict.report.clone(),
        own_status: own.report.status.clone().unwrap_or_default(),
        open_at_deactivate: trace.open_at_deactivate,
        facts,
    })
}

/// The first sector where two equally long contents differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectorDifference {
    pub sector: u64,
    pub a: String,
    pub b: String,
}

impl SectorDifference {
    pub(crate) fn describe(&self, a: &str, b: &str) -> String {
        format!(
            "first differing sector {} (byte {:#x}): {a} {}, {b} {}",
            self.sector,
            self.sector * SECTOR,
            self.a,
            self.b
        )
    }
}

pub fn first_sector_difference(a: &[u8], b: &[u8]) -> Option<SectorDifference> {
    let i = a
        .chunks(SECTOR as usize)
        .zip(b.chunks(SECTOR as usize))
        .position(|(x, y)| x != y)?;
    let at = i * SECTOR as usize;
    let end = (at + SECTOR as usize).min(a.len()).min(b.len());
    Some(SectorDifference {
        sector: i as u64,
        a: describe_sector(i as u64, &a[at..end]),
        b: describe_sector(i as u64, &b[at..end]),
    })
}

/// A sector in words: a uniform fill (the fixture's letters, zeros), a
/// pattern sector's write and LBA, or its first bytes.
fn describe_sector(lba: u64, s: &[u8]) -> String {
    if s.iter().all(|&b| b == s[0]) {
        return format!("{} × {:#04x}", s.len(), s[0]);
    }
    if let Ok(full) = <&[u8; 512]>::try_from(s) {
        match workload::classify(lba, full) {
            workload::Tag::Write(id) => return format!("write {id}'s sector {lba}"),
            workload::Tag::Backing => return format!("pattern id 0 at sector {lba}"),
            workload::Tag::Garbage => {}
        }
        if full[..8] == workload::pattern::MAGIC {
            let id = u32::from_le_bytes(full[8..12].try_into().expect("4 bytes"));
            let at = u64::from_le_bytes(full[16..24].try_into().expect("8 bytes"));
            return format!(
                "a pattern sector naming write {id} and sector {at} (torn or misplaced)"
            );
        }
    }
    let head: Vec<String> = s.iter().take(32).map(|b| format!("{b:02x}")).collect();
    format!("bytes {}…", head.join(""))
}

/// sha256 of `data` (coreutils' `sha256sum`, as the guest's busybox).
pub(crate) fn sha256(data: &[u8]) -> Result<String, CaseError> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(io("running sha256sum"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(data)
        .map_err(io("writing to sha256sum"))?;
    let out = child.wait_with_output().map_err(io("sha256sum"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| CaseError::Setup("sha256sum printed nothing".into()))
}

pub(crate) fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Strict => "strict",
        Mode::Recover => "recover",
    }
}

/// The guest's part every case starts with: the status before anything is
/// read (a read fills misses and so moves key_head, and the kernel's workers
/// may already have moved the tails), the sha256 of a full read, then a
/// second read dumped to the output disk; `then` follows.
pub(crate) fn guest_reads(span: u64, then: &str) -> String {
    let mib = span / MIB;
    format!(
        r#"set -e
echo "@@OUT $NAME status $(dmsetup status pc)"
echo "@@OUT $NAME sha256 $(dd if=$DM bs=1M count={mib} 2>/dev/null | sha256sum)"
dd if=$DM of=$OUT bs=1M count={mib} conv=fsync 2>/dev/null{then}"#
    )
}

/// The differences found in what the kernel did with one image, as
/// sentences, built up by the checks both cases make.
pub(crate) struct Judged<'a> {
    kernel: &'a KernelVerdict,
    pub diffs: Vec<String>,
}

impl<'a> Judged<'a> {
    /// A refusal is the only finding (`Err`); else whether the guest's
    /// workload finished is the first.
    pub fn new(kernel: &'a KernelVerdict) -> Result<Self, Vec<String>> {
        if !kernel.activated {
            return Err(vec![format!(
                "the kernel refused the image: {}",
                kernel.error.as_deref().unwrap_or("(no message)")
            )]);
        }
        let mut diffs = Vec::new();
        if kernel.workload_ok != Some(true) {
            diffs.push("the guest's reads did not finish (workload rc ≠ 0)".into());
        }
        Ok(Judged { kernel, diffs })
    }

    /// The guest's `@@OUT $NAME <key> <rest>` line's rest.
    pub fn output(&self, key: &str) -> Option<&'a str> {
        self.kernel
            .outputs
            .iter()
            .find_map(|o| o.strip_prefix(key)?.strip_prefix(' '))
    }

    /// The two reads of [`guest_reads`]: the first's sha256, the second's
    /// bytes, against the model.
    pub fn reads(&mut self, expected_sha: &str, dump: &[u8], expected: &[u8]) {
        match self
            .output("sha256")
            .and_then(|s| s.split_whitespace().next())
        {
            Some(sha) if sha == expected_sha => {}
            Some(sha) => self.diffs.push(format!(
                "sha256 of the kernel's first read {sha}, of the model {expected_sha}"
            )),
            None => self.diffs.push("no sha256 from the guest".into()),
        }
        if let Some(d) = first_sector_difference(dump, expected) {
            self.diffs.push(format!(
                "content (the kernel's second read): {}",
                d.describe("the kernel read", "the model holds")
            ));
        }
    }

    /// The backing disk once the kernel's writeback reached `dirty_tail`,
    /// past every key we wrote: it must hold the model.
    pub fn written_back(&mut self, dirty_tail: (u32, u32), backing: &[u8], expected: &[u8]) {
        if let Some(d) = first_sector_difference(backing, expected) {
            self.diffs.push(format!(
                "backing disk after the kernel's writeback (dirty_tail {}:{}): {}",
                dirty_tail.0,
                dirty_tail.1,
                d.describe("the disk holds", "the model holds")
            ));
        }
    }
}

/// `<name><what>.img` in `dir`: every file ends in .img, so `--keep`
/// decides for all of them.
pub(crate) fn image_file(dir: &Path, name: &str, what: &str) -> PathBuf {
    dir.join(format!("{name}{what}.img"))
}

/// Creates `path` as a sparse file of `len` bytes.
pub(crate) fn sized_file(path: &Path, len: u64) -> Result<(), CaseError> {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(len))
        .map_err(io(format!("creating {}", path.display())))
}

/// Reads a boot disk back.
pub(crate) fn read_disk(p: &Option<PathBuf>) -> Result<Vec<u8>, CaseError> {
    let p = p.as_ref().expect("set above");
    std::fs::read(p).map_err(io(format!("reading {}", p.display())))
}

/// One boot for `images`, each with its own backing disk.
pub(crate) fn boot(
    kernel: &Kernel,
    images: &[BootImage],
    dir: &Path,
    timeout: Duration,
) -> Result<qemu::Boot, CaseError> {
    // Every image brings its own backing disk; the boot's shared one is idle.
    let shared = dir.join("shared.disk");
    std::fs::File::create(&shared)
        .and_then(|f| f.set_len(MIB))
        .map_err(io("creating the shared disk"))?;
    let boot = qemu::boot(kernel, images, &shared, dir, timeout)?;
    let _ = std::fs::remove_file(&shared);
    Ok(boot)
}

/// A host half that failed is a disagreement too (our own read-back
/// differs from the model): the kernel is not asked, strict mode's side is
/// its activation of `base`.
pub(crate) fn host_failed(
    name: &str,
    about: String,
    base: &SparsePmem,
    data_crc: bool,
    e: &HostError,
) -> Comparison {
    Comparison {
        image: name.to_string(),
        about,
        strict: StrictSide::of(&activate(
            &mut base.clone(),
            &strict(data_crc),
            &mut NoHooks,
        )),
        kernel: Default::default(),
        first_difference: Some(format!("host half: {e}")),
        agree: false,
    }
}

/// The comparison for an image the kernel was asked about; `own` names the
/// mode whose replay gave `own_status`.
pub(crate) fn compared<F>(
    name: &str,
    about: &str,
    own: &str,
    w: &Written<F>,
    expected_sha: &str,
    verdict: KernelVerdict,
    diffs: Vec<String>,
) -> Comparison {
    Comparison {
        image: name.to_string(),
        about: format!(
            "{about}; our replay's status `{}` (strict), `{}` ({own}'s own); model sha256 {expected_sha}",
            w.strict_status, w.own_status
        ),
        strict: StrictSide::of(&w.strict_report),
        agree: verdict.done && diffs.is_empty(),
        kernel: verdict,
        first_difference: (!diffs.is_empty()).then(|| diffs.join("; ")),
    }
}
