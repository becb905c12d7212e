//! The guest–host protocol shared by the VMM (`vmm/`) and the guest kernel
//! (`guest-images/`).
//!
//! Everything both sides must agree on lives here and nowhere else: the fixed
//! guest-physical memory map, the I/O ports, the exit codes, the marker ids
//! and the layout of the message channel.
//!
//! # Message channel
//! A port write costs one VM exit (≈ 40 µs on PVM hosts) and a byte-wide UART
//! one exit per character, so the guest sends whole messages: it writes a
//! [`MessageHeader`] followed by `len` payload bytes anywhere in its RAM, then
//! writes the guest-physical address of the header to [`PORT_MESSAGE`] with a
//! single 32-bit `out`. The VMM validates the address and length against guest
//! RAM (a bad one is reported as a protocol error, never trusted) and copies the
//! message out before the vCPU resumes, so the guest may reuse the buffer at once.
//!
//! # Exit
//! A 32-bit write of an [`ExitCode`] to [`PORT_EXIT`] ends the run.
//!
//! # Markers
//! A 32-bit write to [`PORT_MARKER`] records a marker in the trace at its position
//! among the traced stores and flushes. Ids with the top bit set are reserved for
//! control markers ([`MARKER_TRACE_ON`], [`MARKER_TRACE_OFF`],
//! [`MARKER_RING3_ENTERED`]). When tracing starts, the VMM freezes the pmem
//! and disk contents as the window's base: everything stored before the
//! trace-on marker counts as durable. Other ids are trace events: the
//! module's crash points ([`markers::crash_point_begin`]) and the workload's
//! "op done" markers ([`markers::op_done`]).
//!
//! # Test commands
//! The guest's work comes from its kernel command line. The keys are
//! [`CMDLINE_RUN_KEY`] (pcache steps), [`CMDLINE_MARKERS_KEY`] (the pcache
//! module's crash-point markers on or off) and [`CMDLINE_TEST_KEY`]
//! (device-level test steps for the VMM's own tests);
//! their grammar is documented in `guest-images/README.md`.
#![no_std]
#![forbid(unsafe_code)]

/// Guest-physical memory map. All device windows lie outside RAM and outside
/// the e820 map the VMM hands to the guest.
pub mod layout {
    /// RAM starts at guest-physical 0 and is identity-mapped by the guest.
    pub const RAM_START: u64 = 0;
    /// Default RAM size (MiB) when the VMM is not told otherwise.
    pub const RAM_DEFAULT_MIB: u64 = 128;
    /// RAM must end below the 32-bit device hole.
    pub const RAM_MAX: u64 = MMIO_HOLE_START;

    /// Where the VMM writes the Linux zero page (`boot_params`).
    pub const ZERO_PAGE: u64 = 0x7000;
    /// Where the VMM writes the kernel command line.
    pub const CMDLINE_START: u64 = 0x2_0000;
    /// Maximum command line size, terminating NUL included.
    pub const CMDLINE_MAX: usize = 4096;
    /// Where the kernel ELF is loaded (its physical load address must be here or above).
    pub const KERNEL_START: u64 = 0x10_0000;

    /// Start of the 32-bit hole that holds the virtio-mmio windows (not RAM).
    pub const MMIO_HOLE_START: u64 = 0xc000_0000;
    /// First virtio-mmio device window.
    pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
    /// Size of one virtio-mmio device window.
    pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
    /// First legacy IRQ line given to virtio-mmio devices (device i gets IRQ_BASE + i).
    pub const VIRTIO_IRQ_BASE: u32 = 5;
    /// Number of virtio-mmio windows the guest's page tables map.
    pub const VIRTIO_MMIO_SLOTS: u64 = 8;

    /// Slot index of the virtio-blk device (the backing disk).
    pub const VIRTIO_BLK_SLOT: u64 = 0;
    /// Slot index of the virtio-pmem device (the cache device).
    pub const VIRTIO_PMEM_SLOT: u64 = 1;

