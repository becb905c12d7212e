//! virtio-blk request handling, driven through a real split queue in guest
//! memory (no KVM).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::blk::MAX_REQUEST_BYTES;
use super::testutil::{mem, Driver, Event, LogObserver, MemDisk, Recorder, D, DATA, MEM_SIZE};
use super::*;
use crate::faults::BlkRequest;

const DISK: usize = 64 * 1024; // 128 sectors
const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x800;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
/// What the status byte holds before the device writes it.
const UNTOUCHED: u8 = 0xee;

struct Fix {
    mem: GuestMem,
    disk: MemDisk,
    rec: Recorder,
    dev: Block,
}

fn fix() -> Fix {
    fix_with(MemDisk::new(DISK))
}

fn fix_with(disk: MemDisk) -> Fix {
    let mem = mem();
    let rec = Recorder::default();
    let mut dev = Block::new(Box::new(disk.clone()), b"pcache-test-disk");
    dev.set_observer(Box::new(rec.clone()));
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    Fix {
        mem,
        disk,
        rec,
        dev,
    }
}

fn header(mem: &GuestMem, addr: u64, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

fn status(mem: &GuestMem) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

fn guest(mem: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// Processes queue 0 (a macro so the driver may keep borrowing `f.mem`).
macro_rules! run {
    ($f:expr, $q:expr) => {
        $f.dev.process_queue(0, &$f.mem, $q)
    };
}

fn disk_at(f: &Fix, off: usize, len: usize) -> Vec<u8> {
    f.disk.data.lock().unwrap()[off..off + len].to_vec()
}

#[test]
fn identity_features_and_config() {
    let f = fix();
    assert_eq!(f.dev.device_type(), 2);
    assert_eq!(f.dev.queue_max_sizes(), &[256]);
    let feat = f.dev.avail_features();
    assert_eq!(
        feat,
        FEATURE_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_BLK_SIZE
    );
    assert_eq!(f.dev.capacity(), (DISK / 512) as u64);
    let mut cap = [0u8; 8];
    f.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 128);
    let mut bs = [0u8; 4];
    f.dev.read_config(20, &mut bs);
    assert_eq!(u32::from_le_bytes(bs), 512);
    // Partial and out-of-range reads never panic; past the end reads 0.
    let mut b = [0xffu8; 4];
    f.dev.read_config(22, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    f.dev.read_config(u64::MAX - 1, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn disk_size_not_a_multiple_of_512_rounds_down() {
    let f = fix_with(MemDisk::new(1000));
    assert_eq!(f.dev.capacity(), 1);
}

#[test]
fn read_request() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_IN, 2);
    let head = d.add(&[D(HDR, 16, false), D(BUF, 1024, true), D(STATUS, 1, true)]);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true));
    assert_eq!(status(&f.mem), OK);
    assert_eq!(guest(&f.mem, BUF, 1024), disk_at(&f, 1024, 1024));
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (u32::from(head), 1025));
    assert!(f.rec.events().is_empty(), "reads are not traced");
    // Nothing more to do: no interrupt needed.
    assert_eq!(run!(f, &mut q), Ok(false));
}

#[test]
fn read_with_any_layout() {
    // Header split over two descriptors, status sharing the last data
    // descriptor: virtio 1.x lets the driver frame requests freely.
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_IN, 1);
    d.add(&[
        D(HDR, 8, false),
        D(HDR + 8, 8, false),
        D(BUF, 300, true),
        D(BUF + 0x400, 213, true),
    ]);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true));
    let mut got = guest(&f.mem, BUF, 300);
    got.extend(guest(&f.mem, BUF + 0x400, 212));
    assert_eq!(got, disk_at(&f, 512, 512));
    assert_eq!(guest(&f.mem, BUF + 0x400 + 212, 1), vec![OK]);
    assert_eq!(d.used(0).1, 513);
}

