//! What the header will name, decided as one [`NewBacking`]: the new backing file is
//! opened only when it must be (safe mode, a missing `-F`, a vmdk overlay's parent).

use std::path::Path;

use instar_abi::{Format, ImageInfo, MAX_BACKING_NAME};

use super::cmd::{Cmd, Role};
use super::done::Record;
use super::in_chain;
use super::new_chain;
use super::old_chain::OldChain;
use super::probe_rule;
use crate::drivers;
use crate::failure::Failure;
use crate::files::{self, ImageFile};
use crate::guest::{self, Answer, Guest};
use crate::locks;
use crate::paths;

/// The new backing as the guest will get it.
pub enum NewBacking {
    /// `-b ""`: the overlay is detached.
    Detach,
    /// Named in the header; no image of it goes to the guest.
    Named(Record),
    /// `old_chain[index]` (QEMU's in-chain optimisation).
    InChain { record: Record, index: u8 },
    /// Opened: the `-b` image, then (safe mode) its own chain, with their formats.
    Opened {
        record: Record,
        images: Vec<ImageFile>,
        formats: Vec<Format>,
    },
}

impl NewBacking {
    /// What the header will name; `None` detached.
    pub fn record(&self) -> Option<&Record> {
        match self {
            NewBacking::Detach => None,
            NewBacking::Named(record)
            | NewBacking::InChain { record, .. }
            | NewBacking::Opened { record, .. } => Some(record),
        }
    }

    pub fn in_chain(&self) -> Option<u8> {
        match self {
            NewBacking::InChain { index, .. } => Some(*index),
            _ => None,
        }
    }

    /// The images attached for the guest, `-b` first, and their formats.
    pub fn images(&self) -> (&[ImageFile], &[Format]) {
        match self {
            NewBacking::Opened {
                images, formats, ..
            } => (images, formats),
            _ => (&[], &[]),
        }
    }
}

/// Decide the new backing; `old` is `Some` in safe mode. `backing_format` is `-F`,
/// already checked.
pub fn decide(
    cmd: &Cmd,
    guest: &mut dyn Guest,
    backing_format: Option<&str>,
    old: Option<&OldChain>,
    overlay_format: Format,
) -> Result<NewBacking, Failure> {
    let args = cmd.args;
    if args.backing.is_empty() {
        // Detach: -F was validated and is ignored, as in qemu-img.
        return Ok(NewBacking::Detach);
    }
    // qcow2's limit, checked where QEMU checks it; without -F QEMU's EINVAL reads as a
    // missing format, and that text is kept. (qed's limit is its header's free space,
    // checked in the guest.)
    if overlay_format != Format::Qed && args.backing.len() > MAX_BACKING_NAME {
        return Err(cmd.change(if backing_format.is_some() {
            "Invalid argument"
        } else {
            "backing format must be specified"
        }));
    }
    // A vmdk overlay records its parent's CID, so the guest reads it from the new
    // backing even in unsafe mode.
    let attach_unsafe = old.is_none() && overlay_format == Format::Vmdk;
    let record = |format: &str| (args.backing.clone(), format.to_string());
    if let (None, Some(f), false) = (old, backing_format, attach_unsafe) {
        // Unsafe mode with -F: the new backing is never opened.
        return Ok(NewBacking::Named(record(f)));
    }
    if let Some(old) = old {
        json_name_check(cmd, old, overlay_format)?;
    }
    let path = paths::resolve_backing(&args.file, &args.backing)
        .map_err(|e| Failure::about(&cmd.prefix(Role::NewBacking), e))?;
    if let Some(old) = old {
        if let Some(reused) = in_chain::find(cmd, old, &path, backing_format)? {
            return Ok(NewBacking::InChain {
                record: record(&reused.format),
                index: reused.index,
            });
        }
    }
    // Unsafe mode opens the file only to learn its format.
    let only_format = old.is_none() && !attach_unsafe;
    let (image, info) = open_probed(cmd, guest, &path, backing_format, only_format)?;
    if backing_format.is_none() {
        probe_rule::check(cmd, &info)?;
    }
    let record = record(backing_format.unwrap_or(info.format.name()));
    let (images, formats) = match old {
        Some(old) => new_chain::open(cmd, guest, old, &path, image, &info)?,
        None if attach_unsafe => (vec![image], vec![info.format]),
        // Unsafe mode only needed the format: the file (and its lock) is let go here.
        None => return Ok(NewBacking::Named(record)),
    };
    Ok(NewBacking::Opened {
        record,
        images,
        formats,
    })
}

/// Open the `-b` file at `path` read-only, lock it for shared reading (unless `-U`) and
/// probe it (as `-F` says, when instar reads that format). With `only_format`, a file
/// that cannot be opened gets qemu-img's error for a missing `-F`.
fn open_probed(
    cmd: &Cmd,
    guest: &mut dyn Guest,
    path: &Path,
    backing_format: Option<&str>,
    only_format: bool,
) -> Result<(ImageFile, ImageInfo), Failure> {
    let prefix = cmd.prefix(Role::NewBacking);
    let open_as = backing_format
        .map(|f| drivers::format_to_open(f.as_bytes(), f))
        .transpose()
        .map_err(|e| Failure::about(&prefix, e))?;
    let image = match files::open_image(path, false) {
        Ok(image) => image,
        Err(_) if only_format => return Err(cmd.change("backing format must be specified")),
        Err(e) => return Err(Failure::about(&prefix, e)),
    };
    if !cmd.args.force_share {
        let shown = path.to_string_lossy();
        locks::lock_image(&image.file, locks::READER)
            .map_err(|e| Failure::lock(&prefix, &shown, &e))?;
    }
    match guest::probe(guest, &image, open_as, false)? {
        Answer::Ok(info) => Ok((image, info)),
        Answer::Refused(r) => Err(cmd.refusal(Role::NewBacking, &r)),
    }
}

/// `bdrv_get_full_backing_filename_from_filename` in safe mode: with `--image-opts`
/// runtime options QEMU names the overlay `json:{…}`, against which a relative `-b`
/// cannot be resolved.
fn json_name_check(cmd: &Cmd, old: &OldChain, overlay_format: Format) -> Result<(), Failure> {
    let Some(o) = cmd.args.image_opts.as_ref().filter(|o| o.has_json_name()) else {
        return Ok(());
    };
    let b = std::os::unix::ffi::OsStrExt::as_bytes(cmd.args.backing.as_os_str());
    if b.is_empty() || b.starts_with(b"/") || paths::has_protocol(b) {
        return Ok(());
    }
    let overlay_driver = o
        .driver
        .clone()
        .unwrap_or_else(|| overlay_format.name().into());
    let chain: Vec<(String, String)> = std::iter::once((overlay_driver, o.filename.clone()))
        .chain(old.images.iter().map(|i| {
            (
                i.format.name().to_string(),
                String::from_utf8_lossy(&i.filename).into_owned(),
            )
        }))
        .collect();
    Err(Failure::plain(format!(
        "Could not resolve backing filename: Cannot use relative backing file names for '{}'",
        o.json_name(&chain)
    )))
}
