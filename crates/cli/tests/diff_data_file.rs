//! FILE's external data file goes through the path policy (docs/path-policy.md, "External
//! data files"), in `-u` and in safe mode: a symlink leaving the allowed directories, a
//! name outside them (absolute, `..`, or a dangling symlink pointing out), a FIFO and a
//! directory are refused with every file unchanged; where qemu-img 10.2 fails too, with
//! its words. A symlink that stays inside, and an `--allow-dir` covering the target, are
//! accepted: `-u` leaves the same bytes as qemu-img's result, and safe mode gets as far
//! as instar's own limit (it does not write through external data files).
//!
//! Layout: `imgs/` (the current directory; FILE, `-b` and the data file's name live here)
//! and `other/secret.data` beside it, outside the allowed directories.

mod qemu;

use qemu::*;
use std::os::unix::fs::symlink;
use std::path::Path;

const OUTSIDE: &str = "is outside the allowed directories (see --allow-dir)";

/// `imgs/ovl.qcow2` with an external data file recorded as `data_name`, the new backing
/// `imgs/new.raw`, and `other/secret.data`; `imgs/ovl.data` is left for the case to make.
fn layout(fx: &Fx, data_name: &str) {
    fx.create("raw", "other/secret.data", "1M", &[]);
    fx.io("raw", "other/secret.data", &["write -P 0x5a 0 4k"]);
    fx.create("raw", "imgs/new.raw", "1M", &[]);
    fx.io("raw", "imgs/new.raw", &["write -P 0x11 0 64k"]);
    fx.create(
        "qcow2",
        "imgs/ovl.qcow2",
        "1M",
        &["-o", "data_file=imgs/ovl.data"],
    );
    std::fs::remove_file(fx.path("imgs/ovl.data")).expect("remove the data file");
    fx.edit_header("imgs/ovl.qcow2", |h| {
        let ext = h
            .exts
            .iter_mut()
            .find(|e| e.magic == EXT_DATA_FILE)
            .expect("data file extension");
        ext.data = data_name.as_bytes().to_vec();
    });
}

/// Something made in each copy of the fixture after copying (a FIFO cannot be copied).
#[derive(Clone, Copy)]
enum Special {
    None,
    Fifo,
}

enum Expect {
    /// Both fail; instar with qemu-img's stderr.
    SameFailure,
    /// Both succeed and leave the same bytes.
    SameSuccess,
    /// instar refuses with exactly this text after `instar: ` (qemu-img is not run: it
    /// would open the file).
    Refused(String),
}

fn rebase_args<'a>(unsafe_mode: bool, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["rebase"];
    if unsafe_mode {
        a.push("-u");
    }
    a.extend_from_slice(&["-b", "new.raw", "-F", "raw"]);
    a.extend_from_slice(extra);
    a.push("ovl.qcow2");
    a
}

/// instar's refusal of a safe rebase that would have to write through an external data
/// file: reaching it shows that the data file passed the policy.
const SAFE_MODE_LIMIT: &str =
    "Error while writing to COW image: unsupported image: external data file";

fn case(name: &str, build: &dyn Fn(&Fx), special: Special, extra: &[&str], expect: &Expect) {
    one(name, build, special, &rebase_args(true, extra), expect);
    let safe = match expect {
        Expect::SameSuccess => &Expect::Refused(SAFE_MODE_LIMIT.into()),
        e => e,
    };
    one(name, build, special, &rebase_args(false, extra), safe);
}

fn one(name: &str, build: &dyn Fn(&Fx), special: Special, argv: &[&str], expect: &Expect) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    if !subject.is_instar() {
        // The policy is instar's own.
        return;
    }
    let scratch = Scratch::new(name);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    build(&fx);
    let before = snapshot(&fx.dir);
    let prepare = |label: &str| {
        let dir = scratch.copy(label);
        if let Special::Fifo = special {
            instar_testkit::mkfifo(&dir.join("imgs/ovl.data"));
        }
        dir
    };
    // --allow-dir is instar's own.
    let mut qargv: Vec<&str> = Vec::new();
    let mut it = argv.iter();
    while let Some(&a) = it.next() {
        if a == "--allow-dir" {
            it.next();
        } else {
            qargv.push(a);
        }
    }
    let qemu_run = |dir: &Path| run(&refs.v10_2.img, &qargv, &dir.join("imgs"));

    let idir = prepare("subject");
    let i = run(subject.path(), argv, &idir.join("imgs"));
    let shown = format!("cd {}/imgs; {}", idir.display(), show_cmd("instar", argv));
    match expect {
        Expect::SameFailure => {
            let qdir = prepare("qemu");
            let q = qemu_run(&qdir);
            assert_eq!(q.status, 1, "{name}: qemu-img: {}", q.stderr);
            assert_eq!(i.status, 1, "{shown}\n{}", i.stderr);
            assert_eq!(
                normalise_stderr(&i.stderr, subject.path()),
                normalise_stderr(&q.stderr, &refs.v10_2.img),
                "{shown}"
            );
            assert!(snapshot(&idir) == before, "{shown}: a file changed");
        }
        Expect::Refused(text) => {
            assert_eq!(i.status, 1, "{shown}\n{}", i.stderr);
            assert_eq!(i.stderr, format!("instar: {text}\n"), "{shown}");
            assert!(snapshot(&idir) == before, "{shown}: a file changed");
        }
        Expect::SameSuccess => {
            let qdir = prepare("qemu");
            let q = qemu_run(&qdir);
            assert_eq!(q.status, 0, "{name}: qemu-img: {}", q.stderr);
            assert_eq!(i.status, 0, "{shown}\n{}", i.stderr);
            assert!(
                snapshot(&idir) == snapshot(&qdir),
                "{shown}: the files differ from qemu-img's"
            );
        }
    }
    assert_eq!(
        i.stdout.is_empty(),
        i.status != 0,
        "{shown}: stdout {:?}",
        i.stdout
    );
}

