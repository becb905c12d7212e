//! Seeded workload generators.
//!
//! [`generate`] is a pure function of its [`GenSpec`]: the guest expands a
//! `gen:` step with it and the host recomputes the same op list to judge the
//! read-back. Only integer arithmetic, so host and guest agree bit for bit.

use crate::ops::Op;
use crate::pattern::SplitMix64;
use alloc::vec::Vec;
use core::fmt;
use core::str::FromStr;
use serde::{Deserialize, Serialize};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const SECTOR: u64 = crate::SECTOR as u64;
/// Largest write a generator emits.
pub const MAX_WRITE: u64 = 64 * KIB;
/// Smallest span a spec may cover (one largest write fits).
pub const MIN_SPAN: u64 = MAX_WRITE;
/// Most ops a spec may ask for.
pub const MAX_OPS: u32 = 100_000;
/// Random writes straddle boundaries of this size (the cache's segment size).
pub const BOUNDARY: u64 = 4 * MIB;

/// The shape of a generated workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GenKind {
    /// Consecutive 4 KiB..64 KiB writes, wrapping at the end of the span.
    Sequential,
    /// Uniform offsets; 1 in 8 straddles a 4 MiB boundary when the span has one.
    Random,
    /// A small hot set of ranges rewritten often, with partial overlaps.
    Overwrite,
    /// Random writes mixed with flushes (~1/8), FUA writes (~1/8 of writes)
    /// and key-set closes (~1/16).
    Mixed,
}

impl GenKind {
    pub const ALL: [GenKind; 4] = [
        GenKind::Sequential,
        GenKind::Random,
        GenKind::Overwrite,
        GenKind::Mixed,
    ];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            GenKind::Sequential => "sequential",
            GenKind::Random => "random",
            GenKind::Overwrite => "overwrite",
            GenKind::Mixed => "mixed",
        }
    }
}

impl fmt::Display for GenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GenKind {
    type Err = GenError;

    fn from_str(s: &str) -> Result<Self, GenError> {
        GenKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or(GenError::UnknownKind)
    }
}

/// A workload: its kind, seed, op count, the byte range its writes cover
/// (`[base, base + span)`) and the id of its first write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenSpec {
    pub kind: GenKind,
    pub seed: u64,
    pub ops: u32,
    pub base: u64,
    pub span: u64,
    pub first_id: u32,
}

/// Why a [`GenSpec`] is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GenError {
    #[error("unknown workload kind (sequential, random, overwrite or mixed)")]
    UnknownKind,
    #[error("ops must be 1..=100000")]
    Ops,
    #[error("span must be at least 64 KiB and a multiple of 512")]
    Span,
    #[error("base must be a multiple of 512")]
    Base,
    #[error("base + span overflows")]
    Overflow,
    #[error("first id must be at least 1, and first id + ops - 1 at most 4294967295")]
    FirstId,
}

impl GenSpec {
    /// Checks the spec; [`generate`] requires a valid one.
    pub fn validate(&self) -> Result<(), GenError> {
        if self.ops == 0 || self.ops > MAX_OPS {
            return Err(GenError::Ops);
        }
        if self.span < MIN_SPAN || self.span % SECTOR != 0 {
            return Err(GenError::Span);
        }
        if self.base % SECTOR != 0 {
            return Err(GenError::Base);
        }
        if self.base.checked_add(self.span).is_none() {
            return Err(GenError::Overflow);
        }
        // Every op could be a write and consumes the next id.
        if self.first_id == 0 || self.first_id.checked_add(self.ops - 1).is_none() {
            return Err(GenError::FirstId);
        }
        Ok(())
    }
}

