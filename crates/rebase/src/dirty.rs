//! Dirty qcow2 overlays (the DIRTY bit, lazy refcounts left inconsistent by a crash):
//! QEMU repairs them when it opens them read-write, printing what it fixes, and only
//! then rebases. instar plans the same repair in memory
//! ([`instar_qcow2::repair::plan`]) and hands the rebase a view of the repaired image
//! ([`Repaired`]); the repair's writes reach the overlay only with the rebase's first
//! write, after every check of the rebase (and its overlap proof) has passed.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use instar_abi::{ErrorKind, GuestError, RepairLines, RepairVerdict};
use instar_blockdev::{BlockDev, IoError};
use instar_qcow2::repair::{self, Line, RepairError, RepairWrite, RepairWriteKind, Verdict};

/// Most runs of repair lines the answer carries: each encodes in at most ~45 bytes,
/// and the response area holds 16 KiB.
const MAX_RUNS: usize = 256;
use instar_qcow2::{Header, OpenMode};

/// The refusal of a dirty image whose repair instar does not reproduce.
fn refused(why: &str) -> GuestError {
    GuestError {
        kind: ErrorKind::Open { dev: 0 },
        message: alloc::format!(
            "instar does not rebase this image with the dirty bit set ({why}; QEMU would \
             repair it on open); run 'qemu-img check -r all' on the image first"
        ),
    }
}

/// The overlay as the repair leaves it: reads see the repair's writes, which are made
/// on the device (then flushed) just before the first write through this view.
pub(crate) struct Repaired<'a> {
    inner: &'a mut dyn BlockDev,
    /// The repair's writes by offset (they never overlap), and the longest.
    pending: BTreeMap<u64, RepairWrite>,
    longest_write: u64,
    /// Freed clusters that read as zeros once the repair is made: offset → length,
    /// and the longest run.
    discards: BTreeMap<u64, u64>,
    longest_discard: u64,
    end: u64,
}

impl Repaired<'_> {
    fn commit(&mut self) -> Result<(), IoError> {
        if self.pending.is_empty() && self.discards.is_empty() {
            return Ok(());
        }
        // The new refcount structure and fixed tables, then (flushed) the header that
        // makes them current and clears the DIRTY bit, then (flushed) the discards:
        // a power loss at any point leaves the old dirty image or the repaired one.
        for w in self
            .pending
            .values()
            .filter(|w| w.kind != RepairWriteKind::Header)
        {
            self.inner.write_at(w.offset, &w.data)?;
        }
        self.inner.flush()?;
        for w in self
            .pending
            .values()
            .filter(|w| w.kind == RepairWriteKind::Header)
        {
            self.inner.write_at(w.offset, &w.data)?;
        }
        self.inner.flush()?;
        // QEMU punches holes; zeros read the same.
        for (&off, &len) in &self.discards {
            let zeros = alloc::vec![0u8; len.min(1 << 20) as usize];
            let mut pos = off;
            while pos < off + len {
                let n = (off + len - pos).min(zeros.len() as u64);
                self.inner.write_at(pos, &zeros[..n as usize])?;
                pos += n;
            }
        }
        self.inner.flush()?;
        self.pending.clear();
        self.discards.clear();
        Ok(())
    }
}

impl BlockDev for Repaired<'_> {
    fn size(&self) -> u64 {
        self.inner.size().max(self.end)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(IoError::OutOfRange)?;
        if end > self.size() {
            return Err(IoError::OutOfRange);
        }
        // The repair only grows the file: past the device's end it reads as zeros.
        self.inner.read_zero_padded(offset, buf)?;
        let from_d = offset.saturating_sub(self.longest_discard);
        for (&d, &n) in self.discards.range(from_d..end) {
            let from = offset.max(d);
            let to = end.min(d + n);
            if from < to {
                buf[(from - offset) as usize..(to - offset) as usize].fill(0);
            }
        }
        let from_w = offset.saturating_sub(self.longest_write);
        for w in self.pending.range(from_w..end).map(|(_, w)| w) {
            let w_end = w.offset + w.data.len() as u64;
            let from = offset.max(w.offset);
            let to = end.min(w_end);
            if from < to {
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&w.data[(from - w.offset) as usize..(to - w.offset) as usize]);
            }
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        self.commit()?;
        self.inner.write_at(offset, buf)?;
        self.end = self.end.max(offset + buf.len() as u64);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        self.inner.flush()
    }
}

