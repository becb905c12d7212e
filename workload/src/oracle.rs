//! The durability oracle: may this read-back follow that workload and that
//! power cut?
//!
//! Ops run one after another. `acked` ops completed before the cut; op number
//! `acked` may have been in flight (partly done); later ops never started.
//!
//! For one sector, look at the writes to it among `ops[..=acked]`, in order.
//! A write is *durable* when it was acknowledged (index < `acked`) and it is
//! FUA or a flush was acknowledged after it. The sector may show the last
//! durable write or any later write to it (acknowledged or in flight); with no
//! durable write it may also show the backing disk's original content.
//! `CloseKsets` promises nothing.

use crate::ops::Op;
use crate::pattern::{Tag, TagRun};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};

/// What the rule allows at one sector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// The last durable write to the sector, if any.
    pub durable: Option<u32>,
    /// Whether the original content may show (no durable write).
    pub backing: bool,
    /// The write ids that may show, in op order (the durable one first).
    pub ids: Vec<u32>,
}

/// A read-back that breaks the rule, over `count` sectors from `sector`.
///
/// JSON: `{"kind":"lost","sector":8,"count":4,"durable":3,"found":2}` (tags as
/// in [`Tag`]'s serialization).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Violation {
    /// Neither the original content nor a whole written sector: torn,
    /// misdirected or zeroed.
    Garbage { sector: u64, count: u64 },
    /// Durable write `durable` is gone: `found` is an older write or the
    /// original content.
    Lost {
        sector: u64,
        count: u64,
        durable: u32,
        found: Tag,
    },
    /// Write `id` never wrote these sectors among the ops that had started.
    Unknown { sector: u64, count: u64, id: u32 },
}

impl Violation {
    /// The first sector and the sector count.
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Violation::Garbage { sector, count }
            | Violation::Lost { sector, count, .. }
            | Violation::Unknown { sector, count, .. } => (sector, count),
        }
    }

    fn with_range(self, sector: u64, count: u64) -> Self {
        match self {
            Violation::Garbage { .. } => Violation::Garbage { sector, count },
            Violation::Lost { durable, found, .. } => Violation::Lost {
                sector,
                count,
                durable,
                found,
            },
            Violation::Unknown { id, .. } => Violation::Unknown { sector, count, id },
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, n) = self.range();
        write!(f, "sectors {s}..{}: ", s + n)?;
        match self {
            Violation::Garbage { .. } => f.write_str("garbage"),
            Violation::Lost { durable, found, .. } => {
                write!(f, "durable write {durable} lost, found {found}")
            }
            Violation::Unknown { id, .. } => write!(f, "write {id} never wrote here"),
        }
    }
}

/// The ops that had started, the index of the last acknowledged flush, and
/// whether write `i` is durable.
struct Cut<'a> {
    started: &'a [Op],
    acked: usize,
    last_flush: Option<usize>,
}

impl<'a> Cut<'a> {
    fn new(ops: &'a [Op], acked: usize) -> Self {
        let acked = acked.min(ops.len());
        Cut {
            started: &ops[..(acked + 1).min(ops.len())],
            acked,
            last_flush: ops[..acked].iter().rposition(|o| *o == Op::Flush),
        }
    }

    fn durable(&self, i: usize) -> bool {
        let Op::Write { fua, .. } = self.started[i] else {
            return false;
        };
        i < self.acked && (fua || self.last_flush.is_some_and(|f| f > i))
    }

    /// The writes among the started ops from op `from` on.
    fn writes(&self, from: usize) -> impl Iterator<Item = (usize, u32, u64, u64)> + '_ {
        let from = from.min(self.started.len());
        let tail = self.started[from..].iter().enumerate();
        tail.filter_map(move |(k, op)| {
            let i = from + k;
            let (s, e) = op.sectors()?;
            let Op::Write { id, .. } = *op else {
                return None;
            };
            Some((i, id, s, e))
        })
    }

    fn id(&self, i: usize) -> u32 {
        match self.started[i] {
            Op::Write { id, .. } => id,
            _ => unreachable!("op {i} is not a write"),
        }
    }
}

/// What the rule allows at sector `lba` (a per-sector view; [`check`] is the
/// fast path for whole read-backs).
pub fn allowed(ops: &[Op], acked: usize, lba: u64) -> Allowed {
    let cut = Cut::new(ops, acked);
    let mut a = Allowed {
        durable: None,
        backing: true,
        ids: Vec::new(),
    };
    for (i, id, s, e) in cut.writes(0) {
        if !(s..e).contains(&lba) {
            continue;
        }
        if cut.durable(i) {
            a.durable = Some(id);
            a.backing = false;
            a.ids.clear();
        }
        a.ids.push(id);
    }
    a
}

/// Non-overlapping sector intervals, `start → (end, op index)`, where a later
/// paint wins.
#[derive(Clone, Debug, Default)]
struct Paint(BTreeMap<u64, (u64, usize)>);

impl Paint {
    /// Paints `[s, e)` with op `i`: each interval is inserted once and
    /// removed at most once, so n paints cost O(n log n).
    fn paint(&mut self, s: u64, e: u64, i: usize) {
        if s >= e {
            return;
        }
        if let Some((&ps, &(pe, pi))) = self.0.range(..s).next_back() {
            if pe > s {
                self.0.insert(ps, (s, pi));
                if pe > e {
                    self.0.insert(e, (pe, pi));
                }
            }
        }
        let inside: Vec<u64> = self.0.range(s..e).map(|(&k, _)| k).collect();
        for k in inside {
            let (pe, pi) = self.0.remove(&k).expect("listed");
            if pe > e {
                self.0.insert(e, (pe, pi));
            }
        }
        self.0.insert(s, (e, i));
    }

