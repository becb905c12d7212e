//! `cargo xtask explore`: every crash state of a workload, minimized.
//!
//! A scenario's workload (`--scenario NAME`) or one given on the command line
//! (`--workload`, `--recovery` and a device), cut at every position of the
//! window (default the whole trace), expanded by the persistence model,
//! deduplicated, checked in parallel against explore's expectations
//! (`scenarios::explore`), and the first violating states minimized. Ctrl-C
//! stops starting states and writes a partial result.

use crate::guest;
use crate::scenario::{
    junit, new_run, point_latest, print_table, write_report, Bar, RunError, JOBS_MAX,
    STATE_TIMEOUT_MAX,
};
use crate::util::workspace_root;
use anyhow::{anyhow, bail, Context, Result};
use clap::builder::RangedU64ValueParser;
use clap::Args;
use scenarios::explore::{self, Explore};
use scenarios::result::{write_atomic, Shard};
use scenarios::runner::{self, RunOptions};
use scenarios::spec::{Device, DiskContent, Mode, Prefill, Recipe, Scenario, Size};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[derive(Args)]
pub struct ExploreArgs {
    /// Explore this scenario's workload (scenarios/NAME.json): its devices,
    /// modes, workload, recovery and model are the defaults.
    #[arg(long, value_name = "NAME")]
    pub scenario: Option<String>,
    /// The workload's guest steps (e.g. `start;write:0:4096:1;flush`).
    #[arg(long, value_name = "STEPS")]
    pub workload: Option<String>,
    /// The recovery's guest steps (e.g. `start;verify:0:4096;stop;start`).
    #[arg(long, value_name = "STEPS")]
    pub recovery: Option<String>,
    /// Only these devices of the scenario (repeat the flag for more).
    #[arg(long = "device", value_name = "NAME")]
    pub devices: Vec<String>,
    /// A device of its own instead of the scenario's: how its pmem image is
    /// made (`blank`, `formatted`, `older-cache`).
    #[arg(long, value_parser = ["blank", "formatted", "older-cache"])]
    pub recipe: Option<String>,
    /// With --recipe: activations of a `formatted` or `older-cache` recipe.
    #[arg(long, requires = "recipe")]
    pub activations: Option<u32>,
    /// With --recipe: the pmem image's size.
    #[arg(long, default_value = "512M", requires = "recipe")]
    pub pmem_size: String,
    /// With --recipe: the disk image's size.
    #[arg(long, default_value = "16M", requires = "recipe")]
    pub disk_size: String,
    /// With --recipe: the disk's content (`pattern` lets the durability rule judge).
    #[arg(long, default_value = "pattern", value_parser = ["pattern", "zeros"], requires = "recipe")]
    pub disk: String,
    /// With --recipe: data steps run on the host before the workload.
    #[arg(long, value_name = "STEPS", requires = "recipe")]
    pub prefill: Option<String>,
    /// The modes (repeat the flag; default the scenario's, or both).
    #[arg(long = "mode", value_parser = ["strict", "recover"])]
    pub modes: Vec<String>,
    /// Where power may be cut: `everything` (default), `C8-begin..C8-end`
    /// (every occurrence) or trace positions `FROM..TO`.
    #[arg(long)]
    pub window: Option<String>,
    /// The persistence model: `prefix`, `flushed-only`,
    /// `subsets[:SAMPLE[:SEED]]`, `at-fences[:SAMPLE[:SEED]]` or JSON
    /// (default the scenario's; `at-fences:16:0` without one).
    #[arg(long)]
    pub model: Option<String>,
    /// In strict mode (the kernel's behaviour) unusable states and
    /// durability findings are reported, not failures; with this flag they
    /// fail as in recover mode.
    #[arg(long)]
    pub strict_fails: bool,
    /// Unusable (refused for ever) states are not violations.
    #[arg(long)]
    pub allow_unusable: bool,
    /// Read-backs that break the durability rule are counted, not violations.
    #[arg(long)]
    pub ignore_durability: bool,
    /// Minimize at most this many violating states per device and mode (0: none).
    #[arg(long, default_value_t = 10)]
    pub minimize: usize,
    /// Most recovery boots one state's minimization may spend.
    #[arg(long, default_value_t = 400, value_parser = RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub minimize_boots: usize,
    /// Save the images of at most this many violating states per device
    /// and mode (for `cargo xtask reproduce`).
    #[arg(long, default_value_t = 10)]
    pub save: usize,
    /// Run only shard K of N (see `cargo xtask scenario --shard`).
    #[arg(long, value_name = "K/N")]
    pub shard: Option<Shard>,
    /// Also write JUnit XML to this file (a case per state).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// The name of the results folder (results/NAME/...); default the
    /// scenario's, or `explore`.
    #[arg(long)]
    pub name: Option<String>,
    /// Recovery boots run at once (default: the number of CPUs).
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..=JOBS_MAX))]
    pub jobs: Option<usize>,
    /// Time budget of one recovery boot, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=STATE_TIMEOUT_MAX))]
    pub state_timeout: u64,
    /// Boot a fresh VM for every crash state (the reference path) instead of
    /// resetting one fork-server VM per worker to its snapshot.
    #[arg(long)]
    pub fresh: bool,
    /// A guest built with a test-only feature (a deliberately broken module,
    /// `target/guest/pcache-guest-FEATURE`).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(guest::TEST_FEATURES))]
    pub guest_feature: Option<String>,
}

