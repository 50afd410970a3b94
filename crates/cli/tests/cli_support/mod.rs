//! Helpers for the `cli_*` tests: running `instar` and the reference qemu tools, scratch
//! directories, and the skip rules.
//!
//! - Tools: qemu-img/qemu-io 10.2 from `QEMU_IMG_10_2` or `../shared/scripts/qemu-ref.sh
//!   --list` (`instar_testkit::qemu_ref`); `qemu-nbd` from `PATH`. Missing tools skip a test with a note, or fail it
//!   when `INSTAR_REQUIRE_QEMU=1`.
//! - Tests that run the sandbox skip without a usable `/dev/kvm`, or fail when
//!   `INSTAR_REQUIRE_KVM=1`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};

use instar_testkit::qemu_ref;

pub const INSTAR: &str = env!("CARGO_BIN_EXE_instar");

fn required(var: &str) -> bool {
    std::env::var(var).map(|v| v == "1").unwrap_or(false)
}

/// Skip (return false) or fail when a requirement is missing.
fn need(ok: bool, var: &str, what: &str, test: &str) -> bool {
    if ok {
        return true;
    }
    if required(var) {
        panic!("{test}: {what} ({var}=1)");
    }
    eprintln!("skipping {test}: {what}");
    false
}

/// Whether the sandbox can run here; otherwise skip `test` (or fail under
/// `INSTAR_REQUIRE_KVM=1`).
pub fn kvm(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    need(ok, "INSTAR_REQUIRE_KVM", "no usable /dev/kvm", test)
}

/// qemu-img and qemu-io of QEMU 10.2.
pub struct Qemu {
    pub img: PathBuf,
    pub io: PathBuf,
}

/// The 10.2 reference tools, or `None` (test skipped).
pub fn qemu(test: &str) -> Option<Qemu> {
    let found = qemu_ref::find(qemu_ref::REFERENCE).map(|b| Qemu {
        img: b.img,
        io: b.io,
    });
    if need(
        found.is_some(),
        "INSTAR_REQUIRE_QEMU",
        "qemu-img 10.2 not found",
        test,
    ) {
        found
    } else {
        None
    }
}

/// `qemu-nbd` from PATH, or `None` (test skipped).
pub fn qemu_nbd(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("qemu-nbd"))
            .find(|c| c.exists())
    });
    if need(
        found.is_some(),
        "INSTAR_REQUIRE_QEMU",
        "qemu-nbd not found",
        test,
    ) {
        found
    } else {
        None
    }
}

/// A command's outcome as text.
#[derive(Debug)]
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            status: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Run `prog args…` in `cwd` with no standard input.
pub fn run(prog: &Path, args: &[&str], cwd: &Path) -> Run {
    Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", prog.display()))
        .into()
}

/// Run `instar args…` in `cwd`.
pub fn instar(args: &[&str], cwd: &Path) -> Run {
    run(Path::new(INSTAR), args, cwd)
}

/// qemu-img's stderr with its prefixes turned into instar's: `<argv0> rebase: ` (getopt)
/// and `qemu-img: ` become `instar rebase: ` and `instar: `, and the Try line names
/// `instar rebase`.
pub fn as_instar(text: &str, argv0: &Path) -> String {
    let full = argv0.to_string_lossy();
    text.replace(&format!("{full} rebase"), "instar rebase")
        .replace("qemu-img: ", "instar: ")
}

/// A fresh directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("instar-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `qemu-img create -f FMT NAME SIZE [opts]` in `dir`.
pub fn create(q: &Qemu, dir: &Path, fmt: &str, name: &str, size: &str, opts: &[&str]) {
    let mut a = vec!["create", "-q", "-f", fmt];
    a.extend_from_slice(opts);
    a.extend_from_slice(&[name, size]);
    let r = run(&q.img, &a, dir);
    assert_eq!(r.status, 0, "qemu-img create {name}: {}", r.stderr);
}

/// `qemu-img info --output=json` as a JSON value.
pub fn info(q: &Qemu, dir: &Path, name: &str) -> serde_json::Value {
    let r = run(&q.img, &["info", "-U", "--output=json", name], dir);
    assert_eq!(r.status, 0, "qemu-img info {name}: {}", r.stderr);
    serde_json::from_str(&r.stdout).expect("info JSON")
}

/// A qemu-io process keeping an image open (and locked) until dropped.
pub struct QemuIo {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl QemuIo {
    pub fn open(q: &Qemu, dir: &Path, image: &str, read_only: bool) -> QemuIo {
        let mut cmd = Command::new(&q.io);
        if read_only {
            cmd.arg("-r");
        }
        let mut child = cmd
            .args(["-f", "qcow2", image])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-io");
        let mut stdin = child.stdin.take().expect("stdin");
        // qemu-io opens the image before reading commands: an answer proves the locks.
        stdin.write_all(b"length\n").expect("write");
        stdin.flush().expect("flush");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        assert!(!line.is_empty(), "qemu-io could not open {image}");
        QemuIo {
            child,
            stdin: Some(stdin),
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"quit\n");
        }
        let _ = self.child.wait();
    }
}
