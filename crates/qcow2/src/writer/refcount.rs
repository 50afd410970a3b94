//! Refcounts: reading and updating entries of any width, first-fit cluster allocation,
//! refcount block creation and refcount table growth (QEMU's `qcow2-refcount.c` rules).

use alloc::vec;
use alloc::vec::Vec;

use instar_blockdev::BlockDev;

use super::cache::Which;
use super::{
    corrupt, Below, WriteError, WriteKind, Writer, HDR_REFTABLE_OFFSET, MAX_CLUSTER_OFFSET,
    MAX_REFTABLE_ENTRIES,
};
use crate::refcount::{refcount_entry, REFT_OFFSET_MASK};

/// Outcome of an operation that may have created a refcount block, after which the
/// caller must redo its search for free clusters (QEMU's `-EAGAIN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Done,
    Again,
}

pub(crate) fn set_refcount(block: &mut [u8], index: u64, order: u32, value: u64) {
    let i = index as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let mask = ((1u16 << bits) - 1) as u8;
            let b = &mut block[bit / 8];
            *b = (*b & !(mask << (bit % 8))) | (((value as u8) & mask) << (bit % 8));
        }
        3 => block[i] = value as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * i..8 * i + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

/// `qcow2_refcount_metadata_size`: number of refcount blocks needed to cover `clusters`
/// plus the refcount structures themselves (generous: 50 % more table).
pub(crate) fn refblocks_needed(clusters: u64, cluster_size: u64, order: u32) -> u64 {
    let per_table_cluster = cluster_size / 8;
    let per_block = (cluster_size * 8) >> order;
    let mut clusters = clusters;
    let mut generous = true;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last && generous {
            clusters += table.div_ceil(2);
            n = 0;
            generous = false;
        }
        if n == last {
            return blocks;
        }
    }
}

impl<D: BlockDev, B: Below> Writer<D, B> {
    fn rb_entries(&self) -> u64 {
        1u64 << self.geometry.refblock_bits()
    }

    fn refblock_offset(&self, table_index: u64) -> Result<u64, WriteError> {
        let Some(&e) = self.rt.get(table_index as usize) else {
            return Ok(0);
        };
        let off = e & REFT_OFFSET_MASK;
        if off != 0 && self.offset_into_cluster(off) != 0 {
            return Err(corrupt("refcount block offset unaligned", off));
        }
        Ok(off)
    }

    /// Refcount of host cluster `cluster` (0 where no block covers it).
    pub(crate) fn refcount(&mut self, cluster: u64) -> Result<u64, WriteError> {
        let off = self.refblock_offset(cluster >> self.geometry.refblock_bits())?;
        if off == 0 {
            return Ok(0);
        }
        self.cache_get(Which::Refcount, off)?;
        let order = self.geometry.refcount_order();
        let idx = cluster & (self.rb_entries() - 1);
        Ok(refcount_entry(
            &self.table(Which::Refcount, off)?.data,
            idx,
            order,
        ))
    }

    /// `alloc_clusters_noref`: first run of `n` free clusters at or after the cursor.
    pub(crate) fn find_free_run(&mut self, n: u64) -> Result<u64, WriteError> {
        let mut i = 0;
        while i < n {
            let c = self.fci;
            self.fci += 1;
            if self.refcount(c)? != 0 {
                i = 0;
            } else {
                i += 1;
            }
        }
        if self.fci > 0 && self.fci - 1 > MAX_CLUSTER_OFFSET >> self.geometry.cluster_bits() {
            return Err(WriteError::TooBig);
        }
        Ok(self.fci - n)
    }

    /// `qcow2_alloc_clusters`: allocate `n` contiguous clusters; returns the first index.
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> Result<u64, WriteError> {
        loop {
            let start = self.find_free_run(n)?;
            if self.update_refcount(start, n, false)? == Flow::Done {
                return Ok(start);
            }
        }
    }

    /// `qcow2_alloc_clusters_at`: allocate up to `n` clusters exactly at `start`; returns
    /// how many were free there. The cursor does not move.
    pub(crate) fn alloc_clusters_at(&mut self, start: u64, n: u64) -> Result<u64, WriteError> {
        if n == 0 {
            return Ok(0);
        }
        loop {
            let mut i = 0;
            while i < n && self.refcount(start + i)? == 0 {
                i += 1;
            }
            if self.update_refcount(start, i, false)? == Flow::Done {
                return Ok(i);
            }
        }
    }