    /// Guest-physical address of the pmem region (its own memory slot), fixed so
    /// that the guest's ring-0 page tables can map it before device discovery.
    pub const PMEM_START: u64 = 0x1_0000_0000;
    /// Largest pmem region the guest's page tables map (16 GiB).
    pub const PMEM_MAX_SIZE: u64 = 16 << 30;
    /// pcache refuses cache devices smaller than this (512 MiB); the VMM checks it before boot.
    pub const PMEM_MIN_SIZE: u64 = 512 << 20;
    /// The guest maps memory with 2 MiB pages; region sizes are multiples of this.
    pub const PAGE_2M: u64 = 2 << 20;

    // The map's invariants, checked at compile time.
    const _: () = {
        assert!(RAM_DEFAULT_MIB << 20 <= RAM_MAX);
        assert!(virtio_mmio_addr(VIRTIO_MMIO_SLOTS) <= PMEM_START);
        assert!(VIRTIO_MMIO_BASE >= MMIO_HOLE_START);
        assert!(PMEM_START % PAGE_2M == 0);
        assert!(KERNEL_START > CMDLINE_START + CMDLINE_MAX as u64);
    };

    /// Base address of virtio-mmio window `slot`.
    pub const fn virtio_mmio_addr(slot: u64) -> u64 {
        VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SIZE
    }
}

/// Console (16550 UART, human-readable text only; quiet unless asked for).
pub const PORT_COM1: u16 = 0x3f8;
/// Message channel: 32-bit write of the guest-physical address of a [`MessageHeader`].
pub const PORT_MESSAGE: u16 = 0x510;
/// Exit: 32-bit write of an [`ExitCode`] value.
pub const PORT_EXIT: u16 = 0x514;
/// Marker: 32-bit write of a marker id.
pub const PORT_MARKER: u16 = 0x518;

/// Largest message payload the VMM accepts.
pub const MESSAGE_MAX_LEN: u32 = 64 * 1024;

/// Kernel command-line key holding the pcache steps (`pcache.run=...`).
pub const CMDLINE_RUN_KEY: &str = "pcache.run";
/// Kernel command-line key switching the pcache module's crash-point markers
/// (`pcache.markers=on|off`, default on; recovery boots use `off`).
pub const CMDLINE_MARKERS_KEY: &str = "pcache.markers";
/// Kernel command-line key choosing what the pcache module's fences are
/// (`pcache.fences=flush|cpu`, default `flush`): `flush` makes every fence a
/// virtio-pmem FLUSH (one VM exit, and a `PmemFlush` trace event); `cpu`
/// makes it a plain CPU fence with no exit. `cpu` is only for untraced runs
/// (recovery boots): nothing there records or cuts at a fence.
pub const CMDLINE_FENCES_KEY: &str = "pcache.fences";
/// Kernel command-line flag of the VMM's fork-server (`vmm::fork`): the guest
/// starts both virtio drivers before its steps, then writes
/// [`MARKER_SNAPSHOT`] and waits for nothing (the VMM snapshots it there and
/// resumes the snapshot once per crash state).
pub const CMDLINE_SNAPSHOT_FLAG: &str = "harness.snapshot";
/// Kernel command-line key holding device-level test steps (`harness.test=...`).
pub const CMDLINE_TEST_KEY: &str = "harness.test";
/// Kernel command-line flag asking the guest to echo its messages on COM1 too.
pub const CMDLINE_CONSOLE_FLAG: &str = "harness.console";

/// Header of a message in guest memory; the payload follows immediately.
/// Encoded as two little-endian u32: `kind`, then `len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageHeader {
    pub kind: u32,
    pub len: u32,
}

impl MessageHeader {
    pub const SIZE: usize = 8;

    pub fn encode(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.kind.to_le_bytes());
        b[4..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: [u8; 8]) -> Self {
        MessageHeader {
            kind: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

/// What a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MessageKind {
    /// UTF-8 text for the log.
    Text = 1,
    /// The result of one step: UTF-8 JSON.
    StepResult = 2,
    /// An error: UTF-8 text (for example a malformed command or a failed step).
    Error = 3,
    /// A CPU exception, reported from ring 0: an [`ExceptionReport`].
    Exception = 4,
    /// A guest panic: UTF-8 text (location and message).
    Panic = 5,
}

impl MessageKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => MessageKind::Text,
            2 => MessageKind::StepResult,
            3 => MessageKind::Error,
            4 => MessageKind::Exception,
            5 => MessageKind::Panic,
            _ => return None,
        })
    }
}

