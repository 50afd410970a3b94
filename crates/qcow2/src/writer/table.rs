//! L1/L2 tables: entry decoding (cluster and subcluster types), loading L2 slices, and
//! allocating or copying L2 tables (`get_cluster_table` / `l2_allocate`).

use instar_blockdev::bytes::be64;
use instar_blockdev::BlockDev;

use super::cache::Which;
use super::{corrupt, Below, WriteError, WriteKind, Writer};
use crate::entry::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClusterType {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScType {
    Compressed,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    UnallocatedPlain,
    UnallocatedAlloc,
}

/// A resident L2 slice and the index of the wanted entry in it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SliceRef {
    pub offset: u64,
    pub index: u64,
}

/// Alloc bits of subclusters `from..to` (extended L2 bitmap).
pub(crate) fn sub_alloc_range(from: u32, to: u32) -> u64 {
    if to <= from {
        return 0;
    }
    let span = if to - from >= 32 {
        0xffff_ffffu64
    } else {
        (1u64 << (to - from)) - 1
    };
    span << from
}

pub(crate) fn sub_zero_range(from: u32, to: u32) -> u64 {
    sub_alloc_range(from, to) << 32
}

pub(crate) const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
pub(crate) const BITMAP_ALL_ZEROES: u64 = 0xffff_ffff << 32;

impl<D: BlockDev, B: Below> Writer<D, B> {
    pub(crate) fn cluster_type(&self, e: u64) -> ClusterType {
        if e & OFLAG_COMPRESSED != 0 {
            ClusterType::Compressed
        } else if e & OFLAG_ZERO != 0 && !self.geometry.extended_l2() {
            if e & L2E_OFFSET_MASK != 0 {
                ClusterType::ZeroAlloc
            } else {
                ClusterType::ZeroPlain
            }
        } else if e & L2E_OFFSET_MASK == 0 {
            ClusterType::Unallocated
        } else {
            ClusterType::Normal
        }
    }

    /// `qcow2_get_subcluster_type`; `None` for an invalid entry.
    pub(crate) fn sc_type(&self, e: u64, bitmap: u64, sc: u32) -> Option<ScType> {
        let t = self.cluster_type(e);
        if self.geometry.extended_l2() {
            match t {
                ClusterType::Compressed => Some(ScType::Compressed),
                ClusterType::Normal => {
                    if (bitmap >> 32) & bitmap != 0 {
                        None
                    } else if bitmap & (1u64 << (sc + 32)) != 0 {
                        Some(ScType::ZeroAlloc)
                    } else if bitmap & (1u64 << sc) != 0 {
                        Some(ScType::Normal)
                    } else {
                        Some(ScType::UnallocatedAlloc)
                    }
                }
                ClusterType::Unallocated => {
                    if bitmap & BITMAP_ALL_ALLOC != 0 {
                        None
                    } else if bitmap & (1u64 << (sc + 32)) != 0 {
                        Some(ScType::ZeroPlain)
                    } else {
                        Some(ScType::UnallocatedPlain)
                    }
                }
                _ => None,
            }
        } else {
            Some(match t {
                ClusterType::Compressed => ScType::Compressed,
                ClusterType::ZeroPlain => ScType::ZeroPlain,
                ClusterType::ZeroAlloc => ScType::ZeroAlloc,
                ClusterType::Normal => ScType::Normal,
                ClusterType::Unallocated => ScType::UnallocatedPlain,
            })
        }
    }

    /// `qcow2_get_subcluster_range_type`: type at `sc_from` and how many subclusters
    /// from there share it.
    pub(crate) fn sc_range_type(&self, e: u64, bitmap: u64, sc_from: u32) -> Option<(ScType, u32)> {
        let t = self.sc_type(e, bitmap, sc_from)?;
        if !self.geometry.extended_l2() || t == ScType::Compressed {
            let per = if self.geometry.extended_l2() { 32 } else { 1 };
            return Some((t, per - sc_from));
        }
        let b = bitmap;
        let n = match t {
            ScType::Normal => {
                let v = (b as u32) | (sub_alloc_range(0, sc_from) as u32);
                v.trailing_ones() - sc_from
            }
            ScType::ZeroPlain | ScType::ZeroAlloc => {
                let v = ((b | sub_zero_range(0, sc_from)) >> 32) as u32;
                v.trailing_ones() - sc_from
            }
            ScType::UnallocatedPlain | ScType::UnallocatedAlloc => {
                let v = (((b >> 32) | b) as u32) & !(sub_alloc_range(0, sc_from) as u32);
                v.trailing_zeros() - sc_from
            }
            ScType::Compressed => 0,
        };
        Some((t, n))
    }

    fn l2_esize(&self) -> u64 {
        crate::entry::l2_entry_size(self.geometry.extended_l2())
    }

    pub(crate) fn l2_get(&mut self, s: SliceRef, i: u64) -> Result<(u64, u64), WriteError> {
        let es = self.l2_esize() as usize;
        let ext = self.geometry.extended_l2();
        let t = self.table(Which::L2, s.offset)?;
        let p = (s.index + i) as usize * es;
        let entry = be64(&t.data, p);
        // Without extended L2 there is no bitmap word: it reads as 0.
        let bitmap = if ext { be64(&t.data, p + 8) } else { Some(0) };
        match (entry, bitmap) {
            (Some(e), Some(b)) => Ok((e, b)),
            _ => Err(corrupt("L2 entry outside its table", s.offset)),
        }
    }

