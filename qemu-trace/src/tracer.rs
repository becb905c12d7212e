//! The plugin's state machine, free of QEMU: it is fed the guest's stores
//! (physical address as QEMU 7.2 reports it, size, I/O or RAM) and the
//! fences and write-backs it executes, and keeps one trace per traced device.
//!
//! # Addresses
//! For RAM, QEMU 7.2's `qemu_plugin_hwaddr_phys_addr` returns the RAM
//! block's offset in QEMU's own RAM address space plus the offset in the
//! block plus the memory region's address in its *container*, not the guest
//! physical address (a later QEMU fixed it). For a virtio-pmem device that
//! is `C + offset in the file`, with a constant `C` per device that nothing
//! in the guest can tell. So each device is *calibrated*: between two
//! markers the guest rewrites one known sector of it with its own content
//! (the image does not change), and the stores the plugin sees there give
//! `C`. For I/O regions the address is the guest physical address.
//!
//! # Markers
//! The guest's script writes a 32-byte record (padded to a sector) to a
//! small dedicated virtio-pmem device with `dd oflag=direct` (the pmem
//! driver copies it with ascending 8-byte non-temporal stores):
//! `b"PCTMARK1"`, kind u32, device u32, arg u64, arg2 u64, seq u64
//! (little-endian). A record whose seq is the last one's is not new (QEMU
//! may report a store twice; the guest numbers its records).
//! The marker device itself is found by its content: the first 8-byte
//! store at a sector-aligned address after which its file starts with the
//! magic is the record's first store, so its address is the device's `C`.
//! The store covering byte 39 completes a record.
//!
//! # Values
//! QEMU 7.2's memory callback has no value; it runs after the access (TCG
//! emits the callback after the guest store; the known-workload test checks
//! it), so the value is read from the device's backing file, which QEMU maps
//! shared: the page cache holds the guest's bytes.

use crate::decode::Kind;
use crate::encode::{Event, TraceFile};

pub const MAGIC: &[u8; 8] = b"PCTMARK1";
/// Bytes of a marker record.
pub const RECORD: u64 = 40;
pub const SECTOR: u64 = 512;

/// Marker kinds.
pub const CAL_BEGIN: u32 = 1;
pub const CAL_END: u32 = 2;
pub const TRACE_ON: u32 = 3;
pub const TRACE_OFF: u32 = 4;
pub const STEP: u32 = 5;

/// QEMU's virtio-pci (modern) layout of the capability BAR: the notify
/// area is its fourth 4 KiB page. A store there is a request to the
/// device; virtio-pmem's only queue carries flush requests.
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_LEN: u64 = 0x1000;

/// Something that holds a device's bytes (the shared backing file).
pub trait Backing {
    fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()>;
    fn size(&self) -> u64;
}

impl Backing for std::fs::File {
    fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, off)
    }
    fn size(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }
}

/// One traced device.
#[derive(Debug)]
pub struct Device<B> {
    pub backing: B,
    /// `C`: QEMU's address of the file's byte 0 (once calibrated).
    pub base: Option<u64>,
    /// The guest physical address of the notify area.
    pub notify: Option<u64>,
}

#[derive(Debug)]
struct Calibration {
    device: usize,
    sector: u64,
    min: u64,
    max: u64,
    bytes: u64,
}

/// Counts of one traced window (the `.json` beside each trace).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub stores: u64,
    pub bytes: u64,
    pub sfence: u64,
    pub mfence: u64,
    pub clwb: u64,
    pub clflush: u64,
    pub clflushopt: u64,
    pub flush_requests: u64,
    /// Barriers written (fences and flush requests after at least one store).
    pub barriers: u64,
}

/// A cache-line write-back: where it ran and how many trace events preceded
/// it. Its target address is not known: QEMU 7.2's API reads no registers,
/// and TCG translates these instructions to no memory access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteBack {
    pub kind: Kind,
    pub pc: u64,
    pub position: u64,
}