/// Payload of a [`MessageKind::Exception`] message: four little-endian u64
/// words, built in ring 0 without formatting code (ring 0 must stay free of the
/// SSE instructions that `core::fmt` emits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExceptionReport {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cr2: u64,
}

impl ExceptionReport {
    pub const SIZE: usize = 32;

    pub fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, w) in [self.vector, self.error_code, self.rip, self.cr2]
            .into_iter()
            .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// Decodes a payload; `None` unless it is exactly [`Self::SIZE`] bytes.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != Self::SIZE {
            return None;
        }
        let w = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        Some(ExceptionReport {
            vector: w(0),
            error_code: w(1),
            rip: w(2),
            cr2: w(3),
        })
    }
}

/// Exit codes the guest writes to [`PORT_EXIT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// Every step ran and succeeded.
    Success = 0,
    /// A step ran and failed (its error was sent as a message).
    StepFailed = 1,
    /// The command line was malformed or named an unknown step.
    BadCommand = 2,
    /// The guest panicked (the panic was sent as a message).
    Panic = 3,
    /// A CPU exception (reported as an [`ExceptionReport`] message).
    Exception = 4,
    /// A device the guest needs was missing or failed to initialise.
    DeviceError = 5,
}

impl ExitCode {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => ExitCode::Success,
            1 => ExitCode::StepFailed,
            2 => ExitCode::BadCommand,
            3 => ExitCode::Panic,
            4 => ExitCode::Exception,
            5 => ExitCode::DeviceError,
            _ => return None,
        })
    }
}

/// Control marker: start tracing (the VMM freezes the base of the window here).
pub const MARKER_TRACE_ON: u32 = 0x8000_0001;
/// Control marker: stop tracing.
pub const MARKER_TRACE_OFF: u32 = 0x8000_0002;
/// Control marker: the guest writes it once, as its first act in ring 3, so
/// that the VMM can time "VMM start to first ring-3 instruction" (a time
/// stamp in the run's marker list; not a trace event).
pub const MARKER_RING3_ENTERED: u32 = 0x8000_0003;
/// Control marker: with [`CMDLINE_SNAPSHOT_FLAG`], the guest has started its
/// drivers and reads no device before its steps: the VMM's fork-server
/// snapshots it here (registers, RAM, device registers).
pub const MARKER_SNAPSHOT: u32 = 0x8000_0004;
/// Marker ids with this bit set are control markers, not trace events.
pub const MARKER_CONTROL_BIT: u32 = 0x8000_0000;

/// Marker ids for the persistent write sequences of `docs/format.md` §10.
/// A sequence `Cn` is bracketed by `crash_point_begin(n)` and `crash_point_end(n)`.
pub mod markers {
    /// First id of the crash-point markers.
    pub const CRASH_POINT_BASE: u32 = 0x100;

    /// Marker written before the stores of crash point `Cn` (n = 1..=12).
    pub const fn crash_point_begin(n: u32) -> u32 {
        CRASH_POINT_BASE + n * 2
    }

    /// Marker written after the stores (and fence) of crash point `Cn`.
    pub const fn crash_point_end(n: u32) -> u32 {
        CRASH_POINT_BASE + n * 2 + 1
    }

    /// `(n, is_end)` for a crash-point marker id, `None` for any other id.
    pub const fn decode_crash_point(id: u32) -> Option<(u32, bool)> {
        if id < CRASH_POINT_BASE + 2 || id > CRASH_POINT_BASE + 12 * 2 + 1 {
            return None;
        }
        let rel = id - CRASH_POINT_BASE;
        Some((rel / 2, rel % 2 == 1))
    }

    /// First id of the "op done" markers: the guest writes `op_done(k)` when
    /// the k-th workload op (0-based, in `pcache.run` order, `gen` expanded)
    /// completes, so the host knows how many ops a cut found acknowledged.
    /// Far above the crash points and below the control bit.
    pub const OP_DONE_BASE: u32 = 0x1000_0000;
    /// Ops are numbered below this (the markers fill `0x1000_0000..0x2000_0000`).
    pub const OP_DONE_LIMIT: u32 = 0x1000_0000;

