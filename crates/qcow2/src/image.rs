//! A read-only view of a qcow2 image: guest offset → cluster kind and host offset
//! with QEMU's run lengths (`qcow2_get_host_offset` under `bdrv_co_block_status`),
//! and reads of this layer's data.
//!
//! Only this layer: unallocated ranges read as zeros here; the backing chain is the
//! caller's business.

use alloc::vec;
use alloc::vec::Vec;
use instar_blockdev::bytes::{be64, be64_table};
use instar_blockdev::{BlockDev, IoError};

use crate::compress::{decompress_cluster, CompressionType, DecompressError};
use crate::crypt::{DataCrypt, CRYPT_SECTOR};
use crate::entry::{L1E_OFFSET_MASK, L2E_OFFSET_MASK};
use crate::geometry::Geometry;
use crate::map::{
    compressed_extent, subcluster_kind, subcluster_range, ClusterKind, CompressedExtent,
    EntryFormat,
};
use crate::Header;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("Unknown compression type {0}")]
    UnknownCompression(u8),
    #[error("{what} at {offset:#x} (+{len:#x}) lies outside the image file")]
    OutsideImage {
        what: &'static str,
        offset: u64,
        len: u64,
    },
    #[error("L2 table offset {l2_offset:#x} unaligned (L1 index: {l1_index:#x})")]
    L2Unaligned { l2_offset: u64, l1_index: u64 },
    #[error("Zero cluster entry found in pre-v3 image (L2 offset: {l2_offset:#x}, L2 index: {l2_index:#x})")]
    ZeroClusterInV2 { l2_offset: u64, l2_index: u64 },
    #[error("Cluster allocation offset {host:#x} unaligned (L2 offset: {l2_offset:#x}, L2 index: {l2_index:#x})")]
    ClusterUnaligned {
        host: u64,
        l2_offset: u64,
        l2_index: u64,
    },
    #[error("Compressed cluster entry found in image with external data file (L2 offset: {l2_offset:#x}, L2 index: {l2_index:#x})")]
    CompressedWithDataFile { l2_offset: u64, l2_index: u64 },
    #[error("External data file host cluster offset {host:#x} does not match guest cluster offset: {guest:#x}")]
    DataFileOffsetMismatch { host: u64, guest: u64 },
    #[error("Invalid cluster entry found (L2 offset: {l2_offset:#x}, L2 index: {l2_index:#x})")]
    InvalidEntry { l2_offset: u64, l2_index: u64 },
    #[error("reading data from an external data file is not supported")]
    ExternalDataFile,
    #[error("reading encrypted images is not supported")]
    Encrypted,
    #[error("compressed cluster at guest offset {guest:#x}: {err}")]
    Decompress { guest: u64, err: DecompressError },
    #[error("read of {len:#x} bytes at {offset:#x} goes past the virtual size")]
    BeyondVirtualSize { offset: u64, len: u64 },
    #[error(transparent)]
    Io(#[from] IoError),
}

/// One answer of [`Qcow2Image::block_status`]: a run of same-kind (sub)clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub kind: ClusterKind,
    /// Length of the run from the queried offset (0 only at or past the virtual size,
    /// or for a 0-byte query).
    pub bytes: u64,
    /// Host offset of the queried byte for kinds with a host cluster
    /// (normal, zero-alloc, unallocated-alloc).
    pub host_offset: Option<u64>,
    /// Where the compressed data lies, for a compressed cluster.
    pub compressed: Option<CompressedExtent>,
}

/// A qcow2 image opened for reading.
#[derive(Debug)]
pub struct Qcow2Image<D> {
    dev: D,
    fmt: EntryFormat,
    geometry: Geometry,
    version: u32,
    l1: Vec<u64>,
    compression: CompressionType,
    encrypted: bool,
    /// The payload cipher of an encrypted image opened with its key.
    crypt: Option<DataCrypt>,
    /// The last decompressed cluster: (where its compressed data lies, data).
    decompressed: Option<(CompressedExtent, Vec<u8>)>,
    /// The last L2 slice read: (its file offset, its bytes). Every status call inside
    /// one slice would otherwise be a device read (a VM exit in the sandbox). The
    /// image is read-only, so the copy never goes stale.
    slice: Option<(u64, Vec<u8>)>,
}

