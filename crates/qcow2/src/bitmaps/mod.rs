//! Persistent dirty bitmaps (`docs/bitmaps.md`), as QEMU's `qcow2-bitmap.c` handles
//! them when `qemu-img rebase` opens an overlay read-write and closes it:
//!
//! - open ([`BitmapSet::load`]): the directory and every consistent bitmap's table
//!   are checked with QEMU's words; each consistent bitmap is then marked IN_USE in the
//!   directory, in place, between two header writes that clear and set the autoclear
//!   bit ([`crate::writer::Writer::bitmaps_open`]);
//! - during a safe rebase every enabled bitmap is dirtied by the rebase's writes;
//! - close ([`crate::writer::Writer::bitmaps_close`]): each consistent bitmap is stored
//!   into new clusters (its non-zero data clusters, then its table), then the new
//!   directory; the caches are flushed, the header names the new directory, and the old
//!   directory, tables and data clusters are freed (data clusters are discarded).
//!
//! Bitmaps already IN_USE when the image is opened are inconsistent to QEMU: never
//! read, kept in the directory as they are, their clusters untouched.

mod chunk;
mod dir;
mod error;
mod store;

use alloc::collections::BTreeSet;
use alloc::vec;
use alloc::vec::Vec;

use instar_blockdev::bytes::be64_table;
use instar_blockdev::BlockDev;

pub use chunk::{fill, Chunks, Source};
pub use dir::{build as build_directory, entry_size, parse as parse_directory, DirEntry};
pub use error::BitmapError;
pub use store::Dirt;

use crate::Header;

/// `BME_FLAG_IN_USE`: the bitmap may be out of date (in use by a program, or not
/// stored after a crash).
pub const FLAG_IN_USE: u32 = 1 << 0;
/// `BME_FLAG_AUTO`: the bitmap is enabled (tracks writes).
pub const FLAG_AUTO: u32 = 1 << 1;
const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
const TYPE_DIRTY_TRACKING: u8 = 1;
const MAX_TABLE_SIZE: u32 = 0x800_0000;
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_GRANULARITY_BITS: u8 = 31;
const MAX_NAME_SIZE: usize = 1023;
/// Bitmap table entry bits.
pub const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const TABLE_ALL_ONES: u64 = 1;
/// instar's bound on the table entries of all bitmaps held in memory at once
/// (32 MiB): far beyond any real image (one entry covers `cluster_size * 8`
/// granules: 2 MiB of disk at the smallest clusters and granularity).
pub const MAX_TABLE_ENTRIES: u64 = 1 << 22;

/// `check_table_entry`.
pub fn table_entry_ok(entry: u64, cluster_size: u64) -> bool {
    if entry & TABLE_RESERVED_MASK != 0 {
        return false;
    }
    let off = entry & TABLE_OFFSET_MASK;
    off == 0 || (entry & TABLE_ALL_ONES == 0 && off.is_multiple_of(cluster_size))
}

/// What a table entry stands for.
pub fn source(entry: u64) -> Source {
    match entry & TABLE_OFFSET_MASK {
        0 if entry & TABLE_ALL_ONES != 0 => Source::Ones,
        0 => Source::Zeros,
        off => Source::Cluster(off),
    }
}

/// An image's bitmaps as QEMU holds them after a read-write open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapSet {
    pub dir_offset: u64,
    pub dir_size: u64,
    /// Directory order.
    pub entries: Vec<DirEntry>,
    /// Each entry's table as read (consistent and IN_USE bitmaps alike).
    pub tables: Vec<Vec<u64>>,
    pub disk_len: u64,
    pub cluster_size: u64,
}