#[test]
fn write_request_reaches_backend_then_observer() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    f.mem.write_slice(&data, GuestAddress(BUF)).unwrap();
    header(&f.mem, HDR, VIRTIO_BLK_T_OUT, 5);
    let head = d.add(&[
        D(HDR, 16, false),
        D(BUF, 512, false),
        D(BUF + 512, 512, false),
        D(STATUS, 1, true),
    ]);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true));
    assert_eq!(status(&f.mem), OK);
    assert_eq!(disk_at(&f, 5 * 512, 1024), data);
    assert_eq!(d.used(0), (u32::from(head), 1));
    assert_eq!(f.rec.events(), vec![Event::BlkWrite(5, data)]);
}

#[test]
fn flush_request() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    d.add(&[D(HDR, 16, false), D(STATUS, 1, true)]);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true));
    assert_eq!(status(&f.mem), OK);
    assert_eq!(*f.disk.flushes.lock().unwrap(), 1);
    assert_eq!(f.rec.events(), vec![Event::BlkFlush]);
    assert_eq!(d.used(0).1, 1);
}

#[test]
fn write_then_flush_are_observed_in_order_after_the_backend() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut disk = MemDisk::new(DISK);
    disk.log = Some(log.clone());
    let mut f = fix_with(disk);
    f.dev.set_observer(Box::new(LogObserver(log.clone())));
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_OUT, 0);
    header(&f.mem, HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
    d.add(&[D(HDR, 16, false), D(BUF, 512, false), D(STATUS, 1, true)]);
    d.add(&[D(HDR + 0x100, 16, false), D(STATUS + 1, 1, true)]);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true));
    assert_eq!(d.used_idx(), 2);
    assert_eq!(
        *log.lock().unwrap(),
        vec!["write", "observe write", "flush", "observe flush"]
    );
}

#[test]
fn get_id_request() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    d.add(&[D(HDR, 16, false), D(BUF, 20, true), D(STATUS, 1, true)]);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true));
    assert_eq!(status(&f.mem), OK);
    let mut want = b"pcache-test-disk".to_vec();
    want.resize(20, 0);
    assert_eq!(guest(&f.mem, BUF, 20), want);
    assert_eq!(d.used(0).1, 21);
}

#[test]
fn get_id_is_truncated_to_twenty_bytes() {
    let mem = mem();
    let mut dev = Block::new(Box::new(MemDisk::new(DISK)), b"0123456789abcdefghijKLMN");
    let mut d = Driver::new(&mem, 16);
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    d.add(&[D(HDR, 16, false), D(BUF, 32, true), D(STATUS, 1, true)]);
    let mut q = d.queue();
    assert_eq!(dev.process_queue(0, &mem, &mut q), Ok(true));
    assert_eq!(guest(&mem, BUF, 20), b"0123456789abcdefghij".to_vec());
    assert_eq!(d.used(0).1, 21);
}

#[test]
fn unsupported_type_is_unsupp() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, 11 /* DISCARD, not offered */, 0);
    d.add(&[D(HDR, 16, false), D(BUF, 16, false), D(STATUS, 1, true)]);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true));
    assert_eq!(status(&f.mem), VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(d.used(0).1, 1);
}

/// Runs one request expected to complete with IOERR and leave the disk, the
/// guest data buffer and the trace untouched.
fn expect_ioerr(descs: &[D], ty: u32, sector: u64) {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, ty, sector);
    f.mem.write_slice(&[0x5a; 2048], GuestAddress(BUF)).unwrap();
    let before = f.disk.data.lock().unwrap().clone();
    let head = d.add(descs);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true), "{descs:?}");
    assert_eq!(status(&f.mem), IOERR, "{descs:?}");
    assert_eq!(d.used(0), (u32::from(head), 1));
    assert_eq!(*f.disk.data.lock().unwrap(), before);
    assert_eq!(guest(&f.mem, BUF, 2048), vec![0x5a; 2048]);
    assert!(f.rec.events().is_empty());
    assert_eq!(*f.disk.flushes.lock().unwrap(), 0);
}

