//! `cargo xtask merge-results` on shard results written to files: the merged
//! result.json and JUnit XML, the shards' saved states brought in, pinned
//! counts checked, bad sets refused.

use scenarios::result::{DeviceModeRun, ObservedCounts, RunResult, ShardInfo, StateResult};
use scenarios::spec::Mode;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("run xtask")
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn state(i: usize) -> StateResult {
    serde_json::from_value(serde_json::json!({
        "id": format!("blank-strict-{i:04}"), "cut": i, "applied": [],
        "outcome": if i == 2 { "refused" } else { "formatted" },
        "reason": null, "refusal": null, "usable": i != 2, "older-cache-back": false,
        "reports": [], "verdict": "ok", "violations": [],
        // Saved on the shard's machine: only the folder's name is kept.
        "saved": ([1, 2].contains(&i)).then(|| format!("/on/a/runner/blank-strict-{i:04}")),
    }))
    .unwrap()
}

/// A saved state's folder: its images hold `i`.
fn save_state(run: &Path, i: usize) {
    let d = run.join(format!("blank-strict-{i:04}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("pmem.img"), [i as u8; 4096]).unwrap();
    std::fs::write(d.join("disk.img"), [i as u8; 512]).unwrap();
    std::fs::write(d.join("state.json"), format!(r#"{{"state":"{i}"}}"#)).unwrap();
}

/// Shard `k` of 2 of a run of 5 states whose pinned `states` count is `pinned`.
fn shard(dir: &Path, k: usize, pinned: usize) -> PathBuf {
    let states: Vec<StateResult> = (0..5).filter(|i| i % 2 == k - 1).map(state).collect();
    let expect = serde_json::json!([{
        "device": "blank", "mode": "strict",
        "counts": { "states": pinned, "outcomes": { "formatted": 4, "refused": 1 }, "unusable": 1 }
    }]);
    let r = RunResult {
        schema_version: 1,
        scenario: "crash-mid-sb-write".into(),
        started: format!("2026-12-06T00:0{k}:00Z"),
        elapsed_seconds: k as f64,
        runs: vec![DeviceModeRun {
            prefill: None,
            device: "blank".into(),
            mode: Mode::Strict,
            model: serde_json::json!({ "model": "prefix" }),
            counts: ObservedCounts {
                states: states.len(),
                ..Default::default()
            },
            recovery_seconds: 0.5,
            states,
            violations: vec![],
            timeline: None,
        }],
        passed: true,
        partial: false,
        shard: Some(ShardInfo {
            index: k,
            count: 2,
            states_total: vec![5],
        }),
        config: Some(serde_json::json!({
            "command": "scenario", "scenario": { "expect": expect }
        })),
        kernel: None,
    };
    let d = dir.join(format!("shard{k}"));
    std::fs::create_dir_all(&d).unwrap();
    for st in &r.runs[0].states {
        if st.saved.is_some() {
            save_state(&d, st.cut.unwrap());
        }
    }
    std::fs::write(
        d.join("result.json"),
        serde_json::to_vec_pretty(&r).unwrap(),
    )
    .unwrap();
    d
}

#[test]
fn merge_results_joins_shards_and_checks_the_pins() {
    let t = TempDir(std::env::temp_dir().join(format!("xtask-merge-{}", std::process::id())));
    let (a, b) = (shard(&t.0, 1, 5), shard(&t.0, 2, 5));
    let out = t.0.join("merged");
    let junit = t.0.join("junit.xml");
    let p = |p: &Path| p.display().to_string();
    // Folders or files, in any order.
    let o = xtask(&[
        "merge-results",
        &p(&b.join("result.json")),
        &p(&a),
        "--out",
        &p(&out),
        "--junit",
        &p(&junit),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("crash-mid-sb-write in 2.0 s: PASSED"),
        "{stdout}"
    );
    let merged: RunResult =
        serde_json::from_slice(&std::fs::read(out.join("result.json")).unwrap()).unwrap();
    let ids: Vec<&str> = merged.runs[0]
        .states
        .iter()
        .map(|s| s.id.as_str())
        .collect();
    assert_eq!(
        ids,
        [
            "blank-strict-0000",
            "blank-strict-0001",
            "blank-strict-0002",
            "blank-strict-0003",
            "blank-strict-0004"
        ]
    );
    assert_eq!(merged.runs[0].counts.states, 5);
    assert_eq!(merged.runs[0].counts.unusable, 1);
    assert!(merged.passed && merged.shard.is_none());
    assert_eq!(merged.runs[0].recovery_seconds, 1.0);
    assert!(out.join("report.html").exists(), "the merged run's page");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains(r#"tests="5""#), "{xml}");
    // The shards' saved states are in the merged run, and its states name them.
    for i in [1usize, 2] {
        let d = out.join(format!("blank-strict-{i:04}"));
        assert_eq!(std::fs::read(d.join("pmem.img")).unwrap(), [i as u8; 4096]);
        assert_eq!(std::fs::read(d.join("disk.img")).unwrap(), [i as u8; 512]);
        assert!(d.join("state.json").is_file());
        assert_eq!(merged.runs[0].states[i].saved, Some(p(&d)));
    }
    assert_eq!(merged.runs[0].states[0].saved, None);

    // Merging again into the same folder: the saved states' names are taken.
    let o = xtask(&["merge-results", &p(&a), &p(&b), "--out", &p(&out)]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains(&format!(
            "{} already exists: a shard's saved state has that name",
            p(&out.join("blank-strict-0001"))
        )),
        "{stderr}"
    );

    // A saved state missing beside its shard's result: merged without it.
    std::fs::remove_dir_all(a.join("blank-strict-0002")).unwrap();
    let out2 = t.0.join("merged2");
    let o = xtask(&["merge-results", &p(&a), &p(&b), "--out", &p(&out2)]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: the saved state `blank-strict-0002` is not in"),
        "{stderr}"
    );
    assert!(out2.join("blank-strict-0001").join("pmem.img").is_file());
    assert!(!out2.join("blank-strict-0002").exists());

    // A pin the whole run breaks: merged, and failed.
    let (a, b) = (shard(&t.0, 1, 6), shard(&t.0, 2, 6));
    let out = t.0.join("merged-pinned");
    let o = xtask(&["merge-results", &p(&a), &p(&b), "--out", &p(&out)]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success());
    assert!(
        stdout.contains("violation: pinned count `states`: expected 6, got 5"),
        "{stdout}"
    );

    // A missing shard: nothing merged.
    let o = xtask(&["merge-results", &p(&a), "--out", &p(&t.0.join("none"))]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("shard(s) 2/2 of 2 missing"), "{stderr}");
    assert!(!t.0.join("none").join("result.json").exists());

    // A shard holding a `--kernel` result (never sharded): refused by name,
    // not merged without it.
    let (a, b) = (shard(&t.0, 1, 5), shard(&t.0, 2, 5));
    let file = b.join("result.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    v["kernel"] = serde_json::json!({
        "scenario": "crash-mid-sb-write", "trace_boot_seconds": 60.0,
        "devices": [{
            "device": "blank", "kernel_events": 10, "kernel_epochs": 2,
            "trace_difference": null, "kernel_window": [1, 9], "kernel_states": 1,
            "strict_states": 1, "strict_states_aligned": 1,
            "all_states_host": {}, "tried": 1,
            "counts": { "kernel": { "opened": 1 } }, "kernel_agrees": 1,
            "states": [{ "id": "s0-cut1-0", "strict": "opened", "recover": "opened",
                         "kernel": "opened", "kernel_agrees_with_strict": true }],
            "boots": [20.0], "seconds_per_state": 20.0
        }]
    });
    std::fs::write(&file, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let o = xtask(&["merge-results", &p(&a), &p(&b), "--out", &p(&t.0.join("k"))]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains(&format!(
            "{}: holds a `kernel` result (from --kernel), which shards never have",
            p(&file)
        )),
        "{stderr}"
    );
    assert!(!t.0.join("k").join("result.json").exists());
}
