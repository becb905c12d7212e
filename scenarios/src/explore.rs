//! `cargo xtask explore`: every crash state of a workload, as a scenario.
//!
//! Explore is a scenario run with other defaults: a cut at every position of
//! the whole trace, the scenario's model (or one given), and expectations of
//! its own instead of the scenario's pinned ones: in recover mode no state may
//! be unusable (refused for ever) and none may break the durability rule; in
//! strict mode (the kernel's behaviour) such states are findings, counted and
//! listed but not failures unless asked. This module turns a scenario (or a
//! workload given on the command line) and the options into that scenario;
//! the runner does the rest (`runner::run_with`).

use crate::persistence::Model;
use crate::spec::{Device, DiskContent, Expectation, Mode, Run, Scenario, Window};
use std::path::Path;

/// What to explore, besides the base scenario.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Explore {
    /// The workload's guest steps (default: the scenario's).
    pub workload: Option<String>,
    /// The recovery's guest steps (default: the scenario's).
    pub recovery: Option<String>,
    /// One device replacing the scenario's devices.
    pub device: Option<Device>,
    /// Only the scenario's devices of these names (default: all).
    pub devices: Vec<String>,
    /// The modes (default: the scenario's, or both).
    pub modes: Vec<Mode>,
    /// Where to cut (default: the whole trace).
    pub window: Option<Window>,
    /// The persistence model (default: the scenario's, or [`DEFAULT_MODEL`]).
    pub model: Option<Model>,
    /// Strict mode's findings are violations too.
    pub strict_fails: bool,
    /// Unusable states are allowed (not violations) in every mode.
    pub allow_unusable: bool,
    /// The durability rule's findings are counted, not violations.
    pub ignore_durability: bool,
}

/// The model of a workload given without a scenario: bounded on long epochs.
pub const DEFAULT_MODEL: Model = Model::AtFences {
    sample: 16,
    seed: 0,
};

/// The scenario `explore` runs. `base` is the scenario named with
/// `--scenario` (its devices, modes, workload, recovery, model, faults and
/// pairing are the defaults); without one, `x` must give the workload, the
/// recovery and a device.
pub fn scenario(name: &str, base: Option<&Scenario>, x: &Explore) -> Result<Scenario, String> {
    let (workload, model, faults, pairs) = match base.map(|b| &b.run) {
        Some(Run::PowerCut {
            workload,
            model,
            faults,
            pairs,
            ..
        }) => (
            Some(workload.clone()),
            Some(model.clone()),
            faults.clone(),
            *pairs,
        ),
        Some(Run::Images { .. }) => {
            return Err(format!(
            "scenario `{name}` has no workload (an image set): explore needs a power-cut scenario"
        ))
        }
        None => (None, None, Default::default(), None),
    };
    let workload = x
        .workload
        .clone()
        .or(workload)
        .ok_or("no workload: give --workload STEPS or --scenario NAME")?;
    let recovery = x
        .recovery
        .clone()
        .or_else(|| base.map(|b| b.recovery.clone()))
        .ok_or("no recovery: give --recovery STEPS or --scenario NAME")?;
    let mut devices = match (&x.device, base) {
        (Some(d), _) => vec![d.clone()],
        (None, Some(b)) => b.devices.clone(),
        (None, None) => {
            return Err("no device: give a device (--recipe ...) or --scenario NAME".into())
        }
    };
    if !x.devices.is_empty() {
        for want in &x.devices {
            if !devices.iter().any(|d| &d.name == want) {
                let known: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
                return Err(format!("no device `{want}` (known: {})", known.join(", ")));
            }
        }
        devices.retain(|d| x.devices.contains(&d.name));
    }
    let modes = if !x.modes.is_empty() {
        x.modes.clone()
    } else if let Some(b) = base {
        b.modes.clone()
    } else {
        vec![Mode::Strict, Mode::Recover]
    };
    let judged = !crate::spec::verify_ranges(&recovery).is_empty();
    // A state is usable when a second `start` (after a `stop`) opens it: a
    // recovery without one would make every state "not usable".
    let starts = guest_cmdline::run_steps(&recovery)
        .filter(|s| matches!(s, Ok((_, guest_cmdline::RunStep::Start(_)))))
        .count();
    if starts < 2 && !x.allow_unusable {
        return Err(format!(
            "recovery `{recovery}`: explore checks that every state stays usable, which needs a `stop;start` after the first `start` (or --allow-unusable)"
        ));
    }
    let mut expect = Vec::new();
    for d in &devices {
        for &mode in &modes {
            expect.push(expectation(d, mode, judged, x));
        }
    }
    let description = match base {
        Some(b) => format!("explore of {name}: {}", b.description),
        None => format!("explore of the workload `{workload}`"),
    };
    let s = Scenario {
        description,
        devices,
        modes,
        run: Run::PowerCut {
            workload,
            window: x.window.clone().unwrap_or(Window::Everything),
            model: x.model.clone().or(model).unwrap_or(DEFAULT_MODEL),
            faults,
            pairs,
        },
        recovery,
        expect,
    };
    // Checked as a scenario file is: bad steps, sizes, coverage all fail here.
    let json = serde_json::to_string(&s).expect("a scenario serializes");
    Scenario::parse(Path::new(name), &json).map_err(|e| e.to_string())
}

