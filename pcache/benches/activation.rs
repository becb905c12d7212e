//! Activation of a 512 MiB cache device on the host: the first activation of a
//! blank device (format, 31 segments, tails, cache_info) and a later
//! activation of a formatted one (chain walk, tails, log check, one cache_info
//! write). In memory (`VecPmem`, `SparsePmem`) and on a file mapping
//! (`MmapPmem`, where every fence is an `msync`).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use pcache::pmem::{MmapPmem, SparsePmem, VecPmem};
use pcache::{activate, Mode, NoHooks, Options, Outcome};
use std::hint::black_box;

const SIZE: u64 = 512 << 20;

fn opts() -> Options {
    Options {
        mode: Mode::Recover,
        data_crc: false,
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("activation-512MiB");
    g.sample_size(20);

    g.bench_function("first/vec", |b| {
        b.iter_batched(
            || VecPmem::new(SIZE as usize),
            |mut dev| {
                let r = activate(&mut dev, &opts(), &mut NoHooks);
                assert_eq!(r.outcome, Outcome::Formatted);
                dev
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("first/sparse", |b| {
        b.iter_batched(
            || SparsePmem::new(SIZE),
            |mut dev| {
                let r = activate(&mut dev, &opts(), &mut NoHooks);
                assert_eq!(r.outcome, Outcome::Formatted);
                dev
            },
            BatchSize::PerIteration,
        )
    });

    let mut dev = VecPmem::new(SIZE as usize);
    activate(&mut dev, &opts(), &mut NoHooks);
    g.bench_function("later/vec", |b| {
        b.iter(|| {
            let r = activate(black_box(&mut dev), &opts(), &mut NoHooks);
            assert_eq!(r.outcome, Outcome::Opened);
        })
    });

    let dir = std::env::temp_dir().join(format!("pcache-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bench.img");
    let fresh_file = || {
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(SIZE).unwrap();
        drop(f);
        MmapPmem::open(&path).unwrap()
    };
    g.bench_function("first/mmap-file", |b| {
        b.iter_batched(
            fresh_file,
            |mut dev| {
                let r = activate(&mut dev, &opts(), &mut NoHooks);
                assert_eq!(r.outcome, Outcome::Formatted);
                dev
            },
            BatchSize::PerIteration,
        )
    });
    let mut dev = fresh_file();
    activate(&mut dev, &opts(), &mut NoHooks);
    g.bench_function("later/mmap-file", |b| {
        b.iter(|| {
            let r = activate(black_box(&mut dev), &opts(), &mut NoHooks);
            assert_eq!(r.outcome, Outcome::Opened);
        })
    });
    drop(dev);
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
