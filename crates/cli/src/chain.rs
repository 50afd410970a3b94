//! Safe mode's backing chains: finding every image below the overlay (the old chain) and
//! below the new backing file (the new chain) the way QEMU opens them, under the path
//! policy ([`crate::policy`]), and QEMU's decision whether the new backing file is an
//! image of the old chain (`bdrv_find_backing_image`).
//!
//! Each image is found from the backing name recorded in the image above it, resolved
//! against that image's directory as QEMU holds it (`path_combine`, no normalisation),
//! opened read-only, locked for shared reading like QEMU's read-only opens, and probed
//! in its own sandbox with the recorded backing format (probed when none is recorded;
//! `vmdk` for the parent of a vmdk image, as QEMU forces it).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use instar_abi::{Format, ImageInfo};

use crate::drivers;
use crate::failure::Failure;
use crate::files::ImageFile;
use crate::guest::{self, Answer, Guest};
use crate::locks;
use crate::paths;
use crate::policy::{self, Allowed, FileId, Refused, MAX_CHAIN};
use crate::sanitize;

/// QEMU's prefix for an error while opening a backing file, once per level.
pub const BACKING_PREFIX: &str = "Could not open backing file: ";

/// One image of a chain, open and probed.
#[derive(Debug)]
pub struct Opened {
    /// Its filename as QEMU holds it (the combined name).
    pub filename: Vec<u8>,
    pub image: ImageFile,
    pub id: FileId,
    /// The format it is read as.
    pub format: Format,
    /// The format came from a probe (none was recorded, and none is forced).
    pub probed: bool,
    pub info: ImageInfo,
}

/// The top of a chain walk: an image already open (the overlay, or the new backing).
#[derive(Debug, Clone, Copy)]
pub struct Top<'a> {
    /// Its filename as QEMU holds it.
    pub filename: &'a [u8],
    pub info: &'a ImageInfo,
}

/// What a walk needs besides the images.
pub struct Walk<'a> {
    pub guest: &'a mut dyn Guest,
    pub allowed: &'a Allowed,
    /// The current directory, absolute.
    pub cwd: &'a [u8],
    /// Take QEMU's shared read locks (not with `-U` for the new chain).
    pub lock: bool,
    /// Text before the first [`BACKING_PREFIX`]: `Could not open 'FILE': ` or
    /// `Could not open new backing file 'B': `.
    pub prefix: String,
    /// Images already counted against [`MAX_CHAIN`] (1 for the new chain: `-b` itself).
    pub already: usize,
    /// The `encrypt.` options of the image at each level below the top (`keys[0]`:
    /// level 1), for device 0 of its probe; none for the new chain (qemu-img opens the
    /// new backing without options).
    pub keys: Vec<Option<instar_abi::ImageKey>>,
}

/// How QEMU's messages about an image `level` levels below a top begin, when the top's
/// begin with `top` (`Could not open 'FILE': `).
pub fn level_prefix(top: &str, level: usize) -> String {
    format!("{top}{}", BACKING_PREFIX.repeat(level))
}

/// The format a backing file is opened with: forced `vmdk` below a vmdk image, else the
/// recorded one (`None`: probe). Errors are QEMU's for an unknown driver, and instar's
/// for a QEMU driver it cannot read.
fn backing_format(parent: &ImageInfo) -> Result<Option<Format>, drivers::NotOpenable> {
    if parent.format == Format::Vmdk {
        return Ok(Some(Format::Vmdk));
    }
    let Some(recorded) = parent.backing_format.as_deref() else {
        return Ok(None);
    };
    drivers::format_to_open(recorded, sanitize::name(recorded)).map(Some)
}

/// instar's refusal of an image it found but does not read (a format the sandbox only
/// recognises).
pub fn unreadable(prefix: &str, format: Format) -> Failure {
    Failure::about(
        prefix,
        format!("instar does not read {} images", format.name()),
    )
}

