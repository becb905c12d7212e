//! Image generators for scenarios without a power cut: named variants of a
//! formatted image, each a list of byte patches over it.
//!
//! - `corrupt-sb`: each superblock field corrupted in turn, in two variants:
//!   the CRC left stale (`/stale-crc`), and the CRC recomputed over the
//!   corrupted fields (`/new-crc`). The magic is only ever corrupted to a
//!   non-zero value (zero means "format me").
//! - `forged-metadata`: valid CRCs over hostile values (cache_info, tails,
//!   segment chain, key-sets).

use crate::spec::Generator;
use pcache::format::{
    cache_info_slot_off, data_pos, pcache_crc, seg_info_slot_off, seg_num_for_size, CACHE_SEGS_MAX,
    DATA_SIZE, KEY_SIZE, KEY_TAIL_OFF, KSET_HEADER_SIZE, KSET_MAGIC, SB_OFF,
};
use pcache::Pmem;

/// One generated image: its name and the patches that make it from the base.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variant {
    pub name: String,
    /// `(offset, bytes)` written over the base, in order.
    pub patches: Vec<(u64, Vec<u8>)>,
}

/// Why variants could not be made.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("reading the base image: {0}")]
    Pmem(#[from] pcache::PmemError),
    #[error("the base image is not what the generator needs: {0}")]
    Base(String),
}

/// The variants of `generator` over `base` (a formatted, activated image).
pub fn variants<P: Pmem>(generator: Generator, base: &P) -> Result<Vec<Variant>, GenerateError> {
    match generator {
        Generator::CorruptSb => corrupt_sb(base),
        Generator::ForgedMetadata => forged_metadata(base),
    }
}

