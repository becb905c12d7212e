//! x86-64 decoding of the few instructions the trace cares about: the store
//! fences (`sfence`, `mfence`) and the cache-line write-backs (`clwb`,
//! `clflush`, `clflushopt`). All are `0F AE` with a ModRM byte:
//!
//! | bytes | ModRM | instruction |
//! |---|---|---|
//! | `0F AE` | mod=11, reg=7 | `sfence` |
//! | `0F AE` | mod=11, reg=6 | `mfence` |
//! | `0F AE` | mod≠11, reg=7 | `clflush m8` |
//! | `66 0F AE` | mod≠11, reg=7 | `clflushopt m8` |
//! | `66 0F AE` | mod≠11, reg=6 | `clwb m8` |
//!
//! (`0F AE` mod≠11 reg=6 without `66` is `xsaveopt`, reg=5 mod=11 `lfence`:
//! neither is one of ours.)

/// What an instruction is, for the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sfence,
    Mfence,
    Clflush,
    Clflushopt,
    Clwb,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sfence => "sfence",
            Kind::Mfence => "mfence",
            Kind::Clflush => "clflush",
            Kind::Clflushopt => "clflushopt",
            Kind::Clwb => "clwb",
        }
    }

    /// A store fence: every earlier store (and write-back) is ordered before
    /// what follows. The VMM's trace has one barrier, the virtio-pmem flush;
    /// a fence becomes that barrier.
    pub fn is_fence(self) -> bool {
        matches!(self, Kind::Sfence | Kind::Mfence)
    }
}

/// Decodes the instruction in `bytes` (its whole encoding, as TCG translated it).
pub fn classify(bytes: &[u8]) -> Option<Kind> {
    let mut i = 0;
    let mut opsize = false;
    // Legacy prefixes, any order, then at most one REX.
    while let Some(&b) = bytes.get(i) {
        match b {
            0x66 => opsize = true,
            0xf0 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0x67 => {}
            _ => break,
        }
        i += 1;
    }
    if matches!(bytes.get(i), Some(0x40..=0x4f)) {
        i += 1;
    }
    if bytes.get(i..i + 2) != Some(&[0x0f, 0xae]) {
        return None;
    }
    let modrm = *bytes.get(i + 2)?;
    let (md, reg) = (modrm >> 6, (modrm >> 3) & 7);
    match (md == 3, reg, opsize) {
        (true, 7, false) => Some(Kind::Sfence),
        (true, 6, false) => Some(Kind::Mfence),
        (false, 7, false) => Some(Kind::Clflush),
        (false, 7, true) => Some(Kind::Clflushopt),
        (false, 6, true) => Some(Kind::Clwb),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_encodings_are_recognised() {
        assert_eq!(classify(&[0x0f, 0xae, 0xf8]), Some(Kind::Sfence));
        assert_eq!(classify(&[0x0f, 0xae, 0xf0]), Some(Kind::Mfence));
        assert_eq!(classify(&[0x0f, 0xae, 0xe8]), None, "lfence");
        // clwb (%rdi), clwb 0x40(%rax), clflushopt (%rdi), clflush (%rax)
        assert_eq!(classify(&[0x66, 0x0f, 0xae, 0x37]), Some(Kind::Clwb));
        assert_eq!(classify(&[0x66, 0x0f, 0xae, 0x70, 0x40]), Some(Kind::Clwb));
        assert_eq!(classify(&[0x66, 0x0f, 0xae, 0x3f]), Some(Kind::Clflushopt));
        assert_eq!(classify(&[0x0f, 0xae, 0x38]), Some(Kind::Clflush));
        // With a REX prefix (clwb (%r8)) and a segment override.
        assert_eq!(classify(&[0x66, 0x41, 0x0f, 0xae, 0x30]), Some(Kind::Clwb));
        assert_eq!(classify(&[0x3e, 0x0f, 0xae, 0x38]), Some(Kind::Clflush));
        // xsaveopt (%rdi) has the clwb ModRM but no 66 prefix.
        assert_eq!(classify(&[0x0f, 0xae, 0x37]), None);
        // Not 0F AE at all: movnti, a plain mov, truncated bytes.
        assert_eq!(classify(&[0x48, 0x0f, 0xc3, 0x07]), None);
        assert_eq!(classify(&[0x48, 0x89, 0x07]), None);
        assert_eq!(classify(&[0x0f, 0xae]), None);
        assert_eq!(classify(&[]), None);
    }
}
