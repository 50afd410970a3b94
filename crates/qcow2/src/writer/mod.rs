//! Applying guest writes and write-zeroes requests to an existing qcow2 image, producing
//! the same file bytes, file length and holes as QEMU's qcow2 driver (10.2) does for the
//! same requests in the same order.
//!
//! This is the write half of a safe-mode rebase: the rebase issues data writes and
//! write-zeroes requests (no unmap) in guest order, [`Writer`] turns each into the
//! cluster allocations, L2/L1 updates and refcount changes QEMU would make.
//!
//! # Layout rules reproduced
//!
//! - Allocation is first fit from a free-cluster cursor that starts at cluster 0 when the
//!   image is opened, only moves forward while scanning and drops back when a refcount
//!   reaches 0 (QEMU's `free_cluster_index`).
//! - A missing (or snapshot-shared) L2 table is allocated, or copied, before the data of
//!   the request that needs it; one host-contiguous data run per chunk, extended in place
//!   over COPIED clusters and continued at the next host cluster when it is free.
//! - Refcount blocks are created self-describing where the scan puts them, the refcount
//!   table grows by QEMU's generous rule, and the old table is freed.
//! - Shared clusters (internal snapshots) are copied on write; the old cluster or table
//!   is decremented after the new reference is in place.
//! - Compressed writes ([`Writer::write_compressed`], `rebase -c`) pack clusters one
//!   after another into host clusters (`compressed.rs`); a cluster that does not shrink
//!   takes the ordinary path.
//!
//! # Order of writes (crash consistency)
//!
//! Stopping after any single device write leaves an image that reads the same as before
//! the request in flight, or after it; at worst clusters leak (refcount too high). The
//! order per request is:
//!
//! 1. A new L2 table: its refcount (refblock write, flush), the table contents (flush),
//!    then the 8-byte L1 entry (flush). A copied L2 table is decremented only afterwards.
//! 2. A new refcount block: dirty L2 slices are written first (flush), then the block
//!    (flush), then its 8-byte reftable entry (flush). Reftable growth writes the new
//!    blocks (flush), the new table (flush), then header bytes 48..60 (flush), and only
//!    then frees the old table.
//! 3. Guest data (and copy-on-write padding) is written into clusters whose refcounts
//!    are raised in the refcount cache but not yet referenced by any L2 entry.
//! 4. L2 entries are updated in the L2 cache. Before any L2 slice reaches the device the
//!    device is flushed (data durable) and, when refcounts were raised, the dirty
//!    refcount blocks are written and flushed first.
//! 5. Refcount decreases (old clusters of a copy-on-write, discards) are written only
//!    after the L2 slices that dropped the reference.
//! 6. [`Writer::finish`] writes the L2 cache, then the refcount cache, then flushes.
//!
//! With lazy refcounts the dirty bit is set in the header (8 bytes at offset 72, flushed)
//! before the first L2 update and refcount blocks may lag behind L2 tables, exactly as in
//! QEMU; [`Writer::finish`] clears the bit again (see [`Finish`]).
//!
//! Flush placement never changes the final bytes: caches only hold content that is
//! eventually written in full, so the set of written ranges equals QEMU's.
//!
//! # What is recorded
//!
//! Every device operation is logged as an [`IoOp`]. Ranges QEMU would zero with
//! `fallocate(FALLOC_FL_ZERO_RANGE)` (copy-on-write padding that reads as zero) are
//! written as zeros to the device and logged as [`IoOp::ZeroRange`], so a host that wants
//! QEMU's exact extent map can replay them as zero-range requests.

mod alloc_path;
mod cache;
mod compressed;
mod external;
mod record;
mod refcount;
mod shadow;
mod table;
mod zero;

pub use record::{WriteKind, WriteRecord};
pub use shadow::ShadowDev;

use alloc::vec;
use alloc::vec::Vec;

use instar_blockdev::bytes::be64_table;
use instar_blockdev::{BlockDev, IoError};

