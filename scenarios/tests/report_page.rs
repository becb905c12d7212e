//! The report page in a real headless browser (Debian's `chromium`): a
//! result built here (no KVM: a violating state, a timeline with crash-point
//! and op markers, a minimized write set, and a run of thousands of states)
//! goes through result.json, is rendered, opened from disk (`file://`), and
//! checked as the browser shows it: its DOM (`--dump-dom`) and a screenshot
//! that must not be blank.
//!
//! A missing browser is a failure that names the package: the page is part
//! of every run's output, and a test that skips is a test that never fails.

use scenarios::report;
use scenarios::result::{
    AppliedWrite, DeviceModeRun, KernelDeviceRun, KernelRun, KernelStateRow, Minimized,
    MinimizedWrite, ObservedCounts, RunResult, StateResult, Timeline, TimelineMarker, Verdict,
    KERNEL_NOT_RUN,
};
use scenarios::spec::Mode;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUN_DIR: &str = "results/demo/2026-12-05T000000Z";
/// An id a page must show as text, never as markup.
const HOSTILE_ID: &str = "blank-strict-<script>alert(1)</script>";

fn state(id: &str, cut: usize, outcome: &str) -> StateResult {
    StateResult {
        id: id.into(),
        cut: Some(cut),
        applied: vec![],
        settled: None,
        applied_omitted: None,
        outcome: outcome.into(),
        reason: None,
        refusal: None,
        usable: outcome != "refused",
        older_cache_back: false,
        reports: vec![],
        failure: None,
        verdict: Verdict::Ok,
        violations: vec![],
        saved: None,
        durability: None,
        minimized: None,
    }
}

fn pmem(event: usize, offset: u64) -> AppliedWrite {
    AppliedWrite::Pmem {
        event,
        offset,
        len: 8,
        value: format!("{:016x}", event * 0x1111),
    }
}

fn marker(pos: usize, name: &str) -> TimelineMarker {
    TimelineMarker {
        pos,
        name: name.into(),
    }
}

/// A small power-cut run: 40 positions, a key-set append (C8) around a data
/// write (C10), op markers, and one violating state with a minimized set.
fn small_run() -> DeviceModeRun {
    let mut states: Vec<StateResult> = (0..40)
        .map(|k| {
            let outcome = if (12..20).contains(&k) {
                "refused"
            } else {
                "opened"
            };
            state(&format!("blank-strict-{k:04}"), 100 + k, outcome)
        })
        .collect();
    let bad = &mut states[7];
    bad.outcome = "refused".into();
    bad.usable = false;
    bad.reason = Some("corrupted kset <b>& \"stale\"".into());
    bad.refusal = Some("kset-crc".into());
    bad.applied = (0..5)
        .map(|k| pmem(101 + k, 0x5000 + 8 * k as u64))
        .collect();
    bad.settled = Some(96);
    bad.applied_omitted = Some(2000);
    bad.violations = vec![
        "outcome `refused` is not allowed (allowed: opened)".into(),
        "not usable".into(),
    ];
    bad.saved = Some("/somewhere/results/demo/run/blank-strict-0007".into());
    bad.reports = vec![serde_json::json!({"step": "start", "msg": "</pre><h1>x</h1>"})];
    bad.minimized = Some(Minimized {
        writes: vec![MinimizedWrite {
            write: pmem(103, 0x5010),
            context: "inside C8 (key-set append): word 3 of 8 persisted without word 1".into(),
        }],
        boots: 11,
        from: 5,
    });
    // A violating state whose id is markup.
    states[30].id = HOSTILE_ID.into();
    states[30].violations = vec!["durability: sectors 0..8 read <img src=x>".into()];
    states[30].saved = Some(format!("/x/{}", HOSTILE_ID.replace('/', "_")));

    let mut run = DeviceModeRun {
        prefill: None,
        device: "blank".into(),
        mode: Mode::Strict,
        model: serde_json::json!({"model": "subsets"}),
        counts: ObservedCounts {
            pairs_full: 90,
            pairs_tried: 60,
            ..Default::default()
        },
        recovery_seconds: 0.5,
        states,
        violations: vec![],
        timeline: Some(Timeline {
            events: 160,
            markers: vec![
                marker(20, "op0-done"),
                marker(99, "C8-begin"),
                marker(104, "C10-begin"),
                marker(110, "C10-end"),
                marker(125, "C8-end"),
                marker(130, "op1-done"),
                marker(150, "op2-done"),
            ],
            windows: vec![(100, 139)],
        }),
    };
    for s in &mut run.states {
        if !s.violations.is_empty() {
            s.verdict = Verdict::Violation;
        }
    }
    run.finish(None);
    run
}