/// What explore expects of a device in a mode (see the module documentation).
pub fn expectation(device: &Device, mode: Mode, judged: bool, x: &Explore) -> Expectation {
    let checked = mode == Mode::Recover || x.strict_fails;
    Expectation {
        device: device.name.clone(),
        mode,
        allowed: vec![],
        all_usable: checked && !x.allow_unusable,
        older_cache_never_back: false,
        // The durability rule needs a read-back, and a pattern disk to tell
        // the disk's own content from garbage.
        durability: checked
            && !x.ignore_durability
            && judged
            && device.disk == DiskContent::Pattern,
        counts: None,
        per_image: Default::default(),
    }
}

/// `--model`: `prefix`, `flushed-only`, `subsets[:SAMPLE[:SEED]]`,
/// `at-fences[:SAMPLE[:SEED]]`, or the model's JSON as in a scenario file.
pub fn parse_model(s: &str) -> Result<Model, String> {
    let bad = |why: String| {
        format!("`{s}` is not a model ({why}; expected prefix, flushed-only, subsets[:SAMPLE[:SEED]], at-fences[:SAMPLE[:SEED]] or JSON)")
    };
    if s.trim_start().starts_with(['{', '"']) {
        return serde_json::from_str(s).map_err(|e| bad(e.to_string()));
    }
    let mut parts = s.split(':');
    let kind = parts.next().unwrap_or_default();
    let num = |p: Option<&str>, default: u64| -> Result<u64, String> {
        p.map_or(Ok(default), |v| {
            v.parse().map_err(|_| bad(format!("`{v}` is not a number")))
        })
    };
    let (sample, seed) = (num(parts.next(), 16)?, num(parts.next(), 0)?);
    if parts.next().is_some() {
        return Err(bad("too many parts".into()));
    }
    let plain = |m: Model| {
        if s.contains(':') {
            Err(bad(format!("`{kind}` takes no sample or seed")))
        } else {
            Ok(m)
        }
    };
    match kind {
        "prefix" => plain(Model::Prefix),
        "flushed-only" => plain(Model::FlushedOnly),
        "subsets" => Ok(Model::Subsets {
            sample: sample as usize,
            seed,
        }),
        "at-fences" => Ok(Model::AtFences {
            sample: sample as usize,
            seed,
        }),
        _ => Err(bad(format!("unknown model `{kind}`"))),
    }
}