#[test]
fn read_beyond_end_is_ioerr() {
    // Last sector is 127: two sectors from 127 cross the end.
    expect_ioerr(
        &[D(HDR, 16, false), D(BUF, 1024, true), D(STATUS, 1, true)],
        VIRTIO_BLK_T_IN,
        127,
    );
    expect_ioerr(
        &[D(HDR, 16, false), D(BUF, 512, true), D(STATUS, 1, true)],
        VIRTIO_BLK_T_IN,
        128,
    );
    // sector * 512 and sector + count overflow.
    expect_ioerr(
        &[D(HDR, 16, false), D(BUF, 512, true), D(STATUS, 1, true)],
        VIRTIO_BLK_T_IN,
        u64::MAX,
    );
    expect_ioerr(
        &[D(HDR, 16, false), D(BUF, 512, true), D(STATUS, 1, true)],
        VIRTIO_BLK_T_IN,
        u64::MAX / 512 + 1,
    );
}

#[test]
fn last_sector_is_readable() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_IN, 127);
    d.add(&[D(HDR, 16, false), D(BUF, 512, true), D(STATUS, 1, true)]);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true));
    assert_eq!(status(&f.mem), OK);
    assert_eq!(guest(&f.mem, BUF, 512), disk_at(&f, DISK - 512, 512));
}

#[test]
fn write_beyond_end_is_ioerr() {
    expect_ioerr(
        &[D(HDR, 16, false), D(BUF, 1024, false), D(STATUS, 1, true)],
        VIRTIO_BLK_T_OUT,
        127,
    );
}

#[test]
fn partial_sector_is_ioerr() {
    expect_ioerr(
        &[D(HDR, 16, false), D(BUF, 100, true), D(STATUS, 1, true)],
        VIRTIO_BLK_T_IN,
        0,
    );
    expect_ioerr(
        &[D(HDR, 16, false), D(BUF, 513, false), D(STATUS, 1, true)],
        VIRTIO_BLK_T_OUT,
        0,
    );
}

#[test]
fn backend_errors_are_ioerr_and_not_observed() {
    let mut disk = MemDisk::new(DISK);
    disk.fail = true;
    for ty in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH] {
        let mut f = fix_with(disk.clone());
        let mut d = Driver::new(&f.mem, 16);
        header(&f.mem, HDR, ty, 0);
        let data = match ty {
            VIRTIO_BLK_T_IN => vec![D(BUF, 512, true)],
            VIRTIO_BLK_T_OUT => vec![D(BUF, 512, false)],
            _ => vec![],
        };
        let mut descs = vec![D(HDR, 16, false)];
        descs.extend(data);
        descs.push(D(STATUS, 1, true));
        d.add(&descs);
        let mut q = d.queue();
        assert_eq!(run!(f, &mut q), Ok(true));
        assert_eq!(status(&f.mem), IOERR, "type {ty}");
        assert_eq!(d.used(0).1, 1);
        assert!(f.rec.events().is_empty());
    }
}

#[test]
fn request_larger_than_the_limit_is_ioerr() {
    // 70 descriptors of 960 KiB each, all over the same guest memory: more
    // than MAX_REQUEST_BYTES in total.
    // The size limit is checked before the disk's end.
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 128);
    header(&f.mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let mut descs = vec![D(HDR, 16, false)];
    let chunk = 0xf_0000u32;
    descs.extend((0..70).map(|_| D(BUF, chunk, false)));
    descs.push(D(STATUS, 1, true));
    assert!(70 * u64::from(chunk) > MAX_REQUEST_BYTES);
    d.add(&descs);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true));
    assert_eq!(status(&f.mem), IOERR);
    assert!(f.rec.events().is_empty());
}

// ---- malformed chains -------------------------------------------------

