//! The bitmap directory: QEMU's `bitmap_list_load` checks, in its order and with its
//! words, and the bytes `bitmap_list_store` writes for a list of entries.

use alloc::vec::Vec;

use instar_blockdev::bytes::Fixed;

use super::error::BitmapError;
use super::{
    FLAG_IN_USE, MAX_GRANULARITY_BITS, MAX_NAME_SIZE, MAX_PHYS_SIZE, MAX_TABLE_SIZE,
    MIN_GRANULARITY_BITS, RESERVED_FLAGS, TYPE_DIRTY_TRACKING,
};

/// Bytes of a directory entry before its extra data and name.
pub const ENTRY_HEADER: usize = 24;

/// One bitmap directory entry, as QEMU holds it after loading the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    pub flags: u32,
    pub granularity_bits: u8,
    /// The name as QEMU keeps it (`g_strndup`): the name field up to its first NUL.
    pub name: Vec<u8>,
    /// Bytes the entry took in the directory it was read from.
    pub entry_len: usize,
}

impl DirEntry {
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
}

/// `calc_dir_entry_size`: header, extra data and name, rounded up to 8 bytes.
pub fn entry_size(name_len: usize) -> usize {
    (ENTRY_HEADER + name_len).next_multiple_of(8)
}

/// Parse a directory of `dir.len()` bytes that the header says holds `nb_bitmaps`
/// entries, for an image of `cluster_size` byte clusters and a disk of `disk_len`
/// bytes (`bitmap_list_load`, including `check_dir_entry`).
pub fn parse(
    dir: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    disk_len: u64,
) -> Result<Vec<DirEntry>, BitmapError> {
    if dir.is_empty() {
        return Err(BitmapError::DirectorySizeZero);
    }
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut count = 0u32;
    while pos < dir.len() {
        let Some(head) = dir
            .get(pos..pos + ENTRY_HEADER)
            .and_then(|b| b.first_chunk::<ENTRY_HEADER>())
        else {
            return Err(BitmapError::BrokenDirectory);
        };
        count += 1;
        if count > nb_bitmaps {
            return Err(BitmapError::MoreBitmaps);
        }
        let f = Fixed(head);
        let name_size = usize::from(f.be16::<18>());
        let extra = f.be32::<20>() as usize;
        let len = (ENTRY_HEADER + name_size + extra).next_multiple_of(8);
        if pos + len > dir.len() {
            return Err(BitmapError::BrokenDirectory);
        }
        if extra != 0 {
            return Err(BitmapError::ExtraData);
        }
        let field = &dir[pos + ENTRY_HEADER..pos + ENTRY_HEADER + name_size];
        let e = DirEntry {
            table_offset: f.be64::<0>(),
            table_size: f.be32::<8>(),
            flags: f.be32::<12>(),
            granularity_bits: head[17],
            name: instar_blockdev::bytes::c_str(field).to_vec(),
            entry_len: len,
        };
        if !satisfies(&e, head[16], name_size, cluster_size, disk_len) {
            return Err(BitmapError::Constraints { name: e.name });
        }
        out.push(e);
        pos += len;
    }
    if count != nb_bitmaps {
        return Err(BitmapError::LessBitmaps);
    }
    Ok(out)
}

/// `check_dir_entry` (the `type` byte is passed apart: QEMU checks it in the same test).
fn satisfies(e: &DirEntry, kind: u8, name_size: usize, cs: u64, disk_len: u64) -> bool {
    let g = e.granularity_bits;
    if e.table_size == 0
        || e.table_offset == 0
        || !e.table_offset.is_multiple_of(cs)
        || e.table_size > MAX_TABLE_SIZE
        || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&g)
        || e.flags & RESERVED_FLAGS != 0
        || name_size > MAX_NAME_SIZE
        || kind != TYPE_DIRTY_TRACKING
    {
        return false;
    }
    let phys = u64::from(e.table_size) * cs;
    if phys > MAX_PHYS_SIZE {
        return false;
    }
    // A consistent bitmap's table must cover the disk (phys * 8 << 31 fits: phys ≤ 2^29).
    e.in_use() || disk_len <= (phys * 8) << g
}

