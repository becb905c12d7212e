//! The report page of a run: `results/NAME/<run>/report.html`, one static
//! file beside `result.json`. Inline CSS and SVG only: no script and no
//! network (a Content-Security-Policy says so to the browser), so it opens
//! from disk, from a CI artifact or from an e-mail alike.
//!
//! Per device and mode it shows the counts, the trace as a timeline with its
//! markers (the crash-point sequences `C<n>` of docs/format.md §10 as bands,
//! op markers as ticks), every cut point coloured by outcome (grouped into at
//! most [`MAX_BINS`] columns, violations marked), and each violating state
//! with its applied writes, its minimized write set when there is one, and
//! the command that replays it. A `--kernel` run adds, per device, the
//! states the kernel recovered with the strict, recover and kernel outcomes
//! side by side (the rows where the kernel's differs from strict's marked),
//! their counts and what the kernel's boots cost. Every string from the
//! result is HTML-escaped: state ids, reasons, guest reports and the
//! kernel's messages can hold anything.

use crate::result::{
    AppliedWrite, DeviceModeRun, KernelDeviceRun, KernelRun, RunResult, StateResult, Timeline,
};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The page's file name in a run's folder.
pub const REPORT_FILE: &str = "report.html";

/// Most columns of cut points in a timeline (positions are grouped beyond).
pub const MAX_BINS: usize = 240;
/// Most violating states detailed per device and mode (the rest are named).
pub const MAX_DETAILED: usize = 100;
/// Most states named in a list (ids of the violating states not detailed,
/// states of an image set).
pub const MAX_LISTED: usize = 500;
/// Most applied writes listed per state.
pub const MAX_APPLIED: usize = 64;
/// Most rows of the markers table.
pub const MAX_MARKER_ROWS: usize = 200;
/// Tables of at most this many rows are shown open.
const OPEN_ROWS: usize = 12;
/// Longest guest report text shown per state (characters).
pub const MAX_REPORT_CHARS: usize = 4000;

/// Writes the page of `result` into `dir` (atomically) and returns its path.
/// `run_dir` is how the run's folder is named in the reproduce commands
/// (`results/NAME/<run>`, relative to the workspace root).
pub fn write(dir: &Path, result: &RunResult, run_dir: &str) -> std::io::Result<PathBuf> {
    let path = dir.join(REPORT_FILE);
    crate::result::write_atomic(&path, render(result, run_dir).as_bytes())?;
    Ok(path)
}

/// The command that replays a saved state, or `None` when its images were
/// not saved (only violating states are).
pub fn reproduce_command(run_dir: &str, state: &StateResult) -> Option<String> {
    // Named from the run's folder as given, so that a page of a CI artifact
    // stays right.
    let folder = state.saved_folder()?;
    let dir = format!("{}/{folder}", run_dir.trim_end_matches('/'));
    Some(format!("cargo xtask reproduce {}", shell_quote(&dir)))
}

/// `s` as one shell word.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:+=@,%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The colour of an outcome (a fixed palette: the same outcome looks the
/// same on every page).
fn outcome_colour(outcome: &str) -> &'static str {
    match outcome {
        "opened" => "#2e9e44",
        "formatted" => "#3b7dd8",
        "format-redone" => "#17a2b8",
        "superblock-rebuilt" => "#8e5cc4",
        "refused" => "#e08a1e",
        "guest-failure" => "#222222",
        "no-start" => "#8a8a8a",
        _ => "#c0c0c0",
    }
}

const VIOLATION_COLOUR: &str = "#d62728";

/// What crash point `Cn` writes (docs/format.md §10.3).
fn sequence_name(n: u32) -> &'static str {
    match n {
        1 => "zero cache_info and cache_ctrl",
        2 => "superblock write",
        3 => "segment format",
        4 => "cache_info update",
        5 => "tail update",
        6 => "seg_info update",
        7 => "generation update",
        8 => "key-set append",
        9 => "log segment switch",
        10 => "data write",
        11 => "writeback",
        12 => "GC",
        _ => "",
    }
}

/// `C8-begin` → `(8, false)`.
fn crash_point(name: &str) -> Option<(u32, bool)> {
    let rest = name.strip_prefix('C')?;
    let (n, which) = rest.split_once('-')?;
    let n = n.parse().ok()?;
    match which {
        "begin" => Some((n, false)),
        "end" => Some((n, true)),
        _ => None,
    }
}

