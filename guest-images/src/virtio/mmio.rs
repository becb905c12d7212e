//! virtio-mmio windows: validation of the command line's announcements, a
//! probe of the identification registers, and a minimal modern (version 2)
//! transport for the devices virtio-drivers' `MmioTransport` refuses.
//!
//! Why a transport of our own: `MmioTransport::new` converts the device id
//! into virtio-drivers' `DeviceType`, which has no entry for virtio-pmem (27),
//! and fails. Everything else of the crate (the `Transport` trait's feature
//! negotiation, `VirtQueue`) is used as is on top of this transport.

use guest_cmdline::MmioDevice;
use protocol::layout::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SLOTS};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

const MAGIC: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const INTERRUPT_STATUS: usize = 0x060;
const INTERRUPT_ACK: usize = 0x064;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const CONFIG_GENERATION: usize = 0x0fc;
const CONFIG: usize = 0x100;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
pub const MODERN: u32 = 2;

/// A validated device window inside the mapped virtio-mmio area.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub base: u64,
    pub size: u64,
}

/// Why an announced window cannot be used.
#[derive(Debug)]
pub enum WindowError {
    OutsideMappedArea(MmioDevice),
    TooSmall(MmioDevice),
}

impl core::fmt::Display for WindowError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            WindowError::OutsideMappedArea(d) => write!(
                f,
                "virtio-mmio window {:#x}+{:#x} is not one of the {} mapped {:#x}-byte slots at {:#x}",
                d.base, d.size, VIRTIO_MMIO_SLOTS, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_BASE
            ),
            WindowError::TooSmall(d) => write!(
                f,
                "virtio-mmio window {:#x}+{:#x} is smaller than its registers ({CONFIG:#x} bytes)",
                d.base, d.size
            ),
        }
    }
}

impl Window {
    /// Accepts a window only inside one slot of the area our page tables map.
    pub fn new(d: MmioDevice) -> Result<Self, WindowError> {
        let slot_ok = d.base >= VIRTIO_MMIO_BASE
            && (d.base - VIRTIO_MMIO_BASE).is_multiple_of(VIRTIO_MMIO_SIZE)
            && (d.base - VIRTIO_MMIO_BASE) / VIRTIO_MMIO_SIZE < VIRTIO_MMIO_SLOTS
            && d.size <= VIRTIO_MMIO_SIZE;
        if !slot_ok {
            return Err(WindowError::OutsideMappedArea(d));
        }
        if d.size < CONFIG as u64 {
            return Err(WindowError::TooSmall(d));
        }
        Ok(Window {
            base: d.base,
            size: d.size,
        })
    }

    fn reg(&self, off: usize) -> *mut u32 {
        (self.base as usize + off) as *mut u32
    }

    pub fn read32(&self, off: usize) -> u32 {
        // SAFETY: `off` is a register offset below CONFIG <= size, inside a mapped window.
        unsafe { self.reg(off).read_volatile() }
    }

    fn write32(&self, off: usize, v: u32) {
        // SAFETY: as `read32`.
        unsafe { self.reg(off).write_volatile(v) }
    }

    /// Feature bits 0-31 the device offers (two exits).
    pub fn device_features_low(&self) -> u32 {
        self.write32(DEVICE_FEATURES_SEL, 0);
        self.read32(DEVICE_FEATURES)
    }

