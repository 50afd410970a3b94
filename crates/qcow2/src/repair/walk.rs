//! Counting every reference to every host cluster (`calculate_refcounts`).

use alloc::vec;
use alloc::vec::Vec;

use instar_blockdev::BlockDev;

use super::counts::Counts;
use super::{unsupported, Disk, Line, RepairError};
use crate::entry::{
    L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, OFLAG_COMPRESSED,
    OFLAG_COPIED,
};
use crate::map::{compressed_extent, EntryFormat};
use crate::refcount::{REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use crate::Header;
use instar_blockdev::bytes::be64_table;

/// Count `size` bytes at `offset` (`qcow2_inc_refcounts_imrt`). QEMU reports a
/// reference a cluster or more past the end of the file, and an overflow, as
/// corruption: refused.
fn inc<D: BlockDev + ?Sized>(
    disk: &Disk<'_, D>,
    counts: &mut Counts,
    offset: u64,
    size: u64,
) -> Result<(), RepairError> {
    if size == 0 {
        return Ok(());
    }
    let cs = 1u64 << disk.cluster_bits;
    let end = offset.checked_add(size).ok_or(RepairError::Unsupported(
        "a reference past the end of the file",
    ))?;
    if end >= disk.file_len.saturating_add(cs) {
        return unsupported("a reference past the end of the file");
    }
    let first = offset >> disk.cluster_bits;
    let last = (end - 1) >> disk.cluster_bits;
    for c in first..=last {
        if !counts.inc(c) {
            return unsupported("a refcount overflow");
        }
    }
    Ok(())
}

/// Count every reference; returns whether a refcount block is referenced more than
/// once (QEMU then rebuilds the refcount structure), with QEMU's line for it.
pub(crate) fn calculate<D: BlockDev + ?Sized>(
    disk: &mut Disk<'_, D>,
    h: &Header,
    counts: &mut Counts,
    lines: &mut Vec<Line>,
) -> Result<bool, RepairError> {
    let cs = h.cluster_size();
    inc(disk, counts, 0, cs)?;
    if h.l1_size > 0 {
        inc(disk, counts, h.l1_table_offset, u64::from(h.l1_size) * 8)?;
    }
    for (l2_off, _) in l2_tables(disk, h)? {
        inc(disk, counts, l2_off, cs)?;
        count_l2(disk, h, counts, l2_off)?;
    }
    let rt_len = disk.rt.len() as u64 * 8;
    inc(disk, counts, h.refcount_table_offset, rt_len)?;
    check_blocks(disk, counts, lines)
}

/// `check_refblocks`.
fn check_blocks<D: BlockDev + ?Sized>(
    disk: &mut Disk<'_, D>,
    counts: &mut Counts,
    lines: &mut Vec<Line>,
) -> Result<bool, RepairError> {
    let cs = 1u64 << disk.cluster_bits;
    let mut rebuild = false;
    for i in 0..disk.rt.len() {
        let e = disk.rt[i];
        if e & REFT_RESERVED_MASK != 0 {
            return unsupported("a refcount table entry with reserved bits set");
        }
        let off = e & REFT_OFFSET_MASK;
        if off & (cs - 1) != 0 {
            return unsupported("an unaligned refcount block");
        }
        let cluster = off >> disk.cluster_bits;
        if cluster >= counts.len() {
            return unsupported("a refcount block outside the image");
        }
        if off != 0 {
            inc(disk, counts, off, cs)?;
            let n = counts.get(cluster);
            if n != 1 {
                lines.push(Line::BlockRefcount {
                    index: i as u64,
                    refcount: n,
                });
                rebuild = true;
            }
        }
    }
    Ok(rebuild)
}

fn entry_format(h: &Header) -> EntryFormat {
    EntryFormat {
        cluster_bits: h.cluster_bits(),
        extended_l2: false,
        has_data_file: false,
    }
}

/// The active L2 tables: (offset, COPIED flag of the L1 entry), in L1 order.
pub(crate) fn l2_tables<D: BlockDev + ?Sized>(
    disk: &mut Disk<'_, D>,
    h: &Header,
) -> Result<Vec<(u64, bool)>, RepairError> {
    let n = h.l1_size as usize;
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut raw = vec![0u8; n * 8];
    disk.read(h.l1_table_offset, &mut raw)?;
    let mut out = Vec::new();
    for e in be64_table(&raw) {
        if e == 0 {
            continue;
        }
        if e & L1E_RESERVED_MASK != 0 {
            return unsupported("an L1 entry with reserved bits set");
        }
        let off = e & L1E_OFFSET_MASK;
        if off & (h.cluster_size() - 1) != 0 {
            return unsupported("an unaligned L2 table");
        }
        out.push((off, e & OFLAG_COPIED != 0));
    }
    Ok(out)
}

fn read_l2<D: BlockDev + ?Sized>(
    disk: &mut Disk<'_, D>,
    h: &Header,
    l2_off: u64,
) -> Result<Vec<u64>, RepairError> {
    let mut raw = vec![0u8; h.cluster_size() as usize];
    disk.read(l2_off, &mut raw)?;
    Ok(be64_table(&raw))
}

/// `check_refcounts_l2` for one table.
fn count_l2<D: BlockDev + ?Sized>(
    disk: &mut Disk<'_, D>,
    h: &Header,
    counts: &mut Counts,
    l2_off: u64,
) -> Result<(), RepairError> {
    let fmt = entry_format(h);
    for e in read_l2(disk, h, l2_off)? {
        if e & OFLAG_COMPRESSED != 0 {
            if e & OFLAG_COPIED != 0 {
                return unsupported("a compressed cluster with the COPIED flag");
            }
            let x = compressed_extent(&fmt, e);
            inc(disk, counts, x.offset, x.len)?;
            continue;
        }
        if e & L2E_STD_RESERVED_MASK != 0 {
            return unsupported("an L2 entry with reserved bits set");
        }
        let off = e & L2E_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off & (h.cluster_size() - 1) != 0 {
            return unsupported("an unaligned data cluster");
        }
        inc(disk, counts, off, h.cluster_size())?;
    }
    Ok(())
}
