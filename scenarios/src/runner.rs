//! The scenario runner: for each device and mode, run the workload with tracing
//! on, enumerate the crash states the model allows, boot recovery on each (in
//! parallel, in fresh VMs), and check the outcomes against the expectations.

use crate::generate;
use crate::guest::{self, Recovery};
use crate::persistence::{self, BaseImage, CrashState, Event, Trace, Write};
use crate::recipe::{self, PreparedDevice};
use crate::result::{
    write_atomic, AppliedWrite, DeviceModeRun, Minimized, MinimizedWrite, ObservedCounts,
    RunResult, Shard, ShardInfo, StateResult, SCHEMA_VERSION,
};
use crate::spec::{Device, Expectation, Generator, Mode, Run, Scenario, Window};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmm::{SavedWindow, VmConfig};

/// What the runner needs besides the scenario.
#[derive(Debug)]
pub struct RunnerConfig {
    /// The guest kernel (`target/guest/pcache-guest`).
    pub kernel: PathBuf,
    /// Where this run's results go (`results/NAME/<timestamp>`).
    pub out_dir: PathBuf,
    /// Scratch space for images and traces (removed at the end).
    pub work_dir: PathBuf,
    /// Recovery boots run at once.
    pub jobs: usize,
    /// Time budget of one recovery boot.
    pub state_timeout: Duration,
    /// Time budget of the traced workload run.
    pub workload_timeout: Duration,
    /// How the (untraced) recovery boots run.
    pub recovery_vms: RecoveryVms,
}

/// How recovery boots run. Every choice gives the same results; they differ
/// in speed only (`cargo xtask bench` measures them side by side).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RecoveryVms {
    /// One `vmm::ForkServer` per worker thread, booted once to the guest's
    /// snapshot point and reset for each state; the guest's pmem fences are
    /// plain CPU fences (`pcache.fences=cpu`: a recovery boot is never cut,
    /// see the guest's `backends::set_cpu_fences`).
    #[default]
    ForkServer,
    /// The fork-server with every fence a virtio-pmem FLUSH exit, as in a
    /// fresh VM (to measure what the fences cost).
    ForkServerFlushFences,
    /// A fresh VM per state, with the recovery command line as it is
    /// (`--fresh`: the reference path).
    Fresh,
}

/// Progress callbacks (the command line draws a progress bar with them).
pub trait Progress: Sync {
    fn begin(&self, label: &str, states: usize);
    fn state_done(&self);
    fn end(&self);
    /// A state just checked violates its expectation (called before its
    /// `state_done`).
    fn violation_found(&self) {}
}

/// How a run goes besides its scenario: `explore`'s minimization, shards,
/// Ctrl-C. The default is a plain `cargo xtask scenario` run.
#[derive(Debug, Default)]
pub struct RunOptions<'a> {
    /// Run only this shard's states; pinned counts are not checked.
    pub shard: Option<Shard>,
    /// Minimize up to this many violating states per device and mode.
    pub minimize: usize,
    /// Most recovery boots one state's minimization may spend.
    pub minimize_boots: usize,
    /// Set (by a Ctrl-C handler) to stop: no state is started after it, the
    /// states done are kept and the result is marked partial.
    pub cancel: Option<&'a AtomicBool>,
    /// Recorded in the result as `config` (what shards must agree on).
    pub config: Option<serde_json::Value>,
    /// Save the images of at most this many violating states per device and
    /// mode (`None`: all; explore's thousands would fill the disk).
    pub save_limit: Option<usize>,
}

impl RunOptions<'_> {
    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// A progress sink that shows nothing.
#[derive(Debug)]
pub struct Quiet;

impl Progress for Quiet {
    fn begin(&self, _: &str, _: usize) {}
    fn state_done(&self) {}
    fn end(&self) {}
}

