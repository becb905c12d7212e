//! The kernel's own stores, traced under QEMU by the `qemu-trace` plugin,
//! compared with strict mode's: the `trace-first-activation` case. Its
//! comparison is also `trace-writes`'s ([`crate::ktrace_writes`]).
//!
//! Agreement: the same sequence of fence-separated epochs and, within each
//! epoch, the same bytes written with the same final values (the store
//! widths differ: the kernel's `memcpy_flushcache`/`memset` against the
//! module's 8-byte stores, so stores are compared as bytes). An epoch is
//! the stores between two barriers (a fence or a flush request); epochs
//! with no store are not epochs (two fences in a row are one). A difference
//! names the first epoch that differs and its first differing byte range.

use crate::cases::{finish, io, strict, CaseError, CaseResult, Comparison, StrictSide};
use crate::image::{first_difference, read_sparse, write_sparse};
use crate::prepare::Kernel;
use crate::qemu::{self, BootImage};
use pcache::pmem::{Access, Pmem, RecordingPmem, SparsePmem};
use pcache::{activate, Outcome};
use scenarios::persistence::{Event, Trace};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// One epoch: every byte written in it and its last value.
pub type Epoch = BTreeMap<u64, u8>;

/// The pmem epochs of a trace (markers and disk events ignored).
pub fn epochs(t: &Trace) -> Vec<Epoch> {
    let mut out = Vec::new();
    let mut cur = Epoch::new();
    for e in t.events() {
        match e {
            Event::PmemStore { offset, .. } => {
                for (i, b) in Trace::store_bytes(e).into_iter().enumerate() {
                    cur.insert(offset + i as u64, b);
                }
            }
            Event::PmemFlush if !cur.is_empty() => out.push(std::mem::take(&mut cur)),
            _ => {}
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Where two traces first part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EpochDifference {
    /// Index of the first differing epoch (0-based).
    pub epoch: usize,
    /// The first byte range `[start, end)` written differently in it (by
    /// either side, or with different final values).
    pub start: u64,
    pub end: u64,
    pub what: String,
}

impl std::fmt::Display for EpochDifference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "epoch {}: bytes {:#x}..{:#x}: {}",
            self.epoch, self.start, self.end, self.what
        )
    }
}

fn describe(e: &Epoch) -> String {
    match (e.keys().next(), e.keys().next_back()) {
        (Some(a), Some(b)) => format!("{} bytes in {a:#x}..{:#x}", e.len(), b + 1),
        _ => "nothing".into(),
    }
}

/// The first difference of the kernel's epochs `k` from strict mode's `s`.
pub fn compare(k: &[Epoch], s: &[Epoch]) -> Option<EpochDifference> {
    let empty = Epoch::new();
    for i in 0..k.len().max(s.len()) {
        let (a, b) = (k.get(i).unwrap_or(&empty), s.get(i).unwrap_or(&empty));
        if a == b {
            continue;
        }
        // The first byte either side has differently, and the run of
        // differing bytes from there.
        let differs = |o: u64| a.get(&o) != b.get(&o);
        let start = a
            .keys()
            .chain(b.keys())
            .copied()
            .filter(|&o| differs(o))
            .min()
            .expect("the epochs differ somewhere");
        let mut end = start + 1;
        while (a.contains_key(&end) || b.contains_key(&end)) && differs(end) {
            end += 1;
        }
        let side = |e: &Epoch| {
            let bytes: Vec<String> = (start..end.min(start + 16))
                .map(|o| e.get(&o).map_or("--".into(), |v| format!("{v:02x}")))
                .collect();
            bytes.join(" ")
        };
        let what = if i >= k.len() || i >= s.len() {
            format!(
                "the kernel has {} epochs, strict mode {}; this one is the kernel's {}, strict's {}",
                k.len(),
                s.len(),
                describe(a),
                describe(b)
            )
        } else {
            format!(
                "the kernel writes [{}], strict mode [{}] (the epoch: kernel {}, strict {})",
                side(a),
                side(b),
                describe(a),
                describe(b)
            )
        };
        return Some(EpochDifference {
            epoch: i,
            start,
            end,
            what,
        });
    }
    None
}

