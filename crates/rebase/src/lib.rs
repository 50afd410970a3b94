//! Guest-side handling of one [`Call`]: probe an image, or rebase the overlay.
//!
//! The guest's `main` builds one [`BlockDev`] per device and calls [`handle`].

#![no_std]

extern crate alloc;

use alloc::string::String;
use instar_abi::{Call, ErrorKind, GuestError, Response};
use instar_blockdev::BlockDev;

/// Callbacks into the guest runtime (doorbells).
pub trait Hooks {
    /// Progress in hundredths of a percent (0..=10000).
    fn progress(&mut self, hundredths: u32);
    /// Every check has passed; the first write to the overlay follows.
    fn write_phase(&mut self);
}

/// Handle `call` over `devs` (index = device index). `SelfTest` requests are the guest
/// runtime's own business and never reach here.
pub fn handle(call: &Call, devs: &mut [&mut dyn BlockDev], hooks: &mut dyn Hooks) -> Response {
    let _ = (call, devs, hooks);
    Response::Error(GuestError {
        kind: ErrorKind::Plain,
        message: String::from("not implemented yet"),
    })
}
