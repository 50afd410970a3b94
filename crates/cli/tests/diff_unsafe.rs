//! Differential tests for unsafe-mode rebase (`rebase -u`): for each scenario the overlay
//! left by `instar rebase -u` must be byte-identical to the one `qemu-img rebase -u` 10.2
//! leaves and to the one 11.1 (the newest release) leaves (10.0 and 7.2 are compared with
//! 10.2 too), `qemu-img info --output=json` must be equal under every reference build, and
//! `qemu-img check` must be clean.
//!
//! qemu-img needs `-F` whenever `-b` is not empty; instar probes the new backing when `-F`
//! is absent. So scenarios whose new backing exists also run instar without `-F`, and that
//! run must equal qemu-img's run with the probed format given explicitly.

mod qemu;

use qemu::*;
use std::path::Path;

type Build = dyn Fn(&Fx) -> Vec<Vec<String>>;
type Post = dyn Fn(&Qemu, &Path) -> Result<(), String>;

struct Case<'a> {
    name: &'a str,
    /// Overlay path relative to the fixture directory (and the working directory).
    overlay: &'a str,
    /// Also run instar without `-F` (the new backing exists and must be probed).
    probe: bool,
    /// Reference builds known to produce a different file, with the documented reason.
    version_notes: &'a [(&'a str, &'a str)],
    /// Builds the fixture and returns the rebase steps (qemu-img arguments, with `-F`).
    build: &'a Build,
    /// An extra check run in each result directory (with qemu-img 10.2).
    post: Option<&'a Post>,
}

/// The arguments of one `rebase` call, `FILE` last.
fn rebase_argv(step: &[String], overlay: &str) -> Vec<String> {
    let mut v = vec!["rebase".to_string()];
    v.extend(step.iter().cloned());
    v.push(overlay.to_string());
    v
}

fn detaches(step: &[String]) -> bool {
    step.windows(2).any(|w| w[0] == "-b" && w[1].is_empty())
}

