//! The persistence rules shared by every crash-state builder of the project:
//! pcache's recording double (host tests), the VMM's crash images and the
//! scenarios' persistence models.
//!
//! A trace is a list of events in issue order. A *cut* at position `c` means
//! events `[0, c)` were issued before power failed. Writes belong to a
//! [`Domain`] (the pmem region, the disk) and each domain has its own barrier
//! (a fence or completed flush of that device): a write followed by a barrier
//! of its domain before the cut is durable; one issued after the last such
//! barrier is *pending*, and may or may not have persisted.
//!
//! Which subsets of the pending writes a model considers is the other shared
//! rule ([`subset_family`]): every subset while there are at most
//! [`ALL_SUBSETS_MAX`], otherwise a bounded family.

#![no_std]

extern crate alloc;

use alloc::vec::Vec;
use rand::{rngs::SmallRng, Rng, SeedableRng};

/// A device whose writes become durable at its own barriers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Domain {
    /// The persistent-memory region (barrier: a fence / virtio-pmem flush).
    Pmem,
    /// The backing disk (barrier: a completed virtio-blk FLUSH).
    Disk,
}

/// What an event means for persistence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A write into the domain.
    Write(Domain),
    /// A barrier: every earlier write of the domain is durable.
    Barrier(Domain),
    /// Anything else (markers, cache-line write-backs without a fence).
    Neither,
}

/// An event of a trace, as the persistence rules see it.
pub trait Persistence {
    /// The event's role.
    fn role(&self) -> Role;
}

/// The position just after the last barrier of `domain` among the first `cut`
/// events (0 if there is none). `cut` is clamped to the trace's length.
pub fn durable_prefix<E: Persistence>(events: &[E], domain: Domain, cut: usize) -> usize {
    let cut = cut.min(events.len());
    events[..cut]
        .iter()
        .rposition(|e| e.role() == Role::Barrier(domain))
        .map_or(0, |i| i + 1)
}

/// Indices of the writes of `domain` pending at `cut`: issued after the last
/// barrier of their domain and before the cut, in trace order.
pub fn pending<E: Persistence>(events: &[E], domain: Domain, cut: usize) -> Vec<usize> {
    let cut = cut.min(events.len());
    let start = durable_prefix(events, domain, cut);
    (start..cut)
        .filter(|&i| events[i].role() == Role::Write(domain))
        .collect()
}

/// Indices of the writes of every domain pending at `cut`, in trace order.
pub fn pending_all<E: Persistence>(events: &[E], cut: usize) -> Vec<usize> {
    let cut = cut.min(events.len());
    let pmem = durable_prefix(events, Domain::Pmem, cut);
    let disk = durable_prefix(events, Domain::Disk, cut);
    (0..cut)
        .filter(|&i| match events[i].role() {
            Role::Write(Domain::Pmem) => i >= pmem,
            Role::Write(Domain::Disk) => i >= disk,
            _ => false,
        })
        .collect()
}

/// Every subset of the pending writes is a state up to this many of them.
pub const ALL_SUBSETS_MAX: usize = 12;

/// Every subset of `items` (each in the items' order), the empty one first,
/// enumerated by bit mask: bit `i` of the mask keeps `items[i]`.
///
/// # Panics
/// If `items` has more than 31 elements (2³¹ subsets is never meant).
pub fn all_subsets<T: Copy>(items: &[T]) -> impl Iterator<Item = Vec<T>> + '_ {
    assert!(items.len() < 32, "all_subsets of {} items", items.len());
    (0u32..1 << items.len()).map(move |mask| {
        items
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, t)| *t)
            .collect()
    })
}

