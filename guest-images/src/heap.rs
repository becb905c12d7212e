//! The kernel heap: `linked_list_allocator` over the usable RAM that follows
//! the kernel image (from the e820 map). Set up in O(1): nothing is zeroed.

use crate::bootparams::{E820Entry, E820_RAM};
use linked_list_allocator::LockedHeap;
use protocol::layout::RAM_MAX;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// The heap must at least hold the virtqueues and the drivers' buffers.
const MIN_HEAP: u64 = 1 << 20;

extern "C" {
    static __image_end: u8;
}

#[derive(Debug)]
pub struct HeapError {
    pub image_end: u64,
}

impl core::fmt::Display for HeapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "no usable e820 RAM of at least {MIN_HEAP} bytes right after the kernel image (ends at {:#x})",
            self.image_end
        )
    }
}

/// Gives the allocator `[image end, end of its e820 RAM entry)`; returns the heap's size.
pub fn init(e820: impl Iterator<Item = E820Entry>) -> Result<u64, HeapError> {
    let start = core::ptr::addr_of!(__image_end) as u64;
    let end = e820
        .filter(|e| e.kind == E820_RAM)
        .filter(|e| e.addr <= start)
        .map(|e| e.addr.saturating_add(e.size).min(RAM_MAX))
        .find(|&end| end >= start.saturating_add(MIN_HEAP))
        .ok_or(HeapError { image_end: start })?;
    let size = end - start;
    // SAFETY: [start, end) is usable RAM (e820), identity-mapped, below RAM_MAX,
    // after everything the image uses (.stack included), and handed out once.
    unsafe { HEAP.lock().init(start as *mut u8, size as usize) };
    Ok(size)
}
