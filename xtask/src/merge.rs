//! `cargo xtask merge-results`: joins the shards of a run into one result.

use crate::scenario::{junit, new_run_dir, point_latest, print_table, write_report, RunError};
use crate::util::workspace_root;
use anyhow::{bail, Context, Result};
use clap::Args;
use scenarios::result::{merge_shards, write_atomic, RunResult};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct MergeArgs {
    /// The shards' results: result.json files, or the run folders holding them.
    #[arg(required = true, value_name = "RESULT")]
    pub results: Vec<PathBuf>,
    /// Where the merged result goes (default: results/NAME/<UTC timestamp>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Also write JUnit XML to this file.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
}

/// Reads a shard's result from a file or a run folder.
fn read(path: &Path) -> Result<(String, RunResult)> {
    let file = if path.is_dir() {
        path.join("result.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let r: RunResult = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not a result.json", file.display()))?;
    Ok((file.display().to_string(), r))
}

pub fn merge(args: MergeArgs) -> Result<()> {
    let shards = args
        .results
        .iter()
        .map(|p| read(p))
        .collect::<Result<Vec<_>>>()?;
    let merged = merge_shards(shards).context("merging the shards")?;
    let out_dir = match &args.out {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            let stamp = scenarios::runner::now_rfc3339().replace(':', "");
            let dir = new_run_dir(
                &workspace_root().join("results").join(&merged.scenario),
                &format!("{stamp}-merged"),
            )?;
            point_latest(&dir)?;
            dir
        }
    };
    let path = out_dir.join("result.json");
    write_atomic(
        &path,
        &serde_json::to_vec_pretty(&merged).expect("results serialize"),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    if let Some(j) = &args.junit {
        let none: [RunError; 0] = [];
        write_atomic(j, junit(std::slice::from_ref(&merged), &none)?.as_bytes())
            .with_context(|| format!("writing {}", j.display()))?;
    }
    print_table(&merged);
    println!("result: {}", path.display());
    let page = write_report(&out_dir, &merged)?;
    println!("report: {}", page.display());
    if !merged.passed {
        bail!("{}: the merged run failed", merged.scenario);
    }
    Ok(())
}
