//! No write onto metadata: where every structure of an image lies, and the proof, made
//! before the first write, that a session's writes land only where they may.
//!
//! [`Layout::scan`] finds every structure QEMU's overlap check knows (`metadata_ol_names`
//! in QEMU's `qcow2-refcount.c`): the header cluster, the active L1 table and its L2
//! tables, the refcount table and its blocks, the snapshot table, each snapshot's L1 table
//! and its L2 tables; and, given the image's persistent bitmaps
//! ([`Layout::scan_with_bitmaps`]), the bitmap directory, every bitmap table and every
//! bitmap data cluster (QEMU checks the directory only). It refuses a structure named at
//! cluster 0, outside the file, or overlapping another structure (two L1 entries naming
//! one L2 table is allowed here: internal snapshots share tables, and the write check
//! below decides).
//!
//! [`Layout::audit`] takes the [`WriteRecord`] of a writer's dry run and reads every
//! distinct L2 table once. It refuses an L2 entry whose data lies in a structure, and
//! checks every cluster the session writes or takes:
//! - a cluster the allocator takes (refcount 0) must be referenced by nothing (unless the
//!   session itself dropped its only reference and freed it, as a refcount table move
//!   does);
//! - a cluster written in place must be referenced exactly once, by a structure of the
//!   kind written there (an L2 table write lands on an L2 table, data on a data cluster).
//!
//! Cost: the active L1 and refcount tables (read at open anyway), the snapshot table's
//! fixed entry parts, each snapshot's L1 table, and one read of every distinct L2 table,
//! active and inactive. The plan already reads every active L2 table once; snapshots add
//! their L1 tables and the L2 tables they do not share with the active L1.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use instar_blockdev::bytes::be64;
use instar_blockdev::BlockDev;

use crate::bitmaps::BitmapSet;
use crate::entry::{l2_entry_size, L2E_OFFSET_MASK, OFLAG_COMPRESSED};
use crate::map::{compressed_extent, EntryFormat};
use crate::writer::{WriteKind, WriteRecord};
use crate::Header;

mod error;
mod scan;

pub use error::{Found, OverlapError, Referrer, Structure, Target};
use scan::Extent;

/// Where every structure of an image lies. See the module documentation.
#[derive(Debug, Clone)]
pub struct Layout {
    cluster_bits: u32,
    fmt: EntryFormat,
    /// Sorted by offset; identical L2 extents (shared tables) appear once per name.
    extents: Vec<Extent>,
}

impl Layout {
    /// Find every structure of the image on `dev` described by `header` (already
    /// parsed with QEMU's open checks) and refuse misplaced or overlapping ones.
    pub fn scan<D: BlockDev + ?Sized>(dev: &mut D, header: &Header) -> Result<Self, OverlapError> {
        Self::scan_with_bitmaps(dev, header, None)
    }

    /// [`Layout::scan`], with the bitmap directory, every bitmap table and every
    /// bitmap data cluster of `bitmaps` (loaded from the same image) as structures.
    pub fn scan_with_bitmaps<D: BlockDev + ?Sized>(
        dev: &mut D,
        header: &Header,
        bitmaps: Option<&BitmapSet>,
    ) -> Result<Self, OverlapError> {
        if header.bitmaps.is_some() && bitmaps.is_none() {
            return Err(OverlapError::Bitmaps);
        }
        let extents = scan::structures(dev, header, bitmaps)?;
        Ok(Layout {
            cluster_bits: header.cluster_bits(),
            fmt: header.entry_format(),
            extents,
        })
    }

    /// The structure overlapping `[offset, offset + len)`, if any.
    fn structure_at(&self, offset: u64, len: u64) -> Option<&Extent> {
        let end = offset.saturating_add(len.max(1));
        // Extents are disjoint (or identical), so the candidates are the last one that
        // starts before `end` and those identical to it.
        let i = self.extents.partition_point(|e| e.offset < end);
        self.extents[..i].last().filter(|e| e.end() > offset)
    }

