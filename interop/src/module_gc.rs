//! Case `module-gc` (us → kernel, after our writeback and GC): the module
//! writes, writes back and collects, the kernel reads.
//!
//! On the host, pcache formats a blank 512 MiB device over a 64 MiB disk of
//! pattern sectors, sets gc_percent (0, or the default 70), and runs a
//! workload that cycles the data segments (GC invalidates them, the
//! allocator reuses them: generations above 0 on media, keys carrying them)
//! and pushes the key-set log out of its first segment (a LAST record, GC
//! frees the old log segment), with idle periods (writeback and GC until
//! neither moves) in between; a last group of writes stays dirty, some of it
//! in the open key-set that the deactivation closes. Our writeback writes the
//! disk the kernel then gets. A plain byte array models the logical content,
//! and our own replay must read exactly that back ([`gc_image`]).
//!
//! The kernel activates each image over that disk. Its workers start at
//! activation, so its `dmsetup status` before any read is predicted from
//! the kernel's own dirty_tail and key_tail: our strict replay of the image,
//! written back and collected up to those positions, must give the same
//! line (segments used included). What it reads must be the model; once its
//! writeback has reached key_head the disk must hold the model; no kernel
//! line may speak of an error; and our strict mode must open the image the
//! kernel left and read the model from it over the kernel's disk.

use crate::cases::{finish, io, CaseError, CaseResult, Comparison};
use crate::image::{read_sparse, write_sparse};
use crate::module_images::{
    self as images, first_sector_difference, guest_reads, host_failed, image_file, mode_name,
    read_disk, run_steps, sha256, sized_file, HostError, Judged, Start, Step, Steps, DEVICE, MIB,
    SECTOR,
};
use crate::prepare::Kernel;
use crate::qemu::{self, BootImage, DmStatus};
use pcache::backing::{VecBacking, VolatileBacking};
use pcache::cache_gc::Gc;
use pcache::cache_key::{record_keys, walk_log, CachePos};
use pcache::cache_writeback::Writeback;
use pcache::pmem::SparsePmem;
use pcache::{start, Cache, Mode, NoHooks};
use std::path::{Path, PathBuf};
use std::time::Duration;

const KIB: u64 = 1 << 10;
/// The backing disk of every image.
pub const DISK: u64 = 64 * MIB;
/// The kernel's default, which the gc70 image keeps.
const DEFAULT_GC_PERCENT: u32 = 70;
/// Five images, each read twice in full and waited on until the kernel's
/// writeback (every 5 s) is done, under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// One-sector FUA writes in phase 2: each is a 64-byte key-set of its own,
/// and 261,952 of them fill a log segment's data area.
pub const SMALL_WRITES: u64 = 300_000;

/// The workload, over [`DISK`]. With `collect_the_switch`, idle periods
/// run through phase 2, so our GC passes the LAST record and frees log
/// segment 0; without, they stop before the log switches, which is then
/// left to the kernel's writeback and GC.
pub fn gc_workload(collect_the_switch: bool) -> Vec<Step> {
    let mut s = Steps::default();
    // Phase 1: 144 writes of 4 MiB (576 MiB, more than the 480 MiB of data
    // segments), most at unaligned offsets (a key cut at 4 MiB boundaries
    // and where a data segment ends), idle after every 64 MiB.
    for i in 0..144u64 {
        let off = (i * 4 * MIB) % (DISK - 8 * MIB) + (i % 7) * 4 * KIB + (i % 3) * SECTOR;
        s.write(off, 4 * MIB, i % 9 == 0);
        if i % 16 == 15 {
            s.steps.push(Step::Idle);
        }
    }
    s.steps.push(Step::Reopen);
    // Phase 2: enough one-key key-sets to push the log into its next
    // segment (at about write 261,700); the stride covers every sector and
    // wraps (overwrites). Without `collect_the_switch` the last idle period
    // is at write 255,000 and 11,000 key-sets stay dirty, the switch among
    // them (each costs the kernel's writeback a backing flush).
    let n = if collect_the_switch {
        SMALL_WRITES
    } else {
        266_000
    };
    for i in 0..n {
        s.write((i * 7 * SECTOR) % DISK, SECTOR, true);
        if i % 30_000 == 29_999 || (!collect_the_switch && i == 254_999) {
            s.steps.push(Step::Idle);
        }
    }
    if collect_the_switch {
        s.steps.push(Step::Idle);
    }
    // Phase 3, left dirty: overlapping rewrites, crossings of 8, 16 and
    // 32 MiB (one with FUA, one longer than 4 MiB), odd sectors, the last
    // sector, a flush.
    for i in 0..40 {
        s.write(i * 24 * KIB + 2 * KIB, 12 * KIB, false);
    }
    s.write(8 * MIB - 20 * KIB, 64 * KIB, false);
    s.write(16 * MIB - 512 * KIB, MIB, true);
    s.write(30 * MIB + 5 * SECTOR, 6 * MIB, false);
    s.write(3 * MIB + 7 * SECTOR, 129 * SECTOR, false);
    s.write(DISK - SECTOR, SECTOR, false);
    s.steps.push(Step::Flush);
    // Left in the open key-set: only the deactivation closes it.
    for i in 0..20 {
        s.write(40 * MIB + i * 12 * KIB, 8 * KIB, false);
    }
    s.steps
}

