//! vmdk monolithicSparse images, read the way QEMU reads them.
//!
//! - [`image`]: the sparse header, grain directory and tables, block status and reads.
//! - [`descriptor`]: the embedded text descriptor (CIDs, parent name, extents).

#![no_std]

extern crate alloc;

pub mod descriptor;
pub mod image;

pub use descriptor::Descriptor;
pub use image::{GrainKind, GrainStatus, SparseHeader, VmdkError, VmdkImage};
