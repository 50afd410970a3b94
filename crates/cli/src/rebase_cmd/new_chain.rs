//! Safe mode: the new backing file and its own chain, under the path policy.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use instar_abi::{Format, ImageInfo};

use super::cmd::{Cmd, Role};
use super::old_chain::OldChain;
use crate::chain::{self, Top, Walk};
use crate::failure::Failure;
use crate::files::ImageFile;
use crate::guest::Guest;
use crate::policy::{FileId, Refused};
use crate::sanitize;

/// The new backing file (open as `image`, probed as `info`) and every image below it:
/// the opened images and their formats, nearest first.
pub fn open(
    cmd: &Cmd,
    guest: &mut dyn Guest,
    old: &OldChain,
    path: &Path,
    image: ImageFile,
    info: &ImageInfo,
) -> Result<(Vec<ImageFile>, Vec<Format>), Failure> {
    let prefix = cmd.prefix(Role::NewBacking);
    if !info.format.readable() {
        return Err(chain::unreadable(&prefix, info.format));
    }
    // Without locks (-U) the overlay itself can be named here; it would become its own
    // backing file.
    let b_id = image
        .file
        .metadata()
        .map(|m| FileId::of(&m))
        .map_err(|e| Failure::stat(&prefix, &e))?;
    let mut seen = HashSet::from([old.overlay_id]);
    if !seen.insert(b_id) {
        let filename = sanitize::name(path.as_os_str().as_bytes());
        return Err(Failure::about(&prefix, Refused::Loop { filename }));
    }
    let mut walk = Walk {
        guest,
        allowed: &old.dirs.allowed,
        cwd: &old.dirs.cwd,
        lock: !cmd.args.force_share,
        prefix,
        already: 1,
        keys: Vec::new(),
    };
    let top = Top {
        filename: path.as_os_str().as_bytes(),
        info,
    };
    let below = chain::walk(&mut walk, top, &mut seen)?;
    let mut images = vec![image];
    let mut formats = vec![info.format];
    for o in below {
        formats.push(o.format);
        images.push(o.image);
    }
    Ok((images, formats))
}