#[test]
fn too_short_no_status_needs_reset() {
    // Header only: there is no writable byte for a status.
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let head = d.add(&[D(HDR, 16, false)]);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Err(DeviceError::NoStatus(head)));
    assert_eq!(d.used_idx(), 0, "a chain that cannot complete is not used");
    assert_eq!(*f.disk.flushes.lock().unwrap(), 0);
}

#[test]
fn too_short_no_header_is_ioerr() {
    // Only a status byte.
    expect_ioerr(&[D(STATUS, 1, true)], VIRTIO_BLK_T_IN, 0);
    // A header shorter than 16 bytes.
    expect_ioerr(
        &[D(HDR, 8, false), D(STATUS, 1, true)],
        VIRTIO_BLK_T_FLUSH,
        0,
    );
}

#[test]
fn writable_header_is_ioerr() {
    expect_ioerr(
        &[D(HDR, 16, true), D(BUF, 512, true), D(STATUS, 1, true)],
        VIRTIO_BLK_T_IN,
        0,
    );
}

#[test]
fn wrong_data_direction_is_ioerr() {
    // IN whose data buffer is device-readable.
    expect_ioerr(
        &[D(HDR, 16, false), D(BUF, 512, false), D(STATUS, 1, true)],
        VIRTIO_BLK_T_IN,
        0,
    );
    // OUT whose data buffer is device-writable.
    expect_ioerr(
        &[D(HDR, 16, false), D(BUF, 512, true), D(STATUS, 1, true)],
        VIRTIO_BLK_T_OUT,
        0,
    );
    // GET_ID with a readable buffer.
    expect_ioerr(
        &[D(HDR, 16, false), D(BUF, 20, false), D(STATUS, 1, true)],
        VIRTIO_BLK_T_GET_ID,
        0,
    );
    // A readable descriptor after a writable one.
    expect_ioerr(
        &[
            D(HDR, 16, false),
            D(BUF, 512, true),
            D(BUF + 512, 512, false),
            D(STATUS, 1, true),
        ],
        VIRTIO_BLK_T_IN,
        0,
    );
}

#[test]
fn status_not_writable_needs_reset() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let head = d.add(&[D(HDR, 16, false), D(BUF, 512, true), D(STATUS, 1, false)]);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Err(DeviceError::NoStatus(head)));
    assert_eq!(status(&f.mem), UNTOUCHED);
    assert_eq!(d.used_idx(), 0);
    // Zero-length writable "status".
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    d.add(&[D(HDR, 16, false), D(STATUS, 0, true)]);
    let mut q = d.queue();
    assert!(matches!(run!(f, &mut q), Err(DeviceError::NoStatus(_))));
    assert_eq!(*f.disk.flushes.lock().unwrap(), 0);
}

#[test]
fn buffers_outside_guest_memory_are_ioerr() {
    // Data past the end of guest memory.
    expect_ioerr(
        &[
            D(HDR, 16, false),
            D(MEM_SIZE - 256, 512, true),
            D(STATUS, 1, true),
        ],
        VIRTIO_BLK_T_IN,
        0,
    );
    expect_ioerr(
        &[
            D(HDR, 16, false),
            D(0x4000_0000, 512, false),
            D(STATUS, 1, true),
        ],
        VIRTIO_BLK_T_OUT,
        0,
    );
    // Address + length wraps around.
    expect_ioerr(
        &[
            D(HDR, 16, false),
            D(u64::MAX - 100, 512, true),
            D(STATUS, 1, true),
        ],
        VIRTIO_BLK_T_IN,
        0,
    );
    // Header outside guest memory.
    expect_ioerr(
        &[D(MEM_SIZE, 16, false), D(STATUS, 1, true)],
        VIRTIO_BLK_T_FLUSH,
        0,
    );
}

