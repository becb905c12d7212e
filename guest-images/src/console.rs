//! COM1 text output (ring 3). Quiet unless asked: a byte costs one exit
//! (≈ 45 µs on PVM). The VMM's 16550 never has a busy transmitter, so we do
//! not poll LSR (that would double the exits).

use crate::channel::out8;
use core::sync::atomic::{AtomicBool, Ordering};
use protocol::{MessageKind, PORT_COM1};

static ECHO: AtomicBool = AtomicBool::new(false);

/// `harness.console`: echo every message on COM1 too.
pub fn set_echo(on: bool) {
    ECHO.store(on, Ordering::Relaxed);
}

pub fn echo_enabled() -> bool {
    ECHO.load(Ordering::Relaxed)
}

pub fn write(bytes: &[u8]) {
    for &b in bytes {
        out8(PORT_COM1, b);
    }
}

/// One line of text.
pub fn line(text: &str) {
    write(text.as_bytes());
    write(b"\n");
}

/// The echo of a message: `[kind] text`.
pub fn echo(kind: MessageKind, text: &[u8]) {
    write(match kind {
        MessageKind::Text => b"[text] ",
        MessageKind::StepResult => b"[result] ",
        MessageKind::Error => b"[error] ",
        MessageKind::Exception => b"[exception] ",
        MessageKind::Panic => b"[panic] ",
    });
    write(text);
    write(b"\n");
}
