//! The probe rule (docs/path-policy.md), against qemu-img 10.2: without `-F`, a new
//! backing file whose probed format names another file (a forged qcow2 header naming
//! `/etc/shadow` or a neighbouring disk, an external data file, a vmdk descriptor whose
//! extent is a host file, qcow and qed headers with backing names, a vmdk sparse header
//! that defers to an embedded descriptor) is refused with qemu-img's own line plus one
//! naming what the image carries, and every file is left unchanged. With `-F raw` the
//! same rebase succeeds and leaves the same bytes as qemu-img's. An image that names no
//! other file is still probed and recorded, and the result is the one qemu-img gives
//! with that format passed as `-F`.

mod qemu;

use qemu::*;

/// One crafted new backing file, `new.raw`, with what the refusal must name.
struct Hostile {
    name: &'static str,
    build: fn(&Fx),
    /// "backing file", "external data file" or "extent file".
    what: &'static str,
    /// The name as instar must print it (escaped).
    shown: &'static str,
}

/// The overlay: `ovl.qcow2` over `base.qcow2`, both with data, and a neighbouring disk
/// `victim.qcow2` that a forged header may name.
fn overlay(fx: &Fx) {
    fx.create("qcow2", "base.qcow2", "1M", &[]);
    fx.io("qcow2", "base.qcow2", &["write -P 0x11 0 64k"]);
    fx.create(
        "qcow2",
        "ovl.qcow2",
        "1M",
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
    fx.io("qcow2", "ovl.qcow2", &["write -P 0x22 128k 64k"]);
    fx.create("qcow2", "victim.qcow2", "1M", &[]);
    fx.io("qcow2", "victim.qcow2", &["write -P 0x33 0 1M"]);
}

const FLAT_DESCRIPTOR: &str = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\n\
    parentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\n\
    RW 2048 FLAT \"/etc/shadow\" 0\n\n# The Disk Data Base\n#DDB\n\n\
    ddb.virtualHWVersion = \"4\"\n";

fn shadow_qcow2(fx: &Fx) {
    fx.create(
        "qcow2",
        "new.raw",
        "1M",
        &["-u", "-b", "/etc/shadow", "-F", "raw"],
    );
}

fn neighbour_qcow2(fx: &Fx) {
    fx.create(
        "qcow2",
        "new.raw",
        "1M",
        &["-u", "-b", "victim.qcow2", "-F", "qcow2"],
    );
}

fn data_file_qcow2(fx: &Fx) {
    fx.create("qcow2", "new.raw", "1M", &["-o", "data_file=victim.data"]);
}

fn escaped_qcow2(fx: &Fx) {
    shadow_qcow2(fx);
    fx.edit_header("new.raw", |h| {
        h.backing = Some(b"/etc/\x1b]0;owned\x07\x1b[2J\r\ninstar: forged".to_vec());
    });
}

fn flat_vmdk(fx: &Fx) {
    fx.write("new.raw", FLAT_DESCRIPTOR.as_bytes());
}

fn qed(fx: &Fx) {
    fx.create(
        "qed",
        "new.raw",
        "1M",
        &["-u", "-b", "/etc/shadow", "-F", "raw"],
    );
}

fn qcow1(fx: &Fx) {
    fx.create(
        "qcow",
        "new.raw",
        "1M",
        &["-u", "-b", "/etc/shadow", "-F", "raw"],
    );
}

/// A vmdk sparse header with capacity 0: QEMU opens its embedded descriptor as a
/// descriptor file, extents and all.
fn sparse_vmdk_deferring(fx: &Fx) {
    fx.create("vmdk", "new.raw", "1M", &[]);
    fx.edit("new.raw", |b| {
        b[12..20].copy_from_slice(&0u64.to_le_bytes());
        replace(
            b,
            b"createType=\"monolithicSparse\"",
            b"createType=\"monolithicFlat\"  ",
        );
        replace(
            b,
            b"RW 2048 SPARSE \"new.raw\"",
            b"RW 2048 FLAT \"/etc/shadow\" 0",
        );
    });
}

fn replace(b: &mut [u8], from: &[u8], to: &[u8]) {
    let at = b
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{} not found", String::from_utf8_lossy(from)));
    b[at..at + to.len()].copy_from_slice(to);
}

const HOSTILE: &[Hostile] = &[
    Hostile {
        name: "shadow",
        build: shadow_qcow2,
        what: "backing file",
        shown: "/etc/shadow",
    },
    Hostile {
        name: "neighbour",
        build: neighbour_qcow2,
        what: "backing file",
        shown: "victim.qcow2",
    },
    Hostile {
        name: "data-file",
        build: data_file_qcow2,
        what: "external data file",
        shown: "victim.data",
    },
    Hostile {
        name: "escaped",
        build: escaped_qcow2,
        what: "backing file",
        shown: "/etc/\\x1b]0;owned\\x07\\x1b[2J\\x0d\\x0ainstar: forged",
    },
    Hostile {
        name: "flat-vmdk",
        build: flat_vmdk,
        what: "extent file",
        shown: "/etc/shadow",
    },
    Hostile {
        name: "qed",
        build: qed,
        what: "backing file",
        shown: "/etc/shadow",
    },
    Hostile {
        name: "qcow1",
        build: qcow1,
        what: "backing file",
        shown: "/etc/shadow",
    },
    Hostile {
        name: "sparse-vmdk-capacity-0",
        build: sparse_vmdk_deferring,
        what: "extent file",
        shown: "/etc/shadow",
    },
];

fn mode_args(unsafe_mode: bool, extra: &[&'static str]) -> Vec<&'static str> {
    let mut a = vec!["rebase"];
    if unsafe_mode {
        a.push("-u");
    }
    a.extend_from_slice(extra);
    a.push("ovl.qcow2");
    a
}

/// Without `-F`: qemu-img's line, then instar's line naming what the image carries;
/// exit 1, nothing on stdout, every file unchanged.
fn refused_without_f(c: &Hostile, unsafe_mode: bool) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let label = format!(
        "probe-{}-{}",
        c.name,
        if unsafe_mode { "u" } else { "safe" }
    );
    let scratch = Scratch::new(&label);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    overlay(&fx);
    (c.build)(&fx);
    let before = snapshot(&fx.dir);
    let argv = mode_args(unsafe_mode, &["-b", "new.raw"]);

    let qdir = scratch.copy("qemu");
    let q = run(&refs.v10_2.img, &argv, &qdir);
    assert_eq!(q.status, 1, "{label}: qemu-img: {}", q.stderr);
    let want = "PROG: Could not change the backing file to 'new.raw': backing format must be \
                specified\n";
    let qemu_said = normalise_stderr(&q.stderr, &refs.v10_2.img);
    // In safe mode qemu-img opens the probed image's whole chain before it refuses, so a
    // name it cannot open gives that open error first; instar refuses before opening it.
    if unsafe_mode || !qemu_said.starts_with("PROG: Could not open new backing file") {
        assert_eq!(qemu_said, want, "{label}: qemu-img's refusal");
    }
    if !subject.is_instar() {
        return;
    }
    let idir = scratch.copy("subject");
    let i = run(subject.path(), &argv, &idir);
    let shown = format!("cd {}; {}", idir.display(), show_cmd("instar", &argv));
    assert_eq!(i.status, 1, "{shown}\n{}", i.stderr);
    assert_eq!(i.stdout, "", "{shown}: stdout");
    let got = normalise_stderr(&i.stderr, subject.path());
    let mut lines = got.split_inclusive('\n');
    assert_eq!(lines.next(), Some(want), "{shown}: {:?}", i.stderr);
    let second = lines.next().unwrap_or_default();
    let expected = format!(
        "names the {} '{}'; a probed format is recorded only for an image that names no \
         other file: give -F to trust it\n",
        c.what, c.shown
    );
    assert!(
        second.starts_with("The new backing file probes as ") && second.ends_with(&expected),
        "{shown}: second line {second:?}, expected one ending {expected:?}"
    );
    assert_eq!(
        lines.next(),
        None,
        "{shown}: more than two lines: {:?}",
        i.stderr
    );
    assert!(
        !i.stderr.contains(['\x1b', '\x07', '\r']),
        "{shown}: raw control bytes on stderr: {:?}",
        i.stderr
    );
    assert!(snapshot(&idir) == before, "{shown}: a file changed");
}

/// `-b backing -F fmt` on the fixture `build` makes (or, with `probe`, instar without
/// `-F` and qemu-img with the probed format as `-F`): both succeed and leave the same
/// bytes in every file.
fn same_result(
    c_name: &str,
    build: &dyn Fn(&Fx),
    unsafe_mode: bool,
    backing: &'static str,
    fmt: &'static str,
    probe: bool,
) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let label = format!(
        "probe-ok-{c_name}-{}",
        if unsafe_mode { "u" } else { "safe" }
    );
    let scratch = Scratch::new(&label);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    build(&fx);
    let with_f = mode_args(unsafe_mode, &["-b", backing, "-F", fmt]);
    let qdir = scratch.copy("qemu");
    let q = run(&refs.v10_2.img, &with_f, &qdir);
    assert_eq!(q.status, 0, "{label}: qemu-img: {}", q.stderr);

    // qemu-img standing in for instar cannot probe: it keeps -F.
    let argv = if probe && subject.is_instar() {
        mode_args(unsafe_mode, &["-b", backing])
    } else {
        with_f
    };
    let idir = scratch.copy("subject");
    let i = run(subject.path(), &argv, &idir);
    let shown = format!("cd {}; {}", idir.display(), show_cmd("instar", &argv));
    assert_eq!(i.status, 0, "{shown}\n{}", i.stderr);
    assert_eq!(i.stderr, "", "{shown}: stderr");
    let (want, got) = (snapshot(&qdir), snapshot(&idir));
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "{shown}"
    );
    for (path, bytes) in &want {
        if got[path] != *bytes {
            panic!(
                "{shown}: {} differs from qemu-img's: {}",
                path.display(),
                describe_diff(bytes, &got[path]).unwrap_or_default()
            );
        }
    }
}

