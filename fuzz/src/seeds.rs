//! Seed inputs for each target, built from the seed images (`fuzz/seeds/`, made by
//! `scripts/fuzz-corpus.sh` with qemu-img).

use std::path::Path;

use instar_blockdev::BlockDev;
use instar_qcow2::image::Qcow2Image;
use instar_qcow2::{Header, OpenMode};

use crate::case::Case;
use crate::dev::FuzzDev;
use crate::targets::Target;

/// The seed images committed with the crate.
pub fn committed() -> Vec<(String, Vec<u8>)> {
    load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds"))
}

/// Every regular file of `dir`, sorted by name (a missing directory gives none).
pub fn load_dir(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| {
            Some((
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).ok()?,
            ))
        })
        .collect();
    out.sort();
    out
}

fn is_qcow2(d: &[u8]) -> bool {
    d.starts_with(b"QFI\xfb")
}

fn is_qed(d: &[u8]) -> bool {
    d.starts_with(b"QED\0")
}

fn is_vmdk(d: &[u8]) -> bool {
    d.starts_with(b"KDMV")
}

/// The seed inputs of `target` from the images `files`.
pub fn for_target(target: Target, files: &[(String, Vec<u8>)]) -> Vec<Vec<u8>> {
    let images = files.iter().map(|(_, d)| d);
    match target {
        Target::Qcow2Header | Target::Qcow2Read | Target::Refcount => {
            images.filter(|d| is_qcow2(d)).cloned().collect()
        }
        Target::Qcow2Repair | Target::Qcow2Bitmaps => {
            images.filter(|d| is_qcow2(d)).cloned().collect()
        }
        Target::QedRead => images.filter(|d| is_qed(d)).cloned().collect(),
        Target::VmdkRead => images.filter(|d| is_vmdk(d)).cloned().collect(),
        Target::VmdkDescriptor => images.filter_map(|d| descriptor_text(d)).collect(),
        Target::Probe => images.cloned().collect(),
        Target::Compressed => images.flat_map(|d| compressed_streams(d)).collect(),
        Target::Chain | Target::RebaseUnsafe | Target::RebaseSafe => cases(files),
        Target::LuksUnlock => images
            .filter(|d| d.starts_with(b"LUKS\xba\xbe"))
            .cloned()
            .collect(),
    }
}

/// A descriptor file as it is, or the descriptor embedded in a sparse vmdk.
fn descriptor_text(d: &[u8]) -> Option<Vec<u8>> {
    if d.starts_with(b"# Disk DescriptorFile") {
        return Some(d.to_vec());
    }
    if !is_vmdk(d) {
        return None;
    }
    let le64 = |o: usize| u64::from_le_bytes(d[o..o + 8].try_into().unwrap_or([0; 8]));
    let (start, len) = (le64(28).checked_mul(512)?, le64(36).checked_mul(512)?);
    let region = d.get(usize::try_from(start).ok()?..usize::try_from(start + len).ok()?)?;
    let end = region.iter().position(|&c| c == 0).unwrap_or(region.len());
    Some(region[..end].to_vec())
}

/// Every compressed cluster's stream in a qcow2 image, framed for the compressed
/// target: type, cluster bits - 9, bytes.
fn compressed_streams(d: &[u8]) -> Vec<Vec<u8>> {
    let mut dev = FuzzDev::new(d.to_vec(), true);
    let Ok(header) = Header::read(&mut dev, OpenMode::ReadOnly) else {
        return Vec::new();
    };
    let kind = header.compression_type;
    let bits = header.cluster_bits();
    let Ok(mut img) = Qcow2Image::open(&mut dev, &header) else {
        return Vec::new();
    };
    let (size, cs) = (img.virtual_size(), img.cluster_size());
    let mut out = Vec::new();
    for off in (0..size).step_by(cs as usize) {
        let Ok(m) = img.block_status(off, cs) else {
            continue;
        };
        let Some(c) = m.compressed else { continue };
        let mut buf = vec![0u8; c.len as usize];
        if img.dev_mut().read_zero_padded(c.offset, &mut buf).is_ok() {
            let mut input = vec![kind, (bits - 9) as u8];
            input.extend_from_slice(&buf);
            out.push(input);
        }
    }
    out
}

/// Rebase and chain cases: every qcow2, qed and sparse vmdk image as the overlay, over the
/// backings in turn, with each flag once.
fn cases(files: &[(String, Vec<u8>)]) -> Vec<Vec<u8>> {
    let get = |name: &str| {
        files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
    };
    let backings: Vec<Vec<u8>> = [
        "raw-16k",
        "chain-base.qcow2",
        "qcow2-zstd",
        "vmdk-sparse",
        "qcow2-zlib",
        "qed-c4k",
    ]
    .iter()
    .filter_map(|n| get(n))
    .chain([Vec::new()])
    .collect();
    let mut out = Vec::new();
    if let (Some(ov), Some(base)) = (get("chain-overlay.qcow2"), get("chain-base.qcow2")) {
        // 0x20: -c (compressed copies), also detaching (0x22).
        for flags in [0u8, 2, 4, 0x10, 0x20, 0x22] {
            out.push(case(
                flags,
                [ov.clone(), base.clone(), get("raw-16k").unwrap_or_default()],
            ));
        }
    }
    if let (Some(ov), Some(base)) = (get("qed-overlay"), get("chain-base.qcow2")) {
        for flags in [0u8, 2, 4] {
            out.push(case(
                flags,
                [ov.clone(), base.clone(), get("raw-16k").unwrap_or_default()],
            ));
        }
    }
    if let (Some(child), Some(parent)) = (get("vmdk-child"), get("vmdk-sparse")) {
        out.push(case(0, [child, parent, get("raw-16k").unwrap_or_default()]));
    }
    let overlays = files
        .iter()
        .filter(|(_, d)| is_qcow2(d) || is_qed(d) || is_vmdk(d));
    for (i, (_, ov)) in overlays.enumerate() {
        let old = backings[i % backings.len()].clone();
        let new = backings[(i + 1) % backings.len()].clone();
        out.push(case(
            [0u8, 2, 4, 8][i % 4],
            [ov.clone(), old.clone(), new.clone()],
        ));
        // Every qcow2 overlay also with -c: compressed writes into its layout.
        if is_qcow2(ov) {
            out.push(case(0x20, [ov.clone(), old, new]));
        }
    }
    out
}

fn case(flags: u8, images: [Vec<u8>; 3]) -> Vec<u8> {
    Case {
        flags,
        images: images.to_vec(),
    }
    .encode()
}
