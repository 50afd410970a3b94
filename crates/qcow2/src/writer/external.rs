//! Metadata other code of this crate stores through the writer's allocator and
//! caches, in QEMU's order (the persistent bitmaps, `crate::bitmaps`): clusters taken
//! with `qcow2_alloc_clusters`, written, freed with `qcow2_free_clusters`.

use instar_blockdev::BlockDev;

use super::cache::Which;
use super::{Below, WriteError, WriteKind, Writer};

/// Header fields the writer's session may have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeaderFields {
    pub incompatible_features: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
}

impl<D: BlockDev, B: Below> Writer<D, B> {
    /// `qcow2_alloc_clusters` for `bytes` bytes: the byte offset of the first cluster.
    pub(crate) fn alloc_bytes(&mut self, bytes: u64) -> Result<u64, WriteError> {
        let n = self.size_to_clusters(bytes);
        Ok(self.alloc_clusters(n)? << self.geometry.cluster_bits())
    }

    /// `qcow2_free_clusters` of the clusters under `[offset, offset + bytes)`.
    pub(crate) fn free_bytes(&mut self, offset: u64, bytes: u64) -> Result<(), WriteError> {
        let start = offset >> self.geometry.cluster_bits();
        let n = self.size_to_clusters(self.offset_into_cluster(offset) + bytes);
        self.free_clusters(start, n)
    }

    /// Refcount of the cluster at byte `offset`.
    pub(crate) fn refcount_at(&mut self, offset: u64) -> Result<u64, WriteError> {
        self.refcount(offset >> self.geometry.cluster_bits())
    }

    /// A plain write (`bdrv_pwrite`), recorded as `kind`.
    pub(crate) fn write_raw(
        &mut self,
        offset: u64,
        buf: &[u8],
        kind: WriteKind,
    ) -> Result<(), WriteError> {
        self.dev_write(offset, buf, kind)
    }

    /// A write followed by a flush (`bdrv_pwrite` + `bdrv_flush`).
    pub(crate) fn write_raw_sync(
        &mut self,
        offset: u64,
        buf: &[u8],
        kind: WriteKind,
    ) -> Result<(), WriteError> {
        self.dev_write_sync(offset, buf, kind)
    }

    pub(crate) fn read_raw(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WriteError> {
        Ok(self.dev.read_zero_padded(offset, buf)?)
    }

    /// `qcow2_flush_caches`: the L2 cache, the refcount cache, a flush.
    pub(crate) fn flush_caches(&mut self) -> Result<(), WriteError> {
        self.cache_write(Which::L2)?;
        self.cache_write(Which::Refcount)?;
        self.dev_flush()
    }

    /// What the header must say now.
    pub(crate) fn header_fields(&self) -> HeaderFields {
        HeaderFields {
            incompatible_features: self.incompat,
            refcount_table_offset: self.rt_offset,
            refcount_table_clusters: ((self.rt.len() as u64 * 8) >> self.geometry.cluster_bits())
                as u32,
        }
    }
}
