//! `cargo xtask merge-results`: joins the shards of a run into one result,
//! with the shards' saved states.

use crate::scenario::{junit, new_run_dir, point_latest, print_table, write_report, RunError};
use crate::util::workspace_root;
use anyhow::{bail, Context, Result};
use clap::Args;
use scenarios::result::{merge_shards, write_atomic, RunResult};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct MergeArgs {
    /// The shards' results: result.json files, or the run folders holding them.
    #[arg(required = true, value_name = "RESULT")]
    pub results: Vec<PathBuf>,
    /// Where the merged result and the shards' saved states go (default:
    /// results/NAME/<UTC timestamp>-merged).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Also write JUnit XML to this file.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
}

/// Reads a shard's result from a file or a run folder; also the run folder
/// (the one given, or the one holding the file).
fn read(path: &Path) -> Result<(String, RunResult, PathBuf)> {
    let (file, dir) = if path.is_dir() {
        (path.join("result.json"), path.to_path_buf())
    } else {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (path.to_path_buf(), dir)
    };
    let text = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let r: RunResult = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not a result.json", file.display()))?;
    Ok((file.display().to_string(), r, dir))
}

/// The shards' saved states (violating states' images, for `cargo xtask
/// reproduce`): folder name → that folder in its shard's run folder. Two
/// states saved under one name are refused.
fn saved_states(shards: &[(String, RunResult, PathBuf)]) -> Result<BTreeMap<String, PathBuf>> {
    let mut found = BTreeMap::new();
    for (_, r, dir) in shards {
        for name in r
            .runs
            .iter()
            .flat_map(|x| &x.states)
            .filter_map(|st| st.saved_folder())
        {
            let from = dir.join(&name);
            if let Some(other) = found.insert(name.clone(), from.clone()) {
                bail!(
                    "two shards saved a state as `{name}`: {} and {}",
                    other.display(),
                    from.display()
                );
            }
        }
    }
    Ok(found)
}

/// Copies the saved state folder `from` to the new folder `to`, hard-linking
/// its files where it can (the images are large, and nothing writes them
/// after their save: replays open copy-on-write views).
fn copy_state(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir(to).with_context(|| format!("creating {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e.with_context(|| format!("reading {}", from.display()))?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type()?.is_dir() {
            copy_state(&src, &dst)?;
        } else if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// Brings the shards' saved states into the merged run's folder and points
/// the merged states at them. A name already taken there is refused before
/// anything is copied; a state whose folder is not beside its shard's result
/// is left out (with a warning) and keeps its recorded path.
fn bring_saved_states(
    shards: &[(String, RunResult, PathBuf)],
    merged: &mut RunResult,
    out_dir: &Path,
) -> Result<()> {
    let mut states = saved_states(shards)?;
    states.retain(|name, from| {
        let there = from.join("state.json").is_file();
        if !there {
            eprintln!(
                "warning: the saved state `{name}` is not in {} (no state.json): not copied",
                from.parent().unwrap_or(from).display()
            );
        }
        there
    });
    if let Some(name) = states
        .keys()
        .find(|n| std::fs::symlink_metadata(out_dir.join(n)).is_ok())
    {
        bail!(
            "{} already exists: a shard's saved state has that name (merge into a new folder)",
            out_dir.join(name).display()
        );
    }
    for (name, from) in &states {
        copy_state(from, &out_dir.join(name))?;
    }
    for st in merged.runs.iter_mut().flat_map(|x| &mut x.states) {
        if let Some(name) = st.saved_folder().filter(|n| states.contains_key(n)) {
            st.saved = Some(out_dir.join(name).display().to_string());
        }
    }
    Ok(())
}

pub fn merge(args: MergeArgs) -> Result<()> {
    let shards = args
        .results
        .iter()
        .map(|p| read(p))
        .collect::<Result<Vec<_>>>()?;
    let mut merged = merge_shards(
        shards
            .iter()
            .map(|(name, r, _)| (name.clone(), r.clone()))
            .collect(),
    )
    .context("merging the shards")?;
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
    bring_saved_states(&shards, &mut merged, &out_dir)?;
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