use crate::compress::CompressionType;
use crate::crypt::DataCrypt;
use crate::geometry::{Geometry, MAX_REFTABLE_BYTES};
use crate::header::{Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY};

use cache::TableCache;

/// Why a write could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("device I/O failed: {0}")]
    Io(#[from] IoError),
    #[error("corrupt image: {what} (offset {offset:#x})")]
    Corrupt { what: &'static str, offset: u64 },
    #[error("unsupported image: {0}")]
    Unsupported(&'static str),
    #[error("request {offset:#x}+{len:#x} is outside the virtual disk or misaligned")]
    BadRequest { offset: u64, len: u64 },
    #[error("refcount of cluster {0:#x} would overflow")]
    RefcountOverflow(u64),
    #[error("image would exceed the maximum qcow2 size")]
    TooBig,
    #[error("the compressor failed")]
    CompressFailed,
    #[error("compressed write into allocated cluster at guest offset {0:#x}")]
    CompressedOverwrite(u64),
}

pub(crate) fn corrupt(what: &'static str, offset: u64) -> WriteError {
    WriteError::Corrupt { what, offset }
}

/// One device operation, in issue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Bytes written with a plain write.
    Write { offset: u64, len: u64 },
    /// Bytes QEMU zeroes with `fallocate(ZERO_RANGE)`; written as zeros to the device.
    ZeroRange { offset: u64, len: u64 },
    /// A flush barrier (QEMU's `fdatasync`).
    Flush,
}

/// Source of guest data below this image, for copy-on-write padding of partial clusters
/// whose rest is unallocated here (the trait the vmdk and qed writers use too).
pub use instar_blockdev::Below;

/// Backing content for an image whose backing reads as zeros (or that has none).
#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroBacking;

impl Below for ZeroBacking {
    fn read_below(&mut self, _guest_offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        buf.fill(0);
        Ok(())
    }
}

/// What [`Writer::finish`] leaves for the header rewrite that ends a rebase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    /// `incompatible_features` as QEMU holds it when it closes the image: the value the
    /// header rebuild must write. The dirty bit is cleared (QEMU's `qcow2_mark_clean`).
    pub incompatible_features: u64,
    /// The refcount table moved (header bytes 48..60 already rewritten on the device).
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    /// The session set the dirty bit (lazy refcounts): QEMU rewrites the whole header
    /// cluster at close (`qcow2_update_header`); this writer only cleared the bit in
    /// place, so the caller's header rebuild is what makes cluster 0 identical.
    pub header_rewrite_needed: bool,
}

/// Largest request QEMU's block layer hands to a driver (`BDRV_REQUEST_MAX_BYTES`).
const REQUEST_MAX_BYTES: u64 = (1 << 31) - 512;
/// Bounce buffer of the write-zeroes fallback (`MAX_BOUNCE_BUFFER`).
const MAX_BOUNCE_BUFFER: u64 = 16 << 20;
/// Offset of `incompatible_features` in the header.
const HDR_INCOMPAT_OFFSET: u64 = 72;
/// Offset of `refcount_table_offset` (BE64) + `refcount_table_clusters` (BE32).
const HDR_REFTABLE_OFFSET: u64 = 48;
/// Highest host offset QEMU allocates (`QCOW_MAX_CLUSTER_OFFSET`).
const MAX_CLUSTER_OFFSET: u64 = (1 << 56) - 1;
/// Largest reftable QEMU accepts, in entries (`QCOW_MAX_REFTABLE_SIZE` / 8).
const MAX_REFTABLE_ENTRIES: u64 = MAX_REFTABLE_BYTES / 8;

/// Applies QEMU-identical writes to a qcow2 image on `D`.
pub struct Writer<D: BlockDev, B: Below = ZeroBacking> {
    dev: D,
    backing: B,
    has_backing: bool,

    /// Cluster, L2 and refcount sizes; `virtual_size` is `bs->total_sectors * 512`.
    geometry: Geometry,
    version: u32,
    lazy_refcounts: bool,
    incompat: u64,
    incompat_at_open: u64,

