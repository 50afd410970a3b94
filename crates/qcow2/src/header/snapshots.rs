//! The internal snapshot table, checked as QEMU's `qcow2_read_snapshots` does at open.
//! Only the sizes matter for the checks, so only the fixed part of each entry is read.

use alloc::vec;
use alloc::vec::Vec;
use instar_blockdev::BlockDev;

use instar_blockdev::bytes::Fixed;

use super::error::OpenError;
use super::io::{pread, range_ok};

/// `sizeof(QCowSnapshotHeader)`.
pub(crate) const SNAPSHOT_HEADER_SIZE: u64 = 40;
/// `sizeof(QCowSnapshotExtraData)`.
const KNOWN_EXTRA: u64 = 24;
/// `QCOW_MAX_SNAPSHOT_EXTRA_DATA`.
const MAX_EXTRA: u32 = 1024;
/// `QCOW_MAX_SNAPSHOTS_SIZE`.
const MAX_TABLE_SIZE: u64 = 1024 * 65536;
/// Reads of the table go through a window of this size (entries are small and many).
const WINDOW: usize = 64 * 1024;

struct Window {
    start: u64,
    data: Vec<u8>,
}

impl Window {
    fn read(
        &mut self,
        dev: &mut dyn BlockDev,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), OpenError> {
        if !range_ok(offset, out.len() as u64) {
            return Err(OpenError::ReadSnapshots);
        }
        let end = offset + out.len() as u64;
        if self.data.is_empty() || offset < self.start || end > self.start + self.data.len() as u64
        {
            self.data = vec![0u8; WINDOW];
            // The window may reach past what QEMU would read; clip it to the legal range.
            let len = (super::io::BDRV_MAX_LENGTH - offset).min(WINDOW as u64) as usize;
            self.data.truncate(len);
            pread(dev, offset, &mut self.data).map_err(|_| OpenError::ReadSnapshots)?;
            self.start = offset;
        }
        let at = (offset - self.start) as usize;
        out.copy_from_slice(&self.data[at..at + out.len()]);
        Ok(())
    }
}

/// Check `nb` snapshot entries starting at `table_offset` (already validated by the
/// table bounds check).
pub(crate) fn check(dev: &mut dyn BlockDev, table_offset: u64, nb: u32) -> Result<(), OpenError> {
    let mut window = Window {
        start: 0,
        data: Vec::new(),
    };
    let mut offset = table_offset;
    let mut table_length: u64 = 0;
    for i in 0..nb {
        table_length = table_length.next_multiple_of(8);
        offset = offset.next_multiple_of(8);
        let mut h = [0u8; SNAPSHOT_HEADER_SIZE as usize];
        window.read(dev, offset, &mut h)?;
        offset += SNAPSHOT_HEADER_SIZE;
        let f = Fixed(&h);
        let id_size = u64::from(f.be16::<12>());
        let name_size = u64::from(f.be16::<14>());
        let extra = f.be32::<36>();
        if extra > MAX_EXTRA {
            return Err(OpenError::SnapshotExtraData(i));
        }
        let extra = u64::from(extra);
        // The remaining reads only need to be legal requests; their bytes are not used.
        let known = extra.min(KNOWN_EXTRA);
        let mut reads = [(offset, known), (0, 0), (0, 0), (0, 0)];
        offset += known;
        if extra > KNOWN_EXTRA {
            reads[1] = (offset, extra - KNOWN_EXTRA);
            offset += extra - KNOWN_EXTRA;
        }
        reads[2] = (offset, id_size);
        offset += id_size;
        reads[3] = (offset, name_size);
        offset += name_size;
        if reads.iter().any(|&(o, l)| !range_ok(o, l)) {
            return Err(OpenError::ReadSnapshots);
        }
        table_length += SNAPSHOT_HEADER_SIZE + extra + id_size + name_size;
        if table_length > MAX_TABLE_SIZE || offset - table_offset > i32::MAX as u64 {
            return Err(OpenError::SnapshotTableTooBig(nb - i));
        }
    }
    Ok(())
}