/// Why a scenario could not be run (as opposed to a state failing its expectation).
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Recipe(#[from] recipe::RecipeError),
    #[error("VM: {0}")]
    Vm(#[from] vmm::VmError),
    #[error("crash images: {0}")]
    Crash(#[from] vmm::crash::CrashError),
    #[error("{device}/{mode}: the workload run failed: {why}")]
    Workload {
        device: String,
        mode: Mode,
        why: String,
    },
    #[error("{device}/{mode}: the workload run left no traced window")]
    NoTrace { device: String, mode: Mode },
    #[error("{device}/{mode}: {why}")]
    Window {
        device: String,
        mode: Mode,
        why: WindowError,
    },
    #[error(transparent)]
    Enumerate(#[from] persistence::EnumerateError),
    #[error(transparent)]
    Generate(#[from] generate::GenerateError),
    /// The scenario names an image its generator does not make.
    #[error("expect.per-image names `{name}`, which the generator does not make (it makes: {})", known.join(", "))]
    UnknownImage { name: String, known: Vec<String> },
    /// A bug of the harness (not of the state): it panicked while checking a state.
    #[error("{label}: the harness panicked while checking state {state}: {why}")]
    HarnessPanic {
        label: String,
        state: usize,
        why: String,
    },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// What is saved with a violating state, for `cargo xtask reproduce`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SavedState {
    pub scenario: String,
    pub state: String,
    pub device: String,
    pub mode: Mode,
    /// The recovery command line the state was checked with.
    pub cmdline: String,
    pub outcome: String,
    pub violations: Vec<String>,
    /// Whether the state was usable (absent in states saved before it was recorded).
    #[serde(default)]
    pub usable: Option<bool>,
    /// Whether the recovery boot failed (timeout, panic, unreadable results);
    /// absent in states saved before it was recorded.
    #[serde(default)]
    pub failed: Option<bool>,
}

impl SavedState {
    /// How a replay differs from what was recorded (empty: it reproduces).
    pub fn differences(&self, rec: &Recovery) -> Vec<String> {
        let mut d = Vec::new();
        if rec.outcome() != self.outcome {
            d.push(format!(
                "outcome `{}` differs from the recorded `{}`",
                rec.outcome(),
                self.outcome
            ));
        }
        if let Some(u) = self.usable {
            if rec.usable() != u {
                d.push(format!("usable is {} (recorded {u})", rec.usable()));
            }
        }
        if let Some(f) = self.failed {
            if rec.failure.is_some() != f {
                d.push(match &rec.failure {
                    Some(why) => format!("recovery failed ({why}); it did not when recorded"),
                    None => "recovery finished cleanly; it failed when recorded".into(),
                });
            }
        }
        d
    }
}

/// Runs a whole scenario and writes its result file; returns the result.
pub fn run(
    name: &str,
    scenario: &Scenario,
    cfg: &RunnerConfig,
    progress: &dyn Progress,
) -> Result<RunResult, RunnerError> {
    run_with(name, scenario, cfg, progress, &RunOptions::default())
}

/// As [`run`], with the options of `explore`, shards and Ctrl-C.
pub fn run_with(
    name: &str,
    scenario: &Scenario,
    cfg: &RunnerConfig,
    progress: &dyn Progress,
    opts: &RunOptions,
) -> Result<RunResult, RunnerError> {
    let t0 = Instant::now();
    let started = now_rfc3339();
    let mut runs = Vec::new();
    let mut totals = Vec::new();
    'all: for device in &scenario.devices {
        for &mode in &scenario.modes {
            if opts.cancelled() {
                break 'all;
            }
            let expect = scenario
                .expect
                .iter()
                .find(|e| e.device == device.name && e.mode == mode);
            let dir = cfg.work_dir.join(format!("{}-{}", device.name, mode));
            let prepared = recipe::prepare(device, mode, &dir)?;
            let job = Job {
                name,
                scenario,
                device,
                mode,
                expect,
                prepared: &prepared,
                cfg,
                progress,
                opts,
                saved: AtomicUsize::new(0),
            };
            let (run, total) = match &scenario.run {
                Run::PowerCut {
                    workload,
                    window,
                    model,
                    faults,
                    pairs,
                } => {
                    let pairs = pairs.unwrap_or_default();
                    power_cut(&job, workload, window, model, faults, &pairs, &dir)?
                }
                Run::Images { generator } => images(&job, *generator)?,
            };
            runs.push(run);
            totals.push(total);
        }
    }
    let partial = opts.cancelled();
    let passed = !partial && runs.iter().all(DeviceModeRun::passed);
    let result = RunResult {
        schema_version: SCHEMA_VERSION,
        scenario: name.into(),
        started,
        elapsed_seconds: t0.elapsed().as_secs_f64(),
        runs,
        passed,
        partial,
        shard: opts.shard.map(|s| ShardInfo {
            index: s.index,
            count: s.count,
            states_total: totals,
        }),
        config: opts.config.clone(),
        kernel: None,
    };
    let path = cfg.out_dir.join("result.json");
    let json = serde_json::to_vec_pretty(&result).expect("results serialize");
    write_atomic(&path, &json).map_err(|error| RunnerError::Io { path, error })?;
    Ok(result)
}

/// One device in one mode of a scenario run.
struct Job<'a> {
    name: &'a str,
    scenario: &'a Scenario,
    device: &'a Device,
    mode: Mode,
    expect: Option<&'a Expectation>,
    prepared: &'a PreparedDevice,
    cfg: &'a RunnerConfig,
    progress: &'a dyn Progress,
    opts: &'a RunOptions<'a>,
    /// Violating states saved so far.
    saved: AtomicUsize,
}

impl Job<'_> {
    fn label(&self) -> String {
        format!("{}/{}", self.device.name, self.mode)
    }

    /// The guest command line of every recovery boot.
    fn recovery_line(&self) -> String {
        guest::cmdline(&self.scenario.recovery, self.mode, false)
    }

    /// Whether one more violating state may be saved (`RunOptions::save_limit`).
    fn may_save(&self) -> bool {
        let n = self.saved.fetch_add(1, Ordering::Relaxed);
        self.opts.save_limit.is_none_or(|max| n < max)
    }

    /// The indices of the `total` states this run checks (its shard's).
    fn picked(&self, total: usize) -> Vec<usize> {
        (0..total)
            .filter(|&i| self.opts.shard.is_none_or(|s| s.picks(i)))
            .collect()
    }

    /// The run of this device and mode, counted and checked against the
    /// pinned counts (not in a shard or an interrupted run: they cannot know
    /// the totals); `t0` is when its recovery boots started.
    fn finish(
        &self,
        model: serde_json::Value,
        counts: ObservedCounts,
        t0: Instant,
        states: Vec<StateResult>,
    ) -> DeviceModeRun {
        let unpinned = self.expect.map(|e| Expectation {
            counts: None,
            ..e.clone()
        });
        let expect = if self.opts.shard.is_some() || self.opts.cancelled() {
            unpinned.as_ref()
        } else {
            self.expect
        };
        let mut run = DeviceModeRun {
            device: self.device.name.clone(),
            mode: self.mode,
            model,
            counts,
            recovery_seconds: t0.elapsed().as_secs_f64(),
            prefill: self.prepared.prefill.clone(),
            states,
            violations: vec![],
            timeline: None,
        };
        run.finish(expect);
        run
    }

    /// Saves a violating state's images and what is needed to replay it.
    fn save_state(
        &self,
        images: vmm::CrashImages,
        st: &mut StateResult,
    ) -> Result<(), RunnerError> {
        // Image-set ids contain '/' (`magic/stale-crc`): one folder per state.
        let dir = self.cfg.out_dir.join(st.id.replace('/', "_"));
        std::fs::create_dir_all(&dir).map_err(|error| RunnerError::Io {
            path: dir.clone(),
            error,
        })?;
        // Temporary names, then renames: an interrupted save leaves no image
        // that looks complete (state.json, written last, marks a whole state).
        let (pmem_tmp, disk_tmp) = (dir.join(".pmem.img.tmp"), dir.join(".disk.img.tmp"));
        images.write_files(&pmem_tmp, &disk_tmp)?;
        for (tmp, name) in [(&pmem_tmp, "pmem.img"), (&disk_tmp, "disk.img")] {
            std::fs::rename(tmp, dir.join(name)).map_err(|error| RunnerError::Io {
                path: dir.join(name),
                error,
            })?;
        }
        let meta = SavedState {
            scenario: self.name.into(),
            state: st.id.clone(),
            device: self.device.name.clone(),
            mode: self.mode,
            cmdline: self.recovery_line(),
            outcome: st.outcome.clone(),
            violations: st.violations.clone(),
            usable: Some(st.usable),
            failed: Some(st.failure.is_some()),
        };
        let path = dir.join("state.json");
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(&meta).expect("serializes"),
        )
        .map_err(|error| RunnerError::Io { path, error })?;
        st.saved = Some(dir.display().to_string());
        Ok(())
    }
}

/// What checking one crash state of a power-cut run needs.
struct CutCheck<'a> {
    job: &'a Job<'a>,
    saved: &'a SavedWindow,
    line: String,
    /// What the durability rule judges (`None`: recovery has no `verify` step).
    judged: Option<Judged>,
    /// Workload ops done before each trace position.
    done: Vec<usize>,
}

/// The ops of a power-cut run the durability rule judges a state against.
struct Judged {
    prefill: Vec<workload::Op>,
    workload: Vec<workload::Op>,
    recovery: Vec<workload::Op>,
    /// `durability::judged_ops` with every workload op done.
    full: (Vec<workload::Op>, usize),
    /// The prefill, judged once for every state.
    settled: workload::Settled,
}