#[test]
fn status_outside_guest_memory_needs_reset() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    d.add(&[D(HDR, 16, false), D(MEM_SIZE + 7, 1, true)]);
    let mut q = d.queue();
    assert!(matches!(run!(f, &mut q), Err(DeviceError::NoStatus(_))));
    assert_eq!(*f.disk.flushes.lock().unwrap(), 0);
}

/// Processes queue 0 expecting an error quickly, with nothing used or traced.
macro_rules! expect_reset_quickly {
    ($d:expr, $f:expr, $q:expr) => {{
        let t = Instant::now();
        let r = run!($f, $q);
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!($d.used_idx(), 0);
        assert!($f.rec.events().is_empty());
        r.unwrap_err()
    }};
}

#[test]
fn descriptor_loop_needs_reset() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_OUT, 0);
    // 0 -> 1 -> 2 -> 1 -> ... (the status descriptor links back).
    let head = d.store_raw(&[
        (HDR, 16, NEXT, 1),
        (BUF, 512, NEXT, 2),
        (STATUS, 1, WRITE | NEXT, 1),
    ]);
    d.publish(head);
    let mut q = d.queue();
    let e = expect_reset_quickly!(d, f, &mut q);
    assert_eq!(e, DeviceError::Unterminated(head));
    assert_eq!(status(&f.mem), UNTOUCHED);
}

#[test]
fn self_loop_needs_reset() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    let head = d.store_raw(&[(STATUS, 1, WRITE | NEXT, 0)]);
    d.publish(head);
    let mut q = d.queue();
    let e = expect_reset_quickly!(d, f, &mut q);
    assert_eq!(e, DeviceError::Unterminated(head));
}

#[test]
fn next_index_outside_table_needs_reset() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let head = d.store_raw(&[(HDR, 16, NEXT, 16), (STATUS, 1, WRITE, 0)]);
    d.publish(head);
    let mut q = d.queue();
    let e = expect_reset_quickly!(d, f, &mut q);
    assert_eq!(e, DeviceError::Unterminated(head));
}

#[test]
fn chain_longer_than_queue_needs_reset() {
    // A queue of 4 whose chain visits 0,1,2,3 and then 0 again.
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 4);
    header(&f.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let head = d.store_raw(&[
        (HDR, 16, NEXT, 1),
        (BUF, 0, NEXT, 2),
        (BUF, 0, NEXT, 3),
        (STATUS, 1, WRITE | NEXT, 0),
    ]);
    d.publish(head);
    let mut q = d.queue();
    let e = expect_reset_quickly!(d, f, &mut q);
    assert_eq!(e, DeviceError::Unterminated(head));
}

#[test]
fn chain_over_four_gib_needs_reset() {
    // virtio-queue stops a chain whose lengths overflow u32.
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    let head = d.store_raw(&[
        (HDR, 16, NEXT, 1),
        (BUF, u32::MAX, NEXT, 2),
        (STATUS, 1, WRITE, 0),
    ]);
    d.publish(head);
    let mut q = d.queue();
    let e = expect_reset_quickly!(d, f, &mut q);
    assert_eq!(e, DeviceError::Unterminated(head));
}

#[test]
fn head_outside_table_needs_reset() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    d.publish(16);
    let mut q = d.queue();
    let e = expect_reset_quickly!(d, f, &mut q);
    assert_eq!(e, DeviceError::EmptyChain(16));
}

#[test]
fn avail_index_too_far_ahead_needs_reset() {
    let mut f = fix();
    let d = Driver::new(&f.mem, 16);
    d.set_avail_idx(17);
    let mut q = d.queue();
    let e = expect_reset_quickly!(d, f, &mut q);
    assert!(matches!(e, DeviceError::AvailRing(_)), "{e:?}");
}

