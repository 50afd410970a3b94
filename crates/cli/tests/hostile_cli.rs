//! The whole `instar rebase` flow against a hostile guest: the probes run the real
//! guest, the rebase call a hand-built one (`SandboxGuest::with_rebase_guest`) that
//! floods the host, attacks virtio-blk, reports maximal progress or answers with
//! terminal escapes; or the probes run a hand-built guest (`with_probe_guest`). Each case
//! runs `instar::cli::run` in a child process of this test binary, so that its exit
//! status, stdout and stderr (and the number of VMs it started) are seen as a user would.
//!
//! Needs /dev/kvm and qemu-img (skips with a note unless INSTAR_REQUIRE_KVM=1 /
//! INSTAR_REQUIRE_QEMU=1).

#[path = "../../vmm/tests/hostile/asm.rs"]
#[allow(dead_code)]
mod asm;
mod cli_support;

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use asm::*;
use cli_support::{create, qemu, require_kvm, Scratch};
use instar::guest::{Device, RunError};
use instar::sandbox::Options;
use instar::sandbox_guest::SandboxGuest;
use instar_abi::{Call, ErrorKind, GuestError, RebaseOutcome, Response};

const CHILD: &str = "INSTAR_HOSTILE_CLI_CHILD";
const DIR: &str = "INSTAR_HOSTILE_CLI_DIR";

/// The child's guest: the real sandbox (with its hostile call), counting the VMs.
struct Counting {
    inner: SandboxGuest,
    vms: usize,
}

impl instar::guest::Guest for Counting {
    fn run(
        &mut self,
        call: &Call,
        devices: &[Device<'_>],
        on_progress: &mut (dyn FnMut(u32) + Send),
    ) -> Result<Response, RunError> {
        self.vms += 1;
        self.inner.run(call, devices, on_progress)
    }
}

/// What a child run printed.
struct Seen {
    stdout: String,
    stderr: String,
}

/// In the child (`name` set in the environment): run `instar rebase ARGS` in the
/// scratch directory with `guest` built by `make`, print its status, the VMs it
/// started, whether the
/// overlay is as it was (`ovl.orig`), the directory's files, and the status of a real
/// rebase of the overlay run next in the same process (which needs every lock of the
/// first run released). In the parent: save `ovl.orig`, start the child in `dir` and
/// return what it printed.
fn in_child(
    name: &str,
    dir: &Path,
    make: impl FnOnce() -> SandboxGuest,
    args: &[&str],
) -> Option<Seen> {
    if std::env::var(CHILD).as_deref() == Ok(name) {
        let dir = std::env::var_os(DIR).unwrap();
        std::env::set_current_dir(dir).unwrap();
        let mut guest = Counting {
            inner: make(),
            vms: 0,
        };
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let status = instar::cli::run(&args, &mut guest);
        eprintln!("CHILD-STATUS {status}");
        eprintln!("CHILD-VMS {}", guest.vms);
        let unchanged = std::fs::read("ovl.qcow2").unwrap() == std::fs::read("ovl.orig").unwrap();
        eprintln!("CHILD-UNCHANGED {unchanged}");
        let mut files: Vec<String> = std::fs::read_dir(".")
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        eprintln!("CHILD-FILES {}", files.join(","));
        let real: Vec<OsString> = ["rebase", "-q", "-b", "base.raw", "-F", "raw", "ovl.qcow2"]
            .iter()
            .map(OsString::from)
            .collect();
        let second = instar::cli::run(&real, &mut SandboxGuest::default());
        eprintln!("CHILD-SECOND {second}");
        return None;
    }
    std::fs::copy(dir.join("ovl.qcow2"), dir.join("ovl.orig")).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .env(DIR, dir)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let seen = Seen {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_eq!(
        out.status.signal(),
        None,
        "killed by a signal:\n{}\n{}",
        seen.stdout,
        seen.stderr
    );
    assert!(out.status.success(), "{}\n{}", seen.stdout, seen.stderr);
    Some(seen)
}

/// The status `instar::cli::run` returned in the child, and its stderr before that.
fn status(seen: &Seen) -> (i32, String) {
    let (before, after) = seen
        .stderr
        .split_once("CHILD-STATUS ")
        .unwrap_or_else(|| panic!("no status in:\n{}\n{}", seen.stdout, seen.stderr));
    let status = after.split_whitespace().next().unwrap().parse().unwrap();
    (status, before.to_string())
}

/// An overlay of `size` (no backing file) and a raw base of 1 MiB.
fn images(name: &str, size: &str) -> Option<Scratch> {
    if !require_kvm() {
        return None;
    }
    let q = qemu()?;
    let dir = Scratch::new(name);
    create(&q, &dir.0, "qcow2", "ovl.qcow2", size, &[]);
    std::fs::write(dir.path("base.raw"), vec![0x5a; 1 << 20]).unwrap();
    Some(dir)
}

fn options(deadline: Option<Duration>) -> Options {
    Options {
        deadline,
        ..Options::default()
    }
}

/// The value the child printed after `key`.
fn field<'s>(seen: &'s Seen, key: &str) -> &'s str {
    seen.stderr
        .split_once(&format!("{key} "))
        .and_then(|(_, rest)| rest.lines().next())
        .unwrap_or_else(|| {
            panic!(
                "no {key} in:
{}",
                seen.stderr
            )
        })
}

