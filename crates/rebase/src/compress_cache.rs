//! Compress each cluster once in a `-c` rebase.
//!
//! The dry run that proves the writes safe must compress every copied cluster (where a
//! compressed cluster lands depends on the sizes before it), and the real run then
//! compresses the same clusters again, in the same order, with the same input. The dry
//! run's results are kept (up to [`BUDGET`] bytes, the first clusters in call order) and
//! the real run takes them instead of compressing again; past them it compresses.
//!
//! Each kept result carries a 128-bit hash of its input and compression type, and is
//! reused only for the same hash at the same position: a replay that went out of step
//! compresses afresh instead of writing another cluster's bytes.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use instar_qcow2::compress::CompressionType;
use instar_qcow2::compressor::{CompressFailed, Compressed, Compressor};

/// Most bytes of compressed output (plus a fixed cost per cluster) kept between the
/// dry run and the real run: bounds the guest memory this takes (`docs/compression.md`).
pub(crate) const BUDGET: usize = 32 << 20;
/// What one kept result costs besides its bytes (queue slot, vector header).
const ENTRY_COST: usize = 64;

struct Entry {
    key: (u64, u64),
    result: Result<Compressed, CompressFailed>,
    /// Where its bytes start in [`Kept::bytes`], and how many.
    start: usize,
    len: usize,
}

/// Results kept by a [`Recorder`], oldest first; their bytes in one buffer, so that
/// thousands of clusters cost two allocations, not thousands (the guest's allocator is
/// a first-fit free list).
#[derive(Default)]
pub(crate) struct Kept {
    entries: VecDeque<Entry>,
    bytes: Vec<u8>,
}

/// The dry run's compressor: compresses through `inner` and keeps the results.
pub(crate) struct Recorder<'c, 'k> {
    inner: &'c mut dyn Compressor,
    kept: &'k mut Kept,
    cost: usize,
    full: bool,
}

impl<'c, 'k> Recorder<'c, 'k> {
    pub(crate) fn new(inner: &'c mut dyn Compressor, kept: &'k mut Kept) -> Self {
        Recorder {
            inner,
            kept,
            cost: 0,
            full: false,
        }
    }
}

impl Compressor for Recorder<'_, '_> {
    fn compress(
        &mut self,
        kind: CompressionType,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<Compressed, CompressFailed> {
        let result = self.inner.compress(kind, src, dst);
        if self.full {
            return result;
        }
        let len = match result {
            Ok(Compressed::Fits(n)) => n.min(dst.len()),
            _ => 0,
        };
        let cost = len + ENTRY_COST;
        if self.cost + cost > BUDGET {
            // Later results are not kept, so the replay stays in step by position.
            self.full = true;
            return result;
        }
        self.cost += cost;
        let start = self.kept.bytes.len();
        self.kept.bytes.extend_from_slice(&dst[..len]);
        self.kept.entries.push_back(Entry {
            key: key(kind, src),
            result,
            start,
            len,
        });
        result
    }
}

/// The real run's compressor: the kept results in order, then `inner`.
pub(crate) struct Replayer<'c> {
    inner: &'c mut dyn Compressor,
    kept: Kept,
}

impl<'c> Replayer<'c> {
    pub(crate) fn new(inner: &'c mut dyn Compressor, kept: Kept) -> Self {
        Replayer { inner, kept }
    }
}

impl Compressor for Replayer<'_> {
    fn compress(
        &mut self,
        kind: CompressionType,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<Compressed, CompressFailed> {
        if let Some(e) = self.kept.entries.pop_front() {
            let data = self.kept.bytes.get(e.start..e.start + e.len);
            if let (true, Some(data), Some(d)) =
                (e.key == key(kind, src), data, dst.get_mut(..e.len))
            {
                d.copy_from_slice(data);
                return e.result;
            }
            // Out of step: nothing kept can be trusted any more.
            self.kept = Kept::default();
        }
        self.inner.compress(kind, src, dst)
    }
}

/// Two independent 64-bit hashes of `src` (a word at a time), seeded by the type.
fn key(kind: CompressionType, src: &[u8]) -> (u64, u64) {
    let t = match kind {
        CompressionType::Zlib => 1,
        CompressionType::Zstd => 2,
    };
    let (mut a, mut b) = (0x9e37_79b9_7f4a_7c15u64 ^ t, 0xc2b2_ae3d_27d4_eb4fu64 ^ t);
    let mut words = src.chunks_exact(8);
    for w in &mut words {
        let mut x = [0u8; 8];
        x.copy_from_slice(w);
        let v = u64::from_le_bytes(x);
        a = (a ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
        b = (b.rotate_left(17) ^ v).wrapping_mul(0xff51_afd7_ed55_8ccd);
    }
    for &byte in words.remainder() {
        a = (a ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        b = (b ^ u64::from(byte)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    }
    let n = src.len() as u64;
    (a ^ n, b ^ n.rotate_left(32))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts calls; "compresses" to the input's first byte repeated `src[1]` times,
    /// or does not fit when `src[1]` is 0.
    struct Counting(u32);

    impl Compressor for Counting {
        fn compress(
            &mut self,
            _kind: CompressionType,
            src: &[u8],
            dst: &mut [u8],
        ) -> Result<Compressed, CompressFailed> {
            self.0 += 1;
            let n = usize::from(src[1]);
            if n == 0 {
                return Ok(Compressed::NoFit);
            }
            dst[..n].fill(src[0]);
            Ok(Compressed::Fits(n))
        }
    }

    fn run(c: &mut dyn Compressor, inputs: &[[u8; 4]]) -> Vec<(Compressed, Vec<u8>)> {
        inputs
            .iter()
            .map(|src| {
                let mut dst = [0u8; 3];
                let r = c.compress(CompressionType::Zstd, src, &mut dst);
                let r = r.expect("compresses");
                let n = match r {
                    Compressed::Fits(n) => n,
                    Compressed::NoFit => 0,
                };
                (r, dst[..n].to_vec())
            })
            .collect()
    }

    #[test]
    fn replay_gives_the_recorded_results_without_compressing() {
        let inputs = [[7, 2, 0, 0], [9, 0, 0, 0], [5, 3, 1, 1]];
        let mut kept = Kept::default();
        let mut first = Counting(0);
        let want = run(&mut Recorder::new(&mut first, &mut kept), &inputs);
        let mut second = Counting(0);
        let got = run(&mut Replayer::new(&mut second, kept), &inputs);
        assert_eq!(got, want);
        assert_eq!((first.0, second.0), (3, 0));
    }

    #[test]
    fn a_replay_out_of_step_compresses_afresh() {
        let mut kept = Kept::default();
        let mut first = Counting(0);
        run(
            &mut Recorder::new(&mut first, &mut kept),
            &[[7, 2, 0, 0], [9, 1, 0, 0]],
        );
        let mut second = Counting(0);
        let got = run(
            &mut Replayer::new(&mut second, kept),
            &[[8, 2, 0, 0], [9, 1, 0, 0]],
        );
        assert_eq!(got[0].1, [8, 8]);
        assert_eq!(second.0, 2, "nothing reused once out of step");
    }
}
