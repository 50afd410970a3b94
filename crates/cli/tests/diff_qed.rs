//! Differential tests for qed overlays and qed images in backing chains: for each
//! scenario the overlay left by `instar rebase` must be byte-identical to the one
//! qemu-img 10.2 leaves (and 11.1 must leave the same bytes), no other file may change,
//! `qemu-img check` must be clean, and a safe rebase must keep the overlay's content
//! (`qemu-img compare` against the original). Error scenarios must fail with
//! qemu-img's message, exit 1, and leave every file unchanged.
//!
//! qemu-img 11.1 is located like every reference build (`instar_testkit::qemu_ref`);
//! without it only 10.2 is compared (a failure under `INSTAR_REQUIRE_QEMU=1`).

mod qemu;

use instar_testkit::Rng;
use qemu::*;
use std::path::Path;

/// qemu-img 11.1, the second reference.
fn v11_1() -> Option<Qemu> {
    let found = find_build("11.1");
    need(
        found.is_some(),
        "INSTAR_REQUIRE_QEMU",
        "qemu-img 11.1 not found: comparing with 10.2 only",
    );
    found
}

fn s(items: &[&str]) -> Vec<String> {
    items.iter().map(|x| x.to_string()).collect()
}

/// `qemu-img check` of an image without its backing chain; `None` when clean.
fn check_clean(q: &Qemu, dir: &Path, image: &str, fmt: &str) -> Option<String> {
    let spec = format!(
        r#"json:{{"driver":"{fmt}","backing":null,"file":{{"driver":"file","filename":"{image}"}}}}"#
    );
    let out = run(&q.img, &["check", &spec], dir);
    if out.status == 0 && out.stdout.contains("No errors were found") {
        None
    } else {
        Some(format!("exit {}: {}{}", out.status, out.stdout, out.stderr))
    }
}

type Build = dyn Fn(&Fx) -> Vec<String>;

struct Case<'a> {
    name: &'a str,
    /// The overlay, relative to the fixture directory.
    overlay: &'a str,
    /// Its format (qed, or qcow2 over a qed backing).
    fmt: &'a str,
    /// Also run instar without `-F` (the new backing exists).
    probe: bool,
    /// Builds the fixture; returns the rebase arguments before FILE.
    build: &'a Build,
    /// QEMU's repair of a dirty image leaves leaked (or doubly referenced) clusters:
    /// `qemu-img check` must then say the same of both results instead of being clean.
    unclean: bool,
}

fn rebase_argv(step: &[String], overlay: &str) -> Vec<String> {
    let mut v = vec!["rebase".to_string()];
    v.extend(step.iter().cloned());
    v.push(overlay.to_string());
    v
}

