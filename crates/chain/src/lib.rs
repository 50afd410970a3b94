//! Format probing and reads over a backing chain.
//!
//! - [`probe`]: which format an image is, in QEMU's spirit.
//! - [`layer`]: the format-reader trait (qcow2, vmdk, [`raw`]) and its errors.
//! - [`view`]: reads and allocation status over a chain, as QEMU's block layer does.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod layer;
pub mod probe;
pub mod raw;
pub mod view;
