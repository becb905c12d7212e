//! `cargo xtask report RESULT_DIR`: (re)writes a run's report page
//! (`report.html`, beside its `result.json`) from the result alone, e.g. for
//! a result written before the page existed or merged from shards.

use crate::scenario::write_report;
use anyhow::{Context, Result};
use clap::Args;
use scenarios::result::RunResult;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ReportArgs {
    /// A run's folder (`results/NAME/<run>` or `results/NAME/latest`), or its result.json.
    pub result_dir: PathBuf,
}

pub fn report(args: ReportArgs) -> Result<()> {
    let page = rewrite(&args.result_dir)?;
    println!("report: {}", page.display());
    Ok(())
}

/// Reads the run's result.json and writes its page; returns the page's path.
fn rewrite(given: &Path) -> Result<PathBuf> {
    let given = if given.file_name().is_some_and(|n| n == "result.json") {
        given.parent().unwrap_or(Path::new("."))
    } else {
        given
    };
    // `latest` is a link: the page names the run's own folder.
    let dir = given
        .canonicalize()
        .with_context(|| format!("no run folder at {}", given.display()))?;
    let path = dir.join("result.json");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let result: RunResult = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a scenario result", path.display()))?;
    write_report(&dir, &result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_written_beside_the_result_through_a_latest_link() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("2026-12-05T000000Z");
        std::fs::create_dir(&run).unwrap();
        let result = serde_json::json!({
            "schema-version": 1, "scenario": "x<y", "started": "2026-12-05T00:00:00Z",
            "elapsed-seconds": 1.0, "passed": true, "runs": []
        });
        std::fs::write(run.join("result.json"), result.to_string()).unwrap();
        std::os::unix::fs::symlink("2026-12-05T000000Z", tmp.path().join("latest")).unwrap();

        let page = rewrite(&tmp.path().join("latest")).unwrap();
        assert_eq!(page, run.canonicalize().unwrap().join("report.html"));
        let html = std::fs::read_to_string(&page).unwrap();
        assert!(html.contains("x&lt;y") && html.contains("PASSED"), "{html}");
        // Its result.json named directly works too; a folder without one is named.
        assert_eq!(rewrite(&run.join("result.json")).unwrap(), page);
        let err = rewrite(tmp.path()).unwrap_err();
        assert!(format!("{err:#}").contains("result.json"), "{err:#}");
    }
}
