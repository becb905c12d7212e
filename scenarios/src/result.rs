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
    /// True when no state violated its expectation and every pinned count held.
    pub passed: bool,
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

/// One crash state and what recovery made of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StateResult {
    /// Stable id within the run, e.g. `blank-strict-0003`.
    pub id: String,
    /// Trace position of the cut (events `[0, cut)` issued); absent for image sets.
    pub cut: Option<usize>,
    /// The writes applied over the base, in trace order.
    pub applied: Vec<AppliedWrite>,
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
    /// The smallest set of the applied writes that still violates, when the
    /// state was minimized (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimized: Option<Minimized>,
}

/// A violating state's minimized write set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Minimized {
    /// The writes that matter, each with the crash-point markers around it.
    pub writes: Vec<MinimizedWrite>,
    /// Recovery boots the minimization took.
    pub boots: usize,
    /// How many applied writes it started from.
    pub from: usize,
}

/// One write of a minimized set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MinimizedWrite {
    pub write: AppliedWrite,
    /// Where it is in words, e.g. `inside C8 (key-set append), word 3 of 4`.
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
