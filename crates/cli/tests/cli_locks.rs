//! Image locks against real QEMU processes: an image that qemu-io or qemu-nbd holds is
//! refused with QEMU's message, and QEMU tools refuse an image while instar holds it.
//! The lock checks come before the sandbox runs, so most of these need no KVM.

mod cli_support;

use cli_support::*;
use instar::locks::{self, lock_image};
use std::path::Path;

/// A forked qemu-nbd serving an image read-write on a Unix socket, stopped when dropped.
struct QemuNbd {
    pid: i32,
}

impl QemuNbd {
    fn serve(nbd: &Path, dir: &Path, image: &str) -> QemuNbd {
        let pid_file = dir.join("nbd.pid");
        let r = run(
            nbd,
            &[
                "-f",
                "qcow2",
                "--fork",
                "-k",
                &dir.join("nbd.sock").to_string_lossy(),
                "--pid-file",
                &pid_file.to_string_lossy(),
                image,
            ],
            dir,
        );
        assert_eq!(r.status, 0, "qemu-nbd: {}", r.stderr);
        let pid = std::fs::read_to_string(&pid_file)
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        QemuNbd { pid }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid qemu-nbd wrote for the server this test started.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        for _ in 0..100 {
            // SAFETY: signal 0 only tests whether the process still exists.
            if unsafe { libc::kill(self.pid, 0) } != 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

const HELD: &str = "instar: Could not open 'ovl.qcow2': Failed to get \"write\" lock\n\
                    Is another process using the image [ovl.qcow2]?\n";

fn fixture(q: &Qemu, name: &str) -> Scratch {
    let s = Scratch::new(name);
    create(q, &s.0, "qcow2", "base.qcow2", "1M", &[]);
    create(q, &s.0, "qcow2", "nb.qcow2", "1M", &[]);
    create(
        q,
        &s.0,
        "qcow2",
        "ovl.qcow2",
        "1M",
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
    s
}

fn rebase_u(dir: &Path, extra: &[&str]) -> Run {
    let mut a = vec!["rebase", "-u"];
    a.extend_from_slice(extra);
    a.extend_from_slice(&["-b", "nb.qcow2", "-F", "qcow2", "ovl.qcow2"]);
    instar(&a, dir)
}

#[test]
fn overlay_held_by_qemu_io() {
    let Some(q) = qemu() else {
        return;
    };
    let s = fixture(&q, "locks-qemu-io");
    let before = std::fs::read(s.path("ovl.qcow2")).unwrap();
    for read_only in [false, true] {
        let _h = LockHolder::open(&q.io, &s.0, "qcow2", "ovl.qcow2", read_only);
        // qemu-img says the same (its prefix swapped).
        let qr = run(
            &q.img,
            &["rebase", "-u", "-b", "nb.qcow2", "-F", "qcow2", "ovl.qcow2"],
            &s.0,
        );
        assert_eq!(
            as_instar(&qr.stderr, &q.img),
            HELD,
            "qemu-img, read_only={read_only}"
        );
        for extra in [&[][..], &["-U"][..]] {
            let r = rebase_u(&s.0, extra);
            assert_eq!(
                (r.status, r.stderr.as_str()),
                (1, HELD),
                "read_only={read_only} {extra:?}"
            );
            assert_eq!(r.stdout, "");
        }
    }
    assert_eq!(std::fs::read(s.path("ovl.qcow2")).unwrap(), before);
}

#[test]
fn overlay_served_by_qemu_nbd() {
    let Some(q) = qemu() else {
        return;
    };
    let Some(nbd) = qemu_nbd() else {
        return;
    };
    let s = fixture(&q, "locks-qemu-nbd");
    let before = std::fs::read(s.path("ovl.qcow2")).unwrap();
    {
        let _server = QemuNbd::serve(&nbd, &s.0, "ovl.qcow2");
        let r = rebase_u(&s.0, &[]);
        assert_eq!((r.status, r.stderr.as_str()), (1, HELD));
    }
    assert_eq!(std::fs::read(s.path("ovl.qcow2")).unwrap(), before);
}

/// The locks instar takes (the library code the binary uses) keep QEMU's tools away.
#[test]
fn qemu_refuses_an_image_instar_holds() {
    let Some(q) = qemu() else {
        return;
    };
    let s = fixture(&q, "locks-held-by-instar");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.path("ovl.qcow2"))
        .unwrap();
    lock_image(&file, locks::OVERLAY).unwrap();
    let r = run(&q.img, &["info", "ovl.qcow2"], &s.0);
    assert_eq!(r.status, 1);
    assert_eq!(
        as_instar(&r.stderr, &q.img),
        "instar: Could not open 'ovl.qcow2': Failed to get shared \"write\" lock\n\
         Is another process using the image [ovl.qcow2]?\n"
    );
    let r = run(
        &q.img,
        &["rebase", "-u", "-b", "nb.qcow2", "-F", "qcow2", "ovl.qcow2"],
        &s.0,
    );
    assert_eq!(as_instar(&r.stderr, &q.img), HELD);
    let r = run(
        &q.io,
        &["-f", "qcow2", "-c", "read 0 512", "ovl.qcow2"],
        &s.0,
    );
    assert!(
        r.stderr.contains("Failed to get \"write\" lock"),
        "{}",
        r.stderr
    );
    // Sharing everything still works, as with any QEMU holder.
    assert_eq!(run(&q.img, &["info", "-U", "ovl.qcow2"], &s.0).status, 0);
    // A second instar is refused too.
    let r = rebase_u(&s.0, &[]);
    assert_eq!((r.status, r.stderr.as_str()), (1, HELD));
    drop(file);
    assert_eq!(run(&q.img, &["info", "ovl.qcow2"], &s.0).status, 0);
}

/// A backing file instar reads is shared with readers but not with writers.
#[test]
fn reader_lock_shares_with_readers_only() {
    let Some(q) = qemu() else {
        return;
    };
    let s = fixture(&q, "locks-reader");
    let file = std::fs::File::open(s.path("nb.qcow2")).unwrap();
    lock_image(&file, locks::READER).unwrap();
    assert_eq!(run(&q.img, &["info", "nb.qcow2"], &s.0).status, 0);
    let r = run(
        &q.io,
        &["-f", "qcow2", "-c", "read 0 512", "nb.qcow2"],
        &s.0,
    );
    assert!(
        r.stderr.contains("Failed to get \"write\" lock"),
        "{}",
        r.stderr
    );
    // And a writer already there keeps instar's reader out.
    drop(file);
    let _h = LockHolder::open(&q.io, &s.0, "qcow2", "nb.qcow2", false);
    let file = std::fs::File::open(s.path("nb.qcow2")).unwrap();
    assert_eq!(
        lock_image(&file, locks::READER).unwrap_err().to_string(),
        "Failed to get shared \"write\" lock"
    );
}

/// Without -F the new backing is opened to probe its format: a writer on it is refused
/// unless -U is given. Needs the sandbox (the overlay is probed first).
#[test]
fn new_backing_in_use_is_probed_only_with_force_share() {
    let Some(q) = qemu() else {
        return;
    };
    if !require_kvm() {
        return;
    }
    let s = fixture(&q, "locks-new-backing");
    let before = std::fs::read(s.path("ovl.qcow2")).unwrap();
    let _h = LockHolder::open(&q.io, &s.0, "qcow2", "nb.qcow2", false);
    let r = instar(&["rebase", "-u", "-b", "nb.qcow2", "ovl.qcow2"], &s.0);
    assert_eq!(
        (r.status, r.stderr.as_str()),
        (
            1,
            "instar: Could not open new backing file 'nb.qcow2': Failed to get shared \"write\" lock\n\
             Is another process using the image [nb.qcow2]?\n"
        )
    );
    assert_eq!(std::fs::read(s.path("ovl.qcow2")).unwrap(), before);
    let r = instar(&["rebase", "-u", "-U", "-b", "nb.qcow2", "ovl.qcow2"], &s.0);
    assert_eq!(
        (r.status, r.stdout.as_str()),
        (0, "Image rebased.\n"),
        "{}",
        r.stderr
    );
    let i = info(&q, &s.0, "ovl.qcow2");
    assert_eq!(i["backing-filename"], "nb.qcow2");
    assert_eq!(i["backing-filename-format"], "qcow2");
}