    pub(crate) fn l2_set(
        &mut self,
        s: SliceRef,
        i: u64,
        e: u64,
        bitmap: Option<u64>,
    ) -> Result<(), WriteError> {
        let es = self.l2_esize() as usize;
        let ext = self.geometry.extended_l2();
        let t = self.table(Which::L2, s.offset)?;
        let p = (s.index + i) as usize * es;
        t.data[p..p + 8].copy_from_slice(&e.to_be_bytes());
        if ext {
            if let Some(b) = bitmap {
                t.data[p + 8..p + 16].copy_from_slice(&b.to_be_bytes());
            }
        }
        t.dirty = true;
        Ok(())
    }

    pub(crate) fn l2_mark_dirty(&mut self, s: SliceRef) -> Result<(), WriteError> {
        self.table(Which::L2, s.offset)?.dirty = true;
        Ok(())
    }

    /// Index of the guest cluster in its L2 table, and in its slice.
    pub(crate) fn l2_index(&self, guest: u64) -> u64 {
        (guest >> self.geometry.cluster_bits()) & (self.geometry.l2_entries() - 1)
    }

    pub(crate) fn slice_index(&self, guest: u64) -> u64 {
        (guest >> self.geometry.cluster_bits()) & (self.geometry.l2_slice_entries() - 1)
    }

    /// `get_cluster_table`: the L2 slice for `guest`, allocating the table (or copying
    /// a shared one) first when its L1 entry lacks COPIED.
    pub(crate) fn get_cluster_table(&mut self, guest: u64) -> Result<SliceRef, WriteError> {
        let l1_index =
            guest >> (self.geometry.cluster_bits() + self.geometry.l2_entries().trailing_zeros());
        let Some(&l1e) = self.l1.get(l1_index as usize) else {
            return Err(WriteError::Unsupported("L1 table growth"));
        };
        let l2_off = l1e & L1E_OFFSET_MASK;
        if self.offset_into_cluster(l2_off) != 0 {
            return Err(corrupt("L2 table offset unaligned", l2_off));
        }
        let l2_off = if l1e & OFLAG_COPIED == 0 {
            self.l2_allocate(l1_index as usize)?;
            if l2_off != 0 {
                self.free_clusters(l2_off >> self.geometry.cluster_bits(), 1)?;
            }
            self.l1[l1_index as usize] & L1E_OFFSET_MASK
        } else {
            if l2_off == 0 {
                return Err(corrupt("L1 entry COPIED without a table", l1_index));
            }
            l2_off
        };
        let es = self.l2_esize();
        let l2_index = self.l2_index(guest);
        let slice_index = self.slice_index(guest);
        let slice_off = l2_off + es * (l2_index - slice_index);
        self.cache_get(Which::L2, slice_off)?;
        Ok(SliceRef {
            offset: slice_off,
            index: slice_index,
        })
    }

    /// `l2_allocate`: a new table (zeros, or a copy of the old one), written before the
    /// L1 entry that points at it.
    fn l2_allocate(&mut self, l1_index: usize) -> Result<(), WriteError> {
        let old = self.l1[l1_index] & L1E_OFFSET_MASK;
        let new = self.alloc_clusters(1)? << self.geometry.cluster_bits();
        if new == 0 {
            return Err(corrupt("L2 table allocation at offset 0", 0));
        }
        self.cache_flush(Which::Refcount)?;
        let slice_bytes = self.l2_cache.table_size as u64;
        let n_slices = self.geometry.cluster_size() / slice_bytes;
        for k in 0..n_slices {
            let dst = new + k * slice_bytes;
            self.cache_get_empty(Which::L2, dst);
            if old != 0 {
                let src = old + k * slice_bytes;
                self.cache_get(Which::L2, src)?;
                let data = self.table(Which::L2, src)?.data.clone();
                self.table(Which::L2, dst)?.data = data;
            }
        }
        self.cache_flush(Which::L2)?;
        self.l1[l1_index] = new | OFLAG_COPIED;
        self.write_l1_entry(l1_index)
    }

    /// One L1 entry, as the 8-byte write QEMU issues with buffered I/O.
    fn write_l1_entry(&mut self, l1_index: usize) -> Result<(), WriteError> {
        let v = self.l1[l1_index].to_be_bytes();
        self.dev_write_sync(
            self.l1_offset + 8 * l1_index as u64,
            &v,
            WriteKind::ActiveL1,
        )
    }

    /// Decrease the refcount of whatever an L2 entry points at (`qcow2_free_any_cluster`).
    pub(crate) fn free_any_cluster(&mut self, e: u64) -> Result<(), WriteError> {
        match self.cluster_type(e) {
            ClusterType::Compressed => {
                let bits = self.geometry.cluster_bits();
                let csize_shift = 62 - (bits - 8);
                let csize_mask = (1u64 << (bits - 8)) - 1;
                let coffset = e & ((1u64 << csize_shift) - 1);
                let nb_sectors = ((e >> csize_shift) & csize_mask) + 1;
                let csize = nb_sectors * 512 - (coffset & 511);
                let first = coffset >> bits;
                let last = (coffset + csize - 1) >> bits;
                self.free_clusters(first, last - first + 1)
            }
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                let off = e & L2E_OFFSET_MASK;
                if self.offset_into_cluster(off) != 0 {
                    // QEMU reports this and carries on.
                    return Ok(());
                }
                self.free_clusters(off >> self.geometry.cluster_bits(), 1)
            }
            ClusterType::ZeroPlain | ClusterType::Unallocated => Ok(()),
        }
    }
}
