//! The block device the target exposes (kernel `cache_req.c`,
//! `docs/format.md` §9.4–§9.6): writes go to persistent memory and the
//! key-set log, reads combine cached extents with the backing device (and
//! fill misses into the cache), a flush closes the open key-set.
//!
//! Writes never touch the backing device: that is writeback's job (issue 12).

use serde::Serialize;

use crate::backing::{Backing, BackingError};
use crate::cache::Cache;
use crate::cache_key::{AppendError, CachePos, Extent, KeyOnMedia};
use crate::format::{
    data_pos, pcache_crc, CACHE_SUBTREE_SIZE, DATA_SIZE, KEY_F_CLEAN, SECTOR_SIZE,
};
use crate::hooks::{CrashPoint, Hooks};
use crate::pmem::{write_words, Pmem, PmemError};

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum IoError {
    /// Offset or length not a multiple of 512 (dm-pcache's logical block).
    #[error("offset {off:#x} or length {len} is not a multiple of 512")]
    Unaligned {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// The request reaches past the end of the backing device.
    #[error("{off:#x}+{len} reaches past the end of the device ({size} bytes)")]
    BeyondDevice {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Device size in bytes.
        size: u64,
    },
    /// No free segment for the data (the kernel defers the request with
    /// EBUSY until GC frees one; there is no GC yet).
    #[error("cache full: no free segment for data")]
    CacheFull,
    /// The key-set log could not take the key.
    #[error("key-set log: {error}")]
    Log {
        /// Why.
        error: AppendError,
    },
    /// A pmem access failed.
    #[error("pmem: {error}")]
    Pmem {
        /// The error.
        error: PmemError,
    },
    /// A backing-device access failed.
    #[error("backing device: {error}")]
    Backing {
        /// The error.
        error: BackingError,
    },
}

impl From<PmemError> for IoError {
    fn from(error: PmemError) -> Self {
        IoError::Pmem { error }
    }
}

impl From<AppendError> for IoError {
    fn from(error: AppendError) -> Self {
        match error {
            AppendError::Pmem { error } => IoError::Pmem { error },
            error => IoError::Log { error },
        }
    }
}

impl From<BackingError> for IoError {
    fn from(error: BackingError) -> Self {
        IoError::Backing { error }
    }
}

fn check_request<B: Backing + ?Sized>(backing: &B, off: u64, len: u64) -> Result<(), IoError> {
    if off % SECTOR_SIZE != 0 || len % SECTOR_SIZE != 0 {
        return Err(IoError::Unaligned { off, len });
    }
    let size = backing.sectors().saturating_mul(SECTOR_SIZE);
    if off.checked_add(len).is_none_or(|end| end > size) {
        return Err(IoError::BeyondDevice { off, len, size });
    }
    Ok(())
}

/// Bytes from `off` to the next 4 MiB logical boundary (keys never cross one).
fn to_subtree_end(off: u64) -> u64 {
    CACHE_SUBTREE_SIZE - off % CACHE_SUBTREE_SIZE
}

impl Cache {
    /// `cache_data_alloc`: data space for up to `*len` bytes from the data
    /// head, allocating a data segment when there is none. When the head has
    /// `*len` bytes or fewer left, the key takes what is left (`*len`
    /// shrinks) and the head is dropped. Takes a reference for the key.
    /// Returns the position and the segment's generation.
    fn data_alloc<P: Pmem + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        hooks: &mut H,
        len: &mut u32,
    ) -> Result<(CachePos, u64), IoError> {
        loop {
            let Some(head) = self.rt.data_head else {
                let seg = self.get_cache_segment().ok_or(IoError::CacheFull)?;
                self.seg_get(seg); // the head's reference
                self.rt.data_head = Some(CachePos {
                    cache_seg_id: seg,
                    seg_off: 0,
                });
                continue;
            };
            let cseg = head.cache_seg_id;
            let gen = self.segments[cseg as usize].gen;
            let remain = (DATA_SIZE - head.seg_off as u64) as u32;
            self.seg_get(cseg); // the key's reference
            if remain > *len {
                self.rt.data_head = Some(CachePos {
                    cache_seg_id: cseg,
                    seg_off: head.seg_off + *len,
                });
            } else {
                *len = remain;
                self.seg_put(pmem, hooks, cseg)?; // the head leaves the segment
                self.rt.data_head = None;
            }
            return Ok((head, gen));
        }
    }

    /// Copies `data` to its data space and fences it (C10): a key is only
    /// appended after its data is durable.
    fn write_data<P: Pmem + ?Sized, H: Hooks + ?Sized>(
        &self,
        pmem: &mut P,
        hooks: &mut H,
        pos: CachePos,
        data: &[u8],
    ) -> Result<(), PmemError> {
        hooks.begin(CrashPoint::DataWrite);
        let at = data_pos(self.segments[pos.cache_seg_id as usize].pseg, pos.seg_off);
        write_words(pmem, at, data)?;
        // The broken build `explore` must catch drops this fence (test only).
        #[cfg(not(feature = "test-drop-data-fence"))]
        pmem.fence()?;
        hooks.end(CrashPoint::DataWrite);
        Ok(())
    }

    /// Allocates, writes and logs one key for `data` at logical `off` (which
    /// must not cross a 4 MiB boundary); returns how many bytes it took
    /// (data allocation may shorten a key). On failure, the index is as it
    /// was and the key's reference is dropped, as the kernel does.
    fn write_key<P: Pmem + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        hooks: &mut H,
        off: u64,
        data: &[u8],
        clean: bool,
        force_close: bool,
    ) -> Result<u32, IoError> {
        let mut len = data.len() as u32;
        let (pos, seg_gen) = self.data_alloc(pmem, hooks, &mut len)?;
        let data = &data[..len as usize];
        if let Err(e) = self.write_data(pmem, hooks, pos, data) {
            self.seg_put(pmem, hooks, pos.cache_seg_id)?;
            return Err(e.into());
        }
        let extent = Extent {
            off,
            len,
            cache_seg_id: pos.cache_seg_id,
            cache_seg_off: pos.seg_off,
            seg_gen,
            clean,
        };
        let key = KeyOnMedia {
            off: off.into(),
            len: len.into(),
            flags: (if clean { KEY_F_CLEAN } else { 0 }).into(),
            cache_seg_id: pos.cache_seg_id.into(),
            cache_seg_off: pos.seg_off.into(),
            seg_gen: seg_gen.into(),
            data_crc: (if self.info.data_crc() {
                pcache_crc(data)
            } else {
                0
            })
            .into(),
            reserved: 0.into(),
        };
        let removed = self.index.insert_returning(extent);
        if let Err(e) = self.append_key(pmem, hooks, key, force_close) {
            self.index.undo_insert(extent, removed);
            self.seg_put(pmem, hooks, pos.cache_seg_id)?;
            return Err(e.into());
        }
        Ok(len)
    }

    /// A WRITE of `data` at logical byte `off` (`docs/format.md` §9.4): cut at 4 MiB logical
    /// boundaries and wherever a data segment ends, each piece copied to
    /// pmem and fenced, then logged. With `fua` each piece's key-set is
    /// closed before the next piece, so the write is durable when this
    /// returns; without it, keys may wait in the open key-set until a
    /// [`Cache::flush`], a full key-set, or [`Cache::close_kset`].
    ///
    /// On an error the pieces already logged stay (the kernel retries the
    /// whole request later and so rewrites them).
    pub fn write<P: Pmem + ?Sized, B: Backing + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        backing: &B,
        hooks: &mut H,
        off: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), IoError> {
        check_request(backing, off, data.len() as u64)?;
        let mut done = 0usize;
        while done < data.len() {
            let at = off + done as u64;
            let piece = (data.len() - done).min(to_subtree_end(at) as usize);
            let took = self.write_key(pmem, hooks, at, &data[done..done + piece], false, fua)?;
            done += took as usize;
        }
        Ok(())
    }

    /// A READ of `buf.len()` bytes at logical byte `off` (`docs/format.md` §9.5): cached
    /// ranges from pmem (no data-CRC check, as the kernel), gaps from the
    /// backing device, each gap then filled into the cache as a CLEAN key
    /// when space allows (a fill that finds no space is dropped, as the
    /// kernel's). A key whose segment's generation moved on is dropped and
    /// its range read as a gap.
    pub fn read<P: Pmem + ?Sized, B: Backing + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        backing: &mut B,
        hooks: &mut H,
        off: u64,
        buf: &mut [u8],
    ) -> Result<(), IoError> {
        check_request(backing, off, buf.len() as u64)?;
        let end = off + buf.len() as u64;
        let mut pos = off;
        while pos < end {
            let at = (pos - off) as usize;
            if let Some(x) = self.index.lookup(pos).copied() {
                let seg = &self.segments[x.cache_seg_id as usize];
                if x.seg_gen < seg.gen {
                    self.index.remove(x.off);
                    continue;
                }
                let n = (x.end().min(end) - pos) as usize;
                let seg_off = x.cache_seg_off + (pos - x.off) as u32;
                pmem.read(data_pos(seg.pseg, seg_off), &mut buf[at..at + n])?;
                pos += n as u64;
                continue;
            }
            let next = self.index.next_at_or_after(pos).map_or(end, |x| x.off);
            let gap_end = next.min(end).min(pos + to_subtree_end(pos));
            let n = (gap_end - pos) as usize;
            backing.read(pos / SECTOR_SIZE, &mut buf[at..at + n])?;
            self.miss_fill(pmem, hooks, pos, &buf[at..at + n])?;
            pos = gap_end;
        }
        Ok(())
    }

    /// Caches what a miss read from the backing device as a CLEAN key (never
    /// force-closed). No space is not an error: the read has its data.
    fn miss_fill<P: Pmem + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        hooks: &mut H,
        off: u64,
        data: &[u8],
    ) -> Result<(), IoError> {
        match self.write_key(pmem, hooks, off, data, true, false) {
            Ok(_) | Err(IoError::CacheFull | IoError::Log { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// An empty FLUSH (`docs/format.md` §9.6): closes the open key-set, so every write
    /// completed before it is durable.
    pub fn flush<P: Pmem + ?Sized, H: Hooks + ?Sized>(
        &mut self,
        pmem: &mut P,
        hooks: &mut H,
    ) -> Result<(), IoError> {
        Ok(self.close_kset(pmem, hooks)?)
    }
}
