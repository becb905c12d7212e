//! Case `module-writes` (us → kernel, data): the module writes through its
//! data path, the kernel reads.
//!
//! On the host, pcache formats a blank device (or opens the kernel-written
//! fixture), writes a fixed workload through `Cache::write` and deactivates;
//! a plain byte array models the logical content, and our own replay must
//! read exactly that back ([`write_image`]). Then the kernel activates each
//! image over its own zeroed backing disk: its `dmsetup status` must be the
//! one our replay predicts, and what it reads through the target must be the
//! model (sha256 of the first read, and the bytes of a second read dumped to
//! an output disk, so that a difference can be named sector by sector).

use crate::cases::{finish, io, kernel_writes_content, CaseError, CaseResult, Comparison};
use crate::image::{read_zst, write_sparse};
use crate::module_images::{
    self as images, guest_reads, host_failed, image_file, mode_name, read_disk, run_steps, sha256,
    sized_file, Judged, Start, Step, Steps, DEVICE, MIB, SECTOR,
};
use crate::prepare::Kernel;
use crate::qemu::{self, BootImage, DmStatus};
use pcache::backing::VolatileBacking;
use pcache::cache_key::walk_log;
use pcache::pmem::SparsePmem;
use pcache::Mode;
use std::path::Path;
use std::time::Duration;

pub use crate::module_images::HostError;

const KIB: u64 = 1 << 10;
/// The fresh images' backing disk.
pub const FRESH_DISK: u64 = 16 * MIB;
/// The fixture's backing disk (its README: 64 MiB of zeros).
pub const FIXTURE_DISK: u64 = 64 * MIB;
/// Six images, each read twice in full under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The workload on a blank cache over [`FRESH_DISK`].
pub fn fresh_workload() -> Vec<Step> {
    let mut s = Steps::default();
    // 16 MiB over the upper half: more than a data segment holds, so a key
    // is cut where the segment ends.
    for _ in 0..2 {
        for r in 0..2 {
            s.write(8 * MIB + r * 4 * MIB, 4 * MIB, false);
        }
    }
    // 300 one-key writes with gaps between them (read from the backing
    // disk): two key-sets close because they hold 128 keys.
    for i in 0..300 {
        s.write(i * 8 * KIB, 4 * KIB, false);
    }
    // Rewrites overlapping those and each other's neighbours.
    for i in 0..40 {
        s.write(i * 24 * KIB + 2 * KIB, 12 * KIB, false);
    }
    // Across the 4 MiB boundary; across 12 MiB with FUA.
    s.write(4 * MIB - 20 * KIB, 64 * KIB, false);
    s.write(12 * MIB - 512 * KIB, MIB, true);
    // FUA writes of varied lengths, each closing the key-set at once.
    for i in 0..6 {
        s.write(5 * MIB + i * 36 * KIB, 4 * KIB + i * SECTOR, true);
    }
    s.steps.push(Step::Flush);
    // Odd sector counts at odd sectors, across 8 MiB, the last sector.
    s.write(12345 * SECTOR, 3 * SECTOR, false);
    s.write(7 * SECTOR, SECTOR, false);
    s.write(8 * MIB - 2 * SECTOR, 5 * SECTOR, false);
    s.write(FRESH_DISK - SECTOR, SECTOR, false);
    s.write(3 * MIB + 7 * SECTOR, 129 * SECTOR, false);
    // Left in the open key-set: only the deactivation closes it.
    for i in 0..20 {
        s.write(6 * MIB + i * 12 * KIB, 8 * KIB, false);
    }
    s.steps
}

/// The workload appended to the kernel-written fixture, over [`FIXTURE_DISK`]:
/// overwrites of the ranges the kernel wrote and new ranges.
pub fn appended_workload() -> Vec<Step> {
    let mut s = Steps::default();
    // Inside the kernel's 1 MiB of `Z`; across 4 MiB inside its `Y`.
    s.write(MIB + 32 * KIB, 64 * KIB, false);
    s.write(4 * MIB - SECTOR, 3 * SECTOR, false);
    // Every other page of its A B C D run: more than 128 keys.
    for i in 0..150 {
        s.write(i * 8 * KIB + 4 * KIB, 4 * KIB, false);
    }
    s.write(3 * MIB + 5 * SECTOR, 11 * SECTOR, true);
    s.steps.push(Step::Flush);
    // New ranges: across 12 MiB with FUA, odd sectors near the end.
    s.write(11 * MIB, 2 * MIB, true);
    s.write(60 * MIB + 3 * SECTOR, 7 * SECTOR, false);
    s.write(FIXTURE_DISK - 4 * KIB, 4 * KIB, true);
    // Left in the open key-set.
    for i in 0..10 {
        s.write(20 * MIB + i * 4 * KIB, 4 * KIB, false);
    }
    s.steps
}

