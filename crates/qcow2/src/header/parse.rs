//! Opening a qcow2 image: the checks of QEMU's `qcow2_do_open`, in its order, with
//! its messages.

use alloc::vec;
use instar_blockdev::BlockDev;

use super::extensions::{self, Context, Extensions, CRYPT_LUKS};
use instar_blockdev::endian::Fixed;

use super::io::{c_str, pread, range_ok};
use super::snapshots::{self, SNAPSHOT_HEADER_SIZE};
use super::*;
use crate::entry::SUBCLUSTERS_PER_CLUSTER;

/// `MIN_CLUSTER_BITS` / `MAX_CLUSTER_BITS`.
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
/// `offsetof(QCowHeader, compression_type)`.
const COMPRESSION_TYPE_OFFSET: u32 = 104;
/// `QCOW_MAX_REFTABLE_SIZE`, `QCOW_MAX_L1_SIZE`, `QCOW_MAX_SNAPSHOTS`.
const MAX_REFTABLE_SIZE: u64 = 8 << 20;
const MAX_L1_SIZE: u64 = 32 << 20;
const MAX_SNAPSHOTS: u64 = 65536;
/// `QCOW_CRYPT_AES`.
const CRYPT_AES: u32 = 1;

/// How the image is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    ReadOnly,
    /// `BDRV_O_RDWR`: refuses the corrupt bit, clears unknown autoclear bits.
    ReadWrite,
}

/// `qcow2_validate_table`.
fn validate_table(
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
    name: &'static str,
) -> Result<(), OpenError> {
    if entries > max_bytes / entry_len {
        return Err(OpenError::TableTooLarge(name));
    }
    if (i64::MAX as u64) - entries * entry_len < offset || !offset.is_multiple_of(cluster_size) {
        return Err(OpenError::TableOffsetInvalid(name));
    }
    Ok(())
}

