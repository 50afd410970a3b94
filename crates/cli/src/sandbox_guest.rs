//! The real [`Guest`]: one micro-VM per call, through [`crate::sandbox`].

use instar_abi::{Call, Response};

use crate::guest::{Attached, Guest};
use crate::sandbox::{self, Device, Options};

/// Runs each call in a fresh sandbox with default limits.
#[derive(Debug, Default)]
pub struct SandboxGuest {
    pub options: Options,
}

impl Guest for SandboxGuest {
    fn run(
        &mut self,
        call: &Call,
        devices: &[Attached<'_>],
        on_progress: &mut (dyn FnMut(u32) + Send),
    ) -> Result<Response, String> {
        sandbox::run(call, &devices_of(devices), &self.options, on_progress)
            .map_err(|e| e.to_string())
    }
}

/// The sandbox's view of the files a [`Guest`] call attaches.
pub fn devices_of<'a>(attached: &[Attached<'a>]) -> Vec<Device<'a>> {
    attached
        .iter()
        .map(|d| Device {
            file: d.file,
            writable: d.writable,
        })
        .collect()
}
