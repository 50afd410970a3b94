//! Reads the way QEMU's block layer serves a qcow2 driver reading its image file:
//! bytes past the end of the file read as zeros, and a request reaching beyond
//! `BDRV_MAX_LENGTH` fails with `EIO` before anything is read.

use instar_blockdev::BlockDev;

/// QEMU's `BDRV_MAX_LENGTH`: `INT64_MAX` rounded down to 1 GiB.
pub(crate) const BDRV_MAX_LENGTH: u64 = 0x7fff_ffff_c000_0000;

/// A read QEMU would refuse or that the device failed; QEMU reports both as `EIO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadFailed;

/// Whether QEMU's request check (`bdrv_check_qiov_request`) accepts the range.
pub(crate) fn range_ok(offset: u64, len: u64) -> bool {
    offset <= BDRV_MAX_LENGTH && len <= BDRV_MAX_LENGTH - offset
}

/// Read `buf.len()` bytes at `offset`, zeros past the end of the device.
pub(crate) fn pread(dev: &mut dyn BlockDev, offset: u64, buf: &mut [u8]) -> Result<(), ReadFailed> {
    if !range_ok(offset, buf.len() as u64) {
        return Err(ReadFailed);
    }
    dev.read_zero_padded(offset, buf).map_err(|_| ReadFailed)
}
