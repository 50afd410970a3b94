//! The text descriptor of a vmdk, read the way QEMU reads it (`vmdk_read_cid`,
//! `vmdk_parent_open`, `vmdk_parse_description`, `vmdk_parse_extents`): substring
//! searches and `sscanf` directives in a NUL-terminated buffer (one scanner, `scan`),
//! not a full parser. [`Descriptor`] is what a monolithicSparse image holds, and its
//! rewrite with a new parent; [`parent_hint`], [`first_extent_file`], [`extent_sectors`] and
//! [`line_number`] are what a probe reports of any descriptor.

use alloc::vec::Vec;
use instar_blockdev::bytes::c_str;

mod scan;

pub use scan::find;
use scan::{hex, quoted_after, Scanned};

/// Where QEMU reads the descriptor of a sparse file, and how much of it.
pub const DESC_OFFSET: u64 = 0x200;
pub const DESC_SIZE: usize = 20 * 512;
/// QEMU's limit on the parent name (`sizeof(bs->auto_backing_file) - 1`).
pub const MAX_PARENT_NAME: usize = 4095;
/// A text descriptor file is read up to 1 MiB - 1 bytes.
pub const MAX_DESC_FILE: u64 = (1 << 20) - 1;

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

/// `vmdk_read_cid`: first occurrence of `key`, skip `key.len() + 1` bytes, scan hex.
fn read_cid(text: &[u8], key: &[u8]) -> Option<u32> {
    let p = find(text, key)?;
    hex(text.get(p + key.len() + 1..).unwrap_or(&[])).0
}

/// `vmdk_parse_description`: `name`, skip `="`, up to the next `"`.
pub fn quoted_value(text: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    quoted_after(text, name)?.ok().map(<[u8]>::to_vec)
}

/// `parentFileNameHint="<name>"` (`vmdk_parent_open`): QEMU skips the key and two
/// bytes, then takes everything up to the next quote.
pub fn parent_hint(text: &[u8]) -> Result<Option<&[u8]>, DescriptorError> {
    match quoted_after(text, HINT_KEY) {
        None => Ok(None),
        Some(Err(())) => Err(DescriptorError::BadParentHint),
        Some(Ok(name)) if name.len() > MAX_PARENT_NAME => Err(DescriptorError::ParentHintTooLong),
        Some(Ok(name)) => Ok(Some(name)),
    }
}

/// The extent lines that name a file (QEMU's `sscanf` pattern in `vmdk_parse_extents`).
fn extent_lines(text: &[u8]) -> Vec<ExtentLine> {
    Scanned::each(text)
        .filter_map(|l| {
            Some(ExtentLine {
                access: l.access.to_vec(),
                sectors: l.sectors??,
                kind: l.kind?.to_vec(),
                file_name: l.file_name?.to_vec(),
                offset: l.offset,
            })
        })
        .collect()
}

/// The first extent file a descriptor names, read at every line start the way QEMU's
/// `vmdk_parse_extents` reads it. Every access mode counts, not only QEMU's `RW`, and
/// every extent type: the answer errs towards "names a file".
pub fn first_extent_file(text: &[u8]) -> Option<Vec<u8>> {
    Scanned::each(text)
        .find_map(|l| l.file_name)
        .map(<[u8]>::to_vec)
}

/// Total sectors of the extent lines (`RW 131072 SPARSE "x.vmdk"`): the virtual size
/// of a text descriptor, in sectors.
pub fn extent_sectors(text: &[u8]) -> u64 {
    Scanned::each(text)
        .filter_map(|l| l.sectors.flatten())
        .fold(0u64, u64::saturating_add)
}

/// The number after `key` at the start of a line (`version=1`).
pub fn line_number(text: &[u8], key: &[u8]) -> Option<u64> {
    text.split(|&c| c == b'\n').find_map(|line| {
        let v = line.strip_prefix(key)?;
        let digits: Vec<u8> = v.iter().copied().take_while(u8::is_ascii_digit).collect();
        core::str::from_utf8(&digits).ok()?.parse().ok()
    })
}

