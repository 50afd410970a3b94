//! Safe mode's old chain: QEMU opens the overlay with its whole backing chain, so every
//! image below it is found, opened, locked and probed ([`crate::chain`], under the path
//! policy).

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;

use instar_abi::ImageInfo;

use super::cmd::{Cmd, Role};
use super::dirs::Dirs;
use super::overlay::Overlay;
use crate::chain::{self, Link, Opened, Top, Walk};
use crate::failure::Failure;
use crate::guest::Guest;
use crate::policy::FileId;

/// What safe mode knows about the overlay's side when it turns to the new backing.
pub struct OldChain {
    /// The directories the policy allows (with the defaults added).
    pub dirs: Dirs,
    /// The overlay's identity: met again below `-b`, it is a loop.
    pub overlay_id: FileId,
    /// The overlay, then the old chain, for QEMU's in-chain decision.
    pub links: Vec<Link>,
    /// The old chain, nearest first.
    pub images: Vec<Opened>,
}

/// Open the old chain below the overlay (probed as `info`).
pub fn discover(
    cmd: &Cmd,
    guest: &mut dyn Guest,
    mut dirs: Dirs,
    overlay: &Overlay,
    info: &ImageInfo,
) -> Result<OldChain, Failure> {
    let args = cmd.args;
    dirs.add_defaults(args);
    let mut seen = HashSet::from([overlay.id]);
    let mut walk = Walk {
        guest,
        allowed: &dirs.allowed,
        cwd: &dirs.cwd,
        lock: true,
        prefix: cmd.prefix(Role::Overlay),
        already: 0,
        keys: (1..=crate::policy::MAX_CHAIN)
            .map(|l| cmd.key(l, 0))
            .collect(),
    };
    let top = Top {
        filename: args.file.as_bytes(),
        info,
    };
    let images = chain::walk(&mut walk, top, &mut seen)?;
    let links = std::iter::once(Link {
        filename: args.file.as_bytes().to_vec(),
        backing: info.backing_file.clone(),
    })
    .chain(images.iter().map(|o| Link {
        filename: o.filename.clone(),
        backing: o.info.backing_file.clone(),
    }))
    .collect();
    Ok(OldChain {
        dirs,
        overlay_id: overlay.id,
        links,
        images,
    })
}
