//! Names read from images never reach the terminal raw. Each case puts terminal escape
//! sequences (`ESC ] 0 ; … BEL`, `ESC [ 2 J`) and `\r\n` with a forged line into a name or
//! format that instar reports: an external data file name (missing, a FIFO, a directory,
//! outside the tree, a protocol name), a backing file name (missing, a FIFO, locked by
//! qemu-io), a recorded backing format, a name in the new backing's chain, a feature name
//! the guest quotes in its message. instar must exit 1, print no control byte, keep every
//! file unchanged, and — where qemu-img 10.2 fails the same way — print qemu-img's message
//! with only that name escaped (`\xNN` for each byte outside printable ASCII).

mod qemu;

use qemu::*;
use std::path::Path;

/// The hostile part of every name here (no `/`, so it can be a file name).
const EVIL: &str = "x\x1b]0;owned\x07\x1b[2J\r\ninstar: forged line";
/// How instar shows it.
const EVIL_SHOWN: &str = "x\\x1b]0;owned\\x07\\x1b[2J\\x0d\\x0ainstar: forged line";

/// `./EVIL` (a plain relative name: no protocol prefix).
fn evil_rel() -> String {
    format!("./{EVIL}")
}

fn evil_rel_shown() -> String {
    format!("./{EVIL_SHOWN}")
}

/// A qcow2 overlay with an external data file, whose recorded name becomes `name`.
fn data_file_overlay(fx: &Fx, name: &[u8]) {
    fx.create("raw", "new.raw", "1M", &[]);
    fx.create("qcow2", "ovl.qcow2", "1M", &["-o", "data_file=ovl.data"]);
    std::fs::remove_file(fx.path("ovl.data")).expect("remove the data file");
    fx.edit_header("ovl.qcow2", |h| {
        let ext = h
            .exts
            .iter_mut()
            .find(|e| e.magic == EXT_DATA_FILE)
            .expect("data file extension");
        ext.data = name.to_vec();
    });
}

/// A qcow2 overlay whose backing name is `name` (format qcow2 recorded), over nothing.
fn backing_overlay(fx: &Fx, name: &[u8]) {
    fx.create("raw", "new.raw", "1M", &[]);
    fx.create("qcow2", "base.qcow2", "1M", &[]);
    fx.create(
        "qcow2",
        "ovl.qcow2",
        "1M",
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
    fx.edit_header("ovl.qcow2", |h| h.backing = Some(name.to_vec()));
}

use instar_testkit::mkfifo;

/// What one case expects.
enum Expect {
    /// qemu-img fails too: instar prints qemu-img's stderr with `raw` replaced by `shown`.
    LikeQemu { raw: String, shown: String },
    /// instar-only refusal: this exact stderr (after `instar: `).
    Exactly(String),
}

/// A file that is not regular, made in each copy of the fixture (copying a FIFO would
/// block).
#[derive(Clone, Copy)]
enum Special {
    None,
    Fifo,
    Dir,
}

impl Special {
    fn make(self, dir: &Path) {
        match self {
            Special::None => {}
            Special::Fifo => mkfifo(&dir.join(EVIL)),
            Special::Dir => std::fs::create_dir(dir.join(EVIL)).expect("mkdir"),
        }
    }
}

/// Run `argv` with instar (and, for [`Expect::LikeQemu`], qemu-img 10.2) on copies of the
/// fixture built by `build` (plus `special`), while `hold` (if any) keeps an image of it
/// open in qemu-io.
fn check(
    name: &str,
    build: &dyn Fn(&Fx),
    special: Special,
    argv: &[&str],
    hold: Option<(&str, &str)>,
    expect: Expect,
) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    if !subject.is_instar() {
        return;
    }
    let scratch = Scratch::new(name);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    build(&fx);
    let before = snapshot(&fx.dir);
    let mut full = vec!["rebase"];
    full.extend_from_slice(argv);

    let qemu_text = |raw: &str| {
        let qdir = scratch.copy("qemu");
        special.make(&qdir);
        let _held = hold.map(|(fmt, img)| LockHolder::open(&refs.v10_2.io, &qdir, fmt, img, false));
        let q = run(&refs.v10_2.img, &full, &qdir);
        assert_eq!(q.status, 1, "{name}: qemu-img: {}", q.stderr);
        assert!(
            q.stderr.contains(raw),
            "{name}: qemu-img does not name {raw:?}: {:?}",
            q.stderr
        );
        let prog = format!("{}: ", refs.v10_2.img.display());
        q.stderr
            .replace(&prog, "instar: ")
            .replace("qemu-img: ", "instar: ")
    };
    let want: String = match expect {
        Expect::LikeQemu { raw, shown } => qemu_text(&raw).replace(&raw, &shown),
        Expect::Exactly(text) => format!("instar: {text}\n"),
    };
    let idir = scratch.copy("subject");
    special.make(&idir);
    let _held = hold.map(|(fmt, img)| LockHolder::open(&refs.v10_2.io, &idir, fmt, img, false));
    let i = run(subject.path(), &full, &idir);
    let shown = format!("cd {}; {}", idir.display(), show_cmd("instar", &full));
    assert_eq!(i.status, 1, "{shown}\n{:?}", i.stderr);
    assert_eq!(i.stdout, "", "{shown}: stdout");
    assert!(
        !i.stderr.contains(|c: char| c.is_control() && c != '\n'),
        "{shown}: a control byte reached stderr: {:?}",
        i.stderr
    );
    assert_eq!(i.stderr, want, "{shown}: stderr");
    assert!(snapshot(&idir) == before, "{shown}: a file changed");
}

