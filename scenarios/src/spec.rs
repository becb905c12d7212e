//! Scenario files: one JSON file per scenario in `scenarios/`.
//!
//! The format is documented in `scenarios/README.md`. Unknown fields are
//! rejected, and every error names the file, the JSON path and what is wrong.

use crate::persistence::{Model, Pairs};
use guest_cmdline::RunStep;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use workload::Op;

/// A scenario, as read from its file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Scenario {
    /// One sentence for people: what the scenario checks.
    pub description: String,
    /// The devices to run on; each is run in every mode.
    pub devices: Vec<Device>,
    /// The modes to run in (the mode governs the whole run: workload and recovery).
    pub modes: Vec<Mode>,
    /// What produces the crash images.
    pub run: Run,
    /// The guest steps of every recovery boot, e.g. `start;stop;start`.
    pub recovery: String,
    /// What must hold, per device and mode.
    pub expect: Vec<Expectation>,
}

/// pcache's recovery mode and an activation's outcome: the engine's own types
/// (same kebab-case names), so a misspelled name fails when the file loads.
pub use pcache::{Mode, Outcome};

/// A pair of devices: the cache (pmem) and the backing disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Device {
    /// Name used in expectations and results.
    pub name: String,
    /// Size of the pmem image, e.g. `512M`, `1G` (at least 512 MiB).
    pub pmem_size: Size,
    /// Size of the disk image, e.g. `64M`.
    pub disk_size: Size,
    /// How the pmem image is made before the workload runs.
    pub recipe: Recipe,
    /// What the backing disk holds before the workload runs.
    #[serde(default)]
    pub disk: DiskContent,
    /// Data ops (guest steps `write`, `flush`, `close-ksets`, `gen`) and the
    /// background work (`writeback`, `gc`, `idle`, `gc-percent:N`) run on the
    /// host with pcache after the recipe, in the run's mode, then a
    /// deactivation: a cheap way to bring a cache to a given state.
    /// Either one step string (repeated `prefill-repeat` times) or a list
    /// of phases, each `{"steps": "...", "repeat": n}`, run in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<Prefill>,
    /// How many times the prefill's ops run in a row (default 1): tens of
    /// thousands of small writes do not fit in a step string.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub prefill_repeat: u32,
    /// The cache is formatted (and prefilled) with `DATA_CRC` (default
    /// false); the workload's and recovery's `start` steps must then say
    /// `data_crc=true` (checked at load).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub data_crc: bool,
}

/// A device's prefill: one step string, or phases run in order (a cache
/// brought to a given layout needs different counts of different writes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prefill {
    Steps(String),
    Phases(Vec<PrefillPhase>),
}

/// One phase of a prefill: its steps, run `repeat` times in a row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PrefillPhase {
    pub steps: String,
    #[serde(default = "one")]
    pub repeat: u32,
}

/// One step of a prefill as the host runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillStep {
    /// A data op (judged by the durability rule like the workload's).
    Op(Op),
    /// Writeback until nothing is left (the guest's `writeback`).
    Writeback,
    /// GC until it stops (the guest's `gc`).
    Gc,
    /// Both until neither moves (the guest's `idle`).
    Idle,
    /// The `gc_percent` message.
    GcPercent(u8),
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// The backing disk's content before the workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskContent {
    /// A sparse file of zeros.
    #[default]
    Zeros,
    /// Every sector holds `workload::pattern::fill_sector(0, lba)` (tag 0),
    /// so that stale or zeroed data read through the cache shows as garbage.
    Pattern,
}

/// How a pmem image is prepared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum Recipe {
    /// A sparse file of zeros: never formatted.
    Blank,
    /// Formatted, then activated `activations` times in all (at least 1).
    Formatted { activations: u32 },
    /// Held an older cache (formatted and activated `activations` times, so its
    /// cache_info seq differs from a fresh format's), then its superblock magic
    /// was zeroed: what a user does to ask for a re-format.
    OlderCache { activations: u32 },
    /// An image file given by the user (never modified).
    File { path: PathBuf },
}

/// What produces the crash images.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum Run {
    /// Run `workload` with tracing on and cut power where `window` and `model` allow.
    PowerCut {
        /// The guest steps of the traced run, e.g. `start`.
        workload: String,
        /// Where power may be cut.
        window: Window,
        /// Which writes are durable at a cut (pmem and disk alike).
        model: Model,
        /// virtio-blk requests of the traced run that fail (the VMM's fault
        /// plan, e.g. `{"fail-flushes": [{"nth": 1, "onward": true}]}`); none
        /// by default.
        #[serde(default, skip_serializing_if = "vmm::BlkFaults::is_empty")]
        faults: vmm::BlkFaults,
        /// How `subsets` pairs a cut's pmem and disk choices (every pair up
        /// to `sample`, then a seeded sample); `persistence::PAIRS_DEFAULT`
        /// when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pairs: Option<Pairs>,
    },
    /// No power cut: images made by a named generator from the device.
    Images { generator: Generator },
}

/// Where power may be cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum Window {
    /// From marker `from` (inclusive) to marker `to` (inclusive); with
    /// `every`, each `from` of the trace to the first `to` after it.
    BetweenMarkers {
        from: MarkerName,
        to: MarkerName,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        every: bool,
    },
    /// Trace positions `from..=to`.
    TracePositions { from: usize, to: usize },
    /// The whole traced run.
    Everything,
}

/// A marker named `C<n>-begin` or `C<n>-end` (the crash points of
/// `docs/format.md` §10, n = 1..=12), or a raw id `0x...`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MarkerName(pub u32);

impl TryFrom<String> for MarkerName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if let Some(hex) = s.strip_prefix("0x") {
            return u32::from_str_radix(hex, 16)
                .map(MarkerName)
                .map_err(|_| format!("bad marker id `{s}`"));
        }
        let bad = || {
            format!("unknown marker `{s}` (expected C<n>-begin or C<n>-end, n = 1..=12, or 0x<id>)")
        };
        let rest = s.strip_prefix('C').ok_or_else(bad)?;
        let (n, end) = rest.split_once('-').ok_or_else(bad)?;
        let n: u32 = n.parse().map_err(|_| bad())?;
        if !(1..=12).contains(&n) {
            return Err(bad());
        }
        match end {
            "begin" => Ok(MarkerName(protocol::markers::crash_point_begin(n))),
            "end" => Ok(MarkerName(protocol::markers::crash_point_end(n))),
            _ => Err(bad()),
        }
    }
}

impl From<MarkerName> for String {
    fn from(m: MarkerName) -> String {
        match protocol::markers::decode_crash_point(m.0) {
            Some((n, false)) => format!("C{n}-begin"),
            Some((n, true)) => format!("C{n}-end"),
            None => format!("0x{:x}", m.0),
        }
    }
}

/// Image generators for scenarios without a power cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Generator {
    /// Each superblock field corrupted in turn, CRC left stale or recomputed.
    CorruptSb,
    /// Valid CRCs over hostile values.
    ForgedMetadata,
}

