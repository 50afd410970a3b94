//! Rebuilding the whole refcount structure from the computed refcounts
//! (`rebuild_refcount_structure`): every refcount block that covers a used cluster is
//! written fresh as a slice of the in-memory counts, each placed at the first free
//! cluster at or after the start of the range it describes; then the table is placed
//! first fit from cluster 0, the blocks covering it are written again, and so on until
//! the table stops growing. Old blocks and the old table are left to the recount,
//! which frees them.

use alloc::vec::Vec;

use instar_blockdev::BlockDev;

use super::counts::Counts;
use super::{unsupported, Disk, RepairError};

/// First fit for `n` clusters from `*first_free` (`alloc_clusters_imrt`): marks them
/// used, moves `*first_free` to the first gap seen, grows the counts past the end.
fn alloc(counts: &mut Counts, n: u64, first_free: &mut u64) -> u64 {
    let mut c = *first_free;
    let mut run = 0u64;
    let mut first_gap = true;
    while c < counts.len() && run < n {
        if counts.get(c) == 0 {
            run += 1;
            if first_gap {
                *first_free = c;
                first_gap = false;
            }
        } else {
            run = 0;
        }
        c += 1;
    }
    if run < n {
        counts.grow(c + n - run);
    }
    let start = c - run;
    for i in 0..n {
        counts.set(start + i, 1);
    }
    start
}

/// `rebuild_refcounts_write_refblocks` over `[first, end)`; returns whether the
/// table had to grow.
fn write_blocks<D: BlockDev + ?Sized>(
    disk: &mut Disk<'_, D>,
    counts: &mut Counts,
    first: u64,
    mut end: u64,
    table: &mut Vec<u64>,
) -> Result<bool, RepairError> {
    let rb_bits = disk.rb_bits();
    let cs = 1u64 << disk.cluster_bits;
    let mut first_free = 0u64;
    let mut grown = false;
    let mut c = first;
    while c < end {
        if counts.get(c) == 0 {
            c += 1;
            continue;
        }
        let index = c >> rb_bits;
        let start = index << rb_bits;
        let existing = table.get(index as usize).copied().filter(|&o| o != 0);
        let block_off = match existing {
            Some(o) => o,
            None => {
                first_free = first_free.max(start);
                let cluster = alloc(counts, 1, &mut first_free);
                if cluster >= end {
                    end = cluster + 1;
                }
                if table.len() as u64 <= index {
                    let entries = ((index + 1) * 8).div_ceil(cs) * cs / 8;
                    if entries * 8 > crate::geometry::MAX_REFTABLE_BYTES {
                        return unsupported("the rebuilt refcount table would be too large");
                    }
                    table.resize(entries as usize, 0);
                    grown = true;
                }
                let off = cluster << disk.cluster_bits;
                table[index as usize] = off;
                off
            }
        };
        let data = counts.block(index, rb_bits, disk.order, cs);
        disk.put_block(block_off, data);
        c = start + (1u64 << rb_bits);
    }
    Ok(grown)
}

/// Rebuild; returns the new table's offset and size in clusters. The new table is
/// left in `disk.rt`.
pub(crate) fn rebuild<D: BlockDev + ?Sized>(
    disk: &mut Disk<'_, D>,
    counts: &mut Counts,
) -> Result<(u64, u32), RepairError> {
    // QEMU empties its refcount block cache: blocks read from now on are the new ones.
    disk.blocks.clear();
    disk.order_written.clear();
    let cs = 1u64 << disk.cluster_bits;
    let mut table = Vec::new();
    let end = counts.len();
    let mut grown = write_blocks(disk, counts, 0, end, &mut table)?;
    let mut placed = (0, 0);
    while grown {
        let clusters = (table.len() as u64 * 8).div_ceil(cs);
        let mut first_free = 0;
        let start = alloc(counts, clusters, &mut first_free);
        placed = (start << disk.cluster_bits, clusters);
        grown = write_blocks(disk, counts, start, start + clusters, &mut table)?;
    }
    if placed.1 == 0 {
        return unsupported("the rebuilt refcount structure is empty");
    }
    disk.file_len = disk.file_len.max(placed.0 + placed.1 * cs);
    disk.rt = table;
    Ok((placed.0, placed.1 as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(used: &[u64], len: u64) -> Counts {
        let mut c = Counts::new(len, 4);
        for &u in used {
            c.set(u, 1);
        }
        c
    }

    #[test]
    fn first_fit_marks_moves_the_cursor_and_grows() {
        // Used: 0, 1, 3. One cluster from 0 takes 2; the cursor stops at the gap.
        let mut c = counts(&[0, 1, 3], 5);
        let mut ff = 0;
        assert_eq!(alloc(&mut c, 1, &mut ff), 2);
        assert_eq!((ff, c.get(2)), (2, 1));
        // Two clusters: 4 is free but 5 is past the end, so the counts grow.
        let mut ff = 0;
        assert_eq!(alloc(&mut c, 2, &mut ff), 4);
        assert_eq!((ff, c.len(), c.get(4), c.get(5)), (4, 6, 1, 1));
        // Nothing free at all: appended at the end.
        let mut ff = 0;
        assert_eq!(alloc(&mut c, 3, &mut ff), 6);
        assert_eq!(c.len(), 9);
    }
}
