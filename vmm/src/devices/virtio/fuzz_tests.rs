//! Random guest input: descriptor tables, rings and register accesses made of
//! noise must never panic or hang the devices (deterministic seeds, so a
//! failure reproduces).

use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::testutil::{
    mem, Driver, FakePmem, MemDisk, AVAIL_ADDR, DATA, DESC_ADDR, MEM_SIZE, USED_ADDR,
};
use super::*;

/// xorshift64*: small, deterministic, good enough for noise.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// An address: mostly in the data area, sometimes anywhere.
    fn addr(&mut self) -> u64 {
        match self.below(8) {
            0 => self.next(),
            1 => MEM_SIZE - self.below(64),
            2 => DESC_ADDR + self.below(0x3000),
            _ => DATA + self.below(0x1_0000),
        }
    }
    fn len(&mut self) -> u32 {
        match self.below(8) {
            0 => self.next() as u32,
            1 => 0,
            2 => 16,
            3 => 1,
            4 => 4,
            _ => (self.below(4) * 512) as u32 + self.below(2) as u32,
        }
    }
    fn flags(&mut self) -> u16 {
        let mut f = 0;
        if self.below(3) != 0 {
            f |= VRING_DESC_F_NEXT as u16;
        }
        if self.below(2) == 0 {
            f |= VRING_DESC_F_WRITE as u16;
        }
        if self.below(16) == 0 {
            f |= VRING_DESC_F_INDIRECT as u16;
        }
        f
    }
}

/// Fills a queue of `size` with random descriptors (some with plausible
/// blk/pmem headers behind them) and random available entries.
fn noise_queue<'a>(rng: &mut Rng, mem: &'a GuestMem, size: u16) -> Driver<'a> {
    let mut d = Driver::new(mem, size);
    let descs: Vec<_> = (0..size)
        .map(|_| {
            let next = if rng.below(8) == 0 {
                rng.next() as u16
            } else {
                rng.below(u64::from(size)) as u16
            };
            (rng.addr(), rng.len(), rng.flags(), next)
        })
        .collect();
    d.store_raw(&descs);
    // Plausible request headers in the data area.
    for _ in 0..8 {
        let mut h = [0u8; 16];
        let ty = [0u32, 1, 4, 8, 11, rng.next() as u32][rng.below(6) as usize];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&rng.below(200).to_le_bytes());
        let at = DATA + rng.below(0x1_0000 - 16);
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }
    for _ in 0..rng.below(u64::from(size) + 1) {
        let head = if rng.below(8) == 0 {
            rng.next() as u16
        } else {
            rng.below(u64::from(size)) as u16
        };
        d.publish(head);
    }
    if rng.below(16) == 0 {
        d.set_avail_idx(rng.next() as u16);
    }
    d
}

#[test]
fn random_chains_never_panic_or_hang() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let start = Instant::now();
    let mut total_used = 0u32;
    for round in 0..400 {
        let mem = mem();
        let size = [1u16, 2, 4, 16, 64, 256][rng.below(6) as usize];
        let d = noise_queue(&mut rng, &mem, size);
        let mut q = d.queue();
        let t = Instant::now();
        if round % 2 == 0 {
            let mut disk = MemDisk::new(64 * 1024);
            disk.fail = rng.below(8) == 0;
            let mut dev = Block::new(Box::new(disk), b"fuzz");
            let _ = dev.process_queue(0, &mem, &mut q);
            // Whatever happened, a second pass is harmless too.
            let _ = dev.process_queue(0, &mem, &mut q);
        } else {
            let backend = FakePmem {
                fail: rng.below(8) == 0,
                ..FakePmem::default()
            };
            let mut dev = Pmem::new(1 << 32, 1 << 29, Box::new(backend));
            let _ = dev.process_queue(0, &mem, &mut q);
            let _ = dev.process_queue(0, &mem, &mut q);
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "round {round} too slow"
        );
        let used = d.used_idx();
        assert!(used <= size, "round {round}: {used} used of {size}");
        total_used += u32::from(used);
    }
    // Some noise forms completable requests, so the handlers ran too.
    assert!(total_used > 50, "{total_used}");
    assert!(start.elapsed() < Duration::from_secs(60));
}

#[test]
fn random_register_accesses_never_panic() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mem = mem();
    let mut served = 0;
    for round in 0..50 {
        let dev: Box<dyn VirtioDevice> = if round % 2 == 0 {
            Box::new(Block::new(Box::new(MemDisk::new(4096)), b"fuzz"))
        } else {
            Box::new(Pmem::new(1 << 32, 1 << 29, Box::new(FakePmem::default())))
        };
        let mut t = MmioTransport::new(dev, mem.clone(), None).unwrap();
        // Go part or all of the way through a correct initialisation onto a
        // ring full of noise, then throw random accesses at it.
        let size = [1u16, 4, 16, 256][rng.below(4) as usize];
        let _d = noise_queue(&mut rng, &mem, size);
        let steps = rng.below(6);
        let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
        if steps > 0 {
            w(&mut t, 0x70, 1);
        }
        if steps > 1 {
            w(&mut t, 0x70, 3);
        }
        if steps > 2 {
            let f = t.device().avail_features();
            w(&mut t, 0x24, 0);
            w(&mut t, 0x20, f as u32);
            w(&mut t, 0x24, 1);
            w(&mut t, 0x20, (f >> 32) as u32);
            w(&mut t, 0x70, 11);
        }
        if steps > 3 {
            w(&mut t, 0x38, size.into());
            w(&mut t, 0x80, DESC_ADDR as u32);
            w(&mut t, 0x90, AVAIL_ADDR as u32);
            w(&mut t, 0xa0, USED_ADDR as u32);
            w(&mut t, 0x44, 1);
        }
        if steps > 4 {
            w(&mut t, 0x70, 15);
            assert_eq!(t.status(), 15);
        }
        for _ in 0..2000 {
            let off = match rng.below(5) {
                0 => rng.next() % (MMIO_WINDOW_SIZE + 16),
                1 => rng.next(),
                2 => 0x50, // QueueNotify
                _ => rng.below(0x30) * 4,
            };
            let len = [0usize, 1, 2, 3, 4, 4, 4, 8, 16][rng.below(9) as usize];
            if rng.below(2) == 0 {
                let mut buf = vec![0u8; len];
                t.read(off, &mut buf);
            } else {
                // Values that sometimes make sense for the register.
                let v: u32 = match rng.below(4) {
                    0 => rng.next() as u32,
                    1 => [0, 1, 3, 7, 11, 15][rng.below(6) as usize],
                    2 => [16, 256, DESC_ADDR as u32, AVAIL_ADDR as u32, 0x2000]
                        [rng.below(5) as usize],
                    _ => 1 << rng.below(32),
                };
                let bytes = v.to_le_bytes();
                let mut buf = bytes.to_vec();
                buf.resize(len, 0);
                t.write(off, &buf);
            }
            if t.status() & 4 != 0 && t.interrupt_status() != 0 {
                served += 1;
            }
            // Random noise may reset the device: re-randomise the ring's
            // contents now and then so notifies keep finding work.
            if rng.below(200) == 0 {
                let _ = noise_queue(&mut rng, &mem, size);
            }
        }
    }
    // The noise reached the request path, not only the register decoder.
    assert!(served > 0);
}
