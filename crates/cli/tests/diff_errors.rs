//! Differential tests for the error paths of unsafe-mode rebase and of argument handling:
//! instar must exit with status 1, print qemu-img 10.2's message (with `instar:` in place
//! of `qemu-img:`, and `instar` in place of qemu-img's argv0 in getopt/"Try" lines), print
//! nothing on stdout, and leave every file of the fixture byte-for-byte unchanged.
//!
//! Where instar deliberately differs (design.md §3, README "Where instar deliberately
//! differs"), the test asserts instar's documented behaviour and says so.

mod qemu;

use qemu::*;
use std::path::Path;

type Build = dyn Fn(&Fx);

/// qemu-img 10.2 and instar both fail with the same words, and nothing changes.
/// `instar_args` defaults to `qemu_args` (instar may be run without the `-F` qemu-img
/// needs, where that is the point of the row).
fn same_error(name: &str, build: &Build, qemu_args: &[&str], instar_args: Option<&[&str]>) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new(name);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    build(&fx);
    let before = snapshot(&fx.dir);

    let qdir = scratch.copy("qemu");
    let mut qargv = vec!["rebase"];
    qargv.extend_from_slice(qemu_args);
    let q = run(&refs.v10_2.img, &qargv, &qdir);
    assert_eq!(
        q.status,
        1,
        "qemu-img 10.2 did not fail as documented: {}\n{}",
        show_cmd("qemu-img", &qargv),
        q.stderr
    );
    assert!(snapshot(&qdir) == before, "qemu-img changed the fixture");
    let want = normalise_stderr(&q.stderr, &refs.v10_2.img);
    let mut failures = Vec::new();
    if let Some(n) = refs.newest() {
        newest_agrees(name, n, &scratch, &qargv, &before, &want, &mut failures);
    }

    let idir = scratch.copy("subject");
    let mut iargv = vec!["rebase"];
    // qemu-img standing in for instar (self-test) cannot probe: it keeps qemu's arguments.
    let instar_args = instar_args.filter(|_| subject.is_instar());
    iargv.extend_from_slice(instar_args.unwrap_or(qemu_args));
    let i = run(subject.path(), &iargv, &idir);
    let got = normalise_stderr(&i.stderr, subject.path());
    let shown = format!("cd {}; {}", idir.display(), show_cmd("instar", &iargv));
    if i.status != 1 {
        failures.push(format!("exit status {} (expected 1)", i.status));
    }
    if got != want {
        failures.push(format!(
            "stderr differs:\n--- expected (qemu-img 10.2, normalised)\n{want}--- got (normalised)\n{got}"
        ));
    }
    if !i.stdout.is_empty() {
        failures.push(format!("stdout not empty: {:?}", i.stdout));
    }
    let after = snapshot(&idir);
    for (path, bytes) in &before {
        match after.get(path) {
            Some(b) if b == bytes => {}
            Some(b) => failures.push(format!(
                "{} changed: {}",
                path.display(),
                describe_diff(bytes, b).unwrap_or_default()
            )),
            None => failures.push(format!("{} disappeared", path.display())),
        }
    }
    for path in after.keys() {
        if !before.contains_key(path) {
            failures.push(format!("{} appeared", path.display()));
        }
    }
    assert!(failures.is_empty(), "{shown}\n{}", failures.join("\n"));
}

/// Rows where qemu-img 11.1 (the newest release) words the error differently from 10.2,
/// with what it says; instar keeps 10.2's words there. A row whose difference is gone
/// fails, so the list stays true.
const NEWEST_DIFFERS: &[(&str, &str)] = &[];

