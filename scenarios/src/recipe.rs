//! Device recipes: the images a scenario starts from, made on the host with the
//! same pcache code the guest runs.

use crate::spec::{Device, DiskContent, Mode, PrefillStep, Recipe};
use pcache::backing::VecBacking;
use pcache::pmem::{FilePmem, SPARSE_PAGE};
use pcache::{activate, NoHooks, Options, Outcome, Pmem, SparsePmem};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use workload::Op;

/// Byte offset of the superblock's magic (`docs/format.md` §5.2: sb at 4096, magic at +8).
const SB_MAGIC_OFF: u64 = 4096 + 8;

/// The images of one device, ready for a run.
#[derive(Clone, Debug)]
pub struct PreparedDevice {
    pub pmem: PathBuf,
    pub disk: PathBuf,
    /// For `older-cache`: the cache_info seq of the older cache's last activation.
    pub older_seq: Option<u8>,
}

/// Why a device could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("recipe for `{device}`: activation {n} of {total} gave `{outcome}`: {message}")]
    Activation {
        device: String,
        n: u32,
        total: u32,
        outcome: Outcome,
        message: String,
    },
    #[error("recipe for `{device}`: {source}")]
    Pmem {
        device: String,
        source: pcache::PmemError,
    },
    #[error("prefill of `{device}`: {why}")]
    Prefill { device: String, why: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecipeError + '_ {
    move |error| RecipeError::Io {
        path: path.into(),
        error,
    }
}

/// A sparse file of `size` zero bytes (refuses to overwrite).
pub fn create_sparse(path: &Path, size: u64) -> Result<(), RecipeError> {
    let f = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path))?;
    f.set_len(size).map_err(io(path))
}

/// Makes `device`'s images in `dir` for a run in `mode`. A `file` recipe's image
/// is used in place: runs only ever see copy-on-write views of it.
pub fn prepare(device: &Device, mode: Mode, dir: &Path) -> Result<PreparedDevice, RecipeError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let disk = dir.join(format!("{}.disk", device.name));
    create_sparse(&disk, device.disk_size.0)?;
    if device.disk == DiskContent::Pattern {
        write_pattern(&disk, device.disk_size.0)?;
    }
    let pmem = match &device.recipe {
        Recipe::File { path } => {
            let len = std::fs::metadata(path).map_err(io(path))?.len();
            if len != device.pmem_size.0 {
                return Err(RecipeError::Io {
                    path: path.clone(),
                    error: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!(
                            "device `{}`: the image is {len} bytes, but its pmem-size is {} bytes",
                            device.name, device.pmem_size.0
                        ),
                    ),
                });
            }
            if device.prefill.is_none() {
                return Ok(PreparedDevice {
                    pmem: path.clone(),
                    disk,
                    older_seq: None,
                });
            }
            // A prefill writes: onto a copy, never the user's file.
            let copy = dir.join(format!("{}.pmem", device.name));
            std::fs::copy(path, &copy).map_err(io(&copy))?;
            prefill(device, mode, &copy, &disk)?;
            return Ok(PreparedDevice {
                pmem: copy,
                disk,
                older_seq: None,
            });
        }
        _ => dir.join(format!("{}.pmem", device.name)),
    };
    create_sparse(&pmem, device.pmem_size.0)?;
    let older_seq = match device.recipe {
        Recipe::Blank | Recipe::File { .. } => None,
        Recipe::Formatted { activations } => {
            activate_times(device, mode, &pmem, activations)?;
            prefill(device, mode, &pmem, &disk)?;
            None
        }
        Recipe::OlderCache { activations } => {
            let seq = activate_times(device, mode, &pmem, activations)?;
            // The older cache's data (its log stays behind a re-format).
            prefill(device, mode, &pmem, &disk)?;
            let mut dev = FilePmem::open(&pmem).map_err(io(&pmem))?;
            let pmem_err = |source| RecipeError::Pmem {
                device: device.name.clone(),
                source,
            };
            dev.store_u64(SB_MAGIC_OFF, 0).map_err(pmem_err)?;
            dev.persist(SB_MAGIC_OFF, 8).map_err(pmem_err)?;
            Some(seq)
        }
    };
    Ok(PreparedDevice {
        pmem,
        disk,
        older_seq,
    })
}