/// `--window`: `everything`, `FROM..TO` with markers (`C8-begin..C8-end`:
/// every occurrence of the pair), or trace positions (`100..250`).
pub fn parse_window(s: &str) -> Result<Window, String> {
    if s == "everything" {
        return Ok(Window::Everything);
    }
    let bad = || {
        format!("`{s}` is not a window (expected everything, C<n>-begin..C<n>-end or FROM..TO trace positions)")
    };
    let (a, b) = s.split_once("..").ok_or_else(bad)?;
    if let (Ok(from), Ok(to)) = (a.parse::<usize>(), b.parse::<usize>()) {
        if from > to {
            return Err(bad());
        }
        return Ok(Window::TracePositions { from, to });
    }
    let marker = |m: &str| crate::spec::MarkerName::try_from(m.to_string());
    Ok(Window::BetweenMarkers {
        from: marker(a)?,
        to: marker(b)?,
        every: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str) -> Scenario {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        Scenario::load(&root.join(format!("{name}.json"))).unwrap()
    }

    #[test]
    fn models_and_windows_parse() {
        assert_eq!(parse_model("prefix"), Ok(Model::Prefix));
        assert_eq!(parse_model("flushed-only"), Ok(Model::FlushedOnly));
        assert_eq!(
            parse_model("subsets:8:3"),
            Ok(Model::Subsets { sample: 8, seed: 3 })
        );
        assert_eq!(
            parse_model("at-fences"),
            Ok(Model::AtFences {
                sample: 16,
                seed: 0
            })
        );
        assert_eq!(
            parse_model(r#"{"subsets": {"sample": 2, "seed": 1}}"#),
            Ok(Model::Subsets { sample: 2, seed: 1 })
        );
        assert!(parse_model("prefix:3")
            .unwrap_err()
            .contains("takes no sample"));
        assert!(parse_model("subsets:x")
            .unwrap_err()
            .contains("`x` is not a number"));
        assert!(parse_model("all")
            .unwrap_err()
            .contains("unknown model `all`"));

        assert_eq!(parse_window("everything"), Ok(Window::Everything));
        assert_eq!(
            parse_window("3..40"),
            Ok(Window::TracePositions { from: 3, to: 40 })
        );
        assert!(matches!(
            parse_window("C8-begin..C8-end"),
            Ok(Window::BetweenMarkers { every: true, .. })
        ));
        assert!(parse_window("C13-begin..C8-end").is_err());
        assert!(parse_window("40..3").is_err());
        assert!(parse_window("C8-begin").is_err());
    }

    #[test]
    fn a_scenario_explored_keeps_its_workload_and_expects_usable_and_durable_in_recover() {
        let base = load("crash-mid-data-write");
        let s = scenario("crash-mid-data-write", Some(&base), &Explore::default()).unwrap();
        let Run::PowerCut {
            workload,
            window,
            model,
            ..
        } = &s.run
        else {
            panic!("a power cut");
        };
        let Run::PowerCut {
            workload: w0,
            model: m0,
            ..
        } = &base.run
        else {
            panic!("a power cut");
        };
        assert_eq!((workload, model), (w0, m0));
        assert_eq!(*window, Window::Everything);
        assert_eq!(s.modes, base.modes);
        let recover = s.expect.iter().find(|e| e.mode == Mode::Recover).unwrap();
        assert!(recover.all_usable && recover.durability && recover.counts.is_none());
        let strict = s.expect.iter().find(|e| e.mode == Mode::Strict).unwrap();
        assert!(!strict.all_usable && !strict.durability);
        // Strict's findings fail when asked.
        let x = Explore {
            strict_fails: true,
            ..Default::default()
        };
        let s = scenario("crash-mid-data-write", Some(&base), &x).unwrap();
        assert!(s.expect.iter().all(|e| e.all_usable && e.durability));
    }

    #[test]
    fn a_workload_on_the_command_line_needs_a_device_and_is_checked() {
        let base = load("crash-mid-data-write");
        let x = Explore {
            workload: Some("start;write:0:512:1:fua".into()),
            recovery: Some("start;verify:0:4096;stop;start".into()),
            ..Default::default()
        };
        let err = scenario("explore", None, &x).unwrap_err();
        assert!(err.contains("no device"), "{err}");
        let x = Explore {
            device: Some(base.devices[0].clone()),
            ..x
        };
        let s = scenario("explore", None, &x).unwrap();
        assert_eq!(s.modes, [Mode::Strict, Mode::Recover]);
        assert!(matches!(s.run, Run::PowerCut { ref model, .. } if *model == DEFAULT_MODEL));
        // A recovery that does not read where the workload wrote is refused,
        // as in a scenario file.
        let x = Explore {
            recovery: Some("start;verify:8192:512;stop;start".into()),
            ..x
        };
        let err = scenario("explore", None, &x).unwrap_err();
        assert!(err.contains("no verify step reads bytes 0..512"), "{err}");
        let x = Explore {
            recovery: Some("start;verify:0:4096".into()),
            ..x
        };
        let err = scenario("explore", None, &x).unwrap_err();
        assert!(err.contains("needs a `stop;start`"), "{err}");
        let x = Explore {
            allow_unusable: true,
            ..x
        };
        assert!(scenario("explore", None, &x).is_ok());
        let err =
            scenario("corrupt-sb", Some(&load("corrupt-sb")), &Explore::default()).unwrap_err();
        assert!(err.contains("needs a power-cut scenario"), "{err}");
    }
}
