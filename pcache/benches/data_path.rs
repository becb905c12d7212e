//! The data path on the host, in memory (`VecPmem`, so the figures are the
//! module's own work): a 4 KiB write (key left in the open key-set, and FUA,
//! which closes its key-set), a 4 KiB read hit, and an activation that
//! replays a log of 10,000 keys against one of an empty log.

use criterion::{criterion_group, criterion_main, Criterion};
use pcache::backing::VecBacking;
use pcache::pmem::VecPmem;
use pcache::{start, Cache, Mode, NoHooks, Options, Outcome};
use std::hint::black_box;

const SIZE: u64 = 512 << 20;
const DISK_SECTORS: u64 = (256 << 20) / 512;

fn opts() -> Options {
    Options {
        mode: Mode::Recover,
        data_crc: false,
    }
}

fn fresh() -> (VecPmem, Cache) {
    let mut dev = VecPmem::new(SIZE as usize);
    let cache = start(&mut dev, &opts(), &mut NoHooks).cache.unwrap();
    (dev, cache)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("data-path");
    g.sample_size(30);
    let disk = VecBacking::new(DISK_SECTORS);
    let data = vec![0x5au8; 4096];

    // Writes wrap over 64 MiB of logical space; a fresh cache every 40,000
    // writes keeps it from filling (40,000 × 4 KiB = 160 MiB of data).
    for (name, fua) in [("write-4k", false), ("write-4k-fua", true)] {
        let (mut dev, mut cache) = fresh();
        let mut n = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                if n == 40_000 {
                    (dev, cache) = fresh();
                    n = 0;
                }
                let off = (n * 4096) % (64 << 20);
                cache
                    .write(&mut dev, &disk, &mut NoHooks, off, black_box(&data), fua)
                    .unwrap();
                n += 1;
            })
        });
    }

    let (mut dev, mut cache) = fresh();
    let mut disk_rw = VecBacking::new(DISK_SECTORS);
    for i in 0..256u64 {
        cache
            .write(&mut dev, &disk_rw, &mut NoHooks, i * 4096, &data, false)
            .unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let mut i = 0u64;
    g.bench_function("read-4k-hit", |b| {
        b.iter(|| {
            cache
                .read(
                    &mut dev,
                    &mut disk_rw,
                    &mut NoHooks,
                    (i % 256) * 4096,
                    &mut buf,
                )
                .unwrap();
            i += 1;
            black_box(&buf);
        })
    });

    // Activations: an empty log, and one of 10,000 keys (79 key-sets).
    let (mut empty, cache) = fresh();
    pcache::deactivate(cache, &mut empty, &mut disk_rw, &mut NoHooks).unwrap();
    let (mut full, mut cache) = fresh();
    for k in 0..10_000u64 {
        cache
            .write(
                &mut full,
                &disk,
                &mut NoHooks,
                (k * 4096) % (64 << 20),
                &data,
                false,
            )
            .unwrap();
    }
    pcache::deactivate(cache, &mut full, &mut disk_rw, &mut NoHooks).unwrap();
    for (name, dev) in [
        ("open-empty-log", &mut empty),
        ("open-10000-keys", &mut full),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let a = start(black_box(&mut *dev), &opts(), &mut NoHooks);
                assert_eq!(a.report.outcome, Outcome::Opened);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
