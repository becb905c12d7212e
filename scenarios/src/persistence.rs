//! Persistence models: which crash states exist when power is cut during a traced window.
//!
//! A traced window is a list of [`Event`]s in the order the VMM saw them. A *cut*
//! at position `c` means events `[0, c)` were issued before power failed. A model
//! decides which of the issued writes are durable at a cut; each choice is a
//! [`CrashState`]. Writes fall in two *domains* with their own barrier: 8-byte
//! stores into the pmem region (barrier: a completed virtio-pmem flush) and
//! sector writes to the disk (barrier: a completed virtio-blk FLUSH).
//!
//! Before any model runs, writes that change no byte are dropped (zeroing zeros
//! is not a state): a write is dropped when it changes no byte of the image as
//! it stood when it was issued *and* no crash image can differ with or without
//! it (see `Writes::new`), so dropping never loses a state.
//!
//! The models (`docs/format.md` §10 explains why they matter):
//! - [`Model::Prefix`]: the writes before the cut are durable, in order. One state
//!   at the window's start and one after every write in the window (every
//!   sector, for the disk: power may fail between the sectors of one write).
//! - [`Model::FlushedOnly`]: only what a completed barrier covered is durable. One
//!   state at the window's start and one after every barrier in the window.
//! - [`Model::Subsets`]: what a completed barrier covered is durable, and any subset
//!   of the writes pending since then may be durable too. Each domain follows the
//!   rule on its own, and a state is one choice of each. When at most
//!   [`ALL_SUBSETS_MAX`] writes of a domain are pending, every subset of them is
//!   a choice, at every cut position (paired with the other domain's families
//!   there if it has more pending). Above that, at the end of each barrier epoch in the window (just
//!   before the barrier, or at the window's end): every prefix, every suffix, every
//!   single drop, every single write alone, and `sample` subsets drawn with a
//!   seeded generator (each write kept with probability ½). The prefixes there
//!   cover every earlier cut's "all issued writes durable" state.
//! - [`Model::AtFences`]: for epochs too long for `subsets` (a data write of
//!   thousands of stores). At the end of each barrier epoch: only what the
//!   barriers covered, everything issued, and `sample` seeded random subsets of
//!   the pending writes (each kept with probability ½); at the window's start
//!   and just after every marker (the guest's op and crash-point boundaries):
//!   everything issued, in program order.
//!
//! States whose images are byte-identical are deduplicated on the applied delta
//! and counted once.

use persist::{subset_family, Domain};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// Every subset of the pending writes is enumerated up to this many (the
/// shared rule of the `persist` crate).
pub use persist::ALL_SUBSETS_MAX;

/// Bytes per disk sector (the unit of disk writes).
pub const SECTOR: usize = 512;

pub use vmm::trace::{Event, Trace};
/// One unit of durability: a pmem store, or one sector of a disk write.
pub use vmm::WriteRef as Write;

/// The image the window starts from (everything before it is durable).
pub trait BaseImage {
    /// The byte at pmem offset `off`.
    fn pmem_byte(&self, off: u64) -> u8;
    /// Sector `sector` of the disk (`SECTOR` bytes).
    fn disk_sector(&self, sector: u64) -> Vec<u8>;
    /// The 8 bytes at the 8-aligned pmem offset `word * 8`.
    fn pmem_word(&self, word: u64) -> [u8; 8] {
        core::array::from_fn(|i| self.pmem_byte(word * 8 + i as u64))
    }
}

/// A persistence model. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Model {
    Prefix,
    FlushedOnly,
    Subsets {
        /// Number of random subsets drawn per epoch with more than `ALL_SUBSETS_MAX` writes.
        sample: usize,
        /// Seed of the random sample.
        seed: u64,
    },
    /// For long epochs (thousands of pending stores): at each barrier, the
    /// durable image, everything issued, and `sample` random subsets of the
    /// pending writes; after each marker, everything issued.
    AtFences {
        /// Random subsets drawn at each epoch's end.
        sample: usize,
        /// Seed of the random sample.
        seed: u64,
    },
}

/// How `subsets` pairs a cut's pmem choices with its disk choices. Every pair
/// while there are at most `sample` of them; above that (the cross product of
/// two families grows as their product), each choice of one domain with the
/// other's two ends (only what its barriers covered, everything it issued),
/// and `sample` pairs drawn with a generator seeded by `seed` and the cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Pairs {
    /// Every pair up to this many; above it, this many random pairs.
    pub sample: usize,
    /// Seed of the random pairs.
    pub seed: u64,
}