    l1_offset: u64,
    l1: Vec<u64>,

    rt_offset: u64,
    rt: Vec<u64>,
    max_rt_index: Option<usize>,

    /// QEMU's `free_cluster_index`.
    fci: u64,
    /// The image's compression type, for compressed writes.
    compression: CompressionType,
    /// QEMU's `free_byte_offset`: where the next compressed cluster may be packed
    /// (0: start a new host cluster).
    free_byte_offset: u64,

    l2_cache: TableCache,
    rb_cache: TableCache,

    log: Vec<IoOp>,
    /// A dry run: data writes are recorded but never reach the device.
    dry_run: bool,
    /// The image's data clusters are encrypted; `crypt` is its unlocked cipher (a dry
    /// run may go without: its data never reaches the device).
    encrypted: bool,
    crypt: Option<DataCrypt>,
    /// What a recording session wrote, took and freed (see [`Writer::recording`]).
    record: Option<WriteRecord>,
    /// Opened with [`Writer::open_for_metadata`]: guest requests are refused.
    metadata_only: bool,
}

impl<D: BlockDev> Writer<D, ZeroBacking> {
    /// Open for writing. `has_backing` is whether QEMU would have the image's backing file
    /// open: it changes how v2 images handle write-zeroes. Copy-on-write padding over
    /// unallocated parts reads as zeros; use [`Writer::open_with_backing`] to supply the
    /// backing content.
    pub fn open(dev: D, header: &Header, has_backing: bool) -> Result<Self, WriteError> {
        Self::open_inner(dev, header, ZeroBacking, has_backing)
    }

    /// Open for metadata that lives in the image file itself (the persistent bitmaps),
    /// also when guest data lives in an external data file: no guest write may follow.
    pub fn open_for_metadata(dev: D, header: &Header) -> Result<Self, WriteError> {
        let mut h = header.clone();
        h.data_file = None;
        h.incompatible_features &= !INCOMPAT_DATA_FILE;
        let mut w = Self::open_inner(dev, &h, ZeroBacking, false)?;
        // The header the session writes keeps the image's own features.
        w.incompat = header.incompatible_features;
        w.incompat_at_open = header.incompatible_features;
        w.metadata_only = true;
        Ok(w)
    }
}

impl<D: BlockDev, B: Below> Writer<D, B> {
    /// Open with a backing chain that supplies copy-on-write padding.
    pub fn open_with_backing(dev: D, header: &Header, backing: B) -> Result<Self, WriteError> {
        Self::open_inner(dev, header, backing, true)
    }

    fn open_inner(
        mut dev: D,
        h: &Header,
        backing: B,
        has_backing: bool,
    ) -> Result<Self, WriteError> {
        // Header::read checked the geometry and the tables' sizes and alignment; what
        // is left are the images this writer does not handle.
        if h.data_file.is_some() || h.has_data_file() {
            return Err(WriteError::Unsupported("external data file"));
        }
        if h.corrupt() {
            return Err(corrupt("image is marked corrupt", 0));
        }
        if h.dirty() {
            // QEMU repairs refcounts before writing to a dirty image.
            return Err(WriteError::Unsupported(
                "dirty image (needs a refcount repair)",
            ));
        }
        let geometry = *h.geometry();
        let cs = geometry.cluster_size();

        // L1 table.
        let l1_offset = h.l1_table_offset;
        if h.l1_size > 0 && l1_offset == 0 {
            return Err(corrupt("L1 table offset", l1_offset));
        }
        let mut raw = vec![0u8; h.l1_size as usize * 8];
        if !raw.is_empty() {
            dev.read_at(l1_offset, &mut raw)?;
        }
        let l1 = be64_table(&raw);

        // Refcount table.
        let rt_offset = h.refcount_table_offset;
        if rt_offset == 0 {
            return Err(corrupt("refcount table offset", rt_offset));
        }
        let mut raw = vec![0u8; (u64::from(h.refcount_table_clusters) * cs) as usize];
        dev.read_at(rt_offset, &mut raw)?;
        let rt = be64_table(&raw);
        let max_rt_index = rt.iter().rposition(|&e| e != 0);

        Ok(Writer {
            dev,
            backing,
            has_backing,
            geometry,
            version: h.version,
            lazy_refcounts: h.version >= 3 && h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
            incompat: h.incompatible_features,
            incompat_at_open: h.incompatible_features,
            l1_offset,
            l1,
            rt_offset,
            rt,
            max_rt_index,
            fci: 0,
            compression: CompressionType::from_header(h.compression_type)
                .ok_or(WriteError::Unsupported("unknown compression type"))?,
            free_byte_offset: 0,
            l2_cache: TableCache::new(geometry.l2_slice_bytes() as usize),
            rb_cache: TableCache::new(cs as usize),
            log: Vec::new(),
            dry_run: false,
            encrypted: h.crypt_method != 0,
            crypt: None,
            record: None,
            metadata_only: false,
        })
    }