fn refused(name: &str) -> Expect {
    Expect::Refused(format!(
        "Could not open 'ovl.qcow2': data file name '{name}' {OUTSIDE}"
    ))
}

#[test]
fn symlink_leaving_the_tree_refused() {
    let build = |fx: &Fx| {
        layout(fx, "ovl.data");
        symlink("../other/secret.data", fx.path("imgs/ovl.data")).expect("symlink");
    };
    case(
        "df-link-out",
        &build,
        Special::None,
        &[],
        &refused("ovl.data"),
    );
    // Through a chain of links that starts inside.
    let chain = |fx: &Fx| {
        layout(fx, "ovl.data");
        symlink("hop.data", fx.path("imgs/ovl.data")).expect("symlink");
        symlink("../other/secret.data", fx.path("imgs/hop.data")).expect("symlink");
    };
    case(
        "df-link-chain",
        &chain,
        Special::None,
        &[],
        &refused("ovl.data"),
    );
    // A dangling link pointing out reads like one pointing at an existing file.
    let dangling = |fx: &Fx| {
        layout(fx, "ovl.data");
        symlink("../other/no-such.data", fx.path("imgs/ovl.data")).expect("symlink");
    };
    case(
        "df-link-dangling",
        &dangling,
        Special::None,
        &[],
        &refused("ovl.data"),
    );
    // --allow-dir covering the target: accepted, as qemu-img accepts it.
    case(
        "df-link-allowed",
        &build,
        Special::None,
        &["--allow-dir", "../other"],
        &Expect::SameSuccess,
    );
}

#[test]
fn names_outside_the_tree_refused() {
    let relative = |fx: &Fx| layout(fx, "../other/secret.data");
    case(
        "df-dotdot",
        &relative,
        Special::None,
        &[],
        &refused("../other/secret.data"),
    );
    let missing = |fx: &Fx| layout(fx, "../other/no-such.data");
    case(
        "df-dotdot-missing",
        &missing,
        Special::None,
        &[],
        &refused("../other/no-such.data"),
    );
    case(
        "df-absolute",
        &|fx| layout(fx, "/etc/shadow"),
        Special::None,
        &[],
        &refused("/etc/shadow"),
    );
}

#[test]
fn symlink_inside_the_tree_accepted() {
    let build = |fx: &Fx| {
        layout(fx, "ovl.data");
        fx.create("raw", "imgs/real.data", "1M", &[]);
        symlink("real.data", fx.path("imgs/ovl.data")).expect("symlink");
    };
    case(
        "df-link-in",
        &build,
        Special::None,
        &[],
        &Expect::SameSuccess,
    );
}

#[test]
fn fifo_and_directory_refused_as_qemu_refuses_them() {
    case(
        "df-fifo",
        &|fx| layout(fx, "ovl.data"),
        Special::Fifo,
        &[],
        &Expect::SameFailure,
    );
    let dir = |fx: &Fx| {
        layout(fx, "ovl.data");
        std::fs::create_dir(fx.path("imgs/ovl.data")).expect("mkdir");
    };
    case("df-dir", &dir, Special::None, &[], &Expect::SameFailure);
    // A symlink to a directory inside the tree: QEMU's error for the directory.
    let link_dir = |fx: &Fx| {
        layout(fx, "ovl.data");
        std::fs::create_dir(fx.path("imgs/d")).expect("mkdir");
        symlink("d", fx.path("imgs/ovl.data")).expect("symlink");
    };
    case(
        "df-link-dir",
        &link_dir,
        Special::None,
        &[],
        &Expect::SameFailure,
    );
}
