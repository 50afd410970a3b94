//! What a writer session did to the file, kept for the pre-write audit
//! ([`crate::overlap`]): every write with what it holds, the clusters the allocator took
//! (refcount raised from 0) and the clusters whose refcount this session dropped to 0.
//!
//! Everything is kept as runs, so the record grows with the number of separate
//! extents, not with the bytes written.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

/// What a device write holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WriteKind {
    /// Header fields in cluster 0 (or the whole header cluster).
    Header,
    /// Entries of the active L1 table.
    ActiveL1,
    /// An L2 table (slice).
    L2Table,
    /// The refcount table (entries, or a new table).
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// Guest data or copy-on-write padding.
    Data,
    /// The bitmap directory (in place on open, new on close).
    BitmapDirectory,
    /// A new bitmap table.
    BitmapTable,
    /// A new bitmap data cluster.
    BitmapData,
    /// Zeros over a freed bitmap data cluster (QEMU discards it: a hole).
    BitmapDiscard,
}

impl WriteKind {
    /// Bulk content a dry run records without writing (nothing reads it back: the
    /// session never reads guest data it wrote, nor a bitmap table or data cluster).
    pub(crate) fn is_bulk(self) -> bool {
        matches!(
            self,
            WriteKind::Data
                | WriteKind::BitmapTable
                | WriteKind::BitmapData
                | WriteKind::BitmapDiscard
        )
    }
}

/// One contiguous write of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRun {
    pub offset: u64,
    pub len: u64,
    pub kind: WriteKind,
}

/// See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteRecord {
    /// Writes in issue order; a write that continues the previous one of the same kind
    /// extends it.
    pub writes: Vec<WriteRun>,
    /// Clusters taken by the allocator: first cluster → number of clusters, merged.
    taken: BTreeMap<u64, u64>,
    /// Clusters in use before the session whose refcount the session dropped to 0.
    freed: BTreeSet<u64>,
}

impl WriteRecord {
    pub(crate) fn note_write(&mut self, offset: u64, len: u64, kind: WriteKind) {
        if let Some(last) = self.writes.last_mut() {
            if last.kind == kind && last.offset + last.len == offset {
                last.len += len;
                return;
            }
        }
        self.writes.push(WriteRun { offset, len, kind });
    }

    pub(crate) fn note_taken(&mut self, c: u64) {
        if self.was_taken(c) {
            return;
        }
        // Extend the run that ends at c, then merge with one that starts at c + 1.
        let mut start = c;
        let mut len = 1;
        if let Some((&s, &n)) = self.taken.range(..c).next_back() {
            if s + n == c {
                start = s;
                len += n;
            }
        }
        if let Some(n) = self.taken.remove(&(c + 1)) {
            len += n;
        }
        self.taken.insert(start, len);
    }

    pub(crate) fn note_freed(&mut self, c: u64) {
        // A cluster taken in this session and given back (an undone allocation) was
        // free before: it stays "taken", never "freed".
        if !self.was_taken(c) {
            self.freed.insert(c);
        }
    }

    /// Whether the allocator took cluster `c` in this session.
    pub fn was_taken(&self, c: u64) -> bool {
        self.taken
            .range(..=c)
            .next_back()
            .is_some_and(|(&s, &n)| c < s + n)
    }

    /// Whether cluster `c` was in use before the session and the session freed it.
    pub fn was_freed(&self, c: u64) -> bool {
        self.freed.contains(&c)
    }

    /// The runs of taken clusters: (first cluster, count), in cluster order.
    pub fn taken_runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.taken.iter().map(|(&s, &n)| (s, n))
    }

    /// Add a write made outside the writer (the header rewrite that ends a rebase).
    pub fn add_write(&mut self, offset: u64, len: u64, kind: WriteKind) {
        self.note_write(offset, len, kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_runs_merge_and_undo_is_not_a_free() {
        let mut r = WriteRecord::default();
        for c in [5, 6, 8, 7, 2] {
            r.note_taken(c);
        }
        assert_eq!(r.taken_runs().collect::<Vec<_>>(), [(2, 1), (5, 4)]);
        r.note_freed(6);
        r.note_freed(30);
        assert!(!r.was_freed(6));
        assert!(r.was_freed(30));
        assert!(r.was_taken(8) && !r.was_taken(9) && !r.was_taken(4));
    }

    #[test]
    fn writes_coalesce_by_kind() {
        let mut r = WriteRecord::default();
        r.note_write(0, 8, WriteKind::Header);
        r.note_write(8, 8, WriteKind::Header);
        r.note_write(16, 8, WriteKind::Data);
        assert_eq!(r.writes.len(), 2);
        assert_eq!(r.writes[0].len, 16);
    }
}
