//! `check_oflag_copied` with repair: an L1 or L2 entry's COPIED flag must be set
//! exactly when the cluster it points at has refcount 1. After the refcount repair
//! QEMU sets or clears every flag that disagrees, printing a line for each, and
//! writes the changed L1 entries and L2 tables back.

use alloc::vec;
use alloc::vec::Vec;

use instar_blockdev::BlockDev;

use super::{unsupported, Disk, Line, RepairError, RepairWrite, RepairWriteKind};
use crate::entry::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::Header;
use instar_blockdev::bytes::be64_table;

fn to_bytes(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

fn with_copied(entry: u64, refcount: u64) -> u64 {
    if refcount == 1 {
        entry | OFLAG_COPIED
    } else {
        entry & !OFLAG_COPIED
    }
}

/// Fix every COPIED flag against the refcounts now on `disk`; returns the writes (the
/// whole L1 table and each changed L2 table, with their final content).
pub(crate) fn fix<D: BlockDev + ?Sized>(
    disk: &mut Disk<'_, D>,
    h: &Header,
    lines: &mut Vec<Line>,
) -> Result<Vec<RepairWrite>, RepairError> {
    let n = h.l1_size as usize;
    let cs = h.cluster_size();
    let mut raw = vec![0u8; n * 8];
    if n > 0 {
        disk.read(h.l1_table_offset, &mut raw)?;
    }
    let mut l1 = be64_table(&raw);
    let mut l1_changed = false;
    let mut tables: Vec<(u64, Vec<u64>)> = Vec::new();
    for (i, slot) in l1.iter_mut().enumerate() {
        let e = *slot;
        let l2_off = e & L1E_OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        let rc = disk.get(l2_off >> h.cluster_bits())?;
        if (rc == 1) != (e & OFLAG_COPIED != 0) {
            lines.push(Line::CopiedL2 {
                l1_index: i as u64,
                l1_entry: e,
                refcount: rc,
            });
            *slot = with_copied(e, rc);
            l1_changed = true;
        }
        // A table changed for an earlier L1 entry is read as changed.
        let known = tables.iter().position(|(o, _)| *o == l2_off);
        let mut table = match known {
            Some(k) => tables[k].1.clone(),
            None => {
                let mut t = vec![0u8; cs as usize];
                disk.read(l2_off, &mut t)?;
                be64_table(&t)
            }
        };
        let mut dirty = false;
        for slot in table.iter_mut() {
            let e = *slot;
            if e & OFLAG_COMPRESSED != 0 || e & L2E_OFFSET_MASK == 0 {
                continue;
            }
            let rc = disk.get((e & L2E_OFFSET_MASK) >> h.cluster_bits())?;
            if (rc == 1) != (e & OFLAG_COPIED != 0) {
                lines.push(Line::CopiedData {
                    l2_entry: e,
                    refcount: rc,
                });
                *slot = with_copied(e, rc);
                dirty = true;
            }
        }
        if dirty {
            // QEMU writes the table in place only where its overlap check allows it:
            // a table that is also something else (refcount other than 1) is refused.
            if rc != 1 {
                return unsupported("an L2 table to rewrite is shared");
            }
            match known {
                Some(k) => tables[k].1 = table,
                None => tables.push((l2_off, table)),
            }
        }
    }
    let mut writes = Vec::new();
    if l1_changed {
        writes.push(RepairWrite {
            offset: h.l1_table_offset,
            data: to_bytes(&l1),
            kind: RepairWriteKind::L1Table,
        });
    }
    for (offset, table) in tables {
        writes.push(RepairWrite {
            offset,
            data: to_bytes(&table),
            kind: RepairWriteKind::L2Table,
        });
    }
    Ok(writes)
}
