//! Shared harness for the differential tests: locating the reference qemu-img builds,
//! building fixtures with qemu-img/qemu-io, hand-editing qcow2 headers, running qemu-img
//! and instar on separate copies of one fixture, and comparing what they leave behind.
//!
//! Environment:
//! - `QEMU_IMG_10_2`, `QEMU_IMG_11_1`, `QEMU_IMG_10_0`, `QEMU_IMG_7_2`: paths of the
//!   reference qemu-img builds (otherwise `../shared/scripts/qemu-ref.sh --list`, and
//!   `qemu-img` on PATH for 10.0), each checked with `--version`: see
//!   `instar_testkit::qemu_ref`.
//! - `INSTAR_REQUIRE_QEMU=1` / `INSTAR_REQUIRE_KVM=1`: fail instead of skipping when a
//!   reference build or `/dev/kvm` is missing.
//! - `INSTAR_DIFF_SELFTEST=1`: run the qemu-img 10.0.2 build in place of instar (keeping the
//!   `-F` that instar would probe), which checks the harness itself without instar;
//!   `INSTAR_DIFF_SELFTEST=/path/to/qemu-img` runs that build instead.
//! - `INSTAR_KEEP_SCRATCH=1`: keep the scratch directories for inspection (a failing
//!   test keeps its own anyway).
#![allow(dead_code, unused_imports)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use instar_testkit::qemu_ref;
pub use instar_testkit::skip::{need, required};
pub use instar_testkit::{copy_tree, require_kvm, LockHolder};

// ---------------------------------------------------------------------------------------
// Reference binaries

/// One installed qemu-img build and its qemu-io.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// "10.2", "11.1", "10.0" or "7.2".
    pub label: &'static str,
    pub img: PathBuf,
    pub io: PathBuf,
}

/// The reference builds found on this machine. 10.2 is the reference the project targets;
/// the others (11.1, the newest release, then 10.0 and 7.2) are compared with it when
/// present, and expected to give the same bytes unless a scenario documents otherwise.
#[derive(Debug)]
pub struct Refs {
    pub v10_2: Qemu,
    pub others: Vec<Qemu>,
}

impl Refs {
    /// qemu-img 11.1, the newest release, when installed.
    pub fn newest(&self) -> Option<&Qemu> {
        self.others.iter().find(|q| q.label == "11.1")
    }

    /// Every build, 10.2 first.
    pub fn all(&self) -> Vec<&Qemu> {
        let mut v = vec![&self.v10_2];
        v.extend(self.others.iter());
        v
    }
}

/// The build of version `label` (see `instar_testkit::qemu_ref`), or `None`.
pub fn find_build(label: &'static str) -> Option<Qemu> {
    qemu_ref::find(label).map(|b| Qemu {
        label,
        img: b.img,
        io: b.io,
    })
}

fn locate() -> Option<Refs> {
    let v10_2 = find_build("10.2");
    let v11_1 = find_build("11.1");
    let v10_0 = find_build("10.0");
    let v7_2 = find_build("7.2");
    let mut missing = Vec::new();
    for (name, b) in [
        ("10.2", &v10_2),
        ("11.1", &v11_1),
        ("10.0", &v10_0),
        ("7.2", &v7_2),
    ] {
        if b.is_none() {
            missing.push(name);
        }
    }
    need(
        missing.is_empty(),
        "INSTAR_REQUIRE_QEMU",
        &format!("reference qemu-img missing: {}", missing.join(", ")),
    );
    let v10_2 = v10_2?;
    Some(Refs {
        v10_2,
        others: [v11_1, v10_0, v7_2].into_iter().flatten().collect(),
    })
}

/// The reference builds, or `None` (after a printed note) when qemu-img 10.2 is missing
/// and `INSTAR_REQUIRE_QEMU` is not set.
pub fn refs() -> Option<&'static Refs> {
    static REFS: OnceLock<Option<Refs>> = OnceLock::new();
    let r = REFS.get_or_init(locate).as_ref();
    if r.is_none() {
        eprintln!("skipping: qemu-img 10.2 not found (run ../shared/scripts/qemu-ref.sh)");
    }
    r
}

// ---------------------------------------------------------------------------------------
// The tool under test

