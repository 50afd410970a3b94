//! The writes QEMU makes for an image's bitmaps: marking them IN_USE when it opens the
//! image read-write, storing them again when it closes it. Both run through the
//! writer's allocator and caches, so clusters are taken where QEMU takes them.

use alloc::vec;
use alloc::vec::Vec;

use instar_blockdev::BlockDev;

use super::{dir, fill, source, BitmapSet, DirEntry, Source, FLAG_AUTO, FLAG_IN_USE};
use crate::header::{BitmapsExt, Header, AUTOCLEAR_BITMAPS, AUTOCLEAR_MASK};
use crate::writer::{Below, WriteError, WriteKind, Writer};

/// Guest byte ranges a session wrote (data and write-zeroes alike), sorted and merged:
/// what QEMU's `bdrv_set_dirty` marks in every enabled bitmap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dirt(Vec<(u64, u64)>);

impl Dirt {
    /// From `(offset, len)` requests in any order.
    pub fn from_requests(requests: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut r: Vec<(u64, u64)> = requests
            .into_iter()
            .filter(|&(_, len)| len > 0)
            .map(|(o, len)| (o, o.saturating_add(len)))
            .collect();
        r.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(r.len());
        for (s, e) in r {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Dirt(merged)
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }
}

fn rebuild_error(_: crate::ChangeBackingError) -> WriteError {
    WriteError::Unsupported("the header with the bitmaps extension does not fit in cluster 0")
}

impl<D: BlockDev, B: Below> Writer<D, B> {
    /// The read-write open (`update_ext_header_and_dir_in_place`): the header without
    /// the autoclear bit (flushed), the directory with every bitmap IN_USE (flushed),
    /// the header with the bit again (flushed). `header` is the image as opened.
    /// Nothing is written when every bitmap is already IN_USE.
    pub fn bitmaps_open(&mut self, set: &BitmapSet, header: &Header) -> Result<(), WriteError> {
        if !set.needs_store() {
            return Ok(());
        }
        let mut h = header.clone();
        h.autoclear_features &= AUTOCLEAR_MASK & !AUTOCLEAR_BITMAPS;
        let cleared = h.rebuild().map_err(rebuild_error)?;
        self.write_raw_sync(0, &cleared, WriteKind::Header)?;
        let dir = set.in_use_directory();
        self.write_raw_sync(set.dir_offset, &dir, WriteKind::BitmapDirectory)?;
        h.autoclear_features |= AUTOCLEAR_BITMAPS;
        let set_again = h.rebuild().map_err(rebuild_error)?;
        self.write_raw_sync(0, &set_again, WriteKind::Header)
    }

    /// The close (`qcow2_store_persistent_dirty_bitmaps`): every consistent bitmap
    /// (with `dirt` set in the enabled ones) stored into new clusters, then the new
    /// directory; the caches flushed; `header` (the image as it will be left, with the
    /// writer's refcount-table fields) written with the new directory and flushed;
    /// then the old directory, tables and data clusters freed, the data clusters
    /// zeroed as QEMU's discard leaves them. `header` is updated to match.
    pub fn bitmaps_close(
        &mut self,
        set: &BitmapSet,
        dirt: &Dirt,
        header: &mut Header,
    ) -> Result<(), WriteError> {
        if !set.needs_store() {
            return Ok(());
        }
        let mut entries: Vec<DirEntry> = set.in_use_entries();
        for (i, (e, old)) in entries.iter_mut().zip(&set.entries).enumerate() {
            if old.in_use() {
                // Inconsistent since the open: kept as it is.
                continue;
            }
            let enabled = old.flags & FLAG_AUTO != 0;
            let dirty = if enabled { dirt.ranges() } else { &[] };
            let (offset, size) = self.store_bitmap(set, i, dirty)?;
            e.table_offset = offset;
            e.table_size = size;
            e.flags = if enabled { FLAG_AUTO } else { 0 };
        }
        let dir = dir::build(&entries);
        let dir_offset = self.alloc_bytes(dir.len() as u64)?;
        self.write_raw(dir_offset, &dir, WriteKind::BitmapDirectory)?;
        self.flush_caches()?;

        let f = self.header_fields();
        header.incompatible_features = f.incompatible_features;
        header.refcount_table_offset = f.refcount_table_offset;
        header.refcount_table_clusters = f.refcount_table_clusters;
        header.autoclear_features |= AUTOCLEAR_BITMAPS;
        header.bitmaps = Some(BitmapsExt {
            nb_bitmaps: entries.len() as u32,
            bitmap_directory_size: dir.len() as u64,
            bitmap_directory_offset: dir_offset,
        });
        let cluster = header.rebuild().map_err(rebuild_error)?;
        self.write_raw_sync(0, &cluster, WriteKind::Header)?;

        self.free_bytes(set.dir_offset, set.dir_size)?;
        self.free_old_tables(set)
    }

    /// `store_bitmap`: the data clusters with a bit set, in order, then the table.
    /// Returns the table's offset and entries.
    fn store_bitmap(
        &mut self,
        set: &BitmapSet,
        i: usize,
        dirty: &[(u64, u64)],
    ) -> Result<(u64, u32), WriteError> {
        let c = set.chunks(i);
        let cs = set.cluster_size as usize;
        let old = set.tables.get(i).map_or(&[][..], Vec::as_slice);
        let n = c.table_size();
        let mut table = vec![0u64; n as usize];
        let mut buf = Vec::with_capacity(cs);
        for (k, slot) in table.iter_mut().enumerate() {
            let src = old.get(k).copied().map_or(Source::Zeros, source);
            if let Source::Cluster(off) = src {
                buf.clear();
                buf.resize(cs, 0);
                self.read_raw(off, &mut buf)?;
            }
            if fill(&c, k as u64, &mut buf, src, dirty) {
                let off = self.alloc_bytes(cs as u64)?;
                buf.resize(cs, 0);
                self.write_raw(off, &buf, WriteKind::BitmapData)?;
                *slot = off;
            }
        }
        let raw: Vec<u8> = table.iter().flat_map(|t| t.to_be_bytes()).collect();
        let offset = self.alloc_bytes(raw.len() as u64)?;
        self.write_raw(offset, &raw, WriteKind::BitmapTable)?;
        Ok((offset, n as u32))
    }

    /// `free_bitmap_clusters` for each stored bitmap's old table: its data clusters
    /// (discarded, so zeros), then the table itself.
    fn free_old_tables(&mut self, set: &BitmapSet) -> Result<(), WriteError> {
        let cs = set.cluster_size;
        let zeros = vec![0u8; cs as usize];
        for (e, table) in set.entries.iter().zip(&set.tables).rev() {
            if e.in_use() {
                continue;
            }
            for &t in table {
                if let Source::Cluster(off) = source(t) {
                    self.free_bytes(off, cs)?;
                    if self.refcount_at(off)? == 0 {
                        self.write_raw(off, &zeros, WriteKind::BitmapDiscard)?;
                    }
                }
            }
            self.free_bytes(e.table_offset, u64::from(e.table_size) * 8)?;
        }
        Ok(())
    }
}

impl BitmapSet {
    /// The directory entries as the in-place update left them (every one IN_USE).
    pub(crate) fn in_use_entries(&self) -> Vec<DirEntry> {
        self.entries
            .iter()
            .map(|e| DirEntry {
                flags: e.flags | FLAG_IN_USE,
                ..e.clone()
            })
            .collect()
    }
}
