//! Markers at the boundaries of the persistent write sequences of
//! `docs/format.md` §10.
//!
//! The module calls [`Hooks::begin`] before the first store of a sequence and
//! [`Hooks::end`] after its last store (and its fence, when the sequence has
//! one). Sequences nest: a segment format (C3) contains the generation (C7) and
//! segment-info (C6) writes of that segment; the update of the previous
//! segment's info that links it into the chain is a C6 of its own just before
//! the C3. The guest maps these calls to marker ids
//! (`protocol::markers::crash_point_begin(cp.number())`). [`NoHooks`] costs
//! nothing.

use serde::Serialize;

/// A persistent write sequence of `docs/format.md` §10 (`C1`..`C12`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CrashPoint {
    /// C1: zeroing of both cache_info slots and cache_ctrl at format.
    ZeroMeta = 1,
    /// C2: the superblock write (format, or superblock rebuild).
    SbWrite = 2,
    /// C3: formatting of one segment (header zeroing, gen, seg_info, terminator).
    SegFormat = 3,
    /// C4: a cache_info update.
    CacheInfo = 4,
    /// C5: a key_tail or dirty_tail update.
    TailUpdate = 5,
    /// C6: a segment-info update.
    SegInfo = 6,
    /// C7: a segment-generation update.
    SegGen = 7,
    /// C8: a key-set append (part 2).
    KsetAppend = 8,
    /// C9: a log segment switch (part 2).
    LogSwitch = 9,
    /// C10: a data write (part 2).
    DataWrite = 10,
    /// C11: a writeback step (part 2).
    Writeback = 11,
    /// C12: a garbage-collection step (part 2).
    Gc = 12,
}

impl CrashPoint {
    /// The `n` of `Cn`.
    pub fn number(self) -> u32 {
        self as u32
    }
}

/// Receives the crash-point boundaries.
pub trait Hooks {
    /// Before the first store of a sequence.
    fn begin(&mut self, cp: CrashPoint) {
        let _ = cp;
    }
    /// After the last store (and fence) of a sequence.
    fn end(&mut self, cp: CrashPoint) {
        let _ = cp;
    }
}

/// Hooks that do nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {}

impl<H: Hooks + ?Sized> Hooks for &mut H {
    fn begin(&mut self, cp: CrashPoint) {
        (**self).begin(cp)
    }
    fn end(&mut self, cp: CrashPoint) {
        (**self).end(cp)
    }
}