impl CutCheck<'_> {
    /// Boots recovery on the window's base plus exactly `writes` at `cut`,
    /// and checks the state's expectation.
    fn check(&self, id: &str, cut: usize, writes: &[Write]) -> Result<StateResult, RunnerError> {
        let job = self.job;
        let images = self.saved.build(cut as u64, writes)?;
        let applied_refs = images.applied.clone();
        let mut st = recover(
            images.pmem,
            images.disk,
            id,
            &self.line,
            job.prepared.older_seq,
            job.cfg,
        )?;
        st.cut = Some(cut);
        let (listed, settled) = applied_at(&self.saved.trace, cut, &applied_refs);
        (st.applied, st.applied_omitted) = bounded(listed);
        st.settled = Some(settled);
        if let Some(j) = &self.judged {
            let n = self.done[cut.min(self.done.len() - 1)];
            let w = j.workload.len();
            let d = if n >= w || j.recovery.is_empty() {
                let acked = j.full.1 - (w - n.min(w));
                crate::durability::judge_settled(&st.reports, &j.settled, &j.full.0, acked)
            } else {
                let (ops, acked) =
                    crate::durability::judged_ops(&j.prefill, &j.workload, &j.recovery, n);
                crate::durability::judge_settled(&st.reports, &j.settled, &ops, acked)
            };
            crate::durability::condense_verifies(&mut st.reports, &d);
            st.durability = Some(d);
        }
        if let Some(e) = job.expect {
            st.check(e);
        }
        Ok(st)
    }

    /// Delta debugging (ddmin) over the state's applied writes pending at its
    /// cut: the smallest set of them that, with every write a barrier covered,
    /// still violates. `None` when cancelled.
    fn minimize(
        &self,
        st: &StateResult,
        applied: &[Write],
    ) -> Result<Option<Minimized>, RunnerError> {
        let cut = st.cut.expect("a power-cut state has a cut");
        let events = self.saved.trace.events();
        let pending: std::collections::HashSet<usize> =
            persist::pending_all(events, cut).into_iter().collect();
        let (universe, fixed): (Vec<Write>, Vec<Write>) = applied
            .iter()
            .partition(|w| pending.contains(&(w.event as usize)));
        let boots = std::cell::Cell::new(0usize);
        let violates = |keep: &[Write]| -> Result<Option<bool>, RunnerError> {
            if self.job.opts.cancelled() {
                return Ok(None);
            }
            boots.set(boots.get() + 1);
            let mut writes = fixed.clone();
            writes.extend_from_slice(keep);
            let cand = self.check(&st.id, cut, &writes)?;
            Ok(Some(!cand.violations.is_empty()))
        };
        let budget = self.job.opts.minimize_boots.max(1);
        let Some(kept) = ddmin(&universe, budget, violates)? else {
            return Ok(None);
        };
        let writes = kept
            .iter()
            .map(|w| MinimizedWrite {
                write: applied_one(&self.saved.trace, *w).expect("a write event"),
                context: write_context(&self.saved.trace, *w),
            })
            .collect();
        Ok(Some(Minimized {
            writes,
            boots: boots.get(),
            from: universe.len(),
        }))
    }
}

fn power_cut(
    job: &Job,
    workload: &str,
    window: &Window,
    model: &persistence::Model,
    faults: &vmm::BlkFaults,
    pairs: &persistence::Pairs,
    dir: &Path,
) -> Result<(DeviceModeRun, usize), RunnerError> {
    let Job {
        device,
        mode,
        prepared,
        cfg,
        opts,
        ..
    } = *job;
    let fail = |why: String| RunnerError::Workload {
        device: device.name.clone(),
        mode,
        why,
    };

    // The traced workload run: tracing starts right before the workload, so
    // everything the recipe left is the window's durable base.
    let steps = format!("trace:on;{workload};trace:off");
    let mut vm = VmConfig::new(
        &cfg.kernel,
        guest::cmdline(&steps, mode, true),
        &prepared.pmem,
        &prepared.disk,
    )?;
    vm.timeout = cfg.workload_timeout;
    vm.blk_faults = faults.clone();
    let out = vmm::run(vm)?;
    let rec = Recovery::from_run(&out);
    if let Some(f) = rec.failure {
        return Err(fail(f));
    }
    let window_mem = out
        .windows
        .into_iter()
        .next()
        .ok_or_else(|| RunnerError::NoTrace {
            device: device.name.clone(),
            mode,
        })?;
    let saved = window_mem.save(&dir.join("window"))?;
    let windows = cut_ranges(&saved.trace, window).map_err(|why| RunnerError::Window {
        device: device.name.clone(),
        mode,
        why,
    })?;
    let base = WindowBase::new(&saved);
    let e = persistence::enumerate_paired(&saved.trace, &windows, model, pairs, &base)?;
    // The durability rule judges each state against the ops acknowledged
    // before its cut (a scenario file that loaded has valid ops).
    let judge = !crate::spec::verify_ranges(&job.scenario.recovery).is_empty();
    let judged = if judge {
        let workload = guest_cmdline::ops_of_steps(workload).map_err(&fail)?;
        let prefill = device.judged_prefill_ops().map_err(&fail)?;
        let recovery = guest_cmdline::ops_of_steps(&job.scenario.recovery).map_err(&fail)?;
        // The judged ops depend on the cut only through the workload ops done
        // before it; most states share one list.
        let full = crate::durability::judged_ops(&prefill, &workload, &recovery, usize::MAX);
        let settled = crate::durability::settled_prefill(&prefill, &full.0);
        Some(Judged {
            prefill,
            workload,
            recovery,
            full,
            settled,
        })
    } else {
        None
    };
    let checker = CutCheck {
        job,
        saved: &saved,
        line: job.recovery_line(),
        judged,
        done: crate::durability::ops_done_before(&saved.trace),
    };

    // Recovery boots, in parallel.
    let t0 = Instant::now();
    let picked = job.picked(e.states.len());
    let mut states = parallel_states(
        &job.label(),
        &picked,
        cfg.jobs,
        job.progress,
        opts.cancel,
        |i| {
            let state = &e.states[i];
            let id = format!("{}-{}-{:04}", device.name, mode, i);
            let mut writes = state.pmem.clone();
            writes.extend_from_slice(&state.disk);
            let mut st = checker.check(&id, state.cut, &writes)?;
            if !st.violations.is_empty() && job.may_save() {
                // Built again: recovery ran on the first copy-on-write views and may
                // have written them.
                let images = build_images(&saved, state)?;
                job.save_state(images, &mut st)?;
            }
            Ok(st)
        },
    )?;
    let recovery_seconds = t0.elapsed();

    // The first violating states, minimized (each by boots of its own).
    let violating = states.iter().filter(|s| !s.violations.is_empty()).count();
    if opts.minimize > 0 && violating > 0 && !opts.cancelled() {
        let chosen: Vec<usize> = (0..states.len())
            .filter(|&k| !states[k].violations.is_empty())
            .take(opts.minimize)
            .collect();
        // No state is missing (not cancelled): `states[k]` is `picked[k]`'s.
        let label = format!("{} minimize", job.label());
        let results = parallel_map(&label, &chosen, cfg.jobs, job.progress, None, |k| {
            let state = &e.states[picked[k]];
            let mut writes = state.pmem.clone();
            writes.extend_from_slice(&state.disk);
            // The applied writes, as `SavedWindow::build` orders them.
            writes.sort_unstable();
            writes.dedup();
            checker.minimize(&states[k], &writes)
        })?;
        for (k, m) in chosen.into_iter().zip(results) {
            states[k].minimized = m.flatten();
        }
    }

    let model = serde_json::json!({
        "model": model,
        "pairs": pairs,
        "window": window,
        "cut-positions": [windows[0].0, windows[windows.len() - 1].1],
        "windows": windows.len(),
        "trace-events": saved.trace.len(),
    });
    let counts = ObservedCounts {
        duplicates: e.duplicates,
        unchanged_writes: e.unchanged_writes,
        pairs_full: e.pairs_full,
        pairs_tried: e.pairs_tried,
        ..Default::default()
    };
    // Minimization's boots are not the states' own.
    let mut run = job.finish(model, counts, t0, states);
    run.recovery_seconds = recovery_seconds.as_secs_f64();
    run.timeline = Some(crate::result::Timeline::of_trace(&saved.trace, &windows));
    Ok((run, e.states.len()))
}

