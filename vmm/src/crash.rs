//! Crash images: a traced window saved as a frozen base plus its trace, and
//! the images a power cut at any trace position would leave behind.
//!
//! # The window's base
//! When tracing starts, the VMM freezes the pmem and disk contents as they
//! are: **everything stored before that point counts as durable**. The freeze
//! is cheap: the images are copy-on-write views of files nothing writes to, so
//! the base is "the image file plus the pages (pmem) and sectors (disk) the run
//! had changed so far", and only those are copied. [`TraceWindow::save`] turns
//! it into two plain (sparse) files, `pmem.img` and `disk.img`.
//!
//! # Building crash images
//! [`SavedWindow::build`] maps the base files copy-on-write (`MAP_PRIVATE` for
//! pmem, a sector overlay for the disk) and applies exactly the writes it is
//! given, in trace order: no copy of the whole region, no write to the base.
//! The result can be handed straight to the next VM run (a recovery boot)
//! or written out with [`CrashImages::write_files`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::disk::{DiskImage, Overlay, SECTOR};
use crate::memory::{ImageMode, MemoryError, PmemRegion};
use crate::trace::{Event, Trace, TraceError};

/// Errors saving a window or building crash images.
#[derive(Debug, thiserror::Error)]
pub enum CrashError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: io::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("{path}: {source}")]
    Trace { path: String, source: TraceError },
    #[error("{path}: {source}")]
    Meta {
        path: String,
        source: serde_json::Error,
    },
    #[error("cut at {cut} is past the end of the trace ({len} events)")]
    CutOutOfRange { cut: u64, len: usize },
    #[error("write {0:?} is not a write issued before the cut")]
    NotAWrite(WriteRef),
    #[error("write {0:?} is not pending at the cut (it is already durable or not issued)")]
    NotPending(u64),
    #[error("trace event {seq} writes outside the image: {source}")]
    OutOfImage { seq: u64, source: io::Error },
    #[error("window format {0} is not supported (expected {FORMAT})")]
    Format(u32),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CrashError {
    let path = path.display().to_string();
    move |source| CrashError::Io { what, path, source }
}

/// One unit of durability: a pmem store (`part` 0), or sector `part` of a
/// blk write. Matches the scenario runner's persistence models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WriteRef {
    /// Sequence number of the event in the trace.
    pub event: u64,
    /// Sector index within a blk write; 0 for pmem stores.
    pub part: u32,
}

/// A traced window held in memory at the end of a run: the frozen base
/// (image files plus what had changed over them when tracing started) and
/// the trace.
#[derive(Debug)]
pub struct TraceWindow {
    pub trace: Trace,
    pub(crate) pmem_file: Arc<File>,
    pub(crate) pmem_size: u64,
    pub(crate) pmem_pages: BTreeMap<u64, Box<[u8]>>,
    pub(crate) disk_file: Arc<File>,
    pub(crate) disk_size: u64,
    pub(crate) disk_overlay: Overlay,
    /// Whether the window was still open when the run ended.
    pub open_at_end: bool,
}

/// `window.json`: what a saved window holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowMeta {
    pub format: u32,
    pub pmem_size: u64,
    pub disk_size: u64,
    pub events: u64,
    /// Pages (pmem) and sectors (disk) that differed from the image files
    /// when tracing started, folded into the base files.
    pub pmem_pages_before: u64,
    pub disk_sectors_before: u64,
}

/// Version of the saved-window layout.
pub const FORMAT: u32 = 1;