impl Header {
    /// Open the qcow2 image on `dev` as QEMU would (`qemu-img` without secrets, without
    /// opening backing or data files), and return its in-memory header state.
    ///
    /// Every allocation is bounded by the validated cluster size (at most 2 MiB).
    pub fn read(dev: &mut dyn BlockDev, mode: OpenMode) -> Result<Header, OpenError> {
        let mut fixed = [0u8; V3_HEADER_SIZE as usize];
        pread(dev, 0, &mut fixed).map_err(|_| OpenError::ReadHeader)?;
        let f = Fixed(&fixed);
        if f.be32::<0>() != QCOW2_MAGIC {
            return Err(OpenError::NotQcow2);
        }
        let version = f.be32::<4>();
        if !(2..=3).contains(&version) {
            return Err(OpenError::UnsupportedVersion(version));
        }
        let cluster_bits = f.be32::<20>();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(OpenError::UnsupportedClusterSize(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;

        let backing_file_offset = f.be64::<8>();
        let backing_file_size = f.be32::<16>();
        let size = f.be64::<24>();
        let crypt_method = f.be32::<32>();
        let l1_size = f.be32::<36>();
        let l1_table_offset = f.be64::<40>();
        let refcount_table_offset = f.be64::<48>();
        let refcount_table_clusters = f.be32::<56>();
        let nb_snapshots = f.be32::<60>();
        let snapshots_offset = f.be64::<64>();

        let (
            incompatible_features,
            compatible_features,
            autoclear_features,
            refcount_order,
            header_length,
        ) = if version == 2 {
            (0, 0, 0, 4, V2_HEADER_SIZE)
        } else {
            let header_length = f.be32::<100>();
            if header_length < 104 {
                return Err(OpenError::HeaderTooShort);
            }
            (
                f.be64::<72>(),
                f.be64::<80>(),
                f.be64::<88>(),
                f.be32::<96>(),
                header_length,
            )
        };
        if u64::from(header_length) > cluster_size {
            return Err(OpenError::HeaderExceedsCluster);
        }

        // Everything QEMU reads from here to the backing file name lies in cluster 0.
        let mut cluster0 = vec![0u8; cluster_size as usize];
        pread(dev, 0, &mut cluster0).map_err(|_| OpenError::ReadHeader)?;
        let unknown_header_fields = cluster0
            .get(V3_HEADER_SIZE as usize..header_length as usize)
            .unwrap_or(&[])
            .to_vec();

        if backing_file_offset > cluster_size {
            return Err(OpenError::InvalidBackingFileOffset);
        }
        let ext_end = if backing_file_offset != 0 {
            backing_file_offset
        } else {
            cluster_size
        };

        let compression_type = if header_length > COMPRESSION_TYPE_OFFSET {
            fixed[COMPRESSION_TYPE_OFFSET as usize]
        } else {
            0
        };
        validate_compression_type(compression_type, incompatible_features)?;

        let unknown_incompat = incompatible_features & !INCOMPAT_MASK;
        if unknown_incompat != 0 {
            // QEMU walks the extensions once just to find feature names, ignoring errors.
            let mut ext = Extensions::default();
            let ctx = Context {
                cluster_size,
                crypt_method: 0,
                autoclear_features,
            };
            let _ = extensions::walk(&cluster0, u64::from(header_length), ext_end, ctx, &mut ext);
            let text =
                extensions::describe_unsupported(ext.feature_table.as_deref(), unknown_incompat);
            return Err(OpenError::UnsupportedFeatures(text));
        }

        if incompatible_features & INCOMPAT_CORRUPT != 0 && mode == OpenMode::ReadWrite {
            return Err(OpenError::Corrupt);
        }

        let extended_l2 = incompatible_features & INCOMPAT_EXTL2 != 0;
        if extended_l2 && cluster_size / u64::from(SUBCLUSTERS_PER_CLUSTER) < 512 {
            return Err(OpenError::UnsupportedSubclusterSize(cluster_size / 32));
        }
        if refcount_order > 6 {
            return Err(OpenError::RefcountOrderTooLarge);
        }

        if refcount_table_clusters == 0 {
            return Err(OpenError::NoRefcountTable);
        }
        validate_table(
            refcount_table_offset,
            u64::from(refcount_table_clusters),
            cluster_size,
            MAX_REFTABLE_SIZE,
            cluster_size,
            "Reference count table",
        )?;
        validate_table(
            snapshots_offset,
            u64::from(nb_snapshots),
            SNAPSHOT_HEADER_SIZE,
            SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
            cluster_size,
            "Snapshot table",
        )?;
        validate_table(
            l1_table_offset,
            u64::from(l1_size),
            8,
            MAX_L1_SIZE,
            cluster_size,
            "Active L1 table",
        )?;

        // size_to_l1(): QEMU adds in 64-bit unsigned arithmetic, so a huge size wraps.
        let l2_bits = cluster_bits - if extended_l2 { 4 } else { 3 };
        let shift = cluster_bits + l2_bits;
        let l1_vm_state_index = size.wrapping_add((1u64 << shift) - 1) >> shift;
        if l1_vm_state_index > i32::MAX as u64 {
            return Err(OpenError::TooBig);
        }
        if u64::from(l1_size) < l1_vm_state_index {
            return Err(OpenError::L1TooSmall);
        }
        // The L1 table and the refcount table are read whole at open. Past the end of
        // the file they read as zeros, so only QEMU's request limit can fail them.
        if l1_size > 0 && !range_ok(l1_table_offset, u64::from(l1_size) * 8) {
            return Err(OpenError::ReadL1);
        }
        if crypt_method > CRYPT_LUKS {
            return Err(OpenError::UnsupportedEncryption(crypt_method));
        }
        if !range_ok(
            refcount_table_offset,
            u64::from(refcount_table_clusters) * cluster_size,
        ) {
            return Err(OpenError::ReadRefcountTable);
        }

        let mut ext = Extensions::default();
        let ctx = Context {
            cluster_size,
            crypt_method,
            autoclear_features,
        };
        extensions::walk(&cluster0, u64::from(header_length), ext_end, ctx, &mut ext)?;

        if incompatible_features & INCOMPAT_DATA_FILE != 0 {
            if ext.data_file.is_none() {
                return Err(OpenError::DataFileRequired);
            }
        } else if autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 {
            return Err(OpenError::DataFileRawWithoutDataFile);
        }

        if crypt_method == CRYPT_AES {
            return Err(OpenError::SecretRequired);
        }
        if crypt_method == CRYPT_LUKS {
            // A valid crypto extension already ended the walk with SecretRequired.
            return Err(OpenError::MissingCryptoHeader(crypt_method));
        }

        let backing_file = if backing_file_offset != 0 {
            let len = u64::from(backing_file_size);
            if len > 1023.min(cluster_size - backing_file_offset) {
                return Err(OpenError::BackingNameTooLong);
            }
            let start = backing_file_offset as usize;
            let name = cluster0.get(start..start + len as usize).unwrap_or(&[]);
            Some(c_str(name).to_vec())
        } else {
            None
        };

        snapshots::check(dev, snapshots_offset, nb_snapshots)?;

        let header = Header {
            version,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible_features,
            compatible_features,
            autoclear_features,
            refcount_order,
            header_length,
            compression_type,
            unknown_header_fields,
            backing_file,
            backing_format: ext.backing_format,
            data_file: ext.data_file,
            crypto_header: ext.crypto_header,
            bitmaps: ext.bitmaps,
            unknown_extensions: ext.unknown,
            stale_bitmaps: ext.stale_bitmaps,
        };

        // A read-write open rewrites the header at once when unknown autoclear bits are
        // set (or a stale bitmaps extension must go); that rewrite can run out of room.
        if mode == OpenMode::ReadWrite
            && (autoclear_features & !AUTOCLEAR_MASK != 0 || header.stale_bitmaps)
            && header.rebuild().is_err()
        {
            return Err(OpenError::HeaderUpdateNoSpace);
        }
        if header.virtual_size() > super::io::BDRV_MAX_LENGTH {
            return Err(OpenError::SizeTooLarge);
        }
        Ok(header)
    }
}

/// `validate_compression_type`: zlib (0) or zstd (1), with the incompatible bit set
/// exactly when the type is not zlib.
fn validate_compression_type(kind: u8, incompatible: u64) -> Result<(), OpenError> {
    if kind > 1 {
        return Err(OpenError::UnknownCompressionType(kind));
    }
    let bit = incompatible & INCOMPAT_COMPRESSION != 0;
    match (kind, bit) {
        (0, true) => Err(OpenError::CompressionBitSet),
        (1, false) => Err(OpenError::CompressionBitMissing),
        _ => Ok(()),
    }
}