impl BitmapSet {
    /// Load the bitmaps of the image on `dev` (`qcow2_load_dirty_bitmaps`, up to the
    /// in-place update a read-write open adds: [`BitmapSet::check_in_place`]): `None`
    /// when the header has no (valid) bitmaps extension.
    pub fn load<D: BlockDev + ?Sized>(
        dev: &mut D,
        header: &Header,
    ) -> Result<Option<Self>, BitmapError> {
        let Some(ext) = header.bitmaps else {
            return Ok(None);
        };
        let cs = header.cluster_size();
        let disk_len = header.virtual_size();
        let mut raw = vec![0u8; ext.bitmap_directory_size as usize];
        dev.read_zero_padded(ext.bitmap_directory_offset, &mut raw)?;
        let entries = dir::parse(&raw, ext.nb_bitmaps, cs, disk_len)?;
        let total: u64 = entries.iter().map(|e| u64::from(e.table_size)).sum();
        if total > MAX_TABLE_ENTRIES {
            return Err(BitmapError::TooLarge {
                entries: total,
                max: MAX_TABLE_ENTRIES,
            });
        }
        let mut tables = Vec::with_capacity(entries.len());
        let mut names = BTreeSet::new();
        for e in &entries {
            // QEMU skips an IN_USE bitmap whose name it already has, and refuses a
            // consistent one.
            if !names.insert(e.name.as_slice()) && !e.in_use() {
                return Err(BitmapError::Duplicate {
                    name: e.name.clone(),
                });
            }
            let mut raw = vec![0u8; e.table_size as usize * 8];
            dev.read_zero_padded(e.table_offset, &mut raw)?;
            let table = be64_table(&raw);
            if !e.in_use() {
                check_consistent(e, &table, cs, disk_len)?;
            } else if !table.iter().all(|&t| table_entry_ok(t, cs)) {
                // QEMU never reads an IN_USE bitmap's table; instar must know where its
                // clusters are to keep writes off them.
                return Err(BitmapError::Misplaced {
                    what: "table",
                    name: e.name.clone(),
                    offset: e.table_offset,
                    why: "(in use) holds an invalid entry",
                });
            }
            tables.push(table);
        }
        Ok(Some(BitmapSet {
            dir_offset: ext.bitmap_directory_offset,
            dir_size: ext.bitmap_directory_size,
            entries,
            tables,
            disk_len,
            cluster_size: cs,
        }))
    }

    /// A read-write open's in-place IN_USE update needs a directory of the same size
    /// (a name with a NUL inside may shorten it): QEMU's open fails otherwise.
    pub fn check_in_place(&self) -> Result<(), BitmapError> {
        if self.needs_store() && self.in_use_directory().len() as u64 != self.dir_size {
            return Err(BitmapError::InPlaceUpdate);
        }
        Ok(())
    }

    /// Whether QEMU loads any bitmap (one not IN_USE), and so rewrites the bitmaps on
    /// open and on close.
    pub fn needs_store(&self) -> bool {
        self.entries.iter().any(|e| !e.in_use())
    }

    /// The directory QEMU writes in place on open: every bitmap IN_USE.
    pub fn in_use_directory(&self) -> Vec<u8> {
        dir::build(&self.in_use_entries())
    }

    /// The geometry of entry `i`'s bitmap.
    pub fn chunks(&self, i: usize) -> Chunks {
        Chunks {
            disk_len: self.disk_len,
            granularity_bits: self
                .entries
                .get(i)
                .map_or(9, |e| u32::from(e.granularity_bits)),
            cluster_size: self.cluster_size,
        }
    }
}

/// `bitmap_table_load` and `load_bitmap_data`'s checks for a consistent bitmap.
fn check_consistent(
    e: &DirEntry,
    table: &[u64],
    cs: u64,
    disk_len: u64,
) -> Result<(), BitmapError> {
    if !table.iter().all(|&t| table_entry_ok(t, cs)) {
        return Err(BitmapError::BadTable {
            name: e.name.clone(),
        });
    }
    let c = Chunks {
        disk_len,
        granularity_bits: u32::from(e.granularity_bits),
        cluster_size: cs,
    };
    if c.table_size() != u64::from(e.table_size) {
        return Err(BitmapError::BadData {
            name: e.name.clone(),
        });
    }
    Ok(())
}
