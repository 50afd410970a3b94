//! The KVM micro-VM that runs instar's guest (`rebase.bin`).
//!
//! [`run`] boots the guest ELF in a fresh VM, hands it one [`instar_abi::Call`] and
//! returns its [`instar_abi::Response`]. Every VM is used once.
//!
//! # The machine
//!
//! - One vCPU in 64-bit long mode. `/dev/kvm` on the project's machines is kvm-pvm,
//!   which runs CPL0 code in a slow instruction emulator that cannot execute SSE: the
//!   guest starts at CPL0 only for a boot stub that enables SSE and drops to CPL3 with
//!   `iretq`; all Rust code runs at CPL3. The VMM therefore builds a GDT with user
//!   code/data descriptors and page tables with the U/S bit on every entry.
//! - Guest RAM is anonymous `MAP_NORESERVE` memory (default
//!   [`instar_abi::layout::DEFAULT_RAM_SIZE`]): untouched pages cost nothing. RAM and
//!   the MMIO window are identity-mapped, except page 0 (null dereferences fault) and
//!   the page below the guest image (the guard under the guest's stack, which
//!   guest/link.ld puts first). The memory map is in [`instar_abi::layout`].
//! - No interrupt controller, timer or IDT: the guest polls, and any CPU exception ends
//!   as a triple fault, reported with the guest's RIP.
//! - The guest talks to the host through MMIO only (kvm-pvm turns `out` at CPL3 into
//!   #GP): an 8-byte write to the doorbell (`code << 32 | arg`), and one virtio-mmio
//!   (version 2) virtio-blk device per image at `VIRTIO_MMIO_BASE + i * 0x1000`.
//!
//! # Trust
//!
//! The guest is hostile. Every descriptor is checked against guest memory and every
//! request against the device's size; read-only devices refuse writes (`S_IOERR`) and
//! only ever hold a read-only file descriptor (a writable one from the caller is
//! reopened read-only); responses are decoded from a fixed-size copy of the response
//! area; guest text (panic and error messages) is sanitised and bounded with
//! [`sanitize`] before it can reach a terminal. Names in an [`instar_abi::ImageInfo`]
//! are checked against [`instar_abi::MAX_REPORTED_NAME`] but stay raw bytes: callers
//! must escape them when printing.
//!
//! # Limits
//!
//! Every guest-driven bound, with its value and why, is listed in
//! `docs/sandbox-bounds.md`; in short:
//!
//! - A watchdog ends a guest that runs for [`Config::watchdog`] without a VM exit
//!   (a doorbell or a virtio register access), at most a quarter of that later; see
//!   [`watchdog`].
//! - A total deadline ([`Config::deadline`], by default [`default_deadline`] of the
//!   work) ends any guest, also one that keeps exiting: [`Error::Deadline`].
//! - A request has at most `seg_max` (128) data segments plus header and status, read
//!   into a buffer allocated once; indirect tables are no longer than that, never
//!   nested. A notify serves at most the queue size (256) of requests (more made
//!   available at once ends the VM) and moves at most 1 GiB. The queue layout is frozen
//!   while it is ready.
//! - Writes are refused before the guest's write phase (`DOORBELL_WRITE_PHASE`, at most
//!   once) and past the write end it declares, or the host's [`write_cap`], whichever is
//!   lower.
//! - A panic on a confined thread never reaches a refused system call (the panic hook
//!   is silent there): a vCPU-thread panic is an [`Error::GuestFault`] naming it.
//! - The vCPU loop runs in a dedicated thread which, once the VM is set up, confines
//!   itself with a seccomp allowlist: `KVM_RUN`/`KVM_GET_REGS` on its vCPU,
//!   `pread64`/`fdatasync` on the device files, `pwrite64` on writable ones, `write` to
//!   fds 1 and 2, the watchdog's signal return and timer deletion, non-executable
//!   memory management (`mremap` included), futex, and thread exit. Anything else kills the process with SIGSYS. The progress callback
//!   runs in that thread, so it may only write to stdout/stderr.
//! - Large reads (at least 512 KiB) are shared, in 256 KiB chunks, between the vCPU
//!   thread and an I/O worker thread per VM (see `io_pool`), which blocks all signals
//!   and confines itself before its first job: `pread64` on the device files, futex, non-executable memory
//!   management, `write` to fd 2, and thread exit. The worker is stopped and joined
//!   when the VM ends, however it ends. Only calls that copy image data (a safe
//!   rebase, a large read self-test) get a worker.
//! - A finished VM (its KVM descriptors and guest RAM, about 1 ms of kernel work to
//!   free) is closed by one background thread per process (`teardown`), confined to
//!   `close`, memory management, futex and exit, so that [`run`] returns at once. The
//!   image files are released before [`run`] returns.
//! - No privileges are needed beyond read/write access to `/dev/kvm`.
//!
//! # Fault injection
//!
//! [`Config::stop_after_writes`] exists for crash-consistency tests only: with `Some(k)`
//! the VM is stopped at once after the k-th write request (`VIRTIO_BLK_T_OUT`, summed
//! over all devices; a flush, a read or a refused write does not count) has reached its
//! file, and [`run`] returns [`Error::StoppedAfterWrites`]. The guest never sees that
//! write complete, and nothing after it runs, as if the host process had died right
//! after the `pwrite`. `Some(0)` stops at the first write request, before it is written.
//! The `instar` binary always runs with `None`; only a caller of the library can set it.
//!
//! The `test-hooks` feature (never enabled by the binary; the crate's own tests turn it
//! on) adds [`test_hooks`], which makes the next pass through a site of a confined
//! thread panic.
//!
//! [`Config::record_writes`], for power-loss tests likewise, lists every completed write
//! request (device, byte offset, length) and flush in [`Outcome::io_log`].