#[test]
fn hostile_probe_refused_in_unsafe_mode() {
    for c in HOSTILE {
        refused_without_f(c, true);
    }
}

#[test]
fn hostile_probe_refused_in_safe_mode() {
    for c in HOSTILE {
        refused_without_f(c, false);
    }
}

#[test]
fn hostile_images_accepted_with_f_raw() {
    for c in HOSTILE {
        for unsafe_mode in [true, false] {
            let build = |fx: &Fx| {
                overlay(fx);
                (c.build)(fx);
            };
            same_result(c.name, &build, unsafe_mode, "new.raw", "raw", false);
        }
    }
}

fn plain_qcow2(fx: &Fx) {
    fx.create("qcow2", "new.raw", "1M", &[]);
    fx.io("qcow2", "new.raw", &["write -P 0x44 0 256k"]);
}

fn plain_raw(fx: &Fx) {
    fx.create("raw", "new.raw", "1M", &[]);
    fx.io("raw", "new.raw", &["write -P 0x55 64k 64k"]);
}

fn sparse_vmdk(fx: &Fx) {
    fx.create("vmdk", "new.raw", "1M", &[]);
    fx.io("vmdk", "new.raw", &["write -P 0x66 0 64k"]);
}

#[test]
fn benign_probe_recorded() {
    type Build = fn(&Fx);
    let cases: [(&str, Build, &str); 3] = [
        ("qcow2", plain_qcow2, "qcow2"),
        ("raw", plain_raw, "raw"),
        ("vmdk", sparse_vmdk, "vmdk"),
    ];
    for (name, build, fmt) in cases {
        for unsafe_mode in [true, false] {
            let full = |fx: &Fx| {
                overlay(fx);
                build(fx);
            };
            same_result(name, &full, unsafe_mode, "new.raw", fmt, true);
        }
    }
}