/// After the hostile run: the overlay as it was, no other file in the directory, and
/// the real rebase that followed in the same process worked (every lock released).
fn unchanged_and_unlocked(seen: &Seen) {
    assert_eq!(field(seen, "CHILD-UNCHANGED"), "true");
    assert_eq!(field(seen, "CHILD-FILES"), "base.raw,ovl.orig,ovl.qcow2");
    assert_eq!(field(seen, "CHILD-SECOND"), "0", "{}", seen.stderr);
}

#[test]
fn an_exit_flood_ends_at_the_deadline() {
    let name = "an_exit_flood_ends_at_the_deadline";
    let in_parent = std::env::var(CHILD).is_err();
    let dir = if in_parent { images(name, "64M") } else { None };
    if in_parent && dir.is_none() {
        return;
    }
    let here = dir
        .as_ref()
        .map_or_else(|| Path::new(".").to_path_buf(), |d| d.0.clone());
    let make = || {
        let mut g = Guest::default();
        g.forever(|g| g.ring(DOORBELL_PROGRESS, 1));
        SandboxGuest::with_rebase_guest(options(Some(Duration::from_secs(1))), g.elf())
    };
    let args = ["rebase", "-b", "base.raw", "-F", "raw", "ovl.qcow2"];
    let Some(seen) = in_child(name, &here, make, &args) else {
        return;
    };
    let (status, stderr) = status(&seen);
    assert_eq!(status, 1);
    assert_eq!(
        stderr.trim_end(),
        "instar: internal error in sandbox: the guest did not finish within its deadline of 1 s"
    );
    unchanged_and_unlocked(&seen);
}

/// `-u` with `-F` tries the change in one VM; a guest the watchdog stops there ends the
/// command with the watchdog's message, without the probe VM and the second rebase VM
/// of the full path.
#[test]
fn unsafe_mode_ends_at_the_first_watchdog_stop() {
    let name = "unsafe_mode_ends_at_the_first_watchdog_stop";
    let in_parent = std::env::var(CHILD).is_err();
    let dir = if in_parent { images(name, "64M") } else { None };
    if in_parent && dir.is_none() {
        return;
    }
    let here = dir
        .as_ref()
        .map_or_else(|| Path::new(".").to_path_buf(), |d| d.0.clone());
    let make = || {
        let mut g = Guest::default();
        // A spin without VM exits: only the watchdog ends it.
        g.forever(|_| {});
        let options = Options {
            watchdog: Duration::from_secs(1),
            ..Options::default()
        };
        SandboxGuest::with_rebase_guest(options, g.elf())
    };
    let args = ["rebase", "-u", "-b", "base.raw", "-F", "raw", "ovl.qcow2"];
    let Some(seen) = in_child(name, &here, make, &args) else {
        return;
    };
    let (status, stderr) = status(&seen);
    assert_eq!(status, 1);
    assert_eq!(
        stderr.trim_end(),
        "instar: internal error in sandbox: the guest made no progress for 1s"
    );
    assert_eq!(field(&seen, "CHILD-VMS"), "1");
    unchanged_and_unlocked(&seen);
}

/// A probe VM stopped at its deadline ends the command with that message: no other VM
/// starts.
#[test]
fn a_probe_stopped_at_its_deadline_ends_the_command() {
    let name = "a_probe_stopped_at_its_deadline_ends_the_command";
    let in_parent = std::env::var(CHILD).is_err();
    let dir = if in_parent { images(name, "64M") } else { None };
    if in_parent && dir.is_none() {
        return;
    }
    let here = dir
        .as_ref()
        .map_or_else(|| Path::new(".").to_path_buf(), |d| d.0.clone());
    let make = || {
        let mut g = Guest::default();
        g.forever(|g| g.ring(DOORBELL_PROGRESS, 1));
        SandboxGuest::with_probe_guest(options(Some(Duration::from_secs(1))), g.elf())
    };
    let args = ["rebase", "-b", "base.raw", "-F", "raw", "ovl.qcow2"];
    let Some(seen) = in_child(name, &here, make, &args) else {
        return;
    };
    let (status, stderr) = status(&seen);
    assert_eq!(status, 1);
    assert_eq!(
        stderr.trim_end(),
        "instar: internal error in sandbox: the guest did not finish within its deadline of 1 s"
    );
    assert_eq!(field(&seen, "CHILD-VMS"), "1");
    unchanged_and_unlocked(&seen);
}

