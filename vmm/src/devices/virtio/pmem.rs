//! virtio-pmem (device id 27).
//!
//! The memory region itself is a KVM memory slot that the VMM maps; this
//! device only exposes its place (config `start`, `size`) and answers FLUSH
//! requests on its one queue.
//!
//! A request is `type: le32` (device-readable) then `ret: le32`
//! (device-writable): 0 when the flush is durable, -1 (0xffff_ffff) on
//! error, as the virtio spec says. Chains with no writable 4-byte response in
//! guest memory, and chains without a defined end, put the device into
//! `DEVICE_NEEDS_RESET`; every other malformed request is answered -1.

use log::warn;
use virtio_queue::Queue;

use super::chain::{process_chains, read_config_bytes, Request};
use super::{
    DeviceError, GuestMem, IoObserver, NoopObserver, PmemBackend, VirtioDevice, FEATURE_VERSION_1,
    VIRTIO_ID_PMEM,
};

/// `VIRTIO_PMEM_REQ_TYPE_FLUSH` (not in virtio-bindings).
pub const VIRTIO_PMEM_REQ_TYPE_FLUSH: u32 = 0;
/// Response value for success.
pub const VIRTIO_PMEM_RESP_OK: u32 = 0;
/// Response value for failure (-1 as le32).
pub const VIRTIO_PMEM_RESP_EIO: u32 = u32::MAX;

const QUEUE_SIZE: u16 = 256;

/// A virtio-pmem device.
pub struct Pmem {
    backend: Box<dyn PmemBackend>,
    observer: Box<dyn IoObserver>,
    config: [u8; 16],
    queue_sizes: [u16; 1],
}

impl std::fmt::Debug for Pmem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pmem")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Pmem {
    /// A device describing the region at guest-physical `start`, `size` bytes
    /// long, with `backend` making it durable on FLUSH.
    pub fn new(start: u64, size: u64, backend: Box<dyn PmemBackend>) -> Self {
        let mut config = [0u8; 16];
        config[0..8].copy_from_slice(&start.to_le_bytes());
        config[8..16].copy_from_slice(&size.to_le_bytes());
        Self {
            backend,
            observer: Box::new(NoopObserver),
            config,
            queue_sizes: [QUEUE_SIZE],
        }
    }

    /// Sets who is told about flushes (the tracer).
    pub fn set_observer(&mut self, observer: Box<dyn IoObserver>) {
        self.observer = observer;
    }

    fn handle(&mut self, mem: &GuestMem, req: &Request) -> Result<u32, DeviceError> {
        // The response is the first four device-writable bytes.
        if !req.writable.check(mem, 0, 4) {
            return Err(DeviceError::NoStatus(req.head));
        }
        let ret = self.execute(mem, req);
        if !req.writable.write(mem, 0, &ret.to_le_bytes()) {
            return Err(DeviceError::NoStatus(req.head));
        }
        Ok(4)
    }

    fn execute(&mut self, mem: &GuestMem, req: &Request) -> u32 {
        if req.misordered {
            warn!(
                "virtio-pmem: chain {}: readable descriptor after a writable one",
                req.head
            );
            return VIRTIO_PMEM_RESP_EIO;
        }
        if !req.in_memory(mem) {
            warn!(
                "virtio-pmem: chain {}: buffer outside guest memory",
                req.head
            );
            return VIRTIO_PMEM_RESP_EIO;
        }
        let mut ty = [0u8; 4];
        if !req.readable.read(mem, 0, &mut ty) {
            warn!("virtio-pmem: chain {}: no readable request type", req.head);
            return VIRTIO_PMEM_RESP_EIO;
        }
        match u32::from_le_bytes(ty) {
            VIRTIO_PMEM_REQ_TYPE_FLUSH => match self.backend.flush() {
                Ok(()) => {
                    self.observer.pmem_flush();
                    VIRTIO_PMEM_RESP_OK
                }
                Err(e) => {
                    warn!("virtio-pmem: flush failed: {e}");
                    VIRTIO_PMEM_RESP_EIO
                }
            },
            other => {
                warn!("virtio-pmem: unsupported request type {other}");
                VIRTIO_PMEM_RESP_EIO
            }
        }
    }
}

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_PMEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn!(
            "virtio-pmem: ignored write of {} bytes to read-only config at {offset:#x}",
            data.len()
        );
    }

    fn process_queue(
        &mut self,
        index: usize,
        mem: &GuestMem,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        if index != 0 {
            return Ok(false);
        }
        process_chains(mem, queue, |mem, req| self.handle(mem, req))
    }
}