/// Follow the backing names from `top` to the end of its chain. `seen` holds the files
/// already in this chain (the overlay at least); an image met twice is a loop. Returns
/// the images nearest first.
pub fn walk(w: &mut Walk, top: Top, seen: &mut HashSet<FileId>) -> Result<Vec<Opened>, Failure> {
    let mut images: Vec<Opened> = Vec::new();
    let mut parent_filename = top.filename.to_vec();
    let mut parent_info = top.info.clone();
    // QEMU keeps names as C strings: a NUL ends the name, and an empty one is none.
    let name_of = |info: &ImageInfo| -> Option<Vec<u8>> {
        let name = paths::c_string(info.backing_file.as_deref()?);
        (!name.is_empty()).then(|| name.to_vec())
    };
    while let Some(name) = name_of(&parent_info) {
        let level = images.len() + 1;
        let prefix = level_prefix(&w.prefix, level);
        let refused = |r: Refused| Failure::about(&prefix, r);
        if w.already + images.len() >= MAX_CHAIN {
            return Err(refused(Refused::TooDeep {
                name: sanitize::name(&name),
            }));
        }
        let format = backing_format(&parent_info).map_err(|t| Failure::about(&prefix, t))?;
        let loc = policy::locate(&name, &parent_filename, w.cwd, w.allowed).map_err(refused)?;
        let shown_path = sanitize::name(&loc.filename);
        if !seen.insert(loc.id) {
            return Err(refused(Refused::Loop {
                filename: shown_path,
            }));
        }
        let image = policy::open_located(&loc, w.allowed).map_err(refused)?;
        if w.lock {
            locks::lock_image(&image.file, locks::READER)
                .map_err(|e| Failure::lock(&prefix, &shown_path, &e))?;
        }
        let key = w.keys.get(level - 1).cloned().flatten();
        let info = match guest::probe_keyed(w.guest, &image, format, false, key, true)? {
            Answer::Ok(info) => info,
            Answer::Refused(r) => return Err(Failure::refused(&prefix, &r)),
        };
        if !info.format.readable() {
            return Err(unreadable(&prefix, info.format));
        }
        parent_filename = loc.filename.clone();
        parent_info = info.clone();
        images.push(Opened {
            filename: loc.filename,
            image,
            id: loc.id,
            format: info.format,
            probed: format.is_none(),
            info,
        });
    }
    Ok(images)
}

/// One image of the overlay's chain for [`find_backing_image`]: its filename as QEMU
/// holds it and the backing name it records.
#[derive(Debug, Clone)]
pub struct Link {
    pub filename: Vec<u8>,
    pub backing: Option<Vec<u8>>,
}

fn realpath(path: &[u8]) -> Option<std::path::PathBuf> {
    std::fs::canonicalize(OsStr::from_bytes(path)).ok()
}

/// QEMU's `bdrv_find_backing_image(overlay, target)` over `links` (the overlay, then the
/// old chain nearest first), where `target` is the `-b` name already combined with the
/// overlay's directory. Returns `k` when the backing file of `links[k]` (which is
/// `old_chain[k]`) is the target.
///
/// Like QEMU, the already-combined target is made relative to each image's directory
/// *again* before both sides go through `realpath`, so an overlay named `sub/top.qcow2`
/// with `-b base.qcow2` looks for `sub/sub/base.qcow2` and does not match.
pub fn find_backing_image(links: &[Link], target: &[u8]) -> Option<usize> {
    find_backing_image_with(links, target, &|_| None)
}

/// [`find_backing_image`] where `overridden(k)` says whether the backing file of
/// `links[k]` was opened with options of its own (`backing.…` keys), QEMU's
/// `bdrv_backing_overridden`: `Some(true)` when those options make that image's name a
/// `json:{…}` one, which no path matches, `Some(false)` when its name stays its full
/// backing filename. QEMU then compares `-b` with that name only, as a string.
pub fn find_backing_image_with(
    links: &[Link],
    target: &[u8],
    overridden: &dyn Fn(usize) -> Option<bool>,
) -> Option<usize> {
    let target_protocol = paths::has_protocol(target);
    for (k, link) in links.iter().enumerate() {
        let Some(backing) = link.backing.as_deref() else {
            break;
        };
        let full_backing = paths::make_absolute(&link.filename, backing);
        match overridden(k) {
            Some(true) => continue,
            // The node's name is its full backing filename; overridden only when that
            // differs from the header's name.
            Some(false) if full_backing.as_deref() != Some(backing) => {
                if full_backing.as_deref() == Some(target) {
                    return Some(k);
                }
                continue;
            }
            _ => {}
        }
        if target_protocol || paths::has_protocol(backing) {
            // Protocol names are compared as strings.
            if target == backing || full_backing.as_deref() == Some(target) {
                return Some(k);
            }
            continue;
        }
        let Some(candidate) =
            paths::make_absolute(&link.filename, target).and_then(|p| realpath(&p))
        else {
            continue;
        };
        let Some(actual) = full_backing.and_then(|p| realpath(&p)) else {
            continue;
        };
        if candidate == actual {
            return Some(k);
        }
    }
    None
}
