//! Classifying L2 entries the way QEMU does (`qcow2_get_subcluster_type`,
//! `qcow2_get_subcluster_range_type`, `qcow2_parse_compressed_l2_entry`).
//!
//! Pure functions over entry values; table I/O lives in [`crate::image`].

use crate::entry::{L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};

/// What a guest (sub)cluster is, in QEMU's terms (`QCow2SubclusterType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClusterKind {
    /// Data at a host offset.
    Normal,
    /// Compressed data (always a whole cluster).
    Compressed,
    /// Reads as zeros, no host cluster.
    ZeroPlain,
    /// Reads as zeros, a host cluster is reserved.
    ZeroAlloc,
    /// Not allocated in this layer; the backing file shows through.
    UnallocatedPlain,
    /// Not allocated in this layer, but a host cluster is reserved (extended L2 only).
    UnallocatedAlloc,
}

impl ClusterKind {
    /// What `bdrv_is_allocated` answers for this layer: data or zeros are "allocated",
    /// the two unallocated kinds are not.
    pub fn is_allocated(self) -> bool {
        !matches!(
            self,
            ClusterKind::UnallocatedPlain | ClusterKind::UnallocatedAlloc
        )
    }

    /// Reads as zeros in this layer (without looking at a backing file).
    pub fn is_zero(self) -> bool {
        matches!(self, ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc)
    }

    /// A host cluster backs this guest cluster (`*map` is valid in QEMU's block status).
    pub fn has_host_cluster(self) -> bool {
        matches!(
            self,
            ClusterKind::Normal | ClusterKind::ZeroAlloc | ClusterKind::UnallocatedAlloc
        )
    }
}

/// Extended L2 bitmap: subcluster `i` is allocated.
pub const fn sub_alloc(i: u32) -> u64 {
    1u64 << i
}

/// Extended L2 bitmap: subcluster `i` reads as zeros.
pub const fn sub_zero(i: u32) -> u64 {
    1u64 << (i + 32)
}

/// Mask of the "allocated" bits of subclusters `[from, to)`.
const fn sub_alloc_range(from: u32, to: u32) -> u64 {
    if to <= from {
        0
    } else {
        // `to` is at most 32, so the shift stays in range.
        ((1u64 << to) - 1) & !((1u64 << from) - 1)
    }
}

/// Geometry and feature flags that decide how an entry is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryFormat {
    pub cluster_bits: u32,
    pub extended_l2: bool,
    /// The image has an external data file (offset 0 with COPIED is then a valid cluster).
    pub has_data_file: bool,
}

impl EntryFormat {
    pub fn subclusters_per_cluster(&self) -> u32 {
        if self.extended_l2 {
            crate::entry::SUBCLUSTERS_PER_CLUSTER
        } else {
            1
        }
    }

    /// Bit position of the compressed sector count (`csize_shift`).
    pub fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Mask of the compressed sector count after shifting (`csize_mask`).
    pub fn csize_mask(&self) -> u64 {
        (1u64 << (self.cluster_bits - 8)) - 1
    }

    /// Mask of the compressed data's host offset (`cluster_offset_mask`).
    pub fn cluster_offset_mask(&self) -> u64 {
        (1u64 << self.csize_shift()) - 1
    }
}

/// Whole-cluster type (`qcow2_get_cluster_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WholeType {
    Compressed,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Unallocated,
}

fn whole_type(fmt: &EntryFormat, entry: u64) -> WholeType {
    if entry & OFLAG_COMPRESSED != 0 {
        WholeType::Compressed
    } else if entry & OFLAG_ZERO != 0 && !fmt.extended_l2 {
        if entry & L2E_OFFSET_MASK != 0 {
            WholeType::ZeroAlloc
        } else {
            WholeType::ZeroPlain
        }
    } else if entry & L2E_OFFSET_MASK == 0 {
        // Offset 0 is a valid data-file offset; COPIED tells it apart there.
        if fmt.has_data_file && entry & OFLAG_COPIED != 0 {
            WholeType::Normal
        } else {
            WholeType::Unallocated
        }
    } else {
        WholeType::Normal
    }
}

