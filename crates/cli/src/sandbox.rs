//! The sandbox as the rest of the CLI sees it: run one [`Call`] in a fresh micro-VM
//! running the embedded guest (`rebase.bin`, built by `build.rs`).
//!
//! ```no_run
//! # use instar::sandbox::{run, Device, Options};
//! # use instar_abi::{Call, Request, SelfTest};
//! let file = std::fs::File::open("image.qcow2")?;
//! let call = Call { device_sizes: vec![], request: Request::SelfTest(SelfTest::Echo(7)) };
//! let devices = [Device { file: &file, writable: false }];
//! let response = run(&call, &devices, &Options::default(), &mut |_progress| {})?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What callers must know:
//! - `call.device_sizes` is filled in from the files; device `i` is `devices[i]`.
//! - A read-only device may be any open file (a writable handle is reopened read-only);
//!   a writable one must be open for reading and writing. Writes can leave the file up to
//!   511 bytes longer than the guest meant (whole sectors): truncate to
//!   `RebaseOutcome::overlay_len`.
//! - `on_progress` runs on the sandbox's seccomp-confined thread: it may only write to
//!   stdout/stderr (no opening files, no spawning, no sockets — those kill the process
//!   with SIGSYS).
//! - [`SandboxError`]'s `Display` is one line to print after `instar: `; guest text in it
//!   is already sanitised. In a `Response::Error`, the message is sanitised and bounded;
//!   names in `Response::Probe` are raw bytes within `MAX_REPORTED_NAME` and must be
//!   escaped before printing.

use instar_abi::{Call, Response};

/// Limits of one run: the VMM's own configuration. `stop_after_writes` and
/// `record_writes` are test-only (crash and power-loss tests); the `instar` binary sets
/// only the watchdog and the deadline, and the real guest (`sandbox_guest.rs`) the
/// virtual size its own probe found.
pub use instar_vmm::Config as Options;
/// One image attached to the VM as a virtio-blk device (index = device number).
pub use instar_vmm::Device;
pub use instar_vmm::Error as SandboxError;

/// The guest, built by build.rs from guest/.
static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rebase.bin"));

/// Run `call` in a fresh VM with `devices` attached and return the guest's answer.
pub fn run(
    call: &Call,
    devices: &[Device<'_>],
    opts: &Options,
    on_progress: &mut (dyn FnMut(u32) + Send),
) -> Result<Response, SandboxError> {
    run_detailed(call, devices, opts, on_progress).map(|o| o.response)
}

/// Like [`run`], also telling whether the guest reached its write phase.
pub fn run_detailed(
    call: &Call,
    devices: &[Device<'_>],
    opts: &Options,
    on_progress: &mut (dyn FnMut(u32) + Send),
) -> Result<instar_vmm::Outcome, SandboxError> {
    run_guest(GUEST_ELF, call, devices, opts, on_progress)
}

/// Like [`run_detailed`] with another guest image than the embedded one: for tests of
/// the host against hostile guests (`crates/cli/tests/hostile_cli.rs`).
pub fn run_guest(
    guest_elf: &[u8],
    call: &Call,
    devices: &[Device<'_>],
    opts: &Options,
    on_progress: &mut (dyn FnMut(u32) + Send),
) -> Result<instar_vmm::Outcome, SandboxError> {
    instar_vmm::run(guest_elf, call, devices, opts, on_progress)
}
