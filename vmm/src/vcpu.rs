//! The vCPU: its registers, the exit handler (a function of the exit and the
//! device set, testable without KVM) and the run loop around it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use protocol::{layout, MessageHeader};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::serial::{Console, ConsoleSink};
use crate::devices::MmioBus;
use crate::disk::DiskImage;
use crate::memory::{ImageMode, PmemRegion};
use crate::trace::Event;
use crate::vm::{
    close_window, MarkerRecord, Message, Outcome, RunStats, Tracer, VmError, WindowBase,
    MAX_MESSAGE_BYTES,
};
use crate::watchdog::Watchdog;

/// The guest's general and control registers when a run stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registers {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs: u16,
    pub ss: u16,
}

impl Registers {
    pub(crate) fn read(vcpu: &VcpuFd) -> Self {
        let mut r = Registers::default();
        if let Ok(g) = vcpu.get_regs() {
            r.rip = g.rip;
            r.rsp = g.rsp;
            r.rflags = g.rflags;
            r.rax = g.rax;
            r.rbx = g.rbx;
            r.rcx = g.rcx;
            r.rdx = g.rdx;
            r.rsi = g.rsi;
            r.rdi = g.rdi;
            r.rbp = g.rbp;
        }
        if let Ok(s) = vcpu.get_sregs() {
            r.cr0 = s.cr0;
            r.cr2 = s.cr2;
            r.cr3 = s.cr3;
            r.cr4 = s.cr4;
            r.efer = s.efer;
            r.cs = s.cs.selector;
            r.ss = s.ss.selector;
        }
        r
    }
}

/// The device set the exit handler works on, and what the guest produced so
/// far. Nothing in it needs KVM: the tests build one over plain files.
pub(crate) struct Devices {
    pub(crate) start: Instant,
    /// Guest RAM (messages are read from it).
    pub(crate) ram: GuestMemoryMmap,
    pub(crate) pmem: Arc<PmemRegion>,
    pub(crate) disk: Arc<Mutex<DiskImage>>,
    pub(crate) tracer: Arc<Mutex<Tracer>>,
    /// The virtio-mmio transports.
    pub(crate) bus: MmioBus,
    /// COM1.
    pub(crate) console: Console,
    pub(crate) messages: Vec<Message>,
    pub(crate) message_bytes: usize,
    pub(crate) markers: Vec<MarkerRecord>,
    pub(crate) protocol_errors: Vec<String>,
    pub(crate) stats: RunStats,
    /// Stop the run at [`protocol::MARKER_SNAPSHOT`] (the fork-server's boot);
    /// otherwise that marker is recorded like any control marker.
    pub(crate) stop_at_snapshot: bool,
    /// A fork-server run: the pmem region's pages are in the server's window,
    /// not at the region's own address, so tracing (which reads the region
    /// and registers its address as the slot) is refused.
    pub(crate) fork_run: bool,
}

impl Devices {
    /// A device set for one run with nothing produced yet: a quiet console,
    /// a fresh VM's run (see [`Devices::fork_run`]) that does not stop at
    /// the snapshot marker.
    pub(crate) fn new(
        start: Instant,
        ram: GuestMemoryMmap,
        pmem: Arc<PmemRegion>,
        disk: Arc<Mutex<DiskImage>>,
        tracer: Arc<Mutex<Tracer>>,
        bus: MmioBus,
    ) -> Self {
        Devices {
            start,
            ram,
            pmem,
            disk,
            tracer,
            bus,
            console: Console::new(ConsoleSink::default()),
            messages: Vec::new(),
            message_bytes: 0,
            markers: Vec::new(),
            protocol_errors: Vec::new(),
            stats: RunStats::default(),
            stop_at_snapshot: false,
            fork_run: false,
        }
    }
}

/// How the run loop ended.
#[derive(Debug)]
pub(crate) enum LoopEnd {
    /// The run is over.
    Stopped(Outcome),
    /// The guest reached [`protocol::MARKER_SNAPSHOT`] and
    /// [`Devices::stop_at_snapshot`] is set: the vCPU is at that marker's
    /// `out`, which is not completed yet.
    Snapshot,
}

