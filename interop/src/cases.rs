//! The cases: what the kernel is asked and what its answer is compared with.
//!
//! Every comparison is of the whole image the kernel leaves with the image
//! strict mode leaves from the same input, plus the verdict (activated or
//! refused). Identical images mean the kernel did what strict mode predicts,
//! write for write; a refusal on both sides leaves the input untouched.

use crate::image::{first_difference, read_sparse, write_sparse};
use crate::prepare::Kernel;
use crate::qemu::{self, BootImage, KernelVerdict};
use pcache::pmem::{Access, Pmem, RecordingPmem, SparsePmem};
use pcache::{activate, ActivationReport, Mode, NoHooks, Options, Outcome};
use scenarios::generate;
use scenarios::persistence::Model;
use scenarios::spec::{Generator, Run, Scenario};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The case names, in the order they run.
pub const CASES: &[&str] = &[
    "first-activation",
    "kernel-writes",
    "hostile-images",
    "power-cuts",
    "module-writes",
    "module-gc",
    "trace-first-activation",
    "trace-writes",
];

/// Time budget of one boot (TCG boots take 5–12 s; a batch activates up to 8 images).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Why a case could not run (as opposed to a disagreement, which is a result).
#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error(transparent)]
    Boot(#[from] qemu::BootError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CaseError {
    let what = what.into();
    move |source| CaseError::Io { what, source }
}

/// Strict mode's side of one image.
#[derive(Clone, Debug, Serialize)]
pub struct StrictSide {
    pub outcome: Outcome,
    /// The refusal's kind, when refused.
    pub refusal: Option<String>,
    pub message: Option<String>,
    /// The status line of the activated cache.
    pub status: Option<String>,
}

impl StrictSide {
    pub(crate) fn of(r: &ActivationReport) -> Self {
        let kind = serde_json::to_value(&r.refusal)
            .ok()
            .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_string));
        StrictSide {
            outcome: r.outcome,
            refusal: kind,
            message: r.message.clone(),
            status: r.status.clone(),
        }
    }
}

/// One image compared.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub image: String,
    /// What the image is (a scenario state's class, a generator variant).
    pub about: String,
    pub strict: StrictSide,
    pub kernel: KernelVerdict,
    /// The first byte where the kernel's image and strict mode's differ.
    pub first_difference: Option<String>,
    pub agree: bool,
}

/// A case's result.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub name: String,
    pub comparisons: Vec<Comparison>,
    /// Boots and their seconds.
    pub boots: Vec<f64>,
    /// Why the case could not run, if it could not.
    pub error: Option<String>,
    pub passed: bool,
}

/// The options of every host-side activation here: strict mode, the
/// kernel's default `data_crc false` unless a case says otherwise.
pub(crate) fn strict(data_crc: bool) -> Options {
    Options {
        mode: Mode::Strict,
        data_crc,
    }
}

/// An image to ask the kernel about, with strict mode's prediction.
struct Question {
    name: String,
    about: String,
    input: SparsePmem,
    data_crc: bool,
    strict: ActivationReport,
    strict_after: SparsePmem,
}

impl Question {
    fn new(name: String, about: String, input: SparsePmem, data_crc: bool) -> Self {
        let mut after = input.clone();
        let strict = activate(&mut after, &strict(data_crc), &mut NoHooks);
        Question {
            name,
            about,
            input,
            data_crc,
            strict,
            strict_after: after,
        }
    }
}

