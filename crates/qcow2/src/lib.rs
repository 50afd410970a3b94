//! qcow2 on disk, as QEMU reads and writes it.
//!
//! - [`header`]: the header and its extensions: parse with QEMU's open-time checks,
//!   and rebuild cluster 0 exactly as QEMU's `qcow2_update_header` does.
//! - [`entry`]: L1/L2 entry bits.
//! - [`geometry`]: cluster, L2 and refcount sizes, validated once when the header is read.
//! - [`map`]: L2 entry classification (QEMU's cluster kinds, compressed entries).
//! - [`image`]: a read-only image: guest offset → kind and run length, reads.
//! - [`compress`]: compressed clusters (zlib, zstd).
//! - [`compressor`]: the interface a compressed write (`-c`) compresses through.
//! - [`refcount`]: reading refcounts.
//! - [`overlap`]: where every metadata structure lies; the proof that a session's writes
//!   land only where they may, made before the first write.
//! - [`writer`]: applying writes and write-zeroes exactly as QEMU's qcow2 driver does.
//!
//! Everything works on an [`instar_blockdev::BlockDev`]; nothing here does I/O of its own.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod bitmaps;
pub mod compress;
pub mod compressor;
pub mod crypt;
pub mod entry;
pub mod geometry;
pub mod header;
pub mod image;
pub mod map;
pub mod overlap;
pub mod refcount;
pub mod repair;
pub mod writer;

pub use geometry::Geometry;
pub use header::{ChangeBackingError, Header, OpenError, OpenMode};
