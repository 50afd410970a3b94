//! The path policy for backing names found in images, decided on a real directory tree
//! (no sandbox needed): QEMU's name resolution, lexical and canonical containment,
//! symlinks leaving the tree, names that do not resolve, non-regular files. Every path
//! here is absolute, so the tests do not depend on the current directory.

mod cli_support;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use cli_support::Scratch;
use instar::paths::{combine, has_protocol, make_absolute, normalise};
use instar::policy::{self, Allowed, Refused};

const OUTSIDE: &str = "is outside the allowed directories (see --allow-dir)";

/// A tree: `root/imgs` (the allowed directory, with `base.qcow2` and `sub/`), and
/// `root/other` (not allowed, with `secret.img`).
struct Tree {
    _scratch: Scratch,
    imgs: PathBuf,
    other: PathBuf,
}

fn tree(name: &str) -> Tree {
    let scratch = Scratch::new(name);
    let root = scratch.0.canonicalize().unwrap();
    let imgs = root.join("imgs");
    let other = root.join("other");
    std::fs::create_dir_all(imgs.join("sub")).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(imgs.join("base.qcow2"), b"x").unwrap();
    std::fs::write(imgs.join("sub/deep.qcow2"), b"y").unwrap();
    std::fs::write(other.join("secret.img"), b"s").unwrap();
    Tree {
        _scratch: scratch,
        imgs,
        other,
    }
}

