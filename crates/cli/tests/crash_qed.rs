//! Crash consistency of qed overlay rebases (safe mode in several layouts, detach,
//! unsafe mode), with the scenario runner of the qcow2 and vmdk crash tests
//! (`power_loss/scenario.rs`): the sandbox is stopped right after its k-th write for
//! every k from 0 to the number of writes n of a full run, and every power-loss state of
//! the full run's recorded writes and flushes is rebuilt (every subset of an epoch of at
//! most 8 writes, otherwise every prefix and 64 seeded subsets). Each image must pass
//! `qemu-img check` (clean or leaked clusters only; an image with `QED_F_NEED_CHECK` set
//! must come out of the repair QEMU's read-write open makes with no error left) and read
//! exactly as before (`qemu-img compare` with a copy of the original overlay).
//!
//! Without /dev/kvm or qemu-img 10.2 the tests print a note and pass, unless
//! INSTAR_REQUIRE_KVM=1 / INSTAR_REQUIRE_QEMU=1.

mod power_loss;
mod qemu;
mod stopping_guest;

use instar_testkit::serial;
use power_loss::scenario::{check, crash_every_write, same_content, Case, Summary};
use qemu::Fx;

/// A safe rebase of ovl.qed onto new.qcow2.
fn safe(name: &'static str, build: &dyn Fn(&Fx)) -> Option<Summary> {
    let case = Case {
        name,
        fmt: "qed",
        args: &["-b", "new.qcow2", "-F", "qcow2"],
    };
    crash_every_write(&case, build)
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
    let sum = safe("qed-64k", &|fx| overlay(fx, true, "cluster_size=65536"));
    if let Some(sum) = sum {
        assert!(sum.epochs >= 3, "{sum:?}");
    }
}

#[test]
fn crash_qed_small_tables() {
    safe("qed-4k-t2", &|fx| {
        overlay(fx, true, "cluster_size=4096,table_size=2")
    });
}

/// Without an old backing file the first allocation sets `QED_F_NEED_CHECK` and the
/// final header clears it.
#[test]
fn crash_qed_without_old_backing() {
    safe("qed-no-old", &|fx| overlay(fx, false, "cluster_size=65536"));
}

/// An overlay left with `QED_F_NEED_CHECK` set (not closed cleanly) and an L1 entry,
/// past the image's end, naming a table past the end of the file: the check QEMU's open
/// makes (the L1 table rewritten without that entry, then the header marked clean)
/// comes first, then the rebase.
#[test]
fn crash_qed_need_check() {
    let sum = safe("qed-need-check", &|fx| {
        overlay(fx, true, "cluster_size=4096,table_size=2");
        fx.edit("ovl.qed", |b| {
            b[16] |= 2;
            // 8 MiB of 4 MiB tables: L1 entries 0 and 1 map the image.
            let l1 = u64::from_le_bytes(b[40..48].try_into().expect("8 bytes")) as usize;
            let past = (b.len() as u64).next_multiple_of(4096) + (1 << 20);
            b[l1 + 5 * 8..l1 + 6 * 8].copy_from_slice(&past.to_le_bytes());
        });
    });
    if let Some(sum) = sum {
        // The repair's L1 write and header, then the rebase's 9 writes.
        assert!(sum.writes >= 11, "{sum:?}");
    }
}

/// `-b ""`: every cluster the old backing shows is copied into the overlay.
#[test]
fn crash_qed_detach() {
    let case = Case {
        name: "qed-detach",
        fmt: "qed",
        args: &["-b", ""],
    };
    crash_every_write(&case, &|fx| overlay(fx, true, "cluster_size=65536"));
}

/// Unsafe mode rewrites the header alone; the new backing is a copy of the old one.
#[test]
fn crash_qed_unsafe() {
    let case = Case {
        name: "qed-unsafe",
        fmt: "qed",
        args: &["-u", "-b", "new.raw", "-F", "raw"],
    };
    let sum = crash_every_write(&case, &|fx| {
        overlay(fx, true, "cluster_size=65536");
        fx.write("new.raw", &fx.read("old.raw"));
    });
    if let Some(sum) = sum {
        assert_eq!(sum.writes, 1, "unsafe mode writes the header once");
    }
}

/// The checks on a qed image that needs a check: an L2 entry past the end of the file
/// fails `qemu-img check`; with `QED_F_NEED_CHECK` set QEMU's open repairs it (the entry
/// is cleared), and the content compared is the repaired image's.
#[test]
fn check_repairs_qed_images_that_need_a_check() {
    let _serial = serial();
    let Some(refs) = qemu::refs() else { return };
    let q = &refs.v10_2;
    let scratch = qemu::Scratch::new("crash-qed-check");
    let fx = Fx::new(scratch.fixture(), q);
    let opts = ["-o", "cluster_size=4096,table_size=2"];
    fx.create("qed", "orig.qed", "1M", &opts);
    fx.io("qed", "orig.qed", &["write -P 0x21 0 4k"]);
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let img = fx.read("orig.qed");
    let l2 = le64(&img, le64(&img, 40) as usize) as usize;
    // Guest cluster 1 mapped past the end of the file.
    let mut broken = img.clone();
    broken[l2 + 8..l2 + 16].copy_from_slice(&(1u64 << 20).to_le_bytes());
    fx.write("img.qed", &broken);
    assert!(check(q, &fx.dir, "img.qed").is_err());
    broken[16] |= 2;
    fx.write("img.qed", &broken);
    assert_eq!(check(q, &fx.dir, "img.qed"), Ok("dirty, repaired on open"));
    assert_eq!(same_content(q, &fx.dir, "img.qed"), Ok(()));
    // The comparison is the repaired copy's: content that differs is caught.
    fx.io("qed", "orig.qed", &["write -P 0x22 8k 4k"]);
    assert_eq!(check(q, &fx.dir, "img.qed"), Ok("dirty, repaired on open"));
    let e = same_content(q, &fx.dir, "img.qed").unwrap_err();
    assert!(e.contains("after the repair"), "{e}");
}