/// The pairing used when a scenario sets none: large enough that every
/// scenario without one tries every pair.
pub const PAIRS_DEFAULT: Pairs = Pairs {
    sample: 4096,
    seed: 0,
};

impl Default for Pairs {
    fn default() -> Self {
        PAIRS_DEFAULT
    }
}

/// A crash state: the cut position and the writes that are durable there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashState {
    /// Events `[0, cut)` were issued.
    pub cut: usize,
    /// Durable pmem stores, in trace order.
    pub pmem: Vec<Write>,
    /// Durable disk sectors, in trace order.
    pub disk: Vec<Write>,
}

/// The states a model gives for a window.
#[derive(Clone, Debug, Default)]
pub struct Enumeration {
    /// Distinct states, in the order they were first produced.
    pub states: Vec<CrashState>,
    /// States dropped because an earlier one gave the same images.
    pub duplicates: usize,
    /// Writes dropped because they changed no byte when issued.
    pub unchanged_writes: usize,
    /// `subsets`: (pmem choice, disk choice) pairs of all cuts, summed: the
    /// full cross product of the two families.
    pub pairs_full: u64,
    /// `subsets`: the pairs tried (every pair, or the bounded sample of
    /// [`Pairs`] at cuts where the product is larger).
    pub pairs_tried: u64,
}

/// Errors in the inputs of an enumeration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnumerateError {
    #[error("window {start}..={end} is not within the trace of {len} events")]
    BadWindow {
        start: usize,
        end: usize,
        len: usize,
    },
    #[error("event {event}: store of {len} bytes (must be 1..=8)")]
    BadStoreLength { event: usize, len: u8 },
    #[error("event {event}: disk write of {len} bytes is not a whole number of sectors")]
    BadDiskWrite { event: usize, len: u32 },
}

/// Enumerates the crash states of cuts at positions `start..=end`.
pub fn enumerate(
    trace: &Trace,
    start: usize,
    end: usize,
    model: &Model,
    base: &dyn BaseImage,
) -> Result<Enumeration, EnumerateError> {
    enumerate_windows(trace, &[(start, end)], model, base)
}

/// Enumerates the crash states of cuts in each window `start..=end` of
/// `windows`; a state whose images equal an earlier window's is counted once.
pub fn enumerate_windows(
    trace: &Trace,
    windows: &[(usize, usize)],
    model: &Model,
    base: &dyn BaseImage,
) -> Result<Enumeration, EnumerateError> {
    enumerate_paired(trace, windows, model, &PAIRS_DEFAULT, base)
}

/// As [`enumerate_windows`], with `subsets` pairing the domains' choices as
/// `pairs` says.
pub fn enumerate_paired(
    trace: &Trace,
    windows: &[(usize, usize)],
    model: &Model,
    pairs: &Pairs,
    base: &dyn BaseImage,
) -> Result<Enumeration, EnumerateError> {
    let len = trace.events().len();
    if let Some(&(start, end)) = windows.iter().find(|(s, e)| s > e || *e > len) {
        return Err(EnumerateError::BadWindow { start, end, len });
    }
    let writes = Writes::new(trace, base)?;
    let mut out = Emitter::new(&writes);
    out.enumeration.unchanged_writes = writes.unchanged;
    for &(start, end) in windows {
        window_states(&mut out, &writes, start, end, model, pairs);
    }
    Ok(out.enumeration)
}

