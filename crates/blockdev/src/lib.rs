//! A byte-addressed block device: what every format crate reads and writes through.
//!
//! In the guest it is backed by virtio-blk; in tests and fuzzers by memory ([`MemDev`]).
//! Offsets and lengths are bytes. Reads past [`BlockDev::size`] are errors; callers that
//! want QEMU's "zeros past the end of a backing file" ask for it explicitly.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec::Vec;

pub mod bytes;

/// Why an I/O on a [`BlockDev`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    #[error("access beyond the end of the device")]
    OutOfRange,
    #[error("device is read-only")]
    ReadOnly,
    #[error("device I/O error")]
    Device,
}

/// A device addressed in bytes.
pub trait BlockDev {
    /// Exact length in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; the whole range must lie inside the device.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError>;
    /// Write `buf` at `offset`; may extend the device.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), IoError>;
    /// Make earlier writes durable.
    fn flush(&mut self) -> Result<(), IoError>;

    /// Like [`BlockDev::read_at`], but the part past the end reads as zeros
    /// (how QEMU reads a backing file shorter than its overlay).
    fn read_zero_padded(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let size = self.size();
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            self.read_at(offset, head)?;
        }
        tail.fill(0);
        Ok(())
    }
}

impl<T: BlockDev + ?Sized> BlockDev for &mut T {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        (**self).write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), IoError> {
        (**self).flush()
    }
}

/// An in-memory device, for tests and fuzzing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemDev {
    pub data: Vec<u8>,
    pub read_only: bool,
    /// Every write as `(offset, len)`, in order.
    pub writes: Vec<(u64, usize)>,
}

impl MemDev {
    pub fn new(data: Vec<u8>) -> Self {
        MemDev {
            data,
            read_only: false,
            writes: Vec::new(),
        }
    }

    pub fn read_only(data: Vec<u8>) -> Self {
        MemDev {
            data,
            read_only: true,
            writes: Vec::new(),
        }
    }
}

impl BlockDev for MemDev {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let start = usize::try_from(offset).map_err(|_| IoError::OutOfRange)?;
        let end = start.checked_add(buf.len()).ok_or(IoError::OutOfRange)?;
        let src = self.data.get(start..end).ok_or(IoError::OutOfRange)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        if self.read_only {
            return Err(IoError::ReadOnly);
        }
        let start = usize::try_from(offset).map_err(|_| IoError::OutOfRange)?;
        let end = start.checked_add(buf.len()).ok_or(IoError::OutOfRange)?;
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(buf);
        self.writes.push((offset, buf.len()));
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn zero_padded_read_past_end() {
        let mut d = MemDev::read_only(vec![1, 2, 3]);
        let mut buf = [9u8; 5];
        d.read_zero_padded(1, &mut buf).unwrap();
        assert_eq!(buf, [2, 3, 0, 0, 0]);
        let mut buf = [9u8; 2];
        d.read_zero_padded(10, &mut buf).unwrap();
        assert_eq!(buf, [0, 0]);
        assert_eq!(d.read_at(2, &mut [0u8; 2]), Err(IoError::OutOfRange));
        assert_eq!(d.write_at(0, &[1]), Err(IoError::ReadOnly));
    }
}
