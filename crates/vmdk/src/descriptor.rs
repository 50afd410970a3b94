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

/// Why the descriptor cannot take a new parent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    #[error("invalid VMDK descriptor: {0}")]
    Invalid(#[from] DescriptorError),
    /// QEMU takes the name up to the next `"` and the line up to a line break, and
    /// stops at NUL: such a name would read back as something else.
    #[error("the name contains a double quote, a line break or a NUL byte, which a vmdk descriptor cannot hold")]
    BadName,
    #[error("the name is longer than the {MAX_PARENT_NAME} bytes QEMU reads as a vmdk parent")]
    NameTooLong,
    #[error("No space left in the vmdk descriptor (at most {} bytes)", DESC_SIZE - 1)]
    NoSpace,
    #[error("the descriptor names more than one parentFileNameHint")]
    SeveralHints,
    /// The edited text would not read back (with QEMU's substring searches) as the
    /// same CID with the new parent, e.g. when `parentCID` comes before `CID`.
    #[error("the descriptor's layout does not allow changing its parent alone")]
    Inconsistent,
}

/// `parentCID` written by QEMU for an image without a parent.
pub const NO_PARENT_CID: u32 = 0xffff_ffff;
const HINT_KEY: &[u8] = b"parentFileNameHint";
const PARENT_CID_KEY: &[u8] = b"parentCID";

/// Where the value read by [`scan_hex`] from `s` ends (0 if there is none).
fn hex_token_end(s: &[u8]) -> usize {
    let mut i = 0;
    while i < s.len() && matches!(s[i], b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
        i += 1;
    }
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        i += 1;
    }
    let prefixed = s.get(i) == Some(&b'0') && matches!(s.get(i + 1), Some(b'x' | b'X'));
    if prefixed && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit) {
        i += 2;
    }
    while s.get(i).is_some_and(u8::is_ascii_hexdigit) {
        i += 1;
    }
    i
}

/// The end of the line starting at `start`, and the line break after it (`\n`,
/// `\r\n`, or nothing at the end of the text).
fn line_end(text: &[u8], start: usize) -> (usize, &'static [u8]) {
    match text[start..].iter().position(|&c| c == b'\n') {
        Some(n) if n > 0 && text[start + n - 1] == b'\r' => (start + n - 1, b"\r\n"),
        Some(n) => (start + n, b"\n"),
        None => (text.len(), b""),
    }
}

/// Start of the first line that begins with `key`.
fn line_starting_with(text: &[u8], key: &[u8]) -> Option<usize> {
    if text.starts_with(key) {
        return Some(0);
    }
    let mut nl = Vec::with_capacity(key.len() + 1);
    nl.push(b'\n');
    nl.extend_from_slice(key);
    find(text, &nl).map(|p| p + 1)
}

