//! A compressor for the fuzz targets' `-c` rebases. The guest compresses with zlib and
//! zstd compiled from C (`guest/csrc`), which this host-side harness does not link; the
//! targets exercise what the writer does with compressed clusters (packing, refcounts,
//! L2 entries, the fallback for clusters that do not shrink), so any valid stream will
//! do: miniz_oxide's raw deflate and ruzstd's encoder, both readable by the reader the
//! post-rebase content check goes through.

use instar_qcow2::compress::CompressionType;
use instar_qcow2::compressor::{CompressFailed, Compressed, Compressor};

pub struct FuzzCompressor;

impl Compressor for FuzzCompressor {
    fn compress(
        &mut self,
        kind: CompressionType,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<Compressed, CompressFailed> {
        let out = match kind {
            CompressionType::Zlib => miniz_oxide::deflate::compress_to_vec(src, 6),
            CompressionType::Zstd => {
                ruzstd::encoding::compress_to_vec(src, ruzstd::encoding::CompressionLevel::Fastest)
            }
        };
        match dst.get_mut(..out.len()) {
            Some(d) => {
                d.copy_from_slice(&out);
                Ok(Compressed::Fits(out.len()))
            }
            None => Ok(Compressed::NoFit),
        }
    }
}
