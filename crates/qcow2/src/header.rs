//! The qcow2 header (cluster 0): fixed fields, extensions, backing file name.

use alloc::vec::Vec;

use crate::geometry::Geometry;
use crate::map::EntryFormat;

pub const QCOW2_MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"

/// Header extension magics, in the order QEMU writes them.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const INCOMPAT_MASK: u64 = 0x1f;
/// Compatible feature bits.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bits.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
pub const AUTOCLEAR_MASK: u64 = 0x3;

/// Size of QEMU's `QCowHeader` (v3 fixed header incl. compression type and padding).
pub const V3_HEADER_SIZE: u32 = 112;
/// Bytes of the fixed header QEMU writes for a v2 image.
pub const V2_HEADER_SIZE: u32 = 72;

/// The bitmaps extension (24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub bitmap_directory_size: u64,
    pub bitmap_directory_offset: u64,
}

/// A parsed qcow2 header, as QEMU holds it in memory after opening the image.
///
/// The fields are what [`Header::rebuild`] writes back: QEMU rebuilds cluster 0 from
/// this state, not from the old bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    /// `cluster_bits`, `refcount_order` and what they imply, validated.
    geometry: Geometry,
    /// Virtual size exactly as stored (QEMU rounds it down to 512 on rewrite).
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    /// v3 fields (v2 images read them as their defaults: 0, 0, 0, order 4, length 72).
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub header_length: u32,
    /// 0 = zlib, 1 = zstd.
    pub compression_type: u8,
    /// Bytes between the 112-byte header and `header_length`, kept verbatim.
    pub unknown_header_fields: Vec<u8>,
    pub backing_file: Option<Vec<u8>>,
    pub backing_format: Option<Vec<u8>>,
    pub data_file: Option<Vec<u8>>,
    /// Full-disk-encryption header pointer: (offset, length).
    pub crypto_header: Option<(u64, u64)>,
    pub bitmaps: Option<BitmapsExt>,
    /// Extensions QEMU does not know, as (magic, data), in file order.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
    /// A bitmaps extension was present without the autoclear bit: QEMU ignores it
    /// (and drops it on a read-write open).
    pub stale_bitmaps: bool,
}

impl Header {
    /// The image's geometry, validated when the header was read.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn cluster_bits(&self) -> u32 {
        self.geometry.cluster_bits()
    }

    pub fn cluster_size(&self) -> u64 {
        self.geometry.cluster_size()
    }

    pub fn extended_l2(&self) -> bool {
        self.geometry.extended_l2()
    }

    pub fn refcount_order(&self) -> u32 {
        self.geometry.refcount_order()
    }

    pub fn refcount_bits(&self) -> u32 {
        self.geometry.refcount_bits()
    }

    /// How this image's L2 entries read.
    pub fn entry_format(&self) -> EntryFormat {
        self.geometry.entry_format(self.has_data_file())
    }

    /// The guest-visible size QEMU uses: the stored size rounded down to 512.
    pub fn virtual_size(&self) -> u64 {
        self.size & !511
    }

    /// The DIRTY bit (lazy refcounts in use; QEMU repairs the image on a read-write open).
    pub fn dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    pub fn corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    /// Guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    /// The external data file is a valid raw image on its own (`data_file_raw`).
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// Persistent bitmaps in any form QEMU would act on at a read-write open.
    pub fn has_bitmaps(&self) -> bool {
        self.bitmaps.is_some()
            || self.stale_bitmaps
            || self.autoclear_features & AUTOCLEAR_BITMAPS != 0
    }
}

mod error;
mod extensions;
mod io;
mod parse;
mod rebuild;
mod snapshots;

pub use error::OpenError;
pub use parse::OpenMode;
pub use rebuild::ChangeBackingError;

/// The feature table QEMU writes (type, bit, name), for v3 images with clusters over 4 KiB.
pub const QEMU_FEATURE_TABLE: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];
