//! The real sandbox as the CLI's guest, stopped after a given number of writes (the
//! VMM's test-only `stop_after_writes`) and optionally recording every write and flush:
//! the crash-consistency tests' way of running `instar rebase` in-process.

#![allow(dead_code)]

use std::ffi::OsString;
use std::path::Path;

use instar::guest::{Guest, RunError};
use instar::sandbox::{self, Device, Options, SandboxError};
use instar_abi::{Call, Response};
use instar_vmm::BlockOp;

/// The real sandbox, with a write limit on every VM it starts.
#[derive(Default)]
pub struct StoppingGuest {
    pub stop_after: Option<u64>,
    /// Record every VM's writes and flushes (`Options::record_writes`).
    pub record: bool,
    /// Writes of each VM that completed.
    pub writes: Vec<u64>,
    /// With `record`: each completed VM's writes and flushes.
    pub logs: Vec<Vec<BlockOp>>,
    /// The write count of a VM stopped by the limit.
    pub stopped: Option<u64>,
}

impl Guest for StoppingGuest {
    fn run(
        &mut self,
        call: &Call,
        devices: &[Device<'_>],
        on_progress: &mut (dyn FnMut(u32) + Send),
    ) -> Result<Response, RunError> {
        let opts = Options {
            stop_after_writes: self.stop_after,
            record_writes: self.record,
            ..Options::default()
        };
        match sandbox::run_detailed(call, devices, &opts, on_progress) {
            Ok(o) => {
                self.writes.push(o.writes);
                self.logs.push(o.io_log);
                Ok(o.response)
            }
            Err(e) => {
                if let SandboxError::StoppedAfterWrites(n) = e {
                    self.stopped = Some(n);
                }
                Err(e.into())
            }
        }
    }
}

/// `instar rebase ARGS FILE` in-process through `guest`; returns the exit status and
/// the guest's record.
pub fn rebase(args: &[&str], file: &Path, mut guest: StoppingGuest) -> (i32, StoppingGuest) {
    let mut argv: Vec<OsString> = vec!["rebase".into()];
    argv.extend(args.iter().map(OsString::from));
    argv.push(file.into());
    let status = instar::cli::run(&argv, &mut guest);
    (status, guest)
}

pub fn stopping_at(k: u64) -> StoppingGuest {
    StoppingGuest {
        stop_after: Some(k),
        ..StoppingGuest::default()
    }
}
