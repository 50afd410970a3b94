//! The safe-mode copy loop, with qemu-img 10.2's semantics (`img_rebase`).
//!
//! It runs in two passes so that nothing is written before the whole operation is known
//! to succeed:
//!
//! 1. [`plan`] walks the overlay in 2 MiB steps exactly as qemu-img does, reads and
//!    compares the old and new backing content, and records the requests qemu-img would
//!    send to the overlay: [`Op::Data`] (copy the old content) and [`Op::Zero`]
//!    (write-zeroes). It writes nothing.
//! 2. [`execute`] replays those requests, in the same order and with the same
//!    boundaries (the qcow2 layout depends on both), re-reading the old content of each
//!    data request.
//!
//! The loop, per step of at most 2 MiB at `offset` (reference: qemu-img-rebase.md §3.2):
//! - skip what the overlay itself allocates (zero clusters count as allocated);
//! - with the in-chain optimisation, skip what no layer between the overlay and the
//!   `-b` image allocates; past the old backing's end, take the whole step;
//! - widen to the overlay's write alignment (its subcluster size), capped at 2 MiB and at
//!   the image end (10.2's clamp; 10.0 overflowed its buffer here);
//! - compare old and new in `write_align` chunks; each run of differing chunks is one
//!   request: write-zeroes if the run starts at or after the old backing's end (or there
//!   is no old backing), otherwise a data write of the old content.

use alloc::vec;
use alloc::vec::Vec;

/// qemu-img's `IO_BUF_SIZE`: the step and the largest request.
pub const IO_BUF_SIZE: u64 = 2 << 20;

/// Most requests a plan may hold (16 bytes each): bounds guest memory on huge images
/// with tiny clusters.
pub const MAX_PLAN_OPS: usize = 4 << 20;

/// One request to the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Write the old chain's content of `[offset, offset + len)`.
    Data { offset: u64, len: u64 },
    /// Write zeroes over `[offset, offset + len)`.
    Zero { offset: u64, len: u64 },
}

/// Why the copy loop stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyError {
    /// Reading the overlay's (or the old chain's) allocation status failed:
    /// qemu-img's `error while reading image metadata: …`.
    Metadata(alloc::string::String),
    /// `error while reading from old backing file`.
    ReadOld,
    /// `error while reading from new backing file`.
    ReadNew,
    /// Writing to the overlay failed: `Error while writing to COW image: …`.
    Write(alloc::string::String),
    /// The plan would need more than [`MAX_PLAN_OPS`] requests.
    TooManyRequests,
    /// A status answer broke its contract (zero or overlong run).
    BadStatus,
}

/// Allocation status of the overlay itself (`bdrv_is_allocated`, this layer only).
pub trait OverlayStatus {
    /// Whether `[offset, offset + bytes)` starts allocated in the overlay, and how many
    /// bytes from `offset` share that status (`1..=bytes`).
    fn is_allocated(&mut self, offset: u64, bytes: u64) -> Result<(bool, u64), CopyError>;
}

/// Allocation status of the old chain's layers above the `-b` image
/// (`bdrv_is_allocated_above(old top, -b image, include_base = false)`).
pub trait ChainStatus {
    /// Whether any layer allocates the start of the range, and the length of the run
    /// with that status; `(false, 0)` at or past the end of the old backing.
    fn is_allocated_above(&mut self, offset: u64, bytes: u64) -> Result<(bool, u64), CopyError>;
}

/// Guest-visible content of a backing chain.
pub trait Content {
    /// Virtual size (`blk_getlength`).
    fn size(&self) -> u64;
    /// Read `[offset, offset + buf.len())`, which lies inside [`Content::size`].
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CopyError>;
    /// Whether `[offset, offset + len)` is known to read as zeros without reading it
    /// (nothing in the chain allocates it). `false` is always a correct answer.
    fn known_zero(&mut self, _offset: u64, _len: u64) -> Result<bool, CopyError> {
        Ok(false)
    }
}

