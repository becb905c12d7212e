//! `virtio_mmio.device=<size>@<base>:<irq>[:<id>]`, Linux's announcement of a
//! virtio-mmio device on the kernel command line (see Linux's
//! `drivers/virtio/virtio_mmio.c`). `<size>` takes an optional K/M/G suffix.

use crate::number::{parse_u64, NumberError};
use core::fmt;

/// The command-line key that announces one virtio-mmio device.
pub const VIRTIO_MMIO_KEY: &str = "virtio_mmio.device";

/// One announced device window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    pub size: u64,
    pub base: u64,
    pub irq: u32,
    /// Linux's optional platform-device id.
    pub id: Option<u32>,
}

/// Why an announcement did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioDeviceError {
    /// Not of the form `<size>@<base>:<irq>[:<id>]`.
    Shape,
    /// The named field is not a number (or does not fit).
    Number(&'static str, NumberError),
    /// `<size>` is zero or overflows with its suffix.
    Size,
}

impl fmt::Display for MmioDeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmioDeviceError::Shape => f.write_str("expected <size>@<base>:<irq>[:<id>]"),
            MmioDeviceError::Number(field, e) => write!(f, "bad {field}: {e}"),
            MmioDeviceError::Size => f.write_str("size is zero or too large"),
        }
    }
}

impl MmioDevice {
    /// Parses the value of one `virtio_mmio.device=` parameter.
    pub fn parse(v: &str) -> Result<Self, MmioDeviceError> {
        let (size, rest) = v.split_once('@').ok_or(MmioDeviceError::Shape)?;
        let mut fields = rest.split(':');
        let base = fields.next().ok_or(MmioDeviceError::Shape)?;
        let irq = fields.next().ok_or(MmioDeviceError::Shape)?;
        let id = fields.next();
        if fields.next().is_some() {
            return Err(MmioDeviceError::Shape);
        }
        let (digits, shift) = match size.as_bytes().last() {
            Some(b'k' | b'K') => (&size[..size.len() - 1], 10),
            Some(b'm' | b'M') => (&size[..size.len() - 1], 20),
            Some(b'g' | b'G') => (&size[..size.len() - 1], 30),
            _ => (size, 0),
        };
        let size = parse_u64(digits).map_err(|e| MmioDeviceError::Number("size", e))?;
        if size == 0 || size.leading_zeros() < shift {
            return Err(MmioDeviceError::Size);
        }
        let num32 = |field, s| {
            let n = parse_u64(s).map_err(|e| MmioDeviceError::Number(field, e))?;
            u32::try_from(n).map_err(|_| MmioDeviceError::Number(field, NumberError::Overflow))
        };
        Ok(MmioDevice {
            size: size << shift,
            base: parse_u64(base).map_err(|e| MmioDeviceError::Number("base", e))?,
            irq: num32("irq", irq)?,
            id: id.map(|s| num32("id", s)).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_linux_loader_form() {
        assert_eq!(
            MmioDevice::parse("4K@0xd0000000:5"),
            Ok(MmioDevice {
                size: 4096,
                base: 0xd000_0000,
                irq: 5,
                id: None
            })
        );
        assert_eq!(
            MmioDevice::parse("0x200@0xd0001000:6:1"),
            Ok(MmioDevice {
                size: 0x200,
                base: 0xd000_1000,
                irq: 6,
                id: Some(1)
            })
        );
        assert_eq!(MmioDevice::parse("1m@0:0").map(|d| d.size), Ok(1 << 20));
        assert_eq!(MmioDevice::parse("2G@0:0").map(|d| d.size), Ok(2 << 30));
    }

    #[test]
    fn rejects_malformed() {
        use MmioDeviceError::*;
        assert_eq!(MmioDevice::parse(""), Err(Shape));
        assert_eq!(MmioDevice::parse("4K"), Err(Shape));
        assert_eq!(MmioDevice::parse("4K@0xd0000000"), Err(Shape));
        assert_eq!(MmioDevice::parse("4K@0xd0000000:5:1:2"), Err(Shape));
        assert_eq!(
            MmioDevice::parse("4X@0xd0000000:5"),
            Err(Number("size", NumberError::BadDigit))
        );
        assert_eq!(
            MmioDevice::parse("K@0xd0000000:5"),
            Err(Number("size", NumberError::Empty))
        );
        assert_eq!(MmioDevice::parse("0@0xd0000000:5"), Err(Size));
        assert_eq!(MmioDevice::parse("0xffffffffffffG@0:5"), Err(Size));
        assert_eq!(
            MmioDevice::parse("4K@zz:5"),
            Err(Number("base", NumberError::BadDigit))
        );
        assert_eq!(
            MmioDevice::parse("4K@0:0x100000000"),
            Err(Number("irq", NumberError::Overflow))
        );
        assert_eq!(
            MmioDevice::parse("4K@0:5:"),
            Err(Number("id", NumberError::Empty))
        );
    }
}