fn run_case(c: &Case) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new(c.name);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    let steps = (c.build)(&fx);
    let mut failures: Vec<String> = Vec::new();

    // Reference results, per build: the overlay bytes after each step.
    let mut reference: Vec<(&Qemu, std::path::PathBuf, Vec<Vec<u8>>)> = Vec::new();
    for q in refs.all() {
        let dir = scratch.copy(&format!("qemu-{}", q.label));
        let mut after = Vec::new();
        for step in &steps {
            let argv = rebase_argv(step, c.overlay);
            let out = run(&q.img, &argv, &dir);
            let msg = format!(
                "qemu-img {} failed ({}): {}",
                q.label,
                show_cmd("qemu-img", &argv),
                out.stderr
            );
            if q.label == refs.v10_2.label {
                assert_eq!(out.status, 0, "{msg}");
                assert_eq!(out.stdout, "", "qemu-img 10.2 printed on stdout");
            } else if out.status != 0 {
                failures.push(msg);
            }
            after.push(std::fs::read(dir.join(c.overlay)).expect("read overlay"));
        }
        reference.push((q, dir, after));
    }
    let (_, ref_dir, ref_after) = &reference[0];
    if let Some(p) = check_problems(&refs.v10_2, ref_dir, c.overlay) {
        panic!("qemu-img 10.2's own result is not clean: {p}");
    }
    for (q, _, after) in &reference[1..] {
        for (i, (a, b)) in ref_after.iter().zip(after).enumerate() {
            if let Some(d) = describe_diff(a, b) {
                match c.version_notes.iter().find(|(l, _)| *l == q.label) {
                    Some((_, why)) => {
                        eprintln!("note: qemu-img {} differs from 10.2 ({why}): {d}", q.label)
                    }
                    None => failures.push(format!(
                        "qemu-img {} result differs from 10.2 after step {}: {d}",
                        q.label,
                        i + 1
                    )),
                }
            }
        }
    }

    // The subject, with -F as given and, when asked, without -F.
    let mut variants: Vec<(&str, Vec<Vec<String>>)> = vec![("with-F", steps.clone())];
    if c.probe {
        let stripped = steps
            .iter()
            .map(|s| match subject {
                Subject::Instar(_) => strip_backing_format(s).0,
                // qemu-img cannot probe: the self-test keeps -F.
                Subject::SelfTest(_) => s.clone(),
            })
            .collect();
        variants.push(("probed", stripped));
    }
    for (label, vsteps) in variants {
        let dir = scratch.copy(&format!("subject-{label}"));
        for (i, step) in vsteps.iter().enumerate() {
            let argv = rebase_argv(step, c.overlay);
            let shown = format!("cd {}; {}", dir.display(), show_cmd("instar", &argv));
            let out = run(subject.path(), &argv, &dir);
            if out.status != 0 {
                failures.push(format!(
                    "{shown}\n  exit {} (expected 0), stderr: {}",
                    out.status,
                    out.stderr.trim_end()
                ));
                break;
            }
            if subject.is_instar() {
                let quiet = step.iter().any(|a| a == "-q" || a == "--quiet");
                let want = if quiet {
                    ""
                } else if detaches(step) {
                    "Image detached.\n"
                } else {
                    "Image rebased.\n"
                };
                if out.stdout != want || !out.stderr.is_empty() {
                    failures.push(format!(
                        "{shown}\n  stdout {:?} (expected {want:?}), stderr {:?}",
                        out.stdout, out.stderr
                    ));
                }
            }
            let got = std::fs::read(dir.join(c.overlay)).expect("read overlay");
            if let Some(d) = describe_diff(&ref_after[i], &got) {
                failures.push(format!(
                    "{shown}\n  overlay differs from qemu-img 10.2's: {d}"
                ));
            }
            // The newest release must give the same bytes too, unless documented.
            for (q, _, after) in &reference[1..] {
                let noted = c.version_notes.iter().any(|(l, _)| *l == q.label);
                if refs.newest().is_some_and(|n| n.label == q.label) && !noted {
                    if let Some(d) = describe_diff(&after[i], &got) {
                        failures.push(format!(
                            "{shown}\n  overlay differs from qemu-img {}'s: {d}",
                            q.label
                        ));
                    }
                }
            }
        }
        // No other file may change (backing files, external data files).
        let (ra, rb) = (snapshot(ref_dir), snapshot(&dir));
        for (path, bytes) in &ra {
            if path.as_path() != Path::new(c.overlay) && rb.get(path) != Some(bytes) {
                failures.push(format!(
                    "[{label}] {} differs or is missing",
                    path.display()
                ));
            }
        }
        for q in refs.all() {
            let a = info_json(q, ref_dir, c.overlay);
            let b = info_json(q, &dir, c.overlay);
            if a != b {
                failures.push(format!(
                    "[{label}] qemu-img {} info --output=json differs from the one of qemu-img 10.2's result:\n{}",
                    q.label,
                    line_diff(&a, &b)
                ));
            }
        }
        if let Some(p) = check_problems(&refs.v10_2, &dir, c.overlay) {
            failures.push(format!("[{label}] qemu-img check: {p}"));
        }
        if let Some(post) = c.post {
            if let Err(e) = post(&refs.v10_2, &dir) {
                failures.push(format!("[{label}] {e}"));
            }
        }
    }
    if let Some(post) = c.post {
        if let Err(e) = post(&refs.v10_2, ref_dir) {
            panic!("post-check fails on qemu-img 10.2's own result: {e}");
        }
    }
    assert!(
        failures.is_empty(),
        "scenario {}:\n{}",
        c.name,
        failures.join("\n")
    );
}

fn s(items: &[&str]) -> Vec<String> {
    items.iter().map(|x| x.to_string()).collect()
}

/// base.qcow2 (1 MiB, some data), base2.qcow2 an identical copy, ovl.qcow2 on base.qcow2.
fn chain(fx: &Fx, ovl_opts: &[&str]) {
    fx.create("qcow2", "base.qcow2", "1M", &[]);
    fx.io("qcow2", "base.qcow2", &["write -P 0x11 0 64k"]);
    std::fs::copy(fx.path("base.qcow2"), fx.path("base2.qcow2")).expect("copy");
    let mut o = vec!["-b", "base.qcow2", "-F", "qcow2"];
    o.extend_from_slice(ovl_opts);
    fx.create("qcow2", "ovl.qcow2", "1M", &o);
}