/// Runs the questions through the kernel in batches and compares.
fn ask(
    kernel: &Kernel,
    questions: Vec<Question>,
    work: &Path,
    case: &str,
) -> Result<(Vec<Comparison>, Vec<f64>), CaseError> {
    let mut out = Vec::new();
    let mut boots = Vec::new();
    for (b, batch) in questions.chunks(qemu::MAX_IMAGES).enumerate() {
        let dir = work.join(format!("{case}-boot{b}"));
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut images = Vec::new();
        for q in batch {
            let path = dir.join(format!("{}.img", q.name.replace('/', "_")));
            write_sparse(&q.input, &path).map_err(io(format!("writing {}", path.display())))?;
            images.push(BootImage {
                name: q.name.replace('/', "_"),
                path,
                data_crc: q.data_crc,
                workload: None,
                backing: None,
                out: None,
            });
        }
        let disk = qemu::blank_backing_disk(&dir).map_err(io("creating the backing disk"))?;
        let boot = qemu::boot(kernel, &images, &disk, &dir, BOOT_TIMEOUT)?;
        boots.push(boot.seconds);
        for ((q, img), verdict) in batch.iter().zip(&images).zip(boot.verdicts) {
            let after =
                read_sparse(&img.path).map_err(io(format!("reading {}", img.path.display())))?;
            let diff = first_difference(&q.strict_after, &after)
                .map(|d| format!("{d} (strict's image vs the kernel's)"));
            let strict_activated = q.strict.outcome != Outcome::Refused;
            // Where both activated, `dmsetup status` and strict mode's status
            // line must be the same too.
            let status_diff = match (&verdict.status, &q.strict.status) {
                (Some(k), Some(ours)) if k.line() != *ours => Some(format!(
                    "status: the kernel `{}`, strict `{ours}`",
                    k.line()
                )),
                _ => None,
            };
            let diff = match (diff, status_diff) {
                (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                (a, b) => a.or(b),
            };
            let agree = verdict.done && verdict.activated == strict_activated && diff.is_none();
            out.push(Comparison {
                image: q.name.clone(),
                about: q.about.clone(),
                strict: StrictSide::of(&q.strict),
                kernel: verdict,
                first_difference: diff,
                agree,
            });
        }
        // Boot folders hold 512 MiB sparse images; keep only the console.
        for img in &images {
            let _ = std::fs::remove_file(&img.path);
        }
        let _ = std::fs::remove_file(&disk);
    }
    Ok((out, boots))
}

pub(crate) fn finish(name: &str, r: Result<(Vec<Comparison>, Vec<f64>), CaseError>) -> CaseResult {
    match r {
        Ok((comparisons, boots)) => CaseResult {
            name: name.into(),
            passed: !comparisons.is_empty() && comparisons.iter().all(|c| c.agree),
            comparisons,
            boots,
            error: None,
        },
        Err(e) => CaseResult {
            name: name.into(),
            comparisons: vec![],
            boots: vec![],
            error: Some(e.to_string()),
            passed: false,
        },
    }
}

/// Case 1: first activation of blank devices, by the kernel and by strict
/// mode (whose fresh format is also recover mode's and `cargo xtask
/// format`'s: checked on the host first), compared byte for byte.
pub fn first_activation(kernel: &Kernel, work: &Path) -> CaseResult {
    let run = || {
        let mut qs = Vec::new();
        for (name, size, data_crc) in [
            ("blank-512M", 512u64 << 20, false),
            ("blank-1G", 1 << 30, false),
            ("blank-512M-data-crc", 512 << 20, true),
        ] {
            let q = Question::new(
                name.into(),
                "first activation of a blank device".into(),
                SparsePmem::new(size),
                data_crc,
            );
            let mut recover = SparsePmem::new(size);
            activate(
                &mut recover,
                &Options {
                    mode: Mode::Recover,
                    data_crc,
                },
                &mut NoHooks,
            );
            if !recover.same_bytes(&q.strict_after) {
                return Err(CaseError::Setup(format!(
                    "{name}: strict and recover formats differ on the host"
                )));
            }
            qs.push(q);
        }
        ask(kernel, qs, work, "first-activation")
    };
    finish("first-activation", run())
}

/// The workload of `kernel-writes`, run by the guest on the active target:
/// 320 buffered 4 KiB writes (patterns A, B, C, D in turn) and an fsync, then
/// O_DIRECT writes that overwrite part of them, cross the 4 MiB logical
/// boundary, and overlap each other there; the last one fsyncs, which sends
/// the target a flush: every open key-set is closed, so `dmsetup status`
/// shows the log's final end. [`kernel_writes_content`] is what it leaves.
pub const KERNEL_WRITES: &str = r#"set -e
for c in A B C D Y Z; do dd if=/dev/zero bs=4096 count=256 2>/dev/null | tr '\000' "$c" > /tmp/p$c; done
i=0
while [ $i -lt 320 ]; do
  case $((i % 4)) in 0) c=A;; 1) c=B;; 2) c=C;; *) c=D;; esac
  dd if=/tmp/p$c of=$DM bs=4096 seek=$i count=1 conv=notrunc 2>/dev/null
  i=$((i + 1))
