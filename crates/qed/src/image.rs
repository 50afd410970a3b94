//! A qed image opened as QEMU opens it: header checks, backing name, L1 table in
//! memory, and `qed_find_cluster` for lookups, status and reads.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use instar_blockdev::{BlockDev, IoError};

use crate::header::{Header, HeaderError, HEADER_LEN};

/// What `qed_find_cluster` found at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    /// Data at this file offset (of the first cluster of the run).
    Found(u64),
    /// A zero cluster (L2 entry 1).
    Zero,
    /// The L2 entry is 0.
    UnallocatedL2,
    /// The L1 entry is 0: no L2 table.
    UnallocatedL1,
}

/// Why a lookup, read or open failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QedError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("Input/output error")]
    Io(#[from] IoError),
    /// `qed_find_cluster`'s `-EINVAL`: an L1 or L2 entry outside the file.
    #[error("Invalid argument")]
    InvalidOffset,
    #[error("read of {len:#x} bytes at {offset:#x} goes past the virtual size")]
    BeyondVirtualSize { offset: u64, len: u64 },
    /// The open-time check could not read a table (QEMU's open fails so).
    #[error("Image corrupted")]
    Corrupted,
    #[error("the image is too large for instar's consistency check")]
    TooLargeToCheck,
    /// Tables (`cluster_size * table_size` bytes each) the sandbox cannot hold.
    #[error("instar does not open qed images with tables of {0} bytes (at most 32 MiB)")]
    TablesTooLarge(u64),
}

/// Largest L1/L2 table instar holds in the sandbox's memory (QEMU allows 1 GiB:
/// 64 MiB clusters, 16-cluster tables; `qemu-img create` makes 256 KiB ones).
pub const MAX_TABLE_BYTES: u64 = 32 << 20;

/// One L2 table as last read or written (QEMU's cache is write-through, so this is
/// what the file holds).
pub(crate) struct CachedL2 {
    pub offset: u64,
    pub entries: Vec<u64>,
    /// Repaired in memory ([`QedImage::repair`]): the file may still hold the old one.
    pub patched: bool,
}

pub struct QedImage<D: BlockDev> {
    pub(crate) dev: D,
    pub(crate) header: Header,
    /// The file length rounded down to a cluster; new clusters go here.
    pub(crate) file_size: u64,
    pub(crate) l1: Vec<u64>,
    pub(crate) l2: Option<CachedL2>,
    /// Repaired L2 tables not in `l2`, by offset.
    patches: BTreeMap<u64, Vec<u64>>,
    backing_name: Option<Vec<u8>>,
}

pub(crate) fn read_table(
    dev: &mut dyn BlockDev,
    offset: u64,
    bytes: u64,
) -> Result<Vec<u64>, IoError> {
    let mut raw = vec![0u8; bytes as usize];
    dev.read_zero_padded(offset, &mut raw)?;
    Ok(instar_blockdev::bytes::le64_table(&raw))
}

