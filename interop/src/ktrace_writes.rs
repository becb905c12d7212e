//! Case `trace-writes`: the kernel's stores for a small write workload —
//! writes without and with FUA and a flush, after the first activation —
//! traced by the `qemu-trace` plugin and compared epoch by epoch with
//! strict mode doing the same requests on the host (see [`crate::ktrace`]
//! for the comparison).
//!
//! The kernel closes a key-set on its own: at once for a FUA write or a
//! flush, else by a timer 1 s after the write; and its writeback worker
//! (every 5 s) writes a closed key-set's data back and then records the new
//! dirty_tail. So that the order of these is fixed, the guest waits after
//! each request until the key-set is closed and written back (key_head
//! moved, dirty_tail = key_head, by `dmsetup status`), and strict mode does
//! the same: the write, a flush where the kernel's timer would close the
//! key-set (the same stores as the timer's close), and `idle` (writeback).
//!
//! Each write is one 4 KiB `O_DIRECT` `pwrite` (one bio) by a small static
//! program built on the host (`cc -static`) and carried to the guest on
//! the image's output disk: busybox's `dd` cannot open with `O_DSYNC`.

use crate::cases::{finish, io, strict, CaseError, CaseResult, Comparison, StrictSide};
use crate::image::{first_difference, read_sparse, write_sparse};
use crate::ktrace::{
    access_trace, compare, epochs, plugin_trace, remove_boot_files, replay, EpochDifference,
    PluginCounts,
};
use crate::prepare::Kernel;
use crate::qemu::{self, BootImage};
use pcache::backing::VolatileBacking;
use pcache::pmem::{RecordingPmem, SparsePmem};
use pcache::{start, ActivationReport};
use scenarios::persistence::{Event, Trace};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Bytes of every write.
pub const REQ_LEN: u64 = 4096;
/// The backing disk ([`qemu::blank_backing_disk`]): the target's length.
pub const BACKING: u64 = 64 << 20;
/// The step marker the guest puts right after `dmsetup create`.
pub const ACTIVATED: u32 = 1;

/// Marker id before request `i`.
pub const fn request_marker(i: usize) -> u32 {
    0x300 + i as u32
}

/// One request of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// A 4 KiB write of `byte` at `off`; with `fua`, opened `O_DSYNC`.
    Write { off: u64, byte: u8, fua: bool },
    /// A 4 KiB write without FUA, then at once an fsync of the target (an
    /// empty flush request).
    WriteFlush { off: u64, byte: u8 },
}

impl Request {
    fn write(&self) -> (u64, u8, bool) {
        match *self {
            Request::Write { off, byte, fua } => (off, byte, fua),
            Request::WriteFlush { off, byte } => (off, byte, false),
        }
    }
    /// Whether the key-set is closed before the request completes.
    pub fn closes_at_once(&self) -> bool {
        !matches!(self, Request::Write { fua: false, .. })
    }
}

const MIB: u64 = 1 << 20;

/// The workload: a plain write (closed by the timer), a FUA write, a write
/// and a flush, a FUA overwrite of the first, a plain write far away.
pub const REQUESTS: &[Request] = &[
    Request::Write {
        off: 0,
        byte: b'A',
        fua: false,
    },
    Request::Write {
        off: MIB,
        byte: b'B',
        fua: true,
    },
    Request::WriteFlush {
        off: 4096,
        byte: b'C',
    },
    Request::Write {
        off: 0,
        byte: b'D',
        fua: true,
    },
    Request::Write {
        off: 40 * MIB + 8192,
        byte: b'E',
        fua: false,
    },
];

/// The guest's write program: one aligned 4 KiB `pwrite` with `O_DIRECT`
/// (and `O_DSYNC` when asked), so one bio of the whole page.
const PWR_C: &str = r#"#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
/* pwr DEV OFFSET BYTE [dsync] */
int main(int argc, char **argv) {
  if (argc < 4) return 2;
  int flags = O_WRONLY | O_DIRECT;
  if (argc > 4 && !strcmp(argv[4], "dsync")) flags |= O_DSYNC;
  int fd = open(argv[1], flags);
  if (fd < 0) { perror("open"); return 1; }
  void *buf;
  if (posix_memalign(&buf, 4096, 4096)) return 1;
  memset(buf, atoi(argv[3]), 4096);
  if (pwrite(fd, buf, 4096, strtoll(argv[2], 0, 0)) != 4096) { perror("pwrite"); return 1; }
  return close(fd) ? 1 : 0;
}
"#;

