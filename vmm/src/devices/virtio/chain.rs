//! Splitting a descriptor chain into its device-readable and device-writable
//! buffers, with the checks every request needs, and copying bytes in and out
//! of those buffers.
//!
//! The walk itself is virtio-queue's `DescriptorChain` iterator. It stops
//! silently (returns `None`) on a loop or a chain longer than the queue (its
//! TTL), on a `next` index outside the table, on a bad indirect table and on a
//! chain whose lengths overflow 2^32; in all these cases the last descriptor it
//! yielded still has `VIRTQ_DESC_F_NEXT` set, which is how they are detected
//! here. It does not check that buffers lie in guest memory, nor the order of
//! readable and writable descriptors: that is done here.

use std::ops::Deref;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{DeviceError, GuestMem};

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A list of guest buffers seen as one byte string.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Bufs(pub Vec<Buf>);

impl Bufs {
    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|b| u64::from(b.len)).sum()
    }

    /// Visits the guest ranges covering `[offset, offset + len)` of the byte
    /// string. Returns false if that range is not entirely inside it.
    fn ranges(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(GuestAddress, usize) -> bool,
    ) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        if end > self.len() {
            return false;
        }
        let mut pos = 0u64;
        let mut cur = offset;
        for b in &self.0 {
            let b_end = pos + u64::from(b.len);
            if cur < end && cur < b_end {
                let start_in = cur - pos;
                let n = (b_end.min(end) - cur) as usize;
                let Some(addr) = b.addr.0.checked_add(start_in) else {
                    return false;
                };
                if !f(GuestAddress(addr), n) {
                    return false;
                }
                cur += n as u64;
            }
            pos = b_end;
        }
        true
    }

    /// Reads `buf.len()` bytes starting at byte `offset`.
    pub fn read(&self, mem: &GuestMem, offset: u64, buf: &mut [u8]) -> bool {
        let mut done = 0usize;
        self.ranges(offset, buf.len() as u64, |addr, n| {
            let ok = mem.read_slice(&mut buf[done..done + n], addr).is_ok();
            done += n;
            ok
        })
    }

    /// Writes `data` starting at byte `offset`.
    pub fn write(&self, mem: &GuestMem, offset: u64, data: &[u8]) -> bool {
        let mut done = 0usize;
        self.ranges(offset, data.len() as u64, |addr, n| {
            let ok = mem.write_slice(&data[done..done + n], addr).is_ok();
            done += n;
            ok
        })
    }

    /// True if bytes `[offset, offset + len)` exist and lie in guest memory.
    pub fn check(&self, mem: &GuestMem, offset: u64, len: u64) -> bool {
        self.ranges(offset, len, |addr, n| {
            GuestMemoryBackend::check_range(mem, addr, n)
        })
    }

    /// True if every buffer lies entirely in guest memory.
    pub fn in_memory(&self, mem: &GuestMem) -> bool {
        self.0
            .iter()
            .all(|b| GuestMemoryBackend::check_range(mem, b.addr, b.len as usize))
    }
}

/// A chain split into buffers, with what was found wrong with it.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub head: u16,
    /// Device-readable buffers before the first writable one.
    pub readable: Bufs,
    /// Device-writable buffers (readable ones after the first writable one
    /// are dropped and flagged in `misordered`).
    pub writable: Bufs,
    /// A readable descriptor came after a writable one.
    pub misordered: bool,
    /// The last descriptor of the chain is writable (it holds the status).
    pub ends_writable: bool,
}

impl Request {
    /// Walks `chain` and classifies its descriptors.
    ///
    /// Errors are the cases where the chain has no well-defined end, so no
    /// status can be written: the device needs a reset.
    pub fn parse<M>(chain: DescriptorChain<M>) -> Result<Self, DeviceError>
    where
        M: Deref<Target = GuestMem>,
    {
        let head = chain.head_index();
        let mut req = Request {
            head,
            readable: Bufs::default(),
            writable: Bufs::default(),
            misordered: false,
            ends_writable: false,
        };
        let mut last = None;
        for desc in chain {
            let buf = Buf {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                req.writable.0.push(buf);
            } else if req.writable.0.is_empty() {
                req.readable.0.push(buf);
            } else {
                // Left out of both lists: the request fails, and the status
                // byte (last) or response (first writable bytes) must not
                // land in a device-readable buffer.
                req.misordered = true;
            }
            last = Some(desc);
        }
        match last {
            None => Err(DeviceError::EmptyChain(head)),
            Some(d) if d.has_next() => Err(DeviceError::Unterminated(head)),
            Some(d) => {
                req.ends_writable = d.is_write_only();
                Ok(req)
            }
        }
    }

    /// True if every buffer lies in guest memory.
    pub fn in_memory(&self, mem: &GuestMem) -> bool {
        self.readable.in_memory(mem) && self.writable.in_memory(mem)
    }
}

/// Pops every available chain, parses it, lets `handle` complete it and puts
/// it in the used ring. Stops at the first chain that cannot be completed.
pub(crate) fn process_chains(
    mem: &GuestMem,
    queue: &mut Queue,
    mut handle: impl FnMut(&GuestMem, &Request) -> Result<u32, DeviceError>,
) -> Result<bool, DeviceError> {
    let mut used = false;
    loop {
        let chain = match queue.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => return Err(DeviceError::AvailRing(e)),
        };
        let Some(chain) = chain else {
            return Ok(used);
        };
        let req = Request::parse(chain)?;
        let len = handle(mem, &req)?;
        queue
            .add_used(mem, req.head, len)
            .map_err(DeviceError::UsedRing)?;
        used = true;
    }
}

/// Copies config bytes at `offset` into `data`; bytes past the end read as 0.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}