/// The subsets of `pending` (each kept in order) that a model considers: every
/// subset when there are at most [`ALL_SUBSETS_MAX`]; otherwise every prefix
/// (the empty one and the whole included), every proper suffix, every single
/// drop, every single write alone, and `sample` subsets drawn with a
/// generator seeded by `seed` (each write kept with probability ½).
pub fn subset_family<T: Copy>(pending: &[T], sample: usize, seed: u64) -> Vec<Vec<T>> {
    let n = pending.len();
    if n <= ALL_SUBSETS_MAX {
        return all_subsets(pending).collect();
    }
    let mut family: Vec<Vec<T>> = Vec::new();
    for k in 0..=n {
        family.push(pending[..k].to_vec());
        if k > 0 && k < n {
            family.push(pending[k..].to_vec());
        }
    }
    for i in 0..n {
        let mut drop_one = pending.to_vec();
        drop_one.remove(i);
        family.push(drop_one);
        family.push(alloc::vec![pending[i]]);
    }
    let mut rng = SmallRng::seed_from_u64(seed);
    for _ in 0..sample {
        family.push(
            pending
                .iter()
                .copied()
                .filter(|_| rng.random_bool(0.5))
                .collect(),
        );
    }
    family
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Ev {
        W(Domain),
        B(Domain),
        Mark,
    }

    impl Persistence for Ev {
        fn role(&self) -> Role {
            match *self {
                Ev::W(d) => Role::Write(d),
                Ev::B(d) => Role::Barrier(d),
                Ev::Mark => Role::Neither,
            }
        }
    }

    use Domain::{Disk, Pmem};

    fn trace() -> Vec<Ev> {
        // 0 W(p) 1 W(p) 2 W(d) 3 B(p) 4 W(p) 5 Mark 6 W(d) 7 B(d) 8 W(p)
        vec![
            Ev::W(Pmem),
            Ev::W(Pmem),
            Ev::W(Disk),
            Ev::B(Pmem),
            Ev::W(Pmem),
            Ev::Mark,
            Ev::W(Disk),
            Ev::B(Disk),
            Ev::W(Pmem),
        ]
    }

    #[test]
    fn each_domain_is_made_durable_by_its_own_barrier_only() {
        let t = trace();
        assert_eq!(pending(&t, Pmem, 0), Vec::<usize>::new());
        assert_eq!(pending(&t, Pmem, 3), vec![0, 1]);
        assert_eq!(pending(&t, Pmem, 4), Vec::<usize>::new());
        assert_eq!(pending(&t, Disk, 4), vec![2]);
        assert_eq!(pending(&t, Disk, 7), vec![2, 6]);
        assert_eq!(pending(&t, Disk, 8), Vec::<usize>::new());
        assert_eq!(pending_all(&t, 7), vec![2, 4, 6]);
        assert_eq!(pending_all(&t, 100), vec![4, 8]);
        assert_eq!(durable_prefix(&t, Pmem, 9), 4);
        assert_eq!(durable_prefix(&t, Disk, 9), 8);
        assert_eq!(durable_prefix(&t, Disk, 7), 0);
    }

    #[test]
    fn small_families_are_every_subset_in_order() {
        let s: Vec<Vec<u8>> = all_subsets(&[1u8, 2, 3]).collect();
        assert_eq!(
            s,
            vec![
                vec![],
                vec![1],
                vec![2],
                vec![1, 2],
                vec![3],
                vec![1, 3],
                vec![2, 3],
                vec![1, 2, 3]
            ]
        );
        assert_eq!(subset_family(&[1u8, 2, 3], 5, 0), s);
        let twelve: Vec<u32> = (0..12).collect();
        assert_eq!(subset_family(&twelve, 0, 0).len(), 4096);
    }

    #[test]
    fn large_families_are_bounded_and_seeded() {
        let w: Vec<u32> = (0..13).collect();
        let f = subset_family(&w, 7, 42);
        // 14 prefixes, 12 proper suffixes, 13 drops, 13 singles, 7 samples.
        assert_eq!(f.len(), 14 + 12 + 13 + 13 + 7);
        assert_eq!(f, subset_family(&w, 7, 42));
        assert_ne!(f[f.len() - 7..], subset_family(&w, 7, 43)[f.len() - 7..]);
        assert!(f.iter().all(|s| s.windows(2).all(|p| p[0] < p[1])));
        assert!(f.contains(&vec![]) && f.contains(&w) && f.contains(&vec![5]));
    }
}
