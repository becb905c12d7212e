//! Dual-copy metadata (`docs/format.md` §7): selection of the latest copy
//! and the update policies.
//!
//! cache_info, key_tail, dirty_tail, seg_info and seg_gen are each stored in two
//! slots. A reader takes the valid slot (CRC) with the later 8-bit sequence
//! number; a writer picks a slot by one of three policies:
//!
//! - [`Policy::A`] (kernel M2/H for cache_info, seg_info, seg_gen): advance the
//!   slot, then write. After a load the slot is the latest copy's, so an update
//!   always overwrites the *older* copy. A fresh record goes to slot 1.
//! - [`Policy::B`] (kernel, every version, for key_tail and dirty_tail): write,
//!   then advance. After a load the slot is the latest copy's, so the first
//!   update after an activation overwrites the *newest* copy in place; a torn
//!   write there falls back two steps (`docs/format.md` §10.4). A fresh record goes to slot 0.
//! - [`Policy::BSafe`] (recover mode, tails): write, then advance, as B, but
//!   after a load the slot is the one *after* the latest copy, so no update ever
//!   overwrites the newest valid copy, while a fresh record still goes to slot 0
//!   as the kernel's does (a freshly formatted image stays byte-identical).

use serde::Serialize;

use crate::format::DualRecord;
use crate::hooks::{CrashPoint, Hooks};
use crate::pmem::{write_words, Pmem, PmemError};

/// The kernel's `seq_after(a, b)`: `(s8)(a - b) > 0`.
pub fn seq_after(a: u8, b: u8) -> bool {
    (a.wrapping_sub(b) as i8) > 0
}

/// find_latest over the sequence numbers of the valid slots (`None` = invalid
/// slot). Slot 0 is the first candidate; slot 1 replaces it iff its seq is
/// after the candidate's. Equal seqs or a difference of exactly 128: slot 0.
pub fn select_latest(seqs: [Option<u8>; 2]) -> Option<usize> {
    let mut cand: Option<(usize, u8)> = None;
    for (i, s) in seqs.iter().enumerate() {
        if let Some(seq) = *s {
            match cand {
                None => cand = Some((i, seq)),
                Some((_, c)) if seq_after(seq, c) => cand = Some((i, seq)),
                _ => {}
            }
        }
    }
    cand.map(|(i, _)| i)
}

/// A slot-selection policy for updates (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Policy {
    /// Advance, then write (kernel M2/H cache_info, seg_info, seg_gen).
    A,
    /// Write, then advance; after a load, the latest slot (kernel tails).
    B,
    /// Write, then advance; after a load, the slot after the latest (recover
    /// mode tails).
    BSafe,
}

/// In-memory state of one dual-copy record: the sequence counter (only its low
/// 8 bits reach the media), the next-slot index, and where the latest copy is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DualCopy {
    /// Sequence counter of the latest copy (0 before the first write).
    pub seq: u64,
    /// The policy's slot index.
    pub index: usize,
    /// Slot holding the latest copy (loaded or last written), if any.
    pub latest: Option<usize>,
    /// Update policy.
    pub policy: Policy,
}

impl DualCopy {
    /// A record never written: seq 0, index 0.
    pub fn fresh(policy: Policy) -> Self {
        DualCopy {
            seq: 0,
            index: 0,
            latest: None,
            policy,
        }
    }

    /// The state after a load found the latest copy in `slot` with `seq`.
    pub fn loaded(policy: Policy, slot: usize, seq: u8) -> Self {
        DualCopy {
            seq: seq as u64,
            index: match policy {
                Policy::A | Policy::B => slot,
                Policy::BSafe => slot ^ 1,
            },
            latest: Some(slot),
            policy,
        }
    }

    /// Advances the state for one update and returns `(slot, seq)` to write.
    pub fn next_write(&mut self) -> (usize, u8) {
        self.seq = self.seq.wrapping_add(1);
        let slot = match self.policy {
            Policy::A => {
                self.index ^= 1;
                self.index
            }
            Policy::B | Policy::BSafe => {
                let s = self.index;
                self.index ^= 1;
                s
            }
        };
        self.latest = Some(slot);
        (slot, self.seq as u8)
    }
}

/// Both copies of a dual-copy record as read, and which one is the latest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Slots<R> {
    /// The two slots, decoded as found.
    pub slots: [R; 2],
    /// Whether each slot's CRC matches.
    pub valid: [bool; 2],
    /// The latest valid slot, if any.
    pub latest: Option<usize>,
}

impl<R: DualRecord> Slots<R> {
    /// The latest valid copy and its slot.
    pub fn latest_record(&self) -> Option<(usize, R)> {
        self.latest.map(|i| (i, self.slots[i]))
    }

    /// Whether any slot holds a valid copy.
    pub fn any_valid(&self) -> bool {
        self.latest.is_some()
    }

