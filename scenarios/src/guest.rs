//! What the runner tells the guest and what it reads back.
//!
//! The guest runs the steps of its `pcache.run=` command line in order and
//! sends one `StepResult` message per step, a JSON object with a `step` field;
//! `start` carries the module's whole activation report under `report`
//! (`guest-images/README.md` documents the language).

use crate::spec::Mode;
use serde::Deserialize;
use vmm::{Message, RunOutcome};

/// The command line of a guest run of `steps` (`a;b;c`) in `mode`: `start`
/// steps without a mode get the run's mode, so the mode governs every step.
pub fn cmdline(steps: &str, mode: Mode, markers: bool) -> String {
    let mut line = format!("{}={}", protocol::CMDLINE_RUN_KEY, run_value(steps, mode));
    if !markers {
        line.push_str(" pcache.markers=off");
    }
    line
}

/// The `pcache.run=` value of `steps` in `mode` (see [`cmdline`]).
fn run_value(steps: &str, mode: Mode) -> String {
    let steps: Vec<String> = steps
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s == "start" {
                format!("start:mode={mode}")
            } else if s.starts_with("start:") && !s.split(':').any(|o| o.starts_with("mode=")) {
                // `start:data_crc=true` and the like: options kept, mode added.
                format!("{s}:mode={mode}")
            } else {
                s.to_string()
            }
        })
        .collect();
    steps.join(";")
}

/// The steps the guest knows, for error messages.
pub const VALID_STEPS: &str = "start[:mode=strict|recover][:data_crc=true|false], stop, status, \
marker:ID, trace:on|off, fault:pf|ud|gp|de";

/// Most bytes of `pcache.run=` steps: half the guest's command line
/// (`protocol::layout::CMDLINE_MAX`), the rest being for the key, the markers
/// switch, the workload's trace steps and the VMM's device entries.
pub const STEPS_MAX: usize = protocol::layout::CMDLINE_MAX / 2;

/// Checks `steps` with the guest's own parser (`guest-cmdline`), so that a step
/// the guest would refuse fails when the scenario loads, not once per state.
pub fn check_steps(steps: &str) -> Result<(), String> {
    // The mode does not change validity: `start` gets one either way.
    let value = run_value(steps, Mode::Recover);
    if value.is_empty() {
        return Err("no steps".into());
    }
    if value.len() > STEPS_MAX {
        return Err(format!(
            "{} bytes of steps (with each `start`'s mode) is above the maximum of {STEPS_MAX}",
            value.len()
        ));
    }
    for step in guest_cmdline::run_steps(&value) {
        if let Err(e) = step {
            return Err(match e.kind {
                guest_cmdline::StepErrorKind::Unknown => {
                    format!("{e} (the steps are: {VALID_STEPS})")
                }
                _ => e.to_string(),
            });
        }
    }
    Ok(())
}

/// The part of an activation report the runner decides on.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct StartReport {
    pub outcome: String,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub cache_info: Option<SlotSeq>,
    #[serde(default)]
    pub refusal: Option<serde_json::Value>,
}

impl StartReport {
    /// The refusal's kind (`seg-num`, `big-endian`, ...), when refused.
    pub fn refusal_kind(&self) -> Option<&str> {
        self.refusal.as_ref()?.get("kind")?.as_str()
    }
}

/// Slot and seq of a cache_info copy.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub struct SlotSeq {
    pub slot: usize,
    pub seq: u8,
}

/// What a recovery boot showed.
#[derive(Clone, Debug, PartialEq)]
pub struct Recovery {
    /// Every step result, as sent.
    pub steps: Vec<serde_json::Value>,
    /// The `start` reports, in order.
    pub starts: Vec<StartReport>,
    /// Error messages the guest sent.
    pub errors: Vec<String>,
    /// `None` when the guest exited with code 0; otherwise what went wrong
    /// (an exit code, a timeout, an exception, a protocol error).
    pub failure: Option<String>,
}

impl Recovery {
    /// Reads a finished run.
    pub fn from_run(run: &RunOutcome) -> Recovery {
        Recovery::from_parts(&run.outcome, &run.messages, &run.protocol_errors)
    }

