//! Format probing and reads over a backing chain.
//!
//! - [`probe`]: which format an image is, in QEMU's spirit.

#![no_std]

extern crate alloc;

pub mod probe;