/// The states `model` gives for cuts `start..=end`.
fn window_states(
    out: &mut Emitter,
    trace: &Writes,
    start: usize,
    end: usize,
    model: &Model,
    pairs: &Pairs,
) {
    let events = trace.trace.events();
    let is_barrier =
        |cut: usize| matches!(events.get(cut), Some(Event::PmemFlush | Event::BlkFlush));
    match model {
        Model::Prefix => {
            // Everything issued before the window's start, then one more write
            // (a store, or one sector: a cut may fall between the sectors of
            // a disk write) at a time.
            let before = trace
                .writes
                .iter()
                .take_while(|(_, w)| (w.event as usize) < start)
                .count();
            out.emit_prefix(start, before);
            for (n, (_, w)) in trace.writes.iter().enumerate().skip(before) {
                if w.event as usize >= end {
                    break;
                }
                out.emit_prefix(w.event as usize + 1, n + 1);
            }
        }
        Model::FlushedOnly => {
            out.emit_flushed(start);
            for (i, e) in events.iter().enumerate().take(end).skip(start) {
                if matches!(e, Event::PmemFlush | Event::BlkFlush) {
                    out.emit_flushed(i + 1);
                }
            }
        }
        Model::Subsets { sample, seed } => {
            for cut in start..=end {
                let pending_pmem = trace.pending(Domain::Pmem, cut);
                let pending_disk = trace.pending(Domain::Disk, cut);
                let few = |p: &[Write]| p.len() <= ALL_SUBSETS_MAX;
                // Each domain follows the rule on its own: one whose pending
                // writes are few gets every subset at this cut even when the
                // other's are many (that one then gives its families here,
                // without the random sample, which is drawn at epoch ends).
                let small = few(&pending_pmem) && few(&pending_disk);
                let mixed = (few(&pending_pmem) && !pending_pmem.is_empty())
                    || (few(&pending_disk) && !pending_disk.is_empty());
                // The last cut of an epoch: the window's end, or just before a barrier.
                let epoch_end = cut == end || is_barrier(cut);
                if small || mixed || epoch_end {
                    let n = if epoch_end { *sample } else { 0 };
                    let pmem = subset_family(&pending_pmem, n, seed ^ cut as u64);
                    let disk = subset_family(&pending_disk, n, !seed ^ cut as u64);
                    let ends = [&pending_pmem[..], &pending_disk[..]];
                    out.emit_pairs(cut, &pmem, &disk, ends, pairs);
                }
            }
        }
        Model::AtFences { sample, seed } => {
            for cut in start..=end {
                let after_marker =
                    cut == start || matches!(events.get(cut - 1), Some(Event::Marker { .. }));
                let epoch_end = cut == end || is_barrier(cut);
                if !(after_marker || epoch_end) {
                    continue;
                }
                let pmem = trace.pending(Domain::Pmem, cut);
                let disk = trace.pending(Domain::Disk, cut);
                // Program order: everything issued so far persisted.
                out.emit_with(cut, &pmem, &disk);
                if epoch_end {
                    out.emit_flushed(cut);
                    let mut rng = SplitMix64(*seed ^ (cut as u64).wrapping_mul(0x9e37_79b9));
                    for _ in 0..*sample {
                        let p = rng.subset(&pmem);
                        let d = rng.subset(&disk);
                        out.emit_with(cut, &p, &d);
                    }
                }
            }
        }
    }
}

/// splitmix64: a seeded stream for the `at-fences` sample (reproducible, no
/// dependency).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Each write kept with probability ½, in order.
    fn subset(&mut self, writes: &[Write]) -> Vec<Write> {
        let mut out = Vec::new();
        let mut bits = 0u64;
        for (i, w) in writes.iter().enumerate() {
            if i % 64 == 0 {
                bits = self.next_u64();
            }
            if bits & (1 << (i % 64)) != 0 {
                out.push(*w);
            }
        }
        out
    }
}

/// The trace's writes, with unchanged ones dropped, and its barriers.
struct Writes<'a> {
    trace: &'a Trace,
    /// Writes that changed the image when issued, in trace order.
    writes: Vec<(Domain, Write)>,
    unchanged: usize,
    base: &'a dyn BaseImage,
}

impl<'a> Writes<'a> {
    fn new(trace: &'a Trace, base: &'a dyn BaseImage) -> Result<Self, EnumerateError> {
        let mut volatile = Overlay::default();
        let mut writes = Vec::new();
        let mut unchanged = 0;
        // Per pmem byte: the kept store that last wrote it since the last pmem
        // flush (its offset and length).
        let mut last_kept: HashMap<u64, (u64, u8)> = HashMap::new();
        for (i, e) in trace.events().iter().enumerate() {
            let event = i as u64;
            match *e {
                Event::PmemStore { offset, len, .. } => {
                    if !(1..=8).contains(&len) {
                        return Err(EnumerateError::BadStoreLength { event: i, len });
                    }
                    let bytes = Trace::store_bytes(e);
                    // A store that changes no byte of the image as issued is
                    // dropped only when that holds in every crash image too:
                    // no kept store since the last flush wrote its bytes (they
                    // hold the durable value), or one kept store of exactly
                    // its bytes did (any state with this store has the same
                    // images with that one instead). A narrower or wider
                    // earlier store is not enough: persisting without it, this
                    // store changes bytes.
                    let droppable = volatile.pmem_unchanged(offset, &bytes, base) && {
                        let mut writers =
                            (offset..offset + u64::from(len)).map(|at| last_kept.get(&at).copied());
                        let first = writers.next().flatten();
                        writers.all(|w| w == first)
                            && first.is_none_or(|range| range == (offset, len))
                    };
                    volatile.pmem_apply(offset, &bytes, base);
                    if droppable {
                        unchanged += 1;
                    } else {
                        writes.push((Domain::Pmem, Write { event, part: 0 }));
                        for at in offset..offset + u64::from(len) {
                            last_kept.insert(at, (offset, len));
                        }
                    }
                }
                Event::BlkWrite { sector, len, .. } => {
                    let data = trace.blk_data(e);
                    if data.is_empty() || data.len() % SECTOR != 0 {
                        return Err(EnumerateError::BadDiskWrite { event: i, len });
                    }
                    for (part, chunk) in data.chunks(SECTOR).enumerate() {
                        if volatile.disk_apply(sector + part as u64, chunk, base) {
                            writes.push((
                                Domain::Disk,
                                Write {
                                    event,
                                    part: part as u32,
                                },
                            ));
                        } else {
                            unchanged += 1;
                        }
                    }
                }
                Event::PmemFlush => last_kept.clear(),
                Event::BlkFlush | Event::Marker { .. } => {}
            }
        }
        Ok(Writes {
            trace,
            writes,
            unchanged,
            base,
        })
    }

