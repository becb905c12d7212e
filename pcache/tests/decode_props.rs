//! Property tests: arbitrary bytes decode as every record type without a panic
//! or an out-of-bounds read, and decoding then re-encoding gives the bytes back.

use pcache::cache_key::{replay, walk_log, walk_log_with, CachePos, Rules};
use pcache::format::*;
use pcache::meta::read_slots;
use pcache::pmem::SparsePmem;
use pcache::records::*;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn superblock_any_bytes(b in proptest::collection::vec(any::<u8>(), 24)) {
        let sb = Superblock::read_from_prefix(&b).unwrap().0;
        prop_assert_eq!(sb.as_bytes().to_vec(), b.clone());
        let _ = sb.crc_ok();
        let state = pcache::cache_dev::classify_sb(&sb, 512 << 20);
        let _ = format!("{state}");
    }

    #[test]
    fn meta_records_any_bytes(b in proptest::collection::vec(any::<u8>(), 24)) {
        let ci = CacheInfo::read_from_prefix(&b).unwrap().0;
        prop_assert_eq!(ci.as_bytes().to_vec(), b.clone());
        let _ = (ci.crc_ok(), ci.init_done(), ci.data_crc(), ci.gc_percent(), ci.cache_mode());
        let p = CachePosOnMedia::read_from_prefix(&b).unwrap().0;
        prop_assert_eq!(p.as_bytes().to_vec(), b[..16].to_vec());
        let si = SegInfo::read_from_prefix(&b).unwrap().0;
        prop_assert_eq!(si.as_bytes().to_vec(), b[..16].to_vec());
        let _ = (si.crc_ok(), si.has_next(), si.seg_type());
        let g = SegGen::read_from_prefix(&b).unwrap().0;
        prop_assert_eq!(g.as_bytes().to_vec(), b[..16].to_vec());
        let h = KsetHeader::read_from_prefix(&b).unwrap().0;
        prop_assert_eq!(h.as_bytes().to_vec(), b.clone());
        // A record re-encoded with its CRC is valid and decodes to the same fields.
        let fixed = CacheInfo::read_from_bytes(&ci.to_bytes()).unwrap();
        prop_assert!(fixed.crc_ok());
        prop_assert_eq!((fixed.seg_id, fixed.n_segs, fixed.flags), (ci.seg_id, ci.n_segs, ci.flags));
    }

    #[test]
    fn key_any_bytes(b in proptest::collection::vec(any::<u8>(), 40), n_segs in any::<u32>()) {
        let k = KeyOnMedia::read_from_prefix(&b).unwrap().0;
        prop_assert_eq!(k.as_bytes().to_vec(), b);
        if k.validate(n_segs).is_ok() {
            prop_assert!(k.cache_seg_id.get() < n_segs);
            prop_assert!(k.cache_seg_off.get() as u64 + k.len.get() as u64 <= DATA_SIZE);
            prop_assert!(k.len.get() > 0);
        }
    }

    /// Arbitrary bytes of any length, with and without the magic forced in.
    #[test]
    fn kset_any_bytes(
        mut b in proptest::collection::vec(any::<u8>(), 0..6000),
        magic in any::<bool>(),
        key_num in prop_oneof![any::<u32>(), 0u32..200],
        n_segs in any::<u32>(),
    ) {
        if magic && b.len() >= 24 {
            b[8..16].copy_from_slice(&KSET_MAGIC.to_le_bytes());
            b[4..8].copy_from_slice(&key_num.to_le_bytes());
        }
        match decode_kset(&b, n_segs) {
            Ok(k) => {
                prop_assert!(k.size() <= b.len());
                prop_assert_eq!(k.to_bytes(), b[..k.size()].to_vec());
            }
            Err(e) => { let _ = format!("{e}"); }
        }
    }

    /// Well-formed key-sets with arbitrary keys: valid CRC, so key validation runs.
    #[test]
    fn kset_with_arbitrary_keys(
        keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 40), 1..130),
        tail in 0usize..64,
        n_segs in 0u32..64,
    ) {
        let keys: Vec<KeyOnMedia> = keys.iter().map(|k| KeyOnMedia::read_from_prefix(k).unwrap().0).collect();
        let rec = Kset::Keys { keys: keys.clone() }.to_bytes();
        let mut b = rec.clone();
        b.resize(rec.len() + tail, 0);
        match decode_kset(&b, n_segs) {
            Ok(Kset::Keys { keys: got }) => {
                prop_assert!(tail >= 24 && keys.len() <= 128);
                prop_assert_eq!(got, keys);
            }
            Ok(other) => prop_assert!(false, "decoded as {:?}", other),
            // Too many keys, no room for a terminator, or a bad key: never an
            // ordinary end of log, since the CRC is right.
            Err(e) => prop_assert!(!e.is_end_of_log(), "{}", e),
        }
    }

    /// Dual-copy selection over arbitrary slot bytes.
    #[test]
    fn dual_slots_any_bytes(b in proptest::collection::vec(any::<u8>(), 32)) {
        let mut dev = SparsePmem::new(1 << 20);
        dev.write_bytes(0, &b).unwrap();
        let s = read_slots::<_, CachePosOnMedia>(&dev, 0, 16).unwrap();
        if let Some(i) = s.latest {
            prop_assert!(s.valid[i]);
        } else {
            prop_assert!(!s.valid[0] && !s.valid[1]);
        }
    }

    /// The log walker over arbitrary data-area contents and chains terminates
    /// without a panic.
    #[test]
    fn log_walk_any_bytes(
        b in proptest::collection::vec(any::<u8>(), 0..8192),
        chain in proptest::collection::vec(0u32..31, 1..8),
        start_off in 0u32..100,
        forge_last in any::<bool>(),
    ) {
        let mut dev = SparsePmem::new(512 << 20);
        for &p in &chain {
            dev.write_bytes(data_pos(p, 0), &b).unwrap();
            if forge_last {
                let l = Kset::Last { next_cache_seg_id: (p + 1) % chain.len() as u32 }.to_bytes();
                dev.write_bytes(data_pos(p, start_off), &l).unwrap();
            }
        }
        let start = CachePos { cache_seg_id: 0, seg_off: start_off };
        let s = walk_log(&dev, &chain, start, |_| {});
        prop_assert!(s.end.is_some());
        // Replay over the same bytes: an index or an error, never a panic;
        // every extent lies inside the chain and its segment's data area.
        let gens = vec![0u64; chain.len()];
        for rules in [Rules::Ours, Rules::Kernel] {
            let s = walk_log_with(&dev, &chain, start, rules, |_| {});
            for data_crc in [false, true] {
                if let Ok(r) = replay(&dev, &chain, &gens, start, data_crc, rules) {
                    for e in r.index.extents() {
                        prop_assert!((e.cache_seg_id as usize) < chain.len());
                        prop_assert!(e.cache_seg_off as u64 + e.len as u64 <= DATA_SIZE);
                    }
                    prop_assert_eq!(r.key_head, s.end.as_ref().unwrap().pos);
                }
            }
        }
    }
}
