//! The scenario runner: for each device and mode, run the workload with tracing
//! on, enumerate the crash states the model allows, boot recovery on each (in
//! parallel, in fresh VMs), and check the outcomes against the expectations.

use crate::generate;
use crate::guest::{self, Recovery};
use crate::persistence::{self, BaseImage, CrashState, Event, Trace};
use crate::recipe::{self, PreparedDevice};
use crate::result::{
    write_atomic, AppliedWrite, DeviceModeRun, ObservedCounts, RunResult, StateResult,
    SCHEMA_VERSION,
};
use crate::spec::{Device, Expectation, Generator, Mode, Run, Scenario, Window};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
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
    let t0 = Instant::now();
    let started = now_rfc3339();
    let mut runs = Vec::new();
    for device in &scenario.devices {
        for &mode in &scenario.modes {
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
            };
            let run = match &scenario.run {
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
        }
    }
    let passed = runs.iter().all(DeviceModeRun::passed);
    let result = RunResult {
        schema_version: SCHEMA_VERSION,
        scenario: name.into(),
        started,
        elapsed_seconds: t0.elapsed().as_secs_f64(),
        runs,
        passed,
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
}

impl Job<'_> {
    fn label(&self) -> String {
        format!("{}/{}", self.device.name, self.mode)
    }

    /// The guest command line of every recovery boot.
    fn recovery_line(&self) -> String {
        guest::cmdline(&self.scenario.recovery, self.mode, false)
    }

    /// The run of this device and mode, counted and checked against the
    /// pinned counts; `t0` is when its recovery boots started.
    fn finish(
        &self,
        model: serde_json::Value,
        counts: ObservedCounts,
        t0: Instant,
        states: Vec<StateResult>,
    ) -> DeviceModeRun {
        let mut run = DeviceModeRun {
            device: self.device.name.clone(),
            mode: self.mode,
            model,
            counts,
            recovery_seconds: t0.elapsed().as_secs_f64(),
            states,
            violations: vec![],
            timeline: None,
        };
        run.finish(self.expect);
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

fn power_cut(
    job: &Job,
    workload: &str,
    window: &Window,
    model: &persistence::Model,
    faults: &vmm::BlkFaults,
    pairs: &persistence::Pairs,
    dir: &Path,
) -> Result<DeviceModeRun, RunnerError> {
    let Job {
        device,
        mode,
        expect,
        prepared,
        cfg,
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
    let workload_ops = guest_cmdline::ops_of_steps(workload).map_err(&fail)?;
    let prefill_ops = device.judged_prefill_ops().map_err(&fail)?;
    let recovery_ops = guest_cmdline::ops_of_steps(&job.scenario.recovery).map_err(&fail)?;
    // The judged ops depend on the cut only through the workload ops done
    // before it; most states share one list.
    let full =
        crate::durability::judged_ops(&prefill_ops, &workload_ops, &recovery_ops, usize::MAX);
    let done = crate::durability::ops_done_before(&saved.trace);
    let judge = !crate::spec::verify_ranges(&job.scenario.recovery).is_empty();

    // Recovery boots, in parallel.
    let line = job.recovery_line();
    let t0 = Instant::now();
    let states = parallel_states(&job.label(), e.states.len(), cfg.jobs, job.progress, |i| {
        let state = &e.states[i];
        let id = format!("{}-{}-{:04}", device.name, mode, i);
        let images = build_images(&saved, state)?;
        let applied = applied(&saved.trace, &images.applied);
        let mut st = recover(
            images.pmem,
            images.disk,
            &id,
            &line,
            prepared.older_seq,
            cfg,
        )?;
        st.cut = Some(state.cut);
        st.applied = applied;
        if judge {
            let n = done[state.cut.min(done.len() - 1)];
            st.durability = Some(if n >= workload_ops.len() || recovery_ops.is_empty() {
                let acked = full.1 - (workload_ops.len() - n.min(workload_ops.len()));
                crate::durability::judge(&st.reports, &full.0, acked)
            } else {
                let (ops, acked) =
                    crate::durability::judged_ops(&prefill_ops, &workload_ops, &recovery_ops, n);
                crate::durability::judge(&st.reports, &ops, acked)
            });
        }
        if let Some(e) = expect {
            st.check(e);
        }
        if !st.violations.is_empty() {
            // Built again: recovery ran on the first copy-on-write views and may
            // have written them.
            let images = build_images(&saved, state)?;
            job.save_state(images, &mut st)?;
        }
        Ok(st)
    })?;
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
    let mut run = job.finish(model, counts, t0, states);
    run.timeline = Some(crate::result::Timeline::of_trace(&saved.trace, &windows));
    Ok(run)
}

/// A scenario without a power cut: recovery on each generated variant of the
/// device's image.
fn images(job: &Job, generator: Generator) -> Result<DeviceModeRun, RunnerError> {
    let Job {
        expect,
        prepared,
        cfg,
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
    let states = parallel_states(&job.label(), variants.len(), cfg.jobs, job.progress, |i| {
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
        if !st.violations.is_empty() {
            job.save_state(open(v)?, &mut st)?;
        }
        Ok(st)
    })?;
    let model = serde_json::json!({ "generator": generator });
    Ok(job.finish(model, ObservedCounts::default(), t0, states))
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

/// Runs `check(i)` for `0..n` on `jobs` threads; the first error stops the rest.
fn parallel_states(
    label: &str,
    n: usize,
    jobs: usize,
    progress: &dyn Progress,
    check: impl Fn(usize) -> Result<StateResult, RunnerError> + Sync,
) -> Result<Vec<StateResult>, RunnerError> {
    progress.begin(label, n);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<StateResult>>> = Mutex::new(vec![None; n]);
    let first_error: Mutex<Option<RunnerError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || first_error.lock().unwrap().is_some() {
                    break;
                }
                // A panic in the harness while checking one state ends the
                // run with an error naming the state, not a crash of the
                // whole command (which would lose every other result).
                let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(i)))
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
                    Ok(st) => results.lock().unwrap()[i] = Some(st),
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
    Ok(results
        .into_inner()
        .unwrap()
        .into_iter()
        .flatten()
        .collect())
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
        .filter_map(|w| match trace.get(w.event)? {
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
        })
        .collect()
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
        let r = parallel_states("blank/strict", 6, 2, &Quiet, |i| {
            if i == 3 {
                panic!("boom at {i}");
            }
            Ok(crate::result::StateResult {
                id: format!("s{i}"),
                cut: None,
                applied: vec![],
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