impl TraceWindow {
    /// Saves the window into `dir` (created if needed): `pmem.img` and
    /// `disk.img` (the frozen base, sparse), `trace.bin` (see [`crate::trace`])
    /// and `window.json` ([`WindowMeta`]).
    pub fn save(&self, dir: &Path) -> Result<SavedWindow, CrashError> {
        std::fs::create_dir_all(dir).map_err(io_err("window directory", dir))?;
        let pmem = dir.join("pmem.img");
        copy_sparse(&self.pmem_file, self.pmem_size, &pmem)?;
        let f = File::options()
            .write(true)
            .open(&pmem)
            .map_err(io_err("pmem base", &pmem))?;
        for (off, page) in &self.pmem_pages {
            f.write_all_at(page, *off)
                .map_err(io_err("pmem base", &pmem))?;
        }
        let disk = dir.join("disk.img");
        copy_sparse(&self.disk_file, self.disk_size, &disk)?;
        let f = File::options()
            .write(true)
            .open(&disk)
            .map_err(io_err("disk base", &disk))?;
        for (sector, data) in &self.disk_overlay {
            f.write_all_at(&data[..], sector * SECTOR)
                .map_err(io_err("disk base", &disk))?;
        }
        let trace = dir.join("trace.bin");
        self.trace
            .write_file(&trace)
            .map_err(io_err("trace file", &trace))?;
        let meta = WindowMeta {
            format: FORMAT,
            pmem_size: self.pmem_size,
            disk_size: self.disk_size,
            events: self.trace.len() as u64,
            pmem_pages_before: self.pmem_pages.len() as u64,
            disk_sectors_before: self.disk_overlay.len() as u64,
        };
        let mpath = dir.join("window.json");
        std::fs::write(
            &mpath,
            serde_json::to_vec_pretty(&meta).expect("plain struct serialises"),
        )
        .map_err(io_err("window metadata", &mpath))?;
        SavedWindow::open(dir)
    }
}

/// Copies `size` bytes of `src` into a new file at `dst`, data extents only
/// (`SEEK_DATA`/`SEEK_HOLE`), so a sparse image stays sparse.
fn copy_sparse(src: &File, size: u64, dst: &Path) -> Result<(), CrashError> {
    let out = File::create(dst).map_err(io_err("base image", dst))?;
    out.set_len(size).map_err(io_err("base image", dst))?;
    let fd = src.as_raw_fd();
    let mut pos: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (pos as u64) < size {
        // SAFETY: lseek on a file descriptor we own; errors checked.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(io_err("base image source", dst)(e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            size as i64
        } else {
            hole.min(size as i64)
        };
        let mut at = data as u64;
        while at < end as u64 {
            let n = ((end as u64 - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)
                .map_err(io_err("base image source", dst))?;
            out.write_all_at(&buf[..n], at)
                .map_err(io_err("base image", dst))?;
            at += n as u64;
        }
        pos = end;
    }
    Ok(())
}

/// A window saved on disk, ready to build crash images from.
#[derive(Debug)]
pub struct SavedWindow {
    pub dir: PathBuf,
    pub meta: WindowMeta,
    pub trace: Trace,
    pmem_base: File,
    disk_base: File,
}

impl SavedWindow {
    /// Opens a window saved by [`TraceWindow::save`].
    pub fn open(dir: &Path) -> Result<Self, CrashError> {
        let mpath = dir.join("window.json");
        let text = std::fs::read(&mpath).map_err(io_err("window metadata", &mpath))?;
        let meta: WindowMeta =
            serde_json::from_slice(&text).map_err(|source| CrashError::Meta {
                path: mpath.display().to_string(),
                source,
            })?;
        if meta.format != FORMAT {
            return Err(CrashError::Format(meta.format));
        }
        let tpath = dir.join("trace.bin");
        let bytes = std::fs::read(&tpath).map_err(io_err("trace file", &tpath))?;
        let trace = Trace::decode(&bytes).map_err(|source| CrashError::Trace {
            path: tpath.display().to_string(),
            source,
        })?;
        let p = dir.join("pmem.img");
        let pmem_base = File::open(&p).map_err(io_err("pmem base", &p))?;
        let d = dir.join("disk.img");
        let disk_base = File::open(&d).map_err(io_err("disk base", &d))?;
        Ok(SavedWindow {
            dir: dir.to_path_buf(),
            meta,
            trace,
            pmem_base,
            disk_base,
        })
    }