/// What the workload did to the media (from our strict replay of the image
/// and the run itself).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// Segments invalidated during the run.
    pub invalidated: u64,
    /// Segments whose generation on media is above 0, and the highest.
    pub segs_with_gen: u32,
    pub max_gen: u64,
    /// Keys from key_tail to key_head, and those with seg_gen above 0.
    pub live_keys: u64,
    pub live_keys_gen: u64,
    /// The log segments key_head went through, in order.
    pub log_segments: Vec<u32>,
    /// Keys from dirty_tail to key_head (not written back).
    pub dirty_keys: u64,
    /// Keys in the open key-set when the workload ended.
    pub open_at_deactivate: usize,
    pub key_head: CachePos,
    pub dirty_tail: CachePos,
    pub key_tail: CachePos,
}

impl Facts {
    fn describe(&self) -> String {
        format!(
            "{} segments invalidated during the run; on media {} segments with a generation above 0 (highest {}); log segments {:?}; key_tail {}, dirty_tail {}, key_head {}; {} live keys, {} with seg_gen > 0; {} keys not written back, {} of them closed by deactivate",
            self.invalidated,
            self.segs_with_gen,
            self.max_gen,
            self.log_segments,
            self.key_tail,
            self.dirty_tail,
            self.key_head,
            self.live_keys,
            self.live_keys_gen,
            self.dirty_keys,
            self.open_at_deactivate
        )
    }
}

/// What the host half leaves.
pub type GcWritten = images::Written<Facts>;

/// The disk's content before the workload: pattern id 0 (the backing's own).
pub fn initial_disk() -> VolatileBacking {
    VolatileBacking::new(DISK / SECTOR, |lba, s| {
        workload::pattern::fill_sector(0, lba, s)
    })
}

/// Runs `steps` through the module on a blank 512 MiB device over
/// [`initial_disk`] with gc_percent `gc_percent`, deactivates, and checks
/// that our own replay reads back the model. After every idle period the
/// disk must hold the model already (everything was flushed and written
/// back).
pub fn gc_image(
    mode: Mode,
    data_crc: bool,
    gc_percent: u32,
    steps: &[Step],
) -> Result<GcWritten, HostError> {
    let disk = initial_disk();
    let from = Start {
        base: SparsePmem::new(DEVICE),
        initial: disk.durable().to_vec(),
        disk,
        gc_percent: Some(gc_percent),
    };
    run_steps(from, mode, data_crc, steps, |pmem, sc, trace| {
        let mut facts = Facts {
            invalidated: trace.invalidated,
            log_segments: trace.log_segments.clone(),
            open_at_deactivate: trace.open_at_deactivate,
            ..Facts::default()
        };
        for seg in sc.segments() {
            if seg.gen > 0 {
                facts.segs_with_gen += 1;
            }
            facts.max_gen = facts.max_gen.max(seg.gen);
        }
        let chain: Vec<u32> = (0..sc.seg_num()).filter_map(|c| sc.pseg(c)).collect();
        let dirty_tail = sc.dirty_tail().pos;
        let mut dirty = false;
        walk_log(pmem, &chain, sc.key_tail().pos, |r| {
            dirty |= r.pos == dirty_tail;
            for k in record_keys(r) {
                facts.live_keys += 1;
                facts.live_keys_gen += u64::from(k.seg_gen.get() > 0);
                facts.dirty_keys += u64::from(dirty);
            }
        });
        (facts.key_head, facts.dirty_tail, facts.key_tail) =
            (sc.key_head(), dirty_tail, sc.key_tail().pos);
        facts
    })
}

