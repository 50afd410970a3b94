//! Power-loss states of a recorded run: which writes a disk may hold after a power loss.
//!
//! A flush is a barrier: once it completes, every write issued before it is on the disk.
//! Writes issued after the last completed flush may sit in a volatile cache, so after a
//! power loss any subset of them may have reached the disk. A run's writes therefore
//! fall into epochs (the writes between two flushes); a power-loss state is the image
//! before the run, plus every write of the earlier epochs, plus a subset of one epoch's
//! writes, applied in issue order. Each write is one request as the device saw it
//! (whole sectors); tearing inside a request is not modelled.

#![allow(dead_code)]

pub mod scenario;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::ops::Range;

use instar_vmm::BlockOp;

/// One write request: where, and the bytes it wrote.
#[derive(Debug, Clone)]
pub struct Write {
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// The run's writes to `device` split at that device's flushes: each range holds the
/// indices (into the device's writes, 0-based) of one epoch, in issue order. Epochs
/// without writes are left out.
pub fn epochs(log: &[BlockOp], device: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut n = 0;
    for op in log {
        match *op {
            BlockOp::Write { device: d, .. } if d == device => n += 1,
            BlockOp::Flush { device: d } if d == device => {
                if n > start {
                    out.push(start..n);
                }
                start = n;
            }
            _ => {}
        }
    }
    if n > start {
        out.push(start..n);
    }
    out
}

/// The (offset, length) of each write to `device`, in order.
pub fn write_extents(log: &[BlockOp], device: usize) -> Vec<(u64, u64)> {
    log.iter()
        .filter_map(|op| match *op {
            BlockOp::Write {
                device: d,
                offset,
                len,
            } if d == device => Some((offset, len)),
            _ => None,
        })
        .collect()
}

/// Every subset of an epoch of `len` writes when `len` is at most [`EXHAUSTIVE`],
/// otherwise every prefix plus [`SEEDED`] subsets drawn with `seed`. Each subset is the
/// sorted positions inside the epoch; the list has no duplicates.
pub fn subsets(len: usize, seed: u64) -> Vec<Vec<usize>> {
    if len <= EXHAUSTIVE {
        return (0u32..1 << len)
            .map(|mask| (0..len).filter(|&i| mask & (1 << i) != 0).collect())
            .collect();
    }
    let mut out: Vec<Vec<usize>> = (0..=len).map(|k| (0..k).collect()).collect();
    let mut rng = SplitMix(seed);
    let mut drawn = 0;
    // Bounded: with more than 8 writes there are far more than 64 non-prefix subsets.
    while drawn < SEEDED {
        let s: Vec<usize> = (0..len).filter(|_| rng.next() & 1 == 1).collect();
        if !out.contains(&s) {
            out.push(s);
            drawn += 1;
        }
    }
    out
}

/// Epochs up to this many writes are checked with every subset.
pub const EXHAUSTIVE: usize = 8;
/// Seeded subsets checked for a larger epoch, besides its prefixes.
pub const SEEDED: usize = 64;

/// Apply one write to an image in memory, growing it as a file grows.
pub fn apply(image: &mut Vec<u8>, w: &Write) {
    let start = w.offset as usize;
    let end = start + w.bytes.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[start..end].copy_from_slice(&w.bytes);
}

/// A hash of an image, to check each distinct state once.
pub fn digest(image: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    image.hash(&mut h);
    h.finish()
}

/// splitmix64: a small, well-mixed generator, so that the seeded subsets are the same
/// on every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_split_at_the_devices_flushes() {
        let w = |device, offset| BlockOp::Write {
            device,
            offset,
            len: 512,
        };
        let f = |device| BlockOp::Flush { device };
        let log = [
            w(0, 0),
            w(0, 512),
            f(0),
            f(0),
            w(1, 0),
            f(1),
            w(0, 1024),
            f(1),
            w(0, 0),
        ];
        assert_eq!(epochs(&log, 0), vec![0..2, 2..4]);
        assert_eq!(epochs(&log, 1), vec![0..1]);
        assert_eq!(write_extents(&log, 0).len(), 4);
    }

    #[test]
    fn small_epochs_get_every_subset_large_ones_prefixes_and_seeded() {
        assert_eq!(subsets(0, 1), vec![Vec::<usize>::new()]);
        assert_eq!(subsets(3, 1).len(), 8);
        assert_eq!(subsets(8, 1).len(), 256);
        let big = subsets(20, 7);
        assert_eq!(big.len(), 21 + SEEDED);
        assert_eq!(big, subsets(20, 7), "seeded: the same every run");
        for (i, s) in big.iter().enumerate() {
            assert!(!big[..i].contains(s), "duplicate subset {s:?}");
        }
    }

    #[test]
    fn apply_grows_the_image() {
        let mut img = vec![1u8; 4];
        apply(
            &mut img,
            &Write {
                offset: 6,
                bytes: vec![9, 9],
            },
        );
        assert_eq!(img, [1, 1, 1, 1, 0, 0, 9, 9]);
    }
}
