//! Opening a qcow2 image: the checks of QEMU's `qcow2_do_open`, in its order, with
//! its messages.

use alloc::vec;
use alloc::vec::Vec;
use instar_blockdev::BlockDev;

use super::extensions::{self, Context, Extensions, CRYPT_LUKS};
use instar_blockdev::bytes::{c_str, Fixed};

use super::io::{pread, range_ok};
use super::snapshots::{self, SNAPSHOT_HEADER_SIZE};
use super::*;
use crate::geometry::{Geometry, MAX_L1_BYTES, MAX_REFCOUNT_ORDER, MAX_REFTABLE_BYTES};

/// `offsetof(QCowHeader, compression_type)`.
const COMPRESSION_TYPE_OFFSET: u32 = 104;
/// `QCOW_MAX_SNAPSHOTS`.
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

/// The fixed header fields (bytes 0..112), as QEMU reads them into `QCowHeader`; a v2
/// image reads the v3 fields as their defaults.
struct Fields {
    version: u32,
    backing_file_offset: u64,
    backing_file_size: u32,
    cluster_bits: u32,
    size: u64,
    crypt_method: u32,
    l1_size: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    nb_snapshots: u32,
    snapshots_offset: u64,
    incompatible_features: u64,
    compatible_features: u64,
    autoclear_features: u64,
    refcount_order: u32,
    header_length: u32,
    compression_type: u8,
}

impl Fields {
    /// Magic, version, cluster size and header length, in QEMU's order.
    fn read(fixed: &[u8; V3_HEADER_SIZE as usize]) -> Result<Fields, OpenError> {
        let f = Fixed(fixed);
        if f.be32::<0>() != QCOW2_MAGIC {
            return Err(OpenError::NotQcow2);
        }
        let version = f.be32::<4>();
        if !(2..=3).contains(&version) {
            return Err(OpenError::UnsupportedVersion(version));
        }
        let cluster_bits = f.be32::<20>();
        if !Geometry::cluster_bits_ok(cluster_bits) {
            return Err(OpenError::UnsupportedClusterSize(cluster_bits));
        }
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
        if u64::from(header_length) > 1u64 << cluster_bits {
            return Err(OpenError::HeaderExceedsCluster);
        }
        let compression_type = if header_length > COMPRESSION_TYPE_OFFSET {
            fixed[COMPRESSION_TYPE_OFFSET as usize]
        } else {
            0
        };
        Ok(Fields {
            version,
            backing_file_offset: f.be64::<8>(),
            backing_file_size: f.be32::<16>(),
            cluster_bits,
            size: f.be64::<24>(),
            crypt_method: f.be32::<32>(),
            l1_size: f.be32::<36>(),
            l1_table_offset: f.be64::<40>(),
            refcount_table_offset: f.be64::<48>(),
            refcount_table_clusters: f.be32::<56>(),
            nb_snapshots: f.be32::<60>(),
            snapshots_offset: f.be64::<64>(),
            incompatible_features,
            compatible_features,
            autoclear_features,
            refcount_order,
            header_length,
            compression_type,
        })
    }

    fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Where the extension area ends: at the backing file name, or the cluster's end.
    fn extensions_end(&self) -> Result<u64, OpenError> {
        let cluster_size = self.cluster_size();
        if self.backing_file_offset > cluster_size {
            return Err(OpenError::InvalidBackingFileOffset);
        }
        Ok(if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            cluster_size
        })
    }

    /// Feature bits: compression type, unknown incompatible features (named from the
    /// feature table in cluster 0), the corrupt bit.
    fn check_features(
        &self,
        cluster0: &[u8],
        ext_end: u64,
        mode: OpenMode,
    ) -> Result<(), OpenError> {
        validate_compression_type(self.compression_type, self.incompatible_features)?;
        let unknown_incompat = self.incompatible_features & !INCOMPAT_MASK;
        if unknown_incompat != 0 {
            // QEMU walks the extensions once just to find feature names, ignoring errors.
            let mut ext = Extensions::default();
            let ctx = Context {
                cluster_size: self.cluster_size(),
                crypt_method: 0,
                keyed: false,
                autoclear_features: self.autoclear_features,
            };
            let start = u64::from(self.header_length);
            let _ = extensions::walk(cluster0, start, ext_end, ctx, &mut ext);
            let text =
                extensions::describe_unsupported(ext.feature_table.as_deref(), unknown_incompat);
            return Err(OpenError::UnsupportedFeatures(text));
        }
        if self.incompatible_features & INCOMPAT_CORRUPT != 0 && mode == OpenMode::ReadWrite {
            return Err(OpenError::Corrupt);
        }
        Ok(())
    }

    /// Subclusters, refcount order, the tables' sizes and places, the L1 size against
    /// the disk size, the encryption method; then the geometry they make.
    fn check_geometry(&self) -> Result<Geometry, OpenError> {
        let cluster_size = self.cluster_size();
        let extended_l2 = self.extended_l2();
        if let Some(sub) = Geometry::subclusters_too_small(self.cluster_bits, extended_l2) {
            return Err(OpenError::UnsupportedSubclusterSize(sub));
        }
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(OpenError::RefcountOrderTooLarge);
        }
        if self.refcount_table_clusters == 0 {
            return Err(OpenError::NoRefcountTable);
        }
        validate_table(
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters),
            cluster_size,
            MAX_REFTABLE_BYTES,
            cluster_size,
            "Reference count table",
        )?;
        validate_table(
            self.snapshots_offset,
            u64::from(self.nb_snapshots),
            SNAPSHOT_HEADER_SIZE,
            SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
            cluster_size,
            "Snapshot table",
        )?;
        validate_table(
            self.l1_table_offset,
            u64::from(self.l1_size),
            8,
            MAX_L1_BYTES,
            cluster_size,
            "Active L1 table",
        )?;
        let l1_vm_state_index = Geometry::l1_entries_for(self.cluster_bits, extended_l2, self.size);
        if l1_vm_state_index > i32::MAX as u64 {
            return Err(OpenError::TooBig);
        }
        if u64::from(self.l1_size) < l1_vm_state_index {
            return Err(OpenError::L1TooSmall);
        }
        // The L1 table and the refcount table are read whole at open. Past the end of
        // the file they read as zeros, so only QEMU's request limit can fail them.
        if self.l1_size > 0 && !range_ok(self.l1_table_offset, u64::from(self.l1_size) * 8) {
            return Err(OpenError::ReadL1);
        }
        if self.crypt_method > CRYPT_LUKS {
            return Err(OpenError::UnsupportedEncryption(self.crypt_method));
        }
        let reftable_len = u64::from(self.refcount_table_clusters) * cluster_size;
        if !range_ok(self.refcount_table_offset, reftable_len) {
            return Err(OpenError::ReadRefcountTable);
        }
        Ok(Geometry::new(
            self.cluster_bits,
            extended_l2,
            self.refcount_order,
            self.size,
        ))
    }

    /// The extensions, then the checks QEMU makes on what they hold.
    fn read_extensions(
        &self,
        cluster0: &[u8],
        ext_end: u64,
        keyed: bool,
    ) -> Result<Extensions, OpenError> {
        let mut ext = Extensions::default();
        let ctx = Context {
            cluster_size: self.cluster_size(),
            crypt_method: self.crypt_method,
            autoclear_features: self.autoclear_features,
            keyed,
        };
        extensions::walk(
            cluster0,
            u64::from(self.header_length),
            ext_end,
            ctx,
            &mut ext,
        )?;
        if self.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            if ext.data_file.is_none() {
                return Err(OpenError::DataFileRequired);
            }
        } else if self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 {
            return Err(OpenError::DataFileRawWithoutDataFile);
        }
        if self.crypt_method == CRYPT_AES && !keyed {
            return Err(OpenError::SecretRequired);
        }
        if self.crypt_method == CRYPT_LUKS && ext.crypto_header.is_none() {
            // Without a key, a valid crypto extension already ended the walk.
            return Err(OpenError::MissingCryptoHeader(self.crypt_method));
        }
        Ok(ext)
    }

    /// The backing file name stored in cluster 0, if any.
    fn backing_file(&self, cluster0: &[u8]) -> Result<Option<Vec<u8>>, OpenError> {
        if self.backing_file_offset == 0 {
            return Ok(None);
        }
        let len = u64::from(self.backing_file_size);
        if len > 1023.min(self.cluster_size() - self.backing_file_offset) {
            return Err(OpenError::BackingNameTooLong);
        }
        let start = self.backing_file_offset as usize;
        let name = cluster0.get(start..start + len as usize).unwrap_or(&[]);
        Ok(Some(c_str(name).to_vec()))
    }
}

impl Header {
    /// Open the qcow2 image on `dev` as QEMU would (`qemu-img` without secrets, without
    /// opening backing or data files), and return its in-memory header state.
    ///
    /// Every allocation is bounded by the validated cluster size (at most 2 MiB).
    pub fn read(dev: &mut dyn BlockDev, mode: OpenMode) -> Result<Header, OpenError> {
        Self::read_keyed(dev, mode, false)
    }

    /// [`Header::read`] for a caller that has a passphrase for an encrypted image
    /// (`keyed`): the encryption checks pass here, and the caller opens the
    /// encryption header and unlocks the key itself (`instar_luks`), as QEMU's open
    /// does at the crypto header extension.
    pub fn read_keyed(
        dev: &mut dyn BlockDev,
        mode: OpenMode,
        keyed: bool,
    ) -> Result<Header, OpenError> {
        let mut fixed = [0u8; V3_HEADER_SIZE as usize];
        pread(dev, 0, &mut fixed).map_err(|_| OpenError::ReadHeader)?;
        let f = Fields::read(&fixed)?;

        // Everything QEMU reads from here to the backing file name lies in cluster 0.
        let mut cluster0 = vec![0u8; f.cluster_size() as usize];
        pread(dev, 0, &mut cluster0).map_err(|_| OpenError::ReadHeader)?;
        let unknown_header_fields = cluster0
            .get(V3_HEADER_SIZE as usize..f.header_length as usize)
            .unwrap_or(&[])
            .to_vec();
        let ext_end = f.extensions_end()?;
        f.check_features(&cluster0, ext_end, mode)?;
        let geometry = f.check_geometry()?;
        let ext = f.read_extensions(&cluster0, ext_end, keyed)?;
        let backing_file = f.backing_file(&cluster0)?;
        snapshots::check(dev, f.snapshots_offset, f.nb_snapshots)?;

        let header = Header {
            version: f.version,
            geometry,
            size: f.size,
            crypt_method: f.crypt_method,
            l1_size: f.l1_size,
            l1_table_offset: f.l1_table_offset,
            refcount_table_offset: f.refcount_table_offset,
            refcount_table_clusters: f.refcount_table_clusters,
            nb_snapshots: f.nb_snapshots,
            snapshots_offset: f.snapshots_offset,
            incompatible_features: f.incompatible_features,
            compatible_features: f.compatible_features,
            autoclear_features: f.autoclear_features,
            header_length: f.header_length,
            compression_type: f.compression_type,
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
            && (f.autoclear_features & !AUTOCLEAR_MASK != 0 || header.stale_bitmaps)
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
