//! Compressing one cluster for a compressed write (`-c`).
//!
//! The compressor itself is supplied by the caller: in instar it is zlib 1.2.13 and
//! zstd 1.5.7 or 1.5.4 compiled into the guest, the library versions qemu-img links
//! against on Debian 13 and 12, so the bytes match (`docs/compression.md`). The writer only decides what to do with the
//! result, as QEMU's `qcow2_co_pwritev_compressed_task` does.

use crate::compress::CompressionType;

/// What compressing one cluster gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressed {
    /// The compressed form, `len` bytes at the start of the output buffer.
    Fits(usize),
    /// The compressed form does not fit in the output buffer (QEMU's `-ENOMEM`): the
    /// cluster is written uncompressed.
    NoFit,
}

/// The compressor failed for another reason (QEMU's `-EIO` from the library, which
/// fails the write with `-EINVAL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the compressor failed")]
pub struct CompressFailed;

/// Compresses one whole cluster with the image's compression type.
pub trait Compressor {
    /// Compress `src` (exactly one cluster) into `dst` with QEMU's parameters for
    /// `kind` (zlib: raw deflate, default level, window bits -12, memLevel 9; zstd: one
    /// frame, default parameters, one `ZSTD_compressStream2(ZSTD_e_end)` call).
    fn compress(
        &mut self,
        kind: CompressionType,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<Compressed, CompressFailed>;
}
