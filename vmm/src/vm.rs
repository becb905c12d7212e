//! One run of a VM: set up, run the vCPU until the guest exits (or the
//! watchdog, a fault or KVM stops it), and return everything that happened.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use protocol::{layout, MessageHeader, MessageKind};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::{self, BootError};
use crate::crash::TraceWindow;
use crate::devices::serial::{Console, ConsoleSink};
use crate::devices::virtio::{self, Block, EventFd, IoObserver, MmioTransport, Pmem, PmemBackend};
use crate::devices::MmioBus;
use crate::disk::{DiskImage, Overlay};
use crate::memory::{self, ImageMode, MemoryError, PmemRegion};
use crate::trace::{Event, Trace};
use crate::watchdog::Watchdog;

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
    #[error("setting up devices: {0}")]
    Devices(String),
    #[error("{0}")]
    Host(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
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

/// Everything a run needs. The images are opened beforehand (see
/// [`VmConfig::new`]); crash images from [`crate::crash`] can be used directly.
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
        })
    }
}

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
    fn read(vcpu: &VcpuFd) -> Self {
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
pub struct RunResult {
    pub outcome: Outcome,
    pub messages: Vec<Message>,
    pub markers: Vec<MarkerRecord>,
    /// What the guest wrote to COM1.
    pub console: Vec<u8>,
    /// The traced windows, in order (the last may still have been open).
    pub windows: Vec<TraceWindow>,
    /// Guest protocol violations the VMM refused (bad message addresses, ...).
    pub protocol_errors: Vec<String>,
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
    pub stats: RunStats,
}

impl RunResult {
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
struct Host {
    kvm: Kvm,
    cpuid: CpuId,
}

fn host() -> Result<&'static Host, VmError> {
    static HOST: OnceLock<Result<Host, String>> = OnceLock::new();
    let h = HOST.get_or_init(|| {
        let kvm = Kvm::new().map_err(|e| VmError::NoKvm(e).to_string())?;
        for (cap, name) in [
            (kvm_ioctls::Cap::ReadonlyMem, "KVM_CAP_READONLY_MEM"),
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name).to_string());
            }
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
        Ok(Host { kvm, cpuid })
    });
    match h {
        Ok(h) => Ok(h),
        Err(msg) => Err(VmError::Host(msg.clone())),
    }
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

/// Trace state shared by the vCPU loop and the device observers.
pub(crate) struct Tracer {
    on: bool,
    /// Set when the window outgrew its limits; the run loop stops the run.
    overflow: bool,
    data_bytes: usize,
    trace: Trace,
    base: Option<WindowBase>,
    windows: Vec<TraceWindow>,
}

struct WindowBase {
    pmem_pages: std::collections::BTreeMap<u64, Box<[u8]>>,
    disk_overlay: Overlay,
}

impl Tracer {
    fn full(&mut self, extra: usize) -> bool {
        if self.trace.len() >= MAX_TRACE_EVENTS || self.data_bytes + extra > MAX_TRACE_DATA {
            self.overflow = true;
        }
        self.overflow
    }

    fn record(&mut self, e: Event) -> Option<u64> {
        (self.on && !self.full(0)).then(|| self.trace.push(e))
    }
}

/// Forwards device I/O into the trace.
struct Observer(Arc<Mutex<Tracer>>);

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
    fn pmem_flush(&mut self) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.record(Event::PmemFlush);
    }
}

/// The disk as the block device sees it, shared with the VMM (which freezes
/// its overlay when tracing starts).
struct SharedDisk(Arc<Mutex<DiskImage>>);

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
struct PmemFlusher(Arc<PmemRegion>);