    /// Reads the frozen base's pmem bytes at `offset`.
    pub fn base_pmem_read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.pmem_base.read_exact_at(buf, offset)
    }

    /// Reads the frozen base's disk bytes at byte `offset`.
    pub fn base_disk_read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.disk_base.read_exact_at(buf, offset)
    }

    /// Builds the crash images for a cut at trace position `cut` (events
    /// `[0, cut)` were issued) in which exactly `writes` reached the media:
    /// the base plus those writes applied in trace order, nothing else.
    pub fn build(&self, cut: u64, writes: &[WriteRef]) -> Result<CrashImages, CrashError> {
        if cut > self.trace.len() as u64 {
            return Err(CrashError::CutOutOfRange {
                cut,
                len: self.trace.len(),
            });
        }
        let mut sorted = writes.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        for w in &sorted {
            let ok = w.event < cut
                && match self.trace.get(w.event) {
                    Some(Event::PmemStore { .. }) => w.part == 0,
                    Some(Event::BlkWrite { len, .. }) => (w.part as u64) < *len as u64 / SECTOR,
                    _ => false,
                };
            if !ok {
                return Err(CrashError::NotAWrite(*w));
            }
        }
        let pmem = PmemRegion::open(&self.dir.join("pmem.img"), ImageMode::CopyOnWrite)?;
        let mut disk = DiskImage::open(&self.dir.join("disk.img"), ImageMode::CopyOnWrite)?;
        for w in &sorted {
            let e = self.trace.get(w.event).expect("checked above");
            let r = match *e {
                Event::PmemStore { offset, .. } => pmem.write(offset, &Trace::store_bytes(e)),
                Event::BlkWrite { sector, .. } => {
                    let data = self.trace.blk_data(e);
                    let s = w.part as usize * SECTOR as usize;
                    disk.write(
                        (sector + w.part as u64) * SECTOR,
                        &data[s..s + SECTOR as usize],
                    )
                }
                _ => unreachable!("checked above"),
            };
            r.map_err(|source| CrashError::OutOfImage {
                seq: w.event,
                source,
            })?;
        }
        Ok(CrashImages {
            pmem,
            disk,
            applied: sorted,
        })
    }

    /// The flush model: everything covered by a completed flush of its device
    /// before `cut` is durable, plus the chosen writes among those still
    /// pending at `cut` (see [`Trace::pending_at`]).
    pub fn build_flushed_plus(
        &self,
        cut: u64,
        chosen_pending: &[u64],
    ) -> Result<CrashImages, CrashError> {
        if cut > self.trace.len() as u64 {
            return Err(CrashError::CutOutOfRange {
                cut,
                len: self.trace.len(),
            });
        }
        let pending: std::collections::HashSet<u64> =
            self.trace.pending_at(cut).into_iter().collect();
        if let Some(bad) = chosen_pending.iter().find(|s| !pending.contains(s)) {
            return Err(CrashError::NotPending(*bad));
        }
        let chosen: std::collections::HashSet<u64> = chosen_pending.iter().copied().collect();
        let mut writes = Vec::new();
        for (seq, e) in self.trace.events()[..cut as usize].iter().enumerate() {
            let seq = seq as u64;
            if pending.contains(&seq) && !chosen.contains(&seq) {
                continue;
            }
            match *e {
                Event::PmemStore { .. } => writes.push(WriteRef {
                    event: seq,
                    part: 0,
                }),
                Event::BlkWrite { len, .. } => writes
                    .extend((0..len / SECTOR as u32).map(|part| WriteRef { event: seq, part })),
                _ => {}
            }
        }
        self.build(cut, &writes)
    }
}

/// The pmem and disk images a power cut leaves behind: copy-on-write views
/// over the window's base, usable as the next run's images.
#[derive(Debug)]
pub struct CrashImages {
    pub pmem: PmemRegion,
    pub disk: DiskImage,
    /// The writes applied, in trace order.
    pub applied: Vec<WriteRef>,
}

