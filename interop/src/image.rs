//! Images moving between the host model (`SparsePmem`) and the files QEMU maps.

use pcache::pmem::{Pmem, SparsePmem};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

const PAGE: usize = 4096;

/// Writes `img` to a new sparse file at `path` (only its non-zero pages).
pub fn write_sparse(img: &SparsePmem, path: &Path) -> std::io::Result<()> {
    let f = File::create(path)?;
    f.set_len(img.size())?;
    let mut page = [0u8; PAGE];
    for idx in img.page_indices() {
        let off = idx * PAGE as u64;
        img.read(off, &mut page)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        f.write_all_at(&page, off)?;
    }
    f.sync_all()
}

/// Reads a file into a `SparsePmem` (zero pages stay absent, holes unread).
pub fn read_sparse(path: &Path) -> std::io::Result<SparsePmem> {
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    SparsePmem::copy_of(&pcache::pmem::FilePmem::from_file(f, size, false))
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// Reads a zstd-compressed image (the fixtures) into a `SparsePmem`,
/// streaming: only its non-zero pages are held.
pub fn read_zst(path: &Path) -> std::io::Result<SparsePmem> {
    let mut dec = ruzstd::decoding::StreamingDecoder::new(File::open(path)?)
        .map_err(std::io::Error::other)?;
    let mut pages: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match dec.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        for (i, page) in buf[..filled].chunks(PAGE).enumerate() {
            if page.iter().any(|&b| b != 0) {
                pages.push((size + (i * PAGE) as u64, page.to_vec()));
            }
        }
        size += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    let mut img = SparsePmem::new(size);
    for (off, page) in pages {
        img.write_bytes(off, &page)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(img)
}

/// How two images differ first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Difference {
    /// Byte `offset` is `a` in the first image and `b` in the second.
    Byte { offset: u64, a: u8, b: u8 },
    /// The sizes differ.
    Size { a: u64, b: u64 },
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::Byte { offset, a, b } => {
                write!(f, "byte {offset:#x}: {a:#04x} vs {b:#04x}")
            }
            Difference::Size { a, b } => write!(f, "sizes {a} vs {b}"),
        }
    }
}

/// The first difference between two images, if any.
pub fn first_difference(a: &SparsePmem, b: &SparsePmem) -> Option<Difference> {
    if a.size() != b.size() {
        return Some(Difference::Size {
            a: a.size(),
            b: b.size(),
        });
    }
    let mut pages: Vec<u64> = a.page_indices().chain(b.page_indices()).collect();
    pages.sort_unstable();
    pages.dedup();
    let (mut pa, mut pb) = ([0u8; PAGE], [0u8; PAGE]);
    for idx in pages {
        let off = idx * PAGE as u64;
        // Both images have the same size and the page came from one of them.
        a.read(off, &mut pa).expect("page in range");
        b.read(off, &mut pb).expect("page in range");
        if let Some(i) = (0..PAGE).find(|&i| pa[i] != pb[i]) {
            return Some(Difference::Byte {
                offset: off + i as u64,
                a: pa[i],
                b: pb[i],
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_comparison_catches_a_one_byte_difference_anywhere() {
        let mut a = SparsePmem::new(512 << 20);
        pcache::activate(&mut a, &pcache::Options::default(), &mut pcache::NoHooks);
        let same = a.clone();
        assert_eq!(first_difference(&a, &same), None);
        for off in [0u64, 4096 + 7, 12288 + 23, (512 << 20) - 1] {
            let mut b = a.clone();
            let mut byte = [0u8];
            b.read(off, &mut byte).unwrap();
            b.write_bytes(off, &[byte[0] ^ 0x40]).unwrap();
            assert_eq!(
                first_difference(&a, &b),
                Some(Difference::Byte {
                    offset: off,
                    a: byte[0],
                    b: byte[0] ^ 0x40
                }),
                "at {off}"
            );
        }
        assert_eq!(
            first_difference(&a, &SparsePmem::new(1 << 30)),
            Some(Difference::Size {
                a: 512 << 20,
                b: 1 << 30
            })
        );
    }

    #[test]
    fn files_round_trip_sparse() {
        let dir = std::env::temp_dir().join(format!("interop-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut a = SparsePmem::new(512 << 20);
        pcache::activate(&mut a, &pcache::Options::default(), &mut pcache::NoHooks);
        let p = dir.join("a.img");
        write_sparse(&a, &p).unwrap();
        let b = read_sparse(&p).unwrap();
        assert_eq!(first_difference(&a, &b), None);
        assert_eq!(a.pages(), b.pages());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
