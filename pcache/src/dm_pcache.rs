//! Activation (the kernel target's constructor, `dm_pcache.c`): the cache
//! device (format or validation of the superblock), then cache start, and the
//! outcome table of issue 3.
//!
//! | superblock | cache_info / tails | outcome |
//! |---|---|---|
//! | magic 0 | anything | `formatted` |
//! | valid | no valid cache_info with INIT_DONE | `formatted` |
//! | valid | valid cache_info with INIT_DONE, tails, chain valid | `opened` |
//! | PCACHE_MAGIC, CRC wrong | no valid cache_info and no valid tail | strict `refused`; recover `format-redone` |
//! | non-zero magic, CRC wrong | valid INIT_DONE cache_info, tails and chain valid, derived sb agrees | strict `refused`; recover `superblock-rebuilt` |
//! | foreign magic | no valid pcache metadata | `refused` (not pcache) |
//! | CRC valid, a field impossible | anything | `refused`, field named |
//! | anything else | | `refused`, reason names what was found |
//!
//! # Why these rows, and how recover mode tells them apart
//!
//! A superblock whose CRC fails can mean two things: a format that was cut
//! while it wrote the superblock, or a live cache whose superblock was damaged
//! later. The metadata beside it tells which:
//!
//! * A format writes, in order: the zeroing of both cache_info slots and
//!   cache_ctrl (C1), the superblock (C2), then — only in the first activation,
//!   after the superblock's fence — the segments, the tails and the INIT_DONE
//!   cache_info. Recover mode fences C1 before C2. So while the superblock
//!   write is in flight, both cache_info slots and all four tail slots are zero:
//!   **no valid cache_info and no valid tail ⇒ an interrupted format**. Nothing
//!   was ever cached (the cache only exists once an INIT_DONE cache_info is
//!   durable, which comes after the tails), so formatting again loses nothing.
//!   Segment info left by an older cache does not count: segments are
//!   re-formatted by every first activation and say nothing about the
//!   superblock. This row requires pcache's magic: only a superblock write of
//!   ours can have put it there; a foreign magic with no pcache metadata is
//!   someone else's data and is never formatted over.
//! * A live cache always has a valid INIT_DONE cache_info, valid tails and a
//!   valid chain, and the kernel sizes `seg_num` from the device at format
//!   (n_segs = seg_num). **All of those valid, and the superblock derived from
//!   the device size agreeing with them (n_segs = derived seg_num, every chain
//!   segment below it) ⇒ a damaged superblock of a live cache**: it is rebuilt
//!   (magic, flags 0, derived seg_num, padding 0) and the cache opened. The
//!   open is checked completely before anything is written.
//! * Anything in between — valid tails without a cache_info, a cache_info
//!   without INIT_DONE (no kernel writes one), a cache_info whose chain or
//!   tails do not load, an n_segs that disagrees with the device — is neither
//!   an interrupted format (whose tails and cache_info are zero) nor an intact
//!   cache, so it is refused with what was found.
//!
//! In strict mode the kernel's format does not fence C1 before C2. A power cut
//! there can persist the new superblock while stale cache_info and tails of an
//! older cache on the device survive; when the old superblock's CRC and
//! seg_num words equal the new ones (the usual case: same device, only the
//! magic wiped) the result is a valid superblock over the older cache, which
//! the kernel then *opens*. When they differ, a torn superblock keeps the magic
//! with a wrong CRC, which the kernel refuses for ever ("corrupted sb"). Recover
//! mode's fence rules out the first, and its format-redone row repairs the
//! second. A recover-mode activation of an image torn by a strict (kernel)
//! format can still see a damaged superblock over a complete older cache; that
//! is indistinguishable from a live cache with a damaged superblock and is
//! rebuilt as one — the same cache the kernel itself would have opened had the
//! words matched.
//!
//! A superblock whose CRC is valid but whose content is impossible (big-endian
//! flag, seg_num 0 or beyond the device or the maximum) is not a torn write —
//! a torn write cannot produce a matching CRC — but a foreign or hostile
//! device: it is refused in both modes, never rebuilt.

use alloc::boxed::Box;

use crate::backing::Backing;
use crate::cache::{first_activation, load_existing, open, read_cache_info, read_tail, Cache};
use crate::cache_dev::{
    classify_sb, max_seg_num, read_sb, write_sb, zero_meta, SbState, Superblock,
};
use crate::format::{seg_num_for_size, CACHE_DEV_SIZE_MIN, PCACHE_MAGIC};
use crate::hooks::Hooks;
use crate::pmem::Pmem;
use crate::report::{
    ActivationReport, Mode, Options, Outcome, RebuildBlocker, Refusal, SlotSeq, Tail,
};

