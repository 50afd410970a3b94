//! Writes to a qed image with QEMU's allocation (`qed_aio_next_io` and the block
//! layer's write-zeroes splitting), so the file comes out byte-identical:
//!
//! - a request is split where `qed_find_cluster` splits it: at each L2 table's reach
//!   and between runs of one kind (contiguous data, zero, unallocated);
//! - a run of data clusters is written in place; any other run gets fresh clusters at
//!   the end of the file (the file length rounded down to a cluster at open), the
//!   parts of its first and last cluster outside the request filled from the backing
//!   file (zeros without one), then its L2 entries;
//! - a missing L2 table is allocated after the data, written whole, then the L1 entry
//!   (its 512-byte sector of the table);
//! - an updated L2 table is written back in whole 512-byte sectors;
//! - write-zeroes: cluster-aligned parts set L2 entries to 1 (the zero cluster) or
//!   write zeros in place; unaligned head and tail fall back to writing zero data;
//! - without a backing file the first allocation sets `QED_F_NEED_CHECK` in the header
//!   and flushes it (QEMU does not flush there; see docs/crash-safety.md), and the
//!   caller's final header write clears it, as QEMU's close does.

use alloc::vec;
use alloc::vec::Vec;
use instar_blockdev::BlockDev;

use crate::header::F_NEED_CHECK;
use crate::image::{CachedL2, ClusterState, QedError, QedImage};

/// QEMU's `MAX_BOUNCE_BUFFER`: the largest zero-data write of the fallback.
const MAX_BOUNCE: u64 = 32768 * 512;
/// Table entries per 512-byte sector.
const SECTOR_ENTRIES: usize = 512 / 8;

pub use instar_blockdev::Below;

pub struct Writer<D: BlockDev> {
    img: QedImage<D>,
    /// `bs->backing` is set: no need-check bit, data flushed before its L2 update.
    has_backing: bool,
    written_end: u64,
}

impl<D: BlockDev> Writer<D> {
    pub fn new(img: QedImage<D>, has_backing: bool) -> Self {
        Writer {
            img,
            has_backing,
            written_end: 0,
        }
    }

    /// Where the last write so far ended (0 before any).
    pub fn written_end(&self) -> u64 {
        self.written_end
    }

    /// Run `f` on the image (writes made through it are not tracked).
    pub fn with_image<T>(&mut self, f: impl FnOnce(&mut QedImage<D>) -> T) -> T {
        f(&mut self.img)
    }

    /// The image, with its header as it is in memory now.
    pub fn finish(self) -> QedImage<D> {
        self.img
    }

    /// Whether a request over `[pos, pos + len)` finds only valid tables (what would
    /// make it fail midway in QEMU): reads only.
    pub fn check(&mut self, pos: u64, len: u64) -> Result<(), QedError> {
        let end = pos.checked_add(len).ok_or(QedError::InvalidOffset)?;
        if end > self.img.virtual_size() {
            return Err(QedError::BeyondVirtualSize { offset: pos, len });
        }
        let mut cur = pos;
        while cur < end {
            let (_, n) = self.img.find_cluster(cur, end - cur)?;
            if n == 0 {
                return Err(QedError::InvalidOffset);
            }
            cur += n;
        }
        Ok(())
    }

    fn put(&mut self, offset: u64, data: &[u8]) -> Result<(), QedError> {
        self.img.dev.write_at(offset, data)?;
        self.written_end = self.written_end.max(offset + data.len() as u64);
        Ok(())
    }

