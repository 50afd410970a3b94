//! How a bitmap's bits sit in its data clusters (QEMU's hbitmap serialization), and the
//! content of one re-stored cluster: the loaded bits plus the bits the session dirtied.
//!
//! Bit `k` of a bitmap of granularity `g` covers guest bytes `[k << g, (k + 1) << g)`;
//! bits are kept in little-endian 64-bit words, bit 0 of a word in bit 0 of its first
//! byte. One data cluster of `cs` bytes holds `cs * 8` bits, so table entry `i` covers
//! guest bytes `[i * limit, (i + 1) * limit)` with `limit = cs * 8 << g`. The last
//! entry's cluster holds only the words its bits need (`serialization_size`); QEMU
//! writes the rest of the cluster as zeros.

use alloc::vec::Vec;

/// The geometry of one bitmap over a disk of `disk_len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunks {
    pub disk_len: u64,
    pub granularity_bits: u32,
    pub cluster_size: u64,
}

impl Chunks {
    /// Guest bytes one table entry covers (`serialization_coverage`).
    pub fn limit(&self) -> u64 {
        (self.cluster_size * 8) << self.granularity_bits
    }

    /// Bits of the whole bitmap.
    pub fn bits(&self) -> u64 {
        self.disk_len.div_ceil(1 << self.granularity_bits)
    }

    /// Table entries QEMU expects (`size_to_clusters(serialization_size(0, len))`).
    pub fn table_size(&self) -> u64 {
        (self.bits().div_ceil(64) * 8).div_ceil(self.cluster_size)
    }

    /// Guest range of entry `i`.
    pub fn range(&self, i: u64) -> (u64, u64) {
        let start = i.saturating_mul(self.limit());
        (start, start.saturating_add(self.limit()).min(self.disk_len))
    }

    /// Bits entry `i` holds (the last one may hold fewer than `cs * 8`).
    pub fn bits_in(&self, i: u64) -> u64 {
        let first = i.saturating_mul(self.cluster_size * 8);
        self.bits().saturating_sub(first).min(self.cluster_size * 8)
    }

    /// Bytes of entry `i`'s cluster that carry words (`serialization_size`).
    pub fn write_size(&self, i: u64) -> usize {
        (self.bits_in(i).div_ceil(64) * 8) as usize
    }
}

/// What a table entry said: no cluster (all zeros), all ones, or a data cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Zeros,
    Ones,
    Cluster(u64),
}

/// Entry `i`'s words as QEMU holds them after loading (`words` bytes of the cluster,
/// or the all-ones fill, which covers whole words), with the dirtied guest ranges
/// `dirty` (sorted, merged `(start, end)` byte ranges) set. Returns whether any bit of
/// the bitmap proper is set, i.e. whether QEMU stores the cluster.
pub fn fill(c: &Chunks, i: u64, base: &mut Vec<u8>, source: Source, dirty: &[(u64, u64)]) -> bool {
    let words = c.write_size(i);
    match source {
        Source::Zeros => {
            base.clear();
            base.resize(words, 0);
        }
        Source::Ones => {
            base.clear();
            base.resize(words, 0xff);
        }
        Source::Cluster(_) => base.truncate(words),
    }
    let (start, end) = c.range(i);
    let g = c.granularity_bits;
    let first_bit = start >> g;
    let from = dirty.partition_point(|&(_, e)| e <= start);
    for &(a, b) in dirty[from..].iter().take_while(|&&(a, _)| a < end) {
        let lo = (a.max(start) >> g) - first_bit;
        let hi = ((b.min(end) - 1) >> g) - first_bit;
        set_bits(base, lo, hi);
    }
    any_bit(base, c.bits_in(i))
}

/// Set bits `lo..=hi` of `buf`.
fn set_bits(buf: &mut [u8], lo: u64, hi: u64) {
    let mut k = lo;
    while k <= hi {
        let byte = (k / 8) as usize;
        if k.is_multiple_of(8) && hi - k >= 7 {
            let n = ((hi - k + 1) / 8) as usize;
            if let Some(s) = buf.get_mut(byte..byte + n) {
                s.fill(0xff);
            }
            k += n as u64 * 8;
            continue;
        }
        if let Some(b) = buf.get_mut(byte) {
            *b |= 1 << (k % 8);
        }
        k += 1;
    }
}

/// Whether any of the first `bits` bits of `buf` is set (bits past the bitmap's end
/// in its last word are ignored, as QEMU's search for dirty bits stops at the end).
fn any_bit(buf: &[u8], bits: u64) -> bool {
    let full = (bits / 8) as usize;
    if buf.iter().take(full).any(|&b| b != 0) {
        return true;
    }
    let rest = bits % 8;
    rest != 0 && buf.get(full).is_some_and(|&b| b & ((1u8 << rest) - 1) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(disk_len: u64, g: u32, cs: u64) -> Chunks {
        Chunks {
            disk_len,
            granularity_bits: g,
            cluster_size: cs,
        }
    }

    #[test]
    fn geometry() {
        // 4 MiB at 64 KiB granularity: 64 bits, one word, one entry.
        let x = c(4 << 20, 16, 65536);
        assert_eq!((x.bits(), x.table_size(), x.write_size(0)), (64, 1, 8));
        // 1 GiB at 512 B with 512 B clusters: 2 Mi bits = 256 KiB = 512 entries.
        let y = c(1 << 30, 9, 512);
        assert_eq!(
            (y.table_size(), y.limit(), y.write_size(511)),
            (512, 2 << 20, 512)
        );
        // An odd size: 100 KiB at 4 KiB: 25 bits, one word.
        let z = c(100 << 10, 12, 65536);
        assert_eq!((z.bits(), z.bits_in(0), z.write_size(0)), (25, 25, 8));
    }

    #[test]
    fn dirt_sets_whole_granules() {
        let x = c(4 << 20, 16, 65536);
        let mut buf = Vec::new();
        assert!(!fill(&x, 0, &mut buf, Source::Zeros, &[]));
        assert!(fill(
            &x,
            0,
            &mut buf,
            Source::Zeros,
            &[(512 << 10, (576 << 10) + 1)]
        ));
        assert_eq!(buf, [0, 3, 0, 0, 0, 0, 0, 0]);
        // All ones covers the whole word, also past the end of a short bitmap.
        let z = c(100 << 10, 12, 65536);
        assert!(fill(&z, 0, &mut buf, Source::Ones, &[]));
        assert_eq!(buf, [0xff; 8]);
        // Bits past the end alone do not make the cluster stored.
        let mut garbage = alloc::vec![0u8; 8];
        garbage[7] = 0x80;
        assert!(!fill(&z, 0, &mut garbage, Source::Cluster(1 << 16), &[]));
    }

    #[test]
    fn set_bits_runs() {
        let mut b = [0u8; 4];
        set_bits(&mut b, 3, 20);
        assert_eq!(b, [0xf8, 0xff, 0x1f, 0]);
    }
}
