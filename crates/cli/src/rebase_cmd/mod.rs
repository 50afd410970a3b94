//! `instar rebase`: the host side of one rebase, in qemu-img 10.2's order of checks. The
//! driver, [`rebase`], runs these steps, each in its own file:
//!
//! 1. [`options`]: the cache modes and `-f` checked, `-F` parsed; [`dirs`]: `--allow-dir`;
//! 2. [`overlay`]: FILE opened read-write and locked for writing; [`one_vm`]: `-u` with
//!    `-F` done in one VM when it can be; else FILE probed in the sandbox and its data
//!    file checked;
//! 3. [`old_chain`]: in safe mode, the old chain below FILE (under the path policy);
//!    `-F` judged (after the open, as qemu-img does); the overlay format judged;
//! 4. [`new_backing`]: the new backing decided as one [`new_backing::NewBacking`]: its
//!    name checked; in safe mode QEMU's in-chain decision ([`in_chain`]), else the file
//!    opened, locked for reading and probed (safe mode, or no `-F`; [`probe_rule`]), and
//!    in safe mode its own chain followed ([`new_chain`]);
//! 5. [`devices`]: one VM's device table: FILE writable as device 0, then the old chain,
//!    then the new chain;
//! 6. [`rebase_vm`]: that VM makes the change, and its answer is read; [`finish`]: FILE
//!    cut to the length the guest reports.
//!
//! Every refusal happens before step 6, and the guest itself writes nothing unless the
//! whole change can be made, so an error leaves FILE unchanged. Every failure is a
//! [`Failure`], worded in [`crate::failure`]; a sandbox that gives no answer ends the
//! command at once.

mod cmd;
mod devices;
mod dirs;
mod done;
mod finish;
mod in_chain;
mod new_backing;
mod new_chain;
mod old_chain;
mod one_vm;
mod open_options;
mod options;
mod overlay;
mod probe_rule;
mod rebase_vm;
mod repair_report;

use instar_abi::RebaseRequest;

use crate::args::RebaseArgs;
use crate::guest::Guest;
use crate::progress::Progress;

pub use crate::failure::Failure;
pub use done::{Done, Mode, Record};

/// Run `instar rebase` with `args`; progress (if any) goes through `progress`.
pub fn rebase(
    args: &RebaseArgs,
    guest: &mut dyn Guest,
    progress: &mut Progress,
) -> Result<Done, Failure> {
    let zstd = crate::compress_libs::zstd_from_env().map_err(Failure::plain)?;
    let cmd = cmd::Cmd::new(args);
    let options = options::Options::parse(&cmd)?;
    let dirs = dirs::Dirs::from_args(args)?;
    let overlay = overlay::open(&cmd)?;
    if let Some(done) = one_vm::try_unsafe(&cmd, &options, guest, &overlay)? {
        return Ok(done);
    }
    let info = overlay::probe(&cmd, guest, &overlay, options.overlay_format)?;
    // The overlay's key was not derived yet: a failure before the rebase VM may hide
    // QEMU's first error, a key that does not unlock (overlay::first_failure).
    macro_rules! first {
        ($step:expr) => {
            match $step {
                Ok(v) => v,
                Err(f) => {
                    let wanted = options.overlay_format;
                    return Err(overlay::first_failure(&cmd, guest, &overlay, wanted, f));
                }
            }
        };
    }
    let mode = Mode::of(args);
    let old = match mode {
        Mode::Safe => Some(first!(old_chain::discover(
            &cmd, guest, dirs, &overlay, &info
        ))),
        Mode::Unsafe => None,
    };
    first!(overlay::check_compress(args.compress, info.format));
    first!(open_options::check(&cmd, info.format, old.as_ref()));
    let backing_format = first!(options.backing_format.checked());
    first!(overlay::check_format(&cmd, info.format));
    let new = first!(new_backing::decide(
        &cmd,
        guest,
        backing_format,
        old.as_ref(),
        info.format
    ));

    let old_images = old.as_ref().map_or(&[][..], |o| &o.images);
    let table = first!(devices::assemble(
        &cmd,
        &overlay.image,
        old_images,
        new.images()
    ));
    let request = RebaseRequest {
        overlay_format: info.format,
        unsafe_mode: mode == Mode::Unsafe,
        new_backing: rebase_vm::header_backing(new.record()),
        old_chain: table.old_chain.clone(),
        new_chain: table.new_chain.clone(),
        in_chain: new.in_chain(),
        // overlay::probe checked the data file.
        data_file_checked: true,
        progress: args.progress && mode == Mode::Safe,
        // With -u nothing is copied, so nothing is compressed.
        compress: args.compress && mode == Mode::Safe,
        keys: std::iter::once(cmd.key(0, 0))
            .chain(
                table
                    .old_chain
                    .iter()
                    .enumerate()
                    .map(|(i, img)| cmd.key(i + 1, img.dev)),
            )
            .flatten()
            .collect(),
        zstd,
    };
    let outcome = rebase_vm::run(&cmd, guest, progress, request, &table, info.virtual_size)?;
    repair_report::print(&outcome.repair_lines, overlay.image.len);
    finish::cut_overlay(&cmd, &overlay.image, outcome.overlay_len)?;
    Ok(Done {
        overlay_format: info.format,
        mode,
        stats: outcome.stats,
        new_backing: new.record().cloned(),
    })
}
