//! A device that keeps every write in memory over a read-only view of another device:
//! the target of a writer's dry run. Reads see the writes made so far, the real device
//! is never written.
//!
//! Only metadata is written to it in a dry run (guest data is recorded, not written; see
//! [`super::Writer::recording`]). The writer keeps every table it changes in its own
//! caches and reads a table back from the device only in rare cases, so the shadow keeps
//! the content of at most [`ShadowDev::BUDGET`] bytes of written pages; past that it only
//! remembers which pages were written. A read of such a page fails and raises
//! [`ShadowDev::lost_flag`]: the dry run then cannot stand for the real run, and the
//! caller refuses instead of guessing.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;

use instar_blockdev::{BlockDev, IoError};

const PAGE: u64 = 4096;

/// See the module documentation.
#[derive(Debug)]
pub struct ShadowDev<D> {
    inner: D,
    /// Written pages: page index → bytes (the inner device's bytes, patched).
    pages: BTreeMap<u64, Vec<u8>>,
    /// Written pages whose content was not kept (over the budget).
    dropped: BTreeSet<u64>,
    budget_pages: usize,
    lost: Rc<Cell<bool>>,
    /// End of the furthest write.
    end: u64,
}

impl<D: BlockDev> ShadowDev<D> {
    /// Bytes of written pages whose content is kept.
    pub const BUDGET: u64 = 16 << 20;

    pub fn new(inner: D) -> Self {
        Self::with_budget(inner, Self::BUDGET)
    }

    pub fn with_budget(inner: D, budget: u64) -> Self {
        ShadowDev {
            inner,
            pages: BTreeMap::new(),
            dropped: BTreeSet::new(),
            budget_pages: (budget / PAGE) as usize,
            lost: Rc::new(Cell::new(false)),
            end: 0,
        }
    }

    pub fn into_inner(self) -> D {
        self.inner
    }

    /// Set once a read needed a written page whose content was not kept.
    pub fn lost_flag(&self) -> Rc<Cell<bool>> {
        Rc::clone(&self.lost)
    }

    /// The page to patch, or `None` when its content is not kept.
    fn page_mut(&mut self, index: u64) -> Result<Option<&mut Vec<u8>>, IoError> {
        if !self.pages.contains_key(&index) {
            if self.dropped.contains(&index) || self.pages.len() >= self.budget_pages {
                self.dropped.insert(index);
                return Ok(None);
            }
            let mut buf = vec![0u8; PAGE as usize];
            self.inner.read_zero_padded(index * PAGE, &mut buf)?;
            self.pages.insert(index, buf);
        }
        Ok(self.pages.get_mut(&index))
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
        let first = offset / PAGE;
        let last = end.div_ceil(PAGE);
        if self.dropped.range(first..last).next().is_some() {
            self.lost.set(true);
            return Err(IoError::Device);
        }
        // Past the end reads as zeros: the data a dry run leaves out would have grown
        // the real file there.
        self.inner.read_zero_padded(offset, buf)?;
        // Patch in the pages written so far.
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
            if let Some(page) = self.page_mut(p)? {
                page[(pos - p_start) as usize..(to - p_start) as usize].copy_from_slice(src);
            }
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

    #[test]
    fn pages_over_the_budget_are_remembered_not_kept() {
        let mut real = MemDev::new(vec![7u8; 3 * PAGE as usize]);
        let mut s = ShadowDev::with_budget(&mut real, PAGE);
        let lost = s.lost_flag();
        s.write_at(10, &[1u8; 4]).unwrap();
        s.write_at(PAGE + 10, &[2u8; 4]).unwrap();
        let mut b = [0u8; 4];
        s.read_at(10, &mut b).unwrap();
        assert_eq!(b, [1u8; 4]);
        s.read_at(2 * PAGE, &mut b).unwrap();
        assert!(!lost.get());
        assert_eq!(s.read_at(PAGE + 8, &mut b), Err(IoError::Device));
        assert!(lost.get());
    }
}