/// What the run loop does after an exit was handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Run the vCPU again.
    Continue,
    /// Register the pmem slot again, read-only (`true`: tracing started) or
    /// read-write (`false`: tracing stopped), then run again.
    SetTraced(bool),
    /// The run is over.
    Stop(Stop),
    /// The fork-server's snapshot point (see [`LoopEnd::Snapshot`]).
    Snapshot,
}

/// Why the run stopped (the loop adds the registers: see [`Stop::outcome`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    Exited(u32),
    Halted,
    Shutdown,
    /// `KVM_EXIT_INTERNAL_ERROR`: the loop reads the suberror from `kvm_run`.
    InternalError,
    FailEntry(u64),
    Unhandled(String),
}

impl Stop {
    /// The run's [`Outcome`], with the registers of `vcpu` at the stop.
    pub(crate) fn outcome(self, vcpu: &mut VcpuFd) -> Outcome {
        if let Stop::Exited(code) = self {
            // The common end of a run: no registers to read.
            return Outcome::Exited { code };
        }
        let regs = Registers::read(vcpu);
        match self {
            Stop::Exited(code) => Outcome::Exited { code },
            Stop::Halted => Outcome::Halted { regs },
            Stop::Shutdown => Outcome::Shutdown { regs },
            Stop::InternalError => {
                // SAFETY: after an internal-error exit KVM filled the `internal`
                // member of the union (the handler returns this variant for
                // that exit only, and nothing ran the vCPU since).
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Outcome::InternalError { suberror, regs }
            }
            Stop::FailEntry(reason) => Outcome::FailEntry { reason, regs },
            Stop::Unhandled(exit) => Outcome::Unhandled { exit, regs },
        }
    }
}

/// Reads a message announced at guest-physical `gpa`: `(kind, payload)`, or
/// why it was refused. Nothing the guest wrote is trusted: the header and the
/// payload must lie in RAM and the length within the protocol's limit.
pub(crate) fn read_message(ram: &GuestMemoryMmap, gpa: u64) -> Result<(u32, Vec<u8>), String> {
    let hdr: [u8; MessageHeader::SIZE] = ram
        .read_obj(GuestAddress(gpa))
        .map_err(|_| format!("message header at {gpa:#x} is outside guest RAM"))?;
    let h = MessageHeader::decode(hdr);
    if h.len > protocol::MESSAGE_MAX_LEN {
        return Err(format!(
            "message at {gpa:#x} claims {} bytes (at most {})",
            h.len,
            protocol::MESSAGE_MAX_LEN
        ));
    }
    let mut payload = vec![0u8; h.len as usize];
    let at = gpa.checked_add(MessageHeader::SIZE as u64);
    if at
        .map(|a| ram.read_slice(&mut payload, GuestAddress(a)))
        .is_none_or(|r| r.is_err())
    {
        return Err(format!(
            "message payload of {} bytes at {gpa:#x} is outside guest RAM",
            h.len
        ));
    }
    Ok((h.kind, payload))
}

/// Protocol errors kept per run; a guest cannot make the VMM hold more.
const MAX_PROTOCOL_ERRORS: usize = 100;

impl Devices {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn protocol_error(&mut self, msg: String) {
        if self.protocol_errors.len() < MAX_PROTOCOL_ERRORS {
            self.protocol_errors.push(msg);
        }
    }

    /// Starts a window: freezes the base (pages and sectors changed so far);
    /// the loop then makes the pmem slot read-only so every store exits.
    pub(crate) fn trace_on(&mut self) -> Result<Action, VmError> {
        let mut t = self.tracer.lock().unwrap_or_else(|e| e.into_inner());
        if t.on {
            drop(t);
            self.protocol_error("trace-on marker while tracing is already on".into());
            return Ok(Action::Continue);
        }
        if self.fork_run {
            drop(t);
            self.protocol_error("trace-on refused: fork-server runs are untraced".to_string());
            return Ok(Action::Continue);
        }
        if self.pmem.mode() != ImageMode::CopyOnWrite {
            drop(t);
            self.protocol_error("trace-on refused: tracing needs copy-on-write images".to_string());
            return Ok(Action::Continue);
        }
        let pmem_pages = self.pmem.private_pages()?;
        let disk_overlay = self
            .disk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .overlay()
            .clone();
        t.base = Some(WindowBase {
            pmem_pages,
            disk_overlay,
        });
        t.on = true;
        Ok(Action::SetTraced(true))
    }

