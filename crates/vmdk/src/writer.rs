//! Writes to a monolithicSparse vmdk with the semantics of QEMU's vmdk driver
//! (`vmdk_pwritev`, `get_cluster_offset`, `get_whole_cluster`, `vmdk_L2update`):
//!
//! - a write to an unallocated grain (or a zeroed one) allocates a new grain at the
//!   end of the file (the file length rounded up to a grain, then one grain after
//!   another) and fills the part the write does not cover from the layers below
//!   (zeros for a zeroed grain or without a backing);
//! - the grain table entry is then set in the grain table named by the grain
//!   directory and in the one named by the redundant directory; the directories
//!   themselves never change, because QEMU never allocates grain tables (every table
//!   exists from creation, and a grain without one cannot be written);
//! - write-zeroes of a whole grain sets the zeroed-grain entry when the image has
//!   the zeroed-grain flag; everything else is written as zero data (QEMU's
//!   `-ENOTSUP` fallback).
//!
//! One difference in order: a request's grains are written first, then a flush, then
//! its table entries (both copies), then a flush, where QEMU flushes after each grain.
//! A stop in between leaves at most unreferenced space at the end of the file, and so
//! does a power loss that keeps any subset of the writes issued after a flush: the
//! grains an entry names are on the disk before the entry is written
//! (docs/crash-safety.md).

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use instar_blockdev::bytes::{le32, le32_table};
use instar_blockdev::{BlockDev, IoError};

use crate::descriptor::{DESC_OFFSET, DESC_SIZE};
use crate::image::{SparseHeader, VmdkError, VmdkImage, FLAG_RGD, GTE_ZEROED};
use crate::layout::{self, LayoutError};

