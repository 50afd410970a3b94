//! Compressed writes (`blk_pwrite` with `BDRV_REQ_WRITE_COMPRESSED`, as `qemu-img
//! rebase -c` issues them): QEMU's `qcow2_co_pwritev_compressed_part` and `_task`,
//! `qcow2_alloc_compressed_cluster_offset` and `qcow2_alloc_bytes`.
//!
//! Each cluster of the request is zero-padded to a whole cluster and compressed into a
//! buffer of `cluster_size - 1` bytes; one that does not fit there is written as an
//! ordinary cluster. The compressed bytes are packed one after another into host
//! clusters (`free_byte_offset`): a host cluster's refcount is the number of compressed
//! clusters that start or end in it, and a compressed cluster may run on into the next
//! host cluster when that one is free and adjacent.
//!
//! QEMU compresses the clusters of one request in parallel threads and allocates them in
//! the order the threads finish, so for a request of several clusters its packing order
//! can vary from run to run; this writer always packs in guest order, which is the
//! order QEMU gives whenever the threads finish in order (`docs/compression.md`).

use alloc::vec;

use instar_blockdev::BlockDev;

use super::cache::Which;
use super::refcount::Flow;
use super::{corrupt, Below, WriteError, WriteKind, Writer, MAX_CLUSTER_OFFSET};
use crate::compress::CompressionType;
use crate::compressor::{Compressed, Compressor};
use crate::entry::{L2E_OFFSET_MASK, OFLAG_COMPRESSED};

/// qcow2's compressed-cluster sector (`QCOW2_COMPRESSED_SECTOR_SIZE`).
const SECTOR: u64 = 512;

impl<D: BlockDev, B: Below> Writer<D, B> {
    /// Write `data` at `guest_offset` compressed. The request must start on a cluster
    /// boundary and cover whole clusters, except that it may end at the end of the disk.
    pub fn write_compressed(
        &mut self,
        guest_offset: u64,
        data: &[u8],
        compressor: &mut dyn Compressor,
    ) -> Result<(), WriteError> {
        let len = data.len() as u64;
        self.check_request(guest_offset, len)?;
        let cs = self.geometry.cluster_size();
        let end = guest_offset + len;
        if self.offset_into_cluster(guest_offset) != 0
            || (self.offset_into_cluster(len) != 0 && end != self.geometry.virtual_size())
        {
            return Err(WriteError::BadRequest {
                offset: guest_offset,
                len,
            });
        }
        for (i, chunk) in data.chunks(cs as usize).enumerate() {
            self.write_compressed_cluster(guest_offset + i as u64 * cs, chunk, compressor)?;
        }
        Ok(())
    }

    /// `qcow2_co_pwritev_compressed_task`: one cluster (or the disk's partial last one).
    fn write_compressed_cluster(
        &mut self,
        guest: u64,
        chunk: &[u8],
        compressor: &mut dyn Compressor,
    ) -> Result<(), WriteError> {
        let cs = self.geometry.cluster_size() as usize;
        let mut buf = vec![0u8; cs];
        buf[..chunk.len()].copy_from_slice(chunk);
        let mut out = vec![0u8; cs - 1];
        let len = match compressor.compress(self.compression, &buf, &mut out) {
            Ok(Compressed::Fits(n)) if n > 0 && n < cs => n,
            Ok(Compressed::Fits(_)) | Err(_) => return Err(WriteError::CompressFailed),
            // Did not shrink: an ordinary write of the request's bytes.
            Ok(Compressed::NoFit) => return self.pwritev(guest, chunk),
        };
        let host = self.alloc_compressed_cluster(guest, len as u64)?;
        self.dev_write(host, &out[..len], WriteKind::Data)?;
        // The new L2 entry must not reach the disk before the data it points to.
        self.l2_cache.depends_on_flush = true;
        Ok(())
    }

    /// `qcow2_alloc_compressed_cluster_offset`: pack `size` bytes and point the L2
    /// entry of `guest` at them. Returns the host offset of the data.
    fn alloc_compressed_cluster(&mut self, guest: u64, size: u64) -> Result<u64, WriteError> {
        let s = self.get_cluster_table(guest)?;
        let (e, _) = self.l2_get(s, 0)?;
        if e & L2E_OFFSET_MASK != 0 {
            // QEMU fails the write with EIO: compression never overwrites a cluster.
            return Err(WriteError::CompressedOverwrite(guest));
        }
        let host = self.alloc_compressed_bytes(size)?;
        let fmt = self.geometry.entry_format(false);
        let nb_csectors = (host + size - 1) / SECTOR - host / SECTOR;
        if host & fmt.cluster_offset_mask() != host || nb_csectors & fmt.csize_mask() != nb_csectors
        {
            return Err(WriteError::TooBig);
        }
        let entry = host | OFLAG_COMPRESSED | (nb_csectors << fmt.csize_shift());
        // Refcount work may have dropped the slice from the cache: resolve it again.
        let s = self.get_cluster_table(guest)?;
        let bitmap = self.geometry.extended_l2().then_some(0);
        self.l2_set(s, 0, entry, bitmap)?;
        Ok(host)
    }

    /// `qcow2_alloc_bytes`: `size` bytes right after the previous compressed cluster if
    /// they fit in its host cluster (or run on into the adjacent free one), else at the
    /// start of a newly allocated cluster. Raises the refcount of every host cluster the
    /// bytes touch.
    fn alloc_compressed_bytes(&mut self, size: u64) -> Result<u64, WriteError> {
        let cs = self.geometry.cluster_size();
        let bits = self.geometry.cluster_bits();
        let mut offset = self.free_byte_offset;
        if offset != 0 && self.refcount(offset >> bits)? == self.geometry.refcount_max() {
            offset = 0;
        }
        let mut free_in_cluster = cs - self.offset_into_cluster(offset);
        loop {
            if offset == 0 || free_in_cluster < size {
                let new_cluster = self.alloc_cluster_noref_compressed()? << bits;
                if new_cluster == 0 {
                    return Err(corrupt("compressed cluster allocation at offset 0", 0));
                }
                if offset == 0 || offset.div_ceil(cs) * cs != new_cluster {
                    offset = new_cluster;
                    free_in_cluster = cs;
                } else {
                    free_in_cluster += cs;
                }
            }
            let first = offset >> bits;
            let last = (offset + size - 1) >> bits;
            match self.update_refcount(first, last - first + 1, false)? {
                Flow::Done => break,
                Flow::Again => offset = 0,
            }
        }
        // The raised refcounts must be on disk before the L2 entry that uses them.
        self.cache_set_dependency(Which::L2)?;
        self.free_byte_offset = offset + size;
        if self.offset_into_cluster(self.free_byte_offset) == 0 {
            self.free_byte_offset = 0;
        }
        Ok(offset)
    }

    /// `alloc_clusters_noref` of one cluster, bounded by what a compressed L2 entry can
    /// address (`cluster_offset_mask`).
    fn alloc_cluster_noref_compressed(&mut self) -> Result<u64, WriteError> {
        let c = self.find_free_run(1)?;
        let max = self
            .geometry
            .entry_format(false)
            .cluster_offset_mask()
            .min(MAX_CLUSTER_OFFSET);
        if c > max >> self.geometry.cluster_bits() {
            return Err(WriteError::TooBig);
        }
        Ok(c)
    }

    /// The image's compression type (zlib for v2 images and v3 ones without the field).
    pub fn compression_type(&self) -> CompressionType {
        self.compression
    }
}
