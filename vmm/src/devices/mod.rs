//! Devices and the MMIO bus that routes guest MMIO exits to them.
//!
//! Port I/O is few fixed ports (COM1 and the protocol's ports) and is decoded
//! directly in the vCPU loop; MMIO goes through [`MmioBus`], which owns the
//! virtio-mmio transports, one per window of the protocol's virtio area.

pub mod serial;
pub mod virtio;

/// A device on the MMIO bus. Offsets are relative to the device's window.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

impl MmioDevice for virtio::MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        virtio::MmioTransport::read(self, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        virtio::MmioTransport::write(self, offset, data)
    }
}

/// Non-overlapping address ranges, each owned by one device.
#[derive(Default)]
pub struct MmioBus {
    ranges: Vec<(u64, u64, Box<dyn MmioDevice>)>,
    /// Every claimed write, in order, while recording (see [`MmioBus::record_writes`]).
    log: Option<Vec<(u64, Vec<u8>)>>,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.ranges.iter().map(|(b, s, _)| (*b, *s)).collect();
        f.debug_struct("MmioBus").field("ranges", &ranges).finish()
    }
}

/// A device range overlaps one already on the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("MMIO range {base:#x}+{size:#x} overlaps another device")]
pub struct Overlap {
    pub base: u64,
    pub size: u64,
}

impl MmioBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a device at `[base, base + size)`.
    pub fn insert(
        &mut self,
        base: u64,
        size: u64,
        dev: Box<dyn MmioDevice>,
    ) -> Result<(), Overlap> {
        let end = base.checked_add(size).ok_or(Overlap { base, size })?;
        if size == 0 || self.ranges.iter().any(|(b, s, _)| base < b + s && *b < end) {
            return Err(Overlap { base, size });
        }
        self.ranges.push((base, size, dev));
        Ok(())
    }

    fn find(&mut self, addr: u64, len: usize) -> Option<(u64, &mut Box<dyn MmioDevice>)> {
        self.ranges.iter_mut().find_map(|(b, s, d)| {
            let off = addr.checked_sub(*b)?;
            (off.checked_add(len as u64)? <= *s).then_some((off, d))
        })
    }

    /// Dispatches a read; `false` when no device claims the whole access.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, d)) => {
                d.read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; `false` when no device claims the whole access.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, d)) => {
                d.write(off, data);
                if let Some(log) = &mut self.log {
                    log.push((addr, data.to_vec()));
                }
                true
            }
            None => false,
        }
    }

    /// Starts recording every claimed write. The fork-server (`crate::fork`)
    /// replays a driver's initialisation into fresh devices this way: reads
    /// change no device state, so the writes alone rebuild it.
    pub fn record_writes(&mut self) {
        self.log = Some(Vec::new());
    }

    /// The writes recorded so far (empty when not recording); recording stops.
    pub fn take_writes(&mut self) -> Vec<(u64, Vec<u8>)> {
        self.log.take().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;
    struct Probe(Log);
    impl MmioDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn bus_routes_by_range_and_rejects_overlaps_and_straddles() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x100, Box::new(Probe(log.clone())))
            .unwrap();
        bus.insert(0x1100, 0x100, Box::new(Probe(log.clone())))
            .unwrap();
        assert!(bus.insert(0x10ff, 2, Box::new(Probe(log.clone()))).is_err());
        assert!(bus
            .insert(u64::MAX, 2, Box::new(Probe(log.clone())))
            .is_err());
        let mut b = [0u8; 4];
        assert!(bus.read(0x1104, &mut b));
        assert_eq!(b, [4; 4]);
        assert!(bus.write(0x1070, &[1, 2]));
        assert!(!bus.write(0x10fe, &[1, 2, 3, 4]), "straddles two windows");
        assert!(!bus.read(0x2000, &mut b));
        assert!(!bus.read(u64::MAX - 1, &mut b));
        assert_eq!(*log.lock().unwrap(), vec![(0x70, vec![1, 2])]);
    }
}