done
sync
dd if=/tmp/pZ of=$DM bs=1M seek=1 count=1 oflag=direct conv=notrunc 2>/dev/null
dd if=/tmp/pZ of=$DM bs=512K seek=7 count=2 oflag=direct conv=notrunc 2>/dev/null
dd if=/tmp/pY of=$DM bs=4096 seek=1023 count=2 oflag=direct conv=notrunc,fsync 2>/dev/null"#;

/// The byte the logical device holds at `off` after [`KERNEL_WRITES`] on a
/// zeroed backing disk (a read through dm-pcache returns it).
pub fn kernel_writes_content(off: u64) -> u8 {
    const MIB: u64 = 1 << 20;
    if (4 * MIB - 4096..4 * MIB + 4096).contains(&off) {
        b'Y'
    } else if (MIB..2 * MIB).contains(&off) || (3 * MIB + MIB / 2..4 * MIB + MIB / 2).contains(&off)
    {
        b'Z'
    } else if off < 320 * 4096 {
        b"ABCD"[((off / 4096) % 4) as usize]
    } else {
        0
    }
}

/// What the kernel's log and tails are, from `dmsetup status` and from our
/// inspector on the image it left.
#[derive(Clone, Debug, Serialize)]
pub struct LogComparison {
    pub kernel: Option<qemu::DmStatus>,
    /// key_head (the inspector's end of the log), dirty_tail, key_tail.
    pub inspector: [(u32, u32); 3],
    pub ksets: u64,
    pub keys: u64,
    pub lasts: u64,
    /// The inspector ended the log on a terminator or a torn record.
    pub ordinary_end: bool,
}