#[test]
fn missing_data_file() {
    // The measured hole: the name used to be printed raw.
    for mode in [&["-u"][..], &[][..]] {
        let mut argv = mode.to_vec();
        argv.extend_from_slice(&["-b", "new.raw", "-F", "raw", "ovl.qcow2"]);
        check(
            "esc-data-missing",
            &|fx| data_file_overlay(fx, evil_rel().as_bytes()),
            Special::None,
            &argv,
            None,
            Expect::LikeQemu {
                raw: evil_rel(),
                shown: evil_rel_shown(),
            },
        );
    }
}

#[test]
fn data_file_fifo_and_directory() {
    let argv = ["-u", "-b", "new.raw", "-F", "raw", "ovl.qcow2"];
    check(
        "esc-data-fifo",
        &|fx| data_file_overlay(fx, evil_rel().as_bytes()),
        Special::Fifo,
        &argv,
        None,
        Expect::LikeQemu {
            raw: evil_rel(),
            shown: evil_rel_shown(),
        },
    );
    check(
        "esc-data-dir",
        &|fx| data_file_overlay(fx, evil_rel().as_bytes()),
        Special::Dir,
        &argv,
        None,
        Expect::LikeQemu {
            raw: evil_rel(),
            shown: evil_rel_shown(),
        },
    );
}

#[test]
fn data_file_refused_by_policy() {
    let argv = ["-u", "-b", "new.raw", "-F", "raw", "ovl.qcow2"];
    let outside = format!("/nonexistent/{EVIL}");
    check(
        "esc-data-outside",
        &|fx| data_file_overlay(fx, outside.as_bytes()),
        Special::None,
        &argv,
        None,
        Expect::Exactly(format!(
            "Could not open 'ovl.qcow2': data file name '/nonexistent/{EVIL_SHOWN}' is \
             outside the allowed directories (see --allow-dir)"
        )),
    );
    check(
        "esc-data-protocol",
        &|fx| data_file_overlay(fx, EVIL.as_bytes()),
        Special::None,
        &argv,
        None,
        Expect::Exactly(format!(
            "Could not open 'ovl.qcow2': data file name '{EVIL_SHOWN}' has a protocol \
             prefix; instar opens local files only"
        )),
    );
}

#[test]
fn backing_names() {
    let argv = ["-b", "new.raw", "-F", "raw", "ovl.qcow2"];
    check(
        "esc-backing-missing",
        &|fx| backing_overlay(fx, evil_rel().as_bytes()),
        Special::None,
        &argv,
        None,
        Expect::LikeQemu {
            raw: evil_rel(),
            shown: evil_rel_shown(),
        },
    );
    check(
        "esc-backing-fifo",
        &|fx| backing_overlay(fx, evil_rel().as_bytes()),
        Special::Fifo,
        &argv,
        None,
        // qemu-img blocks reading the FIFO; instar refuses it before opening it, with the
        // text QEMU's file driver has for it.
        Expect::Exactly(format!(
            "Could not open 'ovl.qcow2': Could not open backing file: 'file' driver \
             requires '{}' to be a regular file",
            evil_rel_shown()
        )),
    );
    check(
        "esc-backing-outside",
        &|fx| backing_overlay(fx, format!("/nonexistent/{EVIL}").as_bytes()),
        Special::None,
        &argv,
        None,
        Expect::Exactly(format!(
            "Could not open 'ovl.qcow2': Could not open backing file: backing file name \
             '/nonexistent/{EVIL_SHOWN}' is outside the allowed directories (see --allow-dir)"
        )),
    );
}