impl PmemBackend for PmemFlusher {
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Runs a VM to its end. Errors are VMM failures; everything the guest does
/// (exit, fault, hang) is an [`Outcome`].
pub fn run(config: VmConfig) -> Result<RunResult, VmError> {
    let start = Instant::now();
    let host = host()?;
    if config.trace && config.pmem.mode() != ImageMode::CopyOnWrite {
        return Err(VmError::TraceNeedsCopyOnWrite);
    }
    if !config.kernel.exists() {
        return Err(BootError::KernelMissing(config.kernel.display().to_string()).into());
    }

    let vm = host.kvm.create_vm().map_err(kvm_err("create VM"))?;
    let ram = memory::create_ram(config.mem_mib)?;
    memory::register_ram(&vm, &ram)?;
    let pmem = Arc::new(config.pmem);
    pmem.register(&vm, config.trace, false)?;
    let disk = Arc::new(Mutex::new(config.disk));

    let kernel = boot::load_kernel(&ram, &config.kernel)?;
    let blk_base = layout::virtio_mmio_addr(layout::VIRTIO_BLK_SLOT);
    let pmem_base = layout::virtio_mmio_addr(layout::VIRTIO_PMEM_SLOT);
    let irq = |slot: u64| layout::VIRTIO_IRQ_BASE + slot as u32;
    let cmdline = boot::build_cmdline(
        &config.cmdline,
        &[
            (
                layout::VIRTIO_MMIO_SIZE,
                blk_base,
                irq(layout::VIRTIO_BLK_SLOT),
            ),
            (
                layout::VIRTIO_MMIO_SIZE,
                pmem_base,
                irq(layout::VIRTIO_PMEM_SLOT),
            ),
        ],
    )?;
    boot::write_boot_params(&ram, &cmdline, config.mem_mib << 20)?;

    let tracer = Arc::new(Mutex::new(Tracer {
        on: false,
        overflow: false,
        data_bytes: 0,
        trace: Trace::new(),
        base: None,
        windows: Vec::new(),
    }));

    // Interrupts (optional): the in-kernel irqchip and one irqfd per device on
    // the IRQ the command line announces. Off by default (see VmConfig).
    let irqchip = config.interrupts;
    if irqchip {
        vm.create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
    }
    let irqfd = |slot: u64| -> Result<EventFd, VmError> {
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Devices(e.to_string()))?;
        vm.register_irqfd(&fd, irq(slot))
            .map_err(kvm_err("register an irqfd"))?;
        Ok(fd)
    };

    let mut bus = MmioBus::new();
    let mut blk = Block::new(Box::new(SharedDisk(disk.clone())), b"pcache-disk");
    blk.set_observer(Box::new(Observer(tracer.clone())));
    let mut pm = Pmem::new(
        layout::PMEM_START,
        pmem.size(),
        Box::new(PmemFlusher(pmem.clone())),
    );
    pm.set_observer(Box::new(Observer(tracer.clone())));
    for (slot, dev) in [
        (
            layout::VIRTIO_BLK_SLOT,
            Box::new(blk) as Box<dyn virtio::VirtioDevice>,
        ),
        (layout::VIRTIO_PMEM_SLOT, Box::new(pm)),
    ] {
        let base = layout::virtio_mmio_addr(slot);
        let t = MmioTransport::new(
            dev,
            ram.clone(),
            if irqchip { Some(irqfd(slot)?) } else { None },
        )
        .map_err(|e| VmError::Devices(e.to_string()))?;
        bus.insert(base, layout::VIRTIO_MMIO_SIZE, Box::new(t))
            .map_err(|e| VmError::Devices(e.to_string()))?;
    }

    let mut sink = ConsoleSink {
        terminal: config.console.terminal,
        ..Default::default()
    };
    if let Some(p) = &config.console.log {
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

    let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("create vCPU"))?;
    boot::setup_vcpu(&ram, &vcpu, &host.cpuid, kernel.entry)?;

    let mut state = RunState {
        start,
        vm: &vm,
        ram: &ram,
        pmem: &pmem,
        disk: &disk,
        tracer: &tracer,
        bus,
        console: Console::new(sink),
        messages: Vec::new(),
        message_bytes: 0,
        markers: Vec::new(),
        protocol_errors: Vec::new(),
        stats: RunStats::default(),
    };
    if config.trace {
        state.trace_on()?;
    }
    state.stats.setup_ns = start.elapsed().as_nanos() as u64;
    let watchdog = Watchdog::start(config.timeout);
    let outcome = state.run_loop(&mut vcpu, &watchdog);
    state.stats.stop_ns = start.elapsed().as_nanos() as u64;
    drop(watchdog);
    let outcome = outcome?;