/// The guest's part: the status before anything is read (the kernel's
/// workers may already have moved dirty_tail and key_tail), the sha256 of a
/// full read, a second read dumped to the output disk; then it waits until
/// the kernel's writeback has reached key_head (and, at gc_percent 0, GC
/// dirty_tail), unchanged over three polls a second apart (the reads'
/// CLEAN key-sets close lazily, within 1 s), at most 300 s; and prints any
/// kernel line (other than pcache's and device-mapper's, which the boot
/// script collects) that speaks of an error.
fn guest_workload(span: u64) -> String {
    guest_reads(
        span,
        r#"
prev=""; same=0; i=0
while [ $i -lt 300 ]; do
  s=$(dmsetup status pc)
  set -- $s
  if [ "${10}" = "${11}" ] && { [ "$8" != 0 ] || [ "${11}" = "${12}" ]; } && [ "$s" = "$prev" ]; then
    same=$((same + 1)); [ $same -ge 2 ] && break
  else
    same=0
  fi
  prev=$s; i=$((i + 1)); sleep 1
done
echo "@@OUT $NAME final $i $s"
dmesg | grep -i -v -e pcache -e device-mapper | grep -i -e error -e fail -e invalid -e crc -e corrupt -e warn -e bug -e 'call trace' | while read -r l; do echo "@@OUT $NAME kmsg $l"; done"#,
    )
}

/// Kernel lines that speak of an error (any of them is a finding).
fn alarming(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    [
        "error",
        "fail",
        "invalid",
        "crc",
        "corrupt",
        "warn",
        "bug",
        "call trace",
    ]
    .iter()
    .any(|w| l.contains(w))
}

/// Our prediction of the kernel's first status: strict mode's replay of
/// `image`, written back until its dirty_tail is the kernel's and collected
/// until its key_tail is the kernel's, then its status line; or why our
/// workers cannot get there (the kernel's tail is not on our way).
pub fn predict(image: &SparsePmem, data_crc: bool, kernel: &DmStatus) -> Result<String, String> {
    let mut pmem = image.clone();
    let a = start(&mut pmem, &crate::cases::strict(data_crc), &mut NoHooks);
    let mut cache: Cache = a
        .cache
        .ok_or_else(|| format!("strict mode refuses the image: {:?}", a.report.message))?;
    let sb_flags = a
        .report
        .status
        .as_deref()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|f| u32::from_str_radix(f, 16).ok())
        .unwrap_or(0);
    let pos = |p: CachePos| (p.cache_seg_id, p.seg_off);
    // Our writeback's disk is a scratch one: only the tails matter here.
    let mut scratch = VecBacking::new(DISK / SECTOR);
    while pos(cache.dirty_tail().pos) != kernel.dirty_tail {
        match cache
            .writeback_step(&mut pmem, &mut scratch, &mut NoHooks)
            .map_err(|e| e.to_string())?
        {
            Writeback::KeySet { .. } | Writeback::NextSegment { .. } => {}
            other => {
                return Err(format!(
                    "our writeback stops at dirty_tail {} ({other:?}) before the kernel's {}:{}",
                    cache.dirty_tail().pos,
                    kernel.dirty_tail.0,
                    kernel.dirty_tail.1
                ))
            }
        }
    }
    while pos(cache.key_tail().pos) != kernel.key_tail {
        match cache
            .gc_step(&mut pmem, &mut NoHooks)
            .map_err(|e| e.to_string())?
        {
            Gc::KeySet { .. } | Gc::NextSegment { .. } => {}
            other => {
                return Err(format!(
                    "our GC stops at key_tail {} ({other:?}) before the kernel's {}:{}",
                    cache.key_tail().pos,
                    kernel.key_tail.0,
                    kernel.key_tail.1
                ))
            }
        }
    }
    Ok(cache.status_line(sb_flags))
}

