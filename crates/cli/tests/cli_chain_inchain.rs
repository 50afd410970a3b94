//! QEMU's in-chain decision (`bdrv_find_backing_image`): whether `qemu-img rebase` reuses
//! an image of the old chain as the new backing, compared with instar's
//! [`instar::chain::find_backing_image`] case by case. No sandbox is needed.
//!
//! QEMU's decision is read from the reference qemu-img 10.2 itself, with
//! `--trace bdrv_open_common`: when the optimisation is used, the new backing is not
//! opened again, so the number of format-node opens is exactly the chain length; when it
//! is not, the new backing (and its own chain) are opened as well. Example (chain
//! top → mid → base in `s/`), run from the parent directory with `-b base.qcow2`:
//! `s/top.qcow2`, `s/mid.qcow2`, `s/base.qcow2`, then `s/base.qcow2` again (not reused,
//! because QEMU looks for `s/s/base.qcow2`); run from inside `s/` the last open is absent.
//!
//! The decision depends on the current directory, so this file holds a single test that
//! changes it (test binaries are separate processes).

mod cli_support;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::Path;

use cli_support::*;
use instar::chain::{find_backing_image, Link};
use instar::paths::{combine, resolve_backing};

/// The chain `s/top.qcow2 → mid.qcow2 → base.qcow2` (names recorded relative), plus a
/// symlink `s/base-link.qcow2 → base.qcow2` and a decoy `base.qcow2` next to `s/`.
fn fixture(q: &Qemu, dir: &Path) {
    let s = dir.join("s");
    std::fs::create_dir_all(s.join("x")).unwrap();
    create(q, &s, "qcow2", "base.qcow2", "1M", &[]);
    create(
        q,
        &s,
        "qcow2",
        "mid.qcow2",
        "1M",
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
    create(
        q,
        &s,
        "qcow2",
        "top.qcow2",
        "1M",
        &["-b", "mid.qcow2", "-F", "qcow2"],
    );
    create(q, dir, "qcow2", "base.qcow2", "1M", &[]);
    symlink("base.qcow2", s.join("base-link.qcow2")).unwrap();
}

/// QEMU's decision: the index in the old chain of the reused image, if any.
fn qemu_decision(q: &Qemu, cwd: &Path, overlay: &str, backing: &str) -> Option<usize> {
    let r = run(
        &q.img,
        &[
            "--trace",
            "bdrv_open_common",
            "rebase",
            "-b",
            backing,
            "-F",
            "qcow2",
            overlay,
        ],
        cwd,
    );
    assert_eq!(r.status, 0, "qemu-img rebase: {}", r.stderr);
    let formats: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("bdrv_open_common") && !l.contains("format_name \"file\""))
        .collect();
    // top, mid, base: three format nodes when the new backing is reused; otherwise the
    // new backing and its own chain are opened as well.
    assert!(formats.len() >= 3, "{formats:#?}");
    if formats.len() > 3 {
        return None;
    }
    // Reused: which one is the -b image (its realpath equals one of the chain's).
    let target = std::fs::canonicalize(cwd.join(OsStr::from_bytes(&combine(
        overlay.as_bytes(),
        backing.as_bytes(),
    ))))
    .ok()?;
    let s = std::fs::canonicalize(cwd.join(Path::new(overlay)).parent()?).ok()?;
    ["mid.qcow2", "base.qcow2"]
        .iter()
        .position(|n| s.join(n) == target)
}

/// instar's decision for the same chain.
fn instar_decision(overlay: &str, backing: &str) -> Option<usize> {
    let mid = combine(overlay.as_bytes(), b"mid.qcow2");
    let base = combine(&mid, b"base.qcow2");
    let links = [
        Link {
            filename: overlay.as_bytes().to_vec(),
            backing: Some(b"mid.qcow2".to_vec()),
        },
        Link {
            filename: mid,
            backing: Some(b"base.qcow2".to_vec()),
        },
        Link {
            filename: base,
            backing: None,
        },
    ];
    let target = resolve_backing(OsStr::new(overlay), OsStr::new(backing)).unwrap();
    find_backing_image(&links, target.as_os_str().as_bytes())
}

#[test]
fn in_chain_decision_matches_qemu() {
    let Some(q) = qemu() else {
        return;
    };
    let scratch = Scratch::new("chain-inchain");
    let root = scratch.0.canonicalize().unwrap();
    // Every case runs in its own directory caseK; ABS stands for caseK's s/base.qcow2.
    let abs_base = "ABS";
    // (where to run, overlay, -b, QEMU's decision as observed with the trace)
    let cases: [(&str, &str, &str, Option<usize>); 9] = [
        // (a) overlay given as a bare name: base is reused.
        ("s", "top.qcow2", "base.qcow2", Some(1)),
        ("s", "top.qcow2", "mid.qcow2", Some(0)),
        // (b) overlay as sub/top.qcow2 with a relative -b: QEMU looks for s/s/base.qcow2.
        (".", "s/top.qcow2", "base.qcow2", None),
        (".", "s/top.qcow2", "mid.qcow2", None),
        // (c) an absolute -b matches from anywhere.
        (".", "s/top.qcow2", abs_base, Some(1)),
        ("s/x", "../top.qcow2", abs_base, Some(1)),
        // realpath: a symlink to base and a ./ prefix still match.
        ("s", "top.qcow2", "base-link.qcow2", Some(1)),
        ("s", "./top.qcow2", "./base.qcow2", Some(1)),
        // From s/x, "../base.qcow2" is made relative to "../" again: ../../base.qcow2 is
        // the decoy next to s/, which is not in the chain.
        ("s/x", "../top.qcow2", "../base.qcow2", None),
    ];
    for (k, (cwd, overlay, backing, expected)) in cases.into_iter().enumerate() {
        let dir = root.join(format!("case{k}"));
        let abs = dir.join("s/base.qcow2");
        let backing = if backing == abs_base {
            abs.to_str().unwrap()
        } else {
            backing
        };
        std::fs::create_dir_all(&dir).unwrap();
        fixture(&q, &dir);
        let cwd = dir.join(cwd);
        let observed = qemu_decision(&q, &cwd, overlay, backing);
        assert_eq!(
            observed, expected,
            "qemu-img's decision for {overlay} -b {backing} in {cwd:?}"
        );
        // A fresh copy for instar's decision (qemu-img rewrote the overlay).
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        fixture(&q, &dir);
        std::env::set_current_dir(&cwd).unwrap();
        assert_eq!(
            instar_decision(overlay, backing),
            expected,
            "instar's decision for {overlay} -b {backing} in {cwd:?}"
        );
    }
    std::env::set_current_dir("/").unwrap();
}