impl<D: BlockDev> Qcow2Image<D> {
    /// Open with the already parsed `header`; reads the L1 table.
    pub fn open(mut dev: D, header: &Header) -> Result<Self, ImageError> {
        let g = header.geometry();
        let compression = CompressionType::from_header(header.compression_type)
            .ok_or(ImageError::UnknownCompression(header.compression_type))?;
        // Header::read checked the table's size and alignment against QEMU's limits.
        let l1_len = u64::from(header.l1_size) * 8;
        let l1_off = header.l1_table_offset;
        if l1_off + l1_len > dev.size() {
            return Err(ImageError::OutsideImage {
                what: "L1 table",
                offset: l1_off,
                len: l1_len,
            });
        }
        let mut raw = vec![0u8; l1_len as usize];
        dev.read_at(l1_off, &mut raw)?;
        Ok(Qcow2Image {
            dev,
            fmt: header.entry_format(),
            geometry: *g,
            version: header.version,
            l1: be64_table(&raw),
            compression,
            encrypted: header.crypt_method != 0,
            crypt: None,
            decompressed: None,
            slice: None,
        })
    }

    /// Read an encrypted image's data clusters through its unlocked cipher.
    pub fn with_crypt(mut self, crypt: Option<DataCrypt>) -> Self {
        self.crypt = crypt;
        self
    }

