//! Test helpers: guest memory, a driver-side view of a split queue (on top
//! of virtio-queue's `MockSplitQueue`) and backend/observer doubles.

use std::io;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BlockBackend, GuestMem, IoObserver, PmemBackend};
use crate::faults::BlkRequest;

/// Guest memory size used by the tests: 1 MiB at address 0.
pub const MEM_SIZE: u64 = 0x10_0000;
/// Where test data buffers start (the queue lives below).
pub const DATA: u64 = 0x1_0000;

pub fn mem() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// One descriptor as a test writes it: address, length, writable.
#[derive(Clone, Copy, Debug)]
pub struct D(pub u64, pub u32, pub bool);

/// Guest addresses of the test queue's parts (room for 256 entries each).
pub const DESC_ADDR: u64 = 0x0;
pub const AVAIL_ADDR: u64 = 0x1000;
pub const USED_ADDR: u64 = 0x2000;

/// Driver side of a split queue, built from virtio-queue's mock parts.
///
/// `MockSplitQueue` itself is not used: in virtio-queue 0.18 it places the
/// used ring `len` bytes after the available ring's entries start (its
/// `SplitQueueRing::end` adds an element count, not bytes), so the two rings
/// overlap as soon as a few requests are in flight.
pub struct Driver<'a> {
    desc: DescriptorTable<'a, GuestMem>,
    avail: AvailRing<'a, GuestMem>,
    used: UsedRing<'a, GuestMem>,
    next_desc: u16,
    size: u16,
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a GuestMem, size: u16) -> Self {
        assert!(size <= 256);
        Self {
            desc: DescriptorTable::new(mem, GuestAddress(DESC_ADDR), size),
            avail: AvailRing::new(mem, GuestAddress(AVAIL_ADDR), size),
            used: UsedRing::new(mem, GuestAddress(USED_ADDR), size),
            next_desc: 0,
            size,
        }
    }

    /// A ready `Queue` on this ring, as the transport would set it up.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.try_set_size(self.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC_ADDR))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL_ADDR))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(USED_ADDR))
            .unwrap();
        q.set_ready(true);
        q
    }

    /// Sets the available ring's flags (e.g. `VRING_AVAIL_F_NO_INTERRUPT`).
    pub fn set_avail_flags(&self, mem: &GuestMem, flags: u16) {
        mem.write_obj(flags, GuestAddress(AVAIL_ADDR)).unwrap();
    }

    /// Sets the available ring's index directly.
    pub fn set_avail_idx(&self, idx: u16) {
        self.avail.idx().store(idx);
    }

    /// Stores raw descriptors at consecutive table slots (flags and next as
    /// given) and returns the first slot.
    pub fn store_raw(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let first = self.next_desc;
        for &(addr, len, flags, next) in descs {
            let d = Descriptor::new(addr, len, flags, next);
            self.desc
                .store(self.next_desc, RawDescriptor::from(d))
                .unwrap();
            self.next_desc = (self.next_desc + 1) % self.size;
        }
        first
    }

    /// Makes `head` available.
    pub fn publish(&mut self, head: u16) {
        let idx = self.avail.idx().load();
        self.avail
            .ring()
            .ref_at((idx % self.size) as usize)
            .unwrap()
            .store(head);
        self.avail.idx().store(idx.wrapping_add(1));
    }

    /// Stores a properly linked chain and makes it available.
    pub fn add(&mut self, descs: &[D]) -> u16 {
        let first = self.next_desc;
        let raw: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut flags = if d.2 { VRING_DESC_F_WRITE as u16 } else { 0 };
                let mut next = 0;
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                    next = (first + i as u16 + 1) % self.size;
                }
                (d.0, d.1, flags, next)
            })
            .collect();
        let head = self.store_raw(&raw);
        self.publish(head);
        head
    }

    /// Number of used entries.
    pub fn used_idx(&self) -> u16 {
        self.used.idx().load()
    }

    /// Used entry `i`: (descriptor head id, length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let e = self
            .used
            .ring()
            .ref_at((i % self.size) as usize)
            .unwrap()
            .load();
        (e.id(), e.len())
    }
}