/// QEMU's `VMDK_EXTENT_MAX_SECTORS`: a grain must start below 2^32 sectors.
pub const MAX_SECTORS: u64 = 1 << 32;
/// Largest grain written (each new grain is assembled in memory); QEMU and VMware
/// make 64 KiB grains.
pub const MAX_WRITE_GRAIN: u64 = 2 << 20;
/// Grain tables kept in memory between requests (requests come in ascending order).
const GT_CACHE: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Vmdk(#[from] VmdkError),
    #[error("instar rebases only monolithicSparse vmdk images, not streamOptimized ones")]
    StreamOptimized,
    #[error("VMDK version 3 must be read only")]
    Version3,
    #[error(
        "the descriptor area (sector 1, 20 sectors) overlaps the image's tables \
         (descriptor at sector {desc_offset}, {desc_size} sectors)"
    )]
    DescriptorArea { desc_offset: u64, desc_size: u64 },
    #[error(
        "{what} at sector {sector} lies in the header or descriptor area (sectors 0 to 20), \
         which the rebase rewrites"
    )]
    OverDescriptor { what: &'static str, sector: u64 },
    #[error("grains of {0} bytes are too large to write (at most {MAX_WRITE_GRAIN})")]
    GrainTooLarge(u64),
    #[error("no grain table for guest offset {0:#x}: QEMU cannot write there either")]
    NoGrainTable(u64),
    #[error("grain table at {0:#x} lies outside the image file or over its header")]
    BadGrainTable(u64),
    #[error("the image file would grow past the 2^32 sectors a grain table can address")]
    Full,
    /// A grain table overlaps another structure or a grain ([`crate::layout`]).
    #[error("{0}")]
    Overlap(layout::Overlap),
    #[error("write of {len:#x} bytes at {offset:#x} goes past the virtual size")]
    BeyondVirtualSize { offset: u64, len: u64 },
    #[error("error while reading the layers below: {0}")]
    Below(IoError),
    #[error(transparent)]
    Io(#[from] IoError),
}

impl From<LayoutError> for WriteError {
    fn from(e: LayoutError) -> Self {
        match e {
            LayoutError::Overlap(o) => WriteError::Overlap(o),
            LayoutError::Io(e) => WriteError::Io(e),
        }
    }
}

/// The content under the overlay, for the part of a new grain a write leaves out.
pub trait Below {
    /// Fill `buf` with the guest content at `guest_offset` (zeros where the layers
    /// below end). The range lies inside the overlay's virtual size.
    fn read_below(&mut self, guest_offset: u64, buf: &mut [u8]) -> Result<(), IoError>;
}

/// Checks that a read-write open by QEMU, and a rewrite of the descriptor the way
/// `vmdk_write_cid` makes it (20 sectors at byte 512), would pass.
pub fn check_rewritable(header: &SparseHeader, compressed: bool) -> Result<(), WriteError> {
    if compressed {
        return Err(WriteError::StreamOptimized);
    }
    if header.version == 3 {
        return Err(WriteError::Version3);
    }
    let desc_end = (DESC_OFFSET + DESC_SIZE as u64) / 512;
    let rgd_used = header.flags & FLAG_RGD != 0 && header.rgd_offset != 0;
    if header.desc_offset != DESC_OFFSET / 512
        || header.desc_size < desc_end - 1
        || header.gd_offset < desc_end
        || header.grain_offset < desc_end
        || (rgd_used && header.rgd_offset < desc_end)
    {
        return Err(WriteError::DescriptorArea {
            desc_offset: header.desc_offset,
            desc_size: header.desc_size,
        });
    }
    Ok(())
}

/// Every grain table the grain directory names, and every grain those tables name,
/// must lie past the descriptor area: rewriting the descriptor would otherwise change
/// a grain's data or a table. Reads each distinct grain table once.
pub fn check_clear_of_descriptor<D: BlockDev>(img: &mut VmdkImage<D>) -> Result<(), WriteError> {
    let desc_end = (DESC_OFFSET + DESC_SIZE as u64) / 512;
    let zero_grain = img.has_zero_grain();
    let gt_len = img.header().num_gtes_per_gt as usize * 4;
    let mut tables: Vec<u32> = img
        .grain_directory()
        .iter()
        .copied()
        .filter(|&g| g != 0)
        .collect();
    tables.sort_unstable();
    tables.dedup();
    let mut raw = vec![0u8; gt_len];
    for gt in tables {
        let sector = u64::from(gt);
        if sector < desc_end {
            return Err(WriteError::OverDescriptor {
                what: "a grain table",
                sector,
            });
        }
        // Entries past the end of the file read as unallocated, as QEMU's reads do.
        img.dev_mut().read_zero_padded(sector * 512, &mut raw)?;
        for e in raw.chunks_exact(4).map(|c| le32(c, 0).unwrap_or(0)) {
            let unused = e == 0 || (e == GTE_ZEROED && zero_grain);
            if !unused && u64::from(e) < desc_end {
                return Err(WriteError::OverDescriptor {
                    what: "a grain",
                    sector: u64::from(e),
                });
            }
        }
    }
    Ok(())
}

/// A monolithicSparse vmdk opened for writing.
pub struct SparseWriter<D> {
    dev: D,
    header: SparseHeader,
    capacity: u64,
    grain: u64,
    gt_sectors: u64,
    gd: Vec<u32>,
    /// The redundant grain directory, when the header enables one.
    rgd: Option<Vec<u32>>,
    zero_grain: bool,
    next_sector: u64,
    gts: BTreeMap<u64, Vec<u8>>,
    /// Grains that [`SparseWriter::check`] found would be allocated.
    reserved: u64,
    written_end: u64,
}

impl<D: BlockDev> SparseWriter<D> {
    /// Open and validate (as [`VmdkImage::open`] plus [`check_rewritable`]).
    pub fn open(dev: D) -> Result<Self, WriteError> {
        let img = VmdkImage::open(dev)?;
        check_rewritable(img.header(), img.is_compressed())?;
        let header = *img.header();
        if img.grain_size() > MAX_WRITE_GRAIN {
            return Err(WriteError::GrainTooLarge(img.grain_size()));
        }
        let gd = img.grain_directory().to_vec();
        let zero_grain = img.has_zero_grain();
        let capacity = img.virtual_size();
        let grain = img.grain_size();
        let mut dev = img.into_inner();
        let rgd = if header.flags & FLAG_RGD != 0 && header.rgd_offset != 0 {
            let len = gd.len() as u64 * 4;
            let off = header.rgd_offset.checked_mul(512);
            let off = off
                .filter(|o| o.checked_add(len).is_some_and(|e| e <= dev.size()))
                .ok_or(VmdkError::OutsideImage {
                    what: "redundant grain directory",
                    offset: header.rgd_offset,
                    len,
                })?;
            let mut raw = vec![0u8; len as usize];
            dev.read_at(off, &mut raw)?;
            Some(le32_table(&raw))
        } else {
            None
        };
        // Grain table entries are written in place: no table may overlap anything.
        layout::check(&mut dev, &header, &gd, rgd.as_deref(), grain)?;
        let gt_sectors = u64::from(header.num_gtes_per_gt) * header.granularity;
        // vmdk_add_extent: the file length in sectors, rounded up to a grain.
        let next_sector = dev
            .size()
            .div_ceil(512)
            .next_multiple_of(header.granularity);
        Ok(SparseWriter {
            dev,
            header,
            capacity,
            grain,
            gt_sectors,
            gd,
            rgd,
            zero_grain,
            next_sector,
            gts: BTreeMap::new(),
            reserved: 0,
            written_end: 0,
        })
    }

    pub fn grain_size(&self) -> u64 {
        self.grain
    }
    pub fn virtual_size(&self) -> u64 {
        self.capacity
    }
    pub fn dev_mut(&mut self) -> &mut D {
        &mut self.dev
    }
    /// Where the last write ended (0 before any).
    pub fn written_end(&self) -> u64 {
        self.written_end
    }

    fn in_range(&self, offset: u64, len: u64) -> Result<u64, WriteError> {
        offset
            .checked_add(len)
            .filter(|&e| e <= self.capacity)
            .ok_or(WriteError::BeyondVirtualSize { offset, len })
    }

    /// Byte position of the grain table for `offset` in `dir`, and the entry's index.
    fn locate(&self, backup: bool, offset: u64) -> Result<Option<(u64, usize)>, WriteError> {
        let dir = match (backup, &self.rgd) {
            (false, _) => &self.gd,
            (true, Some(r)) => r,
            (true, None) => return Ok(None),
        };
        let sector = offset >> 9;
        let l1 =
            usize::try_from(sector / self.gt_sectors).map_err(|_| VmdkError::NoGdEntry(offset))?;
        let gt = *dir.get(l1).ok_or(VmdkError::NoGdEntry(offset))?;
        if gt == 0 {
            return Err(WriteError::NoGrainTable(offset));
        }
        let gt_off = u64::from(gt) * 512;
        let gt_len = u64::from(self.header.num_gtes_per_gt) * 4;
        if gt_off < DESC_OFFSET + DESC_SIZE as u64 || gt_off + gt_len > self.dev.size() {
            return Err(WriteError::BadGrainTable(gt_off));
        }
        let index = (sector / self.header.granularity) % u64::from(self.header.num_gtes_per_gt);
        Ok(Some((gt_off, index as usize)))
    }

    fn table(&mut self, gt_off: u64) -> Result<&mut Vec<u8>, WriteError> {
        if !self.gts.contains_key(&gt_off) {
            if self.gts.len() >= GT_CACHE {
                // Clean between requests: nothing to write back.
                self.gts.clear();
            }
            let mut raw = vec![0u8; self.header.num_gtes_per_gt as usize * 4];
            self.dev.read_at(gt_off, &mut raw)?;
            self.gts.insert(gt_off, raw);
        }
        self.gts
            .get_mut(&gt_off)
            .ok_or(WriteError::BadGrainTable(gt_off))
    }

    /// The grain table entry (primary tables) for `offset`.
    fn gte(&mut self, offset: u64) -> Result<u32, WriteError> {
        let (gt_off, index) = self
            .locate(false, offset)?
            .ok_or(WriteError::NoGrainTable(offset))?;
        le32(self.table(gt_off)?, index * 4).ok_or(WriteError::BadGrainTable(gt_off))
    }

    fn needs_allocation(&self, gte: u32) -> bool {
        gte == 0 || (gte == GTE_ZEROED && self.zero_grain)
    }

    fn is_whole_grain(&self, offset: u64, end: u64) -> bool {
        offset.is_multiple_of(self.grain) && end - offset >= self.grain
    }

    /// Validate a future write (`zero`: write-zeroes) without writing anything:
    /// range, grain tables in both directories, and room for the new grains.
    /// Call it for every request of a batch before the first write.
    pub fn check(&mut self, offset: u64, len: u64, zero: bool) -> Result<(), WriteError> {
        let end = self.in_range(offset, len)?;
        let mut pos = offset;
        while pos < end {
            let g_start = pos - pos % self.grain;
            let n = (g_start + self.grain).min(end) - pos;
            self.locate(true, pos)?;
            let gte = self.gte(pos)?;
            let zeroed_entry = zero && self.zero_grain && self.is_whole_grain(pos, end);
            if !zeroed_entry && self.needs_allocation(gte) {
                let start = self.next_sector + self.reserved * self.header.granularity;
                if start >= MAX_SECTORS {
                    return Err(WriteError::Full);
                }
                self.reserved += 1;
            }
            pos += n;
        }
        Ok(())
    }

    fn allocate(&mut self) -> Result<u32, WriteError> {
        let s = self.next_sector;
        if s >= MAX_SECTORS {
            return Err(WriteError::Full);
        }
        self.next_sector += self.header.granularity;
        Ok(s as u32)
    }

    /// Write guest data at `offset`.
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        mut below: Option<&mut (dyn Below + '_)>,
    ) -> Result<(), WriteError> {
        let end = self.in_range(offset, data.len() as u64)?;
        let grain = self.grain as usize;
        // One contiguous host write at a time: (host offset, bytes).
        let mut run: (u64, Vec<u8>) = (0, Vec::new());
        let mut updates: Vec<(u64, u32)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let g_start = pos - pos % self.grain;
            let in_g = (pos - g_start) as usize;
            let n = ((g_start + self.grain).min(end) - pos) as usize;
            let src = &data[(pos - offset) as usize..][..n];
            let gte = self.gte(pos)?;
            let (host, bytes): (u64, &[u8]);
            let fresh;
            if self.needs_allocation(gte) {
                let s = self.allocate()?;
                let mut whole = vec![0u8; grain];
                let from_below = gte == 0 && n < grain;
                if let (true, Some(b)) = (from_below, below.as_deref_mut()) {
                    let avail = (self.capacity - g_start).min(self.grain) as usize;
                    b.read_below(g_start, &mut whole[..avail])
                        .map_err(WriteError::Below)?;
                }
                whole[in_g..in_g + n].copy_from_slice(src);
                updates.push((pos, s));
                host = u64::from(s) * 512;
                fresh = whole;
                bytes = &fresh;
            } else {
                host = u64::from(gte) * 512 + in_g as u64;
                bytes = src;
            }
            if run.1.is_empty() || run.0 + run.1.len() as u64 != host {
                self.put(&run)?;
                run = (host, Vec::with_capacity(bytes.len()));
            }
            run.1.extend_from_slice(bytes);
            pos += n as u64;
        }
        self.put(&run)?;
        self.set_entries(&updates)
    }

    /// Write zeroes over `[offset, offset + len)`.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        mut below: Option<&mut (dyn Below + '_)>,
    ) -> Result<(), WriteError> {
        let end = self.in_range(offset, len)?;
        let mut pos = offset;
        let mut updates = Vec::new();
        while pos < end {
            let g_start = pos - pos % self.grain;
            let n = (g_start + self.grain).min(end) - pos;
            if self.zero_grain && self.is_whole_grain(pos, end) {
                if self.gte(pos)? != GTE_ZEROED {
                    updates.push((pos, GTE_ZEROED));
                }
            } else {
                let zeros = vec![0u8; n as usize];
                self.write(pos, &zeros, below.as_deref_mut())?;
            }
            pos += n;
        }
        self.set_entries(&updates)
    }

    fn put(&mut self, (host, bytes): &(u64, Vec<u8>)) -> Result<(), WriteError> {
        if !bytes.is_empty() {
            self.dev.write_at(*host, bytes)?;
            self.written_end = self.written_end.max(host + bytes.len() as u64);
        }
        Ok(())
    }

    /// `vmdk_L2update` for each `(guest offset, entry)`: a flush (the new grains the
    /// entries point to are durable before any entry names them, so a power loss can
    /// not leave an entry pointing at a grain that never reached the disk), the primary
    /// table, then the redundant one, each written back in whole sectors; then a flush.
    fn set_entries(&mut self, updates: &[(u64, u32)]) -> Result<(), WriteError> {
        if updates.is_empty() {
            return Ok(());
        }
        self.dev.flush()?;
        for backup in [false, true] {
            // Updates come in ascending order: one table at a time, written back
            // before the next is loaded (the cache may drop clean tables).
            let mut cur: Option<(u64, usize, usize)> = None;
            for &(pos, value) in updates {
                let Some((gt_off, index)) = self.locate(backup, pos)? else {
                    continue;
                };
                match cur {
                    Some((t, lo, hi)) if t == gt_off => {
                        cur = Some((t, lo.min(index), hi.max(index)))
                    }
                    _ => {
                        if let Some(c) = cur {
                            self.write_back(c)?;
                        }
                        cur = Some((gt_off, index, index));
                    }
                }
                self.table(gt_off)?[index * 4..index * 4 + 4].copy_from_slice(&value.to_le_bytes());
            }
            if let Some(c) = cur {
                self.write_back(c)?;
            }
        }
        self.dev.flush()?;
        Ok(())
    }

    /// Write entries `lo..=hi` of the cached table at `gt_off`, in whole sectors.
    fn write_back(&mut self, (gt_off, lo, hi): (u64, usize, usize)) -> Result<(), WriteError> {
        let a = lo * 4 / 512 * 512;
        let b = (hi * 4 + 4)
            .next_multiple_of(512)
            .min(self.header.num_gtes_per_gt as usize * 4);
        let span = self.table(gt_off)?[a..b].to_vec();
        self.put(&(gt_off + a as u64, span))
    }

    /// Write the descriptor block (from [`crate::Descriptor::with_parent`]) at byte
    /// 512, as `vmdk_write_cid` does, and flush.
    pub fn write_descriptor(&mut self, block: &[u8]) -> Result<(), WriteError> {
        write_descriptor(&mut self.dev, block)
    }

    /// Flush and hand the device back with the end of the last write.
    pub fn finish(mut self) -> Result<(D, u64), WriteError> {
        self.dev.flush()?;
        Ok((self.dev, self.written_end))
    }
}

/// Write a descriptor block at byte 512 and flush.
pub fn write_descriptor<D: BlockDev + ?Sized>(dev: &mut D, block: &[u8]) -> Result<(), WriteError> {
    dev.write_at(DESC_OFFSET, block)?;
    dev.flush()?;
    Ok(())
}
