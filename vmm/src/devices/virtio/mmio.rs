//! The virtio-mmio transport, version 2 ("modern") only, virtio 1.x section 4.2.2.
//!
//! Register accesses below the configuration space must be 4 bytes wide and
//! 4-byte aligned; others are ignored (reads return zeros). The device
//! configuration space at 0x100 accepts 1, 2, 4 and 8-byte accesses.
//!
//! Device status follows the initialisation sequence ACKNOWLEDGE → DRIVER →
//! FEATURES_OK → DRIVER_OK (several steps may be set in one write, as some
//! drivers do); a write that clears bits or skips a step is ignored, writing 0
//! resets the device, FAILED may be set at any time. FEATURES_OK is refused
//! (it does not appear in the status read back) if the driver accepted a
//! feature the device did not offer or did not accept `VIRTIO_F_VERSION_1`.
//!
//! Queue registers are written between FEATURES_OK and DRIVER_OK while the
//! queue is not ready; writing 0 to QueueReady (disabling a queue) is
//! accepted at any time. Writing 1 to QueueReady validates the queue (size a
//! power of two not above QueueNumMax; descriptor table 16-byte, available
//! ring 2-byte, used ring 4-byte aligned; all three inside guest memory); an
//! invalid queue stays not ready (QueueReady reads 0).
//!
//! A QueueNotify after DRIVER_OK processes the queue synchronously. When the
//! used ring was updated, InterruptStatus bit 0 is set and the interrupt
//! EventFd (if any) is signalled, unless the driver asked for no interrupts
//! (`VRING_AVAIL_F_NO_INTERRUPT`). When the device cannot complete a chain it
//! sets DEVICE_NEEDS_RESET, raises a configuration-change interrupt (bit 1)
//! and ignores notifications until the driver resets it.

use log::warn;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{GuestMem, VirtioDevice, FEATURE_VERSION_1};

/// Size of one device's MMIO window (registers plus configuration space).
/// Announce it as `virtio_mmio.device=4K@<base>:<irq>`.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// The driver-set status values, in initialisation order; a valid status
/// (ignoring FAILED and NEEDS_RESET) is one of them.
const STATUS_STEPS: [u32; 5] = [
    0,
    ACK,
    ACK | DRIVER,
    ACK | DRIVER | FEATURES_OK,
    ACK | DRIVER | FEATURES_OK | DRIVER_OK,
];

/// What the driver wrote to a queue's registers; applied to the `Queue` only
/// when it sets QueueReady, after validation.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

/// One virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    irq: Option<EventFd>,
    queues: Vec<Queue>,
    regs: Vec<QueueRegs>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("interrupt_status", &self.interrupt_status)
            .finish_non_exhaustive()
    }
}

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device reported a queue size virtio-queue rejects.
    #[error("device queue {index} has invalid maximum size {size}")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// The rejected size.
        size: u16,
    },
}

