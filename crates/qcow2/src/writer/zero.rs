//! Write-zeroes requests without unmap: the block layer's head/body/tail split and
//! bounce-buffer fallback (`bdrv_co_do_pwrite_zeroes`), and the driver side
//! (`qcow2_subcluster_zeroize`, `zero_in_l2_slice`, `zero_l2_subclusters`, and for v2
//! images without a backing file `qcow2_cluster_discard`).

use alloc::vec;

use instar_blockdev::BlockDev;

use super::table::{sub_alloc_range, sub_zero_range, ClusterType, BITMAP_ALL_ZEROES};
use super::{corrupt, Below, WriteError, Writer, MAX_BOUNCE_BUFFER};
use crate::entry::OFLAG_ZERO;

impl<D: BlockDev, B: Below> Writer<D, B> {
    pub(crate) fn pwrite_zeroes(&mut self, offset: u64, bytes: u64) -> Result<(), WriteError> {
        let align = 1u64 << self.geometry.subcluster_bits();
        let mut off = offset;
        let mut left = bytes;
        let mut head = off % align;
        let tail = (off + left) % align;
        while left > 0 {
            let mut num = left;
            if head != 0 {
                num = left.min(MAX_BOUNCE_BUFFER).min(align - head);
                head = (head + num) % align;
            } else if tail != 0 && num > align {
                num -= tail;
            }
            if !self.driver_pwrite_zeroes(off, num)? {
                // The driver cannot: write a buffer of zeros, at most 16 MiB at a time.
                num = num.min(MAX_BOUNCE_BUFFER);
                let zeros = vec![0u8; num as usize];
                self.pwritev(off, &zeros)?;
            }
            off += num;
            left -= num;
        }
        Ok(())
    }

    /// `qcow2_co_pwrite_zeroes`; `false` means "not supported, write zeros instead".
    fn driver_pwrite_zeroes(&mut self, offset: u64, bytes: u64) -> Result<bool, WriteError> {
        let sc_size = 1u64 << self.geometry.subcluster_bits();
        let head = offset % sc_size;
        let mut tail = (offset + bytes).div_ceil(sc_size) * sc_size - (offset + bytes);
        if offset + bytes == self.geometry.virtual_size() {
            tail = 0;
        }
        if head != 0 || tail != 0 {
            // Needs the chain's block status; the public API rejects such requests.
            return Err(WriteError::BadRequest { offset, len: bytes });
        }
        self.subcluster_zeroize(offset, bytes)
    }

    fn subcluster_zeroize(&mut self, offset: u64, bytes: u64) -> Result<bool, WriteError> {
        if self.version < 3 {
            if !self.has_backing {
                self.cluster_discard(offset, bytes)?;
                return Ok(true);
            }
            return Ok(false);
        }
        let cs = self.geometry.cluster_size();
        let mut off = offset;
        let mut end = offset + bytes;
        let head = end.min(off.div_ceil(cs) * cs) - off;
        off += head;
        let tail = if end >= self.geometry.virtual_size() {
            0
        } else {
            end - off.max(end & !(cs - 1))
        };
        end -= tail;
        let sc_size = 1u64 << self.geometry.subcluster_bits();
        if head != 0 && !self.zero_l2_subclusters(off - head, head.div_ceil(sc_size))? {
            return Ok(false);
        }
        let mut nb = self.size_to_clusters(end.saturating_sub(off));
        while nb > 0 {
            let done = self.zero_in_l2_slice(off, nb)?;
            nb -= done;
            off += done * cs;
        }
        if tail != 0 && !self.zero_l2_subclusters(end, tail.div_ceil(sc_size))? {
            return Ok(false);
        }
        Ok(true)
    }

    fn zero_in_l2_slice(&mut self, off: u64, nb: u64) -> Result<u64, WriteError> {
        let s = self.get_cluster_table(off)?;
        let nb = nb.min(self.geometry.l2_slice_entries() - s.index);
        for i in 0..nb {
            let (e, b) = self.l2_get(s, i)?;
            let unmap = self.cluster_type(e) == ClusterType::Compressed;
            let mut new_e = if unmap { 0 } else { e };
            let mut new_b = b;
            if self.geometry.extended_l2() {
                new_b = BITMAP_ALL_ZEROES;
            } else {
                new_e |= OFLAG_ZERO;
            }
            if new_e == e && new_b == b {
                continue;
            }
            self.l2_set(s, i, new_e, Some(new_b))?;
            if unmap {
                self.free_any_cluster(e)?;
            }
        }
        Ok(nb)
    }

    fn zero_l2_subclusters(&mut self, off: u64, nsc: u64) -> Result<bool, WriteError> {
        let s = self.get_cluster_table(off)?;
        let (e, b) = self.l2_get(s, 0)?;
        match self.cluster_type(e) {
            ClusterType::Compressed => return Ok(false),
            ClusterType::Normal | ClusterType::Unallocated => {}
            _ => return Err(corrupt("zero flag in an extended L2 entry", e)),
        }
        let sc = ((off >> self.geometry.subcluster_bits()) & 31) as u32;
        let to = sc + nsc as u32;
        let new_b = (b | sub_zero_range(sc, to)) & !sub_alloc_range(sc, to);
        if new_b != b {
            self.l2_set(s, 0, e, Some(new_b))?;
        }
        Ok(true)
    }

    /// `qcow2_cluster_discard(…, QCOW2_DISCARD_REQUEST, full_discard = false)`.
    fn cluster_discard(&mut self, offset: u64, bytes: u64) -> Result<(), WriteError> {
        let mut off = offset;
        let mut nb = self.size_to_clusters(bytes);
        while nb > 0 {
            let done = self.discard_in_l2_slice(off, nb)?;
            nb -= done;
            off += done * self.geometry.cluster_size();
        }
        Ok(())
    }

    fn discard_in_l2_slice(&mut self, off: u64, nb: u64) -> Result<u64, WriteError> {
        let s = self.get_cluster_table(off)?;
        let nb = nb.min(self.geometry.l2_slice_entries() - s.index);
        for i in 0..nb {
            let (e, b) = self.l2_get(s, i)?;
            let allocated = matches!(
                self.cluster_type(e),
                ClusterType::Normal | ClusterType::Compressed | ClusterType::ZeroAlloc
            );
            let (mut new_e, mut new_b) = (e, b);
            if self.has_backing || allocated {
                if self.geometry.extended_l2() {
                    new_e = 0;
                    new_b = BITMAP_ALL_ZEROES;
                } else if self.version >= 3 {
                    new_e = OFLAG_ZERO;
                } else {
                    new_e = 0;
                }
            }
            if new_e == e && new_b == b {
                continue;
            }
            self.l2_set(s, i, new_e, Some(new_b))?;
            self.free_any_cluster(e)?;
        }
        Ok(nb)
    }
}