/// Set by Ctrl-C: no state starts after it.
static CANCEL: AtomicBool = AtomicBool::new(false);

pub fn explore(args: ExploreArgs) -> Result<()> {
    let base = match &args.scenario {
        Some(n) => {
            let path = workspace_root().join("scenarios").join(format!("{n}.json"));
            if !path.exists() {
                bail!("no scenario `{n}` in scenarios/ (`cargo xtask scenario --list` lists them)");
            }
            Some(Scenario::load(&path)?)
        }
        None => None,
    };
    let x = options(&args)?;
    let name = args
        .name
        .clone()
        .or_else(|| args.scenario.clone())
        .unwrap_or_else(|| "explore".into());
    let what = args.scenario.as_deref().unwrap_or(&name);
    let scenario =
        explore::scenario(what, base.as_ref(), &x).map_err(|e| anyhow!("explore: {e}"))?;

    let kernel = guest::build(guest::BuildGuestArgs {
        debug: false,
        feature: args.guest_feature.clone(),
    })?;
    vmm::vm::check_kvm()?;
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));

    // First Ctrl-C: finish the states in flight and write a partial result;
    // a second one quits at once.
    let presses = AtomicUsize::new(0);
    ctrlc::set_handler(move || {
        if presses.fetch_add(1, Ordering::SeqCst) == 0 {
            CANCEL.store(true, Ordering::SeqCst);
            eprintln!(
                "\ninterrupted: finishing the states in flight, then writing a partial result (Ctrl-C again quits at once)"
            );
        } else {
            std::process::exit(130);
        }
    })
    .context("installing the Ctrl-C handler")?;

    let cfg = new_run(
        "explore",
        &name,
        args.shard,
        &kernel,
        jobs,
        args.state_timeout,
        args.fresh,
    )?;
    let (out_dir, work_dir) = (cfg.out_dir.clone(), cfg.work_dir.clone());
    let opts = RunOptions {
        shard: args.shard,
        minimize: args.minimize,
        minimize_boots: args.minimize_boots,
        cancel: Some(&CANCEL),
        save_limit: Some(args.save),
        config: Some(serde_json::json!({
            "command": "explore",
            "scenario": scenario,
            "minimize": args.minimize,
            "minimize-boots": args.minimize_boots,
            "guest-feature": args.guest_feature,
            "state-timeout": args.state_timeout,
        })),
    };
    println!("explore {name}: {}", scenario.description);
    let outcome = runner::run_with(&name, &scenario, &cfg, &Bar::default(), &opts);
    let _ = std::fs::remove_dir_all(&work_dir);
    let result = match outcome {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir(&out_dir); // empty: nothing was written
            bail!("explore {name} could not run: {e}");
        }
    };
    if args.shard.is_none() && !result.partial {
        point_latest(&out_dir)?;
    }
    print_table(&result);
    println!("result: {}", out_dir.join("result.json").display());
    let page = write_report(&out_dir, &result)?;
    println!("report: {}", page.display());
    if let Some(path) = &args.junit {
        let none: [RunError; 0] = [];
        write_atomic(
            path,
            junit(std::slice::from_ref(&result), &none)?.as_bytes(),
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    if result.partial {
        bail!("interrupted: the result holds the states done so far (partial)");
    }
    if !result.passed {
        bail!("explore {name}: violations found");
    }
    Ok(())
}

/// The command line's options as `scenarios::explore` takes them.
fn options(args: &ExploreArgs) -> Result<Explore> {
    let size = |s: &str| Size::parse(s).map_err(|e| anyhow!("{s}: {e}"));
    let device = match args.recipe.as_deref() {
        None => None,
        Some(r) => Some(Device {
            name: "cli".into(),
            pmem_size: size(&args.pmem_size)?,
            disk_size: size(&args.disk_size)?,
            recipe: match r {
                "blank" => Recipe::Blank,
                "formatted" => Recipe::Formatted {
                    activations: args.activations.unwrap_or(1),
                },
                _ => Recipe::OlderCache {
                    activations: args.activations.unwrap_or(3),
                },
            },
            disk: if args.disk == "zeros" {
                DiskContent::Zeros
            } else {
                DiskContent::Pattern
            },
            prefill: args.prefill.clone().map(Prefill::Steps),
            prefill_repeat: 1,
            data_crc: false,
        }),
    };
    if device.is_some() && !args.devices.is_empty() {
        bail!("--device picks a scenario's devices; --recipe makes one of its own: not both");
    }
    Ok(Explore {
        workload: args.workload.clone(),
        recovery: args.recovery.clone(),
        device,
        devices: args.devices.clone(),
        modes: args
            .modes
            .iter()
            .map(|m| {
                if m == "strict" {
                    Mode::Strict
                } else {
                    Mode::Recover
                }
            })
            .collect(),
        window: args
            .window
            .as_deref()
            .map(explore::parse_window)
            .transpose()
            .map_err(|e| anyhow!("--window: {e}"))?,
        model: args
            .model
            .as_deref()
            .map(explore::parse_model)
            .transpose()
            .map_err(|e| anyhow!("--model: {e}"))?,
        strict_fails: args.strict_fails,
        allow_unusable: args.allow_unusable,
        ignore_durability: args.ignore_durability,
    })
}