fn simple(name: &str, probe: bool, ovl_opts: &'static [&'static str], step: &[&str]) {
    let step = s(step);
    run_case(&Case {
        name,
        overlay: "ovl.qcow2",
        probe,
        version_notes: &[],
        build: &move |fx| {
            chain(fx, ovl_opts);
            vec![step.clone()]
        },
        post: None,
    });
}

#[test]
fn rename() {
    simple(
        "rename",
        true,
        &[],
        &["-u", "-b", "base2.qcow2", "-F", "qcow2"],
    );
}

#[test]
fn rename_with_explicit_overlay_format_and_cache_options() {
    simple(
        "rename-opts",
        true,
        &[],
        &[
            "-u",
            "-f",
            "qcow2",
            "-t",
            "writethrough",
            "-T",
            "unsafe",
            "-U",
            "-b",
            "base2.qcow2",
            "-F",
            "qcow2",
        ],
    );
}

#[test]
fn rename_quiet() {
    // -q: qemu-img prints nothing anyway; instar prints nothing either (checked below).
    let Some((refs, subject)) = setup() else {
        return;
    };
    simple(
        "rename-quiet-bytes",
        false,
        &[],
        &["-u", "-q", "-b", "base2.qcow2", "-F", "qcow2"],
    );
    let scratch = Scratch::new("rename-quiet");
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    chain(&fx, &[]);
    let out = run(
        subject.path(),
        &[
            "rebase",
            "-u",
            "-q",
            "-b",
            "base2.qcow2",
            "-F",
            "qcow2",
            "ovl.qcow2",
        ],
        &fx.dir,
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "", "-q must silence the success line");
}

#[test]
fn progress_output() {
    // `-p` prints QEMU's progress lines on stdout (scripts parse them); unsafe mode prints
    // 0 and 100. instar adds its success line after them.
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new("progress");
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    chain(&fx, &[]);
    let a = scratch.copy("qemu");
    let b = scratch.copy("subject");
    let argv = [
        "rebase",
        "-u",
        "-p",
        "-b",
        "base2.qcow2",
        "-F",
        "qcow2",
        "ovl.qcow2",
    ];
    let q = run(&refs.v10_2.img, &argv, &a);
    assert_eq!(q.status, 0);
    assert_eq!(q.stdout, "    (0.00/100%)\r    (100.00/100%)\r\n");
    if let Some(n) = refs.newest() {
        let r = run(&n.img, &argv, &scratch.copy("qemu-newest"));
        assert_eq!(
            (r.status, &r.stdout),
            (0, &q.stdout),
            "qemu-img {}",
            n.label
        );
    }
    let i = run(subject.path(), &argv, &b);
    assert_eq!(i.status, 0, "{}", i.stderr);
    let want = if subject.is_instar() {
        format!("{}Image rebased.\n", q.stdout)
    } else {
        q.stdout.clone()
    };
    assert_eq!(i.stdout, want, "instar {}", argv.join(" "));
    // -q cancels -p.
    let argv = [
        "rebase",
        "-u",
        "-p",
        "-q",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "ovl.qcow2",
    ];
    let q = run(&refs.v10_2.img, &argv, &a);
    let i = run(subject.path(), &argv, &b);
    assert_eq!((q.status, q.stdout.as_str()), (0, ""));
    assert_eq!(
        (i.status, i.stdout.as_str()),
        (0, ""),
        "instar {}",
        argv.join(" ")
    );
}

#[test]
fn rename_to_missing_backing() {
    // Unsafe mode never opens the new backing when -F is given.
    simple(
        "missing-backing",
        false,
        &[],
        &["-u", "-b", "does-not-exist.qcow2", "-F", "qcow2"],
    );
}

#[test]
fn rename_same_name_is_noop() {
    simple(
        "same-name",
        true,
        &[],
        &["-u", "-b", "base.qcow2", "-F", "qcow2"],
    );
}