/// What the host half leaves; its facts are every record position from
/// key_tail to key_head (inclusive): where the kernel's writeback may have
/// left dirty_tail.
pub type Written = images::Written<Vec<(u32, u32)>>;

/// Runs `steps` through the module on `base` (a blank image or one with a
/// log) over a zeroed backing disk of `initial.len()` bytes whose logical
/// content is `initial` before the workload, deactivates, and checks that
/// our own replay reads back the model.
pub fn write_image(
    base: SparsePmem,
    initial: Vec<u8>,
    mode: Mode,
    data_crc: bool,
    steps: &[Step],
) -> Result<Written, HostError> {
    let from = Start {
        base,
        disk: VolatileBacking::new(initial.len() as u64 / SECTOR, |_, _| {}),
        initial,
        gc_percent: None,
    };
    run_steps(from, mode, data_crc, steps, |pmem, sc, _| {
        let chain: Vec<u32> = (0..sc.seg_num()).filter_map(|c| sc.pseg(c)).collect();
        let mut records = Vec::new();
        walk_log(pmem, &chain, sc.key_tail().pos, |r| {
            records.push((r.pos.cache_seg_id, r.pos.seg_off))
        });
        let head = sc.key_head();
        records.push((head.cache_seg_id, head.seg_off));
        records
    })
}

/// One image of the case: which workload on which base, in which mode, and
/// what the host half made of it.
struct Variant {
    name: String,
    about: String,
    base: SparsePmem,
    written: Result<Written, HostError>,
    data_crc: bool,
}

fn variants(fixture: &Path) -> Result<Vec<Variant>, CaseError> {
    let mut out = Vec::new();
    let open = |w: &Result<Written, HostError>| w.as_ref().map_or(0, |w| w.open_at_deactivate);
    for mode in [Mode::Strict, Mode::Recover] {
        for data_crc in [false, true] {
            let name = format!(
                "fresh-{}{}",
                mode_name(mode),
                if data_crc { "-data-crc" } else { "" }
            );
            let steps = fresh_workload();
            let base = SparsePmem::new(DEVICE);
            let written = write_image(
                base.clone(),
                vec![0; FRESH_DISK as usize],
                mode,
                data_crc,
                &steps,
            );
            out.push(Variant {
                about: format!(
                    "{} formatted a blank 512 MiB device (data_crc {data_crc}) over a zeroed 16 MiB disk and wrote {} requests (full key-sets, overlaps, 4 MiB crossings, FUA, a flush, odd sectors; {} keys left for deactivate to close)",
                    mode_name(mode),
                    steps.len(),
                    open(&written)
                ),
                name,
                base,
                written,
                data_crc,
            });
        }
    }
    let base = read_zst(fixture).map_err(io(format!("reading {}", fixture.display())))?;
    let initial: Vec<u8> = (0..FIXTURE_DISK).map(kernel_writes_content).collect();
    for mode in [Mode::Strict, Mode::Recover] {
        let name = format!("appended-{}", mode_name(mode));
        let steps = appended_workload();
        let written = write_image(base.clone(), initial.clone(), mode, false, &steps);
        out.push(Variant {
            about: format!(
                "{} opened the kernel-written fixture (64 MiB zeroed disk) and wrote {} more requests over its ranges and new ones ({} keys left for deactivate to close)",
                mode_name(mode),
                steps.len(),
                open(&written)
            ),
            name,
            base: base.clone(),
            written,
            data_crc: false,
        });
    }
    Ok(out)
}

