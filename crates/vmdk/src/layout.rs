//! Where a monolithicSparse vmdk's structures lie, checked before the first write of a
//! safe rebase. The writer appends new grains at the end of the file and writes grain
//! table entries in place, in the tables both grain directories name; a grain table that
//! overlaps the header, the descriptor, a grain directory, another grain table or a
//! grain would turn those entry writes into damage. QEMU's vmdk driver has no such check.
//!
//! Cost: every grain table named by either directory is read once (the primary ones are
//! read by the copy plan too).

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use instar_blockdev::bytes::le32_table;
use instar_blockdev::{BlockDev, IoError};

use crate::descriptor::{DESC_OFFSET, DESC_SIZE};
use crate::image::{SparseHeader, GTE_ZEROED};

/// A structure of the file, or a grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Header,
    Descriptor,
    GrainDirectory,
    RedundantGrainDirectory,
    /// The grain table named by entry `index` of the (redundant, if `backup`) directory.
    GrainTable {
        backup: bool,
        index: u32,
    },
    /// The grain named by entry `entry` of the grain table at `table`.
    Grain {
        table: u64,
        entry: u32,
    },
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Part::Header => f.write_str("the sparse header"),
            Part::Descriptor => f.write_str("the descriptor"),
            Part::GrainDirectory => f.write_str("the grain directory"),
            Part::RedundantGrainDirectory => f.write_str("the redundant grain directory"),
            Part::GrainTable {
                backup: false,
                index,
            } => write!(f, "the grain table of grain directory entry {index}"),
            Part::GrainTable {
                backup: true,
                index,
            } => write!(
                f,
                "the grain table of redundant grain directory entry {index}"
            ),
            Part::Grain { table, entry } => {
                write!(
                    f,
                    "the grain of entry {entry} of the grain table at {table:#x}"
                )
            }
        }
    }
}

/// Two parts that overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap {
    pub a: Part,
    pub a_offset: u64,
    pub b: Part,
    pub b_offset: u64,
}

impl fmt::Display for Overlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Preventing invalid write on metadata: {} at {:#x} overlaps with {} at {:#x}; \
             nothing was written",
            self.a, self.a_offset, self.b, self.b_offset
        )
    }
}

#[derive(Debug, Clone, Copy)]
struct Extent {
    offset: u64,
    len: u64,
    part: Part,
}

/// Check that no structure overlaps another and no grain lies in a structure. `gd` and
/// `rgd` are the directories as read. Tables outside the file or over the header and
/// descriptor are left to the writer's own check (`BadGrainTable`, for the tables a
/// write needs).
pub fn check<D: BlockDev + ?Sized>(
    dev: &mut D,
    header: &SparseHeader,
    gd: &[u32],
    rgd: Option<&[u32]>,
    grain: u64,
) -> Result<(), LayoutError> {
    let gt_len = u64::from(header.num_gtes_per_gt) * 4;
    let dir_len = gd.len() as u64 * 4;
    let mut extents = vec![
        Extent {
            offset: 0,
            len: 512,
            part: Part::Header,
        },
        Extent {
            offset: DESC_OFFSET,
            len: DESC_SIZE as u64,
            part: Part::Descriptor,
        },
        Extent {
            offset: header.gd_offset.saturating_mul(512),
            len: dir_len,
            part: Part::GrainDirectory,
        },
    ];
    if rgd.is_some() {
        extents.push(Extent {
            offset: header.rgd_offset.saturating_mul(512),
            len: dir_len,
            part: Part::RedundantGrainDirectory,
        });
    }
    let mut tables = Vec::new();
    for (backup, dir) in [(false, Some(gd)), (true, rgd)] {
        for (i, &gt) in dir.unwrap_or(&[]).iter().enumerate() {
            let offset = u64::from(gt) * 512;
            let below = offset < DESC_OFFSET + DESC_SIZE as u64;
            if gt == 0 || below || offset.saturating_add(gt_len) > dev.size() {
                continue;
            }
            let part = Part::GrainTable {
                backup,
                index: i as u32,
            };
            extents.push(Extent {
                offset,
                len: gt_len,
                part,
            });
            tables.push(offset);
        }
    }
    extents.sort_by_key(|e| (e.offset, e.len));
    for w in extents.windows(2) {
        // Sorted by offset: only neighbours can overlap, unless one contains several.
        let (a, b) = (w[0], w[1]);
        if b.offset < a.offset.saturating_add(a.len) {
            return Err(overlap(b, a));
        }
    }
    // Grains named by any table must not lie in a structure.
    let mut raw = vec![0u8; gt_len as usize];
    tables.sort_unstable();
    tables.dedup();
    for t in tables {
        dev.read_at(t, &mut raw)?;
        for (j, gte) in le32_table(&raw).into_iter().enumerate() {
            if gte <= GTE_ZEROED {
                continue;
            }
            let g = Extent {
                offset: u64::from(gte) * 512,
                len: grain,
                part: Part::Grain {
                    table: t,
                    entry: j as u32,
                },
            };
            let end = g.offset.saturating_add(g.len);
            let i = extents.partition_point(|e| e.offset < end);
            if let Some(s) = extents[..i].last() {
                if s.offset.saturating_add(s.len) > g.offset {
                    return Err(overlap(g, *s));
                }
            }
        }
    }
    Ok(())
}

/// Why [`check`] refused the image, or could not finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutError {
    Overlap(Overlap),
    Io(IoError),
}

impl From<IoError> for LayoutError {
    fn from(e: IoError) -> Self {
        LayoutError::Io(e)
    }
}

fn overlap(a: Extent, b: Extent) -> LayoutError {
    LayoutError::Overlap(Overlap {
        a: a.part,
        a_offset: a.offset,
        b: b.part,
        b_offset: b.offset,
    })
}