/// What an observer saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    BlkWrite(u64, Vec<u8>),
    BlkFlush,
    PmemFlush,
    /// A request failed by the fault plan: kind, its count, a write's sector.
    BlkFault(BlkRequest, u64, Option<u64>),
}

/// Records observer calls into a shared list (events from backends go to
/// the same list so their order can be checked).
#[derive(Clone, Default)]
pub struct Recorder(pub Arc<Mutex<Vec<Event>>>);

impl Recorder {
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }
}

impl IoObserver for Recorder {
    fn blk_write(&mut self, sector: u64, data: &[u8]) {
        self.0
            .lock()
            .unwrap()
            .push(Event::BlkWrite(sector, data.to_vec()));
    }
    fn blk_flush(&mut self) {
        self.0.lock().unwrap().push(Event::BlkFlush);
    }
    fn pmem_flush(&mut self) {
        self.0.lock().unwrap().push(Event::PmemFlush);
    }
    fn blk_fault(&mut self, kind: BlkRequest, nth: u64, sector: Option<u64>) {
        self.0
            .lock()
            .unwrap()
            .push(Event::BlkFault(kind, nth, sector));
    }
}

/// A block backend in memory. `log` records "backend" events so tests can
/// check that the observer is called after the backend.
#[derive(Clone)]
pub struct MemDisk {
    pub data: Arc<Mutex<Vec<u8>>>,
    pub flushes: Arc<Mutex<u32>>,
    pub fail: bool,
    pub log: Option<Arc<Mutex<Vec<&'static str>>>>,
}

impl MemDisk {
    pub fn new(size: usize) -> Self {
        Self {
            data: Arc::new(Mutex::new((0..size).map(|i| (i % 251) as u8).collect())),
            flushes: Arc::new(Mutex::new(0)),
            fail: false,
            log: None,
        }
    }
    fn note(&self, what: &'static str) {
        if let Some(l) = &self.log {
            l.lock().unwrap().push(what);
        }
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.fail {
            return Err(io::Error::other("injected read error"));
        }
        let d = self.data.lock().unwrap();
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.fail {
            return Err(io::Error::other("injected write error"));
        }
        let mut d = self.data.lock().unwrap();
        let o = offset as usize;
        d[o..o + buf.len()].copy_from_slice(buf);
        self.note("write");
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.fail {
            return Err(io::Error::other("injected flush error"));
        }
        *self.flushes.lock().unwrap() += 1;
        self.note("flush");
        Ok(())
    }
}

/// A pmem backend double: counts flushes, fails on request, and notes each
/// flush in `log` so its order against the observer can be checked.
#[derive(Clone, Default)]
pub struct FakePmem {
    pub flushes: Arc<Mutex<u32>>,
    pub fail: bool,
    pub log: Option<Arc<Mutex<Vec<&'static str>>>>,
}

impl PmemBackend for FakePmem {
    fn flush(&mut self) -> io::Result<()> {
        if self.fail {
            return Err(io::Error::other("injected msync error"));
        }
        *self.flushes.lock().unwrap() += 1;
        if let Some(l) = &self.log {
            l.lock().unwrap().push("backend flush");
        }
        Ok(())
    }
}

/// An observer that appends to a plain string log (to interleave with
/// backend notes).
pub struct LogObserver(pub Arc<Mutex<Vec<&'static str>>>);

impl IoObserver for LogObserver {
    fn blk_write(&mut self, _: u64, _: &[u8]) {
        self.0.lock().unwrap().push("observe write");
    }
    fn blk_flush(&mut self) {
        self.0.lock().unwrap().push("observe flush");
    }
    fn pmem_flush(&mut self) {
        self.0.lock().unwrap().push("observe pmem flush");
    }
}