/// What the kernel did with one image, against the host's prediction; the
/// differences found, as sentences.
fn judge(
    w: &Written,
    kernel: &qemu::KernelVerdict,
    expected_sha: &str,
    dump: &[u8],
    backing: &[u8],
) -> Vec<String> {
    let mut j = match Judged::new(kernel) {
        Ok(j) => j,
        Err(refused) => return refused,
    };
    // Status: everything ours predicts, except that the kernel's writeback
    // (started at activation) may already have moved dirty_tail along the log.
    let first = j.output("status").and_then(DmStatus::parse);
    match &first {
        None => j.diffs.push("no `dmsetup status` before the reads".into()),
        Some(k) => {
            let ours: Vec<&str> = w.strict_status.split_whitespace().collect();
            let theirs = k.line();
            let theirs: Vec<&str> = theirs.split_whitespace().collect();
            let differ = ours.len() != theirs.len()
                || ours
                    .iter()
                    .zip(&theirs)
                    .enumerate()
                    .any(|(i, (a, b))| i != 7 && a != b);
            let ours_dt = ours.get(7).and_then(|p| parse_pos(p));
            let from = ours_dt.and_then(|d| w.facts.iter().position(|r| *r == d));
            let dt_ok = from.is_some_and(|f| w.facts[f..].contains(&k.dirty_tail));
            if differ || !dt_ok {
                j.diffs.push(format!(
                    "status: the kernel `{}`, ours `{}`{}",
                    k.line(),
                    w.strict_status,
                    if dt_ok {
                        ""
                    } else {
                        " (the kernel's dirty_tail is not a record boundary at or after ours)"
                    }
                ));
            }
        }
    }
    j.reads(expected_sha, dump, &w.expected);
    // Writeback: once dirty_tail has passed the key_head the kernel found
    // (the reads after it only add CLEAN keys, which writeback skips), every
    // key we wrote is on the backing disk, so it must hold the model too.
    if let Some(dt) = written_back(first.as_ref(), kernel.status.as_ref()) {
        j.written_back(dt, backing, &w.expected);
    }
    j.diffs
}

/// The dirty_tail showing that writeback passed everything the activation
/// found dirty (`first`: the status before the reads; `last`: after them),
/// if one does. Only positions in key_head's own segment are judged: past
/// a segment switch the log's order is not the positions' order.
fn written_back(first: Option<&DmStatus>, last: Option<&DmStatus>) -> Option<(u32, u32)> {
    let first = first?;
    if first.dirty_tail == first.key_head {
        return Some(first.dirty_tail);
    }
    let last = last?;
    let (seg, off) = first.key_head;
    (last.dirty_tail == last.key_head || (last.dirty_tail.0 == seg && last.dirty_tail.1 >= off))
        .then_some(last.dirty_tail)
}

fn parse_pos(s: &str) -> Option<(u32, u32)> {
    let (c, o) = s.split_once(':')?;
    Some((c.parse().ok()?, o.parse().ok()?))
}

