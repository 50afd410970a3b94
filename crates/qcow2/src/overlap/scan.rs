//! Finding every metadata structure of an image and refusing misplaced or
//! overlapping ones ([`super::Layout::scan`]).

use alloc::vec;
use alloc::vec::Vec;

use instar_blockdev::bytes::{be64_table, Fixed};
use instar_blockdev::{BlockDev, IoError};

use super::error::{Found, OverlapError, Referrer, Structure, Target};
use crate::bitmaps::{BitmapSet, TABLE_OFFSET_MASK};
use crate::entry::L1E_OFFSET_MASK;
use crate::geometry::{MAX_L1_BYTES, MAX_REFTABLE_BYTES};
use crate::refcount::REFT_OFFSET_MASK;
use crate::Header;

/// A structure's extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Extent {
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) what: Structure,
    pub(super) by: Referrer,
}

impl Extent {
    pub(super) fn end(&self) -> u64 {
        self.offset + self.len
    }
    pub(super) fn found(&self) -> Found {
        Found {
            target: Target::Structure(self.what),
            offset: self.offset,
            by: self.by,
        }
    }
}

fn read_u64s<D: BlockDev + ?Sized>(dev: &mut D, offset: u64, n: u64) -> Result<Vec<u64>, IoError> {
    let mut raw = vec![0u8; (n * 8) as usize];
    dev.read_at(offset, &mut raw)?;
    Ok(be64_table(&raw))
}

/// Every structure of the image on `dev` described by `header`, sorted by offset;
/// misplaced or overlapping ones are refused.
pub(super) fn structures<D: BlockDev + ?Sized>(
    dev: &mut D,
    header: &Header,
    bitmaps: Option<&BitmapSet>,
) -> Result<Vec<Extent>, OverlapError> {
    let cs = header.cluster_size();
    let mut s = Scan {
        cs,
        file_size: dev.size(),
        extents: vec![Extent {
            offset: 0,
            len: cs,
            what: Structure::MainHeader,
            by: Referrer::Header,
        }],
    };
    // Refcount table and blocks.
    let rt_len = u64::from(header.refcount_table_clusters) * cs;
    s.table(
        "refcount table",
        header.refcount_table_offset,
        rt_len,
        MAX_REFTABLE_BYTES,
        Structure::RefcountTable,
        Referrer::Header,
    )?;
    let rt = read_u64s(dev, header.refcount_table_offset, rt_len / 8)?;
    for (i, e) in rt.iter().enumerate() {
        let by = Referrer::Reftable { index: i as u64 };
        s.cluster(e & REFT_OFFSET_MASK, Structure::RefcountBlock, by)?;
    }
    // The encryption header's clusters (LUKS header and key material).
    if let Some((offset, len)) = header.crypto_header.filter(|&(_, l)| l > 0) {
        let len = len.checked_next_multiple_of(cs).unwrap_or(u64::MAX);
        s.place(offset, len, Structure::CryptoHeader, Referrer::Header)?;
    }
    // Active L1 and its L2 tables.
    s.l1(dev, header.l1_table_offset, header.l1_size, None)?;
    // Snapshots: the table, each L1 and its L2 tables.
    if header.nb_snapshots > 0 {
        let snaps = snapshot_l1s(dev, header.snapshots_offset, header.nb_snapshots)?;
        s.place(
            header.snapshots_offset,
            snaps.table_len,
            Structure::SnapshotTable,
            Referrer::Header,
        )?;
        for (k, &(off, size)) in snaps.l1s.iter().enumerate() {
            s.l1(dev, off, size, Some(k as u32))?;
        }
    }
    if let Some(b) = bitmaps {
        s.bitmaps(b)?;
    }
    let mut extents = s.extents;
    extents.sort_by_key(|e| (e.offset, e.len, e.what));
    check_disjoint(&extents)?;
    Ok(extents)
}

/// Refuse overlapping structures; identical L2 extents (shared tables) are allowed.
fn check_disjoint(extents: &[Extent]) -> Result<(), OverlapError> {
    let mut reach: Option<&Extent> = None;
    for e in extents {
        if let Some(r) = reach {
            if e.offset < r.end() {
                let same_table =
                    r.what.is_l2() && e.what.is_l2() && r.offset == e.offset && r.len == e.len;
                if !same_table {
                    let (a, b) = if e.what.rank() < r.what.rank() {
                        (r, e)
                    } else {
                        (e, r)
                    };
                    return Err(OverlapError::Overlap {
                        a: a.found(),
                        b: b.found(),
                    });
                }
            }
            if e.end() <= r.end() {
                continue;
            }
        }
        reach = Some(e);
    }
    Ok(())
}

struct Scan {
    cs: u64,
    file_size: u64,
    extents: Vec<Extent>,
}

