//! Scenarios against the kernel (`cargo xtask scenario NAME --kernel`): the
//! crash states of a power-cut scenario built from the *kernel's* trace of
//! its workload (the `qemu-trace` plugin under QEMU) with the scenario's own
//! persistence model, each recovered by the kernel (one activation, up to
//! [`qemu::MAX_IMAGES`] states per boot), beside strict and recover mode's
//! outcomes on the same state (host activations of the same image).
//!
//! Only workloads that are one activation (`start`) are supported: that is
//! what the guest script traces. The scenario's window is given by the
//! module's crash-point markers, which the kernel has not; it is carried
//! over through the epochs (the traces agree epoch by epoch, which
//! `trace-first-activation` checks and this module checks again): the
//! kernel's window runs from the start of the epoch holding the window's
//! first store to the barrier closing the epoch of its last.

use crate::cases::{io, strict, CaseError, StrictSide};
use crate::image::{first_difference, read_sparse, write_sparse};
use crate::ktrace::{begin_marker, compare, end_marker, epochs, strict_trace_marked};
use crate::prepare::Kernel;
use crate::qemu::{self, BootImage};
use pcache::pmem::{Pmem, SparsePmem};
use pcache::{activate, Mode, NoHooks, Options, Outcome};
use scenarios::persistence::{enumerate, BaseImage, CrashState, Event, Trace};
use scenarios::spec::{Run, Scenario, Window};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

// The result's types live with the rest of result.json's (a scenario's
// result carries them as `kernel`); this module produces them.
pub use scenarios::result::{KernelDeviceRun, KernelRun, KernelStateRow};

/// Removes what a boot folder needs no more once the boot is over (its
/// initramfs, about 11 MB, and the marker device), keeping the console and
/// the traces.
pub(crate) fn tidy(dir: &Path) {
    let _ = std::fs::remove_file(dir.join("initrd.cpio"));
    let _ = std::fs::remove_file(dir.join("marker.pmem"));
    let _ = std::fs::remove_dir_all(dir.join("stage"));
}

/// Time budget of one recovery boot (8 activations take 20–40 s under TCG).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(240);
/// The kernel column of a state a hung boot left unrecovered.
const NOT_RUN: &str = scenarios::result::KERNEL_NOT_RUN;

/// Non-empty epochs of a trace as (position of the first store, position of
/// the closing barrier, or the trace's length when none closes it).
pub fn epoch_spans(t: &Trace) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut first = None;
    for (i, e) in t.events().iter().enumerate() {
        match e {
            Event::PmemStore { .. } if first.is_none() => first = Some(i),
            Event::PmemFlush => {
                if let Some(f) = first.take() {
                    out.push((f, i));
                }
            }
            _ => {}
        }
    }
    if let Some(f) = first {
        out.push((f, t.len()));
    }
    out
}

/// The epochs `a..=b` of `spans` holding the stores at positions `from..to`.
fn epochs_of(spans: &[(usize, usize)], from: usize, to: usize) -> Option<(usize, usize)> {
    // An epoch's stores lie in [first store, closing barrier).
    let holds = |&(f, c): &(usize, usize)| f < to && c > from;
    let a = spans.iter().position(holds)?;
    let b = spans.iter().rposition(holds)?;
    Some((a, b))
}

/// Cut positions covering epochs `a..=b`: from just before the first store
/// of `a` to just after the barrier closing `b`.
fn window_of(t: &Trace, spans: &[(usize, usize)], (a, b): (usize, usize)) -> (usize, usize) {
    (spans[a].0, (spans[b].1 + 1).min(t.len()))
}

struct Base<'a>(&'a SparsePmem);

impl BaseImage for Base<'_> {
    fn pmem_byte(&self, off: u64) -> u8 {
        let mut b = [0u8];
        let _ = self.0.read(off, &mut b);
        b[0]
    }
    fn disk_sector(&self, _sector: u64) -> Vec<u8> {
        vec![0; scenarios::persistence::SECTOR]
    }
}

fn state_image(base: &SparsePmem, t: &Trace, s: &CrashState) -> SparsePmem {
    let mut img = base.clone();
    for w in &s.pmem {
        if let Some(e @ Event::PmemStore { offset, .. }) = t.get(w.event) {
            let _ = img.write_bytes(*offset, &Trace::store_bytes(e));
        }
    }
    img
}

