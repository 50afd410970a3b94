//! Decompressing qcow2 compressed clusters, with QEMU's acceptance rules
//! (`qcow2_zlib_decompress`, `qcow2_zstd_decompress`).
//!
//! Both decoders write into a caller buffer of exactly one cluster and never produce
//! more; the input is the (bounded) sector run named by the L2 entry.

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;
use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use ruzstd::io::Read;

/// The header's compression type field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (QEMU: zlib with window bits -12).
    Zlib,
    Zstd,
}

impl CompressionType {
    /// From the v3 header byte; unknown values are refused.
    pub fn from_header(v: u8) -> Option<Self> {
        match v {
            0 => Some(CompressionType::Zlib),
            1 => Some(CompressionType::Zstd),
            _ => None,
        }
    }
}

/// Why a compressed cluster could not be decompressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecompressError {
    #[error("compressed data is corrupt")]
    Corrupt,
    #[error("compressed data ends before a whole cluster was produced")]
    Short,
    #[error("compressed data expands to more than one cluster")]
    TooLong,
    #[error("zstd window of {0} bytes is larger than allowed")]
    WindowTooLarge(u64),
}

/// Largest zstd window accepted: bounds the decoder's memory. QEMU's compressor knows
/// the input size (one cluster, at most 2 MiB), so real images stay far below this.
pub const MAX_ZSTD_WINDOW: u64 = 8 << 20;

/// Decompress `input` into `out` (one cluster). Succeeds only when `out` is filled
/// completely, as QEMU requires.
pub fn decompress_cluster(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), DecompressError> {
    match kind {
        CompressionType::Zlib => inflate_raw(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

/// Raw deflate. Like zlib's `inflate(Z_FINISH)` in QEMU: a full output buffer is
/// success even if the stream goes on (the input length is only known to a sector).
fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    let mut st = DecompressorOxide::new();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _read, written) = decompress(&mut st, input, out, 0, flags);
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == out.len() => Ok(()),
        TINFLStatus::Done | TINFLStatus::NeedsMoreInput | TINFLStatus::FailedCannotMakeProgress
            if written == out.len() =>
        {
            Ok(())
        }
        TINFLStatus::Done | TINFLStatus::NeedsMoreInput | TINFLStatus::FailedCannotMakeProgress => {
            Err(DecompressError::Short)
        }
        _ => Err(DecompressError::Corrupt),
    }
}

/// zstd: one or more frames that together fill `out` exactly; the last frame must end
/// where the cluster ends.
fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    let mut src = input;
    let mut pos = 0usize;
    let mut dec = FrameDecoder::new();
    dec.set_max_window_size(MAX_ZSTD_WINDOW);
    while pos < out.len() {
        if src.is_empty() {
            return Err(DecompressError::Short);
        }
        match dec.reset(&mut src) {
            Ok(()) => {}
            Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                length,
                ..
            })) => {
                src = src.get(length as usize..).ok_or(DecompressError::Short)?;
                continue;
            }
            Err(FrameDecoderError::WindowSizeTooBig { requested, .. }) => {
                return Err(DecompressError::WindowTooLarge(requested))
            }
            Err(_) => return Err(DecompressError::Corrupt),
        }
        // One block at a time (at most 128 KiB each), draining as we go, so a frame
        // that expands without bound is cut off after one block past the cluster.
        loop {
            let finished = dec
                .decode_blocks(&mut src, BlockDecodingStrategy::UptoBlocks(1))
                .map_err(|_| DecompressError::Corrupt)?;
            loop {
                let n = dec
                    .read(&mut out[pos..])
                    .map_err(|_| DecompressError::Corrupt)?;
                pos += n;
                if n == 0 || pos == out.len() {
                    break;
                }
            }
            if pos == out.len() && dec.can_collect() > 0 {
                return Err(DecompressError::TooLong);
            }
            if finished {
                break;
            }
            if pos == out.len() {
                // Output is full but the frame goes on: QEMU sees an unflushed frame.
                return Err(DecompressError::TooLong);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn raw_deflate_fills_exactly() {
        let data: alloc::vec::Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let c = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let mut out = vec![0u8; 4096];
        decompress_cluster(CompressionType::Zlib, &c, &mut out).unwrap();
        assert_eq!(out, data);
        // Trailing sector padding after the stream is fine.
        let mut padded = c.clone();
        padded.resize(c.len() + 300, 0xaa);
        decompress_cluster(CompressionType::Zlib, &padded, &mut out).unwrap();
        // A smaller output than the stream holds is fine too (QEMU's Z_BUF_ERROR case).
        let mut small = vec![0u8; 1000];
        decompress_cluster(CompressionType::Zlib, &c, &mut small).unwrap();
        // A larger one is not.
        let mut big = vec![0u8; 8192];
        assert_eq!(
            decompress_cluster(CompressionType::Zlib, &c, &mut big),
            Err(DecompressError::Short)
        );
        assert!(decompress_cluster(CompressionType::Zlib, &[0xff; 64], &mut out).is_err());
    }

    #[test]
    fn zstd_garbage_is_an_error() {
        let mut out = vec![0u8; 4096];
        assert!(decompress_cluster(CompressionType::Zstd, &[0u8; 100], &mut out).is_err());
        assert!(decompress_cluster(CompressionType::Zstd, &[], &mut out).is_err());
        // Magic followed by junk.
        let mut junk = vec![0x28, 0xb5, 0x2f, 0xfd];
        junk.extend_from_slice(&[0xff; 60]);
        assert!(decompress_cluster(CompressionType::Zstd, &junk, &mut out).is_err());
    }
}