/// Fills the disk with the tag-0 pattern (`workload::pattern`), 1 MiB at a time.
fn write_pattern(path: &Path, size: u64) -> Result<(), RecipeError> {
    const CHUNK: u64 = 1 << 20;
    let f = File::options().write(true).open(path).map_err(io(path))?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(CHUNK) as usize;
        workload::fill(0, off, &mut buf[..n]);
        f.write_all_at(&buf[..n], off).map_err(io(path))?;
        off += n as u64;
    }
    Ok(())
}

/// Runs the device's prefill (if any) on the pmem image with pcache: an
/// activation in `mode`, the ops, a deactivation. The work is done on an
/// in-memory copy (a file's stores would each be a system call) and the
/// pages it holds are written back.
fn prefill(device: &Device, mode: Mode, pmem: &Path, disk: &Path) -> Result<(), RecipeError> {
    let fail = |why: String| RecipeError::Prefill {
        device: device.name.clone(),
        why,
    };
    let steps = device.prefill_steps().map_err(fail)?;
    if steps.is_empty() {
        return Ok(());
    }
    let file = FilePmem::open(pmem).map_err(io(pmem))?;
    let mut mem = SparsePmem::copy_of(&file).map_err(|e| fail(e.to_string()))?;
    drop(file);
    // The disk too: a file's flush is an fsync, and writeback flushes once
    // per key-set (a long prefill's idle periods would fsync for minutes).
    // Its image is written out once at the end.
    let mut backing = VecBacking::from_vec(std::fs::read(disk).map_err(io(disk))?);
    let opts = Options {
        mode,
        data_crc: device.data_crc,
    };
    let act = pcache::start(&mut mem, &opts, &mut NoHooks);
    let mut cache = act.cache.ok_or_else(|| {
        fail(format!(
            "the activation before it gave `{}`: {}",
            act.report.outcome,
            act.report.message.unwrap_or_default()
        ))
    })?;
    let mut data = Vec::new();
    for (k, step) in steps.iter().enumerate() {
        let done = match *step {
            PrefillStep::Op(Op::Write { off, len, id, fua }) => {
                data.resize(len as usize, 0);
                workload::fill(id, off, &mut data);
                cache.write(&mut mem, &backing, &mut NoHooks, off, &data, fua)
            }
            PrefillStep::Op(Op::Flush) => cache.flush(&mut mem, &mut NoHooks),
            PrefillStep::Op(Op::CloseKsets) => {
                cache.close_kset(&mut mem, &mut NoHooks).map_err(Into::into)
            }
            PrefillStep::Writeback => cache
                .writeback_all(&mut mem, &mut backing, &mut NoHooks)
                .map(drop),
            PrefillStep::Gc => cache.gc_all(&mut mem, &mut NoHooks).map(drop),
            PrefillStep::Idle => cache.idle(&mut mem, &mut backing, &mut NoHooks).map(drop),
            PrefillStep::GcPercent(p) => {
                let set = cache.set_gc_percent(&mut mem, &mut NoHooks, u32::from(p));
                set.map_err(|e| fail(format!("step {k} ({step:?}): {e}")))?;
                Ok(())
            }
        };
        done.map_err(|e| fail(format!("step {k} ({step:?}): {e}")))?;
    }
    pcache::deactivate(cache, &mut mem, &mut backing, &mut NoHooks)
        .map_err(|e| fail(format!("deactivation: {e}")))?;
    let d = File::options().write(true).open(disk).map_err(io(disk))?;
    d.write_all_at(backing.as_slice(), 0).map_err(io(disk))?;
    d.sync_all().map_err(io(disk))?;
    let f = File::options().write(true).open(pmem).map_err(io(pmem))?;
    let mut page = vec![0u8; SPARSE_PAGE as usize];
    for p in mem.page_indices().collect::<Vec<_>>() {
        mem.read(p * SPARSE_PAGE, &mut page)
            .map_err(|e| fail(e.to_string()))?;
        f.write_all_at(&page, p * SPARSE_PAGE).map_err(io(pmem))?;
    }
    f.sync_all().map_err(io(pmem))
}