/// What plays the part of instar.
#[derive(Debug, Clone)]
pub enum Subject {
    /// The real binary.
    Instar(PathBuf),
    /// A qemu-img build standing in for instar, to validate the harness
    /// (`INSTAR_DIFF_SELFTEST=1`). It needs `-F` where instar would probe.
    SelfTest(PathBuf),
}

impl Subject {
    pub fn path(&self) -> &Path {
        match self {
            Subject::Instar(p) | Subject::SelfTest(p) => p,
        }
    }
    pub fn is_instar(&self) -> bool {
        matches!(self, Subject::Instar(_))
    }
}

/// The tool under test, or `None` (after a printed note) when it cannot run here.
pub fn subject(refs: &Refs) -> Option<Subject> {
    if let Some(v) = std::env::var_os("INSTAR_DIFF_SELFTEST").filter(|v| v != "1" && !v.is_empty())
    {
        return Some(Subject::SelfTest(PathBuf::from(v)));
    }
    if required("INSTAR_DIFF_SELFTEST") {
        let q = refs
            .others
            .iter()
            .find(|q| q.label == "10.0")
            .unwrap_or(&refs.v10_2);
        return Some(Subject::SelfTest(q.img.clone()));
    }
    if !require_kvm() {
        return None;
    }
    Some(Subject::Instar(PathBuf::from(env!("CARGO_BIN_EXE_instar"))))
}

/// Both sides of a differential test, or `None` when the test must be skipped.
pub fn setup() -> Option<(&'static Refs, Subject)> {
    let r = refs()?;
    let s = subject(r)?;
    Some((r, s))
}

// ---------------------------------------------------------------------------------------
// Scratch directories

/// A fresh directory under the system temp dir (see `instar_testkit::Scratch`), with
/// the fixture in `fixture/` and copies of it beside.
pub struct Scratch {
    dir: instar_testkit::Scratch,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = instar_testkit::Scratch::new(&format!("diff-{name}"));
        fs::create_dir_all(dir.path("fixture")).expect("create scratch dir");
        Scratch { dir }
    }

    pub fn root(&self) -> &Path {
        &self.dir
    }

    /// Where the fixture is built.
    pub fn fixture(&self) -> PathBuf {
        self.dir.path("fixture")
    }

    /// A fresh copy of the fixture directory, named `label`.
    pub fn copy(&self, label: &str) -> PathBuf {
        let dst = self.dir.path(label);
        let _ = fs::remove_dir_all(&dst);
        copy_tree(&self.fixture(), &dst);
        dst
    }
}

