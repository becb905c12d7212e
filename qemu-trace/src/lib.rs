//! A QEMU 7.2 TCG plugin: the guest's stores to traced virtio-pmem devices,
//! its store fences, cache-line write-backs and virtio-pmem flush requests,
//! and the command script's markers, written per traced window in the VMM's
//! trace form (`PCTRACE1`). See `tracer` for how it finds the devices and
//! reads the values, README.md here for how it is run. GPL-2.0-only (LICENSE).

pub mod decode;
pub mod encode;
// The FFI half needs QEMU's symbols, present only inside QEMU: not in tests.
#[cfg(not(test))]
mod plugin;
pub mod tracer;