/// A finished window, ready to be written.
#[derive(Debug)]
pub struct Window {
    pub device: usize,
    pub trace: TraceFile,
    pub counts: Counts,
    pub write_backs: Vec<WriteBack>,
    pub base: u64,
}

#[derive(Debug)]
pub struct Tracer<B> {
    /// Addresses below this are the machine's main RAM (block offset 0,
    /// region address 0): never a device's.
    ram: u64,
    marker: Device<B>,
    pub devices: Vec<Device<B>>,
    cal: Option<Calibration>,
    active: Option<usize>,
    trace: TraceFile,
    counts: Counts,
    write_backs: Vec<WriteBack>,
    stores_since_barrier: u64,
    pub errors: Vec<String>,
    /// RAM stores outside main RAM and every device (ROM shadows, VGA).
    pub other_stores: u64,
    pub markers: u64,
    last_seq: Option<u64>,
}

/// At most this many write-backs are listed per window (the counts are whole).
const MAX_WRITE_BACKS: usize = 100_000;

impl<B: Backing> Tracer<B> {
    pub fn new(ram: u64, marker: B, devices: Vec<B>) -> Self {
        Tracer {
            ram,
            marker: Device {
                backing: marker,
                base: None,
                notify: None,
            },
            devices: devices
                .into_iter()
                .map(|backing| Device {
                    backing,
                    base: None,
                    notify: None,
                })
                .collect(),
            cal: None,
            active: None,
            trace: TraceFile::default(),
            counts: Counts::default(),
            write_backs: Vec::new(),
            stores_since_barrier: 0,
            errors: Vec::new(),
            other_stores: 0,
            markers: 0,
            last_seq: None,
        }
    }

    pub fn marker_base(&self) -> Option<u64> {
        self.marker.base
    }

    fn error(&mut self, msg: String) {
        eprintln!("@@QTRACE-ERROR {msg}");
        self.errors.push(msg);
    }

    fn barrier(&mut self) {
        if self.stores_since_barrier > 0 {
            self.trace.push(Event::Flush);
            self.counts.barriers += 1;
            self.stores_since_barrier = 0;
        }
    }

    /// A guest store of `size` bytes at `addr` (after the access). Returns a
    /// finished window when the store completed a TRACE_OFF record.
    pub fn store(&mut self, addr: u64, size: u64, io: bool) -> Option<Window> {
        if io {
            if let Some(d) = self.active {
                if let Some(n) = self.devices[d].notify {
                    if (n..n + NOTIFY_LEN).contains(&addr) {
                        self.counts.flush_requests += 1;
                        self.barrier();
                    }
                }
            }
            return None;
        }
        if addr < self.ram {
            return None;
        }
        if self.marker.base.is_none() && size == 8 && addr.is_multiple_of(SECTOR) {
            let mut m = [0u8; 8];
            if self.marker.backing.read(0, &mut m).is_ok() && &m == MAGIC {
                self.marker.base = Some(addr);
            }
        }
        if let Some(mb) = self.marker.base {
            if (mb..mb + self.marker.backing.size()).contains(&addr) {
                let off = addr - mb;
                if off < RECORD && off + size >= RECORD {
                    return self.record();
                }
                return None;
            }
        }
        if let Some(c) = &mut self.cal {
            c.min = c.min.min(addr);
            c.max = c.max.max(addr + size);
            c.bytes += size;
            return None;
        }
        if let Some(d) = self.active {
            if let Some(base) = self.devices[d].base {
                let dev_size = self.devices[d].backing.size();
                if (base..base + dev_size).contains(&addr) {
                    self.traced_store(d, addr - base, size);
                    return None;
                }
            }
        }
        self.other_stores += 1;
        None
    }

    fn traced_store(&mut self, d: usize, off: u64, size: u64) {
        let mut buf = vec![0u8; size as usize];
        if let Err(e) = self.devices[d].backing.read(off, &mut buf) {
            self.error(format!("device {d}: reading {size} bytes at {off:#x}: {e}"));
            return;
        }
        // Stores wider than 8 bytes (vector moves) as 8-byte pieces: the
        // trace's unit; the pieces of one store are adjacent, in order.
        for (i, piece) in buf.chunks(8).enumerate() {
            self.trace.push_store(off + i as u64 * 8, piece);
        }
        self.counts.stores += 1;
        self.counts.bytes += size;
        self.stores_since_barrier += 1;
    }

