//! A monolithicSparse (or streamOptimized) vmdk opened for reading, following QEMU's
//! `vmdk_open_vmdk4`, `get_cluster_offset`, `vmdk_co_block_status` and
//! `vmdk_read_extent`.

use alloc::vec;
use alloc::vec::Vec;
use instar_blockdev::bytes::{le32, le32_table, Fixed};
use instar_blockdev::{BlockDev, IoError};
use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use crate::descriptor::{Descriptor, DescriptorError, DESC_OFFSET, DESC_SIZE};

pub const VMDK4_MAGIC: u32 = 0x4b44_4d56; // "KDMV"
pub const VMDK3_MAGIC: u32 = 0x434f_5744; // "COWD"
pub const FLAG_NL_DETECT: u32 = 1 << 0;
pub const FLAG_RGD: u32 = 1 << 1;
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
pub const FLAG_COMPRESS: u32 = 1 << 16;
pub const FLAG_MARKER: u32 = 1 << 17;
pub const COMPRESSION_DEFLATE: u16 = 1;
pub const GD_AT_END: u64 = u64::MAX;
/// Grain table entry of a zeroed grain (with [`FLAG_ZERO_GRAIN`]).
pub const GTE_ZEROED: u32 = 1;
/// Largest compressed grain we decompress (QEMU allows 1 GiB; real ones are 64 KiB).
pub const MAX_COMPRESSED_GRAIN: u64 = 2 << 20;
/// Bytes of the fixed header after the magic.
const HEADER_LEN: usize = 4 + 75;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmdkError {
    #[error("File is too small, not a valid image")]
    TooSmall,
    #[error("Image not in VMDK format")]
    NotVmdk,
    #[error("VMDK3 (COWD) images are not supported")]
    Vmdk3,
    #[error("descriptor-file vmdk images are not supported (only monolithicSparse)")]
    DescriptorFile,
    #[error("Unsupported VMDK version {0}")]
    UnsupportedVersion(u32),
    #[error("a grain directory at the end of the file (stream footer) is not supported")]
    GdAtEnd,
    #[error("L2 table size too big")]
    L2TooBig,
    #[error("L1 entry size is invalid")]
    L1EntryInvalid,
    #[error("Invalid granularity, image may be corrupt")]
    BadGranularity,
    #[error("L1 size too big")]
    L1TooBig,
    #[error("capacity of {0} sectors is too large")]
    CapacityTooLarge(u64),
    #[error("File truncated, expecting at least {0} bytes")]
    Truncated(u64),
    #[error("{what} at {offset:#x} (+{len:#x}) lies outside the image file")]
    OutsideImage {
        what: &'static str,
        offset: u64,
        len: u64,
    },
    #[error("grain directory has no entry for offset {0:#x}")]
    NoGdEntry(u64),
    #[error("compressed grains larger than {MAX_COMPRESSED_GRAIN} bytes are not supported")]
    CompressedGrainTooLarge,
    #[error("compressed grain at guest offset {0:#x} is corrupt")]
    BadCompressedGrain(u64),
    #[error("read of {len:#x} bytes at {offset:#x} goes past the virtual size")]
    BeyondVirtualSize { offset: u64, len: u64 },
    #[error("invalid VMDK descriptor: {0}")]
    Descriptor(#[from] DescriptorError),
    #[error(transparent)]
    Io(#[from] IoError),
}

/// The sparse extent header (`VMDK4Header`, little endian, after the magic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    /// Virtual size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub granularity: u64,
    pub desc_offset: u64,
    pub desc_size: u64,
    pub num_gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub grain_offset: u64,
    pub compress_algorithm: u16,
}

impl SparseHeader {
    /// Parse the header from the first bytes of the file (magic included).
    pub fn parse(b: &[u8]) -> Result<SparseHeader, VmdkError> {
        let Some(b) = b.first_chunk::<HEADER_LEN>() else {
            return Err(VmdkError::TooSmall);
        };
        let b = Fixed(b);
        let magic = b.be32::<0>();
        if magic == VMDK3_MAGIC {
            return Err(VmdkError::Vmdk3);
        }
        if magic != VMDK4_MAGIC {
            return Err(VmdkError::NotVmdk);
        }
        Ok(SparseHeader {
            version: b.le32::<4>(),
            flags: b.le32::<8>(),
            capacity: b.le64::<12>(),
            granularity: b.le64::<20>(),
            desc_offset: b.le64::<28>(),
            desc_size: b.le64::<36>(),
            num_gtes_per_gt: b.le32::<44>(),
            rgd_offset: b.le64::<48>(),
            gd_offset: b.le64::<56>(),
            grain_offset: b.le64::<64>(),
            // 1 filler byte and 4 check bytes come before it.
            compress_algorithm: b.le16::<77>(),
        })
    }
}

/// What a grain is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrainKind {
    /// Plain data at a host offset.
    Allocated,
    /// Deflate-compressed data (streamOptimized).
    Compressed,
    /// Zeroed grain (GTE 1 with the zeroed-grain flag): reads as zeros, hides the parent.
    Zero,
    /// Not allocated: the parent shows through.
    Unallocated,
}