    let RunState {
        bus,
        console,
        messages,
        markers,
        protocol_errors,
        mut stats,
        ..
    } = state;
    // The devices hold the other references to the images.
    drop(bus);
    drop(vcpu);
    reap(vm, ram);
    let windows = {
        let mut t = tracer.lock().unwrap_or_else(|e| e.into_inner());
        if t.on {
            close_window(&mut t, &pmem, &disk, true);
        }
        std::mem::take(&mut t.windows)
    };
    let pmem = Arc::try_unwrap(pmem).map_err(|_| VmError::Devices("pmem still shared".into()))?;
    let disk = Arc::try_unwrap(disk)
        .map_err(|_| VmError::Devices("disk still shared".into()))?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    stats.total_ns = start.elapsed().as_nanos() as u64;
    Ok(RunResult {
        outcome,
        messages,
        markers,
        console: console.into_sink().buffer,
        windows,
        protocol_errors,
        stats,
        pmem,
        disk,
    })
}

/// Destroys a finished VM and its RAM on a background thread: closing a VM
/// fd takes ~0.5 ms on PVM hosts, which the next run need not wait for.
/// (The pmem mapping may be unmapped meanwhile: nothing runs in the VM.)
fn reap(vm: VmFd, ram: GuestMemoryMmap) {
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

fn close_window(t: &mut Tracer, pmem: &PmemRegion, disk: &Mutex<DiskImage>, open: bool) {
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

struct RunState<'a> {
    start: Instant,
    vm: &'a VmFd,
    ram: &'a GuestMemoryMmap,
    pmem: &'a Arc<PmemRegion>,
    disk: &'a Arc<Mutex<DiskImage>>,
    tracer: &'a Arc<Mutex<Tracer>>,
    bus: MmioBus,
    console: Console,
    messages: Vec<Message>,
    message_bytes: usize,
    markers: Vec<MarkerRecord>,
    protocol_errors: Vec<String>,
    stats: RunStats,
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

impl RunState<'_> {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn protocol_error(&mut self, msg: String) {
        if self.protocol_errors.len() < MAX_PROTOCOL_ERRORS {
            self.protocol_errors.push(msg);
        }
    }

    /// Starts a window: freezes the base (pages and sectors changed so far)
    /// and makes the pmem slot read-only so every store exits.
    fn trace_on(&mut self) -> Result<(), VmError> {
        let mut t = self.tracer.lock().unwrap_or_else(|e| e.into_inner());
        if t.on {
            drop(t);
            self.protocol_error("trace-on marker while tracing is already on".into());
            return Ok(());
        }
        if self.pmem.mode() != ImageMode::CopyOnWrite {
            drop(t);
            self.protocol_error("trace-on refused: tracing needs copy-on-write images".to_string());
            return Ok(());
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
        drop(t);
        self.pmem.register(self.vm, true, true)?;
        Ok(())
    }

    fn trace_off(&mut self) -> Result<(), VmError> {
        let mut t = self.tracer.lock().unwrap_or_else(|e| e.into_inner());
        if !t.on {
            drop(t);
            self.protocol_error("trace-off marker while tracing is off".into());
            return Ok(());
        }
        close_window(&mut t, self.pmem, self.disk, false);
        drop(t);
        self.pmem.register(self.vm, false, true)?;
        Ok(())
    }

    fn marker(&mut self, id: u32) -> Result<(), VmError> {
        match id {
            protocol::MARKER_TRACE_ON => self.trace_on()?,
            protocol::MARKER_TRACE_OFF => self.trace_off()?,
            _ => {}
        }
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
        Ok(())
    }

    fn message(&mut self, gpa: u64) {
        let (kind, payload) = match read_message(self.ram, gpa) {
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

    fn run_loop(&mut self, vcpu: &mut VcpuFd, wd: &Watchdog) -> Result<Outcome, VmError> {
        loop {
            if wd.expired() {
                return Ok(Outcome::Timeout {
                    regs: Registers::read(vcpu),
                });
            }
            if self
                .tracer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .overflow
            {
                return Ok(Outcome::TraceLimit {
                    regs: Registers::read(vcpu),
                });
            }
            let exit = match vcpu.run() {
                Ok(e) => e,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    vcpu.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e) => return Err(kvm_err("KVM_RUN")(e)),
            };
            self.stats.exits += 1;
            match exit {
                VcpuExit::IoOut(port, data) => {
                    self.stats.pio_exits += 1;
                    let word = (data.len() == 4)
                        .then(|| u32::from_le_bytes(data.try_into().expect("4 bytes")));
                    match (port, word) {
                        (protocol::PORT_EXIT, Some(code)) => {
                            return Ok(Outcome::Exited { code });
                        }
                        (protocol::PORT_MESSAGE, Some(gpa)) => self.message(gpa as u64),
                        (protocol::PORT_MARKER, Some(id)) => self.marker(id)?,
                        (protocol::PORT_EXIT | protocol::PORT_MESSAGE | protocol::PORT_MARKER, None) => {
                            self.protocol_error(format!(
                                "{}-byte write to port {port:#x} (the protocol's ports take 32-bit writes)",
                                data.len()
                            ))
                        }
                        (p, _) if (protocol::PORT_COM1..protocol::PORT_COM1 + 8).contains(&p) => {
                            let v = data.first().copied().unwrap_or(0);
                            if let Err(e) = self.console.write((p - protocol::PORT_COM1) as u8, v) {
                                self.protocol_error(format!("console: {e}"));
                            }
                        }
                        _ => self.stats.stray_accesses += 1,
                    }
                }
                VcpuExit::IoIn(port, data) => {
                    self.stats.pio_exits += 1;
                    if (protocol::PORT_COM1..protocol::PORT_COM1 + 8).contains(&port) {
                        let v = self.console.read((port - protocol::PORT_COM1) as u8);
                        data.fill(0);
                        if let Some(b) = data.first_mut() {
                            *b = v;
                        }
                    } else {
                        data.fill(0xff);
                        self.stats.stray_accesses += 1;
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.stats.mmio_exits += 1;
                    if self.in_pmem(addr, data.len()) {
                        let d = data.to_vec();
                        self.pmem_store(addr, &d);
                    } else if !self.bus.write(addr, data) {
                        self.stats.stray_accesses += 1;
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.stats.mmio_exits += 1;
                    if self.in_pmem(addr, data.len()) {
                        // Reads of the slot are native; serve stray ones anyway.
                        let _ = self.pmem.read(addr - layout::PMEM_START, data);
                    } else if !self.bus.read(addr, data) {
                        data.fill(0xff);
                        self.stats.stray_accesses += 1;
                    }
                }
                VcpuExit::Hlt => {
                    return Ok(Outcome::Halted {
                        regs: Registers::read(vcpu),
                    })
                }
                VcpuExit::Shutdown => {
                    return Ok(Outcome::Shutdown {
                        regs: Registers::read(vcpu),
                    })
                }
                VcpuExit::InternalError => {
                    // SAFETY: after an internal-error exit KVM filled the `internal` member.
                    let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    return Ok(Outcome::InternalError {
                        suberror,
                        regs: Registers::read(vcpu),
                    });
                }
                VcpuExit::FailEntry(reason, _) => {
                    return Ok(Outcome::FailEntry {
                        reason,
                        regs: Registers::read(vcpu),
                    })
                }
                VcpuExit::Intr => continue,
                other => {
                    let exit = format!("{other:?}");
                    return Ok(Outcome::Unhandled {
                        exit,
                        regs: Registers::read(vcpu),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> GuestMemoryMmap {
        memory::create_ram(4).unwrap()
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
