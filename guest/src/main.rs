//! rebase.bin: the sandboxed guest of instar.
//!
//! It runs at CPL3 in a micro-VM set up by `instar-vmm`: it reads one
//! [`instar_abi::Call`] from the request area, attaches one virtio-blk device per entry
//! of `device_sizes`, handles the request (self-tests here, everything else in
//! `instar_rebase::handle`), writes the [`instar_abi::Response`] to the response area and
//! rings the DONE doorbell. A panic rings the PANIC doorbell with its message instead.

#![no_std]
#![no_main]

extern crate alloc;

mod boot;
mod compressor;
mod disk;
mod heap;
mod libc;
mod runtime;
mod selftest;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use instar_abi::layout::{DOORBELL_PROGRESS, MAX_DEVICES};
use instar_abi::{Call, ErrorKind, GuestError, Request, Response};
use instar_blockdev::BlockDev;

/// Doorbells and the `-c` compressor for the format code.
struct DoorbellHooks(compressor::GuestCompressor);

impl instar_rebase::Hooks for DoorbellHooks {
    fn compressor(&mut self) -> Option<&mut dyn instar_qcow2::compressor::Compressor> {
        Some(&mut self.0)
    }
    fn progress(&mut self, steps: u32) {
        runtime::ring(DOORBELL_PROGRESS, steps);
    }
    fn write_phase(&mut self, end: u64) {
        runtime::write_phase(end);
    }
}

fn error(message: String) -> Response {
    Response::Error(GuestError {
        kind: ErrorKind::Plain,
        message,
    })
}

fn serve() -> Response {
    let call: Call = match instar_abi::decode(runtime::request_area()) {
        Ok(c) => c,
        Err(e) => return error(format!("malformed request: {e}")),
    };
    if call.device_sizes.len() > MAX_DEVICES {
        return error(String::from("too many devices"));
    }
    let mut disks = Vec::with_capacity(call.device_sizes.len());
    for (i, &size) in call.device_sizes.iter().enumerate() {
        match disk::Disk::attach(i, size) {
            Ok(d) => disks.push(d),
            Err(e) => return error(format!("cannot attach device {i}: {e}")),
        }
    }
    match &call.request {
        Request::SelfTest(t) => selftest::run(t, &mut disks),
        request => {
            let zstd = match request {
                Request::Rebase(r) => r.zstd,
                _ => Default::default(),
            };
            let mut devs: Vec<&mut dyn BlockDev> =
                disks.iter_mut().map(|d| d as &mut dyn BlockDev).collect();
            instar_rebase::handle(
                &call,
                &mut devs,
                &mut DoorbellHooks(compressor::GuestCompressor { zstd }),
            )
        }
    }
}

/// Entered at CPL3 from the boot stub, with the end of guest RAM.
extern "C" fn guest_main(ram_end: u64) -> ! {
    heap::init(ram_end);
    let response = serve();
    runtime::finish(&response)
}