    /// Decrease the refcounts of `n` clusters from `start` (`qcow2_free_clusters`).
    pub(crate) fn free_clusters(&mut self, start: u64, n: u64) -> Result<(), WriteError> {
        match self.update_refcount(start, n, true)? {
            Flow::Done => Ok(()),
            Flow::Again => Err(corrupt("freeing a cluster without a refcount block", start)),
        }
    }

    /// `update_refcount` by one for clusters `start..start+n`.
    pub(crate) fn update_refcount(
        &mut self,
        start: u64,
        n: u64,
        decrease: bool,
    ) -> Result<Flow, WriteError> {
        if n == 0 {
            return Ok(Flow::Done);
        }
        if decrease {
            // Refcounts may only drop once the L2 change is on disk.
            self.cache_set_dependency(Which::Refcount)?;
        }
        let order = self.geometry.refcount_order();
        let mut block_off = 0u64;
        let mut old_table_index = None;
        for c in start..start + n {
            let t = c >> self.geometry.refblock_bits();
            if old_table_index != Some(t) {
                match self.ensure_refblock(c)? {
                    (Flow::Done, off) => block_off = off,
                    (Flow::Again, _) => {
                        self.fci = self.fci.min(start);
                        // Undo what this call already changed.
                        self.update_refcount_undo(start, c - start, decrease)?;
                        return Ok(Flow::Again);
                    }
                }
            }
            old_table_index = Some(t);
            let idx = c & (self.rb_entries() - 1);
            let max = self.geometry.refcount_max();
            let tbl = self.table(Which::Refcount, block_off)?;
            tbl.dirty = true;
            let rc = refcount_entry(&tbl.data, idx, order);
            let new = if decrease {
                rc.checked_sub(1).ok_or(corrupt("refcount below zero", c))?
            } else {
                match rc.checked_add(1) {
                    Some(v) if v <= max => v,
                    _ => return Err(WriteError::RefcountOverflow(c)),
                }
            };
            set_refcount(&mut tbl.data, idx, order, new);
            if rc == 0 {
                self.note_taken(c);
            }
            if new == 0 {
                self.note_freed(c);
                if c < self.fci {
                    self.fci = c;
                }
                // A freed metadata table must not be written back later.
                let first = start << self.geometry.cluster_bits();
                if self.rb_cache.tables.contains_key(&first) {
                    self.cache_discard(Which::Refcount, first);
                    old_table_index = None;
                }
                if self.l2_cache.tables.contains_key(&first) {
                    self.cache_discard(Which::L2, first);
                }
            }
        }
        Ok(Flow::Done)
    }

    fn update_refcount_undo(
        &mut self,
        start: u64,
        n: u64,
        decrease: bool,
    ) -> Result<(), WriteError> {
        match self.update_refcount(start, n, !decrease)? {
            Flow::Done => Ok(()),
            Flow::Again => Err(corrupt("refcount undo needed a new block", start)),
        }
    }

    /// `alloc_refcount_block`: the block covering `cluster`, creating it (and growing
    /// the table) if missing. `Again` means something was allocated.
    fn ensure_refblock(&mut self, cluster: u64) -> Result<(Flow, u64), WriteError> {
        let t = cluster >> self.geometry.refblock_bits();
        let existing = self.refblock_offset(t)?;
        if existing != 0 {
            self.cache_get(Which::Refcount, existing)?;
            return Ok((Flow::Done, existing));
        }

        // The reftable entry will be written: dirty L2 tables go first.
        self.cache_flush(Which::L2)?;

        let new_block = self.find_free_run(1)?;
        if new_block == 0 {
            return Err(corrupt("refcount block allocation at offset 0", 0));
        }
        let order = self.geometry.refcount_order();
        let new_off = new_block << self.geometry.cluster_bits();
        if new_block >> self.geometry.refblock_bits() == t {
            // Self-describing block.
            self.cache_get_empty(Which::Refcount, new_off);
            let idx = new_block & (self.rb_entries() - 1);
            let tbl = self.table(Which::Refcount, new_off)?;
            set_refcount(&mut tbl.data, idx, order, 1);
            self.note_taken(new_block);
        } else {
            if self.update_refcount(new_block, 1, false)? == Flow::Again {
                return Ok((Flow::Again, 0));
            }
            self.cache_flush(Which::Refcount)?;
            self.cache_get_empty(Which::Refcount, new_off);
        }
        self.cache_flush(Which::Refcount)?;

        if (t as usize) < self.rt.len() {
            self.dev_write_sync(
                self.rt_offset + 8 * t,
                &new_off.to_be_bytes(),
                WriteKind::RefcountTable,
            )?;
            self.rt[t as usize] = new_off;
            self.max_rt_index = Some(self.max_rt_index.map_or(t as usize, |m| m.max(t as usize)));
            return Ok((Flow::Again, 0));
        }

        // The table is full: build a bigger one past everything in use.
        let blocks_used = (cluster + 1).max(new_block + 1).div_ceil(self.rb_entries());
        let meta_start = blocks_used * self.rb_entries();
        self.refcount_area(meta_start, t, new_off)?;
        Ok((Flow::Again, 0))
    }

