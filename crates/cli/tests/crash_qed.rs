//! Crash consistency of safe-mode rebase of qed overlays: the sandbox is stopped right
//! after its k-th write (the VMM's test-only `stop_after_writes`), for every k from 0 to
//! the number of writes of a full run. After each stop the overlay must pass
//! `qemu-img check` (leaked clusters allowed: data written before its table entry) and
//! read exactly as before (`qemu-img compare` with a copy of the original overlay).
//!
//! Without /dev/kvm or qemu-img 10.2 the tests print a note and pass, unless
//! INSTAR_REQUIRE_KVM=1 / INSTAR_REQUIRE_QEMU=1.

mod qemu;
mod stopping_guest;

use std::fs;
use std::path::Path;

use instar_testkit::{require_kvm, serial};
use qemu::{Fx, Qemu, Scratch};
use stopping_guest::{rebase, stopping_at, StoppingGuest};

/// `qemu-img check`: clean, or leaked clusters only.
fn check(q: &Qemu, dir: &Path) -> Result<&'static str, String> {
    let out = qemu::run(&q.img, &["check", "-f", "qed", "ovl.qed"], dir);
    let text = format!("{}{}", out.stdout, out.stderr);
    match out.status {
        0 => Ok("clean"),
        3 if text.contains("leaked clusters") && !text.contains("errors were found") => Ok("leaks"),
        s => Err(format!("qemu-img check: exit {s}\n{text}")),
    }
}

fn same_content(q: &Qemu, dir: &Path) -> Result<(), String> {
    let out = qemu::run(
        &q.img,
        &["compare", "-f", "qed", "-F", "qed", "orig.qed", "ovl.qed"],
        dir,
    );
    if out.status == 0 {
        Ok(())
    } else {
        Err(format!(
            "qemu-img compare: exit {}\n{}{}",
            out.status, out.stdout, out.stderr
        ))
    }
}

const ARGS: [&str; 4] = ["-b", "new.qcow2", "-F", "qcow2"];

/// Build old.raw, new.qcow2 and ovl.qed with `build`, run the rebase in full, then once
/// per k in 0..=n with a stop after write k.
fn crash_every_write(name: &str, build: &dyn Fn(&Fx)) {
    let _serial = serial();
    if !require_kvm() {
        return;
    }
    let Some(refs) = qemu::refs() else { return };
    let q = &refs.v10_2;
    let scratch = Scratch::new(&format!("crash-qed-{name}"));
    let fx = Fx::new(scratch.fixture(), q);
    build(&fx);
    fs::copy(fx.path("ovl.qed"), fx.path("orig.qed")).expect("copy the overlay");
    let original = fx.read("ovl.qed");

    let dir = scratch.copy("full");
    let (status, guest) = rebase(&ARGS, &dir.join("ovl.qed"), StoppingGuest::default());
    assert_eq!(status, 0, "{name}: the full rebase failed");
    let writing: Vec<u64> = guest.writes.iter().copied().filter(|&w| w > 0).collect();
    assert_eq!(
        writing.len(),
        1,
        "{name}: one VM must write ({:?})",
        guest.writes
    );
    let n = writing[0];
    assert_eq!(check(q, &dir), Ok("clean"), "{name}");
    same_content(q, &dir).unwrap_or_else(|e| panic!("{name}: {e}"));

    let dir = scratch.copy("crash");
    let work = dir.join("ovl.qed");
    let mut failures = Vec::new();
    let (mut clean, mut leaks) = (0, 0);
    for k in 0..=n {
        fs::write(&work, &original).expect("reset the overlay");
        let (status, guest) = rebase(&ARGS, &work, stopping_at(k));
        if status != 1 || guest.stopped != Some(k) {
            failures.push(format!(
                "k={k}: expected a stop after {k} writes, got exit {status}, stopped {:?}",
                guest.stopped
            ));
            continue;
        }
        if k == 0 && fs::read(&work).expect("read") != original {
            failures.push("k=0: the overlay changed without any write".into());
        }
        match check(q, &dir) {
            Ok("clean") => clean += 1,
            Ok(_) => leaks += 1,
            Err(e) => failures.push(format!("k={k}: {e}")),
        }
        if let Err(e) = same_content(q, &dir) {
            failures.push(format!("k={k}: {e}"));
        }
    }
    eprintln!("{name}: {n} writes; {clean} clean stops, {leaks} with leaks");
    assert!(
        failures.is_empty(),
        "{name}: {} of {} stop points fail:\n{}",
        failures.len(),
        n + 1,
        failures.join("\n")
    );
}

fn backings(fx: &Fx, old: bool) {
    if old {
        fx.create("raw", "old.raw", "8M", &[]);
        fx.io(
            "raw",
            "old.raw",
            &["write -P 0x11 0 3M", "write -P 0x12 5M 64k"],
        );
    }
    fx.create("qcow2", "new.qcow2", "8M", &[]);
    fx.io(
        "qcow2",
        "new.qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x21 2M 2M",
            "write -P 0x22 7M 64k",
        ],
    );
}

fn overlay(fx: &Fx, old: bool, opts: &str) {
    backings(fx, old);
    let mut o = vec!["-o", opts];
    if old {
        o.extend_from_slice(&["-b", "old.raw", "-F", "raw"]);
    }
    fx.create("qed", "ovl.qed", "8M", &o);
    fx.io(
        "qed",
        "ovl.qed",
        &["write -P 0x33 512k 8k", "write -z 6M 64k"],
    );
}

#[test]
fn crash_qed_64k_clusters() {
    crash_every_write("64k", &|fx| overlay(fx, true, "cluster_size=65536"));
}

#[test]
fn crash_qed_small_tables() {
    crash_every_write("4k-t2", &|fx| {
        overlay(fx, true, "cluster_size=4096,table_size=2")
    });
}

#[test]
fn crash_qed_without_old_backing() {
    crash_every_write("no-old", &|fx| overlay(fx, false, "cluster_size=65536"));
}
