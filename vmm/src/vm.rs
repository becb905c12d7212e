//! One run of a VM: set up, run the vCPU until the guest exits (or the
//! watchdog, a fault or KVM stops it), and return everything that happened.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use protocol::{layout, MessageKind};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use crate::boot::{self, BootError};
use crate::crash::TraceWindow;
use crate::devices::serial::{Console, ConsoleSink};
use crate::devices::virtio::{
    self, Block, EventFd, IoObserver, MmioTransport, Pmem, PmemBackend, TransportError,
};
use crate::devices::{MmioBus, Overlap};
use crate::disk::{DiskImage, Overlay};
use crate::faults::{BlkFaults, BlkRequest, FaultError, InjectedFault};
use crate::memory::{self, ImageMode, MemoryError, PmemRegion};
use crate::trace::{Event, Trace};
pub use crate::vcpu::Registers;
use crate::vcpu::{self, Devices};

/// Errors that stop the VMM itself (as opposed to outcomes of the guest).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (the VMM needs read-write access to /dev/kvm: run as root or add yourself to the `kvm` group)")]
    NoKvm(kvm_ioctls::Error),
    #[error("KVM lacks {0}, which the VMM needs")]
    MissingCap(&'static str),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("console log {path}: {source}")]
    ConsoleLog {
        path: String,
        source: std::io::Error,
    },
    #[error("tracing needs copy-on-write images (a write-through image has no frozen base)")]
    TraceNeedsCopyOnWrite,
    #[error("creating a device's interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("setting up a virtio-mmio transport: {0}")]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Bus(#[from] Overlap),
    #[error("virtio-blk fault plan: {0}")]
    Faults(#[from] FaultError),
    #[error("{0} is still shared at the end of the run (a VMM bug)")]
    StillShared(&'static str),
    #[error("fork-server: {0}")]
    Fork(&'static str),
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Where the console goes.
#[derive(Debug, Clone, Default)]
pub struct ConsoleConfig {
    /// Append the console to this file.
    pub log: Option<PathBuf>,
    /// Echo the console to the VMM's standard error.
    pub terminal: bool,
}

/// Everything a run needs: plain settings plus the two images it runs on.
/// The images are opened beforehand (see [`VmConfig::new`]) so that crash
/// images from [`crate::crash`] can be used directly, without a file.
#[derive(Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    /// Kernel command line (the VMM appends the `virtio_mmio.device=` entries).
    pub cmdline: String,
    pub mem_mib: u64,
    pub pmem: PmemRegion,
    pub disk: DiskImage,
    /// Trace from the first instruction (otherwise the guest's control markers decide).
    pub trace: bool,
    pub timeout: Duration,
    pub console: ConsoleConfig,
    /// Create the in-kernel irqchip and wire each device's interrupt as an
    /// irqfd. Off by default: the project's guest polls, and on PVM hosts the
    /// irqchip makes every traced store cost ~68 µs instead of ~28 µs.
    pub interrupts: bool,
    /// virtio-blk requests to fail with `IOERR` (default: none); see
    /// [`crate::faults`].
    pub blk_faults: BlkFaults,
}

impl VmConfig {
    /// A configuration with copy-on-write views of the given images, default
    /// RAM, no tracing, a 10 s timeout and a quiet console.
    pub fn new(
        kernel: impl Into<PathBuf>,
        cmdline: impl Into<String>,
        pmem: &std::path::Path,
        disk: &std::path::Path,
    ) -> Result<Self, VmError> {
        Ok(VmConfig {
            kernel: kernel.into(),
            cmdline: cmdline.into(),
            mem_mib: layout::RAM_DEFAULT_MIB,
            pmem: PmemRegion::open(pmem, ImageMode::CopyOnWrite)?,
            disk: DiskImage::open(disk, ImageMode::CopyOnWrite)?,
            trace: false,
            timeout: Duration::from_secs(10),
            console: ConsoleConfig::default(),
            interrupts: false,
            blk_faults: BlkFaults::default(),
        })
    }
}
/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Outcome {
    /// The guest wrote `code` to the exit port.
    Exited { code: u32 },
    /// The run exceeded its time budget.
    Timeout { regs: Registers },
    /// Triple fault or shutdown.
    Shutdown { regs: Registers },
    /// The guest halted with nothing to wake it.
    Halted { regs: Registers },
    /// KVM could not run the guest (for example an instruction the PVM
    /// emulator rejects: suberror 1).
    InternalError { suberror: u32, regs: Registers },
    /// VM entry failed.
    FailEntry { reason: u64, regs: Registers },
    /// Another KVM exit the VMM does not handle.
    Unhandled { exit: String, regs: Registers },
    /// The trace outgrew [`MAX_TRACE_EVENTS`] events or [`MAX_TRACE_DATA`]
    /// bytes of disk data; the run was stopped rather than traced partially.
    TraceLimit { regs: Registers },
}

impl Outcome {
    /// The guest's exit code, when it exited.
    pub fn exit_code(&self) -> Option<u32> {
        match self {
            Outcome::Exited { code } => Some(*code),
            _ => None,
        }
    }

    /// Short name: `exited`, `timeout`, `shutdown`, ...
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Exited { .. } => "exited",
            Outcome::Timeout { .. } => "timeout",
            Outcome::Shutdown { .. } => "shutdown",
            Outcome::Halted { .. } => "halted",
            Outcome::InternalError { .. } => "internal-error",
            Outcome::FailEntry { .. } => "fail-entry",
            Outcome::Unhandled { .. } => "unhandled",
            Outcome::TraceLimit { .. } => "trace-limit",
        }
    }
}

/// A message the guest sent on the protocol's channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Raw kind; see [`Message::kind`].
    pub kind: u32,
    pub payload: Vec<u8>,
    /// Time since the VMM started.
    pub at_ns: u64,
}