/// Where [`execute`] sends the requests.
pub trait Sink {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), CopyError>;
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), CopyError>;
}

/// Everything the loop needs to know about the overlay.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// The overlay's virtual size.
    pub size: u64,
    /// The overlay's subcluster size (cluster size without extended L2); its cluster
    /// size for a compressed rebase (`-c`).
    pub write_align: u64,
    /// `-c`: every widened request must be wholly unallocated in the overlay (qemu-img
    /// asserts it, and aborts on an extended-L2 cluster that is partly allocated).
    pub whole_unallocated: bool,
}

/// The outcome of [`plan`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
    /// Steps that were not skipped; each one advanced qemu-img's progress.
    pub progress_steps: u32,
}

impl Plan {
    /// Bytes of data requests (what `bytes_copied` reports).
    pub fn data_bytes(&self) -> u64 {
        self.ops
            .iter()
            .map(|op| match *op {
                Op::Data { len, .. } => len,
                Op::Zero { .. } => 0,
            })
            .sum()
    }
}

/// Pass 1: decide every request without writing anything.
///
/// `old` is `None` when the overlay has no backing file, `new` is `None` when detaching.
/// `on_step` is called with the running count of non-skipped steps.
pub fn plan(
    geom: Geometry,
    overlay: &mut (dyn OverlayStatus + '_),
    mut in_chain: Option<&mut (dyn ChainStatus + '_)>,
    mut old: Option<&mut (dyn Content + '_)>,
    mut new: Option<&mut (dyn Content + '_)>,
    on_step: &mut dyn FnMut(u32),
) -> Result<Plan, CopyError> {
    let size = geom.size;
    let wa = geom.write_align.max(1);
    let old_size = old.as_ref().map_or(0, |c| c.size());
    let new_size = new.as_ref().map_or(0, |c| c.size());
    let mut buf_old = vec![0u8; IO_BUF_SIZE as usize];
    let mut buf_new = vec![0u8; IO_BUF_SIZE as usize];
    let mut out = Plan::default();

    let mut offset = 0u64;
    while offset < size {
        let mut n = (size - offset).min(IO_BUF_SIZE);

        let (allocated, run) = checked(overlay.is_allocated(offset, n)?, n)?;
        n = run;
        if allocated {
            offset += n;
            continue;
        }

        if let Some(chain) = in_chain.as_deref_mut() {
            let bytes = n;
            let (allocated, run) = chain.is_allocated_above(offset, n)?;
            if run > n {
                return Err(CopyError::BadStatus);
            }
            if !allocated && run > 0 {
                offset += run;
                continue;
            }
            // run == 0: past the old backing's end, where it read as zeros.
            n = if run == 0 { bytes } else { run };
        }

        // Widen to the overlay's (sub)cluster so no write needs copy-on-write,
        // then clamp as 10.2 does.
        let start = offset - offset % wa;
        let end = offset
            .checked_add(n)
            .and_then(|e| e.checked_next_multiple_of(wa))
            .ok_or(CopyError::BadStatus)?;
        let wstart = start;
        let wlen = (end - start).min(size - start).min(IO_BUF_SIZE);
        if geom.whole_unallocated && overlay.is_allocated(wstart, wlen)? != (false, wlen) {
            return Err(CopyError::Write(alloc::format!(
                "cluster at offset {wstart:#x} is partly allocated: it cannot be written \
                 compressed (qemu-img fails an assertion here)"
            )));
        }

        let n_old = wlen.min(old_size.saturating_sub(wstart)) as usize;
        let n_new = wlen.min(new_size.saturating_sub(wstart)) as usize;
        let wlen_us = wlen as usize;

        // Both sides read as zeros: they compare equal, so qemu-img writes nothing
        // here; skip the reads (most of a sparse disk).
        if zero_part(old.as_deref_mut(), wstart, n_old)?
            && zero_part(new.as_deref_mut(), wstart, n_new)?
        {
            out.progress_steps += 1;
            on_step(out.progress_steps);
            offset = wstart + wlen;
            continue;
        }
        read_part(old.as_deref_mut(), wstart, &mut buf_old[..wlen_us], n_old)
            .map_err(|_| CopyError::ReadOld)?;
        read_part(new.as_deref_mut(), wstart, &mut buf_new[..wlen_us], n_new)
            .map_err(|_| CopyError::ReadNew)?;

        let mut old_eof = n_old == 0;
        let mut written = 0usize;
        while written < wlen_us {
            let (differ, pnum) = compare(
                &buf_old[written..wlen_us],
                &buf_new[written..wlen_us],
                wa as usize,
            );
            if differ {
                let op_off = wstart + written as u64;
                let op = if old_eof {
                    Op::Zero {
                        offset: op_off,
                        len: pnum as u64,
                    }
                } else {
                    Op::Data {
                        offset: op_off,
                        len: pnum as u64,
                    }
                };
                if out.ops.len() >= MAX_PLAN_OPS {
                    return Err(CopyError::TooManyRequests);
                }
                out.ops.push(op);
            }
            written += pnum;
            if wstart + written as u64 >= old_size {
                old_eof = true;
            }
        }
        out.progress_steps += 1;
        on_step(out.progress_steps);
        offset = wstart + wlen;
    }
    Ok(out)
}

/// Pass 2: send the planned requests to `sink`, re-reading the old content for data.
pub fn execute(
    ops: &[Op],
    mut old: Option<&mut (dyn Content + '_)>,
    sink: &mut (dyn Sink + '_),
) -> Result<(), CopyError> {
    let old_size = old.as_ref().map_or(0, |c| c.size());
    let mut buf = Vec::new();
    for op in ops {
        match *op {
            Op::Zero { offset, len } => sink.write_zeroes(offset, len)?,
            Op::Data { offset, len } => {
                let len = usize::try_from(len).map_err(|_| CopyError::BadStatus)?;
                buf.resize(len, 0);
                let avail = len.min(old_size.saturating_sub(offset) as usize);
                read_part(old.as_deref_mut(), offset, &mut buf, avail)
                    .map_err(|_| CopyError::ReadOld)?;
                sink.write(offset, &buf)?;
            }
        }
    }
    Ok(())
}

/// Whether the first `avail` bytes at `offset` of `src` are known to read as zeros.
fn zero_part<'a>(
    src: Option<&mut (dyn Content + 'a)>,
    offset: u64,
    avail: usize,
) -> Result<bool, CopyError> {
    match src {
        _ if avail == 0 => Ok(true),
        Some(src) => src.known_zero(offset, avail as u64),
        None => Ok(true),
    }
}

/// Fill `buf` with `avail` bytes read at `offset` and zeros after them.
fn read_part<'a>(
    src: Option<&mut (dyn Content + 'a)>,
    offset: u64,
    buf: &mut [u8],
    avail: usize,
) -> Result<(), CopyError> {
    let (head, tail) = buf.split_at_mut(avail);
    tail.fill(0);
    if !head.is_empty() {
        match src {
            Some(src) => src.read(offset, head)?,
            None => head.fill(0),
        }
    }
    Ok(())
}

/// qemu-img's `compare_buffers`: whether the first `chunk`-sized piece differs, and the
/// length of the prefix (in whole chunks, the last one possibly short) with that status.
fn compare(a: &[u8], b: &[u8], chunk: usize) -> (bool, usize) {
    let len = a.len().min(b.len());
    let chunk = chunk.max(1);
    let first = chunk.min(len);
    let res = a[..first] != b[..first];
    let mut i = first;
    while i < len {
        let l = (len - i).min(chunk);
        if (a[i..i + l] != b[i..i + l]) != res {
            break;
        }
        i += l;
    }
    (res, i)
}

fn checked((allocated, run): (bool, u64), max: u64) -> Result<(bool, u64), CopyError> {
    if run == 0 || run > max {
        return Err(CopyError::BadStatus);
    }
    Ok((allocated, run))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An overlay whose allocation is given per `unit` bytes.
    struct Alloc {
        unit: u64,
        map: Vec<bool>,
    }

    impl OverlayStatus for Alloc {
        fn is_allocated(&mut self, offset: u64, bytes: u64) -> Result<(bool, u64), CopyError> {
            let i = (offset / self.unit) as usize;
            let first = self.map[i];
            let mut end = (i as u64 + 1) * self.unit;
            while end < offset + bytes && self.map.get((end / self.unit) as usize) == Some(&first) {
                end += self.unit;
            }
            Ok((first, end.min(offset + bytes) - offset))
        }
    }

    struct Mem(Vec<u8>);

    impl Content for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CopyError> {
            let o = offset as usize;
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
    }

    #[derive(Default)]
    struct Rec(Vec<(u64, Vec<u8>)>, Vec<(u64, u64)>);

    impl Sink for Rec {
        fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), CopyError> {
            self.0.push((offset, data.to_vec()));
            Ok(())
        }
        fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), CopyError> {
            self.1.push((offset, len));
            Ok(())
        }
    }

    const K64: u64 = 64 << 10;
    const M: u64 = 1 << 20;

    fn run(
        size: u64,
        wa: u64,
        overlay: &mut Alloc,
        old: Option<&mut Mem>,
        new: Option<&mut Mem>,
    ) -> Plan {
        let old = old.map(|m| m as &mut dyn Content);
        let new = new.map(|m| m as &mut dyn Content);
        plan(
            Geometry {
                size,
                write_align: wa,
                whole_unallocated: false,
            },
            overlay,
            None,
            old,
            new,
            &mut |_| {},
        )
        .unwrap()
    }

    #[test]
    fn identical_backings_copy_nothing() {
        let mut ovl = Alloc {
            unit: K64,
            map: vec![false; 64],
        };
        let mut old = Mem(vec![7; 4 << 20]);
        let mut new = Mem(vec![7; 4 << 20]);
        let p = run(4 * M, K64, &mut ovl, Some(&mut old), Some(&mut new));
        assert!(p.ops.is_empty());
        assert_eq!(p.progress_steps, 2);
    }

    #[test]
    fn differing_chunks_become_runs_and_allocated_clusters_are_skipped() {
        let mut ovl = Alloc {
            unit: K64,
            map: vec![false; 32],
        };
        ovl.map[1] = true;
        let mut old = Mem(vec![1; 2 << 20]);
        let mut newd = vec![1u8; 2 << 20];
        // clusters 0, 1 (allocated in overlay), 2, 3 differ; 5 differs in one byte.
        for c in [0usize, 1, 2, 3] {
            newd[c * 65536] = 9;
        }
        newd[5 * 65536 + 100] = 9;
        let mut new = Mem(newd);
        let p = run(2 * M, K64, &mut ovl, Some(&mut old), Some(&mut new));
        assert_eq!(
            p.ops,
            vec![
                Op::Data {
                    offset: 0,
                    len: K64
                },
                Op::Data {
                    offset: 2 * K64,
                    len: 2 * K64
                },
                Op::Data {
                    offset: 5 * K64,
                    len: K64
                },
            ]
        );
        let mut sink = Rec::default();
        execute(&p.ops, Some(&mut old), &mut sink).unwrap();
        assert_eq!(sink.0.len(), 3);
        assert!(sink.0.iter().all(|(_, d)| d.iter().all(|&b| b == 1)));
    }

    #[test]
    fn runs_at_or_past_old_eof_are_zero_writes_and_crossing_runs_are_data() {
        // Old backing ends at 1 MiB + 4 KiB; new is all 0x33 (scenario B of the reference).
        let mut ovl = Alloc {
            unit: K64,
            map: vec![false; 32],
        };
        let mut old = Mem(vec![0x22; (1 << 20) + 4096]);
        let mut new = Mem(vec![0x33; 2 << 20]);
        let p = run(2 * M, K64, &mut ovl, Some(&mut old), Some(&mut new));
        // Everything differs: one run starting inside the old backing -> data, all 2 MiB.
        assert_eq!(
            p.ops,
            vec![Op::Data {
                offset: 0,
                len: 2 * M
            }]
        );
        let mut sink = Rec::default();
        execute(&p.ops, Some(&mut old), &mut sink).unwrap();
        let d = &sink.0[0].1;
        assert!(d[..(1 << 20) + 4096].iter().all(|&b| b == 0x22));
        assert!(d[(1 << 20) + 4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn no_old_backing_means_zero_writes() {
        let mut ovl = Alloc {
            unit: K64,
            map: vec![false; 16],
        };
        let mut newd = vec![0u8; 1 << 20];
        newd[3 * 65536] = 1;
        let mut new = Mem(newd);
        let p = run(M, K64, &mut ovl, None, Some(&mut new));
        assert_eq!(
            p.ops,
            vec![Op::Zero {
                offset: 3 * K64,
                len: K64
            }]
        );
    }

    #[test]
    fn widening_is_clamped_to_the_buffer_and_image_end() {
        // Overlay 2 MiB clusters at 1 MiB unallocated granularity: widen, clamp at size.
        let mut ovl = Alloc {
            unit: M,
            map: vec![false; 3],
        };
        ovl.map[0] = true;
        let mut old = Mem(vec![5; 3 << 20]);
        let mut new = Mem(vec![6; 3 << 20]);
        let p = run(3 * M, 2 * M, &mut ovl, Some(&mut old), Some(&mut new));
        // Step at 1 MiB widens down to 0 and is capped at 2 MiB; the next starts at 2 MiB.
        assert_eq!(
            p.ops,
            vec![
                Op::Data {
                    offset: 0,
                    len: 2 * M
                },
                Op::Data {
                    offset: 2 * M,
                    len: M
                },
            ]
        );
    }

    /// Content that says every range is zero where it is, and counts reads.
    struct Sparse(Mem, u32);

    impl Content for Sparse {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CopyError> {
            self.1 += 1;
            self.0.read(offset, buf)
        }
        fn known_zero(&mut self, offset: u64, len: u64) -> Result<bool, CopyError> {
            let o = offset as usize;
            Ok(self.0 .0[o..o + len as usize].iter().all(|&b| b == 0))
        }
    }

    #[test]
    fn known_zero_ranges_are_not_read_and_plan_the_same() {
        let mut old = vec![0u8; 8 << 20];
        old[3 << 20] = 1;
        let mut new = vec![0u8; 8 << 20];
        new[5 << 20] = 2;
        let mut ovl = Alloc {
            unit: K64,
            map: vec![false; 128],
        };
        let expect = run(
            8 * M,
            K64,
            &mut ovl,
            Some(&mut Mem(old.clone())),
            Some(&mut Mem(new.clone())),
        );
        let (mut o, mut n) = (Sparse(Mem(old), 0), Sparse(Mem(new), 0));
        let got = plan(
            Geometry {
                size: 8 * M,
                write_align: K64,
                whole_unallocated: false,
            },
            &mut ovl,
            None,
            Some(&mut o),
            Some(&mut n),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(got, expect);
        assert_eq!(got.progress_steps, 4);
        // Only the two 2 MiB steps holding data were read, on both sides.
        assert_eq!((o.1, n.1), (2, 2));
    }

    #[test]
    fn compare_matches_qemu() {
        let a = [0u8; 10];
        let mut b = [0u8; 10];
        assert_eq!(compare(&a, &b, 4), (false, 10));
        b[5] = 1;
        assert_eq!(compare(&a, &b, 4), (false, 4));
        assert_eq!(compare(&a[4..], &b[4..], 4), (true, 4));
        assert_eq!(compare(&a[8..], &b[8..], 4), (false, 2));
    }
}