#[test]
fn bad_indirect_tables_need_reset() {
    // Indirect descriptors are not offered; virtio-queue still follows them,
    // so a bad table must not hurt. Table length not a multiple of 16:
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    let indirect = VRING_DESC_F_INDIRECT as u16;
    let head = d.store_raw(&[(BUF, 20, indirect, 0)]);
    d.publish(head);
    let mut q = d.queue();
    let e = expect_reset_quickly!(d, f, &mut q);
    assert_eq!(e, DeviceError::EmptyChain(head));

    // A table outside guest memory, reached from a direct header.
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let head = d.store_raw(&[(HDR, 16, NEXT, 1), (0x4000_0000, 32, indirect, 0)]);
    d.publish(head);
    let mut q = d.queue();
    let e = expect_reset_quickly!(d, f, &mut q);
    assert_eq!(e, DeviceError::Unterminated(head));
}

#[test]
fn good_chain_before_a_bad_one_completes() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let good = d.add(&[D(HDR, 16, false), D(STATUS, 1, true)]);
    let bad = d.store_raw(&[(STATUS + 1, 1, WRITE | NEXT, 2)]);
    d.publish(bad);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Err(DeviceError::Unterminated(bad)));
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (u32::from(good), 1));
    assert_eq!(f.rec.events(), vec![Event::BlkFlush]);
}

#[test]
fn many_requests_in_one_notify_and_ring_wraparound() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 4);
    header(&f.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let mut q = d.queue();
    // Ten rounds of 2 requests on a 4-entry queue: indices wrap.
    for round in 0..10u16 {
        d.add(&[D(HDR, 16, false), D(STATUS, 1, true)]);
        d.add(&[D(HDR, 16, false), D(STATUS + 1, 1, true)]);
        assert_eq!(run!(f, &mut q), Ok(true));
        assert_eq!(d.used_idx(), 2 * (round + 1));
    }
    assert_eq!(*f.disk.flushes.lock().unwrap(), 20);
}

#[test]
fn file_backend_round_trip() {
    let tmp = vmm_sys_util::tempfile::TempFile::new().unwrap();
    let file = tmp.into_file();
    file.set_len(4096).unwrap();
    let mut b = FileBackend::new(file).unwrap();
    assert_eq!(b.size(), 4096);
    b.write_at(512, &[7u8; 512]).unwrap();
    b.flush().unwrap();
    let mut buf = [0u8; 1024];
    b.read_at(0, &mut buf).unwrap();
    assert_eq!(&buf[..512], &[0u8; 512][..]);
    assert_eq!(&buf[512..], &[7u8; 512][..]);
    // Reading past the end of the file is an error, not a short read.
    assert!(b.read_at(4000, &mut buf).is_err());
}

#[test]
fn empty_read_and_write_succeed_without_io() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    header(&f.mem, HDR, VIRTIO_BLK_T_OUT, 3);
    header(&f.mem, HDR + 0x100, VIRTIO_BLK_T_IN, 128);
    d.add(&[D(HDR, 16, false), D(STATUS, 1, true)]);
    d.add(&[D(HDR + 0x100, 16, false), D(STATUS + 1, 1, true)]);
    let mut q = d.queue();
    let before = f.disk.data.lock().unwrap().clone();
    assert_eq!(run!(f, &mut q), Ok(true));
    assert_eq!(guest(&f.mem, STATUS, 2), vec![OK, OK]);
    assert_eq!(d.used(0).1, 1);
    assert_eq!(d.used(1).1, 1);
    assert_eq!(*f.disk.data.lock().unwrap(), before);
    assert!(f.rec.events().is_empty(), "an empty write is not traced");
}

