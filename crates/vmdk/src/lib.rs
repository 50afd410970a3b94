//! vmdk monolithicSparse images, read the way QEMU reads them, and written the way
//! QEMU's vmdk driver writes them.
//!
//! - [`image`]: the sparse header, grain directory and tables, block status and reads.
//! - [`descriptor`]: the text descriptor (CIDs, parent name, extents), its rewrite
//!   with a new parent, and what a probe reports of it.
//! - [`layout`]: no grain table overlaps another structure or a grain (checked before
//!   the first write).
//! - [`writer`]: writes with the semantics of QEMU's vmdk driver (grain allocation,
//!   both grain tables), for safe-mode rebase.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod descriptor;
pub mod image;
pub mod layout;
pub mod writer;

pub use descriptor::{Descriptor, RewriteError};
pub use image::{GrainKind, GrainStatus, SparseHeader, VmdkError, VmdkImage};
pub use writer::{Below, SparseWriter, WriteError};