/// A scenario without a power cut: recovery on each generated variant of the
/// device's image.
fn images(job: &Job, generator: Generator) -> Result<(DeviceModeRun, usize), RunnerError> {
    let Job {
        expect,
        prepared,
        cfg,
        opts,
        ..
    } = *job;
    let io = |error| RunnerError::Io {
        path: prepared.pmem.clone(),
        error,
    };
    let base = pcache::pmem::FilePmem::open_read_only(&prepared.pmem).map_err(io)?;
    let variants = generate::variants(generator, &base)?;
    if let Some(e) = expect {
        check_image_names(e, &variants)?;
    }
    // Each variant runs on copy-on-write views of the prepared images.
    let open = |v: &generate::Variant| -> Result<vmm::CrashImages, RunnerError> {
        let pmem = vmm::PmemRegion::open(&prepared.pmem, vmm::ImageMode::CopyOnWrite)
            .map_err(vmm::VmError::from)?;
        for (off, bytes) in &v.patches {
            pmem.write(*off, bytes).map_err(io)?;
        }
        let disk = vmm::DiskImage::open(&prepared.disk, vmm::ImageMode::CopyOnWrite)
            .map_err(vmm::VmError::from)?;
        Ok(vmm::CrashImages {
            pmem,
            disk,
            applied: vec![],
        })
    };
    let line = job.recovery_line();
    let t0 = Instant::now();
    let picked = job.picked(variants.len());
    let states = parallel_states(
        &job.label(),
        &picked,
        cfg.jobs,
        job.progress,
        opts.cancel,
        |i| {
            let v = &variants[i];
            let images = open(v)?;
            let mut st = recover(
                images.pmem,
                images.disk,
                &v.name,
                &line,
                prepared.older_seq,
                cfg,
            )?;
            st.applied = v
                .patches
                .iter()
                .map(|(offset, bytes)| AppliedWrite::Patch {
                    offset: *offset,
                    bytes: bytes.iter().map(|b| format!("{b:02x}")).collect(),
                })
                .collect();
            if let Some(e) = expect {
                st.check(e);
                if let Some(want) = e.per_image.get(&v.name) {
                    let got = st.detailed_outcome();
                    if want.to_string() != got {
                        st.violations
                            .push(format!("expected `{want}`, got `{got}`"));
                    }
                }
            }
            if !st.violations.is_empty() && job.may_save() {
                job.save_state(open(v)?, &mut st)?;
            }
            Ok(st)
        },
    )?;
    let model = serde_json::json!({ "generator": generator });
    let total = variants.len();
    Ok((
        job.finish(model, ObservedCounts::default(), t0, states),
        total,
    ))
}

/// Every image `expect.per-image` names must be one the generator makes.
fn check_image_names(e: &Expectation, variants: &[generate::Variant]) -> Result<(), RunnerError> {
    let known: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
    match e.per_image.keys().find(|k| !known.contains(&k.as_str())) {
        Some(missing) => Err(RunnerError::UnknownImage {
            name: missing.clone(),
            known: known.iter().map(|k| k.to_string()).collect(),
        }),
        None => Ok(()),
    }
}

/// Runs `check(i)` for each `i` of `items` on `jobs` threads; the first error
/// stops the rest, and so does `cancel` (the states done are returned, in
/// the order of `items`).
fn parallel_states(
    label: &str,
    items: &[usize],
    jobs: usize,
    progress: &dyn Progress,
    cancel: Option<&AtomicBool>,
    check: impl Fn(usize) -> Result<StateResult, RunnerError> + Sync,
) -> Result<Vec<StateResult>, RunnerError> {
    let done = parallel_map(label, items, jobs, progress, cancel, |i| {
        let st = check(i)?;
        if !st.violations.is_empty() {
            progress.violation_found();
        }
        Ok(st)
    })?;
    Ok(done.into_iter().flatten().collect())
}

/// Runs `f(i)` for each `i` of `items` on `jobs` threads, with a progress
/// step per item; the first error stops the rest, and so does `cancel`
/// (items not started are `None`). A panic in `f` is an error naming the item.
fn parallel_map<T: Send>(
    label: &str,
    items: &[usize],
    jobs: usize,
    progress: &dyn Progress,
    cancel: Option<&AtomicBool>,
    f: impl Fn(usize) -> Result<T, RunnerError> + Sync,
) -> Result<Vec<Option<T>>, RunnerError> {
    let n = items.len();
    progress.begin(label, n);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    let first_error: Mutex<Option<RunnerError>> = Mutex::new(None);
    let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n || first_error.lock().unwrap().is_some() || cancelled() {
                    break;
                }
                let i = items[k];
                // A panic in the harness while checking one state ends the
                // run with an error naming the state, not a crash of the
                // whole command (which would lose every other result).
                let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i)))
                    .unwrap_or_else(|p| {
                        let why = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic".into());
                        Err(RunnerError::HarnessPanic {
                            label: label.into(),
                            state: i,
                            why,
                        })
                    });
                match checked {
                    Ok(st) => results.lock().unwrap()[k] = Some(st),
                    Err(err) => {
                        first_error.lock().unwrap().get_or_insert(err);
                    }
                }
                progress.state_done();
            });
        }
    });
    progress.end();
    if let Some(err) = first_error.into_inner().unwrap() {
        return Err(err);
    }
    Ok(results.into_inner().unwrap())
}

/// The crash images of a state: the window's base plus its durable writes.
fn build_images(saved: &SavedWindow, state: &CrashState) -> Result<vmm::CrashImages, RunnerError> {
    let mut writes = state.pmem.clone();
    writes.extend_from_slice(&state.disk);
    Ok(saved.build(state.cut as u64, &writes)?)
}

/// Boots recovery on a pair of images and reads what it did.
fn recover(
    pmem: vmm::PmemRegion,
    disk: vmm::DiskImage,
    id: &str,
    cmdline: &str,
    older_seq: Option<u8>,
    cfg: &RunnerConfig,
) -> Result<StateResult, RunnerError> {
    let mut fork = vmm::ForkConfig::new(&cfg.kernel, cmdline);
    fork.timeout = cfg.state_timeout;
    // The runner reads the guest's reports, never the images a run leaves.
    fork.pmem_writes_back = false;
    let out = match cfg.recovery_vms {
        RecoveryVms::Fresh => vmm::run(fork.fresh(pmem, disk))?,
        RecoveryVms::ForkServer => {
            fork.cmdline = format!("{cmdline} {}=cpu", protocol::CMDLINE_FENCES_KEY);
            fork_run(fork, pmem, disk)?
        }
        RecoveryVms::ForkServerFlushFences => fork_run(fork, pmem, disk)?,
    };
    Ok(state_result(id, &Recovery::from_run(&out), older_seq))
}

