//! Command-line handling of `instar` / `instar rebase`: option errors read like qemu-img
//! 10.2's (compared with the real binary), exit statuses, help, and instar's own rules.
//! None of these reach the sandbox.

mod cli_support;

use cli_support::*;
use std::path::Path;

/// Cases where qemu-img 10.2 and instar must print the same text (after the prefixes are
/// swapped) with exit status 1, before any file is opened.
const SAME_AS_QEMU: &[&[&str]] = &[
    &[],
    &["a.qcow2", "b.qcow2", "-u", "-b", "x", "-F", "qcow2"],
    &["-X", "o.qcow2"],
    &["-uX", "o.qcow2"],
    &["--bogus", "o.qcow2"],
    &["--bogus=1", "o.qcow2"],
    &["o.qcow2", "-b"],
    &["o.qcow2", "--backing"],
    &["--back", "x", "o.qcow2"],
    &["--back=x", "o.qcow2"],
    &["--quiet=1", "o.qcow2"],
    &["--qui=1", "o.qcow2"],
    &["-b", "x", "-F"],
    &["o.qcow2"],
    &["-t", "foo", "-u", "-b", "x", "-F", "qcow2", "o.qcow2"],
    &["-T", "foo", "-u", "-b", "x", "-F", "qcow2", "o.qcow2"],
    &[
        "-u",
        "-f",
        "foo",
        "-b",
        "x",
        "-F",
        "qcow2",
        "nonexist.qcow2",
    ],
    &["-u", "-b", "x", "-F", "qcow2", "nonexist.qcow2"],
    &["-u", "-b", "x", "-F", "qcow2", "nodir/o.qcow2"],
    &["-u", "-b", "x", "-F", "qcow2", "dir"],
    &["-u", "-b", "x", "-F", "qcow2", "--", "-u"],
    &["-u", "-b", "x", "-F", "qcow2", "fifo"],
    // An option's value is taken verbatim, even when it looks like an option.
    &["-b", "-u", "nonexist.qcow2"],
];