/// Case 2 (kernel → us): the kernel formats a blank device and writes a log
/// ([`KERNEL_WRITES`]); the inspector must decode every record and find the
/// log's end and key_tail where `dmsetup status` puts them. With `fixture`,
/// the image is also written there, zstd-compressed (the engine's replay
/// tests use it).
pub fn kernel_writes(kernel: &Kernel, work: &Path, fixture: Option<&Path>) -> CaseResult {
    let run = || -> Result<(Vec<Comparison>, Vec<f64>), CaseError> {
        let dir = work.join("kernel-writes-boot0");
        std::fs::create_dir_all(&dir).map_err(io("creating the boot folder"))?;
        let path = dir.join("kernel-writes.img");
        write_sparse(&SparsePmem::new(512 << 20), &path).map_err(io("writing the blank image"))?;
        let disk = qemu::blank_backing_disk(&dir).map_err(io("creating the backing disk"))?;
        let images = [BootImage {
            name: "kernel-writes".into(),
            path: path.clone(),
            data_crc: false,
            workload: Some(KERNEL_WRITES.into()),
            backing: None,
            out: None,
        }];
        let boot = qemu::boot(kernel, &images, &disk, &dir, BOOT_TIMEOUT)?;
        let verdict = boot.verdicts.into_iter().next().unwrap_or_default();
        let img = read_sparse(&path).map_err(io("reading the kernel's image"))?;
        let rep = pcache::inspect::inspect(&img, &pcache::inspect::InspectOptions::default())
            .map_err(|e| CaseError::Setup(format!("inspecting the kernel's image: {e}")))?;
        let pos = |p: Option<&pcache::cache::CachePosOnMedia>| {
            p.map_or((u32::MAX, u32::MAX), |p| {
                (p.cache_seg_id.get(), p.seg_off.get())
            })
        };
        let head = rep.log.end.as_ref().map_or((u32::MAX, u32::MAX), |e| {
            (e.pos.cache_seg_id, e.pos.seg_off)
        });
        let cmp = LogComparison {
            kernel: verdict.status.clone(),
            inspector: [
                head,
                pos(rep.dirty_tail.current_record()),
                pos(rep.key_tail.current_record()),
            ],
            ksets: rep.log.ksets,
            keys: rep.log.keys,
            lasts: rep.log.lasts,
            ordinary_end: rep.log.end_is_ordinary == Some(true),
        };
        // dirty_tail moves with the kernel's writeback, which may persist
        // one more step after the status was read: compared as reported.
        // Strict mode replays the kernel's log and opens the cache with the
        // same key_head.
        let mut copy = img.clone();
        let ours = pcache::dm_pcache::start(&mut copy, &strict(false), &mut NoHooks);
        let our_head = ours
            .cache
            .as_ref()
            .map(|c| (c.key_head().cache_seg_id, c.key_head().seg_off));
        let agree = verdict.activated
            && verdict.workload_ok == Some(true)
            && cmp.ordinary_end
            && cmp.ksets > 0
            && our_head == Some(head)
            && cmp
                .kernel
                .as_ref()
                .is_some_and(|k| k.key_head == head && k.key_tail == cmp.inspector[2]);
        if let Some(out) = fixture {
            compress(&path, out)?;
        }
        let _ = std::fs::remove_file(&disk);
        Ok((
            vec![Comparison {
                image: "kernel-writes".into(),
                about: format!(
                    "the kernel's log after 320 buffered writes, fsync, O_DIRECT overwrites across 4 MiB: {}",
                    serde_json::to_string(&cmp).unwrap_or_default()
                ),
                strict: StrictSide::of(&ours.report),
                kernel: verdict,
                first_difference: None,
                agree,
            }],
            vec![boot.seconds],
        ))
    };
    finish("kernel-writes", run())
}

/// `zstd -19` of `src` into `out`, with its sha256 beside it.
fn compress(src: &Path, out: &Path) -> Result<(), CaseError> {
    let status = std::process::Command::new("zstd")
        .args(["-q", "-f", "-19", "--sparse"])
        .arg(src)
        .arg("-o")
        .arg(out)
        .status()
        .map_err(io("running zstd"))?;
    if !status.success() {
        return Err(CaseError::Setup(format!(
            "zstd failed on {}",
            src.display()
        )));
    }
    Ok(())
}

/// A formatted 512 MiB device activated twice (the image-set scenarios' base).
fn formatted_base() -> SparsePmem {
    let mut dev = SparsePmem::new(512 << 20);
    for _ in 0..2 {
        activate(&mut dev, &strict(false), &mut NoHooks);
    }
    dev
}

/// Case 4a: every image of the no-cut scenarios (corrupt-sb, forged-metadata).
pub fn hostile_images(kernel: &Kernel, work: &Path) -> CaseResult {
    let run = || {
        let base = formatted_base();
        // Us → kernel: the module's own formatted, twice-activated image,
        // which the kernel must open exactly as strict mode does.
        let mut qs = vec![Question::new(
            "us-to-kernel/formatted".into(),
            "an image the module formatted and activated twice (the generators' base)".into(),
            base.clone(),
            false,
        )];
        for (gen, label) in [
            (Generator::CorruptSb, "corrupt-sb"),
            (Generator::ForgedMetadata, "forged-metadata"),
        ] {
            let variants =
                generate::variants(gen, &base).map_err(|e| CaseError::Setup(e.to_string()))?;
            for v in variants {
                let mut img = base.clone();
                for (off, bytes) in &v.patches {
                    img.write_bytes(*off, bytes)
                        .map_err(|e| CaseError::Setup(e.to_string()))?;
                }
                qs.push(Question::new(
                    format!("{label}/{}", v.name),
                    format!("{label} image {}", v.name),
                    img,
                    false,
                ));
            }
        }
        ask(kernel, qs, work, "hostile-images")
    };
    finish("hostile-images", run())
}