/// What the kernel did with one image, against the host's prediction; the
/// differences found, as sentences. `predict` is [`predict`] over our
/// image; `reopened` what our strict mode read from the image the kernel
/// left, over the kernel's disk.
fn judge(
    w: &GcWritten,
    kernel: &qemu::KernelVerdict,
    predict: impl Fn(&DmStatus) -> Result<String, String>,
    expected_sha: &str,
    dump: &[u8],
    backing: &[u8],
    reopened: Result<Vec<u8>, String>,
) -> Vec<String> {
    let mut j = match Judged::new(kernel) {
        Ok(j) => j,
        Err(refused) => return refused,
    };
    for m in kernel.messages.iter().filter(|m| alarming(m)) {
        j.diffs.push(format!("kernel message: {m}"));
    }
    for m in kernel
        .outputs
        .iter()
        .filter_map(|o| o.strip_prefix("kmsg "))
    {
        j.diffs.push(format!("kernel message: {m}"));
    }
    match j.output("status").and_then(DmStatus::parse) {
        None => j
            .diffs
            .push("no `dmsetup status` before the reads".into()),
        Some(k) => match predict(&k) {
            Ok(ours) if ours == k.line() => {}
            Ok(ours) => j.diffs.push(format!(
                "status before the reads: the kernel `{}`, ours at its tails `{ours}` (our replay `{}`)",
                k.line(),
                w.strict_status
            )),
            Err(why) => j.diffs.push(format!(
                "status before the reads: the kernel `{}`, ours `{}`: {why}",
                k.line(),
                w.strict_status
            )),
        },
    }
    j.reads(expected_sha, dump, &w.expected);
    // `final <polls> <status>`: writeback reached key_head, so the disk holds
    // every key we wrote.
    let last = j
        .output("final")
        .and_then(|f| DmStatus::parse(f.split_once(' ')?.1));
    match last {
        Some(f) if f.dirty_tail == f.key_head => j.written_back(f.dirty_tail, backing, &w.expected),
        Some(f) => j.diffs.push(format!(
            "the kernel's writeback did not reach key_head within the wait: `{}`",
            f.line()
        )),
        None => j.diffs.push("no final status from the guest".into()),
    }
    match reopened {
        Ok(got) => {
            if let Some(d) = first_sector_difference(&got, &w.expected) {
                j.diffs.push(format!(
                    "our strict mode on the image the kernel left: {}",
                    d.describe("ours read", "the model holds")
                ));
            }
        }
        Err(e) => j
            .diffs
            .push(format!("our strict mode on the image the kernel left: {e}")),
    }
    j.diffs
}

