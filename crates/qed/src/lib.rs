//! qed images as QEMU's `block/qed*.c` handles them: the header and its
//! open-time checks ([`header`]), lookups and reads ([`image`]), and writes with
//! QEMU's allocation order ([`writer`]), so that a rebase leaves the same bytes as
//! `qemu-img rebase`.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod check;
pub mod header;
pub mod image;
pub mod overlap;
pub mod writer;

pub use header::{ChangeError, Header, HeaderError};
pub use image::{ClusterState, QedError, QedImage};
pub use writer::{Below, Writer};
