//! The device-level test steps of `harness.test=STEP;STEP;...`.
//!
//! Grammar (each step is `name` or `name:args`; steps are separated by `;`,
//! so TEXT cannot contain `;`; numbers are decimal or `0x`-hex):
//!
//! | step | meaning |
//! |---|---|
//! | `console:TEXT` | a line on COM1 |
//! | `message:TEXT` | a Text message on the protocol channel |
//! | `pmem-store:OFF:VAL` | one 8-byte volatile store of VAL at pmem byte offset OFF (OFF a multiple of 8) |
//! | `pmem-flush` | a virtio-pmem flush request |
//! | `blk-write:SECTOR:BYTE` | one 512-byte sector filled with BYTE (0..=255) |
//! | `blk-read:SECTOR:BYTE` | read a sector; fails unless every byte equals BYTE |
//! | `blk-flush` | a virtio-blk flush request |
//! | `marker:ID` | a 32-bit marker |
//! | `spin` | loop forever in ring 3 |
//! | `touch:ADDR` | read one byte at virtual address ADDR |
//! | `mark` | fails if an earlier run's `mark` is visible (a word in the guest's `.bss`, one in a RAM page nothing else uses, pmem word 0x1000, disk sector 1, all zero on fresh images), then leaves its own (isolation tests of the VMM's fork-server) |
//! | `disk-fault:SECTOR` | reads a sector; its first byte picks what happens next: 0 nothing, 1 a page fault, 2 a hang (`spin`), 3 a panic (so one command line can crash or hang on some disks only) |

use crate::number::{parse_u64, NumberError};
use core::fmt;

/// One parsed step; TEXT borrows from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step<'a> {
    Console(&'a str),
    Message(&'a str),
    PmemStore { offset: u64, value: u64 },
    PmemFlush,
    BlkWrite { sector: u64, byte: u8 },
    BlkRead { sector: u64, byte: u8 },
    BlkFlush,
    Marker(u32),
    Spin,
    Touch(u64),
    Mark,
    DiskFault { sector: u64 },
}

/// Why a step is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepErrorKind {
    /// Nothing between two `;` (or at either end).
    Empty,
    /// The step's name is not one of the grammar's.
    Unknown,
    /// Fewer arguments than the step takes.
    MissingArgument(&'static str),
    /// More arguments than the step takes.
    ExtraArgument,
    /// The named argument is not a number.
    BadNumber(&'static str, NumberError),
    /// The named argument is a number outside its range.
    OutOfRange(&'static str),
    /// A pmem offset that is not a multiple of 8 (the store would be split).
    Misaligned,
    /// The named argument has a value outside its set (the `&str` lists the set).
    BadValue(&'static str, &'static str),
    /// An option (`name=value`) the step does not know.
    UnknownOption,
    /// The named option is given more than once.
    DuplicateOption(&'static str),
    /// The named byte offset or length is not a multiple of 512.
    NotSectorAligned(&'static str),
    /// A `gen` spec the workload crate refuses.
    Workload(workload::GenError),
}

/// A malformed step: which one (1-based), its text, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepError<'a> {
    pub index: usize,
    pub step: &'a str,
    pub kind: StepErrorKind,
}

impl fmt::Display for StepError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {} `{}`: ", self.index, self.step)?;
        match self.kind {
            StepErrorKind::Empty => f.write_str("empty step"),
            StepErrorKind::Unknown => f.write_str("unknown step"),
            StepErrorKind::MissingArgument(a) => write!(f, "missing argument {a}"),
            StepErrorKind::ExtraArgument => f.write_str("too many arguments"),
            StepErrorKind::BadNumber(a, e) => write!(f, "{a}: {e}"),
            StepErrorKind::OutOfRange(a) => write!(f, "{a} out of range"),
            StepErrorKind::Misaligned => f.write_str("OFF must be a multiple of 8"),
            StepErrorKind::BadValue(a, set) => write!(f, "{a} must be {set}"),
            StepErrorKind::UnknownOption => f.write_str("unknown option"),
            StepErrorKind::DuplicateOption(a) => write!(f, "option {a} given more than once"),
            StepErrorKind::NotSectorAligned(a) => write!(f, "{a} must be a multiple of 512"),
            StepErrorKind::Workload(e) => write!(f, "{e}"),
        }
    }
}

/// Iterator over the steps of a `harness.test` value.
#[derive(Clone, Debug)]
pub struct Steps<'a> {
    parts: Option<core::str::Split<'a, char>>,
    index: usize,
}

/// Parses the steps of `value`; an empty value has no steps.
pub fn steps(value: &str) -> Steps<'_> {
    Steps {
        parts: (!value.is_empty()).then(|| value.split(';')),
        index: 0,
    }
}