/// A write at word granularity (the unit of power-fail atomicity).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WordEvent {
    Store { off: u64, val: u64 },
    Fence,
}

impl persist::Persistence for WordEvent {
    fn role(&self) -> persist::Role {
        match self {
            WordEvent::Store { .. } => persist::Role::Write(persist::Domain::Pmem),
            WordEvent::Fence => persist::Role::Barrier(persist::Domain::Pmem),
        }
    }
}

/// The events of an activation recorded over `base`, as word stores that
/// change the image (a zeroing becomes its non-zero words, as the guest's
/// 8-byte stores are after the scenarios drop the unchanged ones), inside
/// the window `[begin, end]` of crash points (`None`: everything).
fn word_events(base: &SparsePmem, window: Option<(u32, u32)>) -> (SparsePmem, Vec<WordEvent>) {
    let mut rec = RecordingPmem::new(base.clone());
    let mut hooks = rec.hooks();
    activate(&mut rec, &strict(false), &mut hooks);
    let events = rec.events();
    let (from, to) = match window {
        None => (0, events.len()),
        Some((b, e)) => {
            let from = events
                .iter()
                .position(|a| matches!(a, Access::Begin(cp) if cp.number() == b))
                .unwrap_or(0);
            let to = events
                .iter()
                .rposition(|a| matches!(a, Access::End(cp) if cp.number() == e))
                .map_or(events.len(), |i| i + 1);
            (from, to)
        }
    };
    // The image at the window's start, and the window as word events.
    let mut img = base.clone();
    for a in &events[..from] {
        pcache::pmem::apply_event(&mut img, a);
    }
    let start = img.clone();
    let mut out = Vec::new();
    for a in &events[from..to] {
        match *a {
            Access::Store { off, val } => {
                let mut b = [0u8; 8];
                if img.read(off, &mut b).is_ok() && u64::from_le_bytes(b) != val {
                    out.push(WordEvent::Store { off, val });
                }
            }
            Access::ZeroRange { off, len } => {
                let mut b = [0u8; 8];
                for w in (off..off + len).step_by(8) {
                    if img.read(w, &mut b).is_ok() && b != [0; 8] {
                        out.push(WordEvent::Store { off: w, val: 0 });
                    }
                }
            }
            Access::Fence => out.push(WordEvent::Fence),
            _ => {}
        }
        pcache::pmem::apply_event(&mut img, a);
    }
    (start, out)
}

/// The distinct crash images of a window under the scenario's persistence
/// model (as `scenarios::persistence` defines them): `prefix` — the writes
/// before each cut, in order; `flushed-only` — what the last fence covered;
/// `subsets` — that plus each subset of the writes pending at every cut.
fn crash_images(
    start: &SparsePmem,
    events: &[WordEvent],
    model: &Model,
) -> Vec<(String, SparsePmem)> {
    let mut seen: Vec<SparsePmem> = Vec::new();
    let mut out = Vec::new();
    for cut in 0..=events.len() {
        let durable = persist::durable_prefix(events, persist::Domain::Pmem, cut);
        let pending = persist::pending(events, persist::Domain::Pmem, cut);
        let family: Vec<Vec<usize>> = match model {
            Model::Prefix => vec![pending.clone()],
            Model::FlushedOnly => vec![vec![]],
            Model::Subsets { sample, seed } => {
                persist::subset_family(&pending, *sample, seed ^ cut as u64)
            }
            // Not used by the scenarios interop samples; the two fixed ends only.
            Model::AtFences { .. } => vec![vec![], pending.clone()],
        };
        for subset in family {
            let mut img = start.clone();
            for (i, e) in events[..cut].iter().enumerate() {
                if let WordEvent::Store { off, val } = *e {
                    if i < durable || subset.contains(&i) {
                        let _ = img.store_u64(off, val);
                    }
                }
            }
            if !seen.iter().any(|s| s.same_bytes(&img)) {
                seen.push(img.clone());
                let kept: Vec<String> = subset.iter().map(|i| i.to_string()).collect();
                out.push((format!("cut{cut}-{}", kept.join("+")), img));
            }
        }
    }
    out
}

