//! What a probe reports about a vmdk image, read cheaply: version, capacity, grain
//! size, the parent named by `parentFileNameHint` (QEMU's `vmdk_parent_open`), and the
//! first extent file a descriptor names (QEMU's `vmdk_parse_extents` opens them all).

use alloc::vec;
use alloc::vec::Vec;
use instar_abi::{Format, ImageInfo};
use instar_blockdev::endian::Fixed;
use instar_blockdev::BlockDev;

/// QEMU reads the embedded descriptor of a sparse file at byte 512, 20 sectors long.
const SPARSE_DESC_OFFSET: u64 = 512;
const DESC_SIZE: usize = 20 * 512;
/// A text descriptor file is read up to 1 MiB - 1 bytes.
const MAX_DESC_FILE: u64 = (1 << 20) - 1;
/// `sizeof(bs->auto_backing_file)` - 1.
const MAX_PARENT_NAME: usize = 4095;

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

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Skip whitespace from `at` (scanf's ` ` directive, and what `%s` and `%d` skip).
fn skip_space(text: &[u8], mut at: usize) -> usize {
    while text.get(at).copied().is_some_and(is_space) {
        at += 1;
    }
    at
}

/// scanf's `%Ns`: up to `max` non-space bytes from `at` (after skipping whitespace).
fn word(text: &[u8], at: usize, max: usize) -> Option<(&[u8], usize)> {
    let start = skip_space(text, at);
    let len = text[start..]
        .iter()
        .take(max)
        .take_while(|&&c| !is_space(c))
        .count();
    (len > 0).then(|| (&text[start..start + len], start + len))
}

/// The file name of an extent line starting at `at`, read the way QEMU's
/// `sscanf(p, "%10s %" SCNd64 " %10s \"%511[^\n\r\"]\" ...")` reads it (which may run
/// over line ends). Every access mode counts, not only QEMU's `RW`, and every extent
/// type: the answer errs towards "names a file".
fn extent_name(text: &[u8], at: usize) -> Option<Vec<u8>> {
    let (access, at) = word(text, at, 10)?;
    if !matches!(access, b"RW" | b"RDONLY" | b"NOACCESS") {
        return None;
    }
    let mut at = skip_space(text, at);
    if matches!(text.get(at), Some(b'+' | b'-')) {
        at += 1;
    }
    let digits = text[at..].iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let (_type, at) = word(text, at + digits, 10)?;
    let at = skip_space(text, at);
    if text.get(at) != Some(&b'"') {
        return None;
    }
    let name: Vec<u8> = text[at + 1..]
        .iter()
        .take(511)
        .take_while(|&&c| !matches!(c, b'\n' | b'\r' | b'"'))
        .copied()
        .collect();
    (!name.is_empty()).then_some(name)
}

/// The first extent file a descriptor names (QEMU reads an extent line at the start of
/// every line).
fn first_extent_file(desc: &[u8]) -> Option<Vec<u8>> {
    let starts = core::iter::once(0).chain(
        desc.iter()
            .enumerate()
            .filter(|&(_, &c)| c == b'\n')
            .map(|(i, _)| i + 1),
    );
    starts
        .filter(|&at| at < desc.len())
        .find_map(|at| extent_name(desc, at))
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
        extent_file: None,
    };
    let fixed = Fixed(&head);
    let desc = if &head[..4] == b"KDMV" {
        report.version = fixed.le32::<4>();
        let capacity = fixed.le64::<12>();
        report.virtual_size = capacity.saturating_mul(512);
        report.cluster_size = u32::try_from(fixed.le64::<20>().saturating_mul(512)).unwrap_or(0);
        // vmdk_open_vmdk4: a sparse header with no capacity and a descriptor offset is
        // opened as that descriptor, extents and all.
        let desc_offset = fixed.le64::<28>();
        if capacity == 0 && desc_offset != 0 {
            let len = dev.size().min(MAX_DESC_FILE) as usize;
            let mut embedded = vec![0u8; len];
            dev.read_zero_padded(desc_offset.saturating_mul(512), &mut embedded)?;
            report.extent_file = first_extent_file(c_text(&embedded));
        }
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
        // A text descriptor's data lives in its extent files (a COWD sparse file is its
        // own only extent).
        if &head[..4] != b"COWD" {
            report.extent_file = first_extent_file(text);
        }
    }
    if let Some(parent) = parent_hint(text) {
        report.backing_file = Some(parent);
        // vmdk_parent_open forces the parent's format.
        report.backing_format = Some(b"vmdk".to_vec());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    fn first(desc: &str) -> Option<String> {
        first_extent_file(desc.as_bytes()).map(|n| String::from_utf8(n).unwrap())
    }

    #[test]
    fn extent_lines_are_read_as_qemu_scans_them() {
        let desc = "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n\n\
                    # Extent description\nRW 2048 FLAT \"/etc/shadow\" 0\n";
        assert_eq!(first(desc).as_deref(), Some("/etc/shadow"));
        assert_eq!(first("RW 1 SPARSE \"a.vmdk\"").as_deref(), Some("a.vmdk"));
        // scanf's whitespace directives run over line ends.
        assert_eq!(first("RW\n100\nVMFS\n\"b\"\n").as_deref(), Some("b"));
        assert_eq!(first("  RDONLY 5 FLAT \"c\r\" 0").as_deref(), Some("c"));
        assert_eq!(first("RW 2048 ZERO\nddb.x = \"y\"\n"), None);
        assert_eq!(first("RWX 1 FLAT \"d\" 0\nversion=1\n"), None);
        assert_eq!(first("RW many FLAT \"e\" 0\n"), None);
        assert_eq!(first("RW 1 FLAT \"\" 0\n"), None);
        assert_eq!(first("createType=\"x\"\n"), None);
    }
}
