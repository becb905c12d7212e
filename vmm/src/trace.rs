//! The persistence trace: one ordered log of everything that can reach
//! durable media while tracing is on — pmem stores, virtio-pmem flushes,
//! virtio-blk writes and flushes — plus the guest's markers.
//!
//! An event's sequence number is its index in the trace; "trace position N"
//! means "after the first N events". Tracing is switched on and off by the
//! protocol's control markers ([`protocol::MARKER_TRACE_ON`],
//! [`protocol::MARKER_TRACE_OFF`]) or from the start of a run.
//!
//! # File encoding (`trace.bin`)
//! Little-endian. Magic `b"PCTRACE1"`, then a u64 event count, then each event
//! as a tag byte and its fields:
//! * 1 pmem store: offset u64, len u8 (1..=8), value u64 (the stored bytes,
//!   zero-extended)
//! * 2 pmem flush
//! * 3 blk write: sector u64, len u32 (a multiple of 512), then `len` bytes
//! * 4 blk flush
//! * 5 marker: id u32

use std::io;

use persist::{Domain, Role};
use serde::{Deserialize, Serialize};

/// One event of the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A guest store of `len` bytes (1..=8) at byte `offset` of the pmem region.
    PmemStore { offset: u64, len: u8, value: u64 },
    /// A virtio-pmem flush completed: every earlier pmem store is durable.
    PmemFlush,
    /// A virtio-blk write of `len` bytes at 512-byte `sector`; the data is in
    /// the trace's data area at `data`.
    BlkWrite { sector: u64, len: u32, data: u64 },
    /// A virtio-blk flush completed: every earlier disk write is durable.
    /// A flush failed by the fault plan is not recorded (it is no barrier).
    BlkFlush,
    /// A guest marker (a scenario's named point).
    Marker { id: u32 },
}

impl persist::Persistence for Event {
    fn role(&self) -> Role {
        match self {
            Event::PmemStore { .. } => Role::Write(Domain::Pmem),
            Event::BlkWrite { .. } => Role::Write(Domain::Disk),
            Event::PmemFlush => Role::Barrier(Domain::Pmem),
            Event::BlkFlush => Role::Barrier(Domain::Disk),
            Event::Marker { .. } => Role::Neither,
        }
    }
}

impl Event {
    /// A write (pmem store or blk write), as opposed to a flush or a marker.
    pub fn is_write(&self) -> bool {
        matches!(self, Event::PmemStore { .. } | Event::BlkWrite { .. })
    }
}

/// Errors decoding a trace file.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("not a trace file (bad magic)")]
    BadMagic,
    #[error("trace file ends early")]
    Truncated,
    #[error("trace file has an unknown event tag {0} at event {1}")]
    BadTag(u8, u64),
    #[error("trace file has an invalid event at {0}: {1}")]
    BadEvent(u64, &'static str),
    #[error("trace file has {0} bytes after its last event")]
    Trailing(usize),
}

const MAGIC: &[u8; 8] = b"PCTRACE1";
/// Largest blk write accepted from a trace file (the device never makes one larger).
const MAX_BLK_WRITE: u32 = 64 << 20;

/// The ordered event log of one tracing window.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Trace {
    events: Vec<Event>,
    data: Vec<u8>,
}

impl Trace {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn events(&self) -> &[Event] {
        &self.events
    }

    pub fn get(&self, seq: u64) -> Option<&Event> {
        self.events.get(usize::try_from(seq).ok()?)
    }

    /// Appends a pmem store of `data` (1..=8 bytes); returns its sequence number.
    pub fn push_pmem_store(&mut self, offset: u64, data: &[u8]) -> u64 {
        debug_assert!((1..=8).contains(&data.len()));
        let mut v = [0u8; 8];
        v[..data.len()].copy_from_slice(data);
        self.push(Event::PmemStore {
            offset,
            len: data.len() as u8,
            value: u64::from_le_bytes(v),
        })
    }

    pub fn push_blk_write(&mut self, sector: u64, data: &[u8]) -> u64 {
        let at = self.data.len() as u64;
        self.data.extend_from_slice(data);
        self.push(Event::BlkWrite {
            sector,
            len: data.len() as u32,
            data: at,
        })
    }

    pub fn push(&mut self, e: Event) -> u64 {
        self.events.push(e);
        self.events.len() as u64 - 1
    }

    /// The bytes of a blk write event (empty for any other event).
    pub fn blk_data(&self, e: &Event) -> &[u8] {
        match *e {
            Event::BlkWrite { len, data, .. } => {
                &self.data[data as usize..data as usize + len as usize]
            }
            _ => &[],
        }
    }

    /// The bytes of a pmem store event (empty for any other event).
    pub fn store_bytes(e: &Event) -> Vec<u8> {
        match *e {
            Event::PmemStore { len, value, .. } => value.to_le_bytes()[..len as usize].to_vec(),
            _ => Vec::new(),
        }
    }

    /// Writes still pending (not yet durable) at trace position `cut`: the
    /// pmem stores after the last pmem flush before `cut`, and the blk writes
    /// after the last blk flush before `cut`, in trace order (the shared rule,
    /// [`persist::pending_all`]).
    pub fn pending_at(&self, cut: u64) -> Vec<u64> {
        let cut = usize::try_from(cut).unwrap_or(usize::MAX);
        persist::pending_all(&self.events, cut)
            .into_iter()
            .map(|i| i as u64)
            .collect()
    }

    /// Sequence number of the first marker with `id`, if any.
    pub fn find_marker(&self, id: u32) -> Option<u64> {
        self.events
            .iter()
            .position(|e| *e == Event::Marker { id })
            .map(|i| i as u64)
    }

