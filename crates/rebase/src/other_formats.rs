//! What a probe reports about formats instar recognises but does not read: the backing
//! file name a qcow (version 1) image records (qed images are opened by `crates/qed`,
//! see `probe::qed_info`). QEMU opens that file with the
//! image, so the host must know it before it records such a probed format (the probe
//! rule, docs/path-policy.md). Only the name is read; nothing else is validated.

use alloc::vec;
use alloc::vec::Vec;
use instar_abi::{Format, MAX_REPORTED_NAME};
use instar_blockdev::bytes::{c_str, Fixed};
use instar_blockdev::{BlockDev, IoError};

/// `len` bytes at `offset` as QEMU reads a C string of that length: cut at the first
/// NUL; `None` when empty (QEMU then has no backing file). Longer names are cut to
/// [`MAX_REPORTED_NAME`]: QEMU refuses them, and the host only needs to know that a
/// name is there.
fn name_at(dev: &mut dyn BlockDev, offset: u64, len: u64) -> Result<Option<Vec<u8>>, IoError> {
    let len = len.min(MAX_REPORTED_NAME as u64) as usize;
    let mut name = vec![0u8; len];
    dev.read_zero_padded(offset, &mut name)?;
    let len = c_str(&name).len();
    name.truncate(len);
    Ok((!name.is_empty()).then_some(name))
}

/// The backing file name recorded by a qcow image (`None` for every other
/// format, and for images that record none).
pub fn backing_name(dev: &mut dyn BlockDev, format: Format) -> Result<Option<Vec<u8>>, IoError> {
    let mut head = [0u8; 64];
    dev.read_zero_padded(0, &mut head)?;
    match format {
        // QCowHeader: backing_file_offset (be64) at 8, backing_file_size (be32) at 16;
        // an offset of 0 means none.
        Format::Qcow => {
            let offset = Fixed(&head).be64::<8>();
            if offset == 0 {
                return Ok(None);
            }
            name_at(dev, offset, u64::from(Fixed(&head).be32::<16>()))
        }
        _ => Ok(None),
    }
}