impl MmioTransport {
    /// Puts `device` behind a register window. `mem` is the guest memory the
    /// queues and buffers live in (a clone shares the mappings). `irq`, if
    /// given, is signalled whenever an interrupt is raised (register it with
    /// KVM as an irqfd for the GSI announced on the command line).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMem,
        irq: Option<EventFd>,
    ) -> Result<Self, TransportError> {
        let mut queues = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            queues.push(Queue::new(size).map_err(|_| TransportError::QueueSize { index, size })?);
        }
        let regs = queues
            .iter()
            .map(|q| QueueRegs::new(q.max_size()))
            .collect();
        Ok(Self {
            device,
            mem,
            irq,
            queues,
            regs,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
        })
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The interrupt EventFd, if any.
    pub fn irq(&self) -> Option<&EventFd> {
        self.irq.as_ref()
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Current InterruptStatus register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Features the driver accepted (valid once FEATURES_OK is set).
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || offset & 3 != 0 {
            warn!(
                "virtio-mmio: ignored {}-byte read at {offset:#x}",
                data.len()
            );
            return;
        }
        let v = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let f = self.device.avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            // The configuration space never changes after creation.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => {
                warn!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            if self.status & FAILED != 0 {
                return;
            }
            self.device
                .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn!(
                "virtio-mmio: ignored {}-byte write at {offset:#x}",
                data.len()
            );
            return;
        };
        if offset & 3 != 0 {
            warn!("virtio-mmio: ignored misaligned write at {offset:#x}");
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(v),
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => {
                // Values above u16::MAX cannot be valid; keep them invalid.
                let size = u16::try_from(v).unwrap_or(0);
                self.with_queue_regs(|r| r.size = size);
            }
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(v),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => self.write_status(v),
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.with_queue_regs(|r| set_low(&mut r.desc, v)),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.with_queue_regs(|r| set_high(&mut r.desc, v)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.with_queue_regs(|r| set_low(&mut r.avail, v)),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.with_queue_regs(|r| set_high(&mut r.avail, v)),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.with_queue_regs(|r| set_low(&mut r.used, v)),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.with_queue_regs(|r| set_high(&mut r.used, v)),
            _ => warn!("virtio-mmio: write of unknown or read-only register {offset:#x}"),
        }
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// True while the driver may configure queues.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (FEATURES_OK | DRIVER_OK | FAILED) == FEATURES_OK
    }

    fn with_queue_regs(&mut self, f: impl FnOnce(&mut QueueRegs)) {
        if !self.queue_setup_allowed() {
            warn!(
                "virtio-mmio: queue register write in status {:#x} ignored",
                self.status
            );
            return;
        }
        let i = self.queue_sel as usize;
        match (self.queues.get(i), self.regs.get_mut(i)) {
            (Some(q), Some(r)) if !q.ready() => f(r),
            (Some(_), Some(_)) => warn!("virtio-mmio: queue {i} is ready; write ignored"),
            _ => warn!("virtio-mmio: queue {i} does not exist; write ignored"),
        }
    }

    fn write_queue_ready(&mut self, v: u32) {
        let setup = self.queue_setup_allowed();
        let i = self.queue_sel as usize;
        let (Some(q), Some(r)) = (self.queues.get_mut(i), self.regs.get(i)) else {
            warn!("virtio-mmio: QueueReady for missing queue {i} ignored");
            return;
        };
        if v == 0 {
            // Allowed in any state: Linux (vm_del_vq) and virtio-drivers
            // (queue_unset) disable queues after DRIVER_OK and wait until
            // QueueReady reads back 0; virtio-drivers spins forever if not.
            q.set_ready(false);
            return;
        }
        if !setup {
            warn!(
                "virtio-mmio: QueueReady write in status {:#x} ignored",
                self.status
            );
            return;
        }
        if q.ready() {
            return;
        }
        if let Err(e) = configure_queue(q, r, &self.mem) {
            warn!("virtio-mmio: queue {i} not enabled: {e}");
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & (ACK | DRIVER | FEATURES_OK | FAILED) != ACK | DRIVER {
            warn!(
                "virtio-mmio: DriverFeatures write in status {:#x} ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            // No feature bits above 63 exist; the driver may still write 0.
            sel => {
                if v != 0 {
                    warn!("virtio-mmio: features {v:#x} in word {sel} ignored");
                }
            }
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & FAILED != 0 {
            // The driver gave up; keep what was set and stop serving.
            self.status |= FAILED;
            return;
        }
        let old = self.status & !NEEDS_RESET;
        let new = v & !NEEDS_RESET;
        let Some(old_step) = STATUS_STEPS.iter().position(|&s| s == old) else {
            return; // FAILED is set: only a reset helps.
        };
        let Some(mut new_step) = STATUS_STEPS.iter().position(|&s| s == new) else {
            warn!(
                "virtio-mmio: invalid status {v:#x} (current {:#x}) ignored",
                self.status
            );
            return;
        };
        if new_step < old_step {
            warn!(
                "virtio-mmio: status {v:#x} clears bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let features_ok_step = 3;
        if old_step < features_ok_step && new_step >= features_ok_step {
            let avail = self.device.avail_features();
            let extra = self.driver_features & !avail;
            if extra != 0 || self.driver_features & FEATURE_VERSION_1 == 0 {
                warn!(
                    "virtio-mmio: FEATURES_OK refused: driver features {:#x}, device offers {avail:#x}",
                    self.driver_features
                );
                new_step = features_ok_step - 1;
            }
        }
        let driver_ok_step = 4;
        if old_step < driver_ok_step && new_step == driver_ok_step {
            self.device.activate(self.driver_features);
        }
        self.status = STATUS_STEPS[new_step] | (self.status & NEEDS_RESET);
    }

    /// Device reset (status 0): everything back to the power-on state.
    fn reset(&mut self) {
        self.device.reset();
        for (q, r) in self.queues.iter_mut().zip(self.regs.iter_mut()) {
            q.reset();
            *r = QueueRegs::new(q.max_size());
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn notify(&mut self, index: u32) {
        if self.status & (DRIVER_OK | FAILED | NEEDS_RESET) != DRIVER_OK {
            warn!(
                "virtio-mmio: notify of queue {index} in status {:#x} ignored",
                self.status
            );
            return;
        }
        let i = index as usize;
        let Some(q) = self.queues.get_mut(i).filter(|q| q.ready()) else {
            warn!("virtio-mmio: notify of missing or not ready queue {index} ignored");
            return;
        };
        match self.device.process_queue(i, &self.mem, q) {
            Ok(false) => {}
            Ok(true) => {
                self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
                // virtio-queue does not look at VRING_AVAIL_F_NO_INTERRUPT
                // (without EVENT_IDX), so check it here. An unreadable ring
                // is no reason to withhold the interrupt.
                let wanted = q.needs_notification(&self.mem).unwrap_or(true);
                let flags: u16 = self
                    .mem
                    .read_obj(GuestAddress(q.avail_ring()))
                    .map(u16::from_le)
                    .unwrap_or(0);
                if wanted && flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0 {
                    self.signal();
                }
            }
            Err(e) => {
                warn!("virtio-mmio: device needs reset: {e}");
                self.status |= NEEDS_RESET;
                self.interrupt_status |= VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;
                self.signal();
            }
        }
    }

    fn signal(&self) {
        if let Some(fd) = &self.irq {
            if let Err(e) = fd.write(1) {
                warn!("virtio-mmio: interrupt eventfd write failed: {e}");
            }
        }
    }
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        // Until the driver writes QueueNum the queue has its maximum size (as
        // virtio-queue's own default).
        Self {
            size: max_size,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// Validates `r` and, if it is a usable queue, makes `q` ready with it.
fn configure_queue(q: &mut Queue, r: &QueueRegs, mem: &GuestMem) -> Result<(), String> {
    let res = (|| {
        q.try_set_size(r.size)
            .map_err(|e| format!("size {}: {e}", r.size))?;
        q.try_set_desc_table_address(GuestAddress(r.desc))
            .map_err(|e| format!("descriptor table {:#x}: {e}", r.desc))?;
        // virtio-queue treats an available ring at 0 as "not configured".
        if r.avail == 0 {
            return Err("available ring at address 0".to_string());
        }
        q.try_set_avail_ring_address(GuestAddress(r.avail))
            .map_err(|e| format!("available ring {:#x}: {e}", r.avail))?;
        q.try_set_used_ring_address(GuestAddress(r.used))
            .map_err(|e| format!("used ring {:#x}: {e}", r.used))?;
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err("rings not inside guest memory".to_string());
        }
        Ok(())
    })();
    if res.is_err() {
        q.reset();
    }
    res
}

fn set_low(addr: &mut u64, v: u32) {
    *addr = (*addr & !0xffff_ffff) | u64::from(v);
}

fn set_high(addr: &mut u64, v: u32) {
    *addr = (*addr & 0xffff_ffff) | (u64::from(v) << 32);
}