/// Like [`steps`], each step paired with its text (for messages about it).
pub fn steps_with_text(
    value: &str,
) -> impl Iterator<Item = Result<(&str, Step<'_>), StepError<'_>>> {
    split_steps(value, parse_step)
}

/// Splits `value` at `;` (an empty value has no steps) and parses each step
/// with `parse`, pairing it with its text; errors carry the 1-based index.
pub(crate) fn split_steps<'a, T: 'a>(
    value: &'a str,
    parse: fn(&'a str) -> Result<T, StepErrorKind>,
) -> impl Iterator<Item = Result<(&'a str, T), StepError<'a>>> + 'a {
    (!value.is_empty())
        .then(|| value.split(';'))
        .into_iter()
        .flatten()
        .enumerate()
        .map(move |(i, text)| {
            parse(text).map(|s| (text, s)).map_err(|kind| StepError {
                index: i + 1,
                step: text,
                kind,
            })
        })
}

impl<'a> Iterator for Steps<'a> {
    type Item = Result<Step<'a>, StepError<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let text = self.parts.as_mut()?.next()?;
        self.index += 1;
        Some(parse_step(text).map_err(|kind| StepError {
            index: self.index,
            step: text,
            kind,
        }))
    }
}

fn parse_step(text: &str) -> Result<Step<'_>, StepErrorKind> {
    if text.is_empty() {
        return Err(StepErrorKind::Empty);
    }
    let (name, args) = match text.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (text, None),
    };
    // TEXT steps take the rest verbatim (colons included).
    match name {
        "console" => {
            return Ok(Step::Console(
                args.ok_or(StepErrorKind::MissingArgument("TEXT"))?,
            ))
        }
        "message" => {
            return Ok(Step::Message(
                args.ok_or(StepErrorKind::MissingArgument("TEXT"))?,
            ))
        }
        _ => {}
    }
    let mut args = Args(args.map(|a| a.split(':')));
    let step = match name {
        "pmem-store" => {
            let offset = args.number("OFF")?;
            let value = args.number("VAL")?;
            if offset % 8 != 0 {
                return Err(StepErrorKind::Misaligned);
            }
            Step::PmemStore { offset, value }
        }
        "pmem-flush" => Step::PmemFlush,
        "blk-write" => Step::BlkWrite {
            sector: args.number("SECTOR")?,
            byte: args.byte("BYTE")?,
        },
        "blk-read" => Step::BlkRead {
            sector: args.number("SECTOR")?,
            byte: args.byte("BYTE")?,
        },
        "blk-flush" => Step::BlkFlush,
        "marker" => {
            let id = args.number("ID")?;
            Step::Marker(u32::try_from(id).map_err(|_| StepErrorKind::OutOfRange("ID"))?)
        }
        "spin" => Step::Spin,
        "touch" => Step::Touch(args.number("ADDR")?),
        "mark" => Step::Mark,
        "disk-fault" => Step::DiskFault {
            sector: args.number("SECTOR")?,
        },
        _ => return Err(StepErrorKind::Unknown),
    };
    args.finish()?;
    Ok(step)
}

/// The `:`-separated arguments of a step, consumed in order.
pub(crate) struct Args<'a>(pub(crate) Option<core::str::Split<'a, char>>);

impl<'a> Args<'a> {
    pub(crate) fn number(&mut self, name: &'static str) -> Result<u64, StepErrorKind> {
        let s = self
            .0
            .as_mut()
            .and_then(|a| a.next())
            .ok_or(StepErrorKind::MissingArgument(name))?;
        parse_u64(s).map_err(|e| StepErrorKind::BadNumber(name, e))
    }

    /// The next argument as text (for steps whose argument is a word).
    pub(crate) fn word(&mut self, name: &'static str) -> Result<&'a str, StepErrorKind> {
        self.0
            .as_mut()
            .and_then(|a| a.next())
            .ok_or(StepErrorKind::MissingArgument(name))
    }

    /// The next argument, if any (for optional trailing words).
    pub(crate) fn optional(&mut self) -> Option<&'a str> {
        self.0.as_mut().and_then(|a| a.next())
    }

    fn byte(&mut self, name: &'static str) -> Result<u8, StepErrorKind> {
        u8::try_from(self.number(name)?).map_err(|_| StepErrorKind::OutOfRange(name))
    }

