//! raw images: the whole file is data.

use instar_blockdev::BlockDev;

use crate::layer::{Layer, LayerError, LayerState};

/// A raw image. Its size is the file size rounded up to 512 (QEMU counts whole
/// sectors); the tail past the end of the file reads as zeros.
#[derive(Debug)]
pub struct RawImage<D> {
    dev: D,
}

impl<D: BlockDev> RawImage<D> {
    pub fn new(dev: D) -> Self {
        RawImage { dev }
    }
    pub fn dev(&self) -> &D {
        &self.dev
    }
    pub fn into_inner(self) -> D {
        self.dev
    }
}

impl<D: BlockDev> Layer for RawImage<D> {
    fn virtual_size(&self) -> u64 {
        self.dev.size().div_ceil(512).saturating_mul(512)
    }
    fn block_status(&mut self, offset: u64, bytes: u64) -> Result<(LayerState, u64), LayerError> {
        // With BDRV_WANT_ALLOCATED file-posix reports everything as data.
        let n = bytes.min(self.virtual_size().saturating_sub(offset));
        Ok((LayerState::Data, n))
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), LayerError> {
        let len = buf.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.virtual_size())
        {
            return Err(LayerError::BeyondVirtualSize { offset, len });
        }
        Ok(self.dev.read_zero_padded(offset, buf)?)
    }
}
