//! The host half of `module-writes`, without QEMU: the workloads cover what
//! they claim, the module writes them, and its own replay reads back exactly
//! the byte-array model, in both modes, with and without data CRC, on a
//! blank device and on the kernel-written fixture.

use interop::cases::kernel_writes_content;
use interop::module_images::{first_sector_difference, Step};
use interop::module_writes::{
    appended_workload, fresh_workload, write_image, FIXTURE_DISK, FRESH_DISK,
};
use pcache::pmem::SparsePmem;
use pcache::Mode;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn writes(steps: &[Step]) -> Vec<(u64, u64, bool)> {
    steps
        .iter()
        .filter_map(|s| match *s {
            Step::Write {
                lba, sectors, fua, ..
            } => Some((lba * 512, sectors * 512, fua)),
            _ => None,
        })
        .collect()
}

#[test]
fn the_fresh_workload_covers_what_the_case_promises() {
    let steps = fresh_workload();
    let w = writes(&steps);
    assert!(w.len() > 2 * 128, "enough keys for two full key-sets");
    let crosses = |b: u64| w.iter().any(|&(off, len, _)| off < b && off + len > b);
    assert!(crosses(4 * MIB) && crosses(8 * MIB) && crosses(12 * MIB));
    assert!(w.iter().filter(|x| x.2).count() >= 5, "FUA writes");
    assert_eq!(steps.iter().filter(|s| **s == Step::Flush).count(), 1);
    assert!(w
        .iter()
        .any(|&(off, len, _)| len == 3 * 512 && off / 512 % 2 == 1));
    assert!(w.iter().any(|&(off, len, _)| off + len == FRESH_DISK));
    assert!(
        w.iter().map(|x| x.1).sum::<u64>() > 16 * MIB,
        "more than a data segment"
    );
    // Overlaps: some write covers bytes an earlier one wrote.
    let overlaps = w.iter().enumerate().any(|(i, &(o, l, _))| {
        w[..i]
            .iter()
            .any(|&(p, m, _)| o < p + m && p < o + l && (o, l) != (p, m))
    });
    assert!(overlaps);
}

#[test]
fn the_module_reads_back_its_own_writes_in_every_variant() {
    for mode in [Mode::Strict, Mode::Recover] {
        for data_crc in [false, true] {
            let w = write_image(
                SparsePmem::new(512 * MIB),
                vec![0; FRESH_DISK as usize],
                mode,
                data_crc,
                &fresh_workload(),
            )
            .unwrap_or_else(|e| panic!("{mode:?} data_crc {data_crc}: {e}"));
            // Every key after the flush waits for deactivate (the write across
            // 8 MiB is two keys): 5 odd writes in 6 keys, and the last 20.
            assert_eq!(w.open_at_deactivate, 26);
            // Strict's replay is the kernel's; recover's must open the same log.
            assert_eq!(w.strict_status, w.own_status, "{mode:?} {data_crc}");
            let f: Vec<&str> = w.strict_status.split_whitespace().collect();
            assert_eq!(f[0], "0", "sb_flags");
            assert_eq!(
                f[5],
                if data_crc { "1183" } else { "1182" },
                "cache_info flags"
            );
            assert!(
                f[3].parse::<u32>().unwrap() >= 3,
                "a log and two data segments"
            );
            // key_head is the last record boundary.
            assert_eq!(
                w.facts.last().map(|(c, o)| format!("{c}:{o}")).as_deref(),
                Some(f[6])
            );
            // The model holds every write's last version, and the gaps stay zero.
            let mut sector = [0u8; 512];
            sector.copy_from_slice(&w.expected[..512]);
            assert!(matches!(
                workload::classify(0, &sector),
                workload::Tag::Write(_)
            ));
            let gap = 125 * 8192 + 4096;
            assert!(w.expected[gap..gap + 4096].iter().all(|&b| b == 0));
        }
    }
}

#[test]
fn appended_writes_over_the_kernels_log_read_back_in_both_modes() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kernel-writes-512M.img.zst");
    let base = interop::image::read_zst(&fixture).unwrap();
    let initial: Vec<u8> = (0..FIXTURE_DISK).map(kernel_writes_content).collect();
    for mode in [Mode::Strict, Mode::Recover] {
        let w = write_image(
            base.clone(),
            initial.clone(),
            mode,
            false,
            &appended_workload(),
        )
        .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert_eq!(w.strict_status, w.own_status, "{mode:?}");
        // The kernel's log comes first: our records start where it did.
        assert_eq!(w.facts.first(), Some(&(0, 0)));
        assert!(w.facts.len() > 4 + 2);
        // Kernel content the workload did not touch is still there.
        assert_eq!(w.expected[2 * 4096], b'C');
        assert_eq!(w.expected[2 * MIB as usize], 0);
        assert!(w.expected[4 * MIB as usize + 1024..4 * MIB as usize + 4096]
            .iter()
            .all(|&b| b == b'Y'));
    }
}

#[test]
fn a_misplaced_sector_is_named_with_both_contents() {
    let mut a = vec![0u8; 8 * 512];
    workload::fill(3, 0, &mut a);
    let mut b = a.clone();
    // Sector 5 of b holds sector 6's content.
    let (lo, hi) = b.split_at_mut(6 * 512);
    lo[5 * 512..].copy_from_slice(&hi[..512]);
    let d = first_sector_difference(&b, &a).unwrap();
    assert_eq!(d.sector, 5);
    assert_eq!(d.b, "write 3's sector 5");
    assert_eq!(
        d.a,
        "a pattern sector naming write 3 and sector 6 (torn or misplaced)"
    );
    assert_eq!(first_sector_difference(&a, &a), None);
    let z = vec![0u8; 512];
    let y = vec![b'Y'; 512];
    let d = first_sector_difference(&z, &y).unwrap();
    assert_eq!((d.a.as_str(), d.b.as_str()), ("512 × 0x00", "512 × 0x59"));
}