#[test]
fn an_indirect_table_attack_then_escapes_in_the_answer() {
    let name = "an_indirect_table_attack_then_escapes_in_the_answer";
    let in_parent = std::env::var(CHILD).is_err();
    let dir = if in_parent { images(name, "64M") } else { None };
    if in_parent && dir.is_none() {
        return;
    }
    let here = dir
        .as_ref()
        .map_or_else(|| Path::new(".").to_path_buf(), |d| d.0.clone());
    let make = || {
        let mut g = Guest::default();
        g.put(STATUS, &[0xff]);
        g.header(HDR, T_IN, 0);
        g.desc(DESC, 0, IND, 65_535 * 16, F_INDIRECT, 0);
        g.desc(IND, 0, HDR, 16, F_NEXT, 1);
        for i in 1..65_534u32 {
            g.desc(IND, i, BUF, 512, F_NEXT | F_WRITE, (i + 1) as u16);
        }
        g.desc(IND, 65_534, STATUS, 1, F_WRITE, 0);
        g.avail(0, 0);
        g.avail_idx(1);
        g.setup_queue();
        g.notify();
        g.respond(&Response::Error(GuestError {
            kind: ErrorKind::Plain,
            message: "\x1b]0;owned\x07\x1b[2J\r\ninstar: forged line\x1b[0m".into(),
        }));
        SandboxGuest::with_rebase_guest(options(None), g.elf())
    };
    let args = ["rebase", "-b", "base.raw", "-F", "raw", "ovl.qcow2"];
    let Some(seen) = in_child(name, &here, make, &args) else {
        return;
    };
    let (status, stderr) = status(&seen);
    assert_eq!(status, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(stderr.starts_with("instar: "), "{stderr:?}");
    assert!(stderr.contains("forged line"), "{stderr:?}");
    assert!(
        !stderr.trim_end().contains(['\x1b', '\x07', '\r']),
        "raw control bytes: {stderr:?}"
    );
    unchanged_and_unlocked(&seen);
}

#[test]
fn maximal_progress_prints_no_more_than_qemu_img_could() {
    let name = "maximal_progress_prints_no_more_than_qemu_img_could";
    let in_parent = std::env::var(CHILD).is_err();
    let dir = if in_parent { images(name, "1T") } else { None };
    if in_parent && dir.is_none() {
        return;
    }
    let here = dir
        .as_ref()
        .map_or_else(|| Path::new(".").to_path_buf(), |d| d.0.clone());
    let make = || {
        let mut g = Guest::default();
        g.ring(DOORBELL_PROGRESS, u32::MAX);
        g.respond(&Response::Rebase(RebaseOutcome::default()));
        SandboxGuest::with_rebase_guest(options(None), g.elf())
    };
    let args = ["rebase", "-p", "-b", "base.raw", "-F", "raw", "ovl.qcow2"];
    let Some(seen) = in_child(name, &here, make, &args) else {
        return;
    };
    let (status, stderr) = status(&seen);
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(field(&seen, "CHILD-UNCHANGED"), "true");
    assert_eq!(field(&seen, "CHILD-SECOND"), "0", "{}", seen.stderr);
    let dir = dir.unwrap();
    let files = std::fs::metadata(dir.path("ovl.qcow2")).unwrap().len()
        + std::fs::metadata(dir.path("base.raw")).unwrap().len();
    let bound = instar::progress::max_steps(1 << 40, files);
    let hundreds = seen.stdout.matches("(100.00/100%)").count() as u64;
    // 2^19 steps reach 100%; every later one prints it again, up to the bound (and the
    // final 100% of the frame).
    assert!(hundreds > 1000, "{hundreds}");
    assert!(hundreds <= bound + 1, "{hundreds} > {bound}");
    // Without the files' bound the guest would have had 2^31 of them.
    assert!(bound < 1 << 24, "{bound}");
}

/// The real binary with a deadline too short for any VM: the clear error, exit 1, the
/// overlay unchanged; and bad values are refused before anything is opened.
#[test]
fn the_binary_honours_instar_deadline_secs() {
    let name = "the_binary_honours_instar_deadline_secs";
    let Some(dir) = images(name, "64M") else {
        return;
    };
    let before = std::fs::read(dir.path("ovl.qcow2")).unwrap();
    let args = ["rebase", "-b", "base.raw", "-F", "raw", "ovl.qcow2"];
    let out = std::process::Command::new(cli_support::INSTAR)
        .args(args)
        .current_dir(&dir.0)
        .env("INSTAR_DEADLINE_SECS", "0.000001")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "instar: internal error in sandbox: the guest did not finish within its deadline of \
         0.000001 s\n"
    );
    assert_eq!(std::fs::read(dir.path("ovl.qcow2")).unwrap(), before);
    for bad in ["0", "-1", "nan", "inf", "2592001", "x"] {
        let out = std::process::Command::new(cli_support::INSTAR)
            .args(args)
            .current_dir(&dir.0)
            .env("INSTAR_DEADLINE_SECS", bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{bad}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "instar: Invalid INSTAR_DEADLINE_SECS value '{bad}': expected seconds, more \
                 than 0 and at most 2592000\n"
            )
        );
    }
    assert_eq!(std::fs::read(dir.path("ovl.qcow2")).unwrap(), before);
    let r = cli_support::instar(&args, &dir.0);
    assert_eq!(r.status, 0, "{}", r.stderr);
}