thread_local! {
    /// This worker thread's fork-server (see [`RecoveryVms::ForkServer`]).
    static FORK_SERVER: RefCell<Option<vmm::ForkServer>> = const { RefCell::new(None) };
}

/// One run on this thread's fork-server, made anew when the configuration
/// changes (another device, mode or scenario).
fn fork_run(
    config: vmm::ForkConfig,
    pmem: vmm::PmemRegion,
    disk: vmm::DiskImage,
) -> Result<vmm::RunOutcome, vmm::VmError> {
    FORK_SERVER.with(|s| {
        let mut s = s.borrow_mut();
        if s.as_ref().is_none_or(|f| *f.config() != config) {
            *s = Some(vmm::ForkServer::new(config));
        }
        s.as_mut().expect("set above").run(pmem, disk)
    })
}

/// What a recovery boot made of a state (before its expectation is checked).
/// A boot that did not finish cleanly is recorded in `failure` and is a
/// violation whatever the expectation.
fn state_result(id: &str, rec: &Recovery, older_seq: Option<u8>) -> StateResult {
    let first = rec.starts.first();
    let mut st = StateResult {
        id: id.into(),
        cut: None,
        applied: vec![],
        settled: None,
        applied_omitted: None,
        outcome: rec.outcome(),
        reason: first.and_then(|s| s.message.clone()),
        refusal: first.and_then(|s| s.refusal_kind().map(str::to_string)),
        usable: rec.usable(),
        older_cache_back: rec.older_cache_back(older_seq),
        reports: rec.steps.clone(),
        failure: rec.failure.clone(),
        verdict: Default::default(),
        violations: vec![],
        saved: None,
        durability: None,
        minimized: None,
    };
    if let Some(f) = &rec.failure {
        st.violations
            .push(format!("recovery did not finish cleanly: {f}"));
    }
    st
}

/// The applied writes as the result file lists them.
fn applied(trace: &Trace, writes: &[vmm::WriteRef]) -> Vec<AppliedWrite> {
    writes
        .iter()
        .filter_map(|w| applied_one(trace, *w))
        .collect()
}

/// A power-cut state's applied writes as the result file lists them: those
/// a barrier of their device covered before `cut` are only counted (every
/// model makes all of them durable; its states hold those that change the
/// image), and those still pending at the cut, the model's choice, listed.
fn applied_at(trace: &Trace, cut: usize, writes: &[vmm::WriteRef]) -> (Vec<AppliedWrite>, usize) {
    let pending: std::collections::HashSet<usize> = persist::pending_all(trace.events(), cut)
        .into_iter()
        .collect();
    let open: Vec<vmm::WriteRef> = writes
        .iter()
        .copied()
        .filter(|w| pending.contains(&(w.event as usize)))
        .collect();
    let settled = writes.len() - open.len();
    (applied(trace, &open), settled)
}

/// The first `APPLIED_LISTED_MAX` of a state's listed writes, and how many
/// more there were.
fn bounded(mut listed: Vec<AppliedWrite>) -> (Vec<AppliedWrite>, Option<usize>) {
    let max = crate::result::APPLIED_LISTED_MAX;
    let omitted = listed.len().checked_sub(max).filter(|&n| n > 0);
    listed.truncate(max);
    (listed, omitted)
}

/// One applied write as the result file lists it (`None`: not a write event).
fn applied_one(trace: &Trace, w: vmm::WriteRef) -> Option<AppliedWrite> {
    match trace.get(w.event)? {
        Event::PmemStore { offset, len, value } => Some(AppliedWrite::Pmem {
            event: w.event as usize,
            offset: *offset,
            len: *len,
            value: format!("{value:#018x}"),
        }),
        Event::BlkWrite { sector, .. } => Some(AppliedWrite::Disk {
            event: w.event as usize,
            sector: sector + w.part as u64,
        }),
        _ => None,
    }
}

/// What a crash point's sequence writes (`docs/format.md` §10.3).
fn crash_point_name(n: u32) -> &'static str {
    match n {
        1 => "zeroing cache_info and cache_ctrl",
        2 => "superblock",
        3 => "segment format",
        4 => "cache_info update",
        5 => "tail update",
        6 => "seg_info update",
        7 => "segment generation",
        8 => "key-set append",
        9 => "log segment switch",
        10 => "data write",
        11 => "writeback",
        12 => "GC",
        _ => "unknown",
    }
}

/// Where a write is in the trace, for people: the innermost crash-point
/// section around it (`C<n>-begin` … `C<n>-end`), its index among that
/// section's writes of its kind (stores, or disk sectors), and the workload
/// op it belongs to (ops counted by their op-done markers), e.g.
/// `C8-begin (key-set append) … store 3 of 8 … C8-end; op 2`.
pub fn write_context(trace: &Trace, w: vmm::WriteRef) -> String {
    use protocol::markers::{decode_crash_point, decode_op_done};
    let events = trace.events();
    let at = w.event as usize;
    let is_disk = matches!(events.get(at), Some(Event::BlkWrite { .. }));
    let op = events[..at.min(events.len())]
        .iter()
        .filter(|e| matches!(e, Event::Marker { id } if decode_op_done(*id).is_some()))
        .count();
    // The innermost open section at `at`: walk back, skipping sections that
    // closed before it (nesting: C3 holds a C7 and a C6).
    let mut closed: Vec<u32> = Vec::new();
    let mut begin = None;
    for (i, e) in events[..at.min(events.len())].iter().enumerate().rev() {
        if let Event::Marker { id } = e {
            match decode_crash_point(*id) {
                Some((n, true)) => closed.push(n),
                Some((n, false)) => {
                    if closed.last() == Some(&n) {
                        closed.pop();
                    } else {
                        begin = Some((i, n));
                        break;
                    }
                }
                None => {}
            }
        }
    }
    let Some((b, n)) = begin else {
        return format!("outside any crash point; op {op}");
    };
    // Its end: the first C<n>-end after `b` at the same depth.
    let mut depth = 0usize;
    let mut end = None;
    for (i, e) in events.iter().enumerate().skip(b + 1) {
        if let Event::Marker { id } = e {
            match decode_crash_point(*id) {
                Some((m, false)) if m == n => depth += 1,
                Some((m, true)) if m == n => {
                    if depth == 0 {
                        end = Some(i);
                        break;
                    }
                    depth -= 1;
                }
                _ => {}
            }
        }
    }
    // Units of the section of the write's kind: stores, or sectors.
    let unit = |e: &Event| -> u64 {
        match e {
            Event::PmemStore { .. } if !is_disk => 1,
            Event::BlkWrite { len, .. } if is_disk => u64::from(*len) / persistence::SECTOR as u64,
            _ => 0,
        }
    };
    let stop = end.unwrap_or(events.len());
    let index: u64 = events[b + 1..at].iter().map(unit).sum::<u64>() + u64::from(w.part) + 1;
    let total: u64 = events[b + 1..stop].iter().map(unit).sum();
    let what = if is_disk { "sector" } else { "store" };
    let tail = match end {
        Some(_) => format!("C{n}-end"),
        None => "(no C{n}-end: the trace ends first)".replace("{n}", &n.to_string()),
    };
    format!(
        "C{n}-begin ({}) … {what} {index} of {total} … {tail}; op {op}",
        crash_point_name(n)
    )
}