    /// Check the writes and allocations of a session (see the module documentation).
    /// `dev` must still hold the image as scanned.
    pub fn audit<D: BlockDev + ?Sized>(
        &self,
        dev: &mut D,
        record: &WriteRecord,
    ) -> Result<(), OverlapError> {
        let touched = Touched::new(record, self.cluster_bits);
        let mut hits: BTreeMap<u64, Hits> = BTreeMap::new();
        let cb = self.cluster_bits;
        for e in &self.extents {
            for c in (e.offset >> cb)..=((e.end() - 1) >> cb) {
                if touched.any(c) {
                    hits.entry(c).or_default().add(e.found());
                }
            }
        }
        self.scan_l2_entries(dev, &touched, &mut hits)?;
        for (&c, h) in &hits {
            self.verdict(c, h, record, &touched)?;
        }
        // A metadata write in place must land on something that names it.
        for &c in touched.meta.keys() {
            if !hits.contains_key(&c) && !record.was_taken(c) && !record.was_freed(c) {
                let kind = touched.kinds(c).first().copied().unwrap_or(WriteKind::Data);
                return Err(OverlapError::Unnamed { kind, at: c << cb });
            }
        }
        Ok(())
    }

    fn verdict(
        &self,
        c: u64,
        h: &Hits,
        record: &WriteRecord,
        touched: &Touched,
    ) -> Result<(), OverlapError> {
        let at = c << self.cluster_bits;
        if record.was_taken(c) {
            if record.was_freed(c) && h.count <= 1 {
                return Ok(());
            }
            return Err(OverlapError::TakenInUse { at, on: h.first });
        }
        for kind in touched.kinds(c) {
            if !fits(kind, h.first.target) {
                return Err(OverlapError::Write {
                    kind,
                    at,
                    on: h.first,
                });
            }
            if let Some(second) = h.second {
                if !fits(kind, second.target) {
                    return Err(OverlapError::Write {
                        kind,
                        at,
                        on: second,
                    });
                }
                return Err(OverlapError::Shared {
                    first: h.first,
                    second,
                });
            }
        }
        Ok(())
    }

