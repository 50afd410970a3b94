//! Safe mode: QEMU reuses an image of the old chain when `-b` names it (by its own rule,
//! [`crate::chain::find_backing_image`]); the image keeps the format it was opened with,
//! and `-F` only goes into the header.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::cmd::Cmd;
use super::old_chain::OldChain;
use super::probe_rule;
use crate::chain;
use crate::failure::Failure;

/// An image of the old chain that `-b` names.
pub struct Reused {
    /// `old_chain[index]`.
    pub index: u8,
    /// The format to record.
    pub format: String,
}

/// The image of the old chain that `path` (`-b` resolved against FILE) names, if any.
pub fn find(
    cmd: &Cmd,
    old: &OldChain,
    path: &Path,
    backing_format: Option<&str>,
) -> Result<Option<Reused>, Failure> {
    // Options for a backing file (`--image-opts` `backing.…`) change which names match.
    let overridden = |k: usize| {
        cmd.args
            .image_opts
            .as_ref()
            .and_then(|o| o.backing_overridden(k))
    };
    let target = path.as_os_str().as_bytes();
    let Some(k) = chain::find_backing_image_with(&old.links, target, &overridden) else {
        return Ok(None);
    };
    let reused = old.images.get(k);
    if let (None, Some(o)) = (backing_format, reused) {
        if o.probed {
            probe_rule::check(cmd, &o.info)?;
        }
    }
    let format = backing_format
        .map(str::to_string)
        .or_else(|| reused.map(|o| o.format.name().to_string()))
        .unwrap_or_default();
    Ok(Some(Reused {
        index: u8::try_from(k).unwrap_or(u8::MAX),
        format,
    }))
}