#[test]
fn rename_name_with_space_and_utf8() {
    run_case(&Case {
        name: "odd-name",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            std::fs::copy(fx.path("base.qcow2"), fx.path("nouvelle base é.qcow2")).expect("copy");
            vec![s(&["-u", "-b", "nouvelle base é.qcow2", "-F", "qcow2"])]
        },
        post: None,
    });
}

#[test]
fn detach() {
    simple("detach", false, &[], &["-u", "-b", ""]);
}

#[test]
fn detach_ignores_backing_format() {
    simple("detach-F", false, &[], &["-u", "-b", "", "-F", "qcow2"]);
}

#[test]
fn attach_to_image_without_backing() {
    run_case(&Case {
        name: "attach",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            fx.create("qcow2", "base.qcow2", "1M", &[]);
            fx.create("qcow2", "ovl.qcow2", "1M", &[]);
            vec![s(&["-u", "-b", "base.qcow2", "-F", "qcow2"])]
        },
        post: None,
    });
}

#[test]
fn v2_overlay_rename() {
    simple(
        "v2-rename",
        true,
        &["-o", "compat=0.10"],
        &["-u", "-b", "base2.qcow2", "-F", "qcow2"],
    );
}

#[test]
fn v2_overlay_detach() {
    simple(
        "v2-detach",
        false,
        &["-o", "compat=0.10"],
        &["-u", "-b", ""],
    );
}

#[test]
fn relative_path_into_other_directory() {
    // The name is stored verbatim; instar's probe resolves it against sub/.
    run_case(&Case {
        name: "relative",
        overlay: "sub/ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            fx.create("qcow2", "sub/base.qcow2", "1M", &[]);
            fx.create("qcow2", "other/base.qcow2", "1M", &[]);
            fx.create(
                "qcow2",
                "sub/ovl.qcow2",
                "1M",
                &["-b", "base.qcow2", "-F", "qcow2"],
            );
            vec![s(&["-u", "-b", "../other/base.qcow2", "-F", "qcow2"])]
        },
        post: None,
    });
}

#[test]
fn absolute_path() {
    run_case(&Case {
        name: "absolute",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            // Outside the per-tool copies, so every run stores the same absolute name.
            let abs = fx.dir.parent().expect("parent").join("abs");
            std::fs::create_dir_all(&abs).expect("mkdir");
            let target = abs.join("base.qcow2");
            std::fs::copy(fx.path("base.qcow2"), &target).expect("copy");
            vec![s(&[
                "-u",
                "-b",
                target.to_str().expect("utf-8"),
                "-F",
                "qcow2",
            ])]
        },
        post: None,
    });
}

#[test]
fn raw_backing_format() {
    run_case(&Case {
        name: "raw-backing",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            fx.create("raw", "base.raw", "1M", &[]);
            fx.io("raw", "base.raw", &["write -P 0x22 0 4k"]);
            vec![s(&["-u", "-b", "base.raw", "-F", "raw"])]
        },
        post: None,
    });
}

#[test]
fn any_driver_name_as_backing_format() {
    // iotest 031: -F accepts any block driver name, protocols included.
    simple(
        "host-device",
        false,
        &[],
        &["-u", "-b", "/some/backing/file/path", "-F", "host_device"],
    );
}

fn small_cluster_name(len: usize) -> impl Fn(&Fx) -> Vec<Vec<String>> {
    move |fx| {
        fx.create("qcow2", "base.qcow2", "1M", &[]);
        fx.create("qcow2", "ovl.qcow2", "1M", &["-o", "cluster_size=512"]);
        let name = fx.long_name(len, "base.qcow2");
        vec![vec![
            "-u".into(),
            "-b".into(),
            name,
            "-F".into(),
            "qcow2".into(),
        ]]
    }
}

#[test]
fn name_exactly_fills_512_byte_cluster() {
    // v3, 512-byte clusters, -F qcow2: the name starts at 136, so 376 bytes fill the
    // cluster to its last byte.
    let build = small_cluster_name(376);
    run_case(&Case {
        name: "fits-512",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &build,
        post: Some(&|_, dir| {
            let b = std::fs::read(dir.join("ovl.qcow2")).map_err(|e| e.to_string())?;
            match (be64(&b, off::BACKING_OFFSET), be32(&b, off::BACKING_SIZE)) {
                (136, 376) => Ok(()),
                other => Err(format!(
                    "backing offset/size {other:?}, expected (136, 376)"
                )),
            }
        }),
    });
}