impl GrainKind {
    pub fn is_allocated(self) -> bool {
        !matches!(self, GrainKind::Unallocated)
    }
}

/// One answer of [`VmdkImage::block_status`]; runs never cross a grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrainStatus {
    pub kind: GrainKind,
    pub bytes: u64,
    /// Host offset of the queried byte (allocated, uncompressed grains).
    pub host_offset: Option<u64>,
}

/// A monolithicSparse vmdk opened for reading.
#[derive(Debug)]
pub struct VmdkImage<D> {
    dev: D,
    header: SparseHeader,
    descriptor: Descriptor,
    gd: Vec<u32>,
    grain_bytes: u64,
    /// Sectors covered by one grain table.
    gt_sectors: u64,
    compressed: bool,
    zero_grain: bool,
    /// The last grain table read (position, bytes): block status walks grain by
    /// grain, and one device read per grain would be slow.
    gt_cache: Option<(u64, Vec<u8>)>,
}

impl<D: BlockDev> VmdkImage<D> {
    pub fn open(mut dev: D) -> Result<Self, VmdkError> {
        if dev.size() < 4 {
            return Err(VmdkError::TooSmall);
        }
        let mut hb = [0u8; 512];
        dev.read_zero_padded(0, &mut hb)?;
        let h = SparseHeader::parse(&hb)?;
        if h.capacity == 0 && h.desc_offset != 0 {
            return Err(VmdkError::DescriptorFile);
        }
        if h.gd_offset == GD_AT_END {
            return Err(VmdkError::GdAtEnd);
        }
        if h.version > 3 {
            return Err(VmdkError::UnsupportedVersion(h.version));
        }
        if h.num_gtes_per_gt > 512 {
            return Err(VmdkError::L2TooBig);
        }
        let gt_sectors = u64::from(h.num_gtes_per_gt)
            .checked_mul(h.granularity)
            .filter(|&v| v != 0 && v <= u64::from(u32::MAX))
            .ok_or(VmdkError::L1EntryInvalid)?;
        if h.granularity > 0x20_0000 {
            return Err(VmdkError::BadGranularity);
        }
        // Keep byte offsets in i64 range like QEMU's int64 arithmetic.
        if h.capacity > (i64::MAX as u64) >> 9 {
            return Err(VmdkError::CapacityTooLarge(h.capacity));
        }
        let l1_size = h.capacity.div_ceil(gt_sectors);
        if l1_size > 32 * 1024 * 1024 {
            return Err(VmdkError::L1TooBig);
        }
        let file_sectors = dev.size().div_ceil(512);
        if file_sectors < h.grain_offset {
            return Err(VmdkError::Truncated(h.grain_offset.saturating_mul(512)));
        }
        let compressed = h.compress_algorithm == COMPRESSION_DEFLATE;
        let grain_bytes = h.granularity * 512;
        if compressed && grain_bytes > MAX_COMPRESSED_GRAIN {
            return Err(VmdkError::CompressedGrainTooLarge);
        }
        let gd_off = h
            .gd_offset
            .checked_mul(512)
            .ok_or(VmdkError::OutsideImage {
                what: "grain directory",
                offset: h.gd_offset,
                len: l1_size * 4,
            })?;
        let gd_len = l1_size * 4;
        if gd_off.checked_add(gd_len).is_none_or(|e| e > dev.size()) {
            return Err(VmdkError::OutsideImage {
                what: "grain directory",
                offset: gd_off,
                len: gd_len,
            });
        }
        let mut raw = vec![0u8; gd_len as usize];
        dev.read_at(gd_off, &mut raw)?;
        let gd = le32_table(&raw);
        // QEMU hard-codes the descriptor position of a sparse file.
        let mut desc = vec![0u8; DESC_SIZE];
        dev.read_zero_padded(DESC_OFFSET, &mut desc)?;
        let descriptor = Descriptor::parse(&desc)?;
        Ok(VmdkImage {
            dev,
            header: h,
            descriptor,
            gd,
            grain_bytes,
            gt_sectors,
            compressed,
            zero_grain: h.flags & FLAG_ZERO_GRAIN != 0,
            gt_cache: None,
        })
    }

