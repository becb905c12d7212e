//! virtio-pmem request handling through a real split queue (no KVM).

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::testutil::{mem, Driver, Event, FakePmem, LogObserver, Recorder, D, DATA, MEM_SIZE};
use super::*;

const REQ: u64 = DATA;
const RESP: u64 = DATA + 0x100;
const START: u64 = 0x1_0000_0000;
const SIZE: u64 = 512 << 20;
const UNTOUCHED: u32 = 0xdead_beef;

struct Fix {
    mem: GuestMem,
    backend: FakePmem,
    rec: Recorder,
    dev: Pmem,
}

fn fix_with(backend: FakePmem) -> Fix {
    let mem = mem();
    let rec = Recorder::default();
    let mut dev = Pmem::new(START, SIZE, Box::new(backend.clone()));
    dev.set_observer(Box::new(rec.clone()));
    mem.write_obj(0u32, GuestAddress(REQ)).unwrap();
    mem.write_obj(UNTOUCHED, GuestAddress(RESP)).unwrap();
    Fix {
        mem,
        backend,
        rec,
        dev,
    }
}

fn fix() -> Fix {
    fix_with(FakePmem::default())
}

macro_rules! run {
    ($f:expr, $q:expr) => {
        $f.dev.process_queue(0, &$f.mem, $q)
    };
}

fn resp(mem: &GuestMem) -> u32 {
    mem.read_obj(GuestAddress(RESP)).unwrap()
}

fn flushes(f: &Fix) -> u32 {
    *f.backend.flushes.lock().unwrap()
}

#[test]
fn identity_features_and_config() {
    let f = fix();
    assert_eq!(f.dev.device_type(), 27);
    assert_eq!(f.dev.queue_max_sizes().len(), 1);
    assert_eq!(f.dev.avail_features(), FEATURE_VERSION_1);
    let mut b = [0u8; 8];
    f.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), START);
    f.dev.read_config(8, &mut b);
    assert_eq!(u64::from_le_bytes(b), SIZE);
    // Two 4-byte halves, as a driver reads a 64-bit field.
    let mut lo = [0u8; 4];
    let mut hi = [0u8; 4];
    f.dev.read_config(0, &mut lo);
    f.dev.read_config(4, &mut hi);
    assert_eq!(u32::from_le_bytes(lo), START as u32);
    assert_eq!(u32::from_le_bytes(hi), (START >> 32) as u32);
    f.dev.read_config(16, &mut b);
    assert_eq!(b, [0; 8]);
}

#[test]
fn flush_ok() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    let head = d.add(&[D(REQ, 4, false), D(RESP, 4, true)]);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true));
    assert_eq!(resp(&f.mem), 0);
    assert_eq!(flushes(&f), 1);
    assert_eq!(f.rec.events(), vec![Event::PmemFlush]);
    assert_eq!(d.used(0), (u32::from(head), 4));
}

#[test]
fn flush_is_answered_after_the_backend_and_then_observed() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let backend = FakePmem {
        log: Some(log.clone()),
        ..FakePmem::default()
    };
    let mut f = fix_with(backend);
    f.dev.set_observer(Box::new(LogObserver(log.clone())));
    let mut d = Driver::new(&f.mem, 16);
    d.add(&[D(REQ, 4, false), D(RESP, 4, true)]);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true));
    assert_eq!(
        *log.lock().unwrap(),
        vec!["backend flush", "observe pmem flush"]
    );
}

#[test]
fn backend_error_answers_minus_one() {
    let mut f = fix_with(FakePmem {
        fail: true,
        ..FakePmem::default()
    });
    let mut d = Driver::new(&f.mem, 16);
    d.add(&[D(REQ, 4, false), D(RESP, 4, true)]);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true));
    assert_eq!(resp(&f.mem), 0xffff_ffff);
    assert!(f.rec.events().is_empty(), "a failed flush is not a flush");
    assert_eq!(d.used(0).1, 4);
}

/// One request expected to be answered -1 without flushing.
fn expect_minus_one(descs: &[D], req_type: u32) {
    let mut f = fix();
    f.mem.write_obj(req_type, GuestAddress(REQ)).unwrap();
    let mut d = Driver::new(&f.mem, 16);
    let head = d.add(descs);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true), "{descs:?}");
    assert_eq!(resp(&f.mem), 0xffff_ffff, "{descs:?}");
    assert_eq!(d.used(0), (u32::from(head), 4));
    assert_eq!(flushes(&f), 0);
    assert!(f.rec.events().is_empty());
}

#[test]
fn malformed_requests_answer_minus_one() {
    // Unknown request type.
    expect_minus_one(&[D(REQ, 4, false), D(RESP, 4, true)], 1);
    // No request type at all / too short.
    expect_minus_one(&[D(RESP, 4, true)], 0);
    expect_minus_one(&[D(REQ, 2, false), D(RESP, 4, true)], 0);
    // Request type outside guest memory.
    expect_minus_one(&[D(MEM_SIZE - 2, 4, false), D(RESP, 4, true)], 0);
    expect_minus_one(&[D(u64::MAX - 1, 4, false), D(RESP, 4, true)], 0);
    // A readable descriptor after the writable one.
    expect_minus_one(
        &[D(REQ, 4, false), D(RESP, 4, true), D(REQ + 8, 4, false)],
        0,
    );
}

#[test]
fn response_split_over_descriptors_works() {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    d.add(&[D(REQ, 4, false), D(RESP, 2, true), D(RESP + 2, 2, true)]);
    let mut q = d.queue();
    assert_eq!(run!(f, &mut q), Ok(true));
    assert_eq!(resp(&f.mem), 0);
    assert_eq!(flushes(&f), 1);
}

fn expect_needs_reset(descs: &[(u64, u32, u16, u16)]) -> DeviceError {
    let mut f = fix();
    let mut d = Driver::new(&f.mem, 16);
    let head = d.store_raw(descs);
    d.publish(head);
    let mut q = d.queue();
    let e = run!(f, &mut q).unwrap_err();
    assert_eq!(d.used_idx(), 0);
    assert_eq!(flushes(&f), 0, "no flush without a place to answer");
    assert_eq!(resp(&f.mem), UNTOUCHED);
    e
}

#[test]
fn no_place_for_the_response_needs_reset() {
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    // Request only.
    assert_eq!(
        expect_needs_reset(&[(REQ, 4, 0, 0)]),
        DeviceError::NoStatus(0)
    );
    // Response too small.
    assert_eq!(
        expect_needs_reset(&[(REQ, 4, next, 1), (RESP, 2, write, 0)]),
        DeviceError::NoStatus(0)
    );
    // Response outside guest memory.
    assert_eq!(
        expect_needs_reset(&[(REQ, 4, next, 1), (MEM_SIZE - 2, 4, write, 0)]),
        DeviceError::NoStatus(0)
    );
    // Response descriptor marked device-readable.
    assert_eq!(
        expect_needs_reset(&[(REQ, 4, next, 1), (RESP, 4, 0, 0)]),
        DeviceError::NoStatus(0)
    );
}

#[test]
fn loops_need_reset() {
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    assert_eq!(
        expect_needs_reset(&[(REQ, 4, next, 1), (RESP, 4, write | next, 0)]),
        DeviceError::Unterminated(0)
    );
    assert_eq!(
        expect_needs_reset(&[(REQ, 4, next, 16)]),
        DeviceError::Unterminated(0)
    );
}
