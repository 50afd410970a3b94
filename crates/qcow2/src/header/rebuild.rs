//! Cluster 0 rebuilt from the in-memory state, exactly as QEMU's `qcow2_update_header`
//! does, and the backing-file change of `qcow2_co_change_backing_file`.

use alloc::vec;
use alloc::vec::Vec;

use super::extensions::BACKING_FORMAT_BUF;
use super::*;
use instar_blockdev::bytes::c_str;

/// Longest backing file name QEMU writes.
pub const MAX_BACKING_NAME: usize = 1023;

/// Why the backing file cannot be changed. QEMU returns these as errno values;
/// callers map them to its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChangeBackingError {
    /// `EINVAL`: the name is longer than 1023 bytes.
    #[error("backing file name longer than 1023 bytes")]
    NameTooLong,
    /// `EINVAL`: the image's external data file is marked raw (`data_file_raw`),
    /// which a backing file would contradict.
    #[error("image has a raw external data file")]
    DataFileRaw,
    /// `ENOSPC`: the header, its extensions and the name do not fit in cluster 0.
    #[error("no space left in the file header")]
    NoSpace,
}

/// A cursor over the cluster being built.
struct Out {
    buf: Vec<u8>,
    pos: usize,
}

impl Out {
    fn room(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), ChangeBackingError> {
        if self.room() < bytes.len() {
            return Err(ChangeBackingError::NoSpace);
        }
        self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
        Ok(())
    }