fn b(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

impl Tree {
    fn allowed(&self) -> Allowed {
        let mut a = Allowed::new();
        a.add(b"/", b(&self.imgs)).unwrap();
        a
    }

    /// The overlay's filename as QEMU holds it (absolute here).
    fn overlay(&self) -> Vec<u8> {
        b(&self.imgs.join("ovl.qcow2")).to_vec()
    }

    fn locate(&self, name: &str) -> Result<policy::Located, Refused> {
        policy::locate(name.as_bytes(), &self.overlay(), b"/", &self.allowed())
    }

    fn refusal(&self, name: &str) -> String {
        match self.locate(name) {
            Ok(l) => panic!("{name}: accepted as {}", l.canonical.display()),
            Err(e) => e.to_string(),
        }
    }
}

#[test]
fn qemu_name_rules() {
    // path_combine: textual, relative to the directory of the naming image.
    assert_eq!(combine(b"top.qcow2", b"base.qcow2"), b"base.qcow2");
    assert_eq!(combine(b"sub/top.qcow2", b"base.qcow2"), b"sub/base.qcow2");
    assert_eq!(combine(b"sub/top.qcow2", b"../b.qcow2"), b"sub/../b.qcow2");
    assert_eq!(combine(b"sub/top.qcow2", b"/abs.qcow2"), b"/abs.qcow2");
    assert_eq!(combine(b"./top", b"b"), b"./b");
    // bdrv_make_absolute_filename (used by bdrv_find_backing_image).
    assert_eq!(
        make_absolute(b"sub/top", b"sub/base").unwrap(),
        b"sub/sub/base"
    );
    assert_eq!(make_absolute(b"top", b"base").unwrap(), b"base");
    // path_has_protocol: a ':' before the first '/'.
    for p in [
        "json:{}",
        "nbd://h/x",
        "nbd:h:1",
        "file:x",
        ":x",
        "http://a/b",
    ] {
        assert!(has_protocol(p.as_bytes()), "{p}");
    }
    for p in ["./nbd:x", "a/b:c", "/x:y", "plain"] {
        assert!(!has_protocol(p.as_bytes()), "{p}");
    }
    // The lexical view.
    assert_eq!(normalise(b"/w/imgs", b"../../x"), b"/x");
    assert_eq!(normalise(b"/w", b"imgs/./sub//../b"), b"/w/imgs/b");
}

#[test]
fn names_inside_the_tree_are_accepted() {
    let t = tree("pol-inside");
    let l = t.locate("base.qcow2").unwrap();
    assert_eq!(l.canonical, t.imgs.join("base.qcow2"));
    // QEMU's filename is the combined string, not normalised.
    let l = t.locate("sub/../sub/deep.qcow2").unwrap();
    assert_eq!(
        l.filename,
        [b(&t.imgs), b"/sub/../sub/deep.qcow2".as_slice()].concat()
    );
    assert_eq!(l.canonical, t.imgs.join("sub/deep.qcow2"));
    // A symlink that stays inside is fine; absolute names inside too.
    symlink("sub/deep.qcow2", t.imgs.join("inner-link")).unwrap();
    assert_eq!(
        t.locate("inner-link").unwrap().canonical,
        t.imgs.join("sub/deep.qcow2")
    );
    let abs = t.imgs.join("base.qcow2");
    assert!(t.locate(abs.to_str().unwrap()).is_ok());
    let f = policy::open_located(&t.locate("base.qcow2").unwrap(), &t.allowed()).unwrap();
    assert_eq!(f.len, 1);
}

#[test]
fn names_leaving_the_tree_are_refused_alike() {
    let t = tree("pol-outside");
    symlink("/etc/passwd", t.imgs.join("passwd-link")).unwrap();
    symlink("/etc/instar-no-such-file", t.imgs.join("dangling-out")).unwrap();
    symlink("/etc", t.imgs.join("etc-dir")).unwrap();
    symlink("../other", t.imgs.join("other-dir")).unwrap();
    let secret = t.other.join("secret.img");
    let cases = [
        "/etc/passwd",
        "/etc/instar-no-such-file",
        "../../x",
        "../other/secret.img",
        "../other/missing.img",
        "sub/../../other/secret.img",
        "passwd-link",
        "dangling-out",
        "etc-dir/passwd",
        "etc-dir/instar-no-such-file",
        "etc-dir/../etc/passwd",
        "other-dir/secret.img",
        "other-dir/missing/x",
        "/dev/null",
        secret.to_str().unwrap(),
    ];
    for name in cases {
        assert_eq!(
            t.refusal(name),
            format!("backing file name '{name}' {OUTSIDE}"),
            "{name}"
        );
    }
}

#[test]
fn a_missing_name_inside_is_qemus_error() {
    let t = tree("pol-missing");
    symlink("sub/nothing.qcow2", t.imgs.join("dangling-in")).unwrap();
    symlink("loop-b", t.imgs.join("loop-a")).unwrap();
    symlink("loop-a", t.imgs.join("loop-b")).unwrap();
    let d = t.imgs.display();
    assert_eq!(
        t.refusal("missing.qcow2"),
        format!("Could not open '{d}/missing.qcow2': No such file or directory")
    );
    assert_eq!(
        t.refusal("nodir/x.qcow2"),
        format!("Could not open '{d}/nodir/x.qcow2': No such file or directory")
    );
    assert_eq!(
        t.refusal("base.qcow2/x"),
        format!("Could not open '{d}/base.qcow2/x': Not a directory")
    );
    assert_eq!(
        t.refusal("dangling-in"),
        format!("Could not open '{d}/dangling-in': No such file or directory")
    );
    assert_eq!(
        t.refusal("loop-a"),
        format!("Could not open '{d}/loop-a': Too many levels of symbolic links")
    );
}

#[test]
fn protocols_are_refused() {
    let t = tree("pol-protocol");
    for name in [
        "json:{\"file.filename\":\"/etc/passwd\"}",
        "nbd://localhost:10809/x",
        "file:base.qcow2",
        "http://example.com/x",
    ] {
        assert_eq!(
            t.refusal(name),
            format!(
                "backing file name '{name}' has a protocol prefix; instar opens local files only"
            )
        );
    }
    // `./name:with:colons` is a local file.
    std::fs::write(t.imgs.join("nbd:x"), b"z").unwrap();
    assert!(t.locate("./nbd:x").is_ok());
}

#[test]
fn only_regular_files() {
    let t = tree("pol-regular");
    instar_testkit::mkfifo(&t.imgs.join("fifo"));
    let _sock = std::os::unix::net::UnixListener::bind(t.imgs.join("sock")).unwrap();
    let d = t.imgs.display();
    for name in ["fifo", "sock", "sub"] {
        assert_eq!(
            t.refusal(name),
            format!("'file' driver requires '{d}/{name}' to be a regular file")
        );
    }
}

#[test]
fn allow_dir_extends_the_tree() {
    let t = tree("pol-allow");
    let mut a = t.allowed();
    assert!(policy::locate(b"../other/secret.img", &t.overlay(), b"/", &a).is_err());
    a.add(b"/", b(&t.other)).unwrap();
    let l = policy::locate(b"../other/secret.img", &t.overlay(), b"/", &a).unwrap();
    assert_eq!(l.canonical, t.other.join("secret.img"));
    // A relative directory is taken against the given current directory.
    let mut rel = Allowed::new();
    rel.add(b(&t.imgs), b"../other").unwrap();
    assert!(rel.contains(&t.other.join("x")));
    assert!(!rel.contains(&t.imgs.join("x")));
    // Only existing directories.
    assert!(Allowed::new()
        .add(b"/", b"/nonexistent-instar-dir")
        .is_err());
    assert!(Allowed::new().add(b"/", b"/etc/passwd").is_err());
}

#[test]
fn names_are_escaped() {
    let t = tree("pol-escape");
    assert_eq!(
        t.refusal("/etc/\x1b[2J\npasswd"),
        format!("backing file name '/etc/\\x1b[2J\\x0apasswd' {OUTSIDE}")
    );
}

/// A data file name as QEMU resolves it: against the current directory (`imgs` here).
fn data_file(t: &Tree, name: &str) -> Result<policy::Located, Refused> {
    policy::locate_data_file(name.as_bytes(), b(&t.imgs), &t.allowed())
}

fn data_refusal(t: &Tree, name: &str) -> String {
    match data_file(t, name) {
        Ok(l) => panic!("{name}: accepted as {}", l.canonical.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn data_files_follow_the_same_rules() {
    let t = tree("pol-data");
    symlink("/etc/passwd", t.imgs.join("passwd-link")).unwrap();
    symlink("../other/missing.img", t.imgs.join("dangling-out")).unwrap();
    symlink("base.qcow2", t.imgs.join("inner-link")).unwrap();
    for name in [
        "/etc/passwd",
        "../other/secret.img",
        "../other/missing.img",
        "passwd-link",
        "dangling-out",
        "/dev/null",
    ] {
        assert_eq!(
            data_refusal(&t, name),
            format!("data file name '{name}' {OUTSIDE}"),
            "{name}"
        );
    }
    assert_eq!(
        data_refusal(&t, "nbd:x"),
        "data file name 'nbd:x' has a protocol prefix; instar opens local files only"
    );
    assert_eq!(
        data_refusal(&t, "\x1b]0;x\x07/../../other/y"),
        format!("data file name '\\x1b]0;x\\x07/../../other/y' {OUTSIDE}")
    );
    // Resolved against the current directory, not the overlay's: QEMU's messages.
    assert_eq!(
        data_refusal(&t, "missing.data"),
        "Could not open 'missing.data': No such file or directory"
    );
    assert_eq!(
        data_refusal(&t, "sub"),
        "Could not open 'sub': Is a directory"
    );
    instar_testkit::mkfifo(&t.imgs.join("fifo"));
    assert_eq!(
        data_refusal(&t, "fifo"),
        "'file' driver requires 'fifo' to be a regular file"
    );
    let l = data_file(&t, "inner-link").unwrap();
    assert_eq!(l.canonical, t.imgs.join("base.qcow2"));
    assert!(policy::open_located(&l, &t.allowed()).is_ok());
}

#[test]
fn a_data_file_swapped_after_the_check_is_refused() {
    // The file checked is the file opened: replaced between the check and the open (here
    // by a symlink leaving the tree, then by another file), the open is refused.
    let t = tree("pol-data-race");
    std::fs::write(t.imgs.join("ovl.data"), b"d").unwrap();
    let l = data_file(&t, "ovl.data").unwrap();
    // Kept, so that its inode number is not reused by the file made below.
    std::fs::rename(t.imgs.join("ovl.data"), t.imgs.join("kept.data")).unwrap();
    symlink(t.other.join("secret.img"), t.imgs.join("ovl.data")).unwrap();
    let e = policy::open_located(&l, &t.allowed()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Could not open 'ovl.data': Too many levels of symbolic links"
    );
    std::fs::remove_file(t.imgs.join("ovl.data")).unwrap();
    std::fs::write(t.imgs.join("ovl.data"), b"other").unwrap();
    let e = policy::open_located(&l, &t.allowed()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "data file 'ovl.data' changed while it was being opened"
    );
}
