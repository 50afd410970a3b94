//! Differential safe-mode tests for sound overlays whose metadata is shared or unusual:
//! internal snapshots sharing L2 tables and data clusters with the active L1 (copied on
//! write, never written through), compressed clusters in the overlay itself, extended
//! L2 subclusters written in place next to a snapshot, refcount tables that move. These
//! are the images the pre-write overlap proof (`docs/metadata-overlap.md`) must let
//! through: instar's file must be byte-identical to qemu-img 10.2's, with the same
//! checks as `diff_safe.rs` (`qemu/safe.rs`).

mod qemu;
#[path = "qemu/safe.rs"]
mod safe;

use qemu::*;
use safe::*;

fn s(items: &[&str]) -> Vec<String> {
    items.iter().map(|x| x.to_string()).collect()
}

fn case(name: &str, build: &dyn Fn(&Fx) -> Vec<String>) {
    run_safe_case(&SafeCase::new(name, build));
}

/// 8 MiB base with data everywhere but one hole; an overlay on it with `opts`.
fn chain(fx: &Fx, opts: &[&str]) {
    fx.create("qcow2", "base.qcow2", "8M", &[]);
    fx.io(
        "qcow2",
        "base.qcow2",
        &["write -P 0x11 0 5M", "write -P 0x12 6M 2M"],
    );
    let mut o = vec!["-b", "base.qcow2", "-F", "qcow2"];
    o.extend_from_slice(opts);
    fx.create("qcow2", "ovl.qcow2", "8M", &o);
}

fn new_backing(fx: &Fx) {
    fx.create("qcow2", "new.qcow2", "8M", &[]);
    fx.io(
        "qcow2",
        "new.qcow2",
        &["write -P 0x11 0 1M", "write -P 0x33 3M 4M"],
    );
}

#[test]
fn two_snapshots_share_tables_flatten() {
    // 4 KiB clusters: one L2 table covers 2 MiB, so the copy goes through four tables,
    // every one shared with one or both snapshots.
    case("two-snapshots", &|fx| {
        chain(fx, &["-o", "cluster_size=4k"]);
        fx.io(
            "qcow2",
            "ovl.qcow2",
            &[
                "write -P 0x44 0 8k",
                "write -P 0x45 2M 4k",
                "write -P 0x46 6M 64k",
            ],
        );
        fx.img(&["snapshot", "-c", "s1", "ovl.qcow2"]);
        fx.io("qcow2", "ovl.qcow2", &["write -P 0x47 4M 4k"]);
        fx.img(&["snapshot", "-c", "s2", "ovl.qcow2"]);
        s(&["-b", ""])
    });
}

#[test]
fn snapshot_then_rebase_onto_new_backing() {
    case("snapshot-new", &|fx| {
        chain(fx, &["-o", "cluster_size=16k"]);
        fx.io("qcow2", "ovl.qcow2", &["write -P 0x44 1M 48k"]);
        fx.img(&["snapshot", "-c", "s1", "ovl.qcow2"]);
        new_backing(fx);
        s(&["-b", "new.qcow2", "-F", "qcow2"])
    });
}

#[test]
fn extended_l2_subclusters_next_to_a_snapshot() {
    // Partly written clusters: the rebase fills their other subclusters, in place for
    // clusters the overlay owns alone, copied on write for those a snapshot shares.
    case("extl2-snapshot", &|fx| {
        chain(fx, &["-o", "extended_l2=on,cluster_size=64k"]);
        fx.io(
            "qcow2",
            "ovl.qcow2",
            &["write -P 0x44 0 4k", "write -P 0x45 1M 2k"],
        );
        fx.img(&["snapshot", "-c", "s1", "ovl.qcow2"]);
        fx.io("qcow2", "ovl.qcow2", &["write -P 0x46 3M 4k"]);
        new_backing(fx);
        s(&["-b", "new.qcow2", "-F", "qcow2"])
    });
}

#[test]
fn compressed_clusters_in_the_overlay() {
    case("compressed-overlay", &|fx| {
        chain(fx, &[]);
        fx.io(
            "qcow2",
            "ovl.qcow2",
            &[
                "write -c -P 0x44 0 64k",
                "write -c -P 0x45 64k 64k",
                "write -c -P 0x46 4M 64k",
            ],
        );
        s(&["-b", ""])
    });
}

#[test]
fn refcount_table_moves_with_64_bit_refcounts_and_a_snapshot() {
    // 512-byte clusters and 64-bit refcounts: 64 refcounts per block, so the copy needs
    // many new blocks and the refcount table moves (the old one is freed and reused).
    case("reftable-moves", &|fx| {
        fx.create("qcow2", "base.qcow2", "3M", &[]);
        fx.io("qcow2", "base.qcow2", &["write -P 0x11 0 3M"]);
        fx.create(
            "qcow2",
            "ovl.qcow2",
            "3M",
            &[
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "-o",
                "cluster_size=512,refcount_bits=64",
            ],
        );
        fx.io("qcow2", "ovl.qcow2", &["write -P 0x44 64k 4k"]);
        fx.img(&["snapshot", "-c", "s1", "ovl.qcow2"]);
        s(&["-b", ""])
    });
}
