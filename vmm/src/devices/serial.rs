//! COM1: a vm-superio 16550 whose output goes to the run's console buffer,
//! optionally a log file and optionally the terminal.

use std::fs::File;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

/// The guest polls the UART: its interrupt line goes nowhere.
#[derive(Debug)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Where console bytes go.
#[derive(Debug, Default)]
pub struct ConsoleSink {
    /// Everything the guest printed, kept for the run's result.
    pub buffer: Vec<u8>,
    /// A log file, if asked for.
    pub log: Option<File>,
    /// Echo to the VMM's standard error (stdout stays for the CLI's result).
    pub terminal: bool,
}

impl Write for ConsoleSink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        // Bound what a chatty guest can make the VMM hold.
        const MAX: usize = 16 << 20;
        if self.buffer.len() < MAX {
            self.buffer.extend_from_slice(b);
        }
        if let Some(f) = &mut self.log {
            f.write_all(b)?;
        }
        if self.terminal {
            io::stderr().write_all(b)?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(f) = &mut self.log {
            f.flush()?;
        }
        Ok(())
    }
}

/// The COM1 device.
pub struct Console {
    uart: Serial<NoInterrupt, NoEvents, ConsoleSink>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    pub fn new(sink: ConsoleSink) -> Self {
        Console {
            uart: Serial::new(NoInterrupt, sink),
        }
    }

    /// A read of register `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// A write of register `offset` (0..8). Write errors to the log are
    /// reported, not fatal: the guest must not be able to stop the VMM this way.
    pub fn write(&mut self, offset: u8, value: u8) -> Result<(), String> {
        self.uart.write(offset, value).map_err(|e| format!("{e:?}"))
    }

    pub fn into_sink(self) -> ConsoleSink {
        self.uart.into_writer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_to_thr_reach_the_buffer() {
        let mut c = Console::new(ConsoleSink::default());
        for b in b"hi\n" {
            c.write(0, *b).unwrap();
        }
        // LSR says the transmitter is empty, so a polling guest can go on.
        assert_ne!(c.read(5) & 0x20, 0);
        assert_eq!(c.into_sink().buffer, b"hi\n");
    }
}
