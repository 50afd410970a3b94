//! File-name rules shared by every place that turns a name into an open file: QEMU's
//! protocol detection and its resolution of relative backing names.
//!
//! Names are bytes (`OsStr`), never assumed to be UTF-8, and are never normalised: QEMU
//! combines strings, it does not canonicalise them.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

/// A name read from an image as QEMU holds it, a C string: cut at the first NUL.
pub fn c_string(raw: &[u8]) -> &[u8] {
    match raw.iter().position(|&c| c == 0) {
        Some(end) => &raw[..end],
        None => raw,
    }
}

/// QEMU's `path_has_protocol`: a `:` before any `/` (so `json:{…}`, `nbd:host:port`,
/// `file:x`, even `:x`). instar opens only plain local files, so such names are refused
/// where they would be opened; `./nbd:x` names a local file.
pub fn has_protocol(name: &[u8]) -> bool {
    name.iter().find(|&&c| c == b':' || c == b'/') == Some(&b':')
}

/// The protocol part of a name that [`has_protocol`], without the colon.
pub fn protocol_of(name: &[u8]) -> &[u8] {
    match name.iter().position(|&c| c == b':') {
        Some(p) => &name[..p],
        None => name,
    }
}

/// QEMU's `path_combine` for plain paths: an absolute `name` is kept; a relative one is
/// appended to everything up to and including the last `/` of `base` (nothing if `base`
/// has no `/`). No `..` or symlink processing.
pub fn combine(base: &[u8], name: &[u8]) -> Vec<u8> {
    if name.first() == Some(&b'/') {
        return name.to_vec();
    }
    let dir_len = base
        .iter()
        .rposition(|&c| c == b'/')
        .map_or(0, |slash| slash + 1);
    let mut out = Vec::with_capacity(dir_len + name.len());
    out.extend_from_slice(&base[..dir_len]);
    out.extend_from_slice(name);
    out
}

/// QEMU's directory part of an image's filename (`bdrv_dirname` for a plain file):
/// everything up to and including the last `/`, or nothing.
pub fn dirname(filename: &[u8]) -> &[u8] {
    let len = filename
        .iter()
        .rposition(|&c| c == b'/')
        .map_or(0, |slash| slash + 1);
    &filename[..len]
}

/// QEMU's `bdrv_make_absolute_filename`: `None` for an empty name; protocol and absolute
/// names as they are; anything else appended to the directory of `relative_to`.
pub fn make_absolute(relative_to: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    if name.is_empty() {
        return None;
    }
    if has_protocol(name) || name.first() == Some(&b'/') {
        return Some(name.to_vec());
    }
    let mut out = dirname(relative_to).to_vec();
    out.extend_from_slice(name);
    Some(out)
}

/// `path` made absolute against `cwd` (when relative) and normalised textually: empty
/// and `.` components dropped, `..` removing the component before it (never going above
/// `/`). No symlink is looked at; this is the "lexical" view of a name.
pub fn normalise(cwd: &[u8], path: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    let joined: Vec<&[u8]> = if path.first() == Some(&b'/') {
        path.split(|&c| c == b'/').collect()
    } else {
        cwd.split(|&c| c == b'/')
            .chain(path.split(|&c| c == b'/'))
            .collect()
    };
    for part in joined {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let mut out = Vec::with_capacity(path.len() + cwd.len() + 1);
    for p in &parts {
        out.push(b'/');
        out.extend_from_slice(p);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

/// Why a backing name cannot be turned into a local path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The name has a protocol prefix.
    #[error(
        "Protocol '{protocol}' is not supported: instar opens local files only \
         (write './{name}' for a local file of that name)"
    )]
    Protocol { protocol: String, name: String },
}

/// Refuse a name the user typed (FILE or `-b`) that has a protocol prefix: instar opens
/// local files only.
pub fn local(name: &OsStr) -> Result<(), PathError> {
    let b = name.as_bytes();
    if has_protocol(b) {
        return Err(PathError::Protocol {
            protocol: String::from_utf8_lossy(protocol_of(b)).into_owned(),
            name: name.to_string_lossy().into_owned(),
        });
    }
    Ok(())
}

/// Where a backing file named `backing` by the image opened as `image` lives, by QEMU's
/// rule (`bdrv_get_full_backing_filename_from_filename`): absolute names as they are,
/// relative ones against the image's directory as the image's name was given.
///
/// Used for `-b` (relative to the overlay) and, in safe mode, for every backing name an
/// image records (relative to that image). `image` must itself be a plain name.
pub fn resolve_backing(image: &OsStr, backing: &OsStr) -> Result<PathBuf, PathError> {
    local(backing)?;
    Ok(PathBuf::from(OsString::from_vec(combine(
        image.as_bytes(),
        backing.as_bytes(),
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_detection_matches_qemu() {
        assert!(has_protocol(b"json:{}"));
        assert!(has_protocol(b"nbd:localhost:10809"));
        assert!(has_protocol(b"file:x.qcow2"));
        assert!(has_protocol(b":x"));
        assert!(!has_protocol(b"./nbd:x"));
        assert!(!has_protocol(b"dir/a:b"));
        assert!(!has_protocol(b"plain.qcow2"));
        assert!(!has_protocol(b""));
        assert_eq!(protocol_of(b"nbd:host:1"), b"nbd");
    }

    #[test]
    fn combine_is_textual() {
        assert_eq!(combine(b"ovl.qcow2", b"base.qcow2"), b"base.qcow2");
        assert_eq!(
            combine(b"sub/ovl.qcow2", b"sub/x.qcow2"),
            b"sub/sub/x.qcow2"
        );
        assert_eq!(combine(b"sub/ovl.qcow2", b"../b.qcow2"), b"sub/../b.qcow2");
        assert_eq!(combine(b"/a/b/ovl", b"/abs/b"), b"/abs/b");
        assert_eq!(combine(b"/ovl", b"b"), b"/b");
    }

    #[test]
    fn dirname_and_make_absolute() {
        assert_eq!(dirname(b"top.qcow2"), b"");
        assert_eq!(dirname(b"sub/top.qcow2"), b"sub/");
        assert_eq!(dirname(b"/a//b"), b"/a//");
        assert_eq!(make_absolute(b"sub/top", b""), None);
        assert_eq!(make_absolute(b"sub/top", b"b").unwrap(), b"sub/b");
        assert_eq!(make_absolute(b"sub/top", b"/b").unwrap(), b"/b");
        assert_eq!(make_absolute(b"sub/top", b"nbd:x").unwrap(), b"nbd:x");
    }

    #[test]
    fn normalise_is_lexical() {
        assert_eq!(normalise(b"/w", b"a/./b//c"), b"/w/a/b/c");
        assert_eq!(normalise(b"/w/d", b"../../../x"), b"/x");
        assert_eq!(normalise(b"/w", b"/etc/../etc/passwd"), b"/etc/passwd");
        assert_eq!(normalise(b"/", b".."), b"/");
        assert_eq!(normalise(b"/w", b""), b"/w");
    }

    #[test]
    fn resolve_refuses_protocols() {
        let e = resolve_backing(OsStr::new("o.qcow2"), OsStr::new("nbd:h:1")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Protocol 'nbd' is not supported: instar opens local files only \
             (write './nbd:h:1' for a local file of that name)"
        );
        assert_eq!(
            resolve_backing(OsStr::new("d/o.qcow2"), OsStr::new("b")).unwrap(),
            PathBuf::from("d/b")
        );
    }
}