impl Message {
    pub fn kind(&self) -> Option<MessageKind> {
        MessageKind::from_u32(self.kind)
    }

    /// The payload as text (lossy), for text-like kinds.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The exception report, for [`MessageKind::Exception`].
    pub fn exception(&self) -> Option<protocol::ExceptionReport> {
        (self.kind() == Some(MessageKind::Exception))
            .then(|| protocol::ExceptionReport::decode(&self.payload))
            .flatten()
    }
}

/// A marker the guest wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkerRecord {
    pub id: u32,
    /// Time since the VMM started.
    pub at_ns: u64,
    /// `(window index, sequence number)` of the marker when tracing was on.
    pub trace_pos: Option<(usize, u64)>,
}

/// Counters of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStats {
    /// VMM start to the first `KVM_RUN`.
    pub setup_ns: u64,
    /// VMM start to the moment the run stopped (the guest's exit, a fault, the
    /// watchdog), before the VM is torn down.
    pub stop_ns: u64,
    /// VMM start to the end of the run, VM teardown included.
    pub total_ns: u64,
    pub exits: u64,
    pub pio_exits: u64,
    pub mmio_exits: u64,
    pub traced_stores: u64,
    /// Accesses to addresses or ports nothing claims (ignored).
    pub stray_accesses: u64,
}

/// Everything a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    pub outcome: Outcome,
    pub messages: Vec<Message>,
    pub markers: Vec<MarkerRecord>,
    /// What the guest wrote to COM1.
    pub console: Vec<u8>,
    /// The traced windows, in order (the last may still have been open).
    pub windows: Vec<TraceWindow>,
    /// Guest protocol violations the VMM refused (bad message addresses, ...).
    pub protocol_errors: Vec<String>,
    /// The virtio-blk requests failed by [`VmConfig::blk_faults`], in order
    /// (at most [`MAX_INJECTED_FAULTS`] kept).
    pub blk_faults: Vec<InjectedFault>,
    pub stats: RunStats,
    /// The images as the run left them.
    pub pmem: PmemRegion,
    pub disk: DiskImage,
}

/// A message as written to JSON: its kind's name and a readable payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageSummary {
    pub kind: String,
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exception: Option<ExceptionSummary>,
    pub at_ns: u64,
}

/// An [`protocol::ExceptionReport`] for JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExceptionSummary {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cr2: u64,
}

/// What a run produced, without the images: for JSON output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSummary {
    pub outcome: Outcome,
    pub messages: Vec<MessageSummary>,
    pub markers: Vec<MarkerRecord>,
    pub console: String,
    pub protocol_errors: Vec<String>,
    /// Number of events in each traced window.
    pub window_events: Vec<usize>,
    /// The virtio-blk requests failed on purpose (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blk_faults: Vec<InjectedFault>,
    pub stats: RunStats,
}

