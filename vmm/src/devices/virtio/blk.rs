//! virtio-blk (device id 2) on a [`BlockBackend`].
//!
//! Supported requests: IN, OUT, FLUSH, GET_ID; others complete with
//! `VIRTIO_BLK_S_UNSUPP`. Offered features: `VIRTIO_F_VERSION_1`,
//! `VIRTIO_BLK_F_FLUSH`, `VIRTIO_BLK_F_BLK_SIZE` (512).
//!
//! A request is the chain `header (16 bytes, readable) | data | status (1 byte,
//! writable, the chain's last byte)`, in any split over descriptors (virtio 1.x
//! drivers may lay it out freely). What is checked, and what happens:
//!
//! | chain | result |
//! |---|---|
//! | no descriptor at all (head outside the table), a loop, longer than the queue, a `next` outside the table | `DEVICE_NEEDS_RESET` (no defined last byte to put a status into) |
//! | last descriptor not writable, or its last byte outside guest memory | `DEVICE_NEEDS_RESET` |
//! | a readable descriptor after a writable one | `IOERR` |
//! | any buffer outside guest memory | `IOERR` |
//! | fewer than 16 readable bytes (no header, e.g. a writable header) | `IOERR` |
//! | IN with readable data, OUT/GET_ID with the wrong data direction | `IOERR` |
//! | IN/OUT not a multiple of 512 bytes, beyond the disk's end, or larger than [`MAX_REQUEST_BYTES`] | `IOERR` |
//! | backend error | `IOERR` |
//! | a WRITE or FLUSH the fault plan names ([`Block::set_faults`]) | `IOERR`; the backend is untouched and the observer gets `blk_fault`, never `blk_write`/`blk_flush` |
//! | unknown type | `UNSUPP` |

use log::warn;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_queue::Queue;

use super::chain::{process_chains, read_config_bytes, Request};
use super::{
    BlockBackend, DeviceError, GuestMem, IoObserver, NoopObserver, VirtioDevice, FEATURE_VERSION_1,
    VIRTIO_ID_BLOCK,
};
use crate::faults::{BlkFaults, BlkRequest, FaultError};

/// Sector size of the virtio-blk protocol (and the advertised `blk_size`).
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const BLK_ID_BYTES: usize = 20;
/// Largest IN/OUT data length served in one request (the data is staged in a
/// host buffer so the observer sees each write whole); larger requests get
/// `IOERR`.
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;

const QUEUE_SIZE: u16 = 256;
const HEADER_LEN: u64 = 16;
/// Bytes of `struct virtio_blk_config` exposed: capacity, size_max, seg_max,
/// geometry, blk_size.
const CONFIG_LEN: usize = 24;

/// A virtio-blk device.
pub struct Block {
    backend: Box<dyn BlockBackend>,
    observer: Box<dyn IoObserver>,
    id: [u8; BLK_ID_BYTES],
    /// Capacity in sectors, fixed at construction.
    capacity: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    faults: BlkFaults,
    /// Writes and flushes counted for the fault plan since construction (not
    /// reset with the device: the plan counts since boot).
    writes_seen: u64,
    flushes_seen: u64,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// A device on `backend`, answering GET_ID with `id` (truncated to 20
    /// bytes, zero-padded).
    pub fn new(backend: Box<dyn BlockBackend>, id: &[u8]) -> Self {
        let capacity = backend.size() / SECTOR_SIZE;
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        let mut id_bytes = [0u8; BLK_ID_BYTES];
        let n = id.len().min(BLK_ID_BYTES);
        id_bytes[..n].copy_from_slice(&id[..n]);
        Self {
            backend,
            observer: Box::new(NoopObserver),
            id: id_bytes,
            capacity,
            config,
            queue_sizes: [QUEUE_SIZE],
            faults: BlkFaults::default(),
            writes_seen: 0,
            flushes_seen: 0,
        }
    }

    /// Sets which requests fail with `IOERR` (default: none). Counted per
    /// kind from 1: every OUT that carries data and passed the checks in the
    /// module's table
    /// (so would reach the backend), and every FLUSH with a valid header.
    /// Requests refused for a bad chain, and empty OUTs, are not counted.
    pub fn set_faults(&mut self, faults: BlkFaults) -> Result<(), FaultError> {
        faults.validate()?;
        self.faults = faults;
        Ok(())
    }

    /// Counts one request of `kind`; true when the plan fails it (and then
    /// tells the observer).
    fn inject(&mut self, kind: BlkRequest, sector: Option<u64>) -> bool {
        let seen = match kind {
            BlkRequest::Write => &mut self.writes_seen,
            BlkRequest::Flush => &mut self.flushes_seen,
        };
        *seen = seen.saturating_add(1);
        let nth = *seen;
        if !self.faults.fails(kind, nth) {
            return false;
        }
        warn!("virtio-blk: {kind} {nth} fails (fault plan)");
        self.observer.blk_fault(kind, nth, sector);
        true
    }

