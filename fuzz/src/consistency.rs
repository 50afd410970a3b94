//! A small `qemu-img check` for qcow2 overlays: does every cluster's refcount cover the
//! references to it (leaks allowed), does every reference lie inside the file at an
//! aligned offset, and is every COPIED flag right? The rebase target holds a rebase of
//! an overlay that passes to the strict invariants (refusal leaves it unchanged,
//! success keeps its content). Overlays whose metadata lies are what issue 6's
//! "no write onto metadata" checks must refuse; `INSTAR_FUZZ_STRICT=1` holds them to
//! the strict invariants as well.

use std::collections::HashMap;

use instar_qcow2::entry::{
    L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, OFLAG_COMPRESSED,
    OFLAG_COPIED,
};
use instar_qcow2::map::{compressed_extent, EntryFormat};
use instar_qcow2::refcount::RefcountReader;
use instar_qcow2::{Header, OpenMode};

use crate::dev::FuzzDev;
use instar_blockdev::BlockDev;

/// Most table entries the check walks before it gives up (and calls the image unknown).
const MAX_ENTRIES: u64 = 1 << 20;

struct Refs {
    cs: u64,
    file_len: u64,
    count: HashMap<u64, u64>,
    entries: u64,
}

impl Refs {
    /// Reference `[off, off + len)`; false when it is unaligned or outside the file.
    fn add(&mut self, off: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = off.checked_add(len) else {
            return false;
        };
        if end > self.file_len.next_multiple_of(self.cs) {
            return false;
        }
        for c in off / self.cs..end.div_ceil(self.cs) {
            *self.count.entry(c).or_default() += 1;
        }
        true
    }
}

fn be64(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]))
}

fn read(dev: &mut FuzzDev, off: u64, len: u64) -> Option<Vec<u8>> {
    if off.checked_add(len)? > dev.size() {
        return None;
    }
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    dev.read_at(off, &mut buf).ok()?;
    Some(buf)
}

/// Whether the qcow2 image `data` is consistent as far as the rebase cares. Images
/// the check does not cover (bitmaps, a data file, huge tables) count as inconsistent.
pub fn consistent(data: &[u8]) -> bool {
    check(data).unwrap_or(false)
}

fn check(data: &[u8]) -> Option<bool> {
    let mut dev = FuzzDev::new(data.to_vec(), true);
    let h = Header::read(&mut dev, OpenMode::ReadOnly).ok()?;
    if h.has_bitmaps() || h.has_data_file() || h.autoclear_features != 0 {
        return None;
    }
    let cs = h.cluster_size();
    let fmt = EntryFormat {
        cluster_bits: h.cluster_bits(),
        extended_l2: h.extended_l2(),
        has_data_file: false,
    };
    let mut refs = Refs {
        cs,
        file_len: dev.size(),
        count: HashMap::new(),
        entries: 0,
    };
    let mut ok = refs.add(0, cs);
    ok &= l1_tree(&mut dev, &mut refs, &fmt, h.l1_table_offset, h.l1_size)?;
    ok &= snapshots(&mut dev, &mut refs, &fmt, &h)?;
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    ok &= refs.add(h.refcount_table_offset, rt_len);
    let mut rc = RefcountReader::load(&mut dev, &h).ok()?;
    let blocks = rc.table().to_vec();
    for &e in &blocks {
        ok &= e & 511 == 0 && refs.add(e, if e == 0 { 0 } else { cs });
    }
    if !ok {
        return Some(false);
    }
    // QEMU's check wants the refcount structures counted exactly.
    let own = blocks.iter().filter(|&&e| e != 0).map(|&e| e / cs);
    for c in
        own.chain(h.refcount_table_offset / cs..(h.refcount_table_offset + rt_len).div_ceil(cs))
    {
        if rc.refcount(&mut dev, c).ok()? != refs.count.get(&c).copied().unwrap_or(0) {
            return Some(false);
        }
    }
    for (&c, &n) in &refs.count {
        if rc.refcount(&mut dev, c).ok()? < n {
            return Some(false);
        }
    }
    copied_flags(&mut dev, &mut rc, &h, &fmt)
}

