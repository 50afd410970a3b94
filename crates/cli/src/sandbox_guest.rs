//! The real [`Guest`]: one micro-VM per call, through [`crate::sandbox`].
//!
//! It remembers what its own probes of a read-write open found (the overlay's virtual
//! size, by file identity), so that the rebase call that follows gets host-side bounds
//! no guest can raise: how far the overlay may grow and the default deadline
//! ([`Options::virtual_size`]), and how many progress steps count
//! ([`crate::progress::max_steps`]).

use std::fs::File;
use std::os::unix::fs::MetadataExt;

use instar_abi::{Call, Request, Response};

use crate::guest::{Guest, RunError};
use crate::progress;
use crate::sandbox::{self, Device, Options};

/// Runs each call in a fresh sandbox with default limits.
#[derive(Debug, Default)]
pub struct SandboxGuest {
    pub options: Options,
    /// Files probed as a read-write open, and the virtual size found.
    probed: Vec<(FileId, u64)>,
    /// Tests only: a guest image that one kind of call runs instead of the embedded
    /// one. The binary never sets it.
    hostile: Option<Hostile>,
}

/// Tests only: a hand-built guest, and the calls it answers.
#[derive(Debug)]
struct Hostile {
    elf: Vec<u8>,
    /// Probes (else rebase calls; the other kind keeps the real guest, so that the flow
    /// reaches the hostile call).
    probes: bool,
}

impl Hostile {
    fn answers(&self, request: &Request) -> bool {
        match request {
            Request::Probe(_) => self.probes,
            Request::Rebase(_) => !self.probes,
            _ => false,
        }
    }
}

/// A file's identity and length: a file that changed is not the one probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
}

fn file_id(file: &File) -> Option<FileId> {
    let m = file.metadata().ok()?;
    Some(FileId {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
    })
}

impl SandboxGuest {
    /// Tests only: a guest whose rebase calls run `elf` (a hostile guest), with
    /// everything else as in the binary.
    pub fn with_rebase_guest(options: Options, elf: Vec<u8>) -> SandboxGuest {
        SandboxGuest {
            options,
            probed: Vec::new(),
            hostile: Some(Hostile { elf, probes: false }),
        }
    }

    /// Tests only: a guest whose probes run `elf` (a hostile guest), with everything
    /// else as in the binary.
    pub fn with_probe_guest(options: Options, elf: Vec<u8>) -> SandboxGuest {
        SandboxGuest {
            options,
            probed: Vec::new(),
            hostile: Some(Hostile { elf, probes: true }),
        }
    }

    /// The probed virtual size of a rebase's overlay (device 0, writable).
    fn overlay_size(&self, call: &Call, devices: &[Device<'_>]) -> Option<u64> {
        let overlay = devices.first().filter(|d| d.writable)?;
        if !matches!(call.request, Request::Rebase(_)) {
            return None;
        }
        let id = file_id(overlay.file)?;
        self.probed
            .iter()
            .find(|(p, _)| *p == id)
            .map(|&(_, size)| size)
    }

    fn remember(&mut self, call: &Call, devices: &[Device<'_>], response: &Response) {
        let (Request::Probe(p), Response::Probe(info)) = (&call.request, response) else {
            return;
        };
        let file = devices.get(usize::from(p.dev)).map(|d| d.file);
        if let Some(id) = file.filter(|_| p.writable).and_then(file_id) {
            self.probed.retain(|(q, _)| *q != id);
            self.probed.push((id, info.virtual_size));
        }
    }
}

impl Guest for SandboxGuest {
    fn run(
        &mut self,
        call: &Call,
        devices: &[Device<'_>],
        on_progress: &mut (dyn FnMut(u32) + Send),
    ) -> Result<Response, RunError> {
        let mut options = self.options.clone();
        options.virtual_size = self.overlay_size(call, devices);
        let file_bytes = devices
            .iter()
            .filter_map(|d| d.file.metadata().ok())
            .fold(0u64, |sum, m| sum.saturating_add(m.len()));
        let bound = options
            .virtual_size
            .map(|size| progress::max_steps(size, file_bytes));
        let mut bounded = |steps: u32| {
            let steps = bound.map_or(steps, |b| u64::from(steps).min(b) as u32);
            on_progress(steps)
        };
        let hostile = self.hostile.as_ref().filter(|h| h.answers(&call.request));
        let response = match hostile {
            Some(h) => sandbox::run_guest(&h.elf, call, devices, &options, &mut bounded)
                .map(|o| o.response),
            None => sandbox::run(call, devices, &options, &mut bounded),
        }
        .map_err(RunError::from)?;
        self.remember(call, devices, &response);
        Ok(response)
    }
}
