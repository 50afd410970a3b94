//! The `qcow2_bitmaps` target: the persistent-bitmap directory and table parser
//! ([`instar_qcow2::bitmaps::BitmapSet::load`]), the overlap scan that adds the bitmap
//! structures, and the re-store planner (the writer's `bitmaps_open` and
//! `bitmaps_close`, with guest ranges drawn from the input as the rebase's writes).
//!
//! Invariants when the store goes through: the dry run's writes pass the overlap audit
//! (or the audit refuses them, as the rebase would), and the stored image reads back:
//! its header opens, its bitmaps load, the same names in the same order, every bitmap
//! consistent again (IN_USE ones kept as they were), each stored bitmap's bits the old
//! bits with the written ranges set in the enabled ones, and the guest content as before.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use instar_blockdev::BlockDev;
use instar_qcow2::bitmaps::{fill, source, BitmapSet, Dirt, Source, FLAG_AUTO, FLAG_IN_USE};
use instar_qcow2::overlap::Layout;
use instar_qcow2::writer::{ShadowDev, Writer};
use instar_qcow2::{Header, OpenMode};

use crate::dev::FuzzDev;
use crate::repair_target::content;
use crate::targets::signature;

pub fn qcow2_bitmaps(data: &[u8]) -> Result<u64, String> {
    let mut dev = FuzzDev::new(data.to_vec(), false);
    let header = match Header::read(&mut dev, OpenMode::ReadWrite) {
        Ok(h) => h,
        Err(e) => return Ok(signature(0, &e.to_string())),
    };
    let set = match BitmapSet::load(&mut dev, &header).and_then(|s| {
        s.as_ref().map_or(Ok(()), BitmapSet::check_in_place)?;
        Ok(s)
    }) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(signature(1, "no bitmaps")),
        Err(e) => return Ok(signature(2, &e.to_string())),
    };
    let layout = match Layout::scan_with_bitmaps(&mut dev, &header, Some(&set)) {
        Ok(l) => l,
        Err(e) => return Ok(signature(3, &e.to_string())),
    };
    if !set.needs_store() {
        return Ok(signature(4, "all in use"));
    }
    let dirt = dirt_from(data, header.virtual_size());
    // The dry run and its audit, as the rebase proves its writes.
    let record = {
        let mut run = || {
            let mut w = Writer::open(ShadowDev::new(&mut dev), &header, false)?.recording(true);
            w.bitmaps_open(&set, &header)?;
            w.bitmaps_close(&set, &dirt, &mut header.clone())?;
            w.finish_recorded().map(|(_, _, r)| r)
        };
        match run() {
            Ok(r) => r,
            Err(e) => return Ok(signature(5, &e.to_string())),
        }
    };
    if let Err(e) = layout.audit(&mut dev, &record) {
        return Ok(signature(6, &e.to_string()));
    }
    let before = content(data);
    let mut stored_header = header.clone();
    let mut w = Writer::open(&mut dev, &header, false).map_err(|e| e.to_string())?;
    w.bitmaps_open(&set, &header)
        .and_then(|()| w.bitmaps_close(&set, &dirt, &mut stored_header))
        .and_then(|()| w.finish().map(|_| ()))
        .map_err(|e| format!("the proved store failed: {e}"))?;
    if dev.capped {
        return Ok(signature(7, "capped"));
    }
    check_stored(data, &dev.data, &set, &dirt)?;
    if before.is_some() && content(&dev.data) != before {
        return Err(String::from(
            "storing the bitmaps changed the guest content",
        ));
    }
    Ok(signature(8, "stored"))
}

/// Up to eight guest ranges from the input's last bytes (what a rebase would write).
fn dirt_from(data: &[u8], size: u64) -> Dirt {
    if size == 0 {
        return Dirt::default();
    }
    let tail = &data[data.len().saturating_sub(64)..];
    Dirt::from_requests(tail.chunks_exact(8).map(|c| {
        let v = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        let offset = ((v >> 20) % size) & !511;
        let len = ((v & 0xfffff) + 1).min(size - offset);
        (offset, len)
    }))
}

/// The stored image against the set it was stored from.
fn check_stored(original: &[u8], image: &[u8], old: &BitmapSet, dirt: &Dirt) -> Result<(), String> {
    let mut before = FuzzDev::new(original.to_vec(), true);
    let mut dev = FuzzDev::new(image.to_vec(), true);
    let header = Header::read(&mut dev, OpenMode::ReadWrite)
        .map_err(|e| format!("the stored image's header does not read: {e}"))?;
    let new = BitmapSet::load(&mut dev, &header)
        .map_err(|e| format!("the stored bitmaps do not load: {e}"))?
        .ok_or("the stored image has no bitmaps")?;
    if new.entries.len() != old.entries.len() {
        return Err(String::from("the stored directory lost or gained bitmaps"));
    }
    for (i, (o, n)) in old.entries.iter().zip(&new.entries).enumerate() {
        if o.name != n.name || o.granularity_bits != n.granularity_bits {
            return Err(format!("bitmap {i} changed its name or granularity"));
        }
        if o.in_use() {
            if (o.table_offset, o.table_size, o.flags) != (n.table_offset, n.table_size, n.flags) {
                return Err(format!("the in-use bitmap {i} changed"));
            }
            continue;
        }
        if n.flags != o.flags & FLAG_AUTO || n.flags & FLAG_IN_USE != 0 {
            return Err(format!("bitmap {i} stored with flags {:#x}", n.flags));
        }
        let enabled = o.flags & FLAG_AUTO != 0;
        let ranges = if enabled { dirt.ranges() } else { &[] };
        same_bits((&mut before, &mut dev), old, &new, i, ranges)?;
    }
    Ok(())
}

/// Bitmap `i`'s stored bits (in `dev`) are its old bits (in `before`: the store
/// discards the old data clusters) with `ranges` set.
fn same_bits(
    (before, dev): (&mut FuzzDev, &mut FuzzDev),
    old: &BitmapSet,
    new: &BitmapSet,
    i: usize,
    ranges: &[(u64, u64)],
) -> Result<(), String> {
    let c = old.chunks(i);
    let (ot, nt) = (&old.tables[i], &new.tables[i]);
    let cs = old.cluster_size as usize;
    for k in 0..c.table_size() {
        let mut want = chunk(before, ot.get(k as usize).copied().unwrap_or(0), cs, &c, k);
        fill(&c, k, &mut want.0, want.1, ranges);
        let mut got = chunk(dev, nt.get(k as usize).copied().unwrap_or(0), cs, &c, k);
        fill(&c, k, &mut got.0, got.1, &[]);
        let bits = c.bits_in(k) as usize;
        let bit = |b: &[u8], i: usize| b.get(i / 8).is_some_and(|&x| x & (1 << (i % 8)) != 0);
        let differs = (0..bits).any(|i| bit(&want.0, i) != bit(&got.0, i));
        if differs {
            return Err(format!(
                "bitmap {i}, table entry {k}: the stored bits differ"
            ));
        }
    }
    Ok(())
}

/// The bytes a table entry stands for (read from the image when it names a cluster).
fn chunk(
    dev: &mut FuzzDev,
    entry: u64,
    cs: usize,
    c: &instar_qcow2::bitmaps::Chunks,
    k: u64,
) -> (Vec<u8>, Source) {
    let src = source(entry);
    let mut buf = alloc::vec![0u8; cs];
    if let Source::Cluster(off) = src {
        let _ = dev.read_zero_padded(off, &mut buf);
    }
    buf.truncate(c.write_size(k).max(1));
    (buf, src)
}