/// The kind of subcluster `sc` of an entry; `None` when the entry (or its bitmap) is
/// invalid, which QEMU treats as corruption. Without extended L2, `bitmap` is ignored
/// and `sc` must be 0.
pub fn subcluster_kind(fmt: &EntryFormat, entry: u64, bitmap: u64, sc: u32) -> Option<ClusterKind> {
    let t = whole_type(fmt, entry);
    if fmt.extended_l2 {
        match t {
            WholeType::Compressed => Some(ClusterKind::Compressed),
            WholeType::Normal => {
                if (bitmap >> 32) & bitmap != 0 {
                    None
                } else if bitmap & sub_zero(sc) != 0 {
                    Some(ClusterKind::ZeroAlloc)
                } else if bitmap & sub_alloc(sc) != 0 {
                    Some(ClusterKind::Normal)
                } else {
                    Some(ClusterKind::UnallocatedAlloc)
                }
            }
            WholeType::Unallocated => {
                if bitmap & 0xffff_ffff != 0 {
                    None
                } else if bitmap & sub_zero(sc) != 0 {
                    Some(ClusterKind::ZeroPlain)
                } else {
                    Some(ClusterKind::UnallocatedPlain)
                }
            }
            // The zero flag is not a cluster type with extended L2.
            WholeType::ZeroPlain | WholeType::ZeroAlloc => None,
        }
    } else {
        Some(match t {
            WholeType::Compressed => ClusterKind::Compressed,
            WholeType::ZeroPlain => ClusterKind::ZeroPlain,
            WholeType::ZeroAlloc => ClusterKind::ZeroAlloc,
            WholeType::Normal => ClusterKind::Normal,
            WholeType::Unallocated => ClusterKind::UnallocatedPlain,
        })
    }
}

/// The kind of subcluster `sc_from` and how many subclusters from it (within this
/// cluster) share that kind. `None` for an invalid entry.
pub fn subcluster_range(
    fmt: &EntryFormat,
    entry: u64,
    bitmap: u64,
    sc_from: u32,
) -> Option<(ClusterKind, u32)> {
    let kind = subcluster_kind(fmt, entry, bitmap, sc_from)?;
    let spc = fmt.subclusters_per_cluster();
    if !fmt.extended_l2 || kind == ClusterKind::Compressed {
        return Some((kind, spc - sc_from));
    }
    // Count trailing ones (or zeros) from sc_from by filling the bits below it.
    let low = bitmap as u32;
    let high = (bitmap >> 32) as u32;
    let below = sub_alloc_range(0, sc_from) as u32;
    let n = match kind {
        ClusterKind::Normal => (low | below).trailing_ones(),
        ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc => (high | below).trailing_ones(),
        ClusterKind::UnallocatedPlain | ClusterKind::UnallocatedAlloc => {
            ((high | low) & !below).trailing_zeros()
        }
        ClusterKind::Compressed => spc,
    };
    Some((kind, n.min(spc) - sc_from))
}

/// Where a compressed cluster's data lies in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedExtent {
    /// Host offset of the first compressed byte.
    pub offset: u64,
    /// Bytes to read: whole 512-byte sectors counted from the sector of `offset`.
    pub len: u64,
}

