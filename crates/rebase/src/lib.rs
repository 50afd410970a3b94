//! Guest-side handling of one [`Call`]: probe an image, or rebase the overlay.
//!
//! The guest's `main` builds one [`BlockDev`] per device and calls [`handle`].

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

mod bitmap_rebase;
mod chains;
mod compress_cache;
pub mod copy;
mod dirty;
mod keyed_open;
mod other_formats;
mod probe;
mod qed_rebase;
mod safe;
mod unsafe_rebase;
mod vmdk_info;
mod vmdk_rebase;
mod write_end;

use alloc::format;
use alloc::string::String;
use instar_abi::{
    Call, ErrorKind, Format, GuestError, RebaseOutcome, RebaseRequest, Request, Response,
};
use instar_blockdev::BlockDev;

/// `strerror(EIO)`, QEMU's text for a failed read or write.
pub(crate) const IO_ERROR: &str = "Input/output error";
/// The overlay is always device 0.
pub(crate) const OVERLAY: u8 = 0;

/// Callbacks into the guest runtime (doorbells).
pub trait Hooks {
    /// Safe mode: `steps` copy-loop steps so far were not skipped (see
    /// `instar_abi::layout::DOORBELL_PROGRESS`).
    fn progress(&mut self, steps: u32);
    /// Every check has passed; the first write to the overlay follows. No write goes
    /// past `end` (see `instar_abi::layout::DOORBELL_WRITE_PHASE`).
    fn write_phase(&mut self, end: u64);
    /// The cluster compressor for `-c` (zlib and zstd built into the guest). `None`:
    /// this runtime cannot compress, and a compressed rebase is refused before any write.
    fn compressor(&mut self) -> Option<&mut dyn instar_qcow2::compressor::Compressor> {
        None
    }
}

/// Handle `call` over `devs` (index = device index). `SelfTest` requests are the guest
/// runtime's own business and never reach here.
pub fn handle(call: &Call, devs: &mut [&mut dyn BlockDev], hooks: &mut dyn Hooks) -> Response {
    let result = match &call.request {
        Request::Probe(req) => probe::probe(req, devs).map(Response::Probe),
        Request::Rebase(req) if req.overlay_format == Format::Vmdk => {
            vmdk_rebase::rebase(req, devs, hooks).map(Response::Rebase)
        }
        Request::Rebase(req) if req.overlay_format == Format::Qed => {
            qed_rebase::rebase(req, devs, hooks).map(Response::Rebase)
        }
        Request::Rebase(req) if req.overlay_format == Format::Qcow2 => {
            qcow2_rebase(req, devs, hooks).map(Response::Rebase)
        }
        Request::Rebase(req) if req.unsafe_mode => {
            unsafe_rebase::rebase(req, devs, hooks).map(Response::Rebase)
        }
        Request::Rebase(req) => safe::rebase(req, devs, hooks).map(Response::Rebase),
        Request::SelfTest(_) => Err(plain("self-test requests are handled by the guest runtime")),
    };
    result.unwrap_or_else(Response::Error)
}

/// A qcow2 overlay: repaired first when it is dirty, as QEMU's read-write open does.
fn qcow2_rebase(
    req: &RebaseRequest,
    devs: &mut [&mut dyn BlockDev],
    hooks: &mut dyn Hooks,
) -> Result<RebaseOutcome, GuestError> {
    let rebase = |req: &RebaseRequest, devs: &mut [&mut dyn BlockDev], hooks: &mut dyn Hooks| {
        if req.unsafe_mode {
            unsafe_rebase::rebase(req, devs, hooks)
        } else {
            safe::rebase(req, devs, hooks)
        }
    };
    let Some((first, rest)) = devs.split_first_mut() else {
        return rebase(req, devs, hooks);
    };
    match dirty::prepare(&mut **first)? {
        None => rebase(req, devs, hooks),
        Some((mut repaired, lines)) => {
            let mut list: alloc::vec::Vec<&mut dyn BlockDev> = alloc::vec::Vec::new();
            list.push(&mut repaired);
            for d in rest.iter_mut() {
                list.push(&mut **d);
            }
            let mut outcome = rebase(req, &mut list, hooks)?;
            outcome.repair_lines = lines;
            Ok(outcome)
        }
    }
}

/// A refusal in the guest's own words (not an image's open error).
pub(crate) fn plain(message: impl Into<String>) -> GuestError {
    GuestError {
        kind: ErrorKind::Plain,
        message: message.into(),
    }
}

/// Device `index`, or an error naming the missing device (a host bug, not an image's).
pub(crate) fn device<'a>(
    devs: &'a mut [&mut dyn BlockDev],
    index: u8,
) -> Result<&'a mut dyn BlockDev, GuestError> {
    match devs.get_mut(usize::from(index)) {
        Some(dev) => Ok(&mut **dev),
        None => Err(GuestError {
            kind: ErrorKind::Plain,
            message: format!("no device {index}"),
        }),
    }
}