/// What must hold for the states of one device in one mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Expectation {
    pub device: String,
    pub mode: Mode,
    /// Outcomes a state may have (empty: any).
    #[serde(default)]
    pub allowed: Vec<Outcome>,
    /// Every state must be usable (recovery's `start` not refused, and a
    /// `stop;start` in the same boot reports `opened`).
    #[serde(default)]
    pub all_usable: bool,
    /// No state may bring the older cache back (`opened` with its cache_info seq).
    #[serde(default)]
    pub older_cache_never_back: bool,
    /// Every state's read-back (recovery's `verify` steps) must obey the
    /// durability rule (`workload::oracle`).
    #[serde(default)]
    pub durability: bool,
    /// Pinned counts: a change in any of them fails the scenario.
    #[serde(default)]
    pub counts: Option<Counts>,
    /// Image-set scenarios: the one outcome expected of each image, by image name
    /// (a refusal may be pinned with its reason as `refused: <reason words>`).
    #[serde(default)]
    pub per_image: BTreeMap<String, ImageOutcome>,
}

/// The outcome pinned for one image: `opened`, or `refused:<refusal kind>`
/// (the kind as the activation report names it, e.g. `refused:seg-num`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageOutcome {
    pub outcome: Outcome,
    /// The refusal's kind; only with [`Outcome::Refused`].
    pub refusal: Option<String>,
}

impl TryFrom<String> for ImageOutcome {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let (name, refusal) = match s.split_once(':') {
            Some((n, k)) => (n, Some(k.trim())),
            None => (s.as_str(), None),
        };
        let outcome = outcome_named(name.trim())?;
        match refusal {
            Some("") => Err(format!("`{s}`: empty refusal kind after `:`")),
            Some(_) if outcome != Outcome::Refused => Err(format!(
                "`{s}`: only `refused` takes a refusal kind after `:`"
            )),
            _ => Ok(ImageOutcome {
                outcome,
                refusal: refusal.map(str::to_string),
            }),
        }
    }
}

impl From<ImageOutcome> for String {
    fn from(o: ImageOutcome) -> String {
        match o.refusal {
            Some(kind) => format!("{}:{kind}", o.outcome),
            None => o.outcome.to_string(),
        }
    }
}

impl std::fmt::Display for ImageOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from(self.clone()))
    }
}

/// Every outcome, in pcache's order (for error messages).
pub const OUTCOMES: [Outcome; 5] = [
    Outcome::Formatted,
    Outcome::Opened,
    Outcome::FormatRedone,
    Outcome::SuperblockRebuilt,
    Outcome::Refused,
];

/// The outcome called `name`, or an error listing the valid names.
pub fn outcome_named(name: &str) -> Result<Outcome, String> {
    OUTCOMES
        .into_iter()
        .find(|o| o.to_string() == name)
        .ok_or_else(|| {
            let names: Vec<String> = OUTCOMES.iter().map(|o| format!("`{o}`")).collect();
            format!(
                "unknown outcome `{name}`, expected one of {}",
                names.join(", ")
            )
        })
}

/// Pinned counts of a device and mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Counts {
    /// Distinct crash states.
    pub states: usize,
    /// States per outcome; outcomes not listed must not occur.
    pub outcomes: BTreeMap<Outcome, usize>,
    /// States that are not usable.
    #[serde(default)]
    pub unusable: usize,
    /// States where the older cache came back.
    #[serde(default)]
    pub older_cache_back: usize,
    /// States whose read-back breaks the durability rule.
    #[serde(default)]
    pub durability_violations: usize,
}

/// A size such as `512M`, `1G`, `1GiB`, `4096` (bytes); K/M/G/T are powers
/// of 1024. The one size syntax of the project (`cargo xtask format --size`
/// parses with it too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Size(pub u64);

/// Why a size does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("invalid size `{0}`: expected a number with an optional K, M, G or T suffix (e.g. 512M, 1G)")]
    NoNumber(String),
    #[error("invalid size `{text}`: unknown suffix `{suffix}` (use K, M, G or T)")]
    UnknownSuffix { text: String, suffix: String },
    #[error("size `{0}` is too large")]
    TooLarge(String),
}

impl Size {
    /// Parses a size: digits, then optionally (case-insensitive, spaces
    /// allowed before it) `B`, or `K`/`M`/`G`/`T` alone or followed by `B` or `iB`.
    pub fn parse(s: &str) -> Result<Size, SizeError> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        let digits_end = lower
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(lower.len());
        let (num, suffix) = lower.split_at(digits_end);
        if num.is_empty() {
            return Err(SizeError::NoNumber(s.into()));
        }
        let shift = match suffix.trim() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            other => {
                return Err(SizeError::UnknownSuffix {
                    text: s.into(),
                    suffix: other.into(),
                })
            }
        };
        // Only digits: parsing fails on overflow alone.
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(1u64 << shift))
            .map(Size)
            .ok_or_else(|| SizeError::TooLarge(s.into()))
    }
}

impl TryFrom<String> for Size {
    type Error = SizeError;
    fn try_from(s: String) -> Result<Self, SizeError> {
        Size::parse(&s)
    }
}

impl From<Size> for String {
    fn from(s: Size) -> String {
        match s.0 {
            v if v != 0 && v % (1 << 30) == 0 => format!("{}G", v >> 30),
            v if v != 0 && v % (1 << 20) == 0 => format!("{}M", v >> 20),
            v if v != 0 && v % (1 << 10) == 0 => format!("{}K", v >> 10),
            v => v.to_string(),
        }
    }
}

/// Why a scenario file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{file}: {error}")]
    Read {
        file: PathBuf,
        error: std::io::Error,
    },
    #[error("{file}: at `{path}`: {message}")]
    Parse {
        file: PathBuf,
        path: String,
        message: String,
    },
    #[error("{file}: {message}")]
    Invalid { file: PathBuf, message: String },
}

/// Smallest cache device pcache accepts.
pub const PMEM_MIN: u64 = 512 << 20;

/// Most activations a recipe may ask for. Each one runs on the host before the
/// scenario starts, and cache_info's seq is 8 bits: beyond 255 it wraps, and an
/// older cache's seqs could equal a fresh format's.
pub const ACTIVATIONS_MAX: u32 = 255;

/// Most random subsets a `subsets` model may draw per epoch: the same order as
/// every subset of [`crate::persistence::ALL_SUBSETS_MAX`] writes (4096), so
/// that a run stays finite (each state is one VM boot).
pub const SAMPLE_MAX: usize = 4096;

/// Largest `run.power-cut.pairs.sample`: each pair is a recovery boot.
pub const PAIRS_MAX: usize = 65536;

