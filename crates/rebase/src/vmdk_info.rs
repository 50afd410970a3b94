//! What a probe reports about a vmdk image, read cheaply: version, capacity, grain
//! size and the parent named by `parentFileNameHint` (QEMU's `vmdk_parent_open`).

use alloc::vec;
use alloc::vec::Vec;
use instar_abi::{Format, ImageInfo};
use instar_blockdev::BlockDev;

/// QEMU reads the embedded descriptor of a sparse file at byte 512, 20 sectors long.
const SPARSE_DESC_OFFSET: u64 = 512;
const DESC_SIZE: usize = 20 * 512;
/// A text descriptor file is read up to 1 MiB - 1 bytes.
const MAX_DESC_FILE: u64 = (1 << 20) - 1;
/// `sizeof(bs->auto_backing_file)` - 1.
const MAX_PARENT_NAME: usize = 4095;

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The descriptor as a C string.
fn c_text(buf: &[u8]) -> &[u8] {
    match buf.iter().position(|&c| c == 0) {
        Some(n) => &buf[..n],
        None => buf,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `parentFileNameHint="<name>"`: QEMU skips the key and two bytes, then takes
/// everything up to the next quote.
fn parent_hint(desc: &[u8]) -> Option<Vec<u8>> {
    let key = b"parentFileNameHint";
    let start = find(desc, key)? + key.len() + 2;
    let rest = desc.get(start..)?;
    let end = rest.iter().position(|&c| c == b'"')?;
    (end <= MAX_PARENT_NAME).then(|| rest[..end].to_vec())
}

/// The number after `key` at the start of a line (`version=1`).
fn line_value(desc: &[u8], key: &[u8]) -> Option<u64> {
    desc.split(|&c| c == b'\n').find_map(|line| {
        let v = line.strip_prefix(key)?;
        let digits: Vec<u8> = v.iter().copied().take_while(u8::is_ascii_digit).collect();
        core::str::from_utf8(&digits).ok()?.parse().ok()
    })
}

/// Total sectors of the extent lines (`RW 131072 SPARSE "x.vmdk"`).
fn extent_sectors(desc: &[u8]) -> u64 {
    desc.split(|&c| c == b'\n')
        .filter_map(|line| {
            let mut words = line.split(|&c| c == b' ').filter(|w| !w.is_empty());
            let access = words.next()?;
            if !matches!(access, b"RW" | b"RDONLY" | b"NOACCESS") {
                return None;
            }
            core::str::from_utf8(words.next()?)
                .ok()?
                .parse::<u64>()
                .ok()
        })
        .fold(0u64, u64::saturating_add)
}

/// Report a vmdk image. Nothing here is validated beyond what the report needs.
pub fn info(dev: &mut dyn BlockDev) -> Result<ImageInfo, instar_blockdev::IoError> {
    let mut head = [0u8; 512];
    dev.read_zero_padded(0, &mut head)?;
    let mut report = ImageInfo {
        format: Format::Vmdk,
        virtual_size: 0,
        cluster_size: 0,
        version: 0,
        backing_file: None,
        backing_format: None,
        data_file: None,
    };
    let desc = if &head[..4] == b"KDMV" {
        report.version = le32(&head, 4);
        report.virtual_size = le64(&head, 12).saturating_mul(512);
        report.cluster_size = u32::try_from(le64(&head, 20).saturating_mul(512)).unwrap_or(0);
        let mut desc = vec![0u8; DESC_SIZE];
        dev.read_zero_padded(SPARSE_DESC_OFFSET, &mut desc)?;
        desc
    } else {
        let len = dev.size().next_multiple_of(512).min(MAX_DESC_FILE) as usize;
        let mut desc = vec![0u8; len];
        dev.read_zero_padded(0, &mut desc)?;
        desc
    };
    let text = c_text(&desc);
    if &head[..4] != b"KDMV" {
        report.version = line_value(text, b"version=")
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0);
        report.virtual_size = extent_sectors(text).saturating_mul(512);
    }
    if let Some(parent) = parent_hint(text) {
        report.backing_file = Some(parent);
        // vmdk_parent_open forces the parent's format.
        report.backing_format = Some(b"vmdk".to_vec());
    }
    Ok(report)
}