#[test]
fn name_of_1023_bytes() {
    run_case(&Case {
        name: "name-1023",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            let name = fx.long_name(1023, "base.qcow2");
            vec![vec![
                "-u".into(),
                "-b".into(),
                name,
                "-F".into(),
                "qcow2".into(),
            ]]
        },
        post: None,
    });
}

/// Three unknown extensions A, B, C (odd lengths, so padding matters).
fn add_unknown_exts(h: &mut Qcow2Header) {
    let unknown = [
        Ext {
            magic: 0x1234_5678,
            data: b"AAAAA".to_vec(),
        },
        Ext {
            magic: 0x2345_6789,
            data: b"BBBBBBBB".to_vec(),
        },
        Ext {
            magic: 0x3456_789a,
            data: vec![b'C'; 31],
        },
    ];
    // After the known ones, in the order A, B, C.
    h.exts.extend(unknown);
}

#[test]
fn unknown_extensions_reversed_by_each_rewrite() {
    // Each rewrite reverses the unknown extensions: A,B,C → C,B,A → A,B,C.
    run_case(&Case {
        name: "unknown-exts",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            fx.edit_header("ovl.qcow2", add_unknown_exts);
            vec![
                s(&["-u", "-b", "base2.qcow2", "-F", "qcow2"]),
                s(&["-u", "-b", "base.qcow2", "-F", "qcow2"]),
            ]
        },
        post: Some(&|_, dir| {
            let b = std::fs::read(dir.join("ovl.qcow2")).map_err(|e| e.to_string())?;
            let magics: Vec<u32> = Qcow2Header::parse(&b)
                .exts
                .iter()
                .map(|e| e.magic)
                .filter(|m| m & 0xf000_0000 != 0xe000_0000 && *m != EXT_FEATURE_TABLE)
                .collect();
            if magics == [0x1234_5678, 0x2345_6789, 0x3456_789a] {
                Ok(())
            } else {
                Err(format!(
                    "unknown extensions after two rewrites: {magics:x?}"
                ))
            }
        }),
    });
}

#[test]
fn unknown_extensions_detach_v2() {
    run_case(&Case {
        name: "unknown-exts-v2",
        overlay: "ovl.qcow2",
        probe: false,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &["-o", "compat=0.10"]);
            fx.edit_header("ovl.qcow2", add_unknown_exts);
            vec![s(&["-u", "-b", ""])]
        },
        post: None,
    });
}

#[test]
fn garbage_after_name_and_in_padding_is_wiped() {
    run_case(&Case {
        name: "garbage",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            fx.edit_header("ovl.qcow2", |h| {
                add_unknown_exts(h);
                h.pad = 0xee;
                h.trailer = vec![0x5a; 300];
            });
            vec![s(&["-u", "-b", "base2.qcow2", "-F", "qcow2"])]
        },
        post: None,
    });
}

#[test]
fn header_length_104() {
    run_case(&Case {
        name: "hl-104",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            fx.edit_header("ovl.qcow2", |h| h.set_header_length(104, 0));
            vec![s(&["-u", "-b", "base2.qcow2", "-F", "qcow2"])]
        },
        post: Some(&|_, dir| {
            let b = std::fs::read(dir.join("ovl.qcow2")).map_err(|e| e.to_string())?;
            match be32(&b, off::HEADER_LENGTH) {
                112 => Ok(()),
                n => Err(format!("header_length {n}, expected 112")),
            }
        }),
    });
}

