//! A Rust implementation of Linux's dm-pcache (see `pcache-format.md`).
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;