    /// A fence or write-back instruction executed at `pc`.
    pub fn insn(&mut self, kind: Kind, pc: u64) {
        if self.active.is_none() {
            return;
        }
        match kind {
            Kind::Sfence => self.counts.sfence += 1,
            Kind::Mfence => self.counts.mfence += 1,
            Kind::Clwb => self.counts.clwb += 1,
            Kind::Clflush => self.counts.clflush += 1,
            Kind::Clflushopt => self.counts.clflushopt += 1,
        }
        if kind.is_fence() {
            self.barrier();
        } else if self.write_backs.len() < MAX_WRITE_BACKS {
            self.write_backs.push(WriteBack {
                kind,
                pc,
                position: self.trace.len() as u64,
            });
        }
    }

    fn record(&mut self) -> Option<Window> {
        let mut r = [0u8; RECORD as usize];
        if let Err(e) = self.marker.backing.read(0, &mut r) {
            self.error(format!("reading the marker record: {e}"));
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes(r[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(r[o..o + 8].try_into().unwrap());
        let (kind, dev, arg, arg2) = (u32_at(8), u32_at(12) as usize, u64_at(16), u64_at(24));
        if &r[..8] != MAGIC {
            self.error("a marker record without its magic".into());
            return None;
        }
        let seq = u64_at(32);
        if self.last_seq == Some(seq) {
            return None;
        }
        self.last_seq = Some(seq);
        self.markers += 1;
        if dev >= self.devices.len() {
            self.error(format!(
                "marker kind {kind} names device {dev} (not traced)"
            ));
            return None;
        }
        match kind {
            CAL_BEGIN => {
                self.cal = Some(Calibration {
                    device: dev,
                    sector: arg,
                    min: u64::MAX,
                    max: 0,
                    bytes: 0,
                });
                self.devices[dev].notify = (arg2 != 0).then_some(arg2 + NOTIFY_OFFSET);
            }
            CAL_END => match self.cal.take() {
                Some(c) if c.device == dev => {
                    // The sector, or its whole page (the guest's block
                    // layer may write the page the sector is in), each byte once.
                    let at = c.sector * SECTOR;
                    let span = c.max.wrapping_sub(c.min);
                    if (span == SECTOR || span == 4096) && c.bytes == span && c.min >= at {
                        self.devices[dev].base = Some(c.min - at);
                    } else {
                        self.error(format!(
                            "device {dev}: calibration saw {} bytes in {:#x}..{:#x}, expected one sector",
                            c.bytes, c.min, c.max
                        ));
                    }
                }
                _ => self.error(format!("device {dev}: calibration end without its begin")),
            },
            TRACE_ON => {
                if self.devices[dev].base.is_none() {
                    self.error(format!("device {dev}: trace on before a calibration"));
                    return None;
                }
                self.active = Some(dev);
                self.trace = TraceFile::default();
                self.counts = Counts::default();
                self.write_backs.clear();
                self.stores_since_barrier = 0;
            }
            TRACE_OFF => {
                if self.active != Some(dev) {
                    self.error(format!("device {dev}: trace off while it was not on"));
                    return None;
                }
                self.active = None;
                return Some(Window {
                    device: dev,
                    trace: std::mem::take(&mut self.trace),
                    counts: std::mem::take(&mut self.counts),
                    write_backs: std::mem::take(&mut self.write_backs),
                    base: self.devices[dev].base.unwrap_or(0),
                });
            }
            STEP => {
                if self.active == Some(dev) {
                    self.trace.push(Event::Marker(arg as u32));
                }
            }
            other => self.error(format!("unknown marker kind {other}")),
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A file the test writes as the guest would.
    #[derive(Clone, Debug)]
    struct Mem(Rc<RefCell<Vec<u8>>>);

    impl Backing for Mem {
        fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let m = self.0.borrow();
            let s = m
                .get(off as usize..off as usize + buf.len())
                .ok_or_else(|| std::io::Error::other("past the end"))?;
            buf.copy_from_slice(s);
            Ok(())
        }
        fn size(&self) -> u64 {
            self.0.borrow().len() as u64
        }
    }

    fn mem(n: usize) -> Mem {
        Mem(Rc::new(RefCell::new(vec![0; n])))
    }

    const RAM: u64 = 1 << 30;
    const MARK_C: u64 = 0x9000_0000;
    const DEV_C: u64 = 0x1_2000_0000;

    /// The guest: writes `bytes` at `off` of a file whose address is `c`, 8
    /// bytes at a time in ascending order, telling the tracer after each.
    fn guest_write(
        t: &mut Tracer<Mem>,
        file: &Mem,
        c: u64,
        off: u64,
        bytes: &[u8],
    ) -> Option<Window> {
        let mut done = None;
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let o = off as usize + i * 8;
            file.0.borrow_mut()[o..o + chunk.len()].copy_from_slice(chunk);
            if let Some(w) = t.store(c + o as u64, chunk.len() as u64, false) {
                done = Some(w);
            }
        }
        done
    }

    fn mark(
        t: &mut Tracer<Mem>,
        m: &Mem,
        kind: u32,
        dev: u32,
        arg: u64,
        arg2: u64,
    ) -> Option<Window> {
        // A fresh seq for every record.
        let seq = m.0.borrow()[32..40].iter().map(|&b| b as u64).sum::<u64>() + 1;
        let mut r = Vec::from(&MAGIC[..]);
        r.extend_from_slice(&kind.to_le_bytes());
        r.extend_from_slice(&dev.to_le_bytes());
        r.extend_from_slice(&arg.to_le_bytes());
        r.extend_from_slice(&arg2.to_le_bytes());
        r.extend_from_slice(&seq.to_le_bytes());
        r.resize(SECTOR as usize, 0);
        guest_write(t, m, MARK_C, 0, &r)
    }

    #[test]
    fn a_calibrated_window_records_stores_fences_and_flush_requests() {
        let m = mem(4096);
        let d = mem(1 << 20);
        let mut t = Tracer::new(RAM, m.clone(), vec![d.clone()]);
        // Main RAM and unknown stores are ignored.
        assert!(t.store(0x1000, 8, false).is_none());
        assert!(t.store(0xa_0000_0000, 8, false).is_none());
        // Calibration: sector 3 rewritten with its own content.
        mark(&mut t, &m, CAL_BEGIN, 0, 3, 0xfe00_0000);
        assert_eq!(t.marker_base(), Some(MARK_C));
        let same = d.0.borrow()[3 * 512..4 * 512].to_vec();
        guest_write(&mut t, &d, DEV_C, 3 * 512, &same);
        mark(&mut t, &m, CAL_END, 0, 0, 0);
        assert_eq!(t.devices[0].base, Some(DEV_C));
        assert!(t.errors.is_empty(), "{:?}", t.errors);

        mark(&mut t, &m, TRACE_ON, 0, 0, 0);
        t.insn(Kind::Sfence, 0x10); // nothing pending: no barrier
        guest_write(
            &mut t,
            &d,
            DEV_C,
            0x1000,
            &0x1122_3344_5566_7788u64.to_le_bytes(),
        );
        guest_write(&mut t, &d, DEV_C, 0x2004, &[0xab, 0xcd]);
        t.insn(Kind::Clwb, 0x20);
        t.insn(Kind::Sfence, 0x24);
        t.insn(Kind::Mfence, 0x28); // a second fence with nothing new: no barrier
        mark(&mut t, &m, STEP, 0, 7, 0);
        // QEMU reporting the record's last store again: not a second marker.
        assert!(t.store(MARK_C + 32, 8, false).is_none());
        guest_write(&mut t, &d, DEV_C, 0x3000, &[1]);
        // A store to the notify area of the device: a flush request.
        assert!(t.store(0xfe00_3004, 2, true).is_none());
        assert!(
            t.store(0xfe00_1000, 2, true).is_none(),
            "isr: not a request"
        );
        let w = mark(&mut t, &m, TRACE_OFF, 0, 0, 0).expect("window");
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert_eq!(
            w.trace.events(),
            &[
                Event::Store {
                    off: 0x1000,
                    len: 8,
                    value: 0x1122_3344_5566_7788
                },
                Event::Store {
                    off: 0x2004,
                    len: 2,
                    value: 0xcdab
                },
                Event::Flush,
                Event::Marker(7),
                Event::Store {
                    off: 0x3000,
                    len: 1,
                    value: 1
                },
                Event::Flush,
            ]
        );
        assert_eq!(
            w.counts,
            Counts {
                stores: 3,
                bytes: 11,
                sfence: 2,
                mfence: 1,
                clwb: 1,
                flush_requests: 1,
                barriers: 2,
                ..Counts::default()
            }
        );
        assert_eq!(
            w.write_backs,
            [WriteBack {
                kind: Kind::Clwb,
                pc: 0x20,
                position: 2
            }]
        );
        // Outside a window nothing is recorded.
        t.insn(Kind::Sfence, 0x30);
        assert!(guest_write(&mut t, &d, DEV_C, 0, &[9; 8]).is_none());
    }

    #[test]
    fn wide_stores_become_8_byte_pieces_with_the_files_bytes() {
        let m = mem(4096);
        let d = mem(1 << 20);
        let mut t = Tracer::new(RAM, m.clone(), vec![d.clone()]);
        mark(&mut t, &m, CAL_BEGIN, 0, 0, 0);
        guest_write(&mut t, &d, DEV_C, 0, &[0; 512]);
        mark(&mut t, &m, CAL_END, 0, 0, 0);
        mark(&mut t, &m, TRACE_ON, 0, 0, 0);
        // A 16-byte vector store: the guest's bytes are in the file when QEMU reports it.
        let v: Vec<u8> = (1..=16).collect();
        d.0.borrow_mut()[0x40..0x50].copy_from_slice(&v);
        assert!(t.store(DEV_C + 0x40, 16, false).is_none());
        // A store past the device's end is not the device's.
        assert!(t.store(DEV_C + (1 << 20), 8, false).is_none());
        let w = mark(&mut t, &m, TRACE_OFF, 0, 0, 0).unwrap();
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert_eq!(
            w.trace.events(),
            &[
                Event::Store {
                    off: 0x40,
                    len: 8,
                    value: u64::from_le_bytes(v[..8].try_into().unwrap())
                },
                Event::Store {
                    off: 0x48,
                    len: 8,
                    value: u64::from_le_bytes(v[8..].try_into().unwrap())
                },
            ]
        );
        assert_eq!((w.counts.stores, w.counts.bytes), (1, 16));
        assert_eq!(t.other_stores, 1);
    }

    #[test]
    fn a_bad_calibration_or_order_is_an_error_not_a_trace() {
        let m = mem(4096);
        let d = mem(1 << 20);
        let mut t = Tracer::new(RAM, m.clone(), vec![d.clone()]);
        mark(&mut t, &m, TRACE_ON, 0, 0, 0);
        assert_eq!(t.errors.len(), 1, "trace on before calibration");
        mark(&mut t, &m, CAL_BEGIN, 0, 0, 0);
        guest_write(&mut t, &d, DEV_C, 0, &[0; 256]); // half a sector
        mark(&mut t, &m, CAL_END, 0, 0, 0);
        assert_eq!(t.errors.len(), 2);
        assert_eq!(t.devices[0].base, None);
        mark(&mut t, &m, TRACE_OFF, 0, 0, 0);
        mark(&mut t, &m, TRACE_ON, 5, 0, 0);
        assert_eq!(t.errors.len(), 4);
    }
}