/// Submits one request and returns its status byte. Request `i` (< 16) gets
/// its own header and status slot so earlier ones stay readable. A macro for
/// the same reason as `run!`.
macro_rules! submit {
    ($f:expr, $d:expr, $q:expr, $i:expr, $ty:expr, $sector:expr, $data:expr $(,)?) => {{
        let i: u64 = $i;
        let (hdr, st) = (HDR + 0x100 + i * 16, STATUS + 0x10 + i);
        header(&$f.mem, hdr, $ty, $sector);
        $f.mem.write_obj(UNTOUCHED, GuestAddress(st)).unwrap();
        let mut descs = vec![D(hdr, 16, false)];
        descs.extend_from_slice($data);
        descs.push(D(st, 1, true));
        $d.add(&descs);
        assert_eq!(run!($f, $q), Ok(true));
        $f.mem.read_obj::<u8>(GuestAddress(st)).unwrap()
    }};
}

fn plan(writes: &[&str], flushes: &[&str]) -> crate::faults::BlkFaults {
    crate::faults::BlkFaults {
        fail_writes: writes.iter().map(|s| s.parse().unwrap()).collect(),
        fail_flushes: flushes.iter().map(|s| s.parse().unwrap()).collect(),
    }
}

#[test]
fn planned_flush_fails_without_reaching_the_backend_or_the_trace() {
    let mut f = fix();
    f.dev.set_faults(plan(&[], &["2"])).unwrap();
    let mut d = Driver::new(&f.mem, 16);
    let mut q = d.queue();
    let got: Vec<u8> = (0..3)
        .map(|i| submit!(f, d, &mut q, i, VIRTIO_BLK_T_FLUSH, 0, &[]))
        .collect();
    assert_eq!(got, vec![OK, IOERR, OK]);
    assert_eq!(
        *f.disk.flushes.lock().unwrap(),
        2,
        "the failed flush never reached the backend"
    );
    assert_eq!(
        f.rec.events(),
        vec![
            Event::BlkFlush,
            Event::BlkFault(BlkRequest::Flush, 2, None),
            Event::BlkFlush
        ],
        "the failed flush is reported as a fault, never as a flush"
    );
    assert_eq!(d.used(1).1, 1, "completed with just its status byte");
}

#[test]
fn planned_write_fails_and_leaves_the_disk_unchanged() {
    let mut f = fix();
    f.dev.set_faults(plan(&["2"], &[])).unwrap();
    let mut d = Driver::new(&f.mem, 16);
    let mut q = d.queue();
    let before = f.disk.data.lock().unwrap().clone();
    let mut statuses = vec![];
    for (i, (sector, byte)) in [(5u64, 0xa5u8), (6, 0x5a), (7, 0x33)]
        .into_iter()
        .enumerate()
    {
        let buf = BUF + i as u64 * 512;
        f.mem.write_slice(&[byte; 512], GuestAddress(buf)).unwrap();
        statuses.push(submit!(
            f,
            d,
            &mut q,
            i as u64,
            VIRTIO_BLK_T_OUT,
            sector,
            &[D(buf, 512, false)],
        ));
    }
    assert_eq!(statuses, vec![OK, IOERR, OK]);
    assert_eq!(disk_at(&f, 5 * 512, 512), vec![0xa5; 512]);
    assert_eq!(
        disk_at(&f, 6 * 512, 512),
        before[6 * 512..7 * 512],
        "failed write changed nothing"
    );
    assert_eq!(disk_at(&f, 7 * 512, 512), vec![0x33; 512]);
    assert_eq!(
        f.rec.events(),
        vec![
            Event::BlkWrite(5, vec![0xa5; 512]),
            Event::BlkFault(BlkRequest::Write, 2, Some(6)),
            Event::BlkWrite(7, vec![0x33; 512]),
        ]
    );
}

