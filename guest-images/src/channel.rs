//! The protocol's message channel, exit and marker ports (ring 3).
//!
//! A message is a [`MessageHeader`] followed by its payload in one static
//! buffer; one 32-bit `out` of the buffer's address to [`PORT_MESSAGE`] hands
//! it to the VMM, which copies it before the vCPU resumes (one exit per
//! message, not one per byte). Payloads longer than [`MESSAGE_MAX_LEN`] are cut
//! at that length (on a UTF-8 boundary).

use crate::console;
use core::fmt::{self, Write};
use core::mem::MaybeUninit;
use core::ptr::addr_of_mut;
use protocol::{
    ExitCode, MessageHeader, MessageKind, MESSAGE_MAX_LEN, PORT_EXIT, PORT_MARKER, PORT_MESSAGE,
};

const MAX: usize = MESSAGE_MAX_LEN as usize;

#[repr(C, align(8))]
struct Buffer {
    header: [u8; MessageHeader::SIZE],
    payload: [u8; MAX],
}

/// The one message buffer. Ring 3 is single-threaded and takes no interrupts;
/// it is only ever reached through raw pointers, and every byte sent is
/// written first, so it needs no zeroing (see `.noinit` in linker.ld).
#[link_section = ".bss.noinit.message"]
static mut BUFFER: MaybeUninit<Buffer> = MaybeUninit::uninit();

fn buffer() -> *mut Buffer {
    addr_of_mut!(BUFFER).cast::<Buffer>()
}

fn payload_ptr() -> *mut u8 {
    // SAFETY: a field address inside the static; nothing is read.
    unsafe { addr_of_mut!((*buffer()).payload).cast::<u8>() }
}

/// A 32-bit `out`. Not `nomem`: it must also order the buffer's stores before it.
pub fn out32(port: u16, value: u32) {
    // SAFETY: port I/O to the protocol's ports, opened to ring 3 by the TSS bitmap.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    }
}

/// An 8-bit `out` (console).
pub fn out8(port: u16, value: u8) {
    // SAFETY: as `out32`.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags))
    }
}

/// Formats into the payload, cutting (on a char boundary) at the buffer's end.
struct Writer {
    len: usize,
}

impl Write for Writer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = MAX - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        // SAFETY: single-threaded; `self.len + n <= MAX`; no reference to BUFFER lives elsewhere.
        unsafe {
            let dst = payload_ptr().add(self.len);
            core::ptr::copy_nonoverlapping(s.as_ptr(), dst, n);
        }
        self.len += n;
        Ok(())
    }
}

/// Sends one message whose payload is `args` formatted; echoes it on COM1 when
/// the console was asked for.
pub fn send_fmt(kind: MessageKind, args: fmt::Arguments<'_>) {
    let mut w = Writer { len: 0 };
    // Our writer never fails; a Display impl that does just ends the text early.
    let _ = w.write_fmt(args);
    send_prepared(kind, w.len);
}

/// Sends `payload` (raw bytes) as one message.
pub fn send_bytes(kind: MessageKind, payload: &[u8]) {
    let n = payload.len().min(MAX);
    // SAFETY: as in `Writer::write_str`.
    unsafe {
        core::ptr::copy_nonoverlapping(payload.as_ptr(), payload_ptr(), n);
    }
    send_prepared(kind, n);
}

fn send_prepared(kind: MessageKind, len: usize) {
    let header = MessageHeader {
        kind: kind as u32,
        len: len as u32,
    };
    // SAFETY: as in `Writer::write_str`; the buffer lives in the image, below 4 GiB.
    let addr = unsafe {
        addr_of_mut!((*buffer()).header).write(header.encode());
        if kind != MessageKind::Exception && console::echo_enabled() {
            let text = core::slice::from_raw_parts(payload_ptr(), len);
            console::echo(kind, text);
        }
        buffer() as usize
    };
    out32(PORT_MESSAGE, addr as u32);
}

/// Records marker `id` in the VMM's trace.
pub fn marker(id: u32) {
    out32(PORT_MARKER, id);
}

/// Ends the run with `code`.
pub fn exit(code: ExitCode) -> ! {
    out32(PORT_EXIT, code as u32);
    // The VMM stops the vCPU at the exit write; `hlt` would #GP in ring 3.
    loop {
        core::hint::spin_loop();
    }
}

/// Sends a message of `kind` and exits with `code`.
pub fn fatal(kind: MessageKind, code: ExitCode, args: fmt::Arguments<'_>) -> ! {
    send_fmt(kind, args);
    exit(code)
}

const _: () = assert!(core::mem::size_of::<Buffer>() == MessageHeader::SIZE + MAX);