/// The result of [`start`]: the report, and the cache unless it was refused.
#[derive(Clone, Debug)]
pub struct Activation {
    /// What happened.
    pub report: ActivationReport,
    /// The activated cache (None when refused).
    pub cache: Option<Cache>,
}

/// Activates the cache on `pmem` (never panics on any media content). A
/// refusal writes nothing.
pub fn start<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    opts: &Options,
    hooks: &mut H,
) -> Activation {
    let mut report = ActivationReport::new(opts, pmem.size());
    match run(pmem, opts, hooks, &mut report) {
        Ok((outcome, cache)) => {
            report.outcome = outcome;
            cache.fill_report(&mut report);
            Activation {
                report,
                cache: Some(cache),
            }
        }
        Err(refusal) => {
            report.outcome = Outcome::Refused;
            report.message = Some(alloc::format!("{refusal}"));
            report.refusal = Some(refusal);
            Activation {
                report,
                cache: None,
            }
        }
    }
}

/// Activates the cache on `pmem` and returns the report (see [`start`]).
pub fn activate<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    opts: &Options,
    hooks: &mut H,
) -> ActivationReport {
    start(pmem, opts, hooks).report
}

/// Deactivates a cache (`docs/format.md` §9.9) as the kernel does: closes the
/// open key-set (step 4), then flushes the backing device (step 7, where the
/// kernel stops writeback). It writes nothing else (no cache_info, no tail);
/// dirty data stays in the cache for the next activation to replay. The
/// kernel ignores both results: a failed close silently drops the keys of
/// writes no flush covered, and a failed flush leaves the disk's writes
/// volatile. Here the first error is returned (the flush is still issued
/// after a failed close) so a caller can say so.
pub fn deactivate<P: Pmem + ?Sized, B: Backing + ?Sized, H: Hooks + ?Sized>(
    mut cache: Cache,
    pmem: &mut P,
    backing: &mut B,
    hooks: &mut H,
) -> Result<(), crate::cache_req::IoError> {
    let closed = cache.flush(pmem, hooks);
    let flushed = backing.flush().map_err(crate::cache_req::IoError::from);
    closed.and(flushed)
}

type Run = Result<(Outcome, Cache), Refusal>;

fn run<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    opts: &Options,
    hooks: &mut H,
    rep: &mut ActivationReport,
) -> Run {
    let size = pmem.size();
    if size < CACHE_DEV_SIZE_MIN {
        return Err(Refusal::DeviceTooSmall {
            size,
            min: CACHE_DEV_SIZE_MIN,
        });
    }
    let sb = read_sb(pmem)?;
    let state = classify_sb(&sb, size);
    rep.superblock = Some(state);
    let strict = opts.mode == Mode::Strict;
    match state {
        SbState::Unformatted => {
            let seg_num = format_device(pmem, hooks, opts, &sb, size)?;
            rep.seg_num = Some(seg_num);
            start_cache(pmem, hooks, opts, seg_num, rep, Outcome::Formatted)
        }
        SbState::Valid { seg_num, .. } => {
            rep.seg_num = Some(seg_num);
            start_cache(pmem, hooks, opts, seg_num, rep, Outcome::Formatted)
        }
        SbState::BadMagic {
            magic,
            crc_ok: true,
        } => Err(Refusal::NotPcache {
            magic,
            metadata_absent: false,
        }),
        SbState::BigEndian { flags } => Err(Refusal::BigEndian { flags }),
        SbState::SegNumOutOfRange { seg_num, max } => Err(Refusal::SegNum {
            seg_num: seg_num as u64,
            max,
        }),
        SbState::BadMagic {
            magic,
            crc_ok: false,
        } if strict => Err(Refusal::NotPcache {
            magic,
            metadata_absent: false,
        }),
        SbState::CrcMismatch { stored, computed } if strict => {
            Err(Refusal::CorruptedSuperblock { stored, computed })
        }
        SbState::BadMagic { .. } | SbState::CrcMismatch { .. } => {
            recover_superblock(pmem, hooks, opts, &sb, state, rep)
        }
    }
}

/// Cache start on a device with a usable superblock: open an existing cache,
/// or run the first activation of a new one (`new_outcome`).
fn start_cache<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    hooks: &mut H,
    opts: &Options,
    seg_num: u32,
    rep: &mut ActivationReport,
    new_outcome: Outcome,
) -> Run {
    let ci = read_cache_info(pmem)?;
    match ci.latest_record() {
        Some((slot, info)) if info.init_done() => {
            let loaded = load_existing(pmem, seg_num, opts, slot, info, rep)?;
            Ok((
                Outcome::Opened,
                open(pmem, hooks, opts.mode, seg_num, loaded)?,
            ))
        }
        found => Ok((
            new_outcome,
            first_activation(pmem, hooks, seg_num, opts, found, rep)?,
        )),
    }
}