impl Descriptor {
    /// Parse the `DESC_SIZE` bytes read at [`DESC_OFFSET`].
    pub fn parse(raw: &[u8]) -> Result<Descriptor, DescriptorError> {
        // vmdk_read_cid terminates at DESC_SIZE - 1, vmdk_parent_open at DESC_SIZE.
        let cid_text = c_str(&raw[..raw.len().min(DESC_SIZE - 1)]);
        let hint_text = c_str(&raw[..raw.len().min(DESC_SIZE)]);
        let cid = read_cid(cid_text, b"CID").ok_or(DescriptorError::NoCid)?;
        let parent_cid = read_cid(cid_text, b"parentCID").ok_or(DescriptorError::NoParentCid)?;
        let parent_file_name_hint = parent_hint(hint_text)?.map(<[u8]>::to_vec);
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
        let end = at + hex(&text[at..]).1;
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

    /// `Scanned::each` as QEMU reads the lines: a full scan from every line start.
    fn each_unshared(text: &[u8]) -> Vec<scan::Scanned<'_>> {
        (0..text.len())
            .filter(|&i| i == 0 || text[i - 1] == b'\n')
            .filter_map(|at| scan::Scanned::at(text, at))
            .collect()
    }

    #[test]
    fn shared_scans_read_what_a_scan_from_every_line_start_reads() {
        let texts: [&[u8]; 9] = [
            b"",
            b"\n\n\n",
            b"\n\nRW 1 FLAT \"a\" 0\n\n \t\n\r\nRW 2 SPARSE \"b\"\n\n",
            b"RW\n\n\n5\n\nFLAT\n\n\"c\"\n\n7\n\nRW\n",
            b"\r\n\r\nRDONLY 3 ZERO\r\n\r\nNOACCESS 4 VMFS \"d\" 9\r\n",
            b"  \n  RW 1 FLAT \"e\"\n\n  \nRW -3 FLAT \"f\" 2\n \n",
            b"RW 1 RW 2 RW 3\n\nRW\nRW\n\n\n",
            b"x\n\n\nRW 9 FLAT \"g\r\" 1\n\n\n\n",
            b"\n \n\t\n\x0b\n\x0c\nRW 6 FLAT \"h\"",
        ];
        for t in texts {
            let shared: Vec<_> = scan::Scanned::each(t).collect();
            assert_eq!(shared, each_unshared(t), "{:?}", String::from_utf8_lossy(t));
        }
    }

    /// The fuzz finding `fuzz/regressions/open-probe-descriptor-blank-lines`: 40,000
    /// blank lines took quadratic time (every line start skipped all the blank lines
    /// after it). Now the white-space skips step over each byte a bounded number of
    /// times; the answers are the ones a scan from every line start gives.
    #[test]
    fn blank_lines_are_scanned_in_linear_steps() {
        let head = "# Disk DescriptorFile\nversion=1\nCID=fff1d9f9\nparentCID=ffffffff\n\
                    createType=\"monolithicFlat\"\n\n# Extent description\n\
                    RW 128 FLAT \"flat-flat.vmdk\" 0\n\n";
        let blanks = 40_000;
        let mut text = head.as_bytes().to_vec();
        text.extend(core::iter::repeat_n(b'\n', blanks));
        text.extend_from_slice(b"RW 5 FLAT \"g.vmdk\" 0\n");
        text.extend(core::iter::repeat_n(b'\n', blanks));
        let _ = scan::steps::take();
        assert_eq!(
            first(core::str::from_utf8(&text).unwrap()).as_deref(),
            Some("flat-flat.vmdk")
        );
        // The line after the extent line and each blank line before "RW 5" read it.
        let g_lines = blanks as u64 + 2;
        assert_eq!(extent_sectors(&text), 128 + 5 * g_lines);
        let d = Descriptor::parse(&text).unwrap();
        assert_eq!((d.cid, d.parent_cid), (0xfff1_d9f9, 0xffff_ffff));
        // An embedded descriptor is read up to DESC_SIZE - 1 bytes: blank lines only.
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].file_name, b"flat-flat.vmdk");
        let steps = scan::steps::take();
        // Two passes over the whole text (first_extent_file stops at the first
        // extent), each skip crossing a blank run at most twice.
        assert!(
            steps <= 6 * text.len(),
            "{steps} steps for {} bytes",
            text.len()
        );
    }

    /// What the shared scans replace: a scan from every line start of a run of blank
    /// lines steps over the rest of the run, quadratic in its length.
    #[test]
    fn a_scan_from_every_blank_line_start_is_quadratic() {
        let blanks = 2_000;
        let mut text = b"CID=1\nparentCID=ffffffff\n".to_vec();
        text.extend(core::iter::repeat_n(b'\n', blanks));
        text.extend_from_slice(b"RW 5 FLAT \"g.vmdk\" 0\n");
        let _ = scan::steps::take();
        let reference = each_unshared(&text);
        assert!(scan::steps::take() > blanks * blanks / 2);
        assert_eq!(scan::Scanned::each(&text).collect::<Vec<_>>(), reference);
        assert!(scan::steps::take() <= 2 * text.len());
    }

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
        c_str(block)
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