    /// Encodes the trace in the file format described in the module docs.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.events.len() * 18 + self.data.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.events.len() as u64).to_le_bytes());
        for e in &self.events {
            match *e {
                Event::PmemStore { offset, len, value } => {
                    out.push(1);
                    out.extend_from_slice(&offset.to_le_bytes());
                    out.push(len);
                    out.extend_from_slice(&value.to_le_bytes());
                }
                Event::PmemFlush => out.push(2),
                Event::BlkWrite { sector, len, .. } => {
                    out.push(3);
                    out.extend_from_slice(&sector.to_le_bytes());
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(self.blk_data(e));
                }
                Event::BlkFlush => out.push(4),
                Event::Marker { id } => {
                    out.push(5);
                    out.extend_from_slice(&id.to_le_bytes());
                }
            }
        }
        out
    }

    /// Decodes a trace file, validating every field.
    pub fn decode(bytes: &[u8]) -> Result<Self, TraceError> {
        let mut r = Reader { b: bytes };
        if r.take(8)? != MAGIC {
            return Err(TraceError::BadMagic);
        }
        let count = r.u64()?;
        let mut t = Trace::new();
        for seq in 0..count {
            match r.u8()? {
                1 => {
                    let offset = r.u64()?;
                    let len = r.u8()?;
                    let value = r.u64()?;
                    if !(1..=8).contains(&len) {
                        return Err(TraceError::BadEvent(seq, "pmem store length not in 1..=8"));
                    }
                    if len < 8 && value >> (len * 8) != 0 {
                        return Err(TraceError::BadEvent(
                            seq,
                            "pmem store value wider than its length",
                        ));
                    }
                    t.push(Event::PmemStore { offset, len, value });
                }
                2 => {
                    t.push(Event::PmemFlush);
                }
                3 => {
                    let sector = r.u64()?;
                    let len = r.u32()?;
                    if len == 0 || len % 512 != 0 || len > MAX_BLK_WRITE {
                        return Err(TraceError::BadEvent(seq, "blk write length"));
                    }
                    let data = r.take(len as usize)?;
                    t.push_blk_write(sector, data);
                }
                4 => {
                    t.push(Event::BlkFlush);
                }
                5 => {
                    let id = r.u32()?;
                    t.push(Event::Marker { id });
                }
                tag => return Err(TraceError::BadTag(tag, seq)),
            }
        }
        if !r.b.is_empty() {
            return Err(TraceError::Trailing(r.b.len()));
        }
        Ok(t)
    }

    /// Writes the encoded trace to a file.
    pub fn write_file(&self, path: &std::path::Path) -> io::Result<()> {
        std::fs::write(path, self.encode())
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TraceError> {
        if self.b.len() < n {
            return Err(TraceError::Truncated);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, TraceError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, TraceError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, TraceError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Trace {
        let mut t = Trace::new();
        t.push(Event::Marker { id: 0x102 });
        t.push_pmem_store(0x1000, &0x1122_3344_5566_7788u64.to_le_bytes());
        t.push_pmem_store(0x2004, &[0xab, 0xcd]);
        t.push(Event::PmemFlush);
        t.push_blk_write(7, &[0x5a; 1024]);
        t.push_pmem_store(0x3000, &[1]);
        t.push(Event::BlkFlush);
        t.push_blk_write(9, &[0x11; 512]);
        t.push(Event::Marker { id: 0x103 });
        t
    }

    #[test]
    fn encoding_round_trips_and_is_little_endian() {
        let t = sample();
        let b = t.encode();
        assert_eq!(&b[..8], b"PCTRACE1");
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 9);
        // First event: marker 0x102.
        assert_eq!(&b[16..21], &[5, 0x02, 0x01, 0, 0]);
        // Second: store at 0x1000, len 8.
        assert_eq!(b[21], 1);
        assert_eq!(&b[22..30], &0x1000u64.to_le_bytes());
        assert_eq!(b[30], 8);
        assert_eq!(&b[31..39], &0x1122_3344_5566_7788u64.to_le_bytes());
        let back = Trace::decode(&b).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.blk_data(&back.events()[4]), &[0x5a; 1024][..]);
        assert_eq!(
            Trace::store_bytes(&back.events()[2]),
            vec![0xab, 0xcd],
            "short stores keep their width"
        );
    }

    #[test]
    fn damaged_files_are_rejected() {
        let b = sample().encode();
        assert!(matches!(Trace::decode(&b[..7]), Err(TraceError::Truncated)));
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(matches!(Trace::decode(&bad), Err(TraceError::BadMagic)));
        for cut in 16..b.len() {
            assert!(Trace::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = b.clone();
        bad[16] = 9;
        assert!(matches!(Trace::decode(&bad), Err(TraceError::BadTag(9, 0))));
        let mut bad = b.clone();
        bad[30] = 9; // store length 9
        assert!(matches!(
            Trace::decode(&bad),
            Err(TraceError::BadEvent(1, _))
        ));
        let mut bad = b.clone();
        bad.push(0);
        assert!(matches!(Trace::decode(&bad), Err(TraceError::Trailing(1))));
    }

    #[test]
    fn pending_writes_follow_the_last_flush_of_their_device() {
        let t = sample();
        assert_eq!(t.pending_at(0), Vec::<u64>::new());
        assert_eq!(t.pending_at(3), vec![1, 2]);
        assert_eq!(t.pending_at(4), Vec::<u64>::new());
        assert_eq!(t.pending_at(6), vec![4, 5]);
        assert_eq!(t.pending_at(7), vec![5]);
        assert_eq!(t.pending_at(9), vec![5, 7]);
        assert_eq!(t.pending_at(100), vec![5, 7]);
        assert_eq!(t.find_marker(0x103), Some(8));
        assert_eq!(t.find_marker(0x999), None);
    }
}
