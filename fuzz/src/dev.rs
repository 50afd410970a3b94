//! The device the targets run over: memory, like the guest's virtio disk in every
//! respect the format code can see (exact size, reads past the end fail, writes may
//! extend a writable device), plus what the invariants need: a record of every write,
//! a cap on growth (memory stays bounded) and on the number of requests (steps stay
//! bounded: an image that makes the code loop over the device runs into the cap).

use alloc::vec::Vec;
use instar_blockdev::{BlockDev, IoError};

/// A writable device never grows past this (the guest's devices may grow to 2^50;
/// here memory is real, so a write past the cap fails like an I/O error).
pub const MAX_DEVICE_BYTES: u64 = 64 << 20;
/// Requests one device answers per execution before it fails them.
pub const MAX_REQUESTS: u64 = 200_000;

#[derive(Debug, Clone)]
pub struct FuzzDev {
    pub data: Vec<u8>,
    pub read_only: bool,
    /// Every successful write as `(offset, len)`.
    pub writes: Vec<(u64, u64)>,
    pub requests: u64,
    /// Writes asked for, refused ones included (a read-only device must see none).
    pub write_attempts: u64,
    /// A request was refused because of a cap (not the image's fault alone).
    pub capped: bool,
}

impl FuzzDev {
    pub fn new(data: Vec<u8>, read_only: bool) -> Self {
        FuzzDev {
            data,
            read_only,
            writes: Vec::new(),
            requests: 0,
            write_attempts: 0,
            capped: false,
        }
    }

    fn count(&mut self) -> Result<(), IoError> {
        self.requests += 1;
        if self.requests > MAX_REQUESTS {
            self.capped = true;
            return Err(IoError::Device);
        }
        Ok(())
    }
}

impl BlockDev for FuzzDev {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.count()?;
        let start = usize::try_from(offset).map_err(|_| IoError::OutOfRange)?;
        let end = start.checked_add(buf.len()).ok_or(IoError::OutOfRange)?;
        let src = self.data.get(start..end).ok_or(IoError::OutOfRange)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        self.write_attempts += 1;
        self.count()?;
        if self.read_only {
            return Err(IoError::ReadOnly);
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(IoError::OutOfRange)?;
        if end > MAX_DEVICE_BYTES {
            self.capped = true;
            return Err(IoError::Device);
        }
        let (start, end) = (offset as usize, end as usize);
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(buf);
        self.writes.push((offset, buf.len() as u64));
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        self.count()
    }
}