impl CrashImages {
    /// Writes both images out as plain files (for inspection tools).
    pub fn write_files(&self, pmem_path: &Path, disk_path: &Path) -> Result<(), CrashError> {
        copy_sparse(self.pmem.file(), self.pmem.size(), pmem_path)?;
        let f = File::options()
            .write(true)
            .open(pmem_path)
            .map_err(io_err("pmem image", pmem_path))?;
        for (off, page) in self.pmem.private_pages()? {
            f.write_all_at(&page, off)
                .map_err(io_err("pmem image", pmem_path))?;
        }
        copy_sparse(self.disk.file(), self.disk.size(), disk_path)?;
        let f = File::options()
            .write(true)
            .open(disk_path)
            .map_err(io_err("disk image", disk_path))?;
        for (sector, data) in self.disk.overlay() {
            f.write_all_at(&data[..], sector * SECTOR)
                .map_err(io_err("disk image", disk_path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::layout::PMEM_MIN_SIZE;
    use vmm_sys_util::tempdir::TempDir;

    /// A window built by hand: base files with some content, a few pages and
    /// sectors changed before tracing started, and a trace.
    fn window(dir: &Path) -> TraceWindow {
        let pf = dir.join("user-pmem");
        let f = File::create(&pf).unwrap();
        f.set_len(PMEM_MIN_SIZE).unwrap();
        f.write_all_at(&[0x11; 8], 0x10_0000).unwrap();
        let df = dir.join("user-disk");
        let f = File::create(&df).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[0x22; 512], 0).unwrap();

        let mut pages = BTreeMap::new();
        let mut page = vec![0u8; 4096].into_boxed_slice();
        page[8..16].copy_from_slice(&[0x33; 8]);
        pages.insert(0x2000u64, page);
        let mut overlay = Overlay::new();
        overlay.insert(3, Box::new([0x44u8; 512]));

        let mut t = Trace::new();
        t.push_pmem_store(0x2000, &1u64.to_le_bytes()); // 0
        t.push(Event::PmemFlush); // 1
        t.push_pmem_store(0x2008, &2u64.to_le_bytes()); // 2
        t.push_blk_write(4, &[[0x55u8; 512], [0x66u8; 512]].concat()); // 3
        t.push(Event::Marker { id: 7 }); // 4
        t.push_pmem_store(0x3000, &[9, 9]); // 5
        t.push(Event::BlkFlush); // 6
        t.push_pmem_store(0x2000, &3u64.to_le_bytes()); // 7
        TraceWindow {
            trace: t,
            pmem_file: Arc::new(File::open(&pf).unwrap()),
            pmem_size: PMEM_MIN_SIZE,
            pmem_pages: pages,
            disk_file: Arc::new(File::open(&df).unwrap()),
            disk_size: 1 << 20,
            disk_overlay: overlay,
            open_at_end: false,
        }
    }

    fn pmem_u64(c: &CrashImages, off: u64) -> u64 {
        c.pmem.read_u64(off).unwrap()
    }

    fn disk_sector(c: &CrashImages, s: u64) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        c.disk.read(s * 512, &mut b).unwrap();
        b
    }

    #[test]
    fn saved_base_holds_the_files_plus_what_changed_before_tracing() {
        let tmp = TempDir::new().unwrap();
        let w = window(tmp.as_path());
        let saved = w.save(&tmp.as_path().join("win")).unwrap();
        assert_eq!(saved.meta.events, 8);
        assert_eq!(saved.meta.pmem_pages_before, 1);
        let mut b = [0u8; 8];
        saved.base_pmem_read(0x10_0000, &mut b).unwrap();
        assert_eq!(b, [0x11; 8]);
        saved.base_pmem_read(0x2008, &mut b).unwrap();
        assert_eq!(b, [0x33; 8]);
        let mut s = [0u8; 512];
        saved.base_disk_read(3 * 512, &mut s).unwrap();
        assert_eq!(s, [0x44; 512]);
        saved.base_disk_read(0, &mut s).unwrap();
        assert_eq!(s, [0x22; 512]);
        assert_eq!(saved.trace, w.trace);
        // The saved base stays sparse: far less allocated than its size.
        let blocks = std::fs::metadata(tmp.as_path().join("win/pmem.img"))
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))
            .unwrap();
        assert!(blocks * 512 < 1 << 20, "{blocks} blocks allocated");
    }