    /// Reads how a run ended, the guest's messages and the VMM's protocol errors.
    pub fn from_parts(
        outcome: &vmm::Outcome,
        messages: &[Message],
        protocol_errors: &[String],
    ) -> Recovery {
        let mut r = Recovery {
            steps: vec![],
            starts: vec![],
            errors: vec![],
            failure: None,
        };
        let mut malformed = Vec::new();
        for m in messages {
            r.read_message(m, &mut malformed);
        }
        let refused_first = r.starts.first().is_some_and(|s| s.outcome == "refused");
        let step_failed = protocol::ExitCode::StepFailed as u32;
        let clean = protocol_errors.is_empty() && malformed.is_empty();
        r.failure = match outcome.exit_code() {
            Some(0) if clean => None,
            // After a refused first `start` nothing is active: the `stop` that
            // follows fails by design, and the run ends there.
            Some(c) if c == step_failed && refused_first && clean => None,
            // A result the runner cannot read is never a clean run, whatever
            // the exit code: the state's outcome would be a guess.
            Some(0) if !malformed.is_empty() => {
                Some(format!("malformed step results: {}", malformed.join("; ")))
            }
            Some(0) => Some(format!("protocol errors: {}", protocol_errors.join("; "))),
            Some(code) => Some(match protocol::ExitCode::from_u32(code) {
                Some(c) => format!("guest exited with {c:?} ({code})"),
                None => format!("guest exited with unknown code {code}"),
            }),
            None => Some(format!("run ended as `{}`", outcome.name())),
        };
        if let Some(f) = &mut r.failure {
            if let Some(e) = messages.iter().find_map(|m| m.exception()) {
                f.push_str(&format!(
                    ": exception vector {} error {:#x} at rip {:#x} cr2 {:#x}",
                    e.vector, e.error_code, e.rip, e.cr2
                ));
            }
            if !r.errors.is_empty() {
                f.push_str(&format!(": {}", r.errors.join("; ")));
            }
        }
        r
    }

    /// Reads one message; what cannot be read goes to `malformed` (and to `errors`).
    fn read_message(&mut self, m: &Message, malformed: &mut Vec<String>) {
        let mut bad = |why: String| {
            self.errors.push(why.clone());
            malformed.push(why);
        };
        match m.kind() {
            Some(protocol::MessageKind::StepResult) => {
                match serde_json::from_slice::<serde_json::Value>(&m.payload) {
                    Ok(v) => {
                        if v.get("step").and_then(|s| s.as_str()) == Some("start") {
                            match v.get("report").map(StartReport::deserialize) {
                                Some(Ok(rep)) => self.starts.push(rep),
                                Some(Err(e)) => {
                                    bad(format!("a start report the runner cannot read ({e}): {v}"))
                                }
                                None => bad(format!("a start result without a report: {v}")),
                            }
                        } else if v.get("step").and_then(|s| s.as_str()).is_none() {
                            bad(format!("a step result without a `step` name: {v}"));
                        }
                        self.steps.push(v);
                    }
                    Err(e) => bad(format!(
                        "a step result that is not JSON ({e}): {}",
                        m.text()
                    )),
                }
            }
            Some(protocol::MessageKind::Error | protocol::MessageKind::Panic) => {
                self.errors.push(m.text())
            }
            _ => {}
        }
    }

    /// The outcome of the first `start`, or why there is none.
    pub fn outcome(&self) -> String {
        match (&self.failure, self.starts.first()) {
            (_, Some(s)) => s.outcome.clone(),
            (Some(_), None) => "guest-failure".into(),
            (None, None) => "no-start".into(),
        }
    }

    /// Usable: the first `start` was not refused and the next `start` (after a
    /// `stop`) opened the cache, in a run that ended cleanly.
    pub fn usable(&self) -> bool {
        self.failure.is_none()
            && matches!(self.starts.as_slice(), [first, second, ..]
                if first.outcome != "refused" && second.outcome == "opened")
    }

