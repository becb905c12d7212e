//! What a scenario run writes: `results/NAME/<UTC timestamp>/result.json`
//! (schema in `results/README.md`), and the checks of expectations.

use crate::spec::{Expectation, Mode, Outcome};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

/// Version of the result schema; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// The whole result of one `cargo xtask scenario NAME` run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunResult {
    pub schema_version: u32,
    pub scenario: String,
    /// UTC start time, RFC 3339.
    pub started: String,
    pub elapsed_seconds: f64,
    /// One entry per (device, mode).
    pub runs: Vec<DeviceModeRun>,
    /// True when no state violated its expectation and every pinned count held
    /// (always false in a partial result).
    pub passed: bool,
    /// The run was interrupted (Ctrl-C): `runs` hold the states done until
    /// then, and pinned counts were not checked. Absent when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    /// This result is one shard of a run (`--shard K/N`); pinned counts were
    /// not checked (`cargo xtask merge-results` does). Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardInfo>,
    /// What the run was asked to do (the effective scenario and the command's
    /// options), recorded by `explore` and by sharded runs: shards are only
    /// merged with equal ones. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// `--kernel`: the scenario against Linux's own dm-pcache (the third
    /// column beside strict and recover). Absent otherwise, and in older results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelRun>,
}

/// What `cargo xtask scenario NAME --kernel` records (produced by
/// `interop::kernel_mode`): the crash states of the scenario built from the
/// *kernel's* trace of its workload, each recovered by the kernel under
/// QEMU, beside strict and recover mode's outcomes on the same state. Its
/// fields are snake_case, as the first results that held it wrote them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelRun {
    pub scenario: String,
    /// The traced boot (every device's activation), seconds.
    pub trace_boot_seconds: f64,
    pub devices: Vec<KernelDeviceRun>,
}

/// The kernel column of a state that a hung boot left unrecovered.
pub const KERNEL_NOT_RUN: &str = "not run (an earlier state of its boot hung)";

/// One crash state and the three outcomes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelStateRow {
    /// `sI-cutN-K`: the state's index in the enumeration, its cut position
    /// in the kernel's trace and its number of durable stores.
    pub id: String,
    pub strict: String,
    pub recover: String,
    /// The kernel's: `refused (<message>)`, `hung (...)`, [`KERNEL_NOT_RUN`],
    /// strict's class when the kernel left exactly strict mode's image, else
    /// `activated, differs from strict at ...`.
    pub kernel: String,
    pub kernel_agrees_with_strict: bool,
}

impl KernelStateRow {
    /// Whether the kernel recovered this state (or hung on it).
    pub fn ran(&self) -> bool {
        self.kernel != KERNEL_NOT_RUN
    }

    /// The kernel's outcome as one class: its refusals and hangs count as
    /// one each (their messages vary by state).
    pub fn kernel_class(&self) -> &str {
        if self.kernel.starts_with("refused") || self.kernel.starts_with("hung") {
            self.kernel.split(' ').next().unwrap_or_default()
        } else {
            &self.kernel
        }
    }
}

/// One device of a `--kernel` run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelDeviceRun {
    pub device: String,
    /// Events and epochs of the kernel's traced activation.
    pub kernel_events: usize,
    pub kernel_epochs: usize,
    /// The kernel's trace agrees with strict mode's epoch by epoch (if not:
    /// where it parts).
    pub trace_difference: Option<String>,
    /// Cut positions `from..=to` in the kernel's trace.
    pub kernel_window: (usize, usize),
    /// Distinct states of the model over the kernel's trace.
    pub kernel_states: usize,
    /// Distinct states of the model over strict mode's trace, in the
    /// scenario's own window (the runner's pinned count) and in the
    /// epoch-aligned window the kernel's is.
    pub strict_states: usize,
    pub strict_states_aligned: usize,
    /// Strict and recover mode's outcomes on every one of the kernel's
    /// states (host activations), `strict`/`recover` → outcome → states.
    pub all_states_host: BTreeMap<String, BTreeMap<String, usize>>,
    /// States recovered by the kernel (a sample when the budget is short).
    pub tried: usize,
    /// Outcome counts over the tried states: `strict`, `recover`, `kernel`.
    pub counts: BTreeMap<String, BTreeMap<String, usize>>,
    pub kernel_agrees: usize,
    pub states: Vec<KernelStateRow>,
    /// Recovery boots (seconds each, up to 8 states per boot).
    pub boots: Vec<f64>,
    pub seconds_per_state: f64,
}

impl KernelDeviceRun {
    /// `counts` of `rows`: per column, outcome → states, over the states
    /// the kernel ran.
    pub fn count(rows: &[KernelStateRow]) -> BTreeMap<String, BTreeMap<String, usize>> {
        let mut counts: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for r in rows.iter().filter(|r| r.ran()) {
            for (col, v) in [
                ("strict", r.strict.as_str()),
                ("recover", r.recover.as_str()),
                ("kernel", r.kernel_class()),
            ] {
                *counts
                    .entry(col.into())
                    .or_default()
                    .entry(v.into())
                    .or_default() += 1;
            }
        }
        counts
    }
}