/// A large run: 6000 states over 3000 cut positions, 150 of them violating.
fn large_run() -> DeviceModeRun {
    let outcomes = ["opened", "formatted", "format-redone", "refused"];
    let states: Vec<StateResult> = (0..6000)
        .map(|k| {
            let mut s = state(
                &format!("big-recover-{k:05}"),
                k / 2,
                outcomes[(k / 700) % outcomes.len()],
            );
            if k % 40 == 0 {
                s.violations = vec!["not usable".into()];
                s.saved = Some(format!("/r/big-recover-{k:05}"));
            }
            s
        })
        .collect();
    let markers = (0..300)
        .flat_map(|k| {
            [
                marker(k * 10, "C10-begin"),
                marker(k * 10 + 6, "C10-end"),
                marker(k * 10 + 8, &format!("op{k}-done")),
            ]
        })
        .collect();
    let mut run = DeviceModeRun {
        prefill: None,
        device: "big".into(),
        mode: Mode::Recover,
        model: serde_json::json!({"model": "prefix"}),
        counts: ObservedCounts::default(),
        recovery_seconds: 3.0,
        states,
        violations: vec!["pinned count `states`: expected 5999, got 6000".into()],
        timeline: Some(Timeline {
            events: 3000,
            markers,
            windows: vec![(0, 2999)],
        }),
    };
    run.finish(None);
    run
}

fn row(id: &str, strict: &str, recover: &str, kernel: &str, agrees: bool) -> KernelStateRow {
    KernelStateRow {
        id: id.into(),
        strict: strict.into(),
        recover: recover.into(),
        kernel: kernel.into(),
        kernel_agrees_with_strict: agrees,
    }
}

/// A `--kernel` run of one device: four states, one where the kernel's
/// outcome differs from strict's (with markup in its message), one the
/// kernel did not get to.
fn kernel_run() -> KernelRun {
    let states = vec![
        row("s0-cut40-0", "opened", "opened", "opened", true),
        row(
            "s9-cut51-3",
            "opened",
            "formatted",
            "refused (pcache: <img src=y> & bad sb)",
            false,
        ),
        row(
            "s14-cut55-4",
            "refused:seg-num",
            "opened (older cache back)",
            "refused (pcache: seg_num)",
            true,
        ),
        row("s20-cut60-9", "opened", "opened", KERNEL_NOT_RUN, false),
    ];
    KernelRun {
        scenario: "demo".into(),
        trace_boot_seconds: 61.5,
        devices: vec![KernelDeviceRun {
            device: "blank".into(),
            kernel_events: 120,
            kernel_epochs: 9,
            trace_difference: None,
            kernel_window: (40, 77),
            kernel_states: 30,
            strict_states: 28,
            strict_states_aligned: 30,
            all_states_host: [
                ("strict".to_string(), [("opened".to_string(), 30)].into()),
                ("recover".to_string(), [("opened".to_string(), 30)].into()),
            ]
            .into(),
            tried: 3,
            counts: KernelDeviceRun::count(&states),
            kernel_agrees: 2,
            states,
            boots: vec![42.5],
            seconds_per_state: 42.5 / 3.0,
        }],
    }
}