    fn trace_off(&mut self) -> Action {
        let mut t = self.tracer.lock().unwrap_or_else(|e| e.into_inner());
        if !t.on {
            drop(t);
            self.protocol_error("trace-off marker while tracing is off".into());
            return Action::Continue;
        }
        close_window(&mut t, &self.pmem, &self.disk, false);
        Action::SetTraced(false)
    }

    fn marker(&mut self, id: u32) -> Result<Action, VmError> {
        let action = match id {
            protocol::MARKER_TRACE_ON => self.trace_on()?,
            protocol::MARKER_TRACE_OFF => self.trace_off(),
            protocol::MARKER_SNAPSHOT if self.stop_at_snapshot => Action::Snapshot,
            _ => Action::Continue,
        };
        let trace_pos = if id & protocol::MARKER_CONTROL_BIT == 0 {
            let mut t = self.tracer.lock().unwrap_or_else(|e| e.into_inner());
            let w = t.windows.len();
            t.record(Event::Marker { id }).map(|seq| (w, seq))
        } else {
            None
        };
        if self.markers.len() < 1 << 20 {
            self.markers.push(MarkerRecord {
                id,
                at_ns: self.now_ns(),
                trace_pos,
            });
        }
        Ok(action)
    }

    fn message(&mut self, gpa: u64) {
        let (kind, payload) = match read_message(&self.ram, gpa) {
            Ok(m) => m,
            Err(e) => return self.protocol_error(e),
        };
        if self.message_bytes + payload.len() > MAX_MESSAGE_BYTES {
            return self.protocol_error("message limit reached; message dropped".into());
        }
        self.message_bytes += payload.len();
        self.messages.push(Message {
            kind,
            payload,
            at_ns: self.now_ns(),
        });
    }

    /// Applies a guest store that hit the read-only pmem slot and traces it.
    fn pmem_store(&mut self, addr: u64, data: &[u8]) {
        let off = addr - layout::PMEM_START;
        if data.is_empty() || data.len() > 8 || self.pmem.write(off, data).is_err() {
            return self.protocol_error(format!(
                "pmem store of {} bytes at {addr:#x} rejected",
                data.len()
            ));
        }
        self.stats.traced_stores += 1;
        let mut t = self.tracer.lock().unwrap_or_else(|e| e.into_inner());
        if t.on && !t.full(0) {
            t.trace.push_pmem_store(off, data);
        }
    }

    fn in_pmem(&self, addr: u64, len: usize) -> bool {
        addr >= layout::PMEM_START
            && (addr - layout::PMEM_START)
                .checked_add(len as u64)
                .is_some_and(|e| e <= self.pmem.size())
    }
}