#[test]
fn onward_plan_fails_every_request_from_nth_and_kinds_count_apart() {
    let mut f = fix();
    f.dev.set_faults(plan(&["1"], &["2+"])).unwrap();
    let mut d = Driver::new(&f.mem, 16);
    let mut q = d.queue();
    let w = [D(BUF, 512, false)];
    // flush 1, write 1 (fails), flush 2.., write 2: each kind has its own count.
    let got = vec![
        submit!(f, d, &mut q, 0, VIRTIO_BLK_T_FLUSH, 0, &[]),
        submit!(f, d, &mut q, 1, VIRTIO_BLK_T_OUT, 0, &w),
        submit!(f, d, &mut q, 2, VIRTIO_BLK_T_FLUSH, 0, &[]),
        submit!(f, d, &mut q, 3, VIRTIO_BLK_T_FLUSH, 0, &[]),
        submit!(f, d, &mut q, 4, VIRTIO_BLK_T_OUT, 0, &w),
        submit!(f, d, &mut q, 5, VIRTIO_BLK_T_FLUSH, 0, &[]),
    ];
    assert_eq!(got, vec![OK, IOERR, IOERR, IOERR, OK, IOERR]);
    assert_eq!(*f.disk.flushes.lock().unwrap(), 1);
    let faults: Vec<_> = f
        .rec
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::BlkFault(..)))
        .collect();
    assert_eq!(
        faults,
        vec![
            Event::BlkFault(BlkRequest::Write, 1, Some(0)),
            Event::BlkFault(BlkRequest::Flush, 2, None),
            Event::BlkFault(BlkRequest::Flush, 3, None),
            Event::BlkFault(BlkRequest::Flush, 4, None),
        ]
    );
}

#[test]
fn refused_empty_and_read_requests_do_not_count() {
    let mut f = fix();
    f.dev.set_faults(plan(&["1"], &[])).unwrap();
    let mut d = Driver::new(&f.mem, 16);
    let mut q = d.queue();
    let w = [D(BUF, 512, false)];
    // Beyond the disk's end: refused by the checks, not by the plan.
    assert_eq!(submit!(f, d, &mut q, 0, VIRTIO_BLK_T_OUT, 128, &w), IOERR);
    // Empty write and a read: no backend write, no count.
    assert_eq!(submit!(f, d, &mut q, 1, VIRTIO_BLK_T_OUT, 3, &[]), OK);
    assert_eq!(
        submit!(
            f,
            d,
            &mut q,
            2,
            VIRTIO_BLK_T_IN,
            3,
            &[D(BUF + 512, 512, true)]
        ),
        OK
    );
    assert!(f.rec.events().is_empty());
    // The first write the device would carry out is the one that fails.
    assert_eq!(submit!(f, d, &mut q, 3, VIRTIO_BLK_T_OUT, 3, &w), IOERR);
    assert_eq!(submit!(f, d, &mut q, 4, VIRTIO_BLK_T_OUT, 3, &w), OK);
    assert_eq!(
        f.rec.events()[0],
        Event::BlkFault(BlkRequest::Write, 1, Some(3))
    );
}

#[test]
fn counts_survive_a_device_reset() {
    let mut f = fix();
    f.dev.set_faults(plan(&[], &["2"])).unwrap();
    let mut d = Driver::new(&f.mem, 16);
    let mut q = d.queue();
    assert_eq!(submit!(f, d, &mut q, 0, VIRTIO_BLK_T_FLUSH, 0, &[]), OK);
    f.dev.reset();
    assert_eq!(
        submit!(f, d, &mut q, 1, VIRTIO_BLK_T_FLUSH, 0, &[]),
        IOERR,
        "counted since boot"
    );
}

#[test]
fn nth_zero_is_refused_and_the_plan_left_as_it_was() {
    let mut f = fix();
    let bad = crate::faults::BlkFaults {
        fail_writes: vec![],
        fail_flushes: vec![crate::faults::FaultWhen {
            nth: 0,
            onward: true,
        }],
    };
    assert_eq!(
        f.dev.set_faults(bad),
        Err(crate::faults::FaultError::ZeroNth)
    );
    let mut d = Driver::new(&f.mem, 16);
    let mut q = d.queue();
    assert_eq!(submit!(f, d, &mut q, 0, VIRTIO_BLK_T_FLUSH, 0, &[]), OK);
}
