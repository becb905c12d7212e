//! `cargo xtask`: the project's developer commands.
//!
//! Each subcommand lives in its own module; this file only parses the command
//! line and dispatches.

mod bench;
mod explore;
mod export;
mod guest;
mod image;
mod interop;
mod merge;
mod qtrace;
mod report;
mod reproduce;
mod ring0_scan;
mod scenario;
mod test;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer commands of the pcache test harness",
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every check: fmt, clippy, workspace tests, no_std build, guest build, KVM tests.
    Test(test::TestArgs),
    /// Build the guest kernel into target/guest/pcache-guest.
    BuildGuest(guest::BuildGuestArgs),
    /// Run a power-cut scenario (scenarios/NAME.json); --list, --all.
    Scenario(scenario::ScenarioArgs),
    /// Every crash state of a workload (a scenario's or given), in parallel, violations minimized.
    Explore(Box<explore::ExploreArgs>),
    /// Join the results of the shards of a run (`--shard K/N`) into one, checking pinned counts.
    MergeResults(merge::MergeArgs),
    /// (Re)write a run's report page (report.html) from its result.json.
    Report(report::ReportArgs),
    /// Replay recovery on a saved crash state or on a user's image (never modified).
    Reproduce(reproduce::ReproduceArgs),
    /// Benchmark the VMM and guest: boots, traced store, message, RSS, pcache start and recovery boots.
    Bench(bench::BenchArgs),
    /// Create a sparse pcache cache-device image and run a first activation on it.
    Format(image::FormatArgs),
    /// Linux's own dm-pcache under QEMU as the oracle: first activations, hostile images, power-cut states.
    Interop(interop::InteropArgs),
    /// Write the logical content of a cached device (backing + the cache's keys) to a new file.
    Export(export::ExportArgs),
    /// Inspect a pcache image read-only: superblock, cache_info, tails, segments, key-set log.
    Inspect(image::InspectArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Test(args) => test::test_all(args),
        Command::Bench(args) => bench::bench(args),
        Command::Scenario(args) => scenario::scenario(args),
        Command::Explore(args) => explore::explore(*args),
        Command::MergeResults(args) => merge::merge(args),
        Command::Reproduce(args) => reproduce::reproduce(args),
        Command::Report(args) => report::report(args),
        Command::BuildGuest(args) => guest::build(args).map(|path| {
            println!("guest kernel: {}", path.display());
        }),
        Command::Format(args) => image::format(args),
        Command::Inspect(args) => image::inspect(args),
        Command::Export(args) => export::export(args),
        Command::Interop(args) => interop::interop(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("cargo xtask").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn numeric_flags_are_bounded() {
        let err = parse(&["scenario", "--all", "--state-timeout", "0"])
            .err()
            .unwrap();
        assert!(
            err.contains("--state-timeout") && err.contains("1..=3600"),
            "{err}"
        );
        assert!(parse(&["scenario", "--all", "--state-timeout", "3601"]).is_err());
        assert!(parse(&["scenario", "--all", "--state-timeout", "1"]).is_ok());
        let err = parse(&["scenario", "--all", "--jobs", "0"]).err().unwrap();
        assert!(err.contains("--jobs") && err.contains("1..=256"), "{err}");
        assert!(parse(&["scenario", "--all", "--jobs", "257"]).is_err());
        let Command::Scenario(a) = parse(&["scenario", "--all", "--jobs", "2"])
            .unwrap()
            .command
        else {
            panic!("not a scenario command");
        };
        assert_eq!((a.jobs, a.state_timeout, a.fresh), (Some(2), 10, false));
        let Command::Scenario(a) = parse(&["scenario", "x", "--shard", "2/3"]).unwrap().command
        else {
            panic!("not a scenario command");
        };
        assert_eq!(a.shard.map(|s| s.to_string()), Some("2/3".into()));
        let err = parse(&["scenario", "x", "--shard", "4/3"]).err().unwrap();
        assert!(err.contains("not a shard K/N"), "{err}");
        let Command::Scenario(a) = parse(&["scenario", "crash-mid-format", "--fresh"])
            .unwrap()
            .command
        else {
            panic!("not a scenario command");
        };
        assert!(a.fresh);
        let err = parse(&["bench", "--runs", "0"]).err().unwrap();
        assert!(err.contains("--runs") && err.contains("3..=1000"), "{err}");
        assert!(parse(&["bench", "--runs", "1001"]).is_err());
    }

    #[test]
    fn explore_and_merge_results_parse() {
        let Command::Explore(a) = parse(&[
            "explore",
            "--scenario",
            "crash-mid-data-write",
            "--model",
            "subsets:8:1",
            "--window",
            "C8-begin..C8-end",
            "--mode",
            "strict",
            "--strict-fails",
            "--shard",
            "1/2",
            "--guest-feature",
            "test-drop-data-fence",
        ])
        .unwrap()
        .command
        else {
            panic!("not explore");
        };
        assert_eq!(a.modes, ["strict"]);
        assert!(a.strict_fails && a.minimize == 10 && a.save == 10);
        assert!(parse(&["explore", "--guest-feature", "no-such-feature"]).is_err());
        assert!(parse(&["explore", "--mode", "lenient"]).is_err());
        // The device flags need --recipe.
        assert!(parse(&["explore", "--disk-size", "8M"]).is_err());
        assert!(parse(&["explore", "--recipe", "formatted", "--disk-size", "8M"]).is_ok());
        assert!(parse(&["merge-results"]).is_err());
        assert!(parse(&["merge-results", "a", "b", "--junit", "j.xml"]).is_ok());
    }
}