/// `--shard K/N`: the states whose index `i` (after deduplication, in the
/// enumeration's stable order) has `i % N == K - 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Shard {
    /// K, from 1.
    pub index: usize,
    /// N.
    pub count: usize,
}

impl Shard {
    /// Whether state `i` (0-based, of every state of a device and mode) is this shard's.
    pub fn picks(&self, i: usize) -> bool {
        i % self.count == self.index - 1
    }

    /// How many of `total` states this shard runs.
    pub fn share(&self, total: usize) -> usize {
        (0..total).filter(|&i| self.picks(i)).count()
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Shard, String> {
        let bad = || format!("`{s}` is not a shard K/N (1 <= K <= N, e.g. 2/4)");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            k.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// What a shard's result records of its shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ShardInfo {
    pub index: usize,
    pub count: usize,
    /// Per entry of `runs`, the states of that device and mode in all shards
    /// (every shard enumerates them all, then runs its share).
    pub states_total: Vec<usize>,
}

/// The states of one device in one mode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceModeRun {
    pub device: String,
    pub mode: Mode,
    /// How the crash states were chosen (model, seed, sample size, window).
    pub model: serde_json::Value,
    pub counts: ObservedCounts,
    /// Wall time of the recovery boots of all states (parallel), in seconds.
    pub recovery_seconds: f64,
    /// The device's prefill, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<PrefillSummary>,
    pub states: Vec<StateResult>,
    /// Failed pinned counts and other run-level violations.
    pub violations: Vec<String>,
    /// The traced workload's trace as the report page draws it (power-cut
    /// runs; absent for image sets and in older results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Timeline>,
}

/// The shape of a traced workload run: its length, its markers and the
/// windows of cut positions the scenario allows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Timeline {
    /// Events in the trace (cut positions run `0..=events`).
    pub events: usize,
    /// Every marker of the trace, in trace order.
    pub markers: Vec<TimelineMarker>,
    /// The ranges `from..=to` of cut positions the window allows.
    pub windows: Vec<(usize, usize)>,
}

/// A marker at trace position `pos` (the marker event's index).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TimelineMarker {
    pub pos: usize,
    /// `C<n>-begin` / `C<n>-end` (docs/format.md §10), `op<k>-done`, or `0x<id>`.
    pub name: String,
}

impl Timeline {
    /// The timeline of `trace` with the cut ranges `windows`.
    pub fn of_trace(trace: &vmm::Trace, windows: &[(usize, usize)]) -> Timeline {
        let markers = trace
            .events()
            .iter()
            .enumerate()
            .filter_map(|(pos, e)| match e {
                vmm::Event::Marker { id } => Some(TimelineMarker {
                    pos,
                    name: marker_name(*id),
                }),
                _ => None,
            })
            .collect();
        Timeline {
            events: trace.len(),
            markers,
            windows: windows.to_vec(),
        }
    }
}

/// A marker id in words: `C8-begin`, `op3-done`, or `0x<id>`.
pub fn marker_name(id: u32) -> String {
    use protocol::markers::{decode_crash_point, decode_op_done};
    match (decode_crash_point(id), decode_op_done(id)) {
        (Some((n, false)), _) => format!("C{n}-begin"),
        (Some((n, true)), _) => format!("C{n}-end"),
        (None, Some(k)) => format!("op{k}-done"),
        (None, None) => format!("0x{id:x}"),
    }
}

/// Counts observed in a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ObservedCounts {
    pub states: usize,
    pub duplicates: usize,
    pub unchanged_writes: usize,
    pub outcomes: BTreeMap<String, usize>,
    pub unusable: usize,
    pub older_cache_back: usize,
    /// States whose read-back breaks the durability rule (absent in results
    /// written before it existed).
    #[serde(default)]
    pub durability_violations: usize,
    /// `subsets`: the (pmem, disk) pairs of the full cross product of the
    /// domains' families at every cut, and those tried (`run.power-cut.pairs`
    /// bounds them); 0 for other models and in older results.
    #[serde(default)]
    pub pairs_full: u64,
    #[serde(default)]
    pub pairs_tried: u64,
    pub violations: usize,
}

/// Most applied writes a state's result lists (`StateResult::applied_omitted`).
pub const APPLIED_LISTED_MAX: usize = 1024;

/// What a device's prefill did to its cache (on the host, before the
/// traced workload): a long run's claims, such as its log going round, are
/// read here.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PrefillSummary {
    /// Steps run: data ops, and writeback, GC and idle steps.
    pub steps: usize,
    /// The segments the log was in, in order: key_head's at the start and
    /// after each log segment switch.
    pub log_segments: Vec<u32>,
    /// key_head at the end, `segment:offset` as `dmsetup status` prints it.
    pub key_head: String,
}