/// Case 4b: a sample of the crash states of the shipped power-cut scenarios:
/// every distinct strict result class of every device (outcome, refusal
/// kind, older cache back), `sample` states each.
pub fn power_cuts(kernel: &Kernel, work: &Path, scenarios_dir: &Path, sample: usize) -> CaseResult {
    let run = || {
        let mut qs = Vec::new();
        for (scenario, window) in [
            ("crash-mid-sb-write", Some((1, 2))),
            ("crash-mid-format", None),
        ] {
            let file = scenarios_dir.join(format!("{scenario}.json"));
            let spec = Scenario::load(&file).map_err(|e| CaseError::Setup(e.to_string()))?;
            let Run::PowerCut { model, .. } = &spec.run else {
                return Err(CaseError::Setup(format!(
                    "{scenario} is not a power-cut scenario"
                )));
            };
            for device in &spec.devices {
                let dir = work.join(format!("recipe-{scenario}-{}", device.name));
                let prepared = scenarios::recipe::prepare(device, Mode::Strict, &dir)
                    .map_err(|e| CaseError::Setup(e.to_string()))?;
                let base = read_sparse(&prepared.pmem).map_err(io("reading a recipe's image"))?;
                let _ = std::fs::remove_dir_all(&dir);
                let (start, events) = word_events(&base, window);
                let mut classes: BTreeMap<String, Vec<(String, SparsePmem, ActivationReport)>> =
                    BTreeMap::new();
                for (id, img) in crash_images(&start, &events, model) {
                    let mut after = img.clone();
                    let r = activate(&mut after, &strict(false), &mut NoHooks);
                    let back = prepared.older_seq.is_some_and(|old| {
                        r.outcome == Outcome::Opened
                            && r.cache_info.is_some_and(|c| {
                                let found = c.seq.wrapping_sub(1);
                                found == old || found == old.wrapping_sub(1)
                            })
                    });
                    let side = StrictSide::of(&r);
                    let class = format!(
                        "{}{}{}",
                        side.outcome,
                        side.refusal.map(|k| format!(":{k}")).unwrap_or_default(),
                        if back { " (older cache back)" } else { "" }
                    );
                    classes.entry(class).or_default().push((id, img, r));
                }
                for (class, states) in classes {
                    let n = states.len();
                    for (id, img, _) in states.into_iter().take(sample) {
                        qs.push(Question::new(
                            format!("{scenario}/{}/{id}", device.name),
                            format!("{scenario} {}: strict `{class}` ({n} distinct states in this class)", device.name),
                            img,
                            false,
                        ));
                    }
                }
            }
        }
        ask(kernel, qs, work, "power-cuts")
    };
    finish("power-cuts", run())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_builder_gives_the_scenarios_pinned_counts() {
        // The distinct strict states pinned by crash-mid-sb-write.json (8 on
        // the blank device, 512 on the older-cache one) and crash-mid-format.json
        // (162 and 229): the host builder here sees what the runner sees.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        for (scenario, window, counts) in [
            ("crash-mid-sb-write", Some((1, 2)), [8, 512]),
            ("crash-mid-format", None, [162, 229]),
        ] {
            let spec = Scenario::load(&dir.join(format!("{scenario}.json"))).unwrap();
            for (device, want) in spec.devices.iter().zip(counts) {
                let work = std::env::temp_dir().join(format!(
                    "interop-counts-{}-{scenario}-{}",
                    std::process::id(),
                    device.name
                ));
                let prepared = scenarios::recipe::prepare(device, Mode::Strict, &work).unwrap();
                let base = read_sparse(&prepared.pmem).unwrap();
                std::fs::remove_dir_all(&work).unwrap();
                let (start, events) = word_events(&base, window);
                let Run::PowerCut { model, .. } = &spec.run else {
                    panic!("{scenario}")
                };
                assert_eq!(
                    crash_images(&start, &events, model).len(),
                    want,
                    "{scenario} {}",
                    device.name
                );
            }
        }
    }
}