#[test]
fn errors_match_qemu_img_10_2() {
    let Some(q) = qemu() else {
        return;
    };
    let s = Scratch::new("args-same");
    std::fs::create_dir(s.path("dir")).unwrap();
    instar_testkit::mkfifo(&s.path("fifo"));
    let mut failures = Vec::new();
    for case in SAME_AS_QEMU {
        let mut qa = vec!["rebase"];
        qa.extend_from_slice(case);
        let qr = run(&q.img, &qa, &s.0);
        let ir = instar(&qa, &s.0);
        let want = as_instar(&qr.stderr, &q.img);
        if qr.status != 1 || ir.status != 1 || ir.stderr != want || !ir.stdout.is_empty() {
            failures.push(format!(
                "{case:?}\n  qemu-img: {} {:?}\n  instar:   {} {:?} stdout {:?}",
                qr.status, want, ir.status, ir.stderr, ir.stdout
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// With -p, qemu-img prints its first progress line before an error found after option
/// parsing, and the final newline after it.
#[test]
fn progress_frame_around_early_errors_matches_qemu() {
    let Some(q) = qemu() else {
        return;
    };
    let s = Scratch::new("args-progress");
    for case in [
        &["-p", "-t", "foo", "-u", "-b", "x", "o.qcow2"][..],
        &["-p", "-u", "-b", "x", "-F", "qcow2", "missing.qcow2"][..],
        &["-p", "-q", "-t", "foo", "-u", "-b", "x", "o.qcow2"][..],
        &["-p", "o.qcow2"][..],
    ] {
        let mut qa = vec!["rebase"];
        qa.extend_from_slice(case);
        let qr = run(&q.img, &qa, &s.0);
        let ir = instar(&qa, &s.0);
        assert_eq!(ir.status, 1, "{case:?}");
        assert_eq!(ir.stdout, qr.stdout, "{case:?}: stdout");
        assert_eq!(ir.stderr, as_instar(&qr.stderr, &q.img), "{case:?}: stderr");
    }
}

fn expect_error(args: &[&str], want: &str) {
    let s = Scratch::new("args-own");
    let r = instar(args, &s.0);
    assert_eq!(
        (r.status, r.stderr.as_str(), r.stdout.as_str()),
        (1, want, ""),
        "{args:?}"
    );
}

#[test]
fn instar_specific_usage_errors() {
    expect_error(
        &["rebase", "-u", "o.qcow2"],
        "instar: Must specify backing file (-b); use -b \"\" to detach the image from its backing file\n\
         Try 'instar rebase --help' for more information\n",
    );
    expect_error(
        &["rebase", "--output", "xml", "-u", "-b", "", "o.qcow2"],
        "instar: --output expects 'human' or 'json', not 'xml'\n\
         Try 'instar rebase --help' for more information\n",
    );
    expect_error(
        &[
            "rebase",
            "--object",
            "secret,id=s",
            "-u",
            "-b",
            "",
            "o.qcow2",
        ],
        "instar: Either 'file' or 'data' must be provided\n",
    );
    expect_error(
        &["rebase", "--image-opts", "-u", "-b", "", "driver=qcow2"],
        "instar: Could not open 'driver=qcow2': A block device must be specified for \"file\"\n",
    );
    // -c is accepted: the next check (FILE opens) speaks.
    expect_error(
        &["rebase", "-c", "-u", "-b", "", "o.qcow2"],
        "instar: Could not open 'o.qcow2': Could not open 'o.qcow2': No such file or directory\n",
    );
    expect_error(
        &[],
        "instar: Not enough arguments\nTry 'instar --help' for more information\n",
    );
    expect_error(
        &["convert", "a", "b"],
        "instar: Command not found: convert\nTry 'instar --help' for more information\n",
    );
    expect_error(
        &["-x"],
        "instar: invalid option -- 'x'\nTry 'instar --help' for more information\n",
    );
    // -f with a QEMU driver instar cannot open, and protocol names for FILE.
    expect_error(
        &["rebase", "-f", "nbd", "-u", "-b", "", "o.qcow2"],
        "instar: Could not open 'o.qcow2': Driver 'nbd' is not supported by instar\n",
    );
    expect_error(
        &["rebase", "-u", "-b", "", "nbd:localhost:10809"],
        "instar: Could not open 'nbd:localhost:10809': Protocol 'nbd' is not supported: \
         instar opens local files only (write './nbd:localhost:10809' for a local file of that name)\n",
    );
}

#[test]
fn help_texts() {
    let s = Scratch::new("args-help");
    for argv in [
        &["rebase", "--help"][..],
        &["rebase", "-h", "-X"][..],
        &["rebase", "--hel"][..],
    ] {
        let r = instar(argv, &s.0);
        assert_eq!(r.status, 0, "{argv:?}: {}", r.stderr);
        assert!(r.stderr.is_empty());
        for needle in [
            "Usage: instar rebase [-f FMT] -b BACKING",
            "-b, --backing <BACKING>",
            "-F, --backing-format <FMT>",
            "[alias: -B]",
            "<FILE>",
            "-u, --backing-unsafe",
            "-U, --force-share",
            "-t, --cache <CACHE>",
            "-T, --backing-cache <CACHE>",
            "--output <FMT>",
            "Where instar differs from qemu-img",
        ] {
            assert!(
                r.stdout.contains(needle),
                "{argv:?}: help lacks {needle:?}:\n{}",
                r.stdout
            );
        }
    }
    for argv in [&["--help"][..], &["-h"][..]] {
        let r = instar(argv, &s.0);
        assert_eq!(r.status, 0);
        assert!(r.stdout.contains("rebase"), "{}", r.stdout);
        assert!(r.stdout.contains("Usage: instar"), "{}", r.stdout);
    }
    let r = instar(&["-V"], &s.0);
    assert_eq!(r.status, 0);
    assert!(r.stdout.starts_with("instar version "));
}

/// `QEMU_DRIVERS` must be exactly the list qemu-img 10.2 prints, so that `-F` accepts
/// and refuses the same names.
#[test]
fn driver_list_is_qemu_10_2s() {
    let Some(q) = qemu() else {
        return;
    };
    let r = run(&q.img, &["--help"], Path::new("/"));
    let text = r.stdout;
    let start = text
        .find("Supported image formats:")
        .expect("format list in qemu-img --help");
    let names: Vec<&str> = text[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("See ") && !l.starts_with("More "))
        .flat_map(str::split_whitespace)
        .collect();
    assert_eq!(names, instar::drivers::QEMU_DRIVERS);
}

#[test]
fn watchdog_setting_is_validated() {
    // INSTAR_WATCHDOG_SECS configures the sandbox watchdog; a bad value is an error
    // before anything is opened.
    for bad in ["abc", "0", "-1", "inf", "100000"] {
        let out = std::process::Command::new(INSTAR)
            .args([
                "rebase",
                "-u",
                "-b",
                "x",
                "-F",
                "raw",
                "/nonexistent/ovl.qcow2",
            ])
            .env("INSTAR_WATCHDOG_SECS", bad)
            .output()
            .expect("run instar");
        assert_eq!(out.status.code(), Some(1), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with(&format!(
                "instar: Invalid INSTAR_WATCHDOG_SECS value '{bad}'"
            )),
            "{bad}: {err}"
        );
    }
    // A good value gets as far as opening the (missing) overlay.
    let out = std::process::Command::new(INSTAR)
        .args([
            "rebase",
            "-u",
            "-b",
            "x",
            "-F",
            "raw",
            "/nonexistent/ovl.qcow2",
        ])
        .env("INSTAR_WATCHDOG_SECS", "2.5")
        .output()
        .expect("run instar");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "instar: Could not open '/nonexistent/ovl.qcow2': Could not open \
         '/nonexistent/ovl.qcow2': No such file or directory\n"
    );
}

#[test]
fn zstd_release_setting_is_validated() {
    // INSTAR_ZSTD picks the zstd release -c compresses with: 1.5.7 (the default) or
    // 1.5.4. Anything else is an error before FILE is opened, so nothing is written.
    let dir = instar_testkit::Scratch::new("cli-zstd-env");
    let file = dir.path("ovl.qcow2");
    std::fs::write(&file, b"not an image, and not to be touched").expect("write");
    for bad in ["", "1.5.5", "1.5", "1.5.4 ", "debian12", "zstd-1.5.4"] {
        let out = std::process::Command::new(INSTAR)
            .args(["rebase", "-c", "-p", "-b", ""])
            .arg(&file)
            .env("INSTAR_ZSTD", bad)
            .output()
            .expect("run instar");
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "instar: Invalid INSTAR_ZSTD value '{bad}': expected 1.5.7 (the default, as \
                 qemu-img on Debian 13) or 1.5.4 (as qemu-img on Debian 12)\n"
            ),
            "{bad:?}"
        );
        assert!(out.stdout.is_empty(), "{bad:?}: stdout {:?}", out.stdout);
        assert_eq!(
            std::fs::read(&file).expect("read"),
            b"not an image, and not to be touched"
        );
    }
    // Good values get as far as opening the (missing) overlay.
    for good in ["1.5.4", "1.5.7"] {
        let out = std::process::Command::new(INSTAR)
            .args(["rebase", "-c", "-b", "", "/nonexistent/ovl.qcow2"])
            .env("INSTAR_ZSTD", good)
            .output()
            .expect("run instar");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "instar: Could not open '/nonexistent/ovl.qcow2': Could not open \
             '/nonexistent/ovl.qcow2': No such file or directory\n",
            "{good}"
        );
    }
}
