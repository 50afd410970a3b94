//! The repair QEMU runs when it opens an image with `QED_F_NEED_CHECK` read-write
//! (`qed_check` with `fix`): L1 and L2 entries pointing outside the file are cleared
//! and the tables holding them written back whole; clusters referenced twice are
//! only counted (a table referenced twice is not looked into). Without such
//! unfixable corruptions the image is marked clean.

use alloc::vec;
use alloc::vec::Vec;
use instar_blockdev::BlockDev;

use crate::header::F_NEED_CHECK;
use crate::image::{read_table, QedError, QedImage};

/// Largest cluster bitmap the check builds (QEMU's `used_clusters`), in clusters.
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 27;
/// Most bytes of repaired L2 tables held in memory until they are written.
pub const MAX_REPAIRED_BYTES: u64 = 32 << 20;

/// What the repair does to the file, in QEMU's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repair {
    /// Whole tables written back: (file offset, bytes).
    pub writes: Vec<(u64, Vec<u8>)>,
    /// The header is rewritten without `QED_F_NEED_CHECK` (no corruption left).
    pub marked_clean: bool,
    pub fixed: u64,
    pub corruptions: u64,
}

struct Used {
    bits: Vec<u64>,
}

impl Used {
    /// `qed_set_used_clusters`: whether none of the `n` clusters was used before.
    fn set(&mut self, first: u64, n: u64) -> bool {
        let mut fresh = true;
        for c in first..first + n {
            let (w, b) = ((c / 64) as usize, c % 64);
            // QEMU's bitmap covers the file; past it nothing was marked before.
            if let Some(word) = self.bits.get_mut(w) {
                fresh &= *word & (1 << b) == 0;
                *word |= 1 << b;
            }
        }
        fresh
    }
}

fn to_bytes(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

impl<D: BlockDev> QedImage<D> {
    /// Plan QEMU's open-time repair and apply it to the tables in memory (lookups
    /// afterwards see the repaired tables). The caller writes [`Repair::writes`]
    /// (and the header when [`Repair::marked_clean`]) once nothing else can fail.
    pub fn repair(&mut self) -> Result<Repair, QedError> {
        let mut out = Repair::default();
        let nclusters = self.bytes_to_clusters(self.file_size);
        if nclusters > MAX_CHECK_CLUSTERS {
            return Err(QedError::TooLargeToCheck);
        }
        let mut used = Used {
            bits: vec![0u64; nclusters.div_ceil(64) as usize],
        };
        let table_size = u64::from(self.header.table_size);
        used.set(
            self.bytes_to_clusters(self.header.l1_table_offset),
            table_size,
        );
        let mut invalid_l1 = 0u64;
        for i in 0..self.l1.len() {
            let offset = self.l1[i];
            if offset == 0 {
                continue;
            }
            if !self.header.table_offset_ok(offset, self.file_size) {
                self.l1[i] = 0;
                out.fixed += 1;
                invalid_l1 += 1;
                continue;
            }
            if !used.set(self.bytes_to_clusters(offset), table_size) {
                out.corruptions += 1;
                continue;
            }
            let mut table = read_table(&mut self.dev, offset, self.header.table_bytes())
                .map_err(|_| QedError::Corrupted)?;
            let mut invalid_l2 = 0u64;
            for e in table.iter_mut() {
                if *e <= 1 {
                    continue;
                }
                if !self.header.cluster_offset_ok(*e, self.file_size) {
                    *e = 0;
                    out.fixed += 1;
                    invalid_l2 += 1;
                    continue;
                }
                if !used.set(self.bytes_to_clusters(*e), 1) {
                    out.corruptions += 1;
                }
            }
            if invalid_l2 > 0 {
                let held: u64 = out.writes.iter().map(|(_, b)| b.len() as u64).sum();
                if held + self.header.table_bytes() > MAX_REPAIRED_BYTES {
                    return Err(QedError::TooLargeToCheck);
                }
                out.writes.push((offset, to_bytes(&table)));
                self.patch_l2(offset, table);
            }
        }
        if invalid_l1 > 0 {
            out.writes
                .push((self.header.l1_table_offset, to_bytes(&self.l1)));
        }
        if out.corruptions == 0 {
            self.header.features &= !F_NEED_CHECK;
            out.marked_clean = true;
        }
        Ok(out)
    }
}
