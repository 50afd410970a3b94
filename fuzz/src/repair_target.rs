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
    let before = content(&image);
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
fn content(image: &[u8]) -> Option<Vec<u8>> {
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
