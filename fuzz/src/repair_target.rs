//! The `qcow2_repair` target: the dirty-image repair planner
//! ([`instar_qcow2::repair::plan`]) on a qcow2 image forced dirty with lazy refcounts.
//! Invariants of a plan: its writes do not overlap each other or its discards, only
//! the header write touches cluster 0, and the image with the plan applied (writes
//! made, discards zeroed) opens clean and reads exactly as before.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use instar_qcow2::image::Qcow2Image;
use instar_qcow2::repair::{plan, Line, RepairPlan, RepairWriteKind};
use instar_qcow2::{Header, OpenMode};

use crate::dev::FuzzDev;
use crate::targets::{signature, MAX_READ};

/// Byte of the incompatible features holding DIRTY, and of the compatible features
/// holding lazy refcounts (both bit 0, big-endian fields at 72 and 80).
const DIRTY_BYTE: usize = 79;
const LAZY_BYTE: usize = 87;
/// Host offset bits of a refcount table entry.
const OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

pub fn qcow2_repair(data: &[u8]) -> Result<u64, String> {
    let mut image = data.to_vec();
    if image.len() >= 104 && image.starts_with(b"QFI\xfb") && image[7] >= 3 {
        image[DIRTY_BYTE] |= 1;
        image[LAZY_BYTE] |= 1;
    }
    let mut dev = FuzzDev::new(image.clone(), true);
    let header = match Header::read(&mut dev, OpenMode::ReadWrite) {
        Ok(h) => h,
        Err(e) => return Ok(signature(0, &e.to_string())),
    };
    let p = match plan(&mut dev, &header) {
        Ok(p) => p,
        Err(e) => return Ok(signature(1, &e.to_string())),
    };
    let cs = header.cluster_size();
    disjoint(&p, cs)?;
    within(&p, image.len() as u64, cs)?;
    // Rewrites of existing structures may land on data when the metadata lies (a
    // table shared with a data cluster): QEMU writes the same bytes, and the content
    // changes. New structures never may, nor may discards.
    let data = data_ranges(&image);
    let touches_data = match &data {
        Some(data) => over_data(&p, &image, &header, data)?,
        None => true,
    };
    let before = if touches_data { None } else { content(&image) };
    let mut after = image.clone();
    apply(&p, &mut after);
    let mut dev = FuzzDev::new(after.clone(), true);
    let repaired = Header::read(&mut dev, OpenMode::ReadWrite)
        .map_err(|e| format!("the repaired image's header does not read: {e}"))?;
    if repaired.dirty() {
        return Err(String::from("the repaired image is still dirty"));
    }
    if let Some(before) = before {
        match content(&after) {
            Some(a) if a == before => {}
            Some(_) => return Err(String::from("the repair changed the image's content")),
            None => return Err(String::from("the repaired image cannot be read")),
        }
    }
    Ok(outcome(&p))
}

/// Which kinds of lines and writes the plan has (signatures ignore digits).
fn outcome(p: &RepairPlan) -> u64 {
    let mut kinds = BTreeSet::new();
    kinds.insert(String::from(if p.discards.is_empty() {
        "kept"
    } else {
        "discards"
    }));
    for l in &p.lines {
        kinds.insert(String::from(match l {
            Line::Cluster { verdict, .. } => verdict.word(),
            Line::BlockRefcount { .. } => "block",
            Line::Rebuilding => "rebuild",
            Line::CopiedL2 { .. } => "copied l2",
            Line::CopiedData { .. } => "copied data",
        }));
    }
    for w in &p.writes {
        kinds.insert(format!("{:?}", w.kind));
    }
    kinds.iter().fold(2, |s, k| s ^ signature(3, k))
}