mod chain;
mod elf;
mod error;
mod io_pool;
mod memory;
mod sanitize;
mod seccomp;
mod teardown;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
mod virtio_blk;
mod vm;
pub mod watchdog;
mod write_count;

use std::any::Any;
use std::fs::File;
use std::time::Duration;

use instar_abi::{Call, Request, Response, SelfTest, MAX_REPORTED_NAME};

pub use error::Error;
pub use memory::{MAX_RAM, MIN_RAM};
pub use sanitize::sanitize;
pub use virtio_blk::BlockOp;

/// One image attached to the VM as a virtio-blk device, in device-index order.
#[derive(Debug, Clone, Copy)]
pub struct Device<'a> {
    /// The open image. A writable device needs a file open for reading and writing.
    pub file: &'a File,
    /// Whether the guest may write to it.
    pub writable: bool,
}

/// Limits of one run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Guest RAM in bytes: a multiple of 2 MiB in [`MIN_RAM`]..=[`MAX_RAM`].
    pub ram_size: u64,
    /// How long the guest may run without a VM exit before it is stopped (it is
    /// stopped within a quarter of this after the limit).
    pub watchdog: Duration,
    /// Fault injection for crash-consistency tests (see the crate docs): stop the VM
    /// right after this many completed writes. `None` (the default) never stops.
    pub stop_after_writes: Option<u64>,
    /// The most the whole run may take, whatever the guest does. `None` (the default):
    /// [`default_deadline`] of the work.
    pub deadline: Option<Duration>,
    /// The virtual size of the image the call works on (a safe rebase's overlay), when
    /// the caller knows it: it bounds how far the overlay may grow ([`write_cap`]) and
    /// scales the default deadline. Only the host's own knowledge belongs here (e.g.
    /// from a probe in another VM), never this guest's word.
    pub virtual_size: Option<u64>,
    /// Test-only: record every completed write and flush in [`Outcome::io_log`], so
    /// that power-loss tests can rebuild what a disk may hold after any barrier.
    pub record_writes: bool,
}

/// The default watchdog limit.
pub const DEFAULT_WATCHDOG: Duration = Duration::from_secs(30);

/// The smallest default deadline: far more than any probe or rebase of a small image
/// needs (milliseconds), room for a slow or loaded machine.
pub const DEADLINE_FLOOR: Duration = Duration::from_secs(300);
/// The slowest rate the default deadline allows for the work, in bytes per second:
/// several times slower than a spinning disk.
pub const DEADLINE_RATE: u64 = 16 << 20;

/// The default total deadline of a run over devices of `device_bytes` bytes in all,
/// working over an image of `virtual_size` bytes (when known): [`DEADLINE_FLOOR`] plus
/// the time to move, at [`DEADLINE_RATE`], every device byte once and the virtual size
/// three times (a safe rebase reads the old and the new chain over it and may write it).
pub fn default_deadline(device_bytes: u64, virtual_size: Option<u64>) -> Duration {
    let work = device_bytes.saturating_add(virtual_size.unwrap_or(0).saturating_mul(3));
    DEADLINE_FLOOR.saturating_add(Duration::from_secs(work / DEADLINE_RATE))
}

/// Room for metadata when the overlay's growth is bounded by its virtual size: every
/// table a write can need (L2 tables, refcount blocks and table, grain tables) and a
/// few clusters of rounding at the largest cluster size.
const METADATA_SLACK: u64 = 64 << 20;
/// The largest qcow2 cluster: a header rewrite writes at most this at offset 0.
const MAX_CLUSTER: u64 = 2 << 20;

