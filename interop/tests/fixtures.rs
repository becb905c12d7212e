//! The kernel-written fixtures decode, and their logs hold what the workload
//! that made them wrote.

use interop::cases::kernel_writes_content;
use pcache::backing::ZeroBacking;
use pcache::cache_key::{record_keys, replay, walk_log, CachePos, Rules};
use pcache::format::data_pos;
use pcache::inspect::{inspect, InspectOptions};
use pcache::pmem::{Pmem, SparsePmem};
use pcache::{start, Mode, NoHooks, Options, Outcome};
use std::path::Path;

fn fixture(name: &str) -> SparsePmem {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    let img = interop::image::read_zst(&path).unwrap();
    assert_eq!(img.size(), 512 << 20, "{name}: decompressed size");
    img
}

#[test]
fn the_kernels_log_replays_to_the_content_its_workload_wrote() {
    let img = fixture("kernel-writes-512M.img.zst");
    let rep = inspect(&img, &InspectOptions::default()).unwrap();
    assert_eq!((rep.log.ksets, rep.log.keys, rep.log.lasts), (4, 325, 0));
    assert_eq!(rep.log.end_is_ordinary, Some(true));
    let end = rep.log.end.as_ref().unwrap().pos;
    assert_eq!((end.cache_seg_id, end.seg_off), (0, 13096));

    // Apply every key in log order over a zeroed backing device (a later key
    // wins where they overlap): the logical content of the first 6 MiB.
    let chain: Vec<u32> = (0..31).collect();
    let mut logical = vec![0u8; 6 << 20];
    walk_log(&img, &chain, CachePos::default(), |r| {
        for k in record_keys(r) {
            let (off, len) = (k.off.get() as usize, k.len.get() as usize);
            let src = data_pos(k.cache_seg_id.get(), k.cache_seg_off.get());
            img.read(src, &mut logical[off..off + len]).unwrap();
        }
    });
    for (off, &b) in logical.iter().enumerate() {
        let want = kernel_writes_content(off as u64);
        assert_eq!(b, want, "logical byte {off:#x}");
    }

    // The module opens it in both modes and serves the same content through
    // its read path (cached ranges from pmem, the zeroed backing disk of the
    // kernel's run elsewhere).
    let r = replay(
        &img,
        &chain,
        &[0; 31],
        CachePos::default(),
        false,
        Rules::Ours,
    )
    .unwrap();
    assert_eq!((r.key_head.cache_seg_id, r.key_head.seg_off), (0, 13096));
    assert_eq!(r.stale, 0);
    for mode in [Mode::Strict, Mode::Recover] {
        let mut copy = img.clone();
        let a = start(
            &mut copy,
            &Options {
                mode,
                data_crc: false,
            },
            &mut NoHooks,
        );
        assert_eq!(a.report.outcome, Outcome::Opened, "{mode:?}: {}", a.report);
        let mut cache = a.cache.unwrap();
        let mut disk = ZeroBacking {
            sectors: (64 << 20) / 512,
        };
        let mut through = vec![0u8; logical.len()];
        cache
            .read(&mut copy, &mut disk, &mut NoHooks, 0, &mut through)
            .unwrap();
        assert!(
            through == logical,
            "{mode:?}: the module's reads disagree with the log applied in order"
        );
    }
}