/// The format of `docs/format.md` §8.1 (device of `size` bytes, superblock `found` as read,
/// magic 0 or an interrupted format): validate the `seg_num` the device size
/// gives, zero the metadata (C1), write the superblock (C2, fenced). Strict:
/// C1 unfenced (ordered only by C2's fence), padding kept as read. Recover: C1
/// fenced, padding 0.
///
/// The kernel zeroes C1 before it validates `seg_num`, so on a device beyond
/// the maximum it zeroes and then refuses. Both modes validate first: a
/// refusal writes nothing, and a format that goes ahead issues the kernel's
/// stores in the kernel's order (the validation reads nothing C1 writes).
fn format_device<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    hooks: &mut H,
    opts: &Options,
    found: &Superblock,
    size: u64,
) -> Result<u32, Refusal> {
    let seg_num = seg_num_for_size(size);
    let max = max_seg_num(size);
    if seg_num == 0 || seg_num > max as u64 {
        return Err(Refusal::SegNum { seg_num, max });
    }
    let pad = match opts.mode {
        Mode::Strict => {
            zero_meta(pmem, hooks, false)?;
            found.pad.get()
        }
        Mode::Recover => {
            zero_meta(pmem, hooks, true)?;
            0
        }
    };
    write_sb(pmem, hooks, &Superblock::new(seg_num as u32, pad))?;
    Ok(seg_num as u32)
}

/// Recover mode, superblock with a wrong CRC or a foreign magic: decide from
/// the metadata beside it (see the module documentation).
fn recover_superblock<P: Pmem + ?Sized, H: Hooks + ?Sized>(
    pmem: &mut P,
    hooks: &mut H,
    opts: &Options,
    sb: &Superblock,
    state: SbState,
    rep: &mut ActivationReport,
) -> Run {
    let size = pmem.size();
    let ci = read_cache_info(pmem)?;
    let kt = read_tail(pmem, Tail::KeyTail)?;
    let dt = read_tail(pmem, Tail::DirtyTail)?;
    let unrecoverable = |blocker| Refusal::SuperblockUnrecoverable {
        superblock: state,
        blocker,
    };

    // An interrupted format: pcache's magic, and cache_info and tails as C1
    // left them.
    if sb.magic.get() == PCACHE_MAGIC && !ci.any_valid() && !kt.any_valid() && !dt.any_valid() {
        let seg_num = format_device(pmem, hooks, opts, sb, size)?;
        rep.seg_num = Some(seg_num);
        return start_cache(pmem, hooks, opts, seg_num, rep, Outcome::FormatRedone);
    }

    match ci.latest_record() {
        Some((slot, info)) if info.init_done() => {
            let derived = max_seg_num(size);
            let n_segs = info.n_segs.get();
            if n_segs != derived {
                rep.cache_info = Some(SlotSeq {
                    slot,
                    seq: info.header.seq,
                });
                rep.cache_info_flags = Some(info.flags.get());
                rep.n_segs = Some(n_segs);
                return Err(unrecoverable(RebuildBlocker::SegNumDisagrees {
                    derived,
                    n_segs,
                }));
            }
            let loaded =
                load_existing(pmem, derived, opts, slot, info, rep).map_err(|r| match r {
                    // Not about the superblock: report them as they are.
                    r @ (Refusal::DataCrcOption { .. } | Refusal::Pmem { .. }) => r,
                    r => unrecoverable(RebuildBlocker::Metadata {
                        reason: Box::new(r),
                    }),
                })?;
            rep.seg_num = Some(derived);
            write_sb(pmem, hooks, &Superblock::new(derived, 0))?;
            Ok((
                Outcome::SuperblockRebuilt,
                open(pmem, hooks, opts.mode, derived, loaded)?,
            ))
        }
        Some((slot, info)) => Err(unrecoverable(RebuildBlocker::CacheInfoWithoutInitDone {
            slot,
            seq: info.header.seq,
        })),
        None if kt.any_valid() || dt.any_valid() => {
            Err(unrecoverable(RebuildBlocker::TailsWithoutCacheInfo {
                key_tail: kt.any_valid(),
                dirty_tail: dt.any_valid(),
            }))
        }
        // A foreign magic and no pcache metadata at all.
        None => Err(Refusal::NotPcache {
            magic: sb.magic.get(),
            metadata_absent: true,
        }),
    }
}