/// Reference the L1 table at `off`, its L2 tables and their clusters.
fn l1_tree(
    dev: &mut FuzzDev,
    refs: &mut Refs,
    fmt: &EntryFormat,
    off: u64,
    n: u32,
) -> Option<bool> {
    let cs = refs.cs;
    let mut ok = refs.add(off, u64::from(n) * 8);
    let l1 = read(dev, off, u64::from(n) * 8)?;
    let esize = if fmt.extended_l2 { 16 } else { 8 };
    for i in 0..n as usize {
        let l2 = be64(&l1, i * 8) & L1E_OFFSET_MASK;
        ok &= be64(&l1, i * 8) & L1E_RESERVED_MASK == 0;
        if l2 == 0 {
            continue;
        }
        ok &= l2.is_multiple_of(cs) && refs.add(l2, cs);
        refs.entries += cs / esize;
        if refs.entries > MAX_ENTRIES {
            return None;
        }
        let Some(t) = read(dev, l2, cs) else {
            return Some(false);
        };
        for j in 0..(cs / esize) as usize {
            let e = be64(&t, j * esize as usize);
            ok &= fmt.extended_l2 || e & OFLAG_COMPRESSED != 0 || e & L2E_STD_RESERVED_MASK == 0;
            ok &= if e & OFLAG_COMPRESSED != 0 {
                let x = compressed_extent(fmt, e);
                refs.add(x.offset & !511, x.len + (x.offset & 511))
            } else {
                let host = e & L2E_OFFSET_MASK;
                host == 0 || (host.is_multiple_of(cs) && refs.add(host, cs))
            };
        }
    }
    Some(ok)
}

fn snapshots(dev: &mut FuzzDev, refs: &mut Refs, fmt: &EntryFormat, h: &Header) -> Option<bool> {
    let mut ok = true;
    let mut p = h.snapshots_offset;
    let start = p;
    for _ in 0..h.nb_snapshots {
        p = p.next_multiple_of(8);
        let e = read(dev, p, 40)?;
        let l1 = be64(&e, 0);
        let l1_n = u32::from_be_bytes(e[8..12].try_into().ok()?);
        let names = u64::from(u16::from_be_bytes([e[12], e[13]]))
            + u64::from(u16::from_be_bytes([e[14], e[15]]));
        let extra = u64::from(u32::from_be_bytes(e[36..40].try_into().ok()?));
        ok &= l1.is_multiple_of(refs.cs) && l1_tree(dev, refs, fmt, l1, l1_n)?;
        p = p.checked_add(40 + extra + names)?;
    }
    Some(ok && refs.add(start, p - start))
}

/// COPIED must be set exactly where the refcount is 1 (active L1 and L2 entries).
fn copied_flags(
    dev: &mut FuzzDev,
    rc: &mut RefcountReader,
    h: &Header,
    fmt: &EntryFormat,
) -> Option<bool> {
    let cs = h.cluster_size();
    let l1 = read(dev, h.l1_table_offset, u64::from(h.l1_size) * 8)?;
    let esize = if fmt.extended_l2 { 16 } else { 8 };
    for i in 0..h.l1_size as usize {
        let e = be64(&l1, i * 8);
        let l2 = e & L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if (rc.refcount(dev, l2 / cs).ok()? == 1) != (e & OFLAG_COPIED != 0) {
            return Some(false);
        }
        let t = read(dev, l2, cs)?;
        for j in 0..(cs / esize) as usize {
            let e = be64(&t, j * esize as usize);
            let host = e & L2E_OFFSET_MASK;
            if e & OFLAG_COMPRESSED != 0 || host == 0 {
                continue;
            }
            if (rc.refcount(dev, host / cs).ok()? == 1) != (e & OFLAG_COPIED != 0) {
                return Some(false);
            }
        }
    }
    Some(true)
}