impl Descriptor {
    /// The descriptor block (`DESC_SIZE` bytes, NUL padded) with its parent changed:
    /// `Some((name, cid))` names `name` in `parentFileNameHint` and sets `parentCID`
    /// to `cid`; `None` removes the hint and sets `parentCID=ffffffff`. The rest of
    /// the text is kept byte for byte, `CID` included.
    ///
    /// Layout follows QEMU's template: an existing hint is replaced where it stands;
    /// a new one takes the empty line QEMU leaves after `createType` in a descriptor
    /// without a parent (or a new line there); removing a hint leaves that empty
    /// line. `parentCID` is written like QEMU writes it, `%x`.
    pub fn with_parent(&self, parent: Option<(&[u8], u32)>) -> Result<Vec<u8>, RewriteError> {
        if let Some((name, _)) = parent {
            if name.iter().any(|&c| matches!(c, b'"' | b'\n' | b'\r' | 0)) {
                return Err(RewriteError::BadName);
            }
            if name.len() > MAX_PARENT_NAME {
                return Err(RewriteError::NameTooLong);
            }
        }
        let mut text = self.text.clone();
        let hint_line = |name: &[u8]| {
            let mut l = Vec::with_capacity(HINT_KEY.len() + name.len() + 3);
            l.extend_from_slice(HINT_KEY);
            l.extend_from_slice(b"=\"");
            l.extend_from_slice(name);
            l.push(b'"');
            l
        };

        match find(&text, HINT_KEY) {
            Some(p) => {
                // `parse` found the closing quote; QEMU skips two bytes after the key.
                let value = p + HINT_KEY.len() + 2;
                let close = text
                    .get(value..)
                    .and_then(|r| r.iter().position(|&c| c == b'"'))
                    .map(|n| value + n)
                    .ok_or(DescriptorError::BadParentHint)?;
                let replacement = match parent {
                    Some((name, _)) => hint_line(name),
                    None => {
                        // A second hint would become the parent once the first is gone.
                        if find(&text[close + 1..], HINT_KEY).is_some() {
                            return Err(RewriteError::SeveralHints);
                        }
                        Vec::new()
                    }
                };
                text.splice(p..=close, replacement);
            }
            None => {
                if let Some((name, _)) = parent {
                    let anchor = line_starting_with(&text, b"createType=")
                        .or_else(|| line_starting_with(&text, PARENT_CID_KEY))
                        .ok_or(DescriptorError::NoParentCid)?;
                    let (end, brk) = line_end(&text, anchor);
                    let next = end + brk.len();
                    let mut ins = Vec::new();
                    if brk.is_empty() {
                        // The anchor line ends the text.
                        ins.push(b'\n');
                        ins.extend(hint_line(name));
                        ins.push(b'\n');
                    } else {
                        ins.extend(hint_line(name));
                        let (next_end, _) = line_end(&text, next);
                        if next_end != next || next == text.len() {
                            // No empty line to fill: the hint gets a line of its own.
                            ins.extend_from_slice(brk);
                        }
                    }
                    text.splice(next..next, ins);
                }
            }
        }

        let cid = parent.map_or(NO_PARENT_CID, |(_, c)| c);
        let at = find(&text, PARENT_CID_KEY).ok_or(DescriptorError::NoParentCid)?
            + PARENT_CID_KEY.len()
            + 1;
        if at > text.len() {
            return Err(DescriptorError::NoParentCid.into());
        }
        let end = at + hex_token_end(&text[at..]);
        text.splice(at..end, alloc::format!("{cid:x}").into_bytes());

        if text.len() > DESC_SIZE - 1 {
            return Err(RewriteError::NoSpace);
        }
        let mut block = alloc::vec![0u8; DESC_SIZE];
        block[..text.len()].copy_from_slice(&text);
        // QEMU must read back exactly what was meant.
        let back = Descriptor::parse(&block)?;
        if back.cid != self.cid
            || back.parent_cid != cid
            || back.parent_file_name_hint.as_deref() != parent.map(|(n, _)| n)
        {
            return Err(RewriteError::Inconsistent);
        }
        Ok(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec;

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

    const WITH: &[u8] = b"# Disk DescriptorFile\nversion=1\nCID=cbd0a871\nparentCID=e0acbb90\ncreateType=\"monolithicSparse\"\nparentFileNameHint=\"vb.vmdk\"\n# Extent description\nRW 2048 SPARSE \"vo.vmdk\"\n\n# The Disk Data Base\n#DDB\n";
    const WITHOUT: &[u8] = b"# Disk DescriptorFile\nversion=1\nCID=cbd0a871\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n\n# Extent description\nRW 2048 SPARSE \"vo.vmdk\"\n\n# The Disk Data Base\n#DDB\n";

    fn text(block: &[u8]) -> &[u8] {
        assert_eq!(block.len(), DESC_SIZE);
        until_nul(block)
    }

    #[test]
    fn parent_rewrites_follow_qemus_template() {
        let with = Descriptor::parse(WITH).unwrap();
        let without = Descriptor::parse(WITHOUT).unwrap();
        // Detach gives exactly the parentless template.
        assert_eq!(text(&with.with_parent(None).unwrap()), WITHOUT);
        // Attach fills the empty line; parentCID as %x.
        let b = without.with_parent(Some((b"vb.vmdk", 0xe0acbb90))).unwrap();
        assert_eq!(text(&b), WITH);
        let b = with.with_parent(Some((b"../x y.vmdk", 0xab))).unwrap();
        let want: &[u8] = b"# Disk DescriptorFile\nversion=1\nCID=cbd0a871\nparentCID=ab\ncreateType=\"monolithicSparse\"\nparentFileNameHint=\"../x y.vmdk\"\n# Extent description\nRW 2048 SPARSE \"vo.vmdk\"\n\n# The Disk Data Base\n#DDB\n";
        assert_eq!(text(&b), want, "{}", String::from_utf8_lossy(text(&b)));
        let d = Descriptor::parse(&b).unwrap();
        assert_eq!((d.cid, d.parent_cid), (0xcbd0a871, 0xab));
    }

    #[test]
    fn attach_without_an_empty_line_adds_one_and_keeps_crlf() {
        let t = b"CID=1\r\nparentCID=ffffffff\r\ncreateType=\"monolithicSparse\"\r\nRW 1 SPARSE \"a\"\r\n";
        let b = Descriptor::parse(t)
            .unwrap()
            .with_parent(Some((b"p", 2)))
            .unwrap();
        assert_eq!(
            text(&b),
            b"CID=1\r\nparentCID=2\r\ncreateType=\"monolithicSparse\"\r\nparentFileNameHint=\"p\"\r\nRW 1 SPARSE \"a\"\r\n"
        );
    }

    #[test]
    fn refusals() {
        let d = Descriptor::parse(WITHOUT).unwrap();
        for bad in [&b"a\"b"[..], b"a\nb", b"a\rb", b"a\0b"] {
            assert_eq!(d.with_parent(Some((bad, 1))), Err(RewriteError::BadName));
        }
        let long = vec![b'a'; MAX_PARENT_NAME + 1];
        assert_eq!(
            d.with_parent(Some((&long, 1))),
            Err(RewriteError::NameTooLong)
        );
        // Fits exactly: 10239 bytes of text.
        let room = DESC_SIZE - 1 - WITHOUT.len() - "parentFileNameHint=\"\"".len();
        let mut big = WITHOUT.to_vec();
        big.extend(core::iter::repeat_n(b'#', room - MAX_PARENT_NAME));
        let d = Descriptor::parse(&big).unwrap();
        let name = vec![b'n'; MAX_PARENT_NAME];
        let b = d.with_parent(Some((&name, 0xffffffff))).unwrap();
        assert_eq!(text(&b).len(), DESC_SIZE - 1);
        // parentCID grows from "ffffffff" to nothing shorter: one more byte is too many.
        let mut bigger = big.clone();
        bigger.push(b'#');
        let d = Descriptor::parse(&bigger).unwrap();
        assert_eq!(
            d.with_parent(Some((&name, 0xffffffff))),
            Err(RewriteError::NoSpace)
        );
        // parentCID before CID: QEMU's CID would change.
        let d = Descriptor::parse(b"parentCID=5\nCID=1\n").unwrap();
        assert_eq!(
            d.with_parent(Some((b"p", 7))),
            Err(RewriteError::Inconsistent)
        );
        // Two hints: removing the first would expose the second.
        let d = Descriptor::parse(
            b"CID=1\nparentCID=2\nparentFileNameHint=\"a\"\nparentFileNameHint=\"b\"\n",
        )
        .unwrap();
        assert_eq!(d.with_parent(None), Err(RewriteError::SeveralHints));
        assert!(d.with_parent(Some((b"c", 3))).is_ok());
    }
}