/// The host's bound on where writes to a writable device of `len` bytes may end, for
/// `call` (the guest's declared write end is checked against it, never the reverse):
/// - a `-u` rebase rewrites the header, after the repair of a dirty overlay:
///   `len + len / 32 + 64 MiB`;
/// - `SelfTest::Write` writes one sector;
/// - a safe rebase with a known `virtual_size` writes at most the virtual size of data
///   and its metadata: `len + size + (len + size) / 8 + 64 MiB` (qcow2 metadata is at
///   most 1/32 of the data and file with 512-byte clusters, a grain table 1/128);
/// - otherwise [`virtio_blk::WRITABLE_CAPACITY`].
pub fn write_cap(len: u64, call: &Call, virtual_size: Option<u64>) -> u64 {
    match (&call.request, virtual_size) {
        // A dirty overlay's repair may add a refcount structure at the end: at most
        // refcount blocks of 1/64 of the file at most, plus a table of 8 MiB at most.
        (Request::Rebase(r), _) if r.unsafe_mode => len
            .saturating_add(len / 32)
            .saturating_add(METADATA_SLACK)
            .max(MAX_CLUSTER),
        (Request::SelfTest(SelfTest::Write { .. }), _) => len.max(512),
        (Request::Rebase(_), Some(size)) => {
            let both = len.saturating_add(size);
            both.saturating_add(both / 8).saturating_add(METADATA_SLACK)
        }
        _ => len.max(virtio_blk::WRITABLE_CAPACITY),
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ram_size: instar_abi::layout::DEFAULT_RAM_SIZE,
            watchdog: DEFAULT_WATCHDOG,
            stop_after_writes: None,
            deadline: None,
            virtual_size: None,
            record_writes: false,
        }
    }
}

/// A finished run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The guest's answer, validated and with its message sanitised.
    pub response: Response,
    /// Whether the guest rang the WRITE_PHASE doorbell (it started writing).
    pub write_phase: bool,
    /// Write requests that reached the device files (see [`Config::stop_after_writes`]).
    pub writes: u64,
    /// Completed writes and flushes in order, when [`Config::record_writes`] is set.
    pub io_log: Vec<BlockOp>,
}

/// Boot `guest_elf`, give it `call` and `devices`, and wait for its answer.
///
/// `call.device_sizes` is replaced by the lengths of the device files. `on_progress`
/// gets the guest's progress reports (the count of copy-loop steps so far, see
/// `DOORBELL_PROGRESS`); it runs
/// on the sandbox's confined thread and may only write to stdout or stderr.
pub fn run(
    guest_elf: &[u8],
    call: &Call,
    devices: &[Device<'_>],
    config: &Config,
    on_progress: &mut (dyn FnMut(u32) + Send),
) -> Result<Outcome, Error> {
    seccomp::install_panic_hook();
    teardown::start();
    let raw = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("instar-vcpu".into())
            .spawn_scoped(s, || {
                vm::run_on_this_thread(guest_elf, call, devices, config, on_progress)
            })
            .map_err(Error::setup("starting the vCPU thread"))?
            .join()
            .unwrap_or_else(|payload| {
                Err(Error::GuestFault(format!(
                    "the vCPU thread panicked: {}",
                    panic_message(payload.as_ref())
                )))
            })
    })?;
    let response = match raw.exit {
        vm::RawExit::Done(area) => validate(
            instar_abi::decode::<Response>(&area)
                .map_err(|e| Error::GuestFault(format!("bad response from the guest: {e}")))?,
        )?,
        vm::RawExit::Panic(area) => {
            let text = instar_abi::framed(&area).unwrap_or(b"(no message)");
            return Err(Error::GuestPanic(sanitize(text)));
        }
    };
    Ok(Outcome {
        response,
        write_phase: raw.write_phase,
        writes: raw.writes,
        io_log: raw.io_log,
    })
}

/// The text of a panic payload, sanitised (it may quote guest values).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    sanitize(text.as_bytes())
}

/// Bound and sanitise what the guest said.
fn validate(response: Response) -> Result<Response, Error> {
    match response {
        Response::Error(mut e) => {
            e.message = sanitize(e.message.as_bytes());
            Ok(Response::Error(e))
        }
        Response::Probe(info) => {
            let names = [&info.backing_file, &info.backing_format, &info.data_file];
            if names
                .iter()
                .any(|n| n.as_ref().is_some_and(|n| n.len() > MAX_REPORTED_NAME))
            {
                return Err(Error::GuestFault(
                    "the guest reported an over-long name".into(),
                ));
            }
            Ok(Response::Probe(info))
        }
        other => Ok(other),
    }
}

#[cfg(test)]
mod write_cap_tests {
    use super::*;
    use instar_abi::{Format, RebaseRequest};

    fn rebase(unsafe_mode: bool) -> Call {
        Call {
            device_sizes: vec![0],
            request: Request::Rebase(RebaseRequest {
                overlay_format: Format::Qcow2,
                unsafe_mode,
                new_backing: None,
                old_chain: Vec::new(),
                new_chain: Vec::new(),
                in_chain: None,
                data_file_checked: true,
                progress: false,
                compress: false,
                keys: Vec::new(),
                zstd: Default::default(),
            }),
        }
    }

    #[test]
    fn unsafe_bound_leaves_room_for_a_dirty_overlays_repair() {
        let call = rebase(true);
        assert_eq!(write_cap(4096, &call, None), METADATA_SLACK + 4096 + 128);
        let len = 32 << 30;
        assert_eq!(write_cap(len, &call, None), len + len / 32 + METADATA_SLACK);
        assert_eq!(write_cap(u64::MAX, &call, None), u64::MAX);
        let safe = write_cap(1 << 20, &rebase(false), Some(1 << 20));
        assert_eq!(safe, (2 << 20) + (2 << 20) / 8 + METADATA_SLACK);
    }
}