/// Split a compressed L2 entry into host offset and length
/// (`qcow2_parse_compressed_l2_entry`). The length is at most two clusters.
pub fn compressed_extent(fmt: &EntryFormat, entry: u64) -> CompressedExtent {
    let offset = entry & fmt.cluster_offset_mask();
    let sectors = ((entry >> fmt.csize_shift()) & fmt.csize_mask()) + 1;
    CompressedExtent {
        offset,
        len: sectors * 512 - (offset & 511),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: EntryFormat = EntryFormat {
        cluster_bits: 16,
        extended_l2: false,
        has_data_file: false,
    };
    const EXT: EntryFormat = EntryFormat {
        cluster_bits: 16,
        extended_l2: true,
        has_data_file: false,
    };

    #[test]
    fn standard_kinds() {
        assert_eq!(
            subcluster_kind(&STD, 0, 0, 0),
            Some(ClusterKind::UnallocatedPlain)
        );
        assert_eq!(subcluster_kind(&STD, 1, 0, 0), Some(ClusterKind::ZeroPlain));
        assert_eq!(
            subcluster_kind(&STD, 0x50000 | 1, 0, 0),
            Some(ClusterKind::ZeroAlloc)
        );
        assert_eq!(
            subcluster_kind(&STD, OFLAG_COPIED | 0x50000, 0, 0),
            Some(ClusterKind::Normal)
        );
        assert_eq!(
            subcluster_kind(&STD, OFLAG_COMPRESSED | 5, 0, 0),
            Some(ClusterKind::Compressed)
        );
        // COPIED with offset 0 is unallocated without a data file, data with one.
        assert_eq!(
            subcluster_kind(&STD, OFLAG_COPIED, 0, 0),
            Some(ClusterKind::UnallocatedPlain)
        );
        let df = EntryFormat {
            has_data_file: true,
            ..STD
        };
        assert_eq!(
            subcluster_kind(&df, OFLAG_COPIED, 0, 0),
            Some(ClusterKind::Normal)
        );
    }

    #[test]
    fn extended_kinds_and_ranges() {
        // The entry from iotest 271: offset 0x500000, bitmap 0x0000000040000002.
        let e = OFLAG_COPIED | 0x50_0000;
        let b = 0x0000_0000_4000_0002;
        assert_eq!(
            subcluster_range(&EXT, e, b, 0),
            Some((ClusterKind::UnallocatedAlloc, 1))
        );
        assert_eq!(
            subcluster_range(&EXT, e, b, 1),
            Some((ClusterKind::Normal, 1))
        );
        assert_eq!(
            subcluster_range(&EXT, e, b, 2),
            Some((ClusterKind::UnallocatedAlloc, 28))
        );
        assert_eq!(
            subcluster_range(&EXT, e, b, 30),
            Some((ClusterKind::Normal, 1))
        );
        assert_eq!(
            subcluster_range(&EXT, e, b, 31),
            Some((ClusterKind::UnallocatedAlloc, 1))
        );
        // All-zero bitmap on an unallocated entry.
        assert_eq!(
            subcluster_range(&EXT, 0, 0xffff_ffff_0000_0000, 3),
            Some((ClusterKind::ZeroPlain, 29))
        );
        // Alloc and zero both set: invalid.
        assert_eq!(subcluster_kind(&EXT, e, 0x1_0000_0001, 5), None);
        // Alloc bits on an unallocated entry: invalid.
        assert_eq!(subcluster_kind(&EXT, 0, 1, 0), None);
        // The standard zero flag means nothing valid with extended L2 on an offset-less
        // entry; QEMU classifies by offset (unallocated) and keeps the bitmap rules.
        assert_eq!(
            subcluster_kind(&EXT, 1, 0, 0),
            Some(ClusterKind::UnallocatedPlain)
        );
    }

    #[test]
    fn compressed_layout() {
        // 64 KiB clusters: csize_shift 54, 8 bits of sector count.
        let e = OFLAG_COMPRESSED | (3u64 << 54) | 0x1_0200;
        let x = compressed_extent(&STD, e);
        assert_eq!(x.offset, 0x1_0200);
        assert_eq!(x.len, 4 * 512);
        let x = compressed_extent(&STD, OFLAG_COMPRESSED | 0x1_0210);
        assert_eq!(x.len, 512 - 0x10);
    }
}
