//! The real binary under real process death and real concurrency (the crash tests stop
//! the VM after write k in-process; these kill the whole `instar` process):
//!
//! - SIGKILL at seeded moments spread over a large safe rebase: the overlay passes
//!   `qemu-img check` (clean or leaks only) and reads exactly as before the rebase, or,
//!   if the kill came after the rebase finished, as after it.
//! - Eight safe rebases at once over one old and one new backing (shared read locks):
//!   every one succeeds, byte-identical to qemu-img 10.2's result on a copy.
//! - Two rebases racing on one overlay: each exits 0 or 1 (a lock conflict), never
//!   anything else, and the overlay ends byte-identical to one rebase's result.

mod cli_support;

use cli_support::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// old.qcow2 (data everywhere), new.qcow2 (differs in every fourth MiB), and ov.qcow2
/// over old.qcow2 with some data of its own: a safe rebase onto new.qcow2 copies a
/// quarter of the disk.
fn fixture(q: &Qemu, dir: &Path, size_mib: u64, overlays: &[&str]) {
    let size = format!("{size_mib}M");
    create(q, dir, "qcow2", "old.qcow2", &size, &[]);
    create(q, dir, "qcow2", "new.qcow2", &size, &[]);
    let mut old = vec![format!("write -P 0x11 0 {size}")];
    let mut new = vec![format!("write -P 0x11 0 {size}")];
    for mib in (0..size_mib).step_by(4) {
        new.push(format!("write -P 0x22 {mib}M 1M"));
    }
    old.push(String::from("write -P 0x33 1M 64k"));
    qemu_io(q, dir, "old.qcow2", &old);
    qemu_io(q, dir, "new.qcow2", &new);
    for ov in overlays {
        create(
            q,
            dir,
            "qcow2",
            ov,
            &size,
            &["-b", "old.qcow2", "-F", "qcow2"],
        );
        qemu_io(q, dir, ov, &[String::from("write -P 0x44 2M 128k")]);
    }
}

fn qemu_io(q: &Qemu, dir: &Path, image: &str, cmds: &[String]) {
    let mut a: Vec<&str> = Vec::new();
    for c in cmds {
        a.extend_from_slice(&["-c", c]);
    }
    a.push(image);
    let r = run(&q.io, &a, dir);
    assert_eq!(r.status, 0, "qemu-io {image}: {}", r.stderr);
}

/// The guest-visible content of `image` over its chain.
fn content(q: &Qemu, dir: &Path, image: &str) -> Vec<u8> {
    let out = format!("{image}.content");
    let r = run(&q.img, &["convert", "-U", "-O", "raw", image, &out], dir);
    assert_eq!(r.status, 0, "convert {image}: {}", r.stderr);
    let data = std::fs::read(dir.join(&out)).expect("read content");
    std::fs::remove_file(dir.join(&out)).expect("remove content");
    data
}

/// `qemu-img check`: clean or leaks only.
fn check_ok(q: &Qemu, dir: &Path, image: &str) -> Result<(), String> {
    let r = run(&q.img, &["check", image], dir);
    match r.status {
        0 => Ok(()),
        3 if !r.stdout.contains("ERROR") && !r.stderr.contains("ERROR") => Ok(()),
        s => Err(format!("check {image}: exit {s}\n{}{}", r.stdout, r.stderr)),
    }
}

const SAFE: [&str; 5] = ["rebase", "-b", "new.qcow2", "-F", "qcow2"];