    #[test]
    fn crash_images_contain_exactly_the_chosen_writes() {
        let tmp = TempDir::new().unwrap();
        let saved = window(tmp.as_path())
            .save(&tmp.as_path().join("win"))
            .unwrap();

        // Nothing applied: the base.
        let c = saved.build(8, &[]).unwrap();
        assert_eq!(pmem_u64(&c, 0x2000), 0);
        assert_eq!(pmem_u64(&c, 0x2008), u64::from_le_bytes([0x33; 8]));
        assert_eq!(disk_sector(&c, 4), vec![0u8; 512]);

        // Store 2 and the second sector of write 3 only.
        let c = saved
            .build(
                8,
                &[
                    WriteRef { event: 3, part: 1 },
                    WriteRef { event: 2, part: 0 },
                ],
            )
            .unwrap();
        assert_eq!(pmem_u64(&c, 0x2000), 0);
        assert_eq!(pmem_u64(&c, 0x2008), 2);
        assert_eq!(disk_sector(&c, 4), vec![0u8; 512]);
        assert_eq!(disk_sector(&c, 5), vec![0x66u8; 512]);
        assert_eq!(disk_sector(&c, 3), vec![0x44u8; 512]);
        // Only the touched page became private; the base file is unchanged.
        assert_eq!(
            c.pmem.private_pages().unwrap().keys().collect::<Vec<_>>(),
            vec![&0x2000]
        );
        let mut b = [0u8; 8];
        saved.base_pmem_read(0x2008, &mut b).unwrap();
        assert_eq!(b, [0x33; 8]);

        // Later writes to the same address win, in trace order.
        let c = saved
            .build(
                8,
                &[
                    WriteRef { event: 7, part: 0 },
                    WriteRef { event: 0, part: 0 },
                ],
            )
            .unwrap();
        assert_eq!(pmem_u64(&c, 0x2000), 3);

        // Writes at or after the cut, non-writes and bad parts are refused.
        for bad in [
            WriteRef { event: 7, part: 0 },
            WriteRef { event: 4, part: 0 },
            WriteRef { event: 3, part: 2 },
            WriteRef { event: 0, part: 1 },
            WriteRef { event: 99, part: 0 },
        ] {
            assert!(
                matches!(saved.build(7, &[bad]), Err(CrashError::NotAWrite(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            saved.build(9, &[]),
            Err(CrashError::CutOutOfRange { .. })
        ));
    }

    #[test]
    fn flush_model_keeps_flushed_writes_and_the_chosen_pending_ones() {
        let tmp = TempDir::new().unwrap();
        let saved = window(tmp.as_path())
            .save(&tmp.as_path().join("win"))
            .unwrap();
        // At cut 6: store 0 flushed; 2, 3 and 5 pending.
        assert_eq!(saved.trace.pending_at(6), vec![2, 3, 5]);
        let c = saved.build_flushed_plus(6, &[5]).unwrap();
        assert_eq!(pmem_u64(&c, 0x2000), 1);
        assert_eq!(pmem_u64(&c, 0x2008), u64::from_le_bytes([0x33; 8]));
        let mut two = [0u8; 2];
        c.pmem.read(0x3000, &mut two).unwrap();
        assert_eq!(two, [9, 9]);
        assert_eq!(disk_sector(&c, 4), vec![0u8; 512]);
        assert!(matches!(
            saved.build_flushed_plus(6, &[0]),
            Err(CrashError::NotPending(0))
        ));
        // At cut 8 the blk flush made write 3 durable.
        let c = saved.build_flushed_plus(8, &[]).unwrap();
        assert_eq!(disk_sector(&c, 4), vec![0x55u8; 512]);
        assert_eq!(pmem_u64(&c, 0x2008), u64::from_le_bytes([0x33; 8]));
    }

    #[test]
    fn crash_images_write_out_as_files() {
        let tmp = TempDir::new().unwrap();
        let saved = window(tmp.as_path())
            .save(&tmp.as_path().join("win"))
            .unwrap();
        let c = saved.build_flushed_plus(8, &[2]).unwrap();
        let p = tmp.as_path().join("p.img");
        let d = tmp.as_path().join("d.img");
        c.write_files(&p, &d).unwrap();
        let pf = File::open(&p).unwrap();
        let mut b = [0u8; 8];
        pf.read_exact_at(&mut b, 0x2008).unwrap();
        assert_eq!(u64::from_le_bytes(b), 2);
        pf.read_exact_at(&mut b, 0x2000).unwrap();
        assert_eq!(u64::from_le_bytes(b), 1);
        let df = File::open(&d).unwrap();
        let mut s = [0u8; 512];
        df.read_exact_at(&mut s, 5 * 512).unwrap();
        assert_eq!(s, [0x66; 512]);
    }
}
