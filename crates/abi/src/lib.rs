//! The contract between the host (`instar`) and the sandboxed guest (`rebase.bin`).
//!
//! Everything here is shared by both sides, so it is `no_std` and allocation-light.
//! The host treats every value decoded from guest memory as hostile: [`decode`] only
//! ever looks at the bytes inside a fixed-size area, and callers validate the result.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod escape;
pub mod layout;
pub mod msg;
pub mod zstd;

pub use msg::*;
pub use zstd::ZstdVersion;