fn run_case(c: &Case) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new(c.name);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    let step = (c.build)(&fx);
    let argv = rebase_argv(&step, c.overlay);
    let safe = !step.iter().any(|a| a == "-u");
    let detach = step.windows(2).any(|w| w[0] == "-b" && w[1].is_empty());
    let orig = scratch.copy("orig");
    let mut failures = Vec::new();

    let ref_dir = scratch.copy("qemu-10.2");
    let out = run(&refs.v10_2.img, &argv, &ref_dir);
    assert_eq!(
        out.status,
        0,
        "qemu-img 10.2 failed ({}): {}",
        show_cmd("qemu-img", &argv),
        out.stderr
    );
    let want = std::fs::read(ref_dir.join(c.overlay)).expect("read overlay");
    let want_check = check_clean(&refs.v10_2, &ref_dir, c.overlay, c.fmt);
    match &want_check {
        Some(p) if !c.unclean => panic!("qemu-img 10.2's own result is not clean: {p}"),
        None if c.unclean => panic!("the fixture was meant to leave an unclean image"),
        _ => {}
    }
    if let Some(q11) = v11_1() {
        let dir = scratch.copy("qemu-11.1");
        let out = run(&q11.img, &argv, &dir);
        let got = std::fs::read(dir.join(c.overlay)).expect("read overlay");
        if out.status != 0 {
            failures.push(format!("qemu-img 11.1 failed: {}", out.stderr));
        } else if let Some(d) = describe_diff(&want, &got) {
            failures.push(format!("qemu-img 11.1's result differs from 10.2's: {d}"));
        }
    }

    let mut variants = vec![("with-F", step.clone())];
    if c.probe && subject.is_instar() {
        variants.push(("probed", strip_backing_format(&step).0));
    }
    for (label, vstep) in variants {
        let dir = scratch.copy(&format!("subject-{label}"));
        let argv = rebase_argv(&vstep, c.overlay);
        let shown = format!("cd {}; {}", dir.display(), show_cmd("instar", &argv));
        let out = run(subject.path(), &argv, &dir);
        if out.status != 0 {
            failures.push(format!("{shown}\n  exit {}: {}", out.status, out.stderr));
            continue;
        }
        if subject.is_instar() {
            let line = if detach {
                "Image detached.\n"
            } else {
                "Image rebased.\n"
            };
            if out.stdout != line || !out.stderr.is_empty() {
                failures.push(format!(
                    "{shown}\n  stdout {:?}, stderr {:?}",
                    out.stdout, out.stderr
                ));
            }
        }
        let got = std::fs::read(dir.join(c.overlay)).expect("read overlay");
        if let Some(d) = describe_diff(&want, &got) {
            failures.push(format!(
                "{shown}\n  overlay differs from qemu-img 10.2's: {d}"
            ));
        }
        let (ra, rb) = (snapshot(&orig), snapshot(&dir));
        for (path, bytes) in &ra {
            if path.as_path() != Path::new(c.overlay) && rb.get(path) != Some(bytes) {
                failures.push(format!("[{label}] {} changed", path.display()));
            }
        }
        let got_check = check_clean(&refs.v10_2, &dir, c.overlay, c.fmt);
        if got_check != want_check {
            failures.push(format!(
                "[{label}] qemu-img check: {got_check:?}, qemu-img's result: {want_check:?}"
            ));
        }
        // (A dirty original cannot be read as it is: no content to compare with.)
        if safe && !c.unclean {
            let before = orig.join(c.overlay);
            let before = before.to_string_lossy();
            let out = run(&refs.v10_2.img, &["compare", &*before, c.overlay], &dir);
            if out.status != 0 {
                failures.push(format!(
                    "[{label}] content changed (qemu-img compare): {}{}",
                    out.stdout, out.stderr
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "scenario {}:\n{}",
        c.name,
        failures.join("\n")
    );
}

/// An error scenario: qemu-img 10.2 and instar fail with the same message; instar
/// leaves every file unchanged.
fn run_error(name: &str, overlay: &str, build: &Build) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new(name);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    let argv = rebase_argv(&build(&fx), overlay);
    let ref_dir = scratch.copy("qemu");
    let want = run(&refs.v10_2.img, &argv, &ref_dir);
    assert_eq!(want.status, 1, "qemu-img 10.2 must fail: {}", want.stderr);
    let dir = scratch.copy("subject");
    let got = run(subject.path(), &argv, &dir);
    assert_eq!(got.status, 1, "instar must fail: {}", got.stderr);
    assert_eq!(
        normalise_stderr(&got.stderr, subject.path()),
        normalise_stderr(&want.stderr, &refs.v10_2.img),
        "{name}: messages differ"
    );
    assert!(got.stdout.is_empty(), "stdout: {}", got.stdout);
    assert!(
        snapshot(&scratch.fixture()) == snapshot(&dir),
        "{name}: a file changed"
    );
}

fn raw_with(fx: &Fx, name: &str, size: &str, cmds: &[&str]) {
    fx.create("raw", name, size, &[]);
    fx.io("raw", name, cmds);
}

/// base.raw (4 MiB of 0x11), new.qcow2 (4 MiB, differs in 1..2 MiB), ov.qed on
/// base.raw (raw, so QED_F_BACKING_FORMAT_NO_PROBE) with data and a zero cluster.
fn basic(fx: &Fx, qed_opts: &[&str]) {
    raw_with(fx, "base.raw", "4M", &["write -P 0x11 0 4M"]);
    fx.create("qcow2", "new.qcow2", "4M", &[]);
    fx.io(
        "qcow2",
        "new.qcow2",
        &["write -P 0x11 0 4M", "write -P 0x22 1M 1M"],
    );
    let mut o = vec!["-b", "base.raw", "-F", "raw"];
    o.extend_from_slice(qed_opts);
    fx.create("qed", "ov.qed", "4M", &o);
    fx.io(
        "qed",
        "ov.qed",
        &["write -P 0x33 512k 64k", "write -z 3M 128k"],
    );
}

fn case(name: &str, probe: bool, build: &Build) {
    run_case(&Case {
        name,
        overlay: "ov.qed",
        fmt: "qed",
        probe,
        build,
        unclean: false,
    });
}

fn dirty_case(name: &str, build: &Build) {
    run_case(&Case {
        name,
        overlay: "ov.qed",
        fmt: "qed",
        probe: false,
        build,
        unclean: true,
    });
}

#[test]
fn unsafe_rename() {
    case("qed-unsafe-rename", true, &|fx| {
        basic(fx, &[]);
        s(&["-u", "-b", "new.qcow2", "-F", "qcow2"])
    });
}

#[test]
fn unsafe_onto_raw_sets_no_probe() {
    case("qed-unsafe-raw", false, &|fx| {
        fx.create("qcow2", "old.qcow2", "4M", &[]);
        fx.create("qed", "ov.qed", "4M", &["-b", "old.qcow2", "-F", "qcow2"]);
        raw_with(fx, "new.raw", "4M", &["write -P 0x5 0 4k"]);
        s(&["-u", "-b", "new.raw", "-F", "raw"])
    });
}

#[test]
fn unsafe_detach() {
    case("qed-unsafe-detach", false, &|fx| {
        basic(fx, &[]);
        s(&["-u", "-b", ""])
    });
}

#[test]
fn unsafe_shorter_name_keeps_the_old_tail() {
    case("qed-unsafe-shorter", false, &|fx| {
        raw_with(
            fx,
            "a-much-longer-backing-file-name.raw",
            "1M",
            &["write 0 4k"],
        );
        fx.create(
            "qed",
            "ov.qed",
            "1M",
            &["-b", "a-much-longer-backing-file-name.raw", "-F", "raw"],
        );
        s(&["-u", "-b", "b.qcow2", "-F", "qcow2"])
    });
}

#[test]
fn unsafe_long_name_fills_the_header() {
    // 4 KiB clusters: 64 header bytes + 4032 name bytes is exactly one cluster.
    case("qed-unsafe-long", false, &|fx| {
        fx.create("qed", "ov.qed", "1M", &["-o", "cluster_size=4096"]);
        let name = format!("{}.qcow2", "d/".repeat(2013));
        assert_eq!(name.len(), 4032);
        vec!["-u".into(), "-b".into(), name, "-F".into(), "qcow2".into()]
    });
}

#[test]
fn unsafe_clears_unknown_autoclear_bits() {
    case("qed-unsafe-autoclear", false, &|fx| {
        basic(fx, &[]);
        fx.edit("ov.qed", |b| b[32] = 0x81);
        s(&["-u", "-b", "other.raw", "-F", "raw"])
    });
}

#[test]
fn unsafe_relative_names_in_subdirectories() {
    run_case(&Case {
        name: "qed-unsafe-relative",
        overlay: "sub/ov.qed",
        fmt: "qed",
        probe: true,
        unclean: false,
        build: &|fx| {
            raw_with(fx, "base.raw", "1M", &["write -P 0x11 0 1M"]);
            fx.create("qcow2", "new.qcow2", "1M", &[]);
            fx.create(
                "qed",
                "sub/ov.qed",
                "1M",
                &["-b", "../base.raw", "-F", "raw"],
            );
            s(&["-u", "-b", "../new.qcow2", "-F", "qcow2"])
        },
    });
}

#[test]
fn safe_onto_qcow2() {
    case("qed-safe-qcow2", true, &|fx| {
        basic(fx, &[]);
        s(&["-b", "new.qcow2", "-F", "qcow2"])
    });
}

#[test]
fn safe_detach() {
    case("qed-safe-detach", false, &|fx| {
        basic(fx, &[]);
        s(&["-b", ""])
    });
}

#[test]
fn safe_relative_names_in_subdirectories() {
    run_case(&Case {
        name: "qed-safe-relative",
        overlay: "sub/ov.qed",
        fmt: "qed",
        probe: true,
        unclean: false,
        build: &|fx| {
            raw_with(fx, "base.raw", "1M", &["write -P 0x11 0 1M"]);
            fx.create("qcow2", "new.qcow2", "1M", &[]);
            fx.io("qcow2", "new.qcow2", &["write -P 0x22 64k 64k"]);
            fx.create(
                "qed",
                "sub/ov.qed",
                "1M",
                &["-b", "../base.raw", "-F", "raw"],
            );
            s(&["-b", "../new.qcow2", "-F", "qcow2"])
        },
    });
}

#[test]
fn safe_onto_a_long_name() {
    // 3000 bytes: past qcow2's 1023-byte limit, inside a qed header cluster; the new
    // backing exists (and is probed without -F).
    case("qed-safe-long", true, &|fx| {
        basic(fx, &[]);
        let name = fx.long_name(3000, "new.qcow2");
        vec!["-b".into(), name, "-F".into(), "qcow2".into()]
    });
}

#[test]
fn safe_old_backing_shorter_writes_zeroes() {
    // Past the old backing's end qemu-img writes zeroes: zero clusters in qed.
    case("qed-safe-short-old", true, &|fx| {
        raw_with(fx, "old.raw", "1M", &["write -P 0x11 0 1M"]);
        raw_with(fx, "new.raw", "4M", &["write -P 0x22 0 4M"]);
        fx.create("qed", "ov.qed", "4M", &["-b", "old.raw", "-F", "raw"]);
        fx.io("qed", "ov.qed", &["write -P 0x33 2M 64k"]);
        s(&["-b", "new.raw", "-F", "raw"])
    });
}

#[test]
fn safe_without_old_backing_sets_and_clears_need_check() {
    case("qed-safe-no-old", true, &|fx| {
        fx.create("qcow2", "new.qcow2", "16M", &[]);
        fx.io(
            "qcow2",
            "new.qcow2",
            &["write -P 0x22 0 5M", "write -P 0x23 9M 3M"],
        );
        fx.create(
            "qed",
            "ov.qed",
            "16M",
            &["-o", "cluster_size=4096,table_size=2"],
        );
        fx.io(
            "qed",
            "ov.qed",
            &["write -P 0x33 4000k 64k", "write -z 10M 128k"],
        );
        s(&["-b", "new.qcow2", "-F", "qcow2"])
    });
}

#[test]
fn safe_small_clusters_cross_l2_tables() {
    // 4 KiB clusters, 2-cluster tables: each L2 table maps 4 MiB.
    case("qed-safe-l2", true, &|fx| {
        raw_with(fx, "old.raw", "3M", &["write -P 0x44 0 3M"]);
        fx.create("qcow2", "new.qcow2", "16M", &[]);
        fx.io(
            "qcow2",
            "new.qcow2",
            &["write -P 0x22 0 5M", "write -P 0x23 9M 3M"],
        );
        fx.create(
            "qed",
            "ov.qed",
            "16M",
            &[
                "-o",
                "cluster_size=4096,table_size=2",
                "-b",
                "old.raw",
                "-F",
                "raw",
            ],
        );
        fx.io("qed", "ov.qed", &["write -P 0x33 4000k 64k"]);
        s(&["-b", "new.qcow2", "-F", "qcow2"])
    });
}

#[test]
fn safe_partial_last_cluster_is_filled_from_the_old_backing() {
    // 1 MiB + 512: the last cluster is partly beyond the image; QEMU fills the rest of
    // it from the (longer) old backing file.
    case("qed-safe-tail", true, &|fx| {
        raw_with(fx, "old.raw", "2M", &["write -P 0x44 0 2M"]);
        raw_with(fx, "new.raw", "2M", &["write -P 0x55 0 2M"]);
        fx.create("qed", "ov.qed", "1049088", &["-b", "old.raw", "-F", "raw"]);
        s(&["-b", "new.raw", "-F", "raw"])
    });
}

#[test]
fn safe_unaligned_file_allocates_from_the_rounded_down_length() {
    case("qed-safe-unaligned", false, &|fx| {
        basic(fx, &[]);
        fx.edit("ov.qed", |b| b.extend_from_slice(&[0x77; 1000]));
        s(&["-b", "new.qcow2", "-F", "qcow2"])
    });
}

#[test]
fn safe_qed_chain_in_chain() {
    // ov.qed -> mid.qed -> base.qcow2; -b names base.qcow2 (QEMU's in-chain path).
    case("qed-safe-in-chain", true, &|fx| {
        fx.create("qcow2", "base.qcow2", "4M", &[]);
        fx.io("qcow2", "base.qcow2", &["write -P 0x11 0 4M"]);
        fx.create("qed", "mid.qed", "4M", &["-b", "base.qcow2", "-F", "qcow2"]);
        fx.io(
            "qed",
            "mid.qed",
            &["write -P 0x22 1M 1M", "write -z 3M 64k"],
        );
        fx.create("qed", "ov.qed", "4M", &["-b", "mid.qed", "-F", "qed"]);
        fx.io("qed", "ov.qed", &["write -P 0x33 1536k 64k"]);
        s(&["-b", "base.qcow2", "-F", "qcow2"])
    });
}

#[test]
fn safe_qcow2_over_a_qed_backing() {
    run_case(&Case {
        name: "qed-backing",
        overlay: "top.qcow2",
        fmt: "qcow2",
        probe: true,
        unclean: false,
        build: &|fx| {
            fx.create("qcow2", "base.qcow2", "4M", &[]);
            fx.io("qcow2", "base.qcow2", &["write -P 0x11 0 4M"]);
            fx.create("qed", "mid.qed", "4M", &["-b", "base.qcow2", "-F", "qcow2"]);
            fx.io(
                "qed",
                "mid.qed",
                &["write -P 0x22 1M 1M", "write -z 3M 64k"],
            );
            fx.create("qcow2", "top.qcow2", "4M", &["-b", "mid.qed", "-F", "qed"]);
            s(&["-b", "base.qcow2", "-F", "qcow2"])
        },
    });
}

#[test]
fn safe_dirty_image_is_repaired_as_qemu_repairs_it() {
    // QED_F_NEED_CHECK with an L2 entry past the end of the file and an L1 entry past it.
    dirty_case("qed-safe-dirty", &|fx| {
        raw_with(fx, "base.raw", "16M", &["write -P 0x11 0 16M"]);
        fx.create("raw", "new.raw", "16M", &[]);
        fx.create(
            "qed",
            "ov.qed",
            "16M",
            &[
                "-o",
                "cluster_size=4096,table_size=2",
                "-b",
                "base.raw",
                "-F",
                "raw",
            ],
        );
        fx.io(
            "qed",
            "ov.qed",
            &[
                "write -P 0x33 8k 4k",
                "write -P 0x34 5M 128k",
                "write -P 0x35 9M 64k",
            ],
        );
        fx.edit("ov.qed", |b| {
            let l1 = le64(b, 40) as usize;
            let l2 = le64(b, l1) as usize;
            b[l2 + 8 * 2..l2 + 8 * 3].copy_from_slice(&0x1000_0000u64.to_le_bytes());
            b[l1 + 24..l1 + 32].copy_from_slice(&0x700_0000u64.to_le_bytes());
            b[16] |= 2;
        });
        s(&["-b", "new.raw", "-F", "raw"])
    });
}

#[test]
fn unsafe_dirty_image_is_repaired_as_qemu_repairs_it() {
    // Also a second L1 entry sharing the first one's L2 table: QEMU's check counts it
    // and looks no further into that table (nothing is written through it here).
    dirty_case("qed-unsafe-dirty", &|fx| {
        basic(fx, &[]);
        fx.edit("ov.qed", |b| {
            let l1 = le64(b, 40) as usize;
            let l2 = le64(b, l1) as usize;
            b[l1 + 8..l1 + 16].copy_from_slice(&(l2 as u64).to_le_bytes());
            b[l2 + 8 * 8..l2 + 8 * 9].copy_from_slice(&0x1000_0000u64.to_le_bytes());
            b[16] |= 2;
        });
        s(&["-u", "-b", "new.qcow2", "-F", "qcow2"])
    });
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[test]
fn error_name_does_not_fit_in_the_header() {
    run_error("qed-err-nospace", "ov.qed", &|fx| {
        fx.create("qed", "ov.qed", "1M", &["-o", "cluster_size=4096"]);
        let name = format!("{}.qcow2", "d/".repeat(2014));
        vec!["-u".into(), "-b".into(), name, "-F".into(), "qcow2".into()]
    });
}

#[test]
fn error_unknown_compat_feature_refuses_a_new_name() {
    run_error("qed-err-compat", "ov.qed", &|fx| {
        basic(fx, &[]);
        fx.edit("ov.qed", |b| b[24] = 1);
        s(&["-u", "-b", "x.raw", "-F", "raw"])
    });
}

#[test]
fn error_unsupported_feature() {
    run_error("qed-err-feature", "ov.qed", &|fx| {
        basic(fx, &[]);
        fx.edit("ov.qed", |b| b[16] |= 8);
        s(&["-u", "-b", "x.raw", "-F", "raw"])
    });
}

#[test]
fn error_l1_table_outside_the_file() {
    run_error("qed-err-l1", "ov.qed", &|fx| {
        basic(fx, &[]);
        fx.edit("ov.qed", |b| {
            b[40..48].copy_from_slice(&(1u64 << 40).to_le_bytes())
        });
        s(&["-b", "new.qcow2", "-F", "qcow2"])
    });
}

#[test]
fn error_table_size_one_never_opens() {
    run_error("qed-err-table1", "ov.qed", &|fx| {
        fx.create("qed", "ov.qed", "1M", &["-o", "table_size=1"]);
        s(&["-u", "-b", ""])
    });
}

#[test]
fn error_l2_entry_outside_the_file() {
    run_error("qed-err-l2", "ov.qed", &|fx| {
        basic(fx, &[]);
        fx.edit("ov.qed", |b| {
            let l1 = le64(b, 40) as usize;
            let l2 = le64(b, l1) as usize;
            b[l2 + 8 * 8..l2 + 8 * 9].copy_from_slice(&0x1000_0000u64.to_le_bytes());
        });
        s(&["-b", "new.qcow2", "-F", "qcow2"])
    });
}

#[test]
fn error_backing_name_past_the_header() {
    run_error("qed-err-name", "ov.qed", &|fx| {
        basic(fx, &[]);
        fx.edit("ov.qed", |b| {
            b[60..64].copy_from_slice(&70000u32.to_le_bytes())
        });
        s(&["-u", "-b", ""])
    });
}

#[test]
fn error_not_qed_with_f_qed() {
    run_error("qed-err-magic", "ov.qed", &|fx| {
        raw_with(fx, "ov.qed", "1M", &["write -P 0x11 0 4k"]);
        s(&["-u", "-f", "qed", "-b", ""])
    });
}

/// qemu-io writes and zero writes at random sector offsets, some cluster-sized.
fn random_ops(rng: &mut Rng, size: u64, cs: u64, n: usize) -> Vec<String> {
    let mut ops = Vec::new();
    for _ in 0..n {
        let off = rng.below(size / 512) * 512;
        let lens = [
            512,
            4096,
            cs,
            2 * cs,
            (1 + rng.below(63)) * 512,
            3 * cs + 512,
        ];
        let len = (*rng.pick(&lens)).min(size - off);
        if rng.below(10) < 7 {
            ops.push(format!("write -P {} {off} {len}", 1 + rng.below(254)));
        } else {
            ops.push(format!("write -z {off} {len}"));
        }
    }
    ops
}

/// One random scenario: cluster and table size, image size, old and new backing (raw,
/// qcow2 or qed, shorter or longer than the overlay, or none) and the mode.
fn random_fixture(fx: &Fx, seed: u64) -> Vec<String> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let cs = *rng.pick(&[4096u64, 8192, 65536]);
    let ts = *rng.pick(&[2u64, 4, 8]);
    let size = ((1 + rng.below(23)) * 512 * *rng.pick(&[1u64, 8, 256, 2048])).max(512);
    let fmts = ["raw", "qcow2", "qed"];
    let mut opts = vec![format!("cluster_size={cs},table_size={ts}")];
    if rng.below(4) != 0 {
        let f = *rng.pick(&fmts);
        let osz = *rng.pick(&[size, (size / 2 / 512 * 512).max(512), size + 3 * cs]);
        let name = format!("old.{f}");
        fx.create(f, &name, &osz.to_string(), &[]);
        let ops = random_ops(&mut rng, osz, cs, 6);
        fx.io(
            f,
            &name,
            &ops.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        opts.extend(["-b".into(), name, "-F".into(), f.into()]);
    }
    let f = *rng.pick(&fmts);
    let nsz = *rng.pick(&[size, (size / 3 / 512 * 512).max(512), size + cs]);
    let new = format!("new.{f}");
    fx.create(f, &new, &nsz.to_string(), &[]);
    let ops = random_ops(&mut rng, nsz, cs, 6);
    fx.io(f, &new, &ops.iter().map(String::as_str).collect::<Vec<_>>());
    let mut create = vec!["-o"];
    create.extend(opts.iter().map(String::as_str));
    fx.create("qed", "ov.qed", &size.to_string(), &create);
    let ops = random_ops(&mut rng, size, cs, 5);
    fx.io(
        "qed",
        "ov.qed",
        &ops.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    match rng.below(4) {
        0 => s(&["-b", ""]),
        1 => vec!["-u".into(), "-b".into(), new, "-F".into(), f.into()],
        _ => vec!["-b".into(), new, "-F".into(), f.into()],
    }
}

#[test]
fn random_scenarios() {
    for seed in 1..=16 {
        let name = format!("qed-random-{seed}");
        case(&name, false, &move |fx| random_fixture(fx, seed));
    }
}

/// A rebase that would write through a cluster two structures share: instar refuses
/// with nothing written; qemu-img (which has no overlap check for qed) goes ahead and
/// leaves an image that `qemu-img check` rejects or whose content changed.
fn run_refusal(name: &str, build: &Build) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new(name);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    let argv = rebase_argv(&build(&fx), "ov.qed");
    let dir = scratch.copy("subject");
    let got = run(subject.path(), &argv, &dir);
    if subject.is_instar() {
        assert_eq!(got.status, 1, "{name}: instar must refuse: {}", got.stderr);
        assert!(
            got.stderr.contains("Preventing invalid write on metadata"),
            "{name}: {}",
            got.stderr
        );
        assert!(
            snapshot(&scratch.fixture()) == snapshot(&dir),
            "{name}: a file changed"
        );
    }
    let q = scratch.copy("qemu");
    let out = run(&refs.v10_2.img, &argv, &q);
    assert_eq!(out.status, 0, "{name}: qemu-img: {}", out.stderr);
    let orig = scratch.fixture().join("ov.qed");
    let orig = orig.to_string_lossy();
    let same = run(&refs.v10_2.img, &["compare", &*orig, "ov.qed"], &q).status == 0;
    let clean = check_clean(&refs.v10_2, &q, "ov.qed", "qed").is_none();
    assert!(
        !(same && clean),
        "{name}: qemu-img's result is fine, so the refusal is not needed"
    );
}

#[test]
fn refusal_an_l2_entry_points_at_its_own_table() {
    run_refusal("qed-refuse-self", &|fx| {
        basic(fx, &["-o", "cluster_size=4096,table_size=2"]);
        fx.create("raw", "new.raw", "4M", &[]);
        fx.edit("ov.qed", |b| {
            let l1 = le64(b, 40) as usize;
            let l2 = le64(b, l1);
            let at = l2 as usize + 8 * 4;
            b[at..at + 8].copy_from_slice(&l2.to_le_bytes());
        });
        s(&["-b", "new.raw", "-F", "raw"])
    });
}

#[test]
fn refusal_two_l1_entries_share_an_l2_table() {
    // 4 KiB clusters, 2-cluster tables: each L2 table maps 4 MiB.
    run_refusal("qed-refuse-shared", &|fx| {
        raw_with(fx, "base.raw", "8M", &["write -P 0x11 0 8M"]);
        fx.create("raw", "new.raw", "8M", &[]);
        fx.create(
            "qed",
            "ov.qed",
            "8M",
            &[
                "-o",
                "cluster_size=4096,table_size=2",
                "-b",
                "base.raw",
                "-F",
                "raw",
            ],
        );
        fx.io("qed", "ov.qed", &["write -P 0x33 64k 4k"]);
        fx.edit("ov.qed", |b| {
            let l1 = le64(b, 40) as usize;
            let l2 = le64(b, l1);
            b[l1 + 8..l1 + 16].copy_from_slice(&l2.to_le_bytes());
        });
        s(&["-b", "new.raw", "-F", "raw"])
    });
}