/// Largest pmem or disk image a scenario may ask for (the images are sparse
/// files, but the VM maps the pmem image whole).
pub const DEVICE_SIZE_MAX: u64 = 64 << 30;

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(file: &Path) -> Result<Scenario, SpecError> {
        let text = std::fs::read_to_string(file).map_err(|error| SpecError::Read {
            file: file.into(),
            error,
        })?;
        Scenario::parse(file, &text)
    }

    /// Parses and checks scenario text; `file` is used in error messages.
    pub fn parse(file: &Path, text: &str) -> Result<Scenario, SpecError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let scenario: Scenario = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            SpecError::Parse {
                file: file.into(),
                path,
                message: e.into_inner().to_string(),
            }
        })?;
        // Text after the scenario's object (a second object, a stray brace
        // from an edit) is an error, not silently ignored.
        de.end().map_err(|e| SpecError::Parse {
            file: file.into(),
            path: ".".into(),
            message: e.to_string(),
        })?;
        let mut scenario = scenario;
        scenario.check().map_err(|message| SpecError::Invalid {
            file: file.into(),
            message,
        })?;
        // An image given as a file is found beside the scenario file, not in
        // whatever folder the command was started from.
        let dir = file.parent().unwrap_or(Path::new(""));
        for d in &mut scenario.devices {
            if let Recipe::File { path } = &mut d.recipe {
                if path.is_relative() {
                    *path = dir.join(&*path);
                }
            }
        }
        Ok(scenario)
    }

    /// Consistency checks serde cannot express.
    fn check(&self) -> Result<(), String> {
        if self.devices.is_empty() {
            return Err("`devices` is empty".into());
        }
        if self.modes.is_empty() {
            return Err("`modes` is empty".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            // Names become folder and file names of the run's work and results.
            let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
            if d.name.is_empty()
                || d.name.len() > 64
                || d.name.starts_with('.')
                || !d.name.chars().all(plain)
            {
                return Err(format!(
                    "devices[{i}].name: `{}` must be 1 to 64 letters, digits, `-`, `_` or `.`, not starting with `.`",
                    d.name
                ));
            }
            if !names.insert(d.name.as_str()) {
                return Err(format!("devices[{i}]: duplicate device name `{}`", d.name));
            }
            if d.pmem_size.0 < PMEM_MIN {
                return Err(format!(
                    "devices[{i}].pmem-size: {} bytes is below pcache's minimum of 512M",
                    d.pmem_size.0
                ));
            }
            for (what, size) in [("pmem-size", d.pmem_size), ("disk-size", d.disk_size)] {
                if size.0 > DEVICE_SIZE_MAX {
                    return Err(format!(
                        "devices[{i}].{what}: {} is above the maximum of {}",
                        String::from(size),
                        String::from(Size(DEVICE_SIZE_MAX))
                    ));
                }
            }
            if d.disk_size.0 == 0 || d.disk_size.0 % 512 != 0 {
                return Err(format!(
                    "devices[{i}].disk-size: must be a non-zero multiple of 512"
                ));
            }
            match d.recipe {
                Recipe::Formatted { activations: 0 } => {
                    return Err(format!(
                        "devices[{i}].recipe.formatted.activations: must be at least 1"
                    ));
                }
                // Three or more keep the older cache's cache_info seqs (n, n-1)
                // apart from a fresh format's (1).
                Recipe::OlderCache { activations } if activations < 3 => {
                    return Err(format!(
                        "devices[{i}].recipe.older-cache.activations: must be at least 3 (got {activations}), so that its cache_info seqs differ from a fresh format's"
                    ));
                }
                Recipe::Formatted { activations } | Recipe::OlderCache { activations }
                    if activations > ACTIVATIONS_MAX =>
                {
                    let kind = match d.recipe {
                        Recipe::Formatted { .. } => "formatted",
                        _ => "older-cache",
                    };
                    return Err(format!(
                        "devices[{i}].recipe.{kind}.activations: {activations} is above the maximum of {ACTIVATIONS_MAX}"
                    ));
                }
                _ => {}
            }
        }
        for (i, e) in self.expect.iter().enumerate() {
            // The runner checks a device and mode against one expectation: a
            // second one would be ignored silently.
            if let Some(j) = self.expect[..i]
                .iter()
                .position(|o| o.device == e.device && o.mode == e.mode)
            {
                return Err(format!(
                    "expect[{i}]: a second expectation for device `{}` in mode `{}` (the first is expect[{j}])",
                    e.device,
                    e.mode
                ));
            }
            if !e.per_image.is_empty() && matches!(self.run, Run::PowerCut { .. }) {
                return Err(format!(
                    "expect[{i}].per-image: only image-set scenarios (`run.images`) have named images"
                ));
            }
            if !names.contains(e.device.as_str()) {
                return Err(format!(
                    "expect[{i}].device: no device named `{}`",
                    e.device
                ));
            }
            if !self.modes.contains(&e.mode) {
                return Err(format!("expect[{i}].mode: `{}` is not in `modes`", e.mode));
            }
            if let Some(c) = &e.counts {
                let sum: usize = c.outcomes.values().sum();
                if sum != c.states {
                    return Err(format!(
                        "expect[{i}].counts: outcomes add up to {sum}, not `states` = {}",
                        c.states
                    ));
                }
            }
        }
        if let Run::PowerCut {
            window: Window::TracePositions { from, to },
            ..
        } = &self.run
        {
            if from > to {
                return Err(format!(
                    "run.power-cut.window.trace-positions: `from` {from} is after `to` {to}"
                ));
            }
        }
        if let Run::PowerCut {
            model: Model::Subsets { sample, .. },
            ..
        } = &self.run
        {
            if *sample > SAMPLE_MAX {
                return Err(format!(
                    "run.power-cut.model.subsets.sample: {sample} is above the maximum of {SAMPLE_MAX}"
                ));
            }
        }
        if let Run::PowerCut {
            model,
            pairs: Some(pairs),
            ..
        } = &self.run
        {
            if !matches!(model, Model::Subsets { .. }) {
                return Err(
                    "run.power-cut.pairs: only the `subsets` model pairs the pmem and disk families"
                        .into(),
                );
            }
            if pairs.sample > PAIRS_MAX {
                return Err(format!(
                    "run.power-cut.pairs.sample: {} is above the maximum of {PAIRS_MAX}",
                    pairs.sample
                ));
            }
        }
        if let Run::PowerCut { workload, .. } = &self.run {
            crate::guest::check_steps(workload)
                .map_err(|e| format!("run.power-cut.workload: {e}"))?;
        }
        if self.recovery.trim().is_empty() {
            return Err("`recovery` is empty".into());
        }
        crate::guest::check_steps(&self.recovery).map_err(|e| format!("recovery: {e}"))?;
        self.check_data()
    }

    /// The data checks: prefills, write ids, verify coverage, durability.
    fn check_data(&self) -> Result<(), String> {
        let workload_ops = match &self.run {
            Run::PowerCut { workload, .. } => guest_cmdline::ops_of_steps(workload)
                .map_err(|e| format!("run.power-cut.workload: {e}"))?,
            Run::Images { .. } => Vec::new(),
        };
        let verifies = verify_ranges(&self.recovery);
        let recovery_ops =
            guest_cmdline::ops_of_steps(&self.recovery).map_err(|e| format!("recovery: {e}"))?;
        // A workload write in flight at the cut is judged as issued after the
        // recovery's ops (`durability::judged_ops`), which is exact only when
        // the two never write the same sector.
        let w = workload::oracle::touched_ranges(&workload_ops);
        let r = workload::oracle::touched_ranges(&recovery_ops);
        if let Some(((wo, wl), (ro, rl))) = w
            .iter()
            .flat_map(|a| r.iter().map(move |b| (*a, *b)))
            .find(|((wo, wl), (ro, rl))| wo < &(ro + rl) && ro < &(wo + wl))
        {
            return Err(format!(
                "recovery: its writes ({ro:#x}+{rl:#x}) overlap the workload's ({wo:#x}+{wl:#x}); a workload write in flight at the cut could not be told from them"
            ));
        }
        let workload_steps = match &self.run {
            Run::PowerCut { workload, .. } => workload.as_str(),
            Run::Images { .. } => "",
        };
        for (i, d) in self.devices.iter().enumerate() {
            if d.data_crc {
                for (field, steps) in [
                    ("run.power-cut.workload", workload_steps),
                    ("recovery", self.recovery.as_str()),
                ] {
                    let plain = guest_cmdline::run_steps(steps).find_map(|s| match s {
                        Ok((text, RunStep::Start(o))) if !o.data_crc => Some(text),
                        _ => None,
                    });
                    if let Some(text) = plain {
                        return Err(format!(
                            "{field}: `{text}` on device `{}`, formatted with data-crc: say `data_crc=true` (the kernel refuses a mismatch)",
                            d.name
                        ));
                    }
                }
            }
            let disk = d.disk_size.0;
            let prefill = d.prefill_ops().map_err(|e| format!("devices[{i}].{e}"))?;
            if d.prefill.is_some()
                && !matches!(
                    d.recipe,
                    Recipe::Formatted { .. } | Recipe::File { .. } | Recipe::OlderCache { .. }
                )
            {
                return Err(format!(
                    "devices[{i}].prefill: runs on a formatted cache, so the recipe must be `formatted`, `older-cache` (the older cache's data) or `file`"
                ));
            }
            for (what, ops) in [
                ("prefill", &prefill),
                ("run.power-cut.workload", &workload_ops),
            ] {
                if let Some((off, len)) = ops.iter().find_map(|op| match *op {
                    Op::Write { off, len, .. } if off + u64::from(len) > disk => Some((off, len)),
                    _ => None,
                }) {
                    return Err(format!(
                        "{what}: a write of {len} bytes at {off} reaches past device `{}`'s disk-size ({disk} bytes)",
                        d.name
                    ));
                }
            }
            let ids = |ops: &[Op]| -> std::collections::BTreeSet<u32> {
                ops.iter()
                    .filter_map(|op| match *op {
                        Op::Write { id, .. } => Some(id),
                        _ => None,
                    })
                    .collect()
            };
            let later: Vec<Op> = workload_ops.iter().chain(&recovery_ops).copied().collect();
            if let Some(id) = ids(&prefill).intersection(&ids(&later)).next() {
                return Err(format!(
                    "devices[{i}].prefill: write id {id} is also a workload write's (the read-back could not tell them apart)"
                ));
            }
            if let Some(&(off, len)) = verifies.iter().find(|(o, l)| o + l > disk) {
                return Err(format!(
                    "recovery: verify:{off}:{len} reaches past device `{}`'s disk-size ({disk} bytes)",
                    d.name
                ));
            }
            if verifies.is_empty() {
                continue;
            }
            // A scenario that does not look where it wrote is a mistake.
            let mut ops = prefill;
            ops.extend_from_slice(&workload_ops);
            ops.extend_from_slice(&recovery_ops);
            for (off, len) in workload::touched_ranges(&ops) {
                if let Some((s, e)) = uncovered(off, off + len, &verifies) {
                    return Err(format!(
                        "recovery: no verify step reads bytes {s}..{e}, which device `{}`'s writes touch",
                        d.name
                    ));
                }
            }
        }
        for (i, e) in self.expect.iter().enumerate() {
            if !e.durability {
                continue;
            }
            if !matches!(self.run, Run::PowerCut { .. }) {
                return Err(format!(
                    "expect[{i}].durability: only power-cut scenarios have a workload to judge"
                ));
            }
            if verifies.is_empty() {
                return Err(format!(
                    "expect[{i}].durability: `recovery` has no verify step to read the data back"
                ));
            }
            if let Some(d) = self.devices.iter().find(|d| d.name == e.device) {
                if d.disk != DiskContent::Pattern {
                    return Err(format!(
                        "expect[{i}].durability: device `{}` needs `\"disk\": \"pattern\"` (on a disk of zeros every sector the cache does not hold reads as garbage)",
                        d.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Most times a prefill's ops may run (each is a host write, a few µs).
pub const PREFILL_REPEAT_MAX: u32 = 1_000_000;

impl Device {
    /// The prefill ops whose data the workload's cache holds: none for an
    /// `older-cache` recipe, whose prefill is the older cache's data, which a
    /// re-format discards (any of it reading back is a violation).
    pub fn judged_prefill_ops(&self) -> Result<Vec<Op>, String> {
        match self.recipe {
            Recipe::OlderCache { .. } => Ok(Vec::new()),
            _ => self.prefill_ops(),
        }
    }

    /// The ops of the prefill, repeated `prefill-repeat` times (empty without
    /// one); an error names the field (`prefill: ...`).
    pub fn prefill_ops(&self) -> Result<Vec<Op>, String> {
        Ok(self
            .prefill_steps()?
            .into_iter()
            .filter_map(|s| match s {
                PrefillStep::Op(op) => Some(op),
                _ => None,
            })
            .collect())
    }

    /// The steps of the prefill, repeated `prefill-repeat` times (empty
    /// without one); an error names the field (`prefill: ...`).
    pub fn prefill_steps(&self) -> Result<Vec<PrefillStep>, String> {
        // (steps, repeat, the field named in errors, the repeat's field)
        let phases: Vec<(&str, u32, String, String)> = match &self.prefill {
            None if self.prefill_repeat != 1 => {
                return Err("prefill-repeat: only with a `prefill`".into())
            }
            None => return Ok(Vec::new()),
            Some(Prefill::Steps(steps)) => {
                vec![(
                    steps.as_str(),
                    self.prefill_repeat,
                    "prefill".into(),
                    "prefill-repeat:".into(),
                )]
            }
            Some(Prefill::Phases(_)) if self.prefill_repeat != 1 => {
                return Err(
                    "prefill-repeat: only with a step string (phases have their own `repeat`)"
                        .into(),
                )
            }
            Some(Prefill::Phases(phases)) => phases
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let field = format!("prefill[{i}]");
                    (
                        p.steps.as_str(),
                        p.repeat,
                        field.clone(),
                        field + ": repeat",
                    )
                })
                .collect(),
        };
        if phases.is_empty() {
            return Err("prefill: no phases".into());
        }
        let mut all = Vec::new();
        for (steps, repeat, field, repeat_field) in phases {
            if !(1..=PREFILL_REPEAT_MAX).contains(&repeat) {
                return Err(format!(
                    "{repeat_field} {repeat} is not in 1..={PREFILL_REPEAT_MAX}"
                ));
            }
            let mut once = Vec::new();
            for step in guest_cmdline::run_steps(steps) {
                let (text, step) = step.map_err(|e| format!("{field}: {e}"))?;
                match step {
                    RunStep::Write { .. }
                    | RunStep::Flush
                    | RunStep::CloseKsets
                    | RunStep::Generate(_) => {
                        once.extend(step.ops().into_iter().map(PrefillStep::Op))
                    }
                    RunStep::Writeback => once.push(PrefillStep::Writeback),
                    RunStep::Gc => once.push(PrefillStep::Gc),
                    RunStep::Idle => once.push(PrefillStep::Idle),
                    RunStep::GcPercent(p) => once.push(PrefillStep::GcPercent(p)),
                    _ => {
                        return Err(format!(
                            "{field}: `{text}` cannot run in a prefill (it runs write, flush, close-ksets, gen, writeback, gc, idle and gc-percent on the host, between the recipe's activation and a deactivation)"
                        ))
                    }
                }
            }
            if once.is_empty() {
                return Err(format!("{field}: no steps"));
            }
            let n = all.len() + once.len() * repeat as usize;
            if n > PREFILL_OPS_MAX {
                return Err(format!(
                    "{field}: {n} steps with its repeat is above the prefill's maximum of {PREFILL_OPS_MAX}"
                ));
            }
            all.extend(once.repeat(repeat as usize));
        }
        Ok(all)
    }
}

/// Most ops a prefill may run in all.
pub const PREFILL_OPS_MAX: usize = 2_000_000;

/// The `(off, len)` of every `verify` step of `steps` (which must parse).
pub fn verify_ranges(steps: &str) -> Vec<(u64, u64)> {
    guest_cmdline::run_steps(steps)
        .filter_map(|s| match s {
            Ok((_, RunStep::Verify { off, len })) => Some((off, u64::from(len))),
            _ => None,
        })
        .collect()
}

/// The first part of `[s, e)` no range of `by` covers.
fn uncovered(s: u64, e: u64, by: &[(u64, u64)]) -> Option<(u64, u64)> {
    let mut at = s;
    loop {
        if at >= e {
            return None;
        }
        match by
            .iter()
            .filter(|(o, l)| *o <= at && at < o + l)
            .map(|(o, l)| o + l)
            .max()
        {
            Some(next) => at = next,
            None => {
                let next = by
                    .iter()
                    .map(|(o, _)| *o)
                    .filter(|&o| o > at)
                    .min()
                    .unwrap_or(e);
                return Some((at, next.min(e)));
            }
        }
    }
}

/// The scenario files in `dir`, by name (file stem), sorted.
pub fn list(dir: &Path) -> Result<Vec<(String, PathBuf)>, SpecError> {
    let rd = std::fs::read_dir(dir).map_err(|error| SpecError::Read {
        file: dir.into(),
        error,
    })?;
    let mut out = Vec::new();
    for entry in rd {
        let path = entry
            .map_err(|error| SpecError::Read {
                file: dir.into(),
                error,
            })?
            .path();
        if path.extension().is_some_and(|e| e == "json") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                out.push((stem.to_string(), path.clone()));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{
        "description": "d",
        "devices": [{"name": "blank", "pmem-size": "512M", "disk-size": "64M", "recipe": "blank"}],
        "modes": ["strict", "recover"],
        "run": {"power-cut": {"workload": "start",
                "window": {"between-markers": {"from": "C1-begin", "to": "C2-end"}},
                "model": {"subsets": {"sample": 64, "seed": 1}}}},
        "recovery": "start;stop;start",
        "expect": [{"device": "blank", "mode": "strict",
                    "counts": {"states": 8, "outcomes": {"refused": 3, "formatted": 5}}}]
    }"#;

    fn parse(text: &str) -> Result<Scenario, SpecError> {
        Scenario::parse(Path::new("x.json"), text)
    }

    /// The error of MINIMAL with `from` replaced by `to` (which must occur).
    fn error_with(from: &str, to: &str) -> String {
        assert!(MINIMAL.contains(from), "`{from}` is not in MINIMAL");
        parse(&MINIMAL.replace(from, to)).unwrap_err().to_string()
    }

    #[test]
    fn recovery_writes_must_not_overlap_the_workloads() {
        let text = MINIMAL
            .replace(
                r#""name": "blank", "pmem-size": "512M", "disk-size": "64M", "recipe": "blank""#,
                r#""name": "blank", "pmem-size": "512M", "disk-size": "64M", "disk": "pattern", "recipe": "blank""#,
            )
            .replace(
                r#""recovery": "start;stop;start""#,
                r#""recovery": "start;write:0:1024:7:fua;verify:0:1024""#,
            );
        assert!(parse(&text).is_ok(), "{:?}", parse(&text));
        let e = parse(&text.replace(
            r#""workload": "start""#,
            r#""workload": "start;write:512:512:1""#,
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("recovery: its writes (0x0+0x400) overlap the workload's (0x200+0x200)"),
            "{e}"
        );
        // Side by side they are fine.
        let side = text
            .replace(
                "write:0:1024:7:fua;verify:0:1024",
                "write:0:512:7:fua;verify:0:1024",
            )
            .replace(
                r#""workload": "start""#,
                r#""workload": "start;write:512:512:1""#,
            );
        assert!(parse(&side).is_ok(), "{:?}", parse(&side));
    }

    #[test]
    fn a_disk_fault_plan_is_read_and_a_bad_one_named() {
        let with = |faults: &str| {
            MINIMAL.replace(
                r#""model": {"subsets": {"sample": 64, "seed": 1}}}}"#,
                &format!(
                    r#""model": {{"subsets": {{"sample": 64, "seed": 1}}}}, "faults": {faults}}}}}"#
                ),
            )
        };
        let s = parse(&with(r#"{"fail-flushes": [{"nth": 2, "onward": true}]}"#)).unwrap();
        let Run::PowerCut { faults, .. } = &s.run else {
            panic!("{:?}", s.run);
        };
        assert_eq!(
            faults.fail_flushes,
            [vmm::FaultWhen::from_nth_on(2).unwrap()]
        );
        assert!(faults.fail_writes.is_empty());
        assert_eq!(parse(&serde_json::to_string(&s).unwrap()).unwrap(), s);
        // No plan: nothing fails, and the field is not written back.
        let Run::PowerCut { faults, .. } = &parse(MINIMAL).unwrap().run else {
            unreachable!()
        };
        assert!(faults.is_empty());
        let e = parse(&with(r#"{"fail-flushes": [{"nth": 0}]}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("run.power-cut.faults"), "{e}");
        let e = parse(&with(r#"{"fail-reads": []}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fail-reads"), "{e}");
    }

    #[test]
    fn the_pairing_of_the_domains_is_read_and_a_bad_one_named() {
        let with = |model: &str, pairs: &str| {
            MINIMAL.replace(
                r#""model": {"subsets": {"sample": 64, "seed": 1}}}}"#,
                &format!(r#""model": {model}, "pairs": {pairs}}}}}"#),
            )
        };
        let subsets = r#"{"subsets": {"sample": 64, "seed": 1}}"#;
        let s = parse(&with(subsets, r#"{"sample": 100, "seed": 7}"#)).unwrap();
        let Run::PowerCut { pairs, .. } = &s.run else {
            panic!("{:?}", s.run);
        };
        assert_eq!(
            *pairs,
            Some(Pairs {
                sample: 100,
                seed: 7
            })
        );
        assert_eq!(parse(&serde_json::to_string(&s).unwrap()).unwrap(), s);
        let Run::PowerCut { pairs, .. } = &parse(MINIMAL).unwrap().run else {
            unreachable!()
        };
        assert_eq!(*pairs, None, "absent: the default pairing");
        let e = parse(&with(r#""prefix""#, r#"{"sample": 1, "seed": 0}"#))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("run.power-cut.pairs: only the `subsets` model"),
            "{e}"
        );
        let e = parse(&with(subsets, r#"{"sample": 65537, "seed": 0}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("run.power-cut.pairs.sample: 65537"), "{e}");
        let e = parse(&with(subsets, r#"{"sample": 1}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("seed"), "{e}");
    }

    #[test]
    fn a_minimal_scenario_parses() {
        let s = parse(MINIMAL).unwrap();
        assert_eq!(s.devices[0].pmem_size, Size(512 << 20));
        let Run::PowerCut {
            window: Window::BetweenMarkers { from, to, .. },
            ..
        } = &s.run
        else {
            panic!("wrong run kind: {:?}", s.run);
        };
        assert_eq!(from.0, protocol::markers::crash_point_begin(1));
        assert_eq!(to.0, protocol::markers::crash_point_end(2));
        let round = serde_json::to_string(&s).unwrap();
        assert_eq!(parse(&round).unwrap(), s);
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_path() {
        let err = error_with("\"pmem-size\"", "\"colour\": 1, \"pmem-size\"");
        assert!(err.starts_with("x.json: at `devices[0]"), "{err}");
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn bad_values_name_the_path() {
        let err = error_with("C1-begin", "C13-begin");
        assert!(
            err.contains("run.power-cut.window.between-markers.from"),
            "{err}"
        );
        assert!(err.contains("C13-begin"), "{err}");
        let err = error_with("\"64M\"", "\"64Q\"");
        assert!(
            err.contains("devices[0].disk-size") && err.contains("64Q"),
            "{err}"
        );
    }

    #[test]
    fn inconsistent_scenarios_are_refused() {
        assert!(error_with("\"512M\"", "\"256M\"").contains("minimum of 512M"));
        assert!(error_with("\"formatted\": 5", "\"formatted\": 4").contains("add up to 7"));
        assert!(
            error_with("{\"device\": \"blank\"", "{\"device\": \"nope\"")
                .contains("no device named `nope`")
        );
    }

    #[test]
    fn a_misspelled_outcome_is_refused_at_load_with_the_valid_names() {
        let names = "`formatted`, `opened`, `format-redone`, `superblock-rebuilt`, `refused`";
        // In `allowed`.
        let err = error_with(
            "\"mode\": \"strict\",\n",
            "\"mode\": \"strict\", \"allowed\": [\"formatted\", \"opend\"],\n",
        );
        assert!(
            err.starts_with("x.json: at `expect[0].allowed[1]`"),
            "{err}"
        );
        assert!(err.contains("`opend`") && err.contains(names), "{err}");
        // As a pinned count.
        let err = error_with("\"formatted\": 5", "\"formated\": 5");
        assert!(
            err.starts_with("x.json: at `expect[0].counts.outcomes"),
            "{err}"
        );
        assert!(err.contains("`formated`") && err.contains(names), "{err}");
        // As an image's expected outcome (with or without a refusal kind).
        for bad in ["refuzed:seg-num", "openned"] {
            let err = ImageOutcome::try_from(bad.to_string()).unwrap_err();
            assert!(err.contains(names), "{err}");
        }
        let ok = ImageOutcome::try_from("refused:seg-num".to_string()).unwrap();
        assert_eq!(
            (ok.outcome, ok.refusal.as_deref()),
            (Outcome::Refused, Some("seg-num"))
        );
        assert_eq!(ok.to_string(), "refused:seg-num");
        assert!(ImageOutcome::try_from("opened:seg-num".to_string()).is_err());
        assert!(ImageOutcome::try_from("refused:".to_string()).is_err());
    }

    #[test]
    fn numbers_that_would_keep_a_run_going_are_bounded() {
        let err = error_with(
            "\"recipe\": \"blank\"",
            "\"recipe\": {\"formatted\": {\"activations\": 4294967295}}",
        );
        assert!(
            err.contains(
                "devices[0].recipe.formatted.activations: 4294967295 is above the maximum of 255"
            ),
            "{err}"
        );
        let older = |n: u32| {
            MINIMAL.replace(
                "\"recipe\": \"blank\"",
                &format!("\"recipe\": {{\"older-cache\": {{\"activations\": {n}}}}}"),
            )
        };
        let err = parse(&older(256)).unwrap_err().to_string();
        assert!(
            err.contains("recipe.older-cache.activations: 256 is above the maximum of 255"),
            "{err}"
        );
        assert!(parse(&older(255)).is_ok());
        let err = error_with("\"sample\": 64", "\"sample\": 1000000");
        assert!(
            err.contains(
                "run.power-cut.model.subsets.sample: 1000000 is above the maximum of 4096"
            ),
            "{err}"
        );
        let err = error_with("\"64M\"", "\"65G\"");
        assert!(
            err.contains("devices[0].disk-size: 65G is above the maximum of 64G"),
            "{err}"
        );
    }

    #[test]
    fn device_names_are_plain_file_names() {
        for bad in ["", "../up", "a/b", ".hidden", "sp ace"] {
            let err = error_with("\"name\": \"blank\"", &format!("\"name\": \"{bad}\""));
            assert!(err.contains("devices[0].name:"), "{bad}: {err}");
        }
        let long = "n".repeat(65);
        assert!(
            error_with("\"name\": \"blank\"", &format!("\"name\": \"{long}\"")).contains("1 to 64")
        );
    }

    #[test]
    fn unknown_steps_fail_at_load() {
        let err = error_with("start;stop;start", "start;stpo;start");
        assert!(
            err.starts_with("x.json: recovery: step 2 `stpo`: unknown step (the steps are: start"),
            "{err}"
        );
        let err = error_with(
            "\"workload\": \"start\"",
            "\"workload\": \"start:mode=fast\"",
        );
        assert!(
            err.starts_with("x.json: run.power-cut.workload: step 1 `start:mode=fast`"),
            "{err}"
        );
    }

    #[test]
    fn a_second_expectation_for_a_device_and_mode_is_refused() {
        let err = error_with(
            "\"expect\": [{",
            "\"expect\": [{\"device\": \"blank\", \"mode\": \"strict\"}, {",
        );
        assert!(
            err.contains("expect[1]: a second expectation for device `blank` in mode `strict`"),
            "{err}"
        );
    }

    #[test]
    fn per_image_expectations_need_an_image_set() {
        let err = error_with(
            "\"counts\": {",
            "\"per-image\": {\"magic/new-crc\": \"opened\"}, \"counts\": {",
        );
        assert!(err.contains("expect[0].per-image"), "{err}");
    }

    #[test]
    fn a_reversed_trace_window_names_its_path() {
        let err = error_with(
            "{\"between-markers\": {\"from\": \"C1-begin\", \"to\": \"C2-end\"}}",
            "{\"trace-positions\": {\"from\": 9, \"to\": 3}}",
        );
        assert!(
            err.contains("run.power-cut.window.trace-positions: `from` 9 is after `to` 3"),
            "{err}"
        );
    }

    #[test]
    fn image_files_are_found_beside_the_scenario_file() {
        let text = MINIMAL.replace(
            "\"recipe\": \"blank\"",
            "\"recipe\": {\"file\": {\"path\": \"reports/case.pmem\"}}",
        );
        let s = Scenario::parse(Path::new("/work/scenarios/x.json"), &text).unwrap();
        assert_eq!(
            s.devices[0].recipe,
            Recipe::File {
                path: "/work/scenarios/reports/case.pmem".into()
            }
        );
        let abs = text.replace("reports/case.pmem", "/tmp/case.pmem");
        let s = Scenario::parse(Path::new("/work/scenarios/x.json"), &abs).unwrap();
        assert_eq!(
            s.devices[0].recipe,
            Recipe::File {
                path: "/tmp/case.pmem".into()
            }
        );
    }

    #[test]
    fn text_after_the_scenario_is_an_error() {
        let err = parse(&format!("{MINIMAL}\n}}")).unwrap_err().to_string();
        assert!(
            err.starts_with("x.json: at `.`: trailing characters"),
            "{err}"
        );
        assert!(
            parse(&format!("{MINIMAL}\n  \n")).is_ok(),
            "whitespace is fine"
        );
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(Size::parse("512M"), Ok(Size(512 << 20)));
        assert_eq!(Size::parse("1G"), Ok(Size(1 << 30)));
        assert_eq!(Size::parse("1GiB"), Ok(Size(1 << 30)));
        assert_eq!(Size::parse("2t"), Ok(Size(2 << 40)));
        assert_eq!(Size::parse(" 64k "), Ok(Size(64 << 10)));
        assert_eq!(Size::parse("4096"), Ok(Size(4096)));
        assert_eq!(Size::parse("4096b"), Ok(Size(4096)));
        for bad in ["", "M", "-1G"] {
            assert_eq!(
                Size::parse(bad),
                Err(SizeError::NoNumber(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            Size::parse("12X").unwrap_err().to_string(),
            "invalid size `12X`: unknown suffix `x` (use K, M, G or T)"
        );
        assert!(matches!(
            Size::parse("1.5G"),
            Err(SizeError::UnknownSuffix { .. })
        ));
        for big in ["99999999999999999999T", "99999999999999999999", "16777216T"] {
            assert_eq!(
                Size::parse(big),
                Err(SizeError::TooLarge(big.into())),
                "{big}"
            );
        }
        assert_eq!(Size::parse("16777215T"), Ok(Size(16_777_215 << 40)));
        assert_eq!(String::from(Size(1 << 30)), "1G");
        assert_eq!(String::from(Size(1000)), "1000");
    }

    #[test]
    fn marker_names_round_trip() {
        for n in 1..=12 {
            for end in ["begin", "end"] {
                let s = format!("C{n}-{end}");
                assert_eq!(String::from(MarkerName::try_from(s.clone()).unwrap()), s);
            }
        }
        assert_eq!(MarkerName::try_from("0x10".to_string()), Ok(MarkerName(16)));
        assert!(MarkerName::try_from("C0-begin".to_string()).is_err());
        assert!(MarkerName::try_from("C1-middle".to_string()).is_err());
    }

    /// MINIMAL as a data scenario: a pattern disk, a prefill, a workload of
    /// writes and a recovery that verifies them, durability expected.
    fn data_scenario() -> String {
        MINIMAL
            .replace(
                "\"recipe\": \"blank\"",
                "\"recipe\": {\"formatted\": {\"activations\": 1}}, \"disk\": \"pattern\", \"prefill\": \"write:0:4096:1;flush\"",
            )
            .replace(
                "\"workload\": \"start\"",
                "\"workload\": \"start;write:8192:512:2:fua;write:0x3ffe00:1024:3\"",
            )
            .replace("start;stop;start", "start;verify:0:0x4000;verify:0x3ff000:0x2000;stop;start")
            .replace("\"mode\": \"strict\",\n", "\"mode\": \"strict\", \"durability\": true,\n")
            .replace("\"states\": 8, \"outcomes\": {\"refused\": 3, \"formatted\": 5}", "\"states\": 1, \"outcomes\": {\"opened\": 1}, \"durability-violations\": 0")
    }

    fn data_error(from: &str, to: &str) -> String {
        let text = data_scenario();
        assert!(text.contains(from), "`{from}` is not in the data scenario");
        parse(&text.replace(from, to)).unwrap_err().to_string()
    }

    #[test]
    fn a_data_scenario_parses_with_its_prefill_ops() {
        let s = parse(&data_scenario()).unwrap();
        let d = &s.devices[0];
        assert_eq!(d.disk, DiskContent::Pattern);
        assert_eq!(
            d.prefill_ops().unwrap(),
            [
                Op::Write {
                    off: 0,
                    len: 4096,
                    id: 1,
                    fua: false
                },
                Op::Flush
            ]
        );
        assert!(s.expect[0].durability);
        assert_eq!(
            s.expect[0].counts.as_ref().unwrap().durability_violations,
            0
        );
        let round = serde_json::to_string(&s).unwrap();
        assert_eq!(parse(&round).unwrap(), s);
        // The default disk is zeros, and a repeat multiplies the ops.
        let plain = parse(MINIMAL).unwrap();
        assert_eq!(plain.devices[0].disk, DiskContent::Zeros);
        let text = data_scenario().replace("\"prefill\":", "\"prefill-repeat\": 3, \"prefill\":");
        assert_eq!(
            parse(&text).unwrap().devices[0]
                .prefill_ops()
                .unwrap()
                .len(),
            6
        );
    }

    #[test]
    fn a_recovery_that_does_not_look_where_the_writes_went_is_refused() {
        // The workload's write across 4 MiB ends at 0x400200: verify stops short.
        let err = data_error("verify:0x3ff000:0x2000", "verify:0x3ff000:0x1000");
        assert!(
            err.contains("recovery: no verify step reads bytes 4194304..4194816, which device `blank`'s writes touch"),
            "{err}"
        );
        // The prefill's writes count too.
        let err = data_error("verify:0:0x4000", "verify:0x1000:0x3000");
        assert!(err.contains("bytes 0..4096"), "{err}");
        let err = data_error("verify:0:0x4000;verify:0x3ff000:0x2000;", "");
        assert!(
            err.contains("expect[0].durability: `recovery` has no verify step"),
            "{err}"
        );
    }

    #[test]
    fn durability_needs_a_pattern_disk() {
        let err = data_error("\"disk\": \"pattern\"", "\"disk\": \"zeros\"");
        assert!(
            err.contains("expect[0].durability: device `blank` needs `\"disk\": \"pattern\"`"),
            "{err}"
        );
        let err = data_error("\"disk\": \"pattern\"", "\"disk\": \"stripes\"");
        assert!(err.contains("at `devices[0].disk`"), "{err}");
    }

    #[test]
    fn prefills_are_data_ops_on_a_formatted_cache_with_their_own_ids() {
        let err = data_error("write:0:4096:1;flush", "write:0:4096:1;stop");
        assert!(
            err.contains("devices[0].prefill: `stop` cannot run in a prefill"),
            "{err}"
        );
        let err = data_error("write:0:4096:1;flush", "write:0:4096:2;flush");
        assert!(
            err.contains("devices[0].prefill: write id 2 is also a workload write's"),
            "{err}"
        );
        let err = data_error("{\"formatted\": {\"activations\": 1}}", "\"blank\"");
        assert!(
            err.contains("devices[0].prefill: runs on a formatted cache"),
            "{err}"
        );
        let err = data_error("write:0:4096:1;flush", "write:0:4096:1;flsh");
        assert!(err.contains("devices[0].prefill: step 2 `flsh`"), "{err}");
        let err = data_error("\"prefill\":", "\"prefill-repeat\": 0, \"prefill\":");
        assert!(
            err.contains("devices[0].prefill-repeat: 0 is not in 1..="),
            "{err}"
        );
        let err = parse(&MINIMAL.replace(
            "\"recipe\": \"blank\"",
            "\"recipe\": \"blank\", \"prefill-repeat\": 2",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("devices[0].prefill-repeat: only with a `prefill`"),
            "{err}"
        );
    }

    #[test]
    fn a_prefill_in_phases_runs_them_in_order_and_names_a_bad_one() {
        let phases = r#"[{"steps": "gc-percent:0;write:0:4096:1", "repeat": 2}, {"steps": "idle;write:0:512:4:fua"}]"#;
        let text = data_scenario().replace("\"write:0:4096:1;flush\"", phases);
        let sc = parse(&text).unwrap();
        let steps = sc.devices[0].prefill_steps().unwrap();
        let write = |len, id, fua| {
            PrefillStep::Op(Op::Write {
                off: 0,
                len,
                id,
                fua,
            })
        };
        assert_eq!(
            steps,
            [
                PrefillStep::GcPercent(0),
                write(4096, 1, false),
                PrefillStep::GcPercent(0),
                write(4096, 1, false),
                PrefillStep::Idle,
                write(512, 4, true),
            ]
        );
        assert_eq!(sc.devices[0].prefill_ops().unwrap().len(), 3);
        let err = parse(&text.replace("\"repeat\": 2", "\"repeat\": 0"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("devices[0].prefill[0]: repeat 0 is not in"),
            "{err}"
        );
        let err = parse(&text.replace("idle;", "stop;"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("devices[0].prefill[1]: `stop` cannot run"),
            "{err}"
        );
    }

    #[test]
    fn a_data_crc_device_needs_data_crc_starts() {
        let text = data_scenario().replace(
            "\"disk\": \"pattern\"",
            "\"disk\": \"pattern\", \"data-crc\": true",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("run.power-cut.workload: `start` on device `blank`, formatted with data-crc: say `data_crc=true`"),
            "{err}"
        );
        let text = text.replace(
            "\"workload\": \"start;",
            "\"workload\": \"start:data_crc=true;",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("recovery: `start` on device"), "{err}");
        let text = text
            .replace("\"start;verify", "\"start:data_crc=true;verify")
            .replace(";stop;start\"", ";stop;start:data_crc=true\"");
        let sc = parse(&text).unwrap();
        assert!(sc.devices[0].data_crc);
    }

    #[test]
    fn writes_and_verifies_must_fit_the_disk() {
        let err = data_error("\"64M\"", "\"4M\"");
        assert!(
            err.contains("a write of 1024 bytes at 4193792 reaches past device `blank`'s disk-size (4194304 bytes)"),
            "{err}"
        );
        let err = data_error("verify:0:0x4000", "verify:0:0x4000;verify:0x4000000:0x1000");
        assert!(
            err.contains("recovery: verify:67108864:4096 reaches past"),
            "{err}"
        );
    }

    #[test]
    fn every_occurrence_windows_round_trip() {
        let text = MINIMAL.replace("\"to\": \"C2-end\"", "\"to\": \"C2-end\", \"every\": true");
        let s = parse(&text).unwrap();
        assert!(matches!(
            s.run,
            Run::PowerCut {
                window: Window::BetweenMarkers { every: true, .. },
                ..
            }
        ));
        assert_eq!(parse(&serde_json::to_string(&s).unwrap()).unwrap(), s);
        assert!(parse(&text.replace("\"every\": true", "\"every\": 1")).is_err());
    }

    #[test]
    fn the_random_workload_crosses_4mib_boundaries_flushes_and_uses_fua() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("random-workload.json");
        let s = Scenario::load(&file).unwrap();
        let Run::PowerCut { workload, .. } = &s.run else {
            panic!("a power-cut scenario");
        };
        let ops = guest_cmdline::ops_of_steps(workload).unwrap();
        let crossing = ops.iter().filter(|op| {
            matches!(**op, Op::Write { off, len, .. }
                if off / (4 << 20) != (off + u64::from(len) - 1) / (4 << 20))
        });
        assert!(crossing.count() >= 2, "{ops:?}");
        assert!(ops.contains(&Op::Flush), "{ops:?}");
        assert!(
            ops.iter()
                .any(|op| matches!(op, Op::Write { fua: true, .. })),
            "{ops:?}"
        );
    }

    #[test]
    fn uncovered_finds_the_first_gap() {
        assert_eq!(uncovered(0, 10, &[(0, 4), (4, 6)]), None);
        assert_eq!(uncovered(0, 10, &[(0, 4), (6, 6)]), Some((4, 6)));
        assert_eq!(uncovered(2, 10, &[(0, 5)]), Some((5, 10)));
        assert_eq!(uncovered(0, 10, &[]), Some((0, 10)));
    }

    #[test]
    fn the_shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let all = list(dir).unwrap();
        let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "crash-mid-sb-write",
            "crash-mid-format",
            "corrupt-sb",
            "forged-metadata",
            "crash-mid-data-write",
            "crash-mid-kset-append",
            "crash-mid-log-switch",
            "crash-mid-cache-info-update",
            "crash-during-recovery",
            "random-workload",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for (name, path) in &all {
            Scenario::load(path).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