fn fixture() -> RunResult {
    RunResult {
        schema_version: 1,
        scenario: "demo".into(),
        started: "2026-12-05T00:00:00Z".into(),
        elapsed_seconds: 4.2,
        runs: vec![small_run(), large_run()],
        passed: false,
        partial: false,
        shard: None,
        config: None,
        kernel: Some(kernel_run()),
    }
}

/// Headless Chromium: `$CHROMIUM`, else `chromium` or `chromium-browser` on
/// the PATH.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "headless Chromium not found: install Debian's `chromium` package \
         (apt-get install chromium), or set CHROMIUM to a Chromium binary"
    );
}

/// Runs the browser on `page` with `args`, in its own profile under `scratch`;
/// returns its standard output. A browser that hangs is killed.
fn browse(scratch: &Path, page: &Path, args: &[&str]) -> String {
    let out_path = scratch.join("stdout");
    let err_path = scratch.join("stderr");
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            // As root (CI) Chromium refuses to start with its sandbox.
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!(
            "--user-data-dir={}",
            scratch.join("profile").display()
        ))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("chromium starts");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish in 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(status.success(), "chromium failed ({status}): {stderr}");
    std::fs::read_to_string(&out_path).unwrap()
}

/// The number of times `needle` occurs in `hay`.
fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

/// The part of the DOM from `start` up to the next `end`.
fn between<'a>(dom: &'a str, start: &str, end: &str) -> &'a str {
    let a = dom
        .find(start)
        .unwrap_or_else(|| panic!("`{start}` not in the page"));
    let rest = &dom[a..];
    &rest[..rest.find(end).unwrap_or(rest.len())]
}

