//! End-to-end runs of `instar rebase` through the sandbox: what it prints (human line,
//! JSON object, qemu-img's progress lines), how `-b` is resolved and probed, and that
//! refusals leave the overlay unchanged. Skipped without /dev/kvm unless
//! `INSTAR_REQUIRE_KVM=1`.

mod cli_support;

use cli_support::*;
use serde_json::{json, Value};

fn setup(test: &str) -> Option<(Qemu, Scratch)> {
    let q = qemu()?;
    if !require_kvm() {
        return None;
    }
    let s = Scratch::new(test);
    create(&q, &s.0, "qcow2", "base.qcow2", "1M", &[]);
    create(&q, &s.0, "raw", "nb.img", "1M", &[]);
    create(
        &q,
        &s.0,
        "qcow2",
        "ovl.qcow2",
        "1M",
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
    Some((q, s))
}

fn ok(r: &Run) {
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
}

#[test]
fn human_lines_and_quiet() {
    let Some((q, s)) = setup("out-human") else {
        return;
    };
    let r = instar(
        &["rebase", "-u", "-b", "nb.img", "-F", "raw", "ovl.qcow2"],
        &s.0,
    );
    ok(&r);
    assert_eq!(
        (r.stdout.as_str(), r.stderr.as_str()),
        ("Image rebased.\n", "")
    );
    let r = instar(
        &[
            "rebase",
            "-u",
            "-q",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ovl.qcow2",
        ],
        &s.0,
    );
    ok(&r);
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""));
    assert_eq!(
        info(&q, &s.0, "ovl.qcow2")["backing-filename"],
        "base.qcow2"
    );
    let r = instar(&["rebase", "-u", "-b", "", "ovl.qcow2"], &s.0);
    ok(&r);
    assert_eq!(r.stdout, "Image detached.\n");
    assert!(info(&q, &s.0, "ovl.qcow2")
        .get("backing-filename")
        .is_none());
}

#[test]
fn json_object() {
    let Some((_q, s)) = setup("out-json") else {
        return;
    };
    let parse = |r: &Run| -> Value {
        ok(r);
        assert!(
            r.stdout.ends_with('\n') && r.stdout.lines().count() == 1,
            "{:?}",
            r.stdout
        );
        serde_json::from_str(&r.stdout).expect("JSON on stdout")
    };
    let v = parse(&instar(
        &[
            "rebase",
            "-u",
            "--output",
            "json",
            "-b",
            "nb.img",
            "-F",
            "raw",
            "ovl.qcow2",
        ],
        &s.0,
    ));
    assert_eq!(
        v,
        json!({
            "overlay": "ovl.qcow2",
            "overlay_format": "qcow2",
            "mode": "unsafe",
            "clusters_copied": 0,
            "bytes_copied": 0,
            "new_backing": {"filename": "nb.img", "format": "raw"}
        })
    );
    // Probed format (no -F), -q does not silence the object, -f given.
    let v = parse(&instar(
        &[
            "rebase",
            "-u",
            "-q",
            "-f",
            "qcow2",
            "--output=json",
            "-b",
            "./nb.img",
            "ovl.qcow2",
        ],
        &s.0,
    ));
    assert_eq!(
        v["new_backing"],
        json!({"filename": "./nb.img", "format": "raw"})
    );
    let v = parse(&instar(
        &[
            "rebase",
            "-u",
            "--output",
            "json",
            "-b",
            "",
            "-F",
            "qcow2",
            "ovl.qcow2",
        ],
        &s.0,
    ));
    assert_eq!(v["detached"], json!(true));
    assert!(v.get("new_backing").is_none());
    assert_eq!(v["mode"], "unsafe");
}

/// `-p` prints exactly qemu-img's progress bytes; instar's line follows them.
#[test]
fn progress_matches_qemu_img() {
    let Some((q, s)) = setup("out-progress") else {
        return;
    };
    let args = [
        "rebase",
        "-u",
        "-p",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "ovl.qcow2",
    ];
    let qr = run(&q.img, &args, &s.0);
    assert_eq!(qr.status, 0, "{}", qr.stderr);
    assert_eq!(qr.stdout, "    (0.00/100%)\r    (100.00/100%)\r\n");
    let r = instar(&args, &s.0);
    ok(&r);
    assert_eq!(r.stdout, format!("{}Image rebased.\n", qr.stdout));
    // With --output json, progress moves to stderr and stdout stays one JSON document.
    let mut a = args.to_vec();
    a.insert(1, "--output=json");
    let r = instar(&a, &s.0);
    ok(&r);
    assert_eq!(r.stderr, qr.stdout);
    serde_json::from_str::<Value>(&r.stdout).expect("JSON");
    // An error of the change itself: qemu-img still prints its final 100%.
    let long = "x".repeat(1024);
    let args = [
        "rebase",
        "-u",
        "-p",
        "-b",
        &long,
        "-F",
        "qcow2",
        "ovl.qcow2",
    ];
    let qr = run(&q.img, &args, &s.0);
    let r = instar(&args, &s.0);
    assert_eq!((qr.status, r.status), (1, 1));
    assert_eq!(r.stdout, qr.stdout);
    assert_eq!(r.stderr, as_instar(&qr.stderr, &q.img));
}