    /// `qcow2_refcount_area` (generous, no additional clusters): new refcount blocks and
    /// a new refcount table at cluster `meta_start`, covering themselves.
    fn refcount_area(
        &mut self,
        meta_start: u64,
        new_index: u64,
        new_off: u64,
    ) -> Result<(), WriteError> {
        let cs = self.geometry.cluster_size();
        let order = self.geometry.refcount_order();
        let total = refblocks_needed(meta_start, cs, order);
        if total > MAX_REFTABLE_ENTRIES {
            return Err(WriteError::TooBig);
        }
        let area_index = meta_start >> self.geometry.refblock_bits();
        let per_cluster = cs / 8;
        let table_size = (total + total.div_ceil(2)).div_ceil(per_cluster) * per_cluster;
        if table_size > MAX_REFTABLE_ENTRIES {
            return Err(WriteError::TooBig);
        }
        let table_clusters = table_size * 8 / cs;

        let mut new_table = vec![0u64; table_size as usize];
        let keep = self
            .max_rt_index
            .map_or(0, |m| m + 1)
            .min(table_size as usize);
        new_table[..keep].copy_from_slice(&self.rt[..keep]);
        if new_index >= total {
            return Err(corrupt(
                "new refcount block outside the new table",
                new_index,
            ));
        }
        new_table[new_index as usize] = new_off;

        let additional = new_table[area_index as usize..total as usize]
            .iter()
            .filter(|&&e| e == 0)
            .count() as u64;
        let table_off = (meta_start << self.geometry.cluster_bits()) + additional * cs;
        let end_off = table_off + table_clusters * cs;

        let mut block_off = meta_start << self.geometry.cluster_bits();
        let mut taken = Vec::new();
        for i in area_index..total {
            let off = if new_table[i as usize] != 0 {
                let off = new_table[i as usize] & REFT_OFFSET_MASK;
                self.cache_get(Which::Refcount, off)?;
                off
            } else {
                self.cache_get_empty(Which::Refcount, block_off);
                new_table[i as usize] = block_off;
                block_off += cs;
                block_off - cs
            };
            let first_covered = (i << self.geometry.refblock_bits()) * cs;
            if first_covered < end_off {
                let mut j = if first_covered < (meta_start << self.geometry.cluster_bits()) {
                    ((meta_start << self.geometry.cluster_bits()) - first_covered) / cs
                } else {
                    0
                };
                let end_index = ((end_off - first_covered) / cs).min(self.rb_entries());
                let tbl = self.table(Which::Refcount, off)?;
                while j < end_index {
                    if refcount_entry(&tbl.data, j, order) != 0 {
                        return Err(corrupt("refcount area not free", first_covered + j * cs));
                    }
                    set_refcount(&mut tbl.data, j, order, 1);
                    taken.push(first_covered / cs + j);
                    j += 1;
                }
                tbl.dirty = true;
            }
        }

        for c in taken {
            self.note_taken(c);
        }
        self.cache_flush(Which::Refcount)?;

        let mut raw = Vec::with_capacity(table_size as usize * 8);
        for e in &new_table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        self.dev_write_sync(table_off, &raw, WriteKind::RefcountTable)?;

        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        self.dev_write_sync(HDR_REFTABLE_OFFSET, &hdr, WriteKind::Header)?;

        let old_off = self.rt_offset;
        let old_clusters = (self.rt.len() as u64 * 8).div_ceil(cs);
        self.rt = new_table;
        self.rt_offset = table_off;
        self.max_rt_index = self.rt.iter().rposition(|&e| e != 0);
        self.free_clusters(old_off >> self.geometry.cluster_bits(), old_clusters)
    }
}