impl RunOutcome {
    /// The run without its images, ready for `serde_json`.
    pub fn summary(&self) -> RunSummary {
        RunSummary {
            outcome: self.outcome.clone(),
            messages: self
                .messages
                .iter()
                .map(|m| MessageSummary {
                    kind: m
                        .kind()
                        .map(|k| format!("{k:?}").to_lowercase())
                        .unwrap_or_else(|| format!("unknown-{}", m.kind)),
                    text: if m.kind() == Some(MessageKind::Exception) {
                        String::new()
                    } else {
                        m.text()
                    },
                    exception: m.exception().map(|e| ExceptionSummary {
                        vector: e.vector,
                        error_code: e.error_code,
                        rip: e.rip,
                        cr2: e.cr2,
                    }),
                    at_ns: m.at_ns,
                })
                .collect(),
            markers: self.markers.clone(),
            console: self.console_text(),
            protocol_errors: self.protocol_errors.clone(),
            window_events: self.windows.iter().map(|w| w.trace.len()).collect(),
            blk_faults: self.blk_faults.clone(),
            stats: self.stats,
        }
    }

    /// When the guest entered ring 3 ([`protocol::MARKER_RING3_ENTERED`]),
    /// as time since the VMM started.
    pub fn ring3_entered_ns(&self) -> Option<u64> {
        self.markers
            .iter()
            .find(|m| m.id == protocol::MARKER_RING3_ENTERED)
            .map(|m| m.at_ns)
    }

    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&self.console).into_owned()
    }

    /// The trace of the first window (empty when nothing was traced).
    pub fn trace(&self) -> Trace {
        self.windows
            .first()
            .map(|w| w.trace.clone())
            .unwrap_or_default()
    }
}

/// The KVM handle and supported CPUID, opened once per process (both cost
/// more than the rest of a VM's setup).
pub(crate) struct Host {
    pub(crate) kvm: Kvm,
    pub(crate) cpuid: CpuId,
}

/// Why the host cannot run VMs (kept once per process, so `Copy`).
#[derive(Debug, Clone, Copy)]
enum HostError {
    NoKvm(kvm_ioctls::Error),
    MissingCap(&'static str),
    Cpuid(kvm_ioctls::Error),
}

impl From<HostError> for VmError {
    fn from(e: HostError) -> Self {
        match e {
            HostError::NoKvm(e) => VmError::NoKvm(e),
            HostError::MissingCap(c) => VmError::MissingCap(c),
            HostError::Cpuid(source) => VmError::Kvm {
                what: "KVM_GET_SUPPORTED_CPUID",
                source,
            },
        }
    }
}

pub(crate) fn host() -> Result<&'static Host, VmError> {
    static HOST: OnceLock<Result<Host, HostError>> = OnceLock::new();
    let h = HOST.get_or_init(|| {
        let kvm = Kvm::new().map_err(HostError::NoKvm)?;
        for (cap, name) in [
            (kvm_ioctls::Cap::ReadonlyMem, "KVM_CAP_READONLY_MEM"),
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HostError::MissingCap(name));
            }
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(HostError::Cpuid)?;
        Ok(Host { kvm, cpuid })
    });
    h.as_ref().map_err(|e| VmError::from(*e))
}

/// Checks that `/dev/kvm` can be used, with an error that says how to fix it.
pub fn check_kvm() -> Result<(), VmError> {
    Kvm::new().map_err(VmError::NoKvm)?;
    host().map(|_| ())
}

/// Most events one traced window may hold.
pub const MAX_TRACE_EVENTS: usize = 64 << 20;
/// Most disk-write bytes one traced window may hold.
pub const MAX_TRACE_DATA: usize = 1 << 30;
/// Most message payload bytes a run keeps.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Most injected faults a run lists (a `N+` plan can fail every request).
pub const MAX_INJECTED_FAULTS: usize = 1 << 20;

/// Trace state shared by the vCPU loop and the device observers.
pub(crate) struct Tracer {
    pub(crate) on: bool,
    /// Set when the window outgrew its limits; the run loop stops the run.
    pub(crate) overflow: bool,
    pub(crate) data_bytes: usize,
    pub(crate) trace: Trace,
    pub(crate) base: Option<WindowBase>,
    pub(crate) windows: Vec<TraceWindow>,
    /// Requests the fault plan failed (kept here for their trace position).
    pub(crate) faults: Vec<InjectedFault>,
}

