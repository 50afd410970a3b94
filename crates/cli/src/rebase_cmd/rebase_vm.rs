//! The one VM that makes the change, and what its answer means.

use std::os::unix::ffi::OsStrExt;

use instar_abi::{Call, ErrorKind, NewBacking, RebaseOutcome, RebaseRequest, Request};

use super::cmd::{Cmd, Role};
use super::devices::DeviceTable;
use super::done::Record;
use crate::failure::Failure;
use crate::guest::{self, Answer, Guest};
use crate::progress::{Progress, StepCounter};

/// What the guest writes into the header for `record` (name verbatim, format).
pub fn header_backing(record: Option<&Record>) -> Option<NewBacking> {
    record.map(|(name, format)| NewBacking {
        name: name.as_bytes().to_vec(),
        format: Some(format.as_bytes().to_vec()),
    })
}

/// Run `request` with the devices of `table`, its progress reports counted against
/// `virtual_size`. A refusal about one device reads as QEMU's error about that file.
pub fn run(
    cmd: &Cmd,
    guest: &mut dyn Guest,
    progress: &mut Progress,
    request: RebaseRequest,
    table: &DeviceTable,
    virtual_size: u64,
) -> Result<RebaseOutcome, Failure> {
    let call = Call {
        device_sizes: table.sizes.clone(),
        request: Request::Rebase(request),
    };
    let mut steps = StepCounter::new(virtual_size);
    let mut on_progress = |n: u32| steps.advance(n, progress);
    match guest::rebase(guest, &call, &table.devices, &mut on_progress)? {
        Answer::Ok(outcome) => Ok(outcome),
        Answer::Refused(r) => {
            if let ErrorKind::Open { dev } = r.kind {
                if let Some(prefix) = table.prefixes.get(usize::from(dev)) {
                    return Err(Failure::refused(prefix, &r));
                }
            }
            Err(cmd.refusal(Role::Overlay, &r))
        }
    }
}