/// qemu-img 11.1 fails the same way as 10.2 (`want`, normalised), leaving every file
/// alone, unless [`NEWEST_DIFFERS`] documents the row.
fn newest_agrees(
    name: &str,
    n: &Qemu,
    scratch: &Scratch,
    qargv: &[&str],
    before: &std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>,
    want: &str,
    failures: &mut Vec<String>,
) {
    let dir = scratch.copy("qemu-newest");
    let out = run(&n.img, qargv, &dir);
    let said = normalise_stderr(&out.stderr, &printed_argv0(&out.stderr, &n.img));
    if snapshot(&dir) != *before {
        failures.push(format!("qemu-img {} changed the fixture", n.label));
    }
    let same = out.status == 1 && said == want;
    match NEWEST_DIFFERS.iter().find(|(row, _)| *row == name) {
        Some(_) if same => failures.push(format!(
            "qemu-img {} now says what 10.2 says; drop the row from NEWEST_DIFFERS",
            n.label
        )),
        Some((_, why)) => eprintln!("note: qemu-img {} words this differently: {why}", n.label),
        None if !same => failures.push(format!(
            "qemu-img {} differs from 10.2 (exit {}):\n--- 10.2\n{want}--- {}\n{said}",
            n.label, out.status, n.label
        )),
        None => {}
    }
}

/// instar refuses (exit 1, `instar: ` on stderr, containing `needle`), with the overlay
/// unchanged, where qemu-img behaves otherwise by design.
fn instar_refuses(name: &str, build: &Build, argv: &[&str], needle: &str) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    if !subject.is_instar() {
        eprintln!("skipping {name}: instar-specific behaviour");
        return;
    }
    let scratch = Scratch::new(name);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    build(&fx);
    let before = snapshot(&fx.dir);
    let dir = scratch.copy("subject");
    let mut full = vec!["rebase"];
    full.extend_from_slice(argv);
    let i = run(subject.path(), &full, &dir);
    let shown = format!("cd {}; {}", dir.display(), show_cmd("instar", &full));
    assert_eq!(i.status, 1, "{shown}: exit status\n{}", i.stderr);
    assert!(
        i.stderr.starts_with("instar: ") && i.stderr.to_lowercase().contains(needle),
        "{shown}: stderr {:?} should start with 'instar: ' and mention {needle:?}",
        i.stderr
    );
    assert_eq!(i.stdout, "", "{shown}: stdout");
    assert!(snapshot(&dir) == before, "{shown}: the fixture changed");
}