/// The ops of `spec`, the same on every machine.
///
/// # Panics
/// If `spec` fails [`GenSpec::validate`].
pub fn generate(spec: &GenSpec) -> Vec<Op> {
    if let Err(e) = spec.validate() {
        panic!("workload::generate: invalid spec {spec:?}: {e}");
    }
    // Different kinds with the same seed give unrelated streams.
    let mut g = Gen {
        rng: SplitMix64(spec.seed ^ (spec.kind as u64 + 1).wrapping_mul(0xa076_1d64_78bd_642f)),
        spec: *spec,
        next_id: spec.first_id,
        ops: Vec::with_capacity(spec.ops as usize),
    };
    match spec.kind {
        GenKind::Sequential => g.sequential(),
        GenKind::Random => {
            while g.more() {
                g.random_write(false);
            }
        }
        GenKind::Overwrite => g.overwrite(),
        GenKind::Mixed => {
            while g.more() {
                match g.below(16) {
                    0 => g.ops.push(Op::CloseKsets),
                    1 | 2 => g.ops.push(Op::Flush),
                    _ => {
                        let fua = g.below(8) == 0;
                        g.random_write(fua);
                    }
                }
            }
        }
    }
    g.ops
}

struct Gen {
    rng: SplitMix64,
    spec: GenSpec,
    next_id: u32,
    ops: Vec<Op>,
}

impl Gen {
    fn more(&self) -> bool {
        self.ops.len() < self.spec.ops as usize
    }

    /// Uniform in `0..n` (n ≥ 1), by multiply-shift: no division bias worth
    /// caring about at these sizes, no floating point.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.rng.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// A write length: 3 in 4 a multiple of 4 KiB (4..=64 KiB), otherwise any
    /// sector count 1..=128 (odd counts exercise partial pages).
    fn write_len(&mut self) -> u64 {
        if self.below(4) != 0 {
            self.between(1, 16) * 4 * KIB
        } else {
            self.between(1, 128) * SECTOR
        }
    }

    /// `len` is relative to the span; `rel` too.
    fn push_write(&mut self, rel: u64, len: u64, fua: bool) {
        debug_assert!((SECTOR..=MAX_WRITE).contains(&len) && rel + len <= self.spec.span);
        debug_assert!(rel % SECTOR == 0 && len % SECTOR == 0);
        let id = self.next_id;
        // validate() leaves room for one id per op; the last op needs no successor.
        self.next_id = self.next_id.wrapping_add(1);
        self.ops.push(Op::Write {
            off: self.spec.base + rel,
            len: len as u32,
            id,
            fua,
        });
    }

    fn sequential(&mut self) {
        let span = self.spec.span;
        let mut cursor = 0;
        while self.more() {
            // Truncated at the end of the span so that the whole span is covered.
            let len = (self.between(1, 16) * 4 * KIB).min(span - cursor);
            self.push_write(cursor, len, false);
            cursor += len;
            if cursor == span {
                cursor = 0;
            }
        }
    }

    fn random_write(&mut self, fua: bool) {
        let (base, span) = (self.spec.base, self.spec.span);
        let mut len = self.write_len();
        // The first 4 MiB-aligned device offset strictly inside the span.
        let boundary = (base / BOUNDARY + 1) * BOUNDARY;
        if boundary < base + span && self.below(8) == 0 {
            // Straddle a boundary: k sectors before it, the rest after.
            let boundaries = (base + span - 1 - boundary) / BOUNDARY + 1;
            let b = boundary + self.below(boundaries) * BOUNDARY - base;
            len = len.max(2 * SECTOR);
            let sectors = len / SECTOR;
            let before = b / SECTOR;
            let after = (span - b) / SECTOR;
            let lo = 1.max(sectors.saturating_sub(after));
            let hi = (sectors - 1).min(before);
            let k = self.between(lo, hi);
            self.push_write(b - k * SECTOR, len, fua);
            return;
        }
        let slots = (span - len) / SECTOR + 1;
        let rel = self.below(slots) * SECTOR;
        self.push_write(rel, len, fua);
    }

