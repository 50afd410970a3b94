//! A device that keeps every write in memory over a read-only view of another device:
//! the target of a writer's dry run. Reads see the writes made so far, the real device
//! is never written.
//!
//! Only metadata is written to it in a dry run (guest data is recorded, not written; see
//! [`super::Writer::recording`]), so what it holds is bounded by the metadata the
//! session changes.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use instar_blockdev::{BlockDev, IoError};

const PAGE: u64 = 4096;

/// See the module documentation.
#[derive(Debug)]
pub struct ShadowDev<D> {
    inner: D,
    /// Written pages: page index → bytes (the inner device's bytes, patched).
    pages: BTreeMap<u64, Vec<u8>>,
    /// End of the furthest write.
    end: u64,
}

impl<D: BlockDev> ShadowDev<D> {
    pub fn new(inner: D) -> Self {
        ShadowDev {
            inner,
            pages: BTreeMap::new(),
            end: 0,
        }
    }

    pub fn into_inner(self) -> D {
        self.inner
    }

    fn page_mut(&mut self, index: u64) -> Result<&mut Vec<u8>, IoError> {
        if !self.pages.contains_key(&index) {
            let mut buf = vec![0u8; PAGE as usize];
            self.inner.read_zero_padded(index * PAGE, &mut buf)?;
            self.pages.insert(index, buf);
        }
        self.pages.get_mut(&index).ok_or(IoError::Device)
    }
}

impl<D: BlockDev> BlockDev for ShadowDev<D> {
    fn size(&self) -> u64 {
        self.inner.size().max(self.end)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(IoError::OutOfRange)?;
        // Past the end reads as zeros: the data a dry run leaves out would have grown
        // the real file there.
        self.inner.read_zero_padded(offset, buf)?;
        // Patch in the pages written so far.
        let first = offset / PAGE;
        let last = end.div_ceil(PAGE);
        for (&p, data) in self.pages.range(first..last) {
            let p_start = p * PAGE;
            let from = offset.max(p_start);
            let to = end.min(p_start + PAGE);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            dst.copy_from_slice(&data[(from - p_start) as usize..(to - p_start) as usize]);
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(IoError::OutOfRange)?;
        let mut pos = offset;
        while pos < end {
            let p = pos / PAGE;
            let p_start = p * PAGE;
            let to = end.min(p_start + PAGE);
            let src = &buf[(pos - offset) as usize..(to - offset) as usize];
            let page = self.page_mut(p)?;
            page[(pos - p_start) as usize..(to - p_start) as usize].copy_from_slice(src);
            pos = to;
        }
        self.end = self.end.max(end);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use instar_blockdev::MemDev;

    #[test]
    fn writes_stay_in_memory_and_read_back() {
        let mut real = MemDev::new(vec![7u8; 10000]);
        {
            let mut s = ShadowDev::new(&mut real);
            s.write_at(4090, &[1u8; 20]).unwrap();
            s.write_at(12000, &[2u8; 4]).unwrap();
            assert_eq!(s.size(), 12004);
            let mut b = [0u8; 30];
            s.read_at(4080, &mut b).unwrap();
            assert_eq!(&b[..10], &[7u8; 10]);
            assert_eq!(&b[10..30], &[1u8; 20]);
            let mut b = [9u8; 8];
            s.read_at(11996, &mut b).unwrap();
            assert_eq!(b, [0, 0, 0, 0, 2, 2, 2, 2]);
        }
        let mut b = [0u8; 20];
        real.read_at(4090, &mut b).unwrap();
        assert_eq!(b, [7u8; 20]);
        assert_eq!(real.size(), 10000);
    }
}
