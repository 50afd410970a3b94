//! The write end a rebase declares before its first write (`Hooks::write_phase`): an
//! offset that no write of its plan can pass. The host refuses every write past it, so
//! a writer that ran away (a bug, or a guest taken over by a crafted image) cannot
//! grow the overlay further; the host also caps it with a bound of its own.

use crate::copy::Op;

/// A header rewrite (`-u`, or the last step of a safe rebase) writes `header_len`
/// bytes at offset 0 of an overlay of `len` bytes.
pub(crate) fn header_end(len: u64, header_len: u64) -> u64 {
    len.max(header_len)
}

/// The end of a safe rebase that replays `ops` on an overlay of `len` bytes, whose
/// allocation unit (qcow2 cluster, vmdk grain) is `unit` bytes.
///
/// Every unit an op touches may need a new data unit and a new table (a qcow2 L2 table;
/// vmdk grain tables are never allocated) at the end of the file. qcow2 also counts
/// references: with the widest refcounts (64 bits) one refcount block covers `unit / 8`
/// units and the refcount table takes 8 bytes per block; growing the table can place a
/// new table and new blocks, so both are counted four times over, plus a few units of
/// rounding. Far more than a real plan needs, and still proportional to it.
pub(crate) fn plan_end(len: u64, unit: u64, ops: &[Op]) -> u64 {
    let unit = unit.max(512);
    let touched = ops.iter().fold(0u64, |sum, op| {
        let (offset, n) = match *op {
            Op::Data { offset, len } | Op::Zero { offset, len } => (offset, len),
        };
        let units = match n.checked_sub(1).and_then(|last| offset.checked_add(last)) {
            Some(end) => end / unit - offset / unit + 1,
            None if n == 0 => 0,
            None => u64::MAX,
        };
        sum.saturating_add(units)
    });
    let units = len.div_ceil(unit).saturating_add(touched.saturating_mul(2));
    let blocks = units.div_ceil(unit / 8).saturating_add(1);
    let table = blocks.saturating_mul(8).div_ceil(unit).saturating_add(1);
    units
        .saturating_add(blocks.saturating_add(table).saturating_mul(4))
        .saturating_add(8)
        .saturating_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends() {
        assert_eq!(header_end(1000, 65536), 65536);
        assert_eq!(header_end(1 << 20, 65536), 1 << 20);
        // Nothing to copy: the file, the refcount margin and the rounding.
        let c = 65536;
        assert_eq!(plan_end(10 * c, c, &[]), (10 + 4 * (2 + 2) + 8) * c);
        // One op over three clusters (it starts inside the first).
        let ops = [Op::Data {
            offset: c / 2,
            len: 2 * c + 1,
        }];
        assert_eq!(plan_end(10 * c, c, &ops), (16 + 4 * (2 + 2) + 8) * c);
        // Saturates instead of wrapping.
        let huge = [Op::Zero {
            offset: u64::MAX - 10,
            len: 100,
        }];
        assert_eq!(plan_end(u64::MAX, 512, &huge), u64::MAX);
    }
}