/// A small seeded generator (splitmix64): the same moments on every run.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn sigkill_at_random_moments_of_a_large_safe_rebase() {
    let test = "SIGKILL during a safe rebase";
    if !kvm(test) {
        return;
    }
    let Some(q) = qemu(test) else { return };
    let scratch = Scratch::new("stress-kill");
    let dir = &scratch.0;
    fixture(&q, dir, 256, &["ov.qcow2"]);
    std::fs::copy(dir.join("ov.qcow2"), dir.join("orig.qcow2")).expect("copy");
    let before = content(&q, dir, "ov.qcow2");

    // One full run to learn how long a rebase takes, and what it yields.
    let start = Instant::now();
    let r = run(Path::new(INSTAR), &[&SAFE[..], &["ov.qcow2"]].concat(), dir);
    let full = start.elapsed();
    assert_eq!(r.status, 0, "full run: {}", r.stderr);
    let after = content(&q, dir, "ov.qcow2");

    let mut seed = 0x5eed_u64;
    let mut killed_midway = 0;
    for round in 0..12 {
        std::fs::copy(dir.join("orig.qcow2"), dir.join("ov.qcow2")).expect("restore");
        // Moments spread over the whole run (and a little past it).
        let at = full.mul_f64((next(&mut seed) % 1100) as f64 / 1000.0);
        let mut child = Command::new(INSTAR)
            .args(SAFE)
            .arg("ov.qcow2")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn instar");
        std::thread::sleep(at);
        let _ = child.kill();
        let status = child.wait().expect("wait");
        if status.code().is_none() {
            killed_midway += 1;
        }
        check_ok(&q, dir, "ov.qcow2").unwrap_or_else(|e| panic!("round {round} at {at:?}: {e}"));
        let now = content(&q, dir, "ov.qcow2");
        assert!(
            now == before || (status.success() && now == after),
            "round {round}: killed at {at:?} ({status}): content changed"
        );
    }
    assert!(
        killed_midway >= 6,
        "only {killed_midway} of 12 kills landed during a run of {full:?}"
    );
}

#[test]
fn eight_concurrent_safe_rebases_over_one_backing() {
    let test = "eight concurrent safe rebases";
    if !kvm(test) {
        return;
    }
    let Some(q) = qemu(test) else { return };
    let scratch = Scratch::new("stress-eight");
    let dir = &scratch.0;
    let names: Vec<String> = (0..8).map(|i| format!("ov{i}.qcow2")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    fixture(&q, dir, 32, &refs);
    // qemu-img's result on a copy of the first (all eight start identical).
    std::fs::copy(dir.join("ov0.qcow2"), dir.join("q.qcow2")).expect("copy");
    let r = run(&q.img, &[&SAFE[..], &["q.qcow2"]].concat(), dir);
    assert_eq!(r.status, 0, "qemu-img: {}", r.stderr);
    let want = std::fs::read(dir.join("q.qcow2")).expect("read q");

    // All eight started before any is waited for, so that they overlap.
    let children: Vec<_> = names
        .iter()
        .map(|n| {
            Command::new(INSTAR)
                .args(SAFE)
                .arg(n)
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn instar")
        })
        .collect();
    for (n, child) in names.iter().zip(children) {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{n}: {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for n in &names {
        assert_eq!(
            std::fs::read(dir.join(n)).expect("read"),
            want,
            "{n} differs"
        );
    }
}

#[test]
fn two_rebases_racing_on_one_overlay() {
    let test = "two rebases racing on one overlay";
    if !kvm(test) {
        return;
    }
    let Some(q) = qemu(test) else { return };
    let scratch = Scratch::new("stress-race");
    let dir = &scratch.0;
    fixture(&q, dir, 64, &["ov.qcow2"]);
    std::fs::copy(dir.join("ov.qcow2"), dir.join("orig.qcow2")).expect("copy");
    std::fs::copy(dir.join("ov.qcow2"), dir.join("q.qcow2")).expect("copy");
    let r = run(&q.img, &[&SAFE[..], &["q.qcow2"]].concat(), dir);
    assert_eq!(r.status, 0, "qemu-img: {}", r.stderr);
    let want = std::fs::read(dir.join("q.qcow2")).expect("read q");

    for round in 0..4 {
        std::fs::copy(dir.join("orig.qcow2"), dir.join("ov.qcow2")).expect("restore");
        let spawn = || {
            Command::new(INSTAR)
                .args(SAFE)
                .arg("ov.qcow2")
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn instar")
        };
        let a = spawn();
        // The second starts while the first runs (or, in later rounds, a moment later).
        std::thread::sleep(Duration::from_millis(5 * round));
        let b = spawn();
        let mut ok = 0;
        for child in [a, b] {
            let out = child.wait_with_output().expect("wait");
            let err = String::from_utf8_lossy(&out.stderr);
            match out.status.code() {
                Some(0) => ok += 1,
                Some(1) => assert!(
                    err.contains("Failed to get \"write\" lock")
                        || err.contains("Failed to get shared \"write\" lock"),
                    "round {round}: a refusal other than the lock: {err}"
                ),
                other => panic!("round {round}: exit {other:?}: {err}"),
            }
        }
        assert!(ok >= 1, "round {round}: neither rebase succeeded");
        check_ok(&q, dir, "ov.qcow2").unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(
            std::fs::read(dir.join("ov.qcow2")).expect("read ov"),
            want,
            "round {round}: the overlay differs from one rebase's result"
        );
    }
}