#[test]
fn the_report_page_shows_counts_timeline_and_violations_in_headless_chromium() {
    let scratch = tempfile::tempdir().unwrap();
    let run_dir = scratch.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    // Through result.json, as `cargo xtask report` reads it.
    let json = serde_json::to_vec_pretty(&fixture()).unwrap();
    std::fs::write(run_dir.join("result.json"), &json).unwrap();
    let result: RunResult = serde_json::from_slice(&json).unwrap();
    assert_eq!(
        result,
        fixture(),
        "timeline and minimized survive result.json"
    );
    let page = report::write(&run_dir, &result, RUN_DIR).unwrap();
    assert_eq!(page, run_dir.join("report.html"));

    let dom = browse(scratch.path(), &page, &["--dump-dom"]);
    // The verdict and the counts per device and mode.
    assert!(dom.contains(r#"id="verdict">FAILED<"#), "{dom}");
    let small = between(&dom, r#"<tr data-run="0">"#, "</tr>");
    assert!(small.contains(r#"data-count="states">40<"#), "{small}");
    assert!(small.contains(r#"data-count="unusable">9<"#), "{small}");
    assert!(small.contains(r#"data-count="violations">2<"#), "{small}");
    assert!(small.contains(r#"data-count="pairs">60 / 90<"#), "{small}");
    assert!(
        small.contains("opened 31") && small.contains("refused 9"),
        "{small}"
    );
    let large = between(&dom, r#"<tr data-run="1">"#, "</tr>");
    assert!(large.contains(r#"data-count="states">6000<"#), "{large}");
    // 150 violating states and the failed pin.
    assert!(large.contains(r#"data-count="violations">151<"#), "{large}");

    // The timeline: the sequences and op markers, one column per cut.
    let tl = between(&dom, r#"<svg id="timeline-0""#, "</svg>");
    assert!(
        tl.contains("C8 (key-set append): C8-begin at 99, C8-end at 125"),
        "{tl}"
    );
    assert!(tl.contains("C10 (data write)"), "{tl}");
    assert!(tl.contains("op1-done at 130"), "{tl}");
    assert_eq!(count(tl, r#"<g class="cut">"#), 40, "{tl}");
    assert!(
        tl.contains("cut at 107: 1 state(s): refused 1, 1 violating"),
        "{tl}"
    );
    assert!(tl.contains("href=\"#st-0-7\""), "{tl}");

    // The whole trace above the window of the small run only (the large
    // run's window is all of it).
    assert_eq!(count(&dom, r#"<svg class="overview""#), 1);

    // The violating state: its violations, the cut in words, the command
    // that replays it, its minimized write set.
    let entry = between(&dom, r#"<article class="state" id="st-0-7">"#, "</article>");
    assert!(entry.contains("blank-strict-0007"), "{entry}");
    assert!(
        entry.contains("after C10-begin (at 104), before C10-end (at 110)"),
        "{entry}"
    );
    assert!(
        entry.contains(&format!(
            "cargo xtask reproduce {RUN_DIR}/blank-strict-0007"
        )),
        "{entry}"
    );
    assert!(
        entry.contains("outcome `refused` is not allowed"),
        "{entry}"
    );
    assert!(
        entry.contains("corrupted kset &lt;b&gt;&amp; \"stale\""),
        "{entry}"
    );
    assert!(
        entry.contains("<b>1 of 5</b> applied write(s) still violate (11 recovery boots)"),
        "{entry}"
    );
    assert!(
        entry.contains("word 3 of 8 persisted without word 1"),
        "{entry}"
    );
    assert!(entry.contains("pmem  event 103: 8 B at 0x5010"), "{entry}");
    assert!(
        entry.contains("Applied writes still pending at the cut: 2005"),
        "{entry}"
    );
    assert!(
        entry.contains("96 settled + 2005 pending write(s) applied"),
        "{entry}"
    );
    assert!(
        entry.contains("… and 2000 more (2000 of them not listed in result.json either)"),
        "{entry}"
    );

    // The kernel's column beside strict's and recover's, per state, with
    // the row where it differs from strict's marked.
    let section = between(
        &dom,
        r#"<section class="run kernel" id="kernel-0">"#,
        "</section>",
    );
    assert!(
        section.contains(r#"kernel = strict on <span data-count="agrees">2</span> of 3"#),
        "{section}"
    );
    let table = between(section, r#"<table id="kernel-states-0">"#, "</table>");
    assert!(
        table.contains("<th>strict</th><th>recover</th><th>kernel</th>"),
        "{table}"
    );
    let cells = |id: &str, class: &str| {
        let tr = between(
            table,
            &format!(r#"<tr class="{class}" data-state="{id}">"#),
            "</tr>",
        );
        let cell = |col: &str| {
            let td = between(tr, &format!(r#"<td data-col="{col}">"#), "</td>");
            td[td.rfind("</span>").expect("a swatch") + 7..].to_string()
        };
        (
            cell("strict"),
            cell("recover"),
            cell("kernel"),
            tr.to_string(),
        )
    };
    let (st, rec, ker, _) = cells("s0-cut40-0", "agrees");
    assert_eq!((&*st, &*rec, &*ker), ("opened", "opened", "opened"));
    let (st, rec, ker, tr) = cells("s9-cut51-3", "differs");
    assert_eq!(
        (&*st, &*rec, &*ker),
        (
            "opened",
            "formatted",
            "refused (pcache: &lt;img src=y&gt; &amp; bad sb)"
        )
    );
    assert!(tr.contains("≠ differs"), "{tr}");
    let (st, rec, ker, _) = cells("s14-cut55-4", "agrees");
    assert_eq!(
        (&*st, &*rec, &*ker),
        (
            "refused:seg-num",
            "opened (older cache back)",
            "refused (pcache: seg_num)"
        )
    );
    let (_, _, ker, _) = cells("s20-cut60-9", "notrun");
    assert_eq!(ker, KERNEL_NOT_RUN);
    // Only the one row is marked.
    assert_eq!(count(table, r#"<tr class="differs""#), 1, "{table}");
    // The counts of each column over the states the kernel ran.
    let counts = between(section, r#"<table id="kernel-counts-0">"#, "</table>");
    let col = |c: &str| between(counts, &format!(r#"<tr data-col="{c}">"#), "</tr>").to_string();
    let (strict, recover, kernel) = (col("strict"), col("recover"), col("kernel"));
    assert!(
        strict.contains("opened 2") && strict.contains("refused:seg-num 1"),
        "{strict}"
    );
    assert!(
        recover.contains("formatted 1") && recover.contains("opened (older cache back) 1"),
        "{recover}"
    );
    assert!(
        kernel.contains("opened 1") && kernel.contains("refused 2"),
        "{kernel}"
    );
    assert!(counts.contains(r#"data-count="differs">1<"#), "{counts}");
    // What the kernel's boots cost.
    let cost = between(section, r#"id="kernel-cost-0""#, "</p>");
    assert!(cost.contains(r#"data-count="tried">3<"#), "{cost}");
    assert!(cost.contains(r#"data-cost="boots">1<"#), "{cost}");
    assert!(cost.contains(r#"data-cost="boot-seconds">42.5<"#), "{cost}");
    assert!(
        cost.contains(r#"data-cost="seconds-per-state">14.17<"#),
        "{cost}"
    );
    assert!(dom.contains(r#"data-cost="trace-boot-seconds">61.5<"#));

    // Strings from the result are text, never markup.
    assert!(!dom.contains("<script"), "a script element made it in");
    assert!(!dom.contains("<img"), "an img element made it in");
    assert!(!dom.contains("<h1>x</h1>"), "a report's markup made it in");
    let hostile = between(
        &dom,
        r#"<article class="state" id="st-0-30">"#,
        "</article>",
    );
    assert!(
        hostile.contains("blank-strict-&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{hostile}"
    );
    assert!(
        hostile.contains("cargo xtask reproduce 'results/demo/2026-12-05T000000Z/blank-strict-&lt;script&gt;alert(1)&lt;_script&gt;'"),
        "{hostile}"
    );

    // The large run stays usable: columns and detailed entries are capped,
    // the rest is counted.
    let tl = between(&dom, r#"<svg id="timeline-1""#, "</svg>");
    let columns = count(tl, r#"<g class="cut">"#);
    assert!(
        columns > 100 && columns <= report::MAX_BINS,
        "{columns} columns"
    );
    assert_eq!(
        count(&dom, r#"<article class="state" id="st-1-"#),
        report::MAX_DETAILED
    );
    assert!(
        dom.contains("50 more violating states"),
        "the rest is named"
    );
    assert!(dom.contains("pinned count `states`: expected 5999, got 6000"));

    // What the page looks like: not blank, with the outcome colours drawn.
    let shot = scratch.path().join("shot.png");
    browse(
        scratch.path(),
        &page,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1600",
        ],
    );
    // To look at them: REPORT_PAGE_OUT=DIR keeps the page and the screenshot.
    if let Some(out) = std::env::var_os("REPORT_PAGE_OUT") {
        let out = PathBuf::from(out);
        std::fs::create_dir_all(&out).unwrap();
        std::fs::copy(&page, out.join("report.html")).unwrap();
        std::fs::copy(&shot, out.join("report.png")).unwrap();
    }
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1280, 1600));
    let channels = info.color_type.samples();
    assert!(channels >= 3, "{:?}", info.color_type);
    let pixels: std::collections::HashSet<[u8; 3]> = buf[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    assert!(
        pixels.len() > 50,
        "{} distinct colours: a blank page?",
        pixels.len()
    );
    // The opened (green) and refused (orange) columns of the first timeline,
    // and the violation mark (red).
    for (what, rgb) in [
        ("opened", [0x2e, 0x9e, 0x44]),
        ("refused", [0xe0, 0x8a, 0x1e]),
        ("violation", [0xd6, 0x27, 0x28]),
    ] {
        assert!(
            pixels.contains(&rgb),
            "no {what} colour {rgb:02x?} in the screenshot"
        );
    }
}