fn label(r: &pcache::ActivationReport, older_seq: Option<u8>) -> String {
    let back = older_seq.is_some_and(|old| {
        r.outcome == Outcome::Opened
            && r.cache_info.is_some_and(|c| {
                let found = c.seq.wrapping_sub(1);
                found == old || found == old.wrapping_sub(1)
            })
    });
    let side = StrictSide::of(r);
    format!(
        "{}{}{}",
        side.outcome,
        side.refusal.map(|k| format!(":{k}")).unwrap_or_default(),
        if back { " (older cache back)" } else { "" }
    )
}

/// Runs the power-cut scenario `spec` (named `name`) against the kernel.
/// At most `max_states` states per device are recovered by the kernel
/// (evenly spread over the enumeration), and no recovery boot starts once
/// `budget` has passed since the start.
pub fn run(
    kernel: &Kernel,
    plugin: &Path,
    name: &str,
    spec: &Scenario,
    work: &Path,
    max_states: usize,
    budget: Duration,
) -> Result<KernelRun, CaseError> {
    let start = Instant::now();
    let Run::PowerCut {
        workload,
        window,
        model,
        ..
    } = &spec.run
    else {
        return Err(CaseError::Setup(format!(
            "{name} is not a power-cut scenario"
        )));
    };
    if workload.trim() != "start" {
        return Err(CaseError::Setup(format!(
            "{name}: --kernel supports the workload `start` (one activation) only, not `{workload}`"
        )));
    }
    let (from_marker, to_marker) = match window {
        Window::BetweenMarkers {
            from,
            to,
            every: false,
        } => {
            let cp = |m: &scenarios::spec::MarkerName, suffix: &str| {
                String::from(m.clone())
                    .strip_prefix('C')
                    .and_then(|r| r.strip_suffix(suffix))
                    .and_then(|n| n.parse::<u32>().ok())
            };
            match (cp(from, "-begin"), cp(to, "-end")) {
                (Some(a), Some(b)) => (Some(begin_marker(a)), Some(end_marker(b))),
                _ => {
                    return Err(CaseError::Setup(format!(
                        "{name}: --kernel reads windows `Cn-begin`..`Cm-end` only"
                    )))
                }
            }
        }
        Window::Everything => (None, None),
        _ => {
            return Err(CaseError::Setup(format!(
                "{name}: --kernel reads windows `Cn-begin`..`Cm-end` (not `every`) or the whole run only"
            )))
        }
    };
    // The bases, strict mode's traces, and one traced boot for the kernel's.
    std::fs::create_dir_all(work).map_err(io(format!("creating {}", work.display())))?;
    let mut bases = Vec::new();
    for device in &spec.devices {
        let dir = work.join(format!("recipe-{}", device.name));
        let prepared = scenarios::recipe::prepare(device, Mode::Strict, &dir)
            .map_err(|e| CaseError::Setup(e.to_string()))?;
        let base = read_sparse(&prepared.pmem).map_err(io("reading a recipe's image"))?;
        let _ = std::fs::remove_dir_all(&dir);
        bases.push((device.name.clone(), base, prepared.older_seq));
    }
    let tdir = work.join("trace-boot");
    std::fs::create_dir_all(&tdir).map_err(io("creating the trace boot folder"))?;
    let mut images = Vec::new();
    for (dname, base, _) in &bases {
        let path = tdir.join(format!("{dname}.img"));
        write_sparse(base, &path).map_err(io(format!("writing {}", path.display())))?;
        images.push(BootImage {
            name: dname.clone(),
            path,
            data_crc: false,
            workload: None,
            backing: None,
            out: None,
        });
    }
    let disk = qemu::blank_backing_disk(work).map_err(io("creating the backing disk"))?;
    let tboot = qemu::boot_traced(
        kernel,
        &images,
        &disk,
        &tdir,
        Duration::from_secs(600),
        plugin,
    )?;
    for img in &images {
        let _ = std::fs::remove_file(&img.path);
    }
    tidy(&tdir);
    let mut devices = Vec::new();
    for (i, (dname, base, older_seq)) in bases.iter().enumerate() {
        let bin = tdir.join(format!("trace/trace-{i}.bin"));
        let kt =
            Trace::decode(&std::fs::read(&bin).map_err(io(format!("reading {}", bin.display())))?)
                .map_err(|e| CaseError::Setup(format!("{}: {e}", bin.display())))?;
        let (st, _, _) = strict_trace_marked(base, false);
        let trace_difference = compare(&epochs(&kt), &epochs(&st)).map(|d| d.to_string());
        // The scenario's window in strict's trace, then in epochs, then in the kernel's.
        let pos = |id: Option<u32>, last: bool| {
            id.and_then(|id| {
                let ev = st.events();
                let m = Event::Marker { id };
                if last {
                    ev.iter().rposition(|e| *e == m)
                } else {
                    ev.iter().position(|e| *e == m)
                }
            })
        };
        let s_from = pos(from_marker, false).unwrap_or(0);
        let s_to = pos(to_marker, true).map_or(st.len(), |p| p + 1);
        let (sspans, kspans) = (epoch_spans(&st), epoch_spans(&kt));
        let ep = epochs_of(&sspans, s_from, s_to).ok_or_else(|| {
            CaseError::Setup(format!("{dname}: no store in strict mode's window"))
        })?;
        if trace_difference.is_some() || kspans.len() != sspans.len() {
            return Err(CaseError::Setup(format!(
                "{dname}: the kernel's trace does not agree with strict mode's ({}); its window cannot be carried over",
                trace_difference.as_deref().unwrap_or("epoch counts differ")
            )));
        }
        let kwin = window_of(&kt, &kspans, ep);
        let swin = window_of(&st, &sspans, ep);
        let en = |t: &Trace, (a, b): (usize, usize)| {
            enumerate(t, a, b, model, &Base(base)).map_err(|e| CaseError::Setup(e.to_string()))
        };
        let kernel_en = en(&kt, kwin)?;
        let strict_states = en(&st, (s_from, s_to))?.states.len();
        let strict_states_aligned = en(&st, swin)?.states.len();
        // Strict and recover mode on every state of the kernel's trace (host
        // activations: cheap), beside the kernel's sample below.
        let mut host_counts: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for s in &kernel_en.states {
            let img = state_image(base, &kt, s);
            for (col, mode) in [("strict", Mode::Strict), ("recover", Mode::Recover)] {
                let mut after = img.clone();
                let r = activate(
                    &mut after,
                    &Options {
                        mode,
                        data_crc: false,
                    },
                    &mut NoHooks,
                );
                *host_counts
                    .entry(col.into())
                    .or_default()
                    .entry(label(&r, *older_seq))
                    .or_default() += 1;
            }
        }
        // The states the kernel recovers: all, or `max_states` spread evenly.
        let n = kernel_en.states.len();
        let pick: Vec<usize> = if n <= max_states {
            (0..n).collect()
        } else {
            (0..max_states).map(|k| k * n / max_states).collect()
        };
        let mut rows = Vec::new();
        let mut boots = Vec::new();
        for (b, batch) in pick.chunks(qemu::MAX_IMAGES).enumerate() {
            if start.elapsed() > budget {
                break;
            }
            let dir = work.join(format!("{dname}-boot{b}"));
            std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
            let mut imgs = Vec::new();
            let mut sides = Vec::new();
            for &k in batch {
                let s = &kernel_en.states[k];
                let img = state_image(base, &kt, s);
                // Unique: two states may share a cut and a count of durable stores.
                let id = format!("s{k}-cut{}-{}", s.cut, s.pmem.len());
                let path = dir.join(format!("{id}.img"));
                write_sparse(&img, &path).map_err(io(format!("writing {}", path.display())))?;
                let mut after = img.clone();
                let sr = activate(&mut after, &strict(false), &mut NoHooks);
                let mut rimg = img.clone();
                let rr = activate(
                    &mut rimg,
                    &Options {
                        mode: Mode::Recover,
                        data_crc: false,
                    },
                    &mut NoHooks,
                );
                sides.push((
                    id.clone(),
                    label(&sr, *older_seq),
                    label(&rr, *older_seq),
                    sr,
                    after,
                ));
                imgs.push(BootImage {
                    name: id,
                    path,
                    data_crc: false,
                    workload: None,
                    backing: None,
                    out: None,
                });
            }
            // A boot that times out is a result too: the state in progress
            // hung the kernel (kept for `reproduce`), the later ones did not run.
            let (verdicts, console, seconds) =
                match qemu::boot(kernel, &imgs, &disk, &dir, RECOVERY_TIMEOUT) {
                    Ok(boot) => (boot.verdicts, boot.console, boot.seconds),
                    Err(qemu::BootError::Timeout { .. }) => {
                        let console = std::fs::read_to_string(dir.join("console.log"))
                            .map_err(io("reading a timed-out boot's console"))?;
                        let v = imgs
                            .iter()
                            .map(|i| qemu::verdict(&console, &i.name))
                            .collect();
                        (v, console, RECOVERY_TIMEOUT.as_secs_f64())
                    }
                    Err(e) => return Err(e.into()),
                };
            boots.push(seconds);
            tidy(&dir);
            let lockup = console
                .lines()
                .find(|l| {
                    l.contains("soft lockup")
                        || l.contains("hung_task")
                        || l.contains("blocked for more than")
                })
                .map(|l| l.trim().to_string());
            for ((img, v), (id, sl, rl, sr, strict_after)) in imgs.iter().zip(verdicts).zip(sides) {
                let started = console.contains(&format!("@@IMAGE {id} "));
                if !v.done {
                    let kernel = if started {
                        format!(
                            "hung (no end within {} s{})",
                            RECOVERY_TIMEOUT.as_secs(),
                            lockup
                                .as_deref()
                                .map(|l| format!("; {l}"))
                                .unwrap_or_default()
                        )
                    } else {
                        let _ = std::fs::remove_file(&img.path);
                        NOT_RUN.to_string()
                    };
                    rows.push(KernelStateRow {
                        id,
                        strict: sl,
                        recover: rl,
                        kernel,
                        kernel_agrees_with_strict: false,
                    });
                    continue;
                }
                let kafter = read_sparse(&img.path).map_err(io("reading the kernel's image"))?;
                let _ = std::fs::remove_file(&img.path);
                let strict_activated = sr.outcome != Outcome::Refused;
                let diff = first_difference(&strict_after, &kafter);
                let kernel = if !v.activated {
                    format!(
                        "refused ({})",
                        v.messages.last().cloned().unwrap_or_default()
                    )
                } else if diff.is_none() && strict_activated {
                    sl.clone()
                } else {
                    format!(
                        "activated, differs from strict{}",
                        diff.map(|d| format!(" at {d}")).unwrap_or_default()
                    )
                };
                let agrees = v.done && v.activated == strict_activated && diff.is_none();
                rows.push(KernelStateRow {
                    id,
                    strict: sl,
                    recover: rl,
                    kernel,
                    kernel_agrees_with_strict: agrees,
                });
            }
        }
        let counts = KernelDeviceRun::count(&rows);
        let total: f64 = boots.iter().sum();
        devices.push(KernelDeviceRun {
            device: dname.clone(),
            kernel_events: kt.len(),
            kernel_epochs: kspans.len(),
            trace_difference,
            kernel_window: kwin,
            all_states_host: host_counts,
            kernel_states: n,
            strict_states,
            strict_states_aligned,
            tried: rows.iter().filter(|r| r.ran()).count(),
            kernel_agrees: rows.iter().filter(|r| r.kernel_agrees_with_strict).count(),
            seconds_per_state: {
                let run = rows.iter().filter(|r| r.ran()).count();
                if run == 0 {
                    0.0
                } else {
                    total / run as f64
                }
            },
            counts,
            states: rows,
            boots,
        });
    }
    let _ = std::fs::remove_file(&disk);
    Ok(KernelRun {
        scenario: name.to_string(),
        trace_boot_seconds: tboot.seconds,
        devices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_carry_over_by_epochs() {
        // Strict: marker, 2 stores, fence, marker, store, fence, store.
        let mut s = Trace::new();
        s.push(Event::Marker { id: 1 });
        s.push_pmem_store(0, &[1; 8]);
        s.push_pmem_store(8, &[1; 8]);
        s.push(Event::PmemFlush);
        s.push(Event::Marker { id: 2 });
        s.push_pmem_store(16, &[1; 8]);
        s.push(Event::PmemFlush);
        s.push_pmem_store(24, &[1; 8]);
        let spans = epoch_spans(&s);
        assert_eq!(spans, [(1, 3), (5, 6), (7, 8)]);
        // The window from marker 2 to the end of the second epoch is epoch 1.
        assert_eq!(epochs_of(&spans, 4, 7), Some((1, 1)));
        assert_eq!(epochs_of(&spans, 0, 8), Some((0, 2)));
        assert_eq!(epochs_of(&spans, 3, 5), None, "no store between");
        // The kernel: the same epochs with more events (extra fences, narrower stores).
        let mut k = Trace::new();
        k.push(Event::PmemFlush);
        k.push_pmem_store(0, &[1; 4]);
        k.push_pmem_store(4, &[1; 4]);
        k.push_pmem_store(8, &[1; 8]);
        k.push(Event::PmemFlush);
        k.push(Event::PmemFlush);
        k.push_pmem_store(16, &[1; 8]);
        k.push(Event::PmemFlush);
        k.push_pmem_store(24, &[1; 8]);
        let kspans = epoch_spans(&k);
        assert_eq!(kspans, [(1, 4), (6, 7), (8, 9)]);
        assert_eq!(window_of(&k, &kspans, (1, 1)), (6, 8));
        assert_eq!(window_of(&k, &kspans, (0, 2)), (1, 9));
    }
}