#[test]
fn header_length_120() {
    // The 8 bytes of unknown header fields after byte 112 are kept verbatim.
    run_case(&Case {
        name: "hl-120",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            fx.edit_header("ovl.qcow2", |h| h.set_header_length(120, 0xab));
            vec![s(&["-u", "-b", "base2.qcow2", "-F", "qcow2"])]
        },
        post: Some(&|_, dir| {
            let b = std::fs::read(dir.join("ovl.qcow2")).map_err(|e| e.to_string())?;
            if be32(&b, off::HEADER_LENGTH) == 120 && b[112..120] == [0xab; 8] {
                Ok(())
            } else {
                Err("unknown header fields not kept".into())
            }
        }),
    });
}

#[test]
fn virtual_size_not_multiple_of_512() {
    // The size is rounded down to 512 by the rewrite (1048576+1000 → 1049088).
    run_case(&Case {
        name: "odd-size",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            fx.edit("ovl.qcow2", |b| put64(b, off::SIZE, 1_048_576 + 1000));
            vec![s(&["-u", "-b", "base2.qcow2", "-F", "qcow2"])]
        },
        post: Some(&|_, dir| {
            let b = std::fs::read(dir.join("ovl.qcow2")).map_err(|e| e.to_string())?;
            match be64(&b, off::SIZE) {
                1_049_088 => Ok(()),
                n => Err(format!("size {n}, expected 1049088")),
            }
        }),
    });
}

#[test]
fn feature_table_64k_clusters() {
    simple(
        "feature-table-64k",
        true,
        &[],
        &["-u", "-b", "base2.qcow2", "-F", "qcow2"],
    );
}

#[test]
fn no_feature_table_4k_clusters() {
    simple(
        "no-feature-table-4k",
        true,
        &["-o", "cluster_size=4096"],
        &["-u", "-b", "base2.qcow2", "-F", "qcow2"],
    );
}

#[test]
fn feature_table_dropped_for_4k_clusters() {
    // A feature table found in a 4 KiB-cluster image is not written back.
    run_case(&Case {
        name: "feature-table-dropped",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &["-o", "cluster_size=4096"]);
            fx.edit_header("ovl.qcow2", |h| {
                let mut data = Vec::new();
                for (ty, bit, name) in [(0u8, 0u8, "dirty bit"), (1, 0, "lazy refcounts")] {
                    let mut e = [0u8; 48];
                    e[0] = ty;
                    e[1] = bit;
                    e[2..2 + name.len()].copy_from_slice(name.as_bytes());
                    data.extend_from_slice(&e);
                }
                h.exts.push(Ext {
                    magic: EXT_FEATURE_TABLE,
                    data,
                });
            });
            vec![s(&["-u", "-b", "base2.qcow2", "-F", "qcow2"])]
        },
        post: None,
    });
}

#[test]
fn external_data_file() {
    run_case(&Case {
        name: "data-file",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            fx.create("qcow2", "base.qcow2", "1M", &[]);
            std::fs::copy(fx.path("base.qcow2"), fx.path("base2.qcow2")).expect("copy");
            fx.create(
                "qcow2",
                "ovl.qcow2",
                "1M",
                &[
                    "-o",
                    "data_file=ovl.data",
                    "-b",
                    "base.qcow2",
                    "-F",
                    "qcow2",
                ],
            );
            fx.io("qcow2", "ovl.qcow2", &["write -P 0x33 64k 64k"]);
            vec![s(&["-u", "-b", "base2.qcow2", "-F", "qcow2"])]
        },
        post: None,
    });
}

#[test]
fn external_raw_data_file_detach() {
    // data_file_raw refuses a backing file, but detaching is allowed.
    run_case(&Case {
        name: "data-file-raw-detach",
        overlay: "ovl.qcow2",
        probe: false,
        version_notes: &[],
        build: &|fx| {
            fx.create(
                "qcow2",
                "ovl.qcow2",
                "1M",
                &["-o", "data_file=ovl.data,data_file_raw=on"],
            );
            vec![s(&["-u", "-b", ""])]
        },
        post: None,
    });
}

#[test]
fn clusters_2m() {
    simple(
        "2m-clusters",
        true,
        &["-o", "cluster_size=2M"],
        &["-u", "-b", "base2.qcow2", "-F", "qcow2"],
    );
}

#[test]
fn extended_l2() {
    simple(
        "extended-l2",
        true,
        &["-o", "extended_l2=on"],
        &["-u", "-b", "base2.qcow2", "-F", "qcow2"],
    );
}