    /// A data write (`bdrv_qed_co_writev`).
    pub fn write(
        &mut self,
        pos: u64,
        data: &[u8],
        below: Option<&mut (dyn Below + '_)>,
    ) -> Result<(), QedError> {
        self.request(pos, data.len() as u64, Some(data), below)
    }

    /// `blk_pwrite_zeroes` through the block layer: aligned parts as qed zero
    /// requests, unaligned head and tail as zero data (QEMU's bounce-buffer fallback).
    pub fn write_zeroes(
        &mut self,
        mut pos: u64,
        mut len: u64,
        mut below: Option<&mut (dyn Below + '_)>,
    ) -> Result<(), QedError> {
        let cs = self.img.cluster_size();
        let max_zeroes = (i32::MAX as u64) & !(cs - 1);
        let mut head = pos % cs;
        let tail = (pos + len) % cs;
        while len > 0 {
            let mut num = len;
            if head != 0 {
                num = len.min(MAX_BOUNCE).min(cs - head);
                head = (head + num) % cs;
            } else if tail != 0 && num > cs {
                num -= tail;
            }
            num = num.min(max_zeroes);
            if pos.is_multiple_of(cs) && num.is_multiple_of(cs) {
                self.request(pos, num, None, below.as_deref_mut())?;
            } else {
                num = num.min(MAX_BOUNCE);
                let zeros = vec![0u8; num as usize];
                self.request(pos, num, Some(&zeros), below.as_deref_mut())?;
            }
            pos += num;
            len -= num;
        }
        Ok(())
    }

    /// `qed_aio_next_io` for one write request; `data: None` is a zero request.
    fn request(
        &mut self,
        pos: u64,
        len: u64,
        data: Option<&[u8]>,
        mut below: Option<&mut (dyn Below + '_)>,
    ) -> Result<(), QedError> {
        let end = pos + len;
        let mut cur = pos;
        while cur < end {
            let (state, n) = self.img.find_cluster(cur, end - cur)?;
            if n == 0 {
                return Err(QedError::InvalidOffset);
            }
            let part = data.map(|d| &d[(cur - pos) as usize..(cur - pos + n) as usize]);
            match state {
                ClusterState::Found(at) => {
                    let at = at + self.img.in_cluster(cur);
                    match part {
                        Some(p) => self.put(at, p)?,
                        None => self.put(at, &vec![0u8; n as usize])?,
                    }
                }
                _ => self.allocate(cur, n, state, part, below.as_deref_mut())?,
            }
            cur += n;
        }
        Ok(())
    }

    /// `qed_aio_write_alloc`: new clusters (or the zero marker) for `[cur, cur + n)`.
    fn allocate(
        &mut self,
        cur: u64,
        n: u64,
        state: ClusterState,
        data: Option<&[u8]>,
        below: Option<&mut (dyn Below + '_)>,
    ) -> Result<(), QedError> {
        let cs = self.img.cluster_size();
        let into = self.img.in_cluster(cur);
        let nclusters = self.img.bytes_to_clusters(into + n);
        let cluster = match data {
            None if state == ClusterState::Zero => return Ok(()),
            None => 1,
            Some(_) => {
                let at = self.img.file_size;
                self.img.file_size += nclusters * cs;
                at
            }
        };
        if !self.has_backing && !self.img.header.need_check() {
            self.img.header.features |= F_NEED_CHECK;
            let bytes = self.img.header.to_bytes();
            self.put(0, &bytes)?;
            // Without a backing file nothing orders a new cluster before its L2 entry:
            // the bit must be on the disk first, so that the repair on open clears an
            // entry whose cluster a power loss dropped. (QEMU does not flush here.)
            self.img.dev.flush()?;
        }
        if let Some(d) = data {
            self.write_cow(cur, cluster, d, below)?;
        }
        self.update_l2(cur, state, nclusters, cluster)
    }

    /// `qed_aio_write_cow` and `qed_aio_write_main`: the request's bytes with the rest
    /// of their clusters read from below, at `cluster`.
    fn write_cow(
        &mut self,
        cur: u64,
        cluster: u64,
        data: &[u8],
        below: Option<&mut (dyn Below + '_)>,
    ) -> Result<(), QedError> {
        let cs = self.img.cluster_size();
        let into = self.img.in_cluster(cur);
        let data_end = cur + data.len() as u64;
        let post = data_end.next_multiple_of(cs) - data_end;
        let mut buf = vec![0u8; (into + data.len() as u64 + post) as usize];
        let (pre, rest) = buf.split_at_mut(into as usize);
        let (mid, tail) = rest.split_at_mut(data.len());
        mid.copy_from_slice(data);
        if let Some(b) = below {
            if !pre.is_empty() {
                b.read_below(cur - into, pre)?;
            }
            if !tail.is_empty() {
                b.read_below(data_end, tail)?;
            }
        }
        self.put(cluster, &buf)?;
        if self.has_backing {
            self.img.dev.flush()?;
        }
        Ok(())
    }

    /// `qed_aio_write_l2_update` (and `qed_aio_write_l1_update` for a new table).
    fn update_l2(
        &mut self,
        cur: u64,
        state: ClusterState,
        nclusters: u64,
        cluster: u64,
    ) -> Result<(), QedError> {
        let cs = self.img.cluster_size();
        let index = self.img.l2_index(cur);
        let count = nclusters as usize;
        let new_table = state == ClusterState::UnallocatedL1;
        if new_table {
            let offset = self.img.file_size;
            self.img.file_size += self.img.header.table_bytes();
            let entries = vec![0u64; self.img.header.table_entries() as usize];
            self.img.l2 = Some(CachedL2 {
                offset,
                entries,
                patched: false,
            });
        }
        let table = self.img.l2.as_mut().ok_or(QedError::InvalidOffset)?;
        let slots = table
            .entries
            .get_mut(index..index + count)
            .ok_or(QedError::InvalidOffset)?;
        let mut c = cluster;
        for s in slots {
            *s = c;
            if c > 1 {
                c += cs;
            }
        }
        let offset = table.offset;
        if new_table {
            let bytes = table_bytes(&table.entries, 0, table.entries.len());
            self.put(offset, &bytes)?;
            self.img.dev.flush()?;
            let l1_index = self.img.l1_index(cur);
            let slot = self
                .img
                .l1
                .get_mut(l1_index)
                .ok_or(QedError::InvalidOffset)?;
            *slot = offset;
            self.write_sectors_l1(l1_index)
        } else {
            let (start, end) = sector_range(index, count, table.entries.len());
            let bytes = table_bytes(&table.entries, start, end);
            self.put(offset + start as u64 * 8, &bytes)
        }
    }

    fn write_sectors_l1(&mut self, index: usize) -> Result<(), QedError> {
        let (start, end) = sector_range(index, 1, self.img.l1.len());
        let bytes = table_bytes(&self.img.l1, start, end);
        let at = self.img.header.l1_table_offset + start as u64 * 8;
        self.put(at, &bytes)
    }
}

/// `qed_write_table`'s span: whole 512-byte sectors around `[index, index + n)`.
fn sector_range(index: usize, n: usize, len: usize) -> (usize, usize) {
    let start = index & !(SECTOR_ENTRIES - 1);
    let end = (index + n).next_multiple_of(SECTOR_ENTRIES).min(len);
    (start, end)
}

fn table_bytes(entries: &[u64], start: usize, end: usize) -> Vec<u8> {
    entries[start..end]
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect()
}