/// Strict mode's activation of `base` as a trace (its 8-byte stores and
/// zeroings as stores, its fences as barriers; its cache-line write-backs,
/// which order nothing without a fence, left out), and the image it leaves.
pub fn strict_trace(
    base: &SparsePmem,
    data_crc: bool,
) -> (Trace, SparsePmem, pcache::ActivationReport) {
    let (t, after, report) = strict_trace_marked(base, data_crc);
    let mut plain = Trace::new();
    for e in t.events() {
        if !matches!(e, Event::Marker { .. }) {
            plain.push(*e);
        }
    }
    (plain, after, report)
}

/// Marker id of crash point `n`'s beginning in [`strict_trace_marked`].
pub const fn begin_marker(n: u32) -> u32 {
    0x100 + n
}
/// Marker id of crash point `n`'s end in [`strict_trace_marked`].
pub const fn end_marker(n: u32) -> u32 {
    0x200 + n
}

/// As [`strict_trace`], with the crash points' boundaries as markers
/// ([`begin_marker`], [`end_marker`]).
pub fn strict_trace_marked(
    base: &SparsePmem,
    data_crc: bool,
) -> (Trace, SparsePmem, pcache::ActivationReport) {
    let mut rec = RecordingPmem::new(base.clone());
    let mut hooks = rec.hooks();
    let report = activate(&mut rec, &strict(data_crc), &mut hooks);
    let t = access_trace(&rec.events(), &[], true);
    (t, rec.current().clone(), report)
}

/// A recording's accesses as a trace: 8-byte stores and zeroings as stores,
/// fences as barriers (cache-line write-backs, which order nothing without
/// a fence, left out); `marks` (event index, id) are markers put before the
/// access at that index (or at the end), and with `crash_points` the crash
/// points' boundaries are markers too ([`begin_marker`], [`end_marker`]).
pub(crate) fn access_trace(events: &[Access], marks: &[(usize, u32)], crash_points: bool) -> Trace {
    let mut t = Trace::new();
    let mut marks = marks.iter().peekable();
    for (i, a) in events.iter().enumerate() {
        while let Some((_, id)) = marks.next_if(|(at, _)| *at <= i) {
            t.push(Event::Marker { id: *id });
        }
        match *a {
            Access::Begin(cp) if crash_points => {
                t.push(Event::Marker {
                    id: begin_marker(cp.number()),
                });
            }
            Access::End(cp) if crash_points => {
                t.push(Event::Marker {
                    id: end_marker(cp.number()),
                });
            }
            Access::Store { off, val } => {
                t.push_pmem_store(off, &val.to_le_bytes());
            }
            Access::ZeroRange { off, len } => {
                let mut o = off;
                while o < off + len {
                    let n = (8 - o % 8).min(off + len - o);
                    t.push_pmem_store(o, &vec![0; n as usize]);
                    o += n;
                }
            }
            Access::Fence => {
                t.push(Event::PmemFlush);
            }
            _ => {}
        }
    }
    for (_, id) in marks {
        t.push(Event::Marker { id: *id });
    }
    t
}

/// `base` with every store of `t` applied.
pub fn replay(base: &SparsePmem, t: &Trace) -> Result<SparsePmem, String> {
    let mut img = base.clone();
    for e in t.events() {
        if let Event::PmemStore { offset, .. } = e {
            img.write_bytes(*offset, &Trace::store_bytes(e))
                .map_err(|err| format!("store at {offset:#x}: {err}"))?;
        }
    }
    Ok(img)
}

/// Removes a traced boot's images, output disks and backing disk (the
/// traces and consoles stay in `dir`).
pub fn remove_boot_files(images: &[BootImage], disk: &Path, dir: &Path) {
    for img in images {
        let _ = std::fs::remove_file(&img.path);
        if let Some(out) = &img.out {
            let _ = std::fs::remove_file(out);
        }
    }
    let _ = std::fs::remove_file(disk);
    crate::kernel_mode::tidy(dir);
}