    /// Write guest data at `guest_offset` (QEMU's `qcow2_co_pwritev_part`).
    pub fn write(&mut self, guest_offset: u64, data: &[u8]) -> Result<(), WriteError> {
        self.check_request(guest_offset, data.len() as u64)?;
        let mut done = 0usize;
        while done < data.len() {
            // One driver call covers at most INT_MAX bytes.
            let n = (data.len() - done).min(i32::MAX as usize);
            self.pwritev(guest_offset + done as u64, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Write zeros over `[guest_offset, guest_offset + len)` without unmapping
    /// (`blk_pwrite_zeroes(…, 0)`). The range must be (sub)cluster aligned, except that it
    /// may end at the end of the virtual disk.
    pub fn write_zeroes(&mut self, guest_offset: u64, len: u64) -> Result<(), WriteError> {
        self.check_request(guest_offset, len)?;
        let align = 1u64 << self.geometry.subcluster_bits();
        let end = guest_offset + len;
        if !guest_offset.is_multiple_of(align)
            || (!end.is_multiple_of(align) && end != self.geometry.virtual_size())
        {
            return Err(WriteError::BadRequest {
                offset: guest_offset,
                len,
            });
        }
        self.pwrite_zeroes(guest_offset, len)
    }

    /// Write back every cache in QEMU's close order (L2 tables, then refcount blocks, then
    /// a flush) and clear the lazy-refcounts dirty bit. Returns the device and what the
    /// final header rewrite needs.
    pub fn finish(self) -> Result<(D, Finish), WriteError> {
        self.finish_inner(&mut WriteRecord::default())
    }

    fn finish_inner(mut self, record_out: &mut WriteRecord) -> Result<(D, Finish), WriteError> {
        self.cache_flush(cache::Which::L2)?;
        self.cache_flush(cache::Which::Refcount)?;
        let dirty_set =
            self.incompat & INCOMPAT_DIRTY != 0 && self.incompat_at_open & INCOMPAT_DIRTY == 0;
        if dirty_set {
            self.incompat &= !INCOMPAT_DIRTY;
            let v = self.incompat.to_be_bytes();
            self.dev_write(HDR_INCOMPAT_OFFSET, &v, WriteKind::Header)?;
            self.dev_flush()?;
        }
        let fin = Finish {
            incompatible_features: self.incompat,
            refcount_table_offset: self.rt_offset,
            refcount_table_clusters: ((self.rt.len() as u64 * 8) >> self.geometry.cluster_bits())
                as u32,
            header_rewrite_needed: dirty_set,
        };
        if let Some(r) = self.record.take() {
            *record_out = r;
        }
        Ok((self.dev, fin))
    }

    /// Encrypt data clusters with `crypt` (an encrypted image opened with its key).
    pub fn with_crypt(mut self, crypt: Option<DataCrypt>) -> Self {
        self.crypt = crypt;
        self
    }

    /// Record every write (with what it holds), every cluster taken by the allocator
    /// and every cluster freed, for [`crate::overlap`]. With `dry_run`, guest data
    /// (and copy-on-write padding) is only recorded, never written: pair it with a
    /// [`ShadowDev`] so metadata writes stay in memory too.
    pub fn recording(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self.record = Some(WriteRecord::default());
        self
    }

    /// [`Writer::finish`], also handing back the record of a recording session.
    pub fn finish_recorded(self) -> Result<(D, Finish, WriteRecord), WriteError> {
        let mut record = WriteRecord::default();
        let (dev, fin) = self.finish_inner(&mut record)?;
        Ok((dev, fin, record))
    }

    /// Every device operation so far, in order.
    pub fn io_log(&self) -> &[IoOp] {
        &self.log
    }

    /// Current L1 table (entries as on disk).
    pub fn l1_table(&self) -> &[u64] {
        &self.l1
    }

    /// The device, for reads between requests.
    pub fn device(&mut self) -> &mut D {
        &mut self.dev
    }

    fn check_request(&self, offset: u64, len: u64) -> Result<(), WriteError> {
        if self.metadata_only {
            return Err(WriteError::Unsupported(
                "guest writes to a metadata-only session",
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.geometry.virtual_size() => Ok(()),
            _ => Err(WriteError::BadRequest { offset, len }),
        }
    }

    // ---- device access, logged ----

    fn dev_write(&mut self, offset: u64, buf: &[u8], kind: WriteKind) -> Result<(), WriteError> {
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(r) = self.record.as_mut() {
            r.note_write(offset, buf.len() as u64, kind);
        }
        if !(self.dry_run && kind.is_bulk()) {
            self.dev.write_at(offset, buf)?;
        }
        self.log.push(IoOp::Write {
            offset,
            len: buf.len() as u64,
        });
        Ok(())
    }

    fn dev_zero_range(&mut self, offset: u64, len: u64) -> Result<(), WriteError> {
        if len == 0 {
            return Ok(());
        }
        if let Some(r) = self.record.as_mut() {
            r.note_write(offset, len, WriteKind::Data);
        }
        if !self.dry_run {
            let zeros = vec![0u8; len as usize];
            self.dev.write_at(offset, &zeros)?;
        }
        self.log.push(IoOp::ZeroRange { offset, len });
        Ok(())
    }

    fn dev_flush(&mut self) -> Result<(), WriteError> {
        self.dev.flush()?;
        self.log.push(IoOp::Flush);
        Ok(())
    }

    /// `bdrv_pwrite_sync`.
    fn dev_write_sync(
        &mut self,
        offset: u64,
        buf: &[u8],
        kind: WriteKind,
    ) -> Result<(), WriteError> {
        self.dev_write(offset, buf, kind)?;
        self.dev_flush()
    }

    fn offset_into_cluster(&self, off: u64) -> u64 {
        off & (self.geometry.cluster_size() - 1)
    }

    fn size_to_clusters(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.geometry.cluster_size())
    }

    /// Lazy refcounts: set the dirty bit before the first L2 update (`qcow2_mark_dirty`).
    fn mark_dirty(&mut self) -> Result<(), WriteError> {
        if self.incompat & INCOMPAT_DIRTY != 0 {
            return Ok(());
        }
        let v = (self.incompat | INCOMPAT_DIRTY).to_be_bytes();
        self.dev_write_sync(HDR_INCOMPAT_OFFSET, &v, WriteKind::Header)?;
        self.incompat |= INCOMPAT_DIRTY;
        Ok(())
    }

    /// The allocator raised cluster `c`'s refcount from 0.
    fn note_taken(&mut self, c: u64) {
        if let Some(r) = self.record.as_mut() {
            r.note_taken(c);
        }
    }

    /// Cluster `c`'s refcount dropped to 0.
    fn note_freed(&mut self, c: u64) {
        if let Some(r) = self.record.as_mut() {
            r.note_freed(c);
        }
    }

    fn need_accurate_refcounts(&self) -> bool {
        self.incompat & INCOMPAT_DIRTY == 0
    }
}
