//! The header extension area, walked as QEMU's `qcow2_read_extensions` does.

use alloc::vec::Vec;

use instar_blockdev::bytes::{be32, c_str, Fixed};

use super::error::OpenError;
use super::{
    BitmapsExt, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, EXT_FEATURE_TABLE,
};

/// `sizeof(bs->backing_format)`: a backing format name must be shorter than this.
pub(crate) const BACKING_FORMAT_BUF: u32 = 16;
/// `QCOW2_MAX_BITMAPS`.
const MAX_BITMAPS: u32 = 65535;
/// `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`.
const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// `QCOW_CRYPT_LUKS`.
pub(crate) const CRYPT_LUKS: u32 = 2;

/// What the walk collected. Where an extension appears twice, the last one wins,
/// as in QEMU.
#[derive(Debug, Default)]
pub(crate) struct Extensions {
    pub backing_format: Option<Vec<u8>>,
    pub data_file: Option<Vec<u8>>,
    pub crypto_header: Option<(u64, u64)>,
    pub bitmaps: Option<BitmapsExt>,
    pub stale_bitmaps: bool,
    /// Unknown extensions in file order.
    pub unknown: Vec<(u32, Vec<u8>)>,
    /// Raw bytes of the image's own feature-name table.
    pub feature_table: Option<Vec<u8>>,
}

/// Image state the walk depends on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context {
    pub cluster_size: u64,
    /// `s->crypt_method_header` at the time of the walk (0 during the early walk for
    /// the feature table, which runs before QEMU records the method).
    pub crypt_method: u32,
    pub autoclear_features: u64,
    /// The caller opens the LUKS header itself with a passphrase (QEMU's open with
    /// `encrypt.key-secret`); without one the walk fails as QEMU's does.
    pub keyed: bool,
}

/// Walk `[start, end)` of cluster 0 (`buf`, one full cluster). Stops at the end
/// marker or at `end`. On error, `ext` holds what was collected before it.
pub(crate) fn walk(
    buf: &[u8],
    start: u64,
    end: u64,
    ctx: Context,
    ext: &mut Extensions,
) -> Result<(), OpenError> {
    let mut offset = start;
    while offset < end {
        let at = offset as usize;
        offset += 8;
        if offset > end {
            return Err(OpenError::ExtensionTooLarge);
        }
        // In bounds: offset <= end <= cluster size = buf.len().
        let (Some(magic), Some(len)) = (be32(buf, at), be32(buf, at + 4)) else {
            return Err(OpenError::ExtensionTooLarge);
        };
        if u64::from(len) > end - offset {
            return Err(OpenError::ExtensionTooLarge);
        }
        // In bounds: offset + len <= end <= cluster size = buf.len().
        let data_at = offset as usize;
        let data = buf.get(data_at..data_at + len as usize).unwrap_or(&[]);
        match magic {
            0 => return Ok(()),
            EXT_BACKING_FORMAT => {
                if len >= BACKING_FORMAT_BUF {
                    return Err(OpenError::BackingFormatTooLarge(len));
                }
                ext.backing_format = Some(c_str(data).to_vec());
            }
            EXT_FEATURE_TABLE => ext.feature_table = Some(data.to_vec()),
            EXT_CRYPTO => {
                if ctx.crypt_method != CRYPT_LUKS {
                    return Err(OpenError::CryptoNotLuks);
                }
                let Some(data) = data.first_chunk::<16>().filter(|_| len == 16) else {
                    return Err(OpenError::CryptoHeaderSize(len));
                };
                let data = Fixed(data);
                let off = data.be64::<0>();
                ext.crypto_header = Some((off, data.be64::<8>()));
                if !off.is_multiple_of(ctx.cluster_size) {
                    return Err(OpenError::CryptoHeaderOffset {
                        offset: off,
                        cluster_size: ctx.cluster_size,
                    });
                }
                // QEMU opens the LUKS header here; without a secret that fails.
                if !ctx.keyed {
                    return Err(OpenError::SecretRequired);
                }
            }
            EXT_BITMAPS => {
                let Some(data) = data.first_chunk::<24>().filter(|_| len == 24) else {
                    return Err(OpenError::BitmapsExtLength);
                };
                let data = Fixed(data);
                if ctx.autoclear_features & super::AUTOCLEAR_BITMAPS == 0 {
                    // Written by a program without bitmap support: QEMU ignores it.
                    ext.stale_bitmaps = true;
                } else {
                    if data.be32::<4>() != 0 {
                        return Err(OpenError::BitmapsReserved);
                    }
                    let b = BitmapsExt {
                        nb_bitmaps: data.be32::<0>(),
                        bitmap_directory_size: data.be64::<8>(),
                        bitmap_directory_offset: data.be64::<16>(),
                    };
                    if b.nb_bitmaps > MAX_BITMAPS {
                        return Err(OpenError::TooManyBitmaps(b.nb_bitmaps));
                    }
                    if b.nb_bitmaps == 0 {
                        return Err(OpenError::ZeroBitmaps);
                    }
                    if !b.bitmap_directory_offset.is_multiple_of(ctx.cluster_size) {
                        return Err(OpenError::BitmapDirectoryOffset);
                    }
                    if b.bitmap_directory_size > MAX_BITMAP_DIRECTORY_SIZE {
                        return Err(OpenError::BitmapDirectorySize(b.bitmap_directory_size));
                    }
                    ext.bitmaps = Some(b);
                }
            }
            EXT_DATA_FILE => ext.data_file = Some(c_str(data).to_vec()),
            _ => ext.unknown.push((magic, data.to_vec())),
        }
        offset += (u64::from(len) + 7) & !7;
    }
    Ok(())
}

/// QEMU's `report_unsupported_feature`: the names of unknown incompatible bits from the
/// image's feature table, in table order, then the rest as a hex mask.
pub(crate) fn describe_unsupported(table: Option<&[u8]>, mut mask: u64) -> alloc::string::String {
    use core::fmt::Write;
    let mut out = alloc::string::String::new();
    if let Some(table) = table {
        // 48-byte entries: type, bit, 46-byte name; QEMU stops at the first empty name
        // (the table is zero-padded past its end).
        for entry in table.chunks(48) {
            let name = c_str(entry.get(2..).unwrap_or(&[]));
            if name.is_empty() {
                break;
            }
            let (kind, bit) = (entry[0], entry.get(1).copied().unwrap_or(0));
            // `1ULL << bit` in C; x86 masks the count to 6 bits.
            let flag = 1u64.wrapping_shl(u32::from(bit));
            if kind == 0 && mask & flag != 0 {
                if !out.is_empty() {
                    out.push_str(", ");
                }
                out.push_str(&alloc::string::String::from_utf8_lossy(
                    &name[..name.len().min(46)],
                ));
                mask &= !flag;
            }
        }
    }
    if mask != 0 {
        if !out.is_empty() {
            out.push_str(", ");
        }
        let _ = write!(out, "Unknown incompatible feature: {mask:x}");
    }
    out
}