/// One crash state and what recovery made of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StateResult {
    /// Stable id within the run, e.g. `blank-strict-0003`.
    pub id: String,
    /// Trace position of the cut (events `[0, cut)` issued); absent for image sets.
    pub cut: Option<usize>,
    /// The writes applied over the base, in trace order; with `settled`,
    /// only those still pending at the cut.
    pub applied: Vec<AppliedWrite>,
    /// Power-cut states: how many of the applied writes (pmem stores and
    /// disk sectors) a barrier of their device had covered before the cut;
    /// every model makes those durable, so `applied` lists only the rest,
    /// the writes still pending at the cut. A long run's states would
    /// otherwise each list tens of thousands of writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled: Option<usize>,
    /// How many more pending writes were applied than `applied` lists: it
    /// keeps the first [`APPLIED_LISTED_MAX`] (a cut inside a 64 KiB data
    /// write has thousands pending; the saved state of a violating one holds
    /// its images whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_omitted: Option<usize>,
    /// The outcome of recovery's first `start` (`formatted`, `opened`, `refused`, ...).
    pub outcome: String,
    /// The refusal reason, when refused.
    pub reason: Option<String>,
    /// The refusal's kind (e.g. `seg-num`), when refused.
    pub refusal: Option<String>,
    pub usable: bool,
    pub older_cache_back: bool,
    /// The guest's full reports of the recovery steps.
    pub reports: Vec<serde_json::Value>,
    /// Why the recovery boot did not finish cleanly (a timeout, the guest's
    /// exit code, an exception, results the runner cannot read); `None` when
    /// it did. Always a violation. Absent in results written before it existed.
    #[serde(default)]
    pub failure: Option<String>,
    /// `ok`, or `violation` when `violations` is not empty (set by
    /// [`DeviceModeRun::finish`]).
    pub verdict: Verdict,
    /// Why this state violates its expectation (empty: it does not).
    pub violations: Vec<String>,
    /// Where the state's images were saved for `cargo xtask reproduce` (violations only).
    pub saved: Option<String>,
    /// The read-back judged by the durability rule, when recovery has
    /// `verify` steps (absent otherwise, and in results written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<Durability>,
    /// For a violating state that `explore` minimized: the smallest set of its
    /// pending applied writes that still violates (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimized: Option<Minimized>,
}

/// The outcome of delta debugging over a violating state's pending applied
/// writes (the writes covered by a barrier stay applied in every candidate).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Minimized {
    /// The writes kept, in trace order.
    pub writes: Vec<MinimizedWrite>,
    /// Recovery boots spent on the candidates.
    pub boots: usize,
    /// How many applied writes minimization started from (the state's
    /// applied writes pending at its cut).
    pub from: usize,
}

/// One write of a minimized set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MinimizedWrite {
    /// The write, exactly as in the state's `applied`.
    pub write: AppliedWrite,
    /// Where it is in the trace: the crash-point markers around it and its
    /// index among that section's writes, e.g.
    /// `C8-begin (key-set append) … store 3 of 8 … C8-end; op 2`.
    pub context: String,
}

/// What the durability rule made of a state's read-back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Durability {
    /// Ops acknowledged before the cut (prefill ops, the deactivation's
    /// flush after them, and the workload's ops with an op-done marker
    /// before the cut).
    pub acked: usize,
    /// Whether there was a read-back to judge (none after a refused `start`).
    pub checked: bool,
    /// What breaks the rule, e.g. `sectors 16..24: write 3 was flushed but reads write 1`.
    pub violations: Vec<String>,
}

/// A state's verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    #[default]
    Ok,
    Violation,
}

/// One durable write of a crash state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "device")]
pub enum AppliedWrite {
    Pmem {
        event: usize,
        offset: u64,
        len: u8,
        value: String,
    },
    Disk {
        event: usize,
        sector: u64,
    },
    /// Bytes written over a generated image's base (hex).
    Patch {
        offset: u64,
        bytes: String,
    },
}

impl StateResult {
    /// The outcome, with the refusal's kind when refused: `refused:seg-num`.
    pub fn detailed_outcome(&self) -> String {
        match &self.refusal {
            Some(kind) => format!("{}:{kind}", self.outcome),
            None => self.outcome.clone(),
        }
    }

