//! The 64-byte qed header: parse, QEMU's open-time validation (`bdrv_qed_do_open`),
//! and the rewrite `bdrv_qed_co_change_backing_file` makes.

use alloc::vec::Vec;

use instar_blockdev::bytes::Fixed;

/// `"QED\0"` read as a little-endian u32.
pub const MAGIC: u32 = 0x0044_4551;
/// `sizeof(QEDHeader)`: the name a backing change writes always follows it.
pub const HEADER_LEN: usize = 64;

/// The image names a backing file.
pub const F_BACKING_FILE: u64 = 0x01;
/// The image was not closed cleanly and needs a consistency check.
pub const F_NEED_CHECK: u64 = 0x02;
/// The backing file is raw and must not be probed.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
/// Feature bits QEMU knows; any other one makes the image unopenable.
pub const FEATURE_MASK: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;

/// `sizeof(bs->backing_file)`: a stored name must be shorter.
pub const BACKING_NAME_BUF: u32 = 4096;

const MIN_CLUSTER_SIZE: u32 = 4 << 10;
const MAX_CLUSTER_SIZE: u32 = 64 << 20;
const MIN_TABLE_SIZE: u32 = 1;
const MAX_TABLE_SIZE: u32 = 16;

/// Why QEMU refuses to open a qed image. The text is QEMU's (after
/// `Could not open '<file>': `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("Image not in QED format")]
    NotQed,
    #[error("Unsupported QED features: {0:x}")]
    UnsupportedFeatures(u64),
    #[error("QED cluster size is invalid")]
    ClusterSize,
    #[error("QED table size is invalid")]
    TableSize,
    #[error("QED image size is invalid")]
    ImageSize,
    #[error("QED table offset is invalid")]
    TableOffset,
    #[error("QED header size is too large")]
    HeaderSize,
    #[error("QED backing filename offset is invalid")]
    BackingOffset,
    #[error("Failed to read backing filename")]
    BackingName,
}

/// Why a backing-file change is refused (the errno qemu-img reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// `ENOSPC`: header and name do not fit in `header_size` clusters.
    #[error("No space left in the file header")]
    NoSpace,
    /// `ENOTSUP`: unknown compat features may own the bytes after the header.
    #[error("Operation not supported")]
    UnknownCompat,
}

/// The header fields, host-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub magic: u32,
    pub cluster_size: u32,
    /// L1 and L2 table size, in clusters.
    pub table_size: u32,
    /// In clusters.
    pub header_size: u32,
    pub features: u64,
    pub compat_features: u64,
    pub autoclear_features: u64,
    pub l1_table_offset: u64,
    pub image_size: u64,
    pub backing_filename_offset: u32,
    pub backing_filename_size: u32,
}

fn power_of_two_in(v: u32, min: u32, max: u32) -> bool {
    (min..=max).contains(&v) && v.is_power_of_two()
}