/// Every regular file under `dir` (relative path → contents).
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in fs::read_dir(dir).expect("read_dir") {
            let e = e.expect("dir entry");
            let ty = e.file_type().expect("file type");
            if ty.is_dir() {
                walk(base, &e.path(), out);
            } else if ty.is_file() {
                let rel = e.path().strip_prefix(base).expect("prefix").to_path_buf();
                out.insert(rel, fs::read(e.path()).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

// ---------------------------------------------------------------------------------------
// Running programs

pub use instar_testkit::{run_in as run, Outcome as Output};

/// Shell-like rendering of a command, for failure reports.
pub fn show_cmd<S: AsRef<std::ffi::OsStr>>(prog: &str, args: &[S]) -> String {
    let mut s = prog.to_string();
    for a in args {
        let a = a.as_ref().to_string_lossy();
        s.push(' ');
        if a.is_empty() {
            s.push_str("\"\"");
        } else if a.len() > 80 {
            s.push_str(&format!("<{} bytes: {}…>", a.len(), &a[..40]));
        } else if a.contains(' ') {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

// ---------------------------------------------------------------------------------------
// Fixture building

/// A directory in which fixtures are built with the reference qemu-img/qemu-io.
pub struct Fx<'a> {
    pub dir: PathBuf,
    pub qemu: &'a Qemu,
}

impl<'a> Fx<'a> {
    pub fn new(dir: PathBuf, qemu: &'a Qemu) -> Fx<'a> {
        Fx { dir, qemu }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Run qemu-img in the fixture directory; it must succeed.
    pub fn img(&self, args: &[&str]) -> Output {
        let out = run(&self.qemu.img, args, &self.dir);
        assert_eq!(
            out.status,
            0,
            "fixture command failed: {}\n{}",
            show_cmd("qemu-img", args),
            out.stderr
        );
        out
    }

    /// `qemu-img create -f FMT [opts] NAME SIZE`, creating parent directories.
    pub fn create(&self, fmt: &str, name: &str, size: &str, opts: &[&str]) {
        if let Some(parent) = Path::new(name).parent() {
            fs::create_dir_all(self.dir.join(parent)).expect("mkdir");
        }
        let mut args = vec!["create", "-q", "-f", fmt];
        args.extend_from_slice(opts);
        args.push(name);
        args.push(size);
        self.img(&args);
    }

    /// Run qemu-io commands on an image; they must succeed.
    pub fn io(&self, fmt: &str, name: &str, cmds: &[&str]) {
        let mut args: Vec<&str> = vec!["-f", fmt];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(name);
        let out = run(&self.qemu.io, &args, &self.dir);
        assert!(
            out.status == 0 && !out.stdout.contains("failed") && !out.stderr.contains("failed"),
            "qemu-io failed: {}\n{}{}",
            show_cmd("qemu-io", &args),
            out.stdout,
            out.stderr
        );
    }

    pub fn write(&self, name: &str, bytes: &[u8]) {
        let p = self.dir.join(name);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(p, bytes).expect("write");
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        fs::read(self.dir.join(name)).expect("read")
    }

    /// Read-modify-write a file.
    pub fn edit(&self, name: &str, f: impl FnOnce(&mut Vec<u8>)) {
        let mut b = self.read(name);
        f(&mut b);
        self.write(name, &b);
    }

    /// Same as [`Fx::edit`] but on the parsed qcow2 header, re-laid out by
    /// [`Qcow2Header::write_into`].
    pub fn edit_header(&self, name: &str, f: impl FnOnce(&mut Qcow2Header)) {
        self.edit(name, |b| {
            let mut h = Qcow2Header::parse(b);
            f(&mut h);
            h.write_into(b);
        });
    }

    /// A path of exactly `len` bytes (relative, made of directories of at most 200 bytes),
    /// whose file is created as a copy of `src` so that it can also be probed.
    pub fn long_name(&self, len: usize, src: &str) -> String {
        let name = long_path(len);
        let p = self.dir.join(&name);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::copy(self.dir.join(src), &p).expect("copy");
        name
    }
}

/// A relative path of exactly `len` bytes, made of directories of at most 200 bytes.
pub fn long_path(len: usize) -> String {
    let mut name = String::new();
    let mut n = 0;
    while len - name.len() > 200 {
        name.push_str(&format!("{}/", "d".repeat(199 - (n % 3))));
        n += 1;
    }
    let rest = len - name.len();
    assert!(rest >= 1);
    name.push_str(&"n".repeat(rest));
    assert_eq!(name.len(), len);
    name
}

// ---------------------------------------------------------------------------------------
// qcow2 header editing

pub fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}
pub fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
pub fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
pub fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
pub fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Offsets of the fixed qcow2 header fields.
pub mod off {
    pub const VERSION: usize = 4;
    pub const BACKING_OFFSET: usize = 8;
    pub const BACKING_SIZE: usize = 16;
    pub const CLUSTER_BITS: usize = 20;
    pub const SIZE: usize = 24;
    pub const INCOMPATIBLE: usize = 72;
    pub const COMPATIBLE: usize = 80;
    pub const AUTOCLEAR: usize = 88;
    pub const HEADER_LENGTH: usize = 100;
}

pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// One header extension as stored (magic, data without padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext {
    pub magic: u32,
    pub data: Vec<u8>,
}

/// The parts of qcow2 cluster 0 that the tests rearrange: the fixed header (kept as raw
/// bytes, `header_length` long), the extensions in file order, and the backing name.
#[derive(Debug, Clone)]
pub struct Qcow2Header {
    /// Raw fixed header: 72 bytes for v2, `header_length` bytes for v3.
    pub fixed: Vec<u8>,
    pub exts: Vec<Ext>,
    pub backing: Option<Vec<u8>>,
    /// Byte written into extension padding (QEMU writes 0).
    pub pad: u8,
    /// Bytes written right after the backing name (or the end marker), e.g. garbage.
    pub trailer: Vec<u8>,
    pub cluster_size: usize,
}

impl Qcow2Header {
    pub fn parse(b: &[u8]) -> Qcow2Header {
        assert_eq!(&b[0..4], b"QFI\xfb", "not qcow2");
        let version = be32(b, off::VERSION);
        let cluster_size = 1usize << be32(b, off::CLUSTER_BITS);
        let hl = if version >= 3 {
            be32(b, off::HEADER_LENGTH) as usize
        } else {
            72
        };
        let fixed = b[..hl].to_vec();
        let bo = be64(b, off::BACKING_OFFSET) as usize;
        let bs = be32(b, off::BACKING_SIZE) as usize;
        let end = if bo != 0 { bo } else { cluster_size };
        let mut exts = Vec::new();
        let mut p = hl;
        while p + 8 <= end {
            let magic = be32(b, p);
            let len = be32(b, p + 4) as usize;
            if magic == 0 {
                break;
            }
            exts.push(Ext {
                magic,
                data: b[p + 8..p + 8 + len].to_vec(),
            });
            p += 8 + len.div_ceil(8) * 8;
        }
        let backing = (bo != 0).then(|| b[bo..bo + bs].to_vec());
        Qcow2Header {
            fixed,
            exts,
            backing,
            pad: 0,
            trailer: Vec::new(),
            cluster_size,
        }
    }

    pub fn version(&self) -> u32 {
        be32(&self.fixed, off::VERSION)
    }

    /// Change `header_length` (v3): shorter drops fields, longer appends `extra` bytes of
    /// unknown header fields.
    pub fn set_header_length(&mut self, len: usize, extra_fill: u8) {
        assert!(self.version() >= 3);
        self.fixed.resize(len, extra_fill);
        put32(&mut self.fixed, off::HEADER_LENGTH, len as u32);
    }

    pub fn set64(&mut self, field: usize, v: u64) {
        put64(&mut self.fixed, field, v);
    }

    pub fn get64(&self, field: usize) -> u64 {
        be64(&self.fixed, field)
    }

    /// Lay cluster 0 out again: fixed header, extensions (padded with `pad`), end marker,
    /// backing name, trailer; everything else in cluster 0 zero.
    pub fn write_into(&self, b: &mut [u8]) {
        let cs = self.cluster_size;
        let mut c = vec![0u8; cs];
        c[..self.fixed.len()].copy_from_slice(&self.fixed);
        let mut p = self.fixed.len();
        for e in &self.exts {
            put32(&mut c, p, e.magic);
            put32(&mut c, p + 4, e.data.len() as u32);
            c[p + 8..p + 8 + e.data.len()].copy_from_slice(&e.data);
            let padded = e.data.len().div_ceil(8) * 8;
            for x in &mut c[p + 8 + e.data.len()..p + 8 + padded] {
                *x = self.pad;
            }
            p += 8 + padded;
        }
        p += 8; // end marker
        match &self.backing {
            Some(name) => {
                c[p..p + name.len()].copy_from_slice(name);
                put64(&mut c, off::BACKING_OFFSET, p as u64);
                put32(&mut c, off::BACKING_SIZE, name.len() as u32);
                p += name.len();
            }
            None => {
                put64(&mut c, off::BACKING_OFFSET, 0);
                put32(&mut c, off::BACKING_SIZE, 0);
            }
        }
        c[p..p + self.trailer.len()].copy_from_slice(&self.trailer);
        b[..cs].copy_from_slice(&c);
    }
}

// ---------------------------------------------------------------------------------------
// Comparisons

/// Describe where two byte strings differ (sizes and the first few differing ranges).
pub fn describe_diff(a: &[u8], b: &[u8]) -> Option<String> {
    if a == b {
        return None;
    }
    let mut s = String::new();
    if a.len() != b.len() {
        s.push_str(&format!("sizes {} vs {}; ", a.len(), b.len()));
    }
    let n = a.len().min(b.len());
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < n && ranges.len() < 8 {
        if a[i] != b[i] {
            let start = i;
            while i < n && a[i] != b[i] {
                i += 1;
            }
            ranges.push((start, i));
        } else {
            i += 1;
        }
    }
    for (st, en) in &ranges {
        let show = |x: &[u8]| {
            x[*st..(*en).min(*st + 16)]
                .iter()
                .map(|v| format!("{v:02x}"))
                .collect::<String>()
        };
        s.push_str(&format!(
            "[{st:#x}..{en:#x}) expected {} got {}; ",
            show(a),
            show(b)
        ));
    }
    Some(s)
}

/// Positional line diff of two texts (enough for JSON documents of the same shape).
pub fn line_diff(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = String::new();
    for i in 0..la.len().max(lb.len()) {
        let (x, y) = (la.get(i), lb.get(i));
        if x != y {
            out.push_str(&format!(
                "  line {}: expected {:?} got {:?}\n",
                i + 1,
                x.map(|s| s.trim()).unwrap_or("<none>"),
                y.map(|s| s.trim()).unwrap_or("<none>")
            ));
        }
    }
    out
}

/// Normalise an error text so that qemu-img's and instar's can be compared: the program
/// prefix (`qemu-img: `, `<argv0> rebase: `, `instar: `) becomes `PROG: `, and argv0 in
/// the "Try '… --help'" line becomes `PROG`.
pub fn normalise_stderr(text: &str, argv0: &Path) -> String {
    let full = argv0.to_string_lossy().into_owned();
    let base = argv0
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = String::new();
    for line in text.lines() {
        let mut l = line.to_string();
        for p in [
            format!("{full} rebase: "),
            format!("{base} rebase: "),
            format!("{full}: "),
            format!("{base}: "),
        ] {
            if let Some(rest) = l.strip_prefix(&p) {
                l = format!("PROG: {rest}");
                break;
            }
        }
        for p in [format!("'{full} "), format!("'{base} ")] {
            if l.starts_with("Try ") {
                l = l.replace(&p, "'PROG ");
            }
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// The argv0 a qemu-img run printed (`<argv0> rebase: …` or `Try '<argv0> rebase
/// --help'`), else `fallback`. A build started through a wrapper script prints the real
/// binary's path.
pub fn printed_argv0(stderr: &str, fallback: &Path) -> PathBuf {
    stderr
        .lines()
        .find_map(|l| {
            let l = l.strip_prefix("Try '").unwrap_or(l);
            l.split_once(" rebase").map(|(p, _)| p)
        })
        .filter(|p| p.ends_with("qemu-img"))
        .map(PathBuf::from)
        .unwrap_or_else(|| fallback.to_path_buf())
}

/// `qemu-img info --output=json` of an image with the given build, run from `cwd`.
pub fn info_json(q: &Qemu, cwd: &Path, image: &str) -> String {
    let out = run(&q.img, &["info", "--output=json", image], cwd);
    assert_eq!(
        out.status, 0,
        "qemu-img {} info {image} failed: {}",
        q.label, out.stderr
    );
    out.stdout
}

/// `qemu-img check` of a qcow2 image (without its backing chain); returns the output
/// when it is not clean.
pub fn check_problems(q: &Qemu, cwd: &Path, image: &str) -> Option<String> {
    // The backing chain is not opened: unsafe rebases may name files that do not exist.
    let name = image.replace('\\', "\\\\").replace('"', "\\\"");
    let spec = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{name}"}}}}"#
    );
    let out = run(&q.img, &["check", &spec], cwd);
    if out.status == 0 && out.stdout.contains("No errors were found") {
        None
    } else {
        Some(format!("exit {}: {}{}", out.status, out.stdout, out.stderr))
    }
}

// ---------------------------------------------------------------------------------------
// Argument lists

/// Build an argument vector from string-likes.
pub fn args<S: AsRef<str>>(items: &[S]) -> Vec<OsString> {
    items.iter().map(|s| OsString::from(s.as_ref())).collect()
}

/// Remove `-F FMT` (and `-B FMT`) from an argument list; returns the list and the format.
pub fn strip_backing_format(a: &[String]) -> (Vec<String>, Option<String>) {
    let mut out = Vec::new();
    let mut fmt = None;
    let mut i = 0;
    while i < a.len() {
        if (a[i] == "-F" || a[i] == "-B") && i + 1 < a.len() {
            fmt = Some(a[i + 1].clone());
            i += 2;
        } else {
            out.push(a[i].clone());
            i += 1;
        }
    }
    (out, fmt)
}