    /// Position just after the last completed barrier of `domain` before `cut`
    /// (0 if none): the shared rule. The kept writes before it are durable, those
    /// from it to the cut pending (unchanged writes were dropped in [`Writes::new`]).
    fn barrier_before(&self, domain: Domain, cut: usize) -> usize {
        persist::durable_prefix(self.trace.events(), domain, cut)
    }

    fn durable(&self, domain: Domain, cut: usize) -> Vec<Write> {
        let barrier = self.barrier_before(domain, cut);
        self.of(domain)
            .filter(|w| (w.event as usize) < barrier)
            .collect()
    }

    fn pending(&self, domain: Domain, cut: usize) -> Vec<Write> {
        let barrier = self.barrier_before(domain, cut);
        self.of(domain)
            .filter(|w| (barrier..cut).contains(&(w.event as usize)))
            .collect()
    }

    fn of(&self, domain: Domain) -> impl Iterator<Item = Write> + '_ {
        self.writes
            .iter()
            .filter(move |(d, _)| *d == domain)
            .map(|(_, w)| *w)
    }
}

/// Bytes written over the base image.
#[derive(Default)]
struct Overlay {
    pmem: std::collections::BTreeMap<u64, u8>,
    disk: std::collections::BTreeMap<u64, Vec<u8>>,
}

impl Overlay {
    /// True if a pmem store would change no byte.
    fn pmem_unchanged(&self, off: u64, bytes: &[u8], base: &dyn BaseImage) -> bool {
        bytes.iter().enumerate().all(|(i, &b)| {
            let at = off + i as u64;
            self.pmem
                .get(&at)
                .copied()
                .unwrap_or_else(|| base.pmem_byte(at))
                == b
        })
    }

    /// Applies a pmem store; true if it changed a byte.
    fn pmem_apply(&mut self, off: u64, bytes: &[u8], base: &dyn BaseImage) -> bool {
        let mut changed = false;
        for (i, &b) in bytes.iter().enumerate() {
            let at = off + i as u64;
            let old = self
                .pmem
                .get(&at)
                .copied()
                .unwrap_or_else(|| base.pmem_byte(at));
            changed |= old != b;
            self.pmem.insert(at, b);
        }
        changed
    }

    /// Applies a sector write; true if it changed a byte.
    fn disk_apply(&mut self, sector: u64, bytes: &[u8], base: &dyn BaseImage) -> bool {
        let changed = match self.disk.get(&sector) {
            Some(old) => old.as_slice() != bytes,
            None => base.disk_sector(sector) != bytes,
        };
        self.disk.insert(sector, bytes.to_vec());
        changed
    }
}

/// Collects states, dropping those whose images equal an earlier state's.
struct Emitter<'a> {
    trace: &'a Writes<'a>,
    /// A 128-bit digest of each state's delta: a whole delta per state
    /// would hold every byte a long workload wrote, once per state.
    seen: HashSet<u128>,
    enumeration: Enumeration,
}

impl<'a> Emitter<'a> {
    fn new(trace: &'a Writes<'a>) -> Self {
        Emitter {
            trace,
            seen: HashSet::new(),
            enumeration: Enumeration::default(),
        }
    }

    /// The first `n` writes of the trace are durable.
    fn emit_prefix(&mut self, cut: usize, n: usize) {
        let first = &self.trace.writes[..n];
        let of = |d: Domain| {
            first
                .iter()
                .filter(|(dom, _)| *dom == d)
                .map(|(_, w)| *w)
                .collect()
        };
        let (pmem, disk) = (of(Domain::Pmem), of(Domain::Disk));
        self.emit(CrashState { cut, pmem, disk });
    }