pub(crate) struct WindowBase {
    pub(crate) pmem_pages: std::collections::BTreeMap<u64, Box<[u8]>>,
    pub(crate) disk_overlay: Overlay,
}

impl Tracer {
    pub(crate) fn full(&mut self, extra: usize) -> bool {
        if self.trace.len() >= MAX_TRACE_EVENTS || self.data_bytes + extra > MAX_TRACE_DATA {
            self.overflow = true;
        }
        self.overflow
    }

    pub(crate) fn record(&mut self, e: Event) -> Option<u64> {
        (self.on && !self.full(0)).then(|| self.trace.push(e))
    }
}

/// Forwards device I/O into the trace.
pub(crate) struct Observer(pub(crate) Arc<Mutex<Tracer>>);

impl IoObserver for Observer {
    fn blk_write(&mut self, sector: u64, data: &[u8]) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if t.on && !t.full(data.len()) {
            t.data_bytes += data.len();
            t.trace.push_blk_write(sector, data);
        }
    }
    fn blk_flush(&mut self) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.record(Event::BlkFlush);
    }
    /// Not a trace event: a failed write reached no media and a failed flush
    /// is no barrier, so to every persistence model the request did nothing
    /// (a `BlkFlush` here would wrongly make the writes before it durable).
    /// A new event kind would change `trace.bin` for no state the models
    /// could tell apart; the run lists the fault with its trace position.
    fn blk_fault(&mut self, kind: BlkRequest, nth: u64, sector: Option<u64>) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let trace_pos = t.on.then(|| (t.windows.len(), t.trace.len() as u64));
        if t.faults.len() < MAX_INJECTED_FAULTS {
            t.faults.push(InjectedFault {
                kind,
                nth,
                sector,
                trace_pos,
            });
        }
    }
    fn pmem_flush(&mut self) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.record(Event::PmemFlush);
    }
}

/// The disk as the block device sees it, shared with the VMM (which freezes
/// its overlay when tracing starts).
pub(crate) struct SharedDisk(pub(crate) Arc<Mutex<DiskImage>>);

impl virtio::BlockBackend for SharedDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// virtio-pmem flushes: `msync` for a write-through image, nothing for a
/// copy-on-write one.
pub(crate) struct PmemFlusher(pub(crate) Arc<PmemRegion>);

impl PmemBackend for PmemFlusher {
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Tracer {
    pub(crate) fn new() -> Self {
        Tracer {
            on: false,
            overflow: false,
            data_bytes: 0,
            trace: Trace::new(),
            base: None,
            windows: Vec::new(),
            faults: Vec::new(),
        }
    }
}

/// The VM fd and the memory registered in it. Whoever lets it go removes the
/// pmem slot first, so KVM never holds the address of a mapping that may be
/// unmapped: on drop (an error path) the slot is removed, then the fields go
/// in order (the VM fd is closed, RAM is unmapped, and the region is unmapped
/// when its last reference goes); [`VmMemory::release`] removes the slot and
/// hands the VM fd and RAM to the reaper together.
struct VmMemory {
    fd: Option<VmFd>,
    ram: GuestMemoryMmap,
    pmem: Arc<PmemRegion>,
}

impl VmMemory {
    /// Removes the pmem slot and gives up the VM fd and RAM (for [`reap`]).
    fn release(mut self) -> (VmFd, GuestMemoryMmap) {
        let fd = self.fd.take().expect("VM fd present until released");
        // Removing a slot we added does not fail in practice. If it did, the
        // slot would stay in a VM whose vCPU is gone, so no guest access can
        // reach it, and KVM drops its view of the pages when they are
        // unmapped (MMU notifier): log it rather than fail the run.
        if let Err(e) = self.pmem.unregister(&fd) {
            log::warn!("removing the pmem slot at teardown: {e}");
        }
        (fd, self.ram.clone())
    }
}

impl Drop for VmMemory {
    fn drop(&mut self) {
        if let Some(fd) = &self.fd {
            let _ = self.pmem.unregister(fd);
        }
    }
}

/// A VM ready to run: built by [`Vm::new`] from a [`VmConfig`], run once by
/// [`Vm::run`] (the vCPU loop, then teardown).
///
/// Drop order (fields go in declaration order): the vCPU, then the devices
/// (which hold the other references to the images), then the VM memory
/// (which removes the pmem slot before anything is unmapped).
pub struct Vm {
    vcpu: VcpuFd,
    devices: Devices,
    memory: VmMemory,
    timeout: Duration,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("pmem", &self.devices.pmem)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The virtio-mmio devices' places and interrupts, as announced on the
/// command line.
pub(crate) fn virtio_devices() -> [(u64, u64, u32); 2] {
    let irq = |slot: u64| layout::VIRTIO_IRQ_BASE + slot as u32;
    [layout::VIRTIO_BLK_SLOT, layout::VIRTIO_PMEM_SLOT].map(|slot| {
        (
            layout::VIRTIO_MMIO_SIZE,
            layout::virtio_mmio_addr(slot),
            irq(slot),
        )
    })
}

/// The console sink: a log file (appended) and/or the terminal.
fn console_sink(c: &ConsoleConfig) -> Result<ConsoleSink, VmError> {
    let mut sink = ConsoleSink {
        terminal: c.terminal,
        ..Default::default()
    };
    if let Some(p) = &c.log {
        sink.log = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| VmError::ConsoleLog {
                    path: p.display().to_string(),
                    source,
                })?,
        );
    }
    Ok(sink)
}

