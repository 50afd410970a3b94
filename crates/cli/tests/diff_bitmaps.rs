//! Differential tests for qcow2 overlays with persistent dirty bitmaps. QEMU's
//! read-write open marks the bitmaps IN_USE in place; a safe rebase's writes dirty the
//! enabled ones; the close stores them into new clusters and frees (and discards) the
//! old ones. For each fixture and each of `-u`, safe onto a new backing and safe
//! flatten (`-b ""`): instar's overlay must be byte-identical to the one qemu-img 10.2
//! and 11.1 leave, `qemu-img check` clean, `qemu-img info` (bitmaps included) the same,
//! the guest content unchanged (`qemu-img compare` with the original), no other file
//! changed. Images QEMU refuses give QEMU's message, and images with hostile bitmap
//! metadata are refused with every file unchanged.
//!
//! Fixtures are made with `qemu-img bitmap --add/--disable/--merge/--clear` and qemu-io
//! writes; IN_USE flags and hostile metadata are set by hand in the directory.

mod qemu;

use qemu::*;
use std::path::Path;

const OVERLAY: &str = "ov.qcow2";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Unsafe,
    Safe,
    Flatten,
    /// Safe with `-c`: the bitmaps are dirtied by compressed writes.
    Compressed,
}

const MODES: [Mode; 3] = [Mode::Unsafe, Mode::Safe, Mode::Flatten];

fn rebase_argv(mode: Mode) -> Vec<&'static str> {
    match mode {
        Mode::Unsafe => vec!["rebase", "-u", "-b", "new.qcow2", "-F", "qcow2", OVERLAY],
        Mode::Safe => vec!["rebase", "-b", "new.qcow2", "-F", "qcow2", OVERLAY],
        Mode::Flatten => vec!["rebase", "-b", "", OVERLAY],
        Mode::Compressed => vec!["rebase", "-c", "-b", "new.qcow2", "-F", "qcow2", OVERLAY],
    }
}

/// qemu-img 10.2 and 11.1 (when installed).
fn references(refs: &Refs) -> Vec<&Qemu> {
    refs.all()
        .into_iter()
        .filter(|q| q.label == "10.2" || q.label == "11.1")
        .collect()
}

/// Old backing `base.qcow2` (data at 0..1M and 5M..6M), new backing `new.qcow2` (other
/// data), and the overlay over `base.qcow2`, `opts` added to its creation options.
fn chain(fx: &Fx, cluster_size: &str, opts: &str) {
    fx.create("qcow2", "base.qcow2", "8M", &[]);
    fx.io(
        "qcow2",
        "base.qcow2",
        &["write -P 0x11 0 1M", "write -P 0x12 5M 1M"],
    );
    fx.create("qcow2", "new.qcow2", "8M", &[]);
    fx.io("qcow2", "new.qcow2", &["write -P 0x22 512k 1M"]);
    let o = format!("cluster_size={cluster_size}{opts}");
    fx.create(
        "qcow2",
        OVERLAY,
        "8M",
        &["-o", &o, "-b", "base.qcow2", "-F", "qcow2"],
    );
}

fn bitmap(fx: &Fx, args: &[&str]) {
    let mut v = vec!["bitmap"];
    v.extend_from_slice(args);
    fx.img(&v);
}

fn write(fx: &Fx, cmds: &[&str]) {
    fx.io("qcow2", OVERLAY, cmds);
}

/// The bitmap directory: (offset, size) from the header extension.
fn directory(b: &[u8]) -> (usize, usize) {
    let h = Qcow2Header::parse(b);
    let e = h
        .exts
        .iter()
        .find(|e| e.magic == 0x2385_2875)
        .expect("bitmaps extension");
    (be64(&e.data, 16) as usize, be64(&e.data, 8) as usize)
}

/// Offsets of each directory entry.
fn entries(b: &[u8]) -> Vec<usize> {
    let (off, size) = directory(b);
    let mut v = Vec::new();
    let mut p = off;
    while p < off + size {
        v.push(p);
        let len = 24 + be16(b, p + 18) as usize + be32(b, p + 20) as usize;
        p += len.next_multiple_of(8);
    }
    v
}