/// The directory bytes QEMU writes for `entries` (`bitmap_list_store`).
pub fn build(entries: &[DirEntry]) -> Vec<u8> {
    let size: usize = entries.iter().map(|e| entry_size(e.name.len())).sum();
    let mut dir = alloc::vec![0u8; size];
    let mut pos = 0;
    for e in entries {
        let d = &mut dir[pos..];
        d[0..8].copy_from_slice(&e.table_offset.to_be_bytes());
        d[8..12].copy_from_slice(&e.table_size.to_be_bytes());
        d[12..16].copy_from_slice(&e.flags.to_be_bytes());
        d[16] = TYPE_DIRTY_TRACKING;
        d[17] = e.granularity_bits;
        d[18..20].copy_from_slice(&(e.name.len() as u16).to_be_bytes());
        d[ENTRY_HEADER..ENTRY_HEADER + e.name.len()].copy_from_slice(&e.name);
        pos += entry_size(e.name.len());
    }
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 65536;

    fn entry(name: &[u8], flags: u32, gran: u8, table: (u64, u32)) -> Vec<u8> {
        let e = DirEntry {
            table_offset: table.0,
            table_size: table.1,
            flags,
            granularity_bits: gran,
            name: name.to_vec(),
            entry_len: entry_size(name.len()),
        };
        build(&[e])
    }

    #[test]
    fn round_trip() {
        let mut dir = entry(b"a", 2, 16, (CS, 1));
        dir.extend(entry(b"second", 1, 9, (2 * CS, 1)));
        let e = parse(&dir, 2, CS, 4 << 20).expect("parse");
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].name.as_slice(), e[0].flags), (&b"a"[..], 2));
        assert!(e[1].in_use());
        let mut again = e.clone();
        again.iter_mut().for_each(|x| x.entry_len = 0);
        assert_eq!(build(&again), dir);
    }

    #[test]
    fn qemu_refusals_in_qemu_order() {
        let good = entry(b"b0", 2, 16, (CS, 1));
        assert_eq!(parse(&[], 1, CS, 1), Err(BitmapError::DirectorySizeZero));
        assert_eq!(
            parse(&good[..20], 1, CS, 1),
            Err(BitmapError::BrokenDirectory)
        );
        assert_eq!(parse(&good, 0, CS, 1), Err(BitmapError::MoreBitmaps));
        assert_eq!(parse(&good, 2, CS, 1), Err(BitmapError::LessBitmaps));
        let mut extra = good.clone();
        extra[20..24].copy_from_slice(&8u32.to_be_bytes());
        extra.extend([0u8; 8]);
        assert_eq!(parse(&extra, 1, CS, 1), Err(BitmapError::ExtraData));
        let mut long = good.clone();
        long[18..20].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(parse(&long, 1, CS, 1), Err(BitmapError::BrokenDirectory));
        let constraints = Err(BitmapError::Constraints {
            name: b"b0".to_vec(),
        });
        for bad in [
            entry(b"b0", 2, 8, (CS, 1)),
            entry(b"b0", 2, 32, (CS, 1)),
            entry(b"b0", 6, 16, (CS, 1)),
            entry(b"b0", 2, 16, (CS + 512, 1)),
            entry(b"b0", 2, 16, (0, 1)),
            entry(b"b0", 2, 16, (CS, 0)),
            entry(b"b0", 2, 16, (CS, 8193)),
        ] {
            assert_eq!(parse(&bad, 1, CS, 1), constraints);
        }
        // A consistent bitmap's table must cover the disk; an IN_USE one need not.
        let disk = (CS * 8) << 16;
        assert_eq!(parse(&good, 1, CS, disk + 1), constraints);
        assert!(parse(&entry(b"b0", 3, 16, (CS, 1)), 1, CS, disk + 1).is_ok());
        let mut kind = good;
        kind[16] = 2;
        assert_eq!(parse(&kind, 1, CS, 1), constraints);
    }

    #[test]
    fn names_end_at_nul() {
        let dir = entry(b"a\0b", 2, 16, (CS, 1));
        let e = parse(&dir, 1, CS, 1).expect("parse");
        assert_eq!(e[0].name, b"a");
        assert_eq!(e[0].entry_len, 32);
    }
}
