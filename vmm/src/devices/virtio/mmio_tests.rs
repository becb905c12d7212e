//! The virtio-mmio register state machine and interrupt wiring (no KVM).

use virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
use virtio_bindings::virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::testutil::{
    mem, Driver, FakePmem, MemDisk, AVAIL_ADDR, D, DATA, DESC_ADDR, MEM_SIZE, USED_ADDR,
};
use super::*;

const MAGIC: u64 = 0x00;
const VERSION: u64 = 0x04;
const DEVICE_ID: u64 = 0x08;
const VENDOR_ID: u64 = 0x0c;
const DEVICE_FEATURES: u64 = 0x10;
const DEVICE_FEATURES_SEL: u64 = 0x14;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM_MAX: u64 = 0x34;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const QUEUE_NOTIFY: u64 = 0x50;
const INTERRUPT_STATUS: u64 = 0x60;
const INTERRUPT_ACK: u64 = 0x64;
const STATUS: u64 = 0x70;
const QUEUE_DESC_LOW: u64 = 0x80;
const QUEUE_DESC_HIGH: u64 = 0x84;
const QUEUE_AVAIL_LOW: u64 = 0x90;
const QUEUE_AVAIL_HIGH: u64 = 0x94;
const QUEUE_USED_LOW: u64 = 0xa0;
const QUEUE_USED_HIGH: u64 = 0xa4;
const CONFIG_GENERATION: u64 = 0xfc;
const CONFIG: u64 = 0x100;

const ACK: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 0x40;
const FAILED: u32 = 0x80;

const HDR: u64 = DATA;
const BLK_STATUS: u64 = DATA + 0x800;

