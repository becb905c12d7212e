//! `explore` on KVM: a deliberately broken module is caught and its violation
//! minimized; shards of a run merged equal the run. `cargo xtask test` builds
//! both guest kernels first (`target/guest/pcache-guest` and
//! `target/guest/pcache-guest-test-drop-data-fence`).

use scenarios::explore::{self, Explore};
use scenarios::result::{merge_shards, AppliedWrite, RunResult, Shard};
use scenarios::runner::{self, Quiet, RunOptions, RunnerConfig};
use scenarios::spec::{Mode, Scenario, Window};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn kernel(name: &str) -> PathBuf {
    let k = root().join("target/guest").join(name);
    assert!(
        k.exists(),
        "{} is missing: run `cargo xtask build-guest` (with `--feature test-drop-data-fence` for the broken one; cargo xtask test builds both)",
        k.display()
    );
    k
}

fn load(name: &str) -> Scenario {
    Scenario::load(&root().join("scenarios").join(format!("{name}.json"))).unwrap()
}

fn config(tag: &str, kernel: PathBuf) -> (RunnerConfig, PathBuf) {
    let tmp = std::env::temp_dir().join(format!("scn-explore-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let cfg = RunnerConfig {
        kernel,
        out_dir: tmp.join("out"),
        work_dir: tmp.join("work"),
        jobs: 2,
        state_timeout: Duration::from_secs(20),
        workload_timeout: Duration::from_secs(120),
        recovery_vms: Default::default(),
    };
    (cfg, tmp)
}

#[test]
#[ignore = "needs /dev/kvm"]
fn explore_catches_a_module_without_the_data_fence_and_minimizes_to_the_key() {
    // One FUA write of crash-mid-data-write's kind on its device. With the
    // fence between the data (C10) and the key-set append (C8) dropped, the
    // data's 64 stores are still pending when the key-set is written: cut in
    // the key-set append, `subsets` (sample 0: its prefixes, suffixes,
    // single drops and singles, no random ones) keeps the record without
    // some data words in every suffix that starts inside the data.
    let base = load("crash-mid-data-write");
    let x = Explore {
        workload: Some("start;write:0:512:1:fua".into()),
        recovery: Some("start;verify:0:4096;stop;start".into()),
        window: Some(explore::parse_window("C8-begin..C8-end").unwrap()),
        model: Some(explore::parse_model("subsets:0:0").unwrap()),
        strict_fails: true,
        ..Default::default()
    };
    let scenario = explore::scenario("explore-broken", Some(&base), &x).unwrap();
    assert_eq!(scenario.modes, [Mode::Strict, Mode::Recover]);
    let (cfg, tmp) = config("broken", kernel("pcache-guest-test-drop-data-fence"));
    let opts = RunOptions {
        minimize: 1,
        minimize_boots: 200,
        save_limit: Some(1),
        ..Default::default()
    };
    let r = runner::run_with("explore-broken", &scenario, &cfg, &Quiet, &opts).unwrap();
    assert!(!r.passed);
    let strict = &r.runs[0];
    assert_eq!(strict.mode, Mode::Strict);
    let bad: Vec<_> = strict
        .states
        .iter()
        .filter(|s| !s.violations.is_empty())
        .collect();
    assert!(!bad.is_empty(), "strict: no violation found");
    assert_eq!(strict.counts.durability_violations, bad.len());
    for s in &bad {
        assert!(
            s.violations
                .iter()
                .all(|v| v.starts_with("durability: sectors 0..1: garbage")),
            "{}: {:?}",
            s.id,
            s.violations
        );
    }
    assert_eq!(
        bad.iter().filter(|s| s.saved.is_some()).count(),
        1,
        "--save 1"
    );
    // The first violating state is minimized: what is left is the key-set's
    // record alone, with not one word of the data it points at.
    let m = bad[0]
        .minimized
        .as_ref()
        .expect("the first one is minimized");
    let all = bad[0].applied.len();
    assert!(m.from <= all && m.from > 64, "from {} of {all}", m.from);
    assert!(!m.writes.is_empty() && m.writes.len() < 11, "{m:#?}");
    assert!(m.boots > m.writes.len() && m.boots <= 200, "{m:#?}");
    for w in &m.writes {
        assert!(
            w.context.starts_with("C8-begin (key-set append) … store ")
                && w.context.contains(" of 11 … C8-end"),
            "{}",
            w.context
        );
        assert!(
            bad[0].applied.contains(&w.write),
            "{:?} is one of the state's applied writes",
            w.write
        );
        assert!(matches!(w.write, AppliedWrite::Pmem { .. }));
    }
    // Only the first is minimized.
    assert!(bad[1..].iter().all(|s| s.minimized.is_none()));
    // Recover mode fences the key-set's terminator before its record (policy
    // of `docs/format.md` §10.4), and that fence also makes the data durable
    // before the key: the missing data fence does not show there.
    let recover = &r.runs[1];
    assert_eq!(recover.mode, Mode::Recover);
    assert!(!recover.states.is_empty());
    assert_eq!(recover.counts.violations, 0, "{:#?}", recover.violations);
    let written: RunResult =
        serde_json::from_slice(&std::fs::read(cfg.out_dir.join("result.json")).unwrap()).unwrap();
    assert_eq!(written, r);
    std::fs::remove_dir_all(tmp).unwrap();
}

#[test]
#[ignore = "needs /dev/kvm"]
fn shards_merged_equal_one_unsharded_run() {
    // crash-mid-sb-write's blank device, both modes: pinned counts (8 states
    // each) that only the merge can check.
    let mut s = load("crash-mid-sb-write");
    s.devices.retain(|d| d.name == "blank");
    s.expect.retain(|e| e.device == "blank");
    let config = serde_json::json!({ "command": "scenario", "scenario": s });
    let (cfg, tmp) = config_for("whole");
    let whole = runner::run("crash-mid-sb-write", &s, &cfg, &Quiet).unwrap();
    assert!(whole.passed);
    let mut shards = Vec::new();
    for k in 1..=3 {
        let (cfg, tmp) = config_for(&format!("shard{k}"));
        let opts = RunOptions {
            shard: Some(Shard { index: k, count: 3 }),
            config: Some(config.clone()),
            ..Default::default()
        };
        let r = runner::run_with("crash-mid-sb-write", &s, &cfg, &Quiet, &opts).unwrap();
        let info = r.shard.as_ref().expect("a shard says so");
        assert_eq!(info.states_total, [8, 8]);
        assert!(r.runs.iter().all(|run| run.states.len() < 8));
        shards.push((format!("shard {k}"), r));
        std::fs::remove_dir_all(tmp).unwrap();
    }
    // Any order, and a missing shard is named.
    shards.reverse();
    let err = merge_shards(shards[..2].to_vec()).unwrap_err();
    assert_eq!(err.to_string(), "shard(s) 1/3 of 3 missing");
    let merged = merge_shards(shards).unwrap();
    assert!(merged.passed, "{:#?}", merged.runs[0].violations);
    assert_eq!(merged.runs.len(), whole.runs.len());
    for (m, w) in merged.runs.iter().zip(&whole.runs) {
        assert_eq!((&m.device, m.mode), (&w.device, w.mode));
        assert_eq!(m.counts, w.counts);
        assert_eq!(m.violations, w.violations);
        let ids = |r: &scenarios::result::DeviceModeRun| -> Vec<(String, String, bool)> {
            r.states
                .iter()
                .map(|s| (s.id.clone(), s.outcome.clone(), s.usable))
                .collect()
        };
        assert_eq!(ids(m), ids(w));
        let verdicts = |r: &scenarios::result::DeviceModeRun| -> Vec<_> {
            r.states
                .iter()
                .map(|s| (s.verdict, s.cut, s.applied.clone()))
                .collect()
        };
        assert_eq!(verdicts(m), verdicts(w));
    }
    std::fs::remove_dir_all(tmp).unwrap();
}

/// Sets the cancel flag (as Ctrl-C does) once `after` states are done.
struct CancelAfter<'a> {
    flag: &'a AtomicBool,
    done: AtomicUsize,
    after: usize,
}

