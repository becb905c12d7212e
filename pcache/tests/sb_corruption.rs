//! Every single-byte corruption of the superblock of a formatted image gives
//! the outcome the table gives, in both modes, and never panics.
//!
//! A single changed byte of the 24 always breaks the CRC (CRC-32C detects every
//! burst of up to 32 bits), and the magic can never become 0 or stay pcache's
//! when one of its bytes changes unless it is that byte. So: a byte of the
//! magic ⇒ a foreign magic with a wrong CRC; any other byte ⇒ pcache's magic
//! with a wrong CRC. The rest of the cache is intact and agrees with the device
//! size, so strict mode refuses (the kernel's "corrupted sb" or wrong magic)
//! and recover mode rebuilds the superblock, byte-identical to the original,
//! after which the cache opens in either mode.

mod common;

use common::*;
use pcache::format::SB_OFF;
use pcache::{Mode, Outcome, Refusal, SbState};

#[test]
fn every_single_byte_corruption() {
    let base = formatted(SIZE_512M, Mode::Recover);
    let good = read_vec(&base, SB_OFF, 24);
    let mut cases = 0;
    for i in 0..24usize {
        for v in 0..=255u8 {
            if v == good[i] {
                continue;
            }
            let mut dev = base.clone();
            dev.write_bytes(SB_OFF + i as u64, &[v]).unwrap();

            let mut strict = dev.clone();
            let r = act(&mut strict, Mode::Strict);
            assert_eq!(r.outcome, Outcome::Refused, "byte {i} = {v:#x}: {r}");
            match (i, r.refusal.as_ref().unwrap(), r.superblock.unwrap()) {
                (8..=15, Refusal::NotPcache { .. }, SbState::BadMagic { crc_ok: false, .. }) => {}
                (
                    0..=7 | 16..=23,
                    Refusal::CorruptedSuperblock { .. },
                    SbState::CrcMismatch { .. },
                ) => {}
                (_, f, s) => panic!("byte {i} = {v:#x}: strict refused with {f} (sb {s})"),
            }
            assert!(strict.same_bytes(&dev), "strict refusal wrote");

            let mut rec = dev.clone();
            let r = act(&mut rec, Mode::Recover);
            assert_eq!(
                r.outcome,
                Outcome::SuperblockRebuilt,
                "byte {i} = {v:#x}: {r}"
            );
            assert_eq!(read_vec(&rec, SB_OFF, 24), good, "byte {i} = {v:#x}");
            assert_eq!(r.cache_info.unwrap().seq, 2);
            // Checking the follow-up open for every value would only repeat
            // the same image; do it for one value per byte.
            if v == good[i] ^ 0x80 {
                for mode in MODES {
                    let mut again = rec.clone();
                    assert_eq!(act(&mut again, mode).outcome, Outcome::Opened);
                }
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 24 * 255);
}

/// The rest of the superblock region (bytes 24..4095) is not interpreted.
#[test]
fn bytes_after_the_record_do_not_matter() {
    let base = formatted(SIZE_512M, Mode::Recover);
    for i in [24u64, 25, 100, 4095] {
        let mut dev = base.clone();
        dev.write_bytes(SB_OFF + i, &[0xA5]).unwrap();
        for mode in MODES {
            assert_eq!(act(&mut dev.clone(), mode).outcome, Outcome::Opened);
        }
    }
}