/// Without -F, `-b` is resolved against the overlay's directory (not the working
/// directory) and probed there; the format found is recorded.
#[test]
fn probe_resolves_against_overlay_directory() {
    let Some((q, s)) = setup("out-resolve") else {
        return;
    };
    std::fs::create_dir(s.path("sub")).unwrap();
    create(&q, &s.path("sub"), "qcow2", "ovl.qcow2", "1M", &[]);
    // sub/x is raw; ./x (next to the working directory) is qcow2.
    create(&q, &s.path("sub"), "raw", "x", "1M", &[]);
    create(&q, &s.0, "qcow2", "x", "1M", &[]);
    let r = instar(&["rebase", "-u", "-b", "x", "sub/ovl.qcow2"], &s.0);
    ok(&r);
    let i = info(&q, &s.0, "sub/ovl.qcow2");
    assert_eq!(i["backing-filename"], "x");
    assert_eq!(i["backing-filename-format"], "raw");
    // The same name through qemu-img with the format instar found gives the same file.
    let ours = std::fs::read(s.path("sub/ovl.qcow2")).unwrap();
    create(&q, &s.path("sub"), "qcow2", "ovl.qcow2", "1M", &[]);
    let qr = run(
        &q.img,
        &["rebase", "-u", "-b", "x", "-F", "raw", "sub/ovl.qcow2"],
        &s.0,
    );
    assert_eq!(qr.status, 0, "{}", qr.stderr);
    assert!(
        std::fs::read(s.path("sub/ovl.qcow2")).unwrap() == ours,
        "files differ"
    );
}

/// Refusals before the rebase VM leave the overlay byte-for-byte unchanged.
#[test]
fn refusals_write_nothing() {
    let Some((_q, s)) = setup("out-refusals") else {
        return;
    };
    let before = std::fs::read(s.path("ovl.qcow2")).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["rebase", "-u", "-b", "json:{\"file\":\"/etc/passwd\"}", "ovl.qcow2"],
            "instar: Could not open new backing file 'json:{\"file\":\"/etc/passwd\"}': \
             Protocol 'json' is not supported",
        ),
        (
            &["rebase", "-u", "-b", "missing.qcow2", "ovl.qcow2"],
            "instar: Could not change the backing file to 'missing.qcow2': backing format must be specified\n",
        ),
        (
            &["rebase", "-u", "-b", "base.qcow2", "-F", "nope", "ovl.qcow2"],
            "instar: Invalid format name: 'nope'\n",
        ),
        (
            &["rebase", "-u", "-f", "raw", "-b", "base.qcow2", "-F", "qcow2", "ovl.qcow2"],
            "instar: Could not change the backing file to 'base.qcow2': Operation not supported\n",
        ),
        // An --allow-dir that does not exist is refused before anything is opened.
        (
            &["rebase", "--allow-dir", "no-such-dir", "-b", "nb.img", "-F", "raw", "ovl.qcow2"],
            "instar: Could not use --allow-dir 'no-such-dir': No such file or directory\n",
        ),
    ];
    for (args, want) in cases {
        let r = instar(args, &s.0);
        assert_eq!(r.status, 1, "{args:?}");
        assert!(r.stderr.starts_with(want), "{args:?}: {:?}", r.stderr);
        assert_eq!(r.stdout, "", "{args:?}");
        assert!(
            std::fs::read(s.path("ovl.qcow2")).unwrap() == before,
            "{args:?} wrote"
        );
    }
}

/// A FIFO or directory given as FILE or -b is refused without hanging.
#[test]
fn non_regular_files() {
    let Some((_q, s)) = setup("out-non-regular") else {
        return;
    };
    instar_testkit::mkfifo(&s.path("fifo"));
    std::fs::create_dir(s.path("dir")).unwrap();
    for b in ["fifo", "dir"] {
        let r = instar(&["rebase", "-u", "-b", b, "ovl.qcow2"], &s.0);
        assert_eq!(
            r.stderr,
            format!("instar: Could not change the backing file to '{b}': backing format must be specified\n")
        );
    }
    let r = instar(&["rebase", "-b", "fifo", "-F", "raw", "-u", "fifo"], &s.0);
    assert_eq!(
        r.stderr,
        "instar: Could not open 'fifo': 'file' driver requires 'fifo' to be a regular file\n"
    );
}
