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
use crate::ktrace::{access_trace, compare, epochs, replay, EpochDifference, PluginCounts};
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
/// marker, the request, key_head right after it (`@@OUT $NAME req I before
/// KH after KH`), then the wait for its key-set to be closed and written back.
pub fn workload(reqs: &[Request], program_len: u64) -> String {
    let mut s = format!(
        r#"head -c {program_len} $OUT > /tmp/pwr && chmod +x /tmp/pwr || exit 1
q=/sys/block/${{DM##*/}}/queue
echo "@@OUT $NAME queue fua=$(cat $q/fua) write_cache=$(tr ' ' _ < $q/write_cache)"
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
            "b=$(kh); b=${{b%% *}}\nmark 5 $T {} 0\n/tmp/pwr $DM {off} {byte}{} || exit 1\n",
            request_marker(i),
            if fua { " dsync" } else { "" }
        ));
        if matches!(r, Request::WriteFlush { .. }) {
            s.push_str(
                "dd if=/dev/zero of=$DM bs=512 count=0 conv=notrunc,fsync 2>/dev/null || exit 1\n",
            );
        }
        s.push_str(&format!(
            "a=$(kh); echo \"@@OUT $NAME req {i} before $b after ${{a%% *}}\"\nsettle \"$b\" || exit 1\n"
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

/// key_head before and right after request `i` (`req I before KH after KH`).
pub fn request_heads(outputs: &[String]) -> Vec<(usize, String, String)> {
    outputs
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                ["req", i, "before", b, "after", a] => {
                    Some((i.parse().ok()?, b.to_string(), a.to_string()))
                }
                _ => None,
            }
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
    /// Per request: key_head before and right after it completed.
    pub heads: Vec<(usize, String, String)>,
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
            images.push(BootImage {
                name: name.to_string(),
                path,
                data_crc: *data_crc,
                workload: Some(workload(REQUESTS, program_len)),
                backing: None,
                out: Some(program.clone()),
            });
        }
        let disk = qemu::blank_backing_disk(&dir).map_err(io("creating the backing disk"))?;
        let boot = qemu::boot_traced(kernel, &images, &disk, &dir, BOOT_TIMEOUT, plugin)?;
        let mut out = Vec::new();
        let mut reports = Vec::new();
        for (i, ((name, data_crc), verdict)) in inputs.iter().zip(boot.verdicts).enumerate() {
            let tdir = dir.join("trace");
            let bin = tdir.join(format!("trace-{i}.bin"));
            let bytes = std::fs::read(&bin).map_err(io(format!("reading {}", bin.display())))?;
            let kt = Trace::decode(&bytes)
                .map_err(|e| CaseError::Setup(format!("{}: {e}", bin.display())))?;
            let counts: PluginCounts = std::fs::read(tdir.join(format!("trace-{i}.json")))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| CaseError::Setup(format!("trace-{i}.json missing or unreadable")))?;
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
            let heads = request_heads(&verdict.outputs);
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
            if heads.len() != REQUESTS.len() {
                problems.push(format!(
                    "{} of {} requests reported their key_head",
                    heads.len(),
                    REQUESTS.len()
                ));
            }
            for (r, b, a) in &heads {
                if REQUESTS.get(*r).is_some_and(|q| q.closes_at_once()) && a == b {
                    problems.push(format!(
                        "request {r} (FUA or flush) completed with its key-set still open (key_head {b})"
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
            let open_after: Vec<String> = heads
                .iter()
                .filter(|(_, b, a)| a == b)
                .map(|(r, _, _)| r.to_string())
                .collect();
            out.push(Comparison {
                image: name.to_string(),
                about: format!(
                    "first activation and {} writes traced (queue {}; key-set still open right after requests [{}]): the kernel {} stores ({} bytes) in {} epochs ({} sfence, {} mfence, {} clwb, {} flush requests; epochs per step {:?}), strict mode {} stores in {} epochs ({:?})",
                    REQUESTS.len(),
                    queue.as_deref().unwrap_or("?"),
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
                heads,
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
        for img in &images {
            let _ = std::fs::remove_file(&img.path);
        }
        let _ = std::fs::remove_file(&disk);
        let _ = std::fs::remove_file(&program);
        crate::kernel_mode::tidy(&dir);
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
        // Each request: its data, its key-set (with the empty one after
        // it), the dirty_tail record once written back; the first also
        // takes a data segment (its generation) first.
        assert!(per[1..].iter().all(|&n| n >= 3), "{per:?}");
        // The data of request 0 is 4 KiB of 'A' in one epoch of its own.
        let ep = epochs(&t);
        let first = steps
            .iter()
            .position(|s| *s == Some(request_marker(0)))
            .unwrap();
        let data = (first..ep.len())
            .take(per[1])
            .find(|&e| ep[e].len() == REQ_LEN as usize)
            .expect("an epoch of exactly the data");
        assert!(ep[data].values().all(|&b| b == b'A'));
        // The same workload without its flushes and writeback is fewer epochs:
        // the closing steps are really in the trace.
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
        assert_eq!(
            request_heads(&[
                "queue fua=1 write_cache=write_back".into(),
                "req 3 before 0:4112 after 0:4392".into()
            ]),
            [(3, "0:4112".into(), "0:4392".into())]
        );
    }
}