    /// Read each distinct L2 table once: refuse entries whose data lies in a structure,
    /// and count the references to touched clusters.
    fn scan_l2_entries<D: BlockDev + ?Sized>(
        &self,
        dev: &mut D,
        touched: &Touched,
        hits: &mut BTreeMap<u64, Hits>,
    ) -> Result<(), OverlapError> {
        if self.fmt.has_data_file {
            // Data clusters live in the data file; nothing here can overlap them.
            return Ok(());
        }
        let cb = self.cluster_bits;
        let cs = 1u64 << cb;
        let esize = l2_entry_size(self.fmt.extended_l2);
        let mut buf = vec![0u8; cs as usize];
        let mut last = None;
        for e in self.extents.iter().filter(|e| e.what.is_l2()) {
            if last == Some(e.offset) {
                continue;
            }
            last = Some(e.offset);
            dev.read_at(e.offset, &mut buf)?;
            for (j, raw) in buf.chunks_exact(esize as usize).enumerate() {
                let entry = be64(raw, 0).unwrap_or(0);
                let by = Referrer::L2 {
                    table: e.offset,
                    index: j as u64,
                };
                let (target, off, len) = if entry & OFLAG_COMPRESSED != 0 {
                    let x = compressed_extent(&self.fmt, entry);
                    (Target::Compressed, x.offset, x.len.max(1))
                } else {
                    let off = entry & L2E_OFFSET_MASK & !(cs - 1);
                    if off == 0 {
                        continue;
                    }
                    (Target::Data, off, cs)
                };
                let found = Found {
                    target,
                    offset: off,
                    by,
                };
                if let Some(s) = self.structure_at(off, len) {
                    return Err(OverlapError::Overlap {
                        a: found,
                        b: s.found(),
                    });
                }
                let last_c = off.saturating_add(len - 1) >> cb;
                for c in (off >> cb)..=last_c {
                    if touched.any(c) {
                        hits.entry(c).or_default().add(found);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether a write of `kind` belongs in `target`.
fn fits(kind: WriteKind, target: Target) -> bool {
    matches!(
        (kind, target),
        (WriteKind::Header, Target::Structure(Structure::MainHeader))
            | (WriteKind::ActiveL1, Target::Structure(Structure::ActiveL1))
            | (WriteKind::L2Table, Target::Structure(Structure::ActiveL2))
            | (
                WriteKind::RefcountTable,
                Target::Structure(Structure::RefcountTable)
            )
            | (
                WriteKind::RefcountBlock,
                Target::Structure(Structure::RefcountBlock)
            )
            | (WriteKind::Data, Target::Data)
            | (
                WriteKind::BitmapDirectory,
                Target::Structure(Structure::BitmapDirectory)
            )
            | (
                WriteKind::BitmapDiscard,
                Target::Structure(Structure::BitmapData)
            )
    )
}

/// References to one touched cluster: how many, and the first two.
#[derive(Debug, Clone, Copy)]
struct Hits {
    count: u32,
    first: Found,
    second: Option<Found>,
}

impl Default for Hits {
    fn default() -> Self {
        Hits {
            count: 0,
            first: Found {
                target: Target::Data,
                offset: 0,
                by: Referrer::Header,
            },
            second: None,
        }
    }
}

impl Hits {
    fn add(&mut self, f: Found) {
        match self.count {
            0 => self.first = f,
            1 => self.second = Some(f),
            _ => {}
        }
        self.count = self.count.saturating_add(1);
    }
}

/// The clusters a session writes or takes.
struct Touched<'r> {
    record: &'r WriteRecord,
    /// Clusters with metadata writes → the kinds written there.
    meta: BTreeMap<u64, Vec<WriteKind>>,
    /// Clusters with data writes, as merged runs (first, end).
    data: Vec<(u64, u64)>,
}

impl<'r> Touched<'r> {
    fn new(record: &'r WriteRecord, cb: u32) -> Self {
        let mut meta: BTreeMap<u64, Vec<WriteKind>> = BTreeMap::new();
        let mut data = Vec::new();
        for w in record.writes.iter().filter(|w| w.len > 0) {
            let first = w.offset >> cb;
            let end = ((w.offset + w.len - 1) >> cb) + 1;
            if w.kind == WriteKind::Data {
                data.push((first, end));
            } else {
                for c in first..end {
                    let kinds = meta.entry(c).or_default();
                    if !kinds.contains(&w.kind) {
                        kinds.push(w.kind);
                    }
                }
            }
        }
        data.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(data.len());
        for (s, e) in data {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Touched {
            record,
            meta,
            data: merged,
        }
    }

    fn data_written(&self, c: u64) -> bool {
        let i = self.data.partition_point(|&(s, _)| s <= c);
        i > 0 && c < self.data[i - 1].1
    }

    fn any(&self, c: u64) -> bool {
        self.meta.contains_key(&c) || self.data_written(c) || self.record.was_taken(c)
    }

    fn kinds(&self, c: u64) -> Vec<WriteKind> {
        let mut k = self.meta.get(&c).cloned().unwrap_or_default();
        if self.data_written(c) {
            k.push(WriteKind::Data);
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::{ShadowDev, Writer};
    use crate::OpenMode;
    use alloc::string::ToString;
    use instar_blockdev::MemDev;

    const CS: u64 = 512;
    const RT: u64 = 0x200;
    const RB: u64 = 0x400;
    const L1: u64 = 0x600;
    const L2: u64 = 0x800;
    const DATA: u64 = 0xa00;
    const COPIED: u64 = 1 << 63;

    fn put64(img: &mut [u8], at: u64, v: u64) {
        img[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn set_refcount(img: &mut [u8], cluster: u64, v: u16) {
        let at = (RB + 2 * cluster) as usize;
        img[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }

    /// A v3 image with 512-byte clusters and 16-bit refcounts, 64 KiB of disk (two L1
    /// entries): header, refcount table, refcount block, L1, one L2 table (L1[0]) and
    /// one data cluster (guest cluster 0), each with refcount 1.
    fn image() -> Vec<u8> {
        let mut img = vec![0u8; 6 * CS as usize];
        img[0..4].copy_from_slice(&crate::header::QCOW2_MAGIC.to_be_bytes());
        img[4..8].copy_from_slice(&3u32.to_be_bytes());
        img[20..24].copy_from_slice(&9u32.to_be_bytes());
        put64(&mut img, 24, 64 * 1024);
        img[36..40].copy_from_slice(&2u32.to_be_bytes());
        put64(&mut img, 40, L1);
        put64(&mut img, 48, RT);
        img[56..60].copy_from_slice(&1u32.to_be_bytes());
        img[96..100].copy_from_slice(&4u32.to_be_bytes());
        img[100..104].copy_from_slice(&104u32.to_be_bytes());
        put64(&mut img, RT, RB);
        for c in 0..6 {
            set_refcount(&mut img, c, 1);
        }
        put64(&mut img, L1, L2 | COPIED);
        put64(&mut img, L2, DATA | COPIED);
        img
    }

    /// Scan, dry-run `writes` (guest offset, len), audit; the device must stay as it was.
    fn prove(img: Vec<u8>, writes: &[(u64, usize)]) -> Result<(), OverlapError> {
        let mut dev = MemDev::new(img.clone());
        let header = Header::read(&mut dev, OpenMode::ReadWrite).expect("header");
        let result = (|| {
            let layout = Layout::scan(&mut dev, &header)?;
            let mut w = Writer::open(ShadowDev::new(&mut dev), &header, false)
                .expect("writer")
                .recording(true);
            for &(off, len) in writes {
                w.write(off, &vec![0x5a; len]).expect("dry-run write");
            }
            let (_, _, record) = w.finish_recorded().expect("finish");
            layout.audit(&mut dev, &record)
        })();
        assert_eq!(dev.data, img, "the dry run changed the device");
        assert!(dev.writes.is_empty());
        result
    }

    #[test]
    fn a_sound_image_passes() {
        // A new data cluster under L1[0], and a new L2 table (and data) under L1[1].
        prove(image(), &[(512, 512), (32 * 1024, 1024)]).expect("sound image");
    }

    #[test]
    fn l1_entry_on_the_refcount_block() {
        let mut img = image();
        put64(&mut img, L1, RB | COPIED);
        match prove(img, &[(512, 512)]) {
            Err(OverlapError::Overlap { a, b }) => {
                assert_eq!(a.offset, RB);
                assert_eq!(b.offset, RB);
                // The table the L1 entry names is the one reported as misplaced.
                assert_eq!(a.target, Target::Structure(Structure::ActiveL2));
                assert_eq!(
                    a.by,
                    Referrer::L1 {
                        snapshot: None,
                        index: 0
                    }
                );
                assert_eq!(b.target, Target::Structure(Structure::RefcountBlock));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn two_l1_entries_on_one_table_written_through() {
        let mut img = image();
        put64(&mut img, L1 + 8, L2 | COPIED);
        let e = prove(img.clone(), &[(32 * 1024 + 512, 512)]).expect_err("shared table");
        assert!(matches!(e, OverlapError::Shared { .. }), "{e:?}");
        assert!(e
            .to_string()
            .starts_with("Preventing invalid write on metadata (overlaps with active L2 table)"));
        // Shared but never written through (COPIED clear, so copied on write): fine.
        put64(&mut img, L1 + 8, L2);
        put64(&mut img, L1, L2);
        set_refcount(&mut img, 4, 2);
        prove(img, &[(32 * 1024 + 512, 512)]).expect("copy on write of a shared table");
    }

    #[test]
    fn allocator_would_take_a_table_in_use() {
        let mut img = image();
        // The L2 table claims refcount 0: the next allocation takes it.
        set_refcount(&mut img, L2 / CS, 0);
        let e = prove(img, &[(32 * 1024, 512)]).expect_err("taken");
        match e {
            OverlapError::TakenInUse { at, on } => {
                assert_eq!(at, L2);
                assert_eq!(on.target, Target::Structure(Structure::ActiveL2));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn data_entry_inside_the_l1_table() {
        let mut img = image();
        put64(&mut img, L2 + 8, L1 | COPIED);
        let e = prove(img, &[]).expect_err("data in L1");
        assert!(
            e.to_string()
                .contains("(overlaps with active L1 table): the data cluster at 0x600"),
            "{e}"
        );
    }

    #[test]
    fn compressed_data_inside_the_header_cluster() {
        let mut img = image();
        // 512-byte clusters: the sector count starts at bit 62 - (9 - 8) = 61.
        put64(&mut img, L2 + 8, crate::entry::OFLAG_COMPRESSED | 0x100);
        let e = prove(img, &[]).expect_err("compressed in the header");
        assert!(
            e.to_string().starts_with(
                "Preventing invalid write on metadata (overlaps with qcow2_header): \
                 the compressed cluster at 0x100"
            ),
            "{e}"
        );
    }

    #[test]
    fn tables_outside_the_file_or_at_zero() {
        let mut img = image();
        put64(&mut img, L1 + 8, 0x10_0000 | COPIED);
        let e = prove(img, &[]).expect_err("outside");
        assert!(
            matches!(
                e,
                OverlapError::Misplaced {
                    offset: 0x10_0000,
                    ..
                }
            ),
            "{e:?}"
        );
        let mut img = image();
        put64(&mut img, RT + 8, 0x1000);
        let e = prove(img, &[]).expect_err("refblock outside");
        assert!(e.to_string().contains("lies outside the image file"), "{e}");
    }

    const SNAP_TABLE: u64 = 0xc00;
    const SNAP_L1: u64 = 0xe00;

    /// [`image`] plus one internal snapshot whose L1 table names the same L2 table and
    /// data cluster as the active L1 (refcount 2, COPIED clear), as QEMU leaves them.
    fn image_with_snapshot() -> Vec<u8> {
        let mut img = image();
        img.resize(8 * CS as usize, 0);
        img[60..64].copy_from_slice(&1u32.to_be_bytes());
        put64(&mut img, 64, SNAP_TABLE);
        put64(&mut img, SNAP_TABLE, SNAP_L1);
        let t = SNAP_TABLE as usize;
        img[t + 8..t + 12].copy_from_slice(&2u32.to_be_bytes());
        img[t + 12..t + 14].copy_from_slice(&1u16.to_be_bytes());
        img[t + 14..t + 16].copy_from_slice(&1u16.to_be_bytes());
        img[t + 40] = b'1';
        img[t + 41] = b's';
        put64(&mut img, SNAP_L1, L2);
        put64(&mut img, L1, L2);
        put64(&mut img, L2, DATA);
        for c in 0..8 {
            set_refcount(&mut img, c, 1);
        }
        set_refcount(&mut img, L2 / CS, 2);
        set_refcount(&mut img, DATA / CS, 2);
        img
    }

    #[test]
    fn tables_shared_with_a_snapshot_are_copied_not_written_through() {
        prove(image_with_snapshot(), &[(0, 256), (512, 512)]).expect("copy on write");
    }

    #[test]
    fn active_entry_claiming_a_snapshot_table_is_refused() {
        let mut img = image_with_snapshot();
        // COPIED says "only the active L1 names this table"; the snapshot does too.
        put64(&mut img, L1, L2 | COPIED);
        let e = prove(img, &[(512, 512)]).expect_err("write through a shared table");
        assert!(
            e.to_string().starts_with(
                "Preventing invalid write on metadata (overlaps with inactive L2 table)"
            ),
            "{e}"
        );
    }

    #[test]
    fn snapshot_structures_are_scanned() {
        let mut dev = MemDev::new(image_with_snapshot());
        let header = Header::read(&mut dev, OpenMode::ReadWrite).expect("header");
        let layout = Layout::scan(&mut dev, &header).expect("scan");
        let kinds: Vec<(u64, Structure)> =
            layout.extents.iter().map(|e| (e.offset, e.what)).collect();
        assert_eq!(
            kinds,
            [
                (0, Structure::MainHeader),
                (RT, Structure::RefcountTable),
                (RB, Structure::RefcountBlock),
                (L1, Structure::ActiveL1),
                (L2, Structure::ActiveL2),
                (L2, Structure::InactiveL2),
                (SNAP_TABLE, Structure::SnapshotTable),
                (SNAP_L1, Structure::InactiveL1),
            ]
        );
        // The snapshot table's length is QEMU's snapshots_size: 40 + id + name.
        assert_eq!(layout.extents[6].len, 42);
    }
}
