//! No write through a cluster that two structures share. QEMU's qed driver has no
//! overlap check: an L2 entry pointing into the L1 table, two L1 entries sharing an L2
//! table or two L2 entries sharing a data cluster make its writes change what other
//! parts of the image show. Before the first write, every cluster a rebase would write
//! through (in-place data clusters, updated L2 tables, the L1 table) is checked against
//! every structure of the image: header, L1 table, each L2 table, each data cluster
//! (tables of L1 entries past the image's end map nothing and are left out).

use alloc::collections::{BTreeMap, BTreeSet};
use core::fmt;
use instar_blockdev::BlockDev;

use crate::image::{ClusterState, QedError, QedImage};

/// What a cluster of the image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Header,
    L1Table,
    L2Table,
    Data,
}

impl fmt::Display for Use {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Use::Header => "the header",
            Use::L1Table => "the L1 table",
            Use::L2Table => "an L2 table",
            Use::Data => "a data cluster",
        })
    }
}

/// A cluster the rebase would write through, used twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "Preventing invalid write on metadata (cluster {offset:#x} of the overlay is both {first} and {second})"
)]
pub struct Overlap {
    pub offset: u64,
    pub first: Use,
    pub second: Use,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverlapError {
    #[error(transparent)]
    Overlap(#[from] Overlap),
    #[error(transparent)]
    Qed(#[from] QedError),
}

impl<D: BlockDev> QedImage<D> {
    /// Add to `out` the clusters (by file offset) that a write request over
    /// `[pos, pos + len)` writes through in the image as it is now: data clusters
    /// written in place, the L2 table whose entries it sets, or the L1 table's cluster
    /// when it adds an L2 table. New clusters at the end of the file are not listed.
    pub fn touched(&mut self, pos: u64, len: u64, out: &mut BTreeSet<u64>) -> Result<(), QedError> {
        let cs = self.cluster_size();
        let end = pos.checked_add(len).ok_or(QedError::InvalidOffset)?;
        let mut cur = pos;
        while cur < end {
            let (state, n) = self.find_cluster(cur, end - cur)?;
            if n == 0 {
                return Err(QedError::InvalidOffset);
            }
            match state {
                ClusterState::Found(at) => {
                    let first = at + self.in_cluster(cur);
                    let mut c = first & !(cs - 1);
                    while c < first + n {
                        out.insert(c);
                        c += cs;
                    }
                }
                ClusterState::UnallocatedL1 => {
                    let entry = self.header.l1_table_offset + 8 * self.l1_index(cur) as u64;
                    out.insert(entry & !(cs - 1));
                }
                ClusterState::Zero | ClusterState::UnallocatedL2 => {
                    let table = self.l1.get(self.l1_index(cur)).copied().unwrap_or(0);
                    for k in 0..u64::from(self.header.table_size) {
                        out.insert(table + k * cs);
                    }
                }
            }
            cur += n;
        }
        Ok(())
    }

    /// Whether any cluster of `touched` holds two structures (or one structure twice).
    pub fn check_overlaps(&mut self, touched: &BTreeSet<u64>) -> Result<(), OverlapError> {
        if touched.is_empty() {
            return Ok(());
        }
        let cs = self.cluster_size();
        let mut seen: BTreeMap<u64, Use> = BTreeMap::new();
        let mut mark = |from: u64, clusters: u64, what: Use| -> Result<(), Overlap> {
            for k in 0..clusters {
                let c = from + k * cs;
                if !touched.contains(&c) {
                    continue;
                }
                if let Some(&first) = seen.get(&c) {
                    return Err(Overlap {
                        offset: c,
                        first,
                        second: what,
                    });
                }
                seen.insert(c, what);
            }
            Ok(())
        };
        let ts = u64::from(self.header.table_size);
        mark(0, u64::from(self.header.header_size), Use::Header)?;
        mark(self.header.l1_table_offset, ts, Use::L1Table)?;
        // Entries past the image's end map nothing anyone reads: not structures.
        let reach = self.cluster_size() * self.header.table_entries();
        let reachable = self.virtual_size().div_ceil(reach) as usize;
        for i in 0..self.l1.len().min(reachable) {
            let table = self.l1[i];
            if table == 0 || !self.header.table_offset_ok(table, self.file_size) {
                continue;
            }
            mark(table, ts, Use::L2Table)?;
            self.load_l2(table)?;
            let Some(l2) = self.l2.as_ref() else {
                continue;
            };
            for &e in &l2.entries {
                if e > 1 && self.header.cluster_offset_ok(e, self.file_size) {
                    mark(e, 1, Use::Data)?;
                }
            }
        }
        Ok(())
    }
}