fn ovl(fx: &Fx) {
    fx.create("qcow2", "base.qcow2", "1M", &[]);
    fx.create(
        "qcow2",
        "ovl.qcow2",
        "1M",
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
}

// ----- argument handling -------------------------------------------------------------

#[test]
fn no_arguments() {
    same_error("no-args", &ovl, &[], None);
}

#[test]
fn no_file_name() {
    same_error(
        "no-file",
        &ovl,
        &["-u", "-b", "base.qcow2", "-F", "qcow2"],
        None,
    );
}

#[test]
fn two_file_names() {
    same_error(
        "two-files",
        &ovl,
        &[
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ovl.qcow2",
            "base.qcow2",
        ],
        None,
    );
}

#[test]
fn missing_b_in_safe_mode() {
    same_error("missing-b-safe", &ovl, &["ovl.qcow2"], None);
}

#[test]
fn missing_b_in_unsafe_mode() {
    // Deliberate difference: qemu-img detaches when -u comes without -b; instar requires -b
    // (`-b ""` detaches).
    if let Some((refs, _)) = setup() {
        let scratch = Scratch::new("missing-b-unsafe-qemu");
        let fx = Fx::new(scratch.fixture(), &refs.v10_2);
        ovl(&fx);
        let q = run(&refs.v10_2.img, &["rebase", "-u", "ovl.qcow2"], &fx.dir);
        assert_eq!(q.status, 0, "qemu-img detaches: {}", q.stderr);
    }
    instar_refuses("missing-b-unsafe", &ovl, &["-u", "ovl.qcow2"], "-b");
}

#[test]
fn b_without_argument() {
    same_error("b-no-arg", &ovl, &["-u", "ovl.qcow2", "-b"], None);
}

#[test]
fn unknown_short_option() {
    same_error(
        "unknown-short",
        &ovl,
        &["-u", "-X", "-b", "base.qcow2", "-F", "qcow2", "ovl.qcow2"],
        None,
    );
}

#[test]
fn unknown_long_option() {
    same_error(
        "unknown-long",
        &ovl,
        &[
            "-u",
            "--bogus",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ovl.qcow2",
        ],
        None,
    );
}

#[test]
fn invalid_backing_format() {
    same_error(
        "bad-F",
        &ovl,
        &["-u", "-b", "base.qcow2", "-F", "foo", "ovl.qcow2"],
        None,
    );
}

#[test]
fn backing_format_is_case_sensitive() {
    same_error(
        "bad-F-case",
        &ovl,
        &["-u", "-b", "base.qcow2", "-F", "QCOW2", "ovl.qcow2"],
        None,
    );
}

#[test]
fn invalid_backing_format_when_detaching() {
    // -F is validated even though a detach ignores it.
    same_error(
        "bad-F-detach",
        &ovl,
        &["-u", "-b", "", "-F", "foo", "ovl.qcow2"],
        None,
    );
}

#[test]
fn invalid_cache_mode() {
    same_error(
        "bad-t",
        &ovl,
        &[
            "-u",
            "-t",
            "foo",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ovl.qcow2",
        ],
        None,
    );
}

#[test]
fn invalid_backing_cache_mode() {
    same_error(
        "bad-T",
        &ovl,
        &[
            "-u",
            "-T",
            "foo",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ovl.qcow2",
        ],
        None,
    );
}

#[test]
fn unknown_overlay_format() {
    same_error(
        "bad-f",
        &ovl,
        &[
            "-u",
            "-f",
            "foo",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ovl.qcow2",
        ],
        None,
    );
}

#[test]
fn image_opts_and_object_refused() {
    // Deliberate difference: instar takes only the --image-opts keys that open
    // encrypted chains, and --object defines secrets only (README, docs/luks.md).
    instar_refuses(
        "image-opts",
        &ovl,
        &[
            "-u",
            "--image-opts",
            "-b",
            "",
            "driver=qcow2,file.filename=ovl.qcow2,cache.direct=on",
        ],
        "'cache.direct' is not supported",
    );
    instar_refuses(
        "object",
        &ovl,
        &["-u", "--object", "iothread,id=io0", "-b", "", "ovl.qcow2"],
        "only 'secret' objects",
    );
}

// ----- the overlay ---------------------------------------------------------------------

#[test]
fn nonexistent_overlay() {
    same_error(
        "no-overlay",
        &ovl,
        &["-u", "-b", "base.qcow2", "-F", "qcow2", "nonexist.qcow2"],
        None,
    );
}

#[test]
fn raw_overlay_explicit() {
    same_error(
        "raw-overlay",
        &|fx| fx.create("raw", "raw.img", "1M", &[]),
        &[
            "-u",
            "-f",
            "raw",
            "-b",
            "base2.qcow2",
            "-F",
            "qcow2",
            "raw.img",
        ],
        None,
    );
}

#[test]
fn raw_overlay_probed() {
    // qemu-img prints its three-line probing WARNING before the error.
    same_error(
        "raw-probed",
        &|fx| fx.create("raw", "raw.img", "1M", &[]),
        &["-u", "-b", "base2.qcow2", "-F", "qcow2", "raw.img"],
        None,
    );
}

fn other_format(fmt: &'static str) -> impl Fn(&Fx) {
    move |fx| fx.create(fmt, "x.img", "1M", &[])
}

#[test]
fn vdi_overlay() {
    same_error(
        "vdi",
        &other_format("vdi"),
        &["-u", "-b", "y", "-F", "qcow2", "x.img"],
        None,
    );
}

#[test]
fn vpc_overlay() {
    same_error(
        "vpc",
        &other_format("vpc"),
        &["-u", "-b", "y", "-F", "qcow2", "x.img"],
        None,
    );
}

#[test]
fn vhdx_overlay() {
    same_error(
        "vhdx",
        &other_format("vhdx"),
        &["-u", "-b", "y", "-F", "qcow2", "x.img"],
        None,
    );
}

#[test]
fn qcow1_overlay() {
    same_error(
        "qcow1",
        &other_format("qcow"),
        &["-u", "-b", "y", "-F", "qcow2", "x.img"],
        None,
    );
}

#[test]
fn parallels_overlay() {
    // 10.x: `could not get block driver info` (7.2 said `Operation not supported`).
    same_error(
        "parallels",
        &other_format("parallels"),
        &["-u", "-b", "y", "-F", "qcow2", "x.img"],
        None,
    );
}

fn vmdk_chain(fx: &Fx) {
    fx.create("vmdk", "vb.vmdk", "1M", &[]);
    fx.io("vmdk", "vb.vmdk", &["write -P 0x11 0 64k"]);
    fx.create("vmdk", "vb2.vmdk", "1M", &[]);
    fx.io("vmdk", "vb2.vmdk", &["write -P 0x22 0 64k"]);
    fx.create("vmdk", "vo.vmdk", "1M", &["-b", "vb.vmdk", "-F", "vmdk"]);
}

fn vmdk_info(q: &Qemu, dir: &Path, name: &str) -> (Option<String>, Option<String>, u64, u64) {
    let text = info_json(q, dir, name);
    let find_str = |key: &str| {
        let k = format!("\"{key}\": \"");
        text.find(&k).map(|p| {
            let rest = &text[p + k.len()..];
            rest[..rest.find('"').unwrap_or(0)].to_string()
        })
    };
    let find_num = |key: &str| {
        let k = format!("\"{key}\": ");
        text.find(&k)
            .and_then(|p| {
                text[p + k.len()..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(u64::MAX)
    };
    (
        find_str("backing-filename"),
        find_str("backing-filename-format"),
        find_num("parent-cid"),
        find_num("cid"),
    )
}

#[test]
fn vmdk_overlay() {
    // qemu-img refuses to rebase any vmdk (`Operation not supported`), which is checked
    // first. Deliberate difference: instar rebases monolithicSparse vmdk overlays, keeping
    // parentCID equal to the new parent's CID so that reads through the chain work.
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new("vmdk");
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    vmdk_chain(&fx);
    let q = run(
        &refs.v10_2.img,
        &["rebase", "-u", "-b", "vb2.vmdk", "-F", "vmdk", "vo.vmdk"],
        &scratch.copy("qemu"),
    );
    assert_eq!(q.status, 1);
    assert_eq!(
        q.stderr,
        "qemu-img: Could not change the backing file to 'vb2.vmdk': Operation not supported\n"
    );
    if !subject.is_instar() {
        return;
    }
    let new_cid = vmdk_info(&refs.v10_2, &fx.dir, "vb2.vmdk").3;
    for (label, argv) in [
        (
            "with-F",
            vec!["rebase", "-u", "-b", "vb2.vmdk", "-F", "vmdk", "vo.vmdk"],
        ),
        ("probed", vec!["rebase", "-u", "-b", "vb2.vmdk", "vo.vmdk"]),
    ] {
        let dir = scratch.copy(label);
        let shown = format!("cd {}; {}", dir.display(), show_cmd("instar", &argv));
        let i = run(subject.path(), &argv, &dir);
        assert_eq!(i.status, 0, "{shown}: {}", i.stderr);
        let (backing, fmt, parent_cid, _) = vmdk_info(&refs.v10_2, &dir, "vo.vmdk");
        assert_eq!(backing.as_deref(), Some("vb2.vmdk"), "{shown}");
        assert_eq!(fmt.as_deref(), Some("vmdk"), "{shown}");
        assert_eq!(parent_cid, new_cid, "{shown}: parentCID must be vb2's CID");
        let c = run(&refs.v10_2.img, &["check", "vo.vmdk"], &dir);
        assert_eq!(c.status, 0, "{shown}: check: {}{}", c.stdout, c.stderr);
        // The overlay is empty, so it now reads exactly as vb2.vmdk.
        let c = run(&refs.v10_2.img, &["compare", "vb2.vmdk", "vo.vmdk"], &dir);
        assert_eq!(c.status, 0, "{shown}: compare: {}{}", c.stdout, c.stderr);
    }
    // Detach: no hint, parentCID ffffffff.
    let dir = scratch.copy("detach");
    let argv = ["rebase", "-u", "-b", "", "vo.vmdk"];
    let i = run(subject.path(), &argv, &dir);
    let shown = format!("cd {}; {}", dir.display(), show_cmd("instar", &argv));
    assert_eq!(i.status, 0, "{shown}: {}", i.stderr);
    let (backing, _, parent_cid, _) = vmdk_info(&refs.v10_2, &dir, "vo.vmdk");
    assert_eq!(backing, None, "{shown}");
    assert_eq!(parent_cid, 0xffff_ffff, "{shown}");
}

fn set_incompatible(bit: u32) -> impl Fn(&Fx) {
    move |fx| {
        ovl(fx);
        fx.edit("ovl.qcow2", |b| {
            let v = be64(b, off::INCOMPATIBLE) | (1u64 << bit);
            put64(b, off::INCOMPATIBLE, v);
        });
    }
}

#[test]
fn corrupt_bit() {
    same_error(
        "corrupt",
        &set_incompatible(1),
        &["-u", "-b", "base.qcow2", "-F", "qcow2", "ovl.qcow2"],
        None,
    );
}

#[test]
fn unknown_incompatible_bit() {
    same_error(
        "unknown-incompat",
        &set_incompatible(40),
        &["-u", "-b", "base.qcow2", "-F", "qcow2", "ovl.qcow2"],
        None,
    );
}

#[test]
fn locked_overlay() {
    // Held read-write by qemu-io (QEMU's OFD locks) during each run.
    let Some((refs, _)) = setup() else {
        return;
    };
    // qemu-img's run needs the holder too: take it on the copy qemu-img will use.
    let scratch = Scratch::new("locked-qemu");
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    ovl(&fx);
    let before = fx.read("ovl.qcow2");
    {
        let _h = LockHolder::open(&refs.v10_2.io, &fx.dir, "qcow2", "ovl.qcow2", false);
        let q = run(
            &refs.v10_2.img,
            &[
                "rebase",
                "-u",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "ovl.qcow2",
            ],
            &fx.dir,
        );
        assert_eq!(q.status, 1);
        assert_eq!(
            q.stderr,
            "qemu-img: Could not open 'ovl.qcow2': Failed to get \"write\" lock\nIs another process using the image [ovl.qcow2]?\n"
        );
        // -U does not help: it only concerns the new backing.
        let q = run(
            &refs.v10_2.img,
            &[
                "rebase",
                "-u",
                "-U",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "ovl.qcow2",
            ],
            &fx.dir,
        );
        assert_eq!(q.status, 1);
    }
    assert_eq!(fx.read("ovl.qcow2"), before);
    // The subject's run, held the same way, must print the same message.
    locked_subject(&[]);
    locked_subject(&["-U"]);
}

fn locked_subject(extra: &[&str]) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new("locked");
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    ovl(&fx);
    let before = fx.read("ovl.qcow2");
    let mut argv = vec!["rebase", "-u"];
    argv.extend_from_slice(extra);
    argv.extend_from_slice(&["-b", "base.qcow2", "-F", "qcow2", "ovl.qcow2"]);
    let i = {
        let _h = LockHolder::open(&refs.v10_2.io, &fx.dir, "qcow2", "ovl.qcow2", false);
        run(subject.path(), &argv, &fx.dir)
    };
    let shown = format!("cd {}; {}", fx.dir.display(), show_cmd("instar", &argv));
    assert_eq!(i.status, 1, "{shown}: {}", i.stderr);
    assert_eq!(
        normalise_stderr(&i.stderr, subject.path()),
        "PROG: Could not open 'ovl.qcow2': Failed to get \"write\" lock\nIs another process using the image [ovl.qcow2]?\n",
        "{shown}"
    );
    assert_eq!(fx.read("ovl.qcow2"), before, "{shown}: overlay changed");
}

// ----- the header change ---------------------------------------------------------------

fn small_cluster_overlay(fx: &Fx) {
    fx.create("qcow2", "base.qcow2", "1M", &[]);
    fx.create("qcow2", "ovl.qcow2", "1M", &["-o", "cluster_size=512"]);
}

#[test]
fn name_does_not_fit_512_byte_cluster() {
    // 377 bytes do not fit after the end marker at 136. Also without -F: instar probes
    // the (existing) file first and then meets the same limit, so it must give the
    // message qemu-img gives with -F.
    let name: &'static str = Box::leak(long_path(377).into_boxed_str());
    let build = move |fx: &Fx| {
        small_cluster_overlay(fx);
        assert_eq!(fx.long_name(377, "base.qcow2"), name);
    };
    same_error(
        "no-space",
        &build,
        &["-u", "-b", name, "-F", "qcow2", "ovl.qcow2"],
        None,
    );
    same_error(
        "no-space-probed",
        &build,
        &["-u", "-b", name, "-F", "qcow2", "ovl.qcow2"],
        Some(&["-u", "-b", name, "ovl.qcow2"]),
    );
}

#[test]
fn name_1023_does_not_fit_512_byte_cluster() {
    let name: &'static str = Box::leak("x".repeat(1023).into_boxed_str());
    same_error(
        "no-space-1023",
        &small_cluster_overlay,
        &["-u", "-b", name, "-F", "qcow2", "ovl.qcow2"],
        None,
    );
}

#[test]
fn name_over_1023_bytes() {
    // `Invalid argument` with -F (the name need not exist in unsafe mode).
    let name: &'static str = Box::leak("x".repeat(1024).into_boxed_str());
    same_error(
        "name-1024",
        &ovl,
        &["-u", "-b", name, "-F", "qcow2", "ovl.qcow2"],
        None,
    );
}

#[test]
fn missing_backing_format_cannot_be_probed() {
    // instar probes when -F is absent; when the file does not exist, its error is the
    // one qemu-img gives for the same command.
    same_error(
        "no-F-missing",
        &ovl,
        &["-u", "-b", "does-not-exist.qcow2", "ovl.qcow2"],
        None,
    );
}

#[test]
fn missing_backing_format_name_over_1023_bytes() {
    let name: &'static str = Box::leak("x".repeat(1024).into_boxed_str());
    same_error("no-F-1024", &ovl, &["-u", "-b", name, "ovl.qcow2"], None);
}

#[test]
fn data_file_raw_refuses_backing() {
    same_error(
        "data-file-raw",
        &|fx| {
            fx.create("qcow2", "new.qcow2", "1M", &[]);
            fx.create(
                "qcow2",
                "ovl.qcow2",
                "1M",
                &["-o", "data_file=ovl.data,data_file_raw=on"],
            );
        },
        &["-u", "-b", "new.qcow2", "-F", "qcow2", "ovl.qcow2"],
        None,
    );
}

#[test]
fn missing_external_data_file() {
    // QEMU opens the data file with the overlay, even for -u; a missing one is an open
    // error (the name is resolved against the current directory).
    same_error(
        "data-file-missing",
        &|fx| {
            fx.create("qcow2", "ovl.qcow2", "1M", &["-o", "data_file=ovl.data"]);
            std::fs::remove_file(fx.path("ovl.data")).expect("remove the data file");
        },
        &["-u", "-b", "new.qcow2", "-F", "qcow2", "ovl.qcow2"],
        None,
    );
}

// ----- deliberate refusals ---------------------------------------------------------------

#[test]
fn dirty_image_with_snapshots_refused() {
    // Deliberate difference: qemu-img repairs a dirty (lazy refcounts) image when it opens
    // it read-write and succeeds; instar repairs dirty images the same way
    // (tests/diff_dirty.rs) except for the classes it refuses before writing anything,
    // such as an image with internal snapshots (README, docs/dirty-images.md).
    let build = |fx: &Fx| {
        fx.create("qcow2", "base.qcow2", "1M", &[]);
        fx.create(
            "qcow2",
            "ovl.qcow2",
            "1M",
            &["-o", "lazy_refcounts=on", "-b", "base.qcow2", "-F", "qcow2"],
        );
        fx.img(&["snapshot", "-c", "s1", "ovl.qcow2"]);
        fx.edit("ovl.qcow2", |b| {
            let v = be64(b, off::INCOMPATIBLE) | 1;
            put64(b, off::INCOMPATIBLE, v);
        });
    };
    if let Some((refs, _)) = setup() {
        let scratch = Scratch::new("dirty-qemu");
        let fx = Fx::new(scratch.fixture(), &refs.v10_2);
        build(&fx);
        let q = run(
            &refs.v10_2.img,
            &[
                "rebase",
                "-u",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "ovl.qcow2",
            ],
            &fx.dir,
        );
        assert_eq!(q.status, 0, "{}", q.stderr);
    }
    instar_refuses(
        "dirty",
        &build,
        &["-u", "-b", "base.qcow2", "-F", "qcow2", "ovl.qcow2"],
        "dirty",
    );
}

#[test]
fn raw_file_forced_as_qcow2() {
    same_error(
        "raw-as-qcow2",
        &|fx| fx.create("raw", "r.img", "1M", &[]),
        &[
            "-u",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "r.img",
        ],
        None,
    );
}

#[test]
fn v2_name_does_not_fit_512_byte_cluster() {
    let name: &'static str = Box::leak("x".repeat(417).into_boxed_str());
    same_error(
        "v2-no-space",
        &|fx| {
            fx.create(
                "qcow2",
                "ovl.qcow2",
                "1M",
                &["-o", "compat=0.10,cluster_size=512"],
            )
        },
        &["-u", "-b", name, "-F", "qcow2", "ovl.qcow2"],
        None,
    );
}

#[test]
fn overlay_is_a_directory() {
    same_error(
        "dir-overlay",
        &|fx| std::fs::create_dir(fx.path("d.qcow2")).expect("mkdir"),
        &["-u", "-b", "base.qcow2", "-F", "qcow2", "d.qcow2"],
        None,
    );
}

#[test]
fn empty_file_overlay() {
    // Probed as raw: the WARNING block, then `Operation not supported`.
    same_error(
        "empty-overlay",
        &|fx| fx.write("e.img", b""),
        &["-u", "-b", "base.qcow2", "-F", "qcow2", "e.img"],
        None,
    );
}

#[test]
fn encrypted_overlay_without_key() {
    // qemu-img needs the LUKS secret to open an encrypted qcow2 even in unsafe mode. The
    // 10.2 reference build has no crypto library, so the image is made with 10.0.
    let Some((refs, _)) = setup() else {
        return;
    };
    let Some(maker) = refs.others.iter().find(|q| q.label == "10.0") else {
        eprintln!("skipping: qemu-img 10.0 (with crypto) not found");
        return;
    };
    let maker = maker.clone();
    same_error(
        "encrypted",
        &move |fx| {
            Fx::new(fx.dir.clone(), &maker).img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                "secret,id=s0,data=123456",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                "enc.qcow2",
                "1M",
            ]);
        },
        &["-u", "-b", "base.qcow2", "-F", "qcow2", "enc.qcow2"],
        None,
    );
}