/// Whether a write of the plan overlaps guest data; an error when a new structure or a
/// discard does.
fn over_data(
    p: &RepairPlan,
    image: &[u8],
    h: &Header,
    data: &[(u64, u64)],
) -> Result<bool, String> {
    let hits = |o: u64, n: u64| {
        data.iter()
            .any(|&(d, m)| o < d + m && d < o.saturating_add(n))
    };
    let rt = h.refcount_table_offset;
    let rt_len = u64::from(h.refcount_table_clusters) << h.cluster_bits();
    let old_block = |o: u64| {
        (0..rt_len / 8).any(|i| {
            let at = (rt + 8 * i) as usize;
            image
                .get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .is_some_and(|b| u64::from_be_bytes(b) & OFFSET_MASK == o)
        })
    };
    let mut any = false;
    for w in &p.writes {
        let n = w.data.len() as u64;
        if !hits(w.offset, n) {
            continue;
        }
        let in_place = match w.kind {
            RepairWriteKind::RefcountBlock => old_block(w.offset),
            RepairWriteKind::RefcountTable => w.offset >= rt && w.offset + n <= rt + rt_len,
            _ => true,
        };
        if !in_place {
            return Err(format!(
                "a new {:?} at {} over guest data",
                w.kind, w.offset
            ));
        }
        any = true;
    }
    match p.discards.iter().find(|&&(o, n)| hits(o, n)) {
        Some(&(o, _)) => Err(format!("a repair discard at {o} over guest data")),
        None => Ok(any),
    }
}

/// Host ranges holding guest data (standard and compressed clusters), if the image
/// opens and maps.
fn data_ranges(image: &[u8]) -> Option<Vec<(u64, u64)>> {
    let mut dev = FuzzDev::new(image.to_vec(), true);
    let header = Header::read(&mut dev, OpenMode::ReadOnly).ok()?;
    let mut img = Qcow2Image::open(&mut dev, &header).ok()?;
    let size = img.virtual_size();
    if size > MAX_READ {
        return None;
    }
    let (mut off, mut out) = (0, Vec::new());
    while off < size {
        let m = img.block_status(off, size - off).ok()?;
        if m.bytes == 0 {
            return None;
        }
        if let Some(c) = m.compressed {
            out.push((c.offset, c.len));
        } else if let Some(h) = m.host_offset {
            out.push((h, m.bytes));
        }
        off += m.bytes;
    }
    Some(out)
}

/// Writes pairwise disjoint, disjoint from the discards, and off cluster 0 except the
/// header's.
fn disjoint(p: &RepairPlan, cs: u64) -> Result<(), String> {
    let mut ranges: Vec<(u64, u64, &str)> = Vec::new();
    for w in &p.writes {
        let end = w.offset.saturating_add(w.data.len() as u64);
        if w.kind != RepairWriteKind::Header && w.offset < cs {
            return Err(format!(
                "a {:?} write at {} in the header cluster",
                w.kind, w.offset
            ));
        }
        ranges.push((w.offset, end, "write"));
    }
    ranges.extend(
        p.discards
            .iter()
            .map(|&(o, n)| (o, o.saturating_add(n), "discard")),
    );
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(format!(
                "a repair {} at {} overlaps a {} at {}",
                pair[1].2, pair[1].0, pair[0].2, pair[0].0
            ));
        }
    }
    Ok(())
}

/// New structures go first fit: the file grows by at most what the plan writes (in
/// whole clusters) past its last cluster.
fn within(p: &RepairPlan, len: u64, cs: u64) -> Result<(), String> {
    let written: u64 = p
        .writes
        .iter()
        .map(|w| (w.data.len() as u64).div_ceil(cs) * cs)
        .sum();
    let limit = len.div_ceil(cs) * cs + written + cs;
    let end = p.end(len);
    if end > limit {
        return Err(format!("the repair plan ends at {end}, past {limit}"));
    }
    Ok(())
}

fn apply(p: &RepairPlan, image: &mut Vec<u8>) {
    for w in &p.writes {
        let (start, end) = (w.offset as usize, w.offset as usize + w.data.len());
        if end > image.len() {
            image.resize(end, 0);
        }
        image[start..end].copy_from_slice(&w.data);
    }
    for &(o, n) in &p.discards {
        let end = (o.saturating_add(n) as usize).min(image.len());
        if let Some(run) = image.get_mut(o as usize..end) {
            run.fill(0);
        }
    }
}

/// The guest-visible content of a small qcow2 image, if it opens and reads.
pub(crate) fn content(image: &[u8]) -> Option<Vec<u8>> {
    let mut dev = FuzzDev::new(image.to_vec(), true);
    let header = Header::read(&mut dev, OpenMode::ReadOnly).ok()?;
    let mut img = Qcow2Image::open(&mut dev, &header).ok()?;
    let size = img.virtual_size();
    if size > MAX_READ {
        return None;
    }
    let mut buf = vec![0u8; size as usize];
    img.read(0, &mut buf).ok()?;
    Some(buf)
}