/// Our strict mode opens the image the kernel left (in memory) and reads
/// the whole device over the kernel's disk.
fn reopen_kernels(path: &Path, backing: &[u8], data_crc: bool) -> Result<Vec<u8>, String> {
    let mut pmem = read_sparse(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let a = start(&mut pmem, &crate::cases::strict(data_crc), &mut NoHooks);
    let mut cache = a.cache.ok_or_else(|| {
        format!(
            "refused: {}",
            a.report.message.as_deref().unwrap_or("(no message)")
        )
    })?;
    let mut got = vec![0u8; backing.len()];
    cache
        .read(
            &mut pmem,
            &mut VecBacking::from_vec(backing.to_vec()),
            &mut NoHooks,
            0,
            &mut got,
        )
        .map_err(|e| format!("the read failed: {e}"))?;
    Ok(got)
}

/// One image of the case.
struct Variant {
    name: String,
    mode: Mode,
    data_crc: bool,
    gc_percent: u32,
    collect_the_switch: bool,
}

fn variants() -> Vec<Variant> {
    let v = |mode, data_crc, gc_percent, collect_the_switch: bool| Variant {
        name: format!(
            "gc{gc_percent}-{}{}{}",
            mode_name(mode),
            if data_crc { "-data-crc" } else { "" },
            if collect_the_switch {
                ""
            } else {
                "-across-last"
            }
        ),
        mode,
        data_crc,
        gc_percent,
        collect_the_switch,
    };
    vec![
        v(Mode::Strict, false, 0, true),
        v(Mode::Strict, true, 0, true),
        v(Mode::Recover, false, 0, true),
        v(Mode::Recover, true, 0, true),
        v(Mode::Strict, false, DEFAULT_GC_PERCENT, true),
        v(Mode::Recover, false, 0, false),
    ]
}

impl Variant {
    fn about(&self, steps: &[Step], w: &Result<GcWritten, HostError>) -> String {
        let writes = steps
            .iter()
            .filter(|s| matches!(s, Step::Write { .. }))
            .count();
        let idles = steps.iter().filter(|s| **s == Step::Idle).count();
        format!(
            "{} formatted a blank 512 MiB device (data_crc {}) over a 64 MiB disk of pattern sectors, gc_percent {}, and wrote {writes} requests with {idles} idle periods (writeback and GC){}",
            mode_name(self.mode),
            self.data_crc,
            self.gc_percent,
            match w {
                Ok(w) => format!("; {}", w.facts.describe()),
                Err(_) => String::new(),
            }
        )
    }
}

/// The case: the host half for every variant (two at a time), one boot for
/// those the host half wrote, the comparisons. A host half that fails is a
/// disagreement too: the kernel is not asked.
pub fn module_gc(kernel: &Kernel, work: &Path) -> CaseResult {
    let run = || -> Result<(Vec<Comparison>, Vec<f64>), CaseError> {
        let dir = work.join("module-gc-boot0");
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let variants = variants();
        let mut out = Vec::new();
        // What the boot needs of each written image; the images themselves
        // go to files at once (up to 512 MiB each in memory).
        struct Asked<'a> {
            v: &'a Variant,
            about: String,
            w: GcWritten,
            ours: PathBuf,
            img: BootImage,
        }
        let mut asked = Vec::new();
        for pair in variants.chunks(2) {
            let done: Vec<_> = std::thread::scope(|s| {
                let hs: Vec<_> = pair
                    .iter()
                    .map(|v| {
                        s.spawn(move || {
                            let steps = gc_workload(v.collect_the_switch);
                            let w = gc_image(v.mode, v.data_crc, v.gc_percent, &steps);
                            (v.about(&steps, &w), w)
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().expect("host half panicked"))
                    .collect()
            });
            for (v, (about, w)) in pair.iter().zip(done) {
                let mut w = match w {
                    Ok(w) => w,
                    Err(e) => {
                        // The blank device's first activation.
                        let blank = SparsePmem::new(DEVICE);
                        out.push(host_failed(&v.name, about, &blank, v.data_crc, &e));
                        continue;
                    }
                };
                let file = |what: &str| image_file(&dir, &v.name, what);
                let (path, ours, backing, dump) =
                    (file(""), file(".ours"), file(".backing"), file(".out"));
                for p in [&path, &ours] {
                    write_sparse(&w.image, p).map_err(io(format!("writing {}", p.display())))?;
                }
                std::fs::write(&backing, &w.disk)
                    .map_err(io(format!("writing {}", backing.display())))?;
                sized_file(&dump, DISK)?;
                w.image = SparsePmem::new(0);
                w.disk = Vec::new();
                asked.push(Asked {
                    v,
                    about,
                    w,
                    ours,
                    img: BootImage {
                        name: v.name.clone(),
                        path,
                        data_crc: v.data_crc,
                        workload: Some(guest_workload(DISK)),
                        backing: Some(backing),
                        out: Some(dump),
                    },
                });
            }
        }
        let mut boots = Vec::new();
        if !asked.is_empty() {
            let images: Vec<BootImage> = asked.iter().map(|a| a.img.clone()).collect();
            let boot = images::boot(kernel, &images, &dir, BOOT_TIMEOUT)?;
            boots.push(boot.seconds);
            for (a, verdict) in asked.iter().zip(boot.verdicts) {
                let expected_sha = sha256(&a.w.expected)?;
                let ours =
                    read_sparse(&a.ours).map_err(io(format!("reading {}", a.ours.display())))?;
                let backing = read_disk(&a.img.backing)?;
                let reopened = reopen_kernels(&a.img.path, &backing, a.v.data_crc);
                let diffs = judge(
                    &a.w,
                    &verdict,
                    |k| predict(&ours, a.v.data_crc, k),
                    &expected_sha,
                    &read_disk(&a.img.out)?,
                    &backing,
                    reopened,
                );
                out.push(images::compared(
                    &a.v.name,
                    &a.about,
                    mode_name(a.v.mode),
                    &a.w,
                    &expected_sha,
                    verdict,
                    diffs,
                ));
            }
        }
        Ok((out, boots))
    };
    finish("module-gc", run())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::KernelVerdict;

    #[test]
    fn the_host_half_reuses_segments_moves_the_log_and_leaves_dirty_keys() {
        let gc0 = (Mode::Strict, true, 0, true);
        let gc70 = (Mode::Strict, false, DEFAULT_GC_PERCENT, true);
        let across = (Mode::Recover, false, 0, false);
        let [gc0, gc70, across] = std::thread::scope(|s| {
            [gc0, gc70, across]
                .map(|(mode, crc, gc, collect)| {
                    s.spawn(move || gc_image(mode, crc, gc, &gc_workload(collect)).unwrap())
                })
                .map(|h| h.join().unwrap())
        });
        // Phase 3: 40 + 1 + 1 + 2 + 1 + 1 requests, 3 of them cut in two
        // (a 4 MiB boundary or a data segment's end), then 20 left open.
        for w in [&gc0, &gc70] {
            let f = &w.facts;
            // More than half the data segments reused, some several times.
            assert!(f.invalidated > 20 && f.segs_with_gen > 20, "{f:?}");
            assert_eq!(f.log_segments.len(), 2, "{f:?}");
            assert!(f.live_keys_gen > 0, "{f:?}");
            assert_eq!((f.dirty_keys, f.open_at_deactivate), (69, 20), "{f:?}");
            assert_eq!(f.dirty_tail.cache_seg_id, f.log_segments[1], "{f:?}");
        }
        // gc_percent 0: GC followed writeback into the new log segment and
        // freed segment 0; every live key is in a reused data segment.
        let f = &gc0.facts;
        assert!(f.invalidated > 40 && f.max_gen > 1, "{f:?}");
        assert_eq!(f.key_tail, f.dirty_tail, "{f:?}");
        assert_eq!(f.live_keys_gen, f.live_keys, "{f:?}");
        assert!(
            gc0.strict_status.starts_with("0 31 31 2 0 3 "),
            "{}",
            gc0.strict_status
        );
        // gc_percent 70: GC stopped below 21 of 31 segments in use, back in
        // log segment 0, so a replay crosses the LAST record.
        let f = &gc70.facts;
        assert_eq!(f.key_tail.cache_seg_id, f.log_segments[0], "{f:?}");
        let used: u32 = gc70
            .strict_status
            .split(' ')
            .nth(3)
            .unwrap()
            .parse()
            .unwrap();
        assert!(used < 21, "{}", gc70.strict_status);
        assert!(
            gc70.strict_status.contains(" 70 1182 "),
            "{}",
            gc70.strict_status
        );
        // Across the switch: idle stopped before it, so the dirty part of
        // the log holds the LAST record.
        let f = &across.facts;
        assert_eq!(f.log_segments.len(), 2, "{f:?}");
        assert_eq!(f.key_tail, f.dirty_tail, "{f:?}");
        assert_eq!(f.dirty_tail.cache_seg_id, f.log_segments[0], "{f:?}");
        assert!(f.dirty_keys > 11_000, "{f:?}");
        assert_eq!(across.own_status, across.strict_status);
    }

    /// A small image: written back and collected once, then dirty writes.
    fn small() -> GcWritten {
        let mut s = Steps::default();
        for i in 0..40 {
            s.write(i * 64 * KIB, 64 * KIB, i % 5 == 0);
        }
        s.steps.push(Step::Idle);
        for i in 0..30 {
            s.write(i * 8 * KIB + SECTOR, 4 * KIB, i == 10);
        }
        s.steps.push(Step::Flush);
        s.write(MIB, 3 * SECTOR, false);
        gc_image(Mode::Strict, false, 0, &s.steps).unwrap()
    }

    /// What the guest prints for a kernel whose first status is `status`
    /// and whose writeback then reached key_head.
    fn kernel(status: &str, sha: &str) -> KernelVerdict {
        let f: Vec<&str> = status.split_whitespace().collect();
        let done = format!(
            "0 131072 pcache {} {} {} {}",
            f[..6].join(" "),
            f[6],
            f[6],
            f[6]
        );
        KernelVerdict {
            activated: true,
            done: true,
            workload_ok: Some(true),
            outputs: vec![
                format!("status 0 131072 pcache {status}"),
                format!("sha256 {sha}  -"),
                format!("final 3 {done}"),
            ],
            ..KernelVerdict::default()
        }
    }

    #[test]
    fn the_judge_predicts_the_kernels_status_at_its_tails_and_names_each_departure() {
        let w = small();
        let sha = sha256(&w.expected).unwrap();
        let m = &w.expected;
        let judge = |k: &KernelVerdict, dump: &[u8], disk: &[u8], re: Result<Vec<u8>, String>| {
            judge(&w, k, |s| predict(&w.image, false, s), &sha, dump, disk, re)
        };
        assert!(judge(&kernel(&w.strict_status, &sha), m, m, Ok(m.clone())).is_empty());
        // The kernel's writeback and GC went through the whole log before
        // the status: our workers at the same tails predict segs_used too.
        let mut pmem = w.image.clone();
        let mut c = start(&mut pmem, &crate::cases::strict(false), &mut NoHooks)
            .cache
            .unwrap();
        c.idle(&mut pmem, &mut VecBacking::new(DISK / SECTOR), &mut NoHooks)
            .unwrap();
        let ahead = c.status_line(0);
        assert_ne!(ahead, w.strict_status);
        assert!(judge(&kernel(&ahead, &sha), m, m, Ok(m.clone())).is_empty());
        // The same tails with another segs_used.
        let mut f: Vec<&str> = ahead.split(' ').collect();
        f[3] = "9";
        let d = judge(&kernel(&f.join(" "), &sha), m, m, Ok(m.clone()));
        assert!(d.len() == 1 && d[0].contains("ours at its tails"), "{d:?}");
        // A key_tail our GC never reaches (past key_head's record).
        let kh = w.facts.key_head;
        let past = format!("{}:{}", kh.cache_seg_id, kh.seg_off + 64);
        let mut f: Vec<&str> = w.strict_status.split(' ').collect();
        f[8] = &past;
        let d = judge(&kernel(&f.join(" "), &sha), m, m, Ok(m.clone()));
        assert!(
            d.len() == 1 && d[0].contains("our GC stops at key_tail"),
            "{d:?}"
        );
        // A kernel line about an error, its own or another driver's.
        let mut k = kernel(&w.strict_status, &sha);
        k.messages = vec![
            "dm_pcache: loading out-of-tree module taints kernel.".into(),
            "dm-pcache: pcache_cache_gc_fn:168 253:0 failed to decode cache key in gc".into(),
        ];
        k.outputs
            .push("kmsg I/O error, dev vdb, sector 8 op 0x1:(WRITE)".into());
        let d = judge(&k, m, m, Ok(m.clone()));
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].contains("failed to decode") && d[1].contains("I/O error"));
        // A misplaced sector in the dump, on the disk, in our reopening.
        let mut bad = m.clone();
        bad.copy_within(0..512, 4096);
        let d = judge(
            &kernel(&w.strict_status, &sha),
            &bad,
            &bad,
            Err("refused: x".into()),
        );
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].starts_with("content (the kernel's second read): first differing sector 8"));
        assert!(d[1].starts_with("backing disk after the kernel's writeback"));
        assert!(d[2].ends_with("refused: x"));
        // Writeback not done: the disk is not judged, the wait is a finding.
        let mut k = kernel(&w.strict_status, &sha);
        k.outputs[2] = format!("final 300 0 131072 pcache {}", w.strict_status);
        let d = judge(&k, m, &bad, Ok(m.clone()));
        assert!(
            d.len() == 1 && d[0].contains("did not reach key_head"),
            "{d:?}"
        );
    }
}
