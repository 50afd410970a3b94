//! The text descriptor of a monolithicSparse vmdk, read the way QEMU reads it
//! (`vmdk_read_cid`, `vmdk_parent_open`, `vmdk_parse_description`): substring
//! searches in a NUL-terminated buffer, not a full parser.

use alloc::vec::Vec;

/// Where QEMU reads the descriptor of a sparse file, and how much of it.
pub const DESC_OFFSET: u64 = 0x200;
pub const DESC_SIZE: usize = 20 * 512;
/// QEMU's limit on the parent name (`sizeof(bs->auto_backing_file) - 1`).
pub const MAX_PARENT_NAME: usize = 4095;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("descriptor has no CID")]
    NoCid,
    #[error("descriptor has no parentCID")]
    NoParentCid,
    #[error("parentFileNameHint is not terminated")]
    BadParentHint,
    #[error("parentFileNameHint is too long")]
    ParentHintTooLong,
}

/// One `RW <sectors> <TYPE> "<file>" [offset]` line (informational for sparse files:
/// QEMU does not use them when the descriptor is embedded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    pub access: Vec<u8>,
    pub sectors: u64,
    pub kind: Vec<u8>,
    pub file_name: Vec<u8>,
    pub offset: Option<u64>,
}

/// What QEMU takes from the descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// The text up to its first NUL (at most `DESC_SIZE - 1` bytes).
    pub text: Vec<u8>,
    pub cid: u32,
    pub parent_cid: u32,
    /// `parentFileNameHint="…"`: the backing file name, if any.
    pub parent_file_name_hint: Option<Vec<u8>>,
    /// `createType="…"` (QEMU ignores it for sparse files).
    pub create_type: Option<Vec<u8>>,
    pub extents: Vec<ExtentLine>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn until_nul(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]
}

/// `sscanf("%x")` after skipping `skip` bytes past the key: leading white space, an
/// optional 0x, then hex digits (saturating like glibc's strtoul, then truncated).
fn scan_hex(s: &[u8]) -> Option<u32> {
    let mut i = 0;
    while i < s.len() && matches!(s[i], b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
        i += 1;
    }
    let mut neg = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        neg = s[i] == b'-';
        i += 1;
    }
    let prefixed = s.get(i) == Some(&b'0') && matches!(s.get(i + 1), Some(b'x' | b'X'));
    if prefixed && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit) {
        i += 2;
    }
    let start = i;
    let mut v: u64 = 0;
    while let Some(d) = s.get(i).and_then(|&c| (c as char).to_digit(16)) {
        v = v.saturating_mul(16).saturating_add(u64::from(d));
        i += 1;
    }
    if i == start {
        return None;
    }
    let v = if neg { v.wrapping_neg() } else { v };
    Some(v as u32)
}

/// `vmdk_read_cid`: first occurrence of `key`, skip `key.len() + 1` bytes, scan hex.
fn read_cid(text: &[u8], key: &[u8]) -> Option<u32> {
    let p = find(text, key)?;
    scan_hex(text.get(p + key.len() + 1..).unwrap_or(&[]))
}

/// `vmdk_parse_description`: `name`, skip `="`, up to the next `"`.
fn quoted_value(text: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    let p = find(text, name)? + name.len() + 2;
    let rest = text.get(p..)?;
    let end = rest.iter().position(|&c| c == b'"')?;
    Some(rest[..end].to_vec())
}