/// Edit directory entry `i` with `f(bytes, entry offset)`.
fn edit_entry(fx: &Fx, i: usize, f: impl FnOnce(&mut Vec<u8>, usize)) {
    edit_entry_in(fx, OVERLAY, i, f);
}

fn edit_entry_in(fx: &Fx, file: &str, i: usize, f: impl FnOnce(&mut Vec<u8>, usize)) {
    fx.edit(file, |b| {
        let at = entries(b)[i];
        f(b, at);
    });
}

fn set_in_use(fx: &Fx, i: usize) {
    edit_entry(fx, i, |b, at| {
        let flags = be32(b, at + 12) | 1;
        put32(b, at + 12, flags);
    });
}

type Build = dyn Fn(&Fx);

/// `qemu-img info --output=json` without `actual-size`: QEMU punches the freed bitmap
/// data clusters, instar writes zeros over them (same bytes, more blocks; see
/// `docs/bitmaps.md`).
fn info(q: &Qemu, dir: &Path) -> String {
    info_json(q, dir, OVERLAY)
        .lines()
        .filter(|l| !l.contains("\"actual-size\""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// qemu-img's `compare` of `a` and `b` (each opened with its own chain).
fn compare(q: &Qemu, a: &Path, b: &Path) -> Option<String> {
    let (sa, sb) = (a.to_string_lossy(), b.to_string_lossy());
    let out = run(&q.img, &["compare", &sa, &sb], Path::new("/"));
    (out.status != 0).then(|| format!("{}{}", out.stdout, out.stderr))
}

fn run_case(name: &str, cluster_size: &str, opts: &str, build: &Build) {
    for mode in MODES {
        run_mode(name, mode, cluster_size, opts, build);
    }
}

fn run_mode(name: &str, mode: Mode, cluster_size: &str, opts: &str, build: &Build) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let label = format!("{name}-{mode:?}");
    let scratch = Scratch::new(&label);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    chain(&fx, cluster_size, opts);
    build(&fx);
    let argv = rebase_argv(mode);
    let orig = scratch.copy("orig");
    let mut failures = Vec::new();

    let mut want: Option<(Vec<u8>, String)> = None;
    for q in references(refs) {
        let dir = scratch.copy(&format!("qemu-{}", q.label));
        let out = run(&q.img, &argv, &dir);
        assert_eq!(out.status, 0, "qemu-img {} failed: {}", q.label, out.stderr);
        let bytes = std::fs::read(dir.join(OVERLAY)).expect("read overlay");
        if let Some(p) = check_problems(q, &dir, OVERLAY) {
            panic!(
                "{label}: qemu-img {}'s own result is not clean: {p}",
                q.label
            );
        }
        let info = info(q, &dir);
        match &want {
            None => want = Some((bytes, info)),
            Some((b, _)) => {
                if let Some(d) = describe_diff(b, &bytes) {
                    failures.push(format!("qemu-img {} differs from 10.2: {d}", q.label));
                }
            }
        }
    }
    let Some((want_bytes, want_info)) = want else {
        return;
    };
    let has_ext = Qcow2Header::parse(&fx.read(OVERLAY))
        .exts
        .iter()
        .any(|e| e.magic == 0x2385_2875);
    assert_eq!(
        want_info.contains("\"bitmaps\""),
        has_ext,
        "{label}: bitmaps in the result"
    );

    let dir = scratch.copy("subject");
    let shown = format!("cd {}; {}", dir.display(), show_cmd("instar", &argv));
    let out = run(subject.path(), &argv, &dir);
    if out.status != 0 {
        failures.push(format!("{shown}\n  exit {}: {}", out.status, out.stderr));
    } else {
        let got = std::fs::read(dir.join(OVERLAY)).expect("read overlay");
        if let Some(d) = describe_diff(&want_bytes, &got) {
            failures.push(format!("{shown}\n  overlay differs from qemu-img's: {d}"));
        }
        if let Some(p) = check_problems(&refs.v10_2, &dir, OVERLAY) {
            failures.push(format!("{shown}\n  qemu-img check: {p}"));
        }
        let info = info(&refs.v10_2, &dir);
        if info != want_info {
            failures.push(format!(
                "{shown}\n  qemu-img info differs:\n{}",
                line_diff(&want_info, &info)
            ));
        }
        if mode != Mode::Unsafe {
            if let Some(d) = compare(&refs.v10_2, &orig.join(OVERLAY), &dir.join(OVERLAY)) {
                failures.push(format!("{shown}\n  content changed: {d}"));
            }
        }
        let (ra, rb) = (snapshot(&orig), snapshot(&dir));
        for (path, bytes) in &ra {
            if path.as_path() != Path::new(OVERLAY) && rb.get(path) != Some(bytes) {
                failures.push(format!("{} changed", path.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "scenario {label}:\n{}",
        failures.join("\n")
    );
}

/// qemu-img 10.2 and 11.1 refuse to open the overlay: instar gives the same message,
/// exit 1, and leaves every file unchanged.
fn run_qemu_error(name: &str, build: &Build) {
    run_qemu_error_in(name, &MODES, build);
}

fn run_qemu_error_in(name: &str, modes: &[Mode], build: &Build) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    for &mode in modes {
        let label = format!("{name}-{mode:?}");
        let scratch = Scratch::new(&label);
        let fx = Fx::new(scratch.fixture(), &refs.v10_2);
        chain(&fx, "64k", "");
        build(&fx);
        let argv = rebase_argv(mode);
        let mut want: Option<String> = None;
        for q in references(refs) {
            let dir = scratch.copy(&format!("qemu-{}", q.label));
            let out = run(&q.img, &argv, &dir);
            assert_eq!(out.status, 1, "{label}: qemu-img {} must fail", q.label);
            let text = normalise_stderr(&out.stderr, &printed_argv0(&out.stderr, &q.img));
            match &want {
                None => want = Some(text),
                Some(w) => assert_eq!(*w, text, "{label}: 10.2 and {} differ", q.label),
            }
        }
        let want = want.expect("qemu-img 10.2");
        let dir = scratch.copy("subject");
        let out = run(subject.path(), &argv, &dir);
        let got = normalise_stderr(&out.stderr, subject.path());
        assert_eq!(out.status, 1, "{label}: instar must fail: {}", out.stderr);
        assert_eq!(got, want, "{label}: message");
        assert!(
            snapshot(&scratch.fixture()) == snapshot(&dir),
            "{label}: a file changed"
        );
    }
}

/// Bitmap metadata QEMU would act on but instar refuses (it would make QEMU write
/// where it must not, or read zeros past the end of the file): exit 1, a message that
/// contains `says`, every file unchanged.
fn run_refused(name: &str, says: &str, build: &Build) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    if !subject.is_instar() {
        return;
    }
    for mode in MODES {
        let label = format!("{name}-{mode:?}");
        let scratch = Scratch::new(&label);
        let fx = Fx::new(scratch.fixture(), &refs.v10_2);
        chain(&fx, "64k", "");
        build(&fx);
        let dir = scratch.copy("subject");
        let out = run(subject.path(), &rebase_argv(mode), &dir);
        assert_eq!(out.status, 1, "{label}: instar must refuse: {}", out.stderr);
        assert!(
            out.stderr.contains(says) && out.stderr.contains("nothing was written"),
            "{label}: message: {}",
            out.stderr
        );
        assert!(
            snapshot(&scratch.fixture()) == snapshot(&dir),
            "{label}: a file changed"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Sound bitmaps

/// One enabled bitmap dirtied by a write.
#[test]
fn one_enabled() {
    run_case("one_enabled", "64k", "", &|fx| {
        bitmap(fx, &["--add", OVERLAY, "b0"]);
        write(fx, &["write -P 0x33 512k 64k"]);
    });
}

/// `-c` over bitmaps: the copied clusters are compressed and the enabled bitmaps
/// dirtied where they land. The old backing's data is in separate clusters, so each
/// compressed write covers one cluster and qemu-img's packing is deterministic.
#[test]
fn compressed_writes_dirty_bitmaps() {
    run_mode("compressed", Mode::Compressed, "64k", "", &|fx| {
        fx.io(
            "qcow2",
            "base.qcow2",
            &[
                "write -z 0 1M",
                "write -z 5M 1M",
                "write -P 0x41 2M 64k",
                "write -P 0x42 2176k 64k",
                "write -P 0x43 4M 64k",
            ],
        );
        // The new backing's 1 MiB run would be one multi-cluster request: keep one
        // cluster of it.
        fx.io(
            "qcow2",
            "new.qcow2",
            &["write -z 512k 1M", "write -P 0x51 3M 64k"],
        );
        bitmap(fx, &["--add", OVERLAY, "b0"]);
        bitmap(fx, &["--add", "-g", "4k", OVERLAY, "fine"]);
        bitmap(fx, &["--add", OVERLAY, "off"]);
        write(fx, &["write -P 0x33 512k 64k"]);
        bitmap(fx, &["--disable", OVERLAY, "off"]);
    });
}

/// Granularities from 512 bytes to 2 MiB, one disabled, one empty, one added after.
#[test]
fn granularities_disabled_empty() {
    run_case("granularities", "64k", "", &|fx| {
        bitmap(fx, &["--add", "-g", "512", OVERLAY, "g512"]);
        bitmap(fx, &["--add", "-g", "4k", OVERLAY, "g4k"]);
        bitmap(fx, &["--add", "-g", "2M", OVERLAY, "g2m"]);
        bitmap(fx, &["--add", OVERLAY, "off"]);
        write(fx, &["write -P 0x33 100k 3k", "write -z 3M 64k"]);
        bitmap(fx, &["--disable", OVERLAY, "off"]);
        write(fx, &["write -P 0x34 7M 512"]);
        bitmap(fx, &["--add", OVERLAY, "empty"]);
    });
}

/// A bitmap with every bit set, and a merge into a disabled one.
#[test]
fn full_and_merged() {
    run_case("full_merged", "64k", "", &|fx| {
        bitmap(fx, &["--add", "-g", "4k", OVERLAY, "full"]);
        write(fx, &["write -P 0x35 0 8M"]);
        bitmap(fx, &["--add", OVERLAY, "target"]);
        bitmap(fx, &["--disable", OVERLAY, "target"]);
        bitmap(fx, &["--merge", "full", OVERLAY, "target"]);
        bitmap(fx, &["--add", "-g", "1M", OVERLAY, "later"]);
        write(fx, &["write -P 0x36 2M 4k"]);
    });
}

/// Small clusters: several data clusters per bitmap, tables over one cluster.
#[test]
fn cluster_512() {
    run_case("cluster_512", "512", "", &|fx| {
        bitmap(fx, &["--add", "-g", "512", OVERLAY, "fine"]);
        bitmap(fx, &["--add", "-g", "64k", OVERLAY, "coarse"]);
        write(
            fx,
            &[
                "write -P 0x37 0 4k",
                "write -P 0x38 3M 700k",
                "write -P 0x39 8190k 2k",
            ],
        );
    });
}

/// 4 KiB and 2 MiB clusters.
#[test]
fn cluster_4k_and_2m() {
    for cs in ["4k", "2M"] {
        run_case(&format!("cluster_{cs}"), cs, "", &|fx| {
            bitmap(fx, &["--add", "-g", "4k", OVERLAY, "a"]);
            write(fx, &["write -P 0x3a 1M 100k"]);
            bitmap(fx, &["--add", OVERLAY, "b"]);
            bitmap(fx, &["--disable", OVERLAY, "a"]);
            write(fx, &["write -P 0x3b 6M 8k"]);
        });
    }
}

/// Many bitmaps: a directory over several hundred bytes, tables allocated one by one.
#[test]
fn many_bitmaps() {
    run_case("many", "64k", "", &|fx| {
        for i in 0..24 {
            let name = format!("bitmap-{i:02}-{}", "x".repeat(i));
            bitmap(
                fx,
                &[
                    "--add",
                    "-g",
                    if i % 2 == 0 { "64k" } else { "8k" },
                    OVERLAY,
                    &name,
                ],
            );
            write(fx, &[&format!("write -P 0x40 {}k 4k", i * 300)]);
        }
    });
}

/// Bitmaps already IN_USE when opened (a program holding them crashed): QEMU keeps
/// them as they are; alone (nothing is stored) and beside consistent ones.
#[test]
fn in_use() {
    run_case("in_use_only", "64k", "", &|fx| {
        bitmap(fx, &["--add", OVERLAY, "stale"]);
        write(fx, &["write -P 0x41 0 128k"]);
        set_in_use(fx, 0);
    });
    run_case("in_use_mixed", "64k", "", &|fx| {
        bitmap(fx, &["--add", OVERLAY, "a"]);
        bitmap(fx, &["--add", "-g", "4k", OVERLAY, "stale"]);
        write(fx, &["write -P 0x41 0 128k"]);
        bitmap(fx, &["--add", OVERLAY, "c"]);
        set_in_use(fx, 1);
    });
}

/// Lazy refcounts and extended L2 entries with bitmaps.
#[test]
fn lazy_refcounts_and_extended_l2() {
    run_case("lazy", "64k", ",lazy_refcounts=on", &|fx| {
        bitmap(fx, &["--add", OVERLAY, "b"]);
        write(fx, &["write -P 0x42 1M 64k"]);
    });
    run_case("extl2", "64k", ",extended_l2=on", &|fx| {
        bitmap(fx, &["--add", "-g", "2k", OVERLAY, "b"]);
        write(fx, &["write -P 0x43 1M 6k"]);
    });
}

/// The autoclear bit without a bitmaps extension: nothing to load, so `-u` only
/// rewrites the header. QEMU's overlap check then reads a bitmap directory of 0 bytes
/// at offset 0 as covering the whole file: every write of a safe rebase fails and
/// QEMU marks the image corrupt. instar refuses before writing.
#[test]
fn autoclear_bit_alone() {
    let build = |fx: &Fx| {
        write(fx, &["write -P 0x44 0 64k"]);
        fx.edit(OVERLAY, |b| {
            let v = be64(b, 88) | 1;
            put64(b, 88, v);
        });
    };
    run_mode("autoclear_alone", Mode::Unsafe, "64k", "", &build);
    let Some((refs, subject)) = setup() else {
        return;
    };
    for mode in [Mode::Safe, Mode::Flatten] {
        let scratch = Scratch::new(&format!("autoclear_alone-{mode:?}"));
        let fx = Fx::new(scratch.fixture(), &refs.v10_2);
        chain(&fx, "64k", "");
        build(&fx);
        let argv = rebase_argv(mode);
        for q in references(refs) {
            let out = run(&q.img, &argv, &scratch.copy(&format!("qemu-{}", q.label)));
            assert!(
                out.status == 1 && out.stderr.contains("overlaps with bitmap directory"),
                "qemu-img {}: {}",
                q.label,
                out.stderr
            );
        }
        let dir = scratch.copy("subject");
        let out = run(subject.path(), &argv, &dir);
        assert_eq!(out.status, 1, "{mode:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("overlaps with bitmap directory")
                && out.stderr.contains("nothing was written"),
            "{mode:?}: {}",
            out.stderr
        );
        assert!(
            snapshot(&scratch.fixture()) == snapshot(&dir),
            "{mode:?}: a file changed"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Bitmaps QEMU refuses to open

fn with_b0(fx: &Fx) {
    bitmap(fx, &["--add", OVERLAY, "b0"]);
    write(fx, &["write -P 0x45 0 64k"]);
}

#[test]
fn qemu_refuses() {
    run_qemu_error("extra_data", &|fx| {
        with_b0(fx);
        edit_entry(fx, 0, |b, at| put32(b, at + 20, 8));
    });
    run_qemu_error("granularity", &|fx| {
        with_b0(fx);
        edit_entry(fx, 0, |b, at| b[at + 17] = 8);
    });
    run_qemu_error("reserved_flag", &|fx| {
        with_b0(fx);
        edit_entry(fx, 0, |b, at| put32(b, at + 12, 6));
    });
    run_qemu_error("table_entry_reserved", &|fx| {
        with_b0(fx);
        edit_entry(fx, 0, |b, at| {
            let t = be64(b, at) as usize;
            let v = be64(b, t) | 2;
            put64(b, t, v);
        });
    });
    run_qemu_error("table_size", &|fx| {
        with_b0(fx);
        edit_entry(fx, 0, |b, at| put32(b, at + 8, 2));
    });
    run_qemu_error("duplicate", &|fx| {
        with_b0(fx);
        bitmap(fx, &["--add", OVERLAY, "b1"]);
        edit_entry(fx, 1, |b, at| b[at + 25] = b'0');
    });
    run_qemu_error("more_than_header", &|fx| {
        with_b0(fx);
        bitmap(fx, &["--add", OVERLAY, "b1"]);
        fx.edit_header(OVERLAY, |h| {
            let e = h
                .exts
                .iter_mut()
                .find(|e| e.magic == 0x2385_2875)
                .expect("ext");
            put32(&mut e.data, 0, 1);
        });
    });
    run_qemu_error("less_than_header", &|fx| {
        with_b0(fx);
        fx.edit_header(OVERLAY, |h| {
            let e = h
                .exts
                .iter_mut()
                .find(|e| e.magic == 0x2385_2875)
                .expect("ext");
            put32(&mut e.data, 0, 2);
        });
    });
    run_qemu_error("broken_directory", &|fx| {
        with_b0(fx);
        fx.edit_header(OVERLAY, |h| {
            let e = h
                .exts
                .iter_mut()
                .find(|e| e.magic == 0x2385_2875)
                .expect("ext");
            put64(&mut e.data, 8, 20);
        });
    });
}

// ---------------------------------------------------------------------------------------
// Hostile bitmap metadata instar refuses

#[test]
fn hostile_refused() {
    run_refused("table_past_eof", "outside the image file", &|fx| {
        with_b0(fx);
        edit_entry(fx, 0, |b, at| put64(b, at, 0x4000_0000));
    });
    run_refused("data_on_l1", "Preventing invalid write", &|fx| {
        with_b0(fx);
        edit_entry(fx, 0, |b, at| {
            let t = be64(b, at) as usize;
            let l1 = be64(b, 40);
            put64(b, t, l1);
        });
    });
    run_refused(
        "table_on_refcount_table",
        "Preventing invalid write",
        &|fx| {
            with_b0(fx);
            edit_entry(fx, 0, |b, at| {
                let rt = be64(b, 48);
                put64(b, at, rt);
            });
        },
    );
    run_refused("data_refcount_zero", "nothing was written", &|fx| {
        with_b0(fx);
        // The data cluster's refcount dropped to 0: the store would allocate it again.
        fx.edit(OVERLAY, |b| {
            let at = entries(b)[0];
            let t = be64(b, at) as usize;
            let data = (be64(b, t) & 0x00ff_ffff_ffff_fe00) as usize;
            let rt = be64(b, 48) as usize;
            let block = be64(b, rt) as usize;
            let c = data >> 16;
            b[block + 2 * c..block + 2 * c + 2].fill(0);
        });
    });
}

/// A bitmap table whose every entry says "all ones" without a cluster (QEMU never
/// writes such a table): storing it would take a data cluster per entry, 256 MiB for
/// this file of a few MiB. `-u` is refused before any write instead of running into the
/// sandbox's write bound half-way.
#[test]
fn all_ones_table_past_the_write_bound() {
    let Some((refs, subject)) = setup() else {
        return;
    };
    if !subject.is_instar() {
        return;
    }
    let scratch = Scratch::new("all_ones");
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    fx.create("qcow2", OVERLAY, "1T", &["-o", "cluster_size=4k"]);
    bitmap(&fx, &["--add", "-g", "512", OVERLAY, "ones"]);
    fx.edit(OVERLAY, |b| {
        let at = entries(b)[0];
        let (t, n) = (be64(b, at) as usize, be32(b, at + 8) as usize);
        for i in 0..n {
            put64(b, t + 8 * i, 1);
        }
    });
    let dir = scratch.copy("subject");
    let argv = ["rebase", "-u", "-b", "", OVERLAY];
    let out = run(subject.path(), &argv, &dir);
    assert_eq!(out.status, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("past the sandbox's bound")
            && out.stderr.contains("nothing was written"),
        "{}",
        out.stderr
    );
    assert!(
        snapshot(&scratch.fixture()) == snapshot(&dir),
        "a file changed"
    );
}

/// A dirty overlay (lazy refcounts, the process killed) with bitmaps: QEMU stores the
/// bitmaps and then repairs the image on open; instar refuses it before any write.
#[test]
fn dirty_with_bitmaps_refused() {
    let Some((refs, subject)) = setup() else {
        return;
    };
    if !subject.is_instar() {
        return;
    }
    for mode in MODES {
        let scratch = Scratch::new(&format!("dirty_bitmaps-{mode:?}"));
        let fx = Fx::new(scratch.fixture(), &refs.v10_2);
        chain(&fx, "64k", ",lazy_refcounts=on");
        bitmap(&fx, &["--add", OVERLAY, "b0"]);
        let out = run(
            &fx.qemu.io,
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x46 0 192k",
                "-c",
                "sigraise 9",
                OVERLAY,
            ],
            &fx.dir,
        );
        let _ = out;
        assert_eq!(fx.read(OVERLAY)[79] & 1, 1, "the fixture must be dirty");
        let dir = scratch.copy("subject");
        let out = run(subject.path(), &rebase_argv(mode), &dir);
        assert_eq!(out.status, 1, "{mode:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("dirty bit") && out.stderr.contains("qemu-img check -r all"),
            "{mode:?}: {}",
            out.stderr
        );
        assert!(
            snapshot(&scratch.fixture()) == snapshot(&dir),
            "{mode:?}: a file changed"
        );
    }
}

/// Bitmaps in the backing files are only read: QEMU opens backings read-only and
/// never stores their bitmaps; the overlay's are stored as usual.
#[test]
fn backing_bitmaps_only_read() {
    run_case("backing_bitmaps", "64k", "", &|fx| {
        for f in ["base.qcow2", "new.qcow2"] {
            bitmap(fx, &["--add", f, "in-backing"]);
            fx.io("qcow2", f, &["write -P 0x47 6M 64k"]);
        }
        bitmap(fx, &["--add", OVERLAY, "b0"]);
        write(fx, &["write -P 0x48 64k 64k"]);
    });
}

/// Backing files are opened read-only, and QEMU checks their bitmaps as it opens them:
/// a broken one fails the open of the old backing (safe, flatten) or of the new one
/// (safe), with QEMU's message. `-u` opens neither.
#[test]
fn backing_bitmaps_broken() {
    let broken = |file: &'static str| {
        move |fx: &Fx| {
            bitmap(fx, &["--add", file, "x"]);
            edit_entry_in(fx, file, 0, |b, at| b[at + 17] = 40);
            bitmap(fx, &["--add", OVERLAY, "b0"]);
        }
    };
    run_qemu_error_in(
        "old_backing_broken",
        &[Mode::Safe, Mode::Flatten],
        &broken("base.qcow2"),
    );
    run_qemu_error_in("new_backing_broken", &[Mode::Safe], &broken("new.qcow2"));
}

/// Tables of IN_USE bitmaps (which QEMU never reads) of 2^20 entries each, five of
/// them: more than instar holds in memory. Refused before any write.
#[test]
fn tables_past_the_memory_bound() {
    let Some((refs, subject)) = setup() else {
        return;
    };
    if !subject.is_instar() {
        return;
    }
    let scratch = Scratch::new("tables_bound");
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    fx.create("qcow2", OVERLAY, "64M", &["-o", "cluster_size=512"]);
    for i in 0..5 {
        bitmap(&fx, &["--add", OVERLAY, &format!("b{i}")]);
    }
    fx.edit(OVERLAY, |b| {
        for at in entries(b) {
            put32(b, at + 8, 1 << 20);
            let flags = be32(b, at + 12) | 1;
            put32(b, at + 12, flags);
        }
    });
    let dir = scratch.copy("subject");
    let out = run(subject.path(), &["rebase", "-u", "-b", "", OVERLAY], &dir);
    assert_eq!(out.status, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("more than instar handles")
            && out.stderr.contains("nothing was written"),
        "{}",
        out.stderr
    );
    assert!(
        snapshot(&scratch.fixture()) == snapshot(&dir),
        "a file changed"
    );
}

/// A bitmaps extension without the autoclear bit (left by a program without bitmap
/// support): QEMU warns (its hint ends without a newline), drops the extension and
/// leaks the bitmaps' clusters. Same bytes, same stderr, in every mode.
#[test]
fn stale_extension_warns() {
    let Some((refs, subject)) = setup() else {
        return;
    };
    for mode in MODES {
        let label = format!("stale-{mode:?}");
        let scratch = Scratch::new(&label);
        let fx = Fx::new(scratch.fixture(), &refs.v10_2);
        chain(&fx, "64k", "");
        bitmap(&fx, &["--add", OVERLAY, "b0"]);
        write(&fx, &["write -P 0x49 0 64k"]);
        fx.edit(OVERLAY, |b| {
            let v = be64(b, 88) & !1;
            put64(b, 88, v);
        });
        let argv = rebase_argv(mode);
        let mut want: Option<(Vec<u8>, String)> = None;
        for q in references(refs) {
            let dir = scratch.copy(&format!("qemu-{}", q.label));
            let out = run(&q.img, &argv, &dir);
            assert_eq!(
                out.status, 0,
                "{label}: qemu-img {}: {}",
                q.label, out.stderr
            );
            let err = normalise_stderr(&out.stderr, &printed_argv0(&out.stderr, &q.img));
            let bytes = std::fs::read(dir.join(OVERLAY)).expect("read");
            match &want {
                None => want = Some((bytes, err)),
                Some((b, e)) => {
                    assert!(
                        describe_diff(b, &bytes).is_none(),
                        "{label}: 10.2 and {}",
                        q.label
                    );
                    assert_eq!(*e, err, "{label}: 10.2 and {}", q.label);
                }
            }
        }
        let (bytes, err) = want.expect("qemu-img 10.2");
        assert!(
            err.contains("warning: a program lacking bitmap support"),
            "{err}"
        );
        let dir = scratch.copy("subject");
        let out = run(subject.path(), &argv, &dir);
        assert_eq!(out.status, 0, "{label}: {}", out.stderr);
        assert!(
            !out.stderr.ends_with('\n'),
            "{label}: QEMU's hint ends without a newline"
        );
        assert_eq!(
            normalise_stderr(&out.stderr, subject.path()),
            err,
            "{label}: stderr"
        );
        let got = std::fs::read(dir.join(OVERLAY)).expect("read");
        if let Some(d) = describe_diff(&bytes, &got) {
            panic!("{label}: overlay differs from qemu-img's: {d}");
        }
    }
}

/// An overlay with an external data file: the bitmaps live in the qcow2 file, and `-u`
/// stores them there (the data file is only checked, never written).
#[test]
fn external_data_file_unsafe() {
    run_mode(
        "data_file",
        Mode::Unsafe,
        "64k",
        ",data_file=ov.data",
        &|fx| {
            bitmap(fx, &["--add", OVERLAY, "b0"]);
            write(fx, &["write -P 0x4a 1M 128k"]);
        },
    );
}

/// Seeded random scenarios: cluster size, refcount width or lazy refcounts, one to four
/// bitmaps of random granularity, each followed by random data and zero writes, some
/// disabled, sometimes a merge; `-u`, safe or flatten. A failure names its seed.
#[test]
fn random_scenarios() {
    for seed in 1..=12u64 {
        let mut rng = instar_testkit::Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let cs = *rng.pick(&["512", "4k", "64k", "64k", "2M"]);
        let opts = *rng.pick(&["", "", ",lazy_refcounts=on", ",refcount_bits=8"]);
        let mode = *rng.pick(&MODES);
        let plan_seed = rng.next();
        run_mode(&format!("random-{seed}"), mode, cs, opts, &move |fx| {
            random_bitmaps(fx, plan_seed)
        });
    }
}

fn random_bitmaps(fx: &Fx, seed: u64) {
    let mut rng = instar_testkit::Rng(seed | 1);
    let size = 8u64 << 20;
    let mut names = Vec::new();
    for k in 0..=rng.below(4) {
        let name = format!("bm{k}");
        let g = *rng.pick(&["512", "4k", "64k", "1M", "2M"]);
        bitmap(fx, &["--add", "-g", g, OVERLAY, &name]);
        let mut cmds = Vec::new();
        for _ in 0..rng.below(4) {
            let off = rng.below(size / 512) * 512;
            let any = (rng.below(300) + 1) * 512;
            let len = (*rng.pick(&[512, 4096, 65536, any])).min(size - off);
            cmds.push(if rng.below(3) == 0 {
                format!("write -z {off} {len}")
            } else {
                format!("write -P {} {off} {len}", rng.below(255) + 1)
            });
        }
        if !cmds.is_empty() {
            let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
            write(fx, &refs);
        }
        if rng.below(10) < 3 {
            bitmap(fx, &["--disable", OVERLAY, &name]);
        }
        names.push(name);
    }
    if names.len() > 1 && rng.below(10) < 3 {
        bitmap(
            fx,
            &["--merge", &names[0], OVERLAY, &names[names.len() - 1]],
        );
    }
}
