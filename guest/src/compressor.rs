//! The `-c` compressor: zlib 1.2.13 and zstd 1.5.4 or 1.5.7 (`csrc/`, compiled by
//! `build.rs`), called through instar's C glue `csrc/qcow2_zlib.c` and
//! `csrc/qcow2_zstd.c`.
//!
//! `build.rs` gives every global symbol of each zstd version's objects (its glue
//! included) the prefix `zstd154_` or `zstd157_`, so both link side by side; the
//! request says which one compresses ([`ZstdVersion`]).

use core::ffi::c_char;

use instar_abi::ZstdVersion;
use instar_qcow2::compress::CompressionType;
use instar_qcow2::compressor::{CompressFailed, Compressed, Compressor};

/// The glue's signature: compress `src_size` bytes of `src` into at most `dest_size`
/// bytes of `dest`; the length, or `NO_FIT`, or another negative value on failure.
type CompressFn =
    unsafe extern "C" fn(dest: *mut u8, dest_size: usize, src: *const u8, src_size: usize) -> i64;

extern "C" {
    fn instar_zlib_compress(
        dest: *mut u8,
        dest_size: usize,
        src: *const u8,
        src_size: usize,
    ) -> i64;
    fn zlibVersion() -> *const c_char;
    fn zstd154_instar_zstd_compress(
        dest: *mut u8,
        dest_size: usize,
        src: *const u8,
        src_size: usize,
    ) -> i64;
    fn zstd154_ZSTD_versionString() -> *const c_char;
    fn zstd157_instar_zstd_compress(
        dest: *mut u8,
        dest_size: usize,
        src: *const u8,
        src_size: usize,
    ) -> i64;
    fn zstd157_ZSTD_versionString() -> *const c_char;
}

/// `qcow2_*.c`'s "does not fit" return.
const NO_FIT: i64 = -1;

/// Compresses with the C libraries linked into the guest: zlib, and the zstd release
/// the request chose.
pub struct GuestCompressor {
    pub zstd: ZstdVersion,
}

impl GuestCompressor {
    fn zstd_fn(&self) -> CompressFn {
        match self.zstd {
            ZstdVersion::V1_5_4 => zstd154_instar_zstd_compress,
            ZstdVersion::V1_5_7 => zstd157_instar_zstd_compress,
        }
    }

    /// `ZSTD_versionString()` of the zstd library this compressor calls.
    pub fn zstd_version(&self) -> &'static [u8] {
        let f = match self.zstd {
            ZstdVersion::V1_5_4 => zstd154_ZSTD_versionString,
            ZstdVersion::V1_5_7 => zstd157_ZSTD_versionString,
        };
        // SAFETY: ZSTD_versionString takes nothing and returns a pointer to a static
        // NUL-terminated string literal (ZSTD_VERSION_STRING).
        unsafe { static_c_str(f()) }
    }
}

/// zlib's `zlibVersion()`.
pub fn zlib_version() -> &'static [u8] {
    // SAFETY: zlibVersion takes nothing and returns a pointer to the static
    // NUL-terminated string literal ZLIB_VERSION.
    unsafe { static_c_str(zlibVersion()) }
}

/// The bytes of a short C string that lives as long as the program (a version
/// string), up to its NUL or its first 32 bytes. (`CStr::from_ptr` would call
/// `strlen`, which the guest has no C library for.)
///
/// # Safety
/// `p` points to a NUL-terminated string in static storage.
unsafe fn static_c_str(p: *const c_char) -> &'static [u8] {
    let mut n = 0;
    // SAFETY: the string is NUL-terminated, so every byte up to and including the NUL
    // is readable; the loop stops at the NUL.
    while n < 32 && unsafe { *p.add(n) } != 0 {
        n += 1;
    }
    // SAFETY: the `n` bytes before the NUL (or the first 32) are readable and static.
    unsafe { core::slice::from_raw_parts(p.cast::<u8>(), n) }
}

impl Compressor for GuestCompressor {
    fn compress(
        &mut self,
        kind: CompressionType,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<Compressed, CompressFailed> {
        let f: CompressFn = match kind {
            CompressionType::Zlib => instar_zlib_compress,
            CompressionType::Zstd => self.zstd_fn(),
        };
        // SAFETY: every glue function reads exactly `src.len()` bytes from `src` and
        // writes at most `dst.len()` bytes to `dst` (zlib's avail_out and zstd's output
        // buffer size bound them), keeps no pointer past the call, and allocates only
        // through `libc.rs`.
        let r = unsafe { f(dst.as_mut_ptr(), dst.len(), src.as_ptr(), src.len()) };
        match usize::try_from(r) {
            Ok(n) if n <= dst.len() => Ok(Compressed::Fits(n)),
            Ok(_) => Err(CompressFailed),
            Err(_) if r == NO_FIT => Ok(Compressed::NoFit),
            Err(_) => Err(CompressFailed),
        }
    }
}
