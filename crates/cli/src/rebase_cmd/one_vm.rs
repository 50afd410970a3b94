//! `-u` with a valid `-F` (or a detach) on what should be a qcow2 overlay: one VM that
//! validates the overlay as QEMU's read-write open does and rewrites its header, instead
//! of a probe VM and then a rebase VM.
//!
//! The request is the one the full path would send. A refusal (not qcow2, an external
//! data file to check, a bad header) returns `None` without a write, and the full path
//! then reports it with QEMU's words in QEMU's order. A sandbox that gives no answer
//! (watchdog, deadline, no KVM, an internal error) ends the command at once: the full
//! path would only start more VMs to meet the same stop.

use instar_abi::{Call, Format, RebaseRequest, Request, MAX_BACKING_NAME};

use super::cmd::Cmd;
use super::done::{Done, Mode};
use super::finish;
use super::options::{BackingFormat, Options};
use super::overlay::Overlay;
use super::rebase_vm::header_backing;
use crate::failure::Failure;
use crate::guest::{self, Answer, Device, Guest};

/// The rebase done in one VM, or `None` when the full path must run.
pub fn try_unsafe(
    cmd: &Cmd,
    options: &Options,
    guest: &mut dyn Guest,
    overlay: &Overlay,
) -> Result<Option<Done>, Failure> {
    let args = cmd.args;
    // backing. options are refused after the overlay's open: the full path says so.
    let backing_opts = args.image_opts.as_ref().is_some_and(|o| o.levels.len() > 1);
    if !args.unsafe_mode
        || backing_opts
        || !matches!(options.overlay_format, None | Some(Format::Qcow2))
        || args.backing.len() > MAX_BACKING_NAME
    {
        return Ok(None);
    }
    let format = match &options.backing_format {
        BackingFormat::Driver(f) => f.as_str(),
        BackingFormat::Invalid(_) => return Ok(None),
        BackingFormat::Absent if args.backing.is_empty() => "",
        // The new backing must be probed: the full path.
        BackingFormat::Absent => return Ok(None),
    };
    let record = (!args.backing.is_empty()).then(|| (args.backing.clone(), format.to_string()));
    let request = RebaseRequest {
        overlay_format: Format::Qcow2,
        unsafe_mode: true,
        new_backing: header_backing(record.as_ref()),
        old_chain: Vec::new(),
        new_chain: Vec::new(),
        in_chain: None,
        progress: false,
        compress: false,
        keys: cmd.key(0, 0).into_iter().collect(),
        zstd: Default::default(),
        data_file_checked: false,
    };
    let call = Call {
        device_sizes: vec![overlay.image.len],
        request: Request::Rebase(request),
    };
    let devices = [Device {
        file: &overlay.image.file,
        writable: true,
    }];
    let Answer::Ok(outcome) = guest::rebase(guest, &call, &devices, &mut |_| {})? else {
        return Ok(None);
    };
    super::repair_report::print(&outcome.repair_lines, overlay.image.len);
    finish::cut_overlay(cmd, &overlay.image, outcome.overlay_len)?;
    Ok(Some(Done {
        overlay_format: Format::Qcow2,
        mode: Mode::Unsafe,
        stats: outcome.stats,
        new_backing: record,
    }))
}