impl Scan {
    /// A table named by offset and byte length: aligned, bounded, inside the file.
    fn table(
        &mut self,
        what: &'static str,
        offset: u64,
        len: u64,
        max: u64,
        kind: Structure,
        by: Referrer,
    ) -> Result<(), OverlapError> {
        if len == 0 {
            return Ok(());
        }
        if offset & (self.cs - 1) != 0 || len > max {
            return Err(OverlapError::Invalid {
                what,
                offset,
                len,
                by,
            });
        }
        self.place(offset, len, kind, by)
    }

    /// A one-cluster structure named by an entry (0 = none).
    fn cluster(&mut self, offset: u64, kind: Structure, by: Referrer) -> Result<(), OverlapError> {
        if offset == 0 {
            return Ok(());
        }
        if offset & (self.cs - 1) != 0 {
            return Err(OverlapError::Invalid {
                what: kind.qemu_name(),
                offset,
                len: self.cs,
                by,
            });
        }
        self.place(offset, self.cs, kind, by)
    }

    fn place(
        &mut self,
        offset: u64,
        len: u64,
        what: Structure,
        by: Referrer,
    ) -> Result<(), OverlapError> {
        let outside = offset.checked_add(len).is_none_or(|e| e > self.file_size);
        if offset == 0 || outside {
            return Err(OverlapError::Misplaced {
                target: Target::Structure(what),
                offset,
                by,
            });
        }
        self.extents.push(Extent {
            offset,
            len,
            what,
            by,
        });
        Ok(())
    }

    /// The bitmap directory, each bitmap's table and its data clusters.
    fn bitmaps(&mut self, b: &BitmapSet) -> Result<(), OverlapError> {
        self.place(
            b.dir_offset,
            b.dir_size,
            Structure::BitmapDirectory,
            Referrer::Header,
        )?;
        for (i, (e, table)) in b.entries.iter().zip(&b.tables).enumerate() {
            let by = Referrer::BitmapDirectory { index: i as u32 };
            let len = u64::from(e.table_size) * 8;
            self.place(e.table_offset, len, Structure::BitmapTable, by)?;
            for (j, &t) in table.iter().enumerate() {
                let by = Referrer::BitmapTable {
                    table: e.table_offset,
                    index: j as u64,
                };
                self.cluster(t & TABLE_OFFSET_MASK, Structure::BitmapData, by)?;
            }
        }
        Ok(())
    }

    /// An L1 table and the L2 tables it names.
    fn l1<D: BlockDev + ?Sized>(
        &mut self,
        dev: &mut D,
        offset: u64,
        size: u32,
        snapshot: Option<u32>,
    ) -> Result<(), OverlapError> {
        let (kind, l2_kind, by) = match snapshot {
            None => (Structure::ActiveL1, Structure::ActiveL2, Referrer::Header),
            Some(k) => (
                Structure::InactiveL1,
                Structure::InactiveL2,
                Referrer::Snapshot { index: k },
            ),
        };
        let len = u64::from(size) * 8;
        self.table(kind.qemu_name(), offset, len, MAX_L1_BYTES, kind, by)?;
        if len == 0 {
            return Ok(());
        }
        let l1 = read_u64s(dev, offset, u64::from(size))?;
        for (i, e) in l1.iter().enumerate() {
            let by = Referrer::L1 {
                snapshot,
                index: i as u64,
            };
            self.cluster(e & L1E_OFFSET_MASK, l2_kind, by)?;
        }
        Ok(())
    }
}

/// Each snapshot's L1 table (offset, entries) and the snapshot table's length as QEMU
/// computes it (`snapshots_size`: the end of the last entry).
struct Snapshots {
    l1s: Vec<(u64, u32)>,
    table_len: u64,
}

fn snapshot_l1s<D: BlockDev + ?Sized>(
    dev: &mut D,
    table: u64,
    nb: u32,
) -> Result<Snapshots, OverlapError> {
    // The header parse already checked every entry's sizes (QEMU's read_snapshots).
    let mut offset = table;
    let mut l1s = Vec::with_capacity(nb.min(1024) as usize);
    for _ in 0..nb {
        offset = offset.next_multiple_of(8);
        let mut h = [0u8; 40];
        dev.read_at(offset, &mut h)?;
        let f = Fixed(&h);
        let l1_offset = f.be64::<0>();
        let l1_size = f.be32::<8>();
        let id = u64::from(f.be16::<12>());
        let name = u64::from(f.be16::<14>());
        let extra = u64::from(f.be32::<36>());
        offset += 40 + extra + id + name;
        l1s.push((l1_offset, l1_size));
    }
    Ok(Snapshots {
        l1s,
        table_len: offset - table,
    })
}