/// Delta debugging (Zeller's ddmin) for a 1-minimal subset of `items` that
/// still `violates`: no single item of the result can be dropped. The empty
/// set is tried first (a state that violates with none of them pending).
/// `violates` returns `None` to stop (cancelled): then so does this. At most
/// `budget` calls are made; past it the smallest violating set found so far
/// is returned. Results are cached, so no subset is tried twice.
pub fn ddmin<T: Copy + Ord, E>(
    items: &[T],
    budget: usize,
    mut violates: impl FnMut(&[T]) -> Result<Option<bool>, E>,
) -> Result<Option<Vec<T>>, E> {
    let mut cache: std::collections::BTreeMap<Vec<T>, bool> = Default::default();
    let mut calls = 0usize;
    let cancelled = std::cell::Cell::new(false);
    // `Ok(None)`: stop (out of budget, or cancelled).
    let mut test = |c: &[T]| -> Result<Option<bool>, E> {
        if let Some(&v) = cache.get(c) {
            return Ok(Some(v));
        }
        if calls >= budget {
            return Ok(None);
        }
        calls += 1;
        let v = violates(c)?;
        match v {
            Some(v) => {
                cache.insert(c.to_vec(), v);
            }
            None => cancelled.set(true),
        }
        Ok(v)
    };
    let mut c: Vec<T> = items.to_vec();
    if test(&[])? == Some(true) {
        return Ok(Some(vec![]));
    }
    let mut n = 2usize;
    'outer: while c.len() >= 2 {
        let n_eff = n.min(c.len());
        let chunks: Vec<Vec<T>> = (0..n_eff)
            .map(|k| c[k * c.len() / n_eff..(k + 1) * c.len() / n_eff].to_vec())
            .collect();
        // Reduce to a subset.
        for chunk in &chunks {
            match test(chunk)? {
                Some(true) => {
                    c = chunk.clone();
                    n = 2;
                    continue 'outer;
                }
                Some(false) => {}
                None => break 'outer,
            }
        }
        // Reduce to a complement (with two chunks, the complements are the chunks).
        if n_eff > 2 {
            for k in 0..n_eff {
                let rest: Vec<T> = chunks
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != k)
                    .flat_map(|(_, ch)| ch.iter().copied())
                    .collect();
                match test(&rest)? {
                    Some(true) => {
                        c = rest;
                        n = (n_eff - 1).max(2);
                        continue 'outer;
                    }
                    Some(false) => {}
                    None => break 'outer,
                }
            }
        }
        if n_eff >= c.len() {
            break;
        }
        n = (2 * n_eff).min(c.len());
    }
    Ok(if cancelled.get() { None } else { Some(c) })
}

/// Boots recovery on a pair of image files (copy-on-write views: the files are
/// never modified) with the guest steps of `cmdline`; `console` echoes the
/// guest's console to the terminal.
pub fn replay(
    kernel: &Path,
    pmem: &Path,
    disk: &Path,
    cmdline: &str,
    timeout: Duration,
    console: bool,
) -> Result<Recovery, RunnerError> {
    let line = if console {
        format!("{cmdline} {}", protocol::CMDLINE_CONSOLE_FLAG)
    } else {
        cmdline.to_string()
    };
    let mut vm = VmConfig::new(kernel, line, pmem, disk)?;
    vm.timeout = timeout;
    vm.console.terminal = console;
    Ok(Recovery::from_run(&vmm::run(vm)?))
}

/// Replays a state saved by a run (`results/NAME/<run>/<state>`).
pub fn replay_saved(
    kernel: &Path,
    dir: &Path,
    timeout: Duration,
    console: bool,
) -> Result<(SavedState, Recovery), RunnerError> {
    let path = dir.join("state.json");
    let text = std::fs::read(&path).map_err(|error| RunnerError::Io {
        path: path.clone(),
        error,
    })?;
    let meta: SavedState = serde_json::from_slice(&text).map_err(|e| RunnerError::Io {
        path,
        error: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    let rec = replay(
        kernel,
        &dir.join("pmem.img"),
        &dir.join("disk.img"),
        &meta.cmdline,
        timeout,
        console,
    )?;
    Ok((meta, rec))
}

/// Why a window does not fit a trace.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("window ends at {to}, after the trace's {len} events")]
    PastTrace { to: usize, len: usize },
    #[error("marker {0} is not in the trace")]
    MissingMarker(String),
    #[error("marker {to} is not in the trace after {from}")]
    MissingMarkerAfter { to: String, from: String },
}

/// The cut positions `(start, end)` a window allows in a trace (the first
/// occurrence of a marker window, even with `every`).
pub fn cut_range(trace: &Trace, window: &Window) -> Result<(usize, usize), WindowError> {
    cut_ranges(trace, window).map(|r| r[0])
}

/// The ranges of cut positions `(start, end)` a window allows in a trace:
/// one, or with `between-markers.every` one per occurrence of `from`.
pub fn cut_ranges(trace: &Trace, window: &Window) -> Result<Vec<(usize, usize)>, WindowError> {
    let find = |id: u32, from: usize| {
        trace.events()[from..]
            .iter()
            .position(|e| *e == Event::Marker { id })
            .map(|i| i + from)
    };
    match window {
        Window::Everything => Ok(vec![(0, trace.len())]),
        Window::TracePositions { from, to } => {
            if *to > trace.len() {
                return Err(WindowError::PastTrace {
                    to: *to,
                    len: trace.len(),
                });
            }
            Ok(vec![(*from, *to)])
        }
        Window::BetweenMarkers { from, to, every } => {
            let name = |m: &crate::spec::MarkerName| String::from(m.clone());
            let mut ranges = Vec::new();
            let mut at = 0;
            while let Some(a) = find(from.0, at) {
                let b = find(to.0, a).ok_or_else(|| WindowError::MissingMarkerAfter {
                    to: name(to),
                    from: name(from),
                })?;
                // From before the first marker's sequence to after the last one's.
                ranges.push((a, b + 1));
                if !every {
                    break;
                }
                at = b + 1;
            }
            if ranges.is_empty() {
                return Err(WindowError::MissingMarker(name(from)));
            }
            Ok(ranges)
        }
    }
}

/// The window's frozen base, read through a small page cache.
struct WindowBase<'a> {
    saved: &'a SavedWindow,
    pages: RefCell<HashMap<u64, Box<[u8]>>>,
}

const PAGE: u64 = 4096;

