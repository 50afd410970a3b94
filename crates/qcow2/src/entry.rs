//! Bits of L1 and L2 table entries (qcow2 spec, "Cluster mapping").

/// L1/L2: the cluster's refcount is exactly one, so it can be written in place.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 (standard entries only): the cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;

/// L1 entry: offset of the L2 table (bits 9..=55).
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry of a standard cluster: host cluster offset (bits 9..=55).
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits that must be zero.
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// L2 entry bits of a standard cluster that must be zero.
pub const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;

/// Bytes per L2 entry: 8, or 16 with extended L2 (entry + subcluster bitmap).
pub const fn l2_entry_size(extended_l2: bool) -> u64 {
    if extended_l2 {
        16
    } else {
        8
    }
}

/// Subclusters per cluster with extended L2.
pub const SUBCLUSTERS_PER_CLUSTER: u32 = 32;