/// The MMIO bus with virtio-blk on the disk and virtio-pmem on the region,
/// both reporting to the tracer; with `irqchip`, each device's interrupt is
/// an irqfd on the IRQ the command line announces.
pub(crate) fn build_bus(
    vm: &VmFd,
    ram: &GuestMemoryMmap,
    pmem: &Arc<PmemRegion>,
    disk: &Arc<Mutex<DiskImage>>,
    tracer: &Arc<Mutex<Tracer>>,
    irqchip: bool,
    blk_faults: BlkFaults,
) -> Result<MmioBus, VmError> {
    let mut blk = Block::new(Box::new(SharedDisk(disk.clone())), b"pcache-disk");
    blk.set_faults(blk_faults)?;
    blk.set_observer(Box::new(Observer(tracer.clone())));
    let mut pm = Pmem::new(
        layout::PMEM_START,
        pmem.size(),
        Box::new(PmemFlusher(pmem.clone())),
    );
    pm.set_observer(Box::new(Observer(tracer.clone())));
    let devs: [Box<dyn virtio::VirtioDevice>; 2] = [Box::new(blk), Box::new(pm)];
    let mut bus = MmioBus::new();
    for (dev, (size, base, irq)) in devs.into_iter().zip(virtio_devices()) {
        let irqfd = if irqchip {
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
            vm.register_irqfd(&fd, irq)
                .map_err(kvm_err("register an irqfd"))?;
            Some(fd)
        } else {
            None
        };
        let t = MmioTransport::new(dev, ram.clone(), irqfd)?;
        bus.insert(base, size, Box::new(t))?;
    }
    Ok(bus)
}

impl Vm {
    /// Builds the VM: KVM VM, RAM and pmem slots, kernel and boot data,
    /// devices, console and vCPU. With `config.trace`, tracing is on before
    /// the first instruction.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        let start = Instant::now();
        config.blk_faults.validate()?;
        let host = host()?;
        if config.trace && config.pmem.mode() != ImageMode::CopyOnWrite {
            return Err(VmError::TraceNeedsCopyOnWrite);
        }
        if !config.kernel.exists() {
            return Err(BootError::KernelMissing(config.kernel.display().to_string()).into());
        }
        let fd = host.kvm.create_vm().map_err(kvm_err("create VM"))?;
        let ram = memory::create_ram(config.mem_mib)?;
        memory::register_ram(&fd, &ram)?;
        let pmem = Arc::new(config.pmem);
        // From here on the slot is removed before the region can go (VmMemory).
        pmem.register(&fd, config.trace, false)?;
        let memory = VmMemory {
            fd: Some(fd),
            ram: ram.clone(),
            pmem: pmem.clone(),
        };
        let vm = memory.fd.as_ref().expect("just set");
        let disk = Arc::new(Mutex::new(config.disk));

        let kernel = boot::load_kernel(&ram, &config.kernel)?;
        let cmdline = boot::build_cmdline(&config.cmdline, &virtio_devices())?;
        boot::write_boot_params(&ram, &cmdline, config.mem_mib << 20)?;