#[test]
fn zstd_compression_type() {
    simple(
        "zstd",
        true,
        &["-o", "compression_type=zstd"],
        &["-u", "-b", "base2.qcow2", "-F", "qcow2"],
    );
}

#[test]
fn lazy_refcounts_clean() {
    simple(
        "lazy-refcounts",
        true,
        &["-o", "lazy_refcounts=on"],
        &["-u", "-b", "base2.qcow2", "-F", "qcow2"],
    );
}

#[test]
fn refcount_bits_64() {
    simple(
        "refcount-64",
        true,
        &["-o", "refcount_bits=64"],
        &["-u", "-b", "base2.qcow2", "-F", "qcow2"],
    );
}

#[test]
fn unknown_autoclear_bits_cleared() {
    run_case(&Case {
        name: "autoclear",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            fx.edit("ovl.qcow2", |b| {
                put64(b, off::AUTOCLEAR, 0x8000_0000_0000_0004)
            });
            vec![s(&["-u", "-b", "base2.qcow2", "-F", "qcow2"])]
        },
        post: Some(&|_, dir| {
            let b = std::fs::read(dir.join("ovl.qcow2")).map_err(|e| e.to_string())?;
            match be64(&b, off::AUTOCLEAR) {
                0 => Ok(()),
                n => Err(format!("autoclear {n:#x}, expected 0")),
            }
        }),
    });
}

#[test]
fn internal_snapshot_kept() {
    run_case(&Case {
        name: "snapshot",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            fx.io("qcow2", "ovl.qcow2", &["write -P 0x44 0 64k"]);
            fx.img(&["snapshot", "-c", "s1", "ovl.qcow2"]);
            vec![s(&["-u", "-b", "base2.qcow2", "-F", "qcow2"])]
        },
        post: None,
    });
}

#[test]
fn data_kept_64m_overlay() {
    // A 64 MiB overlay with data written by qemu-io, rebased onto an identical copy of its
    // backing: the guest-visible content must not change.
    run_case(&Case {
        name: "data-64m",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            fx.create("qcow2", "base.qcow2", "64M", &[]);
            fx.io(
                "qcow2",
                "base.qcow2",
                &[
                    "write -P 0x11 0 1M",
                    "write -P 0x12 32M 64k",
                    "write -z 1M 64k",
                ],
            );
            std::fs::copy(fx.path("base.qcow2"), fx.path("base2.qcow2")).expect("copy");
            fx.create(
                "qcow2",
                "ovl.qcow2",
                "64M",
                &["-b", "base.qcow2", "-F", "qcow2"],
            );
            fx.io(
                "qcow2",
                "ovl.qcow2",
                &[
                    "write -P 0x55 64k 128k",
                    "write -P 0x66 10M 4k",
                    "write -z 32M 64k",
                    "write -c -P 0x77 40M 64k",
                    "write -P 0x88 63M 1M",
                ],
            );
            std::fs::copy(fx.path("ovl.qcow2"), fx.path("pre.qcow2")).expect("copy");
            vec![s(&["-u", "-b", "base2.qcow2", "-F", "qcow2"])]
        },
        post: Some(&|q, dir| {
            let out = run(
                &q.img,
                &[
                    "compare",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "pre.qcow2",
                    "ovl.qcow2",
                ],
                dir,
            );
            if out.status == 0 {
                Ok(())
            } else {
                Err(format!(
                    "qemu-img compare pre.qcow2 ovl.qcow2: exit {} {}{}",
                    out.status, out.stdout, out.stderr
                ))
            }
        }),
    });
}