fn r(t: &MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn blk(mem: &GuestMem) -> (MmioTransport, MemDisk, EventFd) {
    let disk = MemDisk::new(64 * 1024);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(
        Box::new(Block::new(Box::new(disk.clone()), b"id")),
        mem.clone(),
        Some(irq.try_clone().unwrap()),
    )
    .unwrap();
    (t, disk, irq)
}

/// Drives status to FEATURES_OK, accepting `features`.
fn negotiate(t: &mut MmioTransport, features: u64) {
    w(t, STATUS, ACK);
    w(t, STATUS, ACK | DRIVER);
    w(t, DRIVER_FEATURES_SEL, 0);
    w(t, DRIVER_FEATURES, features as u32);
    w(t, DRIVER_FEATURES_SEL, 1);
    w(t, DRIVER_FEATURES, (features >> 32) as u32);
    w(t, STATUS, ACK | DRIVER | FEATURES_OK);
}

fn set_queue(t: &mut MmioTransport, size: u32, desc: u64, avail: u64, used: u64) {
    w(t, QUEUE_SEL, 0);
    w(t, QUEUE_NUM, size);
    w(t, QUEUE_DESC_LOW, desc as u32);
    w(t, QUEUE_DESC_HIGH, (desc >> 32) as u32);
    w(t, QUEUE_AVAIL_LOW, avail as u32);
    w(t, QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
    w(t, QUEUE_USED_LOW, used as u32);
    w(t, QUEUE_USED_HIGH, (used >> 32) as u32);
}

/// A block transport brought to DRIVER_OK with queue 0 on the test ring.
fn live_blk(mem: &GuestMem, size: u16) -> (MmioTransport, MemDisk, EventFd) {
    let (mut t, disk, irq) = blk(mem);
    let f = t.device().avail_features();
    negotiate(&mut t, f);
    set_queue(&mut t, size.into(), DESC_ADDR, AVAIL_ADDR, USED_ADDR);
    w(&mut t, QUEUE_READY, 1);
    assert_eq!(r(&t, QUEUE_READY), 1);
    w(&mut t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(r(&t, STATUS), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    (t, disk, irq)
}

fn add_flush(mem: &GuestMem, d: &mut Driver) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    d.add(&[D(HDR, 16, false), D(BLK_STATUS, 1, true)]);
}

fn irq_count(irq: &EventFd) -> u64 {
    // Non-blocking: EAGAIN means "not signalled".
    irq.read().unwrap_or(0)
}

#[test]
fn identification_registers() {
    let mem = mem();
    let (t, _, _) = blk(&mem);
    assert_eq!(r(&t, MAGIC), 0x7472_6976);
    assert_eq!(r(&t, VERSION), 2);
    assert_eq!(r(&t, DEVICE_ID), 2);
    assert_eq!(r(&t, VENDOR_ID), 0);
    assert_eq!(r(&t, CONFIG_GENERATION), 0);
    assert_eq!(r(&t, QUEUE_NUM_MAX), 256);
    assert_eq!(r(&t, STATUS), 0);

    let pmem = MmioTransport::new(
        Box::new(Pmem::new(
            0x1_0000_0000,
            1 << 29,
            Box::new(FakePmem::default()),
        )),
        mem.clone(),
        None,
    )
    .unwrap();
    assert_eq!(r(&pmem, DEVICE_ID), 27);
    assert_eq!(r(&pmem, CONFIG), 0);
    assert_eq!(r(&pmem, CONFIG + 4), 1);
    assert_eq!(r(&pmem, CONFIG + 8), 1 << 29);
    assert_eq!(r(&pmem, CONFIG + 12), 0);
}

#[test]
fn device_features_are_selected_by_word() {
    let mem = mem();
    let (mut t, _, _) = blk(&mem);
    let f = t.device().avail_features();
    w(&mut t, DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(&t, DEVICE_FEATURES), f as u32);
    assert_eq!(r(&t, DEVICE_FEATURES) & (1 << 9 | 1 << 6), 1 << 9 | 1 << 6);
    w(&mut t, DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&t, DEVICE_FEATURES), 1, "VIRTIO_F_VERSION_1 is bit 32");
    w(&mut t, DEVICE_FEATURES_SEL, 2);
    assert_eq!(r(&t, DEVICE_FEATURES), 0);
}

#[test]
fn status_sequence_and_feature_negotiation() {
    let mem = mem();
    let (mut t, _, _) = blk(&mem);
    w(&mut t, STATUS, ACK);
    assert_eq!(r(&t, STATUS), ACK);
    w(&mut t, STATUS, ACK | DRIVER);
    assert_eq!(r(&t, STATUS), ACK | DRIVER);
    let f = t.device().avail_features();
    w(&mut t, DRIVER_FEATURES_SEL, 0);
    w(&mut t, DRIVER_FEATURES, f as u32);
    w(&mut t, DRIVER_FEATURES_SEL, 1);
    w(&mut t, DRIVER_FEATURES, (f >> 32) as u32);
    w(&mut t, STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(r(&t, STATUS), ACK | DRIVER | FEATURES_OK);
    assert_eq!(t.acked_features(), f);
    // Features can no longer change once accepted.
    w(&mut t, DRIVER_FEATURES_SEL, 0);
    w(&mut t, DRIVER_FEATURES, 0);
    assert_eq!(t.acked_features(), f);
    w(&mut t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(r(&t, STATUS), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
}

#[test]
fn several_steps_in_one_status_write() {
    // virtio-drivers writes ACKNOWLEDGE | DRIVER at once.
    let mem = mem();
    let (mut t, _, _) = blk(&mem);
    w(&mut t, STATUS, ACK | DRIVER);
    assert_eq!(r(&t, STATUS), ACK | DRIVER);
}

#[test]
fn features_ok_refused_without_version_1_or_with_unoffered_features() {
    let mem = mem();
    let (mut t, _, _) = blk(&mem);
    let offered = t.device().avail_features();
    negotiate(&mut t, offered & !FEATURE_VERSION_1);
    assert_eq!(r(&t, STATUS), ACK | DRIVER, "FEATURES_OK must not stick");
    // DRIVER_OK cannot follow a refused FEATURES_OK.
    w(&mut t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(r(&t, STATUS), ACK | DRIVER);

    w(&mut t, STATUS, 0);
    negotiate(
        &mut t,
        offered | 1 << 28, /* INDIRECT_DESC, not offered */
    );
    assert_eq!(r(&t, STATUS), ACK | DRIVER);

    w(&mut t, STATUS, 0);
    negotiate(&mut t, FEATURE_VERSION_1);
    assert_eq!(
        r(&t, STATUS),
        ACK | DRIVER | FEATURES_OK,
        "a subset is fine"
    );
}

#[test]
fn invalid_status_transitions_are_ignored() {
    let mem = mem();
    let (mut t, _, _) = blk(&mem);
    // Skipping steps.
    w(&mut t, STATUS, DRIVER);
    assert_eq!(r(&t, STATUS), 0);
    w(&mut t, STATUS, ACK | DRIVER_OK);
    assert_eq!(r(&t, STATUS), 0);
    w(&mut t, STATUS, ACK);
    w(&mut t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    // DRIVER is taken, FEATURES_OK refused (VERSION_1 not accepted), so
    // DRIVER_OK cannot follow.
    assert_eq!(r(&t, STATUS), ACK | DRIVER);
    // Clearing bits.
    w(&mut t, STATUS, ACK);
    assert_eq!(r(&t, STATUS), ACK | DRIVER);
    // The driver cannot set NEEDS_RESET.
    w(&mut t, STATUS, ACK | DRIVER | NEEDS_RESET);
    assert_eq!(r(&t, STATUS), ACK | DRIVER);
    // FAILED sticks until reset.
    w(&mut t, STATUS, ACK | DRIVER | FAILED);
    assert_eq!(r(&t, STATUS), ACK | DRIVER | FAILED);
    w(&mut t, STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(r(&t, STATUS), ACK | DRIVER | FAILED);
    w(&mut t, STATUS, 0);
    assert_eq!(r(&t, STATUS), 0);
}

#[test]
fn queue_setup_is_validated() {
    let mem = mem();
    let (mut t, _, _) = blk(&mem);
    let f = t.device().avail_features();
    negotiate(&mut t, f);
    let cases: &[(u32, u64, u64, u64, &str)] = &[
        (0, DESC_ADDR, AVAIL_ADDR, USED_ADDR, "size 0"),
        (
            3,
            DESC_ADDR,
            AVAIL_ADDR,
            USED_ADDR,
            "size not a power of two",
        ),
        (512, DESC_ADDR, AVAIL_ADDR, USED_ADDR, "size above max"),
        (0x1_0010, DESC_ADDR, AVAIL_ADDR, USED_ADDR, "size above u16"),
        (
            16,
            DESC_ADDR + 8,
            AVAIL_ADDR,
            USED_ADDR,
            "descriptor table misaligned",
        ),
        (
            16,
            DESC_ADDR,
            AVAIL_ADDR + 1,
            USED_ADDR,
            "avail ring misaligned",
        ),
        (
            16,
            DESC_ADDR,
            AVAIL_ADDR,
            USED_ADDR + 2,
            "used ring misaligned",
        ),
        (
            16,
            MEM_SIZE - 16,
            AVAIL_ADDR,
            USED_ADDR,
            "descriptor table past memory",
        ),
        (
            16,
            DESC_ADDR,
            MEM_SIZE - 8,
            USED_ADDR,
            "avail ring past memory",
        ),
        (
            16,
            DESC_ADDR,
            AVAIL_ADDR,
            MEM_SIZE - 64,
            "used ring past memory",
        ),
        (
            16,
            DESC_ADDR,
            1 << 40,
            USED_ADDR,
            "avail ring far outside memory",
        ),
        (16, !15u64, AVAIL_ADDR, USED_ADDR, "descriptor table wraps"),
        (16, 0x100, 0, USED_ADDR, "avail ring at 0"),
    ];
    for &(size, desc, avail, used, what) in cases {
        set_queue(&mut t, size, desc, avail, used);
        w(&mut t, QUEUE_READY, 1);
        assert_eq!(r(&t, QUEUE_READY), 0, "{what}");
    }
    set_queue(&mut t, 16, DESC_ADDR, AVAIL_ADDR, USED_ADDR);
    w(&mut t, QUEUE_READY, 1);
    assert_eq!(r(&t, QUEUE_READY), 1);
    // A ready queue's registers cannot change.
    w(&mut t, QUEUE_NUM, 4);
    w(&mut t, QUEUE_READY, 0);
    w(&mut t, QUEUE_READY, 1);
    assert_eq!(r(&t, QUEUE_READY), 1, "size 16 kept, not 4");
    // Missing queues.
    w(&mut t, QUEUE_SEL, 1);
    assert_eq!(r(&t, QUEUE_NUM_MAX), 0);
    assert_eq!(r(&t, QUEUE_READY), 0);
    w(&mut t, QUEUE_READY, 1);
    assert_eq!(r(&t, QUEUE_READY), 0);
}

#[test]
fn queue_registers_are_ignored_outside_setup() {
    let mem = mem();
    let (mut t, _, _) = blk(&mem);
    // Before FEATURES_OK.
    w(&mut t, STATUS, ACK | DRIVER);
    set_queue(&mut t, 16, DESC_ADDR, AVAIL_ADDR, USED_ADDR);
    w(&mut t, QUEUE_READY, 1);
    assert_eq!(r(&t, QUEUE_READY), 0);
}

#[test]
fn reset_clears_queues_and_state() {
    let mem = mem();
    let mut d = Driver::new(&mem, 16);
    let (mut t, _, irq) = live_blk(&mem, 16);
    add_flush(&mem, &mut d);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(r(&t, INTERRUPT_STATUS), 1);
    irq_count(&irq);
    w(&mut t, DEVICE_FEATURES_SEL, 1);
    w(&mut t, STATUS, 0);
    assert_eq!(r(&t, STATUS), 0);
    assert_eq!(r(&t, QUEUE_READY), 0);
    assert_eq!(r(&t, INTERRUPT_STATUS), 0);
    assert_eq!(t.acked_features(), 0);
    assert_eq!(r(&t, DEVICE_FEATURES), t.device().avail_features() as u32);
    // Queue registers are back to their defaults: a new setup is needed.
    let f = t.device().avail_features();
    negotiate(&mut t, f);
    w(&mut t, QUEUE_READY, 1);
    assert_eq!(r(&t, QUEUE_READY), 0, "addresses were cleared");
    // A notify after reset does nothing.
    add_flush(&mem, &mut d);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(irq_count(&irq), 0);
}

#[test]
fn notify_before_driver_ok_is_ignored() {
    let mem = mem();
    let mut d = Driver::new(&mem, 16);
    let (mut t, disk, irq) = blk(&mem);
    let f = t.device().avail_features();
    negotiate(&mut t, f);
    set_queue(&mut t, 16, DESC_ADDR, AVAIL_ADDR, USED_ADDR);
    w(&mut t, QUEUE_READY, 1);
    add_flush(&mem, &mut d);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 0);
    assert_eq!(*disk.flushes.lock().unwrap(), 0);
    assert_eq!(r(&t, INTERRUPT_STATUS), 0);
    assert_eq!(irq_count(&irq), 0);
    // After DRIVER_OK the pending request is served.
    w(&mut t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(*disk.flushes.lock().unwrap(), 1);
    // A notify naming a queue that does not exist is ignored.
    w(&mut t, QUEUE_NOTIFY, 7);
}

#[test]
fn completed_request_signals_the_irqfd() {
    let mem = mem();
    let mut d = Driver::new(&mem, 16);
    let (mut t, _, irq) = live_blk(&mem, 16);
    assert_eq!(irq_count(&irq), 0);
    add_flush(&mem, &mut d);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(BLK_STATUS)).unwrap(), 0);
    assert_eq!(irq_count(&irq), 1);
    assert_eq!(r(&t, INTERRUPT_STATUS), 1);
    w(&mut t, INTERRUPT_ACK, 1);
    assert_eq!(r(&t, INTERRUPT_STATUS), 0);
    // A notify with nothing new raises nothing.
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(irq_count(&irq), 0);
    assert_eq!(r(&t, INTERRUPT_STATUS), 0);
    // Two more requests, two more signals (the eventfd counter adds up).
    add_flush(&mem, &mut d);
    w(&mut t, QUEUE_NOTIFY, 0);
    add_flush(&mem, &mut d);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(irq_count(&irq), 2);
}

#[test]
fn no_interrupt_flag_suppresses_the_irqfd_but_not_the_status() {
    let mem = mem();
    let mut d = Driver::new(&mem, 16);
    let (mut t, _, irq) = live_blk(&mem, 16);
    d.set_avail_flags(&mem, VRING_AVAIL_F_NO_INTERRUPT as u16);
    add_flush(&mem, &mut d);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(irq_count(&irq), 0);
    assert_eq!(r(&t, INTERRUPT_STATUS), 1);
}

#[test]
fn transport_without_irqfd_works() {
    let mem = mem();
    let mut d = Driver::new(&mem, 16);
    let mut t = MmioTransport::new(
        Box::new(Block::new(Box::new(MemDisk::new(4096)), b"")),
        mem.clone(),
        None,
    )
    .unwrap();
    assert!(t.irq().is_none());
    let f = t.device().avail_features();
    negotiate(&mut t, f);
    set_queue(&mut t, 16, DESC_ADDR, AVAIL_ADDR, USED_ADDR);
    w(&mut t, QUEUE_READY, 1);
    w(&mut t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    add_flush(&mem, &mut d);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(r(&t, INTERRUPT_STATUS), 1);
}

#[test]
fn malformed_chain_sets_needs_reset() {
    let mem = mem();
    let mut d = Driver::new(&mem, 16);
    let (mut t, disk, irq) = live_blk(&mem, 16);
    // A self-looping descriptor.
    let head = d.store_raw(&[(BLK_STATUS, 1, VRING_DESC_F_NEXT as u16, 0)]);
    d.publish(head);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(
        r(&t, STATUS),
        ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
    );
    assert_eq!(r(&t, INTERRUPT_STATUS) & 2, 2, "configuration change");
    assert_eq!(irq_count(&irq), 1);
    // Further notifications are ignored until a reset.
    add_flush(&mem, &mut d);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 0);
    assert_eq!(*disk.flushes.lock().unwrap(), 0);
    // A status write that echoes NEEDS_RESET back does not clear it.
    w(
        &mut t,
        STATUS,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET,
    );
    assert_eq!(r(&t, STATUS) & NEEDS_RESET, NEEDS_RESET);
    // Reset and set up again: the device works.
    w(&mut t, STATUS, 0);
    assert_eq!(r(&t, STATUS), 0);
    let mut d = Driver::new(&mem, 16);
    let f = t.device().avail_features();
    negotiate(&mut t, f);
    set_queue(&mut t, 16, DESC_ADDR, AVAIL_ADDR, USED_ADDR);
    w(&mut t, QUEUE_READY, 1);
    w(&mut t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    add_flush(&mem, &mut d);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(*disk.flushes.lock().unwrap(), 1);
}

#[test]
fn odd_sized_and_misaligned_register_accesses_are_ignored() {
    let mem = mem();
    let (mut t, _, _) = blk(&mem);
    let mut b2 = [0xffu8; 2];
    t.read(MAGIC, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b8 = [0xffu8; 8];
    t.read(MAGIC, &mut b8);
    assert_eq!(b8, [0; 8]);
    let mut b4 = [0xffu8; 4];
    t.read(MAGIC + 2, &mut b4);
    assert_eq!(b4, [0; 4]);
    let mut b0 = [0u8; 0];
    t.read(STATUS, &mut b0);
    t.write(STATUS, &[]);
    t.write(STATUS, &[ACK as u8]);
    t.write(STATUS, &[ACK as u8, 0]);
    t.write(STATUS + 1, &ACK.to_le_bytes());
    t.write(STATUS, &[ACK as u8, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r(&t, STATUS), 0);
    // Unknown and read-only registers.
    w(&mut t, MAGIC, 0);
    w(&mut t, 0xf0, 1);
    assert_eq!(r(&t, MAGIC), 0x7472_6976);
    assert_eq!(r(&t, 0xf0), 0);
    assert_eq!(r(&t, QUEUE_NUM), 0, "write-only registers read as 0");
    // Far past the configuration space.
    t.read(u64::MAX - 3, &mut b4);
    assert_eq!(b4, [0; 4]);
    t.write(u64::MAX - 3, &[1, 2, 3, 4]);
}

#[test]
fn config_space_reads_of_any_width() {
    let mem = mem();
    let (t, _, _) = blk(&mem);
    // 64 KiB disk: capacity 128 sectors.
    assert_eq!(r(&t, CONFIG), 128);
    assert_eq!(r(&t, CONFIG + 4), 0);
    let mut b8 = [0u8; 8];
    t.read(CONFIG, &mut b8);
    assert_eq!(u64::from_le_bytes(b8), 128);
    let mut b1 = [0u8; 1];
    t.read(CONFIG, &mut b1);
    assert_eq!(b1, [128]);
    let mut b2 = [0u8; 2];
    t.read(CONFIG + 20, &mut b2);
    assert_eq!(u16::from_le_bytes(b2), 512);
    // Writes to read-only config change nothing.
    let mut t = t;
    t.write(CONFIG, &[0; 8]);
    assert_eq!(r(&t, CONFIG), 128);
}

#[test]
fn invalid_device_queue_size_is_an_error() {
    struct Bad;
    impl VirtioDevice for Bad {
        fn device_type(&self) -> u32 {
            0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[3]
        }
        fn avail_features(&self) -> u64 {
            FEATURE_VERSION_1
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn process_queue(
            &mut self,
            _: usize,
            _: &GuestMem,
            _: &mut virtio_queue::Queue,
        ) -> Result<bool, DeviceError> {
            Ok(false)
        }
    }
    assert!(MmioTransport::new(Box::new(Bad), mem(), None).is_err());
}

#[test]
fn activate_and_reset_reach_the_device() {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<String>>>);
    struct Dev(Calls);
    impl VirtioDevice for Dev {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8, 4]
        }
        fn avail_features(&self) -> u64 {
            FEATURE_VERSION_1 | 1
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0xab);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.0
                 .0
                .lock()
                .unwrap()
                .push(format!("config {offset} {data:?}"));
        }
        fn activate(&mut self, acked: u64) {
            self.0
                 .0
                .lock()
                .unwrap()
                .push(format!("activate {acked:#x}"));
        }
        fn reset(&mut self) {
            self.0 .0.lock().unwrap().push("reset".into());
        }
        fn process_queue(
            &mut self,
            index: usize,
            _: &GuestMem,
            _: &mut virtio_queue::Queue,
        ) -> Result<bool, DeviceError> {
            self.0 .0.lock().unwrap().push(format!("queue {index}"));
            Ok(false)
        }
    }
    let calls = Calls::default();
    let mem = mem();
    let mut t = MmioTransport::new(Box::new(Dev(calls.clone())), mem, None).unwrap();
    w(&mut t, QUEUE_SEL, 1);
    assert_eq!(r(&t, QUEUE_NUM_MAX), 4);
    assert_eq!(r(&t, CONFIG + 3), 0xabab_abab);
    t.write(CONFIG + 2, &[1, 2]);
    negotiate(&mut t, FEATURE_VERSION_1);
    // Queue 1 with size 4 on the test ring.
    w(&mut t, QUEUE_SEL, 1);
    w(&mut t, QUEUE_NUM, 4);
    w(&mut t, QUEUE_DESC_LOW, DESC_ADDR as u32);
    w(&mut t, QUEUE_AVAIL_LOW, AVAIL_ADDR as u32);
    w(&mut t, QUEUE_USED_LOW, USED_ADDR as u32);
    w(&mut t, QUEUE_READY, 1);
    assert_eq!(r(&t, QUEUE_READY), 1);
    w(&mut t, QUEUE_SEL, 0);
    assert_eq!(r(&t, QUEUE_READY), 0);
    w(&mut t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    w(&mut t, QUEUE_NOTIFY, 0); // not ready: ignored
    w(&mut t, QUEUE_NOTIFY, 1);
    w(&mut t, STATUS, 0);
    assert_eq!(
        *calls.0.lock().unwrap(),
        vec![
            "config 2 [1, 2]".to_string(),
            format!("activate {FEATURE_VERSION_1:#x}"),
            "queue 1".to_string(),
            "reset".to_string(),
        ]
    );
}

/// The register sequence of virtio-drivers 0.13's `VirtIOBlk` over its
/// modern `MmioTransport` (the project's guest driver), replayed step by
/// step: probe, `begin_init`, config read, `VirtQueue::new`, `finish_init`,
/// requests framed as it frames them, then `Drop` (`queue_unset`, reset).
#[test]
fn virtio_drivers_blk_lifecycle() {
    let mem = mem();
    let (mut t, disk, _) = blk(&mem);
    // MmioTransport::new_from_unique
    assert_eq!(r(&t, MAGIC), 0x7472_6976);
    assert_eq!(r(&t, DEVICE_ID), 2);
    assert_eq!(r(&t, VERSION), 2);
    // begin_init
    w(&mut t, STATUS, 0);
    w(&mut t, STATUS, ACK | DRIVER);
    w(&mut t, DEVICE_FEATURES_SEL, 0);
    let mut dev_features = u64::from(r(&t, DEVICE_FEATURES));
    w(&mut t, DEVICE_FEATURES_SEL, 1);
    dev_features += u64::from(r(&t, DEVICE_FEATURES)) << 32;
    // RO | FLUSH | RING_INDIRECT_DESC | RING_EVENT_IDX | VERSION_1
    let supported: u64 = 1 << 5 | 1 << 9 | 1 << 28 | 1 << 29 | 1 << 32;
    let negotiated = dev_features & supported;
    assert_eq!(negotiated, 1 << 9 | 1 << 32);
    w(&mut t, DRIVER_FEATURES_SEL, 0);
    w(&mut t, DRIVER_FEATURES, negotiated as u32);
    w(&mut t, DRIVER_FEATURES_SEL, 1);
    w(&mut t, DRIVER_FEATURES, (negotiated >> 32) as u32);
    w(&mut t, STATUS, ACK | DRIVER | FEATURES_OK);
    // capacity through read_consistent
    let gen = r(&t, CONFIG_GENERATION);
    let capacity = u64::from(r(&t, CONFIG)) | u64::from(r(&t, CONFIG + 4)) << 32;
    assert_eq!(r(&t, CONFIG_GENERATION), gen);
    assert_eq!(capacity, 128);
    // VirtQueue::<_, 16>::new: queue_used, max_queue_size, queue_set
    w(&mut t, QUEUE_SEL, 0);
    assert_eq!(r(&t, QUEUE_READY), 0);
    w(&mut t, QUEUE_SEL, 0);
    assert!(r(&t, QUEUE_NUM_MAX) >= 16);
    set_queue(&mut t, 16, DESC_ADDR, AVAIL_ADDR, USED_ADDR);
    w(&mut t, QUEUE_READY, 1);
    // finish_init
    w(&mut t, STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(r(&t, STATUS), ACK | DRIVER | FEATURES_OK | DRIVER_OK);

    // write_blocks(3, 512 bytes): [req] readable, [resp] writable.
    let mut d = Driver::new(&mem, 16);
    let req = |ty: u32, sector: u64| {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    };
    let (hdr, data, resp) = (DATA, DATA + 0x1000, DATA + 0x2000);
    mem.write_slice(&req(1, 3), GuestAddress(hdr)).unwrap();
    mem.write_slice(&[0x42; 512], GuestAddress(data)).unwrap();
    d.add(&[D(hdr, 16, false), D(data, 512, false), D(resp, 1, true)]);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(resp)).unwrap(), 0);
    assert_eq!(disk.data.lock().unwrap()[3 * 512..4 * 512], [0x42; 512]);
    // read_blocks(3): [req] readable, [buf, resp] writable.
    mem.write_slice(&req(0, 3), GuestAddress(hdr)).unwrap();
    d.add(&[
        D(hdr, 16, false),
        D(data + 512, 512, true),
        D(resp, 1, true),
    ]);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(d.used(1).1, 513);
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(data + 512)).unwrap();
    assert_eq!(back, [0x42; 512]);
    // flush, device_id
    mem.write_slice(&req(4, 0), GuestAddress(hdr)).unwrap();
    d.add(&[D(hdr, 16, false), D(resp, 1, true)]);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(*disk.flushes.lock().unwrap(), 1);
    mem.write_slice(&req(8, 0), GuestAddress(hdr)).unwrap();
    d.add(&[D(hdr, 16, false), D(data, 20, true), D(resp, 1, true)]);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(d.used(3).1, 21);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(resp)).unwrap(), 0);

    // Drop for VirtIOBlk: queue_unset(0) waits for QueueReady to read 0.
    w(&mut t, QUEUE_SEL, 0);
    w(&mut t, QUEUE_READY, 0);
    assert_eq!(r(&t, QUEUE_READY), 0, "virtio-drivers would spin here");
    set_queue(&mut t, 0, 0, 0, 0);
    // A notify on the disabled queue does nothing.
    d.add(&[D(hdr, 16, false), D(resp, 1, true)]);
    w(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(d.used_idx(), 4);
    // Drop for MmioTransport: reset.
    w(&mut t, STATUS, 0);
    assert_eq!(r(&t, STATUS), 0);
}
