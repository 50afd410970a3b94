//! The `-c` compressor: zlib 1.2.13 and zstd 1.5.4 (`csrc/`, compiled by `build.rs`),
//! called through instar's C glue `csrc/qcow2_compress.c`.

use instar_qcow2::compress::CompressionType;
use instar_qcow2::compressor::{CompressFailed, Compressed, Compressor};

extern "C" {
    fn instar_zlib_compress(
        dest: *mut u8,
        dest_size: usize,
        src: *const u8,
        src_size: usize,
    ) -> i64;
    fn instar_zstd_compress(
        dest: *mut u8,
        dest_size: usize,
        src: *const u8,
        src_size: usize,
    ) -> i64;
}

/// `qcow2_compress.c`'s "does not fit" return.
const NO_FIT: i64 = -1;

/// Compresses with the C libraries linked into the guest.
pub struct GuestCompressor;

impl Compressor for GuestCompressor {
    fn compress(
        &mut self,
        kind: CompressionType,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<Compressed, CompressFailed> {
        let f = match kind {
            CompressionType::Zlib => instar_zlib_compress,
            CompressionType::Zstd => instar_zstd_compress,
        };
        // SAFETY: both functions read exactly `src.len()` bytes from `src` and write at
        // most `dst.len()` bytes to `dst` (zlib's avail_out and zstd's output buffer
        // size bound them), keep no pointer past the call, and allocate only through
        // `libc.rs`.
        let r = unsafe { f(dst.as_mut_ptr(), dst.len(), src.as_ptr(), src.len()) };
        match usize::try_from(r) {
            Ok(n) if n <= dst.len() => Ok(Compressed::Fits(n)),
            Ok(_) => Err(CompressFailed),
            Err(_) if r == NO_FIT => Ok(Compressed::NoFit),
            Err(_) => Err(CompressFailed),
        }
    }
}
