//! The probe rule: a format found by probing the new backing (no `-F`) is recorded only
//! when that image names no other file.
//!
//! A raw disk's guest can write any header into its disk; recording the format such a
//! header claims would let the next QEMU that opens the overlay open whatever file the
//! header names. qemu-img refuses every missing `-F` with the first line of the error;
//! the second says what was found.

use instar_abi::ImageInfo;

use super::cmd::Cmd;
use crate::failure::Failure;
use crate::sanitize;

/// The first other file a probed image names: what QEMU would open with it when the
/// probed format is recorded (its backing file, its external data file, a vmdk
/// descriptor's extent file).
fn other_file(info: &ImageInfo) -> Option<(&'static str, &[u8])> {
    fn named(n: &Option<Vec<u8>>) -> Option<&[u8]> {
        n.as_deref().filter(|n| !n.is_empty())
    }
    named(&info.backing_file)
        .map(|n| ("backing file", n))
        .or_else(|| named(&info.data_file).map(|n| ("external data file", n)))
        .or_else(|| named(&info.extent_file).map(|n| ("extent file", n)))
}

/// Apply the rule to a new backing probed as `info`.
pub fn check(cmd: &Cmd, info: &ImageInfo) -> Result<(), Failure> {
    let Some((what, name)) = other_file(info) else {
        return Ok(());
    };
    Err(cmd.change(&format!(
        "backing format must be specified\n\
         The new backing file probes as {} and names the {what} '{}'; a probed format is \
         recorded only for an image that names no other file: give -F to trust it",
        info.format.name(),
        sanitize::name(name)
    )))
}