/// Activates the image `n` times; returns the cache_info seq the last one wrote.
fn activate_times(device: &Device, mode: Mode, path: &Path, n: u32) -> Result<u8, RecipeError> {
    let opts = Options {
        mode,
        data_crc: device.data_crc,
    };
    let mut dev = FilePmem::open(path).map_err(io(path))?;
    let mut seq = 0;
    for i in 1..=n {
        let r = activate(&mut dev, &opts, &mut NoHooks);
        let want = if i == 1 {
            Outcome::Formatted
        } else {
            Outcome::Opened
        };
        if r.outcome != want {
            return Err(RecipeError::Activation {
                device: device.name.clone(),
                n: i,
                total: n,
                outcome: r.outcome,
                message: r.message.unwrap_or_default(),
            });
        }
        seq = r.cache_info.map_or(0, |c| c.seq);
    }
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Size;

    fn device(recipe: Recipe) -> Device {
        Device {
            name: "d".into(),
            pmem_size: Size(512 << 20),
            disk_size: Size(1 << 20),
            recipe,
            disk: DiskContent::Zeros,
            prefill: None,
            prefill_repeat: 1,
            data_crc: false,
        }
    }

    #[test]
    fn a_users_image_must_have_the_scenarios_pmem_size() {
        let dir = std::env::temp_dir().join(format!("recipe-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("user.pmem");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let d = device(Recipe::File { path: img.clone() });
        let err = prepare(&d, Mode::Recover, &dir.join("work"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the image is 1073741824 bytes, but its pmem-size is 536870912"),
            "{err}"
        );
        std::fs::File::create(&img)
            .unwrap()
            .set_len(512 << 20)
            .unwrap();
        let p = prepare(&d, Mode::Recover, &dir.join("work2")).unwrap();
        assert_eq!(
            p.pmem, img,
            "the user's file itself (runs use copy-on-write views)"
        );
        let missing = device(Recipe::File {
            path: dir.join("nope.pmem"),
        });
        assert!(prepare(&missing, Mode::Recover, &dir.join("work3")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("scn-recipe-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn blank_is_sparse_zeros() {
        let dir = tempdir("blank");
        let p = prepare(&device(Recipe::Blank), Mode::Recover, &dir).unwrap();
        let meta = std::fs::metadata(&p.pmem).unwrap();
        assert_eq!(meta.len(), 512 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "a blank image stays sparse");
        assert_eq!(std::fs::metadata(&p.disk).unwrap().len(), 1 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn older_cache_has_its_seq_and_no_magic() {
        for mode in [Mode::Strict, Mode::Recover] {
            let dir = tempdir(&mode.to_string());
            let p = prepare(&device(Recipe::OlderCache { activations: 3 }), mode, &dir).unwrap();
            assert_eq!(
                p.older_seq,
                Some(3),
                "format writes seq 1, each activation one more"
            );
            let dev = FilePmem::open_read_only(&p.pmem).unwrap();
            let mut magic = [0xffu8; 8];
            dev.read(SB_MAGIC_OFF, &mut magic).unwrap();
            assert_eq!(magic, [0; 8]);
            // With its magic zeroed, the next activation formats it again.
            let mut dev = FilePmem::open(&p.pmem).unwrap();
            let opts = Options {
                mode,
                data_crc: false,
            };
            let r = activate(&mut dev, &opts, &mut NoHooks);
            assert_eq!(r.outcome, Outcome::Formatted);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn formatted_opens() {
        let dir = tempdir("formatted");
        let p = prepare(
            &device(Recipe::Formatted { activations: 2 }),
            Mode::Recover,
            &dir,
        )
        .unwrap();
        let mut dev = FilePmem::open(&p.pmem).unwrap();
        let r = activate(&mut dev, &Options::default(), &mut NoHooks);
        assert_eq!(r.outcome, Outcome::Opened);
        assert_eq!(r.cache_info.unwrap().seq, 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn existing_images_are_not_overwritten() {
        let dir = tempdir("exists");
        prepare(&device(Recipe::Blank), Mode::Recover, &dir).unwrap();
        let err = prepare(&device(Recipe::Blank), Mode::Recover, &dir).unwrap_err();
        assert!(matches!(err, RecipeError::Io { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
