//! The VMM's trace file form (`vmm/src/trace.rs`, `PCTRACE1`), for the
//! events this plugin makes: pmem stores (tag 1), pmem barriers (tag 2, the
//! VMM's completed virtio-pmem flush; here a store fence or a flush request),
//! markers (tag 5). The interop crate decodes these files with the VMM's own
//! decoder (its tests check it), so the scenarios' persistence models read them.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// `len` bytes (1..=8) at `off` of the device, zero-extended little-endian.
    Store {
        off: u64,
        len: u8,
        value: u64,
    },
    Flush,
    Marker(u32),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceFile {
    events: Vec<Event>,
}

impl TraceFile {
    pub fn push(&mut self, e: Event) {
        self.events.push(e);
    }

    /// A store of `bytes` (1..=8) at `off`.
    pub fn push_store(&mut self, off: u64, bytes: &[u8]) {
        assert!(
            (1..=8).contains(&bytes.len()),
            "a store piece is 1..=8 bytes"
        );
        let mut v = [0u8; 8];
        v[..bytes.len()].copy_from_slice(bytes);
        self.push(Event::Store {
            off,
            len: bytes.len() as u8,
            value: u64::from_le_bytes(v),
        });
    }

    pub fn events(&self) -> &[Event] {
        &self.events
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.events.len() * 18);
        out.extend_from_slice(b"PCTRACE1");
        out.extend_from_slice(&(self.events.len() as u64).to_le_bytes());
        for e in &self.events {
            match *e {
                Event::Store { off, len, value } => {
                    out.push(1);
                    out.extend_from_slice(&off.to_le_bytes());
                    out.push(len);
                    out.extend_from_slice(&value.to_le_bytes());
                }
                Event::Flush => out.push(2),
                Event::Marker(id) => {
                    out.push(5);
                    out.extend_from_slice(&id.to_le_bytes());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_is_the_vmms() {
        let mut t = TraceFile::default();
        t.push(Event::Marker(0x102));
        t.push_store(0x1000, &0x1122_3344_5566_7788u64.to_le_bytes());
        t.push_store(0x2004, &[0xab, 0xcd]);
        t.push(Event::Flush);
        let b = t.encode();
        // The same bytes vmm/src/trace.rs's own test pins for these events.
        assert_eq!(&b[..8], b"PCTRACE1");
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 4);
        assert_eq!(&b[16..21], &[5, 0x02, 0x01, 0, 0]);
        assert_eq!(b[21], 1);
        assert_eq!(&b[22..30], &0x1000u64.to_le_bytes());
        assert_eq!(b[30], 8);
        assert_eq!(&b[31..39], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(
            &b[39..57],
            &[1, 4, 0x20, 0, 0, 0, 0, 0, 0, 2, 0xab, 0xcd, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(b[57..], [2]);
    }
}