/// Builds the write program in `dir` and an output disk holding it (padded
/// to whole MiB); returns the disk and the program's length.
fn program_disk(dir: &Path) -> Result<(PathBuf, u64), CaseError> {
    let src = dir.join("pwr.c");
    let bin = dir.join("pwr");
    std::fs::write(&src, PWR_C).map_err(io("writing pwr.c"))?;
    let out = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .map_err(io(
            "running cc (the guest's write program is built with `cc -static`)",
        ))?;
    if !out.status.success() {
        return Err(CaseError::Setup(format!(
            "cc -static pwr.c failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let mut bytes = std::fs::read(&bin).map_err(io("reading pwr"))?;
    let len = bytes.len() as u64;
    bytes.resize(len.div_ceil(MIB) as usize * MIB as usize, 0);
    let disk = dir.join("pwr.disk");
    std::fs::write(&disk, bytes).map_err(io("writing pwr.disk"))?;
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&bin);
    Ok((disk, len))
}

/// The guest's workload (sourced by the boot script's `act`, with `$DM`,
/// `$NAME`, `$OUT`, the trace index `$T` and `mark`): for each request, a
/// marker, the request, key_head right after it and the target's I/O
/// counts around it (`@@OUT $NAME req I before KH after KH ios W F W F`),
/// then the wait for its key-set to be closed and written back.
pub fn workload(reqs: &[Request], program_len: u64) -> String {
    let mut s = format!(
        r#"head -c {program_len} $OUT > /tmp/pwr && chmod +x /tmp/pwr || exit 1
q=/sys/block/${{DM##*/}}/queue
echo "@@OUT $NAME queue fua=$(cat $q/fua) write_cache=$(tr ' ' _ < $q/write_cache)"
# Write and flush requests completed on the target (its stat fields 5, 15;
# bio-based dm counts an empty flush as a write, so 15 stays 0).
ios() {{ set -- $(cat /sys/block/${{DM##*/}}/stat); echo "$5 ${{15}}"; }}
# key_head and dirty_tail from the target's status.
kh() {{ dmsetup status pc | {{ read -r _ _ _ _ _ _ _ _ _ h d _; echo "$h $d"; }}; }}
# Waits until key_head has moved from $1 and dirty_tail is key_head.
settle() {{
  n=0
  while [ $n -lt 300 ]; do
    set -- "$1" $(kh)
    [ "$2" != "$1" ] && [ "$2" = "$3" ] && return 0
    sleep 0.1; n=$((n + 1))
  done
  echo "@@OUT $NAME settle-timeout $*"; return 1
}}
"#
    );
    for (i, r) in reqs.iter().enumerate() {
        let (off, byte, fua) = r.write();
        s.push_str(&format!(
            "b=$(kh); b=${{b%% *}}; i0=$(ios)\nmark 5 $T {} 0\n/tmp/pwr $DM {off} {byte}{} || exit 1\n",
            request_marker(i),
            if fua { " dsync" } else { "" }
        ));
        if matches!(r, Request::WriteFlush { .. }) {
            s.push_str(
                "dd if=/dev/zero of=$DM bs=512 count=0 conv=notrunc,fsync 2>/dev/null || exit 1\n",
            );
        }
        s.push_str(&format!(
            "a=$(kh); echo \"@@OUT $NAME req {i} before $b after ${{a%% *}} ios $i0 $(ios)\"\nsettle \"$b\" || exit 1\n"
        ));
    }
    s
}

/// Strict mode's trace of the first activation of `base` and then `reqs`,
/// each followed by what the kernel does before the guest's wait ends (a
/// flush for a key-set the kernel's timer closes; writeback by `idle`),
/// with the guest's markers ([`ACTIVATED`], [`request_marker`]); and the
/// image it leaves.
pub fn strict_trace_writes(
    base: &SparsePmem,
    data_crc: bool,
    reqs: &[Request],
) -> Result<(Trace, SparsePmem, ActivationReport), String> {
    let mut rec = RecordingPmem::new(base.clone());
    let mut hooks = rec.hooks();
    let a = start(&mut rec, &strict(data_crc), &mut hooks);
    let report = a.report;
    let mut cache = a
        .cache
        .ok_or_else(|| format!("strict mode refused: {:?}", report.message))?;
    let mut disk = VolatileBacking::new(BACKING / 512, |_, _| {});
    let mut marks = vec![(rec.events().len(), ACTIVATED)];
    for (i, r) in reqs.iter().enumerate() {
        marks.push((rec.events().len(), request_marker(i)));
        let (off, byte, fua) = r.write();
        let data = vec![byte; REQ_LEN as usize];
        let fail = |what: &str| {
            let what = what.to_string();
            move |e| format!("request {i}: {what}: {e}")
        };
        cache
            .write(&mut rec, &disk, &mut hooks, off, &data, fua)
            .map_err(fail("write"))?;
        if !fua {
            cache.flush(&mut rec, &mut hooks).map_err(fail("flush"))?;
        }
        cache
            .idle(&mut rec, &mut disk, &mut hooks)
            .map_err(fail("idle"))?;
    }
    let t = access_trace(&rec.events(), &marks, false);
    Ok((t, rec.current().clone(), report))
}

/// For each epoch of `t` (as [`epochs`] cuts them), the last marker before
/// its first store.
pub fn epoch_steps(t: &Trace) -> Vec<Option<u32>> {
    let mut out = Vec::new();
    let mut last = None;
    let mut open = false;
    for e in t.events() {
        match e {
            Event::Marker { id } => last = Some(*id),
            Event::PmemStore { .. } if !open => {
                out.push(last);
                open = true;
            }
            Event::PmemFlush => open = false,
            _ => {}
        }
    }
    out
}

/// Epochs per step: `[activation, request 0, request 1, ...]`.
pub fn epochs_per_step(steps: &[Option<u32>], n_requests: usize) -> Vec<usize> {
    let mut out = vec![0; n_requests + 1];
    for s in steps {
        let at = match s {
            Some(id) if (request_marker(0)..request_marker(n_requests)).contains(id) => {
                (id - request_marker(0)) as usize + 1
            }
            _ => 0,
        };
        out[at] += 1;
    }
    out
}

/// The step an epoch belongs to, in words.
fn step_name(s: Option<u32>) -> String {
    match s {
        Some(id) if id >= request_marker(0) => format!("request {}", id - request_marker(0)),
        Some(ACTIVATED) => "after the activation".into(),
        _ => "the activation".into(),
    }
}

/// What the guest saw of one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestSeen {
    pub request: usize,
    /// key_head before the request and right after it completed.
    pub key_head_before: String,
    pub key_head_after: String,
    /// Write and flush requests the target completed meanwhile (its
    /// `stat`, counted above dm-pcache; an empty flush counts as a write
    /// there, the flush count stayed 0).
    pub writes: Option<u64>,
    pub flushes: Option<u64>,
}

/// The guest's `req I before KH after KH ios W F W F` lines.
pub fn requests_seen(outputs: &[String]) -> Vec<RequestSeen> {
    outputs
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ["req", i, "before", b, "after", a, rest @ ..] = f.as_slice() else {
                return None;
            };
            let n: Vec<u64> = match rest {
                ["ios", io @ ..] => io.iter().filter_map(|x| x.parse().ok()).collect(),
                _ => Vec::new(),
            };
            let delta = |at: usize| (n.len() == 4).then(|| n[at + 2].wrapping_sub(n[at]));
            Some(RequestSeen {
                request: i.parse().ok()?,
                key_head_before: b.to_string(),
                key_head_after: a.to_string(),
                writes: delta(0),
                flushes: delta(1),
            })
        })
        .collect()
}

/// What one traced image showed (`traces.json`).
#[derive(Clone, Debug, Serialize)]
pub struct WritesReport {
    pub image: String,
    pub plugin: PluginCounts,
    pub kernel_epochs: usize,
    pub strict_epochs: usize,
    pub strict_stores: usize,
    /// `[activation, request 0, ...]`, each side.
    pub kernel_epochs_per_step: Vec<usize>,
    pub strict_epochs_per_step: Vec<usize>,
    /// The target's queue (`fua`, `write_cache`) as the guest read it.
    pub queue: Option<String>,
    /// Per request: what the guest saw of it.
    pub requests: Vec<RequestSeen>,
    pub replay_matches: bool,
    pub first_difference: Option<EpochDifference>,
    /// The steps the first differing epoch belongs to (kernel, strict).
    pub difference_in: Option<(String, String)>,
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// Case `trace-writes`.
pub fn trace_writes(kernel: &Kernel, work: &Path, plugin: &Path) -> CaseResult {
    let run = || -> Result<(Vec<Comparison>, Vec<f64>), CaseError> {
        let inputs = [
            ("writes-blank-512M", false),
            ("writes-blank-512M-data-crc", true),
        ];
        let dir = work.join("trace-boot0");
        std::fs::create_dir_all(&dir).map_err(io("creating the boot folder"))?;
        let (program, program_len) = program_disk(&dir)?;
        let base = SparsePmem::new(512 << 20);
        let mut images = Vec::new();
        for (name, data_crc) in &inputs {
            let path = dir.join(format!("{name}.img"));
            write_sparse(&base, &path).map_err(io(format!("writing {}", path.display())))?;
            // A disk per image: QEMU locks each for writing.
            let out = dir.join(format!("{name}.out"));
            std::fs::copy(&program, &out).map_err(io("copying pwr.disk"))?;
            images.push(BootImage {
                name: name.to_string(),
                path,
                data_crc: *data_crc,
                workload: Some(workload(REQUESTS, program_len)),
                backing: None,
                out: Some(out),
            });
        }
        let disk = qemu::blank_backing_disk(&dir).map_err(io("creating the backing disk"))?;
        let boot = qemu::boot_traced(kernel, &images, &disk, &dir, BOOT_TIMEOUT, plugin)?;
        let mut out = Vec::new();
        let mut reports = Vec::new();
        for (i, ((name, data_crc), verdict)) in inputs.iter().zip(boot.verdicts).enumerate() {
            let (kt, counts) = plugin_trace(&dir, i)?;
            let after = read_sparse(&images[i].path).map_err(io("reading the kernel's image"))?;
            let (st, strict_after, strict_report) =
                strict_trace_writes(&base, *data_crc, REQUESTS).map_err(CaseError::Setup)?;
            let replayed = replay(&base, &kt).map_err(CaseError::Setup)?;
            let replay_matches = first_difference(&replayed, &after).is_none();
            let (ke, se) = (epochs(&kt), epochs(&st));
            let (ks, ss) = (epoch_steps(&kt), epoch_steps(&st));
            let diff = compare(&ke, &se);
            let difference_in = diff.as_ref().map(|d| {
                let at =
                    |s: &[Option<u32>]| s.get(d.epoch).map_or("none".into(), |x| step_name(*x));
                (at(&ks), at(&ss))
            });
            let image_diff = first_difference(&strict_after, &after);
            let seen = requests_seen(&verdict.outputs);
            let queue = verdict
                .outputs
                .iter()
                .find_map(|l| l.strip_prefix("queue ").map(str::to_string));
            let mut problems = Vec::new();
            if verdict.workload_ok != Some(true) {
                problems.push(format!(
                    "the guest's workload failed ({:?})",
                    verdict.outputs
                ));
            }
            if seen.len() != REQUESTS.len() {
                problems.push(format!(
                    "{} of {} requests reported their key_head",
                    seen.len(),
                    REQUESTS.len()
                ));
            }
            for r in &seen {
                if REQUESTS.get(r.request).is_some_and(|q| q.closes_at_once())
                    && r.key_head_after == r.key_head_before
                {
                    problems.push(format!(
                        "request {} (FUA or flush) completed with its key-set still open (key_head {})",
                        r.request, r.key_head_before
                    ));
                }
            }
            if !replay_matches {
                problems.push(
                    "the kernel's trace replayed over the input is not the image it left".into(),
                );
            }
            if let Some(d) = &diff {
                let (k, s) = difference_in.clone().unwrap_or_default();
                problems.push(format!(
                    "traces differ at {d} (the kernel's epoch is in {k}, strict's in {s})"
                ));
            }
            if let Some(d) = &image_diff {
                problems.push(format!("images differ at {d} (strict's vs the kernel's)"));
            }
            let (kps, sps) = (
                epochs_per_step(&ks, REQUESTS.len()),
                epochs_per_step(&ss, REQUESTS.len()),
            );
            let open_after: Vec<String> = seen
                .iter()
                .filter(|r| r.key_head_after == r.key_head_before)
                .map(|r| r.request.to_string())
                .collect();
            let ios: Vec<String> = seen
                .iter()
                .map(|r| match (r.writes, r.flushes) {
                    (Some(w), Some(f)) => format!("{w}w/{f}f"),
                    _ => "?".into(),
                })
                .collect();
            out.push(Comparison {
                image: name.to_string(),
                about: format!(
                    "first activation and {} writes traced (queue {}; block-layer writes/flushes per request [{}]; key-set still open right after requests [{}]): the kernel {} stores ({} bytes) in {} epochs ({} sfence, {} mfence, {} clwb, {} flush requests; epochs per step {:?}), strict mode {} stores in {} epochs ({:?})",
                    REQUESTS.len(),
                    queue.as_deref().unwrap_or("?"),
                    ios.join(" "),
                    open_after.join(", "),
                    counts.stores,
                    counts.bytes,
                    ke.len(),
                    counts.sfence,
                    counts.mfence,
                    counts.clwb,
                    counts.flush_requests,
                    kps,
                    st.events().iter().filter(|e| e.is_write()).count(),
                    se.len(),
                    sps
                ),
                strict: StrictSide::of(&strict_report),
                agree: verdict.done && verdict.activated && problems.is_empty(),
                kernel: verdict,
                first_difference: (!problems.is_empty()).then(|| problems.join("; ")),
            });
            reports.push(WritesReport {
                image: name.to_string(),
                plugin: counts,
                kernel_epochs: ke.len(),
                strict_epochs: se.len(),
                strict_stores: st.events().iter().filter(|e| e.is_write()).count(),
                kernel_epochs_per_step: kps,
                strict_epochs_per_step: sps,
                queue,
                requests: seen,
                replay_matches,
                first_difference: diff,
                difference_in,
            });
        }
        std::fs::write(
            work.join("traces.json"),
            serde_json::to_vec_pretty(&reports).expect("serializable"),
        )
        .map_err(io("writing traces.json"))?;
        let _ = std::fs::remove_file(&program);
        remove_boot_files(&images, &disk, &dir);
        Ok((out, vec![boot.seconds]))
    };
    finish("trace-writes", run())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::process::Stdio;

    #[test]
    fn strict_writes_are_data_then_key_set_then_dirty_tail() {
        let base = SparsePmem::new(512 << 20);
        let (t, after, _) = strict_trace_writes(&base, false, REQUESTS).unwrap();
        assert!(replay(&base, &t).unwrap().same_bytes(&after));
        let steps = epoch_steps(&t);
        assert_eq!(steps.len(), epochs(&t).len());
        let per = epochs_per_step(&steps, REQUESTS.len());
        assert!(per[0] > 1, "the activation is several epochs: {per:?}");
        // Each request: its data (4 KiB of its byte, placed one after the
        // other in the data segment), its key-set (one 40-byte key in a
        // 64-byte key-set, then the 24-byte empty key-set after it), then
        // the dirty_tail record once written back (16 bytes, alternating
        // between its two slots).
        assert!(per[1..].iter().all(|&n| n == 3), "{per:?}");
        let ep = epochs(&t);
        let mut last_data = None;
        let mut last_tail = None;
        for (i, r) in REQUESTS.iter().enumerate() {
            let e = &ep[per[0] + 3 * i..per[0] + 3 * i + 3];
            let sizes: Vec<usize> = e.iter().map(|x| x.len()).collect();
            assert_eq!(sizes, [REQ_LEN as usize, 88, 16], "request {i}");
            assert!(e[0].values().all(|&b| b == r.write().1), "request {i}");
            let data = *e[0].keys().next().unwrap();
            assert!(last_data.is_none_or(|d| data == d + REQ_LEN), "request {i}");
            last_data = Some(data);
            let tail = *e[2].keys().next().unwrap();
            assert_ne!(Some(tail), last_tail, "request {i}");
            last_tail = Some(tail);
        }
        // A byte of request 2's data written differently is named as its
        // data epoch, at that byte, in request 2.
        let mut k = Trace::new();
        let mut hit = false;
        for e in t.events() {
            match e {
                Event::PmemStore { offset, .. }
                    if !hit && *offset == last_data.unwrap() - 2 * REQ_LEN + 8 =>
                {
                    hit = true;
                    let mut b = Trace::store_bytes(e);
                    b[3] ^= 1;
                    k.push_pmem_store(*offset, &b);
                }
                _ => {
                    k.push(*e);
                }
            }
        }
        assert!(hit);
        let d = compare(&epochs(&k), &ep).unwrap();
        let at = last_data.unwrap() - 2 * REQ_LEN + 11;
        assert_eq!((d.epoch, d.start, d.end), (per[0] + 6, at, at + 1));
        assert_eq!(step_name(epoch_steps(&k)[d.epoch]), "request 2");
        // A plain write alone leaves its key-set open: after the
        // activation, one epoch (its data) and no more.
        let mut rec = RecordingPmem::new(base.clone());
        let mut hooks = rec.hooks();
        let mut cache = start(&mut rec, &strict(false), &mut hooks).cache.unwrap();
        let disk = VolatileBacking::new(BACKING / 512, |_, _| {});
        cache
            .write(&mut rec, &disk, &mut hooks, 0, &[b'A'; 4096], false)
            .unwrap();
        let only = access_trace(&rec.events(), &[], false);
        assert_eq!(
            epochs(&only).len(),
            per[0] + 1,
            "data only, key-set still open"
        );
    }

    #[test]
    fn epochs_are_attributed_to_the_marker_before_them() {
        let mut t = Trace::new();
        t.push_pmem_store(0, &[1]);
        t.push(Event::PmemFlush);
        t.push(Event::Marker { id: ACTIVATED });
        t.push(Event::Marker {
            id: request_marker(0),
        });
        t.push_pmem_store(8, &[1]);
        // A marker inside an open epoch does not start a new one.
        t.push(Event::Marker {
            id: request_marker(1),
        });
        t.push_pmem_store(16, &[1]);
        t.push(Event::PmemFlush);
        t.push(Event::PmemFlush);
        t.push_pmem_store(24, &[1]);
        let s = epoch_steps(&t);
        assert_eq!(s, [None, Some(request_marker(0)), Some(request_marker(1))]);
        assert_eq!(s.len(), epochs(&t).len());
        assert_eq!(epochs_per_step(&s, 2), [1, 1, 1]);
        assert_eq!(step_name(s[2]), "request 1");
    }

    #[test]
    fn the_workload_is_a_shell_script_with_one_marker_per_request() {
        let w = workload(REQUESTS, 12345);
        for i in 0..REQUESTS.len() {
            assert!(
                w.contains(&format!("mark 5 $T {} 0\n", request_marker(i))),
                "{w}"
            );
        }
        assert_eq!(w.matches(" dsync ||").count(), 2, "{w}");
        assert_eq!(w.matches("conv=notrunc,fsync").count(), 1, "{w}");
        assert!(w.starts_with("head -c 12345 $OUT > /tmp/pwr"));
        let mut sh = std::process::Command::new("sh")
            .arg("-n")
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        sh.stdin.take().unwrap().write_all(w.as_bytes()).unwrap();
        assert!(sh.wait().unwrap().success(), "{w}");
        let seen = requests_seen(&[
            "queue fua=1 write_cache=write_back".into(),
            "req 3 before 0:4112 after 0:4392 ios 10 2 12 3".into(),
            "req 4 before 0:4392 after 0:4392".into(),
        ]);
        assert_eq!(seen.len(), 2);
        assert_eq!(
            (seen[0].request, seen[0].key_head_after.as_str()),
            (3, "0:4392")
        );
        assert_eq!((seen[0].writes, seen[0].flushes), (Some(2), Some(1)));
        assert_eq!((seen[1].writes, seen[1].flushes), (None, None));
    }
}
