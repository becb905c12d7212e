//! End-to-end runs of the shipped scenarios on KVM with the real guest kernel
//! (`cargo xtask test` builds it into target/guest/pcache-guest first).

use scenarios::result::RunResult;
use scenarios::runner::{self, Quiet, RecoveryVms, RunnerConfig};
use scenarios::spec::{Mode, Scenario};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn kernel() -> PathBuf {
    let k = root().join("target/guest/pcache-guest");
    assert!(
        k.exists(),
        "{} is missing: run `cargo xtask build-guest` (cargo xtask test does)",
        k.display()
    );
    k
}

fn load(name: &str) -> Scenario {
    Scenario::load(&root().join("scenarios").join(format!("{name}.json"))).unwrap()
}

/// Runs `scenario` with its results in a fresh temporary folder named by `tag`
/// (tests run in parallel).
fn run(tag: &str, name: &str, scenario: &Scenario) -> (RunResult, PathBuf) {
    run_with(tag, name, scenario, RecoveryVms::default())
}

/// [`run`] with the recovery boots run as `vms` says.
fn run_with(tag: &str, name: &str, scenario: &Scenario, vms: RecoveryVms) -> (RunResult, PathBuf) {
    let tmp = std::env::temp_dir().join(format!("scn-e2e-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let cfg = RunnerConfig {
        kernel: kernel(),
        out_dir: tmp.join("out"),
        work_dir: tmp.join("work"),
        jobs: 2,
        state_timeout: Duration::from_secs(20),
        workload_timeout: Duration::from_secs(120),
        recovery_vms: vms,
    };
    let r = runner::run(name, scenario, &cfg, &Quiet).unwrap_or_else(|e| panic!("{name}: {e}"));
    let written: RunResult =
        serde_json::from_slice(&std::fs::read(cfg.out_dir.join("result.json")).unwrap()).unwrap();
    assert_eq!(written, r, "result.json holds the run");
    (r, tmp)
}

/// The states of the first run that violate their expectation.
fn violating(r: &RunResult) -> Vec<&scenarios::result::StateResult> {
    r.runs[0]
        .states
        .iter()
        .filter(|s| !s.violations.is_empty())
        .collect()
}

fn violations(r: &RunResult) -> Vec<String> {
    let mut v = Vec::new();
    for run in &r.runs {
        v.extend(
            run.violations
                .iter()
                .map(|x| format!("{}/{}: {x}", run.device, run.mode)),
        );
        for s in &run.states {
            v.extend(s.violations.iter().map(|x| format!("{}: {x}", s.id)));
        }
    }
    v
}

/// The fork-server (the default) and fresh VMs (`--fresh`) find the same
/// results: every state's outcome, reports, usability, durability verdict
/// and violations, and every run's counts. `crash-mid-kset-append` reads the
/// disk back and is judged by the durability rule; its `older-log/strict`
/// run has a pinned durability violation.
#[test]
#[ignore = "needs /dev/kvm"]
fn the_fork_server_and_fresh_vms_find_the_same_results() {
    let name = "crash-mid-kset-append";
    let s = load(name);
    let comparable = |mut r: RunResult, tmp: &Path| {
        for run in &mut r.runs {
            run.recovery_seconds = 0.0;
            for st in &mut run.states {
                st.saved = st.saved.take().map(|p| {
                    Path::new(&p)
                        .strip_prefix(tmp)
                        .expect("saved under the run's folder")
                        .display()
                        .to_string()
                });
            }
        }
        (r.runs, r.passed)
    };
    let (fork, fork_tmp) = run_with("fork-vs-fresh-fork", name, &s, RecoveryVms::ForkServer);
    let (fresh, fresh_tmp) = run_with("fork-vs-fresh-fresh", name, &s, RecoveryVms::Fresh);
    let states: usize = fresh.runs.iter().map(|r| r.states.len()).sum();
    assert!(states > 900, "{states} states");
    // The pinned durability violation is among what is compared.
    let pinned: usize = fresh
        .runs
        .iter()
        .map(|r| r.counts.durability_violations)
        .sum();
    assert_eq!(
        pinned, 1,
        "crash-mid-kset-append pins one durability violation"
    );
    let (fork, fresh) = (comparable(fork, &fork_tmp), comparable(fresh, &fresh_tmp));
    for (a, b) in fork.0.iter().zip(&fresh.0) {
        for (x, y) in a.states.iter().zip(&b.states) {
            assert_eq!(x, y, "{}/{}", a.device, a.mode);
        }
    }
    assert_eq!(fork, fresh);
    let _ = std::fs::remove_dir_all(fork_tmp);
    let _ = std::fs::remove_dir_all(fresh_tmp);
}

#[test]
#[ignore = "needs /dev/kvm"]
fn crash_mid_sb_write_holds_its_expectations() {
    let (r, tmp) = run(
        "sb-write",
        "crash-mid-sb-write",
        &load("crash-mid-sb-write"),
    );
    assert!(r.passed, "{:#?}", violations(&r));
    for run in &r.runs {
        assert!(!run.states.is_empty());
        for s in &run.states {
            assert!(s.cut.is_some() && !s.reports.is_empty(), "{}", s.id);
        }
        if run.device == "blank" {
            assert_eq!(run.counts.states, 8, "{}", run.mode);
        }
        if run.device == "older-cache" && run.mode == Mode::Recover {
            assert!(run.states.iter().all(|s| s.usable && !s.older_cache_back));
        }
    }
    std::fs::remove_dir_all(tmp).unwrap();
}

#[test]
#[ignore = "needs /dev/kvm"]
fn corrupt_sb_holds_its_expectations() {
    let (r, tmp) = run("corrupt-sb", "corrupt-sb", &load("corrupt-sb"));
    assert!(r.passed, "{:#?}", violations(&r));
    for run in &r.runs {
        assert_eq!(run.states.len(), 17, "every field and variant ran");
    }
    std::fs::remove_dir_all(tmp).unwrap();
}

#[test]
#[ignore = "needs /dev/kvm"]
fn a_violating_state_is_saved_and_replays_with_the_same_outcome() {
    // corrupt-sb in recover mode, with one expectation made wrong on purpose.
    let mut s = load("corrupt-sb");
    s.modes = vec![Mode::Recover];
    s.expect.retain(|e| e.mode == Mode::Recover);
    s.expect[0].per_image.insert(
        "padding/new-crc".into(),
        scenarios::spec::ImageOutcome::try_from("refused:not-what-happens".to_string()).unwrap(),
    );
    let (r, tmp) = run("replay", "corrupt-sb", &s);
    assert!(!r.passed);
    let bad = violating(&r);
    assert_eq!(bad.len(), 1, "{:#?}", violations(&r));
    assert_eq!(bad[0].id, "padding/new-crc");
    let dir = PathBuf::from(bad[0].saved.as_ref().expect("a violating state is saved"));
    let (meta, rec) =
        runner::replay_saved(&kernel(), &dir, Duration::from_secs(20), false).unwrap();
    assert_eq!(meta.outcome, bad[0].outcome);
    assert_eq!(
        rec.outcome(),
        bad[0].outcome,
        "the replay gives the recorded outcome"
    );
    assert!(rec.failure.is_none(), "{:?}", rec.failure);
    std::fs::remove_dir_all(tmp).unwrap();
}

#[test]
#[ignore = "needs /dev/kvm"]
fn replaying_a_users_image_never_modifies_it() {
    use std::os::unix::fs::MetadataExt;
    let tmp = std::env::temp_dir().join(format!("scn-e2e-cow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let (pmem, disk) = (tmp.join("pmem.img"), tmp.join("disk.img"));
    std::fs::File::create(&pmem)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let before = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.len(), m.blocks(), m.mtime(), m.mtime_nsec())
    };
    let (p0, d0) = (before(&pmem), before(&disk));
    let line = scenarios::guest::cmdline("start;stop;start", Mode::Recover, false);
    let rec = runner::replay(
        &kernel(),
        &pmem,
        &disk,
        &line,
        Duration::from_secs(20),
        false,
    )
    .unwrap();
    // The guest formatted the device and opened it again: it wrote its view...
    assert_eq!(rec.outcome(), "formatted", "{:?}", rec.failure);
    assert!(rec.usable());
    // ...and not the files: still sparse (no block written), same size and mtime.
    assert_eq!(before(&pmem), p0);
    assert_eq!(before(&disk), d0);
    assert_eq!(p0.1, 0, "the blank image is sparse");
    std::fs::remove_dir_all(tmp).unwrap();
}

#[test]
#[ignore = "needs /dev/kvm"]
fn a_violating_crash_state_is_saved_with_its_crash_image_and_replays() {
    // crash-mid-sb-write on the blank device in strict mode, with `refused`
    // forbidden on purpose: its 3 refused states become violations.
    let mut s = load("crash-mid-sb-write");
    s.devices.retain(|d| d.name == "blank");
    s.modes = vec![Mode::Strict];
    s.expect
        .retain(|e| e.device == "blank" && e.mode == Mode::Strict);
    s.expect[0].allowed = vec![scenarios::spec::Outcome::Formatted];
    s.expect[0].counts = None;
    let (r, tmp) = run("replay-cut", "crash-mid-sb-write", &s);
    assert!(!r.passed);
    let bad = violating(&r);
    assert_eq!(bad.len(), 3, "{:#?}", violations(&r));
    for st in bad {
        assert_eq!(st.outcome, "refused");
        assert!(!st.applied.is_empty(), "a refused state has the magic word");
        let dir = PathBuf::from(st.saved.as_ref().expect("saved"));
        let (meta, rec) =
            runner::replay_saved(&kernel(), &dir, Duration::from_secs(20), false).unwrap();
        assert_eq!(meta.state, st.id);
        assert_eq!(rec.outcome(), "refused", "{}: replay differs", st.id);
        assert_eq!(meta.usable, Some(false));
        assert_eq!(meta.failed, Some(false));
        assert!(
            meta.differences(&rec).is_empty(),
            "{:?}",
            meta.differences(&rec)
        );
        // The saved image is the crash image, not what recovery left of it:
        // replaying twice gives the same (nothing of the first replay stuck).
        let (_, again) =
            runner::replay_saved(&kernel(), &dir, Duration::from_secs(20), false).unwrap();
        assert_eq!(again.starts, rec.starts);
    }
    std::fs::remove_dir_all(tmp).unwrap();
}
