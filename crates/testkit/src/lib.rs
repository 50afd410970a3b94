//! The one test kit of the workspace, for the tests against real qemu-img / qemu-io and
//! KVM: locating the reference builds ([`qemu_ref`]), the skip rules ([`skip`]), scratch
//! directories and files ([`scratch`]), a qemu-io process holding an image's locks
//! ([`lock_holder`]), a file's data/hole layout ([`sparse`]), one-test-at-a-time
//! ([`serial`]), a seeded PRNG ([`rng`]), running commands ([`run_in`]), fixtures, and
//! `qemu-img convert` / `map` output.

// `sparse` and `mkfifo` call libc; every `unsafe` block has a SAFETY comment.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

pub mod lock_holder;
pub mod luks;
pub mod qemu_ref;
pub mod rng;
pub mod scratch;
pub mod skip;
pub mod sparse;

pub use lock_holder::LockHolder;
pub use rng::Rng;
pub use scratch::{copy_tree, copy_tree_dense, Scratch, ScratchFile};
pub use skip::require_kvm;

/// qemu-img 10.2 (see [`qemu_ref`]), else the machine's own 10.0 (version-checked like
/// every build). `None` means skip, unless `INSTAR_REQUIRE_QEMU=1`, which makes a
/// missing binary fail.
pub fn qemu_img() -> Option<PathBuf> {
    let found = qemu_ref::find(qemu_ref::REFERENCE)
        .or_else(|| qemu_ref::find("10.0"))
        .map(|b| b.img);
    skip::need(
        found.is_some(),
        "INSTAR_REQUIRE_QEMU",
        "qemu-img 10.2 (or 10.0) not found",
    );
    found
}

/// qemu-io next to the qemu-img in use.
pub fn qemu_io(img: &Path) -> PathBuf {
    let p = img.with_file_name("qemu-io");
    assert!(p.is_file(), "qemu-io missing next to {}", img.display());
    p
}

/// One test at a time within a test binary, for tests that run the CLI in-process: it
/// takes QEMU's OFD locks, and a child spawned by another test's thread (fork, then exec)
/// briefly holds copies of its descriptors, so a lock could outlive the CLI's close and
/// fail the next qemu-img run.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Make a FIFO at `path` (a special file the path policy must refuse).
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(
        rc,
        0,
        "mkfifo {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// A finished command's exit status (-1 when killed by a signal) and output as text.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Run `prog args…` in `cwd`, with no standard input and `LC_ALL=C` (messages in
/// QEMU's own words).
pub fn run_in<S: AsRef<std::ffi::OsStr>>(prog: &Path, args: &[S], cwd: &Path) -> Outcome {
    let out = Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", prog.display()));
    Outcome {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run a command; panic with its output on failure. Returns stdout.
pub fn run(prog: &Path, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{} {:?} failed: {}{}",
        prog.display(),
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// qemu-io with a list of commands, on an image of format `fmt`.
pub fn qio(img: &Path, fmt: &str, file: &Path, cmds: &[&str]) {
    let io = qemu_io(img);
    let mut args: Vec<&str> = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let f = file.to_str().unwrap();
    args.push(f);
    let out = run(&io, &args);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {cmds:?}: {out}"
    );
}

/// The whole virtual disk as qemu-img convert -O raw sees it (through the backing chain).
pub fn convert_raw(img: &Path, file: &Path, dir: &Scratch) -> Vec<u8> {
    let out = dir.path("convert.raw");
    run(
        img,
        &[
            "convert",
            "-O",
            "raw",
            file.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let data = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    data
}

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u64,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

pub fn parse_map(json: &str) -> Vec<MapEntry> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| MapEntry {
            start: e["start"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            depth: e["depth"].as_u64().unwrap(),
            present: e["present"].as_bool().unwrap(),
            zero: e["zero"].as_bool().unwrap(),
            data: e["data"].as_bool().unwrap(),
            compressed: e["compressed"].as_bool().unwrap_or(false),
            offset: e.get("offset").and_then(|o| o.as_u64()),
        })
        .collect()
}

/// `qemu-img map` of one qcow2 layer alone (its backing link cut), so that `present`
/// is this layer's own allocation.
pub fn map_layer_qcow2(img: &Path, file: &Path) -> Vec<MapEntry> {
    let spec = format!(
        "json:{{\"driver\":\"qcow2\",\"backing\":null,\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}",
        file.display()
    );
    parse_map(&run(img, &["map", "--output=json", &spec]))
}

/// Append `e` to `v`, merging with the last entry the way qemu-img map does.
pub fn push_merged(v: &mut Vec<MapEntry>, e: MapEntry) {
    if let Some(last) = v.last_mut() {
        let contiguous = match (last.offset, e.offset) {
            (Some(a), Some(b)) => a + last.length == b,
            (None, None) => true,
            _ => false,
        };
        if last.start + last.length == e.start
            && last.depth == e.depth
            && last.present == e.present
            && last.zero == e.zero
            && last.data == e.data
            && last.compressed == e.compressed
            && contiguous
        {
            last.length += e.length;
            return;
        }
    }
    v.push(e);
}