impl<'a> WindowBase<'a> {
    fn new(saved: &'a SavedWindow) -> Self {
        WindowBase {
            saved,
            pages: RefCell::new(HashMap::new()),
        }
    }
}

impl WindowBase<'_> {
    /// Runs `f` on the base's page holding `off` (read once, then cached).
    fn with_page<T>(&self, off: u64, f: impl FnOnce(&[u8]) -> T) -> T {
        let page = off / PAGE;
        let mut pages = self.pages.borrow_mut();
        let p = pages.entry(page).or_insert_with(|| {
            let mut buf = vec![0u8; PAGE as usize].into_boxed_slice();
            // The trace only holds stores inside the region; a short read at
            // the region's end leaves zeros, which no store can match anyway.
            let _ = self.saved.base_pmem_read(page * PAGE, &mut buf);
            buf
        });
        f(p)
    }
}

impl BaseImage for WindowBase<'_> {
    fn pmem_byte(&self, off: u64) -> u8 {
        self.with_page(off, |p| p[(off % PAGE) as usize])
    }

    fn pmem_word(&self, word: u64) -> [u8; 8] {
        let off = word * 8;
        self.with_page(off, |p| {
            let at = (off % PAGE) as usize;
            p[at..at + 8].try_into().expect("8 bytes within a page")
        })
    }

    fn disk_sector(&self, sector: u64) -> Vec<u8> {
        let mut buf = vec![0u8; persistence::SECTOR];
        let _ = self
            .saved
            .base_disk_read(sector * persistence::SECTOR as u64, &mut buf);
        buf
    }
}