/// `qed_max_image_size`, with QEMU's 64-bit wrap-around: with the largest clusters and
/// tables the product wraps (to 0 at 64 MiB clusters), and QEMU's limit is that value.
pub fn max_image_size(cluster_size: u32, table_size: u32) -> u64 {
    let entries = u64::from(table_size.wrapping_mul(cluster_size)) / 8;
    let l2_size = entries.wrapping_mul(u64::from(cluster_size));
    l2_size.wrapping_mul(entries)
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        let b = Fixed(b);
        Header {
            magic: b.le32::<0>(),
            cluster_size: b.le32::<4>(),
            table_size: b.le32::<8>(),
            header_size: b.le32::<12>(),
            features: b.le64::<16>(),
            compat_features: b.le64::<24>(),
            autoclear_features: b.le64::<32>(),
            l1_table_offset: b.le64::<40>(),
            image_size: b.le64::<48>(),
            backing_filename_offset: b.le32::<56>(),
            backing_filename_size: b.le32::<60>(),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        b[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        b[56..60].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        b[60..64].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        b
    }

    pub fn cluster_size(&self) -> u64 {
        u64::from(self.cluster_size)
    }
    /// Bytes of one L1 or L2 table.
    pub fn table_bytes(&self) -> u64 {
        self.cluster_size() * u64::from(self.table_size)
    }
    /// Entries of one table.
    pub fn table_entries(&self) -> u64 {
        self.table_bytes() / 8
    }
    pub fn has_backing(&self) -> bool {
        self.features & F_BACKING_FILE != 0
    }
    pub fn need_check(&self) -> bool {
        self.features & F_NEED_CHECK != 0
    }
    /// The backing file is opened as raw without probing.
    pub fn backing_is_raw(&self) -> bool {
        self.features & F_BACKING_FORMAT_NO_PROBE != 0
    }

    /// The checks of QEMU's open, in its order. `file_size` is the file's length
    /// rounded down to a whole cluster (QEMU's `s->file_size`), given by the caller
    /// once the cluster size is known valid; see [`Header::validate_all`].
    pub fn validate_all(&self, file_len: u64) -> Result<(), HeaderError> {
        if self.magic != MAGIC {
            return Err(HeaderError::NotQed);
        }
        if self.features & !FEATURE_MASK != 0 {
            return Err(HeaderError::UnsupportedFeatures(
                self.features & !FEATURE_MASK,
            ));
        }
        if !power_of_two_in(self.cluster_size, MIN_CLUSTER_SIZE, MAX_CLUSTER_SIZE) {
            return Err(HeaderError::ClusterSize);
        }
        if !power_of_two_in(self.table_size, MIN_TABLE_SIZE, MAX_TABLE_SIZE) {
            return Err(HeaderError::TableSize);
        }
        if !self.image_size.is_multiple_of(512)
            || self.image_size > max_image_size(self.cluster_size, self.table_size)
        {
            return Err(HeaderError::ImageSize);
        }
        let file_size = file_len & !(self.cluster_size() - 1);
        if !self.table_offset_ok(self.l1_table_offset, file_size) {
            return Err(HeaderError::TableOffset);
        }
        if self.header_size > u32::MAX / self.cluster_size {
            return Err(HeaderError::HeaderSize);
        }
        if self.has_backing() {
            let end =
                u64::from(self.backing_filename_offset) + u64::from(self.backing_filename_size);
            if end > u64::from(self.cluster_size) * u64::from(self.header_size) {
                return Err(HeaderError::BackingOffset);
            }
            if self.backing_filename_size >= BACKING_NAME_BUF {
                return Err(HeaderError::BackingName);
            }
        }
        Ok(())
    }

    /// `qed_check_cluster_offset`: cluster-aligned, past the header, inside the file.
    pub fn cluster_offset_ok(&self, offset: u64, file_size: u64) -> bool {
        let header_bytes = u64::from(self.header_size) * self.cluster_size();
        offset & (self.cluster_size() - 1) == 0 && offset >= header_bytes && offset < file_size
    }

    /// `qed_check_table_offset`: the first and last cluster of the table are valid.
    pub fn table_offset_ok(&self, offset: u64, file_size: u64) -> bool {
        let span = u64::from(self.table_size.saturating_sub(1)) * self.cluster_size();
        let end = offset.wrapping_add(span);
        // QEMU's overflow test is `end <= offset`, which also rejects every table of
        // one cluster (table_size 1).
        end > offset
            && self.cluster_offset_ok(offset, file_size)
            && self.cluster_offset_ok(end, file_size)
    }

    /// The bytes `bdrv_qed_co_change_backing_file` writes at offset 0: the header with
    /// the backing features and name fields replaced, then the name. `None` detaches.
    pub fn change_backing(
        &self,
        name: Option<&[u8]>,
        format: Option<&[u8]>,
    ) -> Result<(Header, Vec<u8>), ChangeError> {
        if name.is_some() && self.compat_features != 0 {
            return Err(ChangeError::UnknownCompat);
        }
        let mut h = *self;
        h.features &= !(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
        if name.is_some() {
            h.features |= F_BACKING_FILE;
            if format == Some(b"raw".as_slice()) {
                h.features |= F_BACKING_FORMAT_NO_PROBE;
            }
        }
        let name = name.unwrap_or_default();
        let total = HEADER_LEN as u64 + name.len() as u64;
        if total > u64::from(h.header_size) * h.cluster_size() {
            return Err(ChangeError::NoSpace);
        }
        h.backing_filename_offset = HEADER_LEN as u32;
        h.backing_filename_size = u32::try_from(name.len()).map_err(|_| ChangeError::NoSpace)?;
        let mut out = Vec::with_capacity(total as usize);
        out.extend_from_slice(&h.to_bytes());
        out.extend_from_slice(name);
        Ok((h, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `qemu-img create -f qed -o cluster_size=4096 x 1M` writes.
    fn fresh() -> Header {
        Header {
            magic: MAGIC,
            cluster_size: 4096,
            table_size: 4,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: 4096,
            image_size: 1 << 20,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        }
    }

    #[test]
    fn bytes_round_trip() {
        let h = fresh();
        assert_eq!(Header::parse(&h.to_bytes()), h);
        assert_eq!(&h.to_bytes()[..4], b"QED\0");
    }

    #[test]
    fn validation_follows_qemus_order() {
        let file = 5 * 4096;
        assert_eq!(fresh().validate_all(file), Ok(()));
        let mut h = fresh();
        h.features = 0x18;
        h.cluster_size = 3;
        assert_eq!(
            h.validate_all(file),
            Err(HeaderError::UnsupportedFeatures(0x18))
        );
        let mut h = fresh();
        h.table_size = 1;
        assert_eq!(h.validate_all(file), Err(HeaderError::TableOffset));
        let mut h = fresh();
        h.image_size = 513;
        assert_eq!(h.validate_all(file), Err(HeaderError::ImageSize));
        // The L1 table must lie inside the file, rounded down to a cluster.
        assert_eq!(
            fresh().validate_all(5 * 4096 - 1),
            Err(HeaderError::TableOffset)
        );
        let mut h = fresh();
        h.features = F_BACKING_FILE;
        h.backing_filename_offset = 64;
        h.backing_filename_size = 4033;
        assert_eq!(h.validate_all(file), Err(HeaderError::BackingOffset));
        h.header_size = 2;
        h.l1_table_offset = 8192;
        h.backing_filename_size = 4096;
        assert_eq!(h.validate_all(6 * 4096), Err(HeaderError::BackingName));
    }

    #[test]
    fn change_backing_sets_features_and_fits_the_header() {
        let (h, bytes) = fresh()
            .change_backing(Some(b"b.raw"), Some(b"raw"))
            .unwrap();
        assert_eq!(h.features, F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
        assert_eq!(
            (h.backing_filename_offset, h.backing_filename_size),
            (64, 5)
        );
        assert_eq!(&bytes[64..], b"b.raw");
        let (h2, _) = h.change_backing(Some(b"b.qcow2"), Some(b"qcow2")).unwrap();
        assert_eq!(h2.features, F_BACKING_FILE);
        let (h3, bytes) = h2.change_backing(None, None).unwrap();
        assert_eq!(h3.features, 0);
        assert_eq!(
            (h3.backing_filename_offset, h3.backing_filename_size),
            (64, 0)
        );
        assert_eq!(bytes.len(), 64);
        let long = [b'n'; 4032];
        assert!(fresh().change_backing(Some(&long), Some(b"raw")).is_ok());
        assert_eq!(
            fresh().change_backing(Some(&[b'n'; 4033]), Some(b"raw")),
            Err(ChangeError::NoSpace)
        );
        let mut compat = fresh();
        compat.compat_features = 1;
        assert_eq!(
            compat.change_backing(Some(b"x"), Some(b"raw")),
            Err(ChangeError::UnknownCompat)
        );
        assert!(compat.change_backing(None, None).is_ok());
    }
}