    /// `(magic ok, version, device id)`: three register reads (three exits).
    pub fn probe(&self) -> Probe {
        Probe {
            magic_ok: self.read32(MAGIC) == MAGIC_VALUE,
            version: self.read32(VERSION),
            device_id: self.read32(DEVICE_ID),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub magic_ok: bool,
    pub version: u32,
    pub device_id: u32,
}

/// A modern virtio-mmio transport over a [`Window`], for devices
/// virtio-drivers cannot name.
pub struct RawTransport {
    window: Window,
}

impl RawTransport {
    /// Requires the magic value and version 2 (modern); the caller checked the device id.
    pub fn new(window: Window) -> Result<Self, Probe> {
        let p = window.probe();
        if !p.magic_ok || p.version != MODERN {
            return Err(p);
        }
        Ok(RawTransport { window })
    }

    fn config_len(&self) -> usize {
        self.window.size as usize - CONFIG
    }

    /// Reads `N` bytes of config space with the widths the virtio-mmio spec
    /// requires (4-byte aligned fields read 32 bits at a time).
    fn read_config_bytes(&self, offset: usize, out: &mut [u8]) -> virtio_drivers::Result {
        let end = offset
            .checked_add(out.len())
            .ok_or(Error::ConfigSpaceTooSmall)?;
        if end > self.config_len() {
            return Err(Error::ConfigSpaceTooSmall);
        }
        let base = self.window.base as usize + CONFIG + offset;
        // SAFETY: inside the window's config space (checked above).
        unsafe {
            match out.len() {
                1 => out[0] = (base as *const u8).read_volatile(),
                2 if offset.is_multiple_of(2) => {
                    out.copy_from_slice(&(base as *const u16).read_volatile().to_le_bytes())
                }
                n if n.is_multiple_of(4) && offset.is_multiple_of(4) => {
                    for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
                        let w = ((base + i * 4) as *const u32).read_volatile();
                        chunk.copy_from_slice(&w.to_le_bytes());
                    }
                }
                _ => return Err(Error::InvalidParam),
            }
        }
        Ok(())
    }
}

impl Transport for RawTransport {
    fn device_type(&self) -> DeviceType {
        // Neither `begin_init`, `finish_init` nor `VirtQueue` asks; our drivers
        // know their device. There is no truthful `DeviceType` for id 27.
        panic!("RawTransport::device_type: the device id has no virtio-drivers DeviceType")
    }

    fn read_device_features(&mut self) -> u64 {
        self.window.write32(DEVICE_FEATURES_SEL, 0);
        let low = self.window.read32(DEVICE_FEATURES);
        self.window.write32(DEVICE_FEATURES_SEL, 1);
        let high = self.window.read32(DEVICE_FEATURES);
        u64::from(low) | (u64::from(high) << 32)
    }

    fn write_driver_features(&mut self, features: u64) {
        self.window.write32(DRIVER_FEATURES_SEL, 0);
        self.window.write32(DRIVER_FEATURES, features as u32);
        self.window.write32(DRIVER_FEATURES_SEL, 1);
        self.window
            .write32(DRIVER_FEATURES, (features >> 32) as u32);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.window.write32(QUEUE_SEL, queue.into());
        self.window.read32(QUEUE_NUM_MAX)
    }

    fn notify(&mut self, queue: u16) {
        self.window.write32(QUEUE_NOTIFY, queue.into());
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.window.read32(STATUS))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.window.write32(STATUS, status.bits());
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {
        // Legacy only.
    }

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        let w = &self.window;
        w.write32(QUEUE_SEL, queue.into());
        w.write32(QUEUE_NUM, size);
        for (reg, addr) in [
            (QUEUE_DESC_LOW, descriptors),
            (QUEUE_DRIVER_LOW, driver_area),
            (QUEUE_DEVICE_LOW, device_area),
        ] {
            w.write32(reg, addr as u32);
            w.write32(reg + 4, (addr >> 32) as u32);
        }
        w.write32(QUEUE_READY, 1);
    }

    fn queue_unset(&mut self, queue: u16) {
        let w = &self.window;
        w.write32(QUEUE_SEL, queue.into());
        w.write32(QUEUE_READY, 0);
        w.write32(QUEUE_NUM, 0);
        for reg in [QUEUE_DESC_LOW, QUEUE_DRIVER_LOW, QUEUE_DEVICE_LOW] {
            w.write32(reg, 0);
            w.write32(reg + 4, 0);
        }
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.window.write32(QUEUE_SEL, queue.into());
        self.window.read32(QUEUE_READY) != 0
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let pending = self.window.read32(INTERRUPT_STATUS);
        if pending != 0 {
            self.window.write32(INTERRUPT_ACK, pending);
        }
        InterruptStatus::from_bits_truncate(pending)
    }

    fn read_config_generation(&self) -> u32 {
        self.window.read32(CONFIG_GENERATION)
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        let mut value = T::new_zeroed();
        self.read_config_bytes(offset, value.as_mut_bytes())?;
        Ok(value)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _offset: usize,
        _value: T,
    ) -> virtio_drivers::Result<()> {
        // virtio-pmem's config space is read-only.
        Err(Error::Unsupported)
    }
}
