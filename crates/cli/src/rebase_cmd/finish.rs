//! The overlay after the guest's writes: cut to the length the guest meant.

use super::cmd::Cmd;
use crate::failure::Failure;
use crate::files::ImageFile;

/// Cut the overlay to the length the guest meant (virtio-blk writes whole sectors), never
/// below its original length and never growing it, then flush the truncation (except with
/// `-t unsafe`).
pub fn cut_overlay(cmd: &Cmd, overlay: &ImageFile, wanted: Option<u64>) -> Result<(), Failure> {
    let io_failure = |what: &str, e: std::io::Error| Failure::io(what, &cmd.file, &e);
    let mut truncated = false;
    if let Some(len) = wanted {
        let current = overlay
            .file
            .metadata()
            .map_err(|e| io_failure("stat", e))?
            .len();
        let target = len.max(overlay.len);
        if target < current {
            overlay
                .file
                .set_len(target)
                .map_err(|e| io_failure("truncate", e))?;
            truncated = true;
        }
    }
    // The guest flushed its own writes (a virtio-blk flush is an fdatasync); only a
    // truncation here still needs one.
    if truncated && cmd.args.cache != "unsafe" {
        overlay
            .file
            .sync_data()
            .map_err(|e| io_failure("flush", e))?;
    }
    Ok(())
}