/// The plugin's trace of the `i`th traced device of a boot in `dir`, and
/// its counts (`trace/trace-N.bin` and `.json`).
pub fn plugin_trace(dir: &Path, i: usize) -> Result<(Trace, PluginCounts), CaseError> {
    let tdir = dir.join("trace");
    let bin = tdir.join(format!("trace-{i}.bin"));
    let bytes = std::fs::read(&bin).map_err(io(format!("reading {}", bin.display())))?;
    let kt =
        Trace::decode(&bytes).map_err(|e| CaseError::Setup(format!("{}: {e}", bin.display())))?;
    let counts: PluginCounts = std::fs::read(tdir.join(format!("trace-{i}.json")))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| CaseError::Setup(format!("trace-{i}.json missing or unreadable")))?;
    Ok((kt, counts))
}

/// The plugin's counts of one window (`trace-N.json`).
#[derive(Clone, Debug, Default, serde::Deserialize, Serialize)]
pub struct PluginCounts {
    pub events: u64,
    pub stores: u64,
    pub bytes: u64,
    pub sfence: u64,
    pub mfence: u64,
    pub clwb: u64,
    pub clflush: u64,
    pub clflushopt: u64,
    pub flush_requests: u64,
    pub barriers: u64,
}

/// What one traced activation showed (written to `traces.json`).
#[derive(Clone, Debug, Serialize)]
pub struct TraceReport {
    pub image: String,
    pub plugin: PluginCounts,
    pub kernel_epochs: usize,
    pub strict_epochs: usize,
    pub strict_stores: usize,
    /// Stores of the kernel's trace whose value differs from the byte the
    /// image held before the activation: had the callback run before the
    /// access, these would read the old bytes and the replay would fail.
    pub kernel_changing_stores: usize,
    /// Replaying the kernel's trace over the input gives the image the kernel left.
    pub replay_matches: bool,
    pub first_difference: Option<EpochDifference>,
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Run in each traced window after the activation: an fsync of the pmem
/// block device under the target (writing nothing) sends the device a flush
/// request, which the plugin must see (its notify area is found from the
/// device's BAR). The activation ended with a fence, so no store is pending
/// and the epochs do not change.
const FLUSH_REQUEST: &str =
    "dd if=/dev/zero of=/dev/$dev bs=512 count=0 conv=notrunc,fsync 2>/dev/null";

/// Case `trace-first-activation`: the kernel's first activation of a blank
/// device (with and without data CRC) and of a device that held an older
/// cache (`crash-mid-sb-write`'s `older-cache` recipe), traced by the plugin
/// at `plugin`, against strict mode's trace of the same activation.
pub fn trace_first_activation(
    kernel: &Kernel,
    work: &Path,
    scenarios_dir: &Path,
    plugin: &Path,
) -> CaseResult {
    let run = || -> Result<(Vec<Comparison>, Vec<f64>), CaseError> {
        let spec = scenarios::spec::Scenario::load(&scenarios_dir.join("crash-mid-sb-write.json"))
            .map_err(|e| CaseError::Setup(e.to_string()))?;
        let older = spec
            .devices
            .iter()
            .find(|d| d.name == "older-cache")
            .ok_or_else(|| {
                CaseError::Setup("crash-mid-sb-write has no older-cache device".into())
            })?;
        let prep_dir = work.join("prepare");
        let prepared = scenarios::recipe::prepare(older, pcache::Mode::Strict, &prep_dir)
            .map_err(|e| CaseError::Setup(e.to_string()))?;
        let older_img = read_sparse(&prepared.pmem).map_err(io("reading the older-cache image"))?;
        let _ = std::fs::remove_dir_all(&prep_dir);
        let inputs = [
            ("blank-512M", SparsePmem::new(512 << 20), false),
            ("blank-512M-data-crc", SparsePmem::new(512 << 20), true),
            ("older-cache", older_img, false),
        ];
        let dir = work.join("trace-boot0");
        std::fs::create_dir_all(&dir).map_err(io("creating the boot folder"))?;
        let mut images = Vec::new();
        for (name, img, data_crc) in &inputs {
            let path = dir.join(format!("{name}.img"));
            write_sparse(img, &path).map_err(io(format!("writing {}", path.display())))?;
            images.push(BootImage {
                name: name.to_string(),
                path,
                data_crc: *data_crc,
                workload: Some(FLUSH_REQUEST.into()),
                backing: None,
                out: None,
            });
        }
        let disk = qemu::blank_backing_disk(&dir).map_err(io("creating the backing disk"))?;
        let boot = qemu::boot_traced(kernel, &images, &disk, &dir, BOOT_TIMEOUT, plugin)?;
        let mut out = Vec::new();
        let mut reports = Vec::new();
        for (i, ((name, input, data_crc), verdict)) in inputs.iter().zip(boot.verdicts).enumerate()
        {
            let (kt, counts) = plugin_trace(&dir, i)?;
            let after = read_sparse(&images[i].path).map_err(io("reading the kernel's image"))?;
            let (st, strict_after, strict_report) = strict_trace(input, *data_crc);
            let replayed = replay(input, &kt).map_err(CaseError::Setup)?;
            let replay_matches = first_difference(&replayed, &after).is_none();
            let changing = kt
                .events()
                .iter()
                .filter(|e| match e {
                    Event::PmemStore { offset, .. } => {
                        let mut old = vec![0u8; Trace::store_bytes(e).len()];
                        input.read(*offset, &mut old).is_ok() && old != Trace::store_bytes(e)
                    }
                    _ => false,
                })
                .count();
            let (ke, se) = (epochs(&kt), epochs(&st));
            let diff = compare(&ke, &se);
            let image_diff = first_difference(&strict_after, &after);
            let mut problems = Vec::new();
            if !replay_matches {
                problems.push(
                    "the kernel's trace replayed over the input is not the image it left"
                        .to_string(),
                );
            }
            if changing == 0 {
                problems.push("no store of the kernel's trace changed a byte".into());
            }
            if counts.flush_requests == 0 {
                problems.push(
                    "the plugin saw no flush request after the workload's fsync of the pmem device"
                        .into(),
                );
            }
            if verdict.workload_ok != Some(true) {
                problems.push("the flush request's fsync failed in the guest".into());
            }
            if let Some(d) = &diff {
                problems.push(format!("traces differ at {d}"));
            }
            if let Some(d) = &image_diff {
                problems.push(format!("images differ at {d} (strict's vs the kernel's)"));
            }
            let strict_activated = strict_report.outcome != Outcome::Refused;
            out.push(Comparison {
                image: name.to_string(),
                about: format!(
                    "first activation traced: the kernel {} stores ({} bytes) in {} epochs ({} sfence, {} mfence, {} clwb, {} clflush, {} clflushopt, {} flush requests), strict mode {} stores in {} epochs",
                    counts.stores, counts.bytes, ke.len(), counts.sfence, counts.mfence, counts.clwb,
                    counts.clflush, counts.clflushopt, counts.flush_requests, st.len(), se.len()
                ),
                strict: StrictSide::of(&strict_report),
                agree: verdict.done && verdict.activated == strict_activated && problems.is_empty(),
                kernel: verdict,
                first_difference: (!problems.is_empty()).then(|| problems.join("; ")),
            });
            reports.push(TraceReport {
                image: name.to_string(),
                plugin: counts,
                kernel_epochs: ke.len(),
                strict_epochs: se.len(),
                strict_stores: st.events().iter().filter(|e| e.is_write()).count(),
                kernel_changing_stores: changing,
                replay_matches,
                first_difference: diff,
            });
        }
        std::fs::write(
            work.join("traces.json"),
            serde_json::to_vec_pretty(&reports).expect("serializable"),
        )
        .map_err(io("writing traces.json"))?;
        remove_boot_files(&images, &disk, &dir);
        Ok((out, vec![boot.seconds]))
    };
    finish("trace-first-activation", run())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(events: &[(u64, &[u8])]) -> Trace {
        // (offset, bytes); an empty slice is a barrier.
        let mut t = Trace::new();
        for (off, b) in events {
            if b.is_empty() {
                t.push(Event::PmemFlush);
            } else {
                for (i, piece) in b.chunks(8).enumerate() {
                    t.push_pmem_store(off + i as u64 * 8, piece);
                }
            }
        }
        t
    }

    #[test]
    fn epochs_compare_bytes_not_store_widths() {
        // The kernel: two 4-byte stores, a rewrite, a fence, a fence (one barrier), one byte.
        let k = trace(&[
            (0x100, &[1, 2, 3, 4]),
            (0x104, &[5, 6, 7, 8]),
            (0x100, &[9]),
            (0, &[]),
            (0, &[]),
            (0x200, &[0xaa]),
        ]);
        // Strict: one 8-byte store with the final values, a barrier, the byte.
        let s = trace(&[
            (0x100, &[9, 2, 3, 4, 5, 6, 7, 8]),
            (0, &[]),
            (0x200, &[0xaa]),
        ]);
        let (ke, se) = (epochs(&k), epochs(&s));
        assert_eq!(ke.len(), 2);
        assert_eq!(compare(&ke, &se), None);
        // Strict mode's own conversion of a zeroing is bytes too.
        let base = SparsePmem::new(512 << 20);
        let (st, after, _) = strict_trace(&base, false);
        assert!(replay(&base, &st).unwrap().same_bytes(&after));
        assert!(epochs(&st).len() > 1, "a format is several epochs");
    }

    #[test]
    fn a_differing_epoch_is_named_with_its_first_byte_range() {
        let s = trace(&[
            (0x100, &[1, 2, 3, 4, 5, 6, 7, 8]),
            (0, &[]),
            (0x200, &[1, 1, 1, 1]),
        ]);
        // A different value in the second epoch at 0x201..0x203.
        let k = trace(&[
            (0x100, &[1, 2, 3, 4, 5, 6, 7, 8]),
            (0, &[]),
            (0x200, &[1, 7, 7, 1]),
        ]);
        let d = compare(&epochs(&k), &epochs(&s)).unwrap();
        assert_eq!((d.epoch, d.start, d.end), (1, 0x201, 0x203));
        assert!(
            d.what.contains("[07 07]") && d.what.contains("[01 01]"),
            "{d}"
        );
        // A fence where strict mode has none: the epochs split differently.
        let k = trace(&[
            (0x100, &[1, 2, 3, 4]),
            (0, &[]),
            (0x104, &[5, 6, 7, 8]),
            (0, &[]),
            (0x200, &[1, 1, 1, 1]),
        ]);
        let d = compare(&epochs(&k), &epochs(&s)).unwrap();
        assert_eq!((d.epoch, d.start, d.end), (0, 0x104, 0x108));
        // A byte only one side writes (same value as the other side's image would have).
        let k = trace(&[
            (0x100, &[1, 2, 3, 4, 5, 6, 7, 8, 0]),
            (0, &[]),
            (0x200, &[1, 1, 1, 1]),
        ]);
        let d = compare(&epochs(&k), &epochs(&s)).unwrap();
        assert_eq!((d.epoch, d.start, d.end), (0, 0x108, 0x109));
        // A missing last epoch.
        let k = trace(&[(0x100, &[1, 2, 3, 4, 5, 6, 7, 8]), (0, &[])]);
        let d = compare(&epochs(&k), &epochs(&s)).unwrap();
        assert_eq!((d.epoch, d.start, d.end), (1, 0x200, 0x204));
        assert!(
            d.what.contains("the kernel has 1 epochs, strict mode 2"),
            "{d}"
        );
    }
}