#[test]
fn long_options_and_backing_format_alias() {
    // 10.2 spells -F as -B (`--backing-format`) and has long options; instar accepts them.
    // Compared with 10.2 and 11.1 only: 10.0 and 7.2 lack -B.
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new("long-options");
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    chain(&fx, &[]);
    for argv in [
        vec![
            "rebase",
            "-u",
            "-b",
            "base2.qcow2",
            "-B",
            "qcow2",
            "ovl.qcow2",
        ],
        vec![
            "rebase",
            "--backing-unsafe",
            "--format=qcow2",
            "--backing",
            "base2.qcow2",
            "--backing-format=qcow2",
            "--quiet",
            "ovl.qcow2",
        ],
    ] {
        let a = scratch.copy("qemu");
        let q = run(&refs.v10_2.img, &argv, &a);
        assert_eq!(q.status, 0, "qemu-img 10.2: {}", q.stderr);
        let b = scratch.copy("subject");
        let i = run(subject.path(), &argv, &b);
        let shown = format!("cd {}; {}", b.display(), show_cmd("instar", &argv));
        assert_eq!(i.status, 0, "{shown}: {}", i.stderr);
        let (x, y) = (
            std::fs::read(a.join("ovl.qcow2")).expect("read"),
            std::fs::read(b.join("ovl.qcow2")).expect("read"),
        );
        if let Some(d) = describe_diff(&x, &y) {
            panic!("{shown}: overlay differs from qemu-img 10.2's: {d}");
        }
        if let Some(n) = refs.newest() {
            let c = scratch.copy("qemu-newest");
            let r = run(&n.img, &argv, &c);
            assert_eq!(r.status, 0, "qemu-img {}: {}", n.label, r.stderr);
            let z = std::fs::read(c.join("ovl.qcow2")).expect("read");
            if let Some(d) = describe_diff(&z, &y) {
                panic!("{shown}: overlay differs from qemu-img {}'s: {d}", n.label);
            }
        }
    }
}

#[test]
fn probed_vmdk_backing() {
    run_case(&Case {
        name: "vmdk-backing",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            fx.create("vmdk", "base.vmdk", "1M", &[]);
            vec![s(&["-u", "-b", "base.vmdk", "-F", "vmdk"])]
        },
        post: None,
    });
}

#[test]
fn probed_empty_raw_backing() {
    // An empty file probes as raw.
    run_case(&Case {
        name: "empty-raw-backing",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            fx.write("empty.img", b"");
            vec![s(&["-u", "-b", "empty.img", "-F", "raw"])]
        },
        post: None,
    });
}

#[test]
fn overlay_through_symlink() {
    // The file named on the command line is a symlink; the header of its target changes.
    run_case(&Case {
        name: "symlink-overlay",
        overlay: "link.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            std::os::unix::fs::symlink("ovl.qcow2", fx.path("link.qcow2")).expect("symlink");
            vec![s(&["-u", "-b", "base2.qcow2", "-F", "qcow2"])]
        },
        post: None,
    });
}

#[test]
fn v2_name_exactly_fills_512_byte_cluster() {
    // v2 with -F: header 72 bytes, backing-format extension, end marker, name at 96;
    // 416 bytes fill the cluster.
    run_case(&Case {
        name: "v2-fits-512",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            fx.create("qcow2", "base.qcow2", "1M", &[]);
            fx.create(
                "qcow2",
                "ovl.qcow2",
                "1M",
                &["-o", "compat=0.10,cluster_size=512"],
            );
            let name = fx.long_name(416, "base.qcow2");
            vec![vec![
                "-u".into(),
                "-b".into(),
                name,
                "-F".into(),
                "qcow2".into(),
            ]]
        },
        post: Some(&|_, dir| {
            let b = std::fs::read(dir.join("ovl.qcow2")).map_err(|e| e.to_string())?;
            match (be64(&b, off::BACKING_OFFSET), be32(&b, off::BACKING_SIZE)) {
                (96, 416) => Ok(()),
                other => Err(format!("backing offset/size {other:?}, expected (96, 416)")),
            }
        }),
    });
}

#[test]
fn unknown_compatible_bit_kept() {
    run_case(&Case {
        name: "compat-bit",
        overlay: "ovl.qcow2",
        probe: true,
        version_notes: &[],
        build: &|fx| {
            chain(fx, &[]);
            fx.edit("ovl.qcow2", |b| put64(b, off::COMPATIBLE, 1 << 5));
            vec![s(&["-u", "-b", "base2.qcow2", "-F", "qcow2"])]
        },
        post: None,
    });
}