const CSS: &str = "
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0}h1 code{font-size:20px}h2{font-size:18px;margin:28px 0 8px}h3{font-size:15px;margin:0 0 6px}
.badge{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:600;font-size:13px;vertical-align:middle}
.pass{background:#2e9e44}.fail{background:#d62728}
.meta{color:#555}
table{border-collapse:collapse;margin:6px 0;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.chip{display:inline-block;margin:1px 6px 1px 0;white-space:nowrap}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px;vertical-align:baseline}
section.run{background:#fff;border:1px solid #ddd;border-radius:6px;padding:4px 16px 16px;margin:16px 0}
article.state{border-left:4px solid #d62728;background:#fff7f7;padding:8px 12px;margin:10px 0}
pre{background:#f4f4f4;padding:6px 8px;overflow-x:auto;white-space:pre-wrap;word-break:break-all;margin:4px 0}
pre.cmd{background:#1d1d1f;color:#f0f0f0}
code{font-family:ui-monospace,'DejaVu Sans Mono',monospace;font-size:12.5px}
ul.v{color:#a01010;margin:4px 0}
svg{display:block;margin:6px 0}
svg text{font:11px system-ui,sans-serif;fill:#333}
.muted{color:#777}
.badge.diff{background:#e08a1e}
tr.differs td{background:#fde8e8}
tr.differs td.agree{color:#d62728;font-weight:600}
tr.notrun td{color:#777}
";

/// The whole page.
pub fn render(result: &RunResult, run_dir: &str) -> String {
    let mut h = String::new();
    let verdict = if result.passed { "PASSED" } else { "FAILED" };
    let class = if result.passed { "pass" } else { "fail" };
    let states: usize = result.runs.iter().map(|r| r.states.len()).sum();
    let violating: usize = result
        .runs
        .iter()
        .map(|r| r.states.iter().filter(|s| !s.violations.is_empty()).count())
        .sum();
    let _ = writeln!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{} {verdict}: pcache scenario report</title><style>{CSS}</style></head><body><main>",
        esc(&result.scenario)
    );
    let _ = writeln!(
        h,
        "<h1>Scenario <code id=\"scenario\">{}</code> <span class=\"badge {class}\" id=\"verdict\">{verdict}</span></h1>\
         <p class=\"meta\">started {} · {:.1} s · {} device/mode run(s) · <span id=\"total-states\">{states}</span> states · \
         <span id=\"total-violating\">{violating}</span> violating · results in <code>{}</code></p>",
        esc(&result.scenario),
        esc(&result.started),
        result.elapsed_seconds,
        result.runs.len(),
        esc(run_dir),
    );
    summary(&mut h, result);
    legend(&mut h, result);
    if let Some(k) = &result.kernel {
        kernel_sections(&mut h, k);
    }
    for (i, run) in result.runs.iter().enumerate() {
        run_section(&mut h, i, run, run_dir);
    }
    h.push_str("</main></body></html>\n");
    h
}

/// The class of an outcome label (`refused:seg-num` → `refused`, `opened
/// (older cache back)` → `opened`), for its colour.
fn outcome_class(label: &str) -> &str {
    label.split([':', ' ', ',']).next().unwrap_or(label)
}

/// A table cell of an outcome label, with its colour.
fn outcome_cell(col: &str, label: &str) -> String {
    format!(
        "<td data-col=\"{col}\"><span class=\"sw\" style=\"background:{}\"></span>{}</td>",
        outcome_colour(outcome_class(label)),
        esc(label)
    )
}

/// `--kernel`: per device, the three outcomes of every state the kernel
/// recovered side by side, their counts, and what the kernel's boots cost.
fn kernel_sections(h: &mut String, k: &KernelRun) {
    let _ = writeln!(
        h,
        "<h2 id=\"kernel\">Against the kernel: strict, recover and kernel</h2>\
         <p class=\"meta\">Linux's own dm-pcache under QEMU: the crash states of the scenario's \
         model over the <em>kernel's</em> trace of its workload (traced boot \
         <span data-cost=\"trace-boot-seconds\">{:.1}</span> s), each recovered by the kernel, \
         beside strict and recover mode's outcomes on the same state (host activations). \
         A kernel outcome is strict's when the kernel left exactly strict mode's image.</p>",
        k.trace_boot_seconds
    );
    for (i, d) in k.devices.iter().enumerate() {
        kernel_device(h, i, d);
    }
}

fn kernel_device(h: &mut String, i: usize, d: &KernelDeviceRun) {
    let differ = d.tried - d.kernel_agrees.min(d.tried);
    let badge = if differ == 0 { "pass" } else { "diff" };
    let _ = writeln!(
        h,
        "<section class=\"run kernel\" id=\"kernel-{i}\"><h2>{} against the kernel \
         <span class=\"badge {badge}\">kernel = strict on <span data-count=\"agrees\">{}</span> of {}</span></h2>",
        esc(&d.device),
        d.kernel_agrees,
        d.tried
    );
    let trace = match &d.trace_difference {
        None => "agrees with strict mode's epoch by epoch".to_string(),
        Some(w) => format!("differs from strict mode's: {}", esc(w)),
    };
    let boot_seconds: f64 = d.boots.iter().sum();
    let _ = writeln!(
        h,
        "<p class=\"meta\">The kernel's trace: {} events, {} epochs; it {trace}. Window: cut positions {}..={}. \
         Distinct states: kernel's trace {}, strict's {} (in the epoch-aligned window {}).</p>\
         <p class=\"meta\" id=\"kernel-cost-{i}\"><span data-count=\"tried\">{}</span> of {} states recovered by the kernel \
         in <span data-cost=\"boots\">{}</span> boot(s) of <span data-cost=\"boot-seconds\">{boot_seconds:.1}</span> s: \
         <span data-cost=\"seconds-per-state\">{:.2}</span> s per state.</p>",
        d.kernel_events,
        d.kernel_epochs,
        d.kernel_window.0,
        d.kernel_window.1,
        d.kernel_states,
        d.strict_states,
        d.strict_states_aligned,
        d.tried,
        d.kernel_states,
        d.boots.len(),
        d.seconds_per_state,
    );
    // The counts over the states the kernel recovered, one row per column.
    let _ = writeln!(
        h,
        "<table id=\"kernel-counts-{i}\"><tr><th>column</th><th>states</th><th>outcomes (of the {} the kernel recovered)</th></tr>",
        d.tried
    );
    for col in ["strict", "recover", "kernel"] {
        let empty = BTreeMap::new();
        let c = d.counts.get(col).unwrap_or(&empty);
        let _ = writeln!(
            h,
            "<tr data-col=\"{col}\"><td>{col}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            c.values().sum::<usize>(),
            outcome_chips(c)
        );
    }
    let _ = writeln!(
        h,
        "<tr class=\"{}\"><td>kernel ≠ strict</td><td class=\"n\" data-count=\"differs\">{differ}</td><td></td></tr></table>",
        if differ > 0 { "differs" } else { "" }
    );
    if !d.all_states_host.is_empty() {
        let _ = write!(
            h,
            "<p class=\"meta\">All {} states of the kernel's trace, on the host:</p><table id=\"kernel-host-{i}\">",
            d.kernel_states
        );
        // Strict's first, as in the tables around it.
        let mut cols: Vec<_> = d.all_states_host.iter().collect();
        cols.sort_by_key(|(col, _)| (col.as_str() != "strict", col.as_str() != "recover"));
        for (col, c) in cols {
            let _ = write!(
                h,
                "<tr data-col=\"{}\"><td>{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
                esc(col),
                esc(col),
                c.values().sum::<usize>(),
                outcome_chips(c)
            );
        }
        h.push_str("</table>\n");
    }
    let _ = writeln!(
        h,
        "<details open><summary>States: {} (kernel ≠ strict marked)</summary><table id=\"kernel-states-{i}\">\
         <tr><th>state</th><th>strict</th><th>recover</th><th>kernel</th><th>kernel = strict</th></tr>",
        d.states.len()
    );
    for r in d.states.iter().take(MAX_LISTED) {
        let (class, agree) = if !r.ran() {
            ("notrun", "not run")
        } else if r.kernel_agrees_with_strict {
            ("agrees", "yes")
        } else {
            ("differs", "≠ differs")
        };
        let _ = writeln!(
            h,
            "<tr class=\"{class}\" data-state=\"{}\"><td><code>{}</code></td>{}{}{}<td class=\"agree\">{agree}</td></tr>",
            esc(&r.id),
            esc(&r.id),
            outcome_cell("strict", &r.strict),
            outcome_cell("recover", &r.recover),
            outcome_cell("kernel", &r.kernel),
        );
    }
    h.push_str("</table>");
    more_states(h, d.states.len());
    h.push_str("</details></section>\n");
}

/// One row of counts per device and mode.
fn summary(h: &mut String, result: &RunResult) {
    h.push_str(
        "<h2>Counts</h2><table id=\"counts\"><tr><th>device</th><th>mode</th><th>states</th>\
         <th>outcomes</th><th>unusable</th><th>durability violations</th><th>older cache back</th>\
         <th>pairs tried / full</th><th>duplicates</th><th>violations</th><th>states/s</th></tr>\n",
    );
    for (i, run) in result.runs.iter().enumerate() {
        let c = &run.counts;
        let _ = writeln!(
            h,
            "<tr data-run=\"{i}\"><td><a href=\"#run-{i}\">{}</a></td><td>{}</td>\
             <td class=\"n\" data-count=\"states\">{}</td><td>{}</td>\
             <td class=\"n\" data-count=\"unusable\">{}</td>\
             <td class=\"n\" data-count=\"durability-violations\">{}</td>\
             <td class=\"n\" data-count=\"older-cache-back\">{}</td>\
             <td class=\"n\" data-count=\"pairs\">{} / {}</td>\
             <td class=\"n\" data-count=\"duplicates\">{}</td>\
             <td class=\"n\" data-count=\"violations\">{}</td><td class=\"n\">{:.0}</td></tr>",
            esc(&run.device),
            esc(&run.mode.to_string()),
            c.states,
            outcome_chips(&c.outcomes),
            c.unusable,
            c.durability_violations,
            c.older_cache_back,
            c.pairs_tried,
            c.pairs_full,
            c.duplicates,
            c.violations,
            run.states_per_second(),
        );
    }
    h.push_str("</table>\n");
}

fn outcome_chips(outcomes: &BTreeMap<String, usize>) -> String {
    let mut s = String::new();
    for (o, n) in outcomes {
        let _ = write!(
            s,
            "<span class=\"chip\" data-outcome=\"{}\"><span class=\"sw\" style=\"background:{}\"></span>{} {n}</span>",
            esc(o),
            outcome_colour(outcome_class(o)),
            esc(o)
        );
    }
    s
}

/// The colours of the outcomes that occur, and the violation mark.
fn legend(h: &mut String, result: &RunResult) {
    let mut seen: Vec<&str> = result
        .runs
        .iter()
        .flat_map(|r| r.counts.outcomes.keys().map(String::as_str))
        .collect();
    seen.sort_unstable();
    seen.dedup();
    h.push_str("<p class=\"meta\">Outcome colours: ");
    for o in seen {
        let _ = write!(
            h,
            "<span class=\"chip\"><span class=\"sw\" style=\"background:{}\"></span>{}</span>",
            outcome_colour(o),
            esc(o)
        );
    }
    let _ = writeln!(
        h,
        "<span class=\"chip\"><span style=\"color:{VIOLATION_COLOUR}\">▲</span> a violating state (links to it)</span></p>"
    );
}

fn run_section(h: &mut String, i: usize, run: &DeviceModeRun, run_dir: &str) {
    let (class, verdict) = if run.passed() {
        ("pass", "passed")
    } else {
        ("fail", "failed")
    };
    let _ = writeln!(
        h,
        "<section class=\"run\" id=\"run-{i}\"><h2>{} / {} <span class=\"badge {class}\">{verdict}</span></h2>",
        esc(&run.device),
        esc(&run.mode.to_string())
    );
    let model = serde_json::to_string(&run.model).unwrap_or_default();
    let _ = writeln!(
        h,
        "<p class=\"meta\">{} states, {} violating · recovery boots {:.2} s · model <code>{}</code></p>",
        run.states.len(),
        run.states
            .iter()
            .filter(|s| !s.violations.is_empty())
            .count(),
        run.recovery_seconds,
        esc(&model)
    );
    if !run.violations.is_empty() {
        h.push_str("<p>Run-level violations:</p><ul class=\"v\">");
        for v in &run.violations {
            let _ = write!(h, "<li>{}</li>", esc(v));
        }
        h.push_str("</ul>\n");
    }
    let has_cuts = run.states.iter().any(|s| s.cut.is_some());
    // The picture first, then the violating states, then the long tables.
    let tables = if run.timeline.is_some() || has_cuts {
        timeline(h, i, run)
    } else {
        String::new()
    };
    violating_states(h, i, run, run_dir);
    if tables.is_empty() {
        state_table(h, i, run);
    } else {
        h.push_str(&tables);
    }
    h.push_str("</section>\n");
}

/// The trace positions the timeline spans: the windows and every cut.
fn span(run: &DeviceModeRun) -> (usize, usize) {
    let mut lo = usize::MAX;
    let mut hi = 0;
    if let Some(t) = &run.timeline {
        for &(a, b) in &t.windows {
            lo = lo.min(a);
            hi = hi.max(b);
        }
    }
    for c in run.states.iter().filter_map(|s| s.cut) {
        lo = lo.min(c);
        hi = hi.max(c);
    }
    if lo > hi {
        let events = run.timeline.as_ref().map_or(0, |t| t.events);
        (0, events)
    } else {
        (lo, hi)
    }
}

/// Cut positions grouped into columns: `lo..=hi` in `bins` columns of
/// `width` positions each.
#[derive(Debug, PartialEq)]
struct Bins {
    lo: usize,
    width: usize,
    count: usize,
}

impl Bins {
    fn new(lo: usize, hi: usize, max: usize) -> Bins {
        let positions = hi - lo + 1;
        let width = positions.div_ceil(max.max(1));
        Bins {
            lo,
            width,
            count: positions.div_ceil(width),
        }
    }
    fn of(&self, pos: usize) -> usize {
        ((pos - self.lo) / self.width).min(self.count - 1)
    }
    /// The first and last position of column `b`.
    fn range(&self, b: usize) -> (usize, usize) {
        let a = self.lo + b * self.width;
        (a, a + self.width - 1)
    }
}

/// The states of one column of cut points.
#[derive(Default)]
struct Column<'a> {
    outcomes: BTreeMap<&'a str, usize>,
    states: usize,
    violating: Vec<usize>,
}

/// A `Cn` sequence: from its begin marker to its end marker (or to the end
/// of the trace when the end marker never came).
struct Band {
    n: u32,
    from: usize,
    to: usize,
    closed: bool,
}

fn bands(t: &Timeline) -> Vec<Band> {
    let mut open: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    let mut out = Vec::new();
    for m in &t.markers {
        match crash_point(&m.name) {
            Some((n, false)) => open.entry(n).or_default().push(m.pos),
            Some((n, true)) => {
                if let Some(from) = open.get_mut(&n).and_then(Vec::pop) {
                    out.push(Band {
                        n,
                        from,
                        to: m.pos,
                        closed: true,
                    });
                }
            }
            None => {}
        }
    }
    for (n, starts) in open {
        for from in starts {
            out.push(Band {
                n,
                from,
                to: t.events,
                closed: false,
            });
        }
    }
    out.sort_by_key(|b| (b.from, b.to));
    out
}

/// Plot geometry of a timeline.
const LEFT: f64 = 92.0;
const PLOT: f64 = 1040.0;

/// Draws the timeline; returns its tables (cut points, markers), which the
/// page shows after the violating states.
fn timeline(h: &mut String, i: usize, run: &DeviceModeRun) -> String {
    let (lo, hi) = span(run);
    let bins = Bins::new(lo, hi, MAX_BINS);
    let empty = Timeline::default();
    let t = run.timeline.as_ref().unwrap_or(&empty);
    let col_w = PLOT / bins.count as f64;
    let x = |pos: usize| LEFT + (pos.saturating_sub(lo)) as f64 / bins.width as f64 * col_w;
    let x_end = |pos: usize| LEFT + (pos.saturating_sub(lo) + 1) as f64 / bins.width as f64 * col_w;

    let mut columns: Vec<Column> = (0..bins.count).map(|_| Column::default()).collect();
    for (k, s) in run.states.iter().enumerate() {
        let Some(cut) = s.cut else { continue };
        let c = &mut columns[bins.of(cut)];
        c.states += 1;
        *c.outcomes.entry(s.outcome.as_str()).or_default() += 1;
        if !s.violations.is_empty() {
            c.violating.push(k);
        }
    }

    let _ = writeln!(
        h,
        "<h3>Timeline</h3><p class=\"meta\">trace of {} events, {} markers; cut positions {lo}..{hi}{}; \
         {} column(s) of {} position(s) each. A cut at position p has issued the events before p: \
         its column is drawn under event p. Hover a column or band for its details.</p>",
        t.events,
        t.markers.len(),
        if t.windows.len() > 1 {
            format!(" in {} windows", t.windows.len())
        } else {
            String::new()
        },
        bins.count,
        bins.width
    );

    // The whole trace, when the windows are only part of it.
    if t.events > 0 && (hi - lo) * 10 < t.events * 9 {
        overview(h, t, lo, hi);
    }

    let in_span: Vec<&crate::result::TimelineMarker> = t
        .markers
        .iter()
        .filter(|m| m.pos >= lo && m.pos <= hi)
        .collect();
    let bands: Vec<Band> = bands(t)
        .into_iter()
        .filter(|b| b.to >= lo && b.from <= hi)
        .collect();
    // Sequences that overlap go on separate rows (at most 4).
    let mut row_ends: Vec<usize> = Vec::new();
    let mut band_rows = Vec::new();
    for b in &bands {
        let row = match row_ends.iter().position(|&end| end < b.from) {
            Some(r) => r,
            None if row_ends.len() < 4 => {
                row_ends.push(0);
                row_ends.len() - 1
            }
            None => row_ends.len() - 1,
        };
        row_ends[row] = row_ends[row].max(b.to);
        band_rows.push(row);
    }
    let seq_rows = row_ends.len().max(1);
    let seq_top = 18.0;
    let seq_h = 18.0 * seq_rows as f64;
    let mark_top = seq_top + seq_h + 8.0;
    let mark_h = 22.0;
    let cut_top = mark_top + mark_h + 8.0;
    let cut_h = 70.0;
    let viol_top = cut_top + cut_h + 4.0;
    let axis_top = viol_top + 16.0;
    let height = axis_top + 24.0;

    let _ = write!(
        h,
        "<svg id=\"timeline-{i}\" width=\"{}\" height=\"{height}\" viewBox=\"0 0 {} {height}\" role=\"img\" \
         aria-label=\"timeline of {} / {}\">",
        LEFT + PLOT + 8.0,
        LEFT + PLOT + 8.0,
        esc(&run.device),
        esc(&run.mode.to_string())
    );
    // Windows: shaded behind every lane.
    for &(a, b) in &t.windows {
        let (a, b) = (a.max(lo), b.min(hi));
        if a <= b {
            let _ = write!(
                h,
                "<rect x=\"{:.1}\" y=\"{seq_top}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#fff6d6\"><title>window: cut positions {a}..{b}</title></rect>",
                x(a),
                (x_end(b) - x(a)).max(1.0),
                viol_top - seq_top + 12.0
            );
        }
    }
    for (label, y) in [
        ("sequences", seq_top + 12.0),
        ("markers", mark_top + 14.0),
        ("cut points", cut_top + cut_h / 2.0 + 4.0),
        ("violations", viol_top + 11.0),
        ("position", axis_top + 14.0),
    ] {
        let _ = write!(h, "<text x=\"4\" y=\"{y}\">{label}</text>");
    }
    // Crash-point sequences as bands; bands that start in the same pixel of
    // a row are drawn as one (a trace of thousands of sequences stays small).
    let mut groups: BTreeMap<(usize, i64), Vec<&Band>> = BTreeMap::new();
    for (b, row) in bands.iter().zip(&band_rows) {
        groups
            .entry((*row, x(b.from.max(lo)) as i64))
            .or_default()
            .push(b);
    }
    for ((row, _), group) in &groups {
        let x0 = x(group[0].from.max(lo));
        let x1 = group
            .iter()
            .map(|b| x_end(b.to.min(hi)))
            .fold(x0 + 2.0, f64::max);
        let y = seq_top + 18.0 * *row as f64 + 1.0;
        let first = group[0];
        let hue = (first.n * 47) % 360;
        let title = match group.as_slice() {
            [b] => format!(
                "C{} ({}): C{}-begin at {}, {}",
                b.n,
                sequence_name(b.n),
                b.n,
                b.from,
                if b.closed {
                    format!("C{}-end at {}", b.n, b.to)
                } else {
                    "no end marker before the trace ends".into()
                }
            ),
            _ => {
                let mut per: BTreeMap<u32, usize> = BTreeMap::new();
                for b in group {
                    *per.entry(b.n).or_default() += 1;
                }
                let words: Vec<String> = per.iter().map(|(n, k)| format!("C{n} ×{k}")).collect();
                format!(
                    "{} sequences from {} to {}: {}",
                    group.len(),
                    first.from,
                    group.iter().map(|b| b.to).max().unwrap_or(first.to),
                    words.join(", ")
                )
            }
        };
        let _ = write!(
            h,
            "<g class=\"seq\"><title>{}</title><rect x=\"{x0:.1}\" y=\"{y}\" width=\"{:.1}\" height=\"15\" rx=\"2\" \
             fill=\"hsl({hue},60%,72%)\" stroke=\"hsl({hue},50%,40%)\"/>",
            esc(&title),
            x1 - x0
        );
        if x1 - x0 >= 22.0 && group.len() == 1 {
            let _ = write!(
                h,
                "<text x=\"{:.1}\" y=\"{}\">C{}</text>",
                x0 + 3.0,
                y + 11.5,
                first.n
            );
        }
        h.push_str("</g>");
    }
    // Other markers (op done, raw ids) as ticks, one per pixel; labels when
    // there is room.
    let mut ticks: BTreeMap<i64, Vec<&crate::result::TimelineMarker>> = BTreeMap::new();
    for m in in_span.iter().filter(|m| crash_point(&m.name).is_none()) {
        let mx = (x(m.pos) + x_end(m.pos)) / 2.0;
        ticks.entry(mx as i64).or_default().push(m);
    }
    let mut last_label = f64::MIN;
    for group in ticks.values() {
        let m = group[0];
        let mx = (x(m.pos) + x_end(m.pos)) / 2.0;
        let title = match group.as_slice() {
            [one] => format!("{} at {}", one.name, one.pos),
            _ => {
                let names: Vec<&str> = group.iter().take(4).map(|m| m.name.as_str()).collect();
                format!(
                    "{} markers at {}..{}: {}{}",
                    group.len(),
                    m.pos,
                    group[group.len() - 1].pos,
                    names.join(" "),
                    if group.len() > 4 { " …" } else { "" }
                )
            }
        };
        let _ = write!(
            h,
            "<g class=\"mark\"><title>{}</title><line x1=\"{mx:.1}\" x2=\"{mx:.1}\" y1=\"{mark_top}\" y2=\"{}\" stroke=\"#555\"/>",
            esc(&title),
            mark_top + 8.0
        );
        if mx - last_label > 44.0 && mx < LEFT + PLOT - 40.0 {
            let _ = write!(
                h,
                "<text x=\"{:.1}\" y=\"{}\">{}</text>",
                mx + 2.0,
                mark_top + 19.0,
                esc(m.name.strip_suffix("-done").unwrap_or(&m.name))
            );
            last_label = mx;
        }
        h.push_str("</g>");
    }
    // Cut points: one stacked column per group of positions.
    for (b, c) in columns.iter().enumerate() {
        if c.states == 0 {
            continue;
        }
        let (a, z) = bins.range(b);
        let x0 = LEFT + b as f64 * col_w;
        let w = (col_w - if col_w > 3.0 { 1.0 } else { 0.0 }).max(0.5);
        let mut words: Vec<String> = c.outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
        if !c.violating.is_empty() {
            words.push(format!("{} violating", c.violating.len()));
        }
        let title = format!(
            "{}: {} state(s): {}",
            if a == z {
                format!("cut at {a}")
            } else {
                format!("cuts at {a}..{z}")
            },
            c.states,
            words.join(", ")
        );
        let _ = write!(h, "<g class=\"cut\"><title>{}</title>", esc(&title));
        let mut y = cut_top + cut_h;
        for (o, n) in &c.outcomes {
            let hh = cut_h * *n as f64 / c.states as f64;
            y -= hh;
            let _ = write!(
                h,
                "<rect x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{hh:.1}\" fill=\"{}\"/>",
                outcome_colour(o)
            );
        }
        if !c.violating.is_empty() {
            let _ = write!(
                h,
                "<rect x=\"{x0:.1}\" y=\"{cut_top}\" width=\"{w:.1}\" height=\"{cut_h}\" fill=\"none\" stroke=\"{VIOLATION_COLOUR}\" stroke-width=\"2\"/>"
            );
        }
        h.push_str("</g>");
        if let Some(&first) = c.violating.first() {
            let cx = x0 + w / 2.0;
            let _ = write!(
                h,
                "<a href=\"#st-{i}-{first}\"><path class=\"viol\" d=\"M{:.1} {} L{:.1} {} L{:.1} {} Z\" fill=\"{VIOLATION_COLOUR}\"><title>{}</title></path></a>",
                cx - 5.0,
                viol_top + 12.0,
                cx + 5.0,
                viol_top + 12.0,
                cx,
                viol_top + 2.0,
                esc(&format!(
                    "{} violating state(s), first {}",
                    c.violating.len(),
                    run.states[first].id
                ))
            );
        }
    }
    // Axis.
    let _ = write!(
        h,
        "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{axis_top}\" y2=\"{axis_top}\" stroke=\"#999\"/>",
        LEFT + PLOT
    );
    for p in axis_ticks(lo, hi) {
        let px = x(p);
        let _ = write!(
            h,
            "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{axis_top}\" y2=\"{}\" stroke=\"#999\"/><text x=\"{:.1}\" y=\"{}\">{p}</text>",
            axis_top + 4.0,
            px - 6.0,
            axis_top + 16.0
        );
    }
    h.push_str("</svg>\n");

    let mut tables = String::new();
    cut_table(&mut tables, i, run, &bins, &columns, t);
    marker_table(&mut tables, &in_span, t.markers.len());
    tables
}

/// The whole trace in one strip, the windows highlighted.
fn overview(h: &mut String, t: &Timeline, lo: usize, hi: usize) {
    let scale = PLOT / t.events.max(1) as f64;
    let _ = write!(
        h,
        "<svg class=\"overview\" width=\"{}\" height=\"34\" viewBox=\"0 0 {} 34\" role=\"img\" aria-label=\"the whole trace\">\
         <text x=\"4\" y=\"16\">whole trace</text><rect x=\"{LEFT}\" y=\"6\" width=\"{PLOT}\" height=\"14\" fill=\"#eee\"/>",
        LEFT + PLOT + 8.0,
        LEFT + PLOT + 8.0
    );
    // One rectangle per pixel at most: the first sequence starting there.
    let mut drawn = std::collections::BTreeSet::new();
    for b in bands(t) {
        let x0 = LEFT + b.from as f64 * scale;
        if !drawn.insert(x0 as i64) {
            continue;
        }
        let hue = (b.n * 47) % 360;
        let _ = write!(
            h,
            "<rect x=\"{x0:.1}\" y=\"6\" width=\"{:.1}\" height=\"14\" fill=\"hsl({hue},60%,72%)\"><title>C{} at {}..{}</title></rect>",
            ((b.to - b.from) as f64 * scale).max(1.0),
            b.n,
            b.from,
            b.to
        );
    }
    let _ = writeln!(
        h,
        "<rect x=\"{:.1}\" y=\"3\" width=\"{:.1}\" height=\"20\" fill=\"none\" stroke=\"#c08a00\" stroke-width=\"2\"><title>the cut positions {lo}..{hi}, drawn below</title></rect>\
         <text x=\"{LEFT}\" y=\"32\">0</text><text x=\"{:.1}\" y=\"32\">{}</text></svg>",
        LEFT + lo as f64 * scale,
        ((hi - lo) as f64 * scale).max(2.0),
        LEFT + PLOT - 30.0,
        t.events
    );
}

/// Round positions for the axis (about 8 of them).
fn axis_ticks(lo: usize, hi: usize) -> Vec<usize> {
    let span = (hi - lo).max(1);
    let mut step = 1;
    'find: for scale in std::iter::successors(Some(1usize), |s| s.checked_mul(10)) {
        for m in [1, 2, 5] {
            step = m * scale;
            if span / step <= 8 {
                break 'find;
            }
        }
    }
    let first = lo.div_ceil(step) * step;
    (0..)
        .map(|k| first + k * step)
        .take_while(|&p| p <= hi)
        .collect()
}

/// The columns that hold states, as rows: positions, markers there, outcomes.
fn cut_table(
    h: &mut String,
    i: usize,
    run: &DeviceModeRun,
    bins: &Bins,
    columns: &[Column],
    t: &Timeline,
) {
    let rows: Vec<usize> = (0..columns.len())
        .filter(|&b| columns[b].states > 0)
        .collect();
    let _ = writeln!(
        h,
        "<details{}><summary>Cut points: {} state(s) at {} {}</summary>\
         <table id=\"cuts-{i}\"><tr><th>positions</th><th>markers there</th><th>states</th><th>outcomes</th><th>violating</th></tr>",
        if rows.len() <= OPEN_ROWS { " open" } else { "" },
        run.states.iter().filter(|s| s.cut.is_some()).count(),
        rows.len(),
        if bins.width == 1 {
            "positions"
        } else {
            "groups of positions"
        }
    );
    for b in rows {
        let c = &columns[b];
        let (a, z) = bins.range(b);
        // The markers are in trace order.
        let first = t.markers.partition_point(|m| m.pos < a);
        let names: Vec<&str> = t.markers[first..]
            .iter()
            .take_while(|m| m.pos <= z)
            .map(|m| m.name.as_str())
            .collect();
        let markers = if names.len() > 4 {
            format!("{} … ({} markers)", names[..3].join(" "), names.len())
        } else {
            names.join(" ")
        };
        let counts: BTreeMap<String, usize> = c
            .outcomes
            .iter()
            .map(|(o, n)| (o.to_string(), *n))
            .collect();
        let violating: Vec<String> = c
            .violating
            .iter()
            .take(3)
            .map(|&k| format!("<a href=\"#st-{i}-{k}\">{}</a>", esc(&run.states[k].id)))
            .collect();
        let more = c.violating.len().saturating_sub(3);
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td><code>{}</code></td><td class=\"n\">{}</td><td>{}</td><td>{}{}</td></tr>",
            if a == z {
                a.to_string()
            } else {
                format!("{a}..{z}")
            },
            esc(&markers),
            c.states,
            outcome_chips(&counts),
            violating.join(" "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    h.push_str("</table></details>\n");
}

fn marker_table(h: &mut String, in_span: &[&crate::result::TimelineMarker], total: usize) {
    if in_span.is_empty() {
        return;
    }
    let _ = writeln!(
        h,
        "<details><summary>Markers at the cut positions: {} (of {total} in the trace)</summary>\
         <table><tr><th>position</th><th>marker</th><th>what</th></tr>",
        in_span.len()
    );
    for m in in_span.iter().take(MAX_MARKER_ROWS) {
        let what = match crash_point(&m.name) {
            Some((n, end)) => format!(
                "{} of C{n} ({})",
                if end { "end" } else { "begin" },
                sequence_name(n)
            ),
            None if m.name.starts_with("op") => "a workload op completed".into(),
            None => String::new(),
        };
        let _ = write!(
            h,
            "<tr><td class=\"n\">{}</td><td><code>{}</code></td><td>{}</td></tr>",
            m.pos,
            esc(&m.name),
            esc(&what)
        );
    }
    h.push_str("</table>");
    if in_span.len() > MAX_MARKER_ROWS {
        let _ = write!(
            h,
            "<p class=\"muted\">… and {} more markers (result.json lists them all).</p>",
            in_span.len() - MAX_MARKER_ROWS
        );
    }
    h.push_str("</details>\n");
}

/// Runs without cut points (image sets): one row per state.
fn state_table(h: &mut String, i: usize, run: &DeviceModeRun) {
    let _ = writeln!(
        h,
        "<details{}><summary>States: {}</summary><table id=\"states-{i}\"><tr><th>state</th><th>outcome</th><th>usable</th><th>verdict</th></tr>",
        if run.states.len() <= OPEN_ROWS { " open" } else { "" },
        run.states.len()
    );
    for (k, s) in run.states.iter().enumerate().take(MAX_LISTED) {
        let verdict = if s.violations.is_empty() {
            "ok".to_string()
        } else {
            format!("<a href=\"#st-{i}-{k}\" style=\"color:{VIOLATION_COLOUR}\">violation</a>")
        };
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td><span class=\"sw\" style=\"background:{}\"></span>{}</td><td>{}</td><td>{verdict}</td></tr>",
            esc(&s.id),
            outcome_colour(&s.outcome),
            esc(&s.detailed_outcome()),
            if s.usable { "yes" } else { "no" }
        );
    }
    h.push_str("</table>");
    more_states(h, run.states.len());
    h.push_str("</details>\n");
}

/// The markers just before and just after a cut, in words.
fn around(t: Option<&Timeline>, cut: usize) -> Option<String> {
    let t = t?;
    let split = t.markers.partition_point(|m| m.pos < cut);
    let before = split.checked_sub(1).map(|k| &t.markers[k]);
    let after = t.markers.get(split);
    let word = |m: &crate::result::TimelineMarker| format!("{} (at {})", m.name, m.pos);
    match (before, after) {
        (None, None) => None,
        (Some(b), None) => Some(format!("after {}", word(b))),
        (None, Some(a)) => Some(format!("before {}", word(a))),
        (Some(b), Some(a)) => Some(format!("after {}, before {}", word(b), word(a))),
    }
}

/// How many writes a state applied, in words: `12 write(s)`, or with the
/// ones a barrier covered counted apart, `3120 settled + 4 pending write(s)`.
fn applied_count(s: &StateResult) -> String {
    let listed = s.applied.len() + s.applied_omitted.unwrap_or(0);
    match s.settled {
        Some(n) => format!("{n} settled + {listed} pending write(s)"),
        None => format!("{listed} write(s)"),
    }
}

/// The note under a table of states cut at `MAX_LISTED` rows.
fn more_states(h: &mut String, states: usize) {
    if states > MAX_LISTED {
        let _ = write!(
            h,
            "<p class=\"muted\">… and {} more states (result.json lists them all).</p>",
            states - MAX_LISTED
        );
    }
}

fn write_text(w: &AppliedWrite) -> String {
    match w {
        AppliedWrite::Pmem {
            event,
            offset,
            len,
            value,
        } => format!("pmem  event {event}: {len} B at {offset:#x} = {value}"),
        AppliedWrite::Disk { event, sector } => format!("disk  event {event}: sector {sector}"),
        AppliedWrite::Patch { offset, bytes } => {
            let shown: String = bytes.chars().take(64).collect();
            format!(
                "patch at {offset:#x}: {shown}{}",
                if bytes.len() > 64 { "…" } else { "" }
            )
        }
    }
}

fn violating_states(h: &mut String, i: usize, run: &DeviceModeRun, run_dir: &str) {
    let bad: Vec<usize> = (0..run.states.len())
        .filter(|&k| !run.states[k].violations.is_empty())
        .collect();
    if bad.is_empty() {
        h.push_str("<p class=\"muted\">No state violates its expectation.</p>\n");
        return;
    }
    let _ = writeln!(h, "<h3>Violating states: {}</h3>", bad.len());
    for &k in bad.iter().take(MAX_DETAILED) {
        state_entry(h, i, k, run, run_dir);
    }
    if bad.len() > MAX_DETAILED {
        let rest: Vec<String> = bad[MAX_DETAILED..]
            .iter()
            .take(MAX_LISTED)
            .map(|&k| format!("<code>{}</code>", esc(&run.states[k].id)))
            .collect();
        let _ = writeln!(
            h,
            "<p>{} more violating states (result.json has them all): {}{}</p>",
            bad.len() - MAX_DETAILED,
            rest.join(" "),
            if bad.len() - MAX_DETAILED > MAX_LISTED {
                " …"
            } else {
                ""
            }
        );
    }
}

fn state_entry(h: &mut String, i: usize, k: usize, run: &DeviceModeRun, run_dir: &str) {
    let s = &run.states[k];
    let _ = writeln!(
        h,
        "<article class=\"state\" id=\"st-{i}-{k}\"><h3><code class=\"state-id\">{}</code> \
         <span class=\"chip\"><span class=\"sw\" style=\"background:{}\"></span>{}</span> {}</h3>",
        esc(&s.id),
        outcome_colour(&s.outcome),
        esc(&s.detailed_outcome()),
        if s.usable { "usable" } else { "unusable" }
    );
    if let Some(cut) = s.cut {
        let where_ = around(run.timeline.as_ref(), cut)
            .map(|w| format!(": {}", esc(&w)))
            .unwrap_or_default();
        let _ = writeln!(
            h,
            "<p>Cut at trace position {cut}{where_}; {} applied.</p>",
            applied_count(s)
        );
    }
    h.push_str("<ul class=\"v\">");
    for v in &s.violations {
        let _ = write!(h, "<li>{}</li>", esc(v));
    }
    h.push_str("</ul>\n");
    if let Some(r) = &s.reason {
        let _ = writeln!(h, "<p>Refusal: <code>{}</code></p>", esc(r));
    }
    if let Some(f) = &s.failure {
        let _ = writeln!(h, "<p>Recovery boot failure: <code>{}</code></p>", esc(f));
    }
    if let Some(d) = &s.durability {
        let _ = writeln!(
            h,
            "<p>Durability: {} op(s) acknowledged before the cut; {}.</p>",
            d.acked,
            if d.checked {
                format!("{} finding(s)", d.violations.len())
            } else {
                "no read-back to judge".into()
            }
        );
    }
    match reproduce_command(run_dir, s) {
        Some(cmd) => {
            let _ = writeln!(
                h,
                "<p>Reproduce:</p><pre class=\"cmd\"><code class=\"reproduce\">{}</code></pre>",
                esc(&cmd)
            );
        }
        None => h.push_str(
            "<p class=\"muted\">Its images were not saved: it cannot be replayed alone.</p>\n",
        ),
    }
    if let Some(m) = &s.minimized {
        let _ = write!(
            h,
            "<p class=\"minimized\">Minimized: <b>{} of {}</b> applied write(s) still violate ({} recovery boots).</p>\
             <table class=\"minimized\"><tr><th>write</th><th>where</th></tr>",
            m.writes.len(),
            m.from,
            m.boots
        );
        for w in &m.writes {
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td>{}</td></tr>",
                esc(&write_text(&w.write)),
                esc(&w.context)
            );
        }
        h.push_str("</table>\n");
    }
    if !s.applied.is_empty() {
        let _ = write!(
            h,
            "<details><summary>Applied writes{}: {}</summary><pre><code>",
            if s.settled.is_some() {
                " still pending at the cut"
            } else {
                ""
            },
            s.applied.len() + s.applied_omitted.unwrap_or(0)
        );
        for w in s.applied.iter().take(MAX_APPLIED) {
            let _ = writeln!(h, "{}", esc(&write_text(w)));
        }
        let more = s.applied.len().saturating_sub(MAX_APPLIED);
        match s.applied_omitted {
            Some(omitted) => {
                let _ = writeln!(
                    h,
                    "… and {} more ({omitted} of them not listed in result.json either)",
                    more + omitted
                );
            }
            None if more > 0 => {
                let _ = writeln!(h, "… and {more} more (result.json lists them all)");
            }
            None => {}
        }
        h.push_str("</code></pre></details>\n");
    }
    if !s.reports.is_empty() {
        let text = serde_json::to_string_pretty(&s.reports).unwrap_or_default();
        let shown: String = text.chars().take(MAX_REPORT_CHARS).collect();
        let cut = if shown.len() < text.len() {
            "\n… (cut: result.json has the rest)"
        } else {
            ""
        };
        let _ = writeln!(
            h,
            "<details><summary>Guest reports</summary><pre><code>{}{cut}</code></pre></details>",
            esc(&shown)
        );
    }
    h.push_str("</article>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_both_quotes() {
        assert_eq!(
            esc(r#"<a href="x" title='y'>&</a>"#),
            "&lt;a href=&quot;x&quot; title=&#39;y&#39;&gt;&amp;&lt;/a&gt;"
        );
    }

    #[test]
    fn bins_cover_the_span_within_the_cap() {
        let b = Bins::new(10, 19, 240);
        assert_eq!((b.width, b.count), (1, 10));
        assert_eq!(b.of(19), 9);
        let b = Bins::new(0, 9999, 240);
        assert!(b.count <= 240, "{b:?}");
        assert_eq!(b.of(0), 0);
        assert_eq!(b.of(9999), b.count - 1);
        let (a, z) = b.range(b.count - 1);
        assert!(a <= 9999 && 9999 <= z);
    }

    #[test]
    fn axis_ticks_are_round_and_few() {
        assert_eq!(axis_ticks(0, 10), vec![0, 2, 4, 6, 8, 10]);
        let t = axis_ticks(123, 45_678);
        assert!(t.len() <= 9 && t.len() >= 4, "{t:?}");
        assert!(t.iter().all(|p| p % 5000 == 0), "{t:?}");
        assert_eq!(axis_ticks(7, 7), vec![7]);
    }

    #[test]
    fn reproduce_commands_name_the_run_folder_and_quote_odd_paths() {
        let mut s: StateResult = serde_json::from_value(serde_json::json!({
            "id": "magic/stale-crc", "cut": null, "applied": [], "outcome": "refused",
            "reason": null, "refusal": null, "usable": false, "older-cache-back": false,
            "reports": [], "verdict": "violation", "violations": ["x"],
            "saved": "/abs/results/s/2026/magic_stale-crc"
        }))
        .unwrap();
        assert_eq!(
            reproduce_command("results/s/2026-12-05T000000Z", &s).unwrap(),
            "cargo xtask reproduce results/s/2026-12-05T000000Z/magic_stale-crc"
        );
        assert_eq!(
            reproduce_command("my results/it's", &s).unwrap(),
            r#"cargo xtask reproduce 'my results/it'\''s/magic_stale-crc'"#
        );
        s.saved = None;
        assert_eq!(reproduce_command("results/s/r", &s), None);
    }

    #[test]
    fn a_trace_of_many_sequences_draws_at_most_one_band_and_tick_per_pixel() {
        let markers = (0..20_000)
            .flat_map(|k| {
                [
                    crate::result::TimelineMarker {
                        pos: k * 3,
                        name: "C10-begin".into(),
                    },
                    crate::result::TimelineMarker {
                        pos: k * 3 + 1,
                        name: "C10-end".into(),
                    },
                    crate::result::TimelineMarker {
                        pos: k * 3 + 2,
                        name: format!("op{k}-done"),
                    },
                ]
            })
            .collect();
        let run: DeviceModeRun = serde_json::from_value(serde_json::json!({
            "device": "d", "mode": "recover", "model": null, "counts": {
                "states": 0, "duplicates": 0, "unchanged-writes": 0, "outcomes": {},
                "unusable": 0, "older-cache-back": 0, "violations": 0
            },
            "recovery-seconds": 1.0, "states": [], "violations": []
        }))
        .unwrap();
        let run = DeviceModeRun {
            timeline: Some(Timeline {
                events: 60_000,
                markers,
                windows: vec![(0, 60_000)],
            }),
            ..run
        };
        let result = RunResult {
            schema_version: 1,
            scenario: "many".into(),
            started: String::new(),
            elapsed_seconds: 0.0,
            runs: vec![run],
            passed: true,
            partial: false,
            shard: None,
            config: None,
            kernel: None,
        };
        let html = render(&result, "results/many/r");
        let seqs = html.matches("<g class=\"seq\">").count();
        let ticks = html.matches("<g class=\"mark\">").count();
        assert!(seqs > 500 && seqs <= PLOT as usize + 1, "{seqs} bands");
        assert!(ticks > 500 && ticks <= PLOT as usize + 1, "{ticks} ticks");
        assert!(html.contains("C10 ×"), "grouped bands say how many");
        // The markers table is capped too.
        assert!(html.contains("… and 59800 more markers"));
        assert!(html.len() < 1_000_000, "{} bytes", html.len());
    }

    #[test]
    fn crash_point_sequences_pair_their_markers() {
        let m = |pos, name: &str| crate::result::TimelineMarker {
            pos,
            name: name.into(),
        };
        let t = Timeline {
            events: 50,
            markers: vec![
                m(2, "C8-begin"),
                m(5, "C10-begin"),
                m(9, "C10-end"),
                m(12, "C8-end"),
                m(13, "op0-done"),
                m(20, "C9-begin"),
            ],
            windows: vec![(0, 50)],
        };
        let b: Vec<(u32, usize, usize, bool)> = bands(&t)
            .iter()
            .map(|b| (b.n, b.from, b.to, b.closed))
            .collect();
        assert_eq!(
            b,
            vec![(8, 2, 12, true), (10, 5, 9, true), (9, 20, 50, false)]
        );
        assert_eq!(
            around(Some(&t), 10).unwrap(),
            "after C10-end (at 9), before C8-end (at 12)"
        );
        assert_eq!(around(Some(&t), 0).unwrap(), "before C8-begin (at 2)");
    }
}
