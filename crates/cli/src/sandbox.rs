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

use std::fs::File;
use std::time::Duration;

use instar_abi::{Call, Response};

pub use instar_vmm::Error as SandboxError;

/// The guest, built by build.rs from guest/.
static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rebase.bin"));

/// One image attached to the VM as a virtio-blk device.
#[derive(Debug, Clone, Copy)]
pub struct Device<'a> {
    pub file: &'a File,
    pub writable: bool,
}

/// Limits of one run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Guest RAM in bytes (lazily backed): a multiple of 2 MiB, 16 MiB to 2 GiB.
    pub ram_size: u64,
    /// How long the guest may run without any I/O or progress report.
    pub watchdog: Duration,
    /// Test-only fault injection (crash-consistency tests): stop the VM right after this
    /// many completed writes, failing with [`SandboxError::StoppedAfterWrites`]. The
    /// `instar` binary never sets it; `None` by default.
    pub stop_after_writes: Option<u64>,
    /// The most one VM may take in all (`INSTAR_DEADLINE_SECS`); `None`: the sandbox's
    /// default for the work (`instar_vmm::default_deadline`).
    pub deadline: Option<Duration>,
    /// The virtual size of the image the call works on, from the host's own probe:
    /// bounds the overlay's growth and scales the default deadline.
    pub virtual_size: Option<u64>,
    /// Test-only (power-loss tests): record every completed write and flush in
    /// `Outcome::io_log`. The `instar` binary never sets it; `false` by default.
    pub record_writes: bool,
}

impl Default for Options {
    fn default() -> Self {
        let c = instar_vmm::Config::default();
        Options {
            ram_size: c.ram_size,
            watchdog: c.watchdog,
            stop_after_writes: c.stop_after_writes,
            deadline: c.deadline,
            virtual_size: c.virtual_size,
            record_writes: c.record_writes,
        }
    }
}

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
    let devices: Vec<instar_vmm::Device<'_>> = devices
        .iter()
        .map(|d| instar_vmm::Device {
            file: d.file,
            writable: d.writable,
        })
        .collect();
    let config = instar_vmm::Config {
        ram_size: opts.ram_size,
        watchdog: opts.watchdog,
        stop_after_writes: opts.stop_after_writes,
        deadline: opts.deadline,
        virtual_size: opts.virtual_size,
        record_writes: opts.record_writes,
    };
    instar_vmm::run(guest_elf, call, &devices, &config, on_progress)
}
