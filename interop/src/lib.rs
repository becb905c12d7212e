//! The kernel as the oracle: Linux 7.2.13's own dm-pcache, run under QEMU's
//! TCG, activates the images this project makes and reasons about, and its
//! verdicts are compared with the module's strict mode.
//!
//! - [`prepare`]: the kernel side, from Debian's packages, built and cached
//!   outside the repository (`interop/prepare.sh` does the apt, debootstrap
//!   and make steps).
//! - [`qemu`]: one boot activates up to [`qemu::MAX_IMAGES`] images, each on
//!   its own virtio-pmem device, on copies (inputs are never modified); the
//!   console is parsed into a [`qemu::KernelVerdict`] per image.
//! - [`cases`]: what is compared (first activations byte for byte, hostile
//!   images and power-cut states against strict mode).
//! - [`module_writes`]: the module writes data, the kernel reads it.
//! - [`module_gc`]: the same after the module's own writeback and GC.
//! - [`module_images`]: what those two share.
//! - [`report`]: `result.json`, `findings.md`.

pub mod cases;
pub mod image;
pub mod kernel_mode;
pub mod ktrace;
pub mod ktrace_writes;
pub mod module_gc;
pub mod module_images;
pub mod module_writes;
pub mod prepare;
pub mod qemu;
pub mod report;