/// The current UTC time, RFC 3339 (seconds).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days,
/// so that no date crate is needed for one timestamp).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::MarkerName;

    #[test]
    fn a_states_settled_writes_are_counted_and_its_pending_ones_listed() {
        let mut t = Trace::new();
        let a = t.push_pmem_store(0, &[1; 8]);
        let d = t.push_blk_write(4, &[2; 1024]);
        t.push(Event::PmemFlush);
        let b = t.push_pmem_store(8, &[3; 8]);
        let c = t.push_pmem_store(16, &[4; 8]);
        let cut = t.len();
        let w = |event, part| vmm::WriteRef { event, part };
        // The disk has had no flush: both its sectors are pending.
        let all = [w(a, 0), w(d, 0), w(d, 1), w(b, 0), w(c, 0)];
        let (listed, settled) = applied_at(&t, cut, &all);
        assert_eq!((listed.len(), settled), (4, 1));
        let (listed, settled) = applied_at(&t, cut, &[w(a, 0), w(c, 0)]);
        assert_eq!(settled, 1);
        assert!(
            matches!(listed[..], [AppliedWrite::Pmem { event, .. }] if event == c as usize),
            "{listed:?}"
        );
        // Thousands pending: the first APPLIED_LISTED_MAX are listed.
        let many = |n: usize| (0..n).map(|k| w(k as u64, 0)).collect::<Vec<_>>();
        let max = crate::result::APPLIED_LISTED_MAX;
        let mut big = Trace::new();
        for k in 0..max as u64 + 5 {
            big.push_pmem_store(8 * k, &[1; 8]);
        }
        let (listed, settled) = applied_at(&big, big.len(), &many(max + 5));
        let (kept, omitted) = bounded(listed);
        assert_eq!((kept.len(), omitted, settled), (max, Some(5), 0));
        let (listed, _) = applied_at(&big, big.len(), &many(max));
        assert_eq!(bounded(listed).1, None);
        // A cut before the fence: nothing is settled.
        let (listed, settled) = applied_at(&t, 2, &[w(a, 0)]);
        assert_eq!((listed.len(), settled), (1, 0));
    }

    #[test]
    fn a_replay_differs_in_outcome_usability_or_failure() {
        let rec = |outcome: &str, second: Option<&str>, failure: Option<&str>| {
            let report = |o: &str| crate::guest::StartReport {
                outcome: o.into(),
                message: None,
                cache_info: None,
                refusal: None,
            };
            Recovery {
                steps: vec![],
                starts: std::iter::once(outcome).chain(second).map(report).collect(),
                errors: vec![],
                failure: failure.map(Into::into),
            }
        };
        let saved = SavedState {
            scenario: "s".into(),
            state: "blank-strict-0002".into(),
            device: "blank".into(),
            mode: Mode::Strict,
            cmdline: String::new(),
            outcome: "formatted".into(),
            violations: vec![],
            usable: Some(true),
            failed: Some(false),
        };
        assert!(saved
            .differences(&rec("formatted", Some("opened"), None))
            .is_empty());
        let d = saved.differences(&rec("refused", None, None));
        assert!(
            d[0].contains("`refused` differs from the recorded `formatted`"),
            "{d:?}"
        );
        // Same first outcome, but the reopen failed: not the recorded state.
        let d = saved.differences(&rec("formatted", Some("refused"), None));
        assert_eq!(d, ["usable is false (recorded true)"]);
        let d = saved.differences(&rec("formatted", Some("opened"), Some("timeout")));
        assert!(
            d.iter().any(|x| x.contains("recovery failed (timeout)")),
            "{d:?}"
        );
        // A state saved before these were recorded compares the outcome only.
        let old: SavedState = serde_json::from_value(serde_json::json!({
            "scenario": "s", "state": "x", "device": "blank", "mode": "strict",
            "cmdline": "", "outcome": "formatted", "violations": []
        }))
        .unwrap();
        assert!(old
            .differences(&rec("formatted", Some("refused"), Some("timeout")))
            .is_empty());
    }

    #[test]
    fn a_failed_recovery_boot_is_a_field_and_a_violation() {
        let rec = |failure: Option<&str>| Recovery {
            steps: vec![],
            starts: vec![],
            errors: vec![],
            failure: failure.map(Into::into),
        };
        let st = state_result("s", &rec(Some("run ended as `timeout`")), None);
        assert_eq!(st.failure.as_deref(), Some("run ended as `timeout`"));
        assert_eq!(st.outcome, "guest-failure");
        assert_eq!(
            st.violations,
            ["recovery did not finish cleanly: run ended as `timeout`"]
        );
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["failure"], "run ended as `timeout`");
        let clean = state_result("s", &rec(None), None);
        assert_eq!((clean.failure, clean.violations.len()), (None, 0));
        assert_eq!(
            serde_json::to_value(state_result("s", &rec(None), None)).unwrap()["failure"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn a_harness_panic_in_one_state_is_an_error_not_a_crash() {
        let r = parallel_states("blank/strict", &[0, 1, 2, 3, 4, 5], 2, &Quiet, None, |i| {
            if i == 3 {
                panic!("boom at {i}");
            }
            Ok(crate::result::StateResult {
                id: format!("s{i}"),
                cut: None,
                applied: vec![],
                settled: None,
                applied_omitted: None,
                outcome: "formatted".into(),
                reason: None,
                refusal: None,
                usable: true,
                older_cache_back: false,
                reports: vec![],
                failure: None,
                verdict: Default::default(),
                violations: vec![],
                saved: None,
                durability: None,
                minimized: None,
            })
        });
        let err = r.unwrap_err();
        assert!(
            matches!(&err, RunnerError::HarnessPanic { state: 3, why, .. } if why == "boom at 3"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "blank/strict: the harness panicked while checking state 3: boom at 3"
        );
    }

    #[test]
    fn an_image_the_generator_does_not_make_is_named() {
        let variant = |name: &str| generate::Variant {
            name: name.into(),
            patches: vec![],
        };
        let made = [variant("magic/new-crc"), variant("crc/stale-crc")];
        let mut e = Expectation {
            device: "d".into(),
            mode: Mode::Strict,
            allowed: vec![],
            all_usable: false,
            older_cache_never_back: false,
            durability: false,
            counts: None,
            per_image: Default::default(),
        };
        let opened = crate::spec::ImageOutcome::try_from("opened".to_string()).unwrap();
        e.per_image.insert("magic/new-crc".into(), opened.clone());
        assert!(check_image_names(&e, &made).is_ok());
        e.per_image.insert("magik/new-crc".into(), opened);
        let err = check_image_names(&e, &made).unwrap_err();
        assert!(matches!(&err, RunnerError::UnknownImage { name, .. } if name == "magik/new-crc"));
        assert_eq!(
            err.to_string(),
            "expect.per-image names `magik/new-crc`, which the generator does not make (it makes: magic/new-crc, crc/stale-crc)"
        );
    }

    /// ddmin on a predicate, counting calls: the result and the calls.
    fn dd(items: &[u32], budget: usize, bad: impl Fn(&[u32]) -> bool) -> (Option<Vec<u32>>, usize) {
        let mut calls = 0;
        let r = ddmin::<u32, ()>(items, budget, |c: &[u32]| {
            calls += 1;
            Ok(Some(bad(c)))
        })
        .unwrap();
        (r, calls)
    }

    #[test]
    fn ddmin_finds_a_one_minimal_violating_set() {
        let items: Vec<u32> = (0..64).collect();
        // Two writes together violate (a key's two words without the data).
        let (r, calls) = dd(&items, 1000, |c| c.contains(&5) && c.contains(&40));
        assert_eq!(r, Some(vec![5, 40]));
        assert!(calls < 64, "{calls} calls");
        // Any one of a set violates: a single write.
        let (r, _) = dd(&items, 1000, |c| c.iter().any(|x| (10..20).contains(x)));
        assert_eq!(r.map(|v| v.len()), Some(1));
        // Four of them together, as a key-set record's words.
        let need = [3u32, 17, 18, 60];
        let (r, _) = dd(&items, 1000, |c| need.iter().all(|n| c.contains(n)));
        assert_eq!(r, Some(need.to_vec()));
        // The state violates with none of its pending writes: the empty set,
        // after one call.
        assert_eq!(dd(&items, 1000, |_| true), (Some(vec![]), 1));
        // Out of budget: the smallest violating set found so far (with 3
        // calls: the empty set and both halves fail to violate, so all 64).
        let both = |c: &[u32]| c.contains(&5) && c.contains(&40);
        assert_eq!(dd(&items, 3, both), (Some(items.clone()), 3));
        let (r, calls) = dd(&items, 9, both);
        let r = r.unwrap();
        assert_eq!(calls, 9);
        assert!(both(&r) && r.len() < 64, "{r:?}");
    }

    #[test]
    fn ddmin_stops_when_cancelled() {
        let items: Vec<u32> = (0..16).collect();
        let mut calls = 0;
        let r = ddmin::<u32, ()>(&items, 100, |c: &[u32]| {
            calls += 1;
            Ok((calls < 3).then(|| c.contains(&7)))
        })
        .unwrap();
        assert_eq!((r, calls), (None, 3));
    }

    #[test]
    fn a_writes_context_names_its_innermost_section_its_index_and_op() {
        use protocol::markers::{crash_point_begin as b, crash_point_end as e, op_done};
        let store = |offset: u64| Event::PmemStore {
            offset,
            len: 8,
            value: 1,
        };
        let mut t = Trace::new();
        for ev in [
            store(0),                         // 0: outside
            Event::Marker { id: op_done(0) }, // 1
            Event::Marker { id: b(3) },       // 2
            store(8),                         // 3: C3 store 1
            Event::Marker { id: b(7) },       // 4
            store(16),                        // 5: C7 store 1 of 2
            store(24),                        // 6: C7 store 2 of 2
            Event::Marker { id: e(7) },       // 7
            store(32),                        // 8: C3 store 4 of 4
            Event::PmemFlush,                 // 9
            Event::Marker { id: e(3) },       // 10
            Event::Marker { id: b(11) },      // 11
            Event::BlkWrite {
                sector: 4,
                len: 1024,
                data: 0,
            }, // 12: sectors 1, 2 of 3
            Event::BlkWrite {
                sector: 9,
                len: 512,
                data: 0,
            }, // 13: sector 3 of 3
        ] {
            t.push(ev);
        }
        let at = |event: u64, part: u32| write_context(&t, Write { event, part });
        assert_eq!(at(0, 0), "outside any crash point; op 0");
        assert_eq!(
            at(3, 0),
            "C3-begin (segment format) … store 1 of 4 … C3-end; op 1"
        );
        assert_eq!(
            at(6, 0),
            "C7-begin (segment generation) … store 2 of 2 … C7-end; op 1"
        );
        assert_eq!(
            at(8, 0),
            "C3-begin (segment format) … store 4 of 4 … C3-end; op 1"
        );
        assert_eq!(
            at(12, 1),
            "C11-begin (writeback) … sector 2 of 3 … (no C11-end: the trace ends first); op 1"
        );
        assert_eq!(
            at(13, 0),
            "C11-begin (writeback) … sector 3 of 3 … (no C11-end: the trace ends first); op 1"
        );
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_650_000), "2026-11-25T23:40:00Z");
    }

    #[test]
    fn marker_windows_cover_both_markers() {
        let mut t = Trace::new();
        for e in [
            Event::Marker { id: 7 },
            Event::PmemStore {
                offset: 0,
                len: 8,
                value: 1,
            },
            Event::Marker { id: 1 },
            Event::PmemStore {
                offset: 8,
                len: 8,
                value: 1,
            },
            Event::Marker { id: 2 },
            Event::PmemStore {
                offset: 16,
                len: 8,
                value: 1,
            },
        ] {
            t.push(e);
        }
        let w = Window::BetweenMarkers {
            from: MarkerName(1),
            to: MarkerName(2),
            every: false,
        };
        assert_eq!(cut_range(&t, &w), Ok((2, 5)));
        let missing = Window::BetweenMarkers {
            from: MarkerName(2),
            to: MarkerName(1),
            every: false,
        };
        assert_eq!(
            cut_range(&t, &missing).unwrap_err().to_string(),
            "marker 0x1 is not in the trace after 0x2"
        );
        assert_eq!(cut_range(&t, &Window::Everything), Ok((0, 6)));
        assert_eq!(
            cut_range(&t, &Window::TracePositions { from: 0, to: 7 }),
            Err(WindowError::PastTrace { to: 7, len: 6 })
        );
    }
}