    fn overwrite(&mut self) {
        let span = self.spec.span;
        let hot: Vec<(u64, u64)> = (0..self.between(4, 8))
            .map(|_| {
                let len = self.between(1, 16) * 4 * KIB;
                let rel = self.below((span - len) / SECTOR + 1) * SECTOR;
                (rel, len)
            })
            .collect();
        while self.more() {
            let (rel, len) = hot[self.below(hot.len() as u64) as usize];
            if self.below(2) == 0 {
                self.push_write(rel, len, false);
                continue;
            }
            // A piece of the range shifted by up to half its length either
            // way: overlaps the hot range, and its neighbours, partially.
            let half = len / SECTOR / 2;
            let start = (rel / SECTOR + self.between(0, 2 * half)).saturating_sub(half);
            let piece = self.between(1, len / SECTOR);
            let end = (start + piece).min(span / SECTOR);
            self.push_write(start * SECTOR, (end - start) * SECTOR, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: GenKind, seed: u64, ops: u32, base: u64, span: u64) -> GenSpec {
        GenSpec {
            kind,
            seed,
            ops,
            base,
            span,
            first_id: 1,
        }
    }

    fn writes(ops: &[Op]) -> impl Iterator<Item = (u64, u32, u32, bool)> + '_ {
        ops.iter().filter_map(|op| match *op {
            Op::Write { off, len, id, fua } => Some((off, len, id, fua)),
            _ => None,
        })
    }

    #[test]
    fn kinds_parse_by_name() {
        for k in GenKind::ALL {
            assert_eq!(k.name().parse::<GenKind>(), Ok(k));
        }
        assert_eq!("Random".parse::<GenKind>(), Err(GenError::UnknownKind));
        assert_eq!("".parse::<GenKind>(), Err(GenError::UnknownKind));
    }

    #[test]
    fn validation() {
        let ok = spec(GenKind::Random, 1, 10, 0, 64 * KIB);
        assert_eq!(ok.validate(), Ok(()));
        let bad = |f: fn(&mut GenSpec)| {
            let mut s = ok;
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert_eq!(bad(|s| s.ops = 0), GenError::Ops);
        assert_eq!(bad(|s| s.ops = 100_001), GenError::Ops);
        assert_eq!(bad(|s| s.span = 64 * KIB - 512), GenError::Span);
        assert_eq!(bad(|s| s.span = 64 * KIB + 1), GenError::Span);
        assert_eq!(bad(|s| s.base = 100), GenError::Base);
        assert_eq!(bad(|s| s.base = u64::MAX - 511), GenError::Overflow);
        assert_eq!(bad(|s| s.first_id = 0), GenError::FirstId);
        assert_eq!(bad(|s| s.first_id = u32::MAX - 8), GenError::FirstId);
        let mut edge = ok;
        edge.first_id = u32::MAX - 9;
        assert_eq!(edge.validate(), Ok(()));
        // Random ops are all writes: the tenth takes the last id.
        let last = writes(&generate(&edge)).last().unwrap().2;
        assert_eq!(last, u32::MAX);
    }

    #[test]
    #[should_panic(expected = "invalid spec")]
    fn generate_refuses_invalid_specs() {
        generate(&spec(GenKind::Random, 1, 0, 0, 64 * KIB));
    }

    #[test]
    fn deterministic_in_range_aligned_and_numbered() {
        for kind in GenKind::ALL {
            for (seed, base, span) in [
                (1, 0, 64 * KIB),
                (2, 512, MIB + 512),
                (3, 3 * MIB, 16 * MIB),
            ] {
                let mut s = spec(kind, seed, 2000, base, span);
                s.first_id = 10;
                let ops = generate(&s);
                assert_eq!(ops, generate(&s), "{kind} not deterministic");
                assert_eq!(ops.len(), 2000);
                let mut next = 10;
                for (off, len, id, _) in writes(&ops) {
                    assert_eq!(id, next, "{kind}: ids in order");
                    next += 1;
                    assert!(off % 512 == 0 && len % 512 == 0, "{kind}: aligned");
                    assert!((512..=64 * 1024).contains(&len), "{kind}: len {len}");
                    assert!(off >= base && off + u64::from(len) <= base + span);
                }
                assert!(next > 10, "{kind}: has writes");
                let mut other = s;
                other.seed += 100;
                assert_ne!(generate(&other), ops, "{kind}: seed matters");
            }
        }
    }

    #[test]
    fn lengths_are_mostly_4k_multiples_with_some_odd_sector_counts() {
        let ops = generate(&spec(GenKind::Random, 5, 4000, 0, 64 * MIB));
        let lens: Vec<u32> = writes(&ops).map(|w| w.1).collect();
        let aligned = lens.iter().filter(|&&l| l % 4096 == 0).count();
        let odd = lens.iter().filter(|&&l| (l / 512) % 2 == 1).count();
        assert!(aligned * 10 > lens.len() * 6, "{aligned} of {}", lens.len());
        assert!(odd * 20 > lens.len(), "{odd} of {}", lens.len());
    }

    #[test]
    fn sequential_is_consecutive_and_wraps() {
        let span = 256 * KIB;
        let ops = generate(&spec(GenKind::Sequential, 9, 200, 8192, span));
        let mut expect = 8192;
        let mut wraps = 0;
        for (off, len, _, fua) in writes(&ops) {
            assert!(!fua);
            if off != expect {
                assert_eq!((off, expect), (8192, 8192 + span));
                wraps += 1;
            }
            expect = off + u64::from(len);
        }
        assert!(wraps >= 2, "{wraps} wraps");
    }

    #[test]
    fn random_crosses_4mib_boundaries() {
        let ops = generate(&spec(GenKind::Random, 42, 400, 512, 16 * MIB));
        let crossing = writes(&ops)
            .filter(|&(off, len, _, _)| off / BOUNDARY != (off + u64::from(len) - 1) / BOUNDARY)
            .count();
        // 1 in 8 is forced to straddle; plus chance crossings.
        assert!(crossing >= 30, "{crossing} of 400 cross");
        // A span with no boundary inside cannot cross.
        let ops = generate(&spec(GenKind::Random, 42, 400, 0, 4 * MIB));
        assert!(writes(&ops).all(|(off, len, _, _)| off + u64::from(len) <= 4 * MIB));
    }

    #[test]
    fn overwrite_rewrites_a_hot_set_with_partial_overlaps() {
        let ops = generate(&spec(GenKind::Overwrite, 3, 1000, 0, 64 * MIB));
        let mut ranges: Vec<(u64, u32)> = writes(&ops).map(|w| (w.0, w.1)).collect();
        let all = ranges.clone();
        ranges.sort_unstable();
        ranges.dedup();
        // Exact repeats: the hot set (at most 8) is written again and again.
        let repeated = ranges
            .iter()
            .filter(|r| all.iter().filter(|a| a == r).count() >= 20)
            .count();
        assert!((4..=8).contains(&repeated), "{repeated} hot ranges");
        // Partial overlaps: pairs that overlap without being equal.
        let partial = all
            .windows(2)
            .filter(|w| {
                let (a, b) = (w[0], w[1]);
                a != b && a.0 < b.0 + u64::from(b.1) && b.0 < a.0 + u64::from(a.1)
            })
            .count();
        assert!(partial > 0);
        // Spread over far less than the 64 MiB span.
        let lo = all.iter().map(|r| r.0).min().unwrap();
        let hi = all.iter().map(|r| r.0 + u64::from(r.1)).max().unwrap();
        assert!(all.len() == 1000 && hi > lo);
    }

    #[test]
    fn mixed_has_flushes_fua_and_closes() {
        let ops = generate(&spec(GenKind::Mixed, 11, 1600, 0, 32 * MIB));
        let flushes = ops.iter().filter(|o| **o == Op::Flush).count();
        let closes = ops.iter().filter(|o| **o == Op::CloseKsets).count();
        let ws: Vec<_> = writes(&ops).collect();
        let fua = ws.iter().filter(|w| w.3).count();
        assert_eq!(flushes + closes + ws.len(), 1600);
        // Expected 200 flushes, 100 closes, ~162 FUA writes.
        assert!((120..=280).contains(&flushes), "{flushes} flushes");
        assert!((50..=150).contains(&closes), "{closes} closes");
        assert!((90..=240).contains(&fua), "{fua} fua");
    }
}