    /// Virtual size as the block layer sees it (the header's size rounded down to 512).
    pub fn virtual_size(&self) -> u64 {
        self.geometry.virtual_size()
    }
    pub fn cluster_size(&self) -> u64 {
        self.geometry.cluster_size()
    }
    /// Subcluster size (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        self.geometry.subcluster_size()
    }
    pub fn extended_l2(&self) -> bool {
        self.geometry.extended_l2()
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn compression_type(&self) -> CompressionType {
        self.compression
    }
    /// Entries per L2 slice: where QEMU's block-status runs stop.
    pub fn l2_slice_entries(&self) -> u64 {
        self.geometry.l2_slice_entries()
    }
    /// The active L1 table as loaded at open.
    pub fn l1_table(&self) -> &[u64] {
        &self.l1
    }
    pub fn entry_format(&self) -> EntryFormat {
        self.fmt
    }
    pub fn dev(&self) -> &D {
        &self.dev
    }
    pub fn dev_mut(&mut self) -> &mut D {
        &mut self.dev
    }
    pub fn into_inner(self) -> D {
        self.dev
    }

    /// Kind of the (sub)cluster at `offset` and the length of the run of the same
    /// kind (and, for host-backed kinds, contiguous host clusters) starting there, as
    /// `bdrv_co_block_status` reports it for this layer: capped at `bytes`, the
    /// virtual size, `INT_MAX`, and the end of the L2 slice. Compressed clusters come
    /// one at a time. At or past the virtual size the run is empty.
    pub fn block_status(&mut self, offset: u64, bytes: u64) -> Result<Mapping, ImageError> {
        if offset >= self.geometry.virtual_size() || bytes == 0 {
            return Ok(Mapping {
                kind: ClusterKind::UnallocatedPlain,
                bytes: 0,
                host_offset: None,
                compressed: None,
            });
        }
        let bytes = bytes
            .min(self.geometry.virtual_size() - offset)
            .min(i32::MAX as u64);
        self.host_offset(offset, bytes)
    }

    /// `bdrv_is_allocated` on this layer: (allocated, run length).
    pub fn is_allocated(&mut self, offset: u64, bytes: u64) -> Result<(bool, u64), ImageError> {
        let m = self.block_status(offset, bytes)?;
        Ok((m.bytes > 0 && m.kind.is_allocated(), m.bytes))
    }

    /// QEMU's `qcow2_get_host_offset`.
    fn host_offset(&mut self, offset: u64, bytes: u64) -> Result<Mapping, ImageError> {
        let cb = self.fmt.cluster_bits;
        let cs = 1u64 << cb;
        let in_cluster = offset & (cs - 1);
        let slice_index = (offset >> cb) & (self.geometry.l2_slice_entries() - 1);
        let available = (self.geometry.l2_slice_entries() - slice_index) << cb;
        let needed = (bytes + in_cluster).min(available);
        let unallocated = Mapping {
            kind: ClusterKind::UnallocatedPlain,
            bytes: needed - in_cluster,
            host_offset: None,
            compressed: None,
        };

        let l1_index = offset >> (self.geometry.l2_bits() + cb);
        let Some(&l1e) = usize::try_from(l1_index).ok().and_then(|i| self.l1.get(i)) else {
            return Ok(unallocated);
        };
        let l2_offset = l1e & L1E_OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(unallocated);
        }
        if l2_offset & (cs - 1) != 0 {
            return Err(ImageError::L2Unaligned {
                l2_offset,
                l1_index,
            });
        }

        // Read only the entries the run can cover (never past the slice).
        let l2_index = (offset >> cb) & ((1u64 << self.geometry.l2_bits()) - 1);
        let nb_clusters = needed.div_ceil(cs);
        let esize = self.geometry.l2_entry_size();
        let table_off = l2_offset + l2_index * esize;
        let len = nb_clusters * esize;
        if table_off
            .checked_add(len)
            .is_none_or(|e| e > self.dev.size())
        {
            return Err(ImageError::OutsideImage {
                what: "L2 table",
                offset: l2_offset,
                len: cs,
            });
        }
        let raw = self.slice_bytes(l2_offset, l2_index, esize, table_off, len)?;
        let entries: Vec<(u64, u64)> = raw
            .chunks_exact(esize as usize)
            // Without extended L2 there is no bitmap word: it reads as 0.
            .map(|c| (be64(c, 0).unwrap_or(0), be64(c, 8).unwrap_or(0)))
            .collect();

        let spc = self.fmt.subclusters_per_cluster();
        let sc_index = ((offset >> self.geometry.subcluster_bits()) & u64::from(spc - 1)) as u32;
        let (e0, b0) = entries[0];
        let kind0 = subcluster_kind(&self.fmt, e0, b0, sc_index);
        if self.version < 3
            && matches!(kind0, Some(ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc))
        {
            return Err(ImageError::ZeroClusterInV2 {
                l2_offset,
                l2_index,
            });
        }
        let mut host_offset = None;
        let mut compressed = None;
        match kind0 {
            Some(ClusterKind::Compressed) => {
                if self.fmt.has_data_file {
                    return Err(ImageError::CompressedWithDataFile {
                        l2_offset,
                        l2_index,
                    });
                }
                compressed = Some(compressed_extent(&self.fmt, e0));
            }
            Some(ClusterKind::Normal | ClusterKind::ZeroAlloc | ClusterKind::UnallocatedAlloc) => {
                let host = e0 & L2E_OFFSET_MASK;
                if host & (cs - 1) != 0 {
                    return Err(ImageError::ClusterUnaligned {
                        host,
                        l2_offset,
                        l2_index,
                    });
                }
                if self.fmt.has_data_file && host + in_cluster != offset {
                    return Err(ImageError::DataFileOffsetMismatch {
                        host,
                        guest: offset - in_cluster,
                    });
                }
                host_offset = Some(host + in_cluster);
            }
            _ => {}
        }

        let sc =
            self.count_contiguous(&entries, sc_index)
                .map_err(|i| ImageError::InvalidEntry {
                    l2_offset,
                    l2_index: l2_index + i,
                })?;
        let run =
            ((u64::from(sc) + u64::from(sc_index)) << self.geometry.subcluster_bits()).min(needed);
        Ok(Mapping {
            // count_contiguous() succeeded, so the first entry is valid.
            kind: kind0.unwrap_or(ClusterKind::UnallocatedPlain),
            bytes: run - in_cluster,
            host_offset,
            compressed,
        })
    }

    /// QEMU's `count_contiguous_subclusters`: subclusters of the first entry's kind
    /// from `sc_index`, continuing over whole clusters of that kind (and contiguous
    /// host offsets). Err(i) names an invalid entry met on the way.
    fn count_contiguous(&self, entries: &[(u64, u64)], sc_index: u32) -> Result<u32, u64> {
        let spc = self.fmt.subclusters_per_cluster();
        let cs = 1u64 << self.fmt.cluster_bits;
        let mut count = 0u32;
        let mut expected = ClusterKind::Normal;
        let mut expected_off = 0u64;
        let mut check_offset = false;
        for (i, &(e, b)) in entries.iter().enumerate() {
            let first_sc = if i == 0 { sc_index } else { 0 };
            let (kind, n) = subcluster_range(&self.fmt, e, b, first_sc).ok_or(i as u64)?;
            if i == 0 {
                if kind == ClusterKind::Compressed {
                    return Ok(n);
                }
                expected = kind;
                expected_off = e & L2E_OFFSET_MASK;
                check_offset = kind.has_host_cluster();
            } else if kind != expected {
                break;
            } else if check_offset {
                expected_off = expected_off.wrapping_add(cs);
                if expected_off != e & L2E_OFFSET_MASK {
                    break;
                }
            }
            count += n;
            if first_sc + n < spc {
                break;
            }
        }
        Ok(count)
    }

    /// The `len` bytes of L2 entries at `table_off` (inside the slice that holds entry
    /// `l2_index` of the table at `l2_offset`), from the slice cache or the device.
    fn slice_bytes(
        &mut self,
        l2_offset: u64,
        l2_index: u64,
        esize: u64,
        table_off: u64,
        len: u64,
    ) -> Result<&[u8], ImageError> {
        let slice_start = l2_offset + (l2_index & !(self.geometry.l2_slice_entries() - 1)) * esize;
        if self
            .slice
            .as_ref()
            .is_none_or(|(off, _)| *off != slice_start)
        {
            // Entries past the end of the file read as zeros, as the block layer's do;
            // the caller already refused a run that needs them.
            let mut buf = vec![0u8; (self.geometry.l2_slice_entries() * esize) as usize];
            self.dev.read_zero_padded(slice_start, &mut buf)?;
            self.slice = Some((slice_start, buf));
        }
        let start = (table_off - slice_start) as usize;
        self.slice
            .as_ref()
            .and_then(|(_, buf)| buf.get(start..start + len as usize))
            .ok_or(ImageError::OutsideImage {
                what: "L2 table",
                offset: l2_offset,
                len,
            })
    }

    /// Read guest bytes of this layer only: data and compressed clusters are read,
    /// zero and unallocated ranges read as zeros. The range must lie within the
    /// virtual size.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let len = buf.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.geometry.virtual_size())
        {
            return Err(ImageError::BeyondVirtualSize { offset, len });
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let m = self.block_status(pos, (buf.len() - done) as u64)?;
            // block_status never returns an empty run inside the virtual size.
            let n = (m.bytes as usize).clamp(1, buf.len() - done);
            let out = &mut buf[done..done + n];
            match m.kind {
                ClusterKind::Normal => {
                    if self.fmt.has_data_file {
                        return Err(ImageError::ExternalDataFile);
                    }
                    // host_offset is set for Normal; past the end of the file the block
                    // layer reads zeros, and so do we.
                    let host = m.host_offset.unwrap_or(0);
                    if self.encrypted {
                        self.read_encrypted(host, pos, out)?;
                    } else {
                        self.dev.read_zero_padded(host, out)?;
                    }
                }
                ClusterKind::Compressed => {
                    let ext = m
                        .compressed
                        .unwrap_or(CompressedExtent { offset: 0, len: 0 });
                    self.read_compressed(pos, ext, out)?;
                }
                _ => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Read and decrypt the whole sectors around `out` (host and guest offsets share
    /// their offset into the cluster, so one alignment serves both).
    fn read_encrypted(&mut self, host: u64, guest: u64, out: &mut [u8]) -> Result<(), ImageError> {
        let Some(crypt) = self.crypt.clone() else {
            return Err(ImageError::Encrypted);
        };
        let head = host % CRYPT_SECTOR;
        let len = (head + out.len() as u64).next_multiple_of(CRYPT_SECTOR);
        let mut buf = vec![0u8; len as usize];
        self.dev.read_zero_padded(host - head, &mut buf)?;
        crypt.decrypt(host - head, guest - head, &mut buf);
        let h = head as usize;
        out.copy_from_slice(&buf[h..h + out.len()]);
        Ok(())
    }

    fn read_compressed(
        &mut self,
        guest: u64,
        ext: CompressedExtent,
        out: &mut [u8],
    ) -> Result<(), ImageError> {
        if self.encrypted {
            return Err(ImageError::Encrypted);
        }
        let cs = 1u64 << self.fmt.cluster_bits;
        let hit = matches!(&self.decompressed, Some((k, _)) if *k == ext);
        if !hit {
            // ext.len is at most two clusters (sector count bits), so this is bounded.
            let mut input = vec![0u8; ext.len as usize];
            self.dev.read_zero_padded(ext.offset, &mut input)?;
            let mut data = vec![0u8; cs as usize];
            decompress_cluster(self.compression, &input, &mut data)
                .map_err(|err| ImageError::Decompress { guest, err })?;
            self.decompressed = Some((ext, data));
        }
        let start = (guest & (cs - 1)) as usize;
        if let Some((_, data)) = &self.decompressed {
            if let Some(src) = data.get(start..start + out.len()) {
                out.copy_from_slice(src);
            }
        }
        Ok(())
    }
}
