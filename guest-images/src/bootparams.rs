//! The Linux zero page (`boot_params`) the VMM hands over in RSI: the command
//! line and the e820 memory map. Every pointer and count in it is checked
//! before use.

use protocol::layout::{CMDLINE_MAX, RAM_MAX};

const EXT_CMD_LINE_PTR: usize = 0x0c8;
const E820_ENTRIES: usize = 0x1e8;
const CMD_LINE_PTR: usize = 0x228;
const E820_TABLE: usize = 0x2d0;
const E820_MAX: usize = 128;
const E820_ENTRY_SIZE: usize = 20;
const ZERO_PAGE_SIZE: u64 = 4096;
/// Page 0 is unmapped (null pointers fault).
const FIRST_MAPPED: u64 = 4096;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

#[derive(Clone, Copy, Debug)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct BootParams {
    base: *const u8,
}

/// What is wrong with the zero page.
#[derive(Debug)]
pub enum BootError {
    ZeroPage(u64),
    CmdlinePointer(u64),
    CmdlineUnterminated,
    CmdlineNotUtf8(usize),
    E820Count(u8),
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootError::ZeroPage(a) => write!(f, "zero page address {a:#x} is outside RAM"),
            BootError::CmdlinePointer(a) => write!(f, "command line address {a:#x} is outside RAM"),
            BootError::CmdlineUnterminated => {
                write!(f, "command line has no NUL within {CMDLINE_MAX} bytes")
            }
            BootError::CmdlineNotUtf8(at) => write!(f, "command line is not UTF-8 (byte {at})"),
            BootError::E820Count(n) => write!(f, "e820 table claims {n} entries (max {E820_MAX})"),
        }
    }
}

fn in_ram(addr: u64, len: u64) -> bool {
    addr >= FIRST_MAPPED && addr.checked_add(len).is_some_and(|end| end <= RAM_MAX)
}

impl BootParams {
    pub fn new(zero_page: u64) -> Result<Self, BootError> {
        if !in_ram(zero_page, ZERO_PAGE_SIZE) {
            return Err(BootError::ZeroPage(zero_page));
        }
        Ok(BootParams {
            base: zero_page as *const u8,
        })
    }

    fn read<T: Copy>(&self, off: usize) -> T {
        // SAFETY: off + size_of::<T>() <= 4096, checked by the callers' constants; mapped RAM.
        unsafe { self.base.add(off).cast::<T>().read_unaligned() }
    }

    /// The command line (empty when the VMM gave none).
    pub fn cmdline(&self) -> Result<&'static str, BootError> {
        let ptr = u64::from(self.read::<u32>(CMD_LINE_PTR))
            | (u64::from(self.read::<u32>(EXT_CMD_LINE_PTR)) << 32);
        if ptr == 0 {
            return Ok("");
        }
        if !in_ram(ptr, CMDLINE_MAX as u64) {
            return Err(BootError::CmdlinePointer(ptr));
        }
        // SAFETY: CMDLINE_MAX bytes of mapped RAM, checked above; nothing writes there.
        let bytes = unsafe { core::slice::from_raw_parts(ptr as *const u8, CMDLINE_MAX) };
        let len = bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or(BootError::CmdlineUnterminated)?;
        core::str::from_utf8(&bytes[..len]).map_err(|e| BootError::CmdlineNotUtf8(e.valid_up_to()))
    }

    /// The e820 map.
    pub fn e820(&self) -> Result<impl Iterator<Item = E820Entry> + '_, BootError> {
        let n = self.read::<u8>(E820_ENTRIES);
        if usize::from(n) > E820_MAX {
            return Err(BootError::E820Count(n));
        }
        Ok((0..usize::from(n)).map(move |i| {
            let off = E820_TABLE + i * E820_ENTRY_SIZE;
            E820Entry {
                addr: self.read(off),
                size: self.read(off + 8),
                kind: self.read(off + 16),
            }
        }))
    }
}

const _: () = assert!(E820_TABLE + E820_MAX * E820_ENTRY_SIZE <= ZERO_PAGE_SIZE as usize);
