//! Helpers for the `cli_*` tests: running `instar` and the reference qemu tools. Scratch
//! directories, the skip rules and the qemu-io lock holder come from `instar-testkit`.
//!
//! - Tools: qemu-img/qemu-io 10.2 from `QEMU_IMG_10_2` or `../shared/scripts/qemu-ref.sh
//!   --list` (`instar_testkit::qemu_ref`); `qemu-nbd` from `PATH`. Missing tools skip a
//!   test with a note, or fail it when `INSTAR_REQUIRE_QEMU=1`.
//! - Tests that run the sandbox skip without a usable `/dev/kvm`, or fail when
//!   `INSTAR_REQUIRE_KVM=1`.

#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};

use instar_testkit::qemu_ref;

pub const INSTAR: &str = env!("CARGO_BIN_EXE_instar");

pub use instar_testkit::{require_kvm, LockHolder, Scratch};

/// qemu-img and qemu-io of QEMU 10.2.
pub use qemu_ref::Build as Qemu;

/// The 10.2 reference tools, or `None` (test skipped; a failure under
/// `INSTAR_REQUIRE_QEMU=1`).
pub fn qemu() -> Option<Qemu> {
    qemu_ref::need(qemu_ref::REFERENCE)
}

pub use qemu_ref::qemu_nbd;

/// A command's outcome as text, and running a command in a directory (no standard
/// input, `LC_ALL=C`).
pub use instar_testkit::{run_in as run, Outcome as Run};

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