    /// `header_ext_add`: magic, length, data, zero padding to 8 bytes.
    fn ext(&mut self, magic: u32, data: &[u8]) -> Result<(), ChangeBackingError> {
        let padded = data.len().next_multiple_of(8);
        if self.room() < 8 + padded {
            return Err(ChangeBackingError::NoSpace);
        }
        self.buf[self.pos..self.pos + 4].copy_from_slice(&magic.to_be_bytes());
        self.buf[self.pos + 4..self.pos + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
        self.buf[self.pos + 8..self.pos + 8 + data.len()].copy_from_slice(data);
        self.pos += 8 + padded;
        Ok(())
    }
}

fn set(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

impl Header {
    /// Point the image at a new backing file (`None` detaches), with QEMU's checks.
    /// Names are C strings to QEMU: they end at the first NUL, and the format is kept
    /// in a 16-byte buffer, so at most 15 bytes of it survive.
    pub fn change_backing(
        &mut self,
        file: Option<&[u8]>,
        format: Option<&[u8]>,
    ) -> Result<(), ChangeBackingError> {
        let file = file.map(c_str);
        if file.is_some() && self.data_file_raw() {
            return Err(ChangeBackingError::DataFileRaw);
        }
        if file.is_some_and(|f| f.len() > MAX_BACKING_NAME) {
            return Err(ChangeBackingError::NameTooLong);
        }
        self.backing_file = file.map(<[u8]>::to_vec);
        self.backing_format = format.map(|f| {
            let f = c_str(f);
            f[..f.len().min(BACKING_FORMAT_BUF as usize - 1)].to_vec()
        });
        Ok(())
    }

    /// The whole of cluster 0 as QEMU writes it from this state.
    pub fn rebuild(&self) -> Result<Vec<u8>, ChangeBackingError> {
        let cluster_size = self.cluster_size() as usize;
        let mut out = Out {
            buf: vec![0u8; cluster_size],
            pos: 0,
        };
        let fixed_len = if self.version == 2 {
            V2_HEADER_SIZE
        } else {
            V3_HEADER_SIZE
        } as usize;
        if cluster_size < V3_HEADER_SIZE as usize {
            return Err(ChangeBackingError::NoSpace);
        }
        let b = &mut out.buf;
        set(b, 0, &QCOW2_MAGIC.to_be_bytes());
        set(b, 4, &self.version.to_be_bytes());
        set(b, 20, &self.cluster_bits().to_be_bytes());
        set(b, 24, &self.virtual_size().to_be_bytes());
        set(b, 32, &self.crypt_method.to_be_bytes());
        set(b, 36, &self.l1_size.to_be_bytes());
        set(b, 40, &self.l1_table_offset.to_be_bytes());
        set(b, 48, &self.refcount_table_offset.to_be_bytes());
        set(b, 56, &self.refcount_table_clusters.to_be_bytes());
        set(b, 60, &self.nb_snapshots.to_be_bytes());
        set(b, 64, &self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            set(b, 72, &self.incompatible_features.to_be_bytes());
            set(b, 80, &self.compatible_features.to_be_bytes());
            // A read-write open clears the autoclear bits QEMU does not know.
            set(
                b,
                88,
                &(self.autoclear_features & AUTOCLEAR_MASK).to_be_bytes(),
            );
            set(b, 96, &self.refcount_order().to_be_bytes());
            let header_length = V3_HEADER_SIZE as usize + self.unknown_header_fields.len();
            set(b, 100, &(header_length as u32).to_be_bytes());
            b[104] = self.compression_type;
        }
        out.pos = fixed_len;
        out.put(&self.unknown_header_fields)?;

        if let Some(fmt) = &self.backing_format {
            out.ext(EXT_BACKING_FORMAT, fmt)?;
        }
        if self.has_data_file() {
            if let Some(name) = &self.data_file {
                out.ext(EXT_DATA_FILE, name)?;
            }
        }
        if let Some((offset, length)) = self.crypto_header {
            if offset != 0 {
                let mut data = [0u8; 16];
                data[..8].copy_from_slice(&offset.to_be_bytes());
                data[8..].copy_from_slice(&length.to_be_bytes());
                out.ext(EXT_CRYPTO, &data)?;
            }
        }
        if self.version >= 3 && cluster_size > 4096 {
            let mut table = [0u8; 48 * QEMU_FEATURE_TABLE.len()];
            for (entry, (kind, bit, name)) in table.chunks_mut(48).zip(QEMU_FEATURE_TABLE) {
                entry[0] = kind;
                entry[1] = bit;
                entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
            }
            out.ext(EXT_FEATURE_TABLE, &table)?;
        }
        if let Some(bm) = &self.bitmaps {
            let mut data = [0u8; 24];
            data[..4].copy_from_slice(&bm.nb_bitmaps.to_be_bytes());
            data[8..16].copy_from_slice(&bm.bitmap_directory_size.to_be_bytes());
            data[16..].copy_from_slice(&bm.bitmap_directory_offset.to_be_bytes());
            out.ext(EXT_BITMAPS, &data)?;
        }
        // QEMU keeps unknown extensions in a list it pushes to the front while reading,
        // so every rewrite reverses their order.
        for (magic, data) in self.unknown_extensions.iter().rev() {
            out.ext(*magic, data)?;
        }
        out.ext(0, &[])?;

        if let Some(name) = &self.backing_file {
            let at = out.pos;
            out.put(name)?;
            set(&mut out.buf, 8, &(at as u64).to_be_bytes());
            set(&mut out.buf, 16, &(name.len() as u32).to_be_bytes());
        }
        Ok(out.buf)
    }

    /// The header after a rewrite, as QEMU holds it: unknown extensions reversed,
    /// header length normalised, unknown autoclear bits cleared. Parsing the rebuilt
    /// cluster gives the same state.
    pub fn after_rewrite(&self) -> Header {
        let mut h = self.clone();
        h.unknown_extensions.reverse();
        if h.version >= 3 {
            h.header_length = V3_HEADER_SIZE + h.unknown_header_fields.len() as u32;
            h.autoclear_features &= AUTOCLEAR_MASK;
        }
        h.size = h.virtual_size();
        if !h.has_data_file() {
            h.data_file = None;
        }
        h.stale_bitmaps = false;
        h
    }
}