    fn emit_flushed(&mut self, cut: usize) {
        let pmem = self.trace.durable(Domain::Pmem, cut);
        let disk = self.trace.durable(Domain::Disk, cut);
        self.emit(CrashState { cut, pmem, disk });
    }

    fn emit_with(&mut self, cut: usize, pmem_extra: &[Write], disk_extra: &[Write]) {
        let mut pmem = self.trace.durable(Domain::Pmem, cut);
        pmem.extend_from_slice(pmem_extra);
        let mut disk = self.trace.durable(Domain::Disk, cut);
        disk.extend_from_slice(disk_extra);
        self.emit(CrashState { cut, pmem, disk });
    }

    /// The pairs of `pmem` and `disk` choices that `pairs` allows at `cut`;
    /// `all` holds each domain's pending writes (its "everything issued" end).
    fn emit_pairs(
        &mut self,
        cut: usize,
        pmem: &[Vec<Write>],
        disk: &[Vec<Write>],
        all: [&[Write]; 2],
        pairs: &Pairs,
    ) {
        let full = pmem.len() * disk.len();
        self.enumeration.pairs_full += full as u64;
        if full <= pairs.sample {
            for p in pmem {
                for d in disk {
                    self.emit_with(cut, p, d);
                }
            }
            self.enumeration.pairs_tried += full as u64;
            return;
        }
        // Each domain's every choice meets the other's extremes, so neither
        // domain's own family is thinned; only their mixtures are sampled.
        let [pmem_all, disk_all] = all;
        for p in pmem {
            self.emit_with(cut, p, &[]);
            self.emit_with(cut, p, disk_all);
        }
        for d in disk {
            self.emit_with(cut, &[], d);
            self.emit_with(cut, pmem_all, d);
        }
        let mut rng = SplitMix64(pairs.seed ^ (cut as u64).wrapping_mul(0x9e37_79b9));
        for _ in 0..pairs.sample {
            let p = &pmem[(rng.next_u64() % pmem.len() as u64) as usize];
            let d = &disk[(rng.next_u64() % disk.len() as u64) as usize];
            self.emit_with(cut, p, d);
        }
        self.enumeration.pairs_tried += (2 * (pmem.len() + disk.len()) + pairs.sample) as u64;
    }

    fn emit(&mut self, state: CrashState) {
        let key = state_digest(self.trace.trace, &state, self.trace.base);
        if self.seen.insert(key) {
            self.enumeration.states.push(state);
        } else {
            self.enumeration.duplicates += 1;
        }
    }
}