/// Handles one vCPU exit on the device set: protocol ports, COM1, the
/// virtio-mmio bus and traced pmem stores. Returns what the run loop does
/// next; errors are VMM failures. Needs no KVM (the tests call it directly).
pub(crate) fn handle_exit(exit: VcpuExit<'_>, dev: &mut Devices) -> Result<Action, VmError> {
    dev.stats.exits += 1;
    match exit {
        VcpuExit::IoOut(port, data) => {
            dev.stats.pio_exits += 1;
            let word =
                (data.len() == 4).then(|| u32::from_le_bytes(data.try_into().expect("4 bytes")));
            match (port, word) {
                (protocol::PORT_EXIT, Some(code)) => return Ok(Action::Stop(Stop::Exited(code))),
                (protocol::PORT_MESSAGE, Some(gpa)) => dev.message(gpa as u64),
                (protocol::PORT_MARKER, Some(id)) => return dev.marker(id),
                (protocol::PORT_EXIT | protocol::PORT_MESSAGE | protocol::PORT_MARKER, None) => dev
                    .protocol_error(format!(
                        "{}-byte write to port {port:#x} (the protocol's ports take 32-bit writes)",
                        data.len()
                    )),
                (p, _) if (protocol::PORT_COM1..protocol::PORT_COM1 + 8).contains(&p) => {
                    let v = data.first().copied().unwrap_or(0);
                    if let Err(e) = dev.console.write((p - protocol::PORT_COM1) as u8, v) {
                        dev.protocol_error(format!("console: {e}"));
                    }
                }
                _ => dev.stats.stray_accesses += 1,
            }
        }
        VcpuExit::IoIn(port, data) => {
            dev.stats.pio_exits += 1;
            if (protocol::PORT_COM1..protocol::PORT_COM1 + 8).contains(&port) {
                let v = dev.console.read((port - protocol::PORT_COM1) as u8);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            } else {
                data.fill(0xff);
                dev.stats.stray_accesses += 1;
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            dev.stats.mmio_exits += 1;
            if dev.in_pmem(addr, data.len()) {
                dev.pmem_store(addr, data);
            } else if !dev.bus.write(addr, data) {
                dev.stats.stray_accesses += 1;
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            dev.stats.mmio_exits += 1;
            if dev.in_pmem(addr, data.len()) {
                // Reads of the slot are native; serve stray ones anyway.
                let _ = dev.pmem.read(addr - layout::PMEM_START, data);
            } else if !dev.bus.read(addr, data) {
                data.fill(0xff);
                dev.stats.stray_accesses += 1;
            }
        }
        VcpuExit::Hlt => return Ok(Action::Stop(Stop::Halted)),
        VcpuExit::Shutdown => return Ok(Action::Stop(Stop::Shutdown)),
        VcpuExit::InternalError => return Ok(Action::Stop(Stop::InternalError)),
        VcpuExit::FailEntry(reason, _) => return Ok(Action::Stop(Stop::FailEntry(reason))),
        VcpuExit::Intr => {}
        other => return Ok(Action::Stop(Stop::Unhandled(format!("{other:?}")))),
    }
    Ok(Action::Continue)
}

/// Runs the vCPU until the run stops: the guest's exit, a fault, the
/// watchdog, or a full trace. Switching the pmem slot (tracing on/off) is the
/// only thing done here with the VM fd.
pub(crate) fn run_loop(
    vcpu: &mut VcpuFd,
    vm: &VmFd,
    dev: &mut Devices,
    wd: &Watchdog,
) -> Result<LoopEnd, VmError> {
    loop {
        if wd.expired() {
            return Ok(LoopEnd::Stopped(Outcome::Timeout {
                regs: Registers::read(vcpu),
            }));
        }
        if dev
            .tracer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .overflow
        {
            return Ok(LoopEnd::Stopped(Outcome::TraceLimit {
                regs: Registers::read(vcpu),
            }));
        }
        let exit = match vcpu.run() {
            Ok(e) => e,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                continue;
            }
            Err(source) => {
                return Err(VmError::Kvm {
                    what: "KVM_RUN",
                    source,
                })
            }
        };
        match handle_exit(exit, dev)? {
            Action::Continue => {}
            Action::SetTraced(traced) => dev.pmem.register(vm, traced, true)?,
            Action::Stop(stop) => return Ok(LoopEnd::Stopped(stop.outcome(vcpu))),
            Action::Snapshot => return Ok(LoopEnd::Snapshot),
        }
    }
}

/// Runs the vCPU to the end of a run (one that does not stop at the
/// snapshot marker) within `timeout`, and notes when it stopped.
pub(crate) fn run_to_end(
    vcpu: &mut VcpuFd,
    vm: &VmFd,
    dev: &mut Devices,
    timeout: Duration,
) -> Result<Outcome, VmError> {
    let watchdog = Watchdog::start(timeout);
    let end = run_loop(vcpu, vm, dev, &watchdog);
    dev.stats.stop_ns = dev.start.elapsed().as_nanos() as u64;
    drop(watchdog);
    match end? {
        LoopEnd::Stopped(o) => Ok(o),
        // Only the fork-server's boot sets `stop_at_snapshot`.
        LoopEnd::Snapshot => unreachable!("a run does not stop at the snapshot marker"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> GuestMemoryMmap {
        crate::memory::create_ram(4).unwrap()
    }

    fn put(ram: &GuestMemoryMmap, gpa: u64, kind: u32, len: u32, payload: &[u8]) {
        ram.write_slice(&MessageHeader { kind, len }.encode(), GuestAddress(gpa))
            .unwrap();
        ram.write_slice(payload, GuestAddress(gpa + 8)).unwrap();
    }

    #[test]
    fn messages_are_read_from_guest_ram() {
        let m = ram();
        put(&m, 0x1000, MessageKind::Text as u32, 5, b"hello");
        assert_eq!(read_message(&m, 0x1000), Ok((1, b"hello".to_vec())));
        put(&m, 0x2000, MessageKind::Error as u32, 0, b"");
        assert_eq!(read_message(&m, 0x2000), Ok((3, vec![])));
    }

    #[test]
    fn bad_message_addresses_and_lengths_are_refused() {
        let m = ram();
        let end = 4u64 << 20;
        // Header outside RAM, or straddling its end.
        assert!(read_message(&m, end).is_err());
        assert!(read_message(&m, end - 4).is_err());
        assert!(read_message(&m, u64::MAX - 3).is_err());
        // Payload running past the end of RAM.
        put(&m, end - 16, 1, 9, b"");
        assert!(read_message(&m, end - 16).unwrap_err().contains("outside"));
        // Length over the protocol's limit.
        put(&m, 0x1000, 1, protocol::MESSAGE_MAX_LEN + 1, b"");
        assert!(read_message(&m, 0x1000).unwrap_err().contains("claims"));
        put(&m, 0x1000, 1, u32::MAX, b"");
        assert!(read_message(&m, 0x1000).is_err());
    }

    // The exit handler on a device set over plain files: no /dev/kvm.
    use crate::devices::serial::ConsoleSink;
    use crate::disk::DiskImage;
    use crate::vm::Tracer;
    use protocol::MessageKind;
    use vmm_sys_util::tempfile::TempFile;

    struct Fixture {
        dev: Devices,
        _files: (TempFile, TempFile),
    }

    fn devices() -> Fixture {
        let p = TempFile::new().unwrap();
        p.as_file().set_len(layout::PMEM_MIN_SIZE).unwrap();
        let d = TempFile::new().unwrap();
        d.as_file().set_len(1 << 20).unwrap();
        let pmem = PmemRegion::open(p.as_path(), ImageMode::CopyOnWrite).unwrap();
        let disk = DiskImage::open(d.as_path(), ImageMode::CopyOnWrite).unwrap();
        Fixture {
            dev: Devices::new(
                Instant::now(),
                ram(),
                Arc::new(pmem),
                Arc::new(Mutex::new(disk)),
                Arc::new(Mutex::new(Tracer::new())),
                MmioBus::new(),
            ),
            _files: (p, d),
        }
    }

    fn out(dev: &mut Devices, port: u16, data: &[u8]) -> Action {
        handle_exit(VcpuExit::IoOut(port, data), dev).unwrap()
    }

    #[test]
    fn exit_port_stops_with_the_code_and_only_takes_32_bit_writes() {
        let mut f = devices();
        let d = &mut f.dev;
        assert_eq!(
            out(d, protocol::PORT_EXIT, &7u32.to_le_bytes()),
            Action::Stop(Stop::Exited(7))
        );
        assert_eq!(out(d, protocol::PORT_EXIT, &[7, 0]), Action::Continue);
        assert!(
            d.protocol_errors[0].contains("2-byte write"),
            "{:?}",
            d.protocol_errors
        );
        assert_eq!((d.stats.exits, d.stats.pio_exits), (2, 2));
    }

    #[test]
    fn messages_markers_and_console_are_recorded() {
        let mut f = devices();
        let d = &mut f.dev;
        put(&d.ram, 0x1000, MessageKind::Text as u32, 2, b"hi");
        assert_eq!(
            out(d, protocol::PORT_MESSAGE, &0x1000u32.to_le_bytes()),
            Action::Continue
        );
        assert_eq!(d.messages[0].payload, b"hi");
        // A bad message address is a protocol error, not a VMM failure.
        assert_eq!(
            out(d, protocol::PORT_MESSAGE, &u32::MAX.to_le_bytes()),
            Action::Continue
        );
        assert_eq!(d.protocol_errors.len(), 1);
        assert_eq!(
            out(d, protocol::PORT_MARKER, &0x42u32.to_le_bytes()),
            Action::Continue
        );
        assert_eq!(d.markers[0].id, 0x42);
        assert_eq!(d.markers[0].trace_pos, None, "not tracing");
        out(d, protocol::PORT_COM1, b"A");
        assert_eq!(d.console.read(5) & 0x20, 0x20, "THR empty after a write");
        let f = std::mem::replace(&mut d.console, Console::new(ConsoleSink::default()));
        assert_eq!(f.into_sink().buffer, b"A");
    }

    #[test]
    fn trace_markers_switch_the_slot_and_stores_are_traced() {
        let mut f = devices();
        let d = &mut f.dev;
        let on = protocol::MARKER_TRACE_ON.to_le_bytes();
        let off = protocol::MARKER_TRACE_OFF.to_le_bytes();
        assert_eq!(out(d, protocol::PORT_MARKER, &on), Action::SetTraced(true));
        // A second trace-on is refused: nothing to switch.
        assert_eq!(out(d, protocol::PORT_MARKER, &on), Action::Continue);
        assert_eq!(d.protocol_errors.len(), 1);
        let a = handle_exit(
            VcpuExit::MmioWrite(layout::PMEM_START + 0x40, &5u64.to_le_bytes()),
            d,
        )
        .unwrap();
        assert_eq!(a, Action::Continue);
        assert_eq!(d.pmem.read_u64(0x40).unwrap(), 5);
        assert_eq!(
            out(d, protocol::PORT_MARKER, &9u32.to_le_bytes()),
            Action::Continue
        );
        // A store past the region's end is refused, not applied.
        let end = layout::PMEM_START + d.pmem.size() - 4;
        handle_exit(VcpuExit::MmioWrite(end, &[1; 8]), d).unwrap();
        assert_eq!(d.stats.traced_stores, 1);
        assert_eq!(
            out(d, protocol::PORT_MARKER, &off),
            Action::SetTraced(false)
        );
        let t = d.tracer.lock().unwrap();
        assert!(!t.on);
        assert_eq!(t.windows.len(), 1);
        assert_eq!(
            t.windows[0].trace.events(),
            &[
                Event::PmemStore {
                    offset: 0x40,
                    len: 8,
                    value: 5
                },
                Event::Marker { id: 9 }
            ]
        );
        drop(t);
        assert_eq!(out(d, protocol::PORT_MARKER, &off), Action::Continue);
    }

    #[test]
    fn stray_accesses_read_as_ones_and_stops_map_to_their_kind() {
        let mut f = devices();
        let d = &mut f.dev;
        let mut b = [0u8; 4];
        handle_exit(VcpuExit::IoIn(0x60, &mut b), d).unwrap();
        assert_eq!(b, [0xff; 4]);
        let mut b = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xdead_0000, &mut b), d).unwrap();
        assert_eq!(b, [0xff; 4]);
        handle_exit(VcpuExit::MmioWrite(0xdead_0000, &[1]), d).unwrap();
        out(d, 0x80, &[1]);
        assert_eq!(d.stats.stray_accesses, 4);
        // Pmem reads that exit anyway are served from the region.
        d.pmem.write(0x10, &[3; 4]).unwrap();
        handle_exit(VcpuExit::MmioRead(layout::PMEM_START + 0x10, &mut b), d).unwrap();
        assert_eq!(b, [3; 4]);
        for (exit, stop) in [
            (VcpuExit::Hlt, Stop::Halted),
            (VcpuExit::Shutdown, Stop::Shutdown),
            (VcpuExit::InternalError, Stop::InternalError),
            (VcpuExit::FailEntry(3, 0), Stop::FailEntry(3)),
        ] {
            assert_eq!(handle_exit(exit, d).unwrap(), Action::Stop(stop));
        }
        assert_eq!(handle_exit(VcpuExit::Intr, d).unwrap(), Action::Continue);
        assert!(matches!(
            handle_exit(VcpuExit::Debug(Default::default()), d).unwrap(),
            Action::Stop(Stop::Unhandled(e)) if e.starts_with("Debug")
        ));
    }
}