#[test]
fn probed_image_is_not_opened_further() {
    // Safe mode refuses right after the probe: a forged header naming a missing file gives
    // the probe rule's refusal, not an open error for the file it names (which qemu-img,
    // opening the whole chain first, reports).
    let Some((refs, subject)) = setup() else {
        return;
    };
    if !subject.is_instar() {
        return;
    }
    let scratch = Scratch::new("probe-missing");
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    overlay(&fx);
    fx.create(
        "qcow2",
        "new.raw",
        "1M",
        &["-u", "-b", "missing.qcow2", "-F", "qcow2"],
    );
    let before = snapshot(&fx.dir);
    let dir = scratch.copy("subject");
    let i = run(
        subject.path(),
        &["rebase", "-b", "new.raw", "ovl.qcow2"],
        &dir,
    );
    assert_eq!(i.status, 1, "{}", i.stderr);
    assert!(
        i.stderr.starts_with(
            "instar: Could not change the backing file to 'new.raw': backing format must be \
             specified\nThe new backing file probes as qcow2 and names the backing file \
             'missing.qcow2';"
        ),
        "{:?}",
        i.stderr
    );
    assert!(snapshot(&dir) == before);
}

/// `ovl.qcow2 → mid.qcow2 → base.qcow2`; the overlay records mid's format only when
/// `recorded`.
fn in_chain(fx: &Fx, recorded: bool) {
    fx.create("qcow2", "base.qcow2", "1M", &[]);
    fx.io("qcow2", "base.qcow2", &["write -P 0x11 0 64k"]);
    fx.create(
        "qcow2",
        "mid.qcow2",
        "1M",
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
    fx.io("qcow2", "mid.qcow2", &["write -P 0x22 64k 64k"]);
    fx.create(
        "qcow2",
        "ovl.qcow2",
        "1M",
        &["-b", "mid.qcow2", "-F", "qcow2"],
    );
    if !recorded {
        fx.edit_header("ovl.qcow2", |h| {
            h.exts.retain(|e| e.magic != EXT_BACKING_FORMAT)
        });
    }
}

#[test]
fn in_chain_image_with_a_probed_format() {
    // -b names an image of the old chain (QEMU reuses it). When the overlay recorded its
    // format, that format is recorded again (not a probe): same result as qemu-img with
    // -F qcow2. When the overlay recorded none, the format came from a probe, and the
    // image names a backing file: the probe rule refuses.
    same_result(
        "in-chain-recorded",
        &|fx| in_chain(fx, true),
        false,
        "mid.qcow2",
        "qcow2",
        true,
    );
    let Some((refs, subject)) = setup() else {
        return;
    };
    if !subject.is_instar() {
        return;
    }
    let scratch = Scratch::new("probe-in-chain");
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    in_chain(&fx, false);
    let before = snapshot(&fx.dir);
    let dir = scratch.copy("subject");
    let i = run(
        subject.path(),
        &["rebase", "-b", "mid.qcow2", "ovl.qcow2"],
        &dir,
    );
    assert_eq!(i.status, 1, "{}", i.stderr);
    assert_eq!(
        i.stderr,
        "instar: Could not change the backing file to 'mid.qcow2': backing format must be \
         specified\nThe new backing file probes as qcow2 and names the backing file \
         'base.qcow2'; a probed format is recorded only for an image that names no other \
         file: give -F to trust it\n"
    );
    assert!(snapshot(&dir) == before, "a file changed");
}