    /// The marker for op `k` (`k < OP_DONE_LIMIT`; larger `k` panics).
    pub const fn op_done(k: u32) -> u32 {
        assert!(k < OP_DONE_LIMIT, "op number out of the op-done range");
        OP_DONE_BASE + k
    }

    /// The op number of an "op done" marker, `None` for any other id.
    pub const fn decode_op_done(id: u32) -> Option<u32> {
        if id >= OP_DONE_BASE && id - OP_DONE_BASE < OP_DONE_LIMIT {
            Some(id - OP_DONE_BASE)
        } else {
            None
        }
    }

    // Disjoint from the crash points and from the control markers.
    const _: () = {
        assert!(crash_point_end(12) < OP_DONE_BASE);
        assert!(OP_DONE_BASE + (OP_DONE_LIMIT - 1) < super::MARKER_CONTROL_BIT);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_little_endian() {
        let h = MessageHeader {
            kind: 2,
            len: 0x0102_0304,
        };
        let b = h.encode();
        assert_eq!(b, [2, 0, 0, 0, 4, 3, 2, 1]);
        assert_eq!(MessageHeader::decode(b), h);
    }

    #[test]
    fn exception_report_round_trips_and_rejects_wrong_sizes() {
        let r = ExceptionReport {
            vector: 14,
            error_code: 2,
            rip: 0x10_1234,
            cr2: 0xdead_0000,
        };
        assert_eq!(ExceptionReport::decode(&r.encode()), Some(r));
        assert_eq!(ExceptionReport::decode(&[0u8; 31]), None);
        assert_eq!(ExceptionReport::decode(&[0u8; 33]), None);
    }

    #[test]
    fn crash_point_markers_decode() {
        for n in 1..=12 {
            assert_eq!(
                markers::decode_crash_point(markers::crash_point_begin(n)),
                Some((n, false))
            );
            assert_eq!(
                markers::decode_crash_point(markers::crash_point_end(n)),
                Some((n, true))
            );
        }
        assert_eq!(markers::decode_crash_point(0), None);
        assert_eq!(
            markers::decode_crash_point(markers::CRASH_POINT_BASE + 1),
            None
        );
        assert_eq!(
            markers::decode_crash_point(markers::crash_point_end(12) + 1),
            None
        );
        assert_eq!(markers::decode_crash_point(MARKER_TRACE_ON), None);
    }

    #[test]
    fn op_done_markers_round_trip_and_stay_in_their_range() {
        use markers::*;
        for k in [0, 1, 99_999, OP_DONE_LIMIT - 1] {
            let id = op_done(k);
            assert_eq!(decode_op_done(id), Some(k));
            assert_eq!(decode_crash_point(id), None);
            assert_eq!(id & MARKER_CONTROL_BIT, 0);
        }
        assert_eq!(op_done(0), 0x1000_0000);
        assert_eq!(decode_op_done(OP_DONE_BASE - 1), None);
        assert_eq!(decode_op_done(0x2000_0000), None);
        for id in [
            MARKER_TRACE_ON,
            MARKER_TRACE_OFF,
            MARKER_RING3_ENTERED,
            MARKER_SNAPSHOT,
            crash_point_begin(1),
            crash_point_end(12),
            0,
            u32::MAX,
        ] {
            assert_eq!(decode_op_done(id), None, "{id:#x}");
        }
    }

    #[test]
    #[should_panic(expected = "op-done range")]
    fn op_done_refuses_numbers_past_its_range() {
        markers::op_done(core::hint::black_box(markers::OP_DONE_LIMIT));
    }

    #[test]
    fn codes_round_trip() {
        for k in 1..=5 {
            assert_eq!(MessageKind::from_u32(k).map(|k| k as u32), Some(k));
        }
        assert_eq!(MessageKind::from_u32(0), None);
        for c in 0..=5 {
            assert_eq!(ExitCode::from_u32(c).map(|c| c as u32), Some(c));
        }
        assert_eq!(ExitCode::from_u32(6), None);
    }
}