    /// The name of the folder in its run's folder that holds this state's
    /// saved images (`None`: not saved). The runner saves into
    /// `<run>/<id with '/' as '_'>`: named from the run's folder, the state
    /// is found wherever the run's folder went (a CI artifact, a merged run).
    pub fn saved_folder(&self) -> Option<String> {
        let saved = self.saved.as_deref()?;
        Some(
            Path::new(saved)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.id.replace('/', "_")),
        )
    }

    /// Records in `self.violations` what `expect` forbids of this state alone.
    pub fn check(&mut self, expect: &Expectation) {
        if !expect.allowed.is_empty()
            && !expect.allowed.iter().any(|o| o.to_string() == self.outcome)
        {
            let allowed: Vec<String> = expect.allowed.iter().map(Outcome::to_string).collect();
            self.violations.push(format!(
                "outcome `{}` is not allowed (allowed: {})",
                self.outcome,
                allowed.join(", ")
            ));
        }
        if expect.all_usable && !self.usable {
            self.violations.push("not usable".into());
        }
        if expect.older_cache_never_back && self.older_cache_back {
            self.violations.push("the older cache came back".into());
        }
        if expect.durability {
            if let Some(d) = &self.durability {
                self.violations
                    .extend(d.violations.iter().map(|v| format!("durability: {v}")));
            }
        }
    }
}

impl DeviceModeRun {
    /// Counts the states and checks the pinned counts of `expect`.
    pub fn finish(&mut self, expect: Option<&Expectation>) {
        for s in &mut self.states {
            s.verdict = if s.violations.is_empty() {
                Verdict::Ok
            } else {
                Verdict::Violation
            };
        }
        let c = &mut self.counts;
        c.states = self.states.len();
        c.outcomes.clear();
        for s in &self.states {
            *c.outcomes.entry(s.outcome.clone()).or_default() += 1;
        }
        c.unusable = self.states.iter().filter(|s| !s.usable).count();
        c.older_cache_back = self.states.iter().filter(|s| s.older_cache_back).count();
        c.durability_violations = self
            .states
            .iter()
            .filter(|s| {
                s.durability
                    .as_ref()
                    .is_some_and(|d| !d.violations.is_empty())
            })
            .count();
        if let Some(pinned) = expect.and_then(|e| e.counts.as_ref()) {
            let mut differs = |what: &str, want: usize, got: usize| {
                if want != got {
                    self.violations
                        .push(format!("pinned count `{what}`: expected {want}, got {got}"));
                }
            };
            differs("states", pinned.states, c.states);
            differs("unusable", pinned.unusable, c.unusable);
            differs(
                "older-cache-back",
                pinned.older_cache_back,
                c.older_cache_back,
            );
            differs(
                "durability-violations",
                pinned.durability_violations,
                c.durability_violations,
            );
            // The observed outcomes are the guest's words (`guest-failure` and
            // `no-start` included); the pinned ones are typed.
            let pinned_by_name: BTreeMap<String, usize> = pinned
                .outcomes
                .iter()
                .map(|(o, n)| (o.to_string(), *n))
                .collect();
            let names: std::collections::BTreeSet<&String> =
                pinned_by_name.keys().chain(c.outcomes.keys()).collect();
            for name in names {
                let want = pinned_by_name.get(name).copied().unwrap_or(0);
                let got = c.outcomes.get(name).copied().unwrap_or(0);
                differs(&format!("outcomes.{name}"), want, got);
            }
        }
        self.counts.violations = self.violations.len()
            + self
                .states
                .iter()
                .filter(|s| !s.violations.is_empty())
                .count();
    }

    pub fn passed(&self) -> bool {
        self.counts.violations == 0
    }

    /// Crash states checked per second of recovery boots.
    pub fn states_per_second(&self) -> f64 {
        if self.recovery_seconds > 0.0 {
            self.states.len() as f64 / self.recovery_seconds
        } else {
            0.0
        }
    }
}

/// Why shards cannot be merged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    #[error("no result to merge")]
    Nothing,
    #[error("{0}: not a shard (it was run without --shard)")]
    NotAShard(String),
    #[error("{0}: an interrupted (partial) shard cannot be merged; run it again")]
    Partial(String),
    #[error("{what} differs between {a} and {b}: shards of different runs cannot be merged")]
    Differs { what: String, a: String, b: String },
    #[error("shard {index}/{count} is given twice ({a} and {b})")]
    Duplicate {
        index: usize,
        count: usize,
        a: String,
        b: String,
    },
    #[error("shard(s) {missing} of {count} missing")]
    Missing { missing: String, count: usize },
    #[error("{file}: {what}")]
    Inconsistent { file: String, what: String },
    /// `--kernel` is not sharded (the command refuses `--kernel --shard`):
    /// a shard holding its result is not one to join.
    #[error("{0}: holds a `kernel` result (from --kernel), which shards never have: the kernel side is not sharded, so it cannot be merged (run --kernel without --shard)")]
    Kernel(String),
}