    /// Sets who is told about writes and flushes (the tracer).
    pub fn set_observer(&mut self, observer: Box<dyn IoObserver>) {
        self.observer = observer;
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Handles one parsed chain; returns the used length, or an error if the
    /// chain has no place for a status byte.
    fn handle(&mut self, mem: &GuestMem, req: &Request) -> Result<u32, DeviceError> {
        let wlen = req.writable.len();
        // The status byte is the last byte of the chain, so the last
        // descriptor must be writable and its last byte in guest memory.
        if !req.ends_writable || wlen == 0 || !req.writable.check(mem, wlen - 1, 1) {
            return Err(DeviceError::NoStatus(req.head));
        }
        let (status, data_written) = self.execute(mem, req);
        if !req.writable.write(mem, wlen - 1, &[status]) {
            return Err(DeviceError::NoStatus(req.head));
        }
        // The writable area is at most 2^32 - 1 bytes (virtio-queue stops a
        // chain before its length overflows u32), so this cannot overflow.
        Ok(data_written.saturating_add(1))
    }

    /// Runs the request; returns its status and how many data bytes were
    /// written to the guest.
    fn execute(&mut self, mem: &GuestMem, req: &Request) -> (u8, u32) {
        const IOERR: (u8, u32) = (VIRTIO_BLK_S_IOERR as u8, 0);
        if req.misordered {
            warn!(
                "virtio-blk: chain {}: readable descriptor after a writable one",
                req.head
            );
            return IOERR;
        }
        if !req.in_memory(mem) {
            warn!(
                "virtio-blk: chain {}: buffer outside guest memory",
                req.head
            );
            return IOERR;
        }
        let mut header = [0u8; HEADER_LEN as usize];
        if req.readable.len() < HEADER_LEN || !req.readable.read(mem, 0, &mut header) {
            warn!("virtio-blk: chain {}: no 16-byte readable header", req.head);
            return IOERR;
        }
        let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let data_in = req.readable.len() - HEADER_LEN;
        let data_out = req.writable.len() - 1;

        match req_type {
            VIRTIO_BLK_T_IN => {
                if data_in != 0 {
                    warn!("virtio-blk: IN with device-readable data");
                    return IOERR;
                }
                let Some(offset) = self.check_range(sector, data_out) else {
                    return IOERR;
                };
                let mut buf = vec![0u8; data_out as usize];
                if let Err(e) = self.backend.read_at(offset, &mut buf) {
                    warn!("virtio-blk: read at {offset}: {e}");
                    return IOERR;
                }
                if !req.writable.write(mem, 0, &buf) {
                    return IOERR;
                }
                (VIRTIO_BLK_S_OK as u8, data_out as u32)
            }
            VIRTIO_BLK_T_OUT => {
                if data_out != 0 {
                    warn!("virtio-blk: OUT with device-writable data");
                    return IOERR;
                }
                let Some(offset) = self.check_range(sector, data_in) else {
                    return IOERR;
                };
                if data_in == 0 {
                    // Nothing to write, nothing to trace.
                    return (VIRTIO_BLK_S_OK as u8, 0);
                }
                let mut buf = vec![0u8; data_in as usize];
                if !req.readable.read(mem, HEADER_LEN, &mut buf) {
                    return IOERR;
                }
                // Before the backend: a failed write changes no sector and
                // is not traced (nothing of it can reach the media).
                if self.inject(BlkRequest::Write, Some(sector)) {
                    return IOERR;
                }
                if let Err(e) = self.backend.write_at(offset, &buf) {
                    warn!("virtio-blk: write at {offset}: {e}");
                    return IOERR;
                }
                self.observer.blk_write(sector, &buf);
                (VIRTIO_BLK_S_OK as u8, 0)
            }
            VIRTIO_BLK_T_FLUSH => {
                // Data buffers carry nothing for a flush; they are ignored.
                // A failed flush neither reaches the backend nor is traced as
                // a barrier: it made nothing durable.
                if self.inject(BlkRequest::Flush, None) {
                    return IOERR;
                }
                if let Err(e) = self.backend.flush() {
                    warn!("virtio-blk: flush: {e}");
                    return IOERR;
                }
                self.observer.blk_flush();
                (VIRTIO_BLK_S_OK as u8, 0)
            }
            VIRTIO_BLK_T_GET_ID => {
                if data_in != 0 {
                    warn!("virtio-blk: GET_ID with device-readable data");
                    return IOERR;
                }
                let n = (BLK_ID_BYTES as u64).min(data_out) as usize;
                if !req.writable.write(mem, 0, &self.id[..n]) {
                    return IOERR;
                }
                (VIRTIO_BLK_S_OK as u8, n as u32)
            }
            other => {
                warn!("virtio-blk: unsupported request type {other}");
                (VIRTIO_BLK_S_UNSUPP as u8, 0)
            }
        }
    }

    /// Byte offset of an IN/OUT of `len` bytes at `sector`, if it is whole
    /// sectors, within the disk and not too large.
    fn check_range(&self, sector: u64, len: u64) -> Option<u64> {
        if len % SECTOR_SIZE != 0 || len > MAX_REQUEST_BYTES {
            warn!("virtio-blk: bad data length {len}");
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE);
        if end.is_none_or(|end| end > self.capacity) {
            warn!(
                "virtio-blk: sector {sector} + {} beyond the disk's {} sectors",
                len / SECTOR_SIZE,
                self.capacity
            );
            return None;
        }
        Some(sector * SECTOR_SIZE)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_BLK_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn!(
            "virtio-blk: ignored write of {} bytes to read-only config at {offset:#x}",
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
