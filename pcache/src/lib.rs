//! A Rust implementation of Linux's dm-pcache, the persistent-memory write-back
//! cache target, byte-compatible with the kernel's on-media format (M2/H of
//! `docs/format.md`).
//!
//! Part 1 (this crate so far): what every on-media record shares
//! ([`mod@format`]; each record is declared next to its concept, all
//! re-exported by [`records`]), persistent
//! memory ([`pmem`]) and backing devices ([`backing`]), the cache-device layer
//! ([`cache_dev`]), segments ([`segment`]), dual-copy metadata ([`meta`]),
//! cache start ([`cache`]) with the key-set log check ([`cache_key`]), and
//! activation with superblock recovery ([`dm_pcache`]), plus a read-only image
//! inspector ([`inspect`]).
//!
//! ```
//! use pcache::{activate, Mode, NoHooks, Options, Outcome, SparsePmem};
//! let mut dev = SparsePmem::new(512 << 20);
//! let opts = Options { mode: Mode::Recover, data_crc: false };
//! assert_eq!(activate(&mut dev, &opts, &mut NoHooks).outcome, Outcome::Formatted);
//! assert_eq!(activate(&mut dev, &opts, &mut NoHooks).outcome, Outcome::Opened);
//! ```
//!
//! `no_std` with `alloc`; the default `std` feature adds host files
//! ([`pmem::FilePmem`], [`pmem::MmapPmem`], `backing::FileBacking`).
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

extern crate alloc;

pub mod backing;
pub mod cache;
pub mod cache_dev;
pub mod cache_gc;
pub mod cache_key;
pub mod cache_req;
pub mod cache_writeback;
pub mod dm_pcache;
pub mod format;
pub mod hooks;
pub mod inspect;
pub mod meta;
pub mod pmem;
pub mod report;
pub mod segment;

/// Every on-media record, each declared next to its concept, and the traits
/// they share (one import for code that builds or reads images).
pub mod records {
    pub use crate::cache::{CacheInfo, CachePosOnMedia};
    pub use crate::cache_dev::Superblock;
    pub use crate::cache_key::{decode_kset, KeyError, KeyOnMedia, Kset, KsetError, KsetHeader};
    pub use crate::format::{DualRecord, MetaHeader, Record};
    pub use crate::segment::{SegGen, SegInfo};
    /// zerocopy's traits and little-endian field types the records use.
    pub use zerocopy::little_endian::{U16, U32, U64};
    pub use zerocopy::{FromBytes, FromZeros, IntoBytes};
}

pub use cache::Cache;
pub use cache_dev::SbState;
pub use cache_key::CachePos;
pub use dm_pcache::{activate, deactivate, start, Activation};
pub use hooks::{CrashPoint, Hooks, NoHooks};
pub use pmem::{Pmem, PmemError, RecordingPmem, SparsePmem, VecPmem};
pub use report::{ActivationReport, Mode, Options, Outcome, Refusal};
