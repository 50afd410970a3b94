//! The in-memory refcounts the repair computes (QEMU's "IMRT"): one count per host
//! cluster, growing as references past the end are counted or clusters are
//! allocated at the end of the file.

use alloc::vec;
use alloc::vec::Vec;

#[derive(Clone)]
pub(crate) struct Counts {
    v: Vec<u64>,
    max: u64,
}

impl Counts {
    pub(crate) fn new(nb_clusters: u64, order: u32) -> Self {
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << order)) - 1
        };
        Counts {
            v: vec![0; nb_clusters as usize],
            max,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.v.len() as u64
    }

    pub(crate) fn get(&self, c: u64) -> u64 {
        usize::try_from(c)
            .ok()
            .and_then(|i| self.v.get(i))
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn set(&mut self, c: u64, value: u64) {
        self.grow(c + 1);
        if let Some(e) = self.v.get_mut(c as usize) {
            *e = value;
        }
    }

    /// Make the array cover `n` clusters (`realloc_refcount_array`).
    pub(crate) fn grow(&mut self, n: u64) {
        if n > self.len() {
            self.v.resize(n as usize, 0);
        }
    }

    /// Count one more reference; `false` when the count is already at its maximum.
    pub(crate) fn inc(&mut self, c: u64) -> bool {
        let v = self.get(c);
        if v == self.max {
            return false;
        }
        self.set(c, v + 1);
        true
    }

    /// Zero every count, keeping the size.
    pub(crate) fn clear(&mut self) {
        self.v.fill(0);
    }

    /// Refcount block `index` of `1 << rb_bits` entries, encoded for `order`.
    pub(crate) fn block(&self, index: u64, rb_bits: u32, order: u32, cs: u64) -> Vec<u8> {
        let mut out = vec![0u8; cs as usize];
        let first = index << rb_bits;
        for i in 0..(1u64 << rb_bits) {
            let v = self.get(first + i);
            if v != 0 {
                set_entry(&mut out, i, order, v);
            }
        }
        out
    }
}

/// Store `value` as entry `index` of a refcount block (the inverse of
/// [`crate::refcount::refcount_entry`]).
pub(crate) fn set_entry(block: &mut [u8], index: u64, order: u32, value: u64) {
    let bits = 1u64 << order;
    if bits < 8 {
        let per_byte = 8 / bits;
        let shift = (index % per_byte) * bits;
        let mask = ((1u64 << bits) - 1) << shift;
        if let Some(b) = block.get_mut((index / per_byte) as usize) {
            *b = ((u64::from(*b) & !mask) | ((value << shift) & mask)) as u8;
        }
    } else {
        let w = (bits / 8) as usize;
        let start = index as usize * w;
        if let Some(dst) = block.get_mut(start..start + w) {
            dst.copy_from_slice(&value.to_be_bytes()[8 - w..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refcount::refcount_entry;

    #[test]
    fn entries_round_trip_every_width() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for i in 0..20u64 {
                set_entry(&mut b, i, order, (i * 7 + 1) & max);
            }
            for i in 0..20u64 {
                assert_eq!(
                    refcount_entry(&b, i, order),
                    (i * 7 + 1) & max,
                    "order {order}"
                );
            }
        }
    }
}