#[test]
fn backing_name_in_a_lock_message() {
    // The old chain's image is in use by a writer: QEMU's lock error and its hint, which
    // names the image by the name read from the overlay.
    check(
        "esc-lock",
        &|fx| {
            backing_overlay(fx, evil_rel().as_bytes());
            std::fs::rename(fx.path("base.qcow2"), fx.path(EVIL)).expect("rename");
        },
        Special::None,
        &["-b", "new.raw", "-F", "raw", "ovl.qcow2"],
        Some(("qcow2", &evil_rel())),
        Expect::LikeQemu {
            raw: evil_rel(),
            shown: evil_rel_shown(),
        },
    );
}

#[test]
fn backing_name_in_the_new_chain() {
    // -b is typed by the user; the name inside it comes from an image.
    check(
        "esc-new-chain",
        &|fx| {
            fx.create("qcow2", "ovl.qcow2", "1M", &[]);
            fx.create(
                "qcow2",
                "new.qcow2",
                "1M",
                &["-u", "-b", "placeholder.qcow2", "-F", "qcow2"],
            );
            fx.edit_header("new.qcow2", |h| h.backing = Some(evil_rel().into_bytes()));
        },
        Special::None,
        &["-b", "new.qcow2", "-F", "qcow2", "ovl.qcow2"],
        None,
        Expect::LikeQemu {
            raw: evil_rel(),
            shown: evil_rel_shown(),
        },
    );
}

#[test]
fn recorded_backing_format() {
    // An unknown driver name read from the overlay's header.
    let evil_format = "\x1b[2J\r\n\x07";
    check(
        "esc-format",
        &|fx| {
            backing_overlay(fx, b"base.qcow2");
            fx.edit_header("ovl.qcow2", |h| {
                let ext = h
                    .exts
                    .iter_mut()
                    .find(|e| e.magic == EXT_BACKING_FORMAT)
                    .expect("backing format extension");
                ext.data = evil_format.as_bytes().to_vec();
            });
        },
        Special::None,
        &["-b", "new.raw", "-F", "raw", "ovl.qcow2"],
        None,
        Expect::LikeQemu {
            raw: evil_format.to_string(),
            shown: "\\x1b[2J\\x0d\\x0a\\x07".to_string(),
        },
    );
}

#[test]
fn feature_name_in_a_guest_message() {
    // The guest's message quotes a name from the image's feature table (QEMU's
    // "Unsupported IMGFMT feature(s): NAME" for an unknown incompatible bit).
    let evil_feature = "\x1b]0;owned\x07\x1b[2J\r\nforged";
    check(
        "esc-feature",
        &|fx| {
            backing_overlay(fx, b"base.qcow2");
            fx.edit_header("ovl.qcow2", |h| {
                let mut entry = vec![0u8, 40];
                entry.extend_from_slice(evil_feature.as_bytes());
                entry.resize(48, 0);
                match h.exts.iter_mut().find(|e| e.magic == EXT_FEATURE_TABLE) {
                    Some(ext) => ext.data.extend_from_slice(&entry),
                    None => h.exts.push(Ext {
                        magic: EXT_FEATURE_TABLE,
                        data: entry,
                    }),
                }
            });
            fx.edit("ovl.qcow2", |b| {
                let v = be64(b, off::INCOMPATIBLE) | (1u64 << 40);
                put64(b, off::INCOMPATIBLE, v);
            });
        },
        Special::None,
        &["-u", "-b", "new.raw", "-F", "raw", "ovl.qcow2"],
        None,
        Expect::LikeQemu {
            raw: evil_feature.to_string(),
            shown: "\\x1b]0;owned\\x07\\x1b[2J\\x0d\\x0aforged".to_string(),
        },
    );
}
