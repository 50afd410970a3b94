//! Shared helpers: the reference qemu-img binaries and scratch directories (from
//! `instar-testkit`), and running instar's guest logic over an in-memory copy of a file.

#![allow(dead_code, unused_imports)]

use std::path::Path;
use std::process::Command;

use instar_abi::{Call, ErrorKind, GuestError, Request, Response};
use instar_blockdev::{BlockDev, MemDev};
use instar_rebase::{handle, Hooks};

pub use instar_testkit::qemu_ref::{self, Build};

/// Every reference build: 10.2, 11.1, then 10.0 and 7.2 when installed.
pub use instar_testkit::qemu_ref::all_builds as all_qemu_imgs;
/// qemu-img 10.2 (see `instar_testkit::qemu_ref`). `None` skips the test, unless
/// `INSTAR_REQUIRE_QEMU=1`, which turns a missing binary into a failure.
pub use instar_testkit::qemu_ref::reference_img as qemu_img;
pub use instar_testkit::{qemu_io, Scratch};

/// qemu-img 10.0, the machine's own, when installed.
pub fn qemu_img_10_0() -> Option<std::path::PathBuf> {
    qemu_ref::find("10.0").map(|b| b.img)
}

/// Run a command in `dir`; returns (success, stderr).
pub fn run(dir: &Path, prog: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run and require success.
pub fn ok(dir: &Path, prog: &Path, args: &[&str]) {
    let (success, err) = run(dir, prog, args);
    assert!(success, "{} {:?} failed: {err}", prog.display(), args);
}

#[derive(Default)]
pub struct RecordingHooks {
    pub write_phase: bool,
    /// The write end declared with the write phase.
    pub write_end: Option<u64>,
}

impl Hooks for RecordingHooks {
    fn progress(&mut self, _hundredths: u32) {}
    fn write_phase(&mut self, end: u64) {
        assert!(!self.write_phase, "write phase announced twice");
        self.write_phase = true;
        self.write_end = Some(end);
    }
}

impl RecordingHooks {
    /// Every write of `dev` came after the write phase and ends within its declared end.
    pub fn check_writes(&self, dev: &MemDev) {
        if dev.writes.is_empty() {
            return;
        }
        let end = self.write_end.expect("writes without a write phase");
        for &(offset, len) in &dev.writes {
            assert!(
                offset + len as u64 <= end,
                "write of {len} at {offset} past the declared end {end}"
            );
        }
    }
}

/// Handle `request` over the file `path` as device 0 (read-write), writing the result
/// back. Checks the write discipline: nothing written (and no write phase) on error.
pub fn run_guest(path: &Path, request: Request) -> Response {
    let data = std::fs::read(path).unwrap();
    let mut dev = MemDev::new(data.clone());
    let call = Call {
        device_sizes: vec![data.len() as u64],
        request,
    };
    let mut hooks = RecordingHooks::default();
    let resp = {
        let mut devs: [&mut dyn BlockDev; 1] = [&mut dev];
        handle(&call, &mut devs, &mut hooks)
    };
    match &resp {
        Response::Error(_) => {
            assert!(
                dev.writes.is_empty(),
                "writes after an error: {:?}",
                dev.writes
            );
            assert!(!hooks.write_phase, "write phase announced before an error");
            assert_eq!(dev.data, data);
        }
        _ => {
            hooks.check_writes(&dev);
            std::fs::write(path, &dev.data).unwrap()
        }
    }
    resp
}

/// How qemu-img prints a guest error about `file` / the new backing `name`.
pub fn qemu_style(err: &GuestError, file: &str, name: &str) -> String {
    match err.kind {
        ErrorKind::Open { .. } => format!("qemu-img: Could not open '{file}': {}", err.message),
        ErrorKind::ChangeBacking => {
            format!(
                "qemu-img: Could not change the backing file to '{name}': {}",
                err.message
            )
        }
        ErrorKind::Plain => format!("qemu-img: {}", err.message),
    }
}
