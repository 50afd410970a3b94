//! Reading refcounts: the refcount table and refcount blocks, for every refcount
//! width QEMU supports (1..=64 bits, `refcount_order` 0..=6). Read-only; allocation
//! lives elsewhere.

use alloc::vec;
use alloc::vec::Vec;
use instar_blockdev::bytes::be64_table;
use instar_blockdev::{BlockDev, IoError};

use crate::{Geometry, Header};

/// Refcount table entry: offset of the refcount block.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Refcount table entry bits that must be zero.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefcountError {
    #[error("refcount table at {offset:#x} (+{len:#x}) lies outside the image")]
    TableOutsideImage { offset: u64, len: u64 },
    #[error("Refblock offset {offset:#x} unaligned (reftable index: {index:#x})")]
    BlockUnaligned { offset: u64, index: u64 },
    #[error("refcount block at {0:#x} lies outside the image")]
    BlockOutsideImage(u64),
    #[error(transparent)]
    Io(#[from] IoError),
}

/// Value of entry `index` of a refcount block for `1 << order` bit refcounts.
/// Sub-byte widths are packed from the least significant bit, wider ones are big
/// endian (QEMU's `get_refcount_ro0` … `ro6`). Returns 0 past the end of `block`.
pub fn refcount_entry(block: &[u8], index: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits < 8 {
        let per_byte = 8 / bits;
        let Some(&b) = usize::try_from(index / per_byte)
            .ok()
            .and_then(|i| block.get(i))
        else {
            return 0;
        };
        let shift = (index % per_byte) * bits;
        (u64::from(b) >> shift) & ((1u64 << bits) - 1)
    } else {
        let w = (bits / 8) as usize;
        let Some(start) = usize::try_from(index).ok().and_then(|i| i.checked_mul(w)) else {
            return 0;
        };
        let Some(bytes) = block.get(start..start + w) else {
            return 0;
        };
        bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// The refcount table of an image, loaded into memory, plus a one-block cache.
#[derive(Debug, Clone)]
pub struct RefcountReader {
    table: Vec<u64>,
    geometry: Geometry,
    cached: Option<(u64, Vec<u8>)>,
}

impl RefcountReader {
    /// Load the refcount table named by `header` (whose size and alignment
    /// [`Header::read`] checked).
    pub fn load<D: BlockDev + ?Sized>(dev: &mut D, header: &Header) -> Result<Self, RefcountError> {
        let geometry = *header.geometry();
        let len = u64::from(header.refcount_table_clusters) * geometry.cluster_size();
        let off = header.refcount_table_offset;
        if off + len > dev.size() {
            return Err(RefcountError::TableOutsideImage { offset: off, len });
        }
        let mut raw = vec![0u8; len as usize];
        dev.read_at(off, &mut raw)?;
        let table = be64_table(&raw);
        Ok(RefcountReader {
            table,
            geometry,
            cached: None,
        })
    }

    /// Raw refcount table entries.
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    /// Refcounts held by one refcount block.
    pub fn block_entries(&self) -> u64 {
        1u64 << self.geometry.refblock_bits()
    }

    pub fn refcount_bits(&self) -> u32 {
        self.geometry.refcount_bits()
    }

    /// Refcount of host cluster `cluster_index` (`qcow2_get_refcount`): 0 when the
    /// table or its entry does not cover it.
    pub fn refcount<D: BlockDev + ?Sized>(
        &mut self,
        dev: &mut D,
        cluster_index: u64,
    ) -> Result<u64, RefcountError> {
        let per_block = self.block_entries();
        let ti = cluster_index / per_block;
        let Some(&entry) = usize::try_from(ti).ok().and_then(|i| self.table.get(i)) else {
            return Ok(0);
        };
        let block_off = entry & REFT_OFFSET_MASK;
        if block_off == 0 {
            return Ok(0);
        }
        let cs = self.geometry.cluster_size();
        if block_off & (cs - 1) != 0 {
            return Err(RefcountError::BlockUnaligned {
                offset: block_off,
                index: ti,
            });
        }
        let hit = matches!(&self.cached, Some((o, _)) if *o == block_off);
        if !hit {
            if block_off.checked_add(cs).is_none_or(|end| end > dev.size()) {
                return Err(RefcountError::BlockOutsideImage(block_off));
            }
            let mut buf = vec![0u8; cs as usize];
            dev.read_at(block_off, &mut buf)?;
            self.cached = Some((block_off, buf));
        }
        let block = self
            .cached
            .as_ref()
            .map(|(_, b)| b.as_slice())
            .unwrap_or(&[]);
        Ok(refcount_entry(
            block,
            cluster_index % per_block,
            self.geometry.refcount_order(),
        ))
    }

    /// Drop the cached block (after the file was changed underneath).
    pub fn invalidate_cache(&mut self) {
        self.cached = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_widths() {
        let b = [
            0b1011_0010u8,
            0x12,
            0x34,
            0x56,
            0x78,
            0x9a,
            0xbc,
            0xde,
            0xf0,
        ];
        assert_eq!(refcount_entry(&b, 0, 0), 0);
        assert_eq!(refcount_entry(&b, 1, 0), 1);
        assert_eq!(refcount_entry(&b, 7, 0), 1);
        assert_eq!(refcount_entry(&b, 0, 1), 0b10);
        assert_eq!(refcount_entry(&b, 3, 1), 0b10);
        assert_eq!(refcount_entry(&b, 1, 2), 0b1011);
        assert_eq!(refcount_entry(&b, 1, 3), 0x12);
        assert_eq!(refcount_entry(&b, 1, 4), 0x3456);
        assert_eq!(refcount_entry(&b, 1, 5), 0x789a_bcde);
        assert_eq!(refcount_entry(&b, 0, 6), 0xb212_3456_789a_bcde);
        assert_eq!(refcount_entry(&b, 9, 6), 0);
        assert_eq!(refcount_entry(&b, u64::MAX, 0), 0);
        assert_eq!(refcount_entry(&b, u64::MAX, 6), 0);
    }
}