/// The lines as runs of consecutive clusters with the same verdict and counts.
fn runs(lines: &[Line]) -> Vec<RepairLines> {
    let mut out: Vec<RepairLines> = Vec::new();
    for line in lines {
        let next = match *line {
            Line::Cluster {
                verdict,
                index,
                refcount,
                reference,
            } => {
                let verdict = match verdict {
                    Verdict::Repairing => RepairVerdict::Repairing,
                    Verdict::Error => RepairVerdict::Error,
                    Verdict::Leaked => RepairVerdict::Leaked,
                };
                if let Some(RepairLines::Clusters {
                    verdict: v,
                    first,
                    count,
                    refcount: r,
                    reference: f,
                }) = out.last_mut()
                {
                    if *v == verdict
                        && *r == refcount
                        && *f == reference
                        && *first + *count == index
                    {
                        *count += 1;
                        continue;
                    }
                }
                RepairLines::Clusters {
                    verdict,
                    first: index,
                    count: 1,
                    refcount,
                    reference,
                }
            }
            Line::BlockRefcount { index, refcount } => {
                RepairLines::BlockRefcount { index, refcount }
            }
            Line::Rebuilding => RepairLines::Rebuilding,
            Line::CopiedL2 {
                l1_index,
                l1_entry,
                refcount,
            } => RepairLines::CopiedL2 {
                l1_index,
                l1_entry,
                refcount,
            },
            Line::CopiedData { l2_entry, refcount } => {
                RepairLines::CopiedData { l2_entry, refcount }
            }
        };
        out.push(next);
    }
    out
}

/// When the overlay on `dev` is a dirty qcow2 image: plan its repair and return the
/// repaired view and the lines QEMU prints. `Ok(None)` when the overlay is not dirty,
/// or cannot be opened at all (the rebase then reports that itself).
pub(crate) fn prepare<'a>(
    dev: &'a mut dyn BlockDev,
) -> Result<Option<(Repaired<'a>, Vec<RepairLines>)>, GuestError> {
    let Ok(header) = Header::read(&mut *dev, OpenMode::ReadWrite) else {
        return Ok(None);
    };
    // Bitmaps (an extension QEMU would act on) are refused by the rebase with their own
    // message; the autoclear bit alone changes nothing.
    if !header.dirty() || header.bitmaps.is_some() || header.stale_bitmaps {
        return Ok(None);
    }
    let plan = match repair::plan(&mut *dev, &header) {
        Ok(p) => p,
        Err(RepairError::Unsupported(why)) => return Err(refused(why)),
        Err(RepairError::Io(_)) => {
            return Err(GuestError {
                kind: ErrorKind::Open { dev: 0 },
                message: String::from("Could not repair dirty image: Input/output error"),
            })
        }
    };
    let lines = runs(&plan.lines);
    if lines.len() > MAX_RUNS {
        return Err(refused("too many repair messages for the sandbox's answer"));
    }
    let end = plan.end(dev.size());
    let longest_write = plan.writes.iter().map(|w| w.data.len() as u64).max();
    let longest_discard = plan.discards.iter().map(|d| d.1).max();
    Ok(Some((
        Repaired {
            inner: dev,
            pending: plan.writes.into_iter().map(|w| (w.offset, w)).collect(),
            longest_write: longest_write.unwrap_or(0),
            discards: plan.discards.into_iter().collect(),
            longest_discard: longest_discard.unwrap_or(0),
            end,
        },
        lines,
    )))
}
