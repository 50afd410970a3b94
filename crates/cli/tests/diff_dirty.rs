//! Differential tests for dirty qcow2 overlays (lazy refcounts, DIRTY bit set): QEMU
//! repairs them when it opens them read-write, printing what it fixes, then rebases.
//! For each scenario, `-u` and safe: instar's overlay must be byte-identical to the
//! one qemu-img 10.2 and 11.1 leave, its stderr must hold the same lines, no other file
//! may change, and `qemu-img check` must be clean. Dirty images whose repair instar
//! does not reproduce must be refused with every file unchanged.
//!
//! Fixtures: real crashes (`qemu-io … -c 'sigraise 9'` on a `lazy_refcounts=on` image)
//! and hand-made inconsistencies (an L2 entry dropped or duplicated, a refcount raised
//! or zeroed, a COPIED flag cleared, a refcount block named twice) with the DIRTY bit
//! set by hand.

mod qemu;

use qemu::*;
use std::path::Path;

const OVERLAY: &str = "ov.qcow2";

/// `qemu-img check` of the overlay without its backing chain; `None` when clean.
fn check_clean(q: &Qemu, dir: &Path) -> Option<String> {
    let spec = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{OVERLAY}"}}}}"#
    );
    let out = run(&q.img, &["check", &spec], dir);
    if out.status == 0 && out.stdout.contains("No errors were found") {
        None
    } else {
        Some(format!("exit {}: {}{}", out.status, out.stdout, out.stderr))
    }
}

/// The backing files and a lazy-refcounts overlay over `base.raw`, with `opts` added
/// to its creation options.
fn base_fixture(fx: &Fx, opts: &str) {
    fx.create("raw", "base.raw", "8M", &[]);
    fx.io("raw", "base.raw", &["write -P 0x11 0 8M"]);
    fx.create("raw", "new.raw", "8M", &[]);
    fx.io("raw", "new.raw", &["write -P 0x22 0 2M"]);
    fx.create(
        "qcow2",
        OVERLAY,
        "8M",
        &[
            "-o",
            &format!("lazy_refcounts=on{opts}"),
            "-b",
            "base.raw",
            "-F",
            "raw",
        ],
    );
}

/// Write with qemu-io, then kill it before it flushes its refcounts.
fn crash(fx: &Fx, cmds: &[&str]) {
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in cmds.iter().chain(&["sigraise 9"]) {
        args.push("-c");
        args.push(c);
    }
    args.push(OVERLAY);
    run(&fx.qemu.io, &args, &fx.dir);
    let b = fx.read(OVERLAY);
    assert_eq!(
        be64(&b, 72) & 1,
        1,
        "the crash must leave the DIRTY bit set"
    );
}

/// Offset of the L2 entry of guest cluster `index` (first L2 table).
fn l2_entry_offset(b: &[u8], index: usize) -> usize {
    let l1 = be64(b, 40) as usize;
    (be64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize + 8 * index
}

/// Set the 16-bit refcount of host cluster `cluster` (first refcount block).
fn set_refcount(b: &mut [u8], cluster: usize, v: u16) {
    let rt = be64(b, 48) as usize;
    let block = be64(b, rt) as usize;
    b[block + 2 * cluster..block + 2 * cluster + 2].copy_from_slice(&v.to_be_bytes());
}

fn cluster_bits(b: &[u8]) -> u32 {
    be32(b, 20)
}

/// A clean overlay with data, then `edit`, then the DIRTY bit.
fn hand_made(fx: &Fx, edit: impl FnOnce(&mut Vec<u8>)) {
    fx.io(
        "qcow2",
        OVERLAY,
        &["write -P 0x33 0 192k", "write -P 0x44 4M 64k"],
    );
    fx.edit(OVERLAY, |b| {
        edit(b);
        let v = be64(b, 72) | 1;
        put64(b, 72, v);
    });
}

type Build = dyn Fn(&Fx);

fn rebase_argv(safe: bool) -> Vec<&'static str> {
    let mut v = vec!["rebase"];
    if !safe {
        v.push("-u");
    }
    v.extend(["-f", "qcow2", "-b", "new.raw", "-F", "raw", OVERLAY]);
    v
}

/// qemu-img 10.2 and 11.1 (when installed).
fn references(refs: &Refs) -> Vec<&Qemu> {
    refs.all()
        .into_iter()
        .filter(|q| q.label == "10.2" || q.label == "11.1")
        .collect()
}

fn run_case(name: &str, safe: bool, build: &Build) {
    run_case_with(name, safe, "", build);
}