    pub(crate) fn finish(mut self) -> Result<(), StepErrorKind> {
        match self.0.as_mut().and_then(|a| a.next()) {
            None => Ok(()),
            Some(_) => Err(StepErrorKind::ExtraArgument),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StepErrorKind::*;

    fn one(s: &str) -> Result<Step<'_>, StepErrorKind> {
        let mut it = steps(s);
        let r = it.next().expect("one step").map_err(|e| e.kind);
        assert!(it.next().is_none(), "more than one step in {s:?}");
        r
    }

    #[test]
    fn every_step_parses() {
        assert_eq!(one("console:hello world"), Ok(Step::Console("hello world")));
        assert_eq!(one("console:a:b"), Ok(Step::Console("a:b")));
        assert_eq!(one("console:"), Ok(Step::Console("")));
        assert_eq!(one("message:hi"), Ok(Step::Message("hi")));
        assert_eq!(
            one("pmem-store:0x1000:0xdeadbeef"),
            Ok(Step::PmemStore {
                offset: 0x1000,
                value: 0xdead_beef
            })
        );
        assert_eq!(one("pmem-flush"), Ok(Step::PmemFlush));
        assert_eq!(
            one("blk-write:7:0xab"),
            Ok(Step::BlkWrite {
                sector: 7,
                byte: 0xab
            })
        );
        assert_eq!(
            one("blk-read:0x7:255"),
            Ok(Step::BlkRead {
                sector: 7,
                byte: 255
            })
        );
        assert_eq!(one("blk-flush"), Ok(Step::BlkFlush));
        assert_eq!(one("marker:0x80000001"), Ok(Step::Marker(0x8000_0001)));
        assert_eq!(one("spin"), Ok(Step::Spin));
        assert_eq!(one("mark"), Ok(Step::Mark));
        assert_eq!(one("disk-fault:7"), Ok(Step::DiskFault { sector: 7 }));
        assert_eq!(one("mark:1"), Err(ExtraArgument));
        assert_eq!(one("disk-fault"), Err(MissingArgument("SECTOR")));
        assert_eq!(one("touch:0x4000000000"), Ok(Step::Touch(0x40_0000_0000)));
    }

    #[test]
    fn sequences_run_in_order() {
        let mut it = steps("marker:1;blk-flush;console:x");
        assert_eq!(it.next(), Some(Ok(Step::Marker(1))));
        assert_eq!(it.next(), Some(Ok(Step::BlkFlush)));
        assert_eq!(it.next(), Some(Ok(Step::Console("x"))));
        assert_eq!(it.next(), None);
        assert_eq!(steps("").next(), None);
    }

    #[test]
    fn malformed_steps_are_errors() {
        assert_eq!(one("bogus"), Err(Unknown));
        assert_eq!(one("Console:x"), Err(Unknown));
        assert_eq!(one("console"), Err(MissingArgument("TEXT")));
        assert_eq!(one("message"), Err(MissingArgument("TEXT")));
        assert_eq!(one("pmem-store:8"), Err(MissingArgument("VAL")));
        assert_eq!(one("pmem-store"), Err(MissingArgument("OFF")));
        assert_eq!(one("pmem-store:4:1"), Err(Misaligned));
        assert_eq!(one("pmem-store:8:1:2"), Err(ExtraArgument));
        assert_eq!(one("pmem-flush:1"), Err(ExtraArgument));
        assert_eq!(one("spin:"), Err(ExtraArgument));
        assert_eq!(one("blk-write:1:256"), Err(OutOfRange("BYTE")));
        assert_eq!(
            one("blk-read:x:1"),
            Err(BadNumber("SECTOR", NumberError::BadDigit))
        );
        assert_eq!(one("marker:0x100000000"), Err(OutOfRange("ID")));
        assert_eq!(one("marker:"), Err(BadNumber("ID", NumberError::Empty)));
        assert_eq!(one("touch"), Err(MissingArgument("ADDR")));
    }

    #[test]
    fn steps_come_with_their_text() {
        let mut it = steps_with_text("marker:0x10;console:a:b;spin");
        assert_eq!(it.next(), Some(Ok(("marker:0x10", Step::Marker(16)))));
        assert_eq!(it.next(), Some(Ok(("console:a:b", Step::Console("a:b")))));
        assert_eq!(it.next(), Some(Ok(("spin", Step::Spin))));
        assert_eq!(it.next(), None);
        assert_eq!(steps_with_text("").next(), None);
        let e = steps_with_text("spin;x").nth(1).unwrap().unwrap_err();
        assert_eq!((e.index, e.step), (2, "x"));
    }

    #[test]
    fn empty_steps_are_errors_with_their_position() {
        let mut it = steps("spin;;spin");
        assert_eq!(it.next(), Some(Ok(Step::Spin)));
        assert_eq!(
            it.next(),
            Some(Err(StepError {
                index: 2,
                step: "",
                kind: Empty
            }))
        );
        let last = steps("spin;").last().unwrap().unwrap_err();
        assert_eq!((last.index, last.kind), (2, Empty));
        let e = steps("spin;nope:1").nth(1).unwrap().unwrap_err();
        assert_eq!(std::format!("{e}"), "step 2 `nope:1`: unknown step");
    }
}
