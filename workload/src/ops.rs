//! The operations of a workload.

use serde::{Deserialize, Serialize};

/// One operation, run in order by the guest. Offsets and lengths are bytes,
/// multiples of 512.
///
/// JSON: `{"op":"write","off":4096,"len":8192,"id":3,"fua":false}`,
/// `{"op":"flush"}`, `{"op":"close-ksets"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// Write `len` bytes of write `id`'s pattern at byte `off`; with `fua`
    /// it is durable once acknowledged.
    Write {
        off: u64,
        len: u32,
        id: u32,
        fua: bool,
    },
    /// A flush: every write acknowledged before it is durable once it is.
    Flush,
    /// Close the module's open key sets (persists index metadata; promises
    /// nothing about data durability).
    CloseKsets,
}

impl Op {
    /// The sectors a write covers, `[first, end)`; `None` for other ops.
    pub fn sectors(&self) -> Option<(u64, u64)> {
        match *self {
            Op::Write { off, len, .. } => {
                let s = crate::SECTOR as u64;
                Some((off / s, (off + u64::from(len)).div_ceil(s)))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    #[test]
    fn json_form() {
        let ops = vec![
            Op::Write {
                off: 4096,
                len: 8192,
                id: 3,
                fua: true,
            },
            Op::Flush,
            Op::CloseKsets,
        ];
        let json = serde_json::to_string(&ops).unwrap();
        assert_eq!(
            json,
            r#"[{"op":"write","off":4096,"len":8192,"id":3,"fua":true},{"op":"flush"},{"op":"close-ksets"}]"#
        );
        assert_eq!(serde_json::from_str::<Vec<Op>>(&json).unwrap(), ops);
    }

    #[test]
    fn sectors_of_a_write() {
        let w = Op::Write {
            off: 1024,
            len: 1536,
            id: 1,
            fua: false,
        };
        assert_eq!(w.sectors(), Some((2, 5)));
        assert_eq!(Op::Flush.sectors(), None);
    }
}
