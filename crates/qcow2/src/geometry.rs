//! The sizes a qcow2 header implies, validated once when the header is read
//! ([`crate::Header::read`], QEMU's `qcow2_do_open` checks) and derived once: the
//! image reader, the refcount reader, the overlap proof and the writer all take them
//! from here instead of checking and computing them again.

use crate::entry::{l2_entry_size, SUBCLUSTERS_PER_CLUSTER};
use crate::map::EntryFormat;

/// `MIN_CLUSTER_BITS` / `MAX_CLUSTER_BITS`.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest `refcount_order` (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// QEMU's limit on the active L1 table (`QCOW_MAX_L1_SIZE`), in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (`QCOW_MAX_REFTABLE_SIZE`), in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's default L2 cache limit on Linux (`DEFAULT_L2_CACHE_MAX_SIZE`); it decides
/// the L2 slice size, and with it where block-status runs stop.
pub const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// Smallest subcluster QEMU accepts with extended L2 entries.
const MIN_SUBCLUSTER_SIZE: u64 = 512;

/// Cluster, L2 and refcount geometry of an opened image. Only a header that passed
/// QEMU's open checks makes one, so every value here is in range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    cluster_bits: u32,
    extended_l2: bool,
    refcount_order: u32,
    virtual_size: u64,
    l2_slice_bytes: u64,
}

impl Geometry {
    /// Whether QEMU opens an image with clusters of `1 << bits` bytes.
    pub(crate) fn cluster_bits_ok(bits: u32) -> bool {
        (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits)
    }

    /// The subcluster size when extended L2 entries are too small for QEMU, if so.
    pub(crate) fn subclusters_too_small(cluster_bits: u32, extended_l2: bool) -> Option<u64> {
        let sub = (1u64 << cluster_bits) / u64::from(SUBCLUSTERS_PER_CLUSTER);
        (extended_l2 && sub < MIN_SUBCLUSTER_SIZE).then_some(sub)
    }

    /// L1 entries needed to map `size` bytes (QEMU's `size_to_l1`, adding in 64-bit
    /// unsigned arithmetic, so a huge size wraps as it does there).
    pub(crate) fn l1_entries_for(cluster_bits: u32, extended_l2: bool, size: u64) -> u64 {
        let l2_bits = cluster_bits - l2_entry_size(extended_l2).trailing_zeros();
        let shift = cluster_bits + l2_bits;
        size.wrapping_add((1u64 << shift) - 1) >> shift
    }

    /// The geometry of a header whose values passed [`Self::cluster_bits_ok`],
    /// [`Self::subclusters_too_small`] and the refcount order limit.
    pub(crate) fn new(
        cluster_bits: u32,
        extended_l2: bool,
        refcount_order: u32,
        size: u64,
    ) -> Self {
        let cs = 1u64 << cluster_bits;
        // The block layer's length is whole sectors.
        let virtual_size = size & !511;
        // read_cache_sizes(): 4 KiB slices when the default cache cannot hold every L2
        // entry of the disk, whole tables otherwise.
        let max_l2_entries = virtual_size.div_ceil(cs);
        let max_l2_cache = (max_l2_entries * l2_entry_size(extended_l2)).div_ceil(cs) * cs;
        let l2_slice_bytes = if DEFAULT_L2_CACHE_MAX < max_l2_cache {
            cs.min(4096)
        } else {
            cs
        };
        Geometry {
            cluster_bits,
            extended_l2,
            refcount_order,
            virtual_size,
            l2_slice_bytes,
        }
    }

    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }
    pub fn extended_l2(&self) -> bool {
        self.extended_l2
    }
    /// The guest-visible size: the header's size rounded down to 512.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        l2_entry_size(self.extended_l2)
    }
    /// log2 of the entries of one L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - self.l2_entry_size().trailing_zeros()
    }
    /// Entries of one L2 table.
    pub fn l2_entries(&self) -> u64 {
        1u64 << self.l2_bits()
    }
    /// Bytes of one L2 cache slice (QEMU's `l2_slice_size`).
    pub fn l2_slice_bytes(&self) -> u64 {
        self.l2_slice_bytes
    }
    /// Entries of one L2 cache slice: where QEMU's block-status runs stop.
    pub fn l2_slice_entries(&self) -> u64 {
        self.l2_slice_bytes / self.l2_entry_size()
    }
    /// log2 of the subcluster size (the cluster size without extended L2).
    pub fn subcluster_bits(&self) -> u32 {
        let per_cluster = if self.extended_l2 {
            SUBCLUSTERS_PER_CLUSTER
        } else {
            1
        };
        self.cluster_bits - per_cluster.trailing_zeros()
    }
    pub fn subcluster_size(&self) -> u64 {
        1u64 << self.subcluster_bits()
    }
    pub fn refcount_order(&self) -> u32 {
        self.refcount_order
    }
    /// Bits per refcount.
    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order
    }
    /// log2 of the refcounts one refcount block holds.
    pub fn refblock_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }
    /// The largest refcount an entry holds.
    pub fn refcount_max(&self) -> u64 {
        if self.refcount_order == MAX_REFCOUNT_ORDER {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }
    /// How L2 entries of this image read.
    pub fn entry_format(&self, has_data_file: bool) -> EntryFormat {
        EntryFormat {
            cluster_bits: self.cluster_bits,
            extended_l2: self.extended_l2,
            has_data_file,
        }
    }
}