/// The case: the host half for every variant, one boot for those the host
/// half wrote, the comparisons. A host half that fails is a disagreement
/// too (our own read-back differs from the model): the kernel is not asked.
pub fn module_writes(kernel: &Kernel, work: &Path, fixture: &Path) -> CaseResult {
    let run = || -> Result<(Vec<Comparison>, Vec<f64>), CaseError> {
        let variants = variants(fixture)?;
        let dir = work.join("module-writes-boot0");
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut out = Vec::new();
        let mut asked = Vec::new();
        for v in &variants {
            let w = match &v.written {
                Ok(w) => w,
                Err(e) => {
                    out.push(host_failed(
                        &v.name,
                        v.about.clone(),
                        &v.base,
                        v.data_crc,
                        e,
                    ));
                    continue;
                }
            };
            let file = |what: &str, len: u64| -> Result<std::path::PathBuf, CaseError> {
                let p = image_file(&dir, &v.name, what);
                sized_file(&p, len)?;
                Ok(p)
            };
            let path = file("", 0)?;
            write_sparse(&w.image, &path).map_err(io(format!("writing {}", path.display())))?;
            let span = w.expected.len() as u64;
            asked.push((
                v,
                w,
                BootImage {
                    name: v.name.clone(),
                    path,
                    data_crc: v.data_crc,
                    workload: Some(guest_reads(span, "")),
                    backing: Some(file(".backing", span)?),
                    out: Some(file(".out", span)?),
                },
            ));
        }
        let images: Vec<BootImage> = asked.iter().map(|(_, _, i)| i.clone()).collect();
        let mut boots = Vec::new();
        if !images.is_empty() {
            let boot = images::boot(kernel, &images, &dir, BOOT_TIMEOUT)?;
            boots.push(boot.seconds);
            for ((v, w, img), verdict) in asked.iter().zip(boot.verdicts) {
                let expected_sha = sha256(&w.expected)?;
                let diffs = judge(
                    w,
                    &verdict,
                    &expected_sha,
                    &read_disk(&img.out)?,
                    &read_disk(&img.backing)?,
                );
                out.push(images::compared(
                    &v.name,
                    &v.about,
                    &v.name,
                    w,
                    &expected_sha,
                    verdict,
                    diffs,
                ));
            }
        }
        Ok((out, boots))
    };
    finish("module-writes", run())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::KernelVerdict;

    fn written() -> Written {
        let mut steps = Steps::default();
        for i in 0..130 {
            steps.write(i * 4 * KIB, 4 * KIB, false);
        }
        steps.write(MIB - 8 * KIB, 3 * SECTOR, true);
        write_image(
            SparsePmem::new(512 * MIB),
            vec![0; MIB as usize],
            Mode::Strict,
            false,
            &steps.steps,
        )
        .unwrap()
    }

    /// What the guest prints for a kernel that does what we predict, its
    /// writeback having reached `dirty_tail`.
    fn faithful(w: &Written, sha: &str, dirty_tail: &str) -> KernelVerdict {
        let f: Vec<&str> = w.strict_status.split_whitespace().collect();
        let status = format!("0 2048 pcache {} {dirty_tail} {}", f[..7].join(" "), f[8]);
        KernelVerdict {
            activated: true,
            done: true,
            workload_ok: Some(true),
            status: DmStatus::parse(&status),
            outputs: vec![format!("status {status}"), format!("sha256 {sha}  -")],
            ..KernelVerdict::default()
        }
    }

    #[test]
    fn the_judge_passes_a_faithful_kernel_and_names_each_departure() {
        let w = written();
        let sha = sha256(&w.expected).unwrap();
        let f: Vec<String> = w
            .strict_status
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let (head, ours_dt) = (&f[6], &f[7]);
        let ok = faithful(&w, &sha, ours_dt);
        let same = &w.expected;
        assert!(judge(&w, &ok, &sha, same, same).is_empty());
        // Writeback may have moved dirty_tail to a later record, not elsewhere.
        let later = format!("{}:{}", w.facts[1].0, w.facts[1].1);
        assert!(judge(&w, &faithful(&w, &sha, &later), &sha, same, same).is_empty());
        let d = judge(&w, &faithful(&w, &sha, "0:8"), &sha, same, same);
        assert!(
            d.len() == 1 && d[0].contains("not a record boundary"),
            "{d:?}"
        );
        // Another key_head.
        let mut moved = ok.clone();
        moved.outputs[0] = moved.outputs[0].replace(&format!(" {head} "), " 0:24 ");
        let d = judge(&w, &moved, &sha, same, same);
        assert!(d.len() == 1 && d[0].starts_with("status:"), "{d:?}");
        // A misplaced sector in what the kernel read, and so its sha.
        let mut read = w.expected.clone();
        read.copy_within(4096..4608, 8192);
        let d = judge(&w, &ok, &sha256(&read).unwrap(), &read, same);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("sha256 of the kernel's first read"));
        assert_eq!(
            d[1],
            "content (the kernel's second read): first differing sector 16 (byte 0x2000): \
             the kernel read a pattern sector naming write 2 and sector 8 (torn or misplaced), \
             the model holds write 3's sector 16"
        );
        // The backing disk is judged once writeback passed key_head, not before.
        let zeros = vec![0u8; w.expected.len()];
        assert!(judge(&w, &ok, &sha, same, &zeros).is_empty());
        let d = judge(&w, &faithful(&w, &sha, head), &sha, same, &zeros);
        assert!(d.len() == 1 && d[0].starts_with("backing disk"), "{d:?}");
        // A refusal says only that.
        let refused = KernelVerdict {
            done: true,
            error: Some("reload ioctl failed".into()),
            ..KernelVerdict::default()
        };
        assert_eq!(
            judge(&w, &refused, &sha, same, same),
            ["the kernel refused the image: reload ioctl failed"]
        );
    }
}