impl<D: BlockDev> QedImage<D> {
    /// Open as QEMU does (read-only or read-write: the checks are the same; a dirty
    /// image's repair is the caller's business).
    pub fn open(mut dev: D) -> Result<Self, QedError> {
        let mut raw = [0u8; HEADER_LEN];
        dev.read_zero_padded(0, &mut raw)?;
        let header = Header::parse(&raw);
        let file_len = dev.size();
        header.validate_all(file_len)?;
        if header.table_bytes() > MAX_TABLE_BYTES {
            return Err(QedError::TablesTooLarge(header.table_bytes()));
        }
        let file_size = file_len & !(header.cluster_size() - 1);
        let backing_name = if header.has_backing() {
            let mut name = vec![0u8; header.backing_filename_size as usize];
            dev.read_zero_padded(u64::from(header.backing_filename_offset), &mut name)?;
            Some(name)
        } else {
            None
        };
        let l1 = read_table(&mut dev, header.l1_table_offset, header.table_bytes())?;
        Ok(QedImage {
            dev,
            header,
            file_size,
            l1,
            l2: None,
            patches: BTreeMap::new(),
            backing_name,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }
    /// What a read-write open does first: `QED_AUTOCLEAR_FEATURE_MASK` is empty, so
    /// every autoclear bit is cleared.
    pub fn clear_autoclear(&mut self) {
        self.header.autoclear_features = 0;
    }
    pub fn dev_mut(&mut self) -> &mut D {
        &mut self.dev
    }
    pub fn virtual_size(&self) -> u64 {
        self.header.image_size
    }
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }
    /// The stored backing name (raw bytes, as long as the header says).
    pub fn backing_name(&self) -> Option<&[u8]> {
        self.backing_name.as_deref()
    }
    /// The file length QEMU allocates from.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }
    pub fn into_dev(self) -> D {
        self.dev
    }

    fn l1_shift(&self) -> u32 {
        self.header.cluster_size.trailing_zeros() + self.header.table_entries().trailing_zeros()
    }
    pub(crate) fn l1_index(&self, pos: u64) -> usize {
        (pos >> self.l1_shift()) as usize
    }
    pub(crate) fn l2_index(&self, pos: u64) -> usize {
        ((pos >> self.header.cluster_size.trailing_zeros()) & (self.header.table_entries() - 1))
            as usize
    }
    pub(crate) fn in_cluster(&self, pos: u64) -> u64 {
        pos & (self.cluster_size() - 1)
    }
    /// `qed_bytes_to_clusters`, with QEMU's divisor of `cluster_size - 1` (it equals a
    /// round-up for every length below `cluster_size - 1` clusters).
    pub(crate) fn bytes_to_clusters(&self, bytes: u64) -> u64 {
        let cs = self.cluster_size();
        ((bytes + cs - 1) & !(cs - 1)) / (cs - 1)
    }

    /// Make the L2 table at `offset` the cached one.
    pub(crate) fn load_l2(&mut self, offset: u64) -> Result<(), QedError> {
        if self.l2.as_ref().is_some_and(|t| t.offset == offset) {
            return Ok(());
        }
        if let Some(old) = self.l2.take().filter(|t| t.patched) {
            self.patches.insert(old.offset, old.entries);
        }
        let (entries, patched) = match self.patches.remove(&offset) {
            Some(e) => (e, true),
            None => (
                read_table(&mut self.dev, offset, self.header.table_bytes())?,
                false,
            ),
        };
        self.l2 = Some(CachedL2 {
            offset,
            entries,
            patched,
        });
        Ok(())
    }

    /// Replace the L2 table at `offset` in memory only.
    pub(crate) fn patch_l2(&mut self, offset: u64, entries: Vec<u64>) {
        if self.l2.as_ref().is_some_and(|t| t.offset == offset) {
            self.l2 = None;
        }
        self.patches.insert(offset, entries);
    }

    /// `qed_find_cluster`: the state at `pos` and how many bytes from `pos` (at most
    /// `len`, never past the L2 table's reach) share it.
    pub fn find_cluster(&mut self, pos: u64, len: u64) -> Result<(ClusterState, u64), QedError> {
        let shift = self.l1_shift();
        let reach_end = ((pos >> shift) + 1) << shift;
        let len = len.min(reach_end - pos);
        let l2_offset = self
            .l1
            .get(self.l1_index(pos))
            .copied()
            .ok_or(QedError::InvalidOffset)?;
        if l2_offset == 0 {
            return Ok((ClusterState::UnallocatedL1, len));
        }
        if !self.header.table_offset_ok(l2_offset, self.file_size) {
            return Err(QedError::InvalidOffset);
        }
        self.load_l2(l2_offset)?;
        let index = self.l2_index(pos);
        let want = self.bytes_to_clusters(self.in_cluster(pos) + len);
        let cs = self.cluster_size();
        let table = match &self.l2 {
            Some(t) => &t.entries,
            None => return Err(QedError::InvalidOffset),
        };
        let end = (index as u64 + want).min(table.len() as u64) as usize;
        let first = table[index];
        let mut last = first;
        let mut i = index + 1;
        while i < end {
            let e = table[i];
            let same = match last {
                0 => e == 0,
                1 => e == 1,
                _ => e == last.wrapping_add(cs),
            };
            if !same {
                break;
            }
            if last > 1 {
                last = e;
            }
            i += 1;
        }
        let n = (i - index) as u64;
        let state = match first {
            0 => ClusterState::UnallocatedL2,
            1 => ClusterState::Zero,
            o if self.header.cluster_offset_ok(o, self.file_size) => ClusterState::Found(o),
            _ => return Err(QedError::InvalidOffset),
        };
        Ok((state, len.min(n * cs - self.in_cluster(pos))))
    }

    /// Read this image's own content (zeros where it allocates nothing); the range
    /// lies inside the image.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), QedError> {
        let len = buf.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.virtual_size())
        {
            return Err(QedError::BeyondVirtualSize { offset, len });
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (state, n) = self.find_cluster(pos, (buf.len() - done) as u64)?;
            let n = n as usize;
            if n == 0 {
                return Err(QedError::InvalidOffset);
            }
            let part = &mut buf[done..done + n];
            match state {
                ClusterState::Found(at) => {
                    self.dev.read_zero_padded(at + self.in_cluster(pos), part)?
                }
                _ => part.fill(0),
            }
            done += n;
        }
        Ok(())
    }
}