fn run_case_with(name: &str, safe: bool, opts: &str, build: &Build) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new(name);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    base_fixture(&fx, opts);
    build(&fx);
    let argv = rebase_argv(safe);
    let orig = scratch.copy("orig");
    let mut failures = Vec::new();

    let mut want: Option<(Vec<u8>, String)> = None;
    for q in references(refs) {
        let dir = scratch.copy(&format!("qemu-{}", q.label));
        let out = run(&q.img, &argv, &dir);
        assert_eq!(out.status, 0, "qemu-img {} failed: {}", q.label, out.stderr);
        assert!(
            !out.stderr.is_empty(),
            "qemu-img {} printed no repair: the fixture is not dirty",
            q.label
        );
        let bytes = std::fs::read(dir.join(OVERLAY)).expect("read overlay");
        if let Some(p) = check_clean(q, &dir) {
            panic!("qemu-img {}'s own result is not clean: {p}", q.label);
        }
        match &want {
            None => want = Some((bytes, out.stderr)),
            Some((b, e)) => {
                if let Some(d) = describe_diff(b, &bytes) {
                    failures.push(format!("qemu-img {} differs from 10.2: {d}", q.label));
                }
                if *e != out.stderr {
                    failures.push(format!(
                        "qemu-img {} prints other lines than 10.2:\n{}",
                        q.label,
                        line_diff(e, &out.stderr)
                    ));
                }
            }
        }
    }
    let Some((want_bytes, want_err)) = want else {
        return;
    };

    let dir = scratch.copy("subject");
    let shown = format!("cd {}; {}", dir.display(), show_cmd("instar", &argv));
    let out = run(subject.path(), &argv, &dir);
    if out.status != 0 {
        failures.push(format!("{shown}\n  exit {}: {}", out.status, out.stderr));
    } else {
        let got = std::fs::read(dir.join(OVERLAY)).expect("read overlay");
        if let Some(d) = describe_diff(&want_bytes, &got) {
            failures.push(format!("{shown}\n  overlay differs from qemu-img's: {d}"));
        }
        if out.stderr != want_err {
            failures.push(format!(
                "{shown}\n  stderr differs from qemu-img's:\n{}",
                line_diff(&want_err, &out.stderr)
            ));
        }
        if let Some(p) = check_clean(&refs.v10_2, &dir) {
            failures.push(format!("{shown}\n  qemu-img check: {p}"));
        }
        let (ra, rb) = (snapshot(&orig), snapshot(&dir));
        for (path, bytes) in &ra {
            if path.as_path() != Path::new(OVERLAY) && rb.get(path) != Some(bytes) {
                failures.push(format!("{} changed", path.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "scenario {name}:\n{}",
        failures.join("\n")
    );
}

/// A dirty image whose repair instar does not reproduce: qemu-img rebases it, instar
/// refuses with every file unchanged.
fn run_refused(name: &str, safe: bool, build: &Build) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new(name);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    base_fixture(&fx, "");
    build(&fx);
    let argv = rebase_argv(safe);
    let ref_dir = scratch.copy("qemu");
    let want = run(&refs.v10_2.img, &argv, &ref_dir);
    assert_eq!(want.status, 0, "qemu-img must rebase it: {}", want.stderr);
    if !subject.is_instar() {
        return;
    }
    let dir = scratch.copy("subject");
    let got = run(subject.path(), &argv, &dir);
    assert_eq!(got.status, 1, "instar must refuse: {}", got.stderr);
    assert!(
        got.stderr.contains("dirty bit") && got.stderr.contains("qemu-img check -r all"),
        "message: {}",
        got.stderr
    );
    assert!(
        snapshot(&scratch.fixture()) == snapshot(&dir),
        "{name}: a file changed"
    );
}

fn crash_small(fx: &Fx) {
    crash(fx, &["write -P 0x33 0 192k", "write -P 0x44 4M 64k"]);
}

/// Writes in two L2 ranges and a partial cluster, so more clusters lose their counts.
fn crash_spread(fx: &Fx) {
    crash(
        fx,
        &[
            "write -P 0x33 64k 64k",
            "write -P 0x55 3M 300k",
            "write -P 0x66 7M 4k",
            "write -z 5M 128k",
        ],
    );
}

/// An L2 entry dropped: its data cluster keeps refcount 1 with no reference (freed).
fn leak_dropped(fx: &Fx) {
    hand_made(fx, |b| {
        let o = l2_entry_offset(b, 1);
        b[o..o + 8].fill(0);
    });
}

/// A data cluster counted twice (fixed down to 1, in place).
fn leak_counted_twice(fx: &Fx) {
    hand_made(fx, |b| {
        let e = be64(b, l2_entry_offset(b, 0)) & 0x00ff_ffff_ffff_fe00;
        let bits = cluster_bits(b);
        set_refcount(b, (e >> bits) as usize, 2);
    });
}

/// The L2 table's refcount zeroed: QEMU rebuilds the refcount structure.
fn l2_refcount_zero(fx: &Fx) {
    hand_made(fx, |b| {
        let l1 = be64(b, 40) as usize;
        let l2 = be64(b, l1) & 0x00ff_ffff_ffff_fe00;
        let bits = cluster_bits(b);
        set_refcount(b, (l2 >> bits) as usize, 0);
    });
}

/// Guest cluster 2 shares guest cluster 0's host cluster: the refcount is raised to
/// 2 in place, the dropped cluster freed, and both L2 entries lose their COPIED flag.
fn shared_cluster(fx: &Fx) {
    hand_made(fx, |b| {
        let o0 = l2_entry_offset(b, 0);
        let e = be64(b, o0);
        let o2 = l2_entry_offset(b, 2);
        put64(b, o2, e);
    });
}

/// The L1 entry lost its COPIED flag: QEMU sets it again.
fn l1_flag_cleared(fx: &Fx) {
    hand_made(fx, |b| {
        let l1 = be64(b, 40) as usize;
        let e = be64(b, l1) & !(1 << 63);
        put64(b, l1, e);
    });
}

/// Two refcount table entries name the same block: QEMU rebuilds.
fn block_named_twice(fx: &Fx) {
    hand_made(fx, |b| {
        let rt = be64(b, 48) as usize;
        let e = be64(b, rt);
        put64(b, rt + 8, e);
    });
}

/// Internal snapshots: QEMU's repair also walks the snapshots' tables; refused.
fn with_snapshot(fx: &Fx) {
    fx.io("qcow2", OVERLAY, &["write -P 0x33 0 64k"]);
    fx.img(&["snapshot", "-c", "s1", OVERLAY]);
    fx.edit(OVERLAY, |b| {
        let v = be64(b, 72) | 1;
        put64(b, 72, v);
    });
}

#[test]
fn crash_unsafe() {
    run_case("dirty-crash-u", false, &crash_small);
}

#[test]
fn crash_safe() {
    run_case("dirty-crash-safe", true, &crash_small);
}

#[test]
fn crash_spread_unsafe() {
    run_case("dirty-spread-u", false, &crash_spread);
}

#[test]
fn crash_spread_safe() {
    run_case("dirty-spread-safe", true, &crash_spread);
}

#[test]
fn leak_unsafe() {
    run_case("dirty-leak-u", false, &leak_dropped);
}

#[test]
fn leak_safe() {
    run_case("dirty-leak-safe", true, &leak_dropped);
}

#[test]
fn overcounted_unsafe() {
    run_case("dirty-over-u", false, &leak_counted_twice);
}

#[test]
fn overcounted_safe() {
    run_case("dirty-over-safe", true, &leak_counted_twice);
}

#[test]
fn refcount_error_rebuild_unsafe() {
    run_case("dirty-rebuild-u", false, &l2_refcount_zero);
}

#[test]
fn refcount_error_rebuild_safe() {
    run_case("dirty-rebuild-safe", true, &l2_refcount_zero);
}

#[test]
fn copied_flags_unsafe() {
    run_case("dirty-copied-u", false, &shared_cluster);
}

#[test]
fn copied_flags_safe() {
    run_case("dirty-copied-safe", true, &shared_cluster);
}

#[test]
fn l1_copied_flag() {
    run_case("dirty-l1-u", false, &l1_flag_cleared);
    run_case("dirty-l1-safe", true, &l1_flag_cleared);
}

#[test]
fn refcount_block_named_twice() {
    run_case("dirty-block-twice-u", false, &block_named_twice);
    run_case("dirty-block-twice-safe", true, &block_named_twice);
}

#[test]
fn snapshots_are_refused() {
    run_refused("dirty-snapshot-u", false, &with_snapshot);
    run_refused("dirty-snapshot-safe", true, &with_snapshot);
}

/// Writes over many clusters and several refcount blocks (4 KiB clusters: one block
/// covers 8 MiB with 16-bit refcounts, 32 MiB with 1-bit ones).
fn crash_many(fx: &Fx) {
    crash(
        fx,
        &[
            "write -P 0x33 0 1M",
            "write -P 0x55 3M 12k",
            "write -P 0x66 6M 1M",
            "write -c -P 0x77 7M 64k",
        ],
    );
}

#[test]
fn small_clusters() {
    for safe in [false, true] {
        run_case_with("dirty-4k", safe, ",cluster_size=4096", &crash_many);
    }
}

#[test]
fn refcount_widths() {
    for (label, bits) in [("1", ",refcount_bits=1"), ("64", ",refcount_bits=64")] {
        for safe in [false, true] {
            let name = format!("dirty-rc{label}-{safe}");
            run_case_with(
                &name,
                safe,
                &format!(",cluster_size=4096{bits}"),
                &crash_many,
            );
        }
    }
}

#[test]
fn large_clusters() {
    for safe in [false, true] {
        run_case_with("dirty-2m", safe, ",cluster_size=2M", &crash_many);
    }
}

/// After the crash, the refcount table's first entry is lost too: every cluster it
/// covered reads refcount 0, so QEMU rebuilds.
fn crash_and_lost_block(fx: &Fx) {
    crash_many(fx);
    fx.edit(OVERLAY, |b| {
        let rt = be64(b, 48) as usize;
        put64(b, rt, 0);
    });
}

/// 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB and a table
/// cluster 2 MiB, so the rebuilt table spans several clusters and moves as it grows.
#[test]
fn rebuilt_table_grows() {
    for safe in [false, true] {
        let name = format!("dirty-512-{safe}");
        let opts = ",cluster_size=512,refcount_bits=64";
        run_case_with(&name, safe, opts, &crash_and_lost_block);
    }
}