        let tracer = Arc::new(Mutex::new(Tracer::new()));
        // Interrupts (optional): off by default (see VmConfig::interrupts).
        if config.interrupts {
            vm.create_irq_chip()
                .map_err(kvm_err("create the in-kernel irqchip"))?;
        }
        let bus = build_bus(
            vm,
            &ram,
            &pmem,
            &disk,
            &tracer,
            config.interrupts,
            config.blk_faults,
        )?;
        let console = Console::new(console_sink(&config.console)?);

        let vcpu = vm.create_vcpu(0).map_err(kvm_err("create vCPU"))?;
        boot::setup_vcpu(&ram, &vcpu, &host.cpuid, kernel.entry)?;

        let mut devices = Devices::new(start, ram, pmem, disk, tracer, bus);
        devices.console = console;
        if config.trace {
            // The slot was registered read-only above: only freeze the base.
            devices.trace_on()?;
        }
        devices.stats.setup_ns = start.elapsed().as_nanos() as u64;
        Ok(Vm {
            vcpu,
            devices,
            memory,
            timeout: config.timeout,
        })
    }

    /// Runs the vCPU until the run stops, then tears the VM down. Errors are
    /// VMM failures; everything the guest does (exit, fault, hang) is an
    /// [`Outcome`].
    pub fn run(mut self) -> Result<RunOutcome, VmError> {
        let outcome = vcpu::run_to_end(
            &mut self.vcpu,
            self.memory
                .fd
                .as_ref()
                .expect("VM fd present until released"),
            &mut self.devices,
            self.timeout,
        )?;
        let Vm {
            vcpu,
            devices,
            memory,
            ..
        } = self;
        finish_run(devices, outcome, |_| {
            // Removes the pmem slot, then hands the VM to the reaper.
            drop(vcpu);
            let (fd, ram) = memory.release();
            reap(fd, ram);
            Ok(())
        })
    }
}

/// Ends a run whose vCPU stopped with `outcome`: stops the devices, lets
/// `release` free the VM's hold on the pmem region (a fresh VM removes its
/// slot, the fork-server copies the run's pages out of its window), closes
/// an open trace window and returns the images with everything the run
/// produced.
pub(crate) fn finish_run(
    d: Devices,
    outcome: Outcome,
    release: impl FnOnce(&PmemRegion) -> Result<(), VmError>,
) -> Result<RunOutcome, VmError> {
    // The devices hold the other references to the images; this RAM is a
    // clone (the last one goes with the VM).
    drop(d.bus);
    drop(d.ram);
    release(&d.pmem)?;
    let (windows, blk_faults) = {
        let mut t = d.tracer.lock().unwrap_or_else(|e| e.into_inner());
        if t.on {
            close_window(&mut t, &d.pmem, &d.disk, true);
        }
        (
            std::mem::take(&mut t.windows),
            std::mem::take(&mut t.faults),
        )
    };
    drop(d.tracer);
    let (pmem, disk) = unwrap_images(d.pmem, d.disk)?;
    let mut stats = d.stats;
    stats.total_ns = d.start.elapsed().as_nanos() as u64;
    Ok(RunOutcome {
        outcome,
        messages: d.messages,
        markers: d.markers,
        console: d.console.into_sink().buffer,
        windows,
        protocol_errors: d.protocol_errors,
        blk_faults,
        stats,
        pmem,
        disk,
    })
}

/// The images, once nothing else holds them.
pub(crate) fn unwrap_images(
    pmem: Arc<PmemRegion>,
    disk: Arc<Mutex<DiskImage>>,
) -> Result<(PmemRegion, DiskImage), VmError> {
    let pmem = Arc::try_unwrap(pmem).map_err(|_| VmError::StillShared("the pmem region"))?;
    let disk = Arc::try_unwrap(disk)
        .map_err(|_| VmError::StillShared("the disk image"))?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    Ok((pmem, disk))
}

/// Builds a VM from `config` and runs it to its end ([`Vm::new`], [`Vm::run`]).
pub fn run(config: VmConfig) -> Result<RunOutcome, VmError> {
    Vm::new(config)?.run()
}