fn read<const N: usize, P: Pmem>(p: &P, off: u64) -> Result<[u8; N], GenerateError> {
    let mut b = [0u8; N];
    p.read(off, &mut b)?;
    Ok(b)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes a record's CRC (bytes 0..4) over the rest of it.
fn recrc(b: &mut [u8]) {
    let crc = pcache_crc(&b[4..]);
    put_u32(b, 0, crc);
}

fn corrupt_sb<P: Pmem>(base: &P) -> Result<Vec<Variant>, GenerateError> {
    let sb: [u8; 24] = read(base, SB_OFF)?;
    let derived = seg_num_for_size(base.size()) as u32;
    if u32_at(&sb, 16) != derived {
        return Err(GenerateError::Base(format!(
            "superblock seg_num {} is not the device's {derived}",
            u32_at(&sb, 16)
        )));
    }
    // (field, byte offset in the superblock, new bytes)
    let magic = u64::from_le_bytes(sb[8..16].try_into().unwrap());
    let fields: Vec<(&str, usize, Vec<u8>)> = vec![
        (
            "flags-big-endian",
            4,
            (u32_at(&sb, 4) | 1).to_le_bytes().to_vec(),
        ),
        (
            "flags-unknown-bit",
            4,
            (u32_at(&sb, 4) | 0x100).to_le_bytes().to_vec(),
        ),
        ("magic", 8, (magic ^ 0xff00).to_le_bytes().to_vec()),
        ("seg-num-zero", 16, 0u32.to_le_bytes().to_vec()),
        ("seg-num-smaller", 16, (derived - 1).to_le_bytes().to_vec()),
        (
            "seg-num-beyond-device",
            16,
            (derived + 1).to_le_bytes().to_vec(),
        ),
        (
            "seg-num-beyond-max",
            16,
            (CACHE_SEGS_MAX + 1).to_le_bytes().to_vec(),
        ),
        ("padding", 20, 0xdead_beefu32.to_le_bytes().to_vec()),
    ];
    let mut out = Vec::new();
    for (field, at, bytes) in fields {
        let mut b = sb;
        b[at..at + bytes.len()].copy_from_slice(&bytes);
        out.push(Variant {
            name: format!("{field}/stale-crc"),
            patches: vec![(SB_OFF, b.to_vec())],
        });
        recrc(&mut b);
        out.push(Variant {
            name: format!("{field}/new-crc"),
            patches: vec![(SB_OFF, b.to_vec())],
        });
    }
    // The CRC field itself: only a stale variant exists.
    let mut b = sb;
    b[0] ^= 1;
    out.push(Variant {
        name: "crc/stale-crc".into(),
        patches: vec![(SB_OFF, b.to_vec())],
    });
    Ok(out)
}

/// Both copies of a dual-copy record, each changed by `f` and re-CRCed where
/// the copy was valid (so the latest valid copy carries the forgery).
fn forge_both<const N: usize, P: Pmem>(
    base: &P,
    slots: [u64; 2],
    f: impl Fn(&mut [u8; N]),
) -> Result<Vec<(u64, Vec<u8>)>, GenerateError> {
    let mut patches = Vec::new();
    for off in slots {
        let mut b: [u8; N] = read(base, off)?;
        if u32_at(&b, 0) != pcache_crc(&b[4..]) {
            continue; // an invalid copy stays invalid
        }
        f(&mut b);
        recrc(&mut b);
        patches.push((off, b.to_vec()));
    }
    if patches.is_empty() {
        return Err(GenerateError::Base(format!(
            "no valid copy at {:#x} / {:#x}",
            slots[0], slots[1]
        )));
    }
    Ok(patches)
}

fn forged_metadata<P: Pmem>(base: &P) -> Result<Vec<Variant>, GenerateError> {
    let seg_num = seg_num_for_size(base.size()) as u32;
    let info = [cache_info_slot_off(0), cache_info_slot_off(1)];
    let key_tail = [KEY_TAIL_OFF, KEY_TAIL_OFF + 16];
    let seg_info = |p: u32| [seg_info_slot_off(p, 0), seg_info_slot_off(p, 1)];
    let v = |name: &str, patches| Variant {
        name: name.into(),
        patches,
    };
    let mut out = vec![
        v(
            "n-segs-beyond-seg-num",
            forge_both::<24, _>(base, info, |b| put_u32(b, 12, seg_num + 1))?,
        ),
        v(
            "key-tail-past-data-area",
            forge_both::<16, _>(base, key_tail, |b| put_u32(b, 12, DATA_SIZE as u32 + 8))?,
        ),
        v(
            "key-tail-segment-out-of-range",
            forge_both::<16, _>(base, key_tail, |b| put_u32(b, 8, seg_num))?,
        ),
        // seg_info: flags at +8 (bit 0 HAS_NEXT), next_seg at +12.
        v(
            "chain-cycle",
            forge_both::<16, _>(base, seg_info(5), |b| put_u32(b, 12, 2))?,
        ),
        v(
            "chain-self-loop",
            forge_both::<16, _>(base, seg_info(3), |b| put_u32(b, 12, 3))?,
        ),
        v(
            "chain-next-out-of-range",
            forge_both::<16, _>(base, seg_info(4), |b| put_u32(b, 12, seg_num + 5))?,
        ),
    ];
    // Key-sets at the log's start (key_tail of a fresh cache: segment 0, offset 0).
    let log = data_pos(0, 0);
    let kset = |key_num: u32, flags: u64, keys: usize| {
        let mut b = vec![0u8; KSET_HEADER_SIZE + keys * KEY_SIZE];
        put_u32(&mut b, 4, key_num);
        b[8..16].copy_from_slice(&KSET_MAGIC.to_le_bytes());
        b[16..24].copy_from_slice(&flags.to_le_bytes());
        recrc(&mut b);
        b
    };
    out.push(v("kset-key-num-129", vec![(log, kset(129, 0, 129))]));
    out.push(v(
        "kset-last-next-out-of-range",
        vec![(log, kset(seg_num + 1, 1, 0))],
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcache::{activate, NoHooks, Options, Outcome, SparsePmem};

    fn formatted() -> SparsePmem {
        let mut dev = SparsePmem::new(512 << 20);
        for _ in 0..2 {
            activate(&mut dev, &Options::default(), &mut NoHooks);
        }
        dev
    }

    fn apply(base: &SparsePmem, v: &Variant) -> SparsePmem {
        let mut dev = base.clone();
        for (off, bytes) in &v.patches {
            dev.write_bytes(*off, bytes).unwrap();
        }
        dev
    }

    #[test]
    fn corrupt_sb_covers_every_field_in_both_variants() {
        let base = formatted();
        let vs = variants(Generator::CorruptSb, &base).unwrap();
        assert_eq!(vs.len(), 8 * 2 + 1);
        for v in &vs {
            let dev = apply(&base, v);
            let sb: [u8; 24] = read(&dev, SB_OFF).unwrap();
            let crc_ok = u32_at(&sb, 0) == pcache_crc(&sb[4..]);
            assert_eq!(crc_ok, v.name.ends_with("/new-crc"), "{}", v.name);
            assert_ne!(
                &sb[8..16],
                &[0u8; 8],
                "{}: the magic is never zeroed",
                v.name
            );
            assert_ne!(sb, read::<24, _>(&base, SB_OFF).unwrap(), "{}", v.name);
        }
    }

    #[test]
    fn forged_metadata_keeps_crcs_valid_and_is_refused_by_the_module() {
        let base = formatted();
        for v in variants(Generator::ForgedMetadata, &base).unwrap() {
            let mut dev = apply(&base, &v);
            let r = activate(&mut dev, &Options::default(), &mut NoHooks);
            assert_eq!(r.outcome, Outcome::Refused, "{}: {r}", v.name);
        }
    }
}

/// The shipped image-set scenarios' expectations hold for the module on the
/// host (the KVM runs check that the guest agrees).
#[cfg(test)]
mod shipped {
    use super::*;
    use crate::spec::{Recipe, Run, Scenario};
    use pcache::{activate, NoHooks, Options, SparsePmem};

    #[test]
    fn image_scenarios_expect_what_the_module_does() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for name in ["corrupt-sb", "forged-metadata"] {
            let s = Scenario::load(&dir.join(format!("{name}.json"))).unwrap();
            let Run::Images { generator } = s.run else {
                panic!("{name}: not an image set")
            };
            for e in &s.expect {
                let d = s.devices.iter().find(|d| d.name == e.device).unwrap();
                let Recipe::Formatted { activations } = d.recipe else {
                    panic!("{name}: recipe")
                };
                let opts = Options {
                    mode: e.mode,
                    data_crc: false,
                };
                let mut base = SparsePmem::new(d.pmem_size.0);
                for _ in 0..activations {
                    activate(&mut base, &opts, &mut NoHooks);
                }
                let vs = variants(generator, &base).unwrap();
                if e.mode == crate::spec::Mode::Recover || name == "corrupt-sb" {
                    assert_eq!(
                        e.per_image.len(),
                        vs.len(),
                        "{name}: every image has its expectation"
                    );
                }
                for v in vs {
                    let Some(want) = e.per_image.get(&v.name) else {
                        continue;
                    };
                    let mut dev = base.clone();
                    for (off, b) in &v.patches {
                        dev.write_bytes(*off, b).unwrap();
                    }
                    let r = activate(&mut dev, &opts, &mut NoHooks);
                    let kind = serde_json::to_value(&r.refusal).unwrap();
                    let got = match kind.get("kind").and_then(|k| k.as_str()) {
                        Some(k) => format!("{}:{k}", r.outcome),
                        None => r.outcome.to_string(),
                    };
                    assert_eq!(got, want.to_string(), "{name} {} {:?}", v.name, e.mode);
                }
            }
        }
    }
}