    /// The painted pieces within `[s, e)`, clipped, in order.
    fn pieces(&self, s: u64, e: u64) -> impl Iterator<Item = (u64, u64, usize)> + '_ {
        let before = self.0.range(..s).next_back().filter(|(_, &(pe, _))| pe > s);
        before
            .into_iter()
            .chain(self.0.range(s..e))
            .map(move |(&ps, &(pe, pi))| (ps.max(s), pe.min(e), pi))
    }
}

/// Checks the tag runs read back after recovery against the rule for `ops`
/// cut after `acked` acknowledged ops. Returns the violations in sector
/// order, neighbouring sectors with the same violation merged into one run.
///
/// Costs O((writes + runs) log writes), plus the size of the answer.
pub fn check(ops: &[Op], acked: usize, observed: &[TagRun]) -> Vec<Violation> {
    check_settled(&Settled::default(), ops, acked, observed)
}

/// A settled prefix of a run's ops, painted once: acknowledged ops that end
/// with an acknowledged flush, so that every write in them is durable at any
/// later cut. A long run judged at many cuts (a scenario's prefill before
/// each crash state) then costs each check only the ops after it.
#[derive(Clone, Debug, Default)]
pub struct Settled {
    len: usize,
    durable: Paint,
    by_id: BTreeMap<u32, Vec<usize>>,
}

impl Settled {
    /// Settles `prefix`; `None` unless it is empty or ends with a flush.
    pub fn new(prefix: &[Op]) -> Option<Self> {
        if prefix.last().is_some_and(|op| *op != Op::Flush) {
            return None;
        }
        let cut = Cut::new(prefix, prefix.len());
        let mut settled = Settled {
            len: prefix.len(),
            ..Settled::default()
        };
        for (i, id, s, e) in cut.writes(0) {
            settled.durable.paint(s, e, i);
            settled.by_id.entry(id).or_default().push(i);
        }
        Some(settled)
    }

    /// How many ops it settled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it settled no op.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// [`check`] for `ops` that begin with the ops `settled` was made from (the
/// caller keeps that promise; only the length is checked) and are cut after
/// at least those. Gives what [`check`] gives.
pub fn check_settled(
    settled: &Settled,
    ops: &[Op],
    acked: usize,
    observed: &[TagRun],
) -> Vec<Violation> {
    assert!(
        settled.len <= ops.len() && settled.len <= acked,
        "a settled prefix of {} ops judged with {} ops cut after {acked}",
        settled.len,
        ops.len()
    );
    let cut = Cut::new(ops, acked);
    let mut durable = settled.durable.clone();
    let mut by_id: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, id, s, e) in cut.writes(settled.len) {
        if cut.durable(i) {
            durable.paint(s, e, i);
        }
        by_id.entry(id).or_default().push(i);
    }
    let settled_ids = |id: u32| settled.by_id.get(&id).map(Vec::as_slice).unwrap_or(&[]);

    let mut out = Vec::new();
    for run in observed {
        let (a, b) = (run.sector, run.sector.saturating_add(run.count));
        if a >= b {
            continue;
        }
        let lost = |found, s: u64, e: u64, d: usize| Violation::Lost {
            sector: s,
            count: e - s,
            durable: cut.id(d),
            found,
        };
        match run.tag {
            Tag::Garbage => out.push(Violation::Garbage {
                sector: a,
                count: b - a,
            }),
            Tag::Backing => {
                out.extend(durable.pieces(a, b).map(|(s, e, d)| lost(run.tag, s, e, d)));
            }
            Tag::Write(id) => {
                // Where write `id` wrote within the run (the latest op with
                // that id wins, should ids repeat).
                let mut mine = Paint::default();
                let later = by_id.get(&id).map(Vec::as_slice).unwrap_or(&[]);
                for &i in settled_ids(id).iter().chain(later) {
                    let (s, e) = cut.started[i].sectors().expect("a write");
                    mine.paint(s.max(a), e.min(b), i);
                }
                let mut at = a;
                for (s, e, i) in mine.pieces(a, b) {
                    if s > at {
                        out.push(Violation::Unknown {
                            sector: at,
                            count: s - at,
                            id,
                        });
                    }
                    out.extend(
                        durable
                            .pieces(s, e)
                            .filter(|&(_, _, d)| d > i)
                            .map(|(ds, de, d)| lost(run.tag, ds, de, d)),
                    );
                    at = e;
                }
                if at < b {
                    out.push(Violation::Unknown {
                        sector: at,
                        count: b - at,
                        id,
                    });
                }
            }
        }
    }
    merge(out)
}

/// Sorts violations by sector and merges neighbours that differ only in range.
fn merge(mut v: Vec<Violation>) -> Vec<Violation> {
    v.sort_by_key(|x| x.range());
    let mut out: Vec<Violation> = Vec::with_capacity(v.len());
    for x in v {
        if let Some(last) = out.last_mut() {
            let ((ls, ln), (xs, xn)) = (last.range(), x.range());
            if ls + ln == xs && last.with_range(0, 0) == x.with_range(0, 0) {
                *last = x.with_range(ls, ln + xn);
                continue;
            }
        }
        out.push(x);
    }
    out
}

/// The byte ranges `(off, len)` the writes of `ops` cover, sorted and merged:
/// what a `verify` should read back.
pub fn touched_ranges(ops: &[Op]) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = ops
        .iter()
        .filter_map(|op| match *op {
            Op::Write { off, len, .. } if len > 0 => Some((off, off + u64::from(len))),
            _ => None,
        })
        .collect();
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (s, e) in r {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

#[cfg(test)]
mod tests;