    /// The in-memory state a load leaves: loaded from the latest copy, or fresh.
    pub fn state(&self, policy: Policy) -> DualCopy {
        match self.latest_record() {
            Some((slot, r)) => DualCopy::loaded(policy, slot, r.header().seq),
            None => DualCopy::fresh(policy),
        }
    }
}

/// Reads both slots of a record at `base` and `base + stride`.
pub fn read_slots<P: Pmem + ?Sized, R: DualRecord>(
    pmem: &P,
    base: u64,
    stride: u64,
) -> Result<Slots<R>, PmemError> {
    let mut s0 = R::new_zeroed();
    pmem.read(base, s0.as_mut_bytes())?;
    let mut s1 = R::new_zeroed();
    pmem.read(base + stride, s1.as_mut_bytes())?;
    let valid = [s0.crc_ok(), s1.crc_ok()];
    let seqs = [
        valid[0].then(|| s0.header().seq),
        valid[1].then(|| s1.header().seq),
    ];
    Ok(Slots {
        slots: [s0, s1],
        valid,
        latest: select_latest(seqs),
    })
}

/// One dual-copy update: picks the slot and seq by `state`'s policy, writes the
/// record there as 8-byte stores, flushes and fences, bracketed by `cp`.
/// Returns the slot written and the record as written.
pub fn write_dual<P: Pmem + ?Sized, R: DualRecord, H: Hooks + ?Sized>(
    pmem: &mut P,
    hooks: &mut H,
    cp: CrashPoint,
    base: u64,
    stride: u64,
    state: &mut DualCopy,
    mut record: R,
) -> Result<(usize, R), PmemError> {
    let (slot, seq) = state.next_write();
    record.header_mut().seq = seq;
    let written = record.sealed();
    hooks.begin(cp);
    write_words(pmem, base + slot as u64 * stride, written.as_bytes())?;
    pmem.fence()?;
    hooks.end(cp);
    Ok((slot, written))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_after_vectors() {
        assert!(seq_after(0, 255));
        assert!(!seq_after(255, 0));
        assert!(!seq_after(128, 0));
        assert!(!seq_after(0, 128));
        assert!(seq_after(127, 0));
        assert!(!seq_after(5, 5));
    }

    /// Every combination of two slots: each invalid or valid with any seq.
    #[test]
    fn select_latest_all_combinations() {
        let mut opts: alloc::vec::Vec<Option<u8>> = alloc::vec![None];
        opts.extend((0..=255u8).map(Some));
        for &a in &opts {
            for &b in &opts {
                let got = select_latest([a, b]);
                let want = match (a, b) {
                    (None, None) => None,
                    (Some(_), None) => Some(0),
                    (None, Some(_)) => Some(1),
                    (Some(x), Some(y)) => {
                        let d = y.wrapping_sub(x);
                        if (1..=127).contains(&d) {
                            Some(1)
                        } else {
                            Some(0)
                        }
                    }
                };
                assert_eq!(got, want, "slots {a:?} {b:?}");
            }
        }
        // Wrap-around at 255 -> 0: slot 1 (seq 0) is the latest.
        assert_eq!(select_latest([Some(255), Some(0)]), Some(1));
        assert_eq!(select_latest([Some(0), Some(255)]), Some(0));
        // Difference of exactly 128: slot 0 either way.
        assert_eq!(select_latest([Some(0), Some(128)]), Some(0));
        assert_eq!(select_latest([Some(128), Some(0)]), Some(0));
        // Equal: slot 0.
        assert_eq!(select_latest([Some(9), Some(9)]), Some(0));
    }

    #[test]
    fn policies() {
        // Fresh records: A writes slot 1 first, B and BSafe slot 0.
        assert_eq!(DualCopy::fresh(Policy::A).next_write(), (1, 1));
        assert_eq!(DualCopy::fresh(Policy::B).next_write(), (0, 1));
        assert_eq!(DualCopy::fresh(Policy::BSafe).next_write(), (0, 1));
        // After a load of the latest copy in slot 0 (seq 7): A and BSafe write
        // slot 1, B overwrites slot 0 (the newest) first, then alternates.
        let mut a = DualCopy::loaded(Policy::A, 0, 7);
        assert_eq!(a.next_write(), (1, 8));
        assert_eq!(a.next_write(), (0, 9));
        let mut b = DualCopy::loaded(Policy::B, 0, 7);
        assert_eq!(b.next_write(), (0, 8));
        assert_eq!(b.next_write(), (1, 9));
        let mut s = DualCopy::loaded(Policy::BSafe, 0, 7);
        assert_eq!(s.next_write(), (1, 8));
        assert_eq!(s.next_write(), (0, 9));
        // Wrap of the 8-bit seq.
        let mut w = DualCopy::loaded(Policy::A, 1, 255);
        assert_eq!(w.next_write(), (0, 0));
    }
}