/// A 128-bit digest of the bytes a state's images hold that differ from the
/// base: what identifies its images (holding the bytes themselves would cost
/// a long workload's writes once per state).
fn state_digest(trace: &Trace, state: &CrashState, base: &dyn BaseImage) -> u128 {
    // (word, bytes, mask of the bytes written), in write order; a stable
    // sort by word then keeps the order of the writes to one word.
    let mut words: Vec<(u64, [u8; 8], u8)> = Vec::with_capacity(state.pmem.len());
    let mut sectors: Vec<(u64, &[u8])> = Vec::new();
    for w in state.pmem.iter().chain(&state.disk) {
        match trace.get(w.event) {
            Some(&Event::PmemStore { offset, len, value }) => {
                let bytes = value.to_le_bytes();
                for i in 0..u64::from(len) {
                    let at = offset + i;
                    let mut b = [0u8; 8];
                    b[(at % 8) as usize] = bytes[i as usize];
                    // Merged with its neighbours below.
                    words.push((at / 8, b, 1 << (at % 8)));
                }
            }
            Some(e @ Event::BlkWrite { sector, .. }) => {
                let p = w.part as usize;
                sectors.push((
                    sector + p as u64,
                    &trace.blk_data(e)[p * SECTOR..(p + 1) * SECTOR],
                ));
            }
            _ => {}
        }
    }
    words.sort_by_key(|w| w.0);
    sectors.sort_by_key(|s| s.0);
    let mut h = Digest::default();
    let mut i = 0;
    while i < words.len() {
        let word = words[i].0;
        let (mut bytes, mut mask) = ([0u8; 8], 0u8);
        while i < words.len() && words[i].0 == word {
            let (_, b, m) = words[i];
            for (j, byte) in bytes.iter_mut().enumerate() {
                if m & (1 << j) != 0 {
                    *byte = b[j];
                }
            }
            mask |= m;
            i += 1;
        }
        let old = base.pmem_word(word);
        for (j, (&new, &was)) in bytes.iter().zip(&old).enumerate() {
            if mask & (1 << j) != 0 && new != was {
                h.add(((word * 8 + j as u64) << 8) | u64::from(new));
            }
        }
    }
    h.add(u64::MAX);
    // Later writes of a sector win: the last of each run of equal sectors.
    for (k, &(s, d)) in sectors.iter().enumerate() {
        if sectors.get(k + 1).is_some_and(|n| n.0 == s) || base.disk_sector(s) == d {
            continue;
        }
        h.add(s);
        for c in d.chunks_exact(8) {
            h.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
    }
    h.finish()
}

/// Two independent 64-bit multiply-xorshift hashes of a stream of words
/// (cheap even in a debug build, where `cargo xtask` runs).
#[derive(Default)]
struct Digest(u64, u64);

impl Digest {
    fn add(&mut self, x: u64) {
        self.0 = (self.0 ^ x)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
        self.1 = (self.1.rotate_left(17) ^ x ^ 0xd6e8_feb8_6659_fd93)
            .wrapping_mul(0xbf58_476d_1ce4_e5b9);
    }

    fn finish(&self) -> u128 {
        let mix = |mut z: u64| {
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        (u128::from(mix(self.0)) << 64) | u128::from(mix(self.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A base image of zeros, except for the given pmem bytes.
    #[derive(Default)]
    struct Base {
        pmem: std::collections::HashMap<u64, u8>,
    }

    impl BaseImage for Base {
        fn pmem_byte(&self, off: u64) -> u8 {
            self.pmem.get(&off).copied().unwrap_or(0)
        }
        fn disk_sector(&self, _: u64) -> Vec<u8> {
            vec![0; SECTOR]
        }
    }

    fn store(offset: u64, value: u64) -> Event {
        Event::PmemStore {
            offset,
            len: 8,
            value,
        }
    }

    fn trace_of(events: Vec<Event>) -> Trace {
        let mut t = Trace::new();
        for e in events {
            t.push(e);
        }
        t
    }

    /// The states of cuts `start..=end` over a base of zeros.
    fn on_zeros(ev: &Trace, start: usize, end: usize, model: &Model) -> Enumeration {
        enumerate(ev, start, end, model, &Base::default()).unwrap()
    }

    fn events_of(states: &[CrashState]) -> Vec<Vec<usize>> {
        states
            .iter()
            .map(|s| s.pmem.iter().map(|w| w.event as usize).collect())
            .collect()
    }

    /// The superblock write of a format: three words then a fence, preceded by
    /// zeroing that changes nothing on a blank device.
    fn sb_write() -> Trace {
        trace_of(vec![
            Event::Marker { id: 1 },
            store(8192, 0),
            store(8200, 0),
            Event::Marker { id: 2 },
            store(4096, 0x0000_0000_047f_7742),
            store(4104, 0x65b0_5efa_96c5_96ef),
            store(4112, 31),
            Event::PmemFlush,
            Event::Marker { id: 3 },
        ])
    }

    #[test]
    fn subsets_of_a_three_word_write_give_eight_states() {
        let ev = sb_write();
        let e = on_zeros(&ev, 0, ev.len(), &Model::Subsets { sample: 8, seed: 1 });
        assert_eq!(e.unchanged_writes, 2, "zeroing zeros is not a state");
        assert_eq!(e.states.len(), 8);
        let mut sets = events_of(&e.states);
        sets.sort();
        assert_eq!(
            sets,
            vec![
                vec![],
                vec![4],
                vec![4, 5],
                vec![4, 5, 6],
                vec![4, 6],
                vec![5],
                vec![5, 6],
                vec![6]
            ]
        );
    }

    #[test]
    fn prefix_gives_one_state_per_changing_store() {
        let ev = sb_write();
        let e = on_zeros(&ev, 0, ev.len(), &Model::Prefix);
        assert_eq!(
            events_of(&e.states),
            vec![vec![], vec![4], vec![4, 5], vec![4, 5, 6]]
        );
    }

    #[test]
    fn flushed_only_sees_nothing_until_the_flush() {
        let ev = sb_write();
        let e = on_zeros(&ev, 0, ev.len(), &Model::FlushedOnly);
        assert_eq!(events_of(&e.states), vec![vec![], vec![4, 5, 6]]);
    }

    #[test]
    fn writes_before_a_flush_are_durable_in_every_later_state() {
        let ev = trace_of(vec![
            store(0, 1),
            Event::PmemFlush,
            store(8, 2),
            store(16, 3),
        ]);
        let e = on_zeros(&ev, 2, ev.len(), &Model::Subsets { sample: 0, seed: 0 });
        assert_eq!(e.states.len(), 4);
        assert!(e
            .states
            .iter()
            .all(|s| s.pmem.first().map(|w| w.event) == Some(0)));
    }

    #[test]
    fn identical_images_are_counted_once() {
        // The second store writes back the base value: {} and {0,1} give the same image.
        let ev = trace_of(vec![store(0, 7), store(0, 0)]);
        let e = on_zeros(&ev, 0, 2, &Model::Subsets { sample: 0, seed: 0 });
        assert_eq!(events_of(&e.states), vec![vec![], vec![0]]);
        // cut 1 repeats {}; cut 2 repeats {}, {0}, and {1}, {0,1} equal {}.
        assert_eq!(e.duplicates, 5);
    }

    #[test]
    fn many_pending_stores_use_the_families_and_a_seeded_sample() {
        let n = 20u64;
        let ev = trace_of((0..n).map(|i| store(i * 8, i + 1)).collect());
        let model = Model::Subsets {
            sample: 16,
            seed: 42,
        };
        // Only the cut at the end: earlier cuts have few enough pending stores for
        // every subset.
        let a = on_zeros(&ev, ev.len(), ev.len(), &model);
        let b = on_zeros(&ev, ev.len(), ev.len(), &model);
        assert_eq!(
            a.states, b.states,
            "the sample is reproducible from its seed"
        );
        let sets = events_of(&a.states);
        let n = n as usize;
        // every prefix, every suffix, every single drop, every single store
        for k in 0..=n {
            assert!(sets.contains(&(0..k).collect()));
            assert!(sets.contains(&(k..n).collect()));
        }
        for i in 0..n {
            assert!(sets.contains(&vec![i]));
            assert!(sets.contains(&(0..n).filter(|&j| j != i).collect()));
        }
        // prefixes (n+1) + proper suffixes (n-1) + drops (n) + singles (n), minus
        // the overlaps (single store 0 = prefix 1, last single = suffix, drops of
        // the first/last = suffix/prefix), plus at most `sample` random ones.
        assert!(a.states.len() <= 4 * n + 16);
        assert!(a.states.len() >= 4 * n - 4);
    }

    #[test]
    fn disk_writes_are_split_into_sectors_with_their_own_barrier() {
        let mut data = vec![1u8; SECTOR];
        data.extend(vec![2u8; SECTOR]);
        let mut ev = Trace::new();
        ev.push_blk_write(10, &data);
        ev.push(Event::PmemFlush); // not a disk barrier
        ev.push(Event::BlkFlush);
        let e = on_zeros(&ev, 0, 3, &Model::Subsets { sample: 0, seed: 0 });
        assert_eq!(e.states.len(), 4, "two sectors pending: four subsets");
        let prefix = on_zeros(&ev, 0, 3, &Model::Prefix);
        // sector granularity: power may fail between the sectors of one write
        let sectors: Vec<Vec<u32>> = prefix
            .states
            .iter()
            .map(|s| s.disk.iter().map(|w| w.part).collect())
            .collect();
        assert_eq!(sectors, vec![vec![], vec![0], vec![0, 1]]);
        assert_eq!(prefix.states[1].cut, 1, "the write was issued");
    }

    #[test]
    fn a_domain_with_few_pending_writes_gets_every_subset_whatever_the_other_holds() {
        // 13 pmem stores pending (no flush), then a disk write of 4 sectors and
        // one of 9 (no FLUSH). At the cut after the first disk write, 4 sectors
        // are pending, so every subset of them is a state there (the pmem's
        // own rule gives it its families). By the window's end 13 sectors are
        // pending and {sector 0, sector 2} is none of their families: only
        // that cut gives it.
        let mut ev = Trace::new();
        for i in 0..13u64 {
            ev.push(store(i * 8, i + 1));
        }
        ev.push_blk_write(0, &[7u8; 4 * SECTOR]);
        ev.push_blk_write(4, &[8u8; 9 * SECTOR]);
        let e = on_zeros(&ev, 0, ev.len(), &Model::Subsets { sample: 0, seed: 0 });
        let has = |stores: usize, sectors: &[u32]| {
            e.states.iter().any(|s| {
                s.pmem.len() == stores
                    && s.disk.iter().all(|w| w.event == 13)
                    && s.disk.iter().map(|w| w.part).collect::<Vec<_>>() == sectors
            })
        };
        assert!(has(0, &[0, 2]), "sectors {{0, 2}} with no store");
        assert!(has(13, &[0, 2]), "sectors {{0, 2}} with every store");
    }

    #[test]
    fn a_large_cross_product_keeps_each_domains_family_and_samples_the_mixtures() {
        // One cut with 4 stores and 4 sectors pending: 16 × 16 = 256 pairs.
        let mut ev = Trace::new();
        for i in 0..4u64 {
            ev.push(store(i * 8, i + 1));
        }
        ev.push_blk_write(0, &[7u8; 4 * SECTOR]);
        let cut = ev.len();
        let model = Model::Subsets { sample: 0, seed: 0 };
        let run = |pairs: Pairs| {
            enumerate_paired(&ev, &[(cut, cut)], &model, &pairs, &Base::default()).unwrap()
        };
        let all = run(Pairs {
            sample: 256,
            seed: 0,
        });
        assert_eq!(
            (all.states.len(), all.pairs_full, all.pairs_tried),
            (256, 256, 256)
        );

        let few = run(Pairs {
            sample: 10,
            seed: 1,
        });
        assert_eq!(few.pairs_full, 256);
        assert_eq!(few.pairs_tried, 2 * (16 + 16) + 10);
        // The extremes: 16 pmem choices × {no sector, all 4}, 16 disk choices
        // × {no store, all 4}, the four corners counted once: 60 states, then
        // at most 10 sampled mixtures.
        assert!(
            (60..=70).contains(&few.states.len()),
            "{}",
            few.states.len()
        );
        let has = |stores: usize, sectors: usize| {
            few.states
                .iter()
                .any(|s| s.pmem.len() == stores && s.disk.len() == sectors)
        };
        for k in 0..=4 {
            assert!(has(k, 0) && has(k, 4) && has(0, k) && has(4, k), "{k}");
        }
        let again = run(Pairs {
            sample: 10,
            seed: 1,
        });
        assert_eq!(few.states, again.states, "the sample is reproducible");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let base = Base::default();
        assert!(matches!(
            enumerate(&Trace::new(), 0, 1, &Model::Prefix, &base),
            Err(EnumerateError::BadWindow { .. })
        ));
        // A trace decoded from a file is checked by the VMM; one built in memory
        // can still hold a bad store length.
        let ev = trace_of(vec![Event::PmemStore {
            offset: 0,
            len: 9,
            value: 0,
        }]);
        assert_eq!(
            enumerate(&ev, 0, 1, &Model::Prefix, &base).unwrap_err(),
            EnumerateError::BadStoreLength { event: 0, len: 9 }
        );
        let mut ev = Trace::new();
        ev.push_blk_write(0, &[1; 100]);
        assert!(matches!(
            enumerate(&ev, 0, 1, &Model::Prefix, &base),
            Err(EnumerateError::BadDiskWrite { .. })
        ));
    }

    #[test]
    fn a_narrower_store_repeating_a_pending_one_is_a_state_of_its_own() {
        // B (bytes 4..8) repeats what A (bytes 0..8) wrote: unchanged in the
        // image as issued, but if B persists without A only bytes 4..8 change.
        let a = store(0, 0x0202_0202_0101_0101);
        let b = Event::PmemStore {
            offset: 4,
            len: 4,
            value: 0x0202_0202,
        };
        let ev = trace_of(vec![a, b]);
        let model = Model::Subsets { sample: 0, seed: 0 };
        let e = on_zeros(&ev, 0, 2, &model);
        assert_eq!(e.unchanged_writes, 0, "B can change bytes: it is kept");
        let mut sets = events_of(&e.states);
        sets.sort();
        assert_eq!(
            sets,
            vec![vec![], vec![0], vec![1]],
            "{{1}} alone is a state"
        );
        // Once A is durable (a flush between them), B changes nothing in any state.
        let ev = trace_of(vec![a, Event::PmemFlush, b]);
        let e = on_zeros(&ev, 0, 3, &model);
        assert_eq!(e.unchanged_writes, 1);
        assert_eq!(e.states.len(), 2);
        // The same store repeated in full is dropped: it adds no image.
        let ev = trace_of(vec![a, a]);
        let e = on_zeros(&ev, 0, 2, &model);
        assert_eq!(e.unchanged_writes, 1);
        assert_eq!(e.states.len(), 2);
    }

    #[test]
    fn a_store_of_the_base_value_is_dropped() {
        let mut base = Base::default();
        base.pmem.insert(0, 5);
        let ev = trace_of(vec![store(0, 5)]);
        let e = enumerate(&ev, 0, 1, &Model::Prefix, &base).unwrap();
        assert_eq!(e.unchanged_writes, 1);
        assert_eq!(e.states.len(), 1);
    }
}
