//! FILE: opened read-write and locked for writing as QEMU opens it, probed in the sandbox
//! as a read-write open validates it, its external data file checked, its format judged.

use std::path::Path;

use instar_abi::{Format, ImageInfo};

use super::cmd::{Cmd, Role};
use super::dirs::Dirs;
use crate::failure::Failure;
use crate::files::{self, ImageFile};
use crate::guest::{self, Answer, Guest};
use crate::locks;
use crate::paths;
use crate::policy::{self, FileId, Refused};

/// The overlay, open and locked.
pub struct Overlay {
    pub image: ImageFile,
    pub id: FileId,
}

/// Open and lock FILE (a protocol name is refused: instar opens local files only).
pub fn open(cmd: &Cmd) -> Result<Overlay, Failure> {
    let prefix = cmd.prefix(Role::Overlay);
    paths::local(&cmd.args.file).map_err(|e| Failure::about(&prefix, e))?;
    let image = files::open_image(Path::new(&cmd.args.file), true)
        .map_err(|e| Failure::about(&prefix, e))?;
    locks::lock_image(&image.file, locks::OVERLAY)
        .map_err(|e| Failure::lock(&prefix, &cmd.file, &e))?;
    let id = image
        .file
        .metadata()
        .map(|m| FileId::of(&m))
        .map_err(|e| Failure::stat(&prefix, &e))?;
    Ok(Overlay { image, id })
}

/// Probe the overlay in its own VM (as `-f` says, else by probing) and check its
/// external data file. An encrypted overlay's key is not derived here (the rebase VM
/// derives it); [`first_failure`] does when a step before that VM fails.
pub fn probe(
    cmd: &Cmd,
    guest: &mut dyn Guest,
    overlay: &Overlay,
    wanted: Option<Format>,
) -> Result<ImageInfo, Failure> {
    let key = cmd.key(0, 0);
    let derive = key.is_none();
    let info = match guest::probe_keyed(guest, &overlay.image, wanted, true, key, derive)? {
        Answer::Ok(info) => info,
        Answer::Refused(r) => {
            let failure = cmd.refusal(Role::Overlay, &r);
            return Err(first_failure(cmd, guest, overlay, wanted, failure));
        }
    };
    if wanted.is_none() && info.format == Format::Raw {
        // qemu-img's warning for a probed raw image opened read-write (raw-format.c).
        eprintln!(
            "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
             Automatically detecting the format is dangerous for raw images, write operations \
             on block 0 will be restricted.\n         \
             Specify the 'raw' format explicitly to remove the restrictions.",
            cmd.file
        );
    }
    // QEMU opens an external data file together with the overlay; a missing one fails
    // the rebase there, so it must here too.
    if let Some(name) = info.data_file.as_deref() {
        check_data_file(cmd, name)?;
    }
    Ok(info)
}

/// `failure` ended a rebase of an overlay probed without deriving its key: QEMU opens
/// the overlay, key and all, before anything else, so a key that does not unlock (a
/// wrong passphrase) is its first error. The overlay is probed again with the key
/// derived; its refusal, if any, replaces `failure`. A sandbox that gave no answer
/// ends the command at once, and an overlay without `encrypt.` options has nothing
/// to derive.
pub fn first_failure(
    cmd: &Cmd,
    guest: &mut dyn Guest,
    overlay: &Overlay,
    wanted: Option<Format>,
    failure: Failure,
) -> Failure {
    let Some(key) = cmd.key(0, 0).filter(|_| !failure.sandbox) else {
        return failure;
    };
    match guest::probe_keyed(guest, &overlay.image, wanted, true, Some(key), true) {
        Ok(Answer::Refused(r)) => cmd.refusal(Role::Overlay, &r),
        Ok(Answer::Ok(_)) => failure,
        Err(e) => Failure::sandbox(&e),
    }
}

/// Check that the overlay's external data file can be opened, as QEMU's open of the
/// overlay requires. Its name is resolved against the current directory (QEMU's rule for
/// `data-file`) and goes through the path policy exactly like a backing file name
/// (protocol, lexical and canonical containment, regular file, `O_NOFOLLOW` open of the
/// checked file); instar never reads it.
fn check_data_file(cmd: &Cmd, name: &[u8]) -> Result<(), Failure> {
    let prefix = cmd.prefix(Role::Overlay);
    let dirs = Dirs::for_data_file(cmd.args)?;
    let refused = |r: Refused| Failure::about(&prefix, r);
    let loc = policy::locate_data_file(paths::c_string(name), &dirs.cwd, &dirs.allowed)
        .map_err(refused)?;
    policy::open_located(&loc, &dirs.allowed)
        .map(drop)
        .map_err(refused)
}

/// The overlay formats instar hands to the guest for a rebase; every other one is
/// refused as QEMU refuses formats without a backing-file change (`ENOTSUP`).
/// `-c` needs a driver that writes compressed clusters (qemu-img's
/// `block_driver_can_compress`, checked right after the overlay is open).
pub fn check_compress(compress: bool, format: Format) -> Result<(), Failure> {
    match format {
        _ if !compress => Ok(()),
        Format::Qcow2 | Format::Qcow | Format::Vmdk => Ok(()),
        _ => Err(Failure::plain(
            "Compression not supported for this file format",
        )),
    }
}

pub fn check_format(cmd: &Cmd, format: Format) -> Result<(), Failure> {
    match format {
        // qemu-img 10.x's bdrv_get_info() fails for parallels before anything else.
        Format::Parallels => Err(Failure::plain("could not get block driver info")),
        Format::Qcow2 | Format::Vmdk | Format::Qed => Ok(()),
        _ => Err(cmd.change("Operation not supported")),
    }
}