    pub fn header(&self) -> &SparseHeader {
        &self.header
    }
    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }
    /// Virtual size in bytes (capacity × 512).
    pub fn virtual_size(&self) -> u64 {
        self.header.capacity * 512
    }
    pub fn grain_size(&self) -> u64 {
        self.grain_bytes
    }
    /// The grain directory (`gd_offset`): grain table positions in sectors, 0 = none.
    pub fn grain_directory(&self) -> &[u32] {
        &self.gd
    }
    /// Whether GTE 1 means a zeroed grain ([`FLAG_ZERO_GRAIN`]).
    pub fn has_zero_grain(&self) -> bool {
        self.zero_grain
    }
    /// Deflate-compressed grains (streamOptimized).
    pub fn is_compressed(&self) -> bool {
        self.compressed
    }
    /// QEMU reports `streamOptimized` for compressed extents, else `monolithicSparse`.
    pub fn create_type(&self) -> &'static str {
        if self.compressed {
            "streamOptimized"
        } else {
            "monolithicSparse"
        }
    }
    pub fn dev(&self) -> &D {
        &self.dev
    }
    /// The device; the grain table cache is dropped, since the caller may write.
    pub fn dev_mut(&mut self) -> &mut D {
        self.gt_cache = None;
        &mut self.dev
    }
    pub fn into_inner(self) -> D {
        self.dev
    }

    /// Grain table entry (in sectors) for the grain holding `offset`; `None` when
    /// the grain table itself is absent.
    fn gte(&mut self, offset: u64) -> Result<Option<u32>, VmdkError> {
        let sector = offset >> 9;
        let l1 = sector / self.gt_sectors;
        let Some(&gt) = usize::try_from(l1).ok().and_then(|i| self.gd.get(i)) else {
            return Err(VmdkError::NoGdEntry(offset));
        };
        if gt == 0 {
            return Ok(None);
        }
        let index = (sector / self.header.granularity) % u64::from(self.header.num_gtes_per_gt);
        let gt_off = u64::from(gt) * 512;
        let gt_len = u64::from(self.header.num_gtes_per_gt) * 4;
        if gt_off + index * 4 + 4 > self.dev.size() {
            return Err(VmdkError::OutsideImage {
                what: "grain table",
                offset: gt_off,
                len: gt_len,
            });
        }
        if self.gt_cache.as_ref().is_none_or(|(o, _)| *o != gt_off) {
            // The entries past the end of the file are never used (checked above).
            let mut t = vec![0u8; gt_len as usize];
            self.dev.read_zero_padded(gt_off, &mut t)?;
            self.gt_cache = Some((gt_off, t));
        }
        let i = index as usize * 4;
        let entry = self
            .gt_cache
            .as_ref()
            .and_then(|(_, t)| le32(t, i))
            .ok_or(VmdkError::NoGdEntry(offset))?;
        Ok(Some(entry))
    }

    /// Status of the grain holding `offset` (`vmdk_co_block_status`): the run ends at
    /// the end of that grain, capped at `bytes` and the virtual size. Empty at or
    /// past the virtual size.
    pub fn block_status(&mut self, offset: u64, bytes: u64) -> Result<GrainStatus, VmdkError> {
        let size = self.virtual_size();
        if offset >= size || bytes == 0 {
            return Ok(GrainStatus {
                kind: GrainKind::Unallocated,
                bytes: 0,
                host_offset: None,
            });
        }
        let in_grain = offset % self.grain_bytes;
        let n = (self.grain_bytes - in_grain).min(bytes).min(size - offset);
        let (kind, host_offset) = match self.gte(offset)? {
            None | Some(0) => (GrainKind::Unallocated, None),
            Some(GTE_ZEROED) if self.zero_grain => (GrainKind::Zero, None),
            Some(s) if self.compressed => {
                let _ = s;
                (GrainKind::Compressed, None)
            }
            Some(s) => (GrainKind::Allocated, Some(u64::from(s) * 512 + in_grain)),
        };
        Ok(GrainStatus {
            kind,
            bytes: n,
            host_offset,
        })
    }

    /// Read guest bytes of this layer only (unallocated grains read as zeros).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), VmdkError> {
        let len = buf.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.virtual_size())
        {
            return Err(VmdkError::BeyondVirtualSize { offset, len });
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let st = self.block_status(pos, (buf.len() - done) as u64)?;
            let n = (st.bytes as usize).clamp(1, buf.len() - done);
            let out = &mut buf[done..done + n];
            match st.kind {
                GrainKind::Allocated => {
                    // Past the end of the file the block layer reads zeros.
                    self.dev
                        .read_zero_padded(st.host_offset.unwrap_or(0), out)?;
                }
                GrainKind::Compressed => self.read_compressed(pos, out)?,
                GrainKind::Zero | GrainKind::Unallocated => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// `vmdk_read_extent` for a compressed extent: a grain marker (LBA, size) and a
    /// zlib stream, read from two grains' worth of file.
    fn read_compressed(&mut self, guest: u64, out: &mut [u8]) -> Result<(), VmdkError> {
        let sector = self.gte(guest)?.unwrap_or(0);
        let gb = self.grain_bytes as usize;
        let mut raw = vec![0u8; gb * 2];
        self.dev
            .read_zero_padded(u64::from(sector) * 512, &mut raw)?;
        let bad = VmdkError::BadCompressedGrain(guest);
        let data = if self.header.flags & FLAG_MARKER != 0 {
            let size = le32(&raw, 8).ok_or(VmdkError::BadCompressedGrain(guest))? as usize;
            if size == 0 || size > raw.len() - 12 {
                return Err(bad);
            }
            &raw[12..12 + size]
        } else {
            &raw[..gb]
        };
        let mut grain = vec![0u8; gb];
        let mut st = DecompressorOxide::new();
        let flags = inflate_flags::TINFL_FLAG_PARSE_ZLIB_HEADER
            | inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
        let (status, _, written) = decompress(&mut st, data, &mut grain, 0, flags);
        // zlib's uncompress(): the stream must end inside the buffer.
        if status != TINFLStatus::Done {
            return Err(bad);
        }
        let start = (guest % self.grain_bytes) as usize;
        let src = grain
            .get(start..start + out.len())
            .filter(|_| start + out.len() <= written)
            .ok_or(bad)?;
        out.copy_from_slice(src);
        Ok(())
    }
}