/// Destroys a finished VM and its RAM on a background thread: closing a VM
/// fd takes ~0.5 ms on PVM hosts, which the next run need not wait for.
/// The pmem slot is removed before (see [`VmMemory::release`]): the VM holds
/// no address of a mapping it does not own by then.
pub(crate) fn reap(vm: VmFd, ram: GuestMemoryMmap) {
    use std::sync::mpsc;
    static REAPER: OnceLock<Option<mpsc::Sender<(VmFd, GuestMemoryMmap)>>> = OnceLock::new();
    let tx = REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<(VmFd, GuestMemoryMmap)>();
        std::thread::Builder::new()
            .name("vm-reaper".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    match tx {
        // The reaper lives as long as the process; a failed send drops here.
        Some(tx) => {
            let _ = tx.send((vm, ram));
        }
        None => drop((vm, ram)),
    }
}

pub(crate) fn close_window(t: &mut Tracer, pmem: &PmemRegion, disk: &Mutex<DiskImage>, open: bool) {
    let base = t.base.take().expect("a window is open");
    let d = disk.lock().unwrap_or_else(|e| e.into_inner());
    let trace = std::mem::take(&mut t.trace);
    t.data_bytes = 0;
    t.windows.push(TraceWindow {
        trace,
        pmem_file: pmem.file().clone(),
        pmem_size: pmem.size(),
        pmem_pages: base.pmem_pages,
        disk_file: d.file().clone(),
        disk_size: d.size(),
        disk_overlay: base.disk_overlay,
        open_at_end: open,
    });
    t.on = false;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_faults_are_listed_with_their_trace_position_but_not_traced() {
        let tracer = Arc::new(Mutex::new(Tracer::new()));
        let mut obs = Observer(tracer.clone());
        // Not tracing: listed without a position.
        obs.blk_fault(BlkRequest::Flush, 1, None);
        {
            let mut t = tracer.lock().unwrap();
            t.on = true;
            t.windows.clear();
        }
        obs.blk_write(4, &[1; 512]);
        obs.blk_fault(BlkRequest::Flush, 2, None);
        obs.blk_fault(BlkRequest::Write, 3, Some(9));
        obs.blk_flush();
        let t = tracer.lock().unwrap();
        assert_eq!(
            t.faults,
            vec![
                InjectedFault {
                    kind: BlkRequest::Flush,
                    nth: 1,
                    sector: None,
                    trace_pos: None
                },
                InjectedFault {
                    kind: BlkRequest::Flush,
                    nth: 2,
                    sector: None,
                    trace_pos: Some((0, 1))
                },
                InjectedFault {
                    kind: BlkRequest::Write,
                    nth: 3,
                    sector: Some(9),
                    trace_pos: Some((0, 1))
                },
            ]
        );
        // The write before the failed flush stays pending until the real flush.
        assert_eq!(t.trace.len(), 2);
        assert_eq!(t.trace.events()[1], Event::BlkFlush);
        assert_eq!(t.trace.pending_at(1), vec![0]);
        assert_eq!(t.trace.pending_at(2), Vec::<u64>::new());
    }

    #[test]
    fn summary_lists_faults_only_when_there_are_some() {
        let f = InjectedFault {
            kind: BlkRequest::Write,
            nth: 2,
            sector: Some(6),
            trace_pos: Some((0, 5)),
        };
        let mut summary = RunSummary {
            outcome: Outcome::Exited { code: 0 },
            messages: vec![],
            markers: vec![],
            console: String::new(),
            protocol_errors: vec![],
            window_events: vec![],
            blk_faults: vec![],
            stats: RunStats::default(),
        };
        let none = serde_json::to_string(&summary).unwrap();
        assert!(!none.contains("blk_faults"), "{none}");
        // Summaries written before the field existed still read.
        assert_eq!(serde_json::from_str::<RunSummary>(&none).unwrap(), summary);
        summary.blk_faults.push(f);
        let one = serde_json::to_string(&summary).unwrap();
        assert!(
            one.contains(r#""blk_faults":[{"kind":"write","nth":2,"sector":6,"trace_pos":[0,5]}]"#),
            "{one}"
        );
        assert_eq!(serde_json::from_str::<RunSummary>(&one).unwrap(), summary);
    }

    #[test]
    fn outcome_serialises_with_its_kind() {
        let o = Outcome::Exited { code: 4 };
        assert_eq!(
            serde_json::to_string(&o).unwrap(),
            r#"{"kind":"exited","code":4}"#
        );
        let t = Outcome::Timeout {
            regs: Registers::default(),
        };
        assert!(serde_json::to_string(&t)
            .unwrap()
            .starts_with(r#"{"kind":"timeout","regs":{"rip":0"#));
        assert_eq!(t.exit_code(), None);
        assert_eq!(t.name(), "timeout");
    }
}