/// Joins the results of every shard `1/N..N/N` of one run into the result of
/// the whole run: the states of each device and mode in their unsharded
/// order, counted and checked against the pinned counts of the expectation
/// the shards recorded (`config.scenario.expect`). Each entry is `(name,
/// result)`; the name (a file) is only used in errors.
pub fn merge_shards(shards: Vec<(String, RunResult)>) -> Result<RunResult, MergeError> {
    let first = shards.first().ok_or(MergeError::Nothing)?;
    let (name0, r0) = (first.0.clone(), &first.1);
    let info0 = r0
        .shard
        .clone()
        .ok_or_else(|| MergeError::NotAShard(name0.clone()))?;
    let count = info0.count;
    let mut by_index: Vec<Option<(String, RunResult)>> = vec![None; count];
    for (name, r) in &shards {
        let info = r
            .shard
            .as_ref()
            .ok_or_else(|| MergeError::NotAShard(name.clone()))?;
        if r.partial {
            return Err(MergeError::Partial(name.clone()));
        }
        if r.kernel.is_some() {
            return Err(MergeError::Kernel(name.clone()));
        }
        let differs = |what: &str| MergeError::Differs {
            what: what.into(),
            a: name0.clone(),
            b: name.clone(),
        };
        if r.scenario != r0.scenario {
            return Err(differs("the scenario"));
        }
        if info.count != count {
            return Err(differs("the shard count N"));
        }
        if r.config != r0.config {
            return Err(differs(
                "the configuration (scenario, model, window, options)",
            ));
        }
        if info.states_total != info0.states_total {
            return Err(differs("the number of crash states"));
        }
        let runs = |r: &RunResult| -> Vec<(String, Mode)> {
            r.runs.iter().map(|x| (x.device.clone(), x.mode)).collect()
        };
        if runs(r) != runs(r0) || r.runs.len() != info.states_total.len() {
            return Err(differs("the devices and modes"));
        }
        let slot = by_index
            .get_mut(info.index.wrapping_sub(1))
            .ok_or_else(|| MergeError::Inconsistent {
                file: name.clone(),
                what: format!("shard {}/{count} is out of range", info.index),
            })?;
        if let Some((a, _)) = slot {
            return Err(MergeError::Duplicate {
                index: info.index,
                count,
                a: a.clone(),
                b: name.clone(),
            });
        }
        *slot = Some((name.clone(), r.clone()));
    }
    let missing: Vec<String> = by_index
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_none())
        .map(|(k, _)| format!("{}/{count}", k + 1))
        .collect();
    if !missing.is_empty() {
        return Err(MergeError::Missing {
            missing: missing.join(", "),
            count,
        });
    }
    let shards: Vec<(String, RunResult)> = by_index.into_iter().flatten().collect();
    let expect: Vec<Expectation> = r0
        .config
        .as_ref()
        .and_then(|c| c.get("scenario"))
        .and_then(|s| s.get("expect"))
        .map(|e| serde_json::from_value(e.clone()))
        .transpose()
        .map_err(|e| MergeError::Inconsistent {
            file: name0.clone(),
            what: format!("config.scenario.expect does not read: {e}"),
        })?
        .unwrap_or_default();

    let mut runs = Vec::new();
    for (r, &total) in info0.states_total.iter().enumerate() {
        let head = &shards[0].1.runs[r];
        let mut states = Vec::with_capacity(total);
        let mut next = vec![0usize; count];
        for i in 0..total {
            let k = i % count;
            let (file, shard) = &shards[k];
            let st = shard.runs[r]
                .states
                .get(next[k])
                .ok_or_else(|| MergeError::Inconsistent {
                    file: file.clone(),
                    what: format!(
                        "{}/{}: holds {} states, its share of {total} is more",
                        head.device,
                        head.mode,
                        shard.runs[r].states.len()
                    ),
                })?;
            next[k] += 1;
            states.push(st.clone());
        }
        for (k, (file, shard)) in shards.iter().enumerate() {
            let run = &shard.runs[r];
            if run.states.len() != next[k] {
                return Err(MergeError::Inconsistent {
                    file: file.clone(),
                    what: format!(
                        "{}/{}: holds {} states, its share of {total} is {}",
                        run.device,
                        run.mode,
                        run.states.len(),
                        next[k]
                    ),
                });
            }
            // What the enumeration counted is the same in every shard.
            let c = &run.counts;
            let h = &head.counts;
            if (
                c.duplicates,
                c.unchanged_writes,
                c.pairs_full,
                c.pairs_tried,
            ) != (
                h.duplicates,
                h.unchanged_writes,
                h.pairs_full,
                h.pairs_tried,
            ) || run.model != head.model
                || run.timeline != head.timeline
            {
                return Err(MergeError::Differs {
                    what: format!("{}/{}: the enumeration", run.device, run.mode),
                    a: shards[0].0.clone(),
                    b: file.clone(),
                });
            }
        }
        let mut run = DeviceModeRun {
            prefill: None,
            device: head.device.clone(),
            mode: head.mode,
            model: head.model.clone(),
            counts: ObservedCounts {
                duplicates: head.counts.duplicates,
                unchanged_writes: head.counts.unchanged_writes,
                pairs_full: head.counts.pairs_full,
                pairs_tried: head.counts.pairs_tried,
                ..Default::default()
            },
            // The shards' boots added up: states per second stays per machine.
            recovery_seconds: shards.iter().map(|(_, s)| s.runs[r].recovery_seconds).sum(),
            states,
            violations: vec![],
            timeline: head.timeline.clone(),
        };
        run.finish(
            expect
                .iter()
                .find(|e| e.device == run.device && e.mode == run.mode),
        );
        runs.push(run);
    }
    let passed = runs.iter().all(DeviceModeRun::passed);
    Ok(RunResult {
        schema_version: SCHEMA_VERSION,
        scenario: r0.scenario.clone(),
        started: shards
            .iter()
            .map(|(_, s)| s.started.clone())
            .min()
            .unwrap_or_default(),
        elapsed_seconds: shards
            .iter()
            .map(|(_, s)| s.elapsed_seconds)
            .fold(0.0, f64::max),
        runs,
        passed,
        partial: false,
        shard: None,
        config: r0.config.clone(),
        kernel: None,
    })
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder,
/// synced, then renamed, so an interrupted run never leaves half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Counts;

    fn state(outcome: &str, usable: bool, back: bool) -> StateResult {
        StateResult {
            id: "s".into(),
            cut: Some(1),
            applied: vec![],
            settled: None,
            applied_omitted: None,
            outcome: outcome.into(),
            reason: None,
            refusal: None,
            usable,
            older_cache_back: back,
            reports: vec![],
            failure: None,
            verdict: Verdict::Ok,
            violations: vec![],
            saved: None,
            durability: None,
            minimized: None,
        }
    }

    fn expectation() -> Expectation {
        Expectation {
            device: "blank".into(),
            mode: Mode::Recover,
            allowed: vec![Outcome::Formatted, Outcome::FormatRedone],
            all_usable: true,
            older_cache_never_back: true,
            durability: false,
            counts: Some(Counts {
                states: 2,
                outcomes: [(Outcome::Formatted, 1), (Outcome::FormatRedone, 1)].into(),
                unusable: 0,
                older_cache_back: 0,
                durability_violations: 0,
            }),
            per_image: Default::default(),
        }
    }

    /// Whether a run-level violation contains `text`.
    fn has(r: &DeviceModeRun, text: &str) -> bool {
        r.violations.iter().any(|v| v.contains(text))
    }

    fn run(states: Vec<StateResult>) -> DeviceModeRun {
        DeviceModeRun {
            prefill: None,
            device: "blank".into(),
            mode: Mode::Recover,
            model: serde_json::Value::Null,
            counts: ObservedCounts::default(),
            recovery_seconds: 0.0,
            states,
            violations: vec![],
            timeline: None,
        }
    }

    #[test]
    fn states_within_expectation_pass() {
        let e = expectation();
        let mut r = run(vec![
            state("formatted", true, false),
            state("format-redone", true, false),
        ]);
        for s in &mut r.states {
            s.check(&e);
        }
        r.finish(Some(&e));
        assert!(r.passed(), "{:?}", r.violations);
        assert!(r.states.iter().all(|s| s.verdict == Verdict::Ok));
        assert_eq!(r.counts.outcomes["formatted"], 1);
    }

    #[test]
    fn each_kind_of_violation_is_reported() {
        let e = expectation();
        let mut s = state("refused", false, true);
        s.check(&e);
        assert_eq!(s.violations.len(), 3, "{:?}", s.violations);
        let mut one = run(vec![s]);
        one.finish(Some(&e));
        assert_eq!(one.states[0].verdict, Verdict::Violation);

        let mut r = run(vec![
            state("formatted", true, false),
            state("formatted", true, false),
        ]);
        r.finish(Some(&e));
        assert!(!r.passed());
        assert!(
            has(&r, "`outcomes.formatted`: expected 1, got 2"),
            "{:?}",
            r.violations
        );
        assert!(
            has(&r, "`outcomes.format-redone`: expected 1, got 0"),
            "{:?}",
            r.violations
        );
    }

    #[test]
    fn an_unpinned_outcome_breaks_the_pin() {
        let e = expectation();
        let mut r = run(vec![
            state("formatted", true, false),
            state("opened", true, false),
        ]);
        r.finish(Some(&e));
        assert!(
            has(&r, "`outcomes.opened`: expected 0, got 1"),
            "{:?}",
            r.violations
        );
    }

    #[test]
    fn shards_parse_and_pick_every_state_once() {
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        for bad in ["0/4", "5/4", "1", "a/b", "1/0"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let shards: Vec<Shard> = (1..=3).map(|k| Shard { index: k, count: 3 }).collect();
        for i in 0..10 {
            assert_eq!(shards.iter().filter(|s| s.picks(i)).count(), 1);
        }
        assert_eq!(
            shards.iter().map(|s| s.share(10)).collect::<Vec<_>>(),
            [4, 3, 3]
        );
    }

    /// A run of `n` states (every third refused), its result as the runner
    /// writes it, and the same run cut into `count` shards.
    fn whole_and_shards(n: usize, count: usize) -> (RunResult, Vec<(String, RunResult)>) {
        let states: Vec<StateResult> = (0..n)
            .map(|i| {
                let mut s = if i % 3 == 0 {
                    state("refused", false, false)
                } else {
                    state("formatted", true, false)
                };
                s.id = format!("blank-recover-{i:04}");
                s.cut = Some(i);
                s.check(&expectation());
                s
            })
            .collect();
        let mut e = expectation();
        e.allowed = vec![];
        e.all_usable = false;
        e.counts = Some(Counts {
            states: n,
            outcomes: [
                (Outcome::Refused, n.div_ceil(3)),
                (Outcome::Formatted, n - n.div_ceil(3)),
            ]
            .into(),
            unusable: n.div_ceil(3),
            older_cache_back: 0,
            durability_violations: 0,
        });
        let scenario = serde_json::json!({ "expect": [e.clone()] });
        let config = Some(serde_json::json!({ "command": "scenario", "scenario": scenario }));
        let result = |states: Vec<StateResult>, shard: Option<ShardInfo>| {
            let mut r = run(states);
            r.finish(if shard.is_some() { None } else { Some(&e) });
            RunResult {
                schema_version: SCHEMA_VERSION,
                scenario: "x".into(),
                started: "2026-12-06T00:00:00Z".into(),
                elapsed_seconds: 1.0,
                passed: r.passed(),
                runs: vec![r],
                partial: false,
                shard,
                config: config.clone(),
                kernel: None,
            }
        };
        let whole = result(states.clone(), None);
        let shards = (1..=count)
            .map(|k| {
                let sh = Shard { index: k, count };
                let mine = states
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| sh.picks(*i))
                    .map(|(_, s)| s.clone())
                    .collect();
                let info = ShardInfo {
                    index: k,
                    count,
                    states_total: vec![n],
                };
                (format!("shard{k}.json"), result(mine, Some(info)))
            })
            .collect();
        (whole, shards)
    }

    #[test]
    fn shards_merged_equal_the_whole_run() {
        let (whole, mut shards) = whole_and_shards(10, 3);
        // The refused states violate `allowed` in every shard alike.
        assert!(!whole.passed);
        shards.swap(0, 2);
        let merged = merge_shards(shards).unwrap();
        assert_eq!(merged.runs, whole.runs);
        assert_eq!(merged.passed, whole.passed);
        assert_eq!(merged.config, whole.config);
        assert!(merged.shard.is_none() && !merged.partial);
    }

    #[test]
    fn merging_checks_the_pinned_counts_the_shards_could_not() {
        // One state more than pinned: no shard can tell, the merge does.
        let (_, mut shards) = whole_and_shards(7, 2);
        let pinned = |r: &mut RunResult, n: usize| {
            let c = r.config.as_mut().unwrap();
            c["scenario"]["expect"][0]["counts"]["states"] = n.into();
        };
        for (_, r) in &mut shards {
            pinned(r, 6);
        }
        let merged = merge_shards(shards).unwrap();
        assert!(
            merged.runs[0]
                .violations
                .iter()
                .any(|v| v == "pinned count `states`: expected 6, got 7"),
            "{:?}",
            merged.runs[0].violations
        );
    }

    #[test]
    fn merging_refuses_missing_duplicate_and_foreign_shards() {
        let (whole, shards) = whole_and_shards(10, 3);
        let err = |s: Vec<(String, RunResult)>| merge_shards(s).unwrap_err().to_string();
        assert_eq!(
            err(vec![shards[0].clone()]),
            "shard(s) 2/3, 3/3 of 3 missing"
        );
        assert_eq!(
            err(vec![
                shards[0].clone(),
                shards[1].clone(),
                shards[1].clone()
            ]),
            "shard 2/3 is given twice (shard2.json and shard2.json)"
        );
        assert_eq!(
            err(vec![("whole.json".into(), whole)]),
            "whole.json: not a shard (it was run without --shard)"
        );
        let mut other = shards.clone();
        other[2].1.config = Some(serde_json::json!({ "command": "explore" }));
        assert!(err(other).starts_with(
            "the configuration (scenario, model, window, options) differs between shard1.json and shard3.json"
        ));
        let mut other = shards.clone();
        other[1].1.scenario = "y".into();
        assert!(err(other).starts_with("the scenario differs"));
        let mut other = shards.clone();
        other[1].1.partial = true;
        assert_eq!(
            err(other),
            "shard2.json: an interrupted (partial) shard cannot be merged; run it again"
        );
        let mut other = shards.clone();
        other[1].1.runs[0].states.pop();
        assert_eq!(
            err(other),
            "shard2.json: blank/recover: holds 2 states, its share of 10 is more"
        );
        let (_, four) = whole_and_shards(10, 4);
        let mut mixed = shards;
        mixed[2] = four[2].clone();
        assert!(err(mixed).starts_with("the shard count N differs"));
    }

    #[test]
    fn a_timeline_names_the_markers_of_its_trace_and_is_optional_in_json() {
        use protocol::markers::{crash_point_begin, crash_point_end, op_done};
        let mut t = vmm::Trace::new();
        t.push(vmm::Event::Marker {
            id: crash_point_begin(8),
        });
        t.push_pmem_store(64, &[1; 8]);
        t.push(vmm::Event::PmemFlush);
        t.push(vmm::Event::Marker {
            id: crash_point_end(8),
        });
        t.push(vmm::Event::Marker { id: op_done(3) });
        t.push(vmm::Event::Marker { id: 0x77 });
        let tl = Timeline::of_trace(&t, &[(0, 4)]);
        assert_eq!(tl.events, 6);
        assert_eq!(tl.windows, vec![(0, 4)]);
        let names: Vec<(usize, &str)> = tl
            .markers
            .iter()
            .map(|m| (m.pos, m.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [(0, "C8-begin"), (3, "C8-end"), (4, "op3-done"), (5, "0x77")]
        );

        // Absent fields stay absent, and older results (without them) load.
        let mut r = run(vec![state("formatted", true, false)]);
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("timeline").is_none(), "{json}");
        assert!(json["states"][0].get("minimized").is_none(), "{json}");
        let back: DeviceModeRun = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
        r.timeline = Some(tl);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["timeline"]["markers"][2]["name"], "op3-done");
        assert_eq!(json["timeline"]["windows"][0], serde_json::json!([0, 4]));
        assert_eq!(serde_json::from_value::<DeviceModeRun>(json).unwrap(), r);
    }

    /// `kernel` as `--kernel` wrote it before it was typed (an untyped
    /// object added to result.json): the same names, so those results load.
    fn kernel_json() -> serde_json::Value {
        serde_json::json!({
            "scenario": "x", "trace_boot_seconds": 61.5,
            "devices": [{
                "device": "blank", "kernel_events": 120, "kernel_epochs": 9,
                "trace_difference": null, "kernel_window": [40, 77],
                "kernel_states": 30, "strict_states": 28, "strict_states_aligned": 30,
                "all_states_host": { "strict": { "opened": 30 }, "recover": { "opened": 30 } },
                "tried": 2,
                "counts": {
                    "strict": { "opened": 2 }, "recover": { "opened": 2 },
                    "kernel": { "opened": 1, "refused": 1 }
                },
                "kernel_agrees": 1,
                "states": [
                    { "id": "s0-cut40-0", "strict": "opened", "recover": "opened",
                      "kernel": "opened", "kernel_agrees_with_strict": true },
                    { "id": "s9-cut51-3", "strict": "opened", "recover": "opened",
                      "kernel": "refused (pcache: bad superblock)", "kernel_agrees_with_strict": false },
                    { "id": "s20-cut60-9", "strict": "opened", "recover": "opened",
                      "kernel": KERNEL_NOT_RUN, "kernel_agrees_with_strict": false }
                ],
                "boots": [30.25], "seconds_per_state": 15.125
            }]
        })
    }

    #[test]
    fn the_kernel_side_is_optional_and_reads_as_first_written() {
        let (mut whole, _) = whole_and_shards(4, 2);
        // Without it (every result but a --kernel run's, and older ones):
        // absent in the JSON, and read back as none.
        let json = serde_json::to_value(&whole).unwrap();
        assert!(json.get("kernel").is_none(), "{json}");
        let back: RunResult = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back.kernel, None);
        assert_eq!(back, whole);
        // With it, in the shape the untyped field had.
        let mut with = json;
        with["kernel"] = kernel_json();
        let back: RunResult = serde_json::from_value(with.clone()).unwrap();
        let k = back.kernel.as_ref().expect("kernel read");
        let d = &k.devices[0];
        assert_eq!((k.trace_boot_seconds, d.kernel_window), (61.5, (40, 77)));
        assert_eq!(d.states[1].kernel_class(), "refused");
        assert!(d.states[1].ran() && !d.states[2].ran());
        // The recorded counts are what `count` makes of the rows.
        assert_eq!(KernelDeviceRun::count(&d.states), d.counts);
        // And it is written back unchanged.
        assert_eq!(serde_json::to_value(&back).unwrap(), with);
        whole.kernel = back.kernel;
        assert_eq!(
            serde_json::to_value(&whole).unwrap()["kernel"],
            kernel_json()
        );
    }

    #[test]
    fn merging_refuses_shards_with_a_kernel_side() {
        let (_, mut shards) = whole_and_shards(10, 2);
        shards[1].1.kernel = Some(serde_json::from_value(kernel_json()).unwrap());
        assert_eq!(
            merge_shards(shards).unwrap_err(),
            MergeError::Kernel("shard2.json".into())
        );
    }

    #[test]
    fn atomic_writes_leave_only_the_final_file() {
        let dir = std::env::temp_dir().join(format!("scn-atomic-{}", std::process::id()));
        let path = dir.join("result.json");
        write_atomic(&path, b"{}").unwrap();
        write_atomic(&path, b"{\"a\":1}").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\":1}");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("result.json")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