impl runner::Progress for CancelAfter<'_> {
    fn begin(&self, _: &str, _: usize) {}
    fn state_done(&self) {
        if self.done.fetch_add(1, Ordering::SeqCst) + 1 >= self.after {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
    fn end(&self) {}
}

#[test]
#[ignore = "needs /dev/kvm"]
fn an_interrupted_run_writes_a_valid_partial_result() {
    // crash-mid-sb-write's blank device (8 states per mode, pinned), cut
    // short after 3 states of the first mode.
    let mut s = load("crash-mid-sb-write");
    s.devices.retain(|d| d.name == "blank");
    s.expect.retain(|e| e.device == "blank");
    let flag = AtomicBool::new(false);
    let progress = CancelAfter {
        flag: &flag,
        done: AtomicUsize::new(0),
        after: 3,
    };
    let (cfg, tmp) = config_for("cancel");
    let opts = RunOptions {
        cancel: Some(&flag),
        ..Default::default()
    };
    let r = runner::run_with("crash-mid-sb-write", &s, &cfg, &progress, &opts).unwrap();
    assert!(r.partial && !r.passed);
    // The first mode only, with the states done (those in flight finish:
    // at most one per job more).
    assert_eq!(r.runs.len(), 1);
    let n = r.runs[0].states.len();
    assert!((3..=3 + cfg.jobs).contains(&n) && n < 8, "{n} states");
    // Pinned counts (8 states) are not checked in a partial run.
    assert!(
        r.runs[0].violations.is_empty(),
        "{:?}",
        r.runs[0].violations
    );
    let text = std::fs::read_to_string(cfg.out_dir.join("result.json")).unwrap();
    let written: RunResult = serde_json::from_str(&text).unwrap();
    assert_eq!(written, r);
    assert!(text.contains("\"partial\": true"), "{text}");
    std::fs::remove_dir_all(tmp).unwrap();
}

fn config_for(tag: &str) -> (RunnerConfig, PathBuf) {
    config(tag, kernel("pcache-guest"))
}

/// Explore's default window is the whole trace.
#[test]
fn explore_defaults_to_the_whole_trace() {
    let s = explore::scenario(
        "crash-mid-sb-write",
        Some(&load("crash-mid-sb-write")),
        &Explore::default(),
    )
    .unwrap();
    assert!(matches!(
        s.run,
        scenarios::spec::Run::PowerCut {
            window: Window::Everything,
            ..
        }
    ));
}
