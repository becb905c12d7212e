//! virtio-mmio devices, polled (interrupts stay off).
//!
//! Devices are announced on the command line (`virtio_mmio.device=`); they are
//! probed and initialised on first use, so a boot that needs no device pays
//! no device exits.

pub mod blk;
pub mod hal;
pub mod mmio;
pub mod pmem;

use blk::{Blk, BlkError};
use guest_cmdline::{MmioDevice, MmioDeviceError, VIRTIO_MMIO_KEY};
use mmio::{Probe, RawTransport, Window, WindowError};
use pmem::{Pmem, PmemError};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;

const MAX_DEVICES: usize = protocol::layout::VIRTIO_MMIO_SLOTS as usize;
const DEVICE_ID_BLOCK: u32 = 2;
const DEVICE_ID_PMEM: u32 = 27;

/// How long a request may stay unanswered, in TSC cycles (a few seconds at
/// today's clocks). The VMM answers synchronously, so this only turns a lost
/// request into an error instead of a hang.
const REQUEST_TIMEOUT_CYCLES: u64 = 10_000_000_000;

/// What went wrong finding or starting a device.
#[derive(Debug)]
pub enum DeviceError {
    Announcement(MmioDeviceError),
    Window(WindowError),
    TooMany,
    Missing(&'static str),
    Duplicate(&'static str),
    NotModern { name: &'static str, version: u32 },
    Blk(BlkError),
    Pmem(PmemError),
}

impl core::fmt::Display for DeviceError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DeviceError::Announcement(e) => write!(f, "bad {VIRTIO_MMIO_KEY}= value: {e}"),
            DeviceError::Window(e) => write!(f, "{e}"),
            DeviceError::TooMany => {
                write!(f, "more than {MAX_DEVICES} virtio-mmio devices announced")
            }
            DeviceError::Missing(n) => write!(f, "no {n} device announced on the command line"),
            DeviceError::Duplicate(n) => write!(f, "more than one {n} device"),
            DeviceError::NotModern { name, version } => {
                write!(
                    f,
                    "{name}: virtio-mmio version {version}, expected 2 (modern)"
                )
            }
            DeviceError::Blk(e) => write!(f, "{e}"),
            DeviceError::Pmem(e) => write!(f, "{e}"),
        }
    }
}

/// The announced windows, and the drivers started so far.
pub struct Devices {
    windows: [Option<Window>; MAX_DEVICES],
    /// Each window's identification registers, read once on first need.
    probes: Option<[Option<Probe>; MAX_DEVICES]>,
    blk: Option<Blk>,
    pmem: Option<Pmem>,
}

impl Devices {
    /// Validates every announcement (no device access yet).
    pub fn from_cmdline(cmdline: &str) -> Result<Self, DeviceError> {
        let mut windows = [None; MAX_DEVICES];
        for (n, v) in guest_cmdline::values(cmdline, VIRTIO_MMIO_KEY).enumerate() {
            let d = MmioDevice::parse(v).map_err(DeviceError::Announcement)?;
            let w = Window::new(d).map_err(DeviceError::Window)?;
            *windows.get_mut(n).ok_or(DeviceError::TooMany)? = Some(w);
        }
        Ok(Devices {
            windows,
            probes: None,
            blk: None,
            pmem: None,
        })
    }

    /// The one window whose device id is `id`. The first call probes every
    /// window (three exits each); later calls reuse the answers.
    fn find(&mut self, id: u32, name: &'static str) -> Result<Window, DeviceError> {
        let windows = self.windows;
        let probes = self
            .probes
            .get_or_insert_with(|| windows.map(|w| w.map(|w| w.probe())));
        let mut found = None;
        for (w, p) in windows.iter().zip(probes.iter()) {
            let (Some(w), Some(p)) = (w, p) else { continue };
            if !p.magic_ok || p.device_id != id {
                continue;
            }
            if p.version != mmio::MODERN {
                return Err(DeviceError::NotModern {
                    name,
                    version: p.version,
                });
            }
            if found.replace(*w).is_some() {
                return Err(DeviceError::Duplicate(name));
            }
        }
        found.ok_or(DeviceError::Missing(name))
    }

    /// The virtio-blk driver, started on first use.
    pub fn blk(&mut self) -> Result<&mut Blk, DeviceError> {
        if self.blk.is_none() {
            let w = self.find(DEVICE_ID_BLOCK, "virtio-blk")?;
            self.blk = Some(Blk::new(w).map_err(DeviceError::Blk)?);
        }
        Ok(self.blk.as_mut().expect("set above"))
    }

    /// The virtio-pmem driver, started on first use.
    pub fn pmem(&mut self) -> Result<&mut Pmem, DeviceError> {
        if self.pmem.is_none() {
            let w = self.find(DEVICE_ID_PMEM, "virtio-pmem")?;
            let t = RawTransport::new(w).map_err(|p| DeviceError::NotModern {
                name: "virtio-pmem",
                version: p.version,
            })?;
            self.pmem = Some(Pmem::new(t).map_err(DeviceError::Pmem)?);
        }
        Ok(self.pmem.as_mut().expect("set above"))
    }

    /// Both drivers at once (the module's data path uses the cache and the
    /// backing device in one request).
    pub fn pmem_and_blk(&mut self) -> Result<(&mut Pmem, &mut Blk), DeviceError> {
        self.pmem()?;
        self.blk()?;
        Ok((
            self.pmem.as_mut().expect("started above"),
            self.blk.as_mut().expect("started above"),
        ))
    }
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects (CR4.TSD is clear: it runs in ring 3).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Adds one request, notifies, polls the used ring with a time limit, pops it.
/// `Err(None)` is a timeout; `Ok(n)` is the number of bytes the device wrote.
pub(crate) fn wait_used<'a, const N: usize>(
    queue: &mut VirtQueue<hal::IdentityHal, N>,
    transport: &mut impl Transport,
    queue_index: u16,
    inputs: &'a [&'a [u8]],
    outputs: &'a mut [&'a mut [u8]],
) -> Result<u32, Option<virtio_drivers::Error>> {
    // SAFETY: the buffers stay borrowed until the request is popped; on a
    // timeout the device is marked FAILED and the caller ends the run.
    let token = unsafe { queue.add(inputs, outputs) }.map_err(Some)?;
    if queue.should_notify() {
        transport.notify(queue_index);
    }
    let start = rdtsc();
    while !queue.can_pop() {
        if rdtsc().wrapping_sub(start) > REQUEST_TIMEOUT_CYCLES {
            // The device may still write into the buffers: mark it failed so a
            // well-behaved device stops; callers treat this as fatal.
            transport.set_status(virtio_drivers::transport::DeviceStatus::FAILED);
            return Err(None);
        }
        core::hint::spin_loop();
    }
    // SAFETY: the same buffers as passed to `add`.
    unsafe { queue.pop_used(token, inputs, outputs) }.map_err(Some)
}