    /// The older cache came back: the first `start` opened a cache_info copy of
    /// the older cache. Its last activation wrote seq `older_seq` and the one
    /// before `older_seq - 1` (both copies on media); opening a copy writes its
    /// seq + 1. A fresh format writes seq 1, so the recipe's at least three
    /// activations keep the two apart.
    pub fn older_cache_back(&self, older_seq: Option<u8>) -> bool {
        match (older_seq, self.starts.first()) {
            (Some(old), Some(s)) if s.outcome == "opened" => s
                .cache_info
                .map(|c| c.seq.wrapping_sub(1))
                .is_some_and(|found| found == old || found == old.wrapping_sub(1)),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(outcome: &str, seq: u8) -> StartReport {
        StartReport {
            outcome: outcome.into(),
            message: None,
            cache_info: Some(SlotSeq { slot: 0, seq }),
            refusal: None,
        }
    }

    fn recovery(starts: Vec<StartReport>, failure: Option<&str>) -> Recovery {
        Recovery {
            steps: vec![],
            starts,
            errors: vec![],
            failure: failure.map(Into::into),
        }
    }

    #[test]
    fn cmdlines_carry_the_mode_into_every_start() {
        assert_eq!(
            cmdline("start;stop;start", Mode::Strict, false),
            "pcache.run=start:mode=strict;stop;start:mode=strict pcache.markers=off"
        );
        assert_eq!(
            cmdline(
                "trace:on; start:mode=recover ;trace:off",
                Mode::Strict,
                true
            ),
            "pcache.run=trace:on;start:mode=recover;trace:off"
        );
        // Other options keep the run's mode too.
        assert_eq!(
            cmdline("start:data_crc=true;stop", Mode::Strict, true),
            "pcache.run=start:data_crc=true:mode=strict;stop"
        );
    }

    #[test]
    fn steps_are_checked_with_the_guests_parser() {
        assert_eq!(check_steps("start;stop; start:mode=strict ;status"), Ok(()));
        assert_eq!(check_steps("trace:on;marker:0x10;trace:off"), Ok(()));
        let err = check_steps("start;stpo;start").unwrap_err();
        assert!(err.starts_with("step 2 `stpo`: unknown step"), "{err}");
        assert!(err.contains(VALID_STEPS), "{err}");
        let err = check_steps("start:mode=fast").unwrap_err();
        assert!(
            err.contains("mode") && err.contains("strict or recover"),
            "{err}"
        );
        assert!(check_steps("marker:0x1ffffffff").is_err());
        assert_eq!(check_steps(" ; "), Err("no steps".into()));
        // `start` grows to `start:mode=recover` (18 bytes, 19 with its `;`).
        let fits = vec!["start"; (STEPS_MAX + 1) / 19].join(";");
        assert_eq!(check_steps(&fits), Ok(()));
        let err = check_steps(&format!("{fits};stop;stop;stop;stop")).unwrap_err();
        assert!(err.contains("is above the maximum of 2048"), "{err}");
    }

    #[test]
    fn usable_needs_a_clean_run_an_unrefused_start_and_an_open() {
        assert!(recovery(vec![start("formatted", 1), start("opened", 2)], None).usable());
        assert!(recovery(vec![start("format-redone", 1), start("opened", 2)], None).usable());
        assert!(!recovery(vec![start("refused", 0)], None).usable());
        assert!(!recovery(vec![start("formatted", 1), start("refused", 0)], None).usable());
        assert!(!recovery(
            vec![start("formatted", 1), start("opened", 2)],
            Some("timeout")
        )
        .usable());
    }

    #[test]
    fn the_older_cache_is_recognised_by_its_seq() {
        let back = recovery(vec![start("opened", 4)], None);
        assert!(back.older_cache_back(Some(3)));
        assert!(!back.older_cache_back(None));
        // The older cache's other copy (seq 2) opened: it writes seq 3.
        assert!(recovery(vec![start("opened", 3)], None).older_cache_back(Some(3)));
        // A fresh format's cache_info (seq 1) opened writes seq 2.
        assert!(!recovery(vec![start("opened", 2)], None).older_cache_back(Some(3)));
        assert!(!recovery(vec![start("formatted", 1)], None).older_cache_back(Some(3)));
        assert!(recovery(vec![start("opened", 0)], None).older_cache_back(Some(255)));
        assert!(recovery(vec![start("opened", 255)], None).older_cache_back(Some(255)));
    }

    fn msg(kind: protocol::MessageKind, payload: &str) -> Message {
        Message {
            kind: kind as u32,
            payload: payload.as_bytes().to_vec(),
            at_ns: 0,
        }
    }

    fn start_msg(outcome: &str) -> Message {
        msg(
            protocol::MessageKind::StepResult,
            &format!(
                r#"{{"step":"start","report":{{"outcome":"{outcome}","cache_info":{{"slot":0,"seq":1}}}}}}"#
            ),
        )
    }

    const EXITED_0: vmm::Outcome = vmm::Outcome::Exited { code: 0 };

    #[test]
    fn a_clean_run_reads_as_clean() {
        let r = Recovery::from_parts(
            &EXITED_0,
            &[
                start_msg("formatted"),
                msg(protocol::MessageKind::StepResult, r#"{"step":"stop"}"#),
                start_msg("opened"),
            ],
            &[],
        );
        assert_eq!(r.failure, None);
        assert!(r.usable());
        assert_eq!(r.outcome(), "formatted");
    }

    #[test]
    fn malformed_step_results_are_failures_even_after_a_clean_exit() {
        for bad in [
            msg(protocol::MessageKind::StepResult, "{not json"),
            msg(protocol::MessageKind::StepResult, r#"{"step":"start"}"#),
            msg(
                protocol::MessageKind::StepResult,
                r#"{"step":"start","report":{"outcome":7}}"#,
            ),
            msg(protocol::MessageKind::StepResult, r#"[1,2]"#),
        ] {
            let r = Recovery::from_parts(
                &EXITED_0,
                &[start_msg("formatted"), bad.clone(), start_msg("opened")],
                &[],
            );
            let f = r.failure.as_deref().unwrap_or_else(|| {
                panic!(
                    "{:?} was read as a clean run",
                    String::from_utf8_lossy(&bad.payload)
                )
            });
            assert!(f.starts_with("malformed step results"), "{f}");
            assert!(!r.usable());
        }
        // The same after a refused start (whose failing `stop` is expected).
        let r = Recovery::from_parts(
            &vmm::Outcome::Exited {
                code: protocol::ExitCode::StepFailed as u32,
            },
            &[
                start_msg("refused"),
                msg(protocol::MessageKind::StepResult, "garbage"),
            ],
            &[],
        );
        assert!(r.failure.is_some());
    }

    #[test]
    fn timeouts_and_panics_are_failures() {
        let r = Recovery::from_parts(
            &vmm::Outcome::Timeout {
                regs: Default::default(),
            },
            &[start_msg("formatted")],
            &[],
        );
        assert_eq!(r.failure.as_deref(), Some("run ended as `timeout`"));
        assert!(!r.usable());
        let r = Recovery::from_parts(
            &vmm::Outcome::Exited {
                code: protocol::ExitCode::Panic as u32,
            },
            &[msg(protocol::MessageKind::Panic, "src/x.rs:1: boom")],
            &[],
        );
        let f = r.failure.unwrap();
        assert!(f.contains("boom"), "{f}");
        assert_eq!(r.starts.len(), 0);
    }

    #[test]
    fn outcome_names_failures() {
        assert_eq!(recovery(vec![], Some("timeout")).outcome(), "guest-failure");
        assert_eq!(recovery(vec![], None).outcome(), "no-start");
        assert_eq!(
            recovery(vec![start("refused", 0)], None).outcome(),
            "refused"
        );
    }

    #[test]
    fn start_reports_parse_from_the_modules_own_json() {
        use pcache::{activate, NoHooks, Options, SparsePmem};
        let mut dev = SparsePmem::new(512 << 20);
        for (outcome, seq) in [("formatted", 1), ("opened", 2)] {
            let report = activate(&mut dev, &Options::default(), &mut NoHooks);
            let v = serde_json::to_value(&report).unwrap();
            let r = StartReport::deserialize(&v).unwrap();
            assert_eq!(r.outcome, outcome);
            assert_eq!(r.cache_info.map(|c| c.seq), Some(seq));
        }
    }
}