/// Parse the extent lines (QEMU's `sscanf` pattern in `vmdk_parse_extents`).
fn extent_lines(text: &[u8]) -> Vec<ExtentLine> {
    let mut out = Vec::new();
    for line in text.split(|&c| c == b'\n' || c == b'\r') {
        let mut words = line
            .split(|c| c.is_ascii_whitespace())
            .filter(|w| !w.is_empty());
        let (Some(access), Some(sectors), Some(kind)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Some(sectors) = core::str::from_utf8(sectors)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let Some(q1) = line.iter().position(|&c| c == b'"') else {
            continue;
        };
        let Some(q2) = line[q1 + 1..].iter().position(|&c| c == b'"') else {
            continue;
        };
        let file_name = line[q1 + 1..q1 + 1 + q2].to_vec();
        let tail = &line[q1 + 2 + q2..];
        let offset = core::str::from_utf8(tail)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if access != b"RW" && access != b"RDONLY" && access != b"NOACCESS" {
            continue;
        }
        out.push(ExtentLine {
            access: access.to_vec(),
            sectors,
            kind: kind.to_vec(),
            file_name,
            offset,
        });
    }
    out
}

impl Descriptor {
    /// Parse the `DESC_SIZE` bytes read at [`DESC_OFFSET`].
    pub fn parse(raw: &[u8]) -> Result<Descriptor, DescriptorError> {
        // vmdk_read_cid terminates at DESC_SIZE - 1, vmdk_parent_open at DESC_SIZE.
        let cid_text = until_nul(&raw[..raw.len().min(DESC_SIZE - 1)]);
        let hint_text = until_nul(&raw[..raw.len().min(DESC_SIZE)]);
        let cid = read_cid(cid_text, b"CID").ok_or(DescriptorError::NoCid)?;
        let parent_cid = read_cid(cid_text, b"parentCID").ok_or(DescriptorError::NoParentCid)?;
        let parent_file_name_hint = match find(hint_text, b"parentFileNameHint") {
            None => None,
            Some(p) => {
                let start = p + b"parentFileNameHint".len() + 2;
                let rest = hint_text.get(start..).unwrap_or(&[]);
                let end = rest
                    .iter()
                    .position(|&c| c == b'"')
                    .ok_or(DescriptorError::BadParentHint)?;
                if end > MAX_PARENT_NAME {
                    return Err(DescriptorError::ParentHintTooLong);
                }
                Some(rest[..end].to_vec())
            }
        };
        Ok(Descriptor {
            text: cid_text.to_vec(),
            cid,
            parent_cid,
            parent_file_name_hint,
            create_type: quoted_value(cid_text, b"createType"),
            extents: extent_lines(cid_text),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_descriptor() {
        let t = b"# Disk DescriptorFile\nversion=1\nCID=cbd0a871\nparentCID=e0acbb90\ncreateType=\"monolithicSparse\"\nparentFileNameHint=\"vb.vmdk\"\n# Extent description\nRW 131072 SPARSE \"vo.vmdk\"\n\n# The Disk Data Base\n#DDB\n\0garbage CID=1";
        let d = Descriptor::parse(t).unwrap();
        assert_eq!(d.cid, 0xcbd0a871);
        assert_eq!(d.parent_cid, 0xe0acbb90);
        assert_eq!(d.parent_file_name_hint.as_deref(), Some(&b"vb.vmdk"[..]));
        assert_eq!(d.create_type.as_deref(), Some(&b"monolithicSparse"[..]));
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].sectors, 131072);
        assert_eq!(d.extents[0].file_name, b"vo.vmdk");
        let none = b"CID=1\nparentCID=ffffffff\n";
        let d = Descriptor::parse(none).unwrap();
        assert_eq!(
            (d.cid, d.parent_cid, d.parent_file_name_hint),
            (1, 0xffff_ffff, None)
        );
        // Like QEMU's strstr, "CID" also matches inside "parentCID".
        let d = Descriptor::parse(b"parentCID=1f").unwrap();
        assert_eq!((d.cid, d.parent_cid), (0x1f, 0x1f));
        assert_eq!(
            Descriptor::parse(b"CID=0x2A parentCID= 7").map(|d| (d.cid, d.parent_cid)),
            Ok((0x2a, 7))
        );
        assert_eq!(Descriptor::parse(b"nothing"), Err(DescriptorError::NoCid));
        assert_eq!(
            Descriptor::parse(b"CID=zz parentCID=1"),
            Err(DescriptorError::NoCid)
        );
        assert_eq!(
            Descriptor::parse(b"CID=1 parentCID=1 parentFileNameHint=\"x"),
            Err(DescriptorError::BadParentHint)
        );
    }
}
